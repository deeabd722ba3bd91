//! Pinned build environments (issue 3): `kiln image import` through a real kilnd, a step that runs
//! on the image and nothing of the host, the image digest in the step's provenance, hostile image
//! tars refused by entry name, unknown images refused at submit, and a corrupted image blob that
//! stops the step instead of being used.
//!
//! Run: `cargo test -p kiln-e2e --test image` (as root).

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use kiln_e2e::{
    Kilnd, expect_code, follow, pipeline_file, privileged, status, stderr, stdout, submit,
};

/// Copies host `path` into the image at the same place, recreating every symlink on the way
/// (`/lib64 -> usr/lib64`, `/bin/sh -> dash`) so the image resolves it exactly like the host.
fn add_host_path(image: &Path, path: &Path, done: &mut BTreeSet<PathBuf>) {
    if !done.insert(path.to_owned()) {
        return;
    }
    let mut prefix = PathBuf::from("/");
    let components: Vec<Component> = path.components().skip(1).collect();
    for (i, component) in components.iter().enumerate() {
        prefix.push(component);
        let inside = image.join(prefix.strip_prefix("/").unwrap());
        let meta = std::fs::symlink_metadata(&prefix).unwrap();
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&prefix).unwrap();
            if std::fs::symlink_metadata(&inside).is_err() {
                std::os::unix::fs::symlink(&target, &inside).unwrap();
            }
            // Continue with the link resolved, the rest of the path appended.
            let mut resolved = prefix.parent().unwrap().join(&target);
            for rest in &components[i + 1..] {
                resolved.push(rest);
            }
            let resolved = normalize(&resolved);
            add_host_path(image, &resolved, done);
            return;
        }
        if meta.is_dir() {
            std::fs::create_dir_all(&inside).unwrap();
        } else {
            std::fs::copy(&prefix, &inside).unwrap();
        }
    }
}

fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// A tiny root filesystem: `/bin/sh` (dash) and the libraries `ldd` names, and a marker file.
fn build_image_dir(dir: &Path, marker: &str) {
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(dir.join("etc/image-marker"), format!("{marker}\n")).unwrap();
    let mut done = BTreeSet::new();
    add_host_path(dir, Path::new("/bin/sh"), &mut done);
    let ldd = Command::new("ldd").arg("/bin/sh").output().unwrap();
    for line in String::from_utf8(ldd.stdout).unwrap().lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux… (0x…)"
        if let Some(path) = line.split_whitespace().find(|word| word.starts_with('/')) {
            add_host_path(dir, Path::new(path), &mut done);
        }
    }
}

fn import(k: &Kilnd, source: &Path) -> serde_json::Value {
    let o = k.kiln(&["--json", "image", "import", source.to_str().unwrap()]);
    expect_code(&o, 0, "image import");
    serde_json::from_str(&stdout(&o)).unwrap()
}

/// A host file that is not in the image: the step must not see it.
const HOST_ONLY: &str = "/usr/bin/cc";

const SCRIPT: &str = "read m < /etc/image-marker; echo \"$m\" > /workspace/out/seen; \
                      if test -e /usr/bin/cc || test -e /etc/passwd; then exit 7; fi";

fn image_pipeline(dir: &Path, name: &str, digest: &str) -> PathBuf {
    pipeline_file(
        dir,
        &format!("{name}.toml"),
        &format!(
            "version = 1\nname = \"{name}\"\n[workspaces.out]\n[[steps]]\nname = \"make\"\n\
             kind = \"build\"\noutput = \"out\"\nimage = \"{digest}\"\nscript = '{SCRIPT}'\n"
        ),
    )
}

#[test]
fn step_runs_on_its_image_and_provenance_names_it() {
    if !privileged("step_runs_on_its_image_and_provenance_names_it") {
        return;
    }
    assert!(
        Path::new(HOST_ONLY).exists() && Path::new("/etc/passwd").exists(),
        "the test needs {HOST_ONLY} and /etc/passwd on the host to prove the image hides them"
    );
    let k = Kilnd::start("");
    let rootfs = k.dir.path().join("rootfs");
    build_image_dir(&rootfs, "from the image");
    let imported = import(&k, &rootfs);
    let digest = imported["digest"].as_str().unwrap().to_owned();
    assert!(digest.starts_with("sha256:"), "{imported}");
    assert_eq!(imported["existed"], false);
    // Importing the same tree again (here as a tar made by the system tar) gives the same digest.
    let tar_file = k.dir.path().join("rootfs.tar");
    let t = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar_file)
        .arg(".")
        .status()
        .unwrap();
    assert!(t.success());
    let again = import(&k, &tar_file);
    assert_eq!(again["digest"], imported["digest"], "{again}");
    assert_eq!(again["existed"], true);
    let o = k.kiln(&["image", "ls"]);
    expect_code(&o, 0, "image ls");
    assert!(stdout(&o).contains(&digest), "{}", stdout(&o));

    let f = image_pipeline(k.dir.path(), "on-image", &digest);
    let job = submit(&k, &f, &[]);
    let fl = follow(&k, &job);
    expect_code(&fl, 0, "follow image job");

    // The node's copy: root-owned, read-only.
    let hex = digest.trim_start_matches("sha256:");
    let marker = k
        .state()
        .join("images")
        .join(hex)
        .join("root/etc/image-marker");
    let mode = std::fs::metadata(&marker).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o444, "{}", marker.display());

    let out = k.dir.path().join("out");
    let o = k.kiln(&["artifacts", &job, "--out", out.to_str().unwrap()]);
    expect_code(&o, 0, "artifacts");
    assert_eq!(
        std::fs::read_to_string(out.join("seen")).unwrap(),
        "from the image\n"
    );
    let bundle: kiln_common::verify::Bundle =
        serde_json::from_slice(&std::fs::read(out.join("kiln-bundle.json")).unwrap()).unwrap();
    let statement = bundle.steps["make"]
        .decode_statement::<serde_json::Value>()
        .unwrap();
    let definition = &statement.predicate["buildDefinition"];
    assert_eq!(
        definition["internalParameters"]["image"], digest,
        "{definition}"
    );
    let deps = definition["resolvedDependencies"].as_array().unwrap();
    assert!(
        deps.iter()
            .any(|d| d["uri"] == "kiln:image" && d["digest"]["sha256"] == hex),
        "{definition}"
    );

    // A step without the image on the same node does see the host toolchain (the control).
    let f = pipeline_file(
        k.dir.path(),
        "host.toml",
        &format!(
            "version = 1\nname = \"host\"\n[[steps]]\nname = \"look\"\nkind = \"test\"\n\
             script = \"test -e {HOST_ONLY}\"\n"
        ),
    );
    let job = submit(&k, &f, &[]);
    expect_code(&follow(&k, &job), 0, "host toolchain control");
}

#[test]
fn unknown_image_is_refused_at_submit() {
    if !privileged("unknown_image_is_refused_at_submit") {
        return;
    }
    let k = Kilnd::start("");
    let missing = format!("sha256:{}", "ab".repeat(32));
    let f = image_pipeline(k.dir.path(), "missing", &missing);
    let o = k.kiln(&["submit", f.to_str().unwrap()]);
    expect_code(&o, 2, "submit with an unknown image");
    let err = stderr(&o);
    assert!(
        err.contains("step \"make\"") && err.contains(&missing) && err.contains("not on this node"),
        "{err}"
    );
    let jobs = k.kiln(&["--json", "jobs"]);
    assert_eq!(stdout(&jobs).trim(), "[]", "a refused job was stored");
}

/// One raw ustar header + data, like a hostile tool would write it (no sanitizing library).
fn raw_entry(tar: &mut Vec<u8>, name: &str, kind: u8, link: &str, data: &[u8]) {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    tar.extend_from_slice(&h);
    tar.extend_from_slice(data);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
}

#[test]
fn hostile_image_tars_are_refused_naming_the_entry() {
    if !privileged("hostile_image_tars_are_refused_naming_the_entry") {
        return;
    }
    let k = Kilnd::start("");
    for (name, kind, link, expected) in [
        ("../x", b'0', "", "'..' components are refused"),
        ("usr/../../x", b'0', "", "'..' components are refused"),
        ("/etc/cron.d/evil", b'0', "", "absolute paths are refused"),
        ("dev/sda", b'4', "", "block device nodes are refused"),
        ("dev/mem", b'3', "", "character device nodes are refused"),
        ("fifo", b'6', "", "fifos are refused"),
        (
            "shadow",
            b'1',
            "/etc/shadow",
            "hard links outside the image",
        ),
        (
            "up",
            b'1',
            "../../etc/shadow",
            "hard links outside the image",
        ),
    ] {
        let mut tar = Vec::new();
        raw_entry(&mut tar, "etc/ok", b'0', "", b"fine");
        raw_entry(
            &mut tar,
            name,
            kind,
            link,
            if kind == b'0' { b"x" } else { b"" },
        );
        tar.extend_from_slice(&[0u8; 1024]);
        let file = k.dir.path().join("hostile.tar");
        std::fs::write(&file, &tar).unwrap();
        let o = k.kiln(&["image", "import", file.to_str().unwrap()]);
        expect_code(&o, 2, name);
        let err = stderr(&o);
        assert!(
            err.contains(&format!("entry {name:?}")) && err.contains(expected),
            "{name}: {err}"
        );
    }
    let o = k.kiln(&["--json", "image", "ls"]);
    assert_eq!(stdout(&o).trim(), "[]", "a refused image was indexed");
    // Nothing was materialized or written outside the state dir.
    assert!(!k.state().join("images").exists());
    assert!(!k.dir.path().join("x").exists());
}

#[test]
fn corrupted_image_blob_fails_the_step_before_it_runs() {
    if !privileged("corrupted_image_blob_fails_the_step_before_it_runs") {
        return;
    }
    let k = Kilnd::start("");
    let rootfs = k.dir.path().join("rootfs");
    build_image_dir(&rootfs, "corrupt me");
    let digest = import(&k, &rootfs)["digest"].as_str().unwrap().to_owned();
    // Flip the marker's bytes in the CAS (the image has not been materialized yet).
    let blob_hex = kiln_common::Digest::of(b"corrupt me\n").hex();
    let blob = k
        .state()
        .join("cas/sha256")
        .join(&blob_hex[..2])
        .join(&blob_hex);
    std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&blob, b"corrupt mE\n").unwrap();

    let f = image_pipeline(k.dir.path(), "corrupt", &digest);
    let job = submit(&k, &f, &[]);
    expect_code(&follow(&k, &job), 1, "follow corrupt-image job");
    let st = status(&k, &job);
    let step = &st["steps"][0];
    assert_eq!(step["state"], "failed", "{st}");
    let error = step["error"].as_str().unwrap();
    assert!(
        error.contains(&digest)
            && error.contains("\"etc/image-marker\"")
            && error.contains("corrupted"),
        "{error}"
    );
    // Nothing half-written is left to be used by a later step.
    let images = k.state().join("images");
    let left: Vec<_> = std::fs::read_dir(&images)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn hard_link_trees_are_capped_at_import_and_materialized_once() {
    if !privileged("hard_link_trees_are_capped_at_import_and_materialized_once") {
        return;
    }
    // 64 MiB for the whole tree, every hard link counted in full.
    let k = Kilnd::start("[images]\nmax_total_bytes = 67108864\n");
    let tar_of = |dir: &Path, name: &str| {
        let file = k.dir.path().join(name);
        let o = Command::new("tar")
            .arg("-C")
            .arg(dir)
            .arg("-cf")
            .arg(&file)
            .arg(".")
            .output()
            .unwrap();
        expect_code(&o, 0, "tar");
        file
    };
    let tree = |links: usize| {
        let dir = k.dir.path().join(format!("tree-{links}"));
        build_image_dir(&dir, "linked");
        std::fs::write(dir.join("big"), vec![b'k'; 1 << 20]).unwrap();
        std::fs::create_dir(dir.join("l")).unwrap();
        for i in 0..links {
            std::fs::hard_link(dir.join("big"), dir.join(format!("l/{i}"))).unwrap();
        }
        dir
    };
    // The review's bomb: 1 MiB and 200 links, a ~1 MB tar describing a 201 MiB tree.
    let bomb = tar_of(&tree(200), "bomb.tar");
    assert!(std::fs::metadata(&bomb).unwrap().len() < 4 << 20);
    let o = k.kiln(&["image", "import", bomb.to_str().unwrap()]);
    expect_code(&o, 2, "an image over [images] max_total_bytes");
    let err = stderr(&o);
    assert!(
        err.contains("over the limit of 67108864 bytes ([images] max_total_bytes"),
        "{err}"
    );
    let o = k.kiln(&["--json", "image", "ls"]);
    assert_eq!(stdout(&o).trim(), "[]", "a refused image was indexed");

    // Within the cap: imported, and on the node the 41 names of the content are one inode.
    let ok = tar_of(&tree(40), "linked.tar");
    let digest = import(&k, &ok)["digest"].as_str().unwrap().to_owned();
    let f = pipeline_file(
        k.dir.path(),
        "linked.toml",
        &format!(
            "version = 1\nname = \"linked\"\n[workspaces.out]\n[[steps]]\nname = \"make\"\n\
             kind = \"build\"\noutput = \"out\"\nimage = \"{digest}\"\n\
             script = 'test -s /l/39 && read m < /etc/image-marker && echo \"$m\" > /workspace/out/seen'\n"
        ),
    );
    let job = submit(&k, &f, &[]);
    expect_code(
        &follow(&k, &job),
        0,
        &format!("step on the linked image\n{}", k.log()),
    );
    let hex = digest.strip_prefix("sha256:").unwrap();
    let root = k.state().join("images").join(hex).join("root");
    let big = std::fs::metadata(root.join("big")).unwrap();
    assert_eq!(big.nlink(), 41, "hard links must be materialized as links");
    assert_eq!(
        std::fs::metadata(root.join("l/17")).unwrap().ino(),
        big.ino()
    );
}
