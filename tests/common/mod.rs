//! Shared helpers for the integration tests: fixture paths and reading reference tensors.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};
use sdcap::job::{Job, RngKind, SamplerKind, ScheduleKind};
use sdcap::weights::{TensorStore, Weights};
use sdcap::Tensor;

/// `$SDCAP_FIXTURES`, else `shared/fixtures` in the crate folder or one of its parents.
pub fn fixtures() -> PathBuf {
    if let Ok(dir) = std::env::var("SDCAP_FIXTURES") {
        return PathBuf::from(dir);
    }
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    loop {
        let candidate = dir.join("shared/fixtures");
        if candidate.is_dir() {
            return candidate;
        }
        assert!(dir.pop(), "fixtures not found: set SDCAP_FIXTURES");
    }
}

/// Sets up threads as the CLI does (`start_pool`): the global rayon pool's workers and the calling
/// test thread flush denormals. Called first by every test that compares numbers.
pub fn compute_threads() {
    static POOL: std::sync::Once = std::sync::Once::new();
    POOL.call_once(|| {
        // Fails only if rayon's default pool was started first; the assert below then says so.
        let _ = sdcap::kernels::compute_pool(0).build_global();
    });
    sdcap::kernels::flush_denormals();
    let workers = rayon::broadcast(|_| sdcap::kernels::denormals_flushed());
    assert!(
        workers.iter().all(|&f| f),
        "the global pool was started without compute_threads()"
    );
}

pub fn tiny(rel: &str) -> PathBuf {
    fixtures().join("tiny-sd").join(rel)
}

/// Every float32 / int64 tensor of a reference file, as f32.
pub fn read_tensors(path: &std::path::Path) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("reference file parses");
    st.tensors()
        .into_iter()
        .filter_map(|(name, view)| {
            let data: Vec<f32> = match view.dtype() {
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                Dtype::I64 => view
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
                Dtype::U8 => view.data().iter().map(|&b| b as f32).collect(),
                _ => return None,
            };
            Some((name, Tensor::new(view.shape().to_vec(), data)))
        })
        .collect()
}

pub fn tiny_weights(prefix: &str) -> Weights {
    let store = TensorStore::open(&tiny("tiny-sd-fp32.safetensors")).expect("tiny model opens");
    Weights::new(Arc::new(store), prefix)
}

/// Asserts max|got - want| ≤ rel · max|want| (the 1e-4 relative criterion).
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, rel: f32) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let err = got.max_abs_diff(want);
    let scale = want.max_abs();
    assert!(
        err <= rel * scale,
        "{what}: max abs error {err:e} > {rel:e} × {scale}"
    );
    eprintln!("{what}: max abs error {err:e} (≤ {rel:e} × {scale})");
}

/// A fixture manifest. Python's json writes `-Infinity`/`Infinity`/`NaN`, which JSON (and
/// serde_json) does not have; they only appear in scheduler configs we do not read, so they become null.
pub fn read_manifest(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let text = text
        .replace("-Infinity", "null")
        .replace("Infinity", "null")
        .replace("NaN", "null");
    serde_json::from_str(&text).expect("manifest parses")
}

/// The reference job of the fixtures: "a photo of a cat", euler, seed 42, 64×64, 4 steps, cfg 7.5.
pub fn job(model: PathBuf) -> Job {
    Job {
        model,
        vae: None,
        prompt: "a photo of a cat".into(),
        negative: String::new(),
        width: 64,
        height: 64,
        steps: 4,
        cfg_scale: 7.5,
        sampler: SamplerKind::Euler,
        scheduler: ScheduleKind::Discrete,
        seed: 42,
        clip_skip: 1,
        rng: RngKind::Cpu,
        ram_cap: None,
        prediction: None,
        size_cond: Default::default(),
    }
}
