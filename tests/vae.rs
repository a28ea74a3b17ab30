//! VAE decoder and encoder against diffusers.

mod common;

use common::{assert_close, read_tensors, tiny, tiny_weights};
use sdcap::family::SD1;
use sdcap::kernels::scratch::Scratch;
use sdcap::nn::vae::{Decoder, Encoder};
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
    let dist = encoder.forward(&refs["encode_input"], &Scratch::default());
    assert_close("encode_mean", &dist.mean, &refs["encode_mean"], 1e-4);
    assert_close("encode_logvar", &dist.logvar, &refs["encode_logvar"], 1e-4);
}
