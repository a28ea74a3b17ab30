//! A separate VAE (`--vae`): its tensors replace the model's `first_stage_model.*`.
//!
//! Users download VAEs in three layouts: LDM keys without a prefix (`encoder.down.0.block.0.conv1.weight`,
//! e.g. vae-ft-mse-840000-ema-pruned.safetensors), a whole checkpoint whose `first_stage_model.*` part is
//! wanted, or diffusers' AutoencoderKL (`encoder.down_blocks.0.resnets.0.conv1.weight`, often as a folder).

use std::path::{Path, PathBuf};

use super::diffusers::{config_path, read_json, weights_file};
use super::key_map::{self, VAE_PREFIX};
use super::safetensors_file::{self, RawTensor};
use super::{rename_all, TensorStore};
use crate::error::{Error, Result};

/// The tensor every usable VAE has; its input width is the latent channel count.
const DECODER_CONV_IN: &str = "first_stage_model.decoder.conv_in.weight";

pub(super) fn replace_vae(mut store: TensorStore, path: &Path) -> Result<TensorStore> {
    let file = vae_weights_file(path)?;
    let (map, raws) = safetensors_file::map(&file)?;
    let entries = match Layout::of(&raws) {
        Layout::Checkpoint => rename_all(&file, raws, |name| {
            Ok(name.starts_with(VAE_PREFIX).then(|| name.to_string()))
        })?,
        Layout::Ldm => rename_all(&file, raws, |name| {
            Ok(is_vae_part(name).then(|| format!("{VAE_PREFIX}{name}")))
        })?,
        Layout::Diffusers => {
            let levels = key_map::vae_levels(raws.iter().map(|r| r.name.as_str()));
            if let Some(config) = read_json(&config_path(&file))? {
                let listed = config
                    .get("block_out_channels")
                    .and_then(|c| c.as_array())
                    .map(Vec::len);
                if listed.is_some_and(|n| n != levels) {
                    return Err(Error::bad_file(
                        config_path(&file),
                        format!("lists {listed:?} block_out_channels but the VAE weights have {levels} levels"),
                    ));
                }
            }
            rename_all(&file, raws, |name| match key_map::vae_key(name, levels) {
                Some(ldm) => Ok(Some(ldm)),
                None if is_vae_part(name) => Err(format!(
                    "tensor `{name}` is not part of an SD VAE (AutoencoderKL)"
                )),
                None => Ok(None),
            })?
        }
    };
    let Some((_, conv_in)) = entries.iter().find(|(name, _)| name == DECODER_CONV_IN) else {
        return Err(Error::bad_file(
            &file,
            "holds no VAE decoder (expected `decoder.*`, `first_stage_model.decoder.*` or diffusers VAE tensors)",
        ));
    };
    let new_latents = conv_in.shape.get(1).copied();
    let old_latents = store
        .get(DECODER_CONV_IN)
        .and_then(|t| t.shape.get(1).copied());
    if let (Some(new), Some(old)) = (new_latents, old_latents) {
        if new != old {
            return Err(Error::bad_file(
                &file,
                format!("is a VAE for {new}-channel latents but the model uses {old} (a VAE of another family?)"),
            ));
        }
    }
    store.remove_where(|name| name.starts_with(VAE_PREFIX));
    store.add_source(&file, map, entries)?;
    Ok(store)
}

/// A VAE given as a folder: a diffusers `vae/` folder, or a pipeline folder holding one.
fn vae_weights_file(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let dir = if path.join("vae").is_dir() {
        path.join("vae")
    } else {
        path.to_path_buf()
    };
    weights_file(&dir, "diffusion_pytorch_model")
}

/// The key layout of a VAE file, judged by its names.
enum Layout {
    /// A full checkpoint: take `first_stage_model.*`.
    Checkpoint,
    /// LDM names without the prefix.
    Ldm,
    /// diffusers AutoencoderKL names.
    Diffusers,
}

impl Layout {
    fn of(raws: &[RawTensor]) -> Layout {
        let any = |f: &dyn Fn(&str) -> bool| raws.iter().any(|r| f(&r.name));
        if any(&|n| n.starts_with(VAE_PREFIX)) {
            Layout::Checkpoint
        } else if any(&|n| {
            n.contains(".down_blocks.") || n.contains(".up_blocks.") || n.contains(".mid_block.")
        }) {
            Layout::Diffusers
        } else {
            Layout::Ldm
        }
    }
}

/// The VAE's own tensors; standalone files may also carry training leftovers (`loss.*`, `model_ema.*`).
fn is_vae_part(name: &str) -> bool {
    ["encoder.", "decoder.", "quant_conv.", "post_quant_conv."]
        .iter()
        .any(|p| name.starts_with(p))
}
