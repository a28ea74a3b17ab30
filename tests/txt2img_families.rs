//! Whole txt2img runs of SD2.x (v-prediction, eps, SD-Turbo style) and SDXL (size conditioning,
//! zero uncond, SDXL-Turbo style) against diffusers: the golden runs (initial and step noise
//! given), the e2e runs (seed only, through the public API), a diffusers folder built from the
//! single file, and a GGUF file against its own dequantized weights.

mod common;
#[path = "common/diffusers_folder.rs"]
mod diffusers_folder;

use std::path::{Path, PathBuf};

use common::{fixtures, read_tensors};
use sdcap::family::{Family, Prediction};
use sdcap::job::{Job, SamplerKind, ScheduleKind};
use sdcap::pipeline::{self, Models};

fn file(family: &str, rel: &str) -> PathBuf {
    fixtures().join(format!("tiny-{family}")).join(rel)
}

fn single(family: &str) -> PathBuf {
    file(family, &format!("tiny-{family}-fp32.safetensors"))
}

/// (sampler, scheduler) for a fixture run: its sampler name and scheduler overrides.
fn sampler_of(run: &serde_json::Value) -> (SamplerKind, ScheduleKind) {
    let trailing = run["scheduler_overrides"]["timestep_spacing"] == "trailing"
        || run["scheduler_kwargs"]["timestep_spacing"] == "trailing";
    match run["sampler"].as_str().unwrap() {
        "dpmpp_2m_karras" => (SamplerKind::DpmPp2m, ScheduleKind::Karras),
        other if trailing => (other.parse().unwrap(), "trailing".parse().unwrap()),
        other => (other.parse().unwrap(), ScheduleKind::Discrete),
    }
}

/// The job a fixture run describes (`negative_prompt` null = none).
fn job_of(model: PathBuf, prompt: &str, run: &serde_json::Value, cfg: f32) -> Job {
    let (sampler, scheduler) = sampler_of(run);
    let negative = run
        .get("negative_prompt")
        .or_else(|| run.get("negative"))
        .and_then(|n| n.as_str())
        .map(String::from);
    Job {
        negative,
        width: run["width"].as_u64().unwrap() as u32,
        height: run["height"].as_u64().unwrap() as u32,
        steps: run["steps"].as_u64().unwrap() as u32,
        cfg_scale: cfg,
        sampler,
        scheduler,
        prediction: Some(run["prediction_type"].as_str().unwrap().parse().unwrap()),
        ..Job::new(model, prompt)
    }
}

/// Every golden run of `family` from its given noise, on the model at `model`.
fn golden_runs(family: &str, model: &Path, expected_runs: usize) {
    common::compute_threads();
    let manifest = common::read_manifest(&file(family, "golden/manifest.json"));
    let prompt = manifest["prompts"][0].as_str().unwrap();
    let runs = manifest["runs"].as_object().unwrap();
    assert_eq!(runs.len(), expected_runs);
    let mut loaded: Option<(Option<Prediction>, Models)> = None;
    for (name, run) in runs {
        let refs = read_tensors(&file(family, &format!("golden/txt2img_{name}.safetensors")));
        let cfg = refs["guidance_scale"].data[0];
        let job = job_of(model.to_path_buf(), prompt, run, cfg);
        // Models are reloaded only when the prediction type changes (it is fixed at load).
        if loaded.as_ref().map(|l| l.0) != Some(job.prediction) {
            loaded = Some((job.prediction, Models::load(&job).unwrap()));
        }
        let models = &loaded.as_ref().unwrap().1;
        let steps: Vec<Vec<f32>> = (0..)
            .map_while(|i| refs.get(&format!("step_noise.{i}")).map(|t| t.data.clone()))
            .collect();
        let recorded = run["recorded_noises"].as_u64().unwrap();
        assert_eq!(steps.len() as u64, recorded, "{name}: step noise count");
        let mut noise = common::Recorded(steps.into());
        let initial = refs["initial_noise"].data.clone();
        let got =
            pipeline::generate_from_noise(models, &job, initial, &mut noise, &mut |_| {}).unwrap();
        assert!(
            noise.0.is_empty(),
            "{name}: sampler drew less noise than diffusers did"
        );
        common::assert_run_matches(&format!("{family} {name}"), &got, &refs);
    }
}

#[test]
fn sd2_golden_runs_match_diffusers() {
    golden_runs("sd2", &single("sd2"), 10);
}

#[test]
fn sdxl_golden_runs_match_diffusers() {
    golden_runs("sdxl", &single("sdxl"), 9);
}

/// Seed only, through `txt2img`: the initial latent and Euler a's step noise from one generator.
fn seeded_runs(family: &str, expected: usize) {
    common::compute_threads();
    let manifest = common::read_manifest(&file(family, "e2e/manifest.json"));
    let cases = manifest["cases"].as_array().unwrap();
    assert_eq!(cases.len(), expected);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mut job = job_of(
            single(family),
            case["prompt"].as_str().unwrap(),
            case,
            case["cfg"].as_f64().unwrap() as f32,
        );
        job.seed = case["seed"].as_u64().unwrap();
        let got = pipeline::txt2img(&job, &mut |_| {}).unwrap();
        common::assert_run_matches(
            &format!("{family} {name}"),
            &got,
            &read_tensors(&file(family, &format!("e2e/{name}.safetensors"))),
        );
    }
}

#[test]
fn sd2_seeded_runs_match_diffusers_end_to_end() {
    seeded_runs("sd2", 2);
}

#[test]
fn sdxl_seeded_runs_match_diffusers_end_to_end() {
    seeded_runs("sdxl", 3);
}

fn temp_dir(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("txt2img_families")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A diffusers folder (built from the single file through the inverse key map) runs bit-identical
/// to the single file, for both families.
#[test]
fn diffusers_folders_give_identical_output() {
    common::compute_threads();
    for (family, prediction) in [("sd2", Prediction::V), ("sdxl", Prediction::Eps)] {
        let dir = temp_dir(family);
        diffusers_folder::build(&single(family), &dir);
        let file_job = Job {
            width: 64,
            height: 64,
            steps: 2,
            prediction: Some(prediction),
            ..Job::new(single(family), "a photo of a cat")
        };
        let folder_job = Job {
            model: dir.clone(),
            ..file_job.clone()
        };
        let models = Models::load(&folder_job).unwrap();
        let expected = if family == "sd2" {
            Family::Sd2
        } else {
            Family::Sdxl
        };
        assert_eq!(models.spec.family, expected);
        let a = pipeline::txt2img(&file_job, &mut |_| {}).unwrap();
        let b = pipeline::txt2img(&folder_job, &mut |_| {}).unwrap();
        assert_eq!(a.latent, b.latent, "{family}: folder vs single file");
        assert_eq!(a.image.pixels, b.image.pixels, "{family}");
    }
}

/// SDXL's size conditioning reaches the UNet: other original sizes give another image; the default
/// equals giving the image size explicitly.
#[test]
fn sdxl_size_conditioning_changes_the_image() {
    common::compute_threads();
    let base = Job {
        width: 64,
        height: 64,
        steps: 1,
        sampler: SamplerKind::Euler,
        ..Job::new(single("sdxl"), "a photo of a cat")
    };
    let explicit = Job {
        size_cond: sdcap::job::SizeConditioning {
            original: Some((64, 64)),
            crop: (0, 0),
            target: Some((64, 64)),
        },
        ..base.clone()
    };
    let other = Job {
        size_cond: sdcap::job::SizeConditioning {
            original: Some((1024, 768)),
            crop: (16, 8),
            target: None,
        },
        ..base.clone()
    };
    let a = pipeline::txt2img(&base, &mut |_| {}).unwrap();
    let b = pipeline::txt2img(&explicit, &mut |_| {}).unwrap();
    let c = pipeline::txt2img(&other, &mut |_| {}).unwrap();
    assert_eq!(a.latent, b.latent);
    assert_ne!(a.latent, c.latent);
}

/// A GGUF file (q8_0 and q4_0, written by `sdcap quantize`) generates bit for bit what an f32 file
/// of its own dequantized weights generates: quantized weights are only ever dequantized into the
/// f32 panels the products read, so the only difference from the f32 model is the weights' rounding.
#[test]
fn gguf_runs_equal_runs_of_their_dequantized_weights() {
    use sdcap::quantize::{self, Policy, Request};
    use sdcap::weights::TensorStore;
    common::compute_threads();
    for family in ["sd2", "sdxl"] {
        for ty in ["q8_0", "q4_0"] {
            let dir = temp_dir(&format!("gguf_{family}_{ty}"));
            let gguf = dir.join("model.gguf");
            let req = Request {
                input: single(family),
                output: gguf.clone(),
                policy: Policy {
                    ty: quant::GgmlType::from_name(ty).unwrap(),
                    rules: Vec::new(),
                    compat: None,
                },
                quality: false,
                force: true,
            };
            quantize::quantize_model(&req, &mut |_| {}, &|| false).unwrap();
            // Every tensor of the GGUF, dequantized, into an f32 safetensors file.
            let store = TensorStore::open(&gguf).unwrap();
            let mut quantized = 0;
            let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = store
                .tensors()
                .iter()
                .map(|t| {
                    quantized += usize::from(matches!(t.dtype, sdcap::weights::DType::Quant(_)));
                    let mut values = vec![0f32; t.numel()];
                    store.read_f32(t, &mut values).unwrap();
                    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                    (t.name.clone(), t.shape.clone(), bytes)
                })
                .collect();
            assert!(quantized > 0, "{family} {ty}: nothing was quantized");
            let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
                .iter()
                .map(|(n, s, b)| {
                    let view =
                        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                            .unwrap();
                    (n.clone(), view)
                })
                .collect();
            let dequantized = dir.join("dequantized.safetensors");
            safetensors::serialize_to_file(views, None, &dequantized).unwrap();

            let gguf_job = Job {
                width: 64,
                height: 64,
                steps: 2,
                prediction: Some(Prediction::Eps),
                ..Job::new(gguf.clone(), "a photo of a cat")
            };
            let f32_job = Job {
                model: dequantized,
                ..gguf_job.clone()
            };
            let a = pipeline::txt2img(&gguf_job, &mut |_| {}).unwrap();
            let b = pipeline::txt2img(&f32_job, &mut |_| {}).unwrap();
            assert_eq!(a.latent, b.latent, "{family} {ty}");
            assert_eq!(a.image.pixels, b.image.pixels, "{family} {ty}");
        }
    }
}
