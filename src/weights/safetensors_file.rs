//! The `.safetensors` container: map the file, validate the header, list the tensors.
//!
//! We parse and check the header ourselves rather than trust `SafeTensors::read_metadata`: its final
//! `end + 8 + header_len` sum is unchecked (a crafted header overflows it and panics in debug builds),
//! and its messages do not name the tensor at fault. Every size here comes from checked arithmetic, and
//! nothing is allocated in proportion to a size the file merely claims: the header is read only once
//! it is known to lie inside the file, and a shape may have at most `MAX_RANK` dimensions.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;
use safetensors::Dtype;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::DType;
use crate::error::{Error, Result};

/// How every container error starts, after the file name.
const NOT_SAFETENSORS: &str = "not a valid .safetensors file";
/// The largest header we read (the same limit as the `safetensors` crate; SD1.5's is ~150 KB).
const MAX_HEADER_BYTES: usize = 100_000_000;
/// More dimensions than any real weight has; bounds what a hostile shape list can make us allocate.
const MAX_RANK: usize = 8;

/// One tensor as the file lists it; `start`/`len` are absolute byte positions in the mapping.
pub(super) struct RawTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub start: usize,
    pub len: usize,
}

/// Maps `path` and lists its tensors, sorted by name.
pub(super) fn map(path: &Path) -> Result<(Mmap, Vec<RawTensor>)> {
    let file = File::open(path).map_err(|e| Error::bad_file(path, open_error(&e)))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::bad_file(path, format!("cannot read file metadata: {e}")))?;
    if meta.is_dir() {
        return Err(Error::bad_file(
            path,
            "is a directory, not a .safetensors file",
        ));
    }
    if !meta.is_file() {
        return Err(Error::bad_file(path, "is not a regular file"));
    }
    if meta.len() == 0 {
        return Err(Error::bad_file(
            path,
            format!("{NOT_SAFETENSORS}: the file is empty"),
        ));
    }
    // SAFETY: the mapping is read-only and lives as long as the store; a model file modified while
    // we run is outside what we can defend against (same contract as every mmap-based loader).
    let map = unsafe { Mmap::map(&file) }
        .map_err(|e| Error::bad_file(path, format!("cannot map: {e}")))?;
    let tensors = parse(&map)
        .map_err(|reason| Error::bad_file(path, format!("{NOT_SAFETENSORS}: {reason}")))?;
    Ok((map, tensors))
}

/// The header's `__metadata__` string pairs (e.g. `modelspec.prediction_type`), for a mapping `map`
/// has already checked; anything that is not a string-to-string object reads as none.
pub(super) fn header_metadata(bytes: &[u8]) -> Vec<(String, String)> {
    #[derive(serde::Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: Option<std::collections::BTreeMap<String, serde_json::Value>>,
    }
    let Some(len) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    else {
        return Vec::new();
    };
    let Some(header) = bytes.get(8..8usize.saturating_add(len as usize)) else {
        return Vec::new();
    };
    let Ok(header) = serde_json::from_slice::<Header>(header) else {
        return Vec::new();
    };
    header
        .metadata
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| Some((k, v.as_str()?.to_string())))
        .collect()
}

/// The one-line reason a model file could not be opened.
fn open_error(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or folder".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => format!("cannot open: {e}"),
    }
}

/// Validates a whole `.safetensors` image and lists its tensors (sorted by name).
fn parse(bytes: &[u8]) -> std::result::Result<Vec<RawTensor>, String> {
    let file_len = bytes.len();
    let looks_like = || sniff(bytes);
    if file_len < 8 {
        return Err(looks_like().unwrap_or_else(|| {
            format!("the file is only {file_len} bytes long (the 8-byte header length is missing)")
        }));
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    // A real header length is under 100 MB, so a huge one means another kind of file: say which.
    let implausible = header_len > MAX_HEADER_BYTES as u64;
    if implausible {
        if let Some(msg) = looks_like() {
            return Err(msg);
        }
    }
    if header_len > (file_len - 8) as u64 {
        return Err(format!(
            "header length {header_len} points past the end of the file \
             ({file_len} bytes): the file is truncated, or not a .safetensors file at all"
        ));
    }
    if implausible {
        return Err(format!(
            "header is {header_len} bytes, over the {MAX_HEADER_BYTES}-byte limit for a .safetensors header"
        ));
    }
    let header_end = 8 + header_len as usize;
    if bytes[8..header_end].first() != Some(&b'{') {
        return Err(
            looks_like().unwrap_or_else(|| "the header does not start with `{`".to_string())
        );
    }
    let header = std::str::from_utf8(&bytes[8..header_end]).map_err(|e| {
        format!(
            "header is not valid UTF-8 (bad byte at header offset {})",
            e.valid_up_to()
        )
    })?;
    let current = RefCell::new(None);
    let raw_entries = serde_json::Deserializer::from_str(header)
        .deserialize_map(HeaderVisitor { current: &current })
        .map_err(|e| match (e.classify(), current.borrow().as_deref()) {
            (serde_json::error::Category::Data, Some(name)) => {
                format!("bad header entry for tensor `{name}` ({e})")
            }
            (serde_json::error::Category::Data, None) => {
                format!("bad header ({e})")
            }
            _ => format!("header is not valid JSON ({e})"),
        })?;
    let entries = raw_entries
        .into_iter()
        .map(|(name, raw)| entry(name, raw))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let data_len = file_len - header_end;
    check_layout(&entries, data_len)?;
    let mut tensors: Vec<RawTensor> = entries
        .into_iter()
        .map(|e| RawTensor {
            name: e.name,
            dtype: e.dtype,
            shape: e.shape,
            start: header_end + e.start,
            len: e.end - e.start,
        })
        .collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tensors)
}

/// A header entry after per-tensor checks: element type known, byte range matching shape × type.
struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The data section must be covered exactly: tensors back to back from 0 to its end, no gap, no overlap.
fn check_layout(entries: &[Entry], data_len: usize) -> std::result::Result<(), String> {
    let mut seen = HashSet::with_capacity(entries.len());
    for e in entries {
        if !seen.insert(e.name.as_str()) {
            return Err(format!("tensor `{}` is listed twice in the header", e.name));
        }
        if e.end > data_len {
            return Err(format!(
                "tensor `{}` data ends at byte {} but the file holds only {data_len} data bytes: the file is \
                 truncated or its header offsets are wrong",
                e.name, e.end
            ));
        }
    }
    let mut order: Vec<&Entry> = entries.iter().collect();
    order.sort_by_key(|e| (e.start, e.end));
    let mut covered = 0usize;
    let mut previous: Option<&str> = None;
    for e in order {
        if e.start < covered {
            return Err(format!(
                "tensor `{}` data [{}, {}) overlaps tensor `{}` (which ends at {covered})",
                e.name,
                e.start,
                e.end,
                previous.unwrap_or("?")
            ));
        }
        if e.start > covered {
            return Err(format!(
                "gap of {} unlisted bytes before tensor `{}` at data offset {covered}: tensor data must be contiguous",
                e.start - covered,
                e.name
            ));
        }
        covered = e.end;
        previous = Some(&e.name);
    }
    if covered != data_len {
        return Err(format!(
            "{} trailing bytes after the last tensor's data (header covers {covered} of {data_len} data bytes)",
            data_len - covered
        ));
    }
    Ok(())
}

/// Per-entry checks: known type, shape × type size equal to the byte range, all with checked arithmetic.
fn entry(name: String, raw: RawEntry) -> std::result::Result<Entry, String> {
    let dtype = serde_json::from_value::<Dtype>(serde_json::Value::String(raw.dtype.clone()))
        .map_err(|_| format!("tensor `{name}` has unknown element type `{}`", raw.dtype))?;
    let (start, end) = raw.data_offsets;
    if end < start {
        return Err(format!(
            "tensor `{name}` has data offsets [{start}, {end}) that end before they start"
        ));
    }
    let bits = raw
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .and_then(|numel| numel.checked_mul(dtype.bitsize()))
        .ok_or_else(|| {
            format!(
                "tensor `{name}` has shape {:?}, too large to address",
                raw.shape
            )
        })?;
    if bits % 8 != 0 {
        return Err(format!(
            "tensor `{name}`: shape {:?} of {dtype:?} does not fill whole bytes",
            raw.shape
        ));
    }
    let bytes = bits / 8;
    if bytes != end - start {
        return Err(format!(
            "tensor `{name}`: shape {:?} of {dtype:?} needs {bytes} bytes but its data range [{start}, {end}) holds {}",
            raw.shape,
            end - start
        ));
    }
    Ok(Entry {
        name,
        dtype: match dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::I64 => DType::I64,
            Dtype::I32 => DType::I32,
            _ => DType::Other,
        },
        shape: raw.shape,
        start,
        end,
    })
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    #[serde(deserialize_with = "bounded_shape")]
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// The header's top-level object, read entry by entry (a map type would silently drop duplicates);
/// `current` holds the tensor being read so that an error can name it. `__metadata__` is skipped.
struct HeaderVisitor<'a> {
    current: &'a RefCell<Option<String>>,
}

impl<'de> Visitor<'de> for HeaderVisitor<'_> {
    type Value = Vec<(String, RawEntry)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensor entries")
    }

    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(name) = map.next_key::<String>()? {
            if name == "__metadata__" {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            *self.current.borrow_mut() = Some(name.clone());
            let raw = map.next_value::<RawEntry>()?;
            *self.current.borrow_mut() = None;
            entries.push((name, raw));
        }
        Ok(entries)
    }
}

fn bounded_shape<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<usize>, D::Error> {
    struct ShapeVisitor;
    impl<'de> Visitor<'de> for ShapeVisitor {
        type Value = Vec<usize>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a list of at most {MAX_RANK} dimensions")
        }

        fn visit_seq<A: SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> std::result::Result<Vec<usize>, A::Error> {
            let mut shape = Vec::new();
            while let Some(dim) = seq.next_element::<usize>()? {
                if shape.len() == MAX_RANK {
                    return Err(de::Error::custom(format!(
                        "shape has more than {MAX_RANK} dimensions"
                    )));
                }
                shape.push(dim);
            }
            Ok(shape)
        }
    }
    d.deserialize_seq(ShapeVisitor)
}

/// Names common non-safetensors files by their first bytes, for a useful error.
fn sniff(bytes: &[u8]) -> Option<String> {
    const PICKLE: &str = "; convert it to .safetensors first";
    const MAGIC: &[(&[u8], &str, &str)] = &[
        (b"\x89PNG\r\n\x1a\n", "a PNG image", ""),
        (b"\xff\xd8\xff", "a JPEG image", ""),
        (b"GGUF", "a GGUF file", ""),
        (
            b"PK\x03\x04",
            "a zip archive (a PyTorch .ckpt/.pt?)",
            PICKLE,
        ),
        (
            b"\x80\x02",
            "a Python pickle (a PyTorch .ckpt/.bin?)",
            PICKLE,
        ),
        (
            b"\x80\x04",
            "a Python pickle (a PyTorch .ckpt/.bin?)",
            PICKLE,
        ),
        (b"\x1f\x8b", "a gzip archive", ""),
        (
            b"version https://git-lfs",
            "a Git LFS pointer",
            "; run `git lfs pull` to fetch the model itself",
        ),
        (b"<", "an HTML/XML page", " (a failed download?)"),
        (b"{", "a JSON file", ""),
    ];
    let (_, what, hint) = MAGIC
        .iter()
        .find(|(magic, _, _)| bytes.starts_with(magic))?;
    Some(format!("it is {what}{hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn lists_tensors_with_absolute_ranges() {
        let h = r#"{"__metadata__":{"a":"b"},"b":{"dtype":"F16","shape":[2],"data_offsets":[4,8]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let t = parse(&file(h, &[0; 8])).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            (t[0].name.as_str(), t[0].start, t[0].len),
            ("a", 8 + h.len(), 4)
        );
        assert_eq!(
            (t[1].name.as_str(), t[1].dtype, t[1].start),
            ("b", DType::F16, 8 + h.len() + 4)
        );
    }

    #[test]
    fn end_sum_that_would_overflow_is_an_error_not_a_panic() {
        // Eight tensors of 2^61 - 1 bytes each: the last one ends at 2^64 - 8.
        let size = (1u64 << 61) - 1;
        let entries: Vec<String> = (0..8)
            .map(|i| {
                format!(
                    r#""t{i}":{{"dtype":"U8","shape":[{size}],"data_offsets":[{},{}]}}"#,
                    i * size,
                    (i + 1) * size
                )
            })
            .collect();
        let err = parse(&file(&format!("{{{}}}", entries.join(",")), &[]))
            .err()
            .unwrap();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn rank_is_bounded() {
        let h = r#"{"a":{"dtype":"F32","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,4]}}"#;
        let err = parse(&file(h, &[0; 4])).err().unwrap();
        assert!(
            err.contains("more than 8 dimensions") && err.contains("`a`"),
            "{err}"
        );
    }

    #[test]
    fn sub_byte_types_must_fill_whole_bytes() {
        let h = r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}}"#;
        let err = parse(&file(h, &[0; 1])).err().unwrap();
        assert!(err.contains("whole bytes"), "{err}");
    }
}
