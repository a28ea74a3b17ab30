//! Previews while sampling (`--preview none|proj|tae|vae`, stable-diffusion.cpp's names and
//! meanings): every `interval` model evaluations the sampler's current latent is turned into a
//! PNG and written atomically to the preview path, replacing the one before.
//!
//! * `proj`: the 4×3 latent-to-RGB projection, one pixel per latent pixel (an image 1/8 the size),
//!   `u8(clamp(Σ_c latent_c · M[c] + bias) · 0.5 + 0.5, 0, 1) · 255)` with truncation, as
//!   stable-diffusion.cpp's `preview_latent_image` computes it.
//! * `tae`: a TAESD decode (`--taesd`), full size.
//! * `vae`: the model's VAE decoder, full size.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::family::Family;
use crate::job::{Job, PreviewMode};
use crate::output::RgbImage;
use crate::tensor::Tensor;

/// Where a preview goes when `--preview-path` is not given (stable-diffusion.cpp's default:
/// the working directory).
pub const DEFAULT_PATH: &str = "preview.png";

/// A family's latent-to-RGB projection: rows = latent channels, columns = R, G, B.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Projection {
    pub matrix: [[f32; 3]; 4],
    pub bias: [f32; 3],
}

/// SD1.x and SD2.x (same VAE latent space): stable-diffusion.cpp's `sd_latent_rgb_proj` (its
/// `latent-preview.h` at 030aa3df2e4eacb86e2ed0f3e2342847f4d3244b, taken from ComfyUI's
/// `comfy/latent_formats.py` `SD15.latent_rgb_factors`), bias 0. The fixture
/// `tiny-sd/workflows/taesd/txt2img_euler_taesd.safetensors` `preview_sdcpp_*` checks it.
pub const SD1: Projection = Projection {
    matrix: [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ],
    bias: [0.0; 3],
};

/// SDXL: `sdxl_latent_rgb_proj` of the same stable-diffusion.cpp file (ComfyUI's
/// `SDXL.latent_rgb_factors`, `comfy/latent_formats.py`), bias 0 as there. No fixture checks
/// it (no SDXL preview golden); the SD1 path is the same code.
pub const SDXL: Projection = Projection {
    matrix: [
        [0.3651, 0.4232, 0.4341],
        [-0.2533, -0.0042, 0.1068],
        [0.1076, 0.1111, -0.0362],
        [-0.3165, -0.2492, -0.2188],
    ],
    bias: [0.0; 3],
};

impl Projection {
    pub fn of(family: Family) -> Projection {
        match family {
            Family::Sd1 | Family::Sd2 => SD1,
            Family::Sdxl => SDXL,
        }
    }

    /// The projected latent [1, 4, h, w] → [3, h, w] (before the range change), summed over the
    /// channels in order in f32 as stable-diffusion.cpp does.
    pub fn rgb(&self, latent: &Tensor) -> Tensor {
        let (_, c, h, w) = latent.nchw();
        assert_eq!(c, 4, "the projection reads 4 latent channels");
        let plane = h * w;
        let mut out = vec![0.0f32; 3 * plane];
        for p in 0..plane {
            for (rgb, slot) in out.chunks_mut(plane).enumerate() {
                let mut v = 0.0f32;
                for ch in 0..4 {
                    v += latent.data[ch * plane + p] * self.matrix[ch][rgb];
                }
                slot[p] = v + self.bias[rgb];
            }
        }
        Tensor::new(vec![3, h, w], out)
    }

    /// The preview image: `rgb` to 8 bits, truncating.
    pub fn image(&self, latent: &Tensor) -> RgbImage {
        let rgb = self.rgb(latent);
        let (h, w) = (rgb.shape[1], rgb.shape[2]);
        let mut pixels = vec![0u8; h * w * 3];
        for (ch, plane) in rgb.data.chunks(h * w).enumerate() {
            for (p, &v) in plane.iter().enumerate() {
                pixels[p * 3 + ch] = ((v * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0) as u8;
            }
        }
        RgbImage {
            width: w as u32,
            height: h as u32,
            pixels,
        }
    }
}

/// The preview file of a job (`--preview-path`, else `DEFAULT_PATH`).
pub fn path(job: &Job) -> PathBuf {
    job.preview
        .path
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}

/// Whether a preview is written after model evaluation `index` (0-based).
pub fn due(job: &Job, index: usize) -> bool {
    job.preview.mode != PreviewMode::None
        && (index + 1).is_multiple_of(job.preview.interval.max(1) as usize)
}

/// Checks the TAESD and preview settings of a job before anything is loaded (`Job::validate`
/// calls it): one line each, exit 2.
pub fn check(job: &Job) -> Result<()> {
    let preview = &job.preview;
    if preview.taesd_only && job.taesd.is_none() {
        return Err(Error::BadRequest(
            "--taesd-preview-only needs --taesd PATH".into(),
        ));
    }
    if preview.mode == PreviewMode::Tae && job.taesd.is_none() {
        return Err(Error::BadRequest(
            "--preview tae needs --taesd PATH (the TAESD that decodes the previews)".into(),
        ));
    }
    if preview.mode != PreviewMode::None && preview.interval == 0 {
        return Err(Error::BadRequest(
            "--preview-interval must be at least 1".into(),
        ));
    }
    if let Some(taesd) = &job.taesd {
        check_exists(taesd)?;
    }
    if preview.mode != PreviewMode::None {
        let target = path(job);
        // A file or a new name in an existing folder (links followed), as the output.
        crate::atomic_file::resolve_target(&target)?;
    }
    Ok(())
}

fn check_exists(path: &Path) -> Result<()> {
    crate::weights::check_model_path(path)?;
    if !path.exists() {
        return Err(Error::bad_file(path, "no such file or folder"));
    }
    Ok(())
}
