//! 3×3, stride-1, pad-1 convolution by Winograd's minimal filtering F(m×m, 3×3) (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Each m×m output tile comes from an α×α input tile (α = m + 2). The input tile and every filter
//! are transformed (V = Bᵀ d B, U = G g Gᵀ), multiplied point by point and summed over the input
//! channels — for each of the α² points ξ one GEMM `M_ξ[co, tiles] = U_ξ[co, ci] · V_ξ[ci, tiles]`
//! — and the sums are transformed back (Y = Aᵀ M A). F(2,3) does 16 products per 4 outputs where
//! the direct convolution does 36 (2.25× fewer), F(4,3) 36 per 16 where direct does 144 (4×); the
//! price is the transforms and a larger rounding error (the transforms' coefficients grow with m).
//!
//! Memory is bounded: the tiles are processed in blocks of whole tile rows (all images of the batch
//! in one sequence) whose transformed input and products fit the conv patch budget, and the
//! filters are transformed a panel of output channels at a time within the weight panel budget
//! (once per call when they fit one panel; else once per block, or each block's input once per
//! panel, whichever transforms fewer values). No buffer grows with the image.
//! `winograd_scratch_bytes` is the formula.
//!
//! Determinism: every value of V, U and the output transform is computed by a fixed sequence of f32
//! operations, and each GEMM sums over all `ci` input channels in one call on one thread, with at
//! least 65 rows or at most 512 input channels: the gemm crate's k-blocking, hence the summation
//! order, then depends on k only (see ARCHITECTURE.md), not on how many tiles or output channels a
//! call covers. So the bits depend neither on the thread count nor on the budgets.

use std::ops::Range;

use rayon::prelude::*;

use super::conv::Conv2dGeometry;
use super::matmul::matmul_single_thread_strided;
use super::panel::WeightRows;
use super::scratch::{Scratch, MIN_SPLIT};
use crate::tensor::Tensor;
use transforms::{array, Lanes, Transforms, F2, F4, LANES};

mod transforms;

/// The output tile of a Winograd convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WinogradTile {
    /// F(2×2, 3×3): α = 4, 16 GEMMs, 2.25× fewer multiplies than direct.
    F2,
    /// F(4×4, 3×3): α = 6, 36 GEMMs, 4× fewer multiplies than direct.
    F4,
}

impl WinogradTile {
    /// Output pixels per tile side (m).
    pub fn m(self) -> usize {
        match self {
            WinogradTile::F2 => 2,
            WinogradTile::F4 => 4,
        }
    }

    /// Input pixels per tile side (α = m + 2).
    pub fn alpha(self) -> usize {
        self.m() + 2
    }
}

/// Sums over at most this many input channels are never split by the gemm crate, whatever the
/// matrix sizes (its k-blocking is at least 512 on every path), so smaller convolutions may use
/// panels (all of co) of fewer than MIN_SPLIT rows.
const MAX_ONE_BLOCK_K: usize = 512;

/// Fewest tiles (over the batch) a Winograd call needs to beat the implicit GEMM. Every call
/// transforms all its filters (α²/9 × the weight's values, written and read again), work that only
/// the tiles amortise: measured on the SD1.5 UNet's 1280-channel convs (benches/PROFILE.md),
/// F(4,3) wins from 32 tiles (16×16 maps, batch 2), F(2,3) from 32 tiles (8×8, batch 2; 1.2×),
/// and both lose at 16 tiles or fewer.
const MIN_TILES: usize = 32;

/// The Winograd variant `conv2d` uses for a convolution of `ci → co` channels over `n` images of
/// `h × w`, or `None` for the implicit GEMM. Chosen by measurement (benches/PROFILE.md): F(4,3)
/// where it has enough tiles, else F(2,3), else the implicit GEMM.
pub fn winograd_choice(
    geo: Conv2dGeometry,
    (n, ci, h, w): (usize, usize, usize, usize),
    co: usize,
) -> Option<WinogradTile> {
    let k3s1 = geo.kernel == 3 && geo.stride == 1 && geo.pad == 1;
    // Few channels: the transforms cost as much as the products they save (conv_in has 4 input
    // channels, conv_out 4 outputs). Small panels need k ≤ MAX_ONE_BLOCK_K for determinism.
    // At least 8 columns: two tiles per tile row (a one-column GEMM takes gemm's
    // matrix-vector path, whose summation order differs).
    let deterministic = co >= MIN_SPLIT || ci <= MAX_ONE_BLOCK_K;
    if !k3s1 || ci < 32 || co < 32 || !deterministic || w < 8 {
        return None;
    }
    let tiles = |m: usize| n * h.div_ceil(m) * w.div_ceil(m);
    [WinogradTile::F4, WinogradTile::F2]
        .into_iter()
        .find(|t| tiles(t.m()) >= MIN_TILES)
}

/// How one call is cut: tiles, filter panels and blocks of tile rows.
#[derive(Clone, Debug)]
struct Plan {
    tile: WinogradTile,
    tiles_y: usize,
    tiles_x: usize,
    /// Tile rows over the whole batch (n · tiles_y).
    tile_rows: usize,
    /// Tile rows per block.
    block_rows: usize,
    /// Output channel ranges, one per filter panel, each ≥ MIN_SPLIT rows (or all of co).
    panels: Vec<Range<usize>>,
    /// Loop over panels outside blocks (each block's input transformed once per panel) rather
    /// than blocks outside panels (each panel's filters transformed once per block): whichever
    /// transforms fewer values when there are several of both.
    panel_outer: bool,
}

impl Plan {
    fn new(
        tile: WinogradTile,
        (n, ci, h, w): (usize, usize, usize, usize),
        co: usize,
        patch_budget: usize,
        panel_budget: usize,
    ) -> Plan {
        let (m, xi) = (tile.m(), tile.alpha() * tile.alpha());
        let (tiles_y, tiles_x) = (h.div_ceil(m), w.div_ceil(m));
        let tile_rows = n * tiles_y;
        // Filter panels: as few as fit the panel budget, balanced, none below MIN_SPLIT.
        let wanted = (co * xi * ci).div_ceil(panel_budget.max(1));
        let count = wanted.min(co / MIN_SPLIT).max(1);
        let panels = (0..count)
            .map(|i| i * co / count..(i + 1) * co / count)
            .collect::<Vec<_>>();
        let panel_rows = co.div_ceil(count);
        // Transformed input [ci, ξ, tiles] + products [ξ, panel_rows, tiles] within the patch
        // budget; at least one tile row.
        let per_tile_row = xi * (ci + panel_rows) * tiles_x;
        let block_rows = (patch_budget / per_tile_row.max(1)).clamp(1, tile_rows.max(1));
        let blocks = tile_rows.div_ceil(block_rows) as u64;
        let (filters, inputs) = (
            (xi * ci * co) as u64,
            (xi * ci * tile_rows * tiles_x) as u64,
        );
        let panel_outer = filters * blocks + inputs > filters + inputs * panels.len() as u64;
        Plan {
            tile,
            tiles_y,
            tiles_x,
            tile_rows,
            block_rows,
            panels,
            panel_outer,
        }
    }

    fn xi(&self) -> usize {
        self.tile.alpha() * self.tile.alpha()
    }

    fn panel_rows(&self) -> usize {
        self.panels.iter().map(|p| p.len()).max().unwrap_or(0)
    }

    fn block_tiles(&self) -> usize {
        self.block_rows * self.tiles_x
    }

    /// Slots per phase of a padded input line (see `input_tile_row`): tiles `tx .. tx + LANES`
    /// read slots `tx ..= tx + LANES` for tx a multiple of LANES below tiles_x.
    fn phase_len(&self) -> usize {
        self.tiles_x.next_multiple_of(LANES) + LANES
    }

    /// f32 values held at once: transformed input, products, transformed filters, and per thread
    /// the input lines (α raw + α column-transformed, each m phases), an output tile buffer and
    /// one filter row (as read and by tap).
    fn scratch_values(&self, ci: usize, threads: usize) -> u64 {
        let (xi, t, p) = (
            self.xi() as u64,
            self.block_tiles() as u64,
            self.panel_rows() as u64,
        );
        let ci = ci as u64;
        let shared = xi * ci * t + xi * p * t + xi * p * ci;
        let (m, alpha) = (self.tile.m() as u64, self.tile.alpha() as u64);
        let line = m * self.phase_len() as u64;
        let filter = 9 * (ci + ci.next_multiple_of(LANES as u64));
        let per_thread = 2 * alpha * line + (alpha + m) * m * LANES as u64 + filter;
        shared.saturating_add(per_thread.saturating_mul(threads as u64))
    }
}

/// Bytes of scratch the Winograd path of `conv2d` holds for `x` [n, ci, h, w] → `co` channels under
/// the budgets of `scratch` on `threads` threads (0 when `conv2d` takes the implicit GEMM for this shape). It is
/// 4 · (α²·ci·T + α²·P·T + α²·P·ci + threads · (2·α·m·L + 8·(α + m)·m + 9·(ci + ⌈ci/8⌉·8)))
/// where P = ⌈co / k⌉ is the largest filter panel for k = min(⌈α²·ci·co / panel budget⌉,
/// ⌊co / 65⌋) panels (so α²·P·ci is at most the weight panel budget plus one row, or under
/// 130 rows when the budget holds fewer than 65), T the tiles per block (whole tile rows of
/// ⌈w/m⌉ tiles, as many as fit α²·(ci + P)·T ≤ patch budget, at least one) and
/// L = ⌈⌈w/m⌉ / 8⌉·8 + 8. The gemm crate's own packing buffers are not counted, as for the
/// implicit GEMM.
pub fn winograd_scratch_bytes(
    (n, ci, h, w): (usize, usize, usize, usize),
    co: usize,
    geo: Conv2dGeometry,
    scratch: &Scratch,
    threads: usize,
) -> u64 {
    match winograd_choice(geo, (n, ci, h, w), co) {
        Some(tile) => {
            let (patch_budget, panel_budget) = (scratch.conv_patch, scratch.weight_panel);
            let plan = Plan::new(tile, (n, ci, h, w), co, patch_budget, panel_budget);
            plan.scratch_values(ci, threads).saturating_mul(4)
        }
        None => 0,
    }
}

/// The patch and weight panel budgets (f32 values) the Winograd path works within: the scratch
/// tier in force (`kernels::scratch`); every use reads them here.
fn budgets() -> (usize, usize) {
    let s = super::scratch::current();
    (s.conv_patch, s.weight_panel)
}

/// `x` [n, ci, h, w] ⊛ `weight` [co, ci·9] (+ `bias` [co]) with 3×3 filters, stride 1, zero
/// padding 1 → [n, co, h, w], by Winograd F(`tile`, 3×3). `weight` is read a row at a time.
pub fn conv3x3_winograd(
    x: &Tensor,
    weight: &dyn WeightRows,
    bias: Option<&[f32]>,
    tile: WinogradTile,
) -> Tensor {
    let (patch_budget, panel_budget) = budgets();
    conv3x3(x, weight, bias, tile, patch_budget, panel_budget)
}

/// As `conv3x3_winograd`. Transformed input + products stay within `patch_budget` f32 values (at
/// least one tile row), transformed filters within `panel_budget` (at least MIN_SPLIT rows).
fn conv3x3(
    x: &Tensor,
    weight: &dyn WeightRows,
    bias: Option<&[f32]>,
    tile: WinogradTile,
    patch_budget: usize,
    panel_budget: usize,
) -> Tensor {
    let (n, ci, h, w) = x.nchw();
    let co = weight.rows();
    assert_eq!(weight.row_len(), ci * 9, "conv weight size");
    if let Some(b) = bias {
        assert_eq!(b.len(), co, "conv bias size");
    }
    let plan = Plan::new(tile, (n, ci, h, w), co, patch_budget, panel_budget);
    let mut out = Tensor::zeros(vec![n, co, h, w]);
    match tile {
        WinogradTile::F2 => run::<2, 4, F2>(x, weight, bias, &plan, &mut out),
        WinogradTile::F4 => run::<4, 6, F4>(x, weight, bias, &plan, &mut out),
    }
    out
}

/// Whether the transforms run their AVX2 build (the same operations on 8-wide registers, so the
/// same bits as the portable build).
#[inline(always)]
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Defines `$name`, which runs `$body` (an `#[inline(always)]` fn) compiled for AVX2 when the CPU
/// has it, else its portable build.
macro_rules! simd_variants {
    ($name:ident, $avx2:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        fn $name<const M: usize, const A: usize, F: Transforms<M, A>>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: AVX2 was detected just above.
                return unsafe { $avx2::<M, A, F>($($arg),*) };
            }
            $body::<M, A, F>($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $avx2<const M: usize, const A: usize, F: Transforms<M, A>>($($arg: $ty),*) {
            $body::<M, A, F>($($arg),*)
        }
    };
}

/// The whole convolution as `plan` cuts it: blocks of tile rows × filter panels, each a transform
/// of the input and of the filters, α² GEMMs (one per task) and the output transform into `out`.
fn run<const M: usize, const A: usize, F: Transforms<M, A>>(
    x: &Tensor,
    weight: &dyn WeightRows,
    bias: Option<&[f32]>,
    plan: &Plan,
    out: &mut Tensor,
) {
    let (n, ci, h, w) = x.nchw();
    let co = weight.rows();
    let xi = A * A;
    let panel_rows = plan.panel_rows();
    let mut v = vec![0.0f32; ci * xi * plan.block_tiles()];
    let mut products = vec![0.0f32; xi * panel_rows * plan.block_tiles()];
    let mut u = vec![0.0f32; panel_rows * xi * ci];
    // Output planes by channel: planes[o][b] (each (b, o) plane is written by one task).
    let mut planes: Vec<Vec<&mut [f32]>> = (0..co).map(|_| Vec::with_capacity(n)).collect();
    for (i, plane) in out.data.chunks_mut(h * w).enumerate() {
        planes[i % co].push(plane);
    }
    let blocks = (0..plan.tile_rows)
        .step_by(plan.block_rows)
        .map(|r0| r0..(r0 + plan.block_rows).min(plan.tile_rows));
    let mut multiply = |panel: &Range<usize>, rows: &Range<usize>, u: &[f32], v: &[f32]| {
        let (p, t) = (panel.len(), rows.len() * plan.tiles_x);
        let products = &mut products[..xi * p * t];
        products
            .par_chunks_mut(p * t)
            .enumerate()
            .for_each(|(e, dst)| {
                matmul_single_thread_strided(
                    (&u[e * ci..], xi * ci, 1),
                    (&v[e * t..], xi * t),
                    (dst, t),
                    (p, ci, t),
                );
            });
        transform_output::<M, A, F>(
            products,
            &mut planes[panel.clone()],
            bias.map(|b| &b[panel.clone()]),
            plan,
            rows.clone(),
            (h, w),
        );
    };
    let u_len = |panel: &Range<usize>| panel.len() * xi * ci;
    if plan.panel_outer {
        for panel in &plan.panels {
            let u = &mut u[..u_len(panel)];
            transform_filters::<M, A, F>(weight, panel.clone(), u);
            for rows in blocks.clone() {
                let v = &mut v[..ci * xi * rows.len() * plan.tiles_x];
                transform_input::<M, A, F>(x, plan, rows.clone(), v);
                multiply(panel, &rows, u, v);
            }
        }
    } else {
        for rows in blocks {
            let v = &mut v[..ci * xi * rows.len() * plan.tiles_x];
            transform_input::<M, A, F>(x, plan, rows.clone(), v);
            for (i, panel) in plan.panels.iter().enumerate() {
                let u = &mut u[..u_len(panel)];
                // One panel holds every filter: transformed once, for the first block.
                if plan.panels.len() > 1 || rows.start == 0 && i == 0 {
                    transform_filters::<M, A, F>(weight, panel.clone(), u);
                }
                multiply(panel, &rows, u, v);
            }
        }
    }
}

/// U for output channels `panel` into `u` [panel, ξ, ci]: `u[(o·α² + i·α + j)·ci + c]` =
/// (G g Gᵀ)[i][j] for the filter g of (o, c). Each task reads its own rows: a weight row is read
/// once, by the thread that transforms it.
fn transform_filters<const M: usize, const A: usize, F: Transforms<M, A>>(
    weight: &dyn WeightRows,
    panel: Range<usize>,
    u: &mut [f32],
) {
    let ci = weight.row_len() / 9;
    u.par_chunks_mut(A * A * ci).zip(panel).for_each_init(
        || vec![0.0f32; 9 * ci + 9 * ci.next_multiple_of(LANES)],
        |buf, (dst, o)| {
            let (row, taps) = buf.split_at_mut(9 * ci);
            weight.read_rows(o, 1, row);
            filter_row::<M, A, F>(row, taps, dst);
        },
    );
}

/// One output channel's filters `row` [ci, 3, 3] → `dst` [ξ, ci], LANES input channels at a time;
/// `taps` (9 · ci rounded up to LANES) receives the taps input channel fastest.
#[inline(always)]
fn filter_row_body<const M: usize, const A: usize, F: Transforms<M, A>>(
    row: &[f32],
    taps: &mut [f32],
    dst: &mut [f32],
) {
    let ci = row.len() / 9;
    let stride = taps.len() / 9;
    for (c, g) in row.chunks_exact(9).enumerate() {
        for (k, &tap) in g.iter().enumerate() {
            taps[k * stride + c] = tap;
        }
    }
    for c in (0..ci).step_by(LANES) {
        let n = LANES.min(ci - c);
        let g: [Lanes; 9] = array(|k| Lanes::load(&taps[k * stride + c..]));
        // Along columns (over dy) for each dx, then along rows (over dx).
        let cols = [0, 1, 2].map(|dx| F::filter([g[dx], g[3 + dx], g[6 + dx]]));
        for i in 0..A {
            let r = F::filter([cols[0][i], cols[1][i], cols[2][i]]);
            for (j, val) in r.into_iter().enumerate() {
                val.store_first(n, &mut dst[(i * A + j) * ci + c..]);
            }
        }
    }
}

/// V for tile rows `rows` (over the batch) into `v` [ci, ξ, tiles]: `v[(c·α² + i·α + j)·T + t]` =
/// (Bᵀ d B)[i][j] for the input tile d of tile t (zero outside the image).
fn transform_input<const M: usize, const A: usize, F: Transforms<M, A>>(
    x: &Tensor,
    plan: &Plan,
    rows: Range<usize>,
    v: &mut [f32],
) {
    let (_, ci, h, w) = x.nchw();
    let t = rows.len() * plan.tiles_x;
    let phase = plan.phase_len();
    v.par_chunks_mut(A * A * t).enumerate().for_each_init(
        || vec![0.0f32; 2 * A * M * phase],
        |buf, (c, dst)| {
            for (rr, r) in rows.clone().enumerate() {
                let (b, ty) = (r / plan.tiles_y, r % plan.tiles_y);
                let plane = &x.data[(b * ci + c) * h * w..(b * ci + c + 1) * h * w];
                let base = rr * plan.tiles_x;
                input_tile_row::<M, A, F>(plane, (h, w), ty, plan, buf, (dst, t, base));
            }
        },
    );
}

/// The transformed tiles of tile row `ty` of one channel's `plane`: point (i, j) of tile tx goes
/// to `dst[(i·α + j)·stride + base + tx]`. `buf` holds 2 · α · M · phase_len values.
///
/// The α input rows are read into M phases (padded column px = M·q + k goes to phase k, slot q),
/// so that the input of tile tx at column j is slot tx + j / M of phase j % M: both passes then
/// work on runs of consecutive tiles.
#[inline(always)]
fn input_tile_row_body<const M: usize, const A: usize, F: Transforms<M, A>>(
    plane: &[f32],
    (h, w): (usize, usize),
    ty: usize,
    plan: &Plan,
    buf: &mut [f32],
    (dst, stride, base): (&mut [f32], usize, usize),
) {
    let phase = plan.phase_len();
    let line_len = M * phase;
    let (lines, cols) = buf.split_at_mut(A * line_len);
    for (i, line) in lines.chunks_exact_mut(line_len).enumerate() {
        line.fill(0.0);
        let y = (ty * M + i).wrapping_sub(1);
        if y < h {
            // Input column x is padded column px = x + 1: x = M·q + k − 1 goes to slot q of phase
            // k for k ≥ 1, and x = M·q + M − 1 to slot q + 1 of phase 0.
            let row = &plane[y * w..(y + 1) * w];
            let (phase0, rest) = line.split_at_mut(phase);
            let chunks = row.chunks_exact(M);
            let tail = chunks.remainder();
            let whole = row.len() / M;
            for (q, chunk) in chunks.enumerate() {
                for k in 1..M {
                    rest[(k - 1) * phase + q] = chunk[k - 1];
                }
                phase0[q + 1] = chunk[M - 1];
            }
            for (k, &val) in tail.iter().enumerate() {
                rest[k * phase + whole] = val;
            }
        }
    }
    // Along columns: every padded column of the tile row at once.
    for at in (0..line_len).step_by(LANES) {
        let d = array(|i| Lanes::load(&lines[i * line_len + at..]));
        for (i, val) in F::input(d).into_iter().enumerate() {
            val.store(&mut cols[i * line_len + at..]);
        }
    }
    // Along rows, LANES tiles at a time.
    let tiles_x = plan.tiles_x;
    for tx in (0..tiles_x).step_by(LANES) {
        let n = LANES.min(tiles_x - tx);
        for i in 0..A {
            let row = &cols[i * line_len..(i + 1) * line_len];
            let d = array(|j| Lanes::load(&row[(j % M) * phase + tx + j / M..]));
            for (j, val) in F::input(d).into_iter().enumerate() {
                val.store_first(n, &mut dst[(i * A + j) * stride + base + tx..]);
            }
        }
    }
}

/// Y = Aᵀ M A (+ bias) for tile rows `rows` from `products` [ξ, panel, tiles] into the planes of
/// the panel's output channels (`planes[o][b]`), clipped to the image.
fn transform_output<const M: usize, const A: usize, F: Transforms<M, A>>(
    products: &[f32],
    planes: &mut [Vec<&mut [f32]>],
    bias: Option<&[f32]>,
    plan: &Plan,
    rows: Range<usize>,
    (h, w): (usize, usize),
) {
    let p = planes.len();
    let tiles_x = plan.tiles_x;
    let t = rows.len() * tiles_x;
    planes.par_iter_mut().enumerate().for_each_init(
        || vec![0.0f32; (A + M) * M * LANES],
        |buf, (o, images)| {
            let bias = bias.map_or(0.0, |b| b[o]);
            for (rr, r) in rows.clone().enumerate() {
                let (b, ty) = (r / plan.tiles_y, r % plan.tiles_y);
                let first = (o * t + rr * tiles_x, p * t);
                output_tile_row::<M, A, F>(products, first, images[b], (h, w), ty, bias, buf);
            }
        },
    );
}

/// Output row block `ty` (M rows of `plane`, clipped) + `bias` from the products of its tiles:
/// point ξ of tile tx is `products[start + ξ·stride + tx]`.
#[inline(always)]
fn output_tile_row_body<const M: usize, const A: usize, F: Transforms<M, A>>(
    products: &[f32],
    (start, stride): (usize, usize),
    plane: &mut [f32],
    (h, w): (usize, usize),
    ty: usize,
    bias: f32,
    buf: &mut [f32],
) {
    let tiles_x = w.div_ceil(M);
    for tx in (0..tiles_x).step_by(LANES) {
        output_tiles::<M, A, F>(products, (start + tx, stride), tiles_x - tx, buf);
        let (x0, y0) = (tx * M, ty * M);
        let cols = ((tiles_x - tx).min(LANES) * M).min(w - x0);
        for (pi, y) in buf.chunks_exact(M * LANES).take(M).enumerate() {
            if y0 + pi >= h {
                break;
            }
            let dst = &mut plane[(y0 + pi) * w + x0..][..cols];
            for (d, &v) in dst.iter_mut().zip(y) {
                *d = v + bias;
            }
        }
    }
}

simd_variants!(
    filter_row,
    filter_row_avx2,
    filter_row_body,
    (row: &[f32], taps: &mut [f32], dst: &mut [f32])
);

simd_variants!(
    input_tile_row,
    input_tile_row_avx2,
    input_tile_row_body,
    (
        plane: &[f32],
        hw: (usize, usize),
        ty: usize,
        plan: &Plan,
        buf: &mut [f32],
        dst: (&mut [f32], usize, usize)
    )
);

simd_variants!(
    output_tile_row,
    output_tile_row_avx2,
    output_tile_row_body,
    (
        products: &[f32],
        first: (usize, usize),
        plane: &mut [f32],
        hw: (usize, usize),
        ty: usize,
        bias: f32,
        buf: &mut [f32]
    )
);

/// Aᵀ M A for the next min(LANES, `left`) tiles, point ξ of tile l being `products[start +
/// ξ·stride + l]`. Leaves row p of the output tiles in `buf[p·M·LANES ..]`, the tiles side by side
/// (tile l, column q at l·M + q); `buf` also holds α·M partly transformed lanes after those.
#[inline(always)]
fn output_tiles<const M: usize, const A: usize, F: Transforms<M, A>>(
    products: &[f32],
    (start, stride): (usize, usize),
    left: usize,
    buf: &mut [f32],
) {
    let n = left.min(LANES);
    let (out, by_row) = buf.split_at_mut(M * M * LANES);
    // Along rows: point (i, q) of the partly transformed tiles.
    for i in 0..A {
        let d = array(|j| Lanes::load_first(n, &products[start + (i * A + j) * stride..]));
        for (q, val) in F::output(d).into_iter().enumerate() {
            val.store(&mut by_row[(i * M + q) * LANES..]);
        }
    }
    // Along columns, interleaving the tiles' columns into output rows.
    for q in 0..M {
        let d = array(|i| Lanes::load(&by_row[(i * M + q) * LANES..]));
        for (pi, val) in F::output(d).into_iter().enumerate() {
            let row = &mut out[pi * M * LANES..(pi + 1) * M * LANES];
            for (l, &v) in val.0.iter().enumerate() {
                row[l * M + q] = v;
            }
        }
    }
}

#[cfg(test)]
mod tests;
