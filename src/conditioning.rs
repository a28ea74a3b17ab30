//! The encode stage: prompts → what the UNet is conditioned on, as the family's description says
//! (which encoders, which hidden state of each, padding, pooled and size conditioning).

use crate::error::{Error, Result};
use crate::family::HiddenState;
use crate::job::Job;
use crate::kernels::scratch::Scratch;
use crate::models::Models;
use crate::nn::clip::TextOutput;
use crate::sampling;
use crate::tokenizer::{Tokenizer, CONTEXT_LEN};

/// The UNet's conditioning for one job: `batch` rows, the unconditional row first when guided.
pub struct Conditioning {
    /// [batch, tokens, context width]: the encoders' hidden states side by side, per token.
    pub context: Vec<f32>,
    pub batch: usize,
    /// SDXL's `label_emb` input [batch, adm_in]: the pooled embedding and the six size ids.
    pub added: Option<Vec<f32>>,
}

/// Encodes `job`'s prompt (and, when `guided`, its negative prompt first) with every text encoder
/// of the family. With no negative prompt a family that says so (SDXL) gets all-zero unconditional
/// embeddings, pooled included, as diffusers' `force_zeros_for_empty_prompt`. The encoders' kernels
/// work within the budgets of `scratch`.
pub fn encode(models: &Models, job: &Job, guided: bool, scratch: &Scratch) -> Result<Conditioning> {
    let spec = models.spec;
    let zero_uncond = guided && spec.zero_uncond_without_negative && job.negative.is_none();
    let mut prompts = Vec::new();
    if guided && !zero_uncond {
        prompts.push(job.negative_text());
    }
    prompts.push(job.prompt.as_str());
    let encoded_rows = prompts.len();
    let batch = if guided { 2 } else { 1 };
    let zero_rows = batch - encoded_rows;

    let tokenizer = Tokenizer::clip();
    let mut hidden = Vec::new();
    let mut widths = Vec::new();
    let mut pooled = None;
    for (enc_spec, encoder) in spec.text_encoders.iter().zip(&models.text_encoders) {
        let ids: Vec<u32> = prompts
            .iter()
            .flat_map(|p| tokenizer.encode_padded_with(p, CONTEXT_LEN, enc_spec.pad))
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
            encoded_rows,
            TextOutput {
                skip_layers,
                final_norm,
                pooled: enc_spec.pooled,
            },
            scratch,
        )?;
        if enc_spec.pooled {
            let projected = out.projected.ok_or_else(|| {
                Error::UnsupportedModel("the pooled text encoder has no projection".into())
            })?;
            pooled = Some(with_zero_rows(projected, zero_rows));
        }
        widths.push(encoder.width());
        hidden.push(with_zero_rows(out.hidden, zero_rows));
    }
    let context = side_by_side(&hidden, &widths, batch * CONTEXT_LEN);
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
        added,
    })
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
