//! The start picture of an img2img or inpainting job, as tensors.

use crate::tensor::Tensor;

pub struct InitImage {
    pub image: Tensor,        /* [1,3,H,W] in [-1,1] */
    pub mask: Option<Tensor>, /* [1,1,H,W] 0..1, 1 = repaint */
    pub resized_from: Option<(u32, u32)>,
}
