//! The networks as plain structs with `forward`; weights are found by LDM key prefix.

pub mod clip;
pub mod ctx;
pub mod layers;
pub mod resnet;
pub mod taesd;
pub mod transformer;
pub mod unet;
pub mod vae;

pub use ctx::Ctx;
