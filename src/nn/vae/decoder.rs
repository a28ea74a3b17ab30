//! The VAE decoder: latent → image, streamed over banded feature maps (see `blocks`).

use super::bands::{BandLayout, BandedMap};
use super::blocks::{
    conv_map, conv_map_peak, norm_silu, stream, stream_peak, Conv, Norm, Resnet, UPSAMPLE,
};
use super::{banded_attention, count_levels, AttnBlock, VaePlan};
use crate::error::{Error, Result};
use crate::kernels::{group_norm_stats_bytes, InputTransform};
use crate::tensor::Tensor;
use crate::weights::Weights;

/// Allowance for what a decode holds besides maps and scratch: GroupNorm scale and shift,
/// bookkeeping, and malloc's partly used pages (measured: RssAnon runs 5–10 MiB above the counted
/// buffers at 512²).
pub(super) const SMALL_BYTES: u64 = 8 << 20;
/// Per compute thread: gemm's thread-local cache slab (the L2 size, 1 MiB here) and the gather's
/// line buffers.
pub(super) const PER_THREAD_BYTES: u64 = 2 << 20;

/// One resolution level: resnets, then an optional nearest 2× upsample + conv.
struct Level {
    blocks: Vec<Resnet>,
    upsample: Option<Conv>,
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
        let upsample = if w.contains("upsample.conv.weight") {
            Some(Conv::new(&w.pp("upsample.conv"), 3)?)
        } else {
            None
        };
        Ok(Level { blocks, upsample })
    }
}

pub struct Decoder {
    post_quant_conv: Conv,
    conv_in: Conv,
    mid_block_1: Resnet,
    mid_attn_1: AttnBlock,
    mid_block_2: Resnet,
    /// Levels in execution order (LDM `up.{L-1}` first).
    up: Vec<Level>,
    norm_out: Norm,
    conv_out: Conv,
}

impl Decoder {
    /// `w` is the VAE prefix (`first_stage_model`).
    pub fn new(w: &Weights) -> Result<Self> {
        let d = w.pp("decoder");
        let conv_in = Conv::new(&d.pp("conv_in"), 3)?;
        let up = (0..count_levels(&d, "up"))
            .rev()
            .map(|i| Level::new(&d.pp(format!("up.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let last_ch = up
            .last()
            .and_then(|l| l.blocks.last())
            .map(|b| b.out_ch)
            .unwrap_or(conv_in.out_ch);
        let mid = d.pp("mid");
        Ok(Decoder {
            post_quant_conv: Conv::new(&w.pp("post_quant_conv"), 1)?,
            mid_block_1: Resnet::new(&mid.pp("block_1"))?,
            mid_attn_1: AttnBlock::new(&mid.pp("attn_1"), conv_in.out_ch)?,
            mid_block_2: Resnet::new(&mid.pp("block_2"))?,
            conv_in,
            up,
            norm_out: Norm::new(&d.pp("norm_out"), last_ch)?,
            conv_out: Conv::new(&d.pp("conv_out"), 3)?,
        })
    }

    /// Channels of the latent it decodes (4 for SD).
    pub fn latent_channels(&self) -> usize {
        self.post_quant_conv.in_ch
    }

    /// Image pixels per latent pixel along each side (8 for SD).
    pub fn upscale(&self) -> usize {
        1 << self.up.iter().filter(|l| l.upsample.is_some()).count()
    }

    /// `z` is the unscaled latent (sampler latent / the family's `vae_scaling_factor`) → image roughly in [-1, 1],
    /// with the default plan (8-row bands, the first scratch tier).
    pub fn forward(&self, z: &Tensor) -> Tensor {
        self.forward_planned(z, &VaePlan::default())
    }

    /// As `forward`, holding feature maps as `plan` says. Every plan gives the same bits: the
    /// banding decides only when rows are allocated and freed, never how a value is computed (nor
    /// does the plan's scratch tier: `kernels::scratch`). Images of a batch are decoded one after
    /// another.
    pub fn forward_planned(&self, z: &Tensor, plan: &VaePlan) -> Tensor {
        let (n, c, h, w) = z.nchw();
        assert_eq!(c, self.post_quant_conv.in_ch, "latent channels");
        let (oc, oh, ow) = (self.conv_out.out_ch, h * self.upscale(), w * self.upscale());
        let mut image = Tensor::zeros(vec![n, oc, oh, ow]);
        for (latent, out) in z
            .data
            .chunks(c * h * w)
            .zip(image.data.chunks_mut(oc * oh * ow))
        {
            let z = BandedMap::from_planes(latent, BandLayout::new(c, h, w, plan.band_rows));
            self.decode_one(z, plan, out);
        }
        image
    }

    fn decode_one(&self, z: BandedMap, plan: &VaePlan, image: &mut [f32]) {
        let plain = InputTransform::default();
        let x = conv_map(&self.post_quant_conv, z, plain, plan);
        let x = conv_map(&self.conv_in, x, plain, plan);
        let x = self.mid_block_1.forward(x, plan);
        let x = banded_attention(&self.mid_attn_1, x, plan);
        let mut x = self.mid_block_2.forward(x, plan);
        for level in &self.up {
            for block in &level.blocks {
                x = block.forward(x, plan);
            }
            if let Some(conv) = &level.upsample {
                x = conv_map(conv, x, UPSAMPLE, plan);
            }
        }
        let norm = self.norm_out.affine(&x);
        let BandLayout { h, w, .. } = x.layout();
        stream(
            &mut x,
            &[(&self.conv_out, norm_silu(&norm))],
            true,
            &plan.scratch,
            |_, r0, tile| {
                let rows = tile.len() / (self.conv_out.out_ch * w);
                for (ch, src) in tile.chunks(rows * w).enumerate() {
                    image[(ch * h + r0) * w..(ch * h + r0 + rows) * w].copy_from_slice(src);
                }
            },
        );
    }

    /// Predicted peak of anonymous memory (bytes) that `forward_planned` allocates to decode one
    /// `latent_h × latent_w` latent with `plan` (each further image of a batch adds only its
    /// output, 4 bytes × 3 × H × W), on the current rayon pool. It follows the decode's schedule
    /// op by op: the banded maps alive at each tile, plus each pass's filters, patches, tile buffer
    /// and an upper bound on GEMM's packed operands, plus the output image and fixed and
    /// per-thread allowances. Weights are not counted: they stay in the mapping (reclaimable page
    /// cache), read a panel at a time into the counted filter buffers. Saturating arithmetic: an
    /// absurd size gives `u64::MAX`, never a wrapped small number.
    pub fn peak_bytes(&self, latent_h: usize, latent_w: usize, plan: &VaePlan) -> u64 {
        let band = plan.band_rows;
        let threads = rayon::current_num_threads();
        let (oh, ow) = (
            latent_h.saturating_mul(self.upscale()),
            latent_w.saturating_mul(self.upscale()),
        );
        // Past a million pixels a side nothing fits any machine: say so without simulating it.
        if oh > 1 << 20 || ow > 1 << 20 {
            return u64::MAX;
        }
        let image = (self.conv_out.out_ch as u64)
            .saturating_mul(oh as u64)
            .saturating_mul(ow as u64)
            .saturating_mul(4);
        let layout = |c: usize, h: usize, w: usize| BandLayout::new(c, h, w, band);
        let mut x = layout(self.post_quant_conv.in_ch, latent_h, latent_w);
        let mut peak = x.total_bytes();
        for conv in [&self.post_quant_conv, &self.conv_in] {
            peak = peak.max(conv_map_peak(conv, x, 1, plan));
            x = layout(conv.out_ch, x.h, x.w);
        }
        peak = peak.max(self.mid_block_1.peak(x, plan));
        let map = x.total_bytes();
        let attention = AttnBlock::peak_bytes(x.c, x.h, x.w, &plan.scratch, threads);
        peak = peak.max(map.saturating_mul(2)).max(attention);
        peak = peak.max(self.mid_block_2.peak(x, plan));
        for level in &self.up {
            for block in &level.blocks {
                peak = peak.max(block.peak(x, plan));
                x = layout(block.out_ch, x.h, x.w);
            }
            if let Some(conv) = &level.upsample {
                peak = peak.max(conv_map_peak(conv, x, 2, plan));
                x = layout(conv.out_ch, x.h.saturating_mul(2), x.w.saturating_mul(2));
            }
        }
        let stats = x
            .total_bytes()
            .saturating_add(group_norm_stats_bytes(x.c, x.h));
        let out = stream_peak(x, 1, &[&self.conv_out], true, &[], &plan.scratch);
        peak = peak.max(stats).max(out);
        peak.saturating_add(image)
            .saturating_add(SMALL_BYTES)
            .saturating_add(PER_THREAD_BYTES.saturating_mul(threads as u64))
    }
}
