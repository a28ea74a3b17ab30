//! The 256-value super-block formats (k-quants): layouts, dequantizers and GGML's reference quantizers.
//! stable-diffusion.cpp's quantizers for them are in `kquality.rs`.

use crate::float::{f16_le, put_f16_le};
use crate::search::{
    make_q3_quants, make_qkx_quants, make_qx_quants, nearest_int, signed_absmax, MinSearch,
    GROUP_MAX_EPS,
};

pub(crate) const QK_K: usize = 256;

/// Q4_K/Q5_K: the 6-bit (scale, min) of sub-block `j` (0..8) from the 12 packed bytes.
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K/Q5_K: packs eight 6-bit (scale, min) pairs into 12 bytes.
pub(crate) fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8], q: &mut [u8]) {
    for j in 0..8 {
        if j < 4 {
            q[j] = ls[j];
            q[j + 4] = lm[j];
        } else {
            q[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            q[j - 4] |= (ls[j] >> 4) << 6;
            q[j] |= (lm[j] >> 4) << 6;
        }
    }
}

/// Q3_K: the signed 6-bit scale of sub-block `j` (0..16).
#[inline]
pub(crate) fn scale_q3(j: usize, s: &[u8]) -> i32 {
    let low = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
    let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    (low | (high << 4)) as i32 - 32
}

/// Q3_K: packs sixteen 6-bit scales (already offset by 32) into 12 bytes.
pub(crate) fn pack_scales_q3(levels: &[i32; 16], s: &mut [u8]) {
    s[..12].fill(0);
    for (j, &l) in levels.iter().enumerate() {
        if j < 8 {
            s[j] = (l & 0xF) as u8;
        } else {
            s[j - 8] |= ((l & 0xF) << 4) as u8;
        }
        s[j % 4 + 8] |= ((l >> 4) << (2 * (j / 4))) as u8;
    }
}

/// 2-bit levels `l[256]` → 64 bytes: element 128h + 32j + i goes to bits 2j of byte 32h + i.
pub(crate) fn pack_2bit(l: &[u8], qs: &mut [u8]) {
    for h in 0..2 {
        for i in 0..32 {
            let e = 128 * h + i;
            qs[32 * h + i] = l[e] | (l[e + 32] << 2) | (l[e + 64] << 4) | (l[e + 96] << 6);
        }
    }
}

/// Q3_K's high bits: element e sets bit e/32 of `hmask[e % 32]`; returns the low 2-bit levels.
pub(crate) fn split_q3_high(l: &mut [u8; QK_K], hmask: &mut [u8]) {
    hmask[..32].fill(0);
    for (e, v) in l.iter_mut().enumerate() {
        if *v > 3 {
            hmask[e % 32] |= 1 << (e / 32);
            *v -= 4;
        }
    }
}

/// Q4_K nibbles: element 64c + i (i < 32) low nibble, 64c + 32 + i high nibble of byte 32c + i.
pub(crate) fn pack_4bit_k(l: &[u8], qs: &mut [u8]) {
    for c in 0..4 {
        for i in 0..32 {
            qs[32 * c + i] = (l[64 * c + i] & 0xF) | ((l[64 * c + 32 + i] & 0xF) << 4);
        }
    }
}

/// Q5_K: low nibbles as Q4_K, bit 4 of element e into bit e/32 of `qh[e % 32]`.
pub(crate) fn pack_5bit_k(l: &[u8], qh: &mut [u8], qs: &mut [u8]) {
    pack_4bit_k(l, qs);
    qh[..32].fill(0);
    for (e, &v) in l.iter().enumerate() {
        if v > 15 {
            qh[e % 32] |= 1 << (e / 32);
        }
    }
}

/// Q6_K: levels 0..63 → ql[128] (low nibbles) and qh[64] (high 2 bits).
pub(crate) fn pack_6bit(l: &[u8], ql: &mut [u8], qh: &mut [u8]) {
    for h in 0..2 {
        let (l, ql, qh) = (&l[128 * h..], &mut ql[64 * h..], &mut qh[32 * h..]);
        for i in 0..32 {
            let q = [l[i], l[i + 32], l[i + 64], l[i + 96]];
            ql[i] = (q[0] & 0xF) | ((q[2] & 0xF) << 4);
            ql[i + 32] = (q[1] & 0xF) | ((q[3] & 0xF) << 4);
            qh[i] = (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6);
        }
    }
}

// ---- dequantize ----

pub(crate) fn dequantize_q2_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(84).zip(out.chunks_exact_mut(QK_K)) {
        let (scales, qs) = (&b[0..16], &b[16..80]);
        let (d, dmin) = (f16_le(b, 80), f16_le(b, 82));
        // Element 128h + 32j + 16k + i: bits 2j of qs[32h + 16k + i], scale e/16 = 8h + 2j + k.
        for (s, y) in y.chunks_exact_mut(16).enumerate() {
            let (h, j, k) = (s / 8, (s / 2) % 4, s % 2);
            let sc = scales[s];
            let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
            let q = &qs[32 * h + 16 * k..32 * h + 16 * k + 16];
            for (o, &q) in y.iter_mut().zip(q) {
                *o = dl * ((q >> (2 * j)) & 3) as f32 - ml;
            }
        }
    }
}

pub(crate) fn dequantize_q3_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(110).zip(out.chunks_exact_mut(QK_K)) {
        let (hmask, qs, scales) = (&b[0..32], &b[32..96], &b[96..108]);
        let d = f16_le(b, 108);
        // As Q2_K, plus the high bit of element 128h + 32j + l at bit 4h + j of hmask[l].
        for (s, y) in y.chunks_exact_mut(16).enumerate() {
            let (h, j, k) = (s / 8, (s / 2) % 4, s % 2);
            let dl = d * scale_q3(s, scales) as f32;
            let q = &qs[32 * h + 16 * k..32 * h + 16 * k + 16];
            let hm = &hmask[16 * k..16 * k + 16];
            for ((o, &q), &hm) in y.iter_mut().zip(q).zip(hm) {
                let low = ((q >> (2 * j)) & 3) as i32;
                let sub = if (hm >> (4 * h + j)) & 1 != 0 { 0 } else { 4 };
                *o = dl * (low - sub) as f32;
            }
        }
    }
}

pub(crate) fn dequantize_q4_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(144).zip(out.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (f16_le(b, 0), f16_le(b, 2));
        let (scales, qs) = (&b[4..16], &b[16..144]);
        for (c, y) in y.chunks_exact_mut(64).enumerate() {
            for k in 0..2 {
                let (sc, m) = scale_min_k4(2 * c + k, scales);
                let (d1, m1) = (d * sc as f32, dmin * m as f32);
                for i in 0..32 {
                    let q = (qs[32 * c + i] >> (4 * k)) & 0xF;
                    y[32 * k + i] = d1 * q as f32 - m1;
                }
            }
        }
    }
}

pub(crate) fn dequantize_q5_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(176).zip(out.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (f16_le(b, 0), f16_le(b, 2));
        let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
        for (c, y) in y.chunks_exact_mut(64).enumerate() {
            for k in 0..2 {
                let (sc, m) = scale_min_k4(2 * c + k, scales);
                let (d1, m1) = (d * sc as f32, dmin * m as f32);
                for i in 0..32 {
                    let low = (qs[32 * c + i] >> (4 * k)) & 0xF;
                    let high = (qh[i] >> (2 * c + k)) & 1;
                    y[32 * k + i] = d1 * (low | high << 4) as f32 - m1;
                }
            }
        }
    }
}

pub(crate) fn dequantize_q6_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(210).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_le(b, 208);
        for (h, y) in y.chunks_exact_mut(128).enumerate() {
            let (ql, qh, sc) = (
                &b[64 * h..64 * h + 64],
                &b[128 + 32 * h..160 + 32 * h],
                &b[192 + 8 * h..200 + 8 * h],
            );
            // Element r of this half: low nibble of ql[r % 64] (high nibble if r >= 64), 2 high bits
            // at 2 * (r / 32) of qh[r % 32], scale sc[r / 16].
            for i in 0..32 {
                let q = [
                    (ql[i] & 0xF) | ((qh[i] & 3) << 4),
                    (ql[i + 32] & 0xF) | (((qh[i] >> 2) & 3) << 4),
                    (ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4),
                    (ql[i + 32] >> 4) | (((qh[i] >> 6) & 3) << 4),
                ];
                for (k, q) in q.into_iter().enumerate() {
                    let r = 32 * k + i;
                    y[r] = d * sc[r / 16] as i8 as f32 * (q as i32 - 32) as f32;
                }
            }
        }
    }
}

// ---- reference quantizers (GGML `quantize_row_q*_K_ref`) ----

/// Requantizes sub-block `x` with scale `d` and offset `dm`: level = clamp(round((x + dm) / d), 0, nmax).
fn requantize_asym(x: &[f32], d: f32, dm: f32, nmax: i32, l: &mut [u8]) {
    for (li, &v) in l.iter_mut().zip(x) {
        *li = nearest_int((v + dm) / d).clamp(0, nmax) as u8;
    }
}

pub(crate) fn quantize_q2_k(values: &[f32], out: &mut [u8]) {
    const SEARCH: MinSearch = MinSearch {
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: true,
    };
    for (x, b) in values.chunks_exact(QK_K).zip(out.chunks_exact_mut(84)) {
        let mut l = [0u8; QK_K];
        let mut scales = [0.0f32; 16];
        let mut mins = [0.0f32; 16];
        let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
        for j in 0..16 {
            let xs = &x[16 * j..16 * j + 16];
            let w: [f32; 16] = std::array::from_fn(|i| xs[i].abs());
            (scales[j], mins[j]) = make_qkx_quants(3, xs, &w, &mut l[16 * j..16 * j + 16], &SEARCH);
            max_scale = max_scale.max_ggml(scales[j]);
            max_min = max_min.max_ggml(mins[j]);
        }
        let sc = &mut b[0..16];
        if max_scale > 0.0 {
            let iscale = 15.0 / max_scale;
            for j in 0..16 {
                sc[j] = nearest_int(iscale * scales[j]) as u8;
            }
            put_f16_le(b, 80, max_scale / 15.0);
        } else {
            sc.fill(0);
            put_f16_le(b, 80, 0.0);
        }
        if max_min > 0.0 {
            let iscale = 15.0 / max_min;
            for j in 0..16 {
                b[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
            }
            put_f16_le(b, 82, max_min / 15.0);
        } else {
            put_f16_le(b, 82, 0.0);
        }
        requantize_q2(x, b, &mut l);
        pack_2bit(&l, &mut b[16..80]);
    }
}

/// Q2_K: levels from the stored (f16) super-block scales, for sub-blocks with a non-zero scale.
pub(crate) fn requantize_q2(x: &[f32], b: &[u8], l: &mut [u8; QK_K]) {
    let (d, dmin) = (f16_le(b, 80), f16_le(b, 82));
    for j in 0..16 {
        let dj = d * (b[j] & 0xF) as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * (b[j] >> 4) as f32;
        requantize_asym(
            &x[16 * j..16 * j + 16],
            dj,
            dm,
            3,
            &mut l[16 * j..16 * j + 16],
        );
    }
}

pub(crate) fn quantize_q3_k(values: &[f32], out: &mut [u8]) {
    for (x, b) in values.chunks_exact(QK_K).zip(out.chunks_exact_mut(110)) {
        let mut l = [0i8; QK_K];
        let mut scales = [0.0f32; 16];
        for j in 0..16 {
            scales[j] = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
        }
        let (max_scale, _) = signed_absmax(&scales);
        if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            let levels: [i32; 16] = std::array::from_fn(|j| {
                (nearest_int(iscale * scales[j]) as i8 as i32).clamp(-32, 31) + 32
            });
            pack_scales_q3(&levels, &mut b[96..108]);
            put_f16_le(b, 108, 1.0 / iscale);
        } else {
            b[96..108].fill(0);
            put_f16_le(b, 108, 0.0);
        }
        let mut l = l.map(|v| v as u8);
        finish_q3(x, b, &mut l);
    }
}

/// Q3_K after the scales are stored: requantize with them, then pack the hmask and 2-bit levels.
pub(crate) fn finish_q3(x: &[f32], b: &mut [u8], l: &mut [u8; QK_K]) {
    let d_all = f16_le(b, 108);
    for j in 0..16 {
        let d = d_all * scale_q3(j, &b[96..108]) as f32;
        if d == 0.0 {
            continue;
        }
        for (li, &v) in l[16 * j..16 * j + 16]
            .iter_mut()
            .zip(&x[16 * j..16 * j + 16])
        {
            *li = (nearest_int(v / d).clamp(-4, 3) + 4) as u8;
        }
    }
    let (hmask, qs) = b[0..96].split_at_mut(32);
    split_q3_high(l, hmask);
    pack_2bit(l, qs);
}

/// The (scale, min) search shared by the Q4_K and Q5_K reference quantizers.
fn ref_scale_mins(
    x: &[f32],
    nmax: i32,
    search: &MinSearch,
    l: &mut [u8; QK_K],
) -> ([f32; 8], [f32; 8]) {
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let w: [f32; 32] = std::array::from_fn(|i| av_x + xs[i].abs());
        (scales[j], mins[j]) = make_qkx_quants(nmax, xs, &w, &mut l[32 * j..32 * j + 32], search);
    }
    (scales, mins)
}

/// Q4_K/Q5_K reference: 6-bit sub-block scales and mins relative to their maxima, stored in `b[0..16]`.
fn ref_store_scales(scales: &[f32; 8], mins: &[f32; 8], b: &mut [u8]) {
    let max_scale = scales.iter().fold(0.0f32, |a, &s| a.max_ggml(s));
    let max_min = mins.iter().fold(0.0f32, |a, &m| a.max_ggml(m));
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let ls = scales.map(|s| (nearest_int(inv_scale * s) as u8).min(63));
    let lm = mins.map(|m| (nearest_int(inv_min * m) as u8).min(63));
    pack_scale_min_k4(&ls, &lm, &mut b[4..16]);
    put_f16_le(b, 0, max_scale / 63.0);
    put_f16_le(b, 2, max_min / 63.0);
}

/// Q4_K/Q5_K: levels from the stored scales, for sub-blocks with a non-zero scale.
pub(crate) fn requantize_k4(x: &[f32], b: &[u8], nmax: i32, l: &mut [u8; QK_K]) {
    let (d, dmin) = (f16_le(b, 0), f16_le(b, 2));
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &b[4..16]);
        let dj = d * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        requantize_asym(
            &x[32 * j..32 * j + 32],
            dj,
            dm,
            nmax,
            &mut l[32 * j..32 * j + 32],
        );
    }
}

pub(crate) fn quantize_q4_k(values: &[f32], out: &mut [u8]) {
    const SEARCH: MinSearch = MinSearch {
        rmin: -1.0,
        rdelta: 0.1,
        nstep: 20,
        use_mad: false,
    };
    for (x, b) in values.chunks_exact(QK_K).zip(out.chunks_exact_mut(144)) {
        let mut l = [0u8; QK_K];
        let (scales, mins) = ref_scale_mins(x, 15, &SEARCH, &mut l);
        ref_store_scales(&scales, &mins, b);
        requantize_k4(x, b, 15, &mut l);
        pack_4bit_k(&l, &mut b[16..144]);
    }
}

pub(crate) fn quantize_q5_k(values: &[f32], out: &mut [u8]) {
    const SEARCH: MinSearch = MinSearch {
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: false,
    };
    for (x, b) in values.chunks_exact(QK_K).zip(out.chunks_exact_mut(176)) {
        let mut l = [0u8; QK_K];
        let (scales, mins) = ref_scale_mins(x, 31, &SEARCH, &mut l);
        ref_store_scales(&scales, &mins, b);
        requantize_k4(x, b, 31, &mut l);
        let (qh, qs) = b[16..176].split_at_mut(32);
        pack_5bit_k(&l, qh, qs);
    }
}

pub(crate) fn quantize_q6_k(values: &[f32], out: &mut [u8]) {
    quantize_q6_k_weighted(values, out, None)
}

/// Q6_K with optional per-value importance weights for the sub-block search (None = x², the
/// reference quantizer; all ones = stable-diffusion.cpp's).
pub(crate) fn quantize_q6_k_weighted(values: &[f32], out: &mut [u8], weights: Option<&[f32; 16]>) {
    for (x, b) in values.chunks_exact(QK_K).zip(out.chunks_exact_mut(210)) {
        let mut l = [0i8; QK_K];
        let mut scales = [0.0f32; 16];
        for j in 0..16 {
            scales[j] = make_qx_quants(
                32,
                &x[16 * j..16 * j + 16],
                &mut l[16 * j..16 * j + 16],
                weights.map(|w| &w[..]),
            );
        }
        finish_q6(x, &scales, &mut l, b);
    }
}

/// Q6_K after the sub-block search: 8-bit scales relative to the largest, requantize, pack.
pub(crate) fn finish_q6(x: &[f32], scales: &[f32; 16], l: &mut [i8; QK_K], b: &mut [u8]) {
    let (max_scale, max_abs) = signed_absmax(scales);
    if max_abs < GROUP_MAX_EPS {
        b.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16_le(b, 208, 1.0 / iscale);
    for j in 0..16 {
        b[192 + j] = nearest_int(iscale * scales[j]).min(127) as i8 as u8;
    }
    let d_all = f16_le(b, 208);
    for j in 0..16 {
        let d = d_all * b[192 + j] as i8 as f32;
        if d == 0.0 {
            continue;
        }
        for (li, &v) in l[16 * j..16 * j + 16]
            .iter_mut()
            .zip(&x[16 * j..16 * j + 16])
        {
            *li = (nearest_int(v / d).clamp(-32, 31) + 32) as i8;
        }
    }
    let l = l.map(|v| v as u8);
    let (ql, qh) = b[0..192].split_at_mut(128);
    pack_6bit(&l, ql, qh);
}

/// GGML's `if (v > max) max = v` (keeps `self` when `v` is NaN or equal).
pub(crate) trait MaxGgml {
    fn max_ggml(self, v: f32) -> f32;
}

impl MaxGgml for f32 {
    #[inline]
    fn max_ggml(self, v: f32) -> f32 {
        if v > self {
            v
        } else {
            self
        }
    }
}
