//! Linear multistep (order 4), as diffusers' LMSDiscreteScheduler: each step integrates the Lagrange
//! polynomial through the last (up to) four derivatives `(x - x0)/sigma` over the step's sigma interval.

use std::collections::VecDeque;

use super::{scale_by_sigma, sigmas, ve_denoised, Schedule, Steps};
use crate::Result;

/// diffusers' default `order`.
const ORDER: usize = 4;

pub(super) fn run(schedule: &Schedule, mut x: Vec<f32>, steps: &mut Steps) -> Result<Vec<f32>> {
    let run_sigmas = sigmas(schedule)?;
    let n = schedule.steps();
    // diffusers weighs the derivatives from its step index in the FULL table (`begin + i`), with
    // order min(begin + i + 1, 4), and `zip` uses as many as it has: a run that begins late has
    // fewer derivatives than that order, and its coefficients use the skipped steps' sigmas.
    let begin = schedule.begin();
    let sigmas: Vec<f32> = schedule
        .skipped_sigmas
        .iter()
        .chain(run_sigmas)
        .copied()
        .collect();
    let sigmas = &sigmas[..];
    // Newest first.
    let mut derivatives: VecDeque<Vec<f32>> = VecDeque::with_capacity(ORDER);
    for (i, &t) in schedule.timesteps.iter().enumerate() {
        let at = begin + i;
        let sigma = sigmas[at];
        let out = steps.predict(&scale_by_sigma(&x, sigma), t)?;
        let denoised = ve_denoised(steps.prediction, &x, &out, sigma);
        drop(out);
        // Keep at most ORDER derivatives (the oldest goes before the new one is made).
        if derivatives.len() == ORDER {
            derivatives.pop_back();
        }
        derivatives.push_front(
            x.iter()
                .zip(&denoised)
                .map(|(v, d)| (v - d) / sigma)
                .collect(),
        );
        drop(denoised);
        let order = (at + 1).min(ORDER);
        let coeffs: Vec<f32> = (0..order.min(derivatives.len()))
            .map(|j| lms_coefficient(sigmas, order, at, j) as f32)
            .collect();
        // Python's `sum(coeff * derivative ...)`, newest derivative first, then added to x.
        for (e, v) in x.iter_mut().enumerate() {
            let mut acc = coeffs[0] * derivatives[0][e];
            for j in 1..coeffs.len() {
                acc += coeffs[j] * derivatives[j][e];
            }
            *v += acc;
        }
        steps.done(i, n, &mut x);
    }
    Ok(x)
}

/// `∫ ℓ_j(τ) dτ` from `sigmas[i]` to `sigmas[i + 1]`, where ℓ_j is the Lagrange basis polynomial of
/// node `sigmas[i - j]` over the nodes `sigmas[i - k]`, k < `order`.
///
/// diffusers integrates it with `scipy.integrate.quad` (21-point Gauss-Kronrod on a float32-evaluated
/// integrand); ℓ_j has degree ≤ 3, so 2-point Gauss-Legendre in float64 gives the exact integral. The
/// two differ by the float32 noise of diffusers' integrand (~1e-7 relative), below the float32
/// rounding of the coefficient that multiplies the latent.
fn lms_coefficient(sigmas: &[f32], order: usize, i: usize, j: usize) -> f64 {
    let node = |k: usize| f64::from(sigmas[i - k]);
    let basis = |tau: f64| {
        (0..order)
            .filter(|&k| k != j)
            .map(|k| (tau - node(k)) / (node(j) - node(k)))
            .product::<f64>()
    };
    let (a, b) = (f64::from(sigmas[i]), f64::from(sigmas[i + 1]));
    let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
    let offset = half / 3f64.sqrt();
    half * (basis(mid - offset) + basis(mid + offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The basis integrals sum to the interval length (the basis sums to 1) and match a closed form.
    #[test]
    fn coefficients_integrate_the_lagrange_basis() {
        let sigmas = [8.0f32, 4.0, 2.0, 1.0, 0.5, 0.0];
        for i in 0..5 {
            let order = (i + 1).min(ORDER);
            let total: f64 = (0..order)
                .map(|j| lms_coefficient(&sigmas, order, i, j))
                .sum();
            let width = f64::from(sigmas[i + 1] - sigmas[i]);
            assert!(
                (total - width).abs() < 1e-12,
                "step {i}: {total} vs {width}"
            );
        }
        // Order 2 at step 1: nodes 4 (j = 0) and 8 (j = 1) over [4, 2]:
        // ∫ (τ - 8)/(4 - 8) dτ = [(τ - 8)²/(-8)] from 4 to 2 = (36 - 16)/(-8) = -2.5.
        assert!((lms_coefficient(&sigmas, 2, 1, 0) + 2.5).abs() < 1e-12);
        // ∫ (τ - 4)/(8 - 4) dτ from 4 to 2 = [(τ - 4)²/8] = 4/8 = 0.5.
        assert!((lms_coefficient(&sigmas, 2, 1, 1) - 0.5).abs() < 1e-12);
    }

    /// A run that begins late weighs its first derivative as diffusers does from its step index in
    /// the full table: at begin 2 the first step has order 3 over the full table's sigmas 2, 1, 0
    /// (not order 1, the plain Euler step `dt`). With a constant epsilon `e` the derivative is `e`,
    /// so the step adds exactly `coefficient * e`.
    #[test]
    fn late_begin_uses_the_full_tables_order_and_sigmas() {
        use crate::family::Prediction;
        use crate::job::{SamplerKind, ScheduleKind};
        let full = crate::sampling::schedule(SamplerKind::Lms, ScheduleKind::Discrete, 6).unwrap();
        let late = full.begin_at(2).unwrap();
        let sigmas = full.sigmas.clone().unwrap();
        let e = 0.5f32;
        let mut model = |x: &[f32], _: f32| Ok(vec![e; x.len()]);
        struct NoNoise;
        impl crate::sampling::NoiseSource for NoNoise {
            fn noise(&mut self, _: usize) -> Vec<f32> {
                unreachable!("LMS draws no noise")
            }
        }
        let mut first = None;
        let mut on_step = |i: usize, _: usize, x: &mut [f32]| {
            if i == 0 {
                first = Some(x[0]);
            }
        };
        crate::sampling::sample_from(
            SamplerKind::Lms,
            &late,
            Prediction::Eps,
            vec![1.0; 4],
            &mut model,
            &mut NoNoise,
            &mut on_step,
        )
        .unwrap();
        let c = lms_coefficient(&sigmas, 3, 2, 0) as f32;
        assert_eq!(first, Some(1.0 + c * e));
        let euler = sigmas[3] - sigmas[2];
        assert!(
            (c - euler).abs() > 1e-3,
            "order 3 differs from order 1: {c} vs {euler}"
        );
    }
}
