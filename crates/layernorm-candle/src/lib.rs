//! LayerNorm and RMSNorm for [candle](https://github.com/huggingface/candle) that train: candle
//! custom ops whose forward **and backward** run layernorm's fused CPU kernels, and the
//! `candle_nn::Module`s built on them.
//!
//! candle-nn's fused `ops::layer_norm` and `ops::rms_norm` are applied with `apply_op*_no_bwd`,
//! so a `backward()` through them returns no gradient for anything upstream of the norm — no
//! error, just missing entries in the `GradStore` (candle issues #2168, #3011, #3752). Its only
//! differentiable path is the composed `layer_norm_slow`, about nine tensor ops, whose backward
//! measured 7–11× slower than this crate's inside candle's autograd, and about 100× slower than
//! the fused kernel alone (the README's table). This crate is the fused pair.
//!
//! # Use
//!
//! | candle | this crate |
//! |---|---|
//! | `candle_nn::layer_norm(size, eps, vb)` | [`layer_norm`]`(size, eps, vb)` → [`LayerNorm`] |
//! | `candle_nn::layer_norm_no_bias(size, eps, vb)` | [`layer_norm_no_bias`] |
//! | `candle_nn::rms_norm(size, eps, vb)` | [`rms_norm`]`(size, eps, vb)` → [`RmsNorm`] |
//! | `candle_nn::ops::layer_norm(x, w, b, eps)` | [`ops::layer_norm`]`(x, w, b, eps)` |
//! | `candle_nn::ops::rms_norm(x, w, eps)` | [`ops::rms_norm`]`(x, w, eps)` |
//! | `h = (x + r)?` then `candle_nn::ops::layer_norm(&h, w, b, eps)` | [`ops::layer_norm_residual`]`(x, r, w, b, eps)` → `(y, h)` |
//! | `h = (x + r)?` then `candle_nn::ops::rms_norm(&h, w, eps)` | [`ops::rms_norm_residual`]`(x, r, w, eps)` → `(y, h)` |
//! | `h = (x + r)?` then `norm.forward(&h)` | [`LayerNorm::forward_residual`] / [`RmsNorm::forward_residual`]`(x, r)` → `(y, h)` |
//!
//! The modules read the same weight names as candle's (`weight`, or `gamma`; `bias`, or `beta`),
//! so swapping one into a candle-transformers model is a change of import. `From` converts an
//! existing `candle_nn::LayerNorm` / `RmsNorm`.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//!
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! let norm = layernorm_candle::layer_norm(4, 1e-5, vb.pp("ln"))?;
//! let x = Tensor::new(&[[1f32, 2., 3., 4.], [2., 0., 2., 0.]], &dev)?;
//! let loss = norm.forward(&x)?.sqr()?.sum_all()?;
//! let grads = loss.backward()?;
//! // Every parameter of the norm gets its gradient (with candle-nn's fused op, none does).
//! for var in varmap.all_vars() {
//!     assert!(grads.get(&var).is_some());
//! }
//! # Ok::<(), candle_core::Error>(())
//! ```
//!
//! # What it computes
//!
//! Normalization over the last dimension (`docs/math.md` (1)–(13)): LayerNorm
//! y = (x − μ)·rstd·γ + β, RMSNorm y = x·r·γ (+ β when a `candle_nn::LayerNormConfig` asks for
//! one). f32, f64, f16 and bf16 (16-bit data is computed in f32 and rounded once), any number of
//! leading dimensions, contiguous or not (a strided or transposed view is copied to row-major
//! order first, in the forward and again in the backward). γ and β must have x's dtype and shape
//! `[N]`. ε is an `f64` (an `f32` converts), applied in the accumulation type.
//!
//! The gradients are dx, dγ and dβ of `docs/math.md`'s backward, from one fused pass over x and
//! dy (plus the per-column sums), each in the tensor's own dtype. dγ and dβ are skipped when γ
//! or β does not track gradients (a frozen norm); dγ/dβ are bitwise reproducible run to run.
//!
//! The residual variants are a pre-norm block's add and norm in one pass (`docs/math.md`
//! (14)–(15)): h = x + residual, rounded once to the dtype (the bits of candle's own `x + r`),
//! and y = norm(h); both are returned. Their backward is one fused pass too: gradients arriving
//! on y (dy) and on h (dh, the residual stream's) give dx = norm's backward of dy, plus dh —
//! the gradient of x and of the residual alike — and dγ, dβ. How one candle op yields two
//! differentiable outputs is described at [`ops::normalize_residual`].
//!
//! # Design: what the backward reads
//!
//! The forward computes each row's mean (LayerNorm) and rstd anyway; it **keeps them in the op
//! instance** (`rows` values each, in f32, or f64 for f64 data), and candle's graph, which holds
//! the op until the graph is dropped, hands them back to the backward. The backward then reads
//! x, dy and γ once each, as layernorm's backward from x does, instead of recomputing two
//! reductions per row. Costs and consequences:
//!
//! - 8 bytes a row (f32 statistics; 16 for f64) live as long as the graph — 32 KiB for a
//!   4096-row batch. Where nothing tracks gradients candle drops the op at once, and them with
//!   it.
//! - The backward reads the x the graph holds. A `Var` changed in place (`Var::set`) between
//!   forward and backward no longer matches its statistics; candle's own ops (a matmul's
//!   backward reads its operands too) have the same rule: do not mutate before `backward`.
//! - The gradients are plain tensors, not recorded in the graph: like candle's own backward
//!   (which detaches), no second-order derivatives.
//! - The residual variants' backward reads h from the op's own output (the \[y; h\] buffer the
//!   graph holds anyway), so it keeps nothing more than the plain ops.
//!
//! # Devices
//!
//! The kernels run on the CPU (`layernorm-cpu`). A tensor on any other device is an `Err`
//! naming the argument and the device, before any work — never a result without a backward.
//! The crate builds candle without its `cuda` feature (which compiles candle's CUDA kernels with
//! `nvcc` and links the CUDA libraries at build time); on a GPU, candle's composed
//! `candle_nn::ops::layer_norm_slow` remains the differentiable path.
//!
//! # Errors
//!
//! Bad input — γ of the wrong shape or dtype, an integer x, a zero-sized last dimension, a bad
//! ε, a non-CPU tensor — is a `candle_core::Error` whose message starts with
//! `layernorm-candle <op>:` and carries layernorm's own description (for example "shape mismatch
//! for `gamma`: expected shape \[768\], got \[767\]"). Nothing panics on user input.

pub mod ops;

mod module;

pub use layernorm_core::NormKind;
pub use module::{LayerNorm, RmsNorm, layer_norm, layer_norm_no_bias, rms_norm};

/// The README's examples, run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
