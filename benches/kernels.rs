//! Kernel benchmarks at the SD1.5 UNet's and VAE's real shapes (512², CFG batch 2).
//!
//! `cargo bench --bench kernels` first measures the machine's f32 FMA peak (1 thread and one
//! thread per CPU), prints a table of GFLOP/s and % of that peak for every shape (and FLOPs per
//! CPU-second, which time-slicing on a shared machine does not dilute), then runs the same shapes
//! under divan (its "item/s" column counts FLOPs). `SDCAP_BENCH_TABLE_ONLY=1` skips
//! the divan pass; `SDCAP_BENCH_ONLY=text` keeps only the table rows whose name contains `text`.
//!
//! Each UNet 3×3 shape runs four ways: as `conv2d` picks (no suffix), `igemm` (the implicit GEMM,
//! all `conv2d` did before Winograd), `wino F2` and `wino F4`; GFLOP/s always counts the direct
//! convolution's FLOPs, so Winograd rows are effective rates. The VAE rows run the implicit GEMM,
//! as the VAE decoder's `RowConv` does.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;

use common::{best_wall_and_cpu, contention_note, cpus, peak_flops, ConvPath, Op};
use divan::counter::ItemsCount;
use divan::Bencher;
use sdcap::kernels::WinogradTile;

/// Every benchmarked shape, by name (divan arguments are these names).
fn shapes() -> BTreeMap<&'static str, Op> {
    let conv_via = |n, ci, co, s, k, path| Op::Conv {
        n,
        ci,
        co,
        h: s,
        w: s,
        k,
        stride: 1,
        path,
    };
    let conv = |n, ci, co, s, k| conv_via(n, ci, co, s, k, ConvPath::Auto);
    // The VAE decoder's convs run as implicit GEMM (`RowConv`), whatever `conv2d` would pick.
    let vae = |n, ci, co, s, k| conv_via(n, ci, co, s, k, ConvPath::ImplicitGemm);
    let (igemm, f2, f4) = (
        ConvPath::ImplicitGemm,
        ConvPath::Winograd(WinogradTile::F2),
        ConvPath::Winograd(WinogradTile::F4),
    );
    let attn = |q, kv, c| Op::Attention {
        batch: 2,
        q,
        kv,
        channels: c,
        heads: 8,
        causal: false,
    };
    // Every UNet 3×3 shape four ways: as `conv2d` picks, implicit GEMM, Winograd F(2,3) and F(4,3).
    let unet_3x3 = [
        (320, 320, 64),
        (640, 640, 32),
        (1280, 1280, 32),
        (1280, 1280, 16),
        (2560, 1280, 16),
        (1280, 1280, 8),
        (2560, 1280, 8),
    ]
    .into_iter()
    .flat_map(|(ci, co, s)| {
        let name = if ci == co {
            format!("unet 3x3 {ci}@{s}² n2")
        } else {
            format!("unet 3x3 {ci}->{co}@{s}² n2")
        };
        [
            ("", ConvPath::Auto),
            (" igemm", igemm),
            (" wino F2", f2),
            (" wino F4", f4),
        ]
        .map(|(suffix, path)| {
            // Names live as long as the bench binary (divan arguments are `&'static str`).
            let name: &'static str = Box::leak(format!("{name}{suffix}").into_boxed_str());
            (name, conv_via(2, ci, co, s, 3, path))
        })
    });
    let mut shapes = BTreeMap::from([
        ("unet 1x1 320@64² n2", conv(2, 320, 320, 64, 1)),
        ("vae 3x3 512@64²", vae(1, 512, 512, 64, 3)),
        ("vae 3x3 512@128²", vae(1, 512, 512, 128, 3)),
        ("vae 3x3 256@256²", vae(1, 256, 256, 256, 3)),
        ("vae 3x3 128@512²", vae(1, 128, 128, 512, 3)),
        (
            "linear 8192x320x320",
            Op::Linear {
                m: 8192,
                k: 320,
                n: 320,
            },
        ),
        (
            "linear 8192x320x2560",
            Op::Linear {
                m: 8192,
                k: 320,
                n: 2560,
            },
        ),
        (
            "linear 8192x1280x320",
            Op::Linear {
                m: 8192,
                k: 1280,
                n: 320,
            },
        ),
        (
            "linear 2048x640x5120",
            Op::Linear {
                m: 2048,
                k: 640,
                n: 5120,
            },
        ),
        (
            "linear 512x1280x10240",
            Op::Linear {
                m: 512,
                k: 1280,
                n: 10240,
            },
        ),
        (
            "linear 154x768x320",
            Op::Linear {
                m: 154,
                k: 768,
                n: 320,
            },
        ),
        ("attention self 4096x4096 8h×40", attn(4096, 4096, 320)),
        ("attention cross 4096x77 8h×40", attn(4096, 77, 320)),
        ("attention self 1024x1024 8h×80", attn(1024, 1024, 640)),
        ("attention self 256x256 8h×160", attn(256, 256, 1280)),
        ("attention self 64x64 8h×160", attn(64, 64, 1280)),
        (
            "attention vae 4096x4096 1h×512 n1",
            Op::Attention {
                batch: 1,
                q: 4096,
                kv: 4096,
                channels: 512,
                heads: 1,
                causal: false,
            },
        ),
        (
            "attention clip 77x77 12h×64 causal",
            Op::Attention {
                batch: 2,
                q: 77,
                kv: 77,
                channels: 768,
                heads: 12,
                causal: true,
            },
        ),
        (
            "group_norm+silu 320@64² n2",
            Op::GroupNorm {
                n: 2,
                c: 320,
                hw: 4096,
                silu: true,
            },
        ),
    ]);
    shapes.extend(unet_3x3);
    shapes
}

fn run(bencher: Bencher, name: &str) {
    let op = shapes()[name];
    let f = op.prepare();
    let count = if op.flops() > 0.0 {
        op.flops()
    } else {
        op.bytes()
    } as u64;
    bencher.counter(ItemsCount::new(count)).bench_local(f);
}

#[divan::bench(
    args = ["unet 3x3 320@64² n2", "unet 3x3 320@64² n2 igemm",
            "unet 3x3 320@64² n2 wino F2", "unet 3x3 320@64² n2 wino F4",
            "unet 3x3 640@32² n2", "unet 3x3 640@32² n2 igemm",
            "unet 3x3 640@32² n2 wino F2", "unet 3x3 640@32² n2 wino F4",
            "unet 3x3 1280@32² n2", "unet 3x3 1280@32² n2 igemm",
            "unet 3x3 1280@32² n2 wino F2", "unet 3x3 1280@32² n2 wino F4",
            "unet 3x3 1280@16² n2", "unet 3x3 1280@16² n2 igemm",
            "unet 3x3 1280@16² n2 wino F2", "unet 3x3 1280@16² n2 wino F4",
            "unet 3x3 2560->1280@16² n2", "unet 3x3 2560->1280@16² n2 igemm",
            "unet 3x3 2560->1280@16² n2 wino F2", "unet 3x3 2560->1280@16² n2 wino F4",
            "unet 3x3 1280@8² n2", "unet 3x3 1280@8² n2 igemm",
            "unet 3x3 1280@8² n2 wino F2", "unet 3x3 1280@8² n2 wino F4",
            "unet 3x3 2560->1280@8² n2", "unet 3x3 2560->1280@8² n2 igemm",
            "unet 3x3 2560->1280@8² n2 wino F2", "unet 3x3 2560->1280@8² n2 wino F4",
            "unet 1x1 320@64² n2", "vae 3x3 512@64²", "vae 3x3 512@128²", "vae 3x3 256@256²",
            "vae 3x3 128@512²"],
    sample_count = 3,
    sample_size = 1
)]
fn conv(bencher: Bencher, name: &str) {
    run(bencher, name);
}

#[divan::bench(
    args = ["linear 8192x320x320", "linear 8192x320x2560", "linear 8192x1280x320",
            "linear 2048x640x5120", "linear 512x1280x10240", "linear 154x768x320"],
    sample_count = 3,
    sample_size = 1
)]
fn linear(bencher: Bencher, name: &str) {
    run(bencher, name);
}

#[divan::bench(
    args = ["attention self 4096x4096 8h×40", "attention cross 4096x77 8h×40",
            "attention self 1024x1024 8h×80", "attention self 256x256 8h×160",
            "attention self 64x64 8h×160", "attention vae 4096x4096 1h×512 n1",
            "attention clip 77x77 12h×64 causal"],
    sample_count = 3,
    sample_size = 1
)]
fn attention(bencher: Bencher, name: &str) {
    run(bencher, name);
}

/// Counted in bytes moved (read + write), not FLOPs.
#[divan::bench(args = ["group_norm+silu 320@64² n2"], sample_count = 5, sample_size = 1)]
fn group_norm(bencher: Bencher, name: &str) {
    run(bencher, name);
}

/// A raw GEMM (`kernels::matmul`, b = [n, k] transposed) at the transformer's largest shape.
#[divan::bench(sample_count = 3, sample_size = 1)]
fn gemm_8192x320x2560(bencher: Bencher) {
    let (m, k, n) = (8192, 320, 2560);
    let a = common::random(m * k, 1);
    let b = common::random(n * k, 2);
    let mut c = vec![0.0f32; m * n];
    bencher
        .counter(ItemsCount::new((2 * m * k * n) as u64))
        .bench_local(|| {
            sdcap::kernels::matmul(
                &a,
                &b,
                &mut c,
                m,
                k,
                n,
                sdcap::kernels::Transpose::Yes,
                false,
            )
        });
}

/// LoRA on a weight product at SD1.5 shapes (rank 32), three ways (the const): 0 = no LoRA, 1 = the
/// panel form (ΔW rows = up·down added to each f32 weight panel as it is read, `lora::WithLora`),
/// 2 = the low-rank form (`x·Wᵀ + (x·downᵀ)·upᵀ`; LoCon: the rank-32 conv's filters appended to the
/// layer's, then 1×1, as `LoraSet::conv_weight` / `finish_conv` do on a model's weight). The panel
/// form costs r·n·k per weight read, the low-rank one r·m·(k+n) per call; sdcap picks by weight size
/// (`lora::PANEL_FORM_VALUES`, ARCHITECTURE.md). Counted in the base product's FLOPs, so item/s
/// compares directly; quote CPU-seconds on a shared machine.
#[divan::bench(
    args = ["linear 8192x320x320", "linear 8192x320x2560", "linear 2048x640x640",
            "linear 512x1280x1280", "linear 128x1280x1280", "linear 128x5120x1280",
            "linear 154x768x320", "conv 3x3 320@64² n2", "conv 3x3 1280@16² n2",
            "conv 3x3 2560->1280@8² n2"],
    consts = [0, 1, 2],
    sample_count = 3,
    sample_size = 1
)]
fn lora<const HOW: usize>(bencher: Bencher, name: &str) {
    use sdcap::kernels::scratch::Scratch;
    use sdcap::kernels::{conv2d, matmul, Conv2dGeometry, DenseRows, Transpose, WeightRows};
    use sdcap::lora::{Form, LoraSet, Matrix, Term};
    const RANK: usize = 32;
    let dims: Vec<usize> = name
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|d| d.parse().ok())
        .collect();
    // (m, k, n) of the product, and for a conv (n images, ci, co, side).
    let (m, k, n, conv) = match (name.starts_with("conv"), &dims[..]) {
        (false, &[m, k, n]) => (m, k, n, None),
        (true, &[3, _, c, s, 2]) => (2 * s * s, 9 * c, c, Some((c, c, s))),
        (true, &[3, _, ci, co, s, 2]) => (2 * s * s, 9 * ci, co, Some((ci, co, s))),
        _ => panic!("shape {name}"),
    };
    let w = common::random(n * k, 2);
    let x = common::random(m * k.max(n), 1);
    let up = Matrix {
        rows: n,
        cols: RANK,
        data: common::random(n * RANK, 3),
    };
    let down = Matrix {
        rows: RANK,
        cols: k,
        data: common::random(RANK * k, 4),
    };
    let mut set = LoraSet::default();
    set.insert(
        "w",
        Term::new(
            0,
            Form::LowRank {
                up: up.clone(),
                down: down.clone(),
            },
            0.5,
        ),
    );
    let base = DenseRows { data: &w, rows: n };
    let w_and_down = [&w[..], &down.data[..]].concat();
    let scratch = Scratch::default();
    bencher
        .counter(ItemsCount::new((2 * m * k * n) as u64))
        .bench_local(|| {
            let weight: &dyn WeightRows = match HOW {
                1 => &set.over("w", 0, &base),
                _ => &base,
            };
            match conv {
                None => {
                    let x = &x[..m * k];
                    let mut y = vec![0.0f32; m * n];
                    sdcap::kernels::matmul_weight_t(x, weight, &mut y, &scratch);
                    if HOW == 2 {
                        let mut t = vec![0.0f32; m * RANK];
                        matmul(x, &down.data, &mut t, m, k, RANK, Transpose::Yes, false);
                        matmul(&t, &up.data, &mut y, m, RANK, n, Transpose::Yes, true);
                    }
                    divan::black_box(y);
                }
                Some((ci, co, s)) => {
                    let x = sdcap::Tensor::new(vec![2, ci, s, s], x[..2 * ci * s * s].to_vec());
                    let geo = Conv2dGeometry {
                        kernel: 3,
                        stride: 1,
                        pad: 1,
                    };
                    // LoCon in the low-rank form: the rank-32 3×3 `down` filters appended to the
                    // layer's own (one product, `LoraSet::conv_weight`), then a 1×1 `up` from those
                    // channels into the first co.
                    let with_down = DenseRows {
                        data: &w_and_down,
                        rows: co + RANK,
                    };
                    let weight = if HOW == 2 { &with_down } else { weight };
                    let mut y = conv2d(&x, weight, None, geo, &scratch);
                    if HOW == 2 {
                        let (hw, c) = (s * s, co + RANK);
                        for b in 0..2 {
                            let (head, tail) = y.data.split_at_mut((b * c + co) * hw);
                            let y = &mut head[b * c * hw..(b * c + co) * hw];
                            matmul(
                                &up.data,
                                &tail[..RANK * hw],
                                y,
                                co,
                                RANK,
                                hw,
                                Transpose::No,
                                true,
                            );
                        }
                    }
                    divan::black_box(y);
                }
            }
        });
}

/// The linear-layer product in each precision mode (`kernels::weight_product`) at SD1.5 shapes: the
/// 64²-level GEGLU projection, an attention projection, and a 3×3 conv's GEMM (320 → 320 at 64²,
/// k = 9·320; convs stay f32 in every mode today, this shows what int8 would give there). The
/// weight is stored as `ty` (f16, q8_0 or q4_0); f32 mode reads it through the f32 panel path.
/// (shape name, (m, k, n), weight type, mode).
type PrecisionCase = (
    &'static str,
    (usize, usize, usize),
    &'static str,
    &'static str,
);

fn precision_cases() -> Vec<PrecisionCase> {
    let shapes = [
        ("geglu 8192x320x2560", (8192, 320, 2560)),
        ("attn proj 8192x320x320", (8192, 320, 320)),
        ("ff out 8192x1280x320", (8192, 1280, 320)),
        ("conv3x3 gemm 8192x2880x320", (8192, 2880, 320)),
    ];
    let mut cases = Vec::new();
    for (name, shape) in shapes {
        for (ty, modes) in [
            ("f16", &["f32", "bf16 avx512", "bf16 amx"][..]),
            (
                "q8_0",
                &["f32", "int8 scalar", "int8 avx2", "int8 avx512", "int8 amx"][..],
            ),
            ("q4_0", &["f32", "int8 avx2", "int8 avx512", "int8 amx"][..]),
        ] {
            for &mode in modes {
                // The scalar reference is for agreement, not speed: one shape is enough.
                if mode == "int8 scalar" && shape != (8192, 320, 320) {
                    continue;
                }
                cases.push((name, shape, ty, mode));
            }
        }
    }
    cases
}

/// A weight held as stored bytes of a GGML type, as a mapped tensor is.
struct Stored {
    ty: quant::GgmlType,
    bytes: Vec<u8>,
    rows: usize,
    k: usize,
}

impl sdcap::kernels::WeightRows for Stored {
    fn rows(&self) -> usize {
        self.rows
    }
    fn row_len(&self) -> usize {
        self.k
    }
    fn read_rows(&self, first: usize, count: usize, out: &mut [f32]) {
        let row = self.ty.bytes_for(self.k as u64).unwrap() as usize;
        quant::dequantize(
            self.ty,
            &self.bytes[first * row..(first + count) * row],
            out,
        );
    }
    fn blocks(&self, first: usize, count: usize) -> Option<(sdcap::weights::DType, &[u8])> {
        let row = self.ty.bytes_for(self.k as u64).unwrap() as usize;
        let dtype = match self.ty {
            quant::GgmlType::F16 => sdcap::weights::DType::F16,
            ty => sdcap::weights::DType::Quant(ty),
        };
        Some((dtype, &self.bytes[first * row..(first + count) * row]))
    }
}

fn precision_table(pn: f64) {
    use sdcap::kernels::{Isa, Mode, Precision};
    let only = std::env::var("SDCAP_BENCH_ONLY").unwrap_or_default();
    println!(
        "\nprecision modes (kernels::weight_product, CPU runs up to {:?})\n{:<28} {:>5} {:>12} {:>9} {:>8} {:>7} {:>12}",
        Isa::detected(),
        "shape",
        "type",
        "mode",
        "best ms",
        "GFLOP/s",
        "% peak",
        "GFLOP/CPU-s"
    );
    for (name, (m, k, n), ty, mode) in precision_cases() {
        let label = format!("precision {name} {ty} {mode}");
        if !label.contains(only.as_str()) {
            continue;
        }
        let (mode_v, isa) = match mode {
            "f32" => (Mode::F32, Isa::detected()),
            "bf16 avx512" => (Mode::Bf16, Isa::detected().min(Isa::Avx512)),
            "bf16 amx" => (Mode::Bf16, Isa::Amx),
            "int8 scalar" => (Mode::Int8, Isa::Scalar),
            "int8 avx2" => (Mode::Int8, Isa::Avx2),
            "int8 avx512" => (Mode::Int8, Isa::Avx512),
            _ => (Mode::Int8, Isa::Amx),
        };
        if isa > Isa::detected() {
            println!("{name:<28} {ty:>5} {mode:>12}   (not run: this CPU lacks it)");
            continue;
        }
        let ggml = quant::GgmlType::from_name(ty).unwrap();
        let values = common::random(n * k, 2);
        let mut bytes = vec![0u8; ggml.bytes_for((n * k) as u64).unwrap() as usize];
        quant::quantize(ggml, &values, &mut bytes);
        let w = Stored {
            ty: ggml,
            bytes,
            rows: n,
            k,
        };
        let x = common::random(m * k, 1);
        let mut y = vec![0.0f32; m * n];
        let precision = Precision { mode: mode_v, isa };
        let scratch = sdcap::kernels::scratch::Scratch::default();
        let mut f = || sdcap::kernels::weight_product(&x, &w, &mut y, &scratch, precision);
        let (wall, cpu) = best_wall_and_cpu(2, &mut f);
        let flops = 2.0 * (m * k * n) as f64;
        let (t, c) = (wall.as_secs_f64(), cpu.as_secs_f64());
        println!(
            "{name:<28} {ty:>5} {mode:>12} {:>9.1} {:>8.1} {:>6.1}% {:>12.1}",
            t * 1e3,
            flops / t / 1e9,
            100.0 * flops / t / pn,
            flops / c / 1e9,
        );
    }
}

fn main() {
    let threads = cpus();
    let denormals = common::start_compute_threads();
    println!(
        "sdcap kernel benchmarks — {}, {denormals}",
        contention_note()
    );
    let p1 = peak_flops(1);
    let pn = peak_flops(threads);
    println!(
        "measured f32 FMA peak: {:.1} GFLOP/s on 1 thread, {:.1} GFLOP/s on {threads} threads",
        p1 / 1e9,
        pn / 1e9
    );
    println!(
        "\n{:<34} {:>8} {:>9} {:>8} {:>7} {:>12} {:>8}",
        "shape", "GFLOP", "best ms", "GFLOP/s", "% peak", "GFLOP/CPU-s", "% core"
    );
    let only = std::env::var("SDCAP_BENCH_ONLY").unwrap_or_default();
    for (name, op) in shapes()
        .into_iter()
        .filter(|(n, _)| n.contains(only.as_str()))
    {
        let mut f = op.prepare();
        let (wall, cpu) = best_wall_and_cpu(2, &mut f);
        let (t, c) = (wall.as_secs_f64(), cpu.as_secs_f64());
        if op.flops() > 0.0 {
            let (rate, per_core) = (op.flops() / t, op.flops() / c);
            println!(
                "{name:<34} {:>8.2} {:>9.1} {:>8.1} {:>6.1}% {:>12.1} {:>7.1}%",
                op.flops() / 1e9,
                t * 1e3,
                rate / 1e9,
                100.0 * rate / pn,
                per_core / 1e9,
                100.0 * per_core / p1
            );
        } else {
            println!(
                "{name:<34} {:>8} {:>9.1} {:>5.1} GB/s",
                "-",
                t * 1e3,
                op.bytes() / t / 1e9
            );
        }
    }
    println!(
        "(best of 2 runs; % peak: of the {threads}-thread FMA peak; GFLOP/CPU-s: FLOPs \
         per CPU-second of all threads, % core: of the 1-thread peak — steadier on a shared machine; {})\n",
        contention_note()
    );
    precision_table(pn);
    if std::env::var_os("SDCAP_BENCH_TABLE_ONLY").is_none() {
        divan::main();
    }
}
