//! Constants every kernel may use (placed right after the dtype prelude). naga cannot fold
// `bitcast` into a `const`, so the special values are functions.
const FMAX: f32 = 3.40282347e38;
fn inf() -> f32 { return bitcast<f32>(0x7f800000u); }
fn nan() -> f32 { return bitcast<f32>(0x7fc00000u); }
// Finiteness by bits: float comparisons such as !(x <= FMAX) may be folded by drivers that
// assume no NaN (Mesa turns it into x > FMAX, which is false for NaN).
fn finite1(v: f32) -> bool { return (bitcast<u32>(v) & 0x7fffffffu) < 0x7f800000u; }
fn finite2(v: vec2<f32>) -> vec2<bool> {
    return (bitcast<vec2<u32>>(v) & vec2<u32>(0x7fffffffu)) < vec2<u32>(0x7f800000u);
}
fn finite4(v: vec4<f32>) -> vec4<bool> {
    return (bitcast<vec4<u32>>(v) & vec4<u32>(0x7fffffffu)) < vec4<u32>(0x7f800000u);
}

// v * 2^e by exponent arithmetic, for e chosen so that no result overflows. Results below the
// normal range (and zero or subnormal inputs) become a signed zero. This is deliberately not a
// multiplication: drivers may factor a*s + b*s into (a + b)*s (Mesa does), which overflows
// exactly where the scaling is needed.
fn sc4(v: vec4<f32>, e: i32) -> vec4<f32> {
    let b = bitcast<vec4<u32>>(v);
    let ex = vec4<i32>((b >> vec4<u32>(23u)) & vec4<u32>(0xffu));
    let ne = ex + vec4<i32>(e);
    let keep = b & vec4<u32>(0x807fffffu);
    let r = bitcast<vec4<f32>>(keep | (vec4<u32>(clamp(ne, vec4<i32>(0), vec4<i32>(254))) << vec4<u32>(23u)));
    let zero = bitcast<vec4<f32>>(b & vec4<u32>(0x80000000u));
    return select(r, zero, (ex == vec4<i32>(0)) | (ne <= vec4<i32>(0)));
}
fn sc2(v: vec2<f32>, e: i32) -> vec2<f32> { return sc4(vec4<f32>(v, 0.0, 0.0), e).xy; }
fn sc1(v: f32, e: i32) -> f32 { return sc4(vec4<f32>(v), e).x; }
