//! Diffusers pipeline folders → LDM names: the tiny model against its LDM file, folder problems, and
//! the name map against the real SD1.5 layout.

use super::*;

#[test]
fn diffusers_folder_maps_every_tensor_onto_the_ldm_file() {
    let diffusers = TensorStore::open(&tiny().join("diffusers")).unwrap();
    let ldm = TensorStore::open(&ldm_file()).unwrap();
    for t in diffusers.tensors() {
        let l = ldm
            .get(&t.name)
            .unwrap_or_else(|| panic!("`{}` not in the LDM file", t.name));
        assert_eq!(t.dtype, l.dtype, "{}", t.name);
        if t.shape != l.shape {
            // Only the VAE mid attention differs: diffusers stores linear [c,c], LDM 1x1 convs [c,c,1,1].
            assert!(
                t.name.contains(".mid.attn_1."),
                "{}: {:?} vs {:?}",
                t.name,
                t.shape,
                l.shape
            );
            assert_eq!(squeezed(&t.shape), squeezed(&l.shape), "{}", t.name);
        }
        assert!(
            diffusers.bytes(t) == ldm.bytes(l),
            "bytes differ for {}",
            t.name
        );
    }
    let weights = ldm.tensors().iter().filter(|t| !ldm_only(&t.name)).count();
    assert_eq!(diffusers.tensors().len(), weights);
    assert_eq!(detect_family(&diffusers).unwrap(), Family::Sd1);
    // The networks' view: a 1x1-conv weight is served from the linear diffusers tensor.
    let w = Weights::new(
        std::sync::Arc::new(diffusers),
        "first_stage_model.decoder.mid.attn_1",
    );
    assert_eq!(
        w.param("q.weight", &[64, 64, 1, 1]).unwrap().to_f32().len(),
        64 * 64
    );
}

/// A copy of the tiny diffusers folder made of links, with weights renamed by `rename`.
fn linked_folder(test: &str, rename: &dyn Fn(&str) -> String) -> PathBuf {
    let src = tiny().join("diffusers");
    let dir = temp_dir(test);
    for (sub, file) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("unet", "config.json"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("vae", "config.json"),
        ("text_encoder", "model.safetensors"),
        ("text_encoder", "config.json"),
    ] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        std::os::unix::fs::symlink(src.join(sub).join(file), dir.join(sub).join(rename(file)))
            .unwrap();
    }
    dir
}

#[test]
fn diffusers_fp16_variant_files_are_found() {
    let dir = linked_folder("fp16_variant", &|f| {
        f.replace(".safetensors", ".fp16.safetensors")
    });
    let store = TensorStore::open(&dir).unwrap();
    assert_eq!(
        store.tensors().len(),
        TensorStore::open(&tiny().join("diffusers"))
            .unwrap()
            .tensors()
            .len()
    );
    assert!(store
        .paths()
        .any(|p| p.ends_with("unet/diffusion_pytorch_model.fp16.safetensors")));
}

#[test]
fn diffusers_folder_problems_are_named() {
    let empty = temp_dir("empty_folder");
    assert_open_error(&empty, &["not a diffusers pipeline"]);

    let partial = linked_folder("partial_folder", &|f| f.to_string());
    std::fs::remove_file(partial.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    assert_open_error(
        &partial,
        &["vae/diffusion_pytorch_model.safetensors", "missing"],
    );
    std::fs::write(partial.join("vae/diffusion_pytorch_model.bin"), b"\x80\x02").unwrap();
    assert_open_error(&partial, &["diffusion_pytorch_model.bin", "pickle"]);

    let config = linked_folder("bad_config", &|f| f.to_string());
    std::fs::remove_file(config.join("unet/config.json")).unwrap();
    std::fs::write(
        config.join("unet/config.json"),
        r#"{"layers_per_block": 2, "block_out_channels": [32, 64]}"#,
    )
    .unwrap();
    assert_open_error(
        &config,
        &["unet/config.json", "layers_per_block 2", "1 resnets"],
    );
    std::fs::write(config.join("unet/config.json"), "{not json").unwrap();
    assert_open_error(&config, &["unet/config.json", "not valid JSON"]);

    // A class that says SDXL makes text_encoder_2/ required.
    let xl = linked_folder("sdxl_folder", &|f| f.to_string());
    std::fs::write(
        xl.join("model_index.json"),
        r#"{"_class_name": "StableDiffusionXLPipeline"}"#,
    )
    .unwrap();
    assert_open_error(&xl, &["text_encoder_2/model.safetensors", "missing"]);

    let sd3 = linked_folder("sd3_folder", &|f| f.to_string());
    std::fs::write(
        sd3.join("model_index.json"),
        r#"{"_class_name": "StableDiffusion3Pipeline"}"#,
    )
    .unwrap();
    let err = TensorStore::open(&sd3).err().unwrap();
    let msg = err.to_string();
    assert!(
        msg.starts_with("unsupported model:") && msg.contains("SD3"),
        "{msg}"
    );
}

/// LDM → diffusers for SD1.5, from the fixed tables of diffusers' `convert_diffusers_to_original_stable_
/// diffusion.py` (hard-coded 4 levels, 2 resnets down, 3 up): independent of sdcap's derived indices.
fn sd15_reference_to_diffusers(ldm: &str) -> Option<String> {
    let mut unet: Vec<(String, String)> = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("middle_block.1.", "mid_block.attentions.0."),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    for i in 0..4 {
        for j in 0..2 {
            unet.push((
                format!("input_blocks.{}.0.", 3 * i + j + 1),
                format!("down_blocks.{i}.resnets.{j}."),
            ));
            if i < 3 {
                unet.push((
                    format!("input_blocks.{}.1.", 3 * i + j + 1),
                    format!("down_blocks.{i}.attentions.{j}."),
                ));
            }
            unet.push((
                format!("middle_block.{}.", 2 * j),
                format!("mid_block.resnets.{j}."),
            ));
        }
        for j in 0..3 {
            unet.push((
                format!("output_blocks.{}.0.", 3 * i + j),
                format!("up_blocks.{i}.resnets.{j}."),
            ));
            if i > 0 {
                unet.push((
                    format!("output_blocks.{}.1.", 3 * i + j),
                    format!("up_blocks.{i}.attentions.{j}."),
                ));
            }
        }
        if i < 3 {
            unet.push((
                format!("input_blocks.{}.0.op.", 3 * (i + 1)),
                format!("down_blocks.{i}.downsamplers.0.conv."),
            ));
            let slot = if i == 0 { 1 } else { 2 };
            unet.push((
                format!("output_blocks.{}.{slot}.", 3 * i + 2),
                format!("up_blocks.{i}.upsamplers.0."),
            ));
        }
    }
    let resnet = [
        ("in_layers.0", "norm1"),
        ("in_layers.2", "conv1"),
        ("out_layers.0", "norm2"),
        ("out_layers.3", "conv2"),
        ("emb_layers.1", "time_emb_proj"),
        ("skip_connection", "conv_shortcut"),
    ];
    if let Some(rest) = ldm.strip_prefix("model.diffusion_model.") {
        let (sd, hf) = unet
            .iter()
            .filter(|(sd, _)| rest.starts_with(sd.as_str()))
            .max_by_key(|(sd, _)| sd.len())?;
        let mut out = format!("{hf}{}", &rest[sd.len()..]);
        if out.contains(".resnets.") {
            for (sd_part, hf_part) in resnet {
                out = out.replace(sd_part, hf_part);
            }
        }
        return Some(out);
    }
    if let Some(rest) = ldm.strip_prefix("first_stage_model.") {
        let mut vae: Vec<(String, String)> = Vec::new();
        for coder in ["encoder", "decoder"] {
            vae.push((
                format!("{coder}.mid.attn_1."),
                format!("{coder}.mid_block.attentions.0."),
            ));
            for i in 0..2 {
                vae.push((
                    format!("{coder}.mid.block_{}.", i + 1),
                    format!("{coder}.mid_block.resnets.{i}."),
                ));
            }
        }
        for i in 0..4 {
            for j in 0..2 {
                vae.push((
                    format!("encoder.down.{i}.block.{j}."),
                    format!("encoder.down_blocks.{i}.resnets.{j}."),
                ));
            }
            for j in 0..3 {
                vae.push((
                    format!("decoder.up.{}.block.{j}.", 3 - i),
                    format!("decoder.up_blocks.{i}.resnets.{j}."),
                ));
            }
            if i < 3 {
                vae.push((
                    format!("encoder.down.{i}.downsample."),
                    format!("encoder.down_blocks.{i}.downsamplers.0."),
                ));
                vae.push((
                    format!("decoder.up.{}.upsample.", 3 - i),
                    format!("decoder.up_blocks.{i}.upsamplers.0."),
                ));
            }
        }
        let found = vae.iter().find(|(sd, _)| rest.starts_with(sd.as_str()));
        let mut out = match found {
            Some((sd, hf)) => format!("{hf}{}", &rest[sd.len()..]),
            None => rest.to_string(),
        };
        out = out
            .replace("nin_shortcut", "conv_shortcut")
            .replace("norm_out", "conv_norm_out");
        if let Some((head, leaf)) = out.split_once(".attentions.0.") {
            let (layer, param) = leaf.rsplit_once('.')?;
            let hf = [
                ("norm", "group_norm"),
                ("q", "to_q"),
                ("k", "to_k"),
                ("v", "to_v"),
                ("proj_out", "to_out.0"),
            ]
            .iter()
            .find(|(sd, _)| *sd == layer)?
            .1;
            out = format!("{head}.attentions.0.{hf}.{param}");
        }
        return Some(out);
    }
    ldm.strip_prefix("cond_stage_model.transformer.")
        .map(str::to_string)
}

#[test]
fn sd15_diffusers_names_map_back_onto_the_real_layout() {
    let layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("layouts/sd15.json")).unwrap())
            .unwrap();
    let ldm_names: BTreeSet<String> = layout["tensors"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|n| !ldm_only(n) || n.ends_with("position_ids"))
        .cloned()
        .collect();
    let pairs: Vec<(String, String)> = ldm_names
        .iter()
        .map(|n| {
            (
                n.clone(),
                sd15_reference_to_diffusers(n).unwrap_or_else(|| panic!("no reference for {n}")),
            )
        })
        .collect();
    let unet_names: Vec<&str> = pairs
        .iter()
        .filter(|(ldm, _)| ldm.starts_with(key_map::UNET_PREFIX))
        .map(|(_, hf)| hf.as_str())
        .collect();
    let unet = UnetLayout::from_names(unet_names.iter().copied());
    assert_eq!(
        unet,
        UnetLayout {
            layers_per_block: 2,
            levels: 4,
            up_has_attention: vec![false, true, true, true]
        }
    );
    let vae_levels = key_map::vae_levels(
        pairs
            .iter()
            .filter(|(l, _)| l.starts_with(key_map::VAE_PREFIX))
            .map(|(_, hf)| hf.as_str()),
    );
    assert_eq!(vae_levels, 4);
    let mut mapped = BTreeSet::new();
    for (ldm, hf) in &pairs {
        let back = if ldm.starts_with(key_map::UNET_PREFIX) {
            key_map::unet_key(hf, &unet)
        } else if ldm.starts_with(key_map::VAE_PREFIX) {
            key_map::vae_key(hf, vae_levels)
        } else {
            key_map::text_encoder_key(hf)
        };
        assert_eq!(back.as_deref(), Some(ldm.as_str()), "diffusers `{hf}`");
        mapped.insert(back.unwrap());
    }
    assert_eq!(mapped, ldm_names);
    assert_eq!(mapped.len(), 1143 - 12);
}

#[test]
fn sd15_layout_is_detected_as_sd1_with_its_dims() {
    // Every SD1.5 name with its real shape, except that big tensors get a leading 0 (no data, same widths).
    let layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("layouts/sd15.json")).unwrap())
            .unwrap();
    let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = layout["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, t)| {
            let mut shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).unwrap();
            if shape.iter().product::<usize>() > 1 << 16 {
                shape[0] = 0;
            }
            let len = shape.iter().product();
            (name.clone(), Dtype::U8, shape, vec![0u8; len])
        })
        .collect();
    let path = temp_dir("sd15_layout").join("sd15-shapes.safetensors");
    write_tensors(&path, &tensors);
    let store = TensorStore::open(&path).unwrap();
    assert_eq!(detect_family(&store).unwrap(), Family::Sd1);
    let dims = sd1_dims(&store).unwrap();
    let expected = Sd1Dims {
        in_channels: 4,
        model_channels: 320,
        context_dim: 768,
        text_width: 768,
        latent_channels: 4,
    };
    assert_eq!(dims, expected);
}
