//! The ResNet block shared by the UNet (with a timestep embedding) and the VAE (without).

use super::layers::{add_assign, Conv2d, GroupNorm, Linear};
use crate::error::Result;
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
    pub fn forward(&self, x: &Tensor, silu_temb: Option<&[f32]>) -> Tensor {
        let mut h = x.clone();
        self.norm1.forward(&mut h, true);
        let mut h = self.conv1.forward(&h);
        if let Some(proj) = &self.time_proj {
            let temb = proj.forward(silu_temb.expect("UNet resnet needs a time embedding"));
            let (n, c, hh, ww) = h.nchw();
            for b in 0..n {
                for ch in 0..c {
                    let t = temb[b * c + ch];
                    let plane = &mut h.data[(b * c + ch) * hh * ww..(b * c + ch + 1) * hh * ww];
                    plane.iter_mut().for_each(|v| *v += t);
                }
            }
        }
        self.norm2.forward(&mut h, true);
        let mut h = self.conv2.forward(&h);
        match &self.skip {
            Some(skip) => add_assign(&mut h.data, &skip.forward(x).data),
            None => add_assign(&mut h.data, &x.data),
        }
        h
    }
}

fn optional_skip(w: &Weights, name: &str, in_ch: usize, out_ch: usize) -> Result<Option<Conv2d>> {
    if in_ch == out_ch && !w.contains(&format!("{name}.weight")) {
        return Ok(None);
    }
    Ok(Some(Conv2d::new(&w.pp(name), in_ch, out_ch, 1, 1, 0)?))
}
