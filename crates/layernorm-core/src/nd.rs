//! The n-dimensional API: PyTorch-shaped calls on ndarray views, for every backend.
//!
//! ```
//! use layernorm_core::ndarray::{Array1, Array3};
//! use layernorm_core::{Norm, NormalizeNd};
//! # fn demo(backend: &dyn layernorm_core::HostNormalize) -> layernorm_core::Result<()> {
//! let x = Array3::<f32>::ones((2, 5, 8)); // [batch, seq, hidden]
//! let (gamma, beta) = (Array1::<f32>::ones(8), Array1::<f32>::zeros(8));
//! let norm = Norm::layer_norm(); // over the last dim, ε = 1e-5
//! let out = backend.forward_nd(norm, &x).gamma(&gamma).beta(&beta).run()?;
//! let dy = Array3::<f32>::ones((2, 5, 8));
//! let grads = backend.backward_nd(norm, &x, &dy, out.stats()).gamma(&gamma).beta(&beta).run()?;
//! assert_eq!(grads.dx.shape(), &[2, 5, 8]);
//! # Ok(()) }
//! ```
//!
//! - **Shapes like PyTorch.** x has any number of leading dims; the trailing
//!   [`Norm::normalized_ndim`] dims (PyTorch's `normalized_shape`, by default the last one) are
//!   normalized over, and γ/β have exactly that shape. Outputs come back with x's shape; the
//!   saved statistics with x's leading dims.
//! - **Nothing said twice.** The dtype is the element type of the views; whether γ and β exist is
//!   whether they were passed. What a call cannot infer (the kind, ε, the γ offset) is the
//!   [`Norm`].
//! - **Any layout.** Views in standard (row-major) layout are used where they lie; any other view
//!   (transposed, sliced, broadcast) is copied once into standard layout first. An in-place
//!   residual that is not in standard layout is computed on such a copy and written back.
//! - **Options next to the plain call.** The forward takes a fused residual
//!   ([`ForwardNd::residual`], [`ForwardNd::residual_in_place`]); the backward reads x
//!   ([`NormalizeNd::backward_nd`]) or the output y ([`NormalizeNd::backward_nd_from_output`]),
//!   adds the residual stream's gradient ([`BackwardNd::dh`]) and skips parameter gradients
//!   ([`BackwardNd::skip_dgamma`], [`BackwardNd::skip_dbeta`]).
//! - **Validated before anything is allocated.** Shapes, ε and the problem's size are checked
//!   first; an output that cannot be allocated is [`Error::OutOfMemory`], never an abort.

use std::borrow::Cow;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use ndarray::{Array, ArrayView, ArrayViewD, ArrayViewMut, AsArray, Dimension, IxDyn};

use crate::dtype::try_zeroed_vec;
use crate::{
    BackwardArgs, Element, Error, ForwardArgs, HostNormalize, NormKind, NormSpec, OutputCache,
    Residual, Result, Saved,
};

/// What to compute, PyTorch's non-tensor arguments: the kind, ε, how many trailing dims are
/// normalized, and the γ offset. Small and `Copy`: make one per layer and pass it to every call.
///
/// ```
/// use layernorm_core::{Norm, NormKind};
///
/// let ln = Norm::layer_norm(); // nn.LayerNorm(hidden): last dim, ε = 1e-5
/// let gemma = Norm::rms_norm().eps(1e-6).gamma_offset(1.0); // y = x̂·(1 + γ)
/// let ln2d = Norm::layer_norm().normalized_ndim(2); // normalized_shape = (H, W)
/// assert_eq!((ln.kind(), gemma.kind()), (NormKind::LayerNorm, NormKind::RmsNorm));
/// assert_eq!(ln2d.get_normalized_ndim(), 2);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Norm {
    kind: NormKind,
    eps: f64,
    normalized_ndim: usize,
    gamma_offset: f64,
}

impl Norm {
    /// A normalization of `kind` over the last dim, with the kind's default ε
    /// ([`NormKind::default_eps`]) and no γ offset.
    pub fn new(kind: NormKind) -> Norm {
        Norm { kind, eps: kind.default_eps(), normalized_ndim: 1, gamma_offset: 0.0 }
    }

    /// LayerNorm over the last dim, ε = 1e-5 (PyTorch's `nn.LayerNorm` default).
    pub fn layer_norm() -> Norm {
        Norm::new(NormKind::LayerNorm)
    }

    /// RMSNorm over the last dim, ε = 1e-6 (the Llama convention; see
    /// [`NormKind::default_eps`]).
    pub fn rms_norm() -> Norm {
        Norm::new(NormKind::RmsNorm)
    }

    /// Sets ε.
    pub fn eps(mut self, eps: f64) -> Norm {
        self.eps = eps;
        self
    }

    /// Normalizes over the trailing `ndim` dims (the length of PyTorch's `normalized_shape`).
    pub fn normalized_ndim(mut self, ndim: usize) -> Norm {
        self.normalized_ndim = ndim;
        self
    }

    /// Scales by γ_offset + γ instead of γ (Gemma's RMSNorm: 1). Requires γ.
    pub fn gamma_offset(mut self, offset: f64) -> Norm {
        self.gamma_offset = offset;
        self
    }

    /// The kind.
    pub fn kind(&self) -> NormKind {
        self.kind
    }

    /// ε.
    pub fn get_eps(&self) -> f64 {
        self.eps
    }

    /// How many trailing dims are normalized.
    pub fn get_normalized_ndim(&self) -> usize {
        self.normalized_ndim
    }

    /// The γ offset.
    pub fn get_gamma_offset(&self) -> f64 {
        self.gamma_offset
    }

    /// Splits `shape` into (leading dims, normalized dims).
    fn split<'s>(&self, shape: &'s [usize]) -> Result<(&'s [usize], &'s [usize])> {
        if self.normalized_ndim == 0 {
            return Err(Error::EmptyNormalizedDim);
        }
        if self.normalized_ndim > shape.len() {
            return Err(Error::TooManyNormalizedDims {
                normalized_dims: self.normalized_ndim,
                ndim: shape.len(),
            });
        }
        Ok(shape.split_at(shape.len() - self.normalized_ndim))
    }

    /// The device-level problem for x of `shape` in `T`, validated.
    fn spec<T: Element>(&self, shape: &[usize], gamma: bool, beta: bool) -> Result<NormSpec> {
        let (lead, norm) = self.split(shape)?;
        let rows = lead.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let n = norm.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let (Some(rows), Some(n)) = (rows, n) else {
            return Err(Error::TooLarge {
                rows: lead.iter().fold(1, |a: usize, &d| a.saturating_mul(d)),
                n: norm.iter().fold(1, |a: usize, &d| a.saturating_mul(d)),
                limit: "the address space".into(),
            });
        };
        let spec = NormSpec::new(self.kind, rows, n, T::DTYPE)
            .with_eps(self.eps)
            .with_gamma(gamma)
            .with_beta(beta)
            .with_gamma_offset(self.gamma_offset);
        spec.validate()?;
        Ok(spec)
    }
}

impl Default for Norm {
    /// [`Norm::layer_norm`].
    fn default() -> Norm {
        Norm::layer_norm()
    }
}

/// An output array of the allocating calls. It dereferences to the [`Array`] it holds; when
/// dropped, its memory returns to the backend's [`OutputCache`] (where it keeps one) for the next
/// call, so that a loop of calls does not fault in fresh pages for every large output.
/// [`OutArray::into_array`] keeps the array for good.
pub struct OutArray<T: Element, D: Dimension = IxDyn> {
    array: Array<T, D>,
    cache: Option<Arc<OutputCache>>,
}

impl<T: Element, D: Dimension> OutArray<T, D> {
    /// A `shape`d array from `cache` (or freshly allocated); its elements are stale or zero until
    /// overwritten.
    fn new(
        cache: &Option<Arc<OutputCache>>,
        tensor: &'static str,
        shape: D,
    ) -> Result<OutArray<T, D>> {
        let len = shape.size_checked().ok_or(Error::OutOfMemory { tensor, bytes: usize::MAX })?;
        let vec = match cache {
            Some(c) => c.try_vec::<T>(tensor, len)?.into_vec(),
            None => try_zeroed_vec(tensor, len)?,
        };
        let array = Array::from_shape_vec(shape.clone(), vec)
            .map_err(|_| Error::OutOfMemory { tensor, bytes: len * size_of::<T>() })?;
        Ok(OutArray { array, cache: cache.clone() })
    }

    /// The array, detached from the cache.
    pub fn into_array(mut self) -> Array<T, D> {
        self.cache = None;
        std::mem::replace(&mut self.array, empty())
    }

    /// The elements, in standard layout (every output is).
    fn slice_mut(&mut self) -> &mut [T] {
        self.array.as_slice_mut().unwrap_or_default()
    }
}

/// The smallest array of any dimensionality (what a dropped or detached [`OutArray`] leaves
/// behind): an all-zero shape, so no elements (one for a zero-dimensional array).
fn empty<T: Element, D: Dimension>() -> Array<T, D> {
    Array::from_elem(D::zeros(D::NDIM.unwrap_or(1)), T::zeroed())
}

impl<T: Element, D: Dimension> Drop for OutArray<T, D> {
    fn drop(&mut self) {
        if let Some(cache) = self.cache.take() {
            let array = std::mem::replace(&mut self.array, empty());
            cache.vec_returned(array.into_raw_vec_and_offset().0);
        }
    }
}

impl<T: Element, D: Dimension> Deref for OutArray<T, D> {
    type Target = Array<T, D>;
    fn deref(&self) -> &Array<T, D> {
        &self.array
    }
}

impl<T: Element, D: Dimension> DerefMut for OutArray<T, D> {
    fn deref_mut(&mut self) -> &mut Array<T, D> {
        &mut self.array
    }
}

/// So an output can be passed where a view is taken (`backend.backward_nd_from_output(norm,
/// &out.y, …)`): `&OutArray` is an [`AsArray`] like `&Array`.
impl<'a, T: Element, D: Dimension> From<&'a OutArray<T, D>> for ArrayView<'a, T, D> {
    fn from(a: &'a OutArray<T, D>) -> ArrayView<'a, T, D> {
        a.array.view()
    }
}

impl<T: Element, D: Dimension> Clone for OutArray<T, D> {
    /// A copy of the array, detached from the cache.
    fn clone(&self) -> OutArray<T, D> {
        OutArray { array: self.array.clone(), cache: None }
    }
}

impl<T: Element, D: Dimension> fmt::Debug for OutArray<T, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.array.fmt(f)
    }
}

impl<T: Element, D: Dimension> PartialEq for OutArray<T, D> {
    fn eq(&self, other: &OutArray<T, D>) -> bool {
        self.array == other.array
    }
}

impl<T: Element, D: Dimension> PartialEq<Array<T, D>> for OutArray<T, D> {
    fn eq(&self, other: &Array<T, D>) -> bool {
        self.array == *other
    }
}

/// The per-row statistics a forward saves for its backward, with x's leading dims.
#[derive(Clone, Debug, PartialEq)]
pub struct NdStats<A: Element> {
    /// Per-row mean (LayerNorm); `None` for RMSNorm.
    pub mean: Option<OutArray<A>>,
    /// Per-row rstd.
    pub rstd: OutArray<A>,
}

impl<A: Element> NdStats<A> {
    /// Views of both, for [`NormalizeNd::backward_nd`].
    pub fn view(&self) -> Stats<'_, A> {
        Stats { mean: self.mean.as_ref().map(|m| m.view()), rstd: self.rstd.view() }
    }
}

/// Views of saved statistics, the backward's input: from [`NdForward::stats`], or built from
/// arrays of your own with [`Stats::new`] (rstd) and [`Stats::with_mean`] (LayerNorm).
#[derive(Clone, Debug)]
pub struct Stats<'a, A> {
    /// Per-row mean, x's leading dims (LayerNorm from x; not read from y; absent for RMSNorm).
    pub mean: Option<ArrayViewD<'a, A>>,
    /// Per-row rstd, x's leading dims.
    pub rstd: ArrayViewD<'a, A>,
}

impl<'a, A: 'a> Stats<'a, A> {
    /// Statistics with `rstd` and no mean (all an RMSNorm, or a backward from y, reads).
    pub fn new<E: Dimension>(rstd: impl AsArray<'a, A, E>) -> Stats<'a, A> {
        Stats { mean: None, rstd: rstd.into().into_dyn() }
    }

    /// Adds the mean (a LayerNorm backward from x reads it).
    pub fn with_mean<E: Dimension>(mut self, mean: impl AsArray<'a, A, E>) -> Stats<'a, A> {
        self.mean = Some(mean.into().into_dyn());
        self
    }
}

/// Outputs of a forward.
#[derive(Clone, Debug, PartialEq)]
pub struct NdForward<T: Element, D: Dimension> {
    /// y, with x's shape.
    pub y: OutArray<T, D>,
    /// h = x + residual, with x's shape, when [`ForwardNd::residual`] was given (with
    /// [`ForwardNd::residual_in_place`], h is in the residual's array instead).
    pub h: Option<OutArray<T, D>>,
    /// The statistics saved for the backward.
    pub saved: NdStats<T::Acc>,
}

impl<T: Element, D: Dimension> NdForward<T, D> {
    /// Views of the saved statistics, for [`NormalizeNd::backward_nd`].
    pub fn stats(&self) -> Stats<'_, T::Acc> {
        self.saved.view()
    }
}

/// Outputs of a backward.
#[derive(Clone, Debug, PartialEq)]
pub struct NdGradients<T: Element, D: Dimension> {
    /// dx, with x's shape (plus dh when given: then also the residual's gradient).
    pub dx: OutArray<T, D>,
    /// dγ, with the normalized shape, when γ was given and not skipped.
    pub dgamma: Option<OutArray<T>>,
    /// dβ, with the normalized shape, when β was given and not skipped.
    pub dbeta: Option<OutArray<T>>,
}

fn check_shape(tensor: &'static str, got: &[usize], expected: &[usize]) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::DimsMismatch { tensor, expected: expected.to_vec(), got: got.to_vec() })
    }
}

/// γ and β, where given, have the normalized shape.
fn check_affine<T>(
    gamma: &Option<ArrayViewD<'_, T>>,
    beta: &Option<ArrayViewD<'_, T>>,
    normalized: &[usize],
) -> Result<()> {
    for (name, p) in [("gamma", gamma), ("beta", beta)] {
        if let Some(p) = p {
            check_shape(name, p.shape(), normalized)?;
        }
    }
    Ok(())
}

/// The elements in logical (row-major) order: borrowed when the view is in standard layout,
/// else one copy.
/// The copy is [`Error::OutOfMemory`] naming `tensor` when it cannot be allocated (a broadcast
/// view can stand for far more elements than memory holds).
fn contiguous<'v, T: Clone, D: Dimension>(
    tensor: &'static str,
    a: &'v ArrayView<'_, T, D>,
) -> Result<Cow<'v, [T]>> {
    if let Some(s) = a.as_slice() {
        return Ok(Cow::Borrowed(s));
    }
    let mut v = Vec::new();
    if v.try_reserve_exact(a.len()).is_err() {
        return Err(Error::OutOfMemory { tensor, bytes: a.len().saturating_mul(size_of::<T>()) });
    }
    v.extend(a.iter().cloned());
    Ok(Cow::Owned(v))
}

/// The residual of a forward: read from a view, or read and overwritten in place.
enum ResidualNd<'a, T, D> {
    Add(ArrayView<'a, T, D>),
    InPlace(ArrayViewMut<'a, T, D>),
}

/// A forward call being built: see [`NormalizeNd::forward_nd`]. Nothing runs until
/// [`ForwardNd::run`].
#[must_use = "a ForwardNd does nothing until `.run()`"]
pub struct ForwardNd<'a, B: ?Sized, T: Element, D: Dimension> {
    backend: &'a B,
    norm: Norm,
    x: ArrayView<'a, T, D>,
    gamma: Option<ArrayViewD<'a, T>>,
    beta: Option<ArrayViewD<'a, T>>,
    residual: Option<ResidualNd<'a, T, D>>,
}

impl<'a, B: HostNormalize + ?Sized, T: Element, D: Dimension> ForwardNd<'a, B, T, D> {
    /// Scales by γ (PyTorch's `weight`), of the normalized shape.
    pub fn gamma<E: Dimension>(mut self, gamma: impl AsArray<'a, T, E>) -> Self {
        self.gamma = Some(gamma.into().into_dyn());
        self
    }

    /// Shifts by β (PyTorch's `bias`), of the normalized shape.
    pub fn beta<E: Dimension>(mut self, beta: impl AsArray<'a, T, E>) -> Self {
        self.beta = Some(beta.into().into_dyn());
        self
    }

    /// Adds `residual` (x's shape) to x first, in the same pass: normalizes h = x + residual,
    /// rounded once to `T`, and returns h in [`NdForward::h`] (the next residual stream).
    pub fn residual(mut self, residual: impl AsArray<'a, T, D>) -> Self {
        self.residual = Some(ResidualNd::Add(residual.into()));
        self
    }

    /// Like [`ForwardNd::residual`], but writes h over `residual` (vLLM's
    /// `fused_add_rms_norm`): one tensor fewer.
    pub fn residual_in_place(mut self, residual: ArrayViewMut<'a, T, D>) -> Self {
        self.residual = Some(ResidualNd::InPlace(residual));
        self
    }

    /// Validates everything, then allocates the outputs and runs.
    pub fn run(self) -> Result<NdForward<T, D>> {
        let ForwardNd { backend, norm, x, gamma, beta, residual } = self;
        let (res_add, mut res_in_place) = match residual {
            Some(ResidualNd::Add(r)) => (Some(r), None),
            Some(ResidualNd::InPlace(r)) => (None, Some(r)),
            None => (None, None),
        };
        let shape = x.shape().to_vec();
        let spec = norm.spec::<T>(&shape, gamma.is_some(), beta.is_some())?;
        let (lead, normalized) = norm.split(&shape)?;
        check_affine(&gamma, &beta, normalized)?;
        if let Some(r) = &res_add {
            check_shape("residual", r.shape(), &shape)?;
        }
        if let Some(r) = &res_in_place {
            check_shape("residual", r.shape(), &shape)?;
        }
        backend.accepts(&spec)?;
        let cache = backend.output_cache();
        let mut y = OutArray::<T, D>::new(&cache, "y", x.raw_dim())?;
        let lead = IxDyn(lead);
        let mut mean = match spec.has_mean() {
            true => Some(OutArray::<T::Acc, IxDyn>::new(&cache, "mean", lead.clone())?),
            false => None,
        };
        let mut rstd = OutArray::<T::Acc, IxDyn>::new(&cache, "rstd", lead)?;
        let mut h = match &res_add {
            Some(_) => Some(OutArray::<T, D>::new(&cache, "h", x.raw_dim())?),
            None => None,
        };
        let xs = contiguous("x", &x)?;
        let gs = gamma.as_ref().map(|g| contiguous("gamma", g)).transpose()?;
        let bs = beta.as_ref().map(|b| contiguous("beta", b)).transpose()?;
        let res_in = res_add.as_ref().map(|r| contiguous("residual", r)).transpose()?;
        // An in-place residual not in standard layout is computed on a copy and written back.
        let mut res_copy: Option<Vec<T>> = match &res_in_place {
            Some(r) if r.as_slice().is_none() => {
                Some(contiguous("residual", &r.view())?.into_owned())
            }
            _ => None,
        };
        let res_slot: Option<&mut [T]> = match (res_in_place.as_mut(), res_copy.as_mut()) {
            (Some(_), Some(copy)) => Some(&mut copy[..]),
            (Some(r), None) => r.as_slice_mut(),
            (None, _) => None,
        };
        let mut args = ForwardArgs::new(
            T::host(&xs),
            gs.as_deref().map(T::host),
            bs.as_deref().map(T::host),
            T::host_mut(y.slice_mut()),
            mean.as_mut().map(|m| <T::Acc as Element>::host_mut(m.slice_mut())),
            <T::Acc as Element>::host_mut(rstd.slice_mut()),
        );
        args.residual = match (res_in.as_deref(), h.as_mut(), res_slot) {
            (Some(r), Some(h), _) => {
                Some(Residual::Add { residual: T::host(r), h: T::host_mut(h.slice_mut()) })
            }
            (_, _, Some(slot)) => Some(Residual::InPlace(T::host_mut(slot))),
            _ => None,
        };
        backend.forward_host(&spec, args)?;
        if let (Some(r), Some(copy)) = (res_in_place.as_mut(), res_copy) {
            r.iter_mut().zip(copy).for_each(|(o, v)| *o = v);
        }
        Ok(NdForward { y, h, saved: NdStats { mean, rstd } })
    }
}

/// A backward call being built: see [`NormalizeNd::backward_nd`]. Nothing runs until
/// [`BackwardNd::run`].
#[must_use = "a BackwardNd does nothing until `.run()`"]
pub struct BackwardNd<'a, B: ?Sized, T: Element, D: Dimension> {
    backend: &'a B,
    norm: Norm,
    saved: Saved<ArrayView<'a, T, D>>,
    dy: ArrayView<'a, T, D>,
    stats: Stats<'a, T::Acc>,
    gamma: Option<ArrayViewD<'a, T>>,
    beta: Option<ArrayViewD<'a, T>>,
    dh: Option<ArrayView<'a, T, D>>,
    want: (bool, bool),
}

impl<'a, B: HostNormalize + ?Sized, T: Element, D: Dimension> BackwardNd<'a, B, T, D> {
    /// The forward's γ: required when the forward had one; dγ is computed unless skipped.
    pub fn gamma<E: Dimension>(mut self, gamma: impl AsArray<'a, T, E>) -> Self {
        self.gamma = Some(gamma.into().into_dyn());
        self
    }

    /// The forward's β: says the problem has β (so dβ is computed unless skipped); a backward
    /// from the output also reads its values.
    pub fn beta<E: Dimension>(mut self, beta: impl AsArray<'a, T, E>) -> Self {
        self.beta = Some(beta.into().into_dyn());
        self
    }

    /// Adds `dh`, the gradient already arriving on the residual stream h (x's shape), to dx:
    /// the result is then the gradient of both x and the residual of a fused residual forward.
    pub fn dh(mut self, dh: impl AsArray<'a, T, D>) -> Self {
        self.dh = Some(dh.into());
        self
    }

    /// Does not compute dγ (a frozen γ).
    pub fn skip_dgamma(mut self) -> Self {
        self.want.0 = false;
        self
    }

    /// Does not compute dβ (a frozen β).
    pub fn skip_dbeta(mut self) -> Self {
        self.want.1 = false;
        self
    }

    /// Validates everything, then allocates the outputs and runs.
    pub fn run(self) -> Result<NdGradients<T, D>> {
        let BackwardNd { backend, norm, saved, dy, stats, gamma, beta, dh, want } = self;
        let input = saved.tensor().clone();
        let shape = input.shape().to_vec();
        let spec = norm.spec::<T>(&shape, gamma.is_some(), beta.is_some())?;
        let (lead, normalized) = norm.split(&shape)?;
        check_shape("dy", dy.shape(), &shape)?;
        if let Some(dh) = &dh {
            check_shape("dh", dh.shape(), &shape)?;
        }
        if let Some(m) = &stats.mean {
            check_shape("mean", m.shape(), lead)?;
        }
        check_shape("rstd", stats.rstd.shape(), lead)?;
        check_affine(&gamma, &beta, normalized)?;
        // A mean is only read by a LayerNorm backward from x; anything else ignores one passed.
        let read_mean = spec.has_mean() && !saved.is_output();
        if read_mean && stats.mean.is_none() {
            return Err(Error::ParameterMismatch { tensor: "mean", passed: false });
        }
        backend.accepts(&spec)?;
        let cache = backend.output_cache();
        let mut dx = OutArray::<T, D>::new(&cache, "dx", input.raw_dim())?;
        let pshape = IxDyn(normalized);
        let mut dgamma = match gamma.is_some() && want.0 {
            true => Some(OutArray::<T, IxDyn>::new(&cache, "dgamma", pshape.clone())?),
            false => None,
        };
        let mut dbeta = match beta.is_some() && want.1 {
            true => Some(OutArray::<T, IxDyn>::new(&cache, "dbeta", pshape)?),
            false => None,
        };
        let xs = contiguous(saved.name(), &input)?;
        let dys = contiguous("dy", &dy)?;
        let dhs = dh.as_ref().map(|d| contiguous("dh", d)).transpose()?;
        let ms = stats.mean.as_ref().filter(|_| read_mean);
        let ms = ms.map(|m| contiguous("mean", m)).transpose()?;
        let rs = contiguous("rstd", &stats.rstd)?;
        let gs = gamma.as_ref().map(|g| contiguous("gamma", g)).transpose()?;
        let bs = beta.as_ref().map(|b| contiguous("beta", b)).transpose()?;
        let mut args = BackwardArgs::new(
            T::host(&xs),
            T::host(&dys),
            ms.as_deref().map(<T::Acc as Element>::host),
            <T::Acc as Element>::host(&rs),
            gs.as_deref().map(T::host),
            T::host_mut(dx.slice_mut()),
            dgamma.as_mut().map(|g| T::host_mut(g.slice_mut())),
            dbeta.as_mut().map(|b| T::host_mut(b.slice_mut())),
        )
        .with_beta(bs.as_deref().map(T::host));
        if saved.is_output() {
            args.saved = Saved::Y(T::host(&xs));
        }
        if let Some(dh) = dhs.as_deref() {
            args = args.with_dh(T::host(dh));
        }
        backend.backward_host(&spec, args)?;
        Ok(NdGradients { dx, dgamma, dbeta })
    }
}

/// The n-dimensional, typed layer over any backend — trait objects included — built on the host
/// layer ([`HostNormalize`]). See the module docs of `layernorm_core::nd`.
pub trait NormalizeNd: HostNormalize {
    /// A forward of `norm` over `x` (any number of leading dims; an `&Array`, a view or a
    /// slice). Add [`ForwardNd::gamma`], [`ForwardNd::beta`], a residual, then
    /// [`ForwardNd::run`].
    fn forward_nd<'a, T: Element, D: Dimension>(
        &'a self,
        norm: Norm,
        x: impl AsArray<'a, T, D>,
    ) -> ForwardNd<'a, Self, T, D> {
        ForwardNd { backend: self, norm, x: x.into(), gamma: None, beta: None, residual: None }
    }

    /// The backward of [`NormalizeNd::forward_nd`] from its input `x` (for a residual forward:
    /// its h), the loss gradient `dy` and the saved statistics. Add the forward's
    /// [`BackwardNd::gamma`] and [`BackwardNd::beta`], then [`BackwardNd::run`].
    fn backward_nd<'a, T: Element, D: Dimension>(
        &'a self,
        norm: Norm,
        x: impl AsArray<'a, T, D>,
        dy: impl AsArray<'a, T, D>,
        stats: Stats<'a, T::Acc>,
    ) -> BackwardNd<'a, Self, T, D> {
        BackwardNd {
            backend: self,
            norm,
            saved: Saved::X(x.into()),
            dy: dy.into(),
            stats,
            gamma: None,
            beta: None,
            dh: None,
            want: (true, true),
        }
    }

    /// The backward from the forward's output `y` instead of its input (Apex's
    /// `memory_efficient`): x̂ = (y − β)/(γ_offset + γ), so x need not be kept. Reads rstd (not the
    /// mean), γ and β; a column where γ_offset + γ = 0 is [`Error::SingularGamma`]. Slightly less
    /// accurate than from x where |β| ≫ |γ| (`docs/numerics.md`).
    fn backward_nd_from_output<'a, T: Element, D: Dimension>(
        &'a self,
        norm: Norm,
        y: impl AsArray<'a, T, D>,
        dy: impl AsArray<'a, T, D>,
        stats: Stats<'a, T::Acc>,
    ) -> BackwardNd<'a, Self, T, D> {
        let mut call = self.backward_nd(norm, y, dy, stats);
        call.saved = Saved::Y(call.saved.tensor().clone());
        call
    }
}

impl<H: HostNormalize + ?Sized> NormalizeNd for H {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_and_specs_follow_pytorch() {
        let n = Norm::layer_norm().normalized_ndim(2);
        assert_eq!(n.split(&[2, 3, 4]).unwrap(), (&[2][..], &[3, 4][..]));
        assert_eq!(
            Norm::layer_norm().normalized_ndim(4).split(&[2, 3]),
            Err(Error::TooManyNormalizedDims { normalized_dims: 4, ndim: 2 })
        );
        assert_eq!(
            Norm::layer_norm().normalized_ndim(0).split(&[2]),
            Err(Error::EmptyNormalizedDim)
        );
        let spec = n.spec::<f32>(&[2, 3, 4], true, false).unwrap();
        assert_eq!((spec.rows, spec.n, spec.gamma, spec.beta), (2, 12, true, false));
        // A zero-size dim beside a huge one is caught before anything is allocated.
        assert_eq!(
            Norm::layer_norm().spec::<f32>(&[1 << 40, 0], false, false),
            Err(Error::EmptyNormalizedDim)
        );
        let huge = Norm::layer_norm().spec::<f32>(&[usize::MAX, 2, 2], false, false);
        assert_eq!(huge.unwrap_err().class(), "too-large");
        assert_eq!(Norm::rms_norm().spec::<f32>(&[4, 8], true, false).unwrap().eps, 1e-6);
    }

    #[test]
    fn out_arrays_keep_their_shape_and_leave_an_empty_array_behind() {
        let cache = Some(OutputCache::new());
        let a = OutArray::<f32, ndarray::Ix3>::new(&cache, "y", ndarray::Ix3(2, 3, 4)).unwrap();
        assert_eq!(a.shape(), &[2, 3, 4]);
        assert_eq!(a.clone().into_array().iter().count(), 24);
        let d = OutArray::<f64, IxDyn>::new(&None, "m", IxDyn(&[])).unwrap();
        assert_eq!(d.len(), 1);
        let e: Array<f32, ndarray::Ix2> = empty();
        assert_eq!(e.len(), 0);
        let e: ndarray::ArrayD<f32> = empty();
        assert_eq!(e.len(), 0);
    }
}
