//! A validated generation request: everything the pipeline needs, nothing it must guess.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::family::{ModelSpec, Prediction};
use crate::prompt::PromptSyntax;

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
named_enum!(Precision, "precision", F32 => "f32", Bf16 => "bf16", Int8 => "int8", Auto => "auto");
named_enum!(PreviewMode, "preview mode", None => "none", Proj => "proj", Tae => "tae", Vae => "vae");

/// How the weight products compute (`--precision`). `F32` is the reference mode the diffusers goldens
/// check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    Int8,
    Auto,
}

/// What a preview during sampling decodes with (`--preview`, stable-diffusion.cpp's names): none,
/// the 4×3 latent-to-RGB projection, a TAESD decode, or the full VAE decoder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PreviewMode {
    #[default]
    None,
    Proj,
    Tae,
    Vae,
}

/// Previews written while sampling.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Preview {
    pub mode: PreviewMode,
    /// Every N steps (`--preview-interval`, at least 1).
    pub interval: u32,
    /// `--preview-path`; None = `preview.png` beside the output.
    pub path: Option<PathBuf>,
    /// `--taesd-preview-only`: TAESD for previews, the VAE for the final image.
    pub taesd_only: bool,
}

/// One LoRA to apply (`--lora PATH[:WEIGHT]`, a job file's `lora` list): the file and its multiplier.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraRef {
    pub path: PathBuf,
    pub weight: f32,
}

/// Bounds on the image side in pixels. 64 is the smallest latent the UNet's two downsamplings accept
/// cleanly; 2048 keeps the activation arithmetic far from overflow.
pub const MIN_SIDE: u32 = 64;
pub const MAX_SIDE: u32 = 2048;
/// Bound on SDXL's size-conditioning values (pixels): far above any training size, and small enough
/// that the embedding's arithmetic is exact in f32.
pub const MAX_COND_PX: u32 = 16384;

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
    /// `--prompt-syntax`: how the prompt and negative prompt are read (A1111's emphasis, `BREAK`,
    /// `<lora:…>` tags and 75-token chunks, or plain text cut at 75 tokens).
    pub prompt_syntax: PromptSyntax,
    /// `--lora`: LoRAs given by path (the prompt's `<lora:NAME:W>` tags are resolved in
    /// `lora_model_dir`).
    pub loras: Vec<LoraRef>,
    /// `--lora-model-dir`: where `<lora:NAME:W>` tags find `NAME.safetensors`.
    pub lora_model_dir: Option<PathBuf>,
    /// img2img / inpaint: `--init-img`, `--strength` (0, 1], `--mask` (white = repaint).
    pub init_image: Option<PathBuf>,
    pub strength: f32,
    pub mask: Option<PathBuf>,
    /// `--taesd`: the tiny autoencoder used for decoding (and encoding) instead of the VAE.
    pub taesd: Option<PathBuf>,
    pub preview: Preview,
    /// `--precision`.
    pub precision: Precision,
}

/// SDXL's micro-conditioning, in pixels: (height, width) pairs and the crop's (top, left).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SizeConditioning {
    pub original: Option<(u32, u32)>,
    pub crop: (u32, u32),
    pub target: Option<(u32, u32)>,
}

impl SizeConditioning {
    /// Parses `WxH` (`--original-size`, `--target-size`) into the (height, width) pair diffusers
    /// passes. `what` names the setting in the error.
    pub fn parse_size(what: &str, text: &str) -> Result<(u32, u32)> {
        let bad = || {
            Error::BadRequest(format!(
                "{what} `{text}` is not a size WxH in pixels (e.g. 1024x1024)"
            ))
        };
        let (w, h) = text.trim().split_once(['x', 'X']).ok_or_else(bad)?;
        let w: u32 = w.trim().parse().map_err(|_| bad())?;
        let h: u32 = h.trim().parse().map_err(|_| bad())?;
        Ok((h, w))
    }

    /// Parses `TOP,LEFT` (`--crop-coords`, diffusers' `crops_coords_top_left`).
    pub fn parse_crop(text: &str) -> Result<(u32, u32)> {
        let bad = || {
            Error::BadRequest(format!(
                "crop-coords `{text}` is not TOP,LEFT in pixels (e.g. 0,0)"
            ))
        };
        let (t, l) = text.trim().split_once(',').ok_or_else(bad)?;
        let t: u32 = t.trim().parse().map_err(|_| bad())?;
        let l: u32 = l.trim().parse().map_err(|_| bad())?;
        Ok((t, l))
    }

    /// Whether anything differs from diffusers' defaults (image size, crop at (0, 0)).
    pub fn is_set(&self) -> bool {
        self.original.is_some() || self.target.is_some() || self.crop != (0, 0)
    }

    fn validate(&self) -> Result<()> {
        let sizes = [
            ("original-size", self.original),
            ("target-size", self.target),
        ];
        for (what, (h, w)) in sizes.iter().filter_map(|(n, v)| v.map(|v| (n, v))) {
            if !(1..=MAX_COND_PX).contains(&h) || !(1..=MAX_COND_PX).contains(&w) {
                return Err(Error::BadRequest(format!(
                    "{what} {w}x{h} is out of range (1..={MAX_COND_PX} per side)"
                )));
            }
        }
        let (t, l) = self.crop;
        if t > MAX_COND_PX || l > MAX_COND_PX {
            return Err(Error::BadRequest(format!(
                "crop-coords {t},{l} is out of range (0..={MAX_COND_PX})"
            )));
        }
        Ok(())
    }

    /// The six time ids SDXL's UNet embeds: original (h, w), crop (top, left), target (h, w).
    pub fn time_ids(&self, height: u32, width: u32) -> [f32; 6] {
        let (oh, ow) = self.original.unwrap_or((height, width));
        let (th, tw) = self.target.unwrap_or((height, width));
        let (ct, cl) = self.crop;
        [oh, ow, ct, cl, th, tw].map(|v| v as f32)
    }
}

/// Which of a job's settings with a per-family default the user gave (a flag, or a job-file field).
/// Until the model is known the others hold placeholders (SD1.x's defaults, as [`Job::new`] sets
/// them); [`Job::apply_defaults`] then fills them from the model's family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Given {
    pub width: bool,
    pub height: bool,
    pub steps: bool,
    pub cfg_scale: bool,
    pub sampler: bool,
    pub scheduler: bool,
}

impl Given {
    /// Everything given: `apply_defaults` changes nothing (a library caller that set every field).
    pub const ALL: Given = Given {
        width: true,
        height: true,
        steps: true,
        cfg_scale: true,
        sampler: true,
        scheduler: true,
    };
}

impl Job {
    /// The one place where per-family defaults are applied (`generate`, `plan` and every batch job
    /// go through it): each setting the user did not give takes the value of the model's
    /// `ModelSpec`; the side depends on the prediction type (SD2.x: 512 for eps, 768 for v).
    pub fn apply_defaults(&mut self, spec: &ModelSpec, prediction: Prediction, given: Given) {
        let side = spec.default_side(prediction);
        // img2img/inpaint: the picture's own size (rounded to a multiple of 8) when none is given,
        // as diffusers; an unreadable picture is refused by `validate`.
        let (w, h) = match &self.init_image {
            Some(path) if !(given.width && given.height) => {
                crate::init_image::default_size(path).unwrap_or((side, side))
            }
            _ => (side, side),
        };
        if !given.width {
            self.width = w;
        }
        if !given.height {
            self.height = h;
        }
        if !given.steps {
            self.steps = spec.default_steps;
        }
        if !given.cfg_scale {
            self.cfg_scale = spec.default_cfg_scale;
        }
        if !given.sampler {
            self.sampler = spec.default_sampler;
        }
        if !given.scheduler {
            self.scheduler = spec.default_scheduler;
        }
    }

    /// The TAESD file that decodes the final image (`--taesd` without `--taesd-preview-only`).
    pub fn final_taesd(&self) -> Option<&std::path::Path> {
        self.taesd.as_deref().filter(|_| !self.preview.taesd_only)
    }

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
            prompt_syntax: PromptSyntax::default(),
            loras: Vec::new(),
            lora_model_dir: None,
            init_image: None,
            strength: 0.75,
            mask: None,
            taesd: None,
            preview: Preview {
                interval: 1,
                ..Preview::default()
            },
            precision: Precision::default(),
        }
    }

    /// Checks everything that can be checked without opening the model.
    pub fn validate(&self) -> Result<()> {
        self.validate_settings()?;
        // The init picture and mask are read (a PNG to its end, a small JPEG whole): once, here.
        crate::init_image::check(self)
    }

    /// `validate` without reading the init picture and mask: again after `apply_defaults` and in
    /// the pipeline, once `validate` has checked those files. Each feature checks its own settings
    /// (one line, exit 2): img2img/inpaint, TAESD and previews, the kernels, the prompts' syntax
    /// and LoRAs (their headers).
    pub fn validate_settings(&self) -> Result<()> {
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
        self.size_cond.validate()?;
        crate::img2img::check(self)?;
        crate::preview::check(self)?;
        crate::kernels::precision::check(self)?;
        crate::conditioning::check_prompts(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::family::{SD1, SD2, SDXL};

    #[test]
    fn defaults_come_from_the_family_for_what_was_not_given() {
        let mut job = Job::new(PathBuf::from("m"), "p");
        job.apply_defaults(&SDXL, Prediction::Eps, Given::default());
        assert_eq!((job.width, job.height), (1024, 1024));
        let mut job = Job::new(PathBuf::from("m"), "p");
        job.apply_defaults(&SD2, Prediction::V, Given::default());
        assert_eq!((job.width, job.height), (768, 768));
        job.apply_defaults(&SD2, Prediction::Eps, Given::default());
        assert_eq!((job.width, job.height), (512, 512));
        // Given values stay.
        let mut job = Job::new(PathBuf::from("m"), "p");
        (job.width, job.steps, job.cfg_scale) = (64, 1, 0.0);
        job.sampler = SamplerKind::Lcm;
        let given = Given {
            width: true,
            steps: true,
            cfg_scale: true,
            sampler: true,
            ..Given::default()
        };
        job.apply_defaults(&SDXL, Prediction::Eps, given);
        assert_eq!((job.width, job.height, job.steps), (64, 1024, 1));
        assert_eq!((job.cfg_scale, job.sampler), (0.0, SamplerKind::Lcm));
        // SD1.x's defaults are the placeholders `Job::new` sets: nothing changes.
        let before = Job::new(PathBuf::from("m"), "p");
        let mut after = before.clone();
        after.apply_defaults(&SD1, Prediction::Eps, Given::default());
        assert_eq!(
            (
                after.width,
                after.height,
                after.steps,
                after.cfg_scale,
                after.sampler,
                after.scheduler
            ),
            (
                before.width,
                before.height,
                before.steps,
                before.cfg_scale,
                before.sampler,
                before.scheduler
            )
        );
    }

    #[test]
    fn size_conditioning_values_parse_and_are_bounded() {
        assert_eq!(
            SizeConditioning::parse_size("s", "1024x768").unwrap(),
            (768, 1024)
        );
        assert_eq!(
            SizeConditioning::parse_size("s", " 64 X 32 ").unwrap(),
            (32, 64)
        );
        for bad in ["", "64", "64x", "x64", "-1x64", "64x64x64", "ax b"] {
            assert!(SizeConditioning::parse_size("s", bad).is_err(), "{bad}");
        }
        assert_eq!(SizeConditioning::parse_crop("16,8").unwrap(), (16, 8));
        for bad in ["", "8", "8,", "-1,0", "1;2"] {
            assert!(SizeConditioning::parse_crop(bad).is_err(), "{bad}");
        }
        let mut job = Job::new(PathBuf::from("m"), "p");
        job.size_cond.original = Some((0, 64));
        assert!(job.validate().is_err());
        job.size_cond.original = Some((MAX_COND_PX, MAX_COND_PX));
        assert!(job.validate().is_ok());
        job.size_cond.crop = (MAX_COND_PX + 1, 0);
        assert!(job.validate().is_err());
        assert!(job.size_cond.is_set());
        assert!(!SizeConditioning::default().is_set());
    }
}
