//! `/metrics`: Prometheus text exposition of what the daemon does — sandboxes by state,
//! spawns and their latency, restores, execs, requests by status class, pulls.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::AppState;

type Labels = Vec<(String, String)>;

/// The daemon's metrics; handlers record into them, `/metrics` encodes them.
pub struct Metrics {
    registry: Registry,
    sandboxes: Family<Labels, Gauge>,
    /// Sandboxes created (counted per sandbox) and create requests that failed.
    pub spawned: Counter,
    pub spawn_failures: Counter,
    /// Wall-clock of a create request (all of its sandboxes running).
    pub spawn_request: Histogram,
    /// Restore time of each sandbox, measured inside its process.
    pub restore: Histogram,
    pub execs: Counter,
    /// How long each BRANCH stopped its sandbox's guest.
    pub branch_pause: Histogram,
    requests: Family<Labels, Counter>,
    warm_shells: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("forkd");
        let sandboxes = Family::<Labels, Gauge>::default();
        registry.register("sandboxes", "Sandboxes by state", sandboxes.clone());
        let spawned = Counter::default();
        registry.register("sandboxes_created", "Sandboxes created", spawned.clone());
        let spawn_failures = Counter::default();
        registry.register(
            "sandbox_create_failures",
            "Create requests that failed",
            spawn_failures.clone(),
        );
        // 1 ms .. ~65 s.
        let spawn_request = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        registry.register(
            "sandbox_create_seconds",
            "Wall-clock of a create request until all its sandboxes run",
            spawn_request.clone(),
        );
        let restore = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "sandbox_restore_seconds",
            "Restore time of each sandbox, measured in its process",
            restore.clone(),
        );
        let execs = Counter::default();
        registry.register("execs", "Commands run in sandboxes", execs.clone());
        // 0.5 ms .. ~16 s.
        let branch_pause = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "branch_pause_seconds",
            "How long a BRANCH stopped its sandbox's guest",
            branch_pause.clone(),
        );
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "http_requests",
            "API requests by status class",
            requests.clone(),
        );
        let warm_shells = Family::<Labels, Gauge>::default();
        registry.register(
            "warm_shells",
            "VM shells prepared ahead of demand, by snapshot",
            warm_shells.clone(),
        );
        Metrics {
            warm_shells,
            registry,
            sandboxes,
            spawned,
            spawn_failures,
            spawn_request,
            restore,
            execs,
            branch_pause,
            requests,
        }
    }
}

impl Metrics {
    /// Counts a request by its status class (`2xx`, `4xx`, ...).
    pub fn request(&self, status: u16) {
        let class = format!("{}xx", status / 100);
        self.requests
            .get_or_create(&vec![("status".to_string(), class)])
            .inc();
    }

    /// A create request that started `restores.len()` sandboxes in `wall`.
    pub fn created(&self, wall: Duration, restores: impl Iterator<Item = f64>) {
        self.spawn_request.observe(wall.as_secs_f64());
        for ms in restores {
            self.spawned.inc();
            self.restore.observe(ms / 1e3);
        }
    }

    /// A BRANCH that paused its sandbox for `pause_ms`.
    pub fn branched(&self, pause_ms: f64) {
        self.branch_pause.observe(pause_ms / 1e3);
    }

    fn encode(
        &self,
        sandboxes: &[crate::registry::SandboxRecord],
        warm: &[(String, usize)],
    ) -> String {
        self.warm_shells.clear();
        for (tag, ready) in warm {
            self.warm_shells
                .get_or_create(&vec![("tag".to_string(), tag.clone())])
                .set(*ready as i64);
        }
        use crate::registry::SandboxState;
        for state in [SandboxState::Running, SandboxState::Paused] {
            let count = sandboxes.iter().filter(|s| s.state == state).count();
            self.sandboxes
                .get_or_create(&vec![("state".to_string(), state.as_str().to_string())])
                .set(count as i64);
        }
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text exposition",
               content_type = "application/openmetrics-text")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let sandboxes = state.registry.list();
    let registry = state.registry.clone();
    let warm = super::blocking(move || registry.warm_shells())
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(&sandboxes, &warm),
    )
}
