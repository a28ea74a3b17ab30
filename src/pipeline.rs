//! Generation: job → load → encode → (img2img/inpaint: encode the image) → denoise → decode.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use std::cell::RefCell;

use crate::conditioning::{self, Conditioning};
use crate::error::{Error, Result};
use crate::governor::{self, memory, watch::Watch, Budget, Plan};
use crate::img2img;
use crate::init_image::InitImage;
use crate::job::{Job, PreviewMode};
use crate::kernels::scratch::Scratch;
use crate::kernels::{Isa, Mode, Precision};
use crate::nn::taesd::Taesd;
use crate::nn::unet::UNet;
use crate::nn::vae::{Decoder, Encoder, VaePlan};
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
    /// The mode the UNet's weight products ran in (`auto` resolved).
    pub precision: Mode,
}

impl Generated {
    /// The job as it ran, for its PNG parameters: `--precision auto` as the mode it resolved to.
    pub fn as_run(&self, job: &Job) -> Job {
        let precision = match self.precision {
            Mode::F32 => crate::job::Precision::F32,
            Mode::Bf16 => crate::job::Precision::Bf16,
            Mode::Int8 => crate::job::Precision::Int8,
        };
        Job {
            precision,
            ..job.clone()
        }
    }
}

/// The precision of a job's UNet calls: the job's mode, `auto` resolved against the type of the
/// UNet's linear weights (one attention projection stands for all) and the kernels' instruction
/// set (`kernels::precision::resolve`). Text encoders and the VAE always run in f32.
pub fn unet_precision(models: &Models, job: &Job) -> Precision {
    let isa = Isa::selected();
    let linear = models
        .store
        .tensors()
        .iter()
        .find(|t| {
            t.name.starts_with(models.spec.unet_prefix) && t.name.ends_with("attn1.to_q.weight")
        })
        .map(|t| t.dtype);
    Precision {
        mode: crate::kernels::precision::resolve(job.precision, linear, isa),
        isa,
    }
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
    generate_from(models, job, None, cancel, on_event)
}

/// As `generate_with_cancel`, starting from a picture when `init` is given: img2img
/// (`job.strength`), or inpainting when it carries a mask (`init.mask`; latent blending with a
/// 4-channel UNet, the mask and masked-image latent as extra input with a 9-channel one), as
/// diffusers' img2img and inpaint pipelines do. `init` must have the job's size. Every draw comes
/// from one torch CPU generator seeded with `job.seed`, in diffusers' order (`RngDraws`).
pub fn generate_from(
    models: &Models,
    job: &Job,
    init: Option<&InitImage>,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(Event),
) -> Result<Generated> {
    let mut draws = RngDraws(TorchRng::new(job.seed));
    run(models, job, init, &mut draws, Some(cancel), on_event)
}

/// As `generate_from`, with every random draw given by role (tests feed recorded diffusers noise).
pub fn generate_from_draws(
    models: &Models,
    job: &Job,
    init: Option<&InitImage>,
    draws: &mut dyn Draws,
    on_event: &mut dyn FnMut(Event),
) -> Result<Generated> {
    run(models, job, init, draws, None, on_event)
}

/// The random draws of one run, by role. With one generator (`RngDraws`) the roles share it in the
/// order the pipeline asks: diffusers' order (`vae.encode(..).latent_dist.sample` of the init
/// image, the initial/img2img noise, the masked image's, then the sampler's step noise).
pub trait Draws {
    /// The unit normal draw of a VAE encoding's `latent_dist.sample(generator)`.
    fn encode(&mut self, shape: &[usize]) -> Vec<f32>;
    /// The initial noise (txt2img, inpaint at strength 1) or img2img noise.
    fn initial(&mut self, shape: &[usize]) -> Vec<f32>;
    /// A sampler's step noise.
    fn step(&mut self, shape: &[usize]) -> Vec<f32>;
}

/// Every draw from one torch CPU generator, as diffusers with `generator=torch.Generator("cpu")`.
pub struct RngDraws(pub TorchRng);

impl Draws for RngDraws {
    fn encode(&mut self, shape: &[usize]) -> Vec<f32> {
        self.0.randn(shape)
    }
    fn initial(&mut self, shape: &[usize]) -> Vec<f32> {
        self.0.randn(shape)
    }
    fn step(&mut self, shape: &[usize]) -> Vec<f32> {
        self.0.randn(shape)
    }
}

/// [1, 4, H/8, W/8].
pub fn latent_shape(models: &Models, job: &Job) -> Vec<usize> {
    vec![
        1,
        models.latent_channels(),
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
    let mut draws = GivenNoise {
        initial: Some(initial),
        noise,
    };
    run(models, job, None, &mut draws, None, on_event)
}

/// txt2img's given noise as `Draws`.
struct GivenNoise<'a> {
    initial: Option<Vec<f32>>,
    noise: &'a mut dyn NoiseSource,
}

impl Draws for GivenNoise<'_> {
    fn encode(&mut self, _: &[usize]) -> Vec<f32> {
        unreachable!("txt2img encodes no image")
    }
    fn initial(&mut self, _: &[usize]) -> Vec<f32> {
        self.initial.take().expect("one initial latent")
    }
    fn step(&mut self, shape: &[usize]) -> Vec<f32> {
        self.noise.noise(shape.iter().product())
    }
}

fn run(
    models: &Models,
    job: &Job,
    init: Option<&InitImage>,
    draws: &mut dyn Draws,
    cancel: Option<&AtomicBool>,
    on_event: &mut dyn FnMut(Event),
) -> Result<Generated> {
    let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
    // The callers validated the job (files included); the picture itself is read below.
    job.validate_settings()?;
    // The plan first: it counts the picture's decode, so one too large for the budget is refused
    // before it is read.
    let plan = plan(models, job)?;
    on_event(Event::Planned(Box::new(plan.clone())));
    // The job's init image and mask, read here unless the caller handed them over.
    let loaded = match init {
        None => crate::init_image::load(job)?,
        Some(_) => None,
    };
    if let Some(notice) = loaded.as_ref().and_then(InitImage::notice) {
        on_event(Event::Notice(notice));
    }
    let init = init.or(loaded.as_ref());
    check_init(models, job, init)?;
    let full = sampling::schedule(job.sampler, job.scheduler, job.steps as usize)?;
    // img2img and inpaint run the last int(steps × strength) steps of the full schedule.
    let schedule = match init {
        Some(_) => full.begin_at(img2img::t_start(job.steps, job.strength))?,
        None => full,
    };
    let shape = latent_shape(models, job);

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
    // The job's LoRAs, read and mapped once; every network call of the job sees them.
    let lora = crate::lora::build(models, job)?;
    let cx = Ctx::from(plan.scratch).with_lora(lora.clone());
    let cond = conditioning::encode(models, job, guided, &cx)?;
    end_stage(models, &plan, models.spec.text_prefix);

    let start = match init {
        None => {
            let initial = draws.initial(&shape);
            assert_eq!(initial.len(), numel(&shape), "initial noise size");
            let sigma = schedule.init_noise_sigma;
            Start {
                latent: initial.into_iter().map(|v| v * sigma).collect(),
                blend: None,
                unet_extra: None,
            }
        }
        Some(init) => {
            if cancelled() {
                return Err(Error::Interrupted);
            }
            on_event(Event::Stage("encode_image"));
            let start = prepare_init(models, job, init, &schedule, &shape, draws, &plan)?;
            end_stage(models, &plan, models.spec.vae_prefix);
            start
        }
    };

    let Start {
        latent: start_latent,
        blend,
        unet_extra,
    } = start;

    on_event(Event::Stage("denoise"));
    let precision = unet_precision(models, job);
    if job.precision == crate::job::Precision::Int8 && precision.mode != Mode::Int8 {
        on_event(Event::Notice(
            "--precision int8 needs q8_0, q5_0 or q4_0 weights (`sdcap quantize`); this model's \
             UNet products run in f32"
                .into(),
        ));
    }
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
        let x = match &unet_extra {
            None => Tensor::new(shape.clone(), input.to_vec()),
            // 9-channel inpainting UNet: [latent (scaled), mask, masked-image latent].
            Some(extra) => {
                let mut s = shape.clone();
                s[1] += extra.len() / (s[2] * s[3]);
                Tensor::new(s, [input, extra.as_slice()].concat())
            }
        };
        // The tier in force for this call: the plan's, or the watch's tighter one.
        let cx = Ctx {
            scratch: watch.borrow().scratch(),
            precision,
            lora: lora.clone(),
        };
        let mut after_block = |name: &str| watch.borrow_mut().after_block(name);
        let (unet, scale) = (&models.unet, job.cfg_scale);
        let eps = predict_noise(unet, &x, t, &cond, scale, &cx, &mut after_block);
        sampling::check_finite("UNet", || format!("at timestep {t}"), &eps)?;
        Ok(eps)
    };
    let total = schedule.timesteps.len();
    let blend = blend.as_ref();
    let mut on_step = |i: usize, n: usize, x: &mut [f32]| {
        if let Some(blend) = blend {
            blend.apply(&schedule, i, n, x);
        }
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
    let mut noise = StepNoise {
        draws,
        shape: &shape,
    };
    let latent = sampling::sample_from(
        job.sampler,
        &schedule,
        models.prediction,
        start_latent,
        &mut model,
        &mut noise,
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
        precision: precision.mode,
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
    // One output per batch row (4 channels, whatever the input has: 9 for inpainting UNets).
    let (uncond, cond) = eps.split_at(eps.len() / 2);
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

/// The sampler's step noise from the run's draws.
struct StepNoise<'a> {
    draws: &'a mut dyn Draws,
    shape: &'a [usize],
}

impl NoiseSource for StepNoise<'_> {
    fn noise(&mut self, len: usize) -> Vec<f32> {
        debug_assert_eq!(len, numel(self.shape));
        self.draws.step(self.shape)
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Where the sampler starts and what it needs besides the latent.
struct Start {
    /// The start latent (txt2img: noise × `init_noise_sigma`; img2img: `add_noise` of the init
    /// latents).
    latent: Vec<f32>,
    /// Inpainting with a 4-channel UNet: blend after every model evaluation.
    blend: Option<Blend>,
    /// Inpainting with a 9-channel UNet: the mask and masked-image latent, channels after the
    /// latent's ([1, 5, h, w] flattened).
    unet_extra: Option<Vec<f32>>,
}

/// diffusers' latent blending for inpainting with a 4-channel UNet: after `scheduler.step` (each
/// model evaluation), `latents = (1 - m) * init_latents_proper + m * latents`, where
/// `init_latents_proper` is the init latents noised to the next table entry with the same noise,
/// or the clean init latents after the last.
struct Blend {
    image_latents: Vec<f32>,
    noise: Vec<f32>,
    /// [h * w], 1 = repaint.
    mask: Vec<f32>,
}

impl Blend {
    fn apply(&self, schedule: &sampling::Schedule, call: usize, calls: usize, x: &mut [f32]) {
        let proper = if call + 1 < calls {
            schedule.add_noise(call + 1, &self.image_latents, &self.noise)
        } else {
            self.image_latents.clone()
        };
        let plane = self.mask.len();
        for (i, (v, p)) in x.iter_mut().zip(&proper).enumerate() {
            let m = self.mask[i % plane];
            *v = (1.0 - m) * p + m * *v;
        }
    }
}

/// Refuses an init image that does not fit the job or the model (one line, before any work).
fn check_init(models: &Models, job: &Job, init: Option<&InitImage>) -> Result<()> {
    // The plan counts an init image and a mask from the job's fields: they must agree with what is
    // handed over (a job naming a picture never silently runs as txt2img).
    let given = (init.is_some(), init.is_some_and(|i| i.mask.is_some()));
    if given != (job.init_image.is_some(), job.mask.is_some()) {
        return Err(Error::BadRequest(format!(
            "the job names {} but the pipeline was given {} (hand over the job's own picture, or none)",
            describe(job.init_image.is_some(), job.mask.is_some()),
            describe(given.0, given.1)
        )));
    }
    let Some(init) = init else {
        if models.inpaint_unet {
            return Err(Error::BadRequest(
                "this is an inpainting model (9-channel UNet): it needs an init image and a mask"
                    .into(),
            ));
        }
        return Ok(());
    };
    let (h, w) = (job.height as usize, job.width as usize);
    if init.image.shape != [1, 3, h, w] {
        return Err(Error::BadRequest(format!(
            "init image tensor is {:?}, the job needs [1, 3, {h}, {w}]",
            init.image.shape
        )));
    }
    if let Some(mask) = &init.mask {
        if mask.shape != [1, 1, h, w] {
            return Err(Error::BadRequest(format!(
                "mask tensor is {:?}, the job needs [1, 1, {h}, {w}]",
                mask.shape
            )));
        }
    } else if models.inpaint_unet {
        return Err(Error::BadRequest(
            "this is an inpainting model (9-channel UNet): it needs a mask (--mask)".into(),
        ));
    }
    if models.encoder.is_none() {
        return Err(Error::UnsupportedModel(
            "this model's VAE has no encoder, which an init image needs".into(),
        ));
    }
    Ok(())
}

fn describe(image: bool, mask: bool) -> &'static str {
    match (image, mask) {
        (false, _) => "no init image",
        (true, false) => "an init image",
        (true, true) => "an init image and a mask",
    }
}

/// What encodes the init (and masked) image: the VAE, or TAESD when it decodes the job's image
/// (`--taesd` without `--taesd-preview-only`, as stable-diffusion.cpp uses it for both).
enum ImageEncoder<'a> {
    /// `vae.encode(image).latent_dist.sample(generator) * scaling_factor`: `mean + std * draw`
    /// with `std = exp(0.5 * logvar)` (logvar clamped to [-30, 20] by the encoder), in float32.
    Vae(&'a Encoder, f32),
    /// `AutoencoderTiny.encode(image).latents`: deterministic, in the sampler's scale (factor 1),
    /// and, as diffusers' `retrieve_latents` takes `.latents`, no draw from the generator.
    Taesd(&'a Taesd),
}

impl ImageEncoder<'_> {
    fn latents(&self, image: &Tensor, draws: &mut dyn Draws, plan: &Plan) -> Result<Vec<f32>> {
        let (encoder, scaling) = match self {
            ImageEncoder::Taesd(taesd) => {
                let z = taesd.encode(image)?;
                sampling::check_finite(
                    "TAESD encoder",
                    || "encoding the init image".into(),
                    &z.data,
                )?;
                return Ok(z.data);
            }
            ImageEncoder::Vae(encoder, scaling) => (encoder, *scaling),
        };
        // Bands the plan chose, at the first scratch tier, which the encoder's memory model counts.
        let dist = encoder.forward_planned(
            image,
            &VaePlan {
                band_rows: plan.encode_band_rows,
                scratch: Scratch::default(),
            },
        );
        sampling::check_finite(
            "VAE encoder",
            || "encoding the init image".into(),
            &dist.mean.data,
        )?;
        let draw = draws.encode(&dist.mean.shape);
        Ok(dist
            .mean
            .data
            .iter()
            .zip(&dist.logvar.data)
            .zip(&draw)
            .map(|((m, lv), z)| scaling * (m + (0.5 * lv).exp() * z))
            .collect())
    }

    /// The draw an encoding takes without encoding (the masked image a 4-channel UNet never reads):
    /// the VAE's sample draws, TAESD's takes none.
    fn skip(&self, draws: &mut dyn Draws, shape: &[usize]) {
        if let ImageEncoder::Vae(..) = self {
            let _ = draws.encode(shape);
        }
    }
}

/// Encodes the init image (and for inpainting the masked image) and makes the start latent, with
/// the draws in diffusers' order:
/// img2img: image encode, noise. Inpaint, 4-channel UNet: image encode, noise, masked-image encode
/// (drawn though unused: only the draw is taken, nothing is encoded). Inpaint, 9-channel UNet:
/// image encode only below strength 1, noise, masked-image encode. A TAESD encode draws nothing.
fn prepare_init(
    models: &Models,
    job: &Job,
    init: &InitImage,
    schedule: &sampling::Schedule,
    shape: &[usize],
    draws: &mut dyn Draws,
    plan: &Plan,
) -> Result<Start> {
    let encoder = match (job.final_taesd(), &models.taesd) {
        (Some(_), Some(taesd)) => ImageEncoder::Taesd(taesd),
        _ => ImageEncoder::Vae(
            models.encoder.as_ref().expect("checked by check_init"),
            models.spec.vae_scaling_factor,
        ),
    };
    let full_strength = img2img::t_start(job.steps, job.strength) == 0;
    let Some(mask) = &init.mask else {
        let image_latents = encoder.latents(&init.image, draws, plan)?;
        let noise = draws.initial(shape);
        return Ok(Start {
            latent: schedule.add_noise(0, &image_latents, &noise),
            blend: None,
            unet_extra: None,
        });
    };
    let mask = img2img::binarize(mask);
    let latent_mask = img2img::latent_mask(&mask).data;
    // diffusers encodes the image when it blends (4 channels) or starts from it (strength < 1).
    let image_latents = if !models.inpaint_unet || !full_strength {
        Some(encoder.latents(&init.image, draws, plan)?)
    } else {
        None
    };
    let noise = draws.initial(shape);
    // At strength 1 inpainting starts from pure noise as txt2img does; below, as img2img.
    let latent = match (&image_latents, full_strength) {
        (Some(x0), false) => schedule.add_noise(0, x0, &noise),
        _ => noise
            .iter()
            .map(|v| v * schedule.init_noise_sigma)
            .collect(),
    };
    if models.inpaint_unet {
        let masked = img2img::masked_image(&init.image, &mask);
        let masked_latents = encoder.latents(&masked, draws, plan)?;
        let extra = [latent_mask.as_slice(), masked_latents.as_slice()].concat();
        Ok(Start {
            latent,
            blend: None,
            unet_extra: Some(extra),
        })
    } else {
        // The masked image's encoding draw, which a 4-channel UNet never uses.
        encoder.skip(draws, shape);
        Ok(Start {
            latent,
            blend: Some(Blend {
                image_latents: image_latents.expect("encoded for blending"),
                noise,
                mask: latent_mask,
            }),
            unet_extra: None,
        })
    }
}
