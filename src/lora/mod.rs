//! LoRA: the job's adapters, applied at run time to the weights as the products read them, never
//! merged into (or re-quantized with) the base weights.
//!
//! - `file.rs`: the formats (kohya-ss LoRA/LoCon, diffusers/PEFT, LyCORIS LoHa) → modules.
//! - `module_map.rs`: the family's key map, built from the model's own module names.
//! - `delta.rs`: the resolved set (`LoraSet`) and the weight hook (`WithLora`) the products call.
//! - here: which LoRAs a job names (`--lora`, `<lora:NAME:W>` tags), `check`, `build`, and what the
//!   memory plan counts (`planned_bytes`).

mod delta;
mod file;
mod module_map;

use std::path::PathBuf;
use std::sync::Arc;

pub use delta::{LoraSet, Term, WithLora};
pub use file::{Form, LoraFile, Matrix, Module};
pub use module_map::{ModuleMap, Part, Target};

use crate::job::Job;
use crate::models::Models;
use crate::{Error, Result};

/// One LoRA of a job: its file and its multipliers (a `--lora` weight applies to both; a tag may
/// give the text encoder and the UNet their own, `<lora:NAME:TE:UNET>`).
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    pub path: PathBuf,
    pub te_multiplier: f32,
    pub unet_multiplier: f32,
}

/// The LoRAs of `job` in order: `job.loras`, then the prompt's `<lora:NAME:…>` tags, NAME resolved
/// to `NAME.safetensors` in `job.lora_model_dir`. A1111 reads tags from the prompt only (the
/// negative prompt's are refused by the prompt check as any unreadable text is). Fails with one
/// line on a tag without a directory or a file.
pub fn adapters(job: &Job) -> Result<Vec<Adapter>> {
    let mut out: Vec<Adapter> = job
        .loras
        .iter()
        .map(|l| Adapter {
            path: l.path.clone(),
            te_multiplier: l.weight,
            unet_multiplier: l.weight,
        })
        .collect();
    let (_, tags) = job.prompt_syntax.extract_tags(&job.prompt)?;
    for tag in tags.loras {
        let Some(dir) = &job.lora_model_dir else {
            return Err(Error::BadRequest(format!(
                "prompt: `<lora:{}>`: no LoRA directory to find it in (give --lora-model-dir)",
                tag.name
            )));
        };
        let path = dir.join(format!("{}.safetensors", tag.name));
        if !path.is_file() {
            return Err(Error::BadRequest(format!(
                "prompt: `<lora:{}>`: {} not found",
                tag.name,
                path.display()
            )));
        }
        out.push(Adapter {
            path,
            te_multiplier: tag.te_multiplier,
            unet_multiplier: tag.unet_multiplier,
        });
    }
    Ok(out)
}

/// The request's LoRAs can be used: every tag resolves, every file exists and is a readable
/// safetensors LoRA (header), every multiplier is finite. The values themselves (finite, shapes
/// that fit the model) are checked when the job's set is built, before any compute.
pub fn check(job: &Job) -> Result<()> {
    for a in adapters(job)? {
        for m in [a.te_multiplier, a.unet_multiplier] {
            if !m.is_finite() {
                return Err(Error::BadRequest(format!(
                    "LoRA {}: weight {m} is not a finite number",
                    a.path.display()
                )));
            }
        }
        file::open(&a.path)?;
    }
    Ok(())
}

/// Bytes the job's LoRAs hold while it runs: each file's mapped pages while it is read, its values
/// as f32 (the terms), LoHa's row scratch, and the low-rank form's per-call product `x · downᵀ`
/// ([rows, rank] f32, `rows` the most rows one layer's product has: the UNet's batch × latent
/// pixels). Zero without LoRA (and for a request `check` refuses).
pub fn planned_bytes(job: &Job, rows: usize) -> u64 {
    let Ok(adapters) = adapters(job) else {
        return 0;
    };
    let held: u64 = adapters
        .iter()
        .map(|a| file::loaded_bytes(&a.path).unwrap_or(0))
        .sum();
    let rank = adapters
        .iter()
        .map(|a| file::max_rank(&a.path).unwrap_or(0))
        .max()
        .unwrap_or(0);
    held.saturating_add((rows as u64).saturating_mul(rank as u64).saturating_mul(4))
}

/// The job's adapter set on `models`, once per job (None without LoRA). Every module of every file
/// must modify a weight of the model: an unknown key, a LoRA for another family, or a LoRA that
/// matches nothing is refused with one line.
pub fn build(models: &Models, job: &Job) -> Result<Option<Arc<LoraSet>>> {
    let adapters = adapters(job)?;
    if adapters.is_empty() {
        return Ok(None);
    }
    let map = ModuleMap::new(&models.store, models.spec);
    let mut set = LoraSet::default();
    for adapter in &adapters {
        let file = LoraFile::read(&adapter.path)?;
        add_file(&mut set, &map, models, &file, adapter)?;
    }
    Ok(Some(Arc::new(set)))
}

/// Adds every module of `file` to `set`.
pub fn add_file(
    set: &mut LoraSet,
    map: &ModuleMap,
    models: &Models,
    file: &LoraFile,
    adapter: &Adapter,
) -> Result<()> {
    let spec = models.spec;
    let bad = |msg: String| Error::bad_file(&file.path, msg);
    if file.modules.is_empty() {
        return Err(bad("holds no LoRA modules".into()));
    }
    if let Some(family) = other_family(file, spec.text_encoders.len()) {
        return Err(bad(format!(
            "a LoRA for {family}, the model is {} (use a LoRA trained for {})",
            spec.name, spec.name
        )));
    }
    for module in &file.modules {
        let targets = map.find(&module.key);
        let target = match targets[..] {
            [t] => t,
            [] => {
                return Err(bad(format!(
                    "LoRA module `{}` matches no module of this {} model",
                    module.key, spec.name
                )))
            }
            _ => {
                return Err(bad(format!(
                    "LoRA module `{}` names several weights of this model ({}, {})",
                    module.key, targets[0].weight, targets[1].weight
                )))
            }
        };
        let (rows, row_len) = module.form.dims();
        if (rows, row_len) != (target.rows, target.row_len) {
            return Err(bad(format!(
                "LoRA module `{}` is {rows}×{row_len} but the model's `{}` is {}×{}: a LoRA for \
                 another family than {}?",
                module.key, target.weight, target.rows, target.row_len, spec.name
            )));
        }
        let multiplier = match target.part {
            Part::Unet => adapter.unet_multiplier,
            Part::Text(_) => adapter.te_multiplier,
        };
        let term = Term::new(
            target.first_row,
            module.form.clone(),
            module.scale() * multiplier,
        );
        set.insert(&target.weight, term);
    }
    Ok(())
}

/// The family a file's text-encoder keys say it was made for, when the model has another number of
/// text encoders (SDXL's two: `lora_te1_`/`lora_te2_`, `text_encoder_2.`; one: `lora_te_`).
fn other_family(file: &LoraFile, encoders: usize) -> Option<&'static str> {
    let keys = || file.modules.iter().map(|m| m.key.as_str());
    let two = keys().any(|k| {
        k.starts_with("lora_te1_") || k.starts_with("lora_te2_") || k.starts_with("text_encoder_2.")
    });
    let one = keys().any(|k| k.starts_with("lora_te_"));
    match encoders {
        1 if two => Some("SDXL"),
        n if n > 1 && one => Some("SD1.x/SD2.x"),
        _ => None,
    }
}
