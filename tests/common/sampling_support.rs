//! What tests/sampling.rs and tests/sampling_families.rs share: reading the fixtures' JSON and
//! safetensors, the error measures and their tolerances, recorded step noise, the sampler list.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use sdcap::job::SamplerKind;
use sdcap::sampling::{NoiseSource, Schedule};
use serde_json::Value;

pub fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // Python's json writes -Infinity/NaN (e.g. lambda_min_clipped), which strict JSON lacks.
    let text = text
        .replace("-Infinity", "null")
        .replace("Infinity", "null")
        .replace("NaN", "null");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// All float32 tensors of a safetensors file, flattened.
pub struct Tensors(pub BTreeMap<String, Vec<f32>>);

impl Tensors {
    pub fn load(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
        let f32s = st
            .tensors()
            .into_iter()
            .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32);
        Tensors(
            f32s.map(|(name, v)| (name, v.data().chunks_exact(4).map(le_f32).collect()))
                .collect(),
        )
    }
    pub fn get(&self, name: &str) -> &[f32] {
        self.0
            .get(name)
            .unwrap_or_else(|| panic!("missing tensor {name}"))
    }
    /// How many of `prefix.0`, `prefix.1`, … exist.
    pub fn count(&self, prefix: &str) -> usize {
        (0..)
            .take_while(|i| self.0.contains_key(&format!("{prefix}.{i}")))
            .count()
    }
}

pub fn le_f32(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// Largest |a - b| / max|b| over two equal-length slices.
pub fn rel_err(found: &[f32], expected: &[f32]) -> f64 {
    assert_eq!(found.len(), expected.len(), "length");
    let scale = expected
        .iter()
        .fold(0f64, |m, &v| m.max(f64::from(v).abs()));
    let diff = found.iter().zip(expected).fold(0f64, |m, (&a, &b)| {
        m.max((f64::from(a) - f64::from(b)).abs())
    });
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// Largest elementwise relative error |a - b| / |b| (b = 0 compared absolutely).
pub fn elementwise_rel_err(found: &[f32], expected: &[f64]) -> f64 {
    assert_eq!(found.len(), expected.len(), "length");
    found.iter().zip(expected).fold(0f64, |m, (&a, &b)| {
        let d = (f64::from(a) - b).abs();
        m.max(if b == 0.0 { d } else { d / b.abs() })
    })
}

pub fn bad_request(r: sdcap::Result<Schedule>) -> String {
    match r {
        Err(sdcap::Error::BadRequest(msg)) => msg,
        other => panic!("expected BadRequest, got {other:?}"),
    }
}

/// Tables are float32 values printed as float64; ours come from the same float32/float64 recipe and are
/// bit-identical today. 1e-6 relative (~8 float32 ulps) leaves room for a libm pow/log that rounds the
/// other way, yet fails any real schedule error, which moves values by > 1e-4.
pub const TABLE_TOL: f64 = 1e-6;

/// Latents, as max |ours - ref| / max |ref|. The samplers repeat diffusers' float32 operations in
/// order; what remains are 1-ulp differences in a few float32 scalar coefficients (torch's 0-dim
/// sqrt/exp/log vs libm), seen as ≤ 2.4e-7 over 4 steps (Euler is bit-exact). 2e-6 is ~8x that, still
/// far below what a wrong formula, alpha or sigma gives (> 1e-4), and inside the brief's 1e-5.
pub const LATENT_TOL: f64 = 2e-6;

/// Recorded step noise, handed out in order; counts the draws.
pub struct Recorded {
    pub draws: Vec<Vec<f32>>,
    pub taken: usize,
}

impl NoiseSource for Recorded {
    fn noise(&mut self, len: usize) -> Vec<f32> {
        let recorded = self.draws.len();
        let z = self.draws.get(self.taken).cloned();
        let z = z.unwrap_or_else(|| panic!("noise draw #{} of {recorded} recorded", self.taken));
        assert_eq!(z.len(), len);
        self.taken += 1;
        z
    }
}

/// The first five are the original ones, the rest issue 15's; all but DDIM and LCM are sigma-based.
pub const ALL_SAMPLERS: [SamplerKind; 10] = [
    SamplerKind::Euler,
    SamplerKind::EulerA,
    SamplerKind::DpmPp2m,
    SamplerKind::Ddim,
    SamplerKind::Lcm,
    SamplerKind::Heun,
    SamplerKind::DpmPp2mSde,
    SamplerKind::Dpm2,
    SamplerKind::UniPc,
    SamplerKind::Lms,
];

impl Recorded {
    /// The `step_noise.i` draws of a golden run.
    pub fn from_run(run: &Tensors) -> Self {
        Recorded {
            draws: (0..run.count("step_noise"))
                .map(|i| run.get(&format!("step_noise.{i}")).to_vec())
                .collect(),
            taken: 0,
        }
    }
}

/// A recorded UNet output as the sampler gets it: as is for a batch of 1, else `u + g·(c − u)` of
/// its [uncond, cond] halves.
pub fn guided(out: &[f32], latent_len: usize, guidance: f32) -> Vec<f32> {
    match out.len() / latent_len {
        1 => out.to_vec(),
        2 => {
            let (u, c) = out.split_at(latent_len);
            u.iter()
                .zip(c)
                .map(|(u, c)| u + guidance * (c - u))
                .collect()
        }
        b => panic!("unet batch {b}"),
    }
}
