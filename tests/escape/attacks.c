/*
 * The escape battery's attack program: one binary, one subcommand per attack, run as a pipeline
 * step inside a kiln sandbox (hermetic profile) by tests/escape/main.rs. The test compiles it on the
 * host with `cc` and uploads it as the step's read-only `tools` workspace.
 *
 *   escape ATTACK NONCE [ARG...]
 *
 * NONCE only marks every process of the attack (it stays in /proc/PID/cmdline, also in forked
 * children) so the host can scan for survivors. Output convention, one line per attempt (see the
 * top of main.rs):
 *
 *   BLOCKED: <attempt>: <errno name> (<message>)   the attempt failed as it must
 *   ESCAPED: <attempt>: <what happened>            the attempt succeeded: a control is missing
 *   PLANTED: <attempt>: <what>                     set up for the host to judge (links, daemons)
 *   INFO: ...                                      context, no verdict
 *   ERROR: ...                                     the attack itself could not run (a test bug)
 *
 * Exit status: 1 if anything escaped, 2 on an error or if nothing was blocked or planted, else 0.
 * Every attempt is constructed so that it *succeeds* without the control that must stop it (run the
 * binary unconfined to see ESCAPED lines); an attempt that fails for an unrelated reason proves
 * nothing. Nothing here damages the host even when unblocked: writes to kernel knobs stop at a
 * successful open(), bombs are capped by the test, planted keys are revoked at once.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/bpf.h>
#include <linux/capability.h>
#include <linux/io_uring.h>
#include <linux/keyctl.h>
#include <linux/perf_event.h>
#include <linux/reboot.h>
#include <linux/sched.h>
#include <linux/userfaultfd.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static int n_blocked, n_escaped, n_errors, n_planted;
static const char *nonce = "";

static const char *errname(int err) {
    const char *name = strerrorname_np(err);
    return name ? name : "E?";
}

static void blocked(const char *what, int err) {
    printf("BLOCKED: %s: %s (%s)\n", what, errname(err), strerror(err));
    n_blocked++;
}

static void blocked_because(const char *what, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("BLOCKED: %s: ", what);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    n_blocked++;
}

static void escaped(const char *what, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("ESCAPED: %s: ", what);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    n_escaped++;
}

static void planted(const char *what, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("PLANTED: %s: ", what);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    n_planted++;
}

static void info(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("INFO: ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
}

static void error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("ERROR: ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    n_errors++;
}

/* A call that must fail: -1 is a block (with its errno), anything else an escape. */
static void must_fail(const char *what, long ret, int err) {
    if (ret == -1)
        blocked(what, err);
    else
        escaped(what, "succeeded (returned %ld)", ret);
}
#define MUST_FAIL(what, call)                                                                      \
    do {                                                                                           \
        errno = 0;                                                                                 \
        long ret_ = (long)(call);                                                                  \
        must_fail((what), ret_, errno);                                                            \
    } while (0)

/* open() that must fail; a successful open is closed at once (nothing is ever written). */
static void open_must_fail(const char *what, const char *path, int flags) {
    int fd = open(path, flags | O_CLOEXEC, 0644);
    if (fd < 0) {
        blocked(what, errno);
        return;
    }
    close(fd);
    escaped(what, "opened %s", path);
}

/* Tally of a child that ran attempts: its exit status is its verdict (its lines are already out). */
static void collect_child(pid_t child) {
    int status;
    while (waitpid(child, &status, 0) < 0) {
        if (errno != EINTR) {
            error("waitpid: %s", strerror(errno));
            return;
        }
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
        n_blocked++;
    else if (WIFEXITED(status) && WEXITSTATUS(status) == 1)
        n_escaped++;
    else
        error("attempt child ended with wait status %#x", status);
}

/* Runs BODY in a forked child, so an attempt that succeeds (a new namespace, a joined keyring)
 * cannot change the conditions of the next one. */
#define IN_CHILD(body)                                                                             \
    do {                                                                                           \
        fflush(stdout);                                                                            \
        pid_t child_ = fork();                                                                     \
        if (child_ < 0) {                                                                          \
            error("fork: %s", strerror(errno));                                                    \
            break;                                                                                 \
        }                                                                                          \
        if (child_ == 0) {                                                                         \
            n_blocked = n_escaped = n_errors = 0;                                                  \
            body;                                                                                  \
            fflush(stdout);                                                                        \
            _exit(n_errors ? 2 : n_escaped ? 1 : n_blocked ? 0 : 2);                               \
        }                                                                                          \
        collect_child(child_);                                                                     \
    } while (0)

static int arg_int(char **args, int nargs, int i) {
    if (i >= nargs || !*args[i]) {
        error("missing argument %d", i);
        return -1;
    }
    return atoi(args[i]);
}

static const char *arg_str(char **args, int nargs, int i) {
    if (i >= nargs || !*args[i]) {
        error("missing argument %d", i);
        return "";
    }
    return args[i];
}

/* Reads one "Name:\tvalue" line of /proc/PID/status into out. */
static int status_field(pid_t pid, const char *field, char *out, size_t len) {
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    size_t flen = strlen(field);
    int found = -1;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, field, flen) == 0 && line[flen] == ':') {
            char *v = line + flen + 1;
            while (*v == '\t' || *v == ' ')
                v++;
            v[strcspn(v, "\n")] = 0;
            snprintf(out, len, "%s", v);
            found = 0;
            break;
        }
    }
    fclose(f);
    return found;
}

/* True if the status of PID shows any uid/gid 0 or any capability. */
static int privileged(pid_t pid, char *desc, size_t len) {
    char uid[128] = "?", gid[128] = "?", eff[64] = "?", prm[64] = "?";
    status_field(pid, "Uid", uid, sizeof uid);
    status_field(pid, "Gid", gid, sizeof gid);
    status_field(pid, "CapEff", eff, sizeof eff);
    status_field(pid, "CapPrm", prm, sizeof prm);
    snprintf(desc, len, "Uid %s, Gid %s, CapEff %s, CapPrm %s", uid, gid, eff, prm);
    int priv = strtoull(eff, NULL, 16) != 0 || strtoull(prm, NULL, 16) != 0;
    for (char *ids = uid; *ids; ids++)
        if ((ids == uid || ids[-1] == '\t' || ids[-1] == ' ') && ids[0] == '0' &&
            (ids[1] == 0 || ids[1] == '\t' || ids[1] == ' '))
            priv = 1;
    return priv;
}

/* ---- namespaces ------------------------------------------------------------------------------ */

static void a_unshare_user(char **args, int nargs) {
    (void)args, (void)nargs;
    IN_CHILD(MUST_FAIL("unshare(CLONE_NEWUSER)", unshare(CLONE_NEWUSER)));
    IN_CHILD(MUST_FAIL("unshare(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWNET)",
                       unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET)));
    /* The payoff if it works: root with every capability over a private mount table. */
    IN_CHILD({
        if (unshare(CLONE_NEWUSER | CLONE_NEWNS) < 0) {
            blocked("unshare(NEWUSER|NEWNS) then mount tmpfs", errno);
        } else {
            int fd = open("/proc/self/setgroups", O_WRONLY);
            if (fd >= 0) {
                (void)!write(fd, "deny", 4);
                close(fd);
            }
            char map[64];
            snprintf(map, sizeof map, "0 %d 1", (int)getuid());
            fd = open("/proc/self/uid_map", O_WRONLY);
            if (fd >= 0) {
                (void)!write(fd, map, strlen(map));
                close(fd);
            }
            int m = mount("none", "/tmp", "tmpfs", 0, NULL);
            escaped("unshare(NEWUSER|NEWNS) then mount tmpfs",
                    "namespaces created; mount of tmpfs inside %s", m == 0 ? "succeeded" : "failed");
        }
    });
}

static void a_unshare_other(char **args, int nargs) {
    (void)args, (void)nargs;
    static const struct {
        int flag;
        const char *name;
    } flags[] = {
        {CLONE_NEWNS, "unshare(CLONE_NEWNS)"},         {CLONE_NEWNET, "unshare(CLONE_NEWNET)"},
        {CLONE_NEWPID, "unshare(CLONE_NEWPID)"},       {CLONE_NEWUTS, "unshare(CLONE_NEWUTS)"},
        {CLONE_NEWIPC, "unshare(CLONE_NEWIPC)"},       {CLONE_NEWCGROUP, "unshare(CLONE_NEWCGROUP)"},
        {CLONE_NEWTIME, "unshare(CLONE_NEWTIME)"},
    };
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        IN_CHILD(MUST_FAIL(flags[i].name, unshare(flags[i].flag)));
}

static void raw_clone_must_fail(const char *what, unsigned long flags) {
    fflush(stdout);
    errno = 0;
    long pid = syscall(SYS_clone, flags | SIGCHLD, 0, NULL, NULL, 0);
    if (pid == 0)
        syscall(SYS_exit_group, 0);
    if (pid < 0) {
        blocked(what, errno);
        return;
    }
    waitpid((pid_t)pid, NULL, 0);
    escaped(what, "child %ld created in new namespaces", pid);
}

static void a_clone_newuser(char **args, int nargs) {
    (void)args, (void)nargs;
    raw_clone_must_fail("clone(CLONE_NEWUSER)", CLONE_NEWUSER);
    raw_clone_must_fail("clone(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWPID)",
                        CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID);
    raw_clone_must_fail("clone(CLONE_NEWNS)", CLONE_NEWNS);
}

static void a_clone3(char **args, int nargs) {
    (void)args, (void)nargs;
    static const struct {
        unsigned long long flags;
        const char *name;
    } cases[] = {
        {CLONE_NEWUSER, "clone3(CLONE_NEWUSER)"},
        {CLONE_NEWUSER | CLONE_NEWNS, "clone3(CLONE_NEWUSER|CLONE_NEWNS)"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct clone_args ca;
        memset(&ca, 0, sizeof ca);
        ca.flags = cases[i].flags;
        ca.exit_signal = SIGCHLD;
        fflush(stdout);
        errno = 0;
        long pid = syscall(SYS_clone3, &ca, sizeof ca);
        if (pid == 0)
            syscall(SYS_exit_group, 0);
        if (pid < 0) {
            blocked(cases[i].name, errno);
            continue;
        }
        waitpid((pid_t)pid, NULL, 0);
        escaped(cases[i].name, "child %ld created in new namespaces", pid);
    }
}

static void a_setns(char **args, int nargs) {
    const char *kilnd = arg_str(args, nargs, 0);
    static const char *const kinds[] = {"mnt", "net", "pid", "uts", "ipc", "user", "cgroup", "time"};
    const char *pids[] = {"1", kilnd};
    for (size_t p = 0; p < 2; p++) {
        for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
            char path[128], what[192];
            snprintf(path, sizeof path, "/proc/%s/ns/%s", pids[p], kinds[i]);
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd < 0) {
                snprintf(what, sizeof what, "open %s", path);
                blocked(what, errno);
                continue;
            }
            snprintf(what, sizeof what, "setns(%s)", path);
            IN_CHILD(MUST_FAIL(what, setns(fd, 0)));
            close(fd);
        }
    }
    /* pidfd_open has no access check of its own; joining through the pidfd must still fail. */
    int pidfd = (int)syscall(SYS_pidfd_open, 1, 0);
    if (pidfd < 0) {
        blocked("pidfd_open(1)", errno);
    } else {
        IN_CHILD(MUST_FAIL("setns(pidfd of pid 1, CLONE_NEWNS|CLONE_NEWNET)",
                           setns(pidfd, CLONE_NEWNS | CLONE_NEWNET)));
        close(pidfd);
    }
}

/* ---- mounts ---------------------------------------------------------------------------------- */

static void a_mount(char **args, int nargs) {
    (void)args, (void)nargs;
    mkdir("/tmp/m", 0755);
    MUST_FAIL("mount tmpfs on /tmp/m", mount("none", "/tmp/m", "tmpfs", 0, NULL));
    MUST_FAIL("bind / on /tmp/m", mount("/", "/tmp/m", NULL, MS_BIND | MS_REC, NULL));
    MUST_FAIL("remount input workspace read-write",
              mount(NULL, "/workspace/tools", NULL, MS_REMOUNT | MS_BIND, NULL));
    MUST_FAIL("remount / read-write", mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND, NULL));
    MUST_FAIL("remount /usr read-write with suid",
              mount(NULL, "/usr", NULL, MS_REMOUNT | MS_BIND, NULL));
    MUST_FAIL("mount proc on /tmp/m", mount("proc", "/tmp/m", "proc", 0, NULL));
    MUST_FAIL("mount sysfs on /tmp/m", mount("sysfs", "/tmp/m", "sysfs", 0, NULL));
    MUST_FAIL("mount cgroup2 on /tmp/m", mount("cgroup2", "/tmp/m", "cgroup2", 0, NULL));
    MUST_FAIL("make / rshared (propagate to the host)",
              mount(NULL, "/", NULL, MS_SHARED | MS_REC, NULL));
    MUST_FAIL("mount the host disk /dev/vda", mount("/dev/vda", "/tmp/m", "ext4", MS_RDONLY, NULL));
    MUST_FAIL("bind output workspace over input",
              mount("/workspace/out", "/workspace/tools", NULL, MS_BIND, NULL));
}

static void a_umount(char **args, int nargs) {
    (void)args, (void)nargs;
    MUST_FAIL("umount /workspace/tools", umount2("/workspace/tools", MNT_DETACH));
    MUST_FAIL("umount /proc", umount2("/proc", MNT_DETACH));
    MUST_FAIL("umount /dev/null", umount2("/dev/null", 0));
    MUST_FAIL("umount /usr", umount2("/usr", MNT_DETACH));
    MUST_FAIL("umount /", umount2("/", MNT_DETACH));
    MUST_FAIL("umount /tmp", umount2("/tmp", MNT_FORCE));
}

static void same_inode(const char *what, const char *a, const char *b) {
    struct stat sa, sb;
    if (stat(a, &sa) < 0 || stat(b, &sb) < 0) {
        error("stat %s / %s: %s", a, b, strerror(errno));
        return;
    }
    if (sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino)
        blocked_because(what, "%s is %s", b, a);
    else
        escaped(what, "%s is not %s: something above the root", b, a);
}

static void a_pivot_chroot(char **args, int nargs) {
    (void)args, (void)nargs;
    mkdir("/tmp/jail", 0755);
    mkdir("/tmp/jail/old", 0755);
    IN_CHILD(MUST_FAIL("chroot /tmp/jail", chroot("/tmp/jail")));
    IN_CHILD(MUST_FAIL("pivot_root /tmp/jail", syscall(SYS_pivot_root, "/tmp/jail", "/tmp/jail/old")));
    IN_CHILD({
        if (chdir("/") < 0)
            error("chdir /: %s", strerror(errno));
        MUST_FAIL("pivot_root(., .)", syscall(SYS_pivot_root, ".", "."));
    });
    /* The classic chroot break-out: chroot deeper, then climb with a cwd left outside. */
    IN_CHILD({
        int outside = open("/", O_RDONLY | O_DIRECTORY);
        if (chroot("/tmp/jail") < 0) {
            blocked("chroot break-out (chroot, fchdir, chdir ..)", errno);
        } else {
            (void)!fchdir(outside);
            for (int i = 0; i < 64; i++)
                (void)!chdir("..");
            int r = chroot(".");
            escaped("chroot break-out (chroot, fchdir, chdir ..)", "chroot succeeded (%d)", r);
        }
    });
    same_inode("climb above / with ..", "/", "/..");
    same_inode("climb above / through /proc/self/root", "/", "/proc/self/root/..");
    same_inode("climb above / from a workspace", "/", "/workspace/out/../../../../..");
}

static void a_new_mount_api(char **args, int nargs) {
    (void)args, (void)nargs;
    mkdir("/tmp/m", 0755);
    MUST_FAIL("fsopen(tmpfs)", syscall(SYS_fsopen, "tmpfs", 0));
    MUST_FAIL("fspick(/)", syscall(SYS_fspick, AT_FDCWD, "/", 0));
    MUST_FAIL("open_tree(/usr, OPEN_TREE_CLONE)",
              syscall(SYS_open_tree, AT_FDCWD, "/usr", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC));
    MUST_FAIL("open_tree(/, OPEN_TREE_CLONE|AT_RECURSIVE)",
              syscall(SYS_open_tree, AT_FDCWD, "/", OPEN_TREE_CLONE | AT_RECURSIVE));
    MUST_FAIL("move_mount(/workspace/tools -> /tmp/m)",
              syscall(SYS_move_mount, AT_FDCWD, "/workspace/tools", AT_FDCWD, "/tmp/m", 0));
    struct mount_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.attr_clr = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID;
    MUST_FAIL("mount_setattr(/workspace/tools, clear RDONLY|NOSUID)",
              syscall(SYS_mount_setattr, AT_FDCWD, "/workspace/tools", 0, &attr, sizeof attr));
    MUST_FAIL("mount_setattr(/, clear RDONLY, recursive)",
              syscall(SYS_mount_setattr, AT_FDCWD, "/", AT_RECURSIVE, &attr, sizeof attr));
}

/* ---- processes ------------------------------------------------------------------------------- */

/* process_vm_readv/writev: ESRCH/EPERM is a block; EFAULT means the access check passed. */
static void vm_access_must_fail(const char *what, pid_t pid, int write_) {
    char local = 0;
    struct iovec l = {&local, 1}, r = {(void *)0x1000, 1};
    errno = 0;
    ssize_t n = write_ ? process_vm_writev(pid, &l, 1, &r, 1, 0) : process_vm_readv(pid, &l, 1, &r, 1, 0);
    if (n < 0 && errno != EFAULT)
        blocked(what, errno);
    else
        escaped(what, "the kernel granted access to pid %d's memory (%s)", (int)pid,
                n < 0 ? "EFAULT on an unmapped address" : "bytes transferred");
}

static void ptrace_must_fail(const char *what, long request, pid_t pid) {
    errno = 0;
    long r = ptrace(request, pid, NULL, NULL);
    if (r < 0) {
        blocked(what, errno);
        return;
    }
    ptrace(PTRACE_DETACH, pid, NULL, NULL);
    escaped(what, "attached to pid %d", (int)pid);
}

static void a_ptrace_host(char **args, int nargs) {
    int victim = arg_int(args, nargs, 0), kilnd = arg_int(args, nargs, 1);
    if (victim <= 0 || kilnd <= 0)
        return;
    int pids[] = {victim, kilnd};
    const char *names[] = {"host process (uid 65534)", "kilnd"};
    for (int i = 0; i < 2; i++) {
        char what[160], path[64];
        snprintf(what, sizeof what, "kill(%s, 0)", names[i]);
        MUST_FAIL(what, kill(pids[i], 0));
        snprintf(what, sizeof what, "ptrace(ATTACH, %s)", names[i]);
        ptrace_must_fail(what, PTRACE_ATTACH, pids[i]);
        snprintf(what, sizeof what, "ptrace(SEIZE, %s)", names[i]);
        ptrace_must_fail(what, PTRACE_SEIZE, pids[i]);
        snprintf(what, sizeof what, "process_vm_readv(%s)", names[i]);
        vm_access_must_fail(what, pids[i], 0);
        snprintf(what, sizeof what, "process_vm_writev(%s)", names[i]);
        vm_access_must_fail(what, pids[i], 1);
        snprintf(what, sizeof what, "open /proc/<%s>/mem", names[i]);
        snprintf(path, sizeof path, "/proc/%d/mem", pids[i]);
        open_must_fail(what, path, O_RDWR);
    }
}

static volatile char sibling_secret[16] = "unchanged";

static void a_ptrace_sibling(char **args, int nargs) {
    (void)args, (void)nargs;
    fflush(stdout);
    pid_t child = fork();
    if (child < 0) {
        error("fork: %s", strerror(errno));
        return;
    }
    if (child == 0) {
        for (;;)
            pause();
    }
    ptrace_must_fail("ptrace(ATTACH, sibling in the sandbox)", PTRACE_ATTACH, child);
    waitpid(child, NULL, WNOHANG | __WALL);
    ptrace_must_fail("ptrace(SEIZE, sibling in the sandbox)", PTRACE_SEIZE, child);
    /* Same binary, same layout after fork: the sibling's copy of sibling_secret is at our address. */
    char buf[16] = "pwned";
    struct iovec l = {buf, sizeof buf}, r = {(void *)sibling_secret, sizeof buf};
    MUST_FAIL("process_vm_writev(sibling)", process_vm_writev(child, &l, 1, &r, 1, 0));
    MUST_FAIL("process_vm_readv(sibling)", process_vm_readv(child, &l, 1, &r, 1, 0));
    IN_CHILD(MUST_FAIL("ptrace(TRACEME)", ptrace(PTRACE_TRACEME, 0, NULL, NULL)));
    kill(child, SIGKILL);
    waitpid(child, NULL, __WALL);
}

static void a_ptrace_pid1(char **args, int nargs) {
    (void)args, (void)nargs;
    ptrace_must_fail("ptrace(ATTACH, sandbox pid 1)", PTRACE_ATTACH, 1);
    ptrace_must_fail("ptrace(SEIZE, sandbox pid 1)", PTRACE_SEIZE, 1);
    vm_access_must_fail("process_vm_readv(sandbox pid 1)", 1, 0);
    vm_access_must_fail("process_vm_writev(sandbox pid 1)", 1, 1);
    open_must_fail("open /proc/1/mem read-write", "/proc/1/mem", O_RDWR);
    MUST_FAIL("kill(sandbox pid 1, 0)", kill(1, 0));
    int pidfd = (int)syscall(SYS_pidfd_open, 1, 0);
    if (pidfd < 0) {
        blocked("pidfd_open(1)", errno);
    } else {
        MUST_FAIL("pidfd_send_signal(pid 1, 0)", syscall(SYS_pidfd_send_signal, pidfd, 0, NULL, 0));
        MUST_FAIL("pidfd_getfd(pid 1, fd 0)", syscall(SYS_pidfd_getfd, pidfd, 0, 0));
        close(pidfd);
    }
}

static void a_kill_host(char **args, int nargs) {
    int victim = arg_int(args, nargs, 0);
    if (victim <= 0)
        return;
    char what[128];
    snprintf(what, sizeof what, "kill(host pid %d, SIGKILL)", victim);
    MUST_FAIL(what, kill(victim, SIGKILL));
    snprintf(what, sizeof what, "kill(host process group -%d, SIGKILL)", victim);
    MUST_FAIL(what, kill(-victim, SIGKILL));
    snprintf(what, sizeof what, "tgkill(host pid %d, SIGKILL)", victim);
    MUST_FAIL(what, syscall(SYS_tgkill, victim, victim, SIGKILL));
    snprintf(what, sizeof what, "pidfd_open(host pid %d)", victim);
    MUST_FAIL(what, syscall(SYS_pidfd_open, victim, 0));
    /* kill(-1) reaches every process we may signal: in a private pid namespace, none outside. */
    errno = 0;
    int r = kill(-1, SIGKILL);
    info("kill(-1, SIGKILL) returned %d (%s); the host checks that its victim survived", r,
         r < 0 ? errname(errno) : "signalled something in the sandbox");
}

/* ---- filesystem ------------------------------------------------------------------------------ */

static void a_write_input(char **args, int nargs) {
    const char *dir = arg_str(args, nargs, 0);
    char path[512], other[512];
    snprintf(path, sizeof path, "%s/file", dir);
    struct stat st;
    if (stat(path, &st) < 0) {
        error("stat %s: %s", path, strerror(errno));
        return;
    }
    /* Owned by us: only the read-only mount stands between the step and a write. */
    info("%s is owned by uid %d (we are %d)", path, (int)st.st_uid, (int)getuid());
    open_must_fail("open input file for writing", path, O_WRONLY | O_APPEND);
    open_must_fail("truncate input file via open", path, O_WRONLY | O_TRUNC);
    MUST_FAIL("truncate() input file", truncate(path, 0));
    snprintf(other, sizeof other, "%s/new", dir);
    open_must_fail("create a file in the input workspace", other, O_WRONLY | O_CREAT | O_EXCL);
    MUST_FAIL("chmod input file", chmod(path, 0777));
    MUST_FAIL("unlink input file", unlink(path));
    MUST_FAIL("rename input file", rename(path, other));
    snprintf(other, sizeof other, "%s/dir", dir);
    MUST_FAIL("mkdir in the input workspace", mkdir(other, 0755));
    MUST_FAIL("utimensat input file", utimensat(AT_FDCWD, path, NULL, 0));
    MUST_FAIL("setxattr user.kiln on input file", setxattr(path, "user.kiln", "x", 1, 0));
    snprintf(other, sizeof other, "%s/link", dir);
    MUST_FAIL("symlink in the input workspace", symlink("/etc", other));
    MUST_FAIL("tools workspace: open for writing",
              open("/workspace/tools/escape", O_WRONLY | O_APPEND | O_CLOEXEC));
}

static void a_write_root(char **args, int nargs) {
    (void)args, (void)nargs;
    open_must_fail("create /etc/passwd", "/etc/passwd", O_WRONLY | O_CREAT);
    open_must_fail("create /usr/bin/kiln-pwned", "/usr/bin/kiln-pwned", O_WRONLY | O_CREAT);
    open_must_fail("open /usr/bin/sh for writing", "/usr/bin/sh", O_WRONLY);
    open_must_fail("open /etc/ld.so.cache for writing", "/etc/ld.so.cache", O_WRONLY);
    MUST_FAIL("mkdir /workspace/new", mkdir("/workspace/new", 0755));
    MUST_FAIL("symlink /pwn", symlink("/", "/pwn"));
    MUST_FAIL("rename /workspace/tools", rename("/workspace/tools", "/workspace/t2"));
    MUST_FAIL("chmod /usr/bin", chmod("/usr/bin", 0777));
}

static void a_symlink_out(char **args, int nargs) {
    const char *secret = arg_str(args, nargs, 0), *state = arg_str(args, nargs, 1);
    char rel[1024];
    snprintf(rel, sizeof rel, "../../../../../../../../..%s", secret);
    const char *links[][2] = {
        {"shadow", "/etc/shadow"},  {"passwd", "/etc/passwd"}, {"host-secret", secret},
        {"host-secret-rel", rel},   {"root", "/"},             {"state", state},
        {"pid1-root", "/proc/1/root"},
    };
    for (size_t i = 0; i < sizeof links / sizeof links[0]; i++) {
        char path[256];
        snprintf(path, sizeof path, "/workspace/out/%s", links[i][0]);
        if (symlink(links[i][1], path) < 0)
            error("symlink %s -> %s: %s", path, links[i][1], strerror(errno));
        else
            planted("symlink in the output workspace", "%s -> %s", links[i][0], links[i][1]);
    }
    FILE *ok = fopen("/workspace/out/ok.txt", "we");
    if (ok) {
        fputs("ok\n", ok);
        fclose(ok);
    }
    /* Inside the sandbox the targets are not there: following a link reaches nothing of the host. */
    const char *follow[] = {"shadow", "host-secret", "host-secret-rel", "state", "pid1-root"};
    for (size_t i = 0; i < sizeof follow / sizeof follow[0]; i++) {
        char path[256], what[256];
        snprintf(path, sizeof path, "/workspace/out/%s", follow[i]);
        snprintf(what, sizeof what, "read through link %s", follow[i]);
        open_must_fail(what, path, O_RDONLY);
    }
}

static void a_hardlink_out(char **args, int nargs) {
    (void)args, (void)nargs;
    MUST_FAIL("link /etc/ld.so.cache into the output",
              link("/etc/ld.so.cache", "/workspace/out/ld.so.cache"));
    MUST_FAIL("link /usr/bin/su into the output", link("/usr/bin/su", "/workspace/out/su"));
    MUST_FAIL("link an input file into the output",
              link("/workspace/tools/escape", "/workspace/out/escape"));
    int fd = open("/etc/ld.so.cache", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        error("open /etc/ld.so.cache: %s", strerror(errno));
        return;
    }
    MUST_FAIL("linkat(fd, \"\", AT_EMPTY_PATH)",
              linkat(fd, "", AT_FDCWD, "/workspace/out/by-fd", AT_EMPTY_PATH));
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    MUST_FAIL("linkat(/proc/self/fd/N, AT_SYMLINK_FOLLOW)",
              linkat(AT_FDCWD, proc, AT_FDCWD, "/workspace/out/by-proc", AT_SYMLINK_FOLLOW));
    close(fd);
}

static void a_dotdot(char **args, int nargs) {
    const char *secret = arg_str(args, nargs, 0), *state = arg_str(args, nargs, 1);
    char path[1024];
    snprintf(path, sizeof path, "/workspace/out/../../../../../../..%s", secret);
    open_must_fail("open ../../..<host secret> from the output workspace", path, O_RDONLY);
    snprintf(path, sizeof path, "/workspace/tools/../../../../..%s/kiln.db", state);
    open_must_fail("open ../../..<state dir>/kiln.db from the input workspace", path, O_RDONLY);
    open_must_fail("open /../../../etc/shadow", "/../../../etc/shadow", O_RDONLY);
    snprintf(path, sizeof path, "/proc/self/cwd/../../../../../..%s", secret);
    open_must_fail("open /proc/self/cwd/../..<host secret>", path, O_RDONLY);
    if (chdir("/workspace/out") == 0) {
        for (int i = 0; i < 32; i++)
            (void)!chdir("..");
        same_inode("chdir .. 32 times from the output workspace", "/", ".");
    }
}

static void a_other_workspace(char **args, int nargs) {
    char path[4096], what[4200];
    for (int i = 0; i < nargs; i++) {
        snprintf(what, sizeof what, "stat %s", args[i]);
        struct stat st;
        MUST_FAIL(what, stat(args[i], &st));
        snprintf(path, sizeof path, "%s/pwned", args[i]);
        snprintf(what, sizeof what, "create %s", path);
        open_must_fail(what, path, O_WRONLY | O_CREAT);
    }
    MUST_FAIL("mkdir /workspace/made (a workspace this step did not declare)",
              mkdir("/workspace/made", 0755));
    struct stat st;
    MUST_FAIL("stat /workspace/made", stat("/workspace/made", &st));
    open_must_fail("create /workspace/out/../made/pwned", "/workspace/out/../made/pwned",
                   O_WRONLY | O_CREAT);
    /* Our own mountinfo names the host directory behind /workspace/out; its siblings are the other
     * workspaces of this job: they must not be reachable under that name. */
    FILE *f = fopen("/proc/self/mountinfo", "re");
    char line[4096];
    while (f && fgets(line, sizeof line, f)) {
        char root[2048], mnt[2048];
        if (sscanf(line, "%*s %*s %*s %2047s %2047s", root, mnt) != 2)
            continue;
        if (strcmp(mnt, "/workspace/out") != 0)
            continue;
        char *slash = strrchr(root, '/');
        if (!slash)
            continue;
        *slash = 0;
        snprintf(path, sizeof path, "%s/made/pwned", root);
        snprintf(what, sizeof what, "create %s (host path of a sibling workspace)", path);
        open_must_fail(what, path, O_WRONLY | O_CREAT);
        snprintf(path, sizeof path, "%s/made", root);
        snprintf(what, sizeof what, "stat %s", path);
        MUST_FAIL(what, stat(path, &st));
    }
    if (f)
        fclose(f);
}

static void a_proc1_root(char **args, int nargs) {
    const char *kilnd = arg_str(args, nargs, 0);
    char path[256];
    open_must_fail("opendir /proc/1/root", "/proc/1/root/", O_RDONLY | O_DIRECTORY);
    open_must_fail("open /proc/1/root/etc/hostname", "/proc/1/root/etc/hostname", O_RDONLY);
    open_must_fail("opendir /proc/1/cwd", "/proc/1/cwd/", O_RDONLY | O_DIRECTORY);
    open_must_fail("open /proc/1/environ", "/proc/1/environ", O_RDONLY);
    open_must_fail("opendir /proc/1/fd", "/proc/1/fd/", O_RDONLY | O_DIRECTORY);
    open_must_fail("open /proc/1/map_files", "/proc/1/map_files/", O_RDONLY | O_DIRECTORY);
    char buf[512];
    MUST_FAIL("readlink /proc/1/root", readlink("/proc/1/root", buf, sizeof buf));
    MUST_FAIL("readlink /proc/1/cwd", readlink("/proc/1/cwd", buf, sizeof buf));
    snprintf(path, sizeof path, "/proc/%s/root/", kilnd);
    open_must_fail("opendir /proc/<kilnd pid>/root", path, O_RDONLY | O_DIRECTORY);
    /* Our own root link must lead to our own root. */
    same_inode("/proc/self/root is the sandbox root", "/", "/proc/self/root/");
}

static void a_proc_exe(char **args, int nargs) {
    (void)args, (void)nargs;
    open_must_fail("open /proc/self/exe for writing", "/proc/self/exe", O_WRONLY);
    open_must_fail("open /proc/1/exe (the host's kiln-sandbox binary) for writing", "/proc/1/exe",
                   O_WRONLY);
    open_must_fail("open /proc/1/exe with O_PATH", "/proc/1/exe", O_PATH);
    int fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        char path[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        open_must_fail("reopen /proc/self/exe read-only fd for writing", path, O_WRONLY);
        close(fd);
    }
}

/* ---- kernel interfaces ----------------------------------------------------------------------- */

/* A knob the step may open (mode 0666 or its own) but must not change: write a harmless value. */
static void write_must_fail(const char *what, const char *path, const char *value) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        blocked(what, errno);
        return;
    }
    errno = 0;
    ssize_t n = write(fd, value, strlen(value));
    int err = errno;
    close(fd);
    must_fail(what, n, err);
}

static void a_proc_sys(char **args, int nargs) {
    (void)args, (void)nargs;
    /* Host-wide knobs: opening one for writing is already the escape, so nothing is written. */
    static const char *const knobs[] = {
        "/proc/sys/kernel/core_pattern", "/proc/sys/kernel/modprobe",
        "/proc/sys/kernel/hostname",     "/proc/sys/vm/drop_caches",
        "/proc/sys/kernel/panic",        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/fs/binfmt_misc/register", "/proc/sysrq-trigger",
        "/proc/sys/kernel/sysrq",        "/proc/sys/user/max_user_namespaces",
        "/proc/sys/kernel/unprivileged_bpf_disabled",
    };
    for (size_t i = 0; i < sizeof knobs / sizeof knobs[0]; i++) {
        char what[128];
        snprintf(what, sizeof what, "open %s for writing", knobs[i]);
        open_must_fail(what, knobs[i], O_WRONLY);
    }
    /* World-writable or our own, checked at write time; harmless values even if accepted. */
    write_must_fail("write /proc/sys/kernel/ns_last_pid (mode 0666, needs CAP_SYS_ADMIN)",
                    "/proc/sys/kernel/ns_last_pid", "30000");
    write_must_fail("lower own /proc/self/oom_score_adj to -1000", "/proc/self/oom_score_adj",
                    "-1000");
}

static void a_kilnd_state(char **args, int nargs) {
    const char *socket_path = arg_str(args, nargs, 0), *state = arg_str(args, nargs, 1),
               *config = arg_str(args, nargs, 2);
    char path[1024], what[1200];
    const char *sockets[] = {socket_path, "/run/kiln/kilnd.sock"};
    for (size_t i = 0; i < 2; i++) {
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        snprintf(a.sun_path, sizeof a.sun_path, "%s", sockets[i]);
        int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        snprintf(what, sizeof what, "connect %s", sockets[i]);
        MUST_FAIL(what, connect(s, (struct sockaddr *)&a, sizeof a));
        close(s);
    }
    snprintf(what, sizeof what, "opendir %s (state dir)", state);
    open_must_fail(what, state, O_RDONLY | O_DIRECTORY);
    snprintf(path, sizeof path, "%s/kiln.db", state);
    snprintf(what, sizeof what, "open %s", path);
    open_must_fail(what, path, O_RDWR);
    snprintf(path, sizeof path, "%s/cas", state);
    snprintf(what, sizeof what, "opendir %s", path);
    open_must_fail(what, path, O_RDONLY | O_DIRECTORY);
    snprintf(what, sizeof what, "open %s (kilnd config)", config);
    open_must_fail(what, config, O_RDONLY);
    open_must_fail("opendir /var/lib/kiln", "/var/lib/kiln", O_RDONLY | O_DIRECTORY);
    open_must_fail("open /etc/kiln/kilnd.toml", "/etc/kiln/kilnd.toml", O_RDONLY);
    open_must_fail("opendir /run/kiln", "/run/kiln", O_RDONLY | O_DIRECTORY);
}

static void a_sys(char **args, int nargs) {
    (void)args, (void)nargs;
    open_must_fail("open /sys/kernel/uevent_helper for writing", "/sys/kernel/uevent_helper", O_WRONLY);
    open_must_fail("open /sys/fs/cgroup/cgroup.procs for writing", "/sys/fs/cgroup/cgroup.procs",
                   O_WRONLY);
    open_must_fail("open /sys/fs/cgroup/unified/cgroup.procs for writing",
                   "/sys/fs/cgroup/unified/cgroup.procs", O_WRONLY);
    open_must_fail("open /sys/power/state for writing", "/sys/power/state", O_WRONLY);
    open_must_fail("open /sys/class/net for reading", "/sys/class/net", O_RDONLY | O_DIRECTORY);
    mkdir("/tmp/sys", 0755);
    MUST_FAIL("mount sysfs", mount("sysfs", "/tmp/sys", "sysfs", 0, NULL));
    MUST_FAIL("mount cgroup (v1 memory)", mount("cgroup", "/tmp/sys", "cgroup", 0, "memory"));
    MUST_FAIL("mount securityfs", mount("securityfs", "/tmp/sys", "securityfs", 0, NULL));
    MUST_FAIL("mount debugfs", mount("debugfs", "/tmp/sys", "debugfs", 0, NULL));
}

static void a_mknod(char **args, int nargs) {
    (void)args, (void)nargs;
    MUST_FAIL("mknod /workspace/out/mem (char 1:1)",
              mknod("/workspace/out/mem", S_IFCHR | 0666, makedev(1, 1)));
    MUST_FAIL("mknod /tmp/vda (block 254:0)", mknod("/tmp/vda", S_IFBLK | 0666, makedev(254, 0)));
    MUST_FAIL("mknod /dev/shm/kmsg (char 1:11)",
              mknod("/dev/shm/kmsg", S_IFCHR | 0666, makedev(1, 11)));
    MUST_FAIL("mknodat /workspace/out/tty (char 5:0)",
              mknodat(AT_FDCWD, "/workspace/out/tty", S_IFCHR | 0666, makedev(5, 0)));
    MUST_FAIL("mknod /tmp/kvm (char 10:232)", mknod("/tmp/kvm", S_IFCHR | 0666, makedev(10, 232)));
}

static void a_dev_nodes(char **args, int nargs) {
    (void)args, (void)nargs;
    static const char *const nodes[] = {
        "/dev/tpm0",   "/dev/tpmrm0",       "/dev/mem",          "/dev/kmem",     "/dev/port",
        "/dev/kmsg",   "/dev/vda",          "/dev/sda",          "/dev/nvme0n1",  "/dev/kvm",
        "/dev/fuse",   "/dev/loop0",        "/dev/loop-control", "/dev/net/tun",  "/dev/console",
        "/dev/ptmx",   "/dev/pts/ptmx",     "/dev/hwrng",        "/dev/cpu/0/msr", "/dev/btrfs-control",
        "/dev/autofs", "/dev/vhost-net",    "/dev/userfaultfd",  "/dev/dri/card0", "/dev/tty0",
        "/dev/ttyS0",  "/dev/vsock",        "/dev/mapper/control", "/dev/watchdog", "/dev/rtc0",
        "/dev/input/event0", "/dev/bpf",    "/dev/mqueue",
    };
    for (size_t i = 0; i < sizeof nodes / sizeof nodes[0]; i++) {
        char what[128];
        snprintf(what, sizeof what, "open %s", nodes[i]);
        open_must_fail(what, nodes[i], O_RDWR | O_NONBLOCK);
    }
    /* Every device node that is there must be one of the harmless six. */
    static const char *const allowed[] = {"null", "zero", "full", "random", "urandom", "tty"};
    DIR *d = opendir("/dev");
    if (!d) {
        /* Landlock may refuse listing /dev; the explicit opens above still stand. */
        blocked("enumerate /dev", errno);
        return;
    }
    int unexpected = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        struct stat st;
        if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
            continue;
        if (!S_ISCHR(st.st_mode) && !S_ISBLK(st.st_mode))
            continue;
        int ok = 0;
        for (size_t i = 0; i < sizeof allowed / sizeof allowed[0]; i++)
            ok |= strcmp(e->d_name, allowed[i]) == 0;
        if (!ok) {
            escaped("unexpected device node in /dev", "/dev/%s (%u:%u)", e->d_name,
                    major(st.st_rdev), minor(st.st_rdev));
            unexpected++;
        }
    }
    closedir(d);
    if (!unexpected)
        blocked_because("enumerate /dev", "only null, zero, full, random, urandom, tty");
}

static void a_raw_sockets(char **args, int nargs) {
    (void)args, (void)nargs;
    MUST_FAIL("socket(AF_PACKET, SOCK_RAW)", socket(AF_PACKET, SOCK_RAW, htons(0x0003)));
    MUST_FAIL("socket(AF_PACKET, SOCK_DGRAM)", socket(AF_PACKET, SOCK_DGRAM, htons(0x0003)));
    MUST_FAIL("socket(AF_INET, SOCK_RAW, IPPROTO_RAW)", socket(AF_INET, SOCK_RAW, IPPROTO_RAW));
    MUST_FAIL("socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)", socket(AF_INET, SOCK_RAW, IPPROTO_ICMP));
    MUST_FAIL("socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6)",
              socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6));
    MUST_FAIL("socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP) (ping socket)",
              socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP));
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        error("socket: %s", strerror(errno));
        return;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "lo");
    ifr.ifr_flags = IFF_UP | IFF_LOOPBACK | IFF_RUNNING;
    MUST_FAIL("ioctl(SIOCSIFFLAGS, lo up)", ioctl(s, SIOCSIFFLAGS, &ifr));
    close(s);
}

/* Non-blocking connect with a 3 s limit: a refusal, an unreachable network or silence is a block;
 * only an established connection escapes. */
static void connect_must_fail(const char *what, int family, const struct sockaddr *addr,
                              socklen_t len) {
    int s = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s < 0) {
        blocked(what, errno);
        return;
    }
    int r = connect(s, addr, len);
    if (r < 0 && errno == EINPROGRESS) {
        struct pollfd p = {s, POLLOUT, 0};
        if (poll(&p, 1, 3000) == 0) {
            blocked_because(what, "no answer within 3 s");
            close(s);
            return;
        }
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &el);
        r = err ? -1 : 0;
        errno = err;
    }
    if (r < 0)
        blocked(what, errno);
    else
        escaped(what, "connected");
    close(s);
}

static void a_connect_loopback(char **args, int nargs) {
    int port = arg_int(args, nargs, 0);
    if (port <= 0)
        return;
    struct sockaddr_in v4 = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &v4.sin_addr);
    connect_must_fail("connect 127.0.0.1:<host listener>", AF_INET, (struct sockaddr *)&v4, sizeof v4);
    struct sockaddr_in6 v6 = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
    inet_pton(AF_INET6, "::1", &v6.sin6_addr);
    connect_must_fail("connect [::1]:<host listener>", AF_INET6, (struct sockaddr *)&v6, sizeof v6);
    inet_pton(AF_INET, "127.0.0.53", &v4.sin_addr);
    v4.sin_port = htons(53);
    connect_must_fail("connect 127.0.0.53:53 (a host stub resolver)", AF_INET,
                      (struct sockaddr *)&v4, sizeof v4);
}

static void udp_must_fail(const char *what, const char *ip, int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, ip, &a.sin_addr);
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        blocked(what, errno);
        return;
    }
    /* A DNS query for example.com, so a reachable resolver would answer. */
    static const unsigned char query[] = {0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 7, 'e', 'x', 'a', 'm',
                                          'p', 'l', 'e', 3, 'c', 'o', 'm', 0, 0, 1, 0, 1};
    errno = 0;
    ssize_t n = sendto(s, query, sizeof query, 0, (struct sockaddr *)&a, sizeof a);
    if (n < 0)
        blocked(what, errno);
    else
        escaped(what, "datagram sent to %s:%d (a route out of the sandbox exists)", ip, port);
    close(s);
}

static void a_connect_external(char **args, int nargs) {
    const char *ip = arg_str(args, nargs, 0);
    int port = arg_int(args, nargs, 1), udp_port = arg_int(args, nargs, 2);
    if (port <= 0 || udp_port <= 0)
        return;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
        error("bad address %s", ip);
        return;
    }
    connect_must_fail("connect <host external address>:<host listener>", AF_INET,
                      (struct sockaddr *)&a, sizeof a);
    udp_must_fail("udp to <host external address>:<host udp socket>", ip, udp_port);
    inet_pton(AF_INET, "192.0.2.1", &a.sin_addr);
    a.sin_port = htons(80);
    connect_must_fail("connect 192.0.2.1:80 (anything beyond the host)", AF_INET,
                      (struct sockaddr *)&a, sizeof a);
}

static void a_abstract_unix(char **args, int nargs) {
    const char *name = arg_str(args, nargs, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    size_t n = strlen(name);
    if (n + 1 > sizeof a.sun_path) {
        error("name too long");
        return;
    }
    memcpy(a.sun_path + 1, name, n);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        error("socket: %s", strerror(errno));
        return;
    }
    MUST_FAIL("connect abstract unix socket @<host listener>",
              connect(s, (struct sockaddr *)&a, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n)));
    close(s);
}

static void a_dns(char **args, int nargs) {
    const char *resolver = arg_str(args, nargs, 0);
    static const char *const names[] = {"example.com", "kiln.invalid", "localhost.localdomain"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        struct addrinfo *res = NULL, hints = {.ai_socktype = SOCK_STREAM};
        char what[128];
        snprintf(what, sizeof what, "getaddrinfo(%s)", names[i]);
        int r = getaddrinfo(names[i], "80", &hints, &res);
        if (r != 0) {
            blocked_because(what, "%s", gai_strerror(r));
        } else {
            char host[64] = "?";
            getnameinfo(res->ai_addr, res->ai_addrlen, host, sizeof host, NULL, 0, NI_NUMERICHOST);
            /* A loopback answer comes from the sandbox itself (no files), never from DNS. */
            if (strncmp(host, "127.", 4) == 0 || strcmp(host, "::1") == 0)
                blocked_because(what, "only loopback (%s), no resolver reached", host);
            else
                escaped(what, "resolved to %s", host);
            freeaddrinfo(res);
        }
    }
    udp_must_fail("udp query to the host's resolver", resolver, 53);
    udp_must_fail("udp query to 8.8.8.8", "8.8.8.8", 53);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(53)};
    inet_pton(AF_INET, resolver, &a.sin_addr);
    connect_must_fail("tcp connect to the host's resolver", AF_INET, (struct sockaddr *)&a, sizeof a);
    struct stat st;
    if (stat("/etc/resolv.conf", &st) == 0)
        info("/etc/resolv.conf exists in the sandbox");
}

static void a_bpf(char **args, int nargs) {
    (void)args, (void)nargs;
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.map_type = BPF_MAP_TYPE_ARRAY;
    attr.key_size = 4;
    attr.value_size = 8;
    attr.max_entries = 1;
    MUST_FAIL("bpf(BPF_MAP_CREATE, array)", syscall(SYS_bpf, BPF_MAP_CREATE, &attr, sizeof attr));
    struct bpf_insn prog[] = {
        {.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 0, .imm = 0},
        {.code = BPF_JMP | BPF_EXIT},
    };
    static const char license[] = "GPL";
    memset(&attr, 0, sizeof attr);
    attr.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
    attr.insns = (uint64_t)(uintptr_t)prog;
    attr.insn_cnt = 2;
    attr.license = (uint64_t)(uintptr_t)license;
    MUST_FAIL("bpf(BPF_PROG_LOAD, socket filter)", syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof attr));
    memset(&attr, 0, sizeof attr);
    attr.prog_type = BPF_PROG_TYPE_CGROUP_SKB;
    attr.expected_attach_type = BPF_CGROUP_INET_EGRESS;
    attr.insns = (uint64_t)(uintptr_t)prog;
    attr.insn_cnt = 2;
    attr.license = (uint64_t)(uintptr_t)license;
    MUST_FAIL("bpf(BPF_PROG_LOAD, cgroup skb)", syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof attr));
    memset(&attr, 0, sizeof attr);
    attr.start_id = 0;
    MUST_FAIL("bpf(BPF_PROG_GET_NEXT_ID) (enumerate the observer's programs)",
              syscall(SYS_bpf, BPF_PROG_GET_NEXT_ID, &attr, sizeof attr));
}

static long perf_open(uint32_t type, uint64_t config, pid_t pid, int cpu, int user_only) {
    struct perf_event_attr a;
    memset(&a, 0, sizeof a);
    a.size = sizeof a;
    a.type = type;
    a.config = config;
    a.disabled = 1;
    a.exclude_kernel = user_only;
    a.exclude_hv = user_only;
    long fd = syscall(SYS_perf_event_open, &a, pid, cpu, -1, PERF_FLAG_FD_CLOEXEC);
    return fd;
}

static void a_perf(char **args, int nargs) {
    (void)args, (void)nargs;
    long fd;
    errno = 0;
    fd = perf_open(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK, 0, -1, 1);
    must_fail("perf_event_open(self, user-only cpu clock)", fd, errno);
    if (fd >= 0)
        close((int)fd);
    errno = 0;
    fd = perf_open(PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES, -1, 0, 0);
    must_fail("perf_event_open(all processes on cpu 0, kernel too)", fd, errno);
    if (fd >= 0)
        close((int)fd);
    errno = 0;
    fd = perf_open(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK, 1, -1, 0);
    must_fail("perf_event_open(sandbox pid 1)", fd, errno);
    if (fd >= 0)
        close((int)fd);
}

static void a_io_uring(char **args, int nargs) {
    (void)args, (void)nargs;
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    errno = 0;
    long fd = syscall(SYS_io_uring_setup, 4, &p);
    must_fail("io_uring_setup(4)", fd, errno);
    if (fd >= 0) {
        errno = 0;
        long r = syscall(SYS_io_uring_enter, (int)fd, 0, 0, 0, NULL, 0);
        info("io_uring_enter on the ring returned %ld (%s)", r, r < 0 ? errname(errno) : "ok");
        close((int)fd);
    }
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_SQPOLL;
    errno = 0;
    fd = syscall(SYS_io_uring_setup, 4, &p);
    must_fail("io_uring_setup(4, SQPOLL) (a kernel thread working for the step)", fd, errno);
    if (fd >= 0)
        close((int)fd);
}

static void a_userfaultfd(char **args, int nargs) {
    (void)args, (void)nargs;
    errno = 0;
    long fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    must_fail("userfaultfd(UFFD_USER_MODE_ONLY)", fd, errno);
    if (fd >= 0)
        close((int)fd);
    errno = 0;
    fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    must_fail("userfaultfd() (kernel faults too)", fd, errno);
    if (fd >= 0)
        close((int)fd);
    open_must_fail("open /dev/userfaultfd", "/dev/userfaultfd", O_RDWR);
}

/* keyctl family: anything but EPERM/ENOSYS/EACCES means the syscall reached the key code. */
static void key_must_fail(const char *what, long ret, int err) {
    if (ret == -1 && (err == EPERM || err == ENOSYS || err == EACCES))
        blocked(what, err);
    else if (ret == -1)
        escaped(what, "the syscall ran (failed only with %s)", errname(err));
    else
        escaped(what, "succeeded (returned %ld)", ret);
}

static void a_keyctl(char **args, int nargs) {
    (void)args, (void)nargs;
    char name[96];
    snprintf(name, sizeof name, "kiln-escape-%s", nonce);
    IN_CHILD({
        errno = 0;
        long r = syscall(SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, name);
        key_must_fail("keyctl(JOIN_SESSION_KEYRING)", r, errno);
        if (r >= 0)
            syscall(SYS_keyctl, KEYCTL_INVALIDATE, r);
    });
    IN_CHILD({
        /* The user keyring of uid 65534 is shared by every step on the host: a channel across
         * steps and jobs. Revoked at once so nothing is left behind. */
        errno = 0;
        long id = syscall(SYS_add_key, "user", name, "secret", 6, KEY_SPEC_USER_KEYRING);
        key_must_fail("add_key(user keyring of uid 65534)", id, errno);
        if (id >= 0) {
            syscall(SYS_keyctl, KEYCTL_UNLINK, id, KEY_SPEC_USER_KEYRING);
            syscall(SYS_keyctl, KEYCTL_INVALIDATE, id);
        }
    });
    errno = 0;
    long r = syscall(SYS_request_key, "user", name, NULL, 0);
    key_must_fail("request_key(user)", r, errno);
    errno = 0;
    r = syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0);
    key_must_fail("keyctl(GET_KEYRING_ID, user keyring)", r, errno);
}

static void a_open_by_handle(char **args, int nargs) {
    (void)args, (void)nargs;
    struct {
        struct file_handle fh;
        unsigned char bytes[128];
    } h;
    memset(&h, 0, sizeof h);
    h.fh.handle_bytes = 128;
    int mnt = 0;
    if (name_to_handle_at(AT_FDCWD, "/usr/bin", &h.fh, &mnt, 0) < 0)
        info("name_to_handle_at(/usr/bin) failed: %s", errname(errno));
    int usr = open("/usr", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (usr < 0) {
        error("open /usr: %s", strerror(errno));
        return;
    }
    if (h.fh.handle_bytes && h.fh.handle_bytes <= 128)
        MUST_FAIL("open_by_handle_at(handle of /usr/bin)", open_by_handle_at(usr, &h.fh, O_RDONLY));
    /* "Shocker": the host disk's root directory is inode 2 on ext4, generation 0; /usr is on that
     * disk, so its mount is a valid mount fd for the forged handle. */
    memset(&h, 0, sizeof h);
    h.fh.handle_bytes = 8;
    h.fh.handle_type = 1; /* FILEID_INO32_GEN */
    uint32_t ino_gen[2] = {2, 0};
    memcpy(h.fh.f_handle, ino_gen, sizeof ino_gen);
    errno = 0;
    int fd = open_by_handle_at(usr, &h.fh, O_RDONLY | O_DIRECTORY);
    if (fd < 0) {
        blocked("open_by_handle_at(forged handle of the host disk's root)", errno);
    } else {
        escaped("open_by_handle_at(forged handle of the host disk's root)",
                "opened the host's / (fd %d)", fd);
        close(fd);
    }
    close(usr);
}

static void a_kernel_admin(char **args, int nargs) {
    (void)args, (void)nargs;
    MUST_FAIL("init_module", syscall(SYS_init_module, NULL, 0, ""));
    int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
    MUST_FAIL("finit_module(/dev/null)", syscall(SYS_finit_module, null, "", 0));
    close(null);
    MUST_FAIL("delete_module(ext4)", syscall(SYS_delete_module, "ext4", O_NONBLOCK));
    MUST_FAIL("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
    MUST_FAIL("kexec_file_load(unload)", syscall(SYS_kexec_file_load, -1, -1, 0, "", 2 /* UNLOAD */));
    MUST_FAIL("reboot(CAD_OFF)", syscall(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
                                         LINUX_REBOOT_CMD_CAD_OFF, NULL));
    MUST_FAIL("swapon /tmp/swap", syscall(SYS_swapon, "/tmp/swap", 0));
    MUST_FAIL("swapoff /tmp/swap", syscall(SYS_swapoff, "/tmp/swap"));
    MUST_FAIL("acct /tmp/acct", acct("/tmp/acct"));
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    MUST_FAIL("clock_settime(REALTIME, now)", clock_settime(CLOCK_REALTIME, &now));
    struct timeval tv = {now.tv_sec, 0};
    MUST_FAIL("settimeofday(now)", settimeofday(&tv, NULL));
    MUST_FAIL("iopl(3)", syscall(SYS_iopl, 3));
    MUST_FAIL("ioperm(0x80)", syscall(SYS_ioperm, 0x80, 1, 1));
    MUST_FAIL("vhangup", vhangup());
}

static void a_kernel_info(char **args, int nargs) {
    (void)args, (void)nargs;
    char buf[4096];
    MUST_FAIL("syslog(READ_ALL) (dmesg)", syscall(SYS_syslog, 3, buf, (int)sizeof buf));
    MUST_FAIL("syslog(CLEAR)", syscall(SYS_syslog, 5, NULL, 0));
    open_must_fail("open /proc/kcore", "/proc/kcore", O_RDONLY);
    open_must_fail("open /proc/kmsg", "/proc/kmsg", O_RDONLY);
    FILE *f = fopen("/proc/kallsyms", "re");
    if (!f) {
        blocked("read /proc/kallsyms", errno);
    } else {
        unsigned long long addr = 0, nonzero = 0;
        char line[512];
        for (int i = 0; i < 1000 && fgets(line, sizeof line, f); i++)
            if (sscanf(line, "%llx", &addr) == 1 && addr)
                nonzero = addr;
        fclose(f);
        if (nonzero)
            escaped("read kernel addresses from /proc/kallsyms", "e.g. %#llx (KASLR defeated)", nonzero);
        else
            blocked_because("read kernel addresses from /proc/kallsyms", "all addresses read as 0");
    }
}

static void a_tiocsti(char **args, int nargs) {
    (void)args, (void)nargs;
    char c = 'x';
    for (int fd = 0; fd < 3; fd++) {
        char what[64];
        snprintf(what, sizeof what, "ioctl(fd %d, TIOCSTI)", fd);
        MUST_FAIL(what, ioctl(fd, TIOCSTI, &c));
    }
    int tty = open("/dev/tty", O_RDWR | O_CLOEXEC);
    if (tty < 0) {
        blocked("open /dev/tty (a controlling terminal)", errno);
    } else {
        MUST_FAIL("ioctl(/dev/tty, TIOCSTI)", ioctl(tty, TIOCSTI, &c));
        close(tty);
    }
    MUST_FAIL("ioctl(fd 0, TIOCSCTTY) (steal a terminal)", ioctl(0, TIOCSCTTY, 1));
}

static void a_hostname(char **args, int nargs) {
    const char *host = arg_str(args, nargs, 0);
    MUST_FAIL("sethostname", sethostname("pwned-by-step", 13));
    MUST_FAIL("setdomainname", setdomainname("pwned", 5));
    open_must_fail("open /proc/sys/kernel/hostname for writing", "/proc/sys/kernel/hostname", O_WRONLY);
    struct utsname u;
    uname(&u);
    if (strcmp(u.nodename, host) == 0)
        escaped("uname() in the sandbox", "sees the host's name %s (UTS namespace shared)", host);
    else
        blocked_because("uname() in the sandbox", "sees %s, not the host's name", u.nodename);
    IN_CHILD(MUST_FAIL("unshare(CLONE_NEWUTS) then sethostname", unshare(CLONE_NEWUTS)));
}

static int file_contains(const char *path, const char *needle) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    static char buf[1 << 16];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n < 0)
        return -1;
    size_t nl = strlen(needle);
    for (ssize_t i = 0; i + (ssize_t)nl <= n; i++)
        if (memcmp(buf + i, needle, nl) == 0)
            return 1;
    return 0;
}

static void a_host_environ(char **args, int nargs) {
    const char *needle = arg_str(args, nargs, 0), *kilnd = arg_str(args, nargs, 1);
    char path[512];
    snprintf(path, sizeof path, "/proc/%s/environ", kilnd);
    open_must_fail("open /proc/<kilnd pid>/environ", path, O_RDONLY);
    DIR *d = opendir("/proc");
    struct dirent *e;
    int leaks = 0;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        snprintf(path, sizeof path, "/proc/%s/environ", e->d_name);
        if (file_contains(path, needle) == 1) {
            escaped("host environment visible", "%s contains %s", path, needle);
            leaks++;
        }
    }
    if (d)
        closedir(d);
    if (!leaks)
        blocked_because("host environment in any visible /proc/*/environ", "%s not found", needle);
    for (char **env = environ; *env; env++)
        info("step env: %.*s", (int)strcspn(*env, "="), *env);
}

static void a_personality(char **args, int nargs) {
    (void)args, (void)nargs;
    IN_CHILD({
        errno = 0;
        int r = personality(ADDR_NO_RANDOMIZE);
        int now = personality(0xffffffff);
        if (r == -1 || !(now & ADDR_NO_RANDOMIZE))
            blocked("personality(ADDR_NO_RANDOMIZE) (ASLR off for the step's children)", errno);
        else
            escaped("personality(ADDR_NO_RANDOMIZE) (ASLR off for the step's children)",
                    "persona now %#x", now);
    });
    IN_CHILD({
        errno = 0;
        int r = personality(READ_IMPLIES_EXEC);
        int now = personality(0xffffffff);
        if (r == -1 || !(now & READ_IMPLIES_EXEC))
            blocked("personality(READ_IMPLIES_EXEC) (every readable mapping executable)", errno);
        else
            escaped("personality(READ_IMPLIES_EXEC) (every readable mapping executable)",
                    "persona now %#x", now);
    });
}

static void a_leaked_fds(char **args, int nargs) {
    (void)args, (void)nargs;
    DIR *d = opendir("/proc/self/fd");
    if (!d) {
        error("opendir /proc/self/fd: %s", strerror(errno));
        return;
    }
    int leaks = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        int fd = atoi(e->d_name);
        if (fd == dirfd(d))
            continue;
        char path[64], target[512] = "";
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(path, target, sizeof target - 1);
        if (n > 0)
            target[n] = 0;
        struct stat st;
        fstat(fd, &st);
        int ok = (fd == 0 && S_ISCHR(st.st_mode) && st.st_rdev == makedev(1, 3)) ||
                 ((fd == 1 || fd == 2) && S_ISFIFO(st.st_mode));
        if (!ok) {
            escaped("inherited file descriptor", "fd %d -> %s", fd, target);
            leaks++;
        }
    }
    closedir(d);
    if (!leaks)
        blocked_because("inherited file descriptors", "only /dev/null and the log pipe (fds 0-2)");
}

/* ---- privileges ------------------------------------------------------------------------------ */

static void exec_setuid(const char *path, char *const argv[]) {
    struct stat st;
    char what[256], desc[512];
    snprintf(what, sizeof what, "exec setuid-root %s", path);
    if (stat(path, &st) < 0) {
        info("%s is not in the sandbox", path);
        return;
    }
    if (!(st.st_mode & S_ISUID) || st.st_uid != 0) {
        info("%s is not setuid-root here", path);
        return;
    }
    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        alarm(10); /* survives the exec: a program waiting for a password cannot hang the step */
        execv(path, argv);
        _exit(127);
    }
    /* Keep it a zombie: its credentials at exit stay readable in /proc/PID/status. */
    siginfo_t si;
    if (waitid(P_PID, child, &si, WEXITED | WNOWAIT) < 0) {
        error("waitid: %s", strerror(errno));
        return;
    }
    int priv = privileged(child, desc, sizeof desc);
    waitpid(child, NULL, 0);
    if (priv)
        escaped(what, "ran privileged: %s", desc);
    else
        blocked_because(what, "ran without privilege: %s", desc);
}

static void a_setuid_usr(char **args, int nargs) {
    (void)args, (void)nargs;
    struct statvfs vfs;
    if (statvfs("/usr", &vfs) == 0)
        info("/usr is mounted %s", vfs.f_flag & ST_NOSUID ? "nosuid" : "WITH suid");
    int fd = open("/tmp/m", O_RDONLY);
    if (fd < 0)
        mkdir("/tmp/m", 0755);
    else
        close(fd);
    char *su[] = {"su", "-c", "id", "root", NULL};
    char *mnt[] = {"mount", "-t", "tmpfs", "none", "/tmp/m", NULL};
    char *umnt[] = {"umount", "/proc", NULL};
    char *passwd[] = {"passwd", "-S", "root", NULL};
    char *newgrp[] = {"newgrp", "root", NULL};
    char *chsh[] = {"chsh", "-s", "/bin/sh", "root", NULL};
    char *gpasswd[] = {"gpasswd", "-a", "nobody", "root", NULL};
    exec_setuid("/usr/bin/su", su);
    exec_setuid("/usr/bin/mount", mnt);
    exec_setuid("/usr/bin/umount", umnt);
    exec_setuid("/usr/bin/passwd", passwd);
    exec_setuid("/usr/bin/newgrp", newgrp);
    exec_setuid("/usr/bin/chsh", chsh);
    exec_setuid("/usr/bin/gpasswd", gpasswd);
    /* The mount attempt above: did a tmpfs appear? */
    FILE *f = fopen("/proc/self/mountinfo", "re");
    char line[4096];
    int mounted = 0;
    while (f && fgets(line, sizeof line, f))
        mounted |= strstr(line, " /tmp/m ") != NULL;
    if (f)
        fclose(f);
    if (mounted)
        escaped("setuid mount(8) mounted a tmpfs", "/tmp/m is a mount point");
}

/* Waits for the host to plant setuid-root / file-capability copies of this binary in the output
 * workspace, then runs each in "probe" mode. */
static void a_setuid_planted(char **args, int nargs) {
    (void)args, (void)nargs;
    int fd = open("/workspace/out/waiting", O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        error("create /workspace/out/waiting: %s", strerror(errno));
        return;
    }
    close(fd);
    struct stat st;
    for (int i = 0; i < 600 && stat("/workspace/out/planted", &st) < 0; i++)
        usleep(50000);
    if (stat("/workspace/out/planted", &st) < 0) {
        error("the host never planted its binaries");
        return;
    }
    static const char *const files[] = {"suid-root", "sgid-root", "fcaps"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char path[128], what[256], desc[512];
        snprintf(path, sizeof path, "/workspace/out/%s", files[i]);
        if (stat(path, &st) < 0) {
            error("%s not planted: %s", path, strerror(errno));
            continue;
        }
        snprintf(what, sizeof what, "exec %s (uid %d, mode %o)", files[i], (int)st.st_uid,
                 st.st_mode & 07777);
        fflush(stdout);
        pid_t child = fork();
        if (child == 0) {
            char *argv[] = {path, "probe-privs", (char *)nonce, NULL};
            execv(path, argv);
            _exit(127);
        }
        siginfo_t si;
        waitid(P_PID, child, &si, WEXITED | WNOWAIT);
        int priv = privileged(child, desc, sizeof desc);
        waitpid(child, NULL, 0);
        if (si.si_code != CLD_EXITED || si.si_status == 127)
            error("%s did not run (status %d)", path, si.si_status);
        else if (priv || si.si_status != 0)
            escaped(what, "ran privileged: %s", desc);
        else
            blocked_because(what, "ran without privilege: %s", desc);
        unlink(path);
    }
    unlink("/workspace/out/planted");
    unlink("/workspace/out/waiting");
}

static void a_privilege_regain(char **args, int nargs) {
    (void)args, (void)nargs;
    IN_CHILD(MUST_FAIL("setuid(0)", setuid(0)));
    IN_CHILD(MUST_FAIL("setresuid(-1, 0, -1)", setresuid(-1, 0, -1)));
    IN_CHILD(MUST_FAIL("setgid(0)", setgid(0)));
    IN_CHILD(MUST_FAIL("setgroups([0])", setgroups(1, (gid_t[]){0})));
    IN_CHILD({
        /* setfsuid reports no error: ask for the current value afterwards. */
        setfsuid(0);
        if (setfsuid((uid_t)-1) == 0)
            escaped("setfsuid(0)", "file-system uid is now 0");
        else
            blocked_because("setfsuid(0)", "file-system uid unchanged");
    });
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0xff, sizeof data);
    IN_CHILD(MUST_FAIL("capset(all)", syscall(SYS_capset, &hdr, data)));
    IN_CHILD(MUST_FAIL("prctl(CAP_AMBIENT_RAISE, CAP_NET_RAW)",
                       prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_RAW, 0, 0)));
    IN_CHILD(MUST_FAIL("prctl(SET_SECUREBITS, 0)", prctl(PR_SET_SECUREBITS, 0, 0, 0, 0)));
    IN_CHILD(MUST_FAIL("prctl(SET_NO_NEW_PRIVS, 0)", prctl(PR_SET_NO_NEW_PRIVS, 0, 0, 0, 0)));
    int nnp = prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0);
    if (nnp == 1)
        blocked_because("no_new_privs", "set");
    else
        escaped("no_new_privs", "not set (%d)", nnp);
    char desc[512];
    if (privileged(getpid(), desc, sizeof desc))
        escaped("step credentials", "%s", desc);
    else
        blocked_because("step credentials", "%s", desc);
}

/* ---- resources ------------------------------------------------------------------------------- */

static void a_fork_bomb(char **args, int nargs) {
    int cap = arg_int(args, nargs, 0);
    if (cap <= 0)
        return;
    int n = 0, err = 0;
    fflush(stdout);
    for (; n < cap; n++) {
        pid_t p = fork();
        if (p < 0) {
            err = errno;
            break;
        }
        if (p == 0) {
            for (;;)
                pause();
        }
    }
    char what[128];
    snprintf(what, sizeof what, "fork bomb (cap %d processes)", cap);
    if (n < cap)
        blocked_because(what, "fork failed after %d children: %s", n, errname(err));
    else
        escaped(what, "%d children running, no limit hit", n);
    fflush(stdout);
    kill(-1, SIGKILL);
    while (wait(NULL) > 0 || errno == EINTR)
        ;
}

static void a_memory_bomb(char **args, int nargs) {
    int cap_mib = arg_int(args, nargs, 0);
    if (cap_mib <= 0)
        return;
    char what[128];
    snprintf(what, sizeof what, "memory bomb (cap %d MiB)", cap_mib);
    size_t chunk = 64u << 20;
    int mib = 0;
    while (mib < cap_mib) {
        void *p = mmap(NULL, chunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
                       -1, 0);
        if (p == MAP_FAILED) {
            blocked_because(what, "mmap failed after %d MiB: %s", mib, errname(errno));
            return;
        }
        memset(p, 0xa5, chunk); /* populated or not: make every page resident and dirty */
        mib += 64;
        if (mib % 512 == 0)
            info("%d MiB resident", mib);
    }
    escaped(what, "%d MiB resident, no limit hit", mib);
}

static void fill(const char *what, const char *path, int cap_mib) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        error("create %s: %s", path, strerror(errno));
        return;
    }
    static char buf[1 << 20];
    memset(buf, 0x5a, sizeof buf);
    int mib = 0, err = 0;
    while (mib < cap_mib) {
        ssize_t n = write(fd, buf, sizeof buf);
        if (n < (ssize_t)sizeof buf) {
            err = n < 0 ? errno : ENOSPC;
            break;
        }
        mib++;
    }
    close(fd);
    unlink(path);
    if (mib < cap_mib)
        blocked_because(what, "write failed after %d MiB: %s", mib, errname(err));
    else
        escaped(what, "%d MiB written, no limit hit", mib);
}

static void a_tmp_fill(char **args, int nargs) {
    int cap = arg_int(args, nargs, 0);
    if (cap <= 0)
        return;
    signal(SIGXFSZ, SIG_IGN); /* an fsize rlimit shows as EFBIG, not a dead step */
    fill("fill /tmp", "/tmp/fill", cap);
    fill("fill /dev/shm", "/dev/shm/fill", cap);
}

/* ---- lifetime -------------------------------------------------------------------------------- */

static void spawn_sleep(const char *how, const char *shell) {
    fflush(stdout);
    pid_t p = fork();
    if (p == 0) {
        int null = open("/dev/null", O_RDWR);
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
        execl("/bin/sh", "sh", "-c", shell, (char *)NULL);
        _exit(127);
    }
    waitpid(p, NULL, 0);
    planted("survivor", "%s: %s", how, shell);
}

static void a_survive(char **args, int nargs) {
    (void)args, (void)nargs;
    /* 1. Classic double fork + setsid, ignoring every catchable signal. */
    fflush(stdout);
    pid_t p = fork();
    if (p == 0) {
        setsid();
        if (fork() == 0) {
            for (int s = 1; s < 65; s++)
                signal(s, SIG_IGN);
            int null = open("/dev/null", O_RDWR);
            dup2(null, 0);
            dup2(null, 1);
            dup2(null, 2);
            for (;;)
                pause();
        }
        _exit(0);
    }
    waitpid(p, NULL, 0);
    planted("survivor", "double fork + setsid, all signals ignored");
    /* 2. daemon(3). */
    p = fork();
    if (p == 0) {
        if (daemon(0, 0) == 0)
            for (;;)
                pause();
        _exit(1);
    }
    waitpid(p, NULL, 0);
    planted("survivor", "daemon(3)");
    /* 3. A child subreaper that adopts its own orphans. */
    p = fork();
    if (p == 0) {
        prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        setpgid(0, 0);
        if (fork() == 0) {
            if (fork() == 0)
                for (;;)
                    pause();
            _exit(0);
        }
        for (;;)
            pause();
    }
    planted("survivor", "child subreaper with an orphaned grandchild");
    /* 4-6. Through the shell, with the nonce in their command lines. */
    char cmd[256];
    snprintf(cmd, sizeof cmd, "nohup sleep 3600.%s >/dev/null 2>&1 &", nonce);
    spawn_sleep("nohup", cmd);
    snprintf(cmd, sizeof cmd, "setsid sleep 3601.%s &", nonce);
    spawn_sleep("setsid", cmd);
    snprintf(cmd, sizeof cmd, "(trap '' HUP TERM INT; exec sleep 3602.%s) & disown 2>/dev/null; true", nonce);
    spawn_sleep("subshell ignoring HUP/TERM", cmd);
    usleep(200000); /* let every survivor reach its pause/sleep before the step ends */
}

/* ---- probe mode ------------------------------------------------------------------------------ */

static int probe_privs(void) {
    char desc[512];
    int priv = privileged(getpid(), desc, sizeof desc) || geteuid() == 0;
    printf("INFO: probe: euid %d, %s\n", (int)geteuid(), desc);
    return priv ? 1 : 0;
}

/* ---- table ----------------------------------------------------------------------------------- */

static const struct {
    const char *name;
    void (*run)(char **args, int nargs);
} attacks[] = {
    {"unshare-user", a_unshare_user},
    {"unshare-other", a_unshare_other},
    {"clone-newuser", a_clone_newuser},
    {"clone3", a_clone3},
    {"setns", a_setns},
    {"mount", a_mount},
    {"umount", a_umount},
    {"pivot-chroot", a_pivot_chroot},
    {"new-mount-api", a_new_mount_api},
    {"ptrace-host", a_ptrace_host},
    {"ptrace-sibling", a_ptrace_sibling},
    {"ptrace-pid1", a_ptrace_pid1},
    {"kill-host", a_kill_host},
    {"write-input", a_write_input},
    {"write-root", a_write_root},
    {"symlink-out", a_symlink_out},
    {"hardlink-out", a_hardlink_out},
    {"dotdot", a_dotdot},
    {"other-workspace", a_other_workspace},
    {"proc1-root", a_proc1_root},
    {"proc-exe", a_proc_exe},
    {"proc-sys", a_proc_sys},
    {"kilnd-state", a_kilnd_state},
    {"sys", a_sys},
    {"mknod", a_mknod},
    {"dev-nodes", a_dev_nodes},
    {"raw-sockets", a_raw_sockets},
    {"connect-loopback", a_connect_loopback},
    {"connect-external", a_connect_external},
    {"abstract-unix", a_abstract_unix},
    {"dns", a_dns},
    {"bpf", a_bpf},
    {"perf", a_perf},
    {"io-uring", a_io_uring},
    {"userfaultfd", a_userfaultfd},
    {"keyctl", a_keyctl},
    {"open-by-handle", a_open_by_handle},
    {"kernel-admin", a_kernel_admin},
    {"kernel-info", a_kernel_info},
    {"tiocsti", a_tiocsti},
    {"hostname", a_hostname},
    {"host-environ", a_host_environ},
    {"personality", a_personality},
    {"leaked-fds", a_leaked_fds},
    {"setuid-usr", a_setuid_usr},
    {"setuid-planted", a_setuid_planted},
    {"privilege-regain", a_privilege_regain},
    {"fork-bomb", a_fork_bomb},
    {"memory-bomb", a_memory_bomb},
    {"tmp-fill", a_tmp_fill},
    {"survive", a_survive},
};

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 3) {
        fprintf(stderr, "usage: %s ATTACK NONCE [ARG...]\n", argv[0]);
        return 2;
    }
    nonce = argv[2];
    if (strcmp(argv[1], "probe-privs") == 0)
        return probe_privs();
    for (size_t i = 0; i < sizeof attacks / sizeof attacks[0]; i++) {
        if (strcmp(argv[1], attacks[i].name) != 0)
            continue;
        attacks[i].run(argv + 3, argc - 3);
        printf("RESULT: %s: %d blocked, %d escaped, %d planted, %d errors\n", argv[1], n_blocked,
               n_escaped, n_planted, n_errors);
        return n_escaped ? 1 : (n_errors || !(n_blocked || n_planted)) ? 2 : 0;
    }
    fprintf(stderr, "unknown attack %s\n", argv[1]);
    return 2;
}
