//! Row kernels in the accumulation type (`f32`, or `f64` for `f64` data).
//!
//! Every function here works on one row of N elements that is hot in cache, and is written once,
//! generically over the accumulation type, in a shape the compiler vectorizes: fixed-width chunks
//! of [`LANES`] elements with one accumulator per lane. They are `#[inline(always)]` so that they
//! are compiled inside the multiversioned task functions of `simd.rs`, once per instruction set.
//!
//! The numerics, in short (the long form is in `docs/numerics.md`):
//!
//! - **Sums** run in `LANES` independent accumulators inside blocks of [`BLOCK`] elements; each
//!   block's total is added into an `f64`. Rounding error therefore grows with `BLOCK / LANES`
//!   (16 additions), not with N.
//! - **Mean** is kept in two parts: `m_hi`, a shift (the mean of the row's first 32 elements,
//!   rounded to the accumulation type), and `m_lo`, the mean of the residuals `d = x − m_hi`,
//!   which are exact (Sterbenz) exactly when it matters, |mean| ≫ std. Centering with both,
//!   `(x − m_hi) − m_lo`, keeps rows at mean 1e6, std 1 exact in `f32`, where a rounded mean alone
//!   would be off by up to 3% of a std.
//! - **Variance** comes from the same sweep over the residuals (shifted data: Σd²/N − m_lo², never
//!   E\[x²\] − E\[x\]²). The shift lies within a fraction of a std of the mean, so the subtraction
//!   cancels nothing; where it would (an outlying head, a row constant to a few ulps), an exact
//!   pass over ((x − m_hi) − m_lo)² replaces it. So the forward sweeps a row twice: statistics,
//!   then normalize. If squares overflow (|x| ≳ 1e18 in `f32`), the sweep is redone on values
//!   scaled by a power of two, so |x| up to ~1e38 stays finite and exact.
//!   The same rescaled sweep runs where var + ε is so small that squares may have lost bits below
//!   the type's normal range (only with ε below ~1e-30). Where m_hi + m_lo is itself exact in
//!   the accumulation type the two are folded into one centring point, so a constant row
//!   normalizes to exactly 0.
//! - **Backward** does not trust the saved mean beyond its storage precision: its one reduction
//!   sweep sums the residuals `d = x − mean_saved` beside Σg and Σg·d (g = dy·γ), so
//!   m_lo = Σd/N recovers the exact mean, and c1 = (Σg·d − m_lo·Σg)/N · rstd.
//! - **RMSNorm** runs the same sweeps: its "shift" and saved "mean" are 0, so the residuals are x
//!   itself and Σd² is Σx²; only the per-row scalar steps ([`Kind`]: [`shift`], [`finish`],
//!   [`back_params`]) differ — var = Σx²/N with no m_lo², no far-shift second pass, c2 = 0 —
//!   and the rescaled sweep for overflowing squares is shared.
//! - **Extreme rstd**: a forward row whose rstd overflows the accumulation type, and a backward
//!   row whose saved rstd is above 2^63, are computed in `f64` by the driver
//!   ([`forward_exact_row`], [`back_exact_row`]), where the kernels' distributed formulas
//!   would meet 0·∞ or overflow.

// Index loops over lanes are the shape the vectorizer wants here.
#![allow(clippy::needless_range_loop)]

use crate::isa::multiversioned;
use num_traits::Float;

use crate::driver::Out;

/// Independent accumulators per sum: one 512-bit register of `f32`.
pub(crate) const LANES: usize = 16;
/// Elements per block before a block's lanes are folded into the `f64` total.
pub(crate) const BLOCK: usize = 256;
/// Elements whose mean is the forward's shift (see `stats`).
pub(crate) const SHIFT_SAMPLE: usize = 32;
/// Shortest row for which the forward fuses one row's normalize with the next row's statistics:
/// below it the fused kernel's fixed cost outweighs the overlap (measured: N = 128 lost 15%,
/// N = 768 gained 10%).
pub(crate) const FUSE_MIN_N: usize = 512;
/// The backward's counterpart of [`FUSE_MIN_N`]: from here on, rows go through the pipelined
/// pair sweeps rather than the short-row groups (measured: N = 256 backward 0.52 → 0.66 of the
/// baseline in pairs; N = 128 was faster in groups, 0.59 against 0.53).
pub(crate) const BACK_FUSE_MIN_N: usize = 256;
/// `f32`'s [`FUSE_MIN_N`]: its one-dispatch pipelined forward (`reduce::long`) overtook the
/// short-row groups from N = 128 once its sweeps gained fused multiply-adds and (streamed) staged
/// short rows as one span. Intel AVX-512 VM, calls alternated in one process, one thread: at 8
/// MiB (ordinary stores) N = 128 +20%, 192 +22%, 256 +25%, 384 +17% (two threads +28–31%,
/// +24–32%, +9%); streamed, 65536×128 +24% (two threads +20%), 32768×256 +19%, 262144×128 (128
/// MiB) +18%; N = 64 even, 32 −10%.
pub(crate) const F32_LONG_MIN_N: usize = 128;
/// `f32`'s [`BACK_FUSE_MIN_N`]: its one-dispatch long-row backward (`reduce::back_long`, one row
/// per sweep, the next row's sums beside this row's dx; streamed, several short rows staged as
/// one span) overtook the short-row groups from N = 64. Same VM and method, one thread: at 8
/// MiB (ordinary stores) N = 64 +38%, 96 +42%, 128 +56%, 192 +46%; streamed with dx 16 bytes off
/// a line (as a `Vec` usually is), 65536×128 +26% (two threads +22%), 131072×64 +20%, 43690×192
/// ×2.3, 262144×128 (128 MiB) +28%; N = 32 +7% / −3%, N = 16 −4% / −18%, so the groups keep
/// those.
pub(crate) const F32_BACK_LONG_MIN_N: usize = 64;

/// The types the row kernels compute in: `f32` and `f64`, with their reduction sweeps.
///
/// The sweeps have portable defaults (lane arrays the compiler vectorizes, adequately for `f64`);
/// `f32` overrides them with explicit SIMD (`reduce/`).
pub trait Real: Float + Into<f64> + bytemuck::Pod + Send + Sync + 'static {
    /// Rounds an `f64` to this type.
    fn of(v: f64) -> Self;

    /// The forward's shift: the mean of the row's first `SHIFT_SAMPLE` elements, rounded to
    /// this type (any value within a few standard deviations of the mean serves).
    fn shift(x: &[Self]) -> Self {
        let head = &x[..x.len().min(SHIFT_SAMPLE)];
        Self::of(head.iter().map(|&v| v.into()).sum::<f64>() / head.len().max(1) as f64)
    }

    /// The shortest rows that the forward pipelines (below it, `rows`).
    fn long_min_n() -> usize {
        FUSE_MIN_N
    }

    /// Forward of `mean.len()` consecutive rows of `n` (the short-row path: no pipelining). The
    /// portable default composes `shift`, `finish` and `normalize` row by row. `out` says
    /// how to write `y` where the kernel can choose (a hint: streaming stores, prefetching).
    #[allow(clippy::too_many_arguments)]
    fn rows(
        n: usize,
        spec: Spec,
        x: &[Self],
        gamma: Option<&[Self]>,
        beta: Option<&[Self]>,
        y: &mut [Self],
        mean: &mut [Self],
        rstd: &mut [Self],
        _out: Out,
    ) {
        rows_portable(n, spec, x, gamma, beta, y, mean, rstd)
    }

    /// Backward of `mean.len()` consecutive rows of `n` (the short-row path), adding the rows'
    /// dγ/dβ terms into `dgamma`/`dbeta` in row order. The portable default composes
    /// `back_params` and `back_apply` row by row. `stream` asks for non-temporal stores of dx
    /// where the kernel has them (a hint).
    #[allow(clippy::too_many_arguments)]
    fn back_rows(
        kind: Kind,
        n: usize,
        x: &[Self],
        dy: &[Self],
        mean: &[Self],
        rstd: &[Self],
        gamma: Option<&[Self]>,
        dx: &mut [Self],
        dgamma: Option<&mut [Self]>,
        dbeta: Option<&mut [Self]>,
        _stream: bool,
    ) {
        back_rows_portable(kind, n, x, dy, mean, rstd, gamma, dx, dgamma, dbeta)
    }

    /// Forward of `mean.len()` consecutive rows of at least `FUSE_MIN_N`, in place, pipelined
    /// (each row normalized in the sweep that sums the next); `false` where the type has no such
    /// kernel (the caller then runs the generic pipelined loop, with the same results).
    /// `out`: as for [`Real::rows`].
    #[allow(clippy::too_many_arguments)]
    fn long(
        _n: usize,
        _spec: Spec,
        _x: &[Self],
        _gamma: Option<&[Self]>,
        _beta: Option<&[Self]>,
        _y: &mut [Self],
        _mean: &mut [Self],
        _rstd: &mut [Self],
        _out: Out,
    ) -> bool {
        false
    }

    /// Whether [`Real::back_blocks`] applies an [`Epilogue`] (`f32`); other types' staged rows
    /// are finished by the driver (`stage::finish`).
    const EPILOGUE: bool = false;

    /// Backward of consecutive blocks of `ROW_BLOCK` rows in place, in one dispatch, adding into
    /// each block's dγ/dβ partials (`partials`: block b's `[dγ (n) | dβ (n)]` at `2·n·b`, for the
    /// gradients `want`ed) in row order; `false` where the type has no such kernel (the caller
    /// then runs the generic loop block by block, with the same results). `stream` asks for
    /// non-temporal stores of dx (a hint). `epi` is applied to dx before it is stored (only
    /// where [`Real::EPILOGUE`]).
    #[allow(clippy::too_many_arguments)]
    fn back_blocks(
        _kind: Kind,
        _n: usize,
        _x: &[Self],
        _dy: &[Self],
        _mean: &[Self],
        _rstd: &[Self],
        _gamma: Option<&[Self]>,
        _dx: &mut [Self],
        _partials: Option<&mut [Self]>,
        _want: (bool, bool),
        _stream: bool,
        _epi: Epilogue<'_, Self>,
    ) -> bool {
        false
    }

    /// The whole backward of very long rows (`columns::by_columns`) in column chunks, where
    /// the type has that kernel (`f32`), writing the finished dγ/dβ: `Ok(false)` otherwise, and
    /// the caller runs the row-wise path (the bits are the same either way).
    #[allow(clippy::too_many_arguments)]
    fn back_columns(
        _kind: Kind,
        _n: usize,
        _x: &[Self],
        _dy: &[Self],
        _mean: &[Self],
        _rstd: &[Self],
        _gamma: Option<&[Self]>,
        _dx: &mut [Self],
        _dgamma: Option<&mut [Self]>,
        _dbeta: Option<&mut [Self]>,
    ) -> layernorm_core::Result<bool> {
        Ok(false)
    }

    /// The backward of consecutive blocks of rows already in this type, adding into the
    /// blocks' partials (laid out as for [`Real::back_blocks`]): `crate::simd::blocks` of this
    /// type, for rows the driver staged in it (the backward from y, and with dh).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn staged_blocks(
        kind: Kind,
        n: usize,
        rows: (&[Self], &[Self], &[Self], &[Self]),
        gamma: Option<&[Self]>,
        dx: &mut [Self],
        partials: Option<&mut [Self]>,
        want: (bool, bool),
        out: (bool, Epilogue<'_, Self>),
    ) -> layernorm_core::Result<()>;

    /// (Σe, Σe²) with e = (x − m)·s − ml.
    fn centered(x: &[Self], m: Self, s: Self, ml: Self) -> [f64; 2] {
        residual_sums(x, m, s, ml)
    }

    /// Normalizes `cur` into `y` while summing `next`'s residuals from `m_next` (bitwise equal to
    /// `centered(next, m_next, 1, 0)`); `None` where the type has no fused kernel.
    #[allow(clippy::too_many_arguments)]
    fn fused(
        _next: &[Self],
        _m_next: Self,
        _cur: &[Self],
        _st: &RowStats<Self>,
        _gamma: Option<&[Self]>,
        _beta: Option<&[Self]>,
        _y: &mut [Self],
        _stream: bool,
    ) -> Option<[f64; 2]> {
        None
    }

    /// The backward's second sweep over `cur` (dx, dγ/dβ terms) while summing the next row's
    /// first sweep (bitwise equal to `backward_sums` of it); `None` where there is no fused kernel.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn fused_backward(
        _next: (&[Self], &[Self], Self, Self),
        _x: &[Self],
        _dy: &[Self],
        _gamma: Option<&[Self]>,
        _p: &BackParams<Self>,
        _dx: &mut [Self],
        _dgamma: Option<&mut [Self]>,
        _dbeta: Option<&mut [Self]>,
    ) -> Option<[f64; 3]> {
        None
    }

    /// (Σd, Σg, Σg·d) with d = (x − m)·s, g = dy·γ.
    fn backward_sums(
        x: &[Self],
        dy: &[Self],
        gamma: Option<&[Self]>,
        m: Self,
        s: Self,
    ) -> [f64; 3] {
        backward_sums(x, dy, gamma, m, s)
    }
}

/// [`Real::staged_blocks`]: the same call for both accumulation types.
macro_rules! staged_blocks {
    () => {
        fn staged_blocks(
            kind: Kind,
            n: usize,
            rows: (&[Self], &[Self], &[Self], &[Self]),
            gamma: Option<&[Self]>,
            dx: &mut [Self],
            partials: Option<&mut [Self]>,
            want: (bool, bool),
            out: (bool, Epilogue<'_, Self>),
        ) -> layernorm_core::Result<()> {
            crate::simd::blocks::<Self>(kind, n, rows, gamma, dx, partials, want, out)
        }
    };
}

impl Real for f32 {
    #[inline(always)]
    fn of(v: f64) -> f32 {
        v as f32
    }
    staged_blocks!();
    fn long_min_n() -> usize {
        F32_LONG_MIN_N
    }
    fn shift(x: &[f32]) -> f32 {
        crate::reduce::shift(x)
    }
    fn rows(
        n: usize,
        spec: Spec,
        x: &[f32],
        gamma: Option<&[f32]>,
        beta: Option<&[f32]>,
        y: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        out: Out,
    ) {
        crate::reduce::rows(n, spec, x, gamma, beta, y, mean, rstd, out)
    }
    fn back_rows(
        kind: Kind,
        n: usize,
        x: &[f32],
        dy: &[f32],
        mean: &[f32],
        rstd: &[f32],
        gamma: Option<&[f32]>,
        dx: &mut [f32],
        dgamma: Option<&mut [f32]>,
        dbeta: Option<&mut [f32]>,
        stream: bool,
    ) {
        crate::reduce::back_rows(kind, n, x, dy, mean, rstd, gamma, dx, dgamma, dbeta, stream)
    }
    fn long(
        n: usize,
        spec: Spec,
        x: &[f32],
        gamma: Option<&[f32]>,
        beta: Option<&[f32]>,
        y: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        out: Out,
    ) -> bool {
        crate::reduce::long(n, spec, x, gamma, beta, y, mean, rstd, out);
        true
    }
    const EPILOGUE: bool = true;
    fn back_blocks(
        kind: Kind,
        n: usize,
        x: &[f32],
        dy: &[f32],
        mean: &[f32],
        rstd: &[f32],
        gamma: Option<&[f32]>,
        dx: &mut [f32],
        partials: Option<&mut [f32]>,
        want: (bool, bool),
        stream: bool,
        epi: Epilogue<'_, f32>,
    ) -> bool {
        let partials = crate::reduce::Partials { buf: partials, want };
        let rows = (x, dy, mean, rstd);
        if n < F32_BACK_LONG_MIN_N {
            crate::reduce::back_short_blocks(kind, n, rows, gamma, dx, partials, stream, epi);
        } else {
            crate::reduce::back_long(kind, n, rows, gamma, dx, partials, stream, epi);
        }
        true
    }
    fn back_columns(
        kind: Kind,
        n: usize,
        x: &[f32],
        dy: &[f32],
        mean: &[f32],
        rstd: &[f32],
        gamma: Option<&[f32]>,
        dx: &mut [f32],
        dgamma: Option<&mut [f32]>,
        dbeta: Option<&mut [f32]>,
    ) -> layernorm_core::Result<bool> {
        crate::columns::backward(kind, n, x, dy, mean, rstd, gamma, dx, dgamma, dbeta)?;
        Ok(true)
    }
    fn centered(x: &[f32], m: f32, s: f32, ml: f32) -> [f64; 2] {
        crate::reduce::centered(x, m, s, ml)
    }
    fn backward_sums(x: &[f32], dy: &[f32], gamma: Option<&[f32]>, m: f32, s: f32) -> [f64; 3] {
        crate::reduce::backward_sums(x, dy, gamma, m, s)
    }
    fn fused(
        next: &[f32],
        m_next: f32,
        cur: &[f32],
        st: &RowStats<f32>,
        gamma: Option<&[f32]>,
        beta: Option<&[f32]>,
        y: &mut [f32],
        stream: bool,
    ) -> Option<[f64; 2]> {
        Some(crate::reduce::fused(next, m_next, cur, st.params(), gamma, beta, y, stream))
    }
    fn fused_backward(
        next: (&[f32], &[f32], f32, f32),
        x: &[f32],
        dy: &[f32],
        gamma: Option<&[f32]>,
        p: &BackParams<f32>,
        dx: &mut [f32],
        dgamma: Option<&mut [f32]>,
        dbeta: Option<&mut [f32]>,
    ) -> Option<[f64; 3]> {
        Some(crate::reduce::fused_backward(next, x, dy, gamma, p, dx, dgamma, dbeta))
    }
}

impl Real for f64 {
    #[inline(always)]
    fn of(v: f64) -> f64 {
        v
    }
    staged_blocks!();
}

/// The short-row forward composed row by row from [`shift`], [`finish`] and [`normalize`]: the
/// portable default of [`Real::rows`], and what the `f32` kernel must reproduce bit for bit.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_portable<A: Real>(
    n: usize,
    spec: Spec,
    x: &[A],
    gamma: Option<&[A]>,
    beta: Option<&[A]>,
    y: &mut [A],
    mean: &mut [A],
    rstd: &mut [A],
) {
    let rows = x.chunks_exact(n).zip(y.chunks_exact_mut(n));
    for ((x, y), (mean, rstd)) in rows.zip(mean.iter_mut().zip(rstd.iter_mut())) {
        let m = shift(spec.kind, x);
        let st = finish(spec, x, m, A::centered(x, m, A::one(), A::zero()));
        normalize(x, &st, gamma, beta, y);
        *mean = A::of(st.mean);
        *rstd = A::of(st.rstd);
    }
}

/// The short-row backward composed row by row from [`back_params`] and [`back_apply`]: the
/// portable default of [`Real::back_rows`], and what the `f32` kernel must reproduce bit for bit.
#[allow(clippy::too_many_arguments)]
pub(crate) fn back_rows_portable<A: Real>(
    kind: Kind,
    n: usize,
    x: &[A],
    dy: &[A],
    mean: &[A],
    rstd: &[A],
    gamma: Option<&[A]>,
    dx: &mut [A],
    mut dgamma: Option<&mut [A]>,
    mut dbeta: Option<&mut [A]>,
) {
    let rows = x.chunks_exact(n).zip(dy.chunks_exact(n)).zip(dx.chunks_exact_mut(n));
    for (((x, dy), dx), (&mu, &rs)) in rows.zip(mean.iter().zip(rstd)) {
        let (dg, db) = (dgamma.as_deref_mut(), dbeta.as_deref_mut());
        back_row(kind, (x, dy), (mu.into(), rs.into()), gamma, dx, dg, db);
    }
}

/// The backward of one row from its saved statistics, composed from [`back_shift`], the sums,
/// [`back_params`] and [`back_apply`] — or, where its rstd [`needs_exact_row`],
/// [`back_exact_row`] — adding its dγ/dβ terms into `dgamma`/`dbeta`.
#[inline(always)]
pub(crate) fn back_row<A: Real>(
    kind: Kind,
    (x, dy): (&[A], &[A]),
    (mu, rs): (f64, f64),
    gamma: Option<&[A]>,
    dx: &mut [A],
    dgamma: Option<&mut [A]>,
    dbeta: Option<&mut [A]>,
) {
    if needs_exact_row(rs) {
        return back_exact_row(kind, x, dy, (mu, rs), gamma, dx, dgamma, dbeta);
    }
    let (m, s) = back_shift::<A>(mu, rs);
    let sums = A::backward_sums(x, dy, gamma, m, A::of(s));
    let p = back_params::<A>(kind, x.len(), mu, rs, sums);
    back_apply(x, dy, gamma, &p, dx, dgamma, dbeta);
}

/// Pairwise fold of the lanes (fixed order: deterministic).
#[inline(always)]
fn fold<A: Real>(mut v: [A; LANES]) -> A {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            v[l] = v[l] + v[l + w];
        }
    }
    v[0]
}

multiversioned! {
/// (Σe, Σe²) with e = (x − m)·s − ml: the residual sweep of the forward, portable version (used
/// for `f64`; `f32` uses the explicit SIMD of `reduce/`). A function of its own, multiversioned,
/// so that it is compiled with the target features rather than inlined into the large row code.
fn residual_sums<A: Real>(x: &[A], m: A, s: A, ml: A) -> [f64; 2] {
    let mut total = [0f64; 2];
    let (chunks, rest) = x.as_chunks::<LANES>();
    for group in chunks.chunks(BLOCK / LANES) {
        let mut acc = [A::zero(); 2 * LANES];
        for c in group {
            let mut d = [A::zero(); LANES];
            for l in 0..LANES {
                d[l] = (c[l] - m) * s - ml;
            }
            for l in 0..LANES {
                acc[l] = acc[l] + d[l];
                acc[LANES + l] = acc[LANES + l] + d[l] * d[l];
            }
        }
        let (a1, a2) = acc.split_at(LANES);
        total[0] += fold(a1.try_into().unwrap_or([A::zero(); LANES])).into();
        total[1] += fold(a2.try_into().unwrap_or([A::zero(); LANES])).into();
    }
    for &v in rest {
        let d = (v - m) * s - ml;
        total[0] += d.into();
        total[1] += (d * d).into();
    }
    total
}
}

/// Largest |x| of the row (NaN is ignored here; it propagates through the sums instead).
#[inline(always)]
pub(crate) fn max_abs<A: Real>(x: &[A]) -> f64 {
    x.iter().fold(A::zero(), |a, &v| a.max(v.abs())).into()
}

/// 2^e for e in the normal `f64` exponent range, built from the bits (no `powf` per row).
#[inline(always)]
fn pow2(e: i64) -> f64 {
    f64::from_bits(((e.clamp(-1022, 1023) + 1023) as u64) << 52)
}

/// The binary exponent of a finite, nonzero `v` (`floor(log2 |v|)` for normal values).
#[inline(always)]
fn exponent(v: f64) -> i64 {
    ((v.to_bits() >> 52) & 0x7ff) as i64 - 1023
}

/// A power of two `s` with `max_abs · s` in [1, 2), so that squares of scaled values neither
/// overflow nor fall below `A`'s normal range; bounded to what `A` holds (`f32`: 2^±126, which
/// still brings the smallest subnormal to 2^-23).
#[inline(always)]
fn pow2_below<A: Real>(max_abs: f64) -> f64 {
    let lim = exponent(A::max_value().into()) - 1;
    if max_abs.is_finite() && max_abs > 0.0 {
        pow2((-exponent(max_abs)).clamp(-lim, lim))
    } else {
        1.0
    }
}

/// A power of two within a factor 2 of `rstd`, so `(x − mean) · s` is of the size of x̂;
/// 1 when rstd is zero, not finite, or so extreme that `f32` could not hold the scale.
#[inline(always)]
fn rstd_scale(rstd: f64) -> f64 {
    if rstd.is_finite() && rstd > 0.0 { pow2(exponent(rstd).clamp(-120, 120)) } else { 1.0 }
}

/// The member of the family the per-row steps compute: whether rows are centred on their mean
/// (LayerNorm) or not (RMSNorm, mean and shift 0). The SIMD sweeps are the same for all; only
/// the scalar steps around them ([`shift`], [`finish`], [`back_params`]) look at it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `docs/math.md` (1)–(9).
    LayerNorm,
    /// `docs/math.md` (10)–(12).
    RmsNorm,
    /// The backward of a LayerNorm whose rows are x̂ itself, recovered from the output
    /// (`docs/math.md` (16), with a saved mean of 0 and an rstd of 1): c2 = mean(g) is
    /// subtracted as for [`Kind::LayerNorm`], but no mean is recovered from the rows — x̂ is
    /// used as recovered, which is what the from-y bound of `docs/numerics.md` assumes (a
    /// recovered x̂ centred again would move every element by the mean of the others' errors).
    /// Backward only.
    LayerNormFromY,
}

impl Kind {
    /// Whether the rows are centred on their mean: the forward's shift and statistics, and the
    /// backward's recovery of the exact mean from the rows and the saved one.
    #[inline(always)]
    pub(crate) fn centred(self) -> bool {
        self == Kind::LayerNorm
    }

    /// Whether the backward subtracts c2 = mean(g) (the gradient of the mean, `docs/math.md`
    /// (9)): the LayerNorm kinds.
    #[inline(always)]
    pub(crate) fn subtracts_mean(self) -> bool {
        self != Kind::RmsNorm
    }

    /// The kind of a backward from the output of this one (its rows are x̂ recovered from y).
    pub(crate) fn of_output(self) -> Kind {
        match self {
            Kind::RmsNorm => Kind::RmsNorm,
            Kind::LayerNorm | Kind::LayerNormFromY => Kind::LayerNormFromY,
        }
    }
}

/// What the forward's per-row statistics need besides the row: the kind and ε.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spec {
    pub kind: Kind,
    pub eps: f64,
}

impl Spec {
    /// A LayerNorm with `eps` (the unit tests' default).
    #[cfg(feature = "unit-tests")]
    pub(crate) fn ln(eps: f64) -> Spec {
        Spec { kind: Kind::LayerNorm, eps }
    }
}

/// Per-row statistics: (mean, rstd) in `f64`, plus the split mean used for centering.
#[derive(Clone, Copy, Debug)]
pub struct RowStats<A> {
    /// The centring point's leading part: the row's shift (see [`shift`]), or the shift plus
    /// the residual mean where that sum is exact in `A` (then `m_lo` is 0).
    pub m_hi: A,
    /// The residual mean, mean − m_hi, rounded to `A`.
    pub m_lo: A,
    /// The full mean, in `f64` (0 for RMSNorm).
    pub mean: f64,
    /// 1 / sqrt(var + eps) (LayerNorm), 1 / sqrt(mean(x²) + eps) (RMSNorm), in `f64`.
    pub rstd: f64,
}

impl<A: Real> RowStats<A> {
    /// The normalize sweep's constants (m_hi, m_lo, rstd in `A`).
    #[inline(always)]
    pub(crate) fn params(&self) -> (A, A, A) {
        (self.m_hi, self.m_lo, A::of(self.rstd))
    }
}

/// The forward's shift: the mean of the row's first elements, rounded to `A` (see the module
/// docs); 0 for RMSNorm, whose rows are not centred.
#[inline(always)]
pub(crate) fn shift<A: Real>(kind: Kind, x: &[A]) -> A {
    if kind.centred() { A::shift(x) } else { A::zero() }
}

/// Mean and rstd of one row (equations (1)–(3), (10) of `docs/math.md`), computed as the module
/// docs say. The kernels call [`shift`] and [`finish`] around their (possibly fused) sweeps;
/// this is the one-row composition, for the unit tests.
#[cfg(feature = "unit-tests")]
pub(crate) fn stats<A: Real>(spec: Spec, x: &[A]) -> RowStats<A> {
    let m_hi = shift(spec.kind, x);
    finish(spec, x, m_hi, A::centered(x, m_hi, A::one(), A::zero()))
}

/// Statistics from the residual sums `[Σd, Σd²]` around the shift `m_hi`, re-sweeping the row only
/// in the rare cases the module docs describe (overflow; squares below `A`'s normal range; a
/// shift far from the mean).
#[inline(always)]
pub(crate) fn finish<A: Real>(spec: Spec, x: &[A], m_hi: A, sums: [f64; 2]) -> RowStats<A> {
    let sweep = |s: A, ml: A| A::centered(x, m_hi, s, ml);
    finish_with(spec, x.len(), m_hi, sums, || max_abs(x), sweep)
}

/// [`finish`] of a row of `n` that the caller reaches through `max_abs` (its largest |x|) and
/// `sweep(s, ml)` (`A::centered(x, m_hi, s, ml)` of it, bitwise): kernels whose rows are not in
/// `A` (16-bit storage) sweep them where they lie, with no widened copy.
#[inline(always)]
pub(crate) fn finish_with<A: Real>(
    spec: Spec,
    n: usize,
    m_hi: A,
    sums: [f64; 2],
    max_abs: impl FnOnce() -> f64,
    mut sweep: impl FnMut(A, A) -> [f64; 2],
) -> RowStats<A> {
    let (rare, st) = common(spec, n, m_hi, sums);
    if !rare {
        return st;
    }
    let nf = n as f64;
    let mut s = 1.0;
    let [mut sd, mut sdd] = sums;
    let (_, var) = moments(spec.kind, nf, sd, sdd);
    if (!(sd.is_finite() && sdd.is_finite()) || var + spec.eps < tiny::<A>()) && m_hi.is_finite() {
        // Residuals or their squares overflowed, or squares may have fallen below `A`'s normal
        // range: scale them by a power of two (exact) that brings the largest |x| near 1.
        s = pow2_below::<A>(max_abs());
        [sd, sdd] = sweep(A::of(s), A::zero());
    }
    // Work in the scaled units d·s until the end.
    let (m_lo_s, mut var_s) = moments(spec.kind, nf, sd, sdd);
    if m_lo_s * m_lo_s > var_s.abs() * 0.25 {
        // The shift is far from the mean next to the spread (an outlying head, a row constant to
        // a few ulps): Σd²/N − m_lo² would cancel, so take the exact second pass instead.
        var_s = sweep(A::of(s), A::of(m_lo_s))[1] / nf;
    }
    if !sdd.is_finite() {
        // Still not finite at scale: an infinite element (a NaN row is NaN already).
        var_s = f64::NAN;
    }
    stats_of(m_hi, m_lo_s / s, var_s, s, spec.eps)
}

/// Squares of residuals below this (`A`'s smallest normal times 2^26) may have lost bits to
/// gradual underflow; where var + ε is below it, [`finish`] sweeps the row again, scaled.
#[inline(always)]
fn tiny<A: Real>() -> f64 {
    A::min_positive_value().into() * 67_108_864.0
}

/// (m_lo, var) from the sums of a row of `nf` elements: the residual mean and Σd²/N − m_lo²
/// (LayerNorm), or 0 and Σx²/N (RMSNorm: the "residuals" are x itself).
#[inline(always)]
fn moments(kind: Kind, nf: f64, sd: f64, sdd: f64) -> (f64, f64) {
    if kind.centred() {
        let m_lo = sd / nf;
        (m_lo, sdd / nf - m_lo * m_lo)
    } else {
        (0.0, sdd / nf)
    }
}

/// The statistics [`finish`] returns, from the shift, the residual mean and the variance (or
/// mean square) taken at scale `s`: rstd = s / √(var_s + ε·s²), exact in scaling, 1/√ε where
/// the variance is 0 or ε·s² overflows (var is then below ε by more than `f64`'s precision). The centring point is
/// kept as one value where m_hi + m_lo is exact in `A`: a constant row then normalizes to
/// exactly 0 (x − m_hi = 0), where fma(x − m_hi, r, −(m_lo·r)) kept the rounding of m_lo·r.
#[inline(always)]
fn stats_of<A: Real>(m_hi: A, m_lo: f64, var_s: f64, s: f64, eps: f64) -> RowStats<A> {
    // Clamp rounding below zero, but let NaN through (a NaN row stays NaN).
    let var_s = if var_s < 0.0 { 0.0 } else { var_s };
    let es = eps * s * s;
    // A zero variance is 1/√ε whatever the scale (ε·s² may have lost bits below `f64`'s range
    // for a subnormal ε); ε·s² past `f64`'s range is var below ε by more than its precision.
    let rstd =
        if var_s != 0.0 && es.is_finite() { s / (var_s + es).sqrt() } else { 1.0 / eps.sqrt() };
    let mean = m_hi.into() + m_lo;
    let ml = A::of(m_lo);
    let t = m_hi + ml;
    let exact = t.is_finite() && t - m_hi == ml && t - ml == m_hi;
    let (m_hi, m_lo) = if exact { (t, A::zero()) } else { (m_hi, ml) };
    RowStats { m_hi, m_lo, mean, rstd }
}

/// [`finish`] without the row, for its common case (sums finite, no underflow, shift near the
/// mean): `(true, _)` where it needs the row again (the statistics are then meaningless). The
/// same operations as [`finish`] with s = 1, in straight-line code that runs in lanes across
/// rows (`reduce::forward::Group`).
#[inline(always)]
pub(crate) fn common<A: Real>(
    spec: Spec,
    n: usize,
    m_hi: A,
    [sd, sdd]: [f64; 2],
) -> (bool, RowStats<A>) {
    let (m_lo, var) = moments(spec.kind, n as f64, sd, sdd);
    let overflow = !(sd.is_finite() && sdd.is_finite()) && m_hi.is_finite();
    let rare = overflow || m_lo * m_lo > var.abs() * 0.25 || var + spec.eps < tiny::<A>();
    (rare, stats_of(m_hi, m_lo, var, 1.0, spec.eps))
}

/// [`common`] as an `Option`: `None` where [`finish`] needs the row again.
#[inline(always)]
pub(crate) fn finish_common<A: Real>(
    spec: Spec,
    n: usize,
    m_hi: A,
    sums: [f64; 2],
) -> Option<RowStats<A>> {
    let (rare, st) = common(spec, n, m_hi, sums);
    (!rare).then_some(st)
}

/// Forward of one row: y = ((x − m_hi) − m_lo) · rstd · γ + β. Returns (mean, rstd). For the unit
/// tests; the kernels run the pipelined loop of `simd.rs`.
#[cfg(feature = "unit-tests")]
pub(crate) fn forward<A: Real>(
    x: &[A],
    gamma: Option<&[A]>,
    beta: Option<&[A]>,
    y: &mut [A],
    spec: Spec,
) -> (f64, f64) {
    let st = stats(spec, x);
    normalize(x, &st, gamma, beta, y);
    (st.mean, st.rstd)
}

/// y = x̂·γ + β for one row, x̂ = (x − m_hi)·rstd − m_lo·rstd, in fused multiply-adds:
/// x̂ = fma(x − m_hi, rstd, −(m_lo·rstd)), y = fma(x̂, γ, β) (one rounding per step).
#[inline(always)]
pub(crate) fn normalize<A: Real>(
    x: &[A],
    st: &RowStats<A>,
    gamma: Option<&[A]>,
    beta: Option<&[A]>,
    y: &mut [A],
) {
    let (m_hi, m_lo, r) = st.params();
    let (m_hi, nml) = (m_hi, -(m_lo * r));
    let xhat = |v: A| (v - m_hi).mul_add(r, nml);
    match (gamma, beta) {
        (Some(g), Some(b)) => {
            for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(g).zip(b) {
                *y = xhat(x).mul_add(g, b);
            }
        }
        (Some(g), None) => {
            for ((y, &x), &g) in y.iter_mut().zip(x).zip(g) {
                *y = xhat(x) * g;
            }
        }
        (None, Some(b)) => {
            for ((y, &x), &b) in y.iter_mut().zip(x).zip(b) {
                *y = xhat(x) + b;
            }
        }
        (None, None) => {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = xhat(x);
            }
        }
    }
}

multiversioned! {
/// The backward's reduction sweep: (Σd, Σg, Σg·d) with d = (x − m)·s, g = dy·γ. Multiversioned
/// on its own, like [`residual_sums`].
fn backward_sums<A: Real>(x: &[A], dy: &[A], gamma: Option<&[A]>, m: A, sa: A) -> [f64; 3] {
    let n = x.len();
    let (xc, xr) = x.as_chunks::<LANES>();
    let (dc, dr) = dy[..n].as_chunks::<LANES>();
    let mut tot = [0f64; 3];
    let group = BLOCK / LANES;
    match gamma {
        Some(g) => {
            let (gc, _) = g[..n].as_chunks::<LANES>();
            for ((xg, dg), gg) in xc.chunks(group).zip(dc.chunks(group)).zip(gc.chunks(group)) {
                backward_lanes(&mut tot, xg, dg, Some(gg), m, sa);
            }
        }
        None => {
            for (xg, dg) in xc.chunks(group).zip(dc.chunks(group)) {
                backward_lanes(&mut tot, xg, dg, None, m, sa);
            }
        }
    }
    let base = n - xr.len();
    for (j, (&xv, &dv)) in xr.iter().zip(dr).enumerate() {
        let d = (xv - m) * sa;
        let g = gamma.map_or(dv, |g| dv * g[base + j]);
        tot[0] += d.into();
        tot[1] += g.into();
        tot[2] += (g * d).into();
    }
    tot
}
}

/// One block of [`backward_sums`], in lanes. A plain function (not a closure) so that it is
/// inlined into, and compiled with the target features of, the multiversioned caller.
#[inline(always)]
fn backward_lanes<A: Real>(
    tot: &mut [f64; 3],
    xg: &[[A; LANES]],
    dg: &[[A; LANES]],
    gg: Option<&[[A; LANES]]>,
    m: A,
    sa: A,
) {
    let (mut sd, mut sg, mut sgd) = ([A::zero(); LANES], [A::zero(); LANES], [A::zero(); LANES]);
    for (i, (xc, dc)) in xg.iter().zip(dg).enumerate() {
        let (mut d, mut g) = ([A::zero(); LANES], *dc);
        for l in 0..LANES {
            d[l] = (xc[l] - m) * sa;
        }
        if let Some(gg) = gg {
            for l in 0..LANES {
                g[l] = g[l] * gg[i][l];
            }
        }
        for l in 0..LANES {
            sd[l] = sd[l] + d[l];
        }
        for l in 0..LANES {
            sg[l] = sg[l] + g[l];
        }
        for l in 0..LANES {
            sgd[l] = sgd[l] + g[l] * d[l];
        }
    }
    tot[0] += fold(sd).into();
    tot[1] += fold(sg).into();
    tot[2] += fold(sgd).into();
}

/// What the backward kernels do to a row's dx before they store it, for the staged variants
/// (`crate::driver`): dx = s·dx + h in one fused multiply-add, s the row's `scale` (1 where
/// absent: the saved rstd of a backward from y, whose kernels are given an rstd of 1) and h the
/// row's dh (`zeros` where absent). Off (the plain backward) when neither is given.
#[derive(Clone, Copy, Debug)]
pub struct Epilogue<'a, A> {
    /// Per row: s.
    pub scale: Option<&'a [A]>,
    /// Rows of n: dh.
    pub dh: Option<&'a [A]>,
    /// A row of n zeros: h where there is no dh.
    pub zeros: &'a [A],
}

impl<A> Default for Epilogue<'_, A> {
    /// Off.
    fn default() -> Self {
        Epilogue { scale: None, dh: None, zeros: &[] }
    }
}

impl<'a, A: Real> Epilogue<'a, A> {
    /// Whether dx is changed at all.
    #[inline(always)]
    pub(crate) fn on(&self) -> bool {
        self.scale.is_some() || self.dh.is_some()
    }

    /// Row `r`'s (s, h) of rows of `n`, where the epilogue is on.
    #[inline(always)]
    pub(crate) fn row(&self, r: usize, n: usize) -> Option<(A, &'a [A])> {
        if !self.on() {
            return None;
        }
        let s = self.scale.map_or(A::one(), |s| s[r]);
        let h = match self.dh {
            Some(h) => &h[r * n..(r + 1) * n],
            None => &self.zeros[..n],
        };
        Some((s, h))
    }

    /// The epilogue of rows `rows` (of `n`) on their own.
    #[inline(always)]
    pub(crate) fn rows(&self, rows: core::ops::Range<usize>, n: usize) -> Epilogue<'a, A> {
        Epilogue {
            scale: self.scale.map(|s| &s[rows.clone()]),
            dh: self.dh.map(|h| &h[rows.start * n..rows.end * n]),
            zeros: self.zeros,
        }
    }
}

/// The per-row constants of the backward's second sweep: x̂ = (x − m)·a + nml and
/// dx = a·g + (x̂·c + b) (g = dy·γ), each as fused multiply-adds (one rounding each).
#[derive(Clone, Copy, Debug, Default)]
pub struct BackParams<A> {
    /// The saved mean, rounded to `A` (the centering shift).
    pub m: A,
    /// The power-of-two scale of the residuals in the first sweep's sums.
    pub sa: A,
    /// −(exact mean − m)·rstd: x̂'s constant term.
    pub nml: A,
    /// rstd.
    pub a: A,
    /// −rstd·c2.
    pub b: A,
    /// −rstd·c1.
    pub c: A,
}

/// [`back_shift`] of an `f32` row from its saved `f32` statistics, both parts as the `f32`
/// constants the sums sweep uses.
#[inline(always)]
pub(crate) fn back_shift_f32(mean_saved: f32, rstd: f32) -> (f32, f32) {
    let (m, s) = back_shift::<f32>(f64::from(mean_saved), f64::from(rstd));
    (m, s as f32)
}

/// The centering shift and scale of a backward row: (m, s).
#[inline(always)]
pub(crate) fn back_shift<A: Real>(mean_saved: f64, rstd: f64) -> (A, f64) {
    (A::of(mean_saved), rstd_scale(rstd))
}

/// The constants of the second sweep from the first sweep's sums (equations (8)–(9), (12)):
/// for RMSNorm the saved "mean" is 0 and neither a residual mean nor c2 is formed; from y
/// ([`Kind::LayerNormFromY`]) c2 is formed and no residual mean.
#[inline(always)]
pub(crate) fn back_params<A: Real>(
    kind: Kind,
    n: usize,
    mean_saved: f64,
    rstd: f64,
    sums: [f64; 3],
) -> BackParams<A> {
    let nf = n as f64;
    let (m, s) = back_shift::<A>(mean_saved, rstd);
    let [sd, sg, sgd] = sums;
    // The exact mean's distance from the saved one, scaled like d.
    let m_lo = if kind.centred() { sd / nf } else { 0.0 };
    let r = rstd / s;
    let c2 = if kind.subtracts_mean() { sg / nf } else { 0.0 };
    let c1 = (sgd - m_lo * sg) / nf * r;
    // dx = rstd·g − rstd·c2 − x̂·(rstd·c1), x̂ = (x − m)·rstd − m_lo·r (m_lo·r is the exact
    // mean's distance from m times rstd: m_lo is in the scaled units of d, r = rstd / s).
    BackParams {
        m,
        sa: A::of(s),
        nml: A::of(-m_lo * r),
        a: A::of(rstd),
        b: A::of(-rstd * c2),
        c: A::of(-rstd * c1),
    }
}

/// The backward's second sweep over one row: dx, and this row's dγ/dβ terms.
#[inline(always)]
pub(crate) fn back_apply<A: Real>(
    x: &[A],
    dy: &[A],
    gamma: Option<&[A]>,
    p: &BackParams<A>,
    dx: &mut [A],
    dgamma: Option<&mut [A]>,
    dbeta: Option<&mut [A]>,
) {
    let BackParams { m, nml, a, b, c, .. } = *p;
    let xhat = |v: A| (v - m).mul_add(a, nml);
    // One sweep writes dx and accumulates this row's dγ/dβ terms. Re-slicing every operand to
    // the row length lets the compiler drop the bounds checks and vectorize.
    let n = x.len();
    let (dy, dx) = (&dy[..n], &mut dx[..n]);
    let gamma = gamma.map(|g| &g[..n]);
    let g1 = |j: usize| gamma.map_or(A::one(), |g| g[j]);
    match (dgamma.map(|d| &mut d[..n]), dbeta.map(|d| &mut d[..n])) {
        (Some(dg), Some(db)) => {
            for j in 0..x.len() {
                let xh = xhat(x[j]);
                dx[j] = a.mul_add(dy[j] * g1(j), xh.mul_add(c, b));
                dg[j] = dy[j].mul_add(xh, dg[j]);
                db[j] = db[j] + dy[j];
            }
        }
        (Some(dg), None) => {
            for j in 0..x.len() {
                let xh = xhat(x[j]);
                dx[j] = a.mul_add(dy[j] * g1(j), xh.mul_add(c, b));
                dg[j] = dy[j].mul_add(xh, dg[j]);
            }
        }
        (None, Some(db)) => {
            for j in 0..x.len() {
                dx[j] = a.mul_add(dy[j] * g1(j), xhat(x[j]).mul_add(c, b));
                db[j] = db[j] + dy[j];
            }
        }
        (None, None) => {
            for j in 0..x.len() {
                dx[j] = a.mul_add(dy[j] * g1(j), xhat(x[j]).mul_add(c, b));
            }
        }
    }
}

/// Whether a backward row's saved rstd is beyond what the distributed form of the second sweep
/// (dx = rstd·g − rstd·c2 − x̂·rstd·c1) can evaluate in the accumulation type: above 2^63 its
/// products overflow from |g| ≈ 2^65 on (`f32`), and +inf (ε below ~1e-77 on a constant row)
/// would make 0·∞; below `f32`'s smallest normal (ε or var + ε above 2^252) every product with
/// it is a subnormal that keeps only some of its bits. Such rows are computed by
/// [`back_exact_row`] instead. (A NaN rstd is neither: the kernels carry it.)
#[inline(always)]
pub(crate) fn needs_exact_row(rstd: f64) -> bool {
    rstd > 9_223_372_036_854_775_808.0 || rstd < f64::from(f32::MIN_POSITIVE)
}

/// x̂ = d·rstd with the convention of the f64 formula at a finite rstd: an exact 0 stays 0 (a
/// constant row normalizes to 0 even where rstd rounded to +inf).
#[inline(always)]
fn times(d: f64, rstd: f64) -> f64 {
    if d == 0.0 { 0.0 } else { d * rstd }
}

/// The backward of one row whose rstd [`needs_exact_row`], in `f64` in the undistributed form
/// of `docs/math.md` (8)–(9), (12): x̂ = (x − mean − m_lo)·rstd, dx = rstd·(g − c2 − x̂·c1),
/// each 0 where its factor other than rstd is exactly 0, rounded once to `A`; the row's dγ/dβ
/// terms added into the partials as [`back_apply`] adds them (x̂ rounded to `A`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn back_exact_row<A: Real>(
    kind: Kind,
    x: &[A],
    dy: &[A],
    (mean, rstd): (f64, f64),
    gamma: Option<&[A]>,
    dx: &mut [A],
    dgamma: Option<&mut [A]>,
    dbeta: Option<&mut [A]>,
) {
    let n = x.len();
    let nf = n as f64;
    let (dy, dx) = (&dy[..n], &mut dx[..n]);
    let d = |j: usize| x[j].into() - mean;
    let m_lo = if kind.centred() { (0..n).map(d).sum::<f64>() / nf } else { 0.0 };
    let xhat = |j: usize| times(d(j) - m_lo, rstd);
    let g = |j: usize| dy[j].into() * gamma.map_or(1.0, |g| g[j].into());
    let c1 = (0..n).map(|j| g(j) * xhat(j)).sum::<f64>() / nf;
    let c2 = if kind.subtracts_mean() { (0..n).map(g).sum::<f64>() / nf } else { 0.0 };
    for j in 0..n {
        dx[j] = A::of(times(g(j) - c2 - xhat(j) * c1, rstd));
    }
    if let Some(dg) = dgamma {
        for j in 0..n {
            dg[j] = dy[j].mul_add(A::of(xhat(j)), dg[j]);
        }
    }
    if let Some(db) = dbeta {
        for j in 0..n {
            db[j] = db[j] + dy[j];
        }
    }
}

/// The forward of one row whose rstd overflows the accumulation type (saved as +inf: var + ε
/// below ~8.6e-78 with `f32` accumulation), in `f64`: the row's statistics as the reference
/// takes them ([`layernorm_core::reference`]), x̂ = (x − μ)·rstd with an exact 0 kept 0, and y
/// rounded once. A constant row gives y = β.
pub(crate) fn forward_exact_row<A: Real>(
    spec: Spec,
    x: &[f64],
    gamma: Option<&[A]>,
    beta: Option<&[A]>,
    mut y: impl FnMut(usize, f64),
) {
    use layernorm_core::reference::{rms_row_rstd, row_stats};
    let (mean, rstd) = match spec.kind.centred() {
        true => row_stats(x, spec.eps),
        false => (0.0, rms_row_rstd(x, spec.eps)),
    };
    for (j, &v) in x.iter().enumerate() {
        let xhat = times(v - mean, rstd);
        y(j, xhat * gamma.map_or(1.0, |g| g[j].into()) + beta.map_or(0.0, |b| b[j].into()));
    }
}

#[cfg(feature = "unit-tests")]
#[doc(hidden)]
pub mod tests {
    use super::*;

    pub fn sums_are_exact_on_integers() {
        let x: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let [s, s2] = residual_sums(&x, 0.0, 1.0, 0.0);
        assert_eq!(s, 499_500.0);
        assert_eq!(s2, (0..1000u64).map(|i| i * i).sum::<u64>() as f64);
    }

    pub fn large_mean_is_exact_in_f32() {
        // mean 1e6, std ~1: f32 ulp at 1e6 is 0.0625, so a rounded mean would be off by up to 3%.
        let x: Vec<f32> = (0..1024).map(|i| 1e6 + ((i * 37 % 101) as f32 - 50.0) / 29.0).collect();
        let xf: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let (mean, rstd) = layernorm_core::reference::row_stats(&xf, 1e-5);
        let st = stats(Spec::ln(1e-5), &x);
        assert!((st.mean - mean).abs() < 1e-9 * mean, "{} vs {mean}", st.mean);
        assert!((st.rstd - rstd).abs() < 2e-7 * rstd, "{} vs {rstd}", st.rstd);
    }

    pub fn huge_magnitudes_do_not_overflow() {
        let x: Vec<f32> = (0..100).map(|i| if i % 2 == 0 { 3e37 } else { -1e38 }).collect();
        let xf: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let (mean, rstd) = layernorm_core::reference::row_stats(&xf, 1e-5);
        let st = stats(Spec::ln(1e-5), &x);
        assert!((st.mean - mean).abs() <= 1e-6 * mean.abs());
        assert!((st.rstd - rstd).abs() <= 1e-6 * rstd, "{} vs {rstd}", st.rstd);
    }

    pub fn constant_rows_normalize_to_exactly_zero() {
        for v in [0.1f32, 3.25, -1.5e6, 7e-30] {
            let x = vec![v; 1000];
            let mut y = vec![1.0f32; 1000];
            let (mean, _) = forward(&x, None, None, &mut y, Spec::ln(1e-12));
            assert_eq!(mean, v as f64);
            assert!(y.iter().all(|&y| y == 0.0), "{v}");
        }
    }

    pub fn powers_of_two_from_bits() {
        assert_eq!(pow2(0), 1.0);
        assert_eq!(pow2(-3), 0.125);
        assert_eq!(exponent(1e30), 99);
        assert_eq!(pow2_below::<f32>(3e37) * 3e37, 3e37 / 2f64.powi(124));
        // The smallest subnormal is brought up as far as f32 can scale: to 2^-23.
        assert_eq!(pow2_below::<f32>(f64::from(f32::from_bits(1))), 2f64.powi(126));
        assert_eq!(pow2_below::<f64>(1e-320), 2f64.powi(1022));
        assert_eq!(rstd_scale(0.3), 0.25);
        assert_eq!(rstd_scale(f64::INFINITY), 1.0);
        assert_eq!(rstd_scale(1e-300), 2f64.powi(-120));
    }

    pub fn a_nan_row_stays_nan() {
        let mut x = vec![1.0f32; 40];
        x[7] = f32::NAN;
        let st = stats(Spec::ln(1e-5), &x);
        assert!(st.mean.is_nan() && st.rstd.is_nan());
    }
}
