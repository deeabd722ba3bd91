//! Shared by the daemon's privileged integration tests (`mod support;` in each test crate).

#![allow(dead_code, reason = "each test crate uses a subset of these helpers")]
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failed setup is a failed test"
)]

/// True if the tests can run as root; prints why not outside CI, fails under `CI=true`.
pub fn have_root(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what} tests need root (namespaces, mounts) and CI=true forbids skipping"
    );
    eprintln!("SKIPPED: {what} tests need root (namespaces, mounts); run as root");
    false
}

/// Host processes whose command line contains `marker`.
pub fn host_processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(marker) {
                found.push(format!(
                    "{}: {cmdline}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    found
}
