//! The `forkd` binary's store and doctor commands: output and exit codes, bad input included.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

use forkd_store::{SnapshotMeta, Store, Tag};

fn forkd(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(args)
        .env("FORKD_HOME", home)
        .env_remove("RUST_LOG")
        .output()
        .expect("run forkd")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn snapshot(home: &Path, tag: &str, parent: Option<&str>) {
    let store = Store::open(home).unwrap();
    let staging = store.begin(&Tag::parse(tag).unwrap()).unwrap();
    let mem = File::create(staging.path().join("memory.bin")).unwrap();
    mem.set_len(64 << 20).unwrap();
    mem.write_all_at(b"guest page", 1 << 20).unwrap();
    std::fs::write(
        staging.path().join("vmstate.json"),
        format!("{{\"tag\":\"{tag}\"}}"),
    )
    .unwrap();
    let meta = SnapshotMeta {
        memory_mib: 64,
        vcpus: 1,
        description: format!("test {tag}"),
        kernel: "builtin:demo".into(),
        parent_tag: parent.map(|p| Tag::parse(p).unwrap()),
        parent_sha256: parent.map(|_| "ab".repeat(32)).unwrap_or_default(),
        ..Default::default()
    };
    staging.commit(meta).unwrap();
}

#[test]
fn help_lists_every_subcommand_and_version_prints() {
    let home = tempfile::tempdir().unwrap();
    let out = forkd(home.path(), &["--help"]);
    assert!(out.status.success());
    let text = stdout(&out);
    for cmd in ["where", "images", "inspect", "verify", "rmi", "doctor"] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(cmd)),
            "{cmd} missing from:\n{text}"
        );
    }
    let out = forkd(home.path(), &["--version"]);
    assert_eq!(
        stdout(&out).trim(),
        format!("forkd {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn where_follows_forkd_home_then_xdg() {
    let home = tempfile::tempdir().unwrap();
    let out = forkd(home.path(), &["where"]);
    assert_eq!(stdout(&out).trim(), home.path().display().to_string());
    let json: serde_json::Value =
        serde_json::from_slice(&forkd(home.path(), &["where", "--json"]).stdout).unwrap();
    assert_eq!(json["data_dir"], home.path().display().to_string());
    let out = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .arg("where")
        .env_remove("FORKD_HOME")
        .env("XDG_DATA_HOME", "/xdg/data")
        .output()
        .unwrap();
    assert_eq!(stdout(&out).trim(), "/xdg/data/forkd");
}

#[test]
fn images_lists_snapshots_as_table_and_json() {
    let home = tempfile::tempdir().unwrap();
    let out = forkd(home.path(), &["images"]);
    assert!(out.status.success());
    assert_eq!(
        stdout(&out).lines().count(),
        1,
        "only the header when empty"
    );
    snapshot(home.path(), "base", None);
    snapshot(home.path(), "child", Some("base"));
    let text = stdout(&forkd(home.path(), &["images"]));
    let child = text.lines().find(|l| l.starts_with("child")).expect(&text);
    // Its PARENT column names base; its PACKAGE column is empty (made here, not pulled).
    let columns: Vec<&str> = child.split_whitespace().collect();
    assert!(
        child.contains("64 MiB") && columns.ends_with(&["base", "-"]),
        "{child}"
    );
    let rows: serde_json::Value =
        serde_json::from_slice(&forkd(home.path(), &["images", "--json"]).stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["tag"], "base");
    assert_eq!(rows[0]["memory_mib"], 64);
    assert!(rows[0]["logical_bytes"].as_u64().unwrap() > 64 << 20);
    assert!(
        rows[0]["disk_bytes"].as_u64().unwrap() < 1 << 20,
        "sparse memory.bin must stay sparse"
    );
    assert_eq!(rows[1]["parent_tag"], "base");
}

#[test]
fn inspect_shows_manifest_chain_and_dependents() {
    let home = tempfile::tempdir().unwrap();
    snapshot(home.path(), "root", None);
    snapshot(home.path(), "mid", Some("root"));
    snapshot(home.path(), "leaf", Some("mid"));
    let out = forkd(home.path(), &["inspect", "mid"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("depth:          1"), "{text}");
    assert!(
        text.contains(&format!(
            "parent:         root (manifest sha256:{})",
            "ab".repeat(32)
        )),
        "{text}"
    );
    assert!(text.contains("dependents:     leaf"), "{text}");
    assert!(text.contains("memory.bin"), "{text}");
    let json: serde_json::Value =
        serde_json::from_slice(&forkd(home.path(), &["inspect", "leaf", "--json"]).stdout).unwrap();
    assert_eq!(json["depth"], 2);
    assert_eq!(json["ancestors"], serde_json::json!(["mid", "root"]));
    assert_eq!(json["files"].as_array().unwrap().len(), 2);
}

#[test]
fn unknown_and_invalid_tags_are_one_line_errors() {
    let home = tempfile::tempdir().unwrap();
    for cmd in ["inspect", "verify", "rmi"] {
        let out = forkd(home.path(), &[cmd, "nope"]);
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("no snapshot tagged \"nope\""), "{err}");
    }
    for bad in ["../etc", "/abs", "a/b", "", "caf\u{e9}", &"x".repeat(65)] {
        let out = forkd(home.path(), &["inspect", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(
            stderr(&out).lines().next().unwrap().contains("invalid tag"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(
        std::fs::read_dir(home.path().join("snapshots"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn verify_passes_then_names_the_file_with_a_flipped_byte() {
    let home = tempfile::tempdir().unwrap();
    snapshot(home.path(), "v", None);
    let out = forkd(home.path(), &["verify", "v"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("v: ok (2 files"));
    let mem = home.path().join("snapshots/v/memory.bin");
    File::options()
        .write(true)
        .open(&mem)
        .unwrap()
        .write_all_at(b"G", 1 << 20)
        .unwrap();
    let out = forkd(home.path(), &["verify", "v"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("memory.bin: sha256") && !err.contains("vmstate.json"),
        "{err}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&forkd(home.path(), &["verify", "v", "--json"]).stdout).unwrap();
    assert_eq!(json["ok"], false);
}

#[test]
fn rmi_refuses_dependents_unless_forced_or_cascaded() {
    let home = tempfile::tempdir().unwrap();
    snapshot(home.path(), "root", None);
    snapshot(home.path(), "leaf", Some("root"));
    let out = forkd(home.path(), &["rmi", "root"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("\"leaf\""), "{}", stderr(&out));
    assert!(home.path().join("snapshots/root").exists());

    let out = forkd(home.path(), &["rmi", "--cascade", "root"]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "removed leaf\nremoved root\n");

    snapshot(home.path(), "root", None);
    snapshot(home.path(), "leaf", Some("root"));
    let out = forkd(home.path(), &["rmi", "--force", "root"]);
    assert!(out.status.success());
    assert!(
        !home.path().join("snapshots/root").exists() && home.path().join("snapshots/leaf").exists()
    );
    let out = forkd(home.path(), &["rmi", "--force", "--cascade", "leaf"]);
    assert_eq!(out.status.code(), Some(2), "--force and --cascade conflict");
}

#[test]
fn newer_manifest_format_is_refused_naming_both_versions() {
    let home = tempfile::tempdir().unwrap();
    snapshot(home.path(), "future", None);
    let path = home.path().join("snapshots/future/manifest.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("format_version = 1", "format_version = 3");
    std::fs::write(&path, text).unwrap();
    let out = forkd(home.path(), &["inspect", "future"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("format_version 3") && err.contains("supports (1)"),
        "{err}"
    );
    // images still lists the others and warns about this one.
    snapshot(home.path(), "ok", None);
    let out = forkd(home.path(), &["images"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("ok"));
    assert!(stderr(&out).contains("future"));
}

#[test]
fn doctor_reports_kvm_flavour_and_exits_zero_here() {
    let home = tempfile::tempdir().unwrap();
    let out = forkd(home.path(), &["doctor"]);
    let text = stdout(&out);
    if !Path::new("/dev/kvm").exists() {
        assert_eq!(out.status.code(), Some(1));
        assert!(text.contains("FAIL  kvm-device"), "{text}");
        return;
    }
    assert!(out.status.success(), "{text}");
    for line in text.lines() {
        assert!(
            ["PASS", "WARN", "FAIL"].iter().any(|s| line.starts_with(s)),
            "{line}"
        );
    }
    for cap in [
        "irqchip",
        "pit2",
        "irqfd",
        "ioeventfd",
        "xsave",
        "immediate-exit",
    ] {
        assert!(text.contains(&format!("kvm-cap {cap}")), "{cap}");
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        let line = text.lines().find(|l| l.contains("kvm-flavour")).unwrap();
        assert!(
            line.starts_with("WARN")
                && line.contains("PVM")
                && line.contains("stock Linux kernel cannot boot")
                && line.contains("Linux lab (next line)"),
            "{line}"
        );
        // The next line names the lab as the way to run Linux guests here; the test runs
        // inside the checkout, so forkd finds the script.
        let lines: Vec<&str> = text.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.contains("kvm-flavour"))
            .unwrap();
        let lab = lines[at + 1];
        assert!(lab.starts_with("PASS  linux-lab"), "{lab}");
        assert!(
            lab.contains(
                "`scripts/lab.sh -- CMD` runs CMD inside a QEMU-TCG VM with emulated AMD-V \
                 whose /dev/kvm boots stock Linux guests"
            ),
            "{lab}"
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/lab.sh");
        let script = script.canonicalize().unwrap();
        assert!(lab.contains(&format!("({})", script.display())), "{lab}");
    } else {
        assert!(!text.contains("linux-lab"), "{text}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&forkd(home.path(), &["doctor", "--json"]).stdout).unwrap();
    assert_eq!(json["ok"], true);
    assert!(json["checks"].as_array().unwrap().len() > 15);
}

#[test]
fn doctor_fails_on_an_unusable_data_dir() {
    let out = forkd(Path::new("/proc/forkd-cannot-exist"), &["doctor"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let line = text.lines().find(|l| l.contains("data-dir")).unwrap();
    assert!(
        line.starts_with("FAIL") && line.contains("/proc/forkd-cannot-exist"),
        "{line}"
    );
}

#[test]
fn unusable_data_dir_is_a_clear_error_for_store_commands() {
    let out = forkd(Path::new("/proc/forkd-cannot-exist"), &["images"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1);
    assert!(
        err.contains("cannot open the data directory /proc/forkd-cannot-exist"),
        "{err}"
    );
}

#[test]
fn a_reader_that_goes_away_ends_forkd_quietly() {
    let home = tempfile::tempdir().unwrap();
    snapshot(home.path(), "a", None);
    // The read end is closed before forkd starts, so its first write meets a closed pipe.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(["images"])
        .env("FORKD_HOME", home.path())
        .env_remove("RUST_LOG")
        .stdout(writer)
        .output()
        .expect("run forkd");
    assert_eq!(out.status.code(), Some(141), "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}
