use super::*;
use crate::kernels::scratch::TIERS;
use crate::kernels::DenseRows;

/// The first tier with a patch budget of `values`.
fn patch(values: usize) -> Scratch {
    Scratch {
        conv_patch: values,
        ..TIERS[0]
    }
}

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
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    s += x.data[((b * ci + c) * h + iy as usize) * w + ix as usize]
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

fn values(n: usize, a: usize, m: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * a % m) as f32 - (m / 2) as f32) / (m / 2) as f32)
        .collect()
}

const K3: Conv2dGeometry = Conv2dGeometry {
    kernel: 3,
    stride: 1,
    pad: 1,
};

#[test]
fn matches_naive_for_unet_and_vae_geometries() {
    let geos = [
        K3,
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
    let x = Tensor::new(vec![n, ci, h, w], values(n * ci * h * w, 31, 17));
    for geo in geos {
        let wt: Vec<f32> = (0..co * ci * geo.kernel * geo.kernel)
            .map(|i| ((i * 13 % 7) as f32 - 3.0) / 4.0)
            .collect();
        let bias: Vec<f32> = (0..co).map(|i| i as f32 / 10.0).collect();
        let want = naive(&x, &wt, &bias, geo);
        // Budgets: whole image in one tile, and one output row per tile (the tiling path).
        for budget in [TIERS[0].conv_patch, 1] {
            let rows = DenseRows {
                data: &wt,
                rows: co,
            };
            let got = conv2d_implicit_gemm(&x, &rows, Some(&bias), geo, &patch(budget));
            // Sums of ≤ 45 products of magnitude ≤ 1: f32 reordering error is ~1e-6; 1e-4
            // still catches any indexing mistake.
            assert!(got.max_abs_diff(&want) < 1e-4, "{geo:?} budget {budget}");
        }
    }
}

/// A map whose rows are separate allocations (as in banded storage).
struct RowVecs {
    dims: (usize, usize, usize),
    rows: Vec<Vec<f32>>,
}

impl RowVecs {
    fn new(data: &[f32], dims: (usize, usize, usize)) -> Self {
        let rows = data.chunks(dims.2).map(|r| r.to_vec()).collect();
        RowVecs { dims, rows }
    }
}

impl FeatureRows for RowVecs {
    fn dims(&self) -> (usize, usize, usize) {
        self.dims
    }
    fn row(&self, c: usize, y: usize) -> &[f32] {
        &self.rows[c * self.dims.1 + y]
    }
}

/// GroupNorm-style affine + SiLU and a resize (2×, or nearest to another size: an odd skip's, a
/// smaller one), fused into the gather, give the same bits as materialising the transformed map
/// and convolving it: the same f32 operations per value and the same GEMM calls.
#[test]
fn fused_affine_silu_resize_equals_materialised() {
    let (ci, co, h, w) = (6, 70, 7, 9);
    let x = values(ci * h * w, 37, 29);
    let wt = values(co * ci * 9, 11, 13);
    let bias: Vec<f32> = (0..co).map(|i| i as f32 / 50.0).collect();
    let scale: Vec<f32> = (0..ci).map(|c| 0.5 + c as f32 / 7.0).collect();
    let shift: Vec<f32> = (0..ci).map(|c| c as f32 / 5.0 - 0.4).collect();
    let weight = DenseRows {
        data: &wt,
        rows: co,
    };
    let resizes = [
        Resize::None,
        Resize::Twice,
        Resize::To(2 * h, 2 * w),
        Resize::To(2 * h - 1, 2 * w - 1),
        Resize::To(h + 3, w - 2),
    ];
    for silu in [true, false] {
        for resize in resizes {
            let (sh, sw) = resize.seen(h, w);
            let mut seen = Tensor::zeros(vec![1, ci, sh, sw]);
            for c in 0..ci {
                for y in 0..sh {
                    for xx in 0..sw {
                        // Nearest: floor(i · in / out) (torch's f32 rule agrees at these sizes).
                        let v = x[(c * h + y * h / sh) * w + xx * w / sw] * scale[c] + shift[c];
                        seen.data[(c * sh + y) * sw + xx] = if silu { silu_scalar(v) } else { v };
                    }
                }
            }
            for budget in [TIERS[0].conv_patch, 1, 2 * ci * 9 * sw] {
                let want = conv2d_implicit_gemm(&seen, &weight, Some(&bias), K3, &patch(budget));
                let t = InputTransform {
                    affine: Some((&scale, &shift)),
                    silu,
                    resize,
                };
                let mut conv = RowConv::new(&weight, Some(&bias), K3, &patch(budget));
                let mut got = vec![0.0; co * sh * sw];
                conv.rows(&RowVecs::new(&x, (ci, h, w)), t, 0..sh, &mut got);
                assert!(got == want.data, "silu {silu} {resize:?} budget {budget}");
            }
        }
    }
}

/// The source index of a nearest resize, as torch's `F.interpolate(size=…, mode="nearest")`
/// gives it (values worked out from ATen's rule: same size, exact 2×, else floor(i · in/out) in f32).
#[test]
fn nearest_source_follows_torch() {
    let indices = |input: usize, output: usize| -> Vec<usize> {
        (0..output)
            .map(|i| nearest_source(i, input, output))
            .collect()
    };
    assert_eq!(indices(5, 9), [0, 0, 1, 1, 2, 2, 3, 3, 4]);
    assert_eq!(indices(4, 8), [0, 0, 1, 1, 2, 2, 3, 3]);
    assert_eq!(indices(7, 10), [0, 0, 1, 2, 2, 3, 4, 4, 5, 6]);
    assert_eq!(indices(4, 3), [0, 1, 2]);
    assert_eq!(indices(3, 3), [0, 1, 2]);
    // An upsampler meeting an odd skip (out = 2·in − 1) reads what the 2× upsample reads.
    for input in 1..300 {
        assert!((0..2 * input - 1).all(|i| nearest_source(i, input, 2 * input - 1) == i / 2));
    }
}

/// Computing output rows band by band (bands aligned to the tiles) gives the same bits as the whole
/// output; an unaligned band still agrees to f32 rounding.
#[test]
fn row_bands_equal_whole_output() {
    let (ci, co, h, w) = (4, 66, 13, 10);
    let x = values(ci * h * w, 41, 23);
    let wt = values(co * ci * 9, 7, 19);
    let bias: Vec<f32> = (0..co).map(|i| i as f32 / 30.0).collect();
    let weight = DenseRows {
        data: &wt,
        rows: co,
    };
    let input = Planes::new(&x, (ci, h, w));
    let t = InputTransform::default();
    let budget = 3 * ci * 9 * w; // 3 rows per tile
    let mut conv = RowConv::new(&weight, Some(&bias), K3, &patch(budget));
    let mut whole = vec![0.0; co * h * w];
    conv.rows(&input, t, 0..h, &mut whole);
    let plane_rows = |out: &[f32], r: Range<usize>| -> Vec<f32> {
        (0..co)
            .flat_map(|c| out[(c * h + r.start) * w..(c * h + r.end) * w].to_vec())
            .collect()
    };
    for r0 in (0..h).step_by(3) {
        let r = r0..(r0 + 3).min(h);
        let mut band = vec![0.0; co * r.len() * w];
        conv.rows(&input, t, r.clone(), &mut band);
        assert!(band == plane_rows(&whole, r.clone()), "aligned band {r:?}");
    }
    let r = 5..11;
    let mut band = vec![0.0; co * r.len() * w];
    conv.rows(&input, t, r.clone(), &mut band);
    let want = plane_rows(&whole, r);
    let err = band.iter().zip(&want).map(|(a, b)| (a - b).abs());
    assert!(err.fold(0.0, f32::max) < 1e-5);
}

/// GroupNorm + SiLU (and the 2× resize) on a row give the baseline build's bits at every vector
/// width (no FMA contraction).
#[test]
fn input_transform_is_the_same_at_every_width() {
    let src: Vec<f32> = (0..203)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 9.0)
        .collect();
    let (scale, shift) = (vec![0.7, -1.3], vec![0.25, 2.0]);
    for resize in [Resize::None, Resize::Twice] {
        for (affine, silu) in [(true, true), (true, false), (false, true)] {
            let t = InputTransform {
                affine: affine.then_some((&scale[..], &shift[..])),
                silu,
                resize,
            };
            let len = if resize == Resize::Twice { 406 } else { 203 };
            let mut want = vec![0.0; len];
            t.apply_with(1, &src, &mut want, Isa::Scalar);
            for isa in [Isa::Avx2, Isa::Avx512] {
                if isa > Isa::detected() {
                    continue;
                }
                let mut got = vec![0.0; len];
                t.apply_with(1, &src, &mut got, isa);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(same, "{isa:?} {resize:?} affine {affine} silu {silu}");
            }
        }
    }
}
