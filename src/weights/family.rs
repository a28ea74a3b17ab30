//! Which model family a store holds, from its key names and a few shapes.
//!
//! sdcap runs SD1.x, SD2.x and SDXL (`crate::family`). Other families are recognised by their telltale
//! keys so that the user gets one line naming what they passed ("SD3 / SD3.5 is not supported yet")
//! instead of a missing-tensor error deep in the UNet.

use super::key_map::{TEXT_PREFIX, UNET_PREFIX};
use super::TensorStore;
use crate::error::{Error, Result};
pub use crate::family::Family;
use crate::family::Prediction;

/// The widths of an SD1.x model, read from its tensor shapes (SD1.5: 4, 320, 768, 768, 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sd1Dims {
    /// Latent channels the UNet takes (`conv_in` input; 4 for text-to-image models).
    pub in_channels: usize,
    /// UNet base width (`conv_in` output, LDM's `model_channels`).
    pub model_channels: usize,
    /// Width of the text context the UNet cross-attends to (`attn2.to_k` input).
    pub context_dim: usize,
    /// CLIP text encoder hidden width.
    pub text_width: usize,
    /// Latent channels of the VAE (`decoder.conv_in` input).
    pub latent_channels: usize,
}

/// The error for a family we recognise but do not run.
pub(super) fn unsupported(family: &str) -> Error {
    Error::UnsupportedModel(format!(
        "{family} is not supported yet (sdcap runs SD1.x, SD2.x and SDXL)"
    ))
}

/// Names the family of the model in `store`, or says in one line what it is instead.
pub fn detect_family(store: &TensorStore) -> Result<Family> {
    let has_prefix = |prefix: &str| store.tensors().iter().any(|t| t.name.starts_with(prefix));
    let has_part = |part: &str| store.tensors().iter().any(|t| t.name.contains(part));
    if has_prefix("model.diffusion_model.joint_blocks.") {
        return Err(unsupported("SD3 / SD3.5"));
    }
    if has_prefix("double_blocks.") || has_prefix("model.diffusion_model.double_blocks.") {
        return Err(unsupported("Flux"));
    }
    let family =
        if has_prefix("conditioner.embedders.") || has_prefix("model.diffusion_model.label_emb.") {
            if has_part(".time_stack.") {
                return Err(unsupported("Stable Video Diffusion"));
            }
            // The refiner has one text encoder (bigG) under `conditioner.embedders.0.model.`.
            if !has_prefix("conditioner.embedders.1.") {
                return Err(unsupported("SDXL refiner"));
            }
            Family::Sdxl
        } else if has_prefix("cond_stage_model.model.") {
            Family::Sd2
        } else if context_dims(store).contains(&1024) {
            // An SD2 UNet with an SD1-style (transformers-named) text encoder is not a file anyone ships.
            return Err(unsupported("SD2.x UNet with a CLIP ViT-L text encoder"));
        } else {
            Family::Sd1
        };
    if !store.contains(&format!("{UNET_PREFIX}input_blocks.0.0.weight")) {
        return Err(Error::UnsupportedModel(unknown_hint(store)));
    }
    let in_channels = conv_in(store)?.1;
    // 4: text-to-image; 9: inpainting (latent, mask, masked-image latent; `Models::inpaint_unet`).
    if in_channels != 4 && in_channels != 9 {
        return Err(Error::UnsupportedModel(format!(
            "this {family} UNet takes {in_channels} input channels (an instruct-pix2pix model?); \
             sdcap runs 4-channel text-to-image and 9-channel inpainting models"
        )));
    }
    Ok(family)
}

/// Where the prediction type came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionSource {
    /// `--prediction`.
    Flag,
    /// The file's metadata (`modelspec.prediction_type`, a `prediction_type` key) or a `v_pred` tensor.
    File,
    /// The weights (SD2.x: the spread of a late LayerNorm bias, as ComfyUI decides).
    Weights,
    /// The family's default.
    Family,
}

/// The model's prediction type when the user did not say, and why: the file's metadata, a `v_pred`
/// marker tensor, then (SD2.x only) the weights, then the family's default.
///
/// The weights rule is ComfyUI's (`supported_models.SD20.model_type`): v-prediction SD2 models were
/// fine-tuned from the 512 eps base at 768², which left the last output block's first transformer
/// LayerNorm bias spread wide (population std > 0.09); eps models keep it near zero. ComfyUI reads
/// `output_blocks.11` (SD2's last); we read the last output block that has a transformer, which is
/// the same block for SD2 and exists in smaller models of the same structure.
pub fn detect_prediction(store: &TensorStore, family: Family) -> (Prediction, PredictionSource) {
    for (key, value) in store.metadata_strings() {
        if key == "modelspec.prediction_type" || key == "prediction_type" {
            if let Ok(p) = value.trim().parse::<Prediction>() {
                return (p, PredictionSource::File);
            }
        }
    }
    if store.contains("v_pred") {
        return (Prediction::V, PredictionSource::File);
    }
    if family == Family::Sd2 {
        if let Some(std) = late_norm_bias_std(store) {
            let p = if std > 0.09 {
                Prediction::V
            } else {
                Prediction::Eps
            };
            return (p, PredictionSource::Weights);
        }
    }
    (family.spec().prediction, PredictionSource::Family)
}

/// Population std of `output_blocks.N.1.transformer_blocks.0.norm1.bias` for the last such N.
fn late_norm_bias_std(store: &TensorStore) -> Option<f64> {
    let suffix = ".1.transformer_blocks.0.norm1.bias";
    let prefix = format!("{UNET_PREFIX}output_blocks.");
    let info = store
        .tensors()
        .iter()
        .filter_map(|t| {
            let rest = t.name.strip_prefix(&prefix)?.strip_suffix(suffix)?;
            Some((rest.parse::<usize>().ok()?, t))
        })
        .max_by_key(|(n, _)| *n)?
        .1;
    let mut values = vec![0f32; info.numel()];
    store.read_f32(info, &mut values).ok()?;
    let n = values.len().max(1) as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    Some(var.sqrt())
}

/// The widths of an SD1.x model (call after `detect_family` returned `Sd1`).
pub fn sd1_dims(store: &TensorStore) -> Result<Sd1Dims> {
    let (model_channels, in_channels) = conv_in(store)?;
    let context_dim = match context_dims(store).as_slice() {
        [single] => *single,
        [] => {
            return Err(Error::MissingTensor(format!(
                "{UNET_PREFIX}…attn2.to_k.weight"
            )))
        }
        many => {
            return Err(Error::UnsupportedModel(format!(
                "UNet cross-attention layers disagree on the text context width ({many:?})"
            )))
        }
    };
    let text_width = dim(
        store,
        &format!("{TEXT_PREFIX}text_model.final_layer_norm.weight"),
        0,
    )?;
    let latent_channels = dim(store, "first_stage_model.decoder.conv_in.weight", 1)?;
    Ok(Sd1Dims {
        in_channels,
        model_channels,
        context_dim,
        text_width,
        latent_channels,
    })
}

/// (output, input) channels of the UNet's first convolution.
fn conv_in(store: &TensorStore) -> Result<(usize, usize)> {
    let name = format!("{UNET_PREFIX}input_blocks.0.0.weight");
    Ok((dim(store, &name, 0)?, dim(store, &name, 1)?))
}

/// Dimension `axis` of tensor `name`.
fn dim(store: &TensorStore, name: &str, axis: usize) -> Result<usize> {
    let info = store
        .get(name)
        .ok_or_else(|| Error::MissingTensor(name.to_string()))?;
    info.shape
        .get(axis)
        .copied()
        .ok_or_else(|| Error::BadShape {
            name: name.to_string(),
            found: info.shape.clone(),
            expected: vec![0; axis + 1],
        })
}

/// The distinct input widths of the UNet's cross-attention keys, ascending.
fn context_dims(store: &TensorStore) -> Vec<usize> {
    let mut dims: Vec<usize> = store
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with(UNET_PREFIX) && t.name.ends_with(".attn2.to_k.weight"))
        .filter_map(|t| t.shape.get(1).copied())
        .collect();
    dims.sort_unstable();
    dims.dedup();
    dims
}

/// What a file without an LDM UNet most likely is, and what to do about it.
fn unknown_hint(store: &TensorStore) -> String {
    let has = |name: &str| store.contains(name);
    let has_prefix = |prefix: &str| store.tensors().iter().any(|t| t.name.starts_with(prefix));
    let has_part = |part: &str| store.tensors().iter().any(|t| t.name.contains(part));
    if store.tensors().is_empty() {
        "unknown model type: the model file holds no tensors".to_string()
    } else if has_part("lora_") || has_part(".lora.") || has_part(".hada_") {
        "this is a LoRA/LyCORIS adapter, not a full model".to_string()
    } else if has_prefix("control_model.") || has_part("input_hint_block") {
        "this is a ControlNet, not a full model".to_string()
    } else if has("conv_in.weight") && has_prefix("down_blocks.") {
        "this is a diffusers UNet file on its own; pass the whole pipeline folder (the one with unet/, vae/ \
         and text_encoder/)"
            .to_string()
    } else if has("decoder.conv_in.weight") || has("encoder.conv_in.weight") {
        "this is a standalone VAE; pass it as the VAE, next to a full model".to_string()
    } else if has_prefix("text_model.") {
        "this is a CLIP text encoder on its own, not a full model".to_string()
    } else {
        let first = &store.tensors()[0].name;
        format!(
            "unknown model type: no Stable Diffusion UNet found (expected `{UNET_PREFIX}*` tensors; the first \
             tensor is `{first}`)"
        )
    }
}
