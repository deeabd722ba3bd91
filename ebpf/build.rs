//! Builds the observer's BPF objects and the C layout table the Rust mirrors are tested against.
//!
//! Steps (all outputs in OUT_DIR):
//! 1. `vmlinux.h` from the running kernel's BTF: `bpftool btf dump file /sys/kernel/btf/vmlinux
//!    format c`. The programs are CO-RE, so this only has to be close to the target kernel.
//! 2. `observer.bpf.o`: `clang-19 -g -O2 -target bpf -D__TARGET_ARCH_x86`, embedded by lib.rs.
//!    One translation unit (observer.bpf.c includes every family's source) so all programs
//!    share one set of maps. `floor.bpf.o` likewise: the observer benchmark's baseline.
//! 3. `c_layout.rs`: `src/bpf/layout.c` built for the host and run; it prints sizes, offsets and
//!    constants of `events.h` for the layout test.
//!
//! Environment:
//! - `KILN_SKIP_BPF=1`: skip all three and embed an empty object, for `cargo check`/clippy on
//!   machines without clang or BTF. The daemon then refuses to load the observer with a clear
//!   error. CI has clang and must not set it.
//! - `KILN_CLANG` (default `clang-19`), `KILN_BPFTOOL` (default `bpftool`),
//!   `KILN_VMLINUX_BTF` (default `/sys/kernel/btf/vmlinux`): override the tools and BTF source.

use std::env;
use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// BPF objects: `src/bpf/<name>.bpf.c` -> `<name>.bpf.o`. `observer` includes the families
/// (`process.bpf.c`, `syscalls.bpf.c`, `sock.bpf.c`) and `common.bpf.h`; `floor` is the
/// benchmark's kernel-floor baseline (one empty sys_exit program, never loaded by kilnd).
const PROGRAMS: &[&str] = &["observer", "floor"];

/// Headers and sources every output depends on.
const INPUTS: &[&str] = &[
    "src/bpf/events.h",
    "src/bpf/layout.c",
    "src/bpf/common.bpf.h",
    "src/bpf/observer.bpf.c",
    "src/bpf/process.bpf.c",
    "src/bpf/syscalls.bpf.c",
    "src/bpf/sock.bpf.c",
    "src/bpf/floor.bpf.c",
];

/// Debian/Ubuntu keep `asm/types.h` in the multiarch directory, which clang does not search.
const MULTIARCH_INCLUDE: &str = "/usr/include/x86_64-linux-gnu";

fn main() -> Result<(), Box<dyn Error>> {
    for input in INPUTS {
        println!("cargo::rerun-if-changed={input}");
    }
    for var in [
        "KILN_SKIP_BPF",
        "KILN_CLANG",
        "KILN_BPFTOOL",
        "KILN_VMLINUX_BTF",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rustc-check-cfg=cfg(kiln_bpf_skipped)");

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    if env::var("KILN_SKIP_BPF").is_ok_and(|v| v == "1") {
        println!(
            "cargo::warning=KILN_SKIP_BPF=1: embedding EMPTY BPF objects; the observer will not load"
        );
        println!("cargo::rustc-cfg=kiln_bpf_skipped");
        for program in PROGRAMS {
            fs::write(out_dir.join(format!("{program}.bpf.o")), [])?;
        }
        fs::write(
            out_dir.join("c_layout.rs"),
            "pub const C_STRUCTS: &[super::CStruct] = &[];\n\
             pub const C_CONSTANTS: &[super::CConstant] = &[];\n",
        )?;
        return Ok(());
    }

    let clang = env::var("KILN_CLANG").unwrap_or_else(|_| "clang-19".to_owned());
    let bpftool = env::var("KILN_BPFTOOL").unwrap_or_else(|_| "bpftool".to_owned());
    let btf = env::var("KILN_VMLINUX_BTF").unwrap_or_else(|_| "/sys/kernel/btf/vmlinux".to_owned());
    let bpf_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("src/bpf");

    let vmlinux = run(
        Command::new(&bpftool).args(["btf", "dump", "file", &btf, "format", "c"]),
        "generate vmlinux.h (set KILN_SKIP_BPF=1 to skip the BPF build)",
    )?;
    fs::write(out_dir.join("vmlinux.h"), vmlinux)?;

    for program in PROGRAMS {
        let source = bpf_dir.join(format!("{program}.bpf.c"));
        let object = out_dir.join(format!("{program}.bpf.o"));
        run(
            Command::new(&clang)
                .args([
                    "-g",
                    "-O2",
                    "-target",
                    "bpf",
                    // v3: atomic fetch-and-or with a result (kiln_exit), 32-bit sub-registers.
                    "-mcpu=v3",
                    "-D__TARGET_ARCH_x86",
                    "-Wall",
                    "-Werror",
                ])
                .arg(format!("-I{MULTIARCH_INCLUDE}"))
                .arg(include_flag(&out_dir))
                .arg(include_flag(&bpf_dir))
                .arg("-c")
                .arg(&source)
                .arg("-o")
                .arg(&object),
            "compile BPF program (set KILN_SKIP_BPF=1 to skip the BPF build)",
        )?;
    }

    let layout_bin = out_dir.join("layout");
    run(
        Command::new(&clang)
            .args(["-O0", "-Wall", "-Werror"])
            .arg(format!("-I{MULTIARCH_INCLUDE}"))
            .arg(include_flag(&bpf_dir))
            .arg(bpf_dir.join("layout.c"))
            .arg("-o")
            .arg(&layout_bin),
        "compile the events.h layout probe",
    )?;
    let layout = run(
        &mut Command::new(&layout_bin),
        "run the events.h layout probe",
    )?;
    fs::write(out_dir.join("c_layout.rs"), layout)?;
    Ok(())
}

fn include_flag(dir: &Path) -> String {
    format!("-I{}", dir.display())
}

/// Runs `cmd`, returning its stdout; on failure the error names the step and shows stderr.
fn run(cmd: &mut Command, what: &str) -> Result<Vec<u8>, Box<dyn Error>> {
    let output = cmd
        .output()
        .map_err(|err| format!("cannot {what}: running {cmd:?} failed: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "cannot {what}: {cmd:?} exited with {}:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(output.stdout)
}
