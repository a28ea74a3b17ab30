//! The basic layers, each built from its weights by key prefix and checked for shape up front.

use crate::error::Result;
use crate::kernels::{self, Conv2dGeometry, WeightRows};
use crate::tensor::Tensor;
use crate::weights::{Param, Weights};

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

    /// Reads the dimensions from the stored weight.
    pub fn from_weights(w: &Weights, bias: bool) -> Result<Self> {
        let shape = w.param_any("weight")?.shape().to_vec();
        let (out_dim, in_dim) = (shape[0], shape.get(1).copied().unwrap_or(1));
        Self::new(w, in_dim, out_dim, bias)
    }

    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.in_dim;
        assert_eq!(rows * self.in_dim, x.len(), "linear input width");
        let mut y = vec![0.0; rows * self.out_dim];
        kernels::matmul_weight_t(x, &self.weight, &mut y);
        if let Some(b) = &self.bias {
            let b = b.to_f32();
            for row in y.chunks_mut(self.out_dim) {
                row.iter_mut().zip(&b).for_each(|(v, bv)| *v += bv);
            }
        }
        y
    }
}

/// 2-D convolution with a square kernel.
pub struct Conv2d {
    weight: Param,
    bias: Param,
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
            bias: w.param("bias", &[out_ch])?,
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

    pub fn forward(&self, x: &Tensor) -> Tensor {
        assert_eq!(x.shape[1], self.in_ch, "conv input channels");
        kernels::conv2d(x, &self.weight, Some(&self.bias.to_f32()), self.geo)
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
}

/// [n, c, h, w] → [n, h·w, c] (image to token sequence).
pub fn to_tokens(x: &Tensor) -> Vec<f32> {
    let (n, c, h, w) = x.nchw();
    let hw = h * w;
    let mut out = vec![0.0; x.numel()];
    for b in 0..n {
        let src = &x.data[b * c * hw..(b + 1) * c * hw];
        let dst = &mut out[b * c * hw..(b + 1) * c * hw];
        for ch in 0..c {
            for p in 0..hw {
                dst[p * c + ch] = src[ch * hw + p];
            }
        }
    }
    out
}

/// [n, h·w, c] → [n, c, h, w] (token sequence back to image).
pub fn from_tokens(tokens: &[f32], n: usize, c: usize, h: usize, w: usize) -> Tensor {
    let hw = h * w;
    let mut out = Tensor::zeros(vec![n, c, h, w]);
    for b in 0..n {
        let src = &tokens[b * c * hw..(b + 1) * c * hw];
        let dst = &mut out.data[b * c * hw..(b + 1) * c * hw];
        for p in 0..hw {
            for ch in 0..c {
                dst[ch * hw + p] = src[p * c + ch];
            }
        }
    }
    out
}

/// Nearest-neighbour 2× upsampling of an NCHW tensor.
pub fn upsample_nearest2x(x: &Tensor) -> Tensor {
    let (n, c, h, w) = x.nchw();
    let mut out = Tensor::zeros(vec![n, c, 2 * h, 2 * w]);
    for (src, dst) in x.data.chunks(h * w).zip(out.data.chunks_mut(4 * h * w)) {
        for y in 0..2 * h {
            for xx in 0..2 * w {
                dst[y * 2 * w + xx] = src[(y / 2) * w + xx / 2];
            }
        }
    }
    out
}

/// Concatenates two NCHW tensors of equal n, h, w along channels.
pub fn concat_channels(a: &Tensor, b: &Tensor) -> Tensor {
    let (n, ca, h, w) = a.nchw();
    let (nb, cb, hb, wb) = b.nchw();
    assert_eq!((n, h, w), (nb, hb, wb), "concat shapes");
    let mut data = Vec::with_capacity(a.numel() + b.numel());
    for i in 0..n {
        data.extend_from_slice(&a.data[i * ca * h * w..(i + 1) * ca * h * w]);
        data.extend_from_slice(&b.data[i * cb * h * w..(i + 1) * cb * h * w]);
    }
    Tensor::new(vec![n, ca + cb, h, w], data)
}

/// `a += b` elementwise.
pub fn add_assign(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
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
}
