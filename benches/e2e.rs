//! End-to-end stage timings and the per-op-kind profile of one UNet step.
//!
//! `benches/e2e.sh` drives this binary; by hand:
//!
//! ```text
//! cargo bench --bench e2e -- stages MODEL SIZE [STEPS]   # text encode, s/UNet step, VAE decode, peak RSS
//! cargo bench --bench e2e -- profile MODEL [LATENT]      # one UNet step (CFG batch 2) by op kind
//! cargo bench --bench e2e -- accuracy MODEL [LATENT]     # one UNet call per precision mode vs f32
//! cargo bench --bench e2e -- step MODEL [LATENT]         # two bare UNet calls (for perf record)
//! cargo bench --bench e2e -- lora MODEL LORA SIZE [STEPS] # LoRA load + apply, s/step with vs without
//! ```
//!
//! With no mode (as under a plain `cargo bench`) it prints this usage and exits.
//! Threads flush denormals as the CLI's do; `SDCAP_BENCH_DENORMALS=1` keeps them (to measure that).

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use common::{
    best_of, contention_note, cpu_time, cpus, peak_flops, thread_cpu_time, unet_ops, Kind,
    UnetShape,
};
use sdcap::conditioning::Conditioning;
use sdcap::family::Family;
use sdcap::governor::memory;
use sdcap::job::{Job, SamplerKind};
use sdcap::kernels::scratch::TIERS;
use sdcap::pipeline::Models;
use sdcap::tensor::Tensor;

/// The precision mode the UNet calls run in: `$SDCAP_BENCH_PRECISION` (f32, bf16, int8, auto;
/// default f32), set by `benches/e2e.sh`'s fifth argument.
fn requested_precision() -> sdcap::job::Precision {
    std::env::var("SDCAP_BENCH_PRECISION")
        .ok()
        .map_or(sdcap::job::Precision::F32, |p| {
            p.parse()
                .expect("SDCAP_BENCH_PRECISION: f32, bf16, int8 or auto")
        })
}

fn job(model: PathBuf, size: u32) -> Job {
    Job {
        precision: requested_precision(),
        negative: Some("blurry".into()),
        width: size,
        height: size,
        steps: 1,
        sampler: SamplerKind::Euler,
        ..Job::new(model, "a lighthouse at dusk")
    }
}

/// The job's conditioning (negative and prompt: a CFG batch of 2) by the family's encoders.
fn conditioning(models: &Models, size: u32) -> Conditioning {
    // The model path is not read: the models are loaded.
    let job = job(PathBuf::new(), size);
    sdcap::conditioning::encode(models, &job, true, &sdcap::nn::Ctx::from(TIERS[0]))
        .expect("encode")
}

/// One UNet call on the CFG batch `x` at timestep `t`, with SDXL's added conditioning if any, in
/// the requested precision mode (resolved as the pipeline does).
fn unet_call(models: &Models, x: &Tensor, t: f32, cond: &Conditioning) -> Tensor {
    let job = job(PathBuf::new(), 8 * x.shape[2] as u32);
    let cx = sdcap::nn::Ctx {
        scratch: TIERS[0],
        precision: sdcap::pipeline::unet_precision(models, &job),
        lora: None,
    };
    models.unet.forward_added(
        x,
        &[t, t],
        &cond.context,
        cond.added.as_deref(),
        &cx,
        &mut |_, _| {},
    )
}

/// The op list shape of the model's family.
fn unet_shape(models: &Models) -> UnetShape {
    match models.spec.family {
        Family::Sd1 => common::SD15,
        Family::Sd2 => common::SD21,
        Family::Sdxl => common::SDXL,
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn peak_rss() -> u64 {
    memory::peak_rss_bytes().unwrap_or(0)
}

/// Text encode (uncond + cond), `steps` UNet calls on a CFG batch of 2, one VAE decode.
fn stages(model: PathBuf, size: u32, steps: usize) {
    let load_note = contention_note();
    let t = Instant::now();
    let models = Models::load(&job(model.clone(), size)).expect("load model");
    let load = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let cond = conditioning(&models, size);
    let encode = t.elapsed().as_secs_f64();
    let peak_encode = peak_rss();
    models.store.release(models.spec.text_prefix);
    memory::release_free_memory();

    let lat = size as usize / 8;
    let x = Tensor::new(vec![2, 4, lat, lat], common::random(2 * 4 * lat * lat, 7));
    let mut step_times = Vec::new();
    let (c0, w0) = (cpu_time(), Instant::now());
    for i in 0..steps {
        let t = Instant::now();
        let t_step = 999.0 - 50.0 * i as f32;
        std::hint::black_box(unet_call(&models, &x, t_step, &cond));
        step_times.push(t.elapsed().as_secs_f64());
    }
    let unet_cpu = (cpu_time() - c0).as_secs_f64() / w0.elapsed().as_secs_f64();
    let peak_unet = peak_rss();
    models.store.release(models.spec.unet_prefix);
    memory::release_free_memory();

    let z = Tensor::new(vec![1, 4, lat, lat], common::random(4 * lat * lat, 8));
    let t = Instant::now();
    std::hint::black_box(models.decoder.forward(&z));
    let decode = t.elapsed().as_secs_f64();
    let peak = peak_rss();

    let mean = step_times.iter().sum::<f64>() / steps as f64;
    let best = step_times.iter().cloned().fold(f64::INFINITY, f64::min);
    let name = model.file_name().unwrap_or_default().to_string_lossy();
    let mode = sdcap::pipeline::unet_precision(&models, &job(PathBuf::new(), size));
    println!(
        "{name} {size}² precision {} ({}): load {load:.1} s | text encode {encode:.2} s | UNet step (batch 2) mean {mean:.2} s, best {best:.2} s over {steps} | VAE decode {decode:.2} s | peak RSS {:.0} MiB (encode {:.0}, denoise {:.0}) | UNet CPU use {unet_cpu:.2} of {} cores | start: {load_note}; end: {}",
        mode.mode.name(),
        mode.isa.name(),
        mib(peak),
        mib(peak_encode),
        mib(peak_unet),
        cpus(),
        contention_note()
    );
}

/// LoRA cost (issue 15; `benches/lora.sh`): the adapter set's build (file read, key mapping, f32
/// terms: "load + apply") and UNet steps (CFG batch 2) alternating without and with it, so both
/// see the same machine state.
fn lora(model: PathBuf, lora: PathBuf, size: u32, steps: usize) {
    let models = Models::load(&job(model.clone(), size)).expect("load model");
    let cond = conditioning(&models, size);
    let mut with = job(model.clone(), size);
    with.loras = vec![sdcap::job::LoraRef {
        path: lora.clone(),
        weight: 1.0,
    }];
    let (c0, t) = (cpu_time(), Instant::now());
    let mut set = sdcap::lora::build(&models, &with).expect("LoRA");
    // `$SDCAP_BENCH_LORA_PANEL_VALUES`: move the panel/low-rank threshold (`lora::PANEL_FORM_VALUES`).
    if let (Ok(v), Some(set)) = (
        std::env::var("SDCAP_BENCH_LORA_PANEL_VALUES"),
        set.as_mut().and_then(std::sync::Arc::get_mut),
    ) {
        set.set_panel_form_values(v.parse().expect("SDCAP_BENCH_LORA_PANEL_VALUES: a count"));
    }
    let (build, build_cpu) = (t.elapsed().as_secs_f64(), (cpu_time() - c0).as_secs_f64());
    let modified = set.as_ref().map_or(0, |s| s.len());
    let lat = size as usize / 8;
    let x = Tensor::new(vec![2, 4, lat, lat], common::random(2 * 4 * lat * lat, 7));
    let call = |cx: &sdcap::nn::Ctx| {
        models.unet.forward_added(
            &x,
            &[999.0, 999.0],
            &cond.context,
            cond.added.as_deref(),
            cx,
            &mut |_, _| {},
        )
    };
    let plain = sdcap::nn::Ctx {
        scratch: TIERS[0],
        precision: sdcap::pipeline::unet_precision(&models, &with),
        lora: None,
    };
    let adapted = plain.clone().with_lora(set);
    std::hint::black_box(call(&plain)); // pages in the weights
    let (mut without, mut with_lora) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        for (cx, times) in [(&plain, &mut without), (&adapted, &mut with_lora)] {
            let (c0, t) = (cpu_time(), Instant::now());
            std::hint::black_box(call(cx));
            times.push((t.elapsed().as_secs_f64(), (cpu_time() - c0).as_secs_f64()));
        }
    }
    // Medians of the alternating calls (the machine's drift hits both alike), best next to them.
    let median = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let stats = |v: &[(f64, f64)]| {
        (
            median(v, |x| x.0),
            median(v, |x| x.1),
            v.iter().map(|x| x.0).fold(f64::INFINITY, f64::min),
        )
    };
    let ((w0, c0, b0), (w1, c1, b1)) = (stats(&without), stats(&with_lora));
    let name = model.file_name().unwrap_or_default().to_string_lossy();
    println!(
        "{name} {size}², {}, LoRA {}: load + apply {build:.2} s ({build_cpu:.2} CPU-s, {modified} weights) | UNet step median of {steps} (best): without {w0:.2} s ({b0:.2}; {c0:.1} CPU-s), with {w1:.2} s ({b1:.2}; {c1:.1} CPU-s): {:+.1}% wall ({:+.1}% best), {:+.1}% CPU | peak RSS {:.0} MiB | {}",
        plain.precision.mode.name(),
        lora.display(),
        100.0 * (w1 / w0 - 1.0),
        100.0 * (b1 / b0 - 1.0),
        100.0 * (c1 / c0 - 1.0),
        mib(peak_rss()),
        contention_note()
    );
}

/// One UNet call (CFG batch 2, random latent, the job's conditioning) per precision mode, each
/// against the f32 call: relative L2 error and time, the issue's per-call bounds at full size.
fn accuracy(model: PathBuf, latent: usize) {
    use sdcap::kernels::{Isa, Mode, Precision};
    let models = Models::load(&job(model.clone(), latent as u32 * 8)).expect("load model");
    let cond = conditioning(&models, latent as u32 * 8);
    let x = Tensor::new(
        vec![2, 4, latent, latent],
        common::random(2 * 4 * latent * latent, 7),
    );
    let call = |mode| {
        let cx = sdcap::nn::Ctx {
            scratch: TIERS[0],
            precision: Precision::new(mode),
            lora: None,
        };
        let t = Instant::now();
        let out = models.unet.forward_added(
            &x,
            &[999.0, 999.0],
            &cond.context,
            cond.added.as_deref(),
            &cx,
            &mut |_, _| {},
        );
        (out, t.elapsed().as_secs_f64())
    };
    let (reference, t_ref) = call(Mode::F32);
    let name = model.file_name().unwrap_or_default().to_string_lossy();
    println!(
        "{name} latent {latent}² (CFG batch 2), kernels {:?}: f32 {t_ref:.2} s — {}",
        Isa::selected(),
        contention_note()
    );
    for mode in [Mode::Bf16, Mode::Int8] {
        let (out, t) = call(mode);
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (a, b) in out.data.iter().zip(&reference.data) {
            num += (*a as f64 - *b as f64).powi(2);
            den += (*b as f64).powi(2);
        }
        println!(
            "  {}: relative L2 vs f32 {:.3e}, {t:.2} s (int8 on weights without int8 products computes in f32)",
            mode.name(),
            (num / den).sqrt()
        );
    }
}

/// Two real UNet calls (CFG batch 2) and nothing else, for `perf record`.
fn profile_step(model: PathBuf, latent: usize) {
    let models = Models::load(&job(model, latent as u32 * 8)).expect("load model");
    let cond = conditioning(&models, latent as u32 * 8);
    let x = Tensor::new(
        vec![2, 4, latent, latent],
        common::random(2 * 4 * latent * latent, 7),
    );
    for _ in 0..2 {
        let (c0, m0, w0) = (cpu_time(), thread_cpu_time(), Instant::now());
        std::hint::black_box(unet_call(&models, &x, 999.0, &cond));
        println!(
            "UNet call: {:.2} s wall, {:.2} s CPU, {:.2} s on the calling thread — {}",
            w0.elapsed().as_secs_f64(),
            (cpu_time() - c0).as_secs_f64(),
            (thread_cpu_time() - m0).as_secs_f64(),
            contention_note()
        );
    }
}

/// One UNet call at `latent`² (CFG batch 2) on the real model, then every conv/linear/attention/norm
/// call of that step timed alone at its shape (f32 weights), summed by op kind.
fn profile(model: PathBuf, latent: usize) {
    let peak = peak_flops(cpus());
    println!(
        "profile of one UNet step, latent {latent}² (image {}²), CFG batch 2 — {}",
        latent * 8,
        contention_note()
    );
    println!(
        "measured {}-thread f32 FMA peak: {:.1} GFLOP/s",
        cpus(),
        peak / 1e9
    );
    let models = Models::load(&job(model, latent as u32 * 8)).expect("load model");
    let shape = unet_shape(&models);
    let cond = conditioning(&models, latent as u32 * 8);
    let x = Tensor::new(
        vec![2, 4, latent, latent],
        common::random(2 * 4 * latent * latent, 7),
    );
    // A warm-up call maps the weight pages in; the second is the one measured.
    std::hint::black_box(unet_call(&models, &x, 999.0, &cond));
    let (c0, m0, w0) = (cpu_time(), thread_cpu_time(), Instant::now());
    std::hint::black_box(unet_call(&models, &x, 999.0, &cond));
    let step = w0.elapsed().as_secs_f64();
    let step_cpu = (cpu_time() - c0).as_secs_f64();
    let main_cpu = (thread_cpu_time() - m0).as_secs_f64();
    drop(models);

    let ops = unet_ops(&shape, 2, latent);
    // Time each distinct shape once, then weight by how often it occurs.
    let mut distinct: Vec<(common::Op, usize)> = Vec::new();
    for op in &ops {
        match distinct.iter_mut().find(|(o, _)| o == op) {
            Some((_, n)) => *n += 1,
            None => distinct.push((*op, 1)),
        }
    }
    let mut by_kind: BTreeMap<Kind, (f64, f64, f64, usize)> = BTreeMap::new();
    let mut lines = Vec::new();
    let (c1, w1) = (cpu_time(), Instant::now());
    for (op, count) in &distinct {
        let mut f = op.prepare();
        let (cc, wc) = (cpu_time(), Instant::now());
        let t = best_of(1, false, &mut f).as_secs_f64();
        let cpu = (cpu_time() - cc)
            .as_secs_f64()
            .min(wc.elapsed().as_secs_f64() * cpus() as f64);
        let e = by_kind.entry(op.kind()).or_default();
        e.0 += t * *count as f64;
        e.1 += op.flops() * *count as f64;
        e.2 += cpu * *count as f64;
        e.3 += count;
        lines.push((t * *count as f64, op.label(), *count, t, op.flops()));
    }
    let kernels_wall = w1.elapsed().as_secs_f64();
    let _ = (c1, kernels_wall);
    let total_flops: f64 = ops.iter().map(|o| o.flops()).sum();
    let kernel_sum: f64 = by_kind.values().map(|v| v.0).sum();
    println!(
        "\nreal UNet call: {step:.2} s wall, {step_cpu:.2} s CPU ({:.2} cores busy on average); {:.3} TFLOP counted → {:.1} GFLOP/s ({:.1}% of peak)",
        step_cpu / step,
        total_flops / 1e12,
        total_flops / step / 1e9,
        100.0 * total_flops / step / peak
    );
    println!(
        "\n{:<18} {:>6} {:>9} {:>7} {:>9} {:>9} {:>8} {:>7} {:>7} {:>9}",
        "op kind",
        "calls",
        "time s",
        "share",
        "GFLOP",
        "GFLOP/s",
        "% peak",
        "cores",
        "CPU s",
        "CPU share"
    );
    for (kind, (t, fl, cpu, n)) in &by_kind {
        let rate = if *fl > 0.0 {
            format!("{:>9.1} {:>7.1}%", fl / t / 1e9, 100.0 * fl / t / peak)
        } else {
            format!("{:>9} {:>8}", "-", "-")
        };
        println!(
            "{:<18} {n:>6} {t:>9.2} {:>6.1}% {:>9.1} {rate} {:>7.2} {cpu:>7.2} {:>8.1}%",
            kind.name(),
            100.0 * t / step,
            fl / 1e9,
            cpu / t,
            100.0 * cpu / step_cpu
        );
    }
    let other = step - kernel_sum;
    let other_cpu = step_cpu - by_kind.values().map(|v| v.2).sum::<f64>();
    println!(
        "{:<18} {:>6} {other:>9.2} {:>6.1}% {:>44} {other_cpu:>7.2} {:>8.1}%",
        "other",
        "",
        100.0 * other / step,
        "",
        100.0 * other_cpu / step_cpu
    );
    println!(
        "(other = the real step minus the kernels timed alone: activations, residual adds, reshapes, \
         concat, upsample, f16→f32 weight panels; the CPU columns are robust to contention, the wall \
         columns are not when the load changes between the real step and the kernel runs)"
    );
    // The caller's thread runs the serial code; the rayon pool's workers run the parallel parts
    // (the caller blocks while they do). On an idle machine with P cores the step would take
    // serial + parallel / P: CPU times hardly depend on contention, so this holds under it too.
    let p = cpus() as f64;
    let parallel_cpu = (step_cpu - main_cpu).max(0.0);
    let ideal = main_cpu + parallel_cpu / p;
    println!(
        "\nserial code: {main_cpu:.2} s CPU on the calling thread, parallel: {parallel_cpu:.2} s CPU in the \
         rayon pool → idle-machine step ≈ {ideal:.2} s, of which serial {:.1}%",
        100.0 * main_cpu / ideal
    );
    lines.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("\ntop shapes by total time:");
    for (total, label, count, t, fl) in lines.iter().take(15) {
        let rate = if *fl > 0.0 {
            format!("{:.1} GFLOP/s", fl / t / 1e9)
        } else {
            String::new()
        };
        println!(
            "  {total:>7.2} s  {count:>2} × {label:<40} {:>8.1} ms  {rate}",
            t * 1e3
        );
    }
    println!("\nend: {}", contention_note());
}

fn main() {
    let denormals = common::start_compute_threads();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if !args.is_empty() {
        println!("({denormals})");
    }
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["stages", model, size, rest @ ..] => {
            let steps = rest.first().map_or(2, |s| s.parse().expect("steps"));
            stages(model.into(), size.parse().expect("size"), steps)
        }
        ["lora", model, lora_file, size, rest @ ..] => lora(
            model.into(),
            lora_file.into(),
            size.parse().expect("size"),
            rest.first().map_or(3, |s| s.parse().expect("steps")),
        ),
        ["step", model, rest @ ..] => profile_step(
            model.into(),
            rest.first().map_or(64, |s| s.parse().expect("latent")),
        ),
        ["accuracy", model, rest @ ..] => accuracy(
            model.into(),
            rest.first().map_or(64, |s| s.parse().expect("latent")),
        ),
        ["profile", model, rest @ ..] => profile(
            model.into(),
            rest.first().map_or(64, |s| s.parse().expect("latent")),
        ),
        _ => println!(
            "e2e: no mode given, nothing run. Use benches/e2e.sh, or\n  \
             cargo bench --bench e2e -- stages MODEL SIZE [STEPS]\n  \
             cargo bench --bench e2e -- profile MODEL [LATENT]\n  \
             cargo bench --bench e2e -- lora MODEL LORA SIZE [STEPS]"
        ),
    }
}
