//! The basic layers, each built from its weights by key prefix and checked for shape up front.
//!
//! Elementwise work (bias, residual, time embedding, layout changes) is done in one parallel pass
//! after each product, in the f32 operations and order an unfused pass would use, so fusing does
//! not change results.

use std::borrow::Cow;

use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::{
    self, Conv2dGeometry, FeatureRows, InputTransform, Resize, RowConv, WeightRows, WinogradInput,
};
use crate::nn::Ctx;
use crate::tensor::{zeroed, Tensor};
use crate::weights::{Param, Weights};

/// Values per parallel task of an elementwise pass (64 KiB of f32): small enough to spread any
/// UNet map over the threads, large enough that scheduling costs nothing.
const PASS_VALUES: usize = 1 << 14;

/// Rows of `row_len` values per parallel task.
fn rows_per_task(row_len: usize) -> usize {
    (PASS_VALUES / row_len.max(1)).max(1)
}

/// y = x·Wᵀ + b over rows of a [rows, in] buffer. Also accepts a 1×1 conv weight [out, in, 1, 1].
pub struct Linear {
    weight: Param,
    bias: Option<Param>,
    pub in_dim: usize,
    pub out_dim: usize,
}

impl Linear {
    pub fn new(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Ok(Linear {
            weight: w.param("weight", &[out_dim, in_dim])?,
            bias: if bias {
                Some(w.param("bias", &[out_dim])?)
            } else {
                None
            },
            in_dim,
            out_dim,
        })
    }

    /// A layer over weights found another way (e.g. row ranges of a fused weight): `weight`
    /// [out, in], `bias` [out].
    pub fn from_params(weight: Param, bias: Option<Param>) -> Result<Self> {
        let &[out_dim, in_dim] = weight.shape() else {
            return Err(crate::Error::BadShape {
                name: weight.info().name.clone(),
                found: weight.shape().to_vec(),
                expected: vec![0, 0],
            });
        };
        if let Some(b) = bias.as_ref().filter(|b| b.shape() != [out_dim]) {
            return Err(crate::Error::BadShape {
                name: b.info().name.clone(),
                found: b.shape().to_vec(),
                expected: vec![out_dim],
            });
        }
        Ok(Linear {
            weight,
            bias,
            in_dim,
            out_dim,
        })
    }

    /// Reads the dimensions from the stored weight.
    pub fn from_weights(w: &Weights, bias: bool) -> Result<Self> {
        let shape = w.param_any("weight")?.shape().to_vec();
        let (out_dim, in_dim) = (shape[0], shape.get(1).copied().unwrap_or(1));
        Self::new(w, in_dim, out_dim, bias)
    }

    /// `x·Wᵀ + b`, the product within the budgets of `scratch` (as every layer's forward call).
    pub fn forward(&self, x: &[f32], cx: &Ctx) -> Vec<f32> {
        let mut y = self.product(x, cx);
        if let Some(b) = self.bias() {
            let rows = rows_per_task(self.out_dim);
            y.par_chunks_mut(rows * self.out_dim).for_each(|chunk| {
                for row in chunk.chunks_mut(self.out_dim) {
                    row.iter_mut().zip(&b).for_each(|(v, bv)| *v += bv);
                }
            });
        }
        y
    }

    /// `residual += x·Wᵀ + b`: bias and residual added in one pass over the product (the same
    /// f32 operations as `forward` followed by `add_assign`).
    pub fn forward_add_to(&self, x: &[f32], residual: &mut [f32], cx: &Ctx) {
        let y = self.product(x, cx);
        assert_eq!(y.len(), residual.len(), "linear residual size");
        let bias = self.bias().unwrap_or_else(|| vec![0.0; self.out_dim]);
        let rows = rows_per_task(self.out_dim) * self.out_dim;
        residual
            .par_chunks_mut(rows)
            .zip(y.par_chunks(rows))
            .for_each(|(r, y)| {
                for (r, y) in r.chunks_mut(self.out_dim).zip(y.chunks(self.out_dim)) {
                    for ((r, &y), &b) in r.iter_mut().zip(y).zip(&bias) {
                        *r += y + b;
                    }
                }
            });
    }

    /// `x·Wᵀ` without the bias, [rows, out_dim].
    pub fn product(&self, x: &[f32], cx: &Ctx) -> Vec<f32> {
        let rows = x.len() / self.in_dim;
        assert_eq!(rows * self.in_dim, x.len(), "linear input width");
        let mut y = zeroed(rows * self.out_dim);
        match &cx.lora {
            None => kernels::weight_product(x, &self.weight, &mut y, &cx.scratch, cx.precision),
            Some(set) => {
                let w = set.weight(&self.weight);
                kernels::weight_product(x, &w, &mut y, &cx.scratch, cx.precision);
                set.add_linear(&self.weight, x, &mut y);
            }
        }
        y
    }

    /// The bias as f32 values, if the layer has one.
    pub fn bias(&self) -> Option<Vec<f32>> {
        self.bias.as_ref().map(Param::to_f32)
    }
}

/// 2-D convolution with a square kernel.
pub struct Conv2d {
    weight: Param,
    /// None for the convolutions stored without one (TAESD's resampling convs).
    bias: Option<Param>,
    geo: Conv2dGeometry,
    pub in_ch: usize,
    pub out_ch: usize,
}

impl Conv2d {
    pub fn new(
        w: &Weights,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        Ok(Conv2d {
            weight: w.param("weight", &[out_ch, in_ch, kernel, kernel])?,
            bias: Some(w.param("bias", &[out_ch])?),
            geo: Conv2dGeometry {
                kernel,
                stride,
                pad,
            },
            in_ch,
            out_ch,
        })
    }

    /// Reads channels and kernel size from the stored weight (stride and padding are the caller's).
    pub fn from_weights(w: &Weights, stride: usize, pad: usize) -> Result<Self> {
        let shape = w.param_any("weight")?.shape().to_vec();
        if shape.len() != 4 || shape[2] != shape[3] {
            return Err(crate::Error::BadShape {
                name: format!("{}.weight", w.prefix()),
                found: shape,
                expected: vec![0, 0, 3, 3],
            });
        }
        Self::new(w, shape[1], shape[0], shape[2], stride, pad)
    }

    /// As `from_weights`, for a convolution stored without a bias (`{prefix}.bias` absent).
    pub fn from_weights_without_bias(w: &Weights, stride: usize, pad: usize) -> Result<Self> {
        let shape = w.param_any("weight")?.shape().to_vec();
        if shape.len() != 4 || shape[2] != shape[3] {
            return Err(crate::Error::BadShape {
                name: format!("{}.weight", w.prefix()),
                found: shape,
                expected: vec![0, 0, 3, 3],
            });
        }
        Ok(Conv2d {
            weight: w.param_any("weight")?,
            bias: None,
            geo: Conv2dGeometry {
                kernel: shape[2],
                stride,
                pad,
            },
            in_ch: shape[1],
            out_ch: shape[0],
        })
    }

    pub fn forward(&self, x: &Tensor, cx: &Ctx) -> Tensor {
        let mut y = self.product(MapRef::One(x), &ReadAs::default(), cx);
        if self.bias.is_some() {
            add_channel_bias(&mut y, &self.bias());
        }
        y
    }

    /// The convolution of `x` read through `read` (per-image GroupNorm + SiLU, resize), without
    /// the bias, which the caller adds in its own pass (`bias`). The normalised or upsampled map is
    /// never stored.
    pub fn product(&self, x: MapRef, read: &ReadAs, cx: &Ctx) -> Tensor {
        match &cx.lora {
            None => self.product_of(&self.weight, x, read, cx),
            Some(set) => {
                let y = self.product_of(&set.conv_weight(&self.weight), x, read, cx);
                set.finish_conv(&self.weight, y)
            }
        }
    }

    /// `product` with the weight read through `weight` (the stored one, or with LoRA rows added).
    fn product_of(&self, weight: &dyn WeightRows, x: MapRef, read: &ReadAs, cx: &Ctx) -> Tensor {
        let (n, c, h, w) = x.nchw();
        assert_eq!(c, self.in_ch, "conv input channels");
        // On AMX bf16 tiles every convolution is an implicit GEMM (the tiles outrun f32 Winograd).
        let tiles = cx.precision.bf16_convs();
        if let (MapRef::One(x), None, Resize::None, false) = (x, &read.norm, read.resize, tiles) {
            return kernels::conv2d(x, weight, None, self.geo, &cx.scratch);
        }
        let transform = |b: usize| InputTransform {
            affine: read
                .norm
                .as_ref()
                .map(|norm| (&norm[b].0[..], &norm[b].1[..])),
            silu: read.silu,
            resize: read.resize,
        };
        let images: Vec<ImageRows> = (0..n).map(|b| x.image(b)).collect();
        let (sh, sw) = read.resize.seen(h, w);
        let seen = (n, c, sh, sw);
        let winograd = kernels::winograd_choice(self.geo, seen, weight.rows()).filter(|_| !tiles);
        if let Some(tile) = winograd {
            let inputs: Vec<WinogradInput> = images
                .iter()
                .enumerate()
                .map(|(b, image)| (image as &dyn FeatureRows, transform(b)))
                .collect();
            return kernels::conv3x3_winograd_read(&inputs, weight, None, tile, &cx.scratch);
        }
        let (oh, ow) = self.geo.out_size(sh, sw);
        let co = weight.rows();
        let mut out = Tensor::zeros(vec![n, co, oh, ow]);
        let mut conv = RowConv::new_in(weight, None, self.geo, &cx.scratch, cx.precision);
        for (b, out) in out.data.chunks_mut(co * oh * ow).enumerate() {
            conv.rows(&images[b], transform(b), 0..oh, out);
        }
        out
    }

    /// The kernel's side.
    pub fn kernel(&self) -> usize {
        self.geo.kernel
    }

    /// The bias (zeros for a convolution stored without one).
    pub fn bias(&self) -> Vec<f32> {
        self.bias
            .as_ref()
            .map_or_else(|| vec![0.0; self.out_ch], Param::to_f32)
    }
}

/// How a convolution reads its input (`Conv2d::product`).
#[derive(Default)]
pub struct ReadAs {
    /// Per image, per channel `(scale, shift)` of a GroupNorm (`GroupNorm::scale_shift`).
    pub norm: Option<Vec<(Vec<f32>, Vec<f32>)>>,
    /// SiLU after the norm.
    pub silu: bool,
    /// Nearest-neighbour resize: 2×, or to a given size (a UNet upsampler meeting an odd skip).
    pub resize: Resize,
}

/// `v += bias[c]` over every plane of an NCHW map, in parallel.
pub fn add_channel_bias(x: &mut Tensor, bias: &[f32]) {
    assert_eq!(x.shape[1], bias.len(), "bias size");
    for_each_plane(x, |_, ch, plane| {
        let b = bias[ch];
        plane.iter_mut().for_each(|v| *v += b);
    });
}

/// Runs `f(image, channel, plane)` over every plane of an NCHW map, planes split across threads.
pub fn for_each_plane(x: &mut Tensor, f: impl Fn(usize, usize, &mut [f32]) + Sync) {
    let (_, c, h, w) = x.nchw();
    let plane = (h * w).max(1);
    let planes_per_task = rows_per_task(plane);
    x.data
        .par_chunks_mut(planes_per_task * plane)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (i, p) in chunk.chunks_mut(plane).enumerate() {
                let index = task * planes_per_task + i;
                f(index / c, index % c, p);
            }
        });
}

/// An NCHW map as a layer reads it: one tensor, or two concatenated along channels (a UNet output
/// block's input: the previous output and the skip connection), never copied into one.
#[derive(Clone, Copy)]
pub enum MapRef<'a> {
    One(&'a Tensor),
    Concat(&'a Tensor, &'a Tensor),
}

impl<'a> MapRef<'a> {
    pub fn nchw(&self) -> (usize, usize, usize, usize) {
        match self {
            MapRef::One(x) => x.nchw(),
            MapRef::Concat(a, b) => {
                let ((n, ca, h, w), (nb, cb, hb, wb)) = (a.nchw(), b.nchw());
                assert_eq!((n, h, w), (nb, hb, wb), "concat shapes");
                (n, ca + cb, h, w)
            }
        }
    }

    /// Image `b` as rows: [c, h, w].
    pub fn image(&self, b: usize) -> ImageRows<'a> {
        let (_, c, h, w) = self.nchw();
        let image = |x: &'a Tensor| {
            let size = x.shape[1] * h * w;
            &x.data[b * size..(b + 1) * size]
        };
        let (first, second) = match self {
            MapRef::One(x) => (image(x), &[][..]),
            MapRef::Concat(a, bt) => (image(a), image(bt)),
        };
        ImageRows {
            first,
            second,
            dims: (c, h, w),
        }
    }

    /// The map as one tensor (copies only a concatenation).
    pub fn contiguous(&self) -> Cow<'a, Tensor> {
        match *self {
            MapRef::One(x) => Cow::Borrowed(x),
            MapRef::Concat(..) => {
                let (n, c, h, w) = self.nchw();
                let mut data = Vec::with_capacity(n * c * h * w);
                for b in 0..n {
                    let image = self.image(b);
                    data.extend_from_slice(image.first);
                    data.extend_from_slice(image.second);
                }
                Cow::Owned(Tensor::new(vec![n, c, h, w], data))
            }
        }
    }
}

/// One image of a `MapRef`: channels of the first tensor, then of the second.
pub struct ImageRows<'a> {
    first: &'a [f32],
    second: &'a [f32],
    dims: (usize, usize, usize),
}

impl ImageRows<'_> {
    /// Channel `c`'s plane (h · w values).
    pub fn plane(&self, c: usize) -> &[f32] {
        let (_, h, w) = self.dims;
        let hw = h * w;
        let first_c = self.first.len() / hw.max(1);
        if c < first_c {
            &self.first[c * hw..(c + 1) * hw]
        } else {
            &self.second[(c - first_c) * hw..(c - first_c + 1) * hw]
        }
    }
}

impl FeatureRows for ImageRows<'_> {
    fn dims(&self) -> (usize, usize, usize) {
        self.dims
    }
    fn row(&self, c: usize, y: usize) -> &[f32] {
        let w = self.dims.2;
        &self.plane(c)[y * w..(y + 1) * w]
    }
}

/// GroupNorm with affine parameters.
pub struct GroupNorm {
    gamma: Param,
    beta: Param,
    groups: usize,
    eps: f32,
}

impl GroupNorm {
    pub fn new(w: &Weights, channels: usize, groups: usize, eps: f32) -> Result<Self> {
        Ok(GroupNorm {
            gamma: w.param("weight", &[channels])?,
            beta: w.param("bias", &[channels])?,
            groups,
            eps,
        })
    }

    /// Per-channel `(scale, shift)` of one image: normalised = v · scale + shift (γ, β folded in),
    /// for a convolution or a layout change to apply while reading.
    pub fn scale_shift(&self, image: &dyn FeatureRows) -> (Vec<f32>, Vec<f32>) {
        kernels::group_norm_stats(image, self.groups, self.eps)
            .scale_shift(&self.gamma.to_f32(), &self.beta.to_f32())
    }

    /// `scale_shift` of every image of `x`, as `ReadAs::norm` takes them.
    pub fn per_image(&self, x: MapRef) -> Vec<(Vec<f32>, Vec<f32>)> {
        let n = x.nchw().0;
        (0..n).map(|b| self.scale_shift(&x.image(b))).collect()
    }

    /// Normalises `x` in place, optionally applying SiLU after.
    pub fn forward(&self, x: &mut Tensor, then_silu: bool) {
        kernels::group_norm(
            x,
            self.groups,
            &self.gamma.to_f32(),
            &self.beta.to_f32(),
            self.eps,
            then_silu,
        );
    }
}

/// LayerNorm over the last dimension.
pub struct LayerNorm {
    gamma: Param,
    beta: Param,
    dim: usize,
    eps: f32,
}

impl LayerNorm {
    pub fn new(w: &Weights, dim: usize, eps: f32) -> Result<Self> {
        Ok(LayerNorm {
            gamma: w.param("weight", &[dim])?,
            beta: w.param("bias", &[dim])?,
            dim,
            eps,
        })
    }

    pub fn forward(&self, x: &mut [f32]) {
        kernels::layer_norm(
            x,
            self.dim,
            &self.gamma.to_f32(),
            &self.beta.to_f32(),
            self.eps,
        );
    }

    /// `out = LayerNorm(x)` (the same values as `forward` on a copy, without the copy).
    pub fn forward_to(&self, x: &[f32], out: &mut [f32]) {
        kernels::layer_norm_to(
            x,
            out,
            self.dim,
            &self.gamma.to_f32(),
            &self.beta.to_f32(),
            self.eps,
        );
    }
}

/// [n, c, h, w] → [n, h·w, c] (image to token sequence).
pub fn to_tokens(x: &Tensor) -> Vec<f32> {
    to_tokens_with(x, |_, _, v| v)
}

/// Tokens per task of a layout change (a [32, c] block of the token sequence stays in L2).
const TOKEN_BLOCK: usize = 32;
/// Channel planes per task of a layout change back to NCHW.
const PLANE_BLOCK: usize = 16;

/// `to_tokens` with `f(image, channel, value)` applied on the way (e.g. a GroupNorm's scale/shift).
pub fn to_tokens_with(x: &Tensor, f: impl Fn(usize, usize, f32) -> f32 + Sync) -> Vec<f32> {
    let (_, c, h, w) = x.nchw();
    let hw = h * w;
    let mut out = zeroed(x.numel());
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(hw * c)
        .zip(x.data.par_chunks(c * hw))
        .enumerate()
        .for_each(|(b, (dst, src))| {
            dst.par_chunks_mut(TOKEN_BLOCK * c)
                .enumerate()
                .for_each(|(block, dst)| {
                    let p0 = block * TOKEN_BLOCK;
                    for ch in 0..c {
                        let plane = &src[ch * hw + p0..ch * hw + p0 + dst.len() / c];
                        for (token, &v) in dst.chunks_exact_mut(c).zip(plane) {
                            token[ch] = f(b, ch, v);
                        }
                    }
                });
        });
    out
}

/// [n, h·w, c] → [n, c, h, w] (token sequence back to image).
pub fn from_tokens(tokens: &[f32], n: usize, c: usize, h: usize, w: usize) -> Tensor {
    from_tokens_with(tokens, n, c, h, w, |_, _, _, v| v)
}

/// `from_tokens` with `f(image, channel, pixel, value)` applied on the way (e.g. bias + residual).
pub fn from_tokens_with(
    tokens: &[f32],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    f: impl Fn(usize, usize, usize, f32) -> f32 + Sync,
) -> Tensor {
    let hw = h * w;
    assert_eq!(tokens.len(), n * c * hw, "token count");
    let mut out = Tensor::zeros(vec![n, c, h, w]);
    if hw == 0 {
        return out;
    }
    out.data
        .par_chunks_mut(PLANE_BLOCK * hw)
        .enumerate()
        .for_each(|(block, dst)| {
            let first = block * PLANE_BLOCK;
            let planes = dst.len() / hw;
            for p in 0..hw {
                for j in 0..planes {
                    let (b, ch) = ((first + j) / c, (first + j) % c);
                    dst[j * hw + p] = f(b, ch, p, tokens[(b * hw + p) * c + ch]);
                }
            }
        });
    out
}

/// `a += b` elementwise.
pub fn add_assign(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    a.par_chunks_mut(PASS_VALUES)
        .zip(b.par_chunks(PASS_VALUES))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(x, y)| *x += y));
}

/// Weights are read by the kernels one panel of output rows at a time.
impl WeightRows for Param {
    fn rows(&self) -> usize {
        Param::rows(self)
    }
    fn row_len(&self) -> usize {
        Param::row_len(self)
    }
    fn read_rows(&self, first: usize, count: usize, out: &mut [f32]) {
        Param::read_rows(self, first, count, out)
    }
    fn blocks(&self, first: usize, count: usize) -> Option<(crate::weights::DType, &[u8])> {
        Param::stored_rows(self, first, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_layout_changes_match_the_definition_at_odd_sizes() {
        // Channels not a multiple of the plane block, pixels not a multiple of the token block.
        let (n, c, h, w) = (2, 19, 5, 7);
        let hw = h * w;
        let x = Tensor::new(
            vec![n, c, h, w],
            (0..n * c * hw).map(|i| i as f32 * 0.5 - 7.0).collect(),
        );
        let tokens = to_tokens(&x);
        for b in 0..n {
            for ch in 0..c {
                for p in 0..hw {
                    assert_eq!(tokens[(b * hw + p) * c + ch], x.data[(b * c + ch) * hw + p]);
                }
            }
        }
        assert_eq!(from_tokens(&tokens, n, c, h, w), x);
        let shifted = from_tokens_with(&tokens, n, c, h, w, |b, ch, p, v| {
            v - x.data[(b * c + ch) * hw + p] + ch as f32
        });
        for (i, v) in shifted.data.iter().enumerate() {
            assert_eq!(*v, ((i / hw) % c) as f32);
        }
    }

    #[test]
    fn a_concatenation_reads_as_the_copied_map() {
        let a = Tensor::new(vec![2, 3, 2, 2], (0..24).map(|i| i as f32).collect());
        let b = Tensor::new(vec![2, 1, 2, 2], (0..8).map(|i| -(i as f32)).collect());
        let map = MapRef::Concat(&a, &b);
        let joined = map.contiguous();
        assert_eq!(joined.shape, [2, 4, 2, 2]);
        for img in 0..2 {
            let rows = map.image(img);
            for ch in 0..4 {
                let want = &joined.data[(img * 4 + ch) * 4..(img * 4 + ch + 1) * 4];
                assert_eq!(rows.plane(ch), want);
                assert_eq!(rows.row(ch, 1), &want[2..]);
            }
        }
    }
}
