//! Running `ip` and `nft` inside a network namespace, and entering one.
//!
//! A command that must act inside a namespace is spawned with a `setns` between fork and exec
//! (cheaper than `ip netns exec`, which also builds a mount namespace); its input is a batch
//! (`ip -batch -`, `nft -f -`) so one process does a namespace's whole setup.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use super::NetError;

/// Where `ip netns add` binds named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Opens the named namespace's handle.
pub fn open_netns(name: &str) -> Result<OwnedFd, NetError> {
    let err = |source| NetError::Netns {
        name: name.to_string(),
        source,
    };
    let path =
        CString::new(format!("{NETNS_DIR}/{name}")).map_err(|e| err(std::io::Error::other(e)))?;
    // SAFETY: a NUL-terminated path that outlives the call; open returns a new fd or -1.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by open and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Moves the calling thread into the named namespace: what it opens from here on (a tap,
/// sockets) and the threads it starts belong to that namespace.
pub fn enter_netns(name: &str) -> Result<(), NetError> {
    let fd = open_netns(name)?;
    // SAFETY: setns takes an fd we own and a flag; it changes only this thread's namespace.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(NetError::Netns {
            name: name.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Moves the calling thread into the namespace behind `fd` (a handle opened ahead of time:
/// a jailed child's private mount view has no /run/netns to open it by name).
pub fn enter_netns_fd(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: setns takes an fd and a flag; it changes only this thread's namespace, and an
    // fd that is not a namespace makes it fail with EINVAL.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `program args` (inside namespace `ns` when given) with `input` on its stdin; its
/// stderr becomes the error. Returns its stdout.
pub fn run(
    ns: Option<&str>,
    program: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, NetError> {
    let fd = ns.map(open_netns).transpose()?;
    run_with(
        fd.as_ref().map(AsRawFd::as_raw_fd),
        &describe(ns, program, args),
        program,
        args,
        input,
    )
}

/// [`run`] inside the namespace behind the handle `fd` (whatever its name is now, or without
/// one); `label` names it in errors.
pub fn run_in_fd(
    fd: RawFd,
    label: &str,
    program: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, NetError> {
    run_with(
        Some(fd),
        &describe(Some(label), program, args),
        program,
        args,
        input,
    )
}

fn run_with(
    fd: Option<RawFd>,
    what: &str,
    program: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, NetError> {
    let what = what.to_string();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(raw) = fd {
        // SAFETY: the closure runs in the forked child before exec and only calls setns, which
        // is async-signal-safe, on an fd inherited from the parent (open across the fork).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(raw, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let spawn_err = |source| NetError::Spawn {
        what: what.clone(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetError::Command {
            what,
            stderr: one_line(&String::from_utf8_lossy(&out.stderr)),
        })
    }
}

fn describe(ns: Option<&str>, program: &str, args: &[&str]) -> String {
    let inside = ns.map(|n| format!(" in {n}")).unwrap_or_default();
    format!("{program} {}{inside}", args.join(" "))
}

/// A tool's stderr as one line (batch tools print one line per problem).
fn one_line(s: &str) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if lines.is_empty() {
        "no message".into()
    } else {
        lines.join("; ")
    }
}

/// Gives the named namespace a new name: the namespace itself (its links, rules and every
/// handle to it) is untouched, only its bind mount under /run/netns moves. The new name is
/// mounted before the old one goes, so the namespace is never without a name.
pub fn rename_netns(old: &str, new: &str) -> Result<(), NetError> {
    let err = |source| NetError::Netns {
        name: format!("{old} (renaming it to {new})"),
        source,
    };
    let c = |p: String| CString::new(p).map_err(|e| err(std::io::Error::other(e)));
    let (from, to) = (
        c(format!("{NETNS_DIR}/{old}"))?,
        c(format!("{NETNS_DIR}/{new}"))?,
    );
    // SAFETY: NUL-terminated paths that outlive the calls; open, mount, umount2, unlink and
    // close take them and integers only.
    unsafe {
        let fd = libc::open(
            to.as_ptr(),
            libc::O_RDONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0,
        );
        if fd < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        libc::close(fd);
        if libc::mount(
            from.as_ptr(),
            to.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
        {
            let e = std::io::Error::last_os_error();
            libc::unlink(to.as_ptr());
            return Err(err(e));
        }
        if libc::umount2(from.as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        libc::unlink(from.as_ptr());
    }
    Ok(())
}

/// Whether `name` still names the namespace behind `fd` (a name can outlive its namespace's
/// removal by a sweep, and be taken by another namespace).
pub fn names_netns(name: &str, fd: RawFd) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(named) = std::fs::metadata(format!("{NETNS_DIR}/{name}")) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstat writes a stat into the buffer, which is large enough and ours.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstat succeeded, so the buffer is initialised.
    let st = unsafe { st.assume_init() };
    named.ino() == st.st_ino && named.dev() == st.st_dev
}

/// Sets an IPv4 sysctl (e.g. `ip_forward`) in namespace `ns` (None: this thread's). A thread
/// enters the namespace to write it: /proc/sys/net belongs to the writer's namespace.
pub fn ipv4_sysctl(ns: Option<&str>, key: &str, value: &str) -> Result<(), NetError> {
    let path = format!("/proc/sys/net/ipv4/{key}");
    let write = || -> Result<(), NetError> {
        if let Some(ns) = ns {
            enter_netns(ns)?;
        }
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current.trim() == value {
            return Ok(());
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(value.as_bytes()))
            .map_err(|source| NetError::Spawn {
                what: format!("writing {value} to {path}"),
                source,
            })
    };
    match ns {
        None => write(),
        Some(_) => std::thread::scope(|s| s.spawn(write).join())
            .unwrap_or_else(|_| Err(NetError::Missing(format!("setting {path} panicked")))),
    }
}

/// The calling thread inside a named namespace until dropped, then back where it was (for a
/// one-off like booting a snapshot's parent on its tap, on a thread that goes on afterwards).
pub struct NetnsGuard {
    original: OwnedFd,
}

impl NetnsGuard {
    pub fn enter(name: &str) -> Result<NetnsGuard, NetError> {
        let original = std::fs::File::open("/proc/thread-self/ns/net")
            .map_err(|source| NetError::Netns {
                name: "of this thread".into(),
                source,
            })?
            .into();
        enter_netns(name)?;
        Ok(NetnsGuard { original })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // SAFETY: setns takes an fd we own and a flag; it changes only this thread.
        if unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            tracing::error!(
                "returning to the original network namespace: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
