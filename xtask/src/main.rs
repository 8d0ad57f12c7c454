//! `cargo xtask <command>`: the project's automation, as plain Rust.
//!
//! - `conformance [--backend NAME]… [--require NAME]…` — run the cross-backend suite.
//! - `bench [--bench cpu|wgpu|cuda] [--paired] [--avx2] [--rounds K] [--json PATH] [FILTER]` — quick
//!   criterion run (or the CPU's paired measurement), GB/s table.
//! - `cuda-check [--arch sm_XX]… [--require-ptxas]` — NVRTC + ptxas check of every CUDA kernel.
//! - `tidy` — check the codebase itself (runs as a test).

mod bench;
mod conformance;
mod cuda_check;
#[cfg(test)]
mod tidy;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r),
        None => ("help", &[][..]),
    };
    let result = match cmd {
        "conformance" => conformance::run(rest),
        "bench" => bench::run(rest),
        "cuda-check" => cuda_check::run(rest),
        "help" | "--help" | "-h" => {
            println!("{}", HELP);
            Ok(true)
        }
        other => Err(format!("unknown command `{other}`\n\n{HELP}")),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
    }
}

const HELP: &str = "\
usage: cargo xtask <command>

commands:
  conformance [--backend NAME]... [--require NAME]...
      Run every registered backend (or only those named) on every case in every dtype,
      forward and backward, against the f64 reference. Unavailable backends are listed as
      skipped; --require makes an unavailable backend an error. Exits non-zero on any failure.
  cuda-check [--arch sm_XX]... [--require-ptxas]
      Compile every CUDA kernel x dtype x strategy with NVRTC to the PTX those architectures
      load (sm_80 and sm_90 by default: one compute_80 PTX), assemble it for each with ptxas -v and print registers, shared memory, stack and spills per kernel.
      Fails on a compile error, any spill or stack use. Needs NVRTC (and ptxas) installed.
  bench [--bench cpu|wgpu|cuda] [--paired] [--avx2] [--rounds K] [--json PATH] [FILTER]
      Run a criterion bench with short measurement times and print, per shape, pass, dtype and
      thread count, LayerNorm's GB/s and its fraction of a same-bytes baseline from the same run.
      With --rounds K the bench runs K times; each round's fraction is against that round's own
      baseline, and the table gives the median (and every round's fraction).
      With --paired (CPU) LayerNorm and its baselines are instead timed alternately, ~10 ms
      each, in 21 pairs (LAYERNORM_BENCH_PAIRS); the table gives the median of the pairs'
      fractions and their middle half: the estimate to trust on a machine whose speed drifts.
      With --avx2 (CPU) the kernels and baselines run at AVX2 at most (feature max-avx2), so
      the AVX2 path is measured on an AVX-512 machine; the table names the instruction set.";
