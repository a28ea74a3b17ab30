//! A1111 prompt reading end to end: token chunks written by hand from A1111's `tokenize_line`
//! for tricky prompts, and the weighted conditioning of the tiny model's text encoder against the
//! definition computed here in f64.

mod common;

use sdcap::nn::clip::TextEncoder;
use sdcap::nn::Ctx;
use sdcap::prompt::{
    encode_chunks, pad_to_same_chunks, PromptSyntax, TokenChunk, Tokenized, PAD_CLIP_L,
    PAD_OPEN_CLIP,
};
use sdcap::tokenizer::{Tokenizer, BOS, CONTEXT_LEN, EOS};

fn clip() -> &'static Tokenizer {
    Tokenizer::clip()
}

/// The id of a word that is one token.
fn id(word: &str) -> u32 {
    let ids = clip().encode_words(word);
    assert_eq!(ids.len(), 1, "{word:?} is one token");
    ids[0]
}

fn a1111(prompt: &str) -> Tokenized {
    PromptSyntax::A1111
        .tokenize(clip(), prompt, PAD_CLIP_L)
        .unwrap()
}

/// A chunk as A1111 frames it: BOS, the tokens, EOS up to 77, weights 1 outside the tokens.
fn chunk(tokens: &[u32], weights: &[f32]) -> TokenChunk {
    assert_eq!(tokens.len(), weights.len());
    let mut ids = vec![BOS];
    ids.extend(tokens);
    ids.resize(CONTEXT_LEN, EOS);
    let mut w = vec![1.0];
    w.extend(weights);
    w.resize(CONTEXT_LEN, 1.0);
    TokenChunk { ids, weights: w }
}

fn ones(n: usize) -> Vec<f32> {
    vec![1.0; n]
}

fn repeat(word: &str, n: usize) -> String {
    vec![word; n].join(" ")
}

#[test]
fn comma_token_is_clips() {
    assert_eq!(clip().token_id(",</w>"), Some(id(",")));
    assert_eq!(id(","), 267);
    // Words are the framed encoding without its BOS and EOS, special-token texts included.
    for text in ["a photo of a cat", "", "x <|endoftext|> y", "(a:1.2)"] {
        let framed = clip().encode(text);
        assert_eq!(clip().encode_words(text), framed[1..framed.len() - 1]);
    }
}

#[test]
fn short_prompt_is_one_chunk_with_weights() {
    let t = a1111("(cat:1.5) dog [bird]");
    let w = [1.5, 1.0, (1.0f64 / 1.1) as f32];
    assert_eq!(t.chunks, [chunk(&[id("cat"), id("dog"), id("bird")], &w)]);
    assert_eq!(t.token_count, 3);
    assert_eq!(t.dropped_tokens, 0);
    // Weights are rounded to f32 from A1111's f64 products: ((a)) is 1.1 · 1.1 = 1.2100000000000002.
    let t = a1111("((cat))");
    assert_eq!(t.chunks[0].weights[1], (1.1f64 * 1.1) as f32);
}

#[test]
fn empty_prompt_is_one_empty_chunk() {
    for prompt in ["", "()", "<lora:x:1>"] {
        let (text, _) = PromptSyntax::A1111.extract_tags(prompt).unwrap();
        let t = a1111(&text);
        assert_eq!(t.chunks, [chunk(&[], &[])], "{prompt:?}");
        assert_eq!(t.chunks[0], TokenChunk::empty(PAD_CLIP_L));
        assert_eq!(t.token_count, 0);
    }
}

#[test]
fn exactly_75_tokens_fit_one_chunk_76_do_not() {
    let cat = id("cat");
    let t = a1111(&repeat("cat", 75));
    assert_eq!(t.chunks, [chunk(&[cat; 75], &ones(75))]);
    assert_eq!(t.token_count, 75);
    let t = a1111(&repeat("cat", 76));
    assert_eq!(
        t.chunks,
        [chunk(&[cat; 75], &ones(75)), chunk(&[cat], &ones(1))]
    );
    assert_eq!(t.token_count, 76);
}

/// A chunk that fills up moves the tokens after its last comma on, if the comma is within 20.
#[test]
fn full_chunk_backtracks_to_a_near_comma() {
    let (cat, dog, comma) = (id("cat"), id("dog"), id(","));
    // Comma at 60: the 76th token finds it 15 back; dogs 61..75 move to chunk 2.
    let t = a1111(&format!("{}, {}", repeat("cat", 60), repeat("dog", 20)));
    let mut first = vec![cat; 60];
    first.push(comma);
    assert_eq!(
        t.chunks,
        [chunk(&first, &ones(61)), chunk(&[dog; 20], &ones(20))]
    );
    assert_eq!(t.token_count, 75 + 20);

    // Comma at 50: 25 back is too far; a plain cut at 75.
    let t = a1111(&format!("{}, {}", repeat("cat", 50), repeat("dog", 40)));
    let mut first = vec![cat; 50];
    first.push(comma);
    first.extend([dog; 24]);
    assert_eq!(
        t.chunks,
        [chunk(&first, &ones(75)), chunk(&[dog; 16], &ones(16))]
    );

    // Comma at 55 is exactly 20 back: it still moves.
    let t = a1111(&format!("{}, {}", repeat("cat", 55), repeat("dog", 25)));
    let mut first = vec![cat; 55];
    first.push(comma);
    assert_eq!(
        t.chunks,
        [chunk(&first, &ones(56)), chunk(&[dog; 25], &ones(25))]
    );

    // A comma as the 76th token opens the next chunk and does not count as its last comma.
    let t = a1111(&format!("{}, {}", repeat("cat", 75), repeat("dog", 80)));
    let mut second = vec![comma];
    second.extend([dog; 74]);
    assert_eq!(
        t.chunks,
        [
            chunk(&[cat; 75], &ones(75)),
            chunk(&second, &ones(75)),
            chunk(&[dog; 6], &ones(6))
        ]
    );
}

/// 204 tokens in 34 comma-ended phrases of 6: each chunk ends at the comma before it would
/// overflow (12 phrases = 72 tokens), and phrase 12, weighted, carries its weights into chunk 2.
#[test]
fn two_hundred_tokens_with_commas() {
    let phrase = "red cat on a mat,";
    let phrase_ids: Vec<u32> = ["red", "cat", "on", "a", "mat", ","]
        .iter()
        .map(|w| id(w))
        .collect();
    assert_eq!(clip().encode_words(phrase), phrase_ids);
    let prompt: Vec<String> = (0..34)
        .map(|i| {
            if i == 12 {
                format!("({phrase})")
            } else {
                phrase.to_owned()
            }
        })
        .collect();
    let t = a1111(&prompt.join(" "));

    let phrases = |n: usize| phrase_ids.repeat(n);
    let mut second_weights = vec![1.1f32; 6];
    second_weights.extend(ones(66));
    assert_eq!(
        t.chunks,
        [
            chunk(&phrases(12), &ones(72)),
            chunk(&phrases(12), &second_weights),
            chunk(&phrases(10), &ones(60)),
        ]
    );
    // A1111 counts 75 per chunk before the last.
    assert_eq!(t.token_count, 75 + 75 + 60);

    // Without commas the same length is cut at 75 and 150.
    let t = a1111(&repeat("cat", 200));
    let counts: Vec<usize> = t
        .chunks
        .iter()
        .map(|c| c.ids.iter().filter(|&&i| i == id("cat")).count())
        .collect();
    assert_eq!(counts, [75, 75, 50]);
}

#[test]
fn break_starts_a_new_chunk() {
    let (cat, dog) = (id("cat"), id("dog"));
    let t = a1111("cat BREAK dog");
    assert_eq!(t.chunks, [chunk(&[cat], &[1.0]), chunk(&[dog], &[1.0])]);
    assert_eq!(t.token_count, 75 + 1);
    // A leading BREAK leaves an empty chunk; a trailing one adds none; two make an empty one.
    assert_eq!(
        a1111("BREAK dog").chunks,
        [chunk(&[], &[]), chunk(&[dog], &[1.0])]
    );
    assert_eq!(a1111("cat BREAK").chunks, [chunk(&[cat], &[1.0])]);
    assert_eq!(
        a1111("cat BREAK BREAK dog").chunks,
        [
            chunk(&[cat], &[1.0]),
            chunk(&[], &[]),
            chunk(&[dog], &[1.0])
        ]
    );
    // Inside brackets A1111 weighs the marker like a word: it is tokenized, weight -1.1.
    assert_eq!(
        a1111("(cat BREAK dog)").chunks,
        [chunk(&[cat, id("break"), dog], &[1.1, -1.1, 1.1])]
    );
    // A break also forgets the last comma.
    let t = a1111(&format!(
        "{}, BREAK {}",
        repeat("cat", 70),
        repeat("dog", 80)
    ));
    assert_eq!(t.chunks.len(), 3);
    assert_eq!(t.chunks[1], chunk(&[dog; 75], &ones(75)));
}

/// OpenCLIP pads with 0 after EOS, and A1111 pads after the *first* EOS, even a typed one.
#[test]
fn open_clip_padding() {
    let t = PromptSyntax::A1111
        .tokenize(clip(), "cat", PAD_OPEN_CLIP)
        .unwrap();
    let mut want = vec![BOS, id("cat"), EOS];
    want.resize(CONTEXT_LEN, 0);
    assert_eq!(t.chunks[0].ids, want);
    let mut empty = vec![BOS, EOS];
    empty.resize(CONTEXT_LEN, 0);
    assert_eq!(TokenChunk::empty(PAD_OPEN_CLIP).ids, empty);
    let t = PromptSyntax::A1111
        .tokenize(clip(), "cat <|endoftext|> dog", PAD_OPEN_CLIP)
        .unwrap();
    assert_eq!(t.chunks[0].ids, want);
}

#[test]
fn plain_truncates_and_counts_what_it_drops() {
    let text = format!("({}:2)", repeat("cat", 80));
    let t = PromptSyntax::Plain
        .tokenize(clip(), &text, PAD_CLIP_L)
        .unwrap();
    assert_eq!(t.chunks.len(), 1);
    assert_eq!(t.chunks[0].ids, clip().encode_padded(&text, CONTEXT_LEN));
    assert!(t.chunks[0].weights.iter().all(|&w| w == 1.0));
    // `(`, 80 cats, `:`, `2`, `)`: 84 tokens, 9 past 75.
    assert_eq!(t.dropped_tokens, 84 - 75);
}

#[test]
fn prompt_and_negative_get_the_same_chunk_count() {
    let mut prompt = a1111(&repeat("cat", 160)).chunks;
    let mut negative = a1111("blurry").chunks;
    pad_to_same_chunks(&mut prompt, &mut negative, PAD_CLIP_L);
    assert_eq!(prompt.len(), 3);
    assert_eq!(negative.len(), 3);
    assert_eq!(negative[0], chunk(&[id("blurry")], &[1.0]));
    assert_eq!(negative[1..], [chunk(&[], &[]), chunk(&[], &[])]);
    assert_eq!(prompt, a1111(&repeat("cat", 160)).chunks);
}

fn tiny_text_encoder() -> TextEncoder {
    TextEncoder::new(&common::tiny_weights(
        "cond_stage_model.transformer.text_model",
    ))
    .unwrap()
}

/// The weighted conditioning of a two-chunk prompt and its padded negative, encoded in one batch,
/// against the definition: each chunk encoded alone, each position × its weight, the chunk × its
/// unweighted mean / weighted mean, in f64.
///
/// The tiny model's final LayerNorm has bias 0, so a chunk's mean is ~1e-9 and the rescale is a
/// ratio of two rounding-sized sums (0.95..1.0 here); it still matches because both sides sum the
/// same f32 outputs in f64. The unit test in `prompt::emphasis` checks the rescale where the mean
/// is far from 0.
#[test]
fn weighted_conditioning_matches_the_definition() {
    common::compute_threads();
    let encoder = tiny_text_encoder();
    let width = encoder.width();
    let prompt = format!(
        "a castle, (sunset:1.3), [blurry], ((sharp)), {}, (tall tower:0.6) BREAK [[[fog]]] <lora:x:0.5>",
        repeat("stone", 70)
    );
    let (text, tags) = PromptSyntax::A1111.extract_tags(&prompt).unwrap();
    assert_eq!(tags.loras.len(), 1);
    let mut pos = a1111(&text).chunks;
    let mut neg = a1111("(ugly:1.4), low quality").chunks;
    pad_to_same_chunks(&mut pos, &mut neg, PAD_CLIP_L);
    assert_eq!(pos.len(), 3, "79 tokens, then BREAK: 3 chunks");
    let all: Vec<TokenChunk> = neg.iter().chain(&pos).cloned().collect();

    let got = encode_chunks(&all, width, |ids, n| {
        encoder.forward(ids, n, 1, &Ctx::default())
    });
    assert_eq!(got.len(), all.len() * CONTEXT_LEN * width);

    let mut max_ref = 0.0f64;
    let mut max_err = 0.0f64;
    for (c, chunk) in all.iter().enumerate() {
        let z: Vec<f64> = encoder
            .forward(&chunk.ids, 1, 1, &Ctx::default())
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let n = z.len() as f64;
        let mean = z.iter().sum::<f64>() / n;
        let weighted: Vec<f64> = z
            .iter()
            .enumerate()
            .map(|(i, v)| v * f64::from(chunk.weights[i / width]))
            .collect();
        let scale = mean / (weighted.iter().sum::<f64>() / n);
        let got = &got[c * CONTEXT_LEN * width..(c + 1) * CONTEXT_LEN * width];
        for (g, w) in got.iter().zip(&weighted) {
            let want = w * scale;
            max_ref = max_ref.max(want.abs());
            max_err = max_err.max((f64::from(*g) - want).abs());
        }
        // The mean is restored.
        let got_mean = got.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        assert!(
            (got_mean - mean).abs() <= 1e-5 * mean.abs().max(1e-3),
            "chunk {c}: mean {got_mean} vs {mean}"
        );
    }
    // Batched vs one-chunk encoder calls differ by f32 summation order (~1e-6 of max|ref|, as in
    // tests/text_encoder.rs); the f32 weighting adds a few ulp. 1e-5 leaves room for both and
    // is far below what a wrong weight (≥ 1 % on some rows) would give.
    assert!(
        max_err <= 1e-5 * max_ref,
        "max error {max_err} vs max|ref| {max_ref}"
    );
    // Some weight really moved the output: the weighted chunks differ from the plain encoding.
    let plain = encoder.forward(&pos[0].ids, 1, 1, &Ctx::default());
    let offset = neg.len() * CONTEXT_LEN * width;
    let moved = plain
        .iter()
        .zip(&got[offset..])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(moved > 1e-2, "weights changed the conditioning by {moved}");
}

/// A prompt without syntax reads the same in both syntaxes: the conditioning is bit-identical to
/// today's path (one padded chunk, no emphasis).
#[test]
fn unweighted_prompt_is_unchanged_bit_for_bit() {
    common::compute_threads();
    let encoder = tiny_text_encoder();
    let text = "a photo of a cat, on a mat";
    let before = encoder.forward(
        &clip().encode_padded(text, CONTEXT_LEN),
        1,
        1,
        &Ctx::default(),
    );
    for syntax in [PromptSyntax::A1111, PromptSyntax::Plain] {
        let chunks = syntax.tokenize(clip(), text, PAD_CLIP_L).unwrap().chunks;
        let after = encode_chunks(&chunks, encoder.width(), |ids, n| {
            encoder.forward(ids, n, 1, &Ctx::default())
        });
        assert_eq!(after, before, "{syntax}");
    }
}
