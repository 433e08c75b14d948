//! A pool of child processes, each holding one prepared, identity-free VM shell until it is
//! told to become a particular child.
//!
//! Lifecycle of one child process (all driven over a socketpair of JSON lines):
//!   forked → `prepare` (e.g. KVM_CREATE_VM + vCPUs) → `ShellReady`
//!   ← `Go { identity }` → `start` (restore + resume) → `Started { start_us }`
//!   ← `Snapshot { request }` (any number, while running) → `Snapshotted { done }` or
//!   `SnapshotFailed { message }`; a request with `stop_after` then stops the child
//!   ← `Stop`, or the VM stops by itself → `Stopped { reason, clean, by_guest }` → process
//!   exits. `by_guest` says the VM stopped by itself (its guest powered off, reset, exited or
//!   died) before the parent asked it to stop.
//! The parent never touches a child's VM: a child that crashes is only a dead process.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::process::{self, ExitStatus};

/// What makes a child this child and not a sibling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildIdentity {
    pub index: usize,
    /// The child's own hybrid-vsock Unix socket.
    pub vsock_uds: PathBuf,
    /// The child's own copy-on-write disk overlay.
    pub disk_overlay: PathBuf,
    /// Where the child's serial console goes.
    pub serial_log: PathBuf,
    /// The egress policy the child runs with when it is not its snapshot's (a daemon
    /// sandbox's own), recorded in the snapshots it takes of itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_policy: Option<forkd_store::NetRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
enum ToChild {
    Go { identity: ChildIdentity },
    Snapshot { request: SnapshotRequest },
    Stop,
}

/// BRANCH (or pause) of a running child: save its state into a new snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// The new snapshot's tag (in the store the child was restored from).
    pub tag: String,
    /// Only the pages written since the child's origin (its snapshot, or its last branch).
    pub diff: bool,
    /// Stop the child once its state is saved (pause to disk) instead of letting it run on.
    pub stop_after: bool,
    /// Write the snapshot into a store of its own in this directory instead of the child's
    /// store, for the parent to adopt (a child that cannot write the store: see
    /// [`crate::inbox`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbox: Option<PathBuf>,
}

/// A snapshot a running child took of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDone {
    pub tag: String,
    /// The snapshot it is a diff against (none for a full snapshot).
    pub parent: Option<String>,
    /// How long the guest was stopped for it.
    pub paused_us: u64,
    /// The whole snapshot, including writing and publishing it.
    pub total_us: u64,
    pub pages_written: u64,
}

/// Why a running child could not snapshot itself.
pub type SnapshotFailure = Box<dyn std::error::Error + Send + Sync>;

/// What [`RunningChild::snapshotter`] hands the control thread.
pub type Snapshotter =
    Box<dyn FnMut(&SnapshotRequest) -> Result<SnapshotDone, SnapshotFailure> + Send>;

/// A child body that cannot snapshot itself says so.
#[derive(Debug, thiserror::Error)]
#[error("this child cannot be snapshotted")]
pub struct SnapshotUnsupported;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
enum FromChild {
    ShellReady {
        prepare_us: u64,
    },
    Started {
        start_us: u64,
    },
    /// `prepare` or `start` failed; `message` is the error's chain, rendered in the child.
    Failed {
        message: String,
    },
    Stopped {
        reason: String,
        clean: bool,
        /// The VM stopped by itself, not because the parent asked (absent from a child that
        /// predates the field: taken as asked).
        #[serde(default)]
        by_guest: bool,
    },
    Snapshotted {
        done: SnapshotDone,
    },
    SnapshotFailed {
        message: String,
    },
    /// A seccomp filter refused a system call; the child's SIGSYS handler sends this and the
    /// process ends (see [`crate::jail::report`]).
    SeccompViolation {
        syscall: i64,
        thread: String,
    },
}

/// The VM-specific part of a child process.
pub trait ChildBody {
    type Shell;
    type Running: RunningChild;
    /// Why `prepare` or `start` failed. It is rendered (with its sources) in the child's
    /// process and reaches the parent as [`ChildError::Body`].
    type Error: std::error::Error;
    /// Identity-free work done ahead of time (e.g. a VM shell).
    fn prepare(&self) -> Result<Self::Shell, Self::Error>;
    /// [`ChildBody::prepare`] for the child with this index, which may also do the work
    /// that is tied to the index but not to the identity (e.g. opening its tap in the network
    /// namespace prepared for it). The pool calls this one.
    fn prepare_for(&self, index: usize) -> Result<Self::Shell, Self::Error> {
        let _ = index;
        self.prepare()
    }
    /// [`ChildBody::prepare_for`] in a process that the pool has moved into the network
    /// namespace it made for it ([`Pool::with_networks`]): what it opens now (a tap) belongs
    /// to that namespace.
    fn prepare_in_netns(&self, index: usize) -> Result<Self::Shell, Self::Error> {
        self.prepare_for(index)
    }
    /// Gives the shell its identity and starts the child.
    /// Gives the shell its identity and gets the child ready to run; its guest runs from
    /// [`RunningChild::resume`] on (between the two the process is locked down).
    fn start(
        &self,
        shell: Self::Shell,
        identity: &ChildIdentity,
    ) -> Result<Self::Running, Self::Error>;
    /// The jail its process enters (None: unconfined).
    fn jail(&self) -> Option<&crate::jail::Jail> {
        None
    }
    /// Where its children BRANCH when they cannot write the store themselves (None: into
    /// the store, or not at all).
    fn inbox(&self) -> Option<crate::inbox::Inbox> {
        None
    }
    /// The resolvers its children's network policy opens, which their agents are given with
    /// `restored` (None: no network, or no DNS allowed; resolv.conf is left alone).
    fn resolvers(&self) -> Option<Vec<std::net::IpAddr>> {
        None
    }
}

/// A started child, as its own process sees it.
pub trait RunningChild {
    type Error: std::error::Error;
    /// Lets a started child's guest run (after its process was locked down).
    fn resume(&self) -> Result<(), Self::Error> {
        Ok(())
    }
    /// A handle that asks the child to stop (called from the control thread, at most once).
    /// It returns whether this request is what stops the child: false when the child had
    /// already stopped by itself (say its guest powered off a moment before), so that the stop
    /// is reported as the guest's own.
    fn stopper(&self) -> Box<dyn Fn() -> bool + Send>;
    /// A handle that snapshots the running child (called from the control thread, while
    /// `wait` blocks). With `stop_after` the child is left paused, and the control thread
    /// stops it next.
    fn snapshotter(&self) -> Snapshotter {
        Box::new(|_| Err(Box::new(SnapshotUnsupported)))
    }
    /// Blocks until the child stops; `Ok(reason)` for a clean or requested stop, as one
    /// human-readable line; an error for a child that failed (it reaches the parent, rendered,
    /// as [`ChildError::Stopped`]).
    fn wait(self) -> Result<String, Self::Error>;
}

/// Timing reported by one child.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StartReport {
    /// Time the child spent in `start`, measured inside the child.
    pub start: Duration,
}

/// How one child ended, as [`Pool::stop_all`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReport {
    pub index: usize,
    /// `Ok(reason)` for a clean stop (on request, or a guest that powered off, reset or exited
    /// with 0); an error for a VM that failed, a process that died, or one that did not say.
    pub outcome: Result<String, ChildError>,
    /// The child's VM stopped by itself (its guest powered off, reset, exited or died) before
    /// it was asked to; false when `stop_all` (or the parent going away) stopped it, and when
    /// the child did not report at all.
    pub by_guest: bool,
}

impl StopReport {
    pub fn is_clean(&self) -> bool {
        self.outcome.is_ok()
    }

    /// Why the guest stopped, when it stopped by itself and cleanly (it powered off, reset or
    /// exited with 0): a guest ending its own life, not a failure.
    pub fn guest_stop(&self) -> Option<&str> {
        match &self.outcome {
            Ok(reason) if self.by_guest => Some(reason),
            _ => None,
        }
    }
}

/// Parent-side handle of one child process.
pub struct PoolChild {
    pub index: usize,
    pub pid: libc::pid_t,
    /// Time the child spent preparing its shell (off the fork path), measured inside it.
    pub prepare: Option<Duration>,
    /// It was told to start (its shell is no longer free).
    started: bool,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    exited: Option<ExitStatus>,
    /// Its cgroup leaf, removed when this handle goes (the process reaped by then).
    pub leaf: Option<PathBuf>,
    /// Its network ([`Pool::with_networks`]), removed when this handle goes (after the
    /// process was reaped).
    pub net: Option<crate::net::ChildNet>,
}

impl Drop for PoolChild {
    fn drop(&mut self) {
        if let Some(leaf) = &self.leaf {
            // Empty once the process is reaped; else it stays for the next sweep.
            let _ = std::fs::remove_dir(leaf);
        }
    }
}

/// Child processes, each with a prepared shell, waiting for `go`.
pub struct Pool {
    children: Vec<PoolChild>,
    /// A cgroup leaf for each child ([`Pool::spawn_in_leaves`]).
    leaves: Option<crate::cgroup::ChildLeaves>,
    /// A network for each child ([`Pool::with_networks`]); after `children`, so it is
    /// dropped after their networks.
    nets: Option<crate::net::ShellNets>,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot fork a child process")]
    Fork(#[source] io::Error),
    #[error("preparing a child's network")]
    Net(#[source] crate::net::NetError),
    #[error("child {index}")]
    Child {
        index: usize,
        #[source]
        source: ChildError,
    },
}

/// Why one child of the pool failed, as its parent learns it. A child's own errors cross the
/// process boundary as text (its body's error chain, or its VM's stop reason); the rest is
/// what the parent sees of the process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChildError {
    /// Its body failed to prepare or start.
    #[error("{0}")]
    Body(String),
    /// Its VM stopped abnormally (a fatal vCPU exit, a guest that exited non-zero).
    #[error("{0}")]
    Stopped(String),
    #[error("process {pid} died ({status})")]
    Died {
        pid: libc::pid_t,
        status: ExitStatus,
    },
    #[error("process {pid} closed its control socket")]
    ControlClosed { pid: libc::pid_t },
    #[error("timed out")]
    TimedOut,
    /// Asked to start a child that is not a ready shell (unknown, or already started).
    #[error("not a ready shell")]
    NotReady,
    /// Asked to snapshot a child that is not running (unknown, or never started).
    #[error("not a started child")]
    NotStarted,
    /// Its snapshot of itself failed (the error's chain, rendered in the child).
    #[error("{0}")]
    Snapshot(String),
    /// The control socket failed, or carried something other than the expected message.
    #[error("control socket: {0}")]
    Control(String),
    /// Its jail's seccomp filter refused a system call, which ended the process.
    #[error("killed by seccomp: {}", crate::jail::report::describe(*syscall, thread))]
    Seccomp {
        pid: libc::pid_t,
        syscall: i64,
        thread: String,
    },
}

impl Pool {
    /// Forks `n` children; each runs `body.prepare()` and reports back. Returns once every
    /// child is ready (or has failed: the pool then holds fewer children and says which).
    pub fn spawn<B: ChildBody>(
        body: &B,
        n: usize,
        timeout: Duration,
    ) -> Result<(Pool, Vec<PoolError>), PoolError> {
        Pool::spawn_in_leaves(body, n, timeout, None)
    }

    /// [`Pool::spawn`], each child in a cgroup leaf of its own when `leaves` is given (made
    /// as it is forked, removed once it is reaped).
    pub fn spawn_in_leaves<B: ChildBody>(
        body: &B,
        n: usize,
        timeout: Duration,
        leaves: Option<crate::cgroup::ChildLeaves>,
    ) -> Result<(Pool, Vec<PoolError>), PoolError> {
        let mut pool = Pool {
            children: Vec::with_capacity(n),
            leaves,
            nets: None,
        };
        let failures = pool.grow(body, n, timeout)?;
        Ok((pool, failures))
    }

    /// An empty pool whose children each get a network of their own from `nets`: made just
    /// before the child is forked, handed to it (named after its pid, so a sweep removes it
    /// once the child is dead), entered by the child before it prepares its shell
    /// ([`ChildBody::prepare_in_netns`]), and removed with the child.
    pub fn with_networks(nets: crate::net::ShellNets) -> Pool {
        Pool {
            children: Vec::new(),
            leaves: None,
            nets: Some(nets),
        }
    }

    /// Child `index`'s network ([`Pool::with_networks`]).
    pub fn net(&self, index: usize) -> Option<&crate::net::ChildNet> {
        self.children
            .iter()
            .find(|c| c.index == index)
            .and_then(|c| c.net.as_ref())
    }

    pub fn net_mut(&mut self, index: usize) -> Option<&mut crate::net::ChildNet> {
        self.children
            .iter_mut()
            .find(|c| c.index == index)
            .and_then(|c| c.net.as_mut())
    }

    /// What the pool's networks are made with.
    pub fn networks(&self) -> Option<&crate::net::ShellNets> {
        self.nets.as_ref()
    }

    /// Forks `n` more children (their indices follow the highest so far) and waits until each
    /// has prepared its shell; those that failed are reaped and returned as errors.
    pub fn grow<B: ChildBody>(
        &mut self,
        body: &B,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<PoolError>, PoolError> {
        self.fork_shells(body, n)?;
        Ok(self.await_shells(Instant::now() + timeout))
    }

    /// Forks `n` more children that prepare their shells in the background, and returns at
    /// once: a long-lived zygote refills its warm pool this way without making the next
    /// request wait. [`Pool::await_shells`] collects them.
    pub fn fork_shells<B: ChildBody>(&mut self, body: &B, n: usize) -> Result<(), PoolError> {
        let first = self.children.iter().map(|c| c.index + 1).max().unwrap_or(0);
        let mut nets: Vec<Option<crate::net::ChildNet>> = match &self.nets {
            Some(made) => made
                .create(n)
                .map_err(PoolError::Net)?
                .into_iter()
                .map(Some)
                .collect(),
            None => (0..n).map(|_| None).collect(),
        };
        for index in first..first + n {
            let mut net = nets[index - first].take();
            let (parent_end, child_end) = UnixStream::pair().map_err(PoolError::Fork)?;
            // Siblings must not keep each other's control sockets open, nor handles to each
            // other's network namespaces.
            let mut close: Vec<i32> = self
                .children
                .iter()
                .map(|c: &PoolChild| c.writer.as_raw_fd())
                .collect();
            close.extend(
                self.children
                    .iter()
                    .filter_map(|c| c.net.as_ref()?.handle())
                    .chain(nets.iter().flatten().filter_map(|n| n.handle())),
            );
            close.push(parent_end.as_raw_fd());
            let netns = net.as_ref().and_then(|n| n.handle());
            let pid = process::fork_child(&close, || child_main(body, child_end, index, netns))
                .map_err(PoolError::Fork)?;
            if let Some(net) = &mut net {
                if let Err(e) = net.set_owner(pid) {
                    // It stays this process's: removed with the child all the same, or by a
                    // sweep once this process is dead.
                    tracing::warn!(
                        "child {index} keeps network namespace {}: {}",
                        net.netns,
                        forkd_store::error_chain(&e)
                    );
                }
            }
            let leaf = self
                .leaves
                .as_ref()
                .and_then(|l| match l.enter(index, pid) {
                    Ok(leaf) => Some(leaf),
                    Err(e) => {
                        tracing::warn!(
                            "child {index} runs without its cgroup leaf: {}",
                            forkd_store::error_chain(&e)
                        );
                        None
                    }
                });
            let reader = BufReader::new(parent_end.try_clone().map_err(PoolError::Fork)?);
            self.children.push(PoolChild {
                index,
                pid,
                leaf,
                net,
                reader,
                writer: parent_end,
                prepare: None,
                started: false,
                exited: None,
            });
        }
        Ok(())
    }

    /// Waits (until `deadline`) for every child still preparing its shell; those that
    /// failed are reaped, removed and returned as errors.
    pub fn await_shells(&mut self, deadline: Instant) -> Vec<PoolError> {
        let mut failures = Vec::new();
        for child in self.children.iter_mut().filter(|c| c.preparing()) {
            match child.recv(deadline) {
                Ok(FromChild::ShellReady { prepare_us }) => {
                    child.prepare = Some(Duration::from_micros(prepare_us))
                }
                Ok(FromChild::Failed { message }) => {
                    failures.push(child.error(ChildError::Body(message)))
                }
                Ok(other) => failures.push(child.error(unexpected(&other))),
                Err(e) => failures.push(child.error(e)),
            }
        }
        self.children.retain_mut(|c| {
            if c.preparing() {
                c.kill_and_reap();
                false
            } else {
                true
            }
        });
        failures
    }

    /// Children still preparing their shells.
    pub fn preparing_shells(&self) -> usize {
        self.children.iter().filter(|c| c.preparing()).count()
    }

    /// Children whose shell is ready and that were not told to start yet, by index.
    pub fn ready_shells(&self) -> Vec<usize> {
        self.children
            .iter()
            .filter(|c| !c.started && c.prepare.is_some())
            .map(|c| c.index)
            .collect()
    }

    pub fn children(&self) -> &[PoolChild] {
        &self.children
    }

    pub fn len(&self) -> usize {
        self.children.len()
    }

    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// Sends every child its identity at once, then collects their reports. Returns the
    /// per-child results (in pool order) and the wall-clock time until the last one started.
    pub fn go_all(
        &mut self,
        identity: impl Fn(usize) -> ChildIdentity,
        timeout: Duration,
    ) -> (Vec<Result<StartReport, PoolError>>, Duration) {
        let all: Vec<usize> = self.children.iter().map(|c| c.index).collect();
        self.go(&all, identity, timeout)
    }

    /// [`Pool::go_all`] for the children with these indices only (each told to start once;
    /// an index that is not a ready shell gets an error). Results follow `indices`.
    pub fn go(
        &mut self,
        indices: &[usize],
        identity: impl Fn(usize) -> ChildIdentity,
        timeout: Duration,
    ) -> (Vec<Result<StartReport, PoolError>>, Duration) {
        let begin = Instant::now();
        let sent: Vec<Result<usize, PoolError>> = indices
            .iter()
            .map(|&index| {
                let pos = self
                    .children
                    .iter()
                    .position(|c| c.index == index && !c.started && c.prepare.is_some())
                    .ok_or(PoolError::Child {
                        index,
                        source: ChildError::NotReady,
                    })?;
                let child = &mut self.children[pos];
                child.started = true;
                child
                    .send(&ToChild::Go {
                        identity: identity(index),
                    })
                    .map_err(|e| child.error(ChildError::Control(e.to_string())))?;
                Ok(pos)
            })
            .collect();
        let deadline = begin + timeout;
        let mut results = Vec::with_capacity(indices.len());
        for sent in sent {
            let child = match sent {
                Ok(pos) => &mut self.children[pos],
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            };
            let result = match child.recv(deadline) {
                Ok(FromChild::Started { start_us }) => Ok(StartReport {
                    start: Duration::from_micros(start_us),
                }),
                Ok(FromChild::Failed { message }) => Err(child.error(ChildError::Body(message))),
                Ok(other) => Err(child.error(unexpected(&other))),
                Err(e) => Err(child.error(e)),
            };
            results.push(result);
        }
        (results, begin.elapsed())
    }

    /// Asks every child to stop and reaps them; returns how each one ended (in pool order),
    /// including whether its VM had already stopped by itself.
    pub fn stop_all(&mut self, timeout: Duration) -> Vec<StopReport> {
        self.stop_all_after(Duration::ZERO, timeout)
    }

    /// [`Pool::stop_all`], after giving the children up to `grace` to stop by themselves: a
    /// guest that is shutting down (its agent's connection already gone, its VM not yet
    /// stopped) is then reported as the guest's own stop instead of being overtaken by ours.
    pub fn stop_all_after(&mut self, grace: Duration, timeout: Duration) -> Vec<StopReport> {
        let grace_end = Instant::now() + grace;
        let mut early: Vec<Option<Result<FromChild, ChildError>>> =
            self.children.iter().map(|_| None).collect();
        if !grace.is_zero() {
            for (c, slot) in self.children.iter_mut().zip(&mut early) {
                match c.recv(grace_end) {
                    Err(ChildError::TimedOut) => {}
                    message => *slot = Some(message),
                }
            }
        }
        for (c, slot) in self.children.iter_mut().zip(&early) {
            if slot.is_none() {
                let _ = c.send(&ToChild::Stop);
            }
        }
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        for (c, slot) in self.children.iter_mut().zip(early) {
            let message = slot.unwrap_or_else(|| c.recv(deadline));
            let (outcome, by_guest) = stop_outcome(message);
            c.kill_and_reap();
            out.push(StopReport {
                index: c.index,
                outcome,
                by_guest,
            });
        }
        self.children.clear();
        out
    }

    /// Asks one child to stop and reaps it, leaving its siblings alone; None when no child
    /// has this index.
    pub fn stop(&mut self, index: usize, timeout: Duration) -> Option<StopReport> {
        let pos = self.children.iter().position(|c| c.index == index)?;
        let mut child = self.children.remove(pos);
        let _ = child.send(&ToChild::Stop);
        let message = child.recv(Instant::now() + timeout);
        child.kill_and_reap();
        let (outcome, by_guest) = stop_outcome(message);
        Some(StopReport {
            index,
            outcome,
            by_guest,
        })
    }

    /// Asks a started child to snapshot itself; with `request.stop_after` it then stops and
    /// is reaped (its [`StopReport`] is returned too).
    pub fn snapshot(
        &mut self,
        index: usize,
        request: &SnapshotRequest,
        timeout: Duration,
    ) -> Result<(SnapshotDone, Option<StopReport>), PoolError> {
        let pos = self
            .children
            .iter()
            .position(|c| c.index == index && c.started)
            .ok_or(PoolError::Child {
                index,
                source: ChildError::NotStarted,
            })?;
        let child = &mut self.children[pos];
        child
            .send(&ToChild::Snapshot {
                request: request.clone(),
            })
            .map_err(|e| child.error(ChildError::Control(e.to_string())))?;
        let deadline = Instant::now() + timeout;
        let done = match child.recv(deadline) {
            Ok(FromChild::Snapshotted { done }) => done,
            Ok(FromChild::SnapshotFailed { message }) => {
                return Err(child.error(ChildError::Snapshot(message)))
            }
            Ok(other) => return Err(child.error(unexpected(&other))),
            Err(e) => return Err(child.error(e)),
        };
        if !request.stop_after {
            return Ok((done, None));
        }
        let mut child = self.children.remove(pos);
        let message = child.recv(deadline);
        child.kill_and_reap();
        let (outcome, by_guest) = stop_outcome(message);
        Ok((
            done,
            Some(StopReport {
                index,
                outcome,
                by_guest,
            }),
        ))
    }

    /// Kills one child (SIGKILL) and reaps it, leaving its siblings alone.
    pub fn kill(&mut self, index: usize) -> Option<ExitStatus> {
        let pos = self.children.iter().position(|c| c.index == index)?;
        let mut child = self.children.remove(pos);
        child.kill_and_reap();
        child.exited
    }

    /// Children that have died on their own, with how they ended (they are reaped) and, when
    /// their jail's seccomp filter ended them, its report ([`ChildError::Seccomp`]).
    pub fn reap_dead(&mut self) -> Vec<(usize, ExitStatus, Option<ChildError>)> {
        let mut dead = Vec::new();
        self.children.retain_mut(|c| {
            match c
                .exited
                .map(Some)
                .map_or_else(|| process::try_wait(c.pid), Ok)
            {
                Ok(Some(status)) => {
                    c.exited = Some(status);
                    dead.push((c.index, status, c.seccomp_report()));
                    false
                }
                _ => true,
            }
        });
        dead
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for c in &mut self.children {
            c.kill_and_reap();
        }
    }
}

impl PoolChild {
    /// Forked, its shell not reported ready yet.
    fn preparing(&self) -> bool {
        !self.started && self.prepare.is_none()
    }

    fn send(&mut self, msg: &ToChild) -> io::Result<()> {
        let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
        line.push(b'\n');
        self.writer.write_all(&line)
    }

    fn recv(&mut self, deadline: Instant) -> Result<FromChild, ChildError> {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(|e| ChildError::Control(e.to_string()))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(self.exit_error()),
            Ok(_) => match serde_json::from_str(&line) {
                Ok(FromChild::SeccompViolation { syscall, thread }) => {
                    // The process is ending (its handler exits right after the line).
                    self.exited = process::wait(self.pid).ok();
                    Err(ChildError::Seccomp {
                        pid: self.pid,
                        syscall,
                        thread,
                    })
                }
                Ok(message) => Ok(message),
                Err(e) => Err(ChildError::Control(format!("bad message: {e}"))),
            },
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(ChildError::TimedOut)
            }
            Err(e) => Err(ChildError::Control(e.to_string())),
        }
    }

    /// The seccomp report of a child that ended by itself, if it left one unread on its
    /// control socket (an idle sandbox's, which nobody was waiting on).
    fn seccomp_report(&mut self) -> Option<ChildError> {
        // The process is gone: what it wrote is there to read, then the end of the stream.
        self.reader.get_ref().set_nonblocking(true).ok()?;
        let mut line = String::new();
        loop {
            line.clear();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {
                    if let Ok(FromChild::SeccompViolation { syscall, thread }) =
                        serde_json::from_str(&line)
                    {
                        return Some(ChildError::Seccomp {
                            pid: self.pid,
                            syscall,
                            thread,
                        });
                    }
                }
            }
        }
    }

    /// Why the control socket closed: the process ended, and how.
    fn exit_error(&mut self) -> ChildError {
        if self.exited.is_none() {
            self.exited = process::wait(self.pid).ok();
        }
        match self.exited {
            Some(status) => ChildError::Died {
                pid: self.pid,
                status,
            },
            None => ChildError::ControlClosed { pid: self.pid },
        }
    }

    fn error(&self, source: ChildError) -> PoolError {
        PoolError::Child {
            index: self.index,
            source,
        }
    }

    fn kill_and_reap(&mut self) {
        if self.exited.is_none() {
            let _ = process::kill(self.pid, libc::SIGKILL);
            self.exited = process::wait(self.pid).ok();
        }
    }
}

/// The body of a child process: prepare, report, wait for an identity, start, serve.
fn child_main<B: ChildBody>(
    body: &B,
    ctl: UnixStream,
    index: usize,
    netns: Option<std::os::fd::RawFd>,
) -> i32 {
    let Ok(read_half) = ctl.try_clone() else {
        return 71;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = ctl;
    let send = |w: &mut UnixStream, msg: &FromChild| {
        let mut line = serde_json::to_vec(msg).unwrap_or_default();
        line.push(b'\n');
        w.write_all(&line)
    };
    let jail = match body.jail().map(|j| j.enter_process(writer.as_raw_fd())) {
        None => None,
        Some(Ok(jail)) => Some(jail),
        Some(Err(e)) => {
            let message = forkd_store::error_chain(&e);
            let _ = send(&mut writer, &FromChild::Failed { message });
            return crate::jail::report::JAIL_FAILED_EXIT;
        }
    };
    // The control thread starts with the shell and confines itself at once (off the fork
    // path); it waits for its work until the child has started.
    let (control_work, parked) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
    std::thread::spawn(move || {
        forkd_vmm::thread_jail::confine_early(forkd_vmm::thread_jail::ThreadKind::Control);
        if let Ok(work) = parked.recv() {
            work();
        }
    });
    let t = Instant::now();
    let prepared = match netns {
        // This thread (and those it starts from now on) in the child's own namespace.
        Some(fd) => match crate::net::enter_netns_fd(fd) {
            Ok(()) => body.prepare_in_netns(index),
            Err(e) => {
                let message = format!("entering the child's network namespace: {e}");
                let _ = send(&mut writer, &FromChild::Failed { message });
                return 1;
            }
        },
        None => body.prepare_for(index),
    };
    let shell = match prepared {
        Ok(s) => s,
        Err(e) => {
            let message = forkd_store::error_chain(&e);
            let _ = send(&mut writer, &FromChild::Failed { message });
            return 1;
        }
    };
    let prepare_us = t.elapsed().as_micros() as u64;
    if send(&mut writer, &FromChild::ShellReady { prepare_us }).is_err() {
        return 1;
    }
    let identity = match read_msg(&mut reader) {
        Some(ToChild::Go { identity }) => identity,
        _ => return 0, // told to stop (or the parent went away) before starting
    };
    let t = Instant::now();
    let running = match body.start(shell, &identity) {
        Ok(r) => r,
        Err(e) => {
            let message = forkd_store::error_chain(&e);
            let _ = send(&mut writer, &FromChild::Failed { message });
            return 1;
        }
    };
    // What needed the user forkd runs as is open now: lock the process down, then let the
    // guest run (each thread confines itself before its first guest-driven work).
    if let Some(Err(e)) = jail.as_ref().map(|j| j.lock_down()) {
        let message = forkd_store::error_chain(&e);
        let _ = send(&mut writer, &FromChild::Failed { message });
        return crate::jail::report::JAIL_FAILED_EXIT;
    }
    if let Err(e) = running.resume() {
        let message = forkd_store::error_chain(&e);
        let _ = send(&mut writer, &FromChild::Failed { message });
        return 1;
    }
    let start_us = t.elapsed().as_micros() as u64;
    if send(&mut writer, &FromChild::Started { start_us }).is_err() {
        return 1;
    }
    // Control thread: snapshots on request; a Stop message (or the parent closing the socket)
    // stops the child. It records whether it asked before the child ended by itself, and
    // whether asking is what stopped it; the lock keeps that decision and the end of `wait`
    // apart. Replies share the socket with the main thread's last message, hence its lock.
    let stop = running.stopper();
    let mut snapshot = running.snapshotter();
    let writer = Arc::new(Mutex::new(writer));
    let control = Arc::new(Mutex::new(StopControl::default()));
    let control_thread = control.clone();
    let reply = writer.clone();
    let work = Box::new(move || {
        forkd_vmm::thread_jail::enter(forkd_vmm::thread_jail::ThreadKind::Control);
        let stop_now = || {
            let mut c = control_thread.lock().unwrap_or_else(|e| e.into_inner());
            if !c.ended {
                c.asked = stop();
            }
        };
        while let Some(ToChild::Snapshot { request }) = read_msg(&mut reader) {
            let (msg, stop_after) = match snapshot(&request) {
                Ok(done) => (FromChild::Snapshotted { done }, request.stop_after),
                Err(e) => {
                    let message = forkd_store::error_chain(e.as_ref());
                    (FromChild::SnapshotFailed { message }, false)
                }
            };
            let sent = send(&mut reply.lock().unwrap_or_else(|e| e.into_inner()), &msg);
            if stop_after || sent.is_err() {
                break;
            }
        }
        stop_now();
    });
    if control_work.send(work).is_err() {
        // The control thread is gone (it could not be confined: the process is ending).
        return crate::jail::report::JAIL_FAILED_EXIT;
    }
    forkd_vmm::thread_jail::enter(forkd_vmm::thread_jail::ThreadKind::Main);
    let (reason, clean) = match running.wait() {
        Ok(r) => (r, true),
        Err(e) => (forkd_store::error_chain(&e), false),
    };
    let by_guest = {
        let mut c = control.lock().unwrap_or_else(|e| e.into_inner());
        c.ended = true;
        !c.asked
    };
    let _ = send(
        &mut writer.lock().unwrap_or_else(|e| e.into_inner()),
        &FromChild::Stopped {
            reason,
            clean,
            by_guest,
        },
    );
    if clean {
        0
    } else {
        1
    }
}

/// Between a started child's control thread and its main thread.
#[derive(Default)]
struct StopControl {
    /// The control thread asked the child to stop, and that is what stopped it.
    asked: bool,
    /// `wait` has returned: the child stopped before (or without) being asked.
    ended: bool,
}

fn read_msg(reader: &mut BufReader<UnixStream>) -> Option<ToChild> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => serde_json::from_str(&line).ok(),
    }
}

/// How a child ended, from its last message (or the failure to get one).
fn stop_outcome(message: Result<FromChild, ChildError>) -> (Result<String, ChildError>, bool) {
    match message {
        Ok(FromChild::Stopped {
            reason,
            clean,
            by_guest,
        }) => (
            if clean {
                Ok(reason)
            } else {
                Err(ChildError::Stopped(reason))
            },
            by_guest,
        ),
        Ok(other) => (Err(unexpected(&other)), false),
        Err(e) => (Err(e), false),
    }
}

fn unexpected(message: &FromChild) -> ChildError {
    ChildError::Control(format!("unexpected message {message:?}"))
}
