//! `sdcap inspect`: every container the loader reads, an unsupported family, unreadable files.

mod common;

use std::collections::HashMap;
use std::process::{Command, Output};

use common::tiny;
use sdcap::inspect::{inspect, Format};

const BIN: &str = env!("CARGO_BIN_EXE_sdcap");

fn sdcap(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run sdcap")
}

fn json(path: &str) -> serde_json::Value {
    let run = sdcap(&["inspect", "--json", path]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&run.stdout).expect("inspect --json prints JSON")
}

/// type → (tensors, bytes)
fn types(v: &serde_json::Value) -> HashMap<String, (u64, u64)> {
    v["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["type"].as_str().unwrap().to_string(),
                (t["tensors"].as_u64().unwrap(), t["bytes"].as_u64().unwrap()),
            )
        })
        .collect()
}

#[test]
fn safetensors_file() {
    let path = tiny("tiny-sd-fp32.safetensors");
    let v = json(path.to_str().unwrap());
    assert_eq!(v["format"], "safetensors");
    assert_eq!(v["family"], "SD1.x");
    assert_eq!(v["supported"], true);
    assert_eq!(v["tensors"], 469);
    let t = types(&v);
    assert_eq!(t["f32"].0, 468);
    assert_eq!(t["i64"], (1, 77 * 8));
    // Tensor bytes: the file less its header.
    let file = std::fs::metadata(&path).unwrap().len();
    let total = v["total_bytes"].as_u64().unwrap();
    assert!(total < file && file - total < 100_000, "{total} of {file}");
    assert!(v.get("gguf").is_none());

    let table = sdcap(&["inspect", path.to_str().unwrap()]);
    assert!(table.status.success());
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(text.contains("family:  SD1.x"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("total") && l.contains("469")),
        "{text}"
    );
}

#[test]
fn diffusers_folder() {
    let report = inspect(&tiny("diffusers")).unwrap();
    assert_eq!(report.format, Format::Diffusers);
    assert_eq!(report.family, "SD1.x");
    assert!(report.supported);
}

#[test]
fn gguf_from_stable_diffusion_cpp() {
    let v = json(tiny("gguf/tiny-sd-q4_0.gguf").to_str().unwrap());
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["family"], "SD1.x");
    assert_eq!(v["tensors"], 457);
    assert_eq!(v["gguf"]["version"], 3);
    assert_eq!(v["gguf"]["metadata_entries"], 0);
    assert_eq!(v["gguf"]["alignment"], 32);
    let t = types(&v);
    assert_eq!(t["q4_0"].0, 150);
    assert_eq!(t["f32"].0, 307);
}

/// A readable model of a family sdcap does not run is still described, with exit 0.
#[test]
fn unsupported_family_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sdxl.safetensors");
    let zeros = vec![0u8; 16];
    let view = |shape: Vec<usize>| {
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &zeros).unwrap()
    };
    let tensors = vec![
        (
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight".to_string(),
            view(vec![4]),
        ),
        (
            "model.diffusion_model.input_blocks.0.0.bias".to_string(),
            view(vec![2, 2]),
        ),
    ];
    safetensors::serialize_to_file(tensors, None, &path).unwrap();
    let v = json(path.to_str().unwrap());
    assert_eq!(v["family"], "SDXL refiner");
    assert_eq!(v["supported"], false);
    assert!(v["unsupported_reason"]
        .as_str()
        .unwrap()
        .contains("not supported"));
    assert_eq!(v["tensors"], 2);
}

#[test]
fn unreadable_files_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a model at all").unwrap();
    let missing = dir.path().join("missing.gguf");
    for path in [junk, missing] {
        let run = sdcap(&["inspect", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("sdcap: error: "), "{err}");
        assert!(run.stdout.is_empty());
    }
}
