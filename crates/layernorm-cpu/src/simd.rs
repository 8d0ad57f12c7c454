//! The one SIMD dispatch point: the per-task loops, compiled once per instruction set.
//!
//! The row kernels (`row.rs`) are generic, `#[inline(always)]` code over fixed-width lane arrays.
//! Here they are inlined into task functions that `multiversion` compiles for AVX-512, AVX2+FMA,
//! NEON and a baseline, choosing one at run time from the CPU's features (detected once and
//! cached). Nothing else in the crate mentions an instruction set.

use multiversion::multiversion;
use num_traits::Zero;

use crate::element::{CpuElement, load};
use crate::row;

/// Forward over consecutive rows: `x`/`y` hold `mean.len()` rows of `n`.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma+f16c",
    "x86_64+avx2+fma+f16c",
    "aarch64+neon"
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_rows<T: CpuElement>(
    n: usize,
    eps: f64,
    x: &[T],
    gamma: Option<&[T::Acc]>,
    beta: Option<&[T::Acc]>,
    y: &mut [T],
    mean: &mut [T::Acc],
    rstd: &mut [T::Acc],
) {
    if let (Some(xa), Some(ya)) = (T::as_acc(x), T::as_acc_mut(y)) {
        row::forward_rows(n, xa, gamma, beta, ya, mean, rstd, eps);
        return;
    }
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for (((xr, yr), m), s) in
        x.chunks_exact(n).zip(y.chunks_exact_mut(n)).zip(mean.iter_mut()).zip(rstd.iter_mut())
    {
        let xa = load(xr, &mut xs);
        let (mu, rs) = match T::as_acc_mut(yr) {
            Some(ya) => row::forward(xa, gamma, beta, ya, eps),
            None => {
                ys.resize(n, T::Acc::zero());
                let out = row::forward(xa, gamma, beta, &mut ys, eps);
                T::narrow(&ys, yr);
                out
            }
        };
        *m = <T::Acc as row::Real>::of(mu);
        *s = <T::Acc as row::Real>::of(rs);
    }
}

/// Backward over one block of consecutive rows, adding into the block's dγ/dβ partials.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma+f16c",
    "x86_64+avx2+fma+f16c",
    "aarch64+neon"
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_rows<T: CpuElement>(
    n: usize,
    x: &[T],
    dy: &[T],
    mean: &[T::Acc],
    rstd: &[T::Acc],
    gamma: Option<&[T::Acc]>,
    dx: &mut [T],
    mut dgamma: Option<&mut [T::Acc]>,
    mut dbeta: Option<&mut [T::Acc]>,
) {
    if let (Some(xa), Some(dya), Some(dxa)) = (T::as_acc(x), T::as_acc(dy), T::as_acc_mut(dx)) {
        row::backward_rows(n, xa, dya, mean, rstd, gamma, dxa, dgamma, dbeta);
        return;
    }
    let (mut xs, mut dys, mut dxs) = (Vec::new(), Vec::new(), Vec::new());
    for ((((xr, dyr), dxr), &mu), &rs) in
        x.chunks_exact(n).zip(dy.chunks_exact(n)).zip(dx.chunks_exact_mut(n)).zip(mean).zip(rstd)
    {
        let xa = load(xr, &mut xs);
        let dya = load(dyr, &mut dys);
        let (mu, rs) = (mu.into(), rs.into());
        match T::as_acc_mut(dxr) {
            Some(dxa) => row::backward(
                xa,
                dya,
                mu,
                rs,
                gamma,
                dxa,
                dgamma.as_deref_mut(),
                dbeta.as_deref_mut(),
            ),
            None => {
                dxs.resize(n, T::Acc::zero());
                row::backward(
                    xa,
                    dya,
                    mu,
                    rs,
                    gamma,
                    &mut dxs,
                    dgamma.as_deref_mut(),
                    dbeta.as_deref_mut(),
                );
                T::narrow(&dxs, dxr);
            }
        }
    }
}
