//! Criterion benchmark of the CUDA backend: forward and backward in f32 and bf16 on transformer
//! shapes, with bytes/s throughput, next to a device-to-device copy of the same bytes (the
//! achievable-bandwidth yardstick: kernel GB/s ÷ copy GB/s is the fraction of bandwidth).
//!
//! Run on a GPU machine: `cargo bench -p layernorm-benches --bench cuda`. Without CUDA it says so
//! and exits 0.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use layernorm_core::{BackwardArgs, DType, ForwardArgs, HostVec, NormSpec, Normalize};
use layernorm_cuda::{CudaBackend, CudaBuffer};

const SHAPES: [(usize, usize); 4] = [(4096, 768), (4096, 1024), (1024, 4096), (65536, 128)];

/// Deterministic, mildly irregular values (no RNG dependency).
fn values(len: usize, offset: f64, scale: f64, seed: u64) -> Vec<f64> {
    (0..len).map(|i| offset + scale * ((i as f64 * 0.618_034 + seed as f64).sin())).collect()
}

struct Problem {
    spec: NormSpec,
    x: CudaBuffer,
    dy: CudaBuffer,
    gamma: CudaBuffer,
    beta: CudaBuffer,
    y: CudaBuffer,
    mean: CudaBuffer,
    rstd: CudaBuffer,
    dx: CudaBuffer,
    dgamma: CudaBuffer,
    dbeta: CudaBuffer,
}

impl Problem {
    fn new(b: &CudaBackend, rows: usize, n: usize, dtype: DType) -> layernorm_core::Result<Self> {
        let up = |v: Vec<f64>| b.upload(HostVec::from_f64(dtype, &v).as_slice());
        let numel = rows * n;
        Ok(Problem {
            spec: NormSpec::layer_norm(rows, n, dtype),
            x: up(values(numel, 0.1, 2.0, 1))?,
            dy: up(values(numel, 0.0, 1.0, 2))?,
            gamma: up(values(n, 1.0, 0.1, 3))?,
            beta: up(values(n, 0.0, 0.1, 4))?,
            y: b.alloc(dtype, numel)?,
            mean: b.alloc(dtype.acc(), rows)?,
            rstd: b.alloc(dtype.acc(), rows)?,
            dx: b.alloc(dtype, numel)?,
            dgamma: b.alloc(dtype, n)?,
            dbeta: b.alloc(dtype, n)?,
        })
    }

    fn forward(&mut self, b: &CudaBackend) -> layernorm_core::Result<()> {
        let args = ForwardArgs::new(
            &self.x,
            Some(&self.gamma),
            Some(&self.beta),
            &mut self.y,
            &mut self.mean,
            &mut self.rstd,
        );
        b.forward(&self.spec, args)
    }

    fn backward(&mut self, b: &CudaBackend) -> layernorm_core::Result<()> {
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
        b.backward(&self.spec, args)
    }
}

/// Times `iters` queued runs with one synchronisation at the end, so launch latency overlaps
/// with execution as it does in a real model.
fn timed(
    b: &CudaBackend,
    iters: u64,
    mut f: impl FnMut() -> layernorm_core::Result<()>,
) -> Duration {
    if let Err(e) = f().and_then(|_| b.synchronize()) {
        panic!("CUDA benchmark step failed: {e}");
    }
    let start = Instant::now();
    for _ in 0..iters {
        if let Err(e) = f() {
            panic!("CUDA benchmark step failed: {e}");
        }
    }
    if let Err(e) = b.synchronize() {
        panic!("CUDA synchronisation failed: {e}");
    }
    start.elapsed()
}

fn bench(c: &mut Criterion, b: &CudaBackend) -> layernorm_core::Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        for (rows, n) in SHAPES {
            let mut p = Problem::new(b, rows, n, dtype)?;
            let tensor = (rows * n * dtype.size()) as u64;
            let params = (2 * n * dtype.size()) as u64;
            let stats = (2 * rows * dtype.acc().size()) as u64;
            // Groups follow `<backend>/<pass>/<dtype>/<threads>` with a `layernorm` and a
            // `baseline` (device-to-device copy) function per shape, which
            // `cargo xtask bench --bench cuda` pairs up. Bytes are what a perfect kernel must
            // move: forward reads x, γ, β and writes y, mean, rstd; backward reads x, dy, mean,
            // rstd, γ and writes dx, dγ, dβ; the copy reads and writes x once.
            let id = format!("{rows}x{n}");
            let mut g = c.benchmark_group(format!("cuda/fwd/{}/device", dtype.name()));
            g.throughput(Throughput::Bytes(2 * tensor + params + stats));
            g.bench_function(BenchmarkId::new("layernorm", &id), |bn| {
                bn.iter_custom(|i| timed(b, i, || p.forward(b)))
            });
            g.throughput(Throughput::Bytes(2 * tensor));
            g.bench_function(BenchmarkId::new("baseline", &id), |bn| {
                bn.iter_custom(|i| timed(b, i, || b.copy(&p.x, &mut p.y)))
            });
            g.finish();
            let mut g = c.benchmark_group(format!("cuda/bwd/{}/device", dtype.name()));
            g.throughput(Throughput::Bytes(3 * tensor + stats + 3 * params / 2));
            g.bench_function(BenchmarkId::new("layernorm", &id), |bn| {
                bn.iter_custom(|i| timed(b, i, || p.backward(b)))
            });
            g.throughput(Throughput::Bytes(2 * tensor));
            g.bench_function(BenchmarkId::new("baseline", &id), |bn| {
                bn.iter_custom(|i| timed(b, i, || b.copy(&p.x, &mut p.y)))
            });
            g.finish();
        }
    }
    Ok(())
}

fn main() {
    let backend = match CudaBackend::new() {
        Ok(b) => b,
        Err(e) => {
            println!("skipping the CUDA benchmarks: {e}");
            return;
        }
    };
    println!("CUDA benchmarks on {backend:?}");
    let mut c = Criterion::default().configure_from_args();
    if let Err(e) = bench(&mut c, &backend) {
        eprintln!("CUDA benchmark setup failed: {e}");
        std::process::exit(1);
    }
    c.final_summary();
}
