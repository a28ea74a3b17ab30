//! Denormal flushing for compute threads (DESIGN.md, Numerics). Random-weight models and the
//! tails of softmax and GELU produce values below f32's smallest normal (1.2e-38); x86 cores
//! handle those in microcode, tens of times slower per operation, and a value that small changes
//! no result beyond f32 resolution.

/// Sets flush-to-zero (results) and denormals-are-zero (inputs) for SSE/AVX arithmetic on the
/// calling thread; a no-op on other architectures. Every thread that computes must call it, or
/// results would depend on which thread ran a task: `compute_pool` does so for its workers.
pub fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    {
        const FTZ: u32 = 1 << 15;
        const DAZ: u32 = 1 << 6;
        let csr = mxcsr() | FTZ | DAZ;
        // SAFETY: `ldmxcsr` loads this thread's SSE control/status register from a valid u32;
        // FTZ and DAZ only change how subnormal values are rounded, not memory or control flow.
        unsafe {
            std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly, preserves_flags));
        }
    }
}

/// Whether the calling thread flushes denormals (always false off x86-64).
pub fn denormals_flushed() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        mxcsr() & (1 << 15 | 1 << 6) == (1 << 15 | 1 << 6)
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
fn mxcsr() -> u32 {
    let mut csr = 0u32;
    // SAFETY: `stmxcsr` stores the 32-bit MXCSR into the u32 it is given.
    unsafe {
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
    }
    csr
}

/// A rayon pool builder of `threads` workers (0: rayon's default) that flush denormals. The
/// thread that calls into the pool must flush too if it computes outside it.
pub fn compute_pool(threads: usize) -> rayon::ThreadPoolBuilder {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .start_handler(|_| flush_denormals())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_workers_flush_denormals() {
        let pool = compute_pool(2).build().unwrap();
        let flushed = pool.install(|| {
            // 1e-30 · 1e-10 is 1e-40, a denormal: zero when flushed.
            let tiny = std::hint::black_box(1e-30f32) * std::hint::black_box(1e-10f32);
            (denormals_flushed(), tiny)
        });
        if cfg!(target_arch = "x86_64") {
            assert_eq!(flushed, (true, 0.0));
        }
    }
}
