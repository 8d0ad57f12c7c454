//! Random problems against the f64 reference: shapes, offsets, scales, eps and affine flags drawn
//! by proptest, forward and backward (y, mean, rstd, dx, dγ, dβ), held to the `f32` tolerances
//! of the conformance suite (error relative to the size of the terms that form each output; a
//! NaN where the reference is finite fails).

use layernorm_core::{DType, NormSpec, reference};
use layernorm_cpu::CpuBackend;
use proptest::prelude::*;

fn row_err(got: &[f32], want: &[f64], scale: f64) -> f64 {
    got.iter().zip(want).fold(0.0f64, |m, (&g, &w)| m.max(err(g, w, scale)))
}

/// |got − want| / scale, infinite where `got` is not finite (every reference value here is).
fn err(got: f32, want: f64, scale: f64) -> f64 {
    let d = (f64::from(got) - want).abs() / scale;
    if d.is_nan() || !got.is_finite() { f64::INFINITY } else { d }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn f32_matches_the_reference(
        rows in 0usize..24,
        n in 1usize..300,
        offset_exp in -3i32..7,
        scale_exp in -20i32..30,
        eps_exp in -12i32..-2,
        gamma_on: bool,
        beta_on: bool,
        seed: u64,
    ) {
        let mut s = seed | 1;
        let mut next = move || {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        };
        let (offset, scale) = (10f64.powi(offset_exp), 10f64.powi(scale_exp));
        let x: Vec<f32> = (0..rows * n).map(|_| (offset * scale + scale * next()) as f32).collect();
        let dy: Vec<f32> = (0..rows * n).map(|_| next() as f32).collect();
        let gamma: Vec<f32> = (0..n).map(|_| (1.0 + 0.5 * next()) as f32).collect();
        let beta: Vec<f32> = (0..n).map(|_| (0.5 * next()) as f32).collect();
        let spec = NormSpec::layer_norm(rows, n, DType::F32)
            .with_eps(10f64.powi(eps_exp))
            .with_gamma(gamma_on)
            .with_beta(beta_on);
        let (g, b) = (gamma_on.then_some(&gamma[..]), beta_on.then_some(&beta[..]));
        let cpu = CpuBackend::new();
        let (mut y, mut mean, mut rstd) = (vec![0f32; rows * n], vec![0f32; rows], vec![0f32; rows]);
        cpu.forward_into(&spec, &x, g, b, &mut y, Some(&mut mean), &mut rstd).unwrap();
        let wide = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<_>>();
        let (x64, dy64) = (wide(&x), wide(&dy));
        let (g64, b64) = (g.map(wide), b.map(wide));
        let r = reference::forward(&spec, &x64, g64.as_deref(), b64.as_deref()).unwrap();
        let (mut dx, mut dgamma, mut dbeta) = (vec![0f32; rows * n], vec![0f32; n], vec![0f32; n]);
        let (dgo, dbo) = (gamma_on.then_some(&mut dgamma[..]), beta_on.then_some(&mut dbeta[..]));
        cpu.backward_into(&spec, &x, &dy, Some(&mean), &rstd, g, &mut dx, dgo, dbo).unwrap();
        let r_mean = r.mean.as_deref().unwrap_or_default();
        let rb = reference::backward(&spec, &x64, &dy64, r.mean.as_deref(), &r.rstd, g64.as_deref()).unwrap();
        let (mut sum_dgx, mut sum_dy) = (vec![0f64; n], vec![0f64; n]);
        for row in 0..rows {
            let span = row * n..(row + 1) * n;
            let std = 1.0 / r.rstd[row];
            let e = err(mean[row], r_mean[row], r_mean[row].abs().max(std));
            prop_assert!(e <= 1e-6, "row {row}: mean error {e:e}");
            let e = err(rstd[row], r.rstd[row], r.rstd[row]);
            prop_assert!(e <= 1e-6, "row {row}: rstd error {e:e}");
            let xhat: Vec<f64> = x64[span.clone()].iter().map(|&v| (v - r_mean[row]) * r.rstd[row]).collect();
            let gj = |j: usize| g64.as_ref().map_or(1.0, |g| g[j]);
            let bj = |j: usize| b64.as_ref().map_or(0.0, |b| b[j]);
            let y_scale = (0..n).map(|j| (xhat[j] * gj(j)).abs() + bj(j).abs()).fold(0.0, f64::max);
            if y_scale > 0.0 {
                let e = row_err(&y[span.clone()], &r.y[span.clone()], y_scale);
                prop_assert!(e <= 1e-6, "row {row}: y error {e:e}");
            }
            for j in 0..n {
                sum_dgx[j] += dy64[row * n + j].abs() * (xhat[j].abs() + 1.0);
                sum_dy[j] += dy64[row * n + j].abs();
            }
            let gs: Vec<f64> = (0..n).map(|j| dy64[row * n + j] * gj(j)).collect();
            let c1 = gs.iter().zip(&xhat).map(|(g, h)| g * h).sum::<f64>() / n as f64;
            let c2 = gs.iter().sum::<f64>() / n as f64;
            let dx_scale = r.rstd[row]
                * (0..n).map(|j| gs[j].abs() + c2.abs() + (xhat[j] * c1).abs()).fold(0.0, f64::max);
            if dx_scale > 0.0 && dx_scale.is_finite() {
                let e = row_err(&dx[span.clone()], &rb.dx[span], dx_scale);
                prop_assert!(e <= 1e-6, "row {row}: dx error {e:e}");
            }
        }
        // dγ_j against Σ_rows |dy|·(|x̂| + 1), dβ_j against Σ_rows |dy| (a zero scale demands
        // zero), as the conformance suite measures them (docs/conformance.md).
        let (dg, db) = (gamma_on.then_some(&dgamma[..]), beta_on.then_some(&dbeta[..]));
        for (name, got, want, scale) in
            [("dgamma", dg, rb.dgamma.as_deref(), &sum_dgx), ("dbeta", db, rb.dbeta.as_deref(), &sum_dy)]
        {
            let (Some(got), Some(want)) = (got, want) else {
                prop_assert!(got.is_none() && want.is_none(), "{name}: present in one only");
                continue;
            };
            for j in 0..n {
                let e = if scale[j] == 0.0 {
                    if got[j] == 0.0 { 0.0 } else { f64::INFINITY }
                } else {
                    err(got[j], want[j], scale[j])
                };
                prop_assert!(e <= 1e-5, "{name}[{j}] error {e:e}: {} vs {}", got[j], want[j]);
            }
        }
    }
}
