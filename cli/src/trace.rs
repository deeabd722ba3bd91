//! `kiln trace JOB [STEP]`: a step's runtime trace (docs/trace.md) as a process tree and a
//! summary, or (`--json`) the trace's NDJSON records as kilnd serves them.

use std::collections::BTreeSet;
use std::io::Write;

use kiln_common::api::JobStatus;
use kiln_common::trace::{TraceRecord, TraceSummary};

use crate::client::Client;
use crate::exit;

/// Prints the trace of `step`, or of every attested step of `job`.
pub async fn trace(
    client: &Client,
    job: &str,
    step: Option<&str>,
    json: bool,
) -> anyhow::Result<u8> {
    let steps: Vec<String> = if let Some(step) = step {
        vec![step.to_owned()]
    } else {
        let status: JobStatus = client.get_json(&format!("/v1/jobs/{job}")).await?;
        status
            .steps
            .iter()
            .filter(|s| s.attestation.is_some())
            .map(|s| s.name.clone())
            .collect()
    };
    let mut out = std::io::stdout().lock();
    let mut all_complete = true;
    for name in &steps {
        let ndjson = client
            .get_bytes(&format!("/v1/jobs/{job}/steps/{name}/trace"))
            .await?;
        if json {
            out.write_all(&ndjson)?;
            continue;
        }
        let records = parse(&ndjson)?;
        if step.is_none() {
            writeln!(out, "==> {name}")?;
        }
        let complete = render(&records, &mut out)?;
        all_complete &= complete;
    }
    Ok(if all_complete { exit::OK } else { exit::FAILED })
}

fn parse(ndjson: &[u8]) -> anyhow::Result<Vec<TraceRecord>> {
    ndjson
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .enumerate()
        .map(|(index, line)| {
            serde_json::from_slice(line)
                .map_err(|e| anyhow::anyhow!("trace line {}: {e}", index + 1))
        })
        .collect()
}

/// Writes the tree and the summary; returns whether the trace is complete.
fn render(records: &[TraceRecord], out: &mut impl Write) -> anyhow::Result<bool> {
    for record in records {
        if let TraceRecord::Process(p) = record {
            let command = if p.argv.is_empty() {
                p.exe.clone().unwrap_or_else(|| "(forked, no exec)".into())
            } else {
                p.argv.join(" ")
            };
            let end = match (p.exit_code, p.signal) {
                (_, Some(signal)) => format!("signal {signal}"),
                (Some(code), None) => format!("exit {code}"),
                (None, None) => "no exit observed".into(),
            };
            let duration = p
                .duration_ms
                .map(|ms| format!(", {ms:.1} ms"))
                .unwrap_or_default();
            writeln!(
                out,
                "{:indent$}{} {command} [{end}{duration}]",
                "",
                p.pid,
                indent = p.depth as usize * 2
            )?;
        }
    }
    let mut read = BTreeSet::new();
    let mut written = BTreeSet::new();
    let mut connections = Vec::new();
    let mut denied = 0;
    let mut shared = 0;
    for record in records {
        match record {
            TraceRecord::File(f) => shared += usize::from(f.args_shared),
            TraceRecord::Write(w) => shared += usize::from(w.args_shared),
            _ => {}
        }
        match record {
            // A pipe or memfd reopened through /proc/PID/fd is no file of the tree.
            TraceRecord::File(f) if f.result >= 0 && f.op == "open" && !f.path_pseudo => {
                match f.access.as_deref() {
                    Some("read") => {
                        read.insert(f.path.as_str());
                    }
                    Some("path") => {}
                    _ => {
                        written.insert(f.path.as_str());
                    }
                }
            }
            TraceRecord::Net(n) => connections.push(format!(
                "{} {} {} -> {}",
                n.op,
                n.ip.as_deref()
                    .or(n.path.as_deref())
                    .unwrap_or(n.family.as_str()),
                n.port.map(|p| p.to_string()).unwrap_or_default(),
                n.result
            )),
            TraceRecord::Sock(k) => connections.push(format!(
                "{} {} {}:{} (cgroup hook, before routing)",
                k.hook, k.protocol, k.ip, k.port
            )),
            TraceRecord::Denied(_) => denied += 1,
            _ => {}
        }
    }
    let Some(TraceRecord::Summary(summary)) = records.last() else {
        anyhow::bail!("trace has no summary record: it was cut short");
    };
    print_summary(summary, out)?;
    writeln!(
        out,
        "files       {} opened for reading, {} for writing",
        read.len(),
        written.len()
    )?;
    for path in &written {
        writeln!(out, "  wrote     {path}")?;
    }
    for connection in &connections {
        writeln!(out, "  net       {connection}")?;
    }
    if denied > 0 {
        writeln!(out, "denied      {denied} syscalls returned EPERM")?;
    }
    if shared > 0 {
        writeln!(
            out,
            "unverified  {shared} file and write records with arguments another thread could rewrite (argsShared; docs/trace.md)"
        )?;
    }
    if !summary.materials.is_empty() || summary.materials_omitted > 0 {
        writeln!(
            out,
            "materials   {} environment files used ({} not listed)",
            summary.materials.len(),
            summary.materials_omitted
        )?;
        for material in &summary.materials {
            writeln!(
                out,
                "  {:<9} {} sha256:{}",
                material.used_as.join(","),
                material.path,
                material.sha256
            )?;
        }
    }
    Ok(summary.complete)
}

fn print_summary(s: &TraceSummary, out: &mut impl Write) -> std::io::Result<()> {
    let e = &s.events;
    writeln!(
        out,
        "events      {} (exec {}, fork {}, exit {}, file {}, write {}, net {}, sock {}, denied {})",
        e.total(),
        e.exec,
        e.fork,
        e.exit,
        e.file,
        e.write,
        e.net,
        e.sock,
        e.denied
    )?;
    if s.setup_events_omitted > 0 {
        writeln!(
            out,
            "setup       {} records of kiln's sandbox setup left out",
            s.setup_events_omitted
        )?;
    }
    if s.fileless_execs > 0 {
        writeln!(
            out,
            "fileless    {} programs executed from a file in no directory (a memfd): no material describes them",
            s.fileless_execs
        )?;
    }
    writeln!(out, "connections {}", s.connections)?;
    writeln!(out, "lost        {}", s.lost)?;
    if s.complete {
        writeln!(out, "complete    yes")
    } else {
        writeln!(
            out,
            "complete    NO ({})",
            s.incomplete_reasons().join("; ")
        )
    }
}
