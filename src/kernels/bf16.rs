//! bf16 weight products: weights and activations rounded to bf16 (round to nearest even), products
//! accumulated in f32.
//!
//! A product of two bf16 values (8-bit significands) is exact in f32 (24 bits), so rounding both
//! operands and running the f32 GEMM computes the bf16 products with f32 accumulation, the
//! arithmetic of `vdpbf16ps` up to the order of the f32 additions. This is the path on CPUs
//! without AVX-512 BF16 (never faster than f32, and `auto` never picks it there); where the CPU
//! multiplies bf16 itself (AMX tiles, or `vdpbf16ps`: `amx::runs`) the products run on packed bf16
//! operands instead (`kernels::amx`). The rounding has a scalar and an AVX2 version with the same
//! bits.
//!
//! Memory: the weight panel is rounded in place; the activations are rounded in row chunks of at
//! most one panel budget, the second panel `Scratch::peak_bytes` counts, so the peak is no higher
//! than f32's.

use rayon::prelude::*;

use super::matmul::{matmul_strided, Transpose};
use super::panel::WeightRows;
use super::precision::Isa;
use super::scratch::{longest_piece, pieces, MIN_SPLIT};
use crate::tensor::zeroed;

/// `v` rounded to the nearest bf16 (ties to even), as an f32. NaN stays NaN (quiet), infinities
/// stay, values rounding past the largest bf16 become infinite (IEEE rounding).
#[inline]
pub fn round_scalar(v: f32) -> f32 {
    let bits = v.to_bits();
    if v.is_nan() {
        return f32::from_bits((bits | 0x0040_0000) & 0xFFFF_0000);
    }
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1));
    f32::from_bits(rounded & 0xFFFF_0000)
}

/// Rounds every value of `x` to bf16 in place.
pub fn round_in_place(x: &mut [f32], isa: Isa) {
    const VALUES_PER_TASK: usize = 1 << 14;
    x.par_chunks_mut(VALUES_PER_TASK).for_each(|x| match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 | Isa::Amx => {
            // SAFETY: `isa` is at or below what this CPU runs (`Isa::parse`/`Isa::detected`).
            unsafe { round_avx2(x) }
        }
        _ => x.iter_mut().for_each(|v| *v = round_scalar(*v)),
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn round_avx2(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = x.chunks_exact_mut(8);
    let (bias, one, high, quiet) = (
        _mm256_set1_epi32(0x7FFF),
        _mm256_set1_epi32(1),
        _mm256_set1_epi32(0xFFFF_0000u32 as i32),
        _mm256_set1_epi32(0x0040_0000),
    );
    for c in &mut chunks {
        let v = _mm256_loadu_ps(c.as_ptr());
        let bits = _mm256_castps_si256(v);
        let lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
        let rounded = _mm256_add_epi32(bits, _mm256_add_epi32(bias, lsb));
        let nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        let quieted = _mm256_or_si256(bits, quiet);
        let pick = _mm256_blendv_epi8(rounded, quieted, nan);
        _mm256_storeu_ps(
            c.as_mut_ptr(),
            _mm256_castsi256_ps(_mm256_and_si256(pick, high)),
        );
    }
    for v in chunks.into_remainder() {
        *v = round_scalar(*v);
    }
}

/// `y[m, n] = bf16(x[m, k]) · bf16(W)ᵀ` with f32 accumulation, W read in panels and x rounded in
/// row chunks, each within `budget` values. The same splits as the f32 path (`scratch::pieces`),
/// so the bits do not depend on the budget.
pub fn matmul_weight_t(x: &[f32], w: &dyn WeightRows, y: &mut [f32], budget: usize, isa: Isa) {
    let (n, k) = (w.rows(), w.row_len());
    let m = x.len() / k.max(1);
    assert_eq!(m * k, x.len(), "input width");
    assert_eq!(y.len(), m * n, "output size");
    if m == 0 || n == 0 {
        return;
    }
    if super::amx::runs(isa) {
        return packed(x, w, y, budget, isa);
    }
    let step = (budget / k.max(1)).clamp(1, n);
    let x_step = (budget / k.max(1)).max(1);
    let mut panel = zeroed(longest_piece(n, step, MIN_SPLIT) * k);
    let mut chunk = zeroed(longest_piece(m, x_step, MIN_SPLIT) * k);
    let x_chunks: Vec<_> = pieces(m, x_step, MIN_SPLIT).collect();
    let panels: Vec<_> = pieces(n, step, MIN_SPLIT).collect();
    let read = |range: &std::ops::Range<usize>, panel: &mut [f32]| {
        w.read_rows(range.start, range.len(), panel);
        round_in_place(panel, isa);
    };
    if panels.len() == 1 {
        read(&panels[0], &mut panel[..n * k]);
    }
    for rows in &x_chunks {
        let chunk = &mut chunk[..rows.len() * k];
        chunk.copy_from_slice(&x[rows.start * k..rows.end * k]);
        round_in_place(chunk, isa);
        for range in &panels {
            let panel = &mut panel[..range.len() * k];
            if panels.len() > 1 {
                read(range, panel);
            }
            let y = &mut y[rows.start * n + range.start..];
            matmul_strided(
                chunk,
                panel,
                y,
                n,
                rows.len(),
                k,
                range.len(),
                Transpose::Yes,
                false,
            );
        }
    }
}

/// The same product on packed bf16 operands (`kernels::amx`: AMX tiles, or AVX-512 BF16's
/// `vdpbf16ps`): each weight panel packed to bf16 (half an f32 panel's bytes) straight from the
/// stored rows, the activations converted in the product's tasks.
fn packed(x: &[f32], w: &dyn WeightRows, y: &mut [f32], budget: usize, isa: Isa) {
    let (n, k) = (w.rows(), w.row_len());
    let m = x.len() / k;
    let step = (budget / k.max(1)).clamp(1, n);
    for range in pieces(n, step, MIN_SPLIT) {
        let packed = super::amx::PackedB::from_weight(w, range.start, range.len());
        super::amx::gemm(isa, x, m, k, &packed, &mut y[range.start..], n);
    }
}

/// Bytes the bf16 path holds at once: one f32 panel and one rounded activation chunk.
pub fn scratch_bytes(m: usize, k: usize, n: usize, budget: usize) -> u64 {
    let step = (budget / k.max(1)).max(1);
    let rows = longest_piece(n, step.min(n.max(1)), MIN_SPLIT) + longest_piece(m, step, MIN_SPLIT);
    rows as u64 * k as u64 * 4
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::panel::DenseRows;

    #[test]
    fn rounding_is_to_nearest_even_and_both_isas_agree() {
        let mut v: Vec<f32> = (0..10_000)
            .map(|i| f32::from_bits(0x3F80_0000u32.wrapping_add(i * 0x1_2345)))
            .collect();
        v.extend([
            f32::NAN,
            f32::INFINITY,
            -f32::INFINITY,
            f32::MAX,
            0.0,
            -0.0,
            f32::from_bits(0x3F80_8000), // a tie, rounds down to even
            f32::from_bits(0x3F81_8000), // a tie, rounds up to even
            1e-40,
        ]);
        for &x in &v {
            let want = half::bf16::from_f32(x).to_f32();
            let got = round_scalar(x);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{x:e}"
            );
        }
        let mut scalar = v.clone();
        round_in_place(&mut scalar, Isa::Scalar);
        if Isa::detected() >= Isa::Avx2 {
            let mut simd = v.clone();
            round_in_place(&mut simd, Isa::Avx2);
            let bits = |s: &[f32]| s.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&scalar), bits(&simd));
        }
    }

    #[test]
    fn product_is_the_rounded_operands_product_for_any_budget() {
        let (m, k, n) = (140, 96, 130);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.3)
            .collect();
        let wv: Vec<f32> = (0..n * k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 9.1)
            .collect();
        let w = DenseRows { data: &wv, rows: n };
        let mut want = vec![0.0; m * n];
        matmul_weight_t(&x, &w, &mut want, usize::MAX, Isa::Scalar);
        for r in 0..m {
            for c in 0..n {
                let exact: f64 = (0..k)
                    .map(|e| round_scalar(x[r * k + e]) as f64 * round_scalar(wv[c * k + e]) as f64)
                    .sum();
                let mag: f64 = (0..k)
                    .map(|e| (x[r * k + e] * wv[c * k + e]).abs() as f64)
                    .sum();
                assert!((want[r * n + c] as f64 - exact).abs() <= 1e-6 * mag);
            }
        }
        let rounding = Isa::detected().min(Isa::Avx2);
        for budget in [1, 65 * k, 100 * k] {
            let mut got = vec![0.0; m * n];
            matmul_weight_t(&x, &w, &mut got, budget, rounding);
            assert!(got == want, "budget {budget}");
        }
        // Packed bf16 kernels (AMX tiles, `vdpbf16ps`): the same products added in another order
        // (same 1e-6 bound), and the same bits under every panel budget.
        for isa in [Isa::Amx, Isa::Avx512] {
            if !crate::kernels::amx::runs(isa) {
                continue;
            }
            let mut packed = vec![0.0; m * n];
            matmul_weight_t(&x, &w, &mut packed, usize::MAX, isa);
            for r in 0..m {
                for c in 0..n {
                    let mag: f64 = (0..k)
                        .map(|e| (x[r * k + e] * wv[c * k + e]).abs() as f64)
                        .sum();
                    let diff = (packed[r * n + c] as f64 - want[r * n + c] as f64).abs();
                    assert!(diff <= 2e-6 * mag, "{isa:?} [{r},{c}]");
                }
            }
            for budget in [1, 65 * k] {
                let mut got = vec![0.0; m * n];
                matmul_weight_t(&x, &w, &mut got, budget, isa);
                assert!(got == packed, "{isa:?}, budget {budget}");
            }
        }
        assert!(scratch_bytes(m, k, n, 65 * k) <= 2 * 4 * (65 * k + 65 * k) as u64);
    }
}
