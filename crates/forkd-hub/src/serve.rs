//! `forkd hub serve`: a hub over HTTP. Serves DIR read-only to anyone (GET / HEAD with Range,
//! via tower-http's ServeDir) and accepts authenticated pushes at
//! `PUT /api/v1/push/{ns}/{name}/{version}`, which store the pack and update registry.json
//! atomically (see `publish::update_registry`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use base64::Engine;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;
use tower_http::services::ServeDir;

use crate::error::{HubError, Result};
use crate::names::{check_package_name, check_version};
use crate::publish::{pack_rel_path, update_registry};
use crate::registry::VersionEntry;

/// Where pushes are accepted, relative to the server root.
pub const PUSH_PREFIX: &str = "/api/v1/push/";
/// GET with the bearer token: 204 when it would be accepted. Clients check this before
/// uploading gigabytes that a refusal would cut off mid-body.
pub const AUTH_PATH: &str = "/api/v1/auth";

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    /// Bearer token pushes must present; None allows pushes only on a loopback address.
    pub token: Option<String>,
    /// Largest pack a push may upload.
    pub max_push_bytes: u64,
    /// Whether a push makes its version `latest`.
    pub push_makes_latest: bool,
}

impl ServeOptions {
    pub fn new(dir: PathBuf, listen: SocketAddr) -> ServeOptions {
        ServeOptions {
            dir,
            listen,
            token: None,
            max_push_bytes: 64 << 30,
            push_makes_latest: true,
        }
    }
}

struct ServerState {
    dir: PathBuf,
    /// sha256 of the token: comparing fixed-size digests in constant time leaks neither the
    /// token's bytes nor its length.
    token_digest: Option<[u8; 32]>,
    max_push_bytes: u64,
    push_makes_latest: bool,
}

/// A bound, not yet running server.
pub struct Server {
    listener: tokio::net::TcpListener,
    router: Router,
    runtime: tokio::runtime::Runtime,
}

/// Reads a token file: the first line, trimmed; empty is refused.
pub fn read_token_file(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| HubError::io(path, e))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(HubError::Invalid(format!(
            "{}: token file is empty",
            path.display()
        )));
    }
    Ok(token)
}

impl Server {
    /// Validates the options and binds the listening socket.
    pub fn bind(opts: ServeOptions) -> Result<Server> {
        if opts.token.is_none() && !opts.listen.ip().is_loopback() {
            return Err(HubError::Invalid(format!(
                "refusing to listen on {} without a token: anyone could push (give it a token, or listen on a loopback address)",
                opts.listen
            )));
        }
        if !opts.dir.is_dir() {
            return Err(HubError::Invalid(format!(
                "{}: not a directory",
                opts.dir.display()
            )));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| HubError::io(Path::new("tokio runtime"), e))?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(opts.listen))
            .map_err(|e| HubError::Invalid(format!("cannot listen on {}: {e}", opts.listen)))?;
        let state = Arc::new(ServerState {
            dir: opts.dir.clone(),
            token_digest: opts
                .token
                .as_ref()
                .map(|t| Sha256::digest(t.as_bytes()).into()),
            max_push_bytes: opts.max_push_bytes,
            push_makes_latest: opts.push_makes_latest,
        });
        let router = Router::new()
            .route("/api/v1/push/{ns}/{name}/{version}", put(push_handler))
            .route(AUTH_PATH, get(auth_handler))
            .with_state(state)
            .fallback_service(ServeDir::new(&opts.dir))
            .layer(middleware::from_fn(hide_dotfiles));
        Ok(Server {
            listener,
            router,
            runtime,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound socket has an address")
    }

    /// Serves until the process is interrupted (Ctrl-C) or the listener fails.
    pub fn run(self) -> Result<()> {
        let Server {
            listener,
            router,
            runtime,
        } = self;
        runtime.block_on(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await
                .map_err(|e| HubError::io(Path::new("hub server"), e))
        })
    }
}

/// Staging files and the lock file are not part of the hub.
async fn hide_dotfiles(req: Request, next: Next) -> Response {
    if req.uri().path().split('/').any(|seg| seg.starts_with('.')) {
        return StatusCode::NOT_FOUND.into_response();
    }
    next.run(req).await
}

fn reject(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut r = (status, format!("{}\n", msg.into())).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("valid"));
    }
    r
}

/// None when the request may push; else the rejection to send.
fn refusal(state: &ServerState, headers: &HeaderMap) -> Option<Response> {
    let want = state.token_digest.as_ref()?;
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return Some(reject(
            StatusCode::UNAUTHORIZED,
            "push needs a bearer token",
        ));
    };
    let given: [u8; 32] = Sha256::digest(given.trim().as_bytes()).into();
    if bool::from(given.ct_eq(want)) {
        None
    } else {
        Some(reject(StatusCode::FORBIDDEN, "wrong token"))
    }
}

async fn auth_handler(State(state): State<Arc<ServerState>>, headers: HeaderMap) -> Response {
    refusal(&state, &headers).unwrap_or_else(|| StatusCode::NO_CONTENT.into_response())
}

async fn push_handler(
    State(state): State<Arc<ServerState>>,
    UrlPath((ns, name, version)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(r) = refusal(&state, &headers) {
        return r;
    }
    let package = format!("{ns}/{name}");
    if let Err(e) = check_package_name(&package).and_then(|_| check_version(&version)) {
        return reject(StatusCode::BAD_REQUEST, forkd_store::error_chain(&e));
    }
    let minisig = match headers.get("x-forkd-minisig").map(|v| {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_bytes())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
    }) {
        None => None,
        Some(Some(s)) => Some(s),
        Some(None) => {
            return reject(
                StatusCode::BAD_REQUEST,
                "X-Forkd-Minisig is not base64 UTF-8",
            )
        }
    };
    let incoming = state.dir.join(".incoming");
    if let Err(e) = tokio::fs::create_dir_all(&incoming).await {
        return reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    let tmp = incoming.join(format!(
        "{ns}.{name}.{version}.{}.{:x}",
        std::process::id(),
        rand_suffix()
    ));
    let received = receive(body, &tmp, state.max_push_bytes).await;
    let (size, sha) = match received {
        Ok(v) => v,
        Err(r) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return r;
        }
    };
    let st = state.clone();
    let tmp2 = tmp.clone();
    let result = tokio::task::spawn_blocking(move || {
        store_push(&st, &tmp2, &package, &version, size, sha, minisig)
    })
    .await;
    let _ = tokio::fs::remove_file(&tmp).await;
    match result {
        Ok(Ok(entry)) => (
            StatusCode::CREATED,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_string(&entry).expect("entry serializes"),
        )
            .into_response(),
        Ok(Err((status, msg))) => reject(status, msg),
        Err(e) => reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    nanos << 16 | N.fetch_add(1, Ordering::Relaxed)
}

/// Streams the request body to `path`, hashing it; refuses more than `max` bytes.
async fn receive(
    body: Body,
    path: &Path,
    max: u64,
) -> std::result::Result<(u64, String), Response> {
    let io = |e: std::io::Error| reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let mut file = tokio::fs::File::create(path).await.map_err(io)?;
    let mut stream = body.into_data_stream();
    let mut sha = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| reject(StatusCode::BAD_REQUEST, format!("upload broken: {e}")))?;
        size += chunk.len() as u64;
        if size > max {
            return Err(reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("pack larger than {max} bytes"),
            ));
        }
        sha.update(&chunk);
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.sync_all().await.map_err(io)?;
    Ok((size, hex::encode(sha.finalize())))
}

/// Verifies an uploaded pack, moves it into place and records it in registry.json.
fn store_push(
    state: &ServerState,
    tmp: &Path,
    package: &str,
    version: &str,
    size: u64,
    sha256: String,
    minisig: Option<String>,
) -> std::result::Result<VersionEntry, (StatusCode, String)> {
    let bad = |e: HubError| (StatusCode::BAD_REQUEST, forkd_store::error_chain(&e));
    let internal = |e: HubError| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            forkd_store::error_chain(&e),
        )
    };
    let origin = format!("pushed {package}@{version}");
    let file = std::fs::File::open(tmp).map_err(|e| internal(HubError::io(tmp, e)))?;
    let manifest =
        crate::unpack::verify_pack(std::io::BufReader::new(file), &origin).map_err(bad)?;
    if manifest.name != package || manifest.version != version {
        return Err((
            StatusCode::BAD_REQUEST,
            format!(
                "{origin}: the pack declares {}@{}",
                manifest.name, manifest.version
            ),
        ));
    }
    if let Some(sig) = &minisig {
        crate::sign::SignatureFile::parse(sig).map_err(bad)?;
    }
    let rel = pack_rel_path(package, version);
    let dest = state.dir.join(&rel);
    let entry = VersionEntry {
        url: rel.clone(),
        sha256: Some(sha256.clone()),
        size_bytes: Some(size),
        memory_mib: Some(manifest.memory_mib),
        base_image: (!manifest.base_image.is_empty()).then(|| manifest.base_image.clone()),
        created_at: Some(manifest.created_at.clone()),
        minisig,
        ..Default::default()
    };
    let make_latest = state.push_makes_latest;
    let description = manifest.description.clone();
    update_registry(&state.dir, |reg| {
        // A published version is immutable: pulls may be resuming it by its sha256.
        if let Some(old) = reg
            .packages
            .get(package)
            .and_then(|p| p.versions.get(version))
        {
            if old.sha256.as_deref() != Some(sha256.as_str()) {
                return Err(HubError::Invalid(format!(
                    "{package}@{version} already exists with different content; push a new version"
                )));
            }
        }
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).map_err(|e| HubError::io(dir, e))?;
        }
        std::fs::hard_link(tmp, &dest)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    std::fs::rename(tmp, &dest)
                } else {
                    Err(e)
                }
            })
            .map_err(|e| HubError::io(&dest, e))?;
        reg.upsert(
            package,
            version,
            entry.clone(),
            Some(&description),
            make_latest,
        );
        Ok(())
    })
    .map_err(|e| match e {
        HubError::Invalid(m) => (StatusCode::CONFLICT, m),
        other => internal(other),
    })?;
    Ok(entry)
}
