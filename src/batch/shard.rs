//! Which jobs this process runs when a batch is split over N processes.
//!
//! Scheme: every shard reads the whole job file; shard `I` of `N` runs the jobs whose 0-based index
//! `i` has `i mod N == I`. Round-robin keeps shards balanced when neighbouring jobs cost alike (a
//! file sorted by size or steps), and a shard needs nothing but its own `I` and `N`.
//!
//! Where `I` and `N` come from, first found wins:
//! 1. `--shard I/N`;
//! 2. Kubernetes Indexed Job: `JOB_COMPLETION_INDEX` = `I`. Kubernetes does not tell a pod the Job's
//!    `completions`, so `N` comes from `--shard-count N` or `SDCAP_SHARD_COUNT` (set it to the
//!    Job's `completions`);
//! 3. Slurm job array: `I = (SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP`,
//!    `N = SLURM_ARRAY_TASK_COUNT` (so `--array=1-8` and `--array=0-7` both work), unless
//!    `--shard-count` or `SDCAP_SHARD_COUNT` says otherwise;
//! 4. none of these: one shard, `0/1`, runs everything.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// 0-based, below `count`.
    pub index: usize,
    pub count: usize,
}

/// Where the shard came from, for the start-up message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardSource {
    Flag,
    Kubernetes,
    Slurm,
    Whole,
}

impl Shard {
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 {
            return Err(Error::BadRequest("shard count must be at least 1".into()));
        }
        if index >= count {
            return Err(Error::BadRequest(format!(
                "shard index {index} is out of range for {count} shards (0..={})",
                count - 1
            )));
        }
        Ok(Shard { index, count })
    }

    /// Whether the job at 0-based `job_index` belongs to this shard.
    pub fn owns(&self, job_index: usize) -> bool {
        job_index % self.count == self.index
    }

    pub fn is_whole(&self) -> bool {
        self.count == 1
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = Error;

    /// `I/N` with `0 <= I < N`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::BadRequest(format!("shard `{s}` is not I/N (e.g. 0/4)"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let i = i.trim().parse().map_err(|_| bad())?;
        let n = n.trim().parse().map_err(|_| bad())?;
        Shard::new(i, n)
    }
}

impl fmt::Display for ShardSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShardSource::Flag => "--shard",
            ShardSource::Kubernetes => "JOB_COMPLETION_INDEX",
            ShardSource::Slurm => "SLURM_ARRAY_TASK_ID",
            ShardSource::Whole => "no sharding",
        })
    }
}

/// Picks the shard from the flags and the environment (`env` looks a variable up; tests pass a map,
/// the CLI `std::env::var`). See the module doc for the order.
pub fn resolve(
    flag: Option<Shard>,
    count_flag: Option<usize>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Shard, ShardSource)> {
    if let Some(shard) = flag {
        return Ok((shard, ShardSource::Flag));
    }
    let count_override = match count_flag {
        Some(n) => Some(n),
        None => env_number(env, "SDCAP_SHARD_COUNT")?,
    };
    if let Some(index) = env_number(env, "JOB_COMPLETION_INDEX")? {
        let count = count_override.ok_or_else(|| {
            Error::BadRequest(
                "JOB_COMPLETION_INDEX is set but not the shard count: pass --shard-count N or set \
                 SDCAP_SHARD_COUNT to the Job's completions"
                    .into(),
            )
        })?;
        return Ok((
            in_range(index, count, "JOB_COMPLETION_INDEX")?,
            ShardSource::Kubernetes,
        ));
    }
    if let Some(id) = env_number(env, "SLURM_ARRAY_TASK_ID")? {
        let min = env_number(env, "SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let step = env_number(env, "SLURM_ARRAY_TASK_STEP")?
            .unwrap_or(1)
            .max(1);
        let count = match count_override {
            Some(n) => n,
            None => env_number(env, "SLURM_ARRAY_TASK_COUNT")?.ok_or_else(|| {
                Error::BadRequest(
                    "SLURM_ARRAY_TASK_ID is set but not SLURM_ARRAY_TASK_COUNT: pass --shard I/N"
                        .into(),
                )
            })?,
        };
        if id < min || (id - min) % step != 0 {
            return Err(Error::BadRequest(format!(
                "SLURM_ARRAY_TASK_ID {id} is not in an array starting at {min} with step {step}; \
                 pass --shard I/N"
            )));
        }
        let index = (id - min) / step;
        return Ok((
            in_range(index, count, "SLURM_ARRAY_TASK_ID")?,
            ShardSource::Slurm,
        ));
    }
    if count_flag.is_some() {
        return Err(Error::BadRequest(
            "--shard-count needs JOB_COMPLETION_INDEX or SLURM_ARRAY_TASK_ID; otherwise use \
             --shard I/N"
                .into(),
        ));
    }
    Ok((Shard::WHOLE, ShardSource::Whole))
}

fn in_range(index: usize, count: usize, what: &str) -> Result<Shard> {
    Shard::new(index, count)
        .map_err(|e| Error::BadRequest(format!("{what} gives shard {index} of {count}: {e}")))
}

/// An unset or empty variable is absent; anything else must be a non-negative integer.
fn env_number(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>> {
    match env(name) {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => {
            v.trim().parse().map(Some).map_err(|_| {
                Error::BadRequest(format!("{name}=`{v}` is not a non-negative integer"))
            })
        }
    }
}
