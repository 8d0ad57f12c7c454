//! The one error type every backend returns.

use crate::DType;

/// Result alias used across layernorm.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, as values. No backend panics on user input.
///
/// Variants carry named fields so a message can say which value was wrong and what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor has the wrong number of elements for the problem.
    #[error("shape mismatch for `{tensor}`: expected {expected} elements, got {got}")]
    ShapeMismatch {
        /// Which argument (`x`, `dy`, `gamma`, `mean`, …).
        tensor: &'static str,
        /// The length the problem description implies.
        expected: usize,
        /// The length that was passed.
        got: usize,
    },
    /// A tensor's dimensions do not match (for the n-dimensional convenience APIs).
    #[error("shape mismatch for `{tensor}`: expected shape {expected:?}, got {got:?}")]
    DimsMismatch {
        /// Which argument.
        tensor: &'static str,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape that was passed.
        got: Vec<usize>,
    },
    /// The normalized dimension has no elements (N = 0): mean and variance are undefined.
    #[error("the normalized dimension is empty (N = 0): there is nothing to normalize over")]
    EmptyNormalizedDim,
    /// `normalized_dims` asks for more trailing dimensions than the input has.
    #[error(
        "cannot normalize over the last {normalized_dims} dimensions of a {ndim}-dimensional input"
    )]
    TooManyNormalizedDims {
        /// Number of trailing dims requested.
        normalized_dims: usize,
        /// Number of dims of the input.
        ndim: usize,
    },
    /// `eps` must be finite and strictly positive.
    #[error("eps must be finite and > 0, got {eps}")]
    InvalidEps {
        /// The value passed.
        eps: f64,
    },
    /// A tensor has a different dtype than the problem says.
    #[error("dtype mismatch for `{tensor}`: expected {expected}, got {got}")]
    DTypeMismatch {
        /// Which argument.
        tensor: &'static str,
        /// The dtype the problem implies.
        expected: DType,
        /// The dtype that was passed.
        got: DType,
    },
    /// A parameter was passed that the problem says is absent, or is missing though required.
    #[error("`{tensor}` is {}, but the problem description says it is {}",
        if *.passed { "present" } else { "absent" }, if *.passed { "absent" } else { "present" })]
    ParameterMismatch {
        /// Which argument (`gamma`, `beta`, `dgamma`, `dbeta`).
        tensor: &'static str,
        /// Whether it was passed.
        passed: bool,
    },
    /// rows × N does not fit in memory addressing (`usize`) or the backend's index type.
    #[error("problem too large: {rows} rows × {n} elements exceeds {limit}")]
    TooLarge {
        /// Rows.
        rows: usize,
        /// Normalized size.
        n: usize,
        /// The limit that was exceeded, in words.
        limit: String,
    },
    /// The backend does not implement this dtype.
    #[error("backend `{backend}` does not support dtype {dtype}{}", if .reason.is_empty() { String::new() } else { format!(": {}", .reason) })]
    UnsupportedDType {
        /// Backend name.
        backend: String,
        /// The dtype asked for.
        dtype: DType,
        /// Why (e.g. "adapter lacks SHADER_F16"); may be empty.
        reason: String,
    },
    /// The backend does not implement this member of the normalization family.
    #[error("backend `{backend}` does not implement {kind}")]
    UnsupportedKind {
        /// Backend name.
        backend: String,
        /// The [`crate::NormKind`] name.
        kind: &'static str,
    },
    /// The backend cannot run on this machine (not compiled in, no driver, no device, …).
    #[error("backend `{backend}` is unavailable: {reason}")]
    Unavailable {
        /// Backend name.
        backend: String,
        /// What is missing, in words.
        reason: String,
    },
    /// No backend of that name is registered.
    #[error("unknown backend `{name}` (known: {known})")]
    UnknownBackend {
        /// The name asked for.
        name: String,
        /// Comma-separated registered names.
        known: String,
    },
    /// A device buffer belongs to another device or backend instance.
    #[error("buffer for `{tensor}` belongs to a different device")]
    ForeignBuffer {
        /// Which argument.
        tensor: &'static str,
    },
    /// An option of the problem is out of its range (a non-finite γ offset, an offset without γ).
    #[error("invalid `{option}`: {reason}")]
    InvalidOption {
        /// Which option (`gamma_offset`, …).
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A backward from the output needs x̂ = (y − β) / (γ_offset + γ), and γ_offset + γ is 0 in
    /// this column: x̂ cannot be recovered there. Raised before any output is written.
    #[error(
        "cannot recover x̂ from y: γ_offset + γ is 0 at column {column} (γ = {gamma}, offset {offset})"
    )]
    SingularGamma {
        /// The first such column.
        column: usize,
        /// γ there.
        gamma: f64,
        /// The problem's γ offset.
        offset: f64,
    },
    /// Memory for an output or a working buffer could not be allocated.
    #[error("could not allocate {bytes} bytes for `{tensor}`")]
    OutOfMemory {
        /// What the memory was for.
        tensor: &'static str,
        /// How many bytes were asked for.
        bytes: usize,
    },
    /// The backend cannot compute this problem as described (a value its arithmetic cannot
    /// represent, a variant it lacks), and says so rather than computing something else.
    #[error("backend `{backend}` cannot {what}")]
    Unsupported {
        /// Backend name.
        backend: String,
        /// What it cannot do, and why, in words.
        what: String,
    },
    /// The device reported an error (out of memory, launch failure, lost device, …).
    #[error("device error on backend `{backend}`: {message}")]
    Device {
        /// Backend name.
        backend: String,
        /// The device's message.
        message: String,
    },
}

impl Error {
    /// A short, stable class name for reports and snapshots (`shape`, `eps`, `unsupported`, …).
    pub fn class(&self) -> &'static str {
        match self {
            Error::ShapeMismatch { .. } | Error::DimsMismatch { .. } => "shape",
            Error::EmptyNormalizedDim => "empty",
            Error::TooManyNormalizedDims { .. } => "dims",
            Error::InvalidEps { .. } => "eps",
            Error::DTypeMismatch { .. } => "dtype",
            Error::ParameterMismatch { .. } => "parameter",
            Error::TooLarge { .. } => "too-large",
            Error::UnsupportedDType { .. } => "unsupported",
            Error::UnsupportedKind { .. } => "unsupported-kind",
            Error::Unavailable { .. } => "unavailable",
            Error::UnknownBackend { .. } => "unknown-backend",
            Error::ForeignBuffer { .. } => "foreign-buffer",
            Error::Device { .. } => "device",
            Error::InvalidOption { .. } => "option",
            Error::SingularGamma { .. } => "singular-gamma",
            Error::OutOfMemory { .. } => "out-of-memory",
            Error::Unsupported { .. } => "unsupported-feature",
        }
    }

    /// Shorthand for [`Error::Unavailable`].
    pub fn unavailable(backend: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Unavailable { backend: backend.into(), reason: reason.into() }
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(backend: impl Into<String>, what: impl Into<String>) -> Error {
        Error::Unsupported { backend: backend.into(), what: what.into() }
    }

    /// Shorthand for [`Error::Device`].
    pub fn device(backend: impl Into<String>, message: impl std::fmt::Display) -> Error {
        Error::Device { backend: backend.into(), message: message.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_values() {
        let e = Error::ShapeMismatch { tensor: "gamma", expected: 768, got: 767 };
        assert_eq!(e.to_string(), "shape mismatch for `gamma`: expected 768 elements, got 767");
        let e = Error::ParameterMismatch { tensor: "beta", passed: true };
        assert_eq!(
            e.to_string(),
            "`beta` is present, but the problem description says it is absent"
        );
        let e = Error::UnsupportedDType {
            backend: "wgpu".into(),
            dtype: DType::F64,
            reason: "WGSL has no f64".into(),
        };
        assert_eq!(e.to_string(), "backend `wgpu` does not support dtype f64: WGSL has no f64");
        let e = Error::UnsupportedDType {
            backend: "x".into(),
            dtype: DType::F16,
            reason: String::new(),
        };
        assert_eq!(e.to_string(), "backend `x` does not support dtype f16");
        assert_eq!(
            Error::InvalidEps { eps: f64::NAN }.to_string(),
            "eps must be finite and > 0, got NaN"
        );
    }
}
