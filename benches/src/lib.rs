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

/// The CPU baselines: the same bytes as a LayerNorm call, moved with no math, on the current
/// rayon pool (call them inside `pool.install`).
pub mod cpu {
    use layernorm_cpu::CpuElement;
    use multiversion::multiversion;
    use rayon::prelude::*;

    /// A benchmark's inputs for `rows` rows of `n`, in `T`: x, dy, γ and β (the same data in
    /// every CPU bench, so that their numbers compare).
    pub struct Inputs<T> {
        /// The input, `rows · n`.
        pub x: Vec<T>,
        /// The output gradient, `rows · n`.
        pub dy: Vec<T>,
        /// γ, `n`.
        pub gamma: Vec<T>,
        /// β, `n`.
        pub beta: Vec<T>,
    }

    impl<T: CpuElement> Inputs<T> {
        /// The inputs of a `rows × n` problem, from [`crate::data`] with fixed seeds.
        pub fn new(rows: usize, n: usize) -> Inputs<T> {
            let conv = |v: Vec<f32>| v.into_iter().map(|f| T::from_f64(f as f64)).collect();
            Inputs {
                x: conv(crate::data(rows * n, 1)),
                dy: conv(crate::data(rows * n, 2)),
                gamma: conv(crate::data(n, 3)),
                beta: conv(crate::data(n, 4)),
            }
        }
    }

    /// Elements per parallel chunk of the baselines (the backend's tasks are of the same order).
    pub const CHUNK: usize = 1 << 15;

    /// Forward baseline: read N, write N, no math (a parallel memcpy).
    pub fn copy<T: CpuElement>(x: &[T], y: &mut [T]) {
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| y.copy_from_slice(x));
    }

    /// The forward's other baseline: read N, write N through a vectorized loop that is not memcpy
    /// (each byte XORed with an opaque zero, as cheap as a·x + b). The "copy" is the
    /// faster of the two; it also keeps one memcpy that runs slow in a given run (on these VMs
    /// `rep movsb` sometimes runs at a tenth of its speed for minutes, a function of where the two
    /// buffers lie) from inflating the fractions.
    pub fn copy_loop<T: CpuElement>(x: &[T], y: &mut [T]) {
        let k = std::hint::black_box(0u8);
        let (x, y): (&[u8], &mut [u8]) = (bytemuck::cast_slice(x), bytemuck::cast_slice_mut(y));
        let c = CHUNK * 4;
        y.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(|(y, x)| xor_with(y, x, k));
    }

    /// Backward baseline: read 2N, write N, no math (a bytewise XOR of two inputs).
    pub fn combine<T: CpuElement>(x: &[T], z: &[T], out: &mut [T]) {
        let (x, z): (&[u8], &[u8]) = (bytemuck::cast_slice(x), bytemuck::cast_slice(z));
        let out: &mut [u8] = bytemuck::cast_slice_mut(out);
        let c = CHUNK * 4;
        out.par_chunks_mut(c)
            .zip(x.par_chunks(c).zip(z.par_chunks(c)))
            .for_each(|(o, (x, z))| xor_into(o, x, z));
    }

    // The baselines' loops are compiled for the widest vectors the machine has, as the kernels
    // are (`multiversion`, dispatched at run time): built for the default x86-64 target they
    // were 16-byte SSE loops, a bar the kernels' 32- and 64-byte vectors did not face.

    /// `y = x ^ k`, bytewise.
    #[multiversion(targets(
        "x86_64+avx512f+avx512bw+avx512vl+avx2",
        "x86_64+avx2",
        "aarch64+neon"
    ))]
    fn xor_with(y: &mut [u8], x: &[u8], k: u8) {
        for (o, &i) in y.iter_mut().zip(x) {
            *o = i ^ k;
        }
    }

    /// `out = x ^ z`, bytewise.
    #[multiversion(targets(
        "x86_64+avx512f+avx512bw+avx512vl+avx2",
        "x86_64+avx2",
        "aarch64+neon"
    ))]
    fn xor_into(out: &mut [u8], x: &[u8], z: &[u8]) {
        for ((o, &x), &z) in out.iter_mut().zip(x).zip(z) {
            *o = x ^ z;
        }
    }
}
