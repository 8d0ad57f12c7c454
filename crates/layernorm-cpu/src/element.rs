//! How each storage type reaches the `f32`/`f64` row kernels: directly, or widened per row.

use std::borrow::Cow;

use half::slice::HalfFloatSliceExt;
use layernorm_core::{Element, Result, bf16, f16, try_zeroed_vec};
use num_traits::Zero;

use crate::row::{Kind, Real, Spec};

/// A storage type the CPU backend computes on: `f32`, `f64`, `f16`, `bf16`.
///
/// Sealed, and with no methods of its own: the conversions the kernels need live in a trait
/// private to this crate (`Convert`), so they never reach a user's method namespace.
pub trait CpuElement: Convert {}

impl<T: Convert> CpuElement for T {}

/// How each storage type reaches the row kernels. `f32`/`f64` rows are used in place;
/// `f16`/`bf16` rows are converted in registers by their own kernels (`reduce/half.rs`), or where
/// those do not apply widened into an `f32` scratch row, computed on, and rounded back once — the
/// same bits either way. Public only to name it as [`CpuElement`]'s supertrait: this module is
/// private, so nothing outside the crate can import or call it.
pub trait Convert: Element<Acc: Real> {
    /// The row itself, when the storage type is the accumulation type.
    fn as_acc(s: &[Self]) -> Option<&[Self::Acc]>;
    /// The row itself, mutably, when the storage type is the accumulation type.
    fn as_acc_mut(s: &mut [Self]) -> Option<&mut [Self::Acc]>;
    /// Widens `src` into `dst` (same length).
    fn widen(src: &[Self], dst: &mut [Self::Acc]);
    /// Rounds `src` into `dst` (same length), once per element.
    fn narrow(src: &[Self::Acc], dst: &mut [Self]);

    /// Forward of consecutive rows converting in registers, where the type has such kernels
    /// (`bf16`, `f16`: grouped short rows below `FUSE_MIN_N`, pipelined long rows from it): `false`
    /// otherwise, and the caller widens rows into scratch. The bits are the same either way.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn forward_converted(
        _n: usize,
        _spec: Spec,
        _x: &[Self],
        _gamma: Option<&[Self::Acc]>,
        _beta: Option<&[Self::Acc]>,
        _y: &mut [Self],
        _mean: &mut [Self::Acc],
        _rstd: &mut [Self::Acc],
    ) -> bool {
        false
    }

    /// Backward of consecutive blocks of rows converting in registers, adding into the blocks'
    /// dγ/dβ partials (laid out as for `Real::back_blocks`), where the type has such a kernel
    /// (`bf16`, `f16`; any N: even at N = 8 it measured twice the speed of widened chunks): `false`
    /// otherwise, and the caller widens rows into scratch. `extra`: dh, and from y the recovery of
    /// x̂ and the rows' scales (`reduce::Extra`). The bits are the same either way.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn backward_converted(
        _kind: Kind,
        _n: usize,
        _x: &[Self],
        _dy: &[Self],
        _extra: crate::reduce::Extra<'_, Self>,
        _mean: &[Self::Acc],
        _rstd: &[Self::Acc],
        _gamma: Option<&[Self::Acc]>,
        _dx: &mut [Self],
        _partials: Option<&mut [Self::Acc]>,
        _want: (bool, bool),
    ) -> bool {
        false
    }

    /// [`Convert::narrow`] one row and [`Convert::widen`] another (same length), in one
    /// sweep where the type has a loop for it, so the two memory streams overlap.
    #[inline(always)]
    #[allow(clippy::type_complexity)]
    fn narrow_widen(
        narrow: Option<(&[Self::Acc], &mut [Self])>,
        widen: Option<(&[Self], &mut [Self::Acc])>,
    ) {
        if let Some((src, dst)) = narrow {
            Self::narrow(src, dst);
        }
        if let Some((src, dst)) = widen {
            Self::widen(src, dst);
        }
    }
}

macro_rules! direct {
    ($t:ty) => {
        impl Convert for $t {
            #[inline]
            fn as_acc(s: &[Self]) -> Option<&[Self]> {
                Some(s)
            }
            #[inline]
            fn as_acc_mut(s: &mut [Self]) -> Option<&mut [Self]> {
                Some(s)
            }
            #[inline]
            fn widen(src: &[Self], dst: &mut [Self]) {
                dst.copy_from_slice(src)
            }
            #[inline]
            fn narrow(src: &[Self], dst: &mut [Self]) {
                dst.copy_from_slice(src)
            }
        }
    };
}

/// The `Convert` hooks of a 16-bit type with register-converting kernels (`reduce::Half`):
/// the grouped short-row and pipelined long-row forward, the one-row backward at every N.
macro_rules! in_registers {
    () => {
        #[inline(always)]
        fn forward_converted(
            n: usize,
            spec: Spec,
            x: &[Self],
            gamma: Option<&[f32]>,
            beta: Option<&[f32]>,
            y: &mut [Self],
            mean: &mut [f32],
            rstd: &mut [f32],
        ) -> bool {
            crate::reduce::forward_16(n, spec, x, gamma, beta, y, mean, rstd);
            true
        }
        fn backward_converted(
            kind: Kind,
            n: usize,
            x: &[Self],
            dy: &[Self],
            extra: crate::reduce::Extra<'_, Self>,
            mean: &[f32],
            rstd: &[f32],
            gamma: Option<&[f32]>,
            dx: &mut [Self],
            partials: Option<&mut [f32]>,
            want: (bool, bool),
        ) -> bool {
            let partials = crate::reduce::Partials { buf: partials, want };
            crate::reduce::backward_16(kind, n, (x, dy, extra), mean, rstd, gamma, dx, partials);
            true
        }
    };
}

macro_rules! half_float {
    ($t:ty) => {
        impl Convert for $t {
            #[inline]
            fn as_acc(_: &[Self]) -> Option<&[f32]> {
                None
            }
            #[inline]
            fn as_acc_mut(_: &mut [Self]) -> Option<&mut [f32]> {
                None
            }
            #[inline]
            fn widen(src: &[Self], dst: &mut [f32]) {
                src.convert_to_f32_slice(dst)
            }
            #[inline]
            fn narrow(src: &[f32], dst: &mut [Self]) {
                dst.convert_from_f32_slice(src)
            }
            in_registers!();
        }
    };
}

direct!(f32);
direct!(f64);
half_float!(f16);

// bf16 ↔ f32 is a shift (and a rounding add): written as a plain per-element loop over half's
// own conversions so it is inlined into, and vectorized with, the multiversioned kernels
// (half's slice conversion for bf16 is a scalar loop compiled without them).
impl Convert for bf16 {
    #[inline]
    fn as_acc(_: &[Self]) -> Option<&[f32]> {
        None
    }
    #[inline]
    fn as_acc_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = bf16::from_f32(s);
        }
    }
    in_registers!();
    #[inline(always)]
    fn narrow_widen(narrow: Option<(&[f32], &mut [Self])>, widen: Option<(&[Self], &mut [f32])>) {
        match (narrow, widen) {
            (Some((ns, nd)), Some((ws, wd))) if ns.len() == ws.len() => {
                let n = ns.len();
                let (nd, ws, wd) = (&mut nd[..n], &ws[..n], &mut wd[..n]);
                for j in 0..n {
                    nd[j] = bf16::from_f32(ns[j]);
                    wd[j] = ws[j].to_f32();
                }
            }
            (narrow, widen) => {
                if let Some((src, dst)) = narrow {
                    Self::narrow(src, dst);
                }
                if let Some((src, dst)) = widen {
                    Self::widen(src, dst);
                }
            }
        }
    }
}

/// A whole parameter vector (γ, β) in the accumulation type, `offset` added to every element
/// there (γ_eff = γ_offset + γ, `docs/math.md` (13); 0 for β): borrowed where the storage type is
/// the accumulation type and there is no offset, else a widened copy
/// ([`Error::OutOfMemory`] where it cannot be had).
pub(crate) fn load_param<'a, T: CpuElement>(
    name: &'static str,
    p: Option<&'a [T]>,
    offset: T::Acc,
) -> Result<Option<Cow<'a, [T::Acc]>>> {
    let Some(p) = p else { return Ok(None) };
    if let (Some(p), true) = (T::as_acc(p), offset.is_zero()) {
        return Ok(Some(Cow::Borrowed(p)));
    }
    let mut v = try_zeroed_vec(name, p.len())?;
    T::widen(p, &mut v);
    if !offset.is_zero() {
        v.iter_mut().for_each(|g| *g = offset + *g);
    }
    Ok(Some(Cow::Owned(v)))
}
