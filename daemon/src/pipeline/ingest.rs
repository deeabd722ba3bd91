//! Source ingest (seed Stage 1, "source"): a `kind = "source"` step with `git` or `tarball` runs a
//! command kilnd writes, in the step's ordinary sandbox, so untrusted repository or archive
//! content is only ever parsed by unprivileged code without network.
//!
//! - `git = { repo, commit }`: the repository is bound read-only at [`INGEST_MOUNT`]; `git
//!   read-tree` + `checkout-index` (with a private index in `/tmp`, so the repository is never
//!   written) put the tree of exactly `commit` into the output workspace. The command checks that
//!   `commit` names a commit object (`rev-parse --verify COMMIT^{commit}` must print it back).
//! - `tarball = { path, sha256 }`: the CLI uploaded the file as a blob; the blob with the pinned
//!   digest is hard-linked (or copied) into a scratch directory, re-hashed, bound read-only and
//!   extracted by GNU tar (compression detected by tar) without owners or special permissions.
//!
//! The command's last output line, `kiln-source: commit=… tree=… time=…` (git only), gives the
//! commit's git tree id and commit time; the time becomes `SOURCE_DATE_EPOCH` for the job's later
//! steps. The output tree itself is attested like any step output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_common::Digest;
use kiln_common::intoto::{ResourceDescriptor, SourceIngest};
use kiln_common::spec::{SourceSpec, Step};

use crate::sandbox::{Access, WorkspaceMount};
use crate::store::cas::Cas;

/// Workspace name the repository or archive is mounted under (`/workspace/.kiln-ingest`).
pub const INGEST_MOUNT: &str = ".kiln-ingest";
/// File name of the archive inside [`INGEST_MOUNT`].
const ARCHIVE_NAME: &str = "source.archive";
/// Prefix of the record line the git ingest prints last.
const RECORD_PREFIX: &str = "kiln-source: ";

/// What kilnd runs for a source step.
#[derive(Debug)]
pub struct Ingest {
    /// The command (a `/bin/sh -eu -c` script with the values passed as arguments, never
    /// interpolated into the script text).
    pub argv: Vec<String>,
    /// The repository or the archive's directory, read-only.
    pub mount: WorkspaceMount,
}

/// The absolute repository path of a git source step: `repo` itself when absolute, else the
/// CLI-resolved path from the submit request. Checked at admission.
///
/// # Errors
/// A message naming the step when the path is missing, not absolute or not a git repository.
pub fn resolve_repo(
    step: &Step,
    repo: &str,
    resolved: &BTreeMap<String, String>,
) -> Result<PathBuf, String> {
    let path = if repo.starts_with('/') {
        PathBuf::from(repo)
    } else {
        match resolved.get(&step.name) {
            Some(abs) if abs.starts_with('/') => PathBuf::from(abs),
            Some(abs) => {
                return Err(format!(
                    "step {:?}: resolved repository path {abs:?} is not absolute",
                    step.name
                ));
            }
            None => {
                return Err(format!(
                    "step {:?}: git repo {repo:?} is relative and the client did not resolve it (submit with `kiln submit`, or use an absolute path)",
                    step.name
                ));
            }
        }
    };
    if path
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(format!(
            "step {:?}: repository path {} contains \"..\"",
            step.name,
            path.display()
        ));
    }
    // The path bound into the sandbox is the one checked here, with its symlinks resolved now.
    let path = std::fs::canonicalize(&path).map_err(|e| {
        format!(
            "step {:?}: git repository {}: {e}",
            step.name,
            path.display()
        )
    })?;
    let is_repo = path.join("HEAD").is_file() || path.join(".git").exists();
    if !is_repo {
        return Err(format!(
            "step {:?}: {} is not a git repository (no HEAD or .git)",
            step.name,
            path.display()
        ));
    }
    check_world_readable(&path).map_err(|e| format!("step {:?}: {e}", step.name))?;
    Ok(path)
}

/// The sandbox reads the repository as an unprivileged user through a bind mount, which
/// ignores the permissions of the directories above it. So kilnd (root) ingests only what any
/// local user could read: every ancestor traversable by others, the repository readable and
/// traversable by others. A private checkout (`/home/alice` at 0700) is refused, not bypassed.
fn check_world_readable(repo: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    for dir in repo.ancestors().skip(1) {
        let mode = std::fs::metadata(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .permissions()
            .mode();
        if mode & 0o001 == 0 {
            return Err(format!(
                "git repository {} is inside {}, which other users cannot traverse (mode {:o}); kilnd ingests only repositories any local user could read",
                repo.display(),
                dir.display(),
                mode & 0o7777
            ));
        }
    }
    let mode = std::fs::metadata(repo)
        .map_err(|e| format!("{}: {e}", repo.display()))?
        .permissions()
        .mode();
    if mode & 0o005 != 0o005 {
        return Err(format!(
            "git repository {} is not readable by other users (mode {:o}); kilnd ingests only repositories any local user could read",
            repo.display(),
            mode & 0o7777
        ));
    }
    Ok(())
}

/// Admission checks of one source step: the repository exists, or the pinned archive was
/// uploaded. Returns the repository path for git steps.
///
/// # Errors
/// One message naming the step and the problem.
pub fn admit(
    step: &Step,
    repos: &BTreeMap<String, String>,
    cas: &Cas,
) -> Result<Option<PathBuf>, String> {
    match &step.source {
        None => Ok(None),
        Some(SourceSpec::Git { repo, .. }) => resolve_repo(step, repo, repos).map(Some),
        Some(SourceSpec::Tarball { path, sha256 }) => {
            if cas.contains(sha256) {
                Ok(None)
            } else {
                Err(format!(
                    "step {:?}: tarball {path:?} ({sha256}) was not uploaded; `kiln submit` uploads it, and a file with another digest never matches the pin",
                    step.name
                ))
            }
        }
    }
}

/// The git ingest script; `$1` = repository, `$2` = commit, `$3` = output directory.
///
/// Nothing of the repository's own state may shape the checkout: its config (filters, hooks,
/// fsmonitor), `info/attributes` and `refs/replace` are outside what the commit id pins. So the
/// commit is fetched (`--depth=1`, by id) into a fresh repository in `/tmp`, whose index-pack
/// re-hashes every object it receives, with replace objects off; that repository has no config,
/// hooks, attributes or replacements, so no filter driver exists and nothing of the source
/// repository runs. Its tree is checked out with a private index, then hashed again from the
/// written files into a fresh index: the result must be the commit's tree, or the step fails.
const GIT_SCRIPT: &str = r#"
repo=$1 commit=$2 out=$3
if [ -d "$repo/.git" ]; then repo=$repo/.git; fi
unset GIT_DIR GIT_WORK_TREE GIT_INDEX_FILE GIT_OBJECT_DIRECTORY GIT_ALTERNATE_OBJECT_DIRECTORIES
# The only config is ours, as the global file: git drops `-c` settings for the local upload-pack it
# spawns, a global file reaches it. The repository belongs to another user: safe.directory.
cat > /tmp/kiln-ingest.gitconfig <<'CONFIG'
[safe]
	directory = *
[core]
	hooksPath = /dev/null
	fsmonitor = false
	autocrlf = false
	symlinks = true
[protocol]
	allow = never
[protocol "file"]
	allow = always
CONFIG
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/tmp/kiln-ingest.gitconfig GIT_NO_REPLACE_OBJECTS=1
export GIT_ATTR_NOSYSTEM=1 HOME=/tmp GIT_TERMINAL_PROMPT=0
work=/tmp/kiln-ingest.git
g() { git --git-dir="$work" "$@"; }
git init -q --bare "$work"
g fetch -q --no-tags --no-recurse-submodules --depth=1 "$repo" "$commit" || {
    echo "kiln-source: commit $commit is not in the repository" >&2; exit 1; }
found=$(g rev-parse --verify --quiet "$commit^{commit}") || {
    echo "kiln-source: $commit is not a commit" >&2; exit 1; }
if [ "$found" != "$commit" ]; then
    echo "kiln-source: $commit resolved to $found; give the full commit id" >&2; exit 1
fi
tree=$(g rev-parse --verify "$commit^{tree}")
time=$(g show -s --format=%ct "$commit")
GIT_INDEX_FILE=/tmp/kiln-ingest.index g read-tree "$commit"
GIT_INDEX_FILE=/tmp/kiln-ingest.index g --work-tree="$out" checkout-index --all --force
GIT_INDEX_FILE=/tmp/kiln-verify.index g --work-tree="$out" add --all --force -- "$out"
written=$(GIT_INDEX_FILE=/tmp/kiln-verify.index g write-tree)
if [ "$written" != "$tree" ]; then
    echo "kiln-source: the checked-out files hash to tree $written, not the commit's tree $tree (submodules are not supported)" >&2
    exit 1
fi
rm -rf "$work" /tmp/kiln-ingest.index /tmp/kiln-verify.index /tmp/kiln-ingest.gitconfig
echo "kiln-source: commit=$commit tree=$tree time=$time"
"#;

/// The tar ingest script; `$1` = archive, `$2` = output directory.
const TAR_SCRIPT: &str = r#"
tar --extract --file="$1" --directory="$2" --no-same-owner --no-same-permissions \
    --no-overwrite-dir --delay-directory-restore
echo "kiln-source: extracted $(find "$2" -type f | wc -l) files"
"#;

/// Prepares the command and mount of a source step. `repo` is what [`admit`] returned;
/// `scratch` is a directory of the job's for the archive link; `output` is the output
/// workspace's name.
///
/// # Errors
/// A message when the archive cannot be linked or no longer matches its pin.
pub fn prepare(
    step: &Step,
    repo: Option<&Path>,
    scratch: &Path,
    cas: &Cas,
    output: &str,
) -> Result<Option<Ingest>, String> {
    let out = format!("{}/{output}", kiln_common::spec::WORKSPACE_ROOT);
    let mounted = format!("{}/{INGEST_MOUNT}", kiln_common::spec::WORKSPACE_ROOT);
    let script = |body: &str, args: &[&str]| -> Vec<String> {
        let mut argv: Vec<String> = ["/bin/sh", "-eu", "-c", body, "kiln-ingest"]
            .map(str::to_owned)
            .to_vec();
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        argv
    };
    match &step.source {
        None => Ok(None),
        Some(SourceSpec::Git { commit, .. }) => {
            let Some(repo) = repo else {
                return Err(format!(
                    "step {:?}: repository path was not resolved at admission",
                    step.name
                ));
            };
            Ok(Some(Ingest {
                argv: script(GIT_SCRIPT, &[&mounted, commit, &out]),
                mount: WorkspaceMount {
                    name: INGEST_MOUNT.into(),
                    host_path: repo.to_path_buf(),
                    access: Access::ReadOnly,
                },
            }))
        }
        Some(SourceSpec::Tarball { sha256, .. }) => {
            let dir = scratch.join(format!("ingest-{}", step.name));
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let archive = dir.join(ARCHIVE_NAME);
            let _ = std::fs::remove_file(&archive);
            if std::fs::hard_link(cas.path_of(sha256), &archive).is_err() {
                cas.copy_to(sha256, &archive, 0o444)
                    .map_err(|e| format!("cannot read tarball blob {sha256}: {e}"))?;
            }
            let found = hash_file(&archive)?;
            if found != *sha256 {
                return Err(format!(
                    "step {:?}: tarball blob {sha256} is corrupt on this node (it hashes to {found})",
                    step.name
                ));
            }
            let in_sandbox = format!("{mounted}/{ARCHIVE_NAME}");
            Ok(Some(Ingest {
                argv: script(TAR_SCRIPT, &[&in_sandbox, &out]),
                mount: WorkspaceMount {
                    name: INGEST_MOUNT.into(),
                    host_path: dir,
                    access: Access::ReadOnly,
                },
            }))
        }
    }
}

fn hash_file(path: &Path) -> Result<Digest, String> {
    std::fs::File::open(path)
        .and_then(Digest::of_reader)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// What the provenance records about a finished ingest: the pin, and for git the tree id and
/// commit time the command printed (`None` fields when the log lacks the record line).
pub fn record(step: &Step, repo: Option<&Path>, log: &[u8]) -> Option<SourceIngest> {
    match step.source.as_ref()? {
        SourceSpec::Git { commit, .. } => {
            let text = String::from_utf8_lossy(log);
            let fields: BTreeMap<&str, &str> = text
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix(RECORD_PREFIX).filter(|r| r.contains('=')))
                .map(|r| r.split(' ').filter_map(|kv| kv.split_once('=')).collect())
                .unwrap_or_default();
            // Only a record of this very commit counts (the line is printed after the check).
            let ours = fields.get("commit") == Some(&commit.as_str());
            let tree = fields
                .get("tree")
                .filter(|t| ours && is_hex_id(t))
                .map(|t| (*t).to_owned());
            let commit_time = fields
                .get("time")
                .filter(|_| ours)
                .and_then(|t| t.parse::<u64>().ok());
            Some(SourceIngest::Git {
                repo: repo.map(|p| p.display().to_string()).unwrap_or_default(),
                commit: commit.clone(),
                tree,
                commit_time,
            })
        }
        SourceSpec::Tarball { path, sha256 } => Some(SourceIngest::Tarball {
            path: path.clone(),
            sha256: *sha256,
        }),
    }
}

fn is_hex_id(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The provenance dependency for an ingest: the commit (`gitCommit` digest) or the archive.
pub fn dependency(ingest: &SourceIngest) -> ResourceDescriptor {
    match ingest {
        SourceIngest::Git { repo, commit, .. } => ResourceDescriptor {
            name: Some("source".into()),
            uri: Some(format!("git+file://{repo}@{commit}")),
            digest: BTreeMap::from([("gitCommit".to_owned(), commit.clone())]),
            media_type: None,
        },
        SourceIngest::Tarball { path, sha256 } => ResourceDescriptor {
            name: Some(path.clone()),
            uri: Some(format!("urn:kiln:tarball:{path}")),
            digest: kiln_common::intoto::digest_set(sha256),
            media_type: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn git_step(commit: &str) -> Step {
        let text = format!(
            "version = 1\nname = \"x\"\n[workspaces.src]\n[[steps]]\nname = \"checkout\"\nkind = \"source\"\noutput = \"src\"\ngit = {{ repo = \"/r\", commit = \"{commit}\" }}\n"
        );
        kiln_common::spec::parse(&text, "p.toml").unwrap().steps[0].clone()
    }

    #[test]
    fn record_takes_only_the_line_for_the_pinned_commit() {
        let c = "a".repeat(40);
        let step = git_step(&c);
        let tree = "b".repeat(40);
        let log = format!("noise\nkiln-source: commit={c} tree={tree} time=1700000000\n");
        let Some(SourceIngest::Git {
            tree: t,
            commit_time,
            ..
        }) = record(&step, Some(Path::new("/r")), log.as_bytes())
        else {
            panic!("no record");
        };
        assert_eq!(t.as_deref(), Some(tree.as_str()));
        assert_eq!(commit_time, Some(1_700_000_000));
        // A line naming another commit (e.g. printed by repository content) is not believed.
        let other = format!(
            "kiln-source: commit={} tree={tree} time=5\n",
            "c".repeat(40)
        );
        let Some(SourceIngest::Git {
            tree, commit_time, ..
        }) = record(&step, None, other.as_bytes())
        else {
            panic!("no record");
        };
        assert_eq!((tree, commit_time), (None, None));
    }

    #[test]
    fn relative_repo_needs_the_client_resolution() {
        let mut step = git_step(&"a".repeat(40));
        step.name = "checkout".into();
        let err = resolve_repo(&step, "app.git", &BTreeMap::new()).unwrap_err();
        assert!(err.contains("relative"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let err = resolve_repo(&step, dir.path().to_str().unwrap(), &BTreeMap::new()).unwrap_err();
        assert!(err.contains("not a git repository"), "{err}");
        std::fs::write(dir.path().join("HEAD"), "ref: refs/heads/main\n").unwrap();
        let resolved = BTreeMap::from([(
            "checkout".to_owned(),
            dir.path().to_str().unwrap().to_owned(),
        )]);
        // At 0700 no other user could read it, so neither may a step.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = resolve_repo(&step, "app.git", &resolved).unwrap_err();
        assert!(err.contains("not readable by other users"), "{err}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            resolve_repo(&step, "app.git", &resolved).unwrap(),
            dir.path()
        );
        // A symlink is resolved at admission: the canonical path is what gets mounted.
        let link = dir.path().join("link.git");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        assert_eq!(
            resolve_repo(&step, link.to_str().unwrap(), &BTreeMap::new()).unwrap(),
            dir.path()
        );
        // A readable repository inside a private directory is refused, naming the directory.
        let private = dir.path().join("private");
        let inner = private.join("repo.git");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::write(inner.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = resolve_repo(&step, inner.to_str().unwrap(), &BTreeMap::new()).unwrap_err();
        assert!(
            err.contains(&format!("inside {}", private.display())),
            "{err}"
        );
    }
}
