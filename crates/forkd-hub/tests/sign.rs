//! minisign-compatible signatures: ours verify with `minisign -V`, minisign's verify with
//! ours, and the trust policy refuses tampered, untrusted and (when required) unsigned packs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use forkd_hub::publish::{publish, PublishOptions};
use forkd_hub::sign::{PublicKey, SignatureFile, TrustPolicy};
use forkd_hub::{pull, FetchConfig, PackOptions, PullOptions, Registry};
use forkd_store::{Store, Tag};

const MIB: u64 = 1 << 20;

/// An unencrypted minisign key pair written as `dir/NAME.key` / `dir/NAME.pub`.
fn keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
    let (sk_text, pk_text) = forkd_hub::sign::generate_keypair().unwrap();
    let sk = dir.join(format!("{name}.key"));
    let pk = dir.join(format!("{name}.pub"));
    std::fs::write(&sk, sk_text).unwrap();
    std::fs::write(&pk, &pk_text).unwrap();
    let line = pk_text.lines().nth(1).unwrap().to_string();
    (sk, pk, line)
}

struct Fixture {
    _src_dir: tempfile::TempDir,
    hub: tempfile::TempDir,
    keys: tempfile::TempDir,
    sk: PathBuf,
    pk: PathBuf,
    pk_line: String,
    pack: PathBuf,
}

fn fixture() -> Fixture {
    let src_dir = tempfile::tempdir().unwrap();
    let src = Store::open(src_dir.path()).unwrap();
    make_snapshot(&src, "one", 32 * MIB, 2 * MIB, 21);
    make_snapshot(&src, "two", 32 * MIB, 2 * MIB, 22);
    let keys = tempfile::tempdir().unwrap();
    let (sk, pk, pk_line) = keypair(keys.path(), "acme");
    let hub = tempfile::tempdir().unwrap();
    let mut pack = PathBuf::new();
    for (tag, version) in [("two", "v2"), ("one", "v1")] {
        let snap = src.get(&Tag::parse(tag).unwrap()).unwrap();
        let o = PublishOptions {
            pack: PackOptions::new("acme/signed", version),
            url_base: None,
            sign_key: Some(sk.clone()),
            make_latest: true,
            recipe_path: None,
            release_tag: None,
        };
        pack = publish(&snap, hub.path(), &o).unwrap().pack_path;
    }
    Fixture {
        _src_dir: src_dir,
        hub,
        keys,
        sk,
        pk,
        pk_line,
        pack,
    }
}

fn trusting(keys: Vec<PublicKey>, require: bool) -> PullOptions {
    PullOptions {
        trust: TrustPolicy {
            require_signatures: require,
            keys,
        },
        fetch: FetchConfig {
            retries: 0,
            backoff: Duration::from_millis(10),
            ..FetchConfig::default()
        },
        ..Default::default()
    }
}

fn pull_from(
    hub: &Path,
    reference: &str,
    o: &PullOptions,
) -> (
    tempfile::TempDir,
    Store,
    forkd_hub::Result<forkd_hub::PullReport>,
) {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let mut o = o.clone();
    o.hub = Some(hub.to_str().unwrap().to_string());
    let r = pull(&store, reference, &o);
    (d, store, r)
}

fn refused(hub: &Path, o: &PullOptions, needle: &str) {
    let (_d, store, r) = pull_from(hub, "acme/signed", o);
    let err = r.map(|_| ()).expect_err("pull accepted");
    assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
    assert_store_empty(&store);
}

#[test]
fn signed_pack_verifies_with_trusted_key() {
    let f = fixture();
    let key = PublicKey::parse(&f.pk_line).unwrap();
    let (_d, _s, r) = pull_from(
        f.hub.path(),
        "acme/signed",
        &trusting(vec![key.clone()], true),
    );
    let r = r.unwrap();
    assert_eq!(r.signed_by.as_deref(), Some(key.id_hex().as_str()));
    // A trust file naming the key file works the same.
    let trust_path = f.keys.path().join("trust.toml");
    std::fs::write(
        &trust_path,
        format!(
            "require_signatures = true\ntrusted_key_files = [{:?}]\n",
            f.pk
        ),
    )
    .unwrap();
    let policy = TrustPolicy::load(&trust_path).unwrap();
    assert!(policy.require_signatures && policy.keys.len() == 1);
    std::fs::write(&trust_path, "require_signatures = 1\n").unwrap();
    assert!(TrustPolicy::load(&trust_path).is_err());
}

#[test]
fn tampered_untrusted_and_unsigned_are_refused() {
    let f = fixture();
    let key = PublicKey::parse(&f.pk_line).unwrap();
    let reg_path = f.hub.path().join("registry.json");
    let good = std::fs::read_to_string(&reg_path).unwrap();
    let reg = Registry::parse(&good, "t").unwrap();
    let versions = &reg.packages["acme/signed"].versions;
    let sig_v1 = versions["v1"].minisig.clone().unwrap();
    let sig_v2 = versions["v2"].minisig.clone().unwrap();

    // Valid signature, but of the other pack.
    let mut r = reg.clone();
    r.packages
        .get_mut("acme/signed")
        .unwrap()
        .versions
        .get_mut("latest")
        .unwrap()
        .minisig = Some(sig_v2.clone());
    std::fs::write(&reg_path, r.to_json()).unwrap();
    refused(
        f.hub.path(),
        &trusting(vec![key.clone()], false),
        "does not match the pack",
    );

    // Trusted comment edited.
    let mut r = reg.clone();
    let edited = sig_v1.replace("trusted comment: forkd pack", "trusted comment: forkd PACK");
    r.packages
        .get_mut("acme/signed")
        .unwrap()
        .versions
        .get_mut("latest")
        .unwrap()
        .minisig = Some(edited);
    std::fs::write(&reg_path, r.to_json()).unwrap();
    refused(
        f.hub.path(),
        &trusting(vec![key.clone()], false),
        "trusted comment",
    );

    // Signed by a key the user does not trust.
    std::fs::write(&reg_path, &good).unwrap();
    let (_, _, other_line) = keypair(f.keys.path(), "other");
    let other = PublicKey::parse(&other_line).unwrap();
    refused(f.hub.path(), &trusting(vec![other], false), "not trusted");

    // Unsigned, and the policy requires signatures. (The .minisig beside the pack is
    // removed too, since a missing inline signature falls back to it.)
    let mut r = reg.clone();
    for v in r
        .packages
        .get_mut("acme/signed")
        .unwrap()
        .versions
        .values_mut()
    {
        v.minisig = None;
    }
    std::fs::write(&reg_path, r.to_json()).unwrap();
    std::fs::remove_file(format!("{}.minisig", f.pack.display())).unwrap();
    refused(f.hub.path(), &trusting(vec![key.clone()], true), "unsigned");
    // Without the requirement, unsigned is accepted.
    let (_d, _s, ok) = pull_from(f.hub.path(), "acme/signed", &trusting(vec![key], false));
    assert_eq!(ok.unwrap().signed_by, None);
}

#[test]
fn minisign_tool_interoperates() {
    if !have("minisign") {
        eprintln!("skipped: minisign is not installed (apt-get install minisign)");
        return;
    }
    let f = fixture();
    // `minisign -V` accepts our signature.
    let st = Command::new("minisign")
        .arg("-V")
        .arg("-q")
        .arg("-p")
        .arg(&f.pk)
        .arg("-m")
        .arg(&f.pack)
        .status()
        .unwrap();
    assert!(st.success(), "minisign -V refused our signature");
    // And refuses it for a modified pack.
    let copy = f.keys.path().join("copy.tar.zst");
    let mut bytes = std::fs::read(&f.pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&copy, &bytes).unwrap();
    std::fs::copy(
        format!("{}.minisig", f.pack.display()),
        format!("{}.minisig", copy.display()),
    )
    .unwrap();
    let st = Command::new("minisign")
        .args(["-V", "-q", "-p"])
        .arg(&f.pk)
        .arg("-m")
        .arg(&copy)
        .status()
        .unwrap();
    assert!(!st.success(), "minisign -V accepted a modified pack");
    // minisign's own signature verifies with our verifier.
    let st = Command::new("minisign")
        .args(["-S", "-s"])
        .arg(&f.sk)
        .arg("-m")
        .arg(&copy)
        .arg("-x")
        .arg(f.keys.path().join("theirs.minisig"))
        .stdin(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "minisign -S failed");
    let sig = SignatureFile::parse(
        &std::fs::read_to_string(f.keys.path().join("theirs.minisig")).unwrap(),
    )
    .unwrap();
    let key = PublicKey::parse(&f.pk_line).unwrap();
    let prehash = forkd_hub::sign::prehash_reader(std::fs::File::open(&copy).unwrap()).unwrap();
    sig.verify(&key, &prehash).unwrap();
    let wrong = forkd_hub::sign::prehash_reader(std::fs::File::open(&f.pack).unwrap()).unwrap();
    assert!(sig.verify(&key, &wrong).is_err());
}

#[test]
fn signed_push_to_hub_server_is_verified_on_pull() {
    use forkd_hub::push::{push, PushOptions};
    use forkd_hub::serve::{ServeOptions, Server};
    let f = fixture();
    let src_dir = tempfile::tempdir().unwrap();
    let src = Store::open(src_dir.path()).unwrap();
    make_snapshot(&src, "pushed", 16 * MIB, MIB, 23);
    let site = tempfile::tempdir().unwrap();
    let mut o = ServeOptions::new(site.path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
    o.token = Some("tok".into());
    let server = Server::bind(o).unwrap();
    let url = format!("http://{}/", server.local_addr());
    std::thread::spawn(move || server.run());
    let snap = src.get(&Tag::parse("pushed").unwrap()).unwrap();
    push(
        &src,
        &snap,
        &PushOptions {
            pack: PackOptions::new("acme/signed", "v1"),
            to: url.clone(),
            token: Some("tok".into()),
            sign_key: Some(f.sk.clone()),
            fetch: FetchConfig::default(),
        },
    )
    .unwrap();
    let key = PublicKey::parse(&f.pk_line).unwrap();
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let mut o = trusting(vec![key.clone()], true);
    o.hub = Some(url);
    let r = pull(&store, "acme/signed", &o).unwrap();
    assert_eq!(r.signed_by, Some(key.id_hex()));
}
