//! `sdcap inspect`: what a model file holds (format, family, tensors and bytes per type), read from
//! its header alone.

use std::path::{Path, PathBuf};

use quant::gguf::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::weights::{detect_family, TensorStore};

/// The container a model came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Safetensors,
    Diffusers,
    Gguf,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::Diffusers => "diffusers folder",
            Format::Gguf => "GGUF",
        }
    }
}

/// Tensors and bytes of one element type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TypeTotal {
    #[serde(rename = "type")]
    pub dtype: String,
    pub tensors: usize,
    pub bytes: u64,
}

/// GGUF container facts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GgufFacts {
    pub version: u32,
    pub metadata_entries: u64,
    pub alignment: u64,
}

/// The quick look.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub path: PathBuf,
    pub format: Format,
    /// The family's name: `SD1.x`, `SD2.x`, `SDXL`, or what the model is instead (`Flux`, `unknown`).
    pub family: String,
    /// Whether sdcap runs this family.
    pub supported: bool,
    /// Why not, in one line, when it is not supported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsupported_reason: Option<String>,
    pub tensors: usize,
    /// By type, most bytes first.
    pub types: Vec<TypeTotal>,
    pub total_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gguf: Option<GgufFacts>,
}

/// Opens `path` (safetensors file, diffusers folder or GGUF) and summarises it. An unreadable or
/// malformed model is an error; a readable one of an unsupported family is reported, not refused.
pub fn inspect(path: &Path) -> Result<Report> {
    let store = TensorStore::open(path)?;
    let format = if path.is_dir() {
        Format::Diffusers
    } else if is_gguf(path) {
        Format::Gguf
    } else {
        Format::Safetensors
    };
    let (family, supported, unsupported_reason) = match detect_family(&store) {
        Ok(family) => (family.name().to_string(), true, None),
        Err(Error::UnsupportedModel(reason)) => (family_name(&reason), false, Some(reason)),
        Err(e) => return Err(e),
    };
    let mut types: Vec<TypeTotal> = Vec::new();
    for t in store.tensors() {
        let bytes = store.bytes(t).len() as u64;
        let name = t.dtype.name();
        match types.iter_mut().find(|c| c.dtype == name) {
            Some(c) => {
                c.tensors += 1;
                c.bytes += bytes;
            }
            None => types.push(TypeTotal {
                dtype: name.to_string(),
                tensors: 1,
                bytes,
            }),
        }
    }
    types.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.dtype.cmp(&b.dtype)));
    let gguf = match format {
        Format::Gguf => Some(gguf_facts(path, &store)?),
        _ => None,
    };
    Ok(Report {
        path: path.to_path_buf(),
        format,
        family,
        supported,
        unsupported_reason,
        tensors: store.tensors().len(),
        total_bytes: types.iter().map(|t| t.bytes).sum(),
        types,
        gguf,
    })
}

/// The family named in `detect_family`'s "X is not supported yet (…)" line, else `unknown`. The name is
/// the family's alone: `SD2.x (OpenCLIP text encoder)` and `SD2.x (1024-wide text context)` (how it was
/// recognised) are both `SD2.x`.
fn family_name(reason: &str) -> String {
    match reason.split_once(" is not supported yet") {
        Some((name, _)) if name.starts_with("SD2.x") => "SD2.x".to_string(),
        Some((name, _)) => name.to_string(),
        None if reason.contains("SD1.x UNet takes") => "SD1.x (not text-to-image)".to_string(),
        None => "unknown".to_string(),
    }
}

fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// The version (read from the header: the store does not keep it), metadata count and alignment.
fn gguf_facts(path: &Path, store: &TensorStore) -> Result<GgufFacts> {
    use std::io::Read;
    let mut head = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| Error::bad_file(path, format!("cannot read the GGUF header: {e}")))?;
    let alignment = store
        .metadata()
        .get(ALIGNMENT_KEY)
        .and_then(|v| v.scalar()?.as_u64())
        .unwrap_or(DEFAULT_ALIGNMENT as u64);
    Ok(GgufFacts {
        version: u32::from_le_bytes([head[4], head[5], head[6], head[7]]),
        metadata_entries: store.metadata().len() as u64,
        alignment,
    })
}
