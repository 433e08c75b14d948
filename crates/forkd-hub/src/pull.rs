//! `forkd pull`: resolve a reference, stream the pack through download, hashing,
//! decompression and unpacking at once, verify, publish.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::mpsc::sync_channel;

use forkd_store::{Store, Tag};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use url::Url;

use crate::cache::{self, partial_path, PullLock};
use crate::config::hub_from;
use crate::error::{HubError, Result};
use crate::fetch::{fetch_small, produce, ChannelReader, Download, DownloadResult, FetchConfig};
use crate::names::PackageRef;
use crate::pack::PACK_SUFFIX;
use crate::registry::{registry_url, Registry, MAX_REGISTRY_BYTES};
use crate::sign::TrustPolicy;
use crate::unpack::{unpack, UnpackOptions, UnpackOutcome};

/// Options for `pull`.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// `--hub`; None = `FORKD_HUB_URL`, else the `forkd hub use` setting (see [`crate::config`]).
    pub hub: Option<String>,
    /// Install under this tag (default: the tag the snapshot had when it was packed).
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
    /// Parent packs pulled first (a chain pack's missing ancestors, root first).
    pub parents: Vec<String>,
}

/// Where a pull reads its pack from.
struct Source {
    download: Download,
    signature: Option<String>,
    package: Option<(String, String)>,
    origin: String,
}

/// Pulls `reference`: `ns/name[@version]` from the hub, a pack URL, or a local pack path.
///
/// One pull per pack downloads at a time in a data directory: a second one waits for the
/// first (saying so), then finds the snapshot installed and does nothing.
///
/// A chain pack (a diff snapshot) pulled from a hub whose parent is not installed gets its
/// parent pulled first, from the same hub, then only the link is downloaded.
pub fn pull(store: &Store, reference: &str, opts: &PullOptions) -> Result<PullReport> {
    pull_chain(store, reference, opts, 0)
}

/// Longest chain of parent packs a pull follows (also ends a cycle of hand-made packs).
const MAX_PARENT_PULLS: usize = 16;

fn pull_chain(
    store: &Store,
    reference: &str,
    opts: &PullOptions,
    depth: usize,
) -> Result<PullReport> {
    let source = resolve(store, reference, opts)?;
    match pull_one(store, reference, &source, opts) {
        Err(HubError::MissingParent { package, .. })
            if source.package.is_some() && depth < MAX_PARENT_PULLS =>
        {
            opts.fetch.notify.say(&format!(
                "{reference} is a diff of {package}, which is not here: pulling it first"
            ));
            // The parent goes under its own packed tag: that is the tag the link names.
            let parent_opts = PullOptions {
                tag: None,
                force: false,
                ..opts.clone()
            };
            let parent = pull_chain(store, &package, &parent_opts, depth + 1)?;
            let mut report = pull_one(store, reference, &source, opts)?;
            report.parents = parent.parents;
            report.parents.push(package);
            Ok(report)
        }
        other => other,
    }
}

/// One pack, under its lock.
fn pull_one(
    store: &Store,
    reference: &str,
    source: &Source,
    opts: &PullOptions,
) -> Result<PullReport> {
    let _lock = PullLock::acquire(store, &source.lock_key(), reference, &opts.fetch.notify)?;
    let result = pull_locked(store, source, opts);
    // An interrupted download stays for the next pull, which may be the sudo user's own.
    if let Some(partial) = source.download.cache_path.as_deref().filter(|p| p.exists()) {
        let _ = store.give(partial);
    }
    result
}

/// The pull proper, under its lock.
fn pull_locked(store: &Store, source: &Source, opts: &PullOptions) -> Result<PullReport> {
    let sha = source.download.expected_sha256.as_deref();
    if let Some(report) = sha.and_then(|sha| already_installed(store, sha, source, opts)) {
        return Ok(report);
    }
    let report = pull_fresh(store, source, opts)?;
    if let Some(sha) = sha {
        cache::record_install(store, sha, report.outcome.snapshot())?;
    }
    Ok(report)
}

/// This very pack, installed earlier under the tag this pull would use: nothing to fetch.
fn already_installed(
    store: &Store,
    sha: &str,
    source: &Source,
    opts: &PullOptions,
) -> Option<PullReport> {
    if opts.force {
        return None;
    }
    let snap = cache::installed_from(store, sha)?;
    if opts.tag.as_ref().is_some_and(|t| t != snap.tag()) {
        return None;
    }
    Some(PullReport {
        outcome: UnpackOutcome::AlreadyPresent(snap),
        source: source.origin.clone(),
        package: source.package.clone(),
        fetched_bytes: 0,
        resumed_from: 0,
        signed_by: None,
        parents: Vec::new(),
    })
}

/// Download and install, giving a corrupt leftover of an interrupted run one clean retry.
fn pull_fresh(store: &Store, source: &Source, opts: &PullOptions) -> Result<PullReport> {
    let resumable = source
        .download
        .cache_path
        .as_deref()
        .filter(|p| p.metadata().is_ok_and(|m| m.len() > 0));
    match run(store, source, opts) {
        // What an earlier, interrupted run left on this disk did not continue into a valid
        // pack: the damage is local, so the hub gets one clean try before it is blamed.
        Err(e @ HubError::BadPack { .. }) if resumable.is_some() => {
            let partial = resumable.expect("checked");
            opts.fetch.notify.say(&format!(
                "the interrupted download kept in {} is corrupt ({e}); discarded it, \
                 downloading from the start",
                partial.display()
            ));
            remove_partial(Some(partial));
            run(store, source, opts)
        }
        other => other,
    }
}

impl Source {
    /// What the pull lock is keyed by: the pack's own hash when the registry gives it.
    fn lock_key(&self) -> String {
        match &self.download.expected_sha256 {
            Some(sha) => sha.clone(),
            None => forkd_store::hash::sha256_hex(self.download.url.as_str().as_bytes()),
        }
    }
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
    if resolved.entry.sha256.is_none() {
        opts.fetch.notify.say(&format!(
            "warning: {origin} lists {}@{} without a sha256: the download cannot be checked \
             against the registry and an interrupted one cannot resume",
            resolved.package, resolved.version
        ));
    }
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

fn run(store: &Store, source: &Source, opts: &PullOptions) -> Result<PullReport> {
    let unpack_opts = UnpackOptions {
        tag: opts.tag.clone(),
        force: opts.force,
        expect_name: source.package.as_ref().map(|(n, _)| n.clone()),
        record_package: source.package.clone(),
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
            check_download(source, &r)?;
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
        source: source.origin.clone(),
        package: source.package.clone(),
        fetched_bytes: d.fetched_bytes,
        resumed_from: d.resumed_from,
        signed_by,
        parents: Vec::new(),
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
