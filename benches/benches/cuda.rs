//! Criterion benchmark of the CUDA backend: LayerNorm and RMSNorm forward and backward, and the
//! pre-norm block (RMSNorm over a fused residual add, then the backward from y with dh), in f32
//! and bf16 on transformer shapes, with bytes/s throughput, next to a device-to-device copy of
//! the same bytes (the achievable-bandwidth yardstick: kernel GB/s ÷ copy GB/s is the fraction of
//! bandwidth).
//!
//! Run on a GPU machine: `cargo bench -p layernorm-benches --features bench --bench cuda`. Without
//! CUDA it says so and exits 0.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use layernorm_core::{
    BackwardArgs, DType, ForwardArgs, HostVec, NormKind, NormSpec, Normalize, Residual,
};
use layernorm_cuda::{CudaBackend, CudaBuffer};

const SHAPES: [(usize, usize); 4] = [(4096, 768), (4096, 1024), (1024, 4096), (65536, 128)];

/// Deterministic, mildly irregular values (no RNG dependency).
fn values(len: usize, offset: f64, scale: f64, seed: u64) -> Vec<f64> {
    (0..len).map(|i| offset + scale * ((i as f64 * 0.618_034 + seed as f64).sin())).collect()
}

struct Problem {
    spec: NormSpec,
    x: CudaBuffer,
    residual: CudaBuffer,
    h: CudaBuffer,
    dy: CudaBuffer,
    dh: CudaBuffer,
    gamma: CudaBuffer,
    beta: Option<CudaBuffer>,
    y: CudaBuffer,
    mean: Option<CudaBuffer>,
    rstd: CudaBuffer,
    dx: CudaBuffer,
    dgamma: CudaBuffer,
    dbeta: Option<CudaBuffer>,
}

impl Problem {
    /// LayerNorm with γ and β, or RMSNorm with γ only (the Llama layer).
    fn new(
        b: &CudaBackend,
        kind: NormKind,
        rows: usize,
        n: usize,
        dtype: DType,
    ) -> layernorm_core::Result<Self> {
        let up = |v: Vec<f64>| b.upload(HostVec::from_f64(dtype, &v).as_slice());
        let spec = NormSpec::new(kind, rows, n, dtype).with_beta(kind == NormKind::LayerNorm);
        let numel = rows * n;
        Ok(Problem {
            x: up(values(numel, 0.1, 2.0, 1))?,
            residual: up(values(numel, 0.0, 1.0, 5))?,
            h: b.alloc(dtype, numel)?,
            dy: up(values(numel, 0.0, 1.0, 2))?,
            dh: up(values(numel, 0.0, 1.0, 6))?,
            gamma: up(values(n, 1.0, 0.1, 3))?,
            beta: spec.beta.then(|| up(values(n, 0.0, 0.1, 4))).transpose()?,
            y: b.alloc(dtype, numel)?,
            mean: spec.has_mean().then(|| b.alloc(dtype.acc(), rows)).transpose()?,
            rstd: b.alloc(dtype.acc(), rows)?,
            dx: b.alloc(dtype, numel)?,
            dgamma: b.alloc(dtype, n)?,
            dbeta: spec.beta.then(|| b.alloc(dtype, n)).transpose()?,
            spec,
        })
    }

    /// The forward, with the residual added (h written) when `residual`.
    fn forward(&mut self, b: &CudaBackend, residual: bool) -> layernorm_core::Result<()> {
        let mut args = ForwardArgs::new(
            &self.x,
            Some(&self.gamma),
            self.beta.as_ref(),
            &mut self.y,
            self.mean.as_mut(),
            &mut self.rstd,
        );
        if residual {
            args = args.with_residual(Residual::Add { residual: &self.residual, h: &mut self.h });
        }
        b.forward(&self.spec, args)
    }

    /// The backward from x, or from y with dh (the pre-norm block's).
    fn backward(&mut self, b: &CudaBackend, from_y: bool) -> layernorm_core::Result<()> {
        let mut args = BackwardArgs::new(
            &self.x,
            &self.dy,
            self.mean.as_ref(),
            &self.rstd,
            Some(&self.gamma),
            &mut self.dx,
            Some(&mut self.dgamma),
            self.dbeta.as_mut(),
        );
        if from_y {
            args = args.from_output(&self.y, self.beta.as_ref()).with_dh(&self.dh);
        }
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

/// The rows of one benchmark group: what runs and the bytes a perfect kernel must move.
struct Row {
    /// The group's pass (`fwd`, `bwd`, `rms-fwd`, `rms-bwd`, `add-fwd`, `add-bwd`).
    pass: &'static str,
    kind: NormKind,
    /// Forward with a residual / backward from y with dh.
    fused: bool,
    backward: bool,
}

const ROWS: [Row; 6] = [
    Row { pass: "fwd", kind: NormKind::LayerNorm, fused: false, backward: false },
    Row { pass: "bwd", kind: NormKind::LayerNorm, fused: false, backward: true },
    Row { pass: "rms-fwd", kind: NormKind::RmsNorm, fused: false, backward: false },
    Row { pass: "rms-bwd", kind: NormKind::RmsNorm, fused: false, backward: true },
    Row { pass: "add-fwd", kind: NormKind::RmsNorm, fused: true, backward: false },
    Row { pass: "add-bwd", kind: NormKind::RmsNorm, fused: true, backward: true },
];

fn bench(c: &mut Criterion, b: &CudaBackend) -> layernorm_core::Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        for (rows, n) in SHAPES {
            for kind in NormKind::ALL {
                let mut p = Problem::new(b, kind, rows, n, dtype)?;
                let tensor = (rows * n * dtype.size()) as u64;
                let param = (n * dtype.size()) as u64;
                let params = if p.spec.beta { 2 * param } else { param };
                let stat = (rows * dtype.acc().size()) as u64;
                let stats = if p.spec.has_mean() { 2 * stat } else { stat };
                for row in ROWS.iter().filter(|r| r.kind == kind) {
                    // Groups follow `<backend>/<pass>/<dtype>/<threads>` with a `layernorm` and a
                    // `baseline` (device-to-device copy) function per shape, which
                    // `cargo xtask bench --bench cuda` pairs up. Bytes are what a perfect kernel
                    // must move: forward reads x (and the residual), γ, β and writes y (and h),
                    // the statistics; backward reads x or y, dy (and dh), the statistics, γ (and
                    // β from y) and writes dx, dγ, dβ; the copy reads and writes x once.
                    let tensors = match (row.backward, row.fused) {
                        (false, false) => 2,
                        (false, true) => 4,
                        (true, false) => 3,
                        (true, true) => 4,
                    };
                    // Backward: γ read, dγ (and dβ) written, β read too from y.
                    let param_bytes = match (row.backward, p.spec.beta) {
                        (false, _) => params,
                        (true, false) => 2 * param,
                        (true, true) => (if row.fused { 4 } else { 3 }) * param,
                    };
                    let bytes = tensors * tensor + stats + param_bytes;
                    let id = format!("{rows}x{n}");
                    let group = format!("cuda/{}/{}/device", row.pass, dtype.name());
                    let mut g = c.benchmark_group(group);
                    g.throughput(Throughput::Bytes(bytes));
                    g.bench_function(BenchmarkId::new("layernorm", &id), |bn| {
                        bn.iter_custom(|i| {
                            timed(b, i, || {
                                if row.backward {
                                    p.backward(b, row.fused)
                                } else {
                                    p.forward(b, row.fused)
                                }
                            })
                        })
                    });
                    g.throughput(Throughput::Bytes(2 * tensor));
                    g.bench_function(BenchmarkId::new("baseline", &id), |bn| {
                        bn.iter_custom(|i| timed(b, i, || b.copy(&p.x, &mut p.y)))
                    });
                    g.finish();
                }
            }
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
