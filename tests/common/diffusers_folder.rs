//! Builds a diffusers pipeline folder FROM a single-file checkpoint (SD1.x, SD2.x or SDXL), through the
//! inverse of sdcap's key map, so that tests need not carry diffusers folders (issue 14).
//!
//! UNet and VAE tensors are renamed only (`key_map::unet_diffusers_key` / `vae_diffusers_key`; the VAE's
//! mid-attention 1x1 convs become linear weights, same bytes). Text encoders follow diffusers'
//! single-file converter (`loaders/single_file_utils.py`): CLIP-L keeps its transformers names; an
//! open_clip tower becomes a `CLIPTextModel` — `attn.in_proj_weight` split into q/k/v rows,
//! `text_projection` transposed into `text_projection.weight` (SDXL's bigG only) — and SD2.x's tower loses
//! its last resblock (the conditioning is the penultimate layer, diffusers stores R-1 layers). What a
//! folder does not hold is listed in `Folder::unused`, by name.
//!
//! Include with `#[path = "common/diffusers_folder.rs"] mod diffusers_folder;`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use sdcap::weights::key_map::{self, SD2_TEXT_PREFIX, SDXL_TEXT1_PREFIX, SDXL_TEXT2_PREFIX};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Sd1,
    Sd2,
    Sdxl,
}

/// Which bytes of a single-file tensor one diffusers tensor holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// All of it (the shape may lose unit dims).
    Whole,
    /// Outer rows `start..end` (q, k or v of a fused `in_proj`).
    Rows(usize, usize),
    /// The 2-D transpose (open_clip `text_projection` [width, proj] → Linear weight [proj, width]).
    Transposed,
}

/// One diffusers tensor and where its numbers come from in the single file.
#[derive(Clone, Debug)]
pub struct Entry {
    /// `unet`, `vae`, `text_encoder` or `text_encoder_2`.
    pub component: &'static str,
    /// The diffusers name inside the component's weights file.
    pub name: String,
    /// The single-file tensor.
    pub source: String,
    pub part: Part,
}

/// What a diffusers folder made from a single file holds.
pub struct Folder {
    pub family: Family,
    pub entries: Vec<Entry>,
    /// Single-file tensors no diffusers component holds.
    pub unused: Vec<String>,
}

/// One tensor's dtype, shape and bytes.
pub type Data = (Dtype, Vec<usize>, Vec<u8>);

/// The single file's tensors: name → (dtype, shape, bytes).
pub type Tensors = BTreeMap<String, Data>;

pub fn read_tensors(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("safetensors parses");
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

pub fn family_of(tensors: &Tensors) -> Family {
    if tensors
        .keys()
        .any(|n| n.starts_with("conditioner.embedders."))
    {
        Family::Sdxl
    } else if tensors.keys().any(|n| n.starts_with(SD2_TEXT_PREFIX)) {
        Family::Sd2
    } else {
        Family::Sd1
    }
}

/// Plans the folder of `tensors` (a single file's): every tensor is an entry or listed as unused.
pub fn plan(tensors: &Tensors) -> Folder {
    let family = family_of(tensors);
    let unet_names: Vec<&str> = tensors
        .keys()
        .filter_map(|n| n.strip_prefix(key_map::UNET_PREFIX))
        .collect();
    let layers = key_map::ldm_unet_layers(unet_names.iter().copied());
    let vae_levels = key_map::ldm_vae_levels(
        tensors
            .keys()
            .filter_map(|n| n.strip_prefix(key_map::VAE_PREFIX)),
    );
    let resblocks = |prefix: &str| {
        tensors
            .keys()
            .filter_map(|n| {
                n.strip_prefix(prefix)?
                    .strip_prefix("transformer.resblocks.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map_or(0, |r| r + 1)
    };
    let sd2_layers = resblocks(SD2_TEXT_PREFIX).saturating_sub(1);
    let xl_layers = resblocks(SDXL_TEXT2_PREFIX);
    let mut folder = Folder {
        family,
        entries: Vec::new(),
        unused: Vec::new(),
    };
    for name in tensors.keys() {
        let whole = |component, hf: String| {
            vec![Entry {
                component,
                name: hf,
                source: name.clone(),
                part: Part::Whole,
            }]
        };
        let entries: Vec<Entry> = if let Some(rest) = name.strip_prefix(key_map::UNET_PREFIX) {
            key_map::unet_diffusers_key(rest, layers)
                .map(|hf| whole("unet", hf))
                .unwrap_or_default()
        } else if let Some(rest) = name.strip_prefix(key_map::VAE_PREFIX) {
            key_map::vae_diffusers_key(rest, vae_levels)
                .map(|hf| whole("vae", hf))
                .unwrap_or_default()
        } else if let Some(rest) = name.strip_prefix(key_map::TEXT_PREFIX) {
            hf_clip(rest)
                .map(|hf| whole("text_encoder", hf))
                .unwrap_or_default()
        } else if let Some(rest) = name.strip_prefix(SDXL_TEXT1_PREFIX) {
            hf_clip(rest)
                .map(|hf| whole("text_encoder", hf))
                .unwrap_or_default()
        } else if let Some(rest) = name.strip_prefix(SD2_TEXT_PREFIX) {
            open_clip(name, rest, "text_encoder", sd2_layers, false, tensors)
        } else if let Some(rest) = name.strip_prefix(SDXL_TEXT2_PREFIX) {
            open_clip(name, rest, "text_encoder_2", xl_layers, true, tensors)
        } else {
            Vec::new()
        };
        if entries.is_empty() {
            folder.unused.push(name.clone());
        }
        folder.entries.extend(entries);
    }
    folder
}

/// A transformers CLIP name as a diffusers text encoder stores it (no `position_ids`: transformers ≥ 4.31
/// does not save that buffer).
fn hf_clip(rest: &str) -> Option<String> {
    (rest.starts_with("text_model.") && !rest.ends_with("position_ids")).then(|| rest.to_string())
}

/// An open_clip text tower tensor → its `CLIPTextModel(WithProjection)` tensors. Resblocks from `layers`
/// on are not part of the model (SD2.x's last one).
fn open_clip(
    full: &str,
    rest: &str,
    component: &'static str,
    layers: usize,
    projection: bool,
    tensors: &Tensors,
) -> Vec<Entry> {
    let entry = |name: String, part: Part| Entry {
        component,
        name,
        source: full.to_string(),
        part,
    };
    let plain = |hf: &str| vec![entry(format!("text_model.{hf}"), Part::Whole)];
    match rest {
        "token_embedding.weight" => return plain("embeddings.token_embedding.weight"),
        "positional_embedding" => return plain("embeddings.position_embedding.weight"),
        "ln_final.weight" => return plain("final_layer_norm.weight"),
        "ln_final.bias" => return plain("final_layer_norm.bias"),
        "text_projection" if projection => {
            return vec![entry("text_projection.weight".into(), Part::Transposed)]
        }
        _ => {}
    }
    let Some(block) = rest.strip_prefix("transformer.resblocks.") else {
        return Vec::new();
    };
    let Some((n, leaf)) = block.split_once('.') else {
        return Vec::new();
    };
    match n.parse::<usize>() {
        Ok(n) if n < layers => {
            let layer = format!("text_model.encoder.layers.{n}");
            let width = tensors[full].1[0] / 3;
            let fused = |param: &str| {
                ["q", "k", "v"]
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        entry(
                            format!("{layer}.self_attn.{p}_proj.{param}"),
                            Part::Rows(i * width, (i + 1) * width),
                        )
                    })
                    .collect()
            };
            let renamed = |hf: &str| vec![entry(format!("{layer}.{hf}"), Part::Whole)];
            match leaf {
                "attn.in_proj_weight" => fused("weight"),
                "attn.in_proj_bias" => fused("bias"),
                _ => {
                    let (module, param) = leaf.rsplit_once('.').unwrap_or((leaf, ""));
                    let hf = match module {
                        "ln_1" => "layer_norm1",
                        "ln_2" => "layer_norm2",
                        "attn.out_proj" => "self_attn.out_proj",
                        "mlp.c_fc" => "mlp.fc1",
                        "mlp.c_proj" => "mlp.fc2",
                        _ => return Vec::new(),
                    };
                    renamed(&format!("{hf}.{param}"))
                }
            }
        }
        _ => Vec::new(),
    }
}

fn dtype_size(dtype: Dtype) -> usize {
    match dtype {
        Dtype::F64 | Dtype::I64 => 8,
        Dtype::F32 | Dtype::I32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        other => panic!("unexpected dtype {other:?}"),
    }
}

/// The dtype, shape and bytes `entry` holds.
pub fn materialize(tensors: &Tensors, entry: &Entry) -> Data {
    let (dtype, shape, data) = &tensors[&entry.source];
    let size = dtype_size(*dtype);
    match entry.part {
        Part::Whole => {
            let mut shape = shape.clone();
            // The VAE's mid attention: LDM 1x1 convs [c, c, 1, 1], diffusers linear [c, c].
            if entry.component == "vae" && entry.name.contains(".attentions.") {
                shape.retain(|&d| d != 1);
            }
            (*dtype, shape, data.clone())
        }
        Part::Rows(start, end) => {
            let row: usize = shape[1..].iter().product::<usize>() * size;
            let mut out_shape = shape.clone();
            out_shape[0] = end - start;
            (*dtype, out_shape, data[start * row..end * row].to_vec())
        }
        Part::Transposed => {
            let (a, b) = (shape[0], shape[1]);
            let mut out = vec![0u8; data.len()];
            for i in 0..a {
                for j in 0..b {
                    let (src, dst) = ((i * b + j) * size, (j * a + i) * size);
                    out[dst..dst + size].copy_from_slice(&data[src..src + size]);
                }
            }
            (*dtype, vec![b, a], out)
        }
    }
}

/// Writes the diffusers folder of the single file `single` into `out` (created; must not exist or be
/// empty): component weights, the configs sdcap reads (`hidden_act` tells SD2.x's OpenCLIP from CLIP-L)
/// and `model_index.json`. Returns the plan.
pub fn build(single: &Path, out: &Path) -> Folder {
    let tensors = read_tensors(single);
    let folder = plan(&tensors);
    let mut components: BTreeMap<&str, Vec<(String, Data)>> = BTreeMap::new();
    for entry in &folder.entries {
        components
            .entry(entry.component)
            .or_default()
            .push((entry.name.clone(), materialize(&tensors, entry)));
    }
    for (component, list) in &components {
        let dir = out.join(component);
        std::fs::create_dir_all(&dir).unwrap();
        let file = match *component {
            "unet" | "vae" => "diffusion_pytorch_model.safetensors",
            _ => "model.safetensors",
        };
        let views = list.iter().map(|(n, (d, s, b))| {
            (
                n.clone(),
                TensorView::new(*d, s.clone(), b).expect("consistent tensor"),
            )
        });
        std::fs::write(dir.join(file), safetensors::serialize(views, None).unwrap()).unwrap();
    }
    let gelu =
        |act: &str| format!(r#"{{"architectures": ["CLIPTextModel"], "hidden_act": "{act}"}}"#);
    let (class, text_act) = match folder.family {
        Family::Sd1 => ("StableDiffusionPipeline", "quick_gelu"),
        Family::Sd2 => ("StableDiffusionPipeline", "gelu"),
        Family::Sdxl => ("StableDiffusionXLPipeline", "quick_gelu"),
    };
    std::fs::write(out.join("text_encoder/config.json"), gelu(text_act)).unwrap();
    if folder.family == Family::Sdxl {
        std::fs::write(
            out.join("text_encoder_2/config.json"),
            r#"{"architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu"}"#,
        )
        .unwrap();
    }
    std::fs::write(
        out.join("model_index.json"),
        format!(r#"{{"_class_name": "{class}"}}"#),
    )
    .unwrap();
    folder
}
