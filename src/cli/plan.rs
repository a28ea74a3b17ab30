//! `sdcap plan`: the memory plan for a generate command, without running it.

use sdcap::governor::{self, plan::Residency, Budget, Plan};
use sdcap::pipeline::Models;
use sdcap::Error;

use super::PlanArgs;

const MIB: u64 = 1 << 20;

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let job = args.generate.to_job()?;
    let budget = Budget::discover(job.ram_cap)?;
    // Maps the model and reads tensor shapes only; no weight data is touched.
    let models = Models::load(&job)?;
    let chosen = governor::plan(&models, &job, &budget);
    let keep = governor::plan::predict(&models, &job, &budget, Residency::Keep);
    let stream = governor::plan::predict(&models, &job, &budget, Residency::Stream);
    let shown = chosen
        .as_ref()
        .unwrap_or(if keep.peak_bytes() <= stream.peak_bytes() {
            &keep
        } else {
            &stream
        });
    if args.json {
        let report = serde_json::json!({
            "fits": chosen.is_ok(),
            "plan": shown,
            "peak_bytes": shown.peak_bytes(),
            "usable_bytes": budget.usable_bytes(),
            "alternatives": { "keep_peak_bytes": keep.peak_bytes(), "stream_peak_bytes": stream.peak_bytes() },
            "error": chosen.as_ref().err().map(|e| e.to_string()),
        });
        println!("{report:#}");
    } else {
        print!("{}", describe(shown, &keep, &stream));
    }
    match chosen {
        Ok(_) => Ok(()),
        Err(e @ Error::CapTooSmall { .. }) => Err(e.into()),
        Err(e) => Err(e.into()),
    }
}

fn describe(plan: &Plan, keep: &Plan, stream: &Plan) -> String {
    let b = &plan.budget;
    let mut out = format!(
        "budget: {} MiB ({}) - {} MiB margin = {} MiB usable\n",
        b.limit_bytes / MIB,
        b.source,
        b.margin_bytes / MIB,
        b.usable_bytes() / MIB
    );
    out += &format!(
        "weights: {:?} (keep: peak {} MiB, stream: peak {} MiB)\n",
        plan.residency,
        keep.peak_bytes().div_ceil(MIB),
        stream.peak_bytes().div_ceil(MIB)
    );
    out += &format!(
        "{:<8} {:>12} {:>10} {:>10}\n",
        "stage", "activations", "weights", "peak"
    );
    for s in &plan.stages {
        out += &format!(
            "{:<8} {:>8} MiB {:>6} MiB {:>6} MiB\n",
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
