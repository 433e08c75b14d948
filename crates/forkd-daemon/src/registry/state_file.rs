//! The registry's state file, `<state>/sandboxes.json`: its form, and the writer that keeps
//! it up to date (atomically, and off the request path where that is safe).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::SandboxRecord;

/// The registry's file form (paths included, unlike the API's).
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct StateFile {
    pub sandboxes: Vec<StoredSandbox>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StoredSandbox {
    #[serde(flatten)]
    pub record: SandboxRecord,
    vsock_uds: PathBuf,
    serial_log: PathBuf,
    #[serde(default)]
    zygote_tag: String,
    #[serde(default)]
    paused_tags: Vec<String>,
}

impl StoredSandbox {
    pub fn of(r: &SandboxRecord) -> StoredSandbox {
        StoredSandbox {
            record: r.clone(),
            vsock_uds: r.vsock_uds.clone(),
            serial_log: r.serial_log.clone(),
            zygote_tag: r.zygote_tag.clone(),
            paused_tags: r.paused_tags.clone(),
        }
    }

    pub fn into_record(self) -> SandboxRecord {
        let mut record = self.record;
        record.vsock_uds = self.vsock_uds;
        record.serial_log = self.serial_log;
        record.zygote_tag = if self.zygote_tag.is_empty() {
            record.tag.clone()
        } else {
            self.zygote_tag
        };
        record.paused_tags = self.paused_tags;
        record
    }
}

/// Whether a write of the state file must reach the disk before it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Durability {
    /// In the page cache: survives the daemon's death, not the host's.
    Cached,
    /// fsync'd, file and directory.
    Synced,
}

/// Replaces `path` with `bytes` atomically: readers see the old or the new file, whole.
fn write_replacing(path: &Path, bytes: &[u8], durability: Durability) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    if durability == Durability::Synced {
        tmp.as_file().sync_all()?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    if durability == Durability::Synced {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Writes the state file: at once (`write_now`), or soon, from a thread of its own
/// (`write_soon`), so that a create does not wait for the disk. Writes are serialized, so an
/// older state is never renamed over a newer one; dropping the writer writes what is pending.
pub(super) struct StateWriter {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    path: PathBuf,
    records: Arc<Mutex<BTreeMap<String, SandboxRecord>>>,
    writing: Mutex<()>,
    pending: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    dirty: bool,
    closed: bool,
}

impl StateWriter {
    pub fn new(path: PathBuf, records: Arc<Mutex<BTreeMap<String, SandboxRecord>>>) -> Self {
        let shared = Arc::new(Shared {
            path,
            records,
            writing: Mutex::new(()),
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
        });
        let background = shared.clone();
        let thread = std::thread::Builder::new()
            .name("registry-writer".into())
            .spawn(move || background.write_when_asked())
            .ok();
        StateWriter { shared, thread }
    }

    pub fn read(path: &Path) -> StateFile {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn write_now(&self, durability: Durability) -> std::io::Result<()> {
        self.shared.write(durability)
    }

    /// Asks the background thread to write the current state (without fsync); a write it is
    /// doing already is followed by one more.
    pub fn write_soon(&self) {
        if self.thread.is_none() {
            if let Err(e) = self.shared.write(Durability::Cached) {
                tracing::warn!("writing {}: {e}", self.shared.path.display());
            }
            return;
        }
        lock(&self.shared.pending).dirty = true;
        self.shared.wake.notify_one();
    }
}

impl Drop for StateWriter {
    fn drop(&mut self) {
        lock(&self.shared.pending).closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn write(&self, durability: Durability) -> std::io::Result<()> {
        let _one_at_a_time = lock(&self.writing);
        let state = StateFile {
            sandboxes: lock(&self.records)
                .values()
                .map(StoredSandbox::of)
                .collect(),
        };
        let bytes = serde_json::to_vec_pretty(&state).expect("records serialize");
        write_replacing(&self.path, &bytes, durability)
    }

    fn write_when_asked(&self) {
        loop {
            let mut pending = lock(&self.pending);
            while !pending.dirty && !pending.closed {
                pending = self.wake.wait(pending).unwrap_or_else(|e| e.into_inner());
            }
            let (dirty, closed) = (pending.dirty, pending.closed);
            pending.dirty = false;
            drop(pending);
            if dirty {
                if let Err(e) = self.write(Durability::Cached) {
                    tracing::warn!("writing {}: {e}", self.path.display());
                }
            }
            if closed {
                return;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
