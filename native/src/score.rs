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
//!
//! Per query (AVX-512 VNNI kernel; AVX2 and portable kernels give the same bits):
//! 1. one coarse pass over the rows in 16-row blocks (`bounds_avx512`): vpdpbusd
//!    sums, the bounds, their extremes and the selection's seeds, all fused;
//!    it streams the 640 KB of rows from L2 and that bandwidth is its limit
//!    (~20k cycles at 10,000 x 64; the multiplies alone take a quarter of it);
//! 2. blend only: the rows that can hold the min or the max, rescored (`lo`, `hi`);
//! 3. the selection (`select_avx512`): blended bounds by one multiply instead of
//!    the blend's division, with a proven margin (`Map::linear`); a threshold
//!    from the seeds, then one pass keeping the rows that can reach it;
//! 4. the candidates rescored exactly (their f32 rows prefetched first).
//! Buffers are per thread and reused; the rows live on transparent huge pages.

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
/// Query quantization range: |p| <= 127 * 256 + 127, so that p = 256 hi + lo with hi and lo
/// both i8 (the AVX-512 kernel's split); every kernel uses the same p.
const P_MAX: f32 = 32639.0;
/// Rows per block of the AVX-512 layout (one 512-bit register of i32 sums).
const BLOCK: usize = 16;
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

/// The integer kernel of the coarse pass. Integer sums are exact, so every kernel gives
/// the same sums, hence the same bounds, candidates and results (tests/unit/
/// test_native_score.py compares them); the index picks the best the CPU has at build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    Avx2,
    /// AVX-512 VNNI: `vpdpbusd` (4 u8 x i8 products summed into each i32 lane) on a row-blocked
    /// layout, 16 rows per register, no conversion and no horizontal sums.
    Avx512,
}

impl Kernel {
    pub const ALL: [Kernel; 3] = [Kernel::Portable, Kernel::Avx2, Kernel::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
        }
    }

    pub fn supported(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx2")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    pub fn best() -> Kernel {
        *Kernel::ALL.iter().rev().find(|k| k.supported()).unwrap_or(&Kernel::Portable)
    }
}

/// A buffer on 2 MB-aligned memory advised as transparent huge pages (Linux): the coarse
/// pass streams the whole of it, so one TLB entry instead of one per 4 KB page, and a cold
/// query walks no page tables. Elsewhere (or if the advice is refused) ordinary pages.
struct HugeBuf<T: Copy> {
    ptr: std::ptr::NonNull<T>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: HugeBuf owns its memory like a Vec<T> (T: Copy, no interior references).
unsafe impl<T: Copy + Send> Send for HugeBuf<T> {}
unsafe impl<T: Copy + Sync> Sync for HugeBuf<T> {}

const HUGE_PAGE: usize = 2 << 20;

#[cfg(target_os = "linux")]
extern "C" {
    fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
}

impl<T: Copy> HugeBuf<T> {
    fn from_slice(data: &[T]) -> HugeBuf<T> {
        let bytes = std::mem::size_of_val(data).max(1);
        let align = if bytes >= HUGE_PAGE / 8 { HUGE_PAGE } else { 64 };
        let size = bytes.div_ceil(align) * align;
        let layout = std::alloc::Layout::from_size_align(size, align.max(std::mem::align_of::<T>())).expect("layout");
        // SAFETY: size > 0; the pointer is checked; data is copied into the first len slots.
        unsafe {
            let raw = std::alloc::alloc(layout);
            let Some(ptr) = std::ptr::NonNull::new(raw as *mut T) else { std::alloc::handle_alloc_error(layout) };
            #[cfg(target_os = "linux")]
            if align == HUGE_PAGE {
                madvise(raw as *mut std::ffi::c_void, size, 14); // MADV_HUGEPAGE; refusal is harmless
            }
            std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), data.len());
            HugeBuf { ptr, len: data.len(), layout }
        }
    }
}

impl<T: Copy> std::ops::Deref for HugeBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr holds len initialized values (from_slice).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> Drop for HugeBuf<T> {
    fn drop(&mut self) {
        // SAFETY: allocated in from_slice with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr() as *mut u8, self.layout) }
    }
}

/// The row-blocked layout of the AVX-512 kernel: block b holds rows 16b..16b+16; inside it,
/// column group g (columns 4g..4g+4) is 64 bytes, row r's 4 bytes at 4r. Values are q + 128
/// as u8 (vpdpbusd multiplies u8 by i8), padding rows and columns q = 0.
fn blocked(q: &[i8], n: usize, dp: usize) -> Vec<u8> {
    let nblk = n.div_ceil(BLOCK);
    let mut qb = vec![128u8; nblk * BLOCK * dp];
    for i in 0..n {
        let (b, r) = (i / BLOCK, i % BLOCK);
        for j in 0..dp {
            qb[b * BLOCK * dp + (j / 4) * 4 * BLOCK + r * 4 + j % 4] = (q[i * dp + j] as i32 + 128) as u8;
        }
    }
    qb
}

/// The query split for vpdpbusd: p = 256 hi + lo with hi, lo in i8 (|p| <= P_MAX), four
/// columns packed per i32 (broadcast to every row's lane); and 128 Σ p, the offset that
/// the u8 rows (q + 128) add.
fn split_query(p: &[i16], hi: &mut [i32], lo: &mut [i32]) -> i32 {
    let mut sum = 0i32;
    for (g, quad) in p.chunks_exact(4).enumerate() {
        let (mut h, mut l) = ([0u8; 4], [0u8; 4]);
        for t in 0..4 {
            let x = quad[t] as i32;
            let low = x as i8; // x mod 256, as i8
            let high = (x - low as i32) >> 8;
            debug_assert!((-128..=127).contains(&high));
            h[t] = high as i8 as u8;
            l[t] = low as u8;
            sum += x;
        }
        hi[g] = i32::from_le_bytes(h);
        lo[g] = i32::from_le_bytes(l);
    }
    sum.wrapping_mul(128)
}

/// Lowest and highest bound over the rows: max/min of the lower bounds and of the upper.
#[derive(Clone, Copy, Debug)]
struct Extremes {
    max_lower: f32,
    min_upper: f32,
    min_lower: f32,
    max_upper: f32,
}

/// The bounds of one row from its integer sum: the same f32 operations in every kernel.
#[inline(always)]
fn row_bounds(is: i32, s: f32, sv: f32, kf: f32) -> (f32, f32) {
    let c = (s * sv) * is as f32;
    let e = s * kf + ABS_SLACK;
    (c - e, c + e)
}

/// AVX-512 VNNI coarse pass with the bounds fused in: lower/upper for rows 0..n (and the
/// block padding after them), and their extremes over 0..n.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
unsafe fn bounds_avx512(qb: &[u8], n: usize, dp: usize, p: &[i16], scale: &[f32], sv: f32, kf: f32,
                        lower: &mut [f32], upper: &mut [f32], seeds: &mut Vec<u32>) -> Extremes {
    use std::arch::x86_64::*;
    let groups = dp / 4; // dp is a multiple of 16: groups is even
    let (mut hi, mut lo) = ([0i32; MAX_D / 4], [0i32; MAX_D / 4]);
    let corr = _mm512_set1_epi32(split_query(p, &mut hi, &mut lo));
    let nblk = n.div_ceil(BLOCK);
    debug_assert!(qb.len() == nblk * BLOCK * dp && scale.len() >= nblk * BLOCK && lower.len() >= nblk * BLOCK);
    let (svv, kfv, slack) = (_mm512_set1_ps(sv), _mm512_set1_ps(kf), _mm512_set1_ps(ABS_SLACK));
    let (mut max_l, mut min_u) = (_mm512_set1_ps(f32::NEG_INFINITY), _mm512_set1_ps(f32::INFINITY));
    let (mut min_l, mut max_u) = (_mm512_set1_ps(f32::INFINITY), _mm512_set1_ps(f32::NEG_INFINITY));
    let q = qb.as_ptr();
    // Seeds for the selection: per group of SEED_BLOCKS blocks and lane, the row with the
    // largest lower bound (16 distinct rows per group).
    // Written by index into a buffer sized up front: no call (which would spill every
    // vector register) inside the loop.
    seeds.clear();
    seeds.reserve(nblk.div_ceil(SEED_BLOCKS) * BLOCK);
    let seed_out = seeds.as_mut_ptr();
    let mut n_seeds = 0;
    let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let (mut gl, mut gi) = (_mm512_set1_ps(f32::NEG_INFINITY), _mm512_setzero_si512());
    let mut lanes = [0u32; BLOCK];
    for b in 0..nblk {
        let base = q.add(b * BLOCK * dp);
        // Four independent chains (hi/lo x even/odd group) hide vpdpbusd's latency.
        let (mut h0, mut h1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        let (mut l0, mut l1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        let mut g = 0;
        while g < groups {
            let r0 = _mm512_loadu_si512(base.add(g * 64) as *const _);
            let r1 = _mm512_loadu_si512(base.add(g * 64 + 64) as *const _);
            h0 = _mm512_dpbusd_epi32(h0, r0, _mm512_set1_epi32(*hi.get_unchecked(g)));
            l0 = _mm512_dpbusd_epi32(l0, r0, _mm512_set1_epi32(*lo.get_unchecked(g)));
            h1 = _mm512_dpbusd_epi32(h1, r1, _mm512_set1_epi32(*hi.get_unchecked(g + 1)));
            l1 = _mm512_dpbusd_epi32(l1, r1, _mm512_set1_epi32(*lo.get_unchecked(g + 1)));
            g += 2;
        }
        // Σ (q + 128) p = 256 Σ (q + 128) hi + Σ (q + 128) lo; minus 128 Σ p. Wrapping i32
        // arithmetic, exact because the true sum fits an i32.
        let hs = _mm512_add_epi32(h0, h1);
        let ls = _mm512_add_epi32(l0, l1);
        let isum = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32::<8>(hs), ls), corr);
        let s = _mm512_loadu_ps(scale.as_ptr().add(b * BLOCK));
        let c = _mm512_mul_ps(_mm512_mul_ps(s, svv), _mm512_cvtepi32_ps(isum));
        let e = _mm512_add_ps(_mm512_mul_ps(s, kfv), slack);
        let (l, u) = (_mm512_sub_ps(c, e), _mm512_add_ps(c, e));
        _mm512_storeu_ps(lower.as_mut_ptr().add(b * BLOCK), l);
        _mm512_storeu_ps(upper.as_mut_ptr().add(b * BLOCK), u);
        let rows = n - b * BLOCK;
        let valid: __mmask16 = if rows >= BLOCK { 0xffff } else { ((1u32 << rows) - 1) as __mmask16 };
        let idx = _mm512_add_epi32(iota, _mm512_set1_epi32((b * BLOCK) as i32));
        if rows >= BLOCK {
            max_l = _mm512_max_ps(max_l, l);
            min_u = _mm512_min_ps(min_u, u);
            min_l = _mm512_min_ps(min_l, l);
            max_u = _mm512_max_ps(max_u, u);
        } else {
            max_l = _mm512_mask_max_ps(max_l, valid, max_l, l);
            min_u = _mm512_mask_min_ps(min_u, valid, min_u, u);
            min_l = _mm512_mask_min_ps(min_l, valid, min_l, l);
            max_u = _mm512_mask_max_ps(max_u, valid, max_u, u);
        }
        let better = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(valid, l, gl);
        gl = _mm512_mask_mov_ps(gl, better, l);
        gi = _mm512_mask_mov_epi32(gi, better, idx);
        if (b + 1) % SEED_BLOCKS == 0 || b + 1 == nblk {
            let mut set = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(gl, _mm512_set1_ps(f32::NEG_INFINITY)) as u32;
            _mm512_storeu_si512(lanes.as_mut_ptr() as *mut _, gi);
            while set != 0 {
                seed_out.add(n_seeds).write(lanes[set.trailing_zeros() as usize]);
                n_seeds += 1;
                set &= set - 1;
            }
            gl = _mm512_set1_ps(f32::NEG_INFINITY);
        }
    }
    seeds.set_len(n_seeds); // written above, within the reserved capacity
    Extremes {
        max_lower: _mm512_reduce_max_ps(max_l),
        min_upper: _mm512_reduce_min_ps(min_u),
        min_lower: _mm512_reduce_min_ps(min_l),
        max_upper: _mm512_reduce_max_ps(max_u),
    }
}

/// The bounds from the integer sums of the row-major kernels (same operations as above).
fn bounds_from_sums(isum: &[i32], scale: &[f32], sv: f32, kf: f32, lower: &mut [f32], upper: &mut [f32]) -> Extremes {
    for (((lo, up), &is), &s) in lower.iter_mut().zip(upper.iter_mut()).zip(isum).zip(scale) {
        (*lo, *up) = row_bounds(is, s, sv, kf);
    }
    let n = isum.len();
    let (lower, upper) = (&lower[..n], &upper[..n]);
    Extremes { max_lower: chunk_max(lower), min_upper: chunk_min(upper), min_lower: chunk_min(lower),
               max_upper: chunk_max(upper) }
}

/// `(1 - w) * (s - lo) / (hi - lo) + w * prior` in f32, numpy's order of operations
/// (services/recommender/ranking.py `rank`): the Python floats 1 - w, w and hi - lo
/// (computed in double) are rounded to f32, then every operation is one f32 rounding.
#[derive(Clone, Copy, Debug)]
struct Blend {
    a: f32,
    b: f32,
    lo: f32,
    hi: f32,
    denom: f32,
    flat: bool,
}

impl Blend {
    fn new(w: f64, lo: f32, hi: f32) -> Self {
        // NaN in lo/hi (numpy's min/max propagate it) or hi == lo: the unit part is 0.
        let flat = !(hi > lo);
        Blend { a: (1.0 - w) as f32, b: w as f32, lo, hi, denom: (hi as f64 - lo as f64) as f32, flat }
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
    /// n rounded up to whole blocks of 16: the length of `scale`, `prior_pad` and the bounds.
    n_pad: usize,
    /// The f32 rows (exact scores), on huge pages too: a cold query's rescored rows are
    /// scattered over it.
    y: HugeBuf<f32>,
    kernel: Kernel,
    /// Row-major i8 rows (portable and AVX2 kernels), else empty.
    q: Vec<i8>,
    /// The blocked u8 layout (AVX-512 kernel), else empty.
    qb: HugeBuf<u8>,
    scale: Vec<f32>,
    prior: Vec<f32>,
    prior_pad: Vec<f32>,
    prior_order: Vec<u32>,
    max_scale: f64,
    max_abs_prior: f64,
    exact_only: bool,
}

/// Per-thread buffers of the fast path, grown on demand and reused by every query (no
/// allocation or zeroing per call once they are big enough).
#[derive(Default)]
struct Scratch {
    p: Vec<i16>,
    isum: Vec<i32>,
    lower: Vec<f32>,
    upper: Vec<f32>,
    cands: Vec<(u32, f32, f32)>,
    gmax: Vec<f32>,
    seeds: Vec<u32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// How the selection turns an item's score bounds into bounds on its ranked value.
#[derive(Clone, Copy, Debug)]
enum Map {
    /// No blend: the score bounds themselves.
    Identity,
    /// Blend: `(x - lo) * aid + bw * prior ∓ m`, a rigorous enclosure of the blended bounds
    /// (see `Map::linear`), one multiplication instead of a division per bound.
    Linear { lo: f32, aid: f32, bw: f32, m: f32 },
}

impl Map {
    /// The blend's `r(x) = a * ((x - lo) / den) + b * prior` (f32, as `Blend::apply`) is
    /// replaced by `g(x) = ((x - lo) * aid + b * prior) ∓ m`, with aid = fl(a * fl(1 / den)).
    /// With T1 = |a (x - lo) / den| and T2 = |b prior| (reals), each f32 operation one
    /// rounding (u = 2^-24): |r - R| <= 4.001 u T1 + 2.001 u T2 and |g - R| <= 5.001 u T1
    /// + 2.001 u T2 against the real R; the final ∓ m adds u |g ∓ m|. For every x in
    /// [min lower, max upper] (which holds lo), T1 <= a X / den with X = max upper - min
    /// lower, T2 <= b max|prior|: so m = 2^-16 (a X / den + b max|prior|) (256 u, ~20x the
    /// 12 u needed) plus 1e-37 for gradual underflow gives g(x) - m <= r(x) <= g(x) + m.
    /// None when the blend is flat, a = 0 (weight 1) or the values could leave the safe
    /// range: the caller then rewrites the bounds with `Blend::apply` itself.
    fn linear(b: &Blend, ext: &Extremes, max_abs_prior: f64) -> Option<Map> {
        if b.flat || !(b.a > 0.0) || !(b.denom > 0.0) {
            return None;
        }
        let aid = b.a * (1.0f32 / b.denom);
        if !(aid.is_normal() && aid > 0.0) {
            return None;
        }
        let x = ext.max_upper as f64 - ext.min_lower as f64;
        let total = b.a as f64 * x / b.denom as f64 + b.b as f64 * max_abs_prior;
        if !(total < SAFE_MAX) {
            return None;
        }
        let m = (total * (1.0 / 65536.0) * 1.001 + 1e-37) as f32;
        Some(Map::Linear { lo: b.lo, aid, bw: b.b, m })
    }
}

/// The selection's map as (lo, aid, bw, m): `((x - lo) * aid + bw * prior) ∓ m`. The
/// identity is (0, 1, 0, 0): x - 0, x * 1, x + 0 and x - 0 are x (-0 may become +0, equal in
/// every comparison), and -inf stays -inf.
impl Map {
    fn params(self) -> (f32, f32, f32, f32) {
        match self {
            Map::Identity => (0.0, 1.0, 0.0, 0.0),
            Map::Linear { lo, aid, bw, m } => (lo, aid, bw, m),
        }
    }
}

/// Rows that can hold the max (upper >= max lower) and the min (lower <= min upper) of the
/// scores, in AVX-512: `at_least` and `at_most` fused in one pass over rows 0..n.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn extreme_rows_avx512(lower: &[f32], upper: &[f32], n: usize, max_lower: f32, min_upper: f32,
                              mut hi: impl FnMut(usize), mut lo: impl FnMut(usize)) {
    use std::arch::x86_64::*;
    let (mlv, muv) = (_mm512_set1_ps(max_lower), _mm512_set1_ps(min_upper));
    let nblk = n.div_ceil(BLOCK);
    debug_assert!(lower.len() >= nblk * BLOCK && upper.len() >= nblk * BLOCK);
    for c in 0..nblk {
        let off = c * BLOCK;
        let valid: u32 = if n - off >= BLOCK { 0xffff } else { (1u32 << (n - off)) - 1 };
        let mh = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_loadu_ps(upper.as_ptr().add(off)), mlv) as u32 & valid;
        let ml = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(_mm512_loadu_ps(lower.as_ptr().add(off)), muv) as u32 & valid;
        if (mh | ml) == 0 {
            continue;
        }
        let mut m = mh;
        while m != 0 {
            hi(off + m.trailing_zeros() as usize);
            m &= m - 1;
        }
        let mut m = ml;
        while m != 0 {
            lo(off + m.trailing_zeros() as usize);
            m &= m - 1;
        }
    }
}

/// Rows per group of the selection's first pass: each group gives 16 maxima of distinct rows.
const GROUP: usize = 16 * BLOCK;
/// Blocks per group of the AVX-512 seeds (see `bounds_avx512`).
const SEED_BLOCKS: usize = 64;

/// The k-th largest of the values, f32::MIN when fewer than k are finite: a sorted array for
/// small k (most values lose to its last entry at one comparison).
fn kth_of(values: impl Iterator<Item = f32>, k: usize, buf: &mut Vec<f32>) -> f32 {
    const SMALL: usize = 64;
    if k == 0 {
        return f32::MIN;
    }
    if k > SMALL {
        buf.clear();
        buf.extend(values);
        return kth_or_min(buf, k);
    }
    let mut top = [f32::NEG_INFINITY; SMALL];
    for x in values {
        if x > top[k - 1] {
            let mut j = k - 1;
            while j > 0 && top[j - 1] < x {
                top[j] = top[j - 1];
                j -= 1;
            }
            top[j] = x;
        }
    }
    if top[k - 1] > f32::NEG_INFINITY { top[k - 1] } else { f32::MIN }
}

/// The k-th largest of the values, f32::MIN when fewer than k are finite.
fn kth_or_min(values: &[f32], k: usize) -> f32 {
    if k == 0 || values.len() < k {
        return f32::MIN;
    }
    let t = kth_largest(values, k);
    if t > f32::NEG_INFINITY { t } else { f32::MIN }
}

/// The selection in two passes over the bounds (mapped by `map`, 16 rows at a time).
/// First: per group of 16 blocks, the lane-wise max of the mapped lower bounds: 16 values,
/// each some row's mapped lower bound, so the k-th largest of them, t0, is at most the
/// k-th largest mapped lower bound T of all allowed rows (excluded and padding rows carry
/// -inf bounds). Second: every row whose mapped upper bound reaches t0 goes to `cands`
/// (position, mapped lower, mapped upper); these include every row whose lower bound
/// reaches T, so T is the k-th largest lower bound among them. Returns T (f32::MIN when
/// fewer than k rows are allowed); the caller keeps the candidates whose upper reaches T.
fn select_portable(lower: &[f32], upper: &[f32], prior: &[f32], map: Map, k: usize,
                   cands: &mut Vec<(u32, f32, f32)>, gmax: &mut Vec<f32>) -> f32 {
    let (lo, aid, bw, m) = map.params();
    let f_lo = |x: f32, p: f32| ((x - lo) * aid + bw * p) - m;
    let f_up = |x: f32, p: f32| ((x - lo) * aid + bw * p) + m;
    gmax.clear();
    for (lg, pg) in lower.chunks(GROUP).zip(prior.chunks(GROUP)) {
        let mut mx = [f32::NEG_INFINITY; BLOCK];
        for (lc, pc) in lg.chunks_exact(BLOCK).zip(pg.chunks_exact(BLOCK)) {
            for r in 0..BLOCK {
                let l = f_lo(lc[r], pc[r]);
                mx[r] = if l > mx[r] { l } else { mx[r] };
            }
        }
        gmax.extend_from_slice(&mx);
    }
    let t0 = kth_or_min(gmax, k);
    cands.clear();
    for (c, ((lc, uc), pc)) in lower.chunks_exact(BLOCK).zip(upper.chunks_exact(BLOCK)).zip(prior.chunks_exact(BLOCK)).enumerate() {
        for r in 0..BLOCK {
            let u = f_up(uc[r], pc[r]);
            if u >= t0 {
                cands.push(((c * BLOCK + r) as u32, f_lo(lc[r], pc[r]), u));
            }
        }
    }
    select_finish(cands, k, gmax)
}

/// T from the candidates: the k-th largest of their mapped lower bounds.
fn select_finish(cands: &[(u32, f32, f32)], k: usize, buf: &mut Vec<f32>) -> f32 {
    kth_of(cands.iter().map(|c| c.1), k, buf)
}

/// `select_portable` in AVX-512, the first pass replaced by the seeds of `bounds_avx512`
/// (per group of 64 blocks and lane, the row with the largest lower bound: distinct rows, so
/// the k-th largest of their mapped lower bounds is again at most T). Same f32 operations, so
/// the same candidates after the final threshold.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn select_avx512(lower: &[f32], upper: &[f32], prior: &[f32], map: Map, k: usize, seeds: &[u32],
                        cands: &mut Vec<(u32, f32, f32)>, gmax: &mut Vec<f32>) -> f32 {
    use std::arch::x86_64::*;
    let (lo, aid, bw, m) = map.params();
    let (lov, aidv, bwv, mv) = (_mm512_set1_ps(lo), _mm512_set1_ps(aid), _mm512_set1_ps(bw), _mm512_set1_ps(m));
    let nblk = lower.len() / BLOCK;
    debug_assert!(lower.len() == nblk * BLOCK && upper.len() == nblk * BLOCK && prior.len() == nblk * BLOCK);
    let (lp, up, pp) = (lower.as_ptr(), upper.as_ptr(), prior.as_ptr());
    // The seeds are distinct rows (excluded ones now carry -inf bounds): the k-th largest of
    // their mapped lower bounds is at most T.
    let t0 = kth_of(seeds.iter().map(|&i| {
        let i = i as usize;
        ((lower[i] - lo) * aid + bw * prior[i]) - m
    }), k, gmax);
    let tv = _mm512_set1_ps(t0);
    // Sized up front and written by index (no call inside the loop, see `bounds_avx512`).
    cands.clear();
    cands.reserve(nblk * BLOCK);
    let cand_out = cands.as_mut_ptr();
    let mut n_cands = 0;
    let (mut lm, mut um) = ([0f32; BLOCK], [0f32; BLOCK]);
    for c in 0..nblk {
        let off = c * BLOCK;
        let bp = _mm512_mul_ps(bwv, _mm512_loadu_ps(pp.add(off)));
        let u = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(up.add(off)), lov), aidv), bp), mv);
        let mut mask = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(u, tv);
        if mask == 0 {
            continue; // most blocks
        }
        let l = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(lp.add(off)), lov), aidv), bp), mv);
        _mm512_storeu_ps(lm.as_mut_ptr(), l);
        _mm512_storeu_ps(um.as_mut_ptr(), u);
        while mask != 0 {
            let r = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            cand_out.add(n_cands).write(((off + r) as u32, lm[r], um[r]));
            n_cands += 1;
        }
    }
    cands.set_len(n_cands); // written above, within the reserved capacity
    select_finish(cands, k, gmax)
}

impl Index {
    pub fn build(y: Vec<f32>, n: usize, d: usize, prior: Vec<f32>, kernel: Kernel) -> Index {
        let dp = d.div_ceil(CHUNK).max(1) * CHUNK;
        let n_pad = n.div_ceil(BLOCK) * BLOCK;
        let mut q = vec![0i8; n * dp];
        let mut scale = vec![0f32; n_pad];
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
        let max_abs_prior = prior.iter().fold(0f64, |m, p| m.max(p.abs() as f64));
        let mut prior_pad = prior.clone();
        prior_pad.resize(n_pad, 0.0);
        let kernel = if kernel.supported() { kernel } else { Kernel::Portable };
        let (q, qb) = if kernel == Kernel::Avx512 { (Vec::new(), blocked(&q, n, dp)) } else { (q, Vec::new()) };
        let qb = HugeBuf::from_slice(&qb);
        let y = HugeBuf::from_slice(&y);
        Index { n, d, dp, n_pad, y, kernel, q, qb, scale, prior, prior_pad, prior_order, max_scale, max_abs_prior,
                exact_only }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn d(&self) -> usize {
        self.d
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
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
        // SAFETY: the index only holds a kernel the CPU supports (checked at build). The
        // target features change no result: same f32 operations in the same order, no FMA.
        #[cfg(target_arch = "x86_64")]
        match self.kernel {
            Kernel::Avx512 => return unsafe { self.fast_avx512(v, k, w, exclude, bound_scale) },
            Kernel::Avx2 => return unsafe { self.fast_avx2(v, k, w, exclude, bound_scale) },
            Kernel::Portable => {}
        }
        self.fast_body(v, k, w, exclude, bound_scale)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
    unsafe fn fast_avx512(&self, v: &[f32], k: usize, w: f64, exclude: &[usize], bound_scale: f32)
                          -> Option<(Vec<Hit>, Pass)> {
        self.fast_body(v, k, w, exclude, bound_scale)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn fast_avx2(&self, v: &[f32], k: usize, w: f64, exclude: &[usize], bound_scale: f32) -> Option<(Vec<Hit>, Pass)> {
        self.fast_body(v, k, w, exclude, bound_scale)
    }

    #[inline(always)]
    fn fast_body(&self, v: &[f32], k: usize, w: f64, exclude: &[usize], bound_scale: f32) -> Option<(Vec<Hit>, Pass)> {
        let (n, d, dp, n_pad) = (self.n, self.d, self.dp, self.n_pad);
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
        // The buffers leave the thread-local slot for the call (no borrow held across it).
        let mut sc = SCRATCH.with(|c| c.take());
        let sv = vmax / P_MAX;
        sc.p.clear();
        sc.p.resize(dp, 0);
        let mut r1 = 0f64;
        for (j, &x) in v.iter().enumerate() {
            let r = (x / sv).round().clamp(-P_MAX, P_MAX);
            sc.p[j] = r as i16;
            r1 += (x as f64 - sv as f64 * r as f64).abs();
        }
        let kf = Self::bound_factor(v1, r1) * bound_scale;
        if sc.lower.len() < n_pad {
            sc.lower.resize(n_pad, 0.0);
            sc.upper.resize(n_pad, 0.0);
        }
        let ext = match self.kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX-512 F/BW/VNNI (the index's kernel); qb holds n_pad rows
            // of dp, scale and the bounds n_pad values.
            Kernel::Avx512 => unsafe {
                bounds_avx512(&self.qb, n, dp, &sc.p, &self.scale, sv, kf, &mut sc.lower, &mut sc.upper,
                              &mut sc.seeds)
            },
            kernel => {
                if sc.isum.len() < n {
                    sc.isum.resize(n, 0);
                }
                let isum = &mut sc.isum[..n];
                #[cfg(target_arch = "x86_64")]
                if kernel == Kernel::Avx2 {
                    // SAFETY: the CPU has AVX2 (the index's kernel); q holds n rows of dp.
                    unsafe { coarse_avx2(&self.q, dp, &sc.p, isum) };
                } else {
                    coarse_portable(&self.q, dp, &sc.p, isum);
                }
                #[cfg(not(target_arch = "x86_64"))]
                coarse_portable(&self.q, dp, &sc.p, isum);
                bounds_from_sums(isum, &self.scale[..n], sv, kf, &mut sc.lower[..n], &mut sc.upper[..n])
            }
        };
        let out = self.fast_select(&mut sc, v, k, w, exclude, ext);
        SCRATCH.with(|c| c.replace(sc));
        Some(out)
    }

    #[inline(always)]
    fn fast_select(&self, sc: &mut Scratch, v: &[f32], k: usize, w: f64, exclude: &[usize], ext: Extremes)
                   -> (Vec<Hit>, Pass) {
        let (n, n_pad) = (self.n, self.n_pad);
        let (lower, upper) = (&mut sc.lower[..n_pad], &mut sc.upper[..n_pad]);
        let mut rescored = 0usize;

        // Blend: lo/hi are the exact min/max of s over ALL items. The max is held by a
        // row whose upper bound reaches the largest lower bound (that row's s is at least
        // it), the min likewise.
        let blend = if w > 0.0 {
            let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
            let mut rows_hi = |i: usize| {
                hi = hi.max(dot(self.row(i), v));
            };
            let mut rows_lo = |i: usize| {
                lo = lo.min(dot(self.row(i), v));
            };
            let (mut count_hi, mut count_lo) = (0usize, 0usize);
            match self.kernel {
                // SAFETY: the CPU has AVX-512 F (the index's kernel); the bounds hold n_pad values.
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => unsafe {
                    extreme_rows_avx512(lower, upper, n, ext.max_lower, ext.min_upper,
                                        |i| { rows_hi(i); count_hi += 1 }, |i| { rows_lo(i); count_lo += 1 })
                },
                _ => {
                    at_least(&upper[..n], ext.max_lower, |i| { rows_hi(i); count_hi += 1 });
                    at_most(&lower[..n], ext.min_upper, |i| { rows_lo(i); count_lo += 1 });
                }
            }
            rescored += count_hi + count_lo;
            Some(Blend::new(w, lo, hi))
        } else {
            None
        };
        let map = match &blend {
            None => Some(Map::Identity),
            Some(b) => Map::linear(b, &ext, self.max_abs_prior),
        };
        let Some(map) = map else {
            // Flat blend, weight 1 or extreme values: rewrite every bound with the blend.
            let b = blend.expect("a blend");
            let hits = self.select_rewrite(&mut lower[..n], &mut upper[..n], v, k, &b, exclude);
            rescored += hits.1;
            return (hits.0, Pass::Fast { rescored });
        };

        // Excluded rows drop out of the selection (they did count for lo/hi), padding too.
        lower[n..].fill(f32::NEG_INFINITY);
        upper[n..].fill(f32::NEG_INFINITY);
        for &i in exclude {
            lower[i] = f32::NEG_INFINITY;
            upper[i] = f32::NEG_INFINITY;
        }
        let prior = &self.prior_pad[..];
        let threshold = match self.kernel {
            // SAFETY: the CPU has AVX-512 F (the index's kernel); all three hold n_pad values.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { select_avx512(lower, upper, prior, map, k, &sc.seeds, &mut sc.cands, &mut sc.gmax) },
            _ => select_portable(lower, upper, prior, map, k, &mut sc.cands, &mut sc.gmax),
        };
        // A row left out has an upper bound below the k-th best lower bound: at least k
        // allowed rows score strictly more, so ties cannot involve it.
        sc.cands.retain(|&(_, _, u)| u >= threshold);
        #[cfg(target_arch = "x86_64")]
        for &(i, _, _) in sc.cands.iter() {
            // The rows are scattered over the f32 matrix: start every fetch before the dots.
            let row = self.row(i as usize);
            for line in (0..row.len()).step_by(16) {
                // SAFETY: a prefetch of an address inside the row; never faults.
                unsafe {
                    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                    _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().add(line) as *const i8);
                }
            }
        }
        let mut hits = Vec::with_capacity(sc.cands.len());
        for &(i, _, _) in sc.cands.iter() {
            let i = i as usize;
            let s = dot(self.row(i), v);
            let score = match &blend {
                Some(b) => b.apply(s, self.prior[i]),
                None => s,
            };
            hits.push(Hit { score, pos: i as u32 });
        }
        rescored += hits.len();
        hits.sort_unstable();
        hits.truncate(k);
        hits.retain(|h| h.score > f32::NEG_INFINITY);
        (hits, Pass::Fast { rescored })
    }

    /// The general blend: every item's bounds rewritten with `Blend::apply` (monotone in s,
    /// as each f32 operation is) on the bounds clamped to [lo, hi]. Returns the hits and the
    /// rows rescored.
    #[inline(always)]
    fn select_rewrite(&self, lower: &mut [f32], upper: &mut [f32], v: &[f32], k: usize, b: &Blend, exclude: &[usize])
                      -> (Vec<Hit>, usize) {
        let n = self.n;
        if b.flat {
            for ((l, u), &pr) in lower.iter_mut().zip(upper.iter_mut()).zip(&self.prior) {
                *l = b.apply(0.0, pr);
                *u = *l;
            }
        } else {
            // Branch-free so that it vectorizes; same operations as `Blend::apply`.
            let (a, bw, lo, den) = (b.a, b.b, b.lo, b.denom);
            let hi = b.hi;
            for ((l, u), &pr) in lower.iter_mut().zip(upper.iter_mut()).zip(&self.prior) {
                let (cl, cu) = (if *l > lo { *l } else { lo }, if *u < hi { *u } else { hi });
                *l = a * ((cl - lo) / den) + bw * pr;
                *u = a * ((cu - lo) / den) + bw * pr;
            }
        }
        for &i in exclude {
            lower[i] = f32::NEG_INFINITY;
            upper[i] = f32::NEG_INFINITY;
        }
        let n_allowed = n - exclude.len(); // distinct positions (the wrapper dedupes)
        let threshold = if n_allowed <= k { f32::MIN } else { kth_largest(lower, k) };
        let mut hits = Vec::with_capacity(4 * k + 16);
        at_least(upper, threshold, |i| {
            let s = dot(self.row(i), v);
            hits.push(Hit { score: b.apply(s, self.prior[i]), pos: i as u32 });
        });
        let rescored = hits.len();
        hits.sort_unstable();
        hits.truncate(k);
        hits.retain(|h| h.score > f32::NEG_INFINITY);
        (hits, rescored)
    }

    #[inline(always)]
    fn row(&self, i: usize) -> &[f32] {
        &self.y[i * self.d..(i + 1) * self.d]
    }
}

/// A model's item factors and popularity prior, indexed for exact top-k queries.
///
/// `ScoreIndex(factors, prior, kernel=None)`: factors a C-contiguous float32 (n, d) buffer,
/// prior a float32 (n,) buffer (both copied); kernel the coarse pass's integer kernel
/// ("avx512", "avx2", "portable"; None = the best this CPU has, see `kernels()`): every
/// kernel gives the same results, the choice is for tests. `top_k(vector, k, weight=0.0, exclude=(),
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
    #[pyo3(signature = (factors, prior, kernel=None))]
    fn new(py: Python<'_>, factors: &Bound<'_, PyAny>, prior: &Bound<'_, PyAny>, kernel: Option<&str>) -> PyResult<Self> {
        let kernel = match kernel {
            None => Kernel::best(),
            Some(name) => *Kernel::ALL.iter().find(|k| k.name() == name && k.supported()).ok_or_else(|| {
                PyValueError::new_err(format!("kernel {name:?}: not one of this CPU's {:?}", Self::kernels()))
            })?,
        };
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
        let core = py.allow_threads(|| Index::build(y, n, d, prior, kernel));
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

    /// The coarse pass's integer kernel: "avx512", "avx2" or "portable".
    #[getter]
    fn kernel(&self) -> &'static str {
        self.core.kernel().name()
    }

    /// The kernels this CPU runs, best last.
    #[staticmethod]
    fn kernels() -> Vec<&'static str> {
        Kernel::ALL.iter().filter(|k| k.supported()).map(|k| k.name()).collect()
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
        let mut positions = Vec::with_capacity(exclude.len());
        for &x in &exclude {
            if x < 0 || x as usize >= n {
                return Err(PyValueError::new_err(format!("exclude position {x} outside 0..{n}")));
            }
            positions.push(x as usize);
        }
        positions.sort_unstable();
        positions.dedup();
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
