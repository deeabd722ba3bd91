//! Packing a pipeline's source workspaces for upload: a deterministic tar of regular files and
//! directories (sorted names, mtime 0, uid/gid 0, modes 0644/0755), refusing anything else.

use std::path::{Component, Path};

use anyhow::{Context, bail};

/// Tar `dir` for workspace `ws`. Symlinks, devices and other special files are refused so the
/// uploaded tree is exactly what the provenance will describe.
pub fn pack(dir: &Path, ws: &str) -> anyhow::Result<Vec<u8>> {
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("source for workspace {ws:?}: {}", dir.display()))?;
    if !meta.is_dir() {
        bail!(
            "source for workspace {ws:?}: {} is not a directory",
            dir.display()
        );
    }
    let mut builder = tar::Builder::new(Vec::new());
    builder.mode(tar::HeaderMode::Deterministic);
    builder.follow_symlinks(false);
    for entry in walkdir::WalkDir::new(dir)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry = entry.with_context(|| format!("reading source directory {}", dir.display()))?;
        if entry.depth() == 0 {
            continue;
        }
        let rel = entry.path().strip_prefix(dir)?;
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) || rel.to_str().is_none() {
            bail!(
                "source file {} has an unusable name",
                entry.path().display()
            );
        }
        let ft = entry.file_type();
        if ft.is_dir() {
            builder.append_dir(rel, entry.path())?;
        } else if ft.is_file() {
            let mut f = std::fs::File::open(entry.path())
                .with_context(|| format!("reading {}", entry.path().display()))?;
            builder.append_file(rel, &mut f)?;
        } else {
            bail!(
                "source for workspace {ws:?}: {} is a symlink or special file; only regular files and directories are uploaded",
                entry.path().display()
            );
        }
    }
    Ok(builder.into_inner()?)
}

/// What `kiln submit` sends for the source steps of a pipeline: absolute paths of relative git
/// repositories (step → path), and the pinned tarballs to upload (step, file, bytes).
pub struct StepSources {
    /// Step name → absolute repository path (for `SubmitJobRequest::repos`).
    pub repos: std::collections::BTreeMap<String, String>,
    /// Tarballs to upload, checked against their pins already.
    pub tarballs: Vec<(String, std::path::PathBuf, Vec<u8>)>,
}

/// Resolves the `git`/`tarball` keys of source steps against the pipeline file's directory
/// `base`. A tarball whose sha256 differs from its pin is refused here, before any upload.
pub fn step_sources(
    pipeline: &kiln_common::spec::Pipeline,
    base: &Path,
) -> anyhow::Result<StepSources> {
    use kiln_common::spec::SourceSpec;
    let mut out = StepSources {
        repos: std::collections::BTreeMap::new(),
        tarballs: Vec::new(),
    };
    for step in &pipeline.steps {
        match &step.source {
            Some(SourceSpec::Git { repo, .. }) if !repo.starts_with('/') => {
                let path = std::path::absolute(base.join(repo)).with_context(|| {
                    format!("step {:?}: resolving git repo {repo:?}", step.name)
                })?;
                let path = path.to_str().with_context(|| {
                    format!("step {:?}: repository path is not UTF-8", step.name)
                })?;
                out.repos.insert(step.name.clone(), path.to_owned());
            }
            None | Some(SourceSpec::Git { .. }) => {}
            Some(SourceSpec::Tarball { path, sha256 }) => {
                let file = base.join(path);
                let bytes = std::fs::read(&file)
                    .with_context(|| format!("step {:?}: tarball {}", step.name, file.display()))?;
                let found = kiln_common::Digest::of(&bytes);
                if found != *sha256 {
                    bail!(
                        "step {:?}: tarball {} has sha256 {found}, but the pipeline pins {sha256}",
                        step.name,
                        file.display()
                    );
                }
                out.tarballs.push((step.name.clone(), file, bytes));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_refuses_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.c"), "b").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.h"), "a").unwrap();
        let one = pack(dir.path(), "src").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.path().join("b.c"), "b").unwrap(); // new mtime, same content
        assert_eq!(one, pack(dir.path(), "src").unwrap());
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        let err = pack(dir.path(), "src").unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");
    }
}
