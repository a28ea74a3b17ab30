//! PyTorch's CPU random generator, reproduced bit for bit.
//!
//! [`TorchRng`] is `torch.Generator('cpu').manual_seed(seed)`: the MT19937 engine of
//! `aten/src/ATen/core/MT19937RNGEngine.h` plus the cached normal value of `CPUGeneratorImpl`.
//! [`TorchRng::randn`] is `torch.randn(shape, generator=g, dtype=torch.float32)` on a contiguous
//! tensor as x86-64 torch computes it, which is what diffusers and ComfyUI users get as CPU noise:
//!
//! * numel >= 16: the vectorised "fill" path, `normal_fill_AVX2` / `normal_fill_16_AVX2` of
//!   `aten/src/ATen/native/cpu/DistributionKernels.cpp` (torch picks it on AVX2 and on AVX-512
//!   machines alike), with the Cephes `log256_ps` / `sincos256_ps` of `avx_mathfun.h`. It is written
//!   here as portable scalar code with `f32::mul_add` wherever the compiled AVX2 kernel fuses a
//!   multiply into an add, so it gives the AVX2 bits on every platform. It is NOT torch's portable
//!   `DEFAULT` kernel (C-library `logf`/`sinf`/`cosf`, what non-x86 builds such as aarch64 use),
//!   which differs from the AVX2 one by up to about 2e-6 in roughly a third of the values.
//! * numel < 16: element by element with `at::normal_distribution<double>` (double Box-Muller
//!   that caches its second value in the generator across calls; the fill path neither reads nor
//!   clears that cache). Both torch kernels share it. It uses the platform libm's double
//!   `log1p`/`sin`/`cos`, as torch does, so a libm other than glibc could in principle move a value
//!   by one float32 ulp.
//!
//! The facts (and golden tensors) are in `tests/data/rng/README.md`.

const STATE_WORDS: usize = 624;
const SHIFT_WORDS: usize = 397;
const MATRIX_A: u32 = 0x9908_B0DF;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7FFF_FFFF;

/// The fill path transforms chunks of this many values: 8 radii then 8 angles.
const FILL_CHUNK: usize = 16;
const HALF_CHUNK: usize = FILL_CHUNK / 2;
/// 2 pi rounded to float32, as `normal_fill_AVX2` broadcasts it.
const TWO_PI_F32: f32 = 6.283_185_5;

/// `torch.Generator('cpu')`: MT19937 state and the cached normal value of the double Box-Muller.
#[derive(Clone)]
pub struct TorchRng {
    state: [u32; STATE_WORDS],
    /// Index of the next state word to temper.
    next: usize,
    /// Outputs left before the state is regenerated (torch's `left_`, starts at 1).
    left: usize,
    /// Second value of the last double Box-Muller pair, returned by the next small draw.
    cached_normal: Option<f64>,
}

impl TorchRng {
    /// `manual_seed(seed)`: only the low 32 bits seed the engine (torch accepts 0..2^64-1 but
    /// truncates), and the cached normal value is cleared.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; STATE_WORDS];
        state[0] = seed as u32;
        for i in 1..STATE_WORDS {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self {
            state,
            next: 0,
            left: 1,
            cached_normal: None,
        }
    }

    /// One raw 32-bit output of the engine (torch's `random()`), same stream as C++ `std::mt19937`.
    pub fn next_u32(&mut self) -> u32 {
        self.left -= 1;
        if self.left == 0 {
            self.regenerate();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9D2C_5680;
        y ^= (y << 15) & 0xEFC6_0000;
        y ^ (y >> 18)
    }

    /// `torch.rand(1)` in float32: the low 24 bits of one output, times 2^-24, in [0, 1).
    pub fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00FF_FFFF) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// `torch.rand(1, dtype=float64)`: the low 53 bits of `(first << 32) | second`, times 2^-53.
    pub fn uniform_f64(&mut self) -> f64 {
        let hi = u64::from(self.next_u32());
        let lo = u64::from(self.next_u32());
        (((hi << 32) | lo) & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `torch.randn(shape, generator=self, dtype=torch.float32)`, C order, AVX2-kernel bits.
    pub fn randn(&mut self, shape: &[usize]) -> Vec<f32> {
        let numel: usize = shape.iter().product();
        if numel >= FILL_CHUNK {
            self.normal_fill(numel)
        } else {
            (0..numel).map(|_| self.normal_f64() as f32).collect()
        }
    }

    /// The in-place MT19937 regeneration of all 624 words.
    fn regenerate(&mut self) {
        let s = &mut self.state;
        for i in 0..STATE_WORDS {
            let y = (s[i] & UPPER_MASK) | (s[(i + 1) % STATE_WORDS] & LOWER_MASK);
            let mag = if y & 1 == 0 { 0 } else { MATRIX_A };
            s[i] = s[(i + SHIFT_WORDS) % STATE_WORDS] ^ (y >> 1) ^ mag;
        }
        self.left = STATE_WORDS;
        self.next = 0;
    }

    /// `at::normal_distribution<double>(0, 1)`: one value of a Box-Muller pair, the other cached.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.cached_normal.take() {
            // `ret * std + mean` in torch: turns -0 into +0.
            return cached + 0.0;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(radius * theta.sin());
        radius * theta.cos() + 0.0
    }

    /// `normal_fill_AVX2`: uniforms for the whole tensor, Box-Muller on each full chunk of 16, and
    /// when numel is not a multiple of 16, 16 fresh uniforms for the last 16 positions.
    fn normal_fill(&mut self, numel: usize) -> Vec<f32> {
        let mut data: Vec<f32> = (0..numel).map(|_| self.uniform_f32()).collect();
        for chunk in data.chunks_exact_mut(FILL_CHUNK) {
            box_muller_16(chunk);
        }
        if !numel.is_multiple_of(FILL_CHUNK) {
            let tail = &mut data[numel - FILL_CHUNK..];
            for value in tail.iter_mut() {
                *value = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }
}

/// `normal_fill_16_AVX2`: the first 8 uniforms give radii, the last 8 angles; cosines stay in
/// the first half and sines go to the second.
fn box_muller_16(chunk: &mut [f32]) {
    let (radii, angles) = chunk.split_at_mut(HALF_CHUNK);
    for (a, b) in radii.iter_mut().zip(angles.iter_mut()) {
        let u1 = 1.0 - *a;
        let radius = (-2.0f32 * log_cephes(u1)).sqrt();
        let theta = TWO_PI_F32 * *b;
        let (sin, cos) = sincos_cephes(theta);
        // `fmadd(n, std, mean)` with std 1 and mean 0: only turns -0 into +0.
        *a = radius * cos + 0.0;
        *b = radius * sin + 0.0;
    }
}

/// `log256_ps` of `avx_mathfun.h` (Cephes `logf`) for one positive lane, with the FMA
/// contractions of the compiled AVX2 kernel.
// Constants are spelled as in `avx_mathfun.h` so they can be checked against it.
#[allow(clippy::excessive_precision)]
fn log_cephes(x: f32) -> f32 {
    // `cephes_SQRTHF` 0.707106781186547524 rounds to this.
    const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const P: [f32; 9] = [
        7.0376836292e-2,
        -1.1514610310e-1,
        1.1676998740e-1,
        -1.2420140846e-1,
        1.4249322787e-1,
        -1.6668057665e-1,
        2.0000714765e-1,
        -2.4999993993e-1,
        3.3333331174e-1,
    ];
    const Q1: f32 = -2.12194440e-4;
    const Q2: f32 = 0.693359375;

    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 127) as f32 + 1.0;
    let m = f32::from_bits((bits & !0x7F80_0000) | 0.5f32.to_bits());
    let x = if m < SQRT_HALF {
        e -= 1.0;
        (m - 1.0) + m
    } else {
        m - 1.0
    };
    let z = x * x;
    let mut y = P[0];
    for &p in &P[1..] {
        y = y.mul_add(x, p);
    }
    y = (y * x).mul_add(z, e * Q1);
    y -= 0.5 * z;
    e.mul_add(Q2, x + y)
}

/// `sincos256_ps` of `avx_mathfun.h` (Cephes `sincosf`) for one lane, returning (sin, cos), with
/// the FMA contractions of the compiled AVX2 kernel.
#[allow(clippy::excessive_precision)]
fn sincos_cephes(x: f32) -> (f32, f32) {
    const FOUR_OVER_PI: f32 = 1.27323954473516;
    const DP1: f32 = -0.78515625;
    const DP2: f32 = -2.4187564849853515625e-4;
    const DP3: f32 = -3.77489497744594108e-8;
    const COS_P: [f32; 3] = [
        2.443315711809948e-5,
        -1.388731625493765e-3,
        4.166664568298827e-2,
    ];
    const SIN_P: [f32; 3] = [-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1];

    let sin_negative_input = x.is_sign_negative();
    let mut x = x.abs();
    // Octant, rounded up to even: cvttps (truncation), +1, &~1.
    let j = (((x * FOUR_OVER_PI) as i32) + 1) & !1;
    let jf = j as f32;
    x = jf.mul_add(DP1, x);
    x = jf.mul_add(DP2, x);
    x = jf.mul_add(DP3, x);
    let z = x * x;

    let mut yc = COS_P[0].mul_add(z, COS_P[1]).mul_add(z, COS_P[2]);
    yc = (yc * z).mul_add(z, -(0.5 * z)) + 1.0;
    let mut ys = SIN_P[0].mul_add(z, SIN_P[1]).mul_add(z, SIN_P[2]);
    ys = (ys * z).mul_add(x, x);

    let (mut sin, mut cos) = if j & 2 == 0 { (ys, yc) } else { (yc, ys) };
    if ((j & 4) != 0) != sin_negative_input {
        sin = -sin;
    }
    if (j - 2) & 4 == 0 {
        cos = -cos;
    }
    (sin, cos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_uniforms_give_positive_zero() {
        // u1 = 1 - 0 gives log 0, so radius = sqrt(-0) = -0; torch's fmadd(n, 1, 0) yields +0.
        let mut chunk = [0.0f32; FILL_CHUNK];
        box_muller_16(&mut chunk);
        for value in chunk {
            assert_eq!(value.to_bits(), 0.0f32.to_bits());
        }
    }

    #[test]
    fn cephes_log_and_sincos_are_close_to_libm() {
        for i in 1..=1000 {
            let x = i as f32 / 1000.0;
            assert!((log_cephes(x) - x.ln()).abs() <= 2e-7 * x.ln().abs().max(1.0));
            let theta = TWO_PI_F32 * x;
            let (sin, cos) = sincos_cephes(theta);
            assert!((sin - theta.sin()).abs() < 1e-6, "sin {theta}");
            assert!((cos - theta.cos()).abs() < 1e-6, "cos {theta}");
        }
    }
}
