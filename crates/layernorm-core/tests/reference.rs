//! The reference proves itself: dx against the full Jacobian of equation (7), every gradient
//! against central finite differences of the reference forward, and all outputs against golden
//! vectors made by PyTorch in float64.

use std::path::{Path, PathBuf};

use layernorm_core::{DType, NormKind, NormSpec, reference};
use ndarray::{Array1, Array2};
use ndarray_npy::read_npy;

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

/// The loss L = Σ dy·y, whose gradients the backward computes.
fn loss(spec: &NormSpec, x: &[f64], g: Option<&[f64]>, b: Option<&[f64]>, dy: &[f64]) -> f64 {
    let y = reference::forward(spec, x, g, b).unwrap().y;
    y.iter().zip(dy).map(|(y, d)| y * d).sum()
}

#[test]
fn dx_matches_the_full_jacobian_of_equation_7() {
    let mut rng = Gen(7);
    for (n, eps) in [(1usize, 1e-5), (2, 1e-5), (5, 1e-5), (17, 1e-12), (64, 1e-3)] {
        let spec = NormSpec::layer_norm(1, n, DType::F64).with_eps(eps);
        let (x, dy) = (rng.vec(n, 0.3, 2.0), rng.vec(n, 0.0, 1.0));
        let (gamma, beta) = (rng.vec(n, 1.0, 0.2), rng.vec(n, 0.0, 0.2));
        let fwd = reference::forward(&spec, &x, Some(&gamma), Some(&beta)).unwrap();
        let bwd = reference::backward(&spec, &x, &dy, fwd.mean.as_deref(), &fwd.rstd, Some(&gamma))
            .unwrap();
        // dL/dx_j = Σ_k (dy_k γ_k) · ∂x̂_k/∂x_j
        let jac = reference::xhat_jacobian(NormKind::LayerNorm, &x, eps);
        for j in 0..n {
            let want: f64 = (0..n).map(|k| dy[k] * gamma[k] * jac[k * n + j]).sum();
            let got = bwd.dx[j];
            assert!(
                (got - want).abs() <= 1e-12 * (1.0 + want.abs()),
                "n={n} j={j}: {got} vs {want}"
            );
        }
    }
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
            let h = 1e-6;
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[j] += h;
            xm[j] -= h;
            let yp = reference::forward(&spec, &xp, None, None).unwrap().y[k];
            let ym = reference::forward(&spec, &xm, None, None).unwrap().y[k];
            let fd = (yp - ym) / (2.0 * h);
            assert!((fd - jac[k * n + j]).abs() < 1e-7, "({k},{j}): fd {fd} vs {}", jac[k * n + j]);
        }
    }
}

#[test]
fn all_gradients_match_central_finite_differences() {
    let mut rng = Gen(3);
    for (rows, n, gamma_on, beta_on) in
        [(3, 7, true, true), (2, 4, false, false), (4, 5, true, false)]
    {
        let spec = NormSpec::layer_norm(rows, n, DType::F64)
            .with_eps(1e-5)
            .with_gamma(gamma_on)
            .with_beta(beta_on);
        let x = rng.vec(rows * n, -0.5, 1.5);
        let dy = rng.vec(rows * n, 0.0, 1.0);
        let gamma = gamma_on.then(|| rng.vec(n, 1.0, 0.3));
        let beta = beta_on.then(|| rng.vec(n, 0.0, 0.3));
        let (g, b) = (gamma.as_deref(), beta.as_deref());
        let fwd = reference::forward(&spec, &x, g, b).unwrap();
        let bwd = reference::backward(&spec, &x, &dy, fwd.mean.as_deref(), &fwd.rstd, g).unwrap();
        let h = 1e-6;
        let fd = |f: &dyn Fn(f64) -> f64| (f(h) - f(-h)) / (2.0 * h);
        for i in 0..rows * n {
            let d = fd(&|t| {
                let mut xx = x.clone();
                xx[i] += t;
                loss(&spec, &xx, g, b, &dy)
            });
            assert!((d - bwd.dx[i]).abs() < 1e-6, "dx[{i}]: fd {d} vs {}", bwd.dx[i]);
        }
        if let (Some(gv), Some(dg)) = (&gamma, &bwd.dgamma) {
            for j in 0..n {
                let d = fd(&|t| {
                    let mut gg = gv.clone();
                    gg[j] += t;
                    loss(&spec, &x, Some(&gg), b, &dy)
                });
                assert!((d - dg[j]).abs() < 1e-6, "dgamma[{j}]: fd {d} vs {}", dg[j]);
            }
        }
        if let (Some(bv), Some(db)) = (&beta, &bwd.dbeta) {
            for j in 0..n {
                let d = fd(&|t| {
                    let mut bb = bv.clone();
                    bb[j] += t;
                    loss(&spec, &x, g, Some(&bb), &dy)
                });
                assert!((d - db[j]).abs() < 1e-6, "dbeta[{j}]: fd {d} vs {}", db[j]);
            }
        }
        assert_eq!(bwd.dgamma.is_some(), gamma_on);
        assert_eq!(bwd.dbeta.is_some(), beta_on);
    }
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn load2(dir: &Path, name: &str) -> Option<Array2<f64>> {
    let p = dir.join(format!("{name}.npy"));
    p.exists().then(|| read_npy(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
}

fn load1(dir: &Path, name: &str) -> Option<Array1<f64>> {
    let p = dir.join(format!("{name}.npy"));
    p.exists().then(|| read_npy(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
}

/// Largest |a − b| / max(1, max|b|) over each group of `n` values (a row, or one value), the
/// scale taken per group so that a large row does not hide a small one; a NaN counts as a
/// mismatch unless both are NaN. The golden files are PyTorch's f64 results, themselves
/// rounded: against a 60-digit mpmath evaluation they are off by up to ~3e-12 on the large-mean
/// case (make_golden.py), so agreement is asked to 1e-11.
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
fn matches_pytorch_float64_golden_vectors() {
    let mut cases: Vec<_> = std::fs::read_dir(golden_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 7, "golden cases missing: {cases:?}");
    for dir in cases {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let x = load2(&dir, "x").unwrap();
        let dy = load2(&dir, "dy").unwrap();
        let eps = load1(&dir, "eps").unwrap()[0];
        let gamma = load1(&dir, "gamma").map(|a| a.to_vec());
        let beta = load1(&dir, "beta").map(|a| a.to_vec());
        let (rows, n) = x.dim();
        let spec = NormSpec::layer_norm(rows, n, DType::F64)
            .with_eps(eps)
            .with_gamma(gamma.is_some())
            .with_beta(beta.is_some());
        let xs: Vec<f64> = x.iter().copied().collect();
        let dys: Vec<f64> = dy.iter().copied().collect();
        let fwd = reference::forward(&spec, &xs, gamma.as_deref(), beta.as_deref()).unwrap();
        let bwd =
            reference::backward(&spec, &xs, &dys, fwd.mean.as_deref(), &fwd.rstd, gamma.as_deref())
                .unwrap();
        let tol = 1e-11;
        // Rows of y and dx each with their own scale; mean and the parameter gradients per value.
        let check = |what: &str, got: &[f64], want: Vec<f64>| {
            let per = if got.len() == rows * n { n } else { 1 };
            let e = err(got, &want, per);
            assert!(e <= tol, "{name}/{what}: error {e:e} > {tol:e}");
        };
        check("y", &fwd.y, load2(&dir, "y").unwrap().iter().copied().collect());
        check("mean", fwd.mean.as_deref().unwrap(), load1(&dir, "mean").unwrap().to_vec());
        let rstd_want = load1(&dir, "rstd").unwrap().to_vec();
        for (g, w) in fwd.rstd.iter().zip(&rstd_want) {
            assert!((g - w).abs() <= tol * w, "{name}/rstd: {g} vs {w}");
        }
        check("dx", &bwd.dx, load2(&dir, "dx").unwrap().iter().copied().collect());
        assert_eq!(bwd.dgamma.is_some(), dir.join("dgamma.npy").exists(), "{name}");
        assert_eq!(bwd.dbeta.is_some(), dir.join("dbeta.npy").exists(), "{name}");
        if let Some(dg) = &bwd.dgamma {
            check("dgamma", dg, load1(&dir, "dgamma").unwrap().to_vec());
        }
        if let Some(db) = &bwd.dbeta {
            check("dbeta", db, load1(&dir, "dbeta").unwrap().to_vec());
        }
    }
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
