//! Library errors. Each variant maps to one documented exit code (see `exit_code`).

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request that cannot be run as given (bad size, steps 0, unknown sampler …).
    #[error("{0}")]
    BadRequest(String),
    /// A model or input file that is missing, unreadable or malformed.
    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },
    /// A model whose architecture we recognise but do not run yet, or do not recognise at all.
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),
    /// A tensor the network needs is absent or has the wrong shape.
    #[error("model is missing tensor `{0}`")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    BadShape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    /// Writing the output failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// No plan fits the memory budget; nothing was generated.
    #[error("the RAM cap cannot be met: this job needs about {needed_mib} MiB, the budget allows {available_mib} MiB; would fit: {hint}")]
    CapTooSmall {
        needed_mib: u64,
        available_mib: u64,
        hint: String,
    },
    /// A network produced NaN or infinite values (non-finite weights, or an overflow); nothing was
    /// written. `stage` names the network, `at` where in the run (e.g. "step 3 of 20").
    #[error("a tensor with NaN or infinite values was produced in the {stage} ({at}): the model file holds non-finite weights or the values overflowed; nothing was written")]
    NonFinite { stage: &'static str, at: String },
    /// The run was interrupted by a signal; nothing partial was written.
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    pub fn bad_file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// Exit codes from DESIGN.md: 2 bad input, 1 unexpected, 130 interrupted.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::BadRequest(_)
            | Error::BadFile { .. }
            | Error::UnsupportedModel(_)
            | Error::MissingTensor(_)
            | Error::BadShape { .. } => 2,
            Error::Io { .. } | Error::NonFinite { .. } => 1,
            Error::CapTooSmall { .. } => 3,
            Error::Interrupted => 130,
        }
    }
}
