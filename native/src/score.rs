//! Exact top-k of `factors @ v` (optionally min-max blended with a prior) that
//! reads 1 byte per factor instead of 4: the recommender's ranking hot path
//! (services/recommender/ranking.py documents the semantics; numpy `top_k` is
//! the reference).
//!
//! Asymmetric quantization with exact re-ranking. Each row is stored as i8 with
//! a per-row scale (640 KB for 10,000 x 64: it stays in this CPU's L2 between
//! requests, where the 2.56 MB f32 matrix is evicted to DRAM), the query as i16
//! with one scale. One integer pass gives every row an approximate score `c`
//! and a rigorous error bound `e` (see `bound_factor`), so the exact score lies
//! in [c - e, c + e]. Only rows whose interval can reach the k-th best lower
//! bound (and, for the blend, the rows that can hold the min or the max) are
//! rescored exactly from the f32 copy. The exact score is DEFINED as `dot`
//! below (one fixed summation order, no FMA), used by the fast path and the
//! full pass alike, so both give the same positions and the same bits.
//! Anything the bound does not cover (non-finite inputs, magnitudes near
//! overflow or underflow, very wide rows) takes the full exact pass.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Row width the fast path takes: the integer sum 127 * 32767 * d must fit an i32.
const MAX_D: usize = 512;
/// Row chunk of the integer pass (16 i16 lanes = one AVX2 register).
const CHUNK: usize = 16;
/// Query quantization range (i16).
const P_MAX: f32 = 32767.0;
/// Absolute slack added to every bound: covers the gradual-underflow error of the
/// products (each at most 2^-150, times at most 2^31 for the scaled integer sum),
/// i.e. < 1e-35, with margin.
const ABS_SLACK: f32 = 1e-30;
/// Scores (and their bounds) must stay below this for the fast path: far from f32
/// overflow, so no difference or blend of them is infinite.
const SAFE_MAX: f64 = 1e30;

/// The exact score: f32, 8 lanes (lane l sums the terms j = l mod 8 in order), then a
/// fixed reduction (lanes l and l + 4, then l and l + 2, then 0 and 1). Every step is one
/// IEEE f32 rounding and Rust never contracts a*b+c into an FMA, so the AVX2 kernel and
/// the portable one give the same bits: the fast path and the full pass always agree.
#[inline(always)]
pub fn dot(y: &[f32], v: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { dot_avx2(y, v) };
    }
    dot_portable(y, v)
}

#[inline(always)]
fn dot_finish(mut acc: [f32; 8], yr: &[f32], vr: &[f32]) -> f32 {
    for l in 0..yr.len() {
        acc[l] += yr[l] * vr[l];
    }
    let h = [acc[0] + acc[4], acc[1] + acc[5], acc[2] + acc[6], acc[3] + acc[7]];
    let q = [h[0] + h[2], h[1] + h[3]];
    q[0] + q[1]
}

#[inline(always)]
fn dot_portable(y: &[f32], v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (yc, vc) = (y.chunks_exact(8), v.chunks_exact(8));
    let (yr, vr) = (yc.remainder(), vc.remainder());
    for (a, b) in yc.zip(vc) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    dot_finish(acc, yr, vr)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn dot_avx2(y: &[f32], v: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (yc, vc) = (y.chunks_exact(8), v.chunks_exact(8));
    let (yr, vr) = (yc.remainder(), vc.remainder());
    let mut acc = _mm256_setzero_ps();
    for (a, b) in yc.zip(vc) {
        // Separate multiply and add (no FMA): the portable lanes' exact operations.
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(a.as_ptr()), _mm256_loadu_ps(b.as_ptr())));
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    dot_finish(lanes, yr, vr)
}

fn dot_all(y: &[f32], d: usize, v: &[f32], out: &mut [f32]) {
    if d == 0 {
        return out.fill(0.0); // an empty dot
    }
    for (row, o) in y.chunks_exact(d).zip(out.iter_mut()) {
        *o = dot(row, v);
    }
}

/// Σ q_ij p_j per row, exact in i32 (|sum| <= 127 * 32767 * 512 < 2^31).
fn coarse_portable(q: &[i8], dp: usize, p: &[i16], out: &mut [i32]) {
    for (row, o) in q.chunks_exact(dp).zip(out.iter_mut()) {
        let mut acc = [0i32; CHUNK];
        for (qc, pc) in row.chunks_exact(CHUNK).zip(p.chunks_exact(CHUNK)) {
            for l in 0..CHUNK {
                acc[l] += qc[l] as i32 * pc[l] as i32;
            }
        }
        *o = acc.iter().sum();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn coarse_avx2(q: &[i8], dp: usize, p: &[i16], out: &mut [i32]) {
    use std::arch::x86_64::*;
    let chunks = dp / CHUNK;
    let pv: Vec<__m256i> = (0..chunks).map(|c| _mm256_loadu_si256(p.as_ptr().add(c * CHUNK) as *const __m256i)).collect();
    #[inline(always)]
    unsafe fn row_acc(row: *const i8, pv: &[__m256i]) -> __m256i {
        let mut acc = _mm256_setzero_si256();
        for (c, pc) in pv.iter().enumerate() {
            // 16 i8 -> 16 i16, then pairwise products summed into 8 i32 (vpmaddwd).
            let q16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(row.add(c * CHUNK) as *const __m128i));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(q16, *pc));
        }
        acc
    }
    // Four rows at a time: three horizontal adds reduce four accumulators to four sums.
    let mut rows4 = q.chunks_exact(4 * dp);
    let mut outs4 = out.chunks_exact_mut(4);
    for (rows, o) in (&mut rows4).zip(&mut outs4) {
        let r = rows.as_ptr();
        let (a0, a1) = (row_acc(r, &pv), row_acc(r.add(dp), &pv));
        let (a2, a3) = (row_acc(r.add(2 * dp), &pv), row_acc(r.add(3 * dp), &pv));
        let h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
        let s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        _mm_storeu_si128(o.as_mut_ptr() as *mut __m128i, s);
    }
    for (row, o) in rows4.remainder().chunks_exact(dp).zip(outs4.into_remainder()) {
        let acc = row_acc(row.as_ptr(), &pv);
        let s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        *o = _mm_cvtsi128_si32(s);
    }
}

/// Integer sums are exact, so the AVX2 and portable kernels agree bit for bit.
fn coarse(q: &[i8], dp: usize, p: &[i16], out: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above); slices hold n * dp and dp values.
        return unsafe { coarse_avx2(q, dp, p, out) };
    }
    coarse_portable(q, dp, p, out)
}

/// `(1 - w) * (s - lo) / (hi - lo) + w * prior` in f32, numpy's order of operations
/// (services/recommender/ranking.py `rank`): the Python floats 1 - w, w and hi - lo
/// (computed in double) are rounded to f32, then every operation is one f32 rounding.
#[derive(Clone, Copy, Debug)]
struct Blend {
    a: f32,
    b: f32,
    lo: f32,
    denom: f32,
    flat: bool,
}

impl Blend {
    fn new(w: f64, lo: f32, hi: f32) -> Self {
        // NaN in lo/hi (numpy's min/max propagate it) or hi == lo: the unit part is 0.
        let flat = !(hi > lo);
        Blend { a: (1.0 - w) as f32, b: w as f32, lo, denom: (hi as f64 - lo as f64) as f32, flat }
    }

    #[inline(always)]
    fn apply(&self, s: f32, prior: f32) -> f32 {
        let unit = if self.flat { 0.0f32 } else { (s - self.lo) / self.denom };
        self.a * unit + self.b * prior
    }
}

/// A scored position; `Ord` puts the better one first (higher score, then lower position).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub score: f32,
    pub pos: u32,
}

impl Eq for Hit {}

impl Ord for Hit {
    fn cmp(&self, other: &Self) -> Ordering {
        // Scores here are never NaN; -0.0 == 0.0 as in numpy's comparisons.
        other.score.partial_cmp(&self.score).unwrap_or(Ordering::Equal).then(self.pos.cmp(&other.pos))
    }
}

impl PartialOrd for Hit {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The k best hits, best first. NaN and -inf are dropped (numpy's top_k never returns them).
fn best_k(hits: impl Iterator<Item = Hit>, k: usize) -> Vec<Hit> {
    if k == 0 {
        return Vec::new();
    }
    // Max-heap on Ord = the worst kept hit on top; `worst` caches it once the heap is full.
    let mut heap: BinaryHeap<Hit> = BinaryHeap::with_capacity(k.min(4096) + 1);
    let mut worst: Option<Hit> = None;
    for h in hits {
        if !(h.score > f32::NEG_INFINITY) {
            continue;
        }
        match worst {
            Some(w) if h >= w => {}
            _ => {
                if heap.len() == k {
                    heap.pop();
                }
                heap.push(h);
                if heap.len() == k {
                    worst = heap.peek().copied();
                }
            }
        }
    }
    heap.into_sorted_vec()
}

/// Scan width of the filters below: a chunk's max (or min) vectorizes, and most chunks
/// hold nothing that passes, so the per-element branch runs on few chunks.
const SCAN: usize = 32;

/// Max and min in 8 independent lanes (a single running max is a serial dependency
/// chain that LLVM may not reorder). Only compared against, so the sign of a zero
/// does not matter.
#[inline(always)]
fn chunk_max(xs: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let c = xs.chunks_exact(8);
    for &x in c.remainder() {
        m[0] = if x > m[0] { x } else { m[0] };
    }
    for c in c {
        for l in 0..8 {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    m.iter().fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a })
}

#[inline(always)]
fn chunk_min(xs: &[f32]) -> f32 {
    let mut m = [f32::INFINITY; 8];
    let c = xs.chunks_exact(8);
    for &x in c.remainder() {
        m[0] = if x < m[0] { x } else { m[0] };
    }
    for c in c {
        for l in 0..8 {
            m[l] = if c[l] < m[l] { c[l] } else { m[l] };
        }
    }
    m.iter().fold(f32::INFINITY, |a, &x| if x < a { x } else { a })
}

/// Positions i with xs[i] >= t (no NaN in xs), in order.
#[inline(always)]
fn at_least(xs: &[f32], t: f32, mut f: impl FnMut(usize)) {
    for (c, chunk) in xs.chunks(SCAN).enumerate() {
        if chunk_max(chunk) >= t {
            for (j, &x) in chunk.iter().enumerate() {
                if x >= t {
                    f(c * SCAN + j);
                }
            }
        }
    }
}

/// Positions i with xs[i] <= t (no NaN in xs), in order.
#[inline(always)]
fn at_most(xs: &[f32], t: f32, mut f: impl FnMut(usize)) {
    for (c, chunk) in xs.chunks(SCAN).enumerate() {
        if chunk_min(chunk) <= t {
            for (j, &x) in chunk.iter().enumerate() {
                if x <= t {
                    f(c * SCAN + j);
                }
            }
        }
    }
}

/// The k-th largest of the values (1 <= k <= values.len(), no NaN).
#[inline(always)]
fn kth_largest(values: &[f32], k: usize) -> f32 {
    let mut heap: BinaryHeap<std::cmp::Reverse<OrdF32>> = values[..k].iter().map(|&x| std::cmp::Reverse(OrdF32(x))).collect();
    let mut kth = heap.peek().map_or(f32::NEG_INFINITY, |r| r.0 .0);
    let rest = &values[k..];
    for chunk in rest.chunks(SCAN) {
        // Most chunks lose to the current k-th value as a whole.
        if chunk_max(chunk) <= kth {
            continue;
        }
        for &x in chunk {
            if x > kth {
                heap.pop();
                heap.push(std::cmp::Reverse(OrdF32(x)));
                kth = heap.peek().map_or(f32::NEG_INFINITY, |r| r.0 .0);
            }
        }
    }
    kth
}

#[derive(Clone, Copy, PartialEq, PartialOrd)]
struct OrdF32(f32); // only finite values

impl Eq for OrdF32 {}

impl Ord for OrdF32 {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.partial_cmp(&other.0).unwrap_or(Ordering::Equal)
    }
}

/// What a query did: the fast path (with how many rows it rescored) or the full pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Fast { rescored: usize },
    Exact,
}

pub struct Index {
    n: usize,
    d: usize,
    dp: usize,
    y: Vec<f32>,
    q: Vec<i8>,
    scale: Vec<f32>,
    prior: Vec<f32>,
    prior_order: Vec<u32>,
    max_scale: f64,
    exact_only: bool,
}

impl Index {
    pub fn build(y: Vec<f32>, n: usize, d: usize, prior: Vec<f32>) -> Index {
        let dp = d.div_ceil(CHUNK).max(1) * CHUNK;
        let mut q = vec![0i8; n * dp];
        let mut scale = vec![0f32; n];
        let mut exact_only = d == 0 || d > MAX_D || prior.iter().any(|p| !p.is_finite());
        let mut max_scale = 0f64;
        for i in 0..n {
            let row = &y[i * d..(i + 1) * d];
            if row.iter().any(|x| !x.is_finite()) {
                exact_only = true;
                continue;
            }
            let m = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            let s = m / 127.0;
            if m == 0.0 {
                continue;
            }
            if !(s > 0.0) {
                exact_only = true; // scale underflows to 0
                continue;
            }
            for (j, &x) in row.iter().enumerate() {
                let r = (x / s).round().clamp(-127.0, 127.0);
                q[i * dp + j] = r as i8;
                // The bound assumes |y - s q| <= s / 2 (+ rounding): check it, in f64
                // (exact here). Only a subnormal scale can break it.
                if (x as f64 - s as f64 * r as f64).abs() > 0.5001 * s as f64 {
                    exact_only = true;
                }
            }
            scale[i] = s;
            max_scale = max_scale.max(s as f64);
        }
        // Best first, ties by position; NaN and -inf never ranked (as numpy's top_k).
        let mut order: Vec<Hit> = prior.iter().enumerate()
            .filter(|(_, &p)| p > f32::NEG_INFINITY)
            .map(|(i, &score)| Hit { score, pos: i as u32 })
            .collect();
        order.sort_unstable();
        let prior_order = order.into_iter().map(|h| h.pos).collect();
        Index { n, d, dp, y, q, scale, prior, prior_order, max_scale, exact_only }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn d(&self) -> usize {
        self.d
    }

    pub fn exact_only(&self) -> bool {
        self.exact_only
    }

    /// Positions and scores of the k best allowed items, best first (ties by lower
    /// position). `v` None ranks the prior alone; else the scores are `dot(y_i, v)`,
    /// blended with the prior when w > 0.
    pub fn top_k(&self, v: Option<&[f32]>, k: usize, w: f64, exclude: &[usize], exact: bool, bound_scale: f32)
                 -> (Vec<Hit>, Pass) {
        if k == 0 || self.n == 0 {
            return (Vec::new(), Pass::Exact);
        }
        let Some(v) = v else {
            if exact {
                return (best_k(Self::hits(self.prior.clone(), exclude), k), Pass::Exact);
            }
            // The prior's order is the same for every query: walk it, skipping the excluded.
            let mut skip = exclude.to_vec();
            skip.sort_unstable();
            let hits = self.prior_order.iter()
                .filter(|&&i| skip.binary_search(&(i as usize)).is_err())
                .take(k)
                .map(|&i| Hit { score: self.prior[i as usize], pos: i })
                .collect();
            return (hits, Pass::Exact);
        };
        if !exact && !self.exact_only {
            if let Some(out) = self.fast(v, k, w, exclude, bound_scale) {
                return out;
            }
        }
        (self.full(v, k, w, exclude), Pass::Exact)
    }

    /// Scores to hits, excluded positions at -inf (as numpy's top_k does).
    fn hits(mut s: Vec<f32>, exclude: &[usize]) -> impl Iterator<Item = Hit> {
        for &i in exclude {
            s[i] = f32::NEG_INFINITY;
        }
        s.into_iter().enumerate().map(|(i, score)| Hit { score, pos: i as u32 })
    }

    /// Every score exactly, numpy's semantics (NaN/inf propagate, NaN never returned).
    fn full(&self, v: &[f32], k: usize, w: f64, exclude: &[usize]) -> Vec<Hit> {
        let mut s = vec![0f32; self.n];
        dot_all(&self.y, self.d, v, &mut s);
        if w > 0.0 {
            let (lo, hi) = if s.iter().any(|x| x.is_nan()) {
                (f32::NAN, f32::NAN)
            } else {
                s.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)))
            };
            let blend = Blend::new(w, lo, hi);
            for (x, &p) in s.iter_mut().zip(&self.prior) {
                *x = blend.apply(*x, p);
            }
        }
        best_k(Self::hits(s, exclude), k)
    }

    /// The error bound's factor K for this query: |exact - c_i| <= scale_i * K (+ ABS_SLACK).
    ///
    /// With y_ij = scale_i q_ij + r_ij (|r| <= scale_i / 2, checked at build) and
    /// v_j = sv p_j + t_j (R1 = Σ|t_j|, computed exactly in f64):
    ///   |Σ y_ij v_j - scale_i sv Σ q_ij p_j| <= scale_i (0.5 V1 + 127 R1).
    /// Rounding adds: the f32 dot, at most (d/8 + 4) u Σ|y||v| <= 68 u 127.0001 scale V1
    /// = 5.2e-4 scale V1 for d <= 512 (u = 2^-24); c's two f32 products and the f32
    /// conversion of the i32 sum, 3 u |c| <= 2.3e-5 scale (V1 + R1); the f32 roundings of
    /// K, scale*K, c - e and c + e, each u times terms <= 128 scale (V1 + R1), i.e. < 4e-5.
    /// Total < scale (0.5006 V1 + 127.01 R1): 0.52 and 128 leave ~30x margin.
    fn bound_factor(v1: f64, r1: f64) -> f32 {
        (0.52 * v1 + 128.0 * r1) as f32
    }

    fn fast(&self, v: &[f32], k: usize, w: f64, exclude: &[usize], bound_scale: f32) -> Option<(Vec<Hit>, Pass)> {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2. Same f32 operations in the same order, no FMA:
            // the same bits as the portable build.
            return unsafe { self.fast_avx2(v, k, w, exclude, bound_scale) };
        }
        self.fast_body(v, k, w, exclude, bound_scale)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn fast_avx2(&self, v: &[f32], k: usize, w: f64, exclude: &[usize], bound_scale: f32) -> Option<(Vec<Hit>, Pass)> {
        self.fast_body(v, k, w, exclude, bound_scale)
    }

    #[inline(always)]
    fn fast_body(&self, v: &[f32], k: usize, w: f64, exclude: &[usize], bound_scale: f32) -> Option<(Vec<Hit>, Pass)> {
        let (n, d) = (self.n, self.d);
        if v.len() != d || v.iter().any(|x| !x.is_finite()) {
            return None;
        }
        let vmax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        let v1: f64 = v.iter().map(|&x| x.abs() as f64).sum();
        // Tiny queries lose the relative bound to underflow; huge ones near overflow.
        if !(vmax >= 1e-30) || v1 * self.max_scale * 128.0 >= SAFE_MAX {
            return None;
        }
        let blend_on = w > 0.0;
        if blend_on && !(w <= 1.0) {
            return None; // 1 - w < 0 would make the blend decreasing in s
        }
        let sv = vmax / P_MAX;
        let mut p = vec![0i16; self.dp];
        let mut r1 = 0f64;
        for (j, &x) in v.iter().enumerate() {
            let r = (x / sv).round().clamp(-P_MAX, P_MAX);
            p[j] = r as i16;
            r1 += (x as f64 - sv as f64 * r as f64).abs();
        }
        let kf = Self::bound_factor(v1, r1) * bound_scale;

        let mut isum = vec![0i32; n];
        coarse(&self.q, self.dp, &p, &mut isum);
        let mut lower = vec![0f32; n];
        let mut upper = vec![0f32; n];
        for (((lo, up), &is), &s) in lower.iter_mut().zip(upper.iter_mut()).zip(&isum).zip(&self.scale) {
            let c = (s * sv) * is as f32;
            let e = s * kf + ABS_SLACK;
            *lo = c - e;
            *up = c + e;
        }
        let mut rescored = 0usize;

        // Blend: lo/hi are the exact min/max of s over ALL items. The max is held by a
        // row whose upper bound reaches the largest lower bound (that row's s is at least
        // it), the min likewise.
        let blend = if blend_on {
            let (max_lower, min_upper) = (chunk_max(&lower), chunk_min(&upper));
            let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
            at_least(&upper, max_lower, |i| {
                hi = hi.max(dot(self.row(i), v));
                rescored += 1;
            });
            at_most(&lower, min_upper, |i| {
                lo = lo.min(dot(self.row(i), v));
                rescored += 1;
            });
            let b = Blend::new(w, lo, hi);
            // The blend is monotone in s (each f32 operation is), so each item's blended
            // score lies between the blends of its bounds clamped to [lo, hi].
            if b.flat {
                for ((l, u), &pr) in lower.iter_mut().zip(upper.iter_mut()).zip(&self.prior) {
                    *l = b.apply(0.0, pr);
                    *u = *l;
                }
            } else {
                // Branch-free so that it vectorizes; same operations as `Blend::apply`.
                let (a, bw, lo_, den) = (b.a, b.b, b.lo, b.denom);
                for ((l, u), &pr) in lower.iter_mut().zip(upper.iter_mut()).zip(&self.prior) {
                    let (cl, cu) = (if *l > lo { *l } else { lo }, if *u < hi { *u } else { hi });
                    *l = a * ((cl - lo_) / den) + bw * pr;
                    *u = a * ((cu - lo_) / den) + bw * pr;
                }
            }
            Some(b)
        } else {
            None
        };

        // Excluded rows drop out of the selection (they did count for lo/hi).
        for &i in exclude {
            lower[i] = f32::NEG_INFINITY;
            upper[i] = f32::NEG_INFINITY;
        }
        let n_allowed = n - exclude.len(); // distinct positions (the wrapper dedupes)
        let threshold = if n_allowed <= k { f32::MIN } else { kth_largest(&lower, k) };
        // A row left out has an upper bound below the k-th best lower bound: at least k
        // allowed rows score strictly more, so ties cannot involve it.
        let mut hits = Vec::with_capacity(4 * k + 16);
        at_least(&upper, threshold, |i| {
            let s = dot(self.row(i), v);
            let score = match &blend {
                Some(b) => b.apply(s, self.prior[i]),
                None => s,
            };
            hits.push(Hit { score, pos: i as u32 });
        });
        rescored += hits.len();
        hits.sort_unstable();
        hits.truncate(k);
        hits.retain(|h| h.score > f32::NEG_INFINITY);
        Some((hits, Pass::Fast { rescored }))
    }

    #[inline(always)]
    fn row(&self, i: usize) -> &[f32] {
        &self.y[i * self.d..(i + 1) * self.d]
    }
}

/// A model's item factors and popularity prior, indexed for exact top-k queries.
///
/// `ScoreIndex(factors, prior)`: factors a C-contiguous float32 (n, d) buffer, prior a
/// float32 (n,) buffer (both copied). `top_k(vector, k, weight=0.0, exclude=(),
/// exact=False)` -> (positions, scores), best first, ties by lower position.
#[pyclass(module = "streams._native", frozen)]
pub struct ScoreIndex {
    core: Index,
    fast_calls: AtomicU64,
    exact_calls: AtomicU64,
    rescored: AtomicU64,
}

fn f32_buffer(obj: &Bound<'_, PyAny>, what: &str, dims: usize) -> PyResult<PyBuffer<f32>> {
    let buf = PyBuffer::<f32>::get_bound(obj).map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
    if buf.dimensions() != dims || !buf.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{what}: need a C-contiguous float32 array of {dims} dimension(s), got shape {:?}", buf.shape())));
    }
    Ok(buf)
}

#[pymethods]
impl ScoreIndex {
    #[new]
    fn new(py: Python<'_>, factors: &Bound<'_, PyAny>, prior: &Bound<'_, PyAny>) -> PyResult<Self> {
        let fb = f32_buffer(factors, "factors", 2)?;
        let (n, d) = (fb.shape()[0], fb.shape()[1]);
        let pb = f32_buffer(prior, "prior", 1)?;
        if pb.shape()[0] != n {
            return Err(PyValueError::new_err(format!("{} prior values for {n} rows", pb.shape()[0])));
        }
        if n > u32::MAX as usize {
            return Err(PyValueError::new_err("too many rows"));
        }
        let (y, prior) = (fb.to_vec(py)?, pb.to_vec(py)?);
        let core = py.allow_threads(|| Index::build(y, n, d, prior));
        Ok(ScoreIndex { core, fast_calls: AtomicU64::new(0), exact_calls: AtomicU64::new(0), rescored: AtomicU64::new(0) })
    }

    #[getter]
    fn n(&self) -> usize {
        self.core.n()
    }

    #[getter]
    fn d(&self) -> usize {
        self.core.d()
    }

    /// True when the index always takes the full exact pass (non-finite or extreme factors).
    #[getter]
    fn exact_only(&self) -> bool {
        self.core.exact_only()
    }

    /// (fast-path calls, full-pass calls, rows rescored by the fast path) since built.
    fn stats(&self) -> (u64, u64, u64) {
        (self.fast_calls.load(AtomicOrdering::Relaxed), self.exact_calls.load(AtomicOrdering::Relaxed),
         self.rescored.load(AtomicOrdering::Relaxed))
    }

    /// The k best positions and their scores, best first. `vector` None ranks the prior
    /// alone; else scores are factors @ vector, min-max scaled and blended with the prior
    /// as (1 - weight) * unit + weight * prior when weight > 0. Excluded positions, NaN and
    /// -inf are never returned. `exact` forces the full pass (same results, for tests);
    /// `bound_scale` scales the error bound, for tests only: below 1 the results may be wrong.
    #[pyo3(signature = (vector, k, weight=0.0, exclude=Vec::new(), exact=false, bound_scale=1.0))]
    fn top_k(&self, py: Python<'_>, vector: Option<&Bound<'_, PyAny>>, k: i64, weight: f64, exclude: Vec<i64>,
             exact: bool, bound_scale: f32) -> PyResult<(Vec<u32>, Vec<f32>)> {
        let n = self.core.n();
        let v = match vector {
            None => None,
            Some(obj) => {
                let buf = f32_buffer(obj, "vector", 1)?;
                if buf.shape()[0] != self.core.d() {
                    return Err(PyValueError::new_err(format!(
                        "vector of {} values for {} factors", buf.shape()[0], self.core.d())));
                }
                Some(buf.to_vec(py)?)
            }
        };
        // Distinct, in range: the fast path counts the allowed rows from it.
        let mut seen = vec![false; if exclude.is_empty() { 0 } else { n }];
        let mut positions = Vec::with_capacity(exclude.len());
        for &x in &exclude {
            if x < 0 || x as usize >= n {
                return Err(PyValueError::new_err(format!("exclude position {x} outside 0..{n}")));
            }
            if !std::mem::replace(&mut seen[x as usize], true) {
                positions.push(x as usize);
            }
        }
        if !(bound_scale.is_finite() && bound_scale >= 0.0) {
            return Err(PyValueError::new_err(format!("bound_scale {bound_scale}: need a finite value >= 0")));
        }
        let k = k.max(0) as usize;
        let core = &self.core;
        let (hits, pass) = py.allow_threads(|| core.top_k(v.as_deref(), k, weight, &positions, exact, bound_scale));
        match pass {
            Pass::Fast { rescored } => {
                self.fast_calls.fetch_add(1, AtomicOrdering::Relaxed);
                self.rescored.fetch_add(rescored as u64, AtomicOrdering::Relaxed);
            }
            Pass::Exact => {
                self.exact_calls.fetch_add(1, AtomicOrdering::Relaxed);
            }
        }
        Ok(hits.iter().map(|h| (h.pos, h.score)).unzip())
    }
}
