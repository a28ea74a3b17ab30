//! Model loading: diffusers folders and separate VAEs mapped to LDM names, family detection, element
//! types, and hostile files (each must give one line naming the problem, never a panic).
//!
//! Fixtures: `tests/data/tiny-sd` (the same random weights as an LDM file and a diffusers folder) and
//! `tests/data/layouts/sd15.json` (names and shapes of the real SD1.5 checkpoint). Hostile and
//! synthetic files are generated in a per-test folder under `CARGO_TARGET_TMPDIR`.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use sdcap::weights::key_map::{self, UnetLayout};
use sdcap::weights::{detect_family, sd1_dims, DType, Family, Sd1Dims, TensorStore, Weights};
use sdcap::Error;

use common::fixtures;

fn tiny() -> PathBuf {
    fixtures().join("tiny-sd")
}

fn ldm_file() -> PathBuf {
    tiny().join("tiny-sd-fp32.safetensors")
}

/// A fresh, empty folder for one test.
fn temp_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("weights")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a `.safetensors` file with the `safetensors` crate.
fn write_tensors(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views = tensors.iter().map(|(name, dtype, shape, data)| {
        (
            name.clone(),
            TensorView::new(*dtype, shape.clone(), data).unwrap(),
        )
    });
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A file with zero-filled F32 tensors of the given names and shapes.
fn write_zeros(path: &Path, tensors: &[(&str, Vec<usize>)]) {
    let list: Vec<_> = tensors
        .iter()
        .map(|(n, s)| {
            (
                n.to_string(),
                Dtype::F32,
                s.clone(),
                vec![0u8; 4 * s.iter().product::<usize>()],
            )
        })
        .collect();
    write_tensors(path, &list);
}

/// A hand-made container: 8-byte length, the header text as given, then `data_len` zero bytes.
fn write_raw(path: &Path, header: &[u8], data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.resize(bytes.len() + data_len, 0);
    std::fs::write(path, bytes).unwrap();
}

/// Opening `path` fails with a one-line, exit-code-2 message containing every one of `needles`.
fn assert_open_error(path: &Path, needles: &[&str]) -> String {
    let err = TensorStore::open(path)
        .err()
        .unwrap_or_else(|| panic!("{} opened", path.display()));
    assert_one_line(&err, needles)
}

fn assert_one_line(err: &Error, needles: &[&str]) -> String {
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "not one line: {msg}");
    assert_eq!(err.exit_code(), 2, "{msg}");
    for needle in needles {
        assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
    }
    msg
}

/// DDPM schedule buffers and position ids: in LDM files only, not weights any network reads.
fn ldm_only(name: &str) -> bool {
    !name.contains('.') || name.ends_with("position_ids")
}

fn squeezed(shape: &[usize]) -> Vec<usize> {
    shape.iter().copied().filter(|&d| d != 1).collect()
}

#[path = "weights/diffusers.rs"]
mod diffusers;
#[path = "weights/family.rs"]
mod family;
#[path = "weights/hostile.rs"]
mod hostile;
#[path = "weights/vae.rs"]
mod vae;

#[test]
fn f16_bf16_f32_and_integers_read_as_f32_exactly() {
    let f16_bits: [u16; 8] = [
        0x3C00, 0xC000, 0x7BFF, 0x0001, 0x3555, 0x7C00, 0x8000, 0x0400,
    ];
    let f16_values = [
        1.0,
        -2.0,
        65504.0,
        1.0 / 16_777_216.0, /* 2^-24, smallest subnormal */
        1365.0 / 4096.0,    /* nearest to 1/3 */
        f32::INFINITY,
        -0.0,
        1.0 / 16384.0, /* 2^-14, smallest normal */
    ];
    let bf16_bits: [u16; 7] = [0x3F80, 0xC000, 0x4049, 0x7F7F, 0x0001, 0xFF80, 0x3EAB];
    let bf16_values = [
        1.0,
        -2.0,
        3.140625,
        3.3895314e38,
        f32::MIN_POSITIVE / 128.0, /* 2^-133, subnormal */
        f32::NEG_INFINITY,
        171.0 / 512.0,
    ];
    let le16 = |bits: &[u16]| {
        bits.iter()
            .flat_map(|b| b.to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let path = temp_dir("dtypes").join("dtypes.safetensors");
    write_tensors(
        &path,
        &[
            ("h".into(), Dtype::F16, vec![8], le16(&f16_bits)),
            ("b".into(), Dtype::BF16, vec![7], le16(&bf16_bits)),
            (
                "f".into(),
                Dtype::F32,
                vec![2],
                [1.5f32, -0.25]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            (
                "i".into(),
                Dtype::I64,
                vec![2],
                [-3i64, 1 << 40]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            ("u".into(), Dtype::U8, vec![2], vec![1, 2]),
        ],
    );
    let store = TensorStore::open(&path).unwrap();
    let read = |name: &str| {
        let t = store.get(name).unwrap();
        let mut out = vec![f32::NAN; t.numel()];
        store.read_f32(t, &mut out).map(|()| out)
    };
    let same_bits = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(
        same_bits(&read("h").unwrap(), &f16_values),
        "{:?}",
        read("h")
    );
    assert!(
        same_bits(&read("b").unwrap(), &bf16_values),
        "{:?}",
        read("b")
    );
    assert_eq!(read("f").unwrap(), [1.5, -0.25]);
    assert_eq!(read("i").unwrap(), [-3.0, (1u64 << 40) as f32]);
    assert_eq!(store.get("u").unwrap().dtype, DType::Other);
    assert_one_line(&read("u").err().unwrap(), &["`u`", "cannot compute with"]);
    let weights = Weights::new(std::sync::Arc::new(store), "");
    assert!(same_bits(
        &weights.param("b", &[7]).unwrap().to_f32(),
        &bf16_values
    ));
    assert_one_line(
        &weights.param("i", &[2]).err().unwrap(),
        &["`i`", "i64", "expected a float or GGML block type"],
    );
}

#[test]
fn every_f16_value_converts_exactly_whatever_the_range() {
    // All 2^16 bit patterns, read whole and in ranges that start and end off the converter's
    // internal chunking (it stages values through a small buffer, vectorised).
    let bits: Vec<u16> = (0..=u16::MAX).collect();
    let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let path = temp_dir("f16_all").join("all.safetensors");
    write_tensors(&path, &[("h".into(), Dtype::F16, vec![bits.len()], bytes)]);
    let store = TensorStore::open(&path).unwrap();
    let info = store.get("h").unwrap();
    let want: Vec<f32> = bits
        .iter()
        .map(|&b| half::f16::from_bits(b).to_f32())
        .collect();
    for (first, len) in [(0, bits.len()), (1, 511), (3, 1025), (65_000, 536)] {
        let mut out = vec![0.0f32; len];
        store.read_f32_range(info, first, &mut out).unwrap();
        for (i, (got, want)) in out.iter().zip(&want[first..first + len]).enumerate() {
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "f16 bits {:#06x}: {got} vs {want}",
                first + i
            );
        }
    }
}

#[test]
fn old_clip_names_without_text_model_are_normalised() {
    let dir = temp_dir("old_clip");
    let old = "cond_stage_model.transformer.final_layer_norm.weight";
    let new = "cond_stage_model.transformer.text_model.final_layer_norm.weight";
    write_zeros(&dir.join("old.safetensors"), &[(old, vec![4])]);
    let store = TensorStore::open(&dir.join("old.safetensors")).unwrap();
    let names: Vec<&str> = store.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, [new]);
    // Both spellings in one file would be two tensors for one name.
    write_zeros(
        &dir.join("both.safetensors"),
        &[(old, vec![4]), (new, vec![4])],
    );
    assert_open_error(&dir.join("both.safetensors"), &["two tensors", new]);
}
