//! The job file: JSON Lines, one job object per line, each field a default-overriding setting.
//!
//! ```text
//! {"prompt": "a lighthouse at dusk", "seed": 1, "steps": 20}
//! {"prompt": "a red bicycle", "negative": "blurry", "width": 640, "sampler": "dpm++2m", "cfg": 6}
//! ```
//!
//! Fields: every setting of `request::Request` under its job-file key (`prompt`, `negative`, `seed`,
//! `width`, `height`, `steps`, `cfg`, `sampler`, `scheduler`, `clip_skip`, `rng`, `model`, `vae`,
//! `ram_cap` (bytes, or a size such as `"6G"`), `prediction`, `original_size`, `crop_coords`,
//! `target_size`, `prompt_syntax`, `lora`, `lora_model_dir`, `init_image`, `strength`, `mask`,
//! `taesd`, `preview`, `preview_interval`, `preview_path`, `taesd_preview_only`, `precision`). A
//! field left out takes the value of the corresponding command-line flag; `width`, `height`,
//! `steps`, `cfg`, `sampler` and `scheduler` given by neither take the model family's default (see
//! `Job::apply_defaults`). Blank lines are ignored and do not count as jobs. A line that is not a
//! valid job (bad JSON, an unknown field, a bad value) is still a job: it keeps its index and fails
//! on its own, the others run.
//! Relative paths (model, vae, LoRAs, images, TAESD, preview) are taken from the job file's folder.

use std::path::Path;

use crate::error::{Error, Result};
use crate::job::{Given, Job};
use crate::request::Request;

/// One non-blank line of the job file.
#[derive(Clone, Debug)]
pub struct Entry {
    /// 0-based position among the jobs (non-blank lines): sharding and output names use it.
    pub index: usize,
    /// 1-based line number in the file, for messages.
    pub line: usize,
    /// The job with the defaults applied and validated, or why the line is not a valid job.
    pub job: std::result::Result<Job, String>,
    /// Which of the job's per-family settings the line or the flags gave; the runner fills the
    /// others from the model's family before naming the output.
    pub given: Given,
}

/// Reads a job file (`-` is standard input). Only an unreadable file is an error here; bad lines
/// become failing entries. `defaults` supplies every field a line leaves out; its prompt may be
/// empty, in which case a line without `prompt` fails. Every setting of `defaults` counts as given
/// (no per-family defaults); see [`read_jobs_given`].
pub fn read_jobs(path: &Path, defaults: &Job) -> Result<Vec<Entry>> {
    read_jobs_given(path, defaults, Given::ALL)
}

/// As [`read_jobs`], where `given` says which per-family settings of `defaults` the user gave (the
/// command-line flags); a line's own fields count as given too.
pub fn read_jobs_given(path: &Path, defaults: &Job, given: Given) -> Result<Vec<Entry>> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| Error::bad_file("<stdin>", format!("cannot read jobs: {e}")))?
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| Error::bad_file(path, format!("cannot read job file: {e}")))?
    };
    let base = match path.parent() {
        Some(p) if path != Path::new("-") && !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let entries = parse_jobs_given(&text, defaults, given, base);
    if entries.is_empty() {
        return Err(Error::bad_file(path, "the job file holds no jobs"));
    }
    Ok(entries)
}

/// Parses job lines; relative `model`/`vae` paths are joined to `base`. Every setting of
/// `defaults` counts as given.
pub fn parse_jobs(text: &str, defaults: &Job, base: &Path) -> Vec<Entry> {
    parse_jobs_given(text, defaults, Given::ALL, base)
}

/// As [`parse_jobs`], with which per-family settings of `defaults` were given.
pub fn parse_jobs_given(text: &str, defaults: &Job, given: Given, base: &Path) -> Vec<Entry> {
    text.lines()
        .enumerate()
        .map(|(n, l)| (n + 1, l.trim_start_matches('\u{feff}').trim()))
        .filter(|(_, l)| !l.is_empty())
        .enumerate()
        .map(|(index, (line, text))| {
            let mut line_given = given;
            let job = parse_line(text, defaults, &mut line_given, base);
            Entry {
                index,
                line,
                job,
                given: line_given,
            }
        })
        .collect()
}

fn parse_line(
    text: &str,
    defaults: &Job,
    given: &mut Given,
    base: &Path,
) -> std::result::Result<Job, String> {
    let mut line: Request = serde_json::from_str(text).map_err(|e| {
        // serde's "at line 1 column 9" counts within the line; the record carries the file line.
        let msg = e.to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        format!("not a valid job: {msg} (column {})", e.column())
    })?;
    if line.prompt.is_none() && defaults.prompt.is_empty() {
        return Err("the job has no `prompt` (and no --prompt default was given)".into());
    }
    line.rebase(base);
    let mut job = defaults.clone();
    let err = |e: Error| e.to_string();
    line.apply(&mut job, given).map_err(err)?;
    job.validate().map_err(err)?;
    Ok(job)
}
