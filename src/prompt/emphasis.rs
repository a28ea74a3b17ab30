//! A1111's emphasis ("Original", its default, `modules/sd_emphasis.py`): after the text encoder,
//! each position's output is multiplied by its token's weight, then the chunk is rescaled so that
//! its mean over all positions and channels is what it was before.

use crate::tokenizer::CONTEXT_LEN;

use super::TokenChunk;

/// Applies the weights to encoder output `z` = [chunks, 77, width], chunk by chunk (A1111 encodes
/// each chunk separately and takes the mean of that call's output). A chunk whose weights are all 1
/// is left as it is, which is exactly what the definition gives. If a chunk's weighted mean is 0
/// (only possible with zero or negative weights) the rescale, a division by 0, is skipped.
pub fn apply_emphasis(z: &mut [f32], weights: &[f32], width: usize) {
    assert_eq!(
        z.len(),
        weights.len() * width,
        "one weight per encoded position"
    );
    let chunk_len = CONTEXT_LEN * width;
    for (z, weights) in z.chunks_mut(chunk_len).zip(weights.chunks(CONTEXT_LEN)) {
        if weights.iter().all(|&w| w == 1.0) {
            continue;
        }
        // In f64 from the f32 outputs, with one rounding at the end: the mean of a LayerNorm output
        // can be near 0, where rounded products would make the rescale noisy.
        let original_sum: f64 = z.iter().map(|&v| f64::from(v)).sum();
        let weighted_sum: f64 = z
            .chunks(width)
            .zip(weights)
            .map(|(row, &w)| f64::from(w) * row.iter().map(|&v| f64::from(v)).sum::<f64>())
            .sum();
        // Sums over the same count: their ratio is the ratio of the means.
        let rescale = if weighted_sum != 0.0 {
            original_sum / weighted_sum
        } else {
            1.0
        };
        for (row, &w) in z.chunks_mut(width).zip(weights) {
            let by = f64::from(w) * rescale;
            row.iter_mut()
                .for_each(|v| *v = (f64::from(*v) * by) as f32);
        }
    }
}

/// The conditioning of `chunks` [chunks × 77, width]: `encode(ids, n)` runs the text encoder on a
/// batch of `n` chunks (e.g. `|ids, n| encoder.forward(ids, n, clip_skip)`), then the emphasis is
/// applied per chunk. Chunk outputs stay in order, which is their concatenation along the token
/// axis; so passing a negative's chunks followed by the prompt's (same count) gives the guided
/// batch [2, chunks × 77, width] in one encoder call.
pub fn encode_chunks(
    chunks: &[TokenChunk],
    width: usize,
    encode: impl FnOnce(&[u32], usize) -> Vec<f32>,
) -> Vec<f32> {
    let ids: Vec<u32> = chunks.iter().flat_map(|c| c.ids.iter().copied()).collect();
    let weights: Vec<f32> = chunks
        .iter()
        .flat_map(|c| c.weights.iter().copied())
        .collect();
    let mut z = encode(&ids, chunks.len());
    apply_emphasis(&mut z, &weights, width);
    z
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition on a small chunk, written out in f64: z·w per position, times mean(z)/mean(z·w).
    #[test]
    fn matches_the_definition() {
        let width = 3;
        let z: Vec<f32> = (0..2 * CONTEXT_LEN * width)
            .map(|i| ((i * 37 % 101) as f32 - 40.0) / 17.0)
            .collect();
        let mut weights = vec![1.0f32; 2 * CONTEXT_LEN];
        weights[3] = 1.5;
        weights[4] = 0.5;
        weights[10] = 1.21;
        // The second chunk is unweighted: it must come out unchanged.
        let mut got = z.clone();
        apply_emphasis(&mut got, &weights, width);

        let chunk = &z[..CONTEXT_LEN * width];
        let n = chunk.len() as f64;
        let mean: f64 = chunk.iter().map(|&v| v as f64).sum::<f64>() / n;
        let scaled: Vec<f64> = chunk
            .iter()
            .enumerate()
            .map(|(i, &v)| v as f64 * weights[i / width] as f64)
            .collect();
        let new_mean = scaled.iter().sum::<f64>() / n;
        for (i, s) in scaled.iter().enumerate() {
            let want = s * mean / new_mean;
            assert!(
                (got[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{i}: {} vs {want}",
                got[i]
            );
        }
        assert_eq!(got[CONTEXT_LEN * width..], z[CONTEXT_LEN * width..]);
        let got_mean: f64 = got[..CONTEXT_LEN * width]
            .iter()
            .map(|&v| v as f64)
            .sum::<f64>()
            / n;
        assert!((got_mean - mean).abs() < 1e-6, "{got_mean} vs {mean}");
    }

    #[test]
    fn a_zero_mean_is_not_divided_by() {
        let width = 1;
        let mut z = vec![0.0f32; CONTEXT_LEN];
        z[0] = 1.0;
        z[1] = 1.0;
        let mut weights = vec![1.0f32; CONTEXT_LEN];
        weights[1] = -1.0;
        apply_emphasis(&mut z, &weights, width);
        assert_eq!(&z[..3], [1.0, -1.0, 0.0]);
    }
}
