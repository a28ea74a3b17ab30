//! Shared fixture access for the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

/// `$SDCAP_FIXTURES/quant` (the full vectors of the project's fixtures folder), else `tests/data` of this
/// crate: the subset the repository carries (every input; of each type's file, the keys of the inputs
/// `a`, `b` and `edge`; see its MANIFEST and `tests/data/README.md` of the workspace).
pub fn fixture_dir() -> PathBuf {
    match std::env::var_os("SDCAP_FIXTURES") {
        Some(dir) => PathBuf::from(dir).join("quant"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data"),
    }
}

/// Whether [`fixture_dir`] holds the full vectors (with the `c` / `c64k` keys) rather than the subset.
pub fn full_set() -> bool {
    std::env::var_os("SDCAP_FIXTURES").is_some()
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One tensor of a fixture file: dtype, shape, raw little-endian bytes.
pub struct Tensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Tensor {
    pub fn f32s(&self) -> Vec<f32> {
        assert_eq!(self.dtype, Dtype::F32);
        self.data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}

/// A safetensors file: its metadata and every tensor, by name.
pub struct File {
    pub metadata: BTreeMap<String, String>,
    pub tensors: BTreeMap<String, Tensor>,
}

pub fn load(path: &Path) -> File {
    let raw = read(path);
    let (_, meta) = SafeTensors::read_metadata(&raw).expect("safetensors header");
    let metadata = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let st = SafeTensors::deserialize(&raw).expect("safetensors");
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let t = Tensor {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                data: view.data().to_vec(),
            };
            (name, t)
        })
        .collect();
    File { metadata, tensors }
}

/// The float inputs by fixture name: `a`, `b`, `edge`, `c` and `c64k` (the first 65,536 values of `c`).
pub fn inputs() -> BTreeMap<String, Vec<f32>> {
    let file = load(&fixture_dir().join("inputs.safetensors"));
    let mut out: BTreeMap<String, Vec<f32>> = file
        .tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.f32s()))
        .collect();
    assert_eq!(out.keys().collect::<Vec<_>>(), ["a", "b", "c", "edge"]);
    let c64k = out["c"][..65_536].to_vec();
    out.insert("c64k".into(), c64k);
    out
}

/// Small deterministic generator (xorshift64*) for random blocks.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next_u64() >> 56) as u8).collect()
    }

    /// Roughly normal (sum of uniforms), scaled.
    pub fn normal(&mut self, scale: f32) -> f32 {
        let s: f32 = (0..4)
            .map(|_| (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
            .sum();
        (s - 2.0) * 1.732 * scale
    }
}

/// Index of the first differing bit pattern, with both values.
pub fn first_bit_mismatch(got: &[f32], want: &[f32]) -> Option<(usize, f32, f32)> {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .position(|(g, w)| g.to_bits() != w.to_bits())
        .map(|i| (i, got[i], want[i]))
}
