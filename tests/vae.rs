//! VAE decoder and encoder against diffusers.

mod common;

use common::{assert_close, read_tensors, tiny, tiny_weights};
use sdcap::family::SD1;
use sdcap::nn::vae::{Decoder, Encoder};
use sdcap::nn::Ctx;
use sdcap::Tensor;

#[test]
fn vae_decode_matches_diffusers() {
    common::compute_threads();
    let refs = read_tensors(&tiny("golden/vae.safetensors"));
    let decoder = Decoder::new(&tiny_weights("first_stage_model")).unwrap();
    let latent = &refs["latent"];
    let z = Tensor::new(
        latent.shape.clone(),
        latent
            .data
            .iter()
            .map(|v| v / SD1.vae_scaling_factor)
            .collect(),
    );
    // 1e-4 × max|ref|: the bound; observed error is ~1e-6.
    assert_close("decoded", &decoder.forward(&z), &refs["decoded"], 1e-4);
}

#[test]
fn vae_encode_matches_diffusers() {
    common::compute_threads();
    let refs = read_tensors(&tiny("golden/vae.safetensors"));
    let encoder = Encoder::new(&tiny_weights("first_stage_model")).unwrap();
    let dist = encoder.forward(&refs["encode_input"], &Ctx::default());
    assert_close("encode_mean", &dist.mean, &refs["encode_mean"], 1e-4);
    assert_close("encode_logvar", &dist.logvar, &refs["encode_logvar"], 1e-4);
}

/// SD2.x's and SDXL's VAE goldens (the same KL VAE; SDXL scales latents by 0.13025): decode of the
/// golden's latent divided by the family's scaling factor, and the encoder's mean and log-variance.
/// Tolerance as SD1's above.
#[test]
fn family_vaes_match_diffusers() {
    use sdcap::family::{SD2, SDXL};
    use sdcap::weights::{TensorStore, Weights};
    use std::sync::Arc;
    common::compute_threads();
    for (family, spec) in [("sd2", &SD2), ("sdxl", &SDXL)] {
        let dir = common::fixtures().join(format!("tiny-{family}"));
        let refs = read_tensors(&dir.join("golden/vae.safetensors"));
        assert_eq!(
            refs["scaling_factor"].data[0], spec.vae_scaling_factor,
            "{family}"
        );
        let store = Arc::new(
            TensorStore::open(&dir.join(format!("tiny-{family}-fp32.safetensors"))).unwrap(),
        );
        let w = Weights::new(store, "first_stage_model");
        let decoder = Decoder::new(&w).unwrap();
        let latent = &refs["latent"];
        let z = Tensor::new(
            latent.shape.clone(),
            latent
                .data
                .iter()
                .map(|v| v / spec.vae_scaling_factor)
                .collect(),
        );
        assert_close(family, &decoder.forward(&z), &refs["decoded"], 1e-4);
        let dist = Encoder::new(&w)
            .unwrap()
            .forward(&refs["encode_input"], &Ctx::default());
        assert_close(family, &dist.mean, &refs["encode_mean"], 1e-4);
        assert_close(family, &dist.logvar, &refs["encode_logvar"], 1e-4);
    }
}
