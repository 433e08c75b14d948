//! `file_*` ops. Reads stream the file in chunks; writes go to a temporary file that is renamed
//! into place only when the upload is complete.

use std::fs::{self, DirBuilder, File, Metadata, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use serde_json::Value;

use super::{to_value, OpError, Replier, State, UploadMsg};
use crate::protocol::{
    DirEntry, ErrorCode, FileKind, FileListResult, FileMkdirRequest, FileMkdirResult,
    FileReadRequest, FileReadResult, FileRemoveRequest, FileRemoveResult, FileRenameRequest,
    FileStat, FileWriteRequest, FileWriteResult, Stream, CHUNK_LEN, MAX_LIST_ENTRIES,
};

fn non_empty<'a>(op: &str, path: &'a str) -> Result<&'a Path, OpError> {
    if path.is_empty() {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            format!("{op}: path is empty"),
        ));
    }
    Ok(Path::new(path))
}

pub(super) fn read(
    req: &FileReadRequest,
    replier: &Arc<Replier>,
) -> Result<FileReadResult, OpError> {
    let context = format!("file_read {}", req.path);
    let path = non_empty("file_read", &req.path)?;
    let mut file = File::open(path).map_err(|e| OpError::io(&context, &e))?;
    let meta = file.metadata().map_err(|e| OpError::io(&context, &e))?;
    if meta.is_dir() {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            format!("{context}: is a directory"),
        ));
    }
    if req.offset > 0 {
        file.seek(SeekFrom::Start(req.offset))
            .map_err(|e| OpError::io(&context, &e))?;
    }
    let mut source = file.take(req.length.unwrap_or(u64::MAX));
    let mut buf = vec![0u8; CHUNK_LEN];
    let mut size = 0u64;
    loop {
        let n = fill(&mut source, &mut buf).map_err(|e| OpError::io(&context, &e))?;
        if n == 0 {
            break;
        }
        replier
            .chunk(Stream::Data, &buf[..n])
            .map_err(|e| OpError::io(&context, &e))?;
        size += n as u64;
    }
    Ok(FileReadResult { size })
}

/// Reads until `buf` is full or the source ends, so chunks are full-sized.
fn fill<R: Read>(source: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match source.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Writes `first` (and, for a multi-frame upload, everything `more` delivers until `End`).
pub(super) fn write(
    state: &State,
    req: &FileWriteRequest,
    first: Vec<u8>,
    more: Option<Receiver<UploadMsg>>,
) -> Result<Value, OpError> {
    let context = format!("file_write {}", req.path);
    let target = non_empty("file_write", &req.path)?;
    target.file_name().ok_or_else(|| {
        OpError::new(
            ErrorCode::BadRequest,
            format!("{context}: path has no file name"),
        )
    })?;
    let mode = permission_bits(&context, req.mode.unwrap_or(0o644))?;
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if req.create_dirs {
        fs::create_dir_all(&dir).map_err(|e| OpError::io(&context, &e))?;
    }
    let upload_no = state.next_upload.fetch_add(1, Ordering::SeqCst);
    // Not derived from the target's name, so a target at NAME_MAX still gets a valid temp name.
    let temp = dir.join(format!(".forkd-upload.{}.{upload_no}", std::process::id()));
    let mut upload = TempUpload::create(temp, mode).map_err(|e| OpError::io(&context, &e))?;
    upload
        .file
        .write_all(&first)
        .map_err(|e| OpError::io(&context, &e))?;
    let mut size = first.len() as u64;
    if let Some(rx) = more {
        loop {
            match rx.recv() {
                Ok(UploadMsg::Chunk(data)) => {
                    upload
                        .file
                        .write_all(&data)
                        .map_err(|e| OpError::io(&context, &e))?;
                    size += data.len() as u64;
                }
                Ok(UploadMsg::End) => break,
                Err(_) => {
                    return Err(OpError::new(
                        ErrorCode::BadRequest,
                        format!("{context}: the connection closed before the upload's end frame; nothing written"),
                    ))
                }
            }
        }
    }
    upload
        .commit(target)
        .map_err(|e| OpError::io(&context, &e))?;
    Ok(to_value(&FileWriteResult { size }))
}

fn permission_bits(context: &str, mode: u32) -> Result<u32, OpError> {
    if mode > 0o7777 {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            format!("{context}: mode {mode:#o} has bits beyond 0o7777"),
        ));
    }
    Ok(mode)
}

/// A temporary file that is removed unless committed (renamed over the target).
struct TempUpload {
    path: PathBuf,
    file: File,
    committed: bool,
}

impl TempUpload {
    fn create(path: PathBuf, mode: u32) -> io::Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)?;
        // The umask may have cleared bits the client asked for.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        Ok(Self {
            path,
            file,
            committed: false,
        })
    }

    fn commit(mut self, target: &Path) -> io::Result<()> {
        self.file.sync_all()?;
        fs::rename(&self.path, target)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for TempUpload {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

pub(super) fn stat(path: &str) -> Result<FileStat, OpError> {
    let context = format!("file_stat {path}");
    let p = non_empty("file_stat", path)?;
    let meta = fs::symlink_metadata(p).map_err(|e| OpError::io(&context, &e))?;
    Ok(file_stat(p, &meta))
}

fn kind_of(meta: &Metadata) -> FileKind {
    let ft = meta.file_type();
    if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    }
}

fn file_stat(path: &Path, meta: &Metadata) -> FileStat {
    let kind = kind_of(meta);
    let link_target = if kind == FileKind::Symlink {
        fs::read_link(path)
            .ok()
            .map(|t| t.to_string_lossy().into_owned())
    } else {
        None
    };
    FileStat {
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        mtime_ms: meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000,
        uid: meta.uid(),
        gid: meta.gid(),
        link_target,
    }
}

pub(super) fn list(path: &str) -> Result<FileListResult, OpError> {
    let context = format!("file_list {path}");
    let dir = non_empty("file_list", path)?;
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(|e| OpError::io(&context, &e))?
        .filter_map(|entry| entry.ok().map(|e| e.file_name()))
        .collect();
    names.sort();
    let truncated = names.len() > MAX_LIST_ENTRIES;
    let entries = names
        .into_iter()
        .take(MAX_LIST_ENTRIES)
        .filter_map(|name| {
            let full = dir.join(&name);
            // An entry removed between readdir and lstat is simply not listed.
            let meta = fs::symlink_metadata(&full).ok()?;
            Some(DirEntry {
                name: name.to_string_lossy().into_owned(),
                stat: file_stat(&full, &meta),
            })
        })
        .collect();
    Ok(FileListResult { entries, truncated })
}

pub(super) fn remove(req: &FileRemoveRequest) -> Result<FileRemoveResult, OpError> {
    let context = format!("file_remove {}", req.path);
    let path = non_empty("file_remove", &req.path)?;
    let meta = fs::symlink_metadata(path).map_err(|e| OpError::io(&context, &e))?;
    let kind = kind_of(&meta);
    let removed = match kind {
        FileKind::Dir if req.recursive => fs::remove_dir_all(path),
        FileKind::Dir => fs::remove_dir(path).map_err(|e| {
            if e.kind() == io::ErrorKind::DirectoryNotEmpty {
                io::Error::new(
                    e.kind(),
                    "directory not empty (set recursive to remove it with its contents)",
                )
            } else {
                e
            }
        }),
        _ => fs::remove_file(path),
    };
    removed.map_err(|e| OpError::io(&context, &e))?;
    Ok(FileRemoveResult { kind })
}

/// Renames `from` to `to` (rename(2): within one filesystem, replacing a file at `to`).
pub(super) fn rename(req: &FileRenameRequest) -> Result<FileStat, OpError> {
    let context = format!("file_rename {} {}", req.from, req.to);
    let from = non_empty("file_rename", &req.from)?;
    let to = non_empty("file_rename", &req.to)?;
    fs::rename(from, to).map_err(|e| OpError::io(&context, &e))?;
    let meta = fs::symlink_metadata(to).map_err(|e| OpError::io(&context, &e))?;
    Ok(file_stat(to, &meta))
}

/// Creates a directory. `created` is decided by the final mkdir(2) itself rather than by a
/// check beforehand, so a directory made concurrently by someone else is never reported as ours.
pub(super) fn mkdir(req: &FileMkdirRequest) -> Result<FileMkdirResult, OpError> {
    let context = format!("file_mkdir {}", req.path);
    let path = non_empty("file_mkdir", &req.path)?;
    let mode = permission_bits(&context, req.mode.unwrap_or(0o755))?;
    let io_err = |e: io::Error| OpError::io(&context, &e);
    let created = match make_dir(path, mode) {
        Ok(()) => true,
        Err(e) if req.parents && e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => false,
        Err(e) if req.parents && e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(io_err)?;
            }
            make_dir(path, mode).map_err(io_err)?;
            true
        }
        Err(e) => return Err(io_err(e)),
    };
    let meta = fs::symlink_metadata(path).map_err(io_err)?;
    Ok(FileMkdirResult {
        created,
        stat: file_stat(path, &meta),
    })
}

/// mkdir(2) with exactly `mode`: the umask may have cleared bits the client asked for.
fn make_dir(path: &Path, mode: u32) -> io::Result<()> {
    DirBuilder::new().mode(mode).create(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}
