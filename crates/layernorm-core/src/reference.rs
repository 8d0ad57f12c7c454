//! The f64 reference: the oracle every backend is held to.
//!
//! It follows `docs/math.md` line by line, in `f64`, with no shortcut: mean, then a second pass for
//! the variance, rstd, x̂, y; and for the backward x̂ again from the saved statistics, then
//! g = dy·γ, c1 = mean(g·x̂), c2 = mean(g), dx = rstd·(g − c2 − x̂·c1), dγ = Σ dy·x̂, dβ = Σ dy.
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
    /// Per-row mean μ.
    pub mean: Vec<f64>,
    /// Per-row rstd = 1/sqrt(σ² + eps).
    pub rstd: Vec<f64>,
}

/// Outputs of the reference backward.
#[derive(Clone, Debug, PartialEq)]
pub struct RefBackward {
    /// dx, rows × N.
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

fn check_kind(spec: &NormSpec) -> Result<()> {
    match spec.kind {
        NormKind::LayerNorm => spec.validate(),
    }
}

/// Statistics of one row: (μ, rstd), equations (1)–(3) of `docs/math.md`.
pub fn row_stats(x: &[f64], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    // Neumaier's compensated sum: `comp` collects the low-order bits each addition drops.
    let (mut sum, mut comp) = (0.0f64, 0.0f64);
    for &v in x {
        let t = sum + v;
        comp += if sum.abs() >= v.abs() { (sum - t) + v } else { (v - t) + sum };
        sum = t;
    }
    let mean = (sum + comp) / n;
    let mut ss = 0.0;
    for &v in x {
        ss += (v - mean) * (v - mean);
    }
    let var = ss / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// The reference forward: y = x̂·γ + β with x̂ = (x − μ)·rstd, row by row.
pub fn forward(
    spec: &NormSpec,
    x: &[f64],
    gamma: Option<&[f64]>,
    beta: Option<&[f64]>,
) -> Result<RefForward> {
    check_kind(spec)?;
    check_len("x", x.len(), spec.numel())?;
    check_param("gamma", gamma, spec.gamma, spec.n)?;
    check_param("beta", beta, spec.beta, spec.n)?;
    let n = spec.n;
    let mut out = RefForward {
        y: vec![0.0; x.len()],
        mean: vec![0.0; spec.rows],
        rstd: vec![0.0; spec.rows],
    };
    for r in 0..spec.rows {
        let row = &x[r * n..(r + 1) * n];
        let (mean, rstd) = row_stats(row, spec.eps);
        out.mean[r] = mean;
        out.rstd[r] = rstd;
        for j in 0..n {
            let xhat = (row[j] - mean) * rstd;
            let g = gamma.map_or(1.0, |g| g[j]);
            let b = beta.map_or(0.0, |b| b[j]);
            out.y[r * n + j] = xhat * g + b;
        }
    }
    Ok(out)
}

/// The reference backward, from the saved per-row `mean` and `rstd`.
pub fn backward(
    spec: &NormSpec,
    x: &[f64],
    dy: &[f64],
    mean: &[f64],
    rstd: &[f64],
    gamma: Option<&[f64]>,
) -> Result<RefBackward> {
    check_kind(spec)?;
    check_len("x", x.len(), spec.numel())?;
    check_len("dy", dy.len(), spec.numel())?;
    check_len("mean", mean.len(), spec.rows)?;
    check_len("rstd", rstd.len(), spec.rows)?;
    check_param("gamma", gamma, spec.gamma, spec.n)?;
    let n = spec.n;
    let nf = n as f64;
    let mut dx = vec![0.0; x.len()];
    let mut dgamma = vec![0.0; n];
    let mut dbeta = vec![0.0; n];
    let mut xhat = vec![0.0; n];
    let mut g = vec![0.0; n];
    for r in 0..spec.rows {
        let (xr, dyr) = (&x[r * n..(r + 1) * n], &dy[r * n..(r + 1) * n]);
        let (mu, rs) = (mean[r], rstd[r]);
        let (mut c1, mut c2) = (0.0, 0.0);
        for j in 0..n {
            xhat[j] = (xr[j] - mu) * rs;
            g[j] = dyr[j] * gamma.map_or(1.0, |gm| gm[j]);
            c1 += g[j] * xhat[j];
            c2 += g[j];
        }
        c1 /= nf;
        c2 /= nf;
        for j in 0..n {
            dx[r * n + j] = rs * (g[j] - c2 - xhat[j] * c1);
            dgamma[j] += dyr[j] * xhat[j];
            dbeta[j] += dyr[j];
        }
    }
    Ok(RefBackward { dx, dgamma: spec.gamma.then_some(dgamma), dbeta: spec.beta.then_some(dbeta) })
}

/// The full Jacobian ∂x̂_k/∂x_j of one row, equation (7) of `docs/math.md`:
/// `rstd/N · (N·δ_kj − 1 − x̂_k·x̂_j)`, as a row-major N × N matrix indexed `[k * N + j]`.
///
/// Used by tests to check the closed-form dx, which never forms this matrix.
pub fn xhat_jacobian(x: &[f64], eps: f64) -> Vec<f64> {
    let n = x.len();
    let (mean, rstd) = row_stats(x, eps);
    let xhat: Vec<f64> = x.iter().map(|&v| (v - mean) * rstd).collect();
    let mut jac = vec![0.0; n * n];
    for k in 0..n {
        for j in 0..n {
            let delta = if k == j { n as f64 } else { 0.0 };
            jac[k * n + j] = rstd / n as f64 * (delta - 1.0 - xhat[k] * xhat[j]);
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
        assert_eq!(out.mean, vec![2.0]);
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
            backward(&spec.with_affine(false), &x, &x, &[0.0, 0.0], &[1.0], None).unwrap_err(),
            Error::ShapeMismatch { tensor: "mean", expected: 1, got: 2 }
        );
    }
}
