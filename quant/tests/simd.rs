//! The fast (AVX2/F16C) dequantizers against the scalar ones, bit for bit: on random blocks (every
//! byte random, so scales include subnormals, infinities and NaNs), on ragged lengths, and on every
//! fixture's bytes.

mod common;

use common::{first_bit_mismatch, fixture_dir, load, Rng};
use quant::GgmlType;

fn compare(ty: GgmlType, bytes: &[u8], what: &str) {
    let n = bytes.len() / ty.info().block_bytes * ty.info().block_elems;
    let mut scalar = vec![0.0f32; n];
    let mut fast = vec![1.0f32; n];
    quant::dequantize_scalar(ty, bytes, &mut scalar);
    quant::dequantize(ty, bytes, &mut fast);
    if let Some((i, g, w)) = first_bit_mismatch(&fast, &scalar) {
        panic!(
            "{} {what}: value {i}: fast {g:e} ({:#x}) scalar {w:e} ({:#x})",
            ty.name(),
            g.to_bits(),
            w.to_bits()
        );
    }
}

#[test]
fn fast_paths_exist_where_promised() {
    let fast: Vec<_> = GgmlType::all()
        .filter(|t| t.info().dequantize_fast.is_some())
        .map(|t| t.name())
        .collect();
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        fast,
        ["f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_K", "q6_K"]
    );
    #[cfg(not(target_arch = "x86_64"))]
    assert!(fast.is_empty());
    println!(
        "SIMD dequantizers active on this CPU: {}",
        quant::has_fast_dequantizer(GgmlType::Q4_0)
    );
}

#[test]
fn random_blocks_match_scalar() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for ty in GgmlType::all() {
        let bb = ty.info().block_bytes;
        for blocks in [1, 2, 3, 7, 64, 257] {
            let bytes = rng.bytes(blocks * bb);
            compare(ty, &bytes, &format!("{blocks} random blocks"));
        }
    }
}

#[test]
fn random_blocks_with_finite_scales_match_scalar() {
    // Bias toward realistic blocks: small f16 scales, so values are finite and non-trivial.
    let mut rng = Rng(42);
    for ty in GgmlType::all() {
        let info = ty.info();
        let values: Vec<f32> = (0..info.block_elems * 512)
            .map(|_| rng.normal(0.05))
            .collect();
        let mut bytes = vec![0u8; values.len() / info.block_elems * info.block_bytes];
        quant::quantize(ty, &values, &mut bytes);
        compare(ty, &bytes, "quantized normal values");
        // Flip random low bits of every byte (quants and scale mantissas) to reach every level pattern.
        for b in bytes.iter_mut() {
            *b ^= (rng.next_u64() >> 60) as u8;
        }
        compare(ty, &bytes, "perturbed blocks");
    }
}

#[test]
fn fixture_bytes_match_scalar() {
    let mut checked = 0;
    for entry in std::fs::read_dir(fixture_dir()).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        let Some(ty) = GgmlType::from_name(&stem) else {
            continue;
        };
        for (key, t) in load(&path).tensors {
            if key.contains(".bytes") {
                compare(ty, &t.data, &key);
                checked += 1;
            }
        }
    }
    // F16 4, BF16 4, Q8_0 4, four legacy x 8, five k-quants x 8; the carried subset has no c / c64k.
    if common::full_set() {
        assert_eq!(checked, 4 + 4 + 4 + 4 * 8 + 5 * 8);
    } else {
        assert_eq!(checked, 3 + 3 + 3 + 4 * 6 + 5 * 6);
    }
}
