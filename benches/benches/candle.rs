//! On candle tensors, in one run: layernorm-candle's forward against candle-nn's fused
//! `layer_norm` and `rms_norm` (which have no backward), and its backward against the autograd
//! backward of candle-nn's composed `layer_norm_slow` (its only differentiable LayerNorm).
//!
//! f32, bytes/s: a forward moves x in and y out (2 · rows · N · 4 bytes), a backward x and dy in
//! and dx out (3 · rows · N · 4). A timed backward is `y.backward()` on a graph built outside the
//! timing: candle seeds dy with ones (one write of y's size, on both sides), then runs the
//! norm's backward (dx, dγ, dβ); candle's autograd then adds each gradient into a zeroed tensor
//! (`zeros_like` + `add`, two more passes over dx's size). The `kernel` lines time the same
//! forward and backward called on layernorm-cpu directly, into preallocated slices, to show what
//! of each figure is the kernel and what is candle's bookkeeping around it.
//!
//! The pre-norm rows: layernorm-candle's fused residual forward (`layer_norm_residual`,
//! `rms_norm_residual`: h = x + r and y = norm(h) in one pass) against candle's `x + r` followed
//! by its fused norm (two ops, the same outputs), moving x and r in, y and h out
//! (4 · rows · N · 4 bytes); and the backward of a graph whose root is y + h (so that both
//! outputs carry a gradient) through its op against the same graph through `x + r` and
//! `layer_norm_slow`, moving h, dy, dh in and dx out (4 · rows · N · 4).
//!
//! `LAYERNORM_BENCH_QUICK=1` shortens every measurement.
//!
//! ```text
//! cargo bench -p layernorm-benches --features candle --bench candle
//! ```

use std::time::Duration;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use layernorm_core::{BackwardArgs, Element, ForwardArgs, NormSpec, Residual};
use layernorm_cpu::CpuBackend;

/// The shapes of `benches/src/lib.rs` (`SHAPES`), rows × N.
const SHAPES: [(usize, usize); 6] =
    [(4096, 768), (4096, 1024), (1024, 4096), (256, 16384), (65536, 128), (16384, 1024)];

const EPS: f32 = 1e-5;

fn quick() -> bool {
    std::env::var_os("LAYERNORM_BENCH_QUICK").is_some()
}

// layernorm-candle's test data, so that the bench measures the inputs its tests check.
#[path = "../../crates/layernorm-candle/tests/support/data.rs"]
mod data;

/// `len` values of [`data::data`] as f32.
fn data(len: usize, seed: u32) -> Vec<f32> {
    data::data(len, seed).into_iter().map(|v| v as f32).collect()
}

struct Inputs {
    x: Tensor,
    residual: Tensor,
    gamma: Tensor,
    beta: Tensor,
}

impl Inputs {
    fn new(rows: usize, n: usize) -> candle_core::Result<Inputs> {
        let t = |len, seed, shape: &[usize]| Tensor::from_vec(data(len, seed), shape, &Device::Cpu);
        Ok(Inputs {
            x: t(rows * n, 1, &[rows, n])?,
            residual: t(rows * n, 2, &[rows, n])?,
            gamma: t(n, 3, &[n])?,
            beta: t(n, 4, &[n])?,
        })
    }

    /// The inputs as variables, so that a forward builds a graph.
    fn vars(&self) -> candle_core::Result<[Var; 4]> {
        Ok([
            Var::from_tensor(&self.x)?,
            Var::from_tensor(&self.residual)?,
            Var::from_tensor(&self.gamma)?,
            Var::from_tensor(&self.beta)?,
        ])
    }
}

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
    bytes: usize,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(bytes as u64));
    g.sample_size(10);
    let (warm, measure) = if quick() { (0.2, 1.0) } else { (1.0, 4.0) };
    g.warm_up_time(Duration::from_secs_f64(warm));
    g.measurement_time(Duration::from_secs_f64(measure));
    g
}

fn benches(c: &mut Criterion) {
    for (rows, n) in SHAPES {
        let shape = format!("{rows}x{n}");
        let numel = rows * n;
        let size = DType::F32.size_in_bytes();
        let inp = Inputs::new(rows, n).expect("inputs");
        let (x, r, g, b) = (&inp.x, &inp.residual, &inp.gamma, &inp.beta);

        let mut fwd = group(c, &format!("candle/layer_norm_forward/{shape}"), 2 * numel * size);
        fwd.bench_function(BenchmarkId::from_parameter("ours"), |bench| {
            bench.iter(|| layernorm_candle::ops::layer_norm(x, g, b, EPS).expect("ours"))
        });
        fwd.bench_function(BenchmarkId::from_parameter("candle-fused"), |bench| {
            bench.iter(|| candle_nn::ops::layer_norm(x, g, b, EPS).expect("candle"))
        });
        let cpu = CpuBackend::new();
        let spec = NormSpec::layer_norm(rows, n, layernorm_core::DType::F32).with_eps(EPS as f64);
        let host = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("host");
        let (xh, gh, bh) = (host(x), host(g), host(b));
        let (mut y, mut mean, mut rstd) = (vec![0f32; numel], vec![0f32; rows], vec![0f32; rows]);
        fwd.bench_function(BenchmarkId::from_parameter("kernel"), |bench| {
            bench.iter(|| {
                cpu.forward_into(
                    &spec,
                    &xh,
                    Some(&gh),
                    Some(&bh),
                    &mut y,
                    Some(&mut mean),
                    &mut rstd,
                )
                .expect("kernel")
            })
        });
        fwd.finish();

        let mut rms = group(c, &format!("candle/rms_norm_forward/{shape}"), 2 * numel * size);
        rms.bench_function(BenchmarkId::from_parameter("ours"), |bench| {
            bench.iter(|| layernorm_candle::ops::rms_norm(x, g, EPS).expect("ours"))
        });
        rms.bench_function(BenchmarkId::from_parameter("candle-fused"), |bench| {
            bench.iter(|| candle_nn::ops::rms_norm(x, g, EPS).expect("candle"))
        });
        rms.finish();

        let mut bwd = group(c, &format!("candle/layer_norm_backward/{shape}"), 3 * numel * size);
        let vars = inp.vars().expect("vars");
        let [xv, rv, gv, bv] = &vars;
        bwd.bench_function(BenchmarkId::from_parameter("ours"), |bench| {
            bench.iter_batched(
                || layernorm_candle::ops::layer_norm(xv, gv, bv, EPS).expect("ours"),
                |y| y.backward().expect("backward"),
                BatchSize::PerIteration,
            )
        });
        bwd.bench_function(BenchmarkId::from_parameter("candle-slow"), |bench| {
            bench.iter_batched(
                || candle_nn::ops::layer_norm_slow(xv, gv, bv, EPS).expect("slow"),
                |y| y.backward().expect("backward"),
                BatchSize::PerIteration,
            )
        });
        let dy = vec![1f32; numel];
        let (mut dx, mut dg, mut db) = (vec![0f32; numel], vec![0f32; n], vec![0f32; n]);
        bwd.bench_function(BenchmarkId::from_parameter("kernel"), |bench| {
            bench.iter(|| {
                cpu.backward_into(
                    &spec,
                    &xh,
                    &dy,
                    Some(&mean),
                    &rstd,
                    Some(&gh),
                    &mut dx,
                    Some(&mut dg),
                    Some(&mut db),
                )
                .expect("kernel")
            })
        });
        bwd.finish();

        let name = format!("candle/layer_norm_residual_forward/{shape}");
        let mut fwd = group(c, &name, 4 * numel * size);
        fwd.bench_function(BenchmarkId::from_parameter("ours"), |bench| {
            bench
                .iter(|| layernorm_candle::ops::layer_norm_residual(x, r, g, b, EPS).expect("ours"))
        });
        fwd.bench_function(BenchmarkId::from_parameter("candle-add-fused"), |bench| {
            bench.iter(|| {
                let h = (x + r).expect("add");
                (candle_nn::ops::layer_norm(&h, g, b, EPS).expect("candle"), h)
            })
        });
        let rh = host(r);
        let mut h = vec![0f32; numel];
        fwd.bench_function(BenchmarkId::from_parameter("kernel"), |bench| {
            bench.iter(|| {
                let args = ForwardArgs::new(
                    f32::host(&xh),
                    Some(f32::host(&gh)),
                    Some(f32::host(&bh)),
                    f32::host_mut(&mut y),
                    Some(f32::host_mut(&mut mean)),
                    f32::host_mut(&mut rstd),
                )
                .with_residual(Residual::Add {
                    residual: f32::host(&rh),
                    h: f32::host_mut(&mut h),
                });
                cpu.forward_typed::<f32>(&spec, args).expect("kernel")
            })
        });
        fwd.finish();

        let name = format!("candle/rms_norm_residual_forward/{shape}");
        let mut rms = group(c, &name, 4 * numel * size);
        rms.bench_function(BenchmarkId::from_parameter("ours"), |bench| {
            bench.iter(|| layernorm_candle::ops::rms_norm_residual(x, r, g, EPS).expect("ours"))
        });
        rms.bench_function(BenchmarkId::from_parameter("candle-add-fused"), |bench| {
            bench.iter(|| {
                let h = (x + r).expect("add");
                (candle_nn::ops::rms_norm(&h, g, EPS).expect("candle"), h)
            })
        });
        rms.finish();

        let name = format!("candle/layer_norm_residual_backward/{shape}");
        let mut bwd = group(c, &name, 4 * numel * size);
        let ours = || {
            let (y, h) = layernorm_candle::ops::layer_norm_residual(xv, rv, gv, bv, EPS)?;
            y + h
        };
        bwd.bench_function(BenchmarkId::from_parameter("ours"), |bench| {
            bench.iter_batched(
                || ours().expect("ours"),
                |root| root.backward().expect("backward"),
                BatchSize::PerIteration,
            )
        });
        let composed = || {
            let h = (xv.as_tensor() + rv.as_tensor())?;
            candle_nn::ops::layer_norm_slow(&h, gv, bv, EPS)? + h
        };
        bwd.bench_function(BenchmarkId::from_parameter("candle-add-slow"), |bench| {
            bench.iter_batched(
                || composed().expect("composed"),
                |root| root.backward().expect("backward"),
                BatchSize::PerIteration,
            )
        });
        bwd.bench_function(BenchmarkId::from_parameter("kernel"), |bench| {
            bench.iter(|| {
                let args = BackwardArgs::new(
                    f32::host(&h),
                    f32::host(&dy),
                    Some(f32::host(&mean)),
                    f32::host(&rstd),
                    Some(f32::host(&gh)),
                    f32::host_mut(&mut dx),
                    Some(f32::host_mut(&mut dg)),
                    Some(f32::host_mut(&mut db)),
                )
                .with_dh(f32::host(&dy));
                cpu.backward_typed::<f32>(&spec, args).expect("kernel")
            })
        });
        bwd.finish();
    }
}

criterion_group!(candle, benches);
criterion_main!(candle);
