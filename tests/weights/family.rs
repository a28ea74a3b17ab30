//! Family detection: SD1.x accepted with its widths, other families and non-models named in one line.

use super::*;

/// A file name, its tensors (name, shape), and what the error must say.
type Case = (&'static str, Vec<(&'static str, Vec<usize>)>, &'static str);

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
fn other_families_are_named_in_one_line() {
    let dir = temp_dir("families");
    let conv_in = "model.diffusion_model.input_blocks.0.0.weight";
    let to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight";
    let cases: Vec<Case> = vec![
        (
            "sdxl",
            vec![
                (conv_in, vec![4, 4, 3, 3]),
                (
                    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                    vec![4],
                ),
                ("model.diffusion_model.label_emb.0.0.weight", vec![4, 4]),
            ],
            "SDXL is not supported yet (sdcap runs SD1.x)",
        ),
        (
            "sd2_openclip",
            vec![
                (conv_in, vec![4, 4, 3, 3]),
                ("cond_stage_model.model.ln_final.weight", vec![4]),
            ],
            "SD2.x",
        ),
        (
            "sd2_context",
            vec![(conv_in, vec![4, 4, 3, 3]), (to_k, vec![2, 1024])],
            "SD2.x",
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
            "inpaint",
            vec![(conv_in, vec![4, 9, 3, 3]), (to_k, vec![2, 768])],
            "9 input channels",
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
            .unwrap_or_else(|| panic!("{name} detected as SD1"));
        assert!(matches!(err, Error::UnsupportedModel(_)), "{name}: {err}");
        assert_one_line(&err, &[needle]);
    }
}
