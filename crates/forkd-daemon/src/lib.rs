//! `forkd serve`: one process that owns sandboxes and serves forkd's REST API over a Unix
//! socket (and optionally TCP, with a bearer token, over TLS when given a certificate).
//!
//! The layers, each ignorant of the one above it:
//! - [`config`]: what to listen on, the token, the audit log, limits.
//! - [`server`]: the listeners, graceful stop (SIGTERM/SIGINT), SIGHUP reopening the audit log.
//! - [`tls`]: HTTPS for the TCP listener (rustls, ring provider).
//! - [`api`]: HTTP only — routing, authentication, request parsing, the one mapping of engine
//!   errors to HTTP statuses, and the OpenAPI document derived from the handlers.
//!
//! The engine (store, VMM, sandbox manager) knows nothing of HTTP; the API calls it.

pub mod api;
mod audit;
pub mod config;
pub mod e2b;
pub mod jobs;
pub mod registry;
pub mod server;
pub mod tls;

pub use config::{default_socket_path, DaemonConfig};
pub use server::{serve, DaemonError};
