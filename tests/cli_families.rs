//! The CLI edge of the model families (issue 13) and the job boundary for panics (issue 14): the
//! flags `--prediction`, `--original-size`, `--crop-coords`, `--target-size` and their job-file
//! fields, per-family defaults when the user gives none, what `plan`, the summary and the PNG say,
//! and a panic as one line and exit 1 (a batch records it and goes on). Runs stay tiny (64², one
//! step) on the tiny SD2/SDXL fixtures; the 1024² SDXL default is checked through `plan` and the
//! batch's output names, which need no generation.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fixtures;
use sdcap::batch::naming::output_name;
use sdcap::job::Job;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_sdcap");

/// A prompt of the goldens: the SD2/SDXL models under `tests/data` carry only its token rows (see
/// `tests/data/README.md`).
const CAT: &str = "a photo of a cat";

fn sdxl() -> PathBuf {
    fixtures().join("tiny-sdxl/tiny-sdxl-fp32.safetensors")
}

fn sd2() -> PathBuf {
    fixtures().join("tiny-sd2/tiny-sd2-fp32.safetensors")
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs sdcap with the test panic hook unset (unless `env` sets it) and with `RUST_BACKTRACE`
/// on, as many developer shells have it: the one-line contract must hold anyway.
fn sdcap(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("SDCAP_TEST_PANIC")
        .env_remove("SDCAP_BACKTRACE")
        .env("RUST_BACKTRACE", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run sdcap")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn plan_json(args: &[&str]) -> Value {
    let mut all = vec!["plan", "-p", "x", "--json"];
    all.extend_from_slice(args);
    let out = sdcap(&all, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("plan --json prints JSON")
}

/// The `summary` event of a `--progress json` run.
fn summary(out: &Output) -> Value {
    stderr(out)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .unwrap_or_else(|| panic!("no summary in {}", stderr(out)))
}

/// The PNG's pixels and its `parameters` text.
fn read_png(path: &Path) -> (Vec<u8>, String) {
    let decoder = png::Decoder::new(fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    reader.next_frame(&mut pixels).unwrap();
    let info = reader.info();
    let text = info
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == "parameters")
        .map(|c| c.text.clone())
        .or_else(|| {
            info.utf8_text
                .iter()
                .find(|c| c.keyword == "parameters")
                .map(|c| c.get_text().unwrap())
        })
        .expect("a parameters chunk");
    (pixels, text)
}

/// A tiny generate run into `dir/name`; returns the process output.
fn generate(model: &Path, dir: &Path, name: &str, extra: &[&str]) -> Output {
    let out = dir.join(name);
    let mut args = vec![
        "generate",
        "-m",
        path(model),
        "-p",
        CAT,
        "-W",
        "64",
        "-H",
        "64",
        "--steps",
        "1",
        "-o",
        path(&out),
    ];
    if !extra.contains(&"--progress") {
        args.extend_from_slice(&["--progress", "json"]);
    }
    args.extend_from_slice(extra);
    sdcap(&args, &[])
}

#[test]
fn sizes_and_settings_default_per_family() {
    // SDXL: 1024², and the family's steps, CFG and sampler.
    let p = plan_json(&["-m", path(&sdxl())]);
    assert_eq!(p["family"], "SDXL");
    assert_eq!(
        (p["width"].as_u64(), p["height"].as_u64()),
        (Some(1024), Some(1024))
    );
    assert_eq!(p["steps"], 20);
    assert_eq!(p["cfg_scale"], 7.0);
    assert_eq!(p["sampler"], "euler_a");
    assert_eq!(p["scheduler"], "discrete");
    assert_eq!(p["prediction"], "eps");
    assert_eq!(p["prediction_source"], "family");
    // SD2: 512² for eps (decided from the weights here), 768² for v.
    let p = plan_json(&["-m", path(&sd2())]);
    assert_eq!(p["family"], "SD2.x");
    assert_eq!(
        (p["width"].as_u64(), p["height"].as_u64()),
        (Some(512), Some(512))
    );
    assert_eq!(p["prediction_source"], "weights");
    let p = plan_json(&["-m", path(&sd2()), "--prediction", "v"]);
    assert_eq!(
        (p["width"].as_u64(), p["height"].as_u64()),
        (Some(768), Some(768))
    );
    assert_eq!(p["prediction"], "v");
    assert_eq!(p["prediction_source"], "flag");
    // What the user gives is kept, the rest still comes from the family.
    let p = plan_json(&[
        "-m",
        path(&sdxl()),
        "-W",
        "64",
        "--steps",
        "3",
        "--cfg-scale",
        "0",
    ]);
    assert_eq!(
        (p["width"].as_u64(), p["height"].as_u64()),
        (Some(64), Some(1024))
    );
    assert_eq!(
        (p["steps"].as_u64(), p["cfg_scale"].as_f64()),
        (Some(3), Some(0.0))
    );
    // SD1.x (the shipped demo model): the old defaults.
    let p = plan_json(&[]);
    assert_eq!(p["family"], "SD1.x");
    assert_eq!(
        (p["width"].as_u64(), p["steps"].as_u64()),
        (Some(512), Some(20))
    );
}

#[test]
fn plan_text_names_the_family_and_why_this_prediction() {
    let out = sdcap(
        &["plan", "-p", "x", "-m", path(&sd2()), "--prediction", "v"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap();
    assert!(
        first.contains("SD2.x")
            && first.contains("v-prediction (from --prediction)")
            && first.contains("768x768"),
        "{first}"
    );
}

#[test]
fn help_says_the_size_defaults_per_family() {
    for cmd in ["generate", "batch", "plan"] {
        let out = sdcap(&[cmd, "--help"], &[]);
        let help = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            help.contains("default: per model family (SD1/SD2 512, SD2-v 768, SDXL 1024)"),
            "{cmd}: {help}"
        );
        for flag in [
            "--prediction",
            "--original-size",
            "--crop-coords",
            "--target-size",
        ] {
            assert!(help.contains(flag), "{cmd} --help lacks {flag}");
        }
    }
}

#[test]
fn bad_family_flags_are_one_line_and_exit_2_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let out_png = dir.path().join("out.png");
    // The model does not exist: each value must be refused before the model is looked at.
    let missing = dir.path().join("missing.safetensors");
    for (flag, value, want) in [
        ("--prediction", "x", "prediction"),
        ("--original-size", "12", "original-size"),
        ("--original-size", "0x64", "original-size"),
        ("--target-size", "64x99999", "target-size"),
        ("--target-size", "axb", "target-size"),
        ("--crop-coords", "8", "crop-coords"),
        ("--crop-coords", "8,99999", "crop-coords"),
        ("-W", "65", "width"),
        ("--steps", "0", "steps"),
    ] {
        let out = sdcap(
            &[
                "generate",
                "-p",
                "x",
                "-m",
                path(&missing),
                "-o",
                path(&out_png),
                flag,
                value,
            ],
            &[],
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert_eq!(err.lines().count(), 1, "{flag} {value}: {err}");
        assert!(
            err.starts_with("sdcap: error: ") && err.contains(want),
            "{flag} {value}: {err}"
        );
        assert!(!out_png.exists());
    }
}

#[test]
fn summary_names_family_and_prediction_source() {
    let dir = tempfile::tempdir().unwrap();
    let out = generate(&sd2(), dir.path(), "v.png", &["--prediction", "v"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(
        (&s["family"], &s["prediction"], &s["prediction_source"]),
        (&"SD2.x".into(), &"v".into(), &"flag".into())
    );
    let out = generate(&sdxl(), dir.path(), "xl.png", &["--progress", "none"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let line = stderr(&out);
    assert!(
        line.contains("SDXL, eps-prediction from the family default"),
        "{line}"
    );
}

#[test]
fn sdxl_size_flags_reach_the_unet_and_the_png() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = generate(&sdxl(), dir.path(), name, extra);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        read_png(&dir.path().join(name))
    };
    let (plain, plain_text) = run("plain.png", &[]);
    for absent in [
        "Prediction:",
        "Original size:",
        "Crop coords:",
        "Target size:",
    ] {
        assert!(!plain_text.contains(absent), "{plain_text}");
    }
    assert!(plain_text.contains("Size: 64x64"), "{plain_text}");
    // The defaults spelled out (original = target = the image size, crop 0,0) change nothing.
    let (same, _) = run(
        "same.png",
        &[
            "--original-size",
            "64x64",
            "--target-size",
            "64x64",
            "--crop-coords",
            "0,0",
        ],
    );
    assert_eq!(
        same, plain,
        "diffusers' defaults given explicitly must give the same image"
    );
    let (other, text) = run(
        "other.png",
        &[
            "--original-size",
            "128x96",
            "--crop-coords",
            "8,0",
            "--target-size",
            "64x32",
            "--prediction",
            "eps",
        ],
    );
    assert_ne!(other, plain, "the size conditioning must reach the UNet");
    let last = text.lines().last().unwrap();
    for want in [
        "Prediction: eps",
        "Original size: 128x96",
        "Crop coords: \"8,0\"",
        "Target size: 64x32",
    ] {
        assert!(last.contains(want), "{want} missing in {last}");
    }
    // Each flag alone changes the image.
    for flags in [
        ["--original-size", "128x96"],
        ["--crop-coords", "8,0"],
        ["--target-size", "64x32"],
    ] {
        let (img, _) = run("one.png", &flags);
        assert_ne!(img, plain, "{flags:?} changed nothing");
    }
}

#[test]
fn size_flags_on_a_family_without_them_are_a_notice() {
    let dir = tempfile::tempdir().unwrap();
    let out = generate(
        &sd2(),
        dir.path(),
        "sd2.png",
        &["--original-size", "128x128"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("condition SDXL only; SD2.x ignores them"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_panic_is_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("out.png");
    for stage in ["load", "encode", "denoise", "decode"] {
        let out = sdcap(
            &[
                "generate",
                "-m",
                path(&sdxl()),
                "-p",
                CAT,
                "-W",
                "64",
                "-H",
                "64",
                "--steps",
                "1",
                "--progress",
                "none",
                "-o",
                path(&png),
            ],
            &[("SDCAP_TEST_PANIC", stage)],
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{stage}: {err}");
        assert_eq!(
            err.lines().count(),
            1,
            "{stage}: one line, no backtrace: {err}"
        );
        assert!(
            err.starts_with("sdcap: error: internal error: ") && err.contains(stage),
            "{stage}: {err}"
        );
        // No output, and no temporary file left beside it.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "{stage}");
    }
}

fn batch(dir: &Path, jobs: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let file = dir.join("jobs.jsonl");
    fs::write(&file, jobs).unwrap();
    let out_dir = dir.join("out");
    let mut args = vec![
        "batch",
        path(&file),
        "-o",
        path(&out_dir),
        "--progress",
        "json",
    ];
    args.extend_from_slice(extra);
    sdcap(&args, env)
}

fn records(dir: &Path) -> Vec<Value> {
    fs::read_to_string(dir.join("out/results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_batch_records_a_panicking_job_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = "{\"prompt\":\"a photo of a cat\",\"seed\":1}\n{\"prompt\":\"a photo of a cat\",\"seed\":2}\n";
    let model = sd2();
    let flags = ["-m", path(&model), "-W", "64", "-H", "64", "--steps", "1"];
    // The first job's encode stage panics; the second job runs on the same loaded model.
    let out = batch(
        dir.path(),
        jobs,
        &flags,
        &[("SDCAP_TEST_PANIC", "encode@1")],
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let recs = records(dir.path());
    assert_eq!(recs.len(), 2, "{recs:?}");
    let first = recs.iter().find(|r| r["job"] == 0).unwrap();
    let second = recs.iter().find(|r| r["job"] == 1).unwrap();
    assert_eq!(first["status"], "failed");
    assert!(
        first["error"]
            .as_str()
            .unwrap()
            .starts_with("internal error: SDCAP_TEST_PANIC"),
        "{first}"
    );
    assert!(!Path::new(first["output"].as_str().unwrap()).exists());
    assert_eq!(second["status"], "ok");
    assert!(Path::new(second["output"].as_str().unwrap()).is_file());
    // The rerun does the failed job and skips the done one.
    let out = batch(dir.path(), jobs, &flags, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let recs = records(dir.path());
    let statuses: Vec<_> = recs[2..]
        .iter()
        .map(|r| (r["job"].clone(), r["status"].clone()))
        .collect();
    assert!(statuses.contains(&(0.into(), "ok".into())), "{statuses:?}");
    assert!(
        statuses.contains(&(1.into(), "skipped".into())),
        "{statuses:?}"
    );
}

#[test]
fn batch_jobs_take_the_family_defaults_in_their_names() {
    // Without -W/-H, an SDXL job is 1024²: its output name is that of the 1024² job. The file is
    // made beforehand, so the batch skips the job (no 1024² generation needed); a name made from
    // SD1's 512 placeholders would not be found and the job would run.
    let dir = tempfile::tempdir().unwrap();
    let model = sdxl();
    let mut job = Job::new(model.clone(), "a");
    (job.width, job.height, job.steps) = (1024, 1024, 1);
    let name = output_name(0, &job);
    fs::create_dir_all(dir.path().join("out")).unwrap();
    fs::write(dir.path().join("out").join(&name), b"done").unwrap();
    let out = batch(
        dir.path(),
        "{\"prompt\":\"a\",\"steps\":1}\n",
        &["-m", path(&model)],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let recs = records(dir.path());
    assert_eq!(recs[0]["status"], "skipped", "{recs:?}");
    assert!(recs[0]["output"].as_str().unwrap().ends_with(&name));
}

#[test]
fn batch_fields_for_the_families() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = concat!(
        "{\"prompt\":\"a photo of a cat\",\"prediction\":\"v\",\"original_size\":\"128x96\",\"crop_coords\":\"8,0\",\"target_size\":\"64x32\"}\n",
        "{\"prompt\":\"b\",\"prediction\":\"x\"}\n",
        "{\"prompt\":\"c\",\"original_size\":\"12\"}\n",
        "{\"prompt\":\"d\",\"crop_coords\":\"-1,0\"}\n",
        "{\"prompt\":\"e\",\"target_size\":\"0x64\"}\n",
    );
    let model = sdxl();
    let flags = ["-m", path(&model), "-W", "64", "-H", "64", "--steps", "1"];
    let out = batch(dir.path(), jobs, &flags, &[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let recs = records(dir.path());
    let by_job = |j: u64| recs.iter().find(|r| r["job"] == j).unwrap();
    assert_eq!(by_job(0)["status"], "ok", "{recs:?}");
    let (_, text) = read_png(Path::new(by_job(0)["output"].as_str().unwrap()));
    for want in [
        "Prediction: v",
        "Original size: 128x96",
        "Crop coords: \"8,0\"",
        "Target size: 64x32",
    ] {
        assert!(text.contains(want), "{want} missing in {text}");
    }
    for (j, want) in [
        (1, "prediction"),
        (2, "original"),
        (3, "crop"),
        (4, "target"),
    ] {
        let r = by_job(j);
        assert_eq!(r["status"], "failed", "{r}");
        assert!(r["error"].as_str().unwrap().contains(want), "{r}");
    }
}
