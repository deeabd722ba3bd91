// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * observer.bpf.c: the observer's one BPF object. Every program family (one source file each)
 * shares the maps of common.bpf.h: the cgroup filter, the ring buffer, the loss counters. So
 * the families are compiled as one translation unit here rather than as separate objects
 * (which would each get their own maps).
 *
 * Transport: one BPF ring buffer of variable-size records (events.h). Submits do not wake the
 * consumer (BPF_RB_NO_WAKEUP) unless kiln_wakeup_interval_ns passed since the last forced
 * wakeup, or the unread data passed kiln_wakeup_threshold bytes (then at most one wakeup per
 * 100 us); userspace also drains on a timer, so the tail is never stranded.
 * Per-event wakeups cost ~2.7x on a storm; batched ones ~1.4x (measured, DESIGN.md).
 * Every failed reserve is counted, per CPU and per cgroup: a trace with unreported loss is a lie.
 */
#include "common.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* syscalls first: process.bpf.c's exit program ends the exiting process's write totals. */
#include "syscalls.bpf.c"
#include "process.bpf.c"
#include "sock.bpf.c"
