//! Storage dtypes, the [`Element`] trait that ties a Rust type to one, and dtype-erased host slices.

use std::fmt;

use half::{bf16, f16};
use num_traits::Float;

use crate::{Error, Result};

/// The storage type of a tensor.
///
/// Arithmetic never happens in 16-bit types: `F16` and `BF16` are storage formats whose values are
/// widened to `f32`, combined there, and rounded once on store. See [`DType::acc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DType {
    /// IEEE 754 binary16.
    F16,
    /// bfloat16: the top 16 bits of an `f32`.
    BF16,
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary64.
    F64,
}

impl DType {
    /// Every dtype, in a fixed order (narrowest first).
    pub const ALL: [DType; 4] = [DType::F16, DType::BF16, DType::F32, DType::F64];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }

    /// The accumulation dtype: the type sums are formed in and the per-row statistics (mean, rstd)
    /// are stored in. `f64` for `F64`, `f32` for everything else.
    pub const fn acc(self) -> DType {
        match self {
            DType::F64 => DType::F64,
            _ => DType::F32,
        }
    }

    /// The lower-case name used in reports and on the command line (`f16`, `bf16`, `f32`, `f64`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::F64 => "f64",
        }
    }

    /// Parses a name produced by [`DType::name`].
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// The largest finite value of the storage type, as `f64`.
    pub const fn max_finite(self) -> f64 {
        match self {
            DType::F16 => 65504.0,
            DType::BF16 => 3.3895313892515355e38,
            DType::F32 => 3.4028234663852886e38,
            DType::F64 => f64::MAX,
        }
    }

    /// The smallest positive normal value of the storage type, as `f64`; the subnormals below
    /// it are spaced by `min_positive_normal() · epsilon()`.
    pub const fn min_positive_normal(self) -> f64 {
        match self {
            DType::F16 => 6.103515625e-5,                       // 2^-14
            DType::BF16 | DType::F32 => 1.1754943508222875e-38, // 2^-126
            DType::F64 => f64::MIN_POSITIVE,
        }
    }

    /// Rounds `v` to this dtype and widens it back (to nearest even).
    pub fn round(self, v: f64) -> f64 {
        match self {
            DType::F16 => f16::from_f64(v).to_f64(),
            DType::BF16 => bf16::from_f64(v).to_f64(),
            DType::F32 => v as f32 as f64,
            DType::F64 => v,
        }
    }

    /// Machine epsilon of the storage type (distance from 1.0 to the next value), as `f64`.
    pub const fn epsilon(self) -> f64 {
        match self {
            DType::F16 => 9.765625e-4,           // 2^-10
            DType::BF16 => 7.8125e-3,            // 2^-7
            DType::F32 => 1.1920928955078125e-7, // 2^-23
            DType::F64 => 2.220446049250313e-16, // 2^-52
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A Rust type that stores one [`DType`]: `f32`, `f64`, [`half::f16`] and [`half::bf16`].
///
/// Sealed: the set of dtypes is part of every backend's contract. Its conversions are associated
/// functions, not methods (`T::to_f64(v)`, never `v.to_f64()`), so that bringing it into scope
/// (`use layernorm::*`) adds nothing to the method namespace of `f32`, `f64`, `f16` or `bf16`.
pub trait Element:
    sealed::Sealed + bytemuck::Pod + Copy + Send + Sync + PartialEq + fmt::Debug + 'static
{
    /// The dtype this type stores.
    const DTYPE: DType;
    /// The accumulation type ([`DType::acc`]): `f32`, or `f64` for `f64`.
    type Acc: Element + Float + Into<f64>;

    /// Widens to the accumulation type (exact).
    fn to_acc(v: Self) -> Self::Acc;
    /// Rounds from the accumulation type (round to nearest even, once).
    fn from_acc(v: Self::Acc) -> Self;
    /// Widens to `f64` (exact).
    fn to_f64(v: Self) -> f64;
    /// Rounds from `f64` to nearest.
    fn from_f64(v: f64) -> Self;
    /// Wraps a typed slice as a dtype-erased one.
    fn host(s: &[Self]) -> HostSlice<'_>;
    /// Wraps a typed mutable slice as a dtype-erased one.
    fn host_mut(s: &mut [Self]) -> HostSliceMut<'_>;
    /// Unwraps a dtype-erased slice if it holds this type.
    fn from_host(s: HostSlice<'_>) -> Option<&[Self]>;
    /// Unwraps a dtype-erased mutable slice if it holds this type.
    fn from_host_mut(s: HostSliceMut<'_>) -> Option<&mut [Self]>;
}

macro_rules! element {
    ($t:ty, $variant:ident, $acc:ty, |$a:ident| $to_acc:expr, |$b:ident| $from_acc:expr, |$c:ident| $from_f64:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            type Acc = $acc;
            #[inline(always)]
            fn to_acc(v: Self) -> $acc {
                let $a = v;
                $to_acc
            }
            #[inline(always)]
            fn from_acc(v: $acc) -> Self {
                let $b = v;
                $from_acc
            }
            #[inline(always)]
            fn to_f64(v: Self) -> f64 {
                let acc: $acc = <Self as Element>::to_acc(v);
                acc.into()
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                let $c = v;
                $from_f64
            }
            fn host(s: &[Self]) -> HostSlice<'_> {
                HostSlice::$variant(s)
            }
            fn host_mut(s: &mut [Self]) -> HostSliceMut<'_> {
                HostSliceMut::$variant(s)
            }
            fn from_host(s: HostSlice<'_>) -> Option<&[Self]> {
                match s {
                    HostSlice::$variant(s) => Some(s),
                    _ => None,
                }
            }
            fn from_host_mut(s: HostSliceMut<'_>) -> Option<&mut [Self]> {
                match s {
                    HostSliceMut::$variant(s) => Some(s),
                    _ => None,
                }
            }
        }
    };
}

element!(f32, F32, f32, |a| a, |b| b, |c| c as f32);
element!(f64, F64, f64, |a| a, |b| b, |c| c);
element!(f16, F16, f32, |a| a.to_f32(), |b| f16::from_f32(b), |c| f16::from_f64(c));
element!(bf16, BF16, f32, |a| a.to_f32(), |b| bf16::from_f32(b), |c| bf16::from_f64(c));

/// A borrowed host slice of any supported dtype.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum HostSlice<'a> {
    /// `f16` elements.
    F16(&'a [f16]),
    /// `bf16` elements.
    BF16(&'a [bf16]),
    /// `f32` elements.
    F32(&'a [f32]),
    /// `f64` elements.
    F64(&'a [f64]),
}

/// A mutably borrowed host slice of any supported dtype.
#[derive(Debug)]
#[non_exhaustive]
pub enum HostSliceMut<'a> {
    /// `f16` elements.
    F16(&'a mut [f16]),
    /// `bf16` elements.
    BF16(&'a mut [bf16]),
    /// `f32` elements.
    F32(&'a mut [f32]),
    /// `f64` elements.
    F64(&'a mut [f64]),
}

macro_rules! on_slice {
    ($s:expr, |$v:ident| $body:expr) => {
        match $s {
            HostSlice::F16($v) => $body,
            HostSlice::BF16($v) => $body,
            HostSlice::F32($v) => $body,
            HostSlice::F64($v) => $body,
        }
    };
}

macro_rules! on_slice_mut {
    ($s:expr, |$v:ident| $body:expr) => {
        match $s {
            HostSliceMut::F16($v) => $body,
            HostSliceMut::BF16($v) => $body,
            HostSliceMut::F32($v) => $body,
            HostSliceMut::F64($v) => $body,
        }
    };
}

impl<'a> HostSlice<'a> {
    /// The dtype of the elements.
    pub fn dtype(&self) -> DType {
        match self {
            HostSlice::F16(_) => DType::F16,
            HostSlice::BF16(_) => DType::BF16,
            HostSlice::F32(_) => DType::F32,
            HostSlice::F64(_) => DType::F64,
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        on_slice!(self, |s| s.len())
    }
    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The raw bytes (native endianness).
    pub fn as_bytes(&self) -> &'a [u8] {
        on_slice!(*self, |s| bytemuck::cast_slice(s))
    }
    /// Every element widened to `f64`.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        on_slice!(self, |s| s.iter().map(|&v| Element::to_f64(v)).collect())
    }
}

impl<'a> HostSliceMut<'a> {
    /// The dtype of the elements.
    pub fn dtype(&self) -> DType {
        match self {
            HostSliceMut::F16(_) => DType::F16,
            HostSliceMut::BF16(_) => DType::BF16,
            HostSliceMut::F32(_) => DType::F32,
            HostSliceMut::F64(_) => DType::F64,
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        on_slice_mut!(self, |s| s.len())
    }
    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The raw bytes (native endianness), writable.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        on_slice_mut!(self, |s| bytemuck::cast_slice_mut(s))
    }
    /// Reborrows for a shorter lifetime.
    pub fn reborrow(&mut self) -> HostSliceMut<'_> {
        match self {
            HostSliceMut::F16(s) => HostSliceMut::F16(s),
            HostSliceMut::BF16(s) => HostSliceMut::BF16(s),
            HostSliceMut::F32(s) => HostSliceMut::F32(s),
            HostSliceMut::F64(s) => HostSliceMut::F64(s),
        }
    }
    /// A read-only view of the same elements.
    pub fn as_slice(&self) -> HostSlice<'_> {
        match self {
            HostSliceMut::F16(s) => HostSlice::F16(s),
            HostSliceMut::BF16(s) => HostSlice::BF16(s),
            HostSliceMut::F32(s) => HostSlice::F32(s),
            HostSliceMut::F64(s) => HostSlice::F64(s),
        }
    }
}

/// An owned host vector of any supported dtype.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum HostVec {
    /// `f16` elements.
    F16(Vec<f16>),
    /// `bf16` elements.
    BF16(Vec<bf16>),
    /// `f32` elements.
    F32(Vec<f32>),
    /// `f64` elements.
    F64(Vec<f64>),
}

/// `len` zeros of `T`, or [`Error::OutOfMemory`] naming `tensor` when the memory cannot be had
/// (never an abort).
pub fn try_zeroed_vec<T: bytemuck::Zeroable + Clone>(
    tensor: &'static str,
    len: usize,
) -> Result<Vec<T>> {
    let bytes = len.saturating_mul(size_of::<T>());
    let mut v = Vec::new();
    if bytes > isize::MAX as usize || v.try_reserve_exact(len).is_err() {
        return Err(Error::OutOfMemory { tensor, bytes });
    }
    v.resize(len, T::zeroed());
    Ok(v)
}

impl HostVec {
    /// `len` zeros of `dtype`. Aborts like `vec!` if the memory cannot be had: see
    /// [`HostVec::try_zeros`].
    pub fn zeros(dtype: DType, len: usize) -> HostVec {
        match dtype {
            DType::F16 => HostVec::F16(vec![f16::ZERO; len]),
            DType::BF16 => HostVec::BF16(vec![bf16::ZERO; len]),
            DType::F32 => HostVec::F32(vec![0.0; len]),
            DType::F64 => HostVec::F64(vec![0.0; len]),
        }
    }

    /// `len` zeros of `dtype`, or [`Error::OutOfMemory`] naming `tensor`.
    pub fn try_zeros(tensor: &'static str, dtype: DType, len: usize) -> Result<HostVec> {
        Ok(match dtype {
            DType::F16 => HostVec::F16(try_zeroed_vec(tensor, len)?),
            DType::BF16 => HostVec::BF16(try_zeroed_vec(tensor, len)?),
            DType::F32 => HostVec::F32(try_zeroed_vec(tensor, len)?),
            DType::F64 => HostVec::F64(try_zeroed_vec(tensor, len)?),
        })
    }
    /// Rounds each `f64` to `dtype` (to nearest).
    pub fn from_f64(dtype: DType, values: &[f64]) -> HostVec {
        match dtype {
            DType::F16 => HostVec::F16(values.iter().map(|&v| f16::from_f64(v)).collect()),
            DType::BF16 => HostVec::BF16(values.iter().map(|&v| bf16::from_f64(v)).collect()),
            DType::F32 => HostVec::F32(values.iter().map(|&v| v as f32).collect()),
            DType::F64 => HostVec::F64(values.to_vec()),
        }
    }
    /// Copies a host slice.
    pub fn from_slice(s: HostSlice<'_>) -> HostVec {
        match s {
            HostSlice::F16(s) => HostVec::F16(s.to_vec()),
            HostSlice::BF16(s) => HostVec::BF16(s.to_vec()),
            HostSlice::F32(s) => HostVec::F32(s.to_vec()),
            HostSlice::F64(s) => HostVec::F64(s.to_vec()),
        }
    }
    /// Borrows as a dtype-erased slice.
    pub fn as_slice(&self) -> HostSlice<'_> {
        match self {
            HostVec::F16(v) => HostSlice::F16(v),
            HostVec::BF16(v) => HostSlice::BF16(v),
            HostVec::F32(v) => HostSlice::F32(v),
            HostVec::F64(v) => HostSlice::F64(v),
        }
    }
    /// Borrows as a dtype-erased mutable slice.
    pub fn as_mut_slice(&mut self) -> HostSliceMut<'_> {
        match self {
            HostVec::F16(v) => HostSliceMut::F16(v),
            HostVec::BF16(v) => HostSliceMut::BF16(v),
            HostVec::F32(v) => HostSliceMut::F32(v),
            HostVec::F64(v) => HostSliceMut::F64(v),
        }
    }
    /// The dtype of the elements.
    pub fn dtype(&self) -> DType {
        self.as_slice().dtype()
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }
    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Every element widened to `f64`.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        self.as_slice().to_f64_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
        }
        assert_eq!(DType::from_name("f8"), None);
    }

    #[test]
    fn max_finite_and_round_match_the_types() {
        assert_eq!(DType::F16.max_finite(), f16::MAX.to_f64());
        assert_eq!(DType::BF16.max_finite(), bf16::MAX.to_f64());
        assert_eq!(DType::F32.max_finite(), f32::MAX as f64);
        assert_eq!(DType::F16.round(1e6), f64::INFINITY);
        assert_eq!(DType::F32.round(0.1), 0.1f32 as f64);
    }

    #[test]
    fn epsilon_matches_the_types() {
        assert_eq!(DType::F32.epsilon(), f32::EPSILON as f64);
        assert_eq!(DType::F64.epsilon(), f64::EPSILON);
        assert_eq!(DType::F16.epsilon(), f16::EPSILON.to_f64());
        assert_eq!(DType::BF16.epsilon(), bf16::EPSILON.to_f64());
        assert_eq!(DType::F32.min_positive_normal(), f32::MIN_POSITIVE as f64);
        assert_eq!(DType::F64.min_positive_normal(), f64::MIN_POSITIVE);
        assert_eq!(DType::F16.min_positive_normal(), f16::MIN_POSITIVE.to_f64());
        assert_eq!(DType::BF16.min_positive_normal(), bf16::MIN_POSITIVE.to_f64());
    }

    #[test]
    fn sixteen_bit_types_round_once_from_acc() {
        // 1 + 2^-11 is a tie between 1 and 1 + 2^-10 in f16: round to even gives 1.
        assert_eq!(f16::from_acc(1.0 + 2f32.powi(-11)), f16::ONE);
        assert_eq!(bf16::from_acc(1.0 + 2f32.powi(-9)), bf16::ONE);
        assert_eq!(<f16 as Element>::DTYPE.acc(), DType::F32);
        assert_eq!(<f64 as Element>::DTYPE.acc(), DType::F64);
    }

    #[test]
    fn host_slices_unwrap_only_to_their_own_type() {
        let v = [1.0f32, 2.0];
        let s = f32::host(&v);
        assert_eq!(s.dtype(), DType::F32);
        assert_eq!(s.len(), 2);
        assert!(f32::from_host(s).is_some());
        assert!(f64::from_host(s).is_none());
        assert_eq!(s.as_bytes().len(), 8);
    }
}
