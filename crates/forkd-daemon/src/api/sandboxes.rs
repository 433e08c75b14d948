//! `/v1/sandboxes`: create N from a snapshot, list (filtered by tag and metadata), get,
//! delete, set the timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use forkd_store::Tag;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::{blocking, AppState};
use crate::registry::{CreateRequest, Registry, SandboxLimits, SandboxRecord};
use forkd_sandbox::zygote::NetRequest;

/// Most sandboxes one request creates.
pub const MAX_COUNT: u32 = 1000;
/// Longest timeout a sandbox can be given: 30 days.
pub const MAX_TIMEOUT_SECS: u64 = 30 * 24 * 3600;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxes {
    /// The snapshot to fork.
    pub tag: String,
    /// How many (1 to 1000).
    #[serde(default = "one")]
    pub count: u32,
    /// Seconds until each is killed and its files removed (default: until deleted).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Labels to filter by later.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Environment variables for every command run in them.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// cgroup v2 limits on each one's VMM process (refused with 422 where the host does not
    /// delegate the memory, cpu and pids controllers).
    #[serde(default)]
    pub limits: SandboxLimits,
    /// Their network (the snapshot needs a network device: 422 otherwise). A sandbox of a
    /// snapshot with one always gets its own network namespace; without this section it has
    /// the policy the snapshot recorded (none for a pulled snapshot: egress denied).
    #[serde(default)]
    pub network: Option<NetworkSpec>,
}

/// A sandbox's network, in the words of `forkd fork`'s options. Egress is denied unless
/// allowed; `allow` and `allow_dns` (either one given) replace the snapshot's recorded
/// policy, they do not add to it.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// What it may reach: `CIDR[:PORT]` (an address is a /32; the port, TCP and UDP, only
    /// when given), e.g. `10.1.2.0/24:443`. `[]`: nothing.
    #[serde(default)]
    #[schema(example = json!(["10.1.2.0/24:443"]))]
    pub allow: Option<Vec<String>>,
    /// It may reach the host's resolvers (TCP and UDP port 53).
    #[serde(default)]
    pub allow_dns: Option<bool>,
    /// Host TCP ports forwarded to its guest ports, `HOST_PORT:GUEST_PORT` (on every host
    /// address, loopback included). Only with a `count` of 1: a host port goes to one
    /// sandbox; one another sandbox has is refused with 409.
    #[serde(default)]
    #[schema(example = json!(["18080:8080"]))]
    pub publish: Vec<String>,
}

impl NetworkSpec {
    /// The checked request: every value parses (a 400 names the first that does not), no
    /// host port twice, publishing only to one sandbox.
    pub fn check(self, count: u32) -> Result<NetRequest, ApiError> {
        let named = |field: &str, e: forkd_sandbox::net::ParseError| {
            ApiError::bad_request(format!("network.{field} {:?}: {}", e.value, e.why))
        };
        let sets_policy = self.allow.is_some() || self.allow_dns.is_some();
        let allow = self.allow.unwrap_or_default();
        forkd_sandbox::net::parse_allows(&allow).map_err(|e| named("allow", e))?;
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.publish {
            let parsed: forkd_sandbox::net::Publish = p.parse().map_err(|e| named("publish", e))?;
            if !seen.insert(parsed.host_port) {
                return Err(ApiError::bad_request(format!(
                    "network.publish: host port {} is given twice",
                    parsed.host_port
                )));
            }
        }
        if !self.publish.is_empty() && count != 1 {
            return Err(ApiError::bad_request(format!(
                "network.publish forwards a host port to one sandbox; count is {count}"
            )));
        }
        Ok(NetRequest {
            policy: sets_policy.then(|| forkd_store::NetRecord {
                allow,
                allow_dns: self.allow_dns.unwrap_or(false),
            }),
            publish: self.publish,
        })
    }
}

fn one() -> u32 {
    1
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<SandboxRecord>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetTimeout {
    /// Seconds from now until it is killed.
    pub timeout_secs: u64,
}

/// Forks `count` sandboxes of a snapshot; answers once every one is running.
#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes",
    request_body = CreateSandboxes,
    responses((status = 201, description = "Running", body = SandboxList),
              (status = 400, description = "Malformed request", body = ErrorBody),
              (status = 404, description = "No such snapshot", body = ErrorBody),
              (status = 409, description = "A host port to publish is another sandbox's (`port_taken`)", body = ErrorBody),
              (status = 422, description = "Limits asked of a host without cgroup v2 controllers (`limits_unsupported`), a network of a snapshot without a network device (`no_network_device`)", body = ErrorBody),
              (status = 429, description = "The daemon's sandbox limit", body = ErrorBody)))]
pub async fn create_sandboxes(
    State(state): State<Arc<AppState>>,
    body: Result<Json<CreateSandboxes>, JsonRejection>,
) -> Result<(StatusCode, Json<SandboxList>), ApiError> {
    let Json(body) = body.map_err(|e| ApiError::from_json_rejection(&e))?;
    let request = check_create(body)?;
    let registry = state.registry.clone();
    let started = std::time::Instant::now();
    let sandboxes = blocking(move || registry.create(request))
        .await?
        .inspect_err(|_| {
            state.metrics.spawn_failures.inc();
        })?;
    state
        .metrics
        .created(started.elapsed(), sandboxes.iter().map(|s| s.restore_ms));
    Ok((StatusCode::CREATED, Json(SandboxList { sandboxes })))
}

pub(crate) fn check_create(body: CreateSandboxes) -> Result<CreateRequest, ApiError> {
    let tag = Tag::parse(&body.tag).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if !(1..=MAX_COUNT).contains(&body.count) {
        return Err(ApiError::bad_request(format!(
            "count {} is not between 1 and {MAX_COUNT}",
            body.count
        )));
    }
    let timeout = body.timeout_secs.map(check_timeout).transpose()?;
    for key in body.metadata.keys() {
        if key.is_empty() || key.len() > 64 || key.contains(['=', '&']) {
            return Err(ApiError::bad_request(format!(
                "metadata key {key:?} is empty, longer than 64 bytes, or contains '=' or '&'"
            )));
        }
    }
    for (key, value) in &body.env {
        if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
            return Err(ApiError::bad_request(format!(
                "environment variable {key:?} has an empty name or contains '=' or a NUL byte"
            )));
        }
    }
    check_limits(&body.limits)?;
    let network = body.network.map(|n| n.check(body.count)).transpose()?;
    Ok(CreateRequest {
        tag,
        count: body.count as usize,
        timeout,
        metadata: body.metadata,
        env: body.env,
        limits: body.limits,
        network,
    })
}

/// Limits a VMM process can live within: memory 16 MiB to 1 TiB, 0.01 to 1024 CPUs, 16 to a
/// million tasks (its vCPU, device and control threads count).
fn check_limits(limits: &SandboxLimits) -> Result<(), ApiError> {
    let bad = |what: String| Err(ApiError::bad_request(what));
    if let Some(mib) = limits.memory_mib.filter(|m| !(16..=1 << 20).contains(m)) {
        return bad(format!(
            "limits.memory_mib {mib} is not between 16 and 1048576"
        ));
    }
    if let Some(cpus) = limits.cpus.filter(|c| !(0.01..=1024.0).contains(c)) {
        return bad(format!("limits.cpus {cpus} is not between 0.01 and 1024"));
    }
    if let Some(pids) = limits.pids.filter(|p| !(16..=1_000_000).contains(p)) {
        return bad(format!("limits.pids {pids} is not between 16 and 1000000"));
    }
    Ok(())
}

pub(crate) fn check_timeout(secs: u64) -> Result<Duration, ApiError> {
    seconds_within(secs, MAX_TIMEOUT_SECS)
}

/// A `timeout_secs` of a request: 1 to `max`, else a 400 naming both bounds.
pub(super) fn seconds_within(secs: u64, max: u64) -> Result<Duration, ApiError> {
    if (1..=max).contains(&secs) {
        Ok(Duration::from_secs(secs))
    } else {
        Err(ApiError::bad_request(format!(
            "timeout_secs {secs} is not between 1 and {max}"
        )))
    }
}

/// The sandboxes, optionally only those of one snapshot (`tag=`) and with given labels
/// (`metadata.KEY=VALUE`, repeatable: all must match).
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    params(("tag" = Option<String>, Query, description = "Only this snapshot's sandboxes"),
           ("metadata.KEY" = Option<String>, Query, description = "Only those labelled KEY=VALUE")),
    responses((status = 200, description = "The sandboxes", body = SandboxList),
              (status = 400, description = "Unknown filter", body = ErrorBody)))]
pub async fn list_sandboxes(
    State(state): State<Arc<AppState>>,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json<SandboxList>, ApiError> {
    let Query(filters) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let filter = Filter::parse(filters, false)?;
    let sandboxes = filter.select(state.registry.list());
    Ok(Json(SandboxList { sandboxes }))
}

/// Which sandboxes a list or a bulk delete means: `tag=`, `metadata.KEY=VALUE` (all must
/// match) and, for a delete, `all=true` to mean every one.
#[derive(Debug, Default)]
struct Filter {
    tag: Option<String>,
    labels: Vec<(String, String)>,
    all: bool,
}

impl Filter {
    fn parse(query: BTreeMap<String, String>, delete: bool) -> Result<Filter, ApiError> {
        let mut filter = Filter::default();
        for (key, value) in query {
            match (key.as_str(), key.strip_prefix("metadata.")) {
                ("tag", _) => filter.tag = Some(value),
                ("all", _) if delete => {
                    filter.all = value.parse().map_err(|_| {
                        ApiError::bad_request(format!("all={value:?} is not true or false"))
                    })?
                }
                (_, Some(label)) if !label.is_empty() => {
                    filter.labels.push((label.to_string(), value))
                }
                _ => {
                    let known = if delete {
                        "tag, metadata.KEY, all"
                    } else {
                        "tag, metadata.KEY"
                    };
                    return Err(ApiError::bad_request(format!(
                        "unknown filter {key:?} (filters: {known})"
                    )));
                }
            }
        }
        if delete && !filter.all && filter.tag.is_none() && filter.labels.is_empty() {
            return Err(ApiError::bad_request(
                "a bulk delete needs a filter (tag=, metadata.KEY=) or all=true",
            ));
        }
        Ok(filter)
    }

    fn select(&self, sandboxes: Vec<SandboxRecord>) -> Vec<SandboxRecord> {
        sandboxes
            .into_iter()
            .filter(|s| self.tag.as_ref().is_none_or(|t| &s.tag == t))
            .filter(|s| {
                self.labels
                    .iter()
                    .all(|(k, v)| s.metadata.get(k) == Some(v))
            })
            .collect()
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeletedSandboxes {
    pub deleted: Vec<String>,
    /// Those that could not be deleted, with why.
    pub failed: Vec<DeleteFailure>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeleteFailure {
    pub id: String,
    pub error: String,
}

/// Kills every sandbox that matches the filters (`all=true`: every sandbox).
#[utoipa::path(delete, path = "/v1/sandboxes", tag = "sandboxes",
    params(("tag" = Option<String>, Query, description = "Only this snapshot's sandboxes"),
           ("metadata.KEY" = Option<String>, Query, description = "Only those labelled KEY=VALUE"),
           ("all" = Option<bool>, Query, description = "Every sandbox (needed when no other filter is given)")),
    responses((status = 200, description = "What was deleted", body = DeletedSandboxes),
              (status = 400, description = "No filter, or an unknown one", body = ErrorBody)))]
pub async fn delete_sandboxes(
    State(state): State<Arc<AppState>>,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json<DeletedSandboxes>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let filter = Filter::parse(query, true)?;
    let chosen = filter.select(state.registry.list());
    let registry = state.registry.clone();
    let results = blocking(move || {
        chosen
            .into_iter()
            .map(|s| (s.id.clone(), registry.delete(&s.id)))
            .collect::<Vec<_>>()
    })
    .await?;
    let mut out = DeletedSandboxes {
        deleted: Vec::new(),
        failed: Vec::new(),
    };
    for (id, result) in results {
        match result {
            Ok(_) => out.deleted.push(id),
            Err(e) => out.failed.push(DeleteFailure {
                id,
                error: forkd_store::error_chain(&e),
            }),
        }
    }
    Ok(Json(out))
}

/// One sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "The sandbox's id")),
    responses((status = 200, description = "The sandbox", body = SandboxRecord),
              (status = 404, description = "No such sandbox", body = ErrorBody)))]
pub async fn get_sandbox(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<SandboxRecord>, ApiError> {
    Ok(Json(state.registry.get(&id)?))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeletedSandbox {
    pub deleted: String,
}

/// Kills a sandbox and removes its files.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "The sandbox's id")),
    responses((status = 200, description = "Deleted", body = DeletedSandbox),
              (status = 404, description = "No such sandbox", body = ErrorBody)))]
pub async fn delete_sandbox(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<DeletedSandbox>, ApiError> {
    let registry: Arc<Registry> = state.registry.clone();
    let record = blocking(move || registry.delete(&id)).await??;
    Ok(Json(DeletedSandbox { deleted: record.id }))
}

/// Sets when a sandbox is killed: `timeout_secs` from now.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/timeout", tag = "sandboxes",
    params(("id" = String, Path, description = "The sandbox's id")),
    request_body = SetTimeout,
    responses((status = 200, description = "The sandbox with its new expiry", body = SandboxRecord),
              (status = 400, description = "Malformed request", body = ErrorBody),
              (status = 404, description = "No such sandbox", body = ErrorBody)))]
pub async fn set_timeout(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Result<Json<SetTimeout>, JsonRejection>,
) -> Result<Json<SandboxRecord>, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::from_json_rejection(&e))?;
    let timeout = check_timeout(body.timeout_secs)?;
    Ok(Json(state.registry.set_timeout(&id, timeout)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> NetworkSpec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_network_section_sets_a_policy_only_when_it_names_one() {
        let checked = spec(serde_json::json!({"publish": ["18080:8080"]}))
            .check(1)
            .unwrap();
        assert_eq!(checked.policy, None, "ports alone keep the recorded policy");
        assert_eq!(checked.publish, ["18080:8080"]);
        let checked = spec(serde_json::json!({"allow_dns": true}))
            .check(3)
            .unwrap();
        let policy = checked.policy.unwrap();
        assert!(
            policy.allow.is_empty() && policy.allow_dns,
            "it replaces, not adds"
        );
        let checked = spec(serde_json::json!({"allow": []})).check(1).unwrap();
        assert_eq!(checked.policy.unwrap(), forkd_store::NetRecord::default());
    }

    #[test]
    fn bad_network_values_are_one_line_naming_them() {
        for (json, count, needle) in [
            (
                serde_json::json!({"allow": ["10.0.0.0/33"]}),
                1,
                "network.allow \"10.0.0.0/33\": prefix length \"33\" is not 0-32",
            ),
            (
                serde_json::json!({"publish": ["80:0"]}),
                1,
                "network.publish \"80:0\": port \"0\" is not 1-65535",
            ),
            (
                serde_json::json!({"publish": ["80:1", "80:2"]}),
                1,
                "host port 80 is given twice",
            ),
            (
                serde_json::json!({"publish": ["80:1"]}),
                2,
                "forwards a host port to one sandbox; count is 2",
            ),
        ] {
            let err = spec(json.clone()).check(count).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{json}");
            assert!(err.message.contains(needle), "{json}: {}", err.message);
            assert!(!err.message.contains('\n'));
        }
        assert!(serde_json::from_value::<NetworkSpec>(serde_json::json!({"allw": []})).is_err());
    }

    #[test]
    fn timeouts_are_bounded_on_both_sides() {
        assert_eq!(seconds_within(1, 10).unwrap(), Duration::from_secs(1));
        assert_eq!(seconds_within(10, 10).unwrap(), Duration::from_secs(10));
        for bad in [0, 11, u64::MAX] {
            let err = seconds_within(bad, 10).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert_eq!(
                err.message,
                format!("timeout_secs {bad} is not between 1 and 10")
            );
        }
    }
}
