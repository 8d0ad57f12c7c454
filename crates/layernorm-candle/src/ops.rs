//! The candle custom ops: LayerNorm and RMSNorm whose forward and backward run layernorm's CPU
//! kernels, recorded for autograd with `apply_op2` / `apply_op3`.
//!
//! One op type, `NormOp`, serves both kinds, both parameter sets and both variants: γ alone
//! ([`candle_core::CustomOp2`] over x and γ), γ and β ([`candle_core::CustomOp3`]), and the
//! fused residual add (a `CustomOp3` over x, the residual and the parameters, whose one output
//! holds y and h: see [`normalize_residual`]). Each call makes a fresh instance; its forward
//! keeps the per-row statistics it computed (mean and rstd, a few bytes a row) in the instance,
//! which candle's graph holds until the backward reads them.

use std::borrow::Cow;
use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use layernorm_core::{BackwardArgs, DType, ForwardArgs, HostVec, NormKind, NormSpec, Residual};
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
    let op = NormOp::new(kind, Inputs { x, residual: None, gamma, beta }, eps.into())?;
    match beta {
        Some(beta) => x.apply_op3(gamma, beta, op),
        None => x.apply_op2(gamma, op),
    }
}

/// The pre-norm block's fused residual add and LayerNorm: h = x + residual, rounded once to the
/// dtype, and y = LayerNorm(h) with scale `gamma` and shift `beta` (`docs/math.md` (14)).
/// Returns `(y, h)`: y feeds the sublayer, h is the residual stream the next block adds to.
///
/// Both outputs are differentiable, and one fused backward serves them: gradients arriving on
/// y and on h reach x, `residual` (the same gradient, dx), γ and β (`docs/math.md` (15)).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
///
/// let dev = Device::Cpu;
/// let x = Var::from_tensor(&Tensor::new(&[[1f32, 2., 3.], [4., 4., 7.]], &dev)?)?;
/// let stream = Var::from_tensor(&Tensor::new(&[[0.5f32, 0., -1.], [1., 2., 3.]], &dev)?)?;
/// let gamma = Tensor::new(&[1f32, 1., 1.], &dev)?;
/// let beta = Tensor::new(&[0f32, 0., 0.], &dev)?;
/// let (y, h) = layernorm_candle::ops::layer_norm_residual(&x, &stream, &gamma, &beta, 1e-5)?;
/// assert_eq!(h.to_vec2::<f32>()?, [[1.5, 2., 2.], [5., 6., 10.]]);
/// // Both outputs feed the loss; x and the residual receive the same gradient.
/// let grads = (y.sqr()?.sum_all()? + h.sum_all()?)?.backward()?;
/// let (dx, dr) = (grads.get(&x).unwrap(), grads.get(&stream).unwrap());
/// assert_eq!(dx.to_vec2::<f32>()?, dr.to_vec2::<f32>()?);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn layer_norm_residual(
    x: &Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: impl Into<f64>,
) -> Result<(Tensor, Tensor)> {
    normalize_residual(NormKind::LayerNorm, x, residual, gamma, Some(beta), eps)
}

/// The pre-norm block's fused residual add and RMSNorm (Llama's, Mistral's): h = x + residual,
/// rounded once to the dtype, and y = RMSNorm(h) with scale `gamma`. Returns `(y, h)`, both
/// differentiable through one fused backward, as [`layer_norm_residual`].
pub fn rms_norm_residual(
    x: &Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    eps: impl Into<f64>,
) -> Result<(Tensor, Tensor)> {
    normalize_residual(NormKind::RmsNorm, x, residual, gamma, None, eps)
}

/// The fused residual add and either kind, with an optional shift: `(y, h)` with
/// h = x + residual rounded to the dtype, y = norm(h). The checks of [`normalize`], and
/// `residual` of x's shape, dtype and device.
///
/// # How the two outputs share one backward
///
/// A candle op has one output, and its backward receives that output's gradient. So the op
/// writes y and h into **one** buffer of shape `[2, ..x.dims()]` — y in the first half, h in the
/// second, both from the one fused forward call — and this function returns its two halves,
/// `out.get(0)` and `out.get(1)` (views, no copy). candle's autograd turns each half's gradient
/// back into one of the buffer's shape (zeros in the other half: an output that feeds nothing
/// gets a zero gradient) and sums them: the op's backward receives \[dy; dh\], exactly the
/// fused backward's `dy` and `dh`, and reads h from the op's output. Its dx is the gradient of
/// x and of `residual` both.
///
/// The op takes three tensors (candle's largest custom op); with a shift, γ and β travel as
/// one `[2, N]` tensor, stacked by a differentiable candle op before the call — a copy of 2·N
/// elements, and a split of the \[dγ; dβ\] gradient back to each.
///
/// The price of the single output is in candle's bookkeeping, not in the kernel: each half's
/// gradient is padded with zeros to the buffer's shape and added into it (a few passes over
/// 2·rows·N elements before the fused backward starts; the crate README's table measures it).
pub fn normalize_residual(
    kind: NormKind,
    x: &Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    eps: impl Into<f64>,
) -> Result<(Tensor, Tensor)> {
    let op = NormOp::new(kind, Inputs { x, residual: Some(residual), gamma, beta }, eps.into())?;
    let params = match beta {
        Some(beta) => Cow::Owned(Tensor::stack(&[gamma, beta], 0)?),
        None => Cow::Borrowed(gamma),
    };
    let out = x.apply_op3(residual, &params, op)?;
    Ok((out.get(0)?, out.get(1)?))
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

/// The tensors of one call, as the user passed them.
struct Inputs<'a> {
    x: &'a Tensor,
    residual: Option<&'a Tensor>,
    gamma: &'a Tensor,
    beta: Option<&'a Tensor>,
}

/// One op input on the CPU: its storage and layout.
type In<'a> = (&'a CpuStorage, &'a Layout);

/// One normalization call: the problem, checked against the tensors when made, whether it is
/// the fused residual variant, and the statistics its forward saved.
///
/// The variant decides how the op's inputs and output are laid out:
///
/// | variant | op | inputs | output |
/// |---|---|---|---|
/// | plain, γ | `CustomOp2` | x, γ | y |
/// | plain, γ and β | `CustomOp3` | x, γ, β | y |
/// | residual | `CustomOp3` | x, residual, params | \[y; h\] (`[2, ..x.dims()]`) |
///
/// where params is γ (`[N]`), or γ and β stacked (`[2, N]`) when the problem has β.
#[derive(Debug)]
struct NormOp {
    spec: NormSpec,
    residual: bool,
    stats: OnceLock<Stats>,
}

/// The op's name in candle's graph and in error messages.
fn op_name(kind: NormKind, residual: bool) -> &'static str {
    match (kind, residual) {
        (NormKind::RmsNorm, false) => "rms_norm",
        (NormKind::RmsNorm, true) => "rms_norm_residual",
        (_, false) => "layer_norm",
        (_, true) => "layer_norm_residual",
    }
}

impl NormOp {
    /// Checks the tensors and builds the problem they describe.
    fn new(kind: NormKind, t: Inputs<'_>, eps: f64) -> Result<NormOp> {
        let Inputs { x, residual, gamma, beta } = t;
        let name = op_name(kind, residual.is_some());
        let named =
            [("x", Some(x)), ("residual", residual), ("gamma", Some(gamma)), ("beta", beta)];
        let named = || named.iter().filter_map(|(a, t)| t.map(|t| (*a, t)));
        for (arg, t) in named() {
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
        for (arg, t) in named().skip(1) {
            let expected = if arg == "residual" { dims } else { &[n][..] };
            if t.dims() != expected {
                let e = layernorm_core::Error::DimsMismatch {
                    tensor: arg,
                    expected: expected.to_vec(),
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
        Ok(NormOp { spec, residual: residual.is_some(), stats: OnceLock::new() })
    }

    fn name(&self) -> &'static str {
        op_name(self.spec.kind, self.residual)
    }

    fn err(&self, e: layernorm_core::Error) -> candle_core::Error {
        norm_err(self.name(), e)
    }

    /// γ and β from the op's parameter inputs: `params` is γ, or — for the residual variant
    /// with β — γ and β stacked; a separate `beta` is the plain variant's third input.
    fn split_params<'a, T>(
        &self,
        params: &'a [T],
        beta: Option<&'a [T]>,
    ) -> Result<(&'a [T], Option<&'a [T]>)> {
        if beta.is_some() || !(self.residual && self.spec.beta) {
            return Ok((params, beta));
        }
        let Some((gamma, beta)) = params.split_at_checked(self.spec.n) else {
            let (tensor, expected, got) = ("gamma", 2 * self.spec.n, params.len());
            return Err(self.err(layernorm_core::Error::ShapeMismatch { tensor, expected, got }));
        };
        Ok((gamma, Some(beta)))
    }

    /// The forward on CPU storage: y (or \[y; h\]), and the statistics kept for the backward.
    fn cpu_forward(
        &self,
        x: In<'_>,
        residual: Option<In<'_>>,
        params: In<'_>,
        beta: Option<In<'_>>,
    ) -> Result<(CpuStorage, Shape)> {
        let storage = with_element!(self, |T| self.forward_typed::<T>(x, residual, params, beta))?;
        let dims = x.1.shape().dims();
        let shape = match self.residual {
            true => Shape::from([&[2], dims].concat()),
            false => Shape::from(dims),
        };
        Ok((storage, shape))
    }

    fn forward_typed<T: CpuElement + candle_core::WithDType>(
        &self,
        x: In<'_>,
        residual: Option<In<'_>>,
        params: In<'_>,
        beta: Option<In<'_>>,
    ) -> Result<CpuStorage> {
        let spec = &self.spec;
        let x = contiguous::<T>(x)?;
        let residual = residual.map(contiguous::<T>).transpose()?;
        let params = contiguous::<T>(params)?;
        let beta = beta.map(contiguous::<T>).transpose()?;
        let (gamma, beta) = self.split_params(&params, beta.as_deref())?;
        let outputs = if residual.is_some() { 2 } else { 1 };
        let len = spec.numel().saturating_mul(outputs);
        let mut out = zeroed::<T>("y", len).map_err(|e| self.err(e))?;
        let (y, h) = out.split_at_mut(spec.numel());
        let stats_vec = |tensor| {
            HostVec::try_zeros(tensor, spec.stats_dtype(), spec.rows).map_err(|e| self.err(e))
        };
        let mut mean = if spec.has_mean() { Some(stats_vec("mean")?) } else { None };
        let mut rstd = stats_vec("rstd")?;
        let mut args = ForwardArgs::new(
            T::host(&x),
            Some(T::host(gamma)),
            beta.map(T::host),
            T::host_mut(y),
            mean.as_mut().map(HostVec::as_mut_slice),
            rstd.as_mut_slice(),
        );
        if let Some(residual) = &residual {
            let add = Residual::Add { residual: T::host(residual), h: T::host_mut(h) };
            args = args.with_residual(add);
        }
        cpu().forward_typed::<T>(spec, args).map_err(|e| self.err(e))?;
        let stats = Stats { mean, rstd };
        if self.stats.set(stats).is_err() {
            candle_core::bail!(
                "layernorm-candle {}: one op instance ran two forwards",
                self.name()
            );
        }
        Ok(T::to_cpu_storage_owned(out))
    }

    /// The backward: dx, and dγ / dβ where wanted. `saved` is x (plain) or the op's output
    /// \[y; h\] (residual, whose h is read); `grad` is dy (plain) or \[dy; dh\]; `params` is
    /// the op's γ input (for the residual variant with β, γ and β stacked).
    fn backward(
        &self,
        saved: &Tensor,
        params: &Tensor,
        grad: &Tensor,
        (want_dgamma, want_dbeta): (bool, bool),
    ) -> Result<Grads> {
        let Some(stats) = self.stats.get() else {
            candle_core::bail!("layernorm-candle {}: backward before the forward", self.name());
        };
        if !grad.device().is_cpu() {
            candle_core::bail!(
                "layernorm-candle {}: the output gradient is on {:?}, not the CPU",
                self.name(),
                grad.device().location()
            );
        }
        let (saved, grad, params) = (saved.contiguous()?, grad.contiguous()?, params.contiguous()?);
        let ins = [&saved, &grad, &params];
        let want = (want_dgamma, want_dbeta && self.spec.beta);
        with_element!(self, |T| self.backward_typed::<T>(ins, stats, want))
    }

    fn backward_typed<T: CpuElement + candle_core::WithDType>(
        &self,
        [saved, grad, params]: [&Tensor; 3],
        stats: &Stats,
        (want_dgamma, want_dbeta): (bool, bool),
    ) -> Result<Grads> {
        let (spec, dev) = (&self.spec, saved.device());
        let x_dims = if self.residual { &saved.dims()[1..] } else { saved.dims() };
        let (ss, sl) = saved.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (ps, pl) = params.storage_and_layout();
        let saved = cpu_slice::<T>("x", &ss, sl)?;
        let grad = cpu_slice::<T>("dy", &gs, gl)?;
        let (gamma, _) = self.split_params(cpu_slice::<T>("gamma", &ps, pl)?, None)?;
        let (saved, dy, dh) = match self.residual {
            false => (saved, grad, None),
            true => {
                let [_y, h] = self.halves("h", saved)?;
                let [dy, dh] = self.halves("dy", grad)?;
                (h, dy, Some(dh))
            }
        };
        let alloc = |tensor, len| zeroed::<T>(tensor, len).map_err(|e| self.err(e));
        let mut dx = alloc("dx", spec.numel())?;
        let mut dgamma = want_dgamma.then(|| alloc("dgamma", spec.n)).transpose()?;
        let mut dbeta = want_dbeta.then(|| alloc("dbeta", spec.n)).transpose()?;
        let mut args = BackwardArgs::new(
            T::host(saved),
            T::host(dy),
            stats.mean.as_ref().map(HostVec::as_slice),
            stats.rstd.as_slice(),
            Some(T::host(gamma)),
            T::host_mut(&mut dx),
            dgamma.as_deref_mut().map(T::host_mut),
            dbeta.as_deref_mut().map(T::host_mut),
        );
        if let Some(dh) = dh {
            args = args.with_dh(T::host(dh));
        }
        cpu().backward_typed::<T>(spec, args).map_err(|e| self.err(e))?;
        let param = |g: Option<Vec<T>>| g.map(|g| Tensor::from_vec(g, spec.n, dev)).transpose();
        Ok(Grads {
            dx: Tensor::from_vec(dx, x_dims, dev)?,
            dgamma: param(dgamma)?,
            dbeta: param(dbeta)?,
        })
    }

    /// The two halves of a residual op's output (or of its gradient), `rows × N` each.
    fn halves<'a, T>(&self, tensor: &'static str, s: &'a [T]) -> Result<[&'a [T]; 2]> {
        let numel = self.spec.numel();
        match s.split_at_checked(numel) {
            Some((a, b)) if b.len() == numel => Ok([a, b]),
            _ => {
                let (expected, got) = (2 * numel, s.len());
                Err(self.err(layernorm_core::Error::ShapeMismatch { tensor, expected, got }))
            }
        }
    }

    /// The residual op's gradients as candle wants them: dx for both x and the residual (for
    /// those that track gradients), and \[dγ; dβ\] stacked like the parameter input.
    fn residual_grads(
        &self,
        [x, residual, params]: [&Tensor; 3],
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want = params.track_op();
        let g = self.backward(out, params, grad, (want, want))?;
        let dparams = match (g.dgamma, g.dbeta) {
            (Some(dgamma), Some(dbeta)) => Some(Tensor::stack(&[dgamma, dbeta], 0)?),
            (dgamma, _) => dgamma,
        };
        let dx = |t: &Tensor| t.track_op().then(|| g.dx.clone());
        Ok((dx(x), dx(residual), dparams))
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
        self.cpu_forward((s1, l1), None, (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.backward(x, gamma, dy, (gamma.track_op(), false))?;
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
        match self.residual {
            true => self.cpu_forward((s1, l1), Some((s2, l2)), (s3, l3), None),
            false => self.cpu_forward((s1, l1), None, (s2, l2), Some((s3, l3))),
        }
    }

    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.residual {
            return self.residual_grads([a1, a2, a3], out, grad);
        }
        let (x, gamma, beta) = (a1, a2, a3);
        let g = self.backward(x, gamma, grad, (gamma.track_op(), beta.track_op()))?;
        Ok((Some(g.dx), g.dgamma, g.dbeta))
    }
}
