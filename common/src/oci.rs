//! OCI image layout export (`kiln export --oci`) and its validation: plain serde types with the
//! field names of the OCI image spec v1.1 (image-layout, index, manifest, descriptor).
//!
//! The layout holds one image manifest whose layers are the job's artifacts (each annotated with
//! `org.opencontainers.image.title`), and one artifact manifest per attestation whose `subject`
//! is that image manifest (OCI 1.1 referrers): `artifactType =
//! application/vnd.dsse.envelope.v1+json`, one layer holding the envelope. Both use the empty
//! config descriptor, as the spec advises for artifacts. The `oci-spec` crate was not used: it
//! brings derive_builder/getset/strum for the six structs kiln needs.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// `oci-layout` `imageLayoutVersion`.
pub const LAYOUT_VERSION: &str = "1.0.0";
/// Image index media type.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Image manifest media type.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The empty config/blob (`{}`), OCI 1.1.
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// Artifact type of the image manifest holding a job's artifacts.
pub const KILN_ARTIFACTS_TYPE: &str = "application/vnd.kiln.artifacts.v1";
/// Media type of an artifact layer.
pub const LAYER_MEDIA_TYPE: &str = "application/octet-stream";
/// Media type and artifact type of an attestation (a DSSE envelope).
pub const DSSE_MEDIA_TYPE: &str = "application/vnd.dsse.envelope.v1+json";
/// Annotation: file name of a layer.
pub const TITLE: &str = "org.opencontainers.image.title";
/// Annotation: the reference name of a manifest in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Annotation: the in-toto predicate type of an attestation.
pub const PREDICATE_TYPE: &str = "vnd.kiln.predicate-type";

/// The `oci-layout` file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageLayout {
    /// [`LAYOUT_VERSION`].
    pub image_layout_version: String,
}

/// A content descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Artifact type (manifests of artifacts, in an index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Inline data (base64), used for the empty config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// 2.
    pub schema_version: u32,
    /// [`MANIFEST_MEDIA_TYPE`].
    pub media_type: String,
    /// What the manifest is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Config (the empty descriptor).
    pub config: Descriptor,
    /// Layers.
    pub layers: Vec<Descriptor>,
    /// The manifest this one refers to (a referrer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image index (`index.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// 2.
    pub schema_version: u32,
    /// [`INDEX_MEDIA_TYPE`].
    pub media_type: String,
    /// Manifests.
    pub manifests: Vec<Descriptor>,
}

/// Layout writing and validation failures.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// Filesystem error.
    #[error("oci layout {path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file of the layout does not parse.
    #[error("oci layout {path}: invalid JSON: {message}")]
    Json {
        /// Path.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// `oci-layout` names another version.
    #[error("oci-layout imageLayoutVersion must be {LAYOUT_VERSION:?}, got {found:?}")]
    Version {
        /// Version found.
        found: String,
    },
    /// A blob's content does not hash to its file name.
    #[error("blob {name} has content digest {found}: the blob was modified")]
    BlobDigest {
        /// File name (hex).
        name: String,
        /// Digest of its content.
        found: Digest,
    },
    /// A descriptor names a blob the layout lacks, or a malformed digest.
    #[error("{referrer}: descriptor {digest} names no blob of the layout")]
    MissingBlob {
        /// Which descriptor.
        referrer: String,
        /// Digest named.
        digest: String,
    },
    /// A descriptor's size differs from its blob's.
    #[error("{referrer}: descriptor {digest} says {expected} bytes but the blob has {found}")]
    Size {
        /// Which descriptor.
        referrer: String,
        /// Digest.
        digest: String,
        /// Size in the descriptor.
        expected: u64,
        /// Size of the blob.
        found: u64,
    },
    /// A manifest's `subject` is not a manifest of the layout's index.
    #[error("referrer {manifest} has subject {subject}, which the index does not list")]
    DanglingSubject {
        /// Referrer manifest digest.
        manifest: String,
        /// Its subject.
        subject: String,
    },
    /// A layer without a title annotation.
    #[error("manifest {manifest} layer {digest} has no {TITLE} annotation")]
    Untitled {
        /// Manifest digest.
        manifest: String,
        /// Layer digest.
        digest: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OciError + '_ {
    move |source| OciError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The empty config descriptor (`{}`, inline).
pub fn empty_descriptor() -> Descriptor {
    Descriptor {
        media_type: EMPTY_MEDIA_TYPE.into(),
        digest: Digest::of(b"{}").to_string(),
        size: 2,
        artifact_type: None,
        data: Some("e30=".into()),
        annotations: BTreeMap::new(),
    }
}

/// An attestation to attach as a referrer.
#[derive(Clone, Debug)]
pub struct Attachment {
    /// File name (title annotation), e.g. `package.sbom.dsse.json`.
    pub title: String,
    /// Artifact type / layer media type (DSSE envelopes: [`DSSE_MEDIA_TYPE`]).
    pub media_type: String,
    /// Predicate type, when known.
    pub predicate_type: Option<String>,
    /// Exact bytes.
    pub bytes: Vec<u8>,
}

/// What [`write_layout`] wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LayoutSummary {
    /// The image manifest's digest.
    pub manifest: String,
    /// Referrer manifest digests.
    pub referrers: Vec<String>,
    /// Number of blobs.
    pub blobs: usize,
}

struct BlobWriter {
    dir: PathBuf,
    written: BTreeSet<String>,
}

impl BlobWriter {
    fn put(&mut self, bytes: &[u8]) -> Result<(String, u64), OciError> {
        let digest = Digest::of(bytes);
        let path = self.dir.join(digest.hex());
        if self.written.insert(digest.hex()) && !path.exists() {
            let mut f = std::fs::File::create(&path).map_err(io_err(&path))?;
            f.write_all(bytes).map_err(io_err(&path))?;
            f.sync_all().map_err(io_err(&path))?;
        }
        Ok((digest.to_string(), bytes.len() as u64))
    }

    fn put_json<T: Serialize>(&mut self, value: &T) -> Result<(String, u64), OciError> {
        let bytes = serde_json::to_vec(value).map_err(|e| OciError::Json {
            path: self.dir.clone(),
            message: e.to_string(),
        })?;
        self.put(&bytes)
    }
}

/// Write an OCI image layout into `dir` (created): the artifacts (name, file) as layers of one
/// image manifest named `ref_name`, each attachment as a referrer of it.
pub fn write_layout(
    dir: &Path,
    ref_name: &str,
    artifacts: &[(String, PathBuf)],
    attachments: &[Attachment],
) -> Result<LayoutSummary, OciError> {
    let blobs = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
    let mut writer = BlobWriter {
        dir: blobs,
        written: BTreeSet::new(),
    };
    let mut layers = Vec::new();
    for (title, path) in artifacts {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let (digest, size) = writer.put(&bytes)?;
        layers.push(Descriptor {
            media_type: LAYER_MEDIA_TYPE.into(),
            digest,
            size,
            artifact_type: None,
            data: None,
            annotations: BTreeMap::from([(TITLE.to_owned(), title.clone())]),
        });
    }
    let manifest = Manifest {
        schema_version: 2,
        media_type: MANIFEST_MEDIA_TYPE.into(),
        artifact_type: Some(KILN_ARTIFACTS_TYPE.into()),
        config: empty_descriptor(),
        layers,
        subject: None,
        annotations: BTreeMap::new(),
    };
    let (digest, size) = writer.put_json(&manifest)?;
    let subject = Descriptor {
        media_type: MANIFEST_MEDIA_TYPE.into(),
        digest: digest.clone(),
        size,
        artifact_type: Some(KILN_ARTIFACTS_TYPE.into()),
        data: None,
        annotations: BTreeMap::new(),
    };
    let mut index = vec![Descriptor {
        annotations: BTreeMap::from([(REF_NAME.to_owned(), ref_name.to_owned())]),
        ..subject.clone()
    }];
    let mut referrers = Vec::new();
    for a in attachments {
        let (layer_digest, layer_size) = writer.put(&a.bytes)?;
        let mut annotations = BTreeMap::from([(TITLE.to_owned(), a.title.clone())]);
        if let Some(p) = &a.predicate_type {
            annotations.insert(PREDICATE_TYPE.to_owned(), p.clone());
        }
        let referrer = Manifest {
            schema_version: 2,
            media_type: MANIFEST_MEDIA_TYPE.into(),
            artifact_type: Some(a.media_type.clone()),
            config: empty_descriptor(),
            layers: vec![Descriptor {
                media_type: a.media_type.clone(),
                digest: layer_digest,
                size: layer_size,
                artifact_type: None,
                data: None,
                annotations: BTreeMap::from([(TITLE.to_owned(), a.title.clone())]),
            }],
            subject: Some(subject.clone()),
            annotations: annotations.clone(),
        };
        let (d, s) = writer.put_json(&referrer)?;
        referrers.push(d.clone());
        index.push(Descriptor {
            media_type: MANIFEST_MEDIA_TYPE.into(),
            digest: d,
            size: s,
            artifact_type: Some(a.media_type.clone()),
            data: None,
            annotations,
        });
    }
    // The empty config is inline, but a blob too: tools that ignore `data` fetch it.
    writer.put(b"{}")?;
    let index = Index {
        schema_version: 2,
        media_type: INDEX_MEDIA_TYPE.into(),
        manifests: index,
    };
    write_json(&dir.join("index.json"), &index)?;
    write_json(
        &dir.join("oci-layout"),
        &ImageLayout {
            image_layout_version: LAYOUT_VERSION.into(),
        },
    )?;
    Ok(LayoutSummary {
        manifest: digest,
        referrers,
        blobs: writer.written.len(),
    })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), OciError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| OciError::Json {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    std::fs::write(path, bytes).map_err(io_err(path))
}

/// What [`validate_layout`] checked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LayoutReport {
    /// Blobs whose content hashes to their name.
    pub blobs: usize,
    /// Manifests listed by the index.
    pub manifests: usize,
    /// Manifests with a `subject`.
    pub referrers: usize,
    /// Layers (with a title) of the non-referrer manifests: title → digest.
    pub artifacts: BTreeMap<String, String>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, OciError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&bytes).map_err(|e| OciError::Json {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Validate an OCI image layout: the version file, every blob's content against its name, and
/// every descriptor (index → manifests → config, layers, subject) against the blob it names.
pub fn validate_layout(dir: &Path) -> Result<LayoutReport, OciError> {
    let layout: ImageLayout = read_json(&dir.join("oci-layout"))?;
    if layout.image_layout_version != LAYOUT_VERSION {
        return Err(OciError::Version {
            found: layout.image_layout_version,
        });
    }
    let blob_dir = dir.join("blobs").join("sha256");
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    for entry in std::fs::read_dir(&blob_dir).map_err(io_err(&blob_dir))? {
        let entry = entry.map_err(io_err(&blob_dir))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let file = std::fs::File::open(&path).map_err(io_err(&path))?;
        let found = Digest::of_reader(file).map_err(io_err(&path))?;
        if found.hex() != name {
            return Err(OciError::BlobDigest { name, found });
        }
        let size = entry.metadata().map_err(io_err(&path))?.len();
        sizes.insert(format!("sha256:{name}"), size);
    }
    let check = |referrer: &str, d: &Descriptor| -> Result<PathBuf, OciError> {
        let Some(&size) = sizes.get(&d.digest) else {
            return Err(OciError::MissingBlob {
                referrer: referrer.to_owned(),
                digest: d.digest.clone(),
            });
        };
        if size != d.size {
            return Err(OciError::Size {
                referrer: referrer.to_owned(),
                digest: d.digest.clone(),
                expected: d.size,
                found: size,
            });
        }
        Ok(blob_dir.join(d.digest.trim_start_matches("sha256:")))
    };
    let index: Index = read_json(&dir.join("index.json"))?;
    let listed: BTreeSet<&str> = index.manifests.iter().map(|d| d.digest.as_str()).collect();
    let mut report = LayoutReport {
        blobs: sizes.len(),
        ..LayoutReport::default()
    };
    for desc in &index.manifests {
        let path = check("index.json", desc)?;
        let manifest: Manifest = read_json(&path)?;
        let name = format!("manifest {}", desc.digest);
        check(&name, &manifest.config)?;
        for layer in &manifest.layers {
            check(&name, layer)?;
            let Some(title) = layer.annotations.get(TITLE) else {
                return Err(OciError::Untitled {
                    manifest: desc.digest.clone(),
                    digest: layer.digest.clone(),
                });
            };
            if manifest.subject.is_none() {
                report.artifacts.insert(title.clone(), layer.digest.clone());
            }
        }
        if let Some(subject) = &manifest.subject {
            check(&name, subject)?;
            if !listed.contains(subject.digest.as_str()) {
                return Err(OciError::DanglingSubject {
                    manifest: desc.digest.clone(),
                    subject: subject.digest.clone(),
                });
            }
            report.referrers += 1;
        }
        report.manifests += 1;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> (tempfile::TempDir, PathBuf, LayoutSummary) {
        let dir = tempfile::tempdir().unwrap();
        let art = dir.path().join("hello.tar.gz");
        std::fs::write(&art, b"tarball").unwrap();
        let out = dir.path().join("oci");
        let summary = write_layout(
            &out,
            "job-1",
            &[("hello.tar.gz".into(), art)],
            &[Attachment {
                title: "package.sbom.dsse.json".into(),
                media_type: DSSE_MEDIA_TYPE.into(),
                predicate_type: Some("https://cyclonedx.org/bom".into()),
                bytes: b"{\"payload\":\"\"}".to_vec(),
            }],
        )
        .unwrap();
        (dir, out, summary)
    }

    #[test]
    fn written_layout_validates_and_names_its_parts() {
        let (_dir, out, summary) = layout();
        let report = validate_layout(&out).unwrap();
        assert_eq!((report.manifests, report.referrers), (2, 1));
        // artifact, manifest, envelope, referrer manifest, empty config
        assert_eq!(report.blobs, 5);
        assert_eq!(
            report.artifacts["hello.tar.gz"],
            Digest::of(b"tarball").to_string()
        );
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
        assert_eq!(index["schemaVersion"], 2);
        assert_eq!(index["manifests"][0]["annotations"][REF_NAME], "job-1");
        let referrer: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                out.join("blobs/sha256")
                    .join(summary.referrers[0].trim_start_matches("sha256:")),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(referrer["artifactType"], DSSE_MEDIA_TYPE);
        assert_eq!(referrer["subject"]["digest"], summary.manifest);
        assert_eq!(referrer["config"]["mediaType"], EMPTY_MEDIA_TYPE);
    }

    #[test]
    fn tampering_is_caught() {
        // A modified blob.
        let (_dir, out, _) = layout();
        let blob = out.join("blobs/sha256").join(Digest::of(b"tarball").hex());
        std::fs::write(&blob, b"tarbalL").unwrap();
        assert!(matches!(
            validate_layout(&out),
            Err(OciError::BlobDigest { .. })
        ));
        // A descriptor with the wrong size.
        let (_dir, out, _) = layout();
        let path = out.join("index.json");
        let mut index: Index = read_json(&path).unwrap();
        index.manifests[0].size += 1;
        std::fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
        let err = validate_layout(&out).unwrap_err();
        assert!(matches!(err, OciError::Size { .. }), "{err}");
        // A missing blob.
        let (_dir, out, _) = layout();
        std::fs::remove_file(out.join("blobs/sha256").join(Digest::of(b"tarball").hex())).unwrap();
        assert!(matches!(
            validate_layout(&out),
            Err(OciError::MissingBlob { .. })
        ));
    }
}
