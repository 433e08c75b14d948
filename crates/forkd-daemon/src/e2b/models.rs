//! E2B's control-plane JSON, as its SDKs send and parse it: camelCase keys, the fields their
//! generated models require, `{"code": <status>, "message"}` errors.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `POST /v2/sandboxes` (and v1 `POST /sandboxes`, which adds `secure`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Seconds; E2B's SDKs leave it out for their default.
    #[serde(default)]
    pub timeout: Option<u64>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// Pause instead of kill at the timeout: forkd kills, so `true` is refused.
    #[serde(default)]
    pub auto_pause: Option<bool>,
    /// E2B's switch for the sandbox's internet access (its SDKs send `true` unless told
    /// otherwise). `false` denies a forkd sandbox all egress; `true` keeps the policy its
    /// snapshot recorded (forkd does not open egress a snapshot did not: see `create`).
    #[serde(default, rename = "allow_internet_access")]
    pub allow_internet_access: Option<bool>,
}

/// `POST /sandboxes/{id}/timeout`.
#[derive(Debug, Deserialize)]
pub struct SetTimeout {
    pub timeout: u64,
}

/// `POST /v2/sandboxes/{id}/connect`, v1 `/connect` and `/resume`: all optional here.
#[derive(Debug, Default, Deserialize)]
pub struct Connect {
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// `POST /sandboxes/{id}/fork`.
#[derive(Debug, Default, Deserialize)]
pub struct Fork {
    #[serde(default)]
    pub timeout: Option<u64>,
    #[serde(default)]
    pub count: Option<u32>,
}

/// `POST /sandboxes/{id}/snapshots`.
#[derive(Debug, Default, Deserialize)]
pub struct NewSnapshot {
    #[serde(default)]
    pub name: Option<String>,
}

/// A sandbox as create and connect answer it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub alias: String,
    pub envd_version: String,
    pub envd_access_token: String,
    pub domain: Option<String>,
}

/// A sandbox as get and list answer it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxDetail {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub alias: String,
    /// RFC 3339.
    pub started_at: String,
    pub end_at: String,
    pub envd_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub metadata: BTreeMap<String, String>,
    /// `running` or `paused`.
    pub state: String,
}

/// One sample of `GET /sandboxes/{id}/metrics`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Metric {
    pub timestamp: String,
    pub timestamp_unix: i64,
    pub cpu_count: u32,
    pub cpu_used_pct: f64,
    pub mem_used: u64,
    pub mem_total: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

/// One outcome of `POST /sandboxes/{id}/fork`.
#[derive(Debug, Serialize)]
pub struct Forked {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Sandbox>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// `POST /sandboxes/{id}/snapshots`' answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotMade {
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    pub names: Vec<String>,
}

/// E2B's error body: the HTTP status again as `code`, and a one-line message.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    pub code: u16,
    pub message: String,
}
