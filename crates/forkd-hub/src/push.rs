//! `forkd push`: upload a pack to a presigned PUT URL, or to a `forkd hub serve` endpoint
//! with a bearer token.

use std::fs::File;
use std::path::PathBuf;

use base64::Engine;
use forkd_store::{Snapshot, Store};
use url::Url;

use crate::error::{HubError, Result};
use crate::fetch::{http_error, with_retries, FetchConfig};
use crate::pack::{PackOptions, PACK_SUFFIX};
use crate::publish::write_pack_file;
use crate::serve::{AUTH_PATH, PUSH_PREFIX};

#[derive(Debug, Clone)]
pub struct PushOptions {
    pub pack: PackOptions,
    /// A presigned PUT URL, or (with `token`) a hub server's base URL.
    pub to: String,
    pub token: Option<String>,
    pub sign_key: Option<PathBuf>,
    pub fetch: FetchConfig,
}

#[derive(Debug, Clone)]
pub struct PushReport {
    pub url: String,
    pub sha256: String,
    pub size_bytes: u64,
    /// The server's answer (the registry entry, for a hub server).
    pub response: String,
    /// The `.minisig` text when signed. A hub server stores it with the entry; for a
    /// presigned URL the caller must upload it next to the pack (the URL covers one object).
    pub minisig: Option<String>,
}

/// The URL a push goes to: a hub server's push endpoint when `server` (unless the URL
/// already is one), else the URL itself (presigned: used verbatim).
pub fn push_url(to: &str, server: bool, name: &str, version: &str) -> Result<Url> {
    let url = Url::parse(to).map_err(|e| HubError::Invalid(format!("{to:?}: not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(HubError::Invalid(format!(
            "{to:?}: push needs an http(s) URL"
        )));
    }
    if !server || url.path().contains(PUSH_PREFIX) {
        return Ok(url);
    }
    let base = if url.as_str().ends_with('/') {
        url
    } else {
        Url::parse(&format!("{url}/")).expect("still a URL")
    };
    base.join(&format!(
        "{}{name}/{version}",
        PUSH_PREFIX.trim_start_matches('/')
    ))
    .map_err(|e| HubError::Invalid(format!("{to:?}: {e}")))
}

pub fn push(store: &Store, snap: &Snapshot, opts: &PushOptions) -> Result<PushReport> {
    crate::names::check_package_name(&opts.pack.name)?;
    let server = opts.token.is_some() || open_hub_server(&opts.to, &opts.fetch)?;
    let url = push_url(&opts.to, server, &opts.pack.name, &opts.pack.version)?;
    let dir = store.cache_dir().join("push");
    let (ns, n) = opts
        .pack
        .name
        .split_once('/')
        .unwrap_or(("", &opts.pack.name));
    let path = dir.join(format!(
        "{ns}-{n}-{}.{}{PACK_SUFFIX}",
        opts.pack.version,
        std::process::id()
    ));
    let result = (|| {
        let agent = opts.fetch.agent();
        if let Some(t) = &opts.token {
            check_token(&agent, &url, t, &opts.fetch)?;
        }
        let (info, sig) = write_pack_file(snap, &opts.pack, &path, opts.sign_key.as_deref())?;
        let response = with_retries(&opts.fetch, || {
            let file = File::open(&path).map_err(|e| HubError::io(&path, e))?;
            // Only Content-Length is added: a presigned URL's signature covers the method,
            // path and query, and extra signed headers (Content-Type…) would break it.
            let mut req = agent
                .request_url("PUT", &url)
                .set("Content-Length", &info.size_bytes.to_string());
            if let Some(t) = &opts.token {
                req = req.set("Authorization", &format!("Bearer {t}"));
                if let Some(s) = &sig {
                    let b64 = base64::engine::general_purpose::STANDARD.encode(s);
                    req = req.set("X-Forkd-Minisig", &b64);
                }
            }
            match req.send(file) {
                Ok(resp) => Ok(resp.into_string().unwrap_or_default()),
                Err(ureq::Error::Status(code, resp)) => {
                    let body = resp.into_string().unwrap_or_default();
                    Err(HubError::Http {
                        url: url.to_string(),
                        msg: status_message(code, &body, opts.token.is_some()),
                        transient: code >= 500 || code == 408 || code == 429,
                    })
                }
                Err(e) => Err(http_error(&url, e)),
            }
        })?;
        Ok(PushReport {
            url: url.to_string(),
            sha256: info.sha256,
            size_bytes: info.size_bytes,
            response,
            minisig: sig,
        })
    })();
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(format!("{}.minisig", path.display()));
    result
}

/// A refused upload in one line: the status, the server's first line, and for a PUT refused
/// outright without a token (a hub server's base URL, not a presigned one) what was missing.
fn status_message(code: u16, body: &str, with_token: bool) -> String {
    let said = body.lines().next().unwrap_or("").trim();
    let mut message = match said {
        "" => format!("HTTP {code}"),
        said => format!("HTTP {code}: {said}"),
    };
    if code == 405 && !with_token {
        message.push_str(
            " (this URL takes no PUT: a `forkd hub serve` endpoint needs --token-file FILE, \
             else give a presigned upload URL)",
        );
    }
    message
}

/// Without a token: whether `to` is a `forkd hub serve` that takes pushes without one (a
/// loopback server started without a token). One that wants a token is an error now, before
/// packing. A URL with a query is a presigned one (its signature is in the query) and is
/// used as it is, without asking its host anything.
fn open_hub_server(to: &str, cfg: &FetchConfig) -> Result<bool> {
    let Ok(base) = Url::parse(to) else {
        return Ok(false);
    };
    if base.query().is_some() || base.path().contains(PUSH_PREFIX) {
        return Ok(false);
    }
    let Ok(auth) = base.join(AUTH_PATH) else {
        return Ok(false);
    };
    match cfg.agent().request_url("GET", &auth).call() {
        Ok(response) => Ok(response.status() == 204),
        Err(ureq::Error::Status(401 | 403, _)) => Err(HubError::Http {
            url: to.to_string(),
            msg: "a forkd hub server that takes pushes with a token: push with --token-file FILE"
                .into(),
            transient: false,
        }),
        Err(_) => Ok(false),
    }
}

/// Asks the hub server whether `token` would be accepted, before packing and uploading.
fn check_token(agent: &ureq::Agent, push_url: &Url, token: &str, cfg: &FetchConfig) -> Result<()> {
    let auth = push_url
        .join(AUTH_PATH)
        .map_err(|e| HubError::Invalid(format!("{push_url}: {e}")))?;
    with_retries(cfg, || {
        match agent
            .request_url("GET", &auth)
            .set("Authorization", &format!("Bearer {token}"))
            .call()
        {
            Ok(_) => Ok(()),
            Err(ureq::Error::Status(code @ (401 | 403), _)) => Err(HubError::Http {
                url: push_url.to_string(),
                msg: format!(
                    "HTTP {code}: the hub refused the token{}",
                    if code == 403 { " (wrong token)" } else { "" }
                ),
                transient: false,
            }),
            Err(e) => Err(http_error(&auth, e)),
        }
    })
}
