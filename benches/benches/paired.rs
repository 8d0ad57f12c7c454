//! CPU fractions of the same-bytes baseline, measured in pairs: the kernel (LayerNorm, RMSNorm)
//! and its baselines are timed alternately, a few milliseconds each, many times over, so that
//! every pair sees the machine in the same state. `cargo xtask bench --paired` runs this and prints the median of
//! the pairs' fractions. (The criterion benches in `cpu.rs` time each function for a second or
//! so in turn; on the shared VMs we measure on, the machine's speed changes on that scale, and
//! their fractions moved by ±0.2 from run to run.)
//!
//! Not a criterion bench: criterion measures one function at a time. Arguments are substring
//! filters on `cpu/<pass>/<dtype>/<threads>t/<shape>` (pass `fwd`, `bwd`, and the pre-norm
//! rows `res-fwd`, `res-unfused`, `res-bwd`, `res-ybwd` of [`bench_residual`]; RMSNorm's with
//! the prefix `rms-`); each row prints as one line
//! `pair <group> <shape> <bytes> <kernel s>,<bar s> …` (seconds per call, one pair each), which
//! `cargo xtask bench --paired` reads, after a line `isa <instruction set>`.
//! `LAYERNORM_BENCH_PAIRS` sets the pair count (default 21), `LAYERNORM_BENCH_STORES` the
//! kernels' store kind (`auto`, `cached`, `streaming`); the feature `max-avx2` runs the
//! kernels and bars at AVX2 at most.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Instant;

use half::{bf16, f16};
use layernorm_benches::cpu::{
    Inputs, add, combine, combine_stream, combine_two, combine_two_stream, combine3,
    combine3_stream, copy, copy_loop, copy_stream,
};
use layernorm_benches::{SHAPES, data, pass, problem, quick};
use layernorm_core::{BackwardArgs, Element, ForwardArgs, NormKind, Residual};
use layernorm_cpu::{CpuBackend, CpuElement, Stores};

/// Seconds per call of `f`, timed over `calls` calls after one untimed call: the first call
/// after the other side of a pair pays for the caches that side left (dirty lines of the shared
/// output, say), which is neither side's cost in a steady state.
fn per_call(f: &mut dyn FnMut(), calls: usize) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..calls {
        f();
    }
    t.elapsed().as_secs_f64() / calls as f64
}

/// How many calls of `f` fill about `target` seconds (after one warm-up call).
fn calls_for(f: &mut dyn FnMut(), target: f64) -> usize {
    let once = per_call(f, 1).max(1e-7);
    ((target / once).ceil() as usize).clamp(1, 100_000)
}

/// `pairs` pairs of (kernel, bar) seconds per call, the bar being the fastest of `bars` in that
/// pair; the order within a pair alternates, so neither side always runs first.
fn measure(
    kernel: &mut dyn FnMut(),
    bars: &mut [&mut dyn FnMut()],
    pairs: usize,
    target: f64,
) -> Vec<(f64, f64)> {
    let kc = calls_for(kernel, target);
    let bc: Vec<usize> = bars.iter_mut().map(|b| calls_for(*b, target)).collect();
    (0..pairs)
        .map(|p| {
            let mut bar = f64::INFINITY;
            let mut run_bars = |bars: &mut [&mut dyn FnMut()]| {
                for (b, &c) in bars.iter_mut().zip(&bc) {
                    bar = bar.min(per_call(*b, c));
                }
            };
            let k = if p % 2 == 0 {
                let k = per_call(kernel, kc);
                run_bars(bars);
                k
            } else {
                run_bars(bars);
                per_call(kernel, kc)
            };
            (k, bar)
        })
        .collect()
}

fn report(group: &str, shape: &str, bytes: usize, pairs: &[(f64, f64)]) {
    let p: Vec<String> = pairs.iter().map(|(k, b)| format!("{k:e},{b:e}")).collect();
    println!("pair {group} {shape} {bytes} {}", p.join(" "));
}

/// The CPU backend on `pool`, with the store kind `LAYERNORM_BENCH_STORES` names (`auto`, the
/// default; `cached`; `streaming`): a measurement knob for the `Stores` threshold.
fn backend(pool: &Arc<rayon::ThreadPool>) -> CpuBackend {
    let stores = match std::env::var("LAYERNORM_BENCH_STORES").as_deref() {
        Ok("cached") => Stores::Cached,
        Ok("streaming") => Stores::Streaming,
        Ok("auto") | Err(_) => Stores::Auto,
        Ok(other) => panic!("LAYERNORM_BENCH_STORES: `{other}` is not auto, cached or streaming"),
    };
    CpuBackend::with_pool(pool.clone()).with_stores(stores)
}

fn bench_dtype<T: CpuElement>(
    kind: NormKind,
    threads: usize,
    filters: &[String],
    pairs: usize,
    target: f64,
) {
    let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap());
    let cpu = backend(&pool);
    let dt = T::DTYPE;
    let wanted = |id: &str| filters.is_empty() || filters.iter().any(|f| id.contains(f.as_str()));
    for (rows, n) in SHAPES {
        let shape = format!("{rows}x{n}");
        let (fwd, bwd) = (
            format!("cpu/{}/{}/{threads}t", pass(kind, "fwd"), dt.name()),
            format!("cpu/{}/{}/{threads}t", pass(kind, "bwd"), dt.name()),
        );
        let (do_fwd, do_bwd) =
            (wanted(&format!("{fwd}/{shape}")), wanted(&format!("{bwd}/{shape}")));
        if !do_fwd && !do_bwd {
            continue;
        }
        let numel = rows * n;
        let spec = problem(kind, rows, n, dt);
        let Inputs { x, dy, gamma: g, beta: b } = Inputs::<T>::new(rows, n);
        let b = spec.beta.then_some(&b[..]);
        // As in `cpu.rs`, the baselines write where the kernel does (y, dx), so that both sides
        // of a pair touch the same memory.
        let out = RefCell::new(x.clone());
        let (mut dg, mut db) = (g.clone(), g.clone());
        let zero = T::Acc::from_f64(0.0);
        let (mut mean, mut rstd) = (vec![zero; rows], vec![zero; rows]);
        let fwd_call = |out: &mut [T], mean: &mut [T::Acc], rstd: &mut [T::Acc]| {
            let mean = spec.has_mean().then_some(mean);
            cpu.forward_into(&spec, &x, Some(&g), b, out, mean, rstd).unwrap()
        };
        fwd_call(&mut out.borrow_mut(), &mut mean, &mut rstd);
        if do_fwd {
            let mut memcpy = || {
                let y = &mut out.borrow_mut()[..];
                pool.install(|| copy(&x, y))
            };
            let mut looped = || {
                let y = &mut out.borrow_mut()[..];
                pool.install(|| copy_loop(&x, y))
            };
            let mut streamed = || {
                let y = &mut out.borrow_mut()[..];
                pool.install(|| copy_stream(&x, y))
            };
            let mut kernel = || fwd_call(&mut out.borrow_mut(), &mut mean, &mut rstd);
            let bars: &mut [&mut dyn FnMut()] = &mut [&mut memcpy, &mut looped, &mut streamed];
            let p = measure(&mut kernel, bars, pairs, target);
            report(&fwd, &shape, 2 * numel * dt.size(), &p);
        }
        if do_bwd {
            let (mean, rstd) = (spec.has_mean().then_some(&mean[..]), &rstd);
            let mut kernel = || {
                let (dg, db) = (Some(&mut dg[..]), spec.beta.then_some(&mut db[..]));
                let dx = &mut out.borrow_mut()[..];
                cpu.backward_into(&spec, &x, &dy, mean, rstd, Some(&g), dx, dg, db).unwrap()
            };
            let mut xor = || {
                let dx = &mut out.borrow_mut()[..];
                pool.install(|| combine(&x, &dy, dx))
            };
            let mut xor_streamed = || {
                let dx = &mut out.borrow_mut()[..];
                pool.install(|| combine_stream(&x, &dy, dx))
            };
            let p = measure(&mut kernel, &mut [&mut xor, &mut xor_streamed], pairs, target);
            report(&bwd, &shape, 3 * numel * dt.size(), &p);
        }
    }
}

/// The pre-norm rows (issue 25) for `T`: the fused residual forward (`res-fwd`: read x and the
/// residual, write h and y) against [`combine_two`]'s bars; the same call against `add` then
/// `norm` as two calls (`res-unfused`: its "bar" is the two calls, so its fraction is how many
/// times faster the fused call runs); the backward from h with dh (`res-bwd`) and from y with
/// dh (`res-ybwd`), each reading three tensors and writing dx, against [`combine3`]'s bars.
fn bench_residual<T: CpuElement>(
    kind: NormKind,
    threads: usize,
    filters: &[String],
    pairs: usize,
    target: f64,
) {
    let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap());
    let cpu = backend(&pool);
    let dt = T::DTYPE;
    let wanted = |id: &str| filters.is_empty() || filters.iter().any(|f| id.contains(f.as_str()));
    for (rows, n) in SHAPES {
        let shape = format!("{rows}x{n}");
        let groups = ["res-fwd", "res-unfused", "res-bwd", "res-ybwd"]
            .map(|p| format!("cpu/{}/{}/{threads}t", pass(kind, p), dt.name()));
        let want = groups.clone().map(|g| wanted(&format!("{g}/{shape}")));
        if !want.iter().any(|&w| w) {
            continue;
        }
        let numel = rows * n;
        let bytes = 4 * numel * dt.size();
        let spec = problem(kind, rows, n, dt);
        let Inputs { x, dy, gamma: g, beta: b } = Inputs::<T>::new(rows, n);
        let conv =
            |v: Vec<f32>| -> Vec<T> { v.into_iter().map(|f| T::from_f64(f as f64)).collect() };
        let (r, dh) = (conv(data(numel, 5)), conv(data(numel, 6)));
        let b = spec.beta.then_some(&b[..]);
        // h and y as the fused forward leaves them (the backward rows read them); dx apart.
        let (h, y, dx) =
            (RefCell::new(x.clone()), RefCell::new(x.clone()), RefCell::new(x.clone()));
        let (mut dg, mut db) = (g.clone(), g.clone());
        let zero = T::Acc::from_f64(0.0);
        let (mean, rstd) = (RefCell::new(vec![zero; rows]), RefCell::new(vec![zero; rows]));
        let fused = || {
            let (mut h, mut y) = (h.borrow_mut(), y.borrow_mut());
            let (mut mean, mut rstd) = (mean.borrow_mut(), rstd.borrow_mut());
            let m = spec.has_mean().then_some(T::Acc::host_mut(&mut mean[..]));
            let args = ForwardArgs::new(
                T::host(&x),
                Some(T::host(&g)),
                b.map(T::host),
                T::host_mut(&mut y[..]),
                m,
                T::Acc::host_mut(&mut rstd[..]),
            )
            .with_residual(Residual::Add { residual: T::host(&r), h: T::host_mut(&mut h[..]) });
            cpu.forward_typed::<T>(&spec, args).unwrap()
        };
        fused();
        if want[0] {
            let mut plain = || {
                let (mut h, mut y) = (h.borrow_mut(), y.borrow_mut());
                let (h, y) = (&mut h[..], &mut y[..]);
                pool.install(|| combine_two(&x, &r, h, y))
            };
            let mut streamed = || {
                let (mut h, mut y) = (h.borrow_mut(), y.borrow_mut());
                let (h, y) = (&mut h[..], &mut y[..]);
                pool.install(|| combine_two_stream(&x, &r, h, y))
            };
            let mut kernel = fused;
            let p = measure(&mut kernel, &mut [&mut plain, &mut streamed], pairs, target);
            report(&groups[0], &shape, bytes, &p);
        }
        if want[1] {
            let mut two_calls = || {
                let (mut h, mut y) = (h.borrow_mut(), y.borrow_mut());
                let hs = &mut h[..];
                pool.install(|| add(&x, &r, hs));
                let (mut mean, mut rstd) = (mean.borrow_mut(), rstd.borrow_mut());
                let m = spec.has_mean().then_some(&mut mean[..]);
                cpu.forward_into(&spec, &h, Some(&g), b, &mut y, m, &mut rstd).unwrap()
            };
            let mut kernel = fused;
            let p = measure(&mut kernel, &mut [&mut two_calls], pairs, target);
            report(&groups[1], &shape, bytes, &p);
        }
        fused();
        for (from_y, group, wanted) in [(false, &groups[2], want[2]), (true, &groups[3], want[3])] {
            if !wanted {
                continue;
            }
            let (mean, rstd) = (mean.borrow(), rstd.borrow());
            let (h, y) = (h.borrow(), y.borrow());
            let saved: &[T] = if from_y { &y } else { &h };
            let mut kernel = || {
                let mut dx = dx.borrow_mut();
                let db = spec.beta.then_some(T::host_mut(&mut db[..]));
                let m = (spec.has_mean() && !from_y).then_some(T::Acc::host(&mean[..]));
                let mut args = BackwardArgs::new(
                    T::host(&h),
                    T::host(&dy),
                    m,
                    T::Acc::host(&rstd[..]),
                    Some(T::host(&g)),
                    T::host_mut(&mut dx[..]),
                    Some(T::host_mut(&mut dg[..])),
                    db,
                )
                .with_dh(T::host(&dh));
                if from_y {
                    args = args.from_output(T::host(&y), b.map(T::host));
                }
                cpu.backward_typed::<T>(&spec, args).unwrap()
            };
            let mut plain = || {
                let mut dx = dx.borrow_mut();
                let dx = &mut dx[..];
                pool.install(|| combine3(saved, &dy, &dh, dx))
            };
            let mut streamed = || {
                let mut dx = dx.borrow_mut();
                let dx = &mut dx[..];
                pool.install(|| combine3_stream(saved, &dy, &dh, dx))
            };
            let p = measure(&mut kernel, &mut [&mut plain, &mut streamed], pairs, target);
            report(group, &shape, bytes, &p);
        }
    }
}

fn main() {
    // cargo bench passes `--bench`; everything else not starting with `-` is a filter.
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let pairs = std::env::var("LAYERNORM_BENCH_PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&p: &usize| p > 0)
        .unwrap_or(21);
    // Seconds per side of a pair: long enough to time, short enough that the machine holds
    // still across the pair.
    let target = if quick() { 0.01 } else { 0.05 };
    // The instruction set the kernels and bars run (`cargo xtask bench --paired` prints it).
    println!("isa {}", layernorm_cpu::instruction_set());
    for kind in NormKind::ALL {
        for threads in [1, 2] {
            bench_dtype::<f32>(kind, threads, &filters, pairs, target);
            bench_dtype::<bf16>(kind, threads, &filters, pairs, target);
            bench_dtype::<f16>(kind, threads, &filters, pairs, target);
            bench_residual::<f32>(kind, threads, &filters, pairs, target);
            bench_residual::<bf16>(kind, threads, &filters, pairs, target);
        }
    }
}
