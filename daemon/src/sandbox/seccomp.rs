//! The seccomp compiler (kilnd side): turns a profile's reviewed `[seccomp]` allowlist into a
//! classic-BPF program once, at daemon start, with libseccomp. The program travels to the helper
//! inside the [`SandboxSpec`](super::SandboxSpec) as a [`SeccompProgram`]; the helper only installs
//! it (`sys::install_seccomp`) and never calls libseccomp itself.
//!
//! Fixed rules every profile gets, whatever its allowlist says:
//! - default action `errno` (EPERM) for everything not allowed; foreign architectures (i386 via
//!   `int 0x80`, x32) kill the process;
//! - `clone` only without namespace flags (an argument filter on its flags word);
//! - `personality` only with the plain Linux personas or the query (no `ADDR_NO_RANDOMIZE`, no
//!   `READ_IMPLIES_EXEC`);
//! - `clone3` fails with ENOSYS (its flags live in memory a filter cannot read), so libc falls back
//!   to `clone`, whose flags are filtered;
//! - [`ALWAYS_DENIED`] syscalls cannot be allowed by a profile at all.

use std::io::{Read, Seek};

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};

use super::confine::SeccompProgram;

/// Largest accepted program, in BPF instructions (the kernel's `BPF_MAXINSNS`).
pub const MAX_INSTRUCTIONS: usize = 4096;

/// Namespace-creating `clone` flags. `CLONE_NEWTIME` (0x80) is absent on purpose: for `clone` that
/// bit is part of the exit signal, and new time namespaces need `unshare`/`clone3`, both denied.
const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;

/// `personality` values a step may set (and `0xffffffff`, the query): PER_LINUX, PER_LINUX32 and
/// UNAME26 combinations, as Docker's default profile. Flags that weaken the process
/// (`ADDR_NO_RANDOMIZE`, `READ_IMPLIES_EXEC`, `MMAP_PAGE_ZERO`, …) are denied.
const PERSONALITIES: [u64; 5] = [
    0x0000_0000,
    0x0000_0008,
    0x0002_0000,
    0x0002_0008,
    0xffff_ffff,
];

/// Syscalls no profile may allow: they create or enter namespaces, change mounts, load kernel code
/// or BPF, inspect other processes, reach the kernel keyring, bypass the filter (io_uring runs
/// syscalls the filter never sees), change the host's clock, or are host administration.
pub const ALWAYS_DENIED: &[&str] = &[
    // namespaces
    "unshare",
    "setns",
    // the mount family
    "mount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "open_tree_attr",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "mount_setattr",
    "chroot",
    // kernel code, BPF and tracing
    "bpf",
    "perf_event_open",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    // other processes' memory
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    // the kernel keyring
    "keyctl",
    "add_key",
    "request_key",
    // io_uring: submissions bypass seccomp
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    // page-fault handling used to win kernel races
    "userfaultfd",
    // host administration
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "clock_settime",
    "clock_adjtime",
    "settimeofday",
    "adjtimex",
    // file handles bypass path-based checks (the "shocker" escape)
    "open_by_handle_at",
    "name_to_handle_at",
];

/// Syscalls without which no step can start (the helper's own `execve` runs under the filter).
pub const REQUIRED: &[&str] = &["execve", "exit_group"];

/// Syscalls newer than libseccomp 2.5.4 knows (its table ends at `futex_requeue`, 456). Since
/// Linux 5.1 (424) new syscalls share one number on every architecture but alpha, so these are the
/// numbers on x86_64 and aarch64.
const NEWER_SYSCALLS: &[(&str, i32)] = &[
    ("statmount", 457),
    ("listmount", 458),
    ("lsm_get_self_attr", 459),
    ("lsm_set_self_attr", 460),
    ("lsm_list_modules", 461),
    ("mseal", 462),
    ("setxattrat", 463),
    ("getxattrat", 464),
    ("listxattrat", 465),
    ("removexattrat", 466),
    ("open_tree_attr", 467),
    ("file_getattr", 468),
    ("file_setattr", 469),
];

/// Errno names a profile may use for denied syscalls.
const ERRNOS: &[(&str, i32)] = &[
    ("EPERM", libc::EPERM),
    ("EACCES", libc::EACCES),
    ("ENOSYS", libc::ENOSYS),
];

/// A resolved syscall: its name and number on this architecture (negative for libseccomp's
/// pseudo-numbers of syscalls this architecture lacks, e.g. `arch_prctl` on aarch64).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Syscall {
    /// Name as written in the profile.
    pub name: String,
    /// Number passed to libseccomp.
    pub number: i32,
}

/// The seccomp part of a profile, resolved and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompPolicy {
    /// Errno of denied syscalls.
    pub errno: i32,
    /// Allowed syscalls (`clone` with the namespace-flag filter).
    pub allow: Vec<Syscall>,
}

/// Compiling a policy failed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// libseccomp refused an operation.
    #[error("libseccomp: {what}")]
    Libseccomp {
        /// The operation (and syscall, if any).
        what: String,
        /// Why.
        #[source]
        source: libseccomp::error::SeccompError,
    },
    /// Reading the exported program back failed.
    #[error("cannot read the exported seccomp program")]
    Export(#[source] std::io::Error),
    /// The program does not fit the kernel's limit.
    #[error(
        "seccomp program has {instructions} instructions, more than the limit of {MAX_INSTRUCTIONS}"
    )]
    TooLarge {
        /// Its size.
        instructions: usize,
    },
    /// The exported bytes are not a whole number of instructions.
    #[error("seccomp program of {bytes} bytes is not a whole number of 8-byte instructions")]
    Malformed {
        /// Its size.
        bytes: usize,
    },
}

/// The number of `name` on this architecture, if libseccomp or [`NEWER_SYSCALLS`] knows it.
pub fn resolve(name: &str) -> Option<i32> {
    if let Ok(syscall) = ScmpSyscall::from_name(name) {
        return Some(syscall.as_raw_syscall());
    }
    NEWER_SYSCALLS
        .iter()
        .find(|(known, _)| *known == name)
        .map(|&(_, number)| number)
}

/// The value of an errno name accepted in profiles (`EPERM`, `EACCES`, `ENOSYS`).
pub fn errno_value(name: &str) -> Option<i32> {
    ERRNOS
        .iter()
        .find(|(known, _)| *known == name)
        .map(|&(_, value)| value)
}

/// libseccomp's filter layout: `2` is a binary tree sorted by syscall number (see [`compile`]).
const BINARY_TREE: u32 = 2;

/// Compiles `policy` for the native architecture and exports it as raw BPF.
pub fn compile(policy: &SeccompPolicy) -> Result<SeccompProgram, SeccompError> {
    compile_with_layout(policy, BINARY_TREE)
}

/// [`compile`] with libseccomp's `SCMP_FLTATR_CTL_OPTIMIZE` level `layout` (`1`: its default
/// linear chain, `2`: binary tree); the tests compare both.
fn compile_with_layout(
    policy: &SeccompPolicy,
    layout: u32,
) -> Result<SeccompProgram, SeccompError> {
    let libseccomp = |what: String| move |source| SeccompError::Libseccomp { what, source };
    let mut filter = ScmpFilterContext::new(ScmpAction::Errno(policy.errno))
        .map_err(libseccomp("create filter".into()))?;
    // A syscall through another ABI (int 0x80, x32) would be looked up in another table: kill.
    filter
        .set_act_badarch(ScmpAction::KillProcess)
        .map_err(libseccomp("set bad-arch action".into()))?;
    // The helper sets no_new_privs itself before installing; the exported program carries no flag.
    filter
        .set_ctl_nnp(false)
        .map_err(libseccomp("clear nnp control".into()))?;
    // A binary tree sorted by syscall number instead of libseccomp's default linear chain: every
    // syscall of the step is decided in ~log2(allowlist) comparisons instead of up to one per
    // allowed syscall, and the kernel's per-syscall action cache (computed by emulating the
    // filter once per syscall number at install) is built faster. Same rules, same verdicts;
    // measured in scripts/bench/sandbox (docs/operations.md).
    filter
        .set_ctl_optimize(layout)
        .map_err(libseccomp(format!("set filter layout {layout}")))?;
    if !filter
        .is_arch_present(ScmpArch::native())
        .map_err(libseccomp("check native arch".into()))?
    {
        filter
            .add_arch(ScmpArch::native())
            .map_err(libseccomp("add native arch".into()))?;
    }
    for syscall in &policy.allow {
        let number = ScmpSyscall::from_raw_syscall(syscall.number);
        if syscall.name == "clone" {
            // clone(flags, …): allowed only if no namespace flag is set in the flags word.
            let no_namespace =
                ScmpArgCompare::new(0, ScmpCompareOp::MaskedEqual(CLONE_NAMESPACE_FLAGS), 0);
            filter
                .add_rule_conditional(ScmpAction::Allow, number, &[no_namespace])
                .map_err(libseccomp("allow clone without namespace flags".into()))?;
        } else if syscall.name == "personality" {
            for persona in PERSONALITIES {
                let value = ScmpArgCompare::new(0, ScmpCompareOp::Equal, persona);
                filter
                    .add_rule_conditional(ScmpAction::Allow, number, &[value])
                    .map_err(libseccomp(format!("allow personality({persona:#x})")))?;
            }
        } else {
            filter
                .add_rule(ScmpAction::Allow, number)
                .map_err(libseccomp(format!("allow {}", syscall.name)))?;
        }
    }
    // clone3's flags are in a struct in memory: deny it so that libc falls back to clone.
    if policy.errno != libc::ENOSYS {
        let clone3 =
            ScmpSyscall::from_name("clone3").map_err(libseccomp("resolve clone3".into()))?;
        filter
            .add_rule(ScmpAction::Errno(libc::ENOSYS), clone3)
            .map_err(libseccomp("deny clone3 with ENOSYS".into()))?;
    }

    // libseccomp 2.5 exports to an fd only (seccomp_export_bpf_mem is 2.6): an unnamed temp file.
    let mut file = tempfile::tempfile().map_err(SeccompError::Export)?;
    filter
        .export_bpf(&file)
        .map_err(libseccomp("export bpf".into()))?;
    file.rewind().map_err(SeccompError::Export)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(SeccompError::Export)?;
    SeccompProgram::new(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(names: &[&str]) -> SeccompPolicy {
        SeccompPolicy {
            errno: libc::EPERM,
            allow: names
                .iter()
                .map(|name| Syscall {
                    name: (*name).to_owned(),
                    number: resolve(name).unwrap(),
                })
                .collect(),
        }
    }

    #[test]
    fn resolves_known_new_and_unknown_names() {
        assert_eq!(resolve("read"), Some(libc::SYS_read as i32));
        assert_eq!(resolve("mseal"), Some(462));
        assert_eq!(resolve("kiln_no_such_syscall"), None);
        for name in ALWAYS_DENIED.iter().chain(REQUIRED) {
            assert!(resolve(name).is_some(), "{name}");
        }
        assert_eq!(errno_value("EPERM"), Some(1));
        assert_eq!(errno_value("EIO"), None);
    }

    /// The hermetic profile's allowlist, read from profiles/hermetic.toml.
    fn hermetic() -> SeccompPolicy {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles/hermetic.toml");
        let profile: toml::Table = std::fs::read_to_string(path).unwrap().parse().unwrap();
        let allow = profile["seccomp"]["allow"].as_array().unwrap();
        let names: Vec<&str> = allow.iter().map(|name| name.as_str().unwrap()).collect();
        policy(&names)
    }

    /// `struct seccomp_data` as the kernel lays it out, as 32-bit words.
    fn seccomp_data(nr: i32, arch: u32, args: [u64; 6]) -> Vec<u32> {
        let mut words = vec![nr as u32, arch, 0, 0];
        for arg in args {
            words.extend([arg as u32, (arg >> 32) as u32]);
        }
        words
    }

    /// The filter's return value (action | data) for `data`.
    fn evaluate(filter: &[libc::sock_filter], data: &[u32]) -> u32 {
        run(filter, data).0
    }

    /// A classic-BPF interpreter (the instructions libseccomp emits) over `seccomp_data`: the
    /// filter's return value and the number of instructions executed.
    fn run(filter: &[libc::sock_filter], data: &[u32]) -> (u32, usize) {
        let (mut a, mut x, mut memory, mut pc) = (0_u32, 0_u32, [0_u32; 16], 0_usize);
        let mut steps = 0;
        loop {
            let insn = filter[pc];
            steps += 1;
            let k = insn.k;
            pc += 1;
            let operand = if insn.code & 0x08 == 0 { k } else { x };
            match insn.code & 0x07 {
                // BPF_LD: W|ABS, W|MEM, IMM.
                0x00 => match insn.code & 0xe0 {
                    0x20 => a = data[k as usize / 4],
                    0x60 => a = memory[k as usize],
                    0x00 => a = k,
                    mode => panic!("ld mode {mode:#x}"),
                },
                // BPF_LDX: MEM, IMM.
                0x01 => match insn.code & 0xe0 {
                    0x60 => x = memory[k as usize],
                    0x00 => x = k,
                    mode => panic!("ldx mode {mode:#x}"),
                },
                0x02 => memory[k as usize] = a,
                0x03 => memory[k as usize] = x,
                // BPF_ALU.
                0x04 => {
                    a = match insn.code & 0xf0 {
                        0x00 => a.wrapping_add(operand),
                        0x10 => a.wrapping_sub(operand),
                        0x40 => a | operand,
                        0x50 => a & operand,
                        0x60 => a << operand,
                        0x70 => a >> operand,
                        0xa0 => a ^ operand,
                        op => panic!("alu op {op:#x}"),
                    }
                }
                // BPF_JMP.
                0x05 => {
                    let taken = match insn.code & 0xf0 {
                        0x00 => {
                            pc += k as usize;
                            continue;
                        }
                        0x10 => a == operand,
                        0x20 => a > operand,
                        0x30 => a >= operand,
                        0x40 => a & operand != 0,
                        op => panic!("jmp op {op:#x}"),
                    };
                    pc += usize::from(if taken { insn.jt } else { insn.jf });
                }
                // BPF_RET: K or A.
                0x06 => return (if insn.code & 0x18 == 0x10 { a } else { k }, steps),
                // BPF_MISC: TAX, TXA.
                _ => {
                    if insn.code & 0xf8 == 0 {
                        x = a;
                    } else {
                        a = x;
                    }
                }
            }
        }
    }

    const AUDIT_ARCH_I386: u32 = 0x4000_0003;

    /// The native architecture's `AUDIT_ARCH_*`.
    fn native() -> u32 {
        if cfg!(target_arch = "x86_64") {
            0xc000_003e
        } else {
            0xc000_00b7
        }
    }

    #[test]
    fn binary_tree_decides_every_syscall_like_the_linear_filter() {
        let policy = hermetic();
        let linear = compile_with_layout(&policy, 1).unwrap().to_filter();
        let tree = compile(&policy).unwrap().to_filter();
        let native = native();
        let clone_flags = [
            0,
            libc::SIGCHLD as u64,
            (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64,
            (libc::CLONE_NEWUSER | libc::SIGCHLD) as u64,
            libc::CLONE_NEWNET as u64,
            libc::CLONE_NEWNS as u64 | (1 << 40),
            u64::MAX,
        ];
        let personas = [0, 8, 0x2_0000, 0x4_0000, 0x40_0000, 0xffff_ffff, 1 << 32];
        let mut checked = 0;
        for arch in [native, AUDIT_ARCH_I386] {
            // Every number the tables know, the x32 range, and a few past the end.
            for nr in (0..600)
                .chain(0x4000_0000..0x4000_0200)
                .chain([-1, i32::MAX])
            {
                for first in clone_flags.iter().chain(&personas) {
                    let data = seccomp_data(nr, arch, [*first, 1, 2, u64::MAX, 0, 7]);
                    assert_eq!(
                        evaluate(&tree, &data),
                        evaluate(&linear, &data),
                        "syscall {nr} arch {arch:#x} arg0 {first:#x}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 10_000);
        // And the verdicts are the profile's: spot checks on the tree.
        let verdict = |name: &str, arch: u32, arg0: u64| {
            evaluate(
                &tree,
                &seccomp_data(resolve(name).unwrap(), arch, [arg0, 0, 0, 0, 0, 0]),
            )
        };
        let allow = libc::SECCOMP_RET_ALLOW;
        let errno = |e: i32| libc::SECCOMP_RET_ERRNO | e as u32;
        assert_eq!(verdict("read", native, 0), allow);
        assert_eq!(verdict("execve", native, 0), allow);
        assert_eq!(verdict("mount", native, 0), errno(libc::EPERM));
        assert_eq!(verdict("unshare", native, 0), errno(libc::EPERM));
        assert_eq!(verdict("clone3", native, 0), errno(libc::ENOSYS));
        assert_eq!(verdict("clone", native, libc::SIGCHLD as u64), allow);
        assert_eq!(
            verdict(
                "clone",
                native,
                (libc::CLONE_NEWUSER | libc::SIGCHLD) as u64
            ),
            errno(libc::EPERM)
        );
        assert_eq!(verdict("personality", native, 0xffff_ffff), allow);
        assert_eq!(verdict("personality", native, 0x4_0000), errno(libc::EPERM));
        assert_eq!(
            verdict("read", AUDIT_ARCH_I386, 0),
            libc::SECCOMP_RET_KILL_PROCESS
        );
    }

    #[test]
    fn binary_tree_walks_far_fewer_instructions() {
        let policy = hermetic();
        let linear = compile_with_layout(&policy, 1).unwrap().to_filter();
        let tree = compile(&policy).unwrap().to_filter();
        let walk = |filter: &[libc::sock_filter]| {
            (0..470)
                .map(|nr| run(filter, &seccomp_data(nr, native(), [0; 6])).1)
                .max()
                .unwrap()
        };
        let (linear_steps, tree_steps) = (walk(&linear), walk(&tree));
        assert!(
            tree_steps * 4 < linear_steps,
            "longest path: tree {tree_steps}, linear {linear_steps} instructions"
        );
    }

    #[test]
    fn compiles_to_whole_instructions_below_the_cap() {
        let program =
            compile(&policy(&["read", "write", "execve", "exit_group", "clone"])).unwrap();
        assert!(program.instructions() > 5);
        assert!(program.instructions() <= MAX_INSTRUCTIONS);
        assert_eq!(program.as_bytes().len() % 8, 0);
    }
}
