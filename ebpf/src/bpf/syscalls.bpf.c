// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * syscalls.bpf.c: the observer's syscall family, ONE program on tp_btf/sys_exit, compiled as
 * part of observer.bpf.c. For tasks in an observed cgroup only:
 *
 * - path-based file syscalls: one record at sys_exit with the path arguments (read from the
 *   process's memory, which the kernel has just read too, so the pages are present), the
 *   directory they are relative to (cwd or dirfd) walked in the kernel, the result, and for an
 *   open that returned an fd the opened file's real path. A successful chdir's record carries
 *   the new cwd as `real` (its old cwd, which a relative argument was relative to, is gone);
 * - writes (write, pwrite64, writev, pwritev, pwritev2, and the copies sendfile, splice and
 *   copy_file_range into their output fd): bytes per (process, fd) summed in `write_totals`, whose entry names the file (walked
 *   from the fd at the first write), emitted at close or when dup2/dup3 replaces the fd: a build
 *   that writes a file in 4 KiB chunks costs one record, not thousands;
 * - connect/bind/sendto: address and result; listen: the socket's local address and result
 *   (steps run in an empty network namespace, so attempts fail: they are evidence);
 * - any other syscall that returned -EPERM (the seccomp profile's errno).
 *
 * Why sys_exit only: the syscall arguments are still in pt_regs at exit, and every attached
 * syscall tracepoint program costs every task on the host one more BPF dispatch per syscall
 * (the tracepoints put all tasks on the syscall slow path; fentry/kprobes do not load here).
 * With empty programs on this kernel, an enter/exit pair costs a host open+close storm
 * ~1.10-1.12x of bare and one sys_exit program ~1.04-1.07x (scripts/bench/observer measures
 * that floor in every run).
 *
 * x86_64 syscall numbers below; keep in sync with daemon/src/observe/syscalls.rs (names).
 * Unobserved tasks pay, per syscall exit, a test of the result and a switch on the syscall
 * number, and only for the numbers traced here one cgroup id read and one prefilter bit test
 * (common.bpf.h).
 */

#define NR_WRITE 1
#define NR_OPEN 2
#define NR_CLOSE 3
#define NR_MMAP 9
#define NR_MUNMAP 11
#define NR_PWRITE64 18
#define NR_WRITEV 20
#define NR_MREMAP 25
#define NR_SHMAT 30
#define NR_DUP2 33
#define NR_SENDFILE 40
#define NR_CONNECT 42
#define NR_SENDTO 44
#define NR_BIND 49
#define NR_LISTEN 50
#define NR_CLONE 56
#define NR_VFORK 58
#define NR_SHMDT 67
#define NR_TRUNCATE 76
#define NR_CHDIR 80
#define NR_FCHDIR 81
#define NR_RENAME 82
#define NR_MKDIR 83
#define NR_RMDIR 84
#define NR_CREAT 85
#define NR_LINK 86
#define NR_UNLINK 87
#define NR_SYMLINK 88
#define NR_CHMOD 90
#define NR_CHOWN 92
#define NR_LCHOWN 94
#define NR_ARCH_PRCTL 158
#define NR_IO_SETUP 206
#define NR_IO_DESTROY 207
#define NR_IO_SUBMIT 209
#define NR_REMAP_FILE_PAGES 216
#define NR_OPENAT 257
#define NR_MKDIRAT 258
#define NR_FCHOWNAT 260
#define NR_UNLINKAT 263
#define NR_RENAMEAT 264
#define NR_LINKAT 265
#define NR_SYMLINKAT 266
#define NR_FCHMODAT 268
#define NR_SPLICE 275
#define NR_DUP3 292
#define NR_PWRITEV 296
#define NR_RENAMEAT2 316
#define NR_COPY_FILE_RANGE 326
#define NR_PWRITEV2 328
#define NR_CLONE3 435
#define NR_OPENAT2 437
#define NR_FCHMODAT2 452

#define KILN_AT_FDCWD -100
#define KILN_EPERM 1
#define KILN_AF_UNIX 1
#define KILN_AF_INET 2
#define KILN_AF_INET6 10
/* creat(2) is open(O_CREAT | O_WRONLY | O_TRUNC). */
#define KILN_CREAT_FLAGS (0100 | 01 | 01000)
/* O_ACCMODE | O_PATH: the open flags taken from the kernel's file. */
#define KILN_O_ACCESS (03 | 010000000)

/*
 * (cgroup, process, fd) -> bytes written so far and the file's path; see struct
 * kiln_write_total. Entries are allocated on a process's first write to an fd (no
 * preallocation: 65536 entries of half a KiB would pin 36 MiB for nothing), and freed at the
 * close, the dup2 over it, or the process's exit. Each observed cgroup may hold at most
 * KILN_WRITE_TOTALS_PER_CGROUP of them (write_entries), so no step can fill the table for the
 * others: past its quota a step's new totals are counted lost (its own trace incomplete).
 */
#define KILN_WRITE_TOTALS_PER_CGROUP 4096
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __s64);
} write_entries SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct kiln_write_key);
	__type(value, struct kiln_write_total);
} write_totals SEC(".maps");

/* A fresh write_totals value is built here (it is larger than the BPF stack). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kiln_write_total);
} write_scratch SEC(".maps");

/*
 * Per process of an observed cgroup, in its thread-group leader's task storage (freed with it,
 * so a reused pid starts clean):
 * - `shared`: KILN_SHARED_* bits, whether the process shared its memory, cwd or fd table with
 *   another task at some point, set at clone (process.bpf.c's kiln_fork), the memory and
 *   fd-table bits cleared at exec (a new mm; exec unshares the fd table). A thread that
 *   rewrote an argument and exited before the call returned leaves the counts args_shared
 *   reads back at 1: this mark outlives it (kiln_args_shared);
 * - `write_fds`: 1 + the highest fd a write total of the process was opened for (add_write):
 *   how far its exit scans its fds (most processes of a build never write a file and skip the
 *   scan; scanning every possible fd cost ~50 us per exit). Two threads' racing raises may
 *   keep the lower one: that total is then left to the sweep at step end;
 * - `pages`: a direct-mapped cache of in_shared_mapping's verdicts for pages of `mm`, used
 *   only while no other task shares the process's memory. Only the process's own syscalls can
 *   then change its mappings (ptrace, process_vm_writev and /proc/PID/mem are denied by the
 *   sandbox): the exit of any that maps or unmaps (is_mm_nr) clears `mm`, and so does a new mm
 *   (exec), which empties the cache;
 * - `exit_claimed`: set, atomically, by the one thread that reports the process's exit.
 */
#define KILN_SHARED_MM 1U
#define KILN_SHARED_FS 2U
#define KILN_SHARED_FILES 4U
#define KILN_VERDICT_SLOTS 8
#define KILN_VERDICT_VALID 1ULL
#define KILN_VERDICT_SHARED 2ULL
#define KILN_PAGE_MASK (~4095ULL)
struct kiln_proc {
	__u32 shared;
	__u32 write_fds;
	__u64 mm;
	__u64 pages[KILN_VERDICT_SLOTS]; /* page address | KILN_VERDICT_* */
	__u32 exit_claimed;		 /* the exit is reported (process.bpf.c's kiln_exit) */
	__u32 _pad0;
};
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct kiln_proc);
} procs SEC(".maps");

/* The state of `task`'s process; created if `create` (NULL when the kernel cannot allocate
 * it, or refuses a nested storage access). */
static __always_inline struct kiln_proc *proc_of(struct task_struct *task, bool create)
{
	return bpf_task_storage_get(&procs, task->group_leader, NULL,
				    create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}

/* The arguments of a path-based file syscall. */
struct file_args {
	const char *path;
	const char *path2;
	const void *how; /* openat2's struct open_how */
	__s32 dirfd;
	__s32 dirfd2;
	__u32 flags;
	__u32 mode;
	bool path_is_text; /* symlink target: link content, not a path to resolve */
	bool fd_only;      /* fchdir: dirfd is the only argument */
};

/* Whether `id` may map or unmap memory of the calling process (which voids the verdicts cached
 * in its struct kiln_proc). brk is not: it only adds or removes private anonymous memory,
 * which is never shared, next to nothing else. */
static __always_inline bool is_mm_nr(long id)
{
	switch (id) {
	case NR_MMAP:
	case NR_MUNMAP:
	case NR_MREMAP:
	case NR_SHMAT:
	case NR_SHMDT:
	case NR_ARCH_PRCTL: /* ARCH_MAP_VDSO_* */
	case NR_IO_SETUP:
	case NR_IO_DESTROY:
	case NR_REMAP_FILE_PAGES:
		return true;
	default:
		return false;
	}
}

/* Whether `id` is one of the path-based file syscalls (the cases of file_args). */
static __always_inline bool is_file_nr(long id)
{
	switch (id) {
	case NR_OPEN:
	case NR_CREAT:
	case NR_OPENAT:
	case NR_OPENAT2:
	case NR_RENAME:
	case NR_LINK:
	case NR_RENAMEAT:
	case NR_RENAMEAT2:
	case NR_LINKAT:
	case NR_SYMLINK:
	case NR_SYMLINKAT:
	case NR_UNLINK:
	case NR_RMDIR:
	case NR_TRUNCATE:
	case NR_CHDIR:
	case NR_MKDIR:
	case NR_CHMOD:
	case NR_CHOWN:
	case NR_LCHOWN:
	case NR_UNLINKAT:
	case NR_MKDIRAT:
	case NR_FCHMODAT:
	case NR_FCHMODAT2:
	case NR_FCHOWNAT:
	case NR_FCHDIR:
		return true;
	default:
		return false;
	}
}

static __always_inline bool is_write_nr(long id)
{
	return id == NR_WRITE || id == NR_PWRITE64 || id == NR_WRITEV || id == NR_PWRITEV ||
	       id == NR_PWRITEV2 || id == NR_SENDFILE || id == NR_SPLICE ||
	       id == NR_COPY_FILE_RANGE;
}

/* Fills `a` for a path-based file syscall; false for any other syscall. */
static __always_inline bool file_args(long id, struct pt_regs *regs, struct file_args *a)
{
	/* tp_btf: regs is a BTF pointer, read directly (no probe-read helper call). */
	unsigned long a0 = regs->di;
	unsigned long a1 = regs->si;
	unsigned long a2 = regs->dx;
	unsigned long a3 = regs->r10;
	unsigned long a4 = regs->r8;

	a->path = NULL;
	a->path2 = NULL;
	a->how = NULL;
	a->dirfd = KILN_AT_FDCWD;
	a->dirfd2 = KILN_AT_FDCWD;
	a->flags = 0;
	a->mode = 0;
	a->path_is_text = false;
	a->fd_only = false;
	switch (id) {
	case NR_OPEN:
		a->path = (const char *)a0;
		a->flags = a1;
		a->mode = a2;
		return true;
	case NR_CREAT:
		a->path = (const char *)a0;
		a->flags = KILN_CREAT_FLAGS;
		a->mode = a1;
		return true;
	case NR_OPENAT:
		a->dirfd = a0;
		a->path = (const char *)a1;
		a->flags = a2;
		a->mode = a3;
		return true;
	case NR_OPENAT2: {
		__u64 how[2] = {}; /* struct open_how: flags, mode, resolve */

		a->dirfd = a0;
		a->path = (const char *)a1;
		a->how = (const void *)a2;
		bpf_probe_read_user(how, sizeof(how), (const void *)a2);
		a->flags = how[0];
		a->mode = how[1];
		return true;
	}
	case NR_RENAME:
	case NR_LINK:
		a->path = (const char *)a0;
		a->path2 = (const char *)a1;
		return true;
	case NR_RENAMEAT:
	case NR_RENAMEAT2:
	case NR_LINKAT:
		a->dirfd = a0;
		a->path = (const char *)a1;
		a->dirfd2 = a2;
		a->path2 = (const char *)a3;
		a->flags = id == NR_RENAMEAT ? 0 : a4;
		return true;
	case NR_SYMLINK:
		a->path = (const char *)a0;
		a->path2 = (const char *)a1;
		a->path_is_text = true;
		return true;
	case NR_SYMLINKAT:
		a->path = (const char *)a0;
		a->dirfd2 = a1;
		a->path2 = (const char *)a2;
		a->path_is_text = true;
		return true;
	case NR_UNLINK:
	case NR_RMDIR:
	case NR_TRUNCATE:
	case NR_CHDIR:
		a->path = (const char *)a0;
		return true;
	case NR_MKDIR:
	case NR_CHMOD:
		a->path = (const char *)a0;
		a->mode = a1;
		return true;
	case NR_CHOWN:
	case NR_LCHOWN:
		a->path = (const char *)a0;
		return true;
	case NR_UNLINKAT:
		a->dirfd = a0;
		a->path = (const char *)a1;
		a->flags = a2;
		return true;
	case NR_MKDIRAT:
	case NR_FCHMODAT:
		a->dirfd = a0;
		a->path = (const char *)a1;
		a->mode = a2;
		return true;
	case NR_FCHMODAT2:
		a->dirfd = a0;
		a->path = (const char *)a1;
		a->mode = a2;
		a->flags = a3;
		return true;
	case NR_FCHOWNAT:
		a->dirfd = a0;
		a->path = (const char *)a1;
		a->flags = a4;
		return true;
	case NR_FCHDIR:
		a->dirfd = a0;
		a->fd_only = true;
		return true;
	default:
		return false;
	}
}

/* The file open as `fd` in the current task, or NULL. */
static __always_inline struct file *fd_file(struct task_struct *task, int fd)
{
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	unsigned int max_fds = BPF_CORE_READ(fdt, max_fds);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *file = NULL;

	if (fd < 0 || (unsigned int)fd >= max_fds)
		return NULL;
	bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]);
	return file;
}

/*
 * Walks the directory a path argument is relative to (the cwd for AT_FDCWD, else the file
 * open as dirfd) into `dst` (room for KILN_PATH_MAX bytes); returns its length and sets
 * *truncated, or -1 when there is no such directory (dirfd not open: closed by another thread
 * meanwhile): never an empty walk, which would read as "/".
 */
static __always_inline int walk_dir(struct task_struct *task, __s32 dirfd, char *dst,
				      bool *truncated, bool *detached)
{
	__u32 zero = 0;
	struct path_scratch *scratch = bpf_map_lookup_elem(&path_scratch, &zero);
	struct fs_struct *fs = BPF_CORE_READ(task, fs);
	struct dentry *dentry;
	struct vfsmount *mnt;

	if (!scratch)
		return -1;
	if (dirfd == KILN_AT_FDCWD) {
		dentry = BPF_CORE_READ(fs, pwd.dentry);
		mnt = BPF_CORE_READ(fs, pwd.mnt);
	} else {
		struct file *file = fd_file(task, dirfd);

		if (!file)
			return -1;
		dentry = BPF_CORE_READ(file, f_path.dentry);
		mnt = BPF_CORE_READ(file, f_path.mnt);
	}
	__u32 len = walk_path(dentry, mnt, BPF_CORE_READ(fs, root.dentry),
			      BPF_CORE_READ(fs, root.mnt), scratch->buf, truncated, detached);
	return copy_path(dst, scratch->buf, len);
}

/* Reads a user path argument into `dst` (room for KILN_ARG_MAX bytes); returns its length
 * without the NUL (the next string overwrites it). */
static __always_inline __u16 read_arg(char *dst, const char *src, __u16 *evflags, __u16 cut)
{
	if (!src)
		return 0;
	long n = bpf_probe_read_user_str(dst, KILN_ARG_MAX, src);

	if (n <= 0) {
		*evflags |= KILN_FILE_PATH_FAULT;
		return 0;
	}
	if (n == KILN_ARG_MAX)
		*evflags |= cut;
	return n - 1;
}

static __always_inline bool is_relative(const char *path, __u16 len)
{
	return len == 0 || path[0] != '/';
}

/* Walks the path of `file` (from the task's root) into `dst` (room for KILN_PATH_MAX bytes);
 * returns its length and sets *truncated. */
static __always_inline __u16 walk_file(struct task_struct *task, struct file *file, char *dst,
				       bool *truncated, bool *detached)
{
	__u32 zero = 0;
	struct path_scratch *scratch = bpf_map_lookup_elem(&path_scratch, &zero);
	struct fs_struct *fs = BPF_CORE_READ(task, fs);

	if (!scratch)
		return 0;
	__u32 len = walk_path(BPF_CORE_READ(file, f_path.dentry), BPF_CORE_READ(file, f_path.mnt),
			      BPF_CORE_READ(fs, root.dentry), BPF_CORE_READ(fs, root.mnt),
			      scratch->buf, truncated, detached);
	return copy_path(dst, scratch->buf, len);
}

/* Emits and forgets the write total of `fd` of the current process, if it wrote to it: at the
 * exit of close, or of a dup2/dup3 that replaced it. The fd is gone by then; the entry names
 * the file as it was at the first write. */
static __always_inline void emit_write_total(__u64 cgroup_id, __u64 *cgroup_lost, __s32 fd)
{
	struct kiln_write_key key = {
		.cgroup_id = cgroup_id,
		.tgid = bpf_get_current_pid_tgid() >> 32,
		.fd = fd,
	};
	struct kiln_write_total *total = bpf_map_lookup_elem(&write_totals, &key);

	if (!total)
		return;
	__u32 zero = 0;
	struct kiln_write_event *ev = bpf_map_lookup_elem(&record_scratch, &zero);

	if (ev) {
		__u64 now = bpf_ktime_get_ns();

		ev->fd = fd;
		ev->bytes = total->bytes;
		ev->writes = total->writes;
		ev->wflags = total->wflags;
		ev->path_len = copy_path(data_at(ev, sizeof(*ev), 0), total->path, total->path_len);
		output_event(ev, KILN_EVENT_WRITE, sizeof(*ev) + ev->path_len, cgroup_id,
			     cgroup_lost, now, wakeup_flags(now));
	} else {
		count_lost(cgroup_lost);
	}
	if (bpf_map_delete_elem(&write_totals, &key) == 0) {
		__s64 *entries = bpf_map_lookup_elem(&write_entries, &cgroup_id);

		if (entries)
			__sync_fetch_and_add(entries, -1);
	}
}

/* Most fds of an exiting process whose write totals its exit ends (the rest: swept at step end). */
#define KILN_EXIT_FDS_MAX 4096

static __always_inline void raise_write_fds(struct task_struct *task, __s32 fd)
{
	struct kiln_proc *proc = proc_of(task, true);

	if (proc && proc->write_fds < (__u32)fd + 1)
		proc->write_fds = (__u32)fd + 1;
}

struct exit_flush {
	__u64 cgroup_id;
};

static long flush_fd(__u64 fd, struct exit_flush *f)
{
	__u64 cgroup_id = f->cgroup_id;
	__u64 *cgroup_lost = bpf_map_lookup_elem(&observed_cgroups, &cgroup_id);

	if (cgroup_lost)
		emit_write_total(cgroup_id, cgroup_lost, fd);
	return 0;
}

/*
 * The exiting process `task` (current, its last thread: sched_process_exit runs before the
 * kernel closes its files, without close syscalls) ends the write totals of its fds, so a long
 * build's exited processes do not pile up in write_totals until the step ends. `proc` is the
 * process's state (struct kiln_proc, which the caller already holds; NULL: none).
 */
static __always_inline void flush_write_totals(struct task_struct *task, struct kiln_proc *proc,
					       __u64 cgroup_id)
{
	struct exit_flush f = { .cgroup_id = cgroup_id };

	if (!proc || !proc->write_fds)
		return;
	__u32 fds = proc->write_fds;
	__u32 max_fds = BPF_CORE_READ(task, files, fdt, max_fds);

	if (fds > max_fds)
		fds = max_fds;
	if (fds > KILN_EXIT_FDS_MAX)
		fds = KILN_EXIT_FDS_MAX;
	bpf_loop(fds, flush_fd, &f, 0);
}

/* Adds `bytes` (one write) to the total of `fd` of the current process; `wflags` are set on the
 * total for good (KILN_FILE_ARGS_SHARED: the fd and bytes were read from user memory). */
static __always_inline void add_write(__u64 cgroup_id, __u64 *cgroup_lost, __s32 fd, long bytes,
				      __u16 wflags)
{
	struct kiln_write_key key = {
		.cgroup_id = cgroup_id,
		.tgid = bpf_get_current_pid_tgid() >> 32,
		.fd = fd,
	};
	struct kiln_write_total *total = bpf_map_lookup_elem(&write_totals, &key);
	struct task_struct *task = bpf_get_current_task_btf();
	struct file *file = fd_file(task, fd);
	__u64 inode = file ? (__u64)BPF_CORE_READ(file, f_inode) : 0;

	/* The fd now names another file than the one counted (the old one was closed without a
	 * close or dup2 of this process: close_range, exec's O_CLOEXEC, a CLONE_FILES sibling):
	 * the old total ends here, under the old file's name. */
	if (total && (total->file != (__u64)file || total->inode != inode)) {
		emit_write_total(cgroup_id, cgroup_lost, fd);
		total = NULL;
	}
	if (!total) {
		/* The first write to this file through this fd: name it while the fd is open. */
		__u32 zero = 0;
		struct kiln_write_total *fresh = bpf_map_lookup_elem(&write_scratch, &zero);

		__s64 *entries = bpf_map_lookup_elem(&write_entries, &cgroup_id);

		if (!entries) {
			__s64 none = 0;

			bpf_map_update_elem(&write_entries, &cgroup_id, &none, BPF_NOEXIST);
			entries = bpf_map_lookup_elem(&write_entries, &cgroup_id);
		}
		if (!fresh || !entries || *entries >= KILN_WRITE_TOTALS_PER_CGROUP) {
			count_lost(cgroup_lost);
			return;
		}
		bool truncated = false;

		fresh->bytes = 0;
		fresh->writes = 0;
		fresh->file = (__u64)file;
		fresh->inode = inode;
		fresh->path_len = 0;
		fresh->wflags = 0;
		fresh->_pad0 = 0;
		if (file) {
			bool detached = false;

			fresh->path_len = walk_file(task, file, fresh->path, &truncated, &detached);
			fresh->wflags = KILN_FILE_HAS_REAL |
					(truncated ? KILN_FILE_REAL_TRUNCATED : 0) |
					(detached ? KILN_FILE_REAL_DETACHED : 0);
		}
		if (bpf_map_update_elem(&write_totals, &key, fresh, BPF_NOEXIST) == 0) {
			__sync_fetch_and_add(entries, 1);
			raise_write_fds(task, fd);
		}
		total = bpf_map_lookup_elem(&write_totals, &key);
		if (!total) {
			count_lost(cgroup_lost);
			return;
		}
	}
	/* A plain store: wflags is only ever set, the same bits by every writer. */
	if ((total->wflags & wflags) != wflags)
		total->wflags |= wflags;
	__sync_fetch_and_add(&total->bytes, bytes);
	__sync_fetch_and_add(&total->writes, 1);
}

/* Exec, the only clearer, runs with the process's other threads gone. */
static __always_inline void mark_shared(struct task_struct *task, __u32 bits)
{
	struct kiln_proc *proc = proc_of(task, true);

	if (proc)
		__sync_fetch_and_or(&proc->shared, bits);
}

/*
 * Linux AIO (allowed by the `test` profile only). The kernel completes an AIO read into the
 * process's memory while its other calls run, as a task sharing that memory could: a process
 * whose mm has an AIO context table counts as sharing its memory (kiln_args_shared). Its
 * writes reach files without a write syscall: io_submit's PWRITE and PWRITEV requests are
 * added to the write totals as submitted (the bytes asked for; a request that later fails or
 * comes up short is counted in full). The requests are read back from user memory at
 * sys_exit, where another thread may have rewritten them: such totals carry
 * KILN_FILE_ARGS_SHARED. struct iocb and struct iovec are uapi: fixed layouts.
 */
#define KILN_IOCB_CMD_PWRITE 1
#define KILN_IOCB_CMD_PWRITEV 8
/* Requests read per io_submit (more count as a loss: the trace is then incomplete). */
#define KILN_AIO_IOCBS_MAX 1024
/* Vectors summed per PWRITEV request (the bytes of more are not counted; the file still is). */
#define KILN_AIO_IOVECS_MAX 64

/* The part of struct iocb read here: aio_lio_opcode to aio_nbytes (bytes 16-39; the BPF stack
 * of this callback and sys_exit's together must stay within 512 bytes). */
#define KILN_IOCB_OPCODE_OFF 16
struct kiln_iocb_part {
	__u16 aio_lio_opcode;
	__s16 aio_reqprio;
	__u32 aio_fildes;
	__u64 aio_buf;
	__u64 aio_nbytes;
};

struct kiln_iovec {
	__u64 base;
	__u64 len;
};

struct aio_submit {
	__u64 cgroup_id;
	__u64 *cgroup_lost;
	const __u64 *iocbpp;
};

static long count_aio_write(__u64 index, struct aio_submit *s)
{
	__u64 iocbp = 0;
	struct kiln_iocb_part iocb;

	if (bpf_probe_read_user(&iocbp, sizeof(iocbp), &s->iocbpp[index]) != 0 ||
	    bpf_probe_read_user(&iocb, sizeof(iocb), (const void *)(iocbp + KILN_IOCB_OPCODE_OFF)) !=
		    0) {
		/* The kernel read it a moment ago: another thread unmapped it since. */
		count_lost(s->cgroup_lost);
		return 0;
	}
	__u64 bytes = 0;

	if (iocb.aio_lio_opcode == KILN_IOCB_CMD_PWRITE) {
		bytes = iocb.aio_nbytes;
	} else if (iocb.aio_lio_opcode == KILN_IOCB_CMD_PWRITEV) {
		const struct kiln_iovec *iov = (const void *)iocb.aio_buf;

		for (int i = 0; i < KILN_AIO_IOVECS_MAX && i < iocb.aio_nbytes; i++) {
			struct kiln_iovec v;

			if (bpf_probe_read_user(&v, sizeof(v), &iov[i]) != 0)
				break;
			bytes += v.len;
		}
	} else {
		return 0;
	}
	add_write(s->cgroup_id, s->cgroup_lost, iocb.aio_fildes, bytes, KILN_FILE_ARGS_SHARED);
	return 0;
}

#define KILN_VM_SHARED 0x00000008
#define KILN_MNT_READONLY 0x40
#define KILN_SB_RDONLY 1UL

struct vma_probe {
	bool shared;
};

/*
 * Shared: a MAP_SHARED mapping, or a private mapping of a file on a writable mount (its pages
 * not yet copied on write show what another process writes to the file). Not shared: anonymous
 * private memory (stack, heap), and files on read-only mounts (the toolchain's string literals).
 */
static long vma_shared(struct task_struct *task, struct vm_area_struct *vma, struct vma_probe *p)
{
	struct file *file = vma->vm_file;

	p->shared = (vma->vm_flags & KILN_VM_SHARED) != 0;
	if (file && !p->shared) {
		int mnt_flags = BPF_CORE_READ(file, f_path.mnt, mnt_flags);
		unsigned long sb_flags = BPF_CORE_READ(file, f_inode, i_sb, s_flags);

		p->shared = !(mnt_flags & KILN_MNT_READONLY) && !(sb_flags & KILN_SB_RDONLY);
	}
	return 0;
}

/* Whether user address `addr` lies in memory another process can write (vma_shared), or that
 * cannot be told (no mapping found, or the mm lock was contended): then true. The verdicts
 * found are cached in `proc` (struct kiln_proc) when given. */
static __always_inline bool in_shared_mapping(struct task_struct *task, struct kiln_proc *proc,
					      const void *addr)
{
	struct vma_probe p = { .shared = true };
	__u64 page = (__u64)addr & KILN_PAGE_MASK;
	__u64 *slot = NULL;

	if (!addr)
		return false;
	if (proc) {
		slot = &proc->pages[(page >> 12) & (KILN_VERDICT_SLOTS - 1)];
		if ((*slot & KILN_PAGE_MASK) == page && (*slot & KILN_VERDICT_VALID))
			return (*slot & KILN_VERDICT_SHARED) != 0;
	}
	if (bpf_find_vma(task, (__u64)addr, vma_shared, &p, 0) != 0)
		return true;
	if (slot)
		*slot = page | KILN_VERDICT_VALID | (p.shared ? KILN_VERDICT_SHARED : 0);
	return p.shared;
}

static __always_inline bool string_in_shared_mapping(struct task_struct *task,
						     struct kiln_proc *proc, const char *str,
						     __u16 len)
{
	if (!str)
		return false;
	if (in_shared_mapping(task, proc, str))
		return true;
	return ((__u64)str >> 12) != ((__u64)(str + len) >> 12) &&
	       in_shared_mapping(task, proc, str + len);
}

/*
 * Whether another task could have rewritten this syscall's arguments while it ran: the process
 * shares its memory (threads), its cwd (CLONE_FS), or, when a dirfd was used, its fd table, or
 * a path argument lies in a shared mapping (MAP_SHARED, memfd: writable by another process;
 * ptrace, process_vm_writev and writes to /proc/PID/mem are denied by the sandbox).
 * Conservative: a transient reference (a /proc reader holding the mm) also counts.
 */
__noinline int kiln_args_shared(const struct file_args *a, __u16 path_len, __u16 path2_len)
{
	/* A global function: the verifier checks it once, on its own, instead of at every path
	 * of emit_file that reaches it (the sys_exit program is near the 1M-instruction budget). */
	struct task_struct *task = bpf_get_current_task_btf();

	if (!a)
		return 1;
	bool uses_dirfd = a->dirfd != KILN_AT_FDCWD || a->dirfd2 != KILN_AT_FDCWD;
	struct mm_struct *mm = BPF_CORE_READ(task, mm);

	if (BPF_CORE_READ(mm, mm_users.counter) > 1 || BPF_CORE_READ(task, fs, users) > 1)
		return true;
	/* Linux AIO (the `test` profile): the kernel completes a read into this memory while
	 * other calls run. The table exists from the mm's first io_setup until the mm is gone
	 * (a vfork child's io_setup leaves it in the parent's mm). */
	if (bpf_core_field_exists(mm->ioctx_table) && BPF_CORE_READ(mm, ioctx_table))
		return true;
	if (uses_dirfd && BPF_CORE_READ(task, files, count.counter) > 1)
		return true;
	/* The process's state only when the live counts did not decide. */
	struct kiln_proc *proc = proc_of(task, true);

	if (proc && (proc->shared & (KILN_SHARED_MM | KILN_SHARED_FS |
				     (uses_dirfd ? KILN_SHARED_FILES : 0))))
		return true;
	if (proc && proc->mm != (__u64)mm) {
		/* A new mm, or one whose mappings changed: the cached verdicts are void. */
		for (int i = 0; i < KILN_VERDICT_SLOTS; i++)
			proc->pages[i] = 0;
		proc->mm = (__u64)mm;
	}
	/* First and last byte of each string (one may start in private memory and run into a
	 * shared mapping placed right after it; mappings are whole pages, so the last byte is
	 * looked up only on another page), and openat2's open_how. */
	return string_in_shared_mapping(task, proc, a->path, path_len) ||
	       string_in_shared_mapping(task, proc, a->path2, path2_len) ||
	       in_shared_mapping(task, proc, a->how);
}

/*
 * One record for a path-based file syscall `id` that returned `ret`, built in the per-CPU
 * record scratch from the arguments still in `regs`.
 */
static __always_inline void emit_file(__u64 cgroup_id, __u64 *cgroup_lost, long id,
				      struct pt_regs *regs, long ret)
{
	struct file_args a;
	__u32 zero = 0;
	struct kiln_file_event *ev = bpf_map_lookup_elem(&record_scratch, &zero);

	if (!file_args(id, regs, &a))
		return;
	if (!ev) {
		count_lost(cgroup_lost);
		return;
	}
	struct task_struct *task = bpf_get_current_task_btf();
	const __u32 fixed = sizeof(*ev);
	__u64 now = bpf_ktime_get_ns();
	__u16 evflags = 0;
	bool truncated = false;
	__u32 off = 0;

	ev->nr = id;
	ev->result = ret;
	ev->flags = a.flags;
	ev->mode = a.mode;
	ev->dirfd = a.dirfd;
	ev->dirfd2 = a.dirfd2;
	ev->real_len = 0;
	ev->base_len = 0;
	ev->base2_len = 0;
	/* data[]: path, path2, base, base2, real (events.h). */
	char *path = data_at(ev, fixed, off);

	ev->path_len = read_arg(path, a.path, &evflags, KILN_FILE_PATH_TRUNCATED);
	off += ev->path_len;
	char *path2 = data_at(ev, fixed, off);

	ev->path2_len = read_arg(path2, a.path2, &evflags, KILN_FILE_PATH2_TRUNCATED);
	/* Whether each path is relative, before the next string overwrites its NUL/first byte. */
	bool rel = !a.path_is_text && a.path && is_relative(path, ev->path_len);
	bool rel2 = a.path2 && is_relative(path2, ev->path2_len);
	/* A chdir that succeeded moved the cwd: its record names the new one (real) instead. */
	bool moved = id == NR_CHDIR && ret == 0;

	off += ev->path2_len;
	/* No base when the directory is gone: the path stays relative (unresolved), never "/". */
	if (a.fd_only || (rel && !moved)) {
		bool detached = false;
		int n = walk_dir(task, a.dirfd, data_at(ev, fixed, off), &truncated, &detached);

		if (n >= 0) {
			ev->base_len = n & (KILN_PATH_MAX * 2 - 1);
			off += ev->base_len;
			evflags |= KILN_FILE_HAS_BASE;
			if (truncated)
				evflags |= KILN_FILE_BASE_TRUNCATED;
			/* A memfd or pipe as dirfd (AT_EMPTY_PATH: fchownat, linkat, execveat). */
			if (detached)
				evflags |= KILN_FILE_BASE_DETACHED;
		}
	}
	if (rel2) {
		int n = walk_dir(task, a.dirfd2, data_at(ev, fixed, off), &truncated, NULL);

		if (n >= 0) {
			ev->base2_len = n & (KILN_PATH_MAX * 2 - 1);
			off += ev->base2_len;
			evflags |= KILN_FILE_HAS_BASE2;
			if (truncated)
				evflags |= KILN_FILE_BASE2_TRUNCATED;
		}
	}
	if (kiln_args_shared(&a, ev->path_len, ev->path2_len))
		evflags |= KILN_FILE_ARGS_SHARED;
	bool is_open = id == NR_OPEN || id == NR_OPENAT || id == NR_OPENAT2 || id == NR_CREAT;
	struct file *file = is_open && ret >= 0 ? fd_file(task, ret) : NULL;

	if (file) {
		/* The access mode the kernel opened the file with, not the argument's (which
		 * another thread may have rewritten by now). The kernel clears O_CREAT/O_TRUNC
		 * from f_flags: those stay as passed. */
		__u32 kflags = BPF_CORE_READ(file, f_flags);

		ev->flags = (ev->flags & ~KILN_O_ACCESS) | (kflags & KILN_O_ACCESS);
		evflags |= KILN_FILE_FLAGS_KERNEL;
	}
	if (file || moved) {
		char *real = data_at(ev, fixed, off);
		bool detached = false;
		int n;

		truncated = false;
		n = file ? walk_file(task, file, real, &truncated, &detached)
			 : walk_dir(task, KILN_AT_FDCWD, real, &truncated, NULL);
		ev->real_len = n > 0 ? n & (KILN_PATH_MAX * 2 - 1) : 0;
		off += ev->real_len;
		evflags |= KILN_FILE_HAS_REAL;
		if (truncated)
			evflags |= KILN_FILE_REAL_TRUNCATED;
		if (detached)
			evflags |= KILN_FILE_REAL_DETACHED;
	}
	ev->evflags = evflags;
	output_event(ev, KILN_EVENT_FILE, fixed + off, cgroup_id, cgroup_lost, now,
		     wakeup_flags(now));
}

static __always_inline void emit_denied(__u64 cgroup_id, __u64 *cgroup_lost, long id, long ret)
{
	__u64 now = bpf_ktime_get_ns();
	struct kiln_denied_event *ev =
		reserve_event_in(KILN_EVENT_DENIED, sizeof(*ev), cgroup_id, cgroup_lost, now);

	if (ev) {
		ev->result = ret;
		ev->nr = id;
		ev->_pad0 = 0;
		bpf_ringbuf_submit(ev, wakeup_flags(now));
	}
}

static __always_inline void emit_net(__u64 cgroup_id, __u64 *cgroup_lost, long id, long ret,
				     const void *addr, unsigned long addrlen)
{
	__u64 now = bpf_ktime_get_ns();
	struct kiln_net_event *ev =
		reserve_event_in(KILN_EVENT_NET, sizeof(*ev), cgroup_id, cgroup_lost, now);

	if (!ev)
		return;
	__u16 family = 0;

	ev->result = ret;
	ev->nr = id;
	ev->addrlen = addrlen;
	ev->port = 0;
	ev->path_len = 0;
	ev->_pad0 = 0;
	__builtin_memset(ev->addr, 0, sizeof(ev->addr));
	bpf_probe_read_user(&family, sizeof(family), addr);
	ev->family = family;
	if (family == KILN_AF_INET || family == KILN_AF_INET6) {
		__u16 port = 0;

		bpf_probe_read_user(&port, sizeof(port), addr + 2);
		ev->port = __builtin_bswap16(port);
		if (family == KILN_AF_INET)
			bpf_probe_read_user(ev->addr, 4, addr + 4);
		else
			bpf_probe_read_user(ev->addr, 16, addr + 8);
	} else if (family == KILN_AF_UNIX && addrlen > 2) {
		unsigned long len = addrlen - 2;

		if (len > KILN_UNIX_PATH_MAX)
			len = KILN_UNIX_PATH_MAX;
		if (bpf_probe_read_user(ev->unix_path, len, addr + 2) == 0)
			ev->path_len = len;
	}
	bpf_ringbuf_submit(ev, wakeup_flags(now));
}

/*
 * listen(fd): the socket's local address (it is bound by now, explicitly or by listen itself)
 * and the result. Only a listen that succeeded proves fd is a socket; a failed one is recorded
 * with its result and no address.
 */
static __always_inline void emit_listen(__u64 cgroup_id, __u64 *cgroup_lost, __s32 fd, long ret)
{
	__u64 now = bpf_ktime_get_ns();
	struct kiln_net_event *ev =
		reserve_event_in(KILN_EVENT_NET, sizeof(*ev), cgroup_id, cgroup_lost, now);

	if (!ev)
		return;
	ev->result = ret;
	ev->nr = NR_LISTEN;
	ev->family = 0;
	ev->port = 0;
	ev->addrlen = 0;
	ev->path_len = 0;
	ev->_pad0 = 0;
	__builtin_memset(ev->addr, 0, sizeof(ev->addr));
	if (ret == 0) {
		struct file *file = fd_file(bpf_get_current_task_btf(), fd);
		/* Another thread may have dup2'ed something else onto fd since: private_data is a
		 * struct socket only for a socket inode. */
		bool is_sock = file && (BPF_CORE_READ(file, f_inode, i_mode) & KILN_S_IFMT) ==
					       KILN_S_IFSOCK;
		struct socket *sock = is_sock ? BPF_CORE_READ(file, private_data) : NULL;
		struct sock *sk = sock ? BPF_CORE_READ(sock, sk) : NULL;

		if (sk) {
			__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);

			ev->family = family;
			ev->port = BPF_CORE_READ(sk, __sk_common.skc_num);
			if (family == KILN_AF_INET)
				BPF_CORE_READ_INTO(&ev->addr, sk, __sk_common.skc_rcv_saddr);
			else if (family == KILN_AF_INET6)
				BPF_CORE_READ_INTO(&ev->addr, sk, __sk_common.skc_v6_rcv_saddr);
		}
	}
	bpf_ringbuf_submit(ev, wakeup_flags(now));
}

SEC("tp_btf/sys_exit")
int BPF_PROG(kiln_sys_exit, struct pt_regs *regs, long ret)
{
	/* Every syscall on the host comes here. A direct load, not a probe-read helper call, then
	 * the number (and result): free; the cgroup (a pointer chase and a prefilter bit) only for
	 * candidates. The arguments are still in regs at exit (pt_regs are the caller's). */
	long id = regs->orig_ax;

	if (ret != -KILN_EPERM && !is_write_nr(id) && id != NR_CLOSE && id != NR_DUP2 &&
	    id != NR_DUP3 && id != NR_CONNECT && id != NR_BIND && id != NR_LISTEN &&
	    id != NR_SENDTO && !is_file_nr(id) && !is_mm_nr(id) && id != NR_IO_SUBMIT)
		return 0;
	__u64 cgroup_id = bpf_get_current_cgroup_id();
	__u64 *cgroup_lost = observed(cgroup_id);

	if (!cgroup_lost)
		return 0;

	/* Refused with EPERM (the seccomp profile's errno): a denied record, unless the
	 * syscall's own record carries its result (the file and socket-address syscalls). */
	if (ret == -KILN_EPERM && !is_file_nr(id) && id != NR_CONNECT && id != NR_BIND &&
	    id != NR_LISTEN && !(id == NR_SENDTO && regs->r8)) {
		emit_denied(cgroup_id, cgroup_lost, id, ret);
		return 0;
	}
	if (is_mm_nr(id)) {
		struct kiln_proc *proc = proc_of(bpf_get_current_task_btf(), false);

		if (proc)
			proc->mm = 0;
		return 0;
	}
	switch (id) {
	case NR_WRITE:
	case NR_PWRITE64:
	case NR_WRITEV:
	case NR_PWRITEV:
	case NR_PWRITEV2:
	case NR_SENDFILE: /* sendfile(out_fd, in_fd, …) */
		if (ret > 0)
			add_write(cgroup_id, cgroup_lost, regs->di, ret, 0);
		return 0;
	case NR_SPLICE:		 /* splice(fd_in, off_in, fd_out, …) */
	case NR_COPY_FILE_RANGE: /* copy_file_range(fd_in, off_in, fd_out, …): cp */
		if (ret > 0)
			add_write(cgroup_id, cgroup_lost, regs->dx, ret, 0);
		return 0;
	case NR_CLOSE:
		emit_write_total(cgroup_id, cgroup_lost, regs->di);
		return 0;
	case NR_IO_SUBMIT: /* io_submit(ctx, nr, iocbpp): `ret` requests were queued */
		if (ret > 0) {
			struct aio_submit s = {
				.cgroup_id = cgroup_id,
				.cgroup_lost = cgroup_lost,
				.iocbpp = (const __u64 *)regs->dx,
			};

			bpf_loop(ret < KILN_AIO_IOCBS_MAX ? ret : KILN_AIO_IOCBS_MAX,
				 count_aio_write, &s, 0);
			if (ret > KILN_AIO_IOCBS_MAX)
				count_lost(cgroup_lost);
		}
		return 0;
	case NR_DUP2:
	case NR_DUP3: {
		/* dup2(old, new) closed `new` (when it succeeded and old != new): its total ends. */
		__s32 oldfd = regs->di;
		__s32 newfd = regs->si;

		if (ret >= 0 && oldfd != newfd)
			emit_write_total(cgroup_id, cgroup_lost, newfd);
		return 0;
	}
	case NR_CONNECT:
	case NR_BIND:
		emit_net(cgroup_id, cgroup_lost, id, ret, (const void *)regs->si, regs->dx);
		return 0;
	case NR_LISTEN:
		emit_listen(cgroup_id, cgroup_lost, regs->di, ret);
		return 0;
	case NR_SENDTO: {
		const void *addr = (const void *)regs->r8;

		if (addr)
			emit_net(cgroup_id, cgroup_lost, id, ret, addr, regs->r9);
		return 0;
	}
	default:
		break;
	}
	if (is_file_nr(id))
		emit_file(cgroup_id, cgroup_lost, id, regs, ret);
	return 0;
}
