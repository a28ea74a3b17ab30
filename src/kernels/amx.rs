//! bf16 products on AMX tiles (`tdpbf16ps`, Intel Sapphire Rapids and later): `c[m, n] = a[m, k] ·
//! b[k, n]` with both operands rounded to bf16 (round to nearest even, as `bf16::round_scalar`)
//! and the products accumulated in f32 inside the tile unit.
//!
//! Layout: eight tile registers, all 16 rows × 64 bytes: tmm0..3 the 2×2 accumulators of a 32 × 32
//! output block, tmm4/5 two 16-row slices of `a` (32 bf16 along k each), tmm6/7 two 16-column
//! slices of `b` in the pair layout the instruction reads (row p holds, for 16 columns, the values
//! at k = 2p and 2p + 1). `a` is converted per task, 64 rows at a time, into plain bf16 rows; `b`
//! is packed once per call (`PackedB`), from either a row-major [n, k] weight (a linear layer's
//! Wᵀ) or a row-major [k, n] matrix (a convolution's gathered patch). k is padded with zeros to a
//! multiple of 32, n to a multiple of 32, and the rows of the last `a` block to 16.
//!
//! Each output is accumulated along k in the same tile order whatever the threads, the row chunks
//! or the weight panels, so the bits do not depend on them. They differ from the rounding path
//! (`kernels::bf16`, f32 GEMM on rounded values) only in the order of the f32 additions.
//!
//! The tiles are the thread's state: every task loads the configuration and releases the tiles
//! itself. Linux hands the tile data state to a process only when asked
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), which `available` does once.

use rayon::prelude::*;

/// Rows of a tile, and bf16 values in one tile row (64 bytes).
const TR: usize = 16;
const TK: usize = 32;
/// Rows of `a` one task converts and multiplies.
const MB: usize = 64;
/// Columns of `b` walked per pass over one task's rows (kept in L2 while the rows go by).
const NB: usize = 256;

/// Whether this CPU and kernel run AMX-BF16 tiles. Asks Linux for the tile data permission once.
pub fn available() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            // CPUID leaf 7 exists on every CPU with AVX-512 (checked first).
            let cpu = std::arch::is_x86_feature_detected!("avx512f") && {
                let leaf = std::arch::x86_64::__cpuid_count(7, 0);
                let (bf16, tile) = (leaf.edx >> 22 & 1 == 1, leaf.edx >> 24 & 1 == 1);
                bf16 && tile
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

fn round_up(v: usize, to: usize) -> usize {
    v.div_ceil(to) * to
}

/// `v` rounded to the nearest bf16 (ties to even), its bits; NaN stays a quiet NaN.
#[inline(always)]
fn to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    let rounded = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16;
    let nan = ((bits >> 16) as u16) | 0x0040;
    if v.is_nan() {
        nan
    } else {
        rounded
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

    fn zeroed(n: usize, k: usize) -> Self {
        let kp = round_up(k.max(1), TK);
        PackedB {
            data: vec![0; Self::blocks(n) * TR * kp],
            n,
            kp,
        }
    }

    /// Bytes `from_rows`/`from_cols` hold for an [n, k] product.
    pub fn bytes(n: usize, k: usize) -> u64 {
        (Self::blocks(n) * TR * round_up(k.max(1), TK)) as u64 * 2
    }

    /// From a row-major [n, k] matrix whose rows are the product's columns (a linear weight).
    pub fn from_rows(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight size");
        let mut out = Self::zeroed(n, k);
        let kp = out.kp;
        out.data
            .par_chunks_mut(TR * kp)
            .enumerate()
            .for_each(|(block, dst)| {
                for c in 0..TR.min(n.saturating_sub(block * TR)) {
                    let row = &w[(block * TR + c) * k..][..k];
                    for (kk, &v) in row.iter().enumerate() {
                        dst[(kk / 2) * 2 * TR + c * 2 + kk % 2] = to_bf16(v);
                    }
                }
            });
        out
    }

    /// From a row-major [k, n] matrix (a convolution's gathered patch, `n` columns).
    pub fn from_cols(b: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(b.len(), k * n, "rhs size");
        let mut out = Self::zeroed(n, k);
        let kp = out.kp;
        out.data
            .par_chunks_mut(TR * kp)
            .enumerate()
            .for_each(|(block, dst)| {
                let (c0, cols) = (block * TR, TR.min(n.saturating_sub(block * TR)));
                if cols == 0 {
                    return; // the zero block that pads n to a multiple of 32
                }
                for kk in 0..k {
                    let src = &b[kk * n + c0..][..cols];
                    let row = &mut dst[(kk / 2) * 2 * TR + kk % 2..];
                    for (c, &v) in src.iter().enumerate() {
                        row[c * 2] = to_bf16(v);
                    }
                }
            });
        out
    }
}

/// The tile configuration (palette 1): eight 16-row × 64-byte tiles.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = {
    let mut colsb = [0u16; 16];
    let mut rows = [0u8; 16];
    let mut t = 0;
    while t < 8 {
        colsb[t] = 64;
        rows[t] = TR as u8;
        t += 1;
    }
    TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb,
        rows,
    }
};

/// `c[i * ldc + j] = Σ_p bf16(a[i, p]) · bf16(b[p, j])` for i < m, j < b.n, in f32 (overwrites).
/// Panics when the CPU lacks AMX-BF16 (`available`).
pub fn gemm(a: &[f32], m: usize, k: usize, b: &PackedB, c: &mut [f32], ldc: usize) {
    assert!(available(), "AMX-BF16 tiles are not available");
    assert_eq!(a.len(), m * k, "lhs size");
    assert_eq!(b.kp, round_up(k.max(1), TK), "rhs depth");
    assert!(
        ldc >= b.n && (m == 0 || c.len() >= (m - 1) * ldc + b.n),
        "dst size"
    );
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
                    dst[..k]
                        .iter_mut()
                        .zip(src)
                        .for_each(|(d, &v)| *d = to_bf16(v));
                    dst[k..].fill(0);
                }
                let padded = round_up(rows, 2 * TR);
                a16[rows * kp..padded * kp].fill(0);
                // SAFETY: `available` checked the CPU and the permission; the buffers hold
                // `padded` rows of kp values and `b` every 32-column block it names.
                unsafe { task(&a16[..padded * kp], rows, b, c, ldc) }
            },
        );
}

/// One task: rows `a16` (bf16, kp per row, a multiple of 32 rows) times all of `b`.
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
        for v in data(10_000, 3).into_iter().chain([f32::MAX, 1e-40, -0.0]) {
            let want = round_scalar(v).to_bits();
            assert_eq!((to_bf16(v) as u32) << 16, want, "{v}");
        }
        assert!(f32::from_bits((to_bf16(f32::NAN) as u32) << 16).is_nan());
    }

    #[test]
    fn both_packings_multiply_like_f64_on_rounded_values() {
        if !available() {
            eprintln!("no AMX-BF16 on this CPU: the tile kernel is not run here");
            return;
        }
        // Odd sizes: edges in every dimension (m not a multiple of 16 or 64, k of 32, n of 32).
        for (m, k, n) in [(1, 1, 1), (77, 45, 19), (130, 320, 70), (64, 64, 32)] {
            let a = data(m * k, 1);
            let b_kn = data(k * n, 2);
            let want = reference(&a, &b_kn, m, k, n);
            let mut b_nk = vec![0.0; n * k];
            for p in 0..k {
                for j in 0..n {
                    b_nk[j * k + p] = b_kn[p * n + j];
                }
            }
            for packed in [
                PackedB::from_cols(&b_kn, k, n),
                PackedB::from_rows(&b_nk, n, k),
            ] {
                let ldc = n + 3;
                let mut c = vec![f32::NAN; m * ldc];
                gemm(&a, m, k, &packed, &mut c, ldc);
                for i in 0..m {
                    for j in 0..n {
                        let (got, want) = (c[i * ldc + j] as f64, want[i * n + j]);
                        // f32 accumulation of k exact products: |error| ≤ k · 2⁻²⁴ · Σ|terms|,
                        // bounded here by k · 2⁻²⁴ · k (|values| ≤ 1).
                        let bound = (k * k) as f64 * 2f64.powi(-24) + 1e-30;
                        assert!(
                            (got - want).abs() <= bound,
                            "({m},{k},{n}) [{i},{j}] {got} vs {want}"
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
