//! The [`Normalize`] trait, its argument bundles, validation, and the host-slice layer on top.
//!
//! # Why the trait looks like this
//!
//! - **Data stays where it is.** A backend names its own storage ([`Normalize::Buffer`]: a `Vec` on
//!   the CPU, a `wgpu::Buffer`, a `CudaSlice`), and `forward`/`backward` take and fill those. A caller
//!   who keeps activations on a GPU never pays a host round trip; [`Normalize::upload`] and
//!   [`Normalize::download`] move data when they do want it.
//! - **Validation is not optional.** The entry points [`Normalize::forward`] and
//!   [`Normalize::backward`] are provided methods that check the problem and every argument (dtype,
//!   length, presence of γ/β) before calling the backend's `run_*` method. A backend therefore
//!   implements only the math, and no backend can be handed a malformed problem.
//! - **Few required methods.** Seven: name, capability check, three to move memory, two to compute.
//!   Everything else (the host-slice API used by applications and by the conformance suite) is
//!   derived once, in [`HostNormalize`], for every backend.
//! - **dtype-erased buffers.** A buffer knows its dtype and length ([`Storage`]); the problem
//!   ([`NormSpec`]) says which dtype is expected. One trait object can then serve every dtype, which
//!   is what run-time backend selection needs.
//! - **A family, not one op.** [`NormSpec::kind`] says which normalization; RMSNorm and fused
//!   variants are new kinds (and, where they need more tensors, new optional fields of the argument
//!   bundles, which are `#[non_exhaustive]`).

use std::sync::Arc;

use crate::cache::{Out, OutputCache};

use crate::{DType, Element, Error, HostSlice, HostSliceMut, NormKind, NormSpec, Result};

/// Anything with a dtype and a length: device buffers, and host slices.
pub trait Storage {
    /// Element dtype.
    fn dtype(&self) -> DType;
    /// Number of elements.
    fn len(&self) -> usize;
    /// Whether there are no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<S: Storage + ?Sized> Storage for &S {
    fn dtype(&self) -> DType {
        (**self).dtype()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
}

impl<S: Storage + ?Sized> Storage for &mut S {
    fn dtype(&self) -> DType {
        (**self).dtype()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
}

impl Storage for HostSlice<'_> {
    fn dtype(&self) -> DType {
        HostSlice::dtype(self)
    }
    fn len(&self) -> usize {
        HostSlice::len(self)
    }
}

impl Storage for HostSliceMut<'_> {
    fn dtype(&self) -> DType {
        HostSliceMut::dtype(self)
    }
    fn len(&self) -> usize {
        HostSliceMut::len(self)
    }
}

/// Arguments of a forward pass: inputs of type `I`, outputs of type `O`.
///
/// On a device these are `&B` and `&mut B` ([`Forward`]); on the host, [`HostSlice`] and
/// [`HostSliceMut`] ([`HostForward`]). Lengths: `x`, `y`: rows × N; `gamma`, `beta`: N;
/// `mean`, `rstd`: rows, in [`DType::acc`] of the storage dtype.
#[derive(Debug)]
#[non_exhaustive]
pub struct ForwardArgs<I, O> {
    /// Input, rows × N.
    pub x: I,
    /// Scale γ (N), present iff [`NormSpec::gamma`].
    pub gamma: Option<I>,
    /// Shift β (N), present iff [`NormSpec::beta`].
    pub beta: Option<I>,
    /// Output, rows × N.
    pub y: O,
    /// Per-row mean (rows), saved for the backward.
    pub mean: O,
    /// Per-row 1/sqrt(var + eps) (rows), saved for the backward.
    pub rstd: O,
}

impl<I, O> ForwardArgs<I, O> {
    /// Bundles the arguments.
    pub fn new(x: I, gamma: Option<I>, beta: Option<I>, y: O, mean: O, rstd: O) -> Self {
        ForwardArgs { x, gamma, beta, y, mean, rstd }
    }
}

/// Arguments of a backward pass.
///
/// `dgamma`/`dbeta` are optional even when γ/β exist: pass `None` to skip computing a gradient
/// (PyTorch's output mask). Passing one for a parameter the problem does not have is an error.
#[derive(Debug)]
#[non_exhaustive]
pub struct BackwardArgs<I, O> {
    /// The forward's input, rows × N.
    pub x: I,
    /// Gradient of the loss with respect to y, rows × N.
    pub dy: I,
    /// The forward's saved mean (rows).
    pub mean: I,
    /// The forward's saved rstd (rows).
    pub rstd: I,
    /// γ (N), present iff [`NormSpec::gamma`].
    pub gamma: Option<I>,
    /// Output: gradient with respect to x, rows × N.
    pub dx: O,
    /// Output: gradient with respect to γ (N), summed over rows.
    pub dgamma: Option<O>,
    /// Output: gradient with respect to β (N), summed over rows.
    pub dbeta: Option<O>,
}

impl<I, O> BackwardArgs<I, O> {
    /// Bundles the arguments.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        x: I,
        dy: I,
        mean: I,
        rstd: I,
        gamma: Option<I>,
        dx: O,
        dgamma: Option<O>,
        dbeta: Option<O>,
    ) -> Self {
        BackwardArgs { x, dy, mean, rstd, gamma, dx, dgamma, dbeta }
    }
}

/// Forward arguments over a backend's own buffers.
pub type Forward<'a, B> = ForwardArgs<&'a B, &'a mut B>;
/// Backward arguments over a backend's own buffers.
pub type Backward<'a, B> = BackwardArgs<&'a B, &'a mut B>;
/// Forward arguments over host slices.
pub type HostForward<'a> = ForwardArgs<HostSlice<'a>, HostSliceMut<'a>>;
/// Backward arguments over host slices.
pub type HostBackward<'a> = BackwardArgs<HostSlice<'a>, HostSliceMut<'a>>;

fn check(tensor: &'static str, s: &impl Storage, dtype: DType, len: usize) -> Result<()> {
    if s.dtype() != dtype {
        return Err(Error::DTypeMismatch { tensor, expected: dtype, got: s.dtype() });
    }
    if s.len() != len {
        return Err(Error::ShapeMismatch { tensor, expected: len, got: s.len() });
    }
    Ok(())
}

fn check_opt<S: Storage>(
    tensor: &'static str,
    s: Option<&S>,
    wanted: bool,
    required: bool,
    dtype: DType,
    len: usize,
) -> Result<()> {
    match s {
        Some(s) if wanted => check(tensor, s, dtype, len),
        Some(_) => Err(Error::ParameterMismatch { tensor, passed: true }),
        None if wanted && required => Err(Error::ParameterMismatch { tensor, passed: false }),
        None => Ok(()),
    }
}

/// Checks a forward problem and its arguments: the spec itself, then every tensor's presence,
/// dtype and length, in argument order. The first problem found is returned.
pub fn validate_forward<I: Storage, O: Storage>(
    spec: &NormSpec,
    a: &ForwardArgs<I, O>,
) -> Result<()> {
    spec.validate()?;
    let (dt, st, numel) = (spec.dtype, spec.stats_dtype(), spec.numel());
    check("x", &a.x, dt, numel)?;
    check_opt("gamma", a.gamma.as_ref(), spec.gamma, true, dt, spec.n)?;
    check_opt("beta", a.beta.as_ref(), spec.beta, true, dt, spec.n)?;
    check("y", &a.y, dt, numel)?;
    check("mean", &a.mean, st, spec.rows)?;
    check("rstd", &a.rstd, st, spec.rows)
}

/// Checks a backward problem and its arguments, like [`validate_forward`].
pub fn validate_backward<I: Storage, O: Storage>(
    spec: &NormSpec,
    a: &BackwardArgs<I, O>,
) -> Result<()> {
    spec.validate()?;
    let (dt, st, numel) = (spec.dtype, spec.stats_dtype(), spec.numel());
    check("x", &a.x, dt, numel)?;
    check("dy", &a.dy, dt, numel)?;
    check("mean", &a.mean, st, spec.rows)?;
    check("rstd", &a.rstd, st, spec.rows)?;
    check_opt("gamma", a.gamma.as_ref(), spec.gamma, true, dt, spec.n)?;
    check("dx", &a.dx, dt, numel)?;
    check_opt("dgamma", a.dgamma.as_ref(), spec.gamma, false, dt, spec.n)?;
    check_opt("dbeta", a.dbeta.as_ref(), spec.beta, false, dt, spec.n)
}

/// A normalization backend: LayerNorm forward and backward over the backend's own buffers.
///
/// Implementors provide the seven required methods; callers use [`Normalize::forward`] and
/// [`Normalize::backward`], which validate and then call `run_forward` / `run_backward`.
///
/// # Contract
///
/// - `run_forward` writes every element of `y`, `mean` and `rstd`; `run_backward` writes every
///   element of `dx` and of `dgamma`/`dbeta` when given (zeros when `rows == 0`).
/// - Results match the f64 reference ([`crate::reference`]) within the tolerances of
///   `docs/conformance.md`, for every dtype [`Normalize::supports`] accepts.
/// - `dgamma`/`dbeta` are bitwise reproducible: the same inputs give the same bits on every run
///   and for every thread count.
/// - A non-finite input makes only its own row non-finite (γ/β gradients excepted, which sum
///   over rows). Nothing panics on any input: failures are [`Error`] values.
pub trait Normalize: Send + Sync {
    /// The backend's storage for one tensor of any dtype.
    type Buffer: Storage + Send + Sync;

    /// The backend's registry name (`cpu`, `cuda`, `wgpu`).
    fn name(&self) -> &str;

    /// `Ok` if this backend computes `kind` in `dtype`, else [`Error::UnsupportedDType`] saying why.
    fn supports(&self, kind: NormKind, dtype: DType) -> Result<()>;

    /// A zero-filled buffer of `len` elements.
    fn alloc(&self, dtype: DType, len: usize) -> Result<Self::Buffer>;

    /// Copies host data into a new buffer.
    fn upload(&self, data: HostSlice<'_>) -> Result<Self::Buffer>;

    /// Copies a buffer to the host; `out` must match its dtype and length. Waits for pending work.
    fn download(&self, buffer: &Self::Buffer, out: HostSliceMut<'_>) -> Result<()>;

    /// Computes the forward pass. Called only by [`Normalize::forward`], after validation.
    fn run_forward(&self, spec: &NormSpec, args: Forward<'_, Self::Buffer>) -> Result<()>;

    /// Computes the backward pass. Called only by [`Normalize::backward`], after validation.
    fn run_backward(&self, spec: &NormSpec, args: Backward<'_, Self::Buffer>) -> Result<()>;

    /// What this backend runs on. Used by run-time selection (`auto` prefers real GPUs) and in
    /// reports. The default describes the host CPU.
    fn device(&self) -> DeviceInfo {
        DeviceInfo { kind: DeviceKind::Cpu, name: "host CPU".into() }
    }

    /// Runs a forward pass directly on host memory, for backends whose buffers are host memory
    /// (the CPU): called by the host layer ([`HostNormalize`]) after validation. `None`, the
    /// default, makes the host layer upload the inputs, run, and download the outputs.
    fn forward_on_host(&self, _spec: &NormSpec, _args: &mut HostForward<'_>) -> Option<Result<()>> {
        None
    }

    /// The backward counterpart of [`Normalize::forward_on_host`].
    fn backward_on_host(
        &self,
        _spec: &NormSpec,
        _args: &mut HostBackward<'_>,
    ) -> Option<Result<()>> {
        None
    }

    /// The cache the allocating conveniences ([`HostNormalizeExt`]) draw their outputs from, so
    /// that repeated calls reuse memory instead of faulting in fresh pages; `None` (the default)
    /// allocates plainly.
    fn output_cache(&self) -> Option<Arc<OutputCache>> {
        None
    }

    /// Validates, then runs the forward pass: y, and the per-row mean and rstd.
    fn forward(&self, spec: &NormSpec, args: Forward<'_, Self::Buffer>) -> Result<()> {
        validate_forward(spec, &args)?;
        self.supports(spec.kind, spec.dtype)?;
        self.run_forward(spec, args)
    }

    /// Validates, then runs the backward pass: dx, and dγ/dβ summed over rows.
    fn backward(&self, spec: &NormSpec, args: Backward<'_, Self::Buffer>) -> Result<()> {
        validate_backward(spec, &args)?;
        self.supports(spec.kind, spec.dtype)?;
        self.run_backward(spec, args)
    }
}

/// Checks that a download target matches the buffer; for implementors of [`Normalize::download`].
pub fn check_download(buffer: &impl Storage, out: &HostSliceMut<'_>) -> Result<()> {
    check("download target", out, buffer.dtype(), buffer.len())
}

/// What kind of processor a backend runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeviceKind {
    /// The host CPU.
    Cpu,
    /// A hardware GPU (discrete or integrated).
    Gpu,
    /// A GPU API implemented in software on the CPU (e.g. Mesa's lavapipe/llvmpipe).
    SoftwareGpu,
}

/// A backend's device, for selection and reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The kind of processor.
    pub kind: DeviceKind,
    /// A human-readable name (adapter or GPU name).
    pub name: String,
}

/// The host-slice view of any backend: object safe, so a backend can be chosen at run time
/// (`Box<dyn HostNormalize>`). Implemented for every [`Normalize`] by uploading the inputs,
/// running on the device, and downloading the outputs.
pub trait HostNormalize: Send + Sync {
    /// The backend's registry name.
    fn name(&self) -> &str;
    /// See [`Normalize::supports`].
    fn supports(&self, kind: NormKind, dtype: DType) -> Result<()>;
    /// See [`Normalize::device`].
    fn device(&self) -> DeviceInfo;
    /// Forward over host slices.
    fn forward_host(&self, spec: &NormSpec, args: HostForward<'_>) -> Result<()>;
    /// Backward over host slices.
    fn backward_host(&self, spec: &NormSpec, args: HostBackward<'_>) -> Result<()>;
    /// See [`Normalize::output_cache`].
    fn output_cache(&self) -> Option<Arc<OutputCache>>;
}

impl<B: Normalize> HostNormalize for B {
    fn name(&self) -> &str {
        Normalize::name(self)
    }

    fn supports(&self, kind: NormKind, dtype: DType) -> Result<()> {
        Normalize::supports(self, kind, dtype)
    }

    fn device(&self) -> DeviceInfo {
        Normalize::device(self)
    }

    fn output_cache(&self) -> Option<Arc<OutputCache>> {
        Normalize::output_cache(self)
    }

    fn forward_host(&self, spec: &NormSpec, mut a: HostForward<'_>) -> Result<()> {
        validate_forward(spec, &a)?;
        Normalize::supports(self, spec.kind, spec.dtype)?;
        if let Some(done) = self.forward_on_host(spec, &mut a) {
            return done;
        }
        let x = self.upload(a.x)?;
        let gamma = a.gamma.map(|g| self.upload(g)).transpose()?;
        let beta = a.beta.map(|b| self.upload(b)).transpose()?;
        let mut y = self.alloc(spec.dtype, a.y.len())?;
        let mut mean = self.alloc(spec.stats_dtype(), spec.rows)?;
        let mut rstd = self.alloc(spec.stats_dtype(), spec.rows)?;
        self.run_forward(
            spec,
            ForwardArgs::new(&x, gamma.as_ref(), beta.as_ref(), &mut y, &mut mean, &mut rstd),
        )?;
        self.download(&y, a.y)?;
        self.download(&mean, a.mean)?;
        self.download(&rstd, a.rstd)
    }

    fn backward_host(&self, spec: &NormSpec, mut a: HostBackward<'_>) -> Result<()> {
        validate_backward(spec, &a)?;
        Normalize::supports(self, spec.kind, spec.dtype)?;
        if let Some(done) = self.backward_on_host(spec, &mut a) {
            return done;
        }
        let x = self.upload(a.x)?;
        let dy = self.upload(a.dy)?;
        let mean = self.upload(a.mean)?;
        let rstd = self.upload(a.rstd)?;
        let gamma = a.gamma.map(|g| self.upload(g)).transpose()?;
        let mut dx = self.alloc(spec.dtype, spec.numel())?;
        let mut dgamma = a.dgamma.as_ref().map(|_| self.alloc(spec.dtype, spec.n)).transpose()?;
        let mut dbeta = a.dbeta.as_ref().map(|_| self.alloc(spec.dtype, spec.n)).transpose()?;
        self.run_backward(
            spec,
            BackwardArgs::new(
                &x,
                &dy,
                &mean,
                &rstd,
                gamma.as_ref(),
                &mut dx,
                dgamma.as_mut(),
                dbeta.as_mut(),
            ),
        )?;
        self.download(&dx, a.dx)?;
        if let (Some(buf), Some(out)) = (dgamma.as_ref(), a.dgamma) {
            self.download(buf, out)?;
        }
        if let (Some(buf), Some(out)) = (dbeta.as_ref(), a.dbeta) {
            self.download(buf, out)?;
        }
        Ok(())
    }
}

/// Outputs of a forward pass, as vectors (each returns to the backend's [`OutputCache`] when
/// dropped, if it keeps one; [`Out::into_vec`] keeps it).
#[derive(Clone, Debug, PartialEq)]
pub struct Forwarded<T: Element> {
    /// y, rows × N.
    pub y: Out<T>,
    /// Per-row mean.
    pub mean: Out<T::Acc>,
    /// Per-row rstd.
    pub rstd: Out<T::Acc>,
}

/// Outputs of a backward pass, as vectors (recycled like [`Forwarded`]'s).
#[derive(Clone, Debug, PartialEq)]
pub struct Gradients<T: Element> {
    /// dx, rows × N.
    pub dx: Out<T>,
    /// dγ (N), when the problem has γ.
    pub dgamma: Option<Out<T>>,
    /// dβ (N), when the problem has β.
    pub dbeta: Option<Out<T>>,
}

/// An output vector of `len` elements, from `cache` when there is one.
fn out_vec<T: Element>(cache: &Option<Arc<OutputCache>>, len: usize) -> Out<T> {
    match cache {
        Some(c) => c.vec(len),
        None => Out::detached(vec![T::from_f64(0.0); len]),
    }
}

/// Typed, allocating conveniences over [`HostNormalize`], for any backend (trait objects too).
pub trait HostNormalizeExt: HostNormalize {
    /// Forward over typed slices, allocating the outputs. `spec.dtype` must be `T`'s dtype.
    fn forward_vec<T: Element>(
        &self,
        spec: &NormSpec,
        x: &[T],
        gamma: Option<&[T]>,
        beta: Option<&[T]>,
    ) -> Result<Forwarded<T>> {
        spec.validate()?;
        let cache = self.output_cache();
        let mut out = Forwarded {
            y: out_vec(&cache, x.len()),
            mean: out_vec(&cache, spec.rows),
            rstd: out_vec(&cache, spec.rows),
        };
        self.forward_host(
            spec,
            ForwardArgs::new(
                T::host(x),
                gamma.map(T::host),
                beta.map(T::host),
                T::host_mut(&mut out.y),
                T::Acc::host_mut(&mut out.mean),
                T::Acc::host_mut(&mut out.rstd),
            ),
        )?;
        Ok(out)
    }

    /// Backward over typed slices, allocating the outputs; computes dγ/dβ whenever the problem
    /// has γ/β.
    fn backward_vec<T: Element>(
        &self,
        spec: &NormSpec,
        x: &[T],
        dy: &[T],
        mean: &[T::Acc],
        rstd: &[T::Acc],
        gamma: Option<&[T]>,
    ) -> Result<Gradients<T>> {
        spec.validate()?;
        let cache = self.output_cache();
        let mut out = Gradients {
            dx: out_vec(&cache, x.len()),
            dgamma: spec.gamma.then(|| out_vec(&cache, spec.n)),
            dbeta: spec.beta.then(|| out_vec(&cache, spec.n)),
        };
        self.backward_host(
            spec,
            BackwardArgs::new(
                T::host(x),
                T::host(dy),
                T::Acc::host(mean),
                T::Acc::host(rstd),
                gamma.map(T::host),
                T::host_mut(&mut out.dx),
                out.dgamma.as_mut().map(|v| T::host_mut(v)),
                out.dbeta.as_mut().map(|v| T::host_mut(v)),
            ),
        )?;
        Ok(out)
    }
}

impl<H: HostNormalize + ?Sized> HostNormalizeExt for H {}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd<'a>(
        x: &'a [f32],
        g: Option<&'a [f32]>,
        y: &'a mut [f32],
        m: &'a mut [f32],
        r: &'a mut [f32],
    ) -> HostForward<'a> {
        ForwardArgs::new(
            f32::host(x),
            g.map(f32::host),
            None,
            f32::host_mut(y),
            f32::host_mut(m),
            f32::host_mut(r),
        )
    }

    #[test]
    fn forward_validation_names_the_argument() {
        let spec = NormSpec::layer_norm(2, 3, DType::F32).with_beta(false);
        let (x, g) = ([0.0f32; 6], [1.0f32; 3]);
        let (mut y, mut m, mut r) = ([0.0f32; 6], [0.0f32; 2], [0.0f32; 2]);
        assert_eq!(validate_forward(&spec, &fwd(&x, Some(&g), &mut y, &mut m, &mut r)), Ok(()));
        assert_eq!(
            validate_forward(&spec, &fwd(&x[..5], Some(&g), &mut y, &mut m, &mut r)),
            Err(Error::ShapeMismatch { tensor: "x", expected: 6, got: 5 })
        );
        assert_eq!(
            validate_forward(&spec, &fwd(&x, Some(&g[..2]), &mut y, &mut m, &mut r)),
            Err(Error::ShapeMismatch { tensor: "gamma", expected: 3, got: 2 })
        );
        assert_eq!(
            validate_forward(&spec, &fwd(&x, None, &mut y, &mut m, &mut r)),
            Err(Error::ParameterMismatch { tensor: "gamma", passed: false })
        );
        assert_eq!(
            validate_forward(&spec, &fwd(&x, Some(&g), &mut y, &mut m[..1], &mut r)),
            Err(Error::ShapeMismatch { tensor: "mean", expected: 2, got: 1 })
        );
        let f64spec = spec.clone().with_dtype(DType::F64);
        assert_eq!(
            validate_forward(&f64spec, &fwd(&x, Some(&g), &mut y, &mut m, &mut r)),
            Err(Error::DTypeMismatch { tensor: "x", expected: DType::F64, got: DType::F32 })
        );
    }

    #[test]
    fn backward_validation_allows_skipping_gradients_but_not_extra_ones() {
        let spec = NormSpec::layer_norm(1, 2, DType::F32).with_beta(false);
        let (x, dy, m, r, g) = ([0.0f32; 2], [0.0f32; 2], [0.0f32], [1.0f32], [1.0f32; 2]);
        let (mut dx, mut dg, mut db) = ([0.0f32; 2], [0.0f32; 2], [0.0f32; 2]);
        fn args<'a>(
            ins: [&'a [f32]; 5],
            dg: Option<&'a mut [f32]>,
            db: Option<&'a mut [f32]>,
            dx: &'a mut [f32],
        ) -> HostBackward<'a> {
            let [x, dy, m, r, g] = ins;
            BackwardArgs::new(
                f32::host(x),
                f32::host(dy),
                f32::host(m),
                f32::host(r),
                Some(f32::host(g)),
                f32::host_mut(dx),
                dg.map(f32::host_mut),
                db.map(f32::host_mut),
            )
        }
        let ins = [&x[..], &dy[..], &m[..], &r[..], &g[..]];
        assert_eq!(validate_backward(&spec, &args(ins, None, None, &mut dx)), Ok(()));
        assert_eq!(validate_backward(&spec, &args(ins, Some(&mut dg), None, &mut dx)), Ok(()));
        assert_eq!(
            validate_backward(&spec, &args(ins, Some(&mut dg), Some(&mut db), &mut dx)),
            Err(Error::ParameterMismatch { tensor: "dbeta", passed: true })
        );
        assert_eq!(
            validate_backward(&spec, &args(ins, None, None, &mut dx[..1])),
            Err(Error::ShapeMismatch { tensor: "dx", expected: 2, got: 1 })
        );
    }
}
