//! `sdcap generate`: flags → `Job` → `pipeline::txt2img` → PNG.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::time::Instant;

use sdcap::backend::Backend;
use sdcap::job::{Job, ScheduleKind};
use sdcap::weights::TensorStore;
use sdcap::{output, pipeline, Error};

use super::batch::cancel_on_signals;
use super::progress::{round3, Progress};
use super::threads::start_pool;
use super::{GenerateArgs, DEFAULT_MODEL};

impl GenerateArgs {
    /// The validated job these flags describe (model and VAE files checked, header only).
    pub fn to_job(&self) -> anyhow::Result<Job> {
        let job = Job {
            model: self
                .model
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL)),
            vae: self.vae.clone(),
            prompt: self.prompt.clone(),
            negative: self.negative_prompt.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            cfg_scale: self.cfg_scale,
            sampler: self.sampling_method,
            scheduler: self.scheduler,
            seed: resolve_seed(self.seed),
            clip_skip: self.clip_skip,
            rng: self.rng,
            ram_cap: self.ram_cap,
            prediction: None,
            size_cond: Default::default(),
        };
        job.validate()?;
        check_model_file(&job.model, "model")?;
        if let Some(vae) = &job.vae {
            check_model_file(vae, "VAE")?;
        }
        Ok(job)
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let default_model = args.model.is_none();
    // Everything that can be refused is refused before any work starts, so a bad request costs
    // nothing and leaves no file.
    check_output(&args.output)?;
    let job = args.to_job()?;
    let mut progress = Progress::new(args.progress);
    if default_model {
        progress.message(&format!(
            "sdcap: no --model given; using the shipped demo model {DEFAULT_MODEL} \
             (random weights: the image will be noise)"
        ));
    }

    // Before the pool and the model: no usable GPU is a one-line refusal (exit 2).
    sdcap::backend::select(args.backend)?;

    if let Some(notice) = start_pool(args.threads)? {
        progress.on_event(pipeline::Event::Notice(notice));
    }

    // SIGINT/SIGTERM abandon the run at the next step: no file is written, exit 130.
    let cancel = cancel_on_signals()?;
    let mut on_event = |event| progress.on_event(event);
    on_event(pipeline::Event::Stage("load"));
    let models = pipeline::Models::load(&job)?;
    if args.backend != Backend::Cpu {
        // The device-memory check between loading and running (exit 3).
        sdcap::backend::check_device_plan(&models, &job)?;
    }
    let generated = pipeline::generate_with_cancel(&models, &job, &cancel, &mut on_event)?;
    drop(models);

    output::write_png(
        &args.output,
        &generated.image,
        &output::parameters_text(&job),
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let plan = &generated.plan;
    progress.summary(
        serde_json::json!({ "output": args.output.display().to_string(), "width": job.width,
            "height": job.height, "steps": job.steps, "sampler": sampler_label(&job),
            "seed": job.seed, "seconds": round3(seconds),
            "peak_rss_mib": generated.peak_rss_bytes >> 20,
            "planned_mib": plan.peak_bytes() >> 20,
            "budget_mib": plan.budget.usable_bytes() >> 20,
            "weights": plan.residency }),
        &format!(
            "sdcap: wrote {} ({}x{}, {} steps, {}, seed {}) in {seconds:.1} s, peak RSS {} MiB \
             (planned {} MiB of {} MiB budget, weights: {:?})",
            args.output.display(),
            job.width,
            job.height,
            job.steps,
            sampler_label(&job),
            job.seed,
            generated.peak_rss_bytes >> 20,
            plan.peak_bytes() >> 20,
            plan.budget.usable_bytes() >> 20,
            plan.residency,
        ),
    );
    Ok(())
}

/// stable-diffusion.cpp's convention: a negative seed asks for a random one. Kept below 2^32 so it
/// is easy to type back in (and A1111 accepts it).
fn resolve_seed(seed: i64) -> u64 {
    if seed >= 0 {
        return seed as u64;
    }
    // RandomState is seeded from the OS per process; no extra dependency needed.
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() & 0xffff_ffff
}

fn sampler_label(job: &Job) -> String {
    match job.scheduler {
        ScheduleKind::Discrete => job.sampler.to_string(),
        ScheduleKind::Karras => format!("{} {}", job.sampler, job.scheduler),
    }
}

/// The output's directory must exist now: finding out after a long run would waste it.
fn check_output(path: &Path) -> sdcap::Result<()> {
    if path.is_dir() {
        return Err(Error::BadRequest(format!(
            "output {} is a directory; give a file name such as {}",
            path.display(),
            path.join("output.png").display()
        )));
    }
    if path.file_name().is_none() {
        return Err(Error::BadRequest(format!(
            "output {} has no file name",
            path.display()
        )));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(Error::BadRequest(format!(
            "output directory {} does not exist (create it first)",
            dir.display()
        )));
    }
    Ok(())
}

/// A missing or malformed model file is reported here, before the thread pool starts: it must open
/// (.safetensors or GGUF header only, the tensors stay unread, or a diffusers folder).
pub(super) fn check_model_file(path: &Path, what: &str) -> sdcap::Result<()> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(Error::bad_file(path, format!("{what} file not found")))
        }
        Err(e) => Err(Error::bad_file(path, format!("cannot read {what}: {e}"))),
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => TensorStore::open(path).map(drop),
    }
}
