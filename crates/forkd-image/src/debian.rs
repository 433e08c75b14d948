//! Debian's package tools: apt-cache to resolve versions, apt-get download to fetch .debs (no
//! other network source), dpkg-deb -x to unpack them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::error::{Error, Result};

/// A package pinned to one version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AptPackage {
    pub name: String,
    pub version: String,
}

impl AptPackage {
    /// `name=version`, the form apt-get accepts.
    pub fn pinned(&self) -> String {
        format!("{}={}", self.name, self.version)
    }
}

/// Finds `tool` on PATH or fails naming the Debian package that provides it and why we need it.
pub fn require_tool(tool: &str, package: &str, why: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| Error::ToolMissing {
            tool: tool.to_string(),
            package: package.to_string(),
            why: why.to_string(),
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs a command, turning a non-zero exit into an error that quotes its stderr's last line.
pub(crate) fn run(cmd: &mut Command) -> Result<Output> {
    let command = format!("{cmd:?}").replace('"', "");
    tracing::debug!(%command, "running");
    let out = cmd.output().map_err(|e| Error::CommandFailed {
        command: command.clone(),
        status: "could not start".into(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(Error::CommandFailed {
            command,
            status: out.status.to_string(),
            stderr: error_summary(&out.stderr),
        });
    }
    Ok(out)
}

/// A failed tool's stderr as one line: its last non-empty line, preceded by the last earlier
/// line that looks like a cause (pip and apt print the reason before the final summary).
pub(crate) fn error_summary(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let Some((last, earlier)) = lines.split_last() else {
        return String::new();
    };
    let cause = earlier.iter().rev().find(|l| {
        ["error", "warning", "failed", "cannot", "couldn't", "unable"]
            .iter()
            .any(|w| l.to_ascii_lowercase().contains(w))
    });
    match cause {
        Some(cause) => format!("{cause} ... {last}"),
        None => last.to_string(),
    }
}

/// The last non-empty line of a tool's output.
pub(crate) fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The candidate (what `apt-get install` would pick) version of `package` and its Depends line.
pub fn candidate(package: &str) -> Result<(String, String)> {
    require_tool("apt-cache", "apt", "resolving Debian package versions")?;
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", package])
        .output()
        .map_err(|e| Error::Other(format!("cannot run apt-cache: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.trim().is_empty() {
        return Err(Error::AptUnknownPackage {
            package: package.to_string(),
        });
    }
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let version = field("Version:").ok_or_else(|| Error::AptMetadata {
        package: package.to_string(),
        why: "no Version field".into(),
    })?;
    Ok((version, field("Depends:").unwrap_or_default()))
}

/// The candidate version of `package`, pinned.
pub fn resolve(package: &str) -> Result<AptPackage> {
    let (version, _) = candidate(package)?;
    Ok(AptPackage {
        name: package.to_string(),
        version,
    })
}

/// The versioned package a metapackage depends on whose name starts with `prefix`, pinned to
/// the version the metapackage requires: linux-image-cloud-amd64 → linux-image-6.1.0-28-cloud-amd64.
pub fn resolve_metapackage(meta: &str, prefix: &str) -> Result<AptPackage> {
    let (_, depends) = candidate(meta)?;
    let dep = depends
        .split(',')
        .map(str::trim)
        .find(|d| d.starts_with(prefix))
        .ok_or_else(|| Error::AptMetadata {
            package: meta.to_string(),
            why: format!("no dependency starting with {prefix} in \"{depends}\""),
        })?;
    let (name, constraint) = match dep.split_once('(') {
        Some((n, c)) => (n.trim(), Some(c.trim_end_matches(')').trim())),
        None => (dep, None),
    };
    let version = match constraint.and_then(|c| c.strip_prefix('=')) {
        Some(v) => v.trim().to_string(),
        None => candidate(name)?.0,
    };
    Ok(AptPackage {
        name: name.to_string(),
        version,
    })
}

/// Downloads the pinned packages' .debs into `dir` with `apt-get download`; returns their paths
/// in the order given.
pub fn download(packages: &[AptPackage], dir: &Path) -> Result<Vec<PathBuf>> {
    require_tool("apt-get", "apt", "downloading Debian packages")?;
    let mut cmd = Command::new("apt-get");
    // As root apt drops to the _apt user for downloads, which cannot write our staging dir.
    cmd.args(["-q", "-o", "APT::Sandbox::User=root", "download"])
        .args(packages.iter().map(AptPackage::pinned))
        .current_dir(dir);
    run(&mut cmd)?;
    packages.iter().map(|p| find_deb(dir, p)).collect()
}

/// apt names files `<name>_<version with ':' as %3a>_<arch>.deb`.
fn find_deb(dir: &Path, package: &AptPackage) -> Result<PathBuf> {
    let prefix = format!("{}_{}_", package.name, package.version.replace(':', "%3a"));
    std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .ok_or_else(|| Error::AptMetadata {
            package: package.name.clone(),
            why: format!(
                "apt-get download left no {prefix}*.deb in {}",
                dir.display()
            ),
        })
}

/// Unpacks a .deb's files into `dest` (no maintainer scripts run).
pub fn extract(deb: &Path, dest: &Path) -> Result<()> {
    require_tool("dpkg-deb", "dpkg", "unpacking Debian packages")?;
    std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_summaries_keep_the_cause_and_the_last_line() {
        let pip = b"Collecting six\nWARNING: Retrying after SSLError(certificate verify failed)\n  detail\nERROR: No matching distribution found for six\n";
        assert_eq!(
            error_summary(pip),
            "WARNING: Retrying after SSLError(certificate verify failed) ... ERROR: No matching distribution found for six"
        );
        assert_eq!(error_summary(b"just this\n\n"), "just this");
        assert_eq!(error_summary(b""), "");
    }

    #[test]
    fn a_missing_tool_names_itself_and_its_package() {
        let err = require_tool("forkd-no-such-tool", "forkd-pkg", "testing").unwrap_err();
        assert_eq!(
            err.to_string(),
            "`forkd-no-such-tool` not found on PATH: testing (install the Debian package forkd-pkg)"
        );
    }

    #[test]
    fn apt_file_names_escape_epochs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("busybox-static_1%3a1.35.0-4_amd64.deb"),
            b"",
        )
        .unwrap();
        let p = AptPackage {
            name: "busybox-static".into(),
            version: "1:1.35.0-4".into(),
        };
        assert!(find_deb(dir.path(), &p).is_ok());
        let q = AptPackage {
            version: "1:1.36".into(),
            ..p
        };
        assert!(find_deb(dir.path(), &q)
            .unwrap_err()
            .to_string()
            .contains("busybox-static_1%3a1.36_"));
    }
}
