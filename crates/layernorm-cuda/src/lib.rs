//! The CUDA backend of layernorm: the normalization family (LayerNorm and RMSNorm, with a γ
//! offset, a fused residual add, and a backward from x or from y with the residual stream's dh)
//! forward and backward on NVIDIA GPUs through cudarc, with CUDA C kernels
//! (`kernels/layernorm.cu`) compiled at run time by NVRTC.
//!
//! # Should I use this?
//!
//! Use it through the `layernorm` facade (feature `cuda`) when your tensors live on an NVIDIA GPU.
//! Nothing CUDA is needed to *build* it (cudarc loads the driver and NVRTC at run time); to *run*
//! it you need the driver (`libcuda.so`), NVRTC (`libnvrtc.so.12`) and a device. When any of these
//! is missing, [`CudaBackend::new`] returns [`Error::Unavailable`] naming it: never a panic.
//!
//! ```
//! use layernorm_cuda::CudaBackend;
//! match CudaBackend::new() {
//!     Ok(backend) => println!("running on {backend:?}"),
//!     Err(e) => println!("no CUDA here: {e}"),
//! }
//! ```
//!
//! The kernels compute in f32 for f32, f16 and bf16 data and in f64 for f64 data; an ε below
//! `f32::MIN_POSITIVE` is therefore [`Error::Unsupported`] for the first three (the ε rule,
//! [`plan::eps_args`]).
//!
//! # Design
//!
//! - [`plan`]: plain-Rust choice of kernel (by kind and direction) and strategy (sub-warp per row
//!   in registers, block per row in shared memory, block per row re-reading global memory), grid,
//!   block, shared memory, and every launch's argument list.
//! - [`kernels`]: the source and NVRTC options; one module per dtype and kind, cached per backend
//!   (device).
//! - [`check`]: NVRTC + `ptxas -v` over every kernel, for CI machines without a GPU.
//!
//! Without a GPU, `tests/emulated.rs` still runs the real kernels on the CPU (a C++ harness with
//! one fiber per CUDA thread) through the exact launches of [`plan::forward_steps`] and
//! [`plan::backward_steps`]; `tests/gpu.rs` is the on-device suite. See `docs/backends/cuda.md`
//! for the numerics, what each test proves, and how to run them on a GPU machine.

mod backend;
pub mod check;
pub mod kernels;
pub mod plan;

pub use backend::{CudaBackend, CudaBuffer};
pub use layernorm_core::{Error, Result};

/// Registry name of this backend.
pub const NAME: &str = "cuda";

/// `Ok` if the CUDA driver library can be loaded, else why not.
pub fn driver_available() -> std::result::Result<(), String> {
    // SAFETY: only tries to dlopen the driver library by its usual names and closes it again.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err("the CUDA driver library (libcuda.so) could not be loaded: no NVIDIA driver is \
             installed or it is not on the library path"
            .into())
    }
}

/// `Ok` if NVRTC can be loaded, else why not and how to install it.
pub fn nvrtc_available() -> std::result::Result<(), String> {
    // SAFETY: only tries to dlopen NVRTC by its usual names and closes it again.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err("NVRTC (libnvrtc.so.12) could not be loaded: install the CUDA toolkit or \
             `pip install nvidia-cuda-nvrtc-cu12==12.9.86` and add \
             <site-packages>/nvidia/cuda_nvrtc/lib to LD_LIBRARY_PATH"
            .into())
    }
}
