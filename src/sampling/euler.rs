//! Euler (Karras et al. 2022, Algorithm 2 without churn), as diffusers' EulerDiscreteScheduler.

use super::{scale_by_sigma, sigmas, ve_denoised, Schedule, Steps};
use crate::Result;

pub(super) fn run(schedule: &Schedule, mut x: Vec<f32>, steps: &mut Steps) -> Result<Vec<f32>> {
    let sigmas = sigmas(schedule)?;
    let n = schedule.steps();
    for (i, &t) in schedule.timesteps.iter().enumerate() {
        let sigma = sigmas[i];
        let out = steps.predict(&scale_by_sigma(&x, sigma), t)?;
        let dt = sigmas[i + 1] - sigma;
        // diffusers' operation order in float32: x0 from the model output, d = (x - x0)/sigma, x += d*dt.
        let denoised = ve_denoised(steps.prediction, &x, &out, sigma);
        for (v, denoised) in x.iter_mut().zip(&denoised) {
            let derivative = (*v - denoised) / sigma;
            *v += derivative * dt;
        }
        steps.done(i, n, &x);
    }
    Ok(x)
}
