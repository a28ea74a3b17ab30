//! The SD1.x VAE (LDM `first_stage_model.*`): decoder latent → image, encoder image → latent.

use super::layers::{
    add_assign, from_tokens, to_tokens, upsample_nearest2x, Conv2d, GroupNorm, Linear,
};
use super::resnet::ResnetBlock;
use crate::error::{Error, Result};
use crate::kernels::{self, AttentionShape};
use crate::tensor::Tensor;
use crate::weights::Weights;

const GROUPS: usize = 32;
/// The LDM VAE normalises with eps 1e-6 (unlike the UNet's 1e-5).
const EPS: f32 = 1e-6;
/// SD1.x latent scaling factor.
pub const SCALING_FACTOR: f32 = 0.18215;

/// Single-head self-attention over all pixels (the VAE's mid block), with residual.
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

    fn forward(&self, x: &Tensor) -> Tensor {
        let (n, c, h, w) = x.nchw();
        let mut normed = x.clone();
        self.norm.forward(&mut normed, false);
        let tokens = to_tokens(&normed);
        let (q, k, v) = (
            self.q.forward(&tokens),
            self.k.forward(&tokens),
            self.v.forward(&tokens),
        );
        let attended = kernels::attention(
            &q,
            &k,
            &v,
            AttentionShape {
                batch: n,
                q_len: h * w,
                kv_len: h * w,
                channels: c,
                heads: 1,
                causal: false,
            },
        );
        let mut out = from_tokens(&self.proj_out.forward(&attended), n, c, h, w);
        add_assign(&mut out.data, &x.data);
        out
    }
}

/// The middle of both halves: resnet, attention, resnet.
struct Mid {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl Mid {
    fn new(w: &Weights, ch: usize) -> Result<Self> {
        Ok(Mid {
            block_1: ResnetBlock::vae(&w.pp("block_1"), GROUPS, EPS)?,
            attn_1: AttnBlock::new(&w.pp("attn_1"), ch)?,
            block_2: ResnetBlock::vae(&w.pp("block_2"), GROUPS, EPS)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.block_1.forward(x, None);
        let h = self.attn_1.forward(&h);
        self.block_2.forward(&h, None)
    }
}

/// One resolution level: resnets, then an optional resampling conv.
struct Level {
    blocks: Vec<ResnetBlock>,
    resample: Option<Conv2d>,
}

fn level(w: &Weights, resample_name: &str, stride: usize) -> Result<Level> {
    let mut blocks = Vec::new();
    while w.contains(&format!("block.{}.conv1.weight", blocks.len())) {
        blocks.push(ResnetBlock::vae(
            &w.pp(format!("block.{}", blocks.len())),
            GROUPS,
            EPS,
        )?);
    }
    if blocks.is_empty() {
        return Err(Error::MissingTensor(format!(
            "{}.block.0.conv1.weight",
            w.prefix()
        )));
    }
    let conv_name = format!("{resample_name}.conv");
    let resample = if w.contains(&format!("{conv_name}.weight")) {
        // Downsampling pads asymmetrically itself (see `Encoder::forward`), so pad 0 here.
        let pad = if stride == 2 { 0 } else { 1 };
        Some(Conv2d::from_weights(&w.pp(conv_name), stride, pad)?)
    } else {
        None
    };
    Ok(Level { blocks, resample })
}

fn count_levels(w: &Weights, kind: &str) -> usize {
    (0..)
        .take_while(|i| w.contains(&format!("{kind}.{i}.block.0.conv1.weight")))
        .count()
}

pub struct Decoder {
    post_quant_conv: Conv2d,
    conv_in: Conv2d,
    mid: Mid,
    /// Levels in execution order (LDM `up.{L-1}` first).
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// `w` is the VAE prefix (`first_stage_model`).
    pub fn new(w: &Weights) -> Result<Self> {
        let d = w.pp("decoder");
        let conv_in = Conv2d::from_weights(&d.pp("conv_in"), 1, 1)?;
        let levels = count_levels(&d, "up");
        let up = (0..levels)
            .rev()
            .map(|i| level(&d.pp(format!("up.{i}")), "upsample", 1))
            .collect::<Result<Vec<_>>>()?;
        let last_ch = up
            .last()
            .and_then(|l| l.blocks.last())
            .map(|b| b.out_ch)
            .unwrap_or(conv_in.out_ch);
        Ok(Decoder {
            post_quant_conv: Conv2d::from_weights(&w.pp("post_quant_conv"), 1, 0)?,
            mid: Mid::new(&d.pp("mid"), conv_in.out_ch)?,
            conv_in,
            up,
            norm_out: GroupNorm::new(&d.pp("norm_out"), last_ch, GROUPS, EPS)?,
            conv_out: Conv2d::from_weights(&d.pp("conv_out"), 1, 1)?,
        })
    }

    /// Channels of the last (full-resolution) level.
    pub fn last_channels(&self) -> usize {
        self.conv_out.in_ch
    }

    /// `z` is the unscaled latent (sampler latent / `SCALING_FACTOR`) → image roughly in [-1, 1].
    pub fn forward(&self, z: &Tensor) -> Tensor {
        let z = self.post_quant_conv.forward(z);
        let mut h = self.mid.forward(&self.conv_in.forward(&z));
        for level in &self.up {
            for block in &level.blocks {
                h = block.forward(&h, None);
            }
            if let Some(conv) = &level.resample {
                h = conv.forward(&upsample_nearest2x(&h));
            }
        }
        self.norm_out.forward(&mut h, true);
        self.conv_out.forward(&h)
    }
}

/// The encoder's diagonal Gaussian over latents.
pub struct LatentDistribution {
    pub mean: Tensor,
    pub logvar: Tensor,
}

pub struct Encoder {
    conv_in: Conv2d,
    down: Vec<Level>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Conv2d,
}

impl Encoder {
    pub fn new(w: &Weights) -> Result<Self> {
        let e = w.pp("encoder");
        let levels = count_levels(&e, "down");
        let down = (0..levels)
            .map(|i| level(&e.pp(format!("down.{i}")), "downsample", 2))
            .collect::<Result<Vec<_>>>()?;
        let conv_in = Conv2d::from_weights(&e.pp("conv_in"), 1, 1)?;
        let last_ch = down
            .last()
            .and_then(|l| l.blocks.last())
            .map(|b| b.out_ch)
            .unwrap_or(conv_in.out_ch);
        Ok(Encoder {
            conv_in,
            down,
            mid: Mid::new(&e.pp("mid"), last_ch)?,
            norm_out: GroupNorm::new(&e.pp("norm_out"), last_ch, GROUPS, EPS)?,
            conv_out: Conv2d::from_weights(&e.pp("conv_out"), 1, 1)?,
            quant_conv: Conv2d::from_weights(&w.pp("quant_conv"), 1, 0)?,
        })
    }

    /// `image` [n, 3, H, W] in [-1, 1] → latent distribution (unscaled).
    pub fn forward(&self, image: &Tensor) -> LatentDistribution {
        let mut h = self.conv_in.forward(image);
        for level in &self.down {
            for block in &level.blocks {
                h = block.forward(&h, None);
            }
            if let Some(conv) = &level.resample {
                h = conv.forward(&pad_bottom_right(&h));
            }
        }
        let mut h = self.mid.forward(&h);
        self.norm_out.forward(&mut h, true);
        let moments = self.quant_conv.forward(&self.conv_out.forward(&h));
        let (n, c2, hh, ww) = moments.nchw();
        let c = c2 / 2;
        let (mut mean, mut logvar) = (Vec::new(), Vec::new());
        for b in moments.data.chunks(c2 * hh * ww) {
            mean.extend_from_slice(&b[..c * hh * ww]);
            logvar.extend(b[c * hh * ww..].iter().map(|v| v.clamp(-30.0, 20.0)));
        }
        LatentDistribution {
            mean: Tensor::new(vec![n, c, hh, ww], mean),
            logvar: Tensor::new(vec![n, c, hh, ww], logvar),
        }
    }
}

/// Zero-pads one row at the bottom and one column at the right (LDM's asymmetric downsampling).
fn pad_bottom_right(x: &Tensor) -> Tensor {
    let (n, c, h, w) = x.nchw();
    let mut out = Tensor::zeros(vec![n, c, h + 1, w + 1]);
    for (src, dst) in x
        .data
        .chunks(h * w)
        .zip(out.data.chunks_mut((h + 1) * (w + 1)))
    {
        for y in 0..h {
            dst[y * (w + 1)..y * (w + 1) + w].copy_from_slice(&src[y * w..(y + 1) * w]);
        }
    }
    out
}
