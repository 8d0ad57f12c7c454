//! The wgpu backend of layernorm — not implemented yet.
//!
//! The type exists so the facade, the registry and the conformance suite are wired for it today:
//! [`WgpuBackend::new`] returns [`Error::Unavailable`] until the WGSL shaders land.

use layernorm_core::{Error, Result};

/// The wgpu backend (not yet implemented: construction reports it unavailable).
#[derive(Debug)]
pub struct WgpuBackend {
    _private: (),
}

impl WgpuBackend {
    /// Registry name.
    pub const NAME: &'static str = "wgpu";

    /// Always [`Error::Unavailable`] for now: the WGSL shaders are not written yet.
    pub fn new() -> Result<WgpuBackend> {
        Err(Error::unavailable(Self::NAME, "the wgpu backend is not implemented yet"))
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
