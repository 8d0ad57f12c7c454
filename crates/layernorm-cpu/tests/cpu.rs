//! CPU-backend behaviour beyond the conformance suite: bitwise determinism across thread counts,
//! the ndarray layer (leading dims, several normalized dims, non-contiguous views, caller-owned
//! outputs, the pre-norm variants), typed errors for bad input, and non-finite rows staying in
//! their row.

mod common;

use std::sync::Arc;

use common::{backward, bits, forward, normal, pool};
use layernorm_core::ndarray::{Array, Array2, Array3, ArrayD, IxDyn, s};
use layernorm_core::{
    DType, Element, Error, Norm, NormKind, NormSpec, NormalizeNd, Stats, bf16, f16, reference,
};
use layernorm_cpu::{CpuBackend, ROW_BLOCK, Stores};

/// Forward then backward (f32, with γ and β) on a pool of each thread count: dx, dγ and dβ must
/// be bitwise identical across them. Returns the first pool's (dx, dγ, dβ).
fn same_gradients_on_pools(
    spec: &NormSpec,
    (x, dy): (&[f32], &[f32]),
    (g, b): (&[f32], &[f32]),
    threads: &[usize],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut first: Option<(Vec<f32>, Vec<f32>, Vec<f32>)> = None;
    let kind = spec.kind;
    for &threads in threads {
        let cpu = CpuBackend::with_pool(pool(threads));
        let f = forward(&cpu, spec, x, Some(g), Some(b)).unwrap();
        let gr = backward(&cpu, spec, (x, dy), (&f.mean, &f.rstd), Some(g)).unwrap();
        let got = (gr.dx, gr.dgamma.unwrap(), gr.dbeta.unwrap());
        match &first {
            None => first = Some(got),
            Some(want) => {
                assert_eq!(
                    bits(&got.1),
                    bits(&want.1),
                    "{kind}: dgamma differs at {threads} threads"
                );
                assert_eq!(
                    bits(&got.2),
                    bits(&want.2),
                    "{kind}: dbeta differs at {threads} threads"
                );
                assert_eq!(bits(&got.0), bits(&want.0), "{kind}: dx differs at {threads} threads");
            }
        }
    }
    first.expect("at least one thread count")
}

#[test]
fn parameter_gradients_are_bitwise_identical_for_any_thread_count() {
    // Enough rows for many blocks and a parallel run, with a ragged last block.
    let (rows, n) = (ROW_BLOCK * 37 + 5, 515);
    let x = normal(rows * n, 1);
    let dy = normal(rows * n, 2);
    let (g, b) = (normal(n, 3), normal(n, 4));
    for kind in NormKind::ALL {
        let spec = NormSpec::new(kind, rows, n, DType::F32);
        same_gradients_on_pools(&spec, (&x, &dy), (&g, &b), &[1, 2, 3, 8]);
    }
}

#[test]
fn very_long_rows_give_the_same_bits_on_any_pool() {
    // Fewer rows than a block, rows of 2^17 + 3: one thread runs the row-wise kernels, more
    // threads the column chunks (which spread where the blocks cannot); the bits must agree.
    let (rows, n) = (5, (1 << 17) + 3);
    let x: Vec<f32> =
        normal(rows * n, 11).iter().enumerate().map(|(i, v)| v + (i / n) as f32 * 1e3).collect();
    let dy = normal(rows * n, 12);
    let (g, b) = (normal(n, 13), normal(n, 14));
    for kind in NormKind::ALL {
        let spec = NormSpec::new(kind, rows, n, DType::F32);
        let (dx, dg, db) = same_gradients_on_pools(&spec, (&x, &dy), (&g, &b), &[1, 2, 3]);
        // And against the f64 oracle.
        let wide = |v: &[f32]| v.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
        let (xw, gw) = (wide(&x), wide(&g));
        let rf = reference::forward(&spec, &xw, Some(&gw), Some(&wide(&b))).unwrap();
        let mean = rf.mean.as_deref();
        let want = reference::backward(&spec, &xw, &wide(&dy), mean, &rf.rstd, Some(&gw)).unwrap();
        for (name, got, want) in [
            ("dx", &dx, &want.dx),
            ("dgamma", &dg, want.dgamma.as_ref().unwrap()),
            ("dbeta", &db, want.dbeta.as_ref().unwrap()),
        ] {
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (i, (&a, &w)) in got.iter().zip(want.iter()).enumerate() {
                assert!((f64::from(a) - w).abs() <= 1e-4 * scale, "{kind} {name}[{i}]: {a} vs {w}");
            }
        }
    }
}

#[test]
fn bf16_parameter_gradients_are_deterministic_too() {
    // Large enough (above the 256 K elements below which a call stays on the caller's thread)
    // for the pools to split the blocks.
    let (rows, n) = (ROW_BLOCK * 64 + 1, 130);
    assert!(rows * n >= 1 << 18);
    let cv = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
    let (x, dy, g) = (cv(normal(rows * n, 5)), cv(normal(rows * n, 6)), cv(normal(n, 7)));
    for kind in NormKind::ALL {
        let spec = NormSpec::new(kind, rows, n, DType::BF16).with_beta(false);
        let run = |threads| {
            let cpu = CpuBackend::with_pool(pool(threads));
            let f = forward(&cpu, &spec, &x, Some(&g), None).unwrap();
            backward(&cpu, &spec, (&x, &dy), (&f.mean, &f.rstd), Some(&g)).unwrap()
        };
        let one = run(1);
        for threads in [2, 3, 8] {
            assert_eq!(run(threads), one, "{kind}, {threads} threads");
        }
    }
}

#[test]
fn respects_the_callers_pool() {
    let spec = NormSpec::layer_norm(4096, 64, DType::F32).with_affine(false);
    let x = normal(4096 * 64, 8);
    let p = pool(3);
    let f = p.install(|| forward(&CpuBackend::new(), &spec, &x, None, None)).unwrap();
    let g = forward(&CpuBackend::new(), &spec, &x, None, None).unwrap();
    assert_eq!(f, g);
}

#[test]
fn with_pool_runs_its_calls_on_that_pool() {
    // The pool's only thread is held by a job of ours: a backend that runs on the pool cannot
    // finish before we let it go; one that ignored the pool would finish at once. (A correct
    // backend never fails this; a wrong one could only slip through on a machine too slow to
    // normalize 128 K elements in 300 ms.)
    let p = pool(1);
    let (release, hold) = std::sync::mpsc::channel::<()>();
    p.spawn(move || {
        let _ = hold.recv();
    });
    let cpu = CpuBackend::with_pool(p);
    let (rows, n) = (512, 512); // the 256 K elements from which calls go to the pool
    let spec = NormSpec::layer_norm(rows, n, DType::F32).with_affine(false);
    let x = normal(rows * n, 40);
    let want = forward(&CpuBackend::new(), &spec, &x, None, None).unwrap().y;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let call = {
        let done = done.clone();
        std::thread::spawn(move || {
            let y = forward(&cpu, &spec, &x, None, None).unwrap().y;
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            y
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!done.load(std::sync::atomic::Ordering::SeqCst), "finished without its pool");
    release.send(()).unwrap();
    assert_eq!(bits(&call.join().unwrap()), bits(&want));
}

#[test]
fn nd_normalizes_over_trailing_dims_like_pytorch() {
    // x: (2, 3, 4, 5), normalized_shape (4, 5): 6 rows of 20.
    let x = Array::from_shape_vec((2, 3, 4, 5), normal(120, 9)).unwrap();
    let gamma = Array2::from_shape_vec((4, 5), normal(20, 10)).unwrap().into_dyn();
    let beta = Array2::from_shape_vec((4, 5), normal(20, 11)).unwrap().into_dyn();
    let cpu = CpuBackend::new();
    let norm = Norm::layer_norm().normalized_ndim(2);
    let out = cpu.forward_nd(norm, &x).gamma(&gamma).beta(&beta).run().unwrap();
    assert_eq!(out.y.shape(), &[2, 3, 4, 5]);
    let nd_mean = out.saved.mean.as_ref().unwrap();
    assert_eq!(nd_mean.shape(), &[2, 3]);
    // Same numbers as the flat API.
    let spec = NormSpec::layer_norm(6, 20, DType::F32);
    let flat =
        forward(&cpu, &spec, x.as_slice().unwrap(), gamma.as_slice(), beta.as_slice()).unwrap();
    assert_eq!(out.y.as_slice().unwrap(), &flat.y[..]);
    assert_eq!(nd_mean.as_slice().unwrap(), &flat.mean[..]);
    assert_eq!(out.saved.rstd.as_slice().unwrap(), &flat.rstd[..]);

    let dy = Array::from_shape_vec((2, 3, 4, 5), normal(120, 12)).unwrap();
    let grads =
        cpu.backward_nd(norm, &x, &dy, out.stats()).gamma(&gamma).beta(&beta).run().unwrap();
    let xs = (x.as_slice().unwrap(), dy.as_slice().unwrap());
    let fg = backward(&cpu, &spec, xs, (&flat.mean, &flat.rstd), gamma.as_slice()).unwrap();
    assert_eq!(grads.dx.as_slice().unwrap(), &fg.dx[..]);
    let dgamma = grads.dgamma.unwrap();
    assert_eq!(dgamma.shape(), &[4, 5]);
    assert_eq!(dgamma.as_slice().unwrap(), &fg.dgamma.unwrap()[..]);
    let dbeta = fg.dbeta.unwrap();
    assert_eq!(grads.dbeta.unwrap().as_slice().unwrap(), &dbeta[..]);
    // A frozen γ: dγ skipped, dx and dβ unchanged.
    let frozen = cpu
        .backward_nd(norm, &x, &dy, out.stats())
        .gamma(&gamma)
        .beta(&beta)
        .skip_dgamma()
        .run()
        .unwrap();
    assert!(frozen.dgamma.is_none());
    assert_eq!(frozen.dx.as_slice().unwrap(), &fg.dx[..]);
    assert_eq!(frozen.dbeta.unwrap().as_slice().unwrap(), &dbeta[..]);
}

#[test]
fn nd_copies_non_contiguous_views_into_standard_layout() {
    let base = Array3::from_shape_vec((4, 6, 8), normal(192, 13)).unwrap();
    // A sliced, permuted view: rows are not contiguous in memory.
    let x = base.slice(s![.., 1..5, ..]).permuted_axes([1, 0, 2]); // (4, 4, 8)
    assert!(!x.is_standard_layout());
    let cpu = CpuBackend::new();
    let norm = Norm::layer_norm();
    let owned = x.to_owned();
    let want = cpu.forward_nd(norm, &owned).run().unwrap();
    let got = cpu.forward_nd(norm, x.view()).run().unwrap();
    assert_eq!(got, want);
    assert!(got.y.is_standard_layout() && got.y.shape() == [4, 4, 8]);

    // A transposed view (every row strided), γ and β strided too (every other element of
    // a wider array), and a transposed dy in the backward.
    let wide = Array2::from_shape_vec((8, 4), normal(32, 14)).unwrap();
    let xt = wide.t(); // (4, 8), column-major
    assert!(!xt.is_standard_layout());
    let params = Array2::from_shape_vec((2, 16), normal(32, 15)).unwrap();
    let (g, b) = (params.slice(s![0, ..;2]), params.slice(s![1, ..;2]));
    let (go, bo) = (g.to_owned(), b.to_owned());
    let xo = xt.to_owned();
    let want = cpu.forward_nd(norm, &xo).gamma(&go).beta(&bo).run().unwrap();
    let got = cpu.forward_nd(norm, xt).gamma(g).beta(b).run().unwrap();
    assert_eq!(got, want);
    let dyw = Array2::from_shape_vec((8, 4), normal(32, 16)).unwrap();
    let (dyt, dyo) = (dyw.t(), dyw.t().to_owned());
    let want_b = cpu.backward_nd(norm, &xo, &dyo, want.stats()).gamma(&go).beta(&bo).run();
    let got_b = cpu.backward_nd(norm, xt, dyt, got.stats()).gamma(g).beta(b).run();
    assert_eq!(got_b.unwrap(), want_b.unwrap());

    // Statistics passed as strided views of the caller's own arrays.
    let mut stats = Array2::<f32>::zeros((2, 8));
    stats.slice_mut(s![0, ..;2]).assign(want.saved.mean.as_ref().unwrap());
    stats.slice_mut(s![1, ..;2]).assign(&want.saved.rstd);
    let strided = Stats::new(stats.slice(s![1, ..;2])).with_mean(stats.slice(s![0, ..;2]));
    let again = cpu.backward_nd(norm, xt, dyt, strided).gamma(g).beta(b).run().unwrap();
    assert_eq!(
        again,
        cpu.backward_nd(norm, &xo, &dyo, want.stats()).gamma(&go).beta(&bo).run().unwrap()
    );
}

#[test]
fn nd_shape_errors_name_the_tensor() {
    let cpu = CpuBackend::new();
    let x = Array2::<f32>::zeros((3, 4));
    let bad_gamma = ArrayD::<f32>::zeros(IxDyn(&[5]));
    let ln = Norm::layer_norm();
    assert_eq!(
        cpu.forward_nd(ln, &x).gamma(&bad_gamma).run().unwrap_err(),
        Error::DimsMismatch { tensor: "gamma", expected: vec![4], got: vec![5] }
    );
    assert_eq!(
        cpu.forward_nd(ln.normalized_ndim(3), &x).run().unwrap_err(),
        Error::TooManyNormalizedDims { normalized_dims: 3, ndim: 2 }
    );
    assert_eq!(
        cpu.forward_nd(ln.normalized_ndim(0), &x).run().unwrap_err(),
        Error::EmptyNormalizedDim
    );
    let empty = Array2::<f32>::zeros((3, 0));
    assert_eq!(cpu.forward_nd(ln, &empty).run().unwrap_err(), Error::EmptyNormalizedDim);
    assert_eq!(cpu.forward_nd(ln.eps(f64::NAN), &x).run().unwrap_err().class(), "eps");
    let f = cpu.forward_nd(ln, &x).run().unwrap();
    let dy = Array2::<f32>::zeros((3, 5));
    assert_eq!(
        cpu.backward_nd(ln, &x, &dy, f.stats()).run().unwrap_err(),
        Error::DimsMismatch { tensor: "dy", expected: vec![3, 4], got: vec![3, 5] }
    );
}

#[test]
fn flat_api_errors_are_typed_and_never_panic() {
    let cpu = CpuBackend::new();
    let spec = NormSpec::layer_norm(2, 3, DType::F32);
    let x = [0.0f32; 6];
    let (g, b) = ([1.0f32; 3], [0.0f32; 3]);
    let (mut y, mut m, mut r) = ([0.0f32; 6], [0.0f32; 2], [0.0f32; 2]);
    let mut fwd = |spec: &NormSpec, x: &[f32], g: Option<&[f32]>| {
        cpu.forward_into(spec, x, g, Some(&b), &mut y, Some(&mut m), &mut r)
    };
    assert_eq!(
        fwd(&spec, &x[..4], Some(&g)).unwrap_err(),
        Error::ShapeMismatch { tensor: "x", expected: 6, got: 4 }
    );
    assert_eq!(
        fwd(&spec, &x, None).unwrap_err(),
        Error::ParameterMismatch { tensor: "gamma", passed: false }
    );
    assert_eq!(
        fwd(&spec.clone().with_eps(0.0), &x, Some(&g)).unwrap_err(),
        Error::InvalidEps { eps: 0.0 }
    );
    assert_eq!(
        fwd(&NormSpec::layer_norm(2, 0, DType::F32), &[], Some(&g)).unwrap_err(),
        Error::EmptyNormalizedDim
    );
    assert_eq!(
        fwd(&spec.clone().with_dtype(DType::F16), &x, Some(&g)).unwrap_err(),
        Error::DTypeMismatch { tensor: "x", expected: DType::F16, got: DType::F32 }
    );
    // Backward: mean/rstd lengths.
    let (mut dx, dy) = ([0.0f32; 6], [0.0f32; 6]);
    assert_eq!(
        cpu.backward_into(
            &spec,
            &x,
            &dy,
            Some(&[0.0; 3]),
            &[1.0; 2],
            Some(&g),
            &mut dx,
            None,
            None
        )
        .unwrap_err(),
        Error::ShapeMismatch { tensor: "mean", expected: 2, got: 3 }
    );
    assert_eq!(
        cpu.backward_into(&spec, &x, &dy, Some(&[0.0; 2]), &[1.0], Some(&g), &mut dx, None, None)
            .unwrap_err(),
        Error::ShapeMismatch { tensor: "rstd", expected: 2, got: 1 }
    );
}

#[test]
fn non_finite_inputs_poison_only_their_own_row() {
    let cpu = CpuBackend::new();
    let (rows, n) = (4, 33);
    let spec = NormSpec::layer_norm(rows, n, DType::F32);
    let mut x = normal(rows * n, 14);
    x[n + 3] = f32::NAN;
    x[3 * n] = f32::INFINITY;
    let (g, b) = (normal(n, 15), normal(n, 16));
    let f = forward(&cpu, &spec, &x, Some(&g), Some(&b)).unwrap();
    let dy = normal(rows * n, 17);
    let gr = backward(&cpu, &spec, (&x, &dy), (&f.mean, &f.rstd), Some(&g)).unwrap();
    let one = NormSpec::layer_norm(1, n, DType::F32);
    for r in 0..rows {
        let span = r * n..(r + 1) * n;
        let (y, dx) = (&f.y[span.clone()], &gr.dx[span.clone()]);
        if r == 1 || r == 3 {
            assert!(y.iter().all(|v| v.is_nan()), "row {r}: y should be NaN");
            assert!(dx.iter().all(|v| v.is_nan()), "row {r}: dx should be NaN");
        } else {
            // A clean row gets exactly what it gets normalized alone.
            let alone = forward(&cpu, &one, &x[span.clone()], Some(&g), Some(&b)).unwrap();
            assert_eq!(bits(y), bits(&alone.y), "row {r}: y");
            assert_eq!((f.mean[r], f.rstd[r]), (alone.mean[0], alone.rstd[0]), "row {r}: stats");
            let (xr, dyr) = (&x[span.clone()], &dy[span.clone()]);
            let ga = backward(&cpu, &one, (xr, dyr), (&alone.mean, &alone.rstd), Some(&g)).unwrap();
            assert_eq!(bits(dx), bits(&ga.dx), "row {r}: dx");
        }
    }
}

#[test]
fn zero_rows_give_zero_parameter_gradients() {
    let cpu = CpuBackend::new();
    let spec = NormSpec::layer_norm(0, 8, DType::F16);
    let g = vec![f16::ONE; 8];
    let f = forward::<f16>(&cpu, &spec, &[], Some(&g), Some(&g)).unwrap();
    assert!(f.y.is_empty() && f.mean.is_empty());
    let gr = backward::<f16>(&cpu, &spec, (&[], &[]), (&[], &[]), Some(&g)).unwrap();
    assert_eq!(gr.dgamma.unwrap(), vec![f16::ZERO; 8]);
    assert_eq!(gr.dbeta.unwrap(), vec![f16::ZERO; 8]);
    // Into outputs that held values: they must be written, not left as they were.
    let (mut dg, mut db) = (vec![f16::from_f32(7.0); 8], vec![f16::from_f32(7.0); 8]);
    let (dg_, db_) = (Some(&mut dg[..]), Some(&mut db[..]));
    cpu.backward_into::<f16>(&spec, &[], &[], Some(&[]), &[], Some(&g), &mut [], dg_, db_).unwrap();
    assert_eq!((dg, db), (vec![f16::ZERO; 8], vec![f16::ZERO; 8]));
    let spec = NormSpec::layer_norm(0, 300, DType::F32);
    let g = vec![1.0f32; 300];
    let (mut dg, mut db) = (vec![7.0f32; 300], vec![7.0f32; 300]);
    let (dg_, db_) = (Some(&mut dg[..]), Some(&mut db[..]));
    cpu.backward_into::<f32>(&spec, &[], &[], Some(&[]), &[], Some(&g), &mut [], dg_, db_).unwrap();
    assert_eq!((dg, db), (vec![0.0; 300], vec![0.0; 300]));
}

#[test]
fn f32_accuracy_at_the_spine_issues_hard_cases() {
    // mean 1e6, std 1 (PyTorch: 2.7e-2 in y) and std 1e30 (PyTorch: inf), measured as
    // max|got − ref| / max(1, max|ref|) against f64 math on the same f32 inputs.
    let cpu = CpuBackend::new();
    for (mean, std) in [(1e6f32, 1.0f32), (0.0, 1e30)] {
        let (rows, n) = (64, 1024);
        let x: Vec<f32> = normal(rows * n, 18).iter().map(|v| mean + std * v).collect();
        let spec = NormSpec::layer_norm(rows, n, DType::F32).with_affine(false);
        let f = forward(&cpu, &spec, &x, None, None).unwrap();
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let r = reference::forward(&spec, &x64, None, None).unwrap();
        let err = f.y.iter().zip(&r.y).fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
        let scale = r.y.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        assert!(err / scale < 1e-6, "mean {mean} std {std}: {}", err / scale);
        assert!(f.y.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn rows_are_independent_of_their_neighbours() {
    // The same row gives the same bits whether alone or among 999 others (no cross-row state),
    // forward and backward — also where a row's sweep is fused with its neighbour's (N ≥ 512).
    let cpu = CpuBackend::new();
    for (n, kind) in [300, 600, 1000].into_iter().flat_map(|n| NormKind::ALL.map(|k| (n, k))) {
        let many = normal(1000 * n, 19);
        let dy = normal(1000 * n, 20);
        let g = normal(n, 21);
        let spec = NormSpec::new(kind, 1000, n, DType::F32).with_beta(false);
        let all = forward(&cpu, &spec, &many, Some(&g), None).unwrap();
        let all_b = backward(&cpu, &spec, (&many, &dy), (&all.mean, &all.rstd), Some(&g)).unwrap();
        let one_spec = NormSpec::new(kind, 1, n, DType::F32).with_beta(false);
        for r in [0, 517, 998, 999] {
            let span = r * n..(r + 1) * n;
            let one = forward(&cpu, &one_spec, &many[span.clone()], Some(&g), None).unwrap();
            assert_eq!(bits(&one.y), bits(&all.y[span.clone()]), "y, n={n} row {r}, {kind}");
            assert_eq!(one.mean[0].to_bits(), all.mean[r].to_bits());
            assert_eq!(one.rstd[0].to_bits(), all.rstd[r].to_bits());
            let rows1 = (&many[span.clone()], &dy[span.clone()]);
            let one_b = backward(&cpu, &one_spec, rows1, (&one.mean, &one.rstd), Some(&g)).unwrap();
            assert_eq!(bits(&one_b.dx), bits(&all_b.dx[span]), "dx, n={n} row {r}, {kind}");
        }
    }
}

#[test]
fn streaming_stores_give_the_same_bits_at_every_alignment() {
    // Streaming stores split each output span where its streamed part starts and ends (a vector
    // or a 64-byte boundary, the last 64-byte boundary); the values must not depend on where
    // those fall, nor on the store kind. Short rows, pipelined rows, and a
    // problem large enough to run in parallel; y and dx at every 4-byte phase of a cache line.
    // `f32` rows from 64 (backward) and 128 (forward) take the pipelined kernels, which stage
    // short rows several together when streaming: lengths on both sides of those thresholds.
    // Consecutive rows or spans stream the line they share as one (`store::Carry`), within a
    // task: 600×520 runs in several tasks, its rows at every phase of a line.
    let cached = CpuBackend::new().with_stores(Stores::Cached);
    let streaming = CpuBackend::new().with_stores(Stores::Streaming);
    let shapes = [
        (67, 7),
        (67, 16),
        (67, 33),
        (67, 64),
        (67, 128),
        (67, 200),
        (40, 300),
        (9, 512),
        (9, 777),
        (1024, 128),
        (2100, 128),
        (600, 520),
    ];
    for (rows, n) in shapes {
        let x = normal(rows * n, 22 + n as u64);
        let (g, b) = (normal(n, 23), normal(n, 24));
        let pairs = [
            (Some(&g[..]), Some(&b[..])),
            (None, None),
            (None, Some(&b[..])),
            (Some(&g[..]), None),
        ];
        for ((gamma, beta), kind) in pairs.into_iter().flat_map(|p| NormKind::ALL.map(|k| (p, k))) {
            let spec = NormSpec::new(kind, rows, n, DType::F32)
                .with_gamma(gamma.is_some())
                .with_beta(beta.is_some());
            let has_mean = spec.has_mean();
            let (mut y0, mut m0, mut r0) =
                (vec![0f32; rows * n], vec![0f32; rows], vec![0f32; rows]);
            let m = has_mean.then_some(&mut m0[..]);
            cached.forward_into(&spec, &x, gamma, beta, &mut y0, m, &mut r0).unwrap();
            for offset in 0..16 {
                let mut y1 = vec![-7f32; rows * n + 16];
                let (mut m1, mut r1) = (vec![0f32; rows], vec![0f32; rows]);
                let out = &mut y1[offset..offset + rows * n];
                let m = has_mean.then_some(&mut m1[..]);
                streaming.forward_into(&spec, &x, gamma, beta, out, m, &mut r1).unwrap();
                assert_eq!(bits(out), bits(&y0), "n={n}, offset {offset}, {kind}");
                assert_eq!((bits(&m1), bits(&r1)), (bits(&m0), bits(&r0)));
                let outside = y1[..offset].iter().chain(&y1[offset + rows * n..]);
                assert!(outside.into_iter().all(|&v| v == -7.0), "wrote outside y");
            }
            // Backward: dx streamed at every phase, dγ/dβ unchanged.
            let dy = normal(rows * n, 25 + n as u64);
            let (want_g, want_b) = (gamma.is_some(), beta.is_some());
            let grads = |cpu: &CpuBackend, dx: &mut [f32]| {
                let (mut dg, mut db) = (vec![0f32; n], vec![0f32; n]);
                let (g_out, b_out) = (want_g.then_some(&mut dg[..]), want_b.then_some(&mut db[..]));
                let m = has_mean.then_some(&m0[..]);
                cpu.backward_into(&spec, &x, &dy, m, &r0, gamma, dx, g_out, b_out).unwrap();
                (bits(&dg), bits(&db))
            };
            let mut dx0 = vec![0f32; rows * n];
            let params0 = grads(&cached, &mut dx0);
            for offset in 0..16 {
                let mut dx1 = vec![-7f32; rows * n + 16];
                let out = &mut dx1[offset..offset + rows * n];
                assert_eq!(
                    grads(&streaming, out),
                    params0,
                    "dγ/dβ, n={n}, offset {offset}, {kind}"
                );
                assert_eq!(bits(out), bits(&dx0), "dx, n={n}, offset {offset}, {kind}");
                let outside = dx1[..offset].iter().chain(&dx1[offset + rows * n..]);
                assert!(outside.into_iter().all(|&v| v == -7.0), "wrote outside dx");
            }
        }
    }
}

#[test]
fn allocating_calls_reuse_their_outputs_memory() {
    // A loop of allocating calls (the n-d layer) must not get fresh pages for every large
    // output: dropped outputs return to the backend's cache and the next call takes them back.
    let cpu = CpuBackend::new();
    let (rows, n) = (512, 1024); // 2 MiB of y
    let norm = Norm::layer_norm();
    let x = Array2::from_shape_vec((rows, n), normal(rows * n, 26)).unwrap();
    let (g, b) = (normal(n, 27), normal(n, 28));
    // The second call of each pair has other inputs, so an output left unwritten would show;
    // a fresh backend (its own cache) says what the call must give.
    let x2 = x.mapv(|v| v * 2.0 + 1.0);
    let fresh = CpuBackend::new();
    let fwd = |cpu: &CpuBackend, x: &Array2<f32>| {
        cpu.forward_nd(norm, x).gamma(&g[..]).beta(&b[..]).run().unwrap()
    };
    let first = fwd(&cpu, &x);
    let ptr = first.y.as_ptr();
    drop(first);
    let again = fwd(&cpu, &x2);
    let want = fwd(&fresh, &x2);
    assert_eq!(again.y.as_ptr(), ptr, "y reuses the dropped output's memory");
    assert_eq!(again, want, "and is fully overwritten");
    let dy = Array2::from_shape_vec((rows, n), normal(rows * n, 29)).unwrap();
    let bwd = |cpu: &CpuBackend, x: &Array2<f32>| {
        cpu.backward_nd(norm, x, &dy, again.stats()).gamma(&g[..]).beta(&b[..]).run().unwrap()
    };
    let grads = bwd(&cpu, &x);
    let dx_ptr = grads.dx.as_ptr();
    drop(grads);
    let grads = bwd(&cpu, &x2);
    let want = bwd(&fresh, &x2);
    assert_eq!(grads.dx.as_ptr(), dx_ptr);
    assert_eq!(grads, want);

    // `into_array` keeps an output for good.
    let out = fwd(&cpu, &x);
    let nd_ptr = out.y.as_ptr();
    drop(out);
    let out = fwd(&cpu, &x);
    assert_eq!(out.y.as_ptr(), nd_ptr);
    let copy = out.y.clone().into_array();
    let kept = out.y.into_array();
    assert_eq!(kept, copy);
    assert_eq!(kept.as_ptr(), nd_ptr, "into_array keeps the same memory");
}

#[test]
fn the_n_d_layer_runs_every_variant_like_the_flat_calls() {
    // The fused residual (into h, and in place), the backward from y and with dh, through the
    // n-d layer: the same bits as the flat calls (`tests/variants.rs` holds those to the
    // reference).
    let cpu = CpuBackend::new();
    let (rows, n) = (3, 8);
    let x = Array2::from_shape_vec((rows, n), normal(rows * n, 50)).unwrap();
    let r = Array2::from_shape_vec((rows, n), normal(rows * n, 51)).unwrap();
    let dy = Array2::from_shape_vec((rows, n), normal(rows * n, 52)).unwrap();
    let dh = Array2::from_shape_vec((rows, n), normal(rows * n, 53)).unwrap();
    let g = normal(n, 54);
    for norm in [Norm::rms_norm(), Norm::layer_norm()] {
        let spec = NormSpec::new(norm.kind(), rows, n, DType::F32).with_beta(false);
        let out = cpu.forward_nd(norm, &x).gamma(&g[..]).residual(&r).run().unwrap();
        let h = out.h.as_ref().unwrap();
        let sum: Vec<f32> = x.iter().zip(&r).map(|(a, b)| a + b).collect();
        assert_eq!(h.as_slice().unwrap(), &sum[..], "{norm:?}: h");
        let f = forward(&cpu, &spec, &sum, Some(&g), None).unwrap();
        assert_eq!(out.y.as_slice().unwrap(), &f.y[..], "{norm:?}: y");
        let mut stream = r.clone();
        let inplace = cpu.forward_nd(norm, &x).gamma(&g[..]).residual_in_place(stream.view_mut());
        let inplace = inplace.run().unwrap();
        assert_eq!(stream, **h, "{norm:?}: the residual's buffer holds h");
        assert_eq!(*inplace.y, *out.y, "{norm:?}: y in place");
        // From y with dh: the flat call's bits.
        let grads = cpu.backward_nd_from_output(norm, &*out.y, &dy, out.stats());
        let grads = grads.gamma(&g[..]).dh(&dh).run().unwrap();
        let mut dx = vec![0f32; rows * n];
        let mut dg = vec![0f32; n];
        let args = layernorm_core::BackwardArgs::new(
            f32::host(&sum),
            f32::host(dy.as_slice().unwrap()),
            None,
            f32::host(&f.rstd),
            Some(f32::host(&g)),
            f32::host_mut(&mut dx),
            Some(f32::host_mut(&mut dg)),
            None,
        )
        .from_output(f32::host(&f.y), None)
        .with_dh(f32::host(dh.as_slice().unwrap()));
        cpu.backward_typed::<f32>(&spec, args).unwrap();
        assert_eq!(grads.dx.as_slice().unwrap(), &dx[..], "{norm:?}: dx from y");
        assert_eq!(grads.dgamma.unwrap().as_slice().unwrap(), &dg[..], "{norm:?}: dgamma");
        // From h with dh: the plain backward's dγ, dx plus dh.
        let grads = cpu.backward_nd(norm, &**h, &dy, out.stats()).gamma(&g[..]).dh(&dh);
        let grads = grads.run().unwrap();
        let plain =
            backward(&cpu, &spec, (&sum, dy.as_slice().unwrap()), (&f.mean, &f.rstd), Some(&g));
        let plain = plain.unwrap();
        let want: Vec<f32> = plain.dx.iter().zip(&dh).map(|(a, b)| a + b).collect();
        assert_eq!(grads.dx.as_slice().unwrap(), &want[..], "{norm:?}: dx with dh");
        assert_eq!(grads.dgamma.unwrap().as_slice().unwrap(), &plain.dgamma.unwrap()[..]);
    }
}
