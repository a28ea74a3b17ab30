//! Compute kernels over plain f32 slices: GEMM, tiled convolution, norms, attention, activations.
//!
//! Layout: activations are NCHW (images) or [batch, tokens, channels] (sequences), row-major.

mod activation;
pub mod amx;
mod attention;
pub mod bf16;
mod conv;
mod denormals;
pub mod int8;
pub(crate) mod matmul;
mod norm;
mod panel;
pub mod precision;
mod rank_update;
pub mod scratch;
mod winograd;

pub use activation::{geglu, gelu, quick_gelu, silu};
pub use attention::{attention, attention_chunked, attention_scratch_bytes, AttentionShape};
pub use conv::{
    conv2d, conv2d_implicit_gemm, conv_patch_bytes, conv_tile_rows, Conv2dGeometry, FeatureRows,
    InputTransform, Planes, Resize, RowConv,
};
pub use denormals::{compute_pool, denormals_flushed, flush_denormals};
pub use matmul::{matmul, Transpose};
pub use norm::{
    group_norm, group_norm_stats, group_norm_stats_bytes, layer_norm, layer_norm_to, GroupStats,
};
pub use panel::{matmul_weight_t, panel_bytes, weight_product, DenseRows, LhsPanels, WeightRows};
pub use precision::{Isa, Mode, Precision};
pub use rank_update::add_product_rows;
pub use winograd::{
    conv3x3_winograd, conv3x3_winograd_read, winograd_choice, winograd_scratch_bytes, WinogradConv,
    WinogradInput, WinogradTile,
};
