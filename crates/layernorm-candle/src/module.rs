//! The `candle_nn::Module`s: [`LayerNorm`] and [`RmsNorm`], shaped like candle-nn's own, and
//! their `VarBuilder` constructors with candle's weight names.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, LayerNormConfig, VarBuilder};
use layernorm_core::NormKind;

use crate::ops;

/// A LayerNorm layer (or, with `remove_mean` off, an RMSNorm one) over the last dimension: the
/// counterpart of `candle_nn::LayerNorm`, same fields and constructors, whose forward is
/// [`ops::normalize`] — contiguous or not, with a backward.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    remove_mean: bool,
    eps: f64,
}

impl LayerNorm {
    /// LayerNorm with scale `weight` and shift `bias`.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias: Some(bias), remove_mean: true, eps }
    }

    /// LayerNorm with scale `weight` and no shift.
    pub fn new_no_bias(weight: Tensor, eps: f64) -> Self {
        Self { weight, bias: None, remove_mean: true, eps }
    }

    /// RMSNorm with scale `weight`.
    pub fn rms_norm(weight: Tensor, eps: f64) -> Self {
        Self { weight, bias: None, remove_mean: false, eps }
    }

    /// The scale γ.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The shift β, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// ε.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Whether the mean is removed (LayerNorm) or not (RMSNorm).
    pub fn remove_mean(&self) -> bool {
        self.remove_mean
    }

    /// The kind of normalization this layer computes.
    pub fn kind(&self) -> NormKind {
        if self.remove_mean { NormKind::LayerNorm } else { NormKind::RmsNorm }
    }

    /// The pre-norm block's fused residual add and this norm: `(y, h)` with h = x + residual
    /// (rounded once to the dtype) and y = norm(h), both differentiable through one fused
    /// backward ([`ops::normalize_residual`]).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        ops::normalize_residual(
            self.kind(),
            x,
            residual,
            &self.weight,
            self.bias.as_ref(),
            self.eps,
        )
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::normalize(self.kind(), x, &self.weight, self.bias.as_ref(), self.eps)
    }
}

impl From<candle_nn::LayerNorm> for LayerNorm {
    /// The same parameters, computed by this crate's ops.
    fn from(ln: candle_nn::LayerNorm) -> Self {
        Self {
            weight: ln.weight().clone(),
            bias: ln.bias().cloned(),
            remove_mean: ln.remove_mean(),
            eps: ln.eps(),
        }
    }
}

/// An RMSNorm layer over the last dimension: the counterpart of `candle_nn::RmsNorm`.
#[derive(Clone, Debug)]
pub struct RmsNorm(LayerNorm);

impl RmsNorm {
    /// RMSNorm with scale `weight`.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self(LayerNorm::rms_norm(weight, eps))
    }

    /// The layer as a [`LayerNorm`] with `remove_mean` off.
    pub fn into_inner(self) -> LayerNorm {
        self.0
    }

    /// The scale γ.
    pub fn weight(&self) -> &Tensor {
        self.0.weight()
    }

    /// ε.
    pub fn eps(&self) -> f64 {
        self.0.eps()
    }

    /// The pre-norm block's fused residual add and RMSNorm: `(y, h)` with h = x + residual
    /// (rounded once to the dtype) and y = RMSNorm(h) ([`ops::rms_norm_residual`]).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        self.0.forward_residual(x, residual)
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x)
    }
}

impl From<candle_nn::RmsNorm> for RmsNorm {
    /// The same parameters, computed by this crate's ops.
    fn from(rms: candle_nn::RmsNorm) -> Self {
        Self(rms.into_inner().into())
    }
}

/// A [`LayerNorm`] of `size` from a `VarBuilder`, as `candle_nn::layer_norm` builds one: the scale
/// is read from `weight` (or the older `gamma`), the shift, when `config.affine`, from `bias` (or
/// `beta`); a builder that creates variables initializes them to 1 and 0. `config` is an ε
/// (`1e-5`) or a `candle_nn::LayerNormConfig`.
pub fn layer_norm<C: Into<LayerNormConfig>>(
    size: usize,
    config: C,
    vb: VarBuilder,
) -> Result<LayerNorm> {
    let config = config.into();
    let name = |names: [&'static str; 2]| {
        names.into_iter().find(|n| vb.contains_tensor(n)).unwrap_or(names[0])
    };
    let weight = vb.get_with_hints(size, name(["weight", "gamma"]), Init::Const(1.))?;
    let bias = if config.affine {
        Some(vb.get_with_hints(size, name(["bias", "beta"]), Init::Const(0.))?)
    } else {
        None
    };
    Ok(LayerNorm { weight, bias, remove_mean: config.remove_mean, eps: config.eps })
}

/// A [`LayerNorm`] of `size` without a shift, from a `VarBuilder` (`candle_nn::layer_norm_no_bias`).
pub fn layer_norm_no_bias(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    layer_norm(size, LayerNormConfig { eps, remove_mean: true, affine: false }, vb)
}

/// An [`RmsNorm`] of `size` from a `VarBuilder`, its scale read from `weight`
/// (`candle_nn::rms_norm`).
pub fn rms_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
    let config = LayerNormConfig { eps, remove_mean: false, affine: false };
    Ok(RmsNorm(layer_norm(size, config, vb)?))
}
