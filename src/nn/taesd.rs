//! TAESD, the tiny autoencoder (madebyollin/taesd; diffusers `AutoencoderTiny`): ~1.2M parameters a
//! half, 64 channels throughout, ReLU, nearest upsampling, no normalisation and no attention.
//!
//! Both key layouts people have are read: diffusers' (`encoder.layers.N.*`, `decoder.layers.N.*`,
//! in one file or an `AutoencoderTiny` folder) and the original `taesd_encoder.safetensors` /
//! `taesd_decoder.safetensors` (`N.*`, N = the index in taesd.py's `nn.Sequential`; the decoder's
//! indices are one above diffusers' because its `Clamp()` comes first). The network is walked off
//! the stored layers, so TAESDXL (same architecture, SDXL's latents) loads by the same code.
//!
//! Value ranges follow diffusers' `AutoencoderTiny` with a Stable Diffusion pipeline
//! (`scaling_factor` 1.0): the decoder takes the sampler's latents as they are and returns an
//! image in [-1, 1] (`2·taesd(z) − 1`, not clamped); the encoder takes an image in [-1, 1] and
//! gives latents in the sampler's space (deterministic: no sampling).
//!
//! Memory: the full-resolution part of each half (the decoder from its last upsample on, the
//! encoder up to its first downsample) runs in bands of rows with a halo that covers its receptive
//! field, so no 64-channel map is ever held at full resolution. The bands are fixed by the shape
//! (`DECODER_BAND_ROWS`, `ENCODER_BAND_ROWS`), never by a budget, so the output bits depend on
//! the image size alone; `peak_bytes` predicts the memory from shapes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::layers::{add_assign, Conv2d, MapRef, ReadAs};
use crate::error::{Error, Result};
use crate::kernels::scratch::Scratch;
use crate::kernels::Resize;
use crate::nn::Ctx;
use crate::tensor::Tensor;
use crate::weights::{check_model_path, TensorStore, Weights};

/// Output rows per band of the decoder's full-resolution part (from the last upsample on).
pub const DECODER_BAND_ROWS: usize = 128;
/// Output rows per band of the encoder's full-resolution part (up to its first downsample; the
/// rows are at half resolution there, so 128 image rows a band).
pub const ENCODER_BAND_ROWS: usize = 64;
/// `tanh(z / 3) · 3`: the decoder's first operation (taesd.py's `Clamp()`).
const LATENT_CLAMP: f32 = 3.0;
/// Per compute thread: gemm's thread-local slab and the gather's line buffers (as the VAE's).
const PER_THREAD_BYTES: u64 = 2 << 20;
/// Biases converted to f32, layer bookkeeping.
const SMALL_BYTES: u64 = 1 << 20;

/// A loaded TAESD: either half may be absent (a lone `taesd_decoder.safetensors` decodes only).
pub struct Taesd {
    pub decoder: Option<Half>,
    pub encoder: Option<Half>,
    /// What `--taesd` named (for error messages).
    pub path: PathBuf,
    /// Mapped bytes of the files' tensors (the plan charges them while TAESD runs).
    pub weight_bytes: u64,
}

/// Which half a layer list is: it decides what a conv stored without a bias is (a stride-2
/// downsample in the encoder, the conv after a 2× upsample in the decoder).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Encoder,
    Decoder,
}

/// One half of TAESD: its layers in `nn.Sequential` order (the parameter-free Clamp, ReLU and
/// Upsample modules folded into the layers around them).
pub struct Half {
    role: Role,
    layers: Vec<Layer>,
}

/// A layer that holds weights.
enum Layer {
    /// A convolution, read 2× upsampled when `upsample`, followed by a ReLU when `relu`.
    Conv {
        conv: Conv2d,
        stride: usize,
        upsample: bool,
        relu: bool,
    },
    /// `relu(conv.4(relu(conv.2(relu(conv.0(x))))) + skip(x))`, skip = identity or a 1×1 conv.
    Block {
        convs: Box<[Conv2d; 3]>,
        skip: Option<Box<Conv2d>>,
    },
}

/// A layer's shape, for the memory model and the band halos (also built for the standard
/// TAESD when none is loaded: the governor's refusal hint).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerShape {
    pub in_ch: usize,
    pub out_ch: usize,
    /// Convolutions in the layer (1, or 3 for a block), each `kernel`×`kernel`, padding kernel/2.
    pub convs: usize,
    pub kernel: usize,
    pub stride: usize,
    pub upsample: bool,
    /// A block's 1×1 skip convolution.
    pub skip: bool,
}

impl LayerShape {
    fn conv(in_ch: usize, out_ch: usize, stride: usize, upsample: bool) -> Self {
        LayerShape {
            in_ch,
            out_ch,
            convs: 1,
            kernel: 3,
            stride,
            upsample,
            skip: false,
        }
    }

    fn block(ch: usize) -> Self {
        LayerShape {
            convs: 3,
            ..LayerShape::conv(ch, ch, 1, false)
        }
    }

    /// The SD1/SDXL TAESD decoder (taesd.py's `Decoder()`): conv, blocks 3·3·3·1 between three
    /// 2× upsamples, conv to RGB.
    pub fn standard_decoder(latent_channels: usize) -> Vec<LayerShape> {
        let mut layers = vec![LayerShape::conv(latent_channels, 64, 1, false)];
        for (i, blocks) in [3, 3, 3, 1].into_iter().enumerate() {
            if i > 0 {
                layers.push(LayerShape::conv(64, 64, 1, true));
            }
            layers.extend(std::iter::repeat_n(LayerShape::block(64), blocks));
        }
        layers.push(LayerShape::conv(64, 3, 1, false));
        layers
    }

    /// Maps `rows` of this layer's output to the rows of its input they read (clipped to the
    /// input's `in_h` rows). A stride-2 window starts on an even input row, so a band's first
    /// row lines up with the stride.
    fn input_rows(&self, (p, q): (usize, usize), in_h: usize) -> (usize, usize) {
        let pad = self.kernel / 2;
        if self.upsample {
            // One conv over the upsampled map, then back to the stored rows.
            let (a, b) = (p.saturating_sub(pad), (q + pad).min(2 * in_h));
            return (a / 2, b.div_ceil(2));
        }
        // Output rows p..q of a conv read input rows s·p − pad … s·(q−1) − pad + k − 1; each
        // further conv of a block (stride 1) widens that by pad on each side.
        let (s, extra) = (self.stride, (self.convs - 1) * pad);
        let a = (s * p).saturating_sub(pad + extra);
        let b = (s * (q - 1) + self.kernel + extra)
            .saturating_sub(pad)
            .min(in_h);
        (a - a % s, b)
    }

    /// The output rows for an input slab starting at global row `start` of `len` rows.
    fn output_rows(&self, start: usize, len: usize) -> (usize, usize) {
        if self.upsample {
            (2 * start, 2 * len)
        } else if self.stride == 1 {
            (start, len)
        } else {
            let pad = self.kernel / 2;
            (
                start / self.stride,
                (len + 2 * pad - self.kernel) / self.stride + 1,
            )
        }
    }

    fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        if self.upsample {
            (2 * h, 2 * w)
        } else {
            let pad = self.kernel / 2;
            let o = |v: usize| (v + 2 * pad - self.kernel) / self.stride + 1;
            (o(h), o(w))
        }
    }

    /// Bytes alive while this layer runs on an `h`×`w` input map (input, output and, in a
    /// block, the intermediate map the next conv reads; the ReLU and the residual work in place).
    fn peak_bytes(&self, h: usize, w: usize) -> u64 {
        let (oh, ow) = self.out_size(h, w);
        let input = map_bytes(self.in_ch, h, w);
        let out = map_bytes(self.out_ch, oh, ow);
        let maps = if self.convs > 1 { 2 } else { 1 } + usize::from(self.skip);
        input.saturating_add(out.saturating_mul(maps as u64))
    }
}

fn map_bytes(c: usize, h: usize, w: usize) -> u64 {
    (c as u64)
        .saturating_mul(h as u64)
        .saturating_mul(w as u64)
        .saturating_mul(4)
}

impl Layer {
    fn shape(&self) -> LayerShape {
        match self {
            Layer::Conv {
                conv,
                stride,
                upsample,
                ..
            } => LayerShape {
                in_ch: conv.in_ch,
                out_ch: conv.out_ch,
                convs: 1,
                kernel: conv.kernel(),
                stride: *stride,
                upsample: *upsample,
                skip: false,
            },
            Layer::Block { convs, skip } => LayerShape {
                in_ch: convs[0].in_ch,
                out_ch: convs[2].out_ch,
                convs: 3,
                kernel: 3,
                stride: 1,
                upsample: false,
                skip: skip.is_some(),
            },
        }
    }

    fn forward(&self, x: &Tensor, cx: &Ctx) -> Tensor {
        match self {
            Layer::Conv {
                conv,
                upsample,
                relu,
                ..
            } => {
                let mut y = if *upsample {
                    let read = ReadAs {
                        resize: Resize::Twice,
                        ..ReadAs::default()
                    };
                    let mut y = conv.product(MapRef::One(x), &read, cx);
                    super::layers::add_channel_bias(&mut y, &conv.bias());
                    y
                } else {
                    conv.forward(x, cx)
                };
                if *relu {
                    relu_in_place(&mut y.data);
                }
                y
            }
            Layer::Block { convs, skip } => {
                let mut t = convs[0].forward(x, cx);
                relu_in_place(&mut t.data);
                let mut t2 = convs[1].forward(&t, cx);
                drop(t);
                relu_in_place(&mut t2.data);
                let mut out = convs[2].forward(&t2, cx);
                drop(t2);
                match skip {
                    Some(skip) => add_assign(&mut out.data, &skip.forward(x, cx).data),
                    None => add_assign(&mut out.data, &x.data),
                }
                relu_in_place(&mut out.data);
                out
            }
        }
    }
}

fn relu_in_place(v: &mut [f32]) {
    use rayon::prelude::*;
    v.par_chunks_mut(1 << 16)
        .for_each(|c| c.iter_mut().for_each(|x| *x = x.max(0.0)));
}

impl Half {
    /// Walks the layers stored under `w` (`N.weight` convs, `N.conv.{0,2,4}` blocks), skipping
    /// the parameter-free indices, and checks that they chain.
    fn new(w: &Weights, keys: &[String], role: Role, file: &Path) -> Result<Half> {
        let prefix = if w.prefix().is_empty() {
            String::new()
        } else {
            format!("{}.", w.prefix())
        };
        let last = keys
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
            .max();
        let bad = |msg: String| Error::bad_file(file, format!("not a TAESD {role:?}: {msg}"));
        let Some(last) = last else {
            return Err(bad("no layers".into()));
        };
        let mut layers: Vec<Layer> = Vec::new();
        let mut gap = false;
        for i in 0..=last {
            let l = w.pp(i.to_string());
            if l.contains("conv.0.weight") {
                let conv = |name: &str| Conv2d::from_weights(&l.pp(name), 1, 1);
                let skip = if l.contains("skip.weight") {
                    Some(Box::new(Conv2d::from_weights_without_bias(
                        &l.pp("skip"),
                        1,
                        0,
                    )?))
                } else {
                    None
                };
                layers.push(Layer::Block {
                    convs: Box::new([conv("conv.0")?, conv("conv.2")?, conv("conv.4")?]),
                    skip,
                });
            } else if l.contains("weight") {
                let has_bias = l.contains("bias");
                let resample = !has_bias;
                let stride = if resample && role == Role::Encoder {
                    2
                } else {
                    1
                };
                let upsample = resample && role == Role::Decoder;
                let conv = if has_bias {
                    Conv2d::from_weights(&l, stride, 1)?
                } else {
                    Conv2d::from_weights_without_bias(&l, stride, 1)?
                };
                if upsample && !gap {
                    return Err(bad(format!("conv {i} without bias follows no upsample")));
                }
                layers.push(Layer::Conv {
                    conv,
                    stride,
                    upsample,
                    // Only the decoder's first conv is followed by a ReLU.
                    relu: role == Role::Decoder && layers.is_empty(),
                });
            }
            gap = !l.contains("weight") && !l.contains("conv.0.weight");
        }
        let half = Half { role, layers };
        half.check().map_err(bad)?;
        Ok(half)
    }

    /// The layers chain (each reads what the one before gives), every conv is 3×3 (TAESD has
    /// no other), and the ends are an image (3 channels) and a latent.
    fn check(&self) -> std::result::Result<(), String> {
        let shapes = self.shapes();
        let (first, last) = match (shapes.first(), shapes.last()) {
            (Some(f), Some(l)) => (f, l),
            _ => return Err("no layers".into()),
        };
        for pair in shapes.windows(2) {
            if pair[0].out_ch != pair[1].in_ch {
                return Err(format!(
                    "a layer gives {} channels, the next reads {}",
                    pair[0].out_ch, pair[1].in_ch
                ));
            }
        }
        for layer in &self.layers {
            let convs: Vec<&Conv2d> = match layer {
                Layer::Conv { conv, .. } => vec![conv],
                Layer::Block { convs, .. } => convs.iter().collect(),
            };
            if let Some(c) = convs.iter().find(|c| c.kernel() != 3) {
                return Err(format!(
                    "a {0}x{0} convolution (TAESD's are 3x3)",
                    c.kernel()
                ));
            }
        }
        let image = match self.role {
            Role::Encoder => first.in_ch,
            Role::Decoder => last.out_ch,
        };
        if image != 3 {
            return Err(format!("its image side has {image} channels, not 3"));
        }
        if self.factor() < 2 {
            return Err("no resampling layers".into());
        }
        Ok(())
    }

    pub fn shapes(&self) -> Vec<LayerShape> {
        self.layers.iter().map(Layer::shape).collect()
    }

    /// Channels of the latent side.
    pub fn latent_channels(&self) -> usize {
        let shapes = self.shapes();
        match self.role {
            Role::Encoder => shapes.last().map_or(0, |l| l.out_ch),
            Role::Decoder => shapes.first().map_or(0, |l| l.in_ch),
        }
    }

    /// Image pixels per latent pixel along a side (8 for SD's TAESD).
    pub fn factor(&self) -> usize {
        self.shapes()
            .iter()
            .map(|l| if l.upsample { 2 } else { l.stride })
            .product()
    }

    /// The layers that run at full resolution, in bands: the decoder's from its last upsample,
    /// the encoder's up to and including its first downsample.
    fn banded_range(&self) -> (std::ops::Range<usize>, usize) {
        banded_range(self.role, &self.shapes())
    }

    /// Runs the layers on `x` (the whole-map part, then the banded one, or the reverse; with
    /// `banded` false every layer on whole maps).
    fn forward(&self, x: &Tensor, in_bands: bool, cx: &Ctx) -> Tensor {
        let (banded, band_rows) = self.banded_range();
        let band_rows = if in_bands { band_rows } else { usize::MAX };
        let mut x = std::borrow::Cow::Borrowed(x);
        let mut i = 0;
        while i < self.layers.len() {
            if i == banded.start {
                let layers = &self.layers[banded.clone()];
                x = std::borrow::Cow::Owned(forward_banded(layers, &x, band_rows, cx));
                i = banded.end;
            } else {
                x = std::borrow::Cow::Owned(self.layers[i].forward(&x, cx));
                i += 1;
            }
        }
        x.into_owned()
    }
}

fn banded_range(role: Role, shapes: &[LayerShape]) -> (std::ops::Range<usize>, usize) {
    match role {
        Role::Decoder => {
            let start = shapes.iter().rposition(|l| l.upsample).unwrap_or(0);
            (start..shapes.len(), DECODER_BAND_ROWS)
        }
        Role::Encoder => {
            let end = shapes
                .iter()
                .position(|l| l.stride > 1)
                .map_or(shapes.len(), |i| i + 1);
            (0..end, ENCODER_BAND_ROWS)
        }
    }
}

/// For output rows `rows` of `shapes` run on an input of `in_h` rows: the input rows to read.
fn slab_rows(shapes: &[LayerShape], in_h: usize, rows: (usize, usize)) -> (usize, usize) {
    // Input heights of every layer.
    let mut heights = vec![in_h];
    for s in shapes {
        let h = *heights.last().expect("non-empty");
        heights.push(s.out_size(h, 1).0);
    }
    shapes
        .iter()
        .enumerate()
        .rev()
        .fold(rows, |need, (i, s)| s.input_rows(need, heights[i]))
}

/// Runs `layers` over `x` in bands of `band_rows` output rows. Each band reads the input rows
/// its receptive field covers (`slab_rows`); the rows near a slab edge that is not the image's
/// own are wrong after each conv (zero padding instead of the neighbours), and the halo is wide
/// enough that none of them reaches the rows kept.
fn forward_banded(layers: &[Layer], x: &Tensor, band_rows: usize, cx: &Ctx) -> Tensor {
    let shapes: Vec<LayerShape> = layers.iter().map(Layer::shape).collect();
    let (n, c, h, w) = x.nchw();
    let (oh, ow) = shapes.iter().fold((h, w), |(h, w), s| s.out_size(h, w));
    let out_c = shapes.last().map_or(c, |s| s.out_ch);
    if oh <= band_rows {
        return layers.iter().fold(x.clone(), |x, l| l.forward(&x, cx));
    }
    let mut out = Tensor::zeros(vec![n, out_c, oh, ow]);
    for y0 in (0..oh).step_by(band_rows) {
        let y1 = (y0 + band_rows).min(oh);
        let (a, b) = slab_rows(&shapes, h, (y0, y1));
        let mut slab = rows_of(x, a, b);
        let mut start = a;
        for (layer, s) in layers.iter().zip(&shapes) {
            let len = slab.shape[2];
            slab = layer.forward(&slab, cx);
            let (next_start, next_len) = s.output_rows(start, len);
            debug_assert_eq!(next_len, slab.shape[2], "band rows");
            start = next_start;
        }
        let sh = slab.shape[2];
        debug_assert!(start <= y0 && y1 <= start + sh, "band covers its rows");
        for b in 0..n {
            for ch in 0..out_c {
                let src =
                    &slab.data[((b * out_c + ch) * sh + (y0 - start)) * ow..][..(y1 - y0) * ow];
                out.data[((b * out_c + ch) * oh + y0) * ow..][..(y1 - y0) * ow]
                    .copy_from_slice(src);
            }
        }
    }
    out
}

/// Rows `a..b` of every plane of an NCHW map, as a map of its own.
fn rows_of(x: &Tensor, a: usize, b: usize) -> Tensor {
    let (n, c, h, w) = x.nchw();
    let mut data = Vec::with_capacity(n * c * (b - a) * w);
    for plane in x.data.chunks(h * w) {
        data.extend_from_slice(&plane[a * w..b * w]);
    }
    Tensor::new(vec![n, c, b - a, w], data)
}

/// Predicted peak bytes of running `shapes` (one half, `role`) on a [1, c, h, w] input: the
/// largest of the whole-map layers' working sets and, for the banded part, its whole input and
/// output plus the largest band's slab working set; plus the kernels' scratch at the first tier
/// (what `Half::forward` runs with), per-thread buffers and small allocations. The input itself
/// is the caller's and not counted. Saturating: an absurd size gives `u64::MAX`.
pub fn peak_bytes(role: Role, shapes: &[LayerShape], h: usize, w: usize) -> u64 {
    if h > 1 << 20 || w > 1 << 20 {
        return u64::MAX;
    }
    let (banded, band_rows) = banded_range(role, shapes);
    let mut peak = 0u64;
    let (mut h, mut w) = (h, w);
    let mut i = 0;
    let mut max_w = w;
    while i < shapes.len() {
        if i == banded.start {
            let part = &shapes[banded.clone()];
            let c = part[0].in_ch;
            let (oh, ow) = part.iter().fold((h, w), |(h, w), s| s.out_size(h, w));
            let out_c = part.last().map_or(c, |s| s.out_ch);
            let whole = map_bytes(c, h, w).saturating_add(map_bytes(out_c, oh, ow));
            let mut band_peak = 0u64;
            if oh <= band_rows {
                band_peak = whole_peak(part, h, w);
            } else {
                for y0 in (0..oh).step_by(band_rows) {
                    let (a, b) = slab_rows(part, h, (y0, (y0 + band_rows).min(oh)));
                    band_peak = band_peak.max(whole_peak(part, b - a, w));
                }
            }
            peak = peak.max(whole.saturating_add(band_peak));
            max_w = max_w.max(ow);
            (h, w) = (oh, ow);
            i = banded.end;
        } else {
            peak = peak.max(shapes[i].peak_bytes(h, w));
            (h, w) = shapes[i].out_size(h, w);
            max_w = max_w.max(w);
            i += 1;
        }
    }
    let threads = rayon::current_num_threads();
    let row = shapes.iter().map(|s| s.in_ch * 9).max().unwrap_or(0);
    // The first tier's patch; its panel only as large as the largest filter bank can fill
    // (Winograd F(4,3)'s transformed filters: 36 values per input·output channel pair); no
    // feed-forward chunks, no attention.
    let widest = shapes
        .iter()
        .map(|s| s.in_ch.max(s.out_ch))
        .max()
        .unwrap_or(0);
    let first = Scratch::default();
    let scratch = Scratch {
        weight_panel: first.weight_panel.min(36 * widest * widest),
        ff_chunk: 0,
        ..first
    }
    .peak_bytes(row, max_w, (1, 1), threads);
    peak.saturating_add(scratch)
        .saturating_add(SMALL_BYTES)
        .saturating_add(PER_THREAD_BYTES.saturating_mul(threads as u64))
}

/// The largest working set of `shapes` run whole on an `h`×`w` map (the slab copy included).
fn whole_peak(shapes: &[LayerShape], h: usize, w: usize) -> u64 {
    let (mut h, mut w) = (h, w);
    let mut peak = map_bytes(shapes.first().map_or(0, |s| s.in_ch), h, w);
    for s in shapes {
        peak = peak.max(s.peak_bytes(h, w));
        (h, w) = s.out_size(h, w);
    }
    peak
}

impl Taesd {
    /// Opens `--taesd PATH`: a diffusers `AutoencoderTiny` file or folder
    /// (`diffusion_pytorch_model.safetensors`), or the original `taesd_decoder.safetensors` /
    /// `taesd_encoder.safetensors` (a folder holding them, or one of them: the other is read from
    /// beside it when present). F16 and F32 files alike.
    pub fn open(path: &Path) -> Result<Taesd> {
        check_model_path(path)?;
        let files = taesd_files(path)?;
        let (mut decoder, mut encoder) = (None, None);
        let mut weight_bytes = 0;
        for file in &files {
            let store = Arc::new(TensorStore::open(file)?);
            let keys: Vec<String> = store.tensors().iter().map(|t| t.name.clone()).collect();
            let halves = halves_of(&store, &keys);
            if halves.is_empty() {
                return Err(Error::bad_file(
                    file,
                    "not a TAESD file: expected `decoder.layers.N.*`/`encoder.layers.N.*` \
                     (diffusers AutoencoderTiny) or `N.weight`/`N.conv.0.weight` \
                     (taesd_decoder/taesd_encoder.safetensors)",
                ));
            }
            weight_bytes += store.bytes_with_prefix("");
            for (role, prefix) in halves {
                let w = Weights::new(store.clone(), prefix);
                let half = Half::new(&w, &keys, role, file)?;
                match role {
                    Role::Decoder => decoder = decoder.or(Some(half)),
                    Role::Encoder => encoder = encoder.or(Some(half)),
                }
            }
        }
        if let (Some(d), Some(e)) = (&decoder, &encoder) {
            if d.latent_channels() != e.latent_channels() || d.factor() != e.factor() {
                return Err(Error::bad_file(
                    path,
                    "the TAESD encoder and decoder do not match (latent channels or scale)",
                ));
            }
        }
        Ok(Taesd {
            decoder,
            encoder,
            path: path.to_path_buf(),
            weight_bytes,
        })
    }

    /// Latent channels (4 for SD1/SD2/SDXL's TAESD).
    pub fn latent_channels(&self) -> usize {
        self.decoder
            .as_ref()
            .or(self.encoder.as_ref())
            .map_or(0, Half::latent_channels)
    }

    /// Image pixels per latent pixel (8).
    pub fn factor(&self) -> usize {
        self.decoder
            .as_ref()
            .or(self.encoder.as_ref())
            .map_or(0, Half::factor)
    }

    fn decoder(&self) -> Result<&Half> {
        self.decoder.as_ref().ok_or_else(|| {
            Error::bad_file(
                &self.path,
                "holds no TAESD decoder (give taesd_decoder.safetensors or an AutoencoderTiny)",
            )
        })
    }

    fn encoder(&self) -> Result<&Half> {
        self.encoder.as_ref().ok_or_else(|| {
            Error::bad_file(
                &self.path,
                "holds no TAESD encoder (give taesd_encoder.safetensors beside the decoder, or an AutoencoderTiny)",
            )
        })
    }

    /// diffusers' `AutoencoderTiny.decode`: sampler latents [n, c, h, w] as they are → image
    /// [n, 3, 8h, 8w] in [-1, 1] (not clamped).
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        let mut image = self.decode_01(latent)?;
        image.data.iter_mut().for_each(|v| *v = 2.0 * *v - 1.0);
        Ok(image)
    }

    /// taesd.py's `Decoder()(latent)`: the image in [0, 1] (not clamped).
    pub fn decode_01(&self, latent: &Tensor) -> Result<Tensor> {
        self.decode_01_with(latent, true)
    }

    /// `decode` on whole maps (no bands): the reference the banded decode is tested against.
    pub fn decode_unbanded(&self, latent: &Tensor) -> Result<Tensor> {
        let mut image = self.decode_01_with(latent, false)?;
        image.data.iter_mut().for_each(|v| *v = 2.0 * *v - 1.0);
        Ok(image)
    }

    /// `encode` on whole maps (no bands): the reference the banded encode is tested against.
    pub fn encode_unbanded(&self, image: &Tensor) -> Result<Tensor> {
        self.encode_with(image, false)
    }

    fn decode_01_with(&self, latent: &Tensor, banded: bool) -> Result<Tensor> {
        let decoder = self.decoder()?;
        self.check_channels(latent, decoder.latent_channels(), "latent")?;
        let clamped = Tensor::new(
            latent.shape.clone(),
            latent
                .data
                .iter()
                .map(|v| (v / LATENT_CLAMP).tanh() * LATENT_CLAMP)
                .collect(),
        );
        Ok(decoder.forward(&clamped, banded, &Ctx::from(Scratch::default())))
    }

    /// diffusers' `AutoencoderTiny.encode(image).latents`: image [n, 3, H, W] in [-1, 1] →
    /// latents in the sampler's space [n, c, H/8, W/8] (deterministic). H and W must be
    /// multiples of the scale factor.
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        self.encode_with(image, true)
    }

    fn encode_with(&self, image: &Tensor, banded: bool) -> Result<Tensor> {
        let encoder = self.encoder()?;
        self.check_channels(image, 3, "image")?;
        let (_, _, h, w) = image.nchw();
        let f = encoder.factor();
        if h % f != 0 || w % f != 0 || h == 0 || w == 0 {
            return Err(Error::BadRequest(format!(
                "TAESD encodes images whose sides are multiples of {f}, not {w}x{h}"
            )));
        }
        let x01 = Tensor::new(
            image.shape.clone(),
            image.data.iter().map(|v| (v + 1.0) / 2.0).collect(),
        );
        Ok(encoder.forward(&x01, banded, &Ctx::from(Scratch::default())))
    }

    fn check_channels(&self, x: &Tensor, c: usize, what: &str) -> Result<()> {
        if x.shape.len() != 4 || x.shape[1] != c {
            return Err(Error::BadRequest(format!(
                "TAESD ({}) takes a {what} with {c} channels, got shape {:?}",
                self.path.display(),
                x.shape
            )));
        }
        Ok(())
    }

    /// Predicted peak bytes of `decode` for a latent_h × latent_w latent (`peak_bytes`).
    pub fn decode_peak_bytes(&self, latent_h: usize, latent_w: usize) -> u64 {
        match &self.decoder {
            Some(d) => peak_bytes(Role::Decoder, &d.shapes(), latent_h, latent_w)
                .saturating_add(map_bytes(d.latent_channels(), latent_h, latent_w)),
            None => 0,
        }
    }

    /// Predicted peak bytes of `encode` for an image_h × image_w image (the [-1,1] → [0,1]
    /// copy included, the caller's image not).
    pub fn encode_peak_bytes(&self, image_h: usize, image_w: usize) -> u64 {
        match &self.encoder {
            Some(e) => peak_bytes(Role::Encoder, &e.shapes(), image_h, image_w)
                .saturating_add(map_bytes(3, image_h, image_w)),
            None => 0,
        }
    }
}

/// The standard TAESD decoder's predicted peak (`decode_peak_bytes`) for a latent_h × latent_w
/// latent, without loading one (the governor's refusal hint).
pub fn standard_decode_peak_bytes(latent_channels: usize, latent_h: usize, latent_w: usize) -> u64 {
    let shapes = LayerShape::standard_decoder(latent_channels);
    peak_bytes(Role::Decoder, &shapes, latent_h, latent_w).saturating_add(map_bytes(
        latent_channels,
        latent_h,
        latent_w,
    ))
}

/// The files `--taesd PATH` names.
fn taesd_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_dir() {
        let diffusers = path.join("diffusion_pytorch_model.safetensors");
        if diffusers.is_file() {
            return Ok(vec![diffusers]);
        }
        let originals: Vec<PathBuf> = [
            "taesd_decoder",
            "taesd_encoder",
            "taesdxl_decoder",
            "taesdxl_encoder",
        ]
        .iter()
        .map(|n| path.join(format!("{n}.safetensors")))
        .filter(|p| p.is_file())
        .collect();
        if originals.is_empty() {
            return Err(Error::bad_file(
                path,
                "a folder without diffusion_pytorch_model.safetensors or taesd_decoder.safetensors: not a TAESD",
            ));
        }
        return Ok(originals);
    }
    let mut files = vec![path.to_path_buf()];
    // The original layout comes as two files side by side: read the other half too.
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let other = if name.contains("decoder") {
        Some(name.replacen("decoder", "encoder", 1))
    } else if name.contains("encoder") {
        Some(name.replacen("encoder", "decoder", 1))
    } else {
        None
    };
    if let Some(sibling) = other.map(|o| path.with_file_name(o)) {
        if sibling.is_file() {
            files.push(sibling);
        }
    }
    Ok(files)
}

/// Which halves a store holds, and their key prefixes: diffusers' `decoder.layers` /
/// `encoder.layers`, or an original file (keys `N.*`): an encoder starts with conv `0`, a decoder
/// with conv `1` (its index 0 is the parameter-free Clamp). `Half::check` then checks the ends.
fn halves_of(store: &TensorStore, keys: &[String]) -> Vec<(Role, &'static str)> {
    let mut halves = Vec::new();
    if keys.iter().any(|k| k.starts_with("decoder.layers.")) {
        halves.push((Role::Decoder, "decoder.layers"));
    }
    if keys.iter().any(|k| k.starts_with("encoder.layers.")) {
        halves.push((Role::Encoder, "encoder.layers"));
    }
    if !halves.is_empty() {
        return halves;
    }
    let all_indexed = !keys.is_empty()
        && keys.iter().all(|k| {
            k.split('.')
                .next()
                .is_some_and(|n| n.parse::<usize>().is_ok())
        });
    if !all_indexed {
        return halves;
    }
    if store.contains("0.weight") {
        halves.push((Role::Encoder, ""));
    } else if store.contains("1.weight") {
        halves.push((Role::Decoder, ""));
    }
    halves
}
