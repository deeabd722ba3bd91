//! `POST /v1/images` (import a root filesystem tar; submitters only, like `/v1/blobs`) and
//! `GET /v1/images` (list). The upload is streamed to a private temporary file, capped at
//! `api.max_blob_bytes` (413 beyond), then read entry by entry off the async runtime; a tree
//! whose files (hard links counted in full) exceed `[images] max_total_bytes` is refused (413).

use std::io::{Seek, Write};
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use super::ApiError;
use crate::image::{self, ImageError};
use crate::pipeline::Node;

type ApiResult<T> = Result<T, ApiError>;

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "image request failed");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// `POST /v1/images`: the body is a tar of the root filesystem.
pub async fn import(State(node): State<Arc<Node>>, body: Body) -> ApiResult<Response> {
    let limit = node.config.api.max_blob_bytes;
    let tmp_dir = node.store.root.join("cas").join("tmp");
    let mut file = tempfile::Builder::new()
        .prefix("image-")
        .tempfile_in(&tmp_dir)
        .map_err(internal)?;
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("reading body: {e}")))?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("image tar larger than the limit of {limit} bytes (api.max_blob_bytes)"),
            ));
        }
        file.write_all(&chunk).map_err(internal)?;
    }
    let node2 = node.clone();
    let result = tokio::task::spawn_blocking(move || {
        file.as_file_mut()
            .rewind()
            .map_err(|source| ImageError::Tar { source })?;
        let reader = std::io::BufReader::new(file.as_file());
        image::import(
            &node2.store,
            reader,
            node2.config.images.max_total_bytes,
            &crate::pipeline::now(),
        )
    })
    .await
    .map_err(internal)?;
    match result {
        Ok(imported) => {
            let status = if imported.existed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok((status, Json(imported)).into_response())
        }
        Err(e @ ImageError::TooLarge { .. }) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            crate::error_chain(&e),
        )),
        Err(
            e @ (ImageError::Tar { .. }
            | ImageError::Entry { .. }
            | ImageError::Empty
            | ImageError::TooManyEntries { .. }),
        ) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            crate::error_chain(&e),
        )),
        Err(e) => Err(internal(crate::error_chain(&e))),
    }
}

/// `GET /v1/images`: every image on the node, newest first.
pub async fn list(State(node): State<Arc<Node>>) -> ApiResult<Response> {
    Ok(Json(node.store.db.images().map_err(internal)?).into_response())
}
