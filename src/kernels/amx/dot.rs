//! The packed bf16 products (`PackedA`/`PackedB`) on AVX-512 BF16 (`vdpbf16ps`) where the CPU has
//! no tiles (AMD Zen 4/5, Intel Cooper Lake): the same operands the tiles read, multiplied in
//! registers.
//!
//! `b`'s pair layout is what `vdpbf16ps` reads too: one 64-byte row of a 16-column block holds,
//! for each column, the values at k = 2p and 2p + 1, and the row of `a` contributes its pair
//! (2p, 2p + 1) broadcast to all 16 lanes. Register tile: 8 rows × 32 columns (16 accumulators).
//! k is walked in slices of `KC`, the slice of 32 columns (16 KiB) staying in L1 while every
//! 8-row group of the task passes; a slice after the first adds to what `c` holds, in the same
//! order as one pass would, so each output is the same sequence of `vdpbf16ps` steps (k pairs in
//! order) whatever the threads, the slices or the panels.

use std::arch::x86_64::*;

use super::{PackedB, TR};

/// Rows of `a` per register tile; the tile is 2 blocks (32 columns) wide.
const MR: usize = 8;
/// k values per slice (a multiple of 32, `PackedB`'s padding).
const KC: usize = 256;

/// Whether this CPU runs the kernel (and `amx::simd`'s conversions).
pub fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

/// One task: rows `a16` (bf16, `b.kp` per row, a multiple of 32 rows, zeros past `rows`) times all
/// of `b` into the first `rows` rows of `c`.
///
/// # Safety
/// The CPU runs AVX-512 F/BW/VL/BF16 (`available`); `c` holds `rows` rows of `ldc ≥ b.n`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn task(a16: &[u16], rows: usize, b: &PackedB, c: &mut [f32], ldc: usize) {
    let kp = b.kp;
    let b_block = TR * kp; // u16 values per 16-column block
    let blocks = PackedB::blocks(b.n);
    let mut edge = [0f32; MR * 2 * TR];
    for k0 in (0..kp).step_by(KC) {
        let (kc, first) = (KC.min(kp - k0), k0 == 0);
        for jb in (0..blocks).step_by(2) {
            // Row p of a block holds the pairs at k = 2p, 2p + 1: k0 starts at row k0 / 2.
            let bp = b.data.as_ptr().add(jb * b_block + k0 * TR);
            let (j0, cols) = (jb * TR, (2 * TR).min(b.n - jb * TR));
            for i0 in (0..rows).step_by(MR) {
                let ap = a16.as_ptr().add(i0 * kp + k0);
                let live = MR.min(rows - i0);
                let dst = c.as_mut_ptr().add(i0 * ldc + j0);
                if live == MR && cols == 2 * TR {
                    micro(ap, kp, bp, b_block, kc, dst, ldc, first);
                    continue;
                }
                // An edge tile: through a full-size buffer, only the live part read and written.
                let e = edge.as_mut_ptr();
                if !first {
                    for i in 0..live {
                        std::ptr::copy_nonoverlapping(dst.add(i * ldc), e.add(i * 2 * TR), cols);
                    }
                }
                micro(ap, kp, bp, b_block, kc, e, 2 * TR, first);
                for i in 0..live {
                    std::ptr::copy_nonoverlapping(e.add(i * 2 * TR), dst.add(i * ldc), cols);
                }
            }
        }
    }
}

/// `c[i, j] (+)= Σ_{p < kc/2} pair(a[i], p) · pair(b[j], p)` for 8 rows, 32 columns: `c` starts
/// from zero when `first`, else from what it holds.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    a: *const u16,
    lda: usize,
    b: *const u16,
    b_block: usize,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    first: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    if !first {
        for (i, acc) in acc.iter_mut().enumerate() {
            acc[0] = _mm512_loadu_ps(c.add(i * ldc));
            acc[1] = _mm512_loadu_ps(c.add(i * ldc + TR));
        }
    }
    for p in 0..kc / 2 {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * 2 * TR).cast()));
        let b1: __m512bh =
            std::mem::transmute(_mm512_loadu_si512(b.add(b_block + p * 2 * TR).cast()));
        for (i, acc) in acc.iter_mut().enumerate() {
            let pair = a.add(i * lda + 2 * p).cast::<i32>().read_unaligned();
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        _mm512_storeu_ps(c.add(i * ldc), acc[0]);
        _mm512_storeu_ps(c.add(i * ldc + TR), acc[1]);
    }
}
