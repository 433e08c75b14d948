//! Store behaviour through the public API: atomicity, races, sparseness, verification, removal.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Barrier};

use forkd_store::sparse::disk_usage;
use forkd_store::{FileProblem, RemoveMode, SnapshotMeta, Store, StoreError, Tag};

fn tag(s: &str) -> Tag {
    Tag::parse(s).unwrap()
}

fn meta(parent: Option<&str>) -> SnapshotMeta {
    SnapshotMeta {
        memory_mib: 1024,
        vcpus: 2,
        kernel: "builtin:demo".into(),
        parent_tag: parent.map(tag),
        ..Default::default()
    }
}

/// A 1 GiB memory.bin holding 1 MiB of data, plus a small vmstate.json.
fn write_sparse_snapshot_files(dir: &Path) {
    let f = File::create(dir.join("memory.bin")).unwrap();
    f.set_len(1 << 30).unwrap();
    let data: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + 3) as u8).collect();
    f.write_all_at(&data, 512 << 20).unwrap();
    std::fs::write(dir.join("vmstate.json"), b"{\"v\":1}").unwrap();
}

fn create(store: &Store, t: &str, parent: Option<&str>) {
    let staging = store.begin(&tag(t)).unwrap();
    std::fs::write(staging.path().join("vmstate.json"), t.as_bytes()).unwrap();
    staging.commit(meta(parent)).unwrap();
}

#[test]
fn commit_publishes_and_records_hashes() {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let staging = store.begin(&tag("base")).unwrap();
    write_sparse_snapshot_files(staging.path());
    let snap = staging.commit(meta(None)).unwrap();
    assert_eq!(snap.dir, home.path().join("snapshots/base"));
    let m = store.get(&tag("base")).unwrap().manifest;
    assert_eq!(m.memory_mib, 1024);
    assert_eq!(m.file("memory.bin").unwrap().size, 1 << 30);
    assert_eq!(m.file("vmstate.json").unwrap().sha256.len(), 64);
    assert!(chrono::DateTime::parse_from_rfc3339(&m.created_at).is_ok());
    assert!(store.verify(&tag("base")).unwrap().is_empty());
}

#[test]
fn abandoned_staging_is_invisible_and_removed() {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let staging = store.begin(&tag("half")).unwrap();
    std::fs::write(staging.path().join("memory.bin"), b"partial").unwrap();
    let staging_dir = staging.path().to_path_buf();
    assert!(
        store.list().unwrap().is_empty(),
        "a staging snapshot must not be listed"
    );
    assert!(matches!(
        store.get(&tag("half")),
        Err(StoreError::NotFound(_))
    ));
    drop(staging);
    assert!(!staging_dir.exists());
    assert_eq!(std::fs::read_dir(store.snapshots_dir()).unwrap().count(), 0);
}

#[test]
fn staging_left_by_a_dead_writer_is_swept_on_open() {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    // pid 0x7fffffff cannot exist.
    let stale = store.snapshots_dir().join(".staging.2147483647.abc.x");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("memory.bin"), b"junk").unwrap();
    let live = store.begin(&tag("live")).unwrap();
    Store::open(home.path()).unwrap();
    assert!(!stale.exists());
    assert!(
        live.path().exists(),
        "a live writer's staging dir must survive"
    );
}

#[test]
fn concurrent_create_of_one_tag_has_one_winner() {
    let home = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(home.path()).unwrap());
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (store, barrier) = (store.clone(), barrier.clone());
            std::thread::spawn(move || {
                // Everyone stages before anyone commits, so the race is decided by the rename.
                let staging = store.begin(&tag("race")).map_err(|e| e.to_string())?;
                std::fs::write(staging.path().join("vmstate.json"), format!("writer {i}")).unwrap();
                barrier.wait();
                staging
                    .commit(meta(None))
                    .map(|_| i)
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(r.contains("already exists"), "{r}");
    }
    let content =
        std::fs::read_to_string(store.snapshot_dir(&tag("race")).join("vmstate.json")).unwrap();
    assert_eq!(content, format!("writer {}", winners[0]));
    assert!(store.verify(&tag("race")).unwrap().is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(store.snapshots_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("race")]);
}

#[test]
fn begin_refuses_existing_tag() {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    create(&store, "a", None);
    let err = store.begin(&tag("a")).unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists(_)));
    assert!(err.to_string().contains("\"a\" already exists"));
}

#[test]
fn sparse_files_stay_sparse_through_commit_verify_and_copy() {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let staging = store.begin(&tag("sparse")).unwrap();
    write_sparse_snapshot_files(staging.path());
    let snap = staging.commit(meta(None)).unwrap();
    let mem = snap.file("memory.bin");
    assert!(disk_usage(&mem).unwrap() <= 2 << 20);
    assert!(store.verify(&tag("sparse")).unwrap().is_empty());
    assert!(disk_usage(&mem).unwrap() <= 2 << 20);
    let copy = home.path().join("copy.bin");
    forkd_store::sparse::copy_sparse(&mem, &copy).unwrap();
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), 1 << 30);
    assert!(disk_usage(&copy).unwrap() <= 2 << 20);
    assert_eq!(
        forkd_store::hash::hash_file(&copy).unwrap(),
        forkd_store::hash::hash_file(&mem).unwrap()
    );
    assert!(snap.disk_usage() <= 3 << 20);
}

#[test]
fn verify_reports_a_flipped_byte_by_file_name() {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let staging = store.begin(&tag("v")).unwrap();
    write_sparse_snapshot_files(staging.path());
    let snap = staging.commit(meta(None)).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.file("memory.bin"))
        .unwrap();
    let mut b = [0u8; 1];
    File::open(snap.file("memory.bin"))
        .unwrap()
        .read_exact_at(&mut b, (512 << 20) + 77)
        .unwrap();
    f.write_all_at(&[b[0] ^ 0x01], (512 << 20) + 77).unwrap();
    let problems = store.verify(&tag("v")).unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(matches!(&problems[0], FileProblem::HashMismatch { name, .. } if name == "memory.bin"));
}

#[test]
fn verify_reports_missing_truncated_and_unlisted_files() {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let staging = store.begin(&tag("v")).unwrap();
    write_sparse_snapshot_files(staging.path());
    let snap = staging.commit(meta(None)).unwrap();
    std::fs::remove_file(snap.file("vmstate.json")).unwrap();
    File::options()
        .write(true)
        .open(snap.file("memory.bin"))
        .unwrap()
        .set_len(4096)
        .unwrap();
    std::fs::write(snap.file("extra.bin"), b"x").unwrap();
    let text: Vec<String> = store
        .verify(&tag("v"))
        .unwrap()
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(text.len(), 3, "{text:?}");
    assert!(text.iter().any(|t| t.starts_with("vmstate.json: missing")));
    assert!(text.iter().any(|t| t.starts_with("memory.bin: size 4096")));
    assert!(text
        .iter()
        .any(|t| t.starts_with("extra.bin: present but not in the manifest")));
}

#[test]
fn remove_refuses_dependents_unless_forced_or_cascaded() {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    create(&store, "root", None);
    create(&store, "mid", Some("root"));
    create(&store, "leaf", Some("mid"));
    create(&store, "other", None);

    let err = store
        .remove(&[tag("root")], RemoveMode::Refuse)
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"mid\""), "{err}");
    assert!(store.exists(&tag("root")));

    // Removing a parent together with all its dependents is fine.
    assert_eq!(
        store
            .remove(&[tag("mid"), tag("leaf")], RemoveMode::Refuse)
            .unwrap()
            .len(),
        2
    );
    create(&store, "mid", Some("root"));
    create(&store, "leaf", Some("mid"));

    let removed = store.remove(&[tag("root")], RemoveMode::Cascade).unwrap();
    assert_eq!(removed, vec![tag("leaf"), tag("mid"), tag("root")]);
    assert!(store.exists(&tag("other")));

    create(&store, "root", None);
    create(&store, "mid", Some("root"));
    store.remove(&[tag("root")], RemoveMode::Orphan).unwrap();
    assert!(store.exists(&tag("mid")) && !store.exists(&tag("root")));
    assert!(matches!(
        store.remove(&[tag("nope")], RemoveMode::Refuse),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn broken_manifest_does_not_hide_other_snapshots() {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    create(&store, "good", None);
    let bad = store.snapshots_dir().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("manifest.toml"), "format_version = 99\n").unwrap();
    let list = store.list().unwrap();
    assert_eq!(list.len(), 2);
    let err = list[0].as_ref().unwrap_err().to_string();
    assert!(err.contains("99") && err.contains("newer"), "{err}");
    assert_eq!(list[1].as_ref().unwrap().manifest.tag, tag("good"));
}

#[test]
fn staging_refuses_non_regular_files() {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let staging = store.begin(&tag("s")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", staging.path().join("memory.bin")).unwrap();
    let err = staging.commit(meta(None)).unwrap_err().to_string();
    assert!(
        err.contains("memory.bin") && err.contains("not a regular file"),
        "{err}"
    );
    assert!(!store.exists(&tag("s")));
}

#[test]
fn begin_replace_swaps_atomically_and_leaves_no_old_copy() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    create(&store, "t", None);
    let old = store.get(&tag("t")).unwrap().manifest;
    let staging = store.begin_replace(&tag("t")).unwrap();
    std::fs::write(staging.path().join("vmstate.json"), b"new state").unwrap();
    let new = staging.commit(meta(None)).unwrap();
    assert_ne!(new.manifest.files, old.files);
    assert_eq!(
        store.get(&tag("t")).unwrap().manifest.files,
        new.manifest.files
    );
    assert!(store.verify(&tag("t")).unwrap().is_empty());
    // Only the one snapshot directory: the replaced one is gone, no staging left.
    let names: Vec<String> = std::fs::read_dir(store.snapshots_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["t"]);
    // Replacing a tag that does not exist yet simply creates it.
    let staging = store.begin_replace(&tag("fresh")).unwrap();
    std::fs::write(staging.path().join("vmstate.json"), b"x").unwrap();
    staging.commit(meta(None)).unwrap();
    assert!(store.exists(&tag("fresh")));
}
