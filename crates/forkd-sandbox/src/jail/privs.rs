//! Privileges: no_new_privs, capabilities (bounding, ambient, inheritable, permitted,
//! effective) and the switch to an unprivileged user.
//!
//! Capabilities and no_new_privs belong to each thread. The process-wide part runs in the
//! pool child while it is still single-threaded (every thread made later inherits it); what
//! remains, the permitted and effective sets, each thread clears for itself when it confines
//! itself (a uid switch clears them in every thread at once, which covers a child started as
//! root).

use std::io;

/// Capabilities as the capset/capget v3 interface carries them: bit n of the 64-bit set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;

fn check(rc: libc::c_long) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The calling thread's capability sets.
pub fn thread_caps() -> io::Result<CapSets> {
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget(2) reads the header and writes two CapData structs (the v3 layout,
    // repr(C) here) through pointers to locals that live across the call.
    check(unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) })?;
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok(CapSets {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

/// Sets the calling thread's capability sets (only ever to fewer than it has).
pub fn set_thread_caps(caps: CapSets) -> io::Result<()> {
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let split = |v: u64| (v as u32, (v >> 32) as u32);
    let (e0, e1) = split(caps.effective);
    let (p0, p1) = split(caps.permitted);
    let (i0, i1) = split(caps.inheritable);
    let data = [
        CapData {
            effective: e0,
            permitted: p0,
            inheritable: i0,
        },
        CapData {
            effective: e1,
            permitted: p1,
            inheritable: i1,
        },
    ];
    // SAFETY: capset(2) reads the header and two CapData structs from locals that live
    // across the call; it writes nothing of ours.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) })
}

/// Drops every capability of the calling thread.
pub fn clear_thread_caps() -> io::Result<()> {
    set_thread_caps(CapSets::default())
}

/// Sets no_new_privs on the calling thread (inherited by threads it creates later): nothing
/// it or they execute can gain privileges.
pub fn no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into())
}

/// Whether the calling thread has no_new_privs.
pub fn has_no_new_privs() -> bool {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1 }
}

/// The highest capability number this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Empties the calling thread's bounding set (threads made later inherit it) and its ambient
/// set. Needs CAP_SETPCAP; without it (not root) the bounding set only matters at execve,
/// which the filters refuse anyway.
pub fn drop_bounding_and_ambient() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check(rc.into())?;
    for cap in 0..=last_cap() {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            // EINVAL: a capability this kernel does not have.
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Whether the calling thread's bounding set is empty.
pub fn bounding_set_is_empty() -> bool {
    (0..=last_cap()).all(|cap| {
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) != 1 }
    })
}

/// The user a jailed child runs as when started as root: `forkd` when that user exists,
/// else `fallback`. Looked up in the parent (the child's view has no /etc/passwd).
pub fn resolve_user(fallback: (u32, u32)) -> (u32, u32) {
    let name = c"forkd";
    let mut pwd: libc::passwd = unsafe_zeroed_passwd();
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r reads the NUL-terminated name and writes the entry into `pwd` and
    // strings into `buf` (its length given), setting `result` to `&pwd` or null; all are
    // locals that outlive the call.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc == 0 && !result.is_null() {
        (pwd.pw_uid, pwd.pw_gid)
    } else {
        fallback
    }
}

fn unsafe_zeroed_passwd() -> libc::passwd {
    // SAFETY: passwd is a C struct of integers and pointers, for which all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// Becomes `uid`/`gid` with no supplementary groups, in every thread of the process (the C
/// library applies set*id calls to all threads), which also empties every thread's
/// permitted and effective capabilities: no uid is 0 any more.
pub fn switch_user(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: setgroups reads zero entries (null list); setresgid/setresuid take integers.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(gid, gid, gid) != 0
            || libc::setresuid(uid, uid, uid) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// [`switch_user`] for the calling thread only (the raw system calls: Linux keeps credentials
/// per thread). A jailed child's threads each switch themselves as they confine themselves,
/// which costs a few microseconds where the C library's switch of every thread at once
/// signals each of them and waits for it to be scheduled (a millisecond and more when many
/// children start together on few cores).
pub fn switch_thread_user(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: raw setgroups reads zero entries (null list); setresgid/setresuid take integers.
    unsafe {
        check(libc::syscall(
            libc::SYS_setgroups,
            0,
            std::ptr::null::<libc::gid_t>(),
        ))?;
        check(libc::syscall(libc::SYS_setresgid, gid, gid, gid))?;
        check(libc::syscall(libc::SYS_setresuid, uid, uid, uid))?;
    }
    Ok(())
}

/// No core dumps: a dump of a VMM process is the guest's memory.
pub fn no_core_dumps() -> io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one rlimit struct from a local.
    check(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) }.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_read_and_the_fallback_user_is_used_without_forkd() {
        let caps = thread_caps().unwrap();
        assert_eq!(caps.effective & !caps.permitted, 0);
        let (uid, gid) = resolve_user((65534, 65534));
        assert!(uid > 0 && gid > 0);
    }
}
