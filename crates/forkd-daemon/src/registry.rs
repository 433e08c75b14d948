//! The sandbox registry: which sandboxes exist, from which snapshot, until when, and the
//! zygote processes that own them. No HTTP here.
//!
//! Sandboxes outlive the daemon: each snapshot's zygote (`forkd __zygote`) is its own session,
//! not tied to the daemon's life, and owns its sandboxes' processes. The registry's records are
//! written atomically to `<state>/sandboxes.json`; a restarted daemon reads them, asks every
//! zygote it finds which sandboxes are still there, and keeps exactly those.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use forkd_sandbox::zygote::{
    SandboxInfo, ZygoteClient, ZygoteClientError, ZygoteReply, ZygoteRequest,
};
use forkd_store::{Store, StoreError, Tag};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How long a zygote may take to load its snapshot and answer.
const ZYGOTE_START_TIMEOUT: Duration = Duration::from_secs(60);

/// One sandbox, as the registry records it (and the API shows it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SandboxRecord {
    pub id: String,
    /// The snapshot it was forked from.
    pub tag: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Unix seconds after which it is killed and its files removed; none: it lives until
    /// deleted.
    pub expires_at: Option<u64>,
    /// The caller's labels, for filtering.
    pub metadata: BTreeMap<String, String>,
    /// Environment variables every command run in it gets.
    pub env: BTreeMap<String, String>,
    /// Its VMM process.
    pub pid: i32,
    /// Restore time measured inside its process.
    pub restore_ms: f64,
    #[serde(skip)]
    #[schema(ignore)]
    pub vsock_uds: PathBuf,
    #[serde(skip)]
    #[schema(ignore)]
    pub serial_log: PathBuf,
}

/// The registry's file form (paths included, unlike the API's).
#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    sandboxes: Vec<StoredSandbox>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSandbox {
    #[serde(flatten)]
    record: SandboxRecord,
    vsock_uds: PathBuf,
    serial_log: PathBuf,
}

/// What a create asks for.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub tag: Tag,
    pub count: usize,
    pub timeout: Option<Duration>,
    pub metadata: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
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
    sandboxes: Mutex<BTreeMap<String, SandboxRecord>>,
    /// One client per zygote, by tag; each behind its own lock so one snapshot's spawn does
    /// not hold up another's.
    zygotes: Mutex<BTreeMap<String, Arc<Mutex<ZygoteClient>>>>,
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
    ) -> Result<Registry, RegistryError> {
        let persist_err = |source| RegistryError::Persist {
            path: state_dir.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir.join("zygotes")).map_err(persist_err)?;
        std::fs::create_dir_all(state_dir.join("sandboxes")).map_err(persist_err)?;
        let registry = Registry {
            store,
            state_dir,
            forkd_exe,
            max_sandboxes,
            sandboxes: Mutex::new(BTreeMap::new()),
            zygotes: Mutex::new(BTreeMap::new()),
        };
        registry.adopt()?;
        Ok(registry)
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
        let stored: StateFile = std::fs::read(self.state_file())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut alive: BTreeMap<String, SandboxInfo> = BTreeMap::new();
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
                Ok((client, ZygoteReply::List { sandboxes })) => {
                    alive.extend(sandboxes.into_iter().map(|s| (s.id.clone(), s)));
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
            if alive.contains_key(&s.record.id) {
                let mut record = s.record;
                record.vsock_uds = s.vsock_uds;
                record.serial_log = s.serial_log;
                sandboxes.insert(record.id.clone(), record);
            } else {
                let _ = std::fs::remove_dir_all(self.run_root().join(&s.record.id));
            }
        }
        drop(sandboxes);
        self.persist()
    }

    /// Forks `request.count` sandboxes of `request.tag` through its zygote (started on first
    /// use).
    pub fn create(&self, request: CreateRequest) -> Result<Vec<SandboxRecord>, RegistryError> {
        let manifest = self.store.get(&request.tag)?.manifest;
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
        let reply = zygote
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .call(&ZygoteRequest::Spawn { ids })
            .map_err(|source| self.zygote_failed(&tag, source))?;
        let ZygoteReply::Spawned { started, failed } = reply else {
            return Err(RegistryError::Start {
                id: tag,
                message: format!("unexpected zygote reply {reply:?}"),
            });
        };
        let created_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let expires_at = request.timeout.map(|t| unix_now() + t.as_secs());
        let records: Vec<SandboxRecord> = started
            .into_iter()
            .map(|s| SandboxRecord {
                id: s.id,
                tag: tag.clone(),
                created_at: created_at.clone(),
                expires_at,
                metadata: request.metadata.clone(),
                env: request.env.clone(),
                pid: s.pid,
                restore_ms: s.restore_ms,
                vsock_uds: s.vsock_uds,
                serial_log: s.serial_log,
            })
            .collect();
        {
            let mut sandboxes = self.lock_sandboxes();
            for r in &records {
                sandboxes.insert(r.id.clone(), r.clone());
            }
        }
        self.persist()?;
        if forkd_sandbox::exec::snapshot_has_agent(&manifest) {
            self.send_restored(&records);
        }
        if let Some(f) = failed.into_iter().next() {
            for r in &records {
                let _ = self.delete(&r.id);
            }
            return Err(RegistryError::Start {
                id: f.id,
                message: f.error,
            });
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
                    if let Err(e) =
                        forkd_sandbox::exec::connect_restored_agent(&r.vsock_uds, deadline)
                    {
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
        let record = self.get(id)?;
        let tag = Tag::parse(&record.tag).map_err(StoreError::from)?;
        let manifest = self.store.get(&tag)?.manifest;
        forkd_sandbox::exec::require_agent(&manifest, what)?;
        Ok(record)
    }

    /// Stops a sandbox and removes its files.
    pub fn delete(&self, id: &str) -> Result<SandboxRecord, RegistryError> {
        let record = self.get(id)?;
        let zygote = self.zygote(&record.tag)?;
        let result = zygote
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .call(&ZygoteRequest::Stop { id: id.to_string() });
        match result {
            // Gone already (it stopped by itself): the record goes too.
            Ok(_) | Err(ZygoteClientError::Refused(_)) => {}
            Err(source) => return Err(self.zygote_failed(&record.tag, source)),
        }
        self.lock_sandboxes().remove(id);
        self.persist()?;
        Ok(record)
    }

    /// Sets a sandbox's timeout to `timeout` from now.
    pub fn set_timeout(&self, id: &str, timeout: Duration) -> Result<SandboxRecord, RegistryError> {
        let record = {
            let mut sandboxes = self.lock_sandboxes();
            let record = sandboxes
                .get_mut(id)
                .ok_or_else(|| RegistryError::UnknownSandbox(id.to_string()))?;
            record.expires_at = Some(unix_now() + timeout.as_secs());
            record.clone()
        };
        self.persist()?;
        Ok(record)
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

    fn persist(&self) -> Result<(), RegistryError> {
        let state = StateFile {
            sandboxes: self
                .lock_sandboxes()
                .values()
                .map(|r| StoredSandbox {
                    record: r.clone(),
                    vsock_uds: r.vsock_uds.clone(),
                    serial_log: r.serial_log.clone(),
                })
                .collect(),
        };
        let path = self.state_file();
        let bytes = serde_json::to_vec_pretty(&state).expect("records serialize");
        forkd_hub::publish::write_atomic(&path, &bytes).map_err(|e| RegistryError::Persist {
            path: path.clone(),
            source: std::io::Error::other(forkd_store::error_chain(&e)),
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
