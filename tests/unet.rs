//! UNet forward against diffusers: output and every recorded intermediate activation.

mod common;

use std::collections::HashMap;

use common::{assert_close, read_tensors, tiny, tiny_weights};
use sdcap::nn::unet::UNet;
use sdcap::Tensor;

/// diffusers activation name → the LDM block whose output it is (tiny model layout, see the
/// fixture README: input_blocks.2 is level 0's downsampler, output_blocks.1 ends with the upsampler).
const ACTIVATIONS: &[(&str, &str)] = &[
    ("act.time_proj", "time_proj"),
    ("act.time_emb", "time_emb"),
    ("act.conv_in", "input_blocks.0"),
    ("act.down_blocks.0", "input_blocks.2"),
    ("act.down_blocks.1", "input_blocks.3"),
    ("act.mid_block", "middle_block"),
    ("act.up_blocks.0", "output_blocks.1"),
    ("act.up_blocks.1", "output_blocks.3"),
];

#[test]
fn unet_forward_matches_diffusers() {
    common::compute_threads();
    let refs = read_tensors(&tiny("golden/unet_forward.safetensors"));
    let unet = UNet::new(&tiny_weights("model.diffusion_model")).unwrap();
    let mut seen: HashMap<String, Tensor> = HashMap::new();
    let out = unet.forward_traced(
        &refs["sample"],
        &refs["timesteps"].data,
        &refs["encoder_hidden_states"].data,
        &mut |name, t| {
            seen.insert(name.to_string(), t.clone());
        },
    );
    // 1e-4 × max|ref| is the bound; f32 reordering gives ~1e-6 here.
    assert_close("out", &out, &refs["out"], 1e-4);
    for (reference, ours) in ACTIVATIONS {
        assert_close(reference, &seen[*ours], &refs[*reference], 1e-4);
    }
    let recorded = refs.keys().filter(|k| k.starts_with("act.")).count();
    assert_eq!(
        recorded,
        ACTIVATIONS.len(),
        "every recorded activation is compared"
    );
}
