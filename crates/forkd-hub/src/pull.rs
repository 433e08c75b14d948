//! `forkd pull`: resolve a reference, stream the pack through download, hashing,
//! decompression and unpacking at once, verify, publish.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;

use forkd_store::{Store, Tag};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use url::Url;

use crate::config::hub_from;
use crate::error::{HubError, Result};
use crate::fetch::{fetch_small, produce, ChannelReader, Download, DownloadResult, FetchConfig};
use crate::names::{default_tag, PackageRef};
use crate::pack::PACK_SUFFIX;
use crate::registry::{registry_url, Registry, MAX_REGISTRY_BYTES};
use crate::sign::TrustPolicy;
use crate::unpack::{unpack, UnpackOptions, UnpackOutcome};

/// Options for `pull`.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// `--hub`; None = `FORKD_HUB_URL`, else the `forkd hub use` setting (see [`crate::config`]).
    pub hub: Option<String>,
    pub tag: Option<Tag>,
    pub force: bool,
    /// Show a progress bar (only ever drawn on a terminal).
    pub progress: bool,
    /// A (typically hidden) bar the download advances instead of its own, for a caller that
    /// reports progress elsewhere (the daemon's pull jobs read its position and length).
    pub progress_bar: Option<ProgressBar>,
    pub trust: TrustPolicy,
    pub fetch: FetchConfig,
}

/// What a pull did.
#[derive(Debug)]
pub struct PullReport {
    pub outcome: UnpackOutcome,
    /// Where the pack came from (URL or path).
    pub source: String,
    /// Package and version when pulled through a registry.
    pub package: Option<(String, String)>,
    /// Bytes that crossed the network in this run.
    pub fetched_bytes: u64,
    /// Bytes reused from an earlier interrupted download.
    pub resumed_from: u64,
    /// Key id of the trusted key that verified the signature.
    pub signed_by: Option<String>,
}

/// Where a pull reads its pack from.
struct Source {
    download: Download,
    signature: Option<String>,
    package: Option<(String, String)>,
    origin: String,
}

/// Pulls `reference`: `ns/name[@version]` from the hub, a pack URL, or a local pack path.
pub fn pull(store: &Store, reference: &str, opts: &PullOptions) -> Result<PullReport> {
    let source = resolve(store, reference, opts)?;
    run(store, source, opts)
}

fn looks_like_path(s: &str) -> bool {
    s.starts_with('/') || s.starts_with('.') || s.ends_with(PACK_SUFFIX) || Path::new(s).exists()
}

fn resolve(store: &Store, reference: &str, opts: &PullOptions) -> Result<Source> {
    if reference.contains("://") {
        let url = Url::parse(reference)
            .map_err(|e| HubError::Invalid(format!("{reference:?}: not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https" | "file") {
            return Err(HubError::Invalid(format!(
                "{reference:?}: only http, https and file URLs can be pulled"
            )));
        }
        let signature = detached_signature(&url, opts)?;
        return Ok(Source {
            origin: url.to_string(),
            download: Download {
                url,
                expected_sha256: None,
                expected_size: None,
                cache_path: None,
                want_prehash: signature.is_some() && !opts.trust.keys.is_empty(),
            },
            signature,
            package: None,
        });
    }
    if looks_like_path(reference) {
        let path =
            std::path::absolute(reference).map_err(|e| HubError::io(Path::new(reference), e))?;
        if !path.is_file() {
            return Err(HubError::Invalid(format!("{reference}: no such pack file")));
        }
        let url = Url::from_file_path(&path)
            .map_err(|_| HubError::Invalid(format!("{reference}: not a usable path")))?;
        let signature = detached_signature(&url, opts)?;
        return Ok(Source {
            origin: path.display().to_string(),
            download: Download {
                url,
                expected_sha256: None,
                expected_size: None,
                cache_path: None,
                want_prehash: signature.is_some() && !opts.trust.keys.is_empty(),
            },
            signature,
            package: None,
        });
    }
    let pref = PackageRef::parse(reference)?;
    let hub = hub_from(opts.hub.as_deref())?;
    let reg_url = registry_url(&hub)?;
    let origin = reg_url.to_string();
    let text =
        fetch_small(&reg_url, &opts.fetch, MAX_REGISTRY_BYTES, false)?.expect("not missing_ok");
    let text = String::from_utf8(text).map_err(|_| HubError::registry(&origin, "not UTF-8"))?;
    let registry = Registry::parse(&text, &origin)?;
    let resolved = registry.resolve(&pref, &reg_url, &origin)?;
    let cache_path = resolved
        .entry
        .sha256
        .as_ref()
        .map(|sha| partial_path(store, sha));
    let signature = match &resolved.entry.minisig {
        Some(s) => Some(s.clone()),
        None => detached_signature(&resolved.url, opts)?,
    };
    Ok(Source {
        origin: resolved.url.to_string(),
        download: Download {
            url: resolved.url.clone(),
            expected_sha256: resolved.entry.sha256.clone(),
            expected_size: resolved.entry.size_bytes,
            cache_path,
            want_prehash: signature.is_some() && !opts.trust.keys.is_empty(),
        },
        signature,
        package: Some((resolved.package, resolved.version)),
    })
}

/// Resume cache for a pack with a known sha256.
pub fn partial_path(store: &Store, sha256: &str) -> PathBuf {
    store
        .cache_dir()
        .join("packs")
        .join(format!("{sha256}.partial"))
}

/// `<url>.minisig`, fetched only when the user has a trust policy that could use it.
fn detached_signature(url: &Url, opts: &PullOptions) -> Result<Option<String>> {
    if opts.trust.keys.is_empty() && !opts.trust.require_signatures {
        return Ok(None);
    }
    let sig_url = Url::parse(&format!("{url}.minisig"))
        .map_err(|e| HubError::Invalid(format!("{url}: {e}")))?;
    let text = fetch_small(&sig_url, &opts.fetch, 64 * 1024, true)?;
    Ok(text.map(|t| String::from_utf8_lossy(&t).into_owned()))
}

fn progress_bar(opts: &PullOptions, size: Option<u64>) -> ProgressBar {
    if let Some(bar) = &opts.progress_bar {
        if let Some(size) = size {
            bar.set_length(size);
        }
        return bar.clone();
    }
    if !opts.progress || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(size, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(progress_template(size.is_some())) {
        bar.set_style(style);
    }
    bar
}

/// Bytes, rate and ETA when the size is known; bytes and rate otherwise.
fn progress_template(sized: bool) -> &'static str {
    if sized {
        "{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}"
    } else {
        "{spinner} {bytes} {binary_bytes_per_sec}"
    }
}

fn run(store: &Store, source: Source, opts: &PullOptions) -> Result<PullReport> {
    let unpack_opts = UnpackOptions {
        tag: opts.tag.clone().or_else(|| {
            source
                .package
                .as_ref()
                .and_then(|(name, _)| Tag::parse(default_tag(name)).ok())
        }),
        force: opts.force,
        expect_name: source.package.as_ref().map(|(n, _)| n.clone()),
    };
    let bar = progress_bar(opts, source.download.expected_size);
    let (tx, rx) = sync_channel(16);
    let reader = ChannelReader::new(rx);
    let mut downloaded: Option<DownloadResult> = None;
    let mut signed_by = None;
    let (unpacked, producer_result) = std::thread::scope(|s| {
        let producer = s.spawn(|| produce(&source.download, &opts.fetch, tx, &bar));
        let mut producer = Some(producer);
        let mut hook = |_: &forkd_store::Manifest| -> Result<()> {
            let handle = producer.take().expect("hook runs once");
            let r = handle.join().expect("download thread does not panic")?;
            check_download(&source, &r)?;
            signed_by =
                opts.trust
                    .check(&source.origin, source.signature.as_deref(), &r.prehash)?;
            downloaded = Some(r);
            Ok(())
        };
        let unpacked = unpack(store, reader, &source.origin, &unpack_opts, &mut hook);
        let producer_result = producer
            .take()
            .map(|h| h.join().expect("download thread does not panic"));
        (unpacked, producer_result)
    });
    bar.finish_and_clear();
    let cache = source.download.cache_path.as_deref();
    let outcome = match (unpacked, producer_result) {
        // The download failed: its error explains the broken stream; keep the partial file
        // for the next attempt when the failure was the network's.
        (Err(_), Some(Err(e))) => {
            if !e.is_transient() {
                remove_partial(cache);
            }
            return Err(e);
        }
        (Err(e), _) => {
            if !e.is_transient() {
                remove_partial(cache);
            }
            return Err(e);
        }
        (Ok(o), Some(Ok(r))) => {
            downloaded = Some(r);
            o
        }
        (Ok(o), _) => o,
    };
    remove_partial(cache);
    let d = downloaded.unwrap_or_default();
    Ok(PullReport {
        outcome,
        source: source.origin,
        package: source.package,
        fetched_bytes: d.fetched_bytes,
        resumed_from: d.resumed_from,
        signed_by,
    })
}

fn check_download(source: &Source, r: &DownloadResult) -> Result<()> {
    if let Some(sha) = &source.download.expected_sha256 {
        if *sha != r.sha256 {
            return Err(HubError::bad_pack(
                &source.origin,
                format!("sha256 {} does not match the registry's {sha}", r.sha256),
            ));
        }
    }
    if let Some(size) = source.download.expected_size {
        if size != r.total_bytes {
            return Err(HubError::bad_pack(
                &source.origin,
                format!("is {} bytes, the registry says {size}", r.total_bytes),
            ));
        }
    }
    Ok(())
}

fn remove_partial(path: Option<&Path>) {
    if let Some(p) = path {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_templates_parse() {
        for sized in [true, false] {
            ProgressStyle::with_template(progress_template(sized)).unwrap();
        }
    }

    #[test]
    fn references_are_classified() {
        assert!(looks_like_path("./x"));
        assert!(looks_like_path("/tmp/x"));
        assert!(looks_like_path("a-v1.forkd-snapshot.tar.zst"));
        assert!(!looks_like_path("acme/python"));
    }
}
