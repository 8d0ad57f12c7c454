//! Row kernels in the accumulation type (`f32`, or `f64` for `f64` data).
//!
//! Every function here works on one row of N elements that is hot in cache, and is written once,
//! generically over the accumulation type. The numerics, in short (the long form is in
//! `docs/numerics.md`):
//!
//! - **Sums** run in `LANES` independent accumulators inside blocks of `BLOCK` elements; each
//!   block's total is added into an `f64`. Rounding error therefore grows with `BLOCK / LANES`
//!   (16 additions), not with N.
//! - **Mean** is summed in `f64` lanes (`f32` data) and kept in two parts, `m_hi` (the mean rounded
//!   to the accumulation type) and `m_lo` (what that rounding dropped). Centering with both,
//!   `(x − m_hi) − m_lo`, keeps rows at mean 1e6, std 1 exact in `f32`, where a rounded mean alone
//!   would be off by up to 3% of a standard deviation. For `f64` data, `m_lo` is the mean of the
//!   residuals `x − m_hi` (exact by Sterbenz when |mean| ≫ std).
//! - **Variance** is the textbook second pass, the mean of squared centered values, never
//!   E[x²] − E[x]². Centered values are scaled by a power of two before squaring, so |x| up to
//!   ~1e38 does not overflow `f32`.
//! - **Backward** does not trust the saved mean to more than its storage precision: it recomputes
//!   the exact mean from x (in the same sweep as Σg and Σg·d), and forms c1 from those sums:
//!   c1 = (Σg·d − m_lo·Σg)/N · rstd with d = x − mean_saved and m_lo = mean − mean_saved.

// Index loops over lanes and row positions are the shape the vectorizer wants here.
#![allow(clippy::needless_range_loop)]

use num_traits::Float;

/// Independent accumulators per sum: enough for a 512-bit register of `f32`.
pub(crate) const LANES: usize = 16;
/// Elements per block before a block's lanes are folded into the `f64` total.
pub(crate) const BLOCK: usize = 256;

/// The types the row kernels compute in: `f32` and `f64`.
pub trait Real: Float + Into<f64> + Send + Sync + 'static {
    /// Whether the row mean is formed from an `f64` sum of x (true for `f32`, where that sum has
    /// 29 spare bits), rather than from the residuals of a first estimate (`f64`).
    const WIDE_MEAN: bool;
    /// Rounds an `f64` to this type.
    fn of(v: f64) -> Self;
}

impl Real for f32 {
    const WIDE_MEAN: bool = true;
    #[inline(always)]
    fn of(v: f64) -> f32 {
        v as f32
    }
}

impl Real for f64 {
    const WIDE_MEAN: bool = false;
    #[inline(always)]
    fn of(v: f64) -> f64 {
        v
    }
}

/// Sums `K` per-element quantities over `0..n`: lanes within blocks, `f64` across blocks.
#[inline(always)]
fn sums<L: Real, const K: usize>(n: usize, mut term: impl FnMut(usize) -> [L; K]) -> [f64; K] {
    let mut total = [0f64; K];
    let mut start = 0;
    while start < n {
        let end = (start + BLOCK).min(n);
        let mut acc = [[L::zero(); LANES]; K];
        let mut j = start;
        while j + LANES <= end {
            for l in 0..LANES {
                let t = term(j + l);
                for k in 0..K {
                    acc[k][l] = acc[k][l] + t[k];
                }
            }
            j += LANES;
        }
        for k in 0..K {
            total[k] += fold(acc[k]).into();
        }
        while j < end {
            let t = term(j);
            for k in 0..K {
                total[k] += t[k].into();
            }
            j += 1;
        }
        start = end;
    }
    total
}

/// Pairwise fold of the lanes (fixed order: deterministic).
#[inline(always)]
fn fold<A: Real>(mut v: [A; LANES]) -> A {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            v[l] = v[l] + v[l + w];
        }
    }
    v[0]
}

/// Largest |x| of the row (NaN is ignored here; it propagates through the sums instead).
#[inline(always)]
fn max_abs<A: Real>(x: &[A]) -> A {
    let mut m = [A::zero(); LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            m[l] = m[l].max(c[l].abs());
        }
    }
    let tail = chunks.remainder().iter().fold(A::zero(), |a, &v| a.max(v.abs()));
    m.iter().fold(tail, |a, &v| a.max(v))
}

/// The power of two `s` that brings `max_abs · s` below 2 when `max_abs` is large enough for
/// squares to overflow the accumulation type; 1 otherwise.
#[inline(always)]
fn square_scale(max_abs: f64) -> f64 {
    if max_abs.is_finite() && max_abs > 2f64.powi(40) {
        // exponent of max_abs, so that max_abs * 2^-e lies in [1, 2)
        let e = max_abs.log2().floor();
        2f64.powf(-e)
    } else {
        1.0
    }
}

/// A power of two within a factor 2 of `rstd`, so `(x − mean) · s` is of the size of x̂;
/// 1 when rstd is zero or not finite.
#[inline(always)]
fn rstd_scale(rstd: f64) -> f64 {
    if rstd.is_finite() && rstd > 0.0 {
        2f64.powf(rstd.log2().round().clamp(-120.0, 120.0))
    } else {
        1.0
    }
}

/// Per-row statistics: (mean, rstd) in `f64`, plus the split mean used for centering.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowStats<A> {
    /// The mean rounded to `A`.
    pub m_hi: A,
    /// What rounding the mean to `A` dropped: mean − m_hi.
    pub m_lo: A,
    /// The full mean, `m_hi + m_lo`, in `f64`.
    pub mean: f64,
    /// 1 / sqrt(var + eps), in `f64`.
    pub rstd: f64,
}

/// The row mean as (m_hi, m_lo, mean): see the module docs.
#[inline(always)]
fn mean<A: Real>(x: &[A]) -> (A, A, f64) {
    let nf = x.len() as f64;
    let [sum] = sums::<f64, 1>(x.len(), |j| [x[j].into()]);
    let m = sum / nf;
    let m_hi = A::of(m);
    if A::WIDE_MEAN {
        return (m_hi, A::of(m - m_hi.into()), m);
    }
    let [sd] = sums(x.len(), |j| [x[j] - m_hi]);
    let m_lo = sd / nf;
    (m_hi, A::of(m_lo), m_hi.into() + m_lo)
}

/// Mean and rstd of one row (equations (1)–(3) of `docs/math.md`), computed as the module docs say.
#[inline(always)]
pub(crate) fn stats<A: Real>(x: &[A], eps: f64) -> RowStats<A> {
    let nf = x.len() as f64;
    let (m_hi, m_lo, mean) = mean(x);
    let s = square_scale(max_abs(x).into());
    let sa = A::of(s);
    let [ss] = sums(x.len(), |j| {
        let e = ((x[j] - m_hi) - m_lo) * sa;
        [e * e]
    });
    let var = ss / nf / (s * s);
    RowStats { m_hi, m_lo, mean, rstd: 1.0 / (var + eps).sqrt() }
}

/// Forward of one row: y = (x − m_hi − m_lo) · rstd · γ + β. Returns (mean, rstd).
#[inline(always)]
pub(crate) fn forward<A: Real>(
    x: &[A],
    gamma: Option<&[A]>,
    beta: Option<&[A]>,
    y: &mut [A],
    eps: f64,
) -> (f64, f64) {
    let st = stats(x, eps);
    let r = A::of(st.rstd);
    let (m_hi, m_lo) = (st.m_hi, st.m_lo);
    match (gamma, beta) {
        (Some(g), Some(b)) => {
            for j in 0..x.len() {
                y[j] = ((x[j] - m_hi) - m_lo) * r * g[j] + b[j];
            }
        }
        (Some(g), None) => {
            for j in 0..x.len() {
                y[j] = ((x[j] - m_hi) - m_lo) * r * g[j];
            }
        }
        (None, Some(b)) => {
            for j in 0..x.len() {
                y[j] = ((x[j] - m_hi) - m_lo) * r + b[j];
            }
        }
        (None, None) => {
            for j in 0..x.len() {
                y[j] = ((x[j] - m_hi) - m_lo) * r;
            }
        }
    }
    (st.mean, st.rstd)
}

/// Backward of one row: writes dx and adds this row's dy·x̂ and dy into `dgamma` / `dbeta`.
///
/// `mean_saved` is used only to center; the exact mean is recomputed from x.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn backward<A: Real>(
    x: &[A],
    dy: &[A],
    mean_saved: f64,
    rstd: f64,
    gamma: Option<&[A]>,
    dx: &mut [A],
    dgamma: Option<&mut [A]>,
    dbeta: Option<&mut [A]>,
) {
    let n = x.len();
    let nf = n as f64;
    let s = rstd_scale(rstd);
    let (m, sa) = (A::of(mean_saved), A::of(s));
    let [sg, sgd] = match gamma {
        Some(gm) => sums(n, |j| {
            let d = (x[j] - m) * sa;
            let g = dy[j] * gm[j];
            [g, g * d]
        }),
        None => sums(n, |j| {
            let d = (x[j] - m) * sa;
            [dy[j], dy[j] * d]
        }),
    };
    // The exact mean's distance from the saved one, scaled like d.
    let m_saved: f64 = m.into();
    let m_lo = (mean(x).2 - m_saved) * s;
    let r = rstd / s;
    let c2 = sg / nf;
    let c1 = (sgd - m_lo * sg) / nf * r;
    // dx = rstd·g − rstd·c2 − x̂·(rstd·c1), x̂ = (d − m_lo)·r
    let (a, b, c) = (A::of(rstd), A::of(-rstd * c2), A::of(-rstd * c1));
    let (m_lo, r) = (A::of(m_lo), A::of(r));
    let xhat = |j: usize| ((x[j] - m) * sa - m_lo) * r;
    match gamma {
        Some(gm) => {
            for j in 0..n {
                dx[j] = a * (dy[j] * gm[j]) + b + xhat(j) * c;
            }
        }
        None => {
            for j in 0..n {
                dx[j] = a * dy[j] + b + xhat(j) * c;
            }
        }
    }
    if let Some(dg) = dgamma {
        for j in 0..n {
            dg[j] = dg[j] + dy[j] * xhat(j);
        }
    }
    if let Some(db) = dbeta {
        for j in 0..n {
            db[j] = db[j] + dy[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_and_sums_are_exact_on_integers() {
        let x: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let [s, s2] = sums(x.len(), |j| [x[j], x[j] * x[j]]);
        assert_eq!(s, 499_500.0);
        assert_eq!(s2, (0..1000u64).map(|i| i * i).sum::<u64>() as f64);
    }

    #[test]
    fn large_mean_is_exact_in_f32() {
        // mean 1e6, std ~1: f32 ulp at 1e6 is 0.0625, so a rounded mean would be off by up to 3%.
        let x: Vec<f32> = (0..1024).map(|i| 1e6 + ((i * 37 % 101) as f32 - 50.0) / 29.0).collect();
        let xf: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let (mean, rstd) = layernorm_core::reference::row_stats(&xf, 1e-5);
        let st = stats(&x, 1e-5);
        assert!((st.mean - mean).abs() < 1e-9 * mean, "{} vs {mean}", st.mean);
        assert!((st.rstd - rstd).abs() < 2e-7 * rstd, "{} vs {rstd}", st.rstd);
    }

    #[test]
    fn huge_magnitudes_do_not_overflow() {
        let x: Vec<f32> = (0..100).map(|i| if i % 2 == 0 { 3e37 } else { -1e38 }).collect();
        let xf: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let (mean, rstd) = layernorm_core::reference::row_stats(&xf, 1e-5);
        let st = stats(&x, 1e-5);
        assert!((st.mean - mean).abs() <= 1e-6 * mean.abs());
        assert!((st.rstd - rstd).abs() <= 1e-6 * rstd, "{} vs {rstd}", st.rstd);
    }

    #[test]
    fn constant_rows_normalize_to_exactly_zero() {
        for v in [0.1f32, 3.25, -1.5e6, 7e-30] {
            let x = vec![v; 1000];
            let mut y = vec![1.0f32; 1000];
            let (mean, _) = forward(&x, None, None, &mut y, 1e-12);
            assert_eq!(mean, v as f64);
            assert!(y.iter().all(|&y| y == 0.0), "{v}");
        }
    }
}
