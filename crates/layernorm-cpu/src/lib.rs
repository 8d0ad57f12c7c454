//! The CPU backend of layernorm: LayerNorm forward and backward on the host, rows in parallel with
//! rayon, in `f32`, `f64`, `f16` and `bf16` (16-bit storage is computed in `f32` and rounded once).
//!
//! Three ways in, from most to least general:
//!
//! - [`CpuBackend`] implements [`Normalize`], like every backend; its buffers are host vectors.
//! - [`CpuBackend::forward_into`] / [`CpuBackend::backward_into`]: typed slices in, caller-owned
//!   outputs: no output is allocated (each call allocates only small scratch: the dγ/dβ block
//!   partials, and for 16-bit data γ/β widened to `f32`).
//! - [`CpuBackend::forward_nd`] / [`CpuBackend::backward_nd`]: ndarray views with any number of
//!   leading dims, normalized over the trailing `normalized_ndim` dims like PyTorch's
//!   `normalized_shape`; non-contiguous views are accepted (copied to standard layout first).
//!
//! Work runs on the rayon pool current at the call (so `pool.install(|| …)` is respected), or on
//! the pool given to [`CpuBackend::with_pool`]. dγ/dβ are bitwise identical for every thread count.
//!
//! ```
//! use layernorm_cpu::CpuBackend;
//! use layernorm_core::{DType, NormSpec};
//!
//! let cpu = CpuBackend::new();
//! let spec = NormSpec::layer_norm(2, 3, DType::F32).with_affine(false);
//! let x = [1.0f32, 2.0, 3.0, 10.0, 10.0, 10.0];
//! let (mut y, mut mean, mut rstd) = ([0.0f32; 6], [0.0f32; 2], [0.0f32; 2]);
//! cpu.forward_into(&spec, &x, None, None, &mut y, &mut mean, &mut rstd)?;
//! assert_eq!(mean, [2.0, 10.0]);
//! assert_eq!(&y[3..], &[0.0, 0.0, 0.0]);
//! # Ok::<(), layernorm_core::Error>(())
//! ```

mod columns;
mod driver;
mod element;
mod nd;
mod reduce;
mod row;
mod simd;

use std::sync::Arc;

use layernorm_core::{
    BackwardArgs, DType, Element, Error, Forward, ForwardArgs, HostBackward, HostForward,
    HostSlice, HostSliceMut, HostVec, NormKind, NormSpec, Normalize, OutputCache, Result, Storage,
    bf16, check_download, f16, validate_backward, validate_forward,
};

pub use driver::ROW_BLOCK;
pub use element::CpuElement;
pub use nd::{NdForward, NdGradients, OutArray};
pub use row::Real;

/// The CPU backend. Cheap to create and to clone.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend {
    pool: Option<Arc<rayon::ThreadPool>>,
    stores: Stores,
    /// Where the allocating calls (`forward_vec`, `forward_nd`, …) take their outputs from and
    /// return them to; shared by clones.
    cache: Arc<OutputCache>,
}

/// How the forward writes `y` and the backward `dx`: a performance choice only — the values are
/// bitwise the same. It applies to `f32` data; `f64` and the 16-bit types always use ordinary
/// stores.
///
/// Ordinary stores first read every output cache line from memory (to own it), then write it back:
/// for an output larger than the caches that is a third stream of memory traffic beside reading x
/// and writing y. Non-temporal ("streaming") stores write whole lines without reading them, but
/// leave y out of cache, which costs whoever reads y next if it would have fit. Whichever is chosen,
/// a forward writing 8 MiB or more of y with ordinary stores also prefetches y's lines ahead of
/// its sweep, so that the stores do not wait on those reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stores {
    /// Streaming stores when the call's output (y, or dx) is at least half the last-level cache
    /// the system reports — with an input of the same size, more than the cache holds — and at
    /// least 16 MiB, at most 32 MiB (a virtual machine reports the host's whole cache, shared
    /// with its neighbours); ordinary stores otherwise (see `docs/performance.md`).
    #[default]
    Auto,
    /// Always ordinary stores (y stays in cache).
    Cached,
    /// Streaming stores whatever the size, where the instruction set has them (x86-64); ordinary
    /// stores elsewhere.
    Streaming,
}

impl Stores {
    /// Whether a call writing `out_bytes` of output (y, or dx) streams its stores.
    fn stream(self, out_bytes: usize) -> bool {
        match self {
            Stores::Auto => out_bytes >= driver::stream_min_bytes(),
            Stores::Cached => false,
            Stores::Streaming => true,
        }
    }
}

/// A CPU "device" buffer: a host vector of one dtype.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuBuffer(pub HostVec);

impl Storage for CpuBuffer {
    fn dtype(&self) -> DType {
        self.0.dtype()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

impl CpuBackend {
    /// Registry name.
    pub const NAME: &'static str = "cpu";

    /// A backend that runs on the rayon pool current at each call.
    pub fn new() -> CpuBackend {
        CpuBackend::default()
    }

    /// A backend that runs every call inside `pool`.
    pub fn with_pool(pool: Arc<rayon::ThreadPool>) -> CpuBackend {
        CpuBackend { pool: Some(pool), ..CpuBackend::default() }
    }

    /// This backend, writing its outputs (the forward's y, the backward's dx) as `stores` says
    /// (default: [`Stores::Auto`]).
    pub fn with_stores(self, stores: Stores) -> CpuBackend {
        CpuBackend { stores, ..self }
    }

    /// Runs `f` on this backend's pool — but only when the problem is large enough to be split:
    /// handing a job to another thread costs tens of microseconds, more than a small problem.
    fn run<R: Send>(&self, numel: usize, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) if driver::is_parallel(numel) => p.install(f),
            _ => f(),
        }
    }

    /// Forward over typed slices into caller-owned outputs (see [`Normalize::forward`] for the
    /// lengths). Validates everything first.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_into<T: CpuElement>(
        &self,
        spec: &NormSpec,
        x: &[T],
        gamma: Option<&[T]>,
        beta: Option<&[T]>,
        y: &mut [T],
        mean: &mut [T::Acc],
        rstd: &mut [T::Acc],
    ) -> Result<()> {
        validate_forward(
            spec,
            &ForwardArgs::new(
                T::host(x),
                gamma.map(T::host),
                beta.map(T::host),
                T::host_mut(y),
                T::Acc::host_mut(mean),
                T::Acc::host_mut(rstd),
            ),
        )?;
        check_kind(spec.kind)?;
        let out = driver::Out::new(self.stores.stream(size_of_val(y)), size_of_val(y));
        self.run(x.len(), || driver::forward(spec.n, spec.eps, x, gamma, beta, y, mean, rstd, out));
        Ok(())
    }

    /// Backward over typed slices into caller-owned outputs. `dgamma`/`dbeta` may be `None` to
    /// skip a gradient. Validates everything first.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_into<T: CpuElement>(
        &self,
        spec: &NormSpec,
        x: &[T],
        dy: &[T],
        mean: &[T::Acc],
        rstd: &[T::Acc],
        gamma: Option<&[T]>,
        dx: &mut [T],
        mut dgamma: Option<&mut [T]>,
        mut dbeta: Option<&mut [T]>,
    ) -> Result<()> {
        validate_backward(
            spec,
            &BackwardArgs::new(
                T::host(x),
                T::host(dy),
                T::Acc::host(mean),
                T::Acc::host(rstd),
                gamma.map(T::host),
                T::host_mut(dx),
                dgamma.as_deref_mut().map(T::host_mut),
                dbeta.as_deref_mut().map(T::host_mut),
            ),
        )?;
        check_kind(spec.kind)?;
        let stream = self.stores.stream(size_of_val(dx));
        self.run(x.len(), || {
            driver::backward(spec.n, x, dy, mean, rstd, gamma, dx, dgamma, dbeta, stream)
        });
        Ok(())
    }

    fn forward_typed<T: CpuElement>(
        &self,
        spec: &NormSpec,
        a: ForwardArgs<&CpuBuffer, &mut CpuBuffer>,
    ) -> Result<()> {
        let x = typed::<T>("x", a.x)?;
        let gamma = a.gamma.map(|g| typed::<T>("gamma", g)).transpose()?;
        let beta = a.beta.map(|b| typed::<T>("beta", b)).transpose()?;
        let y = typed_mut::<T>("y", a.y)?;
        let mean = typed_mut::<T::Acc>("mean", a.mean)?;
        let rstd = typed_mut::<T::Acc>("rstd", a.rstd)?;
        self.forward_into(spec, x, gamma, beta, y, mean, rstd)
    }

    fn backward_typed<T: CpuElement>(
        &self,
        spec: &NormSpec,
        a: BackwardArgs<&CpuBuffer, &mut CpuBuffer>,
    ) -> Result<()> {
        let x = typed::<T>("x", a.x)?;
        let dy = typed::<T>("dy", a.dy)?;
        let mean = typed::<T::Acc>("mean", a.mean)?;
        let rstd = typed::<T::Acc>("rstd", a.rstd)?;
        let gamma = a.gamma.map(|g| typed::<T>("gamma", g)).transpose()?;
        let dx = typed_mut::<T>("dx", a.dx)?;
        let dgamma = a.dgamma.map(|g| typed_mut::<T>("dgamma", g)).transpose()?;
        let dbeta = a.dbeta.map(|b| typed_mut::<T>("dbeta", b)).transpose()?;
        self.backward_into(spec, x, dy, mean, rstd, gamma, dx, dgamma, dbeta)
    }
}

impl CpuBackend {
    /// The host layer's forward, in place on the caller's slices (no upload or download).
    fn forward_host_typed<T: CpuElement>(
        &self,
        spec: &NormSpec,
        a: &mut HostForward<'_>,
    ) -> Result<()> {
        let x = host::<T>("x", a.x)?;
        let gamma = a.gamma.map(|g| host::<T>("gamma", g)).transpose()?;
        let beta = a.beta.map(|b| host::<T>("beta", b)).transpose()?;
        let y = host_mut::<T>("y", a.y.reborrow())?;
        let mean = host_mut::<T::Acc>("mean", a.mean.reborrow())?;
        let rstd = host_mut::<T::Acc>("rstd", a.rstd.reborrow())?;
        self.forward_into(spec, x, gamma, beta, y, mean, rstd)
    }

    /// The host layer's backward, in place on the caller's slices.
    fn backward_host_typed<T: CpuElement>(
        &self,
        spec: &NormSpec,
        a: &mut HostBackward<'_>,
    ) -> Result<()> {
        let x = host::<T>("x", a.x)?;
        let dy = host::<T>("dy", a.dy)?;
        let mean = host::<T::Acc>("mean", a.mean)?;
        let rstd = host::<T::Acc>("rstd", a.rstd)?;
        let gamma = a.gamma.map(|g| host::<T>("gamma", g)).transpose()?;
        let dx = host_mut::<T>("dx", a.dx.reborrow())?;
        let dgamma =
            a.dgamma.as_mut().map(|g| host_mut::<T>("dgamma", g.reborrow())).transpose()?;
        let dbeta = a.dbeta.as_mut().map(|b| host_mut::<T>("dbeta", b.reborrow())).transpose()?;
        self.backward_into(spec, x, dy, mean, rstd, gamma, dx, dgamma, dbeta)
    }
}

fn host<'a, T: Element>(tensor: &'static str, s: HostSlice<'a>) -> Result<&'a [T]> {
    T::from_host(s).ok_or(Error::DTypeMismatch { tensor, expected: T::DTYPE, got: s.dtype() })
}

fn host_mut<'a, T: Element>(tensor: &'static str, s: HostSliceMut<'a>) -> Result<&'a mut [T]> {
    let got = s.dtype();
    T::from_host_mut(s).ok_or(Error::DTypeMismatch { tensor, expected: T::DTYPE, got })
}

fn check_kind(kind: NormKind) -> Result<()> {
    match kind {
        NormKind::LayerNorm => Ok(()),
        other => {
            Err(Error::UnsupportedKind { backend: CpuBackend::NAME.into(), kind: other.name() })
        }
    }
}

fn typed<'a, T: Element>(tensor: &'static str, b: &'a CpuBuffer) -> Result<&'a [T]> {
    T::from_host(b.0.as_slice()).ok_or(Error::DTypeMismatch {
        tensor,
        expected: T::DTYPE,
        got: b.dtype(),
    })
}

fn typed_mut<'a, T: Element>(tensor: &'static str, b: &'a mut CpuBuffer) -> Result<&'a mut [T]> {
    let got = b.dtype();
    T::from_host_mut(b.0.as_mut_slice()).ok_or(Error::DTypeMismatch {
        tensor,
        expected: T::DTYPE,
        got,
    })
}

impl Normalize for CpuBackend {
    type Buffer = CpuBuffer;

    fn name(&self) -> &str {
        Self::NAME
    }

    fn supports(&self, kind: NormKind, _dtype: DType) -> Result<()> {
        check_kind(kind)
    }

    fn alloc(&self, dtype: DType, len: usize) -> Result<CpuBuffer> {
        Ok(CpuBuffer(HostVec::zeros(dtype, len)))
    }

    fn upload(&self, data: HostSlice<'_>) -> Result<CpuBuffer> {
        Ok(CpuBuffer(HostVec::from_slice(data)))
    }

    fn download(&self, buffer: &CpuBuffer, mut out: HostSliceMut<'_>) -> Result<()> {
        check_download(buffer, &out)?;
        out.as_bytes_mut().copy_from_slice(buffer.0.as_slice().as_bytes());
        Ok(())
    }

    fn output_cache(&self) -> Option<Arc<OutputCache>> {
        Some(self.cache.clone())
    }

    fn forward_on_host(&self, spec: &NormSpec, a: &mut HostForward<'_>) -> Option<Result<()>> {
        Some(match spec.dtype {
            DType::F32 => self.forward_host_typed::<f32>(spec, a),
            DType::F64 => self.forward_host_typed::<f64>(spec, a),
            DType::F16 => self.forward_host_typed::<f16>(spec, a),
            DType::BF16 => self.forward_host_typed::<bf16>(spec, a),
            _ => return None,
        })
    }

    fn backward_on_host(&self, spec: &NormSpec, a: &mut HostBackward<'_>) -> Option<Result<()>> {
        Some(match spec.dtype {
            DType::F32 => self.backward_host_typed::<f32>(spec, a),
            DType::F64 => self.backward_host_typed::<f64>(spec, a),
            DType::F16 => self.backward_host_typed::<f16>(spec, a),
            DType::BF16 => self.backward_host_typed::<bf16>(spec, a),
            _ => return None,
        })
    }

    fn run_forward(&self, spec: &NormSpec, a: Forward<'_, CpuBuffer>) -> Result<()> {
        match spec.dtype {
            DType::F32 => self.forward_typed::<f32>(spec, a),
            DType::F64 => self.forward_typed::<f64>(spec, a),
            DType::F16 => self.forward_typed::<f16>(spec, a),
            DType::BF16 => self.forward_typed::<bf16>(spec, a),
            other => Err(Error::UnsupportedDType {
                backend: Self::NAME.into(),
                dtype: other,
                reason: String::new(),
            }),
        }
    }

    fn run_backward(
        &self,
        spec: &NormSpec,
        a: layernorm_core::Backward<'_, CpuBuffer>,
    ) -> Result<()> {
        match spec.dtype {
            DType::F32 => self.backward_typed::<f32>(spec, a),
            DType::F64 => self.backward_typed::<f64>(spec, a),
            DType::F16 => self.backward_typed::<f16>(spec, a),
            DType::BF16 => self.backward_typed::<bf16>(spec, a),
            other => Err(Error::UnsupportedDType {
                backend: Self::NAME.into(),
                dtype: other,
                reason: String::new(),
            }),
        }
    }
}
