//! A validated generation request: everything the pipeline needs, nothing it must guess.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::family::Prediction;

/// Sampling method (`--sampling-method`, names as in stable-diffusion.cpp).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerKind {
    Euler,
    EulerA,
    DpmPp2m,
    Ddim,
    Lcm,
    Heun,
    DpmPp2mSde,
    Dpm2,
    UniPc,
    Lms,
}

/// Noise schedule (`--scheduler`). `Discrete` is diffusers' "leading" timestep spacing (the SD
/// checkpoints' scheduler config); `Karras` re-spaces the sigma-based samplers' sigmas; `Trailing` is
/// diffusers' `timestep_spacing="trailing"` (first timestep 999, what SD-Turbo and SDXL-Turbo use), for
/// every sampler but LCM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    Discrete,
    Karras,
    Trailing,
}

/// Source of random numbers (`--rng`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RngKind {
    /// PyTorch's CPU generator (mt19937 + its AVX2 randn kernel), as diffusers uses on a CPU.
    Cpu,
}

macro_rules! named_enum {
    ($ty:ident, $what:literal, $($variant:ident => $name:literal),+ $(,)?) => {
        impl $ty {
            pub const NAMES: &'static [&'static str] = &[$($name),+];
            pub fn name(self) -> &'static str {
                match self { $($ty::$variant => $name),+ }
            }
        }
        impl FromStr for $ty {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(Error::BadRequest(format!(
                        "unknown {} `{}` (expected one of: {})", $what, s, Self::NAMES.join(", ")
                    ))),
                }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.name()) }
        }
    };
}

named_enum!(SamplerKind, "sampling method",
    Euler => "euler", EulerA => "euler_a", DpmPp2m => "dpm++2m", Ddim => "ddim", Lcm => "lcm",
    Heun => "heun", DpmPp2mSde => "dpm++2m_sde", Dpm2 => "dpm2", UniPc => "unipc", Lms => "lms");
named_enum!(ScheduleKind, "scheduler", Discrete => "discrete", Karras => "karras", Trailing => "trailing");
named_enum!(RngKind, "rng", Cpu => "cpu");

/// Bounds on the image side in pixels. 64 is the smallest latent the UNet's two downsamplings accept
/// cleanly; 2048 keeps the activation arithmetic far from overflow.
pub const MIN_SIDE: u32 = 64;
pub const MAX_SIDE: u32 = 2048;

#[derive(Clone, Debug)]
pub struct Job {
    /// Single-file checkpoint (.safetensors) or diffusers folder.
    pub model: PathBuf,
    /// Separate VAE file replacing the model's own.
    pub vae: Option<PathBuf>,
    pub prompt: String,
    /// None = no negative prompt (SDXL then guides against all-zero embeddings); `Some("")` is
    /// encoded like any prompt.
    pub negative: Option<String>,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub cfg_scale: f32,
    pub sampler: SamplerKind,
    pub scheduler: ScheduleKind,
    pub seed: u64,
    /// 1 = last CLIP layer, 2 = penultimate (A1111 convention).
    pub clip_skip: u32,
    pub rng: RngKind,
    /// `--ram-cap` in bytes; None = the cgroup limit, else available memory.
    pub ram_cap: Option<u64>,
    /// `--prediction`: None = the file's metadata, else the weights (SD2.x), else the family's.
    pub prediction: Option<Prediction>,
    /// SDXL's size conditioning (pixels): `original_size` and `target_size` default to the image
    /// size, `crop` (top, left) to (0, 0), as diffusers does. Other families ignore them.
    pub size_cond: SizeConditioning,
}

/// SDXL's micro-conditioning, in pixels: (height, width) pairs and the crop's (top, left).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SizeConditioning {
    pub original: Option<(u32, u32)>,
    pub crop: (u32, u32),
    pub target: Option<(u32, u32)>,
}

impl SizeConditioning {
    /// The six time ids SDXL's UNet embeds: original (h, w), crop (top, left), target (h, w).
    pub fn time_ids(&self, height: u32, width: u32) -> [f32; 6] {
        let (oh, ow) = self.original.unwrap_or((height, width));
        let (th, tw) = self.target.unwrap_or((height, width));
        let (ct, cl) = self.crop;
        [oh, ow, ct, cl, th, tw].map(|v| v as f32)
    }
}

impl Job {
    /// The negative prompt's text ("" when there is none).
    pub fn negative_text(&self) -> &str {
        self.negative.as_deref().unwrap_or("")
    }

    /// A txt2img job with the defaults of `sdcap generate` (SD1.x's: 512², 20 steps, euler_a,
    /// CFG 7, seed 42).
    pub fn new(model: PathBuf, prompt: &str) -> Job {
        Job {
            model,
            vae: None,
            prompt: prompt.to_string(),
            negative: None,
            width: 512,
            height: 512,
            steps: 20,
            cfg_scale: 7.0,
            sampler: SamplerKind::EulerA,
            scheduler: ScheduleKind::Discrete,
            seed: 42,
            clip_skip: 1,
            rng: RngKind::Cpu,
            ram_cap: None,
            prediction: None,
            size_cond: SizeConditioning::default(),
        }
    }

    /// Checks everything that can be checked without opening the model.
    pub fn validate(&self) -> Result<()> {
        for (what, v) in [("width", self.width), ("height", self.height)] {
            if v % 8 != 0 {
                return Err(Error::BadRequest(format!(
                    "{what} {v} is not a multiple of 8"
                )));
            }
            if !(MIN_SIDE..=MAX_SIDE).contains(&v) {
                return Err(Error::BadRequest(format!(
                    "{what} {v} is out of range ({MIN_SIDE}..={MAX_SIDE})"
                )));
            }
        }
        if self.steps == 0 {
            return Err(Error::BadRequest("steps must be at least 1".into()));
        }
        if self.steps > 1000 {
            return Err(Error::BadRequest(format!(
                "steps {} is more than the 1000 training timesteps",
                self.steps
            )));
        }
        if !self.cfg_scale.is_finite() {
            return Err(Error::BadRequest(
                "cfg-scale must be a finite number".into(),
            ));
        }
        if self.clip_skip == 0 {
            return Err(Error::BadRequest(
                "clip-skip must be at least 1 (1 = last layer)".into(),
            ));
        }
        Ok(())
    }
}
