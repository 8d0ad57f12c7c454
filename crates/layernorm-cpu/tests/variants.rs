//! The pre-norm variants on the CPU (`docs/math.md` (14)–(16)): the fused residual forward (h
//! into a buffer of its own, or over the residual's), the backward with dh, and the backward
//! from y — both kinds, every dtype, with and without γ, β and a γ offset, at lengths that reach
//! every kernel path — against the `f64` reference and against the plain calls they must equal
//! bit for bit; and their determinism across pools, streamed outputs, a singular γ, poisoned
//! rows, and the n-d layer.

mod common;

use common::{
    From, Grads, Res, backward, backward_variant, bits, check_against_reference, forward,
    forward_residual, normal, pool, to, tolerance, wide,
};
use layernorm_core::ndarray::{Array2, ShapeBuilder, s};
use layernorm_core::{
    DType, Element, Error, Norm, NormKind, NormSpec, NormalizeNd, bf16, f16, reference,
};
use layernorm_cpu::{CpuBackend, CpuElement, Stores};

/// Lengths that reach every path: the short-row groups of both passes (7, 40), `f32`'s pipelined
/// backward below its pipelined forward (100), `f32`'s pipelined forward and the grouped 16-bit
/// and `f64` forward (300), the pipelined 16-bit and `f64` forward with tails (777), and rows
/// staged two at a time in the backward (2053).
const LENGTHS: [usize; 6] = [7, 40, 100, 300, 777, 2053];
/// A whole block of 32 rows and a ragged one.
const ROWS: usize = 37;

/// A problem's tensors in `T`: x, the residual, dy, dh, γ (within 0.8 of 1 − offset, so that
/// γ_eff is within 0.8 of 1) and β.
struct Inputs<T> {
    x: Vec<T>,
    r: Vec<T>,
    dy: Vec<T>,
    dh: Vec<T>,
    g: Vec<T>,
    b: Vec<T>,
}

impl<T: CpuElement> Inputs<T> {
    /// Rows of every sort, by row: ordinary; at a large mean; a residual that cancels x to a
    /// few units of rounding; a constant h; a residual far larger than x; zero.
    fn new(rows: usize, n: usize, offset: f64, seed: u64) -> Inputs<T> {
        let u = normal(rows * n, seed);
        let v = normal(rows * n, seed + 1);
        let x: Vec<T> = to(&(0..rows * n)
            .map(|i| match (i / n) % 6 {
                1 => 1e3 + u[i],
                5 => 0.0,
                _ => 2.0 * u[i],
            })
            .collect::<Vec<_>>());
        let r: Vec<T> = to(&(0..rows * n)
            .map(|i| {
                let xi = T::to_f64(x[i]) as f32;
                match (i / n) % 6 {
                    2 => -xi * (1.0 + 1e-3 * v[i]),
                    3 => 3.5 - xi,
                    4 => 300.0 * v[i],
                    5 => 0.0,
                    _ => v[i],
                }
            })
            .collect::<Vec<_>>());
        let centre = 1.0 - offset as f32;
        Inputs {
            x,
            r,
            dy: to(&normal(rows * n, seed + 2)),
            dh: to(&normal(rows * n, seed + 3).iter().map(|v| 0.5 * v).collect::<Vec<_>>()),
            g: to(&normal(n, seed + 4)
                .iter()
                .map(|v| centre + (0.5 * v).clamp(-0.8, 0.8))
                .collect::<Vec<_>>()),
            b: to(&normal(n, seed + 5).iter().map(|v| 0.5 * v).collect::<Vec<_>>()),
        }
    }

    /// γ and β as `spec` has them.
    fn params(&self, spec: &NormSpec) -> (Option<&[T]>, Option<&[T]>) {
        (spec.gamma.then_some(&self.g[..]), spec.beta.then_some(&self.b[..]))
    }
}

/// The problems each length runs, with their γ offset: γ and β; γ alone; γ and β around a γ
/// offset of 1; β without γ; neither.
fn problems(kind: NormKind, rows: usize, n: usize, dtype: DType) -> Vec<NormSpec> {
    let base = NormSpec::new(kind, rows, n, dtype);
    vec![
        base.clone().with_gamma(true).with_beta(true),
        base.clone().with_gamma(true).with_beta(false),
        base.clone().with_gamma(true).with_beta(true).with_gamma_offset(1.0),
        base.clone().with_gamma(false).with_beta(true),
        base.with_gamma(false).with_beta(false),
    ]
}

fn label(spec: &NormSpec) -> String {
    format!(
        "{} {} {}x{} γ {} β {} offset {}",
        spec.kind, spec.dtype, spec.rows, spec.n, spec.gamma, spec.beta, spec.gamma_offset
    )
}

/// Runs `f` on every problem of [`problems`] at every length of [`LENGTHS`], in both kinds.
fn each_problem<T: CpuElement>(mut f: impl FnMut(&NormSpec, &Inputs<T>)) {
    for kind in NormKind::ALL {
        for n in LENGTHS {
            for spec in problems(kind, ROWS, n, T::DTYPE) {
                let inputs = Inputs::<T>::new(ROWS, n, spec.gamma_offset, n as u64);
                f(&spec, &inputs);
            }
        }
    }
}

/// Bitwise equality of two optional outputs.
fn same_opt<T: Element>(what: &str, got: &Option<Vec<T>>, want: &Option<Vec<T>>) {
    assert_eq!(got.as_deref().map(bits), want.as_deref().map(bits), "{what}");
}

fn residual_forward_is_the_forward_of_the_rounded_sum<T: CpuElement>() {
    let cpu = CpuBackend::new();
    each_problem::<T>(|spec, inp| {
        let what = label(spec);
        let (g, b) = inp.params(spec);
        let (h, f) = forward_residual(&cpu, spec, (&inp.x, &inp.r), (g, b), Res::Add)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        // h is the exact sum rounded once (the reference's h).
        let (g64, b64) = (g.map(wide), b.map(wide));
        let (want_h, _) = reference::forward_residual(
            spec,
            &wide(&inp.x),
            &wide(&inp.r),
            g64.as_deref(),
            b64.as_deref(),
        )
        .unwrap();
        assert_eq!(bits(&h), bits(&to_t::<T>(&want_h)), "{what}: h");
        // y and the statistics are bitwise the plain forward's of the stored h.
        let plain = forward(&cpu, spec, &h, g, b).unwrap();
        assert_eq!(bits(&f.y), bits(&plain.y), "{what}: y");
        assert_eq!(bits(&f.mean), bits(&plain.mean), "{what}: mean");
        assert_eq!(bits(&f.rstd), bits(&plain.rstd), "{what}: rstd");
        // In place, the residual's buffer receives the same h, and y is the same.
        let (h2, f2) =
            forward_residual(&cpu, spec, (&inp.x, &inp.r), (g, b), Res::InPlace).unwrap();
        assert_eq!(bits(&h2), bits(&h), "{what}: h in place");
        assert_eq!(bits(&f2.y), bits(&f.y), "{what}: y in place");
        assert_eq!(bits(&f2.rstd), bits(&f.rstd), "{what}: rstd in place");
        // The forward of h and the backward from h, against the reference.
        check_against_reference(&cpu, spec, (&h, &inp.dy), (g, b), &what);
    });
}

#[test]
fn the_residual_forward_is_the_plain_forward_of_the_rounded_sum_in_every_dtype() {
    residual_forward_is_the_forward_of_the_rounded_sum::<f32>();
    residual_forward_is_the_forward_of_the_rounded_sum::<f64>();
    residual_forward_is_the_forward_of_the_rounded_sum::<bf16>();
    residual_forward_is_the_forward_of_the_rounded_sum::<f16>();
}

/// `v` rounded to `T`.
fn to_t<T: Element>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&v| T::from_f64(v)).collect()
}

/// Per row of a reference backward: x̂ (from `xhat(r, j)`), g = dy·γ_eff, c1, c2, and the scale of
/// dx the tolerance is relative to (`docs/conformance.md`: rstd·max_j(|g| + |c2| + |x̂·c1|)).
struct RowTerms {
    xhat: Vec<f64>,
    g: Vec<f64>,
    c1: f64,
    scale: f64,
}

fn row_terms(
    spec: &NormSpec,
    (dy, rstd): (&[f64], f64),
    g64: Option<&[f64]>,
    xhat: impl Fn(usize) -> f64,
) -> RowTerms {
    let n = spec.n;
    let ge = |j: usize| g64.map_or(1.0, |g| spec.gamma_offset_acc() + g[j]);
    let xhat: Vec<f64> = (0..n).map(xhat).collect();
    let g: Vec<f64> = (0..n).map(|j| dy[j] * ge(j)).collect();
    let c1 = g.iter().zip(&xhat).map(|(g, x)| g * x).sum::<f64>() / n as f64;
    let c2 = if spec.has_mean() { g.iter().sum::<f64>() / n as f64 } else { 0.0 };
    let scale =
        rstd * (0..n).map(|j| g[j].abs() + c2.abs() + (xhat[j] * c1).abs()).fold(0.0, f64::max);
    RowTerms { xhat, g, c1, scale }
}

/// `got` within `tol · scale + allow` of `want` (NaN where `want` is NaN; beyond the smallest
/// subnormal of `T`).
fn close<T: Element>(what: &str, got: T, want: f64, tol: f64, scale: f64, allow: f64) {
    let got = T::to_f64(got);
    let step = match T::DTYPE {
        DType::F16 => 2f64.powi(-24),
        DType::BF16 => 2f64.powi(-133),
        DType::F32 => 2f64.powi(-149),
        _ => 0.0,
    };
    let ok = if want.is_finite() {
        (got - want).abs() <= tol * scale + allow + step
    } else {
        !got.is_finite()
    };
    assert!(ok, "{what}: got {got:e}, want {want:e} (scale {scale:e}, allowance {allow:e})");
}

fn dh_is_added_in_one_rounding<T: CpuElement>() {
    let cpu = CpuBackend::new();
    each_problem::<T>(|spec, inp| {
        let what = label(spec);
        let (g, b) = inp.params(spec);
        let (x, dy, dh) = (&inp.x[..], &inp.dy[..], &inp.dh[..]);
        let f = forward(&cpu, spec, x, g, b).unwrap();
        let stats = (&f.mean[..], &f.rstd[..]);
        let plain = backward(&cpu, spec, (x, dy), stats, g).unwrap();
        let with = backward_variant(&cpu, spec, (From::X(x), dy, Some(dh)), stats, (g, b))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        // dγ and dβ do not read dh: the plain backward's bits.
        same_opt(&format!("{what}: dgamma"), &with.dgamma, &plain.dgamma);
        same_opt(&format!("{what}: dbeta"), &with.dbeta, &plain.dbeta);
        // f32, f64: the kernels' dx is already in the accumulation type, so dx + dh rounded
        // once is bitwise the plain dx plus dh in that type.
        if T::DTYPE == DType::F32 || T::DTYPE == DType::F64 {
            for (j, ((&got, &d), &h)) in with.dx.iter().zip(&plain.dx).zip(dh).enumerate() {
                let want = T::from_acc(T::to_acc(d) + T::to_acc(h));
                assert_eq!(bits(&[got]), bits(&[want]), "{what}: dx[{j}]");
            }
        }
        // Every dtype: the reference's dx plus dh, within the dtype's tolerance of the terms.
        let (x64, dy64, g64, b64) = (wide(x), wide(dy), g.map(wide), b.map(wide));
        let r = reference::forward(spec, &x64, g64.as_deref(), b64.as_deref()).unwrap();
        let rb = reference::backward(spec, &x64, &dy64, r.mean.as_deref(), &r.rstd, g64.as_deref())
            .unwrap();
        let rb = reference::add_dh(rb, &wide(dh)).unwrap();
        let (tol, _) = tolerance(spec);
        let n = spec.n;
        for row in 0..spec.rows {
            let span = row * n..(row + 1) * n;
            let mu = r.mean.as_ref().map_or(0.0, |m| m[row]);
            let rs = r.rstd[row];
            let t = row_terms(spec, (&dy64[span.clone()], rs), g64.as_deref(), |j| {
                (x64[row * n + j] - mu) * rs
            });
            for j in 0..n {
                let i = row * n + j;
                let scale = t.scale + T::to_f64(dh[i]).abs();
                close(&format!("{what}: dx[{row}][{j}]"), with.dx[i], rb.dx[i], tol, scale, 0.0);
            }
        }
    });
}

#[test]
fn dh_is_added_to_dx_in_one_rounding_in_every_dtype() {
    dh_is_added_in_one_rounding::<f32>();
    dh_is_added_in_one_rounding::<f64>();
    dh_is_added_in_one_rounding::<bf16>();
    dh_is_added_in_one_rounding::<f16>();
}

/// The from-y allowance of `docs/numerics.md` for a y taken as exact (its storage rounding is
/// already in the y both sides read, so u_s = 0): per element of dx, and per column of dγ.
fn from_y_allowance<T: CpuElement>(
    spec: &NormSpec,
    (y64, dy64, rstd64): (&[f64], &[f64], &[f64]),
    (g64, b64): (Option<&[f64]>, Option<&[f64]>),
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let ua = if T::DTYPE == DType::F64 { 2f64.powi(-53) } else { 2f64.powi(-24) };
    let u = 2f64.powi(-53);
    let n = spec.n;
    let ge = |j: usize| g64.map_or(1.0, |g| spec.gamma_offset_acc() + g[j]);
    let bj = |j: usize| b64.map_or(0.0, |b| b[j]);
    let (mut dx_allow, mut scales, mut dg_allow) =
        (vec![0.0; spec.rows * n], vec![0.0; spec.rows], vec![0.0; n]);
    for row in 0..spec.rows {
        let rs = rstd64[row];
        let span = row * n..(row + 1) * n;
        let t =
            row_terms(spec, (&dy64[span.clone()], rs), g64, |j| (y64[row * n + j] - bj(j)) / ge(j));
        let delta: Vec<f64> = (0..n)
            .map(|j| {
                (2.0 * ua + 3.0 * u) * (t.xhat[j].abs() + bj(j).abs() / ge(j).abs())
                    + (5.0 * ua + 5.0 * u) * t.xhat[j].abs()
            })
            .collect();
        let big_c = (0..n).map(|j| t.g[j].abs() * delta[j]).sum::<f64>() / n as f64;
        for j in 0..n {
            dx_allow[row * n + j] =
                rs * (t.c1.abs() * delta[j] + (t.xhat[j].abs() + delta[j]) * big_c);
            dg_allow[j] += dy64[row * n + j].abs() * delta[j];
        }
        scales[row] = t.scale;
    }
    (dx_allow, scales, dg_allow)
}

/// The backward from `y` (with `dh` where given) against the reference's backward from the same
/// y and rstd, within the dtype's tolerance plus the from-y allowance; dβ bitwise the plain
/// backward's (it reads dy alone). Returns the gradients.
#[allow(clippy::too_many_arguments)]
fn check_from_y<T: CpuElement>(
    cpu: &CpuBackend,
    spec: &NormSpec,
    (y, dy, dh): (&[T], &[T], Option<&[T]>),
    rstd: &[T::Acc],
    (g, b): (Option<&[T]>, Option<&[T]>),
    plain_dbeta: Option<&Option<Vec<T>>>,
    what: &str,
) -> Grads<T> {
    let zeros = vec![T::Acc::from_f64(0.0); rstd.len()];
    let got = backward_variant(cpu, spec, (From::Y(y), dy, dh), (&zeros, rstd), (g, b))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    if let Some(want) = plain_dbeta {
        same_opt(&format!("{what}: dbeta"), &got.dbeta, want);
    }
    let (y64, dy64, rstd64) = (wide(y), wide(dy), wide(rstd));
    let (g64, b64) = (g.map(wide), b.map(wide));
    let want =
        reference::backward_from_output(spec, &y64, &dy64, &rstd64, g64.as_deref(), b64.as_deref())
            .unwrap();
    let want = match dh {
        Some(dh) => reference::add_dh(want, &wide(dh)).unwrap(),
        None => want,
    };
    let (allow, scales, dg_allow) =
        from_y_allowance::<T>(spec, (&y64, &dy64, &rstd64), (g64.as_deref(), b64.as_deref()));
    let (tol, _) = tolerance(spec);
    let n = spec.n;
    for i in 0..y.len() {
        let scale = scales[i / n] + dh.map_or(0.0, |h| T::to_f64(h[i]).abs());
        close(
            &format!("{what}: dx[{}][{}]", i / n, i % n),
            got.dx[i],
            want.dx[i],
            tol,
            scale,
            allow[i],
        );
    }
    if let (Some(gd), Some(wd)) = (&got.dgamma, &want.dgamma) {
        for j in 0..n {
            // As `check_against_reference` scales dγ: Σ|dy|·(|x̂| + 1).
            let scale: f64 = (0..spec.rows)
                .map(|r| {
                    let i = r * n + j;
                    let ge = g64.as_ref().map_or(1.0, |g| spec.gamma_offset_acc() + g[j]);
                    let bj = b64.as_ref().map_or(0.0, |b| b[j]);
                    dy64[i].abs() * (((y64[i] - bj) / ge).abs() + 1.0)
                })
                .sum();
            close(&format!("{what}: dgamma[{j}]"), gd[j], wd[j], 5.0 * tol, scale, dg_allow[j]);
        }
    }
    got
}

fn from_y_matches_the_reference<T: CpuElement>() {
    let cpu = CpuBackend::new();
    each_problem::<T>(|spec, inp| {
        let what = label(spec);
        let (g, b) = inp.params(spec);
        let f = forward(&cpu, spec, &inp.x, g, b).unwrap();
        let stats = (&f.mean[..], &f.rstd[..]);
        let plain = backward(&cpu, spec, (&inp.x, &inp.dy), stats, g).unwrap();
        let y = &f.y[..];
        check_from_y(&cpu, spec, (y, &inp.dy, None), &f.rstd, (g, b), Some(&plain.dbeta), &what);
        let with = format!("{what}, dh");
        let dh = Some(&inp.dh[..]);
        let got = check_from_y(&cpu, spec, (y, &inp.dy, dh), &f.rstd, (g, b), None, &with);
        // dh changes dx alone.
        let alone = check_from_y(&cpu, spec, (y, &inp.dy, None), &f.rstd, (g, b), None, &what);
        same_opt(&format!("{with}: dgamma"), &got.dgamma, &alone.dgamma);
        same_opt(&format!("{with}: dbeta"), &got.dbeta, &alone.dbeta);
        // From the h of a residual forward: the pre-norm block's backward.
        let (h, fr) = forward_residual(&cpu, spec, (&inp.x, &inp.r), (g, b), Res::Add).unwrap();
        let block = format!("{what}, residual block");
        let yr = &fr.y[..];
        check_from_y(&cpu, spec, (yr, &inp.dy, dh), &fr.rstd, (g, b), None, &block);
        let from_h =
            backward_variant(&cpu, spec, (From::X(&h), &inp.dy, dh), (&fr.mean, &fr.rstd), (g, b))
                .unwrap();
        let plain_h = backward(&cpu, spec, (&h, &inp.dy), (&fr.mean, &fr.rstd), g).unwrap();
        same_opt(&format!("{block}: dgamma from h"), &from_h.dgamma, &plain_h.dgamma);
    });
}

#[test]
fn the_backward_from_y_is_within_the_from_y_bound_in_every_dtype() {
    from_y_matches_the_reference::<f32>();
    from_y_matches_the_reference::<f64>();
    from_y_matches_the_reference::<bf16>();
    from_y_matches_the_reference::<f16>();
}

#[test]
fn the_backward_from_y_takes_x_hat_as_recovered() {
    // A y whose recovered x̂ has a mean far from 0 (not one a forward gives): the backward uses
    // x̂ as recovered, as the reference and the from-y bound do, and does not centre it again
    // (LayerNorm still subtracts c2 = mean(g)).
    fn each<T: CpuElement>() {
        let cpu = CpuBackend::new();
        for kind in NormKind::ALL {
            for n in LENGTHS {
                let rows = 9;
                let spec = NormSpec::new(kind, rows, n, T::DTYPE).with_beta(true);
                let inp = Inputs::<T>::new(rows, n, 0.0, 30 + n as u64);
                let y: Vec<T> =
                    to(&normal(rows * n, 31).iter().map(|v| 0.7 + v).collect::<Vec<_>>());
                let rstd: Vec<T::Acc> =
                    (0..rows).map(|r| T::Acc::from_f64(0.5 + r as f64 / 4.0)).collect();
                let what = format!("{}, an arbitrary y", label(&spec));
                let (g, b) = inp.params(&spec);
                check_from_y(&cpu, &spec, (&y, &inp.dy, None), &rstd, (g, b), None, &what);
            }
        }
    }
    each::<f32>();
    each::<f64>();
    each::<bf16>();
}

#[test]
fn extreme_rstd_rows_take_the_exact_path_when_staged_too() {
    // ε = 1e-40 on a row of zeros: an rstd of 1e20, past what the kernels' distributed second
    // sweep takes (`row::needs_exact_row`), so those rows run exactly, staged for dh as
    // unstaged: dx + dh is the plain dx plus dh, dγ/dβ the plain ones. From y, the kernels are
    // given an rstd of 1 and the saved one scales their result: finite, as the reference.
    let cpu = CpuBackend::new();
    for kind in NormKind::ALL {
        for n in [7usize, 300, 777] {
            let spec = NormSpec::new(kind, 9, n, DType::F32).with_eps(1e-40);
            let mut x = normal(9 * n, 5);
            x[2 * n..3 * n].fill(0.0);
            let dy = normal(9 * n, 6);
            let dh = normal(9 * n, 7);
            let (g, b) = (normal(n, 8), normal(n, 9));
            let what = format!("{kind} n={n}");
            let f = forward(&cpu, &spec, &x, Some(&g), Some(&b)).unwrap();
            assert!(f.rstd[2] > 1e19, "{what}: rstd {}", f.rstd[2]);
            let stats = (&f.mean[..], &f.rstd[..]);
            let plain = backward(&cpu, &spec, (&x, &dy), stats, Some(&g)).unwrap();
            let params = (Some(&g[..]), Some(&b[..]));
            let with = backward_variant(&cpu, &spec, (From::X(&x), &dy, Some(&dh)), stats, params)
                .unwrap();
            let want: Vec<f32> = plain.dx.iter().zip(&dh).map(|(d, h)| d + h).collect();
            assert_eq!(bits(&with.dx), bits(&want), "{what}: dx");
            same_opt(&format!("{what}: dgamma"), &with.dgamma, &plain.dgamma);
            let from_y =
                backward_variant(&cpu, &spec, (From::Y(&f.y), &dy, None), stats, params).unwrap();
            let ref_y = reference::backward_from_output(
                &spec,
                &wide(&f.y),
                &wide(&dy),
                &wide(&f.rstd),
                Some(&wide(&g)),
                Some(&wide(&b)),
            )
            .unwrap();
            for (i, (&got, &want)) in from_y.dx.iter().zip(&ref_y.dx).enumerate() {
                assert_eq!(got.is_finite(), want.is_finite(), "{what}: dx[{i}] {got} vs {want}");
            }
        }
    }
}

/// Every variant of a problem on a pool of each thread count: h, y and the statistics of the
/// residual forward (both ways), dx, dγ and dβ of the backward with dh, from y, and from y with
/// dh — bitwise the same on every pool.
fn variants_on_pools<T: CpuElement>(kind: NormKind, (rows, n): (usize, usize)) {
    let spec = NormSpec::new(kind, rows, n, T::DTYPE).with_beta(true);
    let inp = Inputs::<T>::new(rows, n, 0.0, 40);
    let (g, b) = (Some(&inp.g[..]), Some(&inp.b[..]));
    let mut first: Option<Vec<Vec<u64>>> = None;
    for threads in [1, 2, 3, 8] {
        let cpu = CpuBackend::with_pool(pool(threads));
        let mut got = Vec::new();
        let (h, f) = forward_residual(&cpu, &spec, (&inp.x, &inp.r), (g, b), Res::Add).unwrap();
        got.extend([bits(&h), bits(&f.y), bits(&f.mean), bits(&f.rstd)]);
        let (h2, f2) =
            forward_residual(&cpu, &spec, (&inp.x, &inp.r), (g, b), Res::InPlace).unwrap();
        got.extend([bits(&h2), bits(&f2.y)]);
        let stats = (&f.mean[..], &f.rstd[..]);
        let dh = Some(&inp.dh[..]);
        for saved in [From::X(&h[..]), From::Y(&f.y[..])] {
            for dh in [None, dh] {
                if matches!(saved, From::X(_)) && dh.is_none() {
                    continue;
                }
                let gr =
                    backward_variant(&cpu, &spec, (saved, &inp.dy, dh), stats, (g, b)).unwrap();
                got.extend([bits(&gr.dx), bits(&gr.dgamma.unwrap()), bits(&gr.dbeta.unwrap())]);
            }
        }
        match &first {
            None => first = Some(got),
            Some(want) => {
                let bad = got.iter().zip(want).position(|(a, b)| a != b);
                let what = format!("{kind} {} {rows}x{n}", T::DTYPE);
                assert!(bad.is_none(), "{what}: output {bad:?} differs at {threads} threads");
            }
        }
    }
}

#[test]
fn every_variant_is_bitwise_identical_on_any_pool() {
    for kind in NormKind::ALL {
        // Parallel calls (at least 2^18 elements): short rows, long rows, 16-bit, f64; and
        // rows long enough for the column chunks of a backward from x, which these variants
        // run row-wise.
        variants_on_pools::<f32>(kind, (2100, 128));
        variants_on_pools::<f32>(kind, (300, 1000));
        variants_on_pools::<bf16>(kind, (300, 1000));
        variants_on_pools::<f16>(kind, (2100, 130));
        variants_on_pools::<f64>(kind, (150, 1800));
        variants_on_pools::<f32>(kind, (3, 1 << 17));
    }
}

#[test]
fn very_long_rows_run_the_variants_row_wise_against_the_reference() {
    // Rows of 2^20: a backward from x takes the column chunks; from y and with dh they run
    // row-wise, staged a row at a time.
    let cpu = CpuBackend::new();
    let (rows, n) = (2, 1 << 20);
    for kind in NormKind::ALL {
        let spec = NormSpec::new(kind, rows, n, DType::F32).with_beta(true);
        let inp = Inputs::<f32>::new(rows, n, 0.0, 50);
        let (g, b) = (Some(&inp.g[..]), Some(&inp.b[..]));
        let f = forward(&cpu, &spec, &inp.x, g, b).unwrap();
        let what = format!("{kind} {rows}x{n}");
        let dh = Some(&inp.dh[..]);
        check_from_y(&cpu, &spec, (&f.y, &inp.dy, dh), &f.rstd, (g, b), None, &what);
        let stats = (&f.mean[..], &f.rstd[..]);
        let plain = backward(&cpu, &spec, (&inp.x, &inp.dy), stats, g).unwrap();
        let with =
            backward_variant(&cpu, &spec, (From::X(&inp.x), &inp.dy, dh), stats, (g, b)).unwrap();
        // The column chunks and the row-wise kernels give the same bits (`columns`).
        same_opt(&format!("{what}: dgamma"), &with.dgamma, &plain.dgamma);
        let want: Vec<f32> = plain.dx.iter().zip(&inp.dh).map(|(d, h)| d + h).collect();
        assert_eq!(bits(&with.dx), bits(&want), "{what}: dx");
    }
}

fn streamed_like_cached<T: CpuElement>(rows: usize, n: usize) {
    // Outputs at odd offsets from a cache line, so that streamed chunks have heads and tails.
    let spec = NormSpec::layer_norm(rows, n, T::DTYPE);
    let inp = Inputs::<T>::new(rows, n, 0.0, 60);
    let (g, b) = (Some(&inp.g[..]), Some(&inp.b[..]));
    let run = |stores: Stores| {
        let cpu = CpuBackend::new().with_stores(stores);
        let zero = T::from_f64(0.0);
        let mut out = Vec::new();
        for off in [0usize, 1, 3] {
            let (mut hbuf, mut ybuf) = (vec![zero; rows * n + off], vec![zero; rows * n + off]);
            let (mut mean, mut rstd) =
                (vec![T::Acc::from_f64(0.0); rows], vec![T::Acc::from_f64(0.0); rows]);
            let args = layernorm_core::ForwardArgs::new(
                T::host(&inp.x),
                g.map(T::host),
                b.map(T::host),
                T::host_mut(&mut ybuf[off..]),
                Some(T::Acc::host_mut(&mut mean)),
                T::Acc::host_mut(&mut rstd),
            )
            .with_residual(layernorm_core::Residual::Add {
                residual: T::host(&inp.r),
                h: T::host_mut(&mut hbuf[off..]),
            });
            cpu.forward_typed::<T>(&spec, args).unwrap();
            out.extend([bits(&hbuf[off..]), bits(&ybuf[off..])]);
            let y = &ybuf[off..];
            for saved in [From::X(&hbuf[off..]), From::Y(y)] {
                let src = (saved, &inp.dy[..], Some(&inp.dh[..]));
                let gr = backward_variant(&cpu, &spec, src, (&mean, &rstd), (g, b)).unwrap();
                out.push(bits(&gr.dx));
            }
        }
        out
    };
    let what = format!("{} {rows}x{n}", T::DTYPE);
    assert!(run(Stores::Streaming) == run(Stores::Cached), "{what}: streamed and cached differ");
}

#[test]
fn streamed_h_and_dx_give_the_cached_bits() {
    streamed_like_cached::<f32>(70, 300);
    streamed_like_cached::<f32>(300, 1000);
    streamed_like_cached::<f64>(40, 777);
    streamed_like_cached::<bf16>(70, 300);
}

#[test]
fn a_singular_gamma_is_refused_before_anything_is_written() {
    // γ_offset + γ = 0 in one column: SingularGamma naming it, and dx, dγ, dβ untouched, through
    // the typed slices, the device-level buffers and the n-d layer.
    let cpu = CpuBackend::new();
    let (rows, n) = (5, 40);
    for (kind, offset) in [(NormKind::LayerNorm, 0.0), (NormKind::RmsNorm, 1.0)] {
        let spec = NormSpec::new(kind, rows, n, DType::F32).with_gamma_offset(offset);
        let x = normal(rows * n, 70);
        let mut g = normal(n, 71);
        let b = normal(n, 72);
        let beta = spec.beta.then_some(&b[..]);
        let f = forward(&cpu, &spec, &x, Some(&g), beta).unwrap();
        g[13] = -offset as f32;
        let sentinel = 7.5f32;
        let (mut dx, mut dg, mut db) =
            (vec![sentinel; rows * n], vec![sentinel; n], vec![sentinel; n]);
        let args = layernorm_core::BackwardArgs::new(
            f32::host(&x),
            f32::host(&x),
            None,
            f32::host(&f.rstd),
            Some(f32::host(&g)),
            f32::host_mut(&mut dx),
            Some(f32::host_mut(&mut dg)),
            spec.beta.then(|| f32::host_mut(&mut db)),
        )
        .from_output(f32::host(&f.y), beta.map(f32::host))
        .with_dh(f32::host(&x));
        let err = cpu.backward_typed::<f32>(&spec, args).unwrap_err();
        assert!(matches!(err, Error::SingularGamma { column: 13, .. }), "{kind}: {err}");
        assert!(dx.iter().chain(&dg).chain(&db).all(|&v| v == sentinel), "{kind}: written");
        // The device-level path (buffers) checks before writing too.
        use layernorm_core::{Backward, BackwardArgs, Normalize};
        let up = |v: &[f32]| cpu.upload(f32::host(v)).unwrap();
        let (bx, brstd, bg, by) = (up(&x), up(&f.rstd), up(&g), up(&f.y));
        let bb = up(&b);
        let (mut bdx, mut bdg) = (up(&dx), up(&dg));
        let args: Backward<'_, _> =
            BackwardArgs::new(&bx, &bx, None, &brstd, Some(&bg), &mut bdx, Some(&mut bdg), None)
                .from_output(&by, spec.beta.then_some(&bb));
        let err = cpu.run_backward(&spec, args).unwrap_err();
        assert!(matches!(err, Error::SingularGamma { column: 13, .. }), "{kind}: {err}");
        assert_eq!(bdx.0.to_f64_vec(), vec![f64::from(sentinel); rows * n], "{kind}: buffer dx");
        // The n-d layer.
        let norm = Norm::new(kind).gamma_offset(offset);
        let ya = Array2::from_shape_vec((rows, n), f.y.clone()).unwrap();
        let stats = layernorm_core::Stats::new(&f.rstd[..]);
        let mut call = cpu.backward_nd_from_output(norm, &ya, &ya, stats).gamma(&g[..]);
        if spec.beta {
            call = call.beta(&b[..]);
        }
        let err = call.run().unwrap_err();
        assert!(matches!(err, Error::SingularGamma { column: 13, .. }), "{kind}: {err}");
    }
}

#[test]
fn a_non_contiguous_in_place_residual_through_the_n_d_layer() {
    // The residual stream as a column-major array and as every other column of a wider one:
    // h lands in the caller's elements, equal to the contiguous call's, and the rest of the
    // wider array is left alone.
    let cpu = CpuBackend::new();
    let (rows, n) = (6, 96);
    let x = Array2::from_shape_vec((rows, n), normal(rows * n, 80)).unwrap();
    let r = Array2::from_shape_vec((rows, n), normal(rows * n, 81)).unwrap();
    let g = normal(n, 82);
    for norm in [Norm::layer_norm(), Norm::rms_norm()] {
        let want = cpu.forward_nd(norm, &x).gamma(&g[..]).residual(&r).run().unwrap();
        let want_h = want.h.as_ref().unwrap();
        let mut fortran = Array2::zeros((rows, n).f());
        fortran.assign(&r);
        let got = cpu.forward_nd(norm, &x).gamma(&g[..]).residual_in_place(fortran.view_mut());
        let got = got.run().unwrap();
        assert_eq!(fortran, **want_h, "{norm:?}: column-major h");
        assert_eq!(*got.y, *want.y, "{norm:?}: y");
        let mut wide = Array2::from_elem((rows, 2 * n), -3.0f32);
        wide.slice_mut(s![.., ..;2]).assign(&r);
        let view = wide.slice_mut(s![.., ..;2]);
        let got = cpu.forward_nd(norm, &x).gamma(&g[..]).residual_in_place(view).run().unwrap();
        assert_eq!(wide.slice(s![.., ..;2]), **want_h, "{norm:?}: strided h");
        assert!(wide.slice(s![.., 1..;2]).iter().all(|&v| v == -3.0), "{norm:?}: untouched");
        assert_eq!(*got.y, *want.y, "{norm:?}: strided y");
        assert!(got.h.is_none(), "{norm:?}: in place, h is the caller's");
    }
}

/// A NaN in one input of row 1, through every variant: row 1 of what it reaches is NaN, every
/// other row bitwise as without it. Rows enough for a parallel call.
fn poison_stays_in_its_row<T: CpuElement>(kind: NormKind, n: usize) {
    let rows = (1 << 18) / n + 3;
    let spec = NormSpec::new(kind, rows, n, T::DTYPE).with_beta(true);
    let cpu = CpuBackend::with_pool(pool(2));
    let clean = Inputs::<T>::new(rows, n, 0.0, 90);
    let (g, b) = (Some(&clean.g[..]), Some(&clean.b[..]));
    let nan = T::from_f64(f64::NAN);
    let others = |v: &[T], w: &[T], what: &str| {
        for r in (0..rows).filter(|&r| r != 1) {
            let s = r * n..(r + 1) * n;
            assert_eq!(
                bits(&v[s.clone()]),
                bits(&w[s]),
                "{kind} {} n={n}: {what} row {r}",
                T::DTYPE
            );
        }
    };
    let row1_nan = |v: &[T], what: &str| {
        let bad = v[n..2 * n].iter().any(|&v| !T::to_f64(v).is_nan());
        assert!(!bad, "{kind} {} n={n}: {what} row 1 not NaN", T::DTYPE);
    };
    let (h0, f0) = forward_residual(&cpu, &spec, (&clean.x, &clean.r), (g, b), Res::Add).unwrap();
    let stats0 = (&f0.mean[..], &f0.rstd[..]);
    for what in ["x", "residual"] {
        let (mut x, mut r) = (clean.x.clone(), clean.r.clone());
        if what == "x" {
            x[n + 5] = nan
        } else {
            r[n + 5] = nan
        }
        for how in [Res::Add, Res::InPlace] {
            let (h, f) = forward_residual(&cpu, &spec, (&x, &r), (g, b), how).unwrap();
            others(&h, &h0, &format!("{what}: h"));
            others(&f.y, &f0.y, &format!("{what}: y"));
            row1_nan(&f.y, &format!("{what}: y"));
        }
    }
    let grads = |saved: From<'_, T>, dy: &[T], dh: &[T]| {
        backward_variant(&cpu, &spec, (saved, dy, Some(dh)), stats0, (g, b)).unwrap()
    };
    for from_y in [false, true] {
        let base = if from_y { &f0.y } else { &h0 };
        let want = grads(saved_as(from_y, base), &clean.dy, &clean.dh);
        for what in ["saved", "dy", "dh"] {
            let (mut s, mut dy, mut dh) = (base.clone(), clean.dy.clone(), clean.dh.clone());
            match what {
                "saved" => s[n + 3] = nan,
                "dy" => dy[n + 3] = nan,
                _ => dh[n + 3] = nan,
            }
            let got = grads(saved_as(from_y, &s), &dy, &dh);
            let label = format!("from {}: {what}: dx", if from_y { "y" } else { "h" });
            others(&got.dx, &want.dx, &label);
            if what != "dh" {
                row1_nan(&got.dx, &label);
            } else {
                assert!(T::to_f64(got.dx[n + 3]).is_nan(), "{label}: the poisoned element");
            }
        }
    }
}

/// `v` as the backward's y (`from_y`) or x.
fn saved_as<T>(from_y: bool, v: &[T]) -> From<'_, T> {
    if from_y { From::Y(v) } else { From::X(v) }
}

#[test]
fn a_poisoned_row_stays_in_its_row_through_every_variant() {
    for kind in NormKind::ALL {
        poison_stays_in_its_row::<f32>(kind, 100);
        poison_stays_in_its_row::<f32>(kind, 1000);
        poison_stays_in_its_row::<bf16>(kind, 600);
        poison_stays_in_its_row::<f64>(kind, 300);
    }
}
