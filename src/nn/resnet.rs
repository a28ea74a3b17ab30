//! The ResNet block shared by the UNet (with a timestep embedding) and the VAE (without).

use super::layers::{for_each_plane, Conv2d, GroupNorm, Linear, MapRef, ReadAs};
use crate::error::Result;
use crate::kernels::Resize;
use crate::nn::Ctx;
use crate::tensor::Tensor;
use crate::weights::Weights;

/// GroupNorm → SiLU → conv → (+ time embedding) → GroupNorm → SiLU → conv, plus a (projected) skip.
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    skip: Option<Conv2d>,
    pub in_ch: usize,
    pub out_ch: usize,
}

impl ResnetBlock {
    /// LDM UNet naming: `in_layers.{0,2}`, `emb_layers.1`, `out_layers.{0,3}`, `skip_connection`.
    pub fn unet(w: &Weights, temb_dim: usize, groups: usize, eps: f32) -> Result<Self> {
        let conv1 = Conv2d::from_weights(&w.pp("in_layers.2"), 1, 1)?;
        let (in_ch, out_ch) = (conv1.in_ch, conv1.out_ch);
        Ok(ResnetBlock {
            norm1: GroupNorm::new(&w.pp("in_layers.0"), in_ch, groups, eps)?,
            conv1,
            time_proj: Some(Linear::new(&w.pp("emb_layers.1"), temb_dim, out_ch, true)?),
            norm2: GroupNorm::new(&w.pp("out_layers.0"), out_ch, groups, eps)?,
            conv2: Conv2d::new(&w.pp("out_layers.3"), out_ch, out_ch, 3, 1, 1)?,
            skip: optional_skip(w, "skip_connection", in_ch, out_ch)?,
            in_ch,
            out_ch,
        })
    }

    /// LDM VAE naming: `norm1`, `conv1`, `norm2`, `conv2`, `nin_shortcut`.
    pub fn vae(w: &Weights, groups: usize, eps: f32) -> Result<Self> {
        let conv1 = Conv2d::from_weights(&w.pp("conv1"), 1, 1)?;
        let (in_ch, out_ch) = (conv1.in_ch, conv1.out_ch);
        Ok(ResnetBlock {
            norm1: GroupNorm::new(&w.pp("norm1"), in_ch, groups, eps)?,
            conv1,
            time_proj: None,
            norm2: GroupNorm::new(&w.pp("norm2"), out_ch, groups, eps)?,
            conv2: Conv2d::new(&w.pp("conv2"), out_ch, out_ch, 3, 1, 1)?,
            skip: optional_skip(w, "nin_shortcut", in_ch, out_ch)?,
            in_ch,
            out_ch,
        })
    }

    /// `silu_temb` is SiLU(time embedding) [n, temb_dim], required for UNet blocks.
    /// Kernels work within the budgets of `scratch`.
    pub fn forward(&self, x: &Tensor, silu_temb: Option<&[f32]>, cx: &Ctx) -> Tensor {
        self.forward_map(MapRef::One(x), silu_temb, cx)
    }

    /// As `forward`, on a map that may be a concatenation (a UNet output block's input). Each
    /// GroupNorm + SiLU is applied by the following convolution as it reads its input, and biases,
    /// time embedding and skip are added in one pass after each convolution, in the order the
    /// unfused layers add them.
    pub fn forward_map(&self, x: MapRef, silu_temb: Option<&[f32]>, cx: &Ctx) -> Tensor {
        let c = self.out_ch;
        let read_normed = |norm: &GroupNorm, x: MapRef| ReadAs {
            norm: Some(norm.per_image(x)),
            silu: true,
            resize: Resize::None,
        };
        let mut h = self.conv1.product(x, &read_normed(&self.norm1, x), cx);
        let bias1 = self.conv1.bias();
        match &self.time_proj {
            Some(proj) => {
                let temb = silu_temb.expect("UNet resnet needs a time embedding");
                let temb = proj.forward(temb, &cx.exact());
                for_each_plane(&mut h, |b, ch, plane| {
                    let (bias, t) = (bias1[ch], temb[b * c + ch]);
                    plane.iter_mut().for_each(|v| *v = (*v + bias) + t);
                });
            }
            None => for_each_plane(&mut h, |_, ch, plane| {
                plane.iter_mut().for_each(|v| *v += bias1[ch]);
            }),
        }
        let read = read_normed(&self.norm2, MapRef::One(&h));
        let mut out = self.conv2.product(MapRef::One(&h), &read, cx);
        drop(h);
        let bias2 = self.conv2.bias();
        match &self.skip {
            Some(skip) => {
                let projected = skip.product(x, &ReadAs::default(), cx);
                let skip_bias = skip.bias();
                let hw = projected.data.len() / (projected.shape[0] * c).max(1);
                for_each_plane(&mut out, |b, ch, plane| {
                    let at = (b * c + ch) * hw;
                    let s = &projected.data[at..at + hw];
                    let (bias, skip_bias) = (bias2[ch], skip_bias[ch]);
                    for (v, &s) in plane.iter_mut().zip(s) {
                        *v = (*v + bias) + (s + skip_bias);
                    }
                });
            }
            None => for_each_plane(&mut out, |b, ch, plane| {
                let bias = bias2[ch];
                for (v, &s) in plane.iter_mut().zip(x.image(b).plane(ch)) {
                    *v = (*v + bias) + s;
                }
            }),
        }
        out
    }
}

fn optional_skip(w: &Weights, name: &str, in_ch: usize, out_ch: usize) -> Result<Option<Conv2d>> {
    if in_ch == out_ch && !w.contains(&format!("{name}.weight")) {
        return Ok(None);
    }
    Ok(Some(Conv2d::new(&w.pp(name), in_ch, out_ch, 1, 1, 0)?))
}
