//! The planner: every stage's predicted peak from shapes and dtypes, the residency that fits, or a
//! refusal with numbers before anything heavy is touched.

use serde::Serialize;

use super::budget::Budget;
use super::stream;
use crate::error::{Error, Result};
use crate::job::{Job, PreviewMode};
use crate::kernels::scratch::{Scratch, SMALLEST, TIERS};
use crate::models::Models;
use crate::nn::vae::VaePlan;

const MIB: u64 = 1 << 20;
/// The standard TAESD decoder's file in F32 (1,222,531 parameters), for the refusal's hint.
const TAESD_DECODER_F32_BYTES: u64 = 1_222_531 * 4;

/// What happens to mapped weight pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Residency {
    /// Keep every stage's weights mapped for the whole run and between jobs (fastest: the model is
    /// read from disk once per process).
    KeepAll,
    /// Keep the stage's weights mapped while it runs and release them when it ends.
    Keep,
    /// Read each UNet block while the one before it runs and release its pages after it ran, so
    /// only that pair is charged, and every step reads the UNet again from disk; the room left
    /// pins blocks (`stream`).
    Stream,
}

/// One stage's prediction.
#[derive(Clone, Debug, Serialize)]
pub struct Stage {
    pub name: &'static str,
    /// Activations and kernel scratch.
    pub activation_bytes: u64,
    /// Mapped weight pages charged while the stage runs.
    pub weight_bytes: u64,
    pub peak_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub budget: Budget,
    pub residency: Residency,
    /// The kernels' scratch budgets for the text encoder and the UNet (every tier gives the same
    /// bits). The decode runs at the first tier; its lever is `vae_band_rows`.
    pub scratch: Scratch,
    /// VAE decode: rows per stored band of each feature map (None = whole maps). Every choice gives
    /// the same output bits (`nn::vae`), so this only trades memory.
    pub vae_band_rows: Option<usize>,
    /// VAE encode of the init image (img2img, inpaint; the "image_encode" stage): rows per band
    /// as `vae_band_rows` (None = whole maps; unused without an init image).
    pub encode_band_rows: Option<usize>,
    /// `--preview vae`: the VAE's band rows for the previews, which run while the UNet's weights
    /// are still charged (None = whole maps, or no VAE previews).
    pub preview_vae_band_rows: Option<usize>,
    /// Streaming: the UNet blocks kept mapped for the whole denoise (read once), as many as the
    /// denoise stage's budget leaves room for (`stream::pin`); the others are read every step.
    pub pinned_blocks: Vec<String>,
    /// The job's LoRAs (`lora::planned_bytes`: mapped file pages, f32 terms, LoHa scratch), held
    /// for the whole job and counted in every stage's peak.
    pub lora_bytes: u64,
    pub stages: Vec<Stage>,
}

impl Plan {
    pub fn peak_bytes(&self) -> u64 {
        self.stages.iter().map(|s| s.peak_bytes).max().unwrap_or(0)
    }

    pub fn fits(&self) -> bool {
        self.peak_bytes() <= self.budget.usable_bytes()
    }
}

pub const RESIDENCIES: [Residency; 3] = [Residency::KeepAll, Residency::Keep, Residency::Stream];

/// The fastest plan whose predicted peak fits the budget, or `Error::CapTooSmall`. Candidates in
/// order: each scratch tier, fastest first, and within it each residency (keeping weights saves
/// re-reading them). Smaller scratch costs every step (the third tier's smaller Winograd patch
/// and panel: 1.2× per 512² step), while streaming cost a 512² step 0.96–1.08× of uncapped
/// (`benches/stream.sh`, `benches/CAPS.md`), so the tiers are the last resort. A streaming plan
/// then pins what the budget leaves room for (`pin_blocks`).
pub fn plan(models: &Models, job: &Job, budget: &Budget) -> Result<Plan> {
    let plans: Vec<Plan> = TIERS
        .iter()
        .flat_map(|&t| RESIDENCIES.iter().map(move |&r| (r, t)))
        .map(|(r, t)| predict(models, job, budget, r, t))
        .collect();
    if let Some(fitting) = plans.iter().find(|p| p.fits()) {
        let mut plan = fitting.clone();
        if plan.residency == Residency::Stream {
            pin_blocks(models, &mut plan);
        }
        return Ok(plan);
    }
    let smallest = plans
        .iter()
        .min_by_key(|p| p.peak_bytes())
        .expect("at least one candidate");
    Err(Error::CapTooSmall {
        needed_mib: smallest.peak_bytes().div_ceil(MIB),
        available_mib: budget.usable_bytes() / MIB,
        // The candidates end with streaming at the smallest tier: the 4-bit estimate starts there.
        hint: hint(
            models,
            job,
            budget,
            plans.last().expect("at least one candidate"),
        ),
    })
}

/// Predicts every stage for one residency and scratch tier.
pub fn predict(
    models: &Models,
    job: &Job,
    budget: &Budget,
    residency: Residency,
    scratch: Scratch,
) -> Plan {
    let store = &models.store;
    let spec = models.spec;
    let (lh, lw) = (job.height as usize / 8, job.width as usize / 8);
    let batch = if job.cfg_scale > 1.0 { 2 } else { 1 };
    let threads = rayon::current_num_threads();

    let all_weights = store.bytes_with_prefix(spec.text_prefix)
        + store.bytes_with_prefix(spec.unet_prefix)
        + store.bytes_with_prefix(spec.vae_prefix);
    let text_weights = match residency {
        Residency::KeepAll => all_weights,
        _ => store.bytes_with_prefix(spec.text_prefix),
    };
    // Context tokens per prompt: 77 per chunk of a long prompt (a prompt the job cannot read was
    // refused by `Job::validate`; one chunk stands for it here).
    let tokens = crate::conditioning::context_tokens(job, batch == 2).unwrap_or(77);
    // The encoders run one after another, every chunk of 77 tokens a sequence of the batch: the
    // widest one's working set (hidden states, q/k/v, attention output and the 4× MLP for all
    // tokens, plus the kernels' scratch: no convolutions; weight rows up to the MLP's 4× width;
    // 77 keys, heads at most the full width), plus every encoder's output kept for the context.
    let widths = models.text_encoders.iter().map(|e| e.width() as u64);
    let width = widths.clone().max().unwrap_or(0);
    let outputs = (batch * tokens) as u64 * 4 * widths.sum::<u64>();
    let text_scratch = scratch.peak_bytes(4 * width as usize, 0, (77, width as usize), threads);
    let text_activations = ((batch * tokens) as u64 * width * 4 * 12)
        .saturating_add(text_scratch)
        .saturating_add(outputs);

    let unet_activations =
        models
            .unet
            .peak_activation_bytes(batch, (lh, lw), tokens, &scratch, threads);
    // Latent, noise, sampler history, what the model file's metadata keeps resident, the LoRAs;
    // with an init image, what img2img/inpainting holds through every stage (image, mask, init
    // latents, noise, blend, masked-image latent: `img2img::held_bytes`).
    let lora_bytes = crate::lora::planned_bytes(job, (batch * lh * lw).max(batch * tokens));
    let latents = ((lh * lw * 4 * 4 * 4) as u64)
        .saturating_add(store.metadata_bytes())
        .saturating_add(lora_bytes)
        .saturating_add(crate::img2img::held_bytes(job));
    let unet_weights = match residency {
        Residency::KeepAll => all_weights,
        Residency::Keep => store.bytes_with_prefix(spec.unet_prefix),
        // Nothing pinned yet (`pin_blocks` fills the room the budget leaves).
        Residency::Stream => {
            let blocks = unet_block_bytes(models);
            stream_charge(models, &blocks, &vec![false; blocks.len()])
        }
    };

    let vae_weights = match residency {
        Residency::KeepAll => all_weights,
        _ => {
            store.bytes_with_prefix(&format!("{}decoder.", spec.vae_prefix))
                + store.bytes_with_prefix(&format!("{}post_quant_conv.", spec.vae_prefix))
        }
    };
    // The decode gets what its weights leave; the smallest bands are the floor if nothing fits.
    let decode_room = budget
        .usable_bytes()
        .saturating_sub(vae_weights.saturating_add(latents));
    let vae_plan =
        VaePlan::fitting(&models.decoder, lh, lw, decode_room).unwrap_or(VaePlan::banded(1));
    let vae_activations = models.decoder.peak_bytes(lh, lw, &vae_plan);
    // `--taesd` decodes instead (unless only for previews): its banded maps and its file's pages.
    let final_taesd = models
        .taesd
        .as_ref()
        .filter(|_| job.final_taesd().is_some());
    let (decode_activations, decode_weights) = match final_taesd {
        Some(t) => (
            t.decode_peak_bytes(lh, lw),
            match residency {
                Residency::KeepAll => all_weights.saturating_add(t.weight_bytes),
                _ => t.weight_bytes,
            },
        ),
        None => (vae_activations, vae_weights),
    };
    // Previews run between steps, with the UNet's weights still charged: their decoder's
    // working set and weights on top (`pin_blocks` keeps the two stages' UNet charge equal).
    let taesd_weights = models.taesd.as_ref().map_or(0, |t| t.weight_bytes);
    let keep_all = residency == Residency::KeepAll;
    let (preview_activations, preview_weights, preview_vae_band_rows) = match job.preview.mode {
        PreviewMode::None => (0, 0, None),
        PreviewMode::Proj => (((lh * lw * 3) as u64).saturating_mul(8), 0, None),
        PreviewMode::Tae => (
            models
                .taesd
                .as_ref()
                .map_or(0, |t| t.decode_peak_bytes(lh, lw)),
            // Not part of the model's file: charged under every residency.
            taesd_weights,
            None,
        ),
        PreviewMode::Vae => {
            let weights = if keep_all { 0 } else { vae_weights };
            let room = budget
                .usable_bytes()
                .saturating_sub(unet_weights.saturating_add(weights).saturating_add(latents));
            let plan =
                VaePlan::fitting(&models.decoder, lh, lw, room).unwrap_or(VaePlan::banded(1));
            (
                models.decoder.peak_bytes(lh, lw, &plan),
                weights,
                plan.band_rows,
            )
        }
    };
    // The final image's pixels, kept from the decode to the write (a preview's likewise).
    let image_bytes = (job.width as u64) * (job.height as u64) * 3;

    // img2img / inpaint: the picture(s) read, then VAE-encoded (the inpaint masked image after
    // the image, one at a time), with the tensors `init_image::load` returns alive throughout.
    let (side_h, side_w) = (job.height as u64, job.width as u64);
    let init_tensors = match &job.mask {
        // Image, mask and the masked image (3 + 1 + 3 planes).
        Some(_) => side_h.saturating_mul(side_w).saturating_mul(7 * 4),
        None => side_h.saturating_mul(side_w).saturating_mul(3 * 4),
    };
    let encoder_weights = match residency {
        Residency::KeepAll => all_weights,
        _ => {
            store.bytes_with_prefix(&format!("{}encoder.", spec.vae_prefix))
                + store.bytes_with_prefix(&format!("{}quant_conv.", spec.vae_prefix))
        }
    };
    let (encode_plan, encode_activations) = match &models.encoder {
        Some(encoder) if job.init_image.is_some() => {
            let (h, w) = (job.height as usize, job.width as usize);
            let room = budget.usable_bytes().saturating_sub(
                encoder_weights
                    .saturating_add(latents)
                    .saturating_add(init_tensors),
            );
            let plan = VaePlan::fitting_encoder(encoder, h, w, room).unwrap_or(VaePlan::banded(1));
            let peak = encoder.peak_bytes(h, w, &plan).saturating_add(init_tensors);
            (plan, peak.max(crate::init_image::load_peak_bytes(job)))
        }
        _ => (VaePlan::default(), crate::init_image::load_peak_bytes(job)),
    };

    let stage = |name, activation_bytes: u64, weight_bytes: u64| Stage {
        name,
        activation_bytes,
        weight_bytes,
        peak_bytes: activation_bytes
            .saturating_add(weight_bytes)
            .saturating_add(latents),
    };
    Plan {
        budget: budget.clone(),
        residency,
        scratch,
        vae_band_rows: vae_plan.band_rows,
        encode_band_rows: encode_plan.band_rows,
        preview_vae_band_rows,
        pinned_blocks: Vec::new(),
        lora_bytes,
        stages: [
            Some(stage("encode", text_activations, text_weights)),
            job.init_image
                .is_some()
                .then(|| stage("image_encode", encode_activations, encoder_weights)),
            Some(stage("denoise", unet_activations, unet_weights)),
            (job.preview.mode != PreviewMode::None).then(|| {
                stage(
                    "preview",
                    preview_activations.saturating_add(image_bytes),
                    unet_weights.saturating_add(preview_weights),
                )
            }),
            Some(stage("decode", decode_activations, decode_weights)),
        ]
        .into_iter()
        .flatten()
        .collect(),
    }
}

/// Bytes of each UNet block's weights, in execution order (the units streaming moves).
pub fn unet_block_bytes(models: &Models) -> Vec<u64> {
    models
        .unet
        .block_names()
        .iter()
        .map(|b| {
            models
                .store
                .bytes_with_prefix(&format!("{}{b}.", models.spec.unet_prefix))
        })
        .collect()
}

/// UNet weights outside the blocks (time embedding, conv_in, out): mapped for the whole denoise.
fn unet_resident_bytes(models: &Models, block_bytes: &[u64]) -> u64 {
    models
        .store
        .bytes_with_prefix(models.spec.unet_prefix)
        .saturating_sub(block_bytes.iter().sum())
}

/// UNet weight pages charged while streaming with `pinned` blocks (a flag per block of
/// `unet_block_bytes`): what stays mapped plus the worst streamed pair.
pub fn stream_weight_bytes(models: &Models, pinned: &[bool]) -> u64 {
    stream_charge(models, &unet_block_bytes(models), pinned)
}

fn stream_charge(models: &Models, block_bytes: &[u64], pinned: &[bool]) -> u64 {
    unet_resident_bytes(models, block_bytes).saturating_add(stream::peak_bytes(block_bytes, pinned))
}

/// Pins as many UNet blocks in a fitting streaming plan as the budget leaves the denoise stage
/// room for, and charges them.
fn pin_blocks(models: &Models, plan: &mut Plan) {
    let usable = plan.budget.usable_bytes();
    let Some(unpinned) = plan
        .stages
        .iter()
        .find(|s| s.name == "denoise")
        .map(|s| s.weight_bytes)
    else {
        return;
    };
    // The denoise and the previews between its steps carry the same UNet charge; what else each
    // holds is the rest of its peak.
    let charged = |s: &Stage| s.name == "denoise" || s.name == "preview";
    let others = plan
        .stages
        .iter()
        .filter(|s| charged(s))
        .map(|s| s.peak_bytes - unpinned)
        .max()
        .unwrap_or(0);
    let blocks = unet_block_bytes(models);
    let room = usable.saturating_sub(others.saturating_add(unet_resident_bytes(models, &blocks)));
    let pinned = stream::pin(&blocks, room);
    let names = models.unet.block_names();
    plan.pinned_blocks = (0..blocks.len())
        .filter(|&b| pinned[b])
        .map(|b| names[b].clone())
        .collect();
    let charge = stream_charge(models, &blocks, &pinned);
    for stage in plan.stages.iter_mut().filter(|s| charged(s)) {
        let rest = stage.peak_bytes - unpinned;
        stage.weight_bytes = stage.weight_bytes - unpinned + charge;
        stage.peak_bytes = rest + charge;
    }
}

/// What would fit instead: a smaller image, or a 4-bit model; `smallest` is this job's plan
/// streaming weights at the smallest scratch tier.
fn hint(models: &Models, job: &Job, budget: &Budget, smallest: &Plan) -> String {
    let mut parts = Vec::new();
    let mut side = job.width.max(job.height);
    while side > 64 {
        side = (side * 3 / 4) / 64 * 64;
        let scale = |v: u32| {
            (v as u64 * side as u64 / job.width.max(job.height) as u64).max(64) as u32 / 8 * 8
        };
        let smaller = Job {
            width: scale(job.width),
            height: scale(job.height),
            ..job.clone()
        };
        let p = predict(models, &smaller, budget, Residency::Stream, SMALLEST);
        if p.fits() {
            parts.push(format!(
                "{}x{} (needs {} MiB)",
                smaller.width,
                smaller.height,
                p.peak_bytes().div_ceil(MIB)
            ));
            break;
        }
    }
    // TAESD instead of the VAE decode, when the decode is what does not fit: the standard TAESD
    // decoder's memory model (F32 file pages, ~4.7 MiB, charged) in place of the VAE's stage.
    let usable = budget.usable_bytes();
    let decode = smallest.stages.iter().find(|s| s.name == "decode");
    if let Some(decode) = decode.filter(|d| d.peak_bytes > usable && job.final_taesd().is_none()) {
        let (lh, lw) = (job.height as usize / 8, job.width as usize / 8);
        let latents = decode.peak_bytes - decode.activation_bytes - decode.weight_bytes;
        let taesd = crate::nn::taesd::standard_decode_peak_bytes(4, lh, lw)
            .saturating_add(TAESD_DECODER_F32_BYTES)
            .saturating_add(latents);
        let needed = smallest
            .stages
            .iter()
            .filter(|s| s.name != "decode")
            .map(|s| s.peak_bytes)
            .fold(taesd, u64::max);
        if needed <= usable {
            parts.push(format!(
                "a TAESD decode (`--taesd taesd_decoder.safetensors`, needs about {} MiB)",
                needed.div_ceil(MIB)
            ));
        }
    }
    // A 4-bit model: q4_0 keeps 18 bytes per 32 weights, so every stage's weight pages shrink by
    // that ratio; suggested only when it then fits.
    let bytes = models.store.bytes_with_prefix("");
    let values: u64 = models
        .store
        .tensors()
        .iter()
        .map(|t| t.numel() as u64)
        .sum();
    let ratio = values as f64 * 18.0 / 32.0 / bytes.max(1) as f64;
    if ratio < 0.9 {
        let needed = smallest
            .stages
            .iter()
            .map(|s| {
                let weights = (s.weight_bytes as f64 * ratio) as u64;
                (s.peak_bytes - s.weight_bytes).saturating_add(weights)
            })
            .max()
            .unwrap_or(0);
        if needed <= budget.usable_bytes() {
            parts.push(format!(
                "a 4-bit model (`sdcap quantize --type q4_0`, needs about {} MiB)",
                needed.div_ceil(MIB)
            ));
        }
    }
    if parts.is_empty() {
        "a larger cap".into()
    } else {
        parts.join(" or ")
    }
}
