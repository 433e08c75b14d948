//! A zygote: one process per snapshot that keeps the snapshot loaded (its memory mapped
//! copy-on-write), a few VM shells prepared ahead, and starts, lists and stops sandboxes on
//! request over a Unix socket.
//!
//! The daemon never forks (it is multi-threaded); it asks a zygote, which is a separate,
//! single-threaded process and forks each sandbox from itself, so every sandbox inherits the
//! snapshot's mapping instead of building its own. A zygote does not die with the daemon:
//! a restarted daemon connects to the same socket and finds its sandboxes still running.
//!
//! Protocol: one JSON request per line, one JSON reply per line ([`ZygoteRequest`],
//! [`ZygoteReply`]); one client at a time.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::pool::{ChildBody, Pool, SnapshotDone, SnapshotRequest};
use crate::run_dirs::RunDirs;

/// How a zygote runs.
#[derive(Debug, Clone)]
pub struct ZygoteConfig {
    /// Where it listens.
    pub socket: PathBuf,
    /// Each sandbox's files (vsock socket, disk overlay, serial log) go to `<run_root>/<id>/`.
    pub run_root: PathBuf,
    /// Shells kept prepared ahead of demand.
    pub warm: usize,
    /// How long a shell may take to prepare and a sandbox to start.
    pub timeout: Duration,
    /// Its snapshot has a network device: every shell gets a network namespace of its own,
    /// made ahead with the policy sandboxes get unless their spawn sets one.
    pub network: Option<ZygoteNet>,
}

/// The networking facts of a zygote's snapshot.
#[derive(Debug, Clone)]
pub struct ZygoteNet {
    pub host: crate::net::NetHost,
    pub guest: crate::net::GuestNet,
    /// The policy the snapshot recorded, and the package it was pulled as when it was
    /// pulled (see [`crate::net::policy_for`]).
    pub recorded: Option<forkd_store::NetRecord>,
    pub pulled_as: Option<String>,
}

/// A sandbox's network, as its spawn asks for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRequest {
    /// A policy of its own, replacing the one its snapshot recorded (None: the recorded one,
    /// unless the snapshot was pulled; see [`crate::net::policy_for`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<forkd_store::NetRecord>,
    /// Host TCP ports forwarded to guest ports, `HOST_PORT:GUEST_PORT`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
}

/// A sandbox's network, as its zygote set it up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxNet {
    /// Its network namespace, `forkd-<its VMM pid>-<seq>`.
    pub namespace: String,
    /// Where the host reaches it: connections to this address go to the guest.
    pub address: std::net::Ipv4Addr,
    /// The guest's own address (the snapshot's; the same in every sandbox).
    pub guest_address: std::net::Ipv4Addr,
    /// Its egress policy: `CIDR[:PORT]` it may reach, and DNS.
    pub allow: Vec<String>,
    pub allow_dns: bool,
    /// Host ports forwarded to it, `HOST_PORT:GUEST_PORT`.
    pub publish: Vec<String>,
    /// Why the snapshot's recorded policy was not applied (a pulled snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ZygoteRequest {
    /// Start one sandbox per id (ids are the caller's; each must be new). A sandbox named in
    /// `cgroups` has its process moved into that cgroup v2 leaf before its VM starts.
    Spawn {
        ids: Vec<String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        cgroups: BTreeMap<String, PathBuf>,
        /// The caller's record of each sandbox, kept with it and listed back: a caller that
        /// dies before saving its own copy finds it here.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        records: BTreeMap<String, serde_json::Value>,
        /// What a sandbox's network should be, when its spawn says (the others get the
        /// snapshot's default, when it has a network device).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        nets: BTreeMap<String, NetRequest>,
    },
    Stop {
        id: String,
    },
    /// BRANCH a running sandbox into a new snapshot `tag` (it runs on), or with `stop_after`
    /// pause it to disk (it stops; its files are removed).
    Snapshot {
        id: String,
        tag: String,
        diff: bool,
        #[serde(default)]
        stop_after: bool,
    },
    List,
    /// Stop every sandbox and exit.
    Shutdown,
}

/// One running sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxInfo {
    pub id: String,
    pub pid: i32,
    /// Its hybrid-vsock socket (the agent's, or the demo guest's port).
    pub vsock_uds: PathBuf,
    pub serial_log: PathBuf,
    /// Restore time measured inside the sandbox's process.
    pub restore_ms: f64,
    /// The record its spawn request carried for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<serde_json::Value>,
    /// Its network (none: its snapshot has no network device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<SandboxNet>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpawnFailure {
    pub id: String,
    pub error: String,
    /// What kind of failure, when the caller can act on it: [`PORT_TAKEN`],
    /// [`NO_NETWORK_DEVICE`], [`BAD_NETWORK`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// A published host port is another child's.
pub const PORT_TAKEN: &str = "port_taken";
/// A network was asked of a snapshot without a network device.
pub const NO_NETWORK_DEVICE: &str = "no_network_device";
/// A network request that does not parse.
pub const BAD_NETWORK: &str = "bad_network";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum ZygoteReply {
    Spawned {
        started: Vec<SandboxInfo>,
        failed: Vec<SpawnFailure>,
    },
    /// `outcome` is how it ended (`stopped on request`, or why it had failed).
    Stopped {
        id: String,
        outcome: String,
        clean: bool,
    },
    Snapshotted {
        id: String,
        done: SnapshotDone,
    },
    List {
        sandboxes: Vec<SandboxInfo>,
        /// Shells of its warm pool (prepared, or preparing in their own processes).
        #[serde(default)]
        ready: usize,
    },
    ShuttingDown,
    /// The request could not be carried out (unknown id, a duplicate id, a malformed line).
    Error {
        message: String,
    },
}

/// A started sandbox, as its zygote tracks it.
struct Sandbox {
    index: usize,
    info: SandboxInfo,
    dirs: RunDirs,
}

/// Serves `config.socket` until a `shutdown` request. Call from a single-threaded process:
/// every sandbox is forked from here.
pub fn serve<B: ChildBody>(body: &B, config: &ZygoteConfig) -> io::Result<()> {
    std::fs::create_dir_all(&config.run_root)?;
    let failed = |e: &dyn std::error::Error| io::Error::other(forkd_store::error_chain(e));
    let (pool, default_policy) = match &config.network {
        None => (
            Pool::spawn(body, 0, config.timeout)
                .map_err(|e| failed(&e))?
                .0,
            None,
        ),
        Some(n) => {
            let chosen = crate::net::policy_for(None, n.recorded.as_ref(), n.pulled_as.as_deref())
                .map_err(|e| failed(&e))?;
            if let Some(note) = &chosen.note {
                tracing::info!("the snapshot{note}");
            }
            let nets =
                crate::net::ShellNets::new(n.host.clone(), n.guest.clone(), chosen.net_policy())
                    .map_err(|e| failed(&e))?;
            (Pool::with_networks(nets), Some(chosen))
        }
    };
    let mut zygote = Zygote {
        pool,
        default_policy,
        sandboxes: BTreeMap::new(),
        config: config.clone(),
        ended: BTreeMap::new(),
    };
    // Warm shells, before the socket answers (as before networks existed).
    for e in zygote
        .pool
        .grow(body, config.warm, config.timeout)
        .map_err(|e| failed(&e))?
    {
        tracing::warn!("a warm shell failed: {}", forkd_store::error_chain(&e));
    }
    let _ = std::fs::remove_file(&config.socket);
    let listener = UnixListener::bind(&config.socket)?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if zygote.serve_client(body, conn)? {
            break;
        }
    }
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}

struct Zygote {
    pool: Pool,
    /// The policy its shells' networks are made with (None: no network device).
    default_policy: Option<crate::net::ChosenPolicy>,
    sandboxes: BTreeMap<String, Sandbox>,
    config: ZygoteConfig,
    /// How sandboxes that ended by themselves ended (the last [`ENDED_KEPT`]), for the
    /// answer to a later request about one.
    ended: BTreeMap<String, String>,
}

const ENDED_KEPT: usize = 256;

/// How often an idle zygote looks for sandboxes that died by themselves.
const REAP_INTERVAL: Duration = Duration::from_millis(500);

impl Zygote {
    /// Answers one client until it goes away; true when it asked for a shutdown.
    fn serve_client<B: ChildBody>(&mut self, body: &B, conn: UnixStream) -> io::Result<bool> {
        conn.set_read_timeout(Some(REAP_INTERVAL))?;
        let mut writer = conn.try_clone()?;
        let mut reader = BufReader::new(conn);
        let mut line = String::new();
        loop {
            match reader.read_line(&mut line) {
                Ok(0) => return Ok(false),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    self.forget_dead();
                    continue;
                }
                Err(_) => return Ok(false),
            }
            let request = serde_json::from_str::<ZygoteRequest>(&line);
            line.clear();
            let (reply, shutdown) = match request {
                Ok(ZygoteRequest::Shutdown) => (self.shutdown(), true),
                Ok(request) => (self.handle(body, request), false),
                Err(e) => (
                    ZygoteReply::Error {
                        message: format!("malformed request: {e}"),
                    },
                    false,
                ),
            };
            let mut text = serde_json::to_vec(&reply).unwrap_or_default();
            text.push(b'\n');
            if writer.write_all(&text).is_err() {
                return Ok(shutdown);
            }
            if shutdown {
                return Ok(true);
            }
            if matches!(reply, ZygoteReply::Spawned { .. }) {
                self.refill(body);
            }
        }
    }

    fn handle<B: ChildBody>(&mut self, body: &B, request: ZygoteRequest) -> ZygoteReply {
        self.forget_dead();
        match request {
            ZygoteRequest::Spawn {
                ids,
                cgroups,
                records,
                nets,
            } => self.spawn(body, ids, cgroups, records, nets),
            ZygoteRequest::Stop { id } => self.stop(&id),
            ZygoteRequest::Snapshot {
                id,
                tag,
                diff,
                stop_after,
            } => self.snapshot(
                body,
                id,
                SnapshotRequest {
                    tag,
                    diff,
                    stop_after,
                    inbox: None,
                },
            ),
            ZygoteRequest::List => ZygoteReply::List {
                sandboxes: self.sandboxes.values().map(|s| s.info.clone()).collect(),
                ready: self.pool.ready_shells().len() + self.pool.preparing_shells(),
            },
            ZygoteRequest::Shutdown => unreachable!("handled by the caller"),
        }
    }

    fn spawn<B: ChildBody>(
        &mut self,
        body: &B,
        ids: Vec<String>,
        cgroups: BTreeMap<String, PathBuf>,
        mut records: BTreeMap<String, serde_json::Value>,
        nets: BTreeMap<String, NetRequest>,
    ) -> ZygoteReply {
        if let Some(bad) = ids.iter().find(|id| !valid_id(id)) {
            return error(format!("sandbox id {bad:?} is not [A-Za-z0-9_-]{{1,64}}"));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = ids
            .iter()
            .find(|id| self.sandboxes.contains_key(*id) || !seen.insert(*id))
        {
            return error(format!("sandbox id {dup:?} is already in use"));
        }
        // Shells still preparing from the last refill are nearly ready: when the ready ones
        // are too few, wait for those before forking more.
        if self.pool.ready_shells().len() < ids.len() {
            let deadline = Instant::now() + self.config.timeout;
            for e in self.pool.await_shells(deadline) {
                tracing::warn!("a warm shell failed: {}", forkd_store::error_chain(&e));
            }
        }
        let missing = ids.len().saturating_sub(self.pool.ready_shells().len());
        if missing > 0 {
            if let Err(e) = self.pool.grow(body, missing, self.config.timeout) {
                return error(forkd_store::error_chain(&e));
            }
        }
        let mut failed = Vec::new();
        let mut chosen: Vec<(String, usize, RunDirs, Option<SandboxNet>)> = Vec::new();
        let mut shells = self.pool.ready_shells().into_iter();
        for id in ids {
            let Some(index) = shells.next() else {
                let error = "no VM shell could be prepared for it".to_string();
                failed.push(SpawnFailure {
                    id,
                    error,
                    code: None,
                });
                continue;
            };
            let dirs = RunDirs::single(self.config.run_root.join(&id));
            let user = body.jail().and_then(|j| j.user());
            if let Err(error) = self.place(index, &dirs, cgroups.get(&id), user) {
                failed.push(SpawnFailure {
                    id,
                    error,
                    code: None,
                });
                continue;
            }
            match self.set_up_net(index, nets.get(&id)) {
                Ok(net) => chosen.push((id, index, dirs, net)),
                Err((error, code)) => {
                    // Its network may be half changed: the shell is not used again.
                    self.pool.kill(index);
                    dirs.remove();
                    failed.push(SpawnFailure {
                        id,
                        error,
                        code: Some(code.to_string()),
                    });
                }
            }
        }
        let indices: Vec<usize> = chosen.iter().map(|(_, index, _, _)| *index).collect();
        let identity = |index: usize| {
            let (_, _, dirs, net) = chosen
                .iter()
                .find(|(_, i, _, _)| *i == index)
                .expect("go asks only for the chosen shells");
            let mut identity = dirs.identity(index);
            identity.net_policy = net.as_ref().map(|n| forkd_store::NetRecord {
                allow: n.allow.clone(),
                allow_dns: n.allow_dns,
            });
            identity
        };
        let (results, _) = self.pool.go(&indices, identity, self.config.timeout);
        let mut started = Vec::new();
        for ((id, index, dirs, network), result) in chosen.into_iter().zip(results) {
            match result {
                Ok(report) => {
                    let identity = dirs.identity(index);
                    let info = SandboxInfo {
                        id: id.clone(),
                        pid: self.pid_of(index),
                        vsock_uds: identity.vsock_uds,
                        serial_log: identity.serial_log,
                        restore_ms: report.start.as_secs_f64() * 1e3,
                        record: records.remove(&id),
                        network,
                    };
                    started.push(info.clone());
                    let sandbox = Sandbox { index, info, dirs };
                    self.sandboxes.insert(id, sandbox);
                }
                Err(e) => {
                    self.pool.kill(index);
                    dirs.remove();
                    failed.push(SpawnFailure {
                        id,
                        error: forkd_store::error_chain(&e),
                        code: None,
                    });
                }
            }
        }
        ZygoteReply::Spawned { started, failed }
    }

    /// Gives shell `index`'s network what `request` asks (its own policy, published ports)
    /// before the sandbox runs; what it then is, for its record. An error names what was
    /// wrong, with its [`SpawnFailure::code`].
    fn set_up_net(
        &mut self,
        index: usize,
        request: Option<&NetRequest>,
    ) -> Result<Option<SandboxNet>, (String, &'static str)> {
        let Some(default) = &self.default_policy else {
            return match request {
                Some(_) => Err((
                    "its snapshot has no network device".to_string(),
                    NO_NETWORK_DEVICE,
                )),
                None => Ok(None),
            };
        };
        let bad = |e: &dyn std::error::Error| (forkd_store::error_chain(e), BAD_NETWORK);
        let request = request.cloned().unwrap_or_default();
        let policy = match &request.policy {
            Some(own) => crate::net::policy_for(Some(own), None, None).map_err(|e| bad(&e))?,
            None => default.clone(),
        };
        let publish: Vec<crate::net::Publish> = request
            .publish
            .iter()
            .map(|p| p.parse())
            .collect::<Result<_, crate::net::ParseError>>()
            .map_err(|e| bad(&e))?;
        let changed = policy.allow != default.allow || policy.allow_dns != default.allow_dns;
        let guest_address = self
            .pool
            .networks()
            .map_or(std::net::Ipv4Addr::UNSPECIFIED, |n| n.guest().guest);
        let Some(net) = self.pool.net_mut(index) else {
            return Err((format!("shell {index} has no network"), BAD_NETWORK));
        };
        let failed = |e: crate::net::NetError| {
            let code = match e {
                crate::net::NetError::PortTaken(_) => PORT_TAKEN,
                _ => BAD_NETWORK,
            };
            (forkd_store::error_chain(&e), code)
        };
        if changed {
            net.set_policy(&policy.net_policy()).map_err(failed)?;
        }
        net.publish(&publish).map_err(failed)?;
        Ok(Some(SandboxNet {
            namespace: net.netns.clone(),
            address: net.address,
            guest_address,
            allow: policy.allow.iter().map(|a| a.to_string()).collect(),
            allow_dns: policy.allow_dns,
            publish: publish
                .iter()
                .map(|p| format!("{}:{}", p.host_port, p.guest_port))
                .collect(),
            note: policy.note.clone(),
        }))
    }

    /// Readies shell `index` to become a sandbox: its directory, and its cgroup leaf when it
    /// has one. A shell that cannot be readied stays free.
    /// A child that runs as the jail's user gets its directory (`user`).
    fn place(
        &self,
        index: usize,
        dirs: &RunDirs,
        leaf: Option<&PathBuf>,
        user: Option<(u32, u32)>,
    ) -> Result<(), String> {
        dirs.create()
            .and_then(|()| match user {
                Some((uid, gid)) => dirs.give_to(uid, gid),
                None => Ok(()),
            })
            .map_err(|e| format!("{}: {e}", dirs.files.display()))?;
        if let Some(leaf) = leaf {
            if let Err(e) = crate::cgroup::enter(leaf, self.pid_of(index)) {
                dirs.remove();
                return Err(forkd_store::error_chain(&e));
            }
        }
        Ok(())
    }

    /// The error for a request about a sandbox this zygote does not run (any more).
    fn no_sandbox(&self, id: &str) -> String {
        match self.ended.get(id) {
            Some(how) => format!("sandbox {id:?} {how}"),
            None => format!("no sandbox {id:?}"),
        }
    }

    fn pid_of(&self, index: usize) -> i32 {
        self.pool
            .children()
            .iter()
            .find(|c| c.index == index)
            .map_or(0, |c| c.pid)
    }

    fn stop(&mut self, id: &str) -> ZygoteReply {
        let Some(sandbox) = self.sandboxes.remove(id) else {
            return error(self.no_sandbox(id));
        };
        let report = self.pool.stop(sandbox.index, self.config.timeout);
        sandbox.dirs.remove();
        self.drop_unused_host_table();
        let (outcome, clean) = match report.map(|r| r.outcome) {
            Some(Ok(reason)) => (reason, true),
            Some(Err(e)) => (e.to_string(), false),
            None => ("its process had already ended".to_string(), false),
        };
        ZygoteReply::Stopped {
            id: id.to_string(),
            outcome,
            clean,
        }
    }

    fn snapshot<B: ChildBody>(
        &mut self,
        body: &B,
        id: String,
        request: SnapshotRequest,
    ) -> ZygoteReply {
        let Some((index, dir)) = self
            .sandboxes
            .get(&id)
            .map(|s| (s.index, s.dirs.files.clone()))
        else {
            return error(self.no_sandbox(&id));
        };
        // A sandbox that runs as the jail's user writes its snapshot into its own directory,
        // adopted from there into the store.
        let result = match body.inbox() {
            Some(inbox) => inbox
                .snapshot(&mut self.pool, index, &request, &dir, self.config.timeout)
                .map_err(|e| forkd_store::error_chain(&e)),
            None => self
                .pool
                .snapshot(index, &request, self.config.timeout)
                .map_err(|e| forkd_store::error_chain(&e)),
        };
        match result {
            Ok((done, stopped)) => {
                if stopped.is_some() {
                    if let Some(sandbox) = self.sandboxes.remove(&id) {
                        sandbox.dirs.remove();
                    }
                    self.drop_unused_host_table();
                }
                ZygoteReply::Snapshotted { id, done }
            }
            Err(e) => error(e),
        }
    }

    fn shutdown(&mut self) -> ZygoteReply {
        self.pool.stop_all(self.config.timeout);
        for sandbox in std::mem::take(&mut self.sandboxes).into_values() {
            sandbox.dirs.remove();
        }
        ZygoteReply::ShuttingDown
    }

    /// Without a network left (a pool that keeps no shell warm, its last sandbox gone), the
    /// host's table goes too: nothing of forkd's stays on the host while the zygote idles.
    fn drop_unused_host_table(&self) {
        if let Some(nets) = self.pool.networks() {
            if self.pool.children().iter().all(|c| c.net.is_none()) {
                nets.remove_host_table_if_unused();
            }
        }
    }

    /// Sandboxes whose process ended by itself are reaped and their files removed.
    fn forget_dead(&mut self) {
        let dead = self.pool.reap_dead();
        if !dead.is_empty() {
            self.drop_unused_host_table();
        }
        for (index, status, seccomp) in dead {
            let id = self
                .sandboxes
                .iter()
                .find(|(_, s)| s.index == index)
                .map(|(id, _)| id.clone());
            if let Some(sandbox) = id.and_then(|id| self.sandboxes.remove(&id)) {
                let how = match seccomp {
                    // "killed by seccomp: syscall 59 (execve) from the vCPU thread"
                    Some(e) => {
                        tracing::warn!("sandbox {} was {e} ({status})", sandbox.info.id);
                        format!("was {e}")
                    }
                    None => {
                        tracing::info!("sandbox {} ended by itself ({status})", sandbox.info.id);
                        format!("ended by itself ({status})")
                    }
                };
                if self.ended.len() >= ENDED_KEPT {
                    self.ended.pop_first();
                }
                self.ended.insert(sandbox.info.id.clone(), how);
                sandbox.dirs.remove();
            }
        }
    }

    /// Keeps `warm` shells prepared (after a spawn used some). The new children prepare in
    /// the background: the next request does not wait for them unless it needs them.
    fn refill<B: ChildBody>(&mut self, body: &B) {
        let have = self.pool.ready_shells().len() + self.pool.preparing_shells();
        let missing = self.config.warm.saturating_sub(have);
        if missing > 0 {
            if let Err(e) = self.pool.fork_shells(body, missing) {
                tracing::warn!("refilling the warm pool: {}", forkd_store::error_chain(&e));
            }
        }
    }
}

fn error(message: String) -> ZygoteReply {
    ZygoteReply::Error { message }
}

/// Sandbox ids name directories: letters, digits, `-` and `_`, at most 64.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A connection to a zygote.
pub struct ZygoteClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

#[derive(Debug, thiserror::Error)]
pub enum ZygoteClientError {
    #[error("zygote socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to the zygote")]
    Io(#[from] io::Error),
    #[error("the zygote closed the connection")]
    Closed,
    #[error("the zygote's reply is not understood")]
    BadReply(#[from] serde_json::Error),
    /// The zygote refused the request.
    #[error("{0}")]
    Refused(String),
}

impl ZygoteClient {
    /// Connects, retrying until `timeout` while the zygote is still starting.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<ZygoteClient, ZygoteClientError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(ZygoteClientError::Connect {
                        path: socket.to_path_buf(),
                        source: e,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        Ok(ZygoteClient {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Sends one request and reads its reply; a refusal is an error.
    pub fn call(&mut self, request: &ZygoteRequest) -> Result<ZygoteReply, ZygoteClientError> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            return Err(ZygoteClientError::Closed);
        }
        match serde_json::from_str(&reply)? {
            ZygoteReply::Error { message } => Err(ZygoteClientError::Refused(message)),
            reply => Ok(reply),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_directories_safely() {
        for ok in ["sb-1", "A_b-9", &"x".repeat(64)] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in ["", "../x", "a/b", "a b", &"x".repeat(65), "ü"] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn requests_and_replies_are_json_lines() {
        let r = ZygoteRequest::Spawn {
            ids: vec!["a".into()],
            cgroups: BTreeMap::new(),
            records: BTreeMap::new(),
            nets: BTreeMap::new(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"op":"spawn","ids":["a"]}"#);
        assert_eq!(serde_json::from_str::<ZygoteRequest>(&text).unwrap(), r);
        let reply: ZygoteReply =
            serde_json::from_str(r#"{"reply":"error","message":"m"}"#).unwrap();
        assert_eq!(
            reply,
            ZygoteReply::Error {
                message: "m".into()
            }
        );
    }
}
