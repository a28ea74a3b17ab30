//! Matmul against weights read in row panels: the weight (f32, f16, bf16 or a GGML block type)
//! is converted a panel of rows at a time into a reused f32 buffer and multiplied by `gemm`,
//! so no weight is ever expanded whole (measured faster than a direct int8 kernel for M ≥ 77 on
//! this CPU, DESIGN.md).

use super::matmul::{matmul_strided, Transpose};
use super::precision::{Isa, Mode, Precision};
use super::scratch::{longest_piece, pieces, Scratch, MIN_SPLIT};
use crate::tensor::zeroed;

/// A weight matrix [rows, row_len] that can hand out f32 copies of consecutive rows.
pub trait WeightRows: Sync {
    fn rows(&self) -> usize;
    fn row_len(&self) -> usize;
    /// Rows `first .. first + count` into `out` (count · row_len values).
    fn read_rows(&self, first: usize, count: usize, out: &mut [f32]);
    /// The stored bytes of rows `first .. first + count` and their type, for kernels that read a
    /// GGML block type directly (`kernels::int8`); None when the weight is not held that way.
    fn blocks(&self, _first: usize, _count: usize) -> Option<(crate::weights::DType, &[u8])> {
        None
    }
}

/// A plain f32 matrix as `WeightRows` (tests, and weights already in memory).
pub struct DenseRows<'a> {
    pub data: &'a [f32],
    pub rows: usize,
}

impl WeightRows for DenseRows<'_> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn row_len(&self) -> usize {
        self.data.len() / self.rows
    }
    fn read_rows(&self, first: usize, count: usize, out: &mut [f32]) {
        let k = self.row_len();
        out.copy_from_slice(&self.data[first * k..(first + count) * k]);
    }
}

/// Rows per panel: as many as `budget` values allow; `scratch::pieces` keeps every panel at least
/// `MIN_SPLIT` rows, so that every panelling gives the same bits.
fn panel_rows(rows: usize, row_len: usize, budget: usize) -> usize {
    (budget / row_len.max(1)).clamp(1, rows.max(1))
}

/// Bytes of f32 weights `LhsPanels` holds for `w` [rows, row_len] under a panel budget of `budget`
/// values: the whole filter bank when it fits one panel, else one panel.
pub fn panel_bytes(rows: usize, row_len: usize, budget: usize) -> u64 {
    let step = longest_piece(rows, panel_rows(rows, row_len, budget), MIN_SPLIT);
    (step as u64 * row_len as u64).saturating_mul(4)
}

/// `y[m, n] = x[m, k] · Wᵀ` with W [n, k] (a linear layer), converting W within the weight panel
/// budget of `scratch`.
pub fn matmul_weight_t(x: &[f32], w: &dyn WeightRows, y: &mut [f32], scratch: &Scratch) {
    if crate::backend::matmul_weight_t(x, w, y) {
        return; // --backend cuda
    }
    matmul_weight_t_budget(x, w, y, scratch.weight_panel)
}

/// `y[m, n] = x[m, k] · Wᵀ` in the mode of `precision` (`kernels::precision`): the one place
/// a linear layer's product picks its kernel. Int8 on a weight type without int8 products computes
/// in f32.
pub fn weight_product(
    x: &[f32],
    w: &dyn WeightRows,
    y: &mut [f32],
    scratch: &Scratch,
    precision: Precision,
) {
    match precision.mode {
        Mode::Int8 if crate::backend::active() == crate::backend::Backend::Cpu => {
            let budget = scratch.weight_panel;
            if !super::int8::matmul_weight_t(x, w, y, budget, precision.isa) {
                matmul_weight_t(x, w, y, scratch);
            }
        }
        Mode::Bf16 if crate::backend::active() == crate::backend::Backend::Cpu => {
            super::bf16::matmul_weight_t(x, w, y, scratch.weight_panel, precision.isa)
        }
        _ => matmul_weight_t(x, w, y, scratch),
    }
}

fn matmul_weight_t_budget(x: &[f32], w: &dyn WeightRows, y: &mut [f32], budget: usize) {
    let (n, k) = (w.rows(), w.row_len());
    let m = x.len() / k;
    assert_eq!(m * k, x.len(), "input width");
    assert_eq!(y.len(), m * n, "output size");
    let step = panel_rows(w.rows(), w.row_len(), budget);
    let mut panel = zeroed(longest_piece(n, step, MIN_SPLIT) * k);
    for piece in pieces(n, step, MIN_SPLIT) {
        let (r0, rows) = (piece.start, piece.len());
        let panel = &mut panel[..rows * k];
        w.read_rows(r0, rows, panel);
        matmul_strided(x, panel, &mut y[r0..], n, m, k, rows, Transpose::Yes, false);
    }
}

/// Left-multiplies column blocks by a weight read in row panels: `dst[n, cols] = W[n, k] · b[k, cols]`,
/// row `i` of `dst` starting at `i · ldc`. Used by convolution (W = filters, b = gathered patch).
/// Call `for_each_panel` once per weight and reuse it across many `b` (one per spatial tile).
pub struct LhsPanels<'w> {
    w: &'w dyn WeightRows,
    step: usize,
    form: Form,
}

/// How `LhsPanels` multiplies, and what it holds for it.
enum Form {
    /// f32 GEMM; the whole weight when it fits in one panel (read once, reused for every tile).
    F32(Option<Vec<f32>>),
    /// Packed bf16 products with this instruction set's kernel (`Precision::bf16_packed`: AMX
    /// tiles or `vdpbf16ps`); the whole weight, when it fits one panel, held rounded (half the
    /// f32 bytes). Panels are rounded straight from the stored rows.
    Packed(Isa, Option<super::amx::PackedA>),
    /// The whole weight on the GPU (--backend cuda), uploaded once for every tile.
    Gpu(crate::backend::DeviceWeight),
}

impl<'w> LhsPanels<'w> {
    /// Panels within the weight panel budget of `scratch`, in f32.
    pub fn new(w: &'w dyn WeightRows, scratch: &Scratch) -> Self {
        Self::with_budget(w, scratch.weight_panel, None)
    }

    /// As `new`, on packed bf16 operands when `precision` computes there
    /// (`Precision::bf16_convs`).
    pub fn new_in(w: &'w dyn WeightRows, scratch: &Scratch, precision: Precision) -> Self {
        let packed = precision.bf16_convs().then_some(precision.isa);
        Self::with_budget(w, scratch.weight_panel, packed)
    }

    fn with_budget(w: &'w dyn WeightRows, budget: usize, packed: Option<Isa>) -> Self {
        if let Some(gpu) = crate::backend::DeviceWeight::upload(w) {
            let step = w.rows();
            return LhsPanels {
                w,
                step,
                form: Form::Gpu(gpu),
            };
        }
        let step = panel_rows(w.rows(), w.row_len(), budget);
        let whole = longest_piece(w.rows(), step, MIN_SPLIT) >= w.rows();
        let form = if let Some(isa) = packed {
            let all = whole.then(|| super::amx::PackedA::from_weight(w, 0, w.rows()));
            Form::Packed(isa, all)
        } else {
            Form::F32(whole.then(|| {
                let mut all = zeroed(w.rows() * w.row_len());
                w.read_rows(0, w.rows(), &mut all);
                all
            }))
        };
        LhsPanels { w, step, form }
    }

    /// `dst[i * ldc + j] = Σ_p W[i, p] · b[p * cols + j]` for i < rows, j < cols.
    pub fn multiply(&self, b: &[f32], cols: usize, dst: &mut [f32], ldc: usize) {
        let resident = match &self.form {
            Form::Gpu(gpu) => return gpu.lhs_multiply(b, cols, dst, ldc),
            Form::Packed(isa, resident) => {
                return self.multiply_packed(*isa, resident, b, cols, dst, ldc)
            }
            Form::F32(resident) => resident,
        };
        let (n, k) = (self.w.rows(), self.w.row_len());
        if let Some(all) = resident {
            matmul_strided(all, b, dst, ldc, n, k, cols, Transpose::No, false);
            return;
        }
        let mut panel = zeroed(longest_piece(n, self.step, MIN_SPLIT) * k);
        for piece in pieces(n, self.step, MIN_SPLIT) {
            let (r0, rows) = (piece.start, piece.len());
            let panel = &mut panel[..rows * k];
            self.w.read_rows(r0, rows, panel);
            matmul_strided(
                panel,
                b,
                &mut dst[r0 * ldc..],
                ldc,
                rows,
                k,
                cols,
                Transpose::No,
                false,
            );
        }
    }
}

impl LhsPanels<'_> {
    fn multiply_packed(
        &self,
        isa: Isa,
        resident: &Option<super::amx::PackedA>,
        b: &[f32],
        cols: usize,
        dst: &mut [f32],
        ldc: usize,
    ) {
        use super::amx::{gemm_packed, PackedA, PackedB};
        let packed = PackedB::from_cols(b, self.w.row_len(), cols);
        if let Some(all) = resident {
            return gemm_packed(isa, all, &packed, dst, ldc);
        }
        for piece in pieces(self.w.rows(), self.step, MIN_SPLIT) {
            let panel = PackedA::from_weight(self.w, piece.start, piece.len());
            gemm_packed(isa, &panel, &packed, &mut dst[piece.start * ldc..], ldc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::matmul;
    use crate::kernels::scratch::TIERS;

    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * seed % 23) as f32 - 11.0) / 7.0)
            .collect()
    }

    #[test]
    fn panels_equal_one_matmul_bit_for_bit() {
        // k long enough for several of gemm's k-blocks; 13 input rows (≤ 64, like the time
        // embedding's batch), so only the `MIN_SPLIT` floor on panel rows keeps the blocking fixed.
        let (m, k, n) = (13, 700, 150);
        let x = data(m * k, 7);
        let wdata = data(n * k, 5);
        let w = DenseRows {
            data: &wdata,
            rows: n,
        };
        let mut want = vec![0.0; m * n];
        matmul(&x, &wdata, &mut want, m, k, n, Transpose::Yes, false);
        // Budgets: every tier, everything in one panel, 3 rows per panel (floored), 1 row.
        let budgets = TIERS
            .map(|t| t.weight_panel)
            .into_iter()
            .chain([n * k, 3 * k, 1]);
        for budget in budgets.clone() {
            let mut y = vec![0.0; m * n];
            matmul_weight_t_budget(&x, &w, &mut y, budget);
            assert!(y == want, "linear, budget {budget}");
        }
        let b = data(k * m, 3);
        let mut want = vec![0.0; n * m];
        matmul(&wdata, &b, &mut want, n, k, m, Transpose::No, false);
        for budget in budgets {
            let mut dst = vec![0.0; n * m];
            LhsPanels::with_budget(&w, budget, None).multiply(&b, m, &mut dst, m);
            assert!(dst == want, "lhs, budget {budget}");
        }
    }
}
