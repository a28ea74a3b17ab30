//! Whole batches on the tiny model: failures, resume, shards, progress lines, memory growth.

use std::collections::BTreeSet;
use std::fs;
use std::process::Stdio;

use sdcap::batch::Status;

use super::{
    batch, batch_command, events, leftovers, pngs, results, simple_jobs, stderr, tiny_model,
    write_jobs,
};

#[test]
fn bad_jobs_are_recorded_and_the_rest_run() {
    let dir = tempfile::tempdir().unwrap();
    let lines = vec![
        r#"{"prompt": "fine", "seed": 1}"#.to_string(),
        r#"{"prompt": "odd size", "width": 500}"#.to_string(),
        r#"{"prompt": "typo", "sede": 3}"#.to_string(),
        r#"{"prompt": "no such sampler", "sampler": "ipndm"}"#.to_string(),
        r#"{"prompt": "missing model", "model": "nowhere.safetensors"}"#.to_string(),
        "{broken".to_string(),
        r#"{"prompt": "also fine", "seed": 2, "sampler": "dpm++2m", "cfg": 1}"#.to_string(),
    ];
    let jobs = write_jobs(dir.path(), "jobs.jsonl", &lines);
    let out_dir = dir.path().join("out");
    let out = batch(&jobs, &out_dir, &[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));

    let recs = results(&out_dir);
    assert_eq!(recs.len(), 7, "one line per job");
    let by_job = |i: usize| recs.iter().find(|r| r.job == i).unwrap();
    for (i, status) in [(0, Status::Ok), (6, Status::Ok)] {
        let r = by_job(i);
        assert_eq!(r.status, status);
        let path = r.output.as_ref().unwrap();
        assert!(fs::metadata(path).unwrap().len() > 0);
        assert!(r.peak_mib.unwrap() > 1.0 && r.rss_mib.unwrap() > 1.0);
    }
    for (i, reason) in [
        (1, "width 500"),
        (2, "unknown field `sede`"),
        (3, "ipndm"),
        (4, "nowhere.safetensors"),
        (5, "not a valid job"),
    ] {
        let r = by_job(i);
        assert_eq!(r.status, Status::Failed, "job {i}");
        assert!(
            r.error.as_ref().unwrap().contains(reason),
            "job {i}: {:?}",
            r.error
        );
        assert_eq!(r.line, i + 1);
    }
    assert_eq!(pngs(&out_dir).len(), 2);
    let summary = events(&out).pop().unwrap();
    assert_eq!(summary["event"], "summary");
    assert_eq!(
        (summary["ok"].as_u64(), summary["failed"].as_u64()),
        (Some(2), Some(5))
    );
}

#[test]
fn a_rerun_skips_finished_outputs_and_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = write_jobs(dir.path(), "jobs.jsonl", &simple_jobs(4));
    let out_dir = dir.path().join("out");
    assert_eq!(batch(&jobs, &out_dir, &[]).status.code(), Some(0));
    let first = pngs(&out_dir);
    assert_eq!(first.len(), 4);
    // Lose one output: the rerun makes exactly that one again, the same bytes.
    let lost = first.keys().nth(2).unwrap().clone();
    fs::remove_file(out_dir.join(&lost)).unwrap();
    let out = batch(&jobs, &out_dir, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(pngs(&out_dir), first);
    let second: Vec<_> = results(&out_dir).into_iter().skip(4).collect();
    let statuses: Vec<Status> = second.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == Status::Skipped).count(),
        3
    );
    assert_eq!(statuses.iter().filter(|s| **s == Status::Ok).count(), 1);
    let remade = second.iter().find(|r| r.status == Status::Ok).unwrap();
    assert!(remade.output.as_ref().unwrap().ends_with(&lost));
    assert!(leftovers(&out_dir).is_empty());
}

/// Three shards at once, each told its index another way, give the same files, bit for bit, as
/// one unsharded run; each model is loaded once per shard.
#[test]
fn three_concurrent_shards_equal_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let second_model = dir.path().join("tiny-copy.safetensors");
    fs::copy(tiny_model(), &second_model).unwrap();
    let samplers = ["euler_a", "euler", "dpm++2m", "ddim", "lcm"];
    let lines: Vec<String> = (0..10)
        .map(|i| {
            let model = if i % 4 == 3 {
                r#", "model": "tiny-copy.safetensors""#
            } else {
                ""
            };
            format!(
                r#"{{"prompt": "shard test {i}", "seed": {i}, "sampler": "{}"{model}}}"#,
                samplers[i % samplers.len()]
            )
        })
        .collect();
    let jobs = write_jobs(dir.path(), "jobs.jsonl", &lines);

    let single = dir.path().join("single");
    let out = batch(&jobs, &single, &["-t", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let sharded = dir.path().join("sharded");
    let by_flag = batch_command(&jobs, &sharded, &["--shard", "0/3", "-t", "1"]);
    let mut by_k8s = batch_command(&jobs, &sharded, &["-t", "1"]);
    by_k8s
        .env("JOB_COMPLETION_INDEX", "1")
        .env("SDCAP_SHARD_COUNT", "3");
    let mut by_slurm = batch_command(&jobs, &sharded, &["-t", "1"]);
    by_slurm
        .env("SLURM_ARRAY_TASK_ID", "3")
        .env("SLURM_ARRAY_TASK_MIN", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "3");
    let children: Vec<_> = [by_flag, by_k8s, by_slurm]
        .iter_mut()
        .map(|c| c.stderr(Stdio::piped()).spawn().unwrap())
        .collect();
    for (k, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "shard {k}: {}", stderr(&out));
        let ev = events(&out);
        let start = ev.iter().find(|e| e["event"] == "batch_start").unwrap();
        assert_eq!(start["shard"], format!("{k}/3"));
        let loads = ev.iter().filter(|e| e["event"] == "load").count();
        let models = if (0..10).any(|i| i % 3 == k && i % 4 == 3) {
            2
        } else {
            1
        };
        assert_eq!(loads, models, "shard {k}: each model once");
    }

    let a = pngs(&single);
    assert_eq!(a.len(), 10);
    assert_eq!(
        pngs(&sharded),
        a,
        "sharded outputs must equal the single run's"
    );
    let recs = results(&sharded);
    assert_eq!(recs.len(), 10);
    let jobs_seen: BTreeSet<usize> = recs.iter().map(|r| r.job).collect();
    assert_eq!(jobs_seen.len(), 10);
    for r in &recs {
        assert_eq!(r.shard, format!("{}/3", r.job % 3));
        assert_eq!(r.status, Status::Ok);
    }
}

#[test]
fn json_progress_follows_each_job() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = write_jobs(dir.path(), "jobs.jsonl", &simple_jobs(2));
    let out = batch(&jobs, &dir.path().join("out"), &["--steps", "3"]);
    assert_eq!(out.status.code(), Some(0));
    let ev = events(&out);
    let kinds: Vec<&str> = ev.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds[0], "batch_start");
    assert_eq!(kinds[1], "load");
    assert_eq!(*kinds.last().unwrap(), "summary");
    for job in 0..2u64 {
        let mine: Vec<&serde_json::Value> = ev.iter().filter(|e| e["job"] == job).collect();
        let k: Vec<&str> = mine.iter().map(|e| e["event"].as_str().unwrap()).collect();
        assert_eq!(
            k,
            [
                "job_start",
                "plan",
                "stage",
                "stage",
                "step",
                "step",
                "step",
                "stage",
                "job_done"
            ],
            "job {job}"
        );
        let step = mine.iter().find(|e| e["event"] == "step").unwrap();
        assert_eq!(
            (step["step"].as_u64(), step["steps"].as_u64()),
            (Some(1), Some(3))
        );
        assert!(step["s_per_it"].as_f64().unwrap() >= 0.0);
        assert!(mine.last().unwrap()["seconds"].as_f64().is_some());
    }
    assert!(ev.iter().all(|e| e["t"].as_f64().is_some()));
}

#[test]
fn generate_speaks_json_too() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("one.png");
    let out = std::process::Command::new(super::BIN)
        .args([
            "generate", "-p", "x", "-W", "64", "-H", "64", "--steps", "2",
        ])
        .args(["--progress", "json", "-o"])
        .arg(&png)
        .arg("-m")
        .arg(tiny_model())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let ev = events(&out);
    let kinds: Vec<&str> = ev.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["stage", "plan", "stage", "stage", "step", "step", "stage", "summary"]
    );
    assert!(ev[1]["peak_mib"].as_u64().is_some() && ev[1]["budget_mib"].as_u64().is_some());
    assert_eq!(ev.last().unwrap()["output"], png.display().to_string());
    let out = std::process::Command::new(super::BIN)
        .args([
            "generate", "-p", "x", "-W", "64", "-H", "64", "--steps", "2",
        ])
        .args(["--progress", "none", "-o"])
        .arg(&png)
        .arg("-m")
        .arg(tiny_model())
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("sdcap: wrote "), "{err}");
}

/// The model stays loaded and the process must not grow from job to job: RSS after job 100 is
/// within 2% of RSS after job 10.
#[test]
fn no_memory_growth_over_100_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = write_jobs(dir.path(), "jobs.jsonl", &simple_jobs(100));
    let out_dir = dir.path().join("out");
    let out = batch(&jobs, &out_dir, &["--steps", "1", "--progress", "none"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let recs = results(&out_dir);
    assert_eq!(recs.len(), 100);
    let rss = |job: usize| recs.iter().find(|r| r.job == job).unwrap().rss_mib.unwrap();
    let (at10, at100) = (rss(9), rss(99));
    let growth = (at100 - at10) / at10;
    assert!(
        growth.abs() <= 0.02,
        "RSS after job 10 {at10} MiB, after job 100 {at100} MiB ({:+.2}%)",
        growth * 100.0
    );
}

/// A job that cannot fit its RAM cap is refused before it runs and recorded; when every job is
/// refused the batch exits 3, as `generate` does.
#[test]
fn jobs_over_the_ram_cap_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let lines = vec![
        r#"{"prompt": "fits", "seed": 1}"#.to_string(),
        r#"{"prompt": "too big for 1M", "seed": 2, "ram_cap": "1M"}"#.to_string(),
    ];
    let jobs = write_jobs(dir.path(), "jobs.jsonl", &lines);
    let out_dir = dir.path().join("out");
    let out = batch(&jobs, &out_dir, &[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let recs = results(&out_dir);
    assert_eq!(recs[0].status, Status::Ok);
    assert!(recs[0].planned_mib.unwrap() > 0.0);
    assert_eq!(
        (recs[1].status, recs[1].over_cap),
        (Status::Failed, Some(true))
    );
    assert!(!std::path::Path::new(recs[1].output.as_ref().unwrap()).exists());

    let all_over = dir.path().join("all-over");
    let out = batch(&jobs, &all_over, &["--ram-cap", "1M"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(pngs(&all_over).is_empty());
}

/// A run killed while appending left a torn last line in `results.jsonl`, and one killed while
/// writing a PNG left its temporary file. The next run cuts the fragment off (every whole line
/// stays, every line is JSON) and removes the dead run's temporary file.
#[test]
fn a_torn_results_line_and_a_dead_runs_temp_file_are_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = write_jobs(dir.path(), "jobs.jsonl", &simple_jobs(2));
    let out_dir = dir.path().join("out");
    assert_eq!(batch(&jobs, &out_dir, &[]).status.code(), Some(0));
    let log = out_dir.join(sdcap::batch::results::RESULTS_FILE);
    let whole = fs::read_to_string(&log).unwrap();
    let mut torn = whole.clone();
    torn.push_str(r#"{"job":0,"line":1,"shard":"0/1","sta"#);
    fs::write(&log, &torn).unwrap();
    // No process can have PID 4999999 (PID_MAX_LIMIT is 2^22).
    let stale = out_dir.join(".000001-abc.png.4999999.0.tmp");
    fs::write(&stale, b"half a png").unwrap();

    let more = write_jobs(dir.path(), "jobs.jsonl", &simple_jobs(3));
    let out = batch(&more, &out_dir, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.starts_with(&whole), "whole lines kept");
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    let statuses: Vec<Status> = results(&out_dir).iter().map(|r| r.status).collect();
    use Status::{Ok, Skipped};
    assert_eq!(statuses, [Ok, Ok, Skipped, Skipped, Ok]);
    assert!(!stale.exists());
    assert!(leftovers(&out_dir).is_empty());
}

/// A job whose model is a FIFO fails at once ("not a regular file or directory", never opened)
/// and the batch goes on; the same FIFO as the batch's `-m` stops it with exit 2.
#[test]
fn a_fifo_as_a_jobs_model_fails_that_job_only() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.safetensors");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path in a scratch directory.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let lines = vec![
        r#"{"prompt": "fifo", "model": "model.safetensors"}"#.to_string(),
        r#"{"prompt": "fine", "seed": 1}"#.to_string(),
    ];
    let jobs = write_jobs(dir.path(), "jobs.jsonl", &lines);
    let out_dir = dir.path().join("out");
    let out = batch(&jobs, &out_dir, &[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let recs = results(&out_dir);
    let statuses: Vec<Status> = recs.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [Status::Failed, Status::Ok]);
    let error = recs[0].error.as_deref().unwrap();
    assert!(error.contains("not a regular file or directory"), "{error}");

    let out = batch(
        &jobs,
        &dir.path().join("out2"),
        &["-m", fifo.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("not a regular file or directory"));
}
