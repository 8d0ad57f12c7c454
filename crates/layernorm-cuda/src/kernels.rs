//! The CUDA C source (`kernels/layernorm.cu`) and how NVRTC compiles it, per dtype and architecture.

use layernorm_core::DType;

/// The kernel source, one file for every dtype and strategy.
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

/// The translation unit NVRTC compiles for `dtype`: a `#define` line, then [`SOURCE`].
pub fn source_for(dtype: DType) -> Option<String> {
    dtype_code(dtype).map(|k| format!("#define LN_DTYPE {k}\n{SOURCE}"))
}

/// The module name NVRTC reports in diagnostics.
pub fn program_name(dtype: DType) -> String {
    format!("layernorm_{}.cu", dtype.name())
}

/// NVRTC options for a virtual architecture such as `compute_80`. Precise division and square
/// root stay on (NVRTC's defaults); no fast math, no flush-to-zero.
pub fn compile_options(dtype: DType, virtual_arch: &str) -> cudarc::nvrtc::CompileOptions {
    cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture={virtual_arch}"), "--std=c++17".into()],
        name: Some(program_name(dtype)),
        ..Default::default()
    }
}

/// Compiles the module of `dtype` for `virtual_arch` to PTX; `Err` carries NVRTC's log.
///
/// The caller must have checked that NVRTC is loadable ([`crate::nvrtc_available`]): cudarc
/// panics otherwise.
pub fn compile(dtype: DType, virtual_arch: &str) -> Result<cudarc::nvrtc::Ptx, String> {
    let src = source_for(dtype).ok_or_else(|| format!("no kernels for dtype {dtype}"))?;
    cudarc::nvrtc::compile_ptx_with_opts(src, compile_options(dtype, virtual_arch)).map_err(|e| {
        match e {
            cudarc::nvrtc::CompileError::CompileError { log, options, .. } => format!(
                "NVRTC failed for {} ({}) with options {options:?}:\n{}",
                dtype,
                virtual_arch,
                log.to_string_lossy()
            ),
            other => format!("NVRTC failed for {dtype} ({virtual_arch}): {other}"),
        }
    })
}
