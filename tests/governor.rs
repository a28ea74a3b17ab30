//! The memory governor: plans that are sane arithmetic, refusal with exit 3, and real runs under a
//! memory cgroup (`tests/data/tools/memcap`), where one exists.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Barrier, Mutex};

use sdcap::governor::{self, plan::Residency, Budget, BudgetSource, Plan};
use sdcap::job::Job;
use sdcap::kernels::scratch::{self, Scratch, TIERS};
use sdcap::kernels::{self, WeightRows};
use sdcap::pipeline::{self, Models};
use sdcap::tensor::Tensor;

const MIB: u64 = 1 << 20;

fn job(width: u32, cap: Option<u64>) -> Job {
    Job {
        width,
        height: width,
        steps: 2,
        ram_cap: cap,
        prediction: None,
        size_cond: Default::default(),
        ..common::job(common::tiny("tiny-sd-fp32.safetensors"))
    }
}

fn budget(bytes: u64) -> Budget {
    Budget {
        limit_bytes: bytes,
        source: BudgetSource::Flag,
        margin_bytes: governor::budget::margin_for(bytes),
        backend_bytes: 0,
    }
}

#[test]
fn predictions_are_sane_and_grow_with_the_image() {
    let models = Models::load(&job(64, None)).unwrap();
    let mut last = 0;
    for side in [64, 128, 256, 512, 1024, 2048] {
        let plan = governor::plan::predict(
            &models,
            &job(side, None),
            &budget(u64::MAX / 4),
            Residency::Keep,
            TIERS[0],
        );
        let peak = plan.peak_bytes();
        // Never negative (unsigned) or absurd: below 1 TiB even at 2048², and strictly growing.
        assert!(peak > last && peak < 1 << 40, "{side}: {peak}");
        last = peak;
        for stage in &plan.stages {
            assert!(
                stage.peak_bytes >= stage.activation_bytes + stage.weight_bytes,
                "{stage:?}"
            );
        }
    }
    // Streaming never predicts more weight memory than keeping everything mapped.
    let j = job(512, None);
    let predict = |r, t| governor::plan::predict(&models, &j, &budget(1 << 40), r, t);
    let keep = predict(Residency::Keep, TIERS[0]);
    let stream = predict(Residency::Stream, TIERS[0]);
    assert!(stream.stages[1].weight_bytes <= keep.stages[1].weight_bytes);
    // Smaller kernel scratch never predicts more.
    for pair in TIERS.windows(2) {
        let (big, small) = (
            predict(Residency::Stream, pair[0]),
            predict(Residency::Stream, pair[1]),
        );
        assert!(small.peak_bytes() <= big.peak_bytes(), "{pair:?}");
    }
}

/// The smallest budget whose usable part holds `peak`.
fn limit_for(peak: u64) -> u64 {
    let mut limit = peak;
    while budget(limit).usable_bytes() < peak {
        limit += MIB / 4;
    }
    limit
}

#[test]
fn planner_picks_keep_when_it_fits_and_refuses_with_numbers() {
    let models = Models::load(&job(64, None)).unwrap();
    let j = job(512, None);
    let plan = governor::plan(&models, &j, &budget(4 << 30)).unwrap();
    assert_eq!(plan.residency, Residency::KeepAll);
    // A budget between the keep-all and per-stage peaks gives per-stage release, and one between
    // per-stage and streaming gives streaming: the fastest level that fits.
    let huge = budget(1 << 40);
    let peak = |r| governor::plan::predict(&models, &j, &huge, r, TIERS[0]).peak_bytes();
    let (all, stage, stream) = (
        peak(Residency::KeepAll),
        peak(Residency::Keep),
        peak(Residency::Stream),
    );
    assert!(all >= stage && stage >= stream, "{all} {stage} {stream}");
    // At the smallest budget that holds a level's peak, that level is chosen, unless a faster level
    // predicts the same peak (then the faster one is).
    let levels = [
        (all, Residency::KeepAll),
        (stage, Residency::Keep),
        (stream, Residency::Stream),
    ];
    for (i, &(peak, want)) in levels.iter().enumerate() {
        if i > 0 && peak == levels[i - 1].0 {
            continue;
        }
        let limit = limit_for(peak);
        let chosen: Plan = governor::plan(&models, &j, &budget(limit)).unwrap();
        assert_eq!(chosen.residency, want, "limit {limit}");
        assert_eq!(chosen.scratch, TIERS[0], "limit {limit}");
    }
    // Below streaming with the fastest scratch, the planner shrinks the kernels' scratch, as long
    // as a tier fits (with the fastest residency that fits at that tier).
    let mut previous = stream;
    for &tier in &TIERS[1..] {
        let p = governor::plan::predict(&models, &j, &huge, Residency::Stream, tier);
        if std::mem::replace(&mut previous, p.peak_bytes()) == p.peak_bytes() {
            continue; // a faster tier predicts the same peak and is chosen
        }
        let limit = limit_for(p.peak_bytes());
        let chosen = governor::plan(&models, &j, &budget(limit)).unwrap();
        assert_eq!(chosen.scratch, tier, "limit {limit}");
        assert!(chosen.fits());
    }
    let err = governor::plan(&models, &job(512, None), &budget(64 * MIB)).unwrap_err();
    assert_eq!(err.exit_code(), 3);
    let msg = err.to_string();
    assert!(
        msg.contains("MiB") && msg.contains("would fit") && !msg.contains('\n'),
        "{msg}"
    );
    // The tiny model is f32: a 4-bit copy (18 bytes per 32 weights) is suggested exactly when its
    // smaller weight pages would fit.
    let smallest =
        governor::plan::predict(&models, &j, &huge, Residency::Stream, scratch::SMALLEST);
    let ratio = 18.0 / 32.0 / 4.0;
    let need_4bit = smallest
        .stages
        .iter()
        .map(|s| s.peak_bytes - s.weight_bytes + (s.weight_bytes as f64 * ratio) as u64)
        .max()
        .unwrap();
    assert!(need_4bit < smallest.peak_bytes());
    let hint = |limit| {
        governor::plan(&models, &j, &budget(limit))
            .unwrap_err()
            .to_string()
    };
    let fits_4bit = limit_for(need_4bit);
    assert!(
        hint(fits_4bit).contains("4-bit model"),
        "{}",
        hint(fits_4bit)
    );
    let too_small = limit_for(need_4bit - MIB);
    assert!(!hint(too_small).contains("4-bit"), "{}", hint(too_small));
}

/// A streaming plan pins UNet blocks as far as the budget leaves the denoise stage room: its
/// prediction charges exactly those, stays within the budget, and no further block would fit.
#[test]
fn streaming_pins_blocks_in_the_room_the_budget_leaves() {
    let models = Models::load(&job(64, None)).unwrap();
    // At 256² the denoise stage sets the peak (at 512² the decode does, and keeping or streaming
    // the UNet predict the same), so budgets between streaming and keeping leave it room.
    let j = job(256, None);
    let huge = budget(1 << 40);
    let peak = |r| governor::plan::predict(&models, &j, &huge, r, TIERS[0]).peak_bytes();
    let (keep, stream) = (peak(Residency::Keep), peak(Residency::Stream));
    let names = models.unet.block_names();
    let mut most = 0;
    for limit in (0..4).map(|i| limit_for(stream + (keep - stream) * i / 4)) {
        let p = governor::plan(&models, &j, &budget(limit)).unwrap();
        assert_eq!(p.residency, Residency::Stream, "limit {limit}");
        let denoise = p.stages.iter().find(|s| s.name == "denoise").unwrap();
        let pinned: Vec<bool> = names.iter().map(|n| p.pinned_blocks.contains(n)).collect();
        let weights = |pinned: &[bool]| governor::plan::stream_weight_bytes(&models, pinned);
        assert_eq!(denoise.weight_bytes, weights(&pinned));
        assert!(
            denoise.peak_bytes <= p.budget.usable_bytes(),
            "limit {limit}"
        );
        for b in (0..names.len()).filter(|&b| !pinned[b]) {
            let mut more = pinned.clone();
            more[b] = true;
            let peak = denoise.peak_bytes - denoise.weight_bytes + weights(&more);
            assert!(
                peak > p.budget.usable_bytes(),
                "{} fits at limit {limit}",
                names[b]
            );
        }
        most = most.max(p.pinned_blocks.len());
    }
    assert!(most > 0, "a budget above the streaming peak pins blocks");
}

/// Every scratch tier gives the same bits: text encoder and UNet at 256² (latent 32², 1024
/// attention tokens), where the smallest tier splits attention queries, convolution tiles and
/// feed-forward chunks that the first tier computes whole.
#[test]
fn scratch_tiers_give_identical_bits() {
    let models = Models::load(&job(256, None)).unwrap();
    let ids: Vec<u32> = (0..154).map(|i| 49406 + (i % 2)).collect();
    let latent = Tensor::new(
        vec![2, 4, 32, 32],
        (0..2 * 4 * 32 * 32)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect(),
    );
    let run = |tier: &Scratch| {
        let context = models.text_encoders[0].forward(&ids, 2, 1, &sdcap::nn::Ctx::from(*tier));
        let eps = models.unet.forward(
            &latent,
            &[999.0, 999.0],
            &context,
            &sdcap::nn::Ctx::from(*tier),
        );
        (context, eps.data)
    };
    let want = run(&TIERS[0]);
    for tier in &TIERS[1..] {
        let got = run(tier);
        assert!(got.0 == want.0, "text encoder differs under {tier:?}");
        assert!(got.1 == want.1, "UNet differs under {tier:?}");
    }
}

/// A weight that records how many rows each panel read takes: the weight panel budget of the
/// scratch tier a kernel call works within, seen from outside.
struct RecordingRows {
    data: Vec<f32>,
    rows: usize,
    panel_rows: Mutex<Vec<usize>>,
}

impl WeightRows for RecordingRows {
    fn rows(&self) -> usize {
        self.rows
    }
    fn row_len(&self) -> usize {
        self.data.len() / self.rows
    }
    fn read_rows(&self, first: usize, count: usize, out: &mut [f32]) {
        self.panel_rows.lock().unwrap().push(count);
        let k = self.row_len();
        out.copy_from_slice(&self.data[first * k..(first + count) * k]);
    }
}

/// Two jobs' kernel calls in flight at once, each with its own tier: each call reads its weight
/// in the panels of its own tier (with one process-wide tier, set by each job before the barrier,
/// one of them would read in the other's), and both give the bits of a call made alone.
#[test]
fn concurrent_kernel_calls_each_work_within_their_own_tier() {
    // 2000 rows of 640: the first tier's 4 Mi-value panel holds them all, the smallest tier's
    // 1 Mi values hold 1638 rows (the 362 left are over MIN_SPLIT, so they make a second panel).
    let (rows, k, m) = (2000, 640, 70);
    let weight = |seed: usize| RecordingRows {
        data: (0..rows * k)
            .map(|i| ((i * 31 + seed) % 97) as f32 / 48.0 - 1.0)
            .collect(),
        rows,
        panel_rows: Mutex::new(Vec::new()),
    };
    let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 / 6.0 - 1.0).collect();
    let run = |w: &RecordingRows, tier: &Scratch| {
        let mut y = vec![0.0f32; m * rows];
        kernels::matmul_weight_t(&x, w, &mut y, tier);
        y
    };
    let panels = |tier: &Scratch| {
        let w = weight(0);
        let y = run(&w, tier);
        (y, w.panel_rows.into_inner().unwrap())
    };
    let (alone_first, first_panels) = panels(&TIERS[0]);
    let (alone_smallest, smallest_panels) = panels(&scratch::SMALLEST);
    assert_eq!(first_panels, [2000]);
    assert_eq!(smallest_panels, [1638, 362]);
    assert!(alone_first == alone_smallest, "tiers give the same bits");

    for _ in 0..4 {
        let start = Barrier::new(2);
        let (a, b) = (weight(0), weight(0));
        let (ya, yb) = std::thread::scope(|s| {
            let ta = s.spawn(|| {
                start.wait();
                run(&a, &TIERS[0])
            });
            let tb = s.spawn(|| {
                start.wait();
                run(&b, &scratch::SMALLEST)
            });
            (ta.join().unwrap(), tb.join().unwrap())
        });
        assert_eq!(*a.panel_rows.lock().unwrap(), first_panels);
        assert_eq!(*b.panel_rows.lock().unwrap(), smallest_panels);
        assert!(ya == alone_first && yb == alone_smallest);
    }
}

/// Two jobs in one process with different plans (no cap: the first tier; a cap only the smallest
/// tiers fit), run at once on shared models: each gets the plan, latent and image it gets alone.
#[test]
fn two_jobs_with_different_plans_run_at_once_with_their_solo_bits() {
    let loose = job(256, None);
    let models = Models::load(&loose).unwrap();
    let huge = budget(1 << 40);
    let tight_peak =
        governor::plan::predict(&models, &loose, &huge, Residency::Stream, scratch::SMALLEST)
            .peak_bytes();
    let tight = Job {
        ram_cap: Some(limit_for(tight_peak)),
        ..loose.clone()
    };
    let generate = |j: &Job| {
        // Solo runs on this thread, the others on their own: the same float mode on each.
        kernels::flush_denormals();
        pipeline::generate(&models, j, &mut |_| {}).unwrap()
    };
    let (solo_loose, solo_tight) = (generate(&loose), generate(&tight));
    assert_eq!(solo_loose.plan.scratch, TIERS[0]);
    assert_ne!(
        solo_tight.plan.scratch, TIERS[0],
        "the cap shrinks the tier"
    );

    let start = Barrier::new(2);
    let (both_loose, both_tight) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            start.wait();
            generate(&loose)
        });
        let b = s.spawn(|| {
            start.wait();
            generate(&tight)
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    for (what, solo, both) in [
        ("uncapped", &solo_loose, &both_loose),
        ("capped", &solo_tight, &both_tight),
    ] {
        assert_eq!(both.plan.scratch, solo.plan.scratch, "{what}");
        assert!(both.latent.data == solo.latent.data, "{what} latent");
        assert!(both.image.pixels == solo.image.pixels, "{what} image");
    }
}

fn sdcap() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sdcap"))
}

fn out_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdcap-governor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn impossible_cap_exits_3_before_work_and_writes_nothing() {
    let out = out_path("refused.png");
    for sub in ["generate", "plan"] {
        let o = sdcap()
            .args([
                sub,
                "-p",
                "x",
                "-W",
                "512",
                "-H",
                "512",
                "--ram-cap",
                "64M",
                "-o",
            ])
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(3), "{sub}: {stderr}");
        assert!(stderr.contains("RAM cap cannot be met"), "{stderr}");
        assert!(!out.exists());
    }
}

/// `memcap LIMIT -- sdcap …`, or None (with the reason printed) where no memory cgroup can be made.
fn memcap(limit: &str, args: &[&str]) -> Option<(Option<i32>, String)> {
    let tool = common::tool("memcap");
    let o = match Command::new(&tool)
        .arg(limit)
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_sdcap"))
        .args(args)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("not run: {}: {e}", tool.display());
            return None;
        }
    };
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    if o.status.code() == Some(3) && stderr.contains("no writable memory cgroup") {
        eprintln!("not run: {}", stderr.trim());
        return None;
    }
    Some((o.status.code(), stderr))
}

fn oom_kills(memcap_stderr: &str) -> u64 {
    let field = memcap_stderr
        .split_whitespace()
        .find_map(|w| w.strip_prefix("oom_kills="))
        .expect("memcap report");
    field.parse().unwrap()
}

#[test]
fn tiny_model_completes_under_a_small_real_cgroup_cap() {
    let out = out_path("capped.png");
    let out_s = out.to_str().unwrap();
    // 128×128, 2 steps: the plan predicts 83 MiB, under the 101 MiB usable of a 128 MiB cgroup (not a
    // flag: the budget comes from the cgroup).
    let args = [
        "generate", "-p", "x", "-W", "128", "-H", "128", "--steps", "2", "-o", out_s,
    ];
    let Some((code, stderr)) = memcap("128M", &args) else {
        return;
    };
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(oom_kills(&stderr), 0, "{stderr}");
    assert!(out.exists());
}

#[test]
fn cgroup_cap_that_cannot_fit_is_refused_not_killed() {
    let out = out_path("refused-cg.png");
    let args = [
        "generate",
        "-p",
        "x",
        "-W",
        "512",
        "-H",
        "512",
        "-o",
        out.to_str().unwrap(),
    ];
    let Some((code, stderr)) = memcap("64M", &args) else {
        return;
    };
    assert_eq!(code, Some(3), "{stderr}");
    assert_eq!(oom_kills(&stderr), 0, "{stderr}");
    assert!(stderr.contains("RAM cap cannot be met"), "{stderr}");
    assert!(!out.exists());
}
