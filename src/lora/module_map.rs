//! Which weight of the model a LoRA module key modifies, looked up in a table built from the
//! MODEL's own module names: underscore names are ambiguous (`to_out_0`, `ff_net_0_proj`,
//! `time_emb_proj`), so instead of turning `_` back into `.`, every weight's module path is
//! written in every form a LoRA file may use and the file's key looked up as it is.
//!
//! Each family brings its key map through its `ModelSpec`: the UNet under `unet_prefix` (LDM/SGM
//! names, and the diffusers names `weights::key_map` derives from them), and each text encoder in
//! `spec.text_encoders` order under the kohya prefix `lora_te` (one encoder) or `lora_te1` /
//! `lora_te2` (SDXL) and the PEFT prefix `text_encoder` / `text_encoder_2`. Text encoders are
//! named as transformers' `CLIPTextModel` (what LoRA trainers write); an open_clip encoder (SD2.x,
//! SDXL's second) maps `attn.in_proj_weight` to q/k/v_proj as three row ranges, `attn.out_proj` to
//! `self_attn.out_proj`, `mlp.c_fc` / `mlp.c_proj` to `mlp.fc1` / `mlp.fc2`.

use std::collections::HashMap;

use crate::family::ModelSpec;
use crate::weights::key_map::{ldm_unet_layers, unet_diffusers_key};
use crate::weights::TensorStore;

/// Which network a weight belongs to (the tag syntax gives each its own multiplier).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Unet,
    /// Index into `spec.text_encoders`.
    Text(usize),
}

/// A weight (or a range of its outer rows) a LoRA module may modify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The stored tensor's key.
    pub weight: String,
    /// Outer rows `first_row .. first_row + rows` of it.
    pub first_row: usize,
    pub rows: usize,
    /// Values per row (in · kh · kw).
    pub row_len: usize,
    pub part: Part,
}

/// Every module key form of every weight of one model.
pub struct ModuleMap {
    keys: HashMap<String, Vec<usize>>,
    targets: Vec<Target>,
}

/// `a.b.c` → `a_b_c` (kohya's module names).
fn underscored(path: &str) -> String {
    path.replace('.', "_")
}

impl ModuleMap {
    pub fn new(store: &TensorStore, spec: &ModelSpec) -> ModuleMap {
        let mut map = ModuleMap {
            keys: HashMap::new(),
            targets: Vec::new(),
        };
        map.add_unet(store, spec.unet_prefix);
        let several = spec.text_encoders.len() > 1;
        for (i, enc) in spec.text_encoders.iter().enumerate() {
            let kohya = if several {
                format!("lora_te{}", i + 1)
            } else {
                "lora_te".into()
            };
            let peft = if i == 0 {
                "text_encoder".into()
            } else {
                format!("text_encoder_{}", i + 1)
            };
            map.add_text(store, &format!("{}.", enc.prefix), i, (&kohya, &peft));
        }
        map
    }

    fn add(&mut self, target: Target, keys: impl IntoIterator<Item = String>) {
        let index = self.targets.len();
        self.targets.push(target);
        for key in keys {
            let slot = self.keys.entry(key).or_default();
            if !slot.contains(&index) {
                slot.push(index);
            }
        }
    }

    fn add_unet(&mut self, store: &TensorStore, prefix: &str) {
        let names: Vec<&str> = store
            .tensors()
            .iter()
            .filter_map(|t| t.name.strip_prefix(prefix))
            .collect();
        let layers = ldm_unet_layers(names.iter().copied());
        for info in store.tensors() {
            let Some(ldm) = info.name.strip_prefix(prefix) else {
                continue;
            };
            let Some(module) = ldm
                .strip_suffix(".weight")
                .filter(|_| info.shape.len() >= 2)
            else {
                continue;
            };
            let mut keys = vec![format!("lora_unet_{}", underscored(module))];
            if let Some(hf) = unet_diffusers_key(ldm, layers) {
                let hf = hf.trim_end_matches(".weight").to_string();
                keys.push(format!("lora_unet_{}", underscored(&hf)));
                keys.push(format!("unet.{hf}"));
            }
            let rows = info.shape[0];
            let target = Target {
                weight: info.name.clone(),
                first_row: 0,
                rows,
                row_len: info.numel() / rows.max(1),
                part: Part::Unet,
            };
            self.add(target, keys);
        }
    }

    fn add_text(
        &mut self,
        store: &TensorStore,
        prefix: &str,
        index: usize,
        (kohya, peft): (&str, &str),
    ) {
        let open_clip = !prefix.ends_with("text_model.");
        for info in store.tensors() {
            let Some(rest) = info.name.strip_prefix(prefix) else {
                continue;
            };
            if info.shape.len() != 2 {
                continue;
            }
            let modules: Vec<String> = if open_clip {
                open_clip_modules(rest)
            } else {
                // Token and position tables are looked up, not multiplied: no LoRA reaches them.
                rest.strip_suffix(".weight")
                    .filter(|m| !m.starts_with("embeddings."))
                    .map(|m| vec![format!("text_model.{m}")])
                    .unwrap_or_default()
            };
            let parts = modules.len();
            for (i, module) in modules.into_iter().enumerate() {
                let rows = info.shape[0] / parts;
                let target = Target {
                    weight: info.name.clone(),
                    first_row: i * rows,
                    rows,
                    row_len: info.shape[1],
                    part: Part::Text(index),
                };
                let keys = [
                    format!("{kohya}_{}", underscored(&module)),
                    format!("{peft}.{module}"),
                ];
                self.add(target, keys);
            }
        }
    }

    /// The weights a module key names: none, one, or (an ambiguous key) several.
    pub fn find(&self, key: &str) -> Vec<&Target> {
        self.keys
            .get(key)
            .map(|ids| ids.iter().map(|&i| &self.targets[i]).collect())
            .unwrap_or_default()
    }
}

/// An open_clip text encoder tensor (`transformer.resblocks.N.…`) → the transformers module
/// paths it holds, in row order (the fused in_proj holds three).
fn open_clip_modules(name: &str) -> Vec<String> {
    let Some(rest) = name.strip_prefix("transformer.resblocks.") else {
        return Vec::new();
    };
    let Some((layer, tail)) = rest.split_once('.') else {
        return Vec::new();
    };
    let base = format!("text_model.encoder.layers.{layer}");
    let one = |m: &str| vec![format!("{base}.{m}")];
    match tail {
        "attn.in_proj_weight" => ["q_proj", "k_proj", "v_proj"]
            .iter()
            .map(|p| format!("{base}.self_attn.{p}"))
            .collect(),
        "attn.out_proj.weight" => one("self_attn.out_proj"),
        "mlp.c_fc.weight" => one("mlp.fc1"),
        "mlp.c_proj.weight" => one("mlp.fc2"),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_clip_names_map_to_transformers_modules() {
        let q = open_clip_modules("transformer.resblocks.3.attn.in_proj_weight");
        assert_eq!(
            q,
            [
                "text_model.encoder.layers.3.self_attn.q_proj",
                "text_model.encoder.layers.3.self_attn.k_proj",
                "text_model.encoder.layers.3.self_attn.v_proj"
            ]
        );
        assert_eq!(
            open_clip_modules("transformer.resblocks.0.mlp.c_proj.weight")[0],
            "text_model.encoder.layers.0.mlp.fc2"
        );
        assert!(open_clip_modules("token_embedding.weight").is_empty());
    }
}
