//! stable-diffusion.cpp's k-quant quantizers: GGML's `quantize_row_q*_K_impl` with an all-ones
//! importance matrix (sd.cpp's `convert` always passes one). Each value is weighted by
//! sqrt(sigma² + x²), sigma² from the 256-value super-block; sub-block scales and mins are then
//! themselves fitted (`make_qp_quants`) instead of being scaled to the largest.

use crate::float::put_f16_le;
use crate::kquants::{
    finish_q3, pack_2bit, pack_4bit_k, pack_5bit_k, pack_scale_min_k4, pack_scales_q3,
    quantize_q6_k_weighted, requantize_k4, requantize_q2, QK_K,
};
use crate::search::{make_qkx_quants, make_qp_quants, make_qx_quants, MinSearch};

const QKX3: MinSearch = MinSearch {
    rmin: -0.9,
    rdelta: 0.05,
    nstep: 36,
    use_mad: false,
};

fn sum_squares(x: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for &v in x {
        s += v * v;
    }
    s
}

/// Weights sqrt(sigma2 + x²) of one sub-block and their sum.
fn weights<const N: usize>(x: &[f32], sigma2: f32) -> ([f32; N], f32) {
    let w: [f32; N] = std::array::from_fn(|i| (sigma2 + x[i] * x[i]).sqrt());
    let mut sum = 0.0f32;
    for &v in &w {
        sum += v;
    }
    (w, sum)
}

pub(crate) fn quantize_q2_k_quality(values: &[f32], out: &mut [u8]) {
    for (x, b) in values.chunks_exact(QK_K).zip(out.chunks_exact_mut(84)) {
        let sigma2 = sum_squares(x) / QK_K as f32;
        let mut l = [0u8; QK_K];
        let (mut scales, mut mins, mut sw) = ([0.0f32; 16], [0.0f32; 16], [0.0f32; 16]);
        for j in 0..16 {
            let xs = &x[16 * j..16 * j + 16];
            let (w, sum) = weights::<16>(xs, sigma2);
            sw[j] = sum;
            (scales[j], mins[j]) = make_qkx_quants(3, xs, &w, &mut l[16 * j..16 * j + 16], &QKX3);
        }
        let (mut ls, mut lm) = ([0u8; 16], [0u8; 16]);
        let dm = make_qp_quants(15, &scales, &mut ls, &sw);
        let mm = make_qp_quants(15, &mins, &mut lm, &sw);
        put_f16_le(b, 80, dm);
        put_f16_le(b, 82, mm);
        for j in 0..16 {
            b[j] = ls[j] | (lm[j] << 4);
        }
        requantize_q2(x, b, &mut l);
        pack_2bit(&l, &mut b[16..80]);
    }
}

pub(crate) fn quantize_q3_k_quality(values: &[f32], out: &mut [u8]) {
    for (x, b) in values.chunks_exact(QK_K).zip(out.chunks_exact_mut(110)) {
        let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
        let mut l = [0i8; QK_K];
        let (mut scales, mut sw) = ([0.0f32; 16], [0.0f32; 16]);
        for j in 0..16 {
            let xs = &x[16 * j..16 * j + 16];
            let (w, sum) = weights::<16>(xs, sigma2);
            sw[j] = sum;
            scales[j] = make_qx_quants(4, xs, &mut l[16 * j..16 * j + 16], Some(&w));
        }
        let mut ls = [0i8; 16];
        let d_block = make_qx_quants(32, &scales, &mut ls, Some(&sw));
        pack_scales_q3(&ls.map(|v| v as i32), &mut b[96..108]);
        put_f16_le(b, 108, d_block);
        let mut l = l.map(|v| v as u8);
        finish_q3(x, b, &mut l);
    }
}

/// Q4_K/Q5_K: the weighted (scale, min) search per 32-value sub-block, then fitted 6-bit levels for
/// the scales and the mins. Leaves the levels of the search in `l`.
fn scales_mins_k4(x: &[f32], nmax: i32, clamp_63: bool, l: &mut [u8; QK_K], b: &mut [u8]) {
    let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
    let (mut scales, mut mins, mut sw) = ([0.0f32; 8], [0.0f32; 8], [0.0f32; 8]);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let (w, sum) = weights::<32>(xs, sigma2);
        sw[j] = sum;
        (scales[j], mins[j]) = make_qkx_quants(nmax, xs, &w, &mut l[32 * j..32 * j + 32], &QKX3);
    }
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    let d_block = make_qp_quants(63, &scales, &mut ls, &sw);
    let m_block = make_qp_quants(63, &mins, &mut lm, &sw);
    if clamp_63 {
        // GGML's q5_K applies this clamp, its q4_K does not (make_qp_quants already caps at 63).
        ls = ls.map(|v| v.min(63));
        lm = lm.map(|v| v.min(63));
    }
    pack_scale_min_k4(&ls, &lm, &mut b[4..16]);
    put_f16_le(b, 0, d_block);
    put_f16_le(b, 2, m_block);
}

pub(crate) fn quantize_q4_k_quality(values: &[f32], out: &mut [u8]) {
    for (x, b) in values.chunks_exact(QK_K).zip(out.chunks_exact_mut(144)) {
        let mut l = [0u8; QK_K];
        scales_mins_k4(x, 15, false, &mut l, b);
        requantize_k4(x, b, 15, &mut l);
        pack_4bit_k(&l, &mut b[16..144]);
    }
}

pub(crate) fn quantize_q5_k_quality(values: &[f32], out: &mut [u8]) {
    for (x, b) in values.chunks_exact(QK_K).zip(out.chunks_exact_mut(176)) {
        let mut l = [0u8; QK_K];
        scales_mins_k4(x, 31, true, &mut l, b);
        requantize_k4(x, b, 31, &mut l);
        let (qh, qs) = b[16..176].split_at_mut(32);
        pack_5bit_k(&l, qh, qs);
    }
}

pub(crate) fn quantize_q6_k_quality(values: &[f32], out: &mut [u8]) {
    quantize_q6_k_weighted(values, out, Some(&[1.0; 16]))
}
