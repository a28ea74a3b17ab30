//! txt2img orchestration: job → load → encode → denoise → decode.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use std::cell::RefCell;

use crate::conditioning::{self, Conditioning};
use crate::error::{Error, Result};
use crate::governor::{self, memory, watch::Watch, Budget, Plan};
use crate::job::{Job, PreviewMode};
use crate::kernels::scratch::Scratch;
use crate::nn::taesd::Taesd;
use crate::nn::unet::UNet;
use crate::nn::vae::{Decoder, VaePlan};
use crate::nn::Ctx;
use crate::output::RgbImage;
use crate::preview::Projection;
use crate::sampling::{self, rng::TorchRng, NoiseSource};
use crate::tensor::Tensor;

/// What the pipeline reports while it runs (the CLI turns these into a progress display).
#[derive(Clone, Debug)]
pub enum Event {
    /// A stage starts: "load", "encode", "denoise", "decode".
    Stage(&'static str),
    /// A sampling step finished (1-based `index` of `total`).
    Step { index: usize, total: usize },
    /// The memory plan for this job (emitted once, before the heavy work).
    Planned(Box<Plan>),
    /// Something the user should know, said once (e.g. the governor tightened the plan).
    Notice(String),
    /// A preview PNG was written after model evaluation `step` (1-based, as `Step::index`).
    Preview { step: usize, path: PathBuf },
}

/// The result of one generation.
pub struct Generated {
    pub image: RgbImage,
    /// Final latent [1,4,H/8,W/8], before VAE scaling.
    pub latent: Tensor,
    /// The plan the job ran with.
    pub plan: Plan,
    /// Peak resident set of the process so far (VmHWM), bytes.
    pub peak_rss_bytes: u64,
    /// Peak charge of our cgroup seen at block boundaries (0 where there is no cgroup file), bytes.
    pub peak_cgroup_bytes: u64,
}

pub use crate::models::Models;

/// Runs one text-to-image job.
pub fn txt2img(job: &Job, on_event: &mut dyn FnMut(Event)) -> Result<Generated> {
    job.validate()?;
    on_event(Event::Stage("load"));
    let models = Models::load(job)?;
    generate(&models, job, on_event)
}

/// The memory plan for `job` on these models (refuses with `Error::CapTooSmall` when nothing fits).
/// Only shapes are read: no weight data is touched.
pub fn plan(models: &Models, job: &Job) -> Result<Plan> {
    let budget = Budget::discover(job.ram_cap)?;
    governor::plan(models, job, &budget)
}

/// `backend::check_device_memory` for a loaded model and job (here, not in `backend`, so the
/// backend imports nothing above the kernels): the largest tensor of the model (as f32) and
/// the largest stage's activation estimate from the RAM plan.
pub fn check_device_plan(models: &Models, job: &Job) -> Result<()> {
    if crate::backend::active() == crate::backend::Backend::Cpu {
        return Ok(());
    }
    let largest = models
        .store
        .tensors()
        .iter()
        .map(|t| t.numel() as u64)
        .max()
        .unwrap_or(0);
    let plan = plan(models, job)?;
    let activations = plan
        .stages
        .iter()
        .map(|s| s.activation_bytes)
        .max()
        .unwrap_or(0);
    crate::backend::check_device_memory(largest, activations)
}

/// Runs one job on already-loaded models (a batch keeps the models between jobs). All noise comes
/// from one torch-compatible CPU generator seeded with `job.seed`, as in diffusers.
pub fn generate(models: &Models, job: &Job, on_event: &mut dyn FnMut(Event)) -> Result<Generated> {
    generate_with_cancel(models, job, &AtomicBool::new(false), on_event)
}

/// As `generate`, but abandons the run with `Error::Interrupted` once `cancel` is set: checked before
/// each UNet evaluation and before the VAE decode, so a signal costs at most one step's wait.
pub fn generate_with_cancel(
    models: &Models,
    job: &Job,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(Event),
) -> Result<Generated> {
    let shape = latent_shape(models, job);
    let mut rng = TorchRng::new(job.seed);
    let initial = rng.randn(&shape);
    let mut noise = LatentNoise {
        rng: &mut rng,
        shape: &shape,
    };
    run(models, job, initial, &mut noise, Some(cancel), on_event)
}

/// [1, 4, H/8, W/8].
pub fn latent_shape(models: &Models, job: &Job) -> Vec<usize> {
    vec![
        1,
        models.unet.in_channels(),
        job.height as usize / 8,
        job.width as usize / 8,
    ]
}

/// As `generate`, with the unit-normal initial latent and the step noise given (tests feed
/// recorded diffusers noise here).
pub fn generate_from_noise(
    models: &Models,
    job: &Job,
    initial: Vec<f32>,
    noise: &mut dyn NoiseSource,
    on_event: &mut dyn FnMut(Event),
) -> Result<Generated> {
    run(models, job, initial, noise, None, on_event)
}

fn run(
    models: &Models,
    job: &Job,
    initial: Vec<f32>,
    noise: &mut dyn NoiseSource,
    cancel: Option<&AtomicBool>,
    on_event: &mut dyn FnMut(Event),
) -> Result<Generated> {
    let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
    job.validate()?;
    let schedule = sampling::schedule(job.sampler, job.scheduler, job.steps as usize)?;
    let plan = plan(models, job)?;
    on_event(Event::Planned(Box::new(plan.clone())));
    let shape = latent_shape(models, job);
    assert_eq!(
        initial.len(),
        shape.iter().product::<usize>(),
        "initial noise size"
    );

    on_event(Event::Stage("encode"));
    // diffusers applies classifier-free guidance only when the scale is above 1.
    let guided = job.cfg_scale > 1.0;
    let negative = guided.then_some(job.negative_text());
    // Only the plain syntax cuts a prompt; A1111's reads any length in chunks.
    let plain = job.prompt_syntax == crate::prompt::PromptSyntax::Plain;
    if let Some(notice) = plain
        .then(|| crate::tokenizer::truncation_notice(&job.prompt, negative))
        .flatten()
    {
        on_event(Event::Notice(notice));
    }
    let cond = conditioning::encode(models, job, guided, &Ctx::from(plan.scratch))?;
    end_stage(models, &plan, models.spec.text_prefix);

    on_event(Event::Stage("denoise"));
    let denoise_peak = plan
        .stages
        .iter()
        .find(|s| s.name == "denoise")
        .map_or(u64::MAX, |s| s.peak_bytes);
    // Slack for what the model cannot see (binary, allocator) before the watch calls it a miss.
    let rss_limit = denoise_peak.saturating_add(plan.budget.margin_bytes);
    let watch = RefCell::new(Watch::new(
        &models.store,
        models.spec.unet_prefix,
        &models.unet.block_names(),
        plan.residency,
        &plan.pinned_blocks,
        plan.scratch,
        rss_limit,
    ));
    watch.borrow_mut().start();
    let mut model = |input: &[f32], t: f32| -> Result<Vec<f32>> {
        if cancelled() {
            return Err(Error::Interrupted);
        }
        let x = Tensor::new(shape.clone(), input.to_vec());
        // The tier in force for this call: the plan's, or the watch's tighter one.
        let cx = Ctx::from(watch.borrow().scratch());
        let mut after_block = |name: &str| watch.borrow_mut().after_block(name);
        let (unet, scale) = (&models.unet, job.cfg_scale);
        let eps = predict_noise(unet, &x, t, &cond, scale, &cx, &mut after_block);
        sampling::check_finite("UNet", || format!("at timestep {t}"), &eps)?;
        Ok(eps)
    };
    let total = schedule.timesteps.len();
    let mut on_step = |i: usize, _n: usize, x: &[f32]| {
        if let Some(notice) = watch.borrow_mut().take_notice() {
            on_event(Event::Notice(notice));
        }
        on_event(Event::Step {
            index: i + 1,
            total,
        });
        if crate::preview::due(job, i) {
            let latent = Tensor::new(shape.clone(), x.to_vec());
            match write_preview(models, job, &plan, &latent) {
                Ok(path) => on_event(Event::Preview { step: i + 1, path }),
                // A preview is a convenience: the run goes on without it.
                Err(e) => on_event(Event::Notice(format!("preview not written: {e}"))),
            }
        }
    };
    let latent = sampling::sample_observed(
        job.sampler,
        &schedule,
        models.prediction,
        initial,
        &mut model,
        noise,
        &mut on_step,
    )?;
    let latent = Tensor::new(shape.clone(), latent);
    let peak_cgroup_bytes = watch.borrow().peak_cgroup_bytes;
    end_stage(models, &plan, models.spec.unet_prefix);
    if cancelled() {
        return Err(Error::Interrupted);
    }

    on_event(Event::Stage("decode"));
    let vae_plan = VaePlan {
        band_rows: plan.vae_band_rows,
        // The tier the decoder's memory model was planned with (`nn::vae`), not the UNet's.
        scratch: Scratch::default(),
    };
    let image = match models
        .taesd
        .as_ref()
        .filter(|_| job.final_taesd().is_some())
    {
        Some(taesd) => decode_taesd(taesd, &latent)?,
        None => decode(
            &models.decoder,
            &latent,
            models.spec.vae_scaling_factor,
            &vae_plan,
        )?,
    };
    end_stage(models, &plan, models.spec.vae_prefix);
    Ok(Generated {
        image,
        latent,
        plan,
        peak_rss_bytes: memory::peak_rss_bytes().unwrap_or(0),
        peak_cgroup_bytes,
    })
}

/// Between stages: freed activations go back to the system, and unless the plan keeps the whole
/// model mapped, so do the finished stage's weight pages.
fn end_stage(models: &Models, plan: &Plan, weights_prefix: &str) {
    if plan.residency != governor::Residency::KeepAll {
        models.store.release(weights_prefix);
    }
    memory::release_free_memory();
}

/// The UNet's output for `x`, guided: with a [uncond, cond] conditioning the batch is run twice
/// over and combined as `u + scale·(c − u)`.
fn predict_noise(
    unet: &UNet,
    x: &Tensor,
    t: f32,
    cond: &Conditioning,
    scale: f32,
    cx: &Ctx,
    after_block: &mut dyn FnMut(&str),
) -> Vec<f32> {
    let mut trace = |name: &str, _: &Tensor| after_block(name);
    let added = cond.added.as_deref();
    if cond.batch == 1 {
        return unet
            .forward_added(x, &[t], &cond.context, added, cx, &mut trace)
            .data;
    }
    let mut shape = x.shape.clone();
    shape[0] = 2;
    let doubled = Tensor::new(shape, [x.data.as_slice(), x.data.as_slice()].concat());
    let eps = unet
        .forward_added(&doubled, &[t, t], &cond.context, added, cx, &mut trace)
        .data;
    let (uncond, cond) = eps.split_at(x.numel());
    uncond
        .iter()
        .zip(cond)
        .map(|(u, c)| u + scale * (c - u))
        .collect()
}

/// Decodes a sampler latent (divided by the family's `scaling_factor` first) to 8-bit RGB the way
/// diffusers post-processes: `round(clamp(x / 2 + 0.5, 0, 1) · 255)`.
/// Fails with `Error::NonFinite` when the VAE produced NaN or infinite values.
pub fn decode(
    decoder: &Decoder,
    latent: &Tensor,
    scaling_factor: f32,
    plan: &VaePlan,
) -> Result<RgbImage> {
    let z = Tensor::new(
        latent.shape.clone(),
        latent.data.iter().map(|v| v / scaling_factor).collect(),
    );
    let image = decoder.forward_planned(&z, plan);
    sampling::check_finite("VAE decoder", || "decoding the image".into(), &image.data)?;
    Ok(to_rgb(&image))
}

/// Decodes a sampler latent with TAESD (as it is: `AutoencoderTiny`'s scaling factor is 1) to
/// 8-bit RGB, post-processed as `decode` does.
pub fn decode_taesd(taesd: &Taesd, latent: &Tensor) -> Result<RgbImage> {
    let image = taesd.decode(latent)?;
    sampling::check_finite("TAESD decoder", || "decoding the image".into(), &image.data)?;
    Ok(to_rgb(&image))
}

/// Writes the preview of `latent` (`job.preview`) atomically; returns its path.
fn write_preview(models: &Models, job: &Job, plan: &Plan, latent: &Tensor) -> Result<PathBuf> {
    let image = match job.preview.mode {
        PreviewMode::None => return Err(Error::BadRequest("no preview mode".into())),
        PreviewMode::Proj => Projection::of(models.spec.family).image(latent),
        PreviewMode::Tae => {
            let taesd = models
                .taesd
                .as_ref()
                .ok_or_else(|| Error::BadRequest("--preview tae needs --taesd PATH".into()))?;
            decode_taesd(taesd, latent)?
        }
        PreviewMode::Vae => {
            let vae_plan = VaePlan {
                band_rows: plan.preview_vae_band_rows,
                scratch: Scratch::default(),
            };
            decode(
                &models.decoder,
                latent,
                models.spec.vae_scaling_factor,
                &vae_plan,
            )?
        }
    };
    let path = crate::preview::path(job);
    crate::output::write_png(&path, &image, "")?;
    memory::release_free_memory();
    Ok(path)
}

fn to_rgb(image: &Tensor) -> RgbImage {
    let (_, c, h, w) = image.nchw();
    assert_eq!(c, 3, "VAE output must be RGB");
    let mut pixels = vec![0u8; h * w * 3];
    for (ch, plane) in image.data.chunks(h * w).take(3).enumerate() {
        for (p, &v) in plane.iter().enumerate() {
            pixels[p * 3 + ch] = ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    RgbImage {
        width: w as u32,
        height: h as u32,
        pixels,
    }
}

/// Step noise drawn from the same generator as the initial latent, as diffusers does on a CPU.
struct LatentNoise<'a> {
    rng: &'a mut TorchRng,
    shape: &'a [usize],
}

impl NoiseSource for LatentNoise<'_> {
    fn noise(&mut self, len: usize) -> Vec<f32> {
        debug_assert_eq!(len, self.shape.iter().product::<usize>());
        self.rng.randn(self.shape)
    }
}
