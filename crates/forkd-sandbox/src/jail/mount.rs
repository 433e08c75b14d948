//! The child's own view of the filesystem: a private mount namespace whose root is a small
//! read-only tmpfs holding only what the child uses, bind-mounted at the paths the host gives
//! them (so the paths in its identity and in the store stay valid): /dev/kvm (and the tun
//! device), the snapshot's directory read-only, the run's directories (overlays, sockets,
//! serial logs) and, for a child that may BRANCH, the store (read-only when it runs as the
//! jail's user: it BRANCHes through an inbox in its run directory). Everything else of the host
//! (/etc, /root, /home, other snapshots' runs, /proc) does not exist for it.
//!
//! A mount namespace belongs to a thread until it shares it, so this runs in the pool child
//! while it is single-threaded, before its shell is prepared: a fork pays nothing for it.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What a child sees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Directories or files visible read-only (the snapshot's directory).
    pub read_only: Vec<PathBuf>,
    /// Directories the child writes in (its run's overlays, sockets, logs; the store when it
    /// may BRANCH and keeps forkd's user).
    pub writable: Vec<PathBuf>,
    /// Device nodes it opens (/dev/kvm; /dev/net/tun for a tap).
    pub devices: Vec<PathBuf>,
}

/// Why the view could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("mount namespace: {what}")]
pub struct MountError {
    what: String,
    #[source]
    source: io::Error,
}

fn fail(what: impl Into<String>) -> impl FnOnce(io::Error) -> MountError {
    let what = what.into();
    move |source| MountError { what, source }
}

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstr).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype
        .map(CString::new)
        .transpose()
        .map_err(io::Error::other)?;
    let data = data
        .map(CString::new)
        .transpose()
        .map_err(io::Error::other)?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: mount(2) reads NUL-terminated strings (or null) from CStrings that live across
    // the call; it writes nothing of ours.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Where the new root's tmpfs is mounted while it is built: an existing directory that holds
/// none of the paths bound into it (the mount would hide them).
fn staging_point(view: &View) -> Option<PathBuf> {
    let all: Vec<&PathBuf> = view
        .read_only
        .iter()
        .chain(&view.writable)
        .chain(&view.devices)
        .collect();
    [
        "/mnt",
        "/media",
        "/srv",
        "/opt",
        "/boot",
        "/var/empty",
        "/home",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_dir() && !all.iter().any(|a| a.starts_with(p)))
}

/// Moves the calling (single) thread's process into a private mount namespace whose root
/// holds only `view`. Paths in `view` that do not exist are left out.
pub fn enter(view: &View) -> Result<(), MountError> {
    let base = staging_point(view).ok_or_else(|| MountError {
        what: "no directory to build the new root on".into(),
        source: io::Error::from(io::ErrorKind::NotFound),
    })?;
    // SAFETY: unshare takes a flag word only.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(fail("unshare(CLONE_NEWNS)")(io::Error::last_os_error()));
    }
    // Nothing done here may reach the host's mounts.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .map_err(fail("making / private"))?;
    mount(
        Some(Path::new("tmpfs")),
        &base,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("size=64k,mode=0755"),
    )
    .map_err(fail(format!("tmpfs on {}", base.display())))?;
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mut binds: Vec<(&PathBuf, libc::c_ulong)> = Vec::new();
    binds.extend(view.writable.iter().map(|p| (p, nosuid_nodev)));
    binds.extend(
        view.read_only
            .iter()
            .map(|p| (p, nosuid_nodev | libc::MS_RDONLY)),
    );
    binds.extend(
        view.devices
            .iter()
            .map(|p| (p, libc::MS_NOSUID | libc::MS_NOEXEC)),
    );
    // Parents before children: a read-only snapshot directory inside a writable store.
    binds.sort_by_key(|(p, _)| p.components().count());
    for (source, flags) in binds {
        bind(source, &base, flags)?;
    }
    pivot(&base)
}

/// Bind-mounts `source` at the same path under `base`, then applies `flags`.
fn bind(source: &Path, base: &Path, flags: libc::c_ulong) -> Result<(), MountError> {
    let Ok(meta) = std::fs::metadata(source) else {
        return Ok(());
    };
    let target = base.join(source.strip_prefix("/").unwrap_or(source));
    let what = || format!("binding {}", source.display());
    if meta.is_dir() {
        std::fs::create_dir_all(&target).map_err(fail(what()))?;
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(fail(what()))?;
        }
        std::fs::File::create(&target).map_err(fail(what()))?;
    }
    mount(Some(source), &target, None, libc::MS_BIND, None).map_err(fail(what()))?;
    mount(
        None,
        &target,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | flags,
        None,
    )
    .map_err(fail(what()))
}

/// Makes `base` the root, detaches the old one and makes the new root read-only.
fn pivot(base: &Path) -> Result<(), MountError> {
    let old = base.join(".old-root");
    std::fs::create_dir(&old).map_err(fail("pivot_root"))?;
    let (new_c, old_c) = (
        cstr(base).map_err(fail("pivot_root"))?,
        cstr(&old).map_err(fail("pivot_root"))?,
    );
    // SAFETY: pivot_root(2) reads two NUL-terminated paths from live CStrings.
    if unsafe { libc::syscall(libc::SYS_pivot_root, new_c.as_ptr(), old_c.as_ptr()) } != 0 {
        return Err(fail("pivot_root")(io::Error::last_os_error()));
    }
    std::env::set_current_dir("/").map_err(fail("chdir /"))?;
    let old_root = cstr(Path::new("/.old-root")).map_err(fail("detaching the old root"))?;
    // SAFETY: umount2 reads a NUL-terminated path from a live CString.
    if unsafe { libc::umount2(old_root.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(fail("detaching the old root")(io::Error::last_os_error()));
    }
    std::fs::remove_dir("/.old-root").map_err(fail("removing the old root's mount point"))?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        None,
    )
    .map_err(fail("making the new root read-only"))
}
