//! The HTTP layer: routes, authentication, audit, body limits, JSON errors and the OpenAPI
//! document. Handlers parse requests and call the engine; nothing here is engine logic.

pub mod error;
pub mod files;
pub mod jobs;
pub mod lifecycle;
pub mod metrics;
pub mod process;
pub mod processes;
pub mod sandboxes;
pub mod snapshots;
pub mod system;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::audit::AuditLog;
use error::ApiError;

/// Every resource lives under this prefix; a breaking change gets a new one.
pub const API_PREFIX: &str = "/v1";

/// What every handler can reach.
pub struct AppState {
    pub store: Arc<forkd_store::Store>,
    pub jobs: crate::jobs::Jobs,
    pub registry: Arc<crate::registry::Registry>,
    pub metrics: metrics::Metrics,
    /// How long a request waits for a sandbox's agent to accept a connection and answer.
    pub agent_timeout: std::time::Duration,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "forkd",
        description = "Fork microVMs from warmed snapshots: the forkd daemon's API.",
        license(name = "Apache-2.0")
    ),
    tags(
        (name = "system", description = "Liveness and versions"),
        (name = "snapshots", description = "The store's snapshots"),
        (name = "jobs", description = "Long-running work (pulls) and its progress"),
        (name = "sandboxes", description = "Running children of snapshots"),
        (name = "process", description = "Commands and code run inside a sandbox"),
        (name = "files", description = "A sandbox's files")
    )
)]
struct ApiDoc;

/// The routes and the OpenAPI document derived from their handlers.
fn routes() -> (Router<Arc<AppState>>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(system::healthz))
        .routes(routes!(system::version))
        .routes(routes!(metrics::metrics))
        .routes(routes!(snapshots::list_snapshots, snapshots::pull_snapshot))
        .routes(routes!(snapshots::get_snapshot, snapshots::delete_snapshot))
        .routes(routes!(jobs::list_jobs))
        .routes(routes!(jobs::get_job))
        .routes(routes!(
            sandboxes::create_sandboxes,
            sandboxes::list_sandboxes,
            sandboxes::delete_sandboxes
        ))
        .routes(routes!(sandboxes::get_sandbox, sandboxes::delete_sandbox))
        .routes(routes!(sandboxes::set_timeout))
        .routes(routes!(lifecycle::branch))
        .routes(routes!(lifecycle::pause))
        .routes(routes!(lifecycle::resume))
        .routes(routes!(lifecycle::logs))
        .routes(routes!(process::exec))
        .routes(routes!(process::eval))
        .routes(routes!(process::ping))
        .routes(routes!(files::download, files::upload, files::remove))
        .routes(routes!(files::stat))
        .routes(routes!(files::list))
        .routes(routes!(files::mkdir))
        .routes(routes!(processes::start, processes::list))
        .routes(routes!(processes::wait))
        .routes(routes!(processes::kill))
        .split_for_parts()
}

/// The OpenAPI document, as served at `/openapi.json` and checked into the repository.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().1
}

/// The OpenAPI document as pretty JSON with a final newline (the checked-in form).
pub fn openapi_json() -> String {
    let mut text = openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

/// Runs blocking engine work (store files, zygote sockets, agent connections) off the async
/// workers.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// Who is asking, for the audit log and for authentication.
#[derive(Debug, Clone)]
pub enum Client {
    /// Through the Unix socket: trusted by the socket's permissions.
    Unix,
    /// Over TCP from this address: must present the token when one is set.
    Tcp(std::net::SocketAddr),
}

impl Client {
    pub(crate) fn label(&self) -> String {
        match self {
            Client::Unix => "unix".into(),
            Client::Tcp(addr) => addr.to_string(),
        }
    }
}

/// Per-listener settings the middleware needs.
struct Gate {
    /// sha256 of the token: comparing fixed-size digests in constant time leaks neither the
    /// token's bytes nor its length.
    token_digest: Option<[u8; 32]>,
    audit: Option<Arc<AuditLog>>,
    state: Arc<AppState>,
}

/// The router for one listener: `token` (TCP only) is required of every request but
/// `/healthz`; every request is audited when `audit` is set.
pub fn router(
    state: Arc<AppState>,
    token: Option<&str>,
    audit: Option<Arc<AuditLog>>,
    max_body_bytes: usize,
) -> Router {
    let (api, doc) = routes();
    let doc = Arc::new(doc);
    let gate = Arc::new(Gate {
        token_digest: token.map(|t| Sha256::digest(t.as_bytes()).into()),
        audit,
        state: state.clone(),
    });
    api.route(
        "/openapi.json",
        axum::routing::get(move || {
            let doc = doc.clone();
            async move { axum::Json(doc.as_ref().clone()) }
        }),
    )
    .fallback(|| async { ApiError::not_found("no such endpoint") })
    .method_not_allowed_fallback(|| async {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this endpoint does not take this method",
        )
    })
    .layer(DefaultBodyLimit::max(max_body_bytes))
    .layer(middleware::from_fn_with_state(gate, gate_request))
    .with_state(state)
}

/// Authentication, then the request, then its audit record; and JSON bodies for the
/// rejections axum itself produces (payload too large).
async fn gate_request(State(gate): State<Arc<Gate>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let client = request
        .extensions()
        .get::<Client>()
        .cloned()
        .unwrap_or(Client::Unix);
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let response = match authorize(&gate, &client, &request) {
        Ok(()) => json_rejection(next.run(request).await),
        Err(e) => e.into_response(),
    };
    gate.state.metrics.request(response.status().as_u16());
    if let Some(audit) = &gate.audit {
        let label = client.label();
        audit.record(
            &label,
            &method,
            &path,
            response.status().as_u16(),
            started.elapsed(),
        );
    }
    response
}

fn authorize(gate: &Gate, client: &Client, request: &Request) -> Result<(), ApiError> {
    let (Some(expected), Client::Tcp(_)) = (&gate.token_digest, client) else {
        return Ok(());
    };
    if request.uri().path() == "/healthz" {
        return Ok(());
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| Sha256::digest(t.trim().as_bytes()));
    match presented {
        Some(digest) if bool::from(digest.as_slice().ct_eq(expected)) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the bearer token is wrong",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this listener needs `Authorization: Bearer <token>`",
        )),
    }
}

/// axum answers some rejections itself in plain text (a body over the limit); give them the
/// API's JSON error shape.
fn json_rejection(response: Response) -> Response {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    match response.status() {
        StatusCode::PAYLOAD_TOO_LARGE if !is_json => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is larger than this daemon accepts",
        )
        .into_response(),
        _ => response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in document is what the handlers describe: regenerate it with
    /// `FORKD_UPDATE_OPENAPI=1 cargo test -p forkd-daemon openapi` after changing the API.
    #[test]
    fn the_checked_in_openapi_document_matches_the_handlers() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
        let generated = openapi_json();
        if std::env::var_os("FORKD_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "{} differs from the handlers' document; regenerate it with \
             FORKD_UPDATE_OPENAPI=1 cargo test -p forkd-daemon openapi",
            path.display()
        );
    }

    #[test]
    fn the_document_lists_every_route() {
        let doc = openapi();
        for path in [
            "/healthz",
            "/version",
            "/metrics",
            "/v1/snapshots",
            "/v1/snapshots/{tag}",
            "/v1/jobs",
            "/v1/jobs/{id}",
            "/v1/sandboxes",
            "/v1/sandboxes/{id}",
            "/v1/sandboxes/{id}/timeout",
            "/v1/sandboxes/{id}/exec",
            "/v1/sandboxes/{id}/eval",
            "/v1/sandboxes/{id}/ping",
            "/v1/sandboxes/{id}/files",
            "/v1/sandboxes/{id}/files/stat",
            "/v1/sandboxes/{id}/files/list",
            "/v1/sandboxes/{id}/files/mkdir",
            "/v1/sandboxes/{id}/processes",
            "/v1/sandboxes/{id}/processes/{pid}",
            "/v1/sandboxes/{id}/processes/{pid}/wait",
            "/v1/sandboxes/{id}/branch",
            "/v1/sandboxes/{id}/pause",
            "/v1/sandboxes/{id}/resume",
            "/v1/sandboxes/{id}/logs",
        ] {
            assert!(doc.paths.paths.contains_key(path), "{path} missing");
        }
        let item = &doc.paths.paths["/v1/snapshots/{tag}"];
        assert!(item.get.is_some() && item.delete.is_some());
    }

    /// Generators name client methods after operation ids: each must be unique, and every
    /// parameter must say where it goes as the handler reads it.
    #[test]
    fn operation_ids_are_unique_and_the_log_tail_is_a_query_parameter() {
        let doc = serde_json::to_value(openapi()).unwrap();
        let mut ids = std::collections::BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if let Some(id) = op["operationId"].as_str() {
                    assert!(ids.insert(id.to_string()), "{method} {path}: {id} twice");
                }
            }
        }
        let params = &doc["paths"]["/v1/sandboxes/{id}/logs"]["get"]["parameters"];
        let tail = params
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "tail")
            .unwrap();
        assert_eq!(tail["in"], "query");
    }
}
