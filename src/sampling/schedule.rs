//! Timesteps and sigmas for one run: the SD1.x/SD2.x/SDXL training noise schedule and the inference
//! spacings that diffusers' schedulers derive from it (the checkpoints' scheduler config: `scaled_linear`
//! betas 0.00085..0.012, 1000 training steps, `timestep_spacing="leading"`, `steps_offset=1`,
//! `set_alpha_to_one=False`). `--scheduler trailing` is `timestep_spacing="trailing"` (SD-Turbo,
//! SDXL-Turbo), `--scheduler karras` is `use_karras_sigmas=True`.
//!
//! Precision follows diffusers: the training tables are float32 tensors (`alphas_cumprod` accumulated in
//! float64 by torch's cumprod, stored as float32), the Karras and timestep arithmetic is numpy float64,
//! and the resulting sigmas are rounded to float32.

use crate::job::{SamplerKind, ScheduleKind};
use crate::{Error, Result};

/// Timesteps of the training schedule (`num_train_timesteps`).
pub const TRAIN_STEPS: usize = 1000;
const BETA_START: f64 = 0.00085;
const BETA_END: f64 = 0.012;
/// `steps_offset` of the SD1.x config: "leading" timesteps end at 1, not 0.
const STEPS_OFFSET: usize = 1;
/// LCM's distillation schedule (`original_inference_steps`); inference timesteps are a subset of it.
pub const LCM_ORIGINAL_STEPS: usize = 50;
/// Karras et al. (2022) use rho = 7.
const KARRAS_RHO: f64 = 7.0;

/// Timesteps and sigmas for one run, SD1.x training schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// The timestep the UNet sees at each model evaluation, as diffusers passes it (diffusers'
    /// `scheduler.timesteps`; integers except Euler-type with Karras and DPM2's interpolated ones). One
    /// per step, except Heun and DPM2, which evaluate the model twice per step but the last (2N-1).
    pub timesteps: Vec<f32>,
    /// diffusers' `scheduler.sigmas`: one per step plus a final 0 (Euler, Euler a, LMS, DPM++ 2M (SDE),
    /// UniPC); Heun and DPM2 repeat the inner ones as diffusers does (`[s0, s1, s1, …, 0]`, DPM2 with
    /// two more 0); `None` for DDIM and LCM.
    pub sigmas: Option<Vec<f32>>,
    /// The unit-normal initial noise is multiplied by this before the first step.
    pub init_noise_sigma: f32,
    pub(crate) sampler: SamplerKind,
    pub(crate) alphas_cumprod: Vec<f32>,
    /// Sampling steps this schedule runs (`timesteps.len()` is the number of model evaluations).
    pub(crate) steps: usize,
    /// Steps of the full schedule skipped before the first one run (img2img's `t_start`, diffusers'
    /// `set_begin_index`; 0 for txt2img). See [`Schedule::begin_at`].
    pub(crate) begin: usize,
    /// The step sigmas of the skipped steps (LMS weighs its first derivatives with them, as
    /// diffusers' LMSDiscreteScheduler does from its step index).
    pub(crate) skipped_sigmas: Vec<f32>,
}

impl Schedule {
    /// The sampler this schedule was made for.
    pub fn sampler(&self) -> SamplerKind {
        self.sampler
    }

    /// The 1000 cumulative alpha products of the training schedule (float32, as diffusers holds them).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// Sampling steps run; the model is evaluated `timesteps.len()` times.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Steps of the full schedule skipped before this one starts (0 unless made by `begin_at`).
    pub fn begin(&self) -> usize {
        self.begin
    }

    /// The steps of the full schedule the run was asked for (`steps() + begin()`).
    pub fn full_steps(&self) -> usize {
        self.steps + self.begin
    }

    /// Model evaluations per step in diffusers' table layout (`scheduler.order`): 2 for Heun and
    /// DPM2 (their timesteps and sigmas repeat every inner entry), else 1.
    fn order(&self) -> usize {
        match self.sampler {
            SamplerKind::Heun | SamplerKind::Dpm2 => 2,
            _ => 1,
        }
    }

    /// The schedule of an img2img run that starts `t_start` steps into this one, as diffusers'
    /// img2img and inpaint pipelines make it: the full schedule's tables from index
    /// `t_start * order` on (`timesteps[t_start * order:]` and `set_begin_index(t_start * order)`),
    /// a sampler state as fresh as a new scheduler's (first multistep step of first order, no
    /// history). Fails when no step would remain.
    pub fn begin_at(&self, t_start: usize) -> Result<Schedule> {
        if self.begin != 0 {
            return Err(Error::BadRequest("schedule already begins late".into()));
        }
        if t_start >= self.steps {
            return Err(Error::BadRequest(format!(
                "starting at step {t_start} of {} leaves no step to run",
                self.steps
            )));
        }
        let at = t_start * self.order();
        let skipped_sigmas = self
            .step_sigmas()
            .map(|s| s[..t_start].to_vec())
            .unwrap_or_default();
        Ok(Schedule {
            timesteps: self.timesteps[at..].to_vec(),
            sigmas: self.sigmas.as_ref().map(|s| s[at..].to_vec()),
            init_noise_sigma: self.init_noise_sigma,
            sampler: self.sampler,
            alphas_cumprod: self.alphas_cumprod.clone(),
            steps: self.steps - t_start,
            begin: t_start,
            skipped_sigmas,
        })
    }

    /// diffusers' `scheduler.add_noise(x0, noise, t)` for the table entry `position` of this
    /// schedule (0 = the first timestep run: img2img's start latent; `c + 1` after model evaluation
    /// `c`: what inpainting blends with), in each scheduler class's float32 operations:
    /// sigma-based (Euler, Euler a, Heun, DPM2, LMS) `x0 + noise * sigma`; DPM-Solver++ and UniPC
    /// `alpha_t * x0 + sigma_t * noise` with `alpha_t = 1/sqrt(sigma^2+1)`, `sigma_t = sigma *
    /// alpha_t`; DDIM and LCM (DDPM form) `sqrt(a) * x0 + sqrt(1 - a) * noise`, `a =
    /// alphas_cumprod[t]`.
    pub fn add_noise(&self, position: usize, x0: &[f32], noise: &[f32]) -> Vec<f32> {
        assert_eq!(x0.len(), noise.len(), "add_noise: latent and noise sizes");
        let (a, b) = self.add_noise_coeffs(position);
        match self.sampler {
            SamplerKind::Euler
            | SamplerKind::EulerA
            | SamplerKind::Heun
            | SamplerKind::Dpm2
            | SamplerKind::Lms => x0.iter().zip(noise).map(|(x, n)| x + n * b).collect(),
            _ => x0.iter().zip(noise).map(|(x, n)| a * x + b * n).collect(),
        }
    }

    /// The `(a, b)` of `add_noise` at table entry `position`: the start latent is `a * x0 + b * noise`.
    pub fn add_noise_coeffs(&self, position: usize) -> (f32, f32) {
        match (self.sampler, self.sigmas.as_deref()) {
            (SamplerKind::DpmPp2m | SamplerKind::DpmPp2mSde | SamplerKind::UniPc, Some(sigmas)) => {
                let sigma = sigmas[position];
                let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
                (alpha, sigma * alpha)
            }
            (_, Some(sigmas)) => (1.0, sigmas[position]),
            (_, None) => {
                let a = self.alphas_cumprod[self.timesteps[position] as usize];
                (a.sqrt(), (1.0 - a).sqrt())
            }
        }
    }

    /// The sigma at the start of each step plus the final 0 (`steps() + 1` values): `sigmas` without
    /// the repeats of Heun's and DPM2's layout.
    pub(crate) fn step_sigmas(&self) -> Option<Vec<f32>> {
        let sigmas = self.sigmas.as_deref()?;
        Some(match self.sampler {
            SamplerKind::Heun | SamplerKind::Dpm2 => std::iter::once(sigmas[0])
                .chain(sigmas[1..].iter().step_by(2).copied())
                .take(self.steps + 1)
                .collect(),
            _ => sigmas.to_vec(),
        })
    }
}

/// Builds the schedule `sampler` uses for `steps` steps, as diffusers' `set_timesteps(steps)` does.
pub fn schedule(sampler: SamplerKind, scheduler: ScheduleKind, steps: usize) -> Result<Schedule> {
    if steps == 0 {
        return Err(Error::BadRequest("steps must be at least 1".into()));
    }
    if steps > TRAIN_STEPS {
        return Err(Error::BadRequest(format!(
            "steps {steps} is more than the {TRAIN_STEPS} training timesteps"
        )));
    }
    let karras = scheduler == ScheduleKind::Karras;
    let trailing = scheduler == ScheduleKind::Trailing;
    if karras && matches!(sampler, SamplerKind::Ddim | SamplerKind::Lcm) {
        return Err(Error::BadRequest(format!(
            "scheduler karras does not apply to {sampler} (it has no sigmas); use --scheduler discrete"
        )));
    }
    if trailing && sampler == SamplerKind::Lcm {
        return Err(Error::BadRequest(
            "scheduler trailing does not apply to lcm (its timesteps come from its 50-step distillation schedule); use --scheduler discrete".into(),
        ));
    }
    // The spacing of the Euler-type samplers and DDIM: "leading" (also what Karras starts from) or
    // "trailing".
    let spaced = || {
        if trailing {
            trailing_spacing(steps)
        } else {
            in_range(leading(steps))
        }
    };
    let alphas_cumprod = alphas_cumprod();
    let train_sigmas = train_sigmas(&alphas_cumprod);
    let (timesteps, sigmas) = match sampler {
        SamplerKind::Euler | SamplerKind::EulerA | SamplerKind::Lms => {
            euler_schedule(&train_sigmas, spaced()?, karras)
        }
        SamplerKind::Heun => {
            let (t, s) = euler_schedule(&train_sigmas, spaced()?, karras);
            heun_layout(t, s.unwrap_or_default())
        }
        SamplerKind::Dpm2 => dpm2_schedule(&train_sigmas, spaced()?, karras),
        // With Karras the "leading" timesteps are replaced, never used to index the table.
        SamplerKind::DpmPp2m | SamplerKind::DpmPp2mSde | SamplerKind::UniPc if karras => {
            dpm_solver_karras(&train_sigmas, steps)
        }
        SamplerKind::DpmPp2m | SamplerKind::DpmPp2mSde | SamplerKind::UniPc if trailing => {
            dpm_solver_schedule(&train_sigmas, trailing_spacing(steps)?)
        }
        SamplerKind::DpmPp2m | SamplerKind::DpmPp2mSde | SamplerKind::UniPc => {
            dpm_solver_schedule(&train_sigmas, in_range(dpm_leading(steps))?)
        }
        SamplerKind::Ddim => (to_f32(&spaced()?), None),
        SamplerKind::Lcm => (to_f32(&lcm_timesteps(steps)?), None),
    };
    let init_noise_sigma = match (sampler, &sigmas) {
        // Euler-type: the first latent is a VE sample at sigma_max. diffusers scales the unit noise by
        // sqrt(sigma_max^2 + 1) with "leading" spacing (the std of x0 + sigma_max * eps for unit x0,
        // the UNet input later being divided by that), but by sigma_max itself with "trailing" (and
        // "linspace"): the `init_noise_sigma` of Euler, Euler a, Heun, KDPM2 and LMS alike.
        (
            SamplerKind::Euler
            | SamplerKind::EulerA
            | SamplerKind::Heun
            | SamplerKind::Dpm2
            | SamplerKind::Lms,
            Some(s),
        ) => {
            let max = s.iter().copied().fold(f32::MIN, f32::max);
            if trailing {
                max
            } else {
                (max * max + 1.0).sqrt()
            }
        }
        // DPM-Solver, DDIM and LCM work on the VP-scaled latent: unit variance.
        _ => 1.0,
    };
    Ok(Schedule {
        timesteps,
        sigmas,
        init_noise_sigma,
        sampler,
        alphas_cumprod,
        steps,
        begin: 0,
        skipped_sigmas: Vec::new(),
    })
}

/// `cumprod(1 - linspace(sqrt(0.00085), sqrt(0.012), 1000, float32) ** 2)`, reproducing torch's float32
/// linspace (first half counted up from the start, second half down from the end, each a fused
/// multiply-add as torch's AVX2 build compiles it) and its cumprod (float64 accumulator, each output
/// rounded to float32): bit-identical to the golden `scheduler_tables.json`. Without the fused multiply-add 121
/// of the 1000 values are 1 ulp off.
pub fn alphas_cumprod() -> Vec<f32> {
    let n = TRAIN_STEPS;
    let start = BETA_START.sqrt() as f32;
    let end = BETA_END.sqrt() as f32;
    let step = (end - start) / (n - 1) as f32;
    let mut product = 1.0f64;
    (0..n)
        .map(|i| {
            let root = if i < n / 2 {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            };
            let alpha = 1.0f32 - root * root;
            product *= f64::from(alpha);
            product as f32
        })
        .collect()
}

/// Training sigmas `sqrt((1 - a) / a)`, one per training timestep, computed in float32 as torch does.
fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// "leading" spacing: `arange(steps) * (1000 // steps)`, reversed, plus `steps_offset`.
fn leading(steps: usize) -> Vec<usize> {
    let ratio = TRAIN_STEPS / steps;
    (0..steps).rev().map(|i| i * ratio + STEPS_OFFSET).collect()
}

/// DPMSolverMultistepScheduler's own "leading" variant: `1000 // (steps + 1)` apart, plus `steps_offset`.
fn dpm_leading(steps: usize) -> Vec<usize> {
    let ratio = TRAIN_STEPS / (steps + 1);
    (1..=steps)
        .rev()
        .map(|i| i * ratio + STEPS_OFFSET)
        .collect()
}

/// "trailing" spacing, as every diffusers scheduler that has it computes it: `round(arange(1000, 0,
/// -1000 / steps)) - 1` in float64, so the first timestep is always 999 (numpy's arange: length
/// `ceil(1000 / (1000 / steps))`, element i = `1000 + i * delta` with `delta = (1000 - ratio) - 1000`;
/// `round` is half to even). For some step counts (61, 103, …) float64 rounding makes that arange one
/// element longer, ending at timestep -1 (diffusers then runs an extra step at the wrong sigma): those
/// are refused.
fn trailing_spacing(steps: usize) -> Result<Vec<usize>> {
    let train = TRAIN_STEPS as f64;
    let ratio = train / steps as f64;
    let len = ((0.0 - train) / -ratio).ceil() as usize;
    let delta = (train - ratio) - train;
    let timesteps: Vec<f64> = (0..len)
        .map(|i| match i {
            0 => train,
            1 => train - ratio,
            _ => train + i as f64 * delta,
        })
        .map(|t| t.round_ties_even() - 1.0)
        .collect();
    if len != steps || timesteps.iter().any(|&t| t < 0.0) {
        return Err(Error::BadRequest(format!(
            "steps {steps} does not work with trailing timestep spacing (diffusers' spacing gives {len} timesteps, the last {}); use one more or one less step",
            timesteps[len - 1]
        )));
    }
    Ok(timesteps.into_iter().map(|t| t as usize).collect())
}

/// "leading" spacing breaks down near 1000 steps: with `steps_offset` 1 a timestep lands on 1000, past
/// the training table (diffusers then fails or clamps), or DPM's stride becomes 0 and every timestep is
/// 1. Refuse those step counts instead.
fn in_range(timesteps: Vec<usize>) -> Result<Vec<usize>> {
    let ordered = timesteps.windows(2).all(|w| w[0] > w[1]);
    match timesteps.first() {
        Some(&first) if first >= TRAIN_STEPS || !ordered => Err(Error::BadRequest(format!(
            "steps {} is too many for this sampler's leading timestep spacing over {TRAIN_STEPS} training timesteps",
            timesteps.len()
        ))),
        _ => Ok(timesteps),
    }
}

/// EulerDiscreteScheduler: "leading" timesteps, sigmas read off the training table at them; with Karras
/// the sigmas are re-spaced between the first and last of those and the timesteps interpolated back.
fn euler_schedule(
    train: &[f32],
    timesteps: Vec<usize>,
    karras: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let steps = timesteps.len();
    let picked: Vec<f64> = timesteps.iter().map(|&t| f64::from(train[t])).collect();
    if !karras {
        return (to_f32(&timesteps), Some(with_final_zero(&picked)));
    }
    let sigmas = karras_sigmas(picked[picked.len() - 1], picked[0], steps);
    let log_sigmas = log_sigmas(train);
    let t: Vec<f32> = sigmas
        .iter()
        .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
        .collect();
    (t, Some(with_final_zero(&sigmas)))
}

/// HeunDiscreteScheduler's layout of an Euler schedule: every timestep but the first twice, every
/// sigma but the first and the final 0 twice (the second evaluation of a step reuses its end point).
fn heun_layout(timesteps: Vec<f32>, sigmas: Vec<f32>) -> (Vec<f32>, Option<Vec<f32>>) {
    let n = timesteps.len();
    let t = std::iter::once(timesteps[0])
        .chain(timesteps[1..].iter().flat_map(|&t| [t, t]))
        .collect();
    let s = std::iter::once(sigmas[0])
        .chain(sigmas[1..n].iter().flat_map(|&s| [s, s]))
        .chain(std::iter::once(sigmas[n]))
        .collect();
    (t, Some(s))
}

/// KDPM2DiscreteScheduler: Euler's "leading" timesteps and sigmas (with Karras the timesteps rounded),
/// laid out as `[s0, s1, s1, …, sN, sN, sN]` with sN = 0, and the timesteps `[t0, t'1, t1, …, t'(N-1),
/// t(N-1)]` where t'j is the (fractional) timestep of the log-space midpoint between s(j-1) and sj.
/// diffusers finds t'j from numpy's float32 `log` (a SIMD one, a few ulps from the correctly rounded
/// one), so t'j agrees with it to a few float32 ulps, not bit for bit.
fn dpm2_schedule(
    train: &[f32],
    timesteps: Vec<usize>,
    karras: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let steps = timesteps.len();
    let (timesteps, sigmas): (Vec<f32>, Vec<f32>) = if karras {
        let picked: Vec<f64> = timesteps.iter().map(|&t| f64::from(train[t])).collect();
        let sigmas = karras_sigmas(picked[steps - 1], picked[0], steps);
        let log_sigmas = log_sigmas(train);
        let t = sigmas
            .iter()
            .map(|&s| sigma_to_t(s, &log_sigmas).round_ties_even() as f32)
            .collect();
        (t, with_final_zero(&sigmas))
    } else {
        let picked: Vec<f64> = timesteps.iter().map(|&t| f64::from(train[t])).collect();
        (to_f32(&timesteps), with_final_zero(&picked))
    };
    let log_sigmas = log_sigmas(train);
    let mut t = vec![timesteps[0]];
    for j in 1..steps {
        let mid = dpm2_midpoint(sigmas[j - 1], sigmas[j]);
        t.push(sigma_to_t(f64::from(mid), &log_sigmas) as f32);
        t.push(timesteps[j]);
    }
    let s = std::iter::once(sigmas[0])
        .chain(sigmas[1..].iter().flat_map(|&s| [s, s]))
        .chain(std::iter::once(sigmas[steps]))
        .collect();
    (t, Some(s))
}

/// DPM2's interpolated sigma between `from` and `to`, as diffusers computes it on float32 tensors:
/// `exp(lerp(log(to), log(from), 0.5))`, torch's lerp at weight 0.5 being `end - (end - start) * 0.5`.
/// With `to` = 0 it is 0.
pub(super) fn dpm2_midpoint(from: f32, to: f32) -> f32 {
    let (start, end) = (to.ln(), from.ln());
    (end - (end - start) * 0.5).exp()
}

/// DPMSolverMultistepScheduler: sigmas read off the training table at its "leading" timesteps.
fn dpm_solver_schedule(train: &[f32], timesteps: Vec<usize>) -> (Vec<f32>, Option<Vec<f32>>) {
    let sigmas: Vec<f64> = timesteps.iter().map(|&t| f64::from(train[t])).collect();
    (to_f32(&timesteps), Some(with_final_zero(&sigmas)))
}

/// DPMSolverMultistepScheduler with Karras sigmas: they span the whole training range and the timesteps
/// are their interpolated training timesteps, rounded to integers.
fn dpm_solver_karras(train: &[f32], steps: usize) -> (Vec<f32>, Option<Vec<f32>>) {
    let sigmas = karras_sigmas(
        f64::from(train[0]),
        f64::from(train[TRAIN_STEPS - 1]),
        steps,
    );
    let log_sigmas = log_sigmas(train);
    let timesteps = sigmas
        .iter()
        .map(|&s| sigma_to_t(s, &log_sigmas).round_ties_even() as f32)
        .collect();
    (timesteps, Some(with_final_zero(&sigmas)))
}

/// LCMScheduler: `steps` timesteps picked evenly (by index) from the 50-step distillation schedule
/// 999, 979, …, 19.
fn lcm_timesteps(steps: usize) -> Result<Vec<usize>> {
    if steps > LCM_ORIGINAL_STEPS {
        return Err(Error::BadRequest(format!(
            "lcm takes at most {LCM_ORIGINAL_STEPS} steps (its distillation schedule has {LCM_ORIGINAL_STEPS}), got {steps}"
        )));
    }
    let k = TRAIN_STEPS / LCM_ORIGINAL_STEPS;
    // numpy: floor(linspace(0, 50, steps, endpoint=False)), i.e. floor(i * (50 / steps)) in float64.
    let spacing = LCM_ORIGINAL_STEPS as f64 / steps as f64;
    Ok((0..steps)
        .map(|i| {
            let index = (i as f64 * spacing).floor() as usize;
            (LCM_ORIGINAL_STEPS - index) * k - 1
        })
        .collect())
}

/// Karras et al. (2022) sigmas: evenly spaced in sigma^(1/rho), from `sigma_max` down to `sigma_min`.
fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let min_inv_rho = sigma_min.powf(1.0 / KARRAS_RHO);
    let max_inv_rho = sigma_max.powf(1.0 / KARRAS_RHO);
    // numpy's linspace(0, 1, steps): i * (1 / (steps - 1)), the last element exactly 1, a lone element 0.
    let ramp = |i: usize| {
        if steps == 1 {
            0.0
        } else if i == steps - 1 {
            1.0
        } else {
            i as f64 * (1.0 / (steps - 1) as f64)
        }
    };
    (0..steps)
        .map(|i| (max_inv_rho + ramp(i) * (min_inv_rho - max_inv_rho)).powf(KARRAS_RHO))
        .collect()
}

/// `np.log` of the float32 training sigmas: float32 results.
fn log_sigmas(train: &[f32]) -> Vec<f32> {
    train.iter().map(|s| s.ln()).collect()
}

/// The (fractional) training timestep whose sigma is `sigma`, by linear interpolation in log sigma
/// between the two neighbouring training sigmas (diffusers' `_sigma_to_t`).
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // `cumsum(dists >= 0).argmax()`: the first index where the running count of training sigmas at or
    // below `sigma` reaches its maximum, i.e. the last such index (0 if there is none).
    let mut count = 0usize;
    let mut best = 0usize;
    let mut low = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - f64::from(ls) >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            low = i;
        }
    }
    let low = low.min(log_sigmas.len() - 2);
    let high = low + 1;
    let (l, h) = (log_sigmas[low], log_sigmas[high]);
    // `low - high` is float32 minus float32 in numpy; the rest is float64.
    let w = ((f64::from(l) - log_sigma) / f64::from(l - h)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

fn with_final_zero(sigmas: &[f64]) -> Vec<f32> {
    sigmas
        .iter()
        .map(|&s| s as f32)
        .chain(std::iter::once(0.0))
        .collect()
}

fn to_f32(timesteps: &[usize]) -> Vec<f32> {
    timesteps.iter().map(|&t| t as f32).collect()
}
