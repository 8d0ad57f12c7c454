//! The reference proves itself, for every member of the family: dx against the full Jacobians of
//! equations (7) (LayerNorm) and (11) (RMSNorm); every gradient of both kinds, with and without a
//! γ offset (13), plain and with the fused residual (14)–(15), against central finite differences
//! of the reference forward; the backward from y (16) against the backward from x, within a bound
//! derived from the rounding of y; the extremes (|x| ~ 1e300, all-zero rows, subnormal ε); and all
//! outputs against golden vectors made by PyTorch in float64.

use std::path::{Path, PathBuf};

use layernorm_core::reference::{self, RefBackward, RefForward};
use layernorm_core::{DType, Error, NormKind, NormSpec};
use ndarray::{Array1, Array2};
use ndarray_npy::read_npy;

/// Unit roundoff of `f64`: every correctly rounded operation is within a factor (1 ± U).
const U: f64 = f64::EPSILON / 2.0;

/// A small deterministic generator (SplitMix64 → roughly normal via a sum of uniforms), so these
/// tests need no RNG crate.
struct Gen(u64);
impl Gen {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        (0..12).map(|_| self.uniform()).sum::<f64>() - 6.0
    }
    fn vec(&mut self, n: usize, mean: f64, std: f64) -> Vec<f64> {
        (0..n).map(|_| mean + std * self.normal()).collect()
    }
}

/// One problem with its inputs: x, optionally a residual (then the forward is the fused one and
/// h = x + residual), γ, β, the upstream dy and, optionally, the upstream dh on h.
struct Problem {
    spec: NormSpec,
    x: Vec<f64>,
    residual: Option<Vec<f64>>,
    gamma: Option<Vec<f64>>,
    beta: Option<Vec<f64>>,
    dy: Vec<f64>,
    dh: Option<Vec<f64>>,
}

impl Problem {
    /// Draws x ~ N(−0.5, 1.5²), residual ~ N(0.3, 1), γ around 1 − γ_offset (so that γ_eff is
    /// near 1), β ~ N(0, 0.3²), dy and dh ~ N(0, 1), as `spec` and the flags ask.
    fn draw(rng: &mut Gen, spec: NormSpec, residual: bool, dh: bool) -> Problem {
        let (numel, n) = (spec.numel(), spec.n);
        let x = rng.vec(numel, -0.5, 1.5);
        let residual = residual.then(|| rng.vec(numel, 0.3, 1.0));
        let gamma = spec.gamma.then(|| rng.vec(n, 1.0 - spec.gamma_offset, 0.3));
        let beta = spec.beta.then(|| rng.vec(n, 0.0, 0.3));
        let dy = rng.vec(numel, 0.0, 1.0);
        let dh = dh.then(|| rng.vec(numel, 0.0, 1.0));
        Problem { spec, x, residual, gamma, beta, dy, dh }
    }

    /// h (x itself without a residual) and the forward of h.
    fn forward_at(
        &self,
        x: &[f64],
        residual: Option<&[f64]>,
        gamma: Option<&[f64]>,
        beta: Option<&[f64]>,
    ) -> (Vec<f64>, RefForward) {
        match residual {
            Some(r) => reference::forward_residual(&self.spec, x, r, gamma, beta).unwrap(),
            None => (x.to_vec(), reference::forward(&self.spec, x, gamma, beta).unwrap()),
        }
    }

    fn forward(&self) -> (Vec<f64>, RefForward) {
        self.forward_at(
            &self.x,
            self.residual.as_deref(),
            self.gamma.as_deref(),
            self.beta.as_deref(),
        )
    }

    /// The backward from x (from h with a residual), plus dh when given: equations (9), (12), (15).
    fn backward(&self) -> RefBackward {
        let (h, fwd) = self.forward();
        let g = self.gamma.as_deref();
        let bwd = reference::backward(&self.spec, &h, &self.dy, fwd.mean.as_deref(), &fwd.rstd, g)
            .unwrap();
        match &self.dh {
            Some(dh) => reference::add_dh(bwd, dh).unwrap(),
            None => bwd,
        }
    }

    /// The loss L = Σ dy·y + Σ dh·h whose gradients the backward computes (the second term only
    /// with dh; h = x without a residual).
    fn loss(
        &self,
        x: &[f64],
        residual: Option<&[f64]>,
        gamma: Option<&[f64]>,
        beta: Option<&[f64]>,
    ) -> f64 {
        let (h, fwd) = self.forward_at(x, residual, gamma, beta);
        let mut l: f64 = fwd.y.iter().zip(&self.dy).map(|(y, d)| y * d).sum();
        if let Some(dh) = &self.dh {
            l += h.iter().zip(dh).map(|(h, d)| h * d).sum::<f64>();
        }
        l
    }
}

fn perturbed(v: &[f64], i: usize, t: f64) -> Vec<f64> {
    let mut w = v.to_vec();
    w[i] += t;
    w
}

/// Central difference (f(h) − f(−h)) / 2h with h = 1e-6. Its truncation error is h²/6·|f'''|
/// (≈ 1e-12 here, where the rows are O(1) and rstd ≤ ~3), its rounding error ≈ U·|L|/h (≈ 1e-9):
/// asking 1e-6·(1 + |gradient|) leaves a margin of 1000 and still catches any wrong term, which
/// moves a gradient of these O(1) problems by far more.
fn central(f: impl Fn(f64) -> f64) -> f64 {
    let h = 1e-6;
    (f(h) - f(-h)) / (2.0 * h)
}

fn assert_fd(what: &str, i: usize, fd: f64, got: f64) {
    assert!((fd - got).abs() <= 1e-6 * (1.0 + got.abs()), "{what}[{i}]: fd {fd} vs {got}");
}

/// Checks dx (over x, and over the residual: the same tensor), dγ and dβ of `bwd` against central
/// finite differences of the problem's loss.
fn check_against_finite_differences(p: &Problem, bwd: &RefBackward, label: &str) {
    let (r, g, b) = (p.residual.as_deref(), p.gamma.as_deref(), p.beta.as_deref());
    for i in 0..p.x.len() {
        let d = central(|t| p.loss(&perturbed(&p.x, i, t), r, g, b));
        assert_fd(&format!("{label} dx"), i, d, bwd.dx[i]);
        if let Some(rv) = r {
            let d = central(|t| p.loss(&p.x, Some(&perturbed(rv, i, t)), g, b));
            assert_fd(&format!("{label} dresidual"), i, d, bwd.dx[i]);
        }
    }
    assert_eq!(bwd.dgamma.is_some(), p.spec.gamma, "{label}");
    assert_eq!(bwd.dbeta.is_some(), p.spec.beta, "{label}");
    if let (Some(gv), Some(dg)) = (g, &bwd.dgamma) {
        for (j, &want) in dg.iter().enumerate() {
            let d = central(|t| p.loss(&p.x, r, Some(&perturbed(gv, j, t)), b));
            assert_fd(&format!("{label} dgamma"), j, d, want);
        }
    }
    if let (Some(bv), Some(db)) = (b, &bwd.dbeta) {
        for (j, &want) in db.iter().enumerate() {
            let d = central(|t| p.loss(&p.x, r, g, Some(&perturbed(bv, j, t))));
            assert_fd(&format!("{label} dbeta"), j, d, want);
        }
    }
}

/// dL/dx_j = Σ_k (dy_k·γ_eff,k)·∂x̂_k/∂x_j with the kind's full Jacobian, against the closed form.
fn check_dx_against_the_jacobian(kind: NormKind, seed: u64) {
    let mut rng = Gen(seed);
    for (n, eps, offset) in
        [(1usize, 1e-5, 0.0), (2, 1e-5, 0.0), (5, 1e-5, 1.0), (17, 1e-12, 0.0), (64, 1e-3, 1.0)]
    {
        let spec = NormSpec::new(kind, 1, n, DType::F64).with_eps(eps).with_gamma_offset(offset);
        let p = Problem::draw(&mut rng, spec, false, false);
        let bwd = p.backward();
        let gamma = p.gamma.as_deref().unwrap();
        let jac = reference::xhat_jacobian(kind, &p.x, eps);
        for j in 0..n {
            let want: f64 = (0..n).map(|k| p.dy[k] * (offset + gamma[k]) * jac[k * n + j]).sum();
            let got = bwd.dx[j];
            assert!(
                (got - want).abs() <= 1e-12 * (1.0 + want.abs()),
                "{kind} n={n} offset={offset} j={j}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn dx_matches_the_full_jacobian_of_equation_7() {
    check_dx_against_the_jacobian(NormKind::LayerNorm, 7);
}

#[test]
fn rms_dx_matches_the_full_jacobian_of_equation_11() {
    check_dx_against_the_jacobian(NormKind::RmsNorm, 8);
}

#[test]
fn jacobian_rows_sum_to_zero_and_match_finite_differences() {
    // Σ_j ∂x̂_k/∂x_j = 0: shifting x does not change x̂.
    let mut rng = Gen(11);
    let (n, eps) = (9, 1e-5);
    let x = rng.vec(n, 1.0, 1.0);
    let jac = reference::xhat_jacobian(NormKind::LayerNorm, &x, eps);
    let spec = NormSpec::layer_norm(1, n, DType::F64).with_eps(eps).with_affine(false);
    for k in 0..n {
        let s: f64 = jac[k * n..(k + 1) * n].iter().sum();
        assert!(s.abs() < 1e-12, "row {k} sums to {s}");
        for j in 0..n {
            let fd = central(|t| {
                reference::forward(&spec, &perturbed(&x, j, t), None, None).unwrap().y[k]
            });
            assert!((fd - jac[k * n + j]).abs() < 1e-7, "({k},{j}): fd {fd} vs {}", jac[k * n + j]);
        }
    }
}

#[test]
fn rms_jacobian_matches_finite_differences_and_breaks_scale_invariance_by_eps_only() {
    // x̂(s·x) = x̂(x) at ε = 0, so J·x = 0 there; with ε, (11) gives exactly
    // Σ_j ∂x̂_k/∂x_j · x_j = x̂_k·(1 − r²·mean(x²)) = ε·r²·x̂_k.
    let mut rng = Gen(12);
    let n = 9;
    for eps in [1e-6, 0.5] {
        let x = rng.vec(n, 0.5, 1.0);
        let jac = reference::xhat_jacobian(NormKind::RmsNorm, &x, eps);
        let spec = NormSpec::rms_norm(1, n, DType::F64).with_eps(eps).with_gamma(false);
        let fwd = reference::forward(&spec, &x, None, None).unwrap();
        let (r, xhat) = (fwd.rstd[0], &fwd.y);
        for k in 0..n {
            let jx: f64 = (0..n).map(|j| jac[k * n + j] * x[j]).sum();
            let size: f64 = (0..n).map(|j| (jac[k * n + j] * x[j]).abs()).sum();
            let want = eps * r * r * xhat[k];
            assert!((jx - want).abs() <= 64.0 * U * size, "eps={eps} row {k}: {jx} vs {want}");
            for j in 0..n {
                let fd = central(|t| {
                    reference::forward(&spec, &perturbed(&x, j, t), None, None).unwrap().y[k]
                });
                let want = jac[k * n + j];
                assert!((fd - want).abs() < 1e-7, "eps={eps} ({k},{j}): fd {fd} vs {want}");
                assert_eq!(want, jac[j * n + k], "(11) is symmetric");
            }
        }
    }
}

#[test]
fn all_gradients_match_central_finite_differences() {
    use NormKind::{LayerNorm, RmsNorm};
    let mut rng = Gen(3);
    // (kind, rows, n, γ, β, γ offset)
    let cases = [
        (LayerNorm, 3, 7, true, true, 0.0),
        (LayerNorm, 2, 4, false, false, 0.0),
        (LayerNorm, 4, 5, true, false, 0.0),
        (LayerNorm, 2, 6, false, true, 0.0),
        (LayerNorm, 3, 5, true, true, 1.0),
        (LayerNorm, 2, 8, true, false, -0.5),
        (RmsNorm, 3, 7, true, false, 0.0),
        (RmsNorm, 2, 4, false, false, 0.0),
        (RmsNorm, 4, 5, true, true, 0.0),
        (RmsNorm, 2, 6, false, true, 0.0),
        (RmsNorm, 3, 5, true, false, 1.0),
        (RmsNorm, 2, 9, true, true, -0.5),
        (RmsNorm, 3, 1, true, true, 1.0),
    ];
    for (kind, rows, n, gamma, beta, offset) in cases {
        let spec = NormSpec::new(kind, rows, n, DType::F64)
            .with_eps(1e-5)
            .with_gamma(gamma)
            .with_beta(beta)
            .with_gamma_offset(offset);
        let p = Problem::draw(&mut rng, spec, false, false);
        let label = format!("{kind} {rows}x{n} gamma={gamma} beta={beta} offset={offset}");
        check_against_finite_differences(&p, &p.backward(), &label);
    }
}

#[test]
fn residual_gradients_match_finite_differences_over_x_and_residual() {
    let mut rng = Gen(15);
    for kind in NormKind::ALL {
        // (γ, β, γ offset, dh)
        for (gamma, beta, offset, dh) in [
            (true, true, 0.0, true),
            (true, false, 1.0, true),
            (false, false, 0.0, true),
            (true, true, 0.0, false),
        ] {
            let spec = NormSpec::new(kind, 3, 6, DType::F64)
                .with_eps(1e-5)
                .with_gamma(gamma)
                .with_beta(beta)
                .with_gamma_offset(offset);
            let p = Problem::draw(&mut rng, spec, true, dh);
            let label =
                format!("{kind} residual gamma={gamma} beta={beta} offset={offset} dh={dh}");
            // (14): h = x + residual (exact here: f64 storage rounds as f64 addition does), and the
            // forward is that of h.
            let (h, fwd) = p.forward();
            let r = p.residual.as_deref().unwrap();
            let sum: Vec<f64> = p.x.iter().zip(r).map(|(a, b)| a + b).collect();
            assert_eq!(h, sum, "{label}");
            let g = p.gamma.as_deref();
            assert_eq!(fwd, reference::forward(&p.spec, &h, g, p.beta.as_deref()).unwrap());
            check_against_finite_differences(&p, &p.backward(), &label);
        }
    }
}

#[test]
fn residual_h_is_rounded_to_the_storage_dtype_before_the_norm() {
    let mut rng = Gen(16);
    for kind in NormKind::ALL {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let spec = NormSpec::new(kind, 4, 16, dtype);
            // Inputs representable in the storage dtype, as a backend sees them.
            let x: Vec<f64> = rng.vec(64, 0.0, 1.0).into_iter().map(|v| dtype.round(v)).collect();
            let r: Vec<f64> = rng.vec(64, 0.0, 3.0).into_iter().map(|v| dtype.round(v)).collect();
            let (g, b) = (rng.vec(16, 1.0, 0.2), rng.vec(16, 0.0, 0.2));
            let (h, fwd) = reference::forward_residual(&spec, &x, &r, Some(&g), Some(&b)).unwrap();
            let exact: Vec<f64> = x.iter().zip(&r).map(|(a, b)| a + b).collect();
            let rounded: Vec<f64> = exact.iter().map(|&v| dtype.round(v)).collect();
            assert_eq!(h, rounded, "{kind} {dtype:?}");
            assert!(
                h != exact,
                "{kind} {dtype:?}: no sum needed rounding; the case proves nothing"
            );
            assert_eq!(fwd, reference::forward(&spec, &h, Some(&g), Some(&b)).unwrap());
        }
    }
}

/// A bound on |backward from y − backward from x|, from the rounding of y alone.
///
/// From x the backward forms x̂ with the forward's own expression, so both backward runs see the
/// same g, c₂ and dβ and differ only through x̂' = fl(fl(y − β)/γ_eff), where
/// y = fl(fl(x̂·γ_eff) + β). With four correctly rounded operations (each a factor 1 + δ,
/// |δ| ≤ U): x̂' = x̂(1+δ₁)(1+δ₃)(1+δ₄) + (x̂γ_eff(1+δ₁) + β)·δ₂(1+δ₃)(1+δ₄)/γ_eff, so
/// |x̂' − x̂| ≤ E = U·(4|x̂| + |β/γ_eff|) to first order (1.01·E below covers the rest). Then,
/// with sums whose own rounding is at most γ_N = N·U/(1 − N·U) of the sum of |terms|:
///   δc₁ ≤ (Σ|g|·E + 2γ_{N+1}·Σ|g·x̂|)/N,
///   δdx ≤ rstd·(E·|c₁| + (|x̂| + E)·δc₁) + 6U·rstd·(|g| + |c₂| + |x̂·c₁|) (the last term: the
///         two runs' own rounding of rstd·(g − c₂ − x̂·c₁), three operations each),
///   δdγ ≤ Σ_rows |dy|·E + 2γ_rows·Σ_rows |dy·x̂|.
/// `xhat` is the exact-path x̂ (rows × N), `geff` γ_eff per column, `beta` β (0 when absent).
fn from_output_bounds(
    spec: &NormSpec,
    xhat: &[f64],
    dy: &[f64],
    rstd: &[f64],
    geff: &[f64],
    beta: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let (rows, n) = (spec.rows, spec.n);
    let gamma_k = |k: usize| k as f64 * U / (1.0 - k as f64 * U);
    let e: Vec<f64> = (0..rows * n)
        .map(|i| 1.01 * U * (4.0 * xhat[i].abs() + (beta[i % n] / geff[i % n]).abs()))
        .collect();
    let mut dx = vec![0.0; rows * n];
    for r in 0..rows {
        let row = r * n..(r + 1) * n;
        let g: Vec<f64> = row.clone().map(|i| dy[i] * geff[i % n]).collect();
        let xh = &xhat[row.clone()];
        let er = &e[row.clone()];
        let nf = n as f64;
        let c1 = (0..n).map(|j| g[j] * xh[j]).sum::<f64>() / nf;
        let c2 = if spec.has_mean() { g.iter().sum::<f64>() / nf } else { 0.0 };
        let dc1 = ((0..n).map(|j| g[j].abs() * er[j]).sum::<f64>()
            + 2.0 * gamma_k(n + 1) * (0..n).map(|j| (g[j] * xh[j]).abs()).sum::<f64>())
            / nf;
        for j in 0..n {
            dx[r * n + j] = rstd[r] * (er[j] * c1.abs() + (xh[j].abs() + er[j]) * dc1)
                + 6.0 * U * rstd[r] * (g[j].abs() + c2.abs() + (xh[j] * c1).abs());
        }
    }
    let dgamma = (0..n)
        .map(|j| {
            (0..rows)
                .map(|r| {
                    let i = r * n + j;
                    dy[i].abs() * e[i] + 2.0 * gamma_k(rows) * (dy[i] * xhat[i]).abs()
                })
                .sum()
        })
        .collect();
    (dx, dgamma)
}

#[test]
fn backward_from_output_equals_backward_from_x_where_gamma_is_away_from_zero() {
    let mut rng = Gen(21);
    let mut checked = 0;
    for kind in NormKind::ALL {
        // (γ, β, γ offset, residual)
        for (gamma, beta, offset, residual) in [
            (true, true, 0.0, false),
            (true, true, 1.0, false),
            (true, false, 0.0, false),
            (false, true, 0.0, false),
            (false, false, 0.0, false),
            (true, true, -0.5, true),
            (true, false, 1.0, true),
        ] {
            let (rows, n) = (5, 33);
            let spec = NormSpec::new(kind, rows, n, DType::F64)
                .with_gamma(gamma)
                .with_beta(beta)
                .with_gamma_offset(offset);
            let label = format!("{kind} gamma={gamma} beta={beta} offset={offset} res={residual}");
            // With a residual, y is that of h; dh is added to both sides alike (tested above).
            let mut p = Problem::draw(&mut rng, spec.clone(), residual, false);
            // γ_eff of either sign, 0.25 ≤ |γ_eff| ≤ 2, and |β| up to ~6: |β/γ_eff| up to ~24.
            if let Some(gv) = &mut p.gamma {
                for v in gv.iter_mut() {
                    let mag = 0.25 + 1.75 * rng.uniform();
                    let sign = if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
                    *v = sign * mag - offset;
                }
            }
            if let Some(bv) = &mut p.beta {
                *bv = rng.vec(n, 0.0, 2.0);
            }
            let (h, fwd) = p.forward();
            let (g, b) = (p.gamma.as_deref(), p.beta.as_deref());
            let from_x = p.backward();
            let from_y = reference::backward_from_output(&spec, &fwd.y, &p.dy, &fwd.rstd, g, b);
            let from_y = from_y.unwrap();
            let xhat: Vec<f64> = (0..rows * n)
                .map(|i| (h[i] - fwd.mean.as_ref().map_or(0.0, |m| m[i / n])) * fwd.rstd[i / n])
                .collect();
            let geff: Vec<f64> = (0..n).map(|j| g.map_or(1.0, |g| offset + g[j])).collect();
            let bz: Vec<f64> = (0..n).map(|j| b.map_or(0.0, |b| b[j])).collect();
            let (dx_bound, dg_bound) =
                from_output_bounds(&spec, &xhat, &p.dy, &fwd.rstd, &geff, &bz);
            for (i, bound) in dx_bound.iter().enumerate() {
                let d = (from_y.dx[i] - from_x.dx[i]).abs();
                assert!(d <= *bound, "{label} dx[{i}]: off by {d:e} > {bound:e}");
            }
            if let (Some(a), Some(bb)) = (&from_y.dgamma, &from_x.dgamma) {
                for j in 0..n {
                    let d = (a[j] - bb[j]).abs();
                    assert!(
                        d <= dg_bound[j],
                        "{label} dgamma[{j}]: off by {d:e} > {:e}",
                        dg_bound[j]
                    );
                }
            }
            assert_eq!(from_y.dgamma.is_some(), gamma, "{label}");
            assert_eq!(from_y.dbeta, from_x.dbeta, "{label}: dβ = Σ dy either way");
            checked += 1;
        }
    }
    assert_eq!(checked, 14);
}

#[test]
fn backward_from_output_rejects_a_singular_column() {
    let spec = |kind, beta: bool, offset| {
        NormSpec::new(kind, 2, 4, DType::F64).with_beta(beta).with_gamma_offset(offset)
    };
    let (y, dy, rstd, beta) = ([0.5; 8], [1.0; 8], [1.0; 2], [0.25; 4]);
    for kind in NormKind::ALL {
        for with_beta in [true, false] {
            let b = with_beta.then_some(&beta[..]);
            // (γ offset, γ, the first column where γ_offset + γ = 0)
            for (offset, gamma, column) in [
                (0.0, [1.0, 0.0, 2.0, 0.0], 1),
                (0.0, [-0.0, 1.0, 1.0, 1.0], 0),
                (1.0, [0.5, 0.0, -1.0, -1.0], 2),
                (-0.5, [1.0, 2.0, -1.0, 0.5], 3),
            ] {
                let s = spec(kind, with_beta, offset);
                let err = reference::backward_from_output(&s, &y, &dy, &rstd, Some(&gamma), b)
                    .unwrap_err();
                assert_eq!(err, Error::SingularGamma { column, gamma: gamma[column], offset });
                // The same γ from x is an ordinary backward: x̂ is known there.
                let x = [0.1, 0.2, 0.3, 0.4, -1.0, 1.0, 2.0, 0.0];
                let fwd = reference::forward(&s, &x, Some(&gamma), b).unwrap();
                let bwd =
                    reference::backward(&s, &x, &dy, fwd.mean.as_deref(), &fwd.rstd, Some(&gamma));
                assert!(bwd.unwrap().dx.iter().all(|v| v.is_finite()));
            }
            // Without γ, γ_eff = 1: never singular.
            let s = spec(kind, with_beta, 0.0).with_gamma(false);
            assert!(reference::backward_from_output(&s, &y, &dy, &rstd, None, b).is_ok());
        }
    }
}

/// Largest |a − b| / max(1, max|b|) over each group of `n` values (a row, or one value), the
/// scale taken per group so that a large row does not hide a small one; a NaN counts as a
/// mismatch unless both are NaN; equal values (infinities included) agree.
fn err(a: &[f64], b: &[f64], n: usize) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths");
    let mut worst = 0.0f64;
    for (ga, gb) in a.chunks(n.max(1)).zip(b.chunks(n.max(1))) {
        let scale = gb.iter().filter(|v| v.is_finite()).fold(1.0f64, |m, v| m.max(v.abs()));
        for (x, y) in ga.iter().zip(gb) {
            let e = if x.is_nan() || y.is_nan() {
                if x.is_nan() && y.is_nan() { 0.0 } else { f64::INFINITY }
            } else if x == y {
                0.0
            } else {
                (x - y).abs() / scale
            };
            worst = worst.max(e);
        }
    }
    worst
}

#[test]
fn rms_at_1e300_neither_overflows_nor_loses_digits() {
    // x and x·2^996 (|x| ~ 1e300: x² would overflow f64 from |x| ≈ 1.3e154) have the same x̂ up
    // to ε·2^-1992, far below f64 rounding: the same x̂ as x with a negligible ε. So y and dγ
    // agree, rstd and dx scale by 2^-996 exactly (dx = rstd·(...)), to a few units of rounding.
    let mut rng = Gen(30);
    let (rows, n) = (3, 12);
    let scale = 2f64.powi(996);
    let x0 = rng.vec(rows * n, 0.0, 1.0);
    let (g, b, dy) = (rng.vec(n, 1.0, 0.3), rng.vec(n, 0.0, 0.3), rng.vec(rows * n, 0.0, 1.0));
    let x: Vec<f64> = x0.iter().map(|v| v * scale).collect();
    assert!(x.iter().any(|v| v.abs() > 1e300));
    let big = NormSpec::rms_norm(rows, n, DType::F64).with_beta(true);
    let small = big.clone().with_eps(f64::from_bits(1)); // ε = 4.9e-324
    let run = |spec: &NormSpec, x: &[f64]| {
        let fwd = reference::forward(spec, x, Some(&g), Some(&b)).unwrap();
        let bwd = reference::backward(spec, x, &dy, None, &fwd.rstd, Some(&g)).unwrap();
        (fwd, bwd)
    };
    let (f_big, b_big) = run(&big, &x);
    let (f_small, b_small) = run(&small, &x0);
    let finite = |v: &[f64]| v.iter().all(|v| v.is_finite() && *v != 0.0);
    assert!(finite(&f_big.y) && finite(&f_big.rstd) && finite(&b_big.dx));
    let up = |v: &[f64]| v.iter().map(|v| v * scale).collect::<Vec<_>>();
    let tol = 8.0 * U;
    assert!(err(&f_big.y, &f_small.y, n) <= tol, "y");
    assert!(err(&up(&f_big.rstd), &f_small.rstd, 1) <= tol, "rstd");
    assert!(err(&up(&b_big.dx), &b_small.dx, n) <= tol, "dx");
    assert!(err(b_big.dgamma.as_ref().unwrap(), b_small.dgamma.as_ref().unwrap(), 1) <= tol);
    assert_eq!(b_big.dbeta, b_small.dbeta);
    // Up to f64::MAX itself.
    let spec = NormSpec::rms_norm(1, 3, DType::F64).with_gamma(false);
    let fwd = reference::forward(&spec, &[f64::MAX, -f64::MAX, 0.0], None, None).unwrap();
    let want = 1.5f64.sqrt(); // x̂ = ±MAX / √(2·MAX²/3)
    assert!(err(&fwd.y, &[want, -want, 0.0], 3) <= tol, "{:?}", fwd.y);
}

#[test]
fn all_zero_rows_give_beta_and_a_finite_dx() {
    let mut rng = Gen(31);
    for kind in NormKind::ALL {
        for offset in [0.0, 1.0] {
            let (rows, n, eps) = (3, 8, kind.default_eps());
            let spec = NormSpec::new(kind, rows, n, DType::F64).with_gamma_offset(offset);
            let mut p = Problem::draw(&mut rng, spec.clone(), false, false);
            p.x[n..2 * n].fill(0.0);
            let (_, fwd) = p.forward();
            let (g, b) = (p.gamma.as_deref().unwrap(), p.beta.as_deref().unwrap());
            // Row 1: μ = 0, x̂ = 0, r = 1/√ε, y = β exactly.
            assert_eq!(&fwd.y[n..2 * n], b, "{kind}");
            assert_eq!(fwd.rstd[1], 1.0 / eps.sqrt(), "{kind}");
            if let Some(m) = &fwd.mean {
                assert_eq!(m[1], 0.0);
            }
            // dx there: c₁ = mean(g·0) = 0, so dx = r·(g − c₂) with c₂ = mean(g) (LayerNorm) or 0.
            let bwd = p.backward();
            let gr: Vec<f64> = (0..n).map(|j| p.dy[n + j] * (offset + g[j])).collect();
            let c2 = if kind.has_mean() { gr.iter().sum::<f64>() / n as f64 } else { 0.0 };
            let want: Vec<f64> = gr.iter().map(|v| fwd.rstd[1] * (v - c2)).collect();
            assert!(bwd.dx.iter().all(|v| v.is_finite()));
            assert!(err(&bwd.dx[n..2 * n], &want, n) <= 4.0 * U, "{kind}");
            // ε large enough that finite differences resolve the curvature at 0 (r³ ≈ 1e3).
            p.spec = spec.with_eps(1e-2);
            let label = format!("{kind} zero row offset={offset}");
            check_against_finite_differences(&p, &p.backward(), &label);
        }
    }
}

#[test]
fn subnormal_and_tiny_eps_give_the_values_of_the_math() {
    let min_subnormal = f64::from_bits(1); // 4.9e-324
    for kind in NormKind::ALL {
        for eps in [min_subnormal, 1e-310, 1e-300] {
            let spec = NormSpec::new(kind, 2, 4, DType::F64).with_eps(eps);
            assert!(spec.validate().is_ok());
            let x = [0.0, 0.0, 0.0, 0.0, 3.0, -1.0, 4.0, 2.0];
            let (g, b) = ([1.0, 2.0, 0.5, -1.0], [0.25, -0.5, 0.0, 1.0]);
            let fwd = reference::forward(&spec, &x, Some(&g), Some(&b)).unwrap();
            // The zero row: r = 1/√ε (4.5e161 at the smallest subnormal, 1e150 at 1e-300), finite.
            assert_eq!(fwd.rstd[0], 1.0 / eps.sqrt(), "{kind} eps={eps:e}");
            assert!(fwd.rstd[0].is_finite() && fwd.rstd[0] >= 1e150);
            assert_eq!(&fwd.y[..4], &b, "{kind} eps={eps:e}: y = β");
            // The other row: ε is far below half an ulp of the variance / mean square, so the
            // values are those of ε = 0.
            let (mu, ms) = if kind.has_mean() { (2.0, 3.5) } else { (0.0, 7.5) };
            let r = 1.0 / f64::sqrt(ms);
            assert!((fwd.rstd[1] - r).abs() <= 4.0 * U * r, "{kind} eps={eps:e}");
            let y1: Vec<f64> = (0..4).map(|j| (x[4 + j] - mu) * r * g[j] + b[j]).collect();
            assert!(err(&fwd.y[4..], &y1, 4) <= 8.0 * U, "{kind} eps={eps:e}: {:?}", fwd.y);
            // dx of the zero row is rstd·(g − c₂): finite for moderate dy, and ±∞ where the math's
            // value exceeds f64::MAX (4.5e161 · 1e300), with the sign of g.
            let dy = [1e300, -1e300, 1e-300, 0.0, 1.0, 1.0, -1.0, 0.5];
            let bwd = reference::backward(&spec, &x, &dy, fwd.mean.as_deref(), &fwd.rstd, Some(&g));
            let bwd = bwd.unwrap();
            let rs = fwd.rstd[0];
            let gr: Vec<f64> = (0..4).map(|j| dy[j] * g[j]).collect();
            let c2 = if kind.has_mean() { gr.iter().sum::<f64>() / 4.0 } else { 0.0 };
            for (j, gj) in gr.iter().enumerate() {
                let want = rs * (gj - c2);
                let got = bwd.dx[j];
                assert!(
                    got == want || (got - want).abs() <= 4.0 * U * want.abs(),
                    "{kind} eps={eps:e} dx[{j}]: {got:e} vs {want:e}"
                );
            }
            assert_eq!(bwd.dx[0], f64::INFINITY, "{kind} eps={eps:e}");
            assert_eq!(bwd.dx[1], f64::NEG_INFINITY, "{kind} eps={eps:e}");
            if kind.has_mean() {
                // c₂ = mean(g) ≈ −2.5e299 enters every column of the row: ±∞ there too.
                assert!(bwd.dx[2..4].iter().all(|&v| v == f64::INFINITY), "{:?}", bwd.dx);
            } else {
                // c₂ = 0: the columns with small g stay finite (rs·5e-301, and 0).
                assert!(bwd.dx[2].is_finite() && bwd.dx[2] > 0.0 && bwd.dx[3] == 0.0);
            }
            assert!(bwd.dx[4..].iter().all(|v| v.is_finite()), "{kind} eps={eps:e}");
            // dγ: the zero row adds dy·0 = 0, even for dy = ±1e300.
            assert!(bwd.dgamma.unwrap().iter().all(|v| v.is_finite()));
        }
    }
}

/// |x| ~ 1e-200: mean(x²) ~ 1e-400 (σ² likewise) is negligible beside ε = 1e-6, so
/// rstd = 1/√ε = 1000 and x̂ = 1000·(x − μ).
fn check_rows_of_tiny_magnitude(kind: NormKind) {
    let x = [1e-200, -2e-200, 3e-200, 0.5e-200];
    let spec = NormSpec::new(kind, 1, 4, DType::F64).with_eps(1e-6).with_affine(false);
    let fwd = reference::forward(&spec, &x, None, None).unwrap();
    assert!((fwd.rstd[0] - 1000.0).abs() <= 4.0 * U * 1000.0, "{kind}: rstd {}", fwd.rstd[0]);
    let mu = if kind.has_mean() { 0.625e-200 } else { 0.0 };
    for (y, v) in fwd.y.iter().zip(x) {
        let want = (v - mu) * 1000.0;
        assert!((y - want).abs() <= 8.0 * U * 3e-197, "{kind}: y {y:e} vs {want:e}");
    }
}

#[test]
fn layer_norm_rows_of_tiny_magnitude_keep_eps() {
    check_rows_of_tiny_magnitude(NormKind::LayerNorm);
}

#[test]
fn rms_rows_of_tiny_magnitude_keep_eps() {
    check_rows_of_tiny_magnitude(NormKind::RmsNorm);
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn load2(dir: &Path, name: &str) -> Option<Vec<f64>> {
    let p = dir.join(format!("{name}.npy"));
    p.exists().then(|| {
        let a: Array2<f64> = read_npy(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        a.iter().copied().collect()
    })
}

fn load1(dir: &Path, name: &str) -> Option<Vec<f64>> {
    let p = dir.join(format!("{name}.npy"));
    p.exists().then(|| {
        let a: Array1<f64> = read_npy(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        a.to_vec()
    })
}

/// The golden files are PyTorch's f64 results, themselves rounded: against a 60-digit mpmath
/// evaluation (`make_golden.py --check`) they are off by up to 2.8e-12 of a row's (a value's)
/// scale on the large-mean case (|x| ~ 1e4: one ulp of x is 1.8e-12 of σ), by up to 2.9e-13 where
/// the exact dγ is 0 (constant rows, N = 1), and by ≤ 4.4e-16 elsewhere. The reference's
/// distance to them is the same (worst 3.6e-12, large-mean dγ). Agreement is asked to 1e-11
/// (README.md, "Accuracy / tolerances").
const GOLDEN_TOL: f64 = 1e-11;

/// The backward from y reads PyTorch's y and rstd. y's error (≤ 1.0e-12 of the row's scale,
/// |y| ≤ ~3, on the large-mean case) is divided by |γ_eff| ≥ 0.73 (every golden case) in
/// x̂ = (y − β)/γ_eff, and reaches dx through x̂ and c₁ at most 2·max|x̂| ≤ 2√N ≈ 11 times:
/// 1e-12 · 3 / 0.73 · 11 ≈ 5e-11, so 1e-10. Measured: 2.3e-12 (large-mean dγ), ≤ 1.1e-13
/// elsewhere (README.md, "Accuracy / tolerances").
const GOLDEN_FROM_OUTPUT_TOL: f64 = 1e-10;

#[test]
fn matches_pytorch_float64_golden_vectors() {
    let mut cases: Vec<_> = std::fs::read_dir(golden_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 19, "golden cases missing: {cases:?}");
    let mut seen = (0, 0, 0, 0); // (rms_norm, γ offset, residual, dh)
    for dir in cases {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let kind = match std::fs::read_to_string(dir.join("kind.txt")) {
            Ok(s) => NormKind::from_name(s.trim()).unwrap_or_else(|| panic!("{name}: kind {s}")),
            Err(_) => NormKind::LayerNorm,
        };
        let x_arr: Array2<f64> = read_npy(dir.join("x.npy")).unwrap();
        let (rows, n) = x_arr.dim();
        let x: Vec<f64> = x_arr.iter().copied().collect();
        let dy = load2(&dir, "dy").unwrap();
        let eps = load1(&dir, "eps").unwrap()[0];
        let offset = load1(&dir, "offset").map_or(0.0, |o| o[0]);
        let gamma = load1(&dir, "gamma");
        let beta = load1(&dir, "beta");
        let residual = load2(&dir, "residual");
        let dh = load2(&dir, "dh");
        seen.0 += usize::from(kind == NormKind::RmsNorm);
        seen.1 += usize::from(offset != 0.0);
        seen.2 += usize::from(residual.is_some());
        seen.3 += usize::from(dh.is_some());
        let spec = NormSpec::new(kind, rows, n, DType::F64)
            .with_eps(eps)
            .with_gamma(gamma.is_some())
            .with_beta(beta.is_some())
            .with_gamma_offset(offset);
        let (g, b) = (gamma.as_deref(), beta.as_deref());
        let (h, fwd) = match &residual {
            Some(r) => reference::forward_residual(&spec, &x, r, g, b).unwrap(),
            None => (x.clone(), reference::forward(&spec, &x, g, b).unwrap()),
        };
        if residual.is_some() {
            assert_eq!(h, load2(&dir, "h").unwrap(), "{name}/h: one f64 addition either side");
        }
        let bwd = reference::backward(&spec, &h, &dy, fwd.mean.as_deref(), &fwd.rstd, g).unwrap();
        let with_dh = |bwd: RefBackward| match &dh {
            Some(dh) => reference::add_dh(bwd, dh).unwrap(),
            None => bwd,
        };
        let bwd = with_dh(bwd);
        // Rows of y and dx each with their own scale; mean and the parameter gradients per value.
        let check = |what: &str, got: &[f64], want: &[f64], tol: f64| {
            let per = if got.len() == rows * n { n } else { 1 };
            let e = err(got, want, per);
            assert!(e <= tol, "{name}/{what}: error {e:e} > {tol:e}");
        };
        let y_want = load2(&dir, "y").unwrap();
        let rstd_want = load1(&dir, "rstd").unwrap();
        check("y", &fwd.y, &y_want, GOLDEN_TOL);
        assert_eq!(fwd.mean.is_some(), dir.join("mean.npy").exists(), "{name}: mean iff LayerNorm");
        if let Some(m) = &fwd.mean {
            check("mean", m, &load1(&dir, "mean").unwrap(), GOLDEN_TOL);
        }
        for (gv, w) in fwd.rstd.iter().zip(&rstd_want) {
            assert!((gv - w).abs() <= GOLDEN_TOL * w, "{name}/rstd: {gv} vs {w}");
        }
        let dx_want = load2(&dir, "dx").unwrap();
        let dg_want = load1(&dir, "dgamma");
        let db_want = load1(&dir, "dbeta");
        let grads = |what: &str, bwd: &RefBackward, tol: f64| {
            check(&format!("{what} dx"), &bwd.dx, &dx_want, tol);
            assert_eq!(bwd.dgamma.is_some(), dg_want.is_some(), "{name}");
            assert_eq!(bwd.dbeta.is_some(), db_want.is_some(), "{name}");
            if let (Some(got), Some(want)) = (&bwd.dgamma, &dg_want) {
                check(&format!("{what} dgamma"), got, want, tol);
            }
            if let (Some(got), Some(want)) = (&bwd.dbeta, &db_want) {
                check(&format!("{what} dbeta"), got, want, tol);
            }
        };
        grads("from x", &bwd, GOLDEN_TOL);
        // (16): the same gradients from PyTorch's y and rstd, with no x and no mean.
        let from_y =
            reference::backward_from_output(&spec, &y_want, &dy, &rstd_want, g, b).unwrap();
        grads("from y", &with_dh(from_y), GOLDEN_FROM_OUTPUT_TOL);
    }
    assert!(seen.0 >= 8 && seen.1 >= 3 && seen.2 >= 4 && seen.3 >= 3, "cases: {seen:?}");
}

/// Rounds for reading, so the snapshot shows the values and not the last bits of f64.
fn fmt(v: &[f64]) -> String {
    v.iter().map(|x| format!("{x:.6}")).collect::<Vec<_>>().join(", ")
}

#[test]
fn reference_values_on_a_small_fixed_case() {
    let spec = NormSpec::layer_norm(2, 4, DType::F64).with_eps(1e-5);
    let x = [1.0, 2.0, 3.0, 4.0, -2.0, 0.5, 0.5, 9.0];
    let gamma = [1.0, 0.5, -1.0, 2.0];
    let beta = [0.0, 0.1, 0.2, 0.3];
    let dy = [0.1, -0.2, 0.3, -0.4, 1.0, 1.0, -1.0, 0.5];
    let fwd = reference::forward(&spec, &x, Some(&gamma), Some(&beta)).unwrap();
    let bwd =
        reference::backward(&spec, &x, &dy, fwd.mean.as_deref(), &fwd.rstd, Some(&gamma)).unwrap();
    let report = format!(
        "y      = [{}]\nmean   = [{}]\nrstd   = [{}]\ndx     = [{}]\ndgamma = [{}]\ndbeta  = [{}]\n",
        fmt(&fwd.y),
        fmt(fwd.mean.as_deref().unwrap()),
        fmt(&fwd.rstd),
        fmt(&bwd.dx),
        fmt(bwd.dgamma.as_deref().unwrap()),
        fmt(bwd.dbeta.as_deref().unwrap()),
    );
    insta::assert_snapshot!(report);
}

#[test]
fn rms_residual_reference_values_on_a_small_fixed_case() {
    // A Gemma-style block: h = x + residual, RMSNorm with γ offset 1, dh from later layers.
    let spec = NormSpec::rms_norm(2, 4, DType::F64).with_gamma_offset(1.0);
    let x = [1.0, 2.0, 3.0, 4.0, -2.0, 0.5, 0.5, 9.0];
    let residual = [0.5, -0.5, 0.25, 0.0, 1.0, 1.0, -1.0, -3.0];
    let gamma = [0.0, -0.5, 0.25, 1.0];
    let dy = [0.1, -0.2, 0.3, -0.4, 1.0, 1.0, -1.0, 0.5];
    let dh = [0.0, 0.5, 0.0, -0.5, 0.25, 0.0, 0.0, 1.0];
    let (h, fwd) = reference::forward_residual(&spec, &x, &residual, Some(&gamma), None).unwrap();
    let bwd = reference::backward(&spec, &h, &dy, None, &fwd.rstd, Some(&gamma)).unwrap();
    let bwd = reference::add_dh(bwd, &dh).unwrap();
    let report = format!(
        "h      = [{}]\ny      = [{}]\nrstd   = [{}]\ndx     = [{}]\ndgamma = [{}]\n",
        fmt(&h),
        fmt(&fwd.y),
        fmt(&fwd.rstd),
        fmt(&bwd.dx),
        fmt(bwd.dgamma.as_deref().unwrap()),
    );
    insta::assert_snapshot!(report);
}
