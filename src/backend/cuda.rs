//! The cuda backend: weight products as cuBLAS f32 GEMMs (cudarc, libraries loaded at run time).
//!
//! Row-major host matrices are handed to column-major cuBLAS as their transposes, so no copy is
//! transposed: a row-major [r, c] matrix is a column-major c×r matrix with leading dimension c.
//! All GPU work goes through one stream behind a mutex (the kernels may call from rayon threads);
//! the products are large enough that serialising them costs nothing measurable.
//!
//! A CUDA failure after a successful `open` (lost device, out of memory despite the plan) panics
//! with the call that failed: it is a broken comparison run, not a user error.

use std::fmt::Debug;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};

use crate::error::{Error, Result};
use crate::kernels::WeightRows;

const MIB: u64 = 1 << 20;
/// Host panel used to upload a weight: 16 MiB of f32, as the CPU path's panels.
const UPLOAD_PANEL: usize = 1 << 22;
/// Device memory kept free beyond the planned operands: cuBLAS workspace and allocator rounding.
const DEVICE_MARGIN: u64 = 256 * MIB;

pub struct Gpu {
    name: String,
    ctx: Arc<CudaContext>,
    inner: Mutex<Inner>,
}

struct Inner {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
}

/// A weight [rows, row_len] in device memory, f32.
pub struct DeviceWeight {
    data: CudaSlice<f32>,
    rows: usize,
    row_len: usize,
}

fn ok<T, E: Debug>(r: std::result::Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("cuda backend: {what} failed: {e:?}"))
}

fn dim(v: usize) -> i32 {
    i32::try_from(v).unwrap_or_else(|_| panic!("cuda backend: dimension {v} exceeds cuBLAS's int"))
}

impl Gpu {
    /// Device 0, or a one-line reason why there is no usable GPU. Checks that the driver and cuBLAS
    /// libraries load before calling into them (cudarc panics on a missing library otherwise).
    pub fn open() -> std::result::Result<Gpu, String> {
        // SAFETY: these only try to dlopen the libraries by name.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("no usable GPU: the CUDA driver library (libcuda.so) was not found".into());
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err("no usable GPU: the cuBLAS library (libcublas.so) was not found".into());
        }
        cudarc::driver::result::init()
            .map_err(|e| format!("no usable GPU: CUDA driver initialisation failed ({e:?})"))?;
        let count = CudaContext::device_count()
            .map_err(|e| format!("no usable GPU: cannot count CUDA devices ({e:?})"))?;
        if count < 1 {
            return Err("no usable GPU: the CUDA driver reports no device".into());
        }
        let ctx = CudaContext::new(0)
            .map_err(|e| format!("no usable GPU: cannot open CUDA device 0 ({e:?})"))?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device 0".into());
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| format!("no usable GPU: cuBLAS initialisation failed ({e:?})"))?;
        Ok(Gpu {
            name,
            ctx,
            inner: Mutex::new(Inner { stream, blas }),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> std::result::Result<(u64, u64), String> {
        self.ctx
            .mem_get_info()
            .map(|(f, t)| (f as u64, t as u64))
            .map_err(|e| format!("{e:?}"))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves nothing half-updated on the host side.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// See `backend::check_device_memory`.
    pub fn check_memory(&self, largest_weight_values: u64, activation_bytes: u64) -> Result<()> {
        let (free, _total) = self.memory().map_err(|e| {
            Error::BadRequest(format!("--backend cuda: cannot read device memory ({e})"))
        })?;
        let need = largest_weight_values
            .saturating_mul(4)
            .saturating_add(activation_bytes)
            .saturating_add(DEVICE_MARGIN);
        if need <= free {
            return Ok(());
        }
        Err(Error::CapTooSmall {
            needed_mib: need.div_ceil(MIB),
            available_mib: free / MIB,
            hint: format!(
                "nothing on {} (this is device memory: the budget is its free memory); \
                 use a smaller image or --backend cpu",
                self.name
            ),
        })
    }

    fn upload_locked(&self, inner: &Inner, w: &dyn WeightRows) -> DeviceWeight {
        let (rows, row_len) = (w.rows(), w.row_len());
        let mut data = ok(
            inner.stream.alloc_zeros::<f32>(rows * row_len),
            "weight alloc",
        );
        let step = (UPLOAD_PANEL / row_len.max(1)).clamp(1, rows.max(1));
        let mut panel = vec![0.0f32; step * row_len];
        for r0 in (0..rows).step_by(step) {
            let n = step.min(rows - r0);
            let panel = &mut panel[..n * row_len];
            w.read_rows(r0, n, panel);
            let mut dst = data.slice_mut(r0 * row_len..(r0 + n) * row_len);
            ok(inner.stream.memcpy_htod(&*panel, &mut dst), "weight upload");
        }
        DeviceWeight {
            data,
            rows,
            row_len,
        }
    }

    /// The whole weight in device memory (dequantized on the CPU, panel by panel).
    pub fn upload(&self, w: &dyn WeightRows) -> DeviceWeight {
        let inner = self.lock();
        self.upload_locked(&inner, w)
    }

    /// `y[m, n] = x[m, k] · Wᵀ`, W [n, k]. Column-major: yᵀ (n×m) = op_T(Wᵀ as k×n) · xᵀ (k×m).
    pub fn matmul_weight_t(&self, x: &[f32], w: &dyn WeightRows, y: &mut [f32]) {
        let (n, k) = (w.rows(), w.row_len());
        let m = x.len() / k;
        assert_eq!(m * k, x.len(), "input width");
        assert_eq!(y.len(), m * n, "output size");
        let inner = self.lock();
        let dw = self.upload_locked(&inner, w);
        let dx = ok(inner.stream.clone_htod(x), "input upload");
        let mut dy = ok(inner.stream.alloc_zeros::<f32>(m * n), "output alloc");
        let cfg = GemmConfig {
            transa: CUBLAS_OP_T,
            transb: CUBLAS_OP_N,
            m: dim(n),
            n: dim(m),
            k: dim(k),
            alpha: 1.0f32,
            lda: dim(k),
            ldb: dim(k),
            beta: 0.0f32,
            ldc: dim(n),
        };
        // SAFETY: dims match the buffers: dw k·n, dx k·m, dy n·m, leading dimensions as laid out.
        ok(
            unsafe { inner.blas.gemm(cfg, &dw.data, &dx, &mut dy) },
            "sgemm",
        );
        ok(inner.stream.memcpy_dtoh(&dy, y), "output download");
    }

    /// `dst[i * ldc + j] = Σ_p W[i, p] · b[p * cols + j]`. Column-major: dstᵀ (cols×n) =
    /// bᵀ (cols×k, ld cols) · Wᵀ (k×n, ld k).
    pub fn lhs_multiply(
        &self,
        w: &DeviceWeight,
        b: &[f32],
        cols: usize,
        dst: &mut [f32],
        ldc: usize,
    ) {
        let (n, k) = (w.rows, w.row_len);
        assert_eq!(b.len(), k * cols, "rhs size");
        assert!(
            ldc >= cols && dst.len() >= (n - 1) * ldc + cols,
            "output size"
        );
        let inner = self.lock();
        let db = ok(inner.stream.clone_htod(b), "rhs upload");
        let mut dc = ok(inner.stream.alloc_zeros::<f32>(n * cols), "output alloc");
        let cfg = GemmConfig {
            transa: CUBLAS_OP_N,
            transb: CUBLAS_OP_N,
            m: dim(cols),
            n: dim(n),
            k: dim(k),
            alpha: 1.0f32,
            lda: dim(cols),
            ldb: dim(k),
            beta: 0.0f32,
            ldc: dim(cols),
        };
        // SAFETY: db k·cols, w k·n, dc n·cols, leading dimensions as laid out.
        ok(
            unsafe { inner.blas.gemm(cfg, &db, &w.data, &mut dc) },
            "sgemm",
        );
        if ldc == cols {
            ok(
                inner.stream.memcpy_dtoh(&dc, &mut dst[..n * cols]),
                "output download",
            );
        } else {
            let host = ok(inner.stream.clone_dtoh(&dc), "output download");
            for (i, row) in host.chunks_exact(cols).enumerate() {
                dst[i * ldc..i * ldc + cols].copy_from_slice(row);
            }
        }
    }
}
