//! Samplers for the SD2.x and SDXL families against diffusers 0.42.1 goldens (fixtures/tiny-sd2/golden,
//! tiny-sdxl/golden): v-prediction (SD2.1-768-v) and `--scheduler trailing` (SD-Turbo, SDXL-Turbo).
//!
//! As in tests/sampling.rs the runs are replayed without a network: the model callback checks its input
//! against the recorded `unet_input.i` and answers with the recorded `unet_output.i` (CFG-combined with
//! the run's guidance; batch 1 without CFG), step noise comes from the recorded `step_noise.i`. Samplers
//! without a diffusers golden for v-prediction are checked by an identity instead: a v-model built from
//! an epsilon-model must give the epsilon run's latents.

mod common;
#[path = "common/sampling_support.rs"]
mod support;

use support::*;

use std::collections::BTreeMap;
use std::path::PathBuf;

use sdcap::family::Prediction;
use sdcap::job::{SamplerKind, ScheduleKind};
use sdcap::sampling::{sample, schedule, schedule::alphas_cumprod, NoiseSource, Schedule};
use serde_json::Value;

const FAMILIES: [&str; 2] = ["tiny-sd2", "tiny-sdxl"];

fn golden_dir(family: &str) -> PathBuf {
    common::fixtures().join(family).join("golden")
}

/// What a run (or a scheduler table) asks of sdcap: sampler, schedule kind and prediction, from a
/// diffusers scheduler class and its (base config + overrides). Anything not modelled panics, so a new
/// fixture cannot be skipped silently.
fn kinds(class: &str, config: &Value) -> (SamplerKind, ScheduleKind, Prediction) {
    let karras = config["use_karras_sigmas"].as_bool().unwrap_or(false);
    let spacing = config["timestep_spacing"]
        .as_str()
        .expect("timestep_spacing");
    let scheduler = match (karras, spacing) {
        (true, "leading") => ScheduleKind::Karras,
        (false, "leading") => ScheduleKind::Discrete,
        (false, "trailing") => ScheduleKind::Trailing,
        other => panic!("schedule {other:?} is not modelled"),
    };
    let prediction = match config["prediction_type"].as_str() {
        Some("epsilon") => Prediction::Eps,
        Some("v_prediction") => Prediction::V,
        other => panic!("prediction type {other:?} is not modelled"),
    };
    let sampler = match class {
        "EulerDiscreteScheduler" => SamplerKind::Euler,
        "EulerAncestralDiscreteScheduler" => SamplerKind::EulerA,
        "DPMSolverMultistepScheduler" => {
            assert_eq!(config["solver_order"], 2);
            assert_eq!(config["algorithm_type"], "dpmsolver++");
            SamplerKind::DpmPp2m
        }
        "DDIMScheduler" => SamplerKind::Ddim,
        other => panic!("fixture uses scheduler {other}, which this test does not map"),
    };
    (sampler, scheduler, prediction)
}

/// The training-schedule settings sdcap hard-wires, for every run of both families (prediction type and
/// spacing are read by `kinds`).
#[test]
fn fixture_configs_are_the_modelled_ones() {
    use serde_json::json;
    let required = [
        ("num_train_timesteps", json!(1000)),
        ("beta_start", json!(0.00085)),
        ("beta_end", json!(0.012)),
        ("beta_schedule", json!("scaled_linear")),
        ("steps_offset", json!(1)),
        ("set_alpha_to_one", json!(false)),
    ];
    // Checked where a scheduler has them.
    let optional = [
        ("rescale_betas_zero_snr", json!(false)),
        ("clip_sample", json!(false)),
        ("thresholding", json!(false)),
        ("interpolation_type", json!("linear")),
        ("final_sigmas_type", json!("zero")),
        ("solver_type", json!("midpoint")),
        ("lower_order_final", json!(true)),
        ("euler_at_final", json!(false)),
        ("timestep_type", json!("discrete")),
        ("use_exponential_sigmas", json!(false)),
        ("use_beta_sigmas", json!(false)),
        ("use_flow_sigmas", json!(false)),
    ];
    for family in FAMILIES {
        let manifest = json(&golden_dir(family).join("manifest.json"));
        for (name, run) in manifest["runs"].as_object().expect("runs") {
            let c = &run["scheduler_config"];
            for (key, value) in &required {
                assert_eq!(&c[key], value, "{family} {name}: {key}");
            }
            for (key, value) in optional.iter().filter(|(k, _)| !c[k].is_null()) {
                assert_eq!(&c[key], value, "{family} {name}: {key}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Comparisons

/// Timesteps exactly, sigmas and init_noise_sigma to TABLE_TOL.
fn check_schedule(what: &str, s: &Schedule, timesteps: &[f64], sigmas: Option<&[f64]>, init: f64) {
    let ours: Vec<f64> = s.timesteps.iter().map(|&t| f64::from(t)).collect();
    assert_eq!(ours, timesteps, "{what}: timesteps");
    match (&s.sigmas, sigmas) {
        (None, None) => {}
        (Some(ours), Some(theirs)) => {
            let err = elementwise_rel_err(ours, theirs);
            assert!(err <= TABLE_TOL, "{what}: sigmas rel err {err:e}");
        }
        (ours, theirs) => panic!("{what}: sigmas {ours:?} vs {theirs:?}"),
    }
    let err = elementwise_rel_err(&[s.init_noise_sigma], &[init]);
    assert!(
        err <= TABLE_TOL,
        "{what}: init_noise_sigma {} vs {init}",
        s.init_noise_sigma
    );
}

// ---------------------------------------------------------------------------------------------------------
// Scheduler tables

/// Every table of both families' scheduler_tables.json, trailing included ("euler_a/timestep_spacing=
/// trailing/N" for SDXL-Turbo, ".../prediction_type=epsilon/timestep_spacing=trailing/N" for SD-Turbo),
/// N in 1, 2, 4, 20, 30.
#[test]
fn schedules_match_scheduler_tables() {
    let classes: BTreeMap<&str, &str> = [
        ("euler", "EulerDiscreteScheduler"),
        ("euler_a", "EulerAncestralDiscreteScheduler"),
        ("ddim", "DDIMScheduler"),
        ("dpmpp_2m_karras", "DPMSolverMultistepScheduler"),
    ]
    .into_iter()
    .collect();
    let mut trailing_seen = 0;
    for family in FAMILIES {
        let tables = json(&golden_dir(family).join("scheduler_tables.json"));
        let base = &tables["base_config"];
        let expected = floats(&tables["tables"]["alphas_cumprod"]);
        let ours = alphas_cumprod();
        assert!(
            (0..1000).all(|i| ours[i] == expected[i] as f32),
            "{family}: alphas_cumprod"
        );
        for (key, table) in tables["tables"].as_object().expect("tables") {
            if key == "alphas_cumprod" {
                continue;
            }
            let parts: Vec<&str> = key.split('/').collect();
            let (name, overrides, n) =
                (parts[0], &parts[1..parts.len() - 1], parts[parts.len() - 1]);
            let n: usize = n.parse().expect("N");
            let mut config = base.clone();
            if name == "dpmpp_2m_karras" {
                config["use_karras_sigmas"] = Value::Bool(true);
                config["solver_order"] = 2.into();
                config["algorithm_type"] = "dpmsolver++".into();
            }
            for o in overrides {
                let (k, v) = o.split_once('=').expect("key=value");
                config[k] = v.into();
            }
            let class = classes[name];
            let (sampler, scheduler, _) = kinds(class, &config);
            trailing_seen += usize::from(scheduler == ScheduleKind::Trailing);
            let s = schedule(sampler, scheduler, n).expect("schedule");
            let sigmas = (!table["sigmas"].is_null()).then(|| floats(&table["sigmas"]));
            check_schedule(
                &format!("{family} {key}"),
                &s,
                &floats(&table["timesteps"]),
                sigmas.as_deref(),
                table["init_noise_sigma"]
                    .as_f64()
                    .expect("init_noise_sigma"),
            );
        }
    }
    assert_eq!(trailing_seen, 10, "trailing tables of both families");
}

// ---------------------------------------------------------------------------------------------------------
// Replays

#[derive(Default, Debug)]
struct Errors {
    unet_input: f64,
    latents: f64,
    final_latents: f64,
}

/// Replays one golden run: the model checks its input against `unet_input.i` (the cond half of a CFG
/// batch) and the timestep against `timesteps[i]`, and returns `unet_output.i` combined as the pipeline
/// does (u + g (c - u), or the lone output without CFG); the latent after each step is compared with
/// `latents_after_step.i` (through the next model input, which is it scaled by scale_model_input) and
/// the result with the last step and `final_latents`.
fn replay(sampler: SamplerKind, s: &Schedule, prediction: Prediction, run: &Tensors) -> Errors {
    let n = s.timesteps.len();
    let guidance = run.get("guidance_scale")[0];
    let timesteps = run.get("timesteps").to_vec();
    let latent_len = run.get("initial_noise").len();
    let scaled = !matches!(sampler, SamplerKind::DpmPp2m | SamplerKind::Ddim);
    let sigmas = s.sigmas.clone();
    let mut errors = Errors::default();
    let mut calls = 0usize;
    let mut model = |input: &[f32], t: f32| -> sdcap::Result<Vec<f32>> {
        let i = calls;
        calls += 1;
        assert_eq!(t, timesteps[i], "step {i}: timestep");
        let recorded = run.get(&format!("unet_input.{i}"));
        errors.unet_input = errors
            .unet_input
            .max(rel_err(input, &recorded[recorded.len() - latent_len..]));
        if i > 0 {
            let prev = run.get(&format!("latents_after_step.{}", i - 1));
            let scale = match (&sigmas, scaled) {
                (Some(sg), true) => (sg[i] * sg[i] + 1.0).sqrt(),
                _ => 1.0,
            };
            let expected: Vec<f32> = prev.iter().map(|v| v / scale).collect();
            errors.latents = errors.latents.max(rel_err(input, &expected));
        }
        let out = run.get(&format!("unet_output.{i}"));
        Ok(guided(out, latent_len, guidance))
    };
    let mut noise = Recorded::from_run(run);
    let mut done = Vec::new();
    let out = sample(
        sampler,
        s,
        prediction,
        run.get("initial_noise").to_vec(),
        &mut model,
        &mut noise,
        &mut |i, n| done.push((i, n)),
    )
    .expect("sample");
    assert_eq!(calls, n, "model calls");
    assert_eq!(noise.taken, noise.draws.len(), "step noise draws");
    assert_eq!(done, (0..n).map(|i| (i, n)).collect::<Vec<_>>(), "on_step");
    errors.latents = errors.latents.max(rel_err(
        &out,
        run.get(&format!("latents_after_step.{}", n - 1)),
    ));
    errors.final_latents = rel_err(&out, run.get("final_latents"));
    errors
}

/// Every txt2img run of one family's golden manifest (and a file for each, and no other file).
fn replay_family(family: &str) -> Vec<String> {
    let dir = golden_dir(family);
    let manifest = json(&dir.join("manifest.json"));
    let runs = manifest["runs"].as_object().expect("runs");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("golden dir")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            Some(
                name.strip_prefix("txt2img_")?
                    .strip_suffix(".safetensors")?
                    .to_string(),
            )
        })
        .collect();
    files.sort();
    assert_eq!(
        files,
        runs.keys().cloned().collect::<Vec<_>>(),
        "{family}: runs"
    );
    for (name, run) in runs {
        let class = run["scheduler_class"].as_str().expect("scheduler_class");
        let (sampler, scheduler, prediction) = kinds(class, &run["scheduler_config"]);
        let t = Tensors::load(&dir.join(format!("txt2img_{name}.safetensors")));
        let n = t.get("timesteps").len();
        let s = schedule(sampler, scheduler, n).expect("schedule");
        let to64 = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
        check_schedule(
            &format!("{family} {name}"),
            &s,
            &to64(t.get("timesteps")),
            t.0.get("sigmas").map(|v| to64(v)).as_deref(),
            f64::from(t.get("init_noise_sigma")[0]),
        );
        let e = replay(sampler, &s, prediction, &t);
        println!("{family} {name} ({sampler} {scheduler} {prediction}): {e:?}");
        let worst = e.unet_input.max(e.latents).max(e.final_latents);
        assert!(
            worst <= LATENT_TOL,
            "{family} {name}: rel err above {LATENT_TOL:e}: {e:?}"
        );
    }
    runs.keys().cloned().collect()
}

/// SD2: v-prediction with Euler, Euler a, DPM++ 2M Karras and DDIM (64x64 and 96x64), epsilon Euler,
/// and the SD-Turbo-style 1-step Euler a with trailing spacing and no CFG.
#[test]
fn sd2_golden_txt2img_replays() {
    let runs = replay_family("tiny-sd2");
    for name in [
        "v_euler",
        "v_euler_a",
        "v_ddim",
        "v_dpmpp_2m_karras",
        "eps_euler",
        "turbo_1step",
    ] {
        assert!(runs.iter().any(|r| r == name), "{name} replayed");
    }
}

/// SDXL: Euler, Euler a, DPM++ 2M Karras (64x64, 64x96), zero uncond, and SDXL-Turbo-style 1- and
/// 2-step Euler a with trailing spacing (init_noise_sigma = sigma_max, noise drawn on the last step).
#[test]
fn sdxl_golden_txt2img_replays() {
    let runs = replay_family("tiny-sdxl");
    for name in ["turbo_1step", "turbo_2step", "euler", "dpmpp_2m_karras"] {
        assert!(runs.iter().any(|r| r == name), "{name} replayed");
    }
}

// ---------------------------------------------------------------------------------------------------------
// v-prediction for every sampler

const ALL_KINDS: [ScheduleKind; 3] = [
    ScheduleKind::Discrete,
    ScheduleKind::Karras,
    ScheduleKind::Trailing,
];

/// Deterministic stand-in for step noise: the same draws for both runs of a comparison.
struct Fixed(u64);

impl NoiseSource for Fixed {
    fn noise(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| pseudo_normal(&mut self.0)).collect()
    }
}

/// A cheap roughly unit-scale value from a 64-bit LCG (no statistics needed, only determinism).
fn pseudo_normal(state: &mut u64) -> f32 {
    let mut sum = 0.0f32;
    for _ in 0..4 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        sum += (*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
    }
    sum * 1.7
}

/// The VP point (alpha, sigma_t) of each model call: for the sigma-based samplers from the sigma the
/// call is made at (Heun's layout repeats them; DPM2's second call is at the log-space midpoint), for
/// DDIM and LCM from alphas_cumprod at the (integer) timestep.
fn call_points(sampler: SamplerKind, s: &Schedule) -> Vec<(f64, f64)> {
    let from_sigma = |sigma: f64| {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        (alpha, sigma * alpha)
    };
    let calls = s.timesteps.len();
    match (&s.sigmas, sampler) {
        (None, _) => s
            .timesteps
            .iter()
            .map(|&t| {
                let a = f64::from(alphas_cumprod()[t as usize]);
                (a.sqrt(), (1.0 - a).sqrt())
            })
            .collect(),
        (Some(sg), SamplerKind::Dpm2) => {
            let n = s.steps();
            let steps: Vec<f64> = std::iter::once(sg[0])
                .chain(sg[1..].iter().step_by(2).copied())
                .take(n + 1)
                .map(f64::from)
                .collect();
            let mut points = Vec::new();
            for j in 0..n {
                points.push(from_sigma(steps[j]));
                if j + 1 < n {
                    let mid = ((steps[j].ln() + steps[j + 1].ln()) / 2.0).exp();
                    points.push(from_sigma(mid));
                }
            }
            points
        }
        (Some(sg), _) => sg[..calls]
            .iter()
            .map(|&x| from_sigma(f64::from(x)))
            .collect(),
    }
}

/// Runs `sampler` twice on the same initial noise and step noise: once with an epsilon-model E(z) and
/// `Prediction::Eps`, once with `Prediction::V` and the v-model that predicts the same x0 at every call,
/// v = alpha E - sigma_t x0 = (E - sigma_t z) / alpha (z = the model input, a VP latent, for every
/// sampler). Both must reach the same latent. Returns the relative error and the latent's scale.
fn v_matches_eps(sampler: SamplerKind, kind: ScheduleKind, steps: usize) -> (f64, f64) {
    let s = schedule(sampler, kind, steps).expect("schedule");
    let points = call_points(sampler, &s);
    let len = 64;
    let mut seed = 17u64;
    let initial: Vec<f32> = (0..len).map(|_| pseudo_normal(&mut seed)).collect();
    let weights: Vec<Vec<f32>> = (0..points.len())
        .map(|_| (0..len).map(|_| pseudo_normal(&mut seed)).collect())
        .collect();
    // E(z) at call k: mostly the input's own noise, plus a call-dependent part.
    let eps_model = |k: usize, z: &[f32]| -> Vec<f32> {
        z.iter()
            .zip(&weights[k])
            .map(|(z, w)| 0.7 * z + 0.3 * w)
            .collect()
    };
    let run = |prediction: Prediction| -> Vec<f32> {
        let mut k = 0;
        let mut model = |z: &[f32], _t: f32| -> sdcap::Result<Vec<f32>> {
            let e = eps_model(k, z);
            let (alpha, sigma_t) = points[k];
            k += 1;
            Ok(match prediction {
                Prediction::Eps => e,
                Prediction::V => e
                    .iter()
                    .zip(z)
                    .map(|(&e, &z)| ((f64::from(e) - sigma_t * f64::from(z)) / alpha) as f32)
                    .collect(),
            })
        };
        let out = sample(
            sampler,
            &s,
            prediction,
            initial.clone(),
            &mut model,
            &mut Fixed(99),
            &mut |_, _| {},
        )
        .expect("sample");
        assert_eq!(k, points.len(), "model calls");
        out
    };
    let eps = run(Prediction::Eps);
    let v = run(Prediction::V);
    let scale = eps.iter().fold(0f64, |m, &x| m.max(f64::from(x).abs()));
    (rel_err(&v, &eps), scale)
}

/// Every sampler, with every schedule that applies, gives with a v-model the latents it gives with the
/// equivalent epsilon-model. diffusers' formulas differ from the epsilon ones only in float32 rounding
/// (x0 from v: ~3 roundings of terms of x0's size), amplified by the steps that follow (Heun at
/// 2 steps: 2.1e-6, the others ≤ 8e-7); 1e-5 still fails a sampler that reads v as epsilon (errors of order 1) or uses
/// the wrong sigma in the v formula (> 1e-3).
#[test]
fn v_prediction_matches_epsilon_for_every_sampler() {
    let mut checked = 0;
    for sampler in ALL_SAMPLERS {
        for kind in ALL_KINDS {
            for steps in [1, 2, 5] {
                if schedule(sampler, kind, steps).is_err() {
                    // Karras for DDIM/LCM and trailing for LCM are refused (tested below).
                    continue;
                }
                let (err, scale) = v_matches_eps(sampler, kind, steps);
                println!("{sampler} {kind} {steps}: {err:e} (scale {scale:.3})");
                assert!(scale > 0.1, "{sampler} {kind} {steps}: degenerate run");
                assert!(err <= 1e-5, "{sampler} {kind} {steps}: v vs eps {err:e}");
                checked += 1;
            }
        }
    }
    // 10 samplers x discrete, 8 x karras, 9 x trailing, 3 step counts each.
    assert_eq!(checked, 27 * 3);
}

// ---------------------------------------------------------------------------------------------------------
// Trailing spacing

/// diffusers' trailing timesteps, `round(arange(1000, 0, -1000/N)) - 1`, for every sampler that has
/// them (values worked out by hand from that formula), and the same spacing in DDIM and DPM-type
/// samplers (which use their own "leading" variants otherwise).
#[test]
fn trailing_timesteps_are_diffusers() {
    let cases: [(usize, &[f32]); 4] = [
        (1, &[999.0]),
        (2, &[999.0, 499.0]),
        // 1000, 666.67, 333.33 rounded.
        (3, &[999.0, 666.0, 332.0]),
        (4, &[999.0, 749.0, 499.0, 249.0]),
    ];
    for sampler in ALL_SAMPLERS.into_iter().filter(|&s| s != SamplerKind::Lcm) {
        for (n, expected) in cases {
            let s = schedule(sampler, ScheduleKind::Trailing, n).expect("trailing");
            let ts: Vec<f32> = match sampler {
                // Heun and DPM2 lay the step timesteps out with a second call in between.
                SamplerKind::Heun | SamplerKind::Dpm2 => {
                    s.timesteps.iter().step_by(2).copied().collect()
                }
                _ => s.timesteps.clone(),
            };
            assert_eq!(ts, expected, "{sampler} {n}");
        }
    }
    // Leading spacing gives other timesteps (the flag is not ignored).
    let leading = schedule(SamplerKind::Ddim, ScheduleKind::Discrete, 4).unwrap();
    assert_eq!(leading.timesteps, [751.0, 501.0, 251.0, 1.0]);
}

/// init_noise_sigma with trailing: sigma_max itself (14.6146, the training sigma at t = 999) for the
/// Euler-type samplers (Euler, Euler a, Heun, DPM2, LMS), 1 for the VP samplers, as diffusers.
#[test]
fn trailing_init_noise_sigma() {
    let sigma_max = {
        let a = alphas_cumprod()[999];
        ((1.0 - a) / a).sqrt()
    };
    assert!((sigma_max - 14.614_647).abs() < 1e-4, "{sigma_max}");
    for sampler in ALL_SAMPLERS.into_iter().filter(|&s| s != SamplerKind::Lcm) {
        for n in [1, 4, 25] {
            let s = schedule(sampler, ScheduleKind::Trailing, n).unwrap();
            let expected = match sampler {
                SamplerKind::Ddim
                | SamplerKind::DpmPp2m
                | SamplerKind::DpmPp2mSde
                | SamplerKind::UniPc => 1.0,
                _ => sigma_max,
            };
            assert_eq!(s.init_noise_sigma, expected, "{sampler} {n}");
            if let Some(sg) = &s.sigmas {
                assert_eq!(sg[0], sigma_max, "{sampler} {n}");
            }
        }
    }
}

/// LCM has no timestep spacing in diffusers (its timesteps come from the distillation schedule): a
/// one-line refusal, as for Karras.
#[test]
fn trailing_is_refused_for_lcm() {
    let msg = bad_request(schedule(SamplerKind::Lcm, ScheduleKind::Trailing, 4));
    assert!(msg.contains("trailing") && msg.contains("lcm"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
}

/// Every step count 1..=1000: either a well-formed schedule (N steps, first timestep 999, strictly
/// descending integer timesteps ≥ 0, descending sigmas ending at 0) or, where numpy's float arange
/// makes one timestep too many (ending at -1; 61 steps is the first: ceil(1000 / (1000/61)) = 62), a
/// one-line refusal. Those counts are rare.
#[test]
fn trailing_schedules_are_well_formed_for_all_step_counts() {
    for sampler in ALL_SAMPLERS.into_iter().filter(|&s| s != SamplerKind::Lcm) {
        let mut refused = Vec::new();
        for n in 1..=1000 {
            let s = match schedule(sampler, ScheduleKind::Trailing, n) {
                Ok(s) => s,
                Err(sdcap::Error::BadRequest(msg)) => {
                    assert!(msg.contains("trailing") && !msg.contains('\n'), "{msg}");
                    refused.push(n);
                    continue;
                }
                Err(e) => panic!("{sampler} {n}: {e:?}"),
            };
            let what = format!("{sampler} trailing {n}");
            assert_eq!(s.steps(), n, "{what}");
            let ts: Vec<f32> = match sampler {
                SamplerKind::Heun | SamplerKind::Dpm2 => {
                    s.timesteps.iter().step_by(2).copied().collect()
                }
                _ => s.timesteps.clone(),
            };
            assert_eq!(ts.len(), n, "{what}");
            assert_eq!(ts[0], 999.0, "{what}");
            assert!(ts.iter().all(|&t| t >= 0.0 && t.fract() == 0.0), "{what}");
            assert!(ts.windows(2).all(|w| w[0] > w[1]), "{what}: {ts:?}");
            if let Some(sg) = &s.sigmas {
                assert_eq!(*sg.last().unwrap(), 0.0, "{what}");
                assert!(sg.windows(2).all(|w| w[0] >= w[1]), "{what}");
            }
        }
        assert!(
            refused.contains(&61) && refused.len() < 100,
            "{sampler}: {refused:?}"
        );
        assert!(
            !refused.contains(&60) && !refused.contains(&62),
            "{sampler}"
        );
    }
}
