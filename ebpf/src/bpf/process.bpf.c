// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * process.bpf.c: the observer's process family: exec, fork and exit of every process in an
 * observed cgroup v2 (the cgroup of a running step). Compiled as part of observer.bpf.c.
 *
 * Only tp_btf programs: kprobes, fentry/fexit and BPF LSM do not load on the target kernel
 * (docs: DESIGN.md, Observer). Records are defined in events.h; the loader is
 * daemon/src/observe (aya), which fills `observed_cgroups` before the step's first exec.
 */

/*
 * Whether this exec runs a script that is a file in no directory: an fexecve (execveat with
 * AT_EMPTY_PATH) of a script gives the interpreter (bprm->file) the script as "/dev/fd/N",
 * and fd N, which must stay open for the interpreter to read it, is that file (a memfd).
 * `name` is the record's copy of bprm->filename, `len` bytes.
 */
static __always_inline bool script_detached(struct task_struct *task, const char *name, __u16 len)
{
	const int prefix = 8; /* "/dev/fd/" */

	if (len <= prefix || len > prefix + 7 || name[0] != '/' || name[1] != 'd' ||
	    name[2] != 'e' || name[3] != 'v' || name[4] != '/' || name[5] != 'f' || name[6] != 'd' ||
	    name[7] != '/')
		return false;
	int fd = 0;

	for (int i = prefix; i < prefix + 7 && i < len; i++) {
		char c = name[i];

		if (c < '0' || c > '9')
			return false;
		fd = fd * 10 + (c - '0');
	}
	struct file *script = fd_file(task, fd);

	if (!script)
		return false;
	struct dentry *dentry = BPF_CORE_READ(script, f_path.dentry);

	return BPF_CORE_READ(dentry, d_parent) == dentry &&
	       dentry != BPF_CORE_READ(script, f_path.mnt, mnt_root);
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(kiln_exec, struct task_struct *task, pid_t old_pid, struct linux_binprm *bprm)
{
	__u64 cgroup_id = bpf_get_current_cgroup_id();
	__u64 *cgroup_lost = observed(cgroup_id);

	if (!cgroup_lost)
		return 0;
	/* A new mm (the other threads are gone) and an unshared fd table: only a shared cwd
	 * survives exec. (A thread other than the leader that execs becomes the leader, with a
	 * fresh struct kiln_proc: the marks dropped are of tasks dead by now, which cannot race a
	 * call of the new image; a live sharer of the cwd still shows in fs->users.) */
	struct kiln_proc *proc = proc_of(task, false);

	if (proc)
		proc->shared &= KILN_SHARED_FS;
	__u32 zero = 0;
	struct kiln_exec_event *ev = bpf_map_lookup_elem(&record_scratch, &zero);
	struct path_scratch *scratch = bpf_map_lookup_elem(&path_scratch, &zero);

	if (!ev || !scratch)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	const __u32 fixed = sizeof(*ev);
	__u32 off = 0;
	__u32 flags = 0;

	ev->start_ns = BPF_CORE_READ(task, start_time);
	ev->ppid = BPF_CORE_READ(task, real_parent, tgid);
	ev->uid = BPF_CORE_READ(task, cred, uid.val);
	ev->gid = BPF_CORE_READ(task, cred, gid.val);
	ev->euid = BPF_CORE_READ(task, cred, euid.val);
	ev->egid = BPF_CORE_READ(task, cred, egid.val);
	ev->argc = BPF_CORE_READ(bprm, argc);
	ev->_pad0 = 0;

	/* data[]: filename, exe, cwd, argv (events.h). */
	long n = bpf_probe_read_kernel_str(data_at(ev, fixed, off), KILN_FILENAME_MAX,
					   BPF_CORE_READ(bprm, filename));
	ev->filename_len = 0;
	if (n > 0) {
		ev->filename_len = n - 1;
		if (n == KILN_FILENAME_MAX)
			flags |= KILN_EXEC_FILENAME_TRUNCATED;
	}
	off += ev->filename_len;

	/* exe and cwd, relative to the task's root. */
	struct fs_struct *fs = BPF_CORE_READ(task, fs);
	struct dentry *root_dentry = BPF_CORE_READ(fs, root.dentry);
	struct vfsmount *root_mnt = BPF_CORE_READ(fs, root.mnt);
	struct file *file = BPF_CORE_READ(bprm, file);
	bool truncated = false;
	bool detached = false;
	__u32 len = walk_path(BPF_CORE_READ(file, f_path.dentry), BPF_CORE_READ(file, f_path.mnt),
			      root_dentry, root_mnt, scratch->buf, &truncated, &detached);

	ev->exe_len = copy_path(data_at(ev, fixed, off), scratch->buf, len);
	off += ev->exe_len;
	if (truncated)
		flags |= KILN_EXEC_EXE_TRUNCATED;
	if (detached)
		flags |= KILN_EXEC_EXE_DETACHED;
	else if (script_detached(task, data_at(ev, fixed, 0), ev->filename_len))
		flags |= KILN_EXEC_SCRIPT_DETACHED;
	len = walk_path(BPF_CORE_READ(fs, pwd.dentry), BPF_CORE_READ(fs, pwd.mnt), root_dentry,
			root_mnt, scratch->buf, &truncated, NULL);
	ev->cwd_len = copy_path(data_at(ev, fixed, off), scratch->buf, len);
	off += ev->cwd_len;
	if (truncated)
		flags |= KILN_EXEC_CWD_TRUNCATED;

	/* argv lives in the new image's user memory, written by the kernel just before. */
	struct mm_struct *mm = BPF_CORE_READ(task, mm);
	unsigned long arg_start = BPF_CORE_READ(mm, arg_start);
	unsigned long arg_len = BPF_CORE_READ(mm, arg_end) - arg_start;

	if (arg_len > KILN_ARGV_MAX) {
		arg_len = KILN_ARGV_MAX;
		flags |= KILN_EXEC_ARGV_TRUNCATED;
	}
	ev->argv_len = 0;
	if (arg_len > 0) {
		if (bpf_probe_read_user(data_at(ev, fixed, off), arg_len,
					(const void *)arg_start) == 0)
			ev->argv_len = arg_len;
		else
			flags |= KILN_EXEC_ARGV_FAULT;
	}
	off += ev->argv_len;
	ev->flags = flags;
	output_event(ev, KILN_EVENT_EXEC, fixed + off, cgroup_id, cgroup_lost, now,
		     wakeup_flags(now));
	return 0;
}

#define KILN_CLONE_VFORK 0x00004000ULL

/*
 * Whether the clone that current (the parent) is in suspends it until the child execs or
 * exits (CLONE_VFORK: vfork, posix_spawn). The kernel sets the child's vfork_done only after
 * this tracepoint, so the flags come from the syscall: vfork, clone's flags register, or
 * clone3's struct clone_args, believed only from memory no other process can write (else
 * not a vfork: the parent is then marked, the conservative side).
 */
static __always_inline bool clone_vforks(void)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	long nr = regs->orig_ax;

	if (nr == NR_VFORK)
		return true;
	if (nr == NR_CLONE)
		return (regs->di & KILN_CLONE_VFORK) != 0;
	if (nr == NR_CLONE3) {
		const void *uargs = (const void *)regs->di;
		__u64 flags = 0;

		if (bpf_probe_read_user(&flags, sizeof(flags), uargs) != 0)
			return false;
		return (flags & KILN_CLONE_VFORK) && !in_shared_mapping(task, NULL, uargs);
	}
	return false;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(kiln_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 child_pid = BPF_CORE_READ(child, pid);
	__u32 child_tgid = BPF_CORE_READ(child, tgid);
	__u64 child_cgroup = BPF_CORE_READ(child, cgroups, dfl_cgrp, kn, id);

	if (observed(child_cgroup)) {
		/* What the new task shares with its parent (syscalls.bpf.c: struct kiln_proc). A thread
		 * marks its process for good; a CLONE_VM child process (vfork, posix_spawn) marks
		 * only itself, until its exec, while its parent is suspended. */
		__u32 bits = 0;

		if (BPF_CORE_READ(child, mm) == BPF_CORE_READ(parent, mm))
			bits |= KILN_SHARED_MM;
		if (BPF_CORE_READ(child, fs) == BPF_CORE_READ(parent, fs))
			bits |= KILN_SHARED_FS;
		if (BPF_CORE_READ(child, files) == BPF_CORE_READ(parent, files))
			bits |= KILN_SHARED_FILES;
		if (bits) {
			/* The parent's mark: what it shares with a new process, but its memory only
			 * if it goes on running meanwhile (clone(CLONE_VM) without CLONE_VFORK). */
			__u32 parent_bits = bits;

			if (clone_vforks())
				parent_bits &= ~KILN_SHARED_MM;
			mark_shared(child, bits);
			if (child_pid == child_tgid && parent_bits)
				mark_shared(parent, parent_bits);
		}
	}
	if (child_pid != child_tgid)
		return 0; /* a new thread, not a new process */

	__u64 now = bpf_ktime_get_ns();
	struct kiln_fork_event *ev =
		reserve_event(KILN_EVENT_FORK, sizeof(*ev),
			      BPF_CORE_READ(child, cgroups, dfl_cgrp, kn, id), now);

	if (!ev)
		return 0;
	ev->parent_tgid = BPF_CORE_READ(child, real_parent, tgid);
	ev->child_tgid = child_tgid;
	ev->child_start_ns = BPF_CORE_READ(child, start_time);
	bpf_ringbuf_submit(ev, wakeup_flags(now));
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(kiln_exit, struct task_struct *task)
{
	/*
	 * Report the process, not each thread: only the last thread out (do_exit decremented
	 * signal->live before this tracepoint). Reading `live` instead of the tracepoint's
	 * group_dead argument keeps this loadable on kernels before 6.16, which lack it.
	 */
	if (BPF_CORE_READ(task, signal, live.counter) != 0)
		return 0;

	__u64 cgroup_id = bpf_get_current_cgroup_id();
	__u64 *cgroup_lost = observed(cgroup_id);

	if (!cgroup_lost)
		return 0;
	/*
	 * Two threads leaving at once can both find `live` at 0 (each decremented it before the
	 * other reached this tracepoint): the first to claim the process's state reports it. Without
	 * state (the kernel could not allocate it) the exit is reported anyway: a duplicate record
	 * is better than none.
	 */
	struct kiln_proc *proc = proc_of(task, true);

	if (proc && __sync_fetch_and_or(&proc->exit_claimed, 1))
		return 0;
	/* Its write totals first (syscalls.bpf.c): their records precede the exit record. */
	flush_write_totals(task, proc, cgroup_id);
	__u64 now = bpf_ktime_get_ns();
	struct kiln_exit_event *ev =
		reserve_event_in(KILN_EVENT_EXIT, sizeof(*ev), cgroup_id, cgroup_lost, now);

	if (!ev)
		return 0;
	__u32 status = BPF_CORE_READ(task, exit_code);

	ev->status = status;
	ev->code = (status >> 8) & 0xff;
	ev->signal = status & 0x7f;
	ev->_pad0 = 0;
	/* The process's start (its leader's: the fork that made it), not the last thread's, which
	 * may be a thread created later: the exit must match the process's fork. The status is the
	 * last thread's, as wait() reports it (tested). */
	ev->start_ns = BPF_CORE_READ(task, group_leader, start_time);
	bpf_ringbuf_submit(ev, wakeup_flags(now));
	return 0;
}
