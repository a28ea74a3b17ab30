//! Family detection: SD1.x accepted with its widths, other families and non-models named in one line.

use super::*;

/// Tensor names and shapes of a test file.
type Tensors = Vec<(&'static str, Vec<usize>)>;

/// A file name, its tensors, and what the error must say.
type Case = (&'static str, Tensors, &'static str);

#[test]
fn tiny_model_is_sd1_in_both_layouts() {
    for path in [ldm_file(), tiny().join("diffusers")] {
        let store = TensorStore::open(&path).unwrap();
        assert_eq!(detect_family(&store).unwrap(), Family::Sd1);
        let dims = sd1_dims(&store).unwrap();
        let expected = Sd1Dims {
            in_channels: 4,
            model_channels: 32,
            context_dim: 32,
            text_width: 32,
            latent_channels: 4,
        };
        assert_eq!(dims, expected);
    }
}

#[test]
fn sd2_and_sdxl_are_told_apart_by_their_text_encoders() {
    let dir = temp_dir("families_run");
    let conv_in = "model.diffusion_model.input_blocks.0.0.weight";
    let cases: Vec<(&str, Tensors, Family)> = vec![
        (
            "sdxl",
            vec![
                (conv_in, vec![4, 4, 3, 3]),
                (
                    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                    vec![4],
                ),
                ("conditioner.embedders.1.model.ln_final.weight", vec![4]),
                ("model.diffusion_model.label_emb.0.0.weight", vec![4, 4]),
            ],
            Family::Sdxl,
        ),
        (
            "sd2",
            vec![
                (conv_in, vec![4, 4, 3, 3]),
                ("cond_stage_model.model.ln_final.weight", vec![4]),
            ],
            Family::Sd2,
        ),
    ];
    for (name, tensors, family) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        write_zeros(&path, &tensors);
        let store = TensorStore::open(&path).unwrap();
        assert_eq!(detect_family(&store).unwrap(), family, "{name}");
    }
}

/// A 9-channel `conv_in` (latent, mask, masked-image latent) is an inpainting UNet of its family,
/// which sdcap runs (`Models::inpaint_unet`).
#[test]
fn inpainting_unets_are_their_familys() {
    let dir = temp_dir("families_inpaint");
    let conv_in = "model.diffusion_model.input_blocks.0.0.weight";
    let to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight";
    let cases: Vec<(&str, Tensors, Family)> = vec![
        (
            "sd1_inpaint",
            vec![(conv_in, vec![4, 9, 3, 3]), (to_k, vec![2, 768])],
            Family::Sd1,
        ),
        (
            "sdxl_inpaint",
            vec![
                (conv_in, vec![4, 9, 3, 3]),
                (
                    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                    vec![4],
                ),
                ("conditioner.embedders.1.model.ln_final.weight", vec![4]),
                ("model.diffusion_model.label_emb.0.0.weight", vec![4, 4]),
            ],
            Family::Sdxl,
        ),
    ];
    for (name, tensors, family) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        write_zeros(&path, &tensors);
        let store = TensorStore::open(&path).unwrap();
        assert_eq!(detect_family(&store).unwrap(), family, "{name}");
    }
}

#[test]
fn other_families_are_named_in_one_line() {
    let dir = temp_dir("families");
    let conv_in = "model.diffusion_model.input_blocks.0.0.weight";
    let to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight";
    let cases: Vec<Case> = vec![
        (
            "sdxl_refiner",
            vec![
                (conv_in, vec![4, 4, 3, 3]),
                ("conditioner.embedders.0.model.ln_final.weight", vec![4]),
                ("model.diffusion_model.label_emb.0.0.weight", vec![4, 4]),
            ],
            "SDXL refiner is not supported yet",
        ),
        (
            "sd2_unet_clip_l",
            vec![(conv_in, vec![4, 4, 3, 3]), (to_k, vec![2, 1024])],
            "SD2.x UNet with a CLIP ViT-L",
        ),
        (
            "sd3",
            vec![(
                "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
                vec![3, 1],
            )],
            "SD3",
        ),
        (
            "flux",
            vec![("double_blocks.0.img_attn.qkv.weight", vec![3, 1])],
            "Flux is not supported yet",
        ),
        (
            "pix2pix",
            vec![(conv_in, vec![4, 8, 3, 3]), (to_k, vec![2, 768])],
            "8 input channels",
        ),
        (
            "sdxl_pix2pix",
            vec![
                (conv_in, vec![4, 8, 3, 3]),
                ("conditioner.embedders.1.model.ln_final.weight", vec![4]),
            ],
            "SDXL UNet takes 8 input channels",
        ),
        (
            "lora",
            vec![(
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                vec![4, 4],
            )],
            "LoRA",
        ),
        (
            "vae_alone",
            vec![("decoder.conv_in.weight", vec![4, 4, 3, 3])],
            "standalone VAE",
        ),
        (
            "unet_alone",
            vec![
                ("conv_in.weight", vec![4, 4, 3, 3]),
                ("down_blocks.0.resnets.0.conv1.weight", vec![4, 4, 3, 3]),
            ],
            "diffusers UNet file on its own",
        ),
        ("nothing", vec![], "holds no tensors"),
        (
            "unknown",
            vec![("mystery.weight", vec![4])],
            "unknown model type",
        ),
    ];
    for (name, tensors, needle) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        write_zeros(&path, &tensors);
        let store = TensorStore::open(&path).unwrap();
        let err = detect_family(&store)
            .err()
            .unwrap_or_else(|| panic!("{name} detected as a family we run"));
        assert!(matches!(err, Error::UnsupportedModel(_)), "{name}: {err}");
        assert_one_line(&err, &[needle]);
    }
}

/// The prediction type: the file's metadata first, then a `v_pred` marker, then (SD2.x) the spread
/// of the last output transformer's first LayerNorm bias (ComfyUI's rule), else eps.
#[test]
fn prediction_type_comes_from_metadata_marker_or_weights() {
    use sdcap::family::Prediction;
    use sdcap::weights::{detect_prediction, PredictionSource};
    let dir = temp_dir("prediction");
    let sd2 = |bias: Vec<f32>| -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        vec![
            (
                "model.diffusion_model.input_blocks.0.0.weight".into(),
                Dtype::F32,
                vec![4, 4, 3, 3],
                vec![0; 4 * 144],
            ),
            (
                "cond_stage_model.model.ln_final.weight".into(),
                Dtype::F32,
                vec![4],
                vec![0; 16],
            ),
            (
                "model.diffusion_model.output_blocks.2.1.transformer_blocks.0.norm1.bias".into(),
                Dtype::F32,
                vec![4],
                vec![0; 16],
            ),
            (
                "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.norm1.bias".into(),
                Dtype::F32,
                vec![bias.len()],
                f32s(&bias),
            ),
        ]
    };
    let open = |name: &str,
                tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
                meta: Option<(&str, &str)>| {
        let path = dir.join(name);
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let meta = meta.map(|(k, v)| [(k.to_string(), v.to_string())].into_iter().collect());
        std::fs::write(&path, safetensors::serialize(views, meta).unwrap()).unwrap();
        let store = TensorStore::open(&path).unwrap();
        let family = detect_family(&store).unwrap();
        detect_prediction(&store, family)
    };
    // Spread 0.2 (> 0.09): v; all zeros (a fresh or eps model): eps.
    let wide = vec![0.2, -0.2, 0.2, -0.2];
    assert_eq!(
        open("wide.safetensors", sd2(wide.clone()), None),
        (Prediction::V, PredictionSource::Weights)
    );
    assert_eq!(
        open("flat.safetensors", sd2(vec![0.0; 4]), None),
        (Prediction::Eps, PredictionSource::Weights)
    );
    // The metadata wins over the weights.
    assert_eq!(
        open(
            "meta.safetensors",
            sd2(wide),
            Some(("modelspec.prediction_type", "epsilon"))
        ),
        (Prediction::Eps, PredictionSource::File)
    );
    let mut marked = sd2(vec![0.0; 4]);
    marked.push(("v_pred".into(), Dtype::F32, vec![0], vec![]));
    assert_eq!(
        open("marked.safetensors", marked, None),
        (Prediction::V, PredictionSource::File)
    );
}
