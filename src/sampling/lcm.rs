//! Latent consistency model sampling, as diffusers' LCMScheduler (default options): each step predicts
//! the clean latent with the consistency boundary scalings, then re-noises it to the next timestep.

use super::{vp_denoised, Schedule, Steps};
use crate::Result;

/// `sigma_data` of the consistency-model boundary condition.
const SIGMA_DATA: f32 = 0.5;
/// `timestep_scaling`: timesteps are multiplied by this in the boundary scalings.
const TIMESTEP_SCALING: f32 = 10.0;

pub(super) fn run(schedule: &Schedule, mut x: Vec<f32>, steps: &mut Steps) -> Result<Vec<f32>> {
    let n = schedule.steps();
    let alphas = schedule.alphas_cumprod();
    for (i, &t) in schedule.timesteps.iter().enumerate() {
        let out = steps.predict(&x, t)?;
        let alpha = alphas[t as usize];
        let (sqrt_alpha, sqrt_beta) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        let (c_skip, c_out) = boundary_scalings(t);
        let predicted = vp_denoised(steps.prediction, &x, &out, sqrt_alpha, sqrt_beta);
        let denoised: Vec<f32> = x
            .iter()
            .zip(&predicted)
            .map(|(v, p)| c_out * p + c_skip * v)
            .collect();
        x = if i + 1 < n {
            let alpha_prev = alphas[schedule.timesteps[i + 1] as usize];
            let (sqrt_alpha_prev, sqrt_beta_prev) = (alpha_prev.sqrt(), (1.0 - alpha_prev).sqrt());
            let noise = steps.noise(x.len())?;
            denoised
                .iter()
                .zip(&noise)
                .map(|(d, z)| sqrt_alpha_prev * d + sqrt_beta_prev * z)
                .collect()
        } else {
            // No noise on the final step: the result is the denoised prediction.
            denoised
        };
        steps.done(i, n, &x);
    }
    Ok(x)
}

/// `(c_skip, c_out)` for timestep `t`, in float32 as diffusers computes them.
fn boundary_scalings(t: f32) -> (f32, f32) {
    let scaled = t * TIMESTEP_SCALING;
    let denom = scaled * scaled + SIGMA_DATA * SIGMA_DATA;
    // torch evaluates `0.25 / tensor` as `tensor.reciprocal() * 0.25`.
    let c_skip = (1.0 / denom) * (SIGMA_DATA * SIGMA_DATA);
    let c_out = scaled / denom.sqrt();
    (c_skip, c_out)
}
