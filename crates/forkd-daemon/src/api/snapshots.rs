//! `/v1/snapshots`: list, inspect and delete the store's snapshots.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use forkd_store::{RemoveMode, Snapshot, Tag};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::{blocking, AppState};

/// One snapshot, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotInfo {
    pub tag: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// The guest kernel (`builtin:<name>` for the built-in guests).
    pub kernel: String,
    pub description: String,
    /// The snapshot this one is a diff against; empty for a self-contained snapshot.
    pub parent_tag: String,
    /// Hub package (`namespace/name`) and version it was pulled as; empty when made here.
    pub package: String,
    pub package_version: String,
    /// Sum of the files' logical sizes.
    pub logical_bytes: u64,
    /// Blocks the files take on disk.
    pub disk_bytes: u64,
}

impl SnapshotInfo {
    fn of(snapshot: &Snapshot) -> SnapshotInfo {
        let m = &snapshot.manifest;
        SnapshotInfo {
            tag: m.tag.to_string(),
            created_at: m.created_at.clone(),
            memory_mib: m.memory_mib,
            vcpus: m.vcpus,
            kernel: m.kernel.clone(),
            description: m.description.clone(),
            parent_tag: m.parent_tag.clone(),
            package: m.name.clone(),
            package_version: m.version.clone(),
            logical_bytes: m.logical_size(),
            disk_bytes: snapshot.disk_usage(),
        }
    }
}

/// The store's snapshots, and those it could not read.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotInfo>,
    /// One line per snapshot directory that could not be read (it is left out above).
    pub unreadable: Vec<String>,
}

/// Lists the snapshots in the store.
#[utoipa::path(get, path = "/v1/snapshots", tag = "snapshots",
    responses((status = 200, description = "The snapshots", body = SnapshotList),
              (status = 500, description = "The store cannot be read", body = ErrorBody)))]
pub async fn list_snapshots(
    State(state): State<Arc<AppState>>,
) -> Result<Json<SnapshotList>, ApiError> {
    let store = state.store.clone();
    let entries = blocking(move || store.list()).await??;
    let mut list = SnapshotList {
        snapshots: Vec::new(),
        unreadable: Vec::new(),
    };
    for entry in entries {
        match entry {
            Ok(snapshot) => list.snapshots.push(SnapshotInfo::of(&snapshot)),
            Err(e) => list.unreadable.push(forkd_store::error_chain(&e)),
        }
    }
    Ok(Json(list))
}

/// One snapshot.
#[utoipa::path(get, path = "/v1/snapshots/{tag}", tag = "snapshots",
    params(("tag" = String, Path, description = "The snapshot's tag")),
    responses((status = 200, description = "The snapshot", body = SnapshotInfo),
              (status = 400, description = "Not a valid tag", body = ErrorBody),
              (status = 404, description = "No snapshot with this tag", body = ErrorBody)))]
pub async fn get_snapshot(
    State(state): State<Arc<AppState>>,
    Path(tag): Path<String>,
) -> Result<Json<SnapshotInfo>, ApiError> {
    let tag = parse_tag(&tag)?;
    let store = state.store.clone();
    let snapshot = blocking(move || store.get(&tag)).await??;
    Ok(Json(SnapshotInfo::of(&snapshot)))
}

/// How a delete treats snapshots that are diffs against the deleted one.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteParams {
    /// Delete those dependents too, transitively.
    #[serde(default)]
    pub cascade: bool,
    /// Delete anyway and leave the dependents orphaned.
    #[serde(default)]
    pub force: bool,
}

/// What a delete removed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    /// Every snapshot removed (with `cascade`, the dependents too).
    pub deleted: Vec<String>,
}

/// Deletes a snapshot; refused (409) while other snapshots are diffs against it, unless
/// `cascade` or `force`.
#[utoipa::path(delete, path = "/v1/snapshots/{tag}", tag = "snapshots",
    params(("tag" = String, Path, description = "The snapshot's tag"), DeleteParams),
    responses((status = 200, description = "Deleted", body = Deleted),
              (status = 400, description = "Bad tag or parameters", body = ErrorBody),
              (status = 404, description = "No snapshot with this tag", body = ErrorBody),
              (status = 409, description = "Other snapshots depend on it", body = ErrorBody)))]
pub async fn delete_snapshot(
    State(state): State<Arc<AppState>>,
    Path(tag): Path<String>,
    params: Result<Query<DeleteParams>, QueryRejection>,
) -> Result<Json<Deleted>, ApiError> {
    let tag = parse_tag(&tag)?;
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mode = match (params.cascade, params.force) {
        (true, true) => {
            return Err(ApiError::bad_request(
                "cascade and force exclude each other",
            ))
        }
        (true, false) => RemoveMode::Cascade,
        (false, true) => RemoveMode::Orphan,
        (false, false) => RemoveMode::Refuse,
    };
    let store = state.store.clone();
    let removed = blocking(move || store.remove(std::slice::from_ref(&tag), mode)).await??;
    Ok(Json(Deleted {
        deleted: removed.iter().map(Tag::to_string).collect(),
    }))
}

fn parse_tag(text: &str) -> Result<Tag, ApiError> {
    Tag::parse(text).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// What to pull, as `forkd pull` takes it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    /// `namespace/name[@version]` from the hub, a pack URL, or a pack file on the daemon's host.
    pub reference: String,
    /// The hub's URL or directory (default: the daemon's FORKD_HUB_URL, else the hub its user chose with forkd hub use).
    #[serde(default)]
    pub hub: Option<String>,
    /// Install under this tag (default: the package's name).
    #[serde(default)]
    pub tag: Option<String>,
    /// Replace a different snapshot already under the tag.
    #[serde(default)]
    pub force: bool,
}

/// Creates a snapshot by pulling it (as `forkd pull` does) in the background: the answer is
/// the job, which reports bytes as they arrive and the tag once installed.
#[utoipa::path(post, path = "/v1/snapshots", tag = "snapshots",
    request_body = PullRequest,
    responses((status = 202, description = "The pull started", body = crate::jobs::JobView),
              (status = 400, description = "Malformed request", body = ErrorBody),
              (status = 413, description = "Body too large", body = ErrorBody)))]
pub async fn pull_snapshot(
    State(state): State<Arc<AppState>>,
    body: Result<Json<PullRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<crate::jobs::JobView>), ApiError> {
    let Json(request) = body.map_err(|e| ApiError::from_json_rejection(&e))?;
    if request.reference.trim().is_empty() {
        return Err(ApiError::bad_request("reference is empty"));
    }
    let tag = request.tag.as_deref().map(parse_tag).transpose()?;
    let job = state.jobs.start("pull", &request.reference);
    let options = forkd_hub::PullOptions {
        hub: request.hub.clone(),
        tag,
        force: request.force,
        progress_bar: Some(job.progress.clone()),
        fetch: forkd_hub::FetchConfig::from_env(),
        ..forkd_hub::PullOptions::default()
    };
    let store = state.store.clone();
    let worker = job.clone();
    tokio::task::spawn_blocking(move || {
        match forkd_hub::pull(&store, &request.reference, &options) {
            Ok(report) => worker.succeed(serde_json::json!({
                "tag": report.outcome.snapshot().manifest.tag.to_string(),
                "already_present": matches!(report.outcome, forkd_hub::UnpackOutcome::AlreadyPresent(_)),
                "source": report.source,
                "fetched_bytes": report.fetched_bytes,
            })),
            Err(e) => worker.fail(ApiError::from_hub(&e).body()),
        }
    });
    Ok((StatusCode::ACCEPTED, Json(job.view())))
}
