//! Boot → wait until the guest says it is ready → snapshot → stop (`forkd snapshot`, and the
//! demo snapshot `forkd demo` caches).
//!
//! Readiness is one mechanism for every guest: the host listens on `<vsock_uds>_1025` and the
//! guest connects to host port 1025 and writes `READY <name>\n` (the demo guest and the Linux
//! forkd-agent both do).

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkd_store::{Store, StoreError, Tag};

use super::machine::{BootError, Machine};
use super::save::{AfterSnapshot, SnapshotError, SnapshotMode, SnapshotReport};
use crate::devices::legacy::{SerialOutput, SharedBuffer};
use crate::devices::virtio::{BlockConfig, VirtioConfig, VsockConfig};
use crate::guests::VSOCK_READY_PORT;
use crate::VmConfig;

/// What to boot for a snapshot.
#[derive(Debug, Clone)]
pub struct BootSnapshot {
    pub vm: VmConfig,
    /// Disk image the guest boots with (never written; the snapshot gets the disk as the
    /// guest saw it).
    pub rootfs: Option<PathBuf>,
    pub ready_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BootSnapshotError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("rootfs {}: {msg}", path.display())]
    Rootfs { path: PathBuf, msg: String },
    #[error("the scratch directory and socket the guest reports ready on")]
    Scratch(#[source] std::io::Error),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("the guest did not report ready within {secs} s (it must connect to vsock host port {VSOCK_READY_PORT} and write `READY <name>`){}{hint}", tail(serial))]
    ReadyTimeout {
        secs: u64,
        serial: String,
        /// Why it may never be ready on this host (empty when nothing is known).
        hint: String,
    },
    #[error("the guest stopped before it was ready: {reason}{}", tail(serial))]
    GuestStopped { reason: String, serial: String },
    #[error("the guest's ready message is {line:?}, expected `READY <name>`")]
    BadReady { line: String },
    /// The work done in the ready guest before the pause (e.g. `--warmup`) failed; its error
    /// follows as the source.
    #[error(
        "the work in the ready guest before the snapshot failed{}",
        tail(serial)
    )]
    BeforePause {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
        serial: String,
    },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// Work done in the ready guest just before it is paused, given the guest's hybrid-vsock
/// socket path (e.g. warm-up commands through its agent; forkd-vmm itself knows no agent).
/// An error stops the guest and publishes nothing (a `String` converts with `.into()`).
pub type BeforePause<'a> = Box<dyn FnOnce(&Path) -> Result<(), BeforePauseError> + 'a>;

/// Whatever the pre-snapshot work failed with (forkd-vmm knows nothing of its kinds).
pub type BeforePauseError = Box<dyn std::error::Error + Send + Sync>;

/// The last serial line, for error messages.
fn tail(serial: &str) -> String {
    match serial.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(l) => format!(" (last serial output: {:?})", l.trim()),
        None => String::new(),
    }
}

/// Boots `what`, waits for the guest's READY, snapshots it into `tag` (full) and stops it.
/// Nothing is published on any error.
pub fn snapshot_after_ready(
    store: &Store,
    tag: &Tag,
    what: &BootSnapshot,
) -> Result<SnapshotReport, BootSnapshotError> {
    snapshot_after_ready_with(store, tag, what, None)
}

/// [`snapshot_after_ready`] running `before_pause` in the ready guest before the snapshot.
pub fn snapshot_after_ready_with(
    store: &Store,
    tag: &Tag,
    what: &BootSnapshot,
    before_pause: Option<BeforePause<'_>>,
) -> Result<SnapshotReport, BootSnapshotError> {
    snapshot_after_ready_net(store, tag, what, before_pause, None)
}

/// The parent's network for [`snapshot_after_ready_net`].
#[derive(Debug, Clone)]
pub struct BootNet {
    /// Its device, on a tap opened in the calling thread's network namespace; the snapshot
    /// records the tap's name and the MAC for children.
    pub device: crate::devices::virtio::NetConfig,
    /// The policy its children get (recorded in the manifest).
    pub policy: Option<forkd_store::NetRecord>,
}

/// [`snapshot_after_ready_with`] with a network device (see [`BootNet`]).
pub fn snapshot_after_ready_net(
    store: &Store,
    tag: &Tag,
    what: &BootSnapshot,
    before_pause: Option<BeforePause<'_>>,
    net: Option<BootNet>,
) -> Result<SnapshotReport, BootSnapshotError> {
    if store.exists(tag) {
        return Err(StoreError::AlreadyExists(tag.clone()).into());
    }
    if let Some(path) = &what.rootfs {
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(BootSnapshotError::Rootfs {
                    path: path.clone(),
                    msg: "not a regular file".into(),
                })
            }
            Err(e) => {
                return Err(BootSnapshotError::Rootfs {
                    path: path.clone(),
                    msg: e.to_string(),
                })
            }
        }
    }
    let scratch = tempfile::Builder::new()
        .prefix("forkd-snap-")
        .tempdir()
        .map_err(BootSnapshotError::Scratch)?;
    let uds = scratch.path().join("vsock.sock");
    let listener = UnixListener::bind(format!("{}_{VSOCK_READY_PORT}", uds.display()))
        .map_err(BootSnapshotError::Scratch)?;
    listener
        .set_nonblocking(true)
        .map_err(BootSnapshotError::Scratch)?;
    let serial = SharedBuffer::new();
    let mut vm = what.vm.clone();
    if matches!(vm.serial, SerialOutput::Sink) {
        vm.serial = SerialOutput::Buffer(serial.clone());
    }
    let virtio = VirtioConfig {
        block: what.rootfs.as_ref().map(|base| BlockConfig {
            base: base.clone(),
            overlay: scratch.path().join("rootfs.overlay"),
            read_only: false,
            id: "forkd-rootfs".into(),
        }),
        vsock: Some(VsockConfig::new(uds.clone())),
        rng: true,
        net: net.as_ref().map(|n| n.device.clone()),
    };
    let mut machine = Machine::boot(&vm, &virtio)?;
    machine.set_net_policy(net.and_then(|n| n.policy));
    let ready = wait_ready(&listener, &machine, what.ready_timeout, &serial);
    let result = ready.and_then(|name| {
        if let Some(work) = before_pause {
            tracing::info!(guest = %name, "guest ready; running the pre-snapshot work");
            work(&uds).map_err(|source| BootSnapshotError::BeforePause {
                source,
                serial: serial.text(),
            })?;
        }
        // Every restored child resumes from this instant: let the guest finish what the
        // announcement (and any pre-snapshot work) set off, so children start idle instead of
        // each redoing it.
        std::thread::sleep(SETTLE_BEFORE_PAUSE);
        tracing::info!(guest = %name, "guest ready; snapshotting");
        Ok(machine.snapshot(store, tag, SnapshotMode::Full, AfterSnapshot::StayPaused)?)
    });
    machine.stop();
    result
}

/// Reads until the guest closes the connection (it does right after READY), at most
/// [`READY_CLOSE_TIMEOUT`]; a guest that keeps it open is not an error.
fn wait_closed(conn: &mut std::os::unix::net::UnixStream) {
    let deadline = Instant::now() + READY_CLOSE_TIMEOUT;
    let mut sink = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return;
        }
        if !matches!(conn.read(&mut sink), Ok(n) if n > 0) {
            return;
        }
    }
}

/// On a PVM host a kernel that is not PVM-aware crawls through the instruction emulator and
/// never gets far: say so rather than leave the user guessing.
fn ready_timeout_hint(machine: &Machine) -> String {
    let builtin = machine.info.kernel.starts_with("builtin:");
    if !builtin && crate::host::KvmFlavour::detect() == crate::host::KvmFlavour::Pvm {
        format!("; this host's KVM is PVM: {}", crate::host::PVM_EXPLANATION)
    } else {
        String::new()
    }
}

/// How long the guest gets, after it is ready, to go idle before the pause.
const SETTLE_BEFORE_PAUSE: Duration = Duration::from_millis(50);

/// How long to wait for the guest to close its READY connection.
const READY_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Waits for one `READY <name>` connection and for the guest to close it; returns the name.
fn wait_ready(
    listener: &UnixListener,
    machine: &Machine,
    timeout: Duration,
    serial: &SharedBuffer,
) -> Result<String, BootSnapshotError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(reason) = machine.vmm.stop_reason() {
            return Err(BootSnapshotError::GuestStopped {
                reason: reason.to_string(),
                serial: serial.text(),
            });
        }
        match listener.accept() {
            Ok((mut conn, _)) => {
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(100)),
                ));
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while line.len() < 256 && conn.read(&mut byte).unwrap_or(0) == 1 {
                    if byte[0] == b'\n' {
                        break;
                    }
                    line.push(byte[0]);
                }
                let line = String::from_utf8_lossy(&line).into_owned();
                wait_closed(&mut conn);
                return match line.strip_prefix("READY ") {
                    Some(name) if !name.trim().is_empty() => Ok(name.trim().to_string()),
                    _ => Err(BootSnapshotError::BadReady { line }),
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(BootSnapshotError::Scratch(e)),
        }
        if Instant::now() >= deadline {
            return Err(BootSnapshotError::ReadyTimeout {
                secs: timeout.as_secs(),
                serial: serial.text(),
                hint: ready_timeout_hint(machine),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
