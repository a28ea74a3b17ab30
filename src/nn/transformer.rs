//! The SD1.x spatial transformer: GroupNorm, proj_in, transformer blocks (self-attention,
//! cross-attention to the text, GEGLU feed-forward), proj_out, residual.

use super::layers::{from_tokens_with, to_tokens_with, GroupNorm, LayerNorm, Linear, MapRef};
use crate::error::Result;
use crate::kernels::scratch::MIN_SPLIT;
use crate::kernels::{self, AttentionShape};
use crate::nn::Ctx;
use crate::tensor::{zeroed, Tensor};
use crate::weights::Weights;

/// Multi-head attention with q from `x` and k/v from `context` (or `x` itself).
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    /// LDM naming: `to_q`, `to_k`, `to_v` (no bias), `to_out.0`.
    pub fn new(w: &Weights, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        Ok(Attention {
            to_q: Linear::new(&w.pp("to_q"), dim, dim, false)?,
            to_k: Linear::new(&w.pp("to_k"), context_dim, dim, false)?,
            to_v: Linear::new(&w.pp("to_v"), context_dim, dim, false)?,
            to_out: Linear::new(&w.pp("to_out.0"), dim, dim, true)?,
            heads,
        })
    }

    /// `residual += attention(x)`, with `x` [n, lq, dim], `context` [n, lk, context_dim] (None =
    /// self-attention); the output projection's bias and the residual are added in one pass.
    pub fn forward_add_to(
        &self,
        x: &[f32],
        n: usize,
        context: Option<(&[f32], usize)>,
        residual: &mut [f32],
        cx: &Ctx,
    ) {
        let attended = self.attend(x, n, context, cx);
        self.to_out.forward_add_to(&attended, residual, cx);
    }

    /// The heads' outputs before the output projection, [n, lq, dim].
    fn attend(&self, x: &[f32], n: usize, context: Option<(&[f32], usize)>, cx: &Ctx) -> Vec<f32> {
        let dim = self.to_q.out_dim;
        let lq = x.len() / (n * dim);
        let (ctx, lk) = context.unwrap_or((x, lq));
        let q = self.to_q.forward(x, cx);
        // The text context's keys and values stay f32 whatever the precision mode.
        let kv_cx = if context.is_some() {
            cx.exact()
        } else {
            cx.clone()
        };
        let k = self.to_k.forward(ctx, &kv_cx);
        let v = self.to_v.forward(ctx, &kv_cx);
        kernels::attention(
            &q,
            &k,
            &v,
            AttentionShape {
                batch: n,
                q_len: lq,
                kv_len: lk,
                channels: dim,
                heads: self.heads,
                causal: false,
            },
            &cx.scratch,
        )
    }
}

struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn new(w: &Weights, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(TransformerBlock {
            norm1: LayerNorm::new(&w.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(&w.pp("attn1"), dim, dim, heads)?,
            norm2: LayerNorm::new(&w.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(&w.pp("attn2"), dim, context_dim, heads)?,
            norm3: LayerNorm::new(&w.pp("norm3"), dim, 1e-5)?,
            ff_in: Linear::new(&w.pp("ff.net.0.proj"), dim, 2 * inner, true)?,
            ff_out: Linear::new(&w.pp("ff.net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, x: &mut [f32], n: usize, context: (&[f32], usize), cx: &Ctx) {
        let mut h = zeroed(x.len());
        self.norm1.forward_to(x, &mut h);
        self.attn1.forward_add_to(&h, n, None, x, cx);
        self.norm2.forward_to(x, &mut h);
        self.attn2.forward_add_to(&h, n, Some(context), x, cx);
        self.norm3.forward_to(x, &mut h);
        // The feed-forward widens each token 8× (GEGLU): run it over bounded token chunks so its
        // intermediates stay small. Rows are independent, so chunking does not change results.
        let dim = self.ff_out.out_dim;
        let chunk_tokens = (cx.scratch.ff_chunk / (2 * self.ff_out.in_dim)).max(MIN_SPLIT);
        let ff_in_bias = self.ff_in.bias();
        for (xs, hs) in x
            .chunks_mut(chunk_tokens * dim)
            .zip(h.chunks(chunk_tokens * dim))
        {
            let gated = kernels::geglu(
                &self.ff_in.product(hs, cx),
                ff_in_bias.as_deref(),
                self.ff_out.in_dim,
            );
            self.ff_out.forward_add_to(&gated, xs, cx);
        }
    }
}

/// LDM `SpatialTransformer` (diffusers `Transformer2DModel`).
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<TransformerBlock>,
    proj_out: Linear,
    context_dim: usize,
    heads: usize,
    pub channels: usize,
}

impl SpatialTransformer {
    /// `proj_in`/`proj_out` may be 1×1 convs (SD1) or linears (SD2); both act per token.
    pub fn new(w: &Weights, channels: usize, heads: usize, groups: usize) -> Result<Self> {
        let context_dim = w
            .pp("transformer_blocks.0.attn2.to_k")
            .param_any("weight")?
            .shape()[1];
        let mut blocks = Vec::new();
        while w.contains(&format!("transformer_blocks.{}.norm1.weight", blocks.len())) {
            let bw = w.pp(format!("transformer_blocks.{}", blocks.len()));
            blocks.push(TransformerBlock::new(&bw, channels, context_dim, heads)?);
        }
        Ok(SpatialTransformer {
            norm: GroupNorm::new(&w.pp("norm"), channels, groups, 1e-6)?,
            proj_in: Linear::new(&w.pp("proj_in"), channels, channels, true)?,
            blocks,
            proj_out: Linear::new(&w.pp("proj_out"), channels, channels, true)?,
            context_dim,
            heads,
            channels,
        })
    }

    /// Width of one attention head.
    pub fn head_width(&self) -> usize {
        self.channels / self.heads
    }

    /// Width of the context the cross-attentions read (768 SD1, 1024 SD2, 2048 SDXL).
    pub fn context_dim(&self) -> usize {
        self.context_dim
    }

    /// `context` [n, tokens, context_dim], any number of tokens; kernels within the budgets of
    /// `scratch`.
    pub fn forward(&self, x: &Tensor, context: &[f32], cx: &Ctx) -> Tensor {
        let (n, c, h, w) = x.nchw();
        let ctx_tokens = context.len() / (n * self.context_dim);
        // GroupNorm applied while changing the layout to tokens: one pass, no normalised copy.
        let norm = self.norm.per_image(MapRef::One(x));
        let normed = to_tokens_with(x, |b, ch, v| v * norm[b].0[ch] + norm[b].1[ch]);
        let mut tokens = self.proj_in.forward(&normed, cx);
        drop(normed);
        for block in &self.blocks {
            block.forward(&mut tokens, n, (context, ctx_tokens), cx);
        }
        let projected = self.proj_out.product(&tokens, cx);
        drop(tokens);
        // Bias and residual added while changing the layout back: one pass.
        let bias = self.proj_out.bias().unwrap_or_else(|| vec![0.0; c]);
        let hw = h * w;
        from_tokens_with(&projected, n, c, h, w, |b, ch, p, v| {
            (v + bias[ch]) + x.data[(b * c + ch) * hw + p]
        })
    }
}
