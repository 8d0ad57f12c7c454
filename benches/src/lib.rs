//! Shared pieces of the benchmarks: the shapes, input data, and the same-bytes baselines.

/// The shapes every backend is benchmarked on (rows, N): from "fits in L3" to 64 MiB.
pub const SHAPES: [(usize, usize); 6] =
    [(4096, 768), (4096, 1024), (1024, 4096), (256, 16384), (65536, 128), (16384, 1024)];

/// Deterministic, cheap, normal-ish data (no RNG needed to benchmark).
pub fn data(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * 3.0
        })
        .collect()
}

/// Criterion's settings from the environment: `LAYERNORM_BENCH_QUICK=1` (set by
/// `cargo xtask bench`) gives short warm-up and measurement times.
pub fn quick() -> bool {
    std::env::var_os("LAYERNORM_BENCH_QUICK").is_some()
}
