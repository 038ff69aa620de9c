//! The ALS fold-in of one user (services/model/als.py `FoldIn`): the module's equation
//! `(B + Σ (c_i - 1) y_i y_iᵀ) x = Σ c_i y_i`, B = YᵀY + λI the part shared by every user,
//! y_i the factors of the user's items and c_i their confidences, in f64.
//!
//! B⁻¹ is computed once per model, so a user's system is a low-rank update of it
//! (Woodbury): with z_i = B⁻¹ y_i and x0 = Σ c_i z_i = B⁻¹b, only the m items whose
//! c_i != 1 change the matrix, and
//!     x = x0 - Σ s_a z_a,   (D⁻¹ + [y_a · z_b]) s = [y_a · x0],   D = diag(c_a - 1),
//! an m x m system (m = the user's recent items, a few dozen at most) instead of a k x k
//! factorization per request: m matrix-vector products and an m x m Cholesky, all on
//! contiguous rows. numpy + LAPACK took ~28 µs per call for k = 64 on this VM (the ~10
//! Python-level calls around a 64 x 64 solve). A confidence below 1 can make the small
//! system indefinite: it is refused and the caller solves the full system by LU.

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Σ x_i y_i in 8 independent lanes (a single running sum is a chain of dependent adds).
#[inline(always)]
fn dot(x: &[f64], y: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: f64 = xc.remainder().iter().zip(yc.remainder()).map(|(a, b)| a * b).sum();
    for (a, b) in xc.zip(yc) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}

/// A = UᵀU in place for a symmetric positive definite A (upper triangle, row-major k x k):
/// LAPACK dpotf2's order (the pivot's square root, the row scaled by its reciprocal, a
/// rank-1 update of the trailing rows). False when A is not positive definite.
#[inline(always)]
fn factor(a: &mut [f64], k: usize) -> bool {
    for j in 0..k {
        let (head, tail) = a.split_at_mut((j + 1) * k);
        let rj = &mut head[j * k..];
        let d = rj[j];
        if !(d > 0.0) {
            return false;
        }
        let ujj = d.sqrt();
        rj[j] = ujj;
        let inv = 1.0 / ujj;
        for x in &mut rj[j + 1..] {
            *x *= inv;
        }
        for i in j + 1..k {
            let f = rj[i];
            let ri = &mut tail[(i - j - 1) * k..(i - j) * k];
            for (x, &u) in ri[i..].iter_mut().zip(&rj[i..]) {
                *x -= f * u;
            }
        }
    }
    true
}

/// UᵀU x = b in place (x in b), U from `factor`.
#[inline(always)]
fn solve_factored(u: &[f64], b: &mut [f64], k: usize) {
    for i in 0..k {
        let zi = b[i] / u[i * k + i];
        b[i] = zi;
        for (bm, &v) in b[i + 1..].iter_mut().zip(&u[i * k + i + 1..(i + 1) * k]) {
            *bm -= v * zi;
        }
    }
    for i in (0..k).rev() {
        let s = dot(&u[i * k + i + 1..(i + 1) * k], &b[i + 1..]);
        b[i] = (b[i] - s) / u[i * k + i];
    }
}

/// B⁻¹ (row-major k x k) of a symmetric positive definite B, or None.
fn inverse(base: &[f64], k: usize) -> Option<Vec<f64>> {
    let mut u = base.to_vec();
    if !factor(&mut u, k) {
        return None;
    }
    let mut inv = vec![0f64; k * k];
    let mut col = vec![0f64; k];
    for j in 0..k {
        col.fill(0.0);
        col[j] = 1.0;
        solve_factored(&u, &mut col, k);
        for i in 0..k {
            inv[i * k + j] = col[i];
        }
    }
    // Exactly symmetric (the two triangles differ by rounding otherwise).
    for i in 0..k {
        for j in i + 1..k {
            let m = 0.5 * (inv[i * k + j] + inv[j * k + i]);
            inv[i * k + j] = m;
            inv[j * k + i] = m;
        }
    }
    Some(inv)
}

/// The fold-in (see the module's header), or None when the small system is not
/// positive definite.
#[inline(always)]
fn fold_in(y: &[f32], binv: &[f64], k: usize, positions: &[usize], conf: &[f64]) -> Option<Vec<f64>> {
    let n = positions.len();
    let mut ys = vec![0f64; n * k];
    let mut zs = vec![0f64; n * k];
    let mut x = vec![0f64; k];
    for (a, (&p, &c)) in positions.iter().zip(conf).enumerate() {
        let ya = &mut ys[a * k..(a + 1) * k];
        for (r, &v) in ya.iter_mut().zip(&y[p * k..(p + 1) * k]) {
            *r = v as f64;
        }
        // z = B⁻¹ y = Σ_j y_j B⁻¹[j, :] (B⁻¹ symmetric): k contiguous axpys.
        let za = &mut zs[a * k..(a + 1) * k];
        for (j, &yj) in ya.iter().enumerate() {
            for (z, &bij) in za.iter_mut().zip(&binv[j * k..(j + 1) * k]) {
                *z += yj * bij;
            }
        }
        for (xi, &zi) in x.iter_mut().zip(za.iter()) {
            *xi += c * zi;
        }
    }
    let upd: Vec<usize> = (0..n).filter(|&a| conf[a] != 1.0).collect();
    let m = upd.len();
    if m == 0 {
        return Some(x);
    }
    let mut small = vec![0f64; m * m];
    let mut s = vec![0f64; m];
    for (ia, &a) in upd.iter().enumerate() {
        let ya = &ys[a * k..(a + 1) * k];
        for (ib, &b) in upd.iter().enumerate().skip(ia) {
            small[ia * m + ib] = dot(ya, &zs[b * k..(b + 1) * k]);
        }
        small[ia * m + ia] += 1.0 / (conf[a] - 1.0);
        s[ia] = dot(ya, &x);
    }
    if !factor(&mut small, m) {
        return None;
    }
    solve_factored(&small, &mut s, m);
    for (&a, &sa) in upd.iter().zip(&s) {
        for (xi, &zi) in x.iter_mut().zip(&zs[a * k..(a + 1) * k]) {
            *xi -= sa * zi;
        }
    }
    Some(x)
}

/// `fold_in` compiled for the widest vectors this CPU has (LLVM vectorizes its loops 2, 4
/// or 8 doubles wide); nothing here needs a fixed summation order.
fn fold_in_best(y: &[f32], binv: &[f64], k: usize, positions: &[usize], conf: &[f64]) -> Option<Vec<f64>> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX-512F and FMA (checked just above).
            return unsafe { fold_in_avx512(y, binv, k, positions, conf) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { fold_in_avx2(y, binv, k, positions, conf) };
        }
    }
    fold_in(y, binv, k, positions, conf)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn fold_in_avx512(y: &[f32], binv: &[f64], k: usize, positions: &[usize], conf: &[f64]) -> Option<Vec<f64>> {
    fold_in(y, binv, k, positions, conf)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fold_in_avx2(y: &[f32], binv: &[f64], k: usize, positions: &[usize], conf: &[f64]) -> Option<Vec<f64>> {
    fold_in(y, binv, k, positions, conf)
}

/// One model's item factors and B⁻¹, for fold-ins.
///
/// `FoldSolver(factors, base)`: factors a C-contiguous float32 (n, k) buffer, held (not
/// copied: the model's 2.56 MB for 10,000 x 64 are not duplicated; the model never
/// writes to it, and `solve` reads it holding the GIL, so no Python code writes meanwhile),
/// base the float64 (k, k) B = YᵀY + λI (inverted here; ValueError when it is not
/// positive definite). `solve(out, positions, confidences)` writes the user's factors
/// (float32) into `out` and returns True, or False when the update is not positive
/// definite (a confidence below 1; nothing written).
#[pyclass(module = "streams._native", frozen)]
pub struct FoldSolver {
    y: PyBuffer<f32>,
    n: usize,
    k: usize,
    binv: Vec<f64>,
}

#[pymethods]
impl FoldSolver {
    #[new]
    fn new(py: Python<'_>, factors: &Bound<'_, PyAny>, base: &Bound<'_, PyAny>) -> PyResult<Self> {
        let fb = PyBuffer::<f32>::get_bound(factors)?;
        let bb = PyBuffer::<f64>::get_bound(base)?;
        if fb.dimensions() != 2 || !fb.is_c_contiguous() {
            return Err(PyValueError::new_err("factors: need a C-contiguous float32 (n, k) array"));
        }
        let (n, k) = (fb.shape()[0], fb.shape()[1]);
        if bb.dimensions() != 2 || !bb.is_c_contiguous() || bb.shape() != [k, k] {
            return Err(PyValueError::new_err(format!("base: need a C-contiguous float64 ({k}, {k}) array")));
        }
        let base = bb.to_vec(py)?;
        let binv = inverse(&base, k).ok_or_else(|| PyValueError::new_err("base is not positive definite"))?;
        Ok(FoldSolver { y: fb, n, k, binv })
    }

    #[getter]
    fn k(&self) -> usize {
        self.k
    }

    fn solve(&self, py: Python<'_>, out: &Bound<'_, PyAny>, positions: Vec<i64>, confidences: Vec<f64>)
             -> PyResult<bool> {
        let ob = PyBuffer::<f32>::get_bound(out)?;
        if ob.readonly() || ob.item_count() != self.k || !ob.is_c_contiguous() {
            return Err(PyValueError::new_err(format!("out: need a writable float32 array of {} values", self.k)));
        }
        if positions.len() != confidences.len() {
            return Err(PyValueError::new_err(format!(
                "{} positions for {} confidences", positions.len(), confidences.len())));
        }
        let mut pos = Vec::with_capacity(positions.len());
        for &p in &positions {
            if p < 0 || p as usize >= self.n {
                return Err(PyValueError::new_err(format!("position {p} outside 0..{}", self.n)));
            }
            pos.push(p as usize);
        }
        // SAFETY: a C-contiguous f32 buffer of n * k items, kept alive by `self.y`; read
        // with the GIL held (a few µs), so no Python code writes to it meanwhile.
        let y = unsafe { std::slice::from_raw_parts(self.y.buf_ptr() as *const f32, self.n * self.k) };
        match fold_in_best(y, &self.binv, self.k, &pos, &confidences) {
            Some(x) => {
                let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
                ob.copy_from_slice(py, &x32)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}
