//! UniPC, as diffusers' UniPCMultistepScheduler with its defaults: `solver_order=2`,
//! `solver_type="bh2"`, `predict_x0=True`, `lower_order_final=True`, corrector on every step.
//!
//! Each step first corrects the latent the previous step predicted (UniC, using the model output just
//! computed at it), then predicts the next latent from the data predictions x0 (UniP). Order 1 on the
//! first step and on the last, 2 in between; one model evaluation per step.

use super::dpm_solver::VpPoint;
use super::{sigmas, vp_denoised, Schedule, Steps};
use crate::Result;

/// `solver_order`.
const ORDER: usize = 2;

pub(super) fn run(schedule: &Schedule, mut x: Vec<f32>, steps: &mut Steps) -> Result<Vec<f32>> {
    let sigmas = sigmas(schedule)?;
    let n = schedule.steps();
    // Data predictions of the last two steps (diffusers' `model_outputs`), newest last.
    let mut history: Vec<Vec<f32>> = Vec::with_capacity(ORDER);
    // The latent the last predictor started from, and that predictor's order.
    let mut last: Option<(Vec<f32>, usize)> = None;
    let mut lower_order_nums = 0;
    for (i, &t) in schedule.timesteps.iter().enumerate() {
        // scale_model_input is the identity: x is already VP-scaled.
        let out = steps.predict(&x, t)?;
        let point = VpPoint::new(sigmas[i]);
        let m = vp_denoised(steps.prediction, &x, &out, point.alpha, point.sigma);
        if let Some((last_sample, order)) = &last {
            x = correct(sigmas, i, &history, &m, last_sample, &x, *order);
        }
        if history.len() == ORDER {
            history.remove(0);
        }
        history.push(m);
        let order = ORDER.min(n - i).min(lower_order_nums + 1);
        let next = predict(sigmas, i, &history, &x, order);
        last = Some((std::mem::replace(&mut x, next), order));
        lower_order_nums = (lower_order_nums + 1).min(ORDER);
        steps.done(i, n, &x);
    }
    Ok(x)
}

/// The scalars both updates share, for a step from `sigmas[from]` to `sigmas[to]` (diffusers'
/// float32 operation order): `h` in log-SNR, `h_phi_1 = expm1(-h)` (= `B_h` for bh2), and the two
/// `b` entries of the order conditions.
struct Coefficients {
    from: VpPoint,
    to: VpPoint,
    h: f32,
    h_phi_1: f32,
    b: [f32; 2],
}

impl Coefficients {
    fn new(sigma_from: f32, sigma_to: f32) -> Self {
        let from = VpPoint::new(sigma_from);
        let to = VpPoint::new(sigma_to);
        let h = to.lambda - from.lambda;
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = h_phi_1;
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let b0 = h_phi_k * 1.0 / b_h;
        h_phi_k = h_phi_k / hh - 0.5;
        let b1 = h_phi_k * 2.0 / b_h;
        Coefficients {
            from,
            to,
            h,
            h_phi_1,
            b: [b0, b1],
        }
    }

    /// `r_k` of the data prediction at `sigma`, relative to the step's start.
    fn rk(&self, sigma: f32) -> f32 {
        (VpPoint::new(sigma).lambda - self.from.lambda) / self.h
    }

    /// `x_t_ = sigma_t/sigma_s0 * x - alpha_t*h_phi_1 * m0`, the first-order part, for one element.
    fn base(&self, x: f32, m0: f32) -> f32 {
        self.to.sigma / self.from.sigma * x - self.to.alpha * self.h_phi_1 * m0
    }

    /// `alpha_t * B_h`, the weight of the higher-order residual.
    fn residual_weight(&self) -> f32 {
        self.to.alpha * self.h_phi_1
    }
}

/// UniP (`multistep_uni_p_bh_update`) at step `i`: from the latent `x` at `sigmas[i]` to `sigmas[i+1]`.
/// `history` ends with this step's data prediction.
fn predict(sigmas: &[f32], i: usize, history: &[Vec<f32>], x: &[f32], order: usize) -> Vec<f32> {
    let c = Coefficients::new(sigmas[i], sigmas[i + 1]);
    let m0 = &history[history.len() - 1];
    let weight = c.residual_weight();
    if order == 2 {
        let m1 = &history[history.len() - 2];
        let rk = c.rk(sigmas[i - 1]);
        // rhos_p = [0.5] for order 2.
        x.iter()
            .zip(m0)
            .zip(m1)
            .map(|((&v, &m0), &m1)| {
                let d1 = (m1 - m0) / rk;
                c.base(v, m0) - weight * (0.5 * d1)
            })
            .collect()
    } else {
        x.iter().zip(m0).map(|(&v, &m0)| c.base(v, m0)).collect()
    }
}

/// UniC (`multistep_uni_c_bh_update`) at step `i`: corrects `this_sample` (the prediction for
/// `sigmas[i]`) with `model_t`, its data prediction; `last_sample` is the latent at `sigmas[i-1]` the
/// prediction started from, `history` the data predictions before this step (newest last).
fn correct(
    sigmas: &[f32],
    i: usize,
    history: &[Vec<f32>],
    model_t: &[f32],
    last_sample: &[f32],
    this_sample: &[f32],
    order: usize,
) -> Vec<f32> {
    let c = Coefficients::new(sigmas[i - 1], sigmas[i]);
    let m0 = &history[history.len() - 1];
    let weight = c.residual_weight();
    debug_assert_eq!(last_sample.len(), this_sample.len());
    if order == 2 {
        let m1 = &history[history.len() - 2];
        let rk = c.rk(sigmas[i - 2]);
        let rhos = solve_order2(rk, c.b);
        last_sample
            .iter()
            .zip(m0)
            .zip(m1)
            .zip(model_t)
            .map(|(((&v, &m0), &m1), &mt)| {
                let d1 = (m1 - m0) / rk;
                let corr = rhos[0] * d1;
                c.base(v, m0) - weight * (corr + rhos[1] * (mt - m0))
            })
            .collect()
    } else {
        // rhos_c = [0.5] for order 1.
        last_sample
            .iter()
            .zip(m0)
            .zip(model_t)
            .map(|((&v, &m0), &mt)| c.base(v, m0) - weight * (0.5 * (mt - m0)))
            .collect()
    }
}

/// `torch.linalg.solve([[1, 1], [rk, 1]], b)` for UniC's order-2 weights. Solved in float64 and
/// rounded: within a float32 rounding or two of LAPACK's float32 solve (~1e-7 relative on the weights,
/// which scale a correction term, not the latent).
fn solve_order2(rk: f32, b: [f32; 2]) -> [f32; 2] {
    let (rk, b0, b1) = (f64::from(rk), f64::from(b[0]), f64::from(b[1]));
    let x0 = (b0 - b1) / (1.0 - rk);
    let x1 = b0 - x0;
    [x0 as f32, x1 as f32]
}
