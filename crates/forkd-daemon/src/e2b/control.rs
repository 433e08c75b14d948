//! E2B's control plane on forkd's registry: the REST calls E2B's `Sandbox` classes make, with
//! the statuses and bodies their generated clients expect (201 on create, 204 on kill, ...).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use forkd_store::{RemoveMode, Tag};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::models::{self, Forked, Metric, NewSandbox, SandboxDetail, SnapshotMade};
use super::{E2b, E2bError, CLIENT_ID, ENVD_VERSION};
use crate::api::blocking;
use crate::api::lifecycle::free_branch_tag;
use crate::api::sandboxes::{check_create, check_timeout, CreateSandboxes, NetworkSpec};
use crate::registry::{CreateRequest, SandboxRecord, SandboxState};
use forkd_sandbox::zygote::NetRequest;

/// A sandbox's timeout when E2B's SDK does not send one: E2B's documented five minutes.
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
/// Most sandboxes one E2B fork makes (E2B's own bound).
const MAX_FORK: u32 = 20;

/// The paths this plane serves (none of them under forkd's `/v1`).
pub fn is_control_path(path: &str) -> bool {
    path == "/sandboxes"
        || path.starts_with("/sandboxes/")
        || path == "/v2/sandboxes"
        || path.starts_with("/v2/sandboxes/")
        || path.starts_with("/templates/")
        || path == "/snapshots"
}

pub fn router(e2b: Arc<E2b>) -> Router {
    Router::new()
        .route("/v2/sandboxes", post(create).get(list_v2))
        .route("/sandboxes", post(create).get(list_v1))
        .route("/sandboxes/{id}", get(get_sandbox).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/resume", post(connect))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route(
            "/sandboxes/{id}/network",
            axum::routing::put(update_network),
        )
        .route("/sandboxes/{id}/fork", post(fork))
        .route("/sandboxes/{id}/snapshots", post(snapshot))
        .route("/snapshots", get(list_snapshots))
        .route("/templates/{id}", delete(delete_template))
        .fallback(|| async { E2bError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            E2bError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this endpoint does not take this method",
            )
        })
        .layer(middleware::from_fn_with_state(e2b.clone(), check_api_key))
        .with_state(e2b)
}

async fn check_api_key(State(e2b): State<Arc<E2b>>, request: Request, next: Next) -> Response {
    let key = request
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok());
    match e2b.check_key(key) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// A JSON body of E2B's; an empty body is the type's default, a malformed one a 400.
fn body_of<T: DeserializeOwned + Default>(bytes: &Bytes) -> Result<T, E2bError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse(bytes)
}

fn parse<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, E2bError> {
    serde_json::from_slice(bytes).map_err(|e| {
        E2bError::new(
            StatusCode::BAD_REQUEST,
            format!("malformed request body: {e}"),
        )
    })
}

fn timeout_of(secs: u64) -> Result<Duration, E2bError> {
    check_timeout(secs).map_err(|e| E2bError::new(e.status, format!("timeout: {}", e.message)))
}

// ---- create, get, list -------------------------------------------------------------------

async fn create(State(e2b): State<Arc<E2b>>, body: Bytes) -> Result<Response, E2bError> {
    let new: NewSandbox = parse(&body)?;
    if new.auto_pause == Some(true) {
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            "autoPause is not supported: a forkd sandbox is killed at its timeout (pause it with the API)",
        ));
    }
    let mut request = check_create(CreateSandboxes {
        tag: new.template_id.clone(),
        count: 1,
        timeout_secs: Some(new.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS)),
        metadata: new.metadata.unwrap_or_default(),
        env: new.env_vars.unwrap_or_default(),
        limits: Default::default(),
        network: None,
    })?;
    // `allow_internet_access: false`: no egress at all, whatever the snapshot recorded (a
    // template without a network device has none anyway). `true`, E2B's default that its
    // SDKs always send, is not taken as "open everything": the snapshot's recorded policy
    // applies, as for any forkd sandbox, and forkd's API opens more (`network.allow`).
    if new.allow_internet_access == Some(false) {
        let registry = e2b.state.registry.clone();
        let tag = request.tag.clone();
        // An unknown template is said by the create itself.
        if blocking(move || registry.has_network_device(&tag))
            .await?
            .unwrap_or(false)
        {
            request.network = Some(NetRequest {
                policy: Some(forkd_store::NetRecord::default()),
                publish: Vec::new(),
            });
        }
    }
    let made = start(&e2b, request).await?;
    let sandbox = made
        .into_iter()
        .next()
        .expect("one sandbox asked, one made");
    Ok((StatusCode::CREATED, Json(e2b.sandbox(&sandbox))).into_response())
}

/// Creates the sandboxes of `request`, a template E2B cannot find named as such.
async fn start(e2b: &E2b, request: CreateRequest) -> Result<Vec<SandboxRecord>, E2bError> {
    let template = request.tag.to_string();
    let registry = e2b.state.registry.clone();
    let made = blocking(move || registry.create(request)).await?;
    made.map_err(|e| {
        let mut error = E2bError::from(e);
        if error.status == StatusCode::NOT_FOUND {
            error.message =
                format!("template '{template}' not found: no forkd snapshot has this tag");
        }
        error
    })
}

async fn get_sandbox(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
) -> Result<Json<SandboxDetail>, E2bError> {
    let record = e2b.record(&id)?;
    Ok(Json(e2b.detail(&record)))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    #[serde(default)]
    metadata: Option<String>,
    /// Comma-separated `running`, `paused`.
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    next_token: Option<String>,
    /// Only sandboxes of this template (snapshot tag).
    #[serde(default)]
    template: Option<String>,
    /// Only those started at or after this RFC 3339 time.
    #[serde(default)]
    started_after: Option<String>,
    /// `asc` (default) or `desc`, by start time.
    #[serde(default)]
    order: Option<String>,
}

impl ListQuery {
    /// Whether `record` passes the template and start-time filters.
    fn admits(&self, record: &SandboxRecord) -> Result<bool, E2bError> {
        if self.template.as_deref().is_some_and(|t| t != record.tag) {
            return Ok(false);
        }
        let Some(after) = self.started_after.as_deref() else {
            return Ok(true);
        };
        let after = chrono::DateTime::parse_from_rfc3339(after).map_err(|e| {
            E2bError::new(
                StatusCode::BAD_REQUEST,
                format!("startedAfter {after:?}: {e}"),
            )
        })?;
        Ok(chrono::DateTime::parse_from_rfc3339(&record.created_at).is_ok_and(|t| t >= after))
    }
}

/// `GET /v2/sandboxes`: running and paused ones, filtered, a page at a time (`x-next-token`).
async fn list_v2(
    State(e2b): State<Arc<E2b>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, E2bError> {
    let query = query_of(query)?;
    let states = match query.state.as_deref() {
        None | Some("") => vec![SandboxState::Running, SandboxState::Paused],
        Some(text) => text.split(',').map(parse_state).collect::<Result<_, _>>()?,
    };
    let wanted = metadata_filter(query.metadata.as_deref())?;
    let mut records = Vec::new();
    for record in e2b.state.registry.list() {
        if states.contains(&record.state) && labelled(&record, &wanted) && query.admits(&record)? {
            records.push(record);
        }
    }
    records.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
    match query.order.as_deref() {
        None | Some("asc") => {}
        Some("desc") => records.reverse(),
        Some(other) => {
            return Err(E2bError::new(
                StatusCode::BAD_REQUEST,
                format!("order {other:?} is not asc or desc"),
            ))
        }
    }
    if let Some(after) = query.next_token.as_deref().filter(|t| !t.is_empty()) {
        let Some(at) = records.iter().position(|r| r.id == after) else {
            return Err(E2bError::new(
                StatusCode::BAD_REQUEST,
                format!("nextToken {after:?} is not a sandbox of this list"),
            ));
        };
        records.drain(..=at);
    }
    let limit = query.limit.unwrap_or(usize::MAX).max(1);
    let more = records.len() > limit;
    records.truncate(limit);
    let page: Vec<SandboxDetail> = records.iter().map(|r| e2b.detail(r)).collect();
    let mut response = Json(page).into_response();
    if let (true, Some(last)) = (more, records.last()) {
        if let Ok(token) = HeaderValue::from_str(&last.id) {
            response.headers_mut().insert("x-next-token", token);
        }
    }
    Ok(response)
}

/// `GET /sandboxes` (older SDKs): the running ones.
async fn list_v1(
    State(e2b): State<Arc<E2b>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<SandboxDetail>>, E2bError> {
    let query = query_of(query)?;
    let wanted = metadata_filter(query.metadata.as_deref())?;
    Ok(Json(
        e2b.state
            .registry
            .list()
            .iter()
            .filter(|r| r.state == SandboxState::Running && labelled(r, &wanted))
            .map(|r| e2b.detail(r))
            .collect(),
    ))
}

fn query_of<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, E2bError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| E2bError::new(StatusCode::BAD_REQUEST, e.body_text()))
}

fn parse_state(text: &str) -> Result<SandboxState, E2bError> {
    match text.trim() {
        "running" => Ok(SandboxState::Running),
        "paused" => Ok(SandboxState::Paused),
        other => Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            format!("state {other:?} is not running or paused"),
        )),
    }
}

fn labelled(record: &SandboxRecord, wanted: &BTreeMap<String, String>) -> bool {
    wanted
        .iter()
        .all(|(k, v)| record.metadata.get(k) == Some(v))
}

/// E2B's metadata filter: `k=v&k2=v2` with every key and value percent-encoded, the whole
/// percent-encoded again (what is left after the query string's own decoding).
fn metadata_filter(text: Option<&str>) -> Result<BTreeMap<String, String>, E2bError> {
    let mut wanted = BTreeMap::new();
    let Some(text) = text.filter(|t| !t.is_empty()) else {
        return Ok(wanted);
    };
    let bad = || {
        E2bError::new(
            StatusCode::BAD_REQUEST,
            format!("metadata filter {text:?} is not key=value pairs joined by &"),
        )
    };
    let decoded = unescape(text).ok_or_else(bad)?;
    for pair in decoded.split('&') {
        let mut parts = pair.split('=');
        let (Some(key), Some(value), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        wanted.insert(
            unescape(key).ok_or_else(bad)?,
            unescape(value).ok_or_else(bad)?,
        );
    }
    Ok(wanted)
}

fn unescape(text: &str) -> Option<String> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

// ---- its life ----------------------------------------------------------------------------

async fn kill(State(e2b): State<Arc<E2b>>, Path(id): Path<String>) -> Result<StatusCode, E2bError> {
    let registry = e2b.state.registry.clone();
    blocking(move || registry.delete(&id)).await??;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_timeout(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, E2bError> {
    let asked: models::SetTimeout = parse(&body)?;
    let timeout = timeout_of(asked.timeout)?;
    let registry = e2b.state.registry.clone();
    blocking(move || registry.set_timeout(&id, timeout)).await??;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    let registry = e2b.state.registry.clone();
    blocking(move || registry.pause(&id)).await??;
    Ok(StatusCode::NO_CONTENT)
}

/// Connect (v1, v2) and resume: a running sandbox answers 200 (its timeout moved when one is
/// given), a paused one is resumed and answers 201.
async fn connect(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, E2bError> {
    let asked: models::Connect = body_of(&body)?;
    let timeout = asked.timeout.map(timeout_of).transpose()?;
    let record = e2b.record(&id)?;
    let registry = e2b.state.registry.clone();
    let (status, record) = match record.state {
        SandboxState::Running => match timeout {
            Some(t) => (
                StatusCode::OK,
                blocking(move || registry.set_timeout(&id, t)).await??,
            ),
            None => (StatusCode::OK, record),
        },
        SandboxState::Paused => (
            StatusCode::CREATED,
            blocking(move || registry.resume(&id, timeout)).await??,
        ),
    };
    Ok((status, Json(e2b.sandbox(&record))).into_response())
}

/// `update_network`: a forkd sandbox's egress policy is set when it is created (forkd's
/// `network` section, or E2B's `allow_internet_access: false`) and not changed while it
/// runs; said plainly rather than as E2B's 404 (which its SDK reads as "sandbox not found").
async fn update_network(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
) -> Result<Response, E2bError> {
    e2b.record(&id)?;
    Err(E2bError::new(
        StatusCode::NOT_IMPLEMENTED,
        "a forkd sandbox's egress policy is set when it is created and cannot be changed while it runs",
    ))
}

/// One sample, now: the VMM process's resident memory against the guest's memory.
async fn metrics(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
) -> Result<Json<Vec<Metric>>, E2bError> {
    let record = e2b.record(&id)?;
    let detail = e2b.detail(&record);
    let now = chrono::Utc::now();
    Ok(Json(vec![Metric {
        timestamp: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        timestamp_unix: now.timestamp(),
        cpu_count: detail.cpu_count,
        cpu_used_pct: 0.0,
        mem_used: resident_bytes(record.pid).unwrap_or(0),
        mem_total: detail.memory_mb << 20,
        mem_cache: 0,
        disk_used: 0,
        disk_total: detail.disk_size_mb << 20,
    }]))
}

fn resident_bytes(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// `count` sandboxes continuing from this one's current state: a BRANCH, then a create.
async fn fork(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, E2bError> {
    let asked: models::Fork = body_of(&body)?;
    let count = asked.count.unwrap_or(1);
    if !(1..=MAX_FORK).contains(&count) {
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            format!("count {count} is not between 1 and {MAX_FORK}"),
        ));
    }
    let record = e2b.record(&id)?;
    let tag = branch(&e2b, &id, None).await?;
    let request = check_create(CreateSandboxes {
        tag,
        count,
        timeout_secs: Some(
            asked
                .timeout
                .or(record.timeout_secs)
                .unwrap_or(DEFAULT_TIMEOUT_SECS),
        ),
        metadata: record.metadata.clone(),
        env: record.env.clone(),
        limits: record.limits,
        // Its policy, not more: the branch may record another one (its snapshot's).
        network: record.network.as_ref().map(|n| NetworkSpec {
            allow: Some(n.allow.clone()),
            allow_dns: Some(n.allow_dns),
            publish: Vec::new(),
        }),
    })?;
    let made = start(&e2b, request).await?;
    let forked: Vec<Forked> = made
        .iter()
        .map(|s| Forked {
            sandbox: Some(e2b.sandbox(s)),
            error: None,
        })
        .collect();
    Ok((StatusCode::CREATED, Json(forked)).into_response())
}

/// A snapshot of the running sandbox, as a template new sandboxes can be created from.
async fn snapshot(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, E2bError> {
    let asked: models::NewSnapshot = body_of(&body)?;
    let tag = branch(&e2b, &id, asked.name.as_deref()).await?;
    e2b.snapshot_sources
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(tag.clone(), id.clone());
    let made = SnapshotMade {
        snapshot_id: tag.clone(),
        names: vec![tag],
    };
    Ok((StatusCode::CREATED, Json(made)).into_response())
}

/// BRANCHes sandbox `id` into `name` (default `<id>-branch-<n>`); the new tag.
async fn branch(e2b: &E2b, id: &str, name: Option<&str>) -> Result<String, E2bError> {
    let registry = e2b.state.registry.clone();
    let tag = match name {
        Some(name) => {
            Tag::parse(name).map_err(|e| E2bError::new(StatusCode::BAD_REQUEST, e.to_string()))?
        }
        None => free_branch_tag(&e2b.state.store, id)?,
    };
    let id = id.to_string();
    let report = blocking(move || registry.branch(&id, &tag, true)).await??;
    e2b.state.metrics.branched(report.pause_ms);
    Ok(report.tag)
}

#[derive(Debug, Default, Deserialize)]
struct SnapshotQuery {
    #[serde(default, rename = "sandboxID")]
    sandbox_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default, rename = "nextToken")]
    next_token: Option<String>,
}

/// `GET /snapshots`: the snapshots taken of sandboxes (BRANCHes: diffs, not pauses), by tag,
/// a page at a time; `sandboxID` keeps those of one sandbox (taken through this daemon, or
/// named `<id>-branch-N` by it).
async fn list_snapshots(
    State(e2b): State<Arc<E2b>>,
    query: Result<Query<SnapshotQuery>, QueryRejection>,
) -> Result<Response, E2bError> {
    let query = query_of(query)?;
    let store = e2b.state.store.clone();
    let snapshots = blocking(move || store.list())
        .await?
        .map_err(|e| E2bError::from(crate::api::error::ApiError::from_store(&e)))?;
    let sources = e2b
        .snapshot_sources
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut tags: Vec<String> = snapshots
        .into_iter()
        .flatten()
        .map(|s| s.manifest)
        .filter(|m| !m.parent_tag.is_empty() && !m.tag.as_str().starts_with("_paused-"))
        .map(|m| m.tag.to_string())
        .filter(|tag| query.name.as_deref().is_none_or(|n| n == tag))
        .filter(|tag| {
            query.sandbox_id.as_deref().is_none_or(|id| {
                sources.get(tag).map(String::as_str) == Some(id)
                    || tag.starts_with(&format!("{id}-branch-"))
            })
        })
        .collect();
    tags.sort();
    if let Some(after) = query.next_token.as_deref().filter(|t| !t.is_empty()) {
        tags.retain(|t| t.as_str() > after);
    }
    let limit = query.limit.unwrap_or(100).max(1);
    let more = tags.len() > limit;
    tags.truncate(limit);
    let page: Vec<SnapshotMade> = tags
        .iter()
        .map(|t| SnapshotMade {
            snapshot_id: t.clone(),
            names: vec![t.clone()],
        })
        .collect();
    let mut response = Json(page).into_response();
    if let (true, Some(last)) = (more, tags.last()) {
        if let Ok(token) = HeaderValue::from_str(last) {
            response.headers_mut().insert("x-next-token", token);
        }
    }
    Ok(response)
}

/// Deletes a snapshot (refused while others are diffs of it).
async fn delete_template(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    let tag = Tag::parse(&id).map_err(|e| E2bError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let store = e2b.state.store.clone();
    blocking(move || store.remove(std::slice::from_ref(&tag), RemoveMode::Refuse))
        .await?
        .map_err(|e| E2bError::from(crate::api::error::ApiError::from_store(&e)))?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- the shapes ---------------------------------------------------------------------------

impl E2b {
    fn record(&self, id: &str) -> Result<SandboxRecord, E2bError> {
        self.state.registry.get(id).map_err(|e| {
            let mut error = E2bError::from(e);
            if error.status == StatusCode::NOT_FOUND {
                error.message = format!("sandbox \"{id}\" not found");
            }
            error
        })
    }

    fn sandbox(&self, record: &SandboxRecord) -> models::Sandbox {
        models::Sandbox {
            template_id: record.tag.clone(),
            sandbox_id: record.id.clone(),
            client_id: CLIENT_ID.to_string(),
            alias: record.tag.clone(),
            envd_version: ENVD_VERSION.to_string(),
            envd_access_token: self.access_token(&record.id),
            domain: None,
        }
    }

    fn detail(&self, record: &SandboxRecord) -> SandboxDetail {
        let manifest = Tag::parse(&record.tag)
            .ok()
            .and_then(|tag| self.state.store.get(&tag).ok())
            .map(|snapshot| snapshot.manifest);
        let rootfs = manifest.as_ref().and_then(|m| {
            m.files
                .iter()
                .find(|f| f.name == forkd_store::manifest::ROOTFS_FILE)
                .map(|f| f.size)
        });
        SandboxDetail {
            template_id: record.tag.clone(),
            sandbox_id: record.id.clone(),
            client_id: CLIENT_ID.to_string(),
            alias: record.tag.clone(),
            started_at: record.created_at.clone(),
            end_at: record
                .expires_at
                .and_then(|secs| chrono::DateTime::from_timestamp(secs as i64, 0))
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_else(|| "9999-12-31T23:59:59Z".to_string()),
            envd_version: ENVD_VERSION.to_string(),
            envd_access_token: Some(self.access_token(&record.id)),
            cpu_count: manifest.as_ref().map_or(1, |m| m.vcpus),
            memory_mb: manifest.as_ref().map_or(0, |m| m.memory_mib),
            disk_size_mb: rootfs.map_or(0, |bytes| bytes >> 20),
            metadata: record.metadata.clone(),
            state: record.state.as_str().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metadata_filter_reverses_e2bs_encoding() {
        // The SDK's {"user": "alice bob", "k": "v=1"}, after the query string's decoding.
        let wanted = metadata_filter(Some("user=alice%2520bob&k=v%253D1")).unwrap();
        assert_eq!(wanted.get("user").map(String::as_str), Some("alice bob"));
        assert_eq!(wanted.get("k").map(String::as_str), Some("v=1"));
        assert!(metadata_filter(Some("a=b=c")).is_err());
        assert!(metadata_filter(Some("novalue")).is_err());
        assert!(metadata_filter(None).unwrap().is_empty());
    }

    #[test]
    fn only_e2bs_paths_are_taken_from_forkds_api() {
        for path in [
            "/sandboxes",
            "/sandboxes/x/pause",
            "/v2/sandboxes",
            "/templates/t",
        ] {
            assert!(is_control_path(path), "{path}");
        }
        for path in ["/v1/sandboxes", "/healthz", "/openapi.json", "/sandboxesx"] {
            assert!(!is_control_path(path), "{path}");
        }
    }
}
