//! The `.safetensors` container: map the file, validate the header, list the tensors.

use std::fs::File;
use std::path::Path;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::DType;
use crate::error::{Error, Result};

/// One tensor as the file lists it; `start`/`len` are absolute byte positions in the mapping.
pub(super) struct RawTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub start: usize,
    pub len: usize,
}

pub(super) fn map(path: &Path) -> Result<(Mmap, Vec<RawTensor>)> {
    let file = File::open(path).map_err(|e| Error::bad_file(path, format!("cannot open: {e}")))?;
    if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(Error::bad_file(
            path,
            "is a directory, not a .safetensors file",
        ));
    }
    // SAFETY: the mapping is read-only and lives as long as the store; a model file modified while
    // we run is outside what we can defend against (same contract as every mmap-based loader).
    let map = unsafe { Mmap::map(&file) }
        .map_err(|e| Error::bad_file(path, format!("cannot map: {e}")))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&map)
        .map_err(|e| Error::bad_file(path, format!("not a valid .safetensors file ({e})")))?;
    let data_start = 8 + header_len;
    let mut tensors = Vec::new();
    for (name, info) in metadata.tensors() {
        let (s, e) = info.data_offsets;
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::I64 => DType::I64,
            Dtype::I32 => DType::I32,
            _ => DType::Other,
        };
        tensors.push(RawTensor {
            name,
            dtype,
            shape: info.shape.clone(),
            start: data_start + s,
            len: e - s,
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((map, tensors))
}
