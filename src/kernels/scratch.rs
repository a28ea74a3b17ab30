//! The kernels' scratch budgets: how much working memory one convolution patch, one weight panel,
//! one attention query chunk and one feed-forward chunk may take.
//!
//! Every setting gives the same output bits: each output element is one dot product whose
//! reduction order depends only on its length (gemm's k-blocking depends only on k once a product
//! has more than 64 rows or columns, and the tile floors below keep every split product there), so
//! a budget only trades speed for memory. The governor chooses a tier per job (`governor::plan`)
//! and may tighten it while running (`governor::watch`).
//!
//! A `Scratch` is a value passed down: the pipeline hands its job's tier to every layer's forward
//! call, and the layers to every kernel call, so jobs in one process may run with different tiers
//! at once. Changing the tier between calls is always safe.

use std::ops::Range;

use serde::Serialize;

use super::attention::{attention_scratch_bytes, AttentionShape};

/// Budgets in f32 values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Scratch {
    /// Gathered im2col patch of one convolution tile.
    pub conv_patch: usize,
    /// One weight panel converted to f32; a convolution also keeps its whole filter bank when it
    /// fits one panel.
    pub weight_panel: usize,
    /// Queries per attention task (rows, not values): sets the kernel's per-thread tiles
    /// (`attention_scratch_bytes`); any value gives the same bits by construction.
    pub attention_query_chunk: usize,
    /// The widened feed-forward (GEGLU) activations of one token chunk.
    pub ff_chunk: usize,
}

/// The tiers the governor tries, fastest first. The first is what the kernels were tuned with:
/// 16 MiB patch and panel (4 MiB panels cost 15% more CPU on the full UNet + VAE), 256-query
/// attention chunks (up to 8% faster than 64 on SD1.5 shapes), 16 MiB feed-forward chunks
/// (each chunk converts the feed-forward weights again: at 4 MiB the 16²-level blocks converted
/// theirs 5–6 times per call, 0.5 CPU-s of a 23 CPU-s step at 512²). The second gives up only
/// the cheap levers (attention and feed-forward chunks, together 2–4% of a step's CPU) and keeps
/// the patch and panel Winograd's blocking lives on: smaller patches and panels cost a 512² step
/// 1.2× (`benches/CAPS.md`).
pub const TIERS: [Scratch; 4] = [
    Scratch {
        conv_patch: 4 << 20,
        weight_panel: 4 << 20,
        attention_query_chunk: 256,
        ff_chunk: 4 << 20,
    },
    Scratch {
        conv_patch: 4 << 20,
        weight_panel: 4 << 20,
        attention_query_chunk: 64,
        ff_chunk: 1 << 20,
    },
    Scratch {
        conv_patch: 1 << 20,
        weight_panel: 2 << 20,
        attention_query_chunk: 64,
        ff_chunk: 1 << 20,
    },
    Scratch {
        conv_patch: 1 << 18,
        weight_panel: 1 << 20,
        attention_query_chunk: 16,
        ff_chunk: 1 << 16,
    },
];

/// The smallest tier: the plan's last resort, and what the refusal's hints assume.
pub const SMALLEST: Scratch = TIERS[TIERS.len() - 1];

/// Products split into pieces keep more than this many rows or columns, so that every split
/// gives the same bits as the unsplit product (see the module note).
pub const MIN_SPLIT: usize = 65;

/// Splits `0..total` into consecutive pieces of `step` (at least `min`), the last one absorbing a
/// tail shorter than `min`: every piece has at least `min` items unless `total` itself is smaller.
/// A piece is at most `step.max(min) + min - 1` long.
pub fn pieces(total: usize, step: usize, min: usize) -> impl Iterator<Item = Range<usize>> {
    let step = step.max(min).max(1);
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= total {
            return None;
        }
        let mut end = (start + step).min(total);
        if total - end < min {
            end = total;
        }
        let piece = start..end;
        start = end;
        Some(piece)
    })
}

/// The longest piece `pieces(total, step, min)` gives.
pub fn longest_piece(total: usize, step: usize, min: usize) -> usize {
    (step.max(min).max(1) + min.saturating_sub(1)).min(total)
}

impl Default for Scratch {
    fn default() -> Self {
        TIERS[0]
    }
}

impl Scratch {
    /// The next smaller tier, if any.
    pub fn smaller(&self) -> Option<Scratch> {
        let i = TIERS.iter().position(|t| t == self)?;
        TIERS.get(i + 1).copied()
    }

    /// Upper bound on the scratch alive at once, in bytes, given the longest weight or im2col row
    /// (in_ch · k · k for a convolution), the widest convolution output row, and the longest key
    /// sequence and widest head of the model's attention: the patch, a panel plus a resident filter
    /// bank, the attention kernel's per-thread tiles, and the feed-forward chunk with its gated
    /// half. Each split piece may be up to `MIN_SPLIT` rows (or output rows) longer than its budget
    /// (`pieces`).
    pub fn peak_bytes(
        &self,
        max_row_len: usize,
        max_out_w: usize,
        attention: (usize, usize),
        threads: usize,
    ) -> u64 {
        let row = max_row_len as u64;
        let min = MIN_SPLIT as u64;
        let patch_floor = row.saturating_mul(min + max_out_w as u64);
        let patch = (self.conv_patch as u64).max(patch_floor) + patch_floor;
        let panels = 2 * (self.weight_panel as u64 + min * row);
        let ff = 2 * self.ff_chunk as u64;
        let (keys, head_width) = attention;
        let shape = AttentionShape {
            batch: 1,
            q_len: self.attention_query_chunk,
            kv_len: keys,
            channels: head_width,
            heads: 1,
            causal: false,
        };
        let attention = attention_scratch_bytes(shape, self.attention_query_chunk, threads);
        (patch + panels + ff)
            .saturating_mul(4)
            .saturating_add(attention)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_in_order_and_keep_the_minimum() {
        for total in 0..200 {
            for step in [1, 7, 64, 65, 100, 300] {
                let got: Vec<_> = pieces(total, step, MIN_SPLIT).collect();
                let mut next = 0;
                for p in &got {
                    assert_eq!(p.start, next);
                    assert!(p.len() >= MIN_SPLIT.min(total), "{total} {step} {got:?}");
                    assert!(p.len() <= longest_piece(total, step, MIN_SPLIT));
                    next = p.end;
                }
                assert_eq!(next, total);
            }
        }
    }

    #[test]
    fn tiers_shrink_and_end() {
        let mut bytes = Vec::new();
        let mut tier = Some(TIERS[0]);
        while let Some(t) = tier {
            bytes.push(t.peak_bytes(11520, 64, (4096, 40), 2));
            tier = t.smaller();
        }
        assert_eq!(bytes.len(), TIERS.len());
        assert!(bytes.windows(2).all(|w| w[1] < w[0]), "{bytes:?}");
    }
}
