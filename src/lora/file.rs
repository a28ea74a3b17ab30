//! LoRA files as users have them, read into modules: kohya-ss (`lora_unet_*`, `lora_te*_*` with
//! `.lora_down.weight` / `.lora_up.weight` / `.alpha`; LoCon convs the same with a k×k down and a
//! 1×1 up), diffusers/PEFT (`unet.<module>.lora_A.weight` / `.lora_B.weight`, alpha in the header's
//! `lora_adapter_metadata`) and LyCORIS LoHa (`.hada_w1_a` … `.hada_w2_b`). The file is mapped
//! (`TensorStore`), each tensor converted to f32 once; nothing else of it is kept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::weights::TensorStore;
use crate::{Error, Result};

/// A matrix of f32 values, row-major.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

/// What one module of a LoRA file adds to its weight, before scaling.
#[derive(Clone, Debug)]
pub enum Form {
    /// `up · down`: up [out, r], down [r, in·kh·kw] (LoRA, LoCon).
    LowRank { up: Matrix, down: Matrix },
    /// `(w1a · w1b) ⊙ (w2a · w2b)` (LoHa), each pair [out, r] · [r, in·kh·kw].
    Hadamard {
        w1a: Matrix,
        w1b: Matrix,
        w2a: Matrix,
        w2b: Matrix,
    },
}

impl Form {
    /// `rank`: what alpha is divided by (`lora_down.shape[0]`, `hada_w1_b.shape[0]`).
    pub fn rank(&self) -> usize {
        match self {
            Form::LowRank { down, .. } => down.rows,
            Form::Hadamard { w1b, .. } => w1b.rows,
        }
    }

    /// The delta's (rows, values per row).
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Form::LowRank { up, down } => (up.rows, down.cols),
            Form::Hadamard { w1a, w1b, .. } => (w1a.rows, w1b.cols),
        }
    }

    /// Values held as f32.
    pub fn values(&self) -> usize {
        match self {
            Form::LowRank { up, down } => up.data.len() + down.data.len(),
            Form::Hadamard { w1a, w1b, w2a, w2b } => {
                w1a.data.len() + w1b.data.len() + w2a.data.len() + w2b.data.len()
            }
        }
    }
}

/// One module of a LoRA file: its key as the file names it (without the part suffix), its form
/// and alpha (None: alpha = rank).
#[derive(Clone, Debug)]
pub struct Module {
    pub key: String,
    pub form: Form,
    pub alpha: Option<f32>,
}

impl Module {
    /// alpha / rank (alpha defaults to rank).
    pub fn scale(&self) -> f32 {
        let rank = self.form.rank() as f32;
        self.alpha.unwrap_or(rank) / rank
    }
}

/// A LoRA file read into modules, in key order.
pub struct LoraFile {
    pub path: PathBuf,
    pub modules: Vec<Module>,
}

/// The parts a module key may carry, by suffix.
const PARTS: [&str; 9] = [
    ".lora_down.weight",
    ".lora_up.weight",
    ".lora_A.weight",
    ".lora_B.weight",
    ".alpha",
    ".hada_w1_a",
    ".hada_w1_b",
    ".hada_w2_a",
    ".hada_w2_b",
];

/// Bytes a LoRA file costs while loaded: its mapped size (read once), the f32 copies of its
/// tensors, and for LoHa the two factor products of `DELTA_BLOCK_ROWS` rows each thread may build
/// while reading a weight. Reads the header only.
pub fn loaded_bytes(path: &Path) -> Result<u64> {
    let store = open(path)?;
    let file = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let values: u64 = store.tensors().iter().map(|t| t.numel() as u64).sum();
    let loha_row = store
        .tensors()
        .iter()
        .filter(|t| t.name.ends_with(".hada_w1_b"))
        .map(|t| (t.numel() / t.shape.first().copied().unwrap_or(1).max(1)) as u64)
        .max()
        .unwrap_or(0);
    let threads = rayon::current_num_threads() as u64;
    let loha_scratch = 2 * super::delta::DELTA_BLOCK_ROWS as u64 * loha_row * 4 * threads;
    Ok(file
        .saturating_add(values.saturating_mul(4))
        .saturating_add(loha_scratch))
}

/// The largest rank of a LoRA file's low-rank modules (`lora_down` / `lora_A` rows). Header only.
pub fn max_rank(path: &Path) -> Result<usize> {
    let store = open(path)?;
    Ok(store
        .tensors()
        .iter()
        .filter(|t| t.name.ends_with(".lora_down.weight") || t.name.ends_with(".lora_A.weight"))
        .filter_map(|t| t.shape.first().copied())
        .max()
        .unwrap_or(0))
}

pub(super) fn open(path: &Path) -> Result<TensorStore> {
    if !path.is_file() {
        return Err(Error::bad_file(path, "LoRA file not found"));
    }
    TensorStore::open(path)
}

impl LoraFile {
    /// Reads every module of the file at `path`, checking that the parts fit together and that the
    /// values are finite.
    pub fn read(path: &Path) -> Result<LoraFile> {
        let store = open(path)?;
        let bad = |msg: String| Error::bad_file(path, msg);
        let peft = peft_alphas(&store, path)?;
        let mut parts: BTreeMap<String, BTreeMap<&'static str, Matrix>> = BTreeMap::new();
        let mut alphas: BTreeMap<String, f32> = BTreeMap::new();
        for info in store.tensors() {
            let Some((key, part)) = PARTS
                .iter()
                .find_map(|p| info.name.strip_suffix(p).map(|k| (k.to_string(), *p)))
            else {
                return Err(bad(format!(
                    "tensor `{}` is no part of a LoRA sdcap reads (kohya lora_down/lora_up/alpha, \
                     PEFT lora_A/lora_B, LoHa hada_w*)",
                    info.name
                )));
            };
            if !info.dtype.is_float() {
                return Err(bad(format!(
                    "tensor `{}` has type {}, not a float type",
                    info.name,
                    info.dtype.name()
                )));
            }
            let mut data = vec![0.0; info.numel()];
            store.read_f32(info, &mut data)?;
            if let Some(v) = data.iter().find(|v| !v.is_finite()) {
                return Err(bad(format!(
                    "tensor `{}` holds a non-finite value ({v})",
                    info.name
                )));
            }
            if part == ".alpha" {
                let [alpha] = data[..] else {
                    return Err(bad(format!("`{}` is not one value", info.name)));
                };
                alphas.insert(key, alpha);
                continue;
            }
            let rows = info.shape.first().copied().unwrap_or(1);
            let cols = data.len() / rows.max(1);
            if info.shape.len() < 2 || rows == 0 || cols == 0 {
                return Err(bad(format!(
                    "tensor `{}` has shape {:?}, not a matrix or conv filter",
                    info.name, info.shape
                )));
            }
            parts
                .entry(key)
                .or_default()
                .insert(part, Matrix { rows, cols, data });
        }
        let mut modules = Vec::with_capacity(parts.len());
        for (key, mut p) in parts {
            let mut take = |name: &'static str| p.remove(name);
            let form = match (
                take(".lora_down.weight").or_else(|| take(".lora_A.weight")),
                take(".lora_up.weight").or_else(|| take(".lora_B.weight")),
            ) {
                (Some(down), Some(up)) => Form::LowRank { up, down },
                (None, None) => match (
                    take(".hada_w1_a"),
                    take(".hada_w1_b"),
                    take(".hada_w2_a"),
                    take(".hada_w2_b"),
                ) {
                    (Some(w1a), Some(w1b), Some(w2a), Some(w2b)) => {
                        Form::Hadamard { w1a, w1b, w2a, w2b }
                    }
                    _ => return Err(bad(format!("LoRA module `{key}` lacks some of its parts"))),
                },
                _ => {
                    return Err(bad(format!(
                        "LoRA module `{key}` lacks its up or down matrix"
                    )))
                }
            };
            if let Some(extra) = p.keys().next() {
                return Err(bad(format!("LoRA module `{key}` mixes forms (`{extra}`)")));
            }
            check_form(&key, &form).map_err(bad)?;
            let alpha = alphas.remove(&key).or_else(|| peft.alpha(&key));
            modules.push(Module { key, form, alpha });
        }
        if let Some(key) = alphas.keys().next() {
            return Err(bad(format!("`{key}.alpha` belongs to no LoRA module")));
        }
        Ok(LoraFile {
            path: path.to_path_buf(),
            modules,
        })
    }
}

/// The inner dimensions of a form agree.
fn check_form(key: &str, form: &Form) -> std::result::Result<(), String> {
    let agree = match form {
        Form::LowRank { up, down } => up.cols == down.rows,
        Form::Hadamard { w1a, w1b, w2a, w2b } => {
            w1a.cols == w1b.rows
                && w2a.cols == w2b.rows
                && (w1a.rows, w1b.cols) == (w2a.rows, w2b.cols)
        }
    };
    if agree {
        Ok(())
    } else {
        Err(format!(
            "LoRA module `{key}`: its matrices' shapes do not fit together"
        ))
    }
}

/// A PEFT file's alphas (header `lora_adapter_metadata`: per component `lora_alpha` and
/// `alpha_pattern`); kohya files carry theirs as tensors.
#[derive(Default)]
struct PeftAlphas {
    /// By component (`unet`, `text_encoder`, …).
    components: BTreeMap<String, ComponentAlphas>,
}

/// One component's `lora_alpha` and `alpha_pattern` (module → alpha).
#[derive(Default)]
struct ComponentAlphas {
    default: Option<f32>,
    patterns: Vec<(String, f32)>,
}

impl PeftAlphas {
    fn alpha(&self, key: &str) -> Option<f32> {
        let (component, module) = key.split_once('.')?;
        let alphas = self.components.get(component)?;
        alphas
            .patterns
            .iter()
            .find(|(p, _)| module == p || module.ends_with(&format!(".{p}")))
            .map(|(_, a)| *a)
            .or(alphas.default)
    }
}

fn peft_alphas(store: &TensorStore, path: &Path) -> Result<PeftAlphas> {
    let Some((_, text)) = store
        .metadata_strings()
        .iter()
        .find(|(k, _)| k == "lora_adapter_metadata")
    else {
        return Ok(PeftAlphas::default());
    };
    let bad = || {
        Error::bad_file(
            path,
            "header `lora_adapter_metadata` is not the JSON PEFT writes",
        )
    };
    let json: serde_json::Value = serde_json::from_str(text).map_err(|_| bad())?;
    let map = json.as_object().ok_or_else(bad)?;
    let mut out = PeftAlphas::default();
    for (name, value) in map {
        let Some((component, field)) = name.rsplit_once('.') else {
            continue;
        };
        let entry = out.components.entry(component.to_string()).or_default();
        match field {
            "lora_alpha" => entry.default = value.as_f64().map(|a| a as f32),
            "alpha_pattern" => {
                for (module, a) in value.as_object().into_iter().flatten() {
                    let alpha = a.as_f64().ok_or_else(bad)? as f32;
                    entry.patterns.push((module.clone(), alpha));
                }
            }
            _ => {}
        }
    }
    Ok(out)
}
