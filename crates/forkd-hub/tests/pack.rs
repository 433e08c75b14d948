//! Pack format v1: round trips, GNU tar compatibility, and every hostile-pack refusal.

mod common;

use std::process::Command;

use common::*;
use forkd_hub::{unpack, write_pack, HubError, PackOptions, UnpackOptions, UnpackOutcome};
use forkd_store::sparse::disk_usage;
use forkd_store::{Store, Tag};
use tar::EntryType;

const MIB: u64 = 1 << 20;

fn no_hook() -> impl FnMut(&forkd_store::Manifest) -> forkd_hub::Result<()> {
    |_| Ok(())
}

fn pack_of(store: &Store, tag: &str) -> Vec<u8> {
    let snap = store.get(&Tag::parse(tag).unwrap()).unwrap();
    let mut out = Vec::new();
    let info = write_pack(&snap, &PackOptions::new("acme/demo", "v1"), &mut out).unwrap();
    assert_eq!(info.size_bytes, out.len() as u64);
    assert_eq!(info.sha256, sha256_hex(&out));
    out
}

fn unpack_bytes(
    store: &Store,
    pack: &[u8],
    opts: &UnpackOptions,
) -> forkd_hub::Result<UnpackOutcome> {
    unpack(store, pack, "test.pack", opts, &mut no_hook())
}

#[test]
fn round_trip_is_identical_and_sparse() {
    let src_dir = tempfile::tempdir().unwrap();
    let src = Store::open(src_dir.path()).unwrap();
    make_snapshot(&src, "base", 256 * MIB, 8 * MIB, 1);
    let pack = pack_of(&src, "base");
    // Holes are not stored: the pack is about the size of the random data.
    assert!(
        (pack.len() as u64) < 12 * MIB,
        "pack is {} bytes",
        pack.len()
    );

    let dst_dir = tempfile::tempdir().unwrap();
    let dst = Store::open(dst_dir.path()).unwrap();
    let out = unpack_bytes(&dst, &pack, &UnpackOptions::default()).unwrap();
    let UnpackOutcome::Installed(snap) = out else {
        panic!("expected an install")
    };
    assert_eq!(
        snap.tag().as_str(),
        "base",
        "the tag defaults to the one the snapshot had when packed"
    );
    assert_eq!(snap.manifest.name, "acme/demo");
    assert_eq!(snap.manifest.version, "v1");
    assert!(dst.verify(snap.tag()).unwrap().is_empty());
    let orig = src.get(&Tag::parse("base").unwrap()).unwrap();
    for f in &orig.manifest.files {
        let a = std::fs::read(orig.file(&f.name)).unwrap();
        let b = std::fs::read(snap.file(&f.name)).unwrap();
        assert!(a == b, "{} differs", f.name);
        let used = disk_usage(&snap.file(&f.name)).unwrap();
        let src_used = disk_usage(&orig.file(&f.name)).unwrap();
        assert!(
            used <= src_used + MIB,
            "{}: {used} bytes on disk vs {src_used} in the source",
            f.name
        );
    }
}

#[test]
fn gnu_tar_reads_our_packs_sparse() {
    if !have("tar") || !have("zstd") {
        eprintln!("skipped: GNU tar or zstd not installed");
        return;
    }
    let src_dir = tempfile::tempdir().unwrap();
    let src = Store::open(src_dir.path()).unwrap();
    make_snapshot(&src, "base", 64 * MIB, 2 * MIB, 2);
    let pack = pack_of(&src, "base");
    let work = tempfile::tempdir().unwrap();
    let pack_path = work.path().join("p.tar.zst");
    std::fs::write(&pack_path, &pack).unwrap();
    let list = Command::new("sh")
        .arg("-c")
        .arg(format!("zstd -dc {} | tar -t", pack_path.display()))
        .output()
        .unwrap();
    let names = String::from_utf8(list.stdout).unwrap();
    let names: Vec<&str> = names.lines().collect();
    assert_eq!(
        names,
        ["manifest.toml", "vmstate.json", "rootfs.ext4", "memory.bin"]
    );
    let x = work.path().join("x");
    std::fs::create_dir(&x).unwrap();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "zstd -dc {} | tar -x -C {}",
            pack_path.display(),
            x.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    let orig = src.get(&Tag::parse("base").unwrap()).unwrap();
    for f in &orig.manifest.files {
        let a = std::fs::read(orig.file(&f.name)).unwrap();
        let b = std::fs::read(x.join(&f.name)).unwrap();
        assert!(a == b, "{} differs after GNU tar -x", f.name);
    }
    assert!(disk_usage(&x.join("memory.bin")).unwrap() < 8 * MIB);
}

#[test]
fn already_present_is_a_no_op_and_different_content_needs_force() {
    let src_dir = tempfile::tempdir().unwrap();
    let src = Store::open(src_dir.path()).unwrap();
    make_snapshot(&src, "a", 16 * MIB, MIB, 3);
    make_snapshot(&src, "b", 16 * MIB, MIB, 4);
    let pack_a = pack_of(&src, "a");
    let pack_b = pack_of(&src, "b");
    let dst_dir = tempfile::tempdir().unwrap();
    let dst = Store::open(dst_dir.path()).unwrap();
    assert!(matches!(
        unpack_bytes(&dst, &pack_a, &UnpackOptions::default()).unwrap(),
        UnpackOutcome::Installed(_)
    ));
    assert!(matches!(
        unpack_bytes(&dst, &pack_a, &UnpackOptions::default()).unwrap(),
        UnpackOutcome::AlreadyPresent(_)
    ));
    // b installed under a's tag: a different snapshot already holds it.
    let into_a = UnpackOptions {
        tag: Some(Tag::parse("a").unwrap()),
        ..Default::default()
    };
    let err = unpack_bytes(&dst, &pack_b, &into_a).unwrap_err();
    assert!(err.to_string().contains("already tagged \"a\""), "{err}");
    let forced = UnpackOptions {
        force: true,
        ..into_a
    };
    let UnpackOutcome::Installed(snap) = unpack_bytes(&dst, &pack_b, &forced).unwrap() else {
        panic!("expected a forced install")
    };
    let b = src.get(&Tag::parse("b").unwrap()).unwrap();
    assert_eq!(snap.manifest.files, b.manifest.files);
    assert!(dst.verify(snap.tag()).unwrap().is_empty());
    // Only the one snapshot, no staging or trash leftovers.
    assert_eq!(std::fs::read_dir(dst.snapshots_dir()).unwrap().count(), 1);

    // A snapshot that others build on is never replaced, even with --force.
    let child = Tag::parse("child").unwrap();
    let staging = dst.begin(&child).unwrap();
    std::fs::write(staging.path().join("vmstate.json"), b"{}").unwrap();
    staging
        .commit(forkd_store::SnapshotMeta {
            parent_tag: Some(snap.tag().clone()),
            ..Default::default()
        })
        .unwrap();
    let err = unpack_bytes(&dst, &pack_a, &forced).unwrap_err();
    assert!(err.to_string().contains("child"), "{err}");
    assert_eq!(
        dst.get(snap.tag()).unwrap().manifest.files,
        b.manifest.files
    );
}

/// Unpacks a hostile pack into a fresh store: must fail with a message containing `needle`
/// and leave the store empty.
fn refused(pack: &[u8], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let err = unpack_bytes(&store, pack, &UnpackOptions::default())
        .map(|_| ())
        .expect_err("hostile pack accepted");
    let msg = err.to_string();
    assert!(msg.contains(needle), "error {msg:?} lacks {needle:?}");
    assert!(
        msg.contains("test.pack"),
        "error {msg:?} does not name the pack"
    );
    assert!(!msg.contains('\n'), "error is not one line: {msg:?}");
    assert_store_empty(&store);
}

const MEM: &[u8] = b"memory contents";

fn good_manifest() -> Vec<u8> {
    let text = manifest_text("t", "acme/t", &[("memory.bin", MEM)]);
    raw_entry(b"manifest.toml", EntryType::Regular, text.as_bytes())
}

#[test]
fn hostile_absolute_path() {
    let pack = zstd_tar(&[
        good_manifest(),
        raw_entry(b"/etc/passwd", EntryType::Regular, MEM),
    ]);
    refused(&pack, "absolute path");
}

#[test]
fn hostile_dot_dot() {
    let pack = zstd_tar(&[
        good_manifest(),
        raw_entry(b"../memory.bin", EntryType::Regular, MEM),
    ]);
    refused(&pack, "'..'");
}

#[test]
fn hostile_subdirectory() {
    let pack = zstd_tar(&[
        good_manifest(),
        raw_entry(b"a/memory.bin", EntryType::Regular, MEM),
    ]);
    refused(&pack, "subdirectory");
}

#[test]
fn hostile_symlink() {
    let pack = zstd_tar(&[
        good_manifest(),
        raw_entry(b"memory.bin", EntryType::Symlink, b""),
    ]);
    refused(&pack, "symlink");
}

#[test]
fn hostile_hard_link() {
    let pack = zstd_tar(&[
        good_manifest(),
        raw_entry(b"memory.bin", EntryType::Link, b""),
    ]);
    refused(&pack, "hard link");
}

#[test]
fn hostile_device_file() {
    let pack = zstd_tar(&[
        good_manifest(),
        raw_entry(b"memory.bin", EntryType::Char, b""),
    ]);
    refused(&pack, "character device");
    let pack = zstd_tar(&[
        good_manifest(),
        raw_entry(b"memory.bin", EntryType::Block, b""),
    ]);
    refused(&pack, "block device");
}

#[test]
fn hostile_undeclared_entry() {
    let pack = zstd_tar(&[
        good_manifest(),
        raw_entry(b"memory.bin", EntryType::Regular, MEM),
        raw_entry(b"extra.bin", EntryType::Regular, b"surprise"),
    ]);
    refused(&pack, "not declared");
}

#[test]
fn hostile_duplicate_entry() {
    let pack = zstd_tar(&[
        good_manifest(),
        raw_entry(b"memory.bin", EntryType::Regular, MEM),
        raw_entry(b"memory.bin", EntryType::Regular, MEM),
    ]);
    refused(&pack, "twice");
    // A second manifest is a duplicate too (and undeclared).
    let pack = zstd_tar(&[good_manifest(), good_manifest()]);
    refused(&pack, "not declared");
}

#[test]
fn hostile_manifest_not_first() {
    let pack = zstd_tar(&[
        raw_entry(b"memory.bin", EntryType::Regular, MEM),
        good_manifest(),
    ]);
    refused(&pack, "manifest.toml must come first");
}

#[test]
fn hostile_file_larger_than_declared() {
    let bigger = b"memory contents, and then some more";
    let pack = zstd_tar(&[
        good_manifest(),
        raw_entry(b"memory.bin", EntryType::Regular, bigger),
    ]);
    refused(&pack, "larger than");
}

#[test]
fn hostile_decompression_bomb() {
    // 2 GiB of zeros after the archive decompress from a few hundred KiB: refused long
    // before they are all read.
    let mut tar = [
        good_manifest(),
        raw_entry(b"memory.bin", EntryType::Regular, MEM),
    ]
    .concat();
    tar.extend_from_slice(&[0u8; 1024]);
    let mut enc = zstd::Encoder::new(Vec::new(), 19).unwrap();
    std::io::Write::write_all(&mut enc, &tar).unwrap();
    let zeros = vec![0u8; 1 << 24];
    for _ in 0..128 {
        std::io::Write::write_all(&mut enc, &zeros).unwrap();
    }
    let pack = enc.finish().unwrap();
    assert!(pack.len() < 1 << 20);
    refused(&pack, "decompression bomb");
    // A manifest claiming to be huge is refused on its header.
    let huge = raw_entry_sized(b"manifest.toml", EntryType::Regular, b"", 1 << 40);
    refused(&zstd_tar(&[huge]), "limit");
}

#[test]
fn hostile_sha_mismatch() {
    let forged = b"memory CONTENTS";
    let pack = zstd_tar(&[
        good_manifest(),
        raw_entry(b"memory.bin", EntryType::Regular, forged),
    ]);
    refused(&pack, "sha256");
}

#[test]
fn hostile_missing_file_and_truncation() {
    let pack = zstd_tar(&[good_manifest()]);
    refused(&pack, "without the declared files");
    let full = zstd_tar(&[
        good_manifest(),
        raw_entry(b"memory.bin", EntryType::Regular, MEM),
    ]);
    refused(&full[..full.len() / 2], "test.pack");
}

#[test]
fn hostile_bad_tag_in_manifest() {
    let text = manifest_text("t", "acme/t", &[("memory.bin", MEM)])
        .replace("tag = \"t\"", "tag = \"../../etc\"");
    let pack = zstd_tar(&[
        raw_entry(b"manifest.toml", EntryType::Regular, text.as_bytes()),
        raw_entry(b"memory.bin", EntryType::Regular, MEM),
    ]);
    refused(&pack, "../../etc");
    let text = manifest_text("t", "acme/t", &[("memory.bin", MEM)])
        .replace("name = \"acme/t\"", "name = \"acme/../x\"");
    let pack = zstd_tar(&[
        raw_entry(b"manifest.toml", EntryType::Regular, text.as_bytes()),
        raw_entry(b"memory.bin", EntryType::Regular, MEM),
    ]);
    refused(&pack, "manifest name");
}

#[test]
fn hostile_manifest_declaring_itself() {
    let text = manifest_text(
        "t",
        "acme/t",
        &[("manifest.toml", b"x"), ("memory.bin", MEM)],
    );
    let pack = zstd_tar(&[
        raw_entry(b"manifest.toml", EntryType::Regular, text.as_bytes()),
        raw_entry(b"manifest.toml", EntryType::Regular, b"x"),
        raw_entry(b"memory.bin", EntryType::Regular, MEM),
    ]);
    refused(&pack, "lists manifest.toml");
}

#[test]
fn hostile_not_a_pack() {
    refused(b"this is not zstd at all", "test.pack");
    refused(
        &zstd::encode_all(&b"not a tar"[..], 3).unwrap(),
        "test.pack",
    );
}

#[test]
fn full_disk_leaves_nothing() {
    // A tiny tmpfs as the store: the unpack hits ENOSPC part way through memory.bin.
    let root = tempfile::tempdir().unwrap();
    let mnt = root.path().join("tiny");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
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
    let src_dir = tempfile::tempdir().unwrap();
    let src = Store::open(src_dir.path()).unwrap();
    make_snapshot(&src, "big", 64 * MIB, 8 * MIB, 5);
    let pack = pack_of(&src, "big");
    let store = Store::open(&mnt).unwrap();
    let err = unpack_bytes(&store, &pack, &UnpackOptions::default()).unwrap_err();
    assert!(matches!(err, HubError::Io { .. }), "{err}");
    let err = forkd_store::error_chain(&err);
    assert!(err.contains("No space left"), "{err}");
    assert_store_empty(&store);
}

/// A diff snapshot `tag` over `parent` in `store` (synthetic files; packs do not parse them).
fn make_link(store: &Store, tag: &str, parent: &str) {
    let parent = store.get(&Tag::parse(parent).unwrap()).unwrap();
    let staging = store.begin(&Tag::parse(tag).unwrap()).unwrap();
    std::fs::write(staging.path().join("vmstate.json"), b"{\"link\":1}").unwrap();
    std::fs::write(staging.path().join("memory.bin"), vec![3u8; 4096]).unwrap();
    staging
        .commit(forkd_store::SnapshotMeta {
            memory_mib: 16,
            vcpus: 1,
            parent_tag: Some(parent.manifest.tag.clone()),
            parent_sha256: parent.manifest_sha256().unwrap(),
            ..Default::default()
        })
        .unwrap();
}

#[test]
fn chain_packs_name_their_parent_and_install_only_over_that_parent() {
    let src_dir = tempfile::tempdir().unwrap();
    let src = Store::open(src_dir.path()).unwrap();
    make_snapshot(&src, "root", 16 * MIB, MIB, 5);
    make_link(&src, "leaf", "root");
    let leaf = src.get(&Tag::parse("leaf").unwrap()).unwrap();

    // A diff snapshot is packed only with the pack of its parent named, pinned.
    let mut out = Vec::new();
    let err = write_pack(&leaf, &PackOptions::new("acme/leaf", "v1"), &mut out).unwrap_err();
    assert!(
        err.to_string().contains("--parent NS/NAME@VERSION"),
        "{err}"
    );
    let err = forkd_hub::pack::parent_pack(&src, &leaf, "acme/root").unwrap_err();
    assert!(err.to_string().contains("version"), "{err}");
    let root = src.get(&Tag::parse("root").unwrap()).unwrap();
    let err = forkd_hub::pack::parent_pack(&src, &root, "acme/root@v1").unwrap_err();
    assert!(err.to_string().contains("self-contained"), "{err}");
    let mut opts = PackOptions::new("acme/leaf", "v1");
    opts.parent = Some(forkd_hub::pack::parent_pack(&src, &leaf, "acme/root@v1").unwrap());
    let mut link_pack = Vec::new();
    write_pack(&leaf, &opts, &mut link_pack).unwrap();

    // Without its parent: refused before any file is written, naming the parent pack.
    let dst_dir = tempfile::tempdir().unwrap();
    let dst = Store::open(dst_dir.path()).unwrap();
    let err = unpack_bytes(&dst, &link_pack, &UnpackOptions::default()).unwrap_err();
    assert!(
        matches!(&err, HubError::MissingParent { package, .. } if package == "acme/root@v1"),
        "{err}"
    );
    assert!(err.to_string().contains("pull acme/root@v1 first"), "{err}");
    assert_store_empty(&dst);

    // Over a different snapshot under the parent's tag: refused.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Store::open(other_dir.path()).unwrap();
    make_snapshot(&other, "root", 16 * MIB, MIB, 6);
    let err = unpack_bytes(&other, &link_pack, &UnpackOptions::default()).unwrap_err();
    assert!(err.to_string().contains("is a different one"), "{err}");

    // Over its parent (installed from its own pack, so its manifest differs): installed,
    // linked to the local parent.
    unpack_bytes(&dst, &pack_of(&src, "root"), &UnpackOptions::default()).unwrap();
    let UnpackOutcome::Installed(link) =
        unpack_bytes(&dst, &link_pack, &UnpackOptions::default()).unwrap()
    else {
        panic!("expected an install")
    };
    let local_root = dst.get(&Tag::parse("root").unwrap()).unwrap();
    assert_ne!(
        local_root.manifest_sha256().unwrap(),
        root.manifest_sha256().unwrap()
    );
    assert_eq!(link.manifest.parent_tag, "root");
    assert_eq!(
        link.manifest.parent_sha256,
        local_root.manifest_sha256().unwrap()
    );
    assert_eq!(link.manifest.parent_package, "acme/root@v1");
    assert!(dst.verify(link.tag()).unwrap().is_empty());
    // The link carries only its own pages: far smaller than its parent's pack.
    assert!(link_pack.len() * 4 < pack_of(&src, "root").len());
}
