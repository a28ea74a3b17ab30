//! Round trips (quantize → dequantize) stay within per-type error bounds for both quantizers, edge
//! inputs behave, and misuse panics.

mod common;

use common::{inputs, Rng};
use quant::GgmlType;

fn round_trip(ty: GgmlType, x: &[f32], quality: bool) -> Vec<f32> {
    let info = ty.info();
    let mut bytes = vec![0u8; x.len() / info.block_elems * info.block_bytes];
    if quality {
        quant::quantize_quality_rows(ty, x, 256, &mut bytes);
    } else {
        quant::quantize(ty, x, &mut bytes);
    }
    let mut y = vec![0.0f32; x.len()];
    quant::dequantize(ty, &bytes, &mut y);
    y
}

/// RMS error relative to the input's RMS.
fn rel_rmse(x: &[f32], y: &[f32]) -> f64 {
    let err: f64 = x
        .iter()
        .zip(y)
        .map(|(&a, &b)| ((a - b) as f64).powi(2))
        .sum();
    let sig: f64 = x.iter().map(|&a| (a as f64).powi(2)).sum();
    (err / sig).sqrt()
}

/// Upper bounds on the relative RMS error, with some margin over the worst measured value (input
/// `a`, N(0,1); in the comments: reference / quality quantizer).
fn bound(ty: GgmlType) -> f64 {
    match ty {
        GgmlType::F32 => 0.0,
        GgmlType::F16 => 3e-4,    // 2.1e-4
        GgmlType::BF16 => 2.5e-3, // 1.8e-3
        GgmlType::Q8_0 => 0.007,  // 0.0055
        GgmlType::Q4_0 => 0.10,   // 0.0885 / 0.0832
        GgmlType::Q4_1 => 0.09,   // 0.0795 / 0.0714
        GgmlType::Q5_0 => 0.05,   // 0.0436 / 0.0415
        GgmlType::Q5_1 => 0.045,  // 0.0386 / 0.0346
        GgmlType::Q2K => 0.35,    // 0.3045 / 0.2726
        GgmlType::Q3K => 0.18,    // 0.1541 / 0.1473
        GgmlType::Q4K => 0.085,   // 0.0729 / 0.0719
        GgmlType::Q5K => 0.045,   // 0.0368 / 0.0360
        GgmlType::Q6K => 0.022,   // 0.0180 / 0.0176
    }
}

#[test]
fn round_trip_error_is_bounded() {
    let inputs = inputs();
    let mut rng = Rng(7);
    let random: Vec<f32> = (0..8192).map(|_| rng.normal(0.02)).collect();
    for ty in GgmlType::all() {
        for (name, x) in [
            ("a", &inputs["a"]),
            ("c64k", &inputs["c64k"]),
            ("random", &random),
        ] {
            let r = rel_rmse(x, &round_trip(ty, x, false));
            let q = rel_rmse(x, &round_trip(ty, x, true));
            println!("{:5} {name:6} reference {r:.5} quality {q:.5}", ty.name());
            assert!(
                r <= bound(ty) && q <= bound(ty),
                "{} {name}: {r} / {q} > {}",
                ty.name(),
                bound(ty)
            );
            if quant::has_quality_quantizer(ty) {
                // The error-minimising quantizer should not be worse by more than a hair.
                assert!(
                    q <= r * 1.02,
                    "{} {name}: quality {q} worse than reference {r}",
                    ty.name()
                );
            }
        }
    }
}

fn both_quantizers(ty: GgmlType, x: &[f32]) -> [Vec<f32>; 2] {
    [round_trip(ty, x, false), round_trip(ty, x, true)]
}

#[test]
fn all_zero_input_gives_zeros() {
    let x = vec![0.0f32; 512];
    for ty in GgmlType::all() {
        for y in both_quantizers(ty, &x) {
            assert!(y.iter().all(|&v| v == 0.0), "{}: {:?}", ty.name(), &y[..4]);
        }
    }
}

#[test]
fn tiny_scales_underflow_as_ggml_does() {
    // Edge run 5: 1e-6 * N(0,1). Q8_0's scale (amax/127) rounds to f16 zero, so every value dequantizes
    // to 0 while the int8 quants stay non-zero; Q4_0's scale (amax/8) survives as an f16 subnormal.
    let run = &inputs()["edge"][1280..1536];
    let info = GgmlType::Q8_0.info();
    let mut bytes = vec![0u8; run.len() / 32 * info.block_bytes];
    quant::quantize(GgmlType::Q8_0, run, &mut bytes);
    for block in bytes.chunks_exact(34) {
        assert_eq!(&block[..2], [0, 0], "Q8_0 scale must underflow to 0");
        assert!(
            block[2..].iter().any(|&q| q != 0),
            "Q8_0 quants stay non-zero"
        );
    }
    assert!(round_trip(GgmlType::Q8_0, run, false)
        .iter()
        .all(|&v| v == 0.0));

    let mut bytes = vec![0u8; run.len() / 32 * 18];
    quant::quantize(GgmlType::Q4_0, run, &mut bytes);
    for block in bytes.chunks_exact(18) {
        let d = u16::from_le_bytes([block[0], block[1]]);
        assert!(
            d & 0x7C00 == 0 && d & 0x03FF != 0,
            "Q4_0 scale {d:#06x} should be an f16 subnormal"
        );
    }
    let y = round_trip(GgmlType::Q4_0, run, false);
    assert!(
        rel_rmse(run, &y) < 0.5,
        "subnormal-scale Q4_0 still tracks the values"
    );
    for ty in [GgmlType::Q6K, GgmlType::Q8_0] {
        for y in both_quantizers(ty, run) {
            assert!(
                y.iter().all(|&v| v == 0.0),
                "{}: scales round to f16 zero",
                ty.name()
            );
        }
    }
}

#[test]
fn non_finite_and_subnormal_inputs_do_not_panic() {
    let mut x: Vec<f32> = (0..1024).map(|i| (i as f32 * 0.37).sin()).collect();
    x[3] = f32::NAN;
    x[300] = f32::INFINITY;
    x[600] = f32::NEG_INFINITY;
    x[700..800].fill(1e-40);
    x[900] = f32::MAX;
    for ty in GgmlType::all() {
        let _ = both_quantizers(ty, &x);
        let _ = both_quantizers(ty, &vec![1e-40f32; 512]);
    }
}

#[test]
fn quality_rows_split_the_row_statistics() {
    // q4_0's quality quantizer weights values by the mean square of the whole row, so the row length
    // matters; the reference quantizer and the k-quants' quality quantizers look only inside a block.
    let x = &inputs()["b"];
    let mut whole = vec![0u8; x.len() / 32 * 18];
    let mut rows = whole.clone();
    quant::quantize_quality(GgmlType::Q4_0, x, &mut whole);
    quant::quantize_quality_rows(GgmlType::Q4_0, x, 256, &mut rows);
    assert_ne!(whole, rows);
    let mut whole = vec![0u8; x.len() / 256 * 144];
    let mut rows = whole.clone();
    quant::quantize_quality(GgmlType::Q4K, x, &mut whole);
    quant::quantize_quality_rows(GgmlType::Q4K, x, 512, &mut rows);
    assert_eq!(whole, rows);
}

#[test]
fn table_is_consistent() {
    let mut ids = std::collections::HashSet::new();
    for ty in GgmlType::all() {
        let info = ty.info();
        assert!(ids.insert(info.id), "duplicate id {}", info.id);
        assert_eq!(GgmlType::from_id(info.id), Some(ty));
        assert_eq!(GgmlType::from_name(info.name), Some(ty));
        assert_eq!(GgmlType::from_name(&info.name.to_uppercase()), Some(ty));
        assert_eq!(
            ty.bytes_for(info.block_elems as u64 * 3),
            Some(info.block_bytes as u64 * 3)
        );
        assert!(
            info.quantize.is_some(),
            "{}: every type has a reference quantizer",
            info.name
        );
    }
    let quality: Vec<_> = GgmlType::all()
        .filter(|&t| quant::has_quality_quantizer(t))
        .map(|t| t.name())
        .collect();
    assert_eq!(
        quality,
        ["q4_0", "q4_1", "q5_0", "q5_1", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K"]
    );
    assert_eq!(GgmlType::Q4K.bytes_for(255), None);
    assert_eq!(GgmlType::from_id(9), None); // q8_1: not a storage type here
}

#[test]
#[should_panic(expected = "dequantize q4_0")]
fn dequantize_rejects_partial_blocks() {
    quant::dequantize(GgmlType::Q4_0, &[0u8; 19], &mut [0.0; 32]);
}

#[test]
#[should_panic(expected = "dequantize q6_K")]
fn dequantize_scalar_rejects_short_output() {
    quant::dequantize_scalar(GgmlType::Q6K, &[0u8; 210], &mut [0.0; 255]);
}

#[test]
#[should_panic(expected = "quantize q8_0")]
fn quantize_rejects_partial_blocks() {
    quant::quantize(GgmlType::Q8_0, &[0.0; 33], &mut [0u8; 34]);
}

#[test]
#[should_panic(expected = "quantize q4_K")]
fn quantize_quality_rejects_wrong_output() {
    quant::quantize_quality(GgmlType::Q4K, &[0.0; 256], &mut [0u8; 143]);
}

#[test]
#[should_panic(expected = "row length")]
fn quality_rows_reject_bad_row_length() {
    quant::quantize_quality_rows(GgmlType::Q4_0, &[0.0; 96], 48, &mut [0u8; 54]);
}
