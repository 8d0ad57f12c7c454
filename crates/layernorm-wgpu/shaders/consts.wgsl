// Constants every kernel may use (placed right after the dtype prelude). naga cannot fold
// `bitcast` into a `const`, so the special values are functions.
const FMAX: f32 = 3.40282347e38;
fn inf() -> f32 { return bitcast<f32>(0x7f800000u); }
fn nan() -> f32 { return bitcast<f32>(0x7fc00000u); }
