//! UNet forward against diffusers: output and every recorded intermediate activation, for the
//! three families (tiny SD1.x, SD2.x and SDXL models; see each fixture's README).

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::{assert_close, fixtures, read_tensors, tiny, tiny_weights};
use sdcap::nn::unet::{HeadsRule, UNet};
use sdcap::nn::Ctx;
use sdcap::weights::{TensorStore, Weights};
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
    let unet = UNet::new(&tiny_weights("model.diffusion_model"), HeadsRule::Fixed(8)).unwrap();
    assert_eq!(unet.adm_in_channels(), None);
    let mut seen: HashMap<String, Tensor> = HashMap::new();
    let out = unet.forward_traced(
        &refs["sample"],
        &refs["timesteps"].data,
        &refs["encoder_hidden_states"].data,
        &Ctx::default(),
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

/// The UNet of a family's tiny single file (`model.diffusion_model` prefix).
fn family_unet(family: &str, heads: HeadsRule) -> UNet {
    let path = fixtures()
        .join(family)
        .join(format!("{family}-fp32.safetensors"));
    let store = TensorStore::open(&path).expect("tiny model opens");
    UNet::new(
        &Weights::new(Arc::new(store), "model.diffusion_model"),
        heads,
    )
    .unwrap()
}

/// Compares every `act.*` tensor of a golden with the activation of the same role, and asserts
/// that none is left out.
fn compare_activations(
    refs: &HashMap<String, Tensor>,
    seen: &HashMap<String, Tensor>,
    names: &[(&str, &str)],
) {
    // 1e-4 × max|ref| as for SD1 (f32 summation order differs; diffusers' own batch sizes
    // differ in the last bit).
    for (reference, ours) in names {
        let got = seen
            .get(*ours)
            .unwrap_or_else(|| panic!("{ours} was not traced"));
        assert_close(reference, got, &refs[*reference], 1e-4);
    }
    let mut recorded: Vec<&String> = refs.keys().filter(|k| k.starts_with("act.")).collect();
    recorded.sort();
    let mut compared: Vec<&str> = names.iter().map(|n| n.0).collect();
    compared.sort();
    assert_eq!(recorded, compared, "every recorded activation is compared");
}

/// SD2.x: linear proj_in/proj_out, heads of width 8 (the tiny model's rule; SD2: 64), attention
/// at levels 0 and 1, none at level 2.
#[test]
fn sd2_unet_forward_matches_diffusers() {
    common::compute_threads();
    let refs = read_tensors(&fixtures().join("tiny-sd2/golden/unet_forward.safetensors"));
    let unet = family_unet("tiny-sd2", HeadsRule::Width(8));
    assert_eq!(unet.adm_in_channels(), None);
    let mut seen: HashMap<String, Tensor> = HashMap::new();
    let out = unet.forward_detailed(
        &refs["sample"],
        &refs["timesteps"].data,
        &refs["encoder_hidden_states"].data,
        None,
        &Ctx::default(),
        &mut |name, t| {
            seen.insert(name.to_string(), t.clone());
        },
    );
    assert_close("out", &out, &refs["out"], 1e-4);
    compare_activations(
        &refs,
        &seen,
        &[
            ("act.time_proj", "time_proj"),
            ("act.time_emb", "time_emb"),
            ("act.conv_in", "input_blocks.0"),
            ("act.down_blocks.0.attentions.0", "input_blocks.1.1"),
            ("act.down_blocks.0.attentions.1", "input_blocks.2.1"),
            ("act.down_blocks.0", "input_blocks.3"),
            ("act.down_blocks.1.attentions.0", "input_blocks.4.1"),
            ("act.down_blocks.1.attentions.1", "input_blocks.5.1"),
            ("act.down_blocks.1", "input_blocks.6"),
            ("act.down_blocks.2", "input_blocks.8"),
            ("act.mid_block.attentions.0", "middle_block.1"),
            ("act.mid_block", "middle_block"),
            ("act.up_blocks.0", "output_blocks.2"),
            ("act.up_blocks.1.attentions.0", "output_blocks.3.1"),
            ("act.up_blocks.1.attentions.1", "output_blocks.4.1"),
            ("act.up_blocks.1.attentions.2", "output_blocks.5.1"),
            ("act.up_blocks.1", "output_blocks.5"),
            ("act.up_blocks.2.attentions.0", "output_blocks.6.1"),
            ("act.up_blocks.2.attentions.1", "output_blocks.7.1"),
            ("act.up_blocks.2.attentions.2", "output_blocks.8.1"),
            ("act.up_blocks.2", "output_blocks.8"),
        ],
    );
}

/// SDXL: no attention at level 0, transformer depth 1 and 2 (middle 2), linear projections,
/// 40-wide context, and the added conditioning (pooled text embedding + 6 size ids →
/// `label_emb`, added to the time embedding).
#[test]
fn sdxl_unet_forward_matches_diffusers() {
    common::compute_threads();
    let refs = read_tensors(&fixtures().join("tiny-sdxl/golden/unet_forward.safetensors"));
    let unet = family_unet("tiny-sdxl", HeadsRule::Width(8));
    assert_eq!(unet.adm_in_channels(), Some(68));
    let added = unet
        .added_conditioning(&refs["text_embeds"].data, &refs["time_ids"].data)
        .unwrap();
    let mut seen: HashMap<String, Tensor> = HashMap::new();
    let out = unet.forward_detailed(
        &refs["sample"],
        &refs["timesteps"].data,
        &refs["encoder_hidden_states"].data,
        Some(&added),
        &Ctx::default(),
        &mut |name, t| {
            seen.insert(name.to_string(), t.clone());
        },
    );
    assert_close("out", &out, &refs["out"], 1e-4);
    // The size ids' embeddings are the tail of the added conditioning vector.
    let y = &seen["added"];
    let ids: Vec<f32> = y
        .data
        .chunks(68)
        .flat_map(|row| &row[20..])
        .copied()
        .collect();
    seen.insert("add_time_proj".into(), Tensor::new(vec![2, 48], ids));
    compare_activations(
        &refs,
        &seen,
        &[
            ("act.time_proj", "time_proj"),
            ("act.time_emb", "time_emb"),
            ("act.add_time_proj", "add_time_proj"),
            ("act.add_embedding_input", "added"),
            ("act.add_emb", "label_emb"),
            ("act.emb", "emb"),
            ("act.conv_in", "input_blocks.0"),
            ("act.down_blocks.0", "input_blocks.3"),
            ("act.down_blocks.1.attentions.0", "input_blocks.4.1"),
            ("act.down_blocks.1.attentions.1", "input_blocks.5.1"),
            ("act.down_blocks.1", "input_blocks.6"),
            ("act.down_blocks.2.attentions.0", "input_blocks.7.1"),
            ("act.down_blocks.2.attentions.1", "input_blocks.8.1"),
            ("act.down_blocks.2", "input_blocks.8"),
            ("act.mid_block.attentions.0", "middle_block.1"),
            ("act.mid_block", "middle_block"),
            ("act.up_blocks.0.attentions.0", "output_blocks.0.1"),
            ("act.up_blocks.0.attentions.1", "output_blocks.1.1"),
            ("act.up_blocks.0.attentions.2", "output_blocks.2.1"),
            ("act.up_blocks.0", "output_blocks.2"),
            ("act.up_blocks.1.attentions.0", "output_blocks.3.1"),
            ("act.up_blocks.1.attentions.1", "output_blocks.4.1"),
            ("act.up_blocks.1.attentions.2", "output_blocks.5.1"),
            ("act.up_blocks.1", "output_blocks.5"),
            ("act.up_blocks.2", "output_blocks.8"),
        ],
    );
}

/// The added conditioning refuses, with an error, inputs that cannot fill it, and a UNet
/// without `label_emb` refuses it altogether.
#[test]
fn added_conditioning_refuses_mismatched_widths() {
    let sdxl = family_unet("tiny-sdxl", HeadsRule::Width(8));
    let ids = [64.0, 64.0, 0.0, 0.0, 64.0, 64.0];
    assert!(sdxl.added_conditioning(&[0.0; 20], &ids).is_ok());
    assert!(sdxl.added_conditioning(&[0.0; 19], &ids).is_err());
    assert!(sdxl.added_conditioning(&[0.0; 20], &ids[..5]).is_err());
    assert!(sdxl.added_conditioning(&[], &[]).is_err());
    let sd2 = family_unet("tiny-sd2", HeadsRule::Width(8));
    assert!(sd2.added_conditioning(&[0.0; 20], &ids).is_err());
    // A heads rule that does not divide a transformer's width is an error, not a panic.
    let path = fixtures().join("tiny-sd2/tiny-sd2-fp32.safetensors");
    let store = Arc::new(TensorStore::open(&path).unwrap());
    let w = Weights::new(store, "model.diffusion_model");
    assert!(UNet::new(&w, HeadsRule::Width(7)).is_err());
    assert!(UNet::new(&w, HeadsRule::Fixed(0)).is_err());
}

/// The memory model counts the cross-attention's keys and values over the context: a long
/// prompt (3 chunks of 77 tokens) costs more than one chunk where the maps are small.
#[test]
fn memory_model_counts_the_context_tokens() {
    use sdcap::kernels::scratch::TIERS;
    for family in ["tiny-sd2", "tiny-sdxl"] {
        let unet = family_unet(family, HeadsRule::Width(8));
        let peak = |tokens| unet.peak_activation_bytes(2, (8, 8), tokens, &TIERS[0], 4);
        // k and v of 154 more tokens at the widest transformer (64 channels), batch 2, f32.
        let more = 2 * 2 * 154 * 64 * 4;
        assert!(
            peak(231) >= peak(77) + more,
            "{family}: {} vs {}",
            peak(231),
            peak(77)
        );
    }
}
