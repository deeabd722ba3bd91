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

/// Compiles `policy` for the native architecture and exports it as raw BPF.
pub fn compile(policy: &SeccompPolicy) -> Result<SeccompProgram, SeccompError> {
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
        .set_ctl_optimize(2)
        .map_err(libseccomp("set binary-tree optimization".into()))?;
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

    #[test]
    fn compiles_to_whole_instructions_below_the_cap() {
        let program =
            compile(&policy(&["read", "write", "execve", "exit_group", "clone"])).unwrap();
        assert!(program.instructions() > 5);
        assert!(program.instructions() <= MAX_INSTRUCTIONS);
        assert_eq!(program.as_bytes().len() % 8, 0);
    }
}
