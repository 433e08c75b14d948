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
    if let Some(RestoreError::UnknownTag(tag)) = err.downcast_ref::<RestoreError>() {
        return Some(unknown_tag_hint(tag.as_str(), &existing_tags()));
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
        StoreError::NotFound(tag) => Some(unknown_tag_hint(tag.as_str(), &existing_tags())),
        StoreError::AlreadyExists(tag) => Some(format!(
            "remove it with `forkd rmi {tag}` or pick another tag"
        )),
        StoreError::HasDependents { .. } => {
            Some("--force orphans them, --cascade removes them too".into())
        }
        _ => None,
    }
}

/// The tags in the data directory (none when it cannot be read: the hint is best effort).
fn existing_tags() -> Vec<String> {
    crate::commands::open_store()
        .ok()
        .and_then(|store| store.list().ok())
        .into_iter()
        .flatten()
        .flatten()
        .map(|s| s.manifest.tag.to_string())
        .filter(|t| !t.starts_with('_'))
        .collect()
}

/// "did you mean" with the existing tags closest to `wanted` (one it starts, one containing
/// it, or a couple of typos away), then where to look.
fn unknown_tag_hint(wanted: &str, existing: &[String]) -> String {
    let mut close: Vec<(usize, &String)> = existing
        .iter()
        .filter_map(|tag| {
            let rank = if tag.starts_with(wanted) {
                0
            } else if tag.contains(wanted) || wanted.contains(tag.as_str()) {
                1
            } else if edit_distance(wanted, tag) <= 2 {
                2
            } else {
                return None;
            };
            Some((rank, tag))
        })
        .collect();
    close.sort();
    let names: Vec<&str> = close.iter().take(3).map(|(_, t)| t.as_str()).collect();
    match names.as_slice() {
        [] => SEE_IMAGES.into(),
        names => format!("did you mean {}? {SEE_IMAGES}", names.join(", ")),
    }
}

/// Levenshtein distance between two short strings.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
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

    #[test]
    fn an_unknown_tag_suggests_the_closest_existing_ones() {
        let tags: Vec<String> = ["langgraph-react", "python-numpy", "nodejs", "langgraph-x"]
            .map(String::from)
            .into();
        assert_eq!(
            unknown_tag_hint("langgraph", &tags),
            "did you mean langgraph-react, langgraph-x? see `forkd images`"
        );
        assert_eq!(
            unknown_tag_hint("pyhton-numpy", &tags),
            "did you mean python-numpy? see `forkd images`"
        );
        assert_eq!(unknown_tag_hint("postgres", &tags), "see `forkd images`");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "ab"), 2);
    }
}
