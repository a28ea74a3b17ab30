//! TAESD (issue 16) against diffusers' `AutoencoderTiny` and madebyollin/taesd's `nn.Sequential`
//! goldens (`tiny-sd/workflows/taesd/`, random weights with the real architecture: `tiny-taesd/`).
//!
//! Tolerances: 1e-4 of the largest value, as the VAE tests: the network is 33 f32 convolutions
//! (Winograd F(4,3) for the 64-channel 3×3 ones, ≈ 2.5e-6 of Σ|w·x| each, see ARCHITECTURE.md)
//! whose errors add along the chain; what we measure is ~1e-6 relative.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_close, fixtures, read_tensors, tiny};
use sdcap::job::{Job, PreviewMode};
use sdcap::nn::taesd::Taesd;
use sdcap::pipeline::{self, Event, Models};
use sdcap::preview::{Projection, SD1};
use sdcap::Tensor;

fn taesd_dir() -> PathBuf {
    fixtures().join("tiny-taesd")
}

fn goldens(name: &str) -> std::collections::HashMap<String, Tensor> {
    read_tensors(&fixtures().join("tiny-sd/workflows/taesd").join(name))
}

/// Every way `--taesd` may name the tiny TAESD: the diffusers folder and file, the original
/// decoder file (its encoder read from beside it), the original encoder file, the folder of the
/// original files (made here: the fixture keeps them beside the diffusers folder).
fn layouts() -> Vec<(&'static str, PathBuf)> {
    let dir = taesd_dir();
    vec![
        ("diffusers folder", dir.join("diffusers")),
        (
            "diffusers file",
            dir.join("diffusers/diffusion_pytorch_model.safetensors"),
        ),
        (
            "original decoder file",
            dir.join("taesd_decoder.safetensors"),
        ),
        (
            "original encoder file",
            dir.join("taesd_encoder.safetensors"),
        ),
    ]
}

#[test]
fn decode_matches_diffusers_and_the_original_in_every_layout() {
    common::compute_threads();
    let refs = goldens("decode.safetensors");
    for (layout, path) in layouts() {
        let taesd = Taesd::open(&path).unwrap_or_else(|e| panic!("{layout}: {e}"));
        assert_eq!(taesd.latent_channels(), 4, "{layout}");
        assert_eq!(taesd.factor(), 8, "{layout}");
        for size in ["64x64", "64x96"] {
            let latent = &refs[&format!("latent_{size}")];
            let got = taesd.decode(latent).unwrap();
            let want = &refs[&format!("decoded_diffusers_{size}")];
            assert_close(&format!("{layout} decode {size}"), &got, want, 1e-4);
        }
        let got = taesd.decode_01(&refs["latent_64x64"]).unwrap();
        assert_close(
            &format!("{layout} original decode"),
            &got,
            &refs["decoded_original_64x64"],
            1e-4,
        );
    }
}

#[test]
fn encode_matches_diffusers_in_every_layout() {
    common::compute_threads();
    let refs = goldens("encode.safetensors");
    for (layout, path) in layouts() {
        let taesd = Taesd::open(&path).unwrap();
        let got = taesd.encode(&refs["image"]).unwrap();
        assert_close(&format!("{layout} encode"), &got, &refs["latents"], 1e-4);
    }
}

/// The full-resolution parts run in bands of rows with a halo (`DECODER_BAND_ROWS`,
/// `ENCODER_BAND_ROWS`); an image taller than one band must give what the whole map gives. The
/// reference is the same network run on the whole map: 64-row pieces of a 192-row image decoded
/// and encoded separately would differ at their seams, the banded run may not (beyond f32
/// reordering from the Winograd tiles' alignment: 1e-5 of the largest value).
#[test]
fn bands_give_the_whole_map_result() {
    common::compute_threads();
    let taesd = Taesd::open(&taesd_dir().join("diffusers")).unwrap();
    // 40 latent rows → 320 image rows: three decoder bands, three encoder bands.
    let (lh, lw) = (40, 8);
    let mut rng = sdcap::sampling::rng::TorchRng::new(7);
    let latent = Tensor::new(vec![1, 4, lh, lw], rng.randn(&[1, 4, lh, lw]));
    let banded = taesd.decode(&latent).unwrap();
    let whole = taesd.decode_unbanded(&latent).unwrap();
    assert_close("banded decode", &banded, &whole, 1e-5);
    // No seam: the banded output equals the whole one row for row, including the band edges.
    let image = Tensor::new(
        banded.shape.clone(),
        banded.data.iter().map(|v| v.clamp(-1.0, 1.0)).collect(),
    );
    let banded = taesd.encode(&image).unwrap();
    let whole = taesd.encode_unbanded(&image).unwrap();
    assert_close("banded encode", &banded, &whole, 1e-5);
}

#[test]
fn f32_files_load_like_f16_ones() {
    common::compute_threads();
    // Real TAESD downloads are F32: convert the tiny decoder (exact: its values are F16) and compare.
    let dir = tempdir("f32");
    let src = taesd_dir().join("taesd_decoder.safetensors");
    let tensors = read_f16_as_f32(&src);
    let file = dir.join("taesd_decoder.safetensors");
    write_f32(&file, &tensors);
    let refs = goldens("decode.safetensors");
    let taesd = Taesd::open(&file).unwrap();
    assert!(taesd.encoder.is_none(), "no encoder beside it");
    let got = taesd.decode(&refs["latent_64x64"]).unwrap();
    assert_close("f32 decode", &got, &refs["decoded_diffusers_64x64"], 1e-4);
    let err = taesd.encode(&refs["latent_64x64"]).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("no TAESD encoder"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn files_that_are_not_taesd_are_refused_with_one_line() {
    let dir = tempdir("bad");
    let vae_model = common::tiny("tiny-sd-fp32.safetensors");
    let not_safetensors = dir.join("taesd.safetensors");
    std::fs::write(&not_safetensors, b"not a model").unwrap();
    let empty_dir = dir.join("empty");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let missing = dir.join("missing.safetensors");
    for (what, path, needle) in [
        ("an SD checkpoint", vae_model.as_path(), "not a TAESD"),
        ("garbage", not_safetensors.as_path(), ""),
        ("an empty folder", empty_dir.as_path(), "not a TAESD"),
        ("a missing file", missing.as_path(), ""),
    ] {
        let err = match Taesd::open(path) {
            Ok(_) => panic!("{what}: opened"),
            Err(e) => e,
        };
        let line = err.to_string();
        assert_eq!(err.exit_code(), 2, "{what}: {line}");
        assert!(!line.contains('\n'), "{what}: {line}");
        assert!(line.contains(needle), "{what}: {line}");
    }
    // A TAESD decoder whose layers do not chain (one conv's output channels cut).
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
        read_f16_as_f32(&taesd_dir().join("taesd_decoder.safetensors"))
            .into_iter()
            .map(|(name, shape, bytes)| {
                if name == "19.weight" {
                    let mut s = shape.clone();
                    s[0] = 2;
                    let keep = bytes.len() / shape[0] * 2;
                    (name, s, bytes[..keep].to_vec())
                } else if name == "19.bias" {
                    (name, vec![2], bytes[..8].to_vec())
                } else {
                    (name, shape, bytes)
                }
            })
            .collect();
    let two_channel = dir.join("two_channel_decoder.safetensors");
    write_f32(&two_channel, &tensors);
    let err = Taesd::open(&two_channel).err().expect("refused");
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("not 3"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdcap-taesd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// (name, shape, little-endian f32 bytes) of every F16 tensor of a safetensors file.
fn read_f16_as_f32(path: &Path) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F16);
            let f32s: Vec<u8> = view
                .data()
                .chunks_exact(2)
                .flat_map(|c| {
                    half::f16::from_le_bytes([c[0], c[1]])
                        .to_f32()
                        .to_le_bytes()
                })
                .collect();
            (name, view.shape().to_vec(), f32s)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The golden run's job (tiny SD1, "a photo of a cat", Euler, 4 steps, CFG 7.5, 64×64) with TAESD.
fn taesd_job(taesd: PathBuf) -> Job {
    let mut job = common::job(tiny("tiny-sd-fp32.safetensors"));
    job.negative = Some(String::new());
    job.taesd = Some(taesd);
    job
}

fn run(job: &Job, models: &Models) -> (pipeline::Generated, Vec<Event>) {
    let refs = goldens("txt2img_euler_taesd.safetensors");
    let mut events = Vec::new();
    let mut noise = common::Recorded(Default::default());
    let got = pipeline::generate_from_noise(
        models,
        job,
        refs["initial_noise"].data.clone(),
        &mut noise,
        &mut |e| events.push(e),
    )
    .unwrap();
    (got, events)
}

/// `StableDiffusionPipeline(vae=AutoencoderTiny)`: the same sampling, the final latents decoded by
/// TAESD as they are (scaling factor 1). Image within 1 level as the VAE runs.
#[test]
fn txt2img_decoded_with_taesd_matches_diffusers() {
    common::compute_threads();
    let refs = goldens("txt2img_euler_taesd.safetensors");
    for (layout, path) in [
        ("diffusers", taesd_dir().join("diffusers")),
        ("original", taesd_dir().join("taesd_decoder.safetensors")),
    ] {
        let job = taesd_job(path);
        let models = Models::load(&job).unwrap();
        let plan = pipeline::plan(&models, &job).unwrap();
        let decode = plan.stages.iter().find(|s| s.name == "decode").unwrap();
        let taesd = models.taesd.as_ref().unwrap();
        assert_eq!(
            decode.activation_bytes,
            taesd.decode_peak_bytes(8, 8),
            "{layout}: plan"
        );
        let (got, _) = run(&job, &models);
        common::assert_run_matches(&format!("taesd {layout}"), &got, &refs);
    }
    // `--taesd-preview-only`: the VAE decodes the final image (diffusers' VAE golden).
    let mut job = taesd_job(taesd_dir().join("diffusers"));
    job.preview.taesd_only = true;
    let models = Models::load(&job).unwrap();
    let (got, _) = run(&job, &models);
    let vae_refs = read_tensors(&tiny("golden/txt2img_euler.safetensors"));
    common::assert_run_matches("taesd preview only", &got, &vae_refs);
}

/// A TAESD whose latents are not the model's is refused when the models load.
#[test]
fn a_taesd_for_other_latents_is_refused() {
    let dir = tempdir("channels");
    // The original decoder with its first conv reading 3 latent channels instead of 4.
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
        read_f16_as_f32(&taesd_dir().join("taesd_decoder.safetensors"))
            .into_iter()
            .map(|(name, shape, bytes)| {
                if name == "1.weight" {
                    let mut s = shape.clone();
                    s[1] = 3;
                    let per_out = bytes.len() / shape[0];
                    let keep: Vec<u8> = bytes
                        .chunks(per_out)
                        .flat_map(|row| row[..per_out / 4 * 3].to_vec())
                        .collect();
                    (name, s, keep)
                } else {
                    (name, shape, bytes)
                }
            })
            .collect();
    let file = dir.join("taesd3_decoder.safetensors");
    write_f32(&file, &tensors);
    let err = Models::load(&taesd_job(file)).err().expect("refused");
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("3-channel"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// stable-diffusion.cpp's SD1 projection on the golden run's final latents: the matrix, the RGB
/// values (1e-6: four products summed in another order) and the truncated 8-bit image (exact but
/// for a value sitting on a level boundary, ±1).
#[test]
fn projection_matches_the_fixture() {
    let refs = goldens("txt2img_euler_taesd.safetensors");
    let want: Vec<f32> = SD1.matrix.iter().flatten().copied().collect();
    assert_eq!(refs["preview_sdcpp_matrix"].data, want);
    let latent = &refs["final_latents"];
    let rgb = SD1.rgb(latent);
    assert_close("projection", &rgb, &refs["preview_sdcpp_rgb"], 1e-6);
    let image = SD1.image(latent);
    assert_eq!((image.width, image.height), (8, 8));
    let want = &refs["preview_sdcpp_uint8_trunc"].data;
    let off: Vec<(u8, f32)> = image
        .pixels
        .iter()
        .zip(want)
        .filter(|(a, b)| **a as f32 != **b)
        .map(|(a, b)| (*a, *b))
        .collect();
    assert!(
        off.iter().all(|(a, b)| (*a as f32 - b).abs() <= 1.0),
        "{off:?}"
    );
    assert!(off.len() <= 2, "{} values differ: {off:?}", off.len());
    // A1111's matrix gives other numbers: the fixture tells the two apart.
    let a1111 = Projection {
        matrix: [
            [0.298, 0.207, 0.208],
            [0.187, 0.286, 0.173],
            [-0.158, 0.189, 0.264],
            [-0.184, -0.271, -0.473],
        ],
        bias: [0.0; 3],
    };
    assert_close(
        "a1111 projection",
        &a1111.rgb(latent),
        &refs["preview_a1111_rgb"],
        1e-6,
    );
}

/// Every mode writes its preview at steps `interval`, 2·`interval`, …: a PNG of the right size
/// (proj: one pixel per latent pixel; tae and vae: the image), named by a `Preview` event, with
/// no temporary file left beside it. The final image is the TAESD-decoded one in every case.
#[test]
fn previews_are_written_at_their_steps() {
    common::compute_threads();
    let dir = tempdir("previews");
    let refs = goldens("txt2img_euler_taesd.safetensors");
    for (mode, side) in [
        (PreviewMode::Proj, 8),
        (PreviewMode::Tae, 64),
        (PreviewMode::Vae, 64),
    ] {
        let mut job = taesd_job(taesd_dir().join("diffusers"));
        let path = dir.join(format!("{mode}.png"));
        job.preview.mode = mode;
        job.preview.interval = 2;
        job.preview.path = Some(path.clone());
        sdcap::preview::check(&job).unwrap();
        let models = Models::load(&job).unwrap();
        let plan = pipeline::plan(&models, &job).unwrap();
        assert!(
            plan.stages.iter().any(|s| s.name == "preview"),
            "{mode}: planned"
        );
        let (got, events) = run(&job, &models);
        common::assert_run_matches(&format!("{mode} previews"), &got, &refs);
        let previews: Vec<usize> = events
            .iter()
            .filter_map(|e| match e {
                Event::Preview { step, path: p } => {
                    assert_eq!(p, &path);
                    Some(*step)
                }
                _ => None,
            })
            .collect();
        assert_eq!(previews, vec![2, 4], "{mode}");
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (side, side), "{mode}");
        assert_eq!(info.color_type, png::ColorType::Rgb);
        // The last preview is of the final latent: for tae it is the final image itself.
        if mode == PreviewMode::Tae {
            assert_eq!(&buf[..info.buffer_size()], &got.image.pixels[..]);
        }
        if mode == PreviewMode::Proj {
            assert_eq!(
                &buf[..info.buffer_size()],
                &SD1.image(&got.latent).pixels[..]
            );
        }
    }
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["proj.png", "tae.png", "vae.png"],
        "no temporary files left"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_preview_settings_are_refused_before_loading() {
    let dir = tempdir("settings");
    let base = taesd_job(taesd_dir().join("diffusers"));
    type Change = Box<dyn Fn(&mut Job)>;
    let cases: Vec<(&str, Change)> = vec![
        (
            "--preview tae needs --taesd",
            Box::new(|j: &mut Job| {
                j.taesd = None;
                j.preview.mode = PreviewMode::Tae;
            }),
        ),
        (
            "--taesd-preview-only needs --taesd",
            Box::new(|j: &mut Job| {
                j.taesd = None;
                j.preview.taesd_only = true;
            }),
        ),
        (
            "at least 1",
            Box::new(|j: &mut Job| {
                j.preview.mode = PreviewMode::Proj;
                j.preview.interval = 0;
            }),
        ),
        (
            "no such file",
            Box::new(|j: &mut Job| {
                j.taesd = Some(PathBuf::from("/nonexistent/taesd.safetensors"));
            }),
        ),
        (
            "does not exist",
            Box::new(|j: &mut Job| {
                j.preview.mode = PreviewMode::Proj;
                j.preview.path = Some(PathBuf::from("/nonexistent/dir/preview.png"));
            }),
        ),
    ];
    for (needle, change) in cases {
        let mut job = base.clone();
        change(&mut job);
        let err = sdcap::preview::check(&job)
            .err()
            .unwrap_or_else(|| panic!("{needle}: accepted"));
        assert_eq!(err.exit_code(), 2, "{err}");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
    // A directory as the preview file.
    let mut job = base.clone();
    job.preview.mode = PreviewMode::Proj;
    job.preview.path = Some(dir.clone());
    assert_eq!(sdcap::preview::check(&job).unwrap_err().exit_code(), 2);
    sdcap::preview::check(&base).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// When the VAE decode is what does not fit, the refusal offers TAESD with its need, and with
/// `--taesd` the same job plans within the cap (tiny SD1 at 1024²: its VAE decode needs ~316 MiB
/// whatever the bands, the UNet far less).
#[test]
fn the_refusal_offers_taesd_when_the_vae_decode_does_not_fit() {
    let mut job = common::job(tiny("tiny-sd-fp32.safetensors"));
    (job.width, job.height) = (1024, 1024);
    job.ram_cap = Some(300 << 20);
    let models = Models::load(&job).unwrap();
    let err = pipeline::plan(&models, &job).expect_err("the VAE decode does not fit");
    assert_eq!(err.exit_code(), 3);
    let text = err.to_string();
    assert!(text.contains("a TAESD decode (`--taesd"), "{text}");
    job.taesd = Some(taesd_dir().join("diffusers"));
    let models = Models::load(&job).unwrap();
    let plan = pipeline::plan(&models, &job).unwrap();
    assert!(plan.fits());
    let decode = plan.stages.iter().find(|s| s.name == "decode").unwrap();
    assert_eq!(
        decode.activation_bytes,
        models.taesd.as_ref().unwrap().decode_peak_bytes(128, 128)
    );
}

/// Writes (name, shape, F32 bytes) tensors as a safetensors file.
fn write_f32(path: &std::path::Path, tensors: &[(String, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap();
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}
