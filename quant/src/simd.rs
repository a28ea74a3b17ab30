//! AVX2 (+F16C) dequantizers for the formats a quantized matmul streams most: f16, q8_0, q4_0, q4_1,
//! q5_0, q5_1, q4_K, q6_K. Each computes exactly the scalar path's float operations (same operands,
//! one rounding each, no fused multiply-add), so the output bits are identical; the tests check it.
//!
//! The table holds the safe entry points below as `Option<DequantizeFn>` (None on other targets).
//! Each entry point checks the CPU (cached) and panics without AVX2/F16C; `crate::dequantize` asks
//! [`available`] first.

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(target_arch = "x86_64")]
mod entries {
    use super::x86;
    use crate::types::DequantizeFn;

    macro_rules! entry {
        ($name:ident, $kernel:path) => {
            fn $name(bytes: &[u8], out: &mut [f32]) {
                assert!(
                    super::available(),
                    "AVX2/F16C dequantizer called on a CPU without them"
                );
                // SAFETY: the CPU has AVX2 and F16C (checked just above), all the kernel requires.
                unsafe { $kernel(bytes, out) }
            }
        };
    }

    entry!(f16, x86::f16);
    entry!(q8_0, x86::q8_0);
    entry!(q4_0, x86::q4_0);
    entry!(q4_1, x86::q4_1);
    entry!(q5_0, x86::q5_0);
    entry!(q5_1, x86::q5_1);
    entry!(q4_k, x86::q4_k);
    entry!(q6_k, x86::q6_k);

    pub(crate) const F16: Option<DequantizeFn> = Some(f16);
    pub(crate) const Q8_0: Option<DequantizeFn> = Some(q8_0);
    pub(crate) const Q4_0: Option<DequantizeFn> = Some(q4_0);
    pub(crate) const Q4_1: Option<DequantizeFn> = Some(q4_1);
    pub(crate) const Q5_0: Option<DequantizeFn> = Some(q5_0);
    pub(crate) const Q5_1: Option<DequantizeFn> = Some(q5_1);
    pub(crate) const Q4K: Option<DequantizeFn> = Some(q4_k);
    pub(crate) const Q6K: Option<DequantizeFn> = Some(q6_k);
}

#[cfg(target_arch = "x86_64")]
pub(crate) use entries::*;

#[cfg(not(target_arch = "x86_64"))]
mod entries {
    use crate::types::DequantizeFn;
    pub(crate) const F16: Option<DequantizeFn> = None;
    pub(crate) const Q8_0: Option<DequantizeFn> = None;
    pub(crate) const Q4_0: Option<DequantizeFn> = None;
    pub(crate) const Q4_1: Option<DequantizeFn> = None;
    pub(crate) const Q5_0: Option<DequantizeFn> = None;
    pub(crate) const Q5_1: Option<DequantizeFn> = None;
    pub(crate) const Q4K: Option<DequantizeFn> = None;
    pub(crate) const Q6K: Option<DequantizeFn> = None;
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) use entries::*;

/// Whether this CPU runs the SIMD dequantizers (AVX2 and F16C), detected once.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED
            .get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
