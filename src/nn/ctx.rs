//! `Ctx`: how one network call computes, passed by reference from the pipeline down to every
//! layer's forward, as a value (never a global), so two jobs in one process may run with different
//! settings at once.

use std::sync::Arc;

use crate::kernels::scratch::Scratch;
use crate::kernels::Precision;
use crate::lora::LoraSet;

/// What every layer of one network call reads besides its input and weights.
#[derive(Clone, Debug, Default)]
pub struct Ctx {
    /// The kernels' memory budgets for this call (the governor's tier).
    pub scratch: Scratch,
    /// What the linear layers' weight products compute in (`kernels::precision`; f32 unless the
    /// pipeline sets the job's mode for a UNet call).
    pub precision: Precision,
    /// The job's LoRA adapters, added to the weights as the products read them (`nn::layers`);
    /// None: the weights as stored.
    pub lora: Option<Arc<LoraSet>>,
}

impl Ctx {
    /// The same call with the job's adapters.
    pub fn with_lora(self, lora: Option<Arc<LoraSet>>) -> Ctx {
        Ctx { lora, ..self }
    }

    /// The same call with its weight products in f32: for what stays exact whatever the mode
    /// (time and label embeddings, the cross-attention keys and values of the text context).
    /// The adapters stay.
    pub fn exact(&self) -> Ctx {
        Ctx {
            precision: self.precision.exact(),
            ..self.clone()
        }
    }
}

impl PartialEq for Ctx {
    /// Same tier, same precision and the same adapter set (by identity).
    fn eq(&self, other: &Ctx) -> bool {
        let same_lora = match (&self.lora, &other.lora) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        self.scratch == other.scratch && self.precision == other.precision && same_lora
    }
}

impl From<Scratch> for Ctx {
    fn from(scratch: Scratch) -> Ctx {
        Ctx {
            scratch,
            ..Ctx::default()
        }
    }
}
