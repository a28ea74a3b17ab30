//! CLIP text encoder against transformers: last and penultimate hidden state (clip skip 1 and 2).

mod common;

use common::{assert_close, read_tensors, tiny};
use sdcap::nn::clip::TextEncoder;
use sdcap::nn::Ctx;
use sdcap::Tensor;

#[test]
fn text_encoder_matches_transformers() {
    common::compute_threads();
    let tokens = read_tensors(&tiny("golden/tokens.safetensors"));
    let refs = read_tensors(&tiny("golden/text_encoder.safetensors"));
    let encoder = TextEncoder::new(&common::tiny_weights(
        "cond_stage_model.transformer.text_model",
    ))
    .unwrap();
    let ids: Vec<u32> = tokens["input_ids"].data.iter().map(|&v| v as u32).collect();
    let uncond: Vec<u32> = tokens["uncond_input_ids"]
        .data
        .iter()
        .map(|&v| v as u32)
        .collect();
    let shape = refs["last_hidden_state"].shape.clone();
    let run = |ids: &[u32], n: usize, skip: usize, shape: Vec<usize>| {
        Tensor::new(shape, encoder.forward(ids, n, skip, &Ctx::default()))
    };
    // 1e-4 × max|ref| is the bound; LayerNorm and f32 matmul reordering give ~1e-6.
    assert_close(
        "last_hidden_state",
        &run(&ids, 2, 1, shape.clone()),
        &refs["last_hidden_state"],
        1e-4,
    );
    assert_close(
        "penultimate_hidden_state_ln",
        &run(&ids, 2, 2, shape),
        &refs["penultimate_hidden_state_ln"],
        1e-4,
    );
    assert_close(
        "uncond_last_hidden_state",
        &run(&uncond, 1, 1, vec![1, 77, 32]),
        &refs["uncond_last_hidden_state"],
        1e-4,
    );
}
