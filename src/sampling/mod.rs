//! Noise schedules, samplers and the PyTorch-compatible RNG.
//!
//! Each sampler reproduces one diffusers scheduler's `scale_model_input` + `step` loop, with the same
//! float32 operation order on latents, so latents agree with diffusers to float32 rounding:
//! `euler` = EulerDiscreteScheduler, `euler_a` = EulerAncestralDiscreteScheduler, `dpm++2m` =
//! DPMSolverMultistepScheduler (dpmsolver++, order 2), `ddim` = DDIMScheduler (eta 0), `lcm` = LCMScheduler,
//! `heun` = HeunDiscreteScheduler, `dpm++2m_sde` = DPMSolverMultistepScheduler (sde-dpmsolver++, order 2),
//! `dpm2` = KDPM2DiscreteScheduler, `unipc` = UniPCMultistepScheduler (bh2, order 2), `lms` =
//! LMSDiscreteScheduler (order 4).
//!
//! Every sampler turns the model output into the denoised latent x0 only through [`ve_denoised`]
//! (latent `x = x0 + sigma * eps`: Euler-type, Heun, DPM2, LMS) or [`vp_denoised`] /
//! [`vp_denoised_and_eps`] (`x = alpha * x0 + sigma_t * eps`: DPM-Solver++, UniPC, DDIM, LCM): the one
//! place the prediction type (epsilon or v, [`Prediction`]) enters, with each diffusers scheduler's
//! float32 formula for it.

pub mod rng;

mod ddim;
mod dpm2;
mod dpm_solver;
mod dpm_solver_sde;
mod euler;
mod euler_ancestral;
mod heun;
mod lcm;
mod lms;
pub mod schedule;
mod unipc;

pub use schedule::{schedule, Schedule};

use crate::family::Prediction;
use crate::job::SamplerKind;
use crate::{Error, Result};

/// Where step noise comes from (the pipeline adapts the torch RNG to this; tests feed recorded noise).
pub trait NoiseSource {
    /// `len` unit-normal values, as one `torch.randn` call of that many elements would give.
    fn noise(&mut self, len: usize) -> Vec<f32>;
}

/// The denoiser as the samplers see it: `(model input, timestep) -> model output` (epsilon or v, as
/// the `prediction` given to [`sample`] says).
pub type Model<'a> = &'a mut dyn FnMut(&[f32], f32) -> Result<Vec<f32>>;

/// Runs the sampler. `x` is the unit-normal initial noise (this function multiplies by
/// `init_noise_sigma`). `model(input, timestep)` gets the already-scaled model input
/// (`scale_model_input` applied) and the timestep as diffusers passes it to the UNet, and returns the
/// model output, epsilon or v as `prediction` says (already classifier-free-guided by the caller). `on_step(i, n)` is called after step `i` (0-based)
/// of `n`. Returns the final latent (before VAE scaling).
///
/// `on_step(i, n)` counts model evaluations: `n` is `schedule.timesteps.len()`, which is the step count
/// except for Heun and DPM2 (2 evaluations per step but the last).
///
/// Step noise is drawn from `noise` exactly when diffusers draws from its generator: Euler a and
/// DPM++ 2M SDE once per step (every step), LCM once per step but the last, the others never.
pub fn sample(
    sampler: SamplerKind,
    schedule: &Schedule,
    prediction: Prediction,
    x: Vec<f32>,
    model: Model<'_>,
    noise: &mut dyn NoiseSource,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f32>> {
    let mut counted = |i: usize, n: usize, _: &[f32]| on_step(i, n);
    sample_observed(sampler, schedule, prediction, x, model, noise, &mut counted)
}

/// As `sample`, with the sampler's latent after each evaluation handed to `on_step(i, n, x)`
/// (the previews read it: the noisy latent, as stable-diffusion.cpp's `--preview-noisy`; for Heun
/// and DPM2 the first evaluation of a step gives its first-order estimate).
pub fn sample_observed(
    sampler: SamplerKind,
    schedule: &Schedule,
    prediction: Prediction,
    x: Vec<f32>,
    model: Model<'_>,
    noise: &mut dyn NoiseSource,
    on_step: &mut dyn FnMut(usize, usize, &[f32]),
) -> Result<Vec<f32>> {
    if schedule.sampler != sampler {
        return Err(Error::BadRequest(format!(
            "schedule was made for sampler {}, not {sampler}",
            schedule.sampler
        )));
    }
    if x.is_empty() {
        return Err(Error::BadRequest("initial latent is empty".into()));
    }
    let init = schedule.init_noise_sigma;
    let x: Vec<f32> = x.into_iter().map(|v| v * init).collect();
    let mut steps = Steps {
        model,
        prediction,
        noise,
        on_step,
    };
    match sampler {
        SamplerKind::Euler => euler::run(schedule, x, &mut steps),
        SamplerKind::EulerA => euler_ancestral::run(schedule, x, &mut steps),
        SamplerKind::DpmPp2m => dpm_solver::run(schedule, x, &mut steps),
        SamplerKind::Ddim => ddim::run(schedule, x, &mut steps),
        SamplerKind::Lcm => lcm::run(schedule, x, &mut steps),
        SamplerKind::Heun => heun::run(schedule, x, &mut steps),
        SamplerKind::DpmPp2mSde => dpm_solver_sde::run(schedule, x, &mut steps),
        SamplerKind::Dpm2 => dpm2::run(schedule, x, &mut steps),
        SamplerKind::UniPc => unipc::run(schedule, x, &mut steps),
        SamplerKind::Lms => lms::run(schedule, x, &mut steps),
    }
}

/// What a sampler calls out to, with the length checks in one place.
struct Steps<'a, 'm> {
    model: Model<'m>,
    /// What the model output is; read by the `*_denoised` functions.
    prediction: Prediction,
    noise: &'a mut dyn NoiseSource,
    on_step: &'a mut dyn FnMut(usize, usize, &[f32]),
}

impl Steps<'_, '_> {
    /// The model output (epsilon or v) for `input` at `timestep`; must match the latent's length.
    fn predict(&mut self, input: &[f32], timestep: f32) -> Result<Vec<f32>> {
        let out = (self.model)(input, timestep)?;
        check_len("model output", out.len(), input.len())?;
        Ok(out)
    }

    /// One unit-normal draw the size of the latent.
    fn noise(&mut self, len: usize) -> Result<Vec<f32>> {
        let noise = self.noise.noise(len);
        check_len("step noise", noise.len(), len)?;
        Ok(noise)
    }

    /// Evaluation `i` of `n` finished; `x` is the sampler's latent after it.
    fn done(&mut self, i: usize, n: usize, x: &[f32]) {
        (self.on_step)(i, n, x);
    }
}

fn check_len(name: &str, found: usize, expected: usize) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(Error::BadShape {
            name: name.into(),
            found: vec![found],
            expected: vec![expected],
        })
    }
}

/// The sigmas of a sigma-based schedule (Euler-type and DPM++).
fn sigmas(schedule: &Schedule) -> Result<&[f32]> {
    schedule.sigmas.as_deref().ok_or_else(|| {
        Error::BadRequest(format!("schedule for {} has no sigmas", schedule.sampler))
    })
}

/// The per-step sigmas of a sigma-based schedule, one per step plus the final 0 (Heun's and DPM2's
/// repeats removed).
fn step_sigmas(schedule: &Schedule) -> Result<Vec<f32>> {
    schedule.step_sigmas().ok_or_else(|| {
        Error::BadRequest(format!("schedule for {} has no sigmas", schedule.sampler))
    })
}

/// The denoised latent x0 from the model output `m` for a latent `x = x0 + sigma * eps` (the
/// Karras/"VE" form of Euler-type samplers, Heun, DPM2, LMS), in diffusers' float32 order:
/// epsilon `x - sigma * m`; v `m * (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1)`.
fn ve_denoised(prediction: Prediction, x: &[f32], model_output: &[f32], sigma: f32) -> Vec<f32> {
    match prediction {
        Prediction::Eps => x
            .iter()
            .zip(model_output)
            .map(|(v, e)| v - sigma * e)
            .collect(),
        Prediction::V => {
            let skip_div = sigma * sigma + 1.0;
            let c_out = -sigma / skip_div.sqrt();
            x.iter()
                .zip(model_output)
                .map(|(v, m)| m * c_out + v / skip_div)
                .collect()
        }
    }
}

/// The denoised latent x0 from the model output `m` for a latent `x = alpha * x0 + sigma_t * eps`
/// (the VP form of DPM-Solver++, UniPC and LCM), in diffusers' float32 order: epsilon
/// `(x - sigma_t * m) / alpha`; v `alpha * x - sigma_t * m`.
fn vp_denoised(
    prediction: Prediction,
    x: &[f32],
    model_output: &[f32],
    alpha: f32,
    sigma_t: f32,
) -> Vec<f32> {
    match prediction {
        Prediction::Eps => x
            .iter()
            .zip(model_output)
            .map(|(v, e)| (v - sigma_t * e) / alpha)
            .collect(),
        Prediction::V => x
            .iter()
            .zip(model_output)
            .map(|(v, m)| alpha * v - sigma_t * m)
            .collect(),
    }
}

/// DDIM's pair (x0, epsilon) for one element of a VP latent (`alpha` = sqrt(alphas_cumprod[t]),
/// `sigma_t` = sqrt(1 - alphas_cumprod[t])): epsilon gives x0 as [`vp_denoised`] and itself; v gives
/// `alpha * x - sigma_t * m` and `alpha * m + sigma_t * x` (diffusers' DDIMScheduler, float32).
fn vp_denoised_and_eps(
    prediction: Prediction,
    x: f32,
    model_output: f32,
    alpha: f32,
    sigma_t: f32,
) -> (f32, f32) {
    match prediction {
        Prediction::Eps => ((x - sigma_t * model_output) / alpha, model_output),
        Prediction::V => (
            alpha * x - sigma_t * model_output,
            alpha * model_output + sigma_t * x,
        ),
    }
}

/// Euler-type `scale_model_input`: `x / sqrt(sigma^2 + 1)` in float32.
fn scale_by_sigma(x: &[f32], sigma: f32) -> Vec<f32> {
    let scale = (sigma * sigma + 1.0).sqrt();
    x.iter().map(|v| v / scale).collect()
}

/// Stops a run whose `stage` produced NaN or infinite values (A1111: "A tensor with all NaNs was
/// produced in Unet"): every later stage would only carry them into a flat image. `at` says where
/// in the run. One pass over the values; cheap next to the network that made them.
pub fn check_finite(
    stage: &'static str,
    at: impl FnOnce() -> String,
    values: &[f32],
) -> Result<()> {
    if values.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(Error::NonFinite { stage, at: at() })
    }
}
