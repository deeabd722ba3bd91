//! Route handlers. Each returns JSON or a stream; errors are [`ApiError`]s with a JSON body.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use kiln_common::Digest;
use kiln_common::api::{BlobRef, Event, EventKind, JobStatus, NodeInfo, SubmitJobRequest};
use kiln_common::dsse::Envelope;
use kiln_common::intoto::BUNDLE_MEDIA_TYPE;
use kiln_common::verify::{Bundle, StepAttestation};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::ApiError;
use crate::pipeline::{Node, SubmitError};
use crate::store::CasError;

type ApiResult<T> = Result<T, ApiError>;

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "request failed");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

fn parse_digest(s: &str) -> ApiResult<Digest> {
    s.parse()
        .map_err(|e: kiln_common::digest::DigestParseError| {
            ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
        })
}

fn cas_error(e: CasError) -> ApiError {
    match e {
        CasError::NotFound(d) => {
            ApiError::new(StatusCode::NOT_FOUND, format!("blob {d} not found"))
        }
        other => internal(other),
    }
}

/// A job's status, or 404.
fn load_job(node: &Node, id: &str) -> ApiResult<JobStatus> {
    node.store
        .db
        .job(id)
        .map_err(internal)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("job {id} not found")))
}

pub async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

pub async fn node_info(State(node): State<Arc<Node>>) -> Json<NodeInfo> {
    // The current node key: after `kiln node rotate-key` it differs from the one kilnd started
    // with (`signer.info`).
    let key = node.signer.public_key();
    Json(NodeInfo {
        builder_id: node.signer.builder_id.clone(),
        keyid: key.keyid(),
        key_kind: node.signer.info.kind.clone(),
        public_key_pem: key.to_pem(),
        version: env!("CARGO_PKG_VERSION").into(),
        hostname: node.hostname.clone(),
    })
}

/// `POST /v1/jobs`: the body is read as bytes (so the size cap answers 413) and parsed here (so a
/// malformed body answers 400 with serde's line:col).
pub async fn submit(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<super::Peer>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: SubmitJobRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })?;
    match node.submit(req, peer.uid) {
        Ok(resp) => Ok((StatusCode::CREATED, Json(resp)).into_response()),
        Err(e @ (SubmitError::Spec(_) | SubmitError::Params(_) | SubmitError::Refused(_))) => Err(
            ApiError::with_details(StatusCode::UNPROCESSABLE_ENTITY, e.to_string(), e.details()),
        ),
        Err(e @ SubmitError::ShuttingDown) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            e.to_string(),
        )),
        Err(e @ SubmitError::Store(_)) => Err(internal(e)),
    }
}

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<usize>,
}

pub async fn list_jobs(
    State(node): State<Arc<Node>>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Response> {
    let jobs = node
        .store
        .db
        .list_jobs(q.limit.unwrap_or(50).min(1000))
        .map_err(internal)?;
    Ok(Json(jobs).into_response())
}

pub async fn job_status(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let job = load_job(&node, &id)?;
    Ok(Json(job).into_response())
}

pub async fn cancel_job(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let job = load_job(&node, &id)?;
    if node.cancel(&id) {
        Ok((
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "id": id, "cancelling": true })),
        )
            .into_response())
    } else {
        Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("job {id} is already {}", job.state.as_str()),
        ))
    }
}

pub async fn artifacts(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    load_job(&node, &id)?;
    Ok(Json(node.store.db.artifacts(&id).map_err(internal)?).into_response())
}

/// `GET /v1/jobs/{id}/attestations`: the job envelope and every step envelope, as a bundle.
pub async fn bundle(State(node): State<Arc<Node>>, Path(id): Path<String>) -> ApiResult<Response> {
    let job = load_job(&node, &id)?;
    let job_digest = job.attestation.ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "job {id} is {}: its attestation is written when it ends",
                job.state.as_str()
            ),
        )
    })?;
    let load = |d: &Digest| -> ApiResult<Envelope> {
        let bytes = node.store.cas.get(d).map_err(cas_error)?;
        serde_json::from_slice(&bytes).map_err(internal)
    };
    let mut steps = BTreeMap::new();
    let mut traces = BTreeMap::new();
    for s in &job.steps {
        if let Some(d) = &s.attestation {
            let envelope = load(d)?;
            // The step's runtime trace, as its provenance names it (byproduct `runtime-trace`).
            if let Some(trace) = Node::trace_envelope_digest(&envelope) {
                traces.insert(s.name.clone(), load(&trace)?);
            }
            steps.insert(s.name.clone(), envelope);
        }
    }
    // A publish step's SBOM and test results (each named by the step's provenance).
    let attestations = node
        .store
        .db
        .step_attestations(&id)
        .map_err(internal)?
        .into_iter()
        .map(|row| {
            Ok(StepAttestation {
                envelope: load(&row.envelope)?,
                step: row.step,
                name: row.name,
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    let job_envelope = load(&job_digest)?;
    let (node_identity, verification_material) = super::node::node_evidence(&node, &job_envelope)?;
    let b = Bundle {
        media_type: BUNDLE_MEDIA_TYPE.into(),
        job_id: id,
        job: job_envelope,
        steps,
        traces,
        node_identity,
        verification_material,
        attestations,
    };
    Ok(Json(b).into_response())
}

/// `POST /v1/jobs/{id}/rebuild`: run a finished job's steps again against their recorded inputs
/// and compare the outputs (answers when every rebuild has ended). Only root and the uid that
/// submitted the job may (403), the definition is admitted again under today's policy (422),
/// and a step that declares secrets is rebuilt only for root (403).
pub async fn rebuild(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<super::Peer>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: kiln_common::api::RebuildRequest = if body.is_empty() {
        kiln_common::api::RebuildRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid request body: {e}"),
            )
        })?
    };
    match node.rebuild_job(&id, req.step.as_deref(), peer.uid).await {
        Ok(report) => Ok(Json(report).into_response()),
        Err(e @ crate::pipeline::rebuild::RebuildError::Forbidden { .. }) => {
            tracing::info!(uid = peer.uid, job = %id, reason = %e, "rebuild refused");
            Err(ApiError::new(StatusCode::FORBIDDEN, e.to_string()))
        }
        Err(crate::pipeline::rebuild::RebuildError::Refused { job, problems }) => {
            Err(ApiError::with_details(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("job {job} cannot be rebuilt: its pipeline is not admitted today"),
                problems,
            ))
        }
        Err(
            e @ (crate::pipeline::rebuild::RebuildError::NoJob(_)
            | crate::pipeline::rebuild::RebuildError::NoStep { .. }),
        ) => Err(ApiError::new(StatusCode::NOT_FOUND, e.to_string())),
        Err(e @ crate::pipeline::rebuild::RebuildError::NotFinished { .. }) => {
            Err(ApiError::new(StatusCode::CONFLICT, e.to_string()))
        }
        Err(e) => Err(internal(e)),
    }
}

pub async fn step_log(
    State(node): State<Arc<Node>>,
    Path((id, step)): Path<(String, String)>,
) -> ApiResult<Response> {
    let job = load_job(&node, &id)?;
    let s = job.steps.iter().find(|s| s.name == step).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("job {id} has no step {step:?}"),
        )
    })?;
    let d = s.log.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "step {step:?} is {}: no stored log yet (follow /events for live output)",
                s.state.as_str()
            ),
        )
    })?;
    blob_response(&node, d, "text/plain; charset=utf-8").await
}

#[derive(Deserialize)]
pub struct SubjectQuery {
    subject: String,
}

pub async fn attestations_by_subject(
    State(node): State<Arc<Node>>,
    Query(q): Query<SubjectQuery>,
) -> ApiResult<Response> {
    let d = parse_digest(&q.subject)?;
    Ok(Json(
        node.store
            .db
            .attestations_by_subject(&d)
            .map_err(internal)?,
    )
    .into_response())
}

/// `POST /v1/blobs`: stream the body into the CAS, capped at `api.max_blob_bytes`.
pub async fn upload_blob(State(node): State<Arc<Node>>, body: Body) -> ApiResult<Response> {
    let limit = node.config.api.max_blob_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("blob larger than the limit of {limit} bytes"),
        )
    };
    let mut w = node.store.cas.writer(Some(limit)).map_err(internal)?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("reading body: {e}")))?;
        w.write_all(&chunk).map_err(|e| match CasError::from(e) {
            CasError::TooLarge { .. } => too_large(),
            other => internal(other),
        })?;
    }
    let (digest, size) = tokio::task::spawn_blocking(move || w.commit())
        .await
        .map_err(internal)?
        .map_err(internal)?;
    Ok((StatusCode::CREATED, Json(BlobRef { digest, size })).into_response())
}

pub async fn get_blob(
    State(node): State<Arc<Node>>,
    Path(digest): Path<String>,
) -> ApiResult<Response> {
    let d = parse_digest(&digest)?;
    blob_response(&node, d, "application/octet-stream").await
}

/// Verify a blob, then stream it.
async fn blob_response(
    node: &Arc<Node>,
    d: Digest,
    content_type: &'static str,
) -> ApiResult<Response> {
    let cas = node.store.cas.clone();
    let (file, size) = tokio::task::spawn_blocking(move || cas.open_verified(&d))
        .await
        .map_err(internal)?
        .map_err(cas_error)?;
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_LENGTH, &size.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct EventsQuery {
    #[serde(default)]
    after: u64,
}

/// `GET /v1/jobs/{id}/events`: NDJSON. Persisted state events after `after` are replayed, then
/// live events (including log output) follow until the job ends.
pub async fn events(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Response> {
    let job = load_job(&node, &id)?;
    let start = node.follow(&id, q.after).map_err(internal)?;
    // Output that happened before this request: stored logs of finished steps are replayed just
    // before their terminal event, the running step's log so far right after its start event.
    let mut pending = std::collections::VecDeque::new();
    for ev in start.replay {
        if let EventKind::Step { step, state, .. } = &ev.kind {
            let log_event = |data: String| Event {
                seq: ev.seq,
                time: ev.time.clone(),
                kind: EventKind::Log {
                    step: step.clone(),
                    data,
                },
            };
            if state.is_terminal() {
                let stored = job
                    .steps
                    .iter()
                    .find(|s| &s.name == step)
                    .and_then(|s| s.log);
                if let Some(text) = stored.and_then(|d| replayable_log(&node, &d, &id, step)) {
                    pending.push_back(log_event(text));
                }
                pending.push_back(ev);
                continue;
            }
            if let Some(log) = start.running_logs.get(step).filter(|l| !l.is_empty()) {
                let text = String::from_utf8_lossy(log).into_owned();
                pending.push_back(ev.clone());
                pending.push_back(log_event(text));
                continue;
            }
        }
        pending.push_back(ev);
    }
    let state = EventStream {
        node,
        id,
        pending,
        live: start.live,
        last: q.after,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        let ev = s.next().await?;
        let mut ndjson = serde_json::to_vec(&ev).unwrap_or_default();
        ndjson.push(b'\n');
        Some((Ok::<_, std::io::Error>(Bytes::from(ndjson)), s))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Largest stored log replayed inline in an event stream.
const MAX_REPLAYED_LOG: usize = 1 << 20;

/// A finished step's stored log for replay, or a pointer to `kiln logs` when it is large.
fn replayable_log(node: &Node, digest: &Digest, job: &str, step: &str) -> Option<String> {
    let bytes = node.store.cas.get(digest).ok()?;
    if bytes.is_empty() {
        return None;
    }
    if bytes.len() > MAX_REPLAYED_LOG {
        return Some(format!(
            "kiln: log of {} bytes not replayed; see `kiln logs {job} {step}`\n",
            bytes.len()
        ));
    }
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

struct EventStream {
    node: Arc<Node>,
    id: String,
    pending: std::collections::VecDeque<Event>,
    live: Option<tokio::sync::broadcast::Receiver<Event>>,
    last: u64,
    done: bool,
}

impl EventStream {
    async fn next(&mut self) -> Option<Event> {
        loop {
            if self.done {
                return None;
            }
            let ev = if let Some(ev) = self.pending.pop_front() {
                ev
            } else {
                let rx = self.live.as_mut()?;
                match rx.recv().await {
                    Ok(ev) => ev,
                    Err(RecvError::Closed) => return None,
                    Err(RecvError::Lagged(_)) => {
                        // Too slow a reader: catch up from the persisted state events.
                        self.pending = self
                            .node
                            .store
                            .db
                            .events_after(&self.id, self.last)
                            .ok()?
                            .into();
                        continue;
                    }
                }
            };
            if ev.seq <= self.last && !matches!(ev.kind, EventKind::Log { .. }) {
                continue;
            }
            self.last = self.last.max(ev.seq);
            if let EventKind::Job { state, .. } = &ev.kind
                && state.is_terminal()
            {
                self.done = true;
            }
            return Some(ev);
        }
    }
}
