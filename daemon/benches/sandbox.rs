//! Sandbox benchmark (scripts/bench/sandbox): start latency of a step through `kiln-sandbox`
//! with the hermetic profile against bare exec and bubblewrap with equivalent binds, and a real
//! C build inside the worker against the same build bare on the host — all measured in this run.
//!
//! Environment: `BENCH_N` (latency samples, default 100), `BENCH_BUILD_FILES` (C files of the
//! build, default 400; 0 skips the build), `BENCH_BUILD_RUNS` (default 3).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark driver: a failed setup is a failed run"
)]

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kilnd::sandbox::{
    Access, Profile, Sandbox, SandboxSpec, StepEnd, WorkspaceMount, cgroup, load_profiles,
    prepare_output_dir,
};
use tokio_util::sync::CancellationToken;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `(first quartile, third quartile)` in ms: the spread of the samples, to judge the noise.
fn quartiles(v: &[Duration]) -> String {
    let mut v = v.to_vec();
    v.sort();
    format!("[{:.2}-{:.2}]", ms(v[v.len() / 4]), ms(v[v.len() * 3 / 4]))
}

struct Env {
    _root: tempfile::TempDir,
    input: tempfile::TempDir,
    output: tempfile::TempDir,
    root_dir: PathBuf,
}

fn env() -> Env {
    let root = tempfile::tempdir().unwrap();
    let input = tempfile::tempdir().unwrap();
    let output = tempfile::tempdir().unwrap();
    std::fs::set_permissions(input.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    Env {
        root_dir: root.path().to_owned(),
        _root: root,
        input,
        output,
    }
}

fn spec(p: &Profile, e: &Env, argv: &[&str], cwd: &str, with_cgroups: Option<&str>) -> SandboxSpec {
    prepare_output_dir(e.output.path(), p.uid, p.gid).unwrap();
    let workspaces = vec![
        WorkspaceMount {
            name: "in".into(),
            host_path: e.input.path().to_owned(),
            access: Access::ReadOnly,
        },
        WorkspaceMount {
            name: "out".into(),
            host_path: e.output.path().to_owned(),
            access: Access::ReadWrite,
        },
    ];
    SandboxSpec {
        argv: argv.iter().map(ToString::to_string).collect(),
        env: vec![
            ("PATH".into(), p.path_env.clone()),
            ("HOME".into(), "/tmp".into()),
        ],
        cwd: cwd.into(),
        hostname: "kiln-bench".into(),
        root_dir: e.root_dir.clone(),
        host_paths: p.host_paths.clone(),
        image_root: None,
        confinement: p.confinement(&workspaces),
        secrets: Vec::new(),
        workspaces,
        timeout_ms: 600_000,
        uid: p.uid,
        gid: p.gid,
        tmp_size_bytes: p.tmp_size_bytes,
        cgroups: with_cgroups.map(|step| cgroup::create_step("bench", step, &p.limits).unwrap()),
    }
}

async fn run_step(sandbox: &Sandbox, spec: &SandboxSpec) -> Duration {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(64);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let t = Instant::now();
    let outcome = sandbox
        .run(spec, tx, CancellationToken::new())
        .await
        .unwrap();
    let took = t.elapsed();
    drain.await.unwrap();
    assert!(
        matches!(outcome.end, StepEnd::Exited { code: 0 }),
        "step failed: {outcome:?}"
    );
    took
}

/// User + system CPU time of every reaped descendant so far (the helper's include its step's).
fn children_cpu() -> Duration {
    let usage =
        nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(usage.user_time()) + tv(usage.system_time())
}

fn time_cmd(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let s = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(s.success(), "{cmd:?} failed");
    t.elapsed()
}

/// bwrap with the same view as the hermetic profile: read-only toolchain, the two workspaces,
/// fresh /proc, minimal /dev, private /tmp, every namespace unshared.
fn bwrap(p: &Profile, e: &Env, argv: &[&str], cwd: &str) -> Command {
    let mut c = Command::new("bwrap");
    c.args(["--unshare-all", "--die-with-parent", "--new-session"]);
    for hp in &p.host_paths {
        match std::fs::read_link(hp) {
            Ok(target) => c.arg("--symlink").arg(target).arg(hp),
            Err(_) => c.arg("--ro-bind").arg(hp).arg(hp),
        };
    }
    c.arg("--ro-bind").arg(e.input.path()).arg("/workspace/in");
    c.arg("--bind").arg(e.output.path()).arg("/workspace/out");
    c.args([
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--chdir", cwd,
    ]);
    c.args([
        "--uid",
        "65534",
        "--gid",
        "65534",
        "--cap-drop",
        "ALL",
        "--",
    ])
    .args(argv);
    c
}

/// A C project of `files` translation units and a Makefile, written into `dir`.
fn c_project(dir: &Path, files: usize) {
    let mut objs = Vec::new();
    for i in 0..files {
        let mut src = format!(
            "#include <string.h>\n#include <stdio.h>\nint f{i}(const char *s) {{\n  int h = {i};\n"
        );
        for j in 0..40 {
            writeln!(
                src,
                "  for (size_t k = 0; k < strlen(s); k++) h = h * 31 + s[k] + {j};"
            )
            .unwrap();
        }
        src.push_str("  char buf[64]; snprintf(buf, sizeof buf, \"%d\", h); return (int)strlen(buf) + h;\n}\n");
        std::fs::write(dir.join(format!("f{i}.c")), src).unwrap();
        objs.push(format!("$(O)/f{i}.o"));
    }
    let makefile = format!(
        "O ?= .\nCFLAGS = -O2 -Wall\nall: $(O)/libbench.a\n$(O)/%.o: %.c\n\tcc $(CFLAGS) -c $< -o $@\n$(O)/libbench.a: {}\n\tar rcs $@ $^\n",
        objs.join(" ")
    );
    std::fs::write(dir.join("Makefile"), makefile).unwrap();
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("sandbox bench: needs root");
        std::process::exit(2);
    }
    let n = env_usize("BENCH_N", 100);
    let files = env_usize("BENCH_BUILD_FILES", 400);
    let build_runs = env_usize("BENCH_BUILD_RUNS", 3);
    let profiles =
        load_profiles(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles")).unwrap();
    let hermetic = &profiles["hermetic"];
    let sandbox = Sandbox::new(env!("CARGO_BIN_EXE_kiln-sandbox"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let have_bwrap = Command::new("bwrap").arg("--version").output().is_ok();

    let e = env();
    let s_plain = spec(hermetic, &e, &["/bin/true"], "/", None);
    // Round-robin: one sample of each variant per round, so load from other processes on a shared
    // machine falls on all of them alike and the ratios stay meaningful. One warm-up round.
    let (mut bare, mut bw, mut kiln_plain, mut kiln_full) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..=n {
        let bare_sample = time_cmd(&mut Command::new("/bin/true"));
        let bw_sample = have_bwrap.then(|| time_cmd(&mut bwrap(hermetic, &e, &["/bin/true"], "/")));
        let plain_sample = rt.block_on(run_step(&sandbox, &s_plain));
        let s_full = spec(
            hermetic,
            &e,
            &["/bin/true"],
            "/",
            Some(&format!("true-{i}")),
        );
        let full_sample = rt.block_on(run_step(&sandbox, &s_full));
        if i == 0 {
            continue;
        }
        bare.push(bare_sample);
        bw.extend(bw_sample);
        kiln_plain.push(plain_sample);
        kiln_full.push(full_sample);
    }
    let spread = [&bare, &bw, &kiln_plain, &kiln_full].map(|v| {
        if v.is_empty() {
            String::new()
        } else {
            quartiles(v)
        }
    });
    let (bare, kiln_plain, kiln_full) = (median(bare), median(kiln_plain), median(kiln_full));
    let bw = have_bwrap.then(|| median(bw));

    println!("start latency, /bin/true, median of {n} interleaved rounds [quartiles]");
    println!(
        "  bare exec                              {:8.2} ms {}",
        ms(bare),
        spread[0]
    );
    if let Some(bw) = bw {
        println!(
            "  bwrap --unshare-all (equivalent binds)  {:8.2} ms {}",
            ms(bw),
            spread[1]
        );
        println!(
            "  kiln-sandbox (ns+mounts+seccomp+landlock) {:6.2} ms {}  = {:.2}x bwrap (target <= 0.80x)",
            ms(kiln_plain),
            spread[2],
            ms(kiln_plain) / ms(bw)
        );
        println!(
            "  + per-step cgroups, limits, teardown check {:5.2} ms {}  = {:.2}x bwrap",
            ms(kiln_full),
            spread[3],
            ms(kiln_full) / ms(bw)
        );
    } else {
        println!("  bwrap not installed (scripts/setup installs bubblewrap): no baseline");
    }

    if files == 0 {
        return;
    }
    let src = e.input.path();
    c_project(src, files);
    let (mut bare_runs, mut kiln_runs, mut bare_cpu, mut kiln_cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..build_runs {
        let out = tempfile::tempdir().unwrap();
        let cpu = children_cpu();
        bare_runs.push(time_cmd(
            Command::new("make")
                .args(["-s", "-j2", "-C"])
                .arg(src)
                .arg(format!("O={}", out.path().display())),
        ));
        bare_cpu.push(children_cpu().saturating_sub(cpu));
        for entry in std::fs::read_dir(e.output.path()).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        let s = spec(
            hermetic,
            &e,
            &["make", "-s", "-j2", "O=/workspace/out"],
            "/workspace/in",
            Some(&format!("build-{i}")),
        );
        let cpu = children_cpu();
        kiln_runs.push(rt.block_on(run_step(&sandbox, &s)));
        kiln_cpu.push(children_cpu().saturating_sub(cpu));
    }
    let (b, k) = (median(bare_runs), median(kiln_runs));
    let (bc, kc) = (median(bare_cpu), median(kiln_cpu));
    println!("real build: make -j2 of {files} C files, median of {build_runs}");
    println!(
        "  bare on the host                        {:8.2} s",
        b.as_secs_f64()
    );
    println!(
        "  inside the hermetic worker              {:8.2} s  = {:.3}x bare (target <= 1.02x)",
        k.as_secs_f64(),
        k.as_secs_f64() / b.as_secs_f64()
    );
    // CPU time is what the worker itself adds; wall time also carries the machine's other load.
    println!(
        "  CPU time (user+sys): bare {:.2} s, worker {:.2} s  = {:.3}x",
        bc.as_secs_f64(),
        kc.as_secs_f64(),
        kc.as_secs_f64() / bc.as_secs_f64()
    );
}
