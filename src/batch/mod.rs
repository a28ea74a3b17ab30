//! Batch generation for cron jobs, containers and job arrays: a JSON Lines job file in, one PNG per
//! job and a results log out.
//!
//! - [`jobfile`]: the job file format and its defaults.
//! - [`naming`]: output names derived from the job, stable across runs (what makes resume work).
//! - [`shard`]: which jobs a process runs when N processes share a batch.
//! - [`lock`]: the output directory's lock against overlapping runs.
//! - [`results`]: `results.jsonl`, and the memory figures recorded per job.
//! - [`runner`]: the loop: plan, load each model once, generate, write atomically, record.
//!
//! The library never prints and never installs signal handlers: the caller passes a cancel flag
//! and an event callback (see `src/cli/batch.rs`).

pub mod jobfile;
pub mod lock;
pub mod naming;
pub mod results;
pub mod runner;
pub mod shard;

pub use jobfile::{read_jobs, Entry};
pub use results::{Record, Status};
pub use runner::{run, BatchEvent, Summary};
pub use shard::Shard;
