//! DDIM with eta = 0 (deterministic), as diffusers' DDIMScheduler with `set_alpha_to_one=False`.

use super::schedule::TRAIN_STEPS;
use super::{vp_denoised_and_eps, Schedule, Steps};
use crate::Result;

pub(super) fn run(schedule: &Schedule, mut x: Vec<f32>, steps: &mut Steps) -> Result<Vec<f32>> {
    let n = schedule.steps();
    let alphas = schedule.alphas_cumprod();
    let stride = TRAIN_STEPS / n;
    for (i, &t) in schedule.timesteps.iter().enumerate() {
        let out = steps.predict(&x, t)?;
        let ti = t as usize;
        let alpha = alphas[ti];
        // Past the first training step the "previous" alpha is alphas_cumprod[0] (set_alpha_to_one=False).
        let alpha_prev = ti.checked_sub(stride).map_or(alphas[0], |p| alphas[p]);
        let (sqrt_alpha, sqrt_beta) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        let sqrt_alpha_prev = alpha_prev.sqrt();
        // With eta 0 the noise std is 0, so the direction term keeps all of 1 - alpha_prev.
        let direction = (1.0 - alpha_prev).sqrt();
        for (v, &m) in x.iter_mut().zip(&out) {
            let (denoised, eps) =
                vp_denoised_and_eps(steps.prediction, *v, m, sqrt_alpha, sqrt_beta);
            *v = sqrt_alpha_prev * denoised + direction * eps;
        }
        steps.done(i, n, &x);
    }
    Ok(x)
}
