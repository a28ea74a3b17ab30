//! Compute kernels over plain f32 slices: GEMM, tiled convolution, norms, attention, activations.
//!
//! Layout: activations are NCHW (images) or [batch, tokens, channels] (sequences), row-major.

mod activation;
mod attention;
mod conv;
mod matmul;
mod norm;
mod panel;

pub use activation::{geglu, gelu, quick_gelu, silu};
pub use attention::{attention, AttentionShape};
pub use conv::{conv2d, Conv2dGeometry};
pub use matmul::{matmul, Transpose};
pub use norm::{group_norm, layer_norm};
pub use panel::{matmul_weight_t, DenseRows, LhsPanels, WeightRows};
