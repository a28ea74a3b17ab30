//! The one definition of a generation request as the user writes it.
//!
//! Every setting appears here once: its command-line flag (`clap`, shared by `generate`, `plan` and
//! `batch`, whose flags are the defaults of every job) and its job-file key (`serde`, one JSON object
//! per line of a batch job file). [`Request::apply`] is the one place a request becomes a [`Job`];
//! output names (`batch::naming`) and the PNG `parameters` text (`output`) are made from that job, and
//! [`FIELDS`] says for every setting how it enters them. A test (`tests/request.rs`) checks that every
//! field of this struct has its row there, that each row's claims hold (a setting that names the output
//! changes the name, one written to the PNG changes the text), and that flags and job-file keys name
//! the same settings, so the six places a request used to be spelled out cannot drift apart again.
//!
//! Every field is optional: `None` (an empty list, `false`) means "not given", so that a job-file line
//! overrides only what it names and per-family defaults fill the rest (`Job::apply_defaults`).

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::Args;
use serde::{Deserialize, Deserializer};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::family::Prediction;
use crate::governor::parse_size;
use crate::job::{
    Given, Job, LoraRef, Precision, PreviewMode, RngKind, SamplerKind, ScheduleKind,
    SizeConditioning,
};
use crate::prompt::PromptSyntax;

// Numeric flags take negative numbers as values, so `-W -512` is reported as a bad width rather than
// as an unknown flag `-5`.
/// A generation request: flags on the command line, or one line of a batch job file.
#[derive(Clone, Debug, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Model: single-file .safetensors checkpoint (LDM layout), GGUF file or diffusers folder.
    /// Default: the shipped tiny demo model (random weights, the image is noise).
    #[arg(short = 'm', long, value_name = "PATH")]
    pub model: Option<PathBuf>,

    /// Separate VAE file replacing the model's own.
    #[arg(long, value_name = "PATH")]
    pub vae: Option<PathBuf>,

    /// The prompt (A1111 syntax by default: see --prompt-syntax).
    #[arg(short = 'p', long, value_name = "TEXT")]
    pub prompt: Option<String>,

    /// The negative prompt. Without one, SDXL's unconditional half is all zeros (as diffusers);
    /// `-n ""` encodes the empty prompt like any other (SD1.x and SD2.x do that either way).
    #[arg(short = 'n', long, value_name = "TEXT")]
    #[serde(rename = "negative", alias = "negative_prompt")]
    pub negative_prompt: Option<String>,

    /// Image width in pixels (multiple of 8, 64..=2048) [default: per model family (SD1/SD2 512,
    /// SD2-v 768, SDXL 1024); with --init-img, the image's width].
    #[arg(short = 'W', long, value_name = "PX", allow_negative_numbers = true)]
    pub width: Option<u32>,

    /// Image height in pixels (multiple of 8, 64..=2048) [default: per model family (SD1/SD2 512,
    /// SD2-v 768, SDXL 1024); with --init-img, the image's height].
    #[arg(short = 'H', long, value_name = "PX", allow_negative_numbers = true)]
    pub height: Option<u32>,

    /// Number of sampling steps [default: per model family (20)].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub steps: Option<u32>,

    /// Classifier-free guidance scale; 1 or less runs the UNet on the prompt only
    /// [default: per model family (7)].
    #[arg(long, value_name = "SCALE", allow_negative_numbers = true)]
    #[serde(rename = "cfg", alias = "cfg_scale")]
    pub cfg_scale: Option<f32>,

    #[arg(long, value_name = "NAME", help = names_help("Sampling method [default: per model family (euler_a)]", SamplerKind::NAMES))]
    #[serde(
        rename = "sampler",
        alias = "sampling_method",
        default,
        deserialize_with = "parsed"
    )]
    pub sampling_method: Option<SamplerKind>,

    #[arg(long, value_name = "NAME", help = names_help("Noise schedule [default: per model family (discrete)]", ScheduleKind::NAMES))]
    #[serde(default, deserialize_with = "parsed")]
    pub scheduler: Option<ScheduleKind>,

    /// Seed [default: 42]; with `generate`, a negative value picks a random seed (printed in the
    /// summary); a batch needs fixed seeds, so that a rerun finds its outputs.
    #[arg(short = 's', long, value_name = "N", allow_negative_numbers = true)]
    pub seed: Option<i64>,

    /// Which CLIP layer conditions the UNet: 1 = last, 2 = penultimate (A1111 convention)
    /// [default: 1].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub clip_skip: Option<u32>,

    #[arg(long, value_name = "NAME", help = names_help("Random number generator (cpu = PyTorch's CPU generator, as diffusers uses it) [default: cpu]", RngKind::NAMES))]
    #[serde(default, deserialize_with = "parsed")]
    pub rng: Option<RngKind>,

    /// How prompts are read: a1111 = emphasis `(a:1.2)` `[a]`, `BREAK`, `<lora:NAME:W>` tags, any
    /// length in 75-token chunks; plain = the text as it is, cut after 75 tokens, as diffusers
    /// reads it [default: a1111].
    #[arg(long, value_name = "NAME")]
    #[serde(default, deserialize_with = "parsed")]
    pub prompt_syntax: Option<PromptSyntax>,

    /// What the UNet predicts: eps (noise) or v (velocity, SD2.x 768-v models) [default: the
    /// file's metadata, else the weights (SD2.x), else the family's (eps)].
    #[arg(long, value_name = "TYPE")]
    #[serde(default, deserialize_with = "parsed")]
    pub prediction: Option<Prediction>,

    /// SDXL size conditioning: diffusers' `original_size`, WxH [default: the image size].
    #[arg(long, value_name = "WxH", value_parser = parse_original_size)]
    #[serde(default, deserialize_with = "original_size")]
    pub original_size: Option<(u32, u32)>,

    /// SDXL crop conditioning: diffusers' `crops_coords_top_left`, TOP,LEFT [default: 0,0].
    #[arg(long, value_name = "TOP,LEFT", value_parser = parse_crop)]
    #[serde(default, deserialize_with = "crop")]
    pub crop_coords: Option<(u32, u32)>,

    /// SDXL size conditioning: diffusers' `target_size`, WxH [default: the image size].
    #[arg(long, value_name = "WxH", value_parser = parse_target_size)]
    #[serde(default, deserialize_with = "target_size")]
    pub target_size: Option<(u32, u32)>,

    /// A LoRA to apply, PATH[:WEIGHT] (weight 1 when left out); repeatable. In a job file: a list
    /// of "PATH[:WEIGHT]" strings or {"path"|"name": …, "weight": …} objects (a name is looked up in
    /// lora_model_dir). Prompt tags `<lora:NAME:WEIGHT>` add more.
    #[arg(long = "lora", value_name = "PATH[:WEIGHT]", value_parser = parse_lora)]
    #[serde(default)]
    pub lora: Vec<LoraArg>,

    /// Where `<lora:NAME:WEIGHT>` tags (and job-file LoRA names) find NAME.safetensors.
    #[arg(long, value_name = "DIR")]
    pub lora_model_dir: Option<PathBuf>,

    /// img2img: start from this picture (PNG or JPEG; EXIF orientation honoured), resized to
    /// -W/-H when given, else its own size rounded down to a multiple of 8.
    #[arg(short = 'i', long = "init-img", value_name = "PATH")]
    #[serde(rename = "init_image", alias = "init_img")]
    pub init_img: Option<PathBuf>,

    /// img2img: how much of the picture is repainted, in (0, 1]: the share of the steps that run
    /// (diffusers' semantics) [default: 0.75].
    #[arg(long, value_name = "S", allow_negative_numbers = true)]
    pub strength: Option<f32>,

    /// Inpainting: a mask picture, white = repaint (any size: resized like the init image); needs
    /// --init-img. 9-channel inpainting models are detected and used as such.
    #[arg(long, value_name = "PATH")]
    pub mask: Option<PathBuf>,

    /// A TAESD file or folder (the tiny autoencoder): decodes (and encodes the init image) instead
    /// of the VAE, in a fraction of the time and memory.
    #[arg(long, value_name = "PATH")]
    pub taesd: Option<PathBuf>,

    #[arg(long, value_name = "MODE", help = names_help("Preview while sampling, decoded by a 4x3 latent-to-RGB projection (proj), TAESD (tae, needs --taesd) or the full VAE (vae) [default: none]", PreviewMode::NAMES))]
    #[serde(default, deserialize_with = "parsed")]
    pub preview: Option<PreviewMode>,

    /// Write a preview every N steps [default: 1].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub preview_interval: Option<u32>,

    /// The preview PNG, replaced atomically at each preview [default: preview.png].
    #[arg(long, value_name = "PATH")]
    pub preview_path: Option<PathBuf>,

    /// Use --taesd for previews only; the final image is decoded by the VAE.
    #[arg(long)]
    #[serde(default)]
    pub taesd_preview_only: bool,

    #[arg(long, value_name = "MODE", help = names_help("How weight products compute: f32 is the reference, int8 is for quantized models, auto the fastest that is accurate on this CPU [default: f32]", Precision::NAMES))]
    #[serde(default, deserialize_with = "parsed")]
    pub precision: Option<Precision>,

    /// RAM cap (512M, 1.5G, 2GiB): the plan keeps the predicted peak under it, or sdcap refuses
    /// with exit code 3 before loading anything [default: the cgroup limit, else available
    /// memory]. In a job file: bytes, or a size such as "6G".
    #[arg(long, value_name = "SIZE", value_parser = parse_ram_cap)]
    #[serde(default, deserialize_with = "ram_cap")]
    pub ram_cap: Option<u64>,

    /// Where the weight matmuls run: cpu, or cuda (cuBLAS; needs a build with `--features cuda`
    /// and a GPU, else exit 2). A process-wide choice: a flag only, not a job-file field
    /// [default: cpu].
    #[arg(long, value_name = "NAME")]
    #[serde(skip)]
    pub backend: Option<Backend>,
}

/// A LoRA as a request names it: by path (`--lora`, a job file's `path`) or by name (a job file's
/// `name`, found in `lora_model_dir` like a prompt tag).
#[derive(Clone, Debug, PartialEq)]
pub enum LoraArg {
    Path(PathBuf, f32),
    Name(String, f32),
}

impl<'de> Deserialize<'de> for LoraArg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Text(String),
            Object {
                path: Option<PathBuf>,
                name: Option<String>,
                weight: Option<f32>,
            },
        }
        let bad = |what: String| serde::de::Error::custom(what);
        match Form::deserialize(d)? {
            Form::Text(text) => parse_lora(&text).map_err(bad),
            Form::Object { path, name, weight } => {
                let weight = weight.unwrap_or(1.0);
                match (path, name) {
                    (Some(p), None) => Ok(LoraArg::Path(p, weight)),
                    (None, Some(n)) => Ok(LoraArg::Name(n, weight)),
                    _ => Err(bad(
                        "a lora entry names exactly one of `path` and `name`".into()
                    )),
                }
            }
        }
    }
}

/// `PATH[:WEIGHT]`: the part after the last `:` is the weight when it reads as a number.
pub fn parse_lora(text: &str) -> std::result::Result<LoraArg, String> {
    let (path, weight) = match text.rsplit_once(':') {
        Some((p, w)) => match w.trim().parse::<f32>() {
            Ok(weight) => (p, weight),
            Err(_) => (text, 1.0),
        },
        None => (text, 1.0),
    };
    if path.is_empty() {
        return Err(format!("lora `{text}` names no file (PATH[:WEIGHT])"));
    }
    if !weight.is_finite() {
        return Err(format!("lora `{text}`: the weight must be a finite number"));
    }
    Ok(LoraArg::Path(PathBuf::from(path), weight))
}

/// How each setting enters the output name (`batch::naming`) and the PNG `parameters` text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// Part of the job's canonical form: changing it changes the output name.
    Named,
    /// Not part of it, for the reason given (it does not change the pixels).
    Unnamed(&'static str),
}

/// Where a setting appears in the PNG `parameters` text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Infotext {
    /// The prompt line, the `Negative prompt:` line or the LoRA tags in the prompt.
    Prompt,
    /// A `Key: value` field of the last line, as A1111 names it (or sdcap, where A1111 has none).
    Key(&'static str),
    /// Not written, for the reason given.
    Absent(&'static str),
}

/// One setting of [`Request`]: its job-file key (the field's serde name), how it names the output,
/// and how it is written to the PNG.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    pub key: &'static str,
    pub naming: Naming,
    pub infotext: Infotext,
}

const fn field(key: &'static str, naming: Naming, infotext: Infotext) -> Field {
    Field {
        key,
        naming,
        infotext,
    }
}

const SAME_PIXELS: &str = "does not change the pixels";

/// Every setting of [`Request`], in its order (checked by `tests/request.rs`).
pub const FIELDS: &[Field] = &[
    field("model", Naming::Named, Infotext::Key("Model")),
    field("vae", Naming::Named, Infotext::Key("VAE")),
    field("prompt", Naming::Named, Infotext::Prompt),
    field("negative", Naming::Named, Infotext::Prompt),
    field("width", Naming::Named, Infotext::Key("Size")),
    field("height", Naming::Named, Infotext::Key("Size")),
    field("steps", Naming::Named, Infotext::Key("Steps")),
    field("cfg", Naming::Named, Infotext::Key("CFG scale")),
    field("sampler", Naming::Named, Infotext::Key("Sampler")),
    field("scheduler", Naming::Named, Infotext::Key("Sampler")),
    field("seed", Naming::Named, Infotext::Key("Seed")),
    field("clip_skip", Naming::Named, Infotext::Key("Clip skip")),
    field("rng", Naming::Named, Infotext::Key("RNG")),
    field(
        "prompt_syntax",
        Naming::Named,
        Infotext::Absent("the prompt is stored as given; A1111 reads it with its own syntax"),
    ),
    field("prediction", Naming::Named, Infotext::Key("Prediction")),
    field(
        "original_size",
        Naming::Named,
        Infotext::Key("Original size"),
    ),
    field("crop_coords", Naming::Named, Infotext::Key("Crop coords")),
    field("target_size", Naming::Named, Infotext::Key("Target size")),
    field("lora", Naming::Named, Infotext::Prompt),
    field(
        "lora_model_dir",
        Naming::Unnamed("a folder: the LoRA files it resolves to are named"),
        Infotext::Absent("a local folder"),
    ),
    field("init_image", Naming::Named, Infotext::Key("Init image")),
    field(
        "strength",
        Naming::Named,
        Infotext::Key("Denoising strength"),
    ),
    field("mask", Naming::Named, Infotext::Key("Mask")),
    field("taesd", Naming::Named, Infotext::Key("TAESD")),
    field(
        "preview",
        Naming::Unnamed(SAME_PIXELS),
        Infotext::Absent(SAME_PIXELS),
    ),
    field(
        "preview_interval",
        Naming::Unnamed(SAME_PIXELS),
        Infotext::Absent(SAME_PIXELS),
    ),
    field(
        "preview_path",
        Naming::Unnamed(SAME_PIXELS),
        Infotext::Absent(SAME_PIXELS),
    ),
    field("taesd_preview_only", Naming::Named, Infotext::Key("TAESD")),
    field("precision", Naming::Named, Infotext::Key("Precision")),
    field(
        "ram_cap",
        Naming::Unnamed("the plan adapts to it; the bits do not depend on it"),
        Infotext::Absent("a property of the machine"),
    ),
    field(
        "backend",
        Naming::Unnamed("process-wide, not a job-file field"),
        Infotext::Absent("not a job-file field"),
    ),
];

impl Request {
    /// Sets every setting this request gives on `job`, marking the per-family ones in `given`;
    /// settings it leaves out keep the job's values. The one place a request becomes a job (flags,
    /// then each job-file line on top of them). Values are checked by `Job::validate` afterwards;
    /// here only what cannot be represented in a job is refused (a negative seed: the caller
    /// resolves `generate`'s random seed first).
    pub fn apply(&self, job: &mut Job, given: &mut Given) -> Result<()> {
        fn set<T: Clone>(value: &mut T, from: &Option<T>) -> bool {
            from.as_ref().map(|v| *value = v.clone()).is_some()
        }
        set(&mut job.model, &self.model);
        if self.vae.is_some() {
            job.vae = self.vae.clone();
        }
        set(&mut job.prompt, &self.prompt);
        if self.negative_prompt.is_some() {
            job.negative = self.negative_prompt.clone();
        }
        given.width |= set(&mut job.width, &self.width);
        given.height |= set(&mut job.height, &self.height);
        given.steps |= set(&mut job.steps, &self.steps);
        given.cfg_scale |= set(&mut job.cfg_scale, &self.cfg_scale);
        given.sampler |= set(&mut job.sampler, &self.sampling_method);
        given.scheduler |= set(&mut job.scheduler, &self.scheduler);
        if let Some(seed) = self.seed {
            job.seed = u64::try_from(seed).map_err(|_| {
                Error::BadRequest(format!(
                    "seed {seed} is negative; a batch needs fixed seeds so reruns resume"
                ))
            })?;
        }
        set(&mut job.clip_skip, &self.clip_skip);
        set(&mut job.rng, &self.rng);
        set(&mut job.prompt_syntax, &self.prompt_syntax);
        if self.prediction.is_some() {
            job.prediction = self.prediction;
        }
        if self.original_size.is_some() {
            job.size_cond.original = self.original_size;
        }
        set(&mut job.size_cond.crop, &self.crop_coords);
        if self.target_size.is_some() {
            job.size_cond.target = self.target_size;
        }
        if self.lora_model_dir.is_some() {
            job.lora_model_dir = self.lora_model_dir.clone();
        }
        if !self.lora.is_empty() {
            job.loras = self
                .lora
                .iter()
                .map(|l| resolve_lora(l, job.lora_model_dir.as_deref()))
                .collect::<Result<_>>()?;
        }
        if self.init_img.is_some() {
            job.init_image = self.init_img.clone();
        }
        set(&mut job.strength, &self.strength);
        if self.mask.is_some() {
            job.mask = self.mask.clone();
        }
        if self.taesd.is_some() {
            job.taesd = self.taesd.clone();
        }
        set(&mut job.preview.mode, &self.preview);
        set(&mut job.preview.interval, &self.preview_interval);
        if self.preview_path.is_some() {
            job.preview.path = self.preview_path.clone();
        }
        job.preview.taesd_only |= self.taesd_preview_only;
        set(&mut job.precision, &self.precision);
        if self.ram_cap.is_some() {
            job.ram_cap = self.ram_cap;
        }
        Ok(())
    }

    /// Relative paths taken from `base` (a job file's folder).
    pub fn rebase(&mut self, base: &Path) {
        let paths = [
            &mut self.model,
            &mut self.vae,
            &mut self.lora_model_dir,
            &mut self.init_img,
            &mut self.mask,
            &mut self.taesd,
            &mut self.preview_path,
        ];
        for p in paths.into_iter().flatten() {
            *p = base.join(&*p);
        }
        for lora in &mut self.lora {
            if let LoraArg::Path(p, _) = lora {
                *p = base.join(&*p);
            }
        }
    }
}

/// A LoRA by path as it is; by name, `DIR/NAME.safetensors` of `lora_model_dir`.
fn resolve_lora(arg: &LoraArg, dir: Option<&Path>) -> Result<LoraRef> {
    match arg {
        LoraArg::Path(path, weight) => Ok(LoraRef {
            path: path.clone(),
            weight: *weight,
        }),
        LoraArg::Name(name, weight) => {
            let dir = dir.ok_or_else(|| {
                Error::BadRequest(format!(
                    "lora name `{name}` needs lora_model_dir (or give its path)"
                ))
            })?;
            Ok(LoraRef {
                path: dir.join(format!("{name}.safetensors")),
                weight: *weight,
            })
        }
    }
}

/// A job-file value read with the setting's `FromStr`, so flags and job files accept the same
/// names and refuse with the same message.
fn parsed<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: Display,
{
    Option::<String>::deserialize(d)?
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .transpose()
}

fn original_size<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<(u32, u32)>, D::Error> {
    with_text(d, |s| SizeConditioning::parse_size("original_size", s))
}

fn target_size<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<(u32, u32)>, D::Error> {
    with_text(d, |s| SizeConditioning::parse_size("target_size", s))
}

fn crop<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<(u32, u32)>, D::Error> {
    with_text(d, SizeConditioning::parse_crop)
}

fn with_text<'de, D: Deserializer<'de>, T>(
    d: D,
    parse: impl Fn(&str) -> Result<T>,
) -> std::result::Result<Option<T>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| parse(&s).map_err(serde::de::Error::custom))
        .transpose()
}

/// Bytes, or a size such as `"6G"`.
fn ram_cap<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    value
        .map(|cap| {
            match &cap {
                serde_json::Value::Number(n) => n.as_u64().filter(|&b| b > 0),
                serde_json::Value::String(s) => parse_size(s).ok(),
                _ => None,
            }
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "ram_cap {cap} is not a size (e.g. \"6G\" or 6442450944)"
                ))
            })
        })
        .transpose()
}

fn names_help(what: &str, names: &[&str]) -> String {
    format!("{what}: {}", names.join(", "))
}

fn parse_original_size(s: &str) -> std::result::Result<(u32, u32), String> {
    SizeConditioning::parse_size("original-size", s).map_err(|e| e.to_string())
}

fn parse_target_size(s: &str) -> std::result::Result<(u32, u32), String> {
    SizeConditioning::parse_size("target-size", s).map_err(|e| e.to_string())
}

fn parse_crop(s: &str) -> std::result::Result<(u32, u32), String> {
    SizeConditioning::parse_crop(s).map_err(|e| e.to_string())
}

fn parse_ram_cap(text: &str) -> std::result::Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_flags_read_path_and_weight() {
        let p = |s| parse_lora(s).unwrap();
        assert_eq!(
            p("a.safetensors"),
            LoraArg::Path("a.safetensors".into(), 1.0)
        );
        assert_eq!(
            p("a.safetensors:0.5"),
            LoraArg::Path("a.safetensors".into(), 0.5)
        );
        assert_eq!(p("dir:x/a.st:-1"), LoraArg::Path("dir:x/a.st".into(), -1.0));
        assert_eq!(p("dir:x/a.st"), LoraArg::Path("dir:x/a.st".into(), 1.0));
        assert!(parse_lora(":0.5").is_err());
        assert!(parse_lora("").is_err());
        assert!(parse_lora("a:inf").is_err());
    }
}
