//! Files that appear whole or not at all: written to a hidden temporary file beside the target,
//! synced, then moved into place. On any error (or a panic) the temporary file is removed, so an
//! interrupted run never leaves a partial output, and a file already there is kept.
//!
//! The target must be a regular file or not exist yet: a device node, FIFO, socket or directory at
//! that path is refused (renaming over `/dev/null` would replace it). A symbolic link is followed:
//! the file it points to is replaced, atomically in that file's directory, and the link stays.
//!
//! Temporary files are named `.NAME.PID.N.tmp` and held under an exclusive `flock` while written.
//! One left behind by a process that was killed (SIGKILL, the OOM killer) is removed by the next
//! [`PendingFile::create`] in that directory, once its owner is gone: no process with that PID
//! exists here and nobody holds its lock (a writer on another host of a shared filesystem does).

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
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

/// Symbolic links followed before giving up (Linux's own limit).
const MAX_LINKS: usize = 40;

/// Creates a temporary file beside `target`, lets `write` fill it, syncs it and moves it to `target`.
pub fn write_atomically<T>(
    target: &Path,
    existing: Existing,
    write: impl FnOnce(&File) -> Result<T>,
) -> Result<T> {
    let pending = PendingFile::create(target, existing)?;
    let value = write(pending.file())?;
    pending.commit()?;
    Ok(value)
}

/// An output whose temporary file exists: created before the work that fills it, so an output
/// that cannot be written (read-only or missing directory, a device at the path) is refused before
/// anything runs. Dropped without [`commit`](Self::commit), it removes the temporary file.
pub struct PendingFile {
    /// Where the file goes: the target with symbolic links resolved.
    target: PathBuf,
    /// The path as given, for messages.
    shown: PathBuf,
    existing: Existing,
    file: File,
    guard: TempGuard,
}

impl PendingFile {
    /// Checks `target` (see the module doc), removes stale temporary files of ours beside it, and
    /// creates this run's temporary file. A target that cannot be used, or a directory where no
    /// file can be created, is `Error::BadRequest` (exit 2).
    pub fn create(target: &Path, existing: Existing) -> Result<Self> {
        let resolved = resolve_target(target)?;
        if existing == Existing::Keep && fs::symlink_metadata(&resolved).is_ok() {
            return Err(already_exists(target));
        }
        let dir = parent_dir(&resolved).to_path_buf();
        let name = resolved.file_name().expect("resolve_target checked it");
        remove_stale_temps(&dir);
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
                Error::BadRequest(format!(
                    "cannot write {}: cannot create a file in {}: {e}",
                    target.display(),
                    dir.display()
                ))
            })?;
        let guard = TempGuard(Some(tmp));
        // Marks the file as being written (see `remove_stale_temps`); the lock goes with the file.
        // Best effort: a filesystem without locks still has the PID check.
        let _ = file.try_lock();
        Ok(PendingFile {
            target: resolved,
            shown: target.to_path_buf(),
            existing,
            file,
            guard,
        })
    }

    /// The output's path as given.
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// The temporary file, to be filled.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Syncs the temporary file and moves it into place.
    pub fn commit(self) -> Result<()> {
        let PendingFile {
            target,
            shown,
            existing,
            file,
            guard,
        } = self;
        file.sync_all().map_err(|source| Error::Io {
            path: shown.clone(),
            source,
        })?;
        drop(file);
        place(guard.path(), &target, &shown, existing)?;
        guard.disarm();
        // Makes the rename durable. Best effort: some filesystems refuse to sync a directory.
        if let Ok(d) = File::open(parent_dir(&target)) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Where an output at `target` is written: `target` itself when it is a regular file or does not
/// exist (in an existing directory), else the file its symbolic link(s) point to. Anything else is
/// refused with `Error::BadRequest`; nothing is opened (a FIFO would block).
pub fn resolve_target(target: &Path) -> Result<PathBuf> {
    let bad = |what: String| Error::BadRequest(format!("output {}: {what}", target.display()));
    let mut path = target.to_path_buf();
    for _ in 0..MAX_LINKS {
        if path.file_name().is_none() {
            return Err(bad("has no file name".into()));
        }
        let meta = match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let dir = parent_dir(&path);
                return if dir.is_dir() {
                    Ok(path)
                } else {
                    Err(Error::BadRequest(format!(
                        "output directory {} does not exist (create it first)",
                        dir.display()
                    )))
                };
            }
            Err(e) => return Err(bad(format!("cannot read it: {e}"))),
            Ok(meta) => meta,
        };
        let kind = meta.file_type();
        if kind.is_symlink() {
            let link = fs::read_link(&path).map_err(|e| bad(format!("cannot read link: {e}")))?;
            path = parent_dir(&path).join(link);
        } else if kind.is_file() {
            return Ok(path);
        } else if kind.is_dir() {
            return Err(bad(format!(
                "is a directory; give a file name such as {}",
                path.join("output.png").display()
            )));
        } else {
            let what = if path == target {
                kind_name(&kind).to_string()
            } else {
                format!("a link to {}, {}", path.display(), kind_name(&kind))
            };
            return Err(bad(format!(
                "is {what}, not a regular file; refusing to replace it"
            )));
        }
    }
    Err(bad(format!("more than {MAX_LINKS} symbolic links")))
}

fn kind_name(kind: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn already_exists(target: &Path) -> Error {
    Error::BadRequest(format!(
        "output {} already exists (pass --force to replace it)",
        target.display()
    ))
}

/// Removes temporary files of ours in `dir` whose writer is gone. Best effort: a file that cannot
/// be inspected or removed is left alone.
pub fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = temp_owner(&entry.file_name()) else {
            continue;
        };
        if pid == std::process::id() || process_exists(pid) {
            continue;
        }
        // Only regular files, opened without following a link.
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let path = entry.path();
        let Ok(file) = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        else {
            continue;
        };
        // Held by a live writer elsewhere (another PID namespace or host): keep it.
        if file.try_lock().is_err() {
            continue;
        }
        let _ = fs::remove_file(&path);
    }
}

/// The PID in a name of the form `.NAME.PID.N.tmp` (NAME not empty, PID and N decimal), else None.
fn temp_owner(name: &OsStr) -> Option<u32> {
    let name = name.to_str()?;
    let inner = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (rest, counter) = inner.rsplit_once('.')?;
    let (stem, pid) = rest.rsplit_once('.')?;
    let decimal = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if stem.is_empty() || !decimal(counter) || !decimal(pid) {
        return None;
    }
    pid.parse().ok().filter(|&p| p > 0)
}

/// Whether a process with this PID exists in our PID namespace (EPERM: it exists, not ours).
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists; nothing is delivered.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Moves the finished temporary file to `target`.
fn place(tmp: &Path, target: &Path, shown: &Path, existing: Existing) -> Result<()> {
    let io_err = |e: io::Error, what: &str| Error::Io {
        path: shown.to_path_buf(),
        source: io::Error::new(e.kind(), format!("cannot {what} {}: {e}", tmp.display())),
    };
    if existing == Existing::Keep {
        // A link fails rather than replace a file that appeared since the caller's check.
        match fs::hard_link(tmp, target) {
            Ok(()) => return fs::remove_file(tmp).map_err(|e| io_err(e, "remove")),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(already_exists(shown))
            }
            // A filesystem without hard links: fall back to a checked rename.
            Err(_) if fs::symlink_metadata(target).is_err() => {}
            Err(e) => return Err(io_err(e, "link")),
        }
    } else {
        // Something else may have appeared at the path meanwhile; never rename over it.
        resolve_target(shown)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_of_ours_only() {
        let owner = |s: &str| temp_owner(OsStr::new(s));
        assert_eq!(owner(".out.png.1234.0.tmp"), Some(1234));
        assert_eq!(owner(".a.b.png.7.12.tmp"), Some(7));
        assert_eq!(owner(".model.gguf.99.3.tmp"), Some(99));
        for other in [
            "out.png.1234.0.tmp",
            "..1234.0.tmp",
            ".out.png.12x.0.tmp",
            ".out.png.1234..tmp",
            ".out.png.1234.0.tmp.bak",
            ".out.png.0.0.tmp",
            ".tmp",
            ".x.tmp",
        ] {
            assert_eq!(owner(other), None, "{other}");
        }
    }

    #[test]
    fn our_own_pid_exists_and_an_impossible_one_does_not() {
        assert!(process_exists(std::process::id()));
        // Above Linux's PID_MAX_LIMIT (2^22).
        assert!(!process_exists(4_999_999));
    }
}
