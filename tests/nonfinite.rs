//! NaN or infinite weights stop the run with an error naming the network that produced them
//! (exit code 1), instead of a flat PNG and exit 0 (issue 14, defect 11).

mod common;

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use sdcap::{pipeline, Error};

/// A copy of the tiny f32 model in `dir` with the first value of tensor `name` set to `value`.
fn poisoned(dir: &Path, name: &str, value: f32) -> PathBuf {
    let mut bytes = std::fs::read(common::tiny("tiny-sd-fp32.safetensors")).unwrap();
    let offset = {
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor(name).unwrap();
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        view.data().as_ptr() as usize - bytes.as_ptr() as usize
    };
    bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    let path = dir.join(format!("{name}.safetensors"));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn non_finite_weights_stop_the_run_naming_the_stage() {
    common::compute_threads();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
            f32::NAN,
            "in the text encoder (encoding the prompt)",
        ),
        (
            "model.diffusion_model.input_blocks.0.0.weight",
            f32::NAN,
            "in the UNet (at timestep",
        ),
        (
            "model.diffusion_model.input_blocks.0.0.weight",
            f32::INFINITY,
            "in the UNet (at timestep",
        ),
        (
            "first_stage_model.decoder.conv_in.bias",
            f32::NAN,
            "in the VAE decoder (decoding the image)",
        ),
    ];
    for (name, value, stage) in cases {
        let mut job = common::job(poisoned(dir.path(), name, value));
        job.steps = 2;
        let err = match pipeline::txt2img(&job, &mut |_| {}) {
            Ok(_) => panic!("{name} = {value}: the run succeeded"),
            Err(e) => e,
        };
        assert!(matches!(err, Error::NonFinite { .. }), "{name}: {err:?}");
        assert_eq!(err.exit_code(), 1);
        let msg = err.to_string();
        assert!(msg.contains(stage), "{name} = {value}: {msg}");
        assert!(
            msg.starts_with("a tensor with NaN or infinite values"),
            "{msg}"
        );
    }
    // The same model with a finite value there runs.
    let job = common::job(poisoned(
        dir.path(),
        "first_stage_model.decoder.conv_in.bias",
        0.5,
    ));
    pipeline::txt2img(&job, &mut |_| {}).unwrap();
}

#[test]
fn the_cli_exits_1_with_one_line_and_no_png() {
    let dir = tempfile::tempdir().unwrap();
    let model = poisoned(
        dir.path(),
        "model.diffusion_model.input_blocks.0.0.weight",
        f32::NAN,
    );
    let png = dir.path().join("o.png");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdcap"))
        .args([
            "generate", "-p", "x", "-W", "64", "-H", "64", "--steps", "1", "-t", "1",
        ])
        .args(["--progress", "none", "-m"])
        .arg(&model)
        .arg("-o")
        .arg(&png)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("NaN")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("in the UNet"), "{stderr}");
    assert!(!png.exists());
}
