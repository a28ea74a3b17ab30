//! Group and layer normalisation (statistics accumulated in f64 for stability).

use rayon::prelude::*;

use super::activation::silu_scalar;
use crate::tensor::Tensor;

/// GroupNorm over an NCHW tensor in place, optionally followed by SiLU (the common ResNet pairing).
pub fn group_norm(
    x: &mut Tensor,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    then_silu: bool,
) {
    let (_, c, h, w) = x.nchw();
    assert!(
        c % groups == 0,
        "{c} channels do not split into {groups} groups"
    );
    assert_eq!(gamma.len(), c);
    assert_eq!(beta.len(), c);
    let per_group = c / groups;
    let group_len = per_group * h * w;
    x.data
        .par_chunks_mut(group_len)
        .enumerate()
        .for_each(|(i, chunk)| {
            let (mean, var) = moments(chunk);
            let inv = 1.0 / (var + eps as f64).sqrt();
            let first_channel = (i % groups) * per_group;
            for (j, plane) in chunk.chunks_mut(h * w).enumerate() {
                let ch = first_channel + j;
                let scale = (gamma[ch] as f64 * inv) as f32;
                let shift = (beta[ch] as f64 - mean * gamma[ch] as f64 * inv) as f32;
                for v in plane.iter_mut() {
                    let y = *v * scale + shift;
                    *v = if then_silu { silu_scalar(y) } else { y };
                }
            }
        });
}

/// LayerNorm over the last dimension (`dim`) of a row-major [rows, dim] buffer, in place.
pub fn layer_norm(x: &mut [f32], dim: usize, gamma: &[f32], beta: &[f32], eps: f32) {
    assert_eq!(x.len() % dim, 0);
    x.par_chunks_mut(dim).for_each(|row| {
        let (mean, var) = moments(row);
        let inv = 1.0 / (var + eps as f64).sqrt();
        for ((v, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
            *v = ((*v as f64 - mean) * inv * g as f64 + b as f64) as f32;
        }
    });
}

/// Mean and (biased) variance.
fn moments(values: &[f32]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, var)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_norm_normalises_each_group() {
        let mut x = Tensor::new(vec![1, 4, 2, 2], (0..16).map(|i| (i * i) as f32).collect());
        group_norm(&mut x, 2, &[1.0; 4], &[0.0; 4], 1e-5, false);
        for g in x.data.chunks(8) {
            let mean: f32 = g.iter().sum::<f32>() / 8.0;
            let var: f32 = g.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 8.0;
            assert!(
                mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-3,
                "{mean} {var}"
            );
        }
    }

    #[test]
    fn layer_norm_applies_affine() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        layer_norm(&mut x, 4, &[2.0; 4], &[1.0; 4], 0.0);
        let s = (1.25f32).sqrt();
        let want = [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s].map(|v| 2.0 * v + 1.0);
        for (a, b) in x.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
