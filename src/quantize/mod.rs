//! `sdcap quantize`: a model (any `TensorStore` input) → a GGUF file whose weights are GGML block types.
//!
//! Streaming: one tensor at a time is read (in row chunks, as f32), quantized and handed to the GGUF
//! writer, so memory stays around the largest output tensor whatever the model's size. The file is
//! written to a temporary name in the output's directory and renamed into place only when complete.

mod policy;

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use quant::gguf::{shape_metadata, write_gguf, MetaValue, TensorEntry};
use quant::GgmlType;
use rayon::prelude::*;

pub use policy::{parse_rules, Choice, Compat, Policy, Rule, MIN_QUANT_VALUES, TARGET_TYPES};

use crate::atomic_file::{write_atomically, Existing};
use crate::error::{Error, Result};
use crate::weights::{DType, TensorInfo, TensorStore};

/// Tensor data alignment in the file (GGUF's default, as stable-diffusion.cpp writes it).
pub const ALIGNMENT: usize = quant::gguf::DEFAULT_ALIGNMENT;

/// Values converted per task: small enough that the f32 scratch of every thread stays in cache-sized
/// pieces (1 MiB each), large enough to amortise the task.
const CHUNK_VALUES: usize = 1 << 18;

/// One quantization run.
#[derive(Clone, Debug)]
pub struct Request {
    pub input: PathBuf,
    pub output: PathBuf,
    pub policy: Policy,
    /// stable-diffusion.cpp's error-minimising quantizer instead of GGML's reference one.
    pub quality: bool,
    /// Replace an existing output file.
    pub force: bool,
}

/// Progress: tensor `index` of `count` starts; `values_done` of `values_total` are written.
#[derive(Clone, Copy, Debug)]
pub struct Event<'a> {
    pub index: usize,
    pub count: usize,
    pub name: &'a str,
    pub values_done: u64,
    pub values_total: u64,
}

/// One tensor as it will be written.
#[derive(Clone, Debug)]
pub struct Planned {
    /// Index into the store's tensors.
    source: usize,
    pub name: String,
    pub ty: GgmlType,
    /// Written shape, PyTorch order.
    pub shape: Vec<u64>,
    /// Original shape when `shape` is its 2-D flattening.
    pub original_shape: Option<Vec<u64>>,
}

/// Every tensor's fate, in file order (sorted by name, as stable-diffusion.cpp writes).
#[derive(Clone, Debug)]
pub struct Plan {
    pub tensors: Vec<Planned>,
    pub dropped: Vec<String>,
}

/// Tensors and bytes written in one type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeCount {
    pub ty: GgmlType,
    pub tensors: usize,
    pub bytes: u64,
}

/// What a run wrote.
#[derive(Clone, Debug)]
pub struct Summary {
    pub tensors: usize,
    pub dropped: usize,
    /// Flattened conv weights (default policy).
    pub flattened: usize,
    /// By type, most bytes first.
    pub types: Vec<TypeCount>,
    /// Tensor bytes of the input (every tensor, dropped ones included).
    pub input_bytes: u64,
    /// Size of the written file.
    pub output_bytes: u64,
}

/// Decides every tensor's type and shape (no data is read).
pub fn plan(store: &TensorStore, policy: &Policy) -> Result<Plan> {
    let mut order: Vec<usize> = (0..store.tensors().len()).collect();
    order.sort_by(|&a, &b| store.tensors()[a].name.cmp(&store.tensors()[b].name));
    let mut plan = Plan {
        tensors: Vec::new(),
        dropped: Vec::new(),
    };
    for source in order {
        let info = &store.tensors()[source];
        match policy.choose(&info.name, info.dtype, &info.shape)? {
            Choice::Drop => plan.dropped.push(info.name.clone()),
            Choice::Write {
                ty,
                shape,
                flattened,
            } => plan.tensors.push(Planned {
                source,
                name: policy::written_name(policy.compat, &info.name),
                ty,
                // GGML tensors have at least one dim.
                shape: if shape.is_empty() { vec![1] } else { shape },
                original_shape: flattened.then(|| info.shape.iter().map(|&d| d as u64).collect()),
            }),
        }
    }
    Ok(plan)
}

/// The file's metadata: the original shapes of flattened tensors (nothing at all in compat mode,
/// which never flattens).
fn metadata(plan: &Plan) -> Vec<(String, MetaValue)> {
    plan.tensors
        .iter()
        .filter_map(|t| Some(shape_metadata(&t.name, t.original_shape.as_ref()?)))
        .collect()
}

/// Runs a request: checks, plans, writes `output` atomically. `cancelled` is polled between tensors
/// and once more before the file is moved into place; when it says so the run stops with `Error::Interrupted` and leaves no file behind.
pub fn quantize_model(
    req: &Request,
    on_event: &mut dyn FnMut(Event),
    cancelled: &dyn Fn() -> bool,
) -> Result<Summary> {
    let store = TensorStore::open(&req.input)?;
    check_output(req)?;
    let plan = plan(&store, &req.policy)?;

    let existing = if req.force {
        Existing::Replace
    } else {
        Existing::Keep
    };
    let output_bytes = write_atomically(&req.output, existing, |file| {
        write_file(&store, &plan, req.quality, file, on_event, cancelled)
            .map_err(|e| e.into_error(&req.output))?;
        Ok(file.metadata().map(|m| m.len()).unwrap_or(0))
    })?;

    Ok(summarize(&store, &plan, output_bytes))
}

/// Why writing stopped: our own error (a tensor that cannot be read, an interrupt) or the file's.
enum WriteError {
    Lib(Error),
    Io(io::Error),
}

impl WriteError {
    fn into_error(self, output: &Path) -> Error {
        match self {
            WriteError::Lib(e) => e,
            WriteError::Io(source) => Error::Io {
                path: output.to_path_buf(),
                source,
            },
        }
    }
}

/// Streams the GGUF into `file` and syncs it.
fn write_file(
    store: &TensorStore,
    plan: &Plan,
    quality: bool,
    file: &File,
    on_event: &mut dyn FnMut(Event),
    cancelled: &dyn Fn() -> bool,
) -> std::result::Result<(), WriteError> {
    let entries: Vec<TensorEntry> = plan
        .tensors
        .iter()
        .map(|t| TensorEntry {
            name: t.name.clone(),
            ty: t.ty,
            shape: t.shape.clone(),
        })
        .collect();
    let values_total: u64 = plan.tensors.iter().map(|t| numel(&t.shape)).sum();
    let mut values_done = 0;
    // The writer's callback can only return io::Error; our own errors wait here meanwhile.
    let mut failure: Option<Error> = None;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let written = write_gguf(
        &mut out,
        &metadata(plan),
        &entries,
        ALIGNMENT,
        &mut |index, buf| {
            let planned = &plan.tensors[index];
            let stop = |e: Error, failure: &mut Option<Error>| {
                *failure = Some(e);
                io::Error::other("stopped")
            };
            if cancelled() {
                return Err(stop(Error::Interrupted, &mut failure));
            }
            on_event(Event {
                index,
                count: plan.tensors.len(),
                name: &planned.name,
                values_done,
                values_total,
            });
            let info = &store.tensors()[planned.source];
            convert(store, info, planned, quality, buf).map_err(|e| stop(e, &mut failure))?;
            // Keep memory at one tensor, not the whole mapped input (see `TensorStore::release`).
            store.release(&info.name);
            values_done += numel(&planned.shape);
            Ok(())
        },
    );
    if let Some(e) = failure {
        return Err(WriteError::Lib(e));
    }
    written.map_err(WriteError::Io)?;
    out.flush().map_err(WriteError::Io)?;
    drop(out);
    file.sync_all().map_err(WriteError::Io)?;
    // A signal during the last tensor (or the sync) arrived after the last check between tensors:
    // it still stops the run before the file is moved into place.
    if cancelled() {
        return Err(WriteError::Lib(Error::Interrupted));
    }
    Ok(())
}

fn numel(shape: &[u64]) -> u64 {
    shape.iter().product()
}

/// Whether a stored tensor already holds `ty`'s bytes (then they are copied, not re-encoded: a GGUF
/// re-quantized to its own type loses nothing).
fn same_type(dtype: DType, ty: GgmlType) -> bool {
    match dtype {
        DType::F32 => ty == GgmlType::F32,
        DType::F16 => ty == GgmlType::F16,
        DType::BF16 => ty == GgmlType::BF16,
        DType::Quant(q) => q == ty,
        _ => false,
    }
}

/// Appends tensor `info` encoded as `planned.ty` to `out`: row chunks are read as f32 and quantized
/// in parallel, each into its own slice of the output (the bytes do not depend on the split).
fn convert(
    store: &TensorStore,
    info: &TensorInfo,
    planned: &Planned,
    quality: bool,
    out: &mut Vec<u8>,
) -> Result<()> {
    if same_type(info.dtype, planned.ty) {
        out.extend_from_slice(store.bytes(info));
        return Ok(());
    }
    let ty = planned.ty;
    let values = info.numel();
    if values == 0 {
        return Ok(());
    }
    let bytes = ty
        .bytes_for(values as u64)
        .and_then(|b| usize::try_from(b).ok())
        .expect("the plan only picks types whose blocks fit");
    let start = out.len();
    out.resize(start + bytes, 0);
    let dst = &mut out[start..];

    // GGML's ne0: the row the quality quantizer takes its statistics over.
    let row_len = *planned.shape.last().expect("at least one dim") as usize;
    // Chunks of whole rows; a block-type source is read on its block boundaries, which whole rows
    // keep unless a row is not whole source blocks (then the tensor is one chunk).
    let rows_per_chunk = if row_len.is_multiple_of(info.dtype.block_elems()) {
        (CHUNK_VALUES / row_len).max(1)
    } else {
        values / row_len
    };
    let chunk_values = (rows_per_chunk * row_len).min(values);
    let chunk_bytes = ty
        .bytes_for(chunk_values as u64)
        .expect("whole rows are whole blocks") as usize;
    dst.par_chunks_mut(chunk_bytes)
        .enumerate()
        .try_for_each(|(i, dst)| {
            let first = i * chunk_values;
            let n = chunk_values.min(values - first);
            let mut scratch = vec![0.0f32; n];
            store.read_f32_range(info, first, &mut scratch)?;
            if quality {
                quant::quantize_quality_rows(ty, &scratch, row_len, dst);
            } else {
                quant::quantize(ty, &scratch, dst);
            }
            Ok(())
        })
}

fn summarize(store: &TensorStore, plan: &Plan, output_bytes: u64) -> Summary {
    let mut types: Vec<TypeCount> = Vec::new();
    for t in &plan.tensors {
        let bytes = t.ty.bytes_for(numel(&t.shape)).unwrap_or(0);
        match types.iter_mut().find(|c| c.ty == t.ty) {
            Some(c) => {
                c.tensors += 1;
                c.bytes += bytes;
            }
            None => types.push(TypeCount {
                ty: t.ty,
                tensors: 1,
                bytes,
            }),
        }
    }
    types.sort_by_key(|t| std::cmp::Reverse(t.bytes));
    Summary {
        tensors: plan.tensors.len(),
        dropped: plan.dropped.len(),
        flattened: plan
            .tensors
            .iter()
            .filter(|t| t.original_shape.is_some())
            .count(),
        types,
        input_bytes: store
            .tensors()
            .iter()
            .map(|t| store.bytes(t).len() as u64)
            .sum(),
        output_bytes,
    }
}

/// Refuses an output that is not a regular file (a directory, a device, a FIFO; a link is followed),
/// lies in a missing directory, exists (without `force`), or is the input itself.
fn check_output(req: &Request) -> Result<()> {
    let out = &req.output;
    let target = crate::atomic_file::resolve_target(out)?;
    if fs::symlink_metadata(&target).is_err() {
        return Ok(());
    }
    if same_file(&req.input, &target) {
        return Err(Error::BadRequest(format!(
            "output {} is the input model; write to another file",
            out.display()
        )));
    }
    if !req.force {
        return Err(Error::BadRequest(format!(
            "output {} already exists (pass --force to replace it)",
            out.display()
        )));
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
