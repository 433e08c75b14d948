//! Finding the static forkd-agent binary that goes into images.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::debian::{last_line, run};
use crate::error::{Error, Result};

/// The agent crate's script that builds a static binary and prints its path last.
pub const BUILD_STATIC_SCRIPT: &str = "crates/forkd-agent/build-static.sh";

/// Where the agent comes from, in order: `explicit` (e.g. `--agent`), `FORKD_AGENT_BIN`, else
/// built with the agent crate's build-static.sh in the first forkd checkout found at or above
/// one of `search_from` (the recipe's directory, the current directory).
pub fn resolve_agent(explicit: Option<&Path>, search_from: &[&Path]) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return existing(path, "--agent");
    }
    if let Some(env) = std::env::var_os("FORKD_AGENT_BIN").filter(|v| !v.is_empty()) {
        return existing(Path::new(&env), "FORKD_AGENT_BIN");
    }
    let repo = search_from
        .iter()
        .flat_map(|start| start.ancestors())
        .find(|dir| dir.join(BUILD_STATIC_SCRIPT).is_file())
        .ok_or_else(|| {
            Error::Other(
                "no forkd-agent binary: pass --agent PATH or set FORKD_AGENT_BIN (or run inside \
                 the forkd repository, whose crates/forkd-agent/build-static.sh builds one)"
                    .into(),
            )
        })?;
    tracing::info!(repo = %repo.display(), "building a static forkd-agent");
    let out = run(Command::new("sh")
        .arg(BUILD_STATIC_SCRIPT)
        .current_dir(repo))?;
    let printed = PathBuf::from(last_line(&out.stdout));
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty());
    existing(
        &built_path(repo, &printed, target_dir.as_deref().map(Path::new)),
        BUILD_STATIC_SCRIPT,
    )
}

/// The script prints `target/<triple>/release/forkd-agent`, relative to the checkout; when
/// CARGO_TARGET_DIR moves the target directory (scripts/lib.sh does) the binary is there.
fn built_path(repo: &Path, printed: &Path, target_dir: Option<&Path>) -> PathBuf {
    let in_repo = repo.join(printed);
    if in_repo.is_file() {
        return in_repo;
    }
    match (target_dir, printed.strip_prefix("target")) {
        (Some(dir), Ok(rest)) => repo.join(dir).join(rest),
        _ => in_repo,
    }
}

fn existing(path: &Path, from: &str) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        Err(Error::Other(format!(
            "agent binary {} (from {from}) does not exist",
            path.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_agent_must_exist_and_a_missing_checkout_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve_agent(Some(&dir.path().join("nope")), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope (from --agent) does not exist"), "{err}");
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"x").unwrap();
        assert_eq!(resolve_agent(Some(&agent), &[]).unwrap(), agent);
        if std::env::var_os("FORKD_AGENT_BIN").is_none() {
            let err = resolve_agent(None, &[dir.path()]).unwrap_err().to_string();
            assert!(err.starts_with("no forkd-agent binary"), "{err}");
        }
    }

    #[test]
    fn a_moved_target_directory_is_followed() {
        let repo = tempfile::tempdir().unwrap();
        let moved = tempfile::tempdir().unwrap();
        let bin = moved
            .path()
            .join("x86_64-unknown-linux-musl/release/forkd-agent");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::write(&bin, b"bin").unwrap();
        let printed = Path::new("target/x86_64-unknown-linux-musl/release/forkd-agent");
        assert_eq!(built_path(repo.path(), printed, Some(moved.path())), bin);
        assert_eq!(
            built_path(repo.path(), printed, None),
            repo.path().join(printed)
        );
        // A binary in the checkout's own target/ wins.
        std::fs::create_dir_all(repo.path().join(printed).parent().unwrap()).unwrap();
        std::fs::write(repo.path().join(printed), b"bin").unwrap();
        assert_eq!(
            built_path(repo.path(), printed, Some(moved.path())),
            repo.path().join(printed)
        );
    }

    #[test]
    fn the_build_script_is_run_and_its_last_line_taken() {
        let repo = tempfile::tempdir().unwrap();
        let script = repo.path().join(BUILD_STATIC_SCRIPT);
        std::fs::create_dir_all(script.parent().unwrap()).unwrap();
        std::fs::write(&script, "echo building >&2\necho noise\necho out/agent\n").unwrap();
        std::fs::create_dir_all(repo.path().join("out")).unwrap();
        std::fs::write(repo.path().join("out/agent"), b"bin").unwrap();
        let nested = repo.path().join("recipes");
        std::fs::create_dir_all(&nested).unwrap();
        if std::env::var_os("FORKD_AGENT_BIN").is_none() {
            assert_eq!(
                resolve_agent(None, &[&nested]).unwrap(),
                repo.path().join("out/agent")
            );
        }
    }
}
