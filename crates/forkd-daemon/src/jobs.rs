//! Long-running work the API starts and clients poll (pulls from a hub): each job has an id,
//! a state, and progress in bytes. No HTTP here beyond the error body jobs record.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use utoipa::ToSchema;

use crate::api::error::ErrorBody;

/// Finished jobs kept for clients to read; older ones are forgotten first.
const KEEP_FINISHED: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
}

/// A job as clients see it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobView {
    pub id: String,
    /// What it does: `pull`.
    pub kind: String,
    /// What it was asked (the pulled reference).
    pub target: String,
    pub state: JobState,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// Bytes done so far, and in all when known.
    pub bytes_done: u64,
    pub bytes_total: Option<u64>,
    /// What a finished job produced (a pull: the snapshot's tag).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// One job; the worker advances `progress` and finishes it once.
pub struct Job {
    view: Mutex<JobView>,
    /// Hidden bar the work advances; its position and length are the job's bytes.
    pub progress: forkd_hub::ProgressBar,
}

impl Job {
    pub fn id(&self) -> String {
        self.lock().id.clone()
    }

    pub fn view(&self) -> JobView {
        let mut view = self.lock().clone();
        view.bytes_done = self.progress.position();
        view.bytes_total = self.progress.length().or(view.bytes_total);
        view
    }

    pub fn succeed(&self, result: serde_json::Value) {
        let mut view = self.lock();
        view.state = JobState::Succeeded;
        view.result = Some(result);
    }

    pub fn fail(&self, error: ErrorBody) {
        let mut view = self.lock();
        view.state = JobState::Failed;
        view.error = Some(error);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JobView> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    jobs: Mutex<BTreeMap<u64, Arc<Job>>>,
}

impl Jobs {
    /// Registers a running job.
    pub fn start(&self, kind: &str, target: &str) -> Arc<Job> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Arc::new(Job {
            view: Mutex::new(JobView {
                id: format!("job-{n}"),
                kind: kind.to_string(),
                target: target.to_string(),
                state: JobState::Running,
                started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                bytes_done: 0,
                bytes_total: None,
                result: None,
                error: None,
            }),
            progress: forkd_hub::ProgressBar::hidden(),
        });
        let mut jobs = self.lock();
        jobs.insert(n, job.clone());
        forget_old(&mut jobs);
        job
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        let n: u64 = id.strip_prefix("job-")?.parse().ok()?;
        self.lock().get(&n).cloned()
    }

    pub fn list(&self) -> Vec<JobView> {
        let mut jobs = self.lock();
        forget_old(&mut jobs);
        jobs.values().map(|j| j.view()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Drops the oldest finished jobs beyond [`KEEP_FINISHED`]; running ones always stay.
fn forget_old(jobs: &mut BTreeMap<u64, Arc<Job>>) {
    let finished: Vec<u64> = jobs
        .iter()
        .filter(|(_, j)| j.lock().state != JobState::Running)
        .map(|(n, _)| *n)
        .collect();
    for n in finished
        .iter()
        .take(finished.len().saturating_sub(KEEP_FINISHED))
    {
        jobs.remove(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_report_progress_and_their_end() {
        let jobs = Jobs::default();
        let job = jobs.start("pull", "acme/demo");
        assert_eq!(job.id(), "job-1");
        job.progress.set_length(100);
        job.progress.set_position(40);
        let view = jobs.get("job-1").unwrap().view();
        assert_eq!(
            (view.state, view.bytes_done, view.bytes_total),
            (JobState::Running, 40, Some(100))
        );
        job.succeed(serde_json::json!({"tag": "demo"}));
        assert_eq!(jobs.get("job-1").unwrap().view().state, JobState::Succeeded);
        assert!(jobs.get("job-2").is_none() && jobs.get("nonsense").is_none());
    }

    #[test]
    fn old_finished_jobs_are_forgotten_but_running_ones_stay() {
        let jobs = Jobs::default();
        let running = jobs.start("pull", "first");
        for i in 0..KEEP_FINISHED + 5 {
            jobs.start("pull", &i.to_string()).fail(ErrorBody {
                code: "x".into(),
                message: "y".into(),
            });
        }
        let list = jobs.list();
        assert_eq!(list.len(), KEEP_FINISHED + 1);
        assert!(jobs.get(&running.id()).is_some());
    }
}
