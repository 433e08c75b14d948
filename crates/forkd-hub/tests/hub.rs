//! End to end against real servers: nginx (static hosting) and `forkd hub serve`.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::servers::{Nginx, Proxy};
use common::*;
use forkd_hub::cache::partial_path;
use forkd_hub::publish::{publish, PublishOptions};
use forkd_hub::push::{push, PushOptions};
use forkd_hub::serve::{ServeOptions, Server};
use forkd_hub::{pull, FetchConfig, Notifier, PackOptions, PullOptions, Registry, UnpackOutcome};
use forkd_store::sparse::disk_usage;
use forkd_store::{Store, Tag};

const MIB: u64 = 1 << 20;

fn fast_fetch(retries: u32) -> FetchConfig {
    FetchConfig {
        retries,
        backoff: Duration::from_millis(20),
        ..FetchConfig::default()
    }
}

fn opts(hub: &str) -> PullOptions {
    PullOptions {
        hub: Some(hub.to_string()),
        fetch: fast_fetch(2),
        ..Default::default()
    }
}

/// A source store holding `tag`, published into `dir` as `name@version`.
fn publish_into(
    dir: &Path,
    src: &Store,
    tag: &str,
    name: &str,
    version: &str,
    latest: bool,
) -> forkd_hub::VersionEntry {
    let snap = src.get(&Tag::parse(tag).unwrap()).unwrap();
    let o = PublishOptions {
        pack: PackOptions::new(name, version),
        url_base: None,
        sign_key: None,
        make_latest: latest,
        recipe_path: None,
        release_tag: None,
    };
    publish(&snap, dir, &o).unwrap().entry
}

fn assert_same_files(a: &Store, a_tag: &str, b: &Store, b_tag: &str) {
    let sa = a.get(&Tag::parse(a_tag).unwrap()).unwrap();
    let sb = b.get(&Tag::parse(b_tag).unwrap()).unwrap();
    assert!(b.verify(sb.tag()).unwrap().is_empty(), "verify failed");
    for f in &sa.manifest.files {
        let x = std::fs::read(sa.file(&f.name)).unwrap();
        let y = std::fs::read(sb.file(&f.name)).unwrap();
        assert!(x == y, "{} differs", f.name);
        let used = disk_usage(&sb.file(&f.name)).unwrap();
        let src_used = disk_usage(&sa.file(&f.name)).unwrap();
        assert!(
            used <= src_used + MIB,
            "{}: not sparse ({used} bytes on disk)",
            f.name
        );
    }
}

fn empty_store() -> (tempfile::TempDir, Store) {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path()).unwrap();
    (d, s)
}

fn source_store() -> (tempfile::TempDir, Store) {
    let (d, s) = empty_store();
    make_snapshot(&s, "one", 64 * MIB, 4 * MIB, 11);
    make_snapshot(&s, "two", 64 * MIB, 4 * MIB, 12);
    (d, s)
}

#[test]
fn nginx_publish_pull_pins_and_no_op() {
    let (_sd, src) = source_store();
    let hub = tempfile::tempdir().unwrap();
    publish_into(hub.path(), &src, "one", "acme/demo", "v1", true);
    publish_into(hub.path(), &src, "two", "acme/demo", "v2", true);
    let Some(nginx) = Nginx::start(hub.path()) else {
        return;
    };
    let hub_url = nginx.url("/");

    let (_dd, dst) = empty_store();
    let r = pull(&dst, "acme/demo", &opts(&hub_url)).unwrap();
    assert!(matches!(r.outcome, UnpackOutcome::Installed(_)));
    // Installed under the tag the snapshot had when it was packed, recording the package.
    assert_eq!(r.outcome.snapshot().tag().as_str(), "two");
    assert_eq!(r.package, Some(("acme/demo".into(), "latest".into())));
    assert_eq!(r.outcome.snapshot().manifest.name, "acme/demo");
    assert_eq!(r.outcome.snapshot().manifest.version, "latest");
    assert_same_files(&src, "two", &dst, "two");
    // No partial download left behind.
    assert!(forkd_hub::cache::partial_downloads(&dst).is_empty());

    // Again: a no-op that says so, without downloading.
    let again = pull(&dst, "acme/demo", &opts(&hub_url)).unwrap();
    assert!(matches!(again.outcome, UnpackOutcome::AlreadyPresent(_)));
    assert_eq!(again.fetched_bytes, 0);

    // A pin, under another tag.
    let mut o = opts(&hub_url);
    o.tag = Some(Tag::parse("demo-v1").unwrap());
    pull(&dst, "acme/demo@v1", &o).unwrap();
    assert_same_files(&src, "one", &dst, "demo-v1");

    // A different snapshot under a taken tag is refused, saying what to do; --force replaces.
    let mut o = opts(&hub_url);
    o.tag = Some(Tag::parse("two").unwrap());
    let err = pull(&dst, "acme/demo@v1", &o).unwrap_err();
    assert!(err.to_string().contains("--tag NEW_TAG"), "{err}");
    o.force = true;
    pull(&dst, "acme/demo@v1", &o).unwrap();
    assert_same_files(&src, "one", &dst, "two");
    // The record of the replaced install no longer claims the tag.
    let latest = pull(&dst, "acme/demo", &opts(&hub_url)).unwrap_err();
    assert!(latest.to_string().contains("already tagged"), "{latest}");
}

#[test]
fn nginx_absolute_urls_and_file_hub_and_local_path() {
    let (_sd, src) = source_store();
    let hub = tempfile::tempdir().unwrap();
    let Some(nginx) = Nginx::start(hub.path()) else {
        return;
    };
    let snap = src.get(&Tag::parse("one").unwrap()).unwrap();
    let o = PublishOptions {
        pack: PackOptions::new("acme/abs", "v1"),
        url_base: Some(nginx.url("/")),
        sign_key: None,
        make_latest: true,
        recipe_path: None,
        release_tag: None,
    };
    let report = publish(&snap, hub.path(), &o).unwrap();
    assert!(report.entry.url.starts_with("http://127.0.0.1:"));
    // Registry fetched as a file, pack over HTTP from its absolute URL.
    let (_dd, dst) = empty_store();
    pull(&dst, "acme/abs", &opts(hub.path().to_str().unwrap())).unwrap();
    assert_same_files(&src, "one", &dst, "one");
    // A pack URL, and a local pack path.
    let (_d2, dst2) = empty_store();
    let mut o = opts("http://127.0.0.1:9/");
    o.tag = Some(Tag::parse("from-url").unwrap());
    pull(&dst2, &report.entry.url, &o).unwrap();
    assert_same_files(&src, "one", &dst2, "from-url");
    o.tag = Some(Tag::parse("from-path").unwrap());
    pull(&dst2, report.pack_path.to_str().unwrap(), &o).unwrap();
    assert_same_files(&src, "one", &dst2, "from-path");
}

/// Writes `dir/registry.json` as `good` with every version of acme/demo changed by `f`.
fn edit_versions(dir: &Path, good: &str, f: &dyn Fn(&mut forkd_hub::VersionEntry)) {
    let mut reg = Registry::parse(good, "t").unwrap();
    for v in reg
        .packages
        .get_mut("acme/demo")
        .unwrap()
        .versions
        .values_mut()
    {
        f(v);
    }
    write_registry(dir, &reg.to_json());
}

fn write_registry(dir: &Path, text: &str) {
    std::fs::write(dir.join("registry.json"), text).unwrap();
}

/// Pull must fail with `needle` in a one-line error and install nothing.
fn pull_refused(hub: &str, reference: &str, needle: &str) {
    refused_with(reference, needle, &opts(hub));
}

/// [`pull_refused`] with the given options; returns the error.
fn refused_with(reference: &str, needle: &str, o: &PullOptions) -> forkd_hub::HubError {
    let (_d, dst) = empty_store();
    let err = pull(&dst, reference, o)
        .map(|_| ())
        .expect_err("pull succeeded");
    let msg = err.to_string();
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    assert!(!msg.contains('\n'), "not one line: {msg:?}");
    assert_store_empty(&dst);
    err
}

#[test]
fn nginx_bad_registries_and_http_errors() {
    let (_sd, src) = source_store();
    let hub = tempfile::tempdir().unwrap();
    let entry = publish_into(hub.path(), &src, "one", "acme/demo", "v1", true);
    let Some(nginx) = Nginx::start(hub.path()) else {
        return;
    };
    let url = nginx.url("/");

    pull_refused(&url, "acme/demo@v7", "available: latest, v1");
    pull_refused(&url, "acme/nothing", "no package \"acme/nothing\"");
    pull_refused(&url, "acme/../x", "must match");

    let good = std::fs::read_to_string(hub.path().join("registry.json")).unwrap();
    write_registry(
        hub.path(),
        &good.replace("\"schema_version\": 1", "\"schema_version\": 3"),
    );
    pull_refused(&url, "acme/demo", "schema_version 3 is not supported");

    let mut reg = Registry::parse(&good, "t").unwrap();
    reg.packages
        .get_mut("acme/demo")
        .unwrap()
        .versions
        .remove("latest");
    write_registry(hub.path(), &reg.to_json());
    pull_refused(&url, "acme/demo@v1", "no \"latest\"");

    // The registry's sha256 does not match the pack.
    let mut reg = Registry::parse(&good, "t").unwrap();
    let bad_sha = "0".repeat(64);
    for v in reg
        .packages
        .get_mut("acme/demo")
        .unwrap()
        .versions
        .values_mut()
    {
        v.sha256 = Some(bad_sha.clone());
    }
    write_registry(hub.path(), &reg.to_json());
    pull_refused(&url, "acme/demo", "does not match the registry");

    // A registry pointing at a missing pack: HTTP 404.
    let mut reg = Registry::parse(&good, "t").unwrap();
    for v in reg
        .packages
        .get_mut("acme/demo")
        .unwrap()
        .versions
        .values_mut()
    {
        v.url = "packs/missing.forkd-snapshot.tar.zst".into();
    }
    write_registry(hub.path(), &reg.to_json());
    pull_refused(&url, "acme/demo", "HTTP 404");

    // A registry that is not there at all, and one that is not JSON.
    pull_refused(&nginx.url("/nope/"), "acme/demo", "HTTP 404");
    write_registry(hub.path(), "<html>");
    pull_refused(&url, "acme/demo", "not valid JSON");

    // A pack listed as another package.
    let mut reg = Registry::parse(&good, "t").unwrap();
    let p = reg.packages.remove("acme/demo").unwrap();
    reg.packages.insert("evil/demo".into(), p);
    write_registry(hub.path(), &reg.to_json());
    pull_refused(&url, "evil/demo", "declares package \"acme/demo\"");
    assert!(entry.sha256.is_some());
}

#[test]
fn unreachable_hub_is_one_clear_error() {
    // Nothing listens on the discard port of loopback.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    pull_refused(
        &format!("http://127.0.0.1:{port}/"),
        "acme/demo",
        "cannot reach",
    );
    pull_refused(
        &format!("http://127.0.0.1:{port}/"),
        "acme/demo",
        "gave up after 3 attempts",
    );
}

#[test]
fn resume_after_cut_downloads_only_the_rest() {
    let (_sd, src) = source_store();
    let hub = tempfile::tempdir().unwrap();
    let entry = publish_into(hub.path(), &src, "one", "acme/demo", "v1", true);
    let size = entry.size_bytes.unwrap();
    let Some(nginx) = Nginx::start(hub.path()) else {
        return;
    };
    // The registry comes straight from nginx; the pack through a proxy that cuts the first
    // connection after ~40% of the pack.
    let cut = size * 2 / 5;
    let proxy = Proxy::start(nginx.addr, Some(cut));
    let mut reg = Registry::parse(
        &std::fs::read_to_string(hub.path().join("registry.json")).unwrap(),
        "t",
    )
    .unwrap();
    for v in reg
        .packages
        .get_mut("acme/demo")
        .unwrap()
        .versions
        .values_mut()
    {
        v.url = proxy.url(&v.url);
    }
    write_registry(hub.path(), &reg.to_json());

    let (_dd, dst) = empty_store();
    // First attempt with no retries: fails, keeps the partial download.
    let mut o = opts(&nginx.url("/"));
    o.fetch = fast_fetch(0);
    let err = pull(&dst, "acme/demo", &o).unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert_store_empty(&dst);
    let partial = partial_path(&dst, entry.sha256.as_deref().unwrap());
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(
        kept > 0 && kept < size,
        "partial file holds {kept} of {size}"
    );
    let served_first = proxy.served();

    // Second attempt resumes with a Range request: only the rest crosses the wire.
    let r = pull(&dst, "acme/demo", &opts(&nginx.url("/"))).unwrap();
    assert_eq!(r.resumed_from, kept);
    assert_eq!(r.fetched_bytes, size - kept);
    let served_second = proxy.served() - served_first;
    assert!(
        served_second >= size - kept && served_second < size - kept + 4096,
        "second pull moved {served_second} bytes for {} missing",
        size - kept
    );
    assert_same_files(&src, "one", &dst, "one");
    assert!(!partial.exists(), "partial download not cleaned up");
}

#[test]
fn transient_cut_is_retried_in_place_without_refetching() {
    let (_sd, src) = source_store();
    let hub = tempfile::tempdir().unwrap();
    let entry = publish_into(hub.path(), &src, "one", "acme/demo", "v1", true);
    let size = entry.size_bytes.unwrap();
    let Some(nginx) = Nginx::start(hub.path()) else {
        return;
    };
    let proxy = Proxy::start(nginx.addr, Some(size / 2));
    let (_dd, dst) = empty_store();
    // Through the proxy for everything: registry (first connection, cut irrelevant for it)…
    // so cut the pack instead by pulling its URL directly.
    let mut o = opts("http://127.0.0.1:9/");
    o.tag = Some(Tag::parse("demo").unwrap());
    let r = pull(&dst, &proxy.url(&entry.url), &o).unwrap();
    assert_eq!(r.fetched_bytes, size);
    assert!(
        proxy.served() < size + 8192,
        "served {} for {size}",
        proxy.served()
    );
    assert!(proxy.connections.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    assert_same_files(&src, "one", &dst, "demo");
}

fn start_hub_server(dir: &Path, token: Option<&str>) -> String {
    let mut o = ServeOptions::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
    o.token = token.map(str::to_string);
    let server = Server::bind(o).unwrap();
    let addr = server.local_addr();
    std::thread::spawn(move || server.run());
    format!("http://{addr}/")
}

fn push_opts(to: &str, token: Option<&str>, name: &str, version: &str) -> PushOptions {
    PushOptions {
        pack: PackOptions::new(name, version),
        to: to.to_string(),
        token: token.map(str::to_string),
        sign_key: None,
        fetch: fast_fetch(0),
    }
}

#[test]
fn hub_serve_push_pull_auth_and_concurrency() {
    let (_sd, src) = source_store();
    let dir = tempfile::tempdir().unwrap();
    let url = start_hub_server(dir.path(), Some("s3cret-token"));
    let one = src.get(&Tag::parse("one").unwrap()).unwrap();
    let two = src.get(&Tag::parse("two").unwrap()).unwrap();

    // Refused: no token, wrong token. Nothing recorded.
    let agent = ureq::agent();
    match agent
        .put(&format!("{url}api/v1/push/acme/demo/v1"))
        .send_bytes(b"x")
    {
        Err(ureq::Error::Status(401, _)) => {}
        other => panic!(
            "push without a token not refused: {:?}",
            other.map(|r| r.status())
        ),
    }
    let err = push(
        &src,
        &one,
        &push_opts(&url, Some("wrong"), "acme/demo", "v1"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    assert!(!dir.path().join("registry.json").exists());

    let r = push(
        &src,
        &one,
        &push_opts(&url, Some("s3cret-token"), "acme/demo", "v1"),
    )
    .unwrap();
    assert!(r.response.contains(&r.sha256));
    // Same version, different content: refused (versions are immutable).
    let err = push(
        &src,
        &two,
        &push_opts(&url, Some("s3cret-token"), "acme/demo", "v1"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("409"), "{err}");

    // Concurrent pushes of different versions all land in registry.json.
    std::thread::scope(|s| {
        for i in 2..6 {
            let (src, two, url) = (&src, &two, &url);
            s.spawn(move || {
                push(
                    src,
                    two,
                    &push_opts(url, Some("s3cret-token"), "acme/demo", &format!("v{i}")),
                )
                .unwrap();
            });
        }
    });
    let reg = Registry::parse(
        &std::fs::read_to_string(dir.path().join("registry.json")).unwrap(),
        "t",
    )
    .unwrap();
    let versions: Vec<&String> = reg.packages["acme/demo"].versions.keys().collect();
    assert_eq!(versions, ["latest", "v1", "v2", "v3", "v4", "v5"]);

    // Anyone can read; pull v1 and latest from the server.
    let (_dd, dst) = empty_store();
    let mut o = opts(&url);
    o.tag = Some(Tag::parse("pinned").unwrap());
    pull(&dst, "acme/demo@v1", &o).unwrap();
    assert_same_files(&src, "one", &dst, "pinned");
    pull(&dst, "acme/demo", &opts(&url)).unwrap();
    assert_same_files(&src, "two", &dst, "two");

    // Range support on the static side; hidden files are not served.
    let resp = agent
        .get(&format!("{url}registry.json"))
        .set("Range", "bytes=2-9")
        .call()
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.into_string().unwrap().len(), 8);
    match agent.get(&format!("{url}.registry.lock")).call() {
        Err(ureq::Error::Status(404, _)) => {}
        other => panic!("lock file served: {:?}", other.map(|r| r.status())),
    }
    // The server refuses pushes with a hostile pack.
    let hostile = zstd_tar(&[raw_entry(b"/etc/passwd", tar::EntryType::Regular, b"x")]);
    let resp = agent
        .put(&format!("{url}api/v1/push/acme/demo/v9"))
        .set("Authorization", "Bearer s3cret-token")
        .send_bytes(&hostile);
    match resp {
        Err(ureq::Error::Status(400, r)) => {
            assert!(r.into_string().unwrap().contains("absolute path"))
        }
        other => panic!("hostile push not refused: {:?}", other.map(|r| r.status())),
    }
}

#[test]
fn hub_serve_refuses_public_listen_without_token() {
    let dir = tempfile::tempdir().unwrap();
    let o = ServeOptions::new(dir.path().to_path_buf(), "0.0.0.0:0".parse().unwrap());
    let err = Server::bind(o).map(|_| ()).unwrap_err();
    assert!(err.to_string().contains("without a token"), "{err}");
    let mut o = ServeOptions::new(dir.path().to_path_buf(), "0.0.0.0:0".parse().unwrap());
    o.token = Some("t".into());
    assert!(Server::bind(o).is_ok());
}

#[test]
fn push_to_presigned_style_put_url_on_nginx() {
    let (_sd, src) = source_store();
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("dav")).unwrap();
    let Some(nginx) = Nginx::start(root.path()) else {
        return;
    };
    let one = src.get(&Tag::parse("one").unwrap()).unwrap();
    let target = nginx.url("/dav/acme/demo-v1.forkd-snapshot.tar.zst?X-Amz-Signature=abc");
    let r = push(&src, &one, &push_opts(&target, None, "acme/demo", "v1")).unwrap();
    let stored =
        std::fs::read(root.path().join("dav/acme/demo-v1.forkd-snapshot.tar.zst")).unwrap();
    assert_eq!(sha256_hex(&stored), r.sha256);
    assert_eq!(stored.len() as u64, r.size_bytes);
    // And it pulls back by URL.
    let (_dd, dst) = empty_store();
    let mut o = opts("http://127.0.0.1:9/");
    o.tag = Some(Tag::parse("back").unwrap());
    pull(
        &dst,
        &nginx.url("/dav/acme/demo-v1.forkd-snapshot.tar.zst"),
        &o,
    )
    .unwrap();
    assert_same_files(&src, "one", &dst, "back");
}

#[test]
fn nginx_size_lies_and_server_errors() {
    let (_sd, src) = source_store();
    let hub = tempfile::tempdir().unwrap();
    let entry = publish_into(hub.path(), &src, "one", "acme/demo", "v1", true);
    let size = entry.size_bytes.unwrap();
    let Some(nginx) = Nginx::start(hub.path()) else {
        return;
    };
    let url = nginx.url("/");
    let good = std::fs::read_to_string(hub.path().join("registry.json")).unwrap();
    let with = |f: &dyn Fn(&mut forkd_hub::VersionEntry)| edit_versions(hub.path(), &good, f);
    // The server's pack is larger or smaller than the registry lists: refused from the
    // response's length, before a byte of it is read.
    with(&|v| v.size_bytes = Some(size / 2));
    pull_refused(&url, "acme/demo", "on the server, the registry lists");
    with(&|v| v.size_bytes = Some(size + 4096));
    pull_refused(&url, "acme/demo", "on the server, the registry lists");
    // A 503 is retried with backoff, then reported with the attempt count.
    with(&|v| v.url = "unavailable/x.forkd-snapshot.tar.zst".into());
    pull_refused(&url, "acme/demo", "HTTP 503");
    pull_refused(&url, "acme/demo", "gave up after 3 attempts");
}

#[test]
fn oversized_registry_is_refused_before_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.json");
    std::fs::write(
        &path,
        format!("{{\"schema_version\":1,\"pad\":\"{}\"}}", "x".repeat(4096)),
    )
    .unwrap();
    let url = url::Url::from_file_path(&path).unwrap();
    let err = forkd_hub::fetch::fetch_small(&url, &fast_fetch(0), 1024, false).unwrap_err();
    assert!(err.to_string().contains("larger than 1024 bytes"), "{err}");
}

#[test]
fn presigned_put_sends_no_headers_that_would_break_a_signature() {
    use std::io::{BufRead, BufReader, Read, Write};
    let (_sd, src) = source_store();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            head.push(line.trim_end().to_string());
        }
        let len: u64 = head
            .iter()
            .find_map(|h| {
                h.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.parse().unwrap())
            })
            .expect("Content-Length sent");
        let mut body = Vec::new();
        reader.take(len).read_to_end(&mut body).unwrap();
        (&stream)
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        (head, body)
    });
    let one = src.get(&Tag::parse("one").unwrap()).unwrap();
    let url = format!("http://{addr}/bucket/demo.tar.zst?X-Amz-Expires=60&X-Amz-Signature=f00");
    let r = push(&src, &one, &push_opts(&url, None, "acme/demo", "v1")).unwrap();
    let (head, body) = server.join().unwrap();
    assert_eq!(
        head[0],
        "PUT /bucket/demo.tar.zst?X-Amz-Expires=60&X-Amz-Signature=f00 HTTP/1.1"
    );
    let names: Vec<String> = head[1..]
        .iter()
        .map(|h| h.split(':').next().unwrap().to_ascii_lowercase())
        .collect();
    for forbidden in [
        "authorization",
        "content-type",
        "transfer-encoding",
        "x-forkd-minisig",
    ] {
        assert!(
            !names.iter().any(|n| n == forbidden),
            "sent {forbidden}: {head:?}"
        );
    }
    assert_eq!(sha256_hex(&body), r.sha256);
}

#[test]
fn full_disk_during_pull_leaves_nothing() {
    use std::process::Command;
    let (_sd, src) = source_store();
    let hub = tempfile::tempdir().unwrap();
    publish_into(hub.path(), &src, "one", "acme/demo", "v1", true);
    let Some(nginx) = Nginx::start(hub.path()) else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let mnt = root.path().join("tiny");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (not root?) to fill a disk");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let store = Store::open(&mnt).unwrap();
    let err = pull(&store, "acme/demo", &opts(&nginx.url("/"))).unwrap_err();
    let err = forkd_store::error_chain(&err);
    assert!(err.contains("No space left"), "{err}");
    assert_store_empty(&store);
    let cached: Vec<_> = std::fs::read_dir(store.cache_dir().join("packs"))
        .unwrap()
        .collect();
    assert!(
        cached.is_empty(),
        "partial download left on a full disk: {cached:?}"
    );
}

/// A registry in `dir` whose packs are fetched through `proxy` (the registry itself is not).
fn route_packs_through(dir: &Path, proxy: &Proxy) {
    let text = std::fs::read_to_string(dir.join("registry.json")).unwrap();
    let mut reg = Registry::parse(&text, "t").unwrap();
    for p in reg.packages.values_mut() {
        for v in p.versions.values_mut() {
            v.url = proxy.url(&v.url);
        }
    }
    write_registry(dir, &reg.to_json());
}

/// Options whose notices (retries, waits) are collected.
fn noted_opts(hub: &str) -> (PullOptions, Arc<Mutex<Vec<String>>>) {
    let said = Arc::new(Mutex::new(Vec::new()));
    let sink = said.clone();
    let mut o = opts(hub);
    o.fetch.notify = Notifier::new(move |m| sink.lock().unwrap().push(m.to_string()));
    (o, said)
}

#[test]
fn two_concurrent_pulls_download_once_and_the_second_waits_then_finds_it() {
    let (_sd, src) = source_store();
    let hub = tempfile::tempdir().unwrap();
    publish_into(hub.path(), &src, "one", "acme/demo", "v1", true);
    let Some(nginx) = Nginx::start(hub.path()) else {
        return;
    };
    // Each pack download stalls after 64 KiB until the gate opens: the first pull holds the
    // pack's lock mid-download while the second one starts.
    let proxy = Proxy::gated(nginx.addr, 64 * 1024);
    route_packs_through(hub.path(), &proxy);
    let (_dd, dst) = empty_store();
    let url = nginx.url("/");
    let (second_opts, said) = noted_opts(&url);
    let dst = &dst;
    std::thread::scope(|s| {
        let first = s.spawn(|| pull(dst, "acme/demo", &opts(&url)));
        while proxy.served() < 64 * 1024 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let second = s.spawn(|| pull(dst, "acme/demo", &second_opts));
        while said.lock().unwrap().is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let told = said.lock().unwrap()[0].clone();
        assert!(
            told.contains("waiting for another pull of acme/demo"),
            "{told}"
        );
        proxy.open_gate();
        let first = first.join().unwrap().unwrap();
        let second = second.join().unwrap().unwrap();
        assert!(matches!(first.outcome, UnpackOutcome::Installed(_)));
        assert!(matches!(second.outcome, UnpackOutcome::AlreadyPresent(_)));
        assert_eq!(second.fetched_bytes, 0);
    });
    assert_eq!(
        proxy.connections.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the pack was downloaded more than once"
    );
    assert_same_files(&src, "one", dst, "one");
}

/// A pull that fails for a reason no retry can mend fails on its first attempt.
fn refused_at_once(hub: &str, needle: &str) {
    let (o, said) = noted_opts(hub);
    let err = refused_with("acme/demo", needle, &o);
    assert!(!err.is_transient(), "{err}");
    assert!(!err.to_string().contains("gave up"), "{err}");
    assert!(said.lock().unwrap().is_empty(), "retried: {said:?}");
}

#[test]
fn errors_that_cannot_heal_are_not_retried() {
    let (_sd, src) = source_store();
    let hub = tempfile::tempdir().unwrap();
    let entry = publish_into(hub.path(), &src, "one", "acme/demo", "v1", true);
    let Some(nginx) = Nginx::start(hub.path()) else {
        return;
    };
    let url = nginx.url("/");
    // 4xx: a registry that is not there.
    refused_at_once(&nginx.url("/nothing/registry.json"), "HTTP 404");
    // TLS spoken to a plain-HTTP server.
    refused_at_once(&url.replace("http://", "https://"), "TLS handshake failed");
    let good = std::fs::read_to_string(hub.path().join("registry.json")).unwrap();
    let with = |f: &dyn Fn(&mut forkd_hub::VersionEntry)| edit_versions(hub.path(), &good, f);
    // The server's pack is not the size the registry lists.
    let size = entry.size_bytes.unwrap();
    with(&|v| v.size_bytes = Some(size + 1));
    refused_at_once(&url, "on the server, the registry lists");
    // Its hash is not the registry's.
    with(&|v| v.sha256 = Some("0".repeat(64)));
    refused_at_once(&url, "does not match the registry's");
    // No hash at all: it installs, with a warning that nothing could be checked.
    with(&|v| {
        v.sha256 = None;
        v.size_bytes = Some(size);
    });
    let (_d, dst) = empty_store();
    let (o, said) = noted_opts(&url);
    pull(&dst, "acme/demo", &o).unwrap();
    let said = said.lock().unwrap();
    assert!(
        said.iter()
            .any(|m| m.starts_with("warning:") && m.contains("acme/demo@latest without a sha256")),
        "{said:?}"
    );
}

#[test]
fn a_name_that_does_not_resolve_is_not_retried() {
    // In a network namespace of its own (this thread only) the lookup fails at once and no
    // query leaves the machine.
    let outcome = std::thread::spawn(|| {
        // SAFETY: unshare(2) with CLONE_NEWNET changes only this thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        let (_d, dst) = empty_store();
        let (o, said) = noted_opts("http://hub.forkd-test.invalid/registry.json");
        let err = pull(&dst, "acme/demo", &o).map(|_| ()).unwrap_err();
        let notices = said.lock().unwrap().len();
        Some((err.to_string(), err.is_transient(), notices))
    })
    .join()
    .unwrap();
    let Some((msg, transient, notices)) = outcome else {
        eprintln!("SKIP: a_name_that_does_not_resolve_is_not_retried: cannot unshare a network namespace (not root?)");
        return;
    };
    assert!(msg.contains("cannot resolve"), "{msg}");
    assert!(!transient && notices == 0, "retried: {msg}");
}

#[test]
fn a_corrupt_partial_download_is_discarded_as_local_and_the_pull_succeeds() {
    let (_sd, src) = source_store();
    let hub = tempfile::tempdir().unwrap();
    let entry = publish_into(hub.path(), &src, "one", "acme/demo", "v1", true);
    let Some(nginx) = Nginx::start(hub.path()) else {
        return;
    };
    let (_dd, dst) = empty_store();
    let partial = partial_path(&dst, entry.sha256.as_deref().unwrap());
    std::fs::create_dir_all(partial.parent().unwrap()).unwrap();
    std::fs::write(&partial, vec![0x5a; 100_000]).unwrap();
    let (o, said) = noted_opts(&nginx.url("/"));
    let r = pull(&dst, "acme/demo", &o).unwrap();
    assert!(matches!(r.outcome, UnpackOutcome::Installed(_)));
    let said = said.lock().unwrap();
    assert!(
        said.iter()
            .any(|m| m.contains("interrupted download") && m.contains("corrupt")),
        "{said:?}"
    );
    assert_same_files(&src, "one", &dst, "one");
    assert!(!partial.exists());
}
