//! Noise schedules, samplers and the PyTorch-compatible RNG.
//!
//! Each sampler reproduces one diffusers scheduler's `scale_model_input` + `step` loop, with the same
//! float32 operation order on latents, so latents agree with diffusers to float32 rounding:
//! `euler` = EulerDiscreteScheduler, `euler_a` = EulerAncestralDiscreteScheduler, `dpm++2m` =
//! DPMSolverMultistepScheduler (dpmsolver++, order 2), `ddim` = DDIMScheduler (eta 0), `lcm` = LCMScheduler.

pub mod rng;

mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod lcm;
pub mod schedule;

pub use schedule::{schedule, Schedule};

use crate::job::SamplerKind;
use crate::{Error, Result};

/// Where step noise comes from (the pipeline adapts the torch RNG to this; tests feed recorded noise).
pub trait NoiseSource {
    /// `len` unit-normal values, as one `torch.randn` call of that many elements would give.
    fn noise(&mut self, len: usize) -> Vec<f32>;
}

/// The denoiser as the samplers see it: `(model input, timestep) -> epsilon`.
pub type Model<'a> = &'a mut dyn FnMut(&[f32], f32) -> Result<Vec<f32>>;

/// Runs the sampler. `x` is the unit-normal initial noise (this function multiplies by
/// `init_noise_sigma`). `model(input, timestep)` gets the already-scaled model input
/// (`scale_model_input` applied) and the timestep as diffusers passes it to the UNet, and returns epsilon
/// (already classifier-free-guided by the caller). `on_step(i, n)` is called after step `i` (0-based)
/// of `n`. Returns the final latent (before VAE scaling).
///
/// Step noise is drawn from `noise` exactly when diffusers draws from its generator: Euler a once per
/// step (every step), LCM once per step but the last, the others never.
pub fn sample(
    sampler: SamplerKind,
    schedule: &Schedule,
    x: Vec<f32>,
    model: Model<'_>,
    noise: &mut dyn NoiseSource,
    on_step: &mut dyn FnMut(usize, usize),
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
        noise,
        on_step,
    };
    match sampler {
        SamplerKind::Euler => euler::run(schedule, x, &mut steps),
        SamplerKind::EulerA => euler_ancestral::run(schedule, x, &mut steps),
        SamplerKind::DpmPp2m => dpm_solver::run(schedule, x, &mut steps),
        SamplerKind::Ddim => ddim::run(schedule, x, &mut steps),
        SamplerKind::Lcm => lcm::run(schedule, x, &mut steps),
    }
}

/// What a sampler calls out to, with the length checks in one place.
struct Steps<'a, 'm> {
    model: Model<'m>,
    noise: &'a mut dyn NoiseSource,
    on_step: &'a mut dyn FnMut(usize, usize),
}

impl Steps<'_, '_> {
    /// Epsilon for `input` at `timestep`; must match the latent's length.
    fn eps(&mut self, input: &[f32], timestep: f32) -> Result<Vec<f32>> {
        let eps = (self.model)(input, timestep)?;
        check_len("model output", eps.len(), input.len())?;
        Ok(eps)
    }

    /// One unit-normal draw the size of the latent.
    fn noise(&mut self, len: usize) -> Result<Vec<f32>> {
        let noise = self.noise.noise(len);
        check_len("step noise", noise.len(), len)?;
        Ok(noise)
    }

    fn done(&mut self, i: usize, n: usize) {
        (self.on_step)(i, n);
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
