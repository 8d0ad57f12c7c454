//! Criterion benchmarks of the wgpu backend: f32 forward and backward on transformer-sized shapes,
//! next to a plain copy shader over the same bytes on the same adapter.
//!
//! LayerNorm is memory-bound, so the figure that travels between machines is the ratio of its
//! throughput to the adapter's own copy throughput. Throughput counts the bytes a kernel must move
//! at least: forward reads x and writes y; backward reads x and dy and writes dx (γ, β and the
//! per-row statistics are negligible). The copy moves the bytes of x once in and once out.
//! Each measured iteration submits the work and waits for the queue to drain.
//!
//! `cargo bench -p layernorm-benches --bench wgpu` (a short run by default; criterion's usual
//! flags such as `--measurement-time` lengthen it). Without an adapter it prints a line and exits.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use layernorm_core::{BackwardArgs, DType, ForwardArgs, NormSpec, Normalize};
use layernorm_wgpu::{WgpuBackend, WgpuBuffer};

const SHAPES: &[(usize, usize)] = &[(4096, 768), (4096, 1024), (1024, 4096), (65536, 128)];

struct Problem {
    spec: NormSpec,
    x: WgpuBuffer,
    dy: WgpuBuffer,
    gamma: WgpuBuffer,
    beta: WgpuBuffer,
    y: WgpuBuffer,
    mean: WgpuBuffer,
    rstd: WgpuBuffer,
    dx: WgpuBuffer,
    dgamma: WgpuBuffer,
    dbeta: WgpuBuffer,
    copy_dst: WgpuBuffer,
}

impl Problem {
    fn new(b: &WgpuBackend, rows: usize, n: usize) -> Problem {
        let spec = NormSpec::layer_norm(rows, n, DType::F32);
        let numel = rows * n;
        let x: Vec<f32> = (0..numel).map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5).collect();
        let dy: Vec<f32> = (0..numel).map(|i| ((i * 104_729) % 997) as f32 / 997.0 - 0.5).collect();
        let up = |v: &[f32]| b.upload(layernorm_core::HostSlice::F32(v)).expect("upload");
        let alloc = |len| b.alloc(DType::F32, len).expect("alloc");
        Problem {
            x: up(&x),
            dy: up(&dy),
            gamma: up(&vec![1.0; n]),
            beta: up(&vec![0.0; n]),
            y: alloc(numel),
            mean: alloc(rows),
            rstd: alloc(rows),
            dx: alloc(numel),
            dgamma: alloc(n),
            dbeta: alloc(n),
            copy_dst: alloc(numel),
            spec,
        }
    }

    fn forward(&mut self, b: &WgpuBackend) {
        let args = ForwardArgs::new(
            &self.x,
            Some(&self.gamma),
            Some(&self.beta),
            &mut self.y,
            &mut self.mean,
            &mut self.rstd,
        );
        b.forward(&self.spec, args).expect("forward");
        b.synchronize().expect("sync");
    }

    fn backward(&mut self, b: &WgpuBackend) {
        let args = BackwardArgs::new(
            &self.x,
            &self.dy,
            &self.mean,
            &self.rstd,
            Some(&self.gamma),
            &mut self.dx,
            Some(&mut self.dgamma),
            Some(&mut self.dbeta),
        );
        b.backward(&self.spec, args).expect("backward");
        b.synchronize().expect("sync");
    }

    fn copy(&mut self, b: &WgpuBackend) {
        b.copy_kernel(&self.x, &mut self.copy_dst).expect("copy");
        b.synchronize().expect("sync");
    }

    fn bytes(&self) -> u64 {
        (self.spec.numel() * 4) as u64
    }
}

/// Median seconds of `reps` runs of `f`, for the summary lines.
fn median(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

fn bench(c: &mut Criterion) {
    let b = match WgpuBackend::new() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    let info = b.adapter_info();
    eprintln!("adapter: {} ({:?}, {:?})", info.name, info.backend, info.device_type);
    let mut summary = Vec::new();
    for &(rows, n) in SHAPES {
        let mut p = Problem::new(&b, rows, n);
        p.forward(&b);
        p.backward(&b);
        p.copy(&b);
        let bytes = p.bytes();
        // Group names follow `<backend>/<pass>/<dtype>/<threads>` with a `layernorm` and a
        // `baseline` function per shape, which `cargo xtask bench --bench wgpu` pairs up.
        let id = format!("{rows}x{n}");
        let mut g = c.benchmark_group("wgpu/fwd/f32/device");
        g.throughput(Throughput::Bytes(2 * bytes));
        g.bench_function(BenchmarkId::new("layernorm", &id), |it| it.iter(|| p.forward(&b)));
        g.bench_function(BenchmarkId::new("baseline", &id), |it| it.iter(|| p.copy(&b)));
        g.finish();
        let mut g = c.benchmark_group("wgpu/bwd/f32/device");
        g.throughput(Throughput::Bytes(3 * bytes));
        g.bench_function(BenchmarkId::new("layernorm", &id), |it| it.iter(|| p.backward(&b)));
        g.throughput(Throughput::Bytes(2 * bytes));
        g.bench_function(BenchmarkId::new("baseline", &id), |it| it.iter(|| p.copy(&b)));
        g.finish();

        let gbs = |moved: u64, s: f64| moved as f64 / s / 1e9;
        let copy = gbs(2 * bytes, median(9, || p.copy(&b)));
        let fwd = gbs(2 * bytes, median(9, || p.forward(&b)));
        let bwd = gbs(3 * bytes, median(9, || p.backward(&b)));
        summary.push(format!(
            "{rows:>6}x{n:<5} copy {copy:7.2} GB/s | forward {fwd:7.2} GB/s ({:4.0}% of copy) | \
             backward {bwd:7.2} GB/s ({:4.0}% of copy)",
            100.0 * fwd / copy,
            100.0 * bwd / copy
        ));
    }
    eprintln!("\nsummary (medians of 9 runs, {}):", info.name);
    for line in summary {
        eprintln!("  {line}");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
