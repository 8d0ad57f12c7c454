//! Row kernels in the accumulation type (`f32`, or `f64` for `f64` data).
//!
//! Every function here works on one row of N elements that is hot in cache, and is written once,
//! generically over the accumulation type. The numerics, in short (the long form is in
//! `docs/numerics.md`):
//!
//! - **Sums** run in `LANES` independent accumulators inside blocks of `BLOCK` elements; each
//!   block's total is added into an `f64`. Rounding error therefore grows with `BLOCK / LANES`
//!   (16 additions), not with N.
//! - **Mean** is kept in two parts: `m_hi`, the first-pass estimate rounded to the accumulation
//!   type, and `m_lo`, the mean of the residuals `d = x − m_hi`, which are exact (Sterbenz) when
//!   |mean| ≫ std. Centering with both parts keeps rows at mean 1e6, std 1 exact in `f32`.
//! - **Variance** is the mean of squared residuals (shifted data), never E[x²] − E[x]². Residuals
//!   are scaled by a power of two before squaring, so |x| up to ~1e38 does not overflow `f32`.
//!   When the shift's correction is large next to the spread (rows constant to a few ulps), an
//!   exact third pass over `(d − m_lo)²` replaces the shifted formula.
//! - **Backward** recomputes the residual mean from x itself instead of trusting the saved,
//!   rounded mean, and forms c1 from sums it already has: c1 = (Σg·d − m_lo·Σg)/N · rstd.

use num_traits::Float;

/// Independent accumulators per sum: enough for a 512-bit register of `f32`.
pub(crate) const LANES: usize = 16;
/// Elements per block before a block's lanes are folded into the `f64` total.
pub(crate) const BLOCK: usize = 256;

/// The types the row kernels compute in: `f32` and `f64`.
pub trait Real: Float + Into<f64> + Send + Sync + 'static {
    /// Rounds an `f64` to this type.
    fn of(v: f64) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn of(v: f64) -> f32 {
        v as f32
    }
}

impl Real for f64 {
    #[inline(always)]
    fn of(v: f64) -> f64 {
        v
    }
}

/// Sums `K` per-element quantities over `0..n`: lanes within blocks, `f64` across blocks.
#[inline(always)]
fn sums<A: Real, const K: usize>(n: usize, mut term: impl FnMut(usize) -> [A; K]) -> [f64; K] {
    let mut total = [0f64; K];
    let mut start = 0;
    while start < n {
        let end = (start + BLOCK).min(n);
        let mut acc = [[A::zero(); LANES]; K];
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
    /// First-pass mean, rounded to `A`.
    pub m_hi: A,
    /// Mean of the residuals `x − m_hi`.
    pub m_lo: A,
    /// The full mean, `m_hi + m_lo`, in `f64`.
    pub mean: f64,
    /// 1 / sqrt(var + eps), in `f64`.
    pub rstd: f64,
}

/// Mean and rstd of one row (equations (1)–(3) of `docs/math.md`), computed as the module docs say.
#[inline(always)]
pub(crate) fn stats<A: Real>(x: &[A], eps: f64) -> RowStats<A> {
    let n = x.len();
    let nf = n as f64;
    let mx: f64 = max_abs(x).into();
    let [mut sum] = sums(n, |j| [x[j]]);
    let s = square_scale(mx);
    if !sum.is_finite() && mx.is_finite() {
        // Block sums overflowed (|x| > ~1e36 in f32): sum the scaled row instead.
        let sa = A::of(s);
        let [scaled] = sums(n, |j| [x[j] * sa]);
        sum = scaled / s;
    }
    let m_hi = A::of(sum / nf);
    let sa = A::of(s);
    let [sd, sdd] = sums(n, |j| {
        let d = x[j] - m_hi;
        let ds = d * sa;
        [d, ds * ds]
    });
    let m_lo = sd / nf;
    let m_lo_a = A::of(m_lo);
    let shifted = sdd / nf / (s * s) - m_lo * m_lo;
    let var = if m_lo * m_lo > shifted.abs() * 2f64.powi(-8) && shifted.is_finite() {
        // The shift's correction dominates the spread: exact pass on the centered residuals.
        let mls = A::of(m_lo * s);
        let [ss] = sums(n, |j| {
            let e = (x[j] - m_hi) * sa - mls;
            [e * e]
        });
        ss / nf / (s * s)
    } else {
        shifted
    };
    let var = var.max(0.0);
    RowStats { m_hi, m_lo: m_lo_a, mean: m_hi.into() + m_lo, rstd: 1.0 / (var + eps).sqrt() }
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
/// `mean` is used only to center; the residual mean is recomputed from x.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn backward<A: Real>(
    x: &[A],
    dy: &[A],
    mean: f64,
    rstd: f64,
    gamma: Option<&[A]>,
    dx: &mut [A],
    dgamma: Option<&mut [A]>,
    dbeta: Option<&mut [A]>,
) {
    let n = x.len();
    let nf = n as f64;
    let s = rstd_scale(rstd);
    let (m, sa) = (A::of(mean), A::of(s));
    let [sd, sg, sgd] = match gamma {
        Some(gm) => sums(n, |j| {
            let d = (x[j] - m) * sa;
            let g = dy[j] * gm[j];
            [d, g, g * d]
        }),
        None => sums(n, |j| {
            let d = (x[j] - m) * sa;
            [d, dy[j], dy[j] * d]
        }),
    };
    let m_lo = sd / nf;
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
