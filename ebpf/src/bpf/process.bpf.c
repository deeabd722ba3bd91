// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * process.bpf.c: the observer's process family: exec, fork and exit of every process in an
 * observed cgroup v2 (the cgroup of a running step).
 *
 * Only tp_btf programs: kprobes, fentry/fexit and BPF LSM do not load on the target kernel
 * (docs: DESIGN.md, Observer). Records are defined in events.h; the loader is
 * daemon/src/observe (aya), which fills `observed_cgroups` before the step's first exec.
 *
 * Transport: one BPF ring buffer. Submits do not wake the consumer (BPF_RB_NO_WAKEUP) unless
 * the unread data passed kiln_wakeup_threshold bytes or kiln_wakeup_interval_ns passed since
 * the last forced wakeup; userspace also drains on a timer, so the tail is never stranded.
 * Per-event wakeups cost ~2.7x on a storm; batched ones ~1.4x (measured, DESIGN.md).
 * Every failed reserve is counted, per CPU and per cgroup: a trace with unreported loss is a lie.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "events.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Set by the loader (EbpfLoader::set_global) before load. */
const volatile __u64 kiln_wakeup_threshold = 256 * 1024;
const volatile __u64 kiln_wakeup_interval_ns = 10 * 1000 * 1000;

/* Last forced wakeup; racy updates across CPUs are harmless (at worst one extra wakeup). */
__u64 kiln_last_wakeup_ns = 0;

/* cgroup v2 id -> events lost (reserve failed) for that cgroup. Filled by userspace. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u64);
} observed_cgroups SEC(".maps");

/* Size is overridden by the loader (ObserverConfig::ring_bytes). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 * 1024 * 1024);
} events SEC(".maps");

/* Events lost on this CPU, all cgroups together. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lost_events SEC(".maps");

/*
 * Scratch space for a dentry walk: a component (read with a bound of 256 bytes) may start at
 * any offset below KILN_PATH_MAX, so the buffer has 256 bytes of slack past it.
 */
#define KILN_NAME_READ 256
struct path_scratch {
	char buf[KILN_PATH_MAX + KILN_NAME_READ];
};
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct path_scratch);
} path_scratch SEC(".maps");

static __always_inline __u64 *observed(__u64 cgroup_id)
{
	return bpf_map_lookup_elem(&observed_cgroups, &cgroup_id);
}

static __always_inline void count_lost(__u64 *cgroup_lost)
{
	__u32 zero = 0;
	__u64 *cpu_lost = bpf_map_lookup_elem(&lost_events, &zero);

	if (cpu_lost)
		*cpu_lost += 1; /* per-CPU value: no other writer */
	__sync_fetch_and_add(cgroup_lost, 1);
}

/*
 * Reserves a record of `size` bytes for an event of a task in cgroup `cgroup_id` and fills its
 * header (pid/tgid: the current task). NULL when the cgroup is not observed, or when the ring
 * is full: then the loss is counted.
 */
static __always_inline void *reserve_event(__u32 type, __u32 size, __u64 cgroup_id, __u64 now)
{
	__u64 *cgroup_lost = observed(cgroup_id);

	if (!cgroup_lost)
		return NULL;

	struct kiln_event_header *hdr = bpf_ringbuf_reserve(&events, size, 0);

	if (!hdr) {
		count_lost(cgroup_lost);
		return NULL;
	}
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	hdr->type = type;
	hdr->size = size;
	hdr->ktime_ns = now;
	hdr->cgroup_id = cgroup_id;
	hdr->pid = (__u32)pid_tgid;
	hdr->tgid = pid_tgid >> 32;
	return hdr;
}

static __always_inline __u64 wakeup_flags(__u64 now)
{
	if (bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= kiln_wakeup_threshold ||
	    now - kiln_last_wakeup_ns >= kiln_wakeup_interval_ns) {
		kiln_last_wakeup_ns = now;
		return BPF_RB_FORCE_WAKEUP;
	}
	return BPF_RB_NO_WAKEUP;
}

/* State of one dentry walk; a bpf_loop callback advances it by one component. */
struct walk_state {
	struct dentry *dentry;
	struct vfsmount *vfsmnt;
	struct mount *mnt;
	struct dentry *root_dentry;
	struct vfsmount *root_mnt;
	char *buf;
	__u32 off;
	bool truncated;
};

/*
 * One step of a walk from a dentry up to the task's root (see walk_path). Returns 1 to stop.
 * A callback rather than a bounded loop: the verifier checks it once, whereas an inlined loop
 * whose write offset differs on every path exceeds the 1M instruction budget.
 */
static long walk_step(__u64 index, struct walk_state *w)
{
	/* Locals, not w->field inside BPF_CORE_READ: that would relocate walk_state itself. */
	struct dentry *dentry = w->dentry;
	struct vfsmount *vfsmnt = w->vfsmnt;
	struct mount *mnt = w->mnt;

	if (dentry == w->root_dentry && vfsmnt == w->root_mnt) {
		w->truncated = false;
		return 1;
	}
	if (dentry == BPF_CORE_READ(vfsmnt, mnt_root)) {
		struct mount *parent = BPF_CORE_READ(mnt, mnt_parent);

		/* The root mount of its namespace: nothing above it. */
		if (parent == mnt) {
			w->truncated = false;
			return 1;
		}
		w->dentry = BPF_CORE_READ(mnt, mnt_mountpoint);
		w->mnt = parent;
		w->vfsmnt = (void *)parent + bpf_core_field_offset(struct mount, mnt);
		return 0;
	}
	struct dentry *parent_dentry = BPF_CORE_READ(dentry, d_parent);

	/* A filesystem root that is not a mount root (detached): nothing above it either. */
	if (parent_dentry == dentry) {
		w->truncated = false;
		return 1;
	}
	__u32 off = w->off;
	char *buf = w->buf;

	if (off >= KILN_PATH_MAX)
		return 1;
	long n = bpf_probe_read_kernel_str(&buf[off & (KILN_PATH_MAX - 1)], KILN_NAME_READ,
					   BPF_CORE_READ(dentry, d_name.name));
	if (n <= 0)
		return 1;
	w->off = off + n;
	w->dentry = parent_dentry;
	return 0;
}

/*
 * Writes the components of `dentry`/`vfsmnt` up to `root` leaf first, each NUL-terminated,
 * into `buf` (see events.h) and returns the number of bytes written; sets *truncated when the
 * walk stopped before reaching the root. Crosses mount points through struct mount.
 */
static __always_inline __u32 walk_path(struct dentry *dentry, struct vfsmount *vfsmnt,
				       struct dentry *root_dentry, struct vfsmount *root_mnt,
				       char *buf, bool *truncated)
{
	struct walk_state w = {
		.dentry = dentry,
		.vfsmnt = vfsmnt,
		.mnt = (void *)vfsmnt - bpf_core_field_offset(struct mount, mnt),
		.root_dentry = root_dentry,
		.root_mnt = root_mnt,
		.buf = buf,
		.off = 0,
		.truncated = true,
	};

	bpf_loop(KILN_PATH_COMPONENTS_MAX, walk_step, &w, 0);
	*truncated = w.truncated;
	if (w.off > KILN_PATH_MAX) {
		*truncated = true;
		return KILN_PATH_MAX;
	}
	return w.off;
}

/* Copies a walked path from scratch into a record field of KILN_PATH_MAX bytes. */
static __always_inline __u16 copy_path(char *dst, const char *scratch, __u32 len)
{
	if (len == 0 || len > KILN_PATH_MAX)
		return 0;
	if (bpf_probe_read_kernel(dst, len, scratch) != 0)
		return 0;
	return len;
}

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
