//! `sdcap plan`: the memory plan for a generate command, without running it.

use sdcap::governor::{self, plan::Residency, Budget, Plan};
use sdcap::pipeline::Models;

use super::PlanArgs;

const MIB: u64 = 1 << 20;

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let job = args.generate.to_job()?;
    let budget = Budget::discover(job.ram_cap)?;
    // Maps the model and reads tensor shapes only; no weight data is touched.
    let models = Models::load(&job)?;
    let chosen = governor::plan(&models, &job, &budget);
    let keep_all = governor::plan::predict(&models, &job, &budget, Residency::KeepAll);
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
            "alternatives": {
                "keep_all_peak_bytes": keep_all.peak_bytes(),
                "keep_peak_bytes": keep.peak_bytes(),
                "stream_peak_bytes": stream.peak_bytes(),
            },
            "error": chosen.as_ref().err().map(|e| e.to_string()),
        });
        println!("{report:#}");
    } else {
        print!("{}", describe(shown, [&keep_all, &keep, &stream]));
    }
    // Printed above either way; a plan that does not fit still exits 3.
    chosen.map(|_| ()).map_err(Into::into)
}

fn describe(plan: &Plan, alternatives: [&Plan; 3]) -> String {
    let b = &plan.budget;
    let mut out = format!(
        "budget: {} MiB ({}) - {} MiB margin = {} MiB usable\n",
        b.limit_bytes / MIB,
        b.source,
        b.margin_bytes / MIB,
        b.usable_bytes() / MIB
    );
    let [keep_all, keep, stream] = alternatives.map(|p| p.peak_bytes().div_ceil(MIB));
    out += &format!(
        "weights: {:?} (peaks: keep all {keep_all} MiB, keep per stage {keep} MiB, stream {stream} MiB)\n",
        plan.residency
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
