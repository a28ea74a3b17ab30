//! Long prompts as A1111 packs them (`modules/sd_hijack_clip.py`, `tokenize_line`): the weighted
//! pieces are tokenized one by one and packed into chunks of 75 tokens; each chunk is encoded on its
//! own as BOS + 75 tokens + EOS (77 positions), and the chunks' conditionings are concatenated.
//!
//! A chunk that fills up in the middle of a phrase moves the tokens after its last comma (if that
//! comma is among its last 20 tokens) to the next chunk, so a phrase is not cut in two; `BREAK`
//! closes the chunk at once.

use crate::tokenizer::{Tokenizer, BOS, CONTEXT_LEN, EOS};

use super::Segment;

/// Prompt tokens per chunk: the encoder's 77 positions less BOS and EOS.
pub const CHUNK_TOKENS: usize = CONTEXT_LEN - 2;
/// A1111's `comma_padding_backtrack` default: how far back a full chunk looks for a comma.
pub const COMMA_BACKTRACK: usize = 20;
/// Padding id after EOS of CLIP ViT-L (SD1.x, SDXL's first encoder): EOS itself.
pub const PAD_CLIP_L: u32 = EOS;
/// Padding id after EOS of OpenCLIP (SD2.x, SDXL's second encoder).
pub const PAD_OPEN_CLIP: u32 = 0;

/// One encoder input: 77 token ids and the weight of each position.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenChunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl TokenChunk {
    /// BOS, EOS, padding; all weights 1 (A1111's `empty_chunk`, what a shorter prompt is padded with).
    pub fn empty(pad_id: u32) -> TokenChunk {
        frame(Vec::new(), Vec::new(), pad_id)
    }
}

/// A prompt as encoder inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Tokenized {
    /// At least one.
    pub chunks: Vec<TokenChunk>,
    /// Prompt tokens, as A1111 counts them for its "n/75" display: 75 for each chunk but the last,
    /// plus the tokens of the last.
    pub token_count: usize,
    /// Tokens cut off the end ([`super::PromptSyntax::Plain`] only: a chunked prompt loses none).
    pub dropped_tokens: usize,
}

impl Tokenized {
    /// All chunks' ids, chunk after chunk: the encoder input for a batch of `chunks.len()`.
    pub fn ids(&self) -> Vec<u32> {
        self.chunks
            .iter()
            .flat_map(|c| c.ids.iter().copied())
            .collect()
    }

    /// All chunks' weights, in the order of [`Tokenized::ids`].
    pub fn weights(&self) -> Vec<f32> {
        self.chunks
            .iter()
            .flat_map(|c| c.weights.iter().copied())
            .collect()
    }
}

/// BOS + `tokens` + EOS, filled up to 77 with EOS as A1111 does, then everything after the first EOS
/// replaced by `pad_id` (A1111's `process_tokens`; a no-op where the pad is EOS).
fn frame(mut tokens: Vec<u32>, mut weights: Vec<f32>, pad_id: u32) -> TokenChunk {
    debug_assert!(tokens.len() <= CHUNK_TOKENS && tokens.len() == weights.len());
    tokens.insert(0, BOS);
    weights.insert(0, 1.0);
    tokens.resize(CONTEXT_LEN, EOS);
    weights.resize(CONTEXT_LEN, 1.0);
    if let Some(end) = tokens.iter().position(|&id| id == EOS) {
        tokens[end + 1..].fill(pad_id);
    }
    TokenChunk {
        ids: tokens,
        weights,
    }
}

/// Packs parsed pieces into chunks exactly as A1111's `tokenize_line` (with no textual-inversion
/// embeddings). An empty prompt is one empty chunk; a trailing `BREAK` adds none.
pub fn chunk_segments(tokenizer: &Tokenizer, segments: &[Segment], pad_id: u32) -> Tokenized {
    let comma = tokenizer.token_id(",</w>");
    let mut packer = Packer {
        pad_id,
        chunks: Vec::new(),
        tokens: Vec::with_capacity(CHUNK_TOKENS),
        weights: Vec::with_capacity(CHUNK_TOKENS),
        last_comma: None,
        token_count: 0,
    };
    for segment in segments {
        let (text, weight) = match segment {
            Segment::Break => {
                packer.next_chunk(false);
                continue;
            }
            Segment::Text { text, weight } => (text, *weight as f32),
        };
        for token in tokenizer.encode_words(text) {
            packer.push(token, weight, Some(token) == comma);
        }
    }
    if !packer.tokens.is_empty() || packer.chunks.is_empty() {
        packer.next_chunk(true);
    }
    Tokenized {
        chunks: packer.chunks,
        token_count: packer.token_count,
        dropped_tokens: 0,
    }
}

/// The plain reading of a prompt: one chunk, the tokens after the first 75 dropped (what diffusers
/// does, and sdcap did before A1111 syntax).
pub fn truncate_plain(tokenizer: &Tokenizer, text: &str, pad_id: u32) -> Tokenized {
    let mut tokens = tokenizer.encode_words(text);
    let dropped_tokens = tokens.len().saturating_sub(CHUNK_TOKENS);
    tokens.truncate(CHUNK_TOKENS);
    let token_count = tokens.len();
    let weights = vec![1.0; tokens.len()];
    Tokenized {
        chunks: vec![frame(tokens, weights, pad_id)],
        token_count,
        dropped_tokens,
    }
}

/// Pads the shorter of a prompt and its negative with empty chunks so that both have the same
/// number, as the issue asks (A1111 with "pad prompt/negative prompt to be same length" does the
/// same: it appends the encoding of an empty prompt, which is an empty chunk's).
pub fn pad_to_same_chunks(a: &mut Vec<TokenChunk>, b: &mut Vec<TokenChunk>, pad_id: u32) {
    let chunks = a.len().max(b.len());
    a.resize(chunks, TokenChunk::empty(pad_id));
    b.resize(chunks, TokenChunk::empty(pad_id));
}

/// The chunk being filled and what `tokenize_line` keeps beside it.
struct Packer {
    pad_id: u32,
    chunks: Vec<TokenChunk>,
    tokens: Vec<u32>,
    weights: Vec<f32>,
    /// Position in `tokens` of the last comma of this chunk.
    last_comma: Option<usize>,
    token_count: usize,
}

impl Packer {
    fn push(&mut self, token: u32, weight: f32, is_comma: bool) {
        if is_comma {
            self.last_comma = Some(self.tokens.len());
        } else if let Some(comma) = self.last_comma.filter(|&c| {
            self.tokens.len() == CHUNK_TOKENS && self.tokens.len() - c <= COMMA_BACKTRACK
        }) {
            // The chunk is full mid-phrase: the phrase after the comma moves to the next one.
            let tokens = self.tokens.split_off(comma + 1);
            let weights = self.weights.split_off(comma + 1);
            self.next_chunk(false);
            self.tokens = tokens;
            self.weights = weights;
        }
        if self.tokens.len() == CHUNK_TOKENS {
            self.next_chunk(false);
        }
        self.tokens.push(token);
        self.weights.push(weight);
    }

    fn next_chunk(&mut self, is_last: bool) {
        self.token_count += if is_last {
            self.tokens.len()
        } else {
            CHUNK_TOKENS
        };
        let tokens = std::mem::replace(&mut self.tokens, Vec::with_capacity(CHUNK_TOKENS));
        let weights = std::mem::replace(&mut self.weights, Vec::with_capacity(CHUNK_TOKENS));
        self.chunks.push(frame(tokens, weights, self.pad_id));
        self.last_comma = None;
    }
}
