//! The wgpu backend of layernorm — not implemented yet.
//!
//! The type exists so the facade, the registry and the conformance suite are wired for it today:
//! [`WgpuBackend::new`] returns [`Error::Unavailable`] until the WGSL shaders land. The type is
//! uninhabited, so none of its methods can ever run.

use std::convert::Infallible;

use layernorm_core::{
    Backward, DType, Error, Forward, HostSlice, HostSliceMut, NormKind, NormSpec, Normalize,
    Result, Storage,
};

/// The wgpu backend (not yet implemented: construction reports it unavailable).
#[derive(Debug)]
pub struct WgpuBackend {
    never: Infallible,
}

/// The wgpu buffer type (uninhabited until the backend exists).
#[derive(Debug)]
pub struct WgpuBuffer {
    never: Infallible,
}

impl Storage for WgpuBuffer {
    fn dtype(&self) -> DType {
        match self.never {}
    }
    fn len(&self) -> usize {
        match self.never {}
    }
}

impl WgpuBackend {
    /// Registry name.
    pub const NAME: &'static str = "wgpu";

    /// Always [`Error::Unavailable`] for now: the WGSL shaders are not written yet.
    pub fn new() -> Result<WgpuBackend> {
        Err(Error::unavailable(Self::NAME, "the wgpu backend is not implemented yet"))
    }
}

impl Normalize for WgpuBackend {
    type Buffer = WgpuBuffer;
    fn name(&self) -> &str {
        Self::NAME
    }
    fn supports(&self, _: NormKind, _: DType) -> Result<()> {
        match self.never {}
    }
    fn alloc(&self, _: DType, _: usize) -> Result<WgpuBuffer> {
        match self.never {}
    }
    fn upload(&self, _: HostSlice<'_>) -> Result<WgpuBuffer> {
        match self.never {}
    }
    fn download(&self, _: &WgpuBuffer, _: HostSliceMut<'_>) -> Result<()> {
        match self.never {}
    }
    fn run_forward(&self, _: &NormSpec, _: Forward<'_, WgpuBuffer>) -> Result<()> {
        match self.never {}
    }
    fn run_backward(&self, _: &NormSpec, _: Backward<'_, WgpuBuffer>) -> Result<()> {
        match self.never {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reports_unavailable_without_panicking() {
        let err = super::WgpuBackend::new().unwrap_err();
        assert_eq!(err.class(), "unavailable");
    }
}
