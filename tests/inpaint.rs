//! Inpainting against diffusers' StableDiffusionInpaintPipeline (`tiny-sd/workflows/inpaint/`): the
//! plain 4-channel tiny-sd UNet (latent blending after every step) and the 9-channel tiny-sd-inpaint
//! UNet (mask and masked-image latent as input channels), given noise and seeded.

mod common;
#[path = "common/given_draws.rs"]
mod given_draws;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use common::{fixtures, read_manifest, read_tensors, tiny};
use given_draws::GivenDraws;
use sdcap::init_image::InitImage;
use sdcap::job::Job;
use sdcap::pipeline::{self, Models};
use sdcap::Tensor;

fn inpaint_model() -> PathBuf {
    fixtures().join("tiny-sd-inpaint/tiny-sd-inpaint-fp32.safetensors")
}

fn is_unet9(case: &serde_json::Value) -> bool {
    case["unet_in_channels"] == 9
}

fn case_job(case: &serde_json::Value) -> Job {
    let model = if is_unet9(case) {
        inpaint_model()
    } else {
        tiny("tiny-sd-fp32.safetensors")
    };
    let mut job = Job::new(model, case["prompt"].as_str().unwrap());
    job.negative = Some(case["negative"].as_str().unwrap().into());
    job.width = case["width"].as_u64().unwrap() as u32;
    job.height = case["height"].as_u64().unwrap() as u32;
    job.steps = case["steps"].as_u64().unwrap() as u32;
    job.cfg_scale = case["cfg"].as_f64().unwrap() as f32;
    job.sampler = case["sampler"].as_str().unwrap().parse().unwrap();
    job.strength = case["strength"].as_f64().unwrap() as f32;
    job.seed = case["seed"].as_u64().unwrap_or(0);
    job.init_image = Some(tiny("workflows/inputs/init_64x64.png"));
    job.mask = Some(tiny("workflows/inputs/mask_64x64.png"));
    job
}

/// The init image, and the mask as a decoder hands it over: the PNG's grey levels / 255, NOT
/// binarised (the pipeline binarises as diffusers: 128 repaints, 127 keeps).
fn init_of(common: &HashMap<String, Tensor>) -> InitImage {
    let grey = &common["mask_image_uint8"];
    let mask = Tensor::new(
        vec![1, 1, 64, 64],
        grey.data.iter().map(|v| v / 255.0).collect(),
    );
    assert!(mask.data.iter().any(|&v| v > 0.0 && v < 1.0), "grey tabs");
    InitImage {
        image: common["init_image"].clone(),
        mask: Some(mask),
        resized_from: None,
    }
}

fn cases() -> Vec<serde_json::Value> {
    let manifest = read_manifest(&tiny("workflows/inpaint/manifest.json"));
    manifest["cases"].as_array().unwrap().clone()
}

/// The mask at latent size is diffusers' (nearest: pixel (8i, 8j)) and the masked image is
/// `image * (mask < 0.5)` of the binarised mask.
#[test]
fn mask_preprocessing_matches_diffusers() {
    let common_t = read_tensors(&tiny("workflows/inpaint/common.safetensors"));
    let init = init_of(&common_t);
    let mask = sdcap::img2img::binarize(init.mask.as_ref().unwrap());
    assert_eq!(mask.data, common_t["mask"].data);
    assert_eq!(
        sdcap::img2img::latent_mask(&mask).data,
        common_t["mask_latent"].data
    );
    assert_eq!(
        sdcap::img2img::masked_image(&init.image, &mask).data,
        common_t["masked_image"].data
    );
}

/// Every `_given` case, draws fed by role (VAE encodes in diffusers' call order: the image's when
/// it is drawn, then the masked image's, which a 4-channel UNet never uses). Bounds as the txt2img
/// and img2img goldens: final latent within `LATENT_TOL` (1e-3; here ~1e-4), 8-bit image ±1.
#[test]
fn given_noise_cases_match_diffusers() {
    common::compute_threads();
    let common_t = read_tensors(&tiny("workflows/inpaint/common.safetensors"));
    let init = init_of(&common_t);
    let cases: Vec<_> = cases()
        .into_iter()
        .filter(|c| c["mode"] == "given")
        .collect();
    assert_eq!(cases.len(), 8);
    let plain = Models::load(&case_job(&cases[0])).unwrap();
    let nine = cases.iter().find(|c| is_unet9(c)).unwrap();
    let inpainting = Models::load(&case_job(nine)).unwrap();
    assert!(!plain.inpaint_unet && inpainting.inpaint_unet);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let job = case_job(case);
        let refs = read_tensors(&tiny(&format!("workflows/inpaint/{name}.safetensors")));
        let encode = ["image_encode_noise", "masked_image_encode_noise"]
            .iter()
            .filter_map(|k| refs.get(*k).map(|t| t.data.clone()))
            .collect();
        let mut draws = GivenDraws {
            encode,
            initial: [refs["noise"].data.clone()].into(),
            step: GivenDraws::steps_of(&refs),
        };
        let models = if is_unet9(case) { &inpainting } else { &plain };
        let got = pipeline::generate_from_draws(models, &job, Some(&init), &mut draws, &mut |_| {})
            .unwrap();
        draws.assert_used_up(name);
        common::assert_run_matches(name, &got, &refs);
    }
}

/// Every `_e2e` case: one generator seeded 42 (draw order per `rng_calls`: the image's VAE sample
/// when drawn, the noise, the masked image's VAE sample, Euler a's step noise).
#[test]
fn seeded_cases_match_diffusers_end_to_end() {
    common::compute_threads();
    let common_t = read_tensors(&tiny("workflows/inpaint/common.safetensors"));
    let init = init_of(&common_t);
    let cases: Vec<_> = cases().into_iter().filter(|c| c["mode"] == "e2e").collect();
    assert_eq!(cases.len(), 8);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let job = case_job(case);
        assert_eq!(job.seed, 42);
        let models = Models::load(&job).unwrap();
        let refs = read_tensors(&tiny(&format!("workflows/inpaint/{name}.safetensors")));
        let got = pipeline::generate_from(
            &models,
            &job,
            Some(&init),
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap();
        common::assert_run_matches(name, &got, &refs);
    }
}

/// A 4-channel inpaint keeps the unmasked latent: after the last step the latent outside the mask
/// is the clean init latent (blended with weight 1), so every sampler gives the same bits there
/// (and diffusers' `image_latents` within the encoder's float32 rounding, 1e-5), while the masked
/// area is repainted.
#[test]
fn blending_keeps_the_unmasked_latent_for_every_sampler() {
    common::compute_threads();
    let common_t = read_tensors(&tiny("workflows/inpaint/common.safetensors"));
    let init = init_of(&common_t);
    let case = cases()
        .into_iter()
        .find(|c| c["name"] == "unet4_euler_str0.75_given")
        .unwrap();
    let refs = read_tensors(&tiny(
        "workflows/inpaint/unet4_euler_str0.75_given.safetensors",
    ));
    let image_latents = &refs["image_latents"].data;
    let keep: Vec<bool> = common_t["mask_latent"]
        .data
        .iter()
        .map(|&m| m == 0.0)
        .collect();
    let plane = keep.len();
    let base = Job {
        steps: 4,
        ..case_job(&case)
    };
    let models = Models::load(&base).unwrap();
    let mut kept_bits: Option<Vec<f32>> = None;
    for &name in sdcap::job::SamplerKind::NAMES {
        let job = Job {
            sampler: name.parse().unwrap(),
            ..base.clone()
        };
        let mut draws = GivenDraws {
            encode: [refs["image_encode_noise"].data.clone(), vec![0.0; 256]].into(),
            initial: [refs["noise"].data.clone()].into(),
            step: std::iter::repeat_n(vec![0.0; 256], 4).collect(),
        };
        let got =
            pipeline::generate_from_draws(&models, &job, Some(&init), &mut draws, &mut |_| {})
                .unwrap();
        let (mut kept, mut repainted) = (Vec::new(), 0);
        for (i, (&g, &want)) in got.latent.data.iter().zip(image_latents).enumerate() {
            if keep[i % plane] {
                assert!(
                    (g - want).abs() <= 1e-5,
                    "{name}: kept latent {i}: {g} vs {want}"
                );
                kept.push(g);
            } else if (g - want).abs() > 1e-3 {
                repainted += 1;
            }
        }
        assert!(repainted > 0, "{name}: the masked area changed");
        match &kept_bits {
            None => kept_bits = Some(kept),
            Some(first) => assert!(
                *first == kept,
                "{name}: kept latent differs between samplers"
            ),
        }
    }
}

/// An inpainting (9-channel) model needs an init image and a mask: without either, one error.
#[test]
fn inpainting_model_needs_image_and_mask() {
    let common_t = read_tensors(&tiny("workflows/inpaint/common.safetensors"));
    let mut job = Job::new(inpaint_model(), "a photo of a cat");
    job.width = 64;
    job.height = 64;
    job.steps = 2;
    let models = Models::load(&job).unwrap();
    assert!(models.inpaint_unet);
    assert_eq!(models.latent_channels(), 4);
    let e = pipeline::generate(&models, &job, &mut |_| {})
        .err()
        .expect("refused");
    assert!(e.to_string().contains("inpainting model"), "{e}");
    job.init_image = Some(tiny("workflows/inputs/init_64x64.png"));
    let no_mask = InitImage {
        mask: None,
        ..init_of(&common_t)
    };
    let e = pipeline::generate_from(
        &models,
        &job,
        Some(&no_mask),
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .err()
    .expect("refused");
    assert!(e.to_string().contains("mask"), "{e}");
}
