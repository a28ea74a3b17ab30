//! The per-tile work of a Winograd convolution: filter transforms (U = G g Gᵀ), input tiles read
//! through the convolution's `InputTransform` and transformed (V = Bᵀ d B), and output tiles
//! transformed back (Y = Aᵀ M A), 8 tiles or input channels per SIMD lane group.

use std::ops::Range;

use rayon::prelude::*;

use super::transforms::{array, Lanes, Transforms, LANES};
use super::{Plan, WinogradInput};
use crate::kernels::panel::WeightRows;

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

/// Output channels a filter-transform task reads together: a weight read with LoRA rows added
/// (`lora::WithLora`) shares each pass over a term's `down` among them.
pub(super) const FILTER_ROWS_PER_TASK: usize = 8;

/// U for output channels `panel` into `u` [panel, ξ, ci]: `u[(o·α² + i·α + j)·ci + c]` =
/// (G g Gᵀ)[i][j] for the filter g of (o, c). Each task reads its own rows: a weight row is read
/// once, by the thread that transforms it.
pub(super) fn transform_filters<const M: usize, const A: usize, F: Transforms<M, A>>(
    weight: &dyn WeightRows,
    panel: Range<usize>,
    u: &mut [f32],
) {
    let ci = weight.row_len() / 9;
    const ROWS: usize = FILTER_ROWS_PER_TASK;
    let firsts = (0..panel.len().div_ceil(ROWS))
        .into_par_iter()
        .map(|t| panel.start + t * ROWS);
    u.par_chunks_mut(ROWS * A * A * ci)
        .zip(firsts)
        .for_each_init(
            || vec![0.0f32; ROWS * 9 * ci + 9 * ci.next_multiple_of(LANES)],
            |buf, (dst, o)| {
                let count = ROWS.min(panel.end - o);
                let (rows, taps) = buf.split_at_mut(ROWS * 9 * ci);
                let rows = &mut rows[..count * 9 * ci];
                weight.read_rows(o, count, rows);
                for (row, dst) in rows.chunks(9 * ci).zip(dst.chunks_mut(A * A * ci)) {
                    filter_row::<M, A, F>(row, taps, dst);
                }
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
pub(super) fn transform_input<const M: usize, const A: usize, F: Transforms<M, A>>(
    images: &[WinogradInput],
    plan: &Plan,
    rows: Range<usize>,
    v: &mut [f32],
) {
    let t = rows.len() * plan.tiles_x;
    let lines_len = 2 * A * M * plan.phase_len();
    v.par_chunks_mut(A * A * t).enumerate().for_each_init(
        || vec![0.0f32; lines_len + plan.seen.1],
        |buf, (c, dst)| {
            let (lines, seen_row) = buf.split_at_mut(lines_len);
            for (rr, r) in rows.clone().enumerate() {
                let (b, ty) = (r / plan.tiles_y, r % plan.tiles_y);
                load_lines::<M, A>(images[b], c, plan, plan.y0 + ty * M, lines, seen_row);
                let base = rr * plan.tiles_x;
                input_tile_row::<M, A, F>(plan, lines, (dst, t, base));
            }
        },
    );
}

/// The α seen rows from `top − 1` of channel `c` of `image` (zero outside the map) into the first
/// α lines of `lines`, each split into M phases: padded column px = M·q + k goes to phase k, slot
/// q, so that the input of tile tx at column j is slot tx + j / M of phase j % M and both passes of
/// `input_tile_row` work on runs of consecutive tiles. `seen_row` holds a transformed row.
fn load_lines<const M: usize, const A: usize>(
    (rows, t): WinogradInput,
    c: usize,
    plan: &Plan,
    top: usize,
    lines: &mut [f32],
    seen_row: &mut [f32],
) {
    let phase = plan.phase_len();
    let (h, w) = plan.seen;
    for (i, line) in lines.chunks_exact_mut(M * phase).take(A).enumerate() {
        line.fill(0.0);
        let y = (top + i).wrapping_sub(1);
        if y >= h {
            continue;
        }
        let row = if t.is_identity() {
            rows.row(c, y)
        } else {
            let source = t.resize.source_row(y, rows.dims().1);
            t.apply(c, rows.row(c, source), &mut seen_row[..w]);
            &seen_row[..w]
        };
        // Input column x is padded column px = x + 1: x = M·q + k − 1 goes to slot q of phase
        // k for k ≥ 1, and x = M·q + M − 1 to slot q + 1 of phase 0.
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

/// The transformed tiles of one tile row from its α lines (`load_lines`, the first half of
/// `buf`): point (i, j) of tile tx goes to `dst[(i·α + j)·stride + base + tx]`. The second half
/// of `buf` (α · M · phase_len values) takes the column-transformed lines.
#[inline(always)]
fn input_tile_row_body<const M: usize, const A: usize, F: Transforms<M, A>>(
    plan: &Plan,
    buf: &mut [f32],
    (dst, stride, base): (&mut [f32], usize, usize),
) {
    let phase = plan.phase_len();
    let line_len = M * phase;
    let (lines, cols) = buf.split_at_mut(A * line_len);
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
/// the panel's output channels (`planes[o][b]`, the call's `plan.out_rows` rows), clipped to them.
pub(super) fn transform_output<const M: usize, const A: usize, F: Transforms<M, A>>(
    products: &[f32],
    planes: &mut [Vec<&mut [f32]>],
    bias: Option<&[f32]>,
    plan: &Plan,
    rows: Range<usize>,
) {
    let (h, w) = (plan.out_rows, plan.seen.1);
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
    (plan: &Plan, buf: &mut [f32], dst: (&mut [f32], usize, usize))
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
