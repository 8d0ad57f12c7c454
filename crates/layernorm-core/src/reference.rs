//! The f64 reference: the oracle every backend is held to.
//!
//! It follows `docs/math.md` line by line, in `f64`, with no shortcut: mean, then a second pass for
//! the variance, rstd, x̂, y (RMSNorm: the mean square, r, x̂ = x·r, y); and for the backward x̂
//! again from the saved statistics (or from y), then g = dy·(γ_offset + γ), c1 = mean(g·x̂),
//! c2 = mean(g) (0 for RMSNorm), dx = rstd·(g − c2 − x̂·c1), dγ = Σ dy·x̂, dβ = Σ dy. The
//! variants are compositions of the same functions: the residual forward is the forward of the
//! rounded h, the backward from y the same gradients from a recovered x̂, dh an added term.
//! Sums are plain left-to-right loops: the reference must be obviously right, not fast. The one
//! concession is the row sum behind the mean, which is compensated (Neumaier), so that μ is the
//! correctly rounded mean even at |μ| ≫ σ; every backend is then compared against a mean no
//! worse than `f64` rounding of the true one.
//!
//! Inputs are `f64`. Backends are compared on the same inputs rounded to their storage dtype and
//! widened back, so the reference sees exactly what the backend sees. For inputs representable in
//! `f32` (|x| < 3.4e38) no intermediate overflows in `f64`.

use crate::{Error, NormKind, NormSpec, Result};

/// Outputs of the reference forward.
#[derive(Clone, Debug, PartialEq)]
pub struct RefForward {
    /// y, rows × N.
    pub y: Vec<f64>,
    /// Per-row mean μ (LayerNorm); `None` for RMSNorm, which has none.
    pub mean: Option<Vec<f64>>,
    /// Per-row rstd: 1/√(σ² + ε) (LayerNorm), 1/√(mean(x²) + ε) (RMSNorm).
    pub rstd: Vec<f64>,
}

/// Outputs of the reference backward.
#[derive(Clone, Debug, PartialEq)]
pub struct RefBackward {
    /// dx, rows × N (plus dh when given: then it is also the residual's gradient).
    pub dx: Vec<f64>,
    /// dγ (N), when the problem has γ.
    pub dgamma: Option<Vec<f64>>,
    /// dβ (N), when the problem has β.
    pub dbeta: Option<Vec<f64>>,
}

fn check_len(tensor: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected { Ok(()) } else { Err(Error::ShapeMismatch { tensor, expected, got }) }
}

fn check_param(tensor: &'static str, p: Option<&[f64]>, wanted: bool, n: usize) -> Result<()> {
    match (p, wanted) {
        (Some(p), true) => check_len(tensor, p.len(), n),
        (None, false) => Ok(()),
        (p, _) => Err(Error::ParameterMismatch { tensor, passed: p.is_some() }),
    }
}

/// The effective scale of column `j`: γ_offset + γ_j, or 1 without γ (equation (13)). The offset
/// is the one the backends add, rounded to the accumulation type ([`NormSpec::gamma_offset_acc`]):
/// like the inputs, rounded to the storage type, the reference sees what a backend sees.
fn scale(spec: &NormSpec, gamma: Option<&[f64]>, j: usize) -> f64 {
    gamma.map_or(1.0, |g| spec.gamma_offset_acc() + g[j])
}

/// A power of two s that brings the largest |x| of a finite row into [1, 2) (1 for a zero row):
/// statistics taken of x·s are exact rescalings of those of x (only exponents change), and no
/// square overflows or flushes to zero, whatever the magnitude of x.
fn pow2_scale(x: &[f64]) -> f64 {
    let max = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    if max > 0.0 && max.is_finite() {
        2f64.powi(-(max.log2().floor() as i32).clamp(-1000, 1000))
    } else {
        1.0
    }
}

/// 1/√(v + ε) from v·s² (`vs`) and the scale s of [`pow2_scale`]: s/√(v·s² + ε·s²), the same
/// value, exact in scaling. A zero v (a constant row) is 1/√ε itself; where ε·s² overflows (rows
/// of tiny magnitude) v is below ε by more than `f64`'s precision, and 1/√ε is again the
/// correctly rounded answer. (Where ε·s² is subnormal and v is not zero, v ≥ 2⁻¹¹⁰ or so dwarfs
/// it: the scaled values' nonzero deviations are at least an ulp of numbers near 1.)
fn rstd_scaled(vs: f64, eps: f64, s: f64) -> f64 {
    let es = eps * s * s;
    if vs == 0.0 || !es.is_finite() { 1.0 / eps.sqrt() } else { s / (vs + es).sqrt() }
}

/// Statistics of one LayerNorm row: (μ, rstd), equations (1)–(3) of `docs/math.md`. Taken of
/// x·s (a power-of-two scale) so that no sum or square overflows, even for `f64` rows near `f64::MAX`.
pub fn row_stats(x: &[f64], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let s = pow2_scale(x);
    // Neumaier's compensated sum: `comp` collects the low-order bits each addition drops.
    let (mut sum, mut comp) = (0.0f64, 0.0f64);
    for &v in x {
        let v = v * s;
        let t = sum + v;
        comp += if sum.abs() >= v.abs() { (sum - t) + v } else { (v - t) + sum };
        sum = t;
    }
    let mut mean_s = (sum + comp) / n;
    // One refinement step, μ += mean(x − μ): the residuals are exact where it matters (|μ| ≫ σ,
    // Sterbenz), so a μ whose division rounded (a constant row whose sum is not representable)
    // becomes the row's value itself, and the variance of a constant row exactly 0.
    mean_s += x.iter().map(|&v| v * s - mean_s).sum::<f64>() / n;
    let mut ss = 0.0;
    for &v in x {
        ss += (v * s - mean_s) * (v * s - mean_s);
    }
    (mean_s / s, rstd_scaled(ss / n, eps, s))
}

/// The rstd of one RMSNorm row, r = 1/√(mean(x²) + ε), equation (10) of `docs/math.md`, taken
/// of x·s (a power-of-two scale): no square overflows even for `f64` inputs near `f64::MAX`.
pub fn rms_row_rstd(x: &[f64], eps: f64) -> f64 {
    // A NaN or infinite element makes the row NaN, as it does the LayerNorm statistics.
    if x.iter().any(|v| !v.is_finite()) {
        return f64::NAN;
    }
    let s = pow2_scale(x);
    let ms = x.iter().map(|&v| (v * s) * (v * s)).sum::<f64>() / x.len() as f64;
    rstd_scaled(ms, eps, s)
}

/// The reference forward: y = x̂·(γ_offset + γ) + β with x̂ = (x − μ)·rstd (LayerNorm) or x·rstd
/// (RMSNorm), row by row.
pub fn forward(
    spec: &NormSpec,
    x: &[f64],
    gamma: Option<&[f64]>,
    beta: Option<&[f64]>,
) -> Result<RefForward> {
    spec.validate()?;
    check_len("x", x.len(), spec.numel())?;
    check_param("gamma", gamma, spec.gamma, spec.n)?;
    check_param("beta", beta, spec.beta, spec.n)?;
    let n = spec.n;
    let mut y = vec![0.0; x.len()];
    let mut mean = vec![0.0; spec.rows];
    let mut rstd = vec![0.0; spec.rows];
    for r in 0..spec.rows {
        let row = &x[r * n..(r + 1) * n];
        let (mu, rs) = match spec.kind {
            NormKind::LayerNorm => row_stats(row, spec.eps),
            NormKind::RmsNorm => (0.0, rms_row_rstd(row, spec.eps)),
        };
        mean[r] = mu;
        rstd[r] = rs;
        for j in 0..n {
            let xhat = (row[j] - mu) * rs;
            let b = beta.map_or(0.0, |b| b[j]);
            y[r * n + j] = xhat * scale(spec, gamma, j) + b;
        }
    }
    Ok(RefForward { y, mean: spec.has_mean().then_some(mean), rstd })
}

/// The reference of the fused residual forward (equation (14)): h = x + residual rounded once to
/// the storage dtype, then [`forward`] of h. Returns (h, the forward of h).
pub fn forward_residual(
    spec: &NormSpec,
    x: &[f64],
    residual: &[f64],
    gamma: Option<&[f64]>,
    beta: Option<&[f64]>,
) -> Result<(Vec<f64>, RefForward)> {
    spec.validate()?;
    check_len("x", x.len(), spec.numel())?;
    check_len("residual", residual.len(), spec.numel())?;
    let h: Vec<f64> = x.iter().zip(residual).map(|(a, b)| spec.dtype.round(a + b)).collect();
    let out = forward(spec, &h, gamma, beta)?;
    Ok((h, out))
}

/// The reference backward from x and the saved statistics (`mean` for LayerNorm, `None` for
/// RMSNorm), equations (8)–(9) and (12).
pub fn backward(
    spec: &NormSpec,
    x: &[f64],
    dy: &[f64],
    mean: Option<&[f64]>,
    rstd: &[f64],
    gamma: Option<&[f64]>,
) -> Result<RefBackward> {
    spec.validate()?;
    check_len("x", x.len(), spec.numel())?;
    check_param("mean", mean, spec.has_mean(), spec.rows)?;
    let mean = mean.unwrap_or(&[]);
    let n = spec.n;
    let xhat = |r: usize, j: usize| (x[r * n + j] - mean.get(r).copied().unwrap_or(0.0)) * rstd[r];
    backward_from_xhat(spec, xhat, dy, rstd, gamma)
}

/// The reference backward from the forward's output (equation (16)): x̂ = (y − β)/(γ_offset + γ),
/// then the same gradients as [`backward`]. [`Error::SingularGamma`] where γ_offset + γ = 0.
pub fn backward_from_output(
    spec: &NormSpec,
    y: &[f64],
    dy: &[f64],
    rstd: &[f64],
    gamma: Option<&[f64]>,
    beta: Option<&[f64]>,
) -> Result<RefBackward> {
    spec.validate()?;
    check_len("y", y.len(), spec.numel())?;
    check_param("beta", beta, spec.beta, spec.n)?;
    check_param("gamma", gamma, spec.gamma, spec.n)?;
    if let Some(g) = gamma
        && let Some(column) = (0..spec.n).find(|&j| scale(spec, gamma, j) == 0.0)
    {
        return Err(Error::SingularGamma { column, gamma: g[column], offset: spec.gamma_offset });
    }
    let n = spec.n;
    let xhat =
        |r: usize, j: usize| (y[r * n + j] - beta.map_or(0.0, |b| b[j])) / scale(spec, gamma, j);
    backward_from_xhat(spec, xhat, dy, rstd, gamma)
}

/// dx + dh: the gradient of x and of the residual, for a fused residual block (equation (15)).
pub fn add_dh(mut bwd: RefBackward, dh: &[f64]) -> Result<RefBackward> {
    check_len("dh", dh.len(), bwd.dx.len())?;
    bwd.dx.iter_mut().zip(dh).for_each(|(d, h)| *d += h);
    Ok(bwd)
}

/// The gradients from x̂ (`xhat(r, j)`), dy and rstd: g = dy·(γ_offset + γ), c1 = mean(g·x̂),
/// c2 = mean(g) (LayerNorm) or 0 (RMSNorm), dx = rstd·(g − c2 − x̂·c1), dγ = Σ dy·x̂, dβ = Σ dy.
/// `len` zeros written out rather than mapped from the zero page: an accumulator read before it
/// is written would fault every page twice (the second a copy-on-write of the shared zero page,
/// with a TLB shootdown on every core the process runs on), which dominated the reference's time
/// on rows of 2^24 elements.
fn written_zeros(len: usize) -> Vec<f64> {
    let mut v = Vec::new();
    v.resize(len, 0.0);
    v
}

fn backward_from_xhat(
    spec: &NormSpec,
    xhat_at: impl Fn(usize, usize) -> f64,
    dy: &[f64],
    rstd: &[f64],
    gamma: Option<&[f64]>,
) -> Result<RefBackward> {
    check_len("dy", dy.len(), spec.numel())?;
    check_len("rstd", rstd.len(), spec.rows)?;
    check_param("gamma", gamma, spec.gamma, spec.n)?;
    let n = spec.n;
    let nf = n as f64;
    let mut dx = vec![0.0; dy.len()];
    let mut dgamma = written_zeros(n);
    let mut dbeta = written_zeros(n);
    let mut xhat = vec![0.0; n];
    let mut g = vec![0.0; n];
    for r in 0..spec.rows {
        let dyr = &dy[r * n..(r + 1) * n];
        let rs = rstd[r];
        let (mut c1, mut c2) = (0.0, 0.0);
        for j in 0..n {
            xhat[j] = xhat_at(r, j);
            g[j] = dyr[j] * scale(spec, gamma, j);
            c1 += g[j] * xhat[j];
            c2 += g[j];
        }
        c1 /= nf;
        c2 = if spec.has_mean() { c2 / nf } else { 0.0 };
        for j in 0..n {
            dx[r * n + j] = rs * (g[j] - c2 - xhat[j] * c1);
            dgamma[j] += dyr[j] * xhat[j];
            dbeta[j] += dyr[j];
        }
    }
    Ok(RefBackward { dx, dgamma: spec.gamma.then_some(dgamma), dbeta: spec.beta.then_some(dbeta) })
}

/// The full Jacobian ∂x̂_k/∂x_j of one row of `kind`, as a row-major N × N matrix indexed
/// `[k * N + j]`: equation (7) of `docs/math.md` for LayerNorm, `rstd/N · (N·δ_kj − 1 − x̂_k·x̂_j)`,
/// and equation (11) for RMSNorm, `r/N · (N·δ_kj − x̂_k·x̂_j)`.
///
/// Used by tests to check the closed-form dx, which never forms this matrix.
pub fn xhat_jacobian(kind: NormKind, x: &[f64], eps: f64) -> Vec<f64> {
    let n = x.len();
    let (mean, rstd, centred) = match kind {
        NormKind::LayerNorm => {
            let (m, r) = row_stats(x, eps);
            (m, r, 1.0)
        }
        NormKind::RmsNorm => (0.0, rms_row_rstd(x, eps), 0.0),
    };
    let xhat: Vec<f64> = x.iter().map(|&v| (v - mean) * rstd).collect();
    let mut jac = vec![0.0; n * n];
    for k in 0..n {
        for j in 0..n {
            let delta = if k == j { n as f64 } else { 0.0 };
            jac[k * n + j] = rstd / n as f64 * (delta - centred - xhat[k] * xhat[j]);
        }
    }
    jac
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn hand_computed_row() {
        // x = [1, 2, 3]: μ = 2, σ² = 2/3, rstd = 1/sqrt(2/3 + eps).
        let spec = NormSpec::layer_norm(1, 3, DType::F64).with_eps(1e-5).with_affine(false);
        let out = forward(&spec, &[1.0, 2.0, 3.0], None, None).unwrap();
        let rstd = 1.0 / (2.0f64 / 3.0 + 1e-5).sqrt();
        assert_eq!(out.mean, Some(vec![2.0]));
        assert!((out.rstd[0] - rstd).abs() < 1e-15);
        assert!(
            (out.y[0] + rstd).abs() < 1e-15 && out.y[1] == 0.0 && (out.y[2] - rstd).abs() < 1e-15
        );
    }

    #[test]
    fn rejects_bad_arguments() {
        let spec = NormSpec::layer_norm(1, 2, DType::F64);
        let x = [1.0, 2.0];
        assert_eq!(
            forward(&spec, &x, None, Some(&x)).unwrap_err(),
            Error::ParameterMismatch { tensor: "gamma", passed: false }
        );
        assert_eq!(
            forward(&spec, &x, Some(&x[..1]), Some(&x)).unwrap_err(),
            Error::ShapeMismatch { tensor: "gamma", expected: 2, got: 1 }
        );
        assert_eq!(
            backward(&spec.clone().with_affine(false), &x, &x, Some(&[0.0, 0.0]), &[1.0], None)
                .unwrap_err(),
            Error::ShapeMismatch { tensor: "mean", expected: 1, got: 2 }
        );
        let rms = NormSpec::rms_norm(1, 2, DType::F64).with_gamma(false);
        assert_eq!(
            backward(&rms, &x, &x, Some(&[0.0]), &[1.0], None).unwrap_err(),
            Error::ParameterMismatch { tensor: "mean", passed: true }
        );
        let g = [1.0, -1.0];
        let one = spec.with_beta(false).with_gamma_offset(1.0);
        assert_eq!(
            backward_from_output(&one, &x, &x, &[1.0], Some(&g), None).unwrap_err(),
            Error::SingularGamma { column: 1, gamma: -1.0, offset: 1.0 }
        );
    }

    #[test]
    fn rms_hand_computed_row() {
        // x = [3, 4]: mean(x²) = 12.5, r = 1/√(12.5 + ε); no mean is saved.
        let spec = NormSpec::rms_norm(1, 2, DType::F64).with_gamma(false).with_eps(1e-6);
        let out = forward(&spec, &[3.0, 4.0], None, None).unwrap();
        let r = 1.0 / (12.5f64 + 1e-6).sqrt();
        assert_eq!(out.mean, None);
        assert!((out.rstd[0] - r).abs() < 1e-16);
        assert!((out.y[0] - 3.0 * r).abs() < 1e-15 && (out.y[1] - 4.0 * r).abs() < 1e-15);
        // All zeros: r = 1/√ε and y = β.
        let spec = NormSpec::rms_norm(1, 3, DType::F64).with_beta(true);
        let out = forward(&spec, &[0.0; 3], Some(&[2.0; 3]), Some(&[0.5, 1.0, 1.5])).unwrap();
        assert_eq!(out.rstd[0], 1.0 / 1e-6f64.sqrt());
        assert_eq!(out.y, vec![0.5, 1.0, 1.5]);
    }

    #[test]
    fn rms_squares_never_overflow() {
        let x = [1e300, -3e300, 2e300];
        let want = 1.0 / ((1.0f64 + 9.0 + 4.0) / 3.0).sqrt() * 1e-300;
        let r = rms_row_rstd(&x, 1e-6);
        assert!((r - want).abs() <= 1e-15 * want, "{r} vs {want}");
        assert!(rms_row_rstd(&[1.0, f64::INFINITY], 1e-6).is_nan());
        assert!(rms_row_rstd(&[1.0, f64::NAN], 1e-6).is_nan());
    }

    #[test]
    fn layer_norm_statistics_never_overflow() {
        // The same row at 2^-996 and 2^996 times: μ scales exactly, rstd inversely (ε negligible).
        let x = [1.0, -3.0, 2.0, 0.5];
        let (m, r) = row_stats(&x, 1e-300);
        let big: Vec<f64> = x.iter().map(|v| v * 2f64.powi(996)).collect();
        let (mb, rb) = row_stats(&big, 1e-300);
        assert_eq!((mb, rb), (m * 2f64.powi(996), r * 2f64.powi(-996)));
        assert!(row_stats(&[f64::MAX, -f64::MAX], 1e-5).1.is_finite());
    }

    #[test]
    fn constant_rows_have_their_value_as_mean_and_no_variance() {
        // Values whose sum of 7 copies is not representable: the mean must still be the value.
        for v in [0.1, 1.0 / 3.0, -944328.625, 7.000000000000001, 1e-300] {
            let (m, r) = row_stats(&[v; 7], 1e-300);
            assert_eq!(m, v, "{v}");
            assert_eq!(r, 1e150, "{v}");
        }
    }

    #[test]
    fn the_variants_compose_the_plain_functions() {
        let spec = NormSpec::layer_norm(2, 3, DType::F32).with_gamma_offset(1.0);
        let x = [1.0, 2.0, 4.0, -1.0, 0.5, 0.25];
        let r = [0.5, 0.25, 0.125, 1.0, 1.0, 1.0];
        let (g, b) = ([0.5, -0.25, 0.0], [0.1, 0.2, 0.3]);
        let (h, fwd) = forward_residual(&spec, &x, &r, Some(&g), Some(&b)).unwrap();
        assert_eq!(h, vec![1.5, 2.25, 4.125, 0.0, 1.5, 1.25]);
        assert_eq!(fwd, forward(&spec, &h, Some(&g), Some(&b)).unwrap());
        let dy = [1.0, -2.0, 0.5, 0.25, 3.0, -1.0];
        let mean = fwd.mean.as_deref();
        let from_x = backward(&spec, &h, &dy, mean, &fwd.rstd, Some(&g)).unwrap();
        let from_y =
            backward_from_output(&spec, &fwd.y, &dy, &fwd.rstd, Some(&g), Some(&b)).unwrap();
        for (a, b) in from_x.dx.iter().zip(&from_y.dx) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        let with_dh = add_dh(from_x.clone(), &dy).unwrap();
        assert_eq!(with_dh.dx[1], from_x.dx[1] - 2.0);
    }
}
