//! The ndarray layer: any number of leading dims, normalized over the trailing dims.

use std::borrow::Cow;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use layernorm_core::{DType, Element, Error, NormSpec, OutputCache, Result};
use ndarray::{
    Array1, ArrayD, ArrayView, ArrayViewD, ArrayViewMut, ArrayViewMutD, Dimension, IxDyn,
};

use crate::{CpuBackend, CpuElement};

/// Outputs of [`CpuBackend::forward_nd`].
#[derive(Clone, Debug, PartialEq)]
pub struct NdForward<T: CpuElement> {
    /// y, with the shape of x.
    pub y: OutArray<T>,
    /// Per-row mean, with the shape of x's leading (not normalized) dims.
    pub mean: OutArray<T::Acc>,
    /// Per-row rstd, with the shape of x's leading dims.
    pub rstd: OutArray<T::Acc>,
}

/// Outputs of [`CpuBackend::backward_nd`].
#[derive(Clone, Debug, PartialEq)]
pub struct NdGradients<T: CpuElement> {
    /// dx, with the shape of x.
    pub dx: OutArray<T>,
    /// dγ, with the normalized shape, when γ was given.
    pub dgamma: Option<OutArray<T>>,
    /// dβ, with the normalized shape, when requested.
    pub dbeta: Option<OutArray<T>>,
}

/// An output array of the allocating ndarray calls. It dereferences to the [`ArrayD`] it holds;
/// when dropped, its memory returns to the backend's [`OutputCache`] for the next call, so that
/// a loop of calls does not fault in fresh pages for every large output.
/// [`OutArray::into_array`] keeps the array for good.
pub struct OutArray<T: Element> {
    array: ArrayD<T>,
    cache: Option<Arc<OutputCache>>,
}

impl<T: Element> OutArray<T> {
    /// A `shape`d array from `cache`; its elements are stale or zero until overwritten.
    fn new(cache: &Arc<OutputCache>, shape: &[usize]) -> OutArray<T> {
        let len = shape.iter().product();
        let vec = cache.vec::<T>(len).into_vec();
        let array = ArrayD::from_shape_vec(IxDyn(shape), vec)
            .unwrap_or_else(|_| ArrayD::from_elem(IxDyn(shape), T::zeroed()));
        OutArray { array, cache: Some(cache.clone()) }
    }

    /// The array, detached from the cache.
    pub fn into_array(mut self) -> ArrayD<T> {
        self.cache = None;
        std::mem::replace(&mut self.array, Array1::from_vec(Vec::new()).into_dyn())
    }
}

impl<T: Element> Drop for OutArray<T> {
    fn drop(&mut self) {
        if let Some(cache) = self.cache.take() {
            let array = std::mem::replace(&mut self.array, Array1::from_vec(Vec::new()).into_dyn());
            cache.vec_returned(array.into_raw_vec_and_offset().0);
        }
    }
}

impl<T: Element> Deref for OutArray<T> {
    type Target = ArrayD<T>;
    fn deref(&self) -> &ArrayD<T> {
        &self.array
    }
}

impl<T: Element> DerefMut for OutArray<T> {
    fn deref_mut(&mut self) -> &mut ArrayD<T> {
        &mut self.array
    }
}

impl<T: Element> Clone for OutArray<T> {
    /// A copy of the array, detached from the cache.
    fn clone(&self) -> OutArray<T> {
        OutArray { array: self.array.clone(), cache: None }
    }
}

impl<T: Element> fmt::Debug for OutArray<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.array.fmt(f)
    }
}

impl<T: Element> PartialEq for OutArray<T> {
    fn eq(&self, other: &OutArray<T>) -> bool {
        self.array == other.array
    }
}

impl<T: Element> PartialEq<ArrayD<T>> for OutArray<T> {
    fn eq(&self, other: &ArrayD<T>) -> bool {
        self.array == *other
    }
}

/// Splits a shape into (leading dims, normalized dims).
fn split(shape: &[usize], normalized_ndim: usize) -> Result<(&[usize], &[usize])> {
    if normalized_ndim == 0 {
        return Err(Error::EmptyNormalizedDim);
    }
    if normalized_ndim > shape.len() {
        return Err(Error::TooManyNormalizedDims {
            normalized_dims: normalized_ndim,
            ndim: shape.len(),
        });
    }
    Ok(shape.split_at(shape.len() - normalized_ndim))
}

fn check_shape(tensor: &'static str, got: &[usize], expected: &[usize]) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::DimsMismatch { tensor, expected: expected.to_vec(), got: got.to_vec() })
    }
}

/// The elements in logical (row-major) order: borrowed when already contiguous.
fn contiguous<'a, T: Clone, D: Dimension>(a: &'a ArrayView<'_, T, D>) -> Cow<'a, [T]> {
    match a.as_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(a.iter().cloned().collect()),
    }
}

/// Runs `f` on a contiguous output slice, copying back when `out` is not in standard layout.
fn with_output<T: Copy + bytemuck::Zeroable, D: Dimension, R>(
    out: &mut ArrayViewMut<'_, T, D>,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    if let Some(s) = out.as_slice_mut() {
        return f(s);
    }
    let mut tmp = vec![T::zeroed(); out.len()];
    let r = f(&mut tmp);
    out.iter_mut().zip(tmp).for_each(|(o, v)| *o = v);
    r
}

fn spec_for<T: CpuElement>(lead: &[usize], norm: &[usize], eps: f64) -> NormSpec {
    NormSpec::layer_norm(lead.iter().product(), norm.iter().product(), DType::F32)
        .with_dtype(T::DTYPE)
        .with_eps(eps)
}

impl CpuBackend {
    /// LayerNorm over the trailing `normalized_ndim` dims of `x` (PyTorch's `normalized_shape`
    /// is `x.shape()[ndim - normalized_ndim..]`); γ and β, when given, have that shape.
    pub fn forward_nd<T: CpuElement, D: Dimension>(
        &self,
        x: ArrayView<'_, T, D>,
        normalized_ndim: usize,
        gamma: Option<ArrayViewD<'_, T>>,
        beta: Option<ArrayViewD<'_, T>>,
        eps: f64,
    ) -> Result<NdForward<T>> {
        let (lead, _) = split(x.shape(), normalized_ndim)?;
        let mut y = OutArray::new(&self.cache, x.shape());
        let mut mean = OutArray::new(&self.cache, lead);
        let mut rstd = OutArray::new(&self.cache, lead);
        self.forward_nd_into(
            x.into_dyn(),
            normalized_ndim,
            gamma,
            beta,
            eps,
            y.view_mut(),
            mean.view_mut(),
            rstd.view_mut(),
        )?;
        Ok(NdForward { y, mean, rstd })
    }

    /// [`CpuBackend::forward_nd`] into caller-owned outputs of any layout: `y` shaped like `x`,
    /// `mean`/`rstd` shaped like x's leading dims.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_nd_into<T: CpuElement, D: Dimension>(
        &self,
        x: ArrayView<'_, T, D>,
        normalized_ndim: usize,
        gamma: Option<ArrayViewD<'_, T>>,
        beta: Option<ArrayViewD<'_, T>>,
        eps: f64,
        mut y: ArrayViewMut<'_, T, D>,
        mut mean: ArrayViewMutD<'_, T::Acc>,
        mut rstd: ArrayViewMutD<'_, T::Acc>,
    ) -> Result<()> {
        let (lead, norm) = split(x.shape(), normalized_ndim)?;
        if let Some(g) = &gamma {
            check_shape("gamma", g.shape(), norm)?;
        }
        if let Some(b) = &beta {
            check_shape("beta", b.shape(), norm)?;
        }
        check_shape("y", y.shape(), x.shape())?;
        check_shape("mean", mean.shape(), lead)?;
        check_shape("rstd", rstd.shape(), lead)?;
        let spec =
            spec_for::<T>(lead, norm, eps).with_gamma(gamma.is_some()).with_beta(beta.is_some());
        let xs = contiguous(&x);
        let gs = gamma.as_ref().map(contiguous);
        let bs = beta.as_ref().map(contiguous);
        with_output(&mut y, |y| {
            with_output(&mut mean, |m| {
                with_output(&mut rstd, |r| {
                    self.forward_into(&spec, &xs, gs.as_deref(), bs.as_deref(), y, m, r)
                })
            })
        })
    }

    /// Backward of [`CpuBackend::forward_nd`]: dx, dγ (when `gamma` is given) and dβ (when
    /// `beta` is true), from the forward's saved `mean` and `rstd`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_nd<T: CpuElement, D: Dimension>(
        &self,
        x: ArrayView<'_, T, D>,
        dy: ArrayView<'_, T, D>,
        mean: ArrayViewD<'_, T::Acc>,
        rstd: ArrayViewD<'_, T::Acc>,
        normalized_ndim: usize,
        gamma: Option<ArrayViewD<'_, T>>,
        beta: bool,
    ) -> Result<NdGradients<T>> {
        let (_, norm) = split(x.shape(), normalized_ndim)?;
        let mut dx = OutArray::new(&self.cache, x.shape());
        let mut dgamma = gamma.as_ref().map(|_| OutArray::new(&self.cache, norm));
        let mut dbeta = beta.then(|| OutArray::new(&self.cache, norm));
        self.backward_nd_into(
            x.into_dyn(),
            dy.into_dyn(),
            mean,
            rstd,
            normalized_ndim,
            gamma,
            dx.view_mut(),
            dgamma.as_mut().map(|g| g.view_mut()),
            dbeta.as_mut().map(|b| b.view_mut()),
        )?;
        Ok(NdGradients { dx, dgamma, dbeta })
    }

    /// [`CpuBackend::backward_nd`] into caller-owned outputs of any layout.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_nd_into<T: CpuElement, D: Dimension>(
        &self,
        x: ArrayView<'_, T, D>,
        dy: ArrayView<'_, T, D>,
        mean: ArrayViewD<'_, T::Acc>,
        rstd: ArrayViewD<'_, T::Acc>,
        normalized_ndim: usize,
        gamma: Option<ArrayViewD<'_, T>>,
        mut dx: ArrayViewMut<'_, T, D>,
        dgamma: Option<ArrayViewMutD<'_, T>>,
        dbeta: Option<ArrayViewMutD<'_, T>>,
    ) -> Result<()> {
        let (lead, norm) = split(x.shape(), normalized_ndim)?;
        check_shape("dy", dy.shape(), x.shape())?;
        check_shape("mean", mean.shape(), lead)?;
        check_shape("rstd", rstd.shape(), lead)?;
        if let Some(g) = &gamma {
            check_shape("gamma", g.shape(), norm)?;
        }
        check_shape("dx", dx.shape(), x.shape())?;
        for (name, g) in [("dgamma", &dgamma), ("dbeta", &dbeta)] {
            if let Some(g) = g {
                check_shape(name, g.shape(), norm)?;
            }
        }
        // Without γ there is no dγ to compute: a dgamma output then is a caller error, reported
        // by the spec validation below.
        let spec = spec_for::<T>(lead, norm, 1e-5)
            .with_gamma(gamma.is_some() || dgamma.is_some())
            .with_beta(dbeta.is_some());
        let (xs, dys, ms, rs) =
            (contiguous(&x), contiguous(&dy), contiguous(&mean), contiguous(&rstd));
        let gs = gamma.as_ref().map(contiguous);
        let mut dgamma = dgamma;
        let mut dbeta = dbeta;
        with_output(&mut dx, |dx| {
            let mut gbuf = dgamma.as_ref().map(|g| vec![T::from_f64(0.0); g.len()]);
            let mut bbuf = dbeta.as_ref().map(|b| vec![T::from_f64(0.0); b.len()]);
            self.backward_into(
                &spec,
                &xs,
                &dys,
                &ms,
                &rs,
                gs.as_deref(),
                dx,
                gbuf.as_deref_mut(),
                bbuf.as_deref_mut(),
            )?;
            for (out, buf) in [(dgamma.as_mut(), gbuf), (dbeta.as_mut(), bbuf)] {
                if let (Some(out), Some(buf)) = (out, buf) {
                    out.iter_mut().zip(buf).for_each(|(o, v)| *o = v);
                }
            }
            Ok(())
        })
    }
}
