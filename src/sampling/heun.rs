//! Heun's method (Karras et al. 2022, Algorithm 1 without churn), as diffusers' HeunDiscreteScheduler:
//! an Euler step to the next sigma, then the model again there and the step redone with the mean of
//! the two derivatives. The last step (down to sigma 0) stays a plain Euler step, so N steps take 2N-1
//! model evaluations.

use super::{scale_by_sigma, step_sigmas, ve_denoised, Schedule, Steps};
use crate::Result;

pub(super) fn run(schedule: &Schedule, mut x: Vec<f32>, steps: &mut Steps) -> Result<Vec<f32>> {
    let sigmas = step_sigmas(schedule)?;
    let n = schedule.steps();
    let calls = schedule.timesteps.len();
    let mut call = 0;
    for i in 0..n {
        let (sigma, next) = (sigmas[i], sigmas[i + 1]);
        let out = steps.predict(&scale_by_sigma(&x, sigma), schedule.timesteps[call])?;
        let denoised = ve_denoised(steps.prediction, &x, &out, sigma);
        let dt = next - sigma;
        // diffusers in float32: d = (x - x0)/sigma, x_next = x + d*dt.
        let derivative: Vec<f32> = x
            .iter()
            .zip(&denoised)
            .map(|(v, d)| (v - d) / sigma)
            .collect();
        let stepped: Vec<f32> = x.iter().zip(&derivative).map(|(v, d)| v + d * dt).collect();
        steps.done(call, calls, &stepped);
        call += 1;
        if i + 1 == n {
            x = stepped;
            break;
        }
        // Second order: the model at the Euler end point (scaled for `next`), mean derivative from x.
        let out = steps.predict(&scale_by_sigma(&stepped, next), schedule.timesteps[call])?;
        let denoised = ve_denoised(steps.prediction, &stepped, &out, next);
        for (((v, d1), s), p) in x.iter_mut().zip(&derivative).zip(&stepped).zip(&denoised) {
            let d2 = (s - p) / next;
            let d = (d1 + d2) / 2.0;
            *v += d * dt;
        }
        steps.done(call, calls, &x);
        call += 1;
    }
    Ok(x)
}
