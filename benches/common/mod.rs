//! Shared by the kernel and end-to-end benchmarks: the machine's measured f32 FMA peak, the op list
//! of one SD1.5 UNet call (512², CFG batch 2), random inputs and timers.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use sdcap::kernels::scratch::TIERS;
use sdcap::kernels::{self, AttentionShape, Conv2dGeometry, DenseRows, WinogradTile};
use sdcap::tensor::Tensor;

/// Deterministic pseudo-random values in [-1, 1).
pub fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Starts the global rayon pool as the CLI does (workers and the calling thread flush denormals),
/// unless `SDCAP_BENCH_DENORMALS=1` asks to keep denormals (to measure what flushing buys).
/// Returns a note for the output.
pub fn start_compute_threads() -> &'static str {
    if std::env::var_os("SDCAP_BENCH_DENORMALS").is_some_and(|v| v == "1") {
        return "denormals kept";
    }
    kernels::compute_pool(0)
        .build_global()
        .expect("the global pool is not started yet");
    kernels::flush_denormals();
    "denormals flushed"
}

/// Load average over the last minute (`/proc/loadavg`), if readable.
pub fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Logical CPUs this process may use.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// "uncontended" when the 1-minute load average is below half a CPU, else "CONTENDED (load …)".
pub fn contention_note() -> String {
    match loadavg() {
        Some(l) if l < 0.5 => format!("uncontended (load {l:.2})"),
        Some(l) => format!("CONTENDED (load {l:.2} on {} CPUs)", cpus()),
        None => "load unknown".into(),
    }
}

/// Process CPU time (user + system) so far.
pub fn cpu_time() -> Duration {
    rusage(libc::RUSAGE_SELF)
}

/// CPU time of the calling thread so far. Code that runs on the caller's thread while the rayon
/// pool's workers are idle is the serial part of a step.
pub fn thread_cpu_time() -> Duration {
    rusage(libc::RUSAGE_THREAD)
}

fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: getrusage only writes the struct we hand it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Peak f32 FLOP/s of `threads` threads each running an independent-accumulator FMA loop
/// (AVX-512 or AVX2+FMA where the CPU has it, else a scalar `mul_add` loop). Best of 50 short (~2 ms) windows,
/// so that on a shared machine some window sees every thread on its own core.
pub fn peak_flops(threads: usize) -> f64 {
    let iters: u64 = 1_000_000;
    let mut best = 0.0f64;
    for _ in 0..50 {
        let start = Instant::now();
        let flops: f64 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|_| s.spawn(move || fma_loop(iters)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        best = best.max(flops / start.elapsed().as_secs_f64());
    }
    best
}

/// Runs the FMA loop and returns the FLOPs it did.
fn fma_loop(iters: u64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: as below. 512-bit FMAs: twice AVX2's peak where the core has two 512-bit FMA
        // units (Intel server parts), the same where it splits them (Zen 4).
        let r = unsafe { fma_loop_avx512(iters) };
        std::hint::black_box(r);
        return (iters * ACCUMULATORS as u64 * 16 * 2) as f64;
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features the function is compiled for were detected just above.
        let r = unsafe { fma_loop_avx2(iters) };
        std::hint::black_box(r);
        return (iters * ACCUMULATORS as u64 * 8 * 2) as f64;
    }
    let mut acc = [1.0f32; ACCUMULATORS];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    (iters * ACCUMULATORS as u64 * 2) as f64
}

/// Independent FMA chains: enough to cover FMA latency (4–5 cycles) × 2 ports.
const ACCUMULATORS: usize = 12;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop_avx512(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    let mut acc = [_mm512_set1_ps(1.0); ACCUMULATORS];
    for _ in 0..iters {
        for r in acc.iter_mut() {
            *r = _mm512_fmadd_ps(*r, a, b);
        }
    }
    let mut sum = _mm512_setzero_ps();
    for r in acc {
        sum = _mm512_add_ps(sum, r);
    }
    _mm512_reduce_add_ps(sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    let mut acc = [_mm256_set1_ps(1.0); ACCUMULATORS];
    for _ in 0..iters {
        for r in acc.iter_mut() {
            *r = _mm256_fmadd_ps(*r, a, b);
        }
    }
    let mut sum = _mm256_setzero_ps();
    for r in acc {
        sum = _mm256_add_ps(sum, r);
    }
    let mut out = [0.0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), sum);
    out.iter().sum()
}

/// What a profile line groups under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Conv3x3,
    Conv1x1Linear,
    Attention,
    Norm,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Conv3x3 => "conv3x3",
            Kind::Conv1x1Linear => "conv1x1/linear",
            Kind::Attention => "attention",
            Kind::Norm => "group/layer norm",
        }
    }
}

/// Which convolution kernel a conv op runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ConvPath {
    /// What `kernels::conv2d` picks for the shape.
    Auto,
    ImplicitGemm,
    /// 3×3 stride 1 only.
    Winograd(WinogradTile),
}

/// One kernel call with its shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    /// `x` [n, ci, h, w] (the input size), square kernel `k`, `stride`, padding k/2.
    Conv {
        n: usize,
        ci: usize,
        co: usize,
        h: usize,
        w: usize,
        k: usize,
        stride: usize,
        path: ConvPath,
    },
    /// `[m, k] · Wᵀ` with W [n, k].
    Linear {
        m: usize,
        k: usize,
        n: usize,
    },
    /// FLOPs count the whole score matrix, masked or not (the kernel computes it all).
    Attention {
        batch: usize,
        q: usize,
        kv: usize,
        channels: usize,
        heads: usize,
        causal: bool,
    },
    GroupNorm {
        n: usize,
        c: usize,
        hw: usize,
        silu: bool,
    },
    LayerNorm {
        m: usize,
        c: usize,
    },
}

impl Op {
    pub fn kind(&self) -> Kind {
        match *self {
            Op::Conv { k: 3, .. } => Kind::Conv3x3,
            Op::Conv { .. } | Op::Linear { .. } => Kind::Conv1x1Linear,
            Op::Attention { .. } => Kind::Attention,
            Op::GroupNorm { .. } | Op::LayerNorm { .. } => Kind::Norm,
        }
    }

    /// Multiply-adds counted as 2 FLOPs; norms count 0 (they are memory-bound, see `bytes`).
    pub fn flops(&self) -> f64 {
        match *self {
            Op::Conv {
                n,
                ci,
                co,
                h,
                w,
                k,
                stride,
                ..
            } => {
                let (oh, ow) = Conv2dGeometry {
                    kernel: k,
                    stride,
                    pad: k / 2,
                }
                .out_size(h, w);
                2.0 * (n * co * ci * k * k * oh * ow) as f64
            }
            Op::Linear { m, k, n } => 2.0 * (m * k * n) as f64,
            // QKᵀ and P·V.
            Op::Attention {
                batch,
                q,
                kv,
                channels,
                ..
            } => 4.0 * (batch * q * kv * channels) as f64,
            Op::GroupNorm { .. } | Op::LayerNorm { .. } => 0.0,
        }
    }

    /// Activation bytes moved at least once (read + write), for the memory-bound norms.
    pub fn bytes(&self) -> f64 {
        match *self {
            Op::GroupNorm { n, c, hw, .. } => 8.0 * (n * c * hw) as f64,
            Op::LayerNorm { m, c } => 8.0 * (m * c) as f64,
            _ => 0.0,
        }
    }

    pub fn label(&self) -> String {
        match *self {
            Op::Conv {
                n,
                ci,
                co,
                h,
                k,
                stride,
                ..
            } => format!(
                "conv{k}x{k}{} n{n} {ci}->{co} @{h}²",
                if stride > 1 { " s2" } else { "" }
            ),
            Op::Linear { m, k, n } => format!("linear {m}x{k}x{n}"),
            Op::Attention {
                batch,
                q,
                kv,
                channels,
                heads,
                causal,
            } => format!(
                "attention b{batch} {q}x{kv} {heads}h×{}{}",
                channels / heads,
                if causal { " causal" } else { "" }
            ),
            Op::GroupNorm { n, c, hw, silu } => {
                format!(
                    "group_norm{} n{n} c{c} {hw}px",
                    if silu { "+silu" } else { "" }
                )
            }
            Op::LayerNorm { m, c } => format!("layer_norm {m}x{c}"),
        }
    }

    /// Builds the inputs once; the returned closure runs the kernel.
    pub fn prepare(&self) -> Box<dyn FnMut()> {
        match *self {
            Op::Conv {
                n,
                ci,
                co,
                h,
                w,
                k,
                stride,
                path,
            } => {
                let x = Tensor::new(vec![n, ci, h, w], random(n * ci * h * w, 1));
                let wt = random(co * ci * k * k, 2);
                let bias = random(co, 3);
                let geo = Conv2dGeometry {
                    kernel: k,
                    stride,
                    pad: k / 2,
                };
                Box::new(move || {
                    let rows = DenseRows {
                        data: &wt,
                        rows: co,
                    };
                    let b = Some(bias.as_slice());
                    std::hint::black_box(match path {
                        ConvPath::Auto => kernels::conv2d(&x, &rows, b, geo, &TIERS[0]),
                        ConvPath::ImplicitGemm => {
                            kernels::conv2d_implicit_gemm(&x, &rows, b, geo, &TIERS[0])
                        }
                        ConvPath::Winograd(tile) => {
                            kernels::conv3x3_winograd(&x, &rows, b, tile, &TIERS[0])
                        }
                    });
                })
            }
            Op::Linear { m, k, n } => {
                let x = random(m * k, 1);
                let wt = random(n * k, 2);
                let mut y = vec![0.0f32; m * n];
                Box::new(move || {
                    let rows = DenseRows { data: &wt, rows: n };
                    kernels::matmul_weight_t(&x, &rows, &mut y, &TIERS[0]);
                    std::hint::black_box(&y);
                })
            }
            Op::Attention {
                batch,
                q,
                kv,
                channels,
                heads,
                causal,
            } => {
                let qv = random(batch * q * channels, 1);
                let kv_ = random(batch * kv * channels, 2);
                let vv = random(batch * kv * channels, 3);
                let shape = AttentionShape {
                    batch,
                    q_len: q,
                    kv_len: kv,
                    channels,
                    heads,
                    causal,
                };
                Box::new(move || {
                    std::hint::black_box(kernels::attention(&qv, &kv_, &vv, shape, &TIERS[0]));
                })
            }
            Op::GroupNorm { n, c, hw, silu } => {
                let x0 = random(n * c * hw, 1);
                let gamma = random(c, 2);
                let beta = random(c, 3);
                let mut x = Tensor::new(vec![n, c, hw, 1], x0.clone());
                Box::new(move || {
                    x.data.copy_from_slice(&x0);
                    kernels::group_norm(&mut x, 32, &gamma, &beta, 1e-5, silu);
                    std::hint::black_box(&x);
                })
            }
            Op::LayerNorm { m, c } => {
                let x0 = random(m * c, 1);
                let gamma = random(c, 2);
                let beta = random(c, 3);
                let mut x = x0.clone();
                Box::new(move || {
                    x.copy_from_slice(&x0);
                    kernels::layer_norm(&mut x, c, &gamma, &beta, 1e-5);
                    std::hint::black_box(&x);
                })
            }
        }
    }
}

/// Tokens of one prompt's context.
pub const CONTEXT_TOKENS: usize = 77;

/// The UNet of one full-size family, as the op list walks it.
#[derive(Clone, Copy)]
pub struct UnetShape {
    /// Channels per level.
    pub channels: &'static [usize],
    /// Transformer blocks per attention at each level (0: no attention there).
    pub depth: &'static [usize],
    pub mid_depth: usize,
    pub context_dim: usize,
    /// Attention heads of a transformer `c` channels wide.
    pub heads: fn(usize) -> usize,
    /// proj_in/proj_out as Linear (SD2.x, SDXL) instead of 1×1 convs (SD1.x).
    pub linear_proj: bool,
    /// SDXL's `label_emb` input width (pooled text + 6 size ids), 0 for none.
    pub adm_in: usize,
}

/// SD1.5: 320/640/1280/1280, attention at the first three levels, 8 heads, CLIP-L context.
pub const SD15: UnetShape = UnetShape {
    channels: &[320, 640, 1280, 1280],
    depth: &[1, 1, 1, 0],
    mid_depth: 1,
    context_dim: 768,
    heads: |_| 8,
    linear_proj: false,
    adm_in: 0,
};

/// SD2.1: SD1.5's levels, 64-wide heads, OpenCLIP-H context, linear projections.
pub const SD21: UnetShape = UnetShape {
    context_dim: 1024,
    heads: |c| c / 64,
    linear_proj: true,
    ..SD15
};

/// SDXL base: 320/640/1280, no attention at the top level, 2 and 10 transformer blocks below,
/// CLIP-L + bigG context (2048), label_emb from 2816 inputs.
pub const SDXL: UnetShape = UnetShape {
    channels: &[320, 640, 1280],
    depth: &[0, 2, 10],
    mid_depth: 10,
    context_dim: 2048,
    heads: |c| c / 64,
    linear_proj: true,
    adm_in: 2816,
};

fn resnet(ops: &mut Vec<Op>, n: usize, ci: usize, co: usize, s: usize) {
    let hw = s * s;
    ops.push(Op::GroupNorm {
        n,
        c: ci,
        hw,
        silu: true,
    });
    ops.push(Op::Conv {
        n,
        ci,
        co,
        h: s,
        w: s,
        k: 3,
        stride: 1,
        path: ConvPath::Auto,
    });
    ops.push(Op::Linear {
        m: n,
        k: 1280,
        n: co,
    });
    ops.push(Op::GroupNorm {
        n,
        c: co,
        hw,
        silu: true,
    });
    ops.push(Op::Conv {
        n,
        ci: co,
        co,
        h: s,
        w: s,
        k: 3,
        stride: 1,
        path: ConvPath::Auto,
    });
    if ci != co {
        ops.push(Op::Conv {
            n,
            ci,
            co,
            h: s,
            w: s,
            k: 1,
            stride: 1,
            path: ConvPath::Auto,
        });
    }
}

fn transformer(ops: &mut Vec<Op>, shape: &UnetShape, depth: usize, n: usize, c: usize, s: usize) {
    let t = s * s;
    let m = n * t;
    let mc = n * CONTEXT_TOKENS;
    let heads = (shape.heads)(c);
    // proj_in and proj_out: 1×1 convs or Linear over the tokens
    let pointwise = if shape.linear_proj {
        Op::Linear { m, k: c, n: c }
    } else {
        Op::Conv {
            n,
            ci: c,
            co: c,
            h: s,
            w: s,
            k: 1,
            stride: 1,
            path: ConvPath::Auto,
        }
    };
    ops.push(Op::GroupNorm {
        n,
        c,
        hw: t,
        silu: false,
    });
    ops.push(pointwise); // proj_in
    for _ in 0..depth {
        ops.push(Op::LayerNorm { m, c });
        for _ in 0..3 {
            ops.push(Op::Linear { m, k: c, n: c }); // q k v
        }
        ops.push(Op::Attention {
            batch: n,
            q: t,
            kv: t,
            channels: c,
            heads,
            causal: false,
        });
        ops.push(Op::Linear { m, k: c, n: c }); // out
        ops.push(Op::LayerNorm { m, c });
        ops.push(Op::Linear { m, k: c, n: c }); // q
        ops.push(Op::Linear {
            m: mc,
            k: shape.context_dim,
            n: c,
        }); // k
        ops.push(Op::Linear {
            m: mc,
            k: shape.context_dim,
            n: c,
        }); // v
        ops.push(Op::Attention {
            batch: n,
            q: t,
            kv: CONTEXT_TOKENS,
            channels: c,
            heads,
            causal: false,
        });
        ops.push(Op::Linear { m, k: c, n: c }); // out
        ops.push(Op::LayerNorm { m, c });
        ops.push(Op::Linear { m, k: c, n: 8 * c }); // GEGLU proj
        ops.push(Op::Linear { m, k: 4 * c, n: c }); // ff out
    }
    ops.push(pointwise); // proj_out
}

/// Every conv / linear / attention / norm call of one SD1.5 UNet forward on an `n`-image batch of
/// `latent`² latents (64 for 512² images; n = 2 under classifier-free guidance).
pub fn unet_ops(shape: &UnetShape, n: usize, latent: usize) -> Vec<Op> {
    let ch = shape.channels;
    let levels = ch.len();
    let mut ops = Vec::new();
    ops.push(Op::Linear {
        m: n,
        k: 320,
        n: 1280,
    }); // time embedding
    ops.push(Op::Linear {
        m: n,
        k: 1280,
        n: 1280,
    });
    if shape.adm_in > 0 {
        ops.push(Op::Linear {
            m: n,
            k: shape.adm_in,
            n: 1280,
        }); // label_emb
        ops.push(Op::Linear {
            m: n,
            k: 1280,
            n: 1280,
        });
    }
    ops.push(Op::Conv {
        n,
        ci: 4,
        co: 320,
        h: latent,
        w: latent,
        k: 3,
        stride: 1,
        path: ConvPath::Auto,
    });
    let mut skips = vec![320];
    let mut s = latent;
    let mut c = 320;
    for (level, &co) in ch.iter().enumerate() {
        for _ in 0..2 {
            resnet(&mut ops, n, c, co, s);
            c = co;
            if shape.depth[level] > 0 {
                transformer(&mut ops, shape, shape.depth[level], n, c, s);
            }
            skips.push(c);
        }
        if level + 1 < levels {
            ops.push(Op::Conv {
                n,
                ci: c,
                co: c,
                h: s,
                w: s,
                k: 3,
                stride: 2,
                path: ConvPath::Auto,
            });
            s /= 2;
            skips.push(c);
        }
    }
    resnet(&mut ops, n, c, c, s);
    transformer(&mut ops, shape, shape.mid_depth, n, c, s);
    resnet(&mut ops, n, c, c, s);
    for (level, &co) in ch.iter().enumerate().rev() {
        for _ in 0..3 {
            let skip = skips.pop().unwrap();
            resnet(&mut ops, n, c + skip, co, s);
            c = co;
            if shape.depth[level] > 0 {
                transformer(&mut ops, shape, shape.depth[level], n, c, s);
            }
        }
        if level > 0 {
            s *= 2;
            ops.push(Op::Conv {
                n,
                ci: c,
                co: c,
                h: s,
                w: s,
                k: 3,
                stride: 1,
                path: ConvPath::Auto,
            });
        }
    }
    ops.push(Op::GroupNorm {
        n,
        c,
        hw: s * s,
        silu: true,
    });
    ops.push(Op::Conv {
        n,
        ci: c,
        co: 4,
        h: s,
        w: s,
        k: 3,
        stride: 1,
        path: ConvPath::Auto,
    });
    ops
}

/// Best wall time and best process CPU time (all threads) of `runs` calls of `f`. On a shared
/// machine CPU time is the steadier figure: it does not count time the threads waited for a core.
pub fn best_wall_and_cpu(runs: usize, f: &mut dyn FnMut()) -> (Duration, Duration) {
    let (mut wall, mut cpu) = (Duration::MAX, Duration::MAX);
    for _ in 0..runs {
        let (t, c) = (Instant::now(), cpu_time());
        f();
        wall = wall.min(t.elapsed());
        cpu = cpu.min(cpu_time() - c);
    }
    (wall, cpu)
}

/// Wall time of `f`, best of `runs` after one warm-up call when `warm` is set.
pub fn best_of(runs: usize, warm: bool, f: &mut dyn FnMut()) -> Duration {
    if warm {
        f();
    }
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}
