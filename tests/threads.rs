//! `--threads` above the CPUs this process may use is cut to them with a notice, and the plan
//! counts the threads actually started (issue 14, defect 12).

mod common;

use std::process::{Command, Output};

fn sdcap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdcap"))
        .args(args)
        .arg("-m")
        .arg(common::tiny("tiny-sd-fp32.safetensors"))
        .output()
        .unwrap()
}

fn available() -> String {
    std::thread::available_parallelism()
        .unwrap()
        .get()
        .to_string()
}

/// `sdcap plan --json` with `--threads threads`: (predicted peak bytes, stderr).
fn planned_peak(threads: &str) -> (u64, String) {
    let out = sdcap(&[
        "plan", "-p", "x", "-W", "512", "-H", "512", "--json", "-t", threads,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (report["peak_bytes"].as_u64().unwrap(), stderr)
}

#[test]
fn plan_counts_the_threads_it_would_start() {
    let (clamped, stderr) = planned_peak("1000");
    let (all, quiet) = planned_peak(&available());
    assert_eq!(clamped, all, "{stderr}");
    let notice = format!(
        "sdcap: --threads 1000 is more than the {} CPUs this process may use; using {}",
        available(),
        available()
    );
    assert_eq!(stderr.trim(), notice);
    assert_eq!(quiet.trim(), "");
}

#[test]
fn generate_cuts_threads_with_one_json_notice() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("o.png");
    let png = png.to_str().unwrap();
    let run = |threads: &str| {
        let out = sdcap(&[
            "generate",
            "-p",
            "x",
            "-W",
            "64",
            "-H",
            "64",
            "--steps",
            "1",
            "--progress",
            "json",
            "-o",
            png,
            "-t",
            threads,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        let events: Vec<serde_json::Value> = stderr
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let plan_mib = events.iter().find(|e| e["event"] == "plan").unwrap()["peak_mib"].clone();
        let notices: Vec<String> = events
            .iter()
            .filter(|e| e["event"] == "notice")
            .map(|e| e["text"].as_str().unwrap().to_string())
            .collect();
        (plan_mib, notices)
    };
    let (clamped, notices) = run("1000");
    let (all, none) = run(&available());
    assert_eq!(clamped, all);
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(
        notices[0].starts_with("--threads 1000 is more than the"),
        "{notices:?}"
    );
    assert!(none.is_empty(), "{none:?}");
}
