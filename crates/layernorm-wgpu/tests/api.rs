//! The backend's contract beyond accuracy: typed errors on bad input (never a panic), f64 refused,
//! bitwise-reproducible dγ/dβ, non-finite rows contained, `rows == 0`, and buffers brought by the
//! user.

mod common;

use common::{Dist, backend, data};
use layernorm_core::{
    BackwardArgs, DType, Error, ForwardArgs, HostNormalizeExt, HostSlice, HostSliceMut, NormKind,
    NormSpec, Normalize, bf16, f16,
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
    let spec = NormSpec::layer_norm(1, 2, DType::F64).with_affine(false);
    let err = b.forward_vec(&spec, &[1.0f64, 2.0], None, None).unwrap_err();
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
    let err = b.forward_vec(&spec, &[0.0f32; 5], Some(&g), Some(&be)).unwrap_err();
    assert_eq!(err, Error::ShapeMismatch { tensor: "x", expected: 6, got: 5 });
    let err = b.forward_vec(&spec, &[0.0f32; 6], None, Some(&be)).unwrap_err();
    assert_eq!(err.class(), "parameter");
    let err = b.forward_vec(&spec.clone().with_eps(0.0), &[0.0f32; 6], Some(&g), Some(&be));
    assert_eq!(err.unwrap_err().class(), "eps");
    let err = b.forward_vec(&NormSpec::layer_norm(2, 0, DType::F32), &[0.0f32; 0], None, None);
    assert_eq!(err.unwrap_err().class(), "empty");
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
    let err = b.forward(&spec, ForwardArgs::new(&x, None, None, &mut y, &mut m, &mut r));
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
    b.forward(&spec, ForwardArgs::new(&x, None, None, &mut y, &mut m, &mut r)).unwrap();
    let mut got = [0.0f32; 4];
    b.download(&y, HostSliceMut::F32(&mut got)).unwrap();
    let want = b.forward_vec(&spec, &xs, None, None).unwrap().y;
    assert_eq!(got.to_vec(), *want);

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
    let err = b.forward(&spec, ForwardArgs::new(&x, None, None, &mut alias, &mut m, &mut r));
    let e = err.unwrap_err();
    assert_eq!(e.class(), "device");
    // With wgpu's description, not just "Validation Error".
    assert!(e.to_string().contains("conflicting usages"), "{e}");
}

#[test]
fn zero_rows_write_zero_parameter_gradients() {
    let Some(b) = backend() else { return };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
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
            &stats,
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
    let spec = NormSpec::layer_norm(rows, n, DType::F32);
    let x: Vec<f32> = data(rows, n, Dist::Normal, 1).iter().map(|&v| v as f32).collect();
    let dy: Vec<f32> = data(rows, n, Dist::Normal, 2).iter().map(|&v| v as f32).collect();
    let g = vec![1.5f32; n];
    let f = b.forward_vec(&spec, &x, Some(&g), Some(&g)).unwrap();
    let first = b.backward_vec(&spec, &x, &dy, &f.mean, &f.rstd, Some(&g)).unwrap();
    for _ in 0..3 {
        let again = b.backward_vec(&spec, &x, &dy, &f.mean, &f.rstd, Some(&g)).unwrap();
        let bits = |v: &Option<layernorm_core::Out<f32>>| {
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
        let spec = NormSpec::layer_norm(rows, n, DType::F32).with_affine(false);
        let mut x: Vec<f32> = data(rows, n, Dist::Normal, 3).iter().map(|&v| v as f32).collect();
        let dy: Vec<f32> = data(rows, n, Dist::Normal, 4).iter().map(|&v| v as f32).collect();
        x[n + 1] = f32::INFINITY;
        x[2 * n] = f32::NAN;
        let f = b.forward_vec(&spec, &x, None, None).unwrap();
        let d = b.backward_vec(&spec, &x, &dy, &f.mean, &f.rstd, None).unwrap();
        for r in 0..rows {
            let bad = r == 1 || r == 2;
            let (y, dx) = (&f.y[r * n..(r + 1) * n], &d.dx[r * n..(r + 1) * n]);
            if bad {
                assert!(y.iter().all(|v| !v.is_finite()), "n={n} row {r}");
                assert!(!f.rstd[r].is_finite() && !f.mean[r].is_finite());
            } else {
                assert!(y.iter().chain(dx).all(|v| v.is_finite()), "n={n} row {r}");
                // The clean rows match the same rows normalized on their own.
                let one = NormSpec::layer_norm(1, n, DType::F32).with_affine(false);
                let alone = b.forward_vec(&one, &x[r * n..(r + 1) * n], None, None).unwrap();
                assert_eq!(alone.y, y.to_vec());
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
