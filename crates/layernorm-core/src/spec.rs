//! The problem description: what to normalize, over what, with which parameters.

use crate::{DType, Error, Result};

/// Which member of the normalization family. Only LayerNorm exists today; RMSNorm (no mean) and
/// fused variants are added as new variants, so backends match on it and reject what they lack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NormKind {
    /// `y = (x − mean) · rstd · γ + β` over each row.
    LayerNorm,
}

impl NormKind {
    /// Short name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            NormKind::LayerNorm => "layer_norm",
        }
    }
}

/// One normalization problem: `rows` independent rows of `n` elements each, stored contiguously
/// (row-major), in one dtype.
///
/// Built with [`NormSpec::layer_norm`] and adjusted with the `with_*` methods; the fields are
/// public to read. It is `#[non_exhaustive]`, so fields can be added (a residual input, a saved
/// output for a backward-from-y) without breaking anyone.
///
/// Defaults follow PyTorch's `nn.LayerNorm`: `eps = 1e-5`, γ and β present.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct NormSpec {
    /// Which normalization.
    pub kind: NormKind,
    /// Number of rows (everything before the normalized dims, flattened). May be 0.
    pub rows: usize,
    /// Normalized size N (the product of the normalized dims). Must be ≥ 1.
    pub n: usize,
    /// Added to the variance before the square root. Finite and > 0.
    pub eps: f64,
    /// Whether a scale γ of length N is applied (PyTorch's `elementwise_affine`).
    pub gamma: bool,
    /// Whether a shift β of length N is applied (PyTorch's `bias`).
    pub beta: bool,
    /// Storage dtype of x, y, γ, β, dy, dx, dγ, dβ. Mean and rstd are stored in [`DType::acc`].
    pub dtype: DType,
}

impl NormSpec {
    /// A LayerNorm over `rows × n` in `dtype`, with eps 1e-5 and both γ and β.
    pub fn layer_norm(rows: usize, n: usize, dtype: DType) -> NormSpec {
        NormSpec { kind: NormKind::LayerNorm, rows, n, eps: 1e-5, gamma: true, beta: true, dtype }
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

    /// Sets the dtype.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// Number of elements of x (rows × N).
    pub fn numel(&self) -> usize {
        self.rows * self.n
    }

    /// The dtype of mean and rstd.
    pub fn stats_dtype(&self) -> DType {
        self.dtype.acc()
    }

    /// Checks the description itself: N ≥ 1, eps finite and > 0, rows × N addressable in bytes.
    pub fn validate(&self) -> Result<()> {
        if self.n == 0 {
            return Err(Error::EmptyNormalizedDim);
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::InvalidEps { eps: self.eps });
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
    fn defaults_follow_pytorch() {
        let s = NormSpec::layer_norm(2, 3, DType::F32);
        assert_eq!((s.eps, s.gamma, s.beta), (1e-5, true, true));
        assert_eq!(s.numel(), 6);
        assert_eq!(s.stats_dtype(), DType::F32);
        assert_eq!(s.clone().with_dtype(DType::F64).stats_dtype(), DType::F64);
        let s = s.with_affine(false);
        assert!(!s.gamma && !s.beta);
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
        let huge = NormSpec::layer_norm(usize::MAX / 2, 3, DType::F32).validate().unwrap_err();
        assert_eq!(huge.class(), "too-large");
    }
}
