//! The `f32` kernels, explicit SIMD written once with `pulp` and dispatched to AVX-512,
//! AVX2+FMA, NEON or scalar code at run time: `steps` (the per-vector operations and whole-row
//! sweeps they are all built from), `forward` and `backward` (the kernels), `store` (ordinary
//! or streaming stores, staging, prefetch).
//!
//! Why not the compiler: the elementwise sweeps vectorize well from plain Rust, but LLVM's SLP
//! vectorizer turned these multi-accumulator reductions into 2-wide or scalar code (it pairs one
//! accumulator's lane with another's), which made the statistics pass five times slower than the
//! memory traffic. Here every accumulator is one SIMD register.
//!
//! Numerics match `row.rs`: per-lane sums inside blocks of `BLOCK` elements, each block's lanes
//! folded pairwise in a fixed order and added into an `f64`.

/// Calls `$f::<S, [K, …,] G, B, ST[, E]>(args)` with the three (or four) flags turned into const
/// generics.
macro_rules! specialize {
    (@go $f:ident::<$s:ident $(, $k:tt)*>($g:expr, $b:expr, $st:expr)[$($e:tt)?]($($arg:expr),*)) => {
        match ($g, $b, $st) {
            (false, false, false) => $f::<$s, $($k,)* false, false, false $(, $e)?>($($arg),*),
            (false, false, true) => $f::<$s, $($k,)* false, false, true $(, $e)?>($($arg),*),
            (false, true, false) => $f::<$s, $($k,)* false, true, false $(, $e)?>($($arg),*),
            (false, true, true) => $f::<$s, $($k,)* false, true, true $(, $e)?>($($arg),*),
            (true, false, false) => $f::<$s, $($k,)* true, false, false $(, $e)?>($($arg),*),
            (true, false, true) => $f::<$s, $($k,)* true, false, true $(, $e)?>($($arg),*),
            (true, true, false) => $f::<$s, $($k,)* true, true, false $(, $e)?>($($arg),*),
            (true, true, true) => $f::<$s, $($k,)* true, true, true $(, $e)?>($($arg),*),
        }
    };
    ($f:ident::<$s:ident $(, $k:tt)*>($g:expr, $b:expr, $st:expr)($($arg:expr),* $(,)?)) => {
        specialize!(@go $f::<$s $(, $k)*>($g, $b, $st)[]($($arg),*))
    };
    ($f:ident::<$s:ident $(, $k:tt)*>($g:expr, $b:expr, $st:expr, $e:expr)($($arg:expr),* $(,)?)) => {
        match $e {
            false => specialize!(@go $f::<$s $(, $k)*>($g, $b, $st)[false]($($arg),*)),
            true => specialize!(@go $f::<$s $(, $k)*>($g, $b, $st)[true]($($arg),*)),
        }
    };
}

/// Runs `$body` once per instruction set this machine has (the scalar fallback, AVX2, AVX-512),
/// with `$simd` bound to its token and `$name` to its name: the kernels are compiled for each,
/// and those the dispatch does not pick here must be right too.
#[cfg(feature = "unit-tests")]
macro_rules! for_each_isa {
    ($simd:ident, $name:ident => $body:block) => {{
        {
            let $simd = pulp::Scalar::new();
            let $name = "scalar";
            $body
        }
        #[cfg(target_arch = "x86_64")]
        {
            if let Some($simd) = pulp::x86::V3::try_new() {
                let $name = "avx2";
                $body
            }
            if let Some($simd) = pulp::x86::V4::try_new() {
                let $name = "avx512";
                $body
            }
        }
    }};
}

pub(crate) mod backward;
pub(crate) mod forward;
pub(crate) mod half;
mod steps;
pub(crate) mod store;

pub(crate) use backward::{
    ColumnScratch, Partials, back_blocks_recovered, back_column_chunk, back_long, back_rows,
    back_short_blocks, backward_sums, fused_backward,
};
pub(crate) use forward::{centered, fused, long, rows, shift};
pub(crate) use half::{Extra, backward_16, forward_16};
pub(crate) use steps::Recover;
pub(crate) use store::{stream_copy, stream_fence};

#[cfg(feature = "unit-tests")]
#[doc(hidden)]
pub mod tests {
    use super::*;
    use crate::driver::Out;
    use crate::row::{self, Kind, Spec};

    /// The statistics the bitwise tests run, and whether their backward is compared too:
    /// LayerNorm and RMSNorm at their default ε, and both at ε = 2^-120, small enough that the
    /// rows of tiny magnitude in [`mixed_rows`] take `row::finish`'s rescaled sweep — the
    /// forward only, for those rows' rstd (~1e30) then `row::needs_exact_row`, which the
    /// driver routes around the kernels.
    pub(crate) const SPECS: [(Spec, bool); 4] = [
        (Spec { kind: Kind::LayerNorm, eps: 1e-5 }, true),
        (Spec { kind: Kind::RmsNorm, eps: 1e-6 }, true),
        (Spec { kind: Kind::LayerNorm, eps: 7.52316384526264e-37 }, false),
        (Spec { kind: Kind::RmsNorm, eps: 7.52316384526264e-37 }, false),
    ];

    /// The reference's description of a problem the kernels compute with `spec`.
    pub(crate) fn reference_spec(
        spec: Spec,
        rows: usize,
        n: usize,
        dtype: layernorm_core::DType,
    ) -> layernorm_core::NormSpec {
        let kind = match spec.kind {
            Kind::LayerNorm | Kind::LayerNormFromY => layernorm_core::NormKind::LayerNorm,
            Kind::RmsNorm => layernorm_core::NormKind::RmsNorm,
        };
        layernorm_core::NormSpec::new(kind, rows, n, dtype).with_eps(spec.eps)
    }

    /// `got` within `tol · (1 + |want|)` of `want` everywhere (NaN where `want` is NaN).
    pub(super) fn close(what: &str, got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let ok = if w.is_nan() {
                g.is_nan()
            } else {
                (f64::from(g) - w).abs() <= tol * (1.0 + w.abs())
            };
            assert!(ok, "{what}[{i}]: got {g}, want {w}");
        }
    }

    /// Rows that exercise `row::finish`'s rare paths, mixed among ordinary ones: constant rows (one
    /// of 0, one at −944328.625 whose shift is off the value), a huge mean, squares that overflow,
    /// squares below `f32`'s range, an outlying head, a NaN; and plain pseudo-random rows.
    pub(crate) fn mixed_rows(rows: usize, n: usize) -> Vec<f32> {
        let mut s = 0x2545_f491u32;
        let mut x = Vec::with_capacity(rows * n);
        for r in 0..rows {
            for j in 0..n {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let u = s as f32 / u32::MAX as f32 - 0.5;
                x.push(match r % 9 {
                    0 => 3.25,
                    1 => 1e6 + u,
                    2 => 1e37 * u,
                    3 if j < 32 => 50.0 + u,
                    4 if j == n / 2 => f32::NAN,
                    5 => 0.0,
                    6 => 1e-30 * u,
                    7 => -944_328.6, // −944328.625 exactly
                    _ => u * 3.0,
                });
            }
        }
        x
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// A forward's (y, mean, rstd) bit for bit against another's.
    fn same_forward(what: &str, got: [&[f32]; 3], want: [&[f32]; 3]) {
        assert_eq!(bits(got[0]), bits(want[0]), "y, {what}");
        assert_eq!((bits(got[1]), bits(got[2])), (bits(want[1]), bits(want[2])), "stats, {what}");
    }

    /// The bitwise tests' inputs for `nrows` rows of `n`: x ([`mixed_rows`]), dy, γ and β.
    fn bitwise_inputs(nrows: usize, n: usize) -> [Vec<f32>; 4] {
        let x = mixed_rows(nrows, n);
        let dy = mixed_rows(nrows, n).iter().map(|v| v.sin()).collect::<Vec<_>>();
        let g: Vec<f32> = (0..n).map(|j| 0.5 + j as f32 / n as f32).collect();
        let b: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 1.0).collect();
        [x, dy, g, b]
    }

    /// `row::rows_portable` of `x`: (y, mean, rstd).
    fn portable_forward(
        n: usize,
        spec: Spec,
        x: &[f32],
        (gamma, beta): (Option<&[f32]>, Option<&[f32]>),
    ) -> [Vec<f32>; 3] {
        let nrows = x.len() / n;
        let (mut y, mut m, mut r) = (vec![0f32; nrows * n], vec![0f32; nrows], vec![0f32; nrows]);
        row::rows_portable(n, spec, x, gamma, beta, &mut y, &mut m, &mut r);
        [y, m, r]
    }

    pub fn short_row_kernels_match_the_portable_composition_bit_for_bit() {
        let nrows = 45; // two full groups of 16 and a ragged one
        for n in [1usize, 5, 16, 17, 40, 100, 128, 255, 256, 300, 511] {
            let [x, dy, g, b] = bitwise_inputs(nrows, n);
            let params = [(Some(&g[..]), Some(&b[..])), (None, None), (Some(&g[..]), None)];
            for ((gamma, beta), (spec, backward)) in
                params.into_iter().flat_map(|p| SPECS.map(|s| (p, s)))
            {
                let kind = spec.kind;
                let [y0, m0, r0] = portable_forward(n, spec, &x, (gamma, beta));
                let (mut y1, mut m1, mut r1) =
                    (vec![0f32; nrows * n], vec![0f32; nrows], vec![0f32; nrows]);
                for out in [Out::Cached, Out::Prefetched, Out::Streamed] {
                    rows(n, spec, &x, gamma, beta, &mut y1, &mut m1, &mut r1, out);
                    stream_fence();
                    same_forward(
                        &format!("n={n}, {out:?}, {spec:?}"),
                        [&y1, &m1, &r1],
                        [&y0, &m0, &r0],
                    );
                }
                if !backward {
                    continue;
                }
                // Backward from finite statistics (the NaN row's are NaN, which is fine too).
                let (mut dx0, mut dg0, mut db0) =
                    (vec![0f32; nrows * n], vec![0f32; n], vec![0f32; n]);
                let (dx1, dg1, db1) = (dx0.clone(), dg0.clone(), db0.clone());
                row::back_rows_portable(
                    kind,
                    n,
                    &x,
                    &dy,
                    &m0,
                    &r0,
                    gamma,
                    &mut dx0,
                    Some(&mut dg0),
                    Some(&mut db0),
                );
                for stream in [false, true] {
                    let (mut dx1, mut dg1, mut db1) = (dx1.clone(), dg1.clone(), db1.clone());
                    let (dg, db) = (Some(&mut dg1[..]), Some(&mut db1[..]));
                    back_rows(kind, n, &x, &dy, &m0, &r0, gamma, &mut dx1, dg, db, stream);
                    stream_fence();
                    assert_eq!(bits(&dx1), bits(&dx0), "dx, n={n}, stream={stream}, {kind:?}");
                    let (g1, b1, g0, b0) = (bits(&dg1), bits(&db1), bits(&dg0), bits(&db0));
                    assert_eq!((g1, b1), (g0, b0), "dγ/dβ, n={n}, {kind:?}");
                }
            }
        }
    }

    pub fn long_row_kernels_match_the_same_composition_at_short_lengths() {
        // `f32` rows take the long-row kernels from `row::F32_LONG_MIN_N` (forward, ordinary
        // stores) and `row::F32_BACK_LONG_MIN_N` (backward), below the generic thresholds: at
        // every length either kernel may serve, they give the short-row kernels' bits.
        let nrows = 45; // a ragged last block of 32 rows
        for n in [2usize, 17, 40, 64, 100, 128, 129, 200, 255, 256, 300, 511] {
            let [x, dy, g, b] = bitwise_inputs(nrows, n);
            let params = [(Some(&g[..]), Some(&b[..])), (None, None), (Some(&g[..]), None)];
            for ((gamma, beta), (spec, backward)) in
                params.into_iter().flat_map(|p| SPECS.map(|s| (p, s)))
            {
                let kind = spec.kind;
                let [y0, m0, r0] = portable_forward(n, spec, &x, (gamma, beta));
                for out in [Out::Cached, Out::Prefetched, Out::Streamed] {
                    let (mut y1, mut m1, mut r1) =
                        (vec![0f32; nrows * n], vec![0f32; nrows], vec![0f32; nrows]);
                    long(n, spec, &x, gamma, beta, &mut y1, &mut m1, &mut r1, out);
                    stream_fence();
                    same_forward(
                        &format!("n={n}, {out:?}, {spec:?}"),
                        [&y1, &m1, &r1],
                        [&y0, &m0, &r0],
                    );
                }
                if !backward {
                    continue;
                }
                // The backward: dx whole, dγ/dβ block by block (the long kernel adds each 32-row
                // block's terms into that block's partials).
                let block = crate::driver::ROW_BLOCK;
                let blocks = nrows.div_ceil(block);
                let mut dx0 = vec![0f32; nrows * n];
                let mut parts0 = vec![0f32; blocks * 2 * n];
                for k in 0..blocks {
                    let r = k * block..((k + 1) * block).min(nrows);
                    let e = r.start * n..r.end * n;
                    let (dg, db) = parts0[2 * n * k..2 * n * (k + 1)].split_at_mut(n);
                    let (xk, dyk, m, s) = (&x[e.clone()], &dy[e.clone()], &m0[r.clone()], &r0[r]);
                    let dxk = &mut dx0[e];
                    row::back_rows_portable(kind, n, xk, dyk, m, s, gamma, dxk, Some(dg), Some(db));
                }
                for stream in [false, true] {
                    let mut dx1 = vec![0f32; nrows * n];
                    let mut parts1 = vec![0f32; blocks * 2 * n];
                    let partials = Partials { buf: Some(&mut parts1), want: (true, true) };
                    let (rows, epi) = ((&x[..], &dy[..], &m0[..], &r0[..]), Default::default());
                    back_long(kind, n, rows, gamma, &mut dx1, partials, stream, epi);
                    stream_fence();
                    assert_eq!(bits(&dx1), bits(&dx0), "dx, n={n}, stream={stream}, {kind:?}");
                    assert_eq!(bits(&parts1), bits(&parts0), "dγ/dβ partials, n={n}, {kind:?}");
                }
            }
        }
    }

    pub fn sums_are_exact_on_small_integers_whatever_the_length() {
        // Values below 100: a lane's share of a 256-element block squared-sums below 2^24 on
        // any vector width (even one lane), so the f32 partials are exact and so is the result.
        for n in [0usize, 1, 7, 16, 17, 255, 256, 257, 1000, 5000] {
            let x: Vec<f32> = (0..n).map(|i| (i % 100) as f32).collect();
            let want: f64 = x.iter().map(|&v| f64::from(v)).sum();
            let want2: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
            assert_eq!(centered(&x, 0.0, 1.0, 0.0), [want, want2], "n={n}");
            let ones = vec![1.0f32; n];
            let [sd, sg, sgd] = backward_sums(&x, &ones, Some(&ones), 0.0, 1.0);
            assert_eq!([sd, sg, sgd], [want, n as f64, want], "n={n}");
        }
    }
}
