//! Files that appear whole or not at all: written to a hidden temporary file beside the target,
//! synced, then moved into place. On any error (or a panic) the temporary file is removed, so an
//! interrupted run never leaves a partial output, and a file already there is kept.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};

/// What to do when the target already exists at the moment of moving into place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    Replace,
    /// Fail with `Error::BadRequest` (checked atomically with a hard link where the filesystem has them).
    Keep,
}

/// Creates a temporary file beside `target`, lets `write` fill it, syncs it and moves it to `target`.
pub fn write_atomically<T>(
    target: &Path,
    existing: Existing,
    write: impl FnOnce(&File) -> Result<T>,
) -> Result<T> {
    let io_err = |source: io::Error| Error::Io {
        path: target.to_path_buf(),
        source,
    };
    let name = target.file_name().ok_or_else(|| {
        io_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "output path has no file name",
        ))
    })?;
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(io_err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("directory {} does not exist", dir.display()),
        )));
    }
    // Unique per process and call, so concurrent writers (batch shards) never share a temp file.
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| {
            io_err(io::Error::new(
                e.kind(),
                format!("cannot create temporary file {}: {e}", tmp.display()),
            ))
        })?;
    let guard = TempGuard(Some(tmp));
    let value = write(&file)?;
    file.sync_all().map_err(io_err)?;
    drop(file);
    place(guard.path(), target, existing)?;
    guard.disarm();
    // Makes the rename durable. Best effort: some filesystems refuse to sync a directory.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(value)
}

/// Moves the finished temporary file to `target`.
fn place(tmp: &Path, target: &Path, existing: Existing) -> Result<()> {
    let io_err = |e: io::Error, what: &str| Error::Io {
        path: target.to_path_buf(),
        source: io::Error::new(e.kind(), format!("cannot {what} {}: {e}", tmp.display())),
    };
    if existing == Existing::Keep {
        // A link fails rather than replace a file that appeared since the caller's check.
        match fs::hard_link(tmp, target) {
            Ok(()) => return fs::remove_file(tmp).map_err(|e| io_err(e, "remove")),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(Error::BadRequest(format!(
                    "output {} already exists (pass --force to replace it)",
                    target.display()
                )))
            }
            // A filesystem without hard links: fall back to a checked rename.
            Err(_) if !target.exists() => {}
            Err(e) => return Err(io_err(e, "link")),
        }
    }
    fs::rename(tmp, target).map_err(|e| io_err(e, "rename into place"))
}

/// Removes the temporary file unless disarmed (every error path, and a panic).
struct TempGuard(Option<PathBuf>);

impl TempGuard {
    fn path(&self) -> &Path {
        self.0.as_deref().expect("guard is armed")
    }

    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}
