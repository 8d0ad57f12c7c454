//! The CUDA backend of layernorm — not implemented yet.
//!
//! The type exists so the facade, the registry and the conformance suite are wired for it today:
//! [`CudaBackend::new`] returns [`Error::Unavailable`] until the CUDA kernels land. The type is
//! uninhabited, so none of its methods can ever run.

use std::convert::Infallible;

use layernorm_core::{
    Backward, DType, Error, Forward, HostSlice, HostSliceMut, NormKind, NormSpec, Normalize,
    Result, Storage,
};

/// The CUDA backend (not yet implemented: construction reports it unavailable).
#[derive(Debug)]
pub struct CudaBackend {
    never: Infallible,
}

/// The CUDA buffer type (uninhabited until the backend exists).
#[derive(Debug)]
pub struct CudaBuffer {
    never: Infallible,
}

impl Storage for CudaBuffer {
    fn dtype(&self) -> DType {
        match self.never {}
    }
    fn len(&self) -> usize {
        match self.never {}
    }
}

impl CudaBackend {
    /// Registry name.
    pub const NAME: &'static str = "cuda";

    /// Always [`Error::Unavailable`] for now: the CUDA kernels are not written yet.
    pub fn new() -> Result<CudaBackend> {
        Err(Error::unavailable(Self::NAME, "the CUDA backend is not implemented yet"))
    }
}

impl Normalize for CudaBackend {
    type Buffer = CudaBuffer;
    fn name(&self) -> &str {
        Self::NAME
    }
    fn supports(&self, _: NormKind, _: DType) -> Result<()> {
        match self.never {}
    }
    fn alloc(&self, _: DType, _: usize) -> Result<CudaBuffer> {
        match self.never {}
    }
    fn upload(&self, _: HostSlice<'_>) -> Result<CudaBuffer> {
        match self.never {}
    }
    fn download(&self, _: &CudaBuffer, _: HostSliceMut<'_>) -> Result<()> {
        match self.never {}
    }
    fn run_forward(&self, _: &NormSpec, _: Forward<'_, CudaBuffer>) -> Result<()> {
        match self.never {}
    }
    fn run_backward(&self, _: &NormSpec, _: Backward<'_, CudaBuffer>) -> Result<()> {
        match self.never {}
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
