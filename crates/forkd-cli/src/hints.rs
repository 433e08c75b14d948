//! What to do next, for errors the user can act on from the command line.
//!
//! Engine errors name the problem only (a daemon maps the same errors to HTTP statuses, where
//! "run `forkd rmi`" means nothing); the CLI adds the command to type, once, at the edge.

use forkd_sandbox::exec::AgentError;
use forkd_store::StoreError;
use forkd_vmm::snapshot::RestoreError;

/// The hint for the first error in `err`'s chain that has one.
pub fn for_error(err: &anyhow::Error) -> Option<String> {
    err.chain().find_map(hint)
}

/// `err` rendered on one line for the terminal: its chain, then its hint in parentheses.
pub fn render(err: &anyhow::Error) -> String {
    match for_error(err) {
        Some(hint) => format!("{err:#} ({hint})"),
        None => format!("{err:#}"),
    }
}

fn hint(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(e) = store_error(err) {
        return store_hint(e);
    }
    if let Some(RestoreError::UnknownTag(_)) = err.downcast_ref::<RestoreError>() {
        return Some(SEE_IMAGES.into());
    }
    if let Some(AgentError::NoAgentInSnapshot { .. }) = agent_error(err) {
        return Some(
            "snapshot a Linux guest: forkd snapshot --kernel VMLINUZ --rootfs IMAGE".into(),
        );
    }
    None
}

/// The store error `err` is, or wraps transparently (a transparent wrapper is not a separate
/// link of the chain, so the store error is only reachable through it).
fn store_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a StoreError> {
    use forkd_hub::HubError;
    use forkd_vmm::snapshot::{BootSnapshotError, SnapshotError};
    if let Some(e) = err.downcast_ref::<StoreError>() {
        return Some(e);
    }
    if let Some(RestoreError::Store(e)) = err.downcast_ref::<RestoreError>() {
        return Some(e);
    }
    if let Some(SnapshotError::Store(e)) = err.downcast_ref::<SnapshotError>() {
        return Some(e);
    }
    if let Some(HubError::Store(e)) = err.downcast_ref::<HubError>() {
        return Some(e);
    }
    match err.downcast_ref::<BootSnapshotError>()? {
        BootSnapshotError::Store(e) => Some(e),
        BootSnapshotError::Snapshot(e) => store_error(e),
        _ => None,
    }
}

/// The agent error `err` is, or wraps transparently.
fn agent_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a AgentError> {
    match err.downcast_ref::<forkd_sandbox::run::RunError>() {
        Some(forkd_sandbox::run::RunError::Agent(e)) => Some(e),
        _ => err.downcast_ref::<AgentError>(),
    }
}

const SEE_IMAGES: &str = "see `forkd images`";

fn store_hint(err: &StoreError) -> Option<String> {
    match err {
        StoreError::NotFound(_) => Some(SEE_IMAGES.into()),
        StoreError::AlreadyExists(tag) => Some(format!(
            "remove it with `forkd rmi {tag}` or pick another tag"
        )),
        StoreError::HasDependents { .. } => {
            Some("--force orphans them, --cascade removes them too".into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkd_store::Tag;

    #[test]
    fn store_errors_get_the_command_that_resolves_them() {
        let tag = Tag::parse("web").unwrap();
        let err = anyhow::Error::new(StoreError::NotFound(tag.clone())).context("forking");
        assert_eq!(
            render(&err),
            "forking: no snapshot tagged \"web\" (see `forkd images`)"
        );
        let err = anyhow::Error::new(StoreError::AlreadyExists(tag));
        assert!(render(&err).ends_with("(remove it with `forkd rmi web` or pick another tag)"));
        let plain = anyhow::anyhow!("disk full");
        assert_eq!(render(&plain), "disk full");
    }
}
