//! The family against the f64 reference: RMSNorm beside LayerNorm, the γ offset, the fused
//! residual add (into h, and in place), the backward from y, and dh — for f32, f16 and bf16, over
//! the shapes that take each kernel path (several rows per workgroup, one workgroup per row, rows
//! streamed from memory, vec4/vec2 and scalar access, bf16 rows sharing words).

use crate::common;

use common::{Dist, Res, Variant, backend, check, check_variant, data, runs, tol};
use layernorm_core::{DType, NormKind, NormSpec, bf16, f16};
use layernorm_wgpu::WgpuBackend;

/// Shapes of the variant matrix: scalar rows many to a workgroup, odd N (bf16 rows share words),
/// vec4 rows cached in registers, a workgroup per row, streamed rows, and many short rows.
const SHAPES: &[(usize, usize)] = &[(5, 3), (6, 99), (9, 1000), (4, 4096), (2, 16384), (700, 16)];

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn spec(kind: NormKind, rows: usize, n: usize, dtype: DType) -> NormSpec {
    // Both kinds with γ and β, so that every variant has something to read.
    NormSpec::new(kind, rows, n, dtype)
}

/// `check_variant` in `dtype`.
fn check_in(b: &WgpuBackend, s: &NormSpec, v: Variant, x: &[f64], seed: u64) {
    match s.dtype {
        DType::F32 => check_variant::<f32>(b, s, v, x, tol(s.dtype), seed),
        DType::F16 => check_variant::<f16>(b, s, v, x, tol(s.dtype), seed),
        DType::BF16 => check_variant::<bf16>(b, s, v, x, tol(s.dtype), seed),
        other => panic!("{other} is not a wgpu dtype"),
    }
}

#[test]
fn every_variant_of_both_kinds_in_every_dtype() {
    let Some(b) = backend() else { return };
    for dtype in DTYPES {
        if !runs(b, dtype) {
            continue;
        }
        for kind in NormKind::ALL {
            for (i, &(rows, n)) in SHAPES.iter().enumerate() {
                let x = data(rows, n, Dist::Normal, i as u64);
                for v in Variant::all() {
                    check_in(b, &spec(kind, rows, n, dtype), v, &x, 40 + i as u64);
                }
            }
        }
    }
}

#[test]
fn gamma_offset_in_every_variant() {
    // A zero-centred γ (Gemma's RMSNorm, Megatron's layernorm_1p): y scales by 1 + γ.
    let Some(b) = backend() else { return };
    for dtype in DTYPES {
        if !runs(b, dtype) {
            continue;
        }
        for kind in NormKind::ALL {
            for &(rows, n) in &[(5, 3), (9, 1000), (2, 16384)] {
                let x = data(rows, n, Dist::Normal, 3);
                // γ ≈ 1 ± 0.5: offsets that no drawn γ cancels.
                for offset in [1.0, -4.0] {
                    let s = spec(kind, rows, n, dtype).with_gamma_offset(offset);
                    for v in Variant::all() {
                        check_in(b, &s, v, &x, 11);
                    }
                    let no_beta = s.clone().with_beta(false);
                    check_in(
                        b,
                        &no_beta,
                        Variant { res: Res::Add, from_y: true, dh: true },
                        &x,
                        12,
                    );
                }
            }
        }
    }
}

#[test]
fn rms_norm_over_every_path_and_affine_choice() {
    let Some(b) = backend() else { return };
    let shapes: &[(usize, usize)] =
        &[(1, 1), (7, 1), (5, 3), (24, 768), (8, 1024), (2, 65536), (10_000, 16), (0, 8)];
    for (i, &(rows, n)) in shapes.iter().enumerate() {
        let x = data(rows, n, Dist::Normal, i as u64);
        for (g, be) in [(true, false), (false, false), (true, true), (false, true)] {
            let s = NormSpec::rms_norm(rows, n, DType::F32).with_gamma(g).with_beta(be);
            check::<f32>(b, &s, &x, tol(DType::F32), 7);
            check::<bf16>(b, &s.clone().with_dtype(DType::BF16), &x, tol(DType::BF16), 7);
            if runs(b, DType::F16) {
                check::<f16>(b, &s.clone().with_dtype(DType::F16), &x, tol(DType::F16), 7);
            }
        }
    }
}

#[test]
fn rms_norm_is_exact_at_the_extremes() {
    // |x| ~ 1e30 (x² overflows f32 from 1.8e19), 5e37, 1e-33 (squares in subnormals), all-zero
    // rows (r = 1/√ε and y = β), large means, and f16 rows near its maximum (squares overflow
    // f16, never the scaled f32).
    let Some(b) = backend() else { return };
    let f16_ok = runs(b, DType::F16);
    for &(rows, n) in &[(6, 3), (8, 1000), (8, 1024), (2, 65536)] {
        for dist in [
            Dist::Scaled(1e30),
            Dist::Scaled(5e37),
            Dist::Scaled(1e-33),
            Dist::Zero,
            Dist::Offset(1e6),
            Dist::Constant,
        ] {
            let s = NormSpec::rms_norm(rows, n, DType::F32).with_beta(true);
            let x = data(rows, n, dist, 11);
            check::<f32>(b, &s, &x, tol(DType::F32), 3);
            check::<bf16>(b, &s.clone().with_dtype(DType::BF16), &x, tol(DType::BF16), 3);
        }
        let x: Vec<f64> = data(rows, n, Dist::Normal, 9).iter().map(|v| 6.0e4 * v.tanh()).collect();
        if f16_ok {
            let s = NormSpec::rms_norm(rows, n, DType::F16);
            check::<f16>(b, &s, &x, tol(DType::F16), 2);
            check::<f16>(b, &s, &data(rows, n, Dist::Zero, 1), tol(DType::F16), 2);
        }
    }
}

#[test]
fn an_all_zero_rms_row_gives_beta() {
    let Some(b) = backend() else { return };
    use layernorm_core::ndarray::Array2;
    use layernorm_core::{Norm, NormalizeNd};
    let x = Array2::<f32>::zeros((3, 10));
    let (g, be): (Vec<f32>, Vec<f32>) = ((0..10).map(|i| i as f32).collect(), vec![0.25; 10]);
    let out = b.forward_nd(Norm::rms_norm(), &x).gamma(&g[..]).beta(&be[..]).run().unwrap();
    assert!(out.y.iter().all(|&v| v == 0.25), "{:?}", out.y);
    assert!(out.saved.mean.is_none());
    // r = 1/√ε = 1000, within inverseSqrt's few ulp.
    assert!(
        out.saved.rstd.iter().all(|&r| (r - 1000.0).abs() <= 1e-6 * 1000.0),
        "{:?}",
        out.saved.rstd
    );
}

#[test]
fn the_variants_through_split_dispatches_and_the_2d_grid() {
    // Bindings capped at 64 KiB and grids at 16 workgroups per dimension: the residual, h, dh
    // and y are bound per chunk of rows like x.
    let Some(b) = common::capped() else { return };
    let (x100, x99) = (data(1000, 100, Dist::Normal, 1), data(1000, 99, Dist::Normal, 2));
    for kind in NormKind::ALL {
        for v in Variant::all() {
            check_in(b, &spec(kind, 1000, 100, DType::F32), v, &x100, 5);
            check_in(b, &spec(kind, 1000, 99, DType::BF16), v, &x99, 6);
        }
    }
}

#[test]
fn the_variants_on_the_workgroup_memory_reductions() {
    let Some(b) = common::without_subgroups() else { return };
    for &(rows, n) in &[(5, 3), (24, 768), (2, 16384)] {
        let x = data(rows, n, Dist::Offset(1e4), 3);
        for kind in NormKind::ALL {
            for v in Variant::all() {
                check_in(b, &spec(kind, rows, n, DType::F32), v, &x, 8);
            }
        }
    }
}

#[test]
fn many_rows_per_segment_with_every_variant() {
    // Each backward segment handles several rows and accumulates the fused dγ/dβ partials.
    let Some(b) = backend() else { return };
    let (x8192, x2048) = (data(301, 8192, Dist::Normal, 5), data(1100, 2048, Dist::Normal, 6));
    for kind in NormKind::ALL {
        for v in [
            Variant { res: Res::InPlace, from_y: true, dh: true },
            Variant { res: Res::Add, from_y: false, dh: true },
        ] {
            check_in(b, &spec(kind, 301, 8192, DType::F32), v, &x8192, 5);
            check_in(b, &spec(kind, 1100, 2048, DType::BF16), v, &x2048, 6);
        }
    }
}
