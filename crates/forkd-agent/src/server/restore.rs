//! The `restored` hook: what a freshly forked child must do before it serves anything.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use super::{OpError, State};
use crate::protocol::{ClockOutcome, EntropyMethod, ErrorCode, RestoredRequest, RestoredResult};

/// `_IOW('R', 0x03, int[2])` from <linux/random.h>; not exported by the libc crate.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)` from <linux/random.h>: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

pub(super) fn handle(
    state: &State,
    req: &RestoredRequest,
    entropy: &[u8],
) -> Result<RestoredResult, OpError> {
    // Validate everything before changing anything, so a bad request leaves no trace.
    if req.realtime_nsec >= 1_000_000_000 {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            format!(
                "restored: realtime_nsec {} is not below 1000000000",
                req.realtime_nsec
            ),
        ));
    }
    if req.realtime_sec.is_some_and(|s| s < 0) {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            format!(
                "restored: realtime_sec {} is before the epoch",
                req.realtime_sec.unwrap_or_default()
            ),
        ));
    }
    let resolvers = req.resolvers.as_deref().map(parse_resolvers).transpose()?;
    let (entropy_method, mut entropy_note) = mix_entropy(entropy);
    // Every sibling's CRNG key is the parent's until the kernel reseeds; its timed reseed can
    // be up to a minute away, so force it now that the pool holds this child's bytes.
    let crng_reseeded = entropy_method != EntropyMethod::None
        && match reseed_crng() {
            Ok(()) => true,
            Err(e) => {
                let why = format!("RNDRESEEDCRNG failed: {e}");
                entropy_note = Some(match entropy_note {
                    Some(note) => format!("{note}; {why}"),
                    None => why,
                });
                false
            }
        };
    let (clock, clock_note) = match req.realtime_sec {
        None => (ClockOutcome::NotRequested, None),
        Some(_) if !state.set_clock => (
            ClockOutcome::Skipped,
            Some("the agent runs with --skip-clock-set".to_string()),
        ),
        Some(sec) => set_clock(sec, req.realtime_nsec),
    };
    let (resolvers_written, resolvers_note) = match (&resolvers, &state.resolv_conf) {
        (None, _) => (false, None),
        (Some(_), None) => (
            false,
            Some("the agent has no resolv.conf to write (it runs on a host)".to_string()),
        ),
        (Some(list), Some(path)) => match write_resolv_conf(path, list) {
            Ok(()) => (true, None),
            Err(e) => (false, Some(format!("writing {}: {e}", path.display()))),
        },
    };
    let fork_count = state.fork_count.fetch_add(1, Ordering::SeqCst) + 1;
    state.reseed_pending.store(true, Ordering::SeqCst);
    tracing::info!(
        "restored: fork {fork_count}, entropy {entropy_method:?} ({} bytes), crng reseeded \
         {crng_reseeded}, clock {clock:?}",
        entropy.len()
    );
    Ok(RestoredResult {
        fork_count,
        entropy_bytes: entropy.len() as u64,
        entropy_method,
        entropy_note,
        crng_reseeded,
        clock,
        clock_note,
        resolvers_written,
        resolvers_note,
    })
}

/// The resolvers of a `restored` request: unicast IP addresses.
fn parse_resolvers(list: &[String]) -> Result<Vec<IpAddr>, OpError> {
    list.iter()
        .map(|text| match text.parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() && !ip.is_multicast() => Ok(ip),
            _ => Err(OpError::new(
                ErrorCode::BadRequest,
                format!("restored: resolver {text:?} is not a unicast IP address"),
            )),
        })
        .collect()
}

/// Replaces `path` with one `nameserver` line per resolver, atomically: a resolver library
/// reading it meanwhile sees the old file or the new one, never half of it. (A symlink at
/// `path`, as systemd-resolved leaves, is replaced by the file.)
fn write_resolv_conf(path: &Path, resolvers: &[IpAddr]) -> io::Result<()> {
    let mut text =
        String::from("# written by forkd-agent on restore: the resolvers this child may reach\n");
    for ip in resolvers {
        text.push_str(&format!("nameserver {ip}\n"));
    }
    let mut temp = path.as_os_str().to_owned();
    temp.push(".forkd-new");
    let temp = std::path::PathBuf::from(temp);
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&temp)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .and_then(|()| std::fs::rename(&temp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

/// Mixes `bytes` into the kernel pool: credited via RNDADDENTROPY when permitted (needs
/// CAP_SYS_ADMIN), otherwise written to /dev/urandom, which mixes without crediting.
fn mix_entropy(bytes: &[u8]) -> (EntropyMethod, Option<String>) {
    if bytes.is_empty() {
        return (
            EntropyMethod::None,
            Some("the host sent no entropy".to_string()),
        );
    }
    let ioctl_error = match add_entropy_ioctl(bytes) {
        Ok(()) => return (EntropyMethod::Ioctl, None),
        Err(e) => format!("RNDADDENTROPY failed: {e}"),
    };
    match OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .and_then(|mut f| f.write_all(bytes))
    {
        Ok(()) => (EntropyMethod::Write, Some(ioctl_error)),
        Err(e) => (
            EntropyMethod::None,
            Some(format!("{ioctl_error}; writing /dev/urandom failed: {e}")),
        ),
    }
}

fn add_entropy_ioctl(bytes: &[u8]) -> io::Result<()> {
    let len = i32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too much entropy"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&len.saturating_mul(8).to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(bytes);
    let urandom = OpenOptions::new().write(true).open("/dev/urandom")?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info header (two ints) and then `buf_size`
    // bytes of `buf` through the pointer, during the call only. `info` is a live buffer of
    // exactly 8 + len bytes laid out that way with buf_size = len, so every byte read is
    // inside it; the kernel copies it in with copy_from_user, so alignment does not matter.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn reseed_crng() -> io::Result<()> {
    let urandom = OpenOptions::new().read(true).open("/dev/urandom")?;
    // SAFETY: RNDRESEEDCRNG takes no argument and touches no memory of ours.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_clock(sec: i64, nsec: u32) -> (ClockOutcome, Option<String>) {
    // `as _`: the field's type is time_t, which libc deprecates naming on musl (its width
    // changes there), while the value is the same on every target we build for.
    let ts = libc::timespec {
        tv_sec: sec as _,
        tv_nsec: nsec as libc::c_long,
    };
    // SAFETY: clock_settime(2) only reads the timespec through the pointer during the call,
    // and `ts` is a live, initialised local one.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } == 0 {
        return (ClockOutcome::Set, None);
    }
    let err = io::Error::last_os_error();
    let outcome = if err.raw_os_error() == Some(libc::EPERM) {
        ClockOutcome::NotPermitted
    } else {
        ClockOutcome::Failed
    };
    (outcome, Some(format!("clock_settime failed: {err}")))
}
