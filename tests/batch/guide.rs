//! The swap-guide's examples are meant to be run as written: the shell parses, the YAML has the
//! fields an Indexed Job needs and agrees with itself, every sdcap flag they use exists, and the
//! Slurm script runs a shard for real on the tiny model.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sdcap::batch::Status;

use super::{pngs, results, stderr, tiny_model, write_jobs, BIN};

fn guide(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("swap-guide")
        .join(name)
}

fn read(name: &str) -> String {
    fs::read_to_string(guide(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn bash_syntax(what: &str, script: &str) {
    let out = Command::new("bash")
        .args(["-n", "-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The ```sh / ```bash blocks of a Markdown file.
fn shell_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l == "```sh" || l == "```bash" => current = Some(String::new()),
            (Some(_), "```") => blocks.push(current.take().unwrap()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    assert!(current.is_none(), "unclosed code block");
    blocks
}

/// `--flags` given to `sdcap <sub>` anywhere in `text` (comments included, `\` continuations
/// joined), by subcommand.
fn sdcap_flags(text: &str) -> Vec<(String, String)> {
    let uncommented: Vec<&str> = text
        .lines()
        .map(|l| l.trim_start().trim_start_matches('#').trim_start())
        .collect();
    let joined = uncommented.join("\n").replace("\\\n", " ");
    let mut found = Vec::new();
    for line in joined.lines() {
        for sub in ["batch", "generate"] {
            let Some((_, rest)) = line.split_once(&format!("sdcap {sub} ")) else {
                continue;
            };
            for token in rest.split_whitespace() {
                if [">", ">>", "|", "&&", ";", "2>&1"].contains(&token) {
                    break;
                }
                if let Some(flag) = token.strip_prefix("--") {
                    let flag = flag.split('=').next().unwrap();
                    found.push((sub.to_string(), format!("--{flag}")));
                }
            }
        }
    }
    found
}

fn help(sub: &str) -> String {
    let out = Command::new(BIN).args([sub, "--help"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn shell_examples_parse() {
    bash_syntax("slurm-array.sh", &read("slurm-array.sh"));
    let readme = read("README.md");
    let blocks = shell_blocks(&readme);
    assert!(blocks.len() >= 5, "the guide shows its commands");
    for (k, block) in blocks.iter().enumerate() {
        bash_syntax(&format!("README.md shell block {k}"), block);
    }
}

#[test]
fn crontab_lines_are_well_formed() {
    let text = read("crontab.example");
    let mut entries = 0;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap();
        if first.contains('=') {
            continue; // VAR=value
        }
        let fields: Vec<&str> = line.splitn(6, ' ').collect();
        assert_eq!(fields.len(), 6, "five time fields and a command: {line}");
        for f in &fields[..5] {
            assert!(
                f.chars().all(|c| c.is_ascii_digit() || ",-*/".contains(c)),
                "time field {f:?} in {line}"
            );
        }
        assert!(
            !fields[5].contains('%'),
            "cron turns % into newlines: {line}"
        );
        assert!(fields[5].contains("flock -n"), "{line}");
        bash_syntax("crontab command", fields[5]);
        entries += 1;
    }
    assert_eq!(entries, 1);
}

#[test]
fn kubernetes_manifest_is_a_consistent_indexed_job() {
    let doc: serde_yaml::Value = serde_yaml::from_str(&read("k8s-indexed-job.yaml")).unwrap();
    assert_eq!(doc["apiVersion"].as_str(), Some("batch/v1"));
    assert_eq!(doc["kind"].as_str(), Some("Job"));
    let spec = &doc["spec"];
    assert_eq!(spec["completionMode"].as_str(), Some("Indexed"));
    let completions = spec["completions"].as_u64().unwrap();
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["restartPolicy"].as_str(), Some("Never"));
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() >= 60);
    let containers = pod["containers"].as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let env = c["env"].as_sequence().unwrap();
    let count = env
        .iter()
        .find(|e| e["name"].as_str() == Some("SDCAP_SHARD_COUNT"))
        .and_then(|e| e["value"].as_str())
        .expect("SDCAP_SHARD_COUNT set");
    assert_eq!(count, completions.to_string(), "shard count = completions");
    let res = &c["resources"];
    let (req, lim) = (&res["requests"]["memory"], &res["limits"]["memory"]);
    assert!(lim.as_str().is_some(), "a memory limit");
    assert_eq!(req, lim, "memory request = limit");
    // The failure policy names the container and sdcap's exit codes.
    for rule in spec["podFailurePolicy"]["rules"].as_sequence().unwrap() {
        if let Some(codes) = rule.get("onExitCodes") {
            assert_eq!(codes["containerName"], c["name"]);
        }
    }
    // Every mount has a volume.
    let volumes: Vec<&str> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for m in c["volumeMounts"].as_sequence().unwrap() {
        assert!(volumes.contains(&m["name"].as_str().unwrap()));
    }
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().expect("args are strings"))
        .collect();
    assert_eq!(args[0], "batch");
    let batch_help = help("batch");
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            batch_help.contains(flag),
            "{flag} is not an sdcap batch flag"
        );
    }
}

#[test]
fn every_sdcap_flag_in_the_guide_exists() {
    let batch_help = help("batch");
    let generate_help = help("generate");
    let mut checked = 0;
    for name in [
        "README.md",
        "slurm-array.sh",
        "crontab.example",
        "Dockerfile",
        "k8s-indexed-job.yaml",
    ] {
        for (sub, flag) in sdcap_flags(&read(name)) {
            let text = if sub == "batch" {
                &batch_help
            } else {
                &generate_help
            };
            assert!(
                text.contains(&format!("{flag} ")) || text.contains(&format!("{flag}\n")),
                "{name}: `sdcap {sub} {flag}` is not a flag"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 10,
        "only {checked} flags found: the scan is broken"
    );
}

/// The Slurm script as written, with Slurm's variables for task 2 of `--array=1-2` and the
/// script's own variables pointing at the tiny model: it runs the second shard's jobs only.
#[test]
fn slurm_script_runs_its_shard() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..4)
        .map(|i| {
            format!(
                r#"{{"prompt": "slurm {i}", "seed": {i}, "width": 64, "height": 64, "steps": 1}}"#
            )
        })
        .collect();
    let jobs = write_jobs(dir.path(), "jobs.jsonl", &lines);
    let out_dir = dir.path().join("out");
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg(guide("slurm-array.sh"))
        .env("PATH", path)
        .env("JOBS", &jobs)
        .env("MODEL", tiny_model())
        .env("OUT", &out_dir)
        .env("SLURM_ARRAY_TASK_ID", "2")
        .env("SLURM_ARRAY_TASK_MIN", "1")
        .env("SLURM_ARRAY_TASK_MAX", "2")
        .env("SLURM_ARRAY_TASK_COUNT", "2")
        .env("SLURM_CPUS_PER_TASK", "1")
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("SDCAP_SHARD_COUNT")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let recs = results(&out_dir);
    let done: Vec<(usize, Status)> = recs.iter().map(|r| (r.job, r.status)).collect();
    assert_eq!(done, [(1, Status::Ok), (3, Status::Ok)]);
    assert_eq!(pngs(&out_dir).len(), 2);
}
