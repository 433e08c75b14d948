//! E2B's envd plane (port 49983 of a sandbox) on forkd's agent: `/health`, the `/files`
//! upload and download endpoints, and the Connect services of envd that map onto the agent's
//! file operations (`Stat`, `ListDir`, `MakeDir`, `Remove`, `Move`). A request reaches it through the dispatcher in [`super`], which has found
//! the sandbox it is for ([`Target`]).

use futures_util::StreamExt;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine;
use forkd_agent::protocol::{ErrorCode, FileKind, FileStat};
use forkd_sandbox::exec::AgentConn;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::connect::{self, ConnectError};
use super::{E2b, E2bError};
use crate::api::blocking;
use crate::api::error::ApiError;
use crate::api::process::{agent_error, agent_of};
use crate::registry::SandboxRecord;

/// envd's port inside an E2B sandbox.
pub const ENVD_PORT: u16 = 49983;
/// Where relative paths (and `~`) resolve: the home of the guest's agent user.
const HOME: &str = "/root";
/// Deepest `ListDir` walk.
pub(super) const MAX_DEPTH: u32 = 16;

/// The sandbox a sandbox-plane request is for.
#[derive(Debug, Clone)]
pub struct Target {
    pub id: String,
}

pub fn router(e2b: Arc<E2b>) -> Router {
    Router::new()
        .route("/health", get(health))
        // Uploads stream into the guest, so their size is the guest disk's business.
        .route(
            "/files",
            get(download)
                .post(upload)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/filesystem.Filesystem/{method}", post(filesystem))
        .route("/process.Process/{method}", post(process))
        .fallback(|| async { E2bError::new(StatusCode::NOT_FOUND, "no such envd endpoint") })
        .layer(middleware::from_fn_with_state(e2b.clone(), check_access))
        .with_state(e2b)
}

/// envd's access rule: every route but `/health` needs the sandbox's `X-Access-Token`;
/// `/files` also takes a signed URL (`signature`, `signature_expiration`).
async fn check_access(State(e2b): State<Arc<E2b>>, request: Request, next: Next) -> Response {
    let Some(target) = request.extensions().get::<Target>().cloned() else {
        return E2bError::new(StatusCode::NOT_FOUND, "no sandbox named").into_response();
    };
    let path = request.uri().path();
    let token_ok = e2b.presents_token(&target, &request);
    let signed_ok = path == "/files" && signed(&request, &e2b.access_token(&target.id));
    if path == "/health" || token_ok || signed_ok {
        return next.run(request).await;
    }
    E2bError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized access, please provide a valid access token or method signing if supported",
    )
    .into_response()
}

/// Whether a `/files` request carries a valid, unexpired signature of E2B's form.
pub(super) fn signed(request: &Request, token: &str) -> bool {
    let Ok(Query(q)) = Query::<FileQuery>::try_from_uri(request.uri()) else {
        return false;
    };
    let (Some(path), Some(signature)) = (q.path.as_deref(), q.signature.as_deref()) else {
        return false;
    };
    let operation = if request.method() == axum::http::Method::GET {
        "read"
    } else {
        "write"
    };
    let mut text = format!(
        "{path}:{operation}:{}:{token}",
        q.username.as_deref().unwrap_or("")
    );
    if let Some(expiration) = q.signature_expiration {
        if expiration < chrono::Utc::now().timestamp() {
            return false;
        }
        text.push_str(&format!(":{expiration}"));
    }
    let digest = Sha256::digest(text.as_bytes());
    let expected = format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    );
    bool::from(expected.as_bytes().ct_eq(signature.as_bytes()))
}

#[derive(Debug, Default, Deserialize)]
struct FileQuery {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    signature: Option<String>,
    #[serde(default)]
    signature_expiration: Option<i64>,
}

/// An absolute guest path: relative ones and `~` are under the agent user's home.
fn resolve(path: &str) -> Result<String, String> {
    if path.contains('\0') {
        return Err(format!("path {path:?} contains a NUL byte"));
    }
    let path = match path {
        "" | "~" => HOME.to_string(),
        p if p.starts_with("~/") => format!("{HOME}/{}", &p[2..]),
        p if p.starts_with('/') => p.to_string(),
        p => format!("{HOME}/{p}"),
    };
    Ok(path)
}

/// The sandbox's agent, for `what`.
async fn agent(
    e2b: &E2b,
    target: &Target,
    what: &'static str,
) -> Result<(SandboxRecord, AgentConn), ApiError> {
    agent_of(&e2b.state, target.id.clone(), what).await
}

/// 204 while the sandbox runs; E2B's 502 "was not found" otherwise, which its SDK's
/// `is_running()` reads as not running.
async fn health(State(e2b): State<Arc<E2b>>, Extension(target): Extension<Target>) -> Response {
    let registry = e2b.state.registry.clone();
    let id = target.id.clone();
    match blocking(move || registry.running(&id)).await {
        Ok(Ok(_)) => StatusCode::NO_CONTENT.into_response(),
        _ => E2bError::new(
            StatusCode::BAD_GATEWAY,
            format!("The sandbox {} was not found or is not running", target.id),
        )
        .into_response(),
    }
}

// ---- /files ------------------------------------------------------------------------------

async fn download(
    State(e2b): State<Arc<E2b>>,
    Extension(target): Extension<Target>,
    query: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, E2bError> {
    let Query(q) = query.map_err(|e| E2bError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let path = resolve(q.path.as_deref().unwrap_or(""))
        .map_err(|e| E2bError::new(StatusCode::BAD_REQUEST, e))?;
    let (record, client) = agent(&e2b, &target, "file download").await?;
    crate::api::files::stream_download(record, client, path.clone())
        .await?
        .map_err(|(record, e)| files_error(&record, &path, e))
}

fn files_error(
    record: &SandboxRecord,
    path: &str,
    e: forkd_agent::client::ClientError,
) -> E2bError {
    if e.code() == Some(ErrorCode::NotFound) {
        return E2bError::new(
            StatusCode::NOT_FOUND,
            format!("path '{path}' does not exist"),
        );
    }
    agent_error(record, format!("file {path}"), e).into()
}

#[derive(Debug, Serialize)]
struct WrittenEntry {
    path: String,
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
}

/// Uploads: multipart (`file` parts, each part's filename its path when the query has none)
/// or a raw body (`application/octet-stream`, gzip-encoded or not) to `path`. Each file
/// streams into the guest as it arrives, whatever its size, and appears whole or not at all;
/// a full guest disk is E2B's 507.
async fn upload(
    State(e2b): State<Arc<E2b>>,
    Extension(target): Extension<Target>,
    request: Request,
) -> Result<Json<Vec<WrittenEntry>>, E2bError> {
    let bad = |m: String| E2bError::new(StatusCode::BAD_REQUEST, m);
    let q = Query::<FileQuery>::try_from_uri(request.uri())
        .map(|Query(q)| q)
        .map_err(|e| bad(e.body_text()))?;
    let headers: HeaderMap = request.headers().clone();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let query_path = q.path.as_deref().filter(|p| !p.is_empty());
    let mut written = Vec::new();
    if content_type.starts_with("multipart/form-data") {
        let malformed = |e: axum::extract::multipart::MultipartError| {
            bad(format!("malformed multipart upload: {e}"))
        };
        let mut form = Multipart::from_request(request, &())
            .await
            .map_err(|e| bad(format!("malformed multipart upload: {e}")))?;
        while let Some(mut field) = form.next_field().await.map_err(malformed)? {
            if field.name() != Some("file") {
                continue;
            }
            let dest = match (query_path, field.file_name()) {
                (Some(p), _) => p.to_string(),
                (_, Some(name)) => name.to_string(),
                _ => {
                    return Err(bad(
                        "a file part has no filename and the query no path".into()
                    ))
                }
            };
            let upload = Upload::start(&e2b, &target, &dest, false).await?;
            loop {
                match field.chunk().await {
                    Ok(Some(chunk)) => upload.send(Ok(chunk)).await,
                    Ok(None) => break,
                    Err(e) => {
                        upload.send(Err(std::io::Error::other(e.to_string()))).await;
                        break;
                    }
                }
            }
            written.push(upload.finish().await?);
        }
    } else {
        let Some(dest) = query_path else {
            return Err(bad("an octet-stream upload needs ?path=".into()));
        };
        let gzip = headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        let upload = Upload::start(&e2b, &target, dest, gzip).await?;
        let mut chunks = request.into_body().into_data_stream();
        while let Some(chunk) = chunks.next().await {
            upload
                .send(chunk.map_err(|e| std::io::Error::other(e.to_string())))
                .await;
        }
        written.push(upload.finish().await?);
    }
    if written.is_empty() {
        return Err(bad("the upload holds no file".to_string()));
    }
    Ok(Json(written))
}

/// One file on its way into the guest: the async side sends its chunks, a blocking task
/// writes them through the agent (gunzipping them first when `gzip`).
struct Upload {
    path: String,
    chunks: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    writer: tokio::task::JoinHandle<Result<(), E2bError>>,
}

impl Upload {
    async fn start(e2b: &E2b, target: &Target, path: &str, gzip: bool) -> Result<Upload, E2bError> {
        let path = resolve(path).map_err(|e| E2bError::new(StatusCode::BAD_REQUEST, e))?;
        let (record, mut client) = agent(e2b, target, "file upload").await?;
        let (chunks, source) = crate::api::files::ChannelRead::new();
        let dest = path.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let result = if gzip {
                let mut plain = flate2::read::GzDecoder::new(source);
                client.write_file(&dest, &mut plain, None, true)
            } else {
                let mut source = source;
                client.write_file(&dest, &mut source, None, true)
            };
            result.map(drop).map_err(|e| {
                if gzip && e.to_string().contains("gzip") {
                    return E2bError::new(
                        StatusCode::BAD_REQUEST,
                        format!("the gzip body does not decode: {e}"),
                    );
                }
                files_error(&record, &dest, e)
            })
        });
        Ok(Upload {
            path,
            chunks,
            writer,
        })
    }

    /// Hands a chunk (or the failure that ends the body) to the writer; a writer that has
    /// already failed says why in `finish`.
    async fn send(&self, chunk: Result<Bytes, std::io::Error>) {
        let _ = self.chunks.send(chunk).await;
    }

    async fn finish(self) -> Result<WrittenEntry, E2bError> {
        drop(self.chunks);
        self.writer.await.map_err(|e| {
            E2bError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("upload task: {e}"),
            )
        })??;
        let name = self.path.rsplit('/').next().unwrap_or_default().to_string();
        Ok(WrittenEntry {
            path: self.path,
            name,
            kind: "file",
        })
    }
}

// ---- filesystem.Filesystem ---------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PathMessage {
    #[serde(default)]
    path: String,
    /// `Move`'s.
    #[serde(default)]
    source: String,
    #[serde(default)]
    destination: String,
    #[serde(default)]
    depth: Option<u32>,
}

async fn filesystem(
    State(e2b): State<Arc<E2b>>,
    Extension(target): Extension<Target>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ConnectError> {
    if method.ends_with("Watcher") || method == "GetWatcherEvents" {
        return watcher(&e2b, &target, &method, &body).await;
    }
    if method == "WatchDir" {
        return watch_dir(&e2b, &target, &headers, &body).await;
    }
    let what = match method.as_str() {
        "Stat" => "stat",
        "ListDir" => "list",
        "MakeDir" => "mkdir",
        "Remove" => "remove",
        "Move" => "move",
        other => {
            return Err(ConnectError::new(
                "unimplemented",
                format!("filesystem.Filesystem/{other} is not served by forkd yet"),
            ))
        }
    };
    let message: PathMessage = connect::message(&body)?;
    let resolved = |p: &str| resolve(p).map_err(|e| ConnectError::new("invalid_argument", e));
    let (path, destination) = match what {
        "move" => (resolved(&message.source)?, resolved(&message.destination)?),
        _ => (resolved(&message.path)?, String::new()),
    };
    let depth = message.depth.unwrap_or(1).clamp(1, MAX_DEPTH);
    let (record, mut client) = agent(&e2b, &target, "filesystem").await?;
    let (record, answer) = blocking(move || {
        let answer = match what {
            "stat" => client
                .stat(&path)
                .map(|s| serde_json::json!({ "entry": entry(&path, &s) })),
            "list" => {
                list_entries(&mut client, &path, depth).map(|e| serde_json::json!({ "entries": e }))
            }
            "mkdir" => make_dir(&mut client, &path),
            "move" => client
                .rename(&path, &destination)
                .map(|s| serde_json::json!({ "entry": entry(&destination, &s) })),
            _ => remove(&mut client, &path),
        };
        (record, answer)
    })
    .await
    .map_err(ConnectError::from)?;
    let answer = answer.map_err(|e| agent_refusal(&record, &method, e))?;
    Ok(connect::unary(&answer))
}

/// `WatchDir`, the async SDK's streamed watch (see [`super::watch`]).
async fn watch_dir(
    e2b: &E2b,
    target: &Target,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ConnectError> {
    let message: super::watch::CreateMessage = connect::enveloped(body)?;
    let dir = resolve(&message.path).map_err(|e| ConnectError::new("invalid_argument", e))?;
    let (record, mut client) = agent(e2b, target, "filesystem watch").await?;
    let listed = dir.clone();
    let (record, client, first) = blocking(move || {
        let first = super::watch::first_listing(&mut client, &listed, message.recursive);
        (record, client, first)
    })
    .await
    .map_err(ConnectError::from)?;
    let first = first.map_err(|e| agent_refusal(&record, "WatchDir", e))?;
    Ok(super::watch::stream(client, dir, first, headers))
}

/// The polling watchers (see [`super::watch`]).
async fn watcher(
    e2b: &Arc<E2b>,
    target: &Target,
    method: &str,
    body: &[u8],
) -> Result<Response, ConnectError> {
    let (dir, depth, id, recursive) = match method {
        "CreateWatcher" => {
            let m: super::watch::CreateMessage = connect::message(body)?;
            let dir = resolve(&m.path).map_err(|e| ConnectError::new("invalid_argument", e))?;
            (dir, 0, None, m.recursive)
        }
        "GetWatcherEvents" | "RemoveWatcher" => {
            let m: super::watch::WatcherMessage = connect::message(body)?;
            let (dir, depth) = e2b.watchers.find(target, &m.watcher_id)?;
            if method == "RemoveWatcher" {
                return Ok(connect::unary(&e2b.watchers.remove(target, &m.watcher_id)?));
            }
            (dir, depth, Some(m.watcher_id), false)
        }
        other => {
            return Err(ConnectError::new(
                "unimplemented",
                format!("filesystem.Filesystem/{other} is not served by forkd"),
            ))
        }
    };
    let (record, mut client) = agent(e2b, target, "filesystem watch").await?;
    let (e2b2, target2, method2) = (e2b.clone(), target.clone(), method.to_string());
    let (record, answer) = blocking(move || {
        let answer = match id {
            None => e2b2.watchers.create(&target2, &mut client, dir, recursive),
            Some(id) => e2b2.watchers.poll(&id, &mut client, &dir, depth),
        };
        (record, answer)
    })
    .await
    .map_err(ConnectError::from)?;
    let answer = answer.map_err(|e| agent_refusal(&record, &method2, e))?;
    Ok(connect::unary(&answer))
}

/// An agent's answer to a filesystem call in Connect's terms, as envd gives them.
fn agent_refusal(
    record: &SandboxRecord,
    method: &str,
    e: forkd_agent::client::ClientError,
) -> ConnectError {
    let code = match e.code() {
        Some(ErrorCode::NotFound) => "not_found",
        Some(ErrorCode::AlreadyExists) => "already_exists",
        Some(ErrorCode::NotADirectory | ErrorCode::BadRequest) => "invalid_argument",
        Some(ErrorCode::PermissionDenied) => "permission_denied",
        Some(ErrorCode::Busy) => "resource_exhausted",
        Some(ErrorCode::UnknownOp) => "unimplemented",
        _ => return ConnectError::from(agent_error(record, method.to_string(), e)),
    };
    let message = match &e {
        forkd_agent::client::ClientError::Agent { message, .. } => message.clone(),
        other => other.to_string(),
    };
    ConnectError::new(code, message)
}

fn make_dir(
    client: &mut AgentConn,
    path: &str,
) -> Result<serde_json::Value, forkd_agent::client::ClientError> {
    let made = client.mkdir(path, true, None)?;
    if !made.created {
        return Err(forkd_agent::client::ClientError::Agent {
            code: ErrorCode::AlreadyExists,
            message: format!("directory {path} already exists"),
        });
    }
    Ok(serde_json::json!({ "entry": entry(path, &made.stat) }))
}

/// envd removes a path that is not there without complaint.
fn remove(
    client: &mut AgentConn,
    path: &str,
) -> Result<serde_json::Value, forkd_agent::client::ClientError> {
    match client.remove(path, true) {
        Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(serde_json::json!({})),
        other => other.map(|_| serde_json::json!({})),
    }
}

/// The entries under `dir`, `depth` levels down.
pub(super) fn list_entries(
    client: &mut AgentConn,
    dir: &str,
    depth: u32,
) -> Result<Vec<EntryInfo>, forkd_agent::client::ClientError> {
    let listed = client.list_dir(dir)?;
    let mut entries = Vec::new();
    for e in listed.entries {
        let path = format!("{}/{}", dir.trim_end_matches('/'), e.name);
        let is_dir = e.stat.kind == FileKind::Dir;
        entries.push(entry(&path, &e.stat));
        if is_dir && depth > 1 {
            entries.extend(list_entries(client, &path, depth - 1)?);
        }
    }
    Ok(entries)
}

/// envd's `EntryInfo`, in proto3 JSON.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct EntryInfo {
    name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub path: String,
    pub size: u64,
    pub mode: u32,
    permissions: String,
    owner: String,
    group: String,
    pub modified_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    symlink_target: Option<String>,
}

fn entry(path: &str, stat: &FileStat) -> EntryInfo {
    let (kind, letter) = match stat.kind {
        FileKind::File => ("FILE_TYPE_FILE", '-'),
        FileKind::Dir => ("FILE_TYPE_DIRECTORY", 'd'),
        FileKind::Symlink => ("FILE_TYPE_SYMLINK", 'l'),
        FileKind::Other => ("FILE_TYPE_UNSPECIFIED", '?'),
    };
    let name = match path.trim_end_matches('/').rsplit('/').next() {
        Some("") | None => "/".to_string(),
        Some(name) => name.to_string(),
    };
    EntryInfo {
        name,
        kind,
        path: path.to_string(),
        size: stat.size,
        mode: stat.mode,
        permissions: permissions(letter, stat.mode),
        owner: user_name(stat.uid),
        group: user_name(stat.gid),
        modified_time: chrono::DateTime::from_timestamp_millis(stat.mtime_ms)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        symlink_target: stat.link_target.clone(),
    }
}

/// `ls -l`'s mode column: `-rw-r--r--`.
fn permissions(letter: char, mode: u32) -> String {
    let mut text = String::from(letter);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        text.push(if bits & 4 != 0 { 'r' } else { '-' });
        text.push(if bits & 2 != 0 { 'w' } else { '-' });
        text.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    text
}

fn user_name(id: u32) -> String {
    if id == 0 {
        "root".to_string()
    } else {
        id.to_string()
    }
}

// ---- process.Process ---------------------------------------------------------------------

async fn process(
    State(e2b): State<Arc<E2b>>,
    Extension(target): Extension<Target>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    super::process::serve(e2b, target, &method, &headers, body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_under_the_agent_users_home() {
        assert_eq!(resolve("a/b").unwrap(), "/root/a/b");
        assert_eq!(resolve("~/x").unwrap(), "/root/x");
        assert_eq!(resolve("/etc").unwrap(), "/etc");
        assert_eq!(resolve("").unwrap(), "/root");
        assert!(resolve("a\0b").is_err());
    }

    #[test]
    fn permissions_read_like_ls() {
        assert_eq!(permissions('-', 0o644), "-rw-r--r--");
        assert_eq!(permissions('d', 0o755), "drwxr-xr-x");
    }
}
