//! TAESD's memory model (`Taesd::decode_peak_bytes`, `encode_peak_bytes`, which the plan charges)
//! is an upper bound on what a decode and an encode really allocate, whole or in bands.
//!
//! A counting global allocator measures the heap peak of each call (all threads: maps, band
//! slabs, kernel scratch, output); this file's tests run one at a time.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sdcap::nn::taesd::{standard_decode_peak_bytes, Taesd};
use sdcap::sampling::rng::TorchRng;
use sdcap::Tensor;

struct Counting;

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

fn count(size: usize) {
    let now = LIVE.fetch_add(size as u64, Ordering::Relaxed) + size as u64;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: defers every call to `System` unchanged; only counts the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            count(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            count(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
            count(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn measured<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed) - before)
}

/// Decode and encode at one band (64²) and several (a 40×24 latent: 320×192, three decoder and
/// three encoder bands): measured ≤ predicted, and predicted within a small multiple of measured
/// plus the fixed allowances (so the model is not vacuous).
#[test]
fn the_memory_model_bounds_decode_and_encode() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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
