//! Shared test helpers: the one backend per test binary, data generators, the calls through the
//! n-dimensional API, and the comparison against the f64 reference.

// Each test binary uses only some of these helpers.
#![allow(dead_code)]

use std::sync::OnceLock;

use layernorm_core::ndarray::{Array1, Array2, ArrayRef, ArrayView2, Dimension};
use layernorm_core::{
    Backend, DType, Element, Error, NdForward, NdGradients, Norm, NormKind, NormSpec, NormalizeNd,
    Stats, reference,
};
use layernorm_wgpu::WgpuBackend;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// Whether the environment says the device must exist (`LAYERNORM_REQUIRE_WGPU=1`, as CI sets).
pub fn required() -> bool {
    std::env::var("LAYERNORM_REQUIRE_WGPU").is_ok_and(|v| v == "1")
}

/// The backend shared by every test of a binary, or `None` (after printing a skip line) when
/// no adapter exists. With `LAYERNORM_REQUIRE_WGPU=1` a missing adapter fails the test instead.
pub fn backend() -> Option<&'static WgpuBackend> {
    static B: OnceLock<Result<WgpuBackend, Error>> = OnceLock::new();
    match B.get_or_init(WgpuBackend::new) {
        Ok(b) => Some(b),
        Err(e) => {
            if required() {
                panic!("LAYERNORM_REQUIRE_WGPU=1 but the wgpu backend is unavailable: {e}");
            }
            eprintln!("skipped: wgpu backend unavailable ({e})");
            None
        }
    }
}

/// A second backend on its own device that never uses subgroups (the workgroup-memory
/// reductions every device has), shared by the tests of a binary; `None` where [`backend`] is.
pub fn without_subgroups() -> Option<&'static WgpuBackend> {
    static B: OnceLock<WgpuBackend> = OnceLock::new();
    backend()?;
    Some(B.get_or_init(|| WgpuBackend::new().expect("a second device").with_subgroups(false)))
}

/// A backend on its own device whose bindings are capped at 64 KiB and whose grids at 16
/// workgroups per dimension, so that problems of a few thousand elements run as several row
/// chunks on 2-D grids; shared by the tests of a binary, `None` where [`backend`] is.
pub fn capped() -> Option<&'static WgpuBackend> {
    static B: OnceLock<WgpuBackend> = OnceLock::new();
    backend()?;
    Some(B.get_or_init(|| {
        WgpuBackend::new()
            .expect("a second device")
            .with_max_binding_size(64 * 1024)
            .with_max_workgroups_per_dimension(16)
    }))
}

/// Whether `b` computes `dtype`; where it does not, the refusal must be a typed
/// "unsupported" error naming the dtype (f16 on an adapter without `SHADER_F16`), which is
/// printed as a skip line.
pub fn runs(b: &WgpuBackend, dtype: DType) -> bool {
    match b.supports(NormKind::LayerNorm, dtype) {
        Ok(()) => true,
        Err(e) => {
            assert_eq!(e.class(), "unsupported", "{dtype}: {e}");
            assert!(e.to_string().contains(dtype.name()), "{e}");
            eprintln!("skipped {dtype}: {e}");
            false
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
    /// Every element zero.
    Zero,
}

/// `rows × n` values of `dist` from `seed`.
pub fn data(rows: usize, n: usize, dist: Dist, seed: u64) -> Vec<f64> {
    data_as(rows, n, dist, seed, |v| v)
}

/// [`data`] with `f` applied to each value and the result rounded to `T`, without the `f64`
/// copy (the same values as `round::<T>` of the mapped [`data`]).
pub fn data_as<T: Element>(
    rows: usize,
    n: usize,
    dist: Dist,
    seed: u64,
    f: impl Fn(f64) -> f64,
) -> Vec<T> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(rows * n);
    for r in 0..rows {
        let c: f64 = rng.sample(StandardNormal);
        for _ in 0..n {
            let z: f64 = rng.sample(StandardNormal);
            v.push(T::from_f64(f(match dist {
                Dist::Normal => z,
                Dist::Offset(o) => o + z,
                Dist::Scaled(s) => s * z,
                Dist::Constant => c * (r as f64 + 1.0),
                Dist::Zero => 0.0,
            })));
        }
    }
    v
}

/// The smallest normal f32: GPUs may flush anything smaller to zero, so a difference that small
/// is no difference (the reference's subnormal results match 0).
const FLUSH: f64 = f32::MIN_POSITIVE as f64;

/// max |got − want| / max |want| (absolute when want is all zero); NaN anywhere → infinity.
/// Differences below the smallest normal f32 count as none (see [`FLUSH`]).
pub fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut worst = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        if g == w {
            continue; // equal infinities included
        }
        let d = (g - w).abs();
        if d.is_nan() {
            return f64::INFINITY;
        }
        if d > FLUSH {
            worst = worst.max(d);
        }
    }
    if scale > 0.0 && worst > 0.0 { worst / scale } else { worst }
}

/// The worst over rows of max_j |got − want| / `scale[row]` (absolute where a row's scale is 0);
/// NaN anywhere, or a non-finite value where the reference is finite, → infinity. Differences
/// below the smallest normal f32 count as none (see [`FLUSH`]). How `docs/conformance.md`
/// measures y and dx: each row against the size of its own terms.
pub fn row_err(got: &[f64], want: &[f64], scale: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let n = if scale.is_empty() { 1 } else { got.len() / scale.len() };
    let mut worst = 0.0f64;
    for (r, &sc) in scale.iter().enumerate() {
        for j in r * n..(r + 1) * n {
            let (g, w) = (got[j], want[j]);
            if g == w {
                continue;
            }
            let d = (g - w).abs();
            if d.is_nan() {
                return f64::INFINITY;
            }
            if d > FLUSH {
                worst = worst.max(if sc > 0.0 { d / sc } else { d });
            }
        }
    }
    worst
}

/// |got − want| / |want| for one statistic, with the reference rounded to f32 first (the
/// statistics are stored in f32): a reference that rounds to zero or a subnormal wants 0 or
/// itself.
pub fn stat_err(got: f64, want: f64) -> f64 {
    let w32 = want as f32 as f64;
    if got == w32 || (w32.abs() < FLUSH && got.abs() < FLUSH) {
        return 0.0;
    }
    let e = (got - want).abs() / want.abs();
    if e.is_nan() { f64::INFINITY } else { e }
}

pub fn round<T: Element>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

pub fn widen<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|&x| T::to_f64(x)).collect()
}

pub fn widen_iter<'a, T: Element>(v: impl IntoIterator<Item = &'a T>) -> Vec<f64> {
    v.into_iter().map(|&x| T::to_f64(x)).collect()
}

/// The elements of `a` in `f64`, in logical order (through the slice where `a` is contiguous).
pub fn widen_array<T: Element, D: Dimension>(a: &ArrayRef<T, D>) -> Vec<f64> {
    a.as_slice().map_or_else(|| widen_iter(a.iter()), widen)
}

/// A rows × n array of `v`.
pub fn array<T: Element>(rows: usize, n: usize, v: Vec<T>) -> Array2<T> {
    Array2::from_shape_vec((rows, n), v).expect("rows × n elements")
}

/// Error bounds for one dtype.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub y: f64,
    pub stats: f64,
    pub dx: f64,
    pub params: f64,
}

/// f32: about 8 ulp for y, the statistics and dx (docs/conformance.md); 1e-5 for the sums over
/// rows.
pub const F32: Tol = Tol { y: 1e-6, stats: 1e-6, dx: 1e-6, params: 1e-5 };
/// f16 / bf16: one storage ulp at the top of the range (the outputs are rounded once).
pub const F16: Tol = Tol { y: 9.77e-4, stats: 1e-6, dx: 9.77e-4, params: 9.77e-4 };
pub const BF16: Tol = Tol { y: 7.82e-3, stats: 1e-6, dx: 7.82e-3, params: 7.82e-3 };

/// The tolerance of `dtype`.
pub fn tol(dtype: DType) -> Tol {
    match dtype {
        DType::F16 => F16,
        DType::BF16 => BF16,
        _ => F32,
    }
}

/// How the forward takes its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Res {
    /// x alone.
    None,
    /// h = x + residual into a new array.
    Add,
    /// h = x + residual over the residual's array.
    InPlace,
}

/// The pre-norm variants of one forward + backward: the residual, the backward from y, dh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub res: Res,
    pub from_y: bool,
    pub dh: bool,
}

impl Variant {
    pub const PLAIN: Variant = Variant { res: Res::None, from_y: false, dh: false };

    /// Every combination.
    pub fn all() -> Vec<Variant> {
        let mut v = Vec::new();
        for res in [Res::None, Res::Add, Res::InPlace] {
            for from_y in [false, true] {
                for dh in [false, true] {
                    v.push(Variant { res, from_y, dh });
                }
            }
        }
        v
    }
}

/// The n-d call's description of `spec`.
pub fn norm_of(spec: &NormSpec) -> Norm {
    Norm::new(spec.kind).eps(spec.eps).gamma_offset(spec.gamma_offset)
}

/// Forward of `spec` through the n-dimensional API: y, h (with a residual), and the statistics.
pub fn forward<T: Element>(
    b: &WgpuBackend,
    spec: &NormSpec,
    x: &Array2<T>,
    gamma: Option<&[T]>,
    beta: Option<&[T]>,
) -> layernorm_core::Result<NdForward<T, layernorm_core::ndarray::Ix2>> {
    let mut call = b.forward_nd(norm_of(spec), x);
    if let Some(g) = gamma {
        call = call.gamma(g);
    }
    if let Some(be) = beta {
        call = call.beta(be);
    }
    call.run()
}

/// The gradients of one backward.
pub struct Grads {
    pub dx: Vec<f64>,
    pub dgamma: Option<Vec<f64>>,
    pub dbeta: Option<Vec<f64>>,
}

impl<T: Element> From<NdGradients<T, layernorm_core::ndarray::Ix2>> for Grads {
    fn from(g: NdGradients<T, layernorm_core::ndarray::Ix2>) -> Grads {
        Grads {
            dx: widen_array(&g.dx),
            dgamma: g.dgamma.as_ref().map(|d| widen_array(d)),
            dbeta: g.dbeta.as_ref().map(|d| widen_array(d)),
        }
    }
}

/// Backward of `spec` through the n-dimensional API, from x (`saved` is x, with `mean`) or from y
/// (`saved` is y, with β), with `dh` when given.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element>(
    b: &WgpuBackend,
    spec: &NormSpec,
    saved: ArrayView2<'_, T>,
    from_y: bool,
    dy: &Array2<T>,
    mean: Option<&[T::Acc]>,
    rstd: &[T::Acc],
    gamma: Option<&[T]>,
    beta: Option<&[T]>,
    dh: Option<&Array2<T>>,
) -> layernorm_core::Result<Grads> {
    let rstd = Array1::from(rstd.to_vec());
    let mean = mean.map(|m| Array1::from(m.to_vec()));
    let mut stats = Stats::new(&rstd);
    if let Some(m) = &mean {
        stats = stats.with_mean(m);
    }
    let norm = norm_of(spec);
    let mut call = if from_y {
        b.backward_nd_from_output(norm, saved, dy, stats)
    } else {
        b.backward_nd(norm, saved, dy, stats)
    };
    if let Some(g) = gamma {
        call = call.gamma(g);
    }
    if let Some(be) = beta {
        call = call.beta(be);
    }
    if let Some(dh) = dh {
        call = call.dh(dh);
    }
    call.run().map(Grads::from)
}

fn verbose() -> bool {
    std::env::var_os("LAYERNORM_TEST_VERBOSE").is_some()
}

fn assert_within(what: &str, name: &str, e: f64, tol: f64) {
    if verbose() {
        eprintln!("{what}: {name} {e:.2e}");
    }
    assert!(e <= tol, "{what}: {name} error {e:e} > {tol:e}");
}

/// Runs forward and backward of `spec` on `x` (and seeded γ, β, dy) in `T`, and checks every
/// output against the reference evaluated on the same rounded inputs.
pub fn check<T: Element>(b: &WgpuBackend, spec: &NormSpec, x: &[f64], tol: Tol, seed: u64) {
    check_variant::<T>(b, spec, Variant::PLAIN, x, tol, seed)
}

/// [`check`] for one pre-norm variant: a residual (seeded) added ahead of the norm, the backward
/// from y, a seeded dh. h must equal the reference's rounded x + residual bit for bit.
///
/// Only the tensors the problem reads are drawn (γ, β, the residual, dh), each from its own seed,
/// straight into `T`; x̂ is formed where it is read rather than stored: on rows of 2^24 elements
/// every `f64` temporary is 128 MiB of fresh pages.
pub fn check_variant<T: Element>(
    b: &WgpuBackend,
    spec: &NormSpec,
    v: Variant,
    x: &[f64],
    tol: Tol,
    seed: u64,
) {
    let (rows, n) = (spec.rows, spec.n);
    let what = format!(
        "{rows}x{n} {} {} γ={} β={} offset={} eps={} {v:?}",
        spec.kind, spec.dtype, spec.gamma, spec.beta, spec.gamma_offset, spec.eps
    );
    let drawn = |rows, dist, seed| array(rows, n, data_as::<T>(rows, n, dist, seed, |v| v));
    let xt = array(rows, n, round::<T>(x));
    let g: Vec<T> =
        if spec.gamma { data_as(1, n, Dist::Normal, seed + 1, |v| 1.0 + 0.5 * v) } else { vec![] };
    let bt: Vec<T> =
        if spec.beta { data_as(1, n, Dist::Scaled(0.5), seed + 2, |v| v) } else { vec![] };
    let dyt = drawn(rows, Dist::Normal, seed + 3);
    let mut rt = (v.res != Res::None).then(|| drawn(rows, Dist::Scaled(0.75), seed + 4));
    let dht = v.dh.then(|| drawn(rows, Dist::Normal, seed + 5));
    let (x64, dy64) = (widen_array(&xt), widen_array(&dyt));
    let res64 = rt.as_ref().map(|r| widen_array(r));
    let (g64, b64) = (widen(&g), widen(&bt));
    let gamma = spec.gamma.then_some(&g[..]);
    let beta = spec.beta.then_some(&bt[..]);
    let (g64, b64) = (spec.gamma.then_some(&g64[..]), spec.beta.then_some(&b64[..]));

    // Forward; with a residual in place, h comes back in the residual's array.
    let f = {
        let mut call = b.forward_nd(norm_of(spec), &xt);
        if let Some(gm) = gamma {
            call = call.gamma(gm);
        }
        if let Some(be) = beta {
            call = call.beta(be);
        }
        call = match (v.res, rt.as_mut()) {
            (Res::Add, Some(r)) => call.residual(&*r),
            (Res::InPlace, Some(r)) => call.residual_in_place(r.view_mut()),
            _ => call,
        };
        call.run().unwrap_or_else(|e| panic!("{what}: {e}"))
    };
    // The tensor the backward from x reads: x, or the backend's h once it is shown to be the
    // reference's (x + residual rounded to the storage dtype).
    let h_arr = match v.res {
        Res::None => xt.view(),
        Res::Add => f.h.as_ref().expect("h").view(),
        Res::InPlace => rt.as_ref().expect("residual").view(),
    };
    let (h_ref, r) = match &res64 {
        None => (None, reference::forward(spec, &x64, g64, b64).unwrap()),
        Some(res64) => {
            let (h, r) = reference::forward_residual(spec, &x64, res64, g64, b64).unwrap();
            assert!(
                h_arr.iter().zip(&h).all(|(a, &w)| T::to_f64(*a) == T::to_f64(T::from_f64(w))),
                "{what}: h is not the rounded x + residual"
            );
            (Some(h), r)
        }
    };
    // h as the reference rounded it (exactly T's values).
    let h64: &[f64] = h_ref.as_deref().unwrap_or(&x64);
    let geff = |j: usize| g64.map_or(1.0, |g| spec.gamma_offset + g[j]);
    let beta_at = |j: usize| b64.map_or(0.0, |b| b[j]);
    // Per-row scales of y (docs/conformance.md): max_j |x̂_j·γeff_j| + |β_j|.
    let y_scale: Vec<f64> = (0..rows)
        .map(|row| {
            let (mu, rs) = (r.mean.as_ref().map_or(0.0, |m| m[row]), r.rstd[row]);
            let h = &h64[row * n..(row + 1) * n];
            (0..n).fold(0.0f64, |m, j| m.max(((h[j] - mu) * rs * geff(j)).abs() + beta_at(j).abs()))
        })
        .collect();
    let y64 = widen_array(&f.y);
    assert_within(&what, "y", row_err(&y64, &r.y, &y_scale), tol.y);
    let rstd: Vec<T::Acc> = f.saved.rstd.iter().copied().collect();
    let mean: Option<Vec<T::Acc>> = f.saved.mean.as_ref().map(|m| m.iter().copied().collect());
    assert_eq!(mean.is_some(), spec.has_mean(), "{what}: a mean iff the kind has one");
    // The mean is judged against |mean| + std of its row: a mean near 0 of data with std 1 can
    // only be as exact as the data's own f32 rounding.
    if let (Some(got), Some(want)) = (&mean, &r.mean) {
        for (i, (&got, &want)) in got.iter().zip(want).enumerate() {
            let got: f64 = got.into();
            let e = (got - want).abs() / (want.abs() + 1.0 / r.rstd[i]);
            assert!(e <= tol.stats, "{what}: mean[{i}] = {got}, want {want} (rel {e:e})");
        }
    }
    for (i, (&got, &want)) in rstd.iter().zip(&r.rstd).enumerate() {
        let got: f64 = got.into();
        let e = stat_err(got, want);
        assert!(e <= tol.stats, "{what}: rstd[{i}] = {got}, want {want} (rel {e:e})");
    }

    // Backward: from h (or x) with the backend's own statistics, or from the backend's y.
    let rstd64: Vec<f64> = rstd.iter().map(|&v| v.into()).collect();
    let (grads, rb) = if v.from_y {
        let got =
            backward::<T>(b, spec, f.y.view(), true, &dyt, None, &rstd, gamma, beta, dht.as_ref());
        let want = reference::backward_from_output(spec, &y64, &dy64, &rstd64, g64, b64);
        (got, want.unwrap())
    } else {
        let (m, rs) = (mean.as_deref(), &rstd);
        let got = backward::<T>(b, spec, h_arr, false, &dyt, m, rs, gamma, beta, dht.as_ref());
        let want = reference::backward(spec, h64, &dy64, r.mean.as_deref(), &r.rstd, g64).unwrap();
        (got, want)
    };
    let grads = grads.unwrap_or_else(|e| panic!("{what}: backward: {e}"));
    // dx per row against rstd · max_j(|g_j| + |c2| + |x̂_j·c1|) (+ max |dh_j|), from the x̂ the
    // reference used; dγ_j against Σ_i |dy_ij|(|x̂_ij| + 1), dβ_j against Σ_i |dy_ij|.
    let rstd_ref = if v.from_y { &rstd64 } else { &r.rstd };
    let xhat = |row: usize, j: usize| {
        let i = row * n + j;
        if v.from_y {
            (y64[i] - beta_at(j)) / geff(j)
        } else {
            (h64[i] - r.mean.as_ref().map_or(0.0, |m| m[row])) * r.rstd[row]
        }
    };
    let dh64 = dht.as_ref().map(|d| widen_array(d));
    let dx_scale: Vec<f64> = (0..rows)
        .map(|row| {
            let g = |j: usize| dy64[row * n + j] * geff(j);
            let c1 = (0..n).map(|j| g(j) * xhat(row, j)).sum::<f64>() / n as f64;
            let c2 = if spec.has_mean() { (0..n).map(g).sum::<f64>() / n as f64 } else { 0.0 };
            let terms = (0..n)
                .fold(0.0f64, |m, j| m.max(g(j).abs() + c2.abs() + (xhat(row, j) * c1).abs()));
            let dh = dh64.as_ref().map_or(0.0, |d| {
                d[row * n..(row + 1) * n].iter().fold(0.0f64, |m, v| m.max(v.abs()))
            });
            rstd_ref[row].abs() * terms + dh
        })
        .collect();
    let rb = match &dh64 {
        Some(dh) => reference::add_dh(rb, dh).unwrap(),
        None => rb,
    };
    assert_within(&what, "dx", row_err(&grads.dx, &rb.dx, &dx_scale), tol.dx);
    assert_eq!(grads.dgamma.is_some(), spec.gamma, "{what}: dγ iff γ");
    assert_eq!(grads.dbeta.is_some(), spec.beta, "{what}: dβ iff β");
    let col_err = |got: &[f64], want: &[f64], weight: &dyn Fn(usize, usize) -> f64| {
        // Σ over rows in row order for every column, as one pass over dy.
        let mut scale = vec![0.0f64; n];
        for row in 0..rows {
            for (j, s) in scale.iter_mut().enumerate() {
                *s += dy64[row * n + j].abs() * weight(row, j);
            }
        }
        // One "row" per column: row_err over the transposed layout.
        (0..n).fold(0.0f64, |m, j| m.max(row_err(&got[j..=j], &want[j..=j], &scale[j..=j])))
    };
    if let (Some(got), Some(want)) = (&grads.dgamma, &rb.dgamma) {
        let e = col_err(got, want, &|row, j| xhat(row, j).abs() + 1.0);
        assert_within(&what, "dgamma", e, tol.params);
    }
    if let (Some(got), Some(want)) = (&grads.dbeta, &rb.dbeta) {
        assert_within(&what, "dbeta", col_err(got, want, &|_, _| 1.0), tol.params);
    }
}
