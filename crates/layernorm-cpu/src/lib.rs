//! The CPU backend of layernorm: LayerNorm and RMSNorm (with a γ offset) forward and backward on
//! the host, rows in parallel with rayon, in `f32`, `f64`, `f16` and `bf16` (16-bit storage is
//! computed in `f32` and rounded once). Both kinds run through the same kernels: the kind changes
//! only the per-row scalar steps around their sweeps.
//!
//! Three ways in, from most to least general:
//!
//! - [`CpuBackend`] implements [`Normalize`], like every backend; its buffers are host vectors.
//! - [`CpuBackend::forward_into`] / [`CpuBackend::backward_into`]: typed slices in, caller-owned
//!   outputs: no output is allocated (each call allocates only small scratch: the dγ/dβ block
//!   partials, γ/β in the accumulation type where the storage type differs or a γ offset is
//!   added, and for RMSNorm a row of zeros where the kernels keep a mean). Every allocation is
//!   fallible: [`Error::OutOfMemory`], never an abort.
//! - The n-dimensional layer every backend has ([`layernorm_core::NormalizeNd`]:
//!   `cpu.forward_nd(Norm::layer_norm(), &x).gamma(&g).run()`): ndarray views with any number of
//!   leading dims, normalized over the trailing dims like PyTorch's `normalized_shape`;
//!   non-contiguous views are accepted (copied to standard layout first).
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
//! cpu.forward_into(&spec, &x, None, None, &mut y, Some(&mut mean), &mut rstd)?;
//! assert_eq!(mean, [2.0, 10.0]);
//! assert_eq!(&y[3..], &[0.0, 0.0, 0.0]);
//! # Ok::<(), layernorm_core::Error>(())
//! ```

mod columns;
mod driver;
mod element;
mod isa;
mod reduce;
mod row;
mod simd;
mod stage;

use std::sync::Arc;

use layernorm_core::{
    Backend, Backward, BackwardArgs, DType, Element, Error, Forward, ForwardArgs, HostBackward,
    HostForward, HostSlice, HostSliceMut, HostVec, NormKind, NormSpec, Normalize, OutputCache,
    Residual, Result, Storage, bf16, check_download, check_gamma_recoverable, f16,
    validate_backward, validate_forward,
};

/// The unit tests of the modules above, compiled into the library by the `unit-tests` feature
/// (which only the crate's own dev-dependency turns on) and run by `tests/unit.rs`: `cargo test`
/// then compiles the crate once, not a second time as a test harness. Each test is a `pub fn`
/// with no arguments in a module's `tests`.
#[cfg(feature = "unit-tests")]
#[doc(hidden)]
pub mod unit_tests {
    pub use crate::columns::tests as columns;
    pub use crate::driver::tests as driver;
    pub use crate::isa::tests as isa;
    pub use crate::reduce::backward::tests as reduce_backward;
    pub use crate::reduce::forward::tests as reduce_forward;
    pub use crate::reduce::half::tests as reduce_half;
    pub use crate::reduce::store::tests as reduce_store;
    pub use crate::reduce::tests as reduce;
    pub use crate::row::tests as row;
    pub use crate::simd::tests as simd;
    pub use crate::stage::tests as stage;
}

pub use driver::ROW_BLOCK;
pub use element::CpuElement;
pub use isa::instruction_set;

/// The CPU backend. Cheap to create and to clone.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend {
    pool: Option<Arc<rayon::ThreadPool>>,
    stores: Stores,
    /// Where the allocating calls (the n-d layer's `forward_nd`, …) take their outputs from and
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

    /// Forward over typed slices into caller-owned outputs (see [`ForwardArgs`] for the
    /// lengths; `mean` is `None` for RMSNorm). Validates everything first. A fused residual goes
    /// through [`CpuBackend::forward_typed`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward_into<T: CpuElement>(
        &self,
        spec: &NormSpec,
        x: &[T],
        gamma: Option<&[T]>,
        beta: Option<&[T]>,
        y: &mut [T],
        mean: Option<&mut [T::Acc]>,
        rstd: &mut [T::Acc],
    ) -> Result<()> {
        let args = ForwardArgs::new(
            T::host(x),
            gamma.map(T::host),
            beta.map(T::host),
            T::host_mut(y),
            mean.map(T::Acc::host_mut),
            T::Acc::host_mut(rstd),
        );
        self.forward_typed::<T>(spec, args)
    }

    /// Backward over typed slices into caller-owned outputs, from x (`mean` is `None` for
    /// RMSNorm). `dgamma`/`dbeta` may be `None` to skip a gradient. Validates everything first.
    /// The backward from y and with dh go through [`CpuBackend::backward_typed`].
    #[allow(clippy::too_many_arguments)]
    pub fn backward_into<T: CpuElement>(
        &self,
        spec: &NormSpec,
        x: &[T],
        dy: &[T],
        mean: Option<&[T::Acc]>,
        rstd: &[T::Acc],
        gamma: Option<&[T]>,
        dx: &mut [T],
        dgamma: Option<&mut [T]>,
        dbeta: Option<&mut [T]>,
    ) -> Result<()> {
        let args = BackwardArgs::new(
            T::host(x),
            T::host(dy),
            mean.map(T::Acc::host),
            T::Acc::host(rstd),
            gamma.map(T::host),
            T::host_mut(dx),
            dgamma.map(T::host_mut),
            dbeta.map(T::host_mut),
        );
        self.backward_typed::<T>(spec, args)
    }

    /// Any forward over host slices of `T` (the host layer's entry, in place on the caller's
    /// slices): validates, then computes.
    pub fn forward_typed<T: CpuElement>(&self, spec: &NormSpec, a: HostForward<'_>) -> Result<()> {
        validate_forward(spec, &a)?;
        let kind = check_kind(spec.kind)?;
        check_dtype::<T>(spec)?;
        let x = host::<T>("x", a.x)?;
        let residual = match a.residual {
            None => None,
            Some(Residual::Add { residual, h }) => Some(driver::Residual::Add {
                residual: host::<T>("residual", residual)?,
                h: host_mut::<T>("h", h)?,
            }),
            Some(Residual::InPlace(r)) => {
                Some(driver::Residual::InPlace(host_mut::<T>("residual", r)?))
            }
        };
        let gamma = a.gamma.map(|g| host::<T>("gamma", g)).transpose()?;
        let beta = a.beta.map(|b| host::<T>("beta", b)).transpose()?;
        let y = host_mut::<T>("y", a.y)?;
        let mean = a.mean.map(|m| host_mut::<T::Acc>("mean", m)).transpose()?;
        let rstd = host_mut::<T::Acc>("rstd", a.rstd)?;
        // With a residual, h is output too.
        let out_bytes = size_of_val(y) * if residual.is_some() { 2 } else { 1 };
        let out = driver::Out::new(self.stores.stream(out_bytes), size_of_val(y));
        let stats = (row::Spec { kind, eps: spec.eps }, spec.gamma_offset_acc());
        self.run(x.len(), || {
            driver::forward(spec.n, stats, x, residual, gamma, beta, y, mean, rstd, out)
        })
    }

    /// Any backward over host slices of `T`: validates, then computes.
    pub fn backward_typed<T: CpuElement>(
        &self,
        spec: &NormSpec,
        a: HostBackward<'_>,
    ) -> Result<()> {
        validate_backward(spec, &a)?;
        let kind = check_kind(spec.kind)?;
        check_dtype::<T>(spec)?;
        let from_y = a.saved.is_output();
        if from_y {
            check_gamma_recoverable(spec, a.gamma)?;
        }
        let saved = host::<T>(a.saved.name(), *a.saved.tensor())?;
        let saved = match from_y {
            true => {
                let beta = a.beta.map(|b| host::<T>("beta", b)).transpose()?;
                driver::Saved::Y { y: saved, beta }
            }
            false => driver::Saved::X(saved),
        };
        let dy = host::<T>("dy", a.dy)?;
        let dh = a.dh.map(|d| host::<T>("dh", d)).transpose()?;
        // From y the mean is not read.
        let mean = a.mean.filter(|_| !from_y).map(|m| host::<T::Acc>("mean", m)).transpose()?;
        let rstd = host::<T::Acc>("rstd", a.rstd)?;
        let gamma = a.gamma.map(|g| host::<T>("gamma", g)).transpose()?;
        let dx = host_mut::<T>("dx", a.dx)?;
        let dgamma = a.dgamma.map(|g| host_mut::<T>("dgamma", g)).transpose()?;
        let dbeta = a.dbeta.map(|b| host_mut::<T>("dbeta", b)).transpose()?;
        let stream = self.stores.stream(size_of_val(dx));
        let kind = (kind, spec.gamma_offset_acc());
        self.run(dy.len(), || {
            driver::backward(
                spec.n, kind, saved, dy, dh, mean, rstd, gamma, dx, dgamma, dbeta, stream,
            )
        })
    }

    fn forward_dispatch(&self, spec: &NormSpec, a: HostForward<'_>) -> Result<()> {
        match spec.dtype {
            DType::F32 => self.forward_typed::<f32>(spec, a),
            DType::F64 => self.forward_typed::<f64>(spec, a),
            DType::F16 => self.forward_typed::<f16>(spec, a),
            DType::BF16 => self.forward_typed::<bf16>(spec, a),
            other => Err(unsupported_dtype(other)),
        }
    }

    fn backward_dispatch(&self, spec: &NormSpec, a: HostBackward<'_>) -> Result<()> {
        match spec.dtype {
            DType::F32 => self.backward_typed::<f32>(spec, a),
            DType::F64 => self.backward_typed::<f64>(spec, a),
            DType::F16 => self.backward_typed::<f16>(spec, a),
            DType::BF16 => self.backward_typed::<bf16>(spec, a),
            other => Err(unsupported_dtype(other)),
        }
    }
}

fn unsupported_dtype(dtype: DType) -> Error {
    Error::UnsupportedDType { backend: CpuBackend::NAME.into(), dtype, reason: String::new() }
}

fn check_dtype<T: Element>(spec: &NormSpec) -> Result<()> {
    if spec.dtype == T::DTYPE {
        Ok(())
    } else {
        Err(Error::DTypeMismatch { tensor: "x", expected: spec.dtype, got: T::DTYPE })
    }
}

fn host<'a, T: Element>(tensor: &'static str, s: HostSlice<'a>) -> Result<&'a [T]> {
    T::from_host(s).ok_or(Error::DTypeMismatch { tensor, expected: T::DTYPE, got: s.dtype() })
}

fn host_mut<'a, T: Element>(tensor: &'static str, s: HostSliceMut<'a>) -> Result<&'a mut [T]> {
    let got = s.dtype();
    T::from_host_mut(s).ok_or(Error::DTypeMismatch { tensor, expected: T::DTYPE, got })
}

/// The kernels' name for a kind this backend computes.
fn check_kind(kind: NormKind) -> Result<row::Kind> {
    match kind {
        NormKind::LayerNorm => Ok(row::Kind::LayerNorm),
        NormKind::RmsNorm => Ok(row::Kind::RmsNorm),
        other => {
            Err(Error::UnsupportedKind { backend: CpuBackend::NAME.into(), kind: other.name() })
        }
    }
}

/// A device-level buffer as the host slice it is.
fn slice(b: &CpuBuffer) -> HostSlice<'_> {
    b.0.as_slice()
}

/// A device-level buffer as the mutable host slice it is.
fn slice_mut(b: &mut CpuBuffer) -> HostSliceMut<'_> {
    b.0.as_mut_slice()
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn supports(&self, kind: NormKind, _dtype: DType) -> Result<()> {
        check_kind(kind).map(|_| ())
    }

    fn output_cache(&self) -> Option<Arc<OutputCache>> {
        Some(self.cache.clone())
    }
}

impl Normalize for CpuBackend {
    type Buffer = CpuBuffer;

    fn alloc(&self, dtype: DType, len: usize) -> Result<CpuBuffer> {
        Ok(CpuBuffer(HostVec::try_zeros("buffer", dtype, len)?))
    }

    fn upload(&self, data: HostSlice<'_>) -> Result<CpuBuffer> {
        let mut v = HostVec::try_zeros("buffer", data.dtype(), data.len())?;
        v.as_mut_slice().as_bytes_mut().copy_from_slice(data.as_bytes());
        Ok(CpuBuffer(v))
    }

    fn download(&self, buffer: &CpuBuffer, mut out: HostSliceMut<'_>) -> Result<()> {
        check_download(buffer, &out)?;
        out.as_bytes_mut().copy_from_slice(buffer.0.as_slice().as_bytes());
        Ok(())
    }

    fn forward_on_host(&self, spec: &NormSpec, a: &mut HostForward<'_>) -> Option<Result<()>> {
        Some(self.forward_dispatch(spec, a.reborrow()))
    }

    fn backward_on_host(&self, spec: &NormSpec, a: &mut HostBackward<'_>) -> Option<Result<()>> {
        Some(self.backward_dispatch(spec, a.reborrow()))
    }

    fn run_forward(&self, spec: &NormSpec, a: Forward<'_, CpuBuffer>) -> Result<()> {
        let args = a.try_map(|_, b| Ok(slice(b)), |_, b| Ok(slice_mut(b)))?;
        self.forward_dispatch(spec, args)
    }

    fn run_backward(&self, spec: &NormSpec, a: Backward<'_, CpuBuffer>) -> Result<()> {
        let args = a.try_map(|_, b| Ok(slice(b)), |_, b| Ok(slice_mut(b)))?;
        // A backward from y checks γ_eff before any output is written (`backward_typed`).
        self.backward_dispatch(spec, args)
    }
}
