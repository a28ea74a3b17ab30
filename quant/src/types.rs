//! The type table. Ids are GGML's `ggml_type` values as stored in GGUF files.
//!
//! Every row names the functions for its type; `lib.rs` only looks rows up and checks lengths.

use crate::{float, kquality, kquants, legacy, simd};

/// Whole blocks in, values out: `bytes.len() == n * block_bytes`, `out.len() == n * block_elems`.
pub type DequantizeFn = fn(&[u8], &mut [f32]);
/// Values in (whole blocks), blocks out: `values.len() == n * block_elems`, `out.len() == n * block_bytes`.
pub type QuantizeFn = fn(&[f32], &mut [u8]);

/// A GGML tensor element/block type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

/// One row of the table.
#[derive(Debug)]
pub struct TypeInfo {
    pub ty: GgmlType,
    /// GGML's `ggml_type` id.
    pub id: u32,
    /// Name as GGML and stable-diffusion.cpp's `--type` spell it.
    pub name: &'static str,
    /// Values per block (1 for plain floats).
    pub block_elems: usize,
    /// Bytes per block.
    pub block_bytes: usize,
    /// Portable scalar dequantizer (GGML's `to_float`, bit for bit).
    pub dequantize: DequantizeFn,
    /// A SIMD dequantizer with the same output bits, when this build has one. It checks the CPU itself
    /// (cached) and panics if the features are missing; `crate::dequantize` only picks it when they are
    /// present.
    pub dequantize_fast: Option<DequantizeFn>,
    /// Reference quantizer: GGML's `quantize_row_*_ref` = gguf-py (what llama.cpp writes without an
    /// importance matrix).
    pub quantize: Option<QuantizeFn>,
    /// stable-diffusion.cpp's quantizer: GGML's error-minimising `quantize_row_*_impl` with an all-ones
    /// importance matrix. `values` is one GGML row (its statistics may span the whole slice).
    pub quantize_quality: Option<QuantizeFn>,
}

const fn row(ty: GgmlType, id: u32, name: &'static str, block: (usize, usize), f: Fns) -> TypeInfo {
    TypeInfo {
        ty,
        id,
        name,
        block_elems: block.0,
        block_bytes: block.1,
        dequantize: f.0,
        dequantize_fast: f.1,
        quantize: f.2,
        quantize_quality: f.3,
    }
}

type Fns = (
    DequantizeFn,
    Option<DequantizeFn>,
    Option<QuantizeFn>,
    Option<QuantizeFn>,
);

use GgmlType as T;

#[rustfmt::skip]
pub(crate) static TABLE: &[TypeInfo] = &[
    row(T::F32,  0,  "f32",  (1, 4),     (float::dequantize_f32, None, Some(float::quantize_f32), None)),
    row(T::F16,  1,  "f16",  (1, 2),     (float::dequantize_f16, simd::F16, Some(float::quantize_f16), None)),
    row(T::Q4_0, 2,  "q4_0", (32, 18),   (legacy::dequantize_q4_0, simd::Q4_0, Some(legacy::quantize_q4_0), Some(legacy::quantize_q4_0_quality))),
    row(T::Q4_1, 3,  "q4_1", (32, 20),   (legacy::dequantize_q4_1, simd::Q4_1, Some(legacy::quantize_q4_1), Some(legacy::quantize_q4_1_quality))),
    row(T::Q5_0, 6,  "q5_0", (32, 22),   (legacy::dequantize_q5_0, simd::Q5_0, Some(legacy::quantize_q5_0), Some(legacy::quantize_q5_0_quality))),
    row(T::Q5_1, 7,  "q5_1", (32, 24),   (legacy::dequantize_q5_1, simd::Q5_1, Some(legacy::quantize_q5_1), Some(legacy::quantize_q5_1_quality))),
    row(T::Q8_0, 8,  "q8_0", (32, 34),   (legacy::dequantize_q8_0, simd::Q8_0, Some(legacy::quantize_q8_0), None)),
    row(T::Q2K,  10, "q2_K", (256, 84),  (kquants::dequantize_q2_k, None, Some(kquants::quantize_q2_k), Some(kquality::quantize_q2_k_quality))),
    row(T::Q3K,  11, "q3_K", (256, 110), (kquants::dequantize_q3_k, None, Some(kquants::quantize_q3_k), Some(kquality::quantize_q3_k_quality))),
    row(T::Q4K,  12, "q4_K", (256, 144), (kquants::dequantize_q4_k, simd::Q4K, Some(kquants::quantize_q4_k), Some(kquality::quantize_q4_k_quality))),
    row(T::Q5K,  13, "q5_K", (256, 176), (kquants::dequantize_q5_k, None, Some(kquants::quantize_q5_k), Some(kquality::quantize_q5_k_quality))),
    row(T::Q6K,  14, "q6_K", (256, 210), (kquants::dequantize_q6_k, simd::Q6K, Some(kquants::quantize_q6_k), Some(kquality::quantize_q6_k_quality))),
    row(T::BF16, 30, "bf16", (1, 2),     (float::dequantize_bf16, None, Some(float::quantize_bf16), None)),
];

impl GgmlType {
    pub fn info(self) -> &'static TypeInfo {
        TABLE
            .iter()
            .find(|r| r.ty == self)
            .expect("every type has a table row")
    }

    pub fn from_id(id: u32) -> Option<GgmlType> {
        TABLE.iter().find(|r| r.id == id).map(|r| r.ty)
    }

    /// Parses a name as `--type` takes it (case-insensitive: `q4_k` = `q4_K`).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        TABLE
            .iter()
            .find(|r| r.name.eq_ignore_ascii_case(name))
            .map(|r| r.ty)
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    pub fn all() -> impl Iterator<Item = GgmlType> {
        TABLE.iter().map(|r| r.ty)
    }
}
