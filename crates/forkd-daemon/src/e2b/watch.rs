//! envd's directory watchers, made from directory listings through the agent: each poll
//! lists the directory again and reports what was created, written, removed or had its mode
//! changed since the last one. The sync SDK polls itself (`CreateWatcher`,
//! `GetWatcherEvents`, `RemoveWatcher`); the async SDK's `WatchDir` stream is polled here,
//! every [`STREAM_POLL`]. A change undone between two polls is not seen; a rename shows as a
//! remove and a create.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::Response;
use forkd_agent::client::ClientError;
use forkd_sandbox::exec::AgentConn;
use serde::Deserialize;
use serde_json::json;

use super::connect::{self, ConnectError};
use super::envd::{list_entries, EntryInfo, Target, MAX_DEPTH};

/// How often a `WatchDir` stream lists its directory again.
pub const STREAM_POLL: Duration = Duration::from_millis(250);

/// Watcher ids: unique per daemon (a watcher is only found through its own sandbox).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The watchers of every sandbox, by id.
#[derive(Default)]
pub struct Watchers {
    by_id: Mutex<HashMap<String, Watcher>>,
}

struct Watcher {
    sandbox: String,
    dir: String,
    depth: u32,
    seen: Listing,
}

/// What a listing says about each path under the watched directory: kind, size, mtime, mode.
pub type Listing = BTreeMap<String, (&'static str, u64, String, u32)>;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateMessage {
    pub path: String,
    #[serde(default)]
    pub recursive: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatcherMessage {
    pub watcher_id: String,
}

fn listing(client: &mut AgentConn, dir: &str, depth: u32) -> Result<Listing, ClientError> {
    Ok(list_entries(client, dir, depth)?
        .into_iter()
        .map(|e: EntryInfo| {
            let relative = e.path[dir.trim_end_matches('/').len()..]
                .trim_start_matches('/')
                .to_string();
            (relative, (e.kind, e.size, e.modified_time, e.mode))
        })
        .collect())
}

/// The depth a watch lists to, and its first listing.
pub fn first_listing(
    client: &mut AgentConn,
    dir: &str,
    recursive: bool,
) -> Result<(u32, Listing), ClientError> {
    let depth = if recursive { MAX_DEPTH } else { 1 };
    Ok((depth, listing(client, dir, depth)?))
}

/// `WatchDir`: `start`, then each change as a `filesystem` event, until the client goes away
/// (or the directory does: the stream ends with the agent's error).
pub fn stream(
    mut client: AgentConn,
    dir: String,
    (depth, mut seen): (u32, Listing),
    headers: &HeaderMap,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel(32);
    let _ = tx.try_send(connect::envelope(0, &json!({ "start": {} })));
    tokio::task::spawn_blocking(move || loop {
        std::thread::sleep(STREAM_POLL);
        if tx.is_closed() {
            return;
        }
        let now = match listing(&mut client, &dir, depth) {
            Ok(now) => now,
            Err(e) => {
                let code = match e.code() {
                    Some(forkd_agent::protocol::ErrorCode::NotFound) => "not_found",
                    _ => "unavailable",
                };
                let error = ConnectError::new(code, format!("watching {dir}: {e}"));
                let _ = tx.blocking_send(connect::stream_error(&error));
                return;
            }
        };
        for event in changes(&seen, &now) {
            let frame = connect::envelope(0, &json!({ "filesystem": event }));
            if tx.blocking_send(frame).is_err() {
                return;
            }
        }
        seen = now;
    });
    connect::server_stream(rx, headers, json!({ "keepalive": {} }), ())
}

/// E2B's filesystem events between two listings, in path order.
fn changes(before: &Listing, after: &Listing) -> Vec<serde_json::Value> {
    let event = |name: &str, kind: &str| json!({ "name": name, "type": kind });
    let mut events = Vec::new();
    for (name, now) in after {
        match before.get(name) {
            None => events.push(event(name, "EVENT_TYPE_CREATE")),
            Some(was) if (was.0, was.1, &was.2) != (now.0, now.1, &now.2) => {
                events.push(event(name, "EVENT_TYPE_WRITE"))
            }
            Some(was) if was.3 != now.3 => events.push(event(name, "EVENT_TYPE_CHMOD")),
            Some(_) => {}
        }
    }
    for name in before.keys().filter(|n| !after.contains_key(*n)) {
        events.push(event(name, "EVENT_TYPE_REMOVE"));
    }
    events
}

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watcher>> {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lists the directory once and keeps the listing as the watcher's starting point.
    pub fn create(
        &self,
        target: &Target,
        client: &mut AgentConn,
        dir: String,
        recursive: bool,
    ) -> Result<serde_json::Value, ClientError> {
        let (depth, seen) = first_listing(client, &dir, recursive)?;
        let id = format!("w-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
        self.lock().insert(
            id.clone(),
            Watcher {
                sandbox: target.id.clone(),
                dir,
                depth,
                seen,
            },
        );
        Ok(json!({ "watcherId": id }))
    }

    /// The watched directory and depth of a watcher of `target`'s sandbox.
    pub fn find(&self, target: &Target, id: &str) -> Result<(String, u32), ConnectError> {
        self.lock()
            .get(id)
            .filter(|w| w.sandbox == target.id)
            .map(|w| (w.dir.clone(), w.depth))
            .ok_or_else(|| ConnectError::new("not_found", format!("watcher {id} not found")))
    }

    /// Lists again and answers what changed since the last poll.
    pub fn poll(
        &self,
        id: &str,
        client: &mut AgentConn,
        dir: &str,
        depth: u32,
    ) -> Result<serde_json::Value, ClientError> {
        let now = listing(client, dir, depth)?;
        let mut watchers = self.lock();
        let Some(watcher) = watchers.get_mut(id) else {
            return Ok(json!({ "events": [] }));
        };
        let events = changes(&watcher.seen, &now);
        watcher.seen = now;
        Ok(json!({ "events": events }))
    }

    pub fn remove(&self, target: &Target, id: &str) -> Result<serde_json::Value, ConnectError> {
        self.find(target, id)?;
        self.lock().remove(id);
        Ok(json!({}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_differ_by_create_write_chmod_and_remove() {
        let entry = |size, mode| ("FILE_TYPE_FILE", size, "t".to_string(), mode);
        let before: Listing = [
            ("a".into(), entry(1, 0o644)),
            ("b".into(), entry(1, 0o644)),
            ("c".into(), entry(1, 0o644)),
        ]
        .into();
        let after: Listing = [
            ("a".into(), entry(2, 0o644)),
            ("b".into(), entry(1, 0o600)),
            ("d".into(), entry(1, 0o644)),
        ]
        .into();
        let events = changes(&before, &after);
        let pairs: Vec<(&str, &str)> = events
            .iter()
            .map(|e| (e["name"].as_str().unwrap(), e["type"].as_str().unwrap()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("a", "EVENT_TYPE_WRITE"),
                ("b", "EVENT_TYPE_CHMOD"),
                ("d", "EVENT_TYPE_CREATE"),
                ("c", "EVENT_TYPE_REMOVE")
            ]
        );
        assert!(changes(&after, &after).is_empty());
    }
}
