//! The job's adapters at run time: per modified weight, the scaled terms, applied in one of two
//! forms. Panel form: the term's rows of ΔW are added to the weight's f32 panel as the kernels
//! read it (`WithLora`; LoHa, whose delta has no low-rank form, and the low-rank terms of weights
//! up to `PANEL_FORM_VALUES`). Low-rank form: `scale·up(down(x))` added to the layer's product
//! (`add_linear`; for a convolution the `down` filters ride along as extra output channels of the
//! layer's own product, `conv_weight`, and `finish_conv` applies `up`). The base weight and its
//! mapping are never touched, so a job without LoRA reads exactly what it read before, and the
//! effect of a LoRA does not depend on the base weight's type (q4_0 or f16 alike).

use std::collections::HashMap;
use std::fmt;

use rayon::prelude::*;

use super::file::{Form, Matrix};
use crate::kernels::matmul::matmul_strided;
use crate::kernels::{add_product_rows, matmul, Transpose, WeightRows};
use crate::tensor::Tensor;
use crate::weights::Param;

/// Rows of a delta computed together (each a parallel task): LoHa holds its two factors'
/// products for these rows.
pub const DELTA_BLOCK_ROWS: usize = 8;

/// One LoRA module's contribution to one weight (rows `first_row ..` of it): `scale · form`, the
/// scale (alpha / rank × multiplier) folded into the left factor(s) when built.
pub struct Term {
    /// The weight's outer row this term's first row adds to (a row range of a fused weight).
    pub first_row: usize,
    pub form: Form,
}

impl Term {
    pub fn new(first_row: usize, mut form: Form, scale: f32) -> Term {
        let left = match &mut form {
            Form::LowRank { up, .. } => up,
            Form::Hadamard { w1a, .. } => w1a,
        };
        left.data.iter_mut().for_each(|v| *v *= scale);
        Term { first_row, form }
    }

    fn rows(&self) -> usize {
        self.form.dims().0
    }

    /// Adds this term's rows `first .. first + count` (the term's own row numbers) to `out`
    /// [count, row_len]. Each value is summed over the rank in one fixed order, row by row (not
    /// by gemm, whose order for a one-row call differs from a panel's), so a row gets the same bits
    /// however the rows are read: a panel at a time, or one by one (Winograd's filter transform).
    fn add_rows(&self, first: usize, count: usize, out: &mut [f32]) {
        let len = self.form.dims().1;
        assert_eq!(out.len(), count * len, "LoRA rows");
        // Blocks of rows share each pass over a `down` row (kept in cache); rows never interact.
        const BLOCK: usize = DELTA_BLOCK_ROWS;
        let blocks = out.par_chunks_mut(BLOCK * len).enumerate();
        match &self.form {
            Form::LowRank { up, down } => blocks.for_each(|(b, rows)| {
                let row0 = first + b * BLOCK;
                accumulate(rows, row0, up, down);
            }),
            Form::Hadamard { w1a, w1b, w2a, w2b } => blocks.for_each(|(b, rows)| {
                let row0 = first + b * BLOCK;
                let (mut p, mut q) = (vec![0.0; rows.len()], vec![0.0; rows.len()]);
                accumulate(&mut p, row0, w1a, w1b);
                accumulate(&mut q, row0, w2a, w2b);
                for ((o, p), q) in rows.iter_mut().zip(&p).zip(&q) {
                    *o += p * q;
                }
            }),
        }
    }
}

/// `rows[i] += left[row0 + i, j] · right[j, :]` for j in order, for the rows of `rows`: fused where
/// the kernels' instruction set has FMA (`kernels::Isa::selected`), the same bits at every width.
fn accumulate(rows: &mut [f32], row0: usize, left: &Matrix, right: &Matrix) {
    let r = right.rows;
    let count = rows.len() / right.cols;
    let left = &left.data[row0 * r..(row0 + count) * r];
    add_product_rows(rows, left, &right.data, r, crate::kernels::Isa::selected());
}

/// Weights of at most this many values (16 MiB of f32: one weight panel of the first scratch
/// tier, read once per call) take their low-rank terms in the panel form; larger ones in the
/// low-rank form. The panel form costs r·out·in per weight read, the low-rank form r·rows·(in + out)
/// per call: in a UNet the small weights meet the most rows (the high-resolution levels) and the
/// large ones the fewest, so weight size picks the cheaper form nearly everywhere (ARCHITECTURE.md).
/// It depends on the layer only, never on the scratch tier or a call's rows (the feed-forward
/// chunks), so every plan gives the same bits.
pub const PANEL_FORM_VALUES: usize = 1 << 22;

/// The resolved adapters of one job: for each modified weight (stored key), its terms in the
/// order the LoRAs were given.
pub struct LoraSet {
    pub(super) weights: HashMap<String, Vec<Term>>,
    /// f32 values held (the plan counts them through `file::loaded_bytes`).
    pub(super) values: usize,
    /// `PANEL_FORM_VALUES` (tests and benches move it to exercise either form).
    panel_form_values: usize,
}

impl Default for LoraSet {
    fn default() -> Self {
        LoraSet {
            weights: HashMap::new(),
            values: 0,
            panel_form_values: PANEL_FORM_VALUES,
        }
    }
}

impl fmt::Debug for LoraSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "LoraSet({} weights, {} values)",
            self.weights.len(),
            self.values
        )
    }
}

impl LoraSet {
    /// Adds `term` to the stored weight `weight` (after the terms it has).
    pub fn insert(&mut self, weight: &str, term: Term) {
        self.values += term.form.values();
        self.weights
            .entry(weight.to_string())
            .or_default()
            .push(term);
    }

    /// Weights modified.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Weights of up to `values` values take the panel form (default `PANEL_FORM_VALUES`; 0: every
    /// low-rank term in the low-rank form, `usize::MAX`: every term in the panel form).
    pub fn set_panel_form_values(&mut self, values: usize) {
        self.panel_form_values = values;
    }

    /// Whether `w`'s low-rank terms take the panel form.
    fn panel_form(&self, w: &Param) -> bool {
        w.numel() <= self.panel_form_values
    }

    /// `w` as the products read it under this set: its rows plus the rows of its LoHa terms, and of
    /// its low-rank terms when it takes the panel form (else `add_linear` adds those to a linear
    /// layer's product; a convolution reads `conv_weight` instead).
    pub fn weight<'a>(&'a self, w: &'a Param) -> WithLora<'a> {
        let mut with = self.over(&w.info().name, w.first_row(), w);
        with.loha_only = !self.panel_form(w);
        with
    }

    /// `w` as a convolution's product reads it under this set: as `weight`, followed by the
    /// `down` filters of its low-rank-form terms as extra rows, so that one product also runs the
    /// rank-r down convolutions and the input's patch (GroupNorm, SiLU, resize, concat) is
    /// gathered once. `finish_conv` turns that product into the layer's.
    pub fn conv_weight<'a>(&'a self, w: &'a Param) -> WithLora<'a> {
        let mut with = self.weight(w);
        with.appended = self.low_rank(w).map(|(_, down, ..)| down).collect();
        with
    }

    /// The product of `conv_weight(w)`, `y` [n, out + appended, oh, ow] → [n, out, oh, ow]: each
    /// low-rank term's 1×1 `up` applied to its down channels and added to the output channels it
    /// covers, then the appended channels dropped (in place).
    pub fn finish_conv(&self, w: &Param, mut y: Tensor) -> Tensor {
        let (n, channels, oh, ow) = y.nchw();
        let (co, hw) = (w.rows(), oh * ow);
        let mut appended = co;
        for (up, down, t_row, col, count) in self.low_rank(w) {
            let r = down.rows;
            let up = &up.data[t_row * r..(t_row + count) * r];
            for b in 0..n {
                let (head, tail) = y.data.split_at_mut((b * channels + appended) * hw);
                let t = &tail[..r * hw];
                let out = &mut head[(b * channels + col) * hw..(b * channels + col + count) * hw];
                matmul(up, t, out, count, r, hw, Transpose::No, true);
            }
            appended += r;
        }
        assert_eq!(appended, channels, "LoRA conv channels");
        if channels > co {
            for b in 1..n {
                let from = b * channels * hw;
                y.data.copy_within(from..from + co * hw, b * co * hw);
            }
            y.data.truncate(n * co * hw);
            y.shape[1] = co;
        }
        y
    }

    /// The low-rank terms of `w` that overlap its rows, each with the overlap: (term, first row of
    /// the term, first output of `w`, count).
    fn low_rank<'a>(
        &'a self,
        w: &Param,
    ) -> impl Iterator<Item = (&'a Matrix, &'a Matrix, usize, usize, usize)> {
        let (lo, hi) = (w.first_row(), w.first_row() + w.rows());
        let terms = match self.panel_form(w) {
            true => &[],
            false => self
                .weights
                .get(&w.info().name)
                .map(Vec::as_slice)
                .unwrap_or(&[]),
        };
        terms.iter().filter_map(move |t| {
            let Form::LowRank { up, down } = &t.form else {
                return None;
            };
            let (a, b) = (lo.max(t.first_row), hi.min(t.first_row + up.rows));
            (a < b).then(|| (up, down, a - t.first_row, a - lo, b - a))
        })
    }

    /// `y` [m, out] += `x` [m, in] · (scale · up · down)ᵀ for `w`'s low-rank terms, as
    /// `(x · downᵀ) · upᵀ`: r·m·(in + out) multiply-adds instead of re-forming r·in·out weight
    /// values per read (benches/kernels.rs `lora`). Rows of `y` are independent, so a call over
    /// part of the rows gives those rows' bits.
    pub fn add_linear(&self, w: &Param, x: &[f32], y: &mut [f32]) {
        let (k, n) = (w.row_len(), w.rows());
        let m = x.len() / k;
        for (up, down, t_row, col, count) in self.low_rank(w) {
            let r = down.rows;
            let mut t = vec![0.0; m * r];
            matmul(x, &down.data, &mut t, m, k, r, Transpose::Yes, false);
            let up = &up.data[t_row * r..(t_row + count) * r];
            matmul_strided(&t, up, &mut y[col..], n, m, r, count, Transpose::Yes, true);
        }
    }

    /// Rows `first_row ..` of the stored weight `name` read from `base` plus every term's (with a
    /// zero `base`: the delta itself).
    pub fn over<'a>(
        &'a self,
        name: &str,
        first_row: usize,
        base: &'a dyn WeightRows,
    ) -> WithLora<'a> {
        let terms = self.weights.get(name).map(Vec::as_slice).unwrap_or(&[]);
        WithLora {
            base,
            first_row,
            terms,
            loha_only: false,
            appended: Vec::new(),
        }
    }

    /// The stored keys of the weights this set modifies.
    pub fn weight_names(&self) -> impl Iterator<Item = &str> {
        self.weights.keys().map(String::as_str)
    }
}

/// A weight read with its adapters' rows added (what `Linear::product` and `Conv2d::product` hand
/// the kernels; every kernel and the CUDA backend read weights through `read_rows`).
pub struct WithLora<'a> {
    base: &'a dyn WeightRows,
    /// The param's first row in the stored tensor (a row range of a fused weight).
    first_row: usize,
    terms: &'a [Term],
    /// Add only the LoHa terms' rows (the products add the low-rank ones themselves).
    loha_only: bool,
    /// Rows read after the weight's own (`LoraSet::conv_weight`: the low-rank terms' `down`).
    appended: Vec<&'a Matrix>,
}

impl WithLora<'_> {
    /// The weight's own rows `first .. first + count` (< `base.rows()`) with the terms added.
    fn read_own(&self, first: usize, count: usize, out: &mut [f32]) {
        self.base.read_rows(first, count, out);
        let len = self.row_len();
        // Stored rows this read covers; each term adds the part it overlaps.
        let (lo, hi) = (self.first_row + first, self.first_row + first + count);
        for term in self.terms {
            if self.loha_only && matches!(term.form, Form::LowRank { .. }) {
                continue;
            }
            let (t_lo, t_hi) = (term.first_row, term.first_row + term.rows());
            let (a, b) = (lo.max(t_lo), hi.min(t_hi));
            if a < b {
                let out = &mut out[(a - lo) * len..(b - lo) * len];
                term.add_rows(a - t_lo, b - a, out);
            }
        }
    }
}

impl WeightRows for WithLora<'_> {
    fn rows(&self) -> usize {
        self.base.rows() + self.appended.iter().map(|m| m.rows).sum::<usize>()
    }

    fn row_len(&self) -> usize {
        self.base.row_len()
    }

    fn read_rows(&self, first: usize, count: usize, out: &mut [f32]) {
        let (len, own_rows) = (self.row_len(), self.base.rows());
        let own = count.min(own_rows.saturating_sub(first));
        if own > 0 {
            self.read_own(first, own, &mut out[..own * len]);
        }
        // The appended matrices' rows, each the part of it `first .. first + count` covers.
        let mut start = own_rows;
        for m in &self.appended {
            let (a, b) = (
                (first + own).max(start),
                (first + count).min(start + m.rows),
            );
            if a < b {
                let rows = &m.data[(a - start) * len..(b - start) * len];
                out[(a - first) * len..(b - first) * len].copy_from_slice(rows);
            }
            start += m.rows;
        }
    }

    /// The stored blocks when no term changes the panel (no LoRA on this weight, or only
    /// low-rank terms, which the product adds to its output): an int8 product may read them.
    fn blocks(&self, first: usize, count: usize) -> Option<(crate::weights::DType, &[u8])> {
        let panel_terms = self
            .terms
            .iter()
            .any(|t| !(self.loha_only && matches!(t.form, Form::LowRank { .. })));
        if panel_terms || !self.appended.is_empty() {
            None
        } else {
            self.base.blocks(first, count)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: usize) -> Matrix {
        let data = (0..rows * cols)
            .map(|i| ((i * seed % 29) as f32 - 14.0) / 9.0)
            .collect();
        Matrix { rows, cols, data }
    }

    #[test]
    fn rows_read_in_any_split_get_the_same_bits() {
        let (out, r, len) = (150, 8, 70);
        for form in [
            Form::LowRank {
                up: matrix(out, r, 3),
                down: matrix(r, len, 5),
            },
            Form::Hadamard {
                w1a: matrix(out, r, 7),
                w1b: matrix(r, len, 11),
                w2a: matrix(out, r, 13),
                w2b: matrix(r, len, 17),
            },
        ] {
            let term = Term::new(0, form, 0.7);
            let mut whole = vec![0.25; out * len];
            term.add_rows(0, out, &mut whole);
            for step in [1, 7, 65, 100] {
                let mut split = vec![0.25; out * len];
                for first in (0..out).step_by(step) {
                    let count = step.min(out - first);
                    term.add_rows(first, count, &mut split[first * len..(first + count) * len]);
                }
                assert!(split == whole, "split {step}");
            }
            // And it is the definition: row 3, column 5.
            let want = match &term.form {
                Form::LowRank { up, down } => (0..r)
                    .map(|j| up.data[3 * r + j] * down.data[j * len + 5])
                    .sum::<f32>(),
                Form::Hadamard { w1a, w1b, w2a, w2b } => {
                    let a: f32 = (0..r)
                        .map(|j| w1a.data[3 * r + j] * w1b.data[j * len + 5])
                        .sum();
                    let b: f32 = (0..r)
                        .map(|j| w2a.data[3 * r + j] * w2b.data[j * len + 5])
                        .sum();
                    a * b
                }
            };
            assert!((whole[3 * len + 5] - 0.25 - want).abs() < 1e-5);
        }
    }
}
