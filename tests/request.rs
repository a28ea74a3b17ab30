//! The one request definition (`sdcap::request`): flags, job-file keys, output names and PNG
//! parameters all cover the same settings, and `request::FIELDS` tells the truth about each.

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::Args;
use sdcap::batch::naming::job_hash;
use sdcap::job::{Given, Job};
use sdcap::output::parameters_text;
use sdcap::request::{Infotext, Naming, Request, FIELDS};
use serde_json::json;

/// The job-file keys serde knows, read from its "unknown field" message, which lists them all.
fn serde_keys() -> BTreeSet<String> {
    let err = serde_json::from_str::<Request>(r#"{"no_such_key": 1}"#).unwrap_err();
    let msg = err.to_string();
    let list = msg
        .split("expected one of ")
        .nth(1)
        .unwrap_or_else(|| panic!("{msg}"));
    list.split(", ")
        .map(|k| k.trim_matches(|c: char| c == '`' || c.is_whitespace()))
        .map(|k| k.split('`').next().unwrap().to_string())
        .collect()
}

/// The flag a job-file key corresponds to (the key in kebab-case, but for four older names).
fn flag_of(key: &str) -> String {
    match key {
        "negative" => "negative-prompt".into(),
        "cfg" => "cfg-scale".into(),
        "sampler" => "sampling-method".into(),
        "init_image" => "init-img".into(),
        k => k.replace('_', "-"),
    }
}

#[test]
fn every_setting_has_one_row_a_flag_and_a_key() {
    let rows: Vec<&str> = FIELDS.iter().map(|f| f.key).collect();
    let unique: BTreeSet<&str> = rows.iter().copied().collect();
    assert_eq!(unique.len(), rows.len(), "a key twice in FIELDS");
    // Every job-file key has its row; the one row without a key is the process-wide backend.
    // Older spellings a job file may use (aliases) name no row of their own.
    let aliases = [
        "negative_prompt",
        "cfg_scale",
        "sampling_method",
        "init_img",
    ];
    let keys: BTreeSet<String> = serde_keys()
        .into_iter()
        .filter(|k| !aliases.contains(&k.as_str()))
        .collect();
    let row_keys: BTreeSet<String> = rows
        .iter()
        .filter(|&&k| k != "backend")
        .map(|k| k.to_string())
        .collect();
    assert_eq!(keys, row_keys, "job-file keys vs request::FIELDS");
    // Every row has its flag, and every flag of the request has its row.
    let command = Request::augment_args(clap::Command::new("t"));
    let flags: BTreeSet<String> = command
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    let row_flags: BTreeSet<String> = rows.iter().map(|k| flag_of(k)).collect();
    assert_eq!(flags, row_flags, "flags vs request::FIELDS");
}

/// A value different from the base job's for each key (None: the setting has one value only).
fn other_value(key: &str) -> Option<serde_json::Value> {
    Some(match key {
        "model" => json!("other.safetensors"),
        "vae" => json!("other-vae.safetensors"),
        "prompt" => json!("a red door"),
        "negative" => json!("blurry"),
        "width" => json!(640),
        "height" => json!(640),
        "steps" => json!(9),
        "cfg" => json!(3.5),
        "sampler" => json!("ddim"),
        "scheduler" => json!("karras"),
        "seed" => json!(7),
        "clip_skip" => json!(2),
        // The only generator there is.
        "rng" => return None,
        "prompt_syntax" => json!("plain"),
        "prediction" => json!("v"),
        "original_size" => json!("2048x2048"),
        "crop_coords" => json!("0,256"),
        "target_size" => json!("640x640"),
        "lora" => json!(["style.safetensors:0.7"]),
        "lora_model_dir" => json!("loras"),
        "init_image" => json!("other.png"),
        "strength" => json!(0.3),
        "mask" => json!("other-mask.png"),
        "taesd" => json!("other-taesd.safetensors"),
        "preview" => json!("proj"),
        "preview_interval" => json!(3),
        "preview_path" => json!("p.png"),
        "taesd_preview_only" => json!(true),
        "precision" => json!("int8"),
        "ram_cap" => json!("6G"),
        // Not a job-file key: set on the request directly below.
        "backend" => return None,
        other => panic!("no test value for `{other}`: add one here"),
    })
}

/// A job where every setting shows: an init image, a mask and TAESD set, so that strength, mask
/// and TAESD settings take effect.
fn base_job() -> Job {
    let mut job = Job::new(PathBuf::from("/m/model.safetensors"), "a photo of a cat");
    job.init_image = Some(PathBuf::from("/i/init.png"));
    job.mask = Some(PathBuf::from("/i/mask.png"));
    job.taesd = Some(PathBuf::from("/t/taesd.safetensors"));
    job
}

#[test]
fn each_row_says_truly_how_its_setting_names_the_output_and_enters_the_png() {
    let base = base_job();
    let (base_hash, base_text) = (job_hash(&base), parameters_text(&base));
    for field in FIELDS {
        let Some(value) = other_value(field.key) else {
            continue;
        };
        let line = json!({ field.key: value }).to_string();
        let request: Request =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        let mut job = base.clone();
        request
            .apply(&mut job, &mut Given::default())
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        let (hash, text) = (job_hash(&job), parameters_text(&job));
        match field.naming {
            Naming::Named => assert_ne!(hash, base_hash, "{line} must rename the output"),
            Naming::Unnamed(why) => assert_eq!(hash, base_hash, "{line}: {why}"),
        }
        match field.infotext {
            Infotext::Prompt => {
                let first = |t: &str| t.lines().take(2).collect::<Vec<_>>().join("\n");
                assert_ne!(first(&text), first(&base_text), "{line}: prompt lines")
            }
            Infotext::Key(key) => {
                assert_ne!(text, base_text, "{line} must change the PNG text");
                // The key is written in one of the two (`--taesd-preview-only` removes `TAESD`).
                let last = |t: &str| t.lines().last().unwrap().to_string();
                let shown = [last(&text), last(&base_text)];
                assert!(
                    shown.iter().any(|l| l.contains(&format!("{key}: "))),
                    "{line}: `{key}` in {shown:?}"
                );
            }
            Infotext::Absent(why) => assert_eq!(text, base_text, "{line}: {why}"),
        }
    }
}

#[test]
fn the_job_file_and_the_flags_reach_the_same_job() {
    let line = r#"{"prompt": "a castle", "negative": "blurry", "cfg": 5, "sampler": "heun",
        "steps": 12, "init_image": "in.png", "strength": 0.4, "mask": "m.png", "taesd": "t",
        "preview": "tae", "preview_interval": 2, "preview_path": "pv.png", "taesd_preview_only": true,
        "precision": "bf16", "lora": ["a.safetensors:0.5", {"name": "b", "weight": 0.3}],
        "lora_model_dir": "loras", "ram_cap": "1G", "original_size": "2048x1024"}"#;
    let from_file: Request = serde_json::from_str(line).unwrap();
    let command = Request::augment_args(clap::Command::new("t").no_binary_name(true));
    let matches = command
        .try_get_matches_from([
            "-p",
            "a castle",
            "-n",
            "blurry",
            "--cfg-scale",
            "5",
            "--sampling-method",
            "heun",
            "--steps",
            "12",
            "-i",
            "in.png",
            "--strength",
            "0.4",
            "--mask",
            "m.png",
            "--taesd",
            "t",
            "--preview",
            "tae",
            "--preview-interval",
            "2",
            "--preview-path",
            "pv.png",
            "--taesd-preview-only",
            "--precision",
            "bf16",
            "--lora",
            "a.safetensors:0.5",
            "--lora",
            "loras/b.safetensors:0.3",
            "--lora-model-dir",
            "loras",
            "--ram-cap",
            "1G",
            "--original-size",
            "2048x1024",
        ])
        .unwrap();
    let from_flags = <Request as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
    let job = |r: &Request| {
        let mut job = Job::new(PathBuf::from("m"), "");
        let mut given = Given::default();
        r.apply(&mut job, &mut given).unwrap();
        (format!("{job:?}"), given)
    };
    assert_eq!(job(&from_file), job(&from_flags));
}

#[test]
fn bad_job_file_values_are_refused_with_the_flags_message() {
    for (line, needle) in [
        (r#"{"sampler": "nope"}"#, "unknown sampling method `nope`"),
        (r#"{"precision": "fp8"}"#, "unknown precision `fp8`"),
        (r#"{"preview": "gif"}"#, "unknown preview mode `gif`"),
        (
            r#"{"lora": [{"path": "a", "name": "b"}]}"#,
            "exactly one of",
        ),
        (r#"{"original_size": "big"}"#, "original_size `big`"),
        (r#"{"ram_cap": true}"#, "ram_cap true is not a size"),
        (r#"{"backend": "cuda"}"#, "unknown field `backend`"),
    ] {
        let err = serde_json::from_str::<Request>(line)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{line}: {err}");
    }
    // A LoRA by name needs the folder.
    let request: Request = serde_json::from_str(r#"{"lora": [{"name": "b"}]}"#).unwrap();
    let err = request
        .apply(
            &mut Job::new(PathBuf::from("m"), "p"),
            &mut Given::default(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("lora_model_dir"), "{err}");
}
