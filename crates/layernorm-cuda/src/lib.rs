//! The CUDA backend of layernorm — not implemented yet.
//!
//! The type exists so the facade, the registry and the conformance suite are wired for it today:
//! [`CudaBackend::new`] returns [`Error::Unavailable`] until the CUDA kernels land.

use layernorm_core::{Error, Result};

/// The CUDA backend (not yet implemented: construction reports it unavailable).
#[derive(Debug)]
pub struct CudaBackend {
    _private: (),
}

impl CudaBackend {
    /// Registry name.
    pub const NAME: &'static str = "cuda";

    /// Always [`Error::Unavailable`] for now: the CUDA kernels are not written yet.
    pub fn new() -> Result<CudaBackend> {
        Err(Error::unavailable(Self::NAME, "the CUDA backend is not implemented yet"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reports_unavailable_without_panicking() {
        let err = super::CudaBackend::new().unwrap_err();
        assert_eq!(err.class(), "unavailable");
    }
}
