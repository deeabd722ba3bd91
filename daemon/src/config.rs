//! kilnd configuration: `/etc/kiln/kilnd.toml` (sample: `docs/kilnd.toml`), overridden by flags.
//!
//! Every section and field has a default, so an empty or missing file is a valid configuration
//! (a missing file is only accepted when it is the default path; an explicit `--config` must exist).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/kiln/kilnd.toml";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kiln";
/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/kiln/kilnd.sock";

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown/mistyped keys.
    #[error("invalid config {path}:{line}:{col}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Parser message.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid config {path}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where kiln.db, the CAS, keys and scratch space live.
    pub state_dir: PathBuf,
    /// Directory of sandbox profiles (`<name>.toml`).
    pub profiles_dir: PathBuf,
    /// Path of the `kiln-sandbox` helper; default: next to the kilnd executable.
    pub sandbox_helper: Option<PathBuf>,
    /// API settings.
    pub api: ApiConfig,
    /// Scheduler settings.
    pub jobs: JobsConfig,
    /// Pipeline observer (eBPF) settings.
    pub observer: ObserverSection,
    /// Job admission: pipeline signature policy and the secret directory.
    pub admission: AdmissionConfig,
    /// Build environment images (`kiln image import`).
    pub images: ImagesConfig,
    /// TPM (node attestor) settings.
    pub tpm: TpmSection,
    /// The daemon process itself.
    pub daemon: DaemonSection,
    /// The file this configuration was read from (measured at start); not a config key.
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
}

/// `[tpm]`: where the TPM is. Without `tcti` kilnd refuses to start unless it is given
/// `--insecure-software-key` (attestations then say `signingKey.kind = "software"`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TpmSection {
    /// TCTI: `device:/dev/tpmrm0` on real hosts, `swtpm:host=127.0.0.1,port=2321` for swtpm.
    /// Overridden by `KILN_TPM_TCTI`.
    pub tcti: Option<String>,
    /// CA bundle (PEM) of the EK certificate's issuer; when set, kilnd checks its own EK
    /// certificate against it at start and refuses to start on a mismatch.
    pub ek_ca_bundle: Option<PathBuf>,
    /// PCR that measured start extends (binary, config, profiles). Only 23 (resettable at
    /// locality 0, quoted by every kiln quote) is supported.
    pub pcr: u8,
    /// `kilnd --insecure-software-key`: sign with a software key when no TPM is configured.
    /// Only settable by the flag, never from the file.
    #[serde(skip)]
    pub insecure_software_key: bool,
}

impl Default for TpmSection {
    fn default() -> Self {
        Self {
            tcti: None,
            ek_ca_bundle: None,
            pcr: kiln_common::attest::MEASURED_START_PCR,
            insecure_software_key: false,
        }
    }
}

/// `[daemon]`: the daemon process itself.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonSection {
    /// Run in a mount namespace of kilnd's own, entered at start before any thread exists, with
    /// every mount a slave of the host's: host mounts still propagate in, nothing kilnd mounts
    /// (output workspace tmpfs, bpffs, tracefs) is ever seen by the host or outlives kilnd.
    /// Default true; `PrivateMounts=yes` in kilnd.service does the same under systemd (both
    /// together nest harmlessly). `false` only to debug kilnd's mounts from the host.
    pub private_mounts: bool,
}

impl Default for DaemonSection {
    fn default() -> Self {
        Self {
            private_mounts: true,
        }
    }
}

/// `[observer]`: the eBPF pipeline observer (docs/trace.md).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ObserverSection {
    /// Refuse to run steps when the observer did not load (default). With `false` steps run
    /// unobserved and their provenance says `observed: false`.
    pub required: bool,
    /// Ring buffer bytes shared by all steps: a power of two, a page multiple. 16 MiB
    /// delivered the benchmark storms without loss here (0.6-1.0 M events/s of small records,
    /// ~230 K/s of file opens, which the kernel itself caps); small rings lose events (and say so).
    pub ring_bytes: u32,
}

impl Default for ObserverSection {
    fn default() -> Self {
        Self {
            required: true,
            ring_bytes: 16 << 20,
        }
    }
}

/// `[api]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Unix socket path (ignored under systemd socket activation).
    pub socket: PathBuf,
    /// Group whose members may submit and cancel jobs (root always may).
    pub submit_group: String,
    /// Group whose members may only read.
    pub audit_group: String,
    /// Largest JSON request body.
    pub max_request_bytes: u64,
    /// Largest blob upload (`POST /v1/blobs`).
    pub max_blob_bytes: u64,
    /// Time limit for one non-streaming request.
    #[serde(with = "humantime_serde_compat")]
    pub request_timeout: Duration,
}

/// `[jobs]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Jobs that may run at the same time.
    pub max_concurrent: usize,
    /// Largest log kept per step; the rest is dropped with a marker line.
    pub max_log_bytes: u64,
    /// How long SIGTERM waits for running jobs to be cancelled and recorded.
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            profiles_dir: PathBuf::from("/etc/kiln/profiles"),
            sandbox_helper: None,
            api: ApiConfig::default(),
            jobs: JobsConfig::default(),
            observer: ObserverSection::default(),
            admission: AdmissionConfig::default(),
            images: ImagesConfig::default(),
            tpm: TpmSection::default(),
            daemon: DaemonSection::default(),
            config_file: None,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            submit_group: "kiln".into(),
            audit_group: "kiln-audit".into(),
            max_request_bytes: 1024 * 1024,
            max_blob_bytes: 512 * 1024 * 1024,
            request_timeout: Duration::from_mins(1),
        }
    }
}

/// `[admission]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Admission policy (`/etc/kiln/policy.toml`, sample `docs/policy.toml`): which signers may
    /// sign which pipelines. Without one every pipeline is admitted unsigned, with a warning.
    pub policy: Option<PathBuf>,
    /// Root-only directory (no group/other permissions) of the secrets steps may declare: one
    /// file per secret, named after it.
    pub secrets_dir: PathBuf,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            policy: None,
            secrets_dir: PathBuf::from("/etc/kiln/secrets"),
        }
    }
}

/// `[images]`: build environment images (`kiln image import`, docs/formats.md "Images").
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ImagesConfig {
    /// Largest total size of an image's regular files, every hard link counted in full (what
    /// the tree would take if nothing were shared). An import over it is refused (413): hard
    /// links let a small tar describe a huge tree.
    pub max_total_bytes: u64,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            max_total_bytes: 16 << 30,
        }
    }
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 2,
            max_log_bytes: 64 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(20),
        }
    }
}

/// `humantime` strings ("30s", "5m") for `Duration` fields.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

impl Config {
    /// Parse configuration text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map_or((0, 0), |s| line_col(text, s.start));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                col,
                message: e.message().to_owned(),
            }
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Load `path`. A missing file is an error only if `explicit` (given with `--config`).
    pub fn load(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path).map(|mut config| {
                config.config_file = Some(path.to_owned());
                config
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        if self.jobs.max_concurrent == 0 {
            return Err(invalid(
                "jobs.max_concurrent must be at least 1, got 0".into(),
            ));
        }
        let ring = self.observer.ring_bytes;
        if !ring.is_power_of_two() || ring < 4096 {
            return Err(invalid(format!(
                "observer.ring_bytes must be a power of two of at least 4096, got {ring}"
            )));
        }
        if self.api.max_request_bytes < 1024 {
            return Err(invalid(format!(
                "api.max_request_bytes must be at least 1024, got {}",
                self.api.max_request_bytes
            )));
        }
        if self.tpm.pcr != kiln_common::attest::MEASURED_START_PCR {
            return Err(invalid(format!(
                "tpm.pcr must be {} (the measured-start pcr every kiln quote covers), got {}",
                kiln_common::attest::MEASURED_START_PCR,
                self.tpm.pcr
            )));
        }
        if let Some(tcti) = &self.tpm.tcti
            && !(tcti.starts_with("device:")
                || tcti.starts_with("swtpm:")
                || tcti.starts_with("mssim:")
                || tcti.starts_with("tabrmd"))
        {
            return Err(invalid(format!(
                "tpm.tcti must be device:PATH, swtpm:host=H,port=P, mssim:… or tabrmd:…, got {tcti:?}"
            )));
        }
        if self.images.max_total_bytes < 1 << 20 {
            return Err(invalid(format!(
                "images.max_total_bytes must be at least 1048576 (1 MiB), got {}",
                self.images.max_total_bytes
            )));
        }
        if !self.state_dir.is_absolute() {
            return Err(invalid(format!(
                "state_dir must be an absolute path, got {}",
                self.state_dir.display()
            )));
        }
        Ok(())
    }
}

/// 1-based line and column (in chars) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(
            Config::parse("", Path::new("k.toml")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn overrides_and_durations() {
        let c = Config::parse(
            "state_dir = \"/srv/kiln\"\n[api]\nrequest_timeout = \"5s\"\n[jobs]\nmax_concurrent = 4\n",
            Path::new("k.toml"),
        )
        .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/srv/kiln"));
        assert_eq!(c.api.request_timeout, Duration::from_secs(5));
        assert_eq!(c.jobs.max_concurrent, 4);
    }

    #[test]
    fn unknown_key_is_located() {
        let err = Config::parse("[api]\nsokcet = \"/x\"\n", Path::new("k.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("invalid config k.toml:2:1:"), "{msg}");
        assert!(msg.contains("sokcet"), "{msg}");
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        let err = Config::parse("[jobs]\nmax_concurrent = 0\n", Path::new("k.toml")).unwrap_err();
        assert!(
            err.to_string()
                .contains("max_concurrent must be at least 1"),
            "{err}"
        );
        let err = Config::parse("state_dir = \"rel\"\n", Path::new("k.toml")).unwrap_err();
        assert!(err.to_string().contains("absolute"), "{err}");
    }

    #[test]
    fn private_mounts_default_on_and_can_be_turned_off() {
        assert!(Config::default().daemon.private_mounts);
        let c = Config::parse("[daemon]\nprivate_mounts = false\n", Path::new("k.toml")).unwrap();
        assert!(!c.daemon.private_mounts);
        let err =
            Config::parse("[daemon]\nprivate_mount = false\n", Path::new("k.toml")).unwrap_err();
        assert!(err.to_string().contains("private_mount"), "{err}");
    }

    #[test]
    fn image_size_cap_defaults_to_16_gib_and_is_checked() {
        assert_eq!(Config::default().images.max_total_bytes, 16 << 30);
        let c =
            Config::parse("[images]\nmax_total_bytes = 2097152\n", Path::new("k.toml")).unwrap();
        assert_eq!(c.images.max_total_bytes, 2 << 20);
        let err =
            Config::parse("[images]\nmax_total_bytes = 10\n", Path::new("k.toml")).unwrap_err();
        assert!(
            err.to_string()
                .contains("images.max_total_bytes must be at least"),
            "{err}"
        );
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let p = Path::new("/nonexistent/kilnd.toml");
        assert!(Config::load(p, true).is_err());
        assert_eq!(Config::load(p, false).unwrap(), Config::default());
    }
}
