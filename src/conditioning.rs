//! The encode stage: prompts → what the UNet is conditioned on, as the family's description says
//! (which encoders, which hidden state of each, padding, pooled and size conditioning).
//!
//! With `--prompt-syntax a1111` (the default) each prompt is read as A1111 reads it (`crate::prompt`):
//! emphasis weights, `BREAK`, and any length in chunks of BOS + 75 tokens + EOS/padding. Each chunk
//! is encoded on its own by each text encoder (all chunks of a job in one batch), the emphasis is
//! applied per chunk and encoder, and the chunks are concatenated along the token axis: the context
//! is [batch, chunks × 77, width]; prompt and negative have the same number of chunks. SDXL's pooled
//! embedding is the first chunk's, unweighted (A1111's `sd_hijack_clip`: `zs[0].pooled`). A prompt
//! without syntax that fits one chunk gives exactly the plain reading's input.

use crate::error::{Error, Result};
use crate::family::HiddenState;
use crate::job::Job;
use crate::models::Models;
use crate::nn::clip::TextOutput;
use crate::nn::Ctx;
use crate::prompt::{self, PromptSyntax, TokenChunk};
use crate::sampling;
use crate::tokenizer::{PadToken, Tokenizer, CONTEXT_LEN};

/// The UNet's conditioning for one job: `batch` rows, the unconditional row first when guided.
pub struct Conditioning {
    /// [batch, tokens, context width]: the encoders' hidden states side by side, per token.
    pub context: Vec<f32>,
    pub batch: usize,
    /// Tokens per row: 77 per prompt chunk ([`context_tokens`]).
    pub tokens: usize,
    /// SDXL's `label_emb` input [batch, adm_in]: the pooled embedding and the six size ids.
    pub added: Option<Vec<f32>>,
}

/// Encodes `job`'s prompt (and, when `guided`, its negative prompt first) with every text encoder
/// of the family. With no negative prompt a family that says so (SDXL) gets all-zero unconditional
/// embeddings, pooled included, as diffusers' `force_zeros_for_empty_prompt`. The encoders' kernels
/// work within the settings of `cx`.
pub fn encode(models: &Models, job: &Job, guided: bool, cx: &Ctx) -> Result<Conditioning> {
    let spec = models.spec;
    let zero_uncond = guided && spec.zero_uncond_without_negative && job.negative.is_none();
    // The negative prompt's row first, unless it is all zeros.
    let encoded_rows = if guided && !zero_uncond { 2 } else { 1 };
    let batch = if guided { 2 } else { 1 };
    let zero_rows = batch - encoded_rows;

    let mut hidden = Vec::new();
    let mut widths = Vec::new();
    let mut pooled = None;
    let mut tokens = None;
    for (enc_spec, encoder) in spec.text_encoders.iter().zip(&models.text_encoders) {
        let chunks = encoder_chunks(job, encoded_rows == 2, enc_spec.pad)?;
        let per_row = chunks.len() / encoded_rows;
        // Every encoder reads the same text with the same BPE (only the padding ids differ), so
        // every encoder gets the same number of chunks.
        debug_assert!(tokens.is_none_or(|t| t == per_row * CONTEXT_LEN));
        tokens = Some(per_row * CONTEXT_LEN);
        let ids: Vec<u32> = chunks.iter().flat_map(|c| c.ids.iter().copied()).collect();
        let weights: Vec<f32> = chunks
            .iter()
            .flat_map(|c| c.weights.iter().copied())
            .collect();
        let skip = job.clip_skip as usize - 1;
        let (skip_layers, final_norm) = match enc_spec.hidden {
            HiddenState::ClipSkipNormed => (skip, true),
            // diffusers stores SD2's encoder already cut after the penultimate layer (its
            // `CLIPTextModel` has R-1 layers, `final_layer_norm` = ln_final), so only the
            // open_clip tower of a single file or GGUF has the last layer to skip.
            HiddenState::PenultimateNormed => {
                let open_clip = models
                    .store
                    .contains(&format!("{}.token_embedding.weight", enc_spec.prefix));
                (skip + usize::from(open_clip), true)
            }
            HiddenState::Penultimate => (skip + 1, false),
        };
        if skip_layers >= encoder.num_layers() {
            return Err(Error::BadRequest(format!(
                "clip-skip {} is more than the text encoder's {} layers",
                job.clip_skip,
                encoder.num_layers()
            )));
        }
        let out = encoder.encode(
            &ids,
            chunks.len(),
            TextOutput {
                skip_layers,
                final_norm,
                pooled: enc_spec.pooled,
            },
            cx,
        )?;
        if enc_spec.pooled {
            let projected = out.projected.ok_or_else(|| {
                Error::UnsupportedModel("the pooled text encoder has no projection".into())
            })?;
            // Each row's first chunk (A1111 pools the first chunk only).
            let width = projected.len() / chunks.len();
            let first: Vec<f32> = projected
                .chunks(width)
                .step_by(per_row)
                .flatten()
                .copied()
                .collect();
            pooled = Some(with_zero_rows(first, zero_rows));
        }
        let mut out_hidden = out.hidden;
        prompt::apply_emphasis(&mut out_hidden, &weights, encoder.width());
        widths.push(encoder.width());
        hidden.push(with_zero_rows(out_hidden, zero_rows));
    }
    let tokens = tokens.unwrap_or(CONTEXT_LEN);
    let context = side_by_side(&hidden, &widths, batch * tokens);
    sampling::check_finite("text encoder", || "encoding the prompt".into(), &context)?;

    let added = match (spec.size_conditioning, pooled) {
        (true, Some(pooled)) => {
            let ids = job.size_cond.time_ids(job.height, job.width);
            let time_ids: Vec<f32> = (0..batch).flat_map(|_| ids).collect();
            Some(models.unet.added_conditioning(&pooled, &time_ids)?)
        }
        _ => None,
    };
    Ok(Conditioning {
        context,
        batch,
        tokens,
        added,
    })
}

/// Refuses, with one line, what the job's prompts cannot be: in A1111 syntax a weight that is no
/// number (`(a:1.2.3)`), extra-network tags other than `<lora:…>` (never silently ignored), and
/// LoRAs that cannot be used (`lora::check`: a tag without its file, an unreadable file).
/// Plain syntax reads any text.
pub fn check_prompts(job: &Job) -> Result<()> {
    crate::lora::check(job)?;
    if job.prompt_syntax == PromptSyntax::Plain {
        return Ok(());
    }
    prompt::parse_attention(&prompt_text(job)?)?;
    prompt::parse_attention(job.negative_text())?;
    Ok(())
}

/// Tokens of context per row the UNet gets for `job` (77 per chunk; `guided`: with the negative
/// prompt, or the zeros in its place): what the encode stage makes and the memory plan counts.
/// The job must have passed [`Job::validate`] (which refuses a prompt this cannot read).
pub fn context_tokens(job: &Job, guided: bool) -> Result<usize> {
    let chunks = encoder_chunks(job, guided, PadToken::EndOfText)?;
    Ok(chunks.len() / (1 + usize::from(guided)) * CONTEXT_LEN)
}

/// The prompt's text with its extra-network tags removed (A1111 syntax), refusing tags other than
/// `<lora:…>` (those are the job's LoRAs, `lora::adapters`).
fn prompt_text(job: &Job) -> Result<String> {
    let (text, tags) = job.prompt_syntax.extract_tags(&job.prompt)?;
    if let Some(tag) = tags.other.first() {
        return Err(Error::BadRequest(format!(
            "prompt: `{tag}`: extra networks are not supported (remove the tag; with \
             --prompt-syntax plain it is read as text)"
        )));
    }
    Ok(text)
}

/// One text encoder's input for `job`: the negative prompt's chunks (when `with_negative`), then
/// the prompt's, both the same number. `pad` is the encoder's tokenizer's padding. Plain syntax is
/// one chunk per prompt, tokenized exactly as diffusers does (cut after 75 tokens).
fn encoder_chunks(job: &Job, with_negative: bool, pad: PadToken) -> Result<Vec<TokenChunk>> {
    let tokenizer = Tokenizer::clip();
    let read = |text: &str| -> Result<Vec<TokenChunk>> {
        Ok(match job.prompt_syntax {
            PromptSyntax::Plain => vec![TokenChunk {
                ids: tokenizer.encode_padded_with(text, CONTEXT_LEN, pad),
                weights: vec![1.0; CONTEXT_LEN],
            }],
            // A1111 tokenizes the pieces without the OpenCLIP `!` rule of diffusers (open_clip's
            // own tokenizer has none); a prompt without `!` reads the same either way.
            PromptSyntax::A1111 => {
                job.prompt_syntax
                    .tokenize(tokenizer, text, pad.id())?
                    .chunks
            }
        })
    };
    let text = match job.prompt_syntax {
        PromptSyntax::Plain => job.prompt.clone(),
        PromptSyntax::A1111 => prompt_text(job)?,
    };
    let mut positive = read(&text)?;
    if !with_negative {
        return Ok(positive);
    }
    // A1111 reads no extra-network tags in the negative prompt: it is tokenized as written.
    let mut negative = read(job.negative_text())?;
    prompt::pad_to_same_chunks(&mut negative, &mut positive, pad.id());
    negative.extend(positive);
    Ok(negative)
}

/// `rows` all-zero rows (the unconditional half) in front of `values`.
fn with_zero_rows(values: Vec<f32>, rows: usize) -> Vec<f32> {
    if rows == 0 {
        return values;
    }
    let row = values.len(); // one encoded row: the other half of a guided batch
    let mut out = vec![0.0; rows * row];
    out.extend(values);
    out
}

/// Per token, each part's `widths[i]` values one after another (CLIP-L first for SDXL).
fn side_by_side(parts: &[Vec<f32>], widths: &[usize], tokens: usize) -> Vec<f32> {
    if let [single] = parts {
        return single.clone();
    }
    let total: usize = widths.iter().sum();
    let mut out = Vec::with_capacity(tokens * total);
    for t in 0..tokens {
        for (part, &w) in parts.iter().zip(widths) {
            out.extend_from_slice(&part[t * w..(t + 1) * w]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_joined_per_token() {
        let a = vec![1.0, 2.0, 3.0, 4.0]; // 2 tokens × 2
        let b = vec![5.0, 6.0]; // 2 tokens × 1
        assert_eq!(
            side_by_side(&[a, b], &[2, 1], 2),
            vec![1.0, 2.0, 5.0, 3.0, 4.0, 6.0]
        );
    }

    #[test]
    fn zero_rows_come_first() {
        assert_eq!(with_zero_rows(vec![1.0, 2.0], 1), vec![0.0, 0.0, 1.0, 2.0]);
        assert_eq!(with_zero_rows(vec![1.0, 2.0], 0), vec![1.0, 2.0]);
    }
}
