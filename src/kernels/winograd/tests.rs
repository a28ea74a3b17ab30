use super::*;
use crate::kernels::conv::{conv2d_implicit_gemm, Resize};
use crate::kernels::scratch::TIERS;
use crate::kernels::DenseRows;

const K3: Conv2dGeometry = Conv2dGeometry {
    kernel: 3,
    stride: 1,
    pad: 1,
};

/// Uniform values in [-scale, scale) from a fixed LCG.
fn uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Direct convolution in f64: the reference both paths are measured against. Also returns, per
/// output, Σ|w·x| (the scale every f32 rounding error of that output is relative to).
fn reference(x: &Tensor, wt: &[f32], bias: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let (n, ci, h, w) = x.nchw();
    let co = bias.len();
    let mut out = vec![0.0f64; n * co * h * w];
    let mut mag = vec![0.0f64; n * co * h * w];
    for b in 0..n {
        for o in 0..co {
            let base = (b * co + o) * h * w;
            out[base..base + h * w].fill(bias[o] as f64);
            for c in 0..ci {
                let plane = &x.data[(b * ci + c) * h * w..(b * ci + c + 1) * h * w];
                for dy in 0..3 {
                    for dx in 0..3 {
                        let g = wt[((o * ci + c) * 3 + dy) * 3 + dx] as f64;
                        for y in 0..h {
                            let iy = (y + dy).wrapping_sub(1);
                            if iy >= h {
                                continue;
                            }
                            for xx in 0..w {
                                let ix = (xx + dx).wrapping_sub(1);
                                if ix < w {
                                    let p = g * plane[iy * w + ix] as f64;
                                    out[base + y * w + xx] += p;
                                    mag[base + y * w + xx] += p.abs();
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    (out, mag)
}

/// Largest |got − want| / Σ|w·x| over all outputs.
fn max_rel_error(got: &[f32], want: &[f64], mag: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .zip(mag)
        .map(|((&g, &r), &m)| (g as f64 - r).abs() / m.max(1e-30))
        .fold(0.0, f64::max)
}

struct Case {
    x: Tensor,
    wt: Vec<f32>,
    bias: Vec<f32>,
}

/// A UNet-like layer: activations of order 1, filters at Kaiming scale (|w| ≲ 1/√(9·ci)).
fn case(n: usize, ci: usize, co: usize, h: usize, w: usize) -> Case {
    Case {
        x: Tensor::new(vec![n, ci, h, w], uniform(n * ci * h * w, 1, 1.0)),
        wt: uniform(co * ci * 9, 2, 1.0 / ((9 * ci) as f32).sqrt()),
        bias: uniform(co, 3, 0.1),
    }
}

/// Winograd against the f64 direct sum at UNet-like shapes (320 and 2560 input channels; 16×16,
/// 13×11 and 9×8 maps, the odd ones leaving partial tiles), next to the implicit GEMM's own error.
///
/// Error is measured relative to Σ|w·x| of each output, the scale of its rounding. Summing 2880 to
/// 23040 f32 products costs the implicit GEMM 1.6e-8 to 5.5e-8 of that. Winograd also rounds in
/// the transforms, and each output is a combination of α² sums whose terms exceed the output's
/// own: the transform matrices' entries reach 1 (F(2,3)) and 8 (F(4,3), Aᵀ's 2³ row; Bᵀ has 4s
/// and 5s), applied along both dimensions, so the relative error grows by a few (F(2,3)) to some
/// tens (F(4,3)). Measured (the test prints it): F(2,3) ≤ 1.1e-7, F(4,3) ≤ 2.5e-6 of Σ|w·x|.
/// Bounds 5e-6 (F2) and 5e-5 (F4) keep ≥ 20× margin, while a wrong tap, tile edge or transform
/// coefficient gives errors of order 1e-2.
#[test]
fn matches_direct_sum_at_unet_like_shapes() {
    for (n, ci, co, h, w) in [
        (2, 320, 96, 16, 16),
        (1, 320, 70, 13, 11),
        (1, 2560, 66, 9, 8),
    ] {
        let Case { x, wt, bias } = case(n, ci, co, h, w);
        let (want, mag) = reference(&x, &wt, &bias);
        let rows = DenseRows {
            data: &wt,
            rows: co,
        };
        let direct = conv2d_implicit_gemm(&x, &rows, Some(&bias), K3, &TIERS[0]);
        let direct_err = max_rel_error(&direct.data, &want, &mag);
        for (tile, bound) in [(WinogradTile::F2, 5e-6), (WinogradTile::F4, 5e-5)] {
            let got = conv3x3_winograd(&x, &rows, Some(&bias), tile, &TIERS[0]);
            assert_eq!(got.shape, direct.shape);
            let err = max_rel_error(&got.data, &want, &mag);
            let abs = got.max_abs_diff(&direct);
            println!(
                "{tile:?} {n}×{ci}→{co} @{h}×{w}: max error {err:.2e} of Σ|w·x| \
                 (implicit GEMM {direct_err:.2e}); max |Winograd − implicit GEMM| {abs:.2e}"
            );
            assert!(err < bound, "{tile:?} @{h}×{w}: error {err:e} ≥ {bound:e}");
        }
    }
}

/// Same bits whatever the thread count and the budgets: blocks of one tile row to the whole batch
/// in one block, filter panels from one (all channels) to the most at ≥ 65 rows; also for a conv
/// with fewer than 65 output channels (one panel, gemm's small-matrix path when blocks are small).
#[test]
fn bits_independent_of_threads_and_budgets() {
    for (n, ci, co, h, w) in [(2, 48, 200, 13, 17), (2, 40, 36, 16, 20)] {
        let Case { x, wt, bias } = case(n, ci, co, h, w);
        let rows = DenseRows {
            data: &wt,
            rows: co,
        };
        for tile in [WinogradTile::F2, WinogradTile::F4] {
            let xi = tile.alpha() * tile.alpha();
            let run = |threads: usize, patch: usize, panel: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| conv3x3(&x, &rows, Some(&bias), tile, patch, panel))
            };
            let want = run(1, 1 << 30, 1 << 30);
            let patches = [1, xi * (ci + co) * 3 * 5, 1 << 22];
            let panels = [1, xi * ci * 100, 1 << 22];
            for threads in [1, 2, 3] {
                for patch in patches {
                    for panel in panels {
                        let got = run(threads, patch, panel);
                        assert!(
                            got.data == want.data,
                            "{tile:?} {ci}->{co}: threads {threads}, patch {patch}, panel {panel}"
                        );
                    }
                }
            }
        }
    }
}

/// No bias, a map smaller than one F(4,3) tile in one direction, one image.
#[test]
fn small_maps_and_no_bias() {
    for (h, w) in [(4, 4), (5, 3), (1, 9)] {
        let Case { x, wt, .. } = case(1, 40, 66, h, w);
        let zero = vec![0.0f32; 66];
        let (want, mag) = reference(&x, &wt, &zero);
        let rows = DenseRows {
            data: &wt,
            rows: 66,
        };
        for tile in [WinogradTile::F2, WinogradTile::F4] {
            let got = conv3x3_winograd(&x, &rows, None, tile, &TIERS[0]);
            let err = max_rel_error(&got.data, &want, &mag);
            assert!(err < 5e-5, "{tile:?} @{h}×{w}: {err:e}");
        }
    }
}

/// The scratch formula matches the buffers `run` allocates; transformed input + products stay
/// within the patch budget (or one tile row), transformed filters within the weight panel budget
/// (or about MIN_SPLIT rows); at SD1.5's shapes the whole stays within the 48 MiB the governor
/// counts for a conv's patch and weight panels (`UNet::peak_activation_bytes`).
#[test]
fn scratch_bounded_by_budgets() {
    let (patch, panel) = (TIERS[0].conv_patch, TIERS[0].weight_panel);
    let mut chosen = 0;
    for (n, ci, co, s) in [
        (2, 320, 320, 64),
        (2, 640, 640, 32),
        (2, 1280, 1280, 16),
        (2, 2560, 1280, 16),
        (2, 1280, 1280, 8),
        (2, 2560, 1280, 8),
        (2, 1920, 640, 32),
        (2, 1280, 1280, 32),
        (1, 1280, 1280, 16),
        (1, 128, 128, 512),
    ] {
        let dims = (n, ci, s, s);
        let Some(tile) = winograd_choice(K3, dims, co) else {
            continue;
        };
        chosen += 1;
        let plan = Plan::new(tile, dims, 0..s, co, patch, panel);
        let (xi, t, p) = (plan.xi(), plan.block_tiles(), plan.panel_rows());
        let transformed = xi * ci * t + xi * p * t;
        assert!(transformed <= patch.max(xi * (ci + p) * plan.tiles_x));
        // Balanced panels: one row over the budget at most, or fewer than 2 · MIN_SPLIT rows
        // when the budget is below MIN_SPLIT rows (F(4,3) at 2560 input channels).
        assert!(p * xi * ci <= (panel + xi * ci).max(xi * (2 * MIN_SPLIT - 1) * ci));
        assert_eq!(
            plan.scratch_values(ci, 0, false),
            (transformed + p * xi * ci) as u64
        );
        let bytes = winograd_scratch_bytes(dims, co, K3, &TIERS[0], 2);
        assert!(bytes <= 48 << 20, "{ci}->{co} @{s}²: {bytes} bytes");
    }
    assert!(chosen >= 7, "Winograd chosen for {chosen} of the shapes");
}

/// The map a convolution sees through `t`, materialised with the gather's own operations.
fn seen_map(x: &Tensor, t: InputTransform) -> Tensor {
    let (n, ci, h, w) = x.nchw();
    let (sh, sw) = t.resize.seen(h, w);
    let mut data = vec![0.0f32; n * ci * sh * sw];
    for (i, plane) in data.chunks_mut(sh * sw).enumerate() {
        let src = &x.data[i * h * w..(i + 1) * h * w];
        for (y, row) in plane.chunks_mut(sw).enumerate() {
            let y = t.resize.source_row(y, h);
            t.apply(i % ci, &src[y * w..(y + 1) * w], row);
        }
    }
    Tensor::new(vec![n, ci, sh, sw], data)
}

/// Reading through a GroupNorm + SiLU affine, a resize (2×, or to an odd skip's size) or both
/// gives the bits of convolving the materialised map (the UNet's ResNet and upsampler
/// convolutions take this path), per image with its own affine.
#[test]
fn reads_through_input_transforms_as_the_materialised_map() {
    let (n, ci, co, h, w) = (2, 40, 70, 7, 9);
    let Case { x, wt, bias } = case(n, ci, co, h, w);
    let rows = DenseRows {
        data: &wt,
        rows: co,
    };
    let affine: Vec<(Vec<f32>, Vec<f32>)> = (0..n as u64)
        .map(|b| (uniform(ci, 10 + b, 2.0), uniform(ci, 20 + b, 1.0)))
        .collect();
    let odd = Resize::To(2 * h - 1, 2 * w - 1);
    let cases = [
        (true, Resize::None),
        (false, Resize::Twice),
        (true, Resize::Twice),
        (true, odd),
        (false, Resize::To(h + 4, w + 2)),
    ];
    for (norm, resize) in cases {
        let transform = |b: usize| InputTransform {
            affine: norm.then(|| (&affine[b].0[..], &affine[b].1[..])),
            silu: norm,
            resize,
        };
        let planes: Vec<Planes> = x
            .data
            .chunks_exact(ci * h * w)
            .map(|image| Planes::new(image, (ci, h, w)))
            .collect();
        let inputs: Vec<WinogradInput> = planes
            .iter()
            .enumerate()
            .map(|(b, p)| (p as &dyn FeatureRows, transform(b)))
            .collect();
        let seen: Vec<Tensor> = (0..n)
            .map(|b| {
                let image = x.data[b * ci * h * w..(b + 1) * ci * h * w].to_vec();
                let image = Tensor::new(vec![1, ci, h, w], image);
                seen_map(&image, transform(b))
            })
            .collect();
        let mut whole = seen[0].clone();
        whole.shape[0] = n;
        whole.data.extend_from_slice(&seen[1].data);
        for tile in [WinogradTile::F2, WinogradTile::F4] {
            let got = conv3x3_winograd_read(&inputs, &rows, Some(&bias), tile, &TIERS[0]);
            let want = conv3x3_winograd(&whole, &rows, Some(&bias), tile, &TIERS[0]);
            assert!(got.data == want.data, "{tile:?} norm {norm} {resize:?}");
        }
    }
}

/// `WinogradConv::rows` (filters transformed once) computes any run of output rows starting at a
/// multiple of m with the bits of the whole-map call, whatever the thread count; F(4,3) and F(2,3).
#[test]
fn rows_in_bands_equal_the_whole_map() {
    let (ci, co, h, w) = (48, 66, 23, 19);
    let Case { x, wt, bias } = case(1, ci, co, h, w);
    let rows = DenseRows {
        data: &wt,
        rows: co,
    };
    let planes = Planes::new(&x.data, (ci, h, w));
    let t = InputTransform::default();
    for tile in [WinogradTile::F2, WinogradTile::F4] {
        let want = conv3x3_winograd(&x, &rows, Some(&bias), tile, &TIERS[0]);
        let mut conv = WinogradConv::new(&rows, Some(&bias), tile, &TIERS[0]);
        let step_rows = WinogradConv::call_rows(tile, (ci, h, w), co, &TIERS[0]);
        for step in [tile.m(), 3 * tile.m(), step_rows, h] {
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut got = vec![0.0f32; co * h * w];
                for r0 in (0..h).step_by(step) {
                    let r1 = (r0 + step).min(h);
                    let mut band = vec![0.0f32; co * (r1 - r0) * w];
                    pool.install(|| conv.rows(&planes, t, r0..r1, &mut band));
                    for o in 0..co {
                        got[(o * h + r0) * w..(o * h + r1) * w]
                            .copy_from_slice(&band[o * (r1 - r0) * w..(o + 1) * (r1 - r0) * w]);
                    }
                }
                assert!(got == want.data, "{tile:?} step {step} threads {threads}");
            }
        }
    }
}
