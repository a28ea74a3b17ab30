//! int8 weight products: `y[m, n] = x[m, k] · Wᵀ` with W stored as q8_0, q5_0 or q4_0 blocks (32
//! values and one f16 scale each), as ggml's `vec_dot_q8_0_q8_0` / `vec_dot_q4_0_q8_0` compute a
//! dot product, but blocked like a GEMM.
//!
//! - The activations are quantized per row and 32-value block on the fly: scale `d = max|x| / 127`,
//!   `q = round(x / d)` (ggml's `quantize_row_q8_0`, the scale kept in f32).
//! - A panel of weight rows is unpacked once into plain i8 values (nibbles and fifth bits
//!   resolved, the offset subtracted) and f32 scales: one unpacking per panel instead of one per
//!   activation row.
//! - Each output is the same sequence of operations on every path (scalar, AVX2, AVX-512 VNNI):
//!   eight lanes, lane `l` of block `b` the exact integer sum of elements `4l..4l+3`'s products,
//!   `acc[l] = fma(sum as f32, dw·dx, acc[l])` block after block, then one fixed sum of the lanes.
//!   Integer sums are exact (no saturation: |w| ≤ 128, |x| ≤ 127, pairs ≤ 32512), so the paths
//!   agree bit for bit, and the bits do not depend on threads, panels or row chunks.
//! - AVX2: `vpsignb` moves w's sign onto x, `vpmaddubsw(|w|, ±x)` + `vpmaddwd(·, 1)` give the
//!   lane sums. Register tiles of 4 activation rows × 2 weight rows, parallel over 64 × 64 output
//!   tiles.
//! - AVX-512 VNNI (`Isa::Avx512`) runs its own outer-product kernel (`vnni`: 512-bit `vpdpbusd`,
//!   16 output columns per register, each block's integer sum whole before its scale): the same
//!   products in another order, whose bits its own scalar twin (`vnni::dot_scalar`) gives; AMX
//!   tiles (`amx::int8`) another.
//!
//! Memory: the quantized activations of a row chunk (≤ the weight panel budget in values, 1.125
//! bytes each) and the unpacked panel (same bound) together stay under one f32 panel, which the
//! plan already counts (`Scratch::peak_bytes`), so the int8 path's peak is no higher than f32's.

use std::ops::Range;

use rayon::prelude::*;

use super::panel::WeightRows;
use super::precision::Isa;

#[cfg(target_arch = "x86_64")]
mod vnni;
use super::scratch::{pieces, MIN_SPLIT};
use crate::weights::DType;
use quant::GgmlType;

/// Values per block.
pub const QK: usize = 32;
/// Register tile: activation rows × weight rows.
const MR: usize = 4;
const NR: usize = 2;
/// Output tile of one parallel task.
const TILE: usize = 64;

/// Rows quantized to i8 blocks: `q` [rows, k], `d` [rows, k / 32].
#[derive(Default)]
pub struct Blocks {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
}

impl Blocks {
    fn resize(&mut self, values: usize) {
        self.q.resize(values, 0);
        self.d.resize(values / QK, 0.0);
    }
}

/// A panel's weight blocks packed per 16 columns for the kernels that give 16 output columns at
/// once (AVX-512 VNNI's `vpdpbusd`, AMX's `tdpbssd`): values [column block][k/4][16][4] bytes,
/// each `w as u8 ^ flip` (`flip` 0x80 stores w + 128, what `vpdpbusd` reads unsigned), scales
/// [column block][k/32][16]. The blocks are padded to a multiple of `group`; padding columns are
/// zero weights (stored `flip`) with zero scales.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct ColumnBlocks {
    pub q: Vec<u8>,
    pub d: Vec<f32>,
    /// Real columns and row length.
    pub n: usize,
    pub k: usize,
}

/// Columns per packed block of `ColumnBlocks`.
pub(crate) const BLOCK_COLS: usize = 16;

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl ColumnBlocks {
    pub fn new(w: &Blocks, k: usize, group: usize, flip: u8) -> Self {
        const NC: usize = BLOCK_COLS;
        let n = w.q.len() / k;
        let nb = k / QK;
        let blocks = n.div_ceil(NC * group) * group;
        let mut q = vec![0u8; blocks * NC * k];
        let mut d = vec![0f32; blocks * NC * nb];
        let flip4 = u32::from_ne_bytes([flip; 4]);
        q.par_chunks_mut(NC * k)
            .zip(d.par_chunks_mut(NC * nb))
            .enumerate()
            .for_each(|(block, (q, d))| {
                for c in 0..NC {
                    let col = block * NC + c;
                    // Four values at a time.
                    for (quad, dst) in q.chunks_exact_mut(4).skip(c).step_by(NC).enumerate() {
                        let four = match col < n {
                            true => {
                                let src: [i8; 4] =
                                    w.q[col * k + quad * 4..][..4].try_into().unwrap();
                                u32::from_ne_bytes(src.map(|v| v as u8)) ^ flip4
                            }
                            false => flip4,
                        };
                        dst.copy_from_slice(&four.to_ne_bytes());
                    }
                    for b in 0..nb {
                        d[b * NC + c] = if col < n { w.d[col * nb + b] } else { 0.0 };
                    }
                }
            });
        ColumnBlocks { q, d, n, k }
    }
}

/// Quantizes rows of activations per 32-value block into `out` (`x.len()` a multiple of 32). A
/// block holding a non-finite value gets a NaN scale, so the product stays non-finite and the run
/// stops (`sampling::check_finite`) instead of going on with garbage. With AVX-512 (`isa`) the
/// blocks are quantized in registers, with the scalar path's bits.
pub fn quantize_activations(x: &[f32], out: &mut Blocks, isa: Isa) {
    assert_eq!(x.len() % QK, 0, "activations in whole blocks");
    out.resize(x.len());
    const BLOCKS_PER_TASK: usize = 512;
    x.par_chunks(BLOCKS_PER_TASK * QK)
        .zip(out.q.par_chunks_mut(BLOCKS_PER_TASK * QK))
        .zip(out.d.par_chunks_mut(BLOCKS_PER_TASK))
        .for_each(|((x, q), d)| {
            for ((x, q), d) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).zip(d) {
                *d = match isa {
                    // SAFETY: `isa` is at or below what this CPU runs (AVX-512 F/BW from Avx512).
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 | Isa::Amx => unsafe { quantize_block_avx512(x, q) },
                    _ => quantize_block(x, q),
                };
            }
        });
}

fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let mut amax = 0.0f32;
    let mut finite = true;
    for &v in x {
        finite &= v.is_finite();
        amax = amax.max(v.abs());
    }
    if !finite {
        q.fill(0);
        return f32::NAN;
    }
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        // |v·id| ≤ 127 up to rounding; the clamp keeps a rounding excess out of -128.
        *q = (v * id).round().clamp(-127.0, 127.0) as i8;
    }
    d
}

/// `quantize_block` in registers: the same maximum, scale and products; `round` (half away from
/// zero) as trunc(v) ± 1 where |v − trunc(v)| ≥ ½ (the difference is exact).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block_avx512(x: &[f32], q: &mut [i8]) -> f32 {
    use std::arch::x86_64::*;
    assert!(x.len() == QK && q.len() == QK);
    let (a, b) = (
        _mm512_loadu_ps(x.as_ptr()),
        _mm512_loadu_ps(x.as_ptr().add(16)),
    );
    let abs = |v: __m512| _mm512_abs_ps(v);
    let inf = _mm512_set1_ps(f32::INFINITY);
    // Finite: |v| < ∞ (false for NaN too).
    let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(abs(a), inf)
        & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(abs(b), inf);
    if finite != 0xFFFF {
        q.fill(0);
        return f32::NAN;
    }
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(abs(a), abs(b)));
    let d = amax / 127.0;
    let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    let round = |v: __m512| {
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(abs(_mm512_sub_ps(v, t)), _mm512_set1_ps(0.5));
        let step = _mm512_or_ps(
            _mm512_set1_ps(1.0),
            _mm512_and_ps(v, _mm512_set1_ps(-0.0)), // ±1 with v's sign
        );
        let r = _mm512_mask_add_ps(t, away, t, step);
        let r = _mm512_min_ps(
            _mm512_max_ps(r, _mm512_set1_ps(-127.0)),
            _mm512_set1_ps(127.0),
        );
        _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(r))
    };
    let lo = round(_mm512_mul_ps(a, id));
    let hi = round(_mm512_mul_ps(b, id));
    _mm_storeu_si128(q.as_mut_ptr().cast(), lo);
    _mm_storeu_si128(q.as_mut_ptr().add(16).cast(), hi);
    d
}

/// Whether `unpack_weights` reads this type.
pub fn reads(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q4_0)
}

/// Unpacks whole blocks of a q8_0/q5_0/q4_0 tensor into i8 values and f32 scales (exactly the
/// dequantized values: `value = q · d`).
pub fn unpack_weights(ty: GgmlType, bytes: &[u8], out: &mut Blocks) {
    let block_bytes = match ty {
        GgmlType::Q8_0 => 34,
        GgmlType::Q5_0 => 22,
        GgmlType::Q4_0 => 18,
        other => panic!("no int8 unpacking for {}", other.name()),
    };
    assert_eq!(bytes.len() % block_bytes, 0, "whole blocks");
    let blocks = bytes.len() / block_bytes;
    out.resize(blocks * QK);
    const BLOCKS_PER_TASK: usize = 1024;
    bytes
        .par_chunks(BLOCKS_PER_TASK * block_bytes)
        .zip(out.q.par_chunks_mut(BLOCKS_PER_TASK * QK))
        .zip(out.d.par_chunks_mut(BLOCKS_PER_TASK))
        .for_each(|((bytes, q), d)| {
            let blocks = bytes.chunks_exact(block_bytes);
            for ((b, q), d) in blocks.zip(q.chunks_exact_mut(QK)).zip(d) {
                *d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                match ty {
                    GgmlType::Q8_0 => {
                        for (q, &v) in q.iter_mut().zip(&b[2..34]) {
                            *q = v as i8;
                        }
                    }
                    GgmlType::Q4_0 => {
                        for j in 0..16 {
                            q[j] = (b[2 + j] & 0x0F) as i8 - 8;
                            q[j + 16] = (b[2 + j] >> 4) as i8 - 8;
                        }
                    }
                    _ => {
                        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                        for j in 0..16 {
                            let lo = (b[6 + j] & 0x0F) | (((qh >> j) & 1) << 4) as u8;
                            let hi = (b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4) as u8;
                            q[j] = lo as i8 - 16;
                            q[j + 16] = hi as i8 - 16;
                        }
                    }
                }
            }
        });
}

/// The fixed sum of the eight lanes every path ends with.
#[inline(always)]
fn lanes_sum(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// One output, the reference: the operations every SIMD path performs, one at a time.
pub fn dot_scalar(xq: &[i8], xd: &[f32], wq: &[i8], wd: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (b, (&dx, &dw)) in xd.iter().zip(wd).enumerate() {
        let d = dw * dx;
        let (x, w) = (&xq[b * QK..(b + 1) * QK], &wq[b * QK..(b + 1) * QK]);
        for (l, acc) in acc.iter_mut().enumerate() {
            let s: i32 = (4 * l..4 * l + 4).map(|e| x[e] as i32 * w[e] as i32).sum();
            *acc = (s as f32).mul_add(d, *acc);
        }
    }
    lanes_sum(acc)
}

/// Where a tile kernel writes: output row `i`, column `j` at `ptr + i · ld + j`.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    ld: usize,
}
// SAFETY: tasks write disjoint output tiles (`product` hands each task its own rows × columns).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Where output row `i`, column `j` goes (a method, so closures capture the `Sync` wrapper,
    /// not the raw pointer).
    fn at(self, i: usize, j: usize) -> *mut f32 {
        self.ptr.wrapping_add(i * self.ld + j)
    }
}

/// `y[r, c] = Σ x[r] · w[c]` for every activation row of `x` and weight row of `w` (both as
/// blocks of row length `k`), `y` row-major with row stride `ldy`, column `c` at offset `c`.
pub fn product(isa: Isa, x: &Blocks, w: &Blocks, k: usize, y: &mut [f32], ldy: usize) {
    assert_eq!(k % QK, 0, "rows in whole blocks");
    let (m, n) = (x.q.len() / k.max(1), w.q.len() / k.max(1));
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldy >= n && y.len() >= (m - 1) * ldy + n, "output size");
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Amx => return super::amx::int8::product(x, w, k, y, ldy),
        // SAFETY: `Isa::Avx512` is at or below what this CPU runs (`Isa::parse`/`detected`),
        // and that level includes AVX-512 VNNI.
        Isa::Avx512 => return unsafe { vnni::product(x, w, k, y, ldy) },
        _ => {}
    }
    let out = Out {
        ptr: y.as_mut_ptr(),
        ld: ldy,
    };
    let (row_tiles, col_tiles) = (m.div_ceil(TILE), n.div_ceil(TILE));
    (0..row_tiles * col_tiles).into_par_iter().for_each(|t| {
        let rows = (t / col_tiles) * TILE..((t / col_tiles + 1) * TILE).min(m);
        let cols = (t % col_tiles) * TILE..((t % col_tiles + 1) * TILE).min(n);
        // SAFETY: this task's tile lies inside `y` (asserted above) and no other task writes it.
        unsafe { tile(isa, x, w, k, rows, cols, out) };
    });
}

/// One output tile: for each pair of weight rows (2·k bytes, in L1 while the tile's activation
/// rows stream past), register tiles of MR activation rows × NR weight rows.
///
/// # Safety
/// `out` must be valid for writes at every (row, col) of the tile, and nothing else may access
/// those elements meanwhile.
unsafe fn tile(
    isa: Isa,
    x: &Blocks,
    w: &Blocks,
    k: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    out: Out,
) {
    let nb = k / QK;
    assert!(x.q.len() >= rows.end * k && x.d.len() >= rows.end * nb);
    assert!(w.q.len() >= cols.end * k && w.d.len() >= cols.end * nb);
    let mut j = cols.start;
    while j < cols.end {
        let nr = NR.min(cols.end - j);
        let dst = out.ptr.add(rows.start * out.ld + j);
        let xs = (
            x.q.as_ptr().add(rows.start * k),
            x.d.as_ptr().add(rows.start * nb),
        );
        let ws = (w.q.as_ptr().add(j * k), w.d.as_ptr().add(j * nb));
        let (m, ld) = (rows.len(), out.ld);
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 | Isa::Amx => simd::columns(isa, nr, xs, m, ws, nb, dst, ld),
            _ => {
                for r in 0..m {
                    let xq = std::slice::from_raw_parts(xs.0.add(r * k), k);
                    let xd = std::slice::from_raw_parts(xs.1.add(r * nb), nb);
                    for c in 0..nr {
                        let wq = std::slice::from_raw_parts(ws.0.add(c * k), k);
                        let wd = std::slice::from_raw_parts(ws.1.add(c * nb), nb);
                        *dst.add(r * ld + c) = dot_scalar(xq, xd, wq, wd);
                    }
                }
            }
        }
        j += nr;
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{lanes_sum, Isa, MR, QK};

    /// `m` activation rows (i8 values and scales from `xs`, rows k = nb·32 apart) against `nr`
    /// (1 or 2) weight rows from `ws`, into `dst` (row stride `ld`).
    ///
    /// # Safety
    /// The pointers must cover the rows named, `dst` must be writable there, and `isa` must be
    /// at or below what this CPU runs (`Isa::parse`/`Isa::detected`).
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn columns(
        isa: Isa,
        nr: usize,
        xs: (*const i8, *const f32),
        m: usize,
        ws: (*const i8, *const f32),
        nb: usize,
        dst: *mut f32,
        ld: usize,
    ) {
        match (isa, nr) {
            (_, 2) => columns_avx2::<2>(xs, m, ws, nb, dst, ld),
            _ => columns_avx2::<1>(xs, m, ws, nb, dst, ld),
        }
    }

    macro_rules! kernel {
        ($name:ident, $features:literal, |$a:ident, $b:ident| $lane_sums:expr) => {
            #[target_feature(enable = $features)]
            unsafe fn $name<const N: usize>(
                xs: (*const i8, *const f32),
                m: usize,
                ws: (*const i8, *const f32),
                nb: usize,
                dst: *mut f32,
                ld: usize,
            ) {
                let k = nb * QK;
                // Scale products of up to RUN blocks per (row, column) of a register tile; each
                // is written before it is read.
                const RUN: usize = 32;
                let mut scales = std::mem::MaybeUninit::<[f32; MR * 2 * RUN]>::uninit();
                // One register tile of $m rows from row `r0`.
                macro_rules! rows {
                    ($m:literal, $r0:expr) => {{
                        let r0 = $r0;
                        let mut acc = [[_mm256_setzero_ps(); N]; $m];
                        let mut start = 0;
                        while start < nb {
                            let run = RUN.min(nb - start);
                            // The scale products dw·dx of this run of blocks, 8 at a time: the
                            // inner loop then only broadcasts them from memory (a load).
                            let sp = scales.as_mut_ptr() as *mut f32;
                            for r in 0..$m {
                                for c in 0..N {
                                    let dst = sp.add((r * N + c) * RUN);
                                    let xd = xs.1.add((r0 + r) * nb + start);
                                    let wd = ws.1.add(c * nb + start);
                                    let mut i = 0;
                                    while i + 8 <= run {
                                        let v = _mm256_mul_ps(
                                            _mm256_loadu_ps(wd.add(i)),
                                            _mm256_loadu_ps(xd.add(i)),
                                        );
                                        _mm256_storeu_ps(dst.add(i), v);
                                        i += 8;
                                    }
                                    while i < run {
                                        *dst.add(i) = *wd.add(i) * *xd.add(i);
                                        i += 1;
                                    }
                                }
                            }
                            for i in 0..run {
                                let b = start + i;
                                let mut wv = [_mm256_setzero_si256(); N];
                                let mut wa = [_mm256_setzero_si256(); N];
                                for c in 0..N {
                                    let p = ws.0.add(c * k + b * QK) as *const __m256i;
                                    wv[c] = _mm256_loadu_si256(p);
                                    wa[c] = _mm256_sign_epi8(wv[c], wv[c]);
                                }
                                for r in 0..$m {
                                    let p = xs.0.add((r0 + r) * k + b * QK) as *const __m256i;
                                    let xv = _mm256_loadu_si256(p);
                                    for c in 0..N {
                                        let sx = _mm256_sign_epi8(xv, wv[c]);
                                        let ($a, $b) = (wa[c], sx);
                                        let sums: __m256i = $lane_sums;
                                        let d =
                                            _mm256_broadcast_ss(&*sp.add((r * N + c) * RUN + i));
                                        acc[r][c] =
                                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), d, acc[r][c]);
                                    }
                                }
                            }
                            start += run;
                        }
                        for r in 0..$m {
                            for c in 0..N {
                                let mut lanes = [0.0f32; 8];
                                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][c]);
                                *dst.add((r0 + r) * ld + c) = lanes_sum(lanes);
                            }
                        }
                    }};
                }
                let mut r = 0;
                while r + MR <= m {
                    rows!(4, r);
                    r += MR;
                }
                match m - r {
                    3 => rows!(3, r),
                    2 => rows!(2, r),
                    1 => rows!(1, r),
                    _ => {}
                }
            }
        };
    }

    kernel!(columns_avx2, "avx2,fma", |a, b| _mm256_madd_epi16(
        _mm256_maddubs_epi16(a, b),
        _mm256_set1_epi16(1)
    ));
}

/// `y[m, n] = x[m, k] · Wᵀ` through the int8 products when W's type has them; false (nothing
/// written) when it does not. Row chunks of x and panels of W within `budget` values each.
pub fn matmul_weight_t(
    x: &[f32],
    w: &dyn WeightRows,
    y: &mut [f32],
    budget: usize,
    isa: Isa,
) -> bool {
    let (n, k) = (w.rows(), w.row_len());
    let Some((DType::Quant(ty), _)) = w.blocks(0, n) else {
        return false;
    };
    if !reads(ty) || k % QK != 0 || k == 0 {
        return false;
    }
    let m = x.len() / k;
    assert_eq!(m * k, x.len(), "input width");
    assert_eq!(y.len(), m * n, "output size");
    let rows_per = |values: usize| (values / k).max(1);
    let panels: Vec<Range<usize>> = pieces(n, rows_per(budget), MIN_SPLIT).collect();
    let read = |range: &Range<usize>, out: &mut Blocks| {
        let (_, bytes) = w.blocks(range.start, range.len()).expect("block type");
        unpack_weights(ty, bytes, out);
    };
    let mut panel = Blocks::default();
    if panels.len() == 1 {
        read(&panels[0], &mut panel);
    }
    let mut xq = Blocks::default();
    for chunk in pieces(m, rows_per(budget), MIN_SPLIT) {
        quantize_activations(&x[chunk.start * k..chunk.end * k], &mut xq, isa);
        for range in &panels {
            if panels.len() > 1 {
                read(range, &mut panel);
            }
            let y = &mut y[chunk.start * n + range.start..];
            product(isa, &xq, &panel, k, y, n);
        }
    }
    true
}

/// Bytes the int8 path holds at once for a [m, k] × [n, k]ᵀ product under a panel budget of
/// `budget` values: the quantized activation chunk and the unpacked panel.
pub fn scratch_bytes(m: usize, k: usize, n: usize, budget: usize) -> u64 {
    let rows = |total: usize| {
        super::scratch::longest_piece(total, (budget / k.max(1)).max(1), MIN_SPLIT) as u64
    };
    let per_value = 1.0 + 4.0 / QK as f64;
    ((rows(m) + rows(n)) as f64 * k as f64 * per_value).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    fn blocks_of(ty: GgmlType, values: &[f32]) -> Vec<u8> {
        let mut bytes = vec![0u8; ty.bytes_for(values.len() as u64).unwrap() as usize];
        quant::quantize(ty, values, &mut bytes);
        bytes
    }

    #[test]
    fn unpacked_weights_are_the_dequantized_values() {
        let v = data(32 * 40, 3);
        for ty in [GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q4_0] {
            let bytes = blocks_of(ty, &v);
            let mut want = vec![0.0; v.len()];
            quant::dequantize(ty, &bytes, &mut want);
            let mut b = Blocks::default();
            unpack_weights(ty, &bytes, &mut b);
            for (i, want) in want.iter().enumerate() {
                assert_eq!(b.q[i] as f32 * b.d[i / QK], *want, "{ty:?} value {i}");
            }
        }
    }

    #[test]
    fn activation_blocks_round_to_the_nearest_level() {
        let mut x = data(64, 5);
        x[40] = 0.0;
        x[32..64].iter_mut().for_each(|v| *v = 0.0);
        let mut b = Blocks::default();
        quantize_activations(&x, &mut b, Isa::Scalar);
        assert_eq!(b.d[1], 0.0);
        assert!(b.q[32..].iter().all(|&q| q == 0));
        let amax = x[..32].iter().fold(0.0f32, |a, v| a.max(v.abs()));
        assert_eq!(b.d[0], amax / 127.0);
        for (q, v) in b.q[..32].iter().zip(&x) {
            assert!((*q as f32 * b.d[0] - v).abs() <= 0.5 * b.d[0] * 1.0001);
        }
        x[3] = f32::INFINITY;
        quantize_activations(&x, &mut b, Isa::Scalar);
        assert!(b.d[0].is_nan());
    }

    /// The AVX-512 quantization gives the scalar bits: ties (x.5 at scale 1, both signs), values
    /// just below and above them, zero blocks, non-finite blocks, random blocks.
    #[test]
    fn activation_quantization_is_the_same_on_every_isa() {
        let mut x = data(32 * 200, 17);
        for (i, v) in x[..32 * 8].iter_mut().enumerate() {
            // Blocks whose largest |value| is 127, so d = 1 and v · id = v exactly.
            let t = (i % 32) as f32 * 4.0 - 63.5;
            *v = match i / 32 {
                0 => t,
                1 => -t,
                2 => f32::from_bits(t.to_bits() - 1),
                3 => f32::from_bits(t.to_bits() + 1),
                _ => t * 0.25,
            };
            if i % 32 == 31 {
                *v = 127.0;
            }
        }
        x[32 * 8..32 * 9].fill(0.0);
        x[32 * 9 + 5] = f32::NAN;
        x[32 * 10 + 7] = f32::NEG_INFINITY;
        let mut want = Blocks::default();
        quantize_activations(&x, &mut want, Isa::Scalar);
        for isa in [Isa::Avx2, Isa::Avx512] {
            if isa > Isa::detected() {
                eprintln!("{isa:?} not run: this CPU lacks it");
                continue;
            }
            let mut got = Blocks::default();
            quantize_activations(&x, &mut got, isa);
            assert_eq!(got.q, want.q, "{isa:?} values");
            let bits = |d: &[f32]| d.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.d), bits(&want.d), "{isa:?} scales");
        }
    }

    /// Every instruction set this CPU runs gives its scalar reference's bits (AVX2: `dot_scalar`,
    /// VNNI: `vnni::dot_scalar`), at register-tile tails too (m, n not multiples of 4, 2, 6, 32,
    /// 64, 96), with extreme levels (±127 activations, -128 weights) that would saturate a wrong
    /// pairing or offset.
    #[test]
    fn every_isa_gives_the_scalar_bits() {
        let (m, k, n) = (101, 96, 131);
        let mut x = Blocks::default();
        quantize_activations(&data(m * k, 7), &mut x, Isa::Scalar);
        let mut w = Blocks::default();
        unpack_weights(
            GgmlType::Q8_0,
            &blocks_of(GgmlType::Q8_0, &data(n * k, 9)),
            &mut w,
        );
        x.q[..32].fill(127);
        x.q[32..64].fill(-127);
        w.q[..64].fill(-128);
        let mut want = vec![0.0; m * n];
        product(Isa::Scalar, &x, &w, k, &mut want, n);
        for r in 0..m {
            for c in 0..n {
                let nb = k / QK;
                let reference = dot_scalar(
                    &x.q[r * k..(r + 1) * k],
                    &x.d[r * nb..(r + 1) * nb],
                    &w.q[c * k..(c + 1) * k],
                    &w.d[c * nb..(c + 1) * nb],
                );
                let exact: f64 = (0..k)
                    .map(|e| {
                        x.q[r * k + e] as f64
                            * x.d[r * nb + e / QK] as f64
                            * w.q[c * k + e] as f64
                            * w.d[c * nb + e / QK] as f64
                    })
                    .sum();
                assert_eq!(want[r * n + c], reference);
                assert!((reference as f64 - exact).abs() <= 1e-4 * (1.0 + exact.abs()));
            }
        }
        if Isa::detected() >= Isa::Avx2 {
            let mut got = vec![0.0; m * n];
            product(Isa::Avx2, &x, &w, k, &mut got, n);
            assert!(got == want, "AVX2 differs from scalar");
        }
        #[cfg(target_arch = "x86_64")]
        if Isa::detected() >= Isa::Avx512 {
            let mut got = vec![0.0; m * n];
            product(Isa::Avx512, &x, &w, k, &mut got, n);
            let nb = k / QK;
            for r in 0..m {
                for c in 0..n {
                    let want = vnni::dot_scalar(
                        &x.q[r * k..(r + 1) * k],
                        &x.d[r * nb..(r + 1) * nb],
                        &w.q[c * k..(c + 1) * k],
                        &w.d[c * nb..(c + 1) * nb],
                    );
                    assert_eq!(got[r * n + c].to_bits(), want.to_bits(), "VNNI [{r},{c}]");
                }
            }
            // The same exact block sums, scaled and added in another order: f32 rounding apart.
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "VNNI {a} vs lanes {b}"
                );
            }
        } else {
            eprintln!("AVX-512 VNNI not run: this CPU lacks it");
        }
    }

    /// Panels and row chunks (any budget) give the bits of one unsplit product.
    #[test]
    fn budgets_do_not_change_bits() {
        let (m, k, n) = (150, 64, 140);
        let x = data(m * k, 11);
        let bytes = blocks_of(GgmlType::Q4_0, &data(n * k, 13));
        let w = RawRows {
            bytes: &bytes,
            ty: GgmlType::Q4_0,
            rows: n,
            k,
        };
        let mut want = vec![0.0; m * n];
        assert!(matmul_weight_t(
            &x,
            &w,
            &mut want,
            usize::MAX,
            Isa::detected()
        ));
        for budget in [1, 65 * k, 100 * k] {
            let mut got = vec![0.0; m * n];
            matmul_weight_t(&x, &w, &mut got, budget, Isa::detected());
            assert!(got == want, "budget {budget}");
        }
        assert!(scratch_bytes(m, k, n, 65 * k) <= 2 * 4 * (65 * k + 65 * k) as u64);
    }

    struct RawRows<'a> {
        bytes: &'a [u8],
        ty: GgmlType,
        rows: usize,
        k: usize,
    }

    impl WeightRows for RawRows<'_> {
        fn rows(&self) -> usize {
            self.rows
        }
        fn row_len(&self) -> usize {
            self.k
        }
        fn read_rows(&self, first: usize, count: usize, out: &mut [f32]) {
            let row = self.ty.bytes_for(self.k as u64).unwrap() as usize;
            quant::dequantize(
                self.ty,
                &self.bytes[first * row..(first + count) * row],
                out,
            );
        }
        fn blocks(&self, first: usize, count: usize) -> Option<(DType, &[u8])> {
            let row = self.ty.bytes_for(self.k as u64).unwrap() as usize;
            Some((
                DType::Quant(self.ty),
                &self.bytes[first * row..(first + count) * row],
            ))
        }
    }
}
