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
        /// The inputs of a `rows × n` problem, from [`crate::data`] with fixed seeds. With
        /// `LAYERNORM_BENCH_OUTLIER=v`, column 5 of every row of x holds v: an outlier channel
        /// among a row's first 32 values, as transformer activations have, which sends every
        /// LayerNorm row of the forward down its exact variance pass (see `docs/numerics.md`).
        pub fn new(rows: usize, n: usize) -> Inputs<T> {
            let conv = |v: Vec<f32>| v.into_iter().map(|f| T::from_f64(f as f64)).collect();
            let mut x = crate::data(rows * n, 1);
            let outlier =
                std::env::var("LAYERNORM_BENCH_OUTLIER").ok().and_then(|v| v.parse().ok());
            if let Some(v) = outlier
                && n > 5
            {
                x.iter_mut().skip(5).step_by(n).for_each(|e| *e = v);
            }
            Inputs {
                x: conv(x),
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
        bytewise(y, x, &[], |y, x, _| xor_with(y, x, k));
    }

    /// Backward baseline: read 2N, write N, no math (a bytewise XOR of two inputs).
    pub fn combine<T: CpuElement>(x: &[T], z: &[T], out: &mut [T]) {
        bytewise(out, x, &[z], plain);
    }

    /// The forward's third baseline: read N, write N with non-temporal (streaming) stores, as
    /// the kernels write large outputs (`layernorm_cpu::Stores`) and as glibc's memcpy copies
    /// buffers larger than it thinks the cache is. The parallel `copy` above is a memcpy per
    /// 128 KiB chunk, which never streams; without this bar, a kernel streaming its output would
    /// be measured against a copy that reads every output line in first. (x86-64; elsewhere the
    /// copy loop, as the kernels stream only on x86-64.)
    pub fn copy_stream<T: CpuElement>(x: &[T], y: &mut [T]) {
        bytewise(y, x, &[], stream::write);
    }

    /// The backward's second baseline: [`combine`] with non-temporal stores (see
    /// [`copy_stream`]).
    pub fn combine_stream<T: CpuElement>(x: &[T], z: &[T], out: &mut [T]) {
        bytewise(out, x, &[z], stream::write);
    }

    /// The fused residual forward's baseline: read 2N (x, the residual), write 2N (h, y), no
    /// math: h and y each the bytewise XOR of the two inputs, a chunk at a time (the second
    /// output reads the chunk's inputs again from cache, as the kernels read h again).
    pub fn combine_two<T: CpuElement>(x: &[T], r: &[T], h: &mut [T], y: &mut [T]) {
        bytewise_two(h, y, x, r, plain);
    }

    /// [`combine_two`] with non-temporal stores (see [`copy_stream`]).
    pub fn combine_two_stream<T: CpuElement>(x: &[T], r: &[T], h: &mut [T], y: &mut [T]) {
        bytewise_two(h, y, x, r, stream::write);
    }

    /// The residual backward's baseline: read 3N (x or y, dy, dh), write N, no math (a
    /// bytewise XOR of three inputs).
    pub fn combine3<T: CpuElement>(x: &[T], z: &[T], w: &[T], out: &mut [T]) {
        bytewise(out, x, &[z, w], plain);
    }

    /// [`combine3`] with non-temporal stores (see [`copy_stream`]).
    pub fn combine3_stream<T: CpuElement>(x: &[T], z: &[T], w: &[T], out: &mut [T]) {
        bytewise(out, x, &[z, w], stream::write);
    }

    /// The unfused pre-norm forward's first call, as a framework's elementwise add runs: h =
    /// x + r rounded once to `T` (the fused kernel's h, bit for bit), in parallel chunks on the
    /// current pool, compiled for the machine's widest vectors.
    pub fn add<T: CpuElement>(x: &[T], r: &[T], h: &mut [T]) {
        h.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(r.par_chunks(CHUNK)))
            .for_each(|(h, (x, r))| add_chunk(x, r, h));
    }

    /// `f(out, x, zs)` over matching 128 KiB byte chunks, in parallel on the current pool (`zs`:
    /// the backward's other inputs).
    fn bytewise<T: CpuElement>(
        out: &mut [T],
        x: &[T],
        zs: &[&[T]],
        f: impl Fn(&mut [u8], &[u8], &[&[u8]]) + Sync,
    ) {
        let (out, x): (&mut [u8], &[u8]) = (bytemuck::cast_slice_mut(out), bytemuck::cast_slice(x));
        let c = CHUNK * 4;
        let at = |i: usize| -> Vec<&[u8]> {
            let end = |z: &[u8]| ((i + 1) * c).min(z.len());
            zs.iter().map(|z| bytemuck::cast_slice::<T, u8>(z)).map(|z| &z[i * c..end(z)]).collect()
        };
        out.par_chunks_mut(c).zip(x.par_chunks(c)).enumerate().for_each(|(i, (o, x))| {
            f(o, x, &at(i));
        });
    }

    /// `f(h, x, [r])` and `f(y, x, [r])` over matching 128 KiB byte chunks, in parallel on the
    /// current pool.
    fn bytewise_two<T: CpuElement>(
        h: &mut [T],
        y: &mut [T],
        x: &[T],
        r: &[T],
        f: impl Fn(&mut [u8], &[u8], &[&[u8]]) + Sync,
    ) {
        let (h, y): (&mut [u8], &mut [u8]) =
            (bytemuck::cast_slice_mut(h), bytemuck::cast_slice_mut(y));
        let (x, r): (&[u8], &[u8]) = (bytemuck::cast_slice(x), bytemuck::cast_slice(r));
        let c = CHUNK * 4;
        h.par_chunks_mut(c)
            .zip(y.par_chunks_mut(c))
            .zip(x.par_chunks(c).zip(r.par_chunks(c)))
            .for_each(|((h, y), (x, r))| {
                f(h, x, &[r]);
                f(y, x, &[r]);
            });
    }

    /// The ordinary-store loops: `out = x`, `x ^ z` or `x ^ z ^ w`.
    fn plain(out: &mut [u8], x: &[u8], zs: &[&[u8]]) {
        match zs {
            [] => xor_with(out, x, 0),
            [z] => xor_into(out, x, z),
            [z, w, ..] => xor3_into(out, x, z, w),
        }
    }

    /// Streaming-store loops: `out = x`, `x ^ z` or `x ^ z ^ w`, the aligned middle with 32-byte
    /// non-temporal stores (16-byte without AVX), the ends with ordinary ones.
    mod stream {
        /// `out = x ^ zs…`, then a store fence.
        pub(super) fn write(out: &mut [u8], x: &[u8], zs: &[&[u8]]) {
            #[cfg(target_arch = "x86_64")]
            {
                // SAFETY: AVX is checked here at run time; SSE is part of x86-64.
                if std::arch::is_x86_feature_detected!("avx") {
                    unsafe { x86::write_avx(out, x, zs) }
                } else {
                    unsafe { x86::write_sse(out, x, zs) }
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            super::plain(out, x, zs);
        }

        #[cfg(target_arch = "x86_64")]
        mod x86 {
            use super::super::plain;
            use core::arch::x86_64::*;

            /// One loop per vector width: unaligned loads, aligned non-temporal stores.
            macro_rules! streamer {
                ($name:ident, $feature:literal, $w:literal, $load:ident, $xor:ident, $store:ident) => {
                    /// # Safety
                    /// The CPU must have the named feature.
                    #[target_feature(enable = $feature)]
                    pub(super) unsafe fn $name(out: &mut [u8], x: &[u8], zs: &[&[u8]]) {
                        let n = zs.iter().fold(out.len().min(x.len()), |n, z| n.min(z.len()));
                        let head = out.as_ptr().align_offset($w).min(n);
                        let body = (n - head) / $w * $w;
                        let (o, x) = (&mut out[..n], &x[..n]);
                        let part = |r: core::ops::Range<usize>| -> Vec<&[u8]> {
                            zs.iter().map(|z| &z[r.clone()]).collect()
                        };
                        plain(&mut o[..head], &x[..head], &part(0..head));
                        let mut i = head;
                        while i < head + body {
                            // SAFETY: i + $w <= n for every slice; `o + i` is $w-aligned.
                            unsafe {
                                let mut v = $load(x.as_ptr().add(i).cast());
                                for z in zs {
                                    v = $xor(v, $load(z.as_ptr().add(i).cast()));
                                }
                                $store(o.as_mut_ptr().add(i).cast(), v);
                            }
                            i += $w;
                        }
                        let t = head + body;
                        plain(&mut o[t..], &x[t..], &part(t..n));
                        _mm_sfence();
                    }
                };
            }
            streamer!(write_avx, "avx", 32, _mm256_loadu_ps, _mm256_xor_ps, _mm256_stream_ps);
            streamer!(write_sse, "sse2", 16, _mm_loadu_ps, _mm_xor_ps, _mm_stream_ps);
        }
    }

    // The baselines' loops are compiled for the widest vectors the kernels run at (`multiversion`,
    // dispatched at run time; AVX2 at most with the `max-avx2` feature, like the kernels): built
    // for the default x86-64 target they were 16-byte SSE loops, a bar the kernels' 32- and
    // 64-byte vectors did not face.
    macro_rules! bar_loop {
        ($($item:item)*) => {$(
            #[cfg_attr(not(feature = "max-avx2"), multiversion(targets(
                "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma+f16c",
                "x86_64+avx2+fma+f16c",
                "aarch64+neon"
            )))]
            #[cfg_attr(feature = "max-avx2", multiversion(targets(
                "x86_64+avx2+fma+f16c",
                "aarch64+neon"
            )))]
            $item
        )*};
    }

    bar_loop! {
        /// `y = x ^ k`, bytewise.
        fn xor_with(y: &mut [u8], x: &[u8], k: u8) {
            for (o, &i) in y.iter_mut().zip(x) {
                *o = i ^ k;
            }
        }

        /// `out = x ^ z`, bytewise.
        fn xor_into(out: &mut [u8], x: &[u8], z: &[u8]) {
            for ((o, &x), &z) in out.iter_mut().zip(x).zip(z) {
                *o = x ^ z;
            }
        }

        /// `out = x ^ z ^ w`, bytewise.
        fn xor3_into(out: &mut [u8], x: &[u8], z: &[u8], w: &[u8]) {
            for (((o, &x), &z), &w) in out.iter_mut().zip(x).zip(z).zip(w) {
                *o = x ^ z ^ w;
            }
        }

        /// `h = x + r` rounded once to `T`, elementwise (in the accumulation type; for 16-bit
        /// `T` the sum of two widened values in `f32` rounds to the correctly rounded sum).
        fn add_chunk<T: CpuElement>(x: &[T], r: &[T], h: &mut [T]) {
            for ((h, &x), &r) in h.iter_mut().zip(x).zip(r) {
                *h = T::from_acc(T::to_acc(x) + T::to_acc(r));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::cpu::{
        add, combine, combine_stream, combine_two, combine_two_stream, combine3, combine3_stream,
        copy, copy_loop, copy_stream,
    };

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
                let w: Vec<f32> = super::data(len + phase, 7)[phase..].to_vec();
                let xor3: Vec<u32> = xor.iter().zip(&w).map(|(a, b)| a ^ b.to_bits()).collect();
                for (name, f) in [
                    ("combine3", combine3::<f32> as fn(&[f32], &[f32], &[f32], &mut [f32])),
                    ("combine3_stream", combine3_stream::<f32>),
                ] {
                    out.fill(0.5);
                    f(&x, &z, &w, out);
                    assert_eq!(bits(out), xor3, "{name}, len {len}, phase {phase}");
                }
                let mut second = vec![0.5f32; len];
                for (name, f) in [
                    (
                        "combine_two",
                        combine_two::<f32> as fn(&[f32], &[f32], &mut [f32], &mut [f32]),
                    ),
                    ("combine_two_stream", combine_two_stream::<f32>),
                ] {
                    out.fill(0.5);
                    second.fill(0.5);
                    f(&x, &z, out, &mut second);
                    assert_eq!(bits(out), xor, "{name} h, len {len}, phase {phase}");
                    assert_eq!(bits(&second), xor, "{name} y, len {len}, phase {phase}");
                }
                let sum: Vec<u32> = x.iter().zip(&z).map(|(a, b)| (a + b).to_bits()).collect();
                add(&x, &z, out);
                assert_eq!(bits(out), sum, "add, len {len}, phase {phase}");
            }
        }
    }
}
