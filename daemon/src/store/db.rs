//! `kiln.db`: the SQLite index of jobs, steps, subjects, attestations and job events.
//!
//! The database only indexes; every attestation, log and artifact is a CAS blob. WAL mode with
//! `synchronous=NORMAL`: a crash can lose the last transactions but never corrupts the file, and
//! [`Db::recover_interrupted`] repairs the state of jobs that were running when kilnd stopped.
//! Calls are short (indexed lookups), so they run under a mutex directly on the caller's thread.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use kiln_common::Digest;
use kiln_common::api::{
    Artifact, AttestationRef, Event, JobState, JobStatus, JobSummary, StepState, StepStatus,
};
use kiln_common::digest::TreeEntry;
use rusqlite::{Connection, OptionalExtension, params};

/// Database failures.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite error.
    #[error("kiln.db: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value could not be decoded (the file was edited or is from another version).
    #[error("kiln.db holds an invalid {what}: {value:?}")]
    Invalid {
        /// Column.
        what: &'static str,
        /// Value found.
        value: String,
    },
    /// The lock was poisoned by a panic elsewhere.
    #[error("kiln.db lock poisoned")]
    Poisoned,
}

const SCHEMA: &str = r"
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    pipeline TEXT NOT NULL,
    pipeline_digest TEXT NOT NULL,
    params TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    attestation TEXT,
    submitter_uid INTEGER,
    signature TEXT
);
CREATE TABLE IF NOT EXISTS steps (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    output TEXT,
    state TEXT NOT NULL,
    exit_code INTEGER,
    error TEXT,
    started_at TEXT,
    finished_at TEXT,
    duration_ms INTEGER,
    log TEXT,
    attestation TEXT,
    PRIMARY KEY (job_id, name)
);
CREATE TABLE IF NOT EXISTS subjects (
    job_id TEXT NOT NULL,
    step TEXT NOT NULL,
    workspace TEXT NOT NULL,
    path TEXT NOT NULL,
    digest TEXT NOT NULL,
    final_output INTEGER NOT NULL,
    PRIMARY KEY (job_id, step, path)
);
CREATE INDEX IF NOT EXISTS subjects_by_digest ON subjects(digest);
CREATE TABLE IF NOT EXISTS attestations (
    digest TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    step TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS step_attestations (
    digest TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    step TEXT NOT NULL,
    name TEXT NOT NULL,
    predicate_type TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS attestation_subjects (
    envelope TEXT NOT NULL,
    path TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (envelope, path, digest)
);
CREATE INDEX IF NOT EXISTS attestation_subjects_by_digest ON attestation_subjects(digest);
CREATE TABLE IF NOT EXISTS rebuild_recipes (
    job_id TEXT NOT NULL,
    step TEXT NOT NULL,
    recipe TEXT NOT NULL,
    PRIMARY KEY (job_id, step)
);
CREATE TABLE IF NOT EXISTS rebuild_inputs (
    job_id TEXT NOT NULL,
    step TEXT NOT NULL,
    workspace TEXT NOT NULL,
    tree_digest TEXT NOT NULL,
    manifest TEXT NOT NULL,
    PRIMARY KEY (job_id, step, workspace)
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE IF NOT EXISTS images (
    digest TEXT PRIMARY KEY,
    entries INTEGER NOT NULL,
    files INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    imported_at TEXT NOT NULL
);
";

/// An imported build environment image (`kiln image import`; the manifest is a CAS blob).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageRecord {
    /// sha256 of the canonical manifest.
    pub digest: Digest,
    /// Entries of the tree (directories, files, symlinks).
    pub entries: u64,
    /// Regular files.
    pub files: u64,
    /// Total size of the regular files.
    pub bytes: u64,
    /// RFC 3339, first import.
    pub imported_at: String,
}

/// A job as first recorded.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    /// Job id.
    pub id: &'a str,
    /// Pipeline name.
    pub pipeline: &'a str,
    /// Pipeline digest (a CAS blob holding the exact text).
    pub pipeline_digest: &'a Digest,
    /// Bound parameters.
    pub params: &'a BTreeMap<String, String>,
    /// RFC 3339.
    pub created_at: &'a str,
    /// Steps in execution order: (name, kind, output workspace).
    pub steps: Vec<(&'a str, &'a str, Option<&'a str>)>,
    /// uid of the peer that submitted the job (`SO_PEERCRED`): who may rebuild it.
    pub submitter_uid: Option<u32>,
    /// The definition's DSSE signature as submitted (a CAS blob), for re-admission.
    pub signature: Option<Digest>,
}

/// Who submitted a job and how it was signed (`kiln rebuild` authorizes and re-admits by these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobOrigin {
    /// uid of the submitting peer; `None` for jobs recorded before it was (only root may
    /// rebuild those).
    pub submitter_uid: Option<u32>,
    /// The signature envelope blob, if the job was submitted signed.
    pub signature: Option<Digest>,
}

/// The attested output files of one step.
#[derive(Debug, Clone)]
pub struct StepOutputs<'a> {
    /// Output workspace.
    pub workspace: &'a str,
    /// No later step transforms this workspace: an end product of the pipeline.
    pub final_output: bool,
    /// Files and digests.
    pub entries: &'a [TreeEntry],
}

/// Fields of a step written when it changes state.
#[derive(Debug, Clone, Default)]
pub struct StepUpdate {
    /// New state.
    pub state: Option<StepState>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Failure reason.
    pub error: Option<String>,
    /// RFC 3339.
    pub started_at: Option<String>,
    /// RFC 3339.
    pub finished_at: Option<String>,
    /// Worker wall time.
    pub duration_ms: Option<u64>,
    /// Log blob.
    pub log: Option<Digest>,
    /// Envelope blob.
    pub attestation: Option<Digest>,
}

/// An attestation a step made besides its provenance (a publish step's SBOM, test results).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepAttestationRow {
    /// Signing step.
    pub step: String,
    /// Byproduct name (`sbom`, `test-result:<step>`).
    pub name: String,
    /// Predicate type.
    pub predicate_type: String,
    /// Envelope blob.
    pub envelope: Digest,
}

/// How to run a step again (`kiln rebuild`): its sandbox recipe and each input workspace's
/// manifest, all CAS blobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildRecord {
    /// Recipe blob.
    pub recipe: Digest,
    /// (workspace, tree digest, manifest blob).
    pub inputs: Vec<(String, Digest, Digest)>,
}

/// The index database.
#[derive(Debug)]
pub struct Db {
    conn: Mutex<Connection>,
}

fn required_digest(what: &'static str, s: String) -> Result<Digest, DbError> {
    s.parse().map_err(|_| DbError::Invalid { what, value: s })
}

fn parse_digest(what: &'static str, s: Option<String>) -> Result<Option<Digest>, DbError> {
    s.map(|v| required_digest(what, v)).transpose()
}

impl Db {
    /// Open or create `path`, apply the schema, enable WAL.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        // Columns added after the first release: an older kiln.db gets them empty.
        for (column, kind) in [("submitter_uid", "INTEGER"), ("signature", "TEXT")] {
            let present: bool = conn.query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info('jobs') WHERE name = ?1",
                params![column],
                |r| r.get(0),
            )?;
            if !present {
                conn.execute_batch(&format!("ALTER TABLE jobs ADD COLUMN {column} {kind}"))?;
            }
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, DbError> {
        self.conn.lock().map_err(|_| DbError::Poisoned)
    }

    /// Record a new queued job and its pending steps, atomically.
    pub fn insert_job(&self, job: &NewJob<'_>) -> Result<(), DbError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let params_json = serde_json::to_string(job.params).unwrap_or_else(|_| "{}".into());
        tx.execute(
            "INSERT INTO jobs (id, pipeline, pipeline_digest, params, state, created_at, submitter_uid, signature) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![job.id, job.pipeline, job.pipeline_digest.to_string(), params_json, JobState::Queued.as_str(), job.created_at, job.submitter_uid, job.signature.map(|d| d.to_string())],
        )?;
        for (idx, (name, kind, output)) in job.steps.iter().enumerate() {
            tx.execute(
                "INSERT INTO steps (job_id, idx, name, kind, output, state) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![job.id, idx as i64, name, kind, output, StepState::Pending.as_str()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Change a job's state; `time` goes to `started_at` for running and `finished_at` for terminal states.
    pub fn set_job_state(
        &self,
        id: &str,
        state: JobState,
        error: Option<&str>,
        time: &str,
    ) -> Result<(), DbError> {
        let conn = self.conn()?;
        let column = if state == JobState::Running {
            "started_at"
        } else {
            "finished_at"
        };
        let sql = format!(
            "UPDATE jobs SET state = ?1, error = COALESCE(?2, error), {column} = ?3 WHERE id = ?4"
        );
        conn.execute(&sql, params![state.as_str(), error, time, id])?;
        Ok(())
    }

    /// Link the job-level attestation.
    pub fn set_job_attestation(&self, id: &str, digest: &Digest) -> Result<(), DbError> {
        self.conn()?.execute(
            "UPDATE jobs SET attestation = ?1 WHERE id = ?2",
            params![digest.to_string(), id],
        )?;
        Ok(())
    }

    /// Apply the set fields of `u` to a step.
    pub fn update_step(&self, job_id: &str, step: &str, u: &StepUpdate) -> Result<(), DbError> {
        self.conn()?.execute(
            "UPDATE steps SET state = COALESCE(?1, state), exit_code = COALESCE(?2, exit_code),
                error = COALESCE(?3, error), started_at = COALESCE(?4, started_at),
                finished_at = COALESCE(?5, finished_at), duration_ms = COALESCE(?6, duration_ms),
                log = COALESCE(?7, log), attestation = COALESCE(?8, attestation)
             WHERE job_id = ?9 AND name = ?10",
            params![
                u.state.map(StepState::as_str),
                u.exit_code,
                u.error,
                u.started_at,
                u.finished_at,
                u.duration_ms.map(|d| d as i64),
                u.log.map(|d| d.to_string()),
                u.attestation.map(|d| d.to_string()),
                job_id,
                step
            ],
        )?;
        Ok(())
    }

    /// Record the output files of a step and its envelope, in one transaction.
    pub fn record_attested_outputs(
        &self,
        job_id: &str,
        step: &str,
        outputs: Option<&StepOutputs<'_>>,
        envelope: &Digest,
        created_at: &str,
    ) -> Result<(), DbError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        if let Some(StepOutputs {
            workspace: ws,
            final_output,
            entries,
        }) = outputs
        {
            for e in *entries {
                tx.execute(
                    "INSERT INTO subjects (job_id, step, workspace, path, digest, final_output) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![job_id, step, ws, e.path, e.digest.to_string(), final_output],
                )?;
            }
        }
        tx.execute(
            "INSERT OR IGNORE INTO attestations (digest, job_id, step, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![envelope.to_string(), job_id, step, created_at],
        )?;
        tx.execute(
            "UPDATE steps SET attestation = ?1 WHERE job_id = ?2 AND name = ?3",
            params![envelope.to_string(), job_id, step],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Record the job-level envelope.
    pub fn record_job_attestation(
        &self,
        job_id: &str,
        envelope: &Digest,
        created_at: &str,
    ) -> Result<(), DbError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO attestations (digest, job_id, step, created_at) VALUES (?1, ?2, NULL, ?3)",
            params![envelope.to_string(), job_id, created_at],
        )?;
        tx.execute(
            "UPDATE jobs SET attestation = ?1 WHERE id = ?2",
            params![envelope.to_string(), job_id],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Index an attestation a step made besides its provenance, with its subjects.
    pub fn record_step_attestation(
        &self,
        job_id: &str,
        row: &StepAttestationRow,
        subjects: &[TreeEntry],
        created_at: &str,
    ) -> Result<(), DbError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let envelope = row.envelope.to_string();
        tx.execute(
            "INSERT OR IGNORE INTO attestations (digest, job_id, step, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![envelope, job_id, row.step, created_at],
        )?;
        tx.execute(
            "INSERT OR IGNORE INTO step_attestations (digest, job_id, step, name, predicate_type, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![envelope, job_id, row.step, row.name, row.predicate_type, created_at],
        )?;
        for s in subjects {
            tx.execute(
                "INSERT OR IGNORE INTO attestation_subjects (envelope, path, digest) VALUES (?1, ?2, ?3)",
                params![envelope, s.path, s.digest.to_string()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// A job's attestations besides step provenance, in the order they were made.
    pub fn step_attestations(&self, job_id: &str) -> Result<Vec<StepAttestationRow>, DbError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT step, name, predicate_type, digest FROM step_attestations WHERE job_id = ?1 ORDER BY rowid",
        )?;
        let rows = stmt.query_map(params![job_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (step, name, predicate_type, digest) = row?;
            out.push(StepAttestationRow {
                step,
                name,
                predicate_type,
                envelope: required_digest("attestation digest", digest)?,
            });
        }
        Ok(out)
    }

    /// Record how a step ran (for `kiln rebuild`): its recipe and its input manifests.
    pub fn record_rebuild(
        &self,
        job_id: &str,
        step: &str,
        record: &RebuildRecord,
    ) -> Result<(), DbError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO rebuild_recipes (job_id, step, recipe) VALUES (?1, ?2, ?3)",
            params![job_id, step, record.recipe.to_string()],
        )?;
        for (ws, tree, manifest) in &record.inputs {
            tx.execute(
                "INSERT OR REPLACE INTO rebuild_inputs (job_id, step, workspace, tree_digest, manifest) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![job_id, step, ws, tree.to_string(), manifest.to_string()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// How a step ran, if recorded.
    pub fn rebuild_record(
        &self,
        job_id: &str,
        step: &str,
    ) -> Result<Option<RebuildRecord>, DbError> {
        let conn = self.conn()?;
        let recipe: Option<String> = conn
            .query_row(
                "SELECT recipe FROM rebuild_recipes WHERE job_id = ?1 AND step = ?2",
                params![job_id, step],
                |r| r.get(0),
            )
            .optional()?;
        let Some(recipe) = recipe else {
            return Ok(None);
        };
        let mut stmt = conn.prepare(
            "SELECT workspace, tree_digest, manifest FROM rebuild_inputs WHERE job_id = ?1 AND step = ?2 ORDER BY workspace",
        )?;
        let rows = stmt.query_map(params![job_id, step], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut inputs = Vec::new();
        for row in rows {
            let (ws, tree, manifest) = row?;
            inputs.push((
                ws,
                required_digest("tree digest", tree)?,
                required_digest("manifest digest", manifest)?,
            ));
        }
        Ok(Some(RebuildRecord {
            recipe: required_digest("recipe digest", recipe)?,
            inputs,
        }))
    }

    /// Newest jobs first.
    pub fn list_jobs(&self, limit: usize) -> Result<Vec<JobSummary>, DbError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT id, pipeline, state, created_at, finished_at, error FROM jobs ORDER BY created_at DESC, id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get(1)?,
                r.get::<_, String>(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, pipeline, state, created_at, finished_at, error) = row?;
            let state = JobState::parse(&state).ok_or(DbError::Invalid {
                what: "job state",
                value: state,
            })?;
            out.push(JobSummary {
                id,
                pipeline,
                state,
                created_at,
                finished_at,
                error,
            });
        }
        Ok(out)
    }

    /// Who submitted job `id` and its signature blob, or `None` for an unknown job.
    pub fn job_origin(&self, id: &str) -> Result<Option<JobOrigin>, DbError> {
        let row = self
            .conn()?
            .query_row(
                "SELECT submitter_uid, signature FROM jobs WHERE id = ?1",
                params![id],
                |r| Ok((r.get::<_, Option<u32>>(0)?, r.get::<_, Option<String>>(1)?)),
            )
            .optional()?;
        row.map(|(submitter_uid, signature)| {
            Ok(JobOrigin {
                submitter_uid,
                signature: parse_digest("job signature", signature)?,
            })
        })
        .transpose()
    }

    /// Full status of one job, or `None`.
    pub fn job(&self, id: &str) -> Result<Option<JobStatus>, DbError> {
        let conn = self.conn()?;
        let job = conn
            .query_row(
                "SELECT pipeline, pipeline_digest, params, state, created_at, started_at, finished_at, error, attestation FROM jobs WHERE id = ?1",
                params![id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, Option<String>>(6)?,
                        r.get::<_, Option<String>>(7)?,
                        r.get::<_, Option<String>>(8)?,
                    ))
                },
            )
            .optional()?;
        let Some((
            pipeline,
            pdigest,
            params_json,
            state,
            created_at,
            started_at,
            finished_at,
            error,
            att,
        )) = job
        else {
            return Ok(None);
        };
        let pipeline_digest = required_digest("pipeline digest", pdigest)?;
        let params: BTreeMap<String, String> =
            serde_json::from_str(&params_json).map_err(|_| DbError::Invalid {
                what: "params",
                value: params_json.clone(),
            })?;
        let state = JobState::parse(&state).ok_or(DbError::Invalid {
            what: "job state",
            value: state,
        })?;
        let mut steps = Vec::new();
        let mut stmt = conn.prepare(
            "SELECT name, kind, state, exit_code, error, started_at, finished_at, duration_ms, log, attestation, output
             FROM steps WHERE job_id = ?1 ORDER BY idx",
        )?;
        let rows = stmt.query_map(params![id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<i32>>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, Option<i64>>(7)?,
                r.get::<_, Option<String>>(8)?,
                r.get::<_, Option<String>>(9)?,
                r.get::<_, Option<String>>(10)?,
            ))
        })?;
        let mut out_stmt = conn.prepare(
            "SELECT path, digest FROM subjects WHERE job_id = ?1 AND step = ?2 ORDER BY path",
        )?;
        for row in rows {
            let (
                name,
                kind,
                st,
                exit_code,
                error,
                started_at,
                finished_at,
                duration,
                log,
                att,
                output,
            ) = row?;
            let state = StepState::parse(&st).ok_or(DbError::Invalid {
                what: "step state",
                value: st,
            })?;
            let mut outputs = Vec::new();
            for o in out_stmt.query_map(params![id, name], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })? {
                let (path, digest) = o?;
                let digest = required_digest("subject digest", digest)?;
                outputs.push(TreeEntry { path, digest });
            }
            steps.push(StepStatus {
                name,
                kind,
                state,
                exit_code,
                error,
                started_at,
                finished_at,
                duration_ms: duration.map(|d| d as u64),
                log: parse_digest("log digest", log)?,
                attestation: parse_digest("attestation digest", att)?,
                output,
                outputs,
            });
        }
        Ok(Some(JobStatus {
            id: id.to_owned(),
            pipeline,
            pipeline_digest,
            params,
            state,
            created_at,
            started_at,
            finished_at,
            error,
            attestation: parse_digest("attestation digest", att)?,
            steps,
        }))
    }

    /// Output files of a job.
    pub fn artifacts(&self, job_id: &str) -> Result<Vec<Artifact>, DbError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT step, workspace, path, digest, final_output FROM subjects WHERE job_id = ?1 ORDER BY step, path",
        )?;
        let rows = stmt.query_map(params![job_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, bool>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (step, workspace, path, digest, final_output) = row?;
            let digest = required_digest("subject digest", digest)?;
            out.push(Artifact {
                step,
                workspace,
                path,
                digest,
                final_output,
            });
        }
        Ok(out)
    }

    /// Every attested subject with this digest.
    pub fn attestations_by_subject(&self, digest: &Digest) -> Result<Vec<AttestationRef>, DbError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT s.job_id, s.step, s.path, st.attestation FROM subjects s
             JOIN steps st ON st.job_id = s.job_id AND st.name = s.step
             WHERE s.digest = ?1 AND st.attestation IS NOT NULL ORDER BY s.job_id, s.step",
        )?;
        let rows = stmt.query_map(params![digest.to_string()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (job_id, step, subject, env) = row?;
            let envelope = required_digest("attestation digest", env)?;
            out.push(AttestationRef {
                job_id,
                step,
                subject,
                envelope,
                attestation: None,
                predicate_type: None,
            });
        }
        let mut stmt = conn.prepare(
            "SELECT a.job_id, a.step, s.path, a.digest, a.name, a.predicate_type FROM attestation_subjects s
             JOIN step_attestations a ON a.digest = s.envelope
             WHERE s.digest = ?1 ORDER BY a.job_id, a.step, a.name",
        )?;
        let rows = stmt.query_map(params![digest.to_string()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
            ))
        })?;
        for row in rows {
            let (job_id, step, subject, env, name, predicate_type) = row?;
            out.push(AttestationRef {
                job_id,
                step,
                subject,
                envelope: required_digest("attestation digest", env)?,
                attestation: Some(name),
                predicate_type: Some(predicate_type),
            });
        }
        Ok(out)
    }

    /// Append a job event (state events are persisted for replay).
    pub fn append_event(&self, job_id: &str, event: &Event) -> Result<(), DbError> {
        let json = serde_json::to_string(event).unwrap_or_default();
        self.conn()?.execute(
            "INSERT INTO events (job_id, seq, event) VALUES (?1, ?2, ?3)",
            params![job_id, event.seq as i64, json],
        )?;
        Ok(())
    }

    /// Persisted events with `seq > after`.
    pub fn events_after(&self, job_id: &str, after: u64) -> Result<Vec<Event>, DbError> {
        let conn = self.conn()?;
        let mut stmt =
            conn.prepare("SELECT event FROM events WHERE job_id = ?1 AND seq > ?2 ORDER BY seq")?;
        let rows = stmt.query_map(params![job_id, after as i64], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            let json = row?;
            out.push(serde_json::from_str(&json).map_err(|_| DbError::Invalid {
                what: "event",
                value: json,
            })?);
        }
        Ok(out)
    }

    /// Highest persisted event sequence number of a job (0 if none).
    pub fn last_event_seq(&self, job_id: &str) -> Result<u64, DbError> {
        let seq: Option<i64> = self.conn()?.query_row(
            "SELECT MAX(seq) FROM events WHERE job_id = ?1",
            params![job_id],
            |r| r.get(0),
        )?;
        Ok(seq.unwrap_or(0) as u64)
    }

    /// After a crash or kill: jobs left queued/running are failed, their unfinished steps
    /// cancelled or skipped. Returns the ids of the repaired jobs.
    pub fn recover_interrupted(&self, now: &str) -> Result<Vec<String>, DbError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let ids: Vec<String> = {
            let mut stmt =
                tx.prepare("SELECT id FROM jobs WHERE state IN ('queued', 'running')")?;
            stmt.query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        for id in &ids {
            tx.execute(
                "UPDATE jobs SET state = 'failed', error = 'interrupted: kilnd stopped before the job finished', finished_at = ?1 WHERE id = ?2",
                params![now, id],
            )?;
            tx.execute(
                "UPDATE steps SET state = 'cancelled', error = 'interrupted: kilnd stopped', finished_at = ?1 WHERE job_id = ?2 AND state = 'running'",
                params![now, id],
            )?;
            tx.execute(
                "UPDATE steps SET state = 'skipped' WHERE job_id = ?1 AND state = 'pending'",
                params![id],
            )?;
        }
        tx.commit()?;
        Ok(ids)
    }

    /// Index an imported image (a no-op if it is already indexed).
    pub fn insert_image(&self, image: &ImageRecord) -> Result<(), DbError> {
        self.conn()?.execute(
            "INSERT OR IGNORE INTO images (digest, entries, files, bytes, imported_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![image.digest.to_string(), image.entries as i64, image.files as i64, image.bytes as i64, image.imported_at],
        )?;
        Ok(())
    }

    /// One image, if indexed.
    pub fn image(&self, digest: &Digest) -> Result<Option<ImageRecord>, DbError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT digest, entries, files, bytes, imported_at FROM images WHERE digest = ?1",
        )?;
        let row = stmt
            .query_row(params![digest.to_string()], image_row)
            .optional()?;
        row.map(image_record).transpose()
    }

    /// Every image, newest first.
    pub fn images(&self) -> Result<Vec<ImageRecord>, DbError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT digest, entries, files, bytes, imported_at FROM images ORDER BY imported_at DESC, digest",
        )?;
        let rows = stmt.query_map([], image_row)?;
        rows.map(|r| image_record(r?)).collect()
    }
}

type ImageRow = (String, i64, i64, i64, String);

fn image_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn image_record(
    (digest, entries, files, bytes, imported_at): ImageRow,
) -> Result<ImageRecord, DbError> {
    Ok(ImageRecord {
        digest: required_digest("images.digest", digest)?,
        entries: entries as u64,
        files: files as u64,
        bytes: bytes as u64,
        imported_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_common::api::EventKind;

    fn sample(db: &Db, id: &str) {
        let params = BTreeMap::from([("greeting".to_owned(), "hi".to_owned())]);
        db.insert_job(&NewJob {
            id,
            pipeline: "p",
            pipeline_digest: &Digest::of(b"p"),
            params: &params,
            created_at: "2026-01-01T00:00:00Z",
            steps: vec![("a", "build", Some("out")), ("b", "test", None)],
            submitter_uid: Some(1000),
            signature: Some(Digest::of(b"dsse")),
        })
        .unwrap();
    }

    #[test]
    fn the_submitter_and_signature_are_recorded_and_old_databases_gain_the_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        // A kiln.db from before the columns existed.
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE jobs (id TEXT PRIMARY KEY, pipeline TEXT NOT NULL, pipeline_digest \
                 TEXT NOT NULL, params TEXT NOT NULL, state TEXT NOT NULL, error TEXT, created_at \
                 TEXT NOT NULL, started_at TEXT, finished_at TEXT, attestation TEXT);
                 INSERT INTO jobs (id, pipeline, pipeline_digest, params, state, created_at) VALUES \
                 ('old', 'p', 'sha256:00', '{}', 'succeeded', 't');",
            )
            .unwrap();
        let db = Db::open(&path).unwrap();
        assert_eq!(
            db.job_origin("old").unwrap(),
            Some(JobOrigin {
                submitter_uid: None,
                signature: None
            })
        );
        sample(&db, "j1");
        assert_eq!(
            db.job_origin("j1").unwrap(),
            Some(JobOrigin {
                submitter_uid: Some(1000),
                signature: Some(Digest::of(b"dsse"))
            })
        );
        assert_eq!(db.job_origin("nope").unwrap(), None);
        drop(db);
        // Opening again does not add them twice.
        Db::open(&path).unwrap();
    }

    #[test]
    fn job_lifecycle_and_subject_index() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("kiln.db")).unwrap();
        sample(&db, "j1");
        db.set_job_state("j1", JobState::Running, None, "t1")
            .unwrap();
        db.update_step(
            "j1",
            "a",
            &StepUpdate {
                state: Some(StepState::Succeeded),
                exit_code: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
        let entries = vec![TreeEntry {
            path: "x/y".into(),
            digest: Digest::of(b"y"),
        }];
        let env = Digest::of(b"envelope");
        let outputs = StepOutputs {
            workspace: "out",
            final_output: true,
            entries: &entries,
        };
        db.record_attested_outputs("j1", "a", Some(&outputs), &env, "t2")
            .unwrap();
        let job = db.job("j1").unwrap().unwrap();
        assert_eq!(job.state, JobState::Running);
        assert_eq!(job.steps.len(), 2);
        assert_eq!(job.steps[0].outputs, entries);
        assert_eq!(job.steps[0].attestation, Some(env));
        assert_eq!(job.steps[1].state, StepState::Pending);
        let refs = db.attestations_by_subject(&Digest::of(b"y")).unwrap();
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].envelope, env);
        assert!(
            db.attestations_by_subject(&Digest::of(b"z"))
                .unwrap()
                .is_empty()
        );
        assert_eq!(db.artifacts("j1").unwrap()[0].path, "x/y");
        assert!(db.job("nope").unwrap().is_none());
    }

    #[test]
    fn step_attestations_are_indexed_by_subject() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("kiln.db")).unwrap();
        sample(&db, "j1");
        let row = StepAttestationRow {
            step: "a".into(),
            name: "sbom".into(),
            predicate_type: "https://cyclonedx.org/bom".into(),
            envelope: Digest::of(b"sbom envelope"),
        };
        let subjects = [TreeEntry {
            path: "x/y".into(),
            digest: Digest::of(b"y"),
        }];
        db.record_step_attestation("j1", &row, &subjects, "t")
            .unwrap();
        assert_eq!(db.step_attestations("j1").unwrap(), vec![row.clone()]);
        let refs = db.attestations_by_subject(&Digest::of(b"y")).unwrap();
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].attestation.as_deref(), Some("sbom"));
        assert_eq!(refs[0].envelope, row.envelope);
        let record = RebuildRecord {
            recipe: Digest::of(b"recipe"),
            inputs: vec![("src".into(), Digest::of(b"t"), Digest::of(b"m"))],
        };
        db.record_rebuild("j1", "a", &record).unwrap();
        assert_eq!(db.rebuild_record("j1", "a").unwrap(), Some(record));
        assert_eq!(db.rebuild_record("j1", "b").unwrap(), None);
    }

    #[test]
    fn recovery_fails_interrupted_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        {
            let db = Db::open(&path).unwrap();
            sample(&db, "j1");
            db.set_job_state("j1", JobState::Running, None, "t1")
                .unwrap();
            db.update_step(
                "j1",
                "a",
                &StepUpdate {
                    state: Some(StepState::Running),
                    ..Default::default()
                },
            )
            .unwrap();
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.recover_interrupted("t9").unwrap(), vec!["j1".to_owned()]);
        let job = db.job("j1").unwrap().unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert!(job.error.unwrap().contains("interrupted"));
        assert_eq!(job.steps[0].state, StepState::Cancelled);
        assert_eq!(job.steps[1].state, StepState::Skipped);
    }

    #[test]
    fn events_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("kiln.db")).unwrap();
        sample(&db, "j1");
        for seq in 1..=3 {
            let ev = Event {
                seq,
                time: "t".into(),
                kind: EventKind::Job {
                    state: JobState::Running,
                    error: None,
                },
            };
            db.append_event("j1", &ev).unwrap();
        }
        assert_eq!(db.last_event_seq("j1").unwrap(), 3);
        let evs = db.events_after("j1", 1).unwrap();
        assert_eq!(evs.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
    }
}
