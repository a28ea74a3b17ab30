//! The CLIP text encoder of SD1.x (`cond_stage_model.transformer.text_model.*`).

use super::layers::{add_assign, LayerNorm, Linear};
use crate::error::Result;
use crate::kernels::{self, AttentionShape};
use crate::weights::{Param, Weights};

struct EncoderLayer {
    layer_norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn new(w: &Weights, dim: usize) -> Result<Self> {
        let attn = w.pp("self_attn");
        let fc1 = Linear::from_weights(&w.pp("mlp.fc1"), true)?;
        Ok(EncoderLayer {
            layer_norm1: LayerNorm::new(&w.pp("layer_norm1"), dim, 1e-5)?,
            q: Linear::new(&attn.pp("q_proj"), dim, dim, true)?,
            k: Linear::new(&attn.pp("k_proj"), dim, dim, true)?,
            v: Linear::new(&attn.pp("v_proj"), dim, dim, true)?,
            out: Linear::new(&attn.pp("out_proj"), dim, dim, true)?,
            layer_norm2: LayerNorm::new(&w.pp("layer_norm2"), dim, 1e-5)?,
            fc2: Linear::new(&w.pp("mlp.fc2"), fc1.out_dim, dim, true)?,
            fc1,
        })
    }

    fn forward(&self, x: &mut [f32], n: usize, tokens: usize, heads: usize) {
        let dim = self.q.in_dim;
        let mut h = x.to_vec();
        self.layer_norm1.forward(&mut h);
        let (q, k, v) = (self.q.forward(&h), self.k.forward(&h), self.v.forward(&h));
        let attended = kernels::attention(
            &q,
            &k,
            &v,
            AttentionShape {
                batch: n,
                q_len: tokens,
                kv_len: tokens,
                channels: dim,
                heads,
                causal: true,
            },
        );
        add_assign(x, &self.out.forward(&attended));
        h.copy_from_slice(x);
        self.layer_norm2.forward(&mut h);
        let mut mid = self.fc1.forward(&h);
        kernels::quick_gelu(&mut mid);
        add_assign(x, &self.fc2.forward(&mid));
    }
}

pub struct TextEncoder {
    /// Read row by row for the ids being encoded (the f32 table would be 152 MB for CLIP ViT-L).
    token_embedding: Param,
    position_embedding: Vec<f32>,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    dim: usize,
    heads: usize,
}

impl TextEncoder {
    /// `w` is the text model prefix (`cond_stage_model.transformer.text_model`).
    pub fn new(w: &Weights) -> Result<Self> {
        let tok = w.pp("embeddings.token_embedding").param_any("weight")?;
        let dim = tok.shape()[1];
        let pos = w.pp("embeddings.position_embedding").param_any("weight")?;
        let mut layers = Vec::new();
        while w.contains(&format!(
            "encoder.layers.{}.layer_norm1.weight",
            layers.len()
        )) {
            layers.push(EncoderLayer::new(
                &w.pp(format!("encoder.layers.{}", layers.len())),
                dim,
            )?);
        }
        if layers.is_empty() {
            return Err(crate::Error::MissingTensor(format!(
                "{}.encoder.layers.0.layer_norm1.weight",
                w.prefix()
            )));
        }
        Ok(TextEncoder {
            token_embedding: tok,
            position_embedding: pos.to_f32(),
            layers,
            final_layer_norm: LayerNorm::new(&w.pp("final_layer_norm"), dim, 1e-5)?,
            dim,
            heads: heads_for_width(dim),
        })
    }

    pub fn width(&self) -> usize {
        self.dim
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Encodes token ids [n, tokens] → conditioning [n, tokens, dim]: the final layer norm applied to
    /// the output of the layer `clip_skip` from the end (1 = last layer, 2 = penultimate).
    pub fn forward(&self, ids: &[u32], n: usize, clip_skip: usize) -> Vec<f32> {
        let tokens = ids.len() / n;
        let vocab = self.token_embedding.rows();
        let mut x = vec![0.0f32; ids.len() * self.dim];
        for (i, (&id, row)) in ids.iter().zip(x.chunks_mut(self.dim)).enumerate() {
            // Ids come from our tokenizer (< vocab); clamp rather than panic on a smaller vocab.
            let id = (id as usize).min(vocab - 1);
            self.token_embedding.read_rows(id, 1, row);
            let p = i % tokens;
            let pos = &self.position_embedding[p * self.dim..(p + 1) * self.dim];
            row.iter_mut().zip(pos).for_each(|(a, b)| *a += b);
        }
        let keep = self.layers.len() + 1 - clip_skip.clamp(1, self.layers.len());
        for layer in &self.layers[..keep] {
            layer.forward(&mut x, n, tokens, self.heads);
        }
        self.final_layer_norm.forward(&mut x);
        x
    }
}

/// Attention heads are not stored in the checkpoint. CLIP text models use 64-wide heads
/// (ViT-L/14: 768 → 12); test-sized models (width < 64) use 8-wide heads (tiny: 32 → 4).
fn heads_for_width(dim: usize) -> usize {
    if dim >= 64 && dim.is_multiple_of(64) {
        dim / 64
    } else {
        (dim / 8).max(1)
    }
}
