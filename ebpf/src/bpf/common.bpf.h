// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * common.bpf.h: what every program family of the observer shares: the cgroup filter
 * (observed_cgroups), the ring buffer and its batched wakeups, per-CPU and per-cgroup loss
 * counters, and the bounded dentry walk. Included once, by observer.bpf.c, so all families
 * share one set of maps.
 */
#ifndef KILN_COMMON_BPF_H
#define KILN_COMMON_BPF_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "events.h"

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

/*
 * A prefilter in front of observed_cgroups: bit (cgroup_id mod KILN_FILTER_BITS) is set for every
 * observed cgroup (userspace sets it after inserting the id, and clears it when no observed id
 * maps to it any more). An array lookup compiles to a bounds check and an add, no call: a task
 * whose bit is clear (every task on the host but the steps', cgroup ids being small sequential
 * kernfs ids) is rejected without a hash lookup. A set bit only means "look it up".
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, KILN_FILTER_BITS / 64);
	__type(key, __u32);
	__type(value, __u64);
} observed_filter SEC(".maps");

static __always_inline __u64 *observed(__u64 cgroup_id)
{
	__u32 word = (cgroup_id / 64) % (KILN_FILTER_BITS / 64);
	__u64 *bits = bpf_map_lookup_elem(&observed_filter, &word);

	if (!bits || !(*bits & (1ULL << (cgroup_id % 64))))
		return NULL;
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
 * Reserves a record of `size` bytes (a constant) for an event of a task in cgroup `cgroup_id`,
 * whose observed_cgroups entry (its loss counter) the caller already looked up, and fills its
 * header (pid/tgid: the current task). NULL when the ring is full: then the loss is counted.
 * For fixed-size records.
 */
static __always_inline void *reserve_event_in(__u32 type, __u32 size, __u64 cgroup_id,
					      __u64 *cgroup_lost, __u64 now)
{
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

/* As reserve_event_in, looking the cgroup up first: NULL too when it is not observed. */
static __always_inline void *reserve_event(__u32 type, __u32 size, __u64 cgroup_id, __u64 now)
{
	__u64 *cgroup_lost = observed(cgroup_id);

	if (!cgroup_lost)
		return NULL;
	return reserve_event_in(type, size, cgroup_id, cgroup_lost, now);
}

/*
 * Variable-size records (events.h: a fixed part, then data[]) are built in a buffer of
 * KILN_RECORD_BYTES, a per-CPU scratch (record_scratch). Strings are appended
 * at offsets masked with KILN_DATA_OFF_MASK, which the verifier can bound (every real offset is
 * below it: the fields' limits add up to less), and the buffer has room for the longest write
 * (KILN_ARGV_MAX) past the largest masked offset.
 */
#define KILN_RECORD_BYTES 4096
#define KILN_DATA_OFF_MASK 2047
_Static_assert(KILN_DATA_OFF_MASK + 1 + KILN_ARGV_MAX + 80 <= KILN_RECORD_BYTES,
	       "record buffer holds the longest write at the largest offset");
_Static_assert(KILN_FILENAME_MAX + 2 * KILN_PATH_MAX <= KILN_DATA_OFF_MASK &&
		       2 * KILN_ARG_MAX + 2 * KILN_PATH_MAX <= KILN_DATA_OFF_MASK,
	       "every data[] offset is below the mask");

struct record_buf {
	char bytes[KILN_RECORD_BYTES];
};
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct record_buf);
} record_scratch SEC(".maps");

/* Where data[] byte `off` of a record whose fixed part is `fixed` bytes lives in `buf`. */
static __always_inline char *data_at(void *buf, __u32 fixed, __u32 off)
{
	return (char *)buf + fixed + (off & KILN_DATA_OFF_MASK);
}

/*
 * Fills the header of the record built in `buf` and copies its first `size` bytes to the ring
 * (bpf_ringbuf_output: the record costs the ring its real size, not its limit). A full ring is
 * counted as a loss for the cgroup and the CPU.
 */
static __always_inline void output_event(void *buf, __u32 type, __u32 size, __u64 cgroup_id,
					  __u64 *cgroup_lost, __u64 now, __u64 flags)
{
	struct kiln_event_header *hdr = buf;
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	if (size > KILN_RECORD_BYTES)
		size = KILN_RECORD_BYTES;
	hdr->type = type;
	hdr->size = size;
	hdr->ktime_ns = now;
	hdr->cgroup_id = cgroup_id;
	hdr->pid = (__u32)pid_tgid;
	hdr->tgid = pid_tgid >> 32;
	if (bpf_ringbuf_output(&events, buf, size, flags) != 0)
		count_lost(cgroup_lost);
}

/*
 * Whether a submit wakes the consumer. Not per record (a wakeup is an irq_work, a self-IPI: a VM
 * exit on a virtual machine): once kiln_wakeup_interval_ns passed since the last forced wakeup,
 * or when kiln_wakeup_threshold bytes are unread, but then at most once per
 * KILN_WAKEUP_MIN_GAP_NS (while the consumer catches up every submit would see the ring above
 * the threshold and force a wakeup of its own).
 */
#define KILN_WAKEUP_MIN_GAP_NS (100 * 1000)

static __always_inline __u64 wakeup_flags(__u64 now)
{
	__u64 since = now - kiln_last_wakeup_ns;

	if (since >= kiln_wakeup_interval_ns ||
	    (since >= KILN_WAKEUP_MIN_GAP_NS &&
	     bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= kiln_wakeup_threshold)) {
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
	bool detached;
};

#define KILN_S_IFMT 0170000
#define KILN_S_IFIFO 0010000
#define KILN_S_IFSOCK 0140000

/* bpf_snprintf's formats must be read-only data. */
static const char kiln_pipe_fmt[] = "pipe:[%llu]";
static const char kiln_socket_fmt[] = "socket:[%llu]";

/*
 * The name of a file that no directory holds (pipes, sockets, memfds, anonymous inodes: a
 * dentry that is its own parent, on a kernel-internal mount), written as the walk's one
 * component: the name /proc/PID/fd shows for pipes and sockets ("pipe:[INODE]"), the dentry's
 * own name otherwise ("memfd:NAME", "[eventfd]").
 */
static __always_inline void pseudo_name(struct walk_state *w, struct dentry *dentry)
{
	__u32 off = w->off;

	if (off >= KILN_PATH_MAX)
		return;
	char *dst = &w->buf[off & (KILN_PATH_MAX - 1)];
	struct inode *inode = BPF_CORE_READ(dentry, d_inode);
	__u32 type = BPF_CORE_READ(inode, i_mode) & KILN_S_IFMT;
	__u64 ino = BPF_CORE_READ(inode, i_ino);
	long n;

	if (type == KILN_S_IFIFO)
		n = bpf_snprintf(dst, KILN_NAME_READ, kiln_pipe_fmt, &ino, sizeof(ino));
	else if (type == KILN_S_IFSOCK)
		n = bpf_snprintf(dst, KILN_NAME_READ, kiln_socket_fmt, &ino, sizeof(ino));
	else
		n = bpf_probe_read_kernel_str(dst, KILN_NAME_READ,
					      BPF_CORE_READ(dentry, d_name.name));
	if (n > 0)
		w->off = off + n;
}

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

	/* A dentry that is its own parent but not its mount's root: nothing above. The file
	 * itself: a file in no directory (a pipe, socket, memfd), named by its pseudo name. A
	 * directory above the file: a disconnected tree, whose path stays relative (truncated). */
	if (parent_dentry == dentry) {
		if (w->off == 0) {
			w->truncated = false;
			w->detached = true;
			pseudo_name(w, dentry);
		}
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
 * walk stopped before reaching the root, and *detached (when given) when it ended at a dentry
 * that is its own parent: for a file in no directory, `buf` then holds its pseudo name
 * (pseudo_name). Crosses mount points through struct mount.
 */
static __always_inline __u32 walk_path(struct dentry *dentry, struct vfsmount *vfsmnt,
				       struct dentry *root_dentry, struct vfsmount *root_mnt,
				       char *buf, bool *truncated, bool *detached)
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
		.detached = false,
	};

	bpf_loop(KILN_PATH_COMPONENTS_MAX, walk_step, &w, 0);
	*truncated = w.truncated;
	if (detached)
		*detached = w.detached;
	if (w.off > KILN_PATH_MAX) {
		*truncated = true;
		return KILN_PATH_MAX;
	}
	return w.off;
}

/* Copies a walked path (at most KILN_PATH_MAX bytes, kernel memory: a scratch buffer or a map
 * value) into a record. */
static __always_inline __u16 copy_path(char *dst, const char *scratch, __u32 len)
{
	if (len == 0 || len > KILN_PATH_MAX)
		return 0;
	if (bpf_probe_read_kernel(dst, len, scratch) != 0)
		return 0;
	return len;
}

#endif /* KILN_COMMON_BPF_H */
