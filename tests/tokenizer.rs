//! The CLIP tokenizer against the golden fixtures (HF fast tokenizer output, diffusers 0.42 /
//! transformers 5.23) in `tests/data`.

mod common;

use std::collections::HashMap;

use sdcap::tokenizer::{Tokenizer, BOS, CONTEXT_LEN, EOS};
use serde::Deserialize;

fn read(relative: &str) -> Vec<u8> {
    let path = common::fixtures().join(relative);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[derive(Deserialize)]
struct Golden {
    prompts: Vec<String>,
    prompt_ids_padded: Vec<Vec<u32>>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    ids_openai_style: Vec<u32>,
}

fn golden() -> Golden {
    serde_json::from_slice(&read("tiny-sd/golden/tokenizer_cases.json"))
        .expect("tokenizer_cases.json")
}

fn clip() -> &'static Tokenizer {
    Tokenizer::clip()
}

#[test]
fn golden_cases_match_hf_fast_tokenizer() {
    let golden = golden();
    assert_eq!(golden.cases.len(), 19);
    for case in &golden.cases {
        assert_eq!(clip().encode(&case.text), case.ids, "text {:?}", case.text);
    }
}

/// The one place the two conventions differ: we follow HF (entities stay literal), not OpenAI.
#[test]
fn html_entities_stay_literal() {
    let golden = golden();
    let case = golden
        .cases
        .iter()
        .find(|c| c.text.contains("&amp;"))
        .expect("an HTML case");
    assert_ne!(case.ids, case.ids_openai_style);
    assert_eq!(clip().encode(&case.text), case.ids);
    let others = golden.cases.iter().filter(|c| !c.text.contains('&'));
    assert!(others.into_iter().all(|c| c.ids == c.ids_openai_style));
}

#[test]
fn padded_prompts_match_golden() {
    let golden = golden();
    assert_eq!(golden.prompts.len(), golden.prompt_ids_padded.len());
    for (prompt, expected) in golden.prompts.iter().zip(&golden.prompt_ids_padded) {
        assert_eq!(
            &clip().encode_padded(prompt, CONTEXT_LEN),
            expected,
            "prompt {prompt:?}"
        );
    }
}

/// Rows of an int64 [rows, 77] tensor.
fn int64_rows(file: &safetensors::SafeTensors, name: &str) -> Vec<Vec<u32>> {
    let view = file.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(view.dtype(), safetensors::Dtype::I64, "{name}");
    assert_eq!(view.shape()[1], CONTEXT_LEN, "{name}");
    let values: Vec<u32> = view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    values.chunks(CONTEXT_LEN).map(<[u32]>::to_vec).collect()
}

#[test]
fn padded_ids_match_pipeline_tokens() {
    let bytes = read("tiny-sd/golden/tokens.safetensors");
    let tokens = safetensors::SafeTensors::deserialize(&bytes).expect("tokens.safetensors");
    let golden = golden();

    let cond = int64_rows(&tokens, "input_ids");
    assert_eq!(cond.len(), golden.prompts.len());
    for (prompt, expected) in golden.prompts.iter().zip(&cond) {
        assert_eq!(
            &clip().encode_padded(prompt, CONTEXT_LEN),
            expected,
            "prompt {prompt:?}"
        );
    }
    let uncond = int64_rows(&tokens, "uncond_input_ids");
    assert_eq!(uncond, vec![clip().encode_padded("", CONTEXT_LEN)]);
}

#[test]
fn derived_vocab_equals_vocab_json() {
    let json: HashMap<String, u32> =
        serde_json::from_slice(&read("tokenizer/vocab.json")).expect("vocab.json");
    let vocab = clip().vocab();
    assert_eq!(vocab.len(), 49408);
    assert_eq!(json.len(), vocab.len());
    for (token, &id) in &json {
        assert_eq!(vocab.get(id as usize), Some(token), "id {id}");
    }
    assert_eq!(vocab[BOS as usize], "<|startoftext|>");
    assert_eq!(vocab[EOS as usize], "<|endoftext|>");
}

#[test]
fn empty_prompt_is_bos_then_eos_padding() {
    let ids = clip().encode_padded("", CONTEXT_LEN);
    let mut expected = vec![EOS; CONTEXT_LEN];
    expected[0] = BOS;
    assert_eq!(ids, expected);
    // Whitespace only is empty too.
    assert_eq!(clip().encode_padded(" \t\n ", CONTEXT_LEN), expected);
}

#[test]
fn truncation_keeps_eos_last() {
    let word = clip().encode("word")[1];
    let words = |n: usize| "word ".repeat(n);

    // 100 words: cut to 75 of them, then EOS.
    let full = clip().encode(&words(100));
    assert_eq!(full.len(), 102);
    let padded = clip().encode_padded(&words(100), CONTEXT_LEN);
    assert_eq!(padded.len(), CONTEXT_LEN);
    assert_eq!(padded[0], BOS);
    assert!(padded[1..76].iter().all(|&id| id == word));
    assert_eq!(padded[76], EOS);

    // Exactly 75 words fit without loss; 76 lose the last word, not EOS.
    assert_eq!(
        clip().encode_padded(&words(75), CONTEXT_LEN),
        clip().encode(&words(75))
    );
    assert_eq!(
        clip().encode_padded(&words(76), CONTEXT_LEN),
        clip().encode(&words(75))
    );

    // Other lengths follow the same rule.
    assert_eq!(
        clip().encode_padded(&words(10), 4),
        vec![BOS, word, word, EOS]
    );
    assert_eq!(clip().encode_padded("", 2), vec![BOS, EOS]);
    assert_eq!(clip().encode_padded("word", 1), vec![BOS]);
    assert!(clip().encode_padded("word", 0).is_empty());
}

/// Ids from HF `tokenizers` 0.23.3 with the fixture's `tokenizer.json` (the tokenizer diffusers
/// loads), for inputs the golden cases do not cover.
#[test]
fn edge_cases_match_hf_fast_tokenizer() {
    let cases: &[(&str, &[u32])] = &[
        // NFD input is composed first: same ids as NFC "café".
        ("cafe\u{301}", &[49406, 15304, 49407]),
        ("caf\u{e9}", &[49406, 15304, 49407]),
        (
            "na\u{131}\u{308}ve",
            &[49406, 1097, 41901, 136, 486, 563, 49407],
        ),
        // Literal special tokens are ids, but only when spelled exactly.
        ("a <|endoftext|> b", &[49406, 320, 49407, 321, 49407]),
        ("x<|startoftext|>y", &[49406, 343, 49406, 344, 49407]),
        (
            "<|EndOfText|>",
            &[49406, 27, 347, 40786, 4160, 91, 285, 49407],
        ),
        // Lower-casing is per char: the last Σ becomes σ, not ς.
        (
            "ΣΑΣ ΟΔΟΣ",
            &[
                49406, 139, 225, 138, 109, 139, 481, 138, 123, 138, 112, 138, 123, 139, 481, 49407,
            ],
        ),
        ("İstanbul", &[49406, 328, 16384, 11231, 49407]),
        ("don\u{2019}t", &[49406, 847, 728, 503, 339, 49407]),
        (
            "tab\u{a0}nbsp\u{3000}ideo\u{2028}line",
            &[49406, 14724, 6459, 4393, 1909, 334, 1148, 49407],
        ),
        (
            "zero\u{200b}width\u{200d}j\u{feff}",
            &[
                49406, 5848, 9844, 23571, 728, 491, 329, 171, 119, 379, 49407,
            ],
        ),
        ("a\0b\u{7}c", &[49406, 320, 444, 321, 451, 322, 49407]),
        (
            "\u{301}\u{301} lone marks",
            &[49406, 136, 223, 136, 479, 13576, 5466, 49407],
        ),
        (
            "👩‍👩‍👧 🇫🇷 ❤️",
            &[49406, 26304, 26304, 964, 356, 16223, 1752, 49407],
        ),
        (
            "\u{d7ff}\u{e000}\u{10ffff}",
            &[49406, 169, 253, 123, 36288, 222, 176, 237, 123, 379, 49407],
        ),
        (
            "(((a:1.5))) [b|c] {d} <lora:x:0.5>",
            &[
                49406, 33287, 320, 281, 272, 269, 276, 18305, 314, 321, 347, 322, 316, 346, 323,
                348, 283, 2179, 320, 281, 343, 281, 271, 269, 276, 285, 49407,
            ],
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(&clip().encode(text), expected, "text {text:?}");
    }
}

/// Any string encodes: no panic, BOS first, EOS last, every id in the vocabulary.
#[test]
fn odd_input_never_fails() {
    let long_mixed: String = "héllo 世界 🚀 ab1 ,;' \u{200b}"
        .chars()
        .cycle()
        .take(10_000)
        .collect();
    let inputs = [
        "😀".repeat(10_000),
        "a".repeat(10_000),
        "\u{200b}\u{200c}\u{200d}\u{2060}\u{feff}".repeat(100),
        "\u{301}".repeat(1000),
        (0..10_000u32).filter_map(char::from_u32).collect(),
        (0x1F000..0x1F000 + 2_000u32)
            .filter_map(char::from_u32)
            .collect(),
        long_mixed,
        "<|endoftext|><|startoftext|>".repeat(50),
        "\u{0}\r\n\t".to_owned(),
    ];
    for text in &inputs {
        let ids = clip().encode(text);
        assert_eq!(ids.first(), Some(&BOS));
        assert_eq!(ids.last(), Some(&EOS));
        assert!(ids.iter().all(|&id| (id as usize) < clip().vocab().len()));
        let padded = clip().encode_padded(text, CONTEXT_LEN);
        assert_eq!(padded.len(), CONTEXT_LEN);
        assert_eq!((padded[0], padded[76]), (BOS, EOS));
    }
}

#[test]
fn clip_is_built_once() {
    assert!(std::ptr::eq(Tokenizer::clip(), Tokenizer::clip()));
}
