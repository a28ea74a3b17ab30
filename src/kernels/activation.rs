//! Pointwise activations (in place).

use rayon::prelude::*;

#[inline]
pub(crate) fn silu_scalar(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

pub fn silu(x: &mut [f32]) {
    x.par_iter_mut().for_each(|v| *v = silu_scalar(*v));
}

/// CLIP's `quick_gelu`: x·σ(1.702x).
pub fn quick_gelu(x: &mut [f32]) {
    x.par_iter_mut()
        .for_each(|v| *v *= 1.0 / (1.0 + (-1.702 * *v).exp()));
}

/// Exact (erf) GELU, as `torch.nn.functional.gelu` with its default `approximate="none"`.
pub fn gelu(x: &mut [f32]) {
    x.par_iter_mut().for_each(|v| *v = gelu_scalar(*v));
}

/// GEGLU: each row of `x` [rows, 2·inner] is `[a, gate]`; returns [rows, inner] = a · gelu(gate).
pub fn geglu(x: &[f32], inner: usize) -> Vec<f32> {
    assert_eq!(x.len() % (2 * inner), 0);
    let mut out = vec![0.0; x.len() / 2];
    out.par_chunks_mut(inner)
        .zip(x.par_chunks(2 * inner))
        .for_each(|(o, row)| {
            let (a, gate) = row.split_at(inner);
            for ((o, &a), &g) in o.iter_mut().zip(a).zip(gate) {
                *o = a * gelu_scalar(g);
            }
        });
    out
}

fn gelu_scalar(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
}

/// erf with absolute error below 1.2e-7 everywhere (Numerical Recipes' `erfc` Chebyshev fit),
/// well under f32 resolution of GELU's output.
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223
        + t * (1.00002368
            + t * (0.37409196
                + t * (0.09678418
                    + t * (-0.18628806
                        + t * (0.27886807
                            + t * (-1.13520398
                                + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - erfc
    } else {
        erfc - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        // Reference values of erf from tables (15 digits).
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520499877813047),
            (1.0, 0.842700792949715),
            (-2.0, -0.995322265018953),
        ] {
            assert!((erf(x) - want).abs() < 2e-7, "erf({x})");
        }
    }

    #[test]
    fn geglu_multiplies_by_gelu_of_gate() {
        let out = geglu(&[2.0, 1.0], 1);
        assert!((out[0] - 2.0 * 0.841_344_7).abs() < 1e-6);
    }
}
