//! bf16 products on packed operands: `c[m, n] = a[m, k] · b[k, n]` with both operands rounded to
//! bf16 (round to nearest even, as `bf16::round_scalar`) and the products accumulated in f32, on
//! AMX tiles (`tdpbf16ps`, Intel Sapphire Rapids and later; `Isa::Amx`) or, where there are no
//! tiles, with AVX-512 BF16's `vdpbf16ps` (`dot`: AMD Zen 4/5, Intel Cooper Lake; `Isa::Avx512`),
//! which reads the same packed layout. `runs` says which instruction sets do it on this CPU.
//!
//! Layout: eight tile registers, all 16 rows × 64 bytes: tmm0..3 the 2×2 accumulators of a 32 × 32
//! output block, tmm4/5 two 16-row slices of `a` (32 bf16 along k each), tmm6/7 two 16-column
//! slices of `b` in the pair layout the instruction reads (row p holds, for 16 columns, the values
//! at k = 2p and 2p + 1). `a` is either converted per task, 64 rows at a time, into plain bf16
//! rows (`gemm`: a linear layer's activations) or given rounded once (`PackedA`: a convolution's
//! filters, read from the stored rows); `b` is packed once per call (`PackedB`), from a stored
//! weight's rows (a linear layer's Wᵀ) or a row-major [k, n] matrix (a convolution's gathered
//! patch). k, n and the rows of `a` are padded with zeros to multiples of 32. The rounding is AVX-512
//! BF16's (`simd`), which every CPU with AMX has.
//!
//! Each output is accumulated along k in the same order (per kernel) whatever the threads, the row
//! chunks or the weight panels, so the bits do not depend on them. They differ from the rounding
//! path (`kernels::bf16`, f32 GEMM on rounded values) and from each other only in the order of the
//! f32 additions.
//!
//! The tiles are the thread's state: every task loads the configuration and releases the tiles
//! itself. Linux hands the tile data state to a process only when asked
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), which `available` does once.

use rayon::prelude::*;

use super::panel::WeightRows;
use super::precision::Isa;

#[cfg(target_arch = "x86_64")]
mod dot;
#[cfg(target_arch = "x86_64")]
pub mod int8;

/// Rows of a tile, and bf16 values in one tile row (64 bytes).
const TR: usize = 16;
const TK: usize = 32;
/// Rows of `a` one task converts and multiplies.
const MB: usize = 64;
/// Columns of `b` walked per pass over one task's rows (kept in L2 while the rows go by).
const NB: usize = 256;
/// Weight rows a packing task reads into its f32 buffer at once.
const READ_ROWS: usize = 8;

/// Whether this CPU and kernel run AMX tiles (BF16 and INT8) and AVX-512 BF16. Asks Linux for the
/// tile data permission once.
pub fn available() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            // CPUID leaf 7 exists on every CPU with AVX-512 (checked first).
            let cpu = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512bf16")
                && {
                    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
                    let bit = |b: u32| leaf.edx >> b & 1 == 1;
                    bit(22) && bit(24) && bit(25) // AMX-BF16, AMX-TILE, AMX-INT8
                };
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call; it only changes which states the process may use.
            cpu && unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            } == 0
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        false
    })
}

/// Whether `isa` multiplies packed bf16 operands on this CPU: on AMX tiles (`Isa::Amx`), or with
/// AVX-512 BF16's `vdpbf16ps` (`Isa::Avx512` on a CPU that has it, `dot`).
pub fn runs(isa: Isa) -> bool {
    match isa {
        Isa::Amx => available(),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => isa <= Isa::detected() && dot::available(),
        _ => false,
    }
}

/// Whether this CPU runs the bf16 conversions of the packing (AVX-512 BF16, which every CPU with
/// AMX has). Every packing checks it: `simd` is unsound without it.
fn converts() -> bool {
    #[cfg(target_arch = "x86_64")]
    return dot::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn round_up(v: usize, to: usize) -> usize {
    v.div_ceil(to) * to
}

/// `n` values, every one written by `fill` (padding zeros included) before anything reads them:
/// no zeroing pass first. Zeroed allocations of the packed operands cost a serial `memset` on the
/// calling thread per product (about 4% of a bf16 step's CPU, the other thread idle meanwhile).
/// Test builds fill the memory with NaN bit patterns (0xFFFF) first, so a value `fill` misses
/// turns a product's result into NaN and the kernel tests fail.
fn filled(n: usize, fill: impl FnOnce(&mut [u16])) -> Vec<u16> {
    let mut data: Vec<std::mem::MaybeUninit<u16>> = Vec::with_capacity(n);
    // SAFETY: MaybeUninit values need no initialisation.
    unsafe { data.set_len(n) };
    if cfg!(test) {
        data.fill(std::mem::MaybeUninit::new(0xFFFF));
    }
    let mut data = std::mem::ManuallyDrop::new(data);
    // SAFETY: the buffer is `n` u16 slots, allocated as MaybeUninit<u16> (same layout); `fill`
    // only writes before the values are read, and every caller's fill covers all `n` (each
    // writes its padding explicitly). The Vec is rebuilt from the same pointer, length and
    // capacity, and the MaybeUninit one is never dropped.
    unsafe {
        let ptr = data.as_mut_ptr().cast::<u16>();
        fill(std::slice::from_raw_parts_mut(ptr, n));
        Vec::from_raw_parts(ptr, n, data.capacity())
    }
}

/// `b` packed for the tiles: for each 16-column block, kp/2 rows of 16 (value at 2p, value at
/// 2p + 1) pairs.
pub struct PackedB {
    data: Vec<u16>,
    /// Columns (the product's n) and padded depth.
    n: usize,
    kp: usize,
}

impl PackedB {
    fn blocks(n: usize) -> usize {
        round_up(n, 2 * TR) / TR
    }

    /// `n` columns of depth `k`, each 16-column block written by `fill(block, dst)`, which writes
    /// every value of its block (`filled`); `init` makes a task's buffers.
    fn packed<T>(
        n: usize,
        k: usize,
        init: impl Fn() -> T + Sync + Send,
        fill: impl Fn(&mut T, usize, &mut [u16]) + Sync + Send,
    ) -> Self {
        assert!(converts(), "no AVX-512 BF16 on this CPU");
        let kp = round_up(k.max(1), TK);
        let data = filled(Self::blocks(n) * TR * kp, |data| {
            data.par_chunks_mut(TR * kp)
                .enumerate()
                .for_each_init(init, |buf, (block, dst)| fill(buf, block, dst))
        });
        PackedB { data, n, kp }
    }

    /// From rows `first .. first + n` of a stored weight [_, k] whose rows are the product's
    /// columns (a linear layer's weight), read 16 rows at a time into a small f32 buffer per task.
    pub fn from_weight(w: &dyn WeightRows, first: usize, n: usize) -> Self {
        let k = w.row_len();
        let kp = round_up(k.max(1), TK);
        let init = || (vec![0f32; TR * k], vec![0u16; kp]);
        Self::packed(n, k, init, |(buf, row16), block, dst| {
            let count = TR.min(n.saturating_sub(block * TR));
            if count < TR {
                dst.fill(0); // columns past n (a whole block of them pads n to a multiple of 32)
            }
            if count == 0 {
                return;
            }
            w.read_rows(first + block * TR, count, &mut buf[..count * k]);
            for (c, src) in buf.chunks_exact(k.max(1)).take(count).enumerate() {
                convert(src, row16);
                for (p, pair) in row16.chunks_exact(2).enumerate() {
                    dst[p * 2 * TR + c * 2..][..2].copy_from_slice(pair);
                }
            }
        })
    }

    /// From a row-major [k, n] matrix (a convolution's gathered patch, `n` columns): rows 2p and
    /// 2p + 1 interleaved 16 columns at a time.
    pub fn from_cols(b: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(b.len(), k * n, "rhs size");
        Self::packed(
            n,
            k,
            || (),
            |_, block, dst| {
                let (c0, cols) = (block * TR, TR.min(n.saturating_sub(block * TR)));
                if cols == 0 {
                    return dst.fill(0); // the zero block that pads n to a multiple of 32
                }
                // Pairs of rows up to k (`pair_rows` zeroes columns past `cols`), zeros to kp.
                let (pairs, padding) = dst.split_at_mut(k.div_ceil(2) * 2 * TR);
                // SAFETY: `converts` (asserted by every packing) saw AVX-512 BF16.
                unsafe { simd::pair_rows(&b[c0..], n, k, cols, pairs) }
                padding.fill(0);
            },
        )
    }
}

/// A tile configuration (palette 1), as `ldtilecfg` reads it.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// Tiles 0, 1, … of `(rows, bytes per row)`; the others unused.
    const fn new(tiles: &[(u8, u16)]) -> Self {
        let mut colsb = [0u16; 16];
        let mut rows = [0u8; 16];
        let mut t = 0;
        while t < tiles.len() {
            rows[t] = tiles[t].0;
            colsb[t] = tiles[t].1;
            t += 1;
        }
        TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb,
            rows,
        }
    }
}

/// The bf16 products' configuration: eight 16-row × 64-byte tiles.
const CONFIG: TileConfig = TileConfig::new(&[(TR as u8, 64); 8]);

/// The left operand rounded to bf16 once (a convolution's filters, reused for every patch):
/// rows padded to a multiple of 32, k to a multiple of 32, zeros in the padding.
pub struct PackedA {
    data: Vec<u16>,
    rows: usize,
    kp: usize,
}

impl PackedA {
    /// Rows `first .. first + rows` of a stored weight, read a few rows at a time into a small
    /// f32 buffer per task and rounded from there (the f32 copy never leaves the cache).
    pub fn from_weight(w: &dyn WeightRows, first: usize, rows: usize) -> Self {
        assert!(converts(), "no AVX-512 BF16 on this CPU");
        let k = w.row_len();
        let kp = round_up(k.max(1), TK);
        let data = filled(round_up(rows, 2 * TR) * kp, |data| {
            data.par_chunks_mut(READ_ROWS * kp)
                .enumerate()
                .for_each_init(
                    || vec![0f32; READ_ROWS * k],
                    |buf, (i, dst)| {
                        let (r0, count) = (
                            i * READ_ROWS,
                            READ_ROWS.min(rows.saturating_sub(i * READ_ROWS)),
                        );
                        if count > 0 {
                            w.read_rows(first + r0, count, &mut buf[..count * k]);
                        }
                        let (real, padding) = dst.split_at_mut(count * kp);
                        for (dst, src) in real.chunks_exact_mut(kp).zip(buf.chunks_exact(k.max(1)))
                        {
                            convert(src, dst);
                        }
                        padding.fill(0); // rows past `rows`
                    },
                )
        });
        PackedA { data, rows, kp }
    }
}

/// `src` rounded into the first values of `dst`, zeros after.
fn convert(src: &[f32], dst: &mut [u16]) {
    // SAFETY: `converts` (asserted by every packing) saw AVX-512 BF16.
    unsafe { simd::convert(src, &mut dst[..src.len()]) };
    dst[src.len()..].fill(0);
}

/// The AVX-512 BF16 conversions (`vcvtne2ps2bf16`: round to nearest even, NaN kept quiet; it
/// reads denormal inputs as zero, which the compute threads' flush-to-zero already makes them).
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    fn mask(values: usize) -> __mmask16 {
        if values >= 16 {
            0xFFFF
        } else {
            (1u16 << values) - 1
        }
    }

    /// For each row pair p of the [k, cols] matrix `b` (rows at multiples of `ldb`, cols ≤ 16):
    /// `dst[32p + 2c] = bf16(b[2p, c])`, `dst[32p + 2c + 1] = bf16(b[2p + 1, c])` (missing values
    /// zero). One call per 16-column block, so the loop runs with the target features.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn pair_rows(b: &[f32], ldb: usize, k: usize, cols: usize, dst: &mut [u16]) {
        assert!(cols <= 16 && dst.len() == k.div_ceil(2) * 32);
        assert!(k == 0 || b.len() >= (k - 1) * ldb + cols, "rhs size");
        let m = mask(cols);
        // [a0..a15, b0..b15] → [a0, b0, a1, b1, …].
        let interleave = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        for (p, d) in dst.chunks_exact_mut(32).enumerate() {
            let lo = _mm512_maskz_loadu_ps(m, b.as_ptr().add(2 * p * ldb));
            let hi = match 2 * p + 1 < k {
                true => _mm512_maskz_loadu_ps(m, b.as_ptr().add((2 * p + 1) * ldb)),
                false => _mm512_setzero_ps(),
            };
            let pairs = _mm512_cvtne2ps_pbh(hi, lo);
            let out = _mm512_permutexvar_epi16(
                interleave,
                std::mem::transmute::<__m512bh, __m512i>(pairs),
            );
            _mm512_storeu_si512(d.as_mut_ptr().cast(), out);
        }
    }

    /// `dst[i] = bf16(src[i])`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn convert(src: &[f32], dst: &mut [u16]) {
        assert_eq!(src.len(), dst.len());
        for (s, d) in src.chunks(16).zip(dst.chunks_mut(16)) {
            let m = mask(s.len());
            let v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, s.as_ptr()));
            _mm256_mask_storeu_epi16(
                d.as_mut_ptr().cast(),
                m,
                std::mem::transmute::<__m256bh, __m256i>(v),
            );
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    pub unsafe fn pair_rows(_: &[f32], _: usize, _: usize, _: usize, _: &mut [u16]) {
        unreachable!("AMX is x86-64 only")
    }
    pub unsafe fn convert(_: &[f32], _: &mut [u16]) {
        unreachable!("AMX is x86-64 only")
    }
}

/// `c[i * ldc + j] = Σ_p bf16(a[i, p]) · bf16(b[p, j])` for i < m, j < b.n, in f32 (overwrites),
/// with `isa`'s kernel. Panics when `isa` does not run packed bf16 products here (`runs`).
pub fn gemm(isa: Isa, a: &[f32], m: usize, k: usize, b: &PackedB, c: &mut [f32], ldc: usize) {
    check(isa, m, b, c, ldc);
    assert_eq!(a.len(), m * k, "lhs size");
    assert_eq!(b.kp, round_up(k.max(1), TK), "rhs depth");
    if m == 0 || b.n == 0 {
        return;
    }
    let kp = b.kp;
    c.par_chunks_mut(MB * ldc)
        .zip(a.par_chunks(MB * k))
        .for_each_init(
            || vec![0u16; MB * kp],
            |a16, (c, a)| {
                let rows = a.len() / k.max(1);
                for (dst, src) in a16.chunks_exact_mut(kp).zip(a.chunks_exact(k.max(1))) {
                    convert(src, dst);
                }
                let padded = round_up(rows, 2 * TR);
                a16[rows * kp..padded * kp].fill(0);
                // SAFETY: `check` saw the CPU (and the tile permission); the buffers hold
                // `padded` rows of kp values and `b` every 32-column block it names.
                unsafe { run(isa, &a16[..padded * kp], rows, b, c, ldc) }
            },
        );
}

/// As `gemm`, with the left operand already rounded (`PackedA`).
pub fn gemm_packed(isa: Isa, a: &PackedA, b: &PackedB, c: &mut [f32], ldc: usize) {
    check(isa, a.rows, b, c, ldc);
    assert_eq!(a.kp, b.kp, "depths");
    if a.rows == 0 || b.n == 0 {
        return;
    }
    let kp = a.kp;
    c.par_chunks_mut(MB * ldc)
        .zip(a.data.par_chunks(MB * kp))
        .enumerate()
        .for_each(|(t, (c, a16))| {
            let rows = MB.min(a.rows - t * MB);
            // SAFETY: as in `gemm`; `a16` holds whole 32-row blocks (padded at construction).
            unsafe { run(isa, a16, rows, b, c, ldc) }
        });
}

fn check(isa: Isa, m: usize, b: &PackedB, c: &[f32], ldc: usize) {
    assert!(
        runs(isa),
        "{isa:?} runs no packed bf16 products on this CPU"
    );
    assert!(
        ldc >= b.n && (m == 0 || c.len() >= (m - 1) * ldc + b.n),
        "dst size"
    );
}

/// One task with `isa`'s kernel (`check`ed).
unsafe fn run(isa: Isa, a16: &[u16], rows: usize, b: &PackedB, c: &mut [f32], ldc: usize) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Amx {
        return dot::task(a16, rows, b, c, ldc);
    }
    task(a16, rows, b, c, ldc)
}

/// One task on the tiles: rows `a16` (bf16, kp per row, a multiple of 32 rows) times all of `b`.
#[cfg(target_arch = "x86_64")]
unsafe fn task(a16: &[u16], rows: usize, b: &PackedB, c: &mut [f32], ldc: usize) {
    use std::arch::asm;
    let kp = b.kp;
    let a_stride = kp * 2;
    let b_block = TR * kp; // u16 values per 16-column block
    let mut out = [0f32; 2 * TR * 2 * TR];
    asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
    let blocks = PackedB::blocks(b.n);
    for nb0 in (0..blocks).step_by(NB / TR) {
        for i0 in (0..a16.len() / kp).step_by(2 * TR) {
            let a0 = a16.as_ptr().add(i0 * kp);
            let a1 = a0.add(TR * kp);
            for jb in (nb0..blocks.min(nb0 + NB / TR)).step_by(2) {
                let b0 = b.data.as_ptr().add(jb * b_block);
                let b1 = b0.add(b_block);
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                for kk in 0..kp / TK {
                    asm!(
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm5, [{a1} + {sa}*1]",
                        "tileloadd tmm6, [{b0} + {sb}*1]",
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0.add(kk * TK),
                        a1 = in(reg) a1.add(kk * TK),
                        b0 = in(reg) b0.add(kk * TK * TR),
                        b1 = in(reg) b1.add(kk * TK * TR),
                        sa = in(reg) a_stride,
                        sb = in(reg) 64usize,
                        options(nostack, readonly)
                    );
                }
                let o = out.as_mut_ptr();
                asm!(
                    "tilestored [{o0} + {s}*1], tmm0",
                    "tilestored [{o1} + {s}*1], tmm1",
                    "tilestored [{o2} + {s}*1], tmm2",
                    "tilestored [{o3} + {s}*1], tmm3",
                    o0 = in(reg) o,
                    o1 = in(reg) o.add(TR),
                    o2 = in(reg) o.add(TR * 2 * TR),
                    o3 = in(reg) o.add(TR * 2 * TR + TR),
                    s = in(reg) 2 * TR * 4,
                    options(nostack)
                );
                let (j0, cols) = (jb * TR, (2 * TR).min(b.n.saturating_sub(jb * TR)));
                for i in 0..(2 * TR).min(rows.saturating_sub(i0)) {
                    let src = &out[i * 2 * TR..][..cols];
                    c[(i0 + i) * ldc + j0..][..cols].copy_from_slice(src);
                }
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn task(_: &[u16], _: usize, _: &PackedB, _: &mut [f32], _: usize) {
    unreachable!("AMX is x86-64 only")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::bf16::round_scalar;
    use crate::kernels::DenseRows;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The same products in f64 on the bf16-rounded operands: what the tiles compute up to the
    /// order of the f32 additions.
    fn reference(a: &[f32], b_kn: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                let av = round_scalar(a[i * k + p]) as f64;
                for j in 0..n {
                    c[i * n + j] += av * round_scalar(b_kn[p * n + j]) as f64;
                }
            }
        }
        c
    }

    #[test]
    fn rounding_matches_the_rounding_path() {
        if !converts() {
            eprintln!("no AVX-512 BF16 on this CPU: its conversions are not run here");
            return;
        }
        // Normal values, ties, the extremes and NaN (denormals are read as zero, see `simd`).
        let mut v = data(10_001, 3);
        v.extend([
            f32::MAX,
            -0.0,
            f32::INFINITY,
            f32::from_bits(0x3F80_8000),
            f32::NAN,
        ]);
        let mut got = vec![0u16; v.len()];
        convert(&v, &mut got);
        for (&x, &g) in v.iter().zip(&got) {
            let (g, want) = (f32::from_bits((g as u32) << 16), round_scalar(x));
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "{x}"
            );
        }
    }

    #[test]
    fn both_packings_multiply_like_f64_on_rounded_values_with_each_kernel() {
        let kernels: Vec<Isa> = [Isa::Amx, Isa::Avx512]
            .into_iter()
            .filter(|&isa| runs(isa))
            .collect();
        if kernels.is_empty() {
            eprintln!("no AMX-BF16 or AVX-512 BF16 on this CPU: the kernels are not run here");
            return;
        }
        // Odd sizes: edges in every dimension (m not a multiple of 8, 16 or 64, k of 32, n of 32),
        // and k past `dot`'s slice (KC), with a slice that is not full.
        let sizes = [
            (1, 1, 1),
            (77, 45, 19),
            (130, 320, 70),
            (64, 64, 32),
            (21, 600, 48),
        ];
        for (isa, (m, k, n)) in kernels.iter().flat_map(|&i| sizes.map(|s| (i, s))) {
            let a = data(m * k, 1);
            let b_kn = data(k * n, 2);
            let want = reference(&a, &b_kn, m, k, n);
            let mut b_nk = vec![0.0; n * k];
            for p in 0..k {
                for j in 0..n {
                    b_nk[j * k + p] = b_kn[p * n + j];
                }
            }
            let packed_a = PackedA::from_weight(&DenseRows { data: &a, rows: m }, 0, m);
            for (packed, pre) in [
                (PackedB::from_cols(&b_kn, k, n), false),
                (
                    PackedB::from_weight(
                        &DenseRows {
                            data: &b_nk,
                            rows: n,
                        },
                        0,
                        n,
                    ),
                    false,
                ),
                (PackedB::from_cols(&b_kn, k, n), true),
            ] {
                let ldc = n + 3;
                let mut c = vec![f32::NAN; m * ldc];
                if pre {
                    gemm_packed(isa, &packed_a, &packed, &mut c, ldc);
                } else {
                    gemm(isa, &a, m, k, &packed, &mut c, ldc);
                }
                for i in 0..m {
                    for j in 0..n {
                        let (got, want) = (c[i * ldc + j] as f64, want[i * n + j]);
                        // f32 accumulation of k exact products: |error| ≤ k · 2⁻²⁴ · Σ|terms|,
                        // bounded here by k · 2⁻²⁴ · k (|values| ≤ 1).
                        let bound = (k * k) as f64 * 2f64.powi(-24) + 1e-30;
                        assert!(
                            (got - want).abs() <= bound,
                            "{isa:?} ({m},{k},{n}) [{i},{j}] {got} vs {want}"
                        );
                    }
                    assert!(
                        c[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()),
                        "wrote past n"
                    );
                }
            }
        }
    }
}
