//! The sandbox registry: which sandboxes exist, from which snapshot, until when, and the
//! zygote processes that own them. No HTTP here.
//!
//! Sandboxes outlive the daemon: each snapshot's zygote (`forkd __zygote`) is its own session,
//! not tied to the daemon's life, and owns its sandboxes' processes. The registry's records are
//! written atomically to `<state>/sandboxes.json`; a restarted daemon reads them, asks every
//! zygote it finds which sandboxes are still there, and keeps exactly those.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use forkd_sandbox::cgroup::{self, CgroupError, CgroupParent, Limits};
use forkd_sandbox::zygote::{
    self, NetRequest, SandboxInfo, SandboxNet, SpawnFailure, ZygoteClient, ZygoteClientError,
    ZygoteReply, ZygoteRequest,
};
use forkd_store::{Store, StoreError, Tag};
use serde::{Deserialize, Serialize};
use state_file::{Durability, StateWriter};
use utoipa::ToSchema;

mod state_file;

/// How long a zygote may take to load its snapshot and answer.
const ZYGOTE_START_TIMEOUT: Duration = Duration::from_secs(60);

/// What a sandbox's VMM process may use (enforced by a cgroup v2 leaf of its own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxLimits {
    /// memory.max in MiB: the guest's private pages and the VMM's own memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// cpu.max as CPUs (0.5: half of one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// pids.max: tasks of the VMM process (its threads count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

impl SandboxLimits {
    pub fn is_empty(&self) -> bool {
        self.engine().is_empty()
    }

    fn engine(&self) -> Limits {
        Limits {
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            pids: self.pids,
        }
    }
}

/// A sandbox's network: its own namespace behind NAT, egress denied unless its policy
/// allows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SandboxNetwork {
    /// Where the host reaches it: connections to this address go to the guest (none while
    /// paused).
    #[serde(default)]
    pub address: Option<String>,
    /// The guest's own address in its network (the snapshot's, the same in every sandbox).
    pub guest_address: String,
    /// Its network namespace, `forkd-<its VMM pid>-<n>` (none while paused).
    #[serde(default)]
    pub namespace: Option<String>,
    /// What it may reach: `CIDR[:PORT]` (TCP and UDP).
    pub allow: Vec<String>,
    /// It may reach the host's resolvers (TCP and UDP port 53).
    pub allow_dns: bool,
    /// Host TCP ports forwarded to its guest ports, `HOST_PORT:GUEST_PORT`.
    pub publish: Vec<String>,
    /// Why its snapshot's recorded policy was not applied (a pulled snapshot's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl SandboxNetwork {
    fn of(net: SandboxNet) -> SandboxNetwork {
        SandboxNetwork {
            address: Some(net.address.to_string()),
            guest_address: net.guest_address.to_string(),
            namespace: Some(net.namespace),
            allow: net.allow,
            allow_dns: net.allow_dns,
            publish: net.publish,
            note: net.note,
        }
    }

    /// What a resume asks for: the same policy and ports.
    fn request(&self) -> NetRequest {
        NetRequest {
            policy: Some(forkd_store::NetRecord {
                allow: self.allow.clone(),
                allow_dns: self.allow_dns,
            }),
            publish: self.publish.clone(),
        }
    }

    /// The host ports it has.
    fn host_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.publish
            .iter()
            .filter_map(|p| p.parse::<forkd_sandbox::net::Publish>().ok())
            .map(|p| p.host_port)
    }
}

impl SandboxRecord {
    /// This record, of a sandbox its zygote has just started as `info`.
    fn started(mut self, info: SandboxInfo, zygote_tag: &str) -> SandboxRecord {
        self.pid = info.pid;
        self.restore_ms = info.restore_ms;
        self.vsock_uds = info.vsock_uds;
        self.serial_log = info.serial_log;
        self.zygote_tag = zygote_tag.to_string();
        self.network = info.network.map(SandboxNetwork::of);
        self
    }
}

/// Whether a sandbox's VM runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    #[default]
    Running,
    /// Suspended to disk: no process, its state in a snapshot; resume brings it back.
    Paused,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
        }
    }
}

/// One sandbox, as the registry records it (and the API shows it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SandboxRecord {
    pub id: String,
    /// The snapshot it was forked from.
    pub tag: String,
    #[serde(default)]
    pub state: SandboxState,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Unix seconds after which it is killed and its files removed; none: it lives until
    /// deleted.
    pub expires_at: Option<u64>,
    /// The caller's labels, for filtering.
    pub metadata: BTreeMap<String, String>,
    /// Environment variables every command run in it gets.
    pub env: BTreeMap<String, String>,
    /// cgroup v2 limits on its VMM process (none: unlimited).
    #[serde(default, skip_serializing_if = "SandboxLimits::is_empty")]
    pub limits: SandboxLimits,
    /// The timeout it was created with (a resume starts it again).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Its network (none: its snapshot has no network device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<SandboxNetwork>,
    /// Its VMM process (0 while paused).
    pub pid: i32,
    /// Restore time measured inside its process.
    pub restore_ms: f64,
    #[serde(skip)]
    #[schema(ignore)]
    pub vsock_uds: PathBuf,
    #[serde(skip)]
    #[schema(ignore)]
    pub serial_log: PathBuf,
    /// The snapshot whose zygote owns its process: `tag`, or after a resume its last pause.
    #[serde(skip)]
    #[schema(ignore)]
    pub zygote_tag: String,
    /// The snapshots its pauses were saved into, oldest first (each a diff of the one
    /// before); removed with the sandbox.
    #[serde(skip)]
    #[schema(ignore)]
    pub paused_tags: Vec<String>,
}

/// What a BRANCH made, and what it cost the sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct BranchReport {
    pub id: String,
    /// The new snapshot: sandboxes can be created from it at once.
    pub tag: String,
    /// `diff` or `full`.
    pub mode: String,
    /// The snapshot a diff is layered on (the sandbox's snapshot or its last branch).
    pub parent: Option<String>,
    /// How long the sandbox's guest was stopped.
    pub pause_ms: f64,
    /// The whole branch, writing and publishing included.
    pub total_ms: f64,
    pub pages_written: u64,
}

/// What a create asks for.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub tag: Tag,
    pub count: usize,
    pub timeout: Option<Duration>,
    pub metadata: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    pub limits: SandboxLimits,
    /// Its network section (checked: its values parse; `publish` only with a count of 1).
    pub network: Option<NetRequest>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{asked} more sandboxes would make {} (this daemon runs at most {limit})", current + asked)]
    TooMany {
        limit: usize,
        current: usize,
        asked: usize,
    },
    #[error("no sandbox {0:?}")]
    UnknownSandbox(String),
    #[error("sandbox {0} is paused; resume it first")]
    Paused(String),
    #[error("sandbox {0} is not paused")]
    NotPaused(String),
    #[error("starting the zygote of {tag}")]
    Launch {
        tag: String,
        #[source]
        source: std::io::Error,
    },
    #[error("zygote of {tag}")]
    Zygote {
        tag: String,
        #[source]
        source: ZygoteClientError,
    },
    #[error("sandbox {id}: {message}")]
    Start { id: String, message: String },
    #[error("sandbox {id}: {message}")]
    Snapshot { id: String, message: String },
    #[error("resource limits need cgroup v2")]
    Limits(#[source] Arc<CgroupError>),
    #[error("host port {port} is already published{}", by.as_ref().map(|id| format!(" to sandbox {id}")).unwrap_or_else(|| " on this host".into()))]
    PortTaken { port: u16, by: Option<String> },
    #[error("snapshot {0} has no network device: its sandboxes have no network to set (snapshot it with --net)")]
    NoNetDevice(String),
    #[error("sandbox {id}: {message}")]
    Network { id: String, message: String },
    #[error(transparent)]
    Agent(#[from] forkd_sandbox::exec::AgentError),
    #[error("writing the sandbox registry {}", path.display())]
    Persist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct Registry {
    store: Arc<Store>,
    state_dir: PathBuf,
    forkd_exe: PathBuf,
    max_sandboxes: usize,
    /// Shells each snapshot's zygote keeps prepared.
    warm: usize,
    /// Zygotes jail their sandboxes (false: they run `--no-jail`).
    jail: bool,
    sandboxes: Arc<Mutex<BTreeMap<String, SandboxRecord>>>,
    /// Where sandboxes' cgroup leaves go, prepared on the first create with limits.
    cgroups: std::sync::OnceLock<Result<CgroupParent, Arc<CgroupError>>>,
    /// Keeps `<state>/sandboxes.json` up to date.
    state_file: StateWriter,
    /// One client per zygote, by tag; each behind its own lock so one snapshot's spawn does
    /// not hold up another's.
    zygotes: Mutex<BTreeMap<String, Arc<Mutex<ZygoteClient>>>>,
    /// Host ports of creates and resumes in flight (a running sandbox's are in its record).
    reserved_ports: Mutex<BTreeSet<u16>>,
}

/// Host ports held for a create or resume until it has finished (its sandbox's record has
/// them from then on).
struct PortReservation<'a> {
    ports: Vec<u16>,
    held: &'a Mutex<BTreeSet<u16>>,
}

impl Drop for PortReservation<'_> {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for p in &self.ports {
            held.remove(p);
        }
    }
}

impl Registry {
    /// Opens the registry in `state_dir` and re-adopts what survived: sandboxes whose zygote
    /// still answers and still has them. Records of the others are dropped, their files
    /// removed.
    pub fn open(
        store: Arc<Store>,
        state_dir: PathBuf,
        forkd_exe: PathBuf,
        max_sandboxes: usize,
        warm: usize,
    ) -> Result<Registry, RegistryError> {
        let persist_err = |source| RegistryError::Persist {
            path: state_dir.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir.join("zygotes")).map_err(persist_err)?;
        std::fs::create_dir_all(state_dir.join("sandboxes")).map_err(persist_err)?;
        let sandboxes = Arc::new(Mutex::new(BTreeMap::new()));
        let state_file = StateWriter::new(state_dir.join("sandboxes.json"), sandboxes.clone());
        let registry = Registry {
            store,
            state_dir,
            forkd_exe,
            max_sandboxes,
            warm,
            jail: true,
            sandboxes,
            state_file,
            cgroups: std::sync::OnceLock::new(),
            zygotes: Mutex::new(BTreeMap::new()),
            reserved_ports: Mutex::new(BTreeSet::new()),
        };
        registry.adopt()?;
        sweep_networks();
        Ok(registry)
    }

    /// Whether the zygotes started from now on jail their sandboxes.
    pub fn with_jail(mut self, jail: bool) -> Registry {
        self.jail = jail;
        self
    }

    fn state_file(&self) -> PathBuf {
        self.state_dir.join("sandboxes.json")
    }

    fn zygote_socket(&self, tag: &str) -> PathBuf {
        self.state_dir.join("zygotes").join(format!("{tag}.sock"))
    }

    fn run_root(&self) -> PathBuf {
        self.state_dir.join("sandboxes")
    }

    fn adopt(&self) -> Result<(), RegistryError> {
        let stored = StateWriter::read(&self.state_file());
        // Sandbox id → the tag of the zygote that runs it.
        let mut alive: BTreeMap<String, String> = BTreeMap::new();
        let mut held: Vec<SandboxRecord> = Vec::new();
        for entry in std::fs::read_dir(self.state_dir.join("zygotes"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            let Some(tag) = socket_tag(&path) else {
                continue;
            };
            match ZygoteClient::connect(&path, Duration::ZERO)
                .and_then(|mut c| c.call(&ZygoteRequest::List).map(|r| (c, r)))
            {
                Ok((client, ZygoteReply::List { sandboxes, .. })) => {
                    for info in sandboxes {
                        alive.insert(info.id.clone(), tag.clone());
                        held.extend(held_record(info, &tag));
                    }
                    self.lock_zygotes()
                        .insert(tag, Arc::new(Mutex::new(client)));
                }
                _ => {
                    tracing::info!("zygote socket {} is dead; removing it", path.display());
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let mut sandboxes = self.lock_sandboxes();
        for s in stored.sandboxes {
            // A paused sandbox has no process: its state is in the store.
            if s.record.state == SandboxState::Paused || alive.contains_key(&s.record.id) {
                let record = s.into_record();
                sandboxes.insert(record.id.clone(), record);
            }
        }
        // Created by the last daemon, which died before writing them down: their zygote kept
        // the records.
        for record in held {
            sandboxes.entry(record.id.clone()).or_insert(record);
        }
        let known: Vec<String> = sandboxes.keys().cloned().collect();
        drop(sandboxes);
        self.clean_remains(&alive, &known);
        self.persist_as(Durability::Cached)
    }

    /// After a restart: sandboxes a zygote runs that no record names (a create the last
    /// daemon died in the middle of) are stopped, sandbox directories of no live sandbox are
    /// removed, and zygotes of pauses that no longer serve a sandbox are shut down.
    fn clean_remains(&self, alive: &BTreeMap<String, String>, known: &[String]) {
        for (id, tag) in alive.iter().filter(|(id, _)| !known.contains(id)) {
            tracing::info!("stopping sandbox {id}: no record names it");
            if let Some(z) = self.lock_zygotes().get(tag).cloned() {
                let _ = lock(&z).call(&ZygoteRequest::Stop { id: id.clone() });
            }
        }
        for entry in std::fs::read_dir(self.run_root())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) || !alive.contains_key(&name) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        if let Some(parent) = CgroupParent::existing() {
            let running: Vec<String> = known
                .iter()
                .filter(|id| alive.contains_key(*id))
                .cloned()
                .collect();
            let stale: Vec<String> = parent
                .leaves()
                .into_iter()
                .filter(|id| !running.contains(id))
                .collect();
            self.remove_leaves(&stale);
        }
        let serving: Vec<String> = self
            .lock_sandboxes()
            .values()
            .filter(|r| r.state == SandboxState::Running)
            .map(|r| r.zygote_tag.clone())
            .collect();
        let idle: Vec<String> = self
            .lock_zygotes()
            .keys()
            .filter(|t| t.starts_with(PAUSED_PREFIX) && !serving.contains(t))
            .cloned()
            .collect();
        for tag in idle {
            if let Some(z) = self.lock_zygotes().remove(&tag) {
                let _ = lock(&z).call(&ZygoteRequest::Shutdown);
            }
        }
    }

    /// Whether snapshot `tag` has a network device (its sandboxes then each get a network).
    pub fn has_network_device(&self, tag: &Tag) -> Result<bool, RegistryError> {
        let snapshot = self.store.get(tag)?;
        forkd_sandbox::net::snapshot_tap(&snapshot.dir)
            .map(|tap| tap.is_some())
            .map_err(|e| RegistryError::Start {
                id: tag.to_string(),
                message: forkd_store::error_chain(&e),
            })
    }

    /// Holds `request`'s host ports for a create or resume of `id` (None: a create): none
    /// may be a running sandbox's or another request's in flight.
    fn reserve_ports(
        &self,
        request: Option<&NetRequest>,
        id: Option<&str>,
    ) -> Result<PortReservation<'_>, RegistryError> {
        let ports: Vec<u16> = request
            .map(|r| {
                r.publish
                    .iter()
                    .filter_map(|p| p.parse::<forkd_sandbox::net::Publish>().ok())
                    .map(|p| p.host_port)
                    .collect()
            })
            .unwrap_or_default();
        let sandboxes = self.lock_sandboxes();
        let mut held = self
            .reserved_ports
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for &port in &ports {
            let owner = sandboxes.values().find(|r| {
                r.state == SandboxState::Running
                    && Some(r.id.as_str()) != id
                    && r.network
                        .as_ref()
                        .is_some_and(|n| n.host_ports().any(|p| p == port))
            });
            if let Some(owner) = owner {
                return Err(RegistryError::PortTaken {
                    port,
                    by: Some(owner.id.clone()),
                });
            }
            if held.contains(&port) {
                return Err(RegistryError::PortTaken { port, by: None });
            }
        }
        held.extend(&ports);
        Ok(PortReservation {
            ports,
            held: &self.reserved_ports,
        })
    }

    /// Forks `request.count` sandboxes of `request.tag` through its zygote (started on first
    /// use).
    pub fn create(&self, request: CreateRequest) -> Result<Vec<SandboxRecord>, RegistryError> {
        let manifest = self.store.get(&request.tag)?.manifest;
        if request.network.is_some() && !self.has_network_device(&request.tag)? {
            return Err(RegistryError::NoNetDevice(request.tag.to_string()));
        }
        let _ports = self.reserve_ports(request.network.as_ref(), None)?;
        let current = self.lock_sandboxes().len();
        if current + request.count > self.max_sandboxes {
            return Err(RegistryError::TooMany {
                limit: self.max_sandboxes,
                current,
                asked: request.count,
            });
        }
        let tag = request.tag.to_string();
        let zygote = self.zygote(&tag)?;
        let ids: Vec<String> = (0..request.count).map(|_| new_id()).collect();
        let created_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let expires_at = request.timeout.map(|t| unix_now() + t.as_secs());
        let record_of = |id: &str| SandboxRecord {
            id: id.to_string(),
            tag: tag.clone(),
            state: SandboxState::Running,
            created_at: created_at.clone(),
            expires_at,
            metadata: request.metadata.clone(),
            env: request.env.clone(),
            limits: request.limits,
            timeout_secs: request.timeout.map(|t| t.as_secs()),
            network: None,
            pid: 0,
            restore_ms: 0.0,
            vsock_uds: PathBuf::new(),
            serial_log: PathBuf::new(),
            zygote_tag: tag.clone(),
            paused_tags: Vec::new(),
        };
        let held = ids.iter().map(|id| (id.clone(), record_of(id))).collect();
        let nets = match &request.network {
            Some(n) => ids.iter().map(|id| (id.clone(), n.clone())).collect(),
            None => BTreeMap::new(),
        };
        let asked = std::time::Instant::now();
        let reply = self.spawn_in(&zygote, &tag, &ids, &request.limits, held, nets)?;
        tracing::debug!(elapsed = ?asked.elapsed(), "zygote spawn");
        let ZygoteReply::Spawned { started, failed } = reply else {
            self.remove_leaves(&ids);
            return Err(RegistryError::Start {
                id: tag,
                message: format!("unexpected zygote reply {reply:?}"),
            });
        };
        let records: Vec<SandboxRecord> = started
            .into_iter()
            .map(|s| record_of(&s.id).started(s, &tag))
            .collect();
        {
            let mut sandboxes = self.lock_sandboxes();
            for r in &records {
                sandboxes.insert(r.id.clone(), r.clone());
            }
        }
        // Off the request path: until the file has them, their zygote holds their records.
        self.state_file.write_soon();
        if forkd_sandbox::exec::snapshot_has_agent(&manifest) {
            self.send_restored(&records);
        }
        if let Some(f) = failed.into_iter().next() {
            for r in &records {
                let _ = self.delete(&r.id);
            }
            self.remove_leaves(&ids);
            return Err(spawn_failure(f, &tag));
        }
        Ok(records)
    }

    /// A Linux sandbox's agent hears `restored` (fresh entropy, the clock) before anything
    /// else reaches it.
    fn send_restored(&self, records: &[SandboxRecord]) {
        std::thread::scope(|s| {
            for r in records {
                s.spawn(move || {
                    let deadline = std::time::Instant::now() + ZYGOTE_START_TIMEOUT;
                    // A sandbox whose policy opens DNS is given the resolvers it may reach.
                    let resolvers: Option<Vec<std::net::IpAddr>> =
                        r.network.as_ref().filter(|n| n.allow_dns).map(|_| {
                            forkd_sandbox::net::host_resolvers()
                                .into_iter()
                                .map(Into::into)
                                .collect()
                        });
                    if let Err(e) = forkd_sandbox::exec::connect_restored_agent_with(
                        &r.vsock_uds,
                        deadline,
                        resolvers.as_deref(),
                    ) {
                        tracing::warn!("sandbox {}: {}", r.id, forkd_store::error_chain(&e));
                    }
                });
            }
        });
    }

    pub fn list(&self) -> Vec<SandboxRecord> {
        self.lock_sandboxes().values().cloned().collect()
    }

    pub fn get(&self, id: &str) -> Result<SandboxRecord, RegistryError> {
        self.lock_sandboxes()
            .get(id)
            .cloned()
            .ok_or_else(|| RegistryError::UnknownSandbox(id.to_string()))
    }

    /// A sandbox whose guest runs forkd-agent (`what` names the operation for the refusal).
    pub fn with_agent(&self, id: &str, what: &str) -> Result<SandboxRecord, RegistryError> {
        let record = self.running(id)?;
        let tag = Tag::parse(&record.tag).map_err(StoreError::from)?;
        let manifest = self.store.get(&tag)?.manifest;
        forkd_sandbox::exec::require_agent(&manifest, what)?;
        Ok(record)
    }

    /// A sandbox that is running (a paused one is refused).
    pub fn running(&self, id: &str) -> Result<SandboxRecord, RegistryError> {
        let record = self.get(id)?;
        match record.state {
            SandboxState::Running => Ok(record),
            SandboxState::Paused => Err(RegistryError::Paused(id.to_string())),
        }
    }

    /// Stops a sandbox and removes its files, and the snapshots its pauses left.
    pub fn delete(&self, id: &str) -> Result<SandboxRecord, RegistryError> {
        let record = self.get(id)?;
        if record.state == SandboxState::Running {
            let zygote = self.zygote(&record.zygote_tag)?;
            let result = lock(&zygote).call(&ZygoteRequest::Stop { id: id.to_string() });
            match result {
                // Gone already (it stopped by itself): the record goes too.
                Ok(_) | Err(ZygoteClientError::Refused(_)) => {}
                Err(source) => return Err(self.zygote_failed(&record.zygote_tag, source)),
            }
        }
        self.lock_sandboxes().remove(id);
        // A paused sandbox's record outlives a host crash; so must its removal.
        self.persist_as(if record.paused_tags.is_empty() {
            Durability::Cached
        } else {
            Durability::Synced
        })?;
        self.retire_pause_zygote(&record);
        self.remove_paused_tags(&record.paused_tags);
        self.remove_leaves(std::slice::from_ref(&record.id));
        Ok(record)
    }

    /// BRANCH: snapshots a running sandbox into `tag` (diff against its origin, or full); it
    /// runs on. Sandboxes can be created from `tag` as soon as this returns.
    pub fn branch(&self, id: &str, tag: &Tag, diff: bool) -> Result<BranchReport, RegistryError> {
        let record = self.running(id)?;
        if self.store.exists(tag) {
            return Err(StoreError::AlreadyExists(tag.clone()).into());
        }
        let done = self.snapshot(&record, tag, diff, false)?;
        Ok(BranchReport {
            id: record.id,
            tag: done.tag,
            mode: if diff { "diff" } else { "full" }.to_string(),
            parent: done.parent,
            pause_ms: done.paused_us as f64 / 1e3,
            total_ms: done.total_us as f64 / 1e3,
            pages_written: done.pages_written,
        })
    }

    /// Suspends a running sandbox to disk (a diff snapshot of it; its process ends) and
    /// keeps its id; [`Registry::resume`] brings it back.
    pub fn pause(&self, id: &str) -> Result<SandboxRecord, RegistryError> {
        let record = self.running(id)?;
        let tag = Tag::parse(&format!("_paused-{id}-{}", record.paused_tags.len() + 1))
            .map_err(StoreError::from)?;
        self.snapshot(&record, &tag, true, true)?;
        let updated = self.update(id, Durability::Synced, |r| {
            r.state = SandboxState::Paused;
            r.pid = 0;
            r.expires_at = None;
            r.paused_tags.push(tag.to_string());
            // Its network went with its process; a resume makes it again.
            if let Some(n) = &mut r.network {
                n.address = None;
                n.namespace = None;
            }
        })?;
        self.retire_pause_zygote(&record);
        self.remove_leaves(std::slice::from_ref(&record.id));
        Ok(updated)
    }

    /// Restores a paused sandbox under the same id from its last pause; its timeout starts
    /// again (`timeout`, else the one it was created with).
    pub fn resume(
        &self,
        id: &str,
        timeout: Option<Duration>,
    ) -> Result<SandboxRecord, RegistryError> {
        let record = self.get(id)?;
        if record.state != SandboxState::Paused {
            return Err(RegistryError::NotPaused(id.to_string()));
        }
        let Some(paused) = record.paused_tags.last().cloned() else {
            return Err(RegistryError::NotPaused(id.to_string()));
        };
        let manifest = self
            .store
            .get(&Tag::parse(&paused).map_err(StoreError::from)?)?
            .manifest;
        let ids = vec![id.to_string()];
        let timeout = timeout.or(record.timeout_secs.map(Duration::from_secs));
        let mut held = record.clone();
        held.state = SandboxState::Running;
        held.expires_at = timeout.map(|t| unix_now() + t.as_secs());
        // The same policy and ports as before its pause.
        let net = record.network.as_ref().map(SandboxNetwork::request);
        let _ports = self.reserve_ports(net.as_ref(), Some(id))?;
        let nets = net
            .map(|n| BTreeMap::from([(id.to_string(), n)]))
            .unwrap_or_default();
        let zygote = self.zygote(&paused)?;
        let held = BTreeMap::from([(id.to_string(), held)]);
        let reply = self.spawn_in(&zygote, &paused, &ids, &record.limits, held, nets)?;
        let started = match reply {
            ZygoteReply::Spawned {
                mut started,
                mut failed,
            } => match (started.pop(), failed.pop()) {
                (Some(s), _) => s,
                (None, Some(f)) => return Err(spawn_failure(f, &paused)),
                (None, None) => {
                    return Err(unexpected(
                        id,
                        &ZygoteReply::Spawned {
                            started,
                            failed: Vec::new(),
                        },
                    ))
                }
            },
            other => return Err(unexpected(id, &other)),
        };
        let updated = self.update(id, Durability::Synced, |r| {
            r.state = SandboxState::Running;
            r.pid = started.pid;
            r.restore_ms = started.restore_ms;
            r.vsock_uds = started.vsock_uds.clone();
            r.serial_log = started.serial_log.clone();
            r.zygote_tag = paused.clone();
            r.expires_at = timeout.map(|t| unix_now() + t.as_secs());
            r.network = started.network.clone().map(SandboxNetwork::of);
        })?;
        if forkd_sandbox::exec::snapshot_has_agent(&manifest) {
            self.send_restored(std::slice::from_ref(&updated));
        }
        Ok(updated)
    }

    /// Asks `tag`'s zygote to start `ids`, each in a cgroup leaf with `limits` (when there
    /// are any); the leaves go again when the zygote cannot be asked.
    fn spawn_in(
        &self,
        zygote: &Mutex<ZygoteClient>,
        tag: &str,
        ids: &[String],
        limits: &SandboxLimits,
        records: BTreeMap<String, SandboxRecord>,
        nets: BTreeMap<String, NetRequest>,
    ) -> Result<ZygoteReply, RegistryError> {
        let cgroups = self.make_leaves(ids, limits)?;
        let records = records
            .into_iter()
            .map(|(id, r)| (id, serde_json::to_value(r).expect("records serialize")))
            .collect();
        lock(zygote)
            .call(&ZygoteRequest::Spawn {
                ids: ids.to_vec(),
                cgroups,
                records,
                nets,
            })
            .map_err(|source| {
                self.remove_leaves(ids);
                self.zygote_failed(tag, source)
            })
    }

    /// cgroup v2 leaves with `limits` for `ids` (none when there are no limits); a host that
    /// cannot have them is an error before anything starts.
    fn make_leaves(
        &self,
        ids: &[String],
        limits: &SandboxLimits,
    ) -> Result<BTreeMap<String, PathBuf>, RegistryError> {
        if limits.is_empty() {
            return Ok(BTreeMap::new());
        }
        let parent = self
            .cgroups
            .get_or_init(|| CgroupParent::prepare().map_err(Arc::new))
            .clone()
            .map_err(RegistryError::Limits)?;
        let mut leaves = BTreeMap::new();
        for id in ids {
            match parent.create_leaf(id, &limits.engine()) {
                Ok(leaf) => {
                    leaves.insert(id.clone(), leaf);
                }
                Err(e) => {
                    self.remove_leaves(ids);
                    return Err(RegistryError::Limits(Arc::new(e)));
                }
            }
        }
        Ok(leaves)
    }

    /// Removes the cgroup leaves of `ids` (their processes are gone).
    fn remove_leaves(&self, ids: &[String]) {
        let Some(parent) = CgroupParent::existing() else {
            return;
        };
        for id in ids {
            if let Err(e) = cgroup::remove_leaf(&parent.leaf(id)) {
                tracing::warn!("{}", forkd_store::error_chain(&e));
            }
        }
    }

    /// Asks a sandbox's zygote to snapshot it (and with `stop_after`, to stop it).
    fn snapshot(
        &self,
        record: &SandboxRecord,
        tag: &Tag,
        diff: bool,
        stop_after: bool,
    ) -> Result<forkd_sandbox::pool::SnapshotDone, RegistryError> {
        let zygote = self.zygote(&record.zygote_tag)?;
        let reply = lock(&zygote)
            .call(&ZygoteRequest::Snapshot {
                id: record.id.clone(),
                tag: tag.to_string(),
                diff,
                stop_after,
            })
            .map_err(|source| match source {
                ZygoteClientError::Refused(message) => RegistryError::Snapshot {
                    id: record.id.clone(),
                    message,
                },
                source => self.zygote_failed(&record.zygote_tag, source),
            })?;
        match reply {
            ZygoteReply::Snapshotted { done, .. } => Ok(done),
            other => Err(unexpected(&record.id, &other)),
        }
    }

    /// Each zygote's warm pool: prepared shells by snapshot tag (a zygote that does not
    /// answer is left out).
    pub fn warm_shells(&self) -> Vec<(String, usize)> {
        let zygotes: Vec<(String, Arc<Mutex<ZygoteClient>>)> = self
            .lock_zygotes()
            .iter()
            .map(|(t, z)| (t.clone(), z.clone()))
            .collect();
        zygotes
            .into_iter()
            .filter_map(|(tag, z)| match lock(&z).call(&ZygoteRequest::List) {
                Ok(ZygoteReply::List { ready, .. }) => Some((tag, ready)),
                _ => None,
            })
            .collect()
    }

    /// Changes one record and persists the registry.
    fn update(
        &self,
        id: &str,
        durability: Durability,
        change: impl FnOnce(&mut SandboxRecord),
    ) -> Result<SandboxRecord, RegistryError> {
        let record = {
            let mut sandboxes = self.lock_sandboxes();
            let record = sandboxes
                .get_mut(id)
                .ok_or_else(|| RegistryError::UnknownSandbox(id.to_string()))?;
            change(record);
            record.clone()
        };
        self.persist_as(durability)?;
        Ok(record)
    }

    /// A resumed sandbox's zygote (that of its pause snapshot) served only it: once the
    /// sandbox stops or pauses again, the zygote goes too.
    fn retire_pause_zygote(&self, record: &SandboxRecord) {
        if record.zygote_tag == record.tag {
            return;
        }
        if let Some(zygote) = self.lock_zygotes().remove(&record.zygote_tag) {
            let _ = lock(&zygote).call(&ZygoteRequest::Shutdown);
        }
    }

    /// Newest first, as each is a diff of the one before. One that a branch depends on
    /// stays (the store refuses), and says so in the log.
    fn remove_paused_tags(&self, tags: &[String]) {
        for tag in tags.iter().rev() {
            let Ok(tag) = Tag::parse(tag) else { continue };
            if let Err(e) = self
                .store
                .remove(std::slice::from_ref(&tag), forkd_store::RemoveMode::Refuse)
            {
                tracing::warn!("keeping {tag}: {}", forkd_store::error_chain(&e));
            }
        }
    }

    /// Sets a sandbox's timeout to `timeout` from now.
    pub fn set_timeout(&self, id: &str, timeout: Duration) -> Result<SandboxRecord, RegistryError> {
        self.running(id)?;
        self.update(id, Durability::Cached, |r| {
            r.expires_at = Some(unix_now() + timeout.as_secs())
        })
    }

    /// Deletes every sandbox whose timeout has passed; returns their ids.
    pub fn reap_expired(&self) -> Vec<String> {
        let now = unix_now();
        let expired: Vec<String> = self
            .lock_sandboxes()
            .values()
            .filter(|r| r.expires_at.is_some_and(|t| t <= now))
            .map(|r| r.id.clone())
            .collect();
        expired
            .into_iter()
            .filter(|id| match self.delete(id) {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!("timeout of {id}: {}", forkd_store::error_chain(&e));
                    false
                }
            })
            .collect()
    }

    /// The zygote of `tag`, started on first use.
    fn zygote(&self, tag: &str) -> Result<Arc<Mutex<ZygoteClient>>, RegistryError> {
        if let Some(z) = self.lock_zygotes().get(tag) {
            return Ok(z.clone());
        }
        let socket = self.zygote_socket(tag);
        let log = std::fs::File::create(self.state_dir.join("zygotes").join(format!("{tag}.log")))
            .map_err(|source| RegistryError::Launch {
                tag: tag.to_string(),
                source,
            })?;
        let mut command = Command::new(&self.forkd_exe);
        command
            .args(["__zygote", "--tag", tag, "--socket"])
            .arg(&socket)
            .arg("--run-dir")
            .arg(self.run_root())
            .arg("--warm")
            // A pause's zygote serves one resume: nothing to keep warm.
            .arg(if tag.starts_with(PAUSED_PREFIX) {
                "0".to_string()
            } else {
                self.warm.to_string()
            })
            .arg("--track-dirty-pages")
            .args((!self.jail).then_some("--no-jail"))
            .env("FORKD_HOME", self.store.root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: setsid(2) is async-signal-safe and touches no memory; in the forked child
        // before exec it makes the zygote its own session, so signals sent to the daemon's
        // process group (Ctrl-C, a service manager's stop) do not reach the sandboxes.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| RegistryError::Launch {
            tag: tag.to_string(),
            source,
        })?;
        let client = match ZygoteClient::connect(&socket, ZYGOTE_START_TIMEOUT) {
            Ok(c) => c,
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(self.zygote_failed(tag, source));
            }
        };
        // The zygote is not the daemon's to wait for: a thread reaps it when it ends.
        std::thread::spawn(move || child.wait());
        let client = Arc::new(Mutex::new(client));
        self.lock_zygotes().insert(tag.to_string(), client.clone());
        Ok(client)
    }

    /// A zygote that failed is forgotten (the next use starts a new one).
    fn zygote_failed(&self, tag: &str, source: ZygoteClientError) -> RegistryError {
        if !matches!(source, ZygoteClientError::Refused(_)) {
            self.lock_zygotes().remove(tag);
        }
        RegistryError::Zygote {
            tag: tag.to_string(),
            source,
        }
    }

    /// Writes the records now (see [`Durability`] for when that must reach the disk).
    fn persist_as(&self, durability: Durability) -> Result<(), RegistryError> {
        self.state_file
            .write_now(durability)
            .map_err(|source| RegistryError::Persist {
                path: self.state_file(),
                source,
            })
    }

    fn lock_sandboxes(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SandboxRecord>> {
        self.sandboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_zygotes(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Mutex<ZygoteClient>>>> {
        self.zygotes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The record a zygote kept for a sandbox it runs, brought up to date with what the zygote
/// knows of it.
fn held_record(mut info: SandboxInfo, zygote_tag: &str) -> Option<SandboxRecord> {
    let record: SandboxRecord = serde_json::from_value(info.record.take()?).ok()?;
    Some(record.started(info, zygote_tag))
}

/// Tags of the snapshots pauses are saved into: `_paused-<id>-<n>`.
const PAUSED_PREFIX: &str = "_paused-";

fn lock(zygote: &Mutex<ZygoteClient>) -> std::sync::MutexGuard<'_, ZygoteClient> {
    zygote.lock().unwrap_or_else(|e| e.into_inner())
}

/// The error for a sandbox its zygote could not start (of snapshot `tag`).
fn spawn_failure(f: SpawnFailure, tag: &str) -> RegistryError {
    match f.code.as_deref() {
        Some(zygote::PORT_TAKEN) => RegistryError::PortTaken {
            port: f
                .error
                .split_whitespace()
                .find_map(|w| w.parse().ok())
                .unwrap_or(0),
            by: None,
        },
        Some(zygote::NO_NETWORK_DEVICE) => RegistryError::NoNetDevice(tag.to_string()),
        Some(zygote::BAD_NETWORK) => RegistryError::Network {
            id: f.id,
            message: f.error,
        },
        _ => RegistryError::Start {
            id: f.id,
            message: f.error,
        },
    }
}

/// Removes the networks that sandboxes which are gone left (a zygote killed with its
/// sandboxes, a host that lost power): those whose VMM process is dead. Live sandboxes'
/// networks are named after their VMM processes, so a daemon restart leaves them alone.
fn sweep_networks() {
    let leftovers = std::fs::read_dir(forkd_sandbox::net::NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(forkd_sandbox::net::NETNS_PREFIX)
        });
    if !leftovers {
        return;
    }
    let swept =
        forkd_sandbox::net::NetHost::from_env().and_then(|host| forkd_sandbox::net::sweep(&host));
    match swept {
        Ok(removed) if !removed.netns.is_empty() => tracing::info!(
            "removed {} network namespace(s) of sandboxes that are gone",
            removed.netns.len()
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(
            "sweeping the networks of sandboxes that are gone: {}",
            forkd_store::error_chain(&e)
        ),
    }
}

fn unexpected(id: &str, reply: &ZygoteReply) -> RegistryError {
    RegistryError::Start {
        id: id.to_string(),
        message: format!("unexpected zygote reply {reply:?}"),
    }
}

/// `<tag>.sock` → the tag.
fn socket_tag(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(".sock").map(str::to_string)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// `sb-` and 12 random hex digits (from the host entropy children get on restore).
fn new_id() -> String {
    let entropy = forkd_sandbox::exec::host_entropy();
    let hex: String = entropy[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("sb-{hex}")
}
