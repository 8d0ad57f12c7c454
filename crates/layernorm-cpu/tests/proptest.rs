//! Random problems against the f64 reference: kinds, shapes, offsets, scales, ε, affine flags
//! and γ offsets drawn by proptest, forward and backward (y, mean, rstd, dx, dγ, dβ), held to
//! the tolerances of the conformance suite (error relative to the size of the terms that form
//! each output; a NaN where the reference is finite fails): `common::check_against_reference`.

mod common;

use common::check_against_reference;
use layernorm_core::{NormKind, NormSpec, bf16};
use layernorm_cpu::{CpuBackend, CpuElement};
use proptest::prelude::*;

/// One drawn problem in `T`: rows around `10^offset_exp · 10^scale_exp` with spread
/// `10^scale_exp`, dy and β in [−1, 1] and [−0.5, 0.5], γ around 1 (around 0 with an offset).
#[allow(clippy::too_many_arguments)]
fn run<T: CpuElement>(
    kind: NormKind,
    (rows, n): (usize, usize),
    (offset_exp, scale_exp, eps_exp): (i32, i32, i32),
    (gamma_on, beta_on): (bool, bool),
    gamma_offset: f64,
    seed: u64,
) {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    };
    let (offset, scale) = (10f64.powi(offset_exp), 10f64.powi(scale_exp));
    let x: Vec<T> = (0..rows * n).map(|_| T::from_f64(offset * scale + scale * next())).collect();
    let dy: Vec<T> = (0..rows * n).map(|_| T::from_f64(next())).collect();
    let centre = if gamma_offset == 0.0 { 1.0 } else { 0.0 };
    let gamma: Vec<T> = (0..n).map(|_| T::from_f64(centre + 0.5 * next())).collect();
    let beta: Vec<T> = (0..n).map(|_| T::from_f64(0.5 * next())).collect();
    let spec = NormSpec::new(kind, rows, n, T::DTYPE)
        .with_eps(10f64.powi(eps_exp))
        .with_gamma(gamma_on)
        .with_beta(beta_on)
        .with_gamma_offset(if gamma_on { gamma_offset } else { 0.0 });
    let (g, b) = (gamma_on.then_some(&gamma[..]), beta_on.then_some(&beta[..]));
    check_against_reference(&CpuBackend::new(), &spec, (&x, &dy), (g, b), &format!("{spec:?}"));
}

fn kind() -> impl Strategy<Value = NormKind> {
    prop_oneof![Just(NormKind::LayerNorm), Just(NormKind::RmsNorm)]
}

fn gamma_offset() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), Just(1.0), -2.0..2.0f64]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn f32_matches_the_reference(
        kind in kind(),
        rows in 0usize..24,
        n in 1usize..300,
        offset_exp in -3i32..7,
        scale_exp in -20i32..30,
        eps_exp in -12i32..-2,
        gamma_on: bool,
        beta_on: bool,
        gamma_offset in gamma_offset(),
        seed: u64,
    ) {
        let exps = (offset_exp, scale_exp, eps_exp);
        run::<f32>(kind, (rows, n), exps, (gamma_on, beta_on), gamma_offset, seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn bf16_and_f64_match_the_reference(
        kind in kind(),
        rows in 0usize..12,
        n in 1usize..700,
        offset_exp in -3i32..4,
        scale_exp in -20i32..30,
        eps_exp in -12i32..-2,
        gamma_on: bool,
        beta_on: bool,
        gamma_offset in gamma_offset(),
        seed: u64,
    ) {
        let exps = (offset_exp, scale_exp, eps_exp);
        run::<bf16>(kind, (rows, n), exps, (gamma_on, beta_on), gamma_offset, seed);
        run::<f64>(kind, (rows, n), exps, (gamma_on, beta_on), gamma_offset, seed);
    }
}
