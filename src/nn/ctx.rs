//! `Ctx`: how one network call computes, passed by reference from the pipeline down to every
//! layer's forward, as a value (never a global), so two jobs in one process may run with different
//! settings at once.

use crate::kernels::scratch::Scratch;
use crate::kernels::Precision;

/// What every layer of one network call reads besides its input and weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ctx {
    /// The kernels' memory budgets for this call (the governor's tier).
    pub scratch: Scratch,
    /// What the linear layers' weight products compute in (`kernels::precision`; f32 unless the
    /// pipeline sets the job's mode for a UNet call).
    pub precision: Precision,
}

impl From<Scratch> for Ctx {
    fn from(scratch: Scratch) -> Ctx {
        Ctx {
            scratch,
            precision: Precision::default(),
        }
    }
}

impl Ctx {
    /// The same call with its weight products in f32: for what stays exact whatever the mode
    /// (time and label embeddings, the cross-attention keys and values of the text context).
    pub fn exact(&self) -> Ctx {
        Ctx {
            precision: self.precision.exact(),
            ..*self
        }
    }
}
