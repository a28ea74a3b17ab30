//! The PNG `parameters` chunk read back the way AUTOMATIC1111 reads it: hostile prompts and names
//! cannot add or change a field, control characters are gone, and what is stored is what the text
//! encoder read (issue 14, defects 5 and 8).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use regex::Regex;
use sdcap::job::Job;
use sdcap::output::parameters_text;
use sdcap::prompt::PromptSyntax;
use sdcap::tokenizer::{Tokenizer, CONTEXT_LEN};

/// A1111's `parse_generation_parameters` (modules/infotext_utils.py), the part that splits the
/// text: the last line is the fields when it holds at least 3 `key: value` pairs; of the other
/// lines (each trimmed), those from the first that starts with `Negative prompt:` on are the
/// negative prompt (that prefix cut), the rest the prompt; quoted values are JSON-decoded.
fn parse_a1111(text: &str) -> (String, String, HashMap<String, String>) {
    let re_param = Regex::new(r#"\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)"#).unwrap();
    let mut lines: Vec<&str> = text.trim().split('\n').collect();
    let mut last = lines.pop().unwrap_or("");
    if re_param.captures_iter(last).count() < 3 {
        lines.push(last);
        last = "";
    }
    let (mut prompt, mut negative) = (String::new(), String::new());
    let mut done_with_prompt = false;
    for line in lines {
        let mut line = line.trim();
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            done_with_prompt = true;
            line = rest.trim();
        }
        let target = if done_with_prompt {
            &mut negative
        } else {
            &mut prompt
        };
        if !target.is_empty() {
            target.push('\n');
        }
        target.push_str(line);
    }
    let mut fields = HashMap::new();
    for c in re_param.captures_iter(last) {
        let v = &c[2];
        let v = if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
            serde_json::from_str(v).unwrap_or_else(|_| v.to_string())
        } else {
            v.to_string()
        };
        fields.insert(c[1].to_string(), v);
    }
    (prompt, negative, fields)
}

fn job(prompt: &str, negative: &str) -> Job {
    let mut j = common::job(PathBuf::from("/models/v1-5.safetensors"));
    j.prompt = prompt.into();
    j.negative = Some(negative.into());
    j
}

fn tokens(text: &str) -> Vec<u32> {
    Tokenizer::clip().encode_padded(text, CONTEXT_LEN)
}

fn check_fields(fields: &HashMap<String, String>, j: &Job, what: &str) {
    assert_eq!(fields["Steps"], j.steps.to_string(), "{what}");
    assert_eq!(fields["Seed"], j.seed.to_string(), "{what}");
    assert_eq!(fields["Sampler"], "Euler", "{what}");
    assert_eq!(fields["Size"], "64x64", "{what}");
}

#[test]
fn hostile_prompts_round_trip_through_the_a1111_reader() {
    // (prompt, negative): each must come back as the same tokens, in the same field.
    let cases = [
        ("a cat\nNegative prompt: INJECTED", ""),
        ("Negative prompt: INJECTED\na cat", "blurry"),
        ("a cat\n   Negative prompt:INJECTED\nmore", "dark"),
        ("a cat", "blurry\nNegative prompt: second"),
        ("a cat\nSteps: 99, Sampler: X, Seed: 1, Size: 1x1", ""),
        ("a cat\n\nwith a hat\n", "ugly\n\nbad"),
        ("", ""),
        ("", "Negative prompt: x"),
    ];
    for (prompt, negative) in cases {
        let j = job(prompt, negative);
        let text = parameters_text(&j);
        let (got_prompt, got_negative, fields) = parse_a1111(&text);
        let what = format!("{prompt:?} / {negative:?} → {text:?}");
        assert_eq!(tokens(&got_prompt), tokens(prompt), "prompt: {what}");
        assert_eq!(tokens(&got_negative), tokens(negative), "negative: {what}");
        assert_eq!(got_negative.is_empty(), negative.is_empty(), "{what}");
        assert!(!got_prompt.contains("INJECTED") || !got_negative.contains("INJECTED"));
        check_fields(&fields, &j, &what);
    }
}

#[test]
fn control_characters_are_stripped_but_newlines_kept() {
    let prompt = "a\u{1b}[31m red\0cat\tand\r\ndog\u{7f}\u{85}x\u{2028}y";
    let negative = "bad\u{8}\u{c}art\nNegative prompt: INJECTED";
    let j = job(prompt, negative);
    let text = parameters_text(&j);
    assert!(
        !text.chars().any(|c| c != '\n' && c.is_control()),
        "{text:?}"
    );
    let (got_prompt, got_negative, fields) = parse_a1111(&text);
    assert_eq!(got_prompt, "a[31m redcat and\ndog x y");
    assert_eq!(got_negative, "bad art\nnegative prompt: INJECTED");
    check_fields(&fields, &j, &text);
}

#[test]
fn names_with_separators_stay_one_field() {
    let mut j = job("a cat", "");
    j.model = PathBuf::from("/m/evil, Seed: 7, Steps: 1\nNegative prompt: x.safetensors");
    j.vae = Some(PathBuf::from("/v/a:b,c.safetensors"));
    let text = parameters_text(&j);
    assert_eq!(text.lines().count(), 2, "{text:?}");
    let (prompt, negative, fields) = parse_a1111(&text);
    assert_eq!((prompt.as_str(), negative.as_str()), ("a cat", ""));
    check_fields(&fields, &j, &text);
    assert_eq!(
        fields["Model"],
        "evil, Seed: 7, Steps: 1\nNegative prompt: x"
    );
    assert_eq!(fields["VAE"], "a:b,c.safetensors");
}

/// 500 words, each one CLIP token, the last 440 depending on `tail`.
fn long_prompt(tail: &str) -> String {
    let head: Vec<&str> = ["red", "cat", "on", "a", "hat"].repeat(12);
    let rest = vec![tail; 440];
    [head, rest].concat().join(" ")
}

#[test]
fn a_cut_prompt_stores_what_the_text_encoder_read() {
    let (a, b) = (long_prompt("dog"), long_prompt("tree"));
    let plain = |prompt: &str, negative: &str| Job {
        prompt_syntax: PromptSyntax::Plain,
        ..job(prompt, negative)
    };
    let j = plain(&a, &b);
    let text = parameters_text(&j);
    let (prompt, negative, _) = parse_a1111(&text);
    assert_eq!(tokens(&prompt), tokens(&a), "{text}");
    assert_eq!(tokens(&negative), tokens(&b));
    // 60 head words then 15 tail words fill the 75 positions.
    assert_eq!(prompt.split(' ').count(), 75, "{prompt}");
    assert!(
        prompt.ends_with(&format!("hat{}", " dog".repeat(15))),
        "{prompt}"
    );
    // Two prompts that differ only past the cut are the same job, and say so.
    let changed_at_the_end = format!("{} tree", a.strip_suffix(" dog").unwrap());
    assert_eq!(
        parameters_text(&plain(&a, "")),
        parameters_text(&plain(&changed_at_the_end, ""))
    );
    // A prompt that fits is stored as it is.
    assert_eq!(
        parse_a1111(&parameters_text(&plain("A Cat", ""))).0,
        "A Cat"
    );
}

/// A1111 syntax (the default) reads a prompt of any length: it is stored as given, syntax included.
#[test]
fn an_a1111_prompt_is_stored_as_given() {
    let a = format!("(A Cat:1.2), [dog] BREAK {}", long_prompt("dog"));
    let b = long_prompt("tree");
    let (prompt, negative, _) = parse_a1111(&parameters_text(&job(&a, &b)));
    assert_eq!(
        (prompt.as_str(), negative.as_str()),
        (a.as_str(), b.as_str())
    );
    assert_ne!(
        parameters_text(&job(&a, "")),
        parameters_text(&job(
            &format!("{} tree", a.strip_suffix(" dog").unwrap()),
            ""
        ))
    );
}

#[test]
fn the_cut_is_noticed_once_with_both_counts() {
    let a = long_prompt("dog");
    let notice = sdcap::tokenizer::truncation_notice(&a, Some("short")).unwrap();
    assert!(
        notice.contains("425 tokens of the prompt and 0 of the negative"),
        "{notice}"
    );
    let notice = sdcap::tokenizer::truncation_notice("short", Some(&a)).unwrap();
    assert!(
        notice.contains("0 tokens of the prompt and 425 of the negative"),
        "{notice}"
    );
    assert_eq!(sdcap::tokenizer::truncation_notice("short", Some("")), None);
    assert_eq!(
        sdcap::tokenizer::truncation_notice(&long_prompt("x")[..200], None),
        None
    );

    // The CLI says it in its JSON progress.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdcap"))
        .args([
            "generate", "-W", "64", "-H", "64", "--steps", "1", "-t", "1",
        ])
        .args(["--progress", "json", "-p", &a, "-m"])
        .arg(common::tiny("tiny-sd-fp32.safetensors"))
        .arg("-o")
        .arg(dir.path().join("o.png"))
        .args(["--prompt-syntax", "plain"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let notices: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("\"notice\"") && l.contains("dropped"))
        .collect();
    assert_eq!(notices.len(), 1, "{stderr}");
    assert!(notices[0].contains("425 tokens of the prompt"), "{stderr}");

    // A1111 syntax (the default) drops nothing, so it says nothing.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdcap"))
        .args([
            "generate", "-W", "64", "-H", "64", "--steps", "1", "-t", "1",
        ])
        .args(["--progress", "json", "-p", &a, "-m"])
        .arg(common::tiny("tiny-sd-fp32.safetensors"))
        .arg("-o")
        .arg(dir.path().join("o.png"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("dropped"), "{stderr}");
}
