//! Winograd's transform algebra: the 8-lane value type the transforms run on (plain arrays, same
//! bits with or without SIMD) and the F(2,3) and F(4,3) filter, input and output transforms.

/// Values the transforms process together: 8 tiles (or 8 input channels' filters) side by side,
/// one AVX2 register of f32. Plain arrays, so the same code runs with or without SIMD and gives the same
/// bits either way (elementwise IEEE adds and multiplies; no fused multiply-add).
pub(super) const LANES: usize = 8;

#[derive(Clone, Copy, Default)]
pub(super) struct Lanes(pub(super) [f32; LANES]);

impl Lanes {
    pub(super) const ZERO: Lanes = Lanes([0.0; LANES]);

    #[inline(always)]
    pub(super) fn load(src: &[f32]) -> Lanes {
        Lanes(src[..LANES].try_into().unwrap())
    }

    #[inline(always)]
    pub(super) fn store(self, dst: &mut [f32]) {
        dst[..LANES].copy_from_slice(&self.0);
    }

    /// The first `n` ≤ LANES values of `src`, zero after.
    #[inline(always)]
    pub(super) fn load_first(n: usize, src: &[f32]) -> Lanes {
        if n == LANES {
            return Lanes::load(src);
        }
        let mut lanes = Lanes::ZERO;
        lanes.0[..n].copy_from_slice(&src[..n]);
        lanes
    }

    /// Stores the first `n` ≤ LANES values.
    #[inline(always)]
    pub(super) fn store_first(self, n: usize, dst: &mut [f32]) {
        if n == LANES {
            return self.store(dst);
        }
        for (d, &v) in dst[..n].iter_mut().zip(&self.0) {
            *d = v;
        }
    }
}

macro_rules! lanewise {
    ($trait:ident, $method:ident, $assign:tt) => {
        impl std::ops::$trait for Lanes {
            type Output = Lanes;
            #[inline(always)]
            fn $method(self, rhs: Lanes) -> Lanes {
                let mut out = self.0;
                for (o, r) in out.iter_mut().zip(rhs.0) {
                    *o $assign r;
                }
                Lanes(out)
            }
        }
        impl std::ops::$trait<f32> for Lanes {
            type Output = Lanes;
            #[inline(always)]
            fn $method(self, rhs: f32) -> Lanes {
                let mut out = self.0;
                for o in out.iter_mut() {
                    *o $assign rhs;
                }
                Lanes(out)
            }
        }
    };
}
lanewise!(Add, add, +=);
lanewise!(Sub, sub, -=);
lanewise!(Mul, mul, *=);
lanewise!(Div, div, /=);

/// `[f(0), f(1), …]` (std's `array::from_fn` is not always inlined, and these run per lane group).
#[inline(always)]
pub(super) fn array<T: Copy + Default, const N: usize>(f: impl Fn(usize) -> T) -> [T; N] {
    let mut out = [T::default(); N];
    for (i, v) in out.iter_mut().enumerate() {
        *v = f(i);
    }
    out
}

/// What the transforms compute on: one f32 or `Lanes` of them.
pub(super) trait Value:
    Copy
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<f32, Output = Self>
    + std::ops::Div<f32, Output = Self>
{
}
impl Value for f32 {}
impl Value for Lanes {}

/// The three 1-D transforms of one F(M, 3), α = A = M + 2; the 2-D ones apply them along columns,
/// then along rows.
pub(super) trait Transforms<const M: usize, const A: usize> {
    /// G g: 3 filter taps → α.
    fn filter<T: Value>(g: [T; 3]) -> [T; A];
    /// Bᵀ d: α input values → α.
    fn input<T: Value>(d: [T; A]) -> [T; A];
    /// Aᵀ m: α products → M outputs.
    fn output<T: Value>(m: [T; A]) -> [T; M];
}

/// F(2,3) with interpolation points 0, 1, −1, ∞.
pub(super) struct F2;

impl Transforms<2, 4> for F2 {
    #[inline(always)]
    fn filter<T: Value>([g0, g1, g2]: [T; 3]) -> [T; 4] {
        [g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2]
    }
    #[inline(always)]
    fn input<T: Value>([d0, d1, d2, d3]: [T; 4]) -> [T; 4] {
        [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
    }
    #[inline(always)]
    fn output<T: Value>([m0, m1, m2, m3]: [T; 4]) -> [T; 2] {
        [m0 + m1 + m2, m1 - m2 - m3]
    }
}

/// F(4,3) with interpolation points 0, 1, −1, 2, −2, ∞.
pub(super) struct F4;

impl Transforms<4, 6> for F4 {
    #[inline(always)]
    fn filter<T: Value>([g0, g1, g2]: [T; 3]) -> [T; 6] {
        let (a, b) = (g0 * 0.25 + g2, g1 * 0.5);
        [
            g0 * 0.25,
            (g0 + g1 + g2) / -6.0,
            (g0 - g1 + g2) / -6.0,
            (a + b) / 6.0,
            (a - b) / 6.0,
            g2,
        ]
    }
    #[inline(always)]
    fn input<T: Value>([d0, d1, d2, d3, d4, d5]: [T; 6]) -> [T; 6] {
        let (a, b) = (d4 - d2 * 4.0, d3 - d1 * 4.0);
        let (c, e) = (d4 - d2, (d3 - d1) * 2.0);
        [
            d0 * 4.0 - d2 * 5.0 + d4,
            a + b,
            a - b,
            c + e,
            c - e,
            d1 * 4.0 - d3 * 5.0 + d5,
        ]
    }
    #[inline(always)]
    fn output<T: Value>([m0, m1, m2, m3, m4, m5]: [T; 6]) -> [T; 4] {
        let (s1, d1, s2, d2) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        [
            m0 + s1 + s2,
            d1 + d2 * 2.0,
            s1 + s2 * 4.0,
            d1 + d2 * 8.0 + m5,
        ]
    }
}
