//! The CUDA C source (`kernels/layernorm.cu`) and how NVRTC compiles it, per dtype, kind and
//! architecture.

use layernorm_core::{DType, NormKind};

/// The kernel source, one file for every dtype, kind, variant and strategy.
pub const SOURCE: &str = include_str!("../kernels/layernorm.cu");

/// The `LN_DTYPE` value `kernels/layernorm.cu` expects for a dtype; `None` for a dtype the
/// kernels do not implement.
pub const fn dtype_code(dtype: DType) -> Option<u32> {
    match dtype {
        DType::F16 => Some(0),
        DType::BF16 => Some(1),
        DType::F32 => Some(2),
        DType::F64 => Some(3),
        _ => None,
    }
}

/// The `LN_KIND` value `kernels/layernorm.cu` expects for a kind; `None` for a kind the kernels
/// do not implement.
pub const fn kind_code(kind: NormKind) -> Option<u32> {
    match kind {
        NormKind::LayerNorm => Some(0),
        NormKind::RmsNorm => Some(1),
        _ => None,
    }
}

/// The prefix of a kind's entry points (`ln`, `rms`).
pub const fn kind_prefix(kind: NormKind) -> &'static str {
    match kind {
        NormKind::RmsNorm => "rms",
        _ => "ln",
    }
}

/// The translation unit NVRTC compiles for `dtype` and `kind` (one module each): two `#define`
/// lines, then [`SOURCE`].
pub fn source_for(dtype: DType, kind: NormKind) -> Option<String> {
    let (d, k) = (dtype_code(dtype)?, kind_code(kind)?);
    Some(format!("#define LN_DTYPE {d}\n#define LN_KIND {k}\n{SOURCE}"))
}

/// The module name NVRTC reports in diagnostics.
pub fn program_name(dtype: DType, kind: NormKind) -> String {
    format!("{}_{}.cu", kind.name(), dtype.name())
}

/// The virtual architecture whose PTX a device of compute capability `(major, minor)` loads:
/// `compute_80` from Ampere on, the device's own below. The kernels use nothing newer than
/// sm_80 (no `__CUDA_ARCH__` branches; for `compute_90` NVRTC 12.9 emits the same PTX bar its
/// `.target` line); the driver compiles that PTX for the device's own architecture when it
/// loads the module. One PTX per module is also what `check::check_all` compiles and then
/// assembles with ptxas for each architecture it checks.
pub fn ptx_arch((major, minor): (u32, u32)) -> String {
    if (major, minor) >= (8, 0) { "compute_80".into() } else { format!("compute_{major}{minor}") }
}

/// NVRTC options for a virtual architecture such as `compute_80`. Precise division and square
/// root stay on (NVRTC's defaults); no fast math, no flush-to-zero.
pub fn compile_options(
    dtype: DType,
    kind: NormKind,
    virtual_arch: &str,
) -> cudarc::nvrtc::CompileOptions {
    cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture={virtual_arch}"), "--std=c++17".into()],
        name: Some(program_name(dtype, kind)),
        ..Default::default()
    }
}

/// Compiles the module of `dtype` and `kind` for `virtual_arch` to PTX; `Err` carries NVRTC's
/// log.
///
/// The caller must have checked that NVRTC is loadable ([`crate::nvrtc_available`]): cudarc
/// panics otherwise.
pub fn compile(
    dtype: DType,
    kind: NormKind,
    virtual_arch: &str,
) -> Result<cudarc::nvrtc::Ptx, String> {
    let src = source_for(dtype, kind).ok_or_else(|| format!("no kernels for {kind} in {dtype}"))?;
    let opts = compile_options(dtype, kind, virtual_arch);
    cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, options, .. } => format!(
            "NVRTC failed for {kind} {dtype} ({virtual_arch}) with options {options:?}:\n{}",
            log.to_string_lossy()
        ),
        other => format!("NVRTC failed for {kind} {dtype} ({virtual_arch}): {other}"),
    })
}
