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
 * - every record starts with struct kiln_event_header; `size` is the whole record.
 */
#ifndef KILN_EVENTS_H
#define KILN_EVENTS_H

/* Byte limits of the variable-length fields of an exec record (see struct kiln_exec_event). */
#define KILN_FILENAME_MAX 256
#define KILN_PATH_MAX 512
#define KILN_ARGV_MAX 1024
/* Most path components a dentry walk follows before it gives up (and flags truncation). */
#define KILN_PATH_COMPONENTS_MAX 48

enum kiln_event_type {
	KILN_EVENT_EXEC = 1,
	KILN_EVENT_FORK = 2,
	KILN_EVENT_EXIT = 3,
};

/* struct kiln_exec_event.flags */
#define KILN_EXEC_FILENAME_TRUNCATED (1U << 0)
#define KILN_EXEC_ARGV_TRUNCATED (1U << 1)
/* argv could not be read from user memory (page not present): argv_len is 0. */
#define KILN_EXEC_ARGV_FAULT (1U << 2)
#define KILN_EXEC_EXE_TRUNCATED (1U << 3)
#define KILN_EXEC_CWD_TRUNCATED (1U << 4)

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
 * Bytes past each *_len are unspecified.
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
	char filename[KILN_FILENAME_MAX];
	char exe[KILN_PATH_MAX];
	char cwd[KILN_PATH_MAX];
	char argv[KILN_ARGV_MAX];
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
	__u64 start_ns; /* task->start_time, CLOCK_MONOTONIC: duration = hdr.ktime_ns - start_ns */
};

_Static_assert(sizeof(struct kiln_event_header) == 32, "kiln_event_header size: update lib.rs");
_Static_assert(sizeof(struct kiln_exec_event) == 80 + KILN_FILENAME_MAX + 2 * KILN_PATH_MAX +
					KILN_ARGV_MAX,
	       "kiln_exec_event size: update lib.rs");
_Static_assert(__builtin_offsetof(struct kiln_exec_event, filename) == 80,
	       "kiln_exec_event.filename offset: update lib.rs");
_Static_assert(sizeof(struct kiln_fork_event) == 48, "kiln_fork_event size: update lib.rs");
_Static_assert(sizeof(struct kiln_exit_event) == 56, "kiln_exit_event size: update lib.rs");
_Static_assert(sizeof(struct kiln_exec_event) % 8 == 0, "records are 8-byte aligned");
_Static_assert((KILN_PATH_MAX & (KILN_PATH_MAX - 1)) == 0, "KILN_PATH_MAX is a power of two");
_Static_assert(KILN_ARGV_MAX <= 0xffff && KILN_PATH_MAX <= 0xffff, "lengths are __u16");

#endif /* KILN_EVENTS_H */
