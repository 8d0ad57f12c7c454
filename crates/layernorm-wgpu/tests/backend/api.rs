//! The backend's contract beyond accuracy: typed errors on bad input (never a panic), f64 refused,
//! bitwise-reproducible dγ/dβ, non-finite rows contained, `rows == 0`, and buffers brought by the
//! user.

use crate::common;

use common::{Dist, Res, Variant, array, backend, data, round};
use layernorm_core::ndarray::{Array1, Array2};
use layernorm_core::{
    Backend, BackwardArgs, DType, Error, ForwardArgs, HostNormalize, HostSlice, HostSliceMut, Norm,
    NormKind, NormSpec, Normalize, NormalizeNd, Stats, bf16, f16,
};

#[test]
fn f64_is_unsupported_with_a_reason() {
    let Some(b) = backend() else { return };
    match b.supports(NormKind::LayerNorm, DType::F64) {
        Err(Error::UnsupportedDType { dtype: DType::F64, reason, .. }) => {
            assert!(reason.contains("f64"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let x = array(1, 2, vec![1.0f64, 2.0]);
    let err = b.forward_nd(Norm::layer_norm(), &x).run().unwrap_err();
    assert_eq!(err.class(), "unsupported");
    for d in [DType::F32, DType::BF16] {
        assert_eq!(b.supports(NormKind::LayerNorm, d), Ok(()));
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let Some(b) = backend() else { return };
    let spec = NormSpec::layer_norm(2, 3, DType::F32);
    let (g, be) = ([1.0f32; 3], [0.0f32; 3]);
    // Through the host layer, which checks lengths, presence and ε before touching the device.
    let (x5, x6) = ([0.0f32; 5], [0.0f32; 6]);
    let (mut y, mut m, mut r) = ([0.0f32; 6], [0.0f32; 2], [0.0f32; 2]);
    let mut host = |spec: &NormSpec, x: &[f32], gamma: Option<&[f32]>| {
        let args = ForwardArgs::new(
            HostSlice::F32(x),
            gamma.map(HostSlice::F32),
            Some(HostSlice::F32(&be)),
            HostSliceMut::F32(&mut y),
            Some(HostSliceMut::F32(&mut m)),
            HostSliceMut::F32(&mut r),
        );
        b.forward_host(spec, args)
    };
    let err = host(&spec, &x5, Some(&g)).unwrap_err();
    assert_eq!(err, Error::ShapeMismatch { tensor: "x", expected: 6, got: 5 });
    let err = host(&spec, &x6, None).unwrap_err();
    assert_eq!(err.class(), "parameter");
    let err = host(&spec.clone().with_eps(0.0), &x6, Some(&g));
    assert_eq!(err.unwrap_err().class(), "eps");
    // And through the n-d layer: an empty normalized dim, ε.
    let empty = Array2::<f32>::zeros((2, 0));
    let err = b.forward_nd(Norm::layer_norm(), &empty).run();
    assert_eq!(err.unwrap_err().class(), "empty");
    let err = b.forward_nd(Norm::layer_norm().eps(-1.0), &array(2, 3, x6.to_vec())).run();
    assert_eq!(err.unwrap_err().class(), "eps");
    // Beyond the device's max_buffer_size: a typed error before wgpu sees it.
    assert_eq!(b.alloc(DType::F32, 1 << 40).unwrap_err().class(), "too-large");
    // Wrong dtype of a device buffer.
    let x = b.upload(HostSlice::BF16(&[bf16::ONE; 6])).unwrap();
    let mut out = [0.0f32; 6];
    assert_eq!(b.download(&x, HostSliceMut::F32(&mut out)).unwrap_err().class(), "dtype");
}

#[test]
fn buffers_of_another_device_are_refused() {
    let Some(b) = backend() else { return };
    let other = layernorm_wgpu::WgpuBackend::new().unwrap();
    let spec = NormSpec::layer_norm(1, 4, DType::F32).with_affine(false);
    let x = other.upload(HostSlice::F32(&[1.0, 2.0, 3.0, 4.0])).unwrap();
    let mut y = b.alloc(DType::F32, 4).unwrap();
    let mut m = b.alloc(DType::F32, 1).unwrap();
    let mut r = b.alloc(DType::F32, 1).unwrap();
    let err = b.forward(&spec, ForwardArgs::new(&x, None, None, &mut y, Some(&mut m), &mut r));
    assert_eq!(err.unwrap_err(), Error::ForeignBuffer { tensor: "x" });
}

#[test]
fn user_buffers_are_wrapped_and_misuse_is_an_error() {
    let Some(b) = backend() else { return };
    let dev = b.device();
    let make = |bytes: u64, usage| {
        dev.create_buffer(&wgpu::BufferDescriptor {
            label: Some("user"),
            size: bytes,
            usage,
            mapped_at_creation: false,
        })
    };
    let xs = [1.0f32, 2.0, 4.0, 8.0];
    let raw = make(16, layernorm_wgpu::REQUIRED_USAGES);
    b.queue().write_buffer(&raw, 0, &xs.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>());
    let x = b.wrap(raw.clone(), DType::F32, 4).unwrap();
    assert_eq!(x.buffer(), &raw);
    let mut y = b.wrap(make(16, layernorm_wgpu::REQUIRED_USAGES), DType::F32, 4).unwrap();
    let mut m = b.alloc(DType::F32, 1).unwrap();
    let mut r = b.alloc(DType::F32, 1).unwrap();
    let spec = NormSpec::layer_norm(1, 4, DType::F32).with_affine(false);
    b.forward(&spec, ForwardArgs::new(&x, None, None, &mut y, Some(&mut m), &mut r)).unwrap();
    let mut got = [0.0f32; 4];
    b.download(&y, HostSliceMut::F32(&mut got)).unwrap();
    let want = b.forward_nd(Norm::layer_norm(), &array(1, 4, xs.to_vec())).run().unwrap().y;
    assert_eq!(got.to_vec(), want.iter().copied().collect::<Vec<_>>());

    // Too small, and missing usages.
    assert_eq!(
        b.wrap(make(16, layernorm_wgpu::REQUIRED_USAGES), DType::F32, 5).unwrap_err().class(),
        "shape"
    );
    let e = b.wrap(make(16, wgpu::BufferUsages::STORAGE), DType::F32, 4).unwrap_err();
    assert_eq!(e.class(), "device");
    assert!(e.to_string().contains("needs usages"), "{e}");

    // The same wgpu buffer as input and output: wgpu rejects the binding; we return its error.
    let mut alias = b.wrap(raw.clone(), DType::F32, 4).unwrap();
    let err = b.forward(&spec, ForwardArgs::new(&x, None, None, &mut alias, Some(&mut m), &mut r));
    let e = err.unwrap_err();
    assert_eq!(e.class(), "device");
    // With wgpu's description, not just "Validation Error".
    assert!(e.to_string().contains("conflicting usages"), "{e}");
}

#[test]
fn zero_rows_write_zero_parameter_gradients() {
    let Some(b) = backend() else { return };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        if !common::runs(b, dtype) {
            continue;
        }
        let spec = NormSpec::layer_norm(0, 5, dtype);
        let ones = layernorm_core::HostVec::from_f64(dtype, &[1.0; 5]);
        let empty = layernorm_core::HostVec::zeros(dtype, 0);
        let stats = b.alloc(DType::F32, 0).unwrap();
        let x = b.upload(empty.as_slice()).unwrap();
        let gamma = b.upload(ones.as_slice()).unwrap();
        let mut dx = b.upload(empty.as_slice()).unwrap();
        let mut dg = b.upload(ones.as_slice()).unwrap();
        let mut db = b.upload(ones.as_slice()).unwrap();
        let args = BackwardArgs::new(
            &x,
            &x,
            Some(&stats),
            &stats,
            Some(&gamma),
            &mut dx,
            Some(&mut dg),
            Some(&mut db),
        );
        b.backward(&spec, args).unwrap();
        for buf in [&dg, &db] {
            let mut out = layernorm_core::HostVec::zeros(dtype, 5);
            b.download(buf, out.as_mut_slice()).unwrap();
            assert_eq!(out.to_f64_vec(), vec![0.0; 5], "{dtype}");
        }
    }
}

#[test]
fn parameter_gradients_are_bitwise_reproducible() {
    let Some(b) = backend() else { return };
    let (rows, n) = (3000, 256);
    let norm = Norm::layer_norm();
    let x = array(rows, n, round::<f32>(&data(rows, n, Dist::Normal, 1)));
    let dy = array(rows, n, round::<f32>(&data(rows, n, Dist::Normal, 2)));
    let g = vec![1.5f32; n];
    let f = b.forward_nd(norm, &x).gamma(&g[..]).beta(&g[..]).run().unwrap();
    let run = || b.backward_nd(norm, &x, &dy, f.stats()).gamma(&g[..]).beta(&g[..]).run().unwrap();
    let first = run();
    for _ in 0..3 {
        let again = run();
        let bits = |v: &Option<layernorm_core::OutArray<f32>>| {
            v.as_ref().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(bits(&first.dgamma), bits(&again.dgamma));
        assert_eq!(bits(&first.dbeta), bits(&again.dbeta));
        assert_eq!(first.dx, again.dx);
    }
}

#[test]
fn a_non_finite_row_stays_in_its_row() {
    let Some(b) = backend() else { return };
    for n in [3usize, 100, 1024, 65536] {
        let rows = 4;
        let norm = Norm::layer_norm();
        let mut x: Vec<f32> = round(&data(rows, n, Dist::Normal, 3));
        let dy = array(rows, n, round::<f32>(&data(rows, n, Dist::Normal, 4)));
        x[n + 1] = f32::INFINITY;
        x[2 * n] = f32::NAN;
        let x = array(rows, n, x);
        let f = b.forward_nd(norm, &x).run().unwrap();
        let d = b.backward_nd(norm, &x, &dy, f.stats()).run().unwrap();
        let (mean, rstd) = (f.saved.mean.as_ref().unwrap(), &f.saved.rstd);
        for r in 0..rows {
            let bad = r == 1 || r == 2;
            let (y, dx) = (f.y.row(r), d.dx.row(r));
            if bad {
                assert!(y.iter().all(|v| !v.is_finite()), "n={n} row {r}");
                assert!(!rstd[r].is_finite() && !mean[r].is_finite());
            } else {
                assert!(y.iter().chain(dx).all(|v| v.is_finite()), "n={n} row {r}");
                // The clean rows match the same rows normalized on their own.
                let alone = b.forward_nd(norm, x.row(r)).run().unwrap();
                assert_eq!(alone.y.to_vec(), y.to_vec());
            }
        }
    }
}

#[test]
fn sixteen_bit_round_trips_of_odd_length() {
    let Some(b) = backend() else { return };
    let h = [f16::from_f32(1.5), f16::from_f32(-2.0), f16::from_f32(65504.0)];
    let buf = b.upload(HostSlice::F16(&h)).unwrap();
    let mut out = [f16::ZERO; 3];
    b.download(&buf, HostSliceMut::F16(&mut out)).unwrap();
    assert_eq!(out, h);
    let h = [bf16::from_f32(1.5), bf16::from_f32(-2.0), bf16::from_f32(3e38)];
    let buf = b.upload(HostSlice::BF16(&h)).unwrap();
    let mut out = [bf16::ZERO; 3];
    b.download(&buf, HostSliceMut::BF16(&mut out)).unwrap();
    assert_eq!(out, h);
}

#[test]
fn a_too_small_wrapped_buffer_is_reported_in_elements() {
    let Some(b) = backend() else { return };
    let raw = b.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("user"),
        size: 16,
        usage: layernorm_wgpu::REQUIRED_USAGES,
        mapped_at_creation: false,
    });
    let err = b.wrap(raw, DType::F32, 5).unwrap_err();
    assert_eq!(err, Error::ShapeMismatch { tensor: "wrapped buffer", expected: 5, got: 4 });
    assert!(err.to_string().contains("expected 5 elements, got 4"), "{err}");
}

#[test]
fn sizes_from_arguments_are_checked_before_anything_is_allocated() {
    let Some(b) = backend() else { return };
    // A valid spec of 2^40 rows with an empty x: a shape error, not a 4 TiB allocation.
    let spec = NormSpec::layer_norm(1 << 40, 1, DType::F32).with_affine(false);
    let (mut y, mut m, mut r) = ([0.0f32; 0], [0.0f32; 0], [0.0f32; 0]);
    let args = ForwardArgs::new(
        HostSlice::F32(&[]),
        None,
        None,
        HostSliceMut::F32(&mut y),
        Some(HostSliceMut::F32(&mut m)),
        HostSliceMut::F32(&mut r),
    );
    let err = b.forward_host(&spec, args).unwrap_err();
    assert_eq!(err, Error::ShapeMismatch { tensor: "x", expected: 1 << 40, got: 0 });
    // No rows of 2^40 or 2^62 elements: nothing to compute, nothing allocated, no row size
    // formed in bytes (2^62 f32 elements are 2^64 bytes).
    for n in [1usize << 40, 1 << 62] {
        let spec = NormSpec::layer_norm(0, n, DType::F32).with_affine(false);
        let mut dx = [0.0f32; 0];
        let args = BackwardArgs::new(
            HostSlice::F32(&[]),
            HostSlice::F32(&[]),
            Some(HostSlice::F32(&[])),
            HostSlice::F32(&[]),
            None,
            HostSliceMut::F32(&mut dx),
            None,
            None,
        );
        assert_eq!(b.backward_host(&spec, args), Ok(()));
    }
    // Zero-size dims beside huge ones, through the n-d layer.
    let err = b.forward_nd(Norm::layer_norm(), Array2::<f32>::zeros((1 << 40, 0)).view()).run();
    assert_eq!(err.unwrap_err().class(), "empty");
    let out = b.forward_nd(Norm::rms_norm(), Array2::<f32>::zeros((0, 1 << 40)).view()).run();
    assert_eq!(out.unwrap().y.len(), 0);
    // Device buffers beyond the device's limits, or beyond u64 bytes.
    assert_eq!(b.alloc(DType::F32, 1 << 40).unwrap_err().class(), "too-large");
    assert_eq!(b.alloc(DType::F32, usize::MAX).unwrap_err().class(), "too-large");
}

#[test]
fn eps_below_the_smallest_normal_f32_is_unsupported_by_name() {
    let Some(b) = backend() else { return };
    let x = array(2, 4, vec![1.0f32, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
    for eps in [1e-39, 1e-40, 1e-300, f64::from_bits(1), f64::from(f32::MIN_POSITIVE) * 0.999] {
        for norm in [Norm::layer_norm(), Norm::rms_norm()] {
            let err = b.forward_nd(norm.eps(eps), &x).run().unwrap_err();
            assert_eq!(err.class(), "unsupported-feature", "{eps:e}: {err}");
            let msg = err.to_string();
            assert!(
                msg.contains("eps") && msg.contains(&format!("{:e}", f32::MIN_POSITIVE)),
                "{msg}"
            );
        }
    }
    // The device-level call says the same, before touching the outputs.
    let spec = NormSpec::layer_norm(1, 4, DType::F32).with_affine(false).with_eps(1e-40);
    let xb = b.upload(HostSlice::F32(&[1.0, 2.0, 3.0, 4.0])).unwrap();
    let mut y = b.upload(HostSlice::F32(&[7.0; 4])).unwrap();
    let (mut m, mut r) = (b.alloc(DType::F32, 1).unwrap(), b.alloc(DType::F32, 1).unwrap());
    let err = b.forward(&spec, ForwardArgs::new(&xb, None, None, &mut y, Some(&mut m), &mut r));
    assert_eq!(err.unwrap_err().class(), "unsupported-feature");
    let mut out = [0.0f32; 4];
    b.download(&y, HostSliceMut::F32(&mut out)).unwrap();
    assert_eq!(out, [7.0; 4]);
}

/// Whether `eps` gives an f32-subnormal rstd on an adapter that flushes subnormals (GL), which
/// the backend refuses.
fn flushed_rstd(b: &layernorm_wgpu::WgpuBackend, eps: f64) -> bool {
    b.adapter_info().backend == wgpu::Backend::Gl && (2f64.powi(252)..2f64.powi(300)).contains(&eps)
}

#[test]
fn every_representable_eps_follows_the_reference() {
    // From the smallest normal f32 to the largest f64: ε is passed as a mantissa and an
    // exponent, so 1e39 (past f32's range) still gives rstd ≈ 3e-20, and 1e300 gives rstd and
    // dx that round to 0 in f32, y = β.
    let Some(b) = backend() else { return };
    let epsilons = [
        f64::from(f32::MIN_POSITIVE),
        1e-30,
        1e-12,
        0.5,
        1.0,
        1e30,
        1e38,
        1e39,
        1e75,
        1e77,
        1e300,
        f64::MAX,
    ];
    for (i, &eps) in epsilons.iter().enumerate() {
        // From ε = 2^252 to 2^300 rstd is an f32 subnormal: refused on an adapter that flushes
        // subnormals (GL), for every pass.
        if flushed_rstd(b, eps) {
            let s = NormSpec::layer_norm(3, 5, DType::F32).with_eps(eps);
            assert_eq!(b.accepts(&s).unwrap_err().class(), "unsupported-feature", "ε = {eps:e}");
            continue;
        }
        // From ε = 2^252 the saved f32 rstd is below f32's normal range: the backward from x is
        // refused (below), the backward from y runs.
        let from_y = eps >= 2f64.powi(252);
        let v = Variant { res: Res::None, from_y, dh: false };
        for kind in NormKind::ALL {
            for dist in [Dist::Normal, Dist::Scaled(1e20), Dist::Constant] {
                // x̂ ≈ σ/√ε. Where that lies near or in f32's subnormal range (which GPUs flush)
                // but above its underflow to zero, x̂ and dγ = Σ dy·x̂ lose their low bits to
                // flushing: not comparable with an f32 tolerance. LayerNorm's constant rows have
                // x̂ = 0.
                let sigma = if let Dist::Scaled(s) = dist { s } else { 1.0 };
                let flushed = (1e-46..1e-30).contains(&(sigma / eps.sqrt()));
                let zero = matches!(dist, Dist::Constant) && kind == NormKind::LayerNorm;
                if flushed && !zero {
                    continue;
                }
                for &(rows, n) in &[(3, 5), (4, 1024), (2, 12000)] {
                    let s = NormSpec::new(kind, rows, n, DType::F32).with_eps(eps);
                    let x = data(rows, n, dist, i as u64);
                    common::check_variant::<f32>(b, &s, v, &x, common::F32, 9);
                    let s16 = s.clone().with_dtype(DType::BF16);
                    common::check_variant::<bf16>(b, &s16, v, &x, common::BF16, 9);
                }
            }
        }
    }
}

#[test]
fn the_backward_from_x_refuses_an_eps_whose_rstd_f32_cannot_hold() {
    let Some(b) = backend() else { return };
    let x = array(2, 8, round::<f32>(&data(2, 8, Dist::Scaled(1e38), 1)));
    let dy = array(2, 8, vec![1.0f32; 16]);
    for eps in [2f64.powi(252), 1e77, 1e300] {
        let norm = Norm::layer_norm().eps(eps);
        if flushed_rstd(b, eps) {
            let err = b.forward_nd(norm, &x).run().unwrap_err();
            assert_eq!(err.class(), "unsupported-feature", "{err}");
            assert!(err.to_string().contains("flushes"), "{err}");
            continue;
        }
        let f = b.forward_nd(norm, &x).run().unwrap();
        let err = b.backward_nd(norm, &x, &dy, f.stats()).run().unwrap_err();
        assert_eq!(err.class(), "unsupported-feature", "{err}");
        assert!(err.to_string().contains("2^252"), "{err}");
        assert!(b.backward_nd_from_output(norm, &f.y, &dy, f.stats()).run().is_ok());
    }
}

#[test]
fn a_singular_gamma_is_refused_before_anything_is_written() {
    let Some(b) = backend() else { return };
    let (rows, n) = (2, 6);
    let norm = Norm::rms_norm().gamma_offset(1.0);
    let x = array(rows, n, round::<f32>(&data(rows, n, Dist::Normal, 1)));
    let mut g = vec![0.5f32; n];
    g[3] = -1.0; // offset + γ = 0 at column 3
    let f = b.forward_nd(norm, &x).gamma(&g[..]).run().unwrap();
    let dy = array(rows, n, vec![1.0f32; rows * n]);
    let want = Error::SingularGamma { column: 3, gamma: -1.0, offset: 1.0 };
    let err = b.backward_nd_from_output(norm, &f.y, &dy, f.stats()).gamma(&g[..]).run();
    assert_eq!(err.unwrap_err(), want);
    // From x the same γ is fine.
    assert!(b.backward_nd(norm, &x, &dy, f.stats()).gamma(&g[..]).run().is_ok());

    // Device level: dx and dγ keep what they held.
    let spec = NormSpec::rms_norm(rows, n, DType::F32).with_gamma_offset(1.0);
    let up = |v: &[f32]| b.upload(HostSlice::F32(v)).unwrap();
    let (y, dyb, gb) = (up(f.y.as_slice().unwrap()), up(dy.as_slice().unwrap()), up(&g));
    let rstd = up(f.saved.rstd.as_slice().unwrap());
    let mut dx = up(&vec![7.0; rows * n]);
    let mut dg = up(&vec![7.0; n]);
    let args = BackwardArgs::new(&y, &dyb, None, &rstd, Some(&gb), &mut dx, Some(&mut dg), None)
        .from_output(&y, None);
    assert_eq!(b.backward(&spec, args).unwrap_err(), want);
    for (buf, len) in [(&dx, rows * n), (&dg, n)] {
        let mut out = vec![0.0f32; len];
        b.download(buf, HostSliceMut::F32(&mut out)).unwrap();
        assert!(out.iter().all(|&v| v == 7.0), "{out:?}");
    }
}

/// Which input of a forward + backward is poisoned.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Poison {
    X,
    Dy,
    Mean,
    Rstd,
}

/// Row 2 of 4 poisoned with `value` in `what`: that row's outputs are not finite (NaN where a
/// saved statistic is poisoned), and every other row's y, statistics and dx are bitwise those of
/// an unpoisoned run.
fn poisoned_row_stays_in_its_row<T: layernorm_core::Element>(
    b: &layernorm_wgpu::WgpuBackend,
    kind: NormKind,
    n: usize,
    what: Poison,
    value: f32,
) {
    let rows = 4;
    let norm = Norm::new(kind);
    let ctx = format!("{kind} {} n={n} {what:?}={value}", T::DTYPE);
    let xs = round::<T>(&data(rows, n, Dist::Normal, 3));
    let dys = round::<T>(&data(rows, n, Dist::Normal, 4));
    let g = round::<T>(&data(1, n, Dist::Offset(1.0), 5));
    let clean_x = array(rows, n, xs.clone());
    let clean_dy = array(rows, n, dys.clone());
    let bits = |v: &[T]| v.iter().map(|&e| T::to_f64(e).to_bits()).collect::<Vec<_>>();
    let fwd = |x: &Array2<T>| b.forward_nd(norm, x).gamma(&g[..]).run().unwrap();
    let clean = fwd(&clean_x);
    let clean_grads = b.backward_nd(norm, &clean_x, &clean_dy, clean.stats()).gamma(&g[..]).run();
    let clean_dx = clean_grads.unwrap().dx;

    let mut x = xs;
    let mut dy = dys;
    let at = 2 * n + n / 2;
    match what {
        Poison::X => x[at] = T::from_f64(f64::from(value)),
        Poison::Dy => dy[at] = T::from_f64(f64::from(value)),
        _ => {}
    }
    let (x, dy) = (array(rows, n, x), array(rows, n, dy));
    let f = fwd(&x);
    let mut rstd: Vec<T::Acc> = f.saved.rstd.iter().copied().collect();
    let mut mean: Option<Vec<T::Acc>> = f.saved.mean.as_ref().map(|m| m.iter().copied().collect());
    let poison = <T::Acc as layernorm_core::Element>::from_f64(f64::from(value));
    match what {
        Poison::Rstd => rstd[2] = poison,
        Poison::Mean => mean.as_mut().expect("LayerNorm")[2] = poison,
        _ => {}
    }
    let rstd = Array1::from(rstd);
    let mean = mean.map(Array1::from);
    let mut stats = Stats::new(&rstd);
    if let Some(m) = &mean {
        stats = stats.with_mean(m);
    }
    let d = b.backward_nd(norm, &x, &dy, stats).gamma(&g[..]).run().unwrap();
    for r in 0..rows {
        let (y, dx) = (f.y.row(r).to_vec(), d.dx.row(r).to_vec());
        if r == 2 {
            let stat_poisoned = matches!(what, Poison::Mean | Poison::Rstd) || value.is_nan();
            let bad = |v: &T| {
                let v = T::to_f64(*v);
                if stat_poisoned { v.is_nan() } else { !v.is_finite() }
            };
            assert!(dx.iter().all(bad), "{ctx}: dx of the poisoned row: {dx:?}");
            if what == Poison::X {
                assert!(y.iter().all(|v| T::to_f64(*v).is_nan()), "{ctx}: y {y:?}");
                assert!(Into::<f64>::into(f.saved.rstd[2]).is_nan(), "{ctx}: rstd");
            }
        } else {
            assert_eq!(bits(&y), bits(&clean.y.row(r).to_vec()), "{ctx}: y of row {r}");
            assert_eq!(bits(&dx), bits(&clean_dx.row(r).to_vec()), "{ctx}: dx of row {r}");
            let acc_bits = |v: T::Acc| Into::<f64>::into(v).to_bits();
            assert_eq!(acc_bits(f.saved.rstd[r]), acc_bits(clean.saved.rstd[r]), "{ctx}: rstd {r}");
        }
    }
}

#[test]
fn poisoned_inputs_and_statistics_stay_in_their_row() {
    let Some(b) = backend() else { return };
    for kind in NormKind::ALL {
        for n in [3usize, 1024, 20_000] {
            for what in [Poison::X, Poison::Dy, Poison::Mean, Poison::Rstd] {
                if what == Poison::Mean && !kind.has_mean() {
                    continue;
                }
                for value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    poisoned_row_stays_in_its_row::<f32>(b, kind, n, what, value);
                    poisoned_row_stays_in_its_row::<bf16>(b, kind, n, what, value);
                }
            }
        }
    }
}

#[test]
fn the_copy_kernel_copies_and_checks_its_sizes() {
    // The benches' bandwidth baseline.
    let Some(b) = backend() else { return };
    let v: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
    let src = b.upload(HostSlice::F32(&v)).unwrap();
    let mut dst = b.alloc(DType::F32, 1000).unwrap();
    b.copy_kernel(&src, &mut dst).unwrap();
    let mut out = vec![0.0f32; 1000];
    b.download(&dst, HostSliceMut::F32(&mut out)).unwrap();
    assert_eq!(out, v);
    let mut short = b.alloc(DType::F32, 996).unwrap();
    assert_eq!(b.copy_kernel(&src, &mut short).unwrap_err().class(), "shape");
}
