//! The GGUF container (v2 and v3, little-endian; ggml `docs/gguf.md`): map the file, validate the
//! header, list the tensors.
//!
//! Every count and length the file states is checked against the bytes that remain before it is
//! used: a claimed count is capped by what the rest of the file could hold (each entry takes at least
//! a known number of bytes), so nothing is allocated in proportion to a number the file merely
//! claims, and all offset arithmetic is checked. Metadata values are validated but not decoded:
//! strings and arrays stay in the mapping as byte ranges (`quant::gguf::MetaItem`), so what the
//! metadata costs is a few words per entry, whatever its values hold.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;
use quant::gguf::{
    MetaEntry, MetaItem, MetaValue, Metadata, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAX_DIMS,
    SHAPE_KEY_PREFIX,
};
use quant::GgmlType;

use super::safetensors_file::RawTensor;
use super::DType;
use crate::error::{Error, Result};

const NOT_GGUF: &str = "not a valid GGUF file";
/// Nested metadata arrays deeper than this are refused (recursion depth stays small whatever the file).
const MAX_ARRAY_DEPTH: usize = 8;
/// Rank limit for a `sdcap.shape.*` entry.
const MAX_LOGICAL_RANK: usize = 8;
/// Smallest possible key/value pair (empty key, value type, one-byte value) and tensor info (empty name,
/// n_dims = 0, type, offset): the caps on claimed counts.
const MIN_KV_BYTES: usize = 8 + 4 + 1;
const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 4 + 8;

/// Metadata and tensors of one GGUF file; tensor ranges are absolute positions in the mapping.
pub(super) struct Parsed {
    pub metadata: Vec<MetaEntry>,
    /// Bytes before the tensor data (header, metadata, tensor infos): read while parsing, so
    /// resident as mapped pages.
    pub header_bytes: usize,
    pub tensors: Vec<RawTensor>,
}

/// Whether `path` is a GGUF file: it starts with the magic, or is named `*.gguf` (so that a broken one
/// is reported as a broken GGUF file, not as a broken .safetensors file).
pub(super) fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let named = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let mut magic = [0u8; 4];
    let has_magic = File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF";
    named || has_magic
}

/// Maps `path` and lists its tensors in the order of the file's tensor infos.
pub(super) fn map(path: &Path) -> Result<(Mmap, Parsed)> {
    let bad = |msg: String| Error::bad_file(path, msg);
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => bad("no such file or folder".to_string()),
        _ => bad(format!("cannot open: {e}")),
    })?;
    let len = file
        .metadata()
        .map_err(|e| bad(format!("cannot read file metadata: {e}")))?
        .len();
    if len == 0 {
        return Err(bad(format!("{NOT_GGUF}: the file is empty")));
    }
    // SAFETY: read-only mapping owned by the store; a file changed under us while we run is outside
    // what any mmap-based loader can defend against.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| bad(format!("cannot map: {e}")))?;
    let parsed = parse(&map).map_err(|reason| bad(format!("{NOT_GGUF}: {reason}")))?;
    Ok((map, parsed))
}

/// Validates a whole GGUF image and lists its tensors.
fn parse(bytes: &[u8]) -> std::result::Result<Parsed, String> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic = c.take(4, "the magic")?;
    if magic != b"GGUF" {
        return Err(format!(
            "bad magic {magic:02x?} (a GGUF file starts with `GGUF`)"
        ));
    }
    let version = c.u32("the version")?;
    if version != 2 && version != 3 {
        let hint = if version.swap_bytes() <= 3 {
            " (a big-endian file?)"
        } else {
            ""
        };
        return Err(format!(
            "version {version}{hint}; sdcap reads versions 2 and 3"
        ));
    }
    let n_tensors = c.u64("the tensor count")?;
    let n_kv = c.u64("the metadata count")?;
    let n_kv = c.cap(n_kv, MIN_KV_BYTES, "metadata entries")?;

    let mut metadata = Vec::with_capacity(n_kv);
    let mut keys = HashSet::with_capacity(n_kv);
    for _ in 0..n_kv {
        let key_start = c.pos + 8;
        let key = c.str("a metadata key")?;
        if !keys.insert(key) {
            return Err(format!("metadata key `{}` appears twice", shown(key)));
        }
        let what = format!("the value of `{}`", shown(key));
        let ty = c.u32(&what)?;
        let value = c.item(ty, &what)?;
        metadata.push(MetaEntry {
            key_start,
            key_len: key.len(),
            value,
        });
    }
    drop(keys);
    let metadata_view = Metadata::new(&metadata, bytes);
    let alignment = alignment(metadata_view)?;

    let n_tensors = c.cap(n_tensors, MIN_TENSOR_INFO_BYTES, "tensor infos")?;
    let mut infos = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        infos.push(c.tensor_info()?);
    }
    let data_start = c.pos.next_multiple_of(alignment);
    let mut tensors = Vec::with_capacity(infos.len());
    let mut index = HashMap::with_capacity(infos.len());
    for info in infos {
        let raw = locate(info, data_start, alignment, bytes.len())?;
        if index.insert(raw.name.clone(), tensors.len()).is_some() {
            return Err(format!("tensor `{}` is listed twice", shown(&raw.name)));
        }
        tensors.push(raw);
    }
    check_overlaps(&tensors)?;
    apply_logical_shapes(metadata_view, &mut tensors, &index)?;
    Ok(Parsed {
        metadata,
        header_bytes: data_start.min(bytes.len()),
        tensors,
    })
}

/// `general.alignment`: a u32 power of two; 32 when absent.
fn alignment(metadata: Metadata) -> std::result::Result<usize, String> {
    let Some(value) = metadata.get(ALIGNMENT_KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match value.scalar() {
        Some(MetaValue::U32(a)) if a.is_power_of_two() => Ok(*a as usize),
        Some(MetaValue::U32(a)) => {
            Err(format!("{ALIGNMENT_KEY} is {a}; it must be a power of two"))
        }
        _ => Err(format!(
            "{ALIGNMENT_KEY} has value type {}; it must be a u32",
            value.type_id()
        )),
    }
}

struct TensorHeader<'a> {
    name: &'a str,
    /// ggml `ne`: innermost first.
    dims: Vec<u64>,
    ty: GgmlType,
    offset: u64,
}

/// Checks one tensor's shape, type and offset against the file and turns it into a byte range.
fn locate(
    t: TensorHeader,
    data_start: usize,
    alignment: usize,
    file_len: usize,
) -> std::result::Result<RawTensor, String> {
    let name = shown(t.name);
    let block = t.ty.info().block_elems as u64;
    let ne0 = t.dims.first().copied().unwrap_or(1);
    if !ne0.is_multiple_of(block) {
        return Err(format!(
            "tensor `{name}` dims {:?}: the innermost dim {ne0} is not whole {block}-value {} blocks",
            t.dims,
            t.ty.name()
        ));
    }
    let numel = t.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
    let size = numel
        .and_then(|n| t.ty.bytes_for(n))
        .and_then(|s| usize::try_from(s).ok())
        .ok_or_else(|| format!("tensor `{name}` dims {:?} overflow", t.dims))?;
    if !t.offset.is_multiple_of(alignment as u64) {
        return Err(format!(
            "tensor `{name}` data offset {} is not a multiple of the alignment {alignment}",
            t.offset
        ));
    }
    let start = usize::try_from(t.offset)
        .ok()
        .and_then(|o| o.checked_add(data_start));
    match start.and_then(|s| s.checked_add(size)) {
        Some(end) if end <= file_len => {}
        _ => {
            return Err(format!(
                "tensor `{name}` ({size} bytes at data offset {}) runs past the end of the file ({file_len} bytes, \
                 data from byte {data_start}): the file is truncated or its offsets are wrong",
                t.offset
            ))
        }
    }
    let shape = t.dims.iter().rev().map(|&d| d as usize).collect();
    Ok(RawTensor {
        name: t.name.to_string(),
        dtype: match t.ty {
            GgmlType::F32 => DType::F32,
            GgmlType::F16 => DType::F16,
            GgmlType::BF16 => DType::BF16,
            ty => DType::Quant(ty),
        },
        shape,
        start: start.expect("checked above"),
        len: size,
    })
}

fn check_overlaps(tensors: &[RawTensor]) -> std::result::Result<(), String> {
    let mut order: Vec<&RawTensor> = tensors.iter().filter(|t| t.len > 0).collect();
    order.sort_by_key(|t| t.start);
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if b.start < a.start + a.len {
            return Err(format!(
                "tensor `{}` data [{}, {}) overlaps tensor `{}` [{}, {})",
                shown(&b.name),
                b.start,
                b.start + b.len,
                shown(&a.name),
                a.start,
                a.start + a.len
            ));
        }
    }
    Ok(())
}

/// `sdcap.shape.<name>` gives a tensor its PyTorch shape back (same values in the same C order).
fn apply_logical_shapes(
    metadata: Metadata,
    tensors: &mut [RawTensor],
    index: &HashMap<String, usize>,
) -> std::result::Result<(), String> {
    for (key, value) in metadata.iter() {
        let Some(name) = key.strip_prefix(SHAPE_KEY_PREFIX) else {
            continue;
        };
        let key = shown(key);
        let tensor = index
            .get(name)
            .map(|&i| &mut tensors[i])
            .ok_or_else(|| format!("`{key}` names no tensor in the file"))?;
        let dims = value
            .u64_array(MAX_LOGICAL_RANK)
            .and_then(|dims| {
                dims.into_iter()
                    .map(|d| usize::try_from(d).ok())
                    .collect::<Option<Vec<usize>>>()
            })
            .ok_or_else(|| {
                format!("`{key}` must be an array of at most {MAX_LOGICAL_RANK} u64 dims")
            })?;
        let numel: usize = tensor.shape.iter().product();
        if dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) != Some(numel) {
            return Err(format!(
                "`{key}` = {dims:?} does not hold the {numel} values of the stored shape {:?}",
                tensor.shape
            ));
        }
        tensor.shape = dims;
    }
    Ok(())
}

/// A name from the file as an error shows it: one line (control characters escaped), at most 120
/// characters, whatever the file holds.
fn shown(name: &str) -> String {
    const MAX_CHARS: usize = 120;
    let cut: String = name.chars().take(MAX_CHARS).collect();
    let more = if cut.len() < name.len() { "…" } else { "" };
    format!("{}{more}", cut.escape_debug())
}

/// ggml's names for type ids sdcap does not compute with, for the error message.
fn ggml_type_name(id: u32) -> Option<&'static str> {
    #[rustfmt::skip]
    const NAMES: [&str; 40] = [
        "f32", "f16", "q4_0", "q4_1", "q4_2", "q4_3", "q5_0", "q5_1", "q8_0", "q8_1",
        "q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_K", "iq2_xxs", "iq2_xs", "iq3_xxs", "iq1_s",
        "iq4_nl", "iq3_s", "iq2_s", "iq4_xs", "i8", "i16", "i32", "i64", "f64", "iq1_m",
        "bf16", "q4_0_4_4", "q4_0_4_8", "q4_0_8_8", "tq1_0", "tq2_0", "iq4_nl_4_4", "iq4_nl_4_8", "iq4_nl_8_8", "mxfp4",
    ];
    NAMES.get(id as usize).copied()
}

/// Reads the file front to back; every read is bounds-checked and names what it was reading.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: u64, what: &str) -> std::result::Result<&'a [u8], String> {
        let n = match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => n,
            _ => {
                return Err(format!(
                    "truncated: {what} at byte {} needs {n} bytes but the file ends {} bytes later",
                    self.pos,
                    self.remaining()
                ))
            }
        };
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn raw_string(&mut self, what: &str) -> std::result::Result<&'a [u8], String> {
        let len = self.u64(what)?;
        self.take(len, what)
    }

    /// A string that must be UTF-8 (keys and tensor names).
    fn str(&mut self, what: &str) -> std::result::Result<&'a str, String> {
        let at = self.pos;
        std::str::from_utf8(self.raw_string(what)?)
            .map_err(|_| format!("{what} at byte {at} is not valid UTF-8"))
    }

    /// `count` entries of at least `min_bytes` each must fit in the rest of the file.
    fn cap(&self, count: u64, min_bytes: usize, what: &str) -> std::result::Result<usize, String> {
        let fits = self.remaining() / min_bytes;
        match usize::try_from(count) {
            Ok(n) if n <= fits => Ok(n),
            _ => Err(format!(
                "the header claims {count} {what} but the {} bytes after byte {} hold at most {fits}",
                self.remaining(),
                self.pos
            )),
        }
    }

    /// A top-level value of type `ty`: numbers decoded, strings and arrays validated and kept as
    /// their byte range. `what` names it in errors (made once per key, not per array element).
    fn item(&mut self, ty: u32, what: &str) -> std::result::Result<MetaItem, String> {
        let at = self.pos;
        Ok(match ty {
            8 => {
                let len = self.raw_string(what)?.len();
                MetaItem::String {
                    start: self.pos - len,
                    len,
                }
            }
            9 => {
                let (item_ty, count) = self.array_values(what, 0)?;
                MetaItem::Array {
                    item_ty,
                    count,
                    start: at + 12,
                    len: self.pos - (at + 12),
                }
            }
            _ => {
                self.skip(ty, what, 0)?;
                let mut pos = 0;
                let value = quant::gguf::read_value(ty, &self.bytes[at..self.pos], &mut pos)
                    .ok_or_else(|| format!("{what} cannot be read"))?;
                MetaItem::Scalar(value)
            }
        })
    }

    /// Checks one value of type `ty` and moves past it, allocating nothing.
    fn skip(&mut self, ty: u32, what: &str, depth: usize) -> std::result::Result<(), String> {
        match ty {
            0 | 1 => drop(self.take(1, what)?),
            2 | 3 => drop(self.take(2, what)?),
            4..=6 => drop(self.take(4, what)?),
            7 => match self.array::<1>(what)? {
                [0 | 1] => {}
                [b] => return Err(format!("{what} is a bool stored as {b} (must be 0 or 1)")),
            },
            8 => drop(self.raw_string(what)?),
            9 => drop(self.array_values(what, depth)?),
            10..=12 => drop(self.take(8, what)?),
            other => return Err(format!("{what} has unknown value type {other}")),
        }
        Ok(())
    }

    /// An array's item type and count, then its items checked: fixed-size items by one bounds
    /// check (bools byte by byte), strings and nested arrays one at a time.
    fn array_values(
        &mut self,
        what: &str,
        depth: usize,
    ) -> std::result::Result<(u32, u64), String> {
        if depth == MAX_ARRAY_DEPTH {
            return Err(format!(
                "{what} nests arrays more than {MAX_ARRAY_DEPTH} deep"
            ));
        }
        let item_ty = self.u32(what)?;
        let len = self.u64(what)?;
        let (min_bytes, fixed) = match item_ty {
            0 | 1 | 7 => (1, true),
            2 | 3 => (2, true),
            4..=6 => (4, true),
            10..=12 => (8, true),
            8 => (8, false),
            9 => (12, false),
            other => return Err(format!("{what} is an array of unknown value type {other}")),
        };
        let count = self.cap(len, min_bytes, &format!("array values in {what}"))?;
        if fixed {
            let values = self.take((count * min_bytes) as u64, what)?;
            if item_ty == 7 {
                if let Some(b) = values.iter().find(|&&b| b > 1) {
                    return Err(format!("{what} is a bool stored as {b} (must be 0 or 1)"));
                }
            }
        } else {
            for _ in 0..count {
                self.skip(item_ty, what, depth + 1)?;
            }
        }
        Ok((item_ty, count as u64))
    }

    fn tensor_info(&mut self) -> std::result::Result<TensorHeader<'a>, String> {
        let raw_name = self.str("a tensor name")?;
        let name = shown(raw_name);
        let n_dims = self.u32(&format!("the dim count of tensor `{name}`"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(format!(
                "tensor `{name}` has {n_dims} dims; GGUF allows at most {MAX_DIMS}"
            ));
        }
        let dims = (0..n_dims)
            .map(|_| self.u64(&format!("the dims of tensor `{name}`")))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let id = self.u32(&format!("the type of tensor `{name}`"))?;
        let ty = GgmlType::from_id(id).ok_or_else(|| match ggml_type_name(id) {
            Some(known) => {
                format!("tensor `{name}` has GGML type {known} (id {id}), which sdcap cannot read")
            }
            None => format!("tensor `{name}` has unknown GGML type id {id}"),
        })?;
        let offset = self.u64(&format!("the data offset of tensor `{name}`"))?;
        Ok(TensorHeader {
            name: raw_name,
            dims,
            ty,
            offset,
        })
    }
}
