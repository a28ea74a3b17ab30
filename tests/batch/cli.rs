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

/// The holder is another sdcap process, never a lock taken in this test process: the test harness
/// runs tests on parallel threads that spawn processes, and every child forked while this process
/// held the lock file open shared its open file description (and so the `flock`) until it called
/// exec. Dropping the lock here then left it held for a moment by some other test's child, and the
/// run that should succeed was refused "in use by another sdcap batch" (the flaky failure). A
/// holder in its own process has no such copies, and is gone once waited for.
#[test]
fn a_locked_directory_is_refused_with_one_line() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let jobs = write_jobs(dir.path(), "jobs.jsonl", &simple_jobs(2));
    let long = write_jobs(
        dir.path(),
        "long.jsonl",
        &[r#"{"prompt": "long", "seed": 9, "width": 128, "height": 128, "steps": 500}"#.into()],
    );
    let out_dir = dir.path().join("out");
    let mut holder = batch_command(&long, &out_dir, &[])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _lines = super::signals::wait_for_step(&mut holder, Some(0));
    let out = batch(&jobs, &out_dir, &[]);
    let pid = format!("(pid {})", holder.id());
    assert_cannot_start(
        &out,
        &["in use by another sdcap batch", ".sdcap.lock", &pid],
    );
    // A shard must be refused too while an unsharded run holds the directory.
    let out = batch(&jobs, &out_dir, &["--shard", "0/2"]);
    assert_cannot_start(&out, &["in use"]);
    assert_eq!(super::pngs(&out_dir).len(), 0);
    // SAFETY: signals our own child, not yet waited for.
    assert_eq!(unsafe { libc::kill(holder.id() as i32, libc::SIGTERM) }, 0);
    assert_eq!(holder.wait().unwrap().code(), Some(130));
    let out = batch(&jobs, &out_dir, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(super::pngs(&out_dir).len(), 2);
}

#[test]
fn an_output_path_that_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = write_jobs(dir.path(), "jobs.jsonl", &simple_jobs(1));
    let file = dir.path().join("taken");
    fs::write(&file, "x").unwrap();
    assert_cannot_start(&batch(&jobs, &file, &[]), &["taken", "cannot use it"]);
}
