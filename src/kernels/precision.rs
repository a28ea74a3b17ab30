//! How the weight products of one network call compute (`--precision`), and which instruction set
//! the kernels use (`SDCAP_KERNELS`, read here and nowhere else).
//!
//! The products of `Linear` layers (`kernels::weight_product`) change with the mode: attention
//! projections, proj_in/proj_out, the feed-forward. The pipeline gives the mode to the UNet call
//! only (text encoders and the VAE run in f32), and the UNet keeps in f32 what is known to be
//! sensitive: the time (and SDXL label) embedding, the cross-attention keys and values of the text
//! context (`Precision::exact`), conv_in and conv_out, softmax and attention probabilities (the
//! attention kernel is f32 whatever the mode), GroupNorm/LayerNorm statistics. Convolutions stay f32
//! except in bf16 mode on AMX tiles (`Precision::bf16_convs`): there they run as implicit GEMMs on
//! the tiles, faster than f32 Winograd. Elsewhere the 3×3 convolutions run as Winograd, whose
//! transformed filters are no longer the file's blocks (an int8 product there would have to
//! re-quantize the transformed filters and input tiles, both with a larger dynamic range than the
//! originals), and the transforms are f32 by the rule.

use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::job::Precision as Requested;
use crate::weights::DType;

/// What the weight products compute in, resolved (no `auto`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The reference: f32 weights (converted from the file) and activations, f32 arithmetic.
    #[default]
    F32,
    /// Weights and activations rounded to bf16 (round to nearest even), products accumulated in
    /// f32.
    Bf16,
    /// Weights stored as q8_0/q5_0/q4_0 read as their integer blocks, activations quantized on
    /// the fly per 32-value block with a dynamic f32 scale, integer dot products per block, f32
    /// accumulation. Other weight types compute in f32.
    Int8,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::F32 => "f32",
            Mode::Bf16 => "bf16",
            Mode::Int8 => "int8",
        }
    }
}

/// The instruction set the precision kernels use. Every level has a scalar twin that gives the
/// same bits (`kernels::int8`, `kernels::bf16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512 F/BW/VL with VNNI (`int8::vnni`), and `vdpbf16ps` for bf16 where the CPU has
    /// AVX-512 BF16 (`amx::runs`).
    Avx512,
    /// AVX-512 as above, plus AMX tiles (`kernels::amx`): `tdpbf16ps` for the bf16 products,
    /// `tdpbssd` for the int8 ones.
    Amx,
}

/// The environment variable that forces an instruction set (tests, comparisons).
pub const KERNELS_ENV: &str = "SDCAP_KERNELS";

impl Isa {
    /// The best level this CPU runs.
    pub fn detected() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return if super::amx::available() {
                    Isa::Amx
                } else {
                    Isa::Avx512
                };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Amx => "amx",
        }
    }

    /// Parses a `SDCAP_KERNELS` value and checks that this CPU runs it.
    pub fn parse(text: &str) -> Result<Isa> {
        let isa = match text.trim() {
            "scalar" => Isa::Scalar,
            "avx2" => Isa::Avx2,
            "avx512" => Isa::Avx512,
            "amx" => Isa::Amx,
            other => {
                return Err(Error::BadRequest(format!(
                    "{KERNELS_ENV}=`{other}` is not one of scalar, avx2, avx512, amx"
                )))
            }
        };
        let detected = Isa::detected();
        if isa > detected {
            return Err(Error::BadRequest(format!(
                "{KERNELS_ENV}={} needs instructions this CPU lacks (it runs up to {})",
                isa.name(),
                detected.name()
            )));
        }
        Ok(isa)
    }

    /// What the kernels use unless a caller says otherwise: `SDCAP_KERNELS` when set (read once),
    /// else the detected level. An unusable value falls back to the detected level here;
    /// `check` (called when a request is validated) reports it as an error first.
    pub fn selected() -> Isa {
        static SELECTED: OnceLock<Isa> = OnceLock::new();
        *SELECTED.get_or_init(|| match std::env::var(KERNELS_ENV) {
            Ok(v) => Isa::parse(&v).unwrap_or_else(|_| Isa::detected()),
            Err(_) => Isa::detected(),
        })
    }
}

/// `f()` compiled for the widest vectors `isa` allows (AVX-512F, else AVX2, else the baseline
/// build): for plain loops the compiler vectorises. Without FMA contraction (Rust never fuses
/// `a * b + c`), every width gives the baseline build's bits. `isa` is at most `Isa::detected()`
/// (`Isa::selected`, or a test's level checked against it). `f` is inlined into the wide
/// function, so mark a closure `#[inline(always)]`.
pub(crate) fn at_width<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(isa <= Isa::detected(), "{isa:?} is not on this CPU");
        // SAFETY: the CPU runs `isa` (asserted): Avx512 and up have AVX-512F, Avx2 has AVX2.
        if isa >= Isa::Avx512 {
            return unsafe { wide::avx512(f) };
        }
        if isa >= Isa::Avx2 {
            return unsafe { wide::avx2(f) };
        }
    }
    let _ = isa;
    f()
}

#[cfg(target_arch = "x86_64")]
mod wide {
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
        f()
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    pub unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
}

/// What one network call's weight products compute in, and with which instructions. Part of
/// `nn::Ctx`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Precision {
    pub mode: Mode,
    pub isa: Isa,
}

impl Default for Precision {
    /// f32, the reference (the kernels' instruction set as selected).
    fn default() -> Self {
        Precision {
            mode: Mode::F32,
            isa: Isa::selected(),
        }
    }
}

impl Precision {
    pub fn new(mode: Mode) -> Self {
        Precision {
            mode,
            isa: Isa::selected(),
        }
    }

    /// Whether the linear layers' products run on packed bf16 operands (`kernels::amx`): on
    /// AMX tiles or with AVX-512 BF16's `vdpbf16ps` (`amx::runs`).
    pub fn bf16_packed(self) -> bool {
        self.mode == Mode::Bf16
            && super::amx::runs(self.isa)
            && crate::backend::active() == crate::backend::Backend::Cpu
    }

    /// Whether the UNet's convolutions run as implicit GEMMs on packed bf16 operands too, instead
    /// of f32 Winograd: on AMX tiles only. With `vdpbf16ps` (Zen 4) the implicit GEMM lost to f32
    /// Winograd at every level of SD1.5 (benches/PROFILE.md), and Winograd's own per-point
    /// products in bf16 break the bf16 error bound (F(4,3)'s transforms amplify the rounding).
    pub fn bf16_convs(self) -> bool {
        self.bf16_packed() && self.isa == Isa::Amx
    }

    /// The same instructions in f32: for the products kept exact whatever the mode.
    pub fn exact(self) -> Self {
        Precision {
            mode: Mode::F32,
            ..self
        }
    }
}

/// Whether the int8 products read this weight type's blocks (others compute in f32).
pub fn int8_reads(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Quant(quant::GgmlType::Q8_0 | quant::GgmlType::Q5_0 | quant::GgmlType::Q4_0)
    )
}

/// The mode a request runs in. `auto` is the fastest mode whose accuracy bound is tested
/// (tests/precision.rs) on this CPU, as measured (benches/PROFILE.md, SD1.5 512² CFG step):
/// - int8 with AVX-512 VNNI and no AMX (`Isa::Avx512`, `int8::vnni`) on weights it reads
///   (q8_0/q5_0/q4_0): on AMD Zen 4 0.95× bf16's step time (0.75× f32's), per-call relative L2
///   against f32 1.1e-2 at full size (bound 3e-2).
/// - bf16 where the CPU multiplies bf16 itself (`amx::runs`): on AMX-BF16 tiles (`Isa::Amx`)
///   every UNet product but the kept-exact ones, 0.75× f32's step time on a Sapphire Rapids Xeon;
///   with AVX-512 BF16's `vdpbf16ps` (`Isa::Avx512`, e.g. AMD Zen 4) the linear layers, 0.8× f32's
///   step time (convolutions stay f32 Winograd there). Per-call relative L2 against f32 at full
///   size 4e-3 to 7e-3 (bound 1e-2).
/// - f32 everywhere else. bf16 without such instructions rounds operands for the same f32 GEMM
///   (never faster), and the AVX2 int8 products (`vpmaddubsw`) run at 0.45–0.6× f32's GEMM
///   throughput at SD1.5's shapes: per-block scales cost a conversion and an FMA per 32 values
///   where f32 needs 4 FMAs (8 lanes each).
pub fn resolve(requested: Requested, unet_linear: Option<DType>, isa: Isa) -> Mode {
    match requested {
        Requested::F32 => Mode::F32,
        Requested::Bf16 => Mode::Bf16,
        // int8 products exist only for the block types it reads: other weights compute in f32,
        // and the mode says so (the PNG and `plan` name what ran).
        Requested::Int8 if unet_linear.is_some_and(|t| !int8_reads(t)) => Mode::F32,
        Requested::Int8 => Mode::Int8,
        Requested::Auto if isa == Isa::Avx512 && unet_linear.is_some_and(int8_reads) => Mode::Int8,
        Requested::Auto if super::amx::runs(isa) => Mode::Bf16,
        Requested::Auto => Mode::F32,
    }
}

/// Checks what can be checked of the precision settings without the model: a `SDCAP_KERNELS`
/// value this CPU runs. For `Job::validate`.
pub fn check(_job: &crate::job::Job) -> Result<()> {
    match std::env::var(KERNELS_ENV) {
        Ok(v) => Isa::parse(&v).map(|_| ()),
        Err(std::env::VarError::NotPresent) => Ok(()),
        Err(std::env::VarError::NotUnicode(_)) => Err(Error::BadRequest(format!(
            "{KERNELS_ENV} is not one of scalar, avx2, avx512, amx"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_refuses_unknown_names_and_levels_above_the_cpu() {
        assert!(Isa::parse("neon").is_err());
        assert_eq!(Isa::parse("scalar").unwrap(), Isa::Scalar);
        for isa in [Isa::Avx2, Isa::Avx512] {
            assert_eq!(Isa::parse(isa.name()).is_ok(), isa <= Isa::detected());
        }
    }

    #[test]
    fn auto_picks_int8_on_vnni_then_bf16_where_the_cpu_multiplies_bf16() {
        let q8 = Some(DType::Quant(quant::GgmlType::Q8_0));
        let f16 = Some(DType::F16);
        for weights in [q8, f16, None] {
            for isa in [Isa::Amx, Isa::Avx512, Isa::Avx2, Isa::Scalar] {
                let want = if isa == Isa::Avx512 && weights == q8 {
                    Mode::Int8
                } else if super::super::amx::runs(isa) {
                    Mode::Bf16
                } else {
                    Mode::F32
                };
                assert_eq!(resolve(Requested::Auto, weights, isa), want, "{isa:?}");
            }
            // Below AVX-512 nothing multiplies bf16 or runs the fast int8 kernel.
            assert_eq!(resolve(Requested::Auto, weights, Isa::Avx2), Mode::F32);
        }
        assert_eq!(resolve(Requested::Bf16, None, Isa::Scalar), Mode::Bf16);
        assert_eq!(resolve(Requested::Int8, q8, Isa::Scalar), Mode::Int8);
        assert_eq!(resolve(Requested::Int8, f16, Isa::Avx512), Mode::F32);
    }
}
