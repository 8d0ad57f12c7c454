//! The comparison rule, the per-dtype tolerances and the allowances derived from the inputs: the
//! one place they live.
//!
//! Every output is compared to the f64 reference **relative to the size of the terms that form
//! it**, the natural scale of its rounding error (the rule, with its reasoning, is in
//! `docs/conformance.md`):
//!
//! | output | error of one row (or column) | scale |
//! |---|---|---|
//! | h | exact: one rounded addition | |
//! | y | max_j \|Δy\| / scale | max_j (\|x̂_j·γ_e,j\| + \|β_j\|) |
//! | mean | \|Δμ\| / scale | max(\|μ\|, 1/rstd) |
//! | rstd | \|Δrstd\| / rstd | |
//! | dx | max_j \|Δdx\| / scale | max_j (rstd · (\|g_j\| + \|c2\| + \|x̂_j·c1\|) + \|dh_j\|) |
//! | dγ_j | \|Δ\| / Σ_rows \|dy\|·(\|x̂\| + 1) | |
//! | dβ_j | \|Δ\| / Σ_rows \|dy\| | |
//!
//! γ_e = γ_offset + γ is the effective scale (1 without γ), g = dy·γ_e. The reported error is
//! the largest over rows (columns). Before the division, an **allowance** is subtracted from
//! each difference: the reference's own uncertainty ([`ref_uncertainty`]), and for the backward
//! from y the error that recovering x̂ from a y rounded to the storage dtype cannot avoid
//! ([`xhat_from_y_bound`], derived in `docs/numerics.md`). Where the reference is not finite,
//! the backend must not be finite either (error 0 if so, ∞ if not); where it is finite, the
//! backend must be finite. A zero scale demands an exact zero; a nonzero one counts as at least
//! the dtype's smallest normal number, below which its spacing no longer shrinks.

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

/// The unit roundoff of `dtype`: the largest relative error of rounding to nearest, half its
/// machine epsilon (2⁻¹¹ f16, 2⁻⁸ bf16, 2⁻²⁴ f32, 2⁻⁵³ f64).
pub fn unit_roundoff(dtype: DType) -> f64 {
    dtype.epsilon() / 2.0
}

/// Error of one value against the reference: `max(0, |got − want| − allow) / scale`.
///
/// `allow` is what the comparison forgives (see [`ref_uncertainty`], [`xhat_from_y_bound`]);
/// a non-finite allowance forgives nothing. Rules, in order: a non-finite reference demands a
/// non-finite result; the correctly rounded reference (`dtype.round(want)`) is always right —
/// so a reference that overflows the storage dtype demands that same infinity, and one below
/// its smallest subnormal accepts the zero it rounds to; otherwise the result must be finite. A
/// zero scale demands an exact match. A nonzero scale counts as at least the dtype's smallest
/// normal number (`DType::min_positive_normal`): below it the dtype's spacing is absolute (a subnormal
/// step), and a tolerance relative to a smaller scale would ask for less than one step.
pub fn rel_err(dtype: DType, got: f64, want: f64, scale: f64, allow: f64) -> f64 {
    if !want.is_finite() {
        return if got.is_finite() { f64::INFINITY } else { 0.0 };
    }
    let allow = if allow.is_finite() { allow } else { 0.0 };
    // The common case first: a finite result within the allowance of a reference the dtype
    // can hold (no rounding needed to decide).
    if got.is_finite() && want.abs() <= dtype.max_finite() && (got - want).abs() <= allow {
        return 0.0;
    }
    let rounded = dtype.round(want);
    if got == rounded {
        return 0.0;
    }
    if rounded.is_infinite() || !got.is_finite() {
        return f64::INFINITY;
    }
    let d = ((got - want).abs() - allow).max(0.0);
    if d == 0.0 {
        0.0
    } else if scale > 0.0 && scale.is_finite() {
        d / scale.max(dtype.min_positive_normal())
    } else {
        f64::INFINITY
    }
}

/// The uncertainty of the reference's x̂ (on its unit scale) in a row with mean `mean`, `rstd`
/// and `spread` = max x − min x: the f64 mean is the correctly rounded one, so it is off by at
/// most min(u·|μ|, spread) (it lies between the row's extremes), which shifts x̂ by that times
/// rstd; the rest is a few roundings of u = 2⁻⁵³ (4u in all, to cover them). Negligible next to
/// `f32` tolerances (4e-10 at |μ|/σ = 1e6); it matters only when an `f64` backend is compared
/// at |μ| ≫ σ. Zero spread (a constant row) leaves only the 4u.
pub fn ref_uncertainty(mean: f64, rstd: f64, spread: f64) -> f64 {
    let u = f64::EPSILON / 2.0;
    if !(mean.is_finite() && rstd.is_finite() && spread.is_finite()) {
        // A non-finite row: the reference there is not finite, and no allowance applies.
        return 0.0;
    }
    let d = 4.0 * (u + rstd * (u * mean.abs()).min(spread));
    if d.is_finite() { d } else { 0.0 }
}

/// The bound Δ on |x̂_rec − x̂| for one element of a backward from y, beyond the centering error
/// a backward from x has as well (`docs/numerics.md`, "The backward from the output"):
///
/// Δ = u_y·(|x̂| + |β|/|γ_e|) + (5u_a + 5u)·|x̂|,  u_y = u_s + 2u_a + 3u,
///
/// with u_s the unit roundoff of the storage dtype, u_a of its accumulation type and u of the
/// f64 reference, to first order in them. The first term is y's rounding (forming x̂γ_e + β in
/// the accumulation type and storing it) seen through the division by γ_e; the second the
/// roundings of γ_e and of the recovery itself (y − β, the division or a reciprocal and a
/// product), in the backend and in the reference.
pub fn xhat_from_y_bound(dtype: DType, xhat: f64, beta: f64, gamma_eff: f64) -> f64 {
    let (us, ua, u) = (unit_roundoff(dtype), unit_roundoff(dtype.acc()), f64::EPSILON / 2.0);
    (us + 2.0 * ua + 3.0 * u) * (xhat.abs() + beta.abs() / gamma_eff.abs())
        + (5.0 * ua + 5.0 * u) * xhat.abs()
}

/// The allowance that an x̂ error bounded per element by Δ (from [`xhat_from_y_bound`])
/// carries into one dx element, exactly (not to first order): with c1 = mean(g·x̂) and
/// C = mean_k(|g_k|·Δ_k) over the row, `rstd·(|c1|·Δ_j + (|x̂_j| + Δ_j)·C)`. dβ is not affected;
/// dγ_j receives Σ_rows |dy|·Δ (summed by the caller).
pub fn dx_allowance_from_y(rstd: f64, c1: f64, big_c: f64, xhat: f64, delta: f64) -> f64 {
    rstd.abs() * (c1.abs() * delta + (xhat.abs() + delta) * big_c)
}

/// The relative error that storing `rstd` in `stats` (the statistics' dtype) adds beyond that
/// dtype's unit roundoff: 0 for every normal rstd, and up to 2⁻¹⁴⁹/rstd for an `f32` rstd in the
/// subnormal range (ε ≳ 10⁷⁶). A backward is fed the stored rstd, and dx inherits this error.
pub fn stored_rstd_excess(stats: DType, rstd: f64) -> f64 {
    if !rstd.is_finite() || rstd == 0.0 {
        return 0.0;
    }
    let stored = stats.round(rstd);
    ((stored - rstd).abs() / rstd - unit_roundoff(stats)).max(0.0)
}

/// Exactness of one tensor: 0 when every element equals the reference bit for bit as a value
/// (NaN matching NaN), else the largest relative difference (∞ where one side is not finite).
/// For h = round(x + residual): one correctly rounded addition has one right answer.
pub fn exact(got: &[f64], want: &[f64]) -> f64 {
    got.iter().zip(want).fold(0.0f64, |worst, (&g, &w)| {
        let e = if g == w || (g.is_nan() && w.is_nan()) {
            0.0
        } else if g.is_finite() && w.is_finite() {
            (g - w).abs() / w.abs().max(f64::MIN_POSITIVE)
        } else {
            f64::INFINITY
        };
        worst.max(e)
    })
}

/// How many elements outside row `skip` of two row-major tensors (rows of `n` elements, each
/// element `size` bytes) differ in their bits: the containment check of a poisoned case, whose
/// clean rows must come out exactly as they do without the poison.
pub fn rows_differing(got: &[u8], clean: &[u8], n: usize, size: usize, skip: usize) -> f64 {
    let row = (n * size).max(1);
    let bad = got
        .chunks(row)
        .zip(clean.chunks(row))
        .enumerate()
        .filter(|&(r, _)| r != skip)
        .map(|(_, (a, b))| a.chunks(size).zip(b.chunks(size)).filter(|(x, y)| x != y).count())
        .sum::<usize>();
    if got.len() == clean.len() { bad as f64 } else { f64::INFINITY }
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
    let n = n.max(1);
    elementwise(dtype, got, want, |i| scale(i / n), |i| allow(i / n))
}

/// Largest error over elements, element `i` with scale `scale(i)` and allowance `allow(i)`.
pub fn elementwise(
    dtype: DType,
    got: &[f64],
    want: &[f64],
    scale: impl Fn(usize) -> f64,
    allow: impl Fn(usize) -> f64,
) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
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
        // A scale in the subnormal range counts as the smallest normal: a one-step difference
        // of subnormal f32 values is 2^-23 of it, not 1/3.
        let step = 2f64.powi(-149);
        assert_eq!(rel_err(f, 4.0 * step, 3.0 * step, 3.0 * step, 0.0), 2f64.powi(-23));
        assert_eq!(f.min_positive_normal() * f.epsilon(), step);
        // 1e6 is past the f16 range: the correctly rounded answer is +inf.
        assert_eq!(rel_err(DType::F16, f64::INFINITY, 1e6, 1e6, 0.0), 0.0);
        assert_eq!(rel_err(DType::F16, 65504.0, 1e6, 1e6, 0.0), f64::INFINITY);
        assert_eq!(rel_err(DType::F16, f64::NEG_INFINITY, 1e6, 1e6, 0.0), f64::INFINITY);
    }

    #[test]
    fn the_correctly_rounded_answer_always_passes() {
        // 1e-150 is below the smallest f32 subnormal: 0 is its correct rounding, even where the
        // scale is 1e-150 itself.
        assert_eq!(rel_err(DType::F32, 0.0, 1e-150, 1e-150, 0.0), 0.0);
        // One subnormal step off it is one step of the smallest normal's binade.
        let f32_min = DType::F32.min_positive_normal();
        assert_eq!(rel_err(DType::F32, 1e-45, 1e-150, 1e-150, 0.0), 1e-45 / f32_min);
        assert_eq!(rel_err(DType::F64, 0.0, 1e-150, 1e-150, 0.0), 1.0);
        assert_eq!(rel_err(DType::BF16, 1.0, 1.0 + 1e-3, 1e-9, 0.0), 0.0);
    }

    #[test]
    fn the_allowance_is_subtracted_and_never_infinite() {
        assert_eq!(rel_err(DType::F64, 1.0 + 1e-12, 1.0, 1.0, 2e-12), 0.0);
        assert!(rel_err(DType::F64, 2.0, 1.0, 1.0, f64::NAN) > 0.9);
        assert!(rel_err(DType::F64, 2.0, 1.0, 1.0, f64::INFINITY) > 0.9);
        assert!(ref_uncertainty(1e6, 1.0, 10.0) < 1e-9);
        assert_eq!(ref_uncertainty(f64::NAN, 1.0, 1.0), 0.0);
        // A constant row: the reference's mean is exact, however large rstd is.
        assert_eq!(ref_uncertainty(3.0, 1e150, 0.0), 4.0 * f64::EPSILON / 2.0);
    }

    #[test]
    fn the_from_y_bound_grows_with_beta_over_gamma_and_the_storage_roundoff() {
        let b = |d, x, beta, g| xhat_from_y_bound(d, x, beta, g);
        assert!(b(DType::BF16, 1.0, 0.0, 1.0) > 2f64.powi(-8));
        assert!(b(DType::BF16, 1.0, 0.0, 1.0) < 1.01 * 2f64.powi(-8));
        let ratio = b(DType::F16, 0.0, 8.0, 0.5) / b(DType::F16, 0.0, 1.0, 1.0);
        assert!((ratio - 16.0).abs() < 1e-12);
        assert!(b(DType::F32, 2.0, 0.0, 1.0) < 20.0 * 2f64.powi(-24));
        // The dx allowance of a row with c1 = 0: only the error of c1 itself, C.
        let c = 0.5e-3;
        assert!(
            (dx_allowance_from_y(2.0, 0.0, c, 0.5, 1e-3) - 2.0 * (0.5 + 1e-3) * c).abs() < 1e-15
        );
        assert!((dx_allowance_from_y(-2.0, 0.0, c, -1.0, 0.0) - 2.0 * c).abs() < 1e-15);
        assert_eq!(dx_allowance_from_y(1.0, 3.0, 0.0, 7.0, 1e-3), 3e-3);
    }

    #[test]
    fn exactness_and_containment() {
        assert_eq!(exact(&[1.0, f64::NAN], &[1.0, f64::NAN]), 0.0);
        assert_eq!(exact(&[1.0, 2.0], &[1.0, 2.5]), 0.2);
        assert_eq!(exact(&[f64::INFINITY], &[1.0]), f64::INFINITY);
        let clean = [1u8, 2, 3, 4, 5, 6];
        assert_eq!(rows_differing(&[1, 2, 9, 9, 5, 6], &clean, 1, 2, 1), 0.0);
        assert_eq!(rows_differing(&[1, 2, 9, 9, 5, 7], &clean, 1, 2, 1), 1.0);
        assert_eq!(rows_differing(&[1, 2], &clean, 1, 2, 1), f64::INFINITY);
    }

    #[test]
    fn sixteen_bit_tolerance_is_one_storage_ulp() {
        assert_eq!(tolerance(DType::F16).y, 2f64.powi(-10));
        assert_eq!(tolerance(DType::BF16).dx, 2f64.powi(-7));
        assert_eq!(tolerance(DType::BF16).stats, 1e-6);
        assert_eq!(unit_roundoff(DType::BF16), 2f64.powi(-8));
        // A normal rstd: nothing beyond the unit roundoff; a subnormal f32 one: its spacing.
        assert_eq!(stored_rstd_excess(DType::F32, 1.0 / 3.0), 0.0);
        assert_eq!(stored_rstd_excess(DType::F64, 1e-300 / 3.0), 0.0);
        let tiny = 7.7e-41;
        let excess = stored_rstd_excess(DType::F32, tiny);
        assert!(excess > 0.0 && excess <= 2f64.powi(-150) / tiny, "{excess:e}");
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
