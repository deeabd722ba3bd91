//! Minimal HTTP/1.1 client for the kilnd Unix socket (hyper), with the API's error bodies
//! turned into readable errors.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kiln_common::api::ErrorBody;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

/// An error response from kilnd, kept typed so `main` can pick the exit code.
#[derive(Debug)]
pub struct ApiFailure {
    /// HTTP status.
    pub status: StatusCode,
    /// Body.
    pub body: ErrorBody,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.body.error)?;
        for d in &self.body.details {
            write!(f, "\n  {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiFailure {}

/// kilnd could not be reached at all.
#[derive(Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// Client bound to a socket path.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client for `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
        }
    }

    /// Send one request; non-2xx responses become [`ApiFailure`].
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &str)>,
    ) -> anyhow::Result<Response<Incoming>> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            anyhow!(Unreachable(format!(
                "cannot connect to kilnd at {}: {e} (is kilnd running? set --socket or KILN_SOCKET)",
                self.socket.display()
            )))
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake with kilnd")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://kilnd{path}"))
            .header("host", "kilnd");
        let body = match body {
            Some((b, ct)) => {
                req = req.header("content-type", ct);
                Full::new(b)
            }
            None => Full::new(Bytes::new()),
        };
        let resp = sender
            .send_request(req.body(body)?)
            .await
            .context("request to kilnd")?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(http_body_util::Collected::to_bytes)
            .unwrap_or_default();
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| ErrorBody {
            error: format!(
                "kilnd answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            ),
            details: Vec::new(),
        });
        Err(anyhow!(ApiFailure { status, body }))
    }

    /// GET and decode JSON.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let bytes = self.get_bytes(path).await?;
        serde_json::from_slice(&bytes).with_context(|| format!("decoding kilnd's answer to {path}"))
    }

    /// GET the whole body.
    pub async fn get_bytes(&self, path: &str) -> anyhow::Result<Bytes> {
        let resp = self.send(Method::GET, path, None).await?;
        Ok(resp
            .into_body()
            .collect()
            .await
            .context("reading response")?
            .to_bytes())
    }

    /// POST JSON and decode JSON.
    pub async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let b = Bytes::from(serde_json::to_vec(body)?);
        self.send_json(Method::POST, path, Some((b, "application/json")))
            .await
    }

    /// Send and decode JSON.
    pub async fn send_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &str)>,
    ) -> anyhow::Result<T> {
        let resp = self.send(method, path, body).await?;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .context("reading response")?
            .to_bytes();
        serde_json::from_slice(&bytes).with_context(|| format!("decoding kilnd's answer to {path}"))
    }
}
