//! [`WgpuBuffer`]: a `wgpu::Buffer` that knows its dtype, its length and its device.

use std::sync::Arc;

use layernorm_core::{DType, Error, Result, Storage};

/// Usages every buffer the backend creates has, and every wrapped buffer needs: bound as storage
/// by the kernels, copied out by downloads, cleared or written by the backend.
pub const REQUIRED_USAGES: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Bytes a tensor of `len` elements of `dtype` occupies on the device: rounded up to 4 (wgpu copies
/// and bindings work in 4-byte units) and at least 16 (so any kernel may bind it).
pub(crate) fn padded_size(dtype: DType, len: usize) -> Option<u64> {
    let bytes = len.checked_mul(dtype.size())?;
    Some((bytes.div_ceil(4) * 4).max(16) as u64)
}

/// A tensor on a wgpu device: the `wgpu::Buffer`, its element dtype and length.
///
/// Buffers made by [`crate::WgpuBackend`] (`alloc`, `upload`) are padded to a multiple of 4
/// bytes (and at least 16). A buffer you created yourself is wrapped with
/// [`crate::WgpuBackend::wrap`]; it must have [`REQUIRED_USAGES`] and at least that padded size.
/// A buffer belongs to the backend that made or wrapped it; another backend (even on the same
/// device) refuses it with [`layernorm_core::Error::ForeignBuffer`] — wrap the `wgpu::Buffer`
/// again with that backend to share it.
/// When `len × dtype size` is not a multiple of 4, the bytes up to the next multiple of 4 belong to
/// the tensor: the backend may overwrite them.
#[derive(Debug)]
pub struct WgpuBuffer {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) device: wgpu::Device,
    /// The backend that made or wrapped it (`wgpu::Device` equality compares ids only, which
    /// collide between two `wgpu::Instance`s, so it cannot tell devices apart).
    pub(crate) owner: Arc<()>,
    pub(crate) dtype: DType,
    pub(crate) len: usize,
}

impl WgpuBuffer {
    /// The underlying `wgpu::Buffer` (for binding it in your own passes).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// The device the buffer lives on.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// Gives the `wgpu::Buffer` back.
    pub fn into_inner(self) -> wgpu::Buffer {
        self.buffer
    }

    /// Bytes the tensor's elements occupy (unpadded).
    pub fn byte_len(&self) -> u64 {
        (self.len * self.dtype.size()) as u64
    }

    pub(crate) fn new_checked(
        buffer: wgpu::Buffer,
        device: wgpu::Device,
        owner: Arc<()>,
        dtype: DType,
        len: usize,
    ) -> Result<WgpuBuffer> {
        let need = padded_size(dtype, len).ok_or_else(|| Error::TooLarge {
            rows: 1,
            n: len,
            limit: "u64 bytes".into(),
        })?;
        if buffer.size() < need {
            // In elements, like every other shape error: the padded size the tensor needs, and
            // the whole elements the buffer holds.
            let size = dtype.size() as u64;
            return Err(Error::ShapeMismatch {
                tensor: "wrapped buffer",
                expected: need.div_ceil(size) as usize,
                got: (buffer.size() / size) as usize,
            });
        }
        if !buffer.usage().contains(REQUIRED_USAGES) {
            return Err(Error::device(
                crate::WgpuBackend::NAME,
                format!(
                    "a wrapped buffer needs usages {REQUIRED_USAGES:?}, it has {:?}",
                    buffer.usage()
                ),
            ));
        }
        Ok(WgpuBuffer { buffer, device, owner, dtype, len })
    }
}

impl Storage for WgpuBuffer {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn len(&self) -> usize {
        self.len
    }
}
