//! Euler ancestral, as diffusers' EulerAncestralDiscreteScheduler: an Euler step down to `sigma_down`,
//! then fresh noise of std `sigma_up` so that the marginal lands on the next sigma.

use super::{scale_by_sigma, sigmas, ve_denoised, Schedule, Steps};
use crate::Result;

pub(super) fn run(schedule: &Schedule, mut x: Vec<f32>, steps: &mut Steps) -> Result<Vec<f32>> {
    let sigmas = sigmas(schedule)?;
    let n = schedule.steps();
    for (i, &t) in schedule.timesteps.iter().enumerate() {
        let (sigma, sigma_to) = (sigmas[i], sigmas[i + 1]);
        let out = steps.predict(&scale_by_sigma(&x, sigma), t)?;
        let (from2, to2) = (sigma * sigma, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        let denoised = ve_denoised(steps.prediction, &x, &out, sigma);
        for (v, denoised) in x.iter_mut().zip(&denoised) {
            let derivative = (*v - denoised) / sigma;
            *v += derivative * dt;
        }
        // Drawn on every step, the last included (where sigma_up is 0), like diffusers.
        let noise = steps.noise(x.len())?;
        for (v, z) in x.iter_mut().zip(&noise) {
            *v += z * sigma_up;
        }
        steps.done(i, n, &x);
    }
    Ok(x)
}
