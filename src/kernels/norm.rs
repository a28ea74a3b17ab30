//! Group and layer normalisation (statistics accumulated in f64 for stability).
//!
//! GroupNorm statistics are reduced in a fixed order that does not depend on how the map is stored
//! or split: f64 sums per (channel, row), then per group over its channels and rows in ascending
//! order. A map stored in bands of rows therefore gets the same statistics bits as a whole one.

use rayon::prelude::*;

use super::activation::silu_scalar;
use super::conv::{FeatureRows, Planes};
use crate::tensor::Tensor;

/// GroupNorm statistics of one image: per group, the mean and 1/√(var + eps) (biased variance).
#[derive(Clone, Debug, PartialEq)]
pub struct GroupStats {
    pub mean: Vec<f64>,
    pub inv_std: Vec<f64>,
}

impl GroupStats {
    /// Per-channel `(scale, shift)` with `normalised = v · scale + shift` (then γ, β applied).
    pub fn scale_shift(&self, gamma: &[f32], beta: &[f32]) -> (Vec<f32>, Vec<f32>) {
        assert_eq!(gamma.len(), beta.len());
        let per_group = gamma.len() / self.mean.len();
        (0..gamma.len())
            .map(|ch| {
                let (mean, inv) = (self.mean[ch / per_group], self.inv_std[ch / per_group]);
                let scale = (gamma[ch] as f64 * inv) as f32;
                let shift = (beta[ch] as f64 - mean * gamma[ch] as f64 * inv) as f32;
                (scale, shift)
            })
            .unzip()
    }
}

/// Bytes `group_norm_stats` allocates at most (its per-row partial sums, one pass at a time).
pub fn group_norm_stats_bytes(channels: usize, height: usize) -> u64 {
    (channels as u64)
        .saturating_mul(height as u64)
        .saturating_mul(8)
}

/// The statistics of `x` [c, h, w] split into `groups` channel groups: two passes (mean, then the
/// mean squared deviation), each summing rows in f64 and reducing them in a fixed order.
pub fn group_norm_stats(x: &dyn FeatureRows, groups: usize, eps: f32) -> GroupStats {
    let (c, h, w) = x.dims();
    assert!(
        c % groups == 0,
        "{c} channels do not split into {groups} groups"
    );
    let per_group = c / groups;
    let count = (per_group * h * w) as f64;
    let totals = |sums: Vec<f64>| -> Vec<f64> {
        sums.chunks(per_group * h)
            .map(|g| g.iter().sum::<f64>() / count)
            .collect()
    };
    let mean = totals(row_sums(x, |_, v| v as f64));
    let var = totals(row_sums(x, |ch, v| {
        (v as f64 - mean[ch / per_group]).powi(2)
    }));
    let inv_std = var.iter().map(|v| 1.0 / (v + eps as f64).sqrt()).collect();
    GroupStats { mean, inv_std }
}

/// `Σ f(c, v)` over each row, in (channel, row) order. Four interleaved accumulators per row let the
/// loop vectorise; the order is still fixed by the row alone.
fn row_sums(x: &dyn FeatureRows, f: impl Fn(usize, f32) -> f64 + Sync) -> Vec<f64> {
    let (c, h, _) = x.dims();
    (0..c)
        .into_par_iter()
        .flat_map_iter(|ch| {
            let f = &f;
            (0..h).map(move |y| {
                let row = x.row(ch, y);
                let mut acc = [0.0f64; 4];
                let quads = row.chunks_exact(4);
                let tail = quads.remainder();
                for q in quads {
                    for i in 0..4 {
                        acc[i] += f(ch, q[i]);
                    }
                }
                let tail: f64 = tail.iter().map(|&v| f(ch, v)).sum();
                (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
            })
        })
        .collect()
}

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
    assert_eq!(gamma.len(), c);
    assert_eq!(beta.len(), c);
    for image in x.data.chunks_mut(c * h * w) {
        let stats = group_norm_stats(&Planes::new(image, (c, h, w)), groups, eps);
        let (scale, shift) = stats.scale_shift(gamma, beta);
        image
            .par_chunks_mut(h * w)
            .enumerate()
            .for_each(|(ch, plane)| {
                for v in plane.iter_mut() {
                    let y = *v * scale[ch] + shift[ch];
                    *v = if then_silu { silu_scalar(y) } else { y };
                }
            });
    }
}

/// LayerNorm over the last dimension (`dim`) of a row-major [rows, dim] buffer, in place.
pub fn layer_norm(x: &mut [f32], dim: usize, gamma: &[f32], beta: &[f32], eps: f32) {
    assert_eq!(x.len() % dim, 0);
    x.par_chunks_mut(dim).for_each(|row| {
        let norm = row_norm(row, eps);
        for ((v, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
            *v = norm(*v, g, b);
        }
    });
}

/// As `layer_norm`, from `x` into `out` (the same values, without copying `x` first).
pub fn layer_norm_to(
    x: &[f32],
    out: &mut [f32],
    dim: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    assert_eq!(x.len() % dim, 0);
    assert_eq!(x.len(), out.len());
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(o, row)| {
            let norm = row_norm(row, eps);
            for (((o, &v), &g), &b) in o.iter_mut().zip(row).zip(gamma).zip(beta) {
                *o = norm(v, g, b);
            }
        });
}

/// `(v, γ, β) ↦ (v − mean)/√(var + eps) · γ + β` for one row, in f64.
fn row_norm(row: &[f32], eps: f32) -> impl Fn(f32, f32, f32) -> f32 {
    let (mean, var) = moments(row);
    let inv = 1.0 / (var + eps as f64).sqrt();
    move |v, g, b| ((v as f64 - mean) * inv * g as f64 + b as f64) as f32
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

    /// Rows held in bands of `band` rows, each its own allocation.
    struct Bands {
        dims: (usize, usize, usize),
        band: usize,
        bands: Vec<Vec<f32>>,
    }

    impl FeatureRows for Bands {
        fn dims(&self) -> (usize, usize, usize) {
            self.dims
        }
        fn row(&self, c: usize, y: usize) -> &[f32] {
            let (channels, _, w) = self.dims;
            let b = &self.bands[y / self.band];
            let rows = b.len() / (channels * w);
            let at = (c * rows + y % self.band) * w;
            &b[at..at + w]
        }
    }

    #[test]
    fn stats_are_the_same_bits_whatever_the_banding() {
        let (c, h, w) = (8, 13, 7);
        let x: Vec<f32> = (0..c * h * w)
            .map(|i| ((i * 37 % 101) as f32 - 40.0) / 9.0)
            .collect();
        let whole = group_norm_stats(&Planes::new(&x, (c, h, w)), 4, 1e-6);
        for band in [1, 2, 5, 13] {
            let bands = (0..h)
                .step_by(band)
                .map(|y0| {
                    let y1 = (y0 + band).min(h);
                    (0..c)
                        .flat_map(|ch| x[(ch * h + y0) * w..(ch * h + y1) * w].to_vec())
                        .collect()
                })
                .collect();
            let banded = Bands {
                dims: (c, h, w),
                band,
                bands,
            };
            assert_eq!(group_norm_stats(&banded, 4, 1e-6), whole, "band {band}");
        }
        // And they are the group's moments.
        for (g, chunk) in x.chunks(2 * h * w).enumerate() {
            let (mean, var) = moments(chunk);
            assert!((whole.mean[g] - mean).abs() < 1e-12);
            assert!((whole.inv_std[g] - 1.0 / (var + 1e-6f32 as f64).sqrt()).abs() < 1e-12);
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
