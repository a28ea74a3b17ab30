//! Multi-head scaled dot-product attention, exact, as a flash-style kernel: no score matrix.
//!
//! One task is one (batch item, head, query chunk). It walks the keys in chunks with an online
//! softmax (a running maximum and sum per query, the accumulated output rescaled when the maximum
//! grows), so its scratch is a few tiles, not `query_chunk × kv_len` scores.
//!
//! Inside a task the queries go in tiles of 16, held transposed ([head width][16 queries]) so that
//! every SIMD lane is one query: QKᵀ broadcasts key values against query vectors, the softmax
//! reduces over keys lane by lane, and P·V broadcasts value entries against probability vectors.
//! Keys and values are read in place from their [batch, tokens, channels] rows (no per-head copies).
//!
//! Determinism: every query is computed by the same operations in the same order whichever tile,
//! chunk or thread it lands in (lanes do not interact; reductions run over keys in a fixed order),
//! and the key chunks depend only on the shape. So the output bits depend neither on the thread
//! count nor on the query chunk a plan chooses.

use rayon::prelude::*;

/// Queries per tile: one 16-lane `Tile` (two AVX2 vectors, one AVX-512 vector).
const QUERY_TILE: usize = 16;
/// Keys per QKᵀ micro-tile and value columns per P·V micro-tile: 6 × 2 accumulators + 2 loads +
/// 1 broadcast fit AVX2's 16 registers (AVX-512 needs half as many).
const KEY_TILE: usize = 6;
const VALUE_TILE: usize = 6;
/// Keys per online-softmax step (fixed by the shape alone) × head width: the chunk's keys and
/// values (16 KiB each) stay in L1/L2 while every query tile of the task passes over them. 1024 to
/// 32768 measured within ~5% of each other on SD1.5 shapes.
const KV_CHUNK_VALUES: usize = 4096;

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    /// heads · head width
    pub channels: usize,
    pub heads: usize,
    /// Mask keys after the query position (CLIP's text encoder).
    pub causal: bool,
}

impl AttentionShape {
    fn head_width(&self) -> usize {
        self.channels / self.heads
    }

    /// Keys per online-softmax step: a function of the shape only, never of the plan.
    fn kv_chunk(&self) -> usize {
        let tiles = KV_CHUNK_VALUES / self.head_width().max(1) / KEY_TILE;
        (tiles.max(3) * KEY_TILE).min(self.kv_len.max(1))
    }
}

/// `q` [batch, q_len, channels], `k`/`v` [batch, kv_len, channels] → [batch, q_len, channels],
/// with the query chunk of `scratch` (`kernels::scratch`).
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
    scratch: &super::scratch::Scratch,
) -> Vec<f32> {
    attention_chunked(q, k, v, s, scratch.attention_query_chunk)
}

/// As `attention`, with `query_chunk` queries per task (any value ≥ 1 gives the same bits; it
/// sets the scratch, `attention_scratch_bytes`, and the number of parallel tasks).
pub fn attention_chunked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
    query_chunk: usize,
) -> Vec<f32> {
    attention_with(q, k, v, s, query_chunk, Isa::detect())
}

/// Bytes of scratch `attention_chunked` holds at once beyond its inputs and its output: per
/// thread, the transposed query and output tiles of one query chunk, the running maxima and sums,
/// and one tile's probabilities for a key chunk.
pub fn attention_scratch_bytes(s: AttentionShape, query_chunk: usize, threads: usize) -> u64 {
    let per_thread = Scratch::values(s, query_chunk) as u64 * 4;
    per_thread.saturating_mul(threads.max(1) as u64)
}

/// Which lane implementation runs the kernel. All three give the same bits (each lane runs the
/// same operations in the same order; the tests compare them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Isa {
    /// The kernels' instruction set (`precision::Isa::selected`, so `SDCAP_KERNELS` forces it).
    fn detect() -> Isa {
        use super::precision::Isa as Level;
        match Level::selected() {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 | Level::Amx => Isa::Avx512,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => Isa::Avx2,
            _ => Isa::Portable,
        }
    }
}

fn attention_with(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
    query_chunk: usize,
    isa: Isa,
) -> Vec<f32> {
    let (b, lq, lk, c, heads) = (s.batch, s.q_len, s.kv_len, s.channels, s.heads);
    assert!(heads > 0 && c % heads == 0, "channels divide into heads");
    assert_eq!(q.len(), b * lq * c);
    assert_eq!(k.len(), b * lk * c);
    assert_eq!(v.len(), b * lk * c);
    let mut out = vec![0.0f32; b * lq * c];
    if lk == 0 || lq == 0 || c == 0 {
        return out;
    }
    let query_chunk = query_chunk.clamp(1, lq);
    let chunks = lq.div_ceil(query_chunk);
    let dst = OutPtr(out.as_mut_ptr());
    (0..b * heads * chunks).into_par_iter().for_each_init(
        || Scratch::new(s, query_chunk),
        |scratch, i| {
            let task = Task {
                batch: i / (heads * chunks),
                head: i / chunks % heads,
                q0: i % chunks * query_chunk,
                rows: query_chunk.min(lq - i % chunks * query_chunk),
            };
            let io = Io { q, k, v, dst };
            match isa {
                // SAFETY: `Isa::Avx512`/`Isa::Avx2` are only chosen when the CPU runs them
                // (`precision::Isa::selected`).
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { run_task_avx512(io, s, task, scratch) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { run_task_avx2(io, s, task, scratch) },
                Isa::Portable => run_task::<Portable>(io, s, task, scratch),
            }
        },
    );
    out
}

/// The output, shared by tasks that write disjoint (rows × head columns) blocks of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (see `run_task`), and `attention_with` keeps the buffer
// alive and otherwise untouched until every task has finished.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

#[derive(Clone, Copy)]
struct Io<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    dst: OutPtr,
}

#[derive(Clone, Copy, Debug)]
struct Task {
    batch: usize,
    head: usize,
    q0: usize,
    rows: usize,
}

/// One task's working memory, reused across the tasks a thread runs.
struct Scratch {
    /// Scaled queries, per tile [head width][16].
    queries: Vec<f32>,
    /// Unnormalised outputs, per tile [head width][16].
    outputs: Vec<f32>,
    /// Running maximum and sum of exponentials per query.
    max: Vec<f32>,
    sum: Vec<f32>,
    /// One tile's scores, then probabilities, for one key chunk: [kv_chunk][16].
    probs: Vec<f32>,
}

impl Scratch {
    fn tiles(s: AttentionShape, query_chunk: usize) -> usize {
        query_chunk.clamp(1, s.q_len.max(1)).div_ceil(QUERY_TILE)
    }

    fn values(s: AttentionShape, query_chunk: usize) -> usize {
        let tile_values = Self::tiles(s, query_chunk) * QUERY_TILE;
        tile_values * (2 * s.head_width() + 2) + s.kv_chunk() * QUERY_TILE
    }

    fn new(s: AttentionShape, query_chunk: usize) -> Scratch {
        let tile_values = Self::tiles(s, query_chunk) * QUERY_TILE;
        Scratch {
            queries: vec![0.0; tile_values * s.head_width()],
            outputs: vec![0.0; tile_values * s.head_width()],
            max: vec![0.0; tile_values],
            sum: vec![0.0; tile_values],
            probs: vec![0.0; s.kv_chunk() * QUERY_TILE],
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn run_task_avx2(io: Io, s: AttentionShape, task: Task, scratch: &mut Scratch) {
    run_task::<Avx2>(io, s, task, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn run_task_avx512(io: Io, s: AttentionShape, task: Task, scratch: &mut Scratch) {
    run_task::<Avx512>(io, s, task, scratch)
}

/// Computes `task.rows` queries of one head and writes them into the output.
#[inline(always)]
fn run_task<T: Tile>(io: Io, s: AttentionShape, task: Task, scratch: &mut Scratch) {
    let (lq, lk, c, d) = (s.q_len, s.kv_len, s.channels, s.head_width());
    let head = task.head * d;
    let tiles = task.rows.div_ceil(QUERY_TILE);
    // Scores come out in base 2: q · k · scale · log2(e), so the softmax takes exp2 directly.
    let q_scale = std::f32::consts::LOG2_E / (d as f32).sqrt();
    let tile_len = d * QUERY_TILE;
    for t in 0..tiles {
        let qt = &mut scratch.queries[t * tile_len..(t + 1) * tile_len];
        for lane in 0..QUERY_TILE {
            let r = t * QUERY_TILE + lane;
            if r < task.rows {
                let row = (task.batch * lq + task.q0 + r) * c + head;
                for (e, &x) in io.q[row..row + d].iter().enumerate() {
                    qt[e * QUERY_TILE + lane] = x * q_scale;
                }
            } else {
                for e in 0..d {
                    qt[e * QUERY_TILE + lane] = 0.0;
                }
            }
        }
    }
    let lanes = tiles * QUERY_TILE;
    scratch.outputs[..tiles * tile_len].fill(0.0);
    scratch.max[..lanes].fill(f32::NEG_INFINITY);
    scratch.sum[..lanes].fill(0.0);

    let kv_chunk = s.kv_chunk();
    let kv_base = task.batch * lk * c + head;
    for j0 in (0..lk).step_by(kv_chunk) {
        let keys = kv_chunk.min(lk - j0);
        // Rows j0.. of this head's keys and values, `c` apart.
        let k_rows = &io.k[kv_base + j0 * c..];
        let v_rows = &io.v[kv_base + j0 * c..];
        for t in 0..tiles {
            let probs = &mut scratch.probs[..keys * QUERY_TILE];
            let qt = &scratch.queries[t * tile_len..(t + 1) * tile_len];
            let lane_range = t * QUERY_TILE..(t + 1) * QUERY_TILE;
            let max = &mut scratch.max[lane_range.clone()];
            let mut new_max = T::load_slice(max);
            if s.causal {
                scores::<T>(qt, k_rows, c, d, keys, probs, &mut T::splat(0.0));
                mask_future(probs, j0, task.q0 + t * QUERY_TILE);
                for row in probs.chunks_exact(QUERY_TILE) {
                    new_max = new_max.max(T::load_slice(row));
                }
            } else {
                scores::<T>(qt, k_rows, c, d, keys, probs, &mut new_max);
            }
            let alpha = softmax_step::<T>(probs, max, new_max, &mut scratch.sum[lane_range]);
            let ot = &mut scratch.outputs[t * tile_len..(t + 1) * tile_len];
            accumulate_values::<T>(probs, v_rows, c, d, keys, alpha, ot);
        }
    }

    for t in 0..tiles {
        let ot = &scratch.outputs[t * tile_len..(t + 1) * tile_len];
        for lane in 0..QUERY_TILE {
            let r = t * QUERY_TILE + lane;
            if r >= task.rows {
                break;
            }
            let inv = 1.0 / scratch.sum[t * QUERY_TILE + lane];
            let row = (task.batch * lq + task.q0 + r) * c + head;
            for e in 0..d {
                // SAFETY: `row + e` < b·lq·c (row index < b·lq, head + e < c); this task is the
                // only one writing query rows q0..q0+rows of this batch item in this head's columns.
                unsafe { *io.dst.0.add(row + e) = ot[e * QUERY_TILE + lane] * inv };
            }
        }
    }
}

/// `probs[j][lane] = Σ_e k[j][e] · qt[e][lane]` for the first `keys` key rows (`c` apart), and
/// raises `max` to cover them.
#[inline(always)]
fn scores<T: Tile>(
    qt: &[f32],
    k_rows: &[f32],
    c: usize,
    d: usize,
    keys: usize,
    probs: &mut [f32],
    max: &mut T,
) {
    let mut j = 0;
    while j + KEY_TILE <= keys {
        score_tile::<T, KEY_TILE>(qt, k_rows, c, d, j, probs, max);
        j += KEY_TILE;
    }
    match keys - j {
        0 => {}
        1 => score_tile::<T, 1>(qt, k_rows, c, d, j, probs, max),
        2 => score_tile::<T, 2>(qt, k_rows, c, d, j, probs, max),
        3 => score_tile::<T, 3>(qt, k_rows, c, d, j, probs, max),
        4 => score_tile::<T, 4>(qt, k_rows, c, d, j, probs, max),
        _ => score_tile::<T, 5>(qt, k_rows, c, d, j, probs, max),
    }
}

/// Keys `j..j + J`: J × 2 accumulators over the head width.
#[inline(always)]
fn score_tile<T: Tile, const J: usize>(
    qt: &[f32],
    k_rows: &[f32],
    c: usize,
    d: usize,
    j: usize,
    probs: &mut [f32],
    max: &mut T,
) {
    assert!(qt.len() >= d * QUERY_TILE && k_rows.len() >= (j + J - 1) * c + d);
    let mut acc = [T::splat(0.0); J];
    let (qp, kp) = (qt.as_ptr(), k_rows.as_ptr());
    // SAFETY: the loads stay in qt (d × 16 values) and in the rows j..j+J of k_rows (d values
    // each, `c` apart), as just asserted.
    unsafe {
        let rows: [*const f32; J] = std::array::from_fn(|i| kp.add((j + i) * c));
        for e in 0..d {
            let q = T::load(qp.add(e * QUERY_TILE));
            for (a, row) in acc.iter_mut().zip(&rows) {
                *a = T::splat(*row.add(e)).mul_add(q, *a);
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        a.store(&mut probs[(j + i) * QUERY_TILE..(j + i + 1) * QUERY_TILE]);
        *max = max.max(*a);
    }
}

/// Sets the score of key `j0 + j` to −∞ for every lane (query `first + lane`) it comes after.
fn mask_future(probs: &mut [f32], j0: usize, first: usize) {
    for (j, row) in probs.chunks_exact_mut(QUERY_TILE).enumerate() {
        for (lane, p) in row.iter_mut().enumerate() {
            if j0 + j > first + lane {
                *p = f32::NEG_INFINITY;
            }
        }
    }
}

/// One online-softmax step for a tile: `new` is the running maximum raised to cover the chunk's
/// scores; turns the scores into exp2(score − new) in place, updates the running sums and maxima,
/// and returns the factor the accumulated outputs must be rescaled by.
#[inline(always)]
fn softmax_step<T: Tile>(probs: &mut [f32], max: &mut [f32], new: T, sum: &mut [f32]) -> T {
    let old = T::load_slice(max);
    // The first key chunk always has a visible key (causal masking hides only later keys), so
    // `new` is finite and old − new is −∞ (→ 0) or ≤ 0.
    let alpha = old.sub(new).exp2();
    let mut total = T::splat(0.0);
    for row in probs.chunks_exact_mut(QUERY_TILE) {
        let p = T::load_slice(row).sub(new).exp2();
        p.store(row);
        total = total.add(p);
    }
    T::load_slice(sum).mul_add(alpha, total).store(sum);
    new.store(max);
    alpha
}

/// `ot[e][lane] = alpha · ot[e][lane] + Σ_j probs[j][lane] · v[j][e]` over the first `keys` value
/// rows (`c` apart).
#[inline(always)]
fn accumulate_values<T: Tile>(
    probs: &[f32],
    v_rows: &[f32],
    c: usize,
    d: usize,
    keys: usize,
    alpha: T,
    ot: &mut [f32],
) {
    let mut e = 0;
    while e + VALUE_TILE <= d {
        value_tile::<T, VALUE_TILE>(probs, v_rows, c, keys, e, alpha, ot);
        e += VALUE_TILE;
    }
    match d - e {
        0 => {}
        1 => value_tile::<T, 1>(probs, v_rows, c, keys, e, alpha, ot),
        2 => value_tile::<T, 2>(probs, v_rows, c, keys, e, alpha, ot),
        3 => value_tile::<T, 3>(probs, v_rows, c, keys, e, alpha, ot),
        4 => value_tile::<T, 4>(probs, v_rows, c, keys, e, alpha, ot),
        _ => value_tile::<T, 5>(probs, v_rows, c, keys, e, alpha, ot),
    }
}

/// Value columns `e..e + E`: E × 2 accumulators over the chunk's keys.
#[inline(always)]
fn value_tile<T: Tile, const E: usize>(
    probs: &[f32],
    v_rows: &[f32],
    c: usize,
    keys: usize,
    e: usize,
    alpha: T,
    ot: &mut [f32],
) {
    let mut acc = [T::splat(0.0); E];
    for (i, a) in acc.iter_mut().enumerate() {
        *a = T::load_slice(&ot[(e + i) * QUERY_TILE..]).mul(alpha);
    }
    assert!(probs.len() >= keys * QUERY_TILE);
    assert!(keys == 0 || v_rows.len() >= (keys - 1) * c + e + E);
    let (pp, vp) = (probs.as_ptr(), v_rows.as_ptr());
    // SAFETY: the loads stay in probs (keys × 16 values) and in columns e..e+E of the rows
    // 0..keys of v_rows (`c` apart), as just asserted.
    unsafe {
        let mut row = vp.add(e);
        for j in 0..keys {
            let p = T::load(pp.add(j * QUERY_TILE));
            for (i, a) in acc.iter_mut().enumerate() {
                *a = T::splat(*row.add(i)).mul_add(p, *a);
            }
            row = row.wrapping_add(c);
        }
    }
    for (i, a) in acc.iter().enumerate() {
        a.store(&mut ot[(e + i) * QUERY_TILE..(e + i + 1) * QUERY_TILE]);
    }
}

/// Sixteen f32 lanes, one query tile. Every method is `#[inline(always)]` so that inside
/// `run_task_avx2`/`run_task_avx512` the intrinsics compile with the features those enable.
trait Tile: Copy {
    fn splat(x: f32) -> Self;
    /// # Safety
    /// `p` points to 16 readable f32.
    unsafe fn load(p: *const f32) -> Self;
    fn load_slice(x: &[f32]) -> Self {
        assert!(x.len() >= QUERY_TILE);
        // SAFETY: just checked.
        unsafe { Self::load(x.as_ptr()) }
    }
    fn store(self, x: &mut [f32]);
    /// self · b + c
    fn mul_add(self, b: Self, c: Self) -> Self;
    fn add(self, b: Self) -> Self;
    fn sub(self, b: Self) -> Self;
    fn mul(self, b: Self) -> Self;
    fn max(self, b: Self) -> Self;
    /// 2^x within 2 ulp for −127 < x ≤ 0 (the only arguments the kernel passes), exactly 0 at or
    /// below −127 (so masked keys and an initial −∞ maximum contribute nothing).
    fn exp2(self) -> Self;
}

/// 2^r − 1 = r · P(r) for r in [−0.5, 0.5] (Cephes `exp2f`), highest power first.
const EXP2_POLY: [f32; 6] = [
    1.535_336_2e-4,
    1.339_887_4e-3,
    9.618_437e-3,
    5.550_332_5e-2,
    2.402_264_8e-1,
    6.931_472e-1,
];

/// 1.5·2^23: adding and removing it rounds |x| < 2^22 to an integer (the current rounding mode,
/// nearest), which is then the low bits of the sum's mantissa.
const ROUND: f32 = 12_582_912.0;

/// Plain arrays: the scalar fallback (the compiler may still vectorise it) that tests compare the
/// SIMD path against.
#[derive(Clone, Copy)]
struct Portable([f32; QUERY_TILE]);

impl Portable {
    #[inline(always)]
    fn map(self, f: impl Fn(f32) -> f32) -> Self {
        Portable(self.0.map(f))
    }

    #[inline(always)]
    fn zip(self, b: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        Portable(std::array::from_fn(|i| f(self.0[i], b.0[i])))
    }
}

impl Tile for Portable {
    #[inline(always)]
    fn splat(x: f32) -> Self {
        Portable([x; QUERY_TILE])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Portable(std::ptr::read_unaligned(p as *const [f32; QUERY_TILE]))
    }
    #[inline(always)]
    fn store(self, x: &mut [f32]) {
        x[..QUERY_TILE].copy_from_slice(&self.0);
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] * b.0[i] + c.0[i]))
    }
    #[inline(always)]
    fn add(self, b: Self) -> Self {
        self.zip(b, |x, y| x + y)
    }
    #[inline(always)]
    fn sub(self, b: Self) -> Self {
        self.zip(b, |x, y| x - y)
    }
    #[inline(always)]
    fn mul(self, b: Self) -> Self {
        self.zip(b, |x, y| x * y)
    }
    #[inline(always)]
    fn max(self, b: Self) -> Self {
        self.zip(b, f32::max)
    }
    #[inline(always)]
    fn exp2(self) -> Self {
        self.map(|x| {
            let x = x.max(-127.0);
            let shifted = x + ROUND;
            let r = x - (shifted - ROUND);
            let p = EXP2_POLY.iter().fold(0.0, |acc, &k| acc * r + k);
            let scale = f32::from_bits((shifted.to_bits() << 23).wrapping_add(127 << 23));
            (r * p + 1.0) * scale
        })
    }
}

#[cfg(target_arch = "x86_64")]
use simd::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{Tile, EXP2_POLY};

    /// Two AVX2 vectors.
    #[derive(Clone, Copy)]
    pub(super) struct Avx2([__m256; 2]);

    /// One AVX-512 vector.
    #[derive(Clone, Copy)]
    pub(super) struct Avx512(__m512);

    #[inline(always)]
    unsafe fn exp2_8(x: __m256) -> __m256 {
        // Only x ≤ 0 (or −∞) comes here, so one clamp; at −127 the scale is 0.
        let x = _mm256_max_ps(x, _mm256_set1_ps(-127.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
        let r = _mm256_sub_ps(x, n);
        let mut p = _mm256_set1_ps(EXP2_POLY[0]);
        for &k in &EXP2_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(k));
        }
        let y = _mm256_fmadd_ps(r, p, _mm256_set1_ps(1.0));
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
    }

    macro_rules! pairwise {
        ($self:ident, $b:ident, $f:ident) => {
            unsafe { Avx2([$f($self.0[0], $b.0[0]), $f($self.0[1], $b.0[1])]) }
        };
    }

    // SAFETY (every method): only called from inside `run_task_avx2`, which requires AVX2 and FMA;
    // the methods are inlined there.
    impl Tile for Avx2 {
        #[inline(always)]
        fn splat(x: f32) -> Self {
            unsafe { Avx2([_mm256_set1_ps(x); 2]) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx2([_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))])
        }
        #[inline(always)]
        fn store(self, x: &mut [f32]) {
            assert!(x.len() >= 16);
            unsafe {
                _mm256_storeu_ps(x.as_mut_ptr(), self.0[0]);
                _mm256_storeu_ps(x.as_mut_ptr().add(8), self.0[1]);
            }
        }
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            unsafe {
                Avx2([
                    _mm256_fmadd_ps(self.0[0], b.0[0], c.0[0]),
                    _mm256_fmadd_ps(self.0[1], b.0[1], c.0[1]),
                ])
            }
        }
        #[inline(always)]
        fn add(self, b: Self) -> Self {
            pairwise!(self, b, _mm256_add_ps)
        }
        #[inline(always)]
        fn sub(self, b: Self) -> Self {
            pairwise!(self, b, _mm256_sub_ps)
        }
        #[inline(always)]
        fn mul(self, b: Self) -> Self {
            pairwise!(self, b, _mm256_mul_ps)
        }
        #[inline(always)]
        fn max(self, b: Self) -> Self {
            pairwise!(self, b, _mm256_max_ps)
        }
        #[inline(always)]
        fn exp2(self) -> Self {
            unsafe { Avx2([exp2_8(self.0[0]), exp2_8(self.0[1])]) }
        }
    }

    // SAFETY (every method): only called from inside `run_task_avx512`, which requires AVX-512F
    // (and AVX2, FMA); the methods are inlined there. The same operations as `Avx2`, lane by lane.
    impl Tile for Avx512 {
        #[inline(always)]
        fn splat(x: f32) -> Self {
            unsafe { Avx512(_mm512_set1_ps(x)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx512(_mm512_loadu_ps(p))
        }
        #[inline(always)]
        fn store(self, x: &mut [f32]) {
            assert!(x.len() >= 16);
            unsafe { _mm512_storeu_ps(x.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            unsafe { Avx512(_mm512_fmadd_ps(self.0, b.0, c.0)) }
        }
        #[inline(always)]
        fn add(self, b: Self) -> Self {
            unsafe { Avx512(_mm512_add_ps(self.0, b.0)) }
        }
        #[inline(always)]
        fn sub(self, b: Self) -> Self {
            unsafe { Avx512(_mm512_sub_ps(self.0, b.0)) }
        }
        #[inline(always)]
        fn mul(self, b: Self) -> Self {
            unsafe { Avx512(_mm512_mul_ps(self.0, b.0)) }
        }
        #[inline(always)]
        fn max(self, b: Self) -> Self {
            unsafe { Avx512(_mm512_max_ps(self.0, b.0)) }
        }
        #[inline(always)]
        fn exp2(self) -> Self {
            unsafe {
                let x = _mm512_max_ps(self.0, _mm512_set1_ps(-127.0));
                let n =
                    _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
                let r = _mm512_sub_ps(x, n);
                let mut p = _mm512_set1_ps(EXP2_POLY[0]);
                for &k in &EXP2_POLY[1..] {
                    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(k));
                }
                let y = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.0));
                let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
                    _mm512_cvtps_epi32(n),
                    _mm512_set1_epi32(127),
                ));
                Avx512(_mm512_mul_ps(y, _mm512_castsi512_ps(bits)))
            }
        }
    }
}

#[cfg(test)]
mod tests;
