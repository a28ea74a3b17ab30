//! Prompts as A1111 reads them (issue 15): emphasis weights, `BREAK`, `<lora:…>` tags and prompts
//! longer than 77 tokens. Pure text and token work, no network: the pipeline encodes the chunks this
//! module makes and hands the encoder output back for the emphasis step.
//!
//! How a prompt becomes conditioning, A1111 syntax:
//! 1. [`extract_extra_networks`] cuts the `<lora:NAME:WEIGHT>` tags out (positive prompt only);
//! 2. [`parse_attention`] turns the rest into weighted pieces and breaks;
//! 3. [`chunk_segments`] tokenizes them into chunks of BOS + 75 tokens + EOS/padding;
//! 4. [`pad_to_same_chunks`] gives prompt and negative the same number of chunks;
//! 5. [`encode_chunks`] runs the encoder on the chunks and applies the weights ([`apply_emphasis`]);
//!    the chunks' outputs, in order, are the conditioning, 77 tokens per chunk.
//!
//! [`PromptSyntax`] bundles steps 1–3 for either syntax.

mod attention;
mod chunks;
mod emphasis;
mod extra_networks;

use std::fmt;
use std::str::FromStr;

pub use attention::{parse_attention, Segment};
pub use chunks::{
    chunk_segments, pad_to_same_chunks, truncate_plain, TokenChunk, Tokenized, CHUNK_TOKENS,
    COMMA_BACKTRACK, PAD_CLIP_L, PAD_OPEN_CLIP,
};
pub use emphasis::{apply_emphasis, encode_chunks};
pub use extra_networks::{extract_extra_networks, ExtraNetworks, LoraTag};

use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// How prompt text is read (`--prompt-syntax`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PromptSyntax {
    /// Emphasis, `BREAK`, extra-network tags, any length in 75-token chunks.
    #[default]
    A1111,
    /// Literal text, cut after 75 tokens, as diffusers reads it.
    Plain,
}

impl PromptSyntax {
    pub const NAMES: [&'static str; 2] = ["a1111", "plain"];

    pub fn name(self) -> &'static str {
        match self {
            PromptSyntax::A1111 => "a1111",
            PromptSyntax::Plain => "plain",
        }
    }

    /// The prompt without its extra-network tags, and the tags; in plain syntax the text as given
    /// and no tags. (A1111 reads tags from the positive prompt only; a negative is tokenized as is.)
    pub fn extract_tags(self, prompt: &str) -> Result<(String, ExtraNetworks)> {
        match self {
            PromptSyntax::A1111 => extract_extra_networks(prompt),
            PromptSyntax::Plain => Ok((prompt.to_owned(), ExtraNetworks::default())),
        }
    }

    /// Encoder inputs for `text` (tags already extracted): chunks with weights in A1111 syntax, one
    /// truncated chunk with weights 1 in plain. `pad_id` is the family's padding after EOS
    /// ([`PAD_CLIP_L`], [`PAD_OPEN_CLIP`]).
    pub fn tokenize(self, tokenizer: &Tokenizer, text: &str, pad_id: u32) -> Result<Tokenized> {
        match self {
            PromptSyntax::A1111 => Ok(chunk_segments(tokenizer, &parse_attention(text)?, pad_id)),
            PromptSyntax::Plain => Ok(truncate_plain(tokenizer, text, pad_id)),
        }
    }
}

impl FromStr for PromptSyntax {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "a1111" => Ok(PromptSyntax::A1111),
            "plain" => Ok(PromptSyntax::Plain),
            _ => Err(Error::BadRequest(format!(
                "unknown prompt syntax `{s}` (expected one of: {})",
                PromptSyntax::NAMES.join(", ")
            ))),
        }
    }
}

impl fmt::Display for PromptSyntax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_names_round_trip() {
        for name in PromptSyntax::NAMES {
            assert_eq!(name.parse::<PromptSyntax>().unwrap().name(), name);
        }
        assert_eq!(PromptSyntax::default(), PromptSyntax::A1111);
        let err = "A1111x".parse::<PromptSyntax>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown prompt syntax `A1111x` (expected one of: a1111, plain)"
        );
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn plain_keeps_tags_and_brackets_as_text() {
        let (text, tags) = PromptSyntax::Plain
            .extract_tags("(a:2) <lora:x:1>")
            .unwrap();
        assert_eq!(text, "(a:2) <lora:x:1>");
        assert_eq!(tags, ExtraNetworks::default());
        let t = PromptSyntax::Plain
            .tokenize(Tokenizer::clip(), &text, PAD_CLIP_L)
            .unwrap();
        assert!(t.chunks[0].weights.iter().all(|&w| w == 1.0));
        assert_eq!(t.chunks[0].ids, Tokenizer::clip().encode_padded(&text, 77));
    }
}
