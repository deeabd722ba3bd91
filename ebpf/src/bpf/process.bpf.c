// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * process.bpf.c: the observer's process family: exec, fork and exit of every process in an
 * observed cgroup v2 (the cgroup of a running step). Compiled as part of observer.bpf.c.
 *
 * Only tp_btf programs: kprobes, fentry/fexit and BPF LSM do not load on the target kernel
 * (docs: DESIGN.md, Observer). Records are defined in events.h; the loader is
 * daemon/src/observe (aya), which fills `observed_cgroups` before the step's first exec.
 */

SEC("tp_btf/sched_process_exec")
int BPF_PROG(kiln_exec, struct task_struct *task, pid_t old_pid, struct linux_binprm *bprm)
{
	__u64 now = bpf_ktime_get_ns();
	struct kiln_exec_event *ev = reserve_event(KILN_EVENT_EXEC, sizeof(*ev),
						   bpf_get_current_cgroup_id(), now);

	if (!ev)
		return 0;
	ev->start_ns = BPF_CORE_READ(task, start_time);
	ev->ppid = BPF_CORE_READ(task, real_parent, tgid);
	ev->uid = BPF_CORE_READ(task, cred, uid.val);
	ev->gid = BPF_CORE_READ(task, cred, gid.val);
	ev->euid = BPF_CORE_READ(task, cred, euid.val);
	ev->egid = BPF_CORE_READ(task, cred, egid.val);
	ev->argc = BPF_CORE_READ(bprm, argc);
	ev->_pad0 = 0;
	__u32 flags = 0;

	long n = bpf_probe_read_kernel_str(ev->filename, sizeof(ev->filename),
					   BPF_CORE_READ(bprm, filename));
	if (n > 0) {
		ev->filename_len = n - 1;
		if (n == sizeof(ev->filename))
			flags |= KILN_EXEC_FILENAME_TRUNCATED;
	} else {
		ev->filename_len = 0;
	}

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
		if (bpf_probe_read_user(ev->argv, arg_len, (const void *)arg_start) == 0)
			ev->argv_len = arg_len;
		else
			flags |= KILN_EXEC_ARGV_FAULT;
	}

	/* exe and cwd, relative to the task's root. */
	__u32 zero = 0;
	struct path_scratch *scratch = bpf_map_lookup_elem(&path_scratch, &zero);
	struct fs_struct *fs = BPF_CORE_READ(task, fs);
	struct dentry *root_dentry = BPF_CORE_READ(fs, root.dentry);
	struct vfsmount *root_mnt = BPF_CORE_READ(fs, root.mnt);
	bool truncated = false;

	ev->exe_len = 0;
	ev->cwd_len = 0;
	if (scratch) {
		struct file *file = BPF_CORE_READ(bprm, file);
		__u32 len = walk_path(BPF_CORE_READ(file, f_path.dentry),
				      BPF_CORE_READ(file, f_path.mnt), root_dentry, root_mnt,
				      scratch->buf, &truncated);
		ev->exe_len = copy_path(ev->exe, scratch->buf, len);
		if (truncated)
			flags |= KILN_EXEC_EXE_TRUNCATED;

		len = walk_path(BPF_CORE_READ(fs, pwd.dentry), BPF_CORE_READ(fs, pwd.mnt),
				root_dentry, root_mnt, scratch->buf, &truncated);
		ev->cwd_len = copy_path(ev->cwd, scratch->buf, len);
		if (truncated)
			flags |= KILN_EXEC_CWD_TRUNCATED;
	}
	ev->flags = flags;
	bpf_ringbuf_submit(ev, wakeup_flags(now));
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(kiln_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 child_pid = BPF_CORE_READ(child, pid);
	__u32 child_tgid = BPF_CORE_READ(child, tgid);

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

	__u64 now = bpf_ktime_get_ns();
	struct kiln_exit_event *ev = reserve_event(KILN_EVENT_EXIT, sizeof(*ev),
						   bpf_get_current_cgroup_id(), now);

	if (!ev)
		return 0;
	__u32 status = BPF_CORE_READ(task, exit_code);

	ev->status = status;
	ev->code = (status >> 8) & 0xff;
	ev->signal = status & 0x7f;
	ev->_pad0 = 0;
	ev->start_ns = BPF_CORE_READ(task, start_time);
	bpf_ringbuf_submit(ev, wakeup_flags(now));
	return 0;
}
