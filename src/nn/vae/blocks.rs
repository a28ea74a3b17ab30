//! The decoder's layers run as streaming passes over banded maps, each next to its memory model.
//!
//! A pass computes output rows top to bottom in the tiles of its convolution (fixed by the map's
//! shape, never by the banding, so the GEMM calls and hence the bits are the same for every plan),
//! reads its source through the fused GroupNorm + SiLU / upsample gather, writes or adds each tile
//! into banded outputs, and frees the source rows that no later tile reads.

use super::bands::{BandLayout, BandedMap};
use super::{VaePlan, EPS, GROUPS};
use crate::error::{Error, Result};
use crate::kernels::scratch::Scratch;
use crate::kernels::{
    conv_patch_bytes, conv_tile_rows, group_norm_stats, group_norm_stats_bytes, panel_bytes,
    winograd_choice, Conv2dGeometry, FeatureRows, InputTransform, Resize, RowConv, WinogradConv,
    WinogradTile,
};
use crate::weights::{Param, Weights};

/// A stride-1, size-keeping convolution (its weight stays in the mapping, read in row panels).
pub(super) struct Conv {
    weight: Param,
    bias: Vec<f32>,
    geo: Conv2dGeometry,
    pub in_ch: usize,
    pub out_ch: usize,
}

impl Conv {
    /// A `kernel`×`kernel` convolution (padding `kernel / 2`); channels from the stored weight.
    pub fn new(w: &Weights, kernel: usize) -> Result<Self> {
        let shape = w.param_any("weight")?.shape().to_vec();
        if shape.len() < 2 || kernel.is_multiple_of(2) {
            return Err(Error::BadShape {
                name: format!("{}.weight", w.prefix()),
                found: shape,
                expected: vec![0, 0, kernel, kernel],
            });
        }
        let (out_ch, in_ch) = (shape[0], shape[1]);
        Ok(Conv {
            weight: w.param("weight", &[out_ch, in_ch, kernel, kernel])?,
            bias: w.param("bias", &[out_ch])?.to_f32(),
            geo: Conv2dGeometry {
                kernel,
                stride: 1,
                pad: kernel / 2,
            },
            in_ch,
            out_ch,
        })
    }

    /// LDM's downsampler: 3×3 with stride 2 over the map padded by one zero row below and one
    /// zero column on the right (`downsample_map` supplies them).
    pub fn downsample(w: &Weights) -> Result<Self> {
        let mut conv = Conv::new(w, 3)?;
        conv.geo = Conv2dGeometry {
            kernel: 3,
            stride: 2,
            pad: 0,
        };
        Ok(conv)
    }

    /// The Winograd tile this convolution takes on an `h × w` map (the UNet's rule), if any.
    fn winograd(&self, (h, w): (usize, usize)) -> Option<WinogradTile> {
        winograd_choice(self.geo, (1, self.in_ch, h, w), self.out_ch)
    }

    fn runner(&self, hw: (usize, usize), scratch: &Scratch) -> Runner<'_> {
        let (weight, bias) = (&self.weight, Some(&self.bias[..]));
        match self.winograd(hw) {
            Some(tile) => Runner::Winograd(WinogradConv::new(weight, bias, tile, scratch)),
            None => Runner::Gemm(RowConv::new(weight, bias, self.geo, scratch)),
        }
    }

    /// Output rows per call on an `h × w` map under `scratch`: fixed by the shape and the tier,
    /// so every banding issues the same calls.
    fn tile_rows(&self, h: usize, w: usize, scratch: &Scratch) -> usize {
        match self.winograd((h, w)) {
            Some(tile) => WinogradConv::call_rows(tile, (self.in_ch, h, w), self.out_ch, scratch),
            None => conv_tile_rows(self.in_ch, self.geo, h, w, scratch),
        }
    }

    /// The filters as `RowConv` holds them: whole when they fit one weight panel, else one panel.
    fn filter_bytes(&self, scratch: &Scratch) -> u64 {
        let row_len = self.in_ch * self.geo.kernel * self.geo.kernel;
        panel_bytes(self.out_ch, row_len, scratch.weight_panel)
    }

    /// Filters + patch (Winograd: transformed filters + one call's scratch), held while a pass
    /// runs this convolution on an `h × w` map, `rows` output rows per call, under `scratch`.
    fn held_bytes(&self, (h, w): (usize, usize), rows: usize, scratch: &Scratch) -> u64 {
        if let Some(tile) = self.winograd((h, w)) {
            let threads = rayon::current_num_threads();
            let dims = (self.in_ch, h, w);
            return WinogradConv::held_bytes(tile, dims, self.out_ch, rows, scratch, threads);
        }
        let patch = conv_patch_bytes(self.in_ch, self.geo, (h, w), rows, scratch.conv_patch);
        self.filter_bytes(scratch).saturating_add(patch)
    }

    /// What GEMM's packed operands may add on top of `held_bytes`: at most the operands of one
    /// call again (Winograd's transformed filters are read a GEMM at a time, not packed whole).
    fn gemm_bytes(&self, hw: (usize, usize), rows: usize, scratch: &Scratch) -> u64 {
        let resident = match self.winograd(hw) {
            Some(tile) => WinogradConv::filter_bytes(tile, self.in_ch, self.out_ch),
            None => 0,
        };
        self.held_bytes(hw, rows, scratch).saturating_sub(resident)
    }
}

/// A convolution ready for a pass: Winograd (filters transformed once) or implicit GEMM.
enum Runner<'a> {
    Gemm(RowConv<'a>),
    Winograd(WinogradConv<'a>),
}

impl Runner<'_> {
    fn rows(
        &mut self,
        input: &dyn FeatureRows,
        t: InputTransform,
        rows: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        match self {
            Runner::Gemm(conv) => conv.rows(input, t, rows, out),
            Runner::Winograd(conv) => conv.rows(input, t, rows, out),
        }
    }
}

/// A GroupNorm's affine parameters; its statistics come from the whole map at run time.
pub(super) struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

impl Norm {
    pub fn new(w: &Weights, channels: usize) -> Result<Self> {
        Ok(Norm {
            gamma: w.param("weight", &[channels])?.to_f32(),
            beta: w.param("bias", &[channels])?.to_f32(),
        })
    }

    /// Per-channel (scale, shift) of this GroupNorm over `x`.
    pub fn affine(&self, x: &BandedMap) -> (Vec<f32>, Vec<f32>) {
        group_norm_stats(x, GROUPS, EPS).scale_shift(&self.gamma, &self.beta)
    }

    /// Peak while computing the statistics of a map of `layout` (the map itself not included).
    fn stats_bytes(layout: BandLayout) -> u64 {
        group_norm_stats_bytes(layout.c, layout.h)
    }
}

/// GroupNorm then SiLU, applied by the convolution's gather.
pub(super) fn norm_silu<'a>((scale, shift): &'a (Vec<f32>, Vec<f32>)) -> InputTransform<'a> {
    InputTransform {
        affine: Some((scale, shift)),
        silu: true,
        resize: Resize::None,
    }
}

pub(super) const UPSAMPLE: InputTransform<'static> = InputTransform {
    affine: None,
    silu: false,
    resize: Resize::Twice,
};

/// One streaming pass over `src`: tile by tile (the tiles of `convs[0]`), each convolution computes
/// its rows of output from `src` read through its transform and `sink(i, first_row, tile)` takes
/// them ([out_ch, rows, w]). With `consume`, source rows no later tile reads are freed as it goes.
/// All convolutions see the same map and keep its size; kernels work within `scratch`.
pub(super) fn stream(
    src: &mut BandedMap,
    convs: &[(&Conv, InputTransform)],
    consume: bool,
    scratch: &Scratch,
    mut sink: impl FnMut(usize, usize, &[f32]),
) {
    let up = match convs[0].1.resize {
        Resize::Twice => 2,
        _ => 1,
    };
    let (_, h, w) = convs[0].1.seen_dims(src);
    let step = convs[0].0.tile_rows(h, w, scratch);
    let widest = convs.iter().map(|(c, _)| c.out_ch).max().unwrap_or(0);
    let mut tile = vec![0.0; widest * step * w];
    let mut runners: Vec<Runner> = convs
        .iter()
        .map(|(c, _)| c.runner((h, w), scratch))
        .collect();
    for r0 in (0..h).step_by(step) {
        let r1 = (r0 + step).min(h);
        for (i, ((conv, t), run)) in convs.iter().zip(&mut runners).enumerate() {
            let out = &mut tile[..conv.out_ch * (r1 - r0) * w];
            run.rows(src, *t, r0..r1, out);
            sink(i, r0, out);
        }
        if consume {
            src.free_below(first_needed(convs.iter().map(|(c, _)| *c), r1) / up);
        }
    }
}

/// The first row of the seen map that output rows from `next` on read.
fn first_needed<'a>(convs: impl Iterator<Item = &'a Conv>, next: usize) -> usize {
    convs
        .map(|c| c.geo.first_input_row(next))
        .min()
        .unwrap_or(next)
}

/// Peak bytes of `stream` over a source of `src` (seen `up`× larger) writing `outs`: the most source
/// bands still held plus output bands allocated at any tile, plus what the pass holds besides maps
/// (filters and patches of every convolution, the tile buffer, and GEMM's packed operands, at most
/// the patch and filters of the largest convolution again), under `scratch`.
pub(super) fn stream_peak(
    src: BandLayout,
    up: usize,
    convs: &[&Conv],
    consume: bool,
    outs: &[BandLayout],
    scratch: &Scratch,
) -> u64 {
    let (h, w) = (src.h * up, src.w * up);
    let step = convs[0].tile_rows(h, w, scratch);
    let widest = convs.iter().map(|c| c.out_ch).max().unwrap_or(0);
    let tile = (widest as u64 * step as u64 * w as u64).saturating_mul(4);
    let held: u64 = convs
        .iter()
        .map(|c| c.held_bytes((h, w), step, scratch))
        .sum();
    let gemm = convs
        .iter()
        .map(|c| c.gemm_bytes((h, w), step, scratch))
        .max()
        .unwrap_or(0);
    let mut maps = 0u64;
    for r0 in (0..h).step_by(step) {
        let r1 = (r0 + step).min(h);
        let kept = if consume {
            src.bytes_kept_from(first_needed(convs.iter().copied(), r0) / up)
        } else {
            src.total_bytes()
        };
        let written: u64 = outs.iter().map(|o| o.bytes_written_to(r1)).sum();
        maps = maps.max(kept.saturating_add(written));
    }
    maps.saturating_add(held)
        .saturating_add(gemm)
        .saturating_add(tile)
}

/// A few rows of a map as the downsampler sees it: the map with one zero row below and one zero
/// column on the right ([c, h + 1, w + 1]), holding only rows `first..first + rows`, copied.
struct PaddedRows {
    dims: (usize, usize, usize),
    first: usize,
    rows: usize,
    values: Vec<f32>,
}

impl PaddedRows {
    fn new(src: &BandedMap, rows: std::ops::Range<usize>) -> Self {
        let BandLayout { c, h, w, .. } = src.layout();
        let mut values = vec![0.0; c * rows.len() * (w + 1)];
        for ch in 0..c {
            for (i, y) in rows.clone().enumerate().filter(|&(_, y)| y < h) {
                let at = (ch * rows.len() + i) * (w + 1);
                values[at..at + w].copy_from_slice(src.row(ch, y));
            }
        }
        PaddedRows {
            dims: (c, h + 1, w + 1),
            first: rows.start,
            rows: rows.len(),
            values,
        }
    }

    fn bytes(c: usize, rows: usize, w: usize) -> u64 {
        (c as u64 * rows as u64 * (w as u64 + 1)).saturating_mul(4)
    }
}

impl FeatureRows for PaddedRows {
    fn dims(&self) -> (usize, usize, usize) {
        self.dims
    }

    fn row(&self, c: usize, y: usize) -> &[f32] {
        let w = self.dims.2;
        let at = (c * self.rows + y - self.first) * w;
        &self.values[at..at + w]
    }
}

/// The downsampler's output size on an `h × w` map.
fn downsample_size(conv: &Conv, (h, w): (usize, usize)) -> (usize, usize) {
    conv.geo.out_size(h + 1, w + 1)
}

/// The rows of the padded map that output rows `r0..r1` of the downsampler read.
fn downsample_window(conv: &Conv, h: usize, r0: usize, r1: usize) -> std::ops::Range<usize> {
    let first = conv.geo.first_input_row(r0);
    let end = ((r1 - 1) * conv.geo.stride + conv.geo.kernel).min(h + 1);
    first..end
}

/// `conv` (a `Conv::downsample`) over `src`, consuming it, into a new banded map: tile by tile
/// (tiles fixed by the output's shape), each tile's input rows copied padded (`PaddedRows`).
pub(super) fn downsample_map(conv: &Conv, mut src: BandedMap, plan: &VaePlan) -> BandedMap {
    let BandLayout { h, w, .. } = src.layout();
    let (oh, ow) = downsample_size(conv, (h, w));
    let scratch = &plan.scratch;
    let step = conv.tile_rows(oh, ow, scratch);
    let mut out = BandedMap::empty(BandLayout::new(conv.out_ch, oh, ow, plan.band_rows));
    let mut run = conv.runner((oh, ow), scratch);
    let mut tile = vec![0.0; conv.out_ch * step * ow];
    for r0 in (0..oh).step_by(step) {
        let r1 = (r0 + step).min(oh);
        let window = PaddedRows::new(&src, downsample_window(conv, h, r0, r1));
        let out_tile = &mut tile[..conv.out_ch * (r1 - r0) * ow];
        run.rows(&window, InputTransform::default(), r0..r1, out_tile);
        drop(window);
        out.write_rows(r0, out_tile);
        src.free_below(conv.geo.first_input_row(r1));
    }
    out
}

/// Peak of `downsample_map` over a map of `src` (source and output included).
pub(super) fn downsample_map_peak(conv: &Conv, src: BandLayout, plan: &VaePlan) -> u64 {
    let scratch = &plan.scratch;
    let (oh, ow) = downsample_size(conv, (src.h, src.w));
    let out = BandLayout::new(conv.out_ch, oh, ow, plan.band_rows);
    let step = conv.tile_rows(oh, ow, scratch);
    let tile = (conv.out_ch as u64 * step as u64 * ow as u64).saturating_mul(4);
    let held = conv.held_bytes((oh, ow), step, scratch);
    let gemm = conv.gemm_bytes((oh, ow), step, scratch);
    let mut maps = 0u64;
    for r0 in (0..oh).step_by(step) {
        let r1 = (r0 + step).min(oh);
        let window = downsample_window(conv, src.h, r0, r1);
        let rows = PaddedRows::bytes(src.c, window.len(), src.w);
        let kept = src.bytes_kept_from(window.start);
        let written = out.bytes_written_to(r1);
        maps = maps.max(kept.saturating_add(written).saturating_add(rows));
    }
    maps.saturating_add(held)
        .saturating_add(gemm)
        .saturating_add(tile)
}

/// `conv` over `src` (read through `t`), consuming it, into a new banded map.
pub(super) fn conv_map(
    conv: &Conv,
    mut src: BandedMap,
    t: InputTransform,
    plan: &VaePlan,
) -> BandedMap {
    let (_, h, w) = t.seen_dims(&src);
    let mut out = BandedMap::empty(BandLayout::new(conv.out_ch, h, w, plan.band_rows));
    stream(
        &mut src,
        &[(conv, t)],
        true,
        &plan.scratch,
        |_, r0, tile| out.write_rows(r0, tile),
    );
    out
}

/// Peak of `conv_map` (source and output included).
pub(super) fn conv_map_peak(conv: &Conv, src: BandLayout, up: usize, plan: &VaePlan) -> u64 {
    let out = BandLayout::new(conv.out_ch, src.h * up, src.w * up, plan.band_rows);
    stream_peak(src, up, &[conv], true, &[out], &plan.scratch)
}

/// The VAE ResNet block: GroupNorm → SiLU → conv1 → GroupNorm → SiLU → conv2, plus a skip
/// (projected by a 1×1 `nin_shortcut` when the channel count changes).
pub(super) struct Resnet {
    norm1: Norm,
    conv1: Conv,
    norm2: Norm,
    conv2: Conv,
    nin_shortcut: Option<Conv>,
    pub out_ch: usize,
}

impl Resnet {
    /// LDM VAE naming: `norm1`, `conv1`, `norm2`, `conv2`, `nin_shortcut`.
    pub fn new(w: &Weights) -> Result<Self> {
        let conv1 = Conv::new(&w.pp("conv1"), 3)?;
        let (in_ch, out_ch) = (conv1.in_ch, conv1.out_ch);
        let nin_shortcut = if in_ch != out_ch || w.contains("nin_shortcut.weight") {
            Some(Conv::new(&w.pp("nin_shortcut"), 1)?)
        } else {
            None
        };
        Ok(Resnet {
            norm1: Norm::new(&w.pp("norm1"), in_ch)?,
            conv1,
            norm2: Norm::new(&w.pp("norm2"), out_ch)?,
            conv2: Conv::new(&w.pp("conv2"), 3)?,
            nin_shortcut,
            out_ch,
        })
    }

    /// Two passes. The first reads `x` once for conv1 (and the skip projection, which then
    /// consumes `x`); the second adds conv2's output tile by tile into the skip, in place, while
    /// freeing conv1's output behind it. So at most x + h (or the projected skip + h) are held.
    pub fn forward(&self, mut x: BandedMap, plan: &VaePlan) -> BandedMap {
        let layout = x.layout();
        let out = BandLayout::new(self.out_ch, layout.h, layout.w, plan.band_rows);
        let norm1 = self.norm1.affine(&x);
        let mut convs = vec![(&self.conv1, norm_silu(&norm1))];
        convs.extend(
            self.nin_shortcut
                .iter()
                .map(|c| (c, InputTransform::default())),
        );
        let mut h = BandedMap::empty(out);
        let mut skip = self.nin_shortcut.as_ref().map(|_| BandedMap::empty(out));
        stream(
            &mut x,
            &convs,
            skip.is_some(),
            &plan.scratch,
            |i, r0, tile| match (i, &mut skip) {
                (1, Some(skip)) => skip.write_rows(r0, tile),
                _ => h.write_rows(r0, tile),
            },
        );
        let mut acc = skip.unwrap_or(x);
        let norm2 = self.norm2.affine(&h);
        stream(
            &mut h,
            &[(&self.conv2, norm_silu(&norm2))],
            true,
            &plan.scratch,
            |_, r0, tile| acc.add_rows(r0, tile),
        );
        acc
    }

    /// Peak of `forward` on a map of `x` (input and output included).
    pub fn peak(&self, x: BandLayout, plan: &VaePlan) -> u64 {
        let out = BandLayout::new(self.out_ch, x.h, x.w, plan.band_rows);
        let stats1 = x.total_bytes().saturating_add(Norm::stats_bytes(x));
        let mut convs = vec![&self.conv1];
        convs.extend(self.nin_shortcut.iter());
        let outs: Vec<BandLayout> = convs.iter().map(|_| out).collect();
        let skip = self.nin_shortcut.is_some();
        let pass1 = stream_peak(x, 1, &convs, skip, &outs, &plan.scratch);
        // The accumulator (x or the projected skip) has the output's shape.
        let acc = out.total_bytes();
        let stats2 = acc
            .saturating_add(out.total_bytes())
            .saturating_add(Norm::stats_bytes(out));
        let pass2 = stream_peak(out, 1, &[&self.conv2], true, &[], &plan.scratch);
        let pass2 = acc.saturating_add(pass2);
        stats1.max(pass1).max(stats2).max(pass2)
    }
}
