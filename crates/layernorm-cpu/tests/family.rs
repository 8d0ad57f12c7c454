//! The family on the CPU: RMSNorm and LayerNorm, with and without a γ offset, through every
//! kernel path (short-row groups, pipelined long rows, column chunks, the 16-bit kernels, the
//! portable `f64` path) in every dtype, against the `f64` reference; and the extremes: rows
//! near the dtype's range, all-zero rows, ε across its whole range, constant rows, poisoned
//! inputs.

mod common;

use common::{backward, bits, check_against_reference, forward, normal, to, wide};
use layernorm_core::ndarray::Array2;
use layernorm_core::{DType, Element, Norm, NormKind, NormSpec, NormalizeNd, bf16, f16, reference};
use layernorm_cpu::{CpuBackend, CpuElement};

/// Rows of `n` that take every branch of the statistics, by row: ordinary, all zero, a large
/// mean, constant, values at a quarter of the dtype's range (squares overflow the dtype, and
/// `f32` too from `bf16` up), values of magnitude 1e30 (`f16`: 1e4), tiny values (1e-30).
fn family_rows(rows: usize, n: usize, dtype: DType, seed: u64) -> Vec<f32> {
    let u = normal(rows * n, seed);
    let quarter = (dtype.max_finite() / 4.0).min(f64::from(f32::MAX)) as f32;
    let big = if dtype == DType::F16 { 1e4 } else { 1e30 };
    (0..rows * n)
        .map(|i| match (i / n) % 8 {
            1 => 0.0,
            2 => 1e4 + u[i],
            3 => 3.25,
            4 => quarter * (u[i] / 5.0).clamp(-1.0, 1.0),
            5 => big * u[i],
            6 => 1e-30 * u[i],
            _ => 3.0 * u[i],
        })
        .collect()
}

/// Lengths that reach every path: short-row groups and the short backward (7, 40), `f32`'s
/// pipelined backward below its pipelined forward (100), the pipelined forward of `f32` and
/// the grouped 16-bit and `f64` forward (300), the pipelined 16-bit / `f64` forward with tails
/// (777).
const LENGTHS: [usize; 5] = [7, 40, 100, 300, 777];

/// [`check_against_reference`] at every length of [`LENGTHS`], with γ (around 1, or around 0
/// with a γ offset: the zero-centred γ of Gemma's RMSNorm), with γ and β, and with neither.
fn every_path<T: CpuElement>(kind: NormKind, offset: f64) {
    let cpu = CpuBackend::new();
    let rows = 19;
    for n in LENGTHS {
        let x: Vec<T> = to(&family_rows(rows, n, T::DTYPE, n as u64));
        let dy: Vec<T> = to(&normal(rows * n, 100 + n as u64));
        let centre = if offset == 0.0 { 1.0 } else { 0.0 };
        let g: Vec<T> = to(&normal(n, 7).iter().map(|v| centre + 0.5 * v).collect::<Vec<_>>());
        let b: Vec<T> = to(&normal(n, 8).iter().map(|v| 0.5 * v).collect::<Vec<_>>());
        let params = [(Some(&g[..]), None), (Some(&g[..]), Some(&b[..])), (None, None)];
        for (gamma, beta) in params {
            let spec = NormSpec::new(kind, rows, n, T::DTYPE)
                .with_gamma(gamma.is_some())
                .with_beta(beta.is_some())
                .with_gamma_offset(if gamma.is_some() { offset } else { 0.0 });
            let what = format!(
                "{kind} {} n={n} γ {} β {} offset {}",
                T::DTYPE,
                gamma.is_some(),
                beta.is_some(),
                spec.gamma_offset
            );
            check_against_reference(&cpu, &spec, (&x, &dy), (gamma, beta), &what);
        }
    }
}

#[test]
fn rms_norm_matches_the_reference_on_every_path_in_every_dtype() {
    every_path::<f32>(NormKind::RmsNorm, 0.0);
    every_path::<f64>(NormKind::RmsNorm, 0.0);
    every_path::<bf16>(NormKind::RmsNorm, 0.0);
    every_path::<f16>(NormKind::RmsNorm, 0.0);
}

#[test]
fn layer_norm_matches_the_reference_on_every_path_in_every_dtype() {
    every_path::<f32>(NormKind::LayerNorm, 0.0);
    every_path::<f64>(NormKind::LayerNorm, 0.0);
    every_path::<bf16>(NormKind::LayerNorm, 0.0);
    every_path::<f16>(NormKind::LayerNorm, 0.0);
}

#[test]
fn a_gamma_offset_scales_by_offset_plus_gamma_in_both_kinds_and_every_dtype() {
    for kind in NormKind::ALL {
        // Gemma's 1, and an offset that no 16-bit type holds (rounded to f32 as the backends
        // and the reference both take it).
        for offset in [1.0, 0.1] {
            every_path::<f32>(kind, offset);
            every_path::<f64>(kind, offset);
            every_path::<bf16>(kind, offset);
            every_path::<f16>(kind, offset);
        }
    }
}

#[test]
fn an_offset_gamma_is_the_same_as_the_sum_where_the_dtype_holds_it() {
    // f32: γ_eff = offset + γ is formed in f32, once per call; a problem without offset whose γ
    // is that sum gives the same bits everywhere — dγ included (∂/∂γ of offset + γ is 1). Every
    // path: short groups, pipelined rows, the column chunks of very long rows.
    let cpu = CpuBackend::new();
    for (rows, n) in [(33usize, 40usize), (33, 300), (9, 777), (2, 1 << 20)] {
        let x = normal(rows * n, 21);
        let dy = normal(rows * n, 22);
        let g: Vec<f32> = normal(n, 23).iter().map(|v| 0.3 * v).collect();
        let b = normal(n, 24);
        let summed: Vec<f32> = g.iter().map(|v| 1.0 + v).collect();
        for kind in NormKind::ALL {
            let plain = NormSpec::new(kind, rows, n, DType::F32);
            let offset = plain.clone().with_gamma_offset(1.0);
            let f0 = forward(&cpu, &plain, &x, Some(&summed), Some(&b)).unwrap();
            let f1 = forward(&cpu, &offset, &x, Some(&g), Some(&b)).unwrap();
            assert_eq!(f1, f0, "{kind} {rows}x{n}: forward");
            let g0 = backward(&cpu, &plain, (&x, &dy), (&f0.mean, &f0.rstd), Some(&summed));
            let g1 = backward(&cpu, &offset, (&x, &dy), (&f1.mean, &f1.rstd), Some(&g));
            assert_eq!(g1.unwrap(), g0.unwrap(), "{kind} {rows}x{n}: backward");
        }
    }
}

#[test]
fn the_n_d_layer_takes_the_offset_from_the_norm() {
    let cpu = CpuBackend::new();
    let (rows, n) = (4, 96);
    let x = Array2::from_shape_vec((rows, n), to::<bf16>(&normal(rows * n, 31))).unwrap();
    let g: Vec<bf16> = to(&normal(n, 32).iter().map(|v| 0.2 * v).collect::<Vec<_>>());
    let gemma = Norm::rms_norm().gamma_offset(1.0);
    let out = cpu.forward_nd(gemma, &x).gamma(&g[..]).run().unwrap();
    let spec = NormSpec::rms_norm(rows, n, DType::BF16).with_gamma_offset(1.0);
    let f = forward(&cpu, &spec, x.as_slice().unwrap(), Some(&g), None).unwrap();
    assert_eq!(out.y.as_slice().unwrap(), &f.y[..]);
    // Without γ there is nothing to offset: a typed error before any work.
    let err = cpu.forward_nd(gemma, &x).run().unwrap_err();
    assert_eq!(err.class(), "option");
}

#[test]
fn rms_norm_long_rows_match_the_reference_through_the_column_chunks() {
    // Rows of 2^20 take the column-chunked backward whatever the pool.
    let (rows, n) = (2, 1 << 20);
    let x: Vec<f32> = family_rows(rows, n, DType::F32, 3).iter().map(|v| v + 0.5).collect();
    let dy = normal(rows * n, 4);
    let g: Vec<f32> = normal(n, 5).iter().map(|v| 1.0 + 0.5 * v).collect();
    for kind in NormKind::ALL {
        let spec = NormSpec::new(kind, rows, n, DType::F32).with_beta(false);
        check_against_reference(&CpuBackend::new(), &spec, (&x, &dy), (Some(&g), None), "long");
    }
}

#[test]
fn rms_norm_is_exact_at_magnitudes_where_squares_overflow() {
    // |x| ~ 1e30 in f32 (x² overflows from 1.8e19; PyTorch's f32 rms_norm is off by 1.0 here)
    // and up to f32::MAX / 4: y within a few units of f32 rounding of the exact value.
    let cpu = CpuBackend::new();
    for (n, scale) in [(64usize, 1e30f32), (1000, 1e30), (777, 8e37)] {
        let x: Vec<f32> =
            normal(4 * n, 9).iter().map(|v| scale * v.clamp(-3.0, 3.0) / 3.0).collect();
        let spec = NormSpec::rms_norm(4, n, DType::F32).with_gamma(false);
        let f = forward(&cpu, &spec, &x, None, None).unwrap();
        let want = reference::forward(&spec, &wide(&x), None, None).unwrap();
        for (i, (&y, &w)) in f.y.iter().zip(&want.y).enumerate() {
            let ulp = f64::from(f32::EPSILON) * w.abs().max(1e-3);
            assert!(
                (f64::from(y) - w).abs() <= 4.0 * ulp,
                "n={n} scale {scale}: y[{i}] {y} vs {w}"
            );
        }
        for (r, w) in f.rstd.iter().zip(&want.rstd) {
            assert!((f64::from(*r) - w).abs() <= f64::from(f32::EPSILON) * w, "rstd {r} vs {w}");
        }
    }
}

#[test]
fn all_zero_rows_give_beta_and_a_finite_gradient() {
    fn zero_rows<T: CpuElement>() {
        let cpu = CpuBackend::new();
        for n in [5usize, 128, 600] {
            let x = vec![T::from_f64(0.0); 3 * n];
            let dy: Vec<T> = to(&normal(3 * n, 1));
            let g: Vec<T> = to(&normal(n, 2));
            let b: Vec<T> = to(&normal(n, 3));
            let spec = NormSpec::rms_norm(3, n, T::DTYPE).with_beta(true);
            let what = format!("{} n={n}", T::DTYPE);
            let (f, gr) =
                check_against_reference(&cpu, &spec, (&x, &dy), (Some(&g), Some(&b)), &what);
            // y = β exactly, r = 1/√ε, dx = r·γ·dy (x̂ = 0), all finite.
            for row in f.y.chunks(n) {
                assert_eq!(bits(row), bits(&b), "{what}: y");
            }
            let r = T::Acc::from_f64(1.0 / 1e-6f64.sqrt());
            assert!(f.rstd.iter().all(|&v| v == r), "{what}: rstd {:?}", f.rstd);
            assert!(gr.dx.iter().all(|&v| T::to_f64(v).is_finite()), "{what}: dx finite");
        }
    }
    zero_rows::<f32>();
    zero_rows::<f64>();
    zero_rows::<bf16>();
    zero_rows::<f16>();
}

#[test]
fn bf16_rms_norm_through_the_n_d_layer_like_layer_norm() {
    // The calls a user writes for a Llama block in bf16: the same as LayerNorm's, no mean.
    let cpu = CpuBackend::new();
    let (rows, n) = (6, 256);
    let x = Array2::from_shape_vec((rows, n), to::<bf16>(&normal(rows * n, 11))).unwrap();
    let g: Vec<bf16> = to(&normal(n, 12));
    let norm = Norm::rms_norm();
    let out = cpu.forward_nd(norm, &x).gamma(&g[..]).run().unwrap();
    assert!(out.saved.mean.is_none());
    let dy = Array2::from_shape_vec((rows, n), to::<bf16>(&normal(rows * n, 13))).unwrap();
    let grads = cpu.backward_nd(norm, &x, &dy, out.stats()).gamma(&g[..]).run().unwrap();
    assert!(grads.dbeta.is_none());
    // The same numbers as the flat calls.
    let spec = NormSpec::rms_norm(rows, n, DType::BF16);
    let xs = x.as_slice().unwrap();
    let f = forward(&cpu, &spec, xs, Some(&g), None).unwrap();
    assert_eq!(out.y.as_slice().unwrap(), &f.y[..]);
    assert_eq!(out.saved.rstd.as_slice().unwrap(), &f.rstd[..]);
    let gr = backward(&cpu, &spec, (xs, dy.as_slice().unwrap()), (&f.mean, &f.rstd), Some(&g));
    let gr = gr.unwrap();
    assert_eq!(grads.dx.as_slice().unwrap(), &gr.dx[..]);
    assert_eq!(grads.dgamma.unwrap().as_slice().unwrap(), &gr.dgamma.unwrap()[..]);
}
