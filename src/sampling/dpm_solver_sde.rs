//! DPM-Solver++(2M) SDE, as diffusers' DPMSolverMultistepScheduler with
//! `algorithm_type="sde-dpmsolver++"`, `solver_order=2`, `solver_type="midpoint"`,
//! `lower_order_final=True`, `final_sigmas_type="zero"`.
//!
//! The same multistep data-prediction update as DPM++ 2M with the SDE's coefficients (`e^-2h` in place
//! of `e^-h`) plus fresh Gaussian noise of std `sigma_next * sqrt(1 - e^-2h)` on every step. Like
//! diffusers (and unlike A1111/k-diffusion's Brownian tree), the noise is one plain `randn` the size of
//! the latent per step, the last included (where its weight is 0).

use super::dpm_solver::VpPoint;
use super::{sigmas, vp_denoised, Schedule, Steps};
use crate::Result;

pub(super) fn run(schedule: &Schedule, mut x: Vec<f32>, steps: &mut Steps) -> Result<Vec<f32>> {
    let sigmas = sigmas(schedule)?;
    let n = schedule.steps();
    let mut previous: Option<Vec<f32>> = None;
    for (i, &t) in schedule.timesteps.iter().enumerate() {
        // scale_model_input is the identity: x is already VP-scaled.
        let out = steps.predict(&x, t)?;
        let s0 = VpPoint::new(sigmas[i]);
        let target = VpPoint::new(sigmas[i + 1]);
        let denoised = vp_denoised(steps.prediction, &x, &out, s0.alpha, s0.sigma);
        let noise = steps.noise(x.len())?;

        let h = target.lambda - s0.lambda;
        // Float32 scalars in diffusers' order; at sigma 0 (h = inf) they are 0, 1 and 0.
        let coef_x = target.sigma / s0.sigma * (-h).exp();
        let coef_d = target.alpha * (1.0 - (-2.0 * h).exp());
        let coef_z = target.sigma * (1.0 - (-2.0 * h).exp()).sqrt();
        let last = i + 1 == n;
        match previous.as_deref() {
            Some(m1) if !last => {
                let s1 = VpPoint::new(sigmas[i - 1]);
                let r0 = (s0.lambda - s1.lambda) / h;
                let inv_r0 = 1.0 / r0;
                let half_coef = 0.5 * coef_d;
                for (((v, m0), m1), z) in x.iter_mut().zip(&denoised).zip(m1).zip(&noise) {
                    let d1 = inv_r0 * (m0 - m1);
                    *v = coef_x * *v + coef_d * m0 + half_coef * d1 + coef_z * z;
                }
            }
            _ => {
                for ((v, m0), z) in x.iter_mut().zip(&denoised).zip(&noise) {
                    *v = coef_x * *v + coef_d * m0 + coef_z * z;
                }
            }
        }
        previous = Some(denoised);
        steps.done(i, n, &x);
    }
    Ok(x)
}
