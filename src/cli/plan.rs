//! `sdcap plan`: the memory plan for a generate command, without running it.

use sdcap::governor::{self, plan::RESIDENCIES, Budget, Plan, Residency};
use sdcap::kernels::scratch::{SMALLEST, TIERS};
use sdcap::pipeline::Models;

use super::PlanArgs;

const MIB: u64 = 1 << 20;

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let (mut job, given) = args.generate.to_job()?;
    // The pool `generate` would start: the plan counts its threads.
    if let Some(notice) = super::threads::start_pool(args.generate.threads)? {
        eprintln!("sdcap: {notice}");
    }
    // As generate: no usable GPU is a one-line refusal (exit 2); with one, the budget sets the
    // CUDA libraries' host memory aside and the device memory is checked below.
    sdcap::backend::select(args.generate.request.backend.unwrap_or_default())?;
    let budget = Budget::discover(job.ram_cap)?;
    // Maps the model and reads tensor shapes only; no weight data is touched.
    let models = Models::load(&job)?;
    if let Some(notice) = super::generate::resolve(&models, &mut job, given)? {
        eprintln!("sdcap: {notice}");
    }
    let chosen = governor::plan(&models, &job, &budget);
    // What each residency comes down to with the smallest kernel scratch.
    let [keep_all, keep, stream] =
        RESIDENCIES.map(|r| governor::plan::predict(&models, &job, &budget, r, SMALLEST));
    let shown = chosen
        .as_ref()
        .unwrap_or(if keep.peak_bytes() <= stream.peak_bytes() {
            &keep
        } else {
            &stream
        });
    if args.json {
        let report = serde_json::json!({
            "family": models.spec.name,
            "prediction": models.prediction,
            "prediction_source": models.prediction_source,
            "width": job.width,
            "height": job.height,
            "steps": job.steps,
            "cfg_scale": job.cfg_scale,
            "sampler": job.sampler.name(),
            "scheduler": job.scheduler.name(),
            "fits": chosen.is_ok(),
            "plan": shown,
            "peak_bytes": shown.peak_bytes(),
            "usable_bytes": budget.usable_bytes(),
            "alternatives": {
                "keep_all_peak_bytes": keep_all.peak_bytes(),
                "keep_peak_bytes": keep.peak_bytes(),
                "stream_peak_bytes": stream.peak_bytes(),
            },
            "error": chosen.as_ref().err().map(|e| e.to_string()),
        });
        println!("{report:#}");
    } else {
        println!(
            "model: {}, {}-prediction (from {}); {}x{}, {} steps, CFG {}, {} {}",
            models.spec.name,
            models.prediction,
            super::generate::prediction_reason(models.prediction_source),
            job.width,
            job.height,
            job.steps,
            job.cfg_scale,
            job.sampler,
            job.scheduler
        );
        println!(
            "precision: {} (UNet weight products){}",
            sdcap::pipeline::unet_precision(&models, &job).mode.name(),
            match shown.lora_bytes {
                0 => String::new(),
                bytes => format!(
                    "; LoRA: {} MiB (files, f32 terms, per-call products)",
                    bytes.div_ceil(MIB)
                ),
            }
        );
        print!("{}", describe(&job, shown, [&keep_all, &keep, &stream]));
    }
    // Printed above either way; a plan that does not fit still exits 3.
    chosen?;
    // The device memory on the cuda backend (a no-op on the CPU), exit 3 when it does not fit.
    sdcap::pipeline::check_device_plan(&models, &job)?;
    Ok(())
}

fn describe(job: &sdcap::job::Job, plan: &Plan, alternatives: [&Plan; 3]) -> String {
    let b = &plan.budget;
    let libraries = match b.backend_bytes {
        0 => String::new(),
        bytes => format!(" - {} MiB CUDA libraries", bytes / MIB),
    };
    let mut out = format!(
        "budget: {} MiB ({}) - {} MiB margin{libraries} = {} MiB usable\n",
        b.limit_bytes / MIB,
        b.source,
        b.margin_bytes / MIB,
        b.usable_bytes() / MIB
    );
    let [keep_all, keep, stream] = alternatives.map(|p| p.peak_bytes().div_ceil(MIB));
    out += &format!(
        "weights: {:?} (smallest peaks: keep all {keep_all} MiB, keep per stage {keep} MiB, stream {stream} MiB)\n",
        plan.residency
    );
    if plan.residency == Residency::Stream {
        out += &format!(
            "streaming: {} of the UNet's blocks kept mapped ({}), the others read every step\n",
            plan.pinned_blocks.len(),
            if plan.pinned_blocks.is_empty() {
                "none".to_string()
            } else {
                plan.pinned_blocks.join(", ")
            }
        );
    }
    let sc = &plan.scratch;
    let tier = TIERS.iter().position(|t| t == sc).map_or(0, |i| i + 1);
    out += &format!(
        "kernel scratch (encode, denoise): tier {tier} of {}: conv patch {} MiB, weight panel {} MiB, \
         attention query chunk {} rows, feed-forward chunk {} MiB\n",
        TIERS.len(),
        mib(sc.conv_patch),
        mib(sc.weight_panel),
        sc.attention_query_chunk,
        mib(sc.ff_chunk),
    );
    if job.init_image.is_some() {
        out += &match plan.encode_band_rows {
            Some(rows) => format!("image encode: VAE feature maps in bands of {rows} rows\n"),
            None => "image encode: whole VAE feature maps\n".to_string(),
        };
    }
    out += &match (job.final_taesd(), plan.vae_band_rows) {
        (Some(_), _) => "decode: TAESD (--taesd)\n".to_string(),
        (None, Some(rows)) => format!("decode: feature maps in bands of {rows} rows\n"),
        (None, None) => "decode: whole feature maps\n".to_string(),
    };
    out += &format!(
        "{:<12} {:>12} {:>10} {:>10}\n",
        "stage", "activations", "weights", "peak"
    );
    for s in &plan.stages {
        out += &format!(
            "{:<12} {:>8} MiB {:>6} MiB {:>6} MiB\n",
            s.name,
            s.activation_bytes.div_ceil(MIB),
            s.weight_bytes.div_ceil(MIB),
            s.peak_bytes.div_ceil(MIB)
        );
    }
    out += &format!(
        "planned peak: {} MiB — {}\n",
        plan.peak_bytes().div_ceil(MIB),
        if plan.fits() { "fits" } else { "does not fit" }
    );
    out
}

/// f32 values as MiB, for display.
fn mib(values: usize) -> String {
    let v = values as f64 * 4.0 / MIB as f64;
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}
