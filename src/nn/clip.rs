//! The CLIP text encoders: SD1.x's CLIP ViT-L, SD2.x's OpenCLIP ViT-H, SDXL's CLIP ViT-L and
//! OpenCLIP ViT-bigG. One network (pre-LN transformer, causal attention, final layer norm, optional
//! projection of the EOS token) read from either naming, detected from the keys under its prefix:
//!
//! | | transformers (`CLIPTextModel`) | open_clip |
//! |---|---|---|
//! | token / position embedding | `embeddings.token_embedding.weight`, `embeddings.position_embedding.weight` | `token_embedding.weight`, `positional_embedding` |
//! | layer N | `encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}` | `transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias (rows q;k;v), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}` |
//! | final norm | `final_layer_norm` | `ln_final` |
//! | projection | `text_projection.weight` [proj, width] beside `text_model` (a Linear) | `text_projection` [width, proj] (x · P) |
//!
//! The activation is not in the file: quick_gelu for OpenAI's CLIP, erf GELU for OpenCLIP
//! ([`TextActivation`], from the family's description).

use super::layers::{add_assign, LayerNorm, Linear};
use crate::error::{Error, Result};
use crate::kernels::{self, AttentionShape};
use crate::nn::Ctx;
use crate::tokenizer::CONTEXT_LEN;
use crate::weights::{Param, Weights};

/// The MLP activation of a text encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextActivation {
    /// x·σ(1.702x): OpenAI's CLIP ViT-L (SD1.x, SDXL's first encoder).
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP ViT-H (SD2.x) and ViT-bigG (SDXL's second encoder).
    Gelu,
}

impl TextActivation {
    fn apply(self, x: &mut [f32]) {
        match self {
            TextActivation::QuickGelu => kernels::quick_gelu(x),
            TextActivation::Gelu => kernels::gelu(x),
        }
    }
}

/// What [`TextEncoder::encode`] computes, as a family's description asks for it.
///
/// | family | `skip_layers` | `final_norm` | `pooled` |
/// |---|---|---|---|
/// | SD1.x | `clip_skip − 1` | yes | no |
/// | SD2.x (ViT-H) | 1 | yes | no |
/// | SDXL CLIP-L | 1 | no | no |
/// | SDXL bigG | 1 | no | yes |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextOutput {
    /// Whose output the hidden state is, counted back from the last layer: 0 = the last layer
    /// (`hidden_states[-1]`), 1 = the penultimate (`hidden_states[-2]`), …. Layers after it are
    /// not run unless `pooled` needs them.
    pub skip_layers: usize,
    /// Whether the final layer norm (`final_layer_norm` / `ln_final`) is applied to the hidden state.
    pub final_norm: bool,
    /// Whether to also compute the pooled embedding: the final layer norm of the LAST layer's output
    /// at each sequence's EOS position, and that times the projection.
    pub pooled: bool,
}

/// The result of [`TextEncoder::encode`] for `n` sequences of `tokens` ids.
#[derive(Clone, Debug, PartialEq)]
pub struct TextEncoding {
    /// [n, tokens, width]: the hidden state [`TextOutput`] asked for.
    pub hidden: Vec<f32>,
    /// [n, width] when `pooled` was asked for: final-normed last-layer output at the EOS position
    /// (transformers' `pooler_output`).
    pub pooled: Option<Vec<f32>>,
    /// [n, projection_dim] when `pooled` was asked for: `pooled` through the projection
    /// (transformers' `text_embeds`, SDXL's pooled conditioning).
    pub projected: Option<Vec<f32>>,
}

struct EncoderLayer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    /// `encoder.layers.N` of a transformers `CLIPTextModel`.
    fn transformers(w: &Weights, dim: usize) -> Result<Self> {
        let attn = w.pp("self_attn");
        let fc1 = Linear::from_weights(&w.pp("mlp.fc1"), true)?;
        Ok(EncoderLayer {
            norm1: LayerNorm::new(&w.pp("layer_norm1"), dim, 1e-5)?,
            q: Linear::new(&attn.pp("q_proj"), dim, dim, true)?,
            k: Linear::new(&attn.pp("k_proj"), dim, dim, true)?,
            v: Linear::new(&attn.pp("v_proj"), dim, dim, true)?,
            out: Linear::new(&attn.pp("out_proj"), dim, dim, true)?,
            norm2: LayerNorm::new(&w.pp("layer_norm2"), dim, 1e-5)?,
            fc2: Linear::new(&w.pp("mlp.fc2"), fc1.out_dim, dim, true)?,
            fc1,
        })
    }

    /// `transformer.resblocks.N` of an open_clip text tower. The fused `in_proj_weight` [3·dim, dim]
    /// (rows q; k; v, as torch's `MultiheadAttention`) is read as three row ranges of the mapping.
    fn open_clip(w: &Weights, dim: usize) -> Result<Self> {
        let attn = w.pp("attn");
        let in_weight = attn.param("in_proj_weight", &[3 * dim, dim])?;
        let in_bias = attn.param("in_proj_bias", &[3 * dim])?;
        let third = |i: usize| {
            Linear::from_params(
                in_weight.row_range(i * dim, dim)?,
                Some(in_bias.row_range(i * dim, dim)?),
            )
        };
        let fc1 = Linear::from_weights(&w.pp("mlp.c_fc"), true)?;
        Ok(EncoderLayer {
            norm1: LayerNorm::new(&w.pp("ln_1"), dim, 1e-5)?,
            q: third(0)?,
            k: third(1)?,
            v: third(2)?,
            out: Linear::new(&attn.pp("out_proj"), dim, dim, true)?,
            norm2: LayerNorm::new(&w.pp("ln_2"), dim, 1e-5)?,
            fc2: Linear::new(&w.pp("mlp.c_proj"), fc1.out_dim, dim, true)?,
            fc1,
        })
    }

    /// x += attn(norm1(x)) (causal); x += fc2(act(fc1(norm2(x)))).
    fn forward(
        &self,
        x: &mut [f32],
        (n, tokens, heads): (usize, usize, usize),
        act: TextActivation,
        cx: &Ctx,
    ) {
        let dim = self.q.in_dim;
        let mut h = x.to_vec();
        self.norm1.forward(&mut h);
        let (q, k, v) = (
            self.q.forward(&h, cx),
            self.k.forward(&h, cx),
            self.v.forward(&h, cx),
        );
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
            &cx.scratch,
        );
        add_assign(x, &self.out.forward(&attended, cx));
        h.copy_from_slice(x);
        self.norm2.forward(&mut h);
        let mut mid = self.fc1.forward(&h, cx);
        act.apply(&mut mid);
        add_assign(x, &self.fc2.forward(&mid, cx));
    }
}

/// The pooled embedding's projection, in the orientation its naming stores it.
/// The pooled output's projection. Both layouts sum x[i]·P[i, j] over i in order, one product and
/// one addition at a time, so a diffusers folder and the single file give the same bits (a GEMM
/// would order the sums by layout); it runs once per prompt.
enum Projection {
    /// open_clip's `text_projection` [width, proj], applied as x · P.
    Matrix(Param),
    /// transformers' `text_projection.weight` [proj, width] (= Pᵀ), a Linear without bias.
    Transposed(Param),
}

impl Projection {
    fn out_dim(&self) -> usize {
        match self {
            Projection::Matrix(p) => p.shape()[1],
            Projection::Transposed(w) => w.rows(),
        }
    }

    /// rows [n, width] → [n, proj].
    fn forward(&self, rows: &[f32]) -> Vec<f32> {
        match self {
            Projection::Transposed(w) => {
                let (proj, width) = (w.rows(), w.row_len());
                let weight = w.to_f32();
                let mut out = Vec::with_capacity(rows.len() / width * proj);
                for x in rows.chunks(width) {
                    out.extend(weight.chunks(width).map(|w_row| {
                        let mut y = 0.0f32;
                        for (&xi, &p) in x.iter().zip(w_row) {
                            y += xi * p;
                        }
                        y
                    }));
                }
                out
            }
            Projection::Matrix(p) => {
                let (width, proj) = (p.rows(), p.row_len());
                let n = rows.len() / width;
                let mut out = vec![0.0f32; n * proj];
                // Row panels of P (a few MiB at most), each adding x[i] · P[i, :] to the output.
                const PANEL_ROWS: usize = 64;
                let mut panel = vec![0.0f32; PANEL_ROWS.min(width) * proj];
                for first in (0..width).step_by(PANEL_ROWS) {
                    let count = PANEL_ROWS.min(width - first);
                    let panel = &mut panel[..count * proj];
                    p.read_rows(first, count, panel);
                    for (x, y) in rows.chunks(width).zip(out.chunks_mut(proj)) {
                        for (&xi, p_row) in x[first..first + count].iter().zip(panel.chunks(proj)) {
                            y.iter_mut().zip(p_row).for_each(|(y, &p)| *y += xi * p);
                        }
                    }
                }
                out
            }
        }
    }
}

pub struct TextEncoder {
    /// Read row by row for the ids being encoded (the f32 table would be 152 MB for CLIP ViT-L).
    token_embedding: Param,
    /// [positions, width].
    position_embedding: Vec<f32>,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    projection: Option<Projection>,
    activation: TextActivation,
    dim: usize,
    heads: usize,
}

impl TextEncoder {
    /// SD1.x's CLIP ViT-L (quick_gelu) under `w` (`cond_stage_model.transformer.text_model`).
    pub fn new(w: &Weights) -> Result<Self> {
        Self::with_activation(w, TextActivation::QuickGelu)
    }

    /// The text encoder under `w`, in either naming: open_clip's tower
    /// (`cond_stage_model.model`, `conditioner.embedders.1.model`), a transformers `text_model`
    /// (`….transformer.text_model`), or a transformers model root holding `text_model.*` and
    /// `text_projection.weight` (a diffusers `text_encoder_2/` file opened on its own, prefix "").
    pub fn with_activation(w: &Weights, activation: TextActivation) -> Result<Self> {
        if w.contains("token_embedding.weight") {
            Self::open_clip(w, activation)
        } else if w.contains("text_model.embeddings.token_embedding.weight") {
            Self::transformers(&w.pp("text_model"), Some(w), activation)
        } else {
            Self::transformers(w, None, activation)
        }
    }

    fn transformers(
        w: &Weights,
        root: Option<&Weights>,
        activation: TextActivation,
    ) -> Result<Self> {
        let token_embedding = w.pp("embeddings.token_embedding").param_any("weight")?;
        let dim = embedding_width(&token_embedding)?;
        let layers = Self::layers(w, "encoder.layers", "layer_norm1.weight", |w| {
            EncoderLayer::transformers(w, dim)
        })?;
        let projection = match root {
            Some(root) if root.contains("text_projection.weight") => {
                let w = root.pp("text_projection");
                let weight = w.param_any("weight")?;
                match weight.shape() {
                    &[_, width] if width == dim => {}
                    found => {
                        return Err(Error::BadShape {
                            name: format!("{}.weight", w.prefix()),
                            found: found.to_vec(),
                            expected: vec![0, dim],
                        })
                    }
                };
                Some(Projection::Transposed(weight))
            }
            _ => None,
        };
        Self::assemble(
            token_embedding,
            w.pp("embeddings.position_embedding").param_any("weight")?,
            layers,
            LayerNorm::new(&w.pp("final_layer_norm"), dim, 1e-5)?,
            projection,
            activation,
        )
    }

    fn open_clip(w: &Weights, activation: TextActivation) -> Result<Self> {
        let token_embedding = w.param_any("token_embedding.weight")?;
        let dim = embedding_width(&token_embedding)?;
        let layers = Self::layers(w, "transformer.resblocks", "ln_1.weight", |w| {
            EncoderLayer::open_clip(w, dim)
        })?;
        let projection = if w.contains("text_projection") {
            let p = w.param_any("text_projection")?;
            match p.shape() {
                &[width, _] if width == dim => Some(Projection::Matrix(p)),
                _ => {
                    return Err(Error::BadShape {
                        name: format!("{}.text_projection", w.prefix()),
                        found: p.shape().to_vec(),
                        expected: vec![dim, 0],
                    })
                }
            }
        } else {
            None
        };
        Self::assemble(
            token_embedding,
            w.param_any("positional_embedding")?,
            layers,
            LayerNorm::new(&w.pp("ln_final"), dim, 1e-5)?,
            projection,
            activation,
        )
    }

    /// `{list}.0`, `{list}.1`, … while `{list}.N.{marker}` exists; at least one.
    fn layers(
        w: &Weights,
        list: &str,
        marker: &str,
        build: impl Fn(&Weights) -> Result<EncoderLayer>,
    ) -> Result<Vec<EncoderLayer>> {
        let mut layers = Vec::new();
        while w.contains(&format!("{list}.{}.{marker}", layers.len())) {
            layers.push(build(&w.pp(format!("{list}.{}", layers.len())))?);
        }
        if layers.is_empty() {
            return Err(Error::MissingTensor(format!(
                "{}.{list}.0.{marker}",
                w.prefix()
            )));
        }
        Ok(layers)
    }

    fn assemble(
        token_embedding: Param,
        position_embedding: Param,
        layers: Vec<EncoderLayer>,
        final_norm: LayerNorm,
        projection: Option<Projection>,
        activation: TextActivation,
    ) -> Result<Self> {
        let dim = token_embedding.shape()[1];
        // Every Stable Diffusion text encoder, and so the tokenizer, has 77 positions.
        if position_embedding.shape() != [CONTEXT_LEN, dim] {
            return Err(Error::BadShape {
                name: position_embedding.info().name.clone(),
                found: position_embedding.shape().to_vec(),
                expected: vec![CONTEXT_LEN, dim],
            });
        }
        Ok(TextEncoder {
            token_embedding,
            position_embedding: position_embedding.to_f32(),
            layers,
            final_norm,
            projection,
            activation,
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

    /// Token positions the encoder has embeddings for ([`CONTEXT_LEN`], checked when built).
    pub fn positions(&self) -> usize {
        self.position_embedding.len() / self.dim
    }

    /// Width of the projected pooled embedding, None if the file has no projection.
    pub fn projection_dim(&self) -> Option<usize> {
        self.projection.as_ref().map(Projection::out_dim)
    }

    /// Encodes token ids [n, tokens] → conditioning [n, tokens, dim]: the final layer norm applied to
    /// the output of the layer `clip_skip` from the end (1 = last layer, 2 = penultimate; clamped to
    /// the layers there are). SD1.x's conditioning. Panics on ids that are not `n` sequences of at
    /// most [`CONTEXT_LEN`] (the pipeline's own tokenizer output); `encode` returns that as an error.
    /// Kernels work within the budgets of `scratch`.
    pub fn forward(&self, ids: &[u32], n: usize, clip_skip: usize, cx: &Ctx) -> Vec<f32> {
        let request = TextOutput {
            skip_layers: clip_skip.clamp(1, self.layers.len()) - 1,
            final_norm: true,
            pooled: false,
        };
        self.encode(ids, n, request, cx)
            .expect("a valid request for SD1.x conditioning")
            .hidden
    }

    /// Encodes token ids [n, tokens] as `request` says (see [`TextOutput`]). Runs the layers up to
    /// the one asked for, or all of them in one pass when the pooled embedding is asked for, with
    /// kernels within the budgets of `scratch`.
    pub fn encode(
        &self,
        ids: &[u32],
        n: usize,
        request: TextOutput,
        cx: &Ctx,
    ) -> Result<TextEncoding> {
        let tokens = ids.len().checked_div(n).unwrap_or(0);
        if n == 0 || tokens == 0 || tokens * n != ids.len() || tokens > self.positions() {
            return Err(Error::BadRequest(format!(
                "the text encoder takes 1 to {} tokens per sequence; got {} ids for {n} sequences",
                self.positions(),
                ids.len()
            )));
        }
        if request.skip_layers >= self.layers.len() {
            return Err(Error::BadRequest(format!(
                "cannot skip {} of the text encoder's {} layers",
                request.skip_layers,
                self.layers.len()
            )));
        }
        if request.pooled && self.projection.is_none() {
            return Err(Error::MissingTensor(
                "text_projection (the text encoder's pooled projection)".into(),
            ));
        }

        let mut x = self.embed(ids, tokens);
        let keep = self.layers.len() - request.skip_layers;
        let run_to = if request.pooled {
            self.layers.len()
        } else {
            keep
        };
        let mut hidden = None;
        for (i, layer) in self.layers[..run_to].iter().enumerate() {
            let sizes = (n, tokens, self.heads);
            layer.forward(&mut x, sizes, self.activation, cx);
            if i + 1 == keep && keep < run_to {
                hidden = Some(x.clone());
            }
        }

        let (pooled, projected) = match &self.projection {
            Some(projection) if request.pooled => {
                let mut rows: Vec<f32> = ids
                    .chunks(tokens)
                    .zip(x.chunks(tokens * self.dim))
                    .flat_map(|(ids, seq)| {
                        let eos = eos_position(ids);
                        seq[eos * self.dim..(eos + 1) * self.dim].iter().copied()
                    })
                    .collect();
                self.final_norm.forward(&mut rows);
                let projected = projection.forward(&rows);
                (Some(rows), Some(projected))
            }
            _ => (None, None),
        };

        let mut hidden = hidden.unwrap_or(x);
        if request.final_norm {
            self.final_norm.forward(&mut hidden);
        }
        Ok(TextEncoding {
            hidden,
            pooled,
            projected,
        })
    }

    /// Token plus position embeddings, [n, tokens, dim].
    fn embed(&self, ids: &[u32], tokens: usize) -> Vec<f32> {
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
        x
    }
}

/// The EOS position of one sequence: the first position of its largest id (`<|endoftext|>`, 49407,
/// the largest id there is), which is how open_clip (`text.argmax(-1)`) and transformers pool.
fn eos_position(ids: &[u32]) -> usize {
    let max = ids.iter().copied().max().unwrap_or(0);
    ids.iter().position(|&id| id == max).unwrap_or(0)
}

/// The width of a token embedding table [vocab, width].
fn embedding_width(table: &Param) -> Result<usize> {
    match table.shape() {
        &[vocab, width] if vocab > 0 && width > 0 => Ok(width),
        found => Err(Error::BadShape {
            name: table.info().name.clone(),
            found: found.to_vec(),
            expected: vec![49408, 0],
        }),
    }
}

/// Attention heads are not stored in the checkpoint. CLIP and OpenCLIP text models use 64-wide heads
/// (ViT-L/14: 768 → 12, ViT-H: 1024 → 16, ViT-bigG: 1280 → 20); test-sized models (width < 64)
/// use 8-wide heads (tiny: 32 → 4, 24 → 3, 16 → 2).
fn heads_for_width(dim: usize) -> usize {
    if dim >= 64 && dim.is_multiple_of(64) {
        dim / 64
    } else {
        (dim / 8).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_is_the_first_largest_id() {
        assert_eq!(eos_position(&[49406, 320, 49407, 0, 0]), 2);
        assert_eq!(eos_position(&[49406, 320, 49407, 49407, 49407]), 2);
        // A prompt cut at 77 ids ends with EOS; with `!` → 0 the zeros never win.
        assert_eq!(eos_position(&[49406, 0, 0, 49407]), 3);
    }

    #[test]
    fn heads_are_64_wide_for_real_widths() {
        assert_eq!(
            [768, 1024, 1280, 32, 24, 16].map(heads_for_width),
            [12, 16, 20, 4, 3, 2]
        );
    }
}
