//! Compute backend choice: `cpu` (the product) or `cuda` (a comparison path, `--features cuda`).
//!
//! On `cuda` only the weight products go to the GPU: every Linear (`kernels::matmul_weight_t`) and
//! every Conv2d filter product (`kernels::LhsPanels`) runs as one cuBLAS f32 GEMM. Weights are
//! still read through `WeightRows::read_rows`, so a quantized weight is dequantized on the CPU into
//! f32 panels and those are uploaded; everything else (norms, attention, activations, sampling,
//! VAE non-matmul work) stays on the CPU.
//!
//! The choice is process-wide: `select` is called once by the CLI before any work, and the kernels
//! read it through `active_gpu`. This is the one exception to "no global state except the rayon
//! pool" (DESIGN.md): threading a backend handle through every layer and kernel signature would
//! touch all of `nn` and `kernels` for a comparison path, while the choice is, like the thread pool,
//! a property of the process that never changes during a run. Library users that never call
//! `select` get the CPU.

#[cfg(feature = "cuda")]
pub mod cuda;

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::kernels::WeightRows;

/// Where the weight matmuls run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    #[default]
    Cpu,
    Cuda,
}

impl Backend {
    pub const NAMES: &'static [&'static str] = &["cpu", "cuda"];
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Backend::Cpu),
            "cuda" => Ok(Backend::Cuda),
            _ => Err(format!("unknown backend `{s}` (cpu, cuda)")),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        })
    }
}

#[cfg(feature = "cuda")]
type Gpu = cuda::Gpu;
/// Without the `cuda` feature there is no GPU type; an uninhabited stand-in keeps the hooks in the
/// kernels identical in both builds (and compiles them away).
#[cfg(not(feature = "cuda"))]
pub enum Gpu {}

static ACTIVE: OnceLock<Option<Gpu>> = OnceLock::new();

/// Chooses the backend for this process; call once, before any compute. `Cuda` fails with
/// `Error::BadRequest` (exit 2) when this build has no CUDA support or no usable GPU is found;
/// it never panics. A second call with a different choice is refused.
pub fn select(backend: Backend) -> Result<()> {
    let gpu = match backend {
        Backend::Cpu => None,
        Backend::Cuda => Some(open_gpu()?),
    };
    let want_gpu = gpu.is_some();
    ACTIVE.get_or_init(|| gpu);
    if ACTIVE.get().is_some_and(|g| g.is_some() == want_gpu) {
        Ok(())
    } else {
        Err(Error::BadRequest(
            "the backend was already chosen for this process".into(),
        ))
    }
}

/// The backend in use (`Cpu` until `select` chose otherwise).
pub fn active() -> Backend {
    match active_gpu() {
        Some(_) => Backend::Cuda,
        None => Backend::Cpu,
    }
}

fn active_gpu() -> Option<&'static Gpu> {
    ACTIVE.get().and_then(Option::as_ref)
}

#[cfg(feature = "cuda")]
fn open_gpu() -> Result<Gpu> {
    cuda::Gpu::open().map_err(|e| Error::BadRequest(format!("--backend cuda: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn open_gpu() -> Result<Gpu> {
    Err(Error::BadRequest(
        "--backend cuda: this build has no CUDA support (rebuild with `--features cuda`)".into(),
    ))
}

/// Host memory the CUDA driver and cuBLAS take once loaded, outside every stage: measured on an
/// H100 machine as the tiny model's peak RSS, 256 MiB on cpu and 660 MiB on cuda (+404 MiB),
/// rounded up. The RAM budget sets it aside when the cuda backend is active (`Budget::discover`).
pub const CUDA_HOST_BYTES: u64 = 420 << 20;

/// Host memory the active backend's libraries take (0 on the CPU).
pub fn host_bytes() -> u64 {
    if active_gpu().is_some() {
        CUDA_HOST_BYTES
    } else {
        0
    }
}

/// Device memory check for the cuda backend, the governor's rule applied to the GPU: the budget is
/// the device's free memory, the need is what one weight product holds there at once (the largest
/// weight in f32, plus an upper bound for its operands: the stage's whole activation estimate).
/// Refuses with `Error::CapTooSmall` (exit 3). No-op on the CPU backend.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn check_device_memory(largest_weight_values: u64, activation_bytes: u64) -> Result<()> {
    match active_gpu() {
        None => Ok(()),
        #[cfg(feature = "cuda")]
        Some(gpu) => gpu.check_memory(largest_weight_values, activation_bytes),
        #[cfg(not(feature = "cuda"))]
        Some(g) => match *g {},
    }
}

/// Hook for `kernels::matmul_weight_t`: `y = x · Wᵀ` on the GPU. Returns false (nothing done)
/// on the CPU backend.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn matmul_weight_t(x: &[f32], w: &dyn WeightRows, y: &mut [f32]) -> bool {
    match active_gpu() {
        None => false,
        #[cfg(feature = "cuda")]
        Some(gpu) => {
            gpu.matmul_weight_t(x, w, y);
            true
        }
        #[cfg(not(feature = "cuda"))]
        Some(g) => match *g {},
    }
}

/// A weight uploaded once for many products (`kernels::LhsPanels`: one conv weight, many tiles).
pub struct DeviceWeight {
    #[cfg(feature = "cuda")]
    inner: cuda::DeviceWeight,
    #[cfg(not(feature = "cuda"))]
    _never: Gpu,
}

impl DeviceWeight {
    /// The weight on the GPU when the cuda backend is active, else None.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn upload(w: &dyn WeightRows) -> Option<DeviceWeight> {
        match active_gpu() {
            None => None,
            #[cfg(feature = "cuda")]
            Some(gpu) => Some(DeviceWeight {
                inner: gpu.upload(w),
            }),
            #[cfg(not(feature = "cuda"))]
            Some(g) => match *g {},
        }
    }

    /// `dst[i * ldc + j] = Σ_p W[i, p] · b[p * cols + j]` (as `LhsPanels::multiply`).
    pub fn lhs_multiply(&self, b: &[f32], cols: usize, dst: &mut [f32], ldc: usize) {
        #[cfg(feature = "cuda")]
        {
            let gpu = active_gpu().expect("a DeviceWeight exists only with an active GPU");
            gpu.lhs_multiply(&self.inner, b, cols, dst, ldc);
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (b, cols, dst, ldc);
            match self._never {}
        }
    }
}
