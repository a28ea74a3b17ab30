//! The 32-value block formats: q4_0, q4_1, q5_0, q5_1, q8_0.
//!
//! Nibble layout (q4/q5): byte j of `qs` holds element j in its low nibble and element j+16 in its high
//! nibble; q5's fifth bits are the little-endian u32 `qh`, bit e for element e.

use crate::float::{f16_le, put_f16_le};
use crate::search::{make_qkx_quants, make_qx_quants, MinSearch};

const QK: usize = 32;

#[inline]
fn qh_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The absolute maximum with its sign (first one on ties), as GGML's q4_0/q5_0 pick it.
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// C's `(int8_t)f` on x86: truncate toward zero, keep the low byte.
#[inline]
fn trunc_i8(v: f32) -> i32 {
    v as i32 as i8 as i32
}

/// Packs 32 levels (5 bits used) into `qs[16]` + the u32 `qh` at `qh_at`.
fn pack_q5(levels: &[u8; QK], blk: &mut [u8], qh_at: usize, qs_at: usize) {
    let mut qh = 0u32;
    for j in 0..16 {
        let (a, b) = (levels[j], levels[j + 16]);
        blk[qs_at + j] = (a & 0x0F) | ((b & 0x0F) << 4);
        qh |= (((a & 0x10) >> 4) as u32) << j;
        qh |= (((b & 0x10) >> 4) as u32) << (j + 16);
    }
    blk[qh_at..qh_at + 4].copy_from_slice(&qh.to_le_bytes());
}

fn pack_q4(levels: &[u8; QK], qs: &mut [u8]) {
    for j in 0..16 {
        qs[j] = levels[j] | (levels[j + 16] << 4);
    }
}

// ---- dequantize ----

pub(crate) fn dequantize_q4_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(18).zip(out.chunks_exact_mut(QK)) {
        let d = f16_le(b, 0);
        for j in 0..16 {
            y[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32 * d;
            y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

pub(crate) fn dequantize_q4_1(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (f16_le(b, 0), f16_le(b, 2));
        for j in 0..16 {
            y[j] = (b[4 + j] & 0x0F) as f32 * d + m;
            y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
        }
    }
}

pub(crate) fn dequantize_q5_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(22).zip(out.chunks_exact_mut(QK)) {
        let d = f16_le(b, 0);
        let qh = qh_le(b, 2);
        for j in 0..16 {
            let lo = (b[6 + j] & 0x0F) as u32 | ((qh >> j) & 1) << 4;
            let hi = (b[6 + j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
            y[j] = (lo as i32 - 16) as f32 * d;
            y[j + 16] = (hi as i32 - 16) as f32 * d;
        }
    }
}

pub(crate) fn dequantize_q5_1(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(24).zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (f16_le(b, 0), f16_le(b, 2));
        let qh = qh_le(b, 4);
        for j in 0..16 {
            let lo = (b[8 + j] & 0x0F) as u32 | ((qh >> j) & 1) << 4;
            let hi = (b[8 + j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
            y[j] = lo as f32 * d + m;
            y[j + 16] = hi as f32 * d + m;
        }
    }
}

pub(crate) fn dequantize_q8_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(QK)) {
        let d = f16_le(b, 0);
        for (o, &q) in y.iter_mut().zip(&b[2..34]) {
            *o = q as i8 as f32 * d;
        }
    }
}

// ---- reference quantizers (GGML `quantize_row_*_ref`) ----

pub(crate) fn quantize_q4_0(values: &[f32], out: &mut [u8]) {
    for (x, b) in values.chunks_exact(QK).zip(out.chunks_exact_mut(18)) {
        let d = signed_absmax(x) / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        put_f16_le(b, 0, d);
        let mut levels = [0u8; QK];
        for (lv, &v) in levels.iter_mut().zip(x) {
            *lv = trunc_i8(v * id + 8.5).min(15) as u8;
        }
        pack_q4(&levels, &mut b[2..18]);
    }
}

pub(crate) fn quantize_q4_1(values: &[f32], out: &mut [u8]) {
    for (x, b) in values.chunks_exact(QK).zip(out.chunks_exact_mut(20)) {
        let (min, max) = min_max(x);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        put_f16_le(b, 0, d);
        put_f16_le(b, 2, min);
        let mut levels = [0u8; QK];
        for (lv, &v) in levels.iter_mut().zip(x) {
            *lv = trunc_i8((v - min) * id + 0.5).min(15) as u8;
        }
        pack_q4(&levels, &mut b[4..20]);
    }
}

pub(crate) fn quantize_q5_0(values: &[f32], out: &mut [u8]) {
    for (x, b) in values.chunks_exact(QK).zip(out.chunks_exact_mut(22)) {
        let d = signed_absmax(x) / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        put_f16_le(b, 0, d);
        let mut levels = [0u8; QK];
        for (lv, &v) in levels.iter_mut().zip(x) {
            *lv = trunc_i8(v * id + 16.5).min(31) as u8;
        }
        pack_q5(&levels, b, 2, 6);
    }
}

pub(crate) fn quantize_q5_1(values: &[f32], out: &mut [u8]) {
    for (x, b) in values.chunks_exact(QK).zip(out.chunks_exact_mut(24)) {
        let (min, max) = min_max(x);
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        put_f16_le(b, 0, d);
        put_f16_le(b, 2, min);
        let mut levels = [0u8; QK];
        for (lv, &v) in levels.iter_mut().zip(x) {
            // GGML casts straight to uint8_t here, without the min(31).
            *lv = ((v - min) * id + 0.5) as i32 as u8;
        }
        pack_q5(&levels, b, 4, 8);
    }
}

pub(crate) fn quantize_q8_0(values: &[f32], out: &mut [u8]) {
    for (x, b) in values.chunks_exact(QK).zip(out.chunks_exact_mut(34)) {
        let amax = x
            .iter()
            .fold(0.0f32, |a, v| if a > v.abs() { a } else { v.abs() });
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        put_f16_le(b, 0, d);
        for (q, &v) in b[2..].iter_mut().zip(x) {
            // roundf: half away from zero.
            *q = (v * id).round() as i32 as i8 as u8;
        }
    }
}

// ---- stable-diffusion.cpp's quantizers (GGML `quantize_row_*_impl`, unit importance) ----

/// GGML's per-value weight with a unit importance matrix: sqrt(mean square of the row + x²).
fn row_weights(row: &[f32]) -> impl Fn(&[f32], &mut [f32; QK]) {
    let mut sum_x2 = 0.0f32;
    for &v in row {
        sum_x2 += v * v;
    }
    let sigma2 = sum_x2 / row.len() as f32;
    move |x, w| {
        for (wi, &v) in w.iter_mut().zip(x) {
            *wi = (sigma2 + v * v).sqrt();
        }
    }
}

const QKX3: MinSearch = MinSearch {
    rmin: -0.9,
    rdelta: 0.05,
    nstep: 36,
    use_mad: false,
};

pub(crate) fn quantize_q4_0_quality(values: &[f32], out: &mut [u8]) {
    let weights_of = row_weights(values);
    let mut w = [0.0f32; QK];
    for (x, b) in values.chunks_exact(QK).zip(out.chunks_exact_mut(18)) {
        weights_of(x, &mut w);
        let mut l = [0i8; QK];
        let d = make_qx_quants(8, x, &mut l, Some(&w));
        put_f16_le(b, 0, d);
        pack_q4(&l.map(|v| v as u8), &mut b[2..18]);
    }
}

pub(crate) fn quantize_q4_1_quality(values: &[f32], out: &mut [u8]) {
    let weights_of = row_weights(values);
    let mut w = [0.0f32; QK];
    for (x, b) in values.chunks_exact(QK).zip(out.chunks_exact_mut(20)) {
        weights_of(x, &mut w);
        let mut l = [0u8; QK];
        let (d, min) = make_qkx_quants(15, x, &w, &mut l, &QKX3);
        put_f16_le(b, 0, d);
        put_f16_le(b, 2, -min);
        pack_q4(&l, &mut b[4..20]);
    }
}

pub(crate) fn quantize_q5_0_quality(values: &[f32], out: &mut [u8]) {
    let weights_of = row_weights(values);
    let mut w = [0.0f32; QK];
    for (x, b) in values.chunks_exact(QK).zip(out.chunks_exact_mut(22)) {
        weights_of(x, &mut w);
        let mut l = [0i8; QK];
        let d = make_qx_quants(16, x, &mut l, Some(&w));
        put_f16_le(b, 0, d);
        pack_q5(&l.map(|v| v as u8), b, 2, 6);
    }
}

pub(crate) fn quantize_q5_1_quality(values: &[f32], out: &mut [u8]) {
    let weights_of = row_weights(values);
    let mut w = [0.0f32; QK];
    for (x, b) in values.chunks_exact(QK).zip(out.chunks_exact_mut(24)) {
        weights_of(x, &mut w);
        let mut l = [0u8; QK];
        let (d, min) = make_qkx_quants(31, x, &w, &mut l, &QKX3);
        put_f16_le(b, 0, d);
        put_f16_le(b, 2, -min);
        pack_q5(&l, b, 4, 8);
    }
}
