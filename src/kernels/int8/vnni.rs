//! The int8 products with 512-bit AVX-512 VNNI (`vpdpbusd`), in outer-product form: one register
//! holds 16 output columns, and each step adds 4 consecutive k of one activation row (broadcast) to
//! all of them, where `int8::simd` reduces 8 lanes per output.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so the weights are stored offset by 128
//! (`w + 128`, 0..=255 for every type read) and each block's integer sum starts from
//! `-128 · Σx` over the block's activations: `Σ (w + 128) · x − 128 · Σx = Σ w · x`, exact in i32.
//! Per output, block after block: `acc = fma(f32(S) · dw, dx, acc)` with S the exact block sum, so
//! the bits are `dot_scalar`'s below whatever the threads, tiles or panels (a fixed order per
//! output). They differ from `int8::dot_scalar`'s eight-lane split: the same products, other
//! roundings.
//!
//! Layout: the weights of a panel are packed per 16-column block (`int8::ColumnBlocks`, the layout
//! AMX's `tdpbssd` reads too) as [k/4][16][4] bytes (one 64-byte row per 4 k) with the scales as
//! [k/32][16]; columns past n are zero weights with zero scales. Register tile: 6 activation rows × 32 columns (12 i32 block sums + 12 f32 accumulators).

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::{Blocks, ColumnBlocks, Out, BLOCK_COLS as NC, QK};

/// Packed 16-column blocks (one register each) per register tile.
const NB: usize = 2;
/// Activation rows per register tile.
const MR: usize = 6;
/// Rows of one parallel task (a multiple of MR): its weights stream from L2 once per MR rows.
const TASK_ROWS: usize = 96;
/// Columns of one parallel task (a multiple of NC · NB).
const TASK_COLS: usize = 128;

/// One output: the operations the kernel performs for it, one at a time (the reference its bits
/// are tested against).
#[cfg(test)]
pub fn dot_scalar(xq: &[i8], xd: &[f32], wq: &[i8], wd: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for (b, (&dx, &dw)) in xd.iter().zip(wd).enumerate() {
        let range = b * QK..(b + 1) * QK;
        let s: i32 = xq[range.clone()]
            .iter()
            .zip(&wq[range])
            .map(|(&x, &w)| x as i32 * w as i32)
            .sum();
        acc = (s as f32 * dw).mul_add(dx, acc);
    }
    acc
}

/// `y[r, c] = Σ x[r] · w[c]` as `int8::product` (both as blocks of row length `k`), `y` row-major
/// with row stride `ldy`.
///
/// # Safety
/// The CPU runs AVX-512 F/BW with VNNI (every CPU at `Isa::Avx512` or above).
pub unsafe fn product(x: &Blocks, w: &Blocks, k: usize, y: &mut [f32], ldy: usize) {
    let (m, nb) = (x.q.len() / k, k / QK);
    // w + 128: `vpdpbusd` reads the weights unsigned.
    let packed = ColumnBlocks::new(w, k, NB, 0x80);
    let n = packed.n;
    assert!(x.d.len() >= m * nb && y.len() >= (m - 1) * ldy + n);
    // −128 · Σx per activation block: where each block sum starts.
    let mut start = vec![0i32; m * nb];
    start
        .par_chunks_mut(nb)
        .zip(x.q.par_chunks(k))
        .for_each(|(s, row)| {
            for (s, block) in s.iter_mut().zip(row.chunks_exact(QK)) {
                *s = -128 * block.iter().map(|&v| v as i32).sum::<i32>();
            }
        });
    let out = Out {
        ptr: y.as_mut_ptr(),
        ld: ldy,
    };
    let (row_tasks, col_tasks) = (m.div_ceil(TASK_ROWS), n.div_ceil(TASK_COLS));
    (0..row_tasks * col_tasks).into_par_iter().for_each(|t| {
        let r0 = t / col_tasks * TASK_ROWS;
        let c0 = t % col_tasks * TASK_COLS;
        let (rows, cols) = (TASK_ROWS.min(m - r0), TASK_COLS.min(n - c0));
        let mut edge = [0f32; MR * NC * NB];
        for j in (c0..c0 + cols).step_by(NC * NB) {
            let live = (NC * NB).min(n - j);
            let (wq, wd) = (packed.q.as_ptr().add(j * k), packed.d.as_ptr().add(j * nb));
            for i in (r0..r0 + rows).step_by(MR) {
                let mr = MR.min(r0 + rows - i);
                let xs = Rows {
                    q: x.q.as_ptr().add(i * k),
                    d: x.d.as_ptr().add(i * nb),
                    start: start.as_ptr().add(i * nb),
                    k,
                };
                // SAFETY (of the writes): this task alone writes rows r0.. × columns c0.. of y.
                let dst = out.at(i, j);
                if mr == MR && live == NC * NB {
                    tile::<MR>(xs, wq, wd, nb, dst, ldy);
                    continue;
                }
                let e = edge.as_mut_ptr();
                match mr {
                    6 => tile::<6>(xs, wq, wd, nb, e, NC * NB),
                    5 => tile::<5>(xs, wq, wd, nb, e, NC * NB),
                    4 => tile::<4>(xs, wq, wd, nb, e, NC * NB),
                    3 => tile::<3>(xs, wq, wd, nb, e, NC * NB),
                    2 => tile::<2>(xs, wq, wd, nb, e, NC * NB),
                    _ => tile::<1>(xs, wq, wd, nb, e, NC * NB),
                }
                for r in 0..mr {
                    std::ptr::copy_nonoverlapping(e.add(r * NC * NB), dst.add(r * ldy), live);
                }
            }
        }
    });
}

/// Activation rows from one row on: values (k apart), scales and block sum starts (k/32 apart).
#[derive(Clone, Copy)]
struct Rows {
    q: *const i8,
    d: *const f32,
    start: *const i32,
    k: usize,
}

/// R rows × 32 columns over all nb blocks into `dst` (row stride `ld`), overwriting it.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const R: usize>(
    x: Rows,
    wq: *const u8,
    wd: *const f32,
    nb: usize,
    dst: *mut f32,
    ld: usize,
) {
    let block_bytes = NC * x.k; // one packed 16-column block
    let block_scales = NC * nb;
    let mut acc = [[_mm512_setzero_ps(); NB]; R];
    for b in 0..nb {
        let mut sums = [[_mm512_setzero_si512(); NB]; R];
        for (r, s) in sums.iter_mut().enumerate() {
            let start = _mm512_set1_epi32(*x.start.add(r * nb + b));
            *s = [start; NB];
        }
        for quad in 0..QK / 4 {
            let at = (b * QK / 4 + quad) * NC * 4;
            let w0 = _mm512_loadu_si512(wq.add(at).cast());
            let w1 = _mm512_loadu_si512(wq.add(block_bytes + at).cast());
            for (r, s) in sums.iter_mut().enumerate() {
                let four = x.q.add(r * x.k + b * QK + quad * 4).cast::<i32>();
                let xv = _mm512_set1_epi32(four.read_unaligned());
                s[0] = _mm512_dpbusd_epi32(s[0], w0, xv);
                s[1] = _mm512_dpbusd_epi32(s[1], w1, xv);
            }
        }
        let d0 = _mm512_loadu_ps(wd.add(b * NC));
        let d1 = _mm512_loadu_ps(wd.add(block_scales + b * NC));
        for (r, (a, s)) in acc.iter_mut().zip(&sums).enumerate() {
            let dx = _mm512_set1_ps(*x.d.add(r * nb + b));
            a[0] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s[0]), d0), dx, a[0]);
            a[1] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s[1]), d1), dx, a[1]);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(dst.add(r * ld), a[0]);
        _mm512_storeu_ps(dst.add(r * ld + NC), a[1]);
    }
}
