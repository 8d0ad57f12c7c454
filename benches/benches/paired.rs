//! CPU fractions of the same-bytes baseline, measured in pairs: the kernel (LayerNorm, RMSNorm)
//! and its baselines are timed alternately, a few milliseconds each, many times over, so that
//! every pair sees the machine in the same state. `cargo xtask bench --paired` runs this and prints the median of
//! the pairs' fractions. (The criterion benches in `cpu.rs` time each function for a second or
//! so in turn; on the shared VMs we measure on, the machine's speed changes on that scale, and
//! their fractions moved by ±0.2 from run to run.)
//!
//! Not a criterion bench: criterion measures one function at a time. Arguments are substring
//! filters on `cpu/<pass>/<dtype>/<threads>t/<shape>` (pass `fwd`, `bwd`, `rms-fwd`,
//! `rms-bwd`); each row prints as one line
//! `pair <group> <shape> <bytes> <kernel s>,<bar s> …` (seconds per call, one pair each), which
//! `cargo xtask bench --paired` reads. `LAYERNORM_BENCH_PAIRS` sets the pair count (default 21).

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Instant;

use half::{bf16, f16};
use layernorm_benches::cpu::{Inputs, combine, combine_stream, copy, copy_loop, copy_stream};
use layernorm_benches::{SHAPES, pass, problem, quick};
use layernorm_core::{Element, NormKind};
use layernorm_cpu::{CpuBackend, CpuElement};

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

fn bench_dtype<T: CpuElement>(
    kind: NormKind,
    threads: usize,
    filters: &[String],
    pairs: usize,
    target: f64,
) {
    let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap());
    let cpu = CpuBackend::with_pool(pool.clone());
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
    for kind in NormKind::ALL {
        for threads in [1, 2] {
            bench_dtype::<f32>(kind, threads, &filters, pairs, target);
            bench_dtype::<bf16>(kind, threads, &filters, pairs, target);
            bench_dtype::<f16>(kind, threads, &filters, pairs, target);
        }
    }
}
