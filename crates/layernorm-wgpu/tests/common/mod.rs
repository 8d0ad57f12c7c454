//! Shared test helpers: the one backend per test binary, data generators, and the comparison
//! against the f64 reference.

// Each test binary uses only some of these helpers.
#![allow(dead_code)]

use std::sync::OnceLock;

use layernorm_core::{Element, HostNormalizeExt, NormSpec, reference};
use layernorm_wgpu::WgpuBackend;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// The backend shared by every test of a binary, or `None` (after printing a skip line) when
/// no adapter exists. With `LAYERNORM_REQUIRE_WGPU=1` a missing adapter fails the test instead.
pub fn backend() -> Option<&'static WgpuBackend> {
    static B: OnceLock<Result<WgpuBackend, layernorm_core::Error>> = OnceLock::new();
    match B.get_or_init(WgpuBackend::new) {
        Ok(b) => Some(b),
        Err(e) => {
            if std::env::var("LAYERNORM_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
                panic!("LAYERNORM_REQUIRE_WGPU=1 but the wgpu backend is unavailable: {e}");
            }
            eprintln!("skipped: wgpu backend unavailable ({e})");
            None
        }
    }
}

/// Input distributions.
#[derive(Clone, Copy, Debug)]
pub enum Dist {
    /// Standard normal.
    Normal,
    /// `offset + N(0, 1)`: |mean| ≫ std.
    Offset(f64),
    /// `scale · N(0, 1)`: huge or tiny magnitudes.
    Scaled(f64),
    /// Every row constant (a different constant per row).
    Constant,
}

pub fn data(rows: usize, n: usize, dist: Dist, seed: u64) -> Vec<f64> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(rows * n);
    for r in 0..rows {
        let c: f64 = rng.sample(StandardNormal);
        for _ in 0..n {
            let z: f64 = rng.sample(StandardNormal);
            v.push(match dist {
                Dist::Normal => z,
                Dist::Offset(o) => o + z,
                Dist::Scaled(s) => s * z,
                Dist::Constant => c * (r as f64 + 1.0),
            });
        }
    }
    v
}

/// max |got − want| / max |want| (absolute when want is all zero); NaN anywhere → infinity.
pub fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut worst = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        let d = (g - w).abs();
        if d.is_nan() {
            return f64::INFINITY;
        }
        worst = worst.max(d);
    }
    if scale > 0.0 { worst / scale } else { worst }
}

fn round<T: Element>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

fn widen<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// Error bounds for one dtype.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub y: f64,
    pub stats: f64,
    pub dx: f64,
    pub params: f64,
}

/// f32: about 8 ulp for y, the statistics and dx (measured worst on lavapipe: 1.7e-7, 4.2e-7);
/// 1e-5 for the sums over rows.
pub const F32: Tol = Tol { y: 1e-6, stats: 1e-6, dx: 1e-6, params: 1e-5 };
/// f16 / bf16: one storage ulp at the top of the range (the outputs are rounded once).
pub const F16: Tol = Tol { y: 9.77e-4, stats: 1e-6, dx: 9.77e-4, params: 9.77e-4 };
pub const BF16: Tol = Tol { y: 7.82e-3, stats: 1e-6, dx: 7.82e-3, params: 7.82e-3 };

/// Runs forward and backward of `spec` on `x` (and seeded γ, β, dy) in `T`, and checks every
/// output against the reference evaluated on the same rounded inputs.
pub fn check<T: Element>(b: &WgpuBackend, spec: &NormSpec, x: &[f64], tol: Tol, seed: u64) {
    let (rows, n) = (spec.rows, spec.n);
    let what =
        format!("{rows}x{n} {} γ={} β={} eps={}", spec.dtype, spec.gamma, spec.beta, spec.eps);
    let xt: Vec<T> = round(x);
    let g: Vec<T> = round(
        &data(1, n, Dist::Normal, seed + 1).iter().map(|v| 1.0 + 0.5 * v).collect::<Vec<_>>(),
    );
    let bt: Vec<T> = round(&data(1, n, Dist::Scaled(0.5), seed + 2));
    let dyt: Vec<T> = round(&data(rows, n, Dist::Normal, seed + 3));
    let (x64, g64, b64, dy64) = (widen(&xt), widen(&g), widen(&bt), widen(&dyt));
    let gamma = spec.gamma.then_some(&g[..]);
    let beta = spec.beta.then_some(&bt[..]);

    let f = b.forward_vec(spec, &xt, gamma, beta).unwrap_or_else(|e| panic!("{what}: {e}"));
    let r = reference::forward(
        spec,
        &x64,
        spec.gamma.then_some(&g64[..]),
        spec.beta.then_some(&b64[..]),
    )
    .unwrap();
    let verbose = std::env::var_os("LAYERNORM_TEST_VERBOSE").is_some();
    let e = rel_err(&widen(&f.y), &r.y);
    if verbose {
        eprintln!("{what}: y {e:.2e}");
    }
    assert!(e <= tol.y, "{what}: y error {e:e} > {:e}", tol.y);
    // The mean is judged against |mean| + std of its row: a mean near 0 of data with std 1 can
    // only be as exact as the data's own f32 rounding.
    for (i, (got, &want)) in f.mean.iter().zip(&r.mean).enumerate() {
        let got = got.to_f64();
        let e = (got - want).abs() / (want.abs() + 1.0 / r.rstd[i]);
        assert!(e <= tol.stats, "{what}: mean[{i}] = {got}, want {want} (rel {e:e})");
    }
    for (i, (&got, &want)) in f.rstd.iter().zip(&r.rstd).enumerate() {
        let got = got.to_f64();
        let e = (got - want).abs() / want;
        assert!(e <= tol.stats, "{what}: rstd[{i}] = {got}, want {want} (rel {e:e})");
    }

    let grads = b
        .backward_vec(spec, &xt, &dyt, &f.mean, &f.rstd, gamma)
        .unwrap_or_else(|e| panic!("{what}: backward: {e}"));
    let rb =
        reference::backward(spec, &x64, &dy64, &r.mean, &r.rstd, spec.gamma.then_some(&g64[..]))
            .unwrap();
    let e = rel_err(&widen(&grads.dx), &rb.dx);
    if verbose {
        eprintln!("{what}: dx {e:.2e}");
    }
    assert!(e <= tol.dx, "{what}: dx error {e:e} > {:e}", tol.dx);
    if let (Some(got), Some(want)) = (&grads.dgamma, &rb.dgamma) {
        let e = rel_err(&widen(got), want);
        if verbose {
            eprintln!("{what}: dgamma {e:.2e}");
        }
        assert!(e <= tol.params, "{what}: dgamma error {e:e} > {:e}", tol.params);
    }
    if let (Some(got), Some(want)) = (&grads.dbeta, &rb.dbeta) {
        let e = rel_err(&widen(got), want);
        if verbose {
            eprintln!("{what}: dbeta {e:.2e}");
        }
        assert!(e <= tol.params, "{what}: dbeta error {e:e} > {:e}", tol.params);
    }
}
