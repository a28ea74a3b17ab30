//! Diffusers folders of SD2.x and SDXL (and SD1.x) against their single files: every tensor of a folder
//! maps to a name, UNet and VAE tensors equal the single file's tensor of that name bit for bit, text
//! encoder tensors equal the single file's after the naming (q_proj = rows 0..C of in_proj_weight,
//! text_projection.weight = text_projection transposed), and nothing is dropped silently.
//!
//! Folders are built from the single file at test time (`common/diffusers_folder.rs`); the real
//! diffusers folders in the fixtures, where present, check that builder and the map against diffusers'
//! own conversion.

mod common;
#[path = "common/diffusers_folder.rs"]
mod diffusers_folder;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use diffusers_folder::{Family, Folder, Tensors};
use sdcap::weights::key_map::{self, UnetLayout};
use sdcap::weights::TensorStore;

const FAMILIES: [(&str, &str, Family); 3] = [
    ("tiny-sd", "tiny-sd-fp32.safetensors", Family::Sd1),
    ("tiny-sd2", "tiny-sd2-fp32.safetensors", Family::Sd2),
    ("tiny-sdxl", "tiny-sdxl-fp32.safetensors", Family::Sdxl),
];

fn single_file(dir: &str, file: &str) -> PathBuf {
    common::fixtures().join(dir).join(file)
}

/// A fresh, empty folder for one test.
fn temp_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("diffusers_families")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Single-file tensors a diffusers folder does not hold, and why (by name: no silent drop).
fn expected_unused(family: Family, name: &str) -> bool {
    let ddpm_buffer = !name.contains('.');
    match family {
        Family::Sd1 => ddpm_buffer || name.ends_with("position_ids"),
        // The last open_clip resblock (the conditioning is the penultimate layer), the unused
        // projection head and logit scale.
        Family::Sd2 => {
            ddpm_buffer
                || name.starts_with("cond_stage_model.model.transformer.resblocks.4.")
                || name == "cond_stage_model.model.text_projection"
                || name == "cond_stage_model.model.logit_scale"
        }
        Family::Sdxl => {
            name.ends_with("position_ids") || name == "conditioner.embedders.1.model.logit_scale"
        }
    }
}

/// The store name a diffusers entry must get: the UNet/VAE single-file name, a text encoder's
/// transformers name under the family's prefix.
fn store_name(family: Family, entry: &diffusers_folder::Entry) -> String {
    match (entry.component, family) {
        ("unet" | "vae", _) => entry.source.clone(),
        ("text_encoder", Family::Sd1) => format!("{}{}", key_map::TEXT_PREFIX, entry.name),
        ("text_encoder", Family::Sd2) => format!("{}{}", key_map::SD2_TEXT_PREFIX, entry.name),
        ("text_encoder", Family::Sdxl) => format!("{}{}", key_map::SDXL_TEXT1_PREFIX, entry.name),
        ("text_encoder_2", Family::Sdxl) => {
            format!("{}{}", key_map::SDXL_TEXT2_PREFIX, entry.name)
        }
        other => panic!("unexpected component {other:?}"),
    }
}

/// Opens `folder` and checks it against the single file: every store tensor is one planned entry
/// (name, shape, bytes), every planned entry is in the store, the rest of the file is expected unused.
fn check_store_against_single(folder_dir: &Path, tensors: &Tensors, plan: &Folder) {
    let store = TensorStore::open(folder_dir).unwrap_or_else(|e| panic!("{e}"));
    let by_store_name: BTreeMap<String, &diffusers_folder::Entry> = plan
        .entries
        .iter()
        .map(|e| (store_name(plan.family, e), e))
        .collect();
    assert_eq!(
        by_store_name.len(),
        plan.entries.len(),
        "store names collide"
    );
    for t in store.tensors() {
        let entry = by_store_name.get(&t.name).unwrap_or_else(|| {
            panic!(
                "{}: store tensor `{}` comes from no single-file tensor",
                folder_dir.display(),
                t.name
            )
        });
        let (_, shape, bytes) = diffusers_folder::materialize(tensors, entry);
        assert_eq!(t.shape, shape, "{}", t.name);
        assert!(
            store.bytes(t) == bytes.as_slice(),
            "bytes differ: {}",
            t.name
        );
        if matches!(entry.component, "unet" | "vae") {
            // Renamed only: the single file's tensor of the same name, bit for bit.
            assert_eq!(t.name, entry.source);
            assert!(
                store.bytes(t) == tensors[&t.name].2.as_slice(),
                "{}",
                t.name
            );
        }
    }
    let missing: Vec<&String> = by_store_name
        .keys()
        .filter(|n| !store.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "planned but not in the store: {missing:?}"
    );
    assert_eq!(store.tensors().len(), plan.entries.len());
    let unexpected: Vec<&String> = plan
        .unused
        .iter()
        .filter(|n| !expected_unused(plan.family, n))
        .collect();
    assert!(
        unexpected.is_empty(),
        "single-file tensors dropped: {unexpected:?}"
    );
}

#[test]
fn real_diffusers_folders_equal_their_single_files() {
    for (dir, file, family) in FAMILIES {
        let real = common::fixtures().join(dir).join("diffusers");
        if !real.is_dir() {
            eprintln!(
                "{dir}: no diffusers folder in the fixtures; the built-folder test covers it"
            );
            continue;
        }
        let tensors = diffusers_folder::read_tensors(&single_file(dir, file));
        let plan = diffusers_folder::plan(&tensors);
        assert_eq!(plan.family, family);
        // The raw component files hold exactly the planned tensors, with the planned bytes: the plan
        // (inverse key map + text-encoder accounting) is diffusers' own conversion.
        let mut seen = 0;
        for component in ["unet", "vae", "text_encoder", "text_encoder_2"] {
            let stem = match component {
                "unet" | "vae" => "diffusion_pytorch_model",
                _ => "model",
            };
            let path = real.join(component).join(format!("{stem}.safetensors"));
            if !path.is_file() {
                assert!(
                    plan.entries.iter().all(|e| e.component != component),
                    "{dir}: {component} missing"
                );
                continue;
            }
            let raw = diffusers_folder::read_tensors(&path);
            let planned: BTreeMap<&str, &diffusers_folder::Entry> = plan
                .entries
                .iter()
                .filter(|e| e.component == component)
                .map(|e| (e.name.as_str(), e))
                .collect();
            let names: BTreeSet<&str> = raw.keys().map(String::as_str).collect();
            let want: BTreeSet<&str> = planned.keys().copied().collect();
            assert_eq!(names, want, "{dir}/{component}: tensor names");
            for (name, (dtype, shape, bytes)) in &raw {
                let got = diffusers_folder::materialize(&tensors, planned[name.as_str()]);
                assert_eq!((&got.0, &got.1), (dtype, shape), "{dir}/{component}/{name}");
                assert!(&got.2 == bytes, "{dir}/{component}/{name}: bytes");
                seen += 1;
            }
        }
        assert_eq!(seen, plan.entries.len(), "{dir}");
        check_store_against_single(&real, &tensors, &plan);
    }
}

#[test]
fn folders_built_from_single_files_map_back_onto_them() {
    for (dir, file, family) in FAMILIES {
        let built = temp_dir(&format!("built_{dir}"));
        let plan = diffusers_folder::build(&single_file(dir, file), &built);
        assert_eq!(plan.family, family);
        let tensors = diffusers_folder::read_tensors(&single_file(dir, file));
        check_store_against_single(&built, &tensors, &plan);
        // Where the fixtures have the real folder, the built one opens to the same store.
        let real = common::fixtures().join(dir).join("diffusers");
        if real.is_dir() {
            let (a, b) = (
                TensorStore::open(&built).unwrap(),
                TensorStore::open(&real).unwrap(),
            );
            let names = |s: &TensorStore| -> BTreeSet<String> {
                s.tensors().iter().map(|t| t.name.clone()).collect()
            };
            assert_eq!(names(&a), names(&b), "{dir}");
            for t in a.tensors() {
                let r = b.get(&t.name).unwrap();
                assert_eq!(t.shape, r.shape, "{}", t.name);
                assert!(a.bytes(t) == b.bytes(r), "{dir}: {}", t.name);
            }
        }
    }
}

#[test]
fn text_encoders_are_named_for_their_family() {
    let dir = temp_dir("text_names");
    diffusers_folder::build(
        &single_file("tiny-sd2", "tiny-sd2-fp32.safetensors"),
        &dir.join("sd2"),
    );
    diffusers_folder::build(
        &single_file("tiny-sdxl", "tiny-sdxl-fp32.safetensors"),
        &dir.join("xl"),
    );
    let sd2 = TensorStore::open(&dir.join("sd2")).unwrap();
    // SD2.x: transformers names under the OpenCLIP prefix, 4 = R - 1 layers, no projection head.
    let q = sd2
        .get("cond_stage_model.model.text_model.encoder.layers.3.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q.shape, [32, 32]);
    assert!(!sd2.tensors().iter().any(|t| t.name.contains("layers.4.")));
    assert!(!sd2.tensors().iter().any(|t| t.name.contains("projection")));
    assert!(sd2.contains("cond_stage_model.model.text_model.final_layer_norm.weight"));
    // The bytes of q/k/v are the rows of the single file's fused in_proj_weight.
    let single = TensorStore::open(&single_file("tiny-sd2", "tiny-sd2-fp32.safetensors")).unwrap();
    let fused = single
        .get("cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight")
        .unwrap();
    let row = 32 * 4;
    for (i, p) in ["q", "k", "v"].iter().enumerate() {
        let t = sd2
            .get(&format!(
                "cond_stage_model.model.text_model.encoder.layers.3.self_attn.{p}_proj.weight"
            ))
            .unwrap();
        assert!(
            sd2.bytes(t) == &single.bytes(fused)[i * 32 * row..(i + 1) * 32 * row],
            "{p}"
        );
    }

    let xl = TensorStore::open(&dir.join("xl")).unwrap();
    assert!(xl.contains(
        "conditioner.embedders.0.transformer.text_model.encoder.layers.3.mlp.fc2.weight"
    ));
    assert!(xl.contains(
        "conditioner.embedders.1.model.text_model.encoder.layers.4.self_attn.v_proj.bias"
    ));
    let proj = xl
        .get("conditioner.embedders.1.model.text_projection.weight")
        .unwrap();
    assert_eq!(proj.shape, [20, 24]);
    assert!(xl.contains("model.diffusion_model.label_emb.0.0.weight"));
    assert!(xl.contains("model.diffusion_model.label_emb.0.2.bias"));
    assert!(!xl.contains("model.diffusion_model.input_blocks.1.1.norm.weight"));
    assert!(xl.contains("model.diffusion_model.output_blocks.2.2.conv.weight"));
}

/// Every UNet and VAE name of the full-size SD2.1 and SDXL layouts goes to a diffusers name and back.
#[test]
fn full_size_layouts_round_trip_through_the_key_map() {
    for (layout, levels, layers, up_attention) in [
        ("sd21.json", 4, 2, vec![false, true, true, true]),
        ("sdxl.json", 3, 2, vec![true, true, false]),
    ] {
        let json: serde_json::Value = serde_json::from_slice(
            &std::fs::read(common::fixtures().join("layouts").join(layout)).unwrap(),
        )
        .unwrap();
        let names: Vec<&str> = json["tensors"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let unet: Vec<&str> = names
            .iter()
            .filter_map(|n| n.strip_prefix(key_map::UNET_PREFIX))
            .collect();
        let vae: Vec<&str> = names
            .iter()
            .filter_map(|n| n.strip_prefix(key_map::VAE_PREFIX))
            .collect();
        let unet_layers = key_map::ldm_unet_layers(unet.iter().copied());
        assert_eq!(unet_layers, layers, "{layout}");
        let hf_unet: Vec<String> = unet
            .iter()
            .map(|n| {
                key_map::unet_diffusers_key(n, layers)
                    .unwrap_or_else(|| panic!("{layout}: UNet `{n}` has no diffusers name"))
            })
            .collect();
        let hf_layout = UnetLayout::from_names(hf_unet.iter().map(String::as_str));
        assert_eq!(
            hf_layout,
            UnetLayout {
                layers_per_block: layers,
                levels,
                up_has_attention: up_attention
            },
            "{layout}"
        );
        for (ldm, hf) in unet.iter().zip(&hf_unet) {
            assert_eq!(
                key_map::unet_key(hf, &hf_layout).as_deref(),
                Some(format!("{}{ldm}", key_map::UNET_PREFIX).as_str()),
                "{layout}: {hf}"
            );
        }
        let distinct: BTreeSet<&String> = hf_unet.iter().collect();
        assert_eq!(
            distinct.len(),
            unet.len(),
            "{layout}: two UNet names share a diffusers name"
        );
        let vae_levels = key_map::ldm_vae_levels(vae.iter().copied());
        assert_eq!(vae_levels, 4);
        for ldm in &vae {
            let hf = key_map::vae_diffusers_key(ldm, vae_levels)
                .unwrap_or_else(|| panic!("{layout}: VAE `{ldm}` has no diffusers name"));
            assert_eq!(
                key_map::vae_key(&hf, vae_levels).as_deref(),
                Some(format!("{}{ldm}", key_map::VAE_PREFIX).as_str()),
                "{layout}: {hf}"
            );
        }
    }
}

/// Copies a built folder's files as links into a new folder, leaving out `skip` (relative paths).
fn linked_copy(src: &Path, test: &str, skip: &[&str]) -> PathBuf {
    let dir = temp_dir(test);
    for sub in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        let Ok(files) = std::fs::read_dir(src.join(sub)) else {
            continue;
        };
        for file in files {
            let file = file.unwrap().path();
            let rel = format!("{sub}/{}", file.file_name().unwrap().to_str().unwrap());
            if skip.contains(&rel.as_str()) || skip.contains(&sub) {
                continue;
            }
            std::fs::create_dir_all(dir.join(sub)).unwrap();
            std::os::unix::fs::symlink(&file, dir.join(&rel)).unwrap();
        }
    }
    if !skip.contains(&"model_index.json") {
        std::fs::copy(src.join("model_index.json"), dir.join("model_index.json")).unwrap();
    }
    dir
}

fn open_error(dir: &Path) -> sdcap::Error {
    match TensorStore::open(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn sdxl_folder_problems_are_named() {
    let xl = temp_dir("xl_src");
    diffusers_folder::build(&single_file("tiny-sdxl", "tiny-sdxl-fp32.safetensors"), &xl);

    // The second encoder missing: the file it expected, one line, bad input.
    let no_te2 = linked_copy(&xl, "xl_no_te2", &["text_encoder_2"]);
    let err = open_error(&no_te2);
    let msg = err.to_string();
    assert!(
        msg.contains("text_encoder_2/model.safetensors") && msg.contains("missing"),
        "{msg}"
    );
    assert!(!msg.contains('\n') && err.exit_code() == 2, "{msg}");
    // Even without model_index.json, the UNet's add_embedding says SDXL.
    let no_index = linked_copy(&xl, "xl_no_index", &["text_encoder_2", "model_index.json"]);
    assert!(open_error(&no_index).to_string().contains("text_encoder_2"));

    // The refiner: bigG only.
    let refiner = linked_copy(&xl, "xl_refiner", &["text_encoder"]);
    let err = open_error(&refiner);
    assert!(matches!(err, sdcap::Error::UnsupportedModel(_)), "{err}");
    assert!(err.to_string().contains("SDXL refiner"), "{err}");

    // A bigG without its projection cannot pool.
    let tensors = diffusers_folder::read_tensors(&xl.join("text_encoder_2/model.safetensors"));
    let no_proj = linked_copy(&xl, "xl_no_proj", &["text_encoder_2/model.safetensors"]);
    let views = tensors
        .iter()
        .filter(|(n, _)| n.as_str() != "text_projection.weight")
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        });
    std::fs::write(
        no_proj.join("text_encoder_2/model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let msg = open_error(&no_proj).to_string();
    assert!(
        msg.contains("text_projection.weight") && msg.contains("text_encoder_2"),
        "{msg}"
    );
}

/// Without a text-encoder config, SD2.x is told from SD1.x by the UNet's linear proj_in.
#[test]
fn sd2_folder_without_text_config_is_still_open_clip() {
    let src = temp_dir("sd2_src");
    diffusers_folder::build(&single_file("tiny-sd2", "tiny-sd2-fp32.safetensors"), &src);
    let bare = linked_copy(&src, "sd2_bare", &["text_encoder/config.json"]);
    let store = TensorStore::open(&bare).unwrap();
    assert!(store.contains("cond_stage_model.model.text_model.final_layer_norm.weight"));
    assert!(!store
        .tensors()
        .iter()
        .any(|t| t.name.starts_with(key_map::TEXT_PREFIX)));
}
