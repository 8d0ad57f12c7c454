//! Criterion benchmarks of the wgpu backend: f32 LayerNorm and RMSNorm forward and backward, and
//! the fused residual forward of both, on transformer-sized shapes, next to a plain copy shader
//! over the same bytes on the same adapter.
//!
//! The norms are memory-bound, so the figure that travels between machines is the ratio of their
//! throughput to the adapter's own copy throughput. Throughput counts the bytes a kernel must move
//! at least: forward reads x and writes y; the fused residual forward reads x and the residual and
//! writes h and y; backward reads x and dy and writes dx (γ, β and the per-row statistics are
//! negligible). The copy moves the bytes of x once in and once out. Each measured iteration
//! submits the work and waits for the queue to drain.
//!
//! `cargo bench -p layernorm-benches --features bench --bench wgpu` (a short run by default;
//! criterion's usual flags such as `--measurement-time` lengthen it). Without an adapter it prints
//! a line and exits.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use layernorm_benches::{pass as bench_pass, problem};
use layernorm_core::{BackwardArgs, DType, ForwardArgs, NormKind, NormSpec, Normalize, Residual};
use layernorm_wgpu::{WgpuBackend, WgpuBuffer};

const SHAPES: &[(usize, usize)] = &[(4096, 768), (4096, 1024), (1024, 4096), (65536, 128)];

struct Problem {
    spec: NormSpec,
    x: WgpuBuffer,
    residual: WgpuBuffer,
    h: WgpuBuffer,
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
    /// A problem of `kind` as the CPU benches pose it (LayerNorm with γ and β, RMSNorm with γ).
    fn new(b: &WgpuBackend, kind: NormKind, rows: usize, n: usize) -> Problem {
        let spec = problem(kind, rows, n, DType::F32);
        let numel = rows * n;
        let x: Vec<f32> = (0..numel).map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5).collect();
        let dy: Vec<f32> = (0..numel).map(|i| ((i * 104_729) % 997) as f32 / 997.0 - 0.5).collect();
        let up = |v: &[f32]| b.upload(layernorm_core::HostSlice::F32(v)).expect("upload");
        let alloc = |len| b.alloc(DType::F32, len).expect("alloc");
        Problem {
            residual: up(&dy),
            h: alloc(numel),
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

    /// The forward, with the fused residual add when `residual`.
    fn forward(&mut self, b: &WgpuBackend, residual: bool) {
        let mean = self.spec.has_mean().then_some(&mut self.mean);
        let mut args = ForwardArgs::new(
            &self.x,
            Some(&self.gamma),
            self.spec.beta.then_some(&self.beta),
            &mut self.y,
            mean,
            &mut self.rstd,
        );
        if residual {
            args = args.with_residual(Residual::Add { residual: &self.residual, h: &mut self.h });
        }
        b.forward(&self.spec, args).expect("forward");
        b.synchronize().expect("sync");
    }

    fn backward(&mut self, b: &WgpuBackend) {
        let args = BackwardArgs::new(
            &self.x,
            &self.dy,
            self.spec.has_mean().then_some(&self.mean),
            &self.rstd,
            Some(&self.gamma),
            &mut self.dx,
            Some(&mut self.dgamma),
            self.spec.beta.then_some(&mut self.dbeta),
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
    for kind in NormKind::ALL {
        // Pass names: `fwd`, `bwd`, `add-fwd` (the fused residual forward) for LayerNorm, with
        // an `rms-` prefix for RMSNorm (`cargo xtask bench` shows the kind in its own column).
        for &(rows, n) in SHAPES {
            let mut p = Problem::new(&b, kind, rows, n);
            p.forward(&b, false);
            p.forward(&b, true);
            p.backward(&b);
            p.copy(&b);
            let bytes = p.bytes();
            // Group names follow `<backend>/<pass>/<dtype>/<threads>` with a `layernorm` and a
            // `baseline` function per shape, which `cargo xtask bench --bench wgpu` pairs up.
            let id = format!("{rows}x{n}");
            let passes: [(&str, u64); 3] = [("fwd", 2), ("add-fwd", 4), ("bwd", 3)];
            for (pass, moved) in passes {
                let mut g =
                    c.benchmark_group(format!("wgpu/{}/f32/device", bench_pass(kind, pass)));
                g.throughput(Throughput::Bytes(moved * bytes));
                g.bench_function(BenchmarkId::new("layernorm", &id), |it| {
                    it.iter(|| match pass {
                        "fwd" => p.forward(&b, false),
                        "add-fwd" => p.forward(&b, true),
                        _ => p.backward(&b),
                    })
                });
                g.throughput(Throughput::Bytes(2 * bytes));
                g.bench_function(BenchmarkId::new("baseline", &id), |it| it.iter(|| p.copy(&b)));
                g.finish();
            }

            let gbs = |moved: u64, s: f64| moved as f64 / s / 1e9;
            let copy = gbs(2 * bytes, median(9, || p.copy(&b)));
            let fwd = gbs(2 * bytes, median(9, || p.forward(&b, false)));
            let add = gbs(4 * bytes, median(9, || p.forward(&b, true)));
            let bwd = gbs(3 * bytes, median(9, || p.backward(&b)));
            summary.push(format!(
                "{kind:<10} {rows:>6}x{n:<5} copy {copy:6.2} GB/s | fwd {fwd:6.2} ({:3.0}%) | \
                 add-fwd {add:6.2} ({:3.0}%) | bwd {bwd:6.2} ({:3.0}%)",
                100.0 * fwd / copy,
                100.0 * add / copy,
                100.0 * bwd / copy
            ));
        }
    }
    eprintln!("\nsummary (GB/s, medians of 9 runs, % of the copy's, {}):", info.name);
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
