//! int8 products on AMX tiles (`tdpbssd`): the int8 mode's `y = x · Wᵀ` with x and W as q8_0-style
//! blocks (i8 values, one f32 scale per 32; `kernels::int8::Blocks`).
//!
//! A tile product sums over its whole depth, and blocks carry their own scales, so each product
//! covers one block: A = 16 activation rows × 32 values, B = 32 values × 16 weight rows (packed
//! as the instruction reads them: 8 rows of 16 columns × 4 consecutive values), C = 16 × 16 exact
//! integer block sums. Each block's sums leave the tile unit through a 1 KiB buffer and are added
//! in f32 as `acc = fma(sum, dw·dx, acc)`, block after block, in 16 × 16 accumulators held in
//! AVX-512 registers. Integer sums are exact (|sum| ≤ 32 · 128 · 127 < 2²⁴, so also exact as f32);
//! the f32 order is fixed by the block index alone, so the bits depend neither on threads nor on
//! panels. They differ from `kernels::int8::dot_scalar`'s, which splits each block sum over eight
//! lanes: the same products, other roundings.

use std::arch::asm;

use rayon::prelude::*;

use super::TileConfig;
use crate::kernels::int8::{Blocks, ColumnBlocks, QK};

/// Rows and columns of the output tile.
const T: usize = 16;
// The packed weight blocks (`ColumnBlocks`) are one tile's columns wide.
const _: () = assert!(T == crate::kernels::int8::BLOCK_COLS);
/// Rows and columns one task covers (its weight columns stay in L2 while its rows pass).
const TASK: usize = 256;

/// tmm0: C, 16 rows × 16 i32; tmm1: A, 16 rows × 32 i8; tmm2: B, 8 rows × 64 i8.
const CONFIG: TileConfig = TileConfig::new(&[(16, 64), (16, 32), (8, 64)]);

/// `y[r, c] = Σ_b dx[r, b] · dw[c, b] · Σ_e xq[r, e] · wq[c, e]` (e over block b), `y` row-major
/// with row stride `ldy`. Panics when the CPU lacks AMX (`super::available` covers AMX-INT8 too).
pub fn product(x: &Blocks, w: &Blocks, k: usize, y: &mut [f32], ldy: usize) {
    assert!(super::available(), "AMX tiles are not available");
    assert_eq!(k % QK, 0, "rows in whole blocks");
    let (m, n) = (x.q.len() / k.max(1), w.q.len() / k.max(1));
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldy >= n && y.len() >= (m - 1) * ldy + n, "output size");
    let w = ColumnBlocks::new(w, k, 1, 0); // values as stored: `tdpbssd` reads them signed
    let col_tasks = n.div_ceil(TASK);
    y.par_chunks_mut(TASK * ldy)
        .enumerate()
        .flat_map_iter(|(i, y)| (0..col_tasks).map(move |j| (i, j, y.as_mut_ptr() as usize)))
        .for_each(|(i, j, y)| {
            let rows = i * TASK..((i + 1) * TASK).min(m);
            let cols = j * TASK..((j + 1) * TASK).min(n);
            // SAFETY: `available` saw the CPU; the task writes rows `rows` × columns `cols` of
            // `y` (its own chunk starts at `y`), which no other task writes.
            unsafe { task(x, &w, rows, cols, y as *mut f32, ldy) }
        });
}

/// One task: activation rows `rows` against weight columns `cols`, into `y` (the task's first
/// row; row stride `ldy`).
#[target_feature(enable = "avx512f")]
unsafe fn task(
    x: &Blocks,
    w: &ColumnBlocks,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    y: *mut f32,
    ldy: usize,
) {
    use std::arch::x86_64::*;
    let (k, nb) = (w.k, w.k / QK);
    let mut tail = Vec::new();
    let mut sums = [0i32; T * T];
    asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
    for j in (cols.start / T)..cols.end.div_ceil(T) {
        let wq = w.q.as_ptr().add(j * T * k);
        let wd = &w.d[j * T * nb..][..T * nb];
        let width = T.min(w.n - j * T);
        for i0 in rows.clone().step_by(T) {
            let height = T.min(rows.end - i0);
            // A tile reads 16 rows: a short last tile is copied into zero-padded rows first.
            let xq = if height == T {
                x.q.as_ptr().add(i0 * k)
            } else {
                tail.clear();
                tail.extend_from_slice(&x.q[i0 * k..(i0 + height) * k]);
                tail.resize(T * k, 0);
                tail.as_ptr()
            };
            let xd = &x.d[i0 * nb..(i0 + height) * nb];
            let mut acc = [_mm512_setzero_ps(); T];
            for b in 0..nb {
                asm!(
                    "tilezero tmm0",
                    "tileloadd tmm1, [{a} + {sa}*1]",
                    "tileloadd tmm2, [{b} + {sb}*1]",
                    "tdpbssd tmm0, tmm1, tmm2",
                    "tilestored [{c} + {sb}*1], tmm0",
                    a = in(reg) xq.add(b * QK),
                    sa = in(reg) k,
                    b = in(reg) wq.add(b * QK * T),
                    sb = in(reg) 64usize,
                    c = in(reg) sums.as_mut_ptr(),
                    options(nostack)
                );
                let dw = _mm512_loadu_ps(wd.as_ptr().add(b * T));
                for (r, acc) in acc.iter_mut().enumerate().take(height) {
                    let s = _mm512_cvtepi32_ps(_mm512_loadu_si512(sums.as_ptr().add(r * T).cast()));
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(xd[r * nb + b]));
                    *acc = _mm512_fmadd_ps(s, scale, *acc);
                }
            }
            let mask: __mmask16 = if width == T {
                0xFFFF
            } else {
                (1u16 << width) - 1
            };
            for (r, acc) in acc.iter().enumerate().take(height) {
                let dst = y.add((i0 - rows.start + r) * ldy + j * T);
                _mm512_mask_storeu_ps(dst, mask, *acc);
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::int8::dot_scalar;

    fn blocks(rows: usize, k: usize, seed: u64) -> Blocks {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        Blocks {
            q: (0..rows * k).map(|_| (next() % 256) as i32 as i8).collect(),
            d: (0..rows * k / QK)
                .map(|_| (next() % 1000) as f32 / 1e4 + 1e-3)
                .collect(),
        }
    }

    /// Against the scalar reference's products: every block sum exact, only the f32 roundings of
    /// the scaled sums differ (relative 2⁻²³ each, on at most k/32 · 8 terms).
    #[test]
    fn matches_the_scalar_products_at_odd_sizes() {
        if !super::super::available() {
            eprintln!("no AMX on this CPU: the int8 tile kernel is not run here");
            return;
        }
        for (m, n, k) in [(1, 1, 32), (17, 33, 64), (300, 270, 320), (16, 16, 1280)] {
            let (x, w) = (blocks(m, k, 1), blocks(n, k, 2));
            let ldy = n + 2;
            let mut y = vec![f32::NAN; m * ldy];
            product(&x, &w, k, &mut y, ldy);
            let nb = k / QK;
            for r in 0..m {
                for c in 0..n {
                    let want = dot_scalar(
                        &x.q[r * k..][..k],
                        &x.d[r * nb..][..nb],
                        &w.q[c * k..][..k],
                        &w.d[c * nb..][..nb],
                    );
                    let mag: f32 = (0..nb)
                        .map(|b| x.d[r * nb + b] * w.d[c * nb + b] * 32.0 * 128.0 * 128.0)
                        .sum();
                    let got = y[r * ldy + c];
                    assert!(
                        (got - want).abs() <= 1e-6 * mag,
                        "({m},{n},{k}) [{r},{c}] {got} vs {want}"
                    );
                }
                assert!(
                    y[r * ldy + n..(r + 1) * ldy].iter().all(|v| v.is_nan()),
                    "wrote past n"
                );
            }
        }
    }
}
