//! Runs this shard's jobs: skip what is done, load each model once, generate, write, record.

use std::any::Any;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::jobfile::Entry;
use super::lock::lock_dir;
use super::naming::output_name;
use super::results::{self, Record, ResultsLog, Status};
use super::shard::Shard;
use crate::atomic_file::{Existing, PendingFile};
use crate::error::{Error, Result};
use crate::family::{Family, Prediction};
use crate::job::{Given, Job};
use crate::output;
use crate::pipeline::{self, Event, Models};
use crate::weights::{self, TensorStore};

/// What the runner reports as it goes (the CLI shows it as a bar or JSON lines).
#[derive(Debug)]
pub enum BatchEvent<'a> {
    /// After planning: jobs in the file, jobs of this shard, and how many of those will run (the
    /// rest failed to parse or are already done, and have been reported with `JobDone`).
    Start {
        jobs: usize,
        mine: usize,
        to_run: usize,
        shard: Shard,
    },
    /// A model is being opened, for the `jobs` that use it.
    Loading { model: &'a Path, jobs: usize },
    JobStart {
        index: usize,
        name: &'a str,
        job: &'a Job,
    },
    /// A pipeline stage or step of job `index`.
    Pipeline { index: usize, event: Event },
    /// A job's result line, as appended to `results.jsonl`.
    JobDone(&'a Record),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub ok: usize,
    pub failed: usize,
    pub skipped: usize,
    /// Of the failed jobs, those refused because they cannot fit the RAM cap.
    pub over_cap: usize,
    /// A signal stopped the batch; `not_run` jobs are left for the next run.
    pub interrupted: bool,
    pub not_run: usize,
    pub seconds: f64,
}

/// A job that will run, with the model family's defaults applied.
struct Todo<'a> {
    entry: &'a Entry,
    job: Job,
    name: String,
}

/// The text of a caught panic's payload (`panic!` with a literal or with a format).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// Runs `f`; a panic becomes `Err("internal error: …")` (the job boundary: a bug in one job must
/// not end the batch).
fn catch<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .map_err(|p| format!("internal error: {}", panic_message(p.as_ref())))
}

/// The family and prediction type of each model, read from its header as `Models::load` reads
/// them (a few bytes of data at most), once per model file.
#[derive(Default)]
struct Families(HashMap<PathBuf, Option<(Family, Prediction)>>);

impl Families {
    /// `job` with the family's defaults for every setting its entry did not give. A model that
    /// cannot be read leaves the job as it is: it fails when its group loads.
    fn resolve(&mut self, entry: &Entry, job: &Job) -> Job {
        let mut job = job.clone();
        if entry.given == Given::ALL {
            return job;
        }
        let probed = self.0.entry(job.model.clone()).or_insert_with(|| {
            catch(|| {
                let store = TensorStore::open(&job.model).ok()?;
                let family = weights::detect_family(&store).ok()?;
                Some((family, weights::detect_prediction(&store, family).0))
            })
            .ok()
            .flatten()
        });
        if let Some((family, detected)) = *probed {
            let prediction = job.prediction.unwrap_or(detected);
            job.apply_defaults(family.spec(), prediction, entry.given);
        }
        job
    }
}

/// Runs the jobs of `shard` into `dir` (created if missing), under the directory lock. Fails only
/// when the batch cannot start (lock held, `dir` or the results file not writable) or the results
/// file cannot be written; a job's own failure is recorded and the batch goes on. Once `cancel` is
/// set, the current job is abandoned at its next step (recorded `interrupted`, no file written)
/// and no further job starts.
pub fn run(
    entries: &[Entry],
    dir: &Path,
    shard: Shard,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(BatchEvent),
) -> Result<Summary> {
    let started = Instant::now();
    // An output directory that cannot be made or written is bad input (exit 2), not a crash.
    let unusable = |e: Error| match e {
        Error::Io { path, source } => Error::bad_file(path, format!("cannot use it: {source}")),
        e => e,
    };
    std::fs::create_dir_all(dir)
        .map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })
        .map_err(unusable)?;
    let _lock = lock_dir(dir, shard).map_err(unusable)?;
    // A directory where no PNG can be created (read-only, no inodes) stops the batch now, not
    // after the first model load; this also clears temporary files left by killed runs.
    drop(PendingFile::create(&dir.join(".sdcap.probe"), Existing::Replace).map_err(unusable)?);
    let mut log = ResultsLog::open(dir).map_err(unusable)?;
    let mut summary = Summary::default();
    let mut done = |rec: Record, s: &mut Summary, on_event: &mut dyn FnMut(BatchEvent)| {
        match rec.status {
            Status::Ok => s.ok += 1,
            Status::Failed => {
                s.failed += 1;
                s.over_cap += usize::from(rec.over_cap == Some(true));
            }
            Status::Skipped => s.skipped += 1,
            Status::Interrupted => {}
        }
        log.append(&rec)?;
        on_event(BatchEvent::JobDone(&rec));
        Ok::<(), Error>(())
    };

    // Plan: bad lines fail and finished outputs are skipped before any model is touched.
    let mine: Vec<&Entry> = entries.iter().filter(|e| shard.owns(e.index)).collect();
    let mut todo = Vec::new();
    let mut early = Vec::new();
    let mut families = Families::default();
    for entry in &mine {
        match &entry.job {
            Err(msg) => early.push(record(entry, shard, Status::Failed, None, 0.0, Some(msg))),
            Ok(job) => {
                let job = families.resolve(entry, job);
                let name = output_name(entry.index, &job);
                if dir.join(&name).is_file() {
                    let out = Some(dir.join(&name));
                    early.push(record(entry, shard, Status::Skipped, out, 0.0, None));
                } else {
                    todo.push(Todo { entry, job, name });
                }
            }
        }
    }
    on_event(BatchEvent::Start {
        jobs: entries.len(),
        mine: mine.len(),
        to_run: todo.len(),
        shard,
    });
    for rec in early {
        done(rec, &mut summary, on_event)?;
    }

    let mut remaining = todo.len();
    'groups: for group in group_by_model(todo) {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        on_event(BatchEvent::Loading {
            model: &group[0].job.model,
            jobs: group.len(),
        });
        results::reset_peak_rss();
        let load_started = Instant::now();
        let loaded = catch(|| Models::load(&group[0].job).map_err(|e| e.to_string()));
        let models = match loaded.and_then(|r| r) {
            Ok(m) => m,
            Err(e) => {
                let seconds = load_started.elapsed().as_secs_f64();
                for t in &group {
                    let msg = format!("cannot load the model: {e}");
                    let out = Some(dir.join(&t.name));
                    let rec = record(t.entry, shard, Status::Failed, out, seconds, Some(&msg));
                    done(rec, &mut summary, on_event)?;
                    remaining -= 1;
                }
                continue;
            }
        };
        for (k, t) in group.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                break 'groups;
            }
            let job_started = if k == 0 {
                load_started
            } else {
                results::reset_peak_rss();
                Instant::now()
            };
            let rec = catch(|| run_one(&models, t, dir, shard, cancel, job_started, on_event))
                .unwrap_or_else(|msg| {
                    let seconds = job_started.elapsed().as_secs_f64();
                    crate::governor::memory::release_free_memory();
                    let out = Some(dir.join(&t.name));
                    record(t.entry, shard, Status::Failed, out, seconds, Some(&msg))
                });
            let interrupted = rec.status == Status::Interrupted;
            done(rec, &mut summary, on_event)?;
            remaining -= 1;
            if interrupted {
                summary.interrupted = true;
                break 'groups;
            }
        }
    }
    summary.interrupted |= cancel.load(Ordering::Relaxed) && remaining > 0;
    summary.not_run = remaining;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

fn run_one(
    models: &Models,
    t: &Todo,
    dir: &Path,
    shard: Shard,
    cancel: &AtomicBool,
    started: Instant,
    on_event: &mut dyn FnMut(BatchEvent),
) -> Record {
    let index = t.entry.index;
    on_event(BatchEvent::JobStart {
        index,
        name: &t.name,
        job: &t.job,
    });
    let path = dir.join(&t.name);
    let mut planned_mib = None;
    // The temporary file first: an output that cannot be written fails the job before it runs.
    let outcome = PendingFile::create(&path, Existing::Replace).and_then(|pending| {
        let g = pipeline::generate_with_cancel(models, &t.job, cancel, &mut |event| {
            on_event(BatchEvent::Pipeline { index, event })
        })?;
        planned_mib = Some(results::to_mib(g.plan.peak_bytes()));
        output::encode(
            pending.file(),
            &g.image,
            &output::parameters_text(&g.as_run(&t.job)),
        )
        .map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        pending.commit()
        // `g` is dropped here, before the RSS reading below.
    });
    let over_cap = matches!(outcome, Err(Error::CapTooSmall { .. }));
    let seconds = started.elapsed().as_secs_f64();
    // Freed job buffers go back to the system, so the next job starts from the same footprint.
    crate::governor::memory::release_free_memory();
    let (status, error) = match outcome {
        Ok(()) => (Status::Ok, None),
        Err(Error::Interrupted) => (
            Status::Interrupted,
            Some("interrupted by a signal; no file written".to_string()),
        ),
        Err(e) => (Status::Failed, Some(e.to_string())),
    };
    let mut rec = record(
        t.entry,
        shard,
        status,
        Some(path),
        seconds,
        error.as_deref(),
    );
    rec.planned_mib = planned_mib;
    rec.over_cap = over_cap.then_some(true);
    rec
}

/// Jobs grouped by (model, VAE, `prediction`, TAESD), groups in order of first appearance, jobs in file
/// order within a group: each model is loaded once per prediction type asked for (the loaded
/// models carry it), and only one is in memory at a time.
fn group_by_model(todo: Vec<Todo<'_>>) -> Vec<Vec<Todo<'_>>> {
    let mut groups: Vec<Vec<Todo>> = Vec::new();
    for t in todo {
        let key = |x: &Todo| {
            let j = &x.job;
            (
                j.model.clone(),
                j.vae.clone(),
                j.prediction,
                j.taesd.clone(),
            )
        };
        match groups.iter_mut().find(|g| key(&g[0]) == key(&t)) {
            Some(g) => g.push(t),
            None => groups.push(vec![t]),
        }
    }
    groups
}

fn record(
    entry: &Entry,
    shard: Shard,
    status: Status,
    output: Option<PathBuf>,
    seconds: f64,
    error: Option<&str>,
) -> Record {
    let measured =
        matches!(status, Status::Ok | Status::Failed | Status::Interrupted) && seconds > 0.0;
    Record {
        job: entry.index,
        line: entry.line,
        shard: shard.to_string(),
        status,
        output: output.map(|p| p.display().to_string()),
        seconds: (seconds * 1000.0).round() / 1000.0,
        peak_mib: measured.then(results::peak_rss_mib).flatten(),
        rss_mib: measured.then(results::rss_mib).flatten(),
        error: error.map(str::to_string),
        planned_mib: None,
        over_cap: None,
        unix_time: results::unix_time(),
    }
}
