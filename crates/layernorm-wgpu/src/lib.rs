//! The wgpu backend of layernorm: the normalization family — LayerNorm and RMSNorm, with a γ
//! offset, a fused residual add (into h, or in place over the residual) and a backward from x or
//! from y with dh — as WGSL compute shaders, on any adapter wgpu finds (Vulkan, Metal, DX12, GL;
//! lavapipe on a CPU-only machine).
//!
//! - **Device-resident.** [`WgpuBuffer`] wraps a `wgpu::Buffer`; [`Normalize::forward`] and
//!   [`Normalize::backward`] run on those without a host round trip. Buffers you already have are
//!   wrapped with [`WgpuBackend::wrap`]; `upload`/`download` move host data.
//! - **Your device or ours.** [`WgpuBackend::new`] requests an adapter and device;
//!   [`WgpuBackend::from_device`] shares the `wgpu::Device`/`Queue` of your renderer or ML code.
//! - **dtypes.** f32; f16 storage (f32 arithmetic) when the device has `SHADER_F16`; bf16 storage
//!   as packed `u32` words with bit shifts. No f64: WGSL has none, and the backend says so with
//!   [`Error::UnsupportedDType`].
//! - **One source per kernel family.** The kind and the variants are bits of each kernel's
//!   parameters, read by the same row kernels, so every strategy below serves all of them.
//! - **Shapes.** Kernel shape is chosen by N (several rows per workgroup for small N, one
//!   workgroup per row for large N, vec4 access when N allows, rows streamed from memory past
//!   2048 items per row). Rows past 65535 workgroups use a 2-D grid; tensors larger than the
//!   device's `max_storage_buffer_binding_size` are processed in several dispatches of whole rows.
//!   The design is described in `docs/backends/wgpu.md`.
//! - **ε.** The shaders compute in f32 and take ε as a mantissa and an exponent: every ε from
//!   `f32::MIN_POSITIVE` to `f64::MAX` follows the f64 reference; a smaller one (which GPUs
//!   may flush to zero) is [`Error::Unsupported`].
//! - **Errors, not panics.** No adapter → [`Error::Unavailable`] carrying wgpu's reason; a device
//!   that runs out of memory → [`Error::OutOfMemory`]; other wgpu errors inside a call come back
//!   as [`Error::Device`].
//!
//! ```no_run
//! use layernorm_core::ndarray::arr2;
//! use layernorm_core::{Norm, NormalizeNd};
//! use layernorm_wgpu::WgpuBackend;
//!
//! let backend = WgpuBackend::new()?;
//! let x = arr2(&[[1.0f32, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 1.0]]);
//! let out = backend.forward_nd(Norm::layer_norm(), &x).run()?;
//! assert!(out.y[[0, 0]] < 0.0);
//! # Ok::<(), layernorm_core::Error>(())
//! ```

mod buffer;
mod dispatch;
mod kernels;

use std::sync::{Arc, Mutex, MutexGuard, mpsc};

use layernorm_core::{
    Backend, Backward, DType, DeviceInfo, DeviceKind, Error, Forward, HostSlice, HostSliceMut,
    HostVec, NormKind, NormSpec, Normalize, Result, check_download, check_gamma_recoverable,
};
use wgpu::util::DeviceExt;

use buffer::padded_size;
pub use buffer::{REQUIRED_USAGES, WgpuBuffer};
use dispatch::{bind, entry};
use kernels::{Cache, Io, Kernel};

/// The normalization family on a wgpu device.
///
/// Holds the device and queue (cheap clones of wgpu handles), the limits it plans dispatches by,
/// and the compiled pipelines, which are created once per device, kernel, dtype and shape.
#[derive(Debug)]
pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    f16: bool,
    subgroups: bool,
    max_binding: u64,
    max_buffer: u64,
    offset_align: u64,
    max_groups: u32,
    /// Loop iterations an invocation may make, planned for (`Shape::for_items`).
    loop_limit: usize,
    /// Bound where an input tensor is absent (read only: any number of bindings may share it).
    dummy: wgpu::Buffer,
    /// Bound where an output is absent (the forward's mean for RMSNorm, h without a residual):
    /// one each, as writable bindings must not alias.
    dummy_out: [wgpu::Buffer; 2],
    cache: Cache,
    token: Arc<()>,
    /// Held through each call on the GL backend (see [`WgpuBackend::serial`]).
    gl_calls: Option<Mutex<()>>,
}

/// Storage buffers the largest kernel binds (the backward: x or y, dy, γ, β, mean, rstd, dh, dx
/// and three working buffers).
const STORAGE_BUFFERS: u32 = 11;

fn device_err(e: impl std::fmt::Display) -> Error {
    Error::device(WgpuBackend::NAME, e)
}

/// A wgpu error caught in an error scope, as [`Error::Device`] with its full description.
fn scope_err(e: wgpu::Error) -> Error {
    Error::device(WgpuBackend::NAME, error_text(&e))
}

/// What a wgpu error says: its description (the whole chain of causes, where `Display` gives
/// only "Validation Error").
pub(crate) fn error_text(e: &wgpu::Error) -> String {
    match e {
        wgpu::Error::Validation { description, .. } | wgpu::Error::Internal { description, .. } => {
            description.trim().to_string()
        }
        other => other.to_string(),
    }
}

impl WgpuBackend {
    /// Registry name.
    pub const NAME: &'static str = "wgpu";

    /// Requests an adapter (honouring `WGPU_BACKEND` and friends) and a device with the adapter's
    /// limits and, when present, `SHADER_F16` and `SUBGROUP`. No adapter →
    /// [`Error::Unavailable`] with wgpu's reason.
    pub fn new() -> Result<WgpuBackend> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        }))
        .map_err(|e| Error::unavailable(Self::NAME, format!("no wgpu adapter: {e}")))?;
        let features = adapter.features() & (wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("layernorm-wgpu"),
            required_features: features,
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|e| {
            Error::unavailable(Self::NAME, format!("wgpu adapter refused a device: {e}"))
        })?;
        Self::from_device(device, queue)
    }

    /// Uses a device and queue you already have. f16 is supported when the device was created
    /// with `SHADER_F16`; dispatches are planned by the device's limits.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Result<WgpuBackend> {
        let limits = device.limits();
        let info = device.adapter_info();
        if limits.max_storage_buffers_per_shader_stage < STORAGE_BUFFERS {
            return Err(Error::unavailable(
                Self::NAME,
                format!(
                    "the device allows {} storage buffers per shader stage; the backward binds \
                     {STORAGE_BUFFERS}",
                    limits.max_storage_buffers_per_shader_stage
                ),
            ));
        }
        let gl_calls = (info.backend == wgpu::Backend::Gl).then(|| Mutex::new(()));
        let f16 = device.features().contains(wgpu::Features::SHADER_F16);
        let subgroups = device.features().contains(wgpu::Features::SUBGROUP);
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let small = |label| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage: REQUIRED_USAGES,
                mapped_at_creation: false,
            })
        };
        let dummy = small("layernorm absent input");
        let dummy_out = [small("layernorm absent output"), small("layernorm absent output")];
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(scope_err(e));
        }
        Ok(WgpuBackend {
            device,
            queue,
            info,
            f16,
            subgroups,
            max_binding: limits.max_storage_buffer_binding_size,
            max_buffer: limits.max_buffer_size,
            offset_align: u64::from(limits.min_storage_buffer_offset_alignment).max(4),
            max_groups: limits.max_compute_workgroups_per_dimension.max(1),
            loop_limit: kernels::LOOP_LIMIT,
            dummy,
            dummy_out,
            cache: Cache::default(),
            token: Arc::new(()),
            gl_calls,
        })
    }

    /// Lowers the largest storage binding the backend uses (bytes, rounded down to a multiple of
    /// 256), so that tensors above it are processed in several dispatches. The device's own limit
    /// is the default and cannot be raised; useful to share headroom or to test the splitting.
    pub fn with_max_binding_size(mut self, bytes: u64) -> Self {
        self.max_binding = self.max_binding.min((bytes / 256 * 256).max(256));
        self
    }

    /// Lowers the number of workgroups per grid dimension the backend plans with (at least 1), so
    /// that the 2-D grid used past the device's limit (65535 on most devices) can be exercised
    /// with few rows.
    pub fn with_max_workgroups_per_dimension(mut self, groups: u32) -> Self {
        self.max_groups = self.max_groups.min(groups.max(1));
        self
    }

    /// Lowers the loop iterations one invocation may make (all loops together) that rows
    /// streamed from memory are planned against: 65535 by default, llvmpipe's limit (lavapipe,
    /// Mesa's GL driver), past which its loops end early. A streamed pass handles 16 items per
    /// loop iteration, or 32 where 16 would pass the limit (16-bit rows of odd N above
    /// 66 056 192 elements); the sums are the same bits either way. Lowering it runs the
    /// 32-item driver on short rows (the tests do).
    pub fn with_loop_limit(mut self, iterations: usize) -> Self {
        self.loop_limit = self.loop_limit.min(iterations);
        self
    }

    /// Copies `src` into `dst` with a plain copy shader (16-byte words), on the backend's queue.
    ///
    /// LayerNorm is memory-bound: the time of this copy over the same bytes is the bandwidth a
    /// kernel on this adapter can hope for, which is what the benches compare against. Both
    /// buffers must hold the same number of bytes, a multiple of 16.
    pub fn copy_kernel(&self, src: &WgpuBuffer, dst: &mut WgpuBuffer) -> Result<()> {
        let _serial = self.serial();
        self.own("src", src)?;
        self.own("dst", dst)?;
        let bytes = src.byte_len();
        if bytes != dst.byte_len() || !bytes.is_multiple_of(16) {
            return Err(Error::ShapeMismatch {
                tensor: "dst (bytes, a multiple of 16)",
                expected: bytes as usize,
                got: dst.byte_len() as usize,
            });
        }
        if bytes == 0 {
            return Ok(());
        }
        if bytes > self.max_binding {
            return Err(Error::TooLarge {
                rows: 1,
                n: src.len,
                limit: format!("max_storage_buffer_binding_size ({} bytes)", self.max_binding),
            });
        }
        self.scoped(|| {
            let pipeline = self.pipeline(Kernel::Copy, Io::F32, None)?;
            let words = (bytes / 16) as usize;
            let spec = NormSpec::layer_norm(words, 1, DType::F32);
            let (gx, gy) = self.grid(words.div_ceil(256), &spec)?;
            // copy.wgsl's Params: words, groups_x and 24 bytes of padding.
            let params = self.uniform(&[words as u32, gx, 0, 0, 0, 0, 0, 0]);
            let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("layernorm copy"),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &[
                    entry(0, params.as_entire_binding()),
                    entry(1, bind(&src.buffer, 0, bytes)),
                    entry(2, bind(&dst.buffer, 0, bytes)),
                ],
            });
            let mut enc = self.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &bg, &[]);
                pass.dispatch_workgroups(gx, gy, 1);
            }
            self.queue.submit([enc.finish()]);
            Ok(())
        })
    }

    /// Blocks until all work submitted to the queue has finished.
    pub fn synchronize(&self) -> Result<()> {
        let _serial = self.serial();
        self.device.poll(wgpu::PollType::wait_indefinitely()).map(|_| ()).map_err(device_err)
    }

    /// The adapter the device belongs to.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The queue work is submitted to.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Turns the subgroup reductions off (`false`) or back on where the device has
    /// `Features::SUBGROUP`. They are on by default when available; off, every reduction goes
    /// through workgroup memory. Results of the two differ in the last bits (the order of the
    /// additions differs); each is reproducible run to run.
    pub fn with_subgroups(mut self, on: bool) -> Self {
        self.subgroups = on && self.device.features().contains(wgpu::Features::SUBGROUP);
        self
    }

    /// Whether the row kernels use subgroup reductions.
    pub fn uses_subgroups(&self) -> bool {
        self.subgroups
    }

    /// Whether f16 tensors are supported (the device has `SHADER_F16`).
    pub fn has_f16(&self) -> bool {
        self.f16
    }

    /// Wraps a `wgpu::Buffer` created on this backend's device as a tensor of `len` elements of
    /// `dtype`, owned by this backend. The buffer must come from [`WgpuBackend::device`]: wgpu
    /// cannot tell devices of two instances apart, so this is the caller's promise. It needs
    /// [`REQUIRED_USAGES`] and `len × size` bytes rounded up to 4 (at least 16); a smaller buffer
    /// is [`Error::ShapeMismatch`] counted in elements.
    pub fn wrap(&self, buffer: wgpu::Buffer, dtype: DType, len: usize) -> Result<WgpuBuffer> {
        WgpuBuffer::new_checked(buffer, self.device.clone(), self.token.clone(), dtype, len)
    }

    fn create(&self, dtype: DType, len: usize) -> Result<WgpuBuffer> {
        let size = padded_size(dtype, len).filter(|&s| s <= self.max_buffer).ok_or_else(|| {
            Error::TooLarge {
                rows: 1,
                n: len,
                limit: format!("the device's max_buffer_size ({} bytes)", self.max_buffer),
            }
        })?;
        let buffer = self.allocate("layernorm tensor", size, REQUIRED_USAGES)?;
        Ok(WgpuBuffer {
            buffer,
            device: self.device.clone(),
            owner: self.token.clone(),
            dtype,
            len,
        })
    }

    /// A device buffer of `size` bytes; the device running out of memory is
    /// [`Error::OutOfMemory`], anything else wgpu rejects [`Error::Device`].
    fn allocate(
        &self,
        label: &'static str,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let val = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        });
        let e_val = pollster::block_on(val.pop());
        if pollster::block_on(oom.pop()).is_some() {
            return Err(Error::OutOfMemory { tensor: label, bytes: size as usize });
        }
        match e_val {
            Some(e) => Err(scope_err(e)),
            None => Ok(buffer),
        }
    }

    /// A working buffer of `bytes` (rounded up to 4, at least 16) for the kernels of `spec`.
    fn scratch(&self, spec: &NormSpec, bytes: u64) -> Result<wgpu::Buffer> {
        let size = (bytes.div_ceil(4) * 4).max(16);
        if size > self.max_buffer {
            return Err(Error::TooLarge {
                rows: spec.rows,
                n: spec.n,
                limit: format!(
                    "the device's max_buffer_size ({} bytes) for a working buffer of {size} bytes",
                    self.max_buffer
                ),
            });
        }
        self.allocate("layernorm scratch", size, wgpu::BufferUsages::STORAGE)
    }

    /// A uniform buffer of `words`, padded to a multiple of 16 bytes.
    fn uniform(&self, words: &[u32]) -> wgpu::Buffer {
        let mut padded = words.to_vec();
        padded.resize(words.len().div_ceil(4) * 4, 0);
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("layernorm params"),
            contents: bytemuck::cast_slice(&padded),
            usage: wgpu::BufferUsages::UNIFORM,
        })
    }

    /// Runs `f` inside validation and out-of-memory error scopes, so that any wgpu error it
    /// causes comes back as [`Error::Device`] instead of reaching the uncaptured-error handler
    /// (which panics by default).
    fn scoped<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let val = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let r = f();
        let e_val = pollster::block_on(val.pop());
        let e_oom = pollster::block_on(oom.pop());
        if let Some(e) = e_val.or(e_oom) {
            return Err(scope_err(e));
        }
        r
    }

    /// On wgpu's GL backend every call holds the adapter's one GL context, and a thread that
    /// waits more than 6 s for it panics inside wgpu ("Could not lock adapter context"): a
    /// long dispatch on llvmpipe holds it that long. The backend's own calls therefore queue on
    /// this lock first, without a timeout; on other backends it is absent.
    fn serial(&self) -> Option<MutexGuard<'_, ()>> {
        self.gl_calls.as_ref().map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn own(&self, tensor: &'static str, b: &WgpuBuffer) -> Result<()> {
        if Arc::ptr_eq(&b.owner, &self.token) {
            Ok(())
        } else {
            Err(Error::ForeignBuffer { tensor })
        }
    }
}

impl Backend for WgpuBackend {
    fn name(&self) -> &str {
        Self::NAME
    }

    /// The kind and dtype, and the ε rule (`eps_parts` and `check_subnormal_rstd` in
    /// `src/dispatch.rs`): an ε below the smallest normal f32, or on an adapter that flushes
    /// subnormals one whose rstd is an f32 subnormal, is [`Error::Unsupported`] before anything
    /// is uploaded or allocated.
    fn accepts(&self, spec: &NormSpec) -> Result<()> {
        self.supports(spec.kind, spec.dtype)?;
        Self::eps_parts(spec)?;
        self.check_subnormal_rstd(spec)
    }

    fn device(&self) -> DeviceInfo {
        let info = self.adapter_info();
        let kind = match info.device_type {
            wgpu::DeviceType::Cpu => DeviceKind::SoftwareGpu,
            wgpu::DeviceType::DiscreteGpu
            | wgpu::DeviceType::IntegratedGpu
            | wgpu::DeviceType::VirtualGpu => DeviceKind::Gpu,
            // An adapter that does not say what it is: count it as software, so `auto` prefers
            // the CPU backend over an unknown.
            wgpu::DeviceType::Other => DeviceKind::SoftwareGpu,
        };
        DeviceInfo { kind, name: format!("{} ({:?})", info.name, info.backend) }
    }

    fn supports(&self, kind: NormKind, dtype: DType) -> Result<()> {
        match kind {
            NormKind::LayerNorm | NormKind::RmsNorm => {}
            other => {
                return Err(Error::UnsupportedKind {
                    backend: Self::NAME.into(),
                    kind: other.name(),
                });
            }
        }
        let reason = match dtype {
            DType::F32 | DType::BF16 => return Ok(()),
            DType::F16 if self.f16 => return Ok(()),
            DType::F16 => "the device lacks SHADER_F16",
            DType::F64 => "WGSL has no f64",
            _ => "unknown dtype",
        };
        Err(Error::UnsupportedDType { backend: Self::NAME.into(), dtype, reason: reason.into() })
    }
}

impl Normalize for WgpuBackend {
    type Buffer = WgpuBuffer;

    fn alloc(&self, dtype: DType, len: usize) -> Result<WgpuBuffer> {
        let _serial = self.serial();
        // wgpu zero-initializes new buffers.
        self.create(dtype, len)
    }

    fn upload(&self, data: HostSlice<'_>) -> Result<WgpuBuffer> {
        let _serial = self.serial();
        let b = self.create(data.dtype(), data.len())?;
        let bytes = data.as_bytes();
        if !bytes.is_empty() {
            // Copies are in 4-byte units: the whole words, then the last 1–3 bytes padded
            // (no host copy of the tensor).
            let whole = bytes.len() / 4 * 4;
            self.scoped(|| {
                if whole > 0 {
                    self.queue.write_buffer(&b.buffer, 0, &bytes[..whole]);
                }
                if whole < bytes.len() {
                    let mut tail = [0u8; 4];
                    tail[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
                    self.queue.write_buffer(&b.buffer, whole as u64, &tail);
                }
                Ok(())
            })?;
        }
        Ok(b)
    }

    fn download(&self, buffer: &WgpuBuffer, out: HostSliceMut<'_>) -> Result<()> {
        let _serial = self.serial();
        self.download_held(buffer, out)
    }

    /// Computes nothing on the host: only refuses, before the host layer uploads anything, a
    /// backward from x that the saved f32 rstd cannot serve (`check_saved_rstd` in
    /// `src/dispatch.rs`).
    fn backward_on_host(
        &self,
        spec: &NormSpec,
        args: &mut layernorm_core::HostBackward<'_>,
    ) -> Option<Result<()>> {
        Self::check_saved_rstd(spec, args.saved.is_output()).err().map(Err)
    }

    fn run_forward(&self, spec: &NormSpec, a: Forward<'_, WgpuBuffer>) -> Result<()> {
        let _serial = self.serial();
        let a = a.try_map(|t, b| self.own(t, b).map(|()| b), |t, b| self.own(t, b).map(|()| b))?;
        let eps = Self::eps_parts(spec)?;
        self.scoped(|| self.forward_impl(spec, &a, eps))
    }

    fn run_backward(&self, spec: &NormSpec, a: Backward<'_, WgpuBuffer>) -> Result<()> {
        let _serial = self.serial();
        let a = a.try_map(|t, b| self.own(t, b).map(|()| b), |t, b| self.own(t, b).map(|()| b))?;
        Self::check_saved_rstd(spec, a.saved.is_output())?;
        if let (true, Some(gamma)) = (a.saved.is_output(), a.gamma) {
            // x̂ = (y − β)/(γ_offset + γ) needs every γ_offset + γ nonzero: checked on a copy
            // of γ before anything is written.
            let mut host = HostVec::try_zeros("gamma (host copy)", spec.dtype, spec.n)?;
            self.download_held(gamma, host.as_mut_slice())?;
            check_gamma_recoverable(spec, Some(host.as_slice()))?;
        }
        self.scoped(|| self.backward_impl(spec, &a))
    }
}

impl WgpuBackend {
    /// [`Normalize::download`], with [`WgpuBackend::serial`] already held.
    fn download_held(&self, buffer: &WgpuBuffer, mut out: HostSliceMut<'_>) -> Result<()> {
        check_download(buffer, &out)?;
        self.own("download source", buffer)?;
        let nbytes = buffer.len * buffer.dtype.size();
        if nbytes == 0 {
            return Ok(());
        }
        let size = (nbytes as u64).div_ceil(4) * 4;
        let usage = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
        let staging = self.allocate("layernorm download", size, usage)?;
        self.scoped(|| {
            let mut enc = self.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&buffer.buffer, 0, &staging, 0, size);
            self.queue.submit([enc.finish()]);
            Ok(())
        })?;
        let (tx, rx) = mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(device_err)?;
        rx.recv().map_err(device_err)?.map_err(device_err)?;
        {
            let view = staging.get_mapped_range(..).map_err(device_err)?;
            out.as_bytes_mut().copy_from_slice(&view[..nbytes]);
        }
        staging.unmap();
        Ok(())
    }
}
