//! A sandbox's life beyond create and delete: BRANCH it into a new snapshot, pause it to disk
//! and resume it under the same id, read its serial console.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use forkd_store::Tag;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::sandboxes::check_timeout;
use super::{blocking, AppState};
use crate::registry::{BranchReport, SandboxRecord};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BranchRequest {
    /// The new snapshot's tag (default: `<id>-branch-<n>`, the first one free).
    #[serde(default)]
    pub tag: Option<String>,
    /// Save only the pages written since the sandbox's snapshot (or its last branch), with
    /// that snapshot as parent; false saves all of memory (a snapshot that stands alone).
    #[serde(default = "yes")]
    pub diff: bool,
}

fn yes() -> bool {
    true
}

impl Default for BranchRequest {
    fn default() -> BranchRequest {
        BranchRequest {
            tag: None,
            diff: true,
        }
    }
}

/// A JSON body that may be left out (an empty body is the defaults).
fn optional_json<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("request body: {e}")))
}

/// BRANCH: snapshots a running sandbox into a new tag; the sandbox runs on, and sandboxes can
/// be created from the new tag at once. Answers with the pause it cost.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/branch", tag = "sandboxes",
    params(("id" = String, Path, description = "The sandbox's id")),
    request_body(content = BranchRequest, description = "Optional: {} branches a diff under a generated tag"),
    responses((status = 201, description = "The new snapshot", body = BranchReport),
              (status = 400, description = "Malformed request", body = ErrorBody),
              (status = 404, description = "No such sandbox", body = ErrorBody),
              (status = 409, description = "The tag is taken, or the sandbox is paused", body = ErrorBody)))]
pub async fn branch(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<BranchReport>), ApiError> {
    let body: BranchRequest = optional_json(&body)?;
    let registry = state.registry.clone();
    state.registry.get(&id)?;
    let tag = match body.tag {
        Some(tag) => Tag::parse(&tag).map_err(|e| ApiError::bad_request(e.to_string()))?,
        None => free_branch_tag(&state.store, &id)?,
    };
    let report = blocking(move || registry.branch(&id, &tag, body.diff)).await??;
    state.metrics.branched(report.pause_ms);
    Ok((StatusCode::CREATED, Json(report)))
}

/// `<id>-branch-<n>` with the first `n` whose tag is free.
pub(crate) fn free_branch_tag(store: &forkd_store::Store, id: &str) -> Result<Tag, ApiError> {
    (1..)
        .map(|n| Tag::parse(&format!("{id}-branch-{n}")))
        .find(|t| t.as_ref().map_or(true, |t| !store.exists(t)))
        .expect("an unbounded range has a free tag")
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Suspends a running sandbox to disk: its state is saved (a diff of its snapshot), its
/// process ends, its id stays. Paused sandboxes do not time out and survive daemon restarts.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", tag = "sandboxes",
    params(("id" = String, Path, description = "The sandbox's id")),
    responses((status = 200, description = "Paused", body = SandboxRecord),
              (status = 404, description = "No such sandbox", body = ErrorBody),
              (status = 409, description = "Already paused", body = ErrorBody)))]
pub async fn pause(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<SandboxRecord>, ApiError> {
    let registry = state.registry.clone();
    Ok(Json(blocking(move || registry.pause(&id)).await??))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    /// Seconds until it is killed, from now (default: the timeout it was created with).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// Restores a paused sandbox under the same id, where it left off.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", tag = "sandboxes",
    params(("id" = String, Path, description = "The sandbox's id")),
    request_body(content = ResumeRequest, description = "Optional"),
    responses((status = 200, description = "Running again", body = SandboxRecord),
              (status = 400, description = "Malformed request", body = ErrorBody),
              (status = 404, description = "No such sandbox", body = ErrorBody),
              (status = 409, description = "Not paused", body = ErrorBody)))]
pub async fn resume(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<SandboxRecord>, ApiError> {
    let body: ResumeRequest = optional_json(&body)?;
    let timeout = body.timeout_secs.map(check_timeout).transpose()?;
    let registry = state.registry.clone();
    Ok(Json(
        blocking(move || registry.resume(&id, timeout)).await??,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Only the last this many bytes (default: all of it, up to 4 MiB).
    pub tail: Option<u64>,
}

/// Most of a console log one request returns.
const MAX_LOG_BYTES: u64 = 4 << 20;

/// The sandbox's serial console since it was restored (kernel and init messages of a Linux
/// guest, the demo guest's output), as text.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/logs", tag = "sandboxes",
    params(("id" = String, Path, description = "The sandbox's id"), LogsQuery),
    responses((status = 200, description = "The console output", content_type = "text/plain"),
              (status = 404, description = "No such sandbox", body = ErrorBody),
              (status = 409, description = "Paused: no console", body = ErrorBody)))]
pub async fn logs(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let record = state.registry.running(&id)?;
    let tail = query.tail.unwrap_or(MAX_LOG_BYTES).min(MAX_LOG_BYTES);
    let text = blocking(move || read_tail(&record.serial_log, tail))
        .await?
        .map_err(|e| {
            ApiError::internal(format!(
                "console log of {id}: {}",
                forkd_store::error_chain(&e)
            ))
        })?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text))
}

/// The last `tail` bytes of `path` (a missing file: nothing was written yet).
fn read_tail(path: &std::path::Path, tail: u64) -> std::io::Result<Vec<u8>> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(tail)))?;
    let mut bytes = Vec::new();
    file.take(tail).read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_tail_is_the_last_bytes_and_a_missing_log_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        assert!(read_tail(&path, 10).unwrap().is_empty());
        std::fs::write(&path, b"0123456789").unwrap();
        assert_eq!(read_tail(&path, 3).unwrap(), b"789");
        assert_eq!(read_tail(&path, 100).unwrap(), b"0123456789");
    }
}
