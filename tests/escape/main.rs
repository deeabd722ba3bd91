//! The escape battery (issue 3): attacks on the build worker, each run as a pipeline step with the
//! `hermetic` profile through a real kilnd and the real `kiln` CLI, each asserting that it was
//! blocked and that the host did not change.
//!
//! # Convention
//! Every attack is a subcommand of one C program, `attacks.c` (compiled on the host by the test,
//! uploaded as the step's read-only `tools` workspace, run as `escape ATTACK NONCE ARGS…`). For
//! every attempt it prints one line:
//!
//! - `BLOCKED: <attempt>: <errno or reason>` — the attempt failed, as it must;
//! - `ESCAPED: <attempt>: <what happened>` — it succeeded: a control is missing;
//! - `PLANTED: <attempt>: <what>` — set up for the host side to judge (links, daemons);
//! - `ERROR: …` — the attack could not even be tried (a bug in the battery).
//!
//! and exits 1 if anything escaped, 2 on an error or without any verdict, else 0. An attack is
//! **blocked** when its step succeeded with exit 0, printed at least one `BLOCKED:` line and no
//! `ESCAPED:` or `ERROR:` line ([`JobRun::assert_blocked`]). Each attempt is built to succeed
//! without the control that stops it (run the binary unconfined to see `ESCAPED:` lines).
//!
//! # Host checks
//! After every job ([`Battery::finish`]): no host process carries the attack's nonce in its command
//! line (nothing survived the step), the host mount table and host name are unchanged and kilnd is
//! alive. kilnd runs in a mount namespace of its own (`[daemon] private_mounts`), where it mounts
//! each step's output workspace tmpfs: the host table must show no mount under kilnd's directory,
//! and kilnd's own table must hold nothing of the finished job and nothing new but the output
//! tmpfs of other jobs still running. A running step's output is reached through
//! `/proc/<kilnd>/root` ([`Battery::wait_for_output`]). Attacks on a host resource check that resource too: a `sleep` running as the step's own
//! uid must survive `kill` and `ptrace`, listeners on 0.0.0.0 and an abstract unix socket must see
//! no connection, planted symlinks must not export host content, kernel knobs keep their values, …
//!
//! # Attacks with a single barrier
//! Tests marked `// needs: seccomp` or `// needs: cgroups` are stopped by that control alone: run
//! against the foundation sandbox (namespaces, mounts, dropped capabilities, no_new_privs, but no
//! filter and no limits) exactly these 11 fail. Their assertions are the real ones; never weaken
//! them to make a build without the control pass.
//!
//! Each test starts its own kilnd (≈20 ms) so a failure names exactly one attack; run one with
//! `cargo test -p kiln-e2e --test escape -- NAME`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod harness;

use std::io::ErrorKind;
use std::net::TcpListener;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixListener};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use harness::{
    Battery, HostVictim, Job, Step, host_external_ipv4, host_processes_with, host_resolver,
    profile_value, size_mib,
};
use kiln_common::Digest;
use kiln_e2e::{bin, expect_code, mount_table, mounts_under, pipeline_file, stdout};

/// Runs a single-step attack and asserts it was blocked.
fn blocked(test: &'static str, attack: &str, args: &[&str]) {
    let Some(b) = Battery::start(test) else {
        return;
    };
    b.run(&Job::attack(attack, args)).assert_blocked("attack");
}

/// A listener that must never see a connection.
fn assert_no_connection(listener: &TcpListener, what: &str) {
    listener.set_nonblocking(true).unwrap();
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("{what}: the host listener accepted a connection from {peer}"),
        Err(e) => panic!("{what}: accept: {e}"),
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .trim()
        .to_owned()
}

fn file_digest(path: &std::path::Path) -> String {
    Digest::of(&std::fs::read(path).unwrap()).to_string()
}

// ---- namespaces ----------------------------------------------------------------------------------

#[test]
fn unshare_user_namespace() {
    // needs: seccomp (deny unshare; CLONE_NEWUSER needs no privilege, so only the filter stops it)
    blocked("unshare_user_namespace", "unshare-user", &[]);
}

#[test]
fn unshare_other_namespaces() {
    blocked("unshare_other_namespaces", "unshare-other", &[]);
}

#[test]
fn clone_new_user_namespace() {
    // needs: seccomp (deny namespace flags on clone)
    blocked("clone_new_user_namespace", "clone-newuser", &[]);
}

#[test]
fn clone3_with_namespace_flags() {
    // needs: seccomp (clone3 -> ENOSYS: its flags live in memory, out of the filter's reach)
    blocked("clone3_with_namespace_flags", "clone3", &[]);
}

#[test]
fn setns_into_pid1_and_kilnd_namespaces() {
    let Some(b) = Battery::start("setns_into_pid1_and_kilnd_namespaces") else {
        return;
    };
    let kilnd = b.kilnd_pid().to_string();
    b.run(&Job::attack("setns", &[&kilnd]))
        .assert_blocked("attack");
}

// ---- mounts --------------------------------------------------------------------------------------

#[test]
fn mount_tricks() {
    // The host mount table is compared before/after by the harness.
    blocked("mount_tricks", "mount", &[]);
}

#[test]
fn umount_tricks() {
    blocked("umount_tricks", "umount", &[]);
}

#[test]
fn pivot_root_and_chroot() {
    blocked("pivot_root_and_chroot", "pivot-chroot", &[]);
}

#[test]
fn new_mount_api() {
    blocked("new_mount_api", "new-mount-api", &[]);
}

// ---- processes -----------------------------------------------------------------------------------

#[test]
fn ptrace_and_process_vm_of_host_processes() {
    let Some(b) = Battery::start("ptrace_and_process_vm_of_host_processes") else {
        return;
    };
    let mut victim = HostVictim::start();
    let (pid, kilnd) = (victim.pid().to_string(), b.kilnd_pid().to_string());
    b.run(&Job::attack("ptrace-host", &[&pid, &kilnd]))
        .assert_blocked("attack");
    assert!(victim.alive(), "the host victim did not survive");
    assert_eq!(
        victim.status_field("TracerPid").as_deref(),
        Some("0"),
        "the host victim is being traced"
    );
}

#[test]
fn ptrace_sibling_in_the_sandbox() {
    // needs: seccomp (deny ptrace and process_vm_*: nothing else stops same-uid tracing, no Yama here)
    blocked("ptrace_sibling_in_the_sandbox", "ptrace-sibling", &[]);
}

#[test]
fn ptrace_sandbox_pid1() {
    blocked("ptrace_sandbox_pid1", "ptrace-pid1", &[]);
}

#[test]
fn kill_host_process() {
    let Some(b) = Battery::start("kill_host_process") else {
        return;
    };
    let mut victim = HostVictim::start();
    let pid = victim.pid().to_string();
    b.run(&Job::attack("kill-host", &[&pid]))
        .assert_blocked("attack");
    assert!(
        victim.alive(),
        "the host process {pid} (uid 65534, like the step) was killed from inside the sandbox"
    );
}

#[test]
fn survive_the_step() {
    // daemonize, setsid, double fork, nohup, subreaper: the harness scans the host /proc for the
    // nonce every survivor carries, after the job has ended.
    let Some(b) = Battery::start("survive_the_step") else {
        return;
    };
    let run = b.run(&Job::attack("survive", &[]));
    run.assert_succeeded("attack");
    let planted = run.lines("attack", "PLANTED:");
    assert!(
        planted.len() >= 6,
        "the survivors were not all started:\n{}",
        run.describe()
    );
    assert!(host_processes_with(&b.nonce).is_empty());
}

// ---- filesystem ----------------------------------------------------------------------------------

#[test]
fn write_read_only_input_workspace() {
    let Some(b) = Battery::start("write_read_only_input_workspace") else {
        return;
    };
    // `made` is produced by an earlier step, so its files belong to the step's uid: only the
    // read-only mount stands between the attack and a write.
    let job = Job::attack("write-input", &["/workspace/made"])
        .before(Step::script(
            "produce",
            &[],
            Some("made"),
            "printf original > /workspace/made/file",
        ))
        .attack_step(|s| s.inputs.push("made".into()))
        .then(Step::script(
            "witness",
            &["made"],
            None,
            "cat /workspace/made/file; echo; ls -A /workspace/made",
        ));
    let run = b.run(&job);
    run.assert_succeeded("produce");
    run.assert_blocked("attack");
    run.assert_succeeded("witness");
    assert_eq!(
        run.log("witness").trim(),
        "original\nfile",
        "the next step sees a changed input workspace:\n{}",
        run.describe()
    );
    assert_eq!(
        run.outputs("produce").get("file").map(String::as_str),
        Some(Digest::of(b"original").to_string().as_str())
    );
}

#[test]
fn write_read_only_root() {
    blocked("write_read_only_root", "write-root", &[]);
}

#[test]
fn symlink_escape_from_output_workspace() {
    let Some(b) = Battery::start("symlink_escape_from_output_workspace") else {
        return;
    };
    let secret = b.temp_path("host-secret.txt");
    let secret_text = format!("host secret {}", b.nonce);
    std::fs::write(&secret, &secret_text).unwrap();
    let state = b.kilnd.state();
    let job = Job::attack("symlink-out", &[secret.to_str().unwrap(), state.to_str().unwrap()])
        .then(Step::script(
            "witness",
            &["out"],
            None,
            // A later step sees the links, but they resolve in its own sandbox.
            "for l in shadow host-secret host-secret-rel state; do \
               if cat /workspace/out/$l >/dev/null 2>&1; then echo \"ESCAPED: read $l\"; exit 1; fi; \
             done; echo 'BLOCKED: links lead nowhere'",
        ));
    let run = b.run(&job);
    run.assert_blocked("attack");
    run.assert_blocked("witness");
    // Only the regular file is attested; each link is reported as not followed.
    let outputs = run.outputs("attack");
    assert_eq!(
        outputs.keys().collect::<Vec<_>>(),
        ["ok.txt"],
        "a symlink was attested as an output:\n{}",
        run.describe()
    );
    for link in ["shadow", "host-secret", "host-secret-rel", "root", "state"] {
        assert!(
            run.log("attack").contains(&format!("symlink {link} -> ")),
            "no 'not attested' note for {link}:\n{}",
            run.describe()
        );
    }
    // The exported artifacts hold no host content and no link.
    let out = b.temp_path("artifacts");
    let o = b.kilnd.kiln(&[
        "artifacts",
        &run.id,
        "--all",
        "--out",
        out.to_str().unwrap(),
    ]);
    expect_code(&o, 0, "artifacts");
    let shadow = std::fs::read("/etc/shadow").unwrap_or_default();
    for entry in walk(&out) {
        let meta = std::fs::symlink_metadata(&entry).unwrap();
        assert!(
            !meta.file_type().is_symlink(),
            "exported a symlink: {}",
            entry.display()
        );
        if meta.is_file() {
            let content = std::fs::read(&entry).unwrap();
            assert!(
                !String::from_utf8_lossy(&content).contains(&secret_text)
                    && (shadow.is_empty() || content != shadow),
                "exported host content in {}",
                entry.display()
            );
        }
    }
}

/// Every path under `dir` (no symlink followed).
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

#[test]
fn hardlink_escape_from_output_workspace() {
    let Some(b) = Battery::start("hardlink_escape_from_output_workspace") else {
        return;
    };
    let host_files = ["/etc/ld.so.cache", "/usr/bin/su"];
    let links_before: Vec<u64> = host_files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().nlink())
        .collect();
    let run = b.run(&Job::attack("hardlink-out", &[]));
    run.assert_blocked("attack");
    let host_digests: Vec<String> = host_files
        .iter()
        .map(|f| file_digest(std::path::Path::new(f)))
        .collect();
    for (path, digest) in run.outputs("attack") {
        assert!(
            !host_digests.contains(&digest),
            "output {path} has a host file's content:\n{}",
            run.describe()
        );
    }
    for (file, before) in host_files.iter().zip(links_before) {
        assert_eq!(
            std::fs::metadata(file).unwrap().nlink(),
            before,
            "{file} got a new link"
        );
    }
}

#[test]
fn dotdot_in_paths() {
    let Some(b) = Battery::start("dotdot_in_paths") else {
        return;
    };
    let secret = b.temp_path("host-secret.txt");
    std::fs::write(&secret, "secret").unwrap();
    let state = b.kilnd.state();
    b.run(&Job::attack(
        "dotdot",
        &[secret.to_str().unwrap(), state.to_str().unwrap()],
    ))
    .assert_blocked("attack");
    // `..` never reaches the sandbox: the CLI and the daemon both refuse it at admission.
    let dir = b.kilnd.dir.path();
    let cases = [
        (
            "workdir.toml",
            "version = 1\nname = \"x\"\n[workspaces.out]\n[[steps]]\nname = \"a\"\nkind = \"build\"\noutput = \"out\"\nworkdir = \"out/../../../etc\"\nrun = [\"true\"]\n",
        ),
        (
            "source.toml",
            "version = 1\nname = \"x\"\n[workspaces.src]\nsource = \"../../../../etc\"\n[[steps]]\nname = \"a\"\nkind = \"build\"\ninputs = [\"src\"]\nrun = [\"true\"]\n",
        ),
        (
            "wsname.toml",
            "version = 1\nname = \"x\"\n[workspaces.\"..\"]\n[[steps]]\nname = \"a\"\nkind = \"build\"\noutput = \"..\"\nrun = [\"true\"]\n",
        ),
    ];
    for (name, text) in cases {
        let file = pipeline_file(dir, name, text);
        let refused = b.kilnd.kiln(&["submit", file.to_str().unwrap()]);
        expect_code(&refused, 2, name);
        let body = serde_json::json!({ "pipeline": text, "file_name": name }).to_string();
        let curl = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--unix-socket",
            ])
            .arg(&b.kilnd.socket)
            .args([
                "-H",
                "content-type: application/json",
                "--data-binary",
                &body,
            ])
            .arg("http://kiln/v1/jobs")
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&curl.stdout),
            "422",
            "{name}: the daemon admitted a pipeline with '..'"
        );
    }
    let jobs = b.kilnd.kiln(&["--json", "jobs"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stdout(&jobs))
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1,
        "only the attack job may have been admitted"
    );
}

#[test]
fn write_into_another_jobs_and_steps_workspaces() {
    let Some(b) = Battery::start("write_into_another_jobs_and_steps_workspaces") else {
        return;
    };
    // The victim: a concurrent job whose step holds its output open until the host releases it.
    let victim = Job {
        name: "victim".into(),
        args: Vec::new(),
        workspaces: vec!["vout".into()],
        steps: vec![Step::script(
            "victim",
            &["tools"],
            Some("vout"),
            "echo original > /workspace/vout/victim.txt; \
             while [ ! -e /workspace/vout/release ]; do sleep 0.02; done; rm -f /workspace/vout/release",
        )],
    };
    let victim_id = b.submit(&victim);
    // Where the victim's output really is while it runs (its tmpfs, in kilnd's mount namespace),
    // and the names it has on the host: the on-disk workspace and the tmpfs's mount point.
    let vout = b.wait_for_output(&victim_id, "victim", "vout", "victim.txt");
    let vout_disk = b.workspace_dir(&victim_id, "vout");
    let job_dir = b.kilnd.state().join("work").join(&victim_id);
    let vout_tmpfs = job_dir.join("outfs/victim/ws");
    let vtools = b.workspace_dir(&victim_id, "tools");
    let root = b.kilnd.state().join("run/root");
    let targets: Vec<&str> = [&vout_disk, &vout_tmpfs, &vtools, &root, &job_dir]
        .iter()
        .map(|p| p.to_str().unwrap())
        .collect();
    // The attacker also has an earlier step's workspace, `made`, that it does not declare.
    let job = Job::attack("other-workspace", &targets).before(Step::script(
        "made",
        &[],
        Some("made"),
        "echo made > /workspace/made/file",
    ));
    let run = b.run(&job);
    run.assert_blocked("attack");
    for dir in [&vout, &vout_disk, &vtools, &job_dir] {
        assert!(!dir.join("pwned").exists(), "{} was written", dir.display());
    }
    assert_eq!(
        run.outputs("made").keys().collect::<Vec<_>>(),
        ["file"],
        "the undeclared workspace was changed:\n{}",
        run.describe()
    );
    std::fs::write(vout.join("release"), "").unwrap();
    let vrun = b.finish(&victim_id);
    vrun.assert_succeeded("victim");
    let outputs = vrun.outputs("victim");
    assert_eq!(
        outputs.keys().collect::<Vec<_>>(),
        ["victim.txt"],
        "the victim's outputs changed:\n{}",
        vrun.describe()
    );
    assert_eq!(outputs["victim.txt"], Digest::of(b"original\n").to_string());
}

#[test]
fn proc_pid1_root_traversal() {
    let Some(b) = Battery::start("proc_pid1_root_traversal") else {
        return;
    };
    let kilnd = b.kilnd_pid().to_string();
    b.run(&Job::attack("proc1-root", &[&kilnd]))
        .assert_blocked("attack");
}

#[test]
fn proc_exe_overwrite() {
    let Some(b) = Battery::start("proc_exe_overwrite") else {
        return;
    };
    let binaries = [bin("kiln-sandbox"), bin("kilnd")];
    let before: Vec<String> = binaries.iter().map(|p| file_digest(p)).collect();
    b.run(&Job::attack("proc-exe", &[]))
        .assert_blocked("attack");
    let after: Vec<String> = binaries.iter().map(|p| file_digest(p)).collect();
    assert_eq!(before, after, "a host binary changed");
}

#[test]
fn read_kilnd_socket_state_and_config() {
    let Some(b) = Battery::start("read_kilnd_socket_state_and_config") else {
        return;
    };
    let (socket, state, config) = (
        b.kilnd.socket.to_str().unwrap().to_owned(),
        b.kilnd.state().to_str().unwrap().to_owned(),
        b.kilnd.config.to_str().unwrap().to_owned(),
    );
    b.run(&Job::attack("kilnd-state", &[&socket, &state, &config]))
        .assert_blocked("attack");
}

// ---- kernel interfaces ---------------------------------------------------------------------------

#[test]
fn proc_sys_writes() {
    let Some(b) = Battery::start("proc_sys_writes") else {
        return;
    };
    // Host values of the knobs the attack goes for (those this kernel has).
    let knobs = [
        "/proc/sys/kernel/core_pattern",
        "/proc/sys/kernel/modprobe",
        "/proc/sys/kernel/panic",
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/user/max_user_namespaces",
        "/proc/sys/kernel/unprivileged_bpf_disabled",
    ];
    let read = || -> Vec<Option<String>> {
        knobs
            .iter()
            .map(|k| std::fs::read_to_string(k).ok())
            .collect()
    };
    let before = read();
    b.run(&Job::attack("proc-sys", &[]))
        .assert_blocked("attack");
    let after = read();
    assert_eq!(before, after, "a host kernel knob changed");
}

#[test]
fn sys_writes() {
    blocked("sys_writes", "sys", &[]);
}

#[test]
fn mknod_device_nodes() {
    let Some(b) = Battery::start("mknod_device_nodes") else {
        return;
    };
    let run = b.run(&Job::attack("mknod", &[]));
    run.assert_blocked("attack");
    assert!(
        run.outputs("attack").is_empty(),
        "device nodes were collected:\n{}",
        run.describe()
    );
}

#[test]
fn dev_nodes_and_tpm() {
    blocked("dev_nodes_and_tpm", "dev-nodes", &[]);
}

#[test]
fn raw_and_packet_sockets() {
    blocked("raw_and_packet_sockets", "raw-sockets", &[]);
}

#[test]
fn connect_host_service_on_loopback() {
    let Some(b) = Battery::start("connect_host_service_on_loopback") else {
        return;
    };
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    b.run(&Job::attack("connect-loopback", &[&port]))
        .assert_blocked("attack");
    assert_no_connection(&listener, "connect_host_service_on_loopback");
}

#[test]
fn connect_host_service_on_external_address() {
    let Some(b) = Battery::start("connect_host_service_on_external_address") else {
        return;
    };
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let udp_port = udp.local_addr().unwrap().port().to_string();
    let ip = host_external_ipv4();
    b.run(&Job::attack("connect-external", &[&ip, &port, &udp_port]))
        .assert_blocked("attack");
    assert_no_connection(&listener, "connect_host_service_on_external_address");
    udp.set_nonblocking(true).unwrap();
    let mut buf = [0_u8; 512];
    assert!(
        udp.recv_from(&mut buf).is_err(),
        "the host UDP socket received a datagram from the sandbox"
    );
}

#[test]
fn connect_host_abstract_unix_socket() {
    let Some(b) = Battery::start("connect_host_abstract_unix_socket") else {
        return;
    };
    let name = format!("kiln-escape-{}", b.nonce);
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = UnixListener::bind_addr(&addr).unwrap();
    b.run(&Job::attack("abstract-unix", &[&name]))
        .assert_blocked("attack");
    listener.set_nonblocking(true).unwrap();
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "the host's abstract unix socket accepted a connection"
    );
}

#[test]
fn dns_resolution() {
    let Some(b) = Battery::start("dns_resolution") else {
        return;
    };
    let resolver = host_resolver();
    b.run(&Job::attack("dns", &[&resolver]))
        .assert_blocked("attack");
}

#[test]
fn bpf_syscall() {
    blocked("bpf_syscall", "bpf", &[]);
}

#[test]
fn perf_event_open() {
    // needs: seccomp (perf_event_paranoid=2 lets any user count its own user-space events)
    blocked("perf_event_open", "perf", &[]);
}

#[test]
fn io_uring() {
    // needs: seccomp (io_uring_disabled=0 here; io_uring bypasses per-syscall filtering)
    blocked("io_uring", "io-uring", &[]);
}

#[test]
fn userfaultfd() {
    // needs: seccomp (UFFD_USER_MODE_ONLY is allowed to every user)
    blocked("userfaultfd", "userfaultfd", &[]);
}

#[test]
fn keyctl_kernel_keyrings() {
    // needs: seccomp (keyrings are not namespaced: uid 65534's user keyring is shared by all steps)
    let Some(b) = Battery::start("keyctl_kernel_keyrings") else {
        return;
    };
    let key_users = || {
        std::fs::read_to_string("/proc/key-users")
            .unwrap()
            .lines()
            .find(|l| l.trim_start().starts_with("65534:"))
            .map(str::to_owned)
    };
    let before = key_users();
    b.run(&Job::attack("keyctl", &[])).assert_blocked("attack");
    assert_eq!(
        key_users(),
        before,
        "uid 65534's kernel keys changed on the host"
    );
}

#[test]
fn open_by_handle_at_shocker() {
    blocked("open_by_handle_at_shocker", "open-by-handle", &[]);
}

#[test]
fn kernel_admin_syscalls() {
    // modules, kexec, reboot, swap, acct, clock, iopl
    blocked("kernel_admin_syscalls", "kernel-admin", &[]);
}

#[test]
fn kernel_log_and_addresses() {
    blocked("kernel_log_and_addresses", "kernel-info", &[]);
}

#[test]
fn tiocsti_terminal_injection() {
    blocked("tiocsti_terminal_injection", "tiocsti", &[]);
}

#[test]
fn change_hostname() {
    let Some(b) = Battery::start("change_hostname") else {
        return;
    };
    let host = read_trimmed("/proc/sys/kernel/hostname");
    b.run(&Job::attack("hostname", &[&host]))
        .assert_blocked("attack");
    assert_eq!(read_trimmed("/proc/sys/kernel/hostname"), host);
}

#[test]
fn host_environment_via_proc() {
    let Some(b) = Battery::start("host_environment_via_proc") else {
        return;
    };
    let pid = b.kilnd_pid();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    let vars: Vec<&str> = environ.split('\0').filter(|v| v.contains('=')).collect();
    let step_env = ["PATH=", "HOME=", "TMPDIR=", "PWD=", "KILN_"];
    let needle = vars
        .iter()
        .find(|v| v.starts_with("CARGO_PKG_NAME="))
        .or_else(|| {
            vars.iter()
                .find(|v| !step_env.iter().any(|p| v.starts_with(p)))
        })
        .unwrap_or_else(|| panic!("kilnd has no host-only environment variable: {vars:?}"));
    let needle: String = needle.chars().take(120).collect();
    b.run(&Job::attack("host-environ", &[&needle, &pid.to_string()]))
        .assert_blocked("attack");
}

#[test]
fn personality_flags() {
    // needs: seccomp (argument filter on personality: allow only the default persona, as Docker does)
    blocked("personality_flags", "personality", &[]);
}

#[test]
fn inherited_file_descriptors() {
    blocked("inherited_file_descriptors", "leaked-fds", &[]);
}

// ---- privileges ----------------------------------------------------------------------------------

#[test]
fn setuid_binaries_in_usr() {
    // su, mount, umount, passwd, newgrp, chsh, gpasswd: the credentials each had when it exited
    blocked("setuid_binaries_in_usr", "setuid-usr", &[]);
}

#[test]
fn setuid_and_file_capability_binaries_planted_by_the_host() {
    let Some(b) = Battery::start("setuid_and_file_capability_binaries_planted_by_the_host") else {
        return;
    };
    let id = b.submit(&Job::attack("setuid-planted", &[]));
    // The step's output workspace as it really is while it runs (its tmpfs in kilnd's mount
    // namespace, reached through /proc/<kilnd>/root).
    let out = b.wait_for_output(&id, "attack", "out", "waiting");
    // Copies of the attack binary, made privileged by root on the host, in the step's own output
    // workspace; run in probe mode they report the credentials they got.
    let tool = b.temp_path("battery/tools/escape");
    for (name, mode) in [
        ("suid-root", 0o4755),
        ("sgid-root", 0o2755),
        ("fcaps", 0o755),
    ] {
        let path = out.join(name);
        std::fs::copy(&tool, &path).unwrap();
        std::os::unix::fs::chown(&path, Some(0), Some(0)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let o = Command::new("setcap")
        .arg("cap_setuid,cap_setgid,cap_dac_override,cap_sys_admin,cap_net_raw+ep")
        .arg(out.join("fcaps"))
        .output()
        .expect("run setcap (apt: libcap2-bin)");
    expect_code(&o, 0, "setcap");
    std::fs::write(out.join("planted"), "").unwrap();
    let run = b.finish(&id);
    run.assert_blocked("attack");
    assert_eq!(
        run.lines("attack", "BLOCKED:").len(),
        3,
        "every planted binary must have run unprivileged:\n{}",
        run.describe()
    );
}

#[test]
fn privilege_regain_syscalls() {
    blocked("privilege_regain_syscalls", "privilege-regain", &[]);
}

// ---- resources -----------------------------------------------------------------------------------

#[test]
fn fork_bomb_is_contained() {
    // needs: cgroups (pids.max; RLIMIT_NPROC from the profile would do too)
    let Some(b) = Battery::start("fork_bomb_is_contained") else {
        return;
    };
    // Twice the profile's pids limit, at least 4096: enough to prove a limit, bounded for the host.
    let limit = profile_value("pids").and_then(|v| v.parse::<u64>().ok());
    let cap = limit.map_or(4096, |l| (l * 2).max(4096)).to_string();
    let run = b.run(&Job::attack("fork-bomb", &[&cap]));
    let escaped = run.lines("attack", "ESCAPED:");
    assert!(
        escaped.is_empty(),
        "NOT BLOCKED: {escaped:?}\n{}",
        run.describe()
    );
    let step = run.step("attack");
    let reported = !run.lines("attack", "BLOCKED:").is_empty()
        || (step["state"] == "failed"
            && step["error"]
                .as_str()
                .is_some_and(|e| e.contains("pid") || e.contains("process")));
    assert!(
        reported,
        "the fork bomb was not stopped by a limit:\n{}",
        run.describe()
    );
    // The host can still fork.
    assert!(Command::new("true").status().unwrap().success());
}

#[test]
fn memory_bomb_is_contained() {
    // needs: cgroups (memory.limit_in_bytes; the step must end with "out of memory")
    let Some(b) = Battery::start("memory_bomb_is_contained") else {
        return;
    };
    let limit = profile_value("memory").and_then(|v| size_mib(&v));
    let cap = limit.map_or(4096, |l| (l + 1024).max(4096)).to_string();
    let run = b.run(&Job::attack("memory-bomb", &[&cap]));
    let escaped = run.lines("attack", "ESCAPED:");
    assert!(
        escaped.is_empty(),
        "NOT BLOCKED: {escaped:?}\n{}",
        run.describe()
    );
    let step = run.step("attack");
    let oom = step["state"] == "failed"
        && step["error"]
            .as_str()
            .is_some_and(|e| e.contains("out of memory"));
    let refused = step["state"] == "succeeded" && !run.lines("attack", "BLOCKED:").is_empty();
    assert!(
        oom || refused,
        "the memory bomb did not end with a clear out-of-memory reason:\n{}",
        run.describe()
    );
}

#[test]
fn tmp_disk_fill_is_limited() {
    let Some(b) = Battery::start("tmp_disk_fill_is_limited") else {
        return;
    };
    let tmp = profile_value("tmp_size")
        .and_then(|v| size_mib(&v))
        .unwrap_or(256);
    let cap = (tmp + 256).to_string();
    let free = || {
        let s = nix::sys::statvfs::statvfs(b.kilnd.dir.path()).unwrap();
        s.blocks_available() * s.fragment_size()
    };
    let before = free();
    let run = b.run(&Job::attack("tmp-fill", &[&cap]));
    run.assert_blocked("attack");
    assert_eq!(
        run.lines("attack", "BLOCKED: fill").len(),
        2,
        "both /tmp and /dev/shm must be limited:\n{}",
        run.describe()
    );
    let after = free();
    assert!(
        after + (64 << 20) >= before,
        "the host filesystem lost {} MiB",
        (before - after) >> 20
    );
}

#[test]
fn battery_helpers_parse_sizes() {
    assert_eq!(size_mib("256MiB"), Some(256));
    assert_eq!(size_mib("2 GiB"), Some(2048));
    assert_eq!(size_mib("2G"), Some(2048));
    assert_eq!(size_mib("1048576"), Some(1));
    assert_eq!(size_mib("lots"), None);
}

#[test]
fn output_workspace_fill_is_capped_off_the_host_disk() {
    let Some(b) = Battery::start("output_workspace_fill_is_capped_off_the_host_disk") else {
        return;
    };
    // On by default (profiles/hermetic.toml); a checkout that turns it off skips here, never in CI.
    let Some(cap) = profile_value("workspace_size").and_then(|v| size_mib(&v)) else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "hermetic.toml does not set [limits] workspace_size, and CI=true forbids skipping"
        );
        eprintln!(
            "SKIP output_workspace_fill_is_capped_off_the_host_disk: hermetic.toml does not set \
             [limits] workspace_size"
        );
        return;
    };
    let free = || {
        let s = nix::sys::statvfs::statvfs(b.kilnd.dir.path()).unwrap();
        s.blocks_available() * s.fragment_size()
    };
    let before = free();
    // Try to write 256 MiB more than the cap into the output workspace.
    let job = Job {
        name: "escape-workspace-fill".into(),
        args: vec![(cap + 256).to_string()],
        workspaces: vec!["out".into()],
        steps: vec![Step::script(
            "attack",
            &[],
            Some("out"),
            "if dd if=/dev/zero of=/workspace/out/fill bs=1M count=$A0 2>/tmp/dd.err; \
             then echo \"ESCAPED: fill: wrote $A0 MiB\"; \
             else echo \"BLOCKED: fill: $(head -n1 /tmp/dd.err)\"; fi",
        )],
    };
    let id = b.submit(&job);
    // Sample the host disk while the step runs: the fill must never land there.
    let mut lowest = before;
    let followed = std::thread::scope(|s| {
        let finish = s.spawn(|| b.finish(&id));
        while !finish.is_finished() {
            lowest = lowest.min(free());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        finish.join().unwrap()
    });
    let step = followed.step("attack");
    assert_eq!(step["state"], "failed", "{}", followed.describe());
    let error = step["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("output workspace full: limit {}", human_mib(cap))),
        "the step must fail with the workspace limit as its reason: {error}\n{}",
        followed.describe()
    );
    assert_eq!(
        followed.lines("attack", "BLOCKED: fill").len(),
        1,
        "{}",
        followed.describe()
    );
    assert!(
        lowest + (64 << 20) >= before,
        "the host filesystem lost {} MiB while the step ran",
        (before - lowest) >> 20
    );
    assert!(free() + (64 << 20) >= before, "the host disk kept the fill");
}

#[test]
fn output_tmpfs_never_appears_in_the_host_mount_namespace() {
    let test = "output_tmpfs_never_appears_in_the_host_mount_namespace";
    let Some(b) = Battery::start(test) else {
        return;
    };
    if profile_value("workspace_size").is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: hermetic.toml does not set [limits] workspace_size, and CI=true forbids skipping"
        );
        eprintln!("SKIP {test}: hermetic.toml does not set [limits] workspace_size");
        return;
    }
    let pid = b.kilnd_pid();
    let state = b.kilnd.state();
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_ne!(
        ns("self"),
        ns(&pid.to_string()),
        "kilnd shares the host's mount namespace ([daemon] private_mounts)"
    );
    // The step holds its output workspace (and so its tmpfs) until the host releases it.
    let job = Job {
        name: "escape-output-tmpfs".into(),
        args: Vec::new(),
        workspaces: vec!["out".into()],
        steps: vec![Step::script(
            "attack",
            &[],
            Some("out"),
            "echo made > /workspace/out/made.txt; i=0; \
             while [ ! -e /workspace/out/release ]; do \
               i=$((i + 1)); [ $i -lt 1500 ] || { echo 'ERROR: never released'; exit 2; }; \
               sleep 0.02; \
             done; rm /workspace/out/release",
        )],
    };
    // The host's mount table, sampled from before the job is submitted until it has ended: at no
    // moment (mount, step, copy, unmount) may it hold a mount under kilnd's state dir.
    let stop = AtomicBool::new(false);
    let (run, (samples, seen)) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let (mut samples, mut seen) = (0_u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                seen.extend(mounts_under(&mount_table(None), &state));
                samples += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (samples, seen)
        });
        // Stops the sampler however this closure ends (a failed assertion included).
        let stop_sampler = StopOnDrop(&stop);
        let id = b.submit(&job);
        let live = b.wait_for_output(&id, "attack", "out", "made.txt");
        // Control: the tmpfs exists while the step runs, and the same scan finds it — in
        // kilnd's namespace, the only place it may be.
        let point = state.join("work").join(&id).join("outfs/attack");
        let in_kilnd = mounts_under(&mount_table(Some(pid)), &state);
        assert!(
            in_kilnd
                .iter()
                .any(|m| m.point == point && m.fstype == "tmpfs"),
            "no output tmpfs at {} in kilnd's mount namespace: {in_kilnd:#?}",
            point.display()
        );
        assert!(
            live.starts_with(format!("/proc/{pid}/root")),
            "the running step's output is not on its tmpfs: {}",
            live.display()
        );
        let on_host = mounts_under(&mount_table(None), &state);
        assert!(
            on_host.is_empty(),
            "the host mount namespace sees kilnd's mounts: {on_host:#?}"
        );
        // The host's own view of the same paths: an empty mount point, nothing on the disk.
        assert!(
            !point.join("ws/made.txt").exists(),
            "the host reads the step's output through the tmpfs's mount point"
        );
        assert!(
            !b.workspace_dir(&id, "out").join("made.txt").exists(),
            "the running step's output landed on the host disk"
        );
        std::fs::write(live.join("release"), "").unwrap();
        let run = b.finish(&id);
        drop(stop_sampler);
        (run, sampler.join().unwrap())
    });
    run.assert_succeeded("attack");
    assert!(
        seen.is_empty(),
        "the host mount namespace saw kilnd's mounts while the job ran: {seen:#?}"
    );
    assert!(
        samples >= 10,
        "only {samples} samples of the host mount table"
    );
    // The output still reached the job: collected from the tmpfs, attested, copied to disk.
    assert_eq!(
        run.outputs("attack"),
        std::collections::BTreeMap::from([(
            "made.txt".to_owned(),
            Digest::of(b"made\n").to_string()
        )]),
        "{}",
        run.describe()
    );
}

/// Sets the flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn human_mib(mib: u64) -> String {
    if mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}
