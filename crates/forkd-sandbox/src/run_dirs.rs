//! Where one run's per-child files live.
//!
//! Sockets and serial logs go to a memory filesystem when there is one: every child creates
//! two of them on its restore path, and on ext4 creating a file costs up to a millisecond once
//! many inodes were recently deleted (a bench that forks hundreds of children), on tmpfs a few
//! microseconds. Disk overlays stay under the data directory, because a child's disk writes
//! can grow large and must not eat host memory.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use forkd_store::Store;

use crate::pool::ChildIdentity;

/// The directories of one run (one `forkd fork`, `forkd run`, bench round).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDirs {
    /// Disk overlays.
    pub files: PathBuf,
    /// Vsock sockets and serial logs.
    pub runtime: PathBuf,
}

impl RunDirs {
    /// Overlays in `files`; sockets and logs in a directory of the same name under the user's
    /// runtime directory ([`runtime_root`]), or in `files` too when there is none.
    pub fn new(files: PathBuf) -> RunDirs {
        let runtime = match (runtime_root(), files.file_name()) {
            (Some(root), Some(name)) => root.join(name),
            _ => files.clone(),
        };
        RunDirs { files, runtime }
    }

    /// Everything in one directory.
    pub fn single(dir: PathBuf) -> RunDirs {
        RunDirs {
            files: dir.clone(),
            runtime: dir,
        }
    }

    pub fn create(&self) -> io::Result<()> {
        std::fs::create_dir_all(&self.files)?;
        std::fs::create_dir_all(&self.runtime)
    }

    /// Hands both directories (not what is in them) to `uid`/`gid`: the user a jailed
    /// child runs as creates its files there.
    pub fn give_to(&self, uid: u32, gid: u32) -> io::Result<()> {
        std::os::unix::fs::chown(&self.files, Some(uid), Some(gid))?;
        std::os::unix::fs::chown(&self.runtime, Some(uid), Some(gid))
    }

    /// Removes both directories and everything in them (missing ones are fine).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.files);
        if self.runtime != self.files {
            let _ = std::fs::remove_dir_all(&self.runtime);
        }
    }

    /// The paths that make child `index` of this run distinct from its siblings.
    pub fn identity(&self, index: usize) -> ChildIdentity {
        ChildIdentity {
            index,
            vsock_uds: self.runtime.join(format!("child-{index}.vsock")),
            disk_overlay: self.files.join(format!("child-{index}.overlay")),
            serial_log: self.runtime.join(format!("child-{index}.serial")),
            net_policy: None,
        }
    }
}

impl RunDirs {
    /// The directories of this process's run of `kind` ("fork", "run", "bench") in the store:
    /// overlays in `<data dir>/run/<kind>-<pid>`, sockets and logs under the runtime directory,
    /// after sweeping away the run directories of processes that died without cleaning up.
    pub fn for_this_process(store: &Store, kind: &str) -> RunDirs {
        let name = format!("{kind}-{}", std::process::id());
        let runs = store.root().join(RUN_DIR);
        // Shared by every run of this store, so it must belong to the store's owner (a root
        // run in a sudo user's store would otherwise lock the user's own runs out).
        if std::fs::create_dir_all(&runs).is_ok() {
            let _ = store.give_dir(&runs);
        }
        let dirs = RunDirs::new(runs.join(name));
        for parent in [dirs.files.parent(), dirs.runtime.parent()]
            .into_iter()
            .flatten()
        {
            sweep_dead(parent);
        }
        dirs
    }
}

/// The store's directory of runs' disk overlays.
pub const RUN_DIR: &str = "run";

/// A run's directories, removed when dropped (also on early returns and panics). Declare it
/// before the pool that uses it, so the children are stopped before their files go.
#[derive(Debug)]
pub struct RunDirGuard(RunDirs);

impl RunDirGuard {
    pub fn new(dirs: RunDirs) -> RunDirGuard {
        RunDirGuard(dirs)
    }

    pub fn dirs(&self) -> &RunDirs {
        &self.0
    }
}

impl Drop for RunDirGuard {
    fn drop(&mut self) {
        self.0.remove();
    }
}

impl From<PathBuf> for RunDirs {
    fn from(dir: PathBuf) -> RunDirs {
        RunDirs::single(dir)
    }
}

/// Removes the run directories in `parent` (named `<kind>-<pid>`) whose process is gone: a
/// run killed before it could clean up (SIGKILL, a crash, Ctrl-C at the wrong moment) leaves
/// nothing behind for long. Returns how many were removed.
pub fn sweep_dead(parent: &Path) -> usize {
    run_dirs_in(parent)
        .into_iter()
        .filter(|r| !r.owner_alive && std::fs::remove_dir_all(&r.path).is_ok())
        .count()
}

/// One run's directory (overlays under the data directory, or sockets and logs under the
/// runtime directory).
#[derive(Debug, Clone)]
pub struct RunDirEntry {
    pub path: PathBuf,
    pub owner: u32,
    pub owner_alive: bool,
}

/// Every run directory of `store`'s runs, live and dead, in both places runs keep files.
pub fn run_dirs(store: &Store) -> Vec<RunDirEntry> {
    let mut found = run_dirs_in(&store.root().join(RUN_DIR));
    if let Some(runtime) = runtime_root() {
        found.extend(run_dirs_in(&runtime));
    }
    found
}

fn run_dirs_in(parent: &Path) -> Vec<RunDirEntry> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|entry| {
            let name = entry.file_name();
            let (_, pid) = name.to_str()?.rsplit_once('-')?;
            let pid = pid.parse::<u32>().ok()?;
            Some(RunDirEntry {
                path: entry.path(),
                owner: pid,
                owner_alive: Path::new(&format!("/proc/{pid}")).exists(),
            })
        })
        .collect()
}

/// `$XDG_RUNTIME_DIR/forkd` (when that directory exists), else `/dev/shm/forkd-<uid>` when /dev/shm is a tmpfs (made
/// private to this user, and not used if someone else owns it); None otherwise.
pub fn runtime_root() -> Option<PathBuf> {
    // Only a runtime directory that exists: a stale variable (a session that ended) must not
    // make every fork fail.
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if dir.is_dir() {
            return Some(dir.join("forkd"));
        }
    }
    let shm = Path::new("/dev/shm");
    if !is_tmpfs(shm) {
        return None;
    }
    // SAFETY: getuid(2) takes no arguments, cannot fail and touches no memory of ours.
    let uid = unsafe { libc::getuid() };
    let root = shm.join(format!("forkd-{uid}"));
    let created = std::fs::DirBuilder::new().mode(0o700).create(&root);
    match created {
        Ok(()) => Some(root),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => std::fs::symlink_metadata(&root)
            .ok()
            .filter(|m| m.is_dir() && m.uid() == uid)
            .map(|_| root),
        Err(_) => None,
    }
}

fn is_tmpfs(path: &Path) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is a C struct of integers, for which all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs(2) reads a NUL-terminated path (`c_path`, a live CString) and writes one
    // struct statfs through the second pointer, an exclusive borrow of the local `st`.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == TMPFS_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_go_to_the_runtime_dir_and_overlays_stay_with_the_data() {
        let dirs = RunDirs {
            files: PathBuf::from("/data/run/fork-1"),
            runtime: PathBuf::from("/rt/fork-1"),
        };
        let id = dirs.identity(7);
        assert_eq!(id.vsock_uds, Path::new("/rt/fork-1/child-7.vsock"));
        assert_eq!(id.serial_log, Path::new("/rt/fork-1/child-7.serial"));
        assert_eq!(
            id.disk_overlay,
            Path::new("/data/run/fork-1/child-7.overlay")
        );
    }

    #[test]
    fn create_and_remove_handle_both_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = RunDirs {
            files: tmp.path().join("files/fork-9"),
            runtime: tmp.path().join("rt/fork-9"),
        };
        dirs.create().unwrap();
        std::fs::write(dirs.runtime.join("child-0.serial"), b"x").unwrap();
        assert!(dirs.files.is_dir() && dirs.runtime.is_dir());
        dirs.remove();
        assert!(!dirs.files.exists() && !dirs.runtime.exists());
        dirs.remove(); // already gone: fine
    }

    #[test]
    fn sweeping_removes_only_runs_whose_process_is_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let mine = tmp.path().join(format!("fork-{}", std::process::id()));
        // pid_max is at most 2^22, so this pid cannot exist.
        let dead = tmp.path().join("fork-4194305");
        let unrelated = tmp.path().join("notes");
        for d in [&mine, &dead, &unrelated] {
            std::fs::create_dir_all(d.join("x")).unwrap();
        }
        assert_eq!(sweep_dead(tmp.path()), 1);
        assert!(mine.exists() && unrelated.exists() && !dead.exists());
        assert_eq!(sweep_dead(&tmp.path().join("missing")), 0);
    }

    #[test]
    fn a_process_run_lives_in_the_store_and_sweeps_dead_runs_first() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let dead = home.path().join(RUN_DIR).join("fork-4194305");
        std::fs::create_dir_all(&dead).unwrap();
        let dirs = RunDirs::for_this_process(&store, "fork");
        let name = format!("fork-{}", std::process::id());
        assert_eq!(dirs.files, home.path().join(RUN_DIR).join(&name));
        assert_eq!(dirs.runtime.file_name().unwrap(), name.as_str());
        assert!(!dead.exists(), "the dead run was swept");
        let guard = RunDirGuard::new(dirs.clone());
        guard.dirs().create().unwrap();
        drop(guard);
        assert!(!dirs.files.exists() && !dirs.runtime.exists());
    }

    #[test]
    fn the_runtime_dir_keeps_the_run_name() {
        let dirs = RunDirs::new(PathBuf::from("/data/run/fork-42"));
        assert_eq!(dirs.runtime.file_name().unwrap(), "fork-42");
        match runtime_root() {
            Some(root) => assert_eq!(dirs.runtime, root.join("fork-42")),
            None => assert_eq!(dirs.runtime, dirs.files),
        }
    }
}
