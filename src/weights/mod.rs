//! Model files → a `TensorStore` of zero-copy tensor views over memory-mapped files.
//!
//! Every network finds its weights by LDM key name (`model.diffusion_model.…`, `first_stage_model.…`,
//! `cond_stage_model.transformer.text_model.…`), whatever layout the file on disk used.

mod diffusers;
mod family;
mod gguf;
pub mod key_map;
mod residency;
mod safetensors_file;
mod vae_file;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use rayon::prelude::*;

pub use family::{detect_family, detect_prediction, sd1_dims, Family, PredictionSource, Sd1Dims};
pub use quant::gguf::{MetaRef, MetaValue, Metadata};
pub use residency::Reader;
use safetensors_file::RawTensor;

use crate::error::{Error, Result};

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    I64,
    I32,
    /// A GGML block type (q8_0, q4_0, q4_K, …) from a GGUF file: values come in blocks with scales.
    Quant(quant::GgmlType),
    /// A type we can list but not compute with (e.g. F8, U8 in a checkpoint's extras).
    Other,
}

impl DType {
    /// Bytes per element, None for block types and `Other`.
    pub fn size_bytes(self) -> Option<usize> {
        match self {
            DType::F32 | DType::I32 => Some(4),
            DType::F16 | DType::BF16 => Some(2),
            DType::I64 => Some(8),
            DType::Quant(_) | DType::Other => None,
        }
    }

    /// Bytes of `n` consecutive values (whole blocks for block types), None if not representable.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        match self {
            DType::Quant(ty) => ty.bytes_for(n as u64).and_then(|b| usize::try_from(b).ok()),
            other => other.size_bytes().and_then(|s| s.checked_mul(n)),
        }
    }

    /// Values that must be read together (the block size; 1 for plain types).
    pub fn block_elems(self) -> usize {
        match self {
            DType::Quant(ty) => ty.info().block_elems,
            _ => 1,
        }
    }

    /// Whether networks can take weights of this type.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F32 | DType::F16 | DType::BF16 | DType::Quant(_)
        )
    }

    /// Short name as users see it (`f16`, `q4_0`, …).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::Quant(ty) => ty.name(),
            DType::Other => "other",
        }
    }
}

/// Where one tensor lives: which mapped file, which byte range.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    source: usize,
    start: usize,
    len: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct Source {
    path: PathBuf,
    map: Mmap,
}

/// All tensors of a model, mapped, addressed by LDM key name.
pub struct TensorStore {
    sources: Vec<Source>,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    /// GGUF metadata, over the mapping of `sources[0]` (values decoded on use).
    metadata: Vec<quant::gguf::MetaEntry>,
    /// Bytes of the GGUF file before its tensor data, read while parsing.
    metadata_header_bytes: usize,
    /// A single-file safetensors checkpoint's `__metadata__` string pairs.
    header_metadata: Vec<(String, String)>,
}

/// A model path must be a regular file or a directory (links followed). Checked before anything is
/// opened: opening a FIFO for reading would block until a writer comes, a device could be endless.
pub fn check_model_path(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() && !meta.is_dir() => {
            Err(Error::bad_file(path, "not a regular file or directory"))
        }
        // A missing file is reported by the opener, in its words.
        _ => Ok(()),
    }
}

impl TensorStore {
    /// Opens a model: a single-file `.safetensors` checkpoint in the LDM layout, a GGUF file (found by
    /// its magic or a `.gguf` name; LDM names, as stable-diffusion.cpp writes them), or a diffusers
    /// pipeline folder (`unet/`, `vae/`, `text_encoder/`) whose names are mapped to the LDM ones.
    pub fn open(path: &Path) -> Result<Self> {
        check_model_path(path)?;
        if path.is_dir() {
            return diffusers::open(path);
        }
        if gguf::is_gguf(path) {
            let (map, parsed) = gguf::map(path)?;
            let entries = rename_all(path, parsed.tensors, |name| {
                Ok(Some(key_map::ldm_key(name)))
            })?;
            let mut store = TensorStore::empty();
            store.add_source(path, map, entries)?;
            store.metadata = parsed.metadata;
            store.metadata_header_bytes = parsed.header_bytes;
            return Ok(store);
        }
        let (map, raws) = safetensors_file::map(path)?;
        let entries = rename_all(path, raws, |name| Ok(Some(key_map::ldm_key(name))))?;
        let mut store = TensorStore::empty();
        store.header_metadata = safetensors_file::header_metadata(&map);
        store.add_source(path, map, entries)?;
        Ok(store)
    }

    /// Replaces the model's VAE (`first_stage_model.*`) with the one in `path`: a standalone VAE file
    /// (LDM keys `encoder.*`/`decoder.*`/`quant_conv.*`/`post_quant_conv.*`, as users download them),
    /// a checkpoint's `first_stage_model.*` tensors, or a diffusers VAE (file, `vae/` folder or pipeline folder).
    pub fn with_vae(self, path: &Path) -> Result<Self> {
        check_model_path(path)?;
        vae_file::replace_vae(self, path)
    }

    fn empty() -> Self {
        TensorStore {
            sources: Vec::new(),
            tensors: Vec::new(),
            index: HashMap::new(),
            metadata: Vec::new(),
            metadata_header_bytes: 0,
            header_metadata: Vec::new(),
        }
    }

    /// A single-file safetensors checkpoint's `__metadata__` string pairs (empty for other containers).
    pub fn metadata_strings(&self) -> &[(String, String)] {
        &self.header_metadata
    }

    /// The key/value metadata of a GGUF model, in file order (empty for other containers).
    pub fn metadata(&self) -> Metadata<'_> {
        match self.sources.first() {
            Some(source) if !self.metadata.is_empty() => Metadata::new(&self.metadata, &source.map),
            _ => Metadata::new(&[], &[]),
        }
    }

    /// What the metadata keeps resident for the life of the store: its entries (a few words each,
    /// whatever the values hold) and the file's header pages, read while parsing. O(file bytes)
    /// at most; the plan charges it to every stage.
    pub fn metadata_bytes(&self) -> u64 {
        let entries = self.metadata.capacity() * std::mem::size_of::<quant::gguf::MetaEntry>();
        (entries + self.metadata_header_bytes) as u64
    }

    /// Adds the tensors of one mapped file under the given names. Two tensors of one file may not share a
    /// name; a tensor from a later file replaces an earlier file's tensor of the same name.
    fn add_source(
        &mut self,
        path: &Path,
        map: Mmap,
        entries: Vec<(String, RawTensor)>,
    ) -> Result<()> {
        let source = self.sources.len();
        self.sources.push(Source {
            path: path.to_path_buf(),
            map,
        });
        for (name, raw) in entries {
            let info = TensorInfo {
                name: name.clone(),
                dtype: raw.dtype,
                shape: raw.shape,
                source,
                start: raw.start,
                len: raw.len,
            };
            match self.index.get(&name) {
                Some(&i) if self.tensors[i].source == source => {
                    return Err(Error::bad_file(
                        path,
                        format!(
                            "two tensors both stand for `{name}` (one is `{}`)",
                            raw.name
                        ),
                    ))
                }
                Some(&i) => self.tensors[i] = info,
                None => {
                    self.index.insert(name, self.tensors.len());
                    self.tensors.push(info);
                }
            }
        }
        Ok(())
    }

    /// Drops every tensor whose name satisfies `drop` (the mapping stays; its pages are never touched).
    fn remove_where(&mut self, drop: impl Fn(&str) -> bool) {
        self.tensors.retain(|t| !drop(&t.name));
        self.index = self
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The raw little-endian bytes of a tensor, straight from the mapping.
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.sources[info.source].map[info.start..info.start + info.len]
    }

    /// The files this store maps, in the order they were added.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.sources.iter().map(|s| s.path.as_path())
    }

    /// The file a tensor came from (for error messages).
    pub fn path_of(&self, info: &TensorInfo) -> &Path {
        &self.sources[info.source].path
    }

    /// Converts a tensor to f32 into `out` (len = numel). Integer tensors are converted by value.
    pub fn read_f32(&self, info: &TensorInfo, out: &mut [f32]) -> Result<()> {
        assert_eq!(out.len(), info.numel());
        self.read_f32_range(info, 0, out)
    }

    /// Converts values `first .. first + out.len()` (C order) of a tensor to f32. For block types
    /// both ends must fall on block boundaries.
    pub fn read_f32_range(&self, info: &TensorInfo, first: usize, out: &mut [f32]) -> Result<()> {
        assert!(
            first + out.len() <= info.numel(),
            "range past the end of `{}`",
            info.name
        );
        let block = info.dtype.block_elems();
        assert!(
            first.is_multiple_of(block) && out.len().is_multiple_of(block),
            "`{}`: range not on {block}-value block boundaries",
            info.name
        );
        let all = self.bytes(info);
        let (start, len) = match (info.dtype.bytes_for(first), info.dtype.bytes_for(out.len())) {
            (Some(s), Some(l)) => (s, l),
            _ => (0, 0),
        };
        let bytes = &all[start..start + len];
        match info.dtype {
            DType::Quant(ty) => quant::dequantize(ty, bytes, out),
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::F16 => f16_to_f32(bytes, out),
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::I64 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                    *o = i64::from_le_bytes(c.try_into().expect("8-byte chunk")) as f32;
                }
            }
            DType::I32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = i32::from_le_bytes(c.try_into().expect("4-byte chunk")) as f32;
                }
            }
            DType::Other => {
                return Err(Error::bad_file(
                    self.path_of(info),
                    format!(
                        "tensor `{}` has an element type sdcap cannot compute with",
                        info.name
                    ),
                ))
            }
        }
        Ok(())
    }
}

/// Little-endian f16 bytes to f32: 8 values per instruction with F16C where the CPU has it (the
/// mapping's bytes loaded unaligned, no staging copy), else `half` value by value. Conversion is
/// exact either way, so both give the same values. Value by value it was a sixth of a UNet step's
/// CPU time, staged through an aligned buffer still about 6% (benches/PROFILE.md).
fn f16_to_f32(bytes: &[u8], out: &mut [f32]) {
    assert!(bytes.len() >= 2 * out.len(), "f16 bytes");
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("f16c") && std::is_x86_feature_detected!("avx") {
        // SAFETY: F16C and AVX were detected just above.
        return unsafe { f16_to_f32_f16c(bytes, out) };
    }
    f16_to_f32_scalar(bytes, out);
}

fn f16_to_f32_scalar(bytes: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_to_f32_f16c(bytes: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let whole = out.len() / 8 * 8;
    for (o, b) in out[..whole].chunks_exact_mut(8).zip(bytes.chunks_exact(16)) {
        // SAFETY: `b` is 16 bytes and `o` 8 f32, both accessed unaligned.
        unsafe {
            let halves = _mm_loadu_si128(b.as_ptr().cast::<__m128i>());
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_cvtph_ps(halves));
        }
    }
    f16_to_f32_scalar(&bytes[2 * whole..], &mut out[whole..]);
}

/// One weight tensor of a network: a handle into the shared store, checked for shape when built. It
/// may be a range of the stored tensor's outer rows (`row_range`: a fused q/k/v weight read as three
/// matrices), still read straight from the mapping.
#[derive(Clone)]
pub struct Param {
    store: Arc<TensorStore>,
    index: usize,
    /// Set for a row range only (boxed, so that whole params, nearly all of them, stay three words).
    range: Option<Box<RowRange>>,
}

#[derive(Clone)]
struct RowRange {
    /// The stored tensor's outer row the range starts at.
    first_row: usize,
    /// The stored tensor's shape with only the range's outer rows.
    shape: Vec<usize>,
}

impl Param {
    fn whole(store: Arc<TensorStore>, index: usize) -> Param {
        Param {
            store,
            index,
            range: None,
        }
    }

    /// The stored tensor's outer row this param starts at (0 unless it is a row range).
    pub fn first_row(&self) -> usize {
        self.range.as_ref().map_or(0, |r| r.first_row)
    }

    /// The stored tensor this param reads (all of it, also for a row range).
    pub fn info(&self) -> &TensorInfo {
        &self.store.tensors[self.index]
    }

    pub fn shape(&self) -> &[usize] {
        match &self.range {
            Some(range) => &range.shape,
            None => &self.info().shape,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape().iter().product()
    }

    /// Outer rows (the first dimension: output features or output channels).
    pub fn rows(&self) -> usize {
        self.shape().first().copied().unwrap_or(1)
    }

    /// Values per outer row.
    pub fn row_len(&self) -> usize {
        self.numel() / self.rows().max(1)
    }

    /// Outer rows `first .. first + count` of this param as a param of their own, reading the same
    /// mapping (nothing is copied): e.g. the q, k and v thirds of open_clip's fused `in_proj_weight`.
    /// For a GGML block type the range must start and end on block boundaries (always true for a
    /// matrix, whose rows are whole blocks; a 1-D tensor's rows are single values).
    pub fn row_range(&self, first: usize, count: usize) -> Result<Param> {
        let info = self.info();
        let (row_len, block) = (self.row_len(), info.dtype.block_elems());
        let within = !self.shape().is_empty()
            && first
                .checked_add(count)
                .is_some_and(|end| end <= self.rows());
        let whole_blocks = ((self.first_row() + first) * row_len).is_multiple_of(block)
            && (count * row_len).is_multiple_of(block);
        if !(within && whole_blocks) {
            return Err(Error::bad_file(
                self.store.path_of(info),
                format!(
                    "weight `{}` {:?} cannot be read as rows {first}..{} ({} values per {} block)",
                    info.name,
                    self.shape(),
                    first.saturating_add(count),
                    block,
                    info.dtype.name()
                ),
            ));
        }
        let mut shape = self.shape().to_vec();
        shape[0] = count;
        Ok(Param {
            store: self.store.clone(),
            index: self.index,
            range: Some(Box::new(RowRange {
                first_row: self.first_row() + first,
                shape,
            })),
        })
    }

    /// Rows `first .. first + count` as f32 into `out` (count · row_len values): the panel read that
    /// lets matmul consume quantized weights without ever expanding a whole tensor.
    pub fn read_rows(&self, first: usize, count: usize, out: &mut [f32]) {
        let row_len = self.row_len();
        assert_eq!(out.len(), count * row_len);
        assert!(
            first + count <= self.rows(),
            "rows past the end of `{}`",
            self.info().name
        );
        let first = self.first_row() + first;
        // Conversion is exact, so splitting it over threads cannot change a value; done serially it
        // was a third of a UNet step's single-threaded time (benches/PROFILE.md). Rows of a
        // multi-row tensor are whole blocks (checked in `Weights::param_any`).
        const ROWS_PER_TASK_VALUES: usize = 1 << 16;
        let rows_per_task = (ROWS_PER_TASK_VALUES / row_len.max(1)).max(1);
        let info = self.info();
        if count <= rows_per_task || self.shape().len() < 2 {
            self.store
                .read_f32_range(info, first * row_len, out)
                .expect("param dtype checked at build time");
            return;
        }
        out.par_chunks_mut(rows_per_task * row_len)
            .enumerate()
            .for_each(|(i, chunk)| {
                self.store
                    .read_f32_range(info, (first + i * rows_per_task) * row_len, chunk)
                    .expect("param dtype checked at build time");
            });
    }

    /// The stored bytes of rows `first .. first + count` (a matrix's rows are whole blocks) with
    /// their type, straight from the mapping: for kernels that read GGML blocks directly.
    pub fn stored_rows(&self, first: usize, count: usize) -> Option<(DType, &[u8])> {
        let info = self.info();
        let row_len = self.row_len();
        if self.shape().len() < 2 || first + count > self.rows() {
            return None;
        }
        let start = info.dtype.bytes_for((self.first_row() + first) * row_len)?;
        let len = info.dtype.bytes_for(count * row_len)?;
        Some((info.dtype, &self.store.bytes(info)[start..start + len]))
    }

    /// The weight as f32 values (a transient copy; the mapping stays the only resident form). For
    /// small tensors (biases, norms); matrices are read in panels with `read_rows`.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.numel()];
        // Params are only built for computable dtypes (checked in `Weights::param`), row ranges on
        // block boundaries (`row_range`).
        self.store
            .read_f32_range(self.info(), self.first_row() * self.row_len(), &mut out)
            .expect("param dtype checked at build time");
        out
    }
}

/// A key prefix into the store, like a path: `weights.pp("norm1").param("weight", &[c])`.
#[derive(Clone)]
pub struct Weights {
    store: Arc<TensorStore>,
    prefix: String,
}

impl Weights {
    pub fn new(store: Arc<TensorStore>, prefix: &str) -> Self {
        Weights {
            store,
            prefix: prefix.to_string(),
        }
    }

    /// The sub-prefix `self.prefix + "." + name` (no dot for an empty prefix).
    pub fn pp(&self, name: impl AsRef<str>) -> Weights {
        Weights {
            store: self.store.clone(),
            prefix: self.key(name.as_ref()),
        }
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.key(name))
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The tensor `name` under this prefix, which must have exactly `shape`.
    pub fn param(&self, name: &str, shape: &[usize]) -> Result<Param> {
        let param = self.param_any(name)?;
        if param.shape() != shape {
            // A 1x1 conv stored as a linear weight (or the reverse) holds the same numbers.
            let same_numel = param.numel() == shape.iter().product::<usize>();
            let squeezed = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
            if !(same_numel && squeezed(param.shape()) == squeezed(shape)) {
                return Err(Error::BadShape {
                    name: self.key(name),
                    found: param.shape().to_vec(),
                    expected: shape.to_vec(),
                });
            }
        }
        Ok(param)
    }

    /// The tensor `name` under this prefix, any shape (the caller reads the shape).
    pub fn param_any(&self, name: &str) -> Result<Param> {
        let key = self.key(name);
        let index = *self
            .store
            .index
            .get(&key)
            .ok_or_else(|| Error::MissingTensor(key.clone()))?;
        let info = &self.store.tensors[index];
        if !info.dtype.is_float() {
            return Err(Error::bad_file(
                self.store.path_of(info),
                format!(
                    "weight `{key}` has type {}; expected a float or GGML block type",
                    info.dtype.name()
                ),
            ));
        }
        // Panels are read by outer row, so each row of a block type must be whole blocks (a 1-D
        // tensor is read whole).
        let row_len = info.numel() / info.shape.first().copied().unwrap_or(1).max(1);
        if info.shape.len() > 1 && !row_len.is_multiple_of(info.dtype.block_elems()) {
            return Err(Error::bad_file(
                self.store.path_of(info),
                format!(
                    "weight `{key}` {:?} has rows of {row_len} values, not whole {}-value {} blocks",
                    info.shape,
                    info.dtype.block_elems(),
                    info.dtype.name()
                ),
            ));
        }
        Ok(Param::whole(self.store.clone(), index))
    }
}

/// Pairs each raw tensor with the name the store will know it by (`rename` → None skips the tensor).
fn rename_all(
    path: &Path,
    raws: Vec<RawTensor>,
    mut rename: impl FnMut(&str) -> std::result::Result<Option<String>, String>,
) -> Result<Vec<(String, RawTensor)>> {
    let mut out = Vec::with_capacity(raws.len());
    for raw in raws {
        match rename(&raw.name) {
            Ok(Some(name)) => out.push((name, raw)),
            Ok(None) => {}
            Err(msg) => return Err(Error::bad_file(path, msg)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store of one GGUF file holding `w` [6, 64] q8_0 (rows of two blocks) and `b` [96] q8_0,
    /// and the f32 values they dequantize to.
    fn q8_store(dir: &Path) -> (Arc<TensorStore>, Vec<f32>, Vec<f32>) {
        use quant::gguf::{write_gguf, TensorEntry};
        use quant::GgmlType;
        let values = |n: usize| {
            (0..n)
                .map(|i| (i as f32 * 0.37).sin() * 3.0)
                .collect::<Vec<_>>()
        };
        let (w, b) = (values(6 * 64), values(96));
        let quantized = |v: &[f32]| {
            let mut out = vec![0u8; GgmlType::Q8_0.bytes_for(v.len() as u64).unwrap() as usize];
            quant::quantize(GgmlType::Q8_0, v, &mut out);
            out
        };
        let data = [quantized(&w), quantized(&b)];
        let entry = |name: &str, shape: Vec<u64>| TensorEntry {
            name: name.into(),
            ty: GgmlType::Q8_0,
            shape,
        };
        let path = dir.join("rows.gguf");
        let mut file = std::fs::File::create(&path).unwrap();
        let entries = [entry("w", vec![6, 64]), entry("b", vec![96])];
        write_gguf(&mut file, &[], &entries, 32, &mut |i, buf| {
            buf.extend_from_slice(&data[i]);
            Ok(())
        })
        .unwrap();
        let store = Arc::new(TensorStore::open(&path).unwrap());
        let dequantized = |name: &str| {
            let info = store.get(name).unwrap();
            let mut out = vec![0.0; info.numel()];
            store.read_f32(info, &mut out).unwrap();
            out
        };
        let (w, b) = (dequantized("w"), dequantized("b"));
        (store, w, b)
    }

    /// A row range reads exactly the stored tensor's rows (block rows as a byte range), reports the
    /// range's shape, nests, and refuses ranges past the end or across a block.
    #[test]
    fn a_row_range_reads_the_stored_rows_without_a_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (store, w_all, b_all) = q8_store(dir.path());
        let weights = Weights::new(store, "");
        let w = weights.param_any("w").unwrap();
        let middle = w.row_range(2, 3).unwrap();
        assert_eq!(middle.shape(), [3, 64]);
        assert_eq!(
            (middle.rows(), middle.row_len(), middle.numel()),
            (3, 64, 192)
        );
        assert_eq!(middle.to_f32(), w_all[2 * 64..5 * 64]);
        let mut row = vec![0.0; 64];
        middle.read_rows(1, 1, &mut row);
        assert_eq!(row, w_all[3 * 64..4 * 64]);
        let last = middle.row_range(2, 1).unwrap();
        assert_eq!(last.to_f32(), w_all[4 * 64..5 * 64]);
        assert_eq!(last.info().name, "w");

        let b = weights.param_any("b").unwrap();
        let third = b.row_range(64, 32).unwrap();
        assert_eq!(third.shape(), [32]);
        assert_eq!(third.to_f32(), b_all[64..]);

        for (param, first, count) in [
            (&w, 4, 3),
            (&w, 7, 0),
            (&middle, 0, 4),
            (&b, 16, 32),
            (&b, 32, 16),
        ] {
            let err = param.row_range(first, count).err().expect("refused");
            assert_eq!(err.exit_code(), 2);
            assert!(
                err.to_string().contains(&format!("rows {first}..")),
                "{err}"
            );
        }
    }

    /// Every f16 bit pattern (normals, subnormals, infinities, NaNs) converts to `half`'s value,
    /// read at an odd byte offset (mapped tensor data need not be aligned) with a tail shorter
    /// than one 8-value vector. NaNs are compared by bits.
    #[test]
    fn f16_conversion_equals_half_for_every_value_unaligned() {
        let mut bytes = vec![0u8];
        bytes.extend((0..=u16::MAX).flat_map(|v| v.to_le_bytes()));
        bytes.extend([0x00, 0x3c, 0x00, 0xc0, 0x01, 0x00]); // 1, −2, the smallest subnormal
        let n = (bytes.len() - 1) / 2;
        assert_eq!(n % 8, 3);
        let mut got = vec![0.0f32; n];
        f16_to_f32(&bytes[1..], &mut got);
        for (i, (g, c)) in got.iter().zip(bytes[1..].chunks_exact(2)).enumerate() {
            let want = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            assert_eq!(g.to_bits(), want.to_bits(), "value {i}");
        }
    }
}
