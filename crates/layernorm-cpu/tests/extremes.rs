//! Every input answered (issue 23) on the CPU: no panic or abort on any argument, ε across its
//! whole valid range, constant rows at large |x|, and poisoned inputs kept in their row — for
//! both kinds and every dtype.

mod common;

use common::{backward, bits, check_against_reference, forward, normal, to, wide};
use layernorm_core::ndarray::Array2;
use layernorm_core::{
    DType, Element, Error, Norm, NormKind, NormSpec, Normalize, NormalizeNd, bf16, f16, reference,
};
use layernorm_cpu::{CpuBackend, CpuElement};

#[test]
fn huge_problems_are_typed_errors_before_any_allocation() {
    let cpu = CpuBackend::new();
    // A valid problem of 2^40 rows with no data: the slices' lengths are checked first.
    let spec = NormSpec::rms_norm(1 << 40, 4, DType::F32);
    let (mut y, mut r) = ([0f32; 0], [0f32; 0]);
    let err = cpu.forward_into(&spec, &[], None, None, &mut y, None, &mut r);
    assert_eq!(err.unwrap_err().class(), "shape");
    let spec = NormSpec::layer_norm(0, 1 << 40, DType::BF16).with_affine(false);
    let mut dx = [bf16::ZERO; 0];
    let ok = cpu.backward_into::<bf16>(&spec, &[], &[], Some(&[]), &[], None, &mut dx, None, None);
    assert_eq!(ok, Ok(()));
    // No rows of 2^62 elements: no row-sized product (blocks of rows × n) may be formed.
    let spec = NormSpec::rms_norm(0, 1 << 62, DType::F32).with_affine(false);
    let mut dx = [0f32; 0];
    let ok = cpu.backward_into::<f32>(&spec, &[], &[], None, &[], None, &mut dx, None, None);
    assert_eq!(ok, Ok(()));
    // The same through the fused residual forward, which stages rows of n elements.
    let none = Array2::<f32>::zeros((0, 1 << 62));
    let out = cpu.forward_nd(Norm::rms_norm(), &none).residual(&none).run().unwrap();
    assert_eq!(out.h.as_ref().map(|h| h.shape()), Some(&[0, 1 << 62][..]));
    // The n-d layer: a zero-size dim beside a huge one.
    let empty_rows = Array2::<f32>::zeros((0, 1 << 40));
    let out = cpu.forward_nd(Norm::rms_norm(), &empty_rows).run().unwrap();
    assert_eq!(out.y.shape(), &[0, 1 << 40]);
    let err = cpu.forward_nd(Norm::layer_norm(), &Array2::<f32>::zeros((1 << 40, 0))).run();
    assert_eq!(err.unwrap_err(), Error::EmptyNormalizedDim);
    // Device-level buffers: an allocation that cannot be had is OutOfMemory, not an abort.
    for dtype in DType::ALL {
        let err = cpu.alloc(dtype, usize::MAX / 4).unwrap_err();
        assert_eq!(err.class(), "out-of-memory", "{dtype}");
        assert_eq!(cpu.alloc(dtype, 3).unwrap().0.len(), 3);
    }
}

/// A row of `n` copies of `c`, among ordinary rows, with ε `eps`: y = β exactly, and the
/// backward equal to the `f64` reference rounded to the dtype, element by element (±inf where
/// it overflows, 0 where it is 0, never NaN), in both kinds.
fn constant_row<T: CpuElement>(kind: NormKind, n: usize, c: f32, eps: f64) {
    let cpu = CpuBackend::new();
    let rows = 3;
    let mut x: Vec<f32> = normal(rows * n, 1);
    x[n..2 * n].fill(c);
    let x: Vec<T> = to(&x);
    let dy: Vec<T> = to(&normal(rows * n, 2));
    let g: Vec<T> = to(&normal(n, 3));
    let b: Vec<T> = to(&normal(n, 4));
    let spec = NormSpec::new(kind, rows, n, T::DTYPE).with_eps(eps).with_beta(true);
    let what = format!("{kind} {} n={n} c={c} ε={eps:e}", T::DTYPE);
    let f = forward(&cpu, &spec, &x, Some(&g), Some(&b)).unwrap();
    let gr = backward(&cpu, &spec, (&x, &dy), (&f.mean, &f.rstd), Some(&g)).unwrap();
    let mut r = reference::forward(&spec, &wide(&x), Some(&wide(&g)), Some(&wide(&b))).unwrap();
    if kind == NormKind::LayerNorm || c == 0.0 {
        // The row's variance (or mean square) is exactly 0: rstd is 1/√ε, whatever the scale
        // the reference takes its statistics at. The backward reads the saved value, rounded to
        // the accumulation type; where that is +inf, x̂ = 0 still (`0·∞` of the f64 formula at
        // the finite 1/√ε).
        let saved = T::Acc::to_f64(f.rstd[1]);
        r.rstd[1] = if saved.is_finite() { saved } else { 1.0 / eps.sqrt() };
    }
    let rb = reference::backward(
        &spec,
        &wide(&x),
        &wide(&dy),
        r.mean.as_deref(),
        &r.rstd,
        Some(&wide(&g)),
    )
    .unwrap();
    let row = n..2 * n;
    let rounded = |v: &[f64]| v.iter().map(|&v| T::from_f64(v)).collect::<Vec<T>>();
    if kind == NormKind::LayerNorm || c == 0.0 {
        assert_eq!(bits(&f.y[row.clone()]), bits(&b), "{what}: y = β");
    }
    let exact = if kind == NormKind::LayerNorm || c == 0.0 { 1.0 / eps.sqrt() } else { r.rstd[1] };
    assert_eq!(
        T::Acc::to_f64(f.rstd[1]).to_bits(),
        T::Acc::to_f64(T::Acc::from_f64(exact)).to_bits(),
        "{what}: rstd, the exact value rounded"
    );
    let dx = &gr.dx[row.clone()];
    assert!(dx.iter().all(|&v| !T::to_f64(v).is_nan()), "{what}: dx has a NaN: {dx:?}");
    if kind == NormKind::LayerNorm || c == 0.0 {
        // x̂ = 0: dx = rstd·(g − c2) exactly as the reference forms it, rounded once.
        // Where the saved rstd is above 2^63 the row is computed in f64 in the reference's
        // form: its values rounded once (values, not bits: at ε = 1e300 the f32 rstd is 0, and
        // the reference's 0·x keeps x's sign where ours is +0). Below, the kernels' distributed
        // form, within the dtype's tolerance.
        let want = rounded(&rb.dx[row]);
        let tol = if T::Acc::to_f64(f.rstd[1]) > 2f64.powi(63) {
            0.0
        } else {
            common::tolerance(&spec).0
        };
        let scale = want.iter().fold(0f64, |m, &v| m.max(T::to_f64(v).abs()));
        let same = dx.iter().zip(&want).all(|(&a, &b)| {
            let (a, b) = (T::to_f64(a), T::to_f64(b));
            a == b || (a - b).abs() <= tol * scale
        });
        assert!(same, "{what}: dx {dx:?} vs {want:?}");
    }
}

#[test]
fn extreme_eps_on_constant_rows_follows_the_reference_in_every_dtype() {
    fn each<T: CpuElement>() {
        for eps in [1e-300, f64::from_bits(1), 1e-45, 1e300, 1e-5] {
            for n in [7usize, 300, 777] {
                constant_row::<T>(NormKind::LayerNorm, n, 3.25, eps);
                constant_row::<T>(NormKind::RmsNorm, n, 0.0, eps);
                constant_row::<T>(NormKind::RmsNorm, n, 3.25, eps);
            }
        }
    }
    each::<f32>();
    each::<f64>();
    each::<bf16>();
    each::<f16>();
}

#[test]
fn a_poisoned_row_stays_in_its_row_when_the_call_runs_in_parallel() {
    // 2048 rows of 300 run in groups of blocks on two threads: an rstd of +inf sends its own
    // group through the row-wise composition (in f64 for that row), the others through the
    // kernels, and every clean row keeps the bits of a clean call.
    let cpu = CpuBackend::with_pool(common::pool(2));
    for kind in NormKind::ALL {
        for (what, value) in [("rstd", f32::INFINITY), ("x", f32::NAN), ("dy", f32::INFINITY)] {
            poisoned_in::<f32>(&cpu, (2048, 300), kind, what, value);
            poisoned_in::<bf16>(&cpu, (2048, 300), kind, what, value);
        }
    }
}

#[test]
fn extreme_eps_on_ordinary_rows_follows_the_reference_in_every_dtype() {
    fn each<T: CpuElement>() {
        let cpu = CpuBackend::new();
        for eps in [1e-300, f64::from_bits(1), 1e-40, 1e30] {
            for (n, kind) in [
                (7usize, NormKind::LayerNorm),
                (300, NormKind::RmsNorm),
                (777, NormKind::LayerNorm),
            ] {
                let x: Vec<T> = to(&normal(4 * n, 5));
                let dy: Vec<T> = to(&normal(4 * n, 6));
                let g: Vec<T> = to(&normal(n, 7));
                let spec = NormSpec::new(kind, 4, n, T::DTYPE).with_eps(eps).with_beta(false);
                let what = format!("{kind} {} n={n} ε={eps:e}", T::DTYPE);
                check_against_reference(&cpu, &spec, (&x, &dy), (Some(&g), None), &what);
            }
        }
    }
    each::<f32>();
    each::<f64>();
    each::<bf16>();
    each::<f16>();
}

#[test]
fn constant_rows_at_large_magnitude_normalize_to_exactly_zero() {
    // 14 copies of −944328.625 (its shift is off the value by a few ulps): every length, every
    // path, at the default ε and at 3.96e-10.
    fn each<T: CpuElement>(c: f32) {
        let cpu = CpuBackend::new();
        for eps in [1e-5, 3.96e-10] {
            for n in (1..=70).chain([127, 128, 129, 255, 256, 300, 511, 512, 777, 1024, 4099]) {
                let x: Vec<T> = to(&vec![c; 5 * n]);
                let spec = NormSpec::layer_norm(5, n, T::DTYPE).with_eps(eps).with_affine(false);
                let f = forward(&cpu, &spec, &x, None, None).unwrap();
                let bad = f.y.iter().position(|&v| T::to_f64(v) != 0.0);
                assert!(bad.is_none(), "{} n={n} ε={eps:e}: y[{bad:?}] ≠ 0", T::DTYPE);
                assert!(f.mean.iter().all(|&m| T::Acc::to_f64(m) == T::to_f64(x[0])));
            }
        }
    }
    each::<f32>(-944_328.6); // −944328.625 exactly
    each::<f64>(-944_328.6);
    each::<bf16>(-944_328.6);
    each::<f16>(-1234.5);
}

/// Poison `rows[1]` through `poison` (NaN or ±inf in one input), run the forward and the
/// backward, and compare with a clean run: row 1 non-finite everywhere in the outputs the poison
/// reaches, every other row bitwise unchanged.
fn poisoned<T: CpuElement>(kind: NormKind, n: usize, what: &str, value: f32) {
    poisoned_in::<T>(&CpuBackend::new(), (4, n), kind, what, value);
}

/// [`poisoned`] with `rows` rows of `n` on `cpu`.
fn poisoned_in<T: CpuElement>(
    cpu: &CpuBackend,
    (rows, n): (usize, usize),
    kind: NormKind,
    what: &str,
    value: f32,
) {
    let x: Vec<T> = to(&normal(rows * n, 11));
    let dy: Vec<T> = to(&normal(rows * n, 12));
    let g: Vec<T> = to(&normal(n, 13));
    let spec = NormSpec::new(kind, rows, n, T::DTYPE).with_beta(true);
    let b: Vec<T> = to(&normal(n, 14));
    let clean = forward(cpu, &spec, &x, Some(&g), Some(&b)).unwrap();
    let clean_b = backward(cpu, &spec, (&x, &dy), (&clean.mean, &clean.rstd), Some(&g)).unwrap();
    let (mut px, mut pdy) = (x.clone(), dy.clone());
    let (mut mean, mut rstd) = (clean.mean.clone(), clean.rstd.clone());
    let v = T::from_f64(f64::from(value));
    match what {
        "x" => px[n + n / 2] = v,
        "dy" => pdy[n + n / 3] = v,
        "mean" => mean[1] = T::Acc::from_f64(f64::from(value)),
        _ => rstd[1] = T::Acc::from_f64(f64::from(value)),
    }
    let label = format!("{kind} {} n={n}: {what} = {value}", T::DTYPE);
    let f = forward(cpu, &spec, &px, Some(&g), Some(&b)).unwrap();
    if what == "x" {
        // The statistics come from x: they and the whole row of y are NaN.
        assert!(T::Acc::to_f64(f.rstd[1]).is_nan(), "{label}: rstd");
        assert!(f.y[n..2 * n].iter().all(|&v| T::to_f64(v).is_nan()), "{label}: y");
        (mean, rstd) = (f.mean.clone(), f.rstd.clone());
    }
    let others = || (0..rows).filter(|&r| r != 1);
    for r in others() {
        let s = r * n..(r + 1) * n;
        assert_eq!(bits(&f.y[s.clone()]), bits(&clean.y[s]), "{label}: y row {r}");
        assert_eq!((f.mean[r], f.rstd[r]), (clean.mean[r], clean.rstd[r]), "{label}: stats {r}");
    }
    let gr = backward(cpu, &spec, (&px, &pdy), (&mean, &rstd), Some(&g)).unwrap();
    let dx = &gr.dx[n..2 * n];
    assert!(dx.iter().all(|&v| !T::to_f64(v).is_finite()), "{label}: dx row 1 {dx:?}");
    for r in others() {
        let s = r * n..(r + 1) * n;
        assert_eq!(bits(&gr.dx[s.clone()]), bits(&clean_b.dx[s]), "{label}: dx row {r}");
    }
}

#[test]
fn a_poisoned_row_stays_in_its_row_in_both_kinds_and_every_dtype() {
    fn each<T: CpuElement>() {
        for n in [7usize, 100, 300, 777] {
            for value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for kind in NormKind::ALL {
                    for what in ["x", "dy", "rstd"] {
                        poisoned::<T>(kind, n, what, value);
                    }
                }
                poisoned::<T>(NormKind::LayerNorm, n, "mean", value);
            }
        }
    }
    each::<f32>();
    each::<f64>();
    each::<bf16>();
    each::<f16>();
}

#[test]
fn rows_past_the_rstd_range_are_exact_when_the_call_runs_in_parallel() {
    // ε = 1e-300 over 2048 rows of 300 on two threads: the constant row's rstd is +inf in f32,
    // its y is β and its dx ±inf or 0, in whichever task it falls; the other rows are ordinary.
    fn each<T: CpuElement>() {
        let cpu = CpuBackend::with_pool(common::pool(2));
        let (rows, n) = (2048, 300);
        let mut x = normal(rows * n, 41);
        x[1500 * n..1501 * n].fill(-2.5);
        let x: Vec<T> = to(&x);
        let dy: Vec<T> = to(&normal(rows * n, 42));
        let (g, b): (Vec<T>, Vec<T>) = (to(&normal(n, 43)), to(&normal(n, 44)));
        let spec = NormSpec::layer_norm(rows, n, T::DTYPE).with_eps(1e-300);
        let f = forward(&cpu, &spec, &x, Some(&g), Some(&b)).unwrap();
        assert_eq!(T::Acc::to_f64(f.rstd[1500]), f64::INFINITY);
        assert_eq!(bits(&f.y[1500 * n..1501 * n]), bits(&b), "{}: y = β", T::DTYPE);
        let gr = backward(&cpu, &spec, (&x, &dy), (&f.mean, &f.rstd), Some(&g)).unwrap();
        let row = &gr.dx[1500 * n..1501 * n];
        assert!(row.iter().all(|&v| T::to_f64(v).is_infinite()), "{}: dx {row:?}", T::DTYPE);
        assert!(gr.dx.iter().enumerate().all(|(i, &v)| i / n == 1500 || T::to_f64(v).is_finite()));
        assert!(gr.dgamma.unwrap().iter().all(|&v| T::to_f64(v).is_finite()));
    }
    each::<f32>();
    each::<bf16>();
}

#[test]
fn an_rstd_below_f32s_normal_range_keeps_every_bit_of_y() {
    // var + ε above 2^252: rstd ≈ 2e-40 is an f32 subnormal, which keeps only some of its bits,
    // while with |x| ≈ 1e30 every y ≈ 2e-10 is a normal number. Those rows are normalized in
    // f64: every y within one f32 ulp of the reference's (a product with the subnormal rstd in
    // f32 was off by up to ~1e-5).
    let cpu = CpuBackend::new();
    for kind in NormKind::ALL {
        for n in [1usize, 3, 300] {
            let x: Vec<f32> = normal(4 * n, 5).iter().map(|v| v * 1e30).collect();
            let g = normal(n, 7);
            let spec = NormSpec::new(kind, 4, n, DType::F32).with_eps(2e79).with_beta(false);
            let f = forward(&cpu, &spec, &x, Some(&g), None).unwrap();
            let r = reference::forward(&spec, &wide(&x), Some(&wide(&g)), None).unwrap();
            assert!(f.rstd.iter().all(|&s| s > 0.0 && s < f32::MIN_POSITIVE), "{:?}", f.rstd);
            for (j, (&got, &want)) in f.y.iter().zip(&r.y).enumerate() {
                let ulp = f64::from(f32::EPSILON) * want.abs();
                let d = (f64::from(got) - want).abs();
                assert!(d <= ulp, "{kind} n={n} y[{j}]: {got:e} vs {want:e}");
            }
        }
    }
}
