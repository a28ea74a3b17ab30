//! The output directory's lock: two overlapping runs (a cron job that outlived its interval) never
//! work on the same jobs at once.
//!
//! `DIR/.sdcap.lock` is held with `flock`: exclusively by an unsharded run, shared by each shard, and
//! each shard also holds `DIR/.sdcap.shard-I-of-N.lock` exclusively. So shards of one batch run side
//! by side, while an unsharded run and any shard, or two copies of one shard, exclude each other.
//! The kernel drops the locks when the process ends however it ends, so a stale lock file is
//! harmless and is left in place. On NFS, Linux maps `flock` to NFS byte-range locks.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::shard::Shard;
use crate::error::{Error, Result};

pub const LOCK_FILE: &str = ".sdcap.lock";

/// Held locks; dropping it releases them.
#[derive(Debug)]
pub struct DirLock {
    _files: Vec<File>,
}

/// Takes the locks for `shard` in `dir`, or says who holds them.
pub fn lock_dir(dir: &Path, shard: Shard) -> Result<DirLock> {
    let main = open(&dir.join(LOCK_FILE))?;
    if shard.is_whole() {
        try_lock(&main, &dir.join(LOCK_FILE), false, dir)?;
        record_pid(&main);
        return Ok(DirLock { _files: vec![main] });
    }
    try_lock(&main, &dir.join(LOCK_FILE), true, dir)?;
    let own_path = dir.join(format!(
        ".sdcap.shard-{}-of-{}.lock",
        shard.index, shard.count
    ));
    let own = open(&own_path)?;
    try_lock(&own, &own_path, false, dir)?;
    record_pid(&own);
    Ok(DirLock {
        _files: vec![main, own],
    })
}

fn open(path: &PathBuf) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })
}

fn try_lock(file: &File, path: &Path, shared: bool, dir: &Path) -> Result<()> {
    let outcome = if shared {
        file.try_lock_shared()
    } else {
        file.try_lock()
    };
    match outcome {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .map_or(String::new(), |pid| format!(" (pid {pid})"));
            Err(Error::BadRequest(format!(
                "{} is in use by another sdcap batch{holder}, lock {}; wait for it to finish, or \
                 give this run another --out (shards of one batch may share it)",
                dir.display(),
                path.display()
            )))
        }
        Err(TryLockError::Error(source)) => Err(Error::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes our pid into an exclusively held lock file, for the message another run prints. Best
/// effort: the lock itself is what counts.
fn record_pid(mut file: &File) {
    let _ = file.set_len(0);
    let _ = writeln!(file, "{}", std::process::id());
}
