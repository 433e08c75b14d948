//! `/v1/sandboxes/{id}/files`: a sandbox's files through its agent — download and upload
//! (streamed both ways, any size), stat, list, remove, mkdir.

use std::io::{self, Read, Write};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use utoipa::IntoParams;

use super::error::{ApiError, ErrorBody};
use super::process::{agent_error, agent_of};
use super::{blocking, AppState};
use crate::registry::SandboxRecord;
use forkd_agent::client::ClientError;
use forkd_sandbox::exec::AgentConn;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FileParams {
    /// Absolute path in the guest.
    pub path: String,
    /// Upload, mkdir: the new file's or directory's permission bits, octal (default 644 for
    /// a file, 755 for a directory).
    #[serde(default)]
    pub mode: Option<String>,
    /// Upload: create missing parent directories.
    #[serde(default)]
    pub create_dirs: bool,
    /// Remove: a directory with everything in it.
    #[serde(default)]
    pub recursive: bool,
    /// Mkdir: create missing parents too, and accept a directory that exists (`mkdir -p`).
    #[serde(default)]
    pub parents: bool,
}

fn params(query: Result<Query<FileParams>, QueryRejection>) -> Result<FileParams, ApiError> {
    let Query(p) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if !p.path.starts_with('/') || p.path.contains('\0') {
        return Err(ApiError::bad_request(format!(
            "path {:?} is not an absolute path in the guest",
            p.path
        )));
    }
    Ok(p)
}

/// Downloads a file; the body streams as it is read in the guest.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "The sandbox's id"), FileParams),
    responses((status = 200, description = "The file's bytes", content_type = "application/octet-stream"),
              (status = 400, description = "Not an absolute path", body = ErrorBody),
              (status = 404, description = "No such sandbox or file", body = ErrorBody)))]
pub async fn download(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: Result<Query<FileParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let p = params(query)?;
    let (record, client) = agent_of(&state, id, "file download").await?;
    stream_download(record, client, p.path.clone())
        .await?
        .map_err(|(record, e)| agent_error(&record, format!("stat {}", p.path), e))
}

/// The guest file at `path` as a response whose body streams as it is read. A stat comes
/// first, so a missing file is an error here (the agent's, with the record it is about)
/// rather than a stream that breaks.
pub(crate) async fn stream_download(
    record: SandboxRecord,
    mut client: AgentConn,
    path: String,
) -> Result<Result<Response, (SandboxRecord, ClientError)>, ApiError> {
    let stat_path = path.clone();
    let (record, stat, mut client) = blocking(move || {
        let stat = client.stat(&stat_path);
        (record, stat, client)
    })
    .await?;
    let stat = match stat {
        Ok(stat) => stat,
        Err(e) => return Ok(Err((record, e))),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, io::Error>>(8);
    tokio::task::spawn_blocking(move || {
        let mut sink = ChannelWrite { tx: tx.clone() };
        if let Err(e) = client.read_file(&path, &mut sink) {
            let _ = tx.blocking_send(Err(io::Error::other(forkd_store::error_chain(&e))));
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Ok(Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, stat.size.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response()))
}

/// A `Write` that hands each chunk to the response stream.
struct ChannelWrite {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, io::Error>>,
}

impl Write for ChannelWrite {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.tx
            .blocking_send(Ok(Bytes::copy_from_slice(data)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Uploads the request body to a file; the file appears, whole, only when the upload ends.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "The sandbox's id"), FileParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, description = "Written: its size in bytes", body = Object),
              (status = 400, description = "Bad path or mode", body = ErrorBody),
              (status = 404, description = "No such sandbox or directory", body = ErrorBody)))]
pub async fn upload(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: Result<Query<FileParams>, QueryRejection>,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let p = params(query)?;
    let mode = octal_mode(p.mode.as_deref())?;
    let (record, mut client) = agent_of(&state, id, "file upload").await?;
    let (tx, mut source) = ChannelRead::new();
    let mut chunks = body.into_data_stream();
    tokio::spawn(async move {
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| io::Error::other(e.to_string()));
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
    });
    let path = p.path.clone();
    let written = blocking(move || {
        client
            .write_file(&path, &mut source, mode, p.create_dirs)
            .map_err(|e| agent_error(&record, format!("upload to {path}"), e))
    })
    .await??;
    Ok(Json(serde_json::json!({ "path": p.path, "size": written })))
}

/// A `mode=` parameter: octal permission bits.
fn octal_mode(text: Option<&str>) -> Result<Option<u32>, ApiError> {
    let Some(text) = text else { return Ok(None) };
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .map(Some)
        .ok_or_else(|| ApiError::bad_request(format!("mode {text:?} is not octal permission bits")))
}

/// A blocking `Read` over a request body's chunks, sent to it from the async side.
pub(crate) struct ChannelRead {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, io::Error>>,
    current: Bytes,
}

impl ChannelRead {
    /// The reader and the sender that feeds it (an error sent makes the read fail; dropping
    /// the sender ends the stream).
    pub(crate) fn new() -> (
        tokio::sync::mpsc::Sender<Result<Bytes, io::Error>>,
        ChannelRead,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let reader = ChannelRead {
            rx,
            current: Bytes::new(),
        };
        (tx, reader)
    }
}

impl Read for ChannelRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// A file's kind, size, mode, times and owner.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/stat", tag = "files",
    params(("id" = String, Path, description = "The sandbox's id"), FileParams),
    responses((status = 200, description = "kind, size, mode, mtime_ms, uid, gid, link_target", body = Object),
              (status = 404, description = "No such sandbox or file", body = ErrorBody)))]
pub async fn stat(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: Result<Query<FileParams>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let p = params(query)?;
    let (record, mut client) = agent_of(&state, id, "file stat").await?;
    let stat = blocking(move || {
        client
            .stat(&p.path)
            .map_err(|e| agent_error(&record, format!("stat {}", p.path), e))
    })
    .await??;
    Ok(Json(serde_json::to_value(stat).expect("stats serialize")))
}

/// A directory's entries (name and stat each).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/list", tag = "files", operation_id = "list_files",
    params(("id" = String, Path, description = "The sandbox's id"), FileParams),
    responses((status = 200, description = "entries (name, stat) and truncated", body = Object),
              (status = 404, description = "No such sandbox or directory", body = ErrorBody)))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: Result<Query<FileParams>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let p = params(query)?;
    let (record, mut client) = agent_of(&state, id, "file list").await?;
    let listing = blocking(move || {
        client
            .list_dir(&p.path)
            .map_err(|e| agent_error(&record, format!("list {}", p.path), e))
    })
    .await??;
    Ok(Json(
        serde_json::to_value(listing).expect("listings serialize"),
    ))
}

/// Removes a file, or a directory (with `recursive`, and everything in it).
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "The sandbox's id"), FileParams),
    responses((status = 200, description = "What was removed (its kind)", body = Object),
              (status = 404, description = "No such sandbox or file", body = ErrorBody)))]
pub async fn remove(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: Result<Query<FileParams>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let p = params(query)?;
    let (record, mut client) = agent_of(&state, id, "file remove").await?;
    let removed = blocking(move || {
        client
            .remove(&p.path, p.recursive)
            .map_err(|e| agent_error(&record, format!("remove {}", p.path), e))
    })
    .await??;
    Ok(Json(
        serde_json::to_value(removed).expect("results serialize"),
    ))
}

/// Creates a directory: 201 with its stat, or 200 when `parents` is set and it already existed.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/mkdir", tag = "files",
    params(("id" = String, Path, description = "The sandbox's id"), FileParams),
    responses((status = 201, description = "Created: path, created (true), stat", body = Object),
              (status = 200, description = "With parents, it already was a directory: created false", body = Object),
              (status = 400, description = "Not an absolute path, or a bad mode", body = ErrorBody),
              (status = 404, description = "No such sandbox, or a missing parent without parents", body = ErrorBody),
              (status = 409, description = "The path exists, or a parent is not a directory", body = ErrorBody)))]
pub async fn mkdir(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: Result<Query<FileParams>, QueryRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let p = params(query)?;
    let mode = octal_mode(p.mode.as_deref())?;
    let (record, mut client) = agent_of(&state, id, "mkdir").await?;
    let path = p.path.clone();
    let made = blocking(move || {
        client
            .mkdir(&path, p.parents, mode)
            .map_err(|e| agent_error(&record, format!("mkdir {path}"), e))
    })
    .await??;
    let status = if made.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = serde_json::json!({ "path": p.path, "created": made.created, "stat": made.stat });
    Ok((status, Json(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(text: &str) -> Result<Query<FileParams>, QueryRejection> {
        let uri: axum::http::Uri = format!("/x?{text}").parse().unwrap();
        Query::try_from_uri(&uri)
    }

    #[test]
    fn paths_must_be_absolute_and_modes_octal() {
        let p = params(query("path=/a/b&parents=true&mode=700")).unwrap();
        assert!(p.parents);
        assert_eq!(octal_mode(p.mode.as_deref()).unwrap(), Some(0o700));
        assert_eq!(octal_mode(None).unwrap(), None);
        for bad in [
            "path=a/b",
            "path=",
            "path=/a%00b",
            "parents=true",
            "path=/a&colour=red",
        ] {
            let err = params(query(bad)).map(|_| ()).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        for bad in ["8", "17777", "rwx", "-1"] {
            let err = octal_mode(Some(bad)).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(err.message.contains(bad), "{}", err.message);
        }
    }
}
