//! The KL VAE of SD1.x/SD2.x/SDXL (LDM `first_stage_model.*`): decoder latent → image, encoder image → latent.
//!
//! The decoder runs as streaming passes over feature maps stored in bands of rows (`VaePlan`), with
//! GroupNorm + SiLU and the 2× upsample fused into each convolution's gather, so its memory is a
//! few maps of the current level at most and `Decoder::peak_bytes` predicts it from shapes, under
//! the kernels' scratch tier the plan carries (`VaePlan::scratch`; the first tier in every plan the
//! pipeline makes: the decoder's memory lever is the band height).

mod bands;
mod blocks;
mod decoder;
mod encoder;
mod plan;

use super::layers::{add_assign, from_tokens, to_tokens, GroupNorm, Linear};
use crate::error::Result;
use crate::kernels::scratch::Scratch;
use crate::kernels::{self, AttentionShape};
use crate::nn::Ctx;
use crate::tensor::Tensor;
use crate::weights::Weights;

pub use decoder::Decoder;
pub use encoder::{Encoder, LatentDistribution};
pub use plan::VaePlan;

const GROUPS: usize = 32;
/// The LDM VAE normalises with eps 1e-6 (unlike the UNet's 1e-5).
const EPS: f32 = 1e-6;

/// Single-head self-attention over all pixels (the mid block of both halves), with residual.
struct AttnBlock {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    proj_out: Linear,
}

impl AttnBlock {
    fn new(w: &Weights, ch: usize) -> Result<Self> {
        Ok(AttnBlock {
            norm: GroupNorm::new(&w.pp("norm"), ch, GROUPS, EPS)?,
            q: Linear::new(&w.pp("q"), ch, ch, true)?,
            k: Linear::new(&w.pp("k"), ch, ch, true)?,
            v: Linear::new(&w.pp("v"), ch, ch, true)?,
            proj_out: Linear::new(&w.pp("proj_out"), ch, ch, true)?,
        })
    }

    /// Intermediates are dropped as soon as they are used (see `peak_bytes`).
    fn forward(&self, x: &Tensor, cx: &Ctx) -> Tensor {
        let (n, c, h, w) = x.nchw();
        let tokens = {
            let mut normed = x.clone();
            self.norm.forward(&mut normed, false);
            to_tokens(&normed)
        };
        let (q, k, v) = (
            self.q.forward(&tokens, cx),
            self.k.forward(&tokens, cx),
            self.v.forward(&tokens, cx),
        );
        drop(tokens);
        let shape = AttentionShape {
            batch: n,
            q_len: h * w,
            kv_len: h * w,
            channels: c,
            heads: 1,
            causal: false,
        };
        let attended = kernels::attention(&q, &k, &v, shape, &cx.scratch);
        drop((q, k, v));
        let projected = self.proj_out.forward(&attended, cx);
        let mut out = from_tokens(&projected, n, c, h, w);
        add_assign(&mut out.data, &x.data);
        out
    }

    /// Peak of `forward` on one image of `c` channels and `hw` pixels, its input included: during
    /// the attention kernel the input, q, k, v and the kernel's output (5 maps) plus the kernel's
    /// scratch under `scratch`; before that, the input, the normalised copy and the tokens plus the
    /// norm statistics.
    fn peak_bytes(c: usize, h: usize, w: usize, scratch: &Scratch, threads: usize) -> u64 {
        let map = (c as u64 * h as u64 * w as u64).saturating_mul(4);
        let shape = AttentionShape {
            batch: 1,
            q_len: h * w,
            kv_len: h * w,
            channels: c,
            heads: 1,
            causal: false,
        };
        let norm = map
            .saturating_mul(3)
            .saturating_add(kernels::group_norm_stats_bytes(c, h));
        let kernel = map
            .saturating_mul(5)
            .saturating_add(kernels::attention_scratch_bytes(
                shape,
                scratch.attention_query_chunk,
                threads,
            ));
        norm.max(kernel)
    }
}

/// The mid block's attention (of the decoder or the encoder) over a banded map: it sees the whole
/// (small, latent-sized) map.
fn banded_attention(attn: &AttnBlock, x: bands::BandedMap, plan: &VaePlan) -> bands::BandedMap {
    let layout = x.layout();
    let whole = Tensor::new(vec![1, layout.c, layout.h, layout.w], x.to_planes());
    drop(x);
    let out = attn.forward(&whole, &Ctx::from(plan.scratch));
    drop(whole);
    let layout = bands::BandLayout::new(layout.c, layout.h, layout.w, plan.band_rows);
    let x = bands::BandedMap::from_planes(&out.data, layout);
    drop(out);
    // The attention's intermediates (nine latent-sized maps, many freed on worker threads)
    // would otherwise stay in malloc's arenas through the full-resolution levels.
    crate::governor::memory::release_free_memory();
    x
}

/// How many `{kind}.{i}` resolution levels the checkpoint has.
fn count_levels(w: &Weights, kind: &str) -> usize {
    (0..)
        .take_while(|i| w.contains(&format!("{kind}.{i}.block.0.conv1.weight")))
        .count()
}
