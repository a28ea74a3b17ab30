//! 2-D convolution as implicit GEMM over bounded tiles of output rows.
//!
//! Never builds a full-resolution im2col buffer: each tile gathers at most `PATCH_BUDGET` values
//! (the VAE's full 512² im2col would be 1.2 GB), then one GEMM computes all output channels for it.

use rayon::prelude::*;

use super::panel::{LhsPanels, WeightRows};
use crate::tensor::Tensor;

/// Upper bound on the gathered patch of one tile, in f32 values (16 MiB).
const PATCH_BUDGET: usize = 4 << 20;

/// Kernel size, stride and zero padding of a square convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dGeometry {
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2dGeometry {
    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        (
            (h + 2 * self.pad - self.kernel) / self.stride + 1,
            (w + 2 * self.pad - self.kernel) / self.stride + 1,
        )
    }
}

/// `x` [n, ci, h, w] ⊛ `weight` [co, ci·k·k] (+ `bias` [co]) → [n, co, oh, ow]. The weight is
/// read in row panels (see `panel`), so it may be stored in any format.
pub fn conv2d(
    x: &Tensor,
    weight: &dyn WeightRows,
    bias: Option<&[f32]>,
    geo: Conv2dGeometry,
) -> Tensor {
    conv2d_tiled(x, weight, bias, geo, PATCH_BUDGET)
}

fn conv2d_tiled(
    x: &Tensor,
    weight: &dyn WeightRows,
    bias: Option<&[f32]>,
    geo: Conv2dGeometry,
    patch_budget: usize,
) -> Tensor {
    let (n, ci, h, w) = x.nchw();
    let kk = geo.kernel * geo.kernel;
    let co = weight.rows();
    assert_eq!(weight.row_len(), ci * kk, "conv weight size");
    let filters = LhsPanels::new(weight);
    let (oh, ow) = geo.out_size(h, w);
    let mut out = Tensor::zeros(vec![n, co, oh, ow]);
    let pointwise = geo.kernel == 1 && geo.stride == 1 && geo.pad == 0;
    let k_dim = ci * kk;
    let rows_per_tile = (patch_budget / (k_dim * ow).max(1)).clamp(1, oh);
    let mut patch = if pointwise {
        Vec::new()
    } else {
        vec![0.0f32; k_dim * rows_per_tile * ow]
    };
    for b in 0..n {
        let input = &x.data[b * ci * h * w..(b + 1) * ci * h * w];
        let output = &mut out.data[b * co * oh * ow..(b + 1) * co * oh * ow];
        if pointwise {
            filters.multiply(input, oh * ow, output, oh * ow);
        } else {
            for row0 in (0..oh).step_by(rows_per_tile) {
                let rows = rows_per_tile.min(oh - row0);
                let cols = rows * ow;
                let patch = &mut patch[..k_dim * cols];
                gather_patch(input, (h, w), geo, row0, rows, ow, patch);
                let dst = &mut output[row0 * ow..];
                filters.multiply(patch, cols, dst, oh * ow);
            }
        }
        if let Some(bias) = bias {
            for (plane, &bv) in output.chunks_mut(oh * ow).zip(bias) {
                plane.iter_mut().for_each(|v| *v += bv);
            }
        }
    }
    out
}

/// Fills `patch` [ci·k·k, rows·ow] with the input values each output pixel of rows
/// `row0..row0+rows` sees (zero outside the image).
fn gather_patch(
    input: &[f32],
    (h, w): (usize, usize),
    geo: Conv2dGeometry,
    row0: usize,
    rows: usize,
    ow: usize,
    patch: &mut [f32],
) {
    let k = geo.kernel;
    let cols = rows * ow;
    patch
        .par_chunks_mut(k * k * cols)
        .enumerate()
        .for_each(|(c, chunk)| {
            let plane = &input[c * h * w..(c + 1) * h * w];
            for dy in 0..k {
                for dx in 0..k {
                    let dst = &mut chunk[(dy * k + dx) * cols..(dy * k + dx + 1) * cols];
                    for r in 0..rows {
                        let iy = ((row0 + r) * geo.stride + dy) as isize - geo.pad as isize;
                        let dst_row = &mut dst[r * ow..(r + 1) * ow];
                        if iy < 0 || iy >= h as isize {
                            dst_row.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                        for (ox, d) in dst_row.iter_mut().enumerate() {
                            let ix = (ox * geo.stride + dx) as isize - geo.pad as isize;
                            *d = if ix < 0 || ix >= w as isize {
                                0.0
                            } else {
                                src[ix as usize]
                            };
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::DenseRows;

    fn naive(x: &Tensor, wt: &[f32], bias: &[f32], geo: Conv2dGeometry) -> Tensor {
        let (n, ci, h, w) = x.nchw();
        let k = geo.kernel;
        let co = bias.len();
        let (oh, ow) = geo.out_size(h, w);
        let mut out = Tensor::zeros(vec![n, co, oh, ow]);
        for b in 0..n {
            for o in 0..co {
                for y in 0..oh {
                    for xx in 0..ow {
                        let mut s = bias[o] as f64;
                        for c in 0..ci {
                            for dy in 0..k {
                                for dx in 0..k {
                                    let iy = (y * geo.stride + dy) as isize - geo.pad as isize;
                                    let ix = (xx * geo.stride + dx) as isize - geo.pad as isize;
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w
                                    {
                                        s += x.data
                                            [((b * ci + c) * h + iy as usize) * w + ix as usize]
                                            as f64
                                            * wt[((o * ci + c) * k + dy) * k + dx] as f64;
                                    }
                                }
                            }
                        }
                        out.data[((b * co + o) * oh + y) * ow + xx] = s as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive_for_unet_and_vae_geometries() {
        let geos = [
            Conv2dGeometry {
                kernel: 3,
                stride: 1,
                pad: 1,
            },
            Conv2dGeometry {
                kernel: 3,
                stride: 2,
                pad: 1,
            },
            Conv2dGeometry {
                kernel: 1,
                stride: 1,
                pad: 0,
            },
            Conv2dGeometry {
                kernel: 3,
                stride: 2,
                pad: 0,
            },
        ];
        let (n, ci, co, h, w) = (2, 5, 7, 9, 11);
        let x = Tensor::new(
            vec![n, ci, h, w],
            (0..n * ci * h * w)
                .map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0)
                .collect(),
        );
        for geo in geos {
            let wt: Vec<f32> = (0..co * ci * geo.kernel * geo.kernel)
                .map(|i| ((i * 13 % 7) as f32 - 3.0) / 4.0)
                .collect();
            let bias: Vec<f32> = (0..co).map(|i| i as f32 / 10.0).collect();
            let want = naive(&x, &wt, &bias, geo);
            // Budgets: whole image in one tile, and one output row per tile (the tiling path).
            for budget in [PATCH_BUDGET, 1] {
                let rows = DenseRows {
                    data: &wt,
                    rows: co,
                };
                let got = conv2d_tiled(&x, &rows, Some(&bias), geo, budget);
                // Sums of ≤ 45 products of magnitude ≤ 1: f32 reordering error is ~1e-6; 1e-4
                // still catches any indexing mistake.
                assert!(got.max_abs_diff(&want) < 1e-4, "{geo:?} budget {budget}");
            }
        }
    }
}
