//! TAESD's memory model (`Taesd::decode_peak_bytes`, `encode_peak_bytes`, which the plan charges)
//! is an upper bound on what a decode and an encode really allocate, whole or in bands.
//!
//! A counting global allocator measures the heap peak of each call (all threads: maps, band
//! slabs, kernel scratch, output); this file's tests run one at a time.

mod common;

use common::counting::{measured, serial, Counting};

use sdcap::nn::taesd::{standard_decode_peak_bytes, Taesd};
use sdcap::sampling::rng::TorchRng;
use sdcap::Tensor;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Decode and encode at one band (64²) and several (a 40×24 latent: 320×192, three decoder and
/// three encoder bands): measured ≤ predicted, and predicted within a small multiple of measured
/// plus the fixed allowances (so the model is not vacuous).
#[test]
fn the_memory_model_bounds_decode_and_encode() {
    let _one = serial();
    common::compute_threads();
    let taesd = Taesd::open(&common::fixtures().join("tiny-taesd/diffusers")).unwrap();
    let threads = rayon::current_num_threads() as u64;
    let fixed = (1 << 20) + (2 << 20) * threads + (64 << 20);
    for (lh, lw) in [(8, 8), (40, 24)] {
        let mut rng = TorchRng::new(3);
        let latent = Tensor::new(vec![1, 4, lh, lw], rng.randn(&[1, 4, lh, lw]));
        let (image, used) = measured(|| taesd.decode(&latent).unwrap());
        let predicted = taesd.decode_peak_bytes(lh, lw);
        eprintln!("decode {lh}x{lw}: {used} B used, {predicted} B predicted");
        assert!(used <= predicted, "decode {lh}x{lw}: {used} > {predicted}");
        assert!(
            predicted <= 3 * used + fixed,
            "decode {lh}x{lw}: {predicted} ≫ {used}"
        );
        let image = Tensor::new(
            image.shape.clone(),
            image.data.iter().map(|v| v.clamp(-1.0, 1.0)).collect(),
        );
        let (_, used) = measured(|| taesd.encode(&image).unwrap());
        let predicted = taesd.encode_peak_bytes(8 * lh, 8 * lw);
        eprintln!("encode {lh}x{lw}: {used} B used, {predicted} B predicted");
        assert!(used <= predicted, "encode {lh}x{lw}: {used} > {predicted}");
        assert!(
            predicted <= 3 * used + fixed,
            "encode {lh}x{lw}: {predicted} ≫ {used}"
        );
    }
}

/// The bands keep the full-resolution maps out of memory: at 1024² the decode is predicted well
/// under the three 64-channel 1024² maps (768 MiB) a whole-map Block would hold, and the
/// standard decoder's estimate (the refusal's hint) is the loaded one's.
#[test]
fn bands_bound_the_1024_decode() {
    let taesd = Taesd::open(&common::fixtures().join("tiny-taesd/diffusers")).unwrap();
    let predicted = taesd.decode_peak_bytes(128, 128);
    assert_eq!(predicted, standard_decode_peak_bytes(4, 128, 128));
    assert!(predicted < 400 << 20, "{} MiB", predicted >> 20);
    assert!(taesd.decode_peak_bytes(64, 64) < predicted);
    assert_eq!(taesd.decode_peak_bytes(1 << 40, 1 << 40), u64::MAX);
}
