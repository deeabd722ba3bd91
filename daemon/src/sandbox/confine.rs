//! Confinement of the step process beyond namespaces and capabilities: the wire types kilnd puts in
//! the [`SandboxSpec`](super::SandboxSpec) ([`Confinement`]: the compiled seccomp filter, resource
//! limits, the Landlock ruleset) and the helper-side Landlock enforcement.
//!
//! The step process applies them in this order (see `helper::prepare_step`): rlimits and the
//! Landlock ruleset's path fds while still root (so limits can be raised and every rule path can be
//! opened), then the privilege drop, then `landlock_restrict_self`, and the seccomp filter last,
//! right before `execve`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath,
    PathFd, Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::seccomp::{MAX_INSTRUCTIONS, SeccompError};

/// Landlock ABI whose filesystem rights kiln handles (V5, Linux 6.10: adds `IoctlDev`). Newer
/// rights are not requested, so a kernel at this ABI or newer enforces the ruleset fully.
const FS_ABI: ABI = ABI::V5;
/// Landlock ABI of the scopes kiln requests (V6, Linux 6.12: signals and abstract unix sockets).
const SCOPE_ABI: ABI = ABI::V6;

/// Everything the step process applies to itself after the namespaces are built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Confinement {
    /// The profile's compiled seccomp filter, installed last before `execve`.
    pub seccomp: SeccompProgram,
    /// Resource limits (soft = hard), set while still privileged.
    pub rlimits: Rlimits,
    /// The Landlock ruleset; `None` if the profile disables Landlock.
    pub landlock: Option<LandlockPolicy>,
    /// The profile's `[userns]`: the step runs in a user namespace of its own with this id
    /// mapping; `None`: no user namespace (the step's ids are host ids).
    #[serde(default)]
    pub userns: Option<UserNamespace>,
}

/// A step's user namespace: ids `0..count` inside are `host_uid..host_uid + count` (and the
/// same for groups) outside. The step's `uid`/`gid` are ids inside, so on the host its processes
/// and files belong to `host_uid + uid`, never to a host user. Written by pid 1 of the sandbox
/// (in the parent user namespace) into `/proc/<step>/{uid_map,setgroups,gid_map}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserNamespace {
    /// First host uid of the range (inside uid 0); never 0.
    pub host_uid: u32,
    /// First host gid of the range (inside gid 0); never 0.
    pub host_gid: u32,
    /// Number of ids mapped (at least 1).
    pub count: u32,
}

impl UserNamespace {
    /// Checks the range (`host_uid`/`host_gid` not 0, `count` at least 1, the range below the
    /// invalid id `u32::MAX`) and that the step's `uid`/`gid` (ids inside) lie in it.
    pub fn validate(&self, uid: u32, gid: u32) -> Result<(), String> {
        if self.host_uid == 0 || self.host_gid == 0 {
            return Err(
                "host_uid and host_gid must not be 0 (the range must not hold host root)".into(),
            );
        }
        if self.count == 0 {
            return Err("count must be at least 1".into());
        }
        for (field, start) in [("host_uid", self.host_uid), ("host_gid", self.host_gid)] {
            if start
                .checked_add(self.count)
                .is_none_or(|end| end == u32::MAX)
            {
                return Err(format!(
                    "{field} {start} + count {} goes past the largest id {}",
                    self.count,
                    u32::MAX - 1
                ));
            }
        }
        for (field, id) in [("uid", uid), ("gid", gid)] {
            if id >= self.count {
                return Err(format!(
                    "the step's {field} {id} is outside the mapped range 0..{}",
                    self.count
                ));
            }
        }
        Ok(())
    }

    /// The host id of `uid` inside (saturating: callers validate first).
    pub fn host_uid_of(&self, uid: u32) -> u32 {
        self.host_uid.saturating_add(uid)
    }

    /// The host id of `gid` inside.
    pub fn host_gid_of(&self, gid: u32) -> u32 {
        self.host_gid.saturating_add(gid)
    }

    /// `/proc/<pid>/uid_map` contents (one line, written in one `write`).
    pub fn uid_map(&self) -> String {
        format!("0 {} {}\n", self.host_uid, self.count)
    }

    /// `/proc/<pid>/gid_map` contents.
    pub fn gid_map(&self) -> String {
        format!("0 {} {}\n", self.host_gid, self.count)
    }
}

/// A compiled classic-BPF seccomp program (`struct sock_filter[]`, native byte order); base64 in
/// JSON. Always a whole number of instructions, at most [`MAX_INSTRUCTIONS`].
#[derive(Clone, PartialEq, Eq)]
pub struct SeccompProgram(Arc<[u8]>);

impl SeccompProgram {
    /// Checks the size of an exported program.
    pub fn new(bytes: Vec<u8>) -> Result<Self, SeccompError> {
        if bytes.is_empty() || !bytes.len().is_multiple_of(8) {
            return Err(SeccompError::Malformed { bytes: bytes.len() });
        }
        let instructions = bytes.len() / 8;
        if instructions > MAX_INSTRUCTIONS {
            return Err(SeccompError::TooLarge { instructions });
        }
        Ok(Self(bytes.into()))
    }

    /// Number of BPF instructions.
    pub fn instructions(&self) -> usize {
        self.0.len() / 8
    }

    /// The raw program.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The program as the kernel's instruction structs.
    pub fn to_filter(&self) -> Vec<libc::sock_filter> {
        self.0
            .chunks_exact(8)
            .map(|insn| libc::sock_filter {
                code: u16::from_ne_bytes([insn[0], insn[1]]),
                jt: insn[2],
                jf: insn[3],
                k: u32::from_ne_bytes([insn[4], insn[5], insn[6], insn[7]]),
            })
            .collect()
    }
}

impl fmt::Debug for SeccompProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeccompProgram")
            .field("instructions", &self.instructions())
            .finish()
    }
}

impl Serialize for SeccompProgram {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for SeccompProgram {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)?;
        Self::new(bytes).map_err(serde::de::Error::custom)
    }
}

/// Resource limits of the step (each set as both soft and hard limit; `u64::MAX` is unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimits {
    /// `RLIMIT_CORE`: largest core dump, in bytes (0: none).
    pub core_bytes: u64,
    /// `RLIMIT_NOFILE`: open files per process.
    pub nofile: u64,
    /// `RLIMIT_FSIZE`: largest file the step may write, in bytes.
    pub fsize_bytes: u64,
}

/// A Landlock ruleset: filesystem access beneath the listed paths (paths inside the sandbox), no
/// TCP bind, TCP connect only to the listed ports, no signals or abstract-socket connections out
/// of the step's own processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LandlockPolicy {
    /// Path rules; anything not beneath one of them is denied.
    pub rules: Vec<LandlockRule>,
    /// TCP ports the step may connect to (empty: none).
    pub tcp_connect_ports: Vec<u16>,
}

/// Access beneath one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LandlockRule {
    /// Path inside the sandbox (absolute).
    pub path: PathBuf,
    /// What the step may do beneath it.
    pub access: LandlockAccess,
}

/// Access levels of [`LandlockRule`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LandlockAccess {
    /// Read files and list directories.
    Read,
    /// Read, list and execute (toolchains, input workspaces).
    ReadExecute,
    /// Everything but creating device nodes (`/tmp`, the output workspace).
    ReadWrite,
    /// Read, write and ioctl an existing device node (`/dev/null`, …).
    Device,
}

impl LandlockAccess {
    fn rights(self) -> BitFlags<AccessFs> {
        let read = AccessFs::ReadFile | AccessFs::ReadDir;
        match self {
            Self::Read => read,
            Self::ReadExecute => read | AccessFs::Execute,
            Self::ReadWrite => {
                AccessFs::from_all(FS_ABI) & !(AccessFs::MakeChar | AccessFs::MakeBlock)
            }
            Self::Device => AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev,
        }
    }
}

/// How far Landlock could be enforced on this kernel (recorded in the outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LandlockEnforcement {
    /// Every requested right, the TCP rules and the scopes are enforced.
    FullyEnforced,
    /// The kernel's Landlock ABI lacks some requested feature; the rest is enforced.
    PartiallyEnforced,
    /// The kernel has no (enabled) Landlock: nothing is enforced.
    NotEnforced,
    /// The profile disables Landlock.
    Disabled,
}

/// Building or enforcing the Landlock ruleset failed.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// The ruleset could not be built or enforced.
    #[error("landlock ruleset")]
    Ruleset(#[from] landlock::RulesetError),
    /// A rule's path could not be opened.
    #[error("landlock rule path {path:?}")]
    Path {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: landlock::PathFdError,
    },
}

/// A created ruleset with every rule added, waiting for [`enforce_landlock`].
#[derive(Debug)]
pub struct PreparedLandlock(RulesetCreated);

/// Builds the ruleset (best effort: rights the kernel lacks are dropped, and reported by
/// [`enforce_landlock`]). Run while still root: every rule path can be opened whatever its mode.
/// A rule whose path does not exist is skipped: it would only have granted access.
pub fn prepare_landlock(policy: &LandlockPolicy) -> Result<PreparedLandlock, LandlockError> {
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(FS_ABI))?
        .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)?
        .scope(Scope::from_all(SCOPE_ABI))?
        .create()?;
    for rule in &policy.rules {
        let fd = match PathFd::new(&rule.path) {
            Ok(fd) => fd,
            Err(_) if !rule.path.exists() => continue,
            Err(source) => {
                return Err(LandlockError::Path {
                    path: rule.path.clone(),
                    source,
                });
            }
        };
        let mut rights = rule.access.rights();
        // Directory rights on a file make the kernel refuse the rule: keep the file rights.
        if !is_dir(&rule.path) {
            rights &= AccessFs::from_file(FS_ABI);
        }
        ruleset = ruleset.add_rule(PathBeneath::new(fd, rights))?;
    }
    for &port in &policy.tcp_connect_ports {
        ruleset = ruleset.add_rule(NetPort::new(port, AccessNet::ConnectTcp))?;
    }
    Ok(PreparedLandlock(ruleset))
}

/// `landlock_restrict_self`: from here on this process and everything it execs is confined.
pub fn enforce_landlock(prepared: PreparedLandlock) -> Result<LandlockEnforcement, LandlockError> {
    let status = prepared.0.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockEnforcement::FullyEnforced,
        RulesetStatus::PartiallyEnforced => LandlockEnforcement::PartiallyEnforced,
        RulesetStatus::NotEnforced => LandlockEnforcement::NotEnforced,
    })
}

fn is_dir(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|meta| meta.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_round_trips_as_base64_and_checks_size() {
        let program = SeccompProgram::new(vec![6, 0, 0, 0, 0, 0, 0xff, 0x7f]).unwrap();
        let json = serde_json::to_string(&program).unwrap();
        assert_eq!(json, r#""BgAAAAAA/38=""#);
        assert_eq!(
            serde_json::from_str::<SeccompProgram>(&json).unwrap(),
            program
        );
        let filter = program.to_filter();
        assert_eq!((filter[0].code, filter[0].k), (6, 0x7fff_0000));
        assert!(SeccompProgram::new(vec![0; 7]).is_err());
        assert!(SeccompProgram::new(Vec::new()).is_err());
        assert!(SeccompProgram::new(vec![0; 8 * (MAX_INSTRUCTIONS + 1)]).is_err());
        assert!(serde_json::from_str::<SeccompProgram>(r#""AAAA""#).is_err());
        assert_eq!(format!("{program:?}"), "SeccompProgram { instructions: 1 }");
    }

    #[test]
    fn access_levels() {
        assert!(!LandlockAccess::Read.rights().contains(AccessFs::Execute));
        assert!(
            LandlockAccess::ReadExecute
                .rights()
                .contains(AccessFs::Execute)
        );
        let read_write = LandlockAccess::ReadWrite.rights();
        assert!(read_write.contains(AccessFs::WriteFile | AccessFs::MakeReg | AccessFs::Truncate));
        assert!(!read_write.intersects(AccessFs::MakeChar | AccessFs::MakeBlock));
        assert!(!LandlockAccess::Device.rights().contains(AccessFs::ReadDir));
    }
}
