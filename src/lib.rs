//! sdcap: CPU-only Stable Diffusion that stays under its RAM cap.
//!
//! Data flows one way: job → load (weights) → encode (tokenizer, CLIP) → denoise (sampling, UNet)
//! → decode (VAE) → write (output). See ARCHITECTURE.md.

pub mod atomic_file;
pub mod backend;
pub mod batch;
pub mod conditioning;
pub mod error;
pub mod family;
pub mod governor;
pub mod img2img;
pub mod init_image;
pub mod inspect;
pub mod job;
pub mod kernels;
pub mod lora;
pub mod models;
pub mod nn;
pub mod output;
pub mod pipeline;
pub mod preview;
pub mod prompt;
pub mod quantize;
pub mod request;
pub mod sampling;
pub mod tensor;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
pub use tensor::Tensor;
