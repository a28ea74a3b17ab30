//! A batch that cannot start: exit 2, one `sdcap: error:` line, nothing generated.

use std::fs;
use std::path::Path;
use std::process::Output;

use super::{batch, batch_command, simple_jobs, stderr, write_jobs, BIN};

fn assert_cannot_start(out: &Output, want: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line, got {err:?}");
    assert!(lines[0].starts_with("sdcap: error: "), "{err:?}");
    for w in want {
        assert!(lines[0].contains(w), "expected {w:?} in {err:?}");
    }
}

fn no_png(dir: &Path) {
    let n = fs::read_dir(dir)
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "png")
            })
            .count()
        })
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing may be generated");
}

#[test]
fn help_lists_batch_and_its_flags() {
    let out = std::process::Command::new(BIN)
        .args(["batch", "--help"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--out",
        "--shard",
        "--shard-count",
        "--progress",
        "--model",
        "--steps",
        "--sampling-method",
        "JOB_COMPLETION_INDEX",
        "SLURM_ARRAY_TASK_ID",
    ] {
        assert!(text.contains(flag), "missing {flag} in help:\n{text}");
    }
    let out = std::process::Command::new(BIN)
        .args(["generate", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--progress") && text.contains("json"),
        "{text}"
    );
}

#[test]
fn missing_or_empty_job_file() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = batch(&dir.path().join("nope.jsonl"), &out_dir, &[]);
    assert_cannot_start(&out, &["nope.jsonl", "cannot read job file"]);
    let empty = write_jobs(dir.path(), "empty.jsonl", &["".into(), "  ".into()]);
    let out = batch(&empty, &out_dir, &[]);
    assert_cannot_start(&out, &["no jobs"]);
    no_png(&out_dir);
}

#[test]
fn bad_shard_settings() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = write_jobs(dir.path(), "jobs.jsonl", &simple_jobs(2));
    let out_dir = dir.path().join("out");
    assert_cannot_start(&batch(&jobs, &out_dir, &["--shard", "3/3"]), &["shard"]);
    let out = batch_command(&jobs, &out_dir, &[])
        .env("JOB_COMPLETION_INDEX", "1")
        .output()
        .unwrap();
    assert_cannot_start(&out, &["JOB_COMPLETION_INDEX", "--shard-count"]);
    let out = batch_command(&jobs, &out_dir, &[])
        .env("SLURM_ARRAY_TASK_ID", "5")
        .env("SLURM_ARRAY_TASK_MIN", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "3")
        .output()
        .unwrap();
    assert_cannot_start(&out, &["SLURM_ARRAY_TASK_ID"]);
    no_png(&out_dir);
}

#[test]
fn missing_model_or_bad_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = write_jobs(dir.path(), "jobs.jsonl", &simple_jobs(2));
    let out_dir = dir.path().join("out");
    let missing = dir.path().join("missing.safetensors");
    let out = batch(&jobs, &out_dir, &["-m", missing.to_str().unwrap()]);
    assert_cannot_start(&out, &["missing.safetensors", "not found"]);
    let out = batch(&jobs, &out_dir, &["-W", "500"]);
    assert_cannot_start(&out, &["width 500"]);
    no_png(&out_dir);
}

#[test]
fn a_locked_directory_is_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = write_jobs(dir.path(), "jobs.jsonl", &simple_jobs(2));
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    // Another run, as far as flock is concerned.
    let held = fs::File::create(out_dir.join(".sdcap.lock")).unwrap();
    held.try_lock().unwrap();
    let out = batch(&jobs, &out_dir, &[]);
    assert_cannot_start(&out, &["in use by another sdcap batch", ".sdcap.lock"]);
    // A shard must be refused too while an unsharded run holds the directory.
    let out = batch(&jobs, &out_dir, &["--shard", "0/2"]);
    assert_cannot_start(&out, &["in use"]);
    no_png(&out_dir);
    drop(held);
    let out = batch(&jobs, &out_dir, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn an_output_path_that_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = write_jobs(dir.path(), "jobs.jsonl", &simple_jobs(1));
    let file = dir.path().join("taken");
    fs::write(&file, "x").unwrap();
    assert_cannot_start(&batch(&jobs, &file, &[]), &["taken", "cannot use it"]);
}
