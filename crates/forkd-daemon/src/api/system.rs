//! Liveness and identity: `/healthz`, `/version`.

use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the daemon answers.
    pub status: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Version {
    /// forkd's version.
    pub version: String,
    /// The API's version prefix.
    pub api: String,
}

/// The daemon is up and serving.
#[utoipa::path(get, path = "/healthz", tag = "system",
    responses((status = 200, description = "The daemon answers", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// This daemon's version and API version.
#[utoipa::path(get, path = "/version", tag = "system",
    responses((status = 200, description = "Versions", body = Version)))]
pub async fn version() -> Json<Version> {
    Json(Version {
        version: env!("CARGO_PKG_VERSION").into(),
        api: super::API_PREFIX.trim_start_matches('/').into(),
    })
}
