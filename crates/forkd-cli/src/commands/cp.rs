//! `forkd cp SRC DST`: one file between this machine and a sandbox, through the daemon, streamed
//! both ways. Exactly one side is `ID:/PATH`; the other is a local path or `-` (standard input
//! or output).

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::daemon_client::{query_value, DaemonClient, Streaming};

#[derive(Args)]
pub struct CpArgs {
    /// What to copy: a local file, `-` for standard input, or ID:/PATH in a sandbox.
    src: String,
    /// Where to: a local file or directory, `-` for standard output, or ID:/PATH in a sandbox
    /// (a path ending in `/` is a directory there). A local name with a colon is written
    /// `./NAME`.
    dst: String,
}

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    /// Standard input (as SRC) or output (as DST).
    Std,
    Local(PathBuf),
    Sandbox {
        id: String,
        path: String,
    },
}

impl Place {
    /// `ID:PATH` when the part before the first colon is a name (no slash), as docker cp reads
    /// its arguments; `-`; else a local path.
    fn parse(arg: &str) -> Place {
        if arg == "-" {
            return Place::Std;
        }
        match arg.split_once(':') {
            Some((id, path)) if !id.is_empty() && !id.contains('/') => Place::Sandbox {
                id: id.to_string(),
                path: path.to_string(),
            },
            _ => Place::Local(PathBuf::from(arg)),
        }
    }
}

pub fn run(args: CpArgs) -> Result<ExitCode> {
    match (Place::parse(&args.src), Place::parse(&args.dst)) {
        (Place::Sandbox { .. }, Place::Sandbox { .. }) => {
            bail!(
                "cp {} {}: both sides are in a sandbox; exactly one of SRC and DST is ID:/PATH",
                args.src,
                args.dst
            )
        }
        (Place::Sandbox { id, path }, local) => download(&id, &path, local),
        (local, Place::Sandbox { id, path }) => upload(local, &id, &path),
        _ => bail!(
            "cp {} {}: neither side is in a sandbox; exactly one of SRC and DST is ID:/PATH",
            args.src,
            args.dst
        ),
    }
}

fn upload(source: Place, id: &str, path: &str) -> Result<ExitCode> {
    let path = upload_target(&source, path)?;
    let what = || format!("cp to {id}:{path}");
    let (reader, length, mode): (Box<dyn io::Read + Send>, _, _) = match &source {
        Place::Local(local) => {
            let file = File::open(local)
                .with_context(|| format!("{}: cannot open {}", what(), local.display()))?;
            let meta = file.metadata().with_context(what)?;
            if meta.is_dir() {
                bail!(
                    "{}: {} is a directory; cp copies one file",
                    what(),
                    local.display()
                );
            }
            let mode = meta.permissions().mode() & 0o7777;
            (Box::new(file), Some(meta.len()), Some(mode))
        }
        _ => (Box::new(io::stdin()), None, None),
    };
    let mut query = format!("path={}", query_value(&path));
    if let Some(mode) = mode {
        query.push_str(&format!("&mode={mode:o}"));
    }
    let client = DaemonClient::from_env()?;
    client
        .send_stream(
            "PUT",
            &format!("/v1/sandboxes/{id}/files?{query}"),
            reader,
            length,
        )
        .and_then(|r| r.error_for_status())
        .with_context(what)?;
    Ok(ExitCode::SUCCESS)
}

/// The path in the sandbox: a directory (ending in `/`) gets the local file's name.
fn upload_target(source: &Place, path: &str) -> Result<String> {
    if !path.ends_with('/') {
        return Ok(path.to_string());
    }
    match source {
        Place::Local(local) => match local.file_name() {
            Some(name) => Ok(format!("{path}{}", name.to_string_lossy())),
            None => bail!("cp: {} names no file", local.display()),
        },
        _ => bail!("cp: standard input has no name; give the file's path in the sandbox, not a directory ({path})"),
    }
}

fn download(id: &str, path: &str, dest: Place) -> Result<ExitCode> {
    let what = format!("cp from {id}:{path}");
    let client = DaemonClient::from_env()?;
    let files = format!("/v1/sandboxes/{id}/files");
    let query = format!("path={}", query_value(path));
    // Stat first: a directory is refused by name, and the copy gets the file's mode.
    let stat = client
        .json("GET", &format!("{files}/stat?{query}"), None)
        .with_context(|| what.clone())?;
    if stat["kind"] == "dir" {
        bail!("{what}: is a directory; cp copies one file");
    }
    let mut response = client
        .send("GET", &format!("{files}?{query}"), None)?
        .error_for_status()
        .with_context(|| what.clone())?;
    match &dest {
        Place::Local(local) => {
            let mode = stat["mode"].as_u64().unwrap_or(0o644) as u32;
            save(&mut response, &download_target(local, path), mode)
        }
        _ => to_stdout(&mut response),
    }
    .with_context(|| what.clone())?;
    Ok(ExitCode::SUCCESS)
}

fn to_stdout(response: &mut Streaming<'_>) -> Result<()> {
    let mut out = io::stdout().lock();
    while let Some(chunk) = response.next_chunk()? {
        out.write_all(&chunk)?;
    }
    Ok(out.flush()?)
}

/// A local directory gets the sandbox file's name.
fn download_target(local: &Path, remote: &str) -> PathBuf {
    let name = Path::new(remote).file_name();
    match name {
        Some(name) if local.is_dir() => local.join(name),
        _ => local.to_path_buf(),
    }
}

/// Streams the body into a temporary file beside `target`, renamed over it only once it is
/// whole, so a failed copy leaves neither a partial file nor a clobbered old one.
fn save(response: &mut Streaming<'_>, target: &Path, mode: u32) -> Result<()> {
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut temp = tempfile::Builder::new()
        .prefix(".forkd-cp.")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    while let Some(chunk) = response.next_chunk()? {
        temp.write_all(&chunk)
            .with_context(|| format!("writing {}", target.display()))?;
    }
    temp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
        .with_context(|| format!("setting the mode of {}", target.display()))?;
    temp.persist(target)
        .with_context(|| format!("cannot write {}", target.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(id: &str, path: &str) -> Place {
        Place::Sandbox {
            id: id.into(),
            path: path.into(),
        }
    }

    #[test]
    fn sides_are_sandbox_paths_only_when_a_name_comes_before_the_colon() {
        assert_eq!(Place::parse("sb-1:/tmp/x"), sandbox("sb-1", "/tmp/x"));
        assert_eq!(Place::parse("sb-1:"), sandbox("sb-1", ""));
        assert_eq!(Place::parse("-"), Place::Std);
        for local in ["./a:b", "/tmp/a:b", "file.txt", ":x", "dir/sb:x"] {
            assert_eq!(Place::parse(local), Place::Local(local.into()), "{local}");
        }
    }

    #[test]
    fn directories_get_the_other_sides_file_name() {
        let local = Place::Local("/home/me/notes.txt".into());
        assert_eq!(upload_target(&local, "/root/").unwrap(), "/root/notes.txt");
        assert_eq!(upload_target(&local, "/root/n.txt").unwrap(), "/root/n.txt");
        assert!(upload_target(&Place::Std, "/root/").is_err());
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            download_target(dir.path(), "/etc/hostname"),
            dir.path().join("hostname")
        );
        let file = dir.path().join("copy");
        assert_eq!(download_target(&file, "/etc/hostname"), file);
    }
}
