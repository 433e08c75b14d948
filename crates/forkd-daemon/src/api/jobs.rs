//! `/v1/jobs`: the progress and outcome of long-running work.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::jobs::JobView;

#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobView>,
}

/// Every job still remembered (running ones, and the last finished ones).
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs",
    responses((status = 200, description = "The jobs", body = JobList)))]
pub async fn list_jobs(State(state): State<Arc<AppState>>) -> Json<JobList> {
    Json(JobList {
        jobs: state.jobs.list(),
    })
}

/// One job: its state, bytes done, and its result or error once finished.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The job's id, e.g. job-3")),
    responses((status = 200, description = "The job", body = JobView),
              (status = 404, description = "No such job", body = ErrorBody)))]
pub async fn get_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    state
        .jobs
        .get(&id)
        .map(|job| Json(job.view()))
        .ok_or_else(|| ApiError::not_found(format!("no job {id:?}")))
}
