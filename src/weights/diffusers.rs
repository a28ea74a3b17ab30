//! A diffusers pipeline folder → one `TensorStore` under LDM/SGM names.
//!
//! Reads `unet/`, `vae/`, `text_encoder/` and, for SDXL, `text_encoder_2/` (the plain `.safetensors`
//! weights, else the `fp16`/`bf16` variant), derives the block layout from the tensor names and checks it
//! against each `config.json`. The text encoders keep transformers' names under the prefix the family's
//! single file uses for that encoder (`key_map::*TEXT*_PREFIX`), so family detection reads one layout.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::family::unsupported;
use super::key_map::{self, UnetLayout};
use super::{rename_all, safetensors_file, TensorStore};
use crate::error::{Error, Result};

/// Weight file stems per component, and the variants we accept after the plain file.
const UNET: (&str, &str) = ("unet", "diffusion_pytorch_model");
const VAE: (&str, &str) = ("vae", "diffusion_pytorch_model");
const TEXT_ENCODER: (&str, &str) = ("text_encoder", "model");
const TEXT_ENCODER_2: (&str, &str) = ("text_encoder_2", "model");
const VARIANTS: [&str; 3] = ["", ".fp16", ".bf16"];
/// Config files are a few KB; refuse to read anything much larger.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

pub(super) fn open(dir: &Path) -> Result<TensorStore> {
    let class = check_pipeline_class(dir)?;
    let found = [UNET, VAE, TEXT_ENCODER].map(|(sub, stem)| weights_file(&dir.join(sub), stem));
    if found.iter().all(|f| f.is_err()) {
        return Err(Error::bad_file(
            dir,
            "is a folder but not a diffusers pipeline (no unet/, vae/ and text_encoder/ with .safetensors weights)",
        ));
    }
    let [unet, vae, text] = found;
    let (unet, vae) = (unet?, vae?);
    let second = dir.join(TEXT_ENCODER_2.0);
    // The SDXL refiner has only the bigG encoder (text_encoder: null in its model_index.json).
    if text.is_err() && second.is_dir() {
        return Err(unsupported(
            "the SDXL refiner (text_encoder_2/ without text_encoder/)",
        ));
    }
    let text = text?;
    let mut store = TensorStore::empty();
    let xl = add_unet(&mut store, &unet)? || second.is_dir() || class.contains("StableDiffusionXL");
    add_vae(&mut store, &vae)?;
    if xl {
        add_text_encoder(&mut store, &text, key_map::SDXL_TEXT1_PREFIX, false)?;
        let second = weights_file(&second, TEXT_ENCODER_2.1)?;
        add_text_encoder(&mut store, &second, key_map::SDXL_TEXT2_PREFIX, true)?;
    } else if is_open_clip(&text, &store)? {
        add_text_encoder(&mut store, &text, key_map::SD2_TEXT_PREFIX, false)?;
    } else {
        add_text_encoder(&mut store, &text, key_map::TEXT_PREFIX, false)?;
    }
    Ok(store)
}

/// Whether a single text encoder is SD2.x's OpenCLIP-H (as `CLIPTextModel`): its config says exact GELU
/// (SD1's CLIP ViT-L uses quick_gelu); without a config, the UNet's linear `proj_in` (SD2.x) says so.
fn is_open_clip(text: &Path, store: &TensorStore) -> Result<bool> {
    let config = config_path(text);
    if let Some(act) = read_json(&config)?
        .as_ref()
        .and_then(|c| c.get("hidden_act"))
        .and_then(Value::as_str)
    {
        return Ok(act == "gelu");
    }
    Ok(store
        .tensors()
        .iter()
        .any(|t| t.name.ends_with(".proj_in.weight") && t.shape.len() == 2))
}

/// The weights file of one component: `stem.safetensors`, else a `stem.fp16.safetensors`-style variant.
pub(super) fn weights_file(sub: &Path, stem: &str) -> Result<PathBuf> {
    for variant in VARIANTS {
        let path = sub.join(format!("{stem}{variant}.safetensors"));
        if path.is_file() {
            return Ok(path);
        }
    }
    let expected = sub.join(format!("{stem}.safetensors"));
    for pickle in [
        format!("{stem}.bin"),
        format!("{stem}.fp16.bin"),
        "pytorch_model.bin".to_string(),
    ] {
        if sub.join(&pickle).is_file() {
            return Err(Error::bad_file(
                sub.join(pickle),
                "PyTorch pickle weights are not read (only .safetensors); convert the folder to .safetensors",
            ));
        }
    }
    Err(Error::bad_file(
        expected,
        "missing from the diffusers folder",
    ))
}

/// Reads a small JSON file; None when it does not exist.
pub(super) fn read_json(path: &Path) -> Result<Option<Value>> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(None);
    };
    if !meta.is_file() || meta.len() > MAX_CONFIG_BYTES {
        return Err(Error::bad_file(path, "is not a small JSON config file"));
    }
    let text =
        std::fs::read(path).map_err(|e| Error::bad_file(path, format!("cannot read: {e}")))?;
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| Error::bad_file(path, format!("is not valid JSON ({e})")))
}

/// `model_index.json` names the pipeline class: refuse the families we know we cannot run, early.
/// Returns the class name ("" without a `model_index.json`).
fn check_pipeline_class(dir: &Path) -> Result<String> {
    let Some(index) = read_json(&dir.join("model_index.json"))? else {
        return Ok(String::new());
    };
    let class = index
        .get("_class_name")
        .and_then(Value::as_str)
        .unwrap_or("");
    const FAMILIES: [(&str, &str); 7] = [
        ("StableDiffusion3", "SD3 / SD3.5"),
        ("Flux", "Flux"),
        ("StableCascade", "Stable Cascade"),
        ("Wuerstchen", "Würstchen"),
        ("Kandinsky", "Kandinsky"),
        ("PixArt", "PixArt"),
        ("StableVideoDiffusion", "Stable Video Diffusion"),
    ];
    match FAMILIES.iter().find(|(marker, _)| class.contains(marker)) {
        Some((_, family)) => Err(unsupported(family)),
        None => Ok(class.to_string()),
    }
}

/// Adds the UNet; true when it has SDXL's added conditioning (`add_embedding`).
fn add_unet(store: &mut TensorStore, path: &Path) -> Result<bool> {
    let (map, raws) = safetensors_file::map(path)?;
    let xl = raws.iter().any(|r| r.name.starts_with("add_embedding."));
    let layout = UnetLayout::from_names(raws.iter().map(|r| r.name.as_str()));
    if layout.levels == 0 || layout.layers_per_block == 0 {
        return Err(Error::bad_file(
            path,
            "has no `down_blocks.*.resnets.*` tensors: not a diffusers UNet",
        ));
    }
    if let Some(config) = read_json(&config_path(path))? {
        check_unet_config(&config_path(path), &config, &layout)?;
    }
    let entries = rename_all(path, raws, |name| match key_map::unet_key(name, &layout) {
        Some(ldm) => Ok(Some(ldm)),
        None => Err(format!(
            "tensor `{name}` is not part of an SD1.x, SD2.x or SDXL UNet (another architecture?)"
        )),
    })?;
    store.add_source(path, map, entries)?;
    Ok(xl)
}

fn add_vae(store: &mut TensorStore, path: &Path) -> Result<()> {
    let (map, raws) = safetensors_file::map(path)?;
    let levels = key_map::vae_levels(raws.iter().map(|r| r.name.as_str()));
    if let Some(config) = read_json(&config_path(path))? {
        check_levels(&config_path(path), &config, levels)?;
    }
    let entries = rename_all(path, raws, |name| match key_map::vae_key(name, levels) {
        Some(ldm) => Ok(Some(ldm)),
        None => Err(format!(
            "tensor `{name}` is not part of an SD VAE (AutoencoderKL)"
        )),
    })?;
    store.add_source(path, map, entries)
}

/// Adds a transformers CLIP text model under `prefix`. `projection`: keep `text_projection.weight`
/// (SDXL's bigG pools through it); otherwise it is a head the family does not use (SD1.x/SD2.x condition
/// on hidden states) and is left out.
fn add_text_encoder(
    store: &mut TensorStore,
    path: &Path,
    prefix: &str,
    projection: bool,
) -> Result<()> {
    let (map, raws) = safetensors_file::map(path)?;
    let entries = rename_all(path, raws, |name| {
        match key_map::hf_text_key(name, prefix) {
            Some(ldm) => Ok(Some(ldm)),
            None if name == "text_projection.weight" => {
                Ok(projection.then(|| format!("{prefix}{name}")))
            }
            None => Err(format!("tensor `{name}` is not part of a CLIP text model")),
        }
    })?;
    if projection
        && !entries
            .iter()
            .any(|(n, _)| n.ends_with(".text_projection.weight"))
    {
        return Err(Error::bad_file(
            path,
            "has no `text_projection.weight`: SDXL's second text encoder is a CLIPTextModelWithProjection",
        ));
    }
    store.add_source(path, map, entries)
}

/// `config.json` next to a component's weights file.
pub(super) fn config_path(weights: &Path) -> PathBuf {
    weights.with_file_name("config.json")
}

/// The weight names must agree with the config on `layers_per_block` and the number of levels.
fn check_unet_config(path: &Path, config: &Value, layout: &UnetLayout) -> Result<()> {
    let layers = match config.get("layers_per_block") {
        Some(Value::Array(per_level)) => {
            let first = per_level.first().and_then(Value::as_u64);
            if per_level.iter().any(|v| v.as_u64() != first) {
                return Err(Error::UnsupportedModel(format!(
                    "{}: a different layers_per_block per level is not SD1.x, SD2.x or SDXL",
                    path.display()
                )));
            }
            first
        }
        Some(v) => v.as_u64(),
        None => None,
    };
    if let Some(layers) = layers {
        if layers != layout.layers_per_block as u64 {
            return Err(Error::bad_file(
                path,
                format!(
                    "says layers_per_block {layers} but the UNet weights have {} resnets per down block",
                    layout.layers_per_block
                ),
            ));
        }
    }
    check_levels(path, config, layout.levels)
}

/// `block_out_channels` has one entry per resolution level.
fn check_levels(path: &Path, config: &Value, levels: usize) -> Result<()> {
    if let Some(channels) = config.get("block_out_channels").and_then(Value::as_array) {
        if channels.len() != levels {
            return Err(Error::bad_file(
                path,
                format!(
                    "lists {} block_out_channels but the weights have {levels} levels",
                    channels.len()
                ),
            ));
        }
    }
    Ok(())
}
