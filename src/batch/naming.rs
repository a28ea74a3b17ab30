//! Output names: `{index:06}-{hash:012x}.png`, e.g. `000007-3fa95c01d2b4.png`.
//!
//! The index keeps a directory listing in job-file order; the hash is of the job's canonical form
//! (every setting that changes the pixels or the PNG's parameters text; one the job left to the model
//! family enters with the family's value, and the settings added later, `prediction`, SDXL's size
//! conditioning and a `prompt_syntax` other than a1111, only when set, so older names stay valid),
//! so the name is the same on every run and every machine, and a job whose settings were edited gets
//! a new name and runs again. The model and VAE enter by file name only, not by full path: the same model mounted at
//! another path (a container, another node) keeps the names. Threads do not enter: they do not
//! change the output.

use std::path::Path;

use serde::Serialize;

use crate::job::{Job, Precision};
use crate::prompt::PromptSyntax;

/// Bump when the canonical form changes meaning, so old outputs are not taken as done.
const CANONICAL_VERSION: u32 = 1;

#[derive(Serialize)]
struct Canonical<'a> {
    v: u32,
    model: String,
    vae: Option<String>,
    prompt: &'a str,
    negative: &'a str,
    width: u32,
    height: u32,
    steps: u32,
    cfg: f32,
    sampler: &'static str,
    scheduler: &'static str,
    seed: u64,
    clip_skip: u32,
    rng: &'static str,
    // Added after version 1: absent when not set, so the names of jobs that do not set them stay
    // as they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    prediction: Option<&'static str>,
    /// (height, width), as `SizeConditioning` holds them.
    #[serde(skip_serializing_if = "Option::is_none")]
    original_size: Option<(u32, u32)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    crop_coords: Option<(u32, u32)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target_size: Option<(u32, u32)>,
    /// Only when not the default (a1111).
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_syntax: Option<&'static str>,
    /// `--lora` files (by name) and weights; tags are part of the prompt.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    loras: Vec<(String, f32)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    init_image: Option<String>,
    /// Only with an init image.
    #[serde(skip_serializing_if = "Option::is_none")]
    strength: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mask: Option<String>,
    /// Only when TAESD decodes the image (not for previews only).
    #[serde(skip_serializing_if = "Option::is_none")]
    taesd: Option<String>,
    /// Only when not the default (f32).
    #[serde(skip_serializing_if = "Option::is_none")]
    precision: Option<&'static str>,
}

/// The job as one line of JSON with a fixed field order.
pub fn canonical(job: &Job) -> String {
    let c = Canonical {
        v: CANONICAL_VERSION,
        model: file_name(&job.model),
        vae: job.vae.as_deref().map(file_name),
        prompt: &job.prompt,
        negative: job.negative_text(),
        width: job.width,
        height: job.height,
        steps: job.steps,
        cfg: job.cfg_scale,
        sampler: job.sampler.name(),
        scheduler: job.scheduler.name(),
        seed: job.seed,
        clip_skip: job.clip_skip,
        rng: job.rng.name(),
        prediction: job.prediction.map(|p| p.name()),
        original_size: job.size_cond.original,
        crop_coords: Some(job.size_cond.crop).filter(|&c| c != (0, 0)),
        target_size: job.size_cond.target,
        prompt_syntax: Some(job.prompt_syntax)
            .filter(|&s| s != PromptSyntax::default())
            .map(PromptSyntax::name),
        loras: job
            .loras
            .iter()
            .map(|l| (file_name(&l.path), l.weight))
            .collect(),
        init_image: job.init_image.as_deref().map(file_name),
        strength: job.init_image.as_ref().map(|_| job.strength),
        mask: job.mask.as_deref().map(file_name),
        taesd: job.final_taesd().map(file_name),
        precision: Some(job.precision)
            .filter(|&p| p != Precision::default())
            .map(Precision::name),
    };
    serde_json::to_string(&c).expect("a job always serialises")
}

/// 64-bit FNV-1a of the canonical form: fixed by definition (unlike `std`'s hasher), so names
/// survive a compiler upgrade. Naming needs no cryptographic strength, the index separates jobs.
pub fn job_hash(job: &Job) -> u64 {
    canonical(job).bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The output file name of job `index`.
pub fn output_name(index: usize, job: &Job) -> String {
    format!("{index:06}-{:012x}.png", job_hash(job) >> 16)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}
