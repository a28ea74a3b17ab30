//! `DIR/results.jsonl`: one JSON line per job per run, appended.
//!
//! ```text
//! {"job":1,"line":2,"shard":"0/1","status":"ok","output":"out/000001-dfb4e449a56b.png","seconds":24.884,"peak_mib":1737.3,"rss_mib":39.4,"error":null,"planned_mib":1759.5,"unix_time":1795377333}
//! ```
//!
//! The file is a log, never rewritten: a rerun appends `skipped` lines for outputs already there, so
//! a job's current state is its last line. All shards of a batch append to the same file; each line
//! goes in under an exclusive `flock` on the file, opened `O_APPEND`, so lines from concurrent
//! shards never interleave, on a local disk or NFS alike.
//!
//! Memory figures: `peak_mib` is `VmHWM` from `/proc/self/status`, the peak resident set, reset
//! before each job by writing `5` to `/proc/self/clear_refs` so that it is this job's peak (model
//! loading included for the first job of a model); where the kernel refuses the reset it is the
//! peak since the batch started. `rss_mib` is the resident set (`/proc/self/statm`) once the job's
//! buffers are freed and handed back (`malloc_trim`): what the process carries into the next job.
//! Both count the mapped model pages that are resident, as `ps` and `top` do.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::governor::memory;

pub const RESULTS_FILE: &str = "results.jsonl";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Generated and written.
    Ok,
    /// Not run or not finished because of this job (bad line, bad model, write error).
    Failed,
    /// Its output was already there (an earlier run finished it).
    Skipped,
    /// Abandoned by SIGTERM/SIGINT; no file was written, the next run does it.
    Interrupted,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// The job's 0-based index among the job file's jobs.
    pub job: usize,
    /// Its 1-based line in the job file.
    pub line: usize,
    /// `I/N` of the shard that ran it.
    pub shard: String,
    pub status: Status,
    /// The PNG's path (`DIR/name`); `null` when the line is not a valid job.
    pub output: Option<String>,
    /// Wall time of the job: generation and writing, the model load for the first job of a model.
    pub seconds: f64,
    pub peak_mib: Option<f64>,
    pub rss_mib: Option<f64>,
    pub error: Option<String>,
    /// The memory governor's predicted peak for the job (`ok` jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned_mib: Option<f64>,
    /// `true` when the job failed because it cannot fit the RAM cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over_cap: Option<bool>,
    /// When the line was written, seconds since 1970.
    pub unix_time: u64,
}

/// The results file, open for appending.
pub struct ResultsLog {
    file: File,
    path: PathBuf,
}

impl ResultsLog {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(RESULTS_FILE);
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        // Under the lock the appends take, so no shard is halfway through a line of its own.
        file.lock().map_err(io)?;
        let repaired = drop_torn_line(&file);
        let unlocked = file.unlock();
        repaired.map_err(io)?;
        unlocked.map_err(io)?;
        Ok(ResultsLog { file, path })
    }

    pub fn append(&mut self, record: &Record) -> Result<()> {
        let mut line = serde_json::to_string(record).expect("a record always serialises");
        line.push('\n');
        let io = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        self.file.lock().map_err(io)?;
        let written = self.file.write_all(line.as_bytes());
        let unlocked = self.file.unlock();
        written.map_err(io)?;
        unlocked.map_err(io)
    }
}

/// A run killed in the middle of an append leaves a last line without its newline; the next
/// record would be glued to it and both lost. The fragment is cut off (every whole line stays), so
/// the file remains valid JSON Lines.
fn drop_torn_line(file: &File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0u8; 64 << 10];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            let whole = start + i as u64 + 1;
            if whole == len {
                return Ok(());
            }
            return file.set_len(whole);
        }
        end = start;
    }
    // No newline at all: the file holds only a fragment.
    if len > 0 {
        file.set_len(0)?;
    }
    Ok(())
}

/// Reads a results file back (for tests and tools); lines that do not parse are skipped.
pub fn read_results(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Resets the process's peak RSS (`VmHWM`); false where the kernel does not allow it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// `VmHWM` in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    memory::peak_rss_bytes().map(to_mib)
}

/// `VmRSS` in MiB.
pub fn rss_mib() -> Option<f64> {
    memory::rss_bytes().map(to_mib)
}

/// To MiB with one decimal (0.1 MiB is far below any difference that matters here).
pub fn to_mib(bytes: u64) -> f64 {
    (bytes as f64 / (1024.0 * 102.4)).round() / 10.0
}

pub fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repaired(content: &[u8]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RESULTS_FILE), content).unwrap();
        drop(ResultsLog::open(dir.path()).unwrap());
        std::fs::read(dir.path().join(RESULTS_FILE)).unwrap()
    }

    #[test]
    fn a_torn_last_line_is_cut_whole_lines_stay() {
        assert_eq!(repaired(b""), b"");
        assert_eq!(repaired(b"{\"a\":1}\n"), b"{\"a\":1}\n");
        assert_eq!(
            repaired(b"{\"a\":1}\n{\"b\":2}\n{\"c\":"),
            b"{\"a\":1}\n{\"b\":2}\n"
        );
        assert_eq!(repaired(b"{\"job\":0,\"li"), b"");
        // A fragment longer than one read-back chunk.
        let mut long = b"{\"a\":1}\n".to_vec();
        long.extend(std::iter::repeat_n(b'x', 200_000));
        assert_eq!(repaired(&long), b"{\"a\":1}\n");
    }
}
