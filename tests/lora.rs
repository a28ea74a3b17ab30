//! LoRA (issue 15) against the diffusers goldens of `tiny-sd/workflows/lora/` (README there): the
//! three formats of LoRA A, LoRA B, LoHa C; merged deltas, txt2img runs, quantized models, errors,
//! and jobs that switch LoRAs without leaking state.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{read_tensors, tiny};
use sdcap::job::{Job, LoraRef};
use sdcap::kernels::{DenseRows, Transpose, WeightRows};
use sdcap::lora::{self, LoraSet};
use sdcap::nn::layers::Linear;
use sdcap::nn::Ctx;
use sdcap::pipeline::{self, Generated, Models};
use sdcap::weights::{DType, Weights};
use sdcap::Tensor;

fn lora_file(name: &str) -> PathBuf {
    tiny(&format!("workflows/lora/{name}"))
}

const A_FORMATS: [&str; 3] = [
    "lora_a_kohya.safetensors",
    "lora_a_kohya_ldm.safetensors",
    "lora_a_diffusers.safetensors",
];

/// The fixtures' txt2img job (euler, 4 steps, CFG 7.5, 64², "a photo of a cat") on `model` with
/// these LoRAs.
fn job(model: &Path, loras: &[(&str, f32)]) -> Job {
    let mut job = common::job(model.to_path_buf());
    job.loras = loras
        .iter()
        .map(|&(name, weight)| LoraRef {
            path: lora_file(name),
            weight,
        })
        .collect();
    job
}

fn f32_model() -> PathBuf {
    tiny("tiny-sd-fp32.safetensors")
}

fn set_of(models: &Models, loras: &[(&str, f32)]) -> Arc<LoraSet> {
    lora::build(models, &job(&models_path(), loras))
        .unwrap()
        .expect("a set")
}

fn models_path() -> PathBuf {
    f32_model()
}

/// The two forms of applying a low-rank term (`lora::PANEL_FORM_VALUES`): every weight in the
/// panel form, every weight in the low-rank form. The tiny model's weights all take the panel
/// form by default.
const FORMS: [(&str, usize); 2] = [("panel form", usize::MAX), ("low-rank form", 0)];

/// `set` with every low-rank term applied in the form `values` says.
fn in_form(set: Arc<LoraSet>, values: usize) -> Arc<LoraSet> {
    let mut set = Arc::try_unwrap(set).expect("one owner");
    set.set_panel_form_values(values);
    Arc::new(set)
}

/// The delta a set adds to the stored weight `name` (read over a zero base).
fn delta(set: &LoraSet, models: &Models, name: &str) -> Tensor {
    let info = models.store.get(name).expect("weight in the model");
    let (rows, len) = (info.shape[0], info.numel() / info.shape[0]);
    let zeros = vec![0.0; rows * len];
    let base = DenseRows { data: &zeros, rows };
    let mut out = vec![0.0; rows * len];
    set.over(name, 0, &base).read_rows(0, rows, &mut out);
    Tensor::new(info.shape.clone(), out)
}

/// key_map.json: (component, diffusers module) → the LDM weight it modifies.
fn ldm_weights() -> HashMap<String, String> {
    let map = common::read_manifest(&lora_file("key_map.json"));
    map.as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let key = format!(
                "{}.{}",
                m["component"].as_str().unwrap(),
                m["diffusers_module"].as_str().unwrap()
            );
            (
                key,
                m["ldm_checkpoint_weight"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// `te.encoder.…` / `unet.…` (the goldens' module names) → the LDM weight.
fn golden_weight(module: &str, map: &HashMap<String, String>) -> String {
    match module.strip_prefix("te.") {
        Some(te) => format!("cond_stage_model.transformer.text_model.{te}.weight"),
        None => map[module].clone(),
    }
}

#[test]
fn every_module_maps_to_the_weight_diffusers_modifies() {
    common::compute_threads();
    let models = Models::load(&job(&f32_model(), &[])).unwrap();
    let map = common::read_manifest(&lora_file("key_map.json"));
    let modules = map.as_array().unwrap();
    assert_eq!(modules.len(), 102);
    let module_map = lora::ModuleMap::new(&models.store, models.spec);
    for m in modules {
        let want = m["ldm_checkpoint_weight"].as_str().unwrap();
        for form in ["kohya_key", "peft_key", "kohya_ldm_key"] {
            let key = m[form].as_str().unwrap();
            let found = module_map.find(key);
            assert_eq!(found.len(), 1, "{key}");
            assert_eq!(found[0].weight, want, "{key}");
        }
    }
}

#[test]
fn the_three_formats_of_lora_a_give_identical_deltas() {
    common::compute_threads();
    let models = Models::load(&job(&f32_model(), &[])).unwrap();
    let sets: Vec<Arc<LoraSet>> = A_FORMATS
        .iter()
        .map(|f| set_of(&models, &[(f, 1.0)]))
        .collect();
    let mut names: Vec<&str> = sets[0].weight_names().collect();
    names.sort();
    assert_eq!(names.len(), 102);
    for set in &sets[1..] {
        let mut other: Vec<&str> = set.weight_names().collect();
        other.sort();
        assert_eq!(names, other);
    }
    for name in names {
        let first = delta(&sets[0], &models, name);
        for set in &sets[1..] {
            assert!(delta(set, &models, name).data == first.data, "{name}");
        }
    }
}

/// Deltas vs `deltas.safetensors` / `loha_deltas.safetensors` (numpy, float64 of the same f16
/// numbers): the products of f16 values are exact in f32 and a rank-4 sum rounds a few times, so
/// 1e-6 of the largest value (≈ 8 ulp) holds every module; a wrong scale, alpha or layout is off
/// by ≥ 10%.
#[test]
fn deltas_match_diffusers() {
    common::compute_threads();
    let models = Models::load(&job(&f32_model(), &[])).unwrap();
    let map = ldm_weights();
    let goldens = read_tensors(&lora_file("deltas.safetensors"));
    let cases: [(&str, &[(&str, f32)]); 3] = [
        ("delta_a.", &[("lora_a_kohya.safetensors", 1.0)]),
        ("delta_b.", &[("lora_b_kohya.safetensors", 1.0)]),
        (
            "delta_a0.7_b0.3.",
            &[
                ("lora_a_kohya.safetensors", 0.7),
                ("lora_b_kohya.safetensors", 0.3),
            ],
        ),
    ];
    let mut checked = 0;
    for (prefix, loras) in cases {
        let set = set_of(&models, loras);
        for (key, want) in goldens.iter().filter(|(k, _)| k.starts_with(prefix)) {
            let weight = golden_weight(&key[prefix.len()..], &map);
            let got = delta(&set, &models, &weight);
            common::assert_close(key, &got, want, 1e-6);
            checked += 1;
        }
    }
    assert_eq!(checked, goldens.len());

    let set = set_of(&models, &[("loha_c_lycoris.safetensors", 1.0)]);
    let goldens = read_tensors(&lora_file("loha_deltas.safetensors"));
    assert_eq!(goldens.len(), 9);
    for (key, want) in &goldens {
        let weight = golden_weight(&key["delta_c.".len()..], &map);
        common::assert_close(key, &delta(&set, &models, &weight), want, 1e-6);
    }
}

/// A `_given` run: the golden's initial noise (euler draws nothing else).
fn given_run(models: &Models, job: &Job, refs: &HashMap<String, Tensor>) -> Generated {
    let mut noise = common::Recorded(Default::default());
    let initial = refs["initial_noise"].data.clone();
    pipeline::generate_from_noise(models, job, initial, &mut noise, &mut |_| {}).unwrap()
}

/// txt2img with LoRA vs diffusers (PEFT unfused: `W·x + scale·B(A(x))`, we add the rows to W):
/// the txt2img tolerances of tests/txt2img.rs (`common::assert_run_matches`: final latent within
/// 1e-3, 8-bit image within 1 level). LoRA A at 1.0 moves the final latent by up to 3.17.
#[test]
fn txt2img_with_lora_matches_diffusers() {
    common::compute_threads();
    let model = f32_model();
    let models = Models::load(&job(&model, &[])).unwrap();
    let runs: Vec<(String, Vec<(&str, f32)>)> = A_FORMATS
        .iter()
        .flat_map(|f| {
            [
                ("lora_a_m0.5".to_string(), vec![(*f, 0.5)]),
                ("lora_a_m1.0".to_string(), vec![(*f, 1.0)]),
            ]
        })
        .chain([
            (
                "lora_a0.7_b0.3".to_string(),
                vec![
                    ("lora_a_kohya.safetensors", 0.7),
                    ("lora_b_kohya.safetensors", 0.3),
                ],
            ),
            (
                "loha_c_m1.0".to_string(),
                vec![("loha_c_lycoris.safetensors", 1.0)],
            ),
        ])
        .collect();
    for (name, loras) in runs {
        let refs = read_tensors(&lora_file(&format!(
            "txt2img_euler_{name}_given.safetensors"
        )));
        let got = given_run(&models, &job(&model, &loras), &refs);
        common::assert_run_matches(&format!("{name} {loras:?}"), &got, &refs);
    }
}

/// `<lora:NAME:W>` in the prompt, found in `lora_model_dir`, is the same job as `--lora PATH:W`
/// (bit for bit) and matches the golden; the tag is not encoded as text.
#[test]
fn prompt_tags_resolve_in_the_lora_directory() {
    common::compute_threads();
    let model = f32_model();
    let models = Models::load(&job(&model, &[])).unwrap();
    let refs = read_tensors(&lora_file("txt2img_euler_lora_a_m0.5_given.safetensors"));
    let by_flag = given_run(
        &models,
        &job(&model, &[("lora_a_kohya.safetensors", 0.5)]),
        &refs,
    );
    let mut tagged = job(&model, &[]);
    tagged.prompt = "a photo of a cat<lora:lora_a_kohya:0.5>".into();
    tagged.lora_model_dir = Some(lora_file(""));
    let by_tag = given_run(&models, &tagged, &refs);
    assert_eq!(by_tag.latent, by_flag.latent);
    common::assert_run_matches("tag", &by_tag, &refs);

    tagged.lora_model_dir = None;
    let err = lora::check(&tagged).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("--lora-model-dir"), "{err}");
    tagged.lora_model_dir = Some(lora_file(""));
    tagged.prompt = "a cat <lora:no_such_lora:1>".into();
    let err = tagged.validate().unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(
        err.to_string().contains("no_such_lora.safetensors"),
        "{err}"
    );
}

/// On a quantized model a layer with a LoRA computes the dequantized weights' product plus
/// x·Δᵀ: the delta is never rounded to the weight's grid. For every quantized matrix LoRA A
/// modifies on q8_0 and q4_0: (product with LoRA − product without) vs x·Δᵀ within 1e-5 of its
/// largest value (f32 rounding of the two added terms; a delta re-quantized to q4_0 would be off
/// by up to half a quantization step, ~10% of the weights' range).
#[test]
fn quantized_layers_add_the_exact_delta() {
    common::compute_threads();
    for file in ["gguf/tiny-sd-q8_0.gguf", "gguf/tiny-sd-q4_0.gguf"] {
        let model = tiny(file);
        let models = Models::load(&job(&model, &[])).unwrap();
        for (form, values) in FORMS {
            let set = lora::build(&models, &job(&model, &[("lora_a_kohya.safetensors", 0.8)]))
                .unwrap()
                .unwrap();
            let set = in_form(set, values);
            let with = Ctx::default().with_lora(Some(set.clone()));
            let w = Weights::new(models.store.clone(), "");
            let mut quantized = 0;
            for name in set.weight_names() {
                let param = w.param_any(name).unwrap();
                if !matches!(param.info().dtype, DType::Quant(_)) || param.shape().len() != 2 {
                    continue;
                }
                quantized += 1;
                let (n, k, m) = (param.rows(), param.row_len(), 70);
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 7 % 31) as f32 - 15.0) / 15.0)
                    .collect();
                let layer = Linear::from_params(param, None).unwrap();
                let base = layer.product(&x, &Ctx::default());
                let got: Vec<f32> = layer
                    .product(&x, &with)
                    .iter()
                    .zip(&base)
                    .map(|(a, b)| a - b)
                    .collect();
                let d = delta(&set, &models, name);
                let mut want = vec![0.0; m * n];
                sdcap::kernels::matmul(&x, &d.data, &mut want, m, k, n, Transpose::Yes, false);
                let (got, want) = (Tensor::new(vec![m, n], got), Tensor::new(vec![m, n], want));
                common::assert_close(&format!("{file} {name} {form}"), &got, &want, 1e-5);
            }
            assert!(
                quantized > 20,
                "{file}: {quantized} quantized weights have a LoRA"
            );
        }
    }
}

/// A LoRA changes a q8_0 / q4_0 run as it changes the f32 run: the change (LoRA − no LoRA) of
/// the final latent has the f32 change's size (rms within 2% on q8_0, 10% on q4_0; measured 0.1%
/// and 4%) and differs from it by at most 2% / 30% of it in rms (measured 1.4% and 25%). What is
/// left on q4_0 is the base weights' own rounding: it moves the no-LoRA run itself by 0.52 (max),
/// more than the changes differ (0.44 max). A merged and re-quantized delta would instead lose
/// what falls between q4_0's levels (stable-diffusion.cpp #904).
#[test]
fn lora_changes_quantized_runs_as_it_changes_f32() {
    common::compute_threads();
    let refs = read_tensors(&lora_file("txt2img_euler_lora_a_m0.5_given.safetensors"));
    // (the no-LoRA final latent, the change the LoRA makes to it)
    let change = |model: &Path| -> (Vec<f32>, Vec<f32>) {
        let models = Models::load(&job(model, &[])).unwrap();
        let base = given_run(&models, &job(model, &[]), &refs);
        let with = given_run(
            &models,
            &job(model, &[("lora_a_kohya.safetensors", 0.5)]),
            &refs,
        );
        let change = with
            .latent
            .data
            .iter()
            .zip(&base.latent.data)
            .map(|(a, b)| a - b);
        (base.latent.data.clone(), change.collect())
    };
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
    };
    let rms = |a: &[f32]| (a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32).sqrt();
    let (base, reference) = change(&f32_model());
    let scale = rms(&reference);
    assert!(scale > 0.2, "the LoRA moves the f32 run ({scale})");
    for (file, tol, size_tol) in [
        ("gguf/tiny-sd-q8_0.gguf", 0.02, 0.02),
        ("gguf/tiny-sd-q4_0.gguf", 0.3, 0.1),
    ] {
        let (got_base, got) = change(&tiny(file));
        let diff: Vec<f32> = got.iter().zip(&reference).map(|(a, b)| a - b).collect();
        let err = rms(&diff);
        eprintln!(
            "{file}: base run differs from f32's by {} (max); LoRA change rms {} vs f32's {scale}, \
             difference rms {err}, max {}",
            max_diff(&got_base, &base),
            rms(&got),
            max_diff(&got, &reference)
        );
        assert!(err <= tol * scale, "{file}: {err} > {tol} × {scale}");
        let size = rms(&got) / scale;
        assert!(
            (size - 1.0).abs() <= size_tol,
            "{file}: the change is {size} × f32's"
        );
    }
}

/// A LoRA module to write: key, down shape, up shape.
type Module<'a> = (&'a str, [usize; 2], [usize; 2]);

/// Writes a kohya-style LoRA of the given (key, shape) modules (rank = shape's first dim of down).
fn write_lora(dir: &Path, name: &str, modules: &[Module]) -> PathBuf {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (key, down, up) in modules {
        let bytes = |n: usize| -> Vec<u8> {
            (0..n)
                .flat_map(|i| (0.01 * (i % 7) as f32 + 0.01).to_le_bytes())
                .collect()
        };
        tensors.push((
            format!("{key}.lora_down.weight"),
            down.to_vec(),
            bytes(down[0] * down[1]),
        ));
        tensors.push((
            format!("{key}.lora_up.weight"),
            up.to_vec(),
            bytes(up[0] * up[1]),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, shape, data)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .unwrap();
            (k.clone(), view)
        })
        .collect();
    let path = dir.join(name);
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

#[test]
fn unknown_keys_other_families_and_empty_loras_are_refused() {
    common::compute_threads();
    let model = f32_model();
    let models = Models::load(&job(&model, &[])).unwrap();
    let dir = std::env::temp_dir().join(format!("sdcap-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let cases: [(&str, Vec<Module>, &str); 4] = [
        (
            "unknown.safetensors",
            vec![
                (q, [2, 32], [32, 2]),
                ("lora_unet_down_blocks_9_no_such_module", [2, 32], [32, 2]),
            ],
            "`lora_unet_down_blocks_9_no_such_module` matches no module of this SD1.x model",
        ),
        (
            "sdxl.safetensors",
            vec![(
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                [2, 32],
                [32, 2],
            )],
            "a LoRA for SDXL, the model is SD1.x",
        ),
        (
            "wide.safetensors",
            vec![(q, [2, 320], [320, 2])],
            "a LoRA for another family than SD1.x?",
        ),
        ("empty.safetensors", vec![], "holds no LoRA modules"),
    ];
    for (name, modules, message) in cases {
        let path = write_lora(&dir, name, &modules);
        let mut job = job(&model, &[]);
        job.loras = vec![LoraRef { path, weight: 1.0 }];
        let err = lora::build(&models, &job).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{name}: {err}");
        assert!(err.to_string().contains(message), "{name}: {err}");
        assert!(!err.to_string().contains('\n'), "{name}: one line: {err}");
    }
    let mut missing = job(&model, &[]);
    missing.loras = vec![LoraRef {
        path: dir.join("absent.safetensors"),
        weight: 1.0,
    }];
    let err = missing.validate().unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("LoRA file not found"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The plan counts the LoRA: mapped file + f32 values, in every stage's peak.
#[test]
fn the_plan_counts_lora_memory() {
    common::compute_threads();
    let model = f32_model();
    let models = Models::load(&job(&model, &[])).unwrap();
    let without = pipeline::plan(&models, &job(&model, &[])).unwrap();
    let with = pipeline::plan(&models, &job(&model, &[("lora_a_kohya.safetensors", 1.0)])).unwrap();
    let file = std::fs::metadata(lora_file("lora_a_kohya.safetensors"))
        .unwrap()
        .len();
    // f16 in the file, f32 in memory: the file and twice its values.
    assert!(with.lora_bytes > 2 * file, "{} vs {file}", with.lora_bytes);
    assert_eq!(without.lora_bytes, 0);
    assert_eq!(
        (with.residency, with.scratch),
        (without.residency, without.scratch)
    );
    for (a, b) in with.stages.iter().zip(&without.stages) {
        assert_eq!(a.peak_bytes, b.peak_bytes + with.lora_bytes, "{}", a.name);
    }
}

/// Jobs alternating LoRA configurations on one loaded q4_0 model: each result is bit for bit
/// the same job run alone on freshly loaded models (no state leaks between jobs).
#[test]
fn jobs_switching_loras_match_the_same_jobs_run_alone() {
    common::compute_threads();
    let model = tiny("gguf/tiny-sd-q4_0.gguf");
    let configs: [&[(&str, f32)]; 3] = [
        &[],
        &[("lora_a_kohya.safetensors", 0.5)],
        &[
            ("lora_a_diffusers.safetensors", 0.7),
            ("lora_b_kohya.safetensors", 0.3),
        ],
    ];
    let alone: Vec<Tensor> = configs
        .iter()
        .map(|loras| {
            let job = job(&model, loras);
            let models = Models::load(&job).unwrap();
            pipeline::generate(&models, &job, &mut |_| {})
                .unwrap()
                .latent
        })
        .collect();
    assert!(alone[0] != alone[1] && alone[1] != alone[2]);
    let models = Models::load(&job(&model, &[])).unwrap();
    for i in 0..20 {
        let c = i % 3;
        let got = pipeline::generate(&models, &job(&model, configs[c]), &mut |_| {}).unwrap();
        assert!(got.latent == alone[c], "job {i} (config {c})");
    }
}

/// With LoRAs (low-rank A, LoHa C) in either form every scratch tier gives the same bits, as
/// without (tests/governor.rs): text encoder and UNet at 256², where the smallest tier splits
/// attention queries, convolution tiles and feed-forward chunks the first computes whole. And the
/// two forms agree.
#[test]
fn scratch_tiers_give_identical_bits_with_lora() {
    use sdcap::kernels::scratch::TIERS;
    common::compute_threads();
    let model = f32_model();
    let mut j = job(
        &model,
        &[
            ("lora_a_kohya.safetensors", 0.6),
            ("loha_c_lycoris.safetensors", 0.9),
        ],
    );
    (j.width, j.height) = (256, 256);
    let models = Models::load(&j).unwrap();
    let ids: Vec<u32> = (0..154).map(|i| 49406 + (i % 2)).collect();
    let latent = Tensor::new(
        vec![2, 4, 32, 32],
        (0..2 * 4 * 32 * 32)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect(),
    );
    let plain = Ctx::from(TIERS[0]);
    let context = models.text_encoders[0].forward(&ids, 2, 1, &plain);
    let mut forms = Vec::new();
    for (form, values) in FORMS {
        let set = Some(in_form(lora::build(&models, &j).unwrap().unwrap(), values));
        let run = |tier| {
            let cx = Ctx::from(tier).with_lora(set.clone());
            let context = models.text_encoders[0].forward(&ids, 2, 1, &cx);
            let eps = models.unet.forward(&latent, &[999.0, 999.0], &context, &cx);
            (context, eps.data)
        };
        let want = run(TIERS[0]);
        assert!(context != want.0, "the LoRA changes the text encoder");
        for &tier in &TIERS[1..] {
            let got = run(tier);
            assert!(
                got.0 == want.0,
                "{form}: text encoder differs under {tier:?}"
            );
            assert!(got.1 == want.1, "{form}: UNet differs under {tier:?}");
        }
        forms.push(want);
    }
    // The two forms are the same sums in another order: f32 rounding apart (1e-5 of the largest
    // value; a missing or doubled term is off by the delta itself, ≥ 1e-2 here).
    let t = |v: &[f32]| Tensor::new(vec![v.len()], v.to_vec());
    common::assert_close(
        "text encoder, forms",
        &t(&forms[1].0),
        &t(&forms[0].0),
        1e-5,
    );
    common::assert_close("UNet, forms", &t(&forms[1].1), &t(&forms[0].1), 1e-5);
}

/// The family key maps of SD2.x (open_clip text encoder: q/k/v as row ranges of the fused
/// `in_proj_weight`) and SDXL (`lora_te1_` / `lora_te2_`, `text_encoder_2.`, SGM UNet names and
/// their diffusers names), on the tiny test models.
#[test]
fn sd2_and_sdxl_keys_map_to_their_weights() {
    common::compute_threads();
    let fixtures = common::fixtures();
    let sdxl = Models::load(&job(
        &fixtures.join("tiny-sdxl/tiny-sdxl-fp32.safetensors"),
        &[],
    ))
    .unwrap();
    let map = lora::ModuleMap::new(&sdxl.store, sdxl.spec);
    let one = |map: &lora::ModuleMap, key: &str| {
        let found = map.find(key);
        assert_eq!(found.len(), 1, "{key}");
        let t = found[0];
        (t.weight.clone(), t.first_row, t.rows)
    };
    let te2 = "conditioner.embedders.1.model.transformer.resblocks.0";
    for (key, want) in [
        (
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight".to_string(), 0, 16),
        ),
        ("lora_te2_text_model_encoder_layers_0_self_attn_k_proj", (format!("{te2}.attn.in_proj_weight"), 24, 24)),
        ("text_encoder_2.text_model.encoder.layers.0.mlp.fc2", (format!("{te2}.mlp.c_proj.weight"), 0, 24)),
        ("lora_te2_text_model_encoder_layers_0_self_attn_out_proj", (format!("{te2}.attn.out_proj.weight"), 0, 24)),
        (
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
            ("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight".to_string(), 0, 32),
        ),
        (
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
            ("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight".to_string(), 0, 32),
        ),
    ] {
        assert_eq!(one(&map, key), want, "{key}");
    }
    // SD1's single-encoder prefix is refused on SDXL as a LoRA for another family.
    assert!(map
        .find("lora_te_text_model_encoder_layers_0_self_attn_q_proj")
        .is_empty());

    // SD2: a kohya LoRA on v_proj changes only the v rows of the fused in_proj.
    let model = fixtures.join("tiny-sd2/tiny-sd2-fp32.safetensors");
    let sd2 = Models::load(&job(&model, &[])).unwrap();
    let dir = std::env::temp_dir().join(format!("sdcap-lora-sd2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = "lora_te_text_model_encoder_layers_1_self_attn_v_proj";
    let path = write_lora(&dir, "v.safetensors", &[(key, [2, 32], [32, 2])]);
    let mut j = job(&model, &[]);
    j.loras = vec![LoraRef { path, weight: 1.0 }];
    let set = lora::build(&sd2, &j).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let with = Ctx::default().with_lora(set);
    let fused = Weights::new(sd2.store.clone(), "")
        .param_any("cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight")
        .unwrap();
    let x: Vec<f32> = (0..5 * 32).map(|i| (i % 9) as f32 / 9.0).collect();
    for (third, changed) in [(0, false), (1, false), (2, true)] {
        let layer = Linear::from_params(fused.row_range(third * 32, 32).unwrap(), None).unwrap();
        let same = layer.product(&x, &with) == layer.product(&x, &Ctx::default());
        assert_eq!(!same, changed, "rows {third} of in_proj");
    }
}

/// A PEFT file without `lora_adapter_metadata` has alpha = rank (scale 1 × multiplier); a kohya
/// module's `.alpha` scales by alpha / rank.
#[test]
fn alpha_defaults_to_the_rank() {
    common::compute_threads();
    let models = Models::load(&job(&f32_model(), &[])).unwrap();
    let dir = std::env::temp_dir().join(format!("sdcap-lora-alpha-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let weight = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight";
    let (up, down): (Vec<f32>, Vec<f32>) = (
        (0..32 * 2).map(|i| (i % 5) as f32 * 0.25).collect(),
        (0..2 * 32).map(|i| (i % 3) as f32 * 0.5 - 0.5).collect(),
    );
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let write = |name: &str, tensors: Vec<(String, Vec<usize>, Vec<u8>)>| {
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(k, shape, data)| {
                let dtype = safetensors::Dtype::F32;
                let view = safetensors::tensor::TensorView::new(dtype, shape.clone(), data);
                (k.clone(), view.unwrap())
            })
            .collect();
        let path = dir.join(name);
        safetensors::serialize_to_file(views, None, &path).unwrap();
        path
    };
    let peft = write(
        "peft.safetensors",
        vec![
            (
                format!("unet.{module}.lora_A.weight"),
                vec![2, 32],
                bytes(&down),
            ),
            (
                format!("unet.{module}.lora_B.weight"),
                vec![32, 2],
                bytes(&up),
            ),
        ],
    );
    let kohya_key = format!("lora_unet_{}", module.replace('.', "_"));
    let kohya = write(
        "kohya.safetensors",
        vec![
            (
                format!("{kohya_key}.lora_down.weight"),
                vec![2, 32],
                bytes(&down),
            ),
            (
                format!("{kohya_key}.lora_up.weight"),
                vec![32, 2],
                bytes(&up),
            ),
            (format!("{kohya_key}.alpha"), vec![], bytes(&[1.0])),
        ],
    );
    let mut want = vec![0.0; 32 * 32];
    sdcap::kernels::matmul(&up, &down, &mut want, 32, 2, 32, Transpose::No, false);
    for (path, scale) in [(peft, 0.8), (kohya, 0.8 * 0.5)] {
        let mut j = job(&f32_model(), &[]);
        j.loras = vec![LoraRef {
            path: path.clone(),
            weight: 0.8,
        }];
        let set = lora::build(&models, &j).unwrap().unwrap();
        let want: Vec<f32> = want.iter().map(|v| v * scale).collect();
        let want = Tensor::new(vec![32, 32], want);
        let got = delta(&set, &models, weight);
        let got = Tensor::new(vec![32, 32], got.data);
        common::assert_close(&path.display().to_string(), &got, &want, 1e-6);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
