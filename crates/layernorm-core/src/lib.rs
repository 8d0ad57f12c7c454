//! The backend-agnostic core of layernorm: the [`Normalize`] trait every backend implements, the
//! problem description ([`NormSpec`]), dtypes ([`DType`], [`Element`]), the one [`Error`] type,
//! the f64 [`mod@reference`] every backend is held to, and the n-dimensional API on top of every
//! backend ([`Norm`], [`NormalizeNd`]).
//!
//! Applications normally use the `layernorm` facade crate, which re-exports all of this and picks
//! a backend. Backend authors implement [`Normalize`]; see `docs/adding-a-backend.md`.
//!
//! ```
//! use layernorm_core::{reference, DType, NormSpec};
//!
//! let spec = NormSpec::layer_norm(1, 4, DType::F64).with_affine(false);
//! let out = reference::forward(&spec, &[1.0, 2.0, 3.0, 4.0], None, None)?;
//! assert_eq!(out.mean, Some(vec![2.5]));
//! assert!(out.y.iter().sum::<f64>().abs() < 1e-12);
//! # Ok::<(), layernorm_core::Error>(())
//! ```

mod cache;
mod dtype;
mod error;
mod nd;
mod normalize;
pub mod reference;
mod spec;

pub use cache::{Out, OutputCache};
pub use dtype::{DType, Element, HostSlice, HostSliceMut, HostVec, try_zeroed_vec};
pub use error::{Error, Result};
pub use nd::{
    BackwardNd, ForwardNd, NdForward, NdGradients, NdStats, Norm, NormalizeNd, OutArray, Stats,
};
pub use normalize::{
    Backend, Backward, BackwardArgs, DeviceInfo, DeviceKind, Forward, ForwardArgs, HostBackward,
    HostForward, HostNormalize, Normalize, Residual, Saved, Storage, check_download,
    check_gamma_recoverable, validate_backward, validate_forward,
};
pub use spec::{NormKind, NormSpec};

/// The `half` crate, whose [`struct@f16`] and [`bf16`] are the 16-bit element types.
pub use half;
pub use half::{bf16, f16};
/// The `ndarray` crate (the version the n-dimensional API takes views of).
pub use ndarray;
