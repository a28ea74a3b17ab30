//! Writing GGUF files (v3, little-endian), the metadata value type, and the reader's view of
//! metadata (values left in the file and decoded on use).
//!
//! Layout (ggml `docs/gguf.md`): magic `GGUF`, version, tensor count, key/value count, the key/value
//! pairs, one info per tensor (name, dims innermost first, type id, data offset), zero padding to the
//! alignment, then each tensor's bytes padded to the alignment (ggml pads after the last one too).
//! The writer streams: it asks for one tensor's bytes at a time, so a model never has to be in memory.

use std::fmt;
use std::io::{self, Write};

use crate::GgmlType;

/// The alignment a file has when it does not say (`general.alignment` absent).
pub const DEFAULT_ALIGNMENT: usize = 32;
/// The key that sets the alignment (a u32 power of two).
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// `sdcap.shape.<tensor name>` = array of u64, outermost first: the PyTorch shape of a tensor stored with
/// fewer dims (a quantized conv weight is stored as [cout, cin·kh·kw] so that its rows are whole blocks).
pub const SHAPE_KEY_PREFIX: &str = "sdcap.shape.";
/// GGML's limit on dims per tensor.
pub const MAX_DIMS: usize = 4;

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;

/// A metadata value. Type ids (`gguf_metadata_value_type`) follow the variant order.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Values of one type (arrays of arrays may differ in their inner types and lengths).
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// The GGUF value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    /// The value as an unsigned integer, if it is one of the integer types and not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    fn write_to(&self, out: &mut Vec<u8>) -> io::Result<()> {
        match self {
            MetaValue::U8(v) => out.push(*v),
            MetaValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
            MetaValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
            MetaValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
            MetaValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            MetaValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            MetaValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            MetaValue::Bool(v) => out.push(u8::from(*v)),
            MetaValue::String(s) => write_string(out, s),
            MetaValue::Array(items) => {
                // An empty array has no element to take the type from; any type reads back the same.
                let ty = items.first().map_or(0, MetaValue::type_id);
                if items.iter().any(|v| v.type_id() != ty) {
                    return Err(invalid("metadata array mixes value types".to_string()));
                }
                out.extend_from_slice(&ty.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for item in items {
                    item.write_to(out)?;
                }
            }
            MetaValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            MetaValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
            MetaValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        }
        Ok(())
    }
}

/// Compact, one line: strings quoted, long arrays cut after 8 values with their length.
impl fmt::Display for MetaValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaValue::U8(v) => write!(f, "{v}"),
            MetaValue::I8(v) => write!(f, "{v}"),
            MetaValue::U16(v) => write!(f, "{v}"),
            MetaValue::I16(v) => write!(f, "{v}"),
            MetaValue::U32(v) => write!(f, "{v}"),
            MetaValue::I32(v) => write!(f, "{v}"),
            MetaValue::F32(v) => write!(f, "{v}"),
            MetaValue::Bool(v) => write!(f, "{v}"),
            MetaValue::String(s) => write!(f, "{s:?}"),
            MetaValue::Array(items) => {
                const SHOWN: usize = 8;
                f.write_str("[")?;
                for (i, item) in items.iter().take(SHOWN).enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                if items.len() > SHOWN {
                    write!(f, ", … ({} values)", items.len())?;
                }
                f.write_str("]")
            }
            MetaValue::U64(v) => write!(f, "{v}"),
            MetaValue::I64(v) => write!(f, "{v}"),
            MetaValue::F64(v) => write!(f, "{v}"),
        }
    }
}

/// How the reader keeps one metadata value: numbers decoded, strings and arrays left in the file as
/// byte ranges and decoded on use. A value costs the same few words whatever it holds, so a file's
/// metadata costs O(its entries), never its values' count times an enum's size.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaItem {
    /// Any type but string and array, decoded.
    Scalar(MetaValue),
    /// A string's bytes at `start..start + len` of the file (decoded lossily as UTF-8).
    String { start: usize, len: usize },
    /// `count` values of type `item_ty` stored at `start..start + len` of the file.
    Array {
        item_ty: u32,
        count: u64,
        start: usize,
        len: usize,
    },
}

/// One metadata entry as the reader keeps it: the key's bytes (UTF-8, checked when the file was
/// read) at `key_start..key_start + key_len` of the file, and the value.
#[derive(Clone, Debug, PartialEq)]
pub struct MetaEntry {
    pub key_start: usize,
    pub key_len: usize,
    pub value: MetaItem,
}

/// A file's metadata, in file order, over the file's bytes (the reader validated every entry).
#[derive(Clone, Copy)]
pub struct Metadata<'a> {
    entries: &'a [MetaEntry],
    file: &'a [u8],
}

/// One value of [`Metadata`].
#[derive(Clone, Copy)]
pub struct MetaRef<'a> {
    item: &'a MetaItem,
    file: &'a [u8],
}

impl<'a> Metadata<'a> {
    /// `entries` made by a reader of `file`; ranges outside `file` decode as empty, never panic.
    pub fn new(entries: &'a [MetaEntry], file: &'a [u8]) -> Self {
        Metadata { entries, file }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Keys and values in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, MetaRef<'a>)> + 'a {
        let file = self.file;
        self.entries.iter().map(move |e| {
            let key = file
                .get(e.key_start..e.key_start.saturating_add(e.key_len))
                .and_then(|b| std::str::from_utf8(b).ok())
                .unwrap_or("");
            (
                key,
                MetaRef {
                    item: &e.value,
                    file,
                },
            )
        })
    }

    pub fn get(&self, key: &str) -> Option<MetaRef<'a>> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Every entry decoded (memory in proportion to the values: for tests and small files).
    pub fn to_values(&self) -> Vec<(String, MetaValue)> {
        self.iter()
            .map(|(k, v)| (k.to_string(), v.decode()))
            .collect()
    }
}

impl<'a> MetaRef<'a> {
    /// The GGUF value type id.
    pub fn type_id(&self) -> u32 {
        match self.item {
            MetaItem::Scalar(v) => v.type_id(),
            MetaItem::String { .. } => 8,
            MetaItem::Array { .. } => 9,
        }
    }

    /// The decoded value (an array allocates one `MetaValue` per item).
    pub fn decode(&self) -> MetaValue {
        match self.item {
            MetaItem::Scalar(v) => v.clone(),
            &MetaItem::String { start, len } => {
                MetaValue::String(String::from_utf8_lossy(self.range(start, len)).into_owned())
            }
            &MetaItem::Array {
                item_ty,
                count,
                start,
                len,
            } => MetaValue::Array(self.items(item_ty, count, start, len).collect()),
        }
    }

    /// A scalar's value, or None for strings and arrays.
    pub fn scalar(&self) -> Option<&'a MetaValue> {
        match self.item {
            MetaItem::Scalar(v) => Some(v),
            _ => None,
        }
    }

    /// The items of an array of u64 when it has at most `max` of them (else, or for any other
    /// value, None); decodes only those.
    pub fn u64_array(&self, max: usize) -> Option<Vec<u64>> {
        match *self.item {
            MetaItem::Array {
                item_ty: 10,
                count,
                start,
                len,
            } if count <= max as u64 => self
                .items(10, count, start, len)
                .map(|v| match v {
                    MetaValue::U64(d) => Some(d),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    fn range(&self, start: usize, len: usize) -> &'a [u8] {
        self.file
            .get(start..start.saturating_add(len))
            .unwrap_or(&[])
    }

    /// An array's items one at a time (stops early if the bytes run out).
    fn items(
        &self,
        item_ty: u32,
        count: u64,
        start: usize,
        len: usize,
    ) -> impl Iterator<Item = MetaValue> + 'a {
        let bytes = self.range(start, len);
        let mut pos = 0;
        (0..count).map_while(move |_| read_value(item_ty, bytes, &mut pos))
    }
}

/// Compact, one line, bounded whatever the value holds: as [`MetaValue`]'s display, with strings
/// cut after 120 characters and only the first 8 items of an array decoded.
impl fmt::Display for MetaRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX_CHARS: usize = 120;
        match *self.item {
            MetaItem::Scalar(ref v) => write!(f, "{v}"),
            MetaItem::String { start, len } => {
                let bytes = self.range(start, len.min(4 * MAX_CHARS));
                let text: String = String::from_utf8_lossy(bytes)
                    .chars()
                    .take(MAX_CHARS)
                    .collect();
                if text.len() < len {
                    write!(f, "{text:?}… ({len} bytes)")
                } else {
                    write!(f, "{text:?}")
                }
            }
            MetaItem::Array {
                item_ty,
                count,
                start,
                len,
            } => {
                const SHOWN: usize = 8;
                f.write_str("[")?;
                for (i, item) in self
                    .items(item_ty, count, start, len)
                    .take(SHOWN)
                    .enumerate()
                {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                if count > SHOWN as u64 {
                    write!(f, ", … ({count} values)")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// Decodes one value of type `ty` at `bytes[*pos..]` and moves past it; None if the bytes end first
/// or the type is unknown (the reader checked both, so that only happens to a file changed under us).
pub fn read_value(ty: u32, bytes: &[u8], pos: &mut usize) -> Option<MetaValue> {
    fn take<'b>(bytes: &'b [u8], pos: &mut usize, n: usize) -> Option<&'b [u8]> {
        let out = bytes.get(*pos..pos.checked_add(n)?)?;
        *pos += n;
        Some(out)
    }
    fn fixed<const N: usize>(bytes: &[u8], pos: &mut usize) -> Option<[u8; N]> {
        take(bytes, pos, N)?.try_into().ok()
    }
    fn u64_at(bytes: &[u8], pos: &mut usize) -> Option<u64> {
        fixed(bytes, pos).map(u64::from_le_bytes)
    }
    Some(match ty {
        0 => MetaValue::U8(u8::from_le_bytes(fixed(bytes, pos)?)),
        1 => MetaValue::I8(i8::from_le_bytes(fixed(bytes, pos)?)),
        2 => MetaValue::U16(u16::from_le_bytes(fixed(bytes, pos)?)),
        3 => MetaValue::I16(i16::from_le_bytes(fixed(bytes, pos)?)),
        4 => MetaValue::U32(u32::from_le_bytes(fixed(bytes, pos)?)),
        5 => MetaValue::I32(i32::from_le_bytes(fixed(bytes, pos)?)),
        6 => MetaValue::F32(f32::from_le_bytes(fixed(bytes, pos)?)),
        7 => MetaValue::Bool(fixed::<1>(bytes, pos)?[0] != 0),
        8 => {
            let len = usize::try_from(u64_at(bytes, pos)?).ok()?;
            MetaValue::String(String::from_utf8_lossy(take(bytes, pos, len)?).into_owned())
        }
        9 => {
            let item_ty = u32::from_le_bytes(fixed(bytes, pos)?);
            let count = u64_at(bytes, pos)?;
            // Each item takes at least one byte: a count beyond the bytes left is a broken file.
            if count > (bytes.len() - *pos) as u64 {
                return None;
            }
            let items = (0..count)
                .map(|_| read_value(item_ty, bytes, pos))
                .collect::<Option<Vec<_>>>()?;
            MetaValue::Array(items)
        }
        10 => MetaValue::U64(u64::from_le_bytes(fixed(bytes, pos)?)),
        11 => MetaValue::I64(i64::from_le_bytes(fixed(bytes, pos)?)),
        12 => MetaValue::F64(f64::from_le_bytes(fixed(bytes, pos)?)),
        _ => return None,
    })
}

/// One tensor to write.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub ty: GgmlType,
    /// PyTorch order, outermost first. The innermost dim must be whole blocks of `ty`; a shape of
    /// rank 0 is written as `[1]` (as ggml does), more than [`MAX_DIMS`] dims is an error.
    pub shape: Vec<u64>,
}

impl TensorEntry {
    /// Bytes of this tensor's data, or why it cannot be stored.
    pub fn data_bytes(&self) -> io::Result<u64> {
        let block = self.ty.info().block_elems as u64;
        let ne0 = self.shape.last().copied().unwrap_or(1);
        if self.shape.len() > MAX_DIMS {
            return Err(invalid(format!(
                "tensor `{}` has {} dims; GGUF allows at most {MAX_DIMS}",
                self.name,
                self.shape.len()
            )));
        }
        if !ne0.is_multiple_of(block) {
            return Err(invalid(format!(
                "tensor `{}` {:?}: rows of {ne0} values are not whole {block}-value {} blocks",
                self.name,
                self.shape,
                self.ty.name()
            )));
        }
        self.shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .and_then(|n| self.ty.bytes_for(n))
            .ok_or_else(|| {
                invalid(format!(
                    "tensor `{}` {:?} is too large",
                    self.name, self.shape
                ))
            })
    }
}

/// The metadata entry that gives tensor `name`, stored with fewer dims, its PyTorch `shape` back
/// (`sdcap.shape.<name>` = array of u64, outermost first); the reader restores it.
pub fn shape_metadata(name: &str, shape: &[u64]) -> (String, MetaValue) {
    (
        format!("{SHAPE_KEY_PREFIX}{name}"),
        MetaValue::Array(shape.iter().copied().map(MetaValue::U64).collect()),
    )
}

/// Writes a GGUF v3 file: header, `metadata` in the given order, the tensor infos (offsets computed
/// from types and shapes), then each tensor's bytes in order, each padded with zeros to `alignment`.
/// `data(i, buf)` fills `buf` (cleared before the call) with tensor `i`'s bytes; one buffer is
/// reused, so the peak is the largest tensor.
///
/// `alignment` must be a power of two; unless it is 32 (the default) the metadata must hold
/// `general.alignment` = `U32(alignment)`. Errors are `InvalidInput` for a bad request (duplicate
/// names, rows that are not whole blocks, a data length that does not match the shape), else the
/// writer's own.
pub fn write_gguf<W: Write>(
    out: &mut W,
    metadata: &[(String, MetaValue)],
    tensors: &[TensorEntry],
    alignment: usize,
    data: &mut dyn FnMut(usize, &mut Vec<u8>) -> io::Result<()>,
) -> io::Result<()> {
    check_alignment(metadata, alignment)?;
    let mut names = std::collections::HashSet::new();
    let mut head = Vec::new();
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        write_string(&mut head, key);
        head.extend_from_slice(&value.type_id().to_le_bytes());
        value.write_to(&mut head)?;
    }
    let mut sizes = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(invalid(format!("tensor `{}` is listed twice", t.name)));
        }
        let size = t.data_bytes()?;
        write_string(&mut head, &t.name);
        let dims: Vec<u64> = match t.shape.len() {
            0 => vec![1],
            _ => t.shape.iter().rev().copied().collect(),
        };
        head.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&t.ty.info().id.to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        sizes.push(size);
        offset = size
            .checked_add(padding(size, alignment) as u64)
            .and_then(|s| offset.checked_add(s))
            .ok_or_else(|| invalid("tensor data too large to address".to_string()))?;
    }
    head.resize(head.len() + padding(head.len() as u64, alignment), 0);
    out.write_all(&head)?;
    drop(head);

    let mut buf = Vec::new();
    let zeros = vec![0u8; alignment];
    for (i, (t, &size)) in tensors.iter().zip(&sizes).enumerate() {
        buf.clear();
        data(i, &mut buf)?;
        if buf.len() as u64 != size {
            return Err(invalid(format!(
                "tensor `{}`: {} {:?} is {size} bytes, but {} were given",
                t.name,
                t.ty.name(),
                t.shape,
                buf.len()
            )));
        }
        out.write_all(&buf)?;
        out.write_all(&zeros[..padding(size, alignment)])?;
    }
    Ok(())
}

/// Zero bytes that bring `len` up to a multiple of `alignment` (a power of two).
fn padding(len: u64, alignment: usize) -> usize {
    let a = alignment as u64;
    ((a - len % a) % a) as usize
}

fn check_alignment(metadata: &[(String, MetaValue)], alignment: usize) -> io::Result<()> {
    if !alignment.is_power_of_two() || u32::try_from(alignment).is_err() {
        return Err(invalid(format!(
            "alignment {alignment} is not a 32-bit power of two"
        )));
    }
    let stated = metadata
        .iter()
        .find(|(k, _)| k == ALIGNMENT_KEY)
        .map(|(_, v)| v);
    match stated {
        Some(MetaValue::U32(a)) if *a as usize == alignment => Ok(()),
        None if alignment == DEFAULT_ALIGNMENT => Ok(()),
        Some(v) => Err(invalid(format!(
            "metadata says {ALIGNMENT_KEY} = {v} ({}), but the file is written with alignment {alignment} (a u32)",
            type_name(v)
        ))),
        None => Err(invalid(format!(
            "alignment {alignment} is not the default 32, so the metadata must state {ALIGNMENT_KEY}"
        ))),
    }
}

fn type_name(v: &MetaValue) -> &'static str {
    [
        "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64",
        "f64",
    ][v.type_id() as usize]
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(
        meta: &[(String, MetaValue)],
        tensors: &[TensorEntry],
        align: usize,
    ) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        write_gguf(&mut out, meta, tensors, align, &mut |i, buf| {
            let n = tensors[i].data_bytes()? as usize;
            buf.extend((0..n).map(|b| (b + i) as u8));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn layout_matches_the_spec_byte_for_byte() {
        let t = |name: &str, ty, shape: &[u64]| TensorEntry {
            name: name.into(),
            ty,
            shape: shape.to_vec(),
        };
        let tensors = [
            t("a", GgmlType::F32, &[3]),
            t("b", GgmlType::Q8_0, &[2, 32]),
        ];
        let meta = [(
            "k".to_string(),
            MetaValue::Array(vec![MetaValue::U16(7), MetaValue::U16(8)]),
        )];
        let file = write(&meta, &tensors, 32).unwrap();
        let mut want = Vec::new();
        want.extend_from_slice(b"GGUF\x03\0\0\0");
        want.extend_from_slice(&2u64.to_le_bytes());
        want.extend_from_slice(&1u64.to_le_bytes());
        want.extend_from_slice(&1u64.to_le_bytes());
        want.push(b'k');
        want.extend_from_slice(&9u32.to_le_bytes());
        want.extend_from_slice(&2u32.to_le_bytes());
        want.extend_from_slice(&2u64.to_le_bytes());
        want.extend_from_slice(&[7, 0, 8, 0]);
        for (name, dims, id, off) in [("a", &[3u64][..], 0u32, 0u64), ("b", &[32, 2], 8, 32)] {
            want.extend_from_slice(&1u64.to_le_bytes());
            want.extend_from_slice(name.as_bytes());
            want.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            dims.iter()
                .for_each(|d| want.extend_from_slice(&d.to_le_bytes()));
            want.extend_from_slice(&id.to_le_bytes());
            want.extend_from_slice(&off.to_le_bytes());
        }
        want.resize(want.len().next_multiple_of(32), 0);
        want.extend((0..12).map(|b| b as u8));
        want.resize(want.len() + 20, 0);
        want.extend((0..68).map(|b| (b + 1) as u8));
        want.resize(want.len().next_multiple_of(32), 0);
        assert_eq!(file, want);
    }

    #[test]
    fn bad_requests_are_invalid_input() {
        let t = |name: &str, ty, shape: &[u64]| TensorEntry {
            name: name.into(),
            ty,
            shape: shape.to_vec(),
        };
        type Case = (
            Vec<(String, MetaValue)>,
            Vec<TensorEntry>,
            usize,
            &'static str,
        );
        let cases: Vec<Case> = vec![
            (
                vec![],
                vec![t("c", GgmlType::Q4_0, &[4, 3, 3])],
                32,
                "whole 32-value q4_0 blocks",
            ),
            (
                vec![],
                vec![t("a", GgmlType::F32, &[1]), t("a", GgmlType::F32, &[1])],
                32,
                "listed twice",
            ),
            (
                vec![],
                vec![t("a", GgmlType::F32, &[1, 1, 1, 1, 1])],
                32,
                "at most 4",
            ),
            (vec![], vec![], 48, "power of two"),
            (vec![], vec![], 64, "must state general.alignment"),
            (
                vec![(ALIGNMENT_KEY.into(), MetaValue::U64(64))],
                vec![],
                64,
                "(u64)",
            ),
            (
                vec![(
                    "x".into(),
                    MetaValue::Array(vec![MetaValue::U8(1), MetaValue::I8(1)]),
                )],
                vec![],
                32,
                "mixes",
            ),
            (
                vec![],
                vec![t("a", GgmlType::F32, &[u64::MAX, 2])],
                32,
                "too large",
            ),
        ];
        for (meta, tensors, align, want) in cases {
            let err = write(&meta, &tensors, align).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            assert!(err.to_string().contains(want), "{err} (wanted {want})");
        }
        let mut out = Vec::new();
        let tensors = [t("a", GgmlType::F16, &[3])];
        let err = write_gguf(&mut out, &[], &tensors, 32, &mut |_, buf| {
            buf.extend_from_slice(&[0; 5]);
            Ok(())
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("6 bytes, but 5 were given"),
            "{err}"
        );
    }

    #[test]
    fn displays_on_one_line() {
        let v = MetaValue::Array((0..10).map(MetaValue::U32).collect());
        assert_eq!(v.to_string(), "[0, 1, 2, 3, 4, 5, 6, 7, … (10 values)]");
        assert_eq!(MetaValue::String("a\nb".into()).to_string(), "\"a\\nb\"");
        assert_eq!(MetaValue::I8(-1).as_u64(), None);
        assert_eq!(MetaValue::U16(5).as_u64(), Some(5));
    }
}
