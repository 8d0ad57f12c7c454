//! On-GPU tests: results against the f64 reference for every dtype, kind, variant and strategy
//! (LayerNorm and RMSNorm; γ offset; fused residual, added and in place; backward from x and from
//! y, with dh), numerically hard rows, the ε rule, a singular γ, bitwise-deterministic dγ/dβ, zero
//! rows, and typed allocation errors.
//!
//! Without a usable GPU each test prints why and passes, unless `LAYERNORM_REQUIRE_CUDA` is set
//! or `LAYERNORM_REQUIRE` lists `cuda` (set one on a GPU machine so a broken driver cannot turn
//! the suite silently green):
//! `LAYERNORM_REQUIRE_CUDA=1 cargo test -p layernorm-cuda --test gpu`.

use layernorm_core::{
    BackwardArgs, DType, Error, ForwardArgs, HostNormalize, HostSlice, HostVec, NormKind, NormSpec,
    Normalize, Residual, reference,
};
use layernorm_cuda::CudaBackend;
use rand::SeedableRng;
use rand::rngs::SmallRng;

mod common;
use common::random;

fn backend() -> Option<CudaBackend> {
    match CudaBackend::new() {
        Ok(b) => Some(b),
        Err(e) => {
            // Either switch: this file's own, or the conformance suite's list.
            let listed = std::env::var("LAYERNORM_REQUIRE")
                .is_ok_and(|v| v.split(',').any(|b| b.trim() == "cuda"));
            assert!(
                std::env::var_os("LAYERNORM_REQUIRE_CUDA").is_none() && !listed,
                "the CUDA backend is required (LAYERNORM_REQUIRE_CUDA, or cuda in \
                 LAYERNORM_REQUIRE) but unavailable: {e}"
            );
            eprintln!("skipping: the CUDA backend is unavailable here: {e}");
            None
        }
    }
}

/// Tolerance relative to the largest reference magnitude of a tensor: a few units of the storage
/// dtype's rounding plus f32 accumulation over the row.
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-10,
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
        _ => 3e-2,
    }
}

fn assert_close(what: &str, dtype: DType, got: &[f64], want: &[f64], ctx: &str) {
    common::assert_close(what, dtype, tol(dtype), got, want, ctx);
}

/// Rounds f64 values to `dtype` and returns them widened again: what the device will see.
fn rounded(dtype: DType, v: &[f64]) -> (HostVec, Vec<f64>) {
    let h = HostVec::from_f64(dtype, v);
    let w = h.to_f64_vec();
    (h, w)
}

/// How a problem's residual is passed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ResKind {
    None,
    Add,
    InPlace,
}

/// Forward, backward from x and backward from y of one problem, compared with the reference.
/// `shift`: a value near the rows' mean. LayerNorm is shift-invariant, so the reference runs on
/// h − shift (exact in f64 for these inputs) and only its mean is shifted back: this keeps the
/// oracle's own plain sums accurate for rows with |mean| ≫ std. `dh`: the residual-stream
/// gradient is added to dx in both backward passes.
fn check_problem(
    b: &CudaBackend,
    spec: &NormSpec,
    x: &[f64],
    seed: u64,
    shift: f64,
    res: ResKind,
    dh: bool,
) {
    let ctx = format!(
        "{} {}×{} {} γ={} β={} offset={} residual={res:?} dh={dh}",
        spec.kind, spec.rows, spec.n, spec.dtype, spec.gamma, spec.beta, spec.gamma_offset
    );
    let dt = spec.dtype;
    let mut rng = SmallRng::seed_from_u64(seed);
    let (hx, wx) = rounded(dt, x);
    let g0 = if spec.gamma_offset == 0.0 { 1.0 } else { 0.0 };
    let (hg, wg) = rounded(dt, &random(&mut rng, spec.n, g0, 0.5));
    let (hb, wb) = rounded(dt, &random(&mut rng, spec.n, 0.0, 0.5));
    let (hdy, wdy) = rounded(dt, &random(&mut rng, spec.numel(), 0.0, 1.0));
    let (hr, wr) = rounded(dt, &random(&mut rng, spec.numel(), 0.0, 1.0));
    let (hdh, wdh) = rounded(dt, &random(&mut rng, spec.numel(), 0.0, 1.0));
    let (g, bt) = (spec.gamma.then_some(&hg), spec.beta.then_some(&hb));
    let (rg, rb) = (spec.gamma.then_some(&wg[..]), spec.beta.then_some(&wb[..]));

    let mut y = HostVec::zeros(dt, spec.numel());
    let mut mean = HostVec::zeros(dt.acc(), spec.rows);
    let mut rstd = HostVec::zeros(dt.acc(), spec.rows);
    let mut h = HostVec::zeros(dt, spec.numel());
    let mut in_place = hr.clone();
    let mut args = ForwardArgs::new(
        hx.as_slice(),
        g.map(|v| v.as_slice()),
        bt.map(|v| v.as_slice()),
        y.as_mut_slice(),
        spec.has_mean().then(|| mean.as_mut_slice()),
        rstd.as_mut_slice(),
    );
    args = match res {
        ResKind::None => args,
        ResKind::Add => {
            args.with_residual(Residual::Add { residual: hr.as_slice(), h: h.as_mut_slice() })
        }
        ResKind::InPlace => args.with_residual(Residual::InPlace(in_place.as_mut_slice())),
    };
    b.forward_host(spec, args).unwrap_or_else(|e| panic!("forward failed: {e}, {ctx}"));
    let (saved, wh) = match res {
        ResKind::None => (hx.clone(), wx),
        ResKind::Add | ResKind::InPlace => {
            let got = if res == ResKind::Add { &h } else { &in_place };
            let (want_h, _) = reference::forward_residual(spec, &wx, &wr, rg, rb).unwrap();
            assert_eq!(got.to_f64_vec(), want_h, "h, {ctx}");
            (got.clone(), want_h)
        }
    };
    let sx: Vec<f64> = wh.iter().map(|v| v - shift).collect();
    let want = reference::forward(spec, &sx, rg, rb).unwrap();
    assert_close("y", dt, &y.to_f64_vec(), &want.y, &ctx);
    if let Some(wm) = &want.mean {
        let want_mean: Vec<f64> = wm.iter().map(|m| m + shift).collect();
        assert_close("mean", dt, &mean.to_f64_vec(), &want_mean, &ctx);
    }
    // rstd relative to itself, row by row.
    for (r, (g, w)) in rstd.to_f64_vec().iter().zip(&want.rstd).enumerate() {
        assert!((g - w).abs() <= tol(dt) * w.abs(), "rstd[{r}] = {g}, reference {w}, {ctx}");
    }

    let mut dx = HostVec::zeros(dt, spec.numel());
    let mut dg = HostVec::zeros(dt, spec.n);
    let mut db = HostVec::zeros(dt, spec.n);
    let mut args = BackwardArgs::new(
        saved.as_slice(),
        hdy.as_slice(),
        spec.has_mean().then(|| mean.as_slice()),
        rstd.as_slice(),
        g.map(|v| v.as_slice()),
        dx.as_mut_slice(),
        spec.gamma.then(|| dg.as_mut_slice()),
        spec.beta.then(|| db.as_mut_slice()),
    );
    if dh {
        args = args.with_dh(hdh.as_slice());
    }
    b.backward_host(spec, args).unwrap_or_else(|e| panic!("backward failed: {e}, {ctx}"));
    // The reference backward from the exact statistics: the backend's recomputed residual mean
    // makes it agree with these even though it was handed f32-rounded ones.
    let mut want_b =
        reference::backward(spec, &sx, &wdy, want.mean.as_deref(), &want.rstd, rg).unwrap();
    if dh {
        want_b = reference::add_dh(want_b, &wdh).unwrap();
    }
    assert_close("dx", dt, &dx.to_f64_vec(), &want_b.dx, &ctx);
    if let Some(w) = &want_b.dgamma {
        assert_close("dgamma", dt, &dg.to_f64_vec(), w, &ctx);
    }
    if let Some(w) = &want_b.dbeta {
        assert_close("dbeta", dt, &db.to_f64_vec(), w, &ctx);
    }

    // From y: x̂ recovered from the device's y with γ and β (no mean).
    let mut dx = HostVec::zeros(dt, spec.numel());
    let mut args = BackwardArgs::new(
        hx.as_slice(),
        hdy.as_slice(),
        None,
        rstd.as_slice(),
        g.map(|v| v.as_slice()),
        dx.as_mut_slice(),
        spec.gamma.then(|| dg.as_mut_slice()),
        spec.beta.then(|| db.as_mut_slice()),
    )
    .from_output(y.as_slice(), bt.map(|v| v.as_slice()));
    if dh {
        args = args.with_dh(hdh.as_slice());
    }
    b.backward_host(spec, args).unwrap_or_else(|e| panic!("backward from y failed: {e}, {ctx}"));
    let wy = y.to_f64_vec();
    let mut want_y = reference::backward_from_output(spec, &wy, &wdy, &want.rstd, rg, rb).unwrap();
    if dh {
        want_y = reference::add_dh(want_y, &wdh).unwrap();
    }
    let ctx = format!("{ctx}, from y");
    assert_close("dx", dt, &dx.to_f64_vec(), &want_y.dx, &ctx);
    if let Some(w) = &want_y.dgamma {
        assert_close("dgamma", dt, &dg.to_f64_vec(), w, &ctx);
    }
    if let Some(w) = &want_y.dbeta {
        assert_close("dbeta", dt, &db.to_f64_vec(), w, &ctx);
    }
}

/// Shapes that reach every strategy: sub-warps (N = 1, 3, 8), whole warps (100, 768, 1000,
/// 1024), blocks in shared memory (1025, 4096, 65536 for 16-bit forward) and re-reading global
/// memory (65536 f32), vectorized and scalar.
const SHAPES: [(usize, usize); 13] = [
    (1, 1),
    (70, 1),
    (7, 3),
    (33, 8),
    (64, 100),
    (300, 768),
    (16, 1000),
    (3, 1001),
    (16, 1024),
    (8, 1025),
    (4, 4096),
    (5, 4099),
    (2, 65536),
];

/// The variants every shape runs under: (γ, β, γ offset, residual, dh).
const VARIANTS: [(bool, bool, f64, ResKind, bool); 4] = [
    (true, true, 0.0, ResKind::None, false),
    (false, false, 0.0, ResKind::InPlace, true),
    (true, false, 1.0, ResKind::Add, true),
    (false, true, 0.0, ResKind::None, false),
];

#[test]
fn matches_the_reference_for_every_dtype_kind_variant_and_strategy() {
    let Some(b) = backend() else { return };
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        for (j, &(rows, n)) in SHAPES.iter().enumerate() {
            let seed = (i * 100 + j) as u64;
            let mut rng = SmallRng::seed_from_u64(seed);
            let x = random(&mut rng, rows * n, 0.5, 2.0);
            for kind in NormKind::ALL {
                for (gamma, beta, offset, res, dh) in VARIANTS {
                    let spec = NormSpec::new(kind, rows, n, dtype)
                        .with_gamma(gamma)
                        .with_beta(beta)
                        .with_gamma_offset(offset);
                    check_problem(&b, &spec, &x, seed, 0.0, res, dh);
                }
            }
        }
    }
}

#[test]
fn bf16_pre_norm_blocks_at_4096() {
    let Some(b) = backend() else { return };
    let mut rng = SmallRng::seed_from_u64(4096);
    let x = random(&mut rng, 8 * 4096, 0.0, 3.0);
    for kind in NormKind::ALL {
        for res in [ResKind::Add, ResKind::InPlace] {
            let spec = NormSpec::new(kind, 8, 4096, DType::BF16).with_gamma_offset(1.0);
            check_problem(&b, &spec, &x, 5, 0.0, res, true);
        }
    }
}

#[test]
fn large_mean_small_spread_keeps_its_precision() {
    // |mean| / std = 1e4: E[x²] − E[x]² in f32 would lose every digit of the variance.
    let Some(b) = backend() else { return };
    for n in [768, 4096, 65536] {
        let mut rng = SmallRng::seed_from_u64(n as u64);
        let x = random(&mut rng, 4 * n, 1e4, 1.0);
        check_problem(
            &b,
            &NormSpec::layer_norm(4, n, DType::F32),
            &x,
            7,
            1e4,
            ResKind::None,
            false,
        );
        check_problem(
            &b,
            &NormSpec::layer_norm(4, n, DType::F64),
            &x,
            7,
            1e4,
            ResKind::None,
            false,
        );
    }
}

#[test]
fn huge_magnitudes_do_not_overflow() {
    // Squares of 1e30 overflow f32; the power-of-two scaling keeps the variance (and RMSNorm's
    // mean square) finite.
    let Some(b) = backend() else { return };
    for n in [3, 768, 4096] {
        let mut rng = SmallRng::seed_from_u64(n as u64);
        let x = random(&mut rng, 2 * n, 0.0, 1e30);
        for kind in NormKind::ALL {
            let spec = NormSpec::new(kind, 2, n, DType::F32);
            check_problem(&b, &spec, &x, 11, 0.0, ResKind::None, false);
        }
    }
}

#[test]
fn parameter_gradients_are_bitwise_deterministic() {
    let Some(b) = backend() else { return };
    for (rows, n, kind) in [
        (4096, 768, NormKind::LayerNorm),
        (10_000, 33, NormKind::LayerNorm),
        (64, 4096, NormKind::LayerNorm),
        (4096, 768, NormKind::RmsNorm),
    ] {
        let spec = NormSpec::new(kind, rows, n, DType::F32);
        let mut rng = SmallRng::seed_from_u64(3);
        let up = |v: Vec<f64>| b.upload(HostVec::from_f64(DType::F32, &v).as_slice()).unwrap();
        let x = up(random(&mut rng, rows * n, 0.0, 1.0));
        let dy = up(random(&mut rng, rows * n, 0.0, 1.0));
        let gamma = up(random(&mut rng, n, 1.0, 0.1));
        let beta = up(random(&mut rng, n, 0.0, 0.1));
        let mut y = b.alloc(DType::F32, rows * n).unwrap();
        let mut mean = b.alloc(DType::F32, rows).unwrap();
        let mut rstd = b.alloc(DType::F32, rows).unwrap();
        b.forward(
            &spec,
            ForwardArgs::new(&x, Some(&gamma), Some(&beta), &mut y, Some(&mut mean), &mut rstd),
        )
        .unwrap();
        let mean = spec.has_mean().then_some(mean);
        let run = || {
            let mut dx = b.alloc(DType::F32, rows * n).unwrap();
            let mut dg = b.alloc(DType::F32, n).unwrap();
            let mut db = b.alloc(DType::F32, n).unwrap();
            b.backward(
                &spec,
                BackwardArgs::new(
                    &x,
                    &dy,
                    mean.as_ref(),
                    &rstd,
                    Some(&gamma),
                    &mut dx,
                    Some(&mut dg),
                    Some(&mut db),
                ),
            )
            .unwrap();
            let mut out = (vec![0f32; n], vec![0f32; n]);
            b.download(&dg, layernorm_core::HostSliceMut::F32(&mut out.0)).unwrap();
            b.download(&db, layernorm_core::HostSliceMut::F32(&mut out.1)).unwrap();
            out
        };
        let first = run();
        for _ in 0..3 {
            let again = run();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&first.0), bits(&again.0), "dgamma bits, {rows}×{n}");
            assert_eq!(bits(&first.1), bits(&again.1), "dbeta bits, {rows}×{n}");
        }
    }
}

#[test]
fn zero_rows_write_zero_parameter_gradients() {
    let Some(b) = backend() else { return };
    for dtype in DType::ALL {
        let spec = NormSpec::layer_norm(0, 5, dtype);
        let empty = b.alloc(dtype, 0).unwrap();
        let stats = b.alloc(dtype.acc(), 0).unwrap();
        let gamma = b.upload(HostVec::from_f64(dtype, &[1.0; 5]).as_slice()).unwrap();
        let mut dx = b.alloc(dtype, 0).unwrap();
        let mut dg = b.upload(HostVec::from_f64(dtype, &[7.0; 5]).as_slice()).unwrap();
        let mut db = b.upload(HostVec::from_f64(dtype, &[7.0; 5]).as_slice()).unwrap();
        b.backward(
            &spec,
            BackwardArgs::new(
                &empty,
                &empty,
                Some(&stats),
                &stats,
                Some(&gamma),
                &mut dx,
                Some(&mut dg),
                Some(&mut db),
            ),
        )
        .unwrap();
        for buf in [&dg, &db] {
            let mut out = HostVec::zeros(dtype, 5);
            b.download(buf, out.as_mut_slice()).unwrap();
            assert_eq!(out.to_f64_vec(), vec![0.0; 5], "{dtype}");
        }
    }
}

#[test]
fn epsilon_below_f32_min_positive_is_unsupported_in_f32_arithmetic() {
    let Some(b) = backend() else { return };
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let spec = NormSpec::layer_norm(2, 8, dtype).with_eps(1e-39).with_affine(false);
        let x = HostVec::from_f64(dtype, &[1.0; 16]);
        let mut y = HostVec::zeros(dtype, 16);
        let (mut m, mut r) = (HostVec::zeros(DType::F32, 2), HostVec::zeros(DType::F32, 2));
        let args = ForwardArgs::new(
            x.as_slice(),
            None,
            None,
            y.as_mut_slice(),
            Some(m.as_mut_slice()),
            r.as_mut_slice(),
        );
        let err = b.forward_host(&spec, args).unwrap_err();
        assert_eq!(err.class(), "unsupported-feature", "{dtype}: {err}");
    }
    // f64 takes it, and 1e300 follows the reference in every dtype.
    let spec = NormSpec::layer_norm(1, 8, DType::F64).with_eps(1e-300).with_affine(false);
    let x: Vec<f64> = (0..8).map(f64::from).collect();
    check_problem(&b, &spec, &x, 1, 0.0, ResKind::None, false);
    for dtype in DType::ALL {
        let spec = NormSpec::rms_norm(1, 8, dtype).with_eps(1e300);
        check_problem(&b, &spec, &x, 1, 0.0, ResKind::None, false);
    }
}

#[test]
fn a_singular_gamma_is_refused_before_any_output_is_written() {
    let Some(b) = backend() else { return };
    for dtype in DType::ALL {
        let spec = NormSpec::rms_norm(2, 4, dtype).with_gamma_offset(1.0);
        let up = |v: &[f64]| b.upload(HostVec::from_f64(dtype, v).as_slice()).unwrap();
        let (y, dy) = (up(&[0.5; 8]), up(&[1.0; 8]));
        let gamma = up(&[0.0, 0.5, -1.0, 2.0]);
        let rstd = b.upload(HostVec::from_f64(dtype.acc(), &[1.0; 2]).as_slice()).unwrap();
        let mut dx = up(&[7.0; 8]);
        let mut dg = up(&[7.0; 4]);
        let args =
            BackwardArgs::new(&y, &dy, None, &rstd, Some(&gamma), &mut dx, Some(&mut dg), None)
                .from_output(&y, None);
        let err = b.backward(&spec, args).unwrap_err();
        assert_eq!(err, Error::SingularGamma { column: 2, gamma: -1.0, offset: 1.0 });
        let mut out = HostVec::zeros(dtype, 8);
        b.download(&dx, out.as_mut_slice()).unwrap();
        assert_eq!(out.to_f64_vec(), vec![7.0; 8], "dx was written, {dtype}");
    }
}

#[test]
fn an_allocation_beyond_the_device_is_a_typed_error() {
    let Some(b) = backend() else { return };
    for len in [usize::MAX, 1 << 50] {
        let err = b.alloc(DType::F32, len).unwrap_err();
        assert_eq!(err.class(), "out-of-memory", "{len}: {err}");
    }
    assert!(b.upload(HostSlice::F32(&[])).is_ok());
}
