//! `sdcap batch`: job files, output naming, sharding, resume, signals, the lock, progress lines,
//! memory growth, and the swap-guide's example files. Whole runs use the shipped tiny model at
//! 64x64 with few steps, so each job takes a few tens of milliseconds.

#[path = "batch/cli.rs"]
mod cli;
#[path = "batch/guide.rs"]
mod guide;
#[path = "batch/jobfile.rs"]
mod jobfile;
#[path = "batch/runs.rs"]
mod runs;
#[path = "batch/shard.rs"]
mod shard;
#[path = "batch/signals.rs"]
mod signals;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sdcap::batch::results::{read_results, RESULTS_FILE};
use sdcap::batch::Record;

pub const BIN: &str = env!("CARGO_BIN_EXE_sdcap");

pub fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-sd.safetensors")
}

/// `sdcap batch JOBS --out DIR ARGS…` with, unless `ARGS` sets them, `-m tiny -W 64 -H 64
/// --steps 2 --progress json`; no sharding variables are inherited from wherever the tests run.
pub fn batch_command(jobs: &Path, out: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("batch").arg(jobs).arg("--out").arg(out).args(args);
    let tiny = tiny_model();
    let defaults = [
        ("-m", tiny.to_str().unwrap()),
        ("-W", "64"),
        ("-H", "64"),
        ("--steps", "2"),
        ("--progress", "json"),
    ];
    for (flag, value) in defaults {
        if !args.contains(&flag) {
            cmd.args([flag, value]);
        }
    }
    for var in [
        "JOB_COMPLETION_INDEX",
        "SDCAP_SHARD_COUNT",
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_ARRAY_TASK_MAX",
        "SLURM_ARRAY_TASK_STEP",
        "SLURM_ARRAY_TASK_COUNT",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

pub fn batch(jobs: &Path, out: &Path, args: &[&str]) -> Output {
    batch_command(jobs, out, args).output().expect("run sdcap")
}

pub fn write_jobs(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// `n` valid jobs with distinct prompts and seeds.
pub fn simple_jobs(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!(r#"{{"prompt": "job {i}", "seed": {}}}"#, 100 + i))
        .collect()
}

pub fn results(out: &Path) -> Vec<Record> {
    read_results(&out.join(RESULTS_FILE)).expect("results.jsonl readable")
}

/// Every PNG in `dir` by name, with its bytes.
pub fn pngs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read(&p).unwrap())
        })
        .collect()
}

/// Names in `dir` that a run must never leave behind: temporary PNGs.
pub fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The JSON progress lines of a run (every line must be one, but for a final error line).
pub fn events(out: &Output) -> Vec<serde_json::Value> {
    stderr(out)
        .lines()
        .filter(|l| !l.starts_with("sdcap: error: "))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}
