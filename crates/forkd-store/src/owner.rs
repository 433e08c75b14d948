//! `sudo forkd …` works on the invoking user's data directory, so `forkd pull` followed by
//! `sudo forkd fork` finds the pulled snapshot; what root writes there is handed back to that
//! user, so their own later runs can read, replace and remove it.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A user and group that files written into a store should belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// The user behind `sudo`: set when this process runs as root with `SUDO_UID`/`SUDO_GID` naming
/// someone else.
pub fn sudo_invoker() -> Option<Owner> {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    invoker_from(euid, &|k| std::env::var_os(k))
}

fn invoker_from(euid: u32, env: &dyn Fn(&str) -> Option<OsString>) -> Option<Owner> {
    if euid != 0 {
        return None;
    }
    let number = |k: &str| env(k)?.to_str()?.parse::<u32>().ok();
    let owner = Owner {
        uid: number("SUDO_UID")?,
        gid: number("SUDO_GID")?,
    };
    (owner.uid != 0).then_some(owner)
}

/// A user's home directory from the password database.
pub fn home_of(uid: u32) -> Option<PathBuf> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is plain old data; getpwuid_r writes into it and into `buf` (whose length
    // it is given) and sets `result` to it on success, or to null.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() || pwd.pw_dir.is_null() {
            return None;
        }
        let dir = std::ffi::CStr::from_ptr(pwd.pw_dir);
        Some(PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes())))
    }
}

/// `FORKD_HOME`, else `$XDG_DATA_HOME/forkd`, else `<home>/.local/share/forkd`, where home is
/// the sudo invoker's (when there is one) or `$HOME`.
pub(crate) fn data_root(
    env: &dyn Fn(&str) -> Option<OsString>,
    invoker_home: Option<PathBuf>,
) -> PathBuf {
    let non_empty = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(home) = non_empty("FORKD_HOME") {
        return home;
    }
    // Under sudo, XDG_DATA_HOME survives only when the user kept their environment (sudo -E),
    // and then it is theirs.
    if let Some(xdg) = non_empty("XDG_DATA_HOME") {
        return xdg.join("forkd");
    }
    let home = invoker_home
        .or_else(|| non_empty("HOME"))
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".local/share/forkd")
}

/// The owner a store at `root` hands its new files to: the sudo invoker, when `root` lies in
/// their home (a store elsewhere, e.g. a system-wide one, stays root's).
pub(crate) fn owner_for(root: &Path) -> Option<Owner> {
    let owner = sudo_invoker()?;
    let home = home_of(owner.uid)?;
    root.starts_with(&home).then_some(owner)
}

/// `create_dir_all`, handing each directory it creates to `owner`.
pub fn create_dir_all_owned(path: &Path, owner: Owner) -> std::io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        create_dir_all_owned(parent, owner)?;
    }
    match std::fs::create_dir(path) {
        Ok(()) => std::os::unix::fs::lchown(path, Some(owner.uid), Some(owner.gid)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Hands `path` (and everything under it) to `owner`. Symlinks themselves, never their targets.
pub fn give(path: &Path, owner: Owner) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(owner.uid), Some(owner.gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            give(&entry?.path(), owner)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn the_invoker_is_the_sudo_user_only_for_root_and_never_root_itself() {
        let sudo = env_of(&[("SUDO_UID", "1000"), ("SUDO_GID", "1001")]);
        assert_eq!(
            invoker_from(0, &sudo),
            Some(Owner {
                uid: 1000,
                gid: 1001
            })
        );
        assert_eq!(invoker_from(1000, &sudo), None, "not running as root");
        let root = env_of(&[("SUDO_UID", "0"), ("SUDO_GID", "0")]);
        assert_eq!(invoker_from(0, &root), None, "root sudoing to root");
        assert_eq!(invoker_from(0, &env_of(&[])), None, "no sudo");
        let bad = env_of(&[("SUDO_UID", "x"), ("SUDO_GID", "1")]);
        assert_eq!(invoker_from(0, &bad), None);
    }

    #[test]
    fn under_sudo_the_data_directory_is_in_the_invokers_home() {
        let env = env_of(&[("HOME", "/root")]);
        assert_eq!(
            data_root(&env, Some("/home/ada".into())),
            Path::new("/home/ada/.local/share/forkd")
        );
        assert_eq!(data_root(&env, None), Path::new("/root/.local/share/forkd"));
        let explicit = env_of(&[("HOME", "/root"), ("FORKD_HOME", "/srv/forkd")]);
        assert_eq!(
            data_root(&explicit, Some("/home/ada".into())),
            Path::new("/srv/forkd")
        );
        let kept = env_of(&[("XDG_DATA_HOME", "/home/ada/.data")]);
        assert_eq!(
            data_root(&kept, Some("/home/ada".into())),
            Path::new("/home/ada/.data/forkd")
        );
    }

    #[test]
    fn home_of_reads_the_password_database() {
        assert_eq!(home_of(0).as_deref(), Some(Path::new("/root")));
    }

    #[test]
    fn give_hands_a_tree_to_its_owner() {
        // SAFETY: geteuid(2) takes no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: give_hands_a_tree_to_its_owner needs root to chown");
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("snap");
        std::fs::create_dir_all(tree.join("sub")).unwrap();
        std::fs::write(tree.join("sub/file"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", tree.join("link")).unwrap();
        let nobody = Owner {
            uid: 65534,
            gid: 65534,
        };
        give(&tree, nobody).unwrap();
        for p in [tree.clone(), tree.join("sub"), tree.join("sub/file")] {
            let m = std::fs::metadata(&p).unwrap();
            assert_eq!((m.uid(), m.gid()), (65534, 65534), "{}", p.display());
        }
        let link = std::fs::symlink_metadata(tree.join("link")).unwrap();
        assert_eq!(link.uid(), 65534);
        assert_eq!(std::fs::metadata("/etc/passwd").unwrap().uid(), 0);
    }
}
