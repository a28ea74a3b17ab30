use super::*;

fn naive(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (b, lq, lk, c, heads): (usize, usize, usize, usize, usize),
    causal: bool,
) -> Vec<f32> {
    let d = c / heads;
    let mut out = vec![0.0; b * lq * c];
    for bi in 0..b {
        for h in 0..heads {
            for i in 0..lq {
                let s: Vec<f64> = (0..lk)
                    .map(|j| {
                        if causal && j > i {
                            return f64::NEG_INFINITY;
                        }
                        (0..d)
                            .map(|e| {
                                (q[(bi * lq + i) * c + h * d + e]
                                    * k[(bi * lk + j) * c + h * d + e])
                                    as f64
                            })
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for e in 0..d {
                    out[(bi * lq + i) * c + h * d + e] = ((0..lk)
                        .map(|j| (s[j] - m).exp() / z * v[(bi * lk + j) * c + h * d + e] as f64)
                        .sum::<f64>())
                        as f32;
                }
            }
        }
    }
    out
}

fn shape(
    (b, lq, lk, c, heads): (usize, usize, usize, usize, usize),
    causal: bool,
) -> AttentionShape {
    AttentionShape {
        batch: b,
        q_len: lq,
        kv_len: lk,
        channels: c,
        heads,
        causal,
    }
}

/// Every lane implementation this CPU runs.
fn isas() -> Vec<Isa> {
    let mut all = vec![Isa::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            all.push(Isa::Avx2);
        }
        if is_x86_feature_detected!("avx512f") {
            all.push(Isa::Avx512);
        }
    }
    all
}

fn max_err(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn chunked_equals_naive_with_and_without_mask() {
    let dims = (2, 13, 13, 12, 3);
    let n = 2 * 13 * 12;
    let q: Vec<f32> = (0..n).map(|i| ((i * 7 % 19) as f32 - 9.0) / 9.0).collect();
    let k: Vec<f32> = (0..n).map(|i| ((i * 11 % 17) as f32 - 8.0) / 8.0).collect();
    let v: Vec<f32> = (0..n).map(|i| ((i * 5 % 13) as f32 - 6.0) / 6.0).collect();
    for causal in [false, true] {
        let want = naive(&q, &k, &v, dims, causal);
        for isa in isas() {
            for chunk in [1, 4, 13, 100] {
                let got = attention_with(&q, &k, &v, shape(dims, causal), chunk, isa);
                // Outputs are convex combinations of values ≤ 1: 1e-5 covers f32 rounding.
                let err = max_err(&got, &want);
                assert!(err < 1e-5, "{isa:?} causal {causal} chunk {chunk}: {err}");
            }
        }
    }
}

/// Several key chunks (online rescaling), key and value tails, a query tail and a head width
/// that is not a multiple of 8; larger scores so the running maximum moves.
#[test]
fn multi_chunk_equals_naive() {
    for (dims, causal) in [((1, 37, 1100, 14, 2), false), ((2, 77, 77, 24, 3), true)] {
        let (b, lq, lk, c, _) = dims;
        let q = common_random(b * lq * c, 1, 3.0);
        let k = common_random(b * lk * c, 2, 3.0);
        let v = common_random(b * lk * c, 3, 1.0);
        let want = naive(&q, &k, &v, dims, causal);
        for isa in isas() {
            let got = attention_with(&q, &k, &v, shape(dims, causal), 16, isa);
            let err = max_err(&got, &want);
            assert!(err < 2e-5, "{isa:?} {dims:?}: {err}");
        }
    }
}

/// The plan's query chunk and the thread count must not change a single bit.
#[test]
fn bits_do_not_depend_on_query_chunk_or_threads() {
    let dims = (2, 100, 1000, 80, 2);
    let (b, lq, lk, c, _) = dims;
    let q = common_random(b * lq * c, 4, 2.0);
    let k = common_random(b * lk * c, 5, 2.0);
    let v = common_random(b * lk * c, 6, 1.0);
    for causal in [false, true] {
        let s = shape(dims, causal);
        let want = attention_chunked(&q, &k, &v, s, 100);
        for chunk in [1, 7, 16, 33, 64] {
            assert!(
                attention_chunked(&q, &k, &v, s, chunk) == want,
                "chunk {chunk}"
            );
        }
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let got = pool.install(|| attention_chunked(&q, &k, &v, s, 5));
            assert!(got == want, "{threads} threads");
        }
    }
}

#[test]
fn exp2_is_within_two_ulp_and_zero_below_range() {
    for isa in isas() {
        let mut worst = 0.0f64;
        let mut x = -126.0f32;
        while x <= 0.0 {
            let lanes: [f32; 16] = std::array::from_fn(|i| x + i as f32 * 1.3e-4);
            let got = exp2_lanes(isa, lanes);
            for (g, l) in got.iter().zip(lanes) {
                let want = (l as f64).exp2();
                worst = worst.max(((*g as f64 - want) / want).abs());
            }
            x += 1.03e-3;
        }
        assert!(worst < 2.4e-7, "{isa:?}: worst relative error {worst:e}");
        let edge = exp2_lanes(
            isa,
            [
                f32::NEG_INFINITY,
                -127.0,
                -200.0,
                0.0,
                -1.0,
                -0.0,
                -3.0,
                -20.0,
                f32::NEG_INFINITY,
                -127.0,
                -200.0,
                0.0,
                -1.0,
                -0.0,
                -3.0,
                -20.0,
            ],
        );
        let want = [0.0, 0.0, 0.0, 1.0, 0.5, 1.0, 0.125, 2.0f32.powi(-20)];
        let want: [f32; 16] = std::array::from_fn(|i| want[i % 8]);
        assert_eq!(edge, want, "{isa:?}");
    }
}

fn exp2_lanes(isa: Isa, x: [f32; 16]) -> [f32; 16] {
    let mut out = [0.0; 16];
    match isa {
        // SAFETY: `isas` returns Avx2/Avx512 only when detected.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { exp2_avx2(&x, &mut out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { exp2_avx512(&x, &mut out) },
        Isa::Portable => Portable::load_slice(&x).exp2().store(&mut out),
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp2_avx2(x: &[f32; 16], out: &mut [f32; 16]) {
    Avx2::load_slice(x).exp2().store(out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn exp2_avx512(x: &[f32; 16], out: &mut [f32; 16]) {
    Avx512::load_slice(x).exp2().store(out)
}

fn common_random(len: usize, seed: u64, amplitude: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            amplitude * ((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

#[test]
fn scratch_is_counted() {
    let s = shape((2, 4096, 4096, 320, 8), false);
    // 4 tiles × 16 lanes × (2 × 40 + 2) + 102 keys × 16, in bytes, on 2 threads.
    assert_eq!(s.kv_chunk(), 102);
    assert_eq!(
        attention_scratch_bytes(s, 64, 2),
        2 * 4 * (64 * 82 + 102 * 16)
    );
}

/// AVX2 and AVX-512 run the same operations per lane in the same order: the same bits.
#[test]
fn simd_paths_give_the_same_bits() {
    let dims = (2, 70, 300, 80, 2);
    let (b, lq, lk, c, _) = dims;
    let q = common_random(b * lq * c, 7, 3.0);
    let k = common_random(b * lk * c, 8, 3.0);
    let v = common_random(b * lk * c, 9, 1.0);
    let simd: Vec<Isa> = isas().into_iter().filter(|&i| i != Isa::Portable).collect();
    for causal in [false, true] {
        let runs: Vec<Vec<f32>> = simd
            .iter()
            .map(|&isa| attention_with(&q, &k, &v, shape(dims, causal), 16, isa))
            .collect();
        for (isa, run) in simd.iter().zip(&runs).skip(1) {
            assert!(run == &runs[0], "{isa:?} differs from {:?}", simd[0]);
        }
    }
}
