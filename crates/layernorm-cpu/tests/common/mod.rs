//! Helpers shared by the CPU backend's integration tests: inputs, pools, calls into fresh
//! outputs, and the comparison with the `f64` reference.

#![allow(dead_code)] // each test file uses its own share

use std::sync::Arc;

use layernorm_core::{BackwardArgs, Element, ForwardArgs, NormSpec, Residual, Result, reference};
use layernorm_cpu::{CpuBackend, CpuElement};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// `n` standard normal values from `seed`.
pub fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..n).map(|_| rng.sample::<f32, _>(StandardNormal)).collect()
}

/// `v` rounded to `T`.
pub fn to<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&v| T::from_f64(f64::from(v))).collect()
}

/// `v` widened to `f64` (exact).
pub fn wide<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|&v| T::to_f64(v)).collect()
}

/// A pool of `threads` threads.
pub fn pool(threads: usize) -> Arc<rayon::ThreadPool> {
    Arc::new(rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap())
}

/// The bits of every element, widened to `f64` (exact), for bitwise comparisons of any dtype.
pub fn bits<T: Element>(v: &[T]) -> Vec<u64> {
    v.iter().map(|&x| T::to_f64(x).to_bits()).collect()
}

/// A forward's outputs, allocated by the test (`mean` stays zero for RMSNorm, which has none).
#[derive(Debug, PartialEq)]
pub struct Fwd<T: CpuElement> {
    pub y: Vec<T>,
    pub mean: Vec<T::Acc>,
    pub rstd: Vec<T::Acc>,
}

/// A backward's outputs, allocated by the test (dγ/dβ when the problem has γ/β).
#[derive(Debug, PartialEq)]
pub struct Grads<T> {
    pub dx: Vec<T>,
    pub dgamma: Option<Vec<T>>,
    pub dbeta: Option<Vec<T>>,
}

/// A forward through `forward_into` into fresh outputs.
pub fn forward<T: CpuElement>(
    cpu: &CpuBackend,
    spec: &NormSpec,
    x: &[T],
    g: Option<&[T]>,
    b: Option<&[T]>,
) -> Result<Fwd<T>> {
    let zero = T::Acc::from_f64(0.0);
    let (mut y, mut mean, mut rstd) = (x.to_vec(), vec![zero; spec.rows], vec![zero; spec.rows]);
    let m = spec.has_mean().then_some(&mut mean[..]);
    cpu.forward_into(spec, x, g, b, &mut y, m, &mut rstd)?;
    Ok(Fwd { y, mean, rstd })
}

/// A backward from x through `backward_into` into fresh outputs, every gradient the problem
/// has (the mean is passed where the kind has one).
pub fn backward<T: CpuElement>(
    cpu: &CpuBackend,
    spec: &NormSpec,
    (x, dy): (&[T], &[T]),
    (mean, rstd): (&[T::Acc], &[T::Acc]),
    g: Option<&[T]>,
) -> Result<Grads<T>> {
    let zero = T::from_f64(0.0);
    let mut dx = vec![zero; x.len()];
    let (mut dg, mut db) = (vec![zero; spec.n], vec![zero; spec.n]);
    let (dgo, dbo) = (spec.gamma.then_some(&mut dg[..]), spec.beta.then_some(&mut db[..]));
    let m = spec.has_mean().then_some(mean);
    cpu.backward_into(spec, x, dy, m, rstd, g, &mut dx, dgo, dbo)?;
    Ok(Grads { dx, dgamma: spec.gamma.then_some(dg), dbeta: spec.beta.then_some(db) })
}

/// Tolerances of a dtype against the reference: y, dx, dγ and dβ relative to the size of the
/// terms that form them (as `docs/conformance.md` measures them), the statistics relative to
/// their own size (the mean to its row's spread).
pub fn tolerance(spec: &NormSpec) -> (f64, f64) {
    match spec.dtype {
        layernorm_core::DType::F64 => (1e-12, 1e-13),
        layernorm_core::DType::F32 => (1e-6, 1e-6),
        layernorm_core::DType::BF16 => (2f64.powi(-8), 1e-6),
        _ => (2f64.powi(-10), 1e-6),
    }
}

/// Forward and backward of `spec` on the CPU against the `f64` reference on the same inputs
/// (rounded to the dtype): every output, with [`tolerance`]. Rows where the reference is not
/// finite must be NaN or infinite where it is. The reference's own error is allowed for: its x̂
/// centres on μ rounded to `f64`, off by up to 2^-53·|μ| (the kernels keep the mean in two
/// parts), which shows in `f64` rows whose |μ| is far above their spread. Returns the outputs.
pub fn check_against_reference<T: CpuElement>(
    cpu: &CpuBackend,
    spec: &NormSpec,
    (x, dy): (&[T], &[T]),
    (g, b): (Option<&[T]>, Option<&[T]>),
    what: &str,
) -> (Fwd<T>, Grads<T>) {
    let (tol, stat_tol) = tolerance(spec);
    let f = forward(cpu, spec, x, g, b).unwrap_or_else(|e| panic!("{what}: {e}"));
    let gr = backward(cpu, spec, (x, dy), (&f.mean, &f.rstd), g)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let (x64, dy64) = (wide(x), wide(dy));
    let (g64, b64) = (g.map(wide), b.map(wide));
    let r = reference::forward(spec, &x64, g64.as_deref(), b64.as_deref()).unwrap();
    let rb =
        reference::backward(spec, &x64, &dy64, r.mean.as_deref(), &r.rstd, g64.as_deref()).unwrap();
    let n = spec.n;
    let acc = |v: T::Acc| -> f64 { v.into() };
    let off = spec.gamma_offset_acc();
    let gj = |j: usize| g64.as_ref().map_or(1.0, |g| off + g[j]);
    let bj = |j: usize| b64.as_ref().map_or(0.0, |b| b[j]);
    // The dtype's smallest step (its least subnormal): what rounding can lose of any value.
    let step = match spec.dtype {
        layernorm_core::DType::F16 => 2f64.powi(-24),
        layernorm_core::DType::BF16 => 2f64.powi(-133),
        layernorm_core::DType::F32 => 2f64.powi(-149),
        _ => 0.0,
    };
    let close = |name: &str, got: f64, want: f64, scale: f64, tol: f64| {
        let ok = if !want.is_finite() {
            !got.is_finite()
        } else if scale == 0.0 {
            (got - want).abs() <= step
        } else {
            (got - want).abs() <= tol * scale + step
        };
        assert!(ok, "{what}: {name}: got {got:e}, want {want:e} (scale {scale:e})");
    };
    let (mut sum_dgx, mut sum_dy) = (vec![0f64; n], vec![0f64; n]);
    let mut slack_dg = vec![0f64; n];
    for row in 0..spec.rows {
        let span = row * n..(row + 1) * n;
        let rs = r.rstd[row];
        let mu = r.mean.as_ref().map_or(0.0, |m| m[row]);
        close(&format!("rstd[{row}]"), acc(f.rstd[row]), rs, rs.abs(), stat_tol);
        if let Some(m) = &r.mean {
            let spread = if rs > 0.0 { 1.0 / rs } else { f64::INFINITY };
            close(
                &format!("mean[{row}]"),
                acc(f.mean[row]),
                m[row],
                m[row].abs().max(spread),
                stat_tol,
            );
        } else {
            assert_eq!(acc(f.mean[row]), 0.0, "{what}: RMSNorm writes no mean");
        }
        let xhat: Vec<f64> = x64[span.clone()].iter().map(|&v| (v - mu) * rs).collect();
        // The reference's x̂ error, as a share of the scales below.
        let ref_xhat = 2f64.powi(-52) * mu.abs() * rs;
        let y_scale = (0..n).map(|j| (xhat[j] * gj(j)).abs() + bj(j).abs()).fold(0.0, f64::max);
        let y_slack = ref_xhat * (0..n).map(|j| gj(j).abs()).fold(0.0, f64::max);
        for j in 0..n {
            let got = T::to_f64(f.y[row * n + j]);
            close(
                &format!("y[{row}][{j}]"),
                got,
                r.y[row * n + j],
                y_scale,
                tol + y_slack / y_scale,
            );
        }
        let gs: Vec<f64> = (0..n).map(|j| dy64[row * n + j] * gj(j)).collect();
        let c1 = gs.iter().zip(&xhat).map(|(g, h)| g * h).sum::<f64>() / n as f64;
        let c2 = if spec.has_mean() { gs.iter().sum::<f64>() / n as f64 } else { 0.0 };
        let dx_scale =
            rs * (0..n).map(|j| gs[j].abs() + c2.abs() + (xhat[j] * c1).abs()).fold(0.0, f64::max);
        let dx_slack = rs * (c1.abs() + gs.iter().fold(0.0, |m: f64, g| m.max(g.abs()))) * ref_xhat;
        for j in 0..n {
            let got = T::to_f64(gr.dx[row * n + j]);
            let t = tol + dx_slack / dx_scale;
            close(&format!("dx[{row}][{j}]"), got, rb.dx[row * n + j], dx_scale, t);
            sum_dgx[j] += dy64[row * n + j].abs() * (xhat[j].abs() + 1.0);
            slack_dg[j] += dy64[row * n + j].abs() * ref_xhat;
            sum_dy[j] += dy64[row * n + j].abs();
        }
    }
    let no_slack = vec![0f64; n];
    let pairs = [
        ("dgamma", gr.dgamma.as_deref(), rb.dgamma.as_deref(), &sum_dgx, &slack_dg),
        ("dbeta", gr.dbeta.as_deref(), rb.dbeta.as_deref(), &sum_dy, &no_slack),
    ];
    for (name, got, want, scale, slack) in pairs {
        let (Some(got), Some(want)) = (got, want) else {
            assert!(got.is_none() && want.is_none(), "{what}: {name} present in one only");
            continue;
        };
        for j in 0..n {
            let t = 5.0 * tol + slack[j] / scale[j];
            close(&format!("{name}[{j}]"), T::to_f64(got[j]), want[j], scale[j], t);
        }
    }
    (f, gr)
}

/// How a fused residual forward takes its residual.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Res {
    /// Into a separate h.
    Add,
    /// Over the residual's buffer.
    InPlace,
}

/// A fused residual forward through `forward_typed` into fresh outputs: (h, the forward of h).
/// In place, the returned h is the residual's buffer after the call.
pub fn forward_residual<T: CpuElement>(
    cpu: &CpuBackend,
    spec: &NormSpec,
    (x, residual): (&[T], &[T]),
    (g, b): (Option<&[T]>, Option<&[T]>),
    how: Res,
) -> Result<(Vec<T>, Fwd<T>)> {
    let zero = T::Acc::from_f64(0.0);
    let (mut y, mut mean, mut rstd) = (x.to_vec(), vec![zero; spec.rows], vec![zero; spec.rows]);
    let mut h = match how {
        Res::Add => vec![T::from_f64(0.0); x.len()],
        Res::InPlace => residual.to_vec(),
    };
    let m = spec.has_mean().then_some(&mut mean[..]);
    let args = ForwardArgs::new(
        T::host(x),
        g.map(T::host),
        b.map(T::host),
        T::host_mut(&mut y),
        m.map(T::Acc::host_mut),
        T::Acc::host_mut(&mut rstd),
    );
    let args = args.with_residual(match how {
        Res::Add => Residual::Add { residual: T::host(residual), h: T::host_mut(&mut h) },
        Res::InPlace => Residual::InPlace(T::host_mut(&mut h)),
    });
    cpu.forward_typed::<T>(spec, args)?;
    Ok((h, Fwd { y, mean, rstd }))
}

/// What a backward reads x̂ from, for [`backward_variant`].
#[derive(Clone, Copy, Debug)]
pub enum From<'a, T> {
    /// x (or h) with the saved mean where the kind has one.
    X(&'a [T]),
    /// y with β where the problem has one.
    Y(&'a [T]),
}

/// A backward through `backward_typed` from x or y, with dh where given, into fresh outputs
/// (every gradient the problem has).
pub fn backward_variant<T: CpuElement>(
    cpu: &CpuBackend,
    spec: &NormSpec,
    (saved, dy, dh): (From<'_, T>, &[T], Option<&[T]>),
    (mean, rstd): (&[T::Acc], &[T::Acc]),
    (g, b): (Option<&[T]>, Option<&[T]>),
) -> Result<Grads<T>> {
    let zero = T::from_f64(0.0);
    let mut dx = vec![zero; dy.len()];
    let (mut dg, mut db) = (vec![zero; spec.n], vec![zero; spec.n]);
    let (dgo, dbo) = (spec.gamma.then_some(&mut dg[..]), spec.beta.then_some(&mut db[..]));
    let x = match saved {
        From::X(x) | From::Y(x) => x,
    };
    let m = (spec.has_mean() && matches!(saved, From::X(_))).then_some(mean);
    let mut args = BackwardArgs::new(
        T::host(x),
        T::host(dy),
        m.map(T::Acc::host),
        T::Acc::host(rstd),
        g.map(T::host),
        T::host_mut(&mut dx),
        dgo.map(T::host_mut),
        dbo.map(T::host_mut),
    );
    if let From::Y(y) = saved {
        args = args.from_output(T::host(y), b.map(T::host));
    }
    if let Some(dh) = dh {
        args = args.with_dh(T::host(dh));
    }
    cpu.backward_typed::<T>(spec, args)?;
    Ok(Grads { dx, dgamma: spec.gamma.then_some(dg), dbeta: spec.beta.then_some(db) })
}
