//! Measured start: kilnd extends PCR 23 ([`MEASURED_START_PCR`]) with the sha256 of its own
//! binary, its config file and each sandbox profile, and writes the event log a verifier replays
//! ([`kiln_common::attest::replay_event_log`]).
//!
//! PCR 23 is reset first, so the log always starts from all zeros and a restart of kilnd
//! (without a TPM reset) still gives a replayable log. The log is JSON lines, one
//! [`MeasurementEvent`] (`pcr`, `digest`, `description`) per line, in extend order.

use std::path::{Path, PathBuf};

use kiln_common::attest::{MEASURED_START_PCR, MeasurementEvent};
use kiln_common::digest::Digest;

use super::tpm::{Tpm, TpmError};

/// Errors of the measured start.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// A measured file could not be read.
    #[error("cannot measure {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The event log could not be written.
    #[error("cannot write the measured-start event log {path}: {source}")]
    WriteLog {
        /// File.
        path: PathBuf,
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A PCR command failed.
    #[error("measured start: {0}")]
    Tpm(#[from] TpmError),
}

/// What kilnd measures at start.
#[derive(Debug, Clone)]
pub struct StartMeasurements {
    /// kilnd's own binary (`/proc/self/exe`).
    pub binary: PathBuf,
    /// The configuration file, if one was read.
    pub config: Option<PathBuf>,
    /// The sandbox profiles directory: every `*.toml` in it, sorted by name.
    pub profiles_dir: Option<PathBuf>,
}

/// The events for `what`, in extend order (files hashed, nothing sent to the TPM yet).
pub fn measurement_events(what: &StartMeasurements) -> Result<Vec<MeasurementEvent>, MeasureError> {
    let mut items = vec![(
        format!("kilnd binary {}", what.binary.display()),
        what.binary.clone(),
    )];
    if let Some(config) = &what.config {
        items.push((format!("kilnd config {}", config.display()), config.clone()));
    }
    if let Some(dir) = &what.profiles_dir {
        let read = |source| MeasureError::Read {
            path: dir.clone(),
            source,
        };
        let mut profiles = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read)? {
            let path = entry.map_err(read)?.path();
            if path.extension().is_some_and(|ext| ext == "toml") {
                profiles.push(path);
            }
        }
        profiles.sort();
        for path in profiles {
            items.push((format!("sandbox profile {}", path.display()), path));
        }
    }
    items
        .into_iter()
        .map(|(description, path)| {
            let file = std::fs::File::open(&path).map_err(|source| MeasureError::Read {
                path: path.clone(),
                source,
            })?;
            let digest = Digest::of_reader(file).map_err(|source| MeasureError::Read {
                path: path.clone(),
                source,
            })?;
            Ok(MeasurementEvent {
                pcr: MEASURED_START_PCR,
                digest,
                description,
            })
        })
        .collect()
}

/// Reset PCR 23, extend it with each event of `what` and write the event log to `log_path`
/// (JSON lines). Returns the events.
pub async fn measure_start(
    tpm: &Tpm,
    what: &StartMeasurements,
    log_path: &Path,
) -> Result<Vec<MeasurementEvent>, MeasureError> {
    let events = measurement_events(what)?;
    tpm.pcr_reset(MEASURED_START_PCR).await?;
    for event in &events {
        tpm.pcr_extend(event.pcr, event.digest).await?;
        tracing::info!(pcr = event.pcr, digest = %event.digest, description = %event.description, "measured");
    }
    write_event_log(log_path, &events)?;
    Ok(events)
}

/// Extend one more event (e.g. a config reload) and append it to the log.
pub async fn measure_event(
    tpm: &Tpm,
    event: MeasurementEvent,
    log_path: &Path,
    events: &mut Vec<MeasurementEvent>,
) -> Result<(), MeasureError> {
    tpm.pcr_extend(event.pcr, event.digest).await?;
    events.push(event);
    write_event_log(log_path, events)
}

/// Write the events as JSON lines (temp file + rename).
pub fn write_event_log(path: &Path, events: &[MeasurementEvent]) -> Result<(), MeasureError> {
    let write = |source| MeasureError::WriteLog {
        path: path.to_owned(),
        source,
    };
    let mut text = String::new();
    for event in events {
        let line = serde_json::to_string(event).map_err(|err| write(std::io::Error::other(err)))?;
        text.push_str(&line);
        text.push('\n');
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(write)?;
    std::fs::rename(&tmp, path).map_err(write)
}
