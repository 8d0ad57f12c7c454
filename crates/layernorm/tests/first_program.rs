//! The first program a newcomer writes, as a test: only `use layernorm::*`, a `[batch, seq,
//! hidden]` array in f32 and bf16, on `auto()`'s backend and on wgpu where it runs here — leading
//! dims, a transposed (non-contiguous) view, bias-only, no affine, a skipped dγ, RMSNorm, a fused
//! residual and the backward from the output — every result checked against the f64 reference.

use layernorm::ndarray::{Array, Array1, Array3, ArrayView3, Dimension};
use layernorm::*;

/// `auto()`'s backend, and wgpu's when an adapter is there (it is on CI: lavapipe, or GL).
fn backends() -> Vec<Box<dyn HostNormalize>> {
    let (first, _why) = auto().expect("the CPU backend is always compiled in");
    let mut all = vec![first];
    if let Ok(w) = layernorm_wgpu::WgpuBackend::new()
        && all[0].name() != w.name()
    {
        all.push(Box::new(w));
    }
    all
}

fn input(shape: (usize, usize, usize), seed: u64) -> Array3<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    Array::from_shape_simple_fn(shape, || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
    })
}

fn f64s<T: Element, D: Dimension>(a: &Array<T, D>) -> Vec<f64> {
    a.iter().map(|&v| T::to_f64(v)).collect()
}

/// Every element within `tol · (1 + scale)` of the reference, `scale` the largest |reference|.
fn close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + scale), "{what}[{i}]: got {g}, want {w}");
    }
}

/// Forward and backward of `norm` on `x` (any layout) with the given parameters, checked against
/// the reference computed on the same values in standard layout.
fn check<T: Element>(
    backend: &dyn HostNormalize,
    norm: Norm,
    x: ArrayView3<'_, T>,
    gamma: Option<&Array1<T>>,
    beta: Option<&Array1<T>>,
    skip_dgamma: bool,
    tol: f64,
) {
    // Only a dtype the device lacks (f16 on an adapter without SHADER_F16) is skipped; every
    // backend computes every kind.
    if let Err(e @ Error::UnsupportedDType { .. }) = backend.supports(norm.kind(), T::DTYPE) {
        eprintln!("{}: {e}", backend.name());
        return;
    }
    let what = format!("{} {} {}", backend.name(), norm.kind(), T::DTYPE);
    let mut call = backend.forward_nd(norm, x);
    if let Some(g) = gamma {
        call = call.gamma(g);
    }
    if let Some(b) = beta {
        call = call.beta(b);
    }
    let out = call.run().unwrap();
    assert_eq!(out.y.shape(), x.shape());
    assert_eq!(out.stats().rstd.shape(), &x.shape()[..2]);
    let dy = input((x.shape()[0], x.shape()[1], x.shape()[2]), 9).mapv(|v| T::from_f64(v.into()));
    let mut back = backend.backward_nd(norm, x, &dy, out.stats());
    if let Some(g) = gamma {
        back = back.gamma(g);
    }
    if let Some(b) = beta {
        back = back.beta(b);
    }
    if skip_dgamma {
        back = back.skip_dgamma();
    }
    let grads = back.run().unwrap();
    assert_eq!(grads.dx.shape(), x.shape());
    assert_eq!(grads.dgamma.is_some(), gamma.is_some() && !skip_dgamma, "{what}: dgamma");
    assert_eq!(grads.dbeta.is_some(), beta.is_some(), "{what}: dbeta");

    // The reference, on the logical (row-major) values.
    let n = x.shape()[2];
    let spec = NormSpec::new(norm.kind(), x.len() / n, n, T::DTYPE)
        .with_eps(norm.get_eps())
        .with_gamma(gamma.is_some())
        .with_beta(beta.is_some())
        .with_gamma_offset(norm.get_gamma_offset());
    let xs: Vec<f64> = x.iter().map(|&v| T::to_f64(v)).collect();
    let (g64, b64) = (gamma.map(f64s), beta.map(f64s));
    let fwd = reference::forward(&spec, &xs, g64.as_deref(), b64.as_deref()).unwrap();
    close(&format!("{what} y"), &f64s(&out.y), &fwd.y, tol);
    let bwd =
        reference::backward(&spec, &xs, &f64s(&dy), fwd.mean.as_deref(), &fwd.rstd, g64.as_deref())
            .unwrap();
    close(&format!("{what} dx"), &f64s(&grads.dx), &bwd.dx, tol);
    if let (Some(got), Some(want)) = (&grads.dgamma, &bwd.dgamma) {
        close(&format!("{what} dgamma"), &f64s(got), want, tol);
    }
    if let (Some(got), Some(want)) = (&grads.dbeta, &bwd.dbeta) {
        close(&format!("{what} dbeta"), &f64s(got), want, tol);
    }
}

#[test]
fn layer_norm_on_batch_seq_hidden_in_f32_and_bf16_every_way_a_newcomer_calls_it() {
    let x = input((2, 5, 48), 1);
    let (gamma, beta) =
        (input((1, 1, 48), 2).into_shape_with_order(48).unwrap(), input((1, 1, 48), 3));
    let beta = beta.into_shape_with_order(48).unwrap();
    let xb = x.mapv(bf16::from_f32);
    let (gb, bb) = (gamma.mapv(bf16::from_f32), beta.mapv(bf16::from_f32));
    // A transposed view: [seq, batch, hidden] in memory, read as [batch, seq, hidden].
    let xt_store = x.clone().permuted_axes([1, 0, 2]).as_standard_layout().into_owned();
    let xt = xt_store.view().permuted_axes([1, 0, 2]);
    assert!(xt.as_slice().is_none(), "the view is not in standard layout");
    for backend in backends() {
        let b = &*backend;
        let ln = Norm::layer_norm();
        check(b, ln, x.view(), Some(&gamma), Some(&beta), false, 1e-5);
        check(b, ln, xt, Some(&gamma), Some(&beta), false, 1e-5);
        check(b, ln, x.view(), None, Some(&beta), false, 1e-5); // bias only
        check(b, ln, x.view(), None, None, false, 1e-5); // no affine
        check(b, ln, x.view(), Some(&gamma), Some(&beta), true, 1e-5); // frozen γ
        check(b, ln, xb.view(), Some(&gb), Some(&bb), false, 2e-2);
        check(b, ln, xb.view(), None, None, true, 2e-2);
    }
}

#[test]
fn rms_norm_with_the_same_calls() {
    let x = input((3, 4, 64), 4);
    let gamma = input((1, 1, 64), 5).into_shape_with_order(64).unwrap();
    let xb = x.mapv(bf16::from_f32);
    let gb = gamma.mapv(bf16::from_f32);
    for backend in backends() {
        let b = &*backend;
        let rms = Norm::rms_norm();
        check(b, rms, x.view(), Some(&gamma), None, false, 1e-5);
        check(b, rms, xb.view(), Some(&gb), None, false, 2e-2);
        check(b, rms.gamma_offset(1.0), x.view(), Some(&gamma), None, false, 1e-5);
    }
}

#[test]
fn a_pre_norm_block_fused_and_backward_from_the_output() {
    let (x, r) = (input((2, 3, 32), 6), input((2, 3, 32), 7));
    let gamma = input((1, 1, 32), 8).mapv(|v| 1.5 + v / 4.0).into_shape_with_order(32).unwrap();
    let dy = input((2, 3, 32), 9);
    let dh = input((2, 3, 32), 10);
    for backend in backends() {
        let b = &*backend;
        let norm = Norm::rms_norm();
        let what = b.name().to_string();
        let out = b.forward_nd(norm, &x).gamma(&gamma).residual(&r).run().unwrap();
        let h = out.h.as_ref().expect("h comes back with a residual");
        let want_h = &x + &r;
        assert_eq!(**h, want_h, "{what}: h is x + residual rounded once");
        // In place: the residual's array receives h.
        let mut r2 = r.clone();
        let inplace = b.forward_nd(norm, &x).gamma(&gamma).residual_in_place(r2.view_mut());
        let out2 = inplace.run().unwrap();
        assert_eq!(r2, want_h, "{what}: in place");
        assert_eq!(*out2.y, *out.y, "{what}: y in place");
        // The backward from y, with dh, equals the reference backward of h plus dh.
        let grads = b
            .backward_nd_from_output(norm, &out.y, &dy, out.stats())
            .gamma(&gamma)
            .dh(&dh)
            .run()
            .unwrap();
        let spec = NormSpec::rms_norm(6, 32, DType::F32);
        let hs: Vec<f64> = want_h.iter().map(|&v| v.into()).collect();
        let g64: Vec<f64> = gamma.iter().map(|&v| v.into()).collect();
        let fwd = reference::forward(&spec, &hs, Some(&g64), None).unwrap();
        let dy64: Vec<f64> = dy.iter().map(|&v| v.into()).collect();
        let bwd = reference::backward(&spec, &hs, &dy64, None, &fwd.rstd, Some(&g64)).unwrap();
        let dh64: Vec<f64> = dh.iter().map(|&v| v.into()).collect();
        let bwd = reference::add_dh(bwd, &dh64).unwrap();
        close(&format!("{what} dx"), &f64s(&grads.dx), &bwd.dx, 1e-4);
    }
}

#[test]
fn bad_calls_are_typed_errors() {
    for backend in backends() {
        let b = &*backend;
        let x = input((2, 3, 8), 11);
        let short = Array1::<f32>::ones(7);
        let err = b.forward_nd(Norm::layer_norm(), &x).gamma(&short).run().unwrap_err();
        assert_eq!(err, Error::DimsMismatch { tensor: "gamma", expected: vec![8], got: vec![7] });
        let err = b.forward_nd(Norm::layer_norm().normalized_ndim(4), &x).run().unwrap_err();
        assert_eq!(err.class(), "dims");
        let err = b.forward_nd(Norm::layer_norm().eps(-1.0), &x).run().unwrap_err();
        assert_eq!(err.class(), "eps");
        let err = b.forward_nd(Norm::rms_norm().gamma_offset(1.0), &x).run().unwrap_err();
        assert_eq!(err.class(), "option", "an offset without γ");
    }
}
