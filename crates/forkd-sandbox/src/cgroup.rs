//! cgroup v2 leaves for sandboxes: memory, CPU and pids limits on a sandbox's VMM process.
//!
//! forkd uses the unified hierarchy only, and only where the host delegates the controllers
//! it needs. A process in the root cgroup (a lab, a container's init) gets `<mount>/forkd/` as
//! the parent of its leaves. A process in a delegated subtree (systemd's `Delegate=yes`) moves
//! itself into `<own>/daemon` first, because cgroup v2 lets a cgroup hand controllers to its
//! children only while it holds no processes itself; leaves then go in `<own>/sandboxes/`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The controllers a limit needs.
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// What one sandbox may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// memory.max: the VMM process's own memory (the guest's private pages, the VMM's heap).
    pub memory_mib: Option<u64>,
    /// cpu.max as a number of CPUs (0.5 = half of one).
    pub cpus: Option<f64>,
    /// pids.max: tasks of the VMM process (its vCPU, device and control threads count).
    pub pids: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.memory_mib.is_none() && self.cpus.is_none() && self.pids.is_none()
    }

    /// The interface files and what to write to them.
    fn files(&self) -> Vec<(&'static str, String)> {
        let mut files = Vec::new();
        if let Some(mib) = self.memory_mib {
            files.push(("memory.max", (mib << 20).to_string()));
        }
        if let Some(cpus) = self.cpus {
            let quota = (cpus * CPU_PERIOD_US as f64).round() as u64;
            files.push(("cpu.max", format!("{quota} {CPU_PERIOD_US}")));
        }
        if let Some(pids) = self.pids {
            files.push(("pids.max", pids.to_string()));
        }
        files
    }
}

/// cpu.max's period: 100 ms, the kernel's default.
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("this host has no cgroup v2 hierarchy (no cgroup2 mount)")]
    NoUnified,
    #[error("this host's cgroup v2 hierarchy at {} does not offer the {missing} controller (it offers: {offered})", mount.display())]
    MissingController {
        mount: PathBuf,
        missing: &'static str,
        offered: String,
    },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where sandbox leaves are made, with memory, cpu and pids enabled for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupParent {
    pub dir: PathBuf,
}

impl CgroupParent {
    /// Finds (and prepares) the parent of sandbox leaves for this process, or says exactly
    /// why the host cannot have one.
    pub fn prepare() -> Result<CgroupParent, CgroupError> {
        let (mount, own_dir) = own_dir().ok_or(CgroupError::NoUnified)?;
        let controllers_file = own_dir.join("cgroup.controllers");
        let offered = fs::read_to_string(&controllers_file).map_err(io_err(&controllers_file))?;
        for wanted in CONTROLLERS {
            if !offered.split_whitespace().any(|c| c == wanted) {
                return Err(CgroupError::MissingController {
                    mount,
                    missing: wanted,
                    offered: offered.trim().replace(' ', ", "),
                });
            }
        }
        let parent = if own_dir == mount {
            enable_controllers(&mount)?;
            mount.join("forkd")
        } else {
            // Leave room to delegate: this process (and what it starts) moves to a leaf.
            let daemon = own_dir.join("daemon");
            make_dir(&daemon)?;
            let procs = daemon.join("cgroup.procs");
            fs::write(&procs, std::process::id().to_string()).map_err(io_err(&procs))?;
            enable_controllers(&own_dir)?;
            own_dir.join("sandboxes")
        };
        make_dir(&parent)?;
        enable_controllers(&parent)?;
        Ok(CgroupParent { dir: parent })
    }

    /// The parent [`CgroupParent::prepare`] made before (by this process or an earlier
    /// daemon), if there is one; nothing is changed.
    pub fn existing() -> Option<CgroupParent> {
        let (mount, own_dir) = own_dir()?;
        let dir = if own_dir == mount {
            mount.join("forkd")
        } else {
            own_dir.join("sandboxes")
        };
        dir.is_dir().then_some(CgroupParent { dir })
    }

    /// Leaves of this parent (sandbox ids).
    pub fn leaves(&self) -> Vec<String> {
        fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// The leaf of sandbox `id`.
    pub fn leaf(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Makes the leaf of `id` with `limits` set (a leaf left from before is reused).
    pub fn create_leaf(&self, id: &str, limits: &Limits) -> Result<PathBuf, CgroupError> {
        let leaf = self.leaf(id);
        make_dir(&leaf)?;
        for (file, value) in limits.files() {
            let path = leaf.join(file);
            if let Err(e) = fs::write(&path, &value).map_err(io_err(&path)) {
                let _ = fs::remove_dir(&leaf);
                return Err(e);
            }
        }
        Ok(leaf)
    }
}

/// A leaf per child of one `forkd fork` / `forkd run` (or bench round), named
/// `fork-<forkd's pid>-<child index>` under the same parent as the daemon's sandboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildLeaves {
    parent: CgroupParent,
    prefix: String,
}

impl ChildLeaves {
    /// Leaves for this process's children, or why this host gives it none. Leaves a crashed
    /// forkd left behind (their forkd is gone and they are empty) are removed first.
    pub fn for_this_process() -> Result<ChildLeaves, CgroupError> {
        let parent = CgroupParent::prepare()?;
        for name in parent.leaves() {
            let owner = name
                .strip_prefix("fork-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            if let Some(pid) = owner {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = fs::remove_dir(parent.leaf(&name));
                }
            }
        }
        Ok(ChildLeaves {
            prefix: format!("fork-{}", std::process::id()),
            parent,
        })
    }

    /// The leaf of child `index`.
    pub fn leaf(&self, index: usize) -> PathBuf {
        self.parent.leaf(&format!("{}-{index}", self.prefix))
    }

    /// Makes child `index`'s leaf and moves process `pid` into it.
    pub fn enter(&self, index: usize, pid: i32) -> Result<PathBuf, CgroupError> {
        let leaf = self
            .parent
            .create_leaf(&format!("{}-{index}", self.prefix), &Limits::default())?;
        if let Err(e) = enter(&leaf, pid) {
            let _ = fs::remove_dir(&leaf);
            return Err(e);
        }
        Ok(leaf)
    }
}

/// Whether children can get a leaf on this host, and where, without changing anything (for
/// `forkd doctor`).
pub fn support() -> Result<PathBuf, String> {
    let (mount, own) = own_dir().ok_or_else(|| CgroupError::NoUnified.to_string())?;
    let controllers_file = own.join("cgroup.controllers");
    let offered = fs::read_to_string(&controllers_file)
        .map_err(|e| format!("{}: {e}", controllers_file.display()))?;
    if let Some(missing) = CONTROLLERS
        .iter()
        .find(|c| !offered.split_whitespace().any(|o| o == **c))
    {
        return Err(CgroupError::MissingController {
            mount,
            missing,
            offered: offered.trim().replace(' ', ", "),
        }
        .to_string());
    }
    let c =
        std::ffi::CString::new(own.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: access reads a NUL-terminated path that lives across the call.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
        return Err(format!(
            "{} is not writable by this user (no delegated cgroup)",
            own.display()
        ));
    }
    Ok(if own == mount {
        mount.join("forkd")
    } else {
        own.join("sandboxes")
    })
}

/// Moves process `pid` into the cgroup `leaf`.
pub fn enter(leaf: &Path, pid: i32) -> Result<(), CgroupError> {
    let procs = leaf.join("cgroup.procs");
    fs::write(&procs, pid.to_string()).map_err(io_err(&procs))
}

/// Removes a leaf once its processes are gone (missing already: nothing to do).
pub fn remove_leaf(leaf: &Path) -> Result<(), CgroupError> {
    match fs::remove_dir(leaf) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(leaf)(e)),
        _ => Ok(()),
    }
}

fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io_err(dir)(e)),
        _ => Ok(()),
    }
}

/// Hands memory, cpu and pids to `dir`'s children.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.subtree_control");
    let enable: Vec<String> = CONTROLLERS.iter().map(|c| format!("+{c}")).collect();
    fs::write(&path, enable.join(" ")).map_err(io_err(&path))
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
fn unified_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (mount, rest) = line.split_once(" - ")?;
        let fstype = rest.split_whitespace().next()?;
        let point = mount.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(point))
    })
}

/// The cgroup2 mount and the directory of the cgroup this process belongs to, taken as the
/// delegated one (its `daemon` leaf stands for its parent: this process moved there).
fn own_dir() -> Option<(PathBuf, PathBuf)> {
    let mount = unified_mount()?;
    let own = own_cgroup().unwrap_or_default();
    let own = own.strip_suffix("/daemon").unwrap_or(&own);
    let dir = mount.join(own.trim_start_matches('/'));
    Some((mount, dir))
}

/// This process's path in the unified hierarchy (`0::/path` in /proc/self/cgroup).
fn own_cgroup() -> Option<String> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_become_the_interface_files_values() {
        let limits = Limits {
            memory_mib: Some(512),
            cpus: Some(1.5),
            pids: Some(64),
        };
        assert_eq!(
            limits.files(),
            vec![
                ("memory.max", "536870912".to_string()),
                ("cpu.max", "150000 100000".to_string()),
                ("pids.max", "64".to_string()),
            ]
        );
        assert!(Limits::default().is_empty());
        assert!(Limits::default().files().is_empty());
    }
}
