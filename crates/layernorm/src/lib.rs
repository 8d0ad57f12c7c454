//! The normalization family — LayerNorm and RMSNorm, with a γ offset, a fused residual add and a
//! backward from the output — forward and backward on CPU, CUDA and wgpu behind one trait, every
//! backend held to one f64 reference by one conformance suite.
//!
//! This is the pick-a-backend facade. It re-exports the core ([`Norm`], [`NormalizeNd`],
//! [`Normalize`], [`NormSpec`], [`DType`], [`Error`], …), `ndarray` and `half`, and the backends
//! compiled in, and holds the **one registry** of backends ([`REGISTRY`]) that run-time selection
//! and the conformance suite both read.
//!
//! # Choosing a backend
//!
//! - At run time: [`backend`] by name, or [`auto`], which returns the best available backend
//!   and says why it chose it. Both give a `Box<dyn HostNormalize>`, on which the n-dimensional
//!   API ([`NormalizeNd`]) takes ndarray views of any shape.
//! - At compile time: use the backend type directly (`layernorm::cpu::CpuBackend`, …) to keep
//!   data on its device ([`Normalize`] works on the backend's own buffers).
//!
//! ```
//! use layernorm::*;
//! use layernorm::ndarray::{Array, Array1};
//!
//! let (backend, why) = auto()?;
//! println!("using {}: {why}", backend.name());
//! let x = Array::from_shape_fn((2, 3, 4), |(b, s, h)| (b + s * h) as f32); // [batch, seq, hidden]
//! let (gamma, beta) = (Array1::from_elem(4, 1.0f32), Array1::zeros(4));
//! let out = backend.forward_nd(Norm::layer_norm(), &x).gamma(&gamma).beta(&beta).run()?;
//! assert_eq!(out.y.shape(), &[2, 3, 4]);
//! let dy = Array::ones((2, 3, 4));
//! let grads = backend.backward_nd(Norm::layer_norm(), &x, &dy, out.stats()).gamma(&gamma).run()?;
//! assert!(grads.dgamma.is_some() && grads.dbeta.is_none());
//! # Ok::<(), layernorm::Error>(())
//! ```
//!
//! # Cargo features
//!
//! | feature | default | backend |
//! |---|---|---|
//! | `cpu` | yes | [`cpu::CpuBackend`]: rayon over rows, all four dtypes |
//! | `cuda` | no | `cuda::CudaBackend`: cudarc + NVRTC; needs an NVIDIA driver at run time only |
//! | `wgpu` | no | `wgpu::WgpuBackend`: WGSL shaders on any adapter wgpu finds |
//!
//! A backend whose feature is off is still listed by [`REGISTRY`], and reports
//! [`Error::Unavailable`] naming the feature.

pub use layernorm_core::*;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;

#[cfg(feature = "cpu")]
pub use layernorm_cpu as cpu;
#[cfg(feature = "cuda")]
pub use layernorm_cuda as cuda;
#[cfg(feature = "wgpu")]
pub use layernorm_wgpu as wgpu;

/// One registered backend: its name and how to create it.
#[derive(Clone, Copy, Debug)]
pub struct BackendEntry {
    /// Registry name, as accepted by [`backend`] and `cargo xtask conformance --backend`.
    pub name: &'static str,
    /// Creates the backend, or says why it cannot run here.
    pub create: fn() -> Result<Box<dyn HostNormalize>>,
}

impl BackendEntry {
    /// Creates the backend.
    pub fn create(&self) -> Result<Box<dyn HostNormalize>> {
        (self.create)()
    }
}

macro_rules! entry {
    ($name:literal, $feature:literal, $make:expr) => {
        BackendEntry {
            name: $name,
            create: || {
                #[cfg(feature = $feature)]
                {
                    let b: Box<dyn HostNormalize> = Box::new($make?);
                    Ok(b)
                }
                #[cfg(not(feature = $feature))]
                {
                    Err(Error::unavailable(
                        $name,
                        concat!(
                            "not compiled in (enable the `",
                            $feature,
                            "` feature of the layernorm crate)"
                        ),
                    ))
                }
            },
        }
    };
}

/// Every backend, in order of preference for [`auto`]. **Adding a backend is one line here**
/// (plus its Cargo feature).
pub const REGISTRY: &[BackendEntry] = &[
    entry!("cuda", "cuda", layernorm_cuda::CudaBackend::new()),
    entry!("wgpu", "wgpu", layernorm_wgpu::WgpuBackend::new()),
    entry!("cpu", "cpu", Ok::<_, Error>(layernorm_cpu::CpuBackend::new())),
];

/// The names in [`REGISTRY`], comma-separated.
pub fn backend_names() -> String {
    REGISTRY.iter().map(|e| e.name).collect::<Vec<_>>().join(", ")
}

/// Creates the backend registered under `name`.
pub fn backend(name: &str) -> Result<Box<dyn HostNormalize>> {
    REGISTRY
        .iter()
        .find(|e| e.name == name)
        .ok_or_else(|| Error::UnknownBackend { name: name.into(), known: backend_names() })?
        .create()
}

/// Picks the best available backend: the first in [`REGISTRY`] order that runs on a hardware
/// GPU, else the CPU backend, else the first that is available at all (a software GPU).
/// Returns it with a sentence saying why.
pub fn auto() -> Result<(Box<dyn HostNormalize>, String)> {
    let mut skipped = Vec::new();
    let mut fallback = None;
    for e in REGISTRY {
        match e.create() {
            Ok(b) => {
                let dev = b.device();
                if dev.kind == DeviceKind::Gpu {
                    return Ok((b, format!("{} runs on a GPU ({})", e.name, dev.name)));
                }
                skipped.push(format!("{}: {:?} device {}", e.name, dev.kind, dev.name));
                let rank = usize::from(dev.kind != DeviceKind::Cpu);
                if fallback.as_ref().is_none_or(|(r, _)| rank < *r) {
                    fallback = Some((rank, b));
                }
            }
            Err(err) => skipped.push(err.to_string()),
        }
    }
    match fallback {
        Some((_, b)) => {
            let why = format!("no hardware GPU backend ({})", skipped.join("; "));
            Ok((b, why))
        }
        None => Err(Error::unavailable("auto", skipped.join("; "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_are_unique() {
        let mut names: Vec<_> = REGISTRY.iter().map(|e| e.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), REGISTRY.len());
    }

    #[test]
    fn unknown_names_are_typed_errors() {
        let err = backend("tpu").err().expect("tpu is not a backend");
        assert_eq!(err.class(), "unknown-backend");
        assert!(err.to_string().contains("cpu"));
    }

    #[cfg(feature = "cpu")]
    #[test]
    fn auto_always_finds_a_backend_with_cpu_compiled_in() {
        let (b, why) = auto().unwrap();
        assert!(!why.is_empty());
        // The rule: the first backend on a hardware GPU, else the CPU. Which that is here
        // depends on the machine, so it is worked out from the registry itself.
        let gpu = REGISTRY
            .iter()
            .filter_map(|e| e.create().ok())
            .find(|b| b.device().kind == DeviceKind::Gpu)
            .map(|b| b.name().to_string());
        let want = gpu.unwrap_or_else(|| "cpu".to_string());
        assert_eq!(b.name(), want, "{why}");
    }
}
