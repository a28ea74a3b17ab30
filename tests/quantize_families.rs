//! `sdcap quantize` for SD2.x and SDXL: single files and diffusers folders (built from the single files
//! at test time) → GGUF → `TensorStore` reads back every tensor under its name, dequantized within the
//! type's error; what is dropped is exactly sd.cpp's unused list (by name); `--compat sdcpp` writes the
//! names stable-diffusion.cpp reads.

mod common;
#[path = "common/diffusers_folder.rs"]
mod diffusers_folder;

use std::path::{Path, PathBuf};

use quant::GgmlType;
use sdcap::quantize::{self, Compat, Policy, Request};
use sdcap::weights::{DType, TensorStore};

fn temp_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("quantize_families")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn single(dir: &str) -> PathBuf {
    common::fixtures()
        .join(dir)
        .join(format!("{dir}-fp32.safetensors"))
}

fn policy(ty: GgmlType, compat: Option<Compat>) -> Policy {
    Policy {
        ty,
        rules: Vec::new(),
        compat,
    }
}

fn quantize(input: &Path, output: &Path, policy: Policy) -> sdcap::Result<quantize::Summary> {
    let req = Request {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        policy,
        quality: false,
        force: true,
    };
    quantize::quantize_model(&req, &mut |_| {}, &|| false)
}

fn values(store: &TensorStore, name: &str) -> Vec<f32> {
    let t = store.get(name).unwrap();
    let mut out = vec![0.0; t.numel()];
    store.read_f32(t, &mut out).unwrap();
    out
}

/// The largest error a value of a block may have after a round trip through `dtype`, given the block's
/// largest magnitude `amax` (GGML's reference quantizers): q8_0 rounds to d = amax/127, error ≤ d/2, plus
/// d's own f16 rounding over up to 127 steps (127·d·2⁻¹¹ ≈ 0.06·d): 0.6·d. q4_0 maps the largest
/// magnitude to −8·d, so values of the other sign clamp at 7·d: error ≤ d = amax/8 (+1% for d's f16
/// rounding). f16: half an ulp, 2⁻¹¹ relative (values here are far from f16's subnormals).
fn bound(dtype: DType, amax: f32, x: f32) -> f32 {
    match dtype {
        DType::F32 => 0.0,
        DType::F16 => x.abs() * 2f32.powi(-11),
        DType::Quant(GgmlType::Q8_0) => 0.6 * amax / 127.0,
        DType::Quant(GgmlType::Q4_0) => 1.01 * amax / 8.0,
        other => panic!("type {other:?} not expected here"),
    }
}

/// Every tensor of `input` is either dropped (and `dropped` says so, by name) or read back from `gguf`
/// under the same name and shape, within the type's error per block.
fn check_round_trip(input: &TensorStore, gguf: &TensorStore, dropped: &dyn Fn(&str) -> bool) {
    let mut compared = 0;
    for t in input.tensors() {
        let Some(g) = gguf.get(&t.name) else {
            assert!(dropped(&t.name), "`{}` missing from the GGUF", t.name);
            continue;
        };
        assert!(!dropped(&t.name), "`{}` should have been dropped", t.name);
        assert_eq!(g.shape, t.shape, "{}", t.name);
        let (want, got) = (values(input, &t.name), values(gguf, &t.name));
        let block = g.dtype.block_elems().max(1);
        for (b, (w, v)) in want
            .chunks(block.max(32))
            .zip(got.chunks(block.max(32)))
            .enumerate()
        {
            let amax = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (i, (x, y)) in w.iter().zip(v).enumerate() {
                if x.is_nan() {
                    // A token row the carried test data drops (tests/data/README.md): not a weight.
                    continue;
                }
                let err = (x - y).abs();
                assert!(
                    err <= bound(g.dtype, amax, *x) + 1e-12,
                    "{} ({}) value {}: {x} read back as {y}",
                    t.name,
                    g.dtype.name(),
                    b * block.max(32) + i
                );
            }
        }
        compared += 1;
    }
    assert_eq!(
        compared,
        gguf.tensors().len(),
        "the GGUF holds tensors the input does not"
    );
}

/// sd.cpp's unused tensors in the tiny single files: SD2's DDPM buffers (but alphas_cumprod), logit
/// scales, position ids, and SD2's projection head.
fn dropped_from_single(name: &str) -> bool {
    let ddpm = !name.contains('.') && name != "alphas_cumprod";
    ddpm || name.ends_with("position_ids")
        || name.ends_with("logit_scale")
        || name == "cond_stage_model.model.text_projection"
}

#[test]
fn single_files_and_folders_round_trip_through_gguf() {
    for dir in ["tiny-sd2", "tiny-sdxl"] {
        let tmp = temp_dir(dir);
        let folder = tmp.join("diffusers");
        diffusers_folder::build(&single(dir), &folder);
        for (what, input, dropped) in [
            (
                "single",
                single(dir),
                &dropped_from_single as &dyn Fn(&str) -> bool,
            ),
            ("folder", folder.clone(), &|_: &str| false),
        ] {
            let store = TensorStore::open(&input).unwrap();
            for ty in [GgmlType::Q8_0, GgmlType::Q4_0] {
                let out = tmp.join(format!("{what}-{}.gguf", ty.name()));
                let summary = quantize(&input, &out, policy(ty, None)).unwrap();
                let gguf = TensorStore::open(&out).unwrap();
                check_round_trip(&store, &gguf, dropped);
                // Something was quantized, and the text encoders' and UNet's matrices are among it.
                let quantized: Vec<&str> = gguf
                    .tensors()
                    .iter()
                    .filter(|t| matches!(t.dtype, DType::Quant(_)))
                    .map(|t| t.name.as_str())
                    .collect();
                assert!(
                    quantized
                        .iter()
                        .any(|n| n.starts_with("model.diffusion_model.")),
                    "{dir} {what}"
                );
                assert!(
                    quantized
                        .iter()
                        .any(|n| n.starts_with("first_stage_model.")),
                    "{dir} {what}"
                );
                assert_eq!(summary.tensors, gguf.tensors().len());
                // label_emb (SDXL's size conditioning) stays float, as sd.cpp keeps it.
                for t in gguf
                    .tensors()
                    .iter()
                    .filter(|t| t.name.contains("label_emb."))
                {
                    assert_eq!(t.dtype, DType::F32, "{}", t.name);
                }
                let family = sdcap::inspect::inspect(&out).unwrap().family;
                let want = if dir == "tiny-sd2" { "SD2.x" } else { "SDXL" };
                assert_eq!(family, want, "{dir} {what}");
            }
        }
    }
}

/// `--compat sdcpp` writes sd.cpp's own type choices under names its loader maps; sdcap reads them back.
#[test]
fn compat_sdcpp_names_and_types() {
    // Single files: the store's (= the file's) names, sd.cpp's unused list dropped.
    for dir in ["tiny-sd2", "tiny-sdxl"] {
        let store = TensorStore::open(&single(dir)).unwrap();
        let plan = quantize::plan(&store, &policy(GgmlType::Q8_0, Some(Compat::Sdcpp))).unwrap();
        for t in &plan.tensors {
            assert!(store.contains(&t.name), "{dir}: `{}` renamed", t.name);
            // sd.cpp keeps biases, embeddings, time and label embeddings in the source type.
            if t.name.ends_with(".bias")
                || t.name.contains("embedding")
                || t.name.contains("label_emb.")
                || t.name.contains("time_embed.")
            {
                assert_eq!(t.ty, GgmlType::F32, "{}", t.name);
            }
        }
        for name in &plan.dropped {
            assert!(dropped_from_single(name), "{dir}: `{name}` dropped");
        }
        // SDXL's pooled projection is written (sd.cpp reads it), in q8_0 where its rows fit.
        if dir == "tiny-sdxl" {
            assert!(plan
                .tensors
                .iter()
                .any(|t| t.name == "conditioner.embedders.1.model.text_projection"));
        }
        let out = temp_dir(&format!("compat_{dir}")).join("model.gguf");
        quantize(
            &single(dir),
            &out,
            policy(GgmlType::Q8_0, Some(Compat::Sdcpp)),
        )
        .unwrap();
        check_round_trip(
            &store,
            &TensorStore::open(&out).unwrap(),
            &dropped_from_single,
        );
    }

    // A diffusers SDXL folder: the bigG's transformers names go under `.transformer.`, where sd.cpp's
    // name conversion reads them, and come back under sdcap's name.
    let tmp = temp_dir("compat_xl_folder");
    let folder = tmp.join("diffusers");
    diffusers_folder::build(&single("tiny-sdxl"), &folder);
    let store = TensorStore::open(&folder).unwrap();
    let plan = quantize::plan(&store, &policy(GgmlType::Q8_0, Some(Compat::Sdcpp))).unwrap();
    assert!(plan
        .tensors
        .iter()
        .any(|t| t.name == "conditioner.embedders.1.transformer.text_projection.weight"));
    assert!(!plan
        .tensors
        .iter()
        .any(|t| t.name.starts_with("conditioner.embedders.1.model.")));
    let out = tmp.join("model.gguf");
    quantize(&folder, &out, policy(GgmlType::Q8_0, Some(Compat::Sdcpp))).unwrap();
    check_round_trip(&store, &TensorStore::open(&out).unwrap(), &|_| false);

    // A diffusers SD2 folder cannot give sd.cpp its fused open_clip attention: refused, one line.
    let sd2 = tmp.join("sd2");
    diffusers_folder::build(&single("tiny-sd2"), &sd2);
    let err = quantize(
        &sd2,
        &tmp.join("sd2.gguf"),
        policy(GgmlType::Q8_0, Some(Compat::Sdcpp)),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert_eq!(err.exit_code(), 2, "{msg}");
    assert!(
        msg.contains("cond_stage_model.model.text_model.") && !msg.contains('\n'),
        "{msg}"
    );
    assert!(!tmp.join("sd2.gguf").exists());
}
