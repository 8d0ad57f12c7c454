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
//! - **Few required methods.** Seven: name and capability check ([`Backend`]), three to move
//!   memory, two to compute. Everything else (the host-slice API used by the conformance suite,
//!   and the n-dimensional API applications use) is derived once, in [`HostNormalize`] and
//!   [`crate::NormalizeNd`], for every backend.
//! - **dtype-erased buffers.** A buffer knows its dtype and length ([`Storage`]); the problem
//!   ([`NormSpec`]) says which dtype is expected. One trait object can then serve every dtype, which
//!   is what run-time backend selection needs.
//! - **A family, not one op.** [`NormSpec::kind`] says which normalization (LayerNorm, RMSNorm)
//!   and [`NormSpec::gamma_offset`] how γ scales; the pre-norm variants are optional fields of the
//!   argument bundles: a fused [`Residual`] add in the forward, and in the backward x̂ recovered
//!   from the output ([`Saved::Y`]) and the residual stream's gradient `dh` added to dx.

use std::sync::Arc;

use crate::cache::OutputCache;
use crate::{DType, Error, HostSlice, HostSliceMut, NormKind, NormSpec, Result};

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

/// A fused residual add ahead of the normalization: h = x + residual, rounded once to the storage
/// dtype, and y = norm(h) from that rounded h (`docs/math.md` (14)). h is the next block's
/// residual stream; its statistics and backward are those of a plain normalization of h.
#[derive(Debug)]
pub enum Residual<I, O> {
    /// The residual is read from `residual`, and h written to `h` (rows × N each).
    Add {
        /// The residual stream entering the block, rows × N.
        residual: I,
        /// Output: h = x + residual, rows × N.
        h: O,
    },
    /// The buffer holds the residual on entry and h = x + residual on return (vLLM's
    /// `fused_add_rms_norm`): one tensor fewer.
    InPlace(O),
}

/// What the backward recovers x̂ from.
#[derive(Debug, Clone, Copy)]
pub enum Saved<I> {
    /// The forward's input x (for a fused residual forward, its h), with the saved mean
    /// (LayerNorm) and rstd: x̂ = (x − mean)·rstd, or x·rstd for RMSNorm.
    X(I),
    /// The forward's output y, with γ, β and the saved rstd: x̂ = (y − β) / (γ_offset + γ)
    /// (`docs/math.md` (16)), so that x need not be kept. A column where γ_offset + γ = 0 is
    /// [`Error::SingularGamma`].
    Y(I),
}

impl<I> Saved<I> {
    /// The tensor itself.
    pub fn tensor(&self) -> &I {
        match self {
            Saved::X(t) | Saved::Y(t) => t,
        }
    }

    /// Whether it is the forward's output.
    pub fn is_output(&self) -> bool {
        matches!(self, Saved::Y(_))
    }

    /// The argument's name in messages (`x` or `y`).
    pub fn name(&self) -> &'static str {
        match self {
            Saved::X(_) => "x",
            Saved::Y(_) => "y",
        }
    }
}

/// Arguments of a forward pass: inputs of type `I`, outputs of type `O`.
///
/// On a device these are `&B` and `&mut B` ([`Forward`]); on the host, [`HostSlice`] and
/// [`HostSliceMut`] ([`HostForward`]). Lengths: `x`, `y` (and a residual's tensors): rows × N;
/// `gamma`, `beta`: N; `mean`, `rstd`: rows, in [`DType::acc`] of the storage dtype.
#[derive(Debug)]
#[non_exhaustive]
pub struct ForwardArgs<I, O> {
    /// Input, rows × N.
    pub x: I,
    /// A residual added to x ahead of the normalization ([`Residual`]); `None` normalizes x.
    pub residual: Option<Residual<I, O>>,
    /// Scale γ (N), present iff [`NormSpec::gamma`].
    pub gamma: Option<I>,
    /// Shift β (N), present iff [`NormSpec::beta`].
    pub beta: Option<I>,
    /// Output, rows × N.
    pub y: O,
    /// Per-row mean (rows), saved for the backward: present iff the kind has one
    /// ([`NormSpec::has_mean`]: LayerNorm yes, RMSNorm no).
    pub mean: Option<O>,
    /// Per-row 1/√(var + ε) (LayerNorm) or 1/√(mean(x²) + ε) (RMSNorm), rows, saved for the
    /// backward.
    pub rstd: O,
}

impl<I, O> ForwardArgs<I, O> {
    /// Bundles the arguments of a plain forward (no residual).
    pub fn new(x: I, gamma: Option<I>, beta: Option<I>, y: O, mean: Option<O>, rstd: O) -> Self {
        ForwardArgs { x, residual: None, gamma, beta, y, mean, rstd }
    }

    /// Adds a residual ahead of the normalization.
    pub fn with_residual(mut self, residual: Residual<I, O>) -> Self {
        self.residual = Some(residual);
        self
    }

    /// Converts every tensor, inputs with `fi` and outputs with `fo`, each given the tensor's
    /// name (for messages); the first error is returned. How a backend turns the host layer's
    /// slices or its own buffers into what its kernels take.
    pub fn try_map<I2, O2>(
        self,
        mut fi: impl FnMut(&'static str, I) -> Result<I2>,
        mut fo: impl FnMut(&'static str, O) -> Result<O2>,
    ) -> Result<ForwardArgs<I2, O2>> {
        Ok(ForwardArgs {
            x: fi("x", self.x)?,
            residual: match self.residual {
                Some(Residual::Add { residual, h }) => {
                    Some(Residual::Add { residual: fi("residual", residual)?, h: fo("h", h)? })
                }
                Some(Residual::InPlace(r)) => Some(Residual::InPlace(fo("residual", r)?)),
                None => None,
            },
            gamma: self.gamma.map(|g| fi("gamma", g)).transpose()?,
            beta: self.beta.map(|b| fi("beta", b)).transpose()?,
            y: fo("y", self.y)?,
            mean: self.mean.map(|m| fo("mean", m)).transpose()?,
            rstd: fo("rstd", self.rstd)?,
        })
    }
}

impl<'a> HostForward<'a> {
    /// The same slices, borrowed for a shorter time.
    pub fn reborrow(&mut self) -> HostForward<'_> {
        ForwardArgs {
            x: self.x,
            residual: self.residual.as_mut().map(|r| match r {
                Residual::Add { residual, h } => {
                    Residual::Add { residual: *residual, h: h.reborrow() }
                }
                Residual::InPlace(r) => Residual::InPlace(r.reborrow()),
            }),
            gamma: self.gamma,
            beta: self.beta,
            y: self.y.reborrow(),
            mean: self.mean.as_mut().map(HostSliceMut::reborrow),
            rstd: self.rstd.reborrow(),
        }
    }
}

/// Arguments of a backward pass.
///
/// `dgamma`/`dbeta` are optional even when γ/β exist: pass `None` to skip computing a gradient
/// (PyTorch's output mask). Passing one for a parameter the problem does not have is an error.
#[derive(Debug)]
#[non_exhaustive]
pub struct BackwardArgs<I, O> {
    /// The tensor x̂ is recovered from: the forward's input or its output, rows × N.
    pub saved: Saved<I>,
    /// Gradient of the loss with respect to y, rows × N.
    pub dy: I,
    /// Gradient already arriving on the residual stream h (a fused residual forward's output),
    /// rows × N: added to dx, which is then also the residual's gradient. `None`: zero.
    pub dh: Option<I>,
    /// The forward's saved mean (rows): required for a LayerNorm backward from x, ignored from
    /// y, absent for RMSNorm.
    pub mean: Option<I>,
    /// The forward's saved rstd (rows).
    pub rstd: I,
    /// γ (N), present iff [`NormSpec::gamma`].
    pub gamma: Option<I>,
    /// β (N): required for a backward from y when the problem has β; optional (and unused)
    /// from x.
    pub beta: Option<I>,
    /// Output: gradient with respect to x (and the residual), rows × N.
    pub dx: O,
    /// Output: gradient with respect to γ (N), summed over rows.
    pub dgamma: Option<O>,
    /// Output: gradient with respect to β (N), summed over rows.
    pub dbeta: Option<O>,
}

impl<I, O> BackwardArgs<I, O> {
    /// Bundles the arguments of a backward from x with no residual gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        x: I,
        dy: I,
        mean: Option<I>,
        rstd: I,
        gamma: Option<I>,
        dx: O,
        dgamma: Option<O>,
        dbeta: Option<O>,
    ) -> Self {
        BackwardArgs {
            saved: Saved::X(x),
            dy,
            dh: None,
            mean,
            rstd,
            gamma,
            beta: None,
            dx,
            dgamma,
            dbeta,
        }
    }

    /// Recovers x̂ from the forward's output `y` instead of x, with `beta` (when the problem
    /// has β). Replaces the x given to [`BackwardArgs::new`].
    pub fn from_output(mut self, y: I, beta: Option<I>) -> Self {
        self.saved = Saved::Y(y);
        self.beta = beta;
        self
    }

    /// Adds the gradient arriving on the residual stream to dx.
    pub fn with_dh(mut self, dh: I) -> Self {
        self.dh = Some(dh);
        self
    }

    /// Passes β along (to a backward from x it is optional and unused).
    pub fn with_beta(mut self, beta: Option<I>) -> Self {
        self.beta = beta;
        self
    }

    /// Converts every tensor, like [`ForwardArgs::try_map`].
    pub fn try_map<I2, O2>(
        self,
        mut fi: impl FnMut(&'static str, I) -> Result<I2>,
        mut fo: impl FnMut(&'static str, O) -> Result<O2>,
    ) -> Result<BackwardArgs<I2, O2>> {
        Ok(BackwardArgs {
            saved: match self.saved {
                Saved::X(x) => Saved::X(fi("x", x)?),
                Saved::Y(y) => Saved::Y(fi("y", y)?),
            },
            dy: fi("dy", self.dy)?,
            dh: self.dh.map(|d| fi("dh", d)).transpose()?,
            mean: self.mean.map(|m| fi("mean", m)).transpose()?,
            rstd: fi("rstd", self.rstd)?,
            gamma: self.gamma.map(|g| fi("gamma", g)).transpose()?,
            beta: self.beta.map(|b| fi("beta", b)).transpose()?,
            dx: fo("dx", self.dx)?,
            dgamma: self.dgamma.map(|g| fo("dgamma", g)).transpose()?,
            dbeta: self.dbeta.map(|b| fo("dbeta", b)).transpose()?,
        })
    }
}

impl<'a> HostBackward<'a> {
    /// The same slices, borrowed for a shorter time.
    pub fn reborrow(&mut self) -> HostBackward<'_> {
        BackwardArgs {
            saved: self.saved,
            dy: self.dy,
            dh: self.dh,
            mean: self.mean,
            rstd: self.rstd,
            gamma: self.gamma,
            beta: self.beta,
            dx: self.dx.reborrow(),
            dgamma: self.dgamma.as_mut().map(HostSliceMut::reborrow),
            dbeta: self.dbeta.as_mut().map(HostSliceMut::reborrow),
        }
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
/// dtype and length, in argument order. The first problem found is returned. Nothing is
/// allocated or read.
pub fn validate_forward<I: Storage, O: Storage>(
    spec: &NormSpec,
    a: &ForwardArgs<I, O>,
) -> Result<()> {
    spec.validate()?;
    let (dt, st, numel) = (spec.dtype, spec.stats_dtype(), spec.numel());
    check("x", &a.x, dt, numel)?;
    match &a.residual {
        Some(Residual::Add { residual, h }) => {
            check("residual", residual, dt, numel)?;
            check("h", h, dt, numel)?;
        }
        Some(Residual::InPlace(r)) => check("residual", r, dt, numel)?,
        None => {}
    }
    check_opt("gamma", a.gamma.as_ref(), spec.gamma, true, dt, spec.n)?;
    check_opt("beta", a.beta.as_ref(), spec.beta, true, dt, spec.n)?;
    check("y", &a.y, dt, numel)?;
    check_opt("mean", a.mean.as_ref(), spec.has_mean(), true, st, spec.rows)?;
    check("rstd", &a.rstd, st, spec.rows)
}

/// Checks a backward problem and its arguments, like [`validate_forward`].
pub fn validate_backward<I: Storage, O: Storage>(
    spec: &NormSpec,
    a: &BackwardArgs<I, O>,
) -> Result<()> {
    spec.validate()?;
    let (dt, st, numel) = (spec.dtype, spec.stats_dtype(), spec.numel());
    let from_y = a.saved.is_output();
    check(a.saved.name(), a.saved.tensor(), dt, numel)?;
    check("dy", &a.dy, dt, numel)?;
    check_opt("dh", a.dh.as_ref(), true, false, dt, numel)?;
    check_opt("mean", a.mean.as_ref(), spec.has_mean(), !from_y, st, spec.rows)?;
    check("rstd", &a.rstd, st, spec.rows)?;
    check_opt("gamma", a.gamma.as_ref(), spec.gamma, true, dt, spec.n)?;
    check_opt("beta", a.beta.as_ref(), spec.beta, from_y, dt, spec.n)?;
    check("dx", &a.dx, dt, numel)?;
    check_opt("dgamma", a.dgamma.as_ref(), spec.gamma, false, dt, spec.n)?;
    check_opt("dbeta", a.dbeta.as_ref(), spec.beta, false, dt, spec.n)
}

/// For a backward from the output: [`Error::SingularGamma`] at the first column where
/// γ_offset + γ is 0 (in the accumulation type the backends compute in), else `Ok`. Host
/// layers call it with γ on the host; a backend whose γ lives on a device checks its own copy
/// before writing any output.
pub fn check_gamma_recoverable(spec: &NormSpec, gamma: Option<HostSlice<'_>>) -> Result<()> {
    let Some(g) = gamma else { return Ok(()) };
    let (acc, offset) = (spec.stats_dtype(), spec.gamma_offset_acc());
    let values = g.to_f64_vec();
    match values.iter().position(|&v| acc.round(offset + v) == 0.0) {
        Some(column) => {
            Err(Error::SingularGamma { column, gamma: values[column], offset: spec.gamma_offset })
        }
        None => Ok(()),
    }
}

/// What every backend says about itself, shared by the device-level [`Normalize`] and the
/// host-level [`HostNormalize`] (one definition, so `use layernorm::*` never makes
/// `backend.name()` ambiguous).
pub trait Backend: Send + Sync {
    /// The backend's registry name (`cpu`, `cuda`, `wgpu`).
    fn name(&self) -> &str;

    /// `Ok` if this backend computes `kind` in `dtype`, else [`Error::UnsupportedDType`] or
    /// [`Error::UnsupportedKind`] saying why.
    fn supports(&self, kind: NormKind, dtype: DType) -> Result<()>;

    /// `Ok` if this backend computes `spec` as described: it [`Backend::supports`] the kind and
    /// dtype, and its arithmetic can represent every value of the problem (a backend computing in
    /// `f32` on a GPU refuses an ε below the smallest normal `f32` with [`Error::Unsupported`]
    /// rather than computing with another ε). Called after validation and before anything is
    /// allocated, by every entry point. The default checks [`Backend::supports`] only.
    fn accepts(&self, spec: &NormSpec) -> Result<()> {
        self.supports(spec.kind, spec.dtype)
    }

    /// What this backend runs on. Used by run-time selection (`auto` prefers real GPUs) and in
    /// reports. The default describes the host CPU.
    fn device(&self) -> DeviceInfo {
        DeviceInfo { kind: DeviceKind::Cpu, name: "host CPU".into() }
    }

    /// The cache the allocating conveniences ([`crate::NormalizeNd`]) draw their outputs from,
    /// so that repeated calls reuse memory instead of faulting in fresh pages; `None` (the
    /// default) allocates plainly.
    fn output_cache(&self) -> Option<Arc<OutputCache>> {
        None
    }
}

/// A normalization backend: the family's forward and backward over the backend's own buffers.
///
/// Implementors provide [`Backend`] and the five required methods here; callers use
/// [`Normalize::forward`] and [`Normalize::backward`], which validate and then call
/// `run_forward` / `run_backward`.
///
/// # Contract
///
/// - `run_forward` writes every element of `y`, `rstd`, `mean` when given and h when a residual
///   is given; `run_backward` writes every element of `dx` and of `dgamma`/`dbeta` when given
///   (zeros when `rows == 0`).
/// - Every [`NormKind`] the backend [`Backend::supports`], with a γ offset, a fused residual
///   (added, or in place) and a backward from x or from y with or without dh.
/// - Results match the f64 reference ([`crate::reference`]) within the tolerances of
///   `docs/conformance.md`, for every dtype [`Backend::supports`] accepts.
/// - `dgamma`/`dbeta` are bitwise reproducible: the same inputs give the same bits on every run
///   and for every thread count.
/// - A non-finite input makes only its own row non-finite (γ/β gradients excepted, which sum
///   over rows). Nothing panics or aborts on any input: failures are [`Error`] values.
pub trait Normalize: Backend {
    /// The backend's storage for one tensor of any dtype.
    type Buffer: Storage + Send + Sync;

    /// A zero-filled buffer of `len` elements.
    fn alloc(&self, dtype: DType, len: usize) -> Result<Self::Buffer>;

    /// Copies host data into a new buffer.
    fn upload(&self, data: HostSlice<'_>) -> Result<Self::Buffer>;

    /// Copies a buffer to the host; `out` must match its dtype and length. Waits for pending work.
    fn download(&self, buffer: &Self::Buffer, out: HostSliceMut<'_>) -> Result<()>;

    /// Computes the forward pass. Called only by [`Normalize::forward`], after validation.
    fn run_forward(&self, spec: &NormSpec, args: Forward<'_, Self::Buffer>) -> Result<()>;

    /// Computes the backward pass. Called only by [`Normalize::backward`], after validation.
    /// A backward from y checks γ ([`check_gamma_recoverable`]) before writing anything.
    fn run_backward(&self, spec: &NormSpec, args: Backward<'_, Self::Buffer>) -> Result<()>;

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

    /// Validates, then runs the forward pass: y, the saved statistics, and h with a residual.
    fn forward(&self, spec: &NormSpec, args: Forward<'_, Self::Buffer>) -> Result<()> {
        validate_forward(spec, &args)?;
        self.accepts(spec)?;
        self.run_forward(spec, args)
    }

    /// Validates, then runs the backward pass: dx (plus dh), and dγ/dβ summed over rows.
    fn backward(&self, spec: &NormSpec, args: Backward<'_, Self::Buffer>) -> Result<()> {
        validate_backward(spec, &args)?;
        self.accepts(spec)?;
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
/// running on the device, and downloading the outputs (the CPU backend computes on the slices
/// in place). The typed, n-dimensional layer on top is [`crate::NormalizeNd`].
pub trait HostNormalize: Backend {
    /// Forward over host slices. Validates everything before allocating or computing.
    fn forward_host(&self, spec: &NormSpec, args: HostForward<'_>) -> Result<()>;
    /// Backward over host slices. Validates everything before allocating or computing.
    fn backward_host(&self, spec: &NormSpec, args: HostBackward<'_>) -> Result<()>;
}

impl<B: Normalize> HostNormalize for B {
    fn forward_host(&self, spec: &NormSpec, mut a: HostForward<'_>) -> Result<()> {
        validate_forward(spec, &a)?;
        self.accepts(spec)?;
        if let Some(done) = self.forward_on_host(spec, &mut a) {
            return done;
        }
        let x = self.upload(a.x)?;
        let gamma = a.gamma.map(|g| self.upload(g)).transpose()?;
        let beta = a.beta.map(|b| self.upload(b)).transpose()?;
        let (res_in, mut res_out) = match &a.residual {
            Some(Residual::Add { residual, .. }) => {
                (Some(self.upload(*residual)?), Some(self.alloc(spec.dtype, spec.numel())?))
            }
            Some(Residual::InPlace(r)) => (None, Some(self.upload(r.as_slice())?)),
            None => (None, None),
        };
        let mut y = self.alloc(spec.dtype, spec.numel())?;
        let mut mean =
            a.mean.as_ref().map(|_| self.alloc(spec.stats_dtype(), spec.rows)).transpose()?;
        let mut rstd = self.alloc(spec.stats_dtype(), spec.rows)?;
        let mut args =
            ForwardArgs::new(&x, gamma.as_ref(), beta.as_ref(), &mut y, mean.as_mut(), &mut rstd);
        args.residual = match (res_in.as_ref(), res_out.as_mut()) {
            (Some(r), Some(h)) => Some(Residual::Add { residual: r, h }),
            (None, Some(r)) => Some(Residual::InPlace(r)),
            _ => None,
        };
        self.run_forward(spec, args)?;
        self.download(&y, a.y)?;
        if let (Some(buf), Some(out)) = (mean.as_ref(), a.mean) {
            self.download(buf, out)?;
        }
        self.download(&rstd, a.rstd)?;
        match (res_out.as_ref(), a.residual) {
            (Some(buf), Some(Residual::Add { h, .. })) => self.download(buf, h),
            (Some(buf), Some(Residual::InPlace(r))) => self.download(buf, r),
            _ => Ok(()),
        }
    }

    fn backward_host(&self, spec: &NormSpec, mut a: HostBackward<'_>) -> Result<()> {
        validate_backward(spec, &a)?;
        self.accepts(spec)?;
        if a.saved.is_output() {
            check_gamma_recoverable(spec, a.gamma)?;
        }
        if let Some(done) = self.backward_on_host(spec, &mut a) {
            return done;
        }
        let saved = match a.saved {
            Saved::X(x) => Saved::X(self.upload(x)?),
            Saved::Y(y) => Saved::Y(self.upload(y)?),
        };
        let dy = self.upload(a.dy)?;
        let dh = a.dh.map(|d| self.upload(d)).transpose()?;
        let mean = a.mean.map(|m| self.upload(m)).transpose()?;
        let rstd = self.upload(a.rstd)?;
        let gamma = a.gamma.map(|g| self.upload(g)).transpose()?;
        let beta = a.beta.map(|b| self.upload(b)).transpose()?;
        let mut dx = self.alloc(spec.dtype, spec.numel())?;
        let mut dgamma = a.dgamma.as_ref().map(|_| self.alloc(spec.dtype, spec.n)).transpose()?;
        let mut dbeta = a.dbeta.as_ref().map(|_| self.alloc(spec.dtype, spec.n)).transpose()?;
        let args = BackwardArgs {
            saved: match &saved {
                Saved::X(x) => Saved::X(x),
                Saved::Y(y) => Saved::Y(y),
            },
            dy: &dy,
            dh: dh.as_ref(),
            mean: mean.as_ref(),
            rstd: &rstd,
            gamma: gamma.as_ref(),
            beta: beta.as_ref(),
            dx: &mut dx,
            dgamma: dgamma.as_mut(),
            dbeta: dbeta.as_mut(),
        };
        self.run_backward(spec, args)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Element;

    fn fwd<'a>(
        x: &'a [f32],
        g: Option<&'a [f32]>,
        y: &'a mut [f32],
        m: Option<&'a mut [f32]>,
        r: &'a mut [f32],
    ) -> HostForward<'a> {
        ForwardArgs::new(
            f32::host(x),
            g.map(f32::host),
            None,
            f32::host_mut(y),
            m.map(f32::host_mut),
            f32::host_mut(r),
        )
    }

    #[test]
    fn forward_validation_names_the_argument() {
        let spec = NormSpec::layer_norm(2, 3, DType::F32).with_beta(false);
        let (x, g) = ([0.0f32; 6], [1.0f32; 3]);
        let (mut y, mut m, mut r) = ([0.0f32; 6], [0.0f32; 2], [0.0f32; 2]);
        let ok = validate_forward(&spec, &fwd(&x, Some(&g), &mut y, Some(&mut m), &mut r));
        assert_eq!(ok, Ok(()));
        assert_eq!(
            validate_forward(&spec, &fwd(&x[..5], Some(&g), &mut y, Some(&mut m), &mut r)),
            Err(Error::ShapeMismatch { tensor: "x", expected: 6, got: 5 })
        );
        assert_eq!(
            validate_forward(&spec, &fwd(&x, Some(&g[..2]), &mut y, Some(&mut m), &mut r)),
            Err(Error::ShapeMismatch { tensor: "gamma", expected: 3, got: 2 })
        );
        assert_eq!(
            validate_forward(&spec, &fwd(&x, None, &mut y, Some(&mut m), &mut r)),
            Err(Error::ParameterMismatch { tensor: "gamma", passed: false })
        );
        assert_eq!(
            validate_forward(&spec, &fwd(&x, Some(&g), &mut y, Some(&mut m[..1]), &mut r)),
            Err(Error::ShapeMismatch { tensor: "mean", expected: 2, got: 1 })
        );
        assert_eq!(
            validate_forward(&spec, &fwd(&x, Some(&g), &mut y, None, &mut r)),
            Err(Error::ParameterMismatch { tensor: "mean", passed: false })
        );
        let f64spec = spec.clone().with_dtype(DType::F64);
        assert_eq!(
            validate_forward(&f64spec, &fwd(&x, Some(&g), &mut y, Some(&mut m), &mut r)),
            Err(Error::DTypeMismatch { tensor: "x", expected: DType::F64, got: DType::F32 })
        );
        // RMSNorm has no mean: passing one is an error, not a silently ignored buffer.
        let rms = NormSpec::rms_norm(2, 3, DType::F32);
        assert_eq!(validate_forward(&rms, &fwd(&x, Some(&g), &mut y, None, &mut r)), Ok(()));
        assert_eq!(
            validate_forward(&rms, &fwd(&x, Some(&g), &mut y, Some(&mut m), &mut r)),
            Err(Error::ParameterMismatch { tensor: "mean", passed: true })
        );
    }

    #[test]
    fn a_residual_is_checked_like_x() {
        let spec = NormSpec::rms_norm(2, 3, DType::F32);
        let (x, g, res) = ([0.0f32; 6], [1.0f32; 3], [0.0f32; 5]);
        let (mut y, mut r, mut h) = ([0.0f32; 6], [0.0f32; 2], [0.0f32; 6]);
        let a = fwd(&x, Some(&g), &mut y, None, &mut r)
            .with_residual(Residual::Add { residual: f32::host(&res), h: f32::host_mut(&mut h) });
        assert_eq!(
            validate_forward(&spec, &a),
            Err(Error::ShapeMismatch { tensor: "residual", expected: 6, got: 5 })
        );
        let mut inplace = [0.0f32; 6];
        let a = fwd(&x, Some(&g), &mut y, None, &mut r)
            .with_residual(Residual::InPlace(f32::host_mut(&mut inplace)));
        assert_eq!(validate_forward(&spec, &a), Ok(()));
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
                Some(f32::host(m)),
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
        // From y with β: β is required; the mean is not.
        let with_b = spec.clone().with_beta(true);
        let from_y = |beta: Option<&'static [f32]>, dx: &mut [f32]| {
            let mut a = args(ins, None, None, dx).from_output(f32::host(&x), beta.map(f32::host));
            a.mean = None;
            validate_backward(&with_b, &a)
        };
        assert_eq!(
            from_y(None, &mut dx),
            Err(Error::ParameterMismatch { tensor: "beta", passed: false })
        );
        assert_eq!(from_y(Some(&[0.5, 0.5]), &mut dx), Ok(()));
        let short_dh = [0.0f32; 1];
        let a = args(ins, None, None, &mut dx).with_dh(f32::host(&short_dh));
        assert_eq!(
            validate_backward(&spec, &a),
            Err(Error::ShapeMismatch { tensor: "dh", expected: 2, got: 1 })
        );
    }

    #[test]
    fn a_gamma_that_cancels_its_offset_is_named_by_column() {
        let spec = NormSpec::rms_norm(1, 3, DType::BF16).with_gamma_offset(1.0);
        let g: Vec<crate::bf16> =
            [0.5, -1.0, 0.0].iter().map(|&v| crate::bf16::from_f64(v)).collect();
        let err = check_gamma_recoverable(&spec, Some(crate::bf16::host(&g))).unwrap_err();
        assert_eq!(err, Error::SingularGamma { column: 1, gamma: -1.0, offset: 1.0 });
        assert_eq!(check_gamma_recoverable(&spec.with_gamma_offset(0.0), None), Ok(()));
    }
}
