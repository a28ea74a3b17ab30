//! Hostile GGUF files: each gives one line `<path>: not a valid GGUF file: <reason>` (exit code 2),
//! never a panic, and never an allocation sized by a count or length the file merely claims.

use std::path::Path;

use sdcap::weights::TensorStore;
use sdcap::Error;

/// GGUF bytes, field by field.
#[derive(Clone)]
struct Raw(Vec<u8>);

impl Raw {
    fn gguf(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        Raw(b"GGUF".to_vec()).u32(version).u64(n_tensors).u64(n_kv)
    }
    fn bytes(mut self, b: &[u8]) -> Raw {
        self.0.extend_from_slice(b);
        self
    }
    fn u32(self, v: u32) -> Raw {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(self, v: u64) -> Raw {
        self.bytes(&v.to_le_bytes())
    }
    fn str(self, s: &str) -> Raw {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    /// A key/value pair with a u32 value.
    fn kv_u32(self, key: &str, v: u32) -> Raw {
        self.str(key).u32(4).u32(v)
    }
    fn info(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Raw {
        let mut r = self.str(name).u32(dims.len() as u32);
        for &d in dims {
            r = r.u64(d);
        }
        r.u32(ty).u64(offset)
    }
    /// Zero padding to 32, then `n` data bytes.
    fn data(mut self, n: usize) -> Raw {
        self.0.resize(self.0.len().next_multiple_of(32) + n, 0);
        self
    }
    fn cut(mut self, len: usize) -> Raw {
        self.0.truncate(len);
        self
    }
}

/// One f32 tensor `w` of 8 values: a valid file.
fn valid() -> Raw {
    Raw::gguf(3, 1, 0).info("w", &[8], 0, 0).data(32)
}

/// Opens `bytes` as `name` and checks the error contract; returns the reason.
fn reason(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let err = match TensorStore::open(&path) {
        Ok(_) => panic!("{name}: opened"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::BadFile { .. }), "{name}: {err:?}");
    assert_eq!(err.exit_code(), 2, "{name}");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{name}: more than one line: {msg:?}");
    let prefix = format!("{}: not a valid GGUF file: ", path.display());
    msg.strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{name}: {msg}"))
        .to_string()
}

#[test]
fn the_valid_baseline_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("valid.gguf");
    std::fs::write(&path, valid().0).unwrap();
    let store = TensorStore::open(&path).unwrap();
    assert_eq!(store.tensors()[0].shape, [8]);
    // Version 2 files have the same little-endian layout.
    std::fs::write(&path, Raw::gguf(2, 1, 0).info("w", &[8], 0, 0).data(32).0).unwrap();
    TensorStore::open(&path).unwrap();
}

#[test]
fn hostile_files_give_one_line_errors() {
    const HUGE: u64 = 1 << 60;
    let k = || Raw::gguf(3, 0, 1).str("k");
    let tensor =
        |dims: &[u64], ty: u32, offset: u64| Raw::gguf(3, 1, 0).info("w", dims, ty, offset);
    let shape_kv = |value: Raw| value.data(64);
    let mut nested = Raw::gguf(3, 0, 1).str("deep").u32(9);
    for _ in 0..10 {
        nested = nested.u32(9).u64(1);
    }
    let nested = nested.u32(0).u64(0).data(64);
    // (what, file, expected part of the reason)
    let cases: Vec<(&str, Raw, &str)> = vec![
        ("empty file", Raw(vec![]), "the file is empty"),
        (
            "bad magic",
            Raw(b"GGUX".to_vec()).u32(3).u64(0).u64(0),
            "bad magic",
        ),
        (
            "magic only",
            Raw(b"GGUF".to_vec()),
            "truncated: the version at byte 4",
        ),
        ("version 1", Raw::gguf(1, 0, 0), "version 1;"),
        ("version 4", Raw::gguf(4, 0, 0), "version 4;"),
        (
            "big-endian",
            Raw::gguf(3u32.swap_bytes(), 0, 0),
            "big-endian",
        ),
        (
            "header cut in the counts",
            valid().cut(20),
            "truncated: the metadata count",
        ),
        (
            "header cut in a tensor info",
            valid().cut(48),
            "truncated: the type of tensor `w` at byte 45",
        ),
        (
            "2^60 tensors",
            Raw::gguf(3, HUGE, 0),
            "claims 1152921504606846976 tensor infos",
        ),
        (
            "2^60 key/value pairs",
            Raw::gguf(3, 0, HUGE),
            "claims 1152921504606846976 metadata entries",
        ),
        (
            "key length 2^60",
            Raw::gguf(3, 0, 1).u64(HUGE).data(64),
            "a metadata key at byte 32 needs 1152921504606846976 bytes",
        ),
        (
            "string value length 2^60",
            k().u32(8).u64(HUGE),
            "the value of `k` at byte 45 needs 1152921504606846976",
        ),
        (
            "tensor name length 2^60",
            Raw::gguf(3, 1, 0).u64(HUGE).data(64),
            "a tensor name at byte 32 needs 1152921504606846976",
        ),
        (
            "array length 2^60",
            k().u32(9).u32(0).u64(HUGE),
            "claims 1152921504606846976 array values in the value of `k`",
        ),
        (
            "array of strings 2^57",
            k().u32(9).u32(8).u64(1 << 57).data(64),
            "array values",
        ),
        (
            "unknown value type",
            k().u32(13).u32(0),
            "unknown value type 13",
        ),
        (
            "array of unknown type",
            k().u32(9).u32(77).u64(1),
            "array of unknown value type 77",
        ),
        ("bool 2", k().u32(7).bytes(&[2]), "bool stored as 2"),
        (
            "arrays nested 10 deep",
            nested,
            "nests arrays more than 8 deep",
        ),
        (
            "key not UTF-8",
            Raw::gguf(3, 0, 1)
                .u64(2)
                .bytes(&[0xff, 0xfe])
                .u32(0)
                .bytes(&[0]),
            "not valid UTF-8",
        ),
        (
            "key twice",
            Raw::gguf(3, 0, 2).kv_u32("k", 1).kv_u32("k", 2),
            "key `k` appears twice",
        ),
        (
            "alignment 48",
            Raw::gguf(3, 0, 1).kv_u32("general.alignment", 48),
            "is 48; it must be a power of two",
        ),
        (
            "alignment 0",
            Raw::gguf(3, 0, 1).kv_u32("general.alignment", 0),
            "power of two",
        ),
        (
            "alignment u64",
            Raw::gguf(3, 0, 1).str("general.alignment").u32(10).u64(32),
            "must be a u32",
        ),
        (
            "unknown tensor type",
            tensor(&[8], 99, 0).data(32),
            "tensor `w` has unknown GGML type id 99",
        ),
        (
            "unsupported tensor type",
            tensor(&[256], 16, 0).data(128),
            "GGML type iq2_xxs (id 16)",
        ),
        (
            "5 dims",
            tensor(&[1, 1, 1, 1, 1], 0, 0).data(32),
            "5 dims; GGUF allows at most 4",
        ),
        (
            "dim count 2^31",
            Raw::gguf(3, 1, 0).str("w").u32(1 << 31).data(32),
            "at most 4",
        ),
        (
            "dims product overflows",
            tensor(&[1 << 32, 1 << 32, 2], 0, 0).data(32),
            "overflow",
        ),
        (
            "bytes overflow",
            tensor(&[1 << 62], 0, 0).data(32),
            "overflow",
        ),
        (
            "rows not whole blocks",
            tensor(&[3, 32], 8, 0).data(128),
            "innermost dim 3 is not whole 32-value q8_0 blocks",
        ),
        (
            "misaligned offset",
            tensor(&[8], 0, 4).data(64),
            "offset 4 is not a multiple of the alignment 32",
        ),
        (
            "data past the end",
            tensor(&[8], 0, 32).data(32),
            "runs past the end of the file",
        ),
        (
            "data cut short",
            tensor(&[8], 0, 0).data(31),
            "runs past the end of the file",
        ),
        (
            "2^40 values",
            tensor(&[1 << 40], 0, 0).data(32),
            "runs past the end",
        ),
        (
            "offset 2^63",
            tensor(&[8], 0, 1 << 63).data(32),
            "runs past the end",
        ),
        (
            "huge alignment",
            Raw::gguf(3, 1, 1)
                .kv_u32("general.alignment", 1 << 31)
                .info("w", &[8], 0, 0)
                .data(32),
            "runs past the end",
        ),
        (
            "same data twice",
            Raw::gguf(3, 2, 0)
                .info("a", &[8], 0, 0)
                .info("b", &[8], 0, 0)
                .data(32),
            "tensor `b` data [96, 128) overlaps tensor `a` [96, 128)",
        ),
        (
            "overlapping ranges",
            Raw::gguf(3, 2, 0)
                .info("a", &[16], 0, 0)
                .info("b", &[8], 0, 32)
                .data(64),
            "overlaps",
        ),
        (
            "tensor twice",
            Raw::gguf(3, 2, 0)
                .info("a", &[8], 0, 0)
                .info("a", &[8], 0, 32)
                .data(64),
            "tensor `a` is listed twice",
        ),
        (
            "name with a newline",
            Raw::gguf(3, 1, 0).info("a\nb", &[8], 99, 0).data(32),
            "tensor `a\\nb` has unknown GGML type id 99",
        ),
        (
            "logical shape with other numel",
            shape_kv(
                Raw::gguf(3, 1, 1)
                    .str("sdcap.shape.w")
                    .u32(9)
                    .u32(10)
                    .u64(2)
                    .u64(3)
                    .u64(3)
                    .info("w", &[8], 0, 0),
            ),
            "`sdcap.shape.w` = [3, 3] does not hold the 8 values of the stored shape [8]",
        ),
        (
            "logical shape of u32",
            shape_kv(
                Raw::gguf(3, 1, 1)
                    .str("sdcap.shape.w")
                    .u32(9)
                    .u32(4)
                    .u64(1)
                    .u32(8)
                    .info("w", &[8], 0, 0),
            ),
            "must be an array of at most 8 u64 dims",
        ),
        (
            "logical shape of no tensor",
            shape_kv(
                Raw::gguf(3, 1, 1)
                    .str("sdcap.shape.v")
                    .u32(9)
                    .u32(10)
                    .u64(1)
                    .u64(8)
                    .info("w", &[8], 0, 0),
            ),
            "`sdcap.shape.v` names no tensor",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, (what, raw, want)) in cases.into_iter().enumerate() {
        let got = reason(dir.path(), &format!("case{i}.gguf"), &raw.0);
        assert!(got.contains(want), "{what}: {got:?} lacks {want:?}");
    }
}

#[test]
fn a_broken_gguf_is_reported_as_such_by_name_or_magic() {
    let dir = tempfile::tempdir().unwrap();
    // A `.gguf` name with a foreign magic, and the GGUF magic under another name.
    let got = reason(dir.path(), "model.gguf", b"PK\x03\x04 not a model");
    assert!(got.contains("bad magic"), "{got}");
    let got = reason(dir.path(), "model.safetensors", &valid().cut(20).0);
    assert!(got.starts_with("truncated"), "{got}");
    // A missing `.gguf`.
    let err = TensorStore::open(&dir.path().join("absent.gguf"))
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .ends_with("absent.gguf: no such file or folder"),
        "{err}"
    );
}

/// The binary's contract: exit 2 and one line on stderr for a hostile GGUF model.
#[test]
fn cli_exits_2_on_a_hostile_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("bad.gguf");
    std::fs::write(&model, Raw::gguf(3, 1 << 60, 0).0).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdcap"))
        .args(["generate", "-p", "x", "-m"])
        .arg(&model)
        .arg("-o")
        .arg(dir.path().join("out.png"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("not a valid GGUF file: the header claims"),
        "{stderr}"
    );
    assert!(!dir.path().join("out.png").exists());
}

/// A copy of `model` with one more metadata entry, `hostile.blob` = an array of `count` u8 values,
/// inserted before the others. The entry is padded (by its key) to whole 4096 bytes, so the tensor
/// data, aligned to at most that, keeps its offsets.
fn with_u8_array(model: &[u8], count: u64) -> Vec<u8> {
    let head = 4 + 4 + 8 + 8;
    let fixed = 8 + 4 + 4 + 8; // key length, value type, item type, count
    let key_len = (fixed + count as usize + "hostile.blob".len()).next_multiple_of(4096)
        - fixed
        - count as usize;
    let key = format!("hostile.blob{}", "_".repeat(key_len - "hostile.blob".len()));
    let n_kv = u64::from_le_bytes(model[16..24].try_into().unwrap());
    let mut out = Vec::with_capacity(model.len() + key_len + fixed + count as usize);
    out.extend_from_slice(&model[..16]);
    out.extend_from_slice(&(n_kv + 1).to_le_bytes());
    let entry = Raw(Vec::new()).str(&key).u32(9).u32(0).u64(count);
    out.extend_from_slice(&entry.0);
    out.resize(out.len() + count as usize, 7);
    out.extend_from_slice(&model[head..]);
    out
}

/// `sdcap generate --progress json` on `model`: (planned peak MiB, peak RSS MiB).
fn planned_and_peak_mib(model: &Path, dir: &Path) -> (u64, u64) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdcap"))
        .args([
            "generate", "-p", "x", "-W", "64", "-H", "64", "--steps", "1", "-t", "1",
        ])
        .args(["--progress", "json", "-m"])
        .arg(model)
        .arg("-o")
        .arg(dir.join("out.png"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", model.display());
    let field = |event: &str, key: &str| {
        stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == event)
            .and_then(|v| v[key].as_u64())
            .unwrap_or_else(|| panic!("no {event}.{key} in {stderr}"))
    };
    (field("plan", "peak_mib"), field("summary", "peak_rss_mib"))
}

/// Issue 14 (2): a GGUF whose metadata holds one array of 50 million u8 values peaked at 1.55 GiB
/// (each value decoded into a 32-byte enum) and the plan did not count it. Metadata now stays in
/// the mapping: the process grows by about the file's extra bytes (its header pages are read once
/// while parsing), and the plan charges at least that.
#[test]
fn a_huge_metadata_array_costs_its_file_bytes_and_is_planned() {
    const COUNT: u64 = 50_000_000;
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let plain = crate::fixture("f16");
    let hostile = dir.path().join("hostile.gguf");
    let bytes = std::fs::read(&plain).unwrap();
    std::fs::write(&hostile, with_u8_array(&bytes, COUNT)).unwrap();
    let added_mib = (std::fs::metadata(&hostile).unwrap().len() - bytes.len() as u64) / MIB;

    let store = TensorStore::open(&hostile).unwrap();
    let blob = store.metadata().iter().next().unwrap().1;
    assert_eq!(
        blob.to_string(),
        "[7, 7, 7, 7, 7, 7, 7, 7, … (50000000 values)]"
    );
    assert!(store.metadata_bytes() >= COUNT);
    assert!(
        store.metadata_bytes() <= COUNT + MIB,
        "{}",
        store.metadata_bytes()
    );
    drop(store);

    let (plain_plan, plain_peak) = planned_and_peak_mib(&plain, dir.path());
    let (hostile_plan, hostile_peak) = planned_and_peak_mib(&hostile, dir.path());
    // Slack for allocator noise between two runs; decoding the array would add ~1.5 GiB.
    let grown = hostile_peak.saturating_sub(plain_peak);
    assert!(
        grown <= added_mib + 16,
        "peak RSS grew {grown} MiB for {added_mib} MiB of metadata"
    );
    assert!(
        hostile_plan >= plain_plan + added_mib,
        "plan {plain_plan} → {hostile_plan} MiB for {added_mib} MiB of metadata"
    );
}
