//! img2img and inpainting on the sampling side, as diffusers' `StableDiffusionImg2ImgPipeline` and
//! `StableDiffusionInpaintPipeline` do it: which steps a strength runs, the checks of the request,
//! the mask at latent size and the masked image. The pipeline (`pipeline::generate_from`) encodes,
//! noises and denoises with these.

use crate::error::{Error, Result};
use crate::job::Job;
use crate::tensor::Tensor;

/// The request's img2img/inpaint fields, checked before any model is loaded (`Job::validate`):
/// strength in (0, 1], a mask only with an init image, and a strength/steps pair that runs at least
/// one step.
pub fn check(job: &Job) -> Result<()> {
    let s = job.strength;
    if !(s.is_finite() && s > 0.0 && s <= 1.0) {
        return Err(Error::BadRequest(format!(
            "strength {s} is out of range (0, 1]"
        )));
    }
    if job.mask.is_some() && job.init_image.is_none() {
        return Err(Error::BadRequest(
            "--mask needs an init image (-i/--init-img) to repaint".into(),
        ));
    }
    if job.init_image.is_some() && job.steps >= 1 && steps_run(job.steps, s) == 0 {
        // diffusers' img2img would run no step and return the (noised) encoded image; its inpaint
        // pipeline refuses. sdcap refuses both.
        let needed = (1.0 / f64::from(s)).ceil();
        return Err(Error::BadRequest(format!(
            "strength {s} with {} steps runs no step (int(steps × strength) = 0); use at least {needed} steps or a larger strength",
            job.steps
        )));
    }
    Ok(())
}

/// The strength as the decimal the user wrote, in f64: `Job::strength` is f32, and diffusers
/// multiplies the Python float (f64) the user typed. Widening the f32 directly would turn 0.7 into
/// 0.69999998…, and int(10 × 0.7) = 7 into 6; the shortest decimal that reads back as the same f32
/// is what was typed (for up to 7 significant digits).
pub fn strength_f64(strength: f32) -> f64 {
    format!("{strength}").parse().unwrap_or(f64::from(strength))
}

/// diffusers' `init_timestep = min(int(num_inference_steps * strength), num_inference_steps)`: the
/// steps run (Python float product, truncated).
pub fn steps_run(steps: u32, strength: f32) -> u32 {
    let product = f64::from(steps) * strength_f64(strength);
    (product as u32).min(steps)
}

/// `t_start = steps - init_timestep`: the steps of the full schedule skipped.
pub fn t_start(steps: u32, strength: f32) -> usize {
    (steps - steps_run(steps, strength)) as usize
}

/// diffusers' mask processing after resizing: `mask < 0.5 → 0`, else 1 (so 128/255 repaints).
pub fn binarize(mask: &Tensor) -> Tensor {
    Tensor::new(
        mask.shape.clone(),
        mask.data
            .iter()
            .map(|&v| if v < 0.5 { 0.0 } else { 1.0 })
            .collect(),
    )
}

/// The masked image the 9-channel UNet sees encoded: `image * (mask < 0.5)` (repainted pixels
/// become 0, mid grey in [-1, 1]). `mask` [1,1,H,W] binarised, `image` [1,3,H,W].
pub fn masked_image(image: &Tensor, mask: &Tensor) -> Tensor {
    let plane = mask.data.len();
    assert_eq!(image.data.len(), 3 * plane, "mask and image sizes");
    Tensor::new(
        image.shape.clone(),
        image
            .data
            .iter()
            .enumerate()
            .map(|(i, &v)| if mask.data[i % plane] < 0.5 { v } else { 0.0 })
            .collect(),
    )
}

/// The mask at latent size as diffusers makes it: `F.interpolate(mask, size=(H/8, W/8))`, mode
/// "nearest", i.e. pixel (8i, 8j), the top-left of each 8×8 block. [1,1,H/8,W/8].
pub fn latent_mask(mask: &Tensor) -> Tensor {
    let (_, _, h, w) = mask.nchw();
    let (lh, lw) = (h / 8, w / 8);
    let mut data = Vec::with_capacity(lh * lw);
    for i in 0..lh {
        for j in 0..lw {
            // torch's nearest index: floor(dst * (in / out)) = 8i for an exact factor of 8.
            let (y, x) = ((i * h) / lh, (j * w) / lw);
            data.push(mask.data[y * w + x]);
        }
    }
    Tensor::new(vec![1, 1, lh, lw], data)
}

/// What the sampling side holds for an img2img/inpaint job besides txt2img's latents, in bytes
/// (the governor's plan adds it to every stage): the init image and the pixel mask as f32 tensors,
/// the masked image (inpaint), and at latent size the init latents, the img2img noise, the noised
/// init latents of a blend, the latent mask, the masked-image latent and a 9-channel UNet's input.
pub fn held_bytes(job: &Job) -> u64 {
    if job.init_image.is_none() {
        return 0;
    }
    let pixels = u64::from(job.width) * u64::from(job.height);
    let latent = pixels / 64 * 4 * 4;
    let mut bytes = pixels * 3 * 4 + 3 * latent;
    if job.mask.is_some() {
        // Pixel mask, masked image; latent mask and masked-image latent; a 9-channel UNet's input
        // and its CFG doubling (27 latent planes) or a blend's noised init latents.
        bytes += pixels * 4 + pixels * 3 * 4 + latent / 4 + latent + latent * 27 / 4;
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_run_is_python_float_truncation() {
        assert_eq!(steps_run(8, 0.3), 2);
        assert_eq!(steps_run(8, 0.6), 4);
        assert_eq!(steps_run(8, 1.0), 8);
        assert_eq!(steps_run(8, 0.75), 6);
        // Python: int(100 * 0.29) = 28 (0.29 is 0.28999… in f64).
        assert_eq!(steps_run(100, 0.29), 28);
        // Python: int(10 * 0.7) = 7; widening the f32 0.7 would give 6.99999988 → 6.
        assert_eq!(steps_run(10, 0.7), 7);
        assert_eq!(t_start(10, 0.7), 3);
        assert_eq!(steps_run(3, 0.1), 0);
    }

    #[test]
    fn check_refuses_bad_fields() {
        let mut job = Job::new("m.safetensors".into(), "p");
        assert!(check(&job).is_ok());
        for s in [0.0, -0.5, 1.01, f32::NAN] {
            job.strength = s;
            assert!(check(&job).is_err(), "strength {s}");
        }
        job.strength = 0.5;
        job.mask = Some("m.png".into());
        let e = check(&job).unwrap_err().to_string();
        assert!(e.contains("init image"), "{e}");
        job.init_image = Some("i.png".into());
        assert!(check(&job).is_ok());
        job.steps = 1;
        let e = check(&job).unwrap_err().to_string();
        assert!(e.contains("runs no step"), "{e}");
        job.steps = 2;
        assert!(check(&job).is_ok());
    }

    #[test]
    fn latent_mask_takes_the_top_left_pixel_of_each_block() {
        let (h, w) = (16, 24);
        let data = (0..h * w)
            .map(|i| ((i % w) + 100 * (i / w)) as f32)
            .collect();
        let m = latent_mask(&Tensor::new(vec![1, 1, h, w], data));
        assert_eq!(m.shape, vec![1, 1, 2, 3]);
        assert_eq!(m.data, vec![0.0, 8.0, 16.0, 800.0, 808.0, 816.0]);
    }

    #[test]
    fn masked_image_zeroes_repainted_pixels_of_every_channel() {
        let mask = binarize(&Tensor::new(vec![1, 1, 1, 3], vec![0.2, 0.5, 0.9]));
        assert_eq!(mask.data, vec![0.0, 1.0, 1.0]);
        let image = Tensor::new(
            vec![1, 3, 1, 3],
            vec![-1.0, 0.5, 0.7, 0.1, 0.2, 0.3, 1.0, -0.4, 0.0],
        );
        let masked = masked_image(&image, &mask);
        assert_eq!(
            masked.data,
            vec![-1.0, 0.0, 0.0, 0.1, 0.0, 0.0, 1.0, 0.0, 0.0]
        );
    }
}
