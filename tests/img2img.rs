//! img2img against diffusers' StableDiffusionImg2ImgPipeline (`tiny-sd/workflows/img2img/`): the
//! given-noise cases (encode, img2img and step noise fed by role), the seeded e2e cases (one
//! generator through `pipeline::generate_from`), the schedule slice and `add_noise` of every sampler,
//! and the same bits under other plans.

mod common;
#[path = "common/given_draws.rs"]
mod given_draws;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;

use common::{read_manifest, read_tensors, tiny};
use given_draws::GivenDraws;
use sdcap::init_image::InitImage;
use sdcap::job::{Job, SamplerKind, ScheduleKind};
use sdcap::pipeline::{self, Models};
use sdcap::sampling;
use sdcap::Tensor;

/// (sampler, scheduler) for a fixture sampler name.
pub fn sampler_of(name: &str) -> (SamplerKind, ScheduleKind) {
    match name {
        "dpmpp_2m_karras" => (SamplerKind::DpmPp2m, ScheduleKind::Karras),
        other => (other.parse().unwrap(), ScheduleKind::Discrete),
    }
}

fn model() -> std::path::PathBuf {
    tiny("tiny-sd-fp32.safetensors")
}

/// The job of a manifest case (the init image path only marks the job as img2img: the pixels come
/// as an `InitImage`).
/// `pipeline::generate_from` with the job's one generator, no cancel, no events.
fn from_init(models: &Models, job: &Job, init: &InitImage) -> sdcap::Result<pipeline::Generated> {
    pipeline::generate_from(
        models,
        job,
        Some(init),
        &AtomicBool::new(false),
        &mut |_| {},
    )
}

fn case_job(case: &serde_json::Value) -> Job {
    let (sampler, scheduler) = sampler_of(case["sampler"].as_str().unwrap());
    let mut job = Job::new(model(), case["prompt"].as_str().unwrap());
    job.negative = Some(case["negative"].as_str().unwrap().into());
    job.width = case["width"].as_u64().unwrap() as u32;
    job.height = case["height"].as_u64().unwrap() as u32;
    job.steps = case["steps"].as_u64().unwrap() as u32;
    job.cfg_scale = case["cfg"].as_f64().unwrap() as f32;
    job.sampler = sampler;
    job.scheduler = scheduler;
    job.strength = case["strength"].as_f64().unwrap() as f32;
    job.seed = case["seed"].as_u64().unwrap_or(0);
    job.init_image = Some(tiny("workflows/inputs/init_64x64.png"));
    job
}

fn init_of(common: &HashMap<String, Tensor>, job: &Job) -> InitImage {
    InitImage {
        image: common[&format!("init_image_{}x{}", job.width, job.height)].clone(),
        mask: None,
        resized_from: None,
    }
}

fn cases() -> Vec<serde_json::Value> {
    let manifest = read_manifest(&tiny("workflows/img2img/manifest.json"));
    manifest["cases"].as_array().unwrap().clone()
}

/// Every `_given` case: draws fed by role. The final latent within `LATENT_TOL` (1e-3; diffusers'
/// own float32 runs agree to ~1e-5 relative, latents reach |x| ~ 12, and the VAE encode adds its
/// summation order to the UNet's) and the 8-bit image within ±1 on all but 0.1% of values, as the
/// txt2img goldens. The step count is diffusers' `steps_run`.
#[test]
fn given_noise_cases_match_diffusers() {
    common::compute_threads();
    let common_t = read_tensors(&tiny("workflows/img2img/common.safetensors"));
    let cases: Vec<_> = cases()
        .into_iter()
        .filter(|c| c["mode"] == "given")
        .collect();
    assert_eq!(cases.len(), 14);
    let models = Models::load(&case_job(&cases[0])).unwrap();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let job = case_job(case);
        let refs = read_tensors(&tiny(&format!("workflows/img2img/{name}.safetensors")));
        let mut draws = GivenDraws {
            encode: [refs["encode_noise"].data.clone()].into(),
            initial: [refs["noise"].data.clone()].into(),
            step: GivenDraws::steps_of(&refs),
        };
        let mut evaluations = 0;
        let got = pipeline::generate_from_draws(
            &models,
            &job,
            Some(&init_of(&common_t, &job)),
            &mut draws,
            &mut |e| {
                if let pipeline::Event::Step { total, .. } = e {
                    evaluations = total;
                }
            },
        )
        .unwrap();
        draws.assert_used_up(name);
        assert_eq!(
            evaluations as u64,
            case["steps_run"].as_u64().unwrap(),
            "{name}: steps run"
        );
        common::assert_run_matches(name, &got, &refs);
    }
}

/// Every `_e2e` case: one torch generator seeded with the case's seed draws the encode noise, the
/// img2img noise and Euler a's step noise in diffusers' order (same bounds as the given cases).
#[test]
fn seeded_cases_match_diffusers_end_to_end() {
    common::compute_threads();
    let common_t = read_tensors(&tiny("workflows/img2img/common.safetensors"));
    let cases: Vec<_> = cases().into_iter().filter(|c| c["mode"] == "e2e").collect();
    assert_eq!(cases.len(), 14);
    let models = Models::load(&case_job(&cases[0])).unwrap();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let job = case_job(case);
        assert_eq!(job.seed, 42);
        let refs = read_tensors(&tiny(&format!("workflows/img2img/{name}.safetensors")));
        let got = from_init(&models, &job, &init_of(&common_t, &job)).unwrap();
        common::assert_run_matches(name, &got, &refs);
    }
}

/// The manifest's schedule numbers for every case: `init_timestep`/`t_start` from (steps, strength),
/// the timesteps run, and the `add_noise` coefficients of the start latent.
#[test]
fn strength_picks_the_timesteps_and_add_noise_of_diffusers() {
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let job = case_job(&case);
        let t_start = sdcap::img2img::t_start(job.steps, job.strength);
        assert_eq!(t_start as u64, case["t_start"].as_u64().unwrap(), "{name}");
        let full = sampling::schedule(job.sampler, job.scheduler, job.steps as usize).unwrap();
        let s = full.begin_at(t_start).unwrap();
        let want: Vec<f32> = case["timesteps_run"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(s.timesteps, want, "{name}: timesteps");
        let (a, b) = s.add_noise_coeffs(0);
        let want_a = case["add_noise"]["a"].as_f64().unwrap() as f32;
        let want_b = case["add_noise"]["b"].as_f64().unwrap() as f32;
        assert!(
            (a - want_a).abs() <= 1e-6 && (b - want_b).abs() <= 1e-6,
            "{name}: add_noise ({a}, {b}) vs ({want_a}, {want_b})"
        );
    }
}

/// Every sampler's schedule beginning late is diffusers' `timesteps[t_start * order:]` and
/// `sigmas[t_start * order:]` (order 2 for Heun and DPM2, whose tables repeat inner entries), and
/// its `add_noise` at the start is that scheduler class's: sigma-based `x0 + sigma * noise`,
/// DPM-Solver++/UniPC `alpha_t x0 + sigma_t noise`, DDIM/LCM `sqrt(a_t) x0 + sqrt(1 - a_t) noise`.
#[test]
fn every_sampler_begins_late_on_the_slice_of_its_full_schedule() {
    let steps = 10;
    for &name in SamplerKind::NAMES {
        let sampler: SamplerKind = name.parse().unwrap();
        let full = sampling::schedule(sampler, ScheduleKind::Discrete, steps).unwrap();
        let order = if matches!(sampler, SamplerKind::Heun | SamplerKind::Dpm2) {
            2
        } else {
            1
        };
        for t_start in [0, 3, steps - 1] {
            let s = full.begin_at(t_start).unwrap();
            assert_eq!(s.steps(), steps - t_start, "{name}");
            assert_eq!(s.begin(), t_start, "{name}");
            assert_eq!(s.full_steps(), steps, "{name}");
            assert_eq!(s.timesteps, full.timesteps[t_start * order..], "{name}");
            // Heun and DPM2 evaluate twice per step but the last.
            assert_eq!(s.timesteps.len(), order * (steps - t_start) - (order - 1));
            let (a, b) = s.add_noise_coeffs(0);
            let t = s.timesteps[0];
            match &full.sigmas {
                Some(sigmas) => {
                    let sigma = sigmas[t_start * order];
                    assert_eq!(s.sigmas.as_ref().unwrap()[..], sigmas[t_start * order..]);
                    if matches!(
                        sampler,
                        SamplerKind::DpmPp2m | SamplerKind::DpmPp2mSde | SamplerKind::UniPc
                    ) {
                        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
                        assert_eq!((a, b), (alpha, sigma * alpha), "{name}");
                    } else {
                        assert_eq!((a, b), (1.0, sigma), "{name}");
                    }
                }
                None => {
                    let ac = full.alphas_cumprod()[t as usize];
                    assert_eq!((a, b), (ac.sqrt(), (1.0 - ac).sqrt()), "{name}");
                }
            }
            let x0 = [0.5f32, -2.0];
            let noise = [1.0f32, 0.25];
            let got = s.add_noise(0, &x0, &noise);
            for i in 0..2 {
                assert!(
                    (got[i] - (a * x0[i] + b * noise[i])).abs() <= 1e-6,
                    "{name}"
                );
            }
        }
        assert!(full.begin_at(steps).is_err(), "{name}: no step left");
    }
}

/// Every sampler runs an img2img job to the end (strength 0.5 of 4 steps: 2 steps from the middle,
/// Heun and DPM2 3 evaluations) and draws step noise exactly as often as its txt2img run of those
/// steps would; the output is finite and not the txt2img one.
#[test]
fn every_sampler_runs_img2img() {
    common::compute_threads();
    let common_t = read_tensors(&tiny("workflows/img2img/common.safetensors"));
    let mut base = Job::new(model(), "a photo of a cat");
    base.width = 64;
    base.height = 64;
    base.steps = 4;
    base.strength = 0.5;
    base.init_image = Some(tiny("workflows/inputs/init_64x64.png"));
    let models = Models::load(&base).unwrap();
    for &name in SamplerKind::NAMES {
        let job = Job {
            sampler: name.parse().unwrap(),
            ..base.clone()
        };
        let mut evaluations = 0;
        let got = pipeline::generate_from(
            &models,
            &job,
            Some(&init_of(&common_t, &job)),
            &AtomicBool::new(false),
            &mut |e| {
                if let pipeline::Event::Step { total, .. } = e {
                    evaluations = total;
                }
            },
        )
        .unwrap();
        let two_evals = matches!(job.sampler, SamplerKind::Heun | SamplerKind::Dpm2);
        assert_eq!(evaluations, if two_evals { 3 } else { 2 }, "{name}");
        assert!(got.latent.data.iter().all(|v| v.is_finite()), "{name}");
    }
}

/// The same bits whatever the plan: uncapped (first scratch tier, whole maps) and under a cap
/// that only the smallest tier with streaming and banded VAE decoding fits.
#[test]
fn img2img_bits_do_not_depend_on_the_plan() {
    use sdcap::governor::{self, Budget, BudgetSource, Residency};
    common::compute_threads();
    let common_t = read_tensors(&tiny("workflows/img2img/common.safetensors"));
    let case = cases()
        .into_iter()
        .find(|c| c["name"] == "euler_a_str0.6_64x96_e2e")
        .unwrap();
    let loose = case_job(&case);
    let models = Models::load(&loose).unwrap();
    let budget = |bytes: u64| Budget {
        limit_bytes: bytes,
        source: BudgetSource::Flag,
        margin_bytes: governor::budget::margin_for(bytes),
        backend_bytes: 0,
    };
    let peak = governor::plan::predict(
        &models,
        &loose,
        &budget(1 << 40),
        Residency::Stream,
        sdcap::kernels::scratch::SMALLEST,
    )
    .peak_bytes();
    let mut limit = peak;
    while budget(limit).usable_bytes() < peak {
        limit += 1 << 18;
    }
    let tight = Job {
        ram_cap: Some(limit),
        ..loose.clone()
    };
    let run = |job: &Job| from_init(&models, job, &init_of(&common_t, job)).unwrap();
    let (a, b) = (run(&loose), run(&tight));
    assert_ne!(a.plan.scratch, b.plan.scratch, "the cap changes the plan");
    assert!(a.latent.data == b.latent.data, "latent differs");
    assert!(a.image.pixels == b.image.pixels, "image differs");
}

/// Bad img2img input is one error before any work: an init tensor of the wrong size, a strength
/// that runs no step.
#[test]
fn mismatched_init_and_zero_step_strength_are_refused() {
    let common_t = read_tensors(&tiny("workflows/img2img/common.safetensors"));
    let case = cases()
        .into_iter()
        .find(|c| c["name"] == "euler_str0.3_64x64_given")
        .unwrap();
    let job = case_job(&case);
    let models = Models::load(&job).unwrap();
    let wrong = Job {
        height: 96,
        ..job.clone()
    };
    let init = init_of(&common_t, &job);
    let e = from_init(&models, &wrong, &init).err().expect("refused");
    assert!(matches!(e, sdcap::Error::BadRequest(_)), "{e}");
    let zero = Job {
        strength: 0.1,
        ..job.clone()
    };
    let e = from_init(&models, &zero, &init).err().expect("refused");
    assert!(e.to_string().contains("runs no step"), "{e}");
}

/// The plan counts what img2img and inpainting hold through the run (init image, mask, init
/// latents, noise, masked-image latent, …) in every stage: more than txt2img's plan by exactly
/// `img2img::held_bytes`, more again with a mask, nothing for txt2img.
#[test]
fn plan_counts_what_img2img_holds() {
    use sdcap::governor::{self, Budget, BudgetSource, Residency};
    let mut txt = Job::new(model(), "a photo of a cat");
    txt.width = 512;
    txt.height = 512;
    let models = Models::load(&txt).unwrap();
    let budget = Budget {
        limit_bytes: 1 << 40,
        source: BudgetSource::Flag,
        margin_bytes: 0,
        backend_bytes: 0,
    };
    let scratch = sdcap::kernels::scratch::TIERS[0];
    let predict =
        |job: &Job| governor::plan::predict(&models, job, &budget, Residency::Keep, scratch);
    let img = Job {
        init_image: Some(tiny("workflows/inputs/init_64x64.png")),
        ..txt.clone()
    };
    let inpaint = Job {
        mask: Some(tiny("workflows/inputs/mask_64x64.png")),
        ..img.clone()
    };
    assert_eq!(sdcap::img2img::held_bytes(&txt), 0);
    let held = sdcap::img2img::held_bytes(&img);
    // At least the image (3 f32 planes) and three latents.
    assert!(held >= 512 * 512 * 12 + 3 * 64 * 64 * 16, "{held}");
    assert!(sdcap::img2img::held_bytes(&inpaint) > held);
    let (a, b) = (predict(&txt), predict(&img));
    // Every stage of txt2img holds them too (img2img adds its own `image_encode` stage).
    for s in &a.stages {
        let t = b.stages.iter().find(|t| t.name == s.name).unwrap();
        assert_eq!(t.peak_bytes - s.peak_bytes, held, "{}", s.name);
    }
    assert!(b.stages.iter().any(|t| t.name == "image_encode"));
}

/// A job that names an init image never runs as txt2img: `generate` reads the picture itself (the
/// same run as handing the loaded picture over), and a picture handed over for a job that names
/// none is refused (the plan counts it from the job).
#[test]
fn job_and_init_image_must_agree() {
    let common_t = read_tensors(&tiny("workflows/img2img/common.safetensors"));
    let case = cases()
        .into_iter()
        .find(|c| c["name"] == "euler_str0.3_64x64_given")
        .unwrap();
    let job = case_job(&case);
    let models = Models::load(&job).unwrap();
    let by_job = pipeline::generate(&models, &job, &mut |_| {}).unwrap();
    let loaded = sdcap::init_image::load(&job).unwrap().unwrap();
    let by_value = from_init(&models, &job, &loaded);
    assert_eq!(by_job.latent.data, by_value.unwrap().latent.data);
    let plain = pipeline::generate(
        &models,
        &Job {
            init_image: None,
            ..job.clone()
        },
        &mut |_| {},
    );
    assert_ne!(
        by_job.latent.data,
        plain.unwrap().latent.data,
        "img2img, not txt2img"
    );
    let txt = Job {
        init_image: None,
        ..job.clone()
    };
    let init = init_of(&common_t, &job);
    let e = from_init(&models, &txt, &init).err().expect("refused");
    assert!(e.to_string().contains("names no init image"), "{e}");
}

/// With `--taesd` (decoding the image) TAESD also encodes the init image, as stable-diffusion.cpp
/// does: deterministic latents, so no encode draw is taken from the generator (diffusers'
/// `retrieve_latents` reads `AutoencoderTiny`'s `.latents`), and the run differs from the VAE's.
#[test]
fn taesd_encodes_the_init_image_without_a_draw() {
    struct NoEncodeDraw(sdcap::sampling::rng::TorchRng);
    impl pipeline::Draws for NoEncodeDraw {
        fn encode(&mut self, _: &[usize]) -> Vec<f32> {
            panic!("a TAESD encoding draws nothing")
        }
        fn initial(&mut self, shape: &[usize]) -> Vec<f32> {
            self.0.randn(shape)
        }
        fn step(&mut self, shape: &[usize]) -> Vec<f32> {
            self.0.randn(shape)
        }
    }
    let common_t = read_tensors(&tiny("workflows/img2img/common.safetensors"));
    let case = cases()
        .into_iter()
        .find(|c| c["name"] == "euler_str0.6_64x64_e2e")
        .unwrap();
    let vae_job = case_job(&case);
    let job = Job {
        taesd: Some(common::fixtures().join("tiny-taesd/diffusers")),
        ..vae_job.clone()
    };
    let models = Models::load(&job).unwrap();
    let init = init_of(&common_t, &job);
    let rng = || NoEncodeDraw(sdcap::sampling::rng::TorchRng::new(job.seed));
    let run = |j: &Job| {
        pipeline::generate_from_draws(&models, j, Some(&init), &mut rng(), &mut |_| {}).unwrap()
    };
    let with_taesd = run(&job);
    // Only the encoder differs: TAESD-only previews keep the VAE for encode and decode.
    let preview_only = Job {
        preview: sdcap::job::Preview {
            taesd_only: true,
            ..job.preview.clone()
        },
        ..job.clone()
    };
    let vae_models = Models::load(&vae_job).unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pipeline::generate_from_draws(
            &vae_models,
            &preview_only,
            Some(&init),
            &mut rng(),
            &mut |_| {},
        )
    }));
    assert!(caught.is_err(), "the VAE encode takes its draw");
    assert!(with_taesd.latent.data.iter().all(|v| v.is_finite()));
    let with_vae = from_init(&vae_models, &vae_job, &init);
    assert_ne!(with_taesd.latent.data, with_vae.unwrap().latent.data);
}
