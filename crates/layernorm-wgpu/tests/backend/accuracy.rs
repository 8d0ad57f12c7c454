//! Forward and backward against the f64 reference, for f32, f16 and bf16, over the shapes and
//! distributions that stress each kernel path (several rows per workgroup, one workgroup per row,
//! rows streamed from memory, vec4 and scalar access) and the numerics (|mean| ≫ std, |x| ~ 1e30,
//! constant rows, tiny eps).

use crate::common;

use common::{
    BF16, Dist, F16, F32, Res, Variant, array, backend, check, check_variant, data, round, runs,
    widen_array,
};
use layernorm_core::{DType, Norm, NormSpec, NormalizeNd, bf16, f16};
use layernorm_wgpu::WgpuBackend;

/// Shapes every dtype runs: 1×1, N = 1, N = 3, N not a multiple of 4, the transformer sizes,
/// N = 65536 (streamed), many rows of a small N, and no rows at all.
const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (7, 1),
    (5, 3),
    (9, 1000),
    (24, 768),
    (8, 1024),
    (4, 4096),
    (2, 65536),
    (10_000, 16),
    (0, 8),
];

fn spec(rows: usize, n: usize, dtype: DType) -> NormSpec {
    NormSpec::layer_norm(rows, n, dtype)
}

#[test]
fn f32_shapes() {
    let Some(b) = backend() else { return };
    for (i, &(rows, n)) in SHAPES.iter().enumerate() {
        check::<f32>(b, &spec(rows, n, DType::F32), &data(rows, n, Dist::Normal, i as u64), F32, 7);
    }
}

#[test]
fn f16_shapes() {
    let Some(b) = backend() else { return };
    // Without SHADER_F16, f16 must be refused by name, not computed wrongly.
    if !runs(b, DType::F16) {
        assert!(!b.has_f16());
        return;
    }
    for (i, &(rows, n)) in SHAPES.iter().enumerate() {
        check::<f16>(b, &spec(rows, n, DType::F16), &data(rows, n, Dist::Normal, i as u64), F16, 7);
    }
}

#[test]
fn bf16_shapes() {
    let Some(b) = backend() else { return };
    for (i, &(rows, n)) in SHAPES.iter().enumerate() {
        let s = spec(rows, n, DType::BF16);
        check::<bf16>(b, &s, &data(rows, n, Dist::Normal, i as u64), BF16, 7);
    }
}

#[test]
fn f32_large_mean_huge_values_constant_rows() {
    let Some(b) = backend() else { return };
    for &(rows, n) in &[(6, 3), (8, 1000), (8, 1024), (2, 65536)] {
        // 5e37: the plain row sum overflows f32; 1e-33: it would sum in subnormals. Both take
        // the forward's scaled second pass for the first mean estimate.
        for dist in [
            Dist::Offset(1e4),
            Dist::Offset(1e6),
            Dist::Scaled(1e30),
            Dist::Scaled(5e37),
            Dist::Scaled(1e-33),
            Dist::Constant,
        ] {
            check::<f32>(b, &spec(rows, n, DType::F32), &data(rows, n, dist, 11), F32, 3);
        }
    }
}

#[test]
fn sixteen_bit_offsets_and_extremes() {
    let Some(b) = backend() else { return };
    let f16_ok = runs(b, DType::F16);
    for &(rows, n) in &[(6, 3), (8, 1000), (8, 1024)] {
        for dist in [Dist::Offset(1e4), Dist::Constant, Dist::Scaled(1e-2)] {
            if f16_ok {
                check::<f16>(b, &spec(rows, n, DType::F16), &data(rows, n, dist, 5), F16, 1);
            }
            check::<bf16>(b, &spec(rows, n, DType::BF16), &data(rows, n, dist, 5), BF16, 1);
        }
        // Near the f16 maximum (65504): squares would overflow f16, never f32 after scaling.
        let x: Vec<f64> = data(rows, n, Dist::Normal, 9).iter().map(|v| 6.0e4 * v.tanh()).collect();
        if f16_ok {
            check::<f16>(b, &spec(rows, n, DType::F16), &x, F16, 2);
        }
        check::<bf16>(
            b,
            &spec(rows, n, DType::BF16).with_eps(1e-12),
            &data(rows, n, Dist::Scaled(1e30), 4),
            BF16,
            2,
        );
    }
}

#[test]
fn the_default_backend_takes_the_subgroup_path_where_the_device_has_subgroups() {
    // Decided by the device's features, not its name: lavapipe (Vulkan) has SUBGROUP, Mesa's GL
    // llvmpipe adapter does not. Where the feature exists the default backend must use it, or
    // the subgroup shaders would go untested while every test passed on the fallback; where it
    // does not, it must not claim to.
    let Some(b) = backend() else { return };
    let has = b.device().features().contains(wgpu::Features::SUBGROUP);
    let name = layernorm_core::Backend::device(b).name;
    assert_eq!(b.uses_subgroups(), has, "{name}: SUBGROUP {has}, used {}", b.uses_subgroups());
    // Off on request, and never on without the feature.
    let off = common::without_subgroups().expect("a device");
    assert!(!off.uses_subgroups());
    let on = layernorm_wgpu::WgpuBackend::new().unwrap().with_subgroups(false).with_subgroups(true);
    assert_eq!(on.uses_subgroups(), has);
    if !has {
        eprintln!("{name}: no SUBGROUP feature, the workgroup-memory reductions run");
        return;
    }
    // And they do run: the shaders check the subgroup layout at run time and fall back to
    // workgroup memory where it is not the linear one, which would give the same bits as the
    // fallback backend. The two orders of addition differ in the last bits on some of these
    // rows (segments of 32 threads: subgroup butterflies, then subgroups in order, against
    // runs of 16 slots).
    let x = array(64, 1024, common::round::<f32>(&data(64, 1024, Dist::Normal, 1)));
    let y_sg = b.forward_nd(Norm::layer_norm(), &x).run().unwrap().y;
    let y_wg = off.forward_nd(Norm::layer_norm(), &x).run().unwrap().y;
    assert!(y_sg.iter().zip(y_wg.iter()).any(|(a, w)| a != w), "{name}: subgroups fell back");
}

#[test]
fn workgroup_memory_reductions() {
    // The default backend uses subgroup reductions where the device has them (lavapipe does);
    // this one takes the workgroup-memory path every device has.
    let Some(b) = common::without_subgroups() else { return };
    assert!(!b.uses_subgroups());
    for (i, &(rows, n)) in [(5, 3), (24, 768), (4, 4096), (2, 65536), (3000, 16)].iter().enumerate()
    {
        check::<f32>(
            b,
            &spec(rows, n, DType::F32),
            &data(rows, n, Dist::Offset(1e4), i as u64),
            F32,
            8,
        );
        check::<bf16>(
            b,
            &spec(rows, n, DType::BF16),
            &data(rows, n, Dist::Normal, i as u64),
            BF16,
            8,
        );
    }
}

#[test]
fn streamed_rows_through_the_32_item_driver() {
    // At llvmpipe's own loop limit only 16-bit rows of odd N above 66 056 192 elements take the
    // 32-item streamed driver; with the limit lowered to 0 every streamed row does. The same
    // bits as the 16-item driver, forward and backward, and the reference's answer.
    let Some(b) = backend() else { return };
    let wide = WgpuBackend::new().expect("a second device").with_loop_limit(0);
    let (rows, n) = (3, 20_001);
    let spec = NormSpec::layer_norm(rows, n, DType::BF16);
    let x = array(rows, n, round::<bf16>(&data(rows, n, Dist::Normal, 21)));
    let dy = array(rows, n, round::<bf16>(&data(rows, n, Dist::Normal, 22)));
    let g = round::<bf16>(&data(1, n, Dist::Scaled(0.5), 23));
    let be = round::<bf16>(&data(1, n, Dist::Normal, 24));
    let run = |b: &WgpuBackend| {
        let f = common::forward(b, &spec, &x, Some(&g), Some(&be)).unwrap();
        let mean: Vec<f32> = f.saved.mean.as_ref().expect("mean").iter().copied().collect();
        let rstd: Vec<f32> = f.saved.rstd.iter().copied().collect();
        let gr = common::backward::<bf16>(
            b,
            &spec,
            x.view(),
            false,
            &dy,
            Some(&mean),
            &rstd,
            Some(&g),
            Some(&be),
            None,
        )
        .unwrap();
        (widen_array(&f.y), mean, rstd, gr.dx, gr.dgamma, gr.dbeta)
    };
    let (narrow, wide_run) = (run(b), run(&wide));
    let bits = |v: &[f64]| v.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&narrow.0), bits(&wide_run.0), "y");
    assert_eq!((narrow.1, narrow.2), (wide_run.1, wide_run.2), "statistics");
    assert_eq!(bits(&narrow.3), bits(&wide_run.3), "dx");
    assert_eq!((narrow.4, narrow.5), (wide_run.4, wide_run.5), "dgamma, dbeta");
    // Against the reference: RMSNorm, a residual in place, the backward from y with dh.
    let v = Variant { res: Res::InPlace, from_y: true, dh: true };
    let x = data(rows, n, Dist::Offset(3.0), 25);
    check_variant::<bf16>(&wide, &NormSpec::rms_norm(rows, n, DType::BF16), v, &x, BF16, 26);
}

#[test]
fn many_rows_per_segment_in_the_backward() {
    // Enough rows that each segment of the backward handles several rows and accumulates the
    // dγ/dβ partials over them (the last segment gets fewer rows than the others).
    let Some(b) = backend() else { return };
    check::<f32>(b, &spec(301, 8192, DType::F32), &data(301, 8192, Dist::Normal, 5), F32, 5);
    check::<bf16>(b, &spec(1100, 2048, DType::BF16), &data(1100, 2048, Dist::Normal, 6), BF16, 6);
}

#[test]
fn affine_and_eps_variants() {
    let Some(b) = backend() else { return };
    for &(rows, n) in &[(5, 3), (9, 1000), (8, 1024)] {
        let x = data(rows, n, Dist::Normal, 21);
        for (g, be) in [(false, false), (true, false), (false, true), (true, true)] {
            for eps in [1e-5, 1e-12] {
                let s = spec(rows, n, DType::F32).with_gamma(g).with_beta(be).with_eps(eps);
                check::<f32>(b, &s, &x, F32, 13);
                check::<bf16>(b, &s.clone().with_dtype(DType::BF16), &x, BF16, 13);
            }
        }
    }
}

#[test]
fn split_into_several_dispatches_and_a_2d_grid() {
    // A backend whose bindings are capped at 64 KiB and whose grids at 16 workgroups per
    // dimension: the same problems now run as several row chunks on 2-D grids.
    let Some(b) = common::capped() else { return };
    check::<f32>(b, &spec(1000, 100, DType::F32), &data(1000, 100, Dist::Normal, 1), F32, 1);
    check::<f32>(b, &spec(700, 3, DType::F32), &data(700, 3, Dist::Normal, 1), F32, 1);
    check::<bf16>(b, &spec(1000, 99, DType::BF16), &data(1000, 99, Dist::Normal, 2), BF16, 2);
    if runs(b, DType::F16) {
        check::<f16>(b, &spec(600, 63, DType::F16), &data(600, 63, Dist::Normal, 3), F16, 3);
    }
    // A row that alone exceeds the binding cap is a typed error, not a wgpu validation panic.
    let x = array(2, 20_000, vec![0.0f32; 40_000]);
    let (g, be) = (vec![1.0f32; 20_000], vec![0.0f32; 20_000]);
    let err = b.forward_nd(Norm::layer_norm(), &x).gamma(&g[..]).beta(&be[..]).run();
    assert_eq!(err.unwrap_err().class(), "too-large");
}
