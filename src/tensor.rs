//! A plain owned f32 activation tensor (row-major, PyTorch dimension order).

use rayon::prelude::*;

/// `len` zeros. Large buffers are zeroed by all threads: a memset of every layer's output and
/// weight panel on the calling thread alone was the largest serial part of a UNet step left.
pub fn zeroed(len: usize) -> Vec<f32> {
    const SERIAL_BELOW: usize = 1 << 16;
    if len < SERIAL_BELOW {
        return vec![0.0; len];
    }
    let mut v = Vec::with_capacity(len);
    v.par_extend(rayon::iter::repeat_n(0.0f32, len));
    v
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape {shape:?} does not match {} values",
            data.len()
        );
        Tensor { shape, data }
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Tensor {
            shape,
            data: zeroed(n),
        }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// (n, c, h, w) of an NCHW tensor.
    pub fn nchw(&self) -> (usize, usize, usize, usize) {
        assert_eq!(self.shape.len(), 4, "expected NCHW, got {:?}", self.shape);
        (self.shape[0], self.shape[1], self.shape[2], self.shape[3])
    }

    /// Largest absolute difference to `other` (shapes must match).
    pub fn max_abs_diff(&self, other: &Tensor) -> f32 {
        assert_eq!(self.shape, other.shape);
        self.data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    pub fn max_abs(&self) -> f32 {
        self.data.iter().map(|v| v.abs()).fold(0.0, f32::max)
    }
}
