//! E2B wire compatibility: E2B's SDKs, unmodified, drive forkd sandboxes through the daemon's
//! TCP listener (`E2B_API_URL=http://127.0.0.1:PORT`). A translation of E2B's planes onto the
//! same registry the `/v1` API uses; no second engine.
//!
//! - [`control`]: E2B's REST control plane (`X-API-Key`): create from a template (a snapshot
//!   tag), get, list, kill, timeout, pause, connect/resume, fork, snapshots, metrics.
//! - [`envd`]: port 49983 of a sandbox, E2B's in-sandbox daemon, on forkd's agent: health,
//!   `/files`, the filesystem service, the process service ([`process`]) ([`connect`]: the
//!   Connect protocol's JSON form).
//! - [`interpreter`]: port 49999, `e2b-code-interpreter`'s plane (streamed output, display
//!   formats, contexts), on the agent's warm interpreter.
//!
//! The API key is the daemon's token written as `e2b_<hex of the token's bytes>`; a daemon
//! without a token (loopback only) accepts any key of E2B's form, `e2b_<hex>`.

pub mod connect;
pub mod control;
pub mod envd;
pub mod interpreter;
pub mod models;
pub mod ports;
pub mod process;
pub mod watch;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use futures_util::FutureExt;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tower::ServiceExt;

use crate::api::error::ApiError;
use crate::api::AppState;
use crate::audit::AuditLog;

/// The envd version forkd's E2B planes answer as: E2B's SDKs gate features on it.
pub const ENVD_VERSION: &str = "0.5.7";
/// What `clientID` (deprecated in E2B, still required by its SDKs) says.
pub const CLIENT_ID: &str = "forkd";

/// The E2B planes' shared settings.
pub struct E2b {
    pub state: Arc<AppState>,
    /// sha256 of the one API key accepted; none: any `e2b_<hex>` key.
    key_digest: Option<[u8; 32]>,
    /// Keys the per-sandbox envd access tokens (kept in the state directory, so tokens survive
    /// a daemon restart as the sandboxes do).
    secret: [u8; 32],
    /// Commands started through envd's process service.
    pub commands: process::Commands,
    pub watchers: watch::Watchers,
    /// The sandbox each snapshot taken through E2B's `create_snapshot` came from.
    snapshot_sources: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

impl E2b {
    pub fn new(state: Arc<AppState>, token: Option<&str>, secret: [u8; 32]) -> E2b {
        E2b {
            state,
            key_digest: token.map(|t| Sha256::digest(api_key_for_token(t).as_bytes()).into()),
            secret,
            commands: process::Commands::default(),
            watchers: watch::Watchers::default(),
            snapshot_sources: Default::default(),
        }
    }

    /// The access token E2B's SDKs present to a sandbox's envd and code interpreter.
    pub fn access_token(&self, sandbox_id: &str) -> String {
        let mut hash = Sha256::new();
        hash.update(self.secret);
        hash.update(sandbox_id.as_bytes());
        hex(&hash.finalize()[..16])
    }

    /// Whether `request` carries the access token of the sandbox `target` names.
    pub(crate) fn presents_token(&self, target: &envd::Target, request: &Request) -> bool {
        let expected = self.access_token(&target.id);
        request
            .headers()
            .get("x-access-token")
            .is_some_and(|t| bool::from(t.as_bytes().ct_eq(expected.as_bytes())))
    }

    /// The sandbox whose access token signed a `/files` URL (`download_url()` and
    /// `upload_url()` carry no sandbox header in `E2B_SANDBOX_URL` mode, only the signature).
    fn signer_of(&self, request: &Request) -> Option<String> {
        if !request.uri().query()?.contains("signature=") {
            return None;
        }
        self.state
            .registry
            .list()
            .into_iter()
            .map(|record| record.id)
            .find(|id| envd::signed(request, &self.access_token(id)))
    }

    /// Whether this daemon has a token (and so checks keys and guards forwarded ports).
    fn requires_key(&self) -> bool {
        self.key_digest.is_some()
    }

    fn check_key(&self, presented: Option<&str>) -> Result<(), E2bError> {
        let Some(key) = presented.map(str::trim) else {
            return Err(E2bError::new(
                StatusCode::UNAUTHORIZED,
                "missing X-API-Key header: set E2B_API_KEY",
            ));
        };
        let well_formed = key
            .strip_prefix("e2b_")
            .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()));
        let accepted = match &self.key_digest {
            Some(expected) => bool::from(Sha256::digest(key.as_bytes()).ct_eq(expected)),
            None => well_formed,
        };
        if accepted {
            Ok(())
        } else {
            Err(E2bError::new(
                StatusCode::UNAUTHORIZED,
                "Invalid API key: this daemon takes e2b_ followed by its token in hex",
            ))
        }
    }
}

/// The E2B API key of a daemon whose token is `token`.
pub fn api_key_for_token(token: &str) -> String {
    format!("e2b_{}", hex(token.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads (or makes, once) the secret the access tokens are keyed with.
pub fn load_secret(state_dir: &std::path::Path) -> std::io::Result<[u8; 32]> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join("e2b-secret");
    match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == 32 => return Ok(bytes.try_into().expect("32 bytes")),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let secret: [u8; 32] = Sha256::digest(forkd_sandbox::exec::host_entropy()).into();
    let tmp = state_dir.join(".e2b-secret.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&secret)?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(secret)
}

/// Where a sandbox-plane request goes: the sandbox and the port in it, from the
/// `E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers (`E2B_SANDBOX_URL` mode) or a
/// `<port>-<id>.<domain>` Host name.
fn sandbox_target(request: &Request) -> Option<(String, u16)> {
    let headers = request.headers();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(id) = header("e2b-sandbox-id") {
        let port = header("e2b-sandbox-port")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(envd::ENVD_PORT);
        return Some((id.trim().to_string(), port));
    }
    let host = header("host")?;
    let (label, domain) = host.split_once('.')?;
    let (port, id) = label.split_once('-')?;
    let valid_id = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (valid_id && !domain.is_empty()).then_some(())?;
    Some((id.to_string(), port.parse().ok()?))
}

/// The TCP listener's router: E2B's requests to `e2b`'s planes, everything else to `api`.
/// E2B's requests are counted and audited here (forkd's API audits its own), under
/// `e2b <sandbox>:<port> <path>` for the sandbox planes and `e2b <path>` for the control plane.
pub fn with_e2b(api: Router, e2b: Arc<E2b>, audit: Option<Arc<AuditLog>>) -> Router {
    let control = control::router(e2b.clone());
    let envd = envd::router(e2b.clone());
    let interpreter = interpreter::router(e2b.clone());
    Router::new().fallback_service(tower::service_fn(move |mut request: Request| {
        let path = request.uri().path().to_string();
        let facts = RequestFacts {
            method: request.method().to_string(),
            client: client_of(&request),
        };
        let (plane, audited) = match sandbox_target(&request) {
            Some((id, port)) => {
                let label = format!("e2b {id}:{port} {path}");
                let target = envd::Target { id };
                if port != envd::ENVD_PORT && port != interpreter::INTERPRETER_PORT {
                    let forwarded = ports::forward(e2b.clone(), target, port, request);
                    let served = async move { Ok::<_, Infallible>(forwarded.await) };
                    return audited_call(e2b.clone(), audit.clone(), label, facts, served.boxed());
                }
                request.extensions_mut().insert(target);
                let plane = if port == envd::ENVD_PORT {
                    envd.clone()
                } else {
                    interpreter.clone()
                };
                (plane, Some(label))
            }
            None if path == "/files" && request.uri().query().is_some() => {
                match e2b.signer_of(&request) {
                    Some(id) => {
                        let label = format!("e2b {id}:{} {path}", envd::ENVD_PORT);
                        request.extensions_mut().insert(envd::Target { id });
                        (envd.clone(), Some(label))
                    }
                    None => (api.clone(), None),
                }
            }
            None if control::is_control_path(&path) => {
                (control.clone(), Some(format!("e2b {path}")))
            }
            None => (api.clone(), None),
        };
        let served = async move { plane.oneshot(request).await }.boxed();
        match audited {
            Some(label) => audited_call(e2b.clone(), audit.clone(), label, facts, served),
            None => served,
        }
    }))
}

/// Who asked what, kept before the request is handed on.
struct RequestFacts {
    method: String,
    client: String,
}

fn client_of(request: &Request) -> String {
    request
        .extensions()
        .get::<crate::api::Client>()
        .map_or_else(|| "unix".to_string(), |c| c.label())
}

type Served = futures_util::future::BoxFuture<'static, Result<Response, Infallible>>;

/// `served`, then its status counted in the daemon's metrics and its line in the audit log.
fn audited_call(
    e2b: Arc<E2b>,
    audit: Option<Arc<AuditLog>>,
    label: String,
    facts: RequestFacts,
    served: Served,
) -> Served {
    let started = Instant::now();
    async move {
        let response = served.await?;
        let status = response.status().as_u16();
        e2b.state.metrics.request(status);
        if let Some(audit) = &audit {
            audit.record(
                &facts.client,
                &facts.method,
                &label,
                status,
                started.elapsed(),
            );
        }
        Ok(response)
    }
    .boxed()
}

/// An error as E2B's SDKs parse it: `{"code": <status>, "message": "..."}`; `Should-Retry:
/// false` on the statuses their retry loop would otherwise replay.
#[derive(Debug, Clone)]
pub struct E2bError {
    pub status: StatusCode,
    pub message: String,
}

impl E2bError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> E2bError {
        E2bError {
            status,
            message: message.into(),
        }
    }
}

impl From<ApiError> for E2bError {
    fn from(e: ApiError) -> E2bError {
        E2bError::new(e.status, e.message)
    }
}

impl From<crate::registry::RegistryError> for E2bError {
    fn from(e: crate::registry::RegistryError) -> E2bError {
        ApiError::from_registry(&e).into()
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let body = models::ErrorBody {
            code: self.status.as_u16(),
            message: self.message,
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS || self.status.is_server_error() {
            response
                .headers_mut()
                .insert("should-retry", HeaderValue::from_static("false"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_key_is_the_token_in_hex() {
        assert_eq!(api_key_for_token("ab"), "e2b_6162");
    }

    #[test]
    fn secrets_are_kept_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_secret(dir.path()).unwrap();
        assert_eq!(load_secret(dir.path()).unwrap(), first);
        let mode = std::fs::metadata(dir.path().join("e2b-secret")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }
}
