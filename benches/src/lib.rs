//! Shared pieces of the benchmarks: the shapes, input data, and the same-bytes baselines.

/// The shapes every backend is benchmarked on (rows, N): from "fits in L3" to 64 MiB.
pub const SHAPES: [(usize, usize); 6] =
    [(4096, 768), (4096, 1024), (1024, 4096), (256, 16384), (65536, 128), (16384, 1024)];

/// The kinds every CPU bench runs, as their problems over `rows × n` in `dtype` are set up:
/// LayerNorm with γ and β (PyTorch's `nn.LayerNorm`), RMSNorm with γ and no β (the Llama layer).
pub fn problem(
    kind: layernorm_core::NormKind,
    rows: usize,
    n: usize,
    dtype: layernorm_core::DType,
) -> layernorm_core::NormSpec {
    match kind {
        layernorm_core::NormKind::RmsNorm => layernorm_core::NormSpec::rms_norm(rows, n, dtype),
        _ => layernorm_core::NormSpec::layer_norm(rows, n, dtype),
    }
}

/// A bench group's pass for `kind`: `fwd`/`bwd` for LayerNorm, `rms-fwd`/`rms-bwd` for RMSNorm
/// (`cargo xtask bench` reads the kind back from the prefix).
pub fn pass(kind: layernorm_core::NormKind, pass: &str) -> String {
    match kind {
        layernorm_core::NormKind::RmsNorm => format!("rms-{pass}"),
        _ => pass.to_string(),
    }
}

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
        bytewise(y, x, None, |y, x, _| xor_with(y, x, k));
    }

    /// Backward baseline: read 2N, write N, no math (a bytewise XOR of two inputs).
    pub fn combine<T: CpuElement>(x: &[T], z: &[T], out: &mut [T]) {
        bytewise(out, x, Some(z), |o, x, z| xor_into(o, x, z.unwrap_or_default()));
    }

    /// The forward's third baseline: read N, write N with non-temporal (streaming) stores, as
    /// the kernels write large outputs (`layernorm_cpu::Stores`) and as glibc's memcpy copies
    /// buffers larger than it thinks the cache is. The parallel `copy` above is a memcpy per
    /// 128 KiB chunk, which never streams; without this bar, a kernel streaming its output would
    /// be measured against a copy that reads every output line in first. (x86-64; elsewhere the
    /// copy loop, as the kernels stream only on x86-64.)
    pub fn copy_stream<T: CpuElement>(x: &[T], y: &mut [T]) {
        bytewise(y, x, None, stream::write);
    }

    /// The backward's second baseline: [`combine`] with non-temporal stores (see
    /// [`copy_stream`]).
    pub fn combine_stream<T: CpuElement>(x: &[T], z: &[T], out: &mut [T]) {
        bytewise(out, x, z.into(), stream::write);
    }

    /// `f(out, x, z)` over matching 128 KiB byte chunks of the three, in parallel on the current
    /// pool (`z` only for the backward's baselines).
    fn bytewise<T: CpuElement>(
        out: &mut [T],
        x: &[T],
        z: Option<&[T]>,
        f: impl Fn(&mut [u8], &[u8], Option<&[u8]>) + Sync,
    ) {
        let (out, x): (&mut [u8], &[u8]) = (bytemuck::cast_slice_mut(out), bytemuck::cast_slice(x));
        let c = CHUNK * 4;
        match z {
            None => out.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(|(o, x)| f(o, x, None)),
            Some(z) => out
                .par_chunks_mut(c)
                .zip(x.par_chunks(c).zip(bytemuck::cast_slice(z).par_chunks(c)))
                .for_each(|(o, (x, z))| f(o, x, Some(z))),
        }
    }

    /// Streaming-store loops: `out = x` or `out = x ^ z`, the aligned middle with 32-byte
    /// non-temporal stores (16-byte without AVX), the ends with ordinary ones.
    mod stream {
        /// `out = x`, or `out = x ^ z` with `z`, then a store fence.
        pub(super) fn write(out: &mut [u8], x: &[u8], z: Option<&[u8]>) {
            #[cfg(target_arch = "x86_64")]
            {
                // SAFETY: AVX is checked here at run time; SSE is part of x86-64.
                if std::arch::is_x86_feature_detected!("avx") {
                    unsafe { x86::write_avx(out, x, z) }
                } else {
                    unsafe { x86::write_sse(out, x, z) }
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            plain(out, x, z);
        }

        /// The ordinary-store loops: a streamed span's ends (the whole span off x86-64).
        fn plain(out: &mut [u8], x: &[u8], z: Option<&[u8]>) {
            match z {
                None => super::xor_with(out, x, 0),
                Some(z) => super::xor_into(out, x, z),
            }
        }

        #[cfg(target_arch = "x86_64")]
        mod x86 {
            use super::plain;
            use core::arch::x86_64::*;

            /// One loop per vector width: unaligned loads, aligned non-temporal stores.
            macro_rules! streamer {
                ($name:ident, $feature:literal, $w:literal, $load:ident, $xor:ident, $store:ident) => {
                    /// # Safety
                    /// The CPU must have the named feature.
                    #[target_feature(enable = $feature)]
                    pub(super) unsafe fn $name(out: &mut [u8], x: &[u8], z: Option<&[u8]>) {
                        let n = out.len().min(x.len()).min(z.map_or(usize::MAX, |z| z.len()));
                        let head = out.as_ptr().align_offset($w).min(n);
                        let body = (n - head) / $w * $w;
                        let (o, x) = (&mut out[..n], &x[..n]);
                        plain(&mut o[..head], &x[..head], z.map(|z| &z[..head]));
                        let mut i = head;
                        while i < head + body {
                            // SAFETY: i + $w <= n for every slice; `o + i` is $w-aligned.
                            unsafe {
                                let mut v = $load(x.as_ptr().add(i).cast());
                                if let Some(z) = z {
                                    v = $xor(v, $load(z.as_ptr().add(i).cast()));
                                }
                                $store(o.as_mut_ptr().add(i).cast(), v);
                            }
                            i += $w;
                        }
                        let t = head + body;
                        plain(&mut o[t..], &x[t..], z.map(|z| &z[t..n]));
                        _mm_sfence();
                    }
                };
            }
            streamer!(write_avx, "avx", 32, _mm256_loadu_ps, _mm256_xor_ps, _mm256_stream_ps);
            streamer!(write_sse, "sse2", 16, _mm_loadu_ps, _mm_xor_ps, _mm_stream_ps);
        }
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

#[cfg(test)]
mod tests {
    use super::cpu::{combine, combine_stream, copy, copy_loop, copy_stream};

    #[test]
    fn the_baselines_move_the_bytes_they_claim() {
        // Every phase against a 64-byte line and lengths around the vector and chunk sizes, so
        // the streamed loops' aligned middles and ordinary ends are all exercised.
        for len in [0usize, 1, 7, 8, 9, 63, 64, 65, 1000, super::cpu::CHUNK + 13] {
            for phase in 0..16 {
                let x: Vec<f32> = super::data(len + phase, 5)[phase..].to_vec();
                let z: Vec<f32> = super::data(len + phase, 6)[phase..].to_vec();
                let mut buf = vec![0f32; len + phase];
                let out = &mut buf[phase..];
                let xor: Vec<u32> =
                    x.iter().zip(&z).map(|(a, b)| a.to_bits() ^ b.to_bits()).collect();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                for (name, f) in [
                    ("copy", copy::<f32> as fn(&[f32], &mut [f32])),
                    ("copy_loop", copy_loop::<f32>),
                    ("copy_stream", copy_stream::<f32>),
                ] {
                    out.fill(0.5);
                    f(&x, out);
                    assert_eq!(bits(out), bits(&x), "{name}, len {len}, phase {phase}");
                }
                for (name, f) in [
                    ("combine", combine::<f32> as fn(&[f32], &[f32], &mut [f32])),
                    ("combine_stream", combine_stream::<f32>),
                ] {
                    out.fill(0.5);
                    f(&x, &z, out);
                    assert_eq!(bits(out), xor, "{name}, len {len}, phase {phase}");
                }
            }
        }
    }
}
