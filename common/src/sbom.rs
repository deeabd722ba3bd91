//! The SBOM a publish step attests: CycloneDX 1.5 JSON, carried as the predicate of an in-toto
//! Statement ([`crate::intoto::CYCLONEDX_BOM`]) whose subjects are the published artifacts.
//!
//! Why CycloneDX and not SPDX 2.3: kiln's SBOM describes a build (pinned downloads with their
//! URLs and hashes, source trees with their commits, files the build was seen reading), which
//! CycloneDX expresses with plain components, `hashes`, `externalReferences`, `pedigree.commits`
//! and `properties`; SPDX 2.3 needs a document namespace, SPDXIDs and a relationship per link for
//! the same content, and has no place for a tree digest or an observed read. Both are accepted by
//! the in-toto predicate registry; CycloneDX is also the smaller document to check by eye.
//!
//! Pure data: the daemon gathers the inputs ([`SbomInput`]) and signs the result.

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, TreeEntry};

/// `bomFormat`.
pub const BOM_FORMAT: &str = "CycloneDX";
/// `specVersion`.
pub const SPEC_VERSION: &str = "1.5";
/// Property name: the pipeline step a component comes from.
pub const PROP_STEP: &str = "kiln:step";
/// Property name: a source workspace's tree digest ([`crate::digest::tree_digest`]).
pub const PROP_TREE_DIGEST: &str = "kiln:tree-digest";
/// Property name: where the component was found (`pin`, `fetch-output`, `source`, `observed-read`).
pub const PROP_ORIGIN: &str = "kiln:origin";
/// Property name: the digest the fetch step recorded for a pinned file (equal to the pin when
/// the fetch succeeded).
pub const PROP_RECORDED: &str = "kiln:recorded-sha256";

/// A CycloneDX 1.5 BOM (the subset kiln writes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bom {
    /// [`BOM_FORMAT`].
    pub bom_format: String,
    /// [`SPEC_VERSION`].
    pub spec_version: String,
    /// `urn:uuid:<uuid>`, unique per BOM.
    pub serial_number: String,
    /// Always 1: kiln never revises a BOM.
    pub version: u32,
    /// What the BOM describes and who made it.
    pub metadata: Metadata,
    /// The dependencies and inputs.
    #[serde(default)]
    pub components: Vec<Component>,
}

/// `metadata`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// RFC 3339.
    pub timestamp: String,
    /// The tool that wrote the BOM.
    pub tools: Tools,
    /// The pipeline run; its `components` are the published artifacts.
    pub component: Component,
}

/// `metadata.tools` in the 1.5 object form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tools {
    /// kilnd.
    pub components: Vec<Component>,
}

/// A CycloneDX component.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    /// `application`, `file`, `data`, ...
    #[serde(rename = "type")]
    pub component_type: String,
    /// Unique reference within the BOM.
    #[serde(rename = "bom-ref", default, skip_serializing_if = "Option::is_none")]
    pub bom_ref: Option<String>,
    /// Name (a file's path).
    pub name: String,
    /// Version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Content hashes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hashes: Vec<Hash>,
    /// Download location and the like.
    #[serde(
        rename = "externalReferences",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub external_references: Vec<ExternalReference>,
    /// Commits a source tree comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pedigree: Option<Pedigree>,
    /// kiln properties (`kiln:*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<Property>,
    /// Nested components (the artifacts under `metadata.component`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<Component>,
}

/// A hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hash {
    /// Always `SHA-256`.
    pub alg: String,
    /// Lowercase hex.
    pub content: String,
}

/// An external reference.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalReference {
    /// `distribution` (a download URL) or `vcs`.
    #[serde(rename = "type")]
    pub reference_type: String,
    /// URL.
    pub url: String,
}

/// `pedigree`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pedigree {
    /// Commits.
    pub commits: Vec<Commit>,
}

/// A commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// Commit id.
    pub uid: String,
    /// Repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// A name/value property.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Property {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A file a fetch step was pinned to produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchedDependency {
    /// Fetch step.
    pub step: String,
    /// Path in the fetch step's output workspace.
    pub path: String,
    /// The pin (or, for an unpinned output, the recorded digest).
    pub sha256: Digest,
    /// Download URL from the pin.
    pub url: Option<String>,
    /// Digest the fetch step's provenance recorded for the path, if it ran.
    pub recorded: Option<Digest>,
    /// True for a pin from the pipeline, false for an output the pipeline did not pin by path
    /// (a lockfile-pinned package).
    pub pinned: bool,
}

/// A source workspace of the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceInput {
    /// Workspace name.
    pub workspace: String,
    /// Tree digest.
    pub tree_digest: Digest,
    /// The git repository and commit, when a source step ingested it from git.
    pub git: Option<(String, String)>,
    /// The tarball and its pin, when a source step ingested one.
    pub tarball: Option<(String, Digest)>,
}

/// A file a step was observed reading (from its runtime trace).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedMaterial {
    /// Step.
    pub step: String,
    /// Path as the sandbox saw it.
    pub path: String,
}

/// Everything the SBOM is made from.
#[derive(Clone, Debug, Default)]
pub struct SbomInput {
    /// `urn:uuid:...`.
    pub serial_number: String,
    /// RFC 3339.
    pub timestamp: String,
    /// kilnd's version.
    pub tool_version: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Job id (the run's version).
    pub job_id: String,
    /// The published artifacts (the statement's subjects).
    pub artifacts: Vec<TreeEntry>,
    /// Pinned and fetched dependencies.
    pub fetched: Vec<FetchedDependency>,
    /// Source workspaces.
    pub sources: Vec<SourceInput>,
    /// Observed reads.
    pub materials: Vec<ObservedMaterial>,
}

fn sha256(d: &Digest) -> Vec<Hash> {
    vec![Hash {
        alg: "SHA-256".into(),
        content: d.hex(),
    }]
}

fn prop(name: &str, value: impl Into<String>) -> Property {
    Property {
        name: name.into(),
        value: value.into(),
    }
}

fn file(bom_ref: String, name: &str) -> Component {
    Component {
        component_type: "file".into(),
        bom_ref: Some(bom_ref),
        name: name.into(),
        version: None,
        hashes: Vec::new(),
        external_references: Vec::new(),
        pedigree: None,
        properties: Vec::new(),
        components: Vec::new(),
    }
}

/// Build the BOM. Components come in a stable order: fetched dependencies, sources, observed
/// materials (each sorted), so the same inputs give the same document but for serial and time.
pub fn cyclonedx(input: &SbomInput) -> Bom {
    let mut components = Vec::new();
    let mut fetched = input.fetched.clone();
    fetched.sort_by(|a, b| (&a.step, &a.path).cmp(&(&b.step, &b.path)));
    for dep in &fetched {
        let mut c = file(format!("fetch:{}/{}", dep.step, dep.path), &dep.path);
        c.hashes = sha256(&dep.sha256);
        if let Some(url) = &dep.url {
            c.external_references.push(ExternalReference {
                reference_type: "distribution".into(),
                url: url.clone(),
            });
        }
        c.properties.push(prop(PROP_STEP, &dep.step));
        c.properties.push(prop(
            PROP_ORIGIN,
            if dep.pinned { "pin" } else { "fetch-output" },
        ));
        if let Some(recorded) = &dep.recorded {
            c.properties.push(prop(PROP_RECORDED, recorded.hex()));
        }
        components.push(c);
    }
    let mut sources = input.sources.clone();
    sources.sort_by(|a, b| a.workspace.cmp(&b.workspace));
    for src in &sources {
        let mut c = file(
            format!("source:{}", src.workspace),
            &format!("workspace:{}", src.workspace),
        );
        c.component_type = "data".into();
        c.properties.push(prop(PROP_ORIGIN, "source"));
        c.properties
            .push(prop(PROP_TREE_DIGEST, src.tree_digest.to_string()));
        if let Some((repo, commit)) = &src.git {
            c.version = Some(commit.clone());
            c.pedigree = Some(Pedigree {
                commits: vec![Commit {
                    uid: commit.clone(),
                    url: Some(repo.clone()),
                }],
            });
        }
        if let Some((path, pin)) = &src.tarball {
            c.hashes = sha256(pin);
            c.properties.push(prop("kiln:tarball", path));
        }
        components.push(c);
    }
    let mut materials = input.materials.clone();
    materials.sort_by(|a, b| (&a.step, &a.path).cmp(&(&b.step, &b.path)));
    materials.dedup();
    for m in &materials {
        let mut c = file(format!("read:{}:{}", m.step, m.path), &m.path);
        c.properties.push(prop(PROP_STEP, &m.step));
        c.properties.push(prop(PROP_ORIGIN, "observed-read"));
        components.push(c);
    }
    let artifacts = input
        .artifacts
        .iter()
        .map(|a| {
            let mut c = file(format!("artifact:{}", a.path), &a.path);
            c.hashes = sha256(&a.digest);
            c
        })
        .collect();
    Bom {
        bom_format: BOM_FORMAT.into(),
        spec_version: SPEC_VERSION.into(),
        serial_number: input.serial_number.clone(),
        version: 1,
        metadata: Metadata {
            timestamp: input.timestamp.clone(),
            tools: Tools {
                components: vec![Component {
                    component_type: "application".into(),
                    bom_ref: None,
                    name: "kilnd".into(),
                    version: Some(input.tool_version.clone()),
                    hashes: Vec::new(),
                    external_references: Vec::new(),
                    pedigree: None,
                    properties: Vec::new(),
                    components: Vec::new(),
                }],
            },
            component: Component {
                component_type: "application".into(),
                bom_ref: Some(format!("job:{}", input.job_id)),
                name: input.pipeline.clone(),
                version: Some(input.job_id.clone()),
                hashes: Vec::new(),
                external_references: Vec::new(),
                pedigree: None,
                properties: Vec::new(),
                components: artifacts,
            },
        },
        components,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bom_has_cyclonedx_field_names_and_every_input() {
        let pin = Digest::of(b"dep");
        let input = SbomInput {
            serial_number: "urn:uuid:0190a0b0-0000-7000-8000-000000000000".into(),
            timestamp: "2026-01-01T00:00:00Z".into(),
            tool_version: "0.1.0".into(),
            pipeline: "hello".into(),
            job_id: "job-1".into(),
            artifacts: vec![TreeEntry {
                path: "hello.tar.gz".into(),
                digest: Digest::of(b"tgz"),
            }],
            fetched: vec![FetchedDependency {
                step: "deps".into(),
                path: "zlib.tar.gz".into(),
                sha256: pin,
                url: Some("https://example.org/zlib.tar.gz".into()),
                recorded: Some(pin),
                pinned: true,
            }],
            sources: vec![SourceInput {
                workspace: "src".into(),
                tree_digest: Digest::of(b"tree"),
                git: Some(("/srv/git/hello".into(), "a".repeat(40))),
                tarball: None,
            }],
            materials: vec![
                ObservedMaterial {
                    step: "compile".into(),
                    path: "/usr/include/stdio.h".into(),
                };
                2
            ],
        };
        let json = serde_json::to_value(cyclonedx(&input)).unwrap();
        assert_eq!(json["bomFormat"], "CycloneDX");
        assert_eq!(json["specVersion"], "1.5");
        assert_eq!(json["version"], 1);
        assert_eq!(json["metadata"]["tools"]["components"][0]["name"], "kilnd");
        let artifact = &json["metadata"]["component"]["components"][0];
        assert_eq!(artifact["hashes"][0]["alg"], "SHA-256");
        assert_eq!(artifact["hashes"][0]["content"], Digest::of(b"tgz").hex());
        let components = json["components"].as_array().unwrap();
        // The duplicated observed read is listed once.
        assert_eq!(components.len(), 3);
        assert_eq!(components[0]["bom-ref"], "fetch:deps/zlib.tar.gz");
        assert_eq!(
            components[0]["externalReferences"][0]["url"],
            "https://example.org/zlib.tar.gz"
        );
        assert_eq!(components[0]["hashes"][0]["content"], pin.hex());
        assert_eq!(
            components[1]["pedigree"]["commits"][0]["uid"],
            "a".repeat(40)
        );
        assert_eq!(components[1]["type"], "data");
        assert_eq!(components[2]["name"], "/usr/include/stdio.h");
        // It round-trips through the types.
        let back: Bom = serde_json::from_value(json).unwrap();
        assert_eq!(back, cyclonedx(&input));
    }
}
