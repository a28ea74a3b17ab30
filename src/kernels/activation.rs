//! Pointwise activations (in place).

use rayon::prelude::*;

use super::precision::at_width;
use super::Isa;
use crate::tensor::zeroed;

#[inline(always)]
pub(crate) fn silu_scalar(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// e^x in f32 within 2 ulp (Cephes `expf` polynomial), branch-free so loops over it vectorise —
/// libm's `expf` is a call per value and dominated softmax and SiLU time.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n · LN2_HI is exact for |n| < 2^10.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Below -87.3 e^x is under the smallest normal f32; 88.3 keeps n ≤ 127 (e^88.3 ≈ 2.2e38).
    let x = x.clamp(-87.3, 88.3);
    // Round to nearest by adding and removing 1.5·2^23: plain SSE2 arithmetic, unlike `round()`,
    // which is a libm call on baseline x86-64 and would stop the loop from vectorising.
    const ROUND: f32 = 12_582_912.0;
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    // The integer n sits in the low mantissa bits of `shifted`; reading it there avoids a
    // float-to-int cast (Rust's saturating `as` adds scalar NaN checks to the loop).
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut y = 1.987_569_1e-4f32;
    y = y * r + 1.398_2e-3;
    y = y * r + 8.333_452e-3;
    y = y * r + 4.166_579_6e-2;
    y = y * r + 1.666_666_5e-1;
    y = y * r + 0.5;
    y = y * r * r + r + 1.0;
    y * f32::from_bits(((n_int + 127) as u32) << 23)
}

pub fn silu(x: &mut [f32]) {
    x.par_iter_mut().for_each(|v| *v = silu_scalar(*v));
}

/// CLIP's `quick_gelu`: x·σ(1.702x).
pub fn quick_gelu(x: &mut [f32]) {
    x.par_iter_mut()
        .for_each(|v| *v *= 1.0 / (1.0 + (-1.702 * *v).exp()));
}

/// Exact (erf) GELU in place, as `torch.nn.functional.gelu` (OpenCLIP text towers: SD2's ViT-H,
/// SDXL's bigG).
pub fn gelu(x: &mut [f32]) {
    x.par_iter_mut().for_each(|v| *v = gelu_scalar(*v));
}

/// GEGLU: each row of `x` [rows, 2·inner] plus `bias` [2·inner] (the projection's, added here
/// rather than in a pass of its own) is `[a, gate]`; returns [rows, inner] = a · gelu(gate).
pub fn geglu(x: &[f32], bias: Option<&[f32]>, inner: usize) -> Vec<f32> {
    assert_eq!(x.len() % (2 * inner), 0);
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = vec![0.0; 2 * inner];
            &zeros
        }
    };
    assert_eq!(bias.len(), 2 * inner, "GEGLU bias size");
    let (bias_a, bias_gate) = bias.split_at(inner);
    let isa = Isa::selected();
    let mut out = zeroed(x.len() / 2);
    out.par_chunks_mut(inner)
        .zip(x.par_chunks(2 * inner))
        .for_each(|(o, row)| {
            let (a, gate) = row.split_at(inner);
            gated_row(o, (a, bias_a), (gate, bias_gate), isa);
        });
    out
}

/// `o = (a + bias_a) · gelu(gate + bias_gate)`, vectorised as wide as `isa` allows
/// (`precision::at_width`: the same bits at every width).
fn gated_row(o: &mut [f32], (a, ba): (&[f32], &[f32]), (g, bg): (&[f32], &[f32]), isa: Isa) {
    at_width(
        isa,
        #[inline(always)]
        || {
            let gated = a.iter().zip(ba).zip(g.iter().zip(bg));
            for (o, ((&a, &ba), (&g, &bg))) in o.iter_mut().zip(gated) {
                *o = (a + ba) * gelu_scalar(g + bg);
            }
        },
    )
}

/// Exact (erf) GELU, as `torch.nn.functional.gelu` with its default `approximate="none"`:
/// 0.5·x·(1 + erf(x/√2)) in f32, branch-free so that loops over it vectorise. 1 + erf is taken
/// as 2 − erfc(|z|) for x ≥ 0 and as erfc(|z|) below, so no cancellation where GELU is small.
#[inline(always)]
fn gelu_scalar(x: f32) -> f32 {
    let erfc = erfc_abs(x.abs() * std::f32::consts::FRAC_1_SQRT_2);
    let one_plus_erf = if x >= 0.0 { 2.0 - erfc } else { erfc };
    0.5 * x * one_plus_erf
}

/// erfc(z) for z ≥ 0 (Numerical Recipes' Chebyshev fit, absolute error below 1.2e-7 in exact
/// arithmetic), evaluated in f32 with the fast `exp`.
#[inline(always)]
fn erfc_abs(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t * exp(poly)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erfc_matches_known_values() {
        // Reference values of erf from tables (15 digits); the fit's 1.2e-7 plus f32 rounding.
        for (z, erf) in [
            (0.0, 0.0),
            (0.5, 0.520499877813047),
            (1.0, 0.842700792949715),
            (2.0, 0.995322265018953),
        ] {
            assert!(
                (erfc_abs(z as f32) as f64 - (1.0 - erf)).abs() < 3e-7,
                "erfc({z})"
            );
        }
    }

    /// Every vector width gives the baseline build's bits (no FMA contraction).
    #[test]
    fn geglu_rows_are_the_same_at_every_width() {
        let n = 1000;
        let v = |seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * seed % 211) as f32 - 105.0) / 17.0)
                .collect()
        };
        let (a, ba, g, bg) = (v(3), v(5), v(7), v(11));
        let mut want = vec![0.0; n];
        gated_row(&mut want, (&a, &ba), (&g, &bg), Isa::Scalar);
        for isa in [Isa::Avx2, Isa::Avx512] {
            if isa > Isa::detected() {
                continue;
            }
            let mut got = vec![0.0; n];
            gated_row(&mut got, (&a, &ba), (&g, &bg), isa);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits()),
                "{isa:?}"
            );
        }
    }

    /// erf(z) = 2/√π ∫₀^z e^(−t²) dt by composite Simpson in f64 (error ~1e-15 at 20 000 intervals),
    /// independent of the Chebyshev fit under test.
    fn erf_by_quadrature(z: f64) -> f64 {
        const INTERVALS: usize = 20_000;
        let h = z / INTERVALS as f64;
        let f = |t: f64| (-t * t).exp();
        let inner: f64 = (1..INTERVALS)
            .map(|i| f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 })
            .sum();
        (f(0.0) + inner + f(z)) * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn gelu_is_exact_erf_gelu() {
        let mut x: Vec<f32> = (-1200..=1200).map(|i| i as f32 * 0.01).collect();
        x.extend([-30.0, -9.5, 1e-3, -1e-3, 9.5, 30.0, 0.0]);
        let mut got = x.clone();
        gelu(&mut got);
        for (&x, &g) in x.iter().zip(&got) {
            let x64 = x as f64;
            let want = 0.5 * x64 * (1.0 + erf_by_quadrature(x64 / std::f64::consts::SQRT_2));
            // In exact arithmetic the erf fit is within 1.2e-7 (absolute). In f32: 2 − erfc
            // rounds once (6e-8 of ≤ 2), erfc = t·exp(poly) carries exp's 2 ulp, the division's
            // and the product's roundings and the polynomial's (terms of magnitude ≤ z² + 3,
            // a few roundings each): 4e-7 + 2e-7·z² relative to erfc. All scaled by |x|/2, plus
            // the result's own rounding (6e-8 relative).
            let z = x64.abs() / std::f64::consts::SQRT_2;
            let erfc = 1.0 - erf_by_quadrature(z);
            let one_plus_erf = 1.2e-7 + 1.2e-7 + erfc * (4e-7 + 2e-7 * z * z);
            let bound = 0.5 * x64.abs() * one_plus_erf + 6e-8 * want.abs() + 1e-30;
            assert!(
                (g as f64 - want).abs() <= bound,
                "gelu({x}) = {g}, want {want}"
            );
        }
        // quick_gelu, CLIP-L's activation, is a different function: 0.0036 apart at x = 1.
        let mut quick = [1.0f32];
        quick_gelu(&mut quick);
        assert!((quick[0] - got[x.iter().position(|&v| v == 1.0).unwrap()]).abs() > 3e-3);
    }

    #[test]
    fn fast_exp_is_within_two_ulp() {
        let mut worst = 0.0f64;
        for i in -873_000..=883_000 {
            let x = i as f32 * 1e-4;
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        // 2 ulp of f32 is 2.4e-7 relative.
        assert!(worst < 2.4e-7, "worst relative error {worst:e}");
        assert_eq!(exp(-1000.0), (-87.3f32 as f64).exp() as f32);
        assert!(exp(0.0) == 1.0);
    }

    #[test]
    fn geglu_multiplies_by_gelu_of_gate() {
        let out = geglu(&[2.0, 1.0], None, 1);
        assert!((out[0] - 2.0 * 0.841_344_7).abs() < 1e-6);
        // With the projection's bias: (2 + 1) · gelu(1 − 0.5).
        let out = geglu(&[2.0, 1.0], Some(&[1.0, -0.5]), 1);
        assert!((out[0] - 3.0 * 0.345_731_3).abs() < 1e-6);
    }
}
