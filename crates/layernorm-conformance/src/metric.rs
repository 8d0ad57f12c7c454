//! The comparison rule and the per-dtype tolerances: the one place they live.
//!
//! Every output is compared to the f64 reference **relative to the size of the terms that form
//! it**, the natural scale of its rounding error (the rule, with its reasoning, is in
//! `docs/conformance.md`):
//!
//! | output | error of one row (or column) | scale |
//! |---|---|---|
//! | y | max_j \|Δy\| / scale | max_j (\|x̂_j·γ_j\| + \|β_j\|) |
//! | mean | \|Δμ\| / scale | max(\|μ\|, 1/rstd) |
//! | rstd | \|Δrstd\| / rstd | |
//! | dx | max_j \|Δdx\| / scale | rstd · max_j (\|g_j\| + \|c2\| + \|x̂_j·c1\|) |
//! | dγ_j | \|Δ\| / Σ_rows \|dy\|·(\|x̂\| + 1) | |
//! | dβ_j | \|Δ\| / Σ_rows \|dy\| | |
//!
//! The reported error is the largest over rows (columns). Where the reference is not finite, the
//! backend must not be finite either (error 0 if so, ∞ if not); where it is finite, the backend
//! must be finite. A zero scale demands an exact zero.

use layernorm::DType;

/// Largest accepted error per output, for one dtype.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// y.
    pub y: f64,
    /// mean and rstd (stored in f32, or f64 for f64).
    pub stats: f64,
    /// dx.
    pub dx: f64,
    /// dγ and dβ.
    pub dparam: f64,
}

/// The tolerances of `dtype` (see `docs/conformance.md` for where each number comes from).
pub fn tolerance(dtype: DType) -> Tolerance {
    match dtype {
        // unit roundoff 6e-8: a handful of roundings in the kernel plus one on store.
        DType::F32 => Tolerance { y: 1e-6, stats: 1e-6, dx: 1e-6, dparam: 1e-5 },
        // unit roundoff 1.1e-16; the reference's own plain sums over 65536 terms stay below.
        DType::F64 => Tolerance { y: 1e-12, stats: 1e-12, dx: 1e-12, dparam: 1e-11 },
        // one storage ulp (2u): f32 math, rounded once on store. Stats are f32.
        DType::F16 | DType::BF16 => {
            let ulp = dtype.epsilon();
            Tolerance { y: ulp, stats: 1e-6, dx: ulp, dparam: ulp }
        }
        _ => Tolerance { y: 0.0, stats: 0.0, dx: 0.0, dparam: 0.0 },
    }
}

/// Error of one value against the reference: `max(0, |got − want| − allow) / scale`.
///
/// `allow` is the reference's own uncertainty (see [`ref_uncertainty`]); differences inside it
/// say nothing about the backend. Non-finite rules: a non-finite reference demands a non-finite
/// result; a reference that overflows the storage dtype demands that same infinity (rounding
/// past the dtype's maximum *is* the correctly rounded answer); otherwise the result must be
/// finite. A zero scale demands an exact match.
pub fn rel_err(dtype: DType, got: f64, want: f64, scale: f64, allow: f64) -> f64 {
    if !want.is_finite() {
        return if got.is_finite() { f64::INFINITY } else { 0.0 };
    }
    let rounded = dtype.round(want);
    if rounded.is_infinite() {
        return if got == rounded { 0.0 } else { f64::INFINITY };
    }
    if !got.is_finite() {
        return f64::INFINITY;
    }
    let d = ((got - want).abs() - allow).max(0.0);
    if d == 0.0 {
        0.0
    } else if scale > 0.0 && scale.is_finite() {
        d / scale
    } else {
        f64::INFINITY
    }
}

/// The uncertainty of the reference's x̂ in a row with mean `mean` and `rstd`: centering with a
/// mean rounded to `f64` shifts x̂ by up to ~|μ|·rstd·2⁻⁵³ (a few times that, to cover the
/// summation). Negligible next to `f32` tolerances (4e-10 at |μ|/σ = 1e6); it matters only when
/// an `f64` backend is compared at |μ| ≫ σ or on constant rows.
pub fn ref_uncertainty(mean: f64, rstd: f64) -> f64 {
    let u = f64::EPSILON / 2.0;
    let d = 4.0 * u * (1.0 + mean.abs() * rstd);
    if d.is_finite() { d } else { 0.0 }
}

/// Largest error over rows of `n` elements, each row with its own scale and allowance.
pub fn rowwise(
    dtype: DType,
    got: &[f64],
    want: &[f64],
    n: usize,
    scale: impl Fn(usize) -> f64,
    allow: impl Fn(usize) -> f64,
) -> f64 {
    let mut worst: f64 = 0.0;
    for (r, (g, w)) in got.chunks(n.max(1)).zip(want.chunks(n.max(1))).enumerate() {
        let (s, a) = (scale(r), allow(r));
        for (&g, &w) in g.iter().zip(w) {
            worst = worst.max(rel_err(dtype, g, w, s, a));
        }
    }
    worst
}

/// Largest error over elements, element `i` with scale `scale(i)` and allowance `allow(i)`.
pub fn elementwise(
    dtype: DType,
    got: &[f64],
    want: &[f64],
    scale: impl Fn(usize) -> f64,
    allow: impl Fn(usize) -> f64,
) -> f64 {
    got.iter()
        .zip(want)
        .enumerate()
        .fold(0.0, |worst: f64, (i, (&g, &w))| worst.max(rel_err(dtype, g, w, scale(i), allow(i))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonfinite_and_overflow_rules() {
        let f = DType::F32;
        assert_eq!(rel_err(f, f64::NAN, f64::NAN, 1.0, 0.0), 0.0);
        assert_eq!(rel_err(f, f64::INFINITY, f64::NAN, 1.0, 0.0), 0.0);
        assert_eq!(rel_err(f, 1.0, f64::NAN, 1.0, 0.0), f64::INFINITY);
        assert_eq!(rel_err(f, f64::NAN, 1.0, 1.0, 0.0), f64::INFINITY);
        assert_eq!(rel_err(f, 0.0, 0.0, 0.0, 0.0), 0.0);
        assert_eq!(rel_err(f, 1e-300, 0.0, 0.0, 0.0), f64::INFINITY);
        assert_eq!(rel_err(f, 1.5, 1.0, 2.0, 0.0), 0.25);
        // 1e6 is past the f16 range: the correctly rounded answer is +inf.
        assert_eq!(rel_err(DType::F16, f64::INFINITY, 1e6, 1e6, 0.0), 0.0);
        assert_eq!(rel_err(DType::F16, 65504.0, 1e6, 1e6, 0.0), f64::INFINITY);
    }

    #[test]
    fn the_allowance_is_subtracted_and_negligible_for_f32() {
        assert_eq!(rel_err(DType::F64, 1.0 + 1e-12, 1.0, 1.0, 2e-12), 0.0);
        assert!(ref_uncertainty(1e6, 1.0) < 1e-9);
        assert_eq!(ref_uncertainty(f64::NAN, 1.0), 0.0);
    }

    #[test]
    fn sixteen_bit_tolerance_is_one_storage_ulp() {
        assert_eq!(tolerance(DType::F16).y, 2f64.powi(-10));
        assert_eq!(tolerance(DType::BF16).dx, 2f64.powi(-7));
        assert_eq!(tolerance(DType::BF16).stats, 1e-6);
    }

    #[test]
    fn rowwise_uses_each_rows_scale() {
        let want = [1.0, 1.0, 100.0, 100.0];
        let got = [1.0, 1.1, 100.0, 101.0];
        assert!(
            (rowwise(DType::F64, &got, &want, 2, |r| [1.0, 100.0][r], |_| 0.0) - 0.1).abs() < 1e-12
        );
    }
}
