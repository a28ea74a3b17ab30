//! `sdcap batch JOBS --out DIR`: flags → default `Job` → `batch::run` → exit code.
//!
//! Exit codes: 0 every job of this shard is ok or was already done; 4 some failed (see
//! `results.jsonl`); 2 the batch could not start (bad flags, unreadable job file, missing model,
//! directory locked by another run); 3 every job that ran was refused by the RAM cap; 130
//! interrupted (finished outputs kept, the current one abandoned without a file; rerun to resume).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Args;
use sdcap::batch::{self, shard, BatchEvent, Shard, Status};
use sdcap::job::{Given, Job};
use sdcap::request::Request;
use sdcap::Error;
use serde_json::json;

use super::generate::check_model_file;
use super::progress::{round3, Progress, ProgressMode};
use super::threads::start_pool;
use super::{parse_threads, DEFAULT_MODEL};

/// Exit code when some jobs failed and the others were done.
const EXIT_SOME_FAILED: u8 = 4;
const EXIT_INTERRUPTED: u8 = 130;

/// `batch`'s flags: the job file, the output directory, sharding, and the request flags, which are
/// the defaults of every job (a job line's field overrides its flag).
#[derive(Debug, Args)]
pub struct BatchArgs {
    /// Job file: JSON Lines, one job per line, e.g. {"prompt": "a lighthouse", "seed": 1};
    /// `-` reads standard input. A field has the name of its flag in snake_case (`cfg`,
    /// `sampler`, `negative` and `init_image` for --cfg-scale, --sampling-method,
    /// --negative-prompt and --init-img); a field left out takes the flag's value. Relative paths
    /// are taken from the job file's folder.
    #[arg(value_name = "JOBS")]
    pub jobs: PathBuf,

    /// Output directory (created if missing): one PNG per job, results.jsonl, the lock file.
    #[arg(short = 'o', long, value_name = "DIR")]
    pub out: PathBuf,

    /// Run only shard I of N: the jobs whose 0-based index i has i mod N = I. Without it,
    /// JOB_COMPLETION_INDEX (Kubernetes) or SLURM_ARRAY_TASK_ID (Slurm) choose the shard.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<Shard>,

    /// Number of shards when JOB_COMPLETION_INDEX gives the index (or set SDCAP_SHARD_COUNT).
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub shard_count: Option<usize>,

    /// Progress display: auto = a bar on a terminal, JSON lines on stderr otherwise.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,

    #[command(flatten)]
    pub request: Request,

    /// Compute threads [default: physical cores, at most the CPUs this process may use].
    #[arg(short = 't', long, value_name = "N", value_parser = parse_threads)]
    pub threads: Option<usize>,
}

fn parse_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("shard count must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a shard count: {e}")),
    }
}

pub fn run(args: BatchArgs) -> anyhow::Result<ExitCode> {
    let default_model = args.request.model.is_none();
    let mut defaults = Job::new(PathBuf::from(DEFAULT_MODEL), "");
    // Settings given by neither a flag nor the job's line take the model family's default, per job.
    let mut given = Given::default();
    args.request.apply(&mut defaults, &mut given)?;
    // Defaults that no job could use are refused before anything starts.
    defaults.validate()?;
    let env = |name: &str| std::env::var(name).ok();
    let (shard, source) = shard::resolve(args.shard, args.shard_count, &env)?;
    let entries = batch::jobfile::read_jobs_given(&args.jobs, &defaults, given)?;

    // The flag-given model and VAE are checked now, when this shard has a job that uses them: a
    // typo should stop the batch (exit 2), not fail every job. A job's own `model` that is bad
    // fails that model's jobs only.
    let mine = || {
        entries
            .iter()
            .filter(|e| shard.owns(e.index))
            .filter_map(|e| e.job.as_ref().ok())
    };
    if mine().any(|j| j.model == defaults.model) {
        check_model_file(&defaults.model, "model")?;
    }
    if let Some(vae) = &defaults.vae {
        if mine().any(|j| j.vae.as_ref() == Some(vae)) {
            check_model_file(vae, "VAE")?;
        }
    }

    // As generate: no usable GPU is a one-line refusal (exit 2), before anything starts.
    sdcap::backend::select(args.request.backend.unwrap_or_default())?;
    let threads_notice = start_pool(args.threads)?;
    let cancel = cancel_on_signals()?;

    let mut progress = Progress::new(args.progress);
    if let Some(notice) = threads_notice {
        progress.on_event(sdcap::pipeline::Event::Notice(notice));
    }
    let demo_notice = default_model && mine().any(|j| j.model == defaults.model);
    let mut running = false;
    let summary = batch::run(
        &entries,
        &args.out,
        shard,
        &cancel,
        &mut |event| match event {
            BatchEvent::Start {
                jobs,
                mine,
                to_run,
                shard,
            } => {
                // Only now, under the lock: a run refused for a held lock prints its one error line.
                if demo_notice {
                    progress.message(&format!(
                        "sdcap: no --model given; jobs without `model` use the shipped demo model \
                     {DEFAULT_MODEL} (random weights: the images will be noise)"
                    ));
                }
                progress.batch_start(
                    json!({ "jobs": jobs, "shard": shard.to_string(),
                        "shard_from": source.to_string(), "mine": mine, "to_run": to_run,
                        "out": args.out.display().to_string() }),
                    to_run,
                );
            }
            BatchEvent::Loading { model, jobs } => {
                running = true;
                progress.loading(
                    json!({ "model": model.display().to_string(), "jobs": jobs }),
                    &format!("sdcap: loading {} for {jobs} job(s)", model.display()),
                );
            }
            BatchEvent::JobStart { index, name, job } => progress.job_start(
                index,
                json!({ "name": name, "width": job.width, "height": job.height,
                    "steps": job.steps, "seed": job.seed, "prediction": job.prediction }),
            ),
            BatchEvent::Pipeline { event, .. } => progress.on_event(event),
            BatchEvent::JobDone(rec) => {
                if matches!(rec.status, Status::Failed | Status::Interrupted) && !progress.is_json()
                {
                    let what = rec.error.as_deref().unwrap_or("no reason given");
                    progress.message(&format!(
                        "sdcap: job {} (line {}) {}: {what}",
                        rec.job,
                        rec.line,
                        if rec.status == Status::Failed {
                            "failed"
                        } else {
                            "interrupted"
                        }
                    ));
                }
                let fields = serde_json::to_value(rec).unwrap_or_default();
                progress.job_done(fields, running);
            }
        },
    )?;

    let results = args.out.join(batch::results::RESULTS_FILE);
    let verdict = if summary.interrupted {
        format!(
            "interrupted; {} job(s) left for the next run",
            summary.not_run
        )
    } else {
        "done".to_string()
    };
    progress.summary(
        json!({ "ok": summary.ok, "failed": summary.failed, "skipped": summary.skipped,
                "over_cap": summary.over_cap,
                "interrupted": summary.interrupted, "not_run": summary.not_run,
                "seconds": round3(summary.seconds), "shard": shard.to_string(),
                "results": results.display().to_string() }),
        &format!(
            "sdcap: batch {verdict}: {} ok, {} failed, {} skipped in {:.1} s (shard {shard}); \
             results in {}",
            summary.ok,
            summary.failed,
            summary.skipped,
            summary.seconds,
            results.display()
        ),
    );
    Ok(ExitCode::from(if summary.interrupted {
        EXIT_INTERRUPTED
    } else if summary.ok == 0 && summary.failed > 0 && summary.failed == summary.over_cap {
        // Nothing fits the cap: the batch could not do anything (DESIGN.md's exit 3).
        3
    } else if summary.failed > 0 {
        EXIT_SOME_FAILED
    } else {
        0
    }))
}

/// SIGINT and SIGTERM set the returned flag: the run stops at the next step boundary and cleans
/// up. A second signal, while the first is being handled, exits at once with 130 (the output's
/// hidden temporary file may stay; the next run into that directory removes it).
pub fn cancel_on_signals() -> Result<Arc<AtomicBool>, Error> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    let io = |source| Error::Io {
        path: PathBuf::from("<signal handler>"),
        source,
    };
    for signal in [SIGINT, SIGTERM] {
        // Order matters: the shutdown check must see the flag as it was before this signal.
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&flag))
            .map_err(io)?;
        signal_hook::flag::register(signal, Arc::clone(&flag)).map_err(io)?;
    }
    Ok(flag)
}
