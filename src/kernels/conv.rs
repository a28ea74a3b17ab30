//! 2-D convolution as implicit GEMM over bounded tiles of output rows.
//!
//! Never builds a full-resolution im2col buffer: each tile gathers at most the scratch budget's
//! `conv_patch` values (the VAE's full 512² im2col would be 1.2 GB), then one GEMM computes all
//! output channels for it.
//!
//! The gather reads its input a row at a time through `FeatureRows`, so the input may be stored in
//! separate bands of rows, and through an `InputTransform`: a per-channel affine + SiLU (a GroupNorm
//! whose statistics were computed beforehand) and a nearest resize (2× or to a given size). So
//! `GroupNorm → SiLU → conv` and `upsample → conv` never materialise the normalised or the upsampled map, and
//! `RowConv::rows` computes any band of output rows into a caller's buffer.

use std::ops::Range;

use rayon::prelude::*;

use super::activation::silu_scalar;
use super::panel::{LhsPanels, WeightRows};
use super::precision::{at_width, Isa};
use super::scratch::{longest_piece, pieces, Scratch, MIN_SPLIT};
use super::winograd::{conv3x3_winograd, winograd_choice};
use crate::tensor::Tensor;

/// Kernel size, stride and zero padding of a square convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dGeometry {
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2dGeometry {
    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        (
            (h + 2 * self.pad - self.kernel) / self.stride + 1,
            (w + 2 * self.pad - self.kernel) / self.stride + 1,
        )
    }

    /// The first input row (of the map the convolution sees) that output rows from `out_row` on
    /// read: everything above it can be freed once those rows are all that is left to compute.
    pub fn first_input_row(&self, out_row: usize) -> usize {
        (out_row * self.stride).saturating_sub(self.pad)
    }
}

/// One image's feature map [channels, height, width], read a row at a time (it may live in bands).
pub trait FeatureRows: Sync {
    /// (channels, height, width)
    fn dims(&self) -> (usize, usize, usize);
    /// Row `y` of channel `c` (`width` values).
    fn row(&self, c: usize, y: usize) -> &[f32];
}

/// One image of an NCHW tensor: `[c, h, w]` contiguous.
pub struct Planes<'a> {
    data: &'a [f32],
    dims: (usize, usize, usize),
}

impl<'a> Planes<'a> {
    pub fn new(data: &'a [f32], dims: (usize, usize, usize)) -> Self {
        assert_eq!(data.len(), dims.0 * dims.1 * dims.2, "planes size");
        Planes { data, dims }
    }
}

impl FeatureRows for Planes<'_> {
    fn dims(&self) -> (usize, usize, usize) {
        self.dims
    }
    fn row(&self, c: usize, y: usize) -> &[f32] {
        let (_, h, w) = self.dims;
        &self.data[(c * h + y) * w..(c * h + y + 1) * w]
    }
}

/// How a convolution reads its input while gathering: value `v` of channel `c` becomes
/// `silu?(v · scale[c] + shift[c])` (exactly the f32 operations of `group_norm` + SiLU), and the
/// map is seen resized (`Resize`: a nearest 2× upsample, or a nearest resize to a given size).
#[derive(Clone, Copy, Debug, Default)]
pub struct InputTransform<'a> {
    /// Per input channel `(scale, shift)`.
    pub affine: Option<(&'a [f32], &'a [f32])>,
    pub silu: bool,
    pub resize: Resize,
}

/// The nearest-neighbour resize a convolution's gather applies to its input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Resize {
    /// The map as stored.
    #[default]
    None,
    /// 2× in both directions: seen pixel (y, x) is input pixel (y/2, x/2).
    Twice,
    /// To (height, width), as torch's `F.interpolate(size=(height, width), mode="nearest")`
    /// (`nearest_source`); a UNet upsampler meeting a skip of odd size (diffusers'
    /// `forward_upsample_size`). To twice the input size it is `Twice`.
    To(usize, usize),
}

impl Resize {
    /// (height, width) of the map seen when reading an `h × w` input.
    pub fn seen(self, h: usize, w: usize) -> (usize, usize) {
        match self {
            Resize::None => (h, w),
            Resize::Twice => (2 * h, 2 * w),
            Resize::To(th, tw) => (th, tw),
        }
    }

    /// The input row seen row `y` reads, of an input `input_h` rows high.
    pub fn source_row(self, y: usize, input_h: usize) -> usize {
        match self {
            Resize::None => y,
            Resize::Twice => y / 2,
            Resize::To(th, _) => nearest_source(y, input_h, th),
        }
    }
}

/// The input index output index `i` of a nearest resize from `input` to `output` reads, computed
/// as torch does (`nearest_idx` in ATen's `UpSample.h`): the same index, `i / 2` for an exact 2×,
/// else `min(floor(i · (input / output as f32)), input − 1)` in f32.
pub fn nearest_source(i: usize, input: usize, output: usize) -> usize {
    if output == input {
        i
    } else if output == 2 * input {
        i / 2
    } else {
        let scale = input as f32 / output as f32;
        ((i as f32 * scale).floor() as usize).min(input.saturating_sub(1))
    }
}

impl InputTransform<'_> {
    /// (channels, height, width) of the map the convolution sees when reading `input`.
    pub fn seen_dims(&self, input: &dyn FeatureRows) -> (usize, usize, usize) {
        let (c, h, w) = input.dims();
        let (sh, sw) = self.resize.seen(h, w);
        (c, sh, sw)
    }

    /// Whether the convolution sees its input as stored.
    pub(super) fn is_identity(&self) -> bool {
        self.affine.is_none() && !self.silu && self.resize == Resize::None
    }

    /// Transforms one input row of channel `c` into `dst` (a row of the seen map), vectorised as
    /// wide as the kernels' instruction set allows (`precision::at_width`: the same bits at every
    /// width; GroupNorm + SiLU took a tenth of a VAE decode at SSE2 width).
    pub(super) fn apply(&self, c: usize, src: &[f32], dst: &mut [f32]) {
        self.apply_with(c, src, dst, Isa::selected())
    }

    /// `apply` with the instructions of `isa` (at most `Isa::detected()`).
    fn apply_with(&self, c: usize, src: &[f32], dst: &mut [f32], isa: Isa) {
        at_width(
            isa,
            #[inline(always)]
            || self.apply_body(c, src, dst),
        )
    }

    #[inline(always)]
    fn apply_body(&self, c: usize, src: &[f32], dst: &mut [f32]) {
        let resize = self.resize;
        match (self.affine, self.silu) {
            (Some((scale, shift)), true) => {
                let (a, b) = (scale[c], shift[c]);
                map_row(src, dst, resize, |v| silu_scalar(v * a + b))
            }
            (Some((scale, shift)), false) => {
                let (a, b) = (scale[c], shift[c]);
                map_row(src, dst, resize, |v| v * a + b)
            }
            (None, true) => map_row(src, dst, resize, silu_scalar),
            (None, false) => map_row(src, dst, resize, |v| v),
        }
    }
}

#[inline(always)]
fn map_row(src: &[f32], dst: &mut [f32], resize: Resize, f: impl Fn(f32) -> f32) {
    let (w, tw) = (src.len(), dst.len());
    match resize {
        Resize::Twice => twice(src, dst, f),
        Resize::To(_, tw) if tw == 2 * w => twice(src, dst, f),
        Resize::None => once(src, dst, f),
        Resize::To(_, tw) if tw == w => once(src, dst, f),
        Resize::To(..) => {
            for (x, d) in dst.iter_mut().enumerate() {
                *d = f(src[nearest_source(x, w, tw)]);
            }
        }
    }
}

#[inline(always)]
fn twice(src: &[f32], dst: &mut [f32], f: impl Fn(f32) -> f32) {
    for (pair, &v) in dst.chunks_exact_mut(2).zip(src) {
        let y = f(v);
        pair[0] = y;
        pair[1] = y;
    }
}

#[inline(always)]
fn once(src: &[f32], dst: &mut [f32], f: impl Fn(f32) -> f32) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = f(v);
    }
}

/// Output rows per tile (one GEMM call) for a convolution with `k_dim` = in_ch · k · k: as many
/// as `budget` values of patch allow, but at least `MIN_SPLIT` columns, so that every tiling gives
/// the same bits (`scratch`).
fn tile_rows(k_dim: usize, out_h: usize, out_w: usize, budget: usize) -> usize {
    (budget / (k_dim * out_w).max(1))
        .max(min_tile_rows(out_w))
        .clamp(1, out_h.max(1))
}

/// The fewest output rows that make more than 64 GEMM columns.
fn min_tile_rows(out_w: usize) -> usize {
    MIN_SPLIT.div_ceil(out_w.max(1))
}

/// Output rows per tile of a convolution over `in_ch` channels with output `out_h × out_w` under
/// the patch budget of `scratch`. Tiles start at multiples of this from row 0: a caller that
/// computes output in these tiles issues the same GEMM calls (hence the same bits) however it
/// stores the rows.
pub fn conv_tile_rows(
    in_ch: usize,
    geo: Conv2dGeometry,
    out_h: usize,
    out_w: usize,
    scratch: &Scratch,
) -> usize {
    tile_rows(
        in_ch * geo.kernel * geo.kernel,
        out_h,
        out_w,
        scratch.conv_patch,
    )
}

/// Bytes of the patch `RowConv` keeps when called for at most `call_rows` output rows at a time,
/// with a patch budget of `budget` values.
pub fn conv_patch_bytes(
    in_ch: usize,
    geo: Conv2dGeometry,
    (out_h, out_w): (usize, usize),
    call_rows: usize,
    budget: usize,
) -> u64 {
    let k_dim = in_ch * geo.kernel * geo.kernel;
    let step = tile_rows(k_dim, out_h, out_w, budget);
    let rows = longest_piece(call_rows.min(out_h), step, min_tile_rows(out_w));
    (k_dim as u64)
        .saturating_mul(rows as u64)
        .saturating_mul(out_w as u64)
        .saturating_mul(4)
}

/// A convolution ready to compute bands of output rows: filters (read once when they fit one
/// weight panel), bias, and a patch buffer reused across calls (sized for the tile rows of the
/// largest call so far).
pub struct RowConv<'w> {
    filters: LhsPanels<'w>,
    weight: &'w dyn WeightRows,
    bias: Option<&'w [f32]>,
    geo: Conv2dGeometry,
    patch_budget: usize,
    patch: Vec<f32>,
}

impl<'w> RowConv<'w> {
    /// `weight` [co, ci·k·k] (read in row panels, any storage format), `bias` [co]; patches and
    /// weight panels within the budgets of `scratch`; f32.
    pub fn new(
        weight: &'w dyn WeightRows,
        bias: Option<&'w [f32]>,
        geo: Conv2dGeometry,
        scratch: &Scratch,
    ) -> Self {
        Self::new_in(weight, bias, geo, scratch, super::Precision::default())
    }

    /// As `new`, computing in `precision`: on AMX bf16 tiles when it says so
    /// (`Precision::bf16_convs`), where each patch is also packed to bf16 (half its f32 bytes), so
    /// the f32 patch takes two thirds of the patch budget and the two together stay within it.
    pub fn new_in(
        weight: &'w dyn WeightRows,
        bias: Option<&'w [f32]>,
        geo: Conv2dGeometry,
        scratch: &Scratch,
        precision: super::Precision,
    ) -> Self {
        if let Some(b) = bias {
            assert_eq!(b.len(), weight.rows(), "conv bias size");
        }
        let patch_budget = if precision.bf16_convs() {
            scratch.conv_patch / 3 * 2
        } else {
            scratch.conv_patch
        };
        RowConv {
            filters: LhsPanels::new_in(weight, scratch, precision),
            weight,
            bias,
            geo,
            patch_budget,
            patch: Vec::new(),
        }
    }

    /// Output rows `rows` of the convolution of `input` read through `t`, bias added, into `out`
    /// [co, rows.len() · ow].
    pub fn rows(
        &mut self,
        input: &dyn FeatureRows,
        t: InputTransform,
        rows: Range<usize>,
        out: &mut [f32],
    ) {
        let (_, h, w) = t.seen_dims(input);
        let (_, ow) = self.geo.out_size(h, w);
        let cols = rows.len() * ow;
        assert_eq!(out.len(), self.weight.rows() * cols, "conv band size");
        self.rows_strided(input, t, rows, out, cols);
    }

    /// As `rows`, with output channel `i` starting at `out[i · ldc]`.
    fn rows_strided(
        &mut self,
        input: &dyn FeatureRows,
        t: InputTransform,
        rows: Range<usize>,
        out: &mut [f32],
        ldc: usize,
    ) {
        let (ci, h, w) = t.seen_dims(input);
        let k_dim = ci * self.geo.kernel * self.geo.kernel;
        assert_eq!(self.weight.row_len(), k_dim, "conv weight size");
        let (oh, ow) = self.geo.out_size(h, w);
        assert!(rows.end <= oh, "rows {rows:?} beyond {oh}");
        let step = tile_rows(k_dim, oh, ow, self.patch_budget);
        let min_rows = min_tile_rows(ow);
        let need = k_dim * longest_piece(rows.len(), step, min_rows) * ow;
        if self.patch.len() < need {
            self.patch = Vec::new(); // free the old patch before allocating the new one
            self.patch = vec![0.0; need];
        }
        for piece in pieces(rows.len(), step, min_rows) {
            let (row0, n) = (rows.start + piece.start, piece.len());
            let patch = &mut self.patch[..k_dim * n * ow];
            gather_patch(input, &t, self.geo, row0, n, ow, patch);
            let dst = &mut out[(row0 - rows.start) * ow..];
            self.filters.multiply(patch, n * ow, dst, ldc);
        }
        if let Some(bias) = self.bias {
            for (i, &b) in bias.iter().enumerate() {
                let row = &mut out[i * ldc..i * ldc + rows.len() * ow];
                row.iter_mut().for_each(|v| *v += b);
            }
        }
    }
}

/// `x` [n, ci, h, w] ⊛ `weight` [co, ci·k·k] (+ `bias` [co]) → [n, co, oh, ow]. The weight is
/// read in row panels (see `panel`), so it may be stored in any format. 3×3 stride-1 convolutions
/// over enough channels take the Winograd path (`winograd_choice`), the rest the implicit GEMM;
/// either works within the budgets of `scratch`.
pub fn conv2d(
    x: &Tensor,
    weight: &dyn WeightRows,
    bias: Option<&[f32]>,
    geo: Conv2dGeometry,
    scratch: &Scratch,
) -> Tensor {
    match winograd_choice(geo, x.nchw(), weight.rows()) {
        Some(tile) => conv3x3_winograd(x, weight, bias, tile, scratch),
        None => conv2d_implicit_gemm(x, weight, bias, geo, scratch),
    }
}

/// `conv2d` by implicit GEMM whatever the shape (benches and tests compare it with Winograd).
pub fn conv2d_implicit_gemm(
    x: &Tensor,
    weight: &dyn WeightRows,
    bias: Option<&[f32]>,
    geo: Conv2dGeometry,
    scratch: &Scratch,
) -> Tensor {
    let (n, ci, h, w) = x.nchw();
    let co = weight.rows();
    assert_eq!(
        weight.row_len(),
        ci * geo.kernel * geo.kernel,
        "conv weight size"
    );
    let mut conv = RowConv::new(weight, bias, geo, scratch);
    let (oh, ow) = geo.out_size(h, w);
    let mut out = Tensor::zeros(vec![n, co, oh, ow]);
    let pointwise = geo.kernel == 1 && geo.stride == 1 && geo.pad == 0;
    for b in 0..n {
        let input = &x.data[b * ci * h * w..(b + 1) * ci * h * w];
        let output = &mut out.data[b * co * oh * ow..(b + 1) * co * oh * ow];
        if pointwise {
            // The input already is the patch: one GEMM over the whole image.
            conv.filters.multiply(input, oh * ow, output, oh * ow);
            if let Some(bias) = bias {
                for (plane, &bv) in output.chunks_mut(oh * ow).zip(bias) {
                    plane.iter_mut().for_each(|v| *v += bv);
                }
            }
        } else {
            let planes = Planes::new(input, (ci, h, w));
            conv.rows_strided(&planes, InputTransform::default(), 0..oh, output, oh * ow);
        }
    }
    out
}

/// Fills `patch` [ci·k·k, rows·ow] with the (transformed) input values each output pixel of rows
/// `row0..row0+rows` sees, zero outside the image. Each input row is transformed once per tile
/// into a zero-padded line, then copied out k·k times.
fn gather_patch(
    input: &dyn FeatureRows,
    t: &InputTransform,
    geo: Conv2dGeometry,
    row0: usize,
    rows: usize,
    ow: usize,
    patch: &mut [f32],
) {
    let (k, stride, pad) = (geo.kernel, geo.stride, geo.pad);
    let (_, h, w) = input.dims();
    let (sh, sw) = t.resize.seen(h, w);
    let source = |y: usize| t.resize.source_row(y, h);
    let cols = rows * ow;
    // Seen rows this tile reads, clamped to the map; then the input rows behind them (the
    // source row never decreases with the seen row).
    let first = geo.first_input_row(row0).min(sh);
    let end = ((row0 + rows - 1) * stride + k).saturating_sub(pad).min(sh);
    let (src0, src1) = if end > first {
        (source(first), source(end - 1) + 1)
    } else {
        (0, 0)
    };
    let line_len = sw + 2 * pad;
    patch
        .par_chunks_mut(k * k * cols)
        .enumerate()
        .for_each_init(Vec::new, |lines: &mut Vec<f32>, (c, chunk)| {
            lines.clear();
            lines.resize((src1 - src0) * line_len, 0.0);
            for (sy, line) in (src0..src1).zip(lines.chunks_mut(line_len)) {
                t.apply(c, input.row(c, sy), &mut line[pad..pad + sw]);
            }
            for dy in 0..k {
                for dx in 0..k {
                    let dst = &mut chunk[(dy * k + dx) * cols..(dy * k + dx + 1) * cols];
                    for (r, dst_row) in dst.chunks_mut(ow).enumerate() {
                        // Padded coordinates: seen row `py - pad`.
                        let py = (row0 + r) * stride + dy;
                        if py < pad || py - pad >= sh {
                            dst_row.fill(0.0);
                            continue;
                        }
                        let line = source(py - pad) - src0;
                        let line = &lines[line * line_len..(line + 1) * line_len];
                        if stride == 1 {
                            dst_row.copy_from_slice(&line[dx..dx + ow]);
                        } else {
                            for (ox, d) in dst_row.iter_mut().enumerate() {
                                *d = line[ox * stride + dx];
                            }
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests;
