/* Escape attempts for daemon/tests/seccomp.rs: each argument names one attempt; the program prints
 * "<name>: ok" if the call succeeded, else "<name>: <ERRNO NAME>". Arguments are chosen so that a
 * call which reaches the kernel fails differently (EBADF, EFAULT, EINVAL) or succeeds: only the
 * seccomp filter answers EPERM (or ENOSYS for clone3) before looking at them. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BAD_PTR ((void *)1)

static void report(const char *name, long rc) {
    if (rc == -1)
        printf("%s: %s\n", name, strerrorname_np(errno));
    else
        printf("%s: ok\n", name);
    fflush(stdout);
}

/* A clone/clone3 child exits at once; the parent reaps it. */
static long reap(long pid) {
    if (pid == 0)
        _exit(0);
    if (pid > 0)
        waitpid((pid_t)pid, NULL, 0);
    return pid;
}

static long raw_clone(unsigned long flags) {
    return reap(syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0));
}

static long raw_clone3(uint64_t flags) {
    struct clone_args args;
    memset(&args, 0, sizeof(args));
    args.flags = flags;
    args.exit_signal = SIGCHLD;
    return reap(syscall(SYS_clone3, &args, sizeof(args)));
}

static long setns_proc1(const char *ns) {
    char path[64];
    snprintf(path, sizeof(path), "/proc/1/ns/%s", ns);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        fd = open("/proc/self/ns/mnt", O_RDONLY); /* pid 1 is root-owned: try our own instead */
    return syscall(SYS_setns, fd, 0);
}

static long attempt(const char *name) {
    struct iovec iov = {0};
    if (!strcmp(name, "fork")) return reap(fork());
    if (!strcmp(name, "clone")) return raw_clone(0);
    if (!strcmp(name, "clone_newuser")) return raw_clone(CLONE_NEWUSER);
    if (!strcmp(name, "clone_newns")) return raw_clone(CLONE_NEWNS);
    if (!strcmp(name, "clone_newnet")) return raw_clone(CLONE_NEWNET);
    if (!strcmp(name, "clone_newpid")) return raw_clone(CLONE_NEWPID);
    if (!strcmp(name, "clone3")) return raw_clone3(0);
    if (!strcmp(name, "clone3_newuser")) return raw_clone3(CLONE_NEWUSER);
    if (!strcmp(name, "unshare_user")) return syscall(SYS_unshare, CLONE_NEWUSER);
    if (!strcmp(name, "unshare_mount")) return syscall(SYS_unshare, CLONE_NEWNS);
    if (!strcmp(name, "unshare_bad_flags")) return syscall(SYS_unshare, 0x80000000UL);
    if (!strcmp(name, "setns_bad_fd")) return syscall(SYS_setns, -1, 0);
    if (!strcmp(name, "setns_mnt")) return setns_proc1("mnt");
    if (!strcmp(name, "setns_net")) return setns_proc1("net");
    if (!strcmp(name, "setns_user")) return setns_proc1("user");
    if (!strcmp(name, "setns_pid")) return setns_proc1("pid");
    if (!strcmp(name, "mount")) return syscall(SYS_mount, "none", BAD_PTR, "tmpfs", 0, NULL);
    if (!strcmp(name, "umount2")) return syscall(SYS_umount2, BAD_PTR, 0);
    if (!strcmp(name, "pivot_root")) return syscall(SYS_pivot_root, BAD_PTR, BAD_PTR);
    if (!strcmp(name, "open_tree")) return syscall(SYS_open_tree, -1, BAD_PTR, 0);
    if (!strcmp(name, "fsopen")) return syscall(SYS_fsopen, BAD_PTR, 0);
    if (!strcmp(name, "move_mount")) return syscall(SYS_move_mount, -1, BAD_PTR, -1, BAD_PTR, 0);
    if (!strcmp(name, "chroot")) return syscall(SYS_chroot, BAD_PTR);
    if (!strcmp(name, "bpf")) return syscall(SYS_bpf, 0xffff, NULL, 0);
    if (!strcmp(name, "perf_event_open")) return syscall(SYS_perf_event_open, BAD_PTR, 0, -1, -1, 0);
    if (!strcmp(name, "ptrace_traceme")) return syscall(SYS_ptrace, PTRACE_TRACEME, 0, 0, 0);
    if (!strcmp(name, "ptrace_attach_1")) return syscall(SYS_ptrace, PTRACE_ATTACH, 1, 0, 0);
    if (!strcmp(name, "process_vm_readv")) return syscall(SYS_process_vm_readv, getpid(), &iov, 0, &iov, 0, 0);
    if (!strcmp(name, "process_vm_writev")) return syscall(SYS_process_vm_writev, getpid(), &iov, 0, &iov, 0, 0);
    if (!strcmp(name, "keyctl")) return syscall(SYS_keyctl, 0 /* GET_KEYRING_ID */, -3 /* session */, 0);
    if (!strcmp(name, "add_key")) return syscall(SYS_add_key, BAD_PTR, BAD_PTR, NULL, 0, -3);
    if (!strcmp(name, "request_key")) return syscall(SYS_request_key, BAD_PTR, BAD_PTR, NULL, -3);
    if (!strcmp(name, "io_uring_setup")) return syscall(SYS_io_uring_setup, 1, BAD_PTR);
    if (!strcmp(name, "userfaultfd")) return syscall(SYS_userfaultfd, O_CLOEXEC);
    if (!strcmp(name, "open_by_handle_at")) return syscall(SYS_open_by_handle_at, -1, BAD_PTR, 0);
    if (!strcmp(name, "name_to_handle_at")) return syscall(SYS_name_to_handle_at, AT_FDCWD, "/", BAD_PTR, BAD_PTR, 0);
    if (!strcmp(name, "reboot")) return syscall(SYS_reboot, 0, 0, 0, NULL);
    if (!strcmp(name, "kexec_load")) return syscall(SYS_kexec_load, 0, 0, NULL, 0);
    if (!strcmp(name, "kexec_file_load")) return syscall(SYS_kexec_file_load, -1, -1, 0, NULL, 0);
    if (!strcmp(name, "init_module")) return syscall(SYS_init_module, BAD_PTR, 0, BAD_PTR);
    if (!strcmp(name, "finit_module")) return syscall(SYS_finit_module, -1, BAD_PTR, 0);
    if (!strcmp(name, "delete_module")) return syscall(SYS_delete_module, BAD_PTR, 0);
    if (!strcmp(name, "swapon")) return syscall(SYS_swapon, BAD_PTR, 0);
    if (!strcmp(name, "acct")) return syscall(SYS_acct, BAD_PTR);
    if (!strcmp(name, "clock_settime")) return syscall(SYS_clock_settime, CLOCK_REALTIME, BAD_PTR);
    if (!strcmp(name, "settimeofday")) return syscall(SYS_settimeofday, BAD_PTR, NULL);
    if (!strcmp(name, "adjtimex")) return syscall(SYS_adjtimex, BAD_PTR);
    /* personality: the query and PER_LINUX are allowed, flags that weaken the process are not. */
    if (!strcmp(name, "personality_query")) return syscall(SYS_personality, 0xffffffffUL);
    if (!strcmp(name, "personality_linux")) return syscall(SYS_personality, 0UL);
    if (!strcmp(name, "personality_no_aslr")) return syscall(SYS_personality, 0x0040000UL);
    if (!strcmp(name, "personality_read_implies_exec")) return syscall(SYS_personality, 0x0400000UL);
    fprintf(stderr, "unknown attempt %s\n", name);
    _exit(2);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        report(argv[i], attempt(argv[i]));
    return 0;
}
