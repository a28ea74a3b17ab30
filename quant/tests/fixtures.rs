//! Every key of every `quant/<TYPE>.safetensors` fixture file (`tests/data`, or the full set under
//! `$SDCAP_FIXTURES/quant`) checked bit for bit:
//! `X.bytes` = our reference quantizer, `X.bytes_sdcpp` = our quality quantizer (rows of 256, as the
//! fixtures were made), `X.dequant*` = both our dequantizers. A key or file this test does not
//! understand is a failure; the totals are asserted so nothing is skipped silently.

mod common;

use std::collections::BTreeMap;

use common::{first_bit_mismatch, fixture_dir, inputs, load};
use quant::GgmlType;
use safetensors::Dtype;

/// Fixture files of types this crate does not implement (not written by stable-diffusion.cpp).
const NOT_IMPLEMENTED: [&str; 3] = ["MXFP4", "TQ1_0", "TQ2_0"];

/// The row length the fixtures were quantized with.
const ROW: usize = 256;

#[derive(Default)]
struct Tally {
    checked: BTreeMap<String, usize>,
    failures: Vec<String>,
}

impl Tally {
    fn pass(&mut self, ty: &str, what: &str) {
        *self.checked.entry(format!("{ty} {what}")).or_default() += 1;
    }

    fn fail(&mut self, msg: String) {
        self.failures.push(msg);
    }
}

fn check_bytes(t: &mut Tally, ty: GgmlType, label: &str, got: &[u8], want: &[u8]) {
    if got == want {
        t.pass(ty.name(), label.split_once('.').unwrap().1);
    } else {
        let bb = ty.info().block_bytes;
        let bad: Vec<usize> = (0..want.len() / bb)
            .filter(|&i| got[i * bb..][..bb] != want[i * bb..][..bb])
            .collect();
        t.fail(format!(
            "{} {label}: {} of {} blocks differ, first {:?}",
            ty.name(),
            bad.len(),
            want.len() / bb,
            &bad[..bad.len().min(8)]
        ));
    }
}

fn check_floats(t: &mut Tally, ty: GgmlType, label: &str, got: &[f32], want: &[f32]) {
    match first_bit_mismatch(got, want) {
        None => t.pass(ty.name(), label.split_once('.').unwrap().1),
        Some((i, g, w)) => t.fail(format!(
            "{} {label}: value {i} is {g:e}, want {w:e}",
            ty.name()
        )),
    }
}

#[test]
fn every_fixture_key_is_bit_exact() {
    let inputs = inputs();
    let mut tally = Tally::default();
    let mut files = 0;
    let mut keys = 0;
    let mut unimplemented = Vec::new();

    let mut paths: Vec<_> = std::fs::read_dir(fixture_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for path in paths {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let Some(stem) = name.strip_suffix(".safetensors") else {
            continue;
        };
        if stem == "inputs" {
            continue;
        }
        let file = load(&path);
        assert_eq!(file.metadata["type"], stem, "{name}: metadata type");
        let Some(ty) = GgmlType::from_name(stem) else {
            assert!(
                NOT_IMPLEMENTED.contains(&stem),
                "{name}: unknown fixture type"
            );
            unimplemented.push(stem.to_string());
            continue;
        };
        files += 1;
        let info = ty.info();
        assert_eq!(
            file.metadata["block_size"],
            info.block_elems.to_string(),
            "{name}"
        );
        assert_eq!(
            file.metadata["type_size"],
            info.block_bytes.to_string(),
            "{name}"
        );

        for (key, tensor) in &file.tensors {
            keys += 1;
            let (input, kind) = key
                .split_once('.')
                .unwrap_or_else(|| panic!("{name}: key {key}"));
            let x = inputs
                .get(input)
                .unwrap_or_else(|| panic!("{name}: key {key}: unknown input"));
            let n_blocks = x.len() / info.block_elems;
            match kind {
                "bytes" | "bytes_sdcpp" => {
                    assert_eq!(tensor.dtype, Dtype::U8);
                    assert_eq!(tensor.shape, [n_blocks, info.block_bytes], "{name} {key}");
                    let mut got = vec![0u8; tensor.data.len()];
                    if kind == "bytes" {
                        quant::quantize(ty, x, &mut got);
                    } else {
                        quant::quantize_quality_rows(ty, x, ROW, &mut got);
                    }
                    check_bytes(&mut tally, ty, key, &got, &tensor.data);
                }
                "dequant" | "dequant_sdcpp" => {
                    let bytes_key = if kind == "dequant" {
                        "bytes"
                    } else {
                        "bytes_sdcpp"
                    };
                    let bytes = &file.tensors[&format!("{input}.{bytes_key}")].data;
                    let want = tensor.f32s();
                    let mut got = vec![f32::NAN; want.len()];
                    quant::dequantize_scalar(ty, bytes, &mut got);
                    check_floats(&mut tally, ty, key, &got, &want);
                    let mut fast = vec![f32::NAN; want.len()];
                    quant::dequantize(ty, bytes, &mut fast);
                    check_floats(&mut tally, ty, &format!("{key}(fast)"), &fast, &want);
                }
                _ => panic!("{name}: key {key}: unknown kind"),
            }
        }

        // Where the quality file equals the reference one, it is not stored: check that too.
        for (input, x) in &inputs {
            let Some(reference) = file.tensors.get(&format!("{input}.bytes")) else {
                continue;
            };
            if file.tensors.contains_key(&format!("{input}.bytes_sdcpp")) {
                continue;
            }
            assert!(
                !quant::has_quality_quantizer(ty) || ty == GgmlType::Q8_0,
                "{name}: {input} lacks bytes_sdcpp"
            );
            let mut got = vec![0u8; reference.data.len()];
            quant::quantize_quality_rows(ty, x, ROW.max(info.block_elems), &mut got);
            check_bytes(
                &mut tally,
                ty,
                &format!("{input}.bytes(quality=reference)"),
                &got,
                &reference.data,
            );
        }

        // F16's c has no dequant: it must equal the input exactly (the weight came from fp16). The
        // carried subset has no c keys.
        if ty == GgmlType::F16 && common::full_set() {
            let bytes = &file.tensors["c.bytes"].data;
            let mut got = vec![0.0; inputs["c"].len()];
            quant::dequantize(ty, bytes, &mut got);
            check_floats(&mut tally, ty, "c.dequant(=input)", &got, &inputs["c"]);
        }
    }

    for (what, n) in &tally.checked {
        println!("{what}: {n}");
    }
    assert!(
        tally.failures.is_empty(),
        "{} mismatches:\n{}",
        tally.failures.len(),
        tally.failures.join("\n")
    );
    unimplemented.sort();
    assert_eq!(unimplemented, NOT_IMPLEMENTED);
    assert_eq!(
        files, 12,
        "fixture files of implemented types (every table type but f32)"
    );
    let (want_keys, dequant_keys, derived) = if common::full_set() {
        (
            // F16 7 + BF16 8 + Q8_0 8 + four legacy x 15 (no c.dequant_sdcpp) + five k-quants x 16.
            7 + 8 + 8 + 4 * 15 + 5 * 16,
            // Every dequant key is checked twice (scalar and fast), plus the derived checks.
            3 + 4 + 4 + 4 * 7 + 5 * 8,
            // Quality = reference for Q8_0, F16 and BF16 on their 4 inputs each, and F16's c = input.
            3 * 4 + 1,
        )
    } else {
        // The carried subset, the keys of the 3 inputs a, b and edge: per input, F16, BF16 and Q8_0
        // have 2 (bytes, dequant), the four legacy types and five k-quants 4 (and their _sdcpp pair),
        // half of them dequant; quality = reference for Q8_0, F16 and BF16 on the 3 inputs.
        (3 * (3 * 2 + 4 * 4 + 5 * 4), 3 * (3 + 4 * 2 + 5 * 2), 3 * 3)
    };
    assert_eq!(keys, want_keys, "fixture keys checked");
    let total: usize = tally.checked.values().sum();
    assert_eq!(total, keys + dequant_keys + derived, "checks run");
}
