// SPDX-License-Identifier: GPL-2.0-only
/*
 * floor.bpf.c: the kernel floor of kiln's syscall observation, for the benchmark only (never
 * loaded by kilnd). One tp_btf/sys_exit program that returns at once: attaching any program
 * to the raw syscall tracepoint sets SYSCALL_TRACEPOINT on every task, which puts every
 * syscall on the host on the kernel's slow path. What kiln's own sys_exit program costs an
 * unobserved process is measured against this, in the same run (daemon/benches/observer.rs).
 * Keep the section in step with syscalls.bpf.c's kiln_sys_exit (the tracepoint kiln uses).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

SEC("tp_btf/sys_exit")
int BPF_PROG(kiln_floor_sys_exit, struct pt_regs *regs, long ret)
{
	return 0;
}
