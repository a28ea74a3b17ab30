//! Diffusers tensor names → the original LDM (CompVis) / SGM (SDXL) names the networks look up, and back.
//!
//! The block indices are derived, not tabulated: an LDM UNet numbers its `input_blocks` as conv_in, then
//! per level `layers_per_block` × (resnet [+ transformer]) and a downsampler; `output_blocks` as
//! `layers_per_block + 1` × (resnet [+ transformer]) per level, the upsampler riding in the level's last
//! block. So the same code maps SD1.5 (4 levels, 2 layers), SD2.x (linear proj_in/out: same names),
//! SDXL (3 levels, no attention at level 0, transformer depth per level: `transformer_blocks.N` keeps its
//! index) and the tiny test models. The VAE numbers its decoder levels in reverse of diffusers'
//! `up_blocks`. Reference: diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py`, whose
//! fixed SD1.5 tables these reproduce, and `loaders/single_file_utils.py` for SD2.x/SDXL.
//!
//! Text encoders keep transformers' names (`text_model.…`) under the component prefix of the family's
//! single file; nothing is fused or copied (the networks read HF or open_clip names under a prefix).

/// LDM prefix of each SD1.x component.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const TEXT_PREFIX: &str = "cond_stage_model.transformer.";
/// SD2.x's OpenCLIP-H text tower: open_clip names in a single file, `text_model.…` from a diffusers folder.
pub const SD2_TEXT_PREFIX: &str = "cond_stage_model.model.";
/// SDXL's CLIP-L (transformers names in both layouts).
pub const SDXL_TEXT1_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// SDXL's OpenCLIP-bigG: open_clip names in a single file, `text_model.…` + `text_projection.weight` from
/// a diffusers folder.
pub const SDXL_TEXT2_PREFIX: &str = "conditioner.embedders.1.model.";

/// A single-file checkpoint's name as the networks expect it. Checkpoints saved with transformers < 4.20
/// lack the `text_model.` level in the CLIP names (`cond_stage_model.transformer.embeddings.…`). An SDXL
/// bigG in transformers names under `conditioner.embedders.1.transformer.` (where stable-diffusion.cpp
/// reads them; `sdcap quantize --compat sdcpp` of a diffusers folder writes them there) goes under
/// `SDXL_TEXT2_PREFIX`, as from the diffusers folder itself.
pub fn ldm_key(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("conditioner.embedders.1.transformer.") {
        if rest.starts_with("text_model.") || rest == "text_projection.weight" {
            return format!("{SDXL_TEXT2_PREFIX}{rest}");
        }
    }
    match name.strip_prefix(TEXT_PREFIX) {
        Some(rest) if !rest.starts_with("text_model.") => format!("{TEXT_PREFIX}text_model.{rest}"),
        _ => name.to_string(),
    }
}

/// The block structure of a diffusers UNet, which the LDM indices depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnetLayout {
    /// Resnets per down block (`layers_per_block` in diffusers' config, `num_res_blocks` in LDM's).
    pub layers_per_block: usize,
    /// Number of resolution levels (`len(block_out_channels)`).
    pub levels: usize,
    /// Whether `up_blocks.{i}` has attentions (it moves the upsampler from slot 1 to slot 2).
    pub up_has_attention: Vec<bool>,
}

impl UnetLayout {
    /// Reads the layout off the tensor names themselves.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut max_down_resnet = None;
        let mut levels = 0;
        let mut up_attention = Vec::new();
        for name in names {
            let parts: Vec<&str> = name.split('.').collect();
            let index = |k: usize| parts.get(k).and_then(|p| p.parse::<usize>().ok());
            match (
                parts.first().copied(),
                index(1),
                parts.get(2).copied(),
                index(3),
            ) {
                (Some("down_blocks"), Some(i), Some(kind), j) => {
                    levels = levels.max(i + 1);
                    if kind == "resnets" {
                        max_down_resnet = max_down_resnet.max(j);
                    }
                }
                (Some("up_blocks"), Some(i), Some(kind), _) => {
                    levels = levels.max(i + 1);
                    if up_attention.len() <= i {
                        up_attention.resize(i + 1, false);
                    }
                    up_attention[i] |= kind == "attentions";
                }
                _ => {}
            }
        }
        up_attention.resize(levels, false);
        UnetLayout {
            layers_per_block: max_down_resnet.map_or(0, |j| j + 1),
            levels,
            up_has_attention: up_attention,
        }
    }
}

/// A diffusers UNet tensor name → its LDM name (with `model.diffusion_model.`), None if not an SD1.x,
/// SD2.x or SDXL UNet name.
pub fn unet_key(name: &str, layout: &UnetLayout) -> Option<String> {
    let layers = layout.layers_per_block;
    let per_level = layers + 1;
    let (head, rest) = split_block(name)?;
    let ldm = match head {
        Block::Plain(first) => {
            let mapped = match first {
                "time_embedding.linear_1" => "time_embed.0",
                "time_embedding.linear_2" => "time_embed.2",
                "conv_in" => "input_blocks.0.0",
                "conv_norm_out" => "out.0",
                "conv_out" => "out.2",
                // SDXL's added ("text_time") conditioning: SGM's `label_emb.0` Sequential.
                "add_embedding.linear_1" => "label_emb.0.0",
                "add_embedding.linear_2" => "label_emb.0.2",
                _ => return None,
            };
            format!("{mapped}.{}", param_name(rest)?)
        }
        Block::Indexed { block, i, kind, j } => {
            let level_ok = i < layout.levels;
            match (block, kind) {
                ("down_blocks", "resnets") if level_ok && j < layers => {
                    format!(
                        "input_blocks.{}.0.{}",
                        per_level * i + j + 1,
                        unet_resnet(rest)?
                    )
                }
                ("down_blocks", "attentions") if level_ok && j < layers => {
                    format!(
                        "input_blocks.{}.1.{}",
                        per_level * i + j + 1,
                        transformer(rest)?
                    )
                }
                ("down_blocks", "downsamplers") if level_ok && j == 0 => {
                    format!(
                        "input_blocks.{}.0.op.{}",
                        per_level * (i + 1),
                        conv_param(rest)?
                    )
                }
                ("up_blocks", "resnets") if level_ok && j <= layers => {
                    format!(
                        "output_blocks.{}.0.{}",
                        per_level * i + j,
                        unet_resnet(rest)?
                    )
                }
                ("up_blocks", "attentions") if level_ok && j <= layers => {
                    format!(
                        "output_blocks.{}.1.{}",
                        per_level * i + j,
                        transformer(rest)?
                    )
                }
                ("up_blocks", "upsamplers") if level_ok && j == 0 => {
                    let slot =
                        1 + usize::from(layout.up_has_attention.get(i).copied().unwrap_or(false));
                    format!(
                        "output_blocks.{}.{slot}.conv.{}",
                        per_level * i + layers,
                        conv_param(rest)?
                    )
                }
                ("mid_block", "resnets") if j < 2 => {
                    format!("middle_block.{}.{}", 2 * j, unet_resnet(rest)?)
                }
                ("mid_block", "attentions") if j == 0 => {
                    format!("middle_block.1.{}", transformer(rest)?)
                }
                _ => return None,
            }
        }
    };
    Some(format!("{UNET_PREFIX}{ldm}"))
}

/// A diffusers VAE tensor name → its LDM name (with `first_stage_model.`), None if not an SD VAE name.
/// `levels` is the number of decoder `up_blocks` (`len(block_out_channels)`), needed to reverse them.
pub fn vae_key(name: &str, levels: usize) -> Option<String> {
    if let Some(rest) = name
        .strip_prefix("quant_conv.")
        .or_else(|| name.strip_prefix("post_quant_conv."))
    {
        param_name(rest)?;
        return Some(format!("{VAE_PREFIX}{name}"));
    }
    let (coder, inner) = name.split_once('.')?;
    if coder != "encoder" && coder != "decoder" {
        return None;
    }
    let (head, rest) = split_block(inner)?;
    let ldm = match head {
        Block::Plain(first) => {
            let mapped = match first {
                "conv_in" | "conv_out" => first,
                "conv_norm_out" => "norm_out",
                _ => return None,
            };
            format!("{mapped}.{}", param_name(rest)?)
        }
        Block::Indexed { block, i, kind, j } => match (coder, block, kind) {
            ("encoder", "down_blocks", "resnets") if i < levels => {
                format!("down.{i}.block.{j}.{}", vae_resnet(rest)?)
            }
            ("encoder", "down_blocks", "downsamplers") if i < levels && j == 0 => {
                format!("down.{i}.downsample.conv.{}", conv_param(rest)?)
            }
            ("decoder", "up_blocks", "resnets") if i < levels => {
                format!("up.{}.block.{j}.{}", levels - 1 - i, vae_resnet(rest)?)
            }
            ("decoder", "up_blocks", "upsamplers") if i < levels && j == 0 => {
                format!("up.{}.upsample.conv.{}", levels - 1 - i, conv_param(rest)?)
            }
            (_, "mid_block", "resnets") if j < 2 => {
                format!("mid.block_{}.{}", j + 1, vae_resnet(rest)?)
            }
            (_, "mid_block", "attentions") if j == 0 => {
                format!("mid.attn_1.{}", vae_attention(rest)?)
            }
            _ => return None,
        },
    };
    Some(format!("{VAE_PREFIX}{coder}.{ldm}"))
}

/// A transformers `CLIPTextModel` tensor name → its LDM name, None for names SD1.x does not use.
pub fn text_encoder_key(name: &str) -> Option<String> {
    hf_text_key(name, TEXT_PREFIX)
}

/// A transformers CLIP text tensor name (`text_model.…`) → the same name under `prefix` (one of the
/// `*_TEXT*_PREFIX`es), None for any other name. `text_projection.weight` is the caller's decision.
pub fn hf_text_key(name: &str, prefix: &str) -> Option<String> {
    name.starts_with("text_model.")
        .then(|| format!("{prefix}{name}"))
}

/// The diffusers name of an LDM/SGM UNet tensor (without `model.diffusion_model.`), the inverse of
/// `unet_key`. `layers_per_block` from `ldm_unet_layers`. None for names outside the UNet's blocks.
pub fn unet_diffusers_key(ldm: &str, layers_per_block: usize) -> Option<String> {
    let per_level = layers_per_block + 1;
    let parts: Vec<&str> = ldm.splitn(4, '.').collect();
    let num = |k: usize| parts.get(k).and_then(|p| p.parse::<usize>().ok());
    let plain = |hf: &str, rest: &str| Some(format!("{hf}.{}", param_name(rest)?));
    match parts.first().copied()? {
        "time_embed" => match num(1)? {
            0 => plain("time_embedding.linear_1", parts.get(2)?),
            2 => plain("time_embedding.linear_2", parts.get(2)?),
            _ => None,
        },
        "label_emb" if num(1)? == 0 => match num(2)? {
            0 => plain("add_embedding.linear_1", parts.get(3)?),
            2 => plain("add_embedding.linear_2", parts.get(3)?),
            _ => None,
        },
        "out" => match num(1)? {
            0 => plain("conv_norm_out", parts.get(2)?),
            2 => plain("conv_out", parts.get(2)?),
            _ => None,
        },
        "input_blocks" => {
            let (k, slot, rest) = (num(1)?, num(2)?, parts.get(3)?);
            if k == 0 {
                return (slot == 0).then(|| plain("conv_in", rest))?;
            }
            let (i, j) = ((k - 1) / per_level, (k - 1) % per_level);
            match slot {
                0 if j == layers_per_block => {
                    let param = param_name(rest.strip_prefix("op.")?)?;
                    Some(format!("down_blocks.{i}.downsamplers.0.conv.{param}"))
                }
                0 => Some(format!(
                    "down_blocks.{i}.resnets.{j}.{}",
                    unet_resnet_diffusers(rest)?
                )),
                1 => Some(format!(
                    "down_blocks.{i}.attentions.{j}.{}",
                    transformer(rest)?
                )),
                _ => None,
            }
        }
        "output_blocks" => {
            let (m, slot, rest) = (num(1)?, num(2)?, parts.get(3)?);
            let (i, j) = (m / per_level, m % per_level);
            match (slot, rest.strip_prefix("conv.")) {
                (0, _) => Some(format!(
                    "up_blocks.{i}.resnets.{j}.{}",
                    unet_resnet_diffusers(rest)?
                )),
                (1 | 2, Some(param)) if j == layers_per_block => Some(format!(
                    "up_blocks.{i}.upsamplers.0.conv.{}",
                    param_name(param)?
                )),
                (1, None) => Some(format!(
                    "up_blocks.{i}.attentions.{j}.{}",
                    transformer(rest)?
                )),
                _ => None,
            }
        }
        "middle_block" => {
            let rest = parts.get(2..)?.join(".");
            match num(1)? {
                1 => Some(format!("mid_block.attentions.0.{}", transformer(&rest)?)),
                b @ (0 | 2) => Some(format!(
                    "mid_block.resnets.{}.{}",
                    b / 2,
                    unet_resnet_diffusers(&rest)?
                )),
                _ => None,
            }
        }
        _ => None,
    }
}

/// `layers_per_block` of an LDM/SGM UNet, from its names (without the prefix): the first downsampler
/// sits in `input_blocks.{layers + 1}`; a one-level UNet has none, then every input block is a layer.
pub fn ldm_unet_layers<'a>(names: impl IntoIterator<Item = &'a str>) -> usize {
    let mut first_op = None;
    let mut last_input = 0;
    for name in names {
        let mut parts = name.split('.');
        if parts.next() != Some("input_blocks") {
            continue;
        }
        let Some(k) = parts.next().and_then(|p| p.parse::<usize>().ok()) else {
            continue;
        };
        last_input = last_input.max(k);
        if parts.next() == Some("0") && parts.next() == Some("op") {
            first_op = Some(first_op.map_or(k, |f: usize| f.min(k)));
        }
    }
    first_op.map_or(last_input, |k| k - 1)
}

/// The diffusers name of an LDM VAE tensor (without `first_stage_model.`), the inverse of `vae_key`.
/// `levels` from `ldm_vae_levels`.
pub fn vae_diffusers_key(ldm: &str, levels: usize) -> Option<String> {
    if ldm.starts_with("quant_conv.") || ldm.starts_with("post_quant_conv.") {
        param_name(ldm.split_once('.')?.1)?;
        return Some(ldm.to_string());
    }
    let (coder, inner) = ldm.split_once('.')?;
    if coder != "encoder" && coder != "decoder" {
        return None;
    }
    let parts: Vec<&str> = inner.splitn(4, '.').collect();
    let num = |k: usize| parts.get(k).and_then(|p| p.parse::<usize>().ok());
    let hf = match (coder, parts.first().copied()?) {
        (_, "conv_in" | "conv_out") if parts.len() == 2 => {
            format!("{}.{}", parts[0], param_name(parts[1])?)
        }
        (_, "norm_out") if parts.len() == 2 => format!("conv_norm_out.{}", param_name(parts[1])?),
        ("encoder", "down") => {
            let i = num(1)?;
            match (parts.get(2).copied()?, parts.get(3)?) {
                ("block", rest) => {
                    let (j, rest) = rest.split_once('.')?;
                    format!(
                        "down_blocks.{i}.resnets.{}.{}",
                        j.parse::<usize>().ok()?,
                        vae_resnet_diffusers(rest)?
                    )
                }
                ("downsample", rest) => {
                    format!("down_blocks.{i}.downsamplers.0.conv.{}", conv_param(rest)?)
                }
                _ => return None,
            }
        }
        ("decoder", "up") => {
            let i = levels.checked_sub(num(1)? + 1)?;
            match (parts.get(2).copied()?, parts.get(3)?) {
                ("block", rest) => {
                    let (j, rest) = rest.split_once('.')?;
                    format!(
                        "up_blocks.{i}.resnets.{}.{}",
                        j.parse::<usize>().ok()?,
                        vae_resnet_diffusers(rest)?
                    )
                }
                ("upsample", rest) => {
                    format!("up_blocks.{i}.upsamplers.0.conv.{}", conv_param(rest)?)
                }
                _ => return None,
            }
        }
        (_, "mid") => {
            let rest = parts.get(2..)?.join(".");
            match parts.get(1).copied()? {
                "block_1" => format!("mid_block.resnets.0.{}", vae_resnet_diffusers(&rest)?),
                "block_2" => format!("mid_block.resnets.1.{}", vae_resnet_diffusers(&rest)?),
                "attn_1" => {
                    let (layer, param) = rest.split_once('.')?;
                    let hf = match layer {
                        "norm" => "group_norm",
                        "q" => "to_q",
                        "k" => "to_k",
                        "v" => "to_v",
                        "proj_out" => "to_out.0",
                        _ => return None,
                    };
                    format!("mid_block.attentions.0.{hf}.{}", param_name(param)?)
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(format!("{coder}.{hf}"))
}

/// Levels of an LDM VAE, from its names (without the prefix): `encoder.down.{i}` count.
pub fn ldm_vae_levels<'a>(names: impl IntoIterator<Item = &'a str>) -> usize {
    names
        .into_iter()
        .filter_map(|n| {
            n.strip_prefix("encoder.down.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |i| i + 1)
}

/// The number of VAE levels read off diffusers VAE names (`up_blocks`/`down_blocks` count).
pub fn vae_levels<'a>(names: impl IntoIterator<Item = &'a str>) -> usize {
    names
        .into_iter()
        .filter_map(|n| {
            let mut parts = n.split('.');
            let _coder = parts.next()?;
            matches!(parts.next()?, "up_blocks" | "down_blocks").then_some(())?;
            parts.next()?.parse::<usize>().ok()
        })
        .max()
        .map_or(0, |i| i + 1)
}

/// A name split at its block: `down_blocks.1.resnets.0.conv1.weight` → (down_blocks 1 resnets 0, `conv1.weight`).
enum Block<'a> {
    /// A top-level layer such as `conv_in` or `time_embedding.linear_1`.
    Plain(&'a str),
    Indexed {
        block: &'a str,
        i: usize,
        kind: &'a str,
        j: usize,
    },
}

fn split_block(name: &str) -> Option<(Block<'_>, &str)> {
    if let Some(rest) = name.strip_prefix("mid_block.") {
        let (kind, rest) = rest.split_once('.')?;
        let (j, rest) = rest.split_once('.')?;
        return Some((
            Block::Indexed {
                block: "mid_block",
                i: 0,
                kind,
                j: j.parse().ok()?,
            },
            rest,
        ));
    }
    if name.starts_with("down_blocks.") || name.starts_with("up_blocks.") {
        let mut parts = name.splitn(5, '.');
        let block = parts.next()?;
        let i = parts.next()?.parse().ok()?;
        let kind = parts.next()?;
        let j = parts.next()?.parse().ok()?;
        return Some((Block::Indexed { block, i, kind, j }, parts.next()?));
    }
    // Two-part heads first (`time_embedding.linear_1.weight`), then one-part (`conv_in.weight`).
    let (param_start, _) = name.rmatch_indices('.').next()?;
    Some((Block::Plain(&name[..param_start]), &name[param_start + 1..]))
}

/// `weight` / `bias`: the only leaves a plain layer has.
fn param_name(rest: &str) -> Option<&str> {
    matches!(rest, "weight" | "bias").then_some(rest)
}

fn conv_param(rest: &str) -> Option<&str> {
    param_name(rest.strip_prefix("conv.")?)
}

fn unet_resnet(rest: &str) -> Option<String> {
    let (layer, param) = rest.split_once('.')?;
    let ldm = match layer {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "time_emb_proj" => "emb_layers.1",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    };
    Some(format!("{ldm}.{}", param_name(param)?))
}

/// `unet_resnet` backwards.
fn unet_resnet_diffusers(rest: &str) -> Option<String> {
    let (head, param) = rest.rsplit_once('.')?;
    let hf = match head {
        "in_layers.0" => "norm1",
        "in_layers.2" => "conv1",
        "out_layers.0" => "norm2",
        "out_layers.3" => "conv2",
        "emb_layers.1" => "time_emb_proj",
        "skip_connection" => "conv_shortcut",
        _ => return None,
    };
    Some(format!("{hf}.{}", param_name(param)?))
}

/// `vae_resnet` backwards.
fn vae_resnet_diffusers(rest: &str) -> Option<String> {
    let (layer, param) = rest.split_once('.')?;
    let hf = match layer {
        "norm1" | "conv1" | "norm2" | "conv2" => layer,
        "nin_shortcut" => "conv_shortcut",
        _ => return None,
    };
    Some(format!("{hf}.{}", param_name(param)?))
}

fn vae_resnet(rest: &str) -> Option<String> {
    let (layer, param) = rest.split_once('.')?;
    let ldm = match layer {
        "norm1" | "conv1" | "norm2" | "conv2" => layer,
        "conv_shortcut" => "nin_shortcut",
        _ => return None,
    };
    Some(format!("{ldm}.{}", param_name(param)?))
}

/// VAE mid attention: current (`to_q`, `to_out.0`) and pre-0.14 (`query`, `proj_attn`) diffusers names.
fn vae_attention(rest: &str) -> Option<String> {
    let (layer, param) = rest.rsplit_once('.')?;
    let ldm = match layer {
        "group_norm" => "norm",
        "to_q" | "query" => "q",
        "to_k" | "key" => "k",
        "to_v" | "value" => "v",
        "to_out.0" | "proj_attn" => "proj_out",
        _ => return None,
    };
    Some(format!("{ldm}.{}", param_name(param)?))
}

/// A spatial transformer's insides have the same names in both layouts; accept only those.
fn transformer(rest: &str) -> Option<&str> {
    let first = rest.split('.').next()?;
    matches!(
        first,
        "norm" | "proj_in" | "proj_out" | "transformer_blocks"
    )
    .then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> UnetLayout {
        UnetLayout {
            layers_per_block: 2,
            levels: 4,
            up_has_attention: vec![false, true, true, true],
        }
    }

    #[test]
    fn sd15_unet_blocks_match_the_reference_tables() {
        let l = sd15();
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            ("conv_norm_out.weight", "out.0.weight"),
            (
                "down_blocks.0.resnets.1.norm1.weight",
                "input_blocks.2.0.in_layers.0.weight",
            ),
            (
                "down_blocks.1.attentions.0.proj_in.weight",
                "input_blocks.4.1.proj_in.weight",
            ),
            (
                "down_blocks.2.downsamplers.0.conv.bias",
                "input_blocks.9.0.op.bias",
            ),
            (
                "down_blocks.3.resnets.1.conv2.weight",
                "input_blocks.11.0.out_layers.3.weight",
            ),
            (
                "mid_block.resnets.1.time_emb_proj.weight",
                "middle_block.2.emb_layers.1.weight",
            ),
            (
                "mid_block.attentions.0.norm.bias",
                "middle_block.1.norm.bias",
            ),
            (
                "up_blocks.0.resnets.2.conv_shortcut.weight",
                "output_blocks.2.0.skip_connection.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.1.conv.weight",
            ),
            (
                "up_blocks.1.upsamplers.0.conv.weight",
                "output_blocks.5.2.conv.weight",
            ),
            (
                "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight",
                "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
            ),
        ];
        for (hf, ldm) in cases {
            assert_eq!(
                unet_key(hf, &l),
                Some(format!("{UNET_PREFIX}{ldm}")),
                "{hf}"
            );
        }
    }

    #[test]
    fn names_outside_the_sd1_unet_map_to_none() {
        let l = sd15();
        for hf in [
            "add_embedding.linear_3.weight",
            "down_blocks.4.resnets.0.conv1.weight",
            "down_blocks.0.resnets.2.conv1.weight",
            "down_blocks.0.resnets.0.conv9.weight",
            "mid_block.resnets.2.conv1.weight",
            "conv_in.weight.extra",
            "weight",
        ] {
            assert_eq!(unet_key(hf, &l), None, "{hf}");
        }
    }

    #[test]
    fn sdxl_unet_names() {
        // 3 levels, no attention at level 0 (so up_blocks.2, its output level, has none either).
        let l = UnetLayout {
            layers_per_block: 2,
            levels: 3,
            up_has_attention: vec![true, true, false],
        };
        let cases = [
            ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
            ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
            (
                "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj.weight",
                "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.2.conv.weight",
            ),
            (
                "up_blocks.2.resnets.2.conv_shortcut.bias",
                "output_blocks.8.0.skip_connection.bias",
            ),
        ];
        for (hf, ldm) in cases {
            assert_eq!(
                unet_key(hf, &l),
                Some(format!("{UNET_PREFIX}{ldm}")),
                "{hf}"
            );
            assert_eq!(unet_diffusers_key(ldm, 2).as_deref(), Some(hf), "{ldm}");
        }
    }

    #[test]
    fn inverse_refuses_names_outside_the_blocks() {
        for ldm in [
            "input_blocks.0.1.weight",
            "input_blocks.1.2.in_layers.0.weight",
            "output_blocks.0.1.conv.weight",
            "middle_block.3.in_layers.0.weight",
            "label_emb.1.0.weight",
            "time_embed.1.weight",
            "foo.weight",
        ] {
            assert_eq!(unet_diffusers_key(ldm, 2), None, "{ldm}");
        }
        assert_eq!(
            vae_diffusers_key("decoder.up.4.block.0.conv1.weight", 4),
            None
        );
        assert_eq!(vae_diffusers_key("decoder.mid.attn_1.x.weight", 4), None);
    }

    #[test]
    fn vae_decoder_levels_are_reversed() {
        assert_eq!(
            vae_key("decoder.up_blocks.0.resnets.2.conv1.weight", 4).unwrap(),
            "first_stage_model.decoder.up.3.block.2.conv1.weight"
        );
        assert_eq!(
            vae_key("decoder.up_blocks.2.upsamplers.0.conv.bias", 4).unwrap(),
            "first_stage_model.decoder.up.1.upsample.conv.bias"
        );
        assert_eq!(
            vae_key("encoder.mid_block.attentions.0.to_out.0.weight", 4).unwrap(),
            "first_stage_model.encoder.mid.attn_1.proj_out.weight"
        );
        assert_eq!(
            vae_key("encoder.mid_block.attentions.0.key.bias", 4).unwrap(),
            "first_stage_model.encoder.mid.attn_1.k.bias"
        );
        assert_eq!(
            vae_key("decoder.conv_norm_out.weight", 4).unwrap(),
            "first_stage_model.decoder.norm_out.weight"
        );
        assert_eq!(
            vae_key("decoder.up_blocks.4.resnets.0.conv1.weight", 4),
            None
        );
    }

    #[test]
    fn layout_is_read_from_names() {
        let names = [
            "down_blocks.0.resnets.1.conv1.weight",
            "down_blocks.1.resnets.0.conv1.weight",
            "up_blocks.1.attentions.0.norm.weight",
        ];
        let l = UnetLayout::from_names(names);
        assert_eq!(
            l,
            UnetLayout {
                layers_per_block: 2,
                levels: 2,
                up_has_attention: vec![false, true]
            }
        );
    }
}
