//! Matrix multiply through the `gemm` crate (the dependency chosen by measurement, DESIGN.md).

/// Whether the right-hand matrix is stored transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transpose {
    /// `b` is [k, n] row-major.
    No,
    /// `b` is [n, k] row-major (a PyTorch linear weight), used as its transpose.
    Yes,
}

/// `c[m,n] (+)= a[m,k] · b` where `b` is [k,n] or, with `Transpose::Yes`, [n,k].
/// `accumulate` adds to the existing `c` instead of overwriting it.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    b_layout: Transpose,
    accumulate: bool,
) {
    assert_eq!(c.len(), m * n, "dst size");
    matmul_strided(a, b, c, n, m, k, n, b_layout, accumulate);
}

/// `c[m,n] = a[m,k] · b[k,n]` on the calling thread with explicit strides: `a[i, p]` is
/// `a[i·a_rs + p·a_cs]` (row-major or column-major), and rows of `b` and `c` start at multiples of
/// `ldb` and `ldc` (matrices interleaved in one buffer, as Winograd's per-point products are).
pub(crate) fn matmul_single_thread_strided(
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, ldb): (&[f32], usize),
    (c, ldc): (&mut [f32], usize),
    (m, k, n): (usize, usize, usize),
) {
    assert!(ldb >= n && ldc >= n, "row strides");
    let empty = m == 0 || n == 0 || k == 0;
    assert!(
        empty || a.len() > (m - 1) * a_rs + (k - 1) * a_cs,
        "lhs size"
    );
    assert!(empty || b.len() >= (k - 1) * ldb + n, "rhs size");
    assert!(m == 0 || n == 0 || c.len() >= (m - 1) * ldc + n, "dst size");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for row in c.chunks_mut(ldc).take(m) {
            row[..n].fill(0.0);
        }
        return;
    }
    // SAFETY: the asserts above guarantee every index gemm touches (a at i·a_rs + p·a_cs for
    // i < m, p < k; b at p·ldb + j, j < n; c at i·ldc + j) lies inside the slices; `c` is borrowed
    // mutably, so nothing aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            1,
            ldb as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// As `matmul`, but row `i` of `c` starts at `i * ldc` (a column block of a wider matrix).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_strided(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
    m: usize,
    k: usize,
    n: usize,
    b_layout: Transpose,
    accumulate: bool,
) {
    gemm_checked(a, b, c, ldc, (m, k, n), b_layout, accumulate);
}

#[allow(clippy::too_many_arguments)]
fn gemm_checked(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
    (m, k, n): (usize, usize, usize),
    b_layout: Transpose,
    accumulate: bool,
) {
    assert_eq!(a.len(), m * k, "lhs size");
    assert_eq!(b.len(), k * n, "rhs size");
    assert!(
        ldc >= n && (m == 0 || c.len() >= (m - 1) * ldc + n),
        "dst size"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in c.chunks_mut(ldc).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    // Strides in elements: (column stride, row stride).
    let (b_cs, b_rs) = match b_layout {
        Transpose::No => (1isize, n as isize),
        Transpose::Yes => (k as isize, 1isize),
    };
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 && m * n * k >= 1 << 16 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above guarantee every index gemm touches (rows < m, n, k with the given
    // strides) lies inside `a`, `b` and `c`; `c` is borrowed mutably, so nothing aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, t: Transpose) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let bv = match t {
                        Transpose::No => b[p * n + j],
                        Transpose::Yes => b[j * k + p],
                    };
                    s += a[i * k + p] as f64 * bv as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn matches_naive_both_layouts_and_accumulates() {
        let (m, k, n) = (37, 53, 29);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
            .collect();
        for t in [Transpose::No, Transpose::Yes] {
            let want = naive(&a, &b, m, k, n, t);
            let mut c = vec![1.0; m * n];
            matmul(&a, &b, &mut c, m, k, n, t, false);
            // f32 accumulation over 53 terms of size ~2: 1e-4 absolute is generous and still catches
            // any layout or stride mistake (those give errors of order 1).
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4, "{x} vs {y}");
            }
            matmul(&a, &b, &mut c, m, k, n, t, true);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - 2.0 * y).abs() < 2e-4);
            }
        }
    }
}
