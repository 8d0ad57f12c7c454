//! The elementwise steps around the kernels that the fused residual forward and the backward
//! from y or with dh stage rows with (`crate::driver` runs them on chunks of rows that stay in
//! cache, and the kernels unchanged on the staged rows):
//!
//! - [`add`]: h = x + residual, rounded once to the storage type (`docs/math.md` (14)). `f32`
//!   and `f64` add in their own type; `f16`/`bf16` values are widened to `f32` (exactly), added
//!   there and rounded to the storage type: `f32` carries more than twice their precision plus
//!   two bits (24 ≥ 2·11 + 2), so rounding the `f32` sum again gives the correctly rounded sum
//!   (the double rounding is innocuous for an addition), as the reference's exact sum rounded
//!   once.
//! - [`recover`]: x̂ = (y − β)·(1/γ_eff) in the accumulation type (`docs/math.md` (16)); a
//!   division where a column's reciprocal would leave the normal range. The `f32` kernels
//!   recover x̂ in registers as they read y, with the same operations (`crate::reduce::Recover`);
//!   rows are staged here for the other types, and for a call where some column divides.
//! - [`finish`]: dx = s·dx' + dh as one fused multiply-add in the accumulation type, rounded
//!   once to the storage type (`docs/math.md` (15); s is the row's rstd from y, where the
//!   kernels computed dx' = dx/rstd, else 1).
//! - [`copy_out`]: a staged chunk written out, streamed where asked and the type allows.
//!
//! Written once, generically, in loops the compiler vectorizes, and compiled per instruction
//! set here (`multiversion`), like `simd.rs`.

use crate::isa::multiversioned;
use num_traits::{One, Zero};

use crate::element::CpuElement;
use crate::row::Real;

/// Elements per piece of a 16-bit row widened on the stack.
const PIECE: usize = 256;

multiversioned! {
/// h = x + residual, rounded once to `T` (see the module docs); with `residual` absent, `h`
/// holds the residual on entry (in place).
pub(crate) fn add<T: CpuElement>(x: &[T], residual: Option<&[T]>, h: &mut [T]) {
    let len = x.len().min(h.len());
    let (x, h) = (&x[..len], &mut h[..len]);
    if let (Some(xa), Some(ha)) = (T::as_acc(x), T::as_acc_mut(h)) {
        match residual.and_then(T::as_acc) {
            Some(r) => {
                let r = &r[..len];
                for j in 0..len {
                    ha[j] = xa[j] + r[j];
                }
            }
            None => {
                for j in 0..len {
                    ha[j] = xa[j] + ha[j];
                }
            }
        }
        return;
    }
    let zero = T::Acc::zero();
    let (mut a, mut b) = ([zero; PIECE], [zero; PIECE]);
    for start in (0..len).step_by(PIECE) {
        let end = (start + PIECE).min(len);
        let (a, b) = (&mut a[..end - start], &mut b[..end - start]);
        T::widen(&x[start..end], a);
        match residual {
            Some(r) => T::widen(&r[start..end], b),
            None => T::widen(&h[start..end], b),
        }
        for (a, &b) in a.iter_mut().zip(&*b) {
            *a = *a + b;
        }
        T::narrow(a, &mut h[start..end]);
    }
}
}

/// How [`recover`] divides by γ_eff: by multiplying with its reciprocal (`inverse` holds
/// 1/γ_eff), or, where some column's γ_eff or reciprocal is outside the accumulation type's
/// normal range (where the reciprocal loses bits or overflows), by dividing (`inverse` holds
/// γ_eff).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gamma<'a, A> {
    pub(crate) values: &'a [A],
    pub(crate) divide: bool,
}

/// The [`Gamma`] of the effective γ `gamma` (nonzero in every column, which the caller has
/// checked), into `scratch` where the reciprocals are formed.
pub(crate) fn gamma_of<'a, A: Real>(
    gamma: &'a [A],
    scratch: &'a mut Vec<A>,
) -> layernorm_core::Result<Gamma<'a, A>> {
    let normal = |v: A| v.is_normal();
    if gamma.iter().all(|&g| normal(g) && normal(A::one() / g)) {
        *scratch = layernorm_core::try_zeroed_vec("1/gamma", gamma.len())?;
        for (r, &g) in scratch.iter_mut().zip(gamma) {
            *r = A::one() / g;
        }
        return Ok(Gamma { values: scratch, divide: false });
    }
    Ok(Gamma { values: gamma, divide: true })
}

multiversioned! {
/// x̂ of `y`'s rows of `n` into `out` (same length), in the accumulation type: (y − β)·(1/γ_eff)
/// (β = 0 where absent; γ_eff = 1 where there is no γ). See [`Gamma`].
pub(crate) fn recover<T: CpuElement>(
    n: usize,
    y: &[T],
    beta: Option<&[T::Acc]>,
    gamma: Option<Gamma<'_, T::Acc>>,
    out: &mut [T::Acc],
) {
    if n == 0 {
        return;
    }
    let b = beta.map_or(&[][..], |b| &b[..n]);
    let g = gamma.map_or(&[][..], |g| &g.values[..n]);
    let divide = gamma.is_some_and(|g| g.divide);
    for (yr, o) in y.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        T::widen(yr, o);
        match (beta.is_some(), gamma.is_some(), divide) {
            (true, true, false) => xhat::<T::Acc, true, true, false>(o, b, g),
            (true, true, true) => xhat::<T::Acc, true, true, true>(o, b, g),
            (false, true, false) => xhat::<T::Acc, false, true, false>(o, b, g),
            (false, true, true) => xhat::<T::Acc, false, true, true>(o, b, g),
            (true, false, _) => xhat::<T::Acc, true, false, false>(o, b, g),
            (false, false, _) => {}
        }
    }
}
}

/// One row of [`recover`], in place: `B` β present, `G` γ present, `D` divide by γ.
#[inline(always)]
fn xhat<A: Real, const B: bool, const G: bool, const D: bool>(row: &mut [A], b: &[A], g: &[A]) {
    let n = row.len();
    let (b, g) = (if B { &b[..n] } else { b }, if G { &g[..n] } else { g });
    for j in 0..n {
        let mut v = row[j];
        if B {
            v = v - b[j];
        }
        if G {
            v = if D { v / g[j] } else { v * g[j] };
        }
        row[j] = v;
    }
}

multiversioned! {
/// dx of rows of `n` from the kernels' `dxk` (in the accumulation type): per row r,
/// s·dxk + dh in one fused multiply-add, s = `scale[r]` (1 where absent), dh = 0 where absent,
/// rounded once to `T`, written to `dx` in the same pass (or, with `stream` where the type
/// streams, formed in `dxk` and streamed out: [`copy_out`]). Where s is infinite (the rstd of a
/// row whose variance and ε both vanish in the accumulation type) an exact 0 of dxk stays 0, as
/// in the kernels' exact rows.
pub(crate) fn finish<T: CpuElement>(
    n: usize,
    dxk: &mut [T::Acc],
    scale: Option<&[T::Acc]>,
    dh: Option<&[T]>,
    dx: &mut [T],
    stream: bool,
) {
    if n == 0 {
        return;
    }
    let rows = dxk.len() / n;
    let one = T::Acc::one();
    let direct = T::as_acc_mut(dx).is_some();
    let (mut piece, mut out) = ([T::Acc::zero(); PIECE], [T::Acc::zero(); PIECE]);
    for r in 0..rows {
        let s = scale.map_or(one, |s| s[r]);
        let span = r * n..(r + 1) * n;
        let d = &mut dxk[span.clone()];
        let h = dh.map(|h| &h[span.clone()]);
        match T::as_acc_mut(&mut dx[span.clone()]) {
            Some(o) if !stream => epilogue(d, h.and_then(T::as_acc), s, o),
            Some(_) => {
                // Formed in place, streamed out below.
                for (d, h) in d.chunks_mut(PIECE).zip(pieces(h.and_then(T::as_acc), PIECE)) {
                    let o = &mut out[..d.len()];
                    epilogue(d, h, s, o);
                    d.copy_from_slice(o);
                }
            }
            None => {
                // 16-bit: dh widened and dx rounded a piece at a time.
                let dxr = &mut dx[span];
                for (k, d) in d.chunks(PIECE).enumerate() {
                    let at = k * PIECE..k * PIECE + d.len();
                    let hp = h.map(|h| {
                        T::widen(&h[at.clone()], &mut piece[..d.len()]);
                        &piece[..d.len()]
                    });
                    epilogue(d, hp, s, &mut out[..d.len()]);
                    T::narrow(&out[..d.len()], &mut dxr[at]);
                }
            }
        }
    }
    if direct && stream {
        copy_out(dxk, dx, true);
    }
}
}

/// `h` in pieces of `len` (or `None`s, as many as needed).
#[inline(always)]
fn pieces<A>(h: Option<&[A]>, len: usize) -> impl Iterator<Item = Option<&[A]>> {
    let chunks = h.map(|h| h.chunks(len));
    let mut chunks = chunks.into_iter().flatten();
    let some = h.is_some();
    std::iter::from_fn(move || if some { chunks.next().map(Some) } else { Some(None) })
}

/// out = s·d + h (one fused multiply-add; s·d without h), an exact 0 of d kept 0 (then h)
/// where s is infinite.
#[inline(always)]
fn epilogue<A: Real>(d: &[A], h: Option<&[A]>, s: A, out: &mut [A]) {
    let n = out.len();
    let d = &d[..n];
    match (h.map(|h| &h[..n]), s.is_finite()) {
        (Some(h), true) => {
            for j in 0..n {
                out[j] = s.mul_add(d[j], h[j]);
            }
        }
        (Some(h), false) => {
            for j in 0..n {
                out[j] = if d[j].is_zero() { h[j] } else { s.mul_add(d[j], h[j]) };
            }
        }
        (None, true) => {
            for j in 0..n {
                out[j] = s * d[j];
            }
        }
        (None, false) => {
            for j in 0..n {
                out[j] = if d[j].is_zero() { d[j] } else { s * d[j] };
            }
        }
    }
}

/// `dst = src` rounded to `T` (or copied, where `T` is the accumulation type): with `stream`,
/// whole cache lines of `dst` are written with streaming stores where the type allows
/// (`f32`, `f64`: `crate::reduce::stream_copy`; the 16-bit types are written with ordinary
/// stores, as their kernels write).
#[inline(always)]
pub(crate) fn copy_out<T: CpuElement>(src: &[T::Acc], dst: &mut [T], stream: bool) {
    match T::as_acc_mut(dst) {
        Some(d) => copy_same(src, d, stream),
        None => T::narrow(src, dst),
    }
}

/// `dst = src`, streamed with `stream` where `T`'s slices are whole `f32`s (`f32`, `f64`).
#[inline(always)]
pub(crate) fn copy_same<T: bytemuck::Pod>(src: &[T], dst: &mut [T], stream: bool) {
    let len = src.len().min(dst.len());
    let (src, dst) = (&src[..len], &mut dst[..len]);
    if stream
        && let (Ok(s), Ok(d)) =
            (bytemuck::try_cast_slice::<T, f32>(src), bytemuck::try_cast_slice_mut::<T, f32>(dst))
    {
        return crate::reduce::stream_copy(s, d);
    }
    dst.copy_from_slice(src);
}

#[cfg(feature = "unit-tests")]
#[doc(hidden)]
pub mod tests {
    use super::*;
    use layernorm_core::{DType, Element, bf16, f16};

    /// Every `k`-th pair of 16-bit bit patterns (all signs, subnormals, infinities, NaN).
    fn pairs<T: CpuElement>(k: u32) -> (Vec<T>, Vec<T>) {
        let (mut x, mut r) = (Vec::new(), Vec::new());
        for a in (0..=u16::MAX as u32).step_by(k as usize) {
            for b in (0..=u16::MAX as u32).step_by(k as usize + 7) {
                x.push(bytemuck::cast::<u16, T>(a as u16));
                r.push(bytemuck::cast::<u16, T>(b as u16));
            }
        }
        (x, r)
    }

    fn same<T: Element>(a: T, b: T) -> bool {
        let (a, b) = (T::to_f64(a), T::to_f64(b));
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    fn sums_are_correctly_rounded<T: CpuElement>(dtype: DType) {
        let (x, r) = pairs::<T>(97);
        let want: Vec<T> = x
            .iter()
            .zip(&r)
            .map(|(&a, &b)| T::from_f64(dtype.round(T::to_f64(a) + T::to_f64(b))))
            .collect();
        let mut h = vec![T::from_f64(0.0); x.len()];
        add(&x, Some(&r), &mut h);
        let bad = h.iter().zip(&want).position(|(&a, &b)| !same(a, b));
        assert!(bad.is_none(), "{dtype}: first difference at {bad:?}");
        let mut inplace = r.clone();
        add(&x, None, &mut inplace);
        assert!(inplace.iter().zip(&want).all(|(&a, &b)| same(a, b)), "{dtype} in place");
    }

    pub fn sixteen_bit_sums_are_the_exact_sums_rounded_once() {
        sums_are_correctly_rounded::<f16>(DType::F16);
        sums_are_correctly_rounded::<bf16>(DType::BF16);
    }

    pub fn finish_adds_dh_in_one_rounding_and_keeps_exact_zeros_of_infinite_scales() {
        let n = 3;
        let mut dxk = vec![1.5f32, 0.0, -2.0, 1.0, 1.0, 1.0];
        let dh = [0.25f32, 0.5, 1.0, 3.0, 3.0, 3.0];
        let scale = [f32::INFINITY, 2.0];
        let mut dx = [0f32; 6];
        finish(n, &mut dxk, Some(&scale), Some(&dh), &mut dx, false);
        assert_eq!(dx, [f32::INFINITY, 0.5, f32::NEG_INFINITY, 5.0, 5.0, 5.0]);
        // bf16: d + h formed in f32 and rounded to bf16 once. d alone lies just below the
        // midpoint between 1 and the next bf16 (it would round to 1, and 1 + h again to 1); the
        // sum lies above it.
        let mut dxk = vec![1.0f32 + 2f32.powi(-8) - 2f32.powi(-12); 2];
        let dh = [bf16::from_f32(2f32.powi(-11)); 2];
        let mut dx = [bf16::ZERO; 2];
        finish(2, &mut dxk, None, Some(&dh), &mut dx, false);
        assert_eq!(dx.map(bf16::to_f32), [1.0 + 2f32.powi(-7); 2]);
    }
}
