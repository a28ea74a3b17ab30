//! txt2img orchestration: job → load → encode → denoise → decode.

use crate::error::{Error, Result};
use crate::job::Job;
use crate::output::RgbImage;
use crate::tensor::Tensor;

/// What the pipeline reports while it runs (the CLI turns these into a progress display).
#[derive(Clone, Debug)]
pub enum Event {
    /// A stage starts: "load", "encode", "denoise", "decode".
    Stage(&'static str),
    /// A sampling step finished (1-based `index` of `total`).
    Step { index: usize, total: usize },
}

/// The result of one generation.
pub struct Generated {
    pub image: RgbImage,
    /// Final latent [1,4,H/8,W/8], before VAE scaling.
    pub latent: Tensor,
}

/// Runs one text-to-image job.
pub fn txt2img(job: &Job, on_event: &mut dyn FnMut(Event)) -> Result<Generated> {
    job.validate()?;
    on_event(Event::Stage("load"));
    Err(Error::BadRequest("pipeline not wired yet".into()))
}
