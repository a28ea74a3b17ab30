//! Schedules and samplers against diffusers 0.42.1 goldens (fixtures/tiny-sd/golden, e2e and
//! e2e-samplers).
//!
//! The samplers are replayed without a model: the model callback answers with the recorded UNet outputs,
//! step noise comes from the recorded draws. Every sampler named in a fixture is mapped explicitly, so a
//! fixture for an unknown sampler fails instead of being skipped.

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

// ---------------------------------------------------------------------------------------------------------
// Fixture access

/// The tiny-sd fixtures (`tests/data/tiny-sd`, or `$SDCAP_FIXTURES/tiny-sd`).
fn fixtures() -> PathBuf {
    common::fixtures().join("tiny-sd")
}

/// Sampler and schedule for a diffusers scheduler class + config; panics on anything we do not model.
fn kinds(class: &str, config: &Value) -> (SamplerKind, ScheduleKind) {
    let karras = config["use_karras_sigmas"].as_bool().unwrap_or(false);
    let scheduler = [ScheduleKind::Discrete, ScheduleKind::Karras][usize::from(karras)];
    let sampler = match class {
        "EulerDiscreteScheduler" => SamplerKind::Euler,
        "EulerAncestralDiscreteScheduler" => SamplerKind::EulerA,
        "DPMSolverMultistepScheduler" => {
            assert_eq!(config["solver_order"], 2);
            match config["algorithm_type"].as_str() {
                Some("dpmsolver++") => SamplerKind::DpmPp2m,
                Some("sde-dpmsolver++") => SamplerKind::DpmPp2mSde,
                other => panic!("DPM-Solver algorithm {other:?} is not modelled"),
            }
        }
        "DDIMScheduler" => SamplerKind::Ddim,
        "LCMScheduler" => SamplerKind::Lcm,
        "HeunDiscreteScheduler" => SamplerKind::Heun,
        "KDPM2DiscreteScheduler" => SamplerKind::Dpm2,
        "LMSDiscreteScheduler" => SamplerKind::Lms,
        "UniPCMultistepScheduler" => {
            assert_eq!(config["solver_order"], 2);
            assert_eq!(config["solver_type"], "bh2");
            assert_eq!(config["predict_x0"], true);
            assert_eq!(config["lower_order_final"], true);
            assert_eq!(config["disable_corrector"], serde_json::json!([]));
            assert!(config["solver_p"].is_null());
            SamplerKind::UniPc
        }
        other => panic!("fixture uses scheduler {other}, which sdcap does not map yet"),
    };
    (sampler, scheduler)
}

/// Fixture run name → (class, config), from golden/manifest.json.
fn golden_runs() -> BTreeMap<String, (SamplerKind, ScheduleKind)> {
    let manifest = json(&fixtures().join("golden/manifest.json"));
    let runs = manifest["runs"].as_object().expect("runs");
    assert!(!runs.is_empty());
    runs.iter()
        .map(|(name, run)| {
            let class = run["scheduler_class"].as_str().expect("scheduler_class");
            (name.clone(), kinds(class, &run["scheduler_config"]))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// Comparisons

// ---------------------------------------------------------------------------------------------------------
// Schedules

#[test]
fn alphas_cumprod_matches_training_table() {
    let tables = json(&fixtures().join("golden/scheduler_tables.json"));
    let expected = floats(&tables["tables"]["alphas_cumprod"]);
    assert_eq!(expected.len(), 1000);
    // Built like torch (float32 linspace with fused multiply-adds, float64 cumprod accumulator), the
    // table is bit-identical; anything else, even 1 ulp, means a different recipe. (The JSON holds
    // float32 values; rounding back to float32 undoes serde_json's last-bit float64 parsing error.)
    let ours = alphas_cumprod();
    let differ: Vec<usize> = (0..1000)
        .filter(|&i| ours[i] != expected[i] as f32)
        .collect();
    assert!(differ.is_empty(), "alphas_cumprod differs at {differ:?}");
}

#[test]
fn schedules_match_scheduler_tables() {
    let tables = json(&fixtures().join("golden/scheduler_tables.json"));
    let runs = golden_runs();
    let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (key, table) in tables["tables"].as_object().expect("tables") {
        if key == "alphas_cumprod" {
            continue; // checked by alphas_cumprod_matches_training_table
        }
        let (name, n) = key.split_once('/').expect("name/N");
        let n: usize = n.parse().expect("N");
        let &(sampler, scheduler) = runs
            .get(name)
            .unwrap_or_else(|| panic!("no run config for {name}"));
        let s = schedule(sampler, scheduler, n).expect("schedule");
        check_schedule(key, &s, table);
        seen.entry(name.to_string()).or_default().push(n);
    }
    // Every sampler of the golden runs has a table, at every N the tables were made for.
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        runs.keys().collect::<Vec<_>>()
    );
    for (name, mut ns) in seen {
        ns.sort();
        assert_eq!(ns, [1, 4, 20, 30], "{name}");
    }
}

/// Timesteps exactly, sigmas and init_noise_sigma to TABLE_TOL, from a JSON object with those keys.
fn check_schedule(what: &str, s: &Schedule, table: &Value) {
    let timesteps = floats(&table["timesteps"]);
    assert_eq!(s.timesteps.len(), timesteps.len(), "{what}: step count");
    // Integer timesteps exactly. Fractional ones (Euler-type + Karras, not in the fixtures; DPM2's
    // interpolated ones) come from diffusers' `_sigma_to_t` on numpy's float32 SIMD log, a few ulps
    // from a correctly rounded log: to TABLE_TOL (DPM2's are off by ≤ 2 float32 ulps, 1.3e-7).
    for (i, (&ours, &theirs)) in s.timesteps.iter().zip(&timesteps).enumerate() {
        let tol = if theirs.fract() == 0.0 {
            0.0
        } else {
            TABLE_TOL
        };
        let err = elementwise_rel_err(&[ours], &[theirs]);
        assert!(
            err <= tol,
            "{what}: timestep {i} {ours} vs {theirs} ({err:e})"
        );
    }
    match (&s.sigmas, table["sigmas"].is_null()) {
        (None, true) => {}
        (Some(ours), false) => {
            let err = elementwise_rel_err(ours, &floats(&table["sigmas"]));
            assert!(err <= TABLE_TOL, "{what}: sigmas rel err {err:e}");
        }
        (ours, _) => panic!("{what}: sigmas {ours:?} vs {}", table["sigmas"]),
    }
    let init = table["init_noise_sigma"]
        .as_f64()
        .expect("init_noise_sigma");
    let err = elementwise_rel_err(&[s.init_noise_sigma], &[init]);
    assert!(
        err <= TABLE_TOL,
        "{what}: init_noise_sigma {} vs {init}",
        s.init_noise_sigma
    );
}

/// The configs the fixtures were made with are the ones the code hard-wires (optional keys are
/// checked where a scheduler has them).
#[test]
fn fixture_configs_are_the_modelled_ones() {
    use serde_json::json;
    let required = [
        ("num_train_timesteps", json!(1000)),
        ("beta_start", json!(0.00085)),
        ("beta_end", json!(0.012)),
        ("beta_schedule", json!("scaled_linear")),
        ("prediction_type", json!("epsilon")),
        ("timestep_spacing", json!("leading")),
        ("steps_offset", json!(1)),
        ("set_alpha_to_one", json!(false)),
    ];
    let optional = [
        ("rescale_betas_zero_snr", json!(false)),
        ("clip_sample", json!(false)),
        ("thresholding", json!(false)),
        ("interpolation_type", json!("linear")),
        ("final_sigmas_type", json!("zero")),
        ("solver_type", json!("midpoint")),
        ("lower_order_final", json!(true)),
        ("euler_at_final", json!(false)),
        ("original_inference_steps", json!(50)),
        ("timestep_scaling", json!(10.0)),
        ("timestep_type", json!("discrete")),
    ];
    let manifest = json(&fixtures().join("golden/manifest.json"));
    for (name, run) in manifest["runs"].as_object().expect("runs") {
        let c = &run["scheduler_config"];
        for (key, value) in &required {
            assert_eq!(&c[key], value, "{name}: {key}");
        }
        for (key, value) in optional.iter().filter(|(k, _)| !c[k].is_null()) {
            assert_eq!(&c[key], value, "{name}: {key}");
        }
    }
    // The extra samplers' configs (UniPC's solver_type "bh2" is checked by `kinds`).
    let manifest = json(&fixtures().join("e2e-samplers/manifest.json"));
    for case in manifest["cases"].as_array().expect("cases") {
        let (name, c) = (&case["name"], &case["scheduler_config"]);
        for (key, value) in &required {
            assert_eq!(&c[key], value, "{name}: {key}");
        }
        let unipc = case["scheduler_class"] == "UniPCMultistepScheduler";
        let skip = |k: &str| c[k].is_null() || (unipc && k == "solver_type");
        let applies = |k: &&str| !skip(k);
        for (key, value) in optional.iter().filter(|(k, _)| applies(k)) {
            assert_eq!(&c[key], value, "{name}: {key}");
        }
        for key in [
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_flow_sigmas",
        ] {
            assert!(
                matches!(c[key].as_bool(), None | Some(false)),
                "{name}: {key}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Replays

/// Worst errors of one replay.
#[derive(Default, Debug)]
struct Errors {
    unet_input: f64,
    latents: f64,
    final_latents: f64,
}

/// Runs `sampler` on `run`'s initial noise, answering the model with `unet`'s recorded outputs (CFG
/// applied as the pipeline does) and checking, at every step, the model input against `unet_input.i`,
/// the timestep against `timesteps[i]`, the latent after the previous step against
/// `run.latents_after_step.{i-1}`, and the result against the last step and `final_latents`.
fn replay(sampler: SamplerKind, s: &Schedule, run: &Tensors, unet: &Tensors) -> Errors {
    let n = s.timesteps.len();
    let sigmas = s.sigmas.clone();
    let guidance = unet.get("guidance_scale")[0];
    let timesteps = unet.get("timesteps").to_vec();
    let latent_len = run.get("initial_noise").len();
    let mut errors = Errors::default();
    let mut calls = 0usize;
    let mut model = |input: &[f32], t: f32| -> sdcap::Result<Vec<f32>> {
        let i = calls;
        calls += 1;
        assert_eq!(t, timesteps[i], "step {i}: timestep");
        // unet_input.i is [uncond, cond] (identical latents) or [cond]: compare with the cond half.
        let recorded = unet.get(&format!("unet_input.{i}"));
        errors.unet_input = errors
            .unet_input
            .max(rel_err(input, &recorded[recorded.len() - latent_len..]));
        if i > 0 {
            // The latent after step i-1, scaled as scale_model_input scales it.
            let prev = run.get(&format!("latents_after_step.{}", i - 1));
            let scale = sigmas
                .as_ref()
                .filter(|_| sampler != SamplerKind::DpmPp2m)
                .map(|sg| (sg[i] * sg[i] + 1.0).sqrt());
            let expected: Vec<f32> = prev.iter().map(|v| scale.map_or(*v, |k| v / k)).collect();
            errors.latents = errors.latents.max(rel_err(input, &expected));
        }
        let out = unet.get(&format!("unet_output.{i}"));
        Ok(guided(out, latent_len, guidance))
    };
    let mut noise = Recorded::from_run(run);
    let mut done = Vec::new();
    let out = sample(
        sampler,
        s,
        Prediction::Eps,
        run.get("initial_noise").to_vec(),
        &mut model,
        &mut noise,
        &mut |i, n| done.push((i, n)),
    )
    .expect("sample");
    assert_eq!(calls, n, "model calls");
    assert_eq!(noise.taken, noise.draws.len(), "step noise draws");
    assert_eq!(
        done,
        (0..n).map(|i| (i, n)).collect::<Vec<_>>(),
        "on_step calls"
    );
    errors.latents = errors.latents.max(rel_err(
        &out,
        run.get(&format!("latents_after_step.{}", n - 1)),
    ));
    errors.final_latents = rel_err(&out, run.get("final_latents"));
    errors
}

fn assert_replay(what: &str, e: &Errors) {
    println!("{what}: {e:?}");
    let worst = e.unet_input.max(e.latents).max(e.final_latents);
    assert!(
        worst <= LATENT_TOL,
        "{what}: rel err above {LATENT_TOL:e}: {e:?}"
    );
}

/// golden/txt2img_<name>.safetensors for every run of the golden manifest, and no other file.
fn golden_files() -> BTreeMap<String, PathBuf> {
    let dir = fixtures().join("golden");
    let files: BTreeMap<String, PathBuf> = std::fs::read_dir(&dir)
        .expect("golden dir")
        .map(|e| e.expect("entry").path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            let run = name
                .strip_prefix("txt2img_")?
                .strip_suffix(".safetensors")?
                .to_string();
            Some((run, p))
        })
        .collect();
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        golden_runs().keys().collect::<Vec<_>>()
    );
    files
}

#[test]
fn golden_txt2img_replays() {
    for (name, (sampler, scheduler)) in golden_runs() {
        let t = Tensors::load(&golden_files()[&name]);
        let n = t.get("timesteps").len();
        let s = schedule(sampler, scheduler, n).expect("schedule");
        let table = serde_json::json!({
            "timesteps": t.get("timesteps"),
            "sigmas": t.0.get("sigmas"),
            "init_noise_sigma": t.get("init_noise_sigma")[0],
        });
        check_schedule(&name, &s, &table);
        assert_replay(&format!("golden {name}"), &replay(sampler, &s, &t, &t));
    }
}

#[test]
fn e2e_cases_schedules_draws_and_replays() {
    let dir = fixtures().join("e2e");
    let manifest = json(&dir.join("manifest.json"));
    let cases = manifest["cases"].as_array().expect("cases");
    assert!(!cases.is_empty());
    let golden = golden_files();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let class = case["scheduler_class"].as_str().expect("class");
        let (sampler, scheduler) = kinds(class, &case["scheduler_config"]);
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let s = schedule(sampler, scheduler, steps).expect("schedule");
        check_schedule(name, &s, case);
        let t = Tensors::load(&dir.join(format!("{name}.safetensors")));
        assert_eq!(
            t.get("timesteps"),
            s.timesteps,
            "{name}: recorded timesteps"
        );
        // One generator: the first randn is the initial latent, every further one a sampler draw.
        let calls = case["rng_calls"].as_array().expect("rng_calls");
        assert_eq!(calls[0]["by"], "pipeline_stable_diffusion", "{name}");
        let draws = calls.len() - 1;
        let by_sampler = |c: &Value| c["by"].as_str().unwrap().starts_with("scheduling_");
        assert!(calls[1..].iter().all(by_sampler), "{name}");
        assert_eq!(t.count("step_noise"), draws, "{name}: recorded step noise");
        let ours = count_draws(sampler, &s, t.get("initial_noise").len());
        assert_eq!(ours, draws, "{name}: our draws");
        // Without step noise the run is the golden one (same seed-42 initial noise): replay its UNet
        // outputs against this file's latents. With step noise the UNet outputs differ and are not
        // recorded, so the schedule and draw checks above are what can be checked.
        if draws == 0 {
            let g = Tensors::load(&golden[case["sampler"].as_str().expect("sampler")]);
            assert_eq!(
                t.get("initial_noise"),
                g.get("initial_noise"),
                "{name}: initial noise"
            );
            assert_replay(&format!("e2e {name}"), &replay(sampler, &s, &t, &g));
        }
    }
}

/// The extra samplers' seeded runs record no UNet outputs, so here: schedule (timesteps exactly,
/// sigmas and init_noise_sigma to TABLE_TOL, in diffusers' layout), the recorded tensors, and the
/// number of step-noise draws. Their latents are checked end to end in tests/txt2img.rs.
#[test]
fn e2e_samplers_schedules_and_draws() {
    let dir = fixtures().join("e2e-samplers");
    let manifest = json(&dir.join("manifest.json"));
    let cases = manifest["cases"].as_array().expect("cases");
    let mut seen = Vec::new();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let class = case["scheduler_class"].as_str().expect("class");
        let (sampler, scheduler) = kinds(class, &case["scheduler_config"]);
        seen.push((sampler, scheduler));
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let s = schedule(sampler, scheduler, steps).expect("schedule");
        assert_eq!(s.steps(), steps, "{name}");
        check_schedule(name, &s, case);
        let t = Tensors::load(&dir.join(format!("{name}.safetensors")));
        let err = rel_err(&s.timesteps, t.get("timesteps"));
        assert!(err <= TABLE_TOL, "{name}: recorded timesteps {err:e}");
        let recorded_sigmas = t.get("sigmas");
        let ours = s.sigmas.as_deref().expect("sigmas");
        let err = rel_err(ours, recorded_sigmas);
        assert!(err <= TABLE_TOL, "{name}: recorded sigmas {err:e}");
        // One scheduler step per model call: latents_after_step.i for every timestep.
        assert_eq!(t.count("latents_after_step"), s.timesteps.len(), "{name}");
        let calls = case["rng_calls"].as_array().expect("rng_calls");
        assert_eq!(calls[0]["by"], "pipeline_stable_diffusion", "{name}");
        let by_sampler = |c: &Value| c["by"].as_str().unwrap().starts_with("scheduling_");
        assert!(calls[1..].iter().all(by_sampler), "{name}");
        let draws = calls.len() - 1;
        assert_eq!(t.count("step_noise"), draws, "{name}: recorded step noise");
        let ours = count_draws(sampler, &s, t.get("initial_noise").len());
        assert_eq!(ours, draws, "{name}: our draws");
    }
    // Every new sampler has a case, and dpm++2m_sde also with Karras.
    for sampler in &ALL_SAMPLERS[5..] {
        assert!(
            seen.contains(&(*sampler, ScheduleKind::Discrete)),
            "{sampler}"
        );
    }
    assert!(seen.contains(&(SamplerKind::DpmPp2mSde, ScheduleKind::Karras)));
}

/// Heun's schedule is Euler's with the inner points repeated, with Karras too (diffusers builds both
/// the same way; the fixtures hold Heun only with the discrete schedule), and DPM2's first timestep
/// and sigmas are Euler's.
#[test]
fn heun_and_dpm2_lay_out_eulers_schedule() {
    for kind in [ScheduleKind::Discrete, ScheduleKind::Karras] {
        for n in [1, 2, 4, 20] {
            let euler = schedule(SamplerKind::Euler, kind, n).unwrap();
            let es = euler.sigmas.as_deref().unwrap();
            let heun = schedule(SamplerKind::Heun, kind, n).unwrap();
            let mut t = vec![euler.timesteps[0]];
            let mut s = vec![es[0]];
            for (&ti, &si) in euler.timesteps.iter().zip(es).skip(1) {
                t.extend([ti; 2]);
                s.extend([si; 2]);
            }
            s.push(0.0);
            assert_eq!(heun.timesteps, t, "heun {kind} {n}");
            assert_eq!(heun.sigmas.as_deref(), Some(&s[..]), "heun {kind} {n}");
            assert_eq!(heun.init_noise_sigma, euler.init_noise_sigma);
            let dpm2 = schedule(SamplerKind::Dpm2, kind, n).unwrap();
            let ds = dpm2.sigmas.as_deref().unwrap();
            assert_eq!(ds.len(), 2 * n + 2, "dpm2 {kind} {n}");
            assert_eq!(dpm2.timesteps.len(), 2 * n - 1, "dpm2 {kind} {n}");
            assert_eq!(&ds[..2 * n], &s[..2 * n], "dpm2 {kind} {n}");
            assert_eq!(&ds[2 * n..], [0.0, 0.0]);
            // Interpolated timesteps lie between their neighbours.
            for w in dpm2.timesteps.windows(2) {
                assert!(w[0] > w[1], "dpm2 {kind} {n}: {:?}", dpm2.timesteps);
            }
        }
    }
}

/// How many noise draws `sampler` makes over a whole run (with a zero model).
fn count_draws(sampler: SamplerKind, s: &Schedule, len: usize) -> usize {
    struct Counter(usize);
    impl NoiseSource for Counter {
        fn noise(&mut self, len: usize) -> Vec<f32> {
            self.0 += 1;
            vec![0.0; len]
        }
    }
    let mut counter = Counter(0);
    let mut zero = |x: &[f32], _| Ok(vec![0.0; x.len()]);
    sample(
        sampler,
        s,
        Prediction::Eps,
        vec![0.5; len],
        &mut zero,
        &mut counter,
        &mut |_, _| {},
    )
    .expect("sample");
    counter.0
}

// ---------------------------------------------------------------------------------------------------------
// Errors and invariants

fn sigma_based(sampler: SamplerKind) -> bool {
    !matches!(sampler, SamplerKind::Ddim | SamplerKind::Lcm)
}

#[test]
fn karras_is_refused_for_ddim_and_lcm() {
    for sampler in [SamplerKind::Ddim, SamplerKind::Lcm] {
        let msg = bad_request(schedule(sampler, ScheduleKind::Karras, 20));
        assert!(
            msg.contains("karras") && msg.contains(sampler.name()),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
    for sampler in ALL_SAMPLERS.into_iter().filter(|s| sigma_based(*s)) {
        schedule(sampler, ScheduleKind::Karras, 20).expect("karras applies");
    }
}

#[test]
fn zero_steps_are_refused() {
    for sampler in ALL_SAMPLERS {
        for kind in [ScheduleKind::Discrete, ScheduleKind::Karras] {
            let msg = bad_request(schedule(sampler, kind, 0));
            assert!(msg.contains("steps"), "{sampler} {kind}: {msg}");
        }
    }
}

#[test]
fn sample_refuses_mismatched_schedule_and_bad_model_output() {
    let s = schedule(SamplerKind::Euler, ScheduleKind::Discrete, 4).unwrap();
    let run = |sampler, out_len: usize| {
        let mut none = Recorded {
            draws: vec![],
            taken: 0,
        };
        let mut model = |_: &[f32], _| Ok(vec![0.0; out_len]);
        sample(
            sampler,
            &s,
            Prediction::Eps,
            vec![0.0; 8],
            &mut model,
            &mut none,
            &mut |_, _| {},
        )
    };
    let r = run(SamplerKind::Ddim, 8);
    assert!(matches!(r, Err(sdcap::Error::BadRequest(_))), "{r:?}");
    let r = run(SamplerKind::Euler, 7);
    assert!(matches!(r, Err(sdcap::Error::BadShape { .. })), "{r:?}");
}

/// Every sampler and schedule over many step counts: refused exactly where it should be, otherwise
/// sane shapes, timesteps inside the training range, descending sigmas ending at 0.
#[test]
fn schedules_are_well_formed_for_all_step_counts() {
    for sampler in ALL_SAMPLERS {
        for kind in [ScheduleKind::Discrete, ScheduleKind::Karras] {
            for n in [0, 1, 2, 3, 7, 10, 25, 50, 51, 150, 998, 999, 1000, 1001] {
                let no_sigmas = !sigma_based(sampler);
                let dpm_type = matches!(
                    sampler,
                    SamplerKind::DpmPp2m | SamplerKind::DpmPp2mSde | SamplerKind::UniPc
                );
                // LCM picks from a 50-step distillation schedule; "leading" spacing with steps_offset 1
                // puts a timestep at 1000 at 1000 steps (DPM's variant already at 999); Karras DPM
                // does not use those timesteps.
                let most = match (sampler, kind) {
                    (_, ScheduleKind::Karras) if dpm_type => 1000,
                    _ if dpm_type => 998,
                    (SamplerKind::Lcm, _) => 50,
                    _ => 999,
                };
                let refused = (no_sigmas && kind == ScheduleKind::Karras) || n == 0 || n > most;
                let s = match schedule(sampler, kind, n) {
                    Ok(s) if !refused => s,
                    Err(sdcap::Error::BadRequest(_)) if refused => continue,
                    other => panic!("{sampler} {kind} {n}: {:?}", other.map(|s| s.timesteps[0])),
                };
                let what = format!("{sampler} {kind} {n}");
                assert_eq!(s.steps(), n);
                // Heun and DPM2 evaluate the model twice per step but the last.
                let two_calls = matches!(sampler, SamplerKind::Heun | SamplerKind::Dpm2);
                let calls = if two_calls { 2 * n - 1 } else { n };
                assert_eq!(s.timesteps.len(), calls, "{sampler} {kind} {n}");
                assert!(
                    s.timesteps.iter().all(|&t| (0.0..1000.0).contains(&t)),
                    "{what}"
                );
                assert!(
                    s.init_noise_sigma >= 1.0 && s.init_noise_sigma.is_finite(),
                    "{what}"
                );
                if let Some(sg) = &s.sigmas {
                    let len = match sampler {
                        SamplerKind::Heun => 2 * n,
                        SamplerKind::Dpm2 => 2 * n + 2,
                        _ => n + 1,
                    };
                    assert!(sg.len() == len && sg[len - 1] == 0.0, "{what}");
                    assert!(sg.windows(2).all(|w| w[0] >= w[1]), "{what}: {sg:?}");
                }
            }
        }
    }
}
