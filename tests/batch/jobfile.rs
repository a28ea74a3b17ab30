//! Job lines → jobs, and the output names derived from them.

use std::path::{Path, PathBuf};

use sdcap::batch::jobfile::{parse_jobs, parse_jobs_given};
use sdcap::batch::naming::{canonical, output_name};
use sdcap::family::Prediction;
use sdcap::job::{Given, Job, SamplerKind, ScheduleKind};

fn defaults() -> Job {
    Job::new(PathBuf::from("/models/v1-5.safetensors"), "")
}

fn parse(text: &str) -> Vec<Result<Job, String>> {
    parse_jobs(text, &defaults(), Path::new("/jobs"))
        .into_iter()
        .map(|e| e.job)
        .collect()
}

#[test]
fn fields_override_defaults_and_aliases_work() {
    let jobs = parse(
        r#"{"prompt":"a","negative":"n","seed":7,"width":640,"height":448,"steps":4,"sampler":"dpm++2m","scheduler":"karras","cfg":5.5,"clip_skip":2,"rng":"cpu","model":"m.safetensors","vae":"/v/vae.safetensors"}
{"prompt":"b","negative_prompt":"nn","cfg_scale":3,"sampling_method":"ddim"}"#,
    );
    let a = jobs[0].as_ref().unwrap();
    assert_eq!((a.prompt.as_str(), a.negative_text()), ("a", "n"));
    assert_eq!((a.seed, a.width, a.height, a.steps), (7, 640, 448, 4));
    assert_eq!(
        (a.sampler, a.scheduler),
        (SamplerKind::DpmPp2m, ScheduleKind::Karras)
    );
    assert_eq!((a.cfg_scale, a.clip_skip), (5.5, 2));
    assert_eq!(
        a.model,
        Path::new("/jobs/m.safetensors"),
        "relative to the job file"
    );
    assert_eq!(a.vae.as_deref(), Some(Path::new("/v/vae.safetensors")));
    let b = jobs[1].as_ref().unwrap();
    assert_eq!((b.negative_text(), b.cfg_scale), ("nn", 3.0));
    assert_eq!((b.sampler, b.seed, b.width), (SamplerKind::Ddim, 42, 512));
    assert_eq!(b.model, Path::new("/models/v1-5.safetensors"));
}

#[test]
fn ram_cap_takes_bytes_or_a_size() {
    let jobs = parse(
        r#"{"prompt":"a","ram_cap":"6G"}
{"prompt":"b","ram_cap":1048576}
{"prompt":"c","ram_cap":"lots"}
{"prompt":"d","ram_cap":-1}"#,
    );
    assert_eq!(jobs[0].as_ref().unwrap().ram_cap, Some(6 << 30));
    assert_eq!(jobs[1].as_ref().unwrap().ram_cap, Some(1 << 20));
    assert!(jobs[2].as_ref().unwrap_err().contains("not a size"));
    assert!(jobs[3].is_err());
}

#[test]
fn blank_lines_are_not_jobs_and_indices_count_jobs() {
    let entries = parse_jobs(
        "\n{\"prompt\":\"a\"}\n\n   \n{\"prompt\":\"b\"}\r\n",
        &defaults(),
        Path::new("."),
    );
    let got: Vec<(usize, usize)> = entries.iter().map(|e| (e.index, e.line)).collect();
    assert_eq!(got, vec![(0, 2), (1, 5)]);
}

#[test]
fn bad_lines_fail_alone_with_a_reason() {
    let jobs = parse(
        r#"{"prompt":"ok"}
{"prompt":"x","colour":"red"}
{"prompt":"x","width":500}
{"prompt":"x","sampler":"ipndm"}
{"prompt":"x","seed":-1}
{"seed":1}
[1,2]
{"prompt":"x","steps":"many"}"#,
    );
    assert!(jobs[0].is_ok());
    let reasons: Vec<String> = jobs[1..].iter().map(|j| j.clone().unwrap_err()).collect();
    for (reason, want) in reasons.iter().zip([
        "unknown field `colour`",
        "width 500 is not a multiple of 8",
        "unknown sampling method `ipndm`",
        "seed -1 is negative",
        "no `prompt`",
        "not a valid job",
        "invalid type",
    ]) {
        assert!(reason.contains(want), "{reason:?} should mention {want:?}");
    }
    assert!(
        !reasons[0].contains("line 1"),
        "serde's in-line position would mislead: {}",
        reasons[0]
    );
}

#[test]
fn a_default_prompt_fills_lines_without_one() {
    let mut d = defaults();
    d.prompt = "default".into();
    let entries = parse_jobs(r#"{"seed":1}"#, &d, Path::new("."));
    assert_eq!(entries[0].job.as_ref().unwrap().prompt, "default");
}

/// Names are part of the on-disk contract (a rerun finds its outputs by them): pinned here, so a
/// change to the canonical form is a deliberate one (bump its version).
#[test]
fn output_names_are_pinned() {
    let mut job = defaults();
    job.prompt = "a lighthouse at dusk".into();
    assert_eq!(output_name(7, &job), "000007-e0784b69827f.png");
    assert_eq!(
        canonical(&job),
        r#"{"v":1,"model":"v1-5.safetensors","vae":null,"prompt":"a lighthouse at dusk","negative":"","width":512,"height":512,"steps":20,"cfg":7.0,"sampler":"euler_a","scheduler":"discrete","seed":42,"clip_skip":1,"rng":"cpu"}"#
    );
}

/// The fields added with the families enter the canonical form only when set: jobs without them
/// keep the names pinned above.
#[test]
fn family_fields_enter_the_name_only_when_set() {
    let mut job = defaults();
    job.prompt = "a lighthouse at dusk".into();
    job.size_cond.crop = (0, 0);
    assert_eq!(output_name(7, &job), "000007-e0784b69827f.png");
    job.prediction = Some(Prediction::V);
    job.size_cond.original = Some((768, 1024));
    job.size_cond.crop = (16, 8);
    assert!(
        canonical(&job).ends_with(
            r#""rng":"cpu","prediction":"v","original_size":[768,1024],"crop_coords":[16,8]}"#
        ),
        "{}",
        canonical(&job)
    );
}

#[test]
fn family_fields_parse_and_bad_values_fail_their_line() {
    let jobs = parse(
        r#"{"prompt":"a","prediction":"v","original_size":"1024x768","crop_coords":"16,8","target_size":"512X512"}
{"prompt":"b","prediction":"x_pred"}
{"prompt":"c","original_size":"1024"}
{"prompt":"d","crop_coords":"1;2"}
{"prompt":"e","target_size":"0x512"}
{"prompt":"f","original_size":1024}"#,
    );
    let a = jobs[0].as_ref().unwrap();
    assert_eq!(a.prediction, Some(Prediction::V));
    // (height, width), as diffusers' tuples.
    assert_eq!(a.size_cond.original, Some((768, 1024)));
    assert_eq!(a.size_cond.crop, (16, 8));
    assert_eq!(a.size_cond.target, Some((512, 512)));
    for (k, want) in [
        (1, "prediction"),
        (2, "original_size"),
        (3, "crop"),
        (4, "target-size"),
        (5, "not a valid job"),
    ] {
        let e = jobs[k].as_ref().unwrap_err();
        assert!(e.contains(want), "line {k}: {e}");
    }
}

#[test]
fn a_line_gives_what_it_sets_on_top_of_the_flags() {
    let flags = Given {
        steps: true,
        ..Given::default()
    };
    let entries = parse_jobs_given(
        r#"{"prompt":"a","width":640,"sampler":"ddim"}
{"prompt":"b","cfg":3,"height":320,"scheduler":"karras"}"#,
        &defaults(),
        flags,
        Path::new("."),
    );
    let want_a = Given {
        width: true,
        sampler: true,
        ..flags
    };
    let want_b = Given {
        cfg_scale: true,
        height: true,
        scheduler: true,
        ..flags
    };
    assert_eq!((entries[0].given, entries[1].given), (want_a, want_b));
    // Without the flags' say, everything counts as given (the library's `parse_jobs`).
    let all = parse_jobs(r#"{"prompt":"a"}"#, &defaults(), Path::new("."));
    assert_eq!(all[0].given, Given::ALL);
}

type Change = Box<dyn Fn(&mut Job)>;

#[test]
fn names_follow_settings_not_paths() {
    let mut job = defaults();
    job.prompt = "p".into();
    let name = output_name(0, &job);
    let mut moved = job.clone();
    moved.model = PathBuf::from("/mnt/elsewhere/v1-5.safetensors");
    assert_eq!(
        output_name(0, &moved),
        name,
        "same model file at another mount"
    );
    let variants: Vec<Change> = vec![
        Box::new(|j| j.prompt.push('!')),
        Box::new(|j| j.negative = Some("n".into())),
        Box::new(|j| j.seed += 1),
        Box::new(|j| j.width = 256),
        Box::new(|j| j.height = 256),
        Box::new(|j| j.steps += 1),
        Box::new(|j| j.cfg_scale = 7.5),
        Box::new(|j| j.sampler = SamplerKind::Euler),
        Box::new(|j| j.scheduler = ScheduleKind::Karras),
        Box::new(|j| j.clip_skip = 2),
        Box::new(|j| j.model = PathBuf::from("other.safetensors")),
        Box::new(|j| j.vae = Some(PathBuf::from("vae.safetensors"))),
        Box::new(|j| j.prediction = Some(Prediction::Eps)),
        Box::new(|j| j.prediction = Some(Prediction::V)),
        Box::new(|j| j.size_cond.original = Some((1024, 1024))),
        Box::new(|j| j.size_cond.crop = (0, 8)),
        Box::new(|j| j.size_cond.target = Some((512, 512))),
    ];
    for (k, change) in variants.iter().enumerate() {
        let mut j = job.clone();
        change(&mut j);
        assert_ne!(output_name(0, &j), name, "variant {k} must rename");
    }
    assert_ne!(output_name(1, &job), name, "the index is part of the name");
}
