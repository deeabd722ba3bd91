//! Sandbox profiles: the reviewed, declarative environment of a step (`profiles/*.toml`, one file
//! per profile, the file stem is its name). kilnd turns a profile plus a step into a
//! [`SandboxSpec`](super::SandboxSpec).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

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
}

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
    let tmp_size_bytes = parse_size(raw.tmp_size.get_ref())
        .map_err(|message| invalid(raw.tmp_size.span(), "tmp_size", message))?;
    Ok(Profile {
        description: raw.description,
        host_paths,
        path_env: raw.path_env.into_inner(),
        uid: raw.uid.into_inner(),
        gid: raw.gid.into_inner(),
        tmp_size_bytes,
    })
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
        assert!(shown.starts_with("p/x.toml:8:1: "), "{shown}");
        assert!(shown.contains("network"), "{shown}");
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
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert!(parse_size("0MiB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }
}
