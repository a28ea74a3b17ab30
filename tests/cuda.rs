//! The cuda backend (issue 7). The refusal test runs everywhere; the GPU test needs a build with
//! `--features cuda` and a GPU, and prints why it is skipped where there is none.
//!
//! The GPU test is one `#[test]`: the backend is chosen once per process (`backend::select`), and
//! tests in one binary share the process, so the CPU references are computed first, in the same
//! test, before the GPU is selected.

use std::process::Command;

/// `--backend cuda` with no usable GPU (none visible, or a build without the feature): one line,
/// exit 2, no panic — from `generate` and from `plan`.
#[test]
fn cuda_without_gpu_is_one_line_exit_2() {
    for command in ["generate", "plan"] {
        let out = Command::new(env!("CARGO_BIN_EXE_sdcap"))
            .args([command, "-p", "x", "-W", "64", "-H", "64", "--steps", "1"])
            .arg("-m")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/models/tiny-sd.safetensors"
            ))
            .args(["--backend", "cuda", "-o"])
            .arg(std::env::temp_dir().join("sdcap-cuda-refused.png"))
            .env("CUDA_VISIBLE_DEVICES", "")
            .output()
            .expect("sdcap runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{command}: one line: {stderr}");
        assert!(
            lines[0].starts_with("sdcap: error: --backend cuda:"),
            "{command}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{command}: {stderr}");
    }
}

#[test]
fn unknown_backend_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_sdcap"))
        .args(["generate", "-p", "x", "--backend", "tpu"])
        .output()
        .expect("sdcap runs");
    assert_eq!(out.status.code(), Some(2));
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::path::PathBuf;

    use sdcap::backend::{self, Backend};
    use sdcap::job::Job;
    use sdcap::kernels::scratch::Scratch;
    use sdcap::kernels::{conv2d, matmul_weight_t, Conv2dGeometry, DenseRows};
    use sdcap::pipeline::{self, Models};
    use sdcap::Tensor;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Exact-ish reference in f64: `y = x · Wᵀ`, and Σ|x||w| per output for the tolerance.
    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
        let (mut y, mut mag) = (vec![0.0; m * n], vec![0.0; m * n]);
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut a) = (0.0f64, 0.0f64);
                for p in 0..k {
                    let t = x[i * k + p] as f64 * w[j * k + p] as f64;
                    s += t;
                    a += t.abs();
                }
                y[i * n + j] = s;
                mag[i * n + j] = a;
            }
        }
        (y, mag)
    }

    /// Any f32 summation order of k products errs by at most γₖ·Σ|xᵢwᵢ| ≈ k·u·Σ|xᵢwᵢ| (u = 2⁻²⁴,
    /// the classical worst-case bound, products included); the check allows twice that. Both the
    /// CPU (gemm) and cuBLAS sgemm (f32, no TF32: cuBLAS's default math mode) must be inside it,
    /// while an indexing or transpose error is of order Σ|xᵢwᵢ|/√k, thousands of times larger.
    fn assert_close(what: &str, got: &[f32], want: &[f64], mag: &[f64], k: usize) {
        let eps = f32::EPSILON as f64 / 2.0;
        let mut worst = 0.0f64;
        for ((g, w), m) in got.iter().zip(want).zip(mag) {
            let err = (*g as f64 - w).abs();
            let bound = 2.0 * k as f64 * eps * m + 1e-30;
            assert!(err <= bound, "{what}: {g} vs {w} (bound {bound:e})");
            worst = worst.max(err / m.max(1e-30));
        }
        eprintln!("{what}: worst error / Σ|xw| = {worst:e}");
    }

    fn tiny_job() -> Job {
        Job {
            width: 64,
            height: 64,
            steps: 4,
            ..Job::new(
                PathBuf::from(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/models/tiny-sd.safetensors"
                )),
                "a red cube",
            )
        }
    }

    #[test]
    fn cuda_matches_cpu() {
        // CPU first (the backend is still the default).
        assert_eq!(backend::active(), Backend::Cpu);
        let (m, k, n) = (77, 768, 320);
        let x = data(m * k, 1);
        let w = data(n * k, 2);
        let (want, mag) = reference(&x, &w, m, k, n);
        let tier = Scratch::default();
        let mut cpu = vec![0.0; m * n];
        matmul_weight_t(&x, &DenseRows { data: &w, rows: n }, &mut cpu, &tier);
        assert_close("cpu linear", &cpu, &want, &mag, k);

        let geo = Conv2dGeometry {
            kernel: 3,
            stride: 1,
            pad: 1,
        };
        let img = Tensor::new(vec![1, 16, 20, 24], data(16 * 20 * 24, 3));
        let filt = data(32 * 16 * 9, 4);
        let cpu_conv = conv2d(
            &img,
            &DenseRows {
                data: &filt,
                rows: 32,
            },
            None,
            geo,
            &tier,
        );

        let job = tiny_job();
        let models = Models::load(&job).expect("tiny model loads");
        let cpu_run = pipeline::generate(&models, &job, &mut |_| {}).expect("cpu run");

        if let Err(e) = backend::select(Backend::Cuda) {
            eprintln!("SKIPPED cuda_matches_cpu: {e}");
            return;
        }
        assert_eq!(backend::active(), Backend::Cuda);
        // The RAM budget sets the CUDA libraries' host memory aside.
        let budget = sdcap::governor::Budget::discover(Some(4 << 30)).unwrap();
        assert_eq!(budget.backend_bytes, backend::CUDA_HOST_BYTES);

        let mut gpu = vec![0.0; m * n];
        matmul_weight_t(&x, &DenseRows { data: &w, rows: n }, &mut gpu, &tier);
        assert_close("cuda linear", &gpu, &want, &mag, k);

        let gpu_conv = conv2d(
            &img,
            &DenseRows {
                data: &filt,
                rows: 32,
            },
            None,
            geo,
            &tier,
        );
        let conv_err = gpu_conv.max_abs_diff(&cpu_conv);
        eprintln!("conv 3x3 16→32: cuda vs cpu max abs diff {conv_err:e}");
        // 144-term sums of products of values in [-1, 1]: f32 reordering is ~1e-5 at most.
        assert!(conv_err < 1e-4, "conv: {conv_err:e}");

        sdcap::pipeline::check_device_plan(&models, &job).expect("tiny job fits the device");
        let gpu_run = pipeline::generate(&models, &job, &mut |_| {}).expect("cuda run");
        let err = gpu_run.latent.max_abs_diff(&cpu_run.latent);
        eprintln!("tiny txt2img 64², 4 steps: final latent cuda vs cpu max abs diff {err:e}");
        // The txt2img golden bound (tests/txt2img.rs): 1e-3 on the final latent; the two backends
        // differ only in the order of f32 sums inside each weight product.
        assert!(err <= 1e-3, "latent: {err:e}");
    }
}
