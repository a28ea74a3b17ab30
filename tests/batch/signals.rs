//! SIGTERM/SIGINT: the current image is abandoned without a file, recorded, exit 130; the lock
//! keeps a second run out meanwhile; a rerun resumes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sdcap::batch::Status;

use super::{batch, batch_command, leftovers, pngs, results, stderr, tiny_model, write_jobs, BIN};

/// Waits until the child's JSON progress shows a step of `job` (or of `generate` when `None`),
/// passing the lines on; panics if the child ends first or after a minute.
pub fn wait_for_step(child: &mut Child, job: Option<u64>) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the child reports a step");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["event"] == "step" && v["job"].as_u64() == job {
            return rx;
        }
    }
}

fn kill(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn sigterm_abandons_the_current_job_and_a_rerun_resumes() {
    let dir = tempfile::tempdir().unwrap();
    // Job 1 is long (hundreds of steps): the signal is sure to land inside it.
    let lines = vec![
        r#"{"prompt": "quick", "seed": 1}"#.to_string(),
        r#"{"prompt": "long", "seed": 2, "width": 128, "height": 128, "steps": 300}"#.to_string(),
        r#"{"prompt": "after", "seed": 3}"#.to_string(),
    ];
    let jobs = write_jobs(dir.path(), "jobs.jsonl", &lines);
    let out_dir = dir.path().join("out");
    let mut child = batch_command(&jobs, &out_dir, &[])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rest = wait_for_step(&mut child, Some(1));

    // While it runs, an overlapping run on the same directory is turned away.
    let second = batch(&jobs, &out_dir, &[]);
    assert_eq!(second.status.code(), Some(2), "{}", stderr(&second));
    assert!(stderr(&second).contains("in use by another sdcap batch"));

    kill(&child, "TERM");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let tail: Vec<String> = rest.iter().collect();
    let summary: serde_json::Value = serde_json::from_str(tail.last().unwrap()).unwrap();
    assert_eq!(summary["event"], "summary");
    assert_eq!(summary["interrupted"], true);

    let recs = results(&out_dir);
    let statuses: Vec<(usize, Status)> = recs.iter().map(|r| (r.job, r.status)).collect();
    assert_eq!(statuses, [(0, Status::Ok), (1, Status::Interrupted)]);
    let abandoned = recs[1].output.as_ref().unwrap();
    assert!(
        !Path::new(abandoned).exists(),
        "no file for the abandoned job"
    );
    assert!(leftovers(&out_dir).is_empty(), "no temporary file");
    assert_eq!(pngs(&out_dir).len(), 1);

    // The rerun skips job 0 and does the rest.
    let out = batch(&jobs, &out_dir, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rerun: Vec<(usize, Status)> = results(&out_dir)[2..]
        .iter()
        .map(|r| (r.job, r.status))
        .collect();
    assert_eq!(
        rerun,
        [(0, Status::Skipped), (1, Status::Ok), (2, Status::Ok)]
    );
    assert!(Path::new(abandoned).exists());
}

#[test]
fn sigint_stops_generate_without_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("never.png");
    let mut child = Command::new(BIN)
        .args([
            "generate", "-p", "x", "-W", "128", "-H", "128", "--steps", "300",
        ])
        .args(["--progress", "json", "-o"])
        .arg(&png)
        .arg("-m")
        .arg(tiny_model())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rest = wait_for_step(&mut child, None);
    kill(&child, "INT");
    assert_eq!(child.wait().unwrap().code(), Some(130));
    let tail: Vec<String> = rest.iter().collect();
    assert!(
        tail.last()
            .unwrap()
            .starts_with("sdcap: error: interrupted"),
        "{tail:?}"
    );
    assert!(!png.exists());
    assert!(leftovers(dir.path()).is_empty());
}
