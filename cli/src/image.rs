//! `kiln image import DIR|TAR` and `kiln image ls`: pinned build environments (docs/pipeline.md,
//! "Build environment images"). A directory is packed as a tar of regular files, directories and
//! symlinks (kept as symlinks: an image legitimately has `/bin -> usr/bin`); anything else is
//! refused here, naming the file. A tar file is sent as-is: kilnd checks every entry itself.

use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Subcommand;
use hyper::Method;

use crate::client::Client;
use crate::exit;

/// `kiln image …`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import a root filesystem (a directory, or a tar file) into kilnd; prints its digest, which
    /// a pipeline step pins with `image = "sha256:…"`.
    Import {
        /// Directory (its contents become the image root) or tar file.
        source: PathBuf,
    },
    /// List the images on the node.
    Ls,
}

/// Print progress every this many packed bytes.
const PROGRESS_STEP: u64 = 64 << 20;

/// Run an image command.
pub async fn run(cmd: ImageCommand, client: &Client, json: bool) -> anyhow::Result<u8> {
    match cmd {
        ImageCommand::Import { source } => import(client, &source, json).await,
        ImageCommand::Ls => {
            let images: Vec<serde_json::Value> = client.get_json("/v1/images").await?;
            if json {
                crate::commands::print_json(&images)?;
            } else {
                println!(
                    "{:<71} {:>8} {:>8} {:>12} IMPORTED",
                    "IMAGE", "ENTRIES", "FILES", "BYTES"
                );
                for i in images {
                    println!(
                        "{:<71} {:>8} {:>8} {:>12} {}",
                        i["digest"].as_str().unwrap_or("?"),
                        i["entries"],
                        i["files"],
                        i["bytes"],
                        i["imported_at"].as_str().unwrap_or("")
                    );
                }
            }
            Ok(exit::OK)
        }
    }
}

async fn import(client: &Client, source: &Path, json: bool) -> anyhow::Result<u8> {
    let meta = std::fs::metadata(source)
        .map_err(|e| crate::commands::invalid(format!("{}: {e}", source.display())))?;
    let body = if meta.is_dir() {
        pack(source).map_err(|e| crate::commands::invalid(format!("{e:#}")))?
    } else {
        let mut bytes = Vec::new();
        std::fs::File::open(source)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| crate::commands::invalid(format!("{}: {e}", source.display())))?;
        bytes
    };
    eprintln!("kiln: uploading {} to kilnd", human(body.len() as u64));
    let result: serde_json::Value = client
        .send_json(
            Method::POST,
            "/v1/images",
            Some((Bytes::from(body), "application/x-tar")),
        )
        .await?;
    if let Some(stripped) = result["stripped_special_bits"].as_array()
        && !stripped.is_empty()
    {
        eprintln!(
            "kiln: warning: setuid/setgid/sticky bits removed from {} entries (e.g. {})",
            stripped.len(),
            stripped[0]
        );
    }
    if json {
        crate::commands::print_json(&result)?;
    } else {
        let digest = result["digest"].as_str().unwrap_or("?");
        let verb = if result["existed"] == true {
            "already on the node"
        } else {
            "imported"
        };
        println!(
            "{verb}: {digest} ({} entries, {} files, {})",
            result["entries"],
            result["files"],
            human(result["bytes"].as_u64().unwrap_or(0))
        );
        println!("pin it in a step with: image = \"{digest}\"");
    }
    Ok(exit::OK)
}

/// Packs the tree under `dir` (sorted names, mtime 0, owner 0, the files' own modes).
pub fn pack(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut packed = 0u64;
    let mut next_report = PROGRESS_STEP;
    let mut entries = 0u64;
    let progress = std::io::stderr().is_terminal();
    for entry in walkdir::WalkDir::new(dir)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry = entry.with_context(|| format!("reading image directory {}", dir.display()))?;
        if entry.depth() == 0 {
            continue;
        }
        let rel = entry.path().strip_prefix(dir)?;
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) || rel.to_str().is_none() {
            bail!("{} has a name that is not UTF-8", entry.path().display());
        }
        let meta = entry
            .path()
            .symlink_metadata()
            .with_context(|| format!("reading {}", entry.path().display()))?;
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mode(meta.permissions().mode() & 0o7777);
        let ft = meta.file_type();
        if ft.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder.append_data(&mut header, rel, std::io::empty())?;
        } else if ft.is_file() {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.size());
            let f = std::fs::File::open(entry.path())
                .with_context(|| format!("reading {}", entry.path().display()))?;
            builder
                .append_data(&mut header, rel, f)
                .with_context(|| format!("packing {}", entry.path().display()))?;
            packed += meta.size();
        } else if ft.is_symlink() {
            let target = std::fs::read_link(entry.path())
                .with_context(|| format!("reading link {}", entry.path().display()))?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            builder.append_link(&mut header, rel, &target)?;
        } else {
            bail!(
                "{} is a device node, fifo or socket: an image holds only regular files, \
                 directories and symlinks",
                entry.path().display()
            );
        }
        entries += 1;
        if progress && packed >= next_report {
            eprint!("\rkiln: packed {entries} entries, {}", human(packed));
            let _ = std::io::stderr().flush();
            next_report = packed + PROGRESS_STEP;
        }
    }
    if progress && next_report > PROGRESS_STEP {
        eprintln!();
    }
    eprintln!(
        "kiln: packed {entries} entries ({} of files)",
        human(packed)
    );
    Ok(builder.into_inner()?)
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_files_dirs_and_symlinks_but_not_sockets() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("usr/bin")).unwrap();
        std::fs::write(dir.path().join("usr/bin/tool"), "x").unwrap();
        std::os::unix::fs::symlink("usr/bin", dir.path().join("bin")).unwrap();
        let tar = pack(dir.path()).unwrap();
        let mut archive = tar::Archive::new(&tar[..]);
        let names: Vec<(String, tar::EntryType)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().entry_type(),
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                ("bin".to_owned(), tar::EntryType::Symlink),
                ("usr".to_owned(), tar::EntryType::Directory),
                ("usr/bin".to_owned(), tar::EntryType::Directory),
                ("usr/bin/tool".to_owned(), tar::EntryType::Regular),
            ]
        );
        let _socket = std::os::unix::net::UnixListener::bind(dir.path().join("sock")).unwrap();
        let err = pack(dir.path()).unwrap_err().to_string();
        assert!(err.contains("socket") && err.contains("/sock "), "{err}");
    }
}
