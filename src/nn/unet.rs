//! The SD1.x UNet, built by walking the checkpoint's LDM keys (`model.diffusion_model.*`), so the
//! same code runs SD1.5 and smaller models of the same architecture.

use super::layers::{add_channel_bias, Conv2d, GroupNorm, Linear, MapRef, ReadAs};
use super::resnet::ResnetBlock;
use super::transformer::SpatialTransformer;
use crate::error::{Error, Result};
use crate::kernels;
use crate::kernels::scratch::Scratch;
use crate::tensor::Tensor;
use crate::weights::Weights;

/// SD1.x uses 8 attention heads at every level (head width = channels / 8).
const HEADS: usize = 8;
const GROUPS: usize = 32;
const EPS: f32 = 1e-5;

enum Layer {
    Res(Box<ResnetBlock>),
    Attn(SpatialTransformer),
    Down(Conv2d),
    Up(Conv2d),
}

/// One LDM block (`input_blocks.N`, `middle_block`, `output_blocks.N`): layers applied in order.
struct Block {
    name: String,
    layers: Vec<Layer>,
}

impl Layer {
    fn forward(&self, x: MapRef, silu_temb: &[f32], context: &[f32]) -> Tensor {
        match self {
            Layer::Res(r) => r.forward_map(x, Some(silu_temb)),
            Layer::Attn(a) => a.forward(&x.contiguous(), context),
            Layer::Down(conv) => conv.forward(&x.contiguous()),
            Layer::Up(conv) => {
                // The convolution reads its input upsampled; the 4× map is never stored.
                let read = ReadAs {
                    upsample2x: true,
                    ..ReadAs::default()
                };
                let mut y = conv.product(x, &read);
                add_channel_bias(&mut y, &conv.bias());
                y
            }
        }
    }
}

/// What a block reads: the last skip connection (input blocks, middle), or the previous output
/// and a skip, read as one concatenated map and freed once the first layer has read them.
enum BlockInput<'a> {
    Skip(&'a Tensor),
    Concat(Tensor, Tensor),
}

impl Block {
    fn forward(&self, input: BlockInput, silu_temb: &[f32], context: &[f32]) -> Tensor {
        let (first, rest) = self
            .layers
            .split_first()
            .expect("a block has layers (checked in UNet::new)");
        let x = match &input {
            BlockInput::Skip(x) => MapRef::One(x),
            BlockInput::Concat(a, b) => MapRef::Concat(a, b),
        };
        let mut out = first.forward(x, silu_temb, context);
        drop(input);
        for layer in rest {
            out = layer.forward(MapRef::One(&out), silu_temb, context);
        }
        out
    }
}

pub struct UNet {
    model_channels: usize,
    time_embed: (Linear, Linear),
    conv_in: Conv2d,
    input_blocks: Vec<Block>,
    middle_block: Block,
    output_blocks: Vec<Block>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// `w` is the UNet prefix (`model.diffusion_model`).
    pub fn new(w: &Weights) -> Result<Self> {
        let conv_in = Conv2d::from_weights(&w.pp("input_blocks.0.0"), 1, 1)?;
        let model_channels = conv_in.out_ch;
        let time_embed_0 = Linear::from_weights(&w.pp("time_embed.0"), true)?;
        if time_embed_0.in_dim != model_channels {
            return Err(Error::UnsupportedModel(format!(
                "time embedding input {} differs from model channels {}",
                time_embed_0.in_dim, model_channels
            )));
        }
        let temb_dim = time_embed_0.out_dim;
        let time_embed_2 = Linear::new(&w.pp("time_embed.2"), temb_dim, temb_dim, true)?;

        let block = |name: String| -> Result<Block> {
            let bw = w.pp(&name);
            let mut layers = Vec::new();
            let mut i = 0;
            loop {
                let lw = bw.pp(i.to_string());
                if lw.contains("in_layers.0.weight") {
                    layers.push(Layer::Res(Box::new(ResnetBlock::unet(
                        &lw, temb_dim, GROUPS, EPS,
                    )?)));
                } else if lw.contains("proj_in.weight") {
                    let channels = lw.param_any("proj_in.weight")?.shape()[0];
                    layers.push(Layer::Attn(SpatialTransformer::new(
                        &lw, channels, HEADS, GROUPS,
                    )?));
                } else if lw.contains("op.weight") {
                    layers.push(Layer::Down(Conv2d::from_weights(&lw.pp("op"), 2, 1)?));
                } else if lw.contains("conv.weight") {
                    layers.push(Layer::Up(Conv2d::from_weights(&lw.pp("conv"), 1, 1)?));
                } else {
                    break;
                }
                i += 1;
            }
            Ok(Block { name, layers })
        };
        let blocks_under = |kind: &str, first: usize| -> Result<Vec<Block>> {
            let mut out = Vec::new();
            for i in first.. {
                if !w.contains(&format!("{kind}.{i}.0.in_layers.0.weight"))
                    && !w.contains(&format!("{kind}.{i}.0.op.weight"))
                {
                    break;
                }
                out.push(block(format!("{kind}.{i}"))?);
            }
            Ok(out)
        };
        let input_blocks = blocks_under("input_blocks", 1)?;
        let output_blocks = blocks_under("output_blocks", 0)?;
        let middle_block = block("middle_block".to_string())?;
        if input_blocks.is_empty()
            || output_blocks.len() != input_blocks.len() + 1
            || middle_block.layers.is_empty()
        {
            return Err(Error::UnsupportedModel(format!(
                "UNet has {} input, {} output and {} middle layers; not an SD1.x UNet",
                input_blocks.len(),
                output_blocks.len(),
                middle_block.layers.len()
            )));
        }
        Ok(UNet {
            model_channels,
            time_embed: (time_embed_0, time_embed_2),
            conv_in,
            input_blocks,
            middle_block,
            output_blocks,
            norm_out: GroupNorm::new(&w.pp("out.0"), model_channels, GROUPS, EPS)?,
            conv_out: Conv2d::from_weights(&w.pp("out.2"), 1, 1)?,
        })
    }

    /// LDM block names in execution order ("input_blocks.1" … "middle_block" … "output_blocks.N"),
    /// the units the governor prefetches and releases weights by.
    pub fn block_names(&self) -> Vec<String> {
        let blocks = self
            .input_blocks
            .iter()
            .chain([&self.middle_block])
            .chain(&self.output_blocks);
        blocks.map(|b| b.name.clone()).collect()
    }

    /// Predicted peak of activation memory (bytes) for one call on a [batch, 4, h, w] latent:
    /// skip connections alive plus the working set of the layer being computed, with the kernels'
    /// scratch (conv patch, weight panels, attention scores, feed-forward chunk) under `scratch`
    /// on `threads` threads. Arithmetic, saturating.
    pub fn peak_activation_bytes(
        &self,
        batch: usize,
        h: usize,
        w: usize,
        scratch: &Scratch,
        threads: usize,
    ) -> u64 {
        let mut shape = MapShape {
            batch,
            c: self.model_channels,
            h,
            w,
            widest: Widest::default(),
            scratch: *scratch,
            threads,
        };
        // (bytes, channels) of every skip connection waiting for its output block.
        let mut skips: Vec<(u64, usize)> = vec![(shape.bytes(shape.c), shape.c)];
        let alive = |skips: &[(u64, usize)]| skips.iter().map(|s| s.0).sum::<u64>();
        let mut peak = 0u64;
        // Input and middle blocks read the last skip, which is already alive.
        for block in &self.input_blocks {
            peak = peak.max(shape.walk(block, alive(&skips), true));
            skips.push((shape.bytes(shape.c), shape.c));
        }
        peak = peak.max(shape.walk(&self.middle_block, alive(&skips), true));
        for block in &self.output_blocks {
            // The block reads the previous output and the skip as one concatenated map (never
            // copied, freed after the first layer): that layer's input counts both.
            let (_, skip_c) = skips.pop().unwrap_or((0, 0));
            shape.c += skip_c;
            peak = peak.max(shape.walk(block, alive(&skips), false));
        }
        let Widest {
            k_dim,
            out_w,
            keys,
            head_width,
            winograd,
        } = shape.widest;
        // Plus the Winograd path's transformed tiles and filters (as if next to the implicit
        // GEMM's, which they replace) and a small fixed allowance for the time embedding,
        // per-call vectors and rounding.
        peak.saturating_add(scratch.peak_bytes(k_dim, out_w, (keys, head_width), threads))
            .saturating_add(winograd)
            .saturating_add(8 << 20)
    }

    /// Latent channels the UNet takes (4 for SD1.x).
    pub fn in_channels(&self) -> usize {
        self.conv_in.in_ch
    }

    /// Predicts noise for `x` [n, 4, h, w] at `timesteps` [n] given `context` [n, tokens, ctx_dim].
    pub fn forward(&self, x: &Tensor, timesteps: &[f32], context: &[f32]) -> Tensor {
        self.forward_traced(x, timesteps, context, &mut |_, _| {})
    }

    /// As `forward`, reporting intermediate activations by LDM block name ("time_proj", "time_emb",
    /// "input_blocks.0", …, "middle_block", "output_blocks.N").
    pub fn forward_traced(
        &self,
        x: &Tensor,
        timesteps: &[f32],
        context: &[f32],
        trace: &mut dyn FnMut(&str, &Tensor),
    ) -> Tensor {
        let n = x.shape[0];
        assert_eq!(timesteps.len(), n, "one timestep per batch item");
        let t_proj = Tensor::new(
            vec![n, self.model_channels],
            timestep_embedding(timesteps, self.model_channels),
        );
        trace("time_proj", &t_proj);
        let mut temb = self.time_embed.0.forward(&t_proj.data);
        kernels::silu(&mut temb);
        let temb = self.time_embed.1.forward(&temb);
        trace(
            "time_emb",
            &Tensor::new(vec![n, temb.len() / n], temb.clone()),
        );
        let mut silu_temb = temb;
        kernels::silu(&mut silu_temb);

        let h = self.conv_in.forward(x);
        trace("input_blocks.0", &h);
        // Each input block's output is kept as the skip connection and read by the next block.
        let mut skips = vec![h];
        for block in &self.input_blocks {
            let last = skips.last().expect("starts with conv_in's output");
            let h = block.forward(BlockInput::Skip(last), &silu_temb, context);
            trace(&block.name, &h);
            skips.push(h);
        }
        let last = skips.last().expect("starts with conv_in's output");
        let mut h = self
            .middle_block
            .forward(BlockInput::Skip(last), &silu_temb, context);
        trace(&self.middle_block.name, &h);
        for block in &self.output_blocks {
            let skip = skips
                .pop()
                .expect("one skip per output block (checked in new)");
            h = block.forward(BlockInput::Concat(h, skip), &silu_temb, context);
            trace(&block.name, &h);
        }
        let read = ReadAs {
            norm: Some(self.norm_out.per_image(MapRef::One(&h))),
            silu: true,
            upsample2x: false,
        };
        let mut out = self.conv_out.product(MapRef::One(&h), &read);
        add_channel_bias(&mut out, &self.conv_out.bias());
        out
    }
}

/// Sinusoidal timestep embedding, cos half first (diffusers `flip_sin_to_cos=True`, shift 0),
/// in f32 arithmetic as torch computes it so large timesteps round the same way.
pub fn timestep_embedding(timesteps: &[f32], dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let neg_log_period = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|i| (neg_log_period * i as f32 / half as f32).exp())
        .collect();
    let mut out = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        out.extend(freqs.iter().map(|&f| (t * f).cos()));
        out.extend(freqs.iter().map(|&f| (t * f).sin()));
    }
    out
}

/// A 3×3, stride-1, size-keeping convolution (the ResNet and upsampler convs).
const K3: kernels::Conv2dGeometry = kernels::Conv2dGeometry {
    kernel: 3,
    stride: 1,
    pad: 1,
};

/// The activation shape the memory model walks through the blocks.
struct MapShape {
    batch: usize,
    c: usize,
    h: usize,
    w: usize,
    widest: Widest,
    scratch: Scratch,
    threads: usize,
}

/// The largest kernel operands seen on the walk, which bound the kernels' scratch floors.
#[derive(Default)]
struct Widest {
    /// in_ch · 3 · 3 of the widest convolution
    k_dim: usize,
    /// the widest convolution output row
    out_w: usize,
    /// the longest attention key sequence
    keys: usize,
    /// the widest attention head
    head_width: usize,
    /// the largest Winograd scratch of a 3×3 convolution (`kernels::winograd_scratch_bytes`)
    winograd: u64,
}

impl MapShape {
    fn bytes(&self, c: usize) -> u64 {
        (self.batch as u64)
            .saturating_mul(c as u64)
            .saturating_mul((self.h * self.w) as u64)
            .saturating_mul(4)
    }

    /// Records a 3×3 convolution `ci` → `co` on the current map in `widest`: its im2col row, its
    /// output row and its Winograd scratch.
    fn see_conv3x3(&mut self, ci: usize, co: usize) {
        let dims = (self.batch, ci, self.h, self.w);
        let winograd = kernels::winograd_scratch_bytes(dims, co, K3, &self.scratch, self.threads);
        let widest = &mut self.widest;
        widest.k_dim = widest.k_dim.max(9 * ci);
        widest.out_w = widest.out_w.max(self.w);
        widest.winograd = widest.winograd.max(winograd);
    }

    /// Peak of one block given the bytes already alive (`input_alive`: they include the block's
    /// input); advances the shape through it.
    fn walk(&mut self, block: &Block, alive: u64, input_alive: bool) -> u64 {
        let mut peak = 0u64;
        for (i, layer) in block.layers.iter().enumerate() {
            let counted = if i == 0 && input_alive {
                self.bytes(self.c)
            } else {
                0
            };
            let working = match layer {
                // input, conv1 out, conv2 out, then the skip projection in conv1's place (the
                // GroupNorms are applied while the convolutions read)
                Layer::Res(r) => self.bytes(r.in_ch) + 2 * self.bytes(r.out_ch),
                // the block's input map, the token residual stream, its normalised copy, q, k, v,
                // the heads' output (the flash kernel keeps no per-head copies or scores) and the
                // output projection's product: 8 maps of the channel width
                Layer::Attn(a) => 8 * self.bytes(a.channels),
                Layer::Down(_) => self.bytes(self.c) + self.bytes(self.c) / 4,
                // input and output; the convolution reads the input upsampled
                Layer::Up(_) => self.bytes(self.c) * 5,
            };
            peak = peak.max(alive.saturating_add(working.saturating_sub(counted)));
            self.widest.out_w = self.widest.out_w.max(self.w);
            match layer {
                Layer::Res(r) => {
                    self.see_conv3x3(r.in_ch, r.out_ch);
                    self.see_conv3x3(r.out_ch, r.out_ch);
                    self.c = r.out_ch;
                }
                Layer::Attn(a) => {
                    let widest = &mut self.widest;
                    widest.keys = widest.keys.max(self.h * self.w);
                    widest.head_width = widest.head_width.max(a.channels / HEADS);
                }
                Layer::Down(_) => (self.h, self.w) = (self.h.div_ceil(2), self.w.div_ceil(2)),
                Layer::Up(_) => {
                    (self.h, self.w) = (self.h * 2, self.w * 2);
                    self.see_conv3x3(self.c, self.c);
                }
            }
        }
        peak
    }
}
