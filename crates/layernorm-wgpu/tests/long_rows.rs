//! Rows of 2^24 and more elements: every sum a thread or a workgroup forms runs over millions of
//! terms here, the element count is past f32's exact integers, and bf16 indices pass 2^23 words.
//! The same tolerances as every other shape. The plain rows of 2^24 (LayerNorm in f32 at a mean
//! of 1e6, RMSNorm in bf16 of an even length) are conformance cases (`long_row_2e24_*` in the
//! conformance crate's `cases.toml`), run on this backend by the suite; these are the lengths,
//! variants and the other pairings of kind and dtype it lacks.

mod common;

use std::sync::{Mutex, MutexGuard};

use common::{BF16, F32, Res, Variant, backend, check_variant, runs};
use layernorm_core::{DType, NormSpec, bf16};

/// Held by each test: on wgpu's GL backend one of these dispatches can hold the adapter's GL
/// context for longer than the 6 s wgpu lets another thread wait for it before panicking.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// `n` values of mean `mean` and standard deviation `std` (uniform, from a fixed linear
/// congruential sequence: millions of normal samples would dominate the test's time).
fn uniform(n: usize, mean: f64, std: f64, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let half_width = std * 3f64.sqrt();
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = (s >> 11) as f64 / (1u64 << 53) as f64;
            mean + half_width * (2.0 * u - 1.0)
        })
        .collect()
}

#[test]
fn one_f32_row_of_2_24_plus_2_through_a_residual() {
    // N not a multiple of 4: scalar access; RMSNorm, the fused residual in place, the backward
    // from y with dh.
    let _one = one_at_a_time();
    let Some(b) = backend() else { return };
    let n = (1 << 24) + 2;
    let x = uniform(n, -3e4, 2.0, 2);
    let v = Variant { res: Res::InPlace, from_y: true, dh: true };
    check_variant::<f32>(b, &NormSpec::rms_norm(1, n, DType::F32), v, &x, F32, 4);
}

#[test]
fn one_bf16_row_of_2_24_plus_1() {
    let _one = one_at_a_time();
    let Some(b) = backend() else { return };
    if !runs(b, DType::BF16) {
        return;
    }
    // Odd N: one element per item, stores through atomics on shared words (the even length, two
    // elements per word, is the conformance case); LayerNorm, the residual added into h.
    let n = (1 << 24) + 1;
    let x = uniform(n, 5.0, 1.5, 7);
    let v = Variant { res: Res::Add, from_y: false, dh: true };
    check_variant::<bf16>(b, &NormSpec::layer_norm(1, n, DType::BF16), v, &x, BF16, 8);
}
