//! The candle custom ops: LayerNorm and RMSNorm whose forward and backward run layernorm's CPU
//! kernels, recorded for autograd with `apply_op2` / `apply_op3`.
//!
//! One op type, `NormOp`, serves both kinds and both parameter sets: γ alone
//! ([`candle_core::CustomOp2`] over x and γ) or γ and β ([`candle_core::CustomOp3`]). Each call
//! makes a fresh instance; its forward keeps the per-row statistics it computed (mean and rstd,
//! a few bytes a row) in the instance, which candle's graph holds until the backward reads them.

use std::borrow::Cow;
use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use layernorm_core::{DType, Element, ForwardArgs, HostVec, NormKind, NormSpec};
use layernorm_cpu::{CpuBackend, CpuElement, Stores};

/// LayerNorm over the last dimension of `x` with scale `gamma` and shift `beta` (both of the last
/// dimension's size, in x's dtype): y = (x − mean)·rstd·γ + β, rstd = 1/√(var + ε).
///
/// The drop-in for `candle_nn::ops::layer_norm`, with a backward: gradients reach x, γ and β
/// through this library's fused backward kernel. `eps` takes an `f32` or an `f64`.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
///
/// let dev = Device::Cpu;
/// let x = Var::from_tensor(&Tensor::new(&[[1f32, 2., 3.], [4., 4., 7.]], &dev)?)?;
/// let gamma = Tensor::new(&[1f32, 1., 1.], &dev)?;
/// let beta = Tensor::new(&[0f32, 0., 0.], &dev)?;
/// let y = layernorm_candle::ops::layer_norm(&x, &gamma, &beta, 1e-5)?;
/// let grads = (y.sqr()?.sum_all()? * 0.5)?.backward()?;
/// assert_eq!(grads.get(&x).unwrap().dims(), &[2, 3]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn layer_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: impl Into<f64>,
) -> Result<Tensor> {
    normalize(NormKind::LayerNorm, x, gamma, Some(beta), eps)
}

/// RMSNorm over the last dimension of `x` with scale `gamma`: y = x·r·γ, r = 1/√(mean(x²) + ε).
///
/// The drop-in for `candle_nn::ops::rms_norm`, with a backward (to x and γ).
pub fn rms_norm(x: &Tensor, gamma: &Tensor, eps: impl Into<f64>) -> Result<Tensor> {
    normalize(NormKind::RmsNorm, x, gamma, None, eps)
}

/// Either kind over the last dimension of `x`, with scale `gamma` and an optional shift `beta`
/// (LayerNorm without a bias, RMSNorm with one: what `candle_nn::LayerNorm` can be configured
/// to).
///
/// Checks before any work, each failure a candle [`candle_core::Error`] whose message names
/// the argument: x on the CPU and of dtype f16, bf16, f32 or f64, at least one dimension and a
/// non-empty last one; γ (and β) of shape `[N]`, with x's dtype, on x's device; ε finite and
/// \> 0.
pub fn normalize(
    kind: NormKind,
    x: &Tensor,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    eps: impl Into<f64>,
) -> Result<Tensor> {
    let op = NormOp::new(kind, x, gamma, beta, eps.into())?;
    match beta {
        Some(beta) => x.apply_op3(gamma, beta, op),
        None => x.apply_op2(gamma, op),
    }
}

/// The backend every op runs on, writing with ordinary stores: every output here (y, dx) is a
/// fresh allocation that candle then owns, whose pages the OS zeroes on first touch just before
/// the kernel writes them, so the lines are already in cache and streaming stores only evict
/// them. Measured on the 32 and 64 MiB outputs of the bench: ordinary stores 20–30% faster in
/// four paired runs; no difference on the smaller shapes, which do not stream anyway.
fn cpu() -> &'static CpuBackend {
    static CPU: OnceLock<CpuBackend> = OnceLock::new();
    CPU.get_or_init(|| CpuBackend::new().with_stores(Stores::Cached))
}

/// A layernorm error as a candle one, prefixed with the op's name.
fn norm_err(op: &str, e: layernorm_core::Error) -> candle_core::Error {
    candle_core::Error::msg(format!("layernorm-candle {op}: {e}"))
}

/// Our dtype for a candle dtype, when the kernels have it.
fn our_dtype(d: candle_core::DType) -> Option<DType> {
    match d {
        candle_core::DType::F16 => Some(DType::F16),
        candle_core::DType::BF16 => Some(DType::BF16),
        candle_core::DType::F32 => Some(DType::F32),
        candle_core::DType::F64 => Some(DType::F64),
        _ => None,
    }
}

/// Evaluates `$body` with `$t` the element type of the op's dtype.
macro_rules! with_element {
    ($op:expr, |$t:ident| $body:expr) => {
        match $op.spec.dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => Err($op.err(layernorm_core::Error::UnsupportedDType {
                backend: CpuBackend::NAME.into(),
                dtype: other,
                reason: String::new(),
            })),
        }
    };
}

/// What the forward saves for the backward: the per-row mean (LayerNorm) and rstd, in the
/// accumulation dtype.
#[derive(Debug)]
struct Stats {
    mean: Option<HostVec>,
    rstd: HostVec,
}

/// The gradients one backward produces.
struct Grads {
    dx: Tensor,
    dgamma: Option<Tensor>,
    dbeta: Option<Tensor>,
}

/// One normalization call: the problem, checked against the tensors when made, and the
/// statistics its forward saved.
#[derive(Debug)]
struct NormOp {
    spec: NormSpec,
    stats: OnceLock<Stats>,
}

impl NormOp {
    /// Checks the tensors and builds the problem they describe.
    fn new(
        kind: NormKind,
        x: &Tensor,
        gamma: &Tensor,
        beta: Option<&Tensor>,
        eps: f64,
    ) -> Result<NormOp> {
        let name = kind.name();
        let named = [("x", Some(x)), ("gamma", Some(gamma)), ("beta", beta)];
        for (arg, t) in named.iter().filter_map(|(a, t)| t.map(|t| (*a, t))) {
            if !t.device().is_cpu() {
                candle_core::bail!(
                    "layernorm-candle {name}: `{arg}` is on {:?}; these ops compute on the CPU \
                     only (move the tensors with `.to_device(&Device::Cpu)`)",
                    t.device().location()
                );
            }
        }
        let Some(dtype) = our_dtype(x.dtype()) else {
            candle_core::bail!(
                "layernorm-candle {name}: `x` has dtype {:?}; the kernels take f16, bf16, f32 \
                 or f64",
                x.dtype()
            );
        };
        let dims = x.dims();
        let Some((&n, leading)) = dims.split_last() else {
            let e = layernorm_core::Error::TooManyNormalizedDims { normalized_dims: 1, ndim: 0 };
            return Err(norm_err(name, e));
        };
        for (arg, t) in [("gamma", Some(gamma)), ("beta", beta)] {
            let Some(t) = t else { continue };
            if t.dims() != [n] {
                let e = layernorm_core::Error::DimsMismatch {
                    tensor: arg,
                    expected: vec![n],
                    got: t.dims().to_vec(),
                };
                return Err(norm_err(name, e));
            }
            if t.dtype() != x.dtype() {
                candle_core::bail!(
                    "layernorm-candle {name}: dtype mismatch for `{arg}`: expected {:?} (x's), \
                     got {:?}",
                    x.dtype(),
                    t.dtype()
                );
            }
        }
        let spec = NormSpec::new(kind, leading.iter().product(), n, dtype)
            .with_eps(eps)
            .with_beta(beta.is_some());
        spec.validate().map_err(|e| norm_err(name, e))?;
        Ok(NormOp { spec, stats: OnceLock::new() })
    }

    fn name(&self) -> &'static str {
        match self.spec.kind {
            NormKind::RmsNorm => "rms_norm",
            _ => "layer_norm",
        }
    }

    fn err(&self, e: layernorm_core::Error) -> candle_core::Error {
        norm_err(self.name(), e)
    }

    /// The forward on CPU storage: y, and the statistics kept for the backward.
    fn cpu_forward(
        &self,
        x: (&CpuStorage, &Layout),
        gamma: (&CpuStorage, &Layout),
        beta: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let storage = with_element!(self, |T| self.forward_typed::<T>(x, gamma, beta))?;
        Ok((storage, x.1.shape().clone()))
    }

    fn forward_typed<T: CpuElement + candle_core::WithDType>(
        &self,
        x: (&CpuStorage, &Layout),
        gamma: (&CpuStorage, &Layout),
        beta: Option<(&CpuStorage, &Layout)>,
    ) -> Result<CpuStorage> {
        let spec = &self.spec;
        let x = contiguous::<T>(x)?;
        let gamma = contiguous::<T>(gamma)?;
        let beta = beta.map(contiguous::<T>).transpose()?;
        let mut y = zeroed::<T>("y", spec.numel()).map_err(|e| self.err(e))?;
        let stats_vec = |tensor| {
            HostVec::try_zeros(tensor, spec.stats_dtype(), spec.rows).map_err(|e| self.err(e))
        };
        let mut mean = if spec.has_mean() { Some(stats_vec("mean")?) } else { None };
        let mut rstd = stats_vec("rstd")?;
        let args = ForwardArgs::new(
            T::host(&x),
            Some(T::host(&gamma)),
            beta.as_deref().map(T::host),
            T::host_mut(&mut y),
            mean.as_mut().map(HostVec::as_mut_slice),
            rstd.as_mut_slice(),
        );
        cpu().forward_typed::<T>(spec, args).map_err(|e| self.err(e))?;
        let stats = Stats { mean, rstd };
        if self.stats.set(stats).is_err() {
            candle_core::bail!(
                "layernorm-candle {}: one op instance ran two forwards",
                self.name()
            );
        }
        Ok(T::to_cpu_storage_owned(y))
    }

    /// The backward: dx, and dγ / dβ where wanted, from x, dy, γ and the saved statistics.
    fn backward(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        dy: &Tensor,
        want_dgamma: bool,
        want_dbeta: bool,
    ) -> Result<Grads> {
        let Some(stats) = self.stats.get() else {
            candle_core::bail!("layernorm-candle {}: backward before the forward", self.name());
        };
        if !dy.device().is_cpu() {
            candle_core::bail!(
                "layernorm-candle {}: the output gradient is on {:?}, not the CPU",
                self.name(),
                dy.device().location()
            );
        }
        let (x, dy, gamma) = (x.contiguous()?, dy.contiguous()?, gamma.contiguous()?);
        let ins = [&x, &dy, &gamma];
        let want = (want_dgamma, want_dbeta);
        with_element!(self, |T| self.backward_typed::<T>(ins, stats, want))
    }

    fn backward_typed<T: CpuElement + candle_core::WithDType>(
        &self,
        [x, dy, gamma]: [&Tensor; 3],
        stats: &Stats,
        (want_dgamma, want_dbeta): (bool, bool),
    ) -> Result<Grads> {
        let spec = &self.spec;
        let (x_shape, g_shape, dev) = (x.shape(), gamma.shape(), x.device());
        let (xs, xl) = x.storage_and_layout();
        let (dys, dyl) = dy.storage_and_layout();
        let (gs, gl) = gamma.storage_and_layout();
        let x = cpu_slice::<T>("x", &xs, xl)?;
        let dy = cpu_slice::<T>("dy", &dys, dyl)?;
        let gamma = cpu_slice::<T>("gamma", &gs, gl)?;
        let acc = |tensor: &'static str, v: &HostVec| {
            let (expected, got) = (spec.stats_dtype(), v.dtype());
            self.err(layernorm_core::Error::DTypeMismatch { tensor, expected, got })
        };
        let mean = match &stats.mean {
            Some(m) => Some(T::Acc::from_host(m.as_slice()).ok_or_else(|| acc("mean", m))?),
            None => None,
        };
        let rstd =
            T::Acc::from_host(stats.rstd.as_slice()).ok_or_else(|| acc("rstd", &stats.rstd))?;
        let alloc = |tensor, len| zeroed::<T>(tensor, len).map_err(|e| self.err(e));
        let mut dx = alloc("dx", spec.numel())?;
        let mut dgamma = want_dgamma.then(|| alloc("dgamma", spec.n)).transpose()?;
        let mut dbeta = (want_dbeta && spec.beta).then(|| alloc("dbeta", spec.n)).transpose()?;
        cpu()
            .backward_into::<T>(
                spec,
                x,
                dy,
                mean,
                rstd,
                Some(gamma),
                &mut dx,
                dgamma.as_deref_mut(),
                dbeta.as_deref_mut(),
            )
            .map_err(|e| self.err(e))?;
        let param = |g: Option<Vec<T>>| g.map(|g| Tensor::from_vec(g, g_shape, dev)).transpose();
        Ok(Grads {
            dx: Tensor::from_vec(dx, x_shape, dev)?,
            dgamma: param(dgamma)?,
            dbeta: param(dbeta)?,
        })
    }
}

/// `len` zeros of `T` from a zeroed allocation (fresh pages, not a fill pass), or
/// [`layernorm_core::Error::OutOfMemory`].
fn zeroed<T: bytemuck::Zeroable>(
    tensor: &'static str,
    len: usize,
) -> layernorm_core::Result<Vec<T>> {
    bytemuck::allocation::try_zeroed_vec(len).map_err(|()| layernorm_core::Error::OutOfMemory {
        tensor,
        bytes: len.saturating_mul(size_of::<T>()),
    })
}

/// The elements of a CPU storage in row-major order: borrowed where the layout is contiguous,
/// copied where it is not (a transposed or strided view).
fn contiguous<'a, T: candle_core::WithDType + bytemuck::Zeroable>(
    (storage, layout): (&'a CpuStorage, &Layout),
) -> Result<Cow<'a, [T]>> {
    let data = T::cpu_storage_as_slice(storage)?;
    if let Some((start, end)) = layout.contiguous_offsets() {
        return match data.get(start..end) {
            Some(s) => Ok(Cow::Borrowed(s)),
            None => candle_core::bail!("layernorm-candle: a layout reaches past its storage"),
        };
    }
    let len = layout.shape().elem_count();
    let zeros = zeroed::<T>("contiguous copy", len).map_err(|e| norm_err("copy", e))?;
    let mut dst = T::to_cpu_storage_owned(zeros);
    storage.copy_strided_src(&mut dst, 0, layout)?;
    Ok(Cow::Owned(T::cpu_storage_data(dst)?))
}

/// A contiguous tensor's elements, when its storage is on the CPU.
fn cpu_slice<'a, T: candle_core::WithDType>(
    tensor: &'static str,
    storage: &'a Storage,
    layout: &Layout,
) -> Result<&'a [T]> {
    let Storage::Cpu(storage) = storage else {
        candle_core::bail!("layernorm-candle: `{tensor}` is not on the CPU");
    };
    let data = T::cpu_storage_as_slice(storage)?;
    match layout.contiguous_offsets().and_then(|(start, end)| data.get(start..end)) {
        Some(s) => Ok(s),
        None => candle_core::bail!("layernorm-candle: `{tensor}` is not contiguous"),
    }
}

impl CustomOp2 for NormOp {
    fn name(&self) -> &'static str {
        NormOp::name(self)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.backward(x, gamma, dy, gamma.track_op(), false)?;
        Ok((Some(g.dx), g.dgamma))
    }
}

impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        NormOp::name(self)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.backward(x, gamma, dy, gamma.track_op(), beta.track_op())?;
        Ok((Some(g.dx), g.dgamma, g.dbeta))
    }
}
