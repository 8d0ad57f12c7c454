//! The instruction sets the kernels are compiled for, and the one a call runs.
//!
//! Every kernel is compiled for AVX-512 (F, BW, VL, DQ, with AVX2, FMA and F16C), for AVX2 with
//! FMA and F16C, for NEON and for a portable baseline; the best one the machine has is chosen at
//! run time. The hand-written SIMD (`reduce/`) goes through [`dispatch`], the loops the compiler
//! vectorizes through [`multiversioned!`]; both choose the same way.
//!
//! The cargo feature `max-avx2` leaves AVX-512 out of both, so that the AVX2 kernels can be
//! measured on an AVX-512 machine (`cargo xtask bench --avx2`). Every instruction set gives the
//! same bits (each is tested), so the feature changes speed only; it exists for measurement.

/// Compiles each item once per instruction set (see the module docs) and dispatches at run time.
macro_rules! multiversioned {
    ($($item:item)*) => {$(
        #[cfg_attr(not(feature = "max-avx2"), multiversion::multiversion(targets(
            "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma+f16c",
            "x86_64+avx2+fma+f16c",
            "aarch64+neon"
        )))]
        #[cfg_attr(feature = "max-avx2", multiversion::multiversion(targets(
            "x86_64+avx2+fma+f16c",
            "aarch64+neon"
        )))]
        $item
    )*};
}
pub(crate) use multiversioned;

/// Runs `op` with the best SIMD level of `pulp` the machine has (AVX2 at most with `max-avx2`).
#[inline(always)]
pub(crate) fn dispatch<Op: pulp::WithSimd>(op: Op) -> Op::Output {
    #[cfg(all(target_arch = "x86_64", feature = "max-avx2"))]
    if let Some(simd) = pulp::x86::V3::try_new() {
        return pulp::Simd::vectorize(simd, op);
    }
    // Without AVX2 there is no AVX-512 either: `Arch` picks the same as above.
    pulp::Arch::new().dispatch(op)
}

/// The instruction set the kernels run on this machine: `"avx512"`, `"avx2"`, `"neon"` or
/// `"portable"` (benchmarks print it beside their figures).
pub fn instruction_set() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        let has = |f: &[bool]| f.iter().all(|&b| b);
        use std::arch::is_x86_feature_detected as d;
        let avx2 = has(&[d!("avx2"), d!("fma"), d!("f16c")]);
        let avx512 = has(&[d!("avx512f"), d!("avx512bw"), d!("avx512vl"), d!("avx512dq")]) && avx2;
        if avx512 && !cfg!(feature = "max-avx2") {
            return "avx512";
        }
        if avx2 {
            return "avx2";
        }
    }
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("neon") {
        return "neon";
    }
    "portable"
}

#[cfg(feature = "unit-tests")]
#[doc(hidden)]
pub mod tests {
    use super::*;

    /// The vector width [`dispatch`] runs at is the one [`instruction_set`] names.
    pub fn the_dispatch_runs_the_instruction_set_it_reports() {
        struct Width;
        impl pulp::WithSimd for Width {
            type Output = usize;
            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, _: S) -> usize {
                size_of::<S::f32s>()
            }
        }
        let bytes = dispatch(Width);
        match instruction_set() {
            "avx512" => assert_eq!(bytes, 64),
            "avx2" => assert_eq!(bytes, 32),
            name => assert!(bytes <= 16, "{name}: {bytes}-byte vectors"),
        }
        if cfg!(feature = "max-avx2") {
            assert_ne!(instruction_set(), "avx512");
        }
    }
}
