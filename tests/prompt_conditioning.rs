//! Prompts as A1111 reads them, through the encode stage (issue 15): long prompts in 75-token chunks
//! with emphasis against the definition computed from the tiny text encoder, the plain reading kept
//! bit for bit where there is no syntax, SDXL's pooled embedding from the first chunk, `<lora:…>`
//! refused without a LoRA directory, and the memory plan counting the longer context.

mod common;

use std::path::PathBuf;

use common::tiny;
use sdcap::conditioning::{self, Conditioning};
use sdcap::governor::budget::{Budget, BudgetSource};
use sdcap::governor::{self, plan::Residency};
use sdcap::job::Job;
use sdcap::kernels::scratch::SMALLEST;
use sdcap::nn::clip::TextOutput;
use sdcap::nn::Ctx;
use sdcap::pipeline::{self, Models};
use sdcap::prompt::PromptSyntax;
use sdcap::tokenizer::{Tokenizer, BOS, CONTEXT_LEN, EOS};

fn sd1() -> PathBuf {
    tiny("tiny-sd-fp32.safetensors")
}

fn family(name: &str) -> PathBuf {
    common::fixtures()
        .join(format!("tiny-{name}"))
        .join(format!("tiny-{name}-fp32.safetensors"))
}

fn job(model: PathBuf, prompt: &str, syntax: PromptSyntax) -> Job {
    Job {
        prompt: prompt.into(),
        prompt_syntax: syntax,
        ..common::job(model)
    }
}

/// One unit of the long prompts: five one-token words and A1111's weight of each, computed as A1111
/// does (Python floats, then f32): `(red:1.5)`, `cat`, `[on]` = 1/1.1, `a`, `((hat))` = 1.1·1.1.
const UNIT: &str = "(red:1.5) cat [on] a ((hat)) ";
fn unit_weights() -> [f32; 5] {
    [1.5, 1.0, (1.0 / 1.1f64) as f32, 1.0, (1.1f64 * 1.1) as f32]
}

/// `units` units: 5 × `units` tokens, and their weights.
fn long_prompt(units: usize) -> (String, Vec<u32>, Vec<f32>) {
    let clip = Tokenizer::clip();
    let words: Vec<u32> = ["red", "cat", "on", "a", "hat"]
        .iter()
        .map(|w| {
            let ids = clip.encode_words(w);
            assert_eq!(ids.len(), 1, "{w} is one token");
            ids[0]
        })
        .collect();
    (
        UNIT.repeat(units),
        words.repeat(units),
        unit_weights().repeat(units),
    )
}

/// The definition, step by step, with the tiny encoder called once per chunk: BOS + ≤ 75 tokens +
/// EOS, EOS-padded to 77 (SD1); each chunk's output times its weights, rescaled (in f64) so that the
/// chunk's mean is the unweighted one; the chunks one after another. An empty prompt is one chunk;
/// `chunks` pads with empty chunks.
fn reference(models: &Models, tokens: &[u32], weights: &[f32], chunks: usize) -> Vec<f32> {
    let encoder = &models.text_encoders[0];
    let width = encoder.width();
    let mut out = Vec::new();
    for c in 0..chunks {
        let range = (c * 75).min(tokens.len())..((c + 1) * 75).min(tokens.len());
        let mut ids = vec![BOS];
        ids.extend(&tokens[range.clone()]);
        ids.push(EOS);
        ids.resize(CONTEXT_LEN, EOS);
        let mut w = vec![1.0f32];
        w.extend(&weights[range]);
        w.resize(CONTEXT_LEN, 1.0);
        let z = encoder
            .encode(
                &ids,
                1,
                TextOutput {
                    skip_layers: 0,
                    final_norm: true,
                    pooled: false,
                },
                &Ctx::default(),
            )
            .unwrap()
            .hidden;
        let mean: f64 = z.iter().map(|&v| f64::from(v)).sum::<f64>();
        let scaled: Vec<f64> = z
            .iter()
            .enumerate()
            .map(|(i, &v)| f64::from(v) * f64::from(w[i / width]))
            .collect();
        let new_mean: f64 = scaled.iter().sum();
        out.extend(scaled.iter().map(|&v| (v * mean / new_mean) as f32));
    }
    out
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, &x| m.max(x.abs()))
}

/// Max |a - b| over max |b|; asserts both are finite and the same length.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    assert!(a.iter().chain(b).all(|v| v.is_finite()));
    let d = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    d / max_abs(b)
}

/// 100- and 200-token prompts with emphasis: contexts of 154 and 231 tokens per row, the guided
/// batch's unconditional row the empty prompt padded to as many chunks. The sdcap path encodes all
/// chunks of both rows in one batch, the reference each chunk alone: f32 reordering in the batched
/// matmuls only (seen ≤ 1e-6); 1e-5 of the largest value is the bound.
#[test]
fn long_prompts_condition_as_the_definition_says() {
    common::compute_threads();
    let models = Models::load(&job(sd1(), "", PromptSyntax::A1111)).unwrap();
    let width = models.text_encoders[0].width();
    for (units, chunks) in [(20, 2), (40, 3)] {
        let (prompt, tokens, weights) = long_prompt(units);
        let j = job(sd1(), &prompt, PromptSyntax::A1111);
        let tokens_per_row = conditioning::context_tokens(&j, true).unwrap();
        assert_eq!(tokens_per_row, chunks * CONTEXT_LEN);
        let Conditioning {
            context,
            batch,
            tokens: got_tokens,
            ..
        } = conditioning::encode(&models, &j, true, &Ctx::default()).unwrap();
        assert_eq!((batch, got_tokens), (2, tokens_per_row));
        assert_eq!(context.len(), 2 * tokens_per_row * width);

        let mut want = reference(&models, &[], &[], 1).repeat(chunks);
        want.extend(reference(&models, &tokens, &weights, chunks));
        let rel = rel_diff(&context, &want);
        eprintln!("{} tokens: max error {rel:e} of the max", tokens.len());
        assert!(rel <= 1e-5, "{} tokens: {rel:e}", tokens.len());

        // The weights did something: the unweighted reading of the same tokens differs.
        let flat = reference(&models, &tokens, &vec![1.0; tokens.len()], chunks);
        assert!(rel_diff(&context[tokens_per_row * width..], &flat) > 1e-3);
    }
}

/// A prompt without syntax reads the same in both syntaxes, bit for bit, in every family (so every
/// golden of the plain reading holds): SD1, SD2 (OpenCLIP padding), SDXL (two encoders, pooled,
/// all-zero unconditional row without a negative prompt).
#[test]
fn a_prompt_without_syntax_reads_as_plain() {
    common::compute_threads();
    let prompt = "An astronaut riding a horse on Mars, highly detailed, 8k";
    for model in [sd1(), family("sd2"), family("sdxl")] {
        let models = Models::load(&job(model.clone(), prompt, PromptSyntax::A1111)).unwrap();
        for negative in [None, Some("a photo of a cat")] {
            for guided in [false, true] {
                let read = |syntax| {
                    let j = Job {
                        negative: negative.map(String::from),
                        ..job(model.clone(), prompt, syntax)
                    };
                    conditioning::encode(&models, &j, guided, &Ctx::default()).unwrap()
                };
                let (a, p) = (read(PromptSyntax::A1111), read(PromptSyntax::Plain));
                let what = format!("{}, {negative:?}, guided {guided}", model.display());
                assert_eq!(a.tokens, CONTEXT_LEN, "{what}");
                assert!(a.context == p.context, "{what}: context");
                assert!(a.added == p.added, "{what}: added conditioning");
                assert!(a.context.iter().all(|v| v.is_finite()), "{what}");
            }
        }
    }
}

/// SDXL, 2 chunks: the first chunk's context and the pooled embedding (in the added conditioning)
/// are those of the first chunk's text alone (A1111 pools the first chunk only); the all-zero
/// unconditional row (no negative prompt) is as long as the prompt's. Batched vs single encode:
/// f32 reordering only, bound 1e-5 of the max.
#[test]
fn sdxl_pools_the_first_chunk_and_zeros_match_the_length() {
    common::compute_threads();
    let first = "a photo of a cat ".repeat(15); // 75 tokens
    let long = format!("{first} BREAK an astronaut riding a horse on mars");
    let models = Models::load(&job(family("sdxl"), &long, PromptSyntax::A1111)).unwrap();
    let one = conditioning::encode(
        &models,
        &job(family("sdxl"), &first, PromptSyntax::A1111),
        true,
        &Ctx::default(),
    )
    .unwrap();
    let two = conditioning::encode(
        &models,
        &job(family("sdxl"), &long, PromptSyntax::A1111),
        true,
        &Ctx::default(),
    )
    .unwrap();
    assert_eq!((one.tokens, two.tokens), (CONTEXT_LEN, 2 * CONTEXT_LEN));
    let width = one.context.len() / (2 * CONTEXT_LEN);
    assert_eq!(two.context.len(), 2 * 2 * CONTEXT_LEN * width);
    let (uncond, cond) = two.context.split_at(2 * CONTEXT_LEN * width);
    assert!(uncond.iter().all(|&v| v == 0.0), "zero unconditional row");
    let rel = rel_diff(
        &cond[..CONTEXT_LEN * width],
        &one.context[CONTEXT_LEN * width..],
    );
    assert!(rel <= 1e-5, "first chunk: {rel:e}");
    // The second chunk is another text: it differs from the first.
    assert!(rel_diff(&cond[CONTEXT_LEN * width..], &cond[..CONTEXT_LEN * width]) > 1e-3);
    let (a, b) = (one.added.unwrap(), two.added.unwrap());
    let rel = rel_diff(&b, &a);
    assert!(rel <= 1e-5, "pooled of the first chunk: {rel:e}");
}

/// A full txt2img run with a 3-chunk prompt and emphasis completes, finite, and is not the plain run
/// (which reads the first 75 tokens, unweighted).
#[test]
fn a_long_emphasised_prompt_runs_end_to_end() {
    common::compute_threads();
    let (prompt, _, _) = long_prompt(40);
    let a1111 = pipeline::txt2img(&job(sd1(), &prompt, PromptSyntax::A1111), &mut |_| {}).unwrap();
    let plain = pipeline::txt2img(&job(sd1(), &prompt, PromptSyntax::Plain), &mut |_| {}).unwrap();
    assert!(a1111.latent.data.iter().all(|v| v.is_finite()));
    let diff = a1111.latent.max_abs_diff(&plain.latent);
    assert!(diff > 1e-3, "the long prompt changed nothing: {diff:e}");
}

/// The plan counts the context: a 231-token context (per row) costs more in the encode and denoise
/// stages (activations and the stage's planned peak) than 77 tokens, and the plain reading of the same prompt costs what 77 tokens cost.
#[test]
fn the_plan_counts_the_longer_context() {
    let models = Models::load(&job(sd1(), "", PromptSyntax::A1111)).unwrap();
    let budget = Budget {
        limit_bytes: 8 << 30,
        source: BudgetSource::Flag,
        margin_bytes: governor::budget::margin_for(8 << 30),
        backend_bytes: 0,
    };
    let (prompt, _, _) = long_prompt(40);
    let plan = |j: &Job| governor::plan::predict(&models, j, &budget, Residency::Keep, SMALLEST);
    let short = plan(&job(sd1(), "a red cat", PromptSyntax::A1111));
    let long = plan(&job(sd1(), &prompt, PromptSyntax::A1111));
    let cut = plan(&job(sd1(), &prompt, PromptSyntax::Plain));
    for stage in ["encode", "denoise"] {
        let bytes = |p: &governor::Plan| {
            let s = p.stages.iter().find(|s| s.name == stage).unwrap();
            (s.activation_bytes, s.peak_bytes)
        };
        let ((long_act, long_peak), (short_act, short_peak)) = (bytes(&long), bytes(&short));
        assert!(long_act > short_act && long_peak > short_peak, "{stage}");
        assert_eq!(bytes(&cut), bytes(&short), "{stage}");
    }
}

/// What A1111 syntax refuses, with one line (exit 2 from the CLI): `<lora:…>` tags without a LoRA
/// directory to find them in (tests/lora.rs runs them with one), other extra-network tags, weights
/// that are no number. Plain syntax reads them as
/// text.
#[test]
fn tags_and_bad_weights_are_refused_in_a1111_syntax() {
    for (prompt, says) in [
        ("a cat <lora:x:1>", "`<lora:x>`: no LoRA directory"),
        (
            "a cat <hypernet:y:0.5>",
            "`<hypernet:y:0.5>`: extra networks",
        ),
        ("(a cat:1.2.3)", "1.2.3"),
    ] {
        let err = job(sd1(), prompt, PromptSyntax::A1111)
            .validate()
            .expect_err(prompt);
        assert_eq!(err.exit_code(), 2, "{prompt}");
        assert!(err.to_string().contains(says), "{prompt}: {err}");
        job(sd1(), prompt, PromptSyntax::Plain).validate().unwrap();
    }
    // A1111 reads no tags in the negative prompt: there it is text.
    let j = Job {
        negative: Some("<lora:x:1>".into()),
        ..job(sd1(), "a cat", PromptSyntax::A1111)
    };
    j.validate().unwrap();
}

#[test]
fn the_cli_refuses_a_lora_tag() {
    let dir = tempfile::tempdir().unwrap();
    for command in ["generate", "plan"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdcap"))
            .args([command, "-W", "64", "-H", "64", "--steps", "1"])
            .args(["-p", "a cat <lora:my_style:0.8>", "-m"])
            .arg(sd1())
            .arg("-o")
            .arg(dir.path().join("o.png"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{command}: {stderr}");
        assert!(
            stderr.contains("`<lora:my_style>`: no LoRA directory"),
            "{command}: {stderr}"
        );
        assert!(!dir.path().join("o.png").exists());
    }
    // `--prompt-syntax plain` reads it as text.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdcap"))
        .args([
            "generate", "-W", "64", "-H", "64", "--steps", "1", "-t", "1",
        ])
        .args([
            "--prompt-syntax",
            "plain",
            "-p",
            "a cat <lora:my_style:0.8>",
        ])
        .arg("-m")
        .arg(sd1())
        .arg("-o")
        .arg(dir.path().join("o.png"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The job file's `prompt_syntax` field; output names change only for a syntax other than the
/// default, so the names of existing jobs stay.
#[test]
fn batch_jobs_carry_the_syntax_and_names_stay() {
    use sdcap::batch::{jobfile, naming};
    let defaults = job(sd1(), "a cat", PromptSyntax::A1111);
    let entries = jobfile::parse_jobs(
        concat!(
            "{\"prompt\": \"(a cat:1.2)\"}\n",
            "{\"prompt\": \"(a cat:1.2)\", \"prompt_syntax\": \"plain\"}\n",
            "{\"prompt\": \"(a cat:1.2)\", \"prompt_syntax\": \"a1111\"}\n",
            "{\"prompt\": \"a cat\", \"prompt_syntax\": \"A1111x\"}\n",
            "{\"prompt\": \"a cat <lora:x:1>\"}\n",
        ),
        &defaults,
        std::path::Path::new("."),
    );
    let jobs: Vec<_> = entries.iter().map(|e| e.job.clone()).collect();
    let syntax = |i: usize| jobs[i].as_ref().unwrap().prompt_syntax;
    assert_eq!(
        [syntax(0), syntax(1), syntax(2)],
        [
            PromptSyntax::A1111,
            PromptSyntax::Plain,
            PromptSyntax::A1111
        ]
    );
    assert!(jobs[3]
        .as_ref()
        .unwrap_err()
        .contains("unknown prompt syntax"));
    assert!(jobs[4].as_ref().unwrap_err().contains("no LoRA directory"));

    let (a, p) = (jobs[0].as_ref().unwrap(), jobs[1].as_ref().unwrap());
    assert!(!naming::canonical(a).contains("prompt_syntax"));
    assert!(naming::canonical(p).contains("\"prompt_syntax\":\"plain\""));
    assert_ne!(naming::output_name(0, a), naming::output_name(0, p));
}
