//! The one SIMD dispatch point: the per-task loops, compiled once per instruction set.
//!
//! The row kernels (`row.rs`) are generic, `#[inline(always)]` code over fixed-width lane arrays.
//! Here they are inlined into task functions that `multiversion` compiles for AVX-512, AVX2+FMA,
//! NEON and a baseline, choosing one at run time from the CPU's features (detected once and
//! cached). Nothing else in the crate mentions an instruction set.

use crate::isa::multiversioned;
use num_traits::{One, Zero};

use crate::driver::Out;
use crate::element::CpuElement;
use crate::row::{self, Real};

multiversioned! {
/// Forward over consecutive rows: `x`/`y` hold `mean.len()` rows of `n`.
///
/// Rows are software-pipelined: where the accumulation type has a fused kernel (`f32`, N ≥
/// `F32_LONG_MIN_N`), row r is normalized in the same sweep that sums row r+1's statistics.
/// 16-bit rows go to their register-converting kernels (`Convert::forward_converted`); the
/// scratch path below (rows widened one at a time into two rotating scratch rows) serves a 16-bit
/// type without them, and the tests, as the reference those kernels match bit for bit.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_rows<T: CpuElement>(
    n: usize,
    spec: row::Spec,
    x: &[T],
    gamma: Option<&[T::Acc]>,
    beta: Option<&[T::Acc]>,
    y: &mut [T],
    mean: &mut [T::Acc],
    rstd: &mut [T::Acc],
    out: Out,
) {
    let rows = mean.len().min(rstd.len());
    if rows == 0 {
        return;
    }
    // Streaming stores and y's prefetch are the `f32` kernels' (`f64` runs the portable
    // kernels, with ordinary stores); 16-bit rows are rounded in registers (or computed into a
    // scratch row and narrowed) and written with ordinary stores. Rows in the accumulation type
    // pipeline from the type's threshold (`f32`: lower); widened 16-bit rows from `FUSE_MIN_N`.
    let (out, long_min) = if T::as_acc(x).is_some() {
        (out, <T::Acc as Real>::long_min_n())
    } else {
        (Out::Cached, row::FUSE_MIN_N)
    };
    let stream = out.stream();
    if T::forward_converted(n, spec, x, gamma, beta, y, mean, rstd) {
        // Done in registers (16-bit storage with such kernels).
    } else if n < long_min {
        forward_short(n, spec, x, gamma, beta, y, mean, rstd, out);
    } else if !long_in_place(n, spec, x, gamma, beta, y, mean, rstd, out) {
        forward_long(n, spec, x, gamma, beta, y, mean, rstd, stream);
    }
    if stream {
        crate::reduce::stream_fence();
    }
}
}

/// [`forward_rows`] for long rows already in the accumulation type, by the type's one-dispatch
/// kernel (`Real::long`) where it has one; `false` otherwise.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn long_in_place<T: CpuElement>(
    n: usize,
    spec: row::Spec,
    x: &[T],
    gamma: Option<&[T::Acc]>,
    beta: Option<&[T::Acc]>,
    y: &mut [T],
    mean: &mut [T::Acc],
    rstd: &mut [T::Acc],
    out: Out,
) -> bool {
    match (T::as_acc(x), T::as_acc_mut(y)) {
        (Some(x), Some(y)) => <T::Acc as Real>::long(n, spec, x, gamma, beta, y, mean, rstd, out),
        _ => false,
    }
}

/// [`forward_rows`] for rows of at least `FUSE_MIN_N`: the pipelined loop, calling the type's
/// fused sweep row by row (16-bit rows widened into scratch rows, and `f64`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_long<T: CpuElement>(
    n: usize,
    spec: row::Spec,
    x: &[T],
    gamma: Option<&[T::Acc]>,
    beta: Option<&[T::Acc]>,
    y: &mut [T],
    mean: &mut [T::Acc],
    rstd: &mut [T::Acc],
    stream: bool,
) {
    let rows = mean.len().min(rstd.len());
    let zero = T::Acc::zero();
    let direct = T::as_acc(x).is_some();
    let xrow = |r: usize| &x[r * n..(r + 1) * n];
    let (mut xb, mut yb) = ([Vec::new(), Vec::new()], vec![zero; if direct { 0 } else { n }]);
    widen_into(xrow(0), &mut xb[0]);
    let x0 = acc_row(xrow(0), &xb[0]);
    let mut m_next = row::shift(spec.kind, x0);
    let mut sums = <T::Acc as Real>::centered(x0, m_next, T::Acc::one(), zero);
    for r in 0..rows {
        let (lo, hi) = xb.split_at_mut(1);
        let (cur, nxt) = if r % 2 == 0 { (&lo[0], &mut hi[0]) } else { (&hi[0], &mut lo[0]) };
        if !direct {
            // 16-bit rows: write out the previous row's y and widen the next row's x in one
            // sweep, so that the store and the load stream are in flight together.
            let (done, _) = y.split_at_mut(r * n);
            let prev = (r > 0).then(|| (&yb[..], &mut done[(r - 1) * n..]));
            let next = (r + 1 < rows).then(|| {
                nxt.resize(n, zero);
                (xrow(r + 1), &mut nxt[..])
            });
            T::narrow_widen(prev, next);
        }
        let xc = acc_row(xrow(r), cur);
        let st = row::finish(spec, xc, m_next, sums);
        {
            let yr: &mut [T::Acc] = match T::as_acc_mut(&mut y[r * n..(r + 1) * n]) {
                Some(yr) => yr,
                None => &mut yb[..],
            };
            let next = if r + 1 < rows {
                let xn = acc_row(xrow(r + 1), nxt);
                m_next = row::shift(spec.kind, xn);
                Some(xn)
            } else {
                None
            };
            let fused = match next {
                Some(xn) if n >= row::FUSE_MIN_N => {
                    <T::Acc as Real>::fused(xn, m_next, xc, &st, gamma, beta, yr, stream)
                }
                _ => None,
            };
            match (fused, next) {
                (Some(s), _) => sums = s,
                (None, next) => {
                    row::normalize(xc, &st, gamma, beta, yr);
                    if let Some(xn) = next {
                        sums = <T::Acc as Real>::centered(xn, m_next, T::Acc::one(), zero);
                    }
                }
            }
        }
        mean[r] = <T::Acc as Real>::of(st.mean);
        rstd[r] = <T::Acc as Real>::of(st.rstd);
    }
    if !direct {
        T::narrow(&yb, &mut y[(rows - 1) * n..rows * n]);
    }
}

/// The backward of consecutive blocks of `ROW_BLOCK` rows (the first row starts a block; or
/// rows within one block), whatever their saved statistics: [`backward_blocks`], or
/// [`backward_blocks_exact`] where a row's rstd `row::needs_exact_row`. [`Error::OutOfMemory`]
/// where the latter's scratch rows cannot be had.
///
/// [`Error::OutOfMemory`]: layernorm_core::Error::OutOfMemory
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(crate) fn blocks<T: CpuElement>(
    kind: row::Kind,
    n: usize,
    (x, dy, mean, rstd): (&[T], &[T], &[T::Acc], &[T::Acc]),
    gamma: Option<&[T::Acc]>,
    dx: &mut [T],
    partials: Option<&mut [T::Acc]>,
    want: (bool, bool),
    (stream, epi): (bool, row::Epilogue<'_, T::Acc>),
) -> layernorm_core::Result<()> {
    if rstd.iter().any(|&r| row::needs_exact_row(r.into())) {
        debug_assert!(!epi.on(), "the exact rows have no epilogue");
        return backward_blocks_exact(kind, n, (x, dy, mean, rstd), gamma, dx, partials, want);
    }
    backward_blocks(kind, n, (x, dy, mean, rstd), gamma, dx, partials, want, (stream, epi));
    Ok(())
}

/// Backward over consecutive blocks of `ROW_BLOCK` rows (the first row starts a block), with
/// their dγ/dβ partials laid out per block as `[dγ (n) | dβ (n)]` for the gradients `want`ed.
/// Long rows in the accumulation type go to its pair kernel in one call, pipelined across the
/// block boundaries; everything else runs block by block through [`backward_rows`]. `epi` only
/// where the type's kernels take one (`Real::EPILOGUE`).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(crate) fn backward_blocks<T: CpuElement>(
    kind: row::Kind,
    n: usize,
    (x, dy, mean, rstd): (&[T], &[T], &[T::Acc], &[T::Acc]),
    gamma: Option<&[T::Acc]>,
    dx: &mut [T],
    mut partials: Option<&mut [T::Acc]>,
    want: (bool, bool),
    (stream, epi): (bool, row::Epilogue<'_, T::Acc>),
) {
    if let (Some(xa), Some(da), Some(dxa)) = (T::as_acc(x), T::as_acc(dy), T::as_acc_mut(dx)) {
        let parts = partials.as_deref_mut();
        if <T::Acc as Real>::back_blocks(
            kind, n, xa, da, mean, rstd, gamma, dxa, parts, want, stream, epi,
        ) {
            if stream {
                crate::reduce::stream_fence();
            }
            return;
        }
    }
    debug_assert!(!epi.on(), "only the kernels with an epilogue are given one");
    let parts = partials.as_deref_mut();
    let extra = crate::reduce::Extra::default();
    if T::backward_converted(kind, n, x, dy, extra, mean, rstd, gamma, dx, parts, want) {
        return;
    }
    let rows = mean.len().min(rstd.len());
    let chunk = crate::driver::ROW_BLOCK * n;
    for (b, dxb) in dx.chunks_mut(chunk).enumerate() {
        let r = b * crate::driver::ROW_BLOCK..((b + 1) * crate::driver::ROW_BLOCK).min(rows);
        let e = r.start * n..r.end * n;
        let (pg, pb) = crate::driver::block_partials(partials.as_deref_mut(), n, b, want);
        let (xb, dyb, m, s) = (&x[e.clone()], &dy[e], &mean[r.clone()], &rstd[r]);
        backward_rows(kind, n, xb, dyb, m, s, gamma, dxb, pg, pb, stream);
    }
}

/// [`backward_blocks`] for a group of blocks whose saved statistics hold a row that
/// `row::needs_exact_row`:
/// every row through the row-wise composition (`row::back_row`: the kernels' bits for the
/// ordinary rows, `f64` for the others), 16-bit rows widened into scratch rows and rounded back,
/// adding into the blocks' partials in row order as the kernels do. [`Error::OutOfMemory`]
/// where the scratch rows cannot be had.
#[allow(clippy::type_complexity)]
pub(crate) fn backward_blocks_exact<T: CpuElement>(
    kind: row::Kind,
    n: usize,
    (x, dy, mean, rstd): (&[T], &[T], &[T::Acc], &[T::Acc]),
    gamma: Option<&[T::Acc]>,
    dx: &mut [T],
    mut partials: Option<&mut [T::Acc]>,
    want: (bool, bool),
) -> layernorm_core::Result<()> {
    let wide = T::as_acc(x).is_none();
    let scratch =
        |name| if wide { layernorm_core::try_zeroed_vec(name, n) } else { Ok(Vec::new()) };
    let (mut xb, mut db, mut dxb) = (scratch("x (a widened row)")?, scratch("dy")?, scratch("dx")?);
    let rows = mean.len().min(rstd.len());
    for r in 0..rows {
        let span = r * n..(r + 1) * n;
        widen_into(&x[span.clone()], &mut xb);
        widen_into(&dy[span.clone()], &mut db);
        let (xr, dyr) = (acc_row(&x[span.clone()], &xb), acc_row(&dy[span.clone()], &db));
        let b = r / crate::driver::ROW_BLOCK;
        let (pg, pb) = crate::driver::block_partials(partials.as_deref_mut(), n, b, want);
        let stats = (mean[r].into(), rstd[r].into());
        match T::as_acc_mut(&mut dx[span.clone()]) {
            Some(dxr) => row::back_row(kind, (xr, dyr), stats, gamma, dxr, pg, pb),
            None => {
                row::back_row(kind, (xr, dyr), stats, gamma, &mut dxb, pg, pb);
                T::narrow(&dxb, &mut dx[span]);
            }
        }
    }
    Ok(())
}

/// Elements per widened chunk of 16-bit short rows (the chunk and its output stay in L1/L2).
const SHORT_CHUNK: usize = 4096;

/// Forward of short rows (below `Real::long_min_n`): the type's one-loop row kernel, on the rows
/// themselves or on chunks of rows widened to the accumulation type.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_short<T: CpuElement>(
    n: usize,
    spec: row::Spec,
    x: &[T],
    gamma: Option<&[T::Acc]>,
    beta: Option<&[T::Acc]>,
    y: &mut [T],
    mean: &mut [T::Acc],
    rstd: &mut [T::Acc],
    out: Out,
) {
    let rows = mean.len().min(rstd.len());
    let (x, y) = (&x[..rows * n], &mut y[..rows * n]);
    let (mean, rstd) = (&mut mean[..rows], &mut rstd[..rows]);
    if let (Some(xa), Some(ya)) = (T::as_acc(x), T::as_acc_mut(y)) {
        return <T::Acc as Real>::rows(n, spec, xa, gamma, beta, ya, mean, rstd, out);
    }
    let per = (SHORT_CHUNK / n).max(1);
    let zero = T::Acc::zero();
    let (mut xb, mut yb) = (vec![zero; per * n], vec![zero; per * n]);
    let chunks = x.chunks(per * n).zip(y.chunks_mut(per * n));
    for ((xc, yc), (mc, sc)) in chunks.zip(mean.chunks_mut(per).zip(rstd.chunks_mut(per))) {
        let len = xc.len();
        T::widen(xc, &mut xb[..len]);
        let out = Out::Cached;
        <T::Acc as Real>::rows(n, spec, &xb[..len], gamma, beta, &mut yb[..len], mc, sc, out);
        T::narrow(&yb[..len], yc);
    }
}

/// Backward of short rows (N < `BACK_FUSE_MIN_N`), like [`forward_short`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_short<T: CpuElement>(
    kind: row::Kind,
    n: usize,
    x: &[T],
    dy: &[T],
    mean: &[T::Acc],
    rstd: &[T::Acc],
    gamma: Option<&[T::Acc]>,
    dx: &mut [T],
    mut dgamma: Option<&mut [T::Acc]>,
    mut dbeta: Option<&mut [T::Acc]>,
    stream: bool,
) {
    let rows = mean.len().min(rstd.len());
    let (x, dy, dx) = (&x[..rows * n], &dy[..rows * n], &mut dx[..rows * n]);
    if let (Some(xa), Some(da), Some(dxa)) = (T::as_acc(x), T::as_acc(dy), T::as_acc_mut(dx)) {
        return <T::Acc as Real>::back_rows(
            kind, n, xa, da, mean, rstd, gamma, dxa, dgamma, dbeta, stream,
        );
    }
    let per = (SHORT_CHUNK / n).max(1);
    let zero = T::Acc::zero();
    let (mut xb, mut db, mut dxb) = (vec![zero; per * n], vec![zero; per * n], vec![zero; per * n]);
    let chunks = x.chunks(per * n).zip(dy.chunks(per * n)).zip(dx.chunks_mut(per * n));
    for (((xc, dc), dxc), (mc, sc)) in chunks.zip(mean.chunks(per).zip(rstd.chunks(per))) {
        let len = xc.len();
        T::widen(xc, &mut xb[..len]);
        T::widen(dc, &mut db[..len]);
        let (dg, dbeta) = (dgamma.as_deref_mut(), dbeta.as_deref_mut());
        <T::Acc as Real>::back_rows(
            kind,
            n,
            &xb[..len],
            &db[..len],
            mc,
            sc,
            gamma,
            &mut dxb[..len],
            dg,
            dbeta,
            false,
        );
        T::narrow(&dxb[..len], dxc);
    }
}

/// A row in the accumulation type: the row itself, or the scratch it was widened into.
#[inline(always)]
fn acc_row<'a, T: CpuElement>(row: &'a [T], scratch: &'a [T::Acc]) -> &'a [T::Acc] {
    T::as_acc(row).unwrap_or(scratch)
}

/// Widens a 16-bit row into `scratch` (nothing to do for `f32`/`f64`).
#[inline(always)]
fn widen_into<T: CpuElement>(row: &[T], scratch: &mut Vec<T::Acc>) {
    if T::as_acc(row).is_none() {
        scratch.resize(row.len(), T::Acc::zero());
        T::widen(row, scratch);
    }
}

multiversioned! {
/// Backward over one block of consecutive rows, adding into the block's dγ/dβ partials.
///
/// Pipelined like [`forward_rows`]: row r's dx sweep runs fused with row r+1's reduction sweep
/// where the type has the kernel; 16-bit rows of x and dy are widened into rotating scratch rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_rows<T: CpuElement>(
    kind: row::Kind,
    n: usize,
    x: &[T],
    dy: &[T],
    mean: &[T::Acc],
    rstd: &[T::Acc],
    gamma: Option<&[T::Acc]>,
    dx: &mut [T],
    mut dgamma: Option<&mut [T::Acc]>,
    mut dbeta: Option<&mut [T::Acc]>,
    stream: bool,
) {
    let rows = mean.len().min(rstd.len());
    if rows == 0 {
        return;
    }
    if n < row::BACK_FUSE_MIN_N {
        backward_short(kind, n, x, dy, mean, rstd, gamma, dx, dgamma, dbeta, stream);
        if stream {
            crate::reduce::stream_fence();
        }
        return;
    }
    let zero = T::Acc::zero();
    let direct = T::as_acc(x).is_some();
    let span = |r: usize| r * n..(r + 1) * n;
    let stats = |r: usize| -> (f64, f64) { (mean[r].into(), rstd[r].into()) };
    let (mut xb, mut db_) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    let mut dxb = vec![zero; if direct { 0 } else { n }];
    widen_into(&x[span(0)], &mut xb[0]);
    widen_into(&dy[span(0)], &mut db_[0]);
    let mut sums = {
        let (mu, rs) = stats(0);
        let (m, s) = row::back_shift::<T::Acc>(mu, rs);
        let (x0, dy0) = (acc_row(&x[span(0)], &xb[0]), acc_row(&dy[span(0)], &db_[0]));
        <T::Acc as Real>::backward_sums(x0, dy0, gamma, m, <T::Acc as Real>::of(s))
    };
    for r in 0..rows {
        let (xlo, xhi) = xb.split_at_mut(1);
        let (dlo, dhi) = db_.split_at_mut(1);
        let ((xcur, xnxt), (dcur, dnxt)) = if r % 2 == 0 {
            ((&xlo[0], &mut xhi[0]), (&dlo[0], &mut dhi[0]))
        } else {
            ((&xhi[0], &mut xlo[0]), (&dhi[0], &mut dlo[0]))
        };
        let (xr, dyr) = (acc_row(&x[span(r)], xcur), acc_row(&dy[span(r)], dcur));
        let (mu, rs) = stats(r);
        let p = row::back_params::<T::Acc>(kind, n, mu, rs, sums);
        {
            let dxr: &mut [T::Acc] = match T::as_acc_mut(&mut dx[span(r)]) {
                Some(d) => d,
                None => &mut dxb[..],
            };
            let next = if r + 1 < rows {
                widen_into(&x[span(r + 1)], xnxt);
                widen_into(&dy[span(r + 1)], dnxt);
                let (mn, rn) = stats(r + 1);
                let (m_next, s_next) = row::back_shift::<T::Acc>(mn, rn);
                let rows_next = (acc_row(&x[span(r + 1)], xnxt), acc_row(&dy[span(r + 1)], dnxt));
                Some((rows_next.0, rows_next.1, m_next, <T::Acc as Real>::of(s_next)))
            } else {
                None
            };
            let fused = match next {
                Some(next) if n >= row::BACK_FUSE_MIN_N => <T::Acc as Real>::fused_backward(
                    next,
                    xr,
                    dyr,
                    gamma,
                    &p,
                    dxr,
                    dgamma.as_deref_mut(),
                    dbeta.as_deref_mut(),
                ),
                _ => None,
            };
            match (fused, next) {
                (Some(s), _) => sums = s,
                (None, next) => {
                    let (dg, db) = (dgamma.as_deref_mut(), dbeta.as_deref_mut());
                    row::back_apply(xr, dyr, gamma, &p, dxr, dg, db);
                    if let Some((xn, dyn_, m_next, s_next)) = next {
                        sums = <T::Acc as Real>::backward_sums(xn, dyn_, gamma, m_next, s_next);
                    }
                }
            }
        }
        if !direct {
            T::narrow(&dxb, &mut dx[span(r)]);
        }
    }
}
}

#[cfg(feature = "unit-tests")]
#[doc(hidden)]
pub mod tests {
    use super::*;
    use layernorm_core::{bf16, f16};

    /// A 16-bit value from its bits.
    fn bits<T: bytemuck::Pod>(b: u16) -> T {
        bytemuck::cast(b)
    }

    /// Bits equal, or both NaN (a NaN's sign and payload depend on which operand an instruction
    /// propagates, which the compiler may commute).
    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// The first index where `got` and `want` differ as [`same`] sees them.
    fn first_difference<E: CpuElement<Acc = f32>>(got: &[E], want: &[E]) -> Option<usize> {
        got.iter().zip(want).position(|(a, b)| !same(E::to_acc(*a), E::to_acc(*b)))
    }

    /// Asserts that dx and the partials have the bits of the wanted ones (NaNs alike).
    fn same_backward<E: CpuElement<Acc = f32>>(
        what: &str,
        (dx, parts): (&[E], &[f32]),
        (want_dx, want_parts): (&[E], &[f32]),
    ) {
        let bad = first_difference(dx, want_dx);
        assert!(bad.is_none(), "dx, {what}: first difference at {bad:?}");
        let bad = first_difference(parts, want_parts);
        assert!(bad.is_none(), "partials, {what}: first difference at {bad:?}");
    }

    pub fn bf16_backward_converted_in_registers_matches_the_scratch_path_bit_for_bit() {
        // Signaling NaNs (quiet bit clear), which the kernel widens without quieting.
        backward_converted_matches_scratch::<bf16>([0x7f81, 0xff85, 0x7f82]);
    }

    pub fn f16_backward_converted_in_registers_matches_the_scratch_path_bit_for_bit() {
        backward_converted_matches_scratch::<f16>([0x7c01, 0xfc05, 0x7d02]);
    }

    fn backward_converted_matches_scratch<T: CpuElement<Acc = f32> + bytemuck::Pod>(
        snan: [u16; 3],
    ) {
        // Two full blocks of rows and a ragged one, lengths with and without tails; dx and
        // every block's dγ/dβ partials compared bit for bit with the widen-per-row path.
        let rows = 2 * crate::driver::ROW_BLOCK + 7;
        let lengths = [1usize, 7, 8, 64, 100, 128, 256, 300, 515, 1024];
        let kinds = [row::Kind::LayerNorm, row::Kind::RmsNorm];
        for (n, kind) in lengths.into_iter().flat_map(|n| kinds.map(|k| (n, k))) {
            let mut s = 0x9e37_79b9u32;
            let mut rand = move || {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                s as f32 / u32::MAX as f32 - 0.5
            };
            let mut x: Vec<T> = (0..rows * n)
                .map(|i| {
                    let u = rand();
                    T::from_acc(match (i / n) % 5 {
                        0 => 1e4 + 3.0 * u,
                        1 => 1e30 * u,
                        2 if i % n == 7 => f32::NAN,
                        _ => 3.0 * u,
                    })
                })
                .collect();
            let mut dy: Vec<T> = (0..rows * n).map(|_| T::from_acc(2.0 * rand())).collect();
            x[3 * n + 9] = bits(snan[0]);
            dy[4 * n + 5] = bits(snan[1]);
            dy[6 * n + n - 1] = bits(snan[2]);
            let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
            for r in 0..rows {
                let v: Vec<f64> = x[r * n..(r + 1) * n].iter().map(|&v| T::to_f64(v)).collect();
                let m = if kind.centred() { v.iter().sum::<f64>() / n as f64 } else { 0.0 };
                let var = v.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / n as f64;
                (mean[r], rstd[r]) = (m as f32, (1.0 / (var + 1e-5).sqrt()) as f32);
            }
            let g: Vec<f32> = (0..n).map(|j| 0.5 + j as f32 / n as f32).collect();
            let blocks = rows.div_ceil(crate::driver::ROW_BLOCK);
            for (gamma, want) in [
                (Some(&g[..]), (true, true)),
                (None, (true, false)),
                (Some(&g[..]), (false, false)),
            ] {
                let (mut dx0, mut p0) =
                    (vec![T::from_acc(0.0); rows * n], vec![0f32; blocks * 2 * n]);
                let (mut dx1, mut p1) = (dx0.clone(), p0.clone());
                let stats = (&mean[..], &rstd[..]);
                by_rows(kind, n, (&x, &dy), stats, gamma, &mut dx0, &mut p0, want);
                let parts = Some(&mut p1[..]);
                let extra = crate::reduce::Extra::default();
                assert!(T::backward_converted(
                    kind, n, &x, &dy, extra, &mean, &rstd, gamma, &mut dx1, parts, want
                ));
                let what = format!("n={n}, want={want:?}, {kind:?}");
                same_backward(&what, (&dx1, &p1), (&dx0, &p0));
                // With dh: fma(1, dx', dh) rounded once, as `stage::finish` forms it from the
                // f32 kernels' dx' on the widened rows.
                let mut dh: Vec<T> = (0..rows * n).map(|_| T::from_acc(2.0 * rand())).collect();
                dh[5 * n + n / 2] = bits(snan[0]);
                let wide = |v: &[T]| {
                    let mut w = vec![0f32; v.len()];
                    T::widen(v, &mut w);
                    w
                };
                let (mut dxk, mut pk) = (vec![0f32; rows * n], vec![0f32; blocks * 2 * n]);
                by_rows(kind, n, (&wide(&x), &wide(&dy)), stats, gamma, &mut dxk, &mut pk, want);
                crate::stage::finish(n, &mut dxk, None, Some(&dh[..]), &mut dx0, false);
                let mut p2 = vec![0f32; blocks * 2 * n];
                let parts = Some(&mut p2[..]);
                let extra = crate::reduce::Extra { dh: Some(&dh[..]), ..Default::default() };
                assert!(T::backward_converted(
                    kind, n, &x, &dy, extra, &mean, &rstd, gamma, &mut dx1, parts, want
                ));
                same_backward(&format!("with dh, {what}"), (&dx1, &p2), (&dx0, &p1));
                // From y (x stands for it): x̂ = (y − β)·(1/γ_eff) recovered as it is read, the
                // kernels given a mean of 0 and an rstd of 1, dx = fma(s, dx', dh) or s·dx' with
                // s the saved rstd; against `stage::recover`, the f32 rows, `stage::finish`.
                let beta: Vec<f32> = (0..n).map(|j| 0.25 - j as f32 / (2 * n) as f32).collect();
                let inv: Vec<f32> = (0..n).map(|j| 1.0 / (0.5 + j as f32 / n as f32)).collect();
                let (okind, zeros, ones) = (kind.of_output(), vec![0f32; rows], vec![1f32; rows]);
                for h in [None, Some(&dh[..])] {
                    let gam = crate::stage::Gamma { values: &inv[..], divide: false };
                    let mut xs = vec![0f32; rows * n];
                    crate::stage::recover::<T>(n, &x, Some(&beta), Some(gam), &mut xs);
                    let (mut dxk, mut pk) = (vec![0f32; rows * n], vec![0f32; blocks * 2 * n]);
                    let given = (&zeros[..], &ones[..]);
                    by_rows(okind, n, (&xs, &wide(&dy)), given, gamma, &mut dxk, &mut pk, want);
                    crate::stage::finish(n, &mut dxk, Some(&rstd), h, &mut dx0, false);
                    let rec = crate::reduce::Recover::new((Some(&beta), Some(&inv)), (&[], &[]), n);
                    let extra = crate::reduce::Extra { dh: h, rec, scale: Some(&rstd[..]) };
                    let mut p3 = vec![0f32; blocks * 2 * n];
                    let parts = Some(&mut p3[..]);
                    assert!(T::backward_converted(
                        okind, n, &x, &dy, extra, &zeros, &ones, gamma, &mut dx1, parts, want
                    ));
                    let what = format!("from y, dh {}, {what}", h.is_some());
                    same_backward(&what, (&dx1, &p3), (&dx0, &pk));
                }
            }
        }
    }

    /// The backward of `rows` (x, dy) block by block through [`backward_rows`] (the scratch path
    /// for 16-bit types), into `dx` and the blocks' partials.
    #[allow(clippy::too_many_arguments)]
    fn by_rows<E: CpuElement<Acc = f32>>(
        kind: row::Kind,
        n: usize,
        (x, dy): (&[E], &[E]),
        (mean, rstd): (&[f32], &[f32]),
        gamma: Option<&[f32]>,
        dx: &mut [E],
        partials: &mut [f32],
        want: (bool, bool),
    ) {
        let rows = rstd.len();
        let chunk = crate::driver::ROW_BLOCK * n;
        for (b, dxb) in dx.chunks_mut(chunk).enumerate() {
            let r = b * crate::driver::ROW_BLOCK..((b + 1) * crate::driver::ROW_BLOCK).min(rows);
            let e = r.start * n..r.end * n;
            let (pg, pb) = crate::driver::block_partials(Some(&mut *partials), n, b, want);
            let (xb, dyb) = (&x[e.clone()], &dy[e]);
            backward_rows(kind, n, xb, dyb, &mean[r.clone()], &rstd[r], gamma, dxb, pg, pb, false);
        }
    }

    pub fn bf16_rows_converted_in_registers_match_the_scratch_path_bit_for_bit() {
        // Signaling NaNs (quiet bit clear), in a vector and in the tail: the kernel widens them
        // without quieting, the scratch path quiets them first.
        rows_converted_match_scratch::<bf16>([0x7f81, 0xff85]);
    }

    pub fn f16_rows_converted_in_registers_match_the_scratch_path_bit_for_bit() {
        rows_converted_match_scratch::<f16>([0x7c01, 0xfc05]);
    }

    fn rows_converted_match_scratch<T: CpuElement<Acc = f32> + bytemuck::Pod>(snan: [u16; 2]) {
        // Rows of every kind: short (grouped, some groups of four, some ragged) and long.
        let rows = 41;
        for n in [1usize, 7, 8, 100, 128, 300, 512, 515, 600, 777, 1024] {
            let mut s = 0x1234_5678u32;
            let mut x: Vec<T> = (0..rows * n)
                .map(|i| {
                    s ^= s << 13;
                    s ^= s >> 17;
                    s ^= s << 5;
                    let u = s as f32 / u32::MAX as f32 - 0.5;
                    T::from_acc(match (i / n) % 9 {
                        0 => 3.25,
                        1 => 1e6 + 1e3 * u,
                        2 => 1e37 * u,
                        3 if i % n < 32 => 50.0 + u,
                        4 if i % n == n / 2 => f32::NAN,
                        5 => 0.0,
                        6 => 1e-30 * u,
                        7 => 1e4 + 3.0 * u,
                        _ => 3.0 * u,
                    })
                })
                .collect();
            x[5 * n + 3] = bits(snan[0]);
            x[5 * n + n - 1] = bits(snan[1]);
            let g: Vec<f32> = (0..n).map(|j| 0.5 + j as f32 / n as f32).collect();
            let b: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 1.0).collect();
            let params = [(Some(&g[..]), Some(&b[..])), (None, None), (Some(&g[..]), None)];
            let specs = crate::reduce::tests::SPECS;
            for ((gamma, beta), (spec, _)) in params.into_iter().flat_map(|p| specs.map(|s| (p, s)))
            {
                let (mut y0, mut m0, mut r0) =
                    (vec![T::from_acc(0.0); rows * n], vec![0f32; rows], vec![0f32; rows]);
                let (mut y1, mut m1, mut r1) = (y0.clone(), m0.clone(), r0.clone());
                if n < row::FUSE_MIN_N {
                    forward_short(n, spec, &x, gamma, beta, &mut y0, &mut m0, &mut r0, Out::Cached);
                } else {
                    forward_long(n, spec, &x, gamma, beta, &mut y0, &mut m0, &mut r0, false);
                }
                assert!(T::forward_converted(n, spec, &x, gamma, beta, &mut y1, &mut m1, &mut r1));
                let bad = first_difference(&y1, &y0);
                assert!(bad.is_none(), "y, n={n}, {spec:?}: first difference at {bad:?}");
                let stats = |m: &[f32], r: &[f32]| {
                    m.iter().zip(r).map(|(&m, &r)| (m, r)).collect::<Vec<_>>()
                };
                let bad = stats(&m1, &r1)
                    .into_iter()
                    .zip(stats(&m0, &r0))
                    .position(|(a, b)| !(same(a.0, b.0) && same(a.1, b.1)));
                assert!(bad.is_none(), "stats, n={n}, {spec:?}: first difference at row {bad:?}");
            }
        }
    }
}
