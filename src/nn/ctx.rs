//! `Ctx`: how one network call computes, passed by reference from the pipeline down to every
//! layer's forward, as a value (never a global), so two jobs in one process may run with different
//! settings at once.

use crate::kernels::scratch::Scratch;

/// What every layer of one network call reads besides its input and weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ctx {
    /// The kernels' memory budgets for this call (the governor's tier).
    pub scratch: Scratch,
}

impl From<Scratch> for Ctx {
    fn from(scratch: Scratch) -> Ctx {
        Ctx { scratch }
    }
}
