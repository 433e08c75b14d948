//! The audit log: one JSON line per request (time, client, method, path, status, latency),
//! appended to a file that SIGHUP reopens (so logrotate can move it away).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

/// One request, as the audit log records it.
#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    pub time: String,
    /// `unix` for the Unix socket, else the peer's address.
    pub client: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub latency_ms: f64,
}

impl AuditLog {
    pub fn open(path: PathBuf) -> std::io::Result<AuditLog> {
        let file = Self::open_file(&path)?;
        Ok(AuditLog {
            path,
            file: Mutex::new(file),
        })
    }

    fn open_file(path: &PathBuf) -> std::io::Result<File> {
        OpenOptions::new().create(true).append(true).open(path)
    }

    /// Opens the path again (after the file was moved away); on failure keeps the old file.
    pub fn reopen(&self) {
        match Self::open_file(&self.path) {
            Ok(file) => *self.file.lock().unwrap_or_else(|e| e.into_inner()) = file,
            Err(e) => tracing::error!("audit log {}: cannot reopen: {e}", self.path.display()),
        }
    }

    pub fn record(&self, client: &str, method: &str, path: &str, status: u16, latency: Duration) {
        let record = AuditRecord {
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            client,
            method,
            path,
            status,
            latency_ms: latency.as_secs_f64() * 1e3,
        };
        let mut line = serde_json::to_vec(&record).unwrap_or_default();
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(&line) {
            tracing::error!("audit log {}: {e}", self.path.display());
        }
    }
}
