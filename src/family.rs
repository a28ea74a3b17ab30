//! What sdcap knows about each model family, in one place: one `ModelSpec` per family.
//!
//! The networks are built by walking the checkpoint's keys (`nn/`), so a spec holds only the facts a file
//! does not state: where each component's weights live, which text encoders there are and which hidden
//! state each contributes, the extra conditioning, the attention heads rule, the VAE's scaling factor and
//! the defaults a user expects. The weights code, the governor and the pipeline all read it; adding a
//! family is adding a description here plus the layers it needs. It names the layers' own options
//! (`nn::clip::TextActivation`, `nn::unet::HeadsRule`, `tokenizer::PadToken`) but builds nothing.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::job::{SamplerKind, ScheduleKind};
use crate::nn::clip::TextActivation;
use crate::nn::unet::HeadsRule;
use crate::tokenizer::PadToken;

/// A model family sdcap runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Family {
    /// Stable Diffusion 1.x: CLIP ViT-L text encoder, LDM UNet, KL VAE.
    Sd1,
    /// Stable Diffusion 2.x and SD-Turbo: OpenCLIP ViT-H text encoder, linear transformer projections.
    Sd2,
    /// SDXL (base, fine-tunes, Turbo/Lightning): CLIP-L + OpenCLIP bigG, size conditioning.
    Sdxl,
}

impl Family {
    pub fn spec(self) -> &'static ModelSpec {
        match self {
            Family::Sd1 => &SD1,
            Family::Sd2 => &SD2,
            Family::Sdxl => &SDXL,
        }
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the UNet predicts (diffusers' `prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The noise (`epsilon`): SD1.x, SD2.x-base, SD-Turbo, SDXL.
    Eps,
    /// The velocity `v = √ᾱ·ε − √(1−ᾱ)·x₀` (`v_prediction`): SD2.x 768-v models.
    V,
}

impl Prediction {
    pub const NAMES: &'static [&'static str] = &["eps", "v"];

    pub fn name(self) -> &'static str {
        match self {
            Prediction::Eps => "eps",
            Prediction::V => "v",
        }
    }
}

impl FromStr for Prediction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "eps" | "epsilon" => Ok(Prediction::Eps),
            "v" | "v_prediction" => Ok(Prediction::V),
            _ => Err(Error::BadRequest(format!(
                "unknown prediction `{s}` (expected one of: eps, v)"
            ))),
        }
    }
}

impl fmt::Display for Prediction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which hidden state of a text encoder conditions the UNet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HiddenState {
    /// The final layer norm applied to the output of the layer `--clip-skip` from the end (SD1.x:
    /// the last layer unless the user asks otherwise).
    ClipSkipNormed,
    /// The final layer norm applied to the penultimate layer's output (SD2.x: LDM's
    /// `FrozenOpenCLIPEmbedder(layer="penultimate")`); in a diffusers folder, whose encoder
    /// ends at that layer, the last layer's.
    PenultimateNormed,
    /// The penultimate layer's output as it is, no final norm (SDXL's `hidden_states[-2]`).
    Penultimate,
}

/// One text encoder of a family.
#[derive(Clone, Copy, Debug)]
pub struct TextEncoderSpec {
    /// Key prefix of the encoder in the single-file layout (without the trailing dot).
    pub prefix: &'static str,
    pub activation: TextActivation,
    /// What the tokenizer pads with: CLIP's end-of-text (49407) or `"!"` = 0 (the OpenCLIP
    /// tokenizers; diffusers then also maps every `!` in the text to 0).
    pub pad: PadToken,
    pub hidden: HiddenState,
    /// Whether its pooled, projected output conditions the UNet (SDXL's bigG `text_embeds`).
    pub pooled: bool,
}

/// One family's description.
#[derive(Debug)]
pub struct ModelSpec {
    pub family: Family,
    /// As users name it ("SD1.x").
    pub name: &'static str,
    /// Key prefixes (with the trailing dot) of the UNet, the VAE and everything text-side.
    pub unet_prefix: &'static str,
    pub vae_prefix: &'static str,
    pub text_prefix: &'static str,
    /// The text encoders, in the order their hidden states are concatenated along the width.
    pub text_encoders: &'static [TextEncoderSpec],
    /// SDXL's micro-conditioning: the pooled text embedding and six size/crop ids through `label_emb`.
    pub size_conditioning: bool,
    /// diffusers' `force_zeros_for_empty_prompt`: with no negative prompt at all, the unconditional
    /// half gets all-zero embeddings (pooled too) instead of the encoded empty prompt.
    pub zero_uncond_without_negative: bool,
    /// The UNet's attention heads (SD1.x: 8 at every level; SD2.x/SDXL: 64-wide heads).
    pub heads: HeadsRule,
    /// Latents are divided by this before the VAE decoder (and multiplied after the encoder).
    pub vae_scaling_factor: f32,
    /// The prediction type when neither the user nor the file says (see `weights::prediction`).
    pub prediction: Prediction,
    /// Image side when the user gives none: (eps models, v models).
    pub default_side: (u32, u32),
    pub default_steps: u32,
    pub default_cfg_scale: f32,
    pub default_sampler: SamplerKind,
    pub default_scheduler: ScheduleKind,
}

impl ModelSpec {
    /// The default image side for this family and prediction type.
    pub fn default_side(&self, prediction: Prediction) -> u32 {
        match prediction {
            Prediction::Eps => self.default_side.0,
            Prediction::V => self.default_side.1,
        }
    }

    /// The heads rule for a UNet of this family whose base width is `model_channels`. Test-sized
    /// models (base width below 64) use 8-wide heads where the real ones use 64-wide heads, as the
    /// text encoders do.
    pub fn unet_heads(&self, model_channels: usize) -> HeadsRule {
        match self.heads {
            HeadsRule::Width(_) if model_channels < 64 => HeadsRule::Width(8),
            rule => rule,
        }
    }
}

pub static SD1: ModelSpec = ModelSpec {
    family: Family::Sd1,
    name: "SD1.x",
    unet_prefix: "model.diffusion_model.",
    vae_prefix: "first_stage_model.",
    text_prefix: "cond_stage_model.",
    text_encoders: &[TextEncoderSpec {
        prefix: "cond_stage_model.transformer.text_model",
        activation: TextActivation::QuickGelu,
        pad: PadToken::EndOfText,
        hidden: HiddenState::ClipSkipNormed,
        pooled: false,
    }],
    size_conditioning: false,
    zero_uncond_without_negative: false,
    heads: HeadsRule::Fixed(8),
    vae_scaling_factor: 0.18215,
    prediction: Prediction::Eps,
    default_side: (512, 512),
    default_steps: 20,
    default_cfg_scale: 7.0,
    default_sampler: SamplerKind::EulerA,
    default_scheduler: ScheduleKind::Discrete,
};

pub static SD2: ModelSpec = ModelSpec {
    family: Family::Sd2,
    name: "SD2.x",
    unet_prefix: "model.diffusion_model.",
    vae_prefix: "first_stage_model.",
    text_prefix: "cond_stage_model.",
    text_encoders: &[TextEncoderSpec {
        prefix: "cond_stage_model.model",
        activation: TextActivation::Gelu,
        pad: PadToken::Exclamation,
        hidden: HiddenState::PenultimateNormed,
        pooled: false,
    }],
    size_conditioning: false,
    zero_uncond_without_negative: false,
    heads: HeadsRule::Width(64),
    vae_scaling_factor: 0.18215,
    prediction: Prediction::Eps,
    // SD2.x-base and SD-Turbo (eps) are 512² models, the 768-v ones 768².
    default_side: (512, 768),
    default_steps: 20,
    default_cfg_scale: 7.0,
    default_sampler: SamplerKind::EulerA,
    default_scheduler: ScheduleKind::Discrete,
};

pub static SDXL: ModelSpec = ModelSpec {
    family: Family::Sdxl,
    name: "SDXL",
    unet_prefix: "model.diffusion_model.",
    vae_prefix: "first_stage_model.",
    text_prefix: "conditioner.",
    text_encoders: &[
        TextEncoderSpec {
            prefix: "conditioner.embedders.0.transformer.text_model",
            activation: TextActivation::QuickGelu,
            pad: PadToken::EndOfText,
            hidden: HiddenState::Penultimate,
            pooled: false,
        },
        TextEncoderSpec {
            prefix: "conditioner.embedders.1.model",
            activation: TextActivation::Gelu,
            pad: PadToken::Exclamation,
            hidden: HiddenState::Penultimate,
            pooled: true,
        },
    ],
    size_conditioning: true,
    zero_uncond_without_negative: true,
    heads: HeadsRule::Width(64),
    vae_scaling_factor: 0.13025,
    prediction: Prediction::Eps,
    default_side: (1024, 1024),
    default_steps: 20,
    default_cfg_scale: 7.0,
    default_sampler: SamplerKind::EulerA,
    default_scheduler: ScheduleKind::Discrete,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_rule_matches_the_real_and_the_tiny_models() {
        // SD1.5: 8 heads at 320/640/1280; SD2.1: 5/10/20; SDXL: 10/20 (head width 64).
        assert_eq!(SD1.unet_heads(320).heads(1280).unwrap(), 8);
        assert_eq!(SD2.unet_heads(320).heads(320).unwrap(), 5);
        assert_eq!(SDXL.unet_heads(320).heads(1280).unwrap(), 20);
        // The tiny SD2/SDXL fixtures: head width 8 (model channels 32).
        assert_eq!(SDXL.unet_heads(32).heads(64).unwrap(), 8);
        assert_eq!(SD2.unet_heads(32).heads(32).unwrap(), 4);
    }

    #[test]
    fn every_family_spec_is_its_own() {
        for family in [Family::Sd1, Family::Sd2, Family::Sdxl] {
            assert_eq!(family.spec().family, family);
            for enc in family.spec().text_encoders {
                assert!(enc.prefix.starts_with(family.spec().text_prefix));
            }
        }
        assert_eq!(SDXL.text_encoders.iter().filter(|e| e.pooled).count(), 1);
    }

    #[test]
    fn prediction_names_parse() {
        assert_eq!("v".parse::<Prediction>().unwrap(), Prediction::V);
        assert_eq!("eps".parse::<Prediction>().unwrap(), Prediction::Eps);
        assert!("x".parse::<Prediction>().is_err());
    }
}
