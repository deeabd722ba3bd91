//! The kilnd API: HTTP/JSON on a Unix socket (docs/api.md).
//!
//! Authorization comes from the kernel, not from the request: `SO_PEERCRED` gives the peer's
//! uid/gid/pid; uid 0 and members of `api.submit_group` may submit and cancel, members of
//! `api.audit_group` may only read, everyone else gets 403. Request bodies are capped (413) and
//! non-streaming requests time out (408).

mod auth;
mod handlers;
mod images;
mod node;
mod trace;

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kiln_common::api::ErrorBody;
use tokio::net::UnixListener;
use tower_http::timeout::TimeoutLayer;

use crate::pipeline::Node;

pub use auth::Peer;

/// An API error: status + JSON body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    /// Error with a message.
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: error.into(),
                details: Vec::new(),
            },
        }
    }
    /// Error with individual problems.
    pub fn with_details(
        status: StatusCode,
        error: impl Into<String>,
        details: Vec<String>,
    ) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: error.into(),
                details,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

/// Errors setting up the listener.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Binding or preparing the socket path.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// Socket path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Another kilnd answers on the socket.
    #[error("another kilnd is already listening on {0}")]
    InUse(String),
}

/// The router with all routes, limits and authorization.
pub fn router(node: Arc<Node>) -> Router {
    let cfg = &node.config.api;
    let timeout = TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, cfg.request_timeout);
    let bounded = Router::new()
        .route("/v1/health", get(handlers::health))
        .route("/v1/node", get(handlers::node_info))
        .route("/v1/node/identity", get(node::identity))
        .route("/v1/node/activate", post(node::activate))
        .route("/v1/node/rotate-key", post(node::rotate_key))
        .route("/v1/jobs", post(handlers::submit).get(handlers::list_jobs))
        .route(
            "/v1/jobs/{id}",
            get(handlers::job_status).delete(handlers::cancel_job),
        )
        .route("/v1/jobs/{id}/artifacts", get(handlers::artifacts))
        .route("/v1/jobs/{id}/attestations", get(handlers::bundle))
        .route("/v1/jobs/{id}/steps/{step}/log", get(handlers::step_log))
        .route("/v1/attestations", get(handlers::attestations_by_subject))
        .layer(DefaultBodyLimit::max(cfg.max_request_bytes as usize))
        .layer(timeout);
    // Uploads and downloads stream and may be large: their own size cap, no request timeout.
    let streaming = Router::new()
        .route("/v1/blobs", post(handlers::upload_blob))
        .route("/v1/blobs/{digest}", get(handlers::get_blob))
        .route("/v1/images", post(images::import).get(images::list))
        .route("/v1/jobs/{id}/events", get(handlers::events))
        // A rebuild runs workers: as long as a job, so no request timeout.
        .route("/v1/jobs/{id}/rebuild", post(handlers::rebuild))
        .route("/v1/jobs/{id}/steps/{step}/trace", get(trace::step_trace))
        .layer(DefaultBodyLimit::disable());
    bounded
        .merge(streaming)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no such endpoint (see docs/api.md)")
        })
        .layer(axum::middleware::from_fn_with_state(
            node.clone(),
            auth::authorize,
        ))
        .with_state(node)
}

/// The listening socket: inherited from systemd (`LISTEN_FDS`) or bound at `path` (mode 0666:
/// every local user may connect; authorization is per request from peer credentials).
pub fn listen(path: &Path) -> Result<UnixListener, ListenError> {
    let bind_err = |source| ListenError::Bind {
        path: path.display().to_string(),
        source,
    };
    if let Some(fd) = systemd_listen_fd() {
        // SAFETY: LISTEN_PID matched our pid, so fd 3 was passed to us by systemd as the listening
        // socket and nothing else in this process owns it.
        let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
        std_listener.set_nonblocking(true).map_err(bind_err)?;
        tracing::info!(fd, "using the socket passed by systemd");
        return UnixListener::from_std(std_listener).map_err(bind_err);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    if path.exists() {
        // A live daemon answers; a stale socket from a crash does not and is replaced.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ListenError::InUse(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(bind_err)?;
    Ok(listener)
}

/// fd 3 if systemd socket activation passed a socket to this process.
pub fn systemd_listen_fd() -> Option<RawFd> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    (pid == std::process::id() && fds >= 1).then_some(3)
}

/// Serve until `shutdown` is cancelled.
pub async fn serve(
    listener: UnixListener,
    node: Arc<Node>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let app = router(node).into_make_service_with_connect_info::<Peer>();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
