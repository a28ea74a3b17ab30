//! The VAE encoder: image → diagonal Gaussian over latents, streamed over banded feature maps like
//! the decoder (see `blocks`), so a plan's band height bounds its memory and never its bits.

use super::bands::{BandLayout, BandedMap};
use super::blocks::{
    conv_map, conv_map_peak, downsample_map, downsample_map_peak, norm_silu, stream, stream_peak,
    Conv, Norm, Resnet,
};
use super::decoder::{PER_THREAD_BYTES, SMALL_BYTES};
use super::{banded_attention, count_levels, AttnBlock, VaePlan};
use crate::error::{Error, Result};
use crate::kernels::{group_norm_stats_bytes, InputTransform};
use crate::nn::Ctx;
use crate::tensor::Tensor;
use crate::weights::Weights;

/// The encoder's diagonal Gaussian over latents (unscaled: multiply a sample by the family's
/// `vae_scaling_factor` for the UNet).
pub struct LatentDistribution {
    pub mean: Tensor,
    /// Clamped to [-30, 20], as diffusers' `DiagonalGaussianDistribution`.
    pub logvar: Tensor,
}

impl LatentDistribution {
    /// `exp(0.5 · logvar)` in f32, as diffusers' `std`.
    pub fn std(&self) -> Tensor {
        let data = self.logvar.data.iter().map(|v| (0.5 * v).exp()).collect();
        Tensor::new(self.logvar.shape.clone(), data)
    }

    /// `mean + std · noise` (diffusers' `sample` with `noise` drawn by the caller's generator,
    /// shaped like the mean).
    pub fn sample(&self, noise: &Tensor) -> Tensor {
        assert_eq!(noise.shape, self.mean.shape, "noise shape");
        let std = self.std();
        let data = (self.mean.data.iter().zip(&std.data).zip(&noise.data))
            .map(|((m, s), n)| m + s * n)
            .collect();
        Tensor::new(self.mean.shape.clone(), data)
    }
}

/// One resolution level: resnets, then an optional stride-2 downsampling conv.
struct Level {
    blocks: Vec<Resnet>,
    downsample: Option<Conv>,
}

impl Level {
    fn new(w: &Weights) -> Result<Self> {
        let mut blocks = Vec::new();
        while w.contains(&format!("block.{}.conv1.weight", blocks.len())) {
            blocks.push(Resnet::new(&w.pp(format!("block.{}", blocks.len())))?);
        }
        if blocks.is_empty() {
            return Err(Error::MissingTensor(format!(
                "{}.block.0.conv1.weight",
                w.prefix()
            )));
        }
        let downsample = if w.contains("downsample.conv.weight") {
            Some(Conv::downsample(&w.pp("downsample.conv"))?)
        } else {
            None
        };
        Ok(Level { blocks, downsample })
    }
}

pub struct Encoder {
    conv_in: Conv,
    down: Vec<Level>,
    mid_block_1: Resnet,
    mid_attn_1: AttnBlock,
    mid_block_2: Resnet,
    norm_out: Norm,
    conv_out: Conv,
    quant_conv: Conv,
}

impl Encoder {
    /// `w` is the VAE prefix (`first_stage_model`).
    pub fn new(w: &Weights) -> Result<Self> {
        let e = w.pp("encoder");
        let down = (0..count_levels(&e, "down"))
            .map(|i| Level::new(&e.pp(format!("down.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let conv_in = Conv::new(&e.pp("conv_in"), 3)?;
        let last_ch = down
            .last()
            .and_then(|l| l.blocks.last())
            .map(|b| b.out_ch)
            .unwrap_or(conv_in.out_ch);
        let m = e.pp("mid");
        Ok(Encoder {
            conv_in,
            down,
            mid_block_1: Resnet::new(&m.pp("block_1"))?,
            mid_attn_1: AttnBlock::new(&m.pp("attn_1"), last_ch)?,
            mid_block_2: Resnet::new(&m.pp("block_2"))?,
            norm_out: Norm::new(&e.pp("norm_out"), last_ch)?,
            conv_out: Conv::new(&e.pp("conv_out"), 3)?,
            quant_conv: Conv::new(&w.pp("quant_conv"), 1)?,
        })
    }

    /// Image pixels per latent pixel along each side (8 for SD).
    pub fn downscale(&self) -> usize {
        1 << self.down.iter().filter(|l| l.downsample.is_some()).count()
    }

    /// `image` [n, 3, H, W] in [-1, 1] → latent distribution (unscaled), with the default bands
    /// and the kernels' scratch tier of `cx`.
    pub fn forward(&self, image: &Tensor, cx: &Ctx) -> LatentDistribution {
        let plan = VaePlan {
            scratch: cx.scratch,
            ..VaePlan::default()
        };
        self.forward_planned(image, &plan)
    }

    /// As `forward`, holding feature maps as `plan` says. Every plan gives the same bits (the
    /// banding decides only when rows are allocated and freed). Images of a batch are encoded one
    /// after another.
    pub fn forward_planned(&self, image: &Tensor, plan: &VaePlan) -> LatentDistribution {
        let (n, c, h, w) = image.nchw();
        assert_eq!(c, self.conv_in.in_ch, "image channels");
        let (mean, logvar): (Vec<_>, Vec<_>) = image
            .data
            .chunks(c * h * w)
            .map(|one| {
                let x = BandedMap::from_planes(one, BandLayout::new(c, h, w, plan.band_rows));
                self.encode_one(x, plan)
            })
            .unzip();
        let lc = self.quant_conv.out_ch / 2;
        let (lh, lw) = self.latent_size(h, w);
        LatentDistribution {
            mean: Tensor::new(vec![n, lc, lh, lw], mean.concat()),
            logvar: Tensor::new(vec![n, lc, lh, lw], logvar.concat()),
        }
    }

    /// The latent size of an `h × w` image: each downsampler takes (side + 1 − 3) / 2 + 1 (its
    /// padding is one row and one column at the end).
    pub fn latent_size(&self, h: usize, w: usize) -> (usize, usize) {
        self.down
            .iter()
            .filter(|l| l.downsample.is_some())
            .fold((h, w), |(h, w), _| {
                ((h.max(2) - 2) / 2 + 1, (w.max(2) - 2) / 2 + 1)
            })
    }

    /// One image's mean and (clamped) log-variance, planes [c, h, w] each.
    fn encode_one(&self, x: BandedMap, plan: &VaePlan) -> (Vec<f32>, Vec<f32>) {
        let plain = InputTransform::default();
        let mut x = conv_map(&self.conv_in, x, plain, plan);
        for level in &self.down {
            for block in &level.blocks {
                x = block.forward(x, plan);
            }
            if let Some(conv) = &level.downsample {
                x = downsample_map(conv, x, plan);
            }
        }
        let x = self.mid_block_1.forward(x, plan);
        let x = banded_attention(&self.mid_attn_1, x, plan);
        let mut x = self.mid_block_2.forward(x, plan);
        let norm = self.norm_out.affine(&x);
        let layout = x.layout();
        let out = BandLayout::new(self.conv_out.out_ch, layout.h, layout.w, plan.band_rows);
        let mut h = BandedMap::empty(out);
        stream(
            &mut x,
            &[(&self.conv_out, norm_silu(&norm))],
            true,
            &plan.scratch,
            |_, r0, tile| h.write_rows(r0, tile),
        );
        drop(x);
        let moments = conv_map(&self.quant_conv, h, plain, plan).to_planes();
        let half = moments.len() / 2;
        let logvar = moments[half..]
            .iter()
            .map(|v| v.clamp(-30.0, 20.0))
            .collect();
        (moments[..half].to_vec(), logvar)
    }

    /// Predicted peak of anonymous memory (bytes) that `forward_planned` allocates to encode one
    /// `h × w` image with `plan` (the caller's image tensor not included; each further image of a
    /// batch adds only its latent distribution), on the current rayon pool: the schedule op by op
    /// as `Decoder::peak_bytes` follows the decoder's. Saturating: an absurd size gives `u64::MAX`.
    pub fn peak_bytes(&self, h: usize, w: usize, plan: &VaePlan) -> u64 {
        if h > 1 << 20 || w > 1 << 20 {
            return u64::MAX;
        }
        let threads = rayon::current_num_threads();
        let layout = |c: usize, h: usize, w: usize| BandLayout::new(c, h, w, plan.band_rows);
        let mut x = layout(self.conv_in.in_ch, h, w);
        let mut peak = x.total_bytes();
        peak = peak.max(conv_map_peak(&self.conv_in, x, 1, plan));
        x = layout(self.conv_in.out_ch, h, w);
        for level in &self.down {
            for block in &level.blocks {
                peak = peak.max(block.peak(x, plan));
                x = layout(block.out_ch, x.h, x.w);
            }
            if let Some(conv) = &level.downsample {
                peak = peak.max(downsample_map_peak(conv, x, plan));
                let (oh, ow) = ((x.h.max(2) - 2) / 2 + 1, (x.w.max(2) - 2) / 2 + 1);
                x = layout(conv.out_ch, oh, ow);
            }
        }
        peak = peak.max(self.mid_block_1.peak(x, plan));
        let attention = AttnBlock::peak_bytes(x.c, x.h, x.w, &plan.scratch, threads);
        peak = peak.max(x.total_bytes().saturating_mul(2)).max(attention);
        peak = peak.max(self.mid_block_2.peak(x, plan));
        let stats = x
            .total_bytes()
            .saturating_add(group_norm_stats_bytes(x.c, x.h));
        let moments = layout(self.conv_out.out_ch, x.h, x.w);
        let out = stream_peak(x, 1, &[&self.conv_out], true, &[moments], &plan.scratch);
        let quant = conv_map_peak(&self.quant_conv, moments, 1, plan);
        // The moments as planes, then the mean and log-variance copied out of them.
        let result = moments.total_bytes().saturating_mul(2);
        peak = peak.max(stats).max(out).max(quant).max(result);
        peak.saturating_add(SMALL_BYTES)
            .saturating_add(PER_THREAD_BYTES.saturating_mul(threads as u64))
    }
}
