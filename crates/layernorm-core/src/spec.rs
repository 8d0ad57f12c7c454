//! The problem description: what to normalize, over what, with which parameters.

use crate::{DType, Error, Result};

/// Which member of the normalization family. Backends match on it and reject what they lack
/// with [`Error::UnsupportedKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NormKind {
    /// `y = (x − mean) · rstd · γ + β` over each row, rstd = 1/√(var + ε) (`docs/math.md` (1)–(5)).
    LayerNorm,
    /// `y = x · r · γ + β` over each row, r = 1/√(mean(x²) + ε): no mean is subtracted, and none
    /// is saved (`docs/math.md` (10)–(12)).
    RmsNorm,
}

impl NormKind {
    /// Every kind, in a fixed order.
    pub const ALL: [NormKind; 2] = [NormKind::LayerNorm, NormKind::RmsNorm];

    /// Short name for reports (`layer_norm`, `rms_norm`).
    pub const fn name(self) -> &'static str {
        match self {
            NormKind::LayerNorm => "layer_norm",
            NormKind::RmsNorm => "rms_norm",
        }
    }

    /// Parses a name produced by [`NormKind::name`].
    pub fn from_name(name: &str) -> Option<NormKind> {
        NormKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether the kind subtracts, and so saves, a per-row mean (LayerNorm) or not (RMSNorm).
    pub const fn has_mean(self) -> bool {
        matches!(self, NormKind::LayerNorm)
    }

    /// The default ε: PyTorch's `nn.LayerNorm` (1e-5) for LayerNorm; for RMSNorm the Llama /
    /// Mistral / Qwen / Gemma convention, 1e-6 (PyTorch's `nn.RMSNorm` defaults to the dtype's
    /// machine epsilon instead, which is 1.2e-7 in `f32` and 7.8e-3 in `bf16`: a value that
    /// changes with the storage type is not what a model's config means by ε).
    pub const fn default_eps(self) -> f64 {
        match self {
            NormKind::LayerNorm => 1e-5,
            NormKind::RmsNorm => 1e-6,
        }
    }
}

impl std::fmt::Display for NormKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One normalization problem: `rows` independent rows of `n` elements each, stored contiguously
/// (row-major), in one dtype.
///
/// Built with [`NormSpec::layer_norm`] or [`NormSpec::rms_norm`] and adjusted with the `with_*`
/// methods; the fields are public to read. It is `#[non_exhaustive]`, so fields can be added
/// without breaking anyone.
///
/// This is the device-level description the [`crate::Normalize`] trait takes. Applications
/// normally use the n-dimensional layer ([`crate::Norm`], [`crate::NormalizeNd`]), which builds
/// it from the arguments.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct NormSpec {
    /// Which normalization.
    pub kind: NormKind,
    /// Number of rows (everything before the normalized dims, flattened). May be 0.
    pub rows: usize,
    /// Normalized size N (the product of the normalized dims). Must be ≥ 1.
    pub n: usize,
    /// Added to the variance (LayerNorm) or the mean square (RMSNorm) before the square root.
    /// Finite and > 0 (subnormals included).
    pub eps: f64,
    /// Whether a scale γ of length N is applied (PyTorch's `elementwise_affine` / `weight`).
    pub gamma: bool,
    /// Whether a shift β of length N is applied (PyTorch's `bias`).
    pub beta: bool,
    /// Added to γ before it scales: y = x̂·(γ_offset + γ) + β. 0 by default; 1 for a
    /// zero-centred γ (Gemma's RMSNorm, Megatron's `apply_layernorm_1p`). Requires γ.
    pub gamma_offset: f64,
    /// Storage dtype of x, y, γ, β, dy, dx, dγ, dβ (and of a residual, h and dh). Mean and rstd
    /// are stored in [`DType::acc`].
    pub dtype: DType,
}

impl NormSpec {
    /// A problem of `kind` over `rows × n` in `dtype`, with the kind's default ε
    /// ([`NormKind::default_eps`]), γ and β present, no γ offset.
    pub fn new(kind: NormKind, rows: usize, n: usize, dtype: DType) -> NormSpec {
        NormSpec {
            kind,
            rows,
            n,
            eps: kind.default_eps(),
            gamma: true,
            beta: true,
            gamma_offset: 0.0,
            dtype,
        }
    }

    /// A LayerNorm over `rows × n` in `dtype`, with eps 1e-5 and both γ and β (PyTorch's
    /// `nn.LayerNorm` defaults).
    pub fn layer_norm(rows: usize, n: usize, dtype: DType) -> NormSpec {
        NormSpec::new(NormKind::LayerNorm, rows, n, dtype)
    }

    /// An RMSNorm over `rows × n` in `dtype`, with eps 1e-6, γ and no β (the Llama layer).
    pub fn rms_norm(rows: usize, n: usize, dtype: DType) -> NormSpec {
        NormSpec::new(NormKind::RmsNorm, rows, n, dtype).with_beta(false)
    }

    /// Sets eps.
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// Sets whether γ is present.
    pub fn with_gamma(mut self, gamma: bool) -> Self {
        self.gamma = gamma;
        self
    }

    /// Sets whether β is present.
    pub fn with_beta(mut self, beta: bool) -> Self {
        self.beta = beta;
        self
    }

    /// Sets both γ and β (PyTorch's `elementwise_affine`).
    pub fn with_affine(self, affine: bool) -> Self {
        self.with_gamma(affine).with_beta(affine)
    }

    /// Sets the γ offset (see [`NormSpec::gamma_offset`]).
    pub fn with_gamma_offset(mut self, offset: f64) -> Self {
        self.gamma_offset = offset;
        self
    }

    /// Sets the dtype.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// Sets the kind (keeping every other field, ε included).
    pub fn with_kind(mut self, kind: NormKind) -> Self {
        self.kind = kind;
        self
    }

    /// Number of elements of x (rows × N). Saturates where rows × N overflows `usize` (which
    /// [`NormSpec::validate`] rejects).
    pub fn numel(&self) -> usize {
        self.rows.saturating_mul(self.n)
    }

    /// The dtype of mean and rstd.
    pub fn stats_dtype(&self) -> DType {
        self.dtype.acc()
    }

    /// Whether the problem saves (and its backward from x reads) a per-row mean.
    pub fn has_mean(&self) -> bool {
        self.kind.has_mean()
    }

    /// The γ offset as the storage dtype's accumulation type sees it: the value backends add.
    pub fn gamma_offset_acc(&self) -> f64 {
        self.dtype.acc().round(self.gamma_offset)
    }

    /// Checks the description itself: N ≥ 1, eps finite and > 0, a finite γ offset only with γ,
    /// rows × N addressable in bytes.
    pub fn validate(&self) -> Result<()> {
        if self.n == 0 {
            return Err(Error::EmptyNormalizedDim);
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::InvalidEps { eps: self.eps });
        }
        if !self.gamma_offset.is_finite() {
            return Err(Error::InvalidOption {
                option: "gamma_offset",
                reason: format!("must be finite, got {}", self.gamma_offset),
            });
        }
        if self.gamma_offset != 0.0 && !self.gamma {
            return Err(Error::InvalidOption {
                option: "gamma_offset",
                reason: format!("{} is set, but there is no γ to offset", self.gamma_offset),
            });
        }
        let fits = self
            .rows
            .checked_mul(self.n)
            .and_then(|e| e.checked_mul(self.dtype.size().max(8)))
            .is_some_and(|b| b <= isize::MAX as usize);
        if !fits {
            return Err(Error::TooLarge {
                rows: self.rows,
                n: self.n,
                limit: "the address space".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_pytorch_and_llama() {
        let s = NormSpec::layer_norm(2, 3, DType::F32);
        assert_eq!((s.eps, s.gamma, s.beta, s.gamma_offset), (1e-5, true, true, 0.0));
        assert_eq!(s.numel(), 6);
        assert_eq!(s.stats_dtype(), DType::F32);
        assert_eq!(s.clone().with_dtype(DType::F64).stats_dtype(), DType::F64);
        let s = s.with_affine(false);
        assert!(!s.gamma && !s.beta);
        let r = NormSpec::rms_norm(2, 3, DType::BF16);
        assert_eq!((r.kind, r.eps, r.gamma, r.beta), (NormKind::RmsNorm, 1e-6, true, false));
        assert!(!r.has_mean() && NormSpec::layer_norm(1, 1, DType::F32).has_mean());
        for k in NormKind::ALL {
            assert_eq!(NormKind::from_name(k.name()), Some(k));
        }
    }

    #[test]
    fn validation_names_the_bad_value() {
        let ok = NormSpec::layer_norm(0, 1, DType::BF16);
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(
            NormSpec::layer_norm(4, 0, DType::F32).validate(),
            Err(Error::EmptyNormalizedDim)
        );
        for eps in [0.0, -1e-5, f64::NAN, f64::INFINITY] {
            let err = ok.clone().with_eps(eps).validate().unwrap_err();
            assert_eq!(err.class(), "eps", "{eps}");
        }
        // Every positive finite ε is valid, down to the smallest subnormal.
        assert_eq!(ok.clone().with_eps(f64::from_bits(1)).validate(), Ok(()));
        let huge = NormSpec::layer_norm(usize::MAX / 2, 3, DType::F32).validate().unwrap_err();
        assert_eq!(huge.class(), "too-large");
        let offset = ok.clone().with_gamma(false).with_gamma_offset(1.0).validate().unwrap_err();
        assert_eq!(offset.class(), "option");
        assert_eq!(
            ok.clone().with_gamma_offset(f64::NAN).validate().unwrap_err().class(),
            "option"
        );
        assert_eq!(ok.with_gamma_offset(1.0).validate(), Ok(()));
    }
}
