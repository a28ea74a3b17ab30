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

use super::conv::{Conv2dGeometry, FeatureRows, InputTransform, Planes};
use super::matmul::matmul_single_thread_strided;
use super::panel::WeightRows;
use super::scratch::{Scratch, MIN_SPLIT};
use crate::tensor::Tensor;
use tiles::{transform_filters, transform_input, transform_output};
use transforms::{Transforms, F2, F4, LANES};

mod tiles;
mod transforms;

/// One image of the map a Winograd convolution reads: its rows, seen through an input transform
/// (GroupNorm + SiLU, 2× upsample) exactly as the implicit GEMM's gather sees them.
pub type WinogradInput<'a> = (&'a dyn FeatureRows, InputTransform<'a>);

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
    /// Height and width of the map the convolution sees (and writes).
    seen: (usize, usize),
    /// The call's first output row (a multiple of m) and its number of output rows.
    y0: usize,
    out_rows: usize,
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
    /// Output rows `rows` of every image of a map `(n, ci, h, w)` (seen dims); `rows.start` is a
    /// multiple of m.
    fn new(
        tile: WinogradTile,
        (n, ci, h, w): (usize, usize, usize, usize),
        rows: Range<usize>,
        co: usize,
        patch_budget: usize,
        panel_budget: usize,
    ) -> Plan {
        let (m, xi) = (tile.m(), tile.alpha() * tile.alpha());
        assert!(
            rows.start.is_multiple_of(m) && rows.end <= h,
            "rows {rows:?} of {h}"
        );
        let (tiles_y, tiles_x) = (rows.len().div_ceil(m), w.div_ceil(m));
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
            seen: (h, w),
            y0: rows.start,
            out_rows: rows.len(),
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

    /// f32 values held at once: transformed input, products, transformed filters (unless
    /// `resident`), and per thread the input lines (α raw + α column-transformed, each m phases)
    /// and one transformed input row, an output tile buffer and `FILTER_ROWS_PER_TASK` filter rows
    /// as read, one by tap.
    fn scratch_values(&self, ci: usize, threads: usize, resident: bool) -> u64 {
        let (xi, t, p) = (
            self.xi() as u64,
            self.block_tiles() as u64,
            self.panel_rows() as u64,
        );
        let ci = ci as u64;
        let filters = if resident { 0 } else { xi * p * ci };
        let shared = xi * ci * t + xi * p * t + filters;
        let (m, alpha) = (self.tile.m() as u64, self.tile.alpha() as u64);
        let line = m * self.phase_len() as u64;
        let filter =
            9 * (tiles::FILTER_ROWS_PER_TASK as u64 * ci + ci.next_multiple_of(LANES as u64));
        let per_thread =
            2 * alpha * line + self.seen.1 as u64 + (alpha + m) * m * LANES as u64 + filter;
        shared.saturating_add(per_thread.saturating_mul(threads as u64))
    }
}

/// Bytes of scratch the Winograd path of `conv2d` holds for `x` [n, ci, h, w] → `co` channels under
/// the budgets of `scratch` on `threads` threads (0 when `conv2d` takes the implicit GEMM for this shape). It is
/// 4 · (α²·ci·T + α²·P·T + α²·P·ci + threads · (2·α·m·L + 8·(α + m)·m + 9·(8·ci + ⌈ci/8⌉·8)))
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
            let plan = Plan::new(tile, (n, ci, h, w), 0..h, co, patch_budget, panel_budget);
            plan.scratch_values(ci, threads, false).saturating_mul(4)
        }
        None => 0,
    }
}

/// `x` [n, ci, h, w] ⊛ `weight` [co, ci·9] (+ `bias` [co]) with 3×3 filters, stride 1, zero
/// padding 1 → [n, co, h, w], by Winograd F(`tile`, 3×3), within the patch and weight panel
/// budgets of `scratch`. `weight` is read a row at a time.
pub fn conv3x3_winograd(
    x: &Tensor,
    weight: &dyn WeightRows,
    bias: Option<&[f32]>,
    tile: WinogradTile,
    scratch: &Scratch,
) -> Tensor {
    conv3x3(
        x,
        weight,
        bias,
        tile,
        scratch.conv_patch,
        scratch.weight_panel,
    )
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
    let planes: Vec<Planes> = x
        .data
        .chunks_exact(ci * h * w)
        .take(n)
        .map(|image| Planes::new(image, (ci, h, w)))
        .collect();
    let images: Vec<WinogradInput> = planes
        .iter()
        .map(|p| (p as &dyn FeatureRows, InputTransform::default()))
        .collect();
    conv3x3_read(&images, weight, bias, tile, (patch_budget, panel_budget))
}

/// The Winograd convolution of every image of `images` (the map each convolution sees through its
/// transform) → [n, co, h, w], as `conv3x3_winograd` (within the budgets of `scratch`).
pub fn conv3x3_winograd_read(
    images: &[WinogradInput],
    weight: &dyn WeightRows,
    bias: Option<&[f32]>,
    tile: WinogradTile,
    scratch: &Scratch,
) -> Tensor {
    let budgets = (scratch.conv_patch, scratch.weight_panel);
    conv3x3_read(images, weight, bias, tile, budgets)
}

fn conv3x3_read(
    images: &[WinogradInput],
    weight: &dyn WeightRows,
    bias: Option<&[f32]>,
    tile: WinogradTile,
    (patch_budget, panel_budget): (usize, usize),
) -> Tensor {
    let Some(&(first, t)) = images.first() else {
        return Tensor::zeros(vec![0, weight.rows(), 0, 0]);
    };
    let (ci, h, w) = t.seen_dims(first);
    let (n, co) = (images.len(), weight.rows());
    let plan = Plan::new(tile, (n, ci, h, w), 0..h, co, patch_budget, panel_budget);
    let mut out = Tensor::zeros(vec![n, co, h, w]);
    // Output planes by channel: planes[o][b] (each (b, o) plane is written by one task).
    let mut planes: Vec<Vec<&mut [f32]>> = (0..co).map(|_| Vec::with_capacity(n)).collect();
    for (i, plane) in out.data.chunks_mut(h * w).enumerate() {
        planes[i % co].push(plane);
    }
    run_tile(
        images,
        weight,
        None,
        bias,
        &plan,
        &mut planes,
        &mut Work::default(),
    );
    out
}

/// A call's buffers: transformed input, products and (unless given transformed) filters. Kept by
/// `WinogradConv` across its calls, as `RowConv` keeps its patch; each call grows them to its plan.
#[derive(Default)]
struct Work {
    v: Vec<f32>,
    products: Vec<f32>,
    u: Vec<f32>,
}

impl Work {
    /// Grows every buffer to at least what `plan` uses for `ci` input channels.
    fn fit(&mut self, plan: &Plan, ci: usize, filters_given: bool) {
        let (xi, t, p) = (plan.xi(), plan.block_tiles(), plan.panel_rows());
        let grow = |buf: &mut Vec<f32>, len: usize| {
            if buf.len() < len {
                *buf = Vec::new(); // free the old buffer before allocating the new one
                *buf = vec![0.0; len];
            }
        };
        grow(&mut self.v, ci * xi * t);
        grow(&mut self.products, xi * p * t);
        grow(&mut self.u, if filters_given { 0 } else { p * xi * ci });
    }
}

/// A Winograd convolution computed band by band (the VAE decoder's streaming passes): all its
/// filters are transformed once, when built, and kept for every call.
pub struct WinogradConv<'w> {
    weight: &'w dyn WeightRows,
    bias: Option<&'w [f32]>,
    tile: WinogradTile,
    /// U [co, ξ, ci].
    filters: Vec<f32>,
    scratch: Scratch,
    work: Work,
}

impl<'w> WinogradConv<'w> {
    /// `weight` [co, ci·9], `bias` [co]; every call works within the budgets of `scratch`.
    pub fn new(
        weight: &'w dyn WeightRows,
        bias: Option<&'w [f32]>,
        tile: WinogradTile,
        scratch: &Scratch,
    ) -> Self {
        let (co, ci) = (weight.rows(), weight.row_len() / 9);
        let xi = tile.alpha() * tile.alpha();
        let mut filters = vec![0.0; co * xi * ci];
        match tile {
            WinogradTile::F2 => transform_filters::<2, 4, F2>(weight, 0..co, &mut filters),
            WinogradTile::F4 => transform_filters::<4, 6, F4>(weight, 0..co, &mut filters),
        }
        WinogradConv {
            weight,
            bias,
            tile,
            filters,
            scratch: *scratch,
            work: Work::default(),
        }
    }

    /// Output rows per call for a map of `ci → co` channels seen at `h × w`: whole tile rows, as
    /// many as fit the patch budget of `scratch` (at least one). Calls that start at multiples
    /// of this issue the same GEMMs, hence the same bits, however their output is stored.
    pub fn call_rows(
        tile: WinogradTile,
        (ci, h, w): (usize, usize, usize),
        co: usize,
        scratch: &Scratch,
    ) -> usize {
        let (patch_budget, panel_budget) = (scratch.conv_patch, scratch.weight_panel);
        let plan = Plan::new(tile, (1, ci, h, w), 0..h, co, patch_budget, panel_budget);
        (plan.block_rows * tile.m()).min(h)
    }

    /// Bytes of the transformed filters of a `ci → co` convolution.
    pub fn filter_bytes(tile: WinogradTile, ci: usize, co: usize) -> u64 {
        let xi = (tile.alpha() * tile.alpha()) as u64;
        (xi * ci as u64 * co as u64).saturating_mul(4)
    }

    /// Bytes held while running calls of at most `call_rows` output rows on `threads` threads:
    /// the transformed filters and the scratch of one call.
    pub fn held_bytes(
        tile: WinogradTile,
        (ci, h, w): (usize, usize, usize),
        co: usize,
        call_rows: usize,
        scratch: &Scratch,
        threads: usize,
    ) -> u64 {
        let rows = 0..call_rows.min(h);
        let plan = Plan::new(
            tile,
            (1, ci, h, w),
            rows,
            co,
            scratch.conv_patch,
            scratch.weight_panel,
        );
        let scratch = plan.scratch_values(ci, threads, true).saturating_mul(4);
        Self::filter_bytes(tile, ci, co).saturating_add(scratch)
    }

    /// Output rows `rows` (`rows.start` a multiple of m) of the convolution of `input` read
    /// through `t`, bias added, into `out` [co, rows.len() · w].
    pub fn rows(
        &mut self,
        input: &dyn FeatureRows,
        t: InputTransform,
        rows: Range<usize>,
        out: &mut [f32],
    ) {
        let (ci, h, w) = t.seen_dims(input);
        let co = self.weight.rows();
        assert_eq!(self.weight.row_len(), ci * 9, "conv weight size");
        assert_eq!(out.len(), co * rows.len() * w, "conv band size");
        let (patch, panel) = (self.scratch.conv_patch, self.scratch.weight_panel);
        let plan = Plan::new(self.tile, (1, ci, h, w), rows, co, patch, panel);
        let mut planes: Vec<Vec<&mut [f32]>> = out
            .chunks_mut(plan.out_rows * w)
            .map(|plane| vec![plane])
            .collect();
        run_tile(
            &[(input, t)],
            self.weight,
            Some(&self.filters),
            self.bias,
            &plan,
            &mut planes,
            &mut self.work,
        );
    }
}

/// `run` for the plan's tile.
fn run_tile(
    images: &[WinogradInput],
    weight: &dyn WeightRows,
    filters: Option<&[f32]>,
    bias: Option<&[f32]>,
    plan: &Plan,
    planes: &mut [Vec<&mut [f32]>],
    work: &mut Work,
) {
    if let Some(b) = bias {
        assert_eq!(b.len(), weight.rows(), "conv bias size");
    }
    work.fit(plan, weight.row_len() / 9, filters.is_some());
    match plan.tile {
        WinogradTile::F2 => run::<2, 4, F2>(images, weight, filters, bias, plan, planes, work),
        WinogradTile::F4 => run::<4, 6, F4>(images, weight, filters, bias, plan, planes, work),
    }
}

/// The whole call as `plan` cuts it: blocks of tile rows × filter panels, each a transform of the
/// input and of the filters (unless all are given transformed in `filters`), α² GEMMs (one per
/// task) and the output transform into `planes[o][b]`.
fn run<const M: usize, const A: usize, F: Transforms<M, A>>(
    images: &[WinogradInput],
    weight: &dyn WeightRows,
    filters: Option<&[f32]>,
    bias: Option<&[f32]>,
    plan: &Plan,
    planes: &mut [Vec<&mut [f32]>],
    Work { v, products, u }: &mut Work,
) {
    let (ci, co) = (weight.row_len() / 9, weight.rows());
    let xi = A * A;
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
        );
    };
    let u_range = |panel: &Range<usize>| panel.start * xi * ci..panel.end * xi * ci;
    if let Some(all) = filters {
        assert_eq!(all.len(), co * xi * ci, "transformed filters");
        for rows in blocks {
            let v = &mut v[..ci * xi * rows.len() * plan.tiles_x];
            transform_input::<M, A, F>(images, plan, rows.clone(), v);
            for panel in &plan.panels {
                multiply(panel, &rows, &all[u_range(panel)], v);
            }
        }
    } else if plan.panel_outer {
        for panel in &plan.panels {
            let u = &mut u[..panel.len() * xi * ci];
            transform_filters::<M, A, F>(weight, panel.clone(), u);
            for rows in blocks.clone() {
                let v = &mut v[..ci * xi * rows.len() * plan.tiles_x];
                transform_input::<M, A, F>(images, plan, rows.clone(), v);
                multiply(panel, &rows, u, v);
            }
        }
    } else {
        for rows in blocks {
            let v = &mut v[..ci * xi * rows.len() * plan.tiles_x];
            transform_input::<M, A, F>(images, plan, rows.clone(), v);
            for (i, panel) in plan.panels.iter().enumerate() {
                let u = &mut u[..panel.len() * xi * ci];
                // One panel holds every filter: transformed once, for the first block.
                if plan.panels.len() > 1 || rows.start == 0 && i == 0 {
                    transform_filters::<M, A, F>(weight, panel.clone(), u);
                }
                multiply(panel, &rows, u, v);
            }
        }
    }
}

#[cfg(test)]
mod tests;
