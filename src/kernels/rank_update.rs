//! `out[i, :] += Σ_j left[i, j] · right[j, :]` for a few rows and a small inner dimension (a LoRA's
//! rank): the rows of ΔW = up·down added to a weight panel as the products read it (`lora`).
//!
//! Every value is summed over `j` in order, starting from the value already in `out`: with FMA,
//! `o = fma(left[i, j], right[j, c], o)`, on every level alike (AVX-512 and AVX2 give the same bits,
//! so a row's value does not depend on the CPU's width or on how rows are grouped); the scalar
//! level multiplies and adds. The vector kernels hold a block of rows × columns in registers for
//! the whole sum, so `out` is read and written once and `right` once per block of rows.

use super::Isa;

/// `out` [rows, len] += `left` [rows, r] · `right` [r, len], each value fused and in `j` order (see
/// the module doc), with the instructions of `isa` (at most `Isa::detected()`).
pub fn add_product_rows(out: &mut [f32], left: &[f32], right: &[f32], r: usize, isa: Isa) {
    let len = right.len() / r.max(1);
    assert_eq!(right.len(), r * len, "rank update: right");
    let rows = out.len() / len.max(1);
    assert_eq!(out.len(), rows * len, "rank update: out");
    assert_eq!(left.len(), rows * r, "rank update: left");
    if len == 0 || r == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        assert!(
            isa <= Isa::detected(),
            "rank update: {isa:?} not on this CPU"
        );
        // SAFETY: the CPU has the level's instructions (asserted above); every pointer offset
        // the kernels form stays inside the slices checked above.
        if isa >= Isa::Avx512 {
            return unsafe { x86::rows_avx512(out, left, right, r, len) };
        }
        if isa >= Isa::Avx2 {
            return unsafe { x86::rows_avx2(out, left, right, r, len) };
        }
    }
    let _ = isa;
    for (o, l) in out.chunks_mut(len).zip(left.chunks(r)) {
        for (j, &l) in l.iter().enumerate() {
            for (o, &v) in o.iter_mut().zip(&right[j * len..(j + 1) * len]) {
                *o += l * v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The columns `from..` of each row, one value at a time (the blocks' tail), fused as they are.
    #[target_feature(enable = "fma")]
    unsafe fn tail(
        out: &mut [f32],
        left: &[f32],
        right: &[f32],
        r: usize,
        len: usize,
        from: usize,
    ) {
        for (o, l) in out.chunks_mut(len).zip(left.chunks(r)) {
            for c in from..len {
                let mut acc = o[c];
                for (j, &l) in l.iter().enumerate() {
                    acc = l.mul_add(right[j * len + c], acc);
                }
                o[c] = acc;
            }
        }
    }

    macro_rules! blocks {
        ($name:ident, $feature:literal, $vec:ty, $lanes:expr, $rows:expr,
         $load:ident, $store:ident, $set1:ident, $fma:ident) => {
            /// Rows in blocks of `$rows` (fewer at the end), columns in blocks of two vectors.
            #[target_feature(enable = $feature)]
            pub unsafe fn $name(
                out: &mut [f32],
                left: &[f32],
                right: &[f32],
                r: usize,
                len: usize,
            ) {
                const W: usize = 2 * $lanes;
                let cols = len / W * W;
                let rows = out.len() / len;
                for first in (0..rows).step_by($rows) {
                    let n = $rows.min(rows - first);
                    let o = out.as_mut_ptr().add(first * len);
                    let l = &left[first * r..(first + n) * r];
                    for c in (0..cols).step_by(W) {
                        let mut acc: [[$vec; 2]; $rows] = [[$set1(0.0); 2]; $rows];
                        for (i, a) in acc.iter_mut().enumerate().take(n) {
                            a[0] = $load(o.add(i * len + c));
                            a[1] = $load(o.add(i * len + c + $lanes));
                        }
                        for j in 0..r {
                            let v = right.as_ptr().add(j * len + c);
                            let (v0, v1) = ($load(v), $load(v.add($lanes)));
                            for (i, a) in acc.iter_mut().enumerate().take(n) {
                                let b = $set1(*l.get_unchecked(i * r + j));
                                a[0] = $fma(b, v0, a[0]);
                                a[1] = $fma(b, v1, a[1]);
                            }
                        }
                        for (i, a) in acc.iter().enumerate().take(n) {
                            $store(o.add(i * len + c), a[0]);
                            $store(o.add(i * len + c + $lanes), a[1]);
                        }
                    }
                    let block = &mut out[first * len..(first + n) * len];
                    tail(block, l, right, r, len, cols);
                }
            }
        };
    }

    blocks!(
        rows_avx2,
        "avx2,fma",
        __m256,
        8,
        4,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps
    );
    blocks!(
        rows_avx512,
        "avx512f,fma",
        __m512,
        16,
        8,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * seed % 97) as f32 - 48.0) / 13.0)
            .collect()
    }

    /// Each vector level gives the fused definition's bits exactly, for row counts and lengths
    /// that leave partial row blocks and column tails; the scalar level is within rounding of it.
    #[test]
    fn every_level_is_the_fused_sum_in_order() {
        for (rows, r, len) in [
            (1, 1, 1),
            (3, 4, 17),
            (8, 32, 320),
            (11, 7, 67),
            (5, 32, 2880),
        ] {
            let (left, right) = (values(rows * r, 7), values(r * len, 11));
            let base = values(rows * len, 5);
            let (mut want, mut magnitude) = (base.clone(), base.clone());
            for i in 0..rows {
                for c in 0..len {
                    for j in 0..r {
                        let (l, v) = (left[i * r + j], right[j * len + c]);
                        want[i * len + c] = l.mul_add(v, want[i * len + c]);
                        magnitude[i * len + c] = magnitude[i * len + c].abs() + (l * v).abs();
                    }
                }
            }
            for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
                if isa > Isa::detected() {
                    continue;
                }
                let mut got = base.clone();
                add_product_rows(&mut got, &left, &right, r, isa);
                for ((g, w), m) in got.iter().zip(&want).zip(&magnitude) {
                    match isa {
                        // Unfused: one more rounding per term, r + 1 terms of at most `m`.
                        Isa::Scalar => {
                            assert!((g - w).abs() <= 2.0 * (r + 1) as f32 * f32::EPSILON * m)
                        }
                        _ => assert_eq!(g.to_bits(), w.to_bits(), "{isa:?} {rows}×{r}×{len}"),
                    }
                }
            }
        }
    }
}
