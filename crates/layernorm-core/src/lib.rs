//! The backend-agnostic core of layernorm: the [`Normalize`] trait every backend implements, the
//! problem description ([`NormSpec`]), dtypes ([`DType`], [`Element`]), the one [`Error`] type, and
//! the f64 [`mod@reference`] every backend is held to.
//!
//! Applications normally use the `layernorm` facade crate, which re-exports all of this and picks
//! a backend. Backend authors implement [`Normalize`]; see `docs/adding-a-backend.md`.
//!
//! ```
//! use layernorm_core::{reference, DType, NormSpec};
//!
//! let spec = NormSpec::layer_norm(1, 4, DType::F64).with_affine(false);
//! let out = reference::forward(&spec, &[1.0, 2.0, 3.0, 4.0], None, None)?;
//! assert_eq!(out.mean, vec![2.5]);
//! assert!(out.y.iter().sum::<f64>().abs() < 1e-12);
//! # Ok::<(), layernorm_core::Error>(())
//! ```

mod cache;
mod dtype;
mod error;
mod normalize;
pub mod reference;
mod spec;

pub use cache::{Out, OutputCache};
pub use dtype::{DType, Element, HostSlice, HostSliceMut, HostVec};
pub use error::{Error, Result};
pub use normalize::{
    Backward, BackwardArgs, DeviceInfo, DeviceKind, Forward, ForwardArgs, Forwarded, Gradients,
    HostBackward, HostForward, HostNormalize, HostNormalizeExt, Normalize, Storage, check_download,
    validate_backward, validate_forward,
};
pub use spec::{NormKind, NormSpec};

pub use half::{bf16, f16};
