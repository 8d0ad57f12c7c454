//! Deterministic, normal-ish data for the tests and the bench: no RNG, the same values on every
//! machine.

/// `len` values in [-1.5, 1.5) from an xorshift sequence seeded by `seed`.
pub fn data(len: usize, seed: u32) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9e37_79b9) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f64 / u32::MAX as f64 - 0.5) * 3.0
        })
        .collect()
}
