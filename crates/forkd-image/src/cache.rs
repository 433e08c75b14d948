//! The cache directory and atomic publishing into it.
//!
//! Layout: `<root>/kernels/<release>_<debian-version>/`, `<root>/images/<recipe-hash>/`.
//! Entries are built in a staging directory next to their final place (same filesystem), synced,
//! and renamed into place: readers see either nothing or a complete entry.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// FORKD_CACHE if set, else $XDG_CACHE_HOME/forkd, else ~/.cache/forkd.
pub fn cache_root() -> PathBuf {
    let non_empty = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = non_empty("FORKD_CACHE") {
        return dir;
    }
    if let Some(xdg) = non_empty("XDG_CACHE_HOME") {
        return xdg.join("forkd");
    }
    let home = non_empty("HOME").unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/forkd")
}

const STAGING_PREFIX: &str = ".staging-";

/// A staging directory inside `parent` (created if needed); removed on drop unless published.
/// Its name carries our pid, so staging left by a process that was killed (no destructor ran)
/// is recognised and removed by the next build.
pub fn staging_dir(parent: &Path) -> Result<tempfile::TempDir> {
    std::fs::create_dir_all(parent).at(parent)?;
    remove_orphaned_staging(parent);
    tempfile::Builder::new()
        .prefix(&format!("{STAGING_PREFIX}{}-", std::process::id()))
        .tempdir_in(parent)
        .at(parent)
}

/// Removes `.staging-<pid>-*` directories whose process no longer exists.
fn remove_orphaned_staging(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(STAGING_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(path = %entry.path().display(), "removing staging left by a dead process");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether [`publish`] put the entry in place or found one already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    New,
    AlreadyPresent,
}

/// Syncs every file under `dir`, then renames `dir` to `dest`. If another process published
/// `dest` first, its entry wins and `dir` is left for the caller's staging cleanup.
pub fn publish(dir: &Path, dest: &Path) -> Result<Published> {
    sync_tree(dir)?;
    match std::fs::rename(dir, dest) {
        Ok(()) => {
            if let Some(parent) = dest.parent() {
                File::open(parent).and_then(|f| f.sync_all()).at(parent)?;
            }
            Ok(Published::New)
        }
        Err(e)
            if dest.exists()
                && matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) =>
        {
            Ok(Published::AlreadyPresent)
        }
        Err(e) => Err(crate::Error::io(dest, e)),
    }
}

/// Like [`publish`], but an existing `dest` (a stale entry from an older format) is swapped out
/// atomically (renameat2 RENAME_EXCHANGE: readers see the old or the new entry, never neither)
/// and then deleted. `dir` must be a staging directory, so the old entry, which ends up at its
/// path, is cleaned like any staging left behind if we die before deleting it.
pub fn replace(dir: &Path, dest: &Path) -> Result<()> {
    if !dest.exists() && publish(dir, dest)? == Published::New {
        return Ok(());
    }
    sync_tree(dir)?;
    forkd_store::rename_exchange(dir, dest).at(dest)?;
    std::fs::remove_dir_all(dir).at(dir)
}

fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let path = entry.path();
        let kind = entry.file_type().at(&path)?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else if kind.is_file() {
            File::open(&path).and_then(|f| f.sync_all()).at(&path)?;
        }
    }
    File::open(dir).and_then(|f| f.sync_all()).at(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_swaps_a_stale_entry_for_the_new_one() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("entry");
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::write(dest.join("f"), b"old").unwrap();
        let new = staging_dir(root.path()).unwrap();
        std::fs::write(new.path().join("f"), b"new").unwrap();
        replace(new.path(), &dest).unwrap();
        assert_eq!(std::fs::read(dest.join("f")).unwrap(), b"new");
        drop(new);
        let names: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["entry"]);
        // With no previous entry it is a plain publish.
        let fresh = staging_dir(root.path()).unwrap();
        std::fs::write(fresh.path().join("f"), b"first").unwrap();
        replace(fresh.path(), &root.path().join("other")).unwrap();
        assert_eq!(
            std::fs::read(root.path().join("other/f")).unwrap(),
            b"first"
        );
    }

    #[test]
    fn staging_of_dead_processes_is_removed_and_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        // pid_max is at most 2^22, so this pid cannot be running.
        let dead = root.path().join(".staging-99999999-abc");
        let live = root
            .path()
            .join(format!(".staging-{}-def", std::process::id()));
        let other = root.path().join("6.1.0-1_1");
        for d in [&dead, &live, &other] {
            std::fs::create_dir_all(d.join("sub")).unwrap();
        }
        let fresh = staging_dir(root.path()).unwrap();
        assert!(!dead.exists());
        assert!(live.exists() && other.exists() && fresh.path().exists());
    }

    #[test]
    fn publish_renames_once_and_reports_a_second_entry_as_present() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("entry");
        let first = staging_dir(root.path()).unwrap();
        std::fs::write(first.path().join("f"), b"one").unwrap();
        assert_eq!(publish(first.path(), &dest).unwrap(), Published::New);
        let second = staging_dir(root.path()).unwrap();
        std::fs::write(second.path().join("f"), b"two").unwrap();
        assert_eq!(
            publish(second.path(), &dest).unwrap(),
            Published::AlreadyPresent
        );
        assert_eq!(std::fs::read(dest.join("f")).unwrap(), b"one");
        drop(second);
        // Only the published entry remains: no staging leftovers.
        let names: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["entry"]);
    }
}
