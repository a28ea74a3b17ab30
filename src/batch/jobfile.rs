//! The job file: JSON Lines, one job object per line, each field a default-overriding setting.
//!
//! ```text
//! {"prompt": "a lighthouse at dusk", "seed": 1, "steps": 20}
//! {"prompt": "a red bicycle", "negative": "blurry", "width": 640, "sampler": "dpm++2m", "cfg": 6}
//! ```
//!
//! Fields: `prompt`, `negative` (alias `negative_prompt`), `seed`, `width`, `height`, `steps`,
//! `cfg` (alias `cfg_scale`), `sampler` (alias `sampling_method`), `scheduler`, `clip_skip`, `rng`,
//! `model`, `vae`, `ram_cap` (bytes, or a size such as `"6G"`), `prediction` (`"eps"` or `"v"`),
//! SDXL's size conditioning `original_size` and `target_size` (`"WxH"`, e.g. `"2048x2048"`) and
//! `crop_coords` (`"TOP,LEFT"`, e.g. `"0,256"`), and `prompt_syntax` (`"a1111"` or `"plain"`). A
//! field left out takes the value of the corresponding command-line flag; `width`, `height`,
//! `steps`, `cfg`, `sampler` and `scheduler` given by neither take the model family's default (see
//! `Job::apply_defaults`). Blank lines are ignored and do not count as jobs. A line that is not a
//! valid job (bad JSON, an unknown field, a bad value) is still a job: it keeps its index and fails
//! on its own, the others run.
//! Relative `model` and `vae` paths are taken from the job file's folder.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::governor::parse_size;
use crate::job::{Given, Job, SizeConditioning};

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    prompt: Option<String>,
    #[serde(alias = "negative_prompt")]
    negative: Option<String>,
    seed: Option<i64>,
    width: Option<u32>,
    height: Option<u32>,
    steps: Option<u32>,
    #[serde(alias = "cfg_scale")]
    cfg: Option<f32>,
    #[serde(alias = "sampling_method")]
    sampler: Option<String>,
    scheduler: Option<String>,
    clip_skip: Option<u32>,
    rng: Option<String>,
    model: Option<PathBuf>,
    vae: Option<PathBuf>,
    ram_cap: Option<serde_json::Value>,
    prediction: Option<String>,
    original_size: Option<String>,
    crop_coords: Option<String>,
    target_size: Option<String>,
    prompt_syntax: Option<String>,
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
    let line: Line = serde_json::from_str(text).map_err(|e| {
        // serde's "at line 1 column 9" counts within the line; the record carries the file line.
        let msg = e.to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        format!("not a valid job: {msg} (column {})", e.column())
    })?;
    let mut job = defaults.clone();
    if let Some(prompt) = line.prompt {
        job.prompt = prompt;
    } else if job.prompt.is_empty() {
        return Err("the job has no `prompt` (and no --prompt default was given)".into());
    }
    if line.negative.is_some() {
        job.negative = line.negative;
    }
    given.width |= set(&mut job.width, line.width);
    given.height |= set(&mut job.height, line.height);
    given.steps |= set(&mut job.steps, line.steps);
    set(&mut job.clip_skip, line.clip_skip);
    given.cfg_scale |= set(&mut job.cfg_scale, line.cfg);
    if let Some(seed) = line.seed {
        job.seed = u64::try_from(seed).map_err(|_| {
            format!("seed {seed} is negative; a batch needs fixed seeds so reruns resume")
        })?;
    }
    let err = |e: Error| e.to_string();
    if let Some(s) = line.sampler {
        job.sampler = s.parse().map_err(err)?;
        given.sampler = true;
    }
    if let Some(s) = line.scheduler {
        job.scheduler = s.parse().map_err(err)?;
        given.scheduler = true;
    }
    if let Some(s) = line.prediction {
        job.prediction = Some(s.parse().map_err(err)?);
    }
    if let Some(s) = line.original_size {
        job.size_cond.original =
            Some(SizeConditioning::parse_size("original_size", &s).map_err(err)?);
    }
    if let Some(s) = line.crop_coords {
        job.size_cond.crop = SizeConditioning::parse_crop(&s).map_err(err)?;
    }
    if let Some(s) = line.target_size {
        job.size_cond.target = Some(SizeConditioning::parse_size("target_size", &s).map_err(err)?);
    }
    if let Some(s) = line.prompt_syntax {
        job.prompt_syntax = s.parse().map_err(err)?;
    }
    if let Some(s) = line.rng {
        job.rng = s.parse().map_err(err)?;
    }
    if let Some(m) = line.model {
        job.model = base.join(m);
    }
    if let Some(v) = line.vae {
        job.vae = Some(base.join(v));
    }
    if let Some(cap) = line.ram_cap {
        job.ram_cap = Some(
            match &cap {
                serde_json::Value::Number(n) => n.as_u64().filter(|&b| b > 0),
                serde_json::Value::String(s) => parse_size(s).ok(),
                _ => None,
            }
            .ok_or_else(|| format!("ram_cap {cap} is not a size (e.g. \"6G\" or 6442450944)"))?,
        );
    }
    job.validate().map_err(err)?;
    Ok(job)
}

/// Sets `value` from the line when it has one; says whether it had.
fn set<T>(value: &mut T, from_line: Option<T>) -> bool {
    from_line.map(|v| *value = v).is_some()
}
