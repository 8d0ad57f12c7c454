//! Helpers shared by the on-device (`gpu.rs`) and the emulated (`emulated.rs`) tests.

use layernorm_core::DType;
use rand::Rng;
use rand::rngs::SmallRng;

/// `len` values uniform in `offset ± scale`.
pub fn random(rng: &mut SmallRng, len: usize, offset: f64, scale: f64) -> Vec<f64> {
    (0..len).map(|_| offset + scale * (rng.random::<f64>() * 2.0 - 1.0)).collect()
}

/// Every element within `tol` of the largest reference magnitude (at least 1), or equal to the
/// reference rounded to the dtype (an out-of-range value is ±inf there).
pub fn assert_close(what: &str, dtype: DType, tol: f64, got: &[f64], want: &[f64], ctx: &str) {
    assert_eq!(got.len(), want.len(), "{what} length, {ctx}");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= tol * scale || *g == dtype.round(*w),
            "{what}[{i}] = {g}, reference {w} (err {err:e}, scale {scale}), {ctx}"
        );
    }
}
