//! PNG output with generation parameters.
//!
//! The image is written to a temporary file in the target's own directory, synced, then renamed over
//! the target: a reader never sees a partial PNG, and a failed write leaves the old file (if any) as it
//! was and no temporary file behind.

use std::io::{self, BufWriter, Write};
use std::path::Path;

use crate::atomic_file::{write_atomically, Existing};
use crate::error::{Error, Result};
use crate::job::{Job, Precision, SamplerKind, ScheduleKind};
use crate::prompt::PromptSyntax;
use crate::tokenizer::{Tokenizer, CONTEXT_LEN};

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Writes `image` as an 8-bit RGB PNG with a `parameters` text chunk (A1111 format, see
/// [`parameters_text`]): tEXt, or iTXt when the text is not Latin-1. Atomic: either `path` holds the complete new image, or it is untouched.
pub fn write_png(path: &Path, image: &RgbImage, parameters: &str) -> Result<()> {
    let expected = image.width as usize * image.height as usize * 3;
    if image.width == 0 || image.height == 0 || image.pixels.len() != expected {
        return Err(Error::BadRequest(format!(
            "image buffer holds {} bytes, expected {expected} for {}x{} RGB",
            image.pixels.len(),
            image.width,
            image.height
        )));
    }
    write_atomically(path, Existing::Replace, |file| {
        encode(file, image, parameters).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    })
}

/// Writes `image` as PNG to `out` (buffered here), as [`write_png`] writes it into its file; the
/// caller checks the buffer's size. For `-o -` and for a temporary file created before the run.
pub fn encode<W: Write>(out: W, image: &RgbImage, parameters: &str) -> io::Result<()> {
    let mut encoder = png::Encoder::new(BufWriter::new(out), image.width, image.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // tEXt is Latin-1 only; a prompt beyond that goes in an iTXt chunk (UTF-8), as A1111 does.
    if parameters.chars().all(|c| (c as u32) <= 0xff) {
        encoder.add_text_chunk("parameters".to_string(), parameters.to_string())
    } else {
        encoder.add_itxt_chunk("parameters".to_string(), parameters.to_string())
    }
    .map_err(png_err)?;
    let mut writer = encoder.write_header().map_err(png_err)?;
    writer.write_image_data(&image.pixels).map_err(png_err)?;
    // `finish` writes IEND and flushes the buffer into the file.
    writer.finish().map_err(png_err)
}

fn png_err(e: png::EncodingError) -> io::Error {
    match e {
        png::EncodingError::IoError(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// The generation parameters in the AUTOMATIC1111 infotext format, so tools that read A1111 PNGs
/// (the web UI's "PNG Info", image hosts) show them:
///
/// ```text
/// a lighthouse at dusk
/// Negative prompt: blurry
/// Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model: v1-5-pruned-emaonly, RNG: CPU, Version: sdcap 0.1.0
/// ```
///
/// The negative line is left out when empty and `Clip skip` when it is 1; `Prediction`,
/// `Original size`, `Crop coords` and `Target size` appear only when set. The prompts are as given
/// (with `--prompt-syntax plain`, what the model read: [`infotext_prompt`]); values with `,`, `:` or a newline are JSON-quoted, as A1111's
/// `quote` does. The Karras schedule is
/// written the legacy way, as a suffix of the sampler name (`DPM++ 2M Karras`): older A1111 versions
/// only understand that form, and newer ones split the suffix back into their `Schedule type`.
pub fn parameters_text(job: &Job) -> String {
    // The plain syntax cuts a long prompt: it stores what was read. A1111's reads it all.
    let stored = |text: &str| match job.prompt_syntax {
        PromptSyntax::Plain => infotext_prompt(text),
        PromptSyntax::A1111 => infotext_line(text),
    };
    let mut text = stored(&job.prompt);
    // `--lora` files as A1111 records LoRAs: tags in the prompt (it finds them by file stem).
    for lora in &job.loras {
        text.push_str(&format!(
            " <lora:{}:{}>",
            model_name(&lora.path),
            lora.weight
        ));
    }
    if !job.negative_text().is_empty() {
        text.push_str("\nNegative prompt: ");
        text.push_str(&stored(job.negative_text()));
    }
    let mut fields = vec![
        format!("Steps: {}", job.steps),
        format!(
            "Sampler: {}",
            a1111_sampler_name(job.sampler, job.scheduler)
        ),
        format!("CFG scale: {}", job.cfg_scale),
        format!("Seed: {}", job.seed),
        format!("Size: {}x{}", job.width, job.height),
        format!("Model: {}", quote(&model_name(&job.model))),
    ];
    if let Some(vae) = &job.vae {
        fields.push(format!("VAE: {}", quote(&file_label(vae))));
    }
    if job.clip_skip > 1 {
        fields.push(format!("Clip skip: {}", job.clip_skip));
    }
    // A1111 writes none of these (its SDXL conditioning is always the defaults, and the prediction
    // type comes from the model's config): written only when the user set them, so that the image
    // can be made again; readers keep unknown `Key: value` pairs as they are.
    if let Some(p) = job.prediction {
        fields.push(format!("Prediction: {p}"));
    }
    let size = |(h, w): (u32, u32)| format!("{w}x{h}");
    if let Some(original) = job.size_cond.original {
        fields.push(format!("Original size: {}", size(original)));
    }
    if job.size_cond.crop != (0, 0) {
        let (top, left) = job.size_cond.crop;
        fields.push(format!("Crop coords: {}", quote(&format!("{top},{left}"))));
    }
    if let Some(target) = job.size_cond.target {
        fields.push(format!("Target size: {}", size(target)));
    }
    if let Some(init) = &job.init_image {
        fields.push(format!("Denoising strength: {}", job.strength));
        fields.push(format!("Init image: {}", quote(&file_label(init))));
    }
    if let Some(mask) = &job.mask {
        fields.push(format!("Mask: {}", quote(&file_label(mask))));
    }
    if let Some(taesd) = job.final_taesd() {
        fields.push(format!("TAESD: {}", quote(&file_label(taesd))));
    }
    if job.precision != Precision::default() {
        fields.push(format!("Precision: {}", job.precision));
    }
    // A1111's key for "initial noise from torch's CPU generator", which is what `--rng cpu` reproduces.
    fields.push("RNG: CPU".to_string());
    fields.push(format!("Version: sdcap {}", env!("CARGO_PKG_VERSION")));
    text.push('\n');
    text.push_str(&fields.join(", "));
    text
}

/// A prompt as the `parameters` chunk stores it. A1111 writes prompts as they are, newlines
/// included, and its reader (`parse_generation_parameters`) takes every line that starts with
/// `Negative prompt:` (after trimming) as the start of the negative prompt. So, changing nothing the
/// text encoder sees:
/// - the part the text encoder read ([`Tokenizer::kept_text`]: the prompt itself unless the 77
///   positions cut it);
/// - control characters dropped, except newline; the whitespace ones (tab, CR, …) and the Unicode
///   line and paragraph separators become a space (CLIP splits words at any whitespace);
/// - a line starting with `Negative prompt:` gets a lower-case `n` (CLIP lower-cases, so the
///   tokens are the same, and A1111's reader, which is case-sensitive, keeps the line where it is).
pub fn infotext_prompt(text: &str) -> String {
    infotext_line(&Tokenizer::clip().kept_text(text, CONTEXT_LEN))
}

/// [`infotext_prompt`] without the cut: the whole prompt, cleaned as said there (A1111 syntax,
/// which reads any length).
fn infotext_line(kept: &str) -> String {
    let cleaned: String = kept
        .chars()
        .filter_map(|c| match c {
            '\n' => Some(c),
            '\u{2028}' | '\u{2029}' => Some(' '),
            c if c.is_control() && c.is_whitespace() => Some(' '),
            c if c.is_control() => None,
            c => Some(c),
        })
        .collect();
    cleaned
        .split('\n')
        .map(|line| {
            let body = line.trim_start();
            match body.strip_prefix("Negative prompt:") {
                Some(rest) => format!("{}negative prompt:{rest}", &line[..line.len() - body.len()]),
                None => line.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A1111's `quote`: a value holding `,`, `:` or a newline (here also any control character) is
/// written as a JSON string, so it stays one field of the last line.
fn quote(value: &str) -> String {
    if value.contains([',', ':', '\n']) || value.chars().any(char::is_control) {
        serde_json::to_string(value).expect("a string serialises")
    } else {
        value.to_string()
    }
}

/// The sampler as A1111 names it. The Karras suffix only goes on the sigma-based samplers, the ones
/// the schedule changes.
fn a1111_sampler_name(sampler: SamplerKind, scheduler: ScheduleKind) -> String {
    let (name, sigma_based) = match sampler {
        SamplerKind::Euler => ("Euler", true),
        SamplerKind::EulerA => ("Euler a", true),
        SamplerKind::DpmPp2m => ("DPM++ 2M", true),
        SamplerKind::Ddim => ("DDIM", false),
        SamplerKind::Lcm => ("LCM", false),
        SamplerKind::Heun => ("Heun", true),
        SamplerKind::DpmPp2mSde => ("DPM++ 2M SDE", true),
        SamplerKind::Dpm2 => ("DPM2", true),
        SamplerKind::UniPc => ("UniPC", true),
        SamplerKind::Lms => ("LMS", true),
    };
    match scheduler {
        ScheduleKind::Karras if sigma_based => format!("{name} Karras"),
        _ => name.to_string(),
    }
}

/// `models/v1-5-pruned-emaonly.safetensors` → `v1-5-pruned-emaonly`; a diffusers folder → its name.
fn model_name(path: &Path) -> String {
    if path.is_dir() {
        file_label(path)
    } else {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string())
    }
}

fn file_label(path: &Path) -> String {
    path.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}
