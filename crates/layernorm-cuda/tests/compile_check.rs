//! Every kernel × dtype × kind × strategy compiles with NVRTC to the PTX that sm_80 and sm_90
//! devices load (`compute_80`), and (when ptxas is found) assembles for both with no register
//! spill and no stack frame. Needs NVRTC, not a GPU.
//!
//! Without NVRTC the test says why and passes, unless `LAYERNORM_REQUIRE_NVRTC` is set (CI sets
//! it, and then ptxas is required too).
//!
//! A passing check with ptxas leaves a stamp under the target directory keyed by everything its
//! outcome depends on (the kernel source, the checker and planner, the NVRTC version, the ptxas
//! binary, the architectures); a rerun with the same key prints the stamped report instead of
//! compiling again. `cargo xtask cuda-check` always compiles.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;

use layernorm_core::NormKind;
use layernorm_cuda::check::{self, CheckError};
use layernorm_cuda::plan;

fn required() -> bool {
    std::env::var_os("LAYERNORM_REQUIRE_NVRTC").is_some()
}

/// Where a passing check with these inputs is stamped; `None` without NVRTC or ptxas.
fn stamp() -> Option<PathBuf> {
    layernorm_cuda::nvrtc_available().ok()?;
    let ptxas = check::find_ptxas()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loadable (checked above); nvrtcVersion only writes the two integers.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return None;
    }
    let mut h = DefaultHasher::new();
    layernorm_cuda::kernels::SOURCE.hash(&mut h);
    for src in [
        include_str!("../src/check.rs"),
        include_str!("../src/plan.rs"),
        include_str!("../src/kernels.rs"),
        include_str!("compile_check.rs"),
    ] {
        src.hash(&mut h);
    }
    (major, minor, check::DEFAULT_ARCHS).hash(&mut h);
    std::fs::read(&ptxas).ok()?.hash(&mut h);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda-check");
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir.join(format!("passed-{:016x}.txt", h.finish())))
}

#[test]
fn every_kernel_compiles_without_spills() {
    let stamp = stamp();
    if let Some(text) = stamp.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        println!(
            "{text}\n(this exact check passed before: stamped in {})",
            stamp.unwrap().display()
        );
        return;
    }
    match check::check_all(&check::DEFAULT_ARCHS) {
        Ok(report) => {
            println!("{report}");
            // One PTX per module serves both architectures.
            assert_eq!(report.compiled.len(), 8, "4 dtypes × 2 kinds");
            assert!(report.compiled.iter().all(|c| c.arch == "compute_80"));
            if report.ptxas.is_none() {
                assert!(!required(), "LAYERNORM_REQUIRE_NVRTC is set but ptxas was not found");
                println!("ptxas not found: skipped the register/spill check");
            } else {
                // Every entry point of every module, for both architectures.
                let expected: usize = layernorm_core::DType::ALL
                    .iter()
                    .flat_map(|&d| NormKind::ALL.map(|k| plan::kernel_names(d, k).len()))
                    .sum::<usize>()
                    * check::DEFAULT_ARCHS.len();
                assert_eq!(report.kernels.len(), expected);
                assert!(report.compiled.iter().all(|c| c.assembled_for == check::DEFAULT_ARCHS));
                // RMSNorm and every variant entry point is among them, for both architectures.
                for name in ["rms_fwd_warp_v_i24", "rms_bwdy_block_s_glob", "ln_bwdy_gb_partial"] {
                    let n = report.kernels.iter().filter(|k| k.kernel == name).count();
                    assert_eq!(n, 2 * 4 - usize::from(name.contains("i24")) * 2, "{name}");
                }
                assert!(report.kernels.iter().all(|k| k.is_clean()));
                if let Some(path) = stamp {
                    std::fs::write(path, report.to_string()).expect("writing the stamp");
                }
            }
        }
        Err(CheckError::NvrtcMissing(why)) => {
            assert!(!required(), "LAYERNORM_REQUIRE_NVRTC is set but NVRTC is missing: {why}");
            println!("skipping the NVRTC compile check: {why}");
        }
        Err(e) => panic!("{e}"),
    }
}
