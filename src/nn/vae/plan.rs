//! How the decoder and the encoder hold their feature maps, and choosing that from a memory budget.

use super::{Decoder, Encoder};
use crate::kernels::scratch::Scratch;

/// Rows per band when a plan does not say otherwise: small enough that the slack of partly
/// consumed bands stays a few MiB at 512² (a 256-channel band of 512-wide rows is 512 KiB a row),
/// large enough that bookkeeping is negligible.
const DEFAULT_BAND_ROWS: usize = 8;

/// The decoder's (or encoder's) memory plan. It never changes the numbers, only the memory: every plan gives the
/// same output bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VaePlan {
    /// Rows per stored band of every feature map (at that map's resolution); `None` keeps each map
    /// whole, so a map is freed only when its consumer has finished with all of it.
    pub band_rows: Option<usize>,
    /// The kernels' budgets during the decode, which `Decoder::peak_bytes` counts. The plans made
    /// here keep the first tier (`Scratch::default()`): the decoder's memory lever is the band
    /// height, and the pipeline decodes with that tier whatever tier its UNet ran under.
    pub scratch: Scratch,
}

impl Default for VaePlan {
    fn default() -> Self {
        VaePlan::banded(DEFAULT_BAND_ROWS)
    }
}

impl VaePlan {
    pub fn whole() -> Self {
        VaePlan {
            band_rows: None,
            scratch: Scratch::default(),
        }
    }

    pub fn banded(rows: usize) -> Self {
        VaePlan {
            band_rows: Some(rows.max(1)),
            scratch: Scratch::default(),
        }
    }

    /// The plan with the least memory-allocation churn whose predicted peak fits `budget_bytes`
    /// (whole maps, then bands of 64 down to 1 row), or `None` when even 1-row bands do not fit.
    pub fn fitting(
        decoder: &Decoder,
        latent_h: usize,
        latent_w: usize,
        budget_bytes: u64,
    ) -> Option<VaePlan> {
        Self::first_fitting(budget_bytes, |plan| {
            decoder.peak_bytes(latent_h, latent_w, plan)
        })
    }

    /// As `fitting`, for encoding an `h × w` image with `encoder`.
    pub fn fitting_encoder(
        encoder: &Encoder,
        h: usize,
        w: usize,
        budget_bytes: u64,
    ) -> Option<VaePlan> {
        Self::first_fitting(budget_bytes, |plan| encoder.peak_bytes(h, w, plan))
    }

    fn first_fitting(budget_bytes: u64, peak: impl Fn(&VaePlan) -> u64) -> Option<VaePlan> {
        std::iter::once(VaePlan::whole())
            .chain([64, 32, 16, 8, 4, 2, 1].map(VaePlan::banded))
            .find(|plan| peak(plan) <= budget_bytes)
    }
}
