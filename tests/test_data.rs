//! `tests/data`, the test data the repository carries: its size budget, its MANIFEST, its deltas, the
//! token rows it drops (and that using one is caught); and `quant/tests/data`, the quant crate's.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{carried, crc32, data_dir, files_below, read_tensors, Delta};
use sdcap::nn::clip::{TextActivation, TextEncoder, TextOutput};
use sdcap::weights::{TensorStore, Weights};
use sdcap::Tensor;

const MB: u64 = 1_000_000;
/// Everything but the other families' folders: the SD1 model's data, goldens, rng, tokenizer, tools.
const SD1_BUDGET: u64 = 40 * MB;
/// Each of `tiny-sd2/` and `tiny-sdxl/`.
const FAMILY_BUDGET: u64 = 15 * MB;
/// All of `tests/data`.
const TOTAL_BUDGET: u64 = 55 * MB;
/// `quant/tests/data`.
const QUANT_BUDGET: u64 = 5 * MB;
const FAMILIES: [&str; 2] = ["tiny-sd2", "tiny-sdxl"];
/// Files of the folder itself, not data.
const OWN_FILES: [&str; 3] = ["MANIFEST", "README.md", "refresh.py"];

/// `quant/tests/data`: the quant crate's vectors, refreshed by the same script.
fn quant_data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("quant/tests/data")
}

fn size(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum()
}

#[test]
fn data_folder_keeps_its_budget() {
    let data = data_dir();
    let files = files_below(&data);
    let family = |f: &Path, name: &str| f.strip_prefix(&data).unwrap().starts_with(name);
    let sd1: Vec<_> = files
        .iter()
        .filter(|f| !FAMILIES.iter().any(|n| family(f, n)))
        .cloned()
        .collect();
    let sd1_size = size(&sd1);
    eprintln!("tests/data SD1: {sd1_size} bytes (budget {SD1_BUDGET})");
    assert!(
        sd1_size <= SD1_BUDGET,
        "tests/data holds {sd1_size} bytes of SD1 data, over its budget of {SD1_BUDGET}: trim MANIFEST \
         (keys=, delta=) or raise the budget here and in tests/data/README.md"
    );
    for name in FAMILIES {
        let mine: Vec<_> = files.iter().filter(|f| family(f, name)).cloned().collect();
        let bytes = size(&mine);
        eprintln!("tests/data/{name}: {bytes} bytes (budget {FAMILY_BUDGET})");
        assert!(
            bytes <= FAMILY_BUDGET,
            "tests/data/{name} holds {bytes} bytes, over its budget of {FAMILY_BUDGET}"
        );
    }
    let total = size(&files);
    eprintln!("tests/data: {total} bytes (budget {TOTAL_BUDGET})");
    assert!(
        total <= TOTAL_BUDGET,
        "tests/data holds {total} bytes, over its budget of {TOTAL_BUDGET}"
    );
    let quant = size(&files_below(&quant_data_dir()));
    eprintln!("quant/tests/data: {quant} bytes (budget {QUANT_BUDGET})");
    assert!(
        quant <= QUANT_BUDGET,
        "quant/tests/data holds {quant} bytes, over its budget of {QUANT_BUDGET}"
    );
}

/// The MANIFEST's entries of a data folder: (path, is a folder, is a delta).
fn manifest(data: &Path) -> Vec<(String, bool, bool)> {
    let text = std::fs::read_to_string(data.join("MANIFEST")).unwrap();
    text.lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut words = l.split_whitespace();
            let path = words.next().unwrap();
            let delta = words.any(|w| w.starts_with("delta=") || w.starts_with("rows="));
            (
                path.trim_end_matches('/').to_string(),
                path.ends_with('/'),
                delta,
            )
        })
        .collect()
}

/// Every file of each data folder comes from a MANIFEST line (a file put there by hand would be lost at
/// the next refresh), and every file line of MANIFEST is there (as `PATH.delta` for a delta).
#[test]
fn data_folder_holds_what_manifest_names() {
    for data in [data_dir(), quant_data_dir()] {
        holds_what_manifest_names(&data);
    }
}

fn holds_what_manifest_names(data: &Path) {
    let entries = manifest(data);
    assert!(
        entries.len() > 10,
        "MANIFEST lists {} entries",
        entries.len()
    );
    for file in files_below(data) {
        let rel = file
            .strip_prefix(data)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        if OWN_FILES.contains(&rel.as_str()) {
            continue;
        }
        let listed = entries.iter().any(|(path, folder, delta)| {
            if *folder {
                rel.starts_with(&format!("{path}/"))
            } else if *delta {
                rel == format!("{path}.delta")
            } else {
                rel == *path
            }
        });
        assert!(listed, "{}/{rel} is not in its MANIFEST", data.display());
    }
    for (path, folder, delta) in &entries {
        let there = match (folder, delta) {
            (true, _) => data.join(path).is_dir(),
            (false, true) => data.join(format!("{path}.delta")).is_file(),
            (false, false) => data.join(path).is_file(),
        };
        assert!(
            there,
            "MANIFEST names {path}, which {} lacks: run tests/data/refresh.py",
            data.display()
        );
    }
}

#[test]
fn crc32_is_zlibs() {
    // The check value of CRC-32/ISO-HDLC, and Python's zlib.crc32(b"sdcap").
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32(b""), 0);
    assert_eq!(crc32(b"sdcap"), 0xAA66_53F5);
}

/// Every delta rebuilds a file of its recorded size and CRC-32, and one changed byte is caught.
#[test]
fn deltas_rebuild_and_a_changed_byte_is_caught() {
    let deltas: Vec<_> = files_below(&data_dir())
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "delta"))
        .collect();
    assert!(!deltas.is_empty());
    for file in &deltas {
        let rebuilt = Delta::read(file).rebuild(file);
        eprintln!("{}: {} bytes", file.display(), rebuilt.len());
    }
    // A delta with literal bytes, one of them changed: the rebuild must refuse it.
    let file = deltas
        .iter()
        .max_by_key(|f| std::fs::metadata(f).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let bad = Path::new(env!("CARGO_TARGET_TMPDIR")).join("changed.delta");
    std::fs::write(&bad, &bytes).unwrap();
    let delta = Delta::read(&bad);
    let caught = std::panic::catch_unwind(|| delta.rebuild(&bad));
    assert!(caught.is_err(), "a changed byte was not caught");
}

/// The tables `tests/data` keeps only some rows of (MANIFEST `rows=`): (family, file, tensor).
const TRIMMED: [(&str, &str, &str); 5] = [
    (
        "tiny-sd2",
        "tiny-sd2-fp32.safetensors",
        "cond_stage_model.model.token_embedding.weight",
    ),
    (
        "tiny-sd2",
        "diffusers/text_encoder/model.safetensors",
        "text_model.embeddings.token_embedding.weight",
    ),
    (
        "tiny-sdxl",
        "tiny-sdxl-fp32.safetensors",
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
    ),
    (
        "tiny-sdxl",
        "tiny-sdxl-fp32.safetensors",
        "conditioner.embedders.1.model.token_embedding.weight",
    ),
    (
        "tiny-sdxl",
        "diffusers/text_encoder_2/model.safetensors",
        "text_model.embeddings.token_embedding.weight",
    ),
];

/// The token ids of a family's goldens (MANIFEST `ids=`): every id of `golden/tokens.safetensors`
/// and every integer of a list in `golden/tokenizer_cases.json`.
fn golden_ids(data: &Path, family: &str) -> BTreeSet<usize> {
    fn walk(v: &serde_json::Value, in_list: bool, ids: &mut BTreeSet<usize>) {
        match v {
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, true, ids)),
            serde_json::Value::Object(o) => o.values().for_each(|x| walk(x, false, ids)),
            serde_json::Value::Number(n) if in_list => {
                ids.insert(n.as_u64().expect("a token id") as usize);
            }
            _ => {}
        }
    }
    let golden = data.join(family).join("golden");
    let mut ids: BTreeSet<usize> = read_tensors(&golden.join("tokens.safetensors"))
        .values()
        .flat_map(|t| t.data.iter().map(|&v| v as usize))
        .collect();
    walk(
        &common::read_manifest(&golden.join("tokenizer_cases.json")),
        false,
        &mut ids,
    );
    ids
}

fn rows(path: &Path, name: &str) -> Vec<Vec<f32>> {
    let store = TensorStore::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let t = store.get(name).unwrap_or_else(|| panic!("{name}"));
    let mut values = vec![0.0; t.numel()];
    store.read_f32(t, &mut values).unwrap();
    values.chunks(t.shape[1]).map(<[f32]>::to_vec).collect()
}

/// The carried token tables hold exactly the rows of the goldens' token ids, each equal to the full
/// fixture's where that is at hand; every other row is NaN.
#[test]
fn token_tables_keep_exactly_the_golden_rows() {
    let data = carried();
    let full = std::env::var_os("SDCAP_FIXTURES").map(PathBuf::from);
    for (family, file, tensor) in TRIMMED {
        let ids = golden_ids(&data, family);
        // The prompts of the goldens: BOS, EOS, "!" = 0 (OpenCLIP padding), "a" = 320, "cat" = 2368.
        for id in [49406, 49407, 0, 320, 2368] {
            assert!(ids.contains(&id), "{family}: id {id}");
        }
        let table = rows(&data.join(family).join(file), tensor);
        assert_eq!(table.len(), 49408, "{file} {tensor}");
        let kept: BTreeSet<usize> = (0..table.len())
            .filter(|&i| table[i].iter().all(|v| v.is_finite()))
            .collect();
        assert_eq!(kept, ids, "{family}/{file} {tensor}: rows kept");
        for (i, row) in table.iter().enumerate() {
            assert!(
                kept.contains(&i) || row.iter().all(|v| v.is_nan()),
                "{family}/{file} {tensor}: row {i} partly NaN"
            );
        }
        if let Some(full) = &full {
            let whole = rows(&full.join(family).join(file), tensor);
            for &i in &ids {
                assert!(table[i] == whole[i], "{family}/{file} {tensor}: row {i}");
            }
        }
        eprintln!("{family}/{file} {tensor}: {} rows kept", kept.len());
    }
}

/// A prompt with a token whose row was dropped cannot pass for a right answer: the encoder's output is
/// NaN, which the pipeline's finiteness check refuses and `assert_close` fails on.
#[test]
fn a_dropped_token_row_is_caught() {
    common::compute_threads();
    let data = carried();
    let store =
        Arc::new(TensorStore::open(&data.join("tiny-sd2/tiny-sd2-fp32.safetensors")).unwrap());
    let encoder = TextEncoder::with_activation(
        &Weights::new(store, "cond_stage_model.model"),
        TextActivation::Gelu,
    )
    .unwrap();
    let ids = golden_ids(&data, "tiny-sd2");
    let dropped = (1..49406).find(|i| !ids.contains(i)).unwrap() as u32;
    let request = TextOutput {
        skip_layers: 1,
        final_norm: true,
        pooled: false,
    };
    let encode = |ids: &[u32]| {
        let hidden = encoder
            .encode(ids, 1, request, &sdcap::nn::Ctx::default())
            .unwrap()
            .hidden;
        Tensor::new(vec![1, ids.len(), 32], hidden)
    };
    // "a photo of a cat": kept rows, finite output.
    let good = encode(&[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert!(sdcap::sampling::check_finite("text encoder", String::new, &good.data).is_ok());
    let bad = encode(&[49406, 320, dropped, 539, 320, 2368, 49407]);
    let err = sdcap::sampling::check_finite("text encoder", String::new, &bad.data).unwrap_err();
    assert!(err.to_string().contains("NaN"), "{err}");
    let caught = std::panic::catch_unwind(|| common::assert_close("dropped", &bad, &good, 1e-5));
    assert!(caught.is_err(), "assert_close passed a NaN output");
}
