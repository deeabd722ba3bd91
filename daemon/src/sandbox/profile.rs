//! Sandbox profiles: the reviewed, declarative environment of a step (`profiles/*.toml`, one file
//! per profile, the file stem is its name). kilnd turns a profile plus a step into a
//! [`SandboxSpec`](super::SandboxSpec).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::cgroup::{Limits, format_bytes};
use super::confine::{
    Confinement, LandlockAccess, LandlockPolicy, LandlockRule, Rlimits, SeccompProgram,
    UserNamespace,
};
use super::seccomp::{self, SeccompError, SeccompPolicy, Syscall};
use super::spec::{Access, WorkspaceMount};

/// A loaded, validated profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// What the profile is for.
    pub description: String,
    /// Host paths made visible read-only (absolute, normal, non-nesting). [`load_profiles`] keeps
    /// only those present on this host (`lstat`), so one profile serves hosts with and without e.g.
    /// `/lib64`; the others are skipped with a debug log.
    pub host_paths: Vec<PathBuf>,
    /// `PATH` of the step's environment.
    pub path_env: String,
    /// User the step runs as.
    pub uid: u32,
    /// Group the step runs as.
    pub gid: u32,
    /// Size limit of the private `/tmp`, in bytes.
    pub tmp_size_bytes: u64,
    /// Resource limits of the step's cgroups (`[limits]`).
    pub limits: Limits,
    /// `[limits] workspace_size`: the step's output workspace is a tmpfs of this size instead of
    /// a directory on the host disk ([`super::outputfs`]); `None` = uncapped (host disk).
    pub workspace_size_bytes: Option<u64>,
    /// The `[seccomp]` allowlist, compiled once at load.
    pub seccomp: SeccompProgram,
    /// `[rlimits]`.
    pub rlimits: Rlimits,
    /// `[landlock]`; `None` if the profile disables Landlock.
    pub landlock: Option<ProfileLandlock>,
    /// `[userns]`: the step runs in a user namespace of its own, `uid`/`gid` are ids inside it;
    /// `None`: no user namespace.
    pub userns: Option<UserNamespace>,
}

/// The `[landlock]` paths of a profile; host paths and workspaces are added per step
/// ([`Profile::confinement`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileLandlock {
    /// Device nodes the step may read, write and ioctl.
    pub devices: Vec<PathBuf>,
    /// Paths the step may read.
    pub read: Vec<PathBuf>,
    /// Paths the step may read, write and execute in.
    pub read_write: Vec<PathBuf>,
    /// TCP ports the step may connect to.
    pub tcp_connect_ports: Vec<u16>,
}

impl Profile {
    /// The step's uid and gid as the host sees them (what its output workspace is handed to):
    /// `uid`/`gid`, or with `[userns]` their mapped host ids.
    pub fn host_ids(&self) -> (u32, u32) {
        match &self.userns {
            Some(userns) => (userns.host_uid_of(self.uid), userns.host_gid_of(self.gid)),
            None => (self.uid, self.gid),
        }
    }

    /// The step's [`Confinement`]: the compiled filter, the rlimits, and the Landlock rules — the
    /// profile's host paths read+execute, its `[landlock]` paths, input workspaces read+execute and
    /// output workspaces read-write (at `/workspace/<name>`, as mounted).
    pub fn confinement(&self, workspaces: &[WorkspaceMount]) -> Confinement {
        self.confinement_with_root(&self.host_paths, workspaces)
    }

    /// [`Profile::confinement`] for a step whose environment is not the profile's host paths but
    /// `root_paths` (an image's bound top-level entries, e.g. `/usr`, `/etc`): those get the
    /// read+execute rules instead.
    pub fn confinement_with_root(
        &self,
        root_paths: &[PathBuf],
        workspaces: &[WorkspaceMount],
    ) -> Confinement {
        let landlock = self.landlock.as_ref().map(|landlock| {
            let rule = |path: &Path, access| LandlockRule {
                path: path.to_owned(),
                access,
            };
            let mut rules: Vec<LandlockRule> = Vec::new();
            rules.extend(
                root_paths
                    .iter()
                    .map(|path| rule(path, LandlockAccess::ReadExecute)),
            );
            rules.extend(
                landlock
                    .devices
                    .iter()
                    .map(|path| rule(path, LandlockAccess::Device)),
            );
            rules.extend(
                landlock
                    .read
                    .iter()
                    .map(|path| rule(path, LandlockAccess::Read)),
            );
            rules.extend(
                landlock
                    .read_write
                    .iter()
                    .map(|path| rule(path, LandlockAccess::ReadWrite)),
            );
            rules.extend(workspaces.iter().map(|workspace| {
                let access = match workspace.access {
                    // Inputs hold the programs earlier steps built (tests run them).
                    Access::ReadOnly => LandlockAccess::ReadExecute,
                    Access::ReadWrite => LandlockAccess::ReadWrite,
                };
                rule(&Path::new("/workspace").join(&workspace.name), access)
            }));
            LandlockPolicy {
                rules,
                tcp_connect_ports: landlock.tcp_connect_ports.clone(),
            }
        });
        Confinement {
            seccomp: self.seccomp.clone(),
            rlimits: self.rlimits,
            landlock,
            userns: self.userns,
        }
    }
}

/// A profile file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The profile directory could not be listed.
    #[error("cannot list profile directory {dir:?}")]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A profile file could not be read.
    #[error("cannot read profile {file:?}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A profile file is not valid TOML or has unknown/missing fields.
    #[error("{file}:{line}:{column}: {message}", file = file.display())]
    Parse {
        /// The file.
        file: PathBuf,
        /// 1-based line of the error (0 if unknown).
        line: usize,
        /// 1-based column of the error (0 if unknown).
        column: usize,
        /// The TOML parser's message.
        message: String,
    },
    /// The profile's seccomp allowlist could not be compiled.
    #[error("{file}: cannot compile the seccomp filter", file = file.display())]
    Seccomp {
        /// The file.
        file: PathBuf,
        /// Why.
        #[source]
        source: SeccompError,
    },
    /// A field has a value kiln refuses.
    #[error("{file}:{line}:{column}: {field}: {message}", file = file.display())]
    Invalid {
        /// The file.
        file: PathBuf,
        /// 1-based line of the value.
        line: usize,
        /// 1-based column of the value.
        column: usize,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// The TOML shape, with spans for error locations.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    description: String,
    host_paths: Vec<Spanned<PathBuf>>,
    path_env: Spanned<String>,
    uid: Spanned<u32>,
    gid: Spanned<u32>,
    tmp_size: Spanned<String>,
    #[serde(default)]
    limits: LimitsFile,
    seccomp: SeccompFile,
    rlimits: RlimitsFile,
    landlock: LandlockFile,
    #[serde(default)]
    userns: Option<Spanned<UserNsFile>>,
}

/// `[userns]`: all keys required.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserNsFile {
    host_uid: u32,
    host_gid: u32,
    count: u32,
}

/// `[seccomp]`: a default-deny allowlist.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeccompFile {
    errno: Spanned<String>,
    allow: Spanned<Vec<Spanned<String>>>,
}

/// `[rlimits]`: all required (inheriting kilnd's limits would make steps depend on the unit file).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RlimitsFile {
    core: Spanned<u64>,
    nofile: Spanned<u64>,
    fsize: Spanned<String>,
}

/// `[landlock]`: enabled unless `enabled = false`; path lists default to empty.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LandlockFile {
    #[serde(default = "enabled")]
    enabled: bool,
    #[serde(default)]
    devices: Vec<Spanned<PathBuf>>,
    #[serde(default)]
    read: Vec<Spanned<PathBuf>>,
    #[serde(default)]
    read_write: Vec<Spanned<PathBuf>>,
    #[serde(default)]
    tcp_connect_ports: Vec<u16>,
}

fn enabled() -> bool {
    true
}

/// `[limits]`: every key optional, defaults from [`Limits::default`].
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    memory: Option<Spanned<String>>,
    pids: Option<Spanned<u64>>,
    cpu: Option<Spanned<f64>>,
    workspace_size: Option<Spanned<String>>,
}

/// Smallest `[limits] memory`: the helper, the namespace's pid 1 and a shell need a few MiB; below
/// this the OOM killer would hit the sandbox itself rather than the build.
const MIN_MEMORY_BYTES: u64 = 16 << 20;
/// Smallest `[limits] pids`: the helper, pid 1, the step and a few children.
const MIN_PIDS: u64 = 8;
/// Largest `[limits] pids`: the kernel's `pid_max` ceiling.
const MAX_PIDS: u64 = 1 << 22;
/// Smallest `[limits] workspace_size`.
const MIN_WORKSPACE_BYTES: u64 = 1 << 20;
/// Largest `[limits] cpu`, in cores.
const MAX_CPU_CORES: f64 = 1024.0;

/// Loads every `*.toml` in `dir`; the file stem is the profile name. Host paths missing on this host
/// are dropped (debug log).
pub fn load_profiles(dir: &Path) -> Result<BTreeMap<String, Profile>, ProfileError> {
    let read_dir_error = |source| ProfileError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut profiles = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir_error)? {
        let path = entry.map_err(read_dir_error)?.path();
        if path.extension().is_none_or(|ext| ext != "toml") {
            continue;
        }
        let Some(name) = path.file_stem().and_then(|stem| stem.to_str()) else {
            continue;
        };
        let name = name.to_owned();
        let text = std::fs::read_to_string(&path).map_err(|source| ProfileError::Read {
            file: path.clone(),
            source,
        })?;
        let mut profile = parse_profile(&path, &text)?;
        profile.host_paths.retain(|host_path| {
            let present = host_path.symlink_metadata().is_ok();
            if !present {
                tracing::debug!(profile = %name, path = %host_path.display(), "host path not on this host, skipped");
            }
            present
        });
        tracing::debug!(
            profile = %name,
            instructions = profile.seccomp.instructions(),
            "seccomp filter compiled"
        );
        profiles.insert(name, profile);
    }
    Ok(profiles)
}

/// Parses and validates one profile file's text (`file` is for error messages).
pub fn parse_profile(file: &Path, text: &str) -> Result<Profile, ProfileError> {
    let raw: ProfileFile = toml::from_str(text).map_err(|err| {
        let (line, column) = err
            .span()
            .map_or((0, 0), |span| line_column(text, span.start));
        ProfileError::Parse {
            file: file.to_owned(),
            line,
            column,
            message: err.message().trim().to_owned(),
        }
    })?;
    let invalid = |span: Range<usize>, field: &'static str, message: String| {
        let (line, column) = line_column(text, span.start);
        ProfileError::Invalid {
            file: file.to_owned(),
            line,
            column,
            field,
            message,
        }
    };

    let mut host_paths: Vec<PathBuf> = Vec::new();
    for path in &raw.host_paths {
        let value = path.get_ref();
        let normal = value.is_absolute()
            && value
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
            && value != Path::new("/");
        if !normal {
            return Err(invalid(
                path.span(),
                "host_paths",
                format!(
                    "{} must be absolute, not '/', without '.' or '..'",
                    value.display()
                ),
            ));
        }
        if let Some(other) = host_paths
            .iter()
            .find(|other| other.starts_with(value) || value.starts_with(other))
        {
            return Err(invalid(
                path.span(),
                "host_paths",
                format!("{} nests with {}", value.display(), other.display()),
            ));
        }
        host_paths.push(value.clone());
    }
    if raw.path_env.get_ref().is_empty() {
        return Err(invalid(
            raw.path_env.span(),
            "path_env",
            "must not be empty".into(),
        ));
    }
    for (id, field) in [(&raw.uid, "uid"), (&raw.gid, "gid")] {
        if *id.get_ref() == 0 {
            return Err(invalid(
                id.span(),
                field,
                "steps never run as root (0)".into(),
            ));
        }
    }
    let userns = match &raw.userns {
        Some(section) => {
            let file = section.get_ref();
            let userns = UserNamespace {
                host_uid: file.host_uid,
                host_gid: file.host_gid,
                count: file.count,
            };
            userns
                .validate(*raw.uid.get_ref(), *raw.gid.get_ref())
                .map_err(|message| invalid(section.span(), "userns", message))?;
            Some(userns)
        }
        None => None,
    };
    let tmp_size_bytes = parse_size(raw.tmp_size.get_ref())
        .map_err(|message| invalid(raw.tmp_size.span(), "tmp_size", message))?;
    let mut limits = Limits::default();
    if let Some(memory) = &raw.limits.memory {
        limits.memory_bytes = parse_size(memory.get_ref())
            .and_then(|bytes| {
                if bytes < MIN_MEMORY_BYTES {
                    Err(format!(
                        "{:?} is below the minimum of {}",
                        memory.get_ref(),
                        format_bytes(MIN_MEMORY_BYTES)
                    ))
                } else {
                    Ok(bytes)
                }
            })
            .map_err(|message| invalid(memory.span(), "limits.memory", message))?;
    }
    if let Some(pids) = &raw.limits.pids {
        let value = *pids.get_ref();
        if !(MIN_PIDS..=MAX_PIDS).contains(&value) {
            return Err(invalid(
                pids.span(),
                "limits.pids",
                format!("{value} is outside {MIN_PIDS}..={MAX_PIDS}"),
            ));
        }
        limits.pids = value;
    }
    if let Some(cpu) = &raw.limits.cpu {
        let cores = *cpu.get_ref();
        if !(0.01..=MAX_CPU_CORES).contains(&cores) {
            return Err(invalid(
                cpu.span(),
                "limits.cpu",
                format!("{cores} cores is outside 0.01..={MAX_CPU_CORES}"),
            ));
        }
        limits.cpu_millicores = (cores * 1000.0).round() as u64;
    }
    let workspace_size_bytes = match &raw.limits.workspace_size {
        None => None,
        Some(size) if size.get_ref().trim() == "unlimited" => None,
        Some(size) => Some(
            parse_size(size.get_ref())
                .and_then(|bytes| {
                    if bytes < MIN_WORKSPACE_BYTES {
                        Err(format!(
                            "{:?} is below the minimum of {}",
                            size.get_ref(),
                            format_bytes(MIN_WORKSPACE_BYTES)
                        ))
                    } else {
                        Ok(bytes)
                    }
                })
                .map_err(|message| invalid(size.span(), "limits.workspace_size", message))?,
        ),
    };
    let policy = seccomp_policy(&raw.seccomp)
        .map_err(|(span, field, message)| invalid(span, field, message))?;
    let seccomp = seccomp::compile(&policy).map_err(|source| ProfileError::Seccomp {
        file: file.to_owned(),
        source,
    })?;
    let rlimits = Rlimits {
        core_bytes: *raw.rlimits.core.get_ref(),
        nofile: *raw.rlimits.nofile.get_ref(),
        fsize_bytes: match raw.rlimits.fsize.get_ref().trim() {
            "unlimited" => u64::MAX,
            size => parse_size(size)
                .map_err(|message| invalid(raw.rlimits.fsize.span(), "rlimits.fsize", message))?,
        },
    };
    if !(16..=1 << 20).contains(&rlimits.nofile) {
        return Err(invalid(
            raw.rlimits.nofile.span(),
            "rlimits.nofile",
            format!("{} is outside 16..=1048576", rlimits.nofile),
        ));
    }
    let landlock = if raw.landlock.enabled {
        let paths = |list: &[Spanned<PathBuf>], field| {
            list.iter()
                .map(|path| {
                    let value = path.get_ref();
                    if is_absolute_normal(value) {
                        Ok(value.clone())
                    } else {
                        Err(invalid(
                            path.span(),
                            field,
                            format!("{} must be absolute, without '.' or '..'", value.display()),
                        ))
                    }
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Some(ProfileLandlock {
            devices: paths(&raw.landlock.devices, "landlock.devices")?,
            read: paths(&raw.landlock.read, "landlock.read")?,
            read_write: paths(&raw.landlock.read_write, "landlock.read_write")?,
            tcp_connect_ports: raw.landlock.tcp_connect_ports,
        })
    } else {
        None
    };
    Ok(Profile {
        description: raw.description,
        host_paths,
        path_env: raw.path_env.into_inner(),
        uid: raw.uid.into_inner(),
        gid: raw.gid.into_inner(),
        tmp_size_bytes,
        limits,
        workspace_size_bytes,
        seccomp,
        rlimits,
        landlock,
        userns,
    })
}

/// Resolves and checks `[seccomp]`; an error carries the span of the offending value.
fn seccomp_policy(
    raw: &SeccompFile,
) -> Result<SeccompPolicy, (Range<usize>, &'static str, String)> {
    let errno = seccomp::errno_value(raw.errno.get_ref()).ok_or_else(|| {
        (
            raw.errno.span(),
            "seccomp.errno",
            format!(
                "unknown errno {:?}; use EPERM, EACCES or ENOSYS",
                raw.errno.get_ref()
            ),
        )
    })?;
    let mut allow: Vec<Syscall> = Vec::new();
    for name in raw.allow.get_ref() {
        let value = name.get_ref();
        let refuse = |message: String| (name.span(), "seccomp.allow", message);
        if seccomp::ALWAYS_DENIED.contains(&value.as_str()) {
            return Err(refuse(format!(
                "{value:?} is always denied by kiln and cannot be allowed"
            )));
        }
        if value == "clone3" {
            return Err(refuse(
                "\"clone3\" always fails with ENOSYS so that libc falls back to the filtered clone; remove it"
                    .into(),
            ));
        }
        if allow.iter().any(|known| known.name == *value) {
            return Err(refuse(format!("{value:?} is listed twice")));
        }
        let number =
            seccomp::resolve(value).ok_or_else(|| refuse(format!("unknown syscall {value:?}")))?;
        allow.push(Syscall {
            name: value.clone(),
            number,
        });
    }
    for required in seccomp::REQUIRED {
        if !allow.iter().any(|known| known.name == *required) {
            return Err((
                raw.allow.span(),
                "seccomp.allow",
                format!("must allow {required:?}: no step can run without it"),
            ));
        }
    }
    Ok(SeccompPolicy { errno, allow })
}

fn is_absolute_normal(path: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// Parses a byte size: an integer with an optional binary unit (`B`, `KiB`, `MiB`, `GiB`, `TiB`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like \"256MiB\""))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?}; use B, KiB, MiB, GiB or TiB"
            ));
        }
    };
    let bytes = number
        .checked_mul(1_u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes == 0 {
        return Err("must be greater than 0".into());
    }
    Ok(bytes)
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..text.floor_char_boundary(offset.min(text.len()))];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |last| last.chars().count())
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
description = "test"
host_paths = ["/usr", "/bin"]
path_env = "/usr/bin:/bin"
uid = 65534
gid = 65534
tmp_size = "256MiB"
[seccomp]
errno = "EPERM"
allow = ["read", "write", "execve", "exit_group", "clone"]
[rlimits]
core = 0
nofile = 1024
fsize = "1GiB"
[landlock]
read_write = ["/tmp"]
"#;

    #[test]
    fn parses_good_profile() {
        let profile = parse_profile(Path::new("t.toml"), GOOD).unwrap();
        assert_eq!(profile.tmp_size_bytes, 256 << 20);
        assert_eq!(
            profile.host_paths,
            vec![PathBuf::from("/usr"), PathBuf::from("/bin")]
        );
    }

    #[test]
    fn repo_profiles_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles");
        let profiles = load_profiles(&dir).unwrap();
        let hermetic = &profiles["hermetic"];
        assert_eq!(hermetic.uid, 65534);
        assert_eq!(hermetic.tmp_size_bytes, 256 << 20);
        assert_eq!(
            hermetic.limits,
            Limits {
                memory_bytes: 2 << 30,
                pids: 512,
                cpu_millicores: 2000
            }
        );
        assert!(hermetic.host_paths.contains(&PathBuf::from("/usr")));
    }

    #[test]
    fn load_drops_host_paths_missing_on_this_host() {
        let dir = tempfile::TempDir::new().unwrap();
        let text = GOOD.replace("\"/bin\"", "\"/kiln-not-on-this-host\"");
        std::fs::write(dir.path().join("p.toml"), text).unwrap();
        std::fs::write(dir.path().join("notes.md"), "ignored").unwrap();
        let profiles = load_profiles(dir.path()).unwrap();
        assert_eq!(profiles.keys().collect::<Vec<_>>(), ["p"]);
        assert_eq!(profiles["p"].host_paths, vec![PathBuf::from("/usr")]);
    }

    #[test]
    fn unknown_field_names_file_line_column() {
        let text = format!("{GOOD}network = true\n");
        let err = parse_profile(Path::new("p/x.toml"), &text).unwrap_err();
        let shown = err.to_string();
        assert!(shown.starts_with("p/x.toml:17:1: "), "{shown}");
        assert!(shown.contains("network"), "{shown}");
    }

    #[test]
    fn userns_section_is_parsed_and_checked() {
        let section = "\n[userns]\nhost_uid = 100000\nhost_gid = 200000\ncount = 65536\n";
        let profile = parse_profile(Path::new("x.toml"), &format!("{GOOD}{section}")).unwrap();
        let userns = profile.userns.unwrap();
        assert_eq!(
            (userns.host_uid, userns.host_gid, userns.count),
            (100_000, 200_000, 65536)
        );
        assert_eq!(profile.host_ids(), (165_534, 265_534));
        assert_eq!(profile.confinement(&[]).userns, Some(userns));
        assert_eq!(
            parse_profile(Path::new("x.toml"), GOOD).unwrap().userns,
            None
        );
        for (bad, message) in [
            (
                "count = 65536",
                "count = 65534",
                "uid 65534 is outside the mapped range 0..65534",
            ),
            ("host_uid = 100000", "host_uid = 0", "must not be 0"),
            ("count = 65536", "count = 0", "count must be at least 1"),
            (
                "host_gid = 200000",
                "host_gid = 4294967000",
                "goes past the largest id",
            ),
        ]
        .map(|(from, to, message)| (section.replace(from, to), message))
        {
            let err = parse_profile(Path::new("x.toml"), &format!("{GOOD}{bad}")).unwrap_err();
            let text = err.to_string();
            assert!(
                text.starts_with("x.toml:") && text.contains("userns"),
                "{text}"
            );
            assert!(text.contains(message), "{text}");
        }
        let typo = section.replace("count", "cout");
        assert!(parse_profile(Path::new("x.toml"), &format!("{GOOD}{typo}")).is_err());
    }

    #[test]
    fn invalid_values_are_located() {
        let text = GOOD.replace("\"256MiB\"", "\"256MB\"");
        let err = parse_profile(Path::new("x.toml"), &text).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("x.toml:7:12: tmp_size: unknown size unit"),
            "{err}"
        );
        let text = GOOD.replace("\"/bin\"", "\"/usr/local\"");
        let err = parse_profile(Path::new("x.toml"), &text).unwrap_err();
        assert!(err.to_string().contains("nests with"), "{err}");
        let text = GOOD.replace("uid = 65534", "uid = 0");
        let err = parse_profile(Path::new("x.toml"), &text).unwrap_err();
        assert!(err.to_string().starts_with("x.toml:5:7: uid:"), "{err}");
    }

    #[test]
    fn limits_section() {
        let profile = parse_profile(Path::new("t.toml"), GOOD).unwrap();
        assert_eq!(profile.limits, Limits::default(), "[limits] is optional");
        let text = format!("{GOOD}[limits]\nmemory = \"64MiB\"\npids = 64\ncpu = 0.5\n");
        let profile = parse_profile(Path::new("t.toml"), &text).unwrap();
        assert_eq!(
            profile.limits,
            Limits {
                memory_bytes: 64 << 20,
                pids: 64,
                cpu_millicores: 500
            }
        );
        let text = format!("{GOOD}[limits]\ncpu = 2\n");
        let profile = parse_profile(Path::new("t.toml"), &text).unwrap();
        assert_eq!(profile.limits.cpu_millicores, 2000, "integer cores");
        assert_eq!(profile.workspace_size_bytes, None, "uncapped unless set");
        let text = format!("{GOOD}[limits]\nworkspace_size = \"1GiB\"\n");
        let profile = parse_profile(Path::new("t.toml"), &text).unwrap();
        assert_eq!(profile.workspace_size_bytes, Some(1 << 30));
        for (limits, expected) in [
            (
                "workspace_size = \"4KiB\"",
                "x.toml:18:18: limits.workspace_size: \"4KiB\" is below the minimum of 1 MiB",
            ),
            (
                "memory = \"1MiB\"",
                "x.toml:18:10: limits.memory: \"1MiB\" is below the minimum of 16 MiB",
            ),
            (
                "pids = 2",
                "x.toml:18:8: limits.pids: 2 is outside 8..=4194304",
            ),
            ("cpu = 0.0", "x.toml:18:7: limits.cpu: 0 cores is outside"),
            ("swap = 1", "x.toml:18:1: "),
        ] {
            let text = format!("{GOOD}[limits]\n{limits}\n");
            let err = parse_profile(Path::new("x.toml"), &text).unwrap_err();
            assert!(err.to_string().starts_with(expected), "{err}");
        }
    }

    #[test]
    fn unknown_syscall_names_file_line_column() {
        let text = GOOD.replace("\"clone\"]", "\"clone\", \"kiln_nope\"]");
        let err = parse_profile(Path::new("p/x.toml"), &text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "p/x.toml:10:60: seccomp.allow: unknown syscall \"kiln_nope\""
        );
        // And kilnd's loader refuses the directory (kilnd then refuses to start).
        let dir = tempfile::TempDir::new().unwrap();
        std::fs::write(dir.path().join("bad.toml"), &text).unwrap();
        let err = load_profiles(dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains("bad.toml:10:60: seccomp.allow: unknown syscall"),
            "{err}"
        );
    }

    #[test]
    fn seccomp_section_is_checked() {
        for (from, to, expected) in [
            (
                "\"clone\"]",
                "\"clone\", \"unshare\"]",
                "10:60: seccomp.allow: \"unshare\" is always denied",
            ),
            (
                "\"clone\"]",
                "\"clone\", \"mount\"]",
                "10:60: seccomp.allow: \"mount\" is always denied",
            ),
            (
                "\"clone\"]",
                "\"clone\", \"clone3\"]",
                "10:60: seccomp.allow: \"clone3\" always fails with ENOSYS",
            ),
            (
                "\"clone\"]",
                "\"clone\", \"read\"]",
                "10:60: seccomp.allow: \"read\" is listed twice",
            ),
            (
                "\"execve\", ",
                "",
                "10:9: seccomp.allow: must allow \"execve\"",
            ),
            (
                "\"EPERM\"",
                "\"EIO\"",
                "9:9: seccomp.errno: unknown errno \"EIO\"",
            ),
            (
                "nofile = 1024",
                "nofile = 3",
                "13:10: rlimits.nofile: 3 is outside",
            ),
            (
                "fsize = \"1GiB\"",
                "fsize = \"1GB\"",
                "14:9: rlimits.fsize: unknown size unit",
            ),
            (
                "[\"/tmp\"]",
                "[\"tmp\"]",
                "16:15: landlock.read_write: tmp must be absolute",
            ),
        ] {
            let text = GOOD.replace(from, to);
            assert_ne!(text, GOOD, "{from}");
            let err = parse_profile(Path::new("x.toml"), &text).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("x.toml:{expected}")),
                "{err}"
            );
        }
    }

    #[test]
    fn compiled_filter_is_cached_in_the_profile_below_the_cap() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles");
        let profiles = load_profiles(&dir).unwrap();
        for name in ["hermetic", "fetch", "test"] {
            let profile = &profiles[name];
            let instructions = profile.seccomp.instructions();
            assert!(
                instructions > 100 && instructions <= seccomp::MAX_INSTRUCTIONS,
                "{name}: {instructions} instructions"
            );
            assert_eq!(profile.rlimits.core_bytes, 0, "{name}");
            assert!(profile.landlock.is_some(), "{name}: landlock on by default");
        }
        let hermetic = &profiles["hermetic"];
        assert_eq!(
            hermetic.rlimits,
            Rlimits {
                core_bytes: 0,
                nofile: 4096,
                fsize_bytes: 16 << 30
            }
        );
        // Profiles are cloned per step: the program is shared, not copied.
        let clone = hermetic.clone();
        assert!(std::ptr::eq(
            clone.seccomp.as_bytes().as_ptr(),
            hermetic.seccomp.as_bytes().as_ptr()
        ));
    }

    #[test]
    fn confinement_follows_profile_and_workspaces() {
        let profile = parse_profile(Path::new("t.toml"), GOOD).unwrap();
        let workspaces = [
            WorkspaceMount {
                name: "src".into(),
                host_path: "/var/lib/kiln/ws/src".into(),
                access: Access::ReadOnly,
            },
            WorkspaceMount {
                name: "out".into(),
                host_path: "/var/lib/kiln/ws/out".into(),
                access: Access::ReadWrite,
            },
        ];
        let confinement = profile.confinement(&workspaces);
        assert_eq!(confinement.seccomp, profile.seccomp);
        let rules: Vec<(String, LandlockAccess)> = confinement
            .landlock
            .unwrap()
            .rules
            .into_iter()
            .map(|rule| (rule.path.display().to_string(), rule.access))
            .collect();
        assert_eq!(
            rules,
            [
                ("/usr".to_owned(), LandlockAccess::ReadExecute),
                ("/bin".to_owned(), LandlockAccess::ReadExecute),
                ("/tmp".to_owned(), LandlockAccess::ReadWrite),
                ("/workspace/src".to_owned(), LandlockAccess::ReadExecute),
                ("/workspace/out".to_owned(), LandlockAccess::ReadWrite),
            ]
        );
        let text = GOOD.replace("[landlock]\n", "[landlock]\nenabled = false\n");
        let profile = parse_profile(Path::new("t.toml"), &text).unwrap();
        assert_eq!(profile.confinement(&workspaces).landlock, None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert!(parse_size("0MiB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }
}
