//! `cargo xtask cuda-check`: compile every CUDA kernel × dtype × kind × strategy with NVRTC to the
//! PTX the target architectures load, assemble it for each with `ptxas -v`, and print registers, shared
//! memory, stack and spills per kernel. Fails on any compile error, spill or stack use, and — with
//! `--require-ptxas` — when ptxas is not found.

use layernorm::cuda::check::{DEFAULT_ARCHS, check_all};

/// Runs the check. `Ok(false)` when it failed.
pub fn run(args: &[String]) -> Result<bool, String> {
    let mut require_ptxas = false;
    let mut archs: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--require-ptxas" => require_ptxas = true,
            "--arch" => archs.push(it.next().ok_or("--arch needs a value (e.g. sm_80)")?.clone()),
            other => return Err(format!("unknown flag `{other}`")),
        }
    }
    let archs: Vec<&str> = if archs.is_empty() {
        DEFAULT_ARCHS.to_vec()
    } else {
        archs.iter().map(String::as_str).collect()
    };
    match check_all(&archs) {
        Ok(report) => {
            print!("{report}");
            if require_ptxas && report.ptxas.is_none() {
                println!("cuda-check: FAILED (ptxas required but not found)");
                return Ok(false);
            }
            println!("cuda-check: OK");
            Ok(true)
        }
        Err(e) => {
            println!("{e}\ncuda-check: FAILED");
            Ok(false)
        }
    }
}
