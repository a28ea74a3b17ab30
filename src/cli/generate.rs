//! `sdcap generate`: flags → `Job` → `pipeline::txt2img` → PNG.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use sdcap::atomic_file::{Existing, PendingFile};
use sdcap::backend::Backend;
use sdcap::job::{Given, Job, ScheduleKind};
use sdcap::models::Models;
use sdcap::output::RgbImage;
use sdcap::weights::{PredictionSource, TensorStore};
use sdcap::{output, pipeline, Error};

use super::batch::cancel_on_signals;
use super::progress::{round3, Progress};
use super::threads::start_pool;
use super::{GenerateArgs, DEFAULT_MODEL};

impl GenerateArgs {
    /// The validated job these flags describe (model and VAE files checked, header only), and which
    /// settings were given: the others hold placeholders until [`resolve`] fills them from the
    /// model's family. The given values are checked here, before anything is loaded.
    pub fn to_job(&self) -> anyhow::Result<(Job, Given)> {
        let mut request = self.request.clone();
        if request.prompt.is_none() {
            return Err(Error::BadRequest(
                "the following required argument was not provided: --prompt <TEXT>".into(),
            )
            .into());
        }
        // stable-diffusion.cpp's convention: a negative seed asks for a random one.
        if let Some(seed) = request.seed.filter(|&s| s < 0) {
            request.seed = Some(resolve_seed(seed) as i64);
        }
        let mut job = Job::new(PathBuf::from(DEFAULT_MODEL), "");
        let mut given = Given::default();
        request.apply(&mut job, &mut given)?;
        job.validate()?;
        check_model_file(&job.model, "model")?;
        if let Some(vae) = &job.vae {
            check_model_file(vae, "VAE")?;
        }
        Ok((job, given))
    }
}

/// The job with the model family's defaults in place of every setting the user did not give
/// (`Job::apply_defaults`), checked again; and a notice when a flag the family does not read was
/// given.
pub(super) fn resolve(
    models: &Models,
    job: &mut Job,
    given: Given,
) -> sdcap::Result<Option<String>> {
    job.apply_defaults(models.spec, models.prediction, given);
    // The files were read by `to_job`; only what the defaults changed needs a look.
    job.validate_settings()?;
    Ok(
        (job.size_cond.is_set() && !models.spec.size_conditioning).then(|| {
            format!(
            "--original-size, --crop-coords and --target-size condition SDXL only; {} ignores them",
            models.spec.name
        )
        }),
    )
}

/// Why this prediction type was used, for the summary and `plan`.
pub(super) fn prediction_reason(source: PredictionSource) -> &'static str {
    match source {
        PredictionSource::Flag => "--prediction",
        PredictionSource::File => "the file's metadata",
        PredictionSource::Weights => "the weights",
        PredictionSource::Family => "the family default",
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let default_model = args.request.model.is_none();
    // Everything that can be refused is refused before any work starts, so a bad request costs
    // nothing and leaves no file. The output's temporary file is created now: a directory where
    // it cannot be written is found before the model is loaded.
    let sink = Sink::open(&args.output)?;
    let (mut job, given) = args.to_job()?;
    let mut progress = Progress::new(args.progress);
    if default_model {
        progress.message(&format!(
            "sdcap: no --model given; using the shipped demo model {DEFAULT_MODEL} \
             (random weights: the image will be noise)"
        ));
    }

    // Before the pool and the model: no usable GPU is a one-line refusal (exit 2).
    sdcap::backend::select(args.request.backend.unwrap_or_default())?;

    if let Some(notice) = start_pool(args.threads)? {
        progress.on_event(pipeline::Event::Notice(notice));
    }

    // SIGINT/SIGTERM abandon the run at the next step: no file is written, exit 130.
    let cancel = cancel_on_signals()?;
    let mut on_event = |event| progress.on_event(event);
    on_event(pipeline::Event::Stage("load"));
    let models = Models::load(&job)?;
    if let Some(notice) = resolve(&models, &mut job, given)? {
        on_event(pipeline::Event::Notice(notice));
    }
    let (family, prediction) = (models.spec.name, models.prediction);
    let because = prediction_reason(models.prediction_source);
    if args.request.backend.unwrap_or_default() != Backend::Cpu {
        // The device-memory check between loading and running (exit 3).
        sdcap::pipeline::check_device_plan(&models, &job)?;
    }
    let generated = pipeline::generate_with_cancel(&models, &job, &cancel, &mut on_event)?;
    let models_source = models.prediction_source;
    drop(models);

    sink.write(
        &generated.image,
        &output::parameters_text(&generated.as_run(&job)),
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let plan = &generated.plan;
    progress.summary(
        serde_json::json!({ "output": args.output.display().to_string(), "width": job.width,
            "height": job.height, "steps": job.steps, "sampler": sampler_label(&job),
            "seed": job.seed, "family": family, "prediction": prediction,
            "prediction_source": models_source, "seconds": round3(seconds),
            "peak_rss_mib": generated.peak_rss_bytes >> 20,
            "planned_mib": plan.peak_bytes() >> 20,
            "budget_mib": plan.budget.usable_bytes() >> 20,
            "weights": plan.residency }),
        &format!(
            "sdcap: wrote {} ({family}, {prediction}-prediction from {because}, {}x{}, {} steps, \
             {}, seed {}) in {seconds:.1} s, peak RSS {} MiB (planned {} MiB of {} MiB budget, \
             weights: {:?})",
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
        ScheduleKind::Karras | ScheduleKind::Trailing => {
            format!("{} {}", job.sampler, job.scheduler)
        }
    }
}

/// Where the PNG goes: a file (its temporary file already created) or standard output (`-o -`).
enum Sink {
    File(PendingFile),
    Stdout,
}

impl Sink {
    fn open(path: &Path) -> sdcap::Result<Sink> {
        if path.as_os_str() != "-" {
            return PendingFile::create(path, Existing::Replace).map(Sink::File);
        }
        if std::io::stdout().is_terminal() {
            return Err(Error::BadRequest(
                "-o - writes the PNG to standard output, which is a terminal; redirect it to a \
                 file or a pipe"
                    .into(),
            ));
        }
        Ok(Sink::Stdout)
    }

    /// Encodes the PNG into the temporary file and moves it into place, or writes it to stdout
    /// (encoded first, so a failed encode writes nothing).
    fn write(self, image: &RgbImage, parameters: &str) -> sdcap::Result<()> {
        match self {
            Sink::File(pending) => {
                output::encode(pending.file(), image, parameters).map_err(|source| Error::Io {
                    path: pending.path().to_path_buf(),
                    source,
                })?;
                pending.commit()
            }
            Sink::Stdout => {
                let mut png = Vec::new();
                output::encode(&mut png, image, parameters)
                    .and_then(|()| {
                        let mut out = std::io::stdout().lock();
                        out.write_all(&png)?;
                        out.flush()
                    })
                    .map_err(|source| Error::Io {
                        path: PathBuf::from("<stdout>"),
                        source,
                    })
            }
        }
    }
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
