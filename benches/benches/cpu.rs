//! CPU benchmarks: LayerNorm and RMSNorm forward and backward (f32, bf16, f16; 1 and 2 threads)
//! on the standard shapes (groups `cpu/<pass>/<dtype>/<threads>t`, pass `fwd`/`bwd` and
//! `rms-fwd`/`rms-bwd`; the kernel's function is `layernorm` or `rmsnorm`), each beside baselines that move the same bytes with no math — read N + write N for
//! the forward (a parallel memcpy, a vectorized copy loop, and a copy with streaming stores),
//! read 2N + write N for the backward (a bytewise XOR the compiler vectorizes, with ordinary and
//! with streaming stores) — on the same pool in the same run. `cargo xtask bench` takes the
//! fastest baseline of each row as its bar and turns the pairs into fractions of it.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::{bf16, f16};
use layernorm_benches::cpu::{Inputs, combine, combine_stream, copy, copy_loop, copy_stream};
use layernorm_benches::{SHAPES, data, pass, problem, quick};
use layernorm_core::ndarray::ArrayView2;
use layernorm_core::{Element, Norm, NormKind, NormalizeNd};
use layernorm_cpu::{CpuBackend, CpuElement};

fn bench_dtype<T: CpuElement>(c: &mut Criterion, kind: NormKind, threads: usize) {
    let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap());
    let cpu = CpuBackend::with_pool(pool.clone());
    let dt = T::DTYPE;
    for (rows, n) in SHAPES {
        let numel = rows * n;
        let id = format!("{rows}x{n}");
        let spec = problem(kind, rows, n, dt);
        let Inputs { x, dy, gamma: g, beta: b } = Inputs::<T>::new(rows, n);
        let b = spec.beta.then_some(&b[..]);
        let name = if spec.has_mean() { "layernorm" } else { "rmsnorm" };
        let mut y = x.clone();
        let mut dx = x.clone();
        let (mut dg, mut db) = (g.clone(), g.clone());
        let zero = T::Acc::from_f64(0.0);
        let (mut mean, mut rstd) = (vec![zero; rows], vec![zero; rows]);
        let has_mean = spec.has_mean();
        let forward = |y: &mut [T], mean: &mut [T::Acc], rstd: &mut [T::Acc]| {
            let mean = has_mean.then_some(mean);
            cpu.forward_into(&spec, &x, Some(&g), b, y, mean, rstd).unwrap()
        };
        forward(&mut y, &mut mean, &mut rstd);

        let mut fwd =
            c.benchmark_group(format!("cpu/{}/{}/{threads}t", pass(kind, "fwd"), dt.name()));
        fwd.throughput(Throughput::Bytes((2 * numel * dt.size()) as u64));
        fwd.bench_function(BenchmarkId::new(name, &id), |bch| {
            bch.iter(|| forward(&mut y, &mut mean, &mut rstd))
        });
        fwd.bench_function(BenchmarkId::new("baseline", &id), |bch| {
            bch.iter(|| pool.install(|| copy(&x, &mut y)))
        });
        fwd.bench_function(BenchmarkId::new("baseline-loop", &id), |bch| {
            bch.iter(|| pool.install(|| copy_loop(&x, &mut y)))
        });
        fwd.bench_function(BenchmarkId::new("baseline-stream", &id), |bch| {
            bch.iter(|| pool.install(|| copy_stream(&x, &mut y)))
        });
        fwd.finish();

        let mut bwd =
            c.benchmark_group(format!("cpu/{}/{}/{threads}t", pass(kind, "bwd"), dt.name()));
        bwd.throughput(Throughput::Bytes((3 * numel * dt.size()) as u64));
        let m = has_mean.then_some(&mean[..]);
        bwd.bench_function(BenchmarkId::new(name, &id), |bch| {
            bch.iter(|| {
                let db = spec.beta.then_some(&mut db[..]);
                let dg = Some(&mut dg[..]);
                cpu.backward_into(&spec, &x, &dy, m, &rstd, Some(&g), &mut dx, dg, db).unwrap()
            })
        });
        bwd.bench_function(BenchmarkId::new("baseline", &id), |bch| {
            bch.iter(|| pool.install(|| combine(&x, &dy, &mut dx)))
        });
        bwd.bench_function(BenchmarkId::new("baseline-stream", &id), |bch| {
            bch.iter(|| pool.install(|| combine_stream(&x, &dy, &mut dx)))
        });
        bwd.finish();
    }
}

/// The allocating path as users call it in a loop (`forward_nd`: outputs allocated, then
/// dropped, every call) beside the same copy baselines: with the backend's output cache, large
/// outputs are not faulted in afresh each call.
fn bench_allocating(c: &mut Criterion) {
    let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap());
    let cpu = CpuBackend::with_pool(pool.clone());
    let mut group = c.benchmark_group("cpu/fwd-alloc/f32/1t");
    for (rows, n) in SHAPES {
        let numel = rows * n;
        let id = format!("{rows}x{n}");
        let x = data(numel, 1);
        let (g, b) = (data(n, 3), data(n, 4));
        let mut y = x.clone();
        let xv = ArrayView2::from_shape((rows, n), &x[..]).unwrap();
        group.throughput(Throughput::Bytes((2 * numel * 4) as u64));
        group.bench_function(BenchmarkId::new("layernorm", &id), |bch| {
            bch.iter(|| {
                drop(cpu.forward_nd(Norm::layer_norm(), xv).gamma(&g).beta(&b).run().unwrap())
            })
        });
        group.bench_function(BenchmarkId::new("baseline", &id), |bch| {
            bch.iter(|| pool.install(|| copy(&x, &mut y)))
        });
        group.bench_function(BenchmarkId::new("baseline-loop", &id), |bch| {
            bch.iter(|| pool.install(|| copy_loop(&x, &mut y)))
        });
        group.bench_function(BenchmarkId::new("baseline-stream", &id), |bch| {
            bch.iter(|| pool.install(|| copy_stream(&x, &mut y)))
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    for kind in NormKind::ALL {
        for threads in [1, 2] {
            bench_dtype::<f32>(c, kind, threads);
            bench_dtype::<bf16>(c, kind, threads);
            bench_dtype::<f16>(c, kind, threads);
        }
    }
    bench_allocating(c);
}

fn config() -> Criterion {
    println!("instruction set: {}", layernorm_cpu::instruction_set());
    let c = Criterion::default().configure_from_args();
    if quick() {
        c.warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_millis(700))
            .sample_size(10)
    } else {
        c
    }
}

criterion_group! { name = cpu; config = config(); targets = benches }
criterion_main!(cpu);
