//! Linear multistep (order 4), as diffusers' LMSDiscreteScheduler: each step integrates the Lagrange
//! polynomial through the last (up to) four derivatives `(x - x0)/sigma` over the step's sigma interval.

use std::collections::VecDeque;

use super::{scale_by_sigma, sigmas, ve_denoised, Schedule, Steps};
use crate::Result;

/// diffusers' default `order`.
const ORDER: usize = 4;

pub(super) fn run(schedule: &Schedule, mut x: Vec<f32>, steps: &mut Steps) -> Result<Vec<f32>> {
    let sigmas = sigmas(schedule)?;
    let n = schedule.steps();
    // Newest first.
    let mut derivatives: VecDeque<Vec<f32>> = VecDeque::with_capacity(ORDER);
    for (i, &t) in schedule.timesteps.iter().enumerate() {
        let sigma = sigmas[i];
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
        let order = (i + 1).min(ORDER);
        let coeffs: Vec<f32> = (0..order)
            .map(|j| lms_coefficient(sigmas, order, i, j) as f32)
            .collect();
        // Python's `sum(coeff * derivative ...)`, newest derivative first, then added to x.
        for (e, v) in x.iter_mut().enumerate() {
            let mut acc = coeffs[0] * derivatives[0][e];
            for j in 1..order {
                acc += coeffs[j] * derivatives[j][e];
            }
            *v += acc;
        }
        steps.done(i, n, &x);
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
}
