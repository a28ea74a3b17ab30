//! Whole txt2img runs against diffusers: the golden runs (initial and step noise given) and the e2e
//! runs (seed only, through the public API), plus single file vs diffusers folder.

mod common;

use std::path::PathBuf;

use common::{read_tensors, tiny};
use sdcap::job::{Job, RngKind, SamplerKind, ScheduleKind};
use sdcap::pipeline::{self, Models};

/// (sampler, scheduler) for a fixture run name.
fn sampler_of(name: &str) -> (SamplerKind, ScheduleKind) {
    match name {
        "dpmpp_2m_karras" => (SamplerKind::DpmPp2m, ScheduleKind::Karras),
        "dpmpp_2m_sde" => (SamplerKind::DpmPp2mSde, ScheduleKind::Discrete),
        "dpmpp_2m_sde_karras" => (SamplerKind::DpmPp2mSde, ScheduleKind::Karras),
        other => (other.parse().unwrap(), ScheduleKind::Discrete),
    }
}

fn job(model: PathBuf, prompt: &str, sampler: &str, cfg: f32, seed: u64) -> Job {
    let (sampler, scheduler) = sampler_of(sampler);
    Job {
        model,
        vae: None,
        prompt: prompt.into(),
        negative: None,
        width: 64,
        height: 64,
        steps: 4,
        cfg_scale: cfg,
        sampler,
        scheduler,
        seed,
        clip_skip: 1,
        rng: RngKind::Cpu,
        ram_cap: None,
        prediction: None,
        size_cond: Default::default(),
        ..Job::new(PathBuf::new(), "")
    }
}

#[test]
fn golden_runs_match_diffusers() {
    common::compute_threads();
    let manifest = common::read_manifest(&tiny("golden/manifest.json"));
    let prompt = manifest["prompts"][0].as_str().unwrap();
    let runs = manifest["runs"].as_object().unwrap();
    assert_eq!(runs.len(), 5);
    let model = tiny("tiny-sd-fp32.safetensors");
    let models = Models::load(&job(model.clone(), prompt, "euler", 7.5, 0)).unwrap();
    for (name, run) in runs {
        let refs = read_tensors(&tiny(&format!("golden/txt2img_{name}.safetensors")));
        let cfg = refs["guidance_scale"].data[0];
        let job = job(model.clone(), prompt, name, cfg, 0);
        let steps: Vec<Vec<f32>> = (0..)
            .map_while(|i| refs.get(&format!("step_noise.{i}")).map(|t| t.data.clone()))
            .collect();
        let recorded = run["recorded_noises"].as_u64().unwrap();
        assert_eq!(steps.len() as u64, recorded, "{name}: step noise count");
        let mut noise = common::Recorded(steps.into());
        let initial = refs["initial_noise"].data.clone();
        let got =
            pipeline::generate_from_noise(&models, &job, initial, &mut noise, &mut |_| {}).unwrap();
        assert!(
            noise.0.is_empty(),
            "{name}: sampler drew less noise than diffusers did"
        );
        common::assert_run_matches(name, &got, &refs);
    }
}

/// The job of a seeded e2e case on the tiny SD1 model.
fn case_job(case: &serde_json::Value) -> Job {
    let mut job = job(
        tiny("tiny-sd-fp32.safetensors"),
        case["prompt"].as_str().unwrap(),
        case["sampler"].as_str().unwrap(),
        case["cfg"].as_f64().unwrap() as f32,
        case["seed"].as_u64().unwrap(),
    );
    job.negative = Some(case["negative"].as_str().unwrap().into());
    job.steps = case["steps"].as_u64().unwrap() as u32;
    job.clip_skip = case["clip_skip"].as_u64().unwrap() as u32;
    job
}

#[test]
fn seeded_runs_match_diffusers_end_to_end() {
    common::compute_threads();
    let manifest = common::read_manifest(&tiny("e2e/manifest.json"));
    let cases = manifest["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let job = case_job(case);
        let got = pipeline::txt2img(&job, &mut |_| {}).unwrap();
        common::assert_run_matches(
            name,
            &got,
            &read_tensors(&tiny(&format!("e2e/{name}.safetensors"))),
        );
    }
}

/// Issue 15's samplers, seeded through the public API like `seeded_runs_match_diffusers_end_to_end`
/// (same bounds): the initial latent and DPM++ 2M SDE's per-step noise come from one torch generator.
#[test]
fn seeded_runs_of_more_samplers_match_diffusers() {
    common::compute_threads();
    let manifest = common::read_manifest(&tiny("e2e-samplers/manifest.json"));
    let cases = manifest["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let job = case_job(case);
        let mut evaluations = 0;
        let got = pipeline::txt2img(&job, &mut |e| {
            if let pipeline::Event::Step { index, total } = e {
                evaluations = total;
                assert!(index <= total);
            }
        })
        .unwrap();
        // Progress counts UNet evaluations: one per diffusers timestep (Heun and DPM2: 2N-1).
        let timesteps = case["timesteps"].as_array().unwrap().len();
        assert_eq!(evaluations, timesteps, "{name}: evaluations");
        common::assert_run_matches(
            name,
            &got,
            &read_tensors(&tiny(&format!("e2e-samplers/{name}.safetensors"))),
        );
    }
}

#[test]
fn diffusers_folder_gives_identical_output() {
    common::compute_threads();
    let single = job(
        tiny("tiny-sd-fp32.safetensors"),
        "a photo of a cat",
        "euler_a",
        7.5,
        42,
    );
    let folder = Job {
        model: tiny("diffusers"),
        ..single.clone()
    };
    let a = pipeline::txt2img(&single, &mut |_| {}).unwrap();
    let b = pipeline::txt2img(&folder, &mut |_| {}).unwrap();
    assert_eq!(a.latent, b.latent);
    assert_eq!(a.image, b.image);
}

#[test]
fn output_bits_do_not_depend_on_thread_count() {
    let job = job(
        tiny("tiny-sd-fp32.safetensors"),
        "a photo of a cat",
        "euler_a",
        7.5,
        7,
    );
    let job = Job {
        width: 128,
        height: 96,
        ..job
    };
    let run = |threads: usize| {
        let pool = sdcap::kernels::compute_pool(threads).build().unwrap();
        pool.install(|| pipeline::txt2img(&job, &mut |_| {}).unwrap())
    };
    let (one, two) = (run(1), run(2));
    assert_eq!(one.latent, two.latent);
    assert_eq!(one.image, two.image);
}
