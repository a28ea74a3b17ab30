//! The two tokenizers of SD2.x and SDXL against their goldens (HF fast tokenizers as diffusers
//! loads them): CLIP-L's pads with `<|endoftext|>`, the OpenCLIP ones (SD2's `tokenizer/`, SDXL's
//! `tokenizer_2/`) pad with `"!"` = 0 and, being diffusers', turn every `!` into 0 as well.

mod common;

use sdcap::tokenizer::{PadToken, Tokenizer, BOS, CONTEXT_LEN, EOS};
use serde_json::Value;

fn cases(family: &str) -> Value {
    common::read_manifest(
        &common::fixtures()
            .join(family)
            .join("golden/tokenizer_cases.json"),
    )
}

fn id_list(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an id list")
        .iter()
        .map(|id| id.as_u64().expect("an id") as u32)
        .collect()
}

fn golden_ids(family: &str, key: &str) -> Vec<Vec<u32>> {
    let t = &common::read_tensors(
        &common::fixtures()
            .join(family)
            .join("golden/tokens.safetensors"),
    )[key];
    t.data
        .chunks(t.shape[1])
        .map(|row| row.iter().map(|&v| v as u32).collect())
        .collect()
}

fn tok() -> &'static Tokenizer {
    Tokenizer::clip()
}

#[test]
fn sdxl_both_tokenizers_match_every_case() {
    let golden = cases("tiny-sdxl");
    let list = golden["cases"].as_array().unwrap();
    assert_eq!(list.len(), 24);
    let mut differ = 0;
    for case in list {
        let text = case["text"].as_str().unwrap();
        let (ids, ids_2) = (id_list(&case["ids"]), id_list(&case["ids_2"]));
        assert_eq!(
            tok().encode_with(text, PadToken::EndOfText),
            ids,
            "{text:?}"
        );
        assert_eq!(tok().encode(text), ids, "{text:?}");
        assert_eq!(
            tok().encode_with(text, PadToken::Exclamation),
            ids_2,
            "{text:?}"
        );
        differ += usize::from(ids != ids_2);
    }
    // Exactly the six strings with `!` differ between the two.
    assert_eq!(differ, 6);
}

#[test]
fn sd2_tokenizer_matches_every_case() {
    let golden = cases("tiny-sd2");
    for case in golden["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = tok().encode_with(text, PadToken::Exclamation);
        assert_eq!(ids, id_list(&case["ids"]), "{text:?}");
    }
}

#[test]
fn padded_prompts_match_both_families() {
    for (family, key, pad) in [
        ("tiny-sd2", "prompt_ids_padded", PadToken::Exclamation),
        ("tiny-sdxl", "prompt_ids_padded", PadToken::EndOfText),
        ("tiny-sdxl", "prompt_ids_padded_2", PadToken::Exclamation),
    ] {
        let golden = cases(family);
        let prompts = golden["prompts"].as_array().unwrap();
        let padded = golden[key].as_array().unwrap();
        assert_eq!(prompts.len(), padded.len());
        for (prompt, want) in prompts.iter().zip(padded) {
            let prompt = prompt.as_str().unwrap();
            let got = tok().encode_padded_with(prompt, CONTEXT_LEN, pad);
            assert_eq!(got, id_list(want), "{family} {key} {prompt:?}");
        }
    }
}

/// tokens.safetensors: the prompts and the empty negative prompt as the pipelines fed them.
#[test]
fn pipeline_token_ids_match() {
    let prompts = [
        "a photo of a cat",
        "An astronaut riding a horse on Mars, highly detailed, 8k",
    ];
    for (family, key, pad, texts) in [
        ("tiny-sd2", "input_ids", PadToken::Exclamation, &prompts[..]),
        (
            "tiny-sd2",
            "uncond_input_ids",
            PadToken::Exclamation,
            &[""][..],
        ),
        ("tiny-sdxl", "input_ids", PadToken::EndOfText, &prompts[..]),
        (
            "tiny-sdxl",
            "input_ids_2",
            PadToken::Exclamation,
            &prompts[..],
        ),
        (
            "tiny-sdxl",
            "uncond_input_ids",
            PadToken::EndOfText,
            &[""][..],
        ),
        (
            "tiny-sdxl",
            "uncond_input_ids_2",
            PadToken::Exclamation,
            &[""][..],
        ),
    ] {
        let got: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| tok().encode_padded_with(t, CONTEXT_LEN, pad))
            .collect();
        assert_eq!(got, golden_ids(family, key), "{family} {key}");
    }
}

/// Truncation keeps EOS last whatever the padding; `!`s count as tokens before truncation.
#[test]
fn truncation_with_zero_padding() {
    let long = "word ".repeat(100);
    let padded = tok().encode_padded_with(&long, CONTEXT_LEN, PadToken::Exclamation);
    assert_eq!(padded.len(), CONTEXT_LEN);
    assert_eq!((padded[0], padded[76]), (BOS, EOS));
    assert!(!padded.contains(&0));
    let bangs = tok().encode_padded_with(&"!".repeat(80), CONTEXT_LEN, PadToken::Exclamation);
    let mut want = vec![BOS];
    want.extend([0; 75]);
    want.push(EOS);
    assert_eq!(bangs, want);
    assert_eq!(
        tok().encode_padded_with("", 4, PadToken::Exclamation),
        [BOS, EOS, 0, 0]
    );
    assert_eq!(
        tok().encode_padded_with("", 4, PadToken::EndOfText),
        tok().encode_padded("", 4)
    );
    assert_eq!(
        (PadToken::EndOfText.id(), PadToken::Exclamation.id()),
        (EOS, 0)
    );
}
