//! The VAE encoder: image → diagonal Gaussian over latents (whole-map, for img2img).

use super::super::layers::{Conv2d, GroupNorm};
use super::super::resnet::ResnetBlock;
use super::{count_levels, AttnBlock, EPS, GROUPS};
use crate::error::{Error, Result};
use crate::nn::Ctx;
use crate::tensor::Tensor;
use crate::weights::Weights;

/// The encoder's diagonal Gaussian over latents.
pub struct LatentDistribution {
    pub mean: Tensor,
    pub logvar: Tensor,
}

/// One resolution level: resnets, then an optional stride-2 downsampling conv.
struct Level {
    blocks: Vec<ResnetBlock>,
    downsample: Option<Conv2d>,
}

impl Level {
    fn new(w: &Weights) -> Result<Self> {
        let mut blocks = Vec::new();
        while w.contains(&format!("block.{}.conv1.weight", blocks.len())) {
            let name = format!("block.{}", blocks.len());
            blocks.push(ResnetBlock::vae(&w.pp(name), GROUPS, EPS)?);
        }
        if blocks.is_empty() {
            return Err(Error::MissingTensor(format!(
                "{}.block.0.conv1.weight",
                w.prefix()
            )));
        }
        // Downsampling pads asymmetrically itself (see `Encoder::forward`), so pad 0 here.
        let downsample = if w.contains("downsample.conv.weight") {
            Some(Conv2d::from_weights(&w.pp("downsample.conv"), 2, 0)?)
        } else {
            None
        };
        Ok(Level { blocks, downsample })
    }
}

/// resnet, attention, resnet.
struct Mid {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
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
        let down = (0..count_levels(&e, "down"))
            .map(|i| Level::new(&e.pp(format!("down.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let conv_in = Conv2d::from_weights(&e.pp("conv_in"), 1, 1)?;
        let last_ch = down
            .last()
            .and_then(|l| l.blocks.last())
            .map(|b| b.out_ch)
            .unwrap_or(conv_in.out_ch);
        let m = e.pp("mid");
        Ok(Encoder {
            conv_in,
            down,
            mid: Mid {
                block_1: ResnetBlock::vae(&m.pp("block_1"), GROUPS, EPS)?,
                attn_1: AttnBlock::new(&m.pp("attn_1"), last_ch)?,
                block_2: ResnetBlock::vae(&m.pp("block_2"), GROUPS, EPS)?,
            },
            norm_out: GroupNorm::new(&e.pp("norm_out"), last_ch, GROUPS, EPS)?,
            conv_out: Conv2d::from_weights(&e.pp("conv_out"), 1, 1)?,
            quant_conv: Conv2d::from_weights(&w.pp("quant_conv"), 1, 0)?,
        })
    }

    /// `image` [n, 3, H, W] in [-1, 1] → latent distribution (unscaled), with kernels within the
    /// budgets of `scratch`.
    pub fn forward(&self, image: &Tensor, cx: &Ctx) -> LatentDistribution {
        let mut h = self.conv_in.forward(image, cx);
        for level in &self.down {
            for block in &level.blocks {
                h = block.forward(&h, None, cx);
            }
            if let Some(conv) = &level.downsample {
                h = conv.forward(&pad_bottom_right(&h), cx);
            }
        }
        let h = self.mid.block_1.forward(&h, None, cx);
        let h = self.mid.attn_1.forward(&h, cx);
        let mut h = self.mid.block_2.forward(&h, None, cx);
        self.norm_out.forward(&mut h, true);
        let h = self.conv_out.forward(&h, cx);
        let moments = self.quant_conv.forward(&h, cx);
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
