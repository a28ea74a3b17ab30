//! The AVX2/F16C kernels. Each is a `#[target_feature]` function: the caller must know the CPU has
//! AVX2 and F16C. Slices are checked up front; the loads and stores stay inside the checked blocks.

use std::arch::x86_64::*;

/// The little-endian f16 at `b[at..at + 2]` as f32, converted by F16C (exact, as the scalar path).
#[inline]
#[target_feature(enable = "f16c")]
fn f16_le(b: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([b[at], b[at + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Widens 16 signed bytes to two vectors of 8 floats (exact).
#[inline]
#[target_feature(enable = "avx2")]
fn i8x16_to_f32(v: __m128i) -> (__m256, __m256) {
    let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(v)));
    (lo, hi)
}

/// Widens 32 signed bytes to four vectors of 8 floats (exact), in element order.
#[inline]
#[target_feature(enable = "avx2")]
fn i8x32_to_f32(v: __m256i) -> [__m256; 4] {
    let (a, b) = i8x16_to_f32(_mm256_castsi256_si128(v));
    let (c, d) = i8x16_to_f32(_mm256_extracti128_si256::<1>(v));
    [a, b, c, d]
}

/// Stores 8 floats at `y[at..at + 8]`.
#[inline]
#[target_feature(enable = "avx")]
fn store8(y: &mut [f32], at: usize, v: __m256) {
    let dst = &mut y[at..at + 8];
    // SAFETY: `dst` is exactly 8 in-bounds floats; the store is unaligned.
    unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), v) }
}

/// Loads 16 bytes from `b[at..at + 16]`.
#[inline]
#[target_feature(enable = "sse2")]
fn load16(b: &[u8], at: usize) -> __m128i {
    let src = &b[at..at + 16];
    // SAFETY: `src` is exactly 16 in-bounds bytes; the load is unaligned.
    unsafe { _mm_loadu_si128(src.as_ptr().cast()) }
}

/// Loads 32 bytes from `b[at..at + 32]`.
#[inline]
#[target_feature(enable = "avx")]
fn load32(b: &[u8], at: usize) -> __m256i {
    let src = &b[at..at + 32];
    // SAFETY: `src` is exactly 32 in-bounds bytes; the load is unaligned.
    unsafe { _mm256_loadu_si256(src.as_ptr().cast()) }
}

fn check(bytes: &[u8], out: &[f32], block_bytes: usize, block_elems: usize) {
    assert!(
        bytes.len().is_multiple_of(block_bytes)
            && out.len() == bytes.len() / block_bytes * block_elems,
        "dequantize: {} bytes do not fill {} values",
        bytes.len(),
        out.len()
    );
}

#[target_feature(enable = "avx2,f16c")]
pub(super) fn f16(bytes: &[u8], out: &mut [f32]) {
    check(bytes, out, 2, 1);
    let mut src = bytes.chunks_exact(16);
    let mut dst = out.chunks_exact_mut(8);
    for (s, d) in (&mut src).zip(&mut dst) {
        store8(d, 0, _mm256_cvtph_ps(load16(s, 0)));
    }
    crate::float::dequantize_f16(src.remainder(), dst.into_remainder());
}

/// Q4_0/Q4_1 nibbles: 16 bytes → 32 levels (elements 0..16 low nibbles, 16..32 high), minus `offset`.
#[inline]
#[target_feature(enable = "avx2")]
fn nibbles32(b: &[u8], at: usize, offset: i8) -> __m256i {
    let qs = load16(b, at);
    let m4 = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(qs, m4);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), m4);
    _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(offset))
}

/// Q5 high bits: bit e of `qh` → 0x10 in byte e.
#[inline]
#[target_feature(enable = "avx2")]
fn qh_bits32(qh: u32) -> __m256i {
    let spread = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let v = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), spread);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

#[inline]
fn qh_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Stores levels * d (+ m) for one 32-value block: a multiply, then an add (never fused).
#[inline]
#[target_feature(enable = "avx2")]
fn store_block(y: &mut [f32], q: __m256i, d: f32, m: Option<f32>) {
    let dv = _mm256_set1_ps(d);
    for (k, f) in i8x32_to_f32(q).into_iter().enumerate() {
        let v = _mm256_mul_ps(f, dv);
        let v = match m {
            Some(m) => _mm256_add_ps(v, _mm256_set1_ps(m)),
            None => v,
        };
        store8(y, 8 * k, v);
    }
}

#[target_feature(enable = "avx2,f16c")]
pub(super) fn q8_0(bytes: &[u8], out: &mut [f32]) {
    check(bytes, out, 34, 32);
    for (b, y) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
        store_block(y, load32(b, 2), f16_le(b, 0), None);
    }
}

#[target_feature(enable = "avx2,f16c")]
pub(super) fn q4_0(bytes: &[u8], out: &mut [f32]) {
    check(bytes, out, 18, 32);
    for (b, y) in bytes.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
        store_block(y, nibbles32(b, 2, 8), f16_le(b, 0), None);
    }
}

#[target_feature(enable = "avx2,f16c")]
pub(super) fn q4_1(bytes: &[u8], out: &mut [f32]) {
    check(bytes, out, 20, 32);
    for (b, y) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
        store_block(y, nibbles32(b, 4, 0), f16_le(b, 0), Some(f16_le(b, 2)));
    }
}

#[target_feature(enable = "avx2,f16c")]
pub(super) fn q5_0(bytes: &[u8], out: &mut [f32]) {
    check(bytes, out, 22, 32);
    for (b, y) in bytes.chunks_exact(22).zip(out.chunks_exact_mut(32)) {
        let q = _mm256_or_si256(nibbles32(b, 6, 0), qh_bits32(qh_le(b, 2)));
        let q = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
        store_block(y, q, f16_le(b, 0), None);
    }
}

#[target_feature(enable = "avx2,f16c")]
pub(super) fn q5_1(bytes: &[u8], out: &mut [f32]) {
    check(bytes, out, 24, 32);
    for (b, y) in bytes.chunks_exact(24).zip(out.chunks_exact_mut(32)) {
        let q = _mm256_or_si256(nibbles32(b, 8, 0), qh_bits32(qh_le(b, 4)));
        store_block(y, q, f16_le(b, 0), Some(f16_le(b, 2)));
    }
}

#[target_feature(enable = "avx2,f16c")]
pub(super) fn q4_k(bytes: &[u8], out: &mut [f32]) {
    check(bytes, out, 144, 256);
    let m4 = _mm256_set1_epi8(0x0F);
    for (b, y) in bytes.chunks_exact(144).zip(out.chunks_exact_mut(256)) {
        let (d, dmin) = (f16_le(b, 0), f16_le(b, 2));
        for c in 0..4 {
            let qs = load32(b, 16 + 32 * c);
            let halves = [
                _mm256_and_si256(qs, m4),
                _mm256_and_si256(_mm256_srli_epi16::<4>(qs), m4),
            ];
            for (k, q) in halves.into_iter().enumerate() {
                let (sc, m) = crate::kquants::scale_min_k4(2 * c + k, &b[4..16]);
                let d1 = _mm256_set1_ps(d * sc as f32);
                let m1 = _mm256_set1_ps(dmin * m as f32);
                for (g, f) in i8x32_to_f32(q).into_iter().enumerate() {
                    store8(
                        y,
                        64 * c + 32 * k + 8 * g,
                        _mm256_sub_ps(_mm256_mul_ps(f, d1), m1),
                    );
                }
            }
        }
    }
}

#[target_feature(enable = "avx2,f16c")]
pub(super) fn q6_k(bytes: &[u8], out: &mut [f32]) {
    check(bytes, out, 210, 256);
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x03);
    let bias = _mm256_set1_epi8(32);
    for (b, y) in bytes.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
        let d = f16_le(b, 208);
        for h in 0..2 {
            let ql_a = load32(b, 64 * h);
            let ql_b = load32(b, 64 * h + 32);
            let qh = load32(b, 128 + 32 * h);
            let high = |shift: i32| {
                let bits = match shift {
                    0 => qh,
                    2 => _mm256_srli_epi16::<2>(qh),
                    4 => _mm256_srli_epi16::<4>(qh),
                    _ => _mm256_srli_epi16::<6>(qh),
                };
                _mm256_slli_epi16::<4>(_mm256_and_si256(bits, m2))
            };
            let quarters = [
                _mm256_or_si256(_mm256_and_si256(ql_a, m4), high(0)),
                _mm256_or_si256(_mm256_and_si256(ql_b, m4), high(2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql_a), m4), high(4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql_b), m4), high(6)),
            ];
            for (qtr, q) in quarters.into_iter().enumerate() {
                let q = _mm256_sub_epi8(q, bias);
                for (g, f) in i8x32_to_f32(q).into_iter().enumerate() {
                    let e = 128 * h + 32 * qtr + 8 * g;
                    let ds = _mm256_set1_ps(d * b[192 + e / 16] as i8 as f32);
                    store8(y, e, _mm256_mul_ps(f, ds));
                }
            }
        }
    }
}
