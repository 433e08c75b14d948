//! The pull cache under `<data dir>/cache/packs/`: interrupted downloads kept for resuming
//! (`<sha256>.partial`) and the lock that lets one pull at a time download a pack
//! (`<key>.lock`, holding the owner's pid).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use forkd_store::{Snapshot, Store, Tag};

use crate::error::{HubError, Result};
use crate::fetch::Notifier;

const PARTIAL_SUFFIX: &str = ".partial";
const LOCK_SUFFIX: &str = ".lock";
const INSTALLED_SUFFIX: &str = ".installed";

pub fn packs_dir(store: &Store) -> PathBuf {
    store.cache_dir().join("packs")
}

/// Resume cache for a pack with a known sha256.
pub fn partial_path(store: &Store, sha256: &str) -> PathBuf {
    packs_dir(store).join(format!("{sha256}{PARTIAL_SUFFIX}"))
}

/// Remembers that the pack `sha256` was installed as `snap`, so pulling it again (a second
/// pull that waited for this one, or a re-run) finds it without a byte of download.
pub fn record_install(store: &Store, sha256: &str, snap: &Snapshot) -> Result<()> {
    let path = packs_dir(store).join(format!("{sha256}{INSTALLED_SUFFIX}"));
    let text = format!("{}\n{}\n", snap.tag(), snap.manifest_sha256()?);
    std::fs::write(&path, text).map_err(|e| HubError::io(&path, e))?;
    store.give(&path)?;
    Ok(())
}

/// The snapshot the pack `sha256` was installed as, if it is still exactly that snapshot
/// (same tag, same manifest: nothing replaced or removed it since).
pub fn installed_from(store: &Store, sha256: &str) -> Option<Snapshot> {
    let path = packs_dir(store).join(format!("{sha256}{INSTALLED_SUFFIX}"));
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    let tag = Tag::parse(lines.next()?).ok()?;
    let manifest_sha = lines.next()?;
    let snap = store.get(&tag).ok()?;
    (snap.manifest_sha256().ok()? == manifest_sha).then_some(snap)
}

/// Held while one pull downloads and installs one pack; released (and its file removed) on
/// drop. A second pull of the same pack waits for it, then finds the snapshot installed.
#[derive(Debug)]
pub struct PullLock {
    file: File,
    path: PathBuf,
}

impl PullLock {
    /// Takes the lock for `key` (the pack's sha256, or a hash of its URL), waiting for another
    /// pull that holds it and saying so through `notify`.
    pub fn acquire(store: &Store, key: &str, what: &str, notify: &Notifier) -> Result<PullLock> {
        let dir = packs_dir(store);
        std::fs::create_dir_all(&dir).map_err(|e| HubError::io(&dir, e))?;
        store.give_dir(&dir)?;
        let path = dir.join(format!("{key}{LOCK_SUFFIX}"));
        let mut told = false;
        loop {
            let file = open_lock_file(&path)?;
            if file.try_lock().is_err() {
                if !told {
                    notify.say(&waiting_message(&path, what));
                    told = true;
                }
                file.lock().map_err(|e| HubError::io(&path, e))?;
            }
            // The previous holder removes the file as it lets go: a lock on a file that is no
            // longer at `path` guards nothing, so open the new one and lock again.
            if still_at(&file, &path) {
                let mut lock = PullLock { file, path };
                lock.record_owner();
                return Ok(lock);
            }
        }
    }

    fn record_owner(&mut self) {
        let _ = self.file.set_len(0);
        let _ = write!(self.file, "{}", std::process::id());
    }
}

impl Drop for PullLock {
    fn drop(&mut self) {
        // Removed while still held, so no one can lock the old inode after this and believe
        // they own the pack (they re-check `still_at`).
        let _ = std::fs::remove_file(&self.path);
    }
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| HubError::io(path, e))
}

fn still_at(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn waiting_message(path: &Path, what: &str) -> String {
    let mut pid = String::new();
    let _ = File::open(path).and_then(|mut f| f.read_to_string(&mut pid));
    match pid.trim() {
        "" => format!("waiting for another pull of {what} to finish"),
        pid => format!("waiting for another pull of {what} (process {pid}) to finish"),
    }
}

/// An interrupted download in the cache.
#[derive(Debug, Clone)]
pub struct PartialDownload {
    pub path: PathBuf,
    pub bytes: u64,
    pub modified: Option<SystemTime>,
    /// A pull holds its lock right now (it is not garbage).
    pub in_use: bool,
}

/// The interrupted downloads in the cache, oldest first.
pub fn partial_downloads(store: &Store) -> Vec<PartialDownload> {
    let dir = packs_dir(store);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found: Vec<PartialDownload> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let key = name.strip_suffix(PARTIAL_SUFFIX)?;
            let meta = e.metadata().ok()?;
            Some(PartialDownload {
                in_use: is_locked(&dir.join(format!("{key}{LOCK_SUFFIX}"))),
                path: e.path(),
                bytes: meta.len(),
                modified: meta.modified().ok(),
            })
        })
        .collect();
    found.sort_by_key(|p| p.modified);
    found
}

/// Files nothing needs any more: lock files whose pull is gone (a killed pull leaves its file;
/// the lock itself died with it), and install records whose snapshot was removed or replaced.
pub fn stale_files(store: &Store) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(packs_dir(store)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            if name.ends_with(LOCK_SUFFIX) {
                return !is_locked(p);
            }
            match name.strip_suffix(INSTALLED_SUFFIX) {
                Some(sha) => installed_from(store, sha).is_none(),
                None => false,
            }
        })
        .collect()
}

fn is_locked(path: &Path) -> bool {
    match File::open(path) {
        Ok(f) => match f.try_lock_shared() {
            Ok(()) => false,
            Err(std::fs::TryLockError::WouldBlock) => true,
            Err(_) => false,
        },
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("data")).unwrap();
        (dir, store)
    }

    #[test]
    fn a_second_holder_waits_says_so_and_gets_the_lock_after_the_first_lets_go() {
        let (_d, store) = store();
        let first = PullLock::acquire(&store, "k", "acme/x", &Notifier::default()).unwrap();
        let said = Arc::new(Mutex::new(Vec::<String>::new()));
        let said2 = said.clone();
        let notify = Notifier::new(move |m| said2.lock().unwrap().push(m.to_string()));
        let store2 = store.clone();
        let waiter = std::thread::spawn(move || {
            let _second = PullLock::acquire(&store2, "k", "acme/x", &notify).unwrap();
        });
        while said.lock().unwrap().is_empty() {
            std::thread::yield_now();
        }
        assert!(!waiter.is_finished(), "the second holder must wait");
        let pid = std::process::id().to_string();
        assert!(said.lock().unwrap()[0].contains(&pid), "{:?}", said);
        drop(first);
        waiter.join().unwrap();
        assert!(!packs_dir(&store).join("k.lock").exists());
    }

    #[test]
    fn partial_downloads_are_listed_with_whether_a_pull_uses_them() {
        let (_d, store) = store();
        std::fs::create_dir_all(packs_dir(&store)).unwrap();
        std::fs::write(partial_path(&store, "aa"), b"12345").unwrap();
        std::fs::write(partial_path(&store, "bb"), b"1").unwrap();
        let _held = PullLock::acquire(&store, "bb", "b", &Notifier::default()).unwrap();
        let found = partial_downloads(&store);
        assert_eq!(found.len(), 2);
        let aa = found
            .iter()
            .find(|p| p.path.ends_with("aa.partial"))
            .unwrap();
        let bb = found
            .iter()
            .find(|p| p.path.ends_with("bb.partial"))
            .unwrap();
        assert_eq!((aa.bytes, aa.in_use), (5, false));
        assert!(bb.in_use);
        assert!(stale_files(&store).is_empty());
    }
}
