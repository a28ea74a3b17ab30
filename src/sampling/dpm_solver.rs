//! DPM-Solver++(2M), as diffusers' DPMSolverMultistepScheduler with `algorithm_type="dpmsolver++"`,
//! `solver_order=2`, `solver_type="midpoint"`, `lower_order_final=True`, `final_sigmas_type="zero"`.
//!
//! It works on the data prediction x0 in log-SNR time lambda = log(alpha / sigma): the first and the
//! last step are first order (DDIM-like), the others add a midpoint correction from the previous x0.

use super::{sigmas, vp_denoised, Schedule, Steps};
use crate::Result;

pub(super) fn run(schedule: &Schedule, mut x: Vec<f32>, steps: &mut Steps) -> Result<Vec<f32>> {
    let sigmas = sigmas(schedule)?;
    let n = schedule.steps();
    let mut previous: Option<Vec<f32>> = None;
    for (i, &t) in schedule.timesteps.iter().enumerate() {
        // scale_model_input is the identity for DPM-Solver: x is already VP-scaled.
        let out = steps.predict(&x, t)?;
        let s0 = VpPoint::new(sigmas[i]);
        let target = VpPoint::new(sigmas[i + 1]);
        let denoised = vp_denoised(steps.prediction, &x, &out, s0.alpha, s0.sigma);

        let h = target.lambda - s0.lambda;
        let ratio = target.sigma / s0.sigma;
        let coef = target.alpha * ((-h).exp() - 1.0);
        let last = i + 1 == n;
        match previous.as_deref() {
            Some(m1) if !last => {
                let s1 = VpPoint::new(sigmas[i - 1]);
                let r0 = (s0.lambda - s1.lambda) / h;
                let inv_r0 = 1.0 / r0;
                let half_coef = 0.5 * coef;
                for ((v, m0), m1) in x.iter_mut().zip(&denoised).zip(m1) {
                    let d1 = inv_r0 * (m0 - m1);
                    *v = ratio * *v - coef * m0 - half_coef * d1;
                }
            }
            _ => {
                for (v, m0) in x.iter_mut().zip(&denoised) {
                    *v = ratio * *v - coef * m0;
                }
            }
        }
        previous = Some(denoised);
        steps.done(i, n, &x);
    }
    Ok(x)
}

/// A Karras-style sigma seen as a VP point: `alpha = 1/sqrt(sigma^2+1)`, `sigma_t = sigma*alpha`,
/// `lambda = log(alpha) - log(sigma_t)`, all in float32 like diffusers' 0-dim tensors. At sigma 0,
/// lambda is +inf and the first-order step returns x0 exactly.
pub(super) struct VpPoint {
    pub(super) alpha: f32,
    pub(super) sigma: f32,
    pub(super) lambda: f32,
}

impl VpPoint {
    pub(super) fn new(sigma: f32) -> Self {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        let sigma = sigma * alpha;
        VpPoint {
            alpha,
            sigma,
            lambda: alpha.ln() - sigma.ln(),
        }
    }
}
