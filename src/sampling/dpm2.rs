//! DPM-Solver-2 in the Karras sigma parameterisation, as diffusers' KDPM2DiscreteScheduler: a half
//! step (an Euler step to the log-space midpoint of the step's two sigmas), the model again there, and
//! the full step taken with the midpoint's derivative. The last step (down to sigma 0, whose midpoint
//! is 0) stays a plain Euler step, so N steps take 2N-1 model evaluations.

use super::schedule::dpm2_midpoint;
use super::{scale_by_sigma, step_sigmas, ve_denoised, Schedule, Steps};
use crate::Result;

pub(super) fn run(schedule: &Schedule, mut x: Vec<f32>, steps: &mut Steps) -> Result<Vec<f32>> {
    let sigmas = step_sigmas(schedule)?;
    let n = schedule.steps();
    let calls = schedule.timesteps.len();
    let mut call = 0;
    for i in 0..n {
        let (sigma, next) = (sigmas[i], sigmas[i + 1]);
        let mid = dpm2_midpoint(sigma, next);
        let out = steps.predict(&scale_by_sigma(&x, sigma), schedule.timesteps[call])?;
        let denoised = ve_denoised(steps.prediction, &x, &out, sigma);
        let dt = mid - sigma;
        let stepped: Vec<f32> = x
            .iter()
            .zip(&denoised)
            .map(|(v, d)| {
                let derivative = (v - d) / sigma;
                v + derivative * dt
            })
            .collect();
        steps.done(call, calls, &stepped);
        call += 1;
        if i + 1 == n {
            x = stepped;
            break;
        }
        let out = steps.predict(&scale_by_sigma(&stepped, mid), schedule.timesteps[call])?;
        let denoised = ve_denoised(steps.prediction, &stepped, &out, mid);
        let dt = next - sigma;
        for ((v, s), p) in x.iter_mut().zip(&stepped).zip(&denoised) {
            let derivative = (s - p) / mid;
            *v += derivative * dt;
        }
        steps.done(call, calls, &x);
        call += 1;
    }
    Ok(x)
}
