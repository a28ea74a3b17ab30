//! Rough dequantization throughput, scalar vs the fast (SIMD) path, in GB/s of f32 output.
//!
//! `cargo run -p sdcap-quant --release --example dequant_throughput [values]`
//! (default 65,536 values per call: a cache-resident panel, as a quantized matmul uses).

use std::time::Instant;

use quant::GgmlType;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(65_536, |s| s.parse().expect("values"));
    let n = n.div_ceil(256) * 256;
    let values: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.618).sin() * 0.05).collect();
    println!("{n} values per call; GB/s of f32 output (best of 5 runs)");
    println!(
        "{:6} {:>8} {:>8} {:>7}",
        "type", "scalar", "fast", "speedup"
    );
    for ty in GgmlType::all() {
        let info = ty.info();
        let mut bytes = vec![0u8; n / info.block_elems * info.block_bytes];
        quant::quantize(ty, &values, &mut bytes);
        let mut out = vec![0.0f32; n];
        let scalar = rate(|| quant::dequantize_scalar(ty, &bytes, &mut out), n);
        let fast = rate(|| quant::dequantize(ty, &bytes, &mut out), n);
        let mark = if quant::has_fast_dequantizer(ty) {
            ""
        } else {
            " (no SIMD path)"
        };
        println!(
            "{:6} {scalar:8.2} {fast:8.2} {:6.1}x{mark}",
            ty.name(),
            fast / scalar
        );
    }
}

/// GB/s of f32 output for `f`, best of 5 runs of enough calls to take ~50 ms.
fn rate(mut f: impl FnMut(), n: usize) -> f64 {
    let start = Instant::now();
    f();
    let once = start.elapsed().as_secs_f64().max(1e-7);
    let reps = ((0.05 / once) as usize).max(1);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(start.elapsed().as_secs_f64() / reps as f64);
    }
    (n * 4) as f64 / best / 1e9
}
