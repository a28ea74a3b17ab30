//! GGML block formats: one table row per type (block size, bytes per block, dequantize, quantize);
//! everything else dispatches through the table, so adding a type is adding a row.
//!
//! All formats are bit-exact with GGML (ggml 0.19, the one inside stable-diffusion.cpp): the
//! dequantizers reproduce `to_float`, [`quantize`] reproduces the reference quantizers
//! (`quantize_row_*_ref`, = gguf-py), and [`quantize_quality`] reproduces what stable-diffusion.cpp's
//! `convert` writes (GGML's `quantize_row_*_impl` with an all-ones importance matrix).
//!
//! The quantizers assume the default floating-point environment (no flush-to-zero or
//! denormals-are-zero) for bit-exactness on inputs with subnormal values.

mod float;
pub mod gguf;
mod kquality;
mod kquants;
mod legacy;
mod search;
mod simd;
mod types;

pub use types::{DequantizeFn, GgmlType, QuantizeFn, TypeInfo};

impl GgmlType {
    /// Bytes of `n` values of this type, None if `n` is not a whole number of blocks or overflows.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let info = self.info();
        if !n.is_multiple_of(info.block_elems as u64) {
            return None;
        }
        (n / info.block_elems as u64).checked_mul(info.block_bytes as u64)
    }
}

/// Panics (naming the type) unless `bytes` is whole blocks and `out` holds exactly their values.
fn check_dequant(info: &TypeInfo, bytes: &[u8], out: &[f32]) {
    assert!(
        bytes.len().is_multiple_of(info.block_bytes)
            && out.len() == bytes.len() / info.block_bytes * info.block_elems,
        "dequantize {}: {} bytes for {} values (blocks are {} bytes for {} values)",
        info.name,
        bytes.len(),
        out.len(),
        info.block_bytes,
        info.block_elems
    );
}

/// Panics (naming the type) unless `values` is whole blocks and `out` holds exactly their bytes.
fn check_quant(info: &TypeInfo, values: &[f32], out: &[u8]) {
    assert!(
        values.len().is_multiple_of(info.block_elems)
            && out.len() == values.len() / info.block_elems * info.block_bytes,
        "quantize {}: {} values into {} bytes (blocks are {} values in {} bytes)",
        info.name,
        values.len(),
        out.len(),
        info.block_elems,
        info.block_bytes
    );
}

/// Dequantizes whole blocks of `ty` (`bytes`) into `out`, with the fastest path this CPU has
/// (AVX2/F16C where available, chosen once at run time). Output bits equal [`dequantize_scalar`]'s.
///
/// # Panics
/// If `bytes` is not a whole number of blocks or `out.len()` is not that many blocks' values.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let info = ty.info();
    check_dequant(info, bytes, out);
    match info.dequantize_fast {
        Some(fast) if simd::available() => fast(bytes, out),
        _ => (info.dequantize)(bytes, out),
    }
}

/// The portable scalar dequantizer (the reference the SIMD paths are tested against).
///
/// # Panics
/// As [`dequantize`].
pub fn dequantize_scalar(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let info = ty.info();
    check_dequant(info, bytes, out);
    (info.dequantize)(bytes, out);
}

/// Reference quantizer (GGML `quantize_row_*_ref`, byte-identical to gguf-py and to llama.cpp without
/// an importance matrix). Blocks are independent, so any split of `values` gives the same bytes.
///
/// # Panics
/// If `values.len()` is not a whole number of blocks or `out.len()` is not that many blocks' bytes.
pub fn quantize(ty: GgmlType, values: &[f32], out: &mut [u8]) {
    let info = ty.info();
    check_quant(info, values, out);
    let f = info
        .quantize
        .unwrap_or_else(|| panic!("quantize {}: no quantizer", info.name));
    f(values, out);
}

/// stable-diffusion.cpp's quantizer where the type has one ([`has_quality_quantizer`]), else the
/// reference quantizer.
///
/// `values` is ONE GGML row: for q4_0, q4_1, q5_0 and q5_1 the weighting uses the mean square of the
/// whole row, so to match a file written by stable-diffusion.cpp call this once per tensor row
/// (`ne[0]` values), e.g. with [`quantize_quality_rows`]. The k-quants only look inside each
/// 256-value block.
///
/// # Panics
/// As [`quantize`].
pub fn quantize_quality(ty: GgmlType, values: &[f32], out: &mut [u8]) {
    let info = ty.info();
    check_quant(info, values, out);
    match info.quantize_quality {
        Some(f) => f(values, out),
        None => quantize(ty, values, out),
    }
}

/// [`quantize_quality`] applied to each `row_len`-value row of `values` in turn.
///
/// # Panics
/// If `row_len` is zero or not a whole number of blocks, `values.len()` is not a whole number of rows,
/// or `out` is not the matching number of bytes.
pub fn quantize_quality_rows(ty: GgmlType, values: &[f32], row_len: usize, out: &mut [u8]) {
    let info = ty.info();
    check_quant(info, values, out);
    assert!(
        row_len > 0
            && row_len.is_multiple_of(info.block_elems)
            && values.len().is_multiple_of(row_len),
        "quantize {}: row length {row_len} does not split {} values into whole blocks",
        info.name,
        values.len()
    );
    let row_bytes = row_len / info.block_elems * info.block_bytes;
    for (row, dst) in values
        .chunks_exact(row_len)
        .zip(out.chunks_exact_mut(row_bytes))
    {
        quantize_quality(ty, row, dst);
    }
}

/// Whether [`quantize_quality`] differs from [`quantize`] for this type (q4_0, q4_1, q5_0, q5_1 and
/// the k-quants).
pub fn has_quality_quantizer(ty: GgmlType) -> bool {
    ty.info().quantize_quality.is_some()
}

/// Whether [`dequantize`] uses a SIMD path for this type on this CPU.
pub fn has_fast_dequantizer(ty: GgmlType) -> bool {
    ty.info().dequantize_fast.is_some() && simd::available()
}
