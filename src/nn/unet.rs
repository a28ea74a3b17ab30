//! The LDM UNet of SD1.x, SD2.x and SDXL, built by walking the checkpoint's keys
//! (`model.diffusion_model.*`), so the same code runs every family and smaller models of the same
//! architectures: levels, ResBlocks, where the transformers are and how deep, linear or 1×1-conv
//! projections and SDXL's added conditioning (`label_emb`) all come from the file. The one fact
//! not in the file, how many attention heads a width has, is the caller's (`HeadsRule`).

use super::layers::{add_channel_bias, Conv2d, GroupNorm, Linear, MapRef, ReadAs};
use super::resnet::ResnetBlock;
use super::transformer::SpatialTransformer;
use crate::error::{Error, Result};
use crate::kernels;
use crate::kernels::scratch::Scratch;
use crate::kernels::Resize;
use crate::nn::Ctx;
use crate::tensor::Tensor;
use crate::weights::Weights;

/// How many attention heads a transformer of a given width has: not in the checkpoint, a fact of
/// the family. SD1.x: 8 heads at every level (`Fixed(8)`); SD2.x and SDXL: 64-wide heads
/// (`Width(64)`, heads = channels / 64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadsRule {
    Fixed(usize),
    Width(usize),
}

impl HeadsRule {
    /// Heads of a transformer `channels` wide; an error when the rule does not divide the width.
    pub fn heads(self, channels: usize) -> Result<usize> {
        let heads = match self {
            HeadsRule::Fixed(heads) => heads,
            HeadsRule::Width(width) if width > 0 => channels / width,
            HeadsRule::Width(_) => 0,
        };
        if heads == 0 || !channels.is_multiple_of(heads) {
            return Err(Error::UnsupportedModel(format!(
                "a UNet transformer {channels} channels wide cannot have attention heads {self:?}"
            )));
        }
        Ok(heads)
    }
}

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

/// Receives activations by name.
type Trace<'a> = &'a mut dyn FnMut(&str, &Tensor);

/// What every layer of one UNet call reads besides its input.
struct Call<'a> {
    /// SiLU of the time embedding (plus SDXL's added embedding), [n, temb_dim].
    silu_temb: &'a [f32],
    /// The text context, [n, tokens, context_dim].
    context: &'a [f32],
    /// The kernels' budgets for this call.
    cx: &'a Ctx,
}

impl Layer {
    /// `up_to`: the size an upsampler resizes to (the skip its output meets).
    fn forward(&self, x: MapRef, call: &Call, up_to: (usize, usize)) -> Tensor {
        match self {
            Layer::Res(r) => r.forward_map(x, Some(call.silu_temb), call.cx),
            Layer::Attn(a) => a.forward(&x.contiguous(), call.context, call.cx),
            Layer::Down(conv) => conv.forward(&x.contiguous(), call.cx),
            Layer::Up(conv) => {
                // The convolution reads its input resized (nearest, 2× unless the skip it meets
                // is odd, as diffusers' `forward_upsample_size`); the larger map is never stored.
                let (_, _, h, w) = x.nchw();
                let resize = if up_to == (2 * h, 2 * w) {
                    Resize::Twice
                } else {
                    Resize::To(up_to.0, up_to.1)
                };
                let read = ReadAs {
                    resize,
                    ..ReadAs::default()
                };
                let mut y = conv.product(x, &read, call.cx);
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
    /// `up_to`: the size of the skip the next output block reads (for an upsampler); `layers`
    /// gets each transformer's output as "{block}.{layer}".
    fn forward(
        &self,
        input: BlockInput,
        call: &Call,
        up_to: (usize, usize),
        mut layers: Option<Trace>,
    ) -> Tensor {
        let mut traced = |i: usize, out: &Tensor| {
            if let Some(trace) = layers.as_mut() {
                trace(&format!("{}.{i}", self.name), out);
            }
        };
        let (first, rest) = self
            .layers
            .split_first()
            .expect("a block has layers (checked in UNet::new)");
        let x = match &input {
            BlockInput::Skip(x) => MapRef::One(x),
            BlockInput::Concat(a, b) => MapRef::Concat(a, b),
        };
        let mut out = first.forward(x, call, up_to);
        drop(input);
        if let Layer::Attn(_) = first {
            traced(0, &out);
        }
        for (i, layer) in rest.iter().enumerate() {
            out = layer.forward(MapRef::One(&out), call, up_to);
            if let Layer::Attn(_) = layer {
                traced(i + 1, &out);
            }
        }
        out
    }
}

/// SDXL's added conditioning (`label_emb`): y = concat(pooled text embedding, sinusoidal
/// embeddings of the size/crop ids) → Linear → SiLU → Linear, added to the time embedding.
struct LabelEmbedding {
    /// `label_emb.0.0` (adm_in → temb) and `label_emb.0.2` (temb → temb).
    mlp: (Linear, Linear),
}

pub struct UNet {
    model_channels: usize,
    time_embed: (Linear, Linear),
    label_emb: Option<LabelEmbedding>,
    conv_in: Conv2d,
    input_blocks: Vec<Block>,
    middle_block: Block,
    output_blocks: Vec<Block>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// `w` is the UNet prefix (`model.diffusion_model`); `heads` the family's rule for attention
    /// heads (SD1.x `Fixed(8)`, SD2.x/SDXL `Width(64)`).
    pub fn new(w: &Weights, heads: HeadsRule) -> Result<Self> {
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
        // SDXL: `label_emb.0.0` [temb, adm_in], `label_emb.0.2` [temb, temb].
        let label_emb = if w.contains("label_emb.0.0.weight") {
            let first = Linear::from_weights(&w.pp("label_emb.0.0"), true)?;
            if first.out_dim != temb_dim {
                return Err(Error::UnsupportedModel(format!(
                    "label embedding width {} differs from the time embedding's {temb_dim}",
                    first.out_dim
                )));
            }
            let second = Linear::new(&w.pp("label_emb.0.2"), temb_dim, temb_dim, true)?;
            Some(LabelEmbedding {
                mlp: (first, second),
            })
        } else {
            None
        };

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
                    // [C, C, 1, 1] (SD1) or [C, C] (SD2/SDXL): either acts per token.
                    let channels = lw.param_any("proj_in.weight")?.shape()[0];
                    let heads = heads.heads(channels)?;
                    layers.push(Layer::Attn(SpatialTransformer::new(
                        &lw, channels, heads, GROUPS,
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
                "UNet has {} input, {} output and {} middle layers; not an LDM UNet",
                input_blocks.len(),
                output_blocks.len(),
                middle_block.layers.len()
            )));
        }
        Ok(UNet {
            model_channels,
            time_embed: (time_embed_0, time_embed_2),
            label_emb,
            conv_in,
            input_blocks,
            middle_block,
            output_blocks,
            norm_out: GroupNorm::new(&w.pp("out.0"), model_channels, GROUPS, EPS)?,
            conv_out: Conv2d::from_weights(&w.pp("out.2"), 1, 1)?,
        })
    }

    /// Width of SDXL's added conditioning vector (`label_emb.0.0`'s input: pooled text embedding
    /// plus 6 embedded size/crop ids; 2816 for SDXL), None for a UNet without one (SD1/SD2).
    pub fn adm_in_channels(&self) -> Option<usize> {
        self.label_emb.as_ref().map(|l| l.mlp.0.in_dim)
    }

    /// SDXL's added conditioning y [n, adm_in] for `forward_added`, from the pooled text embeddings
    /// `pooled` [n, p] and the size/crop ids `time_ids` [n, 6] (original_h, original_w,
    /// crop_top, crop_left, target_h, target_w): y = concat(pooled, emb(id₀), …, emb(id₅)), each id
    /// embedded as a timestep with (adm_in − p) / 6 channels, cos half first (diffusers'
    /// `add_time_proj`, SGM's `ConcatTimestepEmbedderND`).
    pub fn added_conditioning(&self, pooled: &[f32], time_ids: &[f32]) -> Result<Vec<f32>> {
        let unsupported = |what: String| Err(Error::UnsupportedModel(what));
        let Some(adm_in) = self.adm_in_channels() else {
            return unsupported("this UNet takes no added (pooled/size) conditioning".into());
        };
        let n = time_ids.len() / 6;
        if n == 0 || time_ids.len() != 6 * n || !pooled.len().is_multiple_of(n) {
            return unsupported(format!(
                "added conditioning needs 6 size ids per image and one pooled embedding each; got {} ids and {} pooled values",
                time_ids.len(),
                pooled.len()
            ));
        }
        let p = pooled.len() / n;
        let id_width = adm_in.saturating_sub(p) / 6;
        if p >= adm_in || p + 6 * id_width != adm_in || !id_width.is_multiple_of(2) {
            return unsupported(format!(
                "a pooled text embedding {p} wide plus 6 size ids does not fill the UNet's {adm_in}-wide added conditioning"
            ));
        }
        let ids = timestep_embedding(time_ids, id_width);
        let mut y = Vec::with_capacity(n * adm_in);
        for b in 0..n {
            y.extend_from_slice(&pooled[b * p..(b + 1) * p]);
            y.extend_from_slice(&ids[b * 6 * id_width..(b + 1) * 6 * id_width]);
        }
        Ok(y)
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

    /// Predicted peak of activation memory (bytes) for one call on a [batch, 4, h, w] latent with
    /// a context of `tokens` tokens (77 per chunk of prompt): skip connections alive plus the
    /// working set of the layer being computed (a transformer's cross-attention keys and values
    /// over the context included), with the kernels' scratch (conv patch, weight panels, attention
    /// scores, feed-forward chunk) under `scratch` on `threads` threads. Any h, w: sides the
    /// downsamplers leave odd are followed as the forward pass does (ceil down, resize up to the
    /// skip). Arithmetic, saturating.
    pub fn peak_activation_bytes(
        &self,
        batch: usize,
        (h, w): (usize, usize),
        tokens: usize,
        scratch: &Scratch,
        threads: usize,
    ) -> u64 {
        let mut shape = MapShape {
            batch,
            c: self.model_channels,
            h,
            w,
            tokens,
            widest: Widest::default(),
            scratch: *scratch,
            threads,
        };
        // Every skip connection waiting for its output block.
        let mut skips: Vec<Skip> = vec![shape.skip()];
        let alive = |skips: &[Skip]| skips.iter().map(|s| s.bytes).sum::<u64>();
        let mut peak = 0u64;
        // Input and middle blocks read the last skip, which is already alive.
        for block in &self.input_blocks {
            peak = peak.max(shape.walk(block, alive(&skips), true, (0, 0)));
            skips.push(shape.skip());
        }
        peak = peak.max(shape.walk(&self.middle_block, alive(&skips), true, (0, 0)));
        for block in &self.output_blocks {
            // The block reads the previous output and the skip as one concatenated map (never
            // copied, freed after the first layer): that layer's input counts both.
            let skip = skips.pop().unwrap_or_default();
            shape.c += skip.c;
            // An upsampler resizes to the skip the next block reads.
            let up_to = skips.last().map_or((skip.h, skip.w), |s| (s.h, s.w));
            peak = peak.max(shape.walk(block, alive(&skips), false, up_to));
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

    /// Channels the UNet takes (4 for SD1.x; 9 for an inpainting UNet: latent, mask, masked-image
    /// latent).
    pub fn in_channels(&self) -> usize {
        self.conv_in.in_ch
    }

    /// Channels the UNet predicts (the latent's: 4).
    pub fn out_channels(&self) -> usize {
        self.conv_out.out_ch
    }

    /// Predicts noise for `x` [n, 4, h, w] at `timesteps` [n] given `context` [n, tokens, ctx_dim]
    /// (any number of tokens), for a UNet without added conditioning (SD1/SD2), with the kernels
    /// working within the budgets of `scratch` (any tier gives the same bits).
    pub fn forward(&self, x: &Tensor, timesteps: &[f32], context: &[f32], cx: &Ctx) -> Tensor {
        self.forward_traced(x, timesteps, context, cx, &mut |_, _| {})
    }

    /// As `forward`, reporting intermediate activations by LDM block name ("time_proj", "time_emb",
    /// "input_blocks.0", …, "middle_block", "output_blocks.N").
    pub fn forward_traced(
        &self,
        x: &Tensor,
        timesteps: &[f32],
        context: &[f32],
        cx: &Ctx,
        trace: &mut dyn FnMut(&str, &Tensor),
    ) -> Tensor {
        self.forward_added(x, timesteps, context, None, cx, trace)
    }

    /// As `forward_traced`, with SDXL's added conditioning `added` [n, adm_in]
    /// (`added_conditioning`), required exactly when `adm_in_channels` is Some. With it the trace
    /// also reports "added" (y), "label_emb" and "emb" (time plus label embedding).
    pub fn forward_added(
        &self,
        x: &Tensor,
        timesteps: &[f32],
        context: &[f32],
        added: Option<&[f32]>,
        cx: &Ctx,
        trace: &mut dyn FnMut(&str, &Tensor),
    ) -> Tensor {
        self.run(x, timesteps, (context, added), cx, trace, false)
    }

    /// As `forward_added`, also reporting each spatial transformer's output as "{block}.{layer}"
    /// ("input_blocks.1.1", "middle_block.1", …).
    pub fn forward_detailed(
        &self,
        x: &Tensor,
        timesteps: &[f32],
        context: &[f32],
        added: Option<&[f32]>,
        cx: &Ctx,
        trace: &mut dyn FnMut(&str, &Tensor),
    ) -> Tensor {
        self.run(x, timesteps, (context, added), cx, trace, true)
    }

    /// `conditioning`: the text context and the added conditioning.
    fn run(
        &self,
        x: &Tensor,
        timesteps: &[f32],
        (context, added): (&[f32], Option<&[f32]>),
        cx: &Ctx,
        trace: &mut dyn FnMut(&str, &Tensor),
        layers: bool,
    ) -> Tensor {
        let n = x.shape[0];
        assert_eq!(timesteps.len(), n, "one timestep per batch item");
        let t_proj = Tensor::new(
            vec![n, self.model_channels],
            timestep_embedding(timesteps, self.model_channels),
        );
        trace("time_proj", &t_proj);
        // The time and label embeddings stay f32 whatever the precision mode.
        let exact = cx.exact();
        let mut temb = self.time_embed.0.forward(&t_proj.data, &exact);
        kernels::silu(&mut temb);
        let mut temb = self.time_embed.1.forward(&temb, &exact);
        let width = temb.len() / n;
        trace("time_emb", &Tensor::new(vec![n, width], temb.clone()));
        match (&self.label_emb, added) {
            (Some(label), Some(y)) => {
                let adm_in = label.mlp.0.in_dim;
                assert_eq!(y.len(), n * adm_in, "added conditioning is [n, adm_in]");
                trace("added", &Tensor::new(vec![n, adm_in], y.to_vec()));
                let mut h = label.mlp.0.forward(y, &exact);
                kernels::silu(&mut h);
                let label_emb = label.mlp.1.forward(&h, &exact);
                trace("label_emb", &Tensor::new(vec![n, width], label_emb.clone()));
                temb.iter_mut().zip(&label_emb).for_each(|(t, l)| *t += l);
                trace("emb", &Tensor::new(vec![n, width], temb.clone()));
            }
            (None, None) => {}
            (Some(_), None) => panic!("this UNet needs added conditioning (label_emb)"),
            (None, Some(_)) => panic!("this UNet takes no added conditioning"),
        }
        let mut silu_temb = temb;
        kernels::silu(&mut silu_temb);
        let call = Call {
            silu_temb: &silu_temb,
            context,
            cx,
        };

        // conv_in and conv_out stay f32 too: they read and write the latent itself (4 channels, a
        // sliver of the FLOPs), and in bf16 conv_out's rounding would land on the output as is.
        let h = self.conv_in.forward(x, &exact);
        trace("input_blocks.0", &h);
        // Each input block's output is kept as the skip connection and read by the next block.
        let mut skips = vec![h];
        for block in &self.input_blocks {
            let last = skips.last().expect("starts with conv_in's output");
            let size = spatial(last);
            let h = block.forward(
                BlockInput::Skip(last),
                &call,
                size,
                layers.then_some(&mut *trace),
            );
            trace(&block.name, &h);
            skips.push(h);
        }
        let last = skips.last().expect("starts with conv_in's output");
        let size = spatial(last);
        let mut h = self.middle_block.forward(
            BlockInput::Skip(last),
            &call,
            size,
            layers.then_some(&mut *trace),
        );
        trace(&self.middle_block.name, &h);
        for block in &self.output_blocks {
            let skip = skips
                .pop()
                .expect("one skip per output block (checked in new)");
            // An upsampler ending this block resizes to the skip the next block reads.
            let up_to = skips.last().map_or(spatial(&skip), spatial);
            h = block.forward(
                BlockInput::Concat(h, skip),
                &call,
                up_to,
                layers.then_some(&mut *trace),
            );
            trace(&block.name, &h);
        }
        let read = ReadAs {
            norm: Some(self.norm_out.per_image(MapRef::One(&h))),
            silu: true,
            resize: Resize::None,
        };
        let mut out = self.conv_out.product(MapRef::One(&h), &read, &exact);
        add_channel_bias(&mut out, &self.conv_out.bias());
        out
    }
}

/// (height, width) of an NCHW map.
fn spatial(x: &Tensor) -> (usize, usize) {
    let (_, _, h, w) = x.nchw();
    (h, w)
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
    /// Context tokens the cross-attentions read.
    tokens: usize,
    widest: Widest,
    scratch: Scratch,
    threads: usize,
}

/// A skip connection the memory model keeps alive: its bytes and shape.
#[derive(Clone, Copy, Default)]
struct Skip {
    bytes: u64,
    c: usize,
    h: usize,
    w: usize,
}

/// The largest kernel operands seen on the walk, which bound the kernels' scratch floors.
#[derive(Default)]
struct Widest {
    /// the longest weight row: in_ch · 3 · 3 of the widest convolution, or a linear's input
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

    /// The current map, kept as a skip connection.
    fn skip(&self) -> Skip {
        Skip {
            bytes: self.bytes(self.c),
            c: self.c,
            h: self.h,
            w: self.w,
        }
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
    /// input); advances the shape through it. An upsampler resizes to `up_to`.
    fn walk(&mut self, block: &Block, alive: u64, input_alive: bool, up_to: (usize, usize)) -> u64 {
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
                // output projection's product: 8 maps of the channel width in self-attention; in
                // cross-attention k and v cover the context's tokens instead (more than the map's
                // at the small levels, or with a long prompt)
                Layer::Attn(a) => {
                    let kv = (self.batch as u64)
                        .saturating_mul(self.tokens as u64)
                        .saturating_mul(a.channels as u64)
                        .saturating_mul(4);
                    let maps = self.bytes(a.channels);
                    (8 * maps).max((6 * maps).saturating_add(2 * kv))
                }
                // input and output (ceil of half each side)
                Layer::Down(_) => {
                    let (oh, ow) = (self.h.div_ceil(2), self.w.div_ceil(2));
                    let out = (self.batch as u64)
                        .saturating_mul(self.c as u64)
                        .saturating_mul((oh * ow) as u64)
                        .saturating_mul(4);
                    self.bytes(self.c).saturating_add(out)
                }
                // input and output; the convolution reads the input resized
                Layer::Up(_) => {
                    let out = (self.batch as u64)
                        .saturating_mul(self.c as u64)
                        .saturating_mul((up_to.0 * up_to.1) as u64)
                        .saturating_mul(4);
                    self.bytes(self.c).saturating_add(out)
                }
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
                    widest.keys = widest.keys.max(self.h * self.w).max(self.tokens);
                    widest.head_width = widest.head_width.max(a.head_width());
                    // proj_in/out and attention rows are C wide, to_k/to_v's the context's,
                    // the feed-forward's output 4·C
                    let rows = (4 * a.channels).max(a.context_dim());
                    widest.k_dim = widest.k_dim.max(rows);
                }
                Layer::Down(_) => (self.h, self.w) = (self.h.div_ceil(2), self.w.div_ceil(2)),
                Layer::Up(_) => {
                    (self.h, self.w) = up_to;
                    self.see_conv3x3(self.c, self.c);
                }
            }
        }
        peak
    }
}
