/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * events.h: the ONE definition of every record the observer's BPF programs put in the
 * `events` ring buffer, and of the constants userspace must agree on.
 *
 * Keep in sync with ebpf/src/lib.rs (the #[repr(C)] Rust mirrors). The layout test in that
 * crate compares sizes and offsets against what the C compiler reports for this file, and
 * the _Static_asserts below pin the sizes in every translation unit that includes it.
 *
 * Rules for this file:
 * - fixed-width fields only (__u16/__u32/__u64, char arrays), explicit padding fields, no
 *   implicit holes, every struct size a multiple of 8 (ring records are 8-byte aligned);
 * - it includes nothing: the includer provides __u32 & co. (vmlinux.h in BPF,
 *   <linux/types.h> on the host);
 * - every record starts with struct kiln_event_header; `size` is the whole record;
 * - variable-size records (exec, file, write) are a fixed part followed by `data[]`: their
 *   strings packed back to back in a documented order, each *_len bytes long, no padding and no
 *   terminating NULs added. hdr.size = sizeof(fixed part) + the sum of the lengths (the ring
 *   rounds the reservation up to 8 bytes; the bytes past hdr.size are not part of the record).
 *   A record costs the ring what its strings need, not their limits: an open of /dev/null is
 *   ~100 bytes, not 2 KiB.
 */
#ifndef KILN_EVENTS_H
#define KILN_EVENTS_H

/* Byte limits of the variable-length fields of an exec record (see struct kiln_exec_event). */
#define KILN_FILENAME_MAX 256
#define KILN_PATH_MAX 512
#define KILN_ARGV_MAX 1024
/* Most path components a dentry walk follows before it gives up (and flags truncation). */
#define KILN_PATH_COMPONENTS_MAX 48
/* Bytes of a path argument captured from user memory (struct kiln_file_event). */
#define KILN_ARG_MAX 256
/* Bytes of a unix socket path (sizeof sun_path). */
#define KILN_UNIX_PATH_MAX 112
/* Bits of the observed_filter prefilter map (common.bpf.h), which userspace maintains. */
#define KILN_FILTER_BITS 65536
/* Most bytes of data[] of each variable-size record (the sum of its fields' limits). */
#define KILN_EXEC_DATA_MAX (KILN_FILENAME_MAX + 2 * KILN_PATH_MAX + KILN_ARGV_MAX)
#define KILN_FILE_DATA_MAX (2 * KILN_ARG_MAX + 3 * KILN_PATH_MAX)
#define KILN_WRITE_DATA_MAX KILN_PATH_MAX

enum kiln_event_type {
	KILN_EVENT_EXEC = 1,
	KILN_EVENT_FORK = 2,
	KILN_EVENT_EXIT = 3,
	KILN_EVENT_FILE = 4,
	KILN_EVENT_WRITE = 5,
	KILN_EVENT_NET = 6,
	KILN_EVENT_DENIED = 7,
	KILN_EVENT_SOCK = 8,
};

/* struct kiln_exec_event.flags */
#define KILN_EXEC_FILENAME_TRUNCATED (1U << 0)
#define KILN_EXEC_ARGV_TRUNCATED (1U << 1)
/* argv could not be read from user memory (page not present): argv_len is 0. */
#define KILN_EXEC_ARGV_FAULT (1U << 2)
#define KILN_EXEC_EXE_TRUNCATED (1U << 3)
#define KILN_EXEC_CWD_TRUNCATED (1U << 4)
/* exe is the pseudo name of a file in no directory (a memfd: "memfd:NAME"), not a path. */
#define KILN_EXEC_EXE_DETACHED (1U << 5)
/* The program is a script that is a file in no directory (fexecve of a memfd script: the
 * interpreter is exe, filename "/dev/fd/N"). */
#define KILN_EXEC_SCRIPT_DETACHED (1U << 6)

/* Common header of every record. */
struct kiln_event_header {
	__u32 type;      /* enum kiln_event_type */
	__u32 size;      /* bytes of the whole record, header included */
	__u64 ktime_ns;  /* bpf_ktime_get_ns(): CLOCK_MONOTONIC, ns */
	__u64 cgroup_id; /* cgroup v2 id (inode number of the cgroup2 directory) */
	__u32 pid;       /* kernel pid (thread id) of the task the event is about */
	__u32 tgid;      /* its thread group id (the userspace pid) */
};

/*
 * A successful execve/execveat (tp_btf/sched_process_exec), reported after the new image
 * replaced the old one: credentials are the new ones.
 *
 * - filename: the path as passed to execve (bprm->filename; the caller's PATH search already
 *   happened), NUL-terminated, at most KILN_FILENAME_MAX - 1 bytes.
 * - exe, cwd: the executable's and the working directory's path as seen from the task's root
 *   (a chroot/pivot_root root is "/"), found by a bounded dentry walk in the kernel; symlinks
 *   are resolved, and for a #! script exe is the interpreter (filename is the script). Wire
 *   format: the path components LEAF FIRST, each NUL-terminated ("tr\0bin\0usr\0" is
 *   /usr/bin/tr); zero components is "/". *_len is the number of valid bytes. When the walk
 *   stops early (more than KILN_PATH_COMPONENTS_MAX components, or more than KILN_PATH_MAX
 *   bytes) the *_TRUNCATED flag is set and the ROOT-side components are the missing ones.
 * - argv: the first argv_len (<= KILN_ARGV_MAX) bytes of the new image's argument area
 *   (mm->arg_start..arg_end): the arguments, each NUL-terminated. Longer argument lists are
 *   cut at KILN_ARGV_MAX bytes and flagged KILN_EXEC_ARGV_TRUNCATED; the last argument may be
 *   cut mid-string. argc is the full count. The environment is never read.
 * data[] holds, in this order: filename (filename_len bytes, no NUL), exe (exe_len), cwd
 * (cwd_len), argv (argv_len).
 */
struct kiln_exec_event {
	struct kiln_event_header hdr;
	__u64 start_ns; /* task->start_time: when the process was forked, CLOCK_MONOTONIC */
	__u32 ppid;     /* tgid of the real parent */
	__u32 uid;
	__u32 gid;
	__u32 euid;
	__u32 egid;
	__u32 argc;
	__u32 flags; /* KILN_EXEC_* */
	__u16 filename_len;
	__u16 argv_len;
	__u16 exe_len;
	__u16 cwd_len;
	__u32 _pad0;
	char data[]; /* filename, exe, cwd, argv: see above */
};

/*
 * A new process (tp_btf/sched_process_fork). New threads are not reported. Filtered and
 * tagged (hdr.cgroup_id) by the CHILD's cgroup, so clone3(CLONE_INTO_CGROUP) into an
 * observed cgroup is seen; hdr.pid/tgid are the forking thread.
 */
struct kiln_fork_event {
	struct kiln_event_header hdr;
	__u32 parent_tgid; /* the child's real parent (differs from hdr.tgid with CLONE_PARENT) */
	__u32 child_tgid;
	__u64 child_start_ns; /* child->start_time, CLOCK_MONOTONIC */
};

/*
 * The last thread of a process exited (tp_btf/sched_process_exit with signal->live == 0).
 * status is the raw wait status (task->exit_code); code and signal are decoded from it.
 */
struct kiln_exit_event {
	struct kiln_event_header hdr;
	__u32 status;   /* raw: (code << 8) | signal | 0x80 if core dumped */
	__u32 code;     /* exit code 0..255, meaningful when signal == 0 */
	__u32 signal;   /* terminating signal, 0 when the process exited normally */
	__u32 _pad0;
	/* The process's (its leader's) start_time, CLOCK_MONOTONIC: duration = hdr.ktime_ns -
	 * start_ns. */
	__u64 start_ns;
};

/* struct kiln_file_event.evflags */
#define KILN_FILE_PATH_TRUNCATED (1U << 0)
#define KILN_FILE_PATH2_TRUNCATED (1U << 1)
#define KILN_FILE_BASE_TRUNCATED (1U << 2)
#define KILN_FILE_BASE2_TRUNCATED (1U << 3)
#define KILN_FILE_REAL_TRUNCATED (1U << 4)
/* A path argument could not be read from user memory. */
#define KILN_FILE_PATH_FAULT (1U << 5)
/* base / base2 / real hold a walked path (else the field is unused). */
#define KILN_FILE_HAS_BASE (1U << 6)
#define KILN_FILE_HAS_BASE2 (1U << 7)
#define KILN_FILE_HAS_REAL (1U << 8)
/* The arguments could have been rewritten by someone else while the syscall ran: the process
 * shares its memory (threads, CLONE_VM), its cwd (CLONE_FS) or, for a dirfd, its fd table
 * (CLONE_FILES) with another task, or a path argument lies in a shared mapping. Path arguments
 * are read from user memory at sys_exit. */
#define KILN_FILE_ARGS_SHARED (1U << 9)
/* flags' access mode and O_PATH are the kernel's (the opened file's f_flags), not the argument's. */
#define KILN_FILE_FLAGS_KERNEL (1U << 10)
/* real (and a write total's path) is the pseudo name of a file in no directory, not a path:
 * "pipe:[INODE]", "socket:[INODE]", "memfd:NAME", "[eventfd]"… */
#define KILN_FILE_REAL_DETACHED (1U << 11)
/* base is the pseudo name of the file in no directory open as dirfd (AT_EMPTY_PATH). */
#define KILN_FILE_BASE_DETACHED (1U << 12)

/*
 * A path-based file syscall (one record at sys_exit): open, openat, openat2, creat, rename*,
 * unlink*, rmdir, mkdir*, link*, symlink*, chmod/fchmodat*, chown/lchown/fchownat,
 * truncate, chdir, fchdir.
 *
 * - path, path2: the path arguments exactly as passed (NUL-terminated, *_len bytes without
 *   the NUL), read from user memory at sys_exit. path2 is the second path of rename/link/symlink; for symlink,
 *   path is the link's target text and path2 the new link.
 * - base, base2: the directory path and path2 are relative to, when they are relative: the
 *   task's cwd (dirfd == AT_FDCWD) or the directory open as dirfd, walked in the kernel at
 *   sys_exit; leaf-first components as in kiln_exec_event.exe. For fchdir, base is the fd's
 *   path. A chdir that succeeded has no base (the cwd it was relative to is gone) but real.
 * - real: for an open that returned an fd, the opened file's path (symlinks resolved), walked
 *   from the fd; for a chdir that succeeded, the new cwd.
 * - result: the syscall's return value (>= 0, or -errno).
 * data[] holds, in this order: path, path2, base, base2, real (each *_len bytes, no NUL).
 */
struct kiln_file_event {
	struct kiln_event_header hdr;
	__s64 result;
	__u32 nr;      /* x86_64 syscall number */
	__u32 flags;   /* open flags (O_*), AT_* flags, or rename flags */
	__u32 mode;
	__s32 dirfd;   /* dirfd of path (AT_FDCWD = -100), or the fd of fchdir */
	__s32 dirfd2;  /* dirfd of path2 */
	__u16 path_len;
	__u16 path2_len;
	__u16 base_len;
	__u16 base2_len;
	__u16 real_len;
	__u16 evflags; /* KILN_FILE_* */
	char data[]; /* path, path2, base, base2, real: see above */
};

/*
 * Bytes written to one fd of one process, summed in the kernel (write, pwrite64, writev,
 * pwritev, pwritev2 that returned > 0) and emitted at the exit of the close of the fd, or of
 * the dup2/dup3 that replaced it. data[]: the file's path (path_len bytes) walked from the fd
 * at the process's first write to it (leaf-first, as kiln_file_event.real; wflags has
 * KILN_FILE_HAS_REAL / KILN_FILE_REAL_TRUNCATED). Totals of fds never closed explicitly are
 * emitted when their process exits (sched_process_exit, fds below 4096); what is left in the
 * `write_totals` map (key struct kiln_write_key, value struct kiln_write_total, which carries the
 * same path) userspace sweeps when the step ends.
 */
struct kiln_write_event {
	struct kiln_event_header hdr;
	__s32 fd;
	__u16 path_len;
	__u16 wflags;
	__u64 bytes;
	__u64 writes;
	char data[]; /* the path: see above */
};

struct kiln_write_key {
	__u64 cgroup_id;
	__u32 tgid;
	__s32 fd;
};

struct kiln_write_total {
	__u64 bytes;
	__u64 writes;
	/* Identity of the open file counted (kernel addresses of its struct file and inode: never
	 * emitted): a write through the same fd number to another file starts a new total. */
	__u64 file;
	__u64 inode;
	__u16 path_len;
	__u16 wflags; /* as kiln_write_event.wflags */
	__u32 _pad0;
	char path[KILN_PATH_MAX]; /* leaf-first, path_len bytes */
};

/*
 * A socket address syscall (connect, bind, sendto with an address) at sys_exit, with the
 * address read from user memory and the result. family is AF_*; for AF_INET/AF_INET6 addr
 * holds the address (4 or 16 bytes, network order) and port the port (host order); for
 * AF_UNIX unix_path holds sun_path (abstract names start with a NUL byte), path_len its bytes.
 */
struct kiln_net_event {
	struct kiln_event_header hdr;
	__s64 result;
	__u32 nr;
	__u16 family;
	__u16 port;
	__u8 addr[16];
	__u32 addrlen; /* the syscall's addrlen argument */
	__u16 path_len;
	__u16 _pad0;
	char unix_path[KILN_UNIX_PATH_MAX];
};

/* A syscall of an observed task that returned -EPERM (seccomp profile's errno, or a permission
 * check), other than the file syscalls above (whose records carry their result). */
struct kiln_denied_event {
	struct kiln_event_header hdr;
	__s64 result;
	__u32 nr;
	__u32 _pad0;
};

/* struct kiln_sock_event.hook */
#define KILN_SOCK_CONNECT4 1
#define KILN_SOCK_CONNECT6 2
#define KILN_SOCK_SENDMSG4 3
#define KILN_SOCK_SENDMSG6 4

/*
 * A connect(2) (TCP or UDP) or an unconnected UDP send with a destination, seen by the cgroup
 * socket hooks (cgroup/connect4, connect6, sendmsg4, sendmsg6) BEFORE the kernel routes it: the
 * destination the step asked for, whether or not the attempt then succeeds. The hooks observe,
 * they never refuse (they return "allow"). addr is network order (4 bytes for AF_INET, 16 for
 * AF_INET6), port host order.
 */
struct kiln_sock_event {
	struct kiln_event_header hdr;
	__u32 hook;     /* KILN_SOCK_* */
	__u16 family;   /* AF_INET / AF_INET6 */
	__u16 port;
	__u8 addr[16];
	__u32 protocol; /* IPPROTO_TCP / IPPROTO_UDP */
	__u32 sock_type; /* SOCK_STREAM / SOCK_DGRAM */
};

_Static_assert(sizeof(struct kiln_event_header) == 32, "kiln_event_header size: update lib.rs");
_Static_assert(sizeof(struct kiln_exec_event) == 80, "kiln_exec_event size: update lib.rs");
_Static_assert(__builtin_offsetof(struct kiln_exec_event, data) == 80,
	       "kiln_exec_event.data follows the fixed part: update lib.rs");
_Static_assert(__builtin_offsetof(struct kiln_file_event, data) == sizeof(struct kiln_file_event),
	       "kiln_file_event.data follows the fixed part");
_Static_assert(__builtin_offsetof(struct kiln_write_event, data) == sizeof(struct kiln_write_event),
	       "kiln_write_event.data follows the fixed part");
_Static_assert(sizeof(struct kiln_fork_event) == 48, "kiln_fork_event size: update lib.rs");
_Static_assert(sizeof(struct kiln_exit_event) == 56, "kiln_exit_event size: update lib.rs");
_Static_assert(sizeof(struct kiln_exec_event) % 8 == 0, "records are 8-byte aligned");
_Static_assert(sizeof(struct kiln_file_event) == 72, "kiln_file_event size: update lib.rs");
_Static_assert(sizeof(struct kiln_write_event) == 56, "kiln_write_event size: update lib.rs");
_Static_assert(sizeof(struct kiln_net_event) == 72 + KILN_UNIX_PATH_MAX,
	       "kiln_net_event size: update lib.rs");
_Static_assert(sizeof(struct kiln_denied_event) == 48, "kiln_denied_event size: update lib.rs");
_Static_assert(sizeof(struct kiln_sock_event) == 64, "kiln_sock_event size: update lib.rs");
_Static_assert(sizeof(struct kiln_write_key) == 16 &&
		       sizeof(struct kiln_write_total) == 40 + KILN_PATH_MAX,
	       "write_totals key/value: update lib.rs");
_Static_assert(sizeof(struct kiln_file_event) % 8 == 0 && sizeof(struct kiln_net_event) % 8 == 0,
	       "records are 8-byte aligned");
_Static_assert((KILN_PATH_MAX & (KILN_PATH_MAX - 1)) == 0, "KILN_PATH_MAX is a power of two");
_Static_assert(KILN_ARGV_MAX <= 0xffff && KILN_PATH_MAX <= 0xffff, "lengths are __u16");
_Static_assert(KILN_EXEC_DATA_MAX <= 4096 && KILN_FILE_DATA_MAX <= 4096,
	       "data[] fits the 4 KiB scratch the BPF side builds records in");

#endif /* KILN_EVENTS_H */
