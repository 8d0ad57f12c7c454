//! Constants every kernel may use (placed right after the dtype prelude). naga cannot fold
// `bitcast` into a `const`, so the special values are functions.

// Bits of every kernel's `flags` word (the same numbers as `Flags` in src/kernels.rs): the
// kind and the variants are run-time constants of one source per kernel family.
const F_GAMMA: u32 = 1u;          // γ present
const F_BETA: u32 = 2u;           // β present
const F_RMS: u32 = 4u;            // RMSNorm: no mean is subtracted, none is saved
const F_RES_ADD: u32 = 8u;        // forward: h = x + residual (read from `res`), written to `h`
const F_RES_IN_PLACE: u32 = 16u;  // forward: h = x + h, over the residual held in `h`
const F_FROM_Y: u32 = 32u;        // backward: xhat = (y - beta) / (offset + gamma)
const F_DH: u32 = 64u;            // backward: dx += dh
const F_PARTIALS: u32 = 128u;     // backward: write the dgamma/dbeta partials (fused stage 1)
const F_DGAMMA: u32 = 256u;       // dgamma/dbeta stage 2: write dgamma
const F_DBETA: u32 = 512u;        // dgamma/dbeta stage 2: write dbeta
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

// bf16 from its bits, and f32 to bf16 bits rounded to nearest even (NaN stays a quiet NaN).
fn bf16_to_f32(bits: u32) -> f32 { return bitcast<f32>(bits << 16u); }
fn f32_to_bf16(v: f32) -> u32 {
    let u = bitcast<u32>(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { return (u >> 16u) | 0x40u; }
    return (u + 0x7fffu + ((u >> 16u) & 1u)) >> 16u;
}

// v * 2^e by exponent arithmetic, for e chosen so that no result overflows. Results below the
// normal range (and zero or subnormal inputs) become a signed zero; NaN and infinities stay
// what they are (a poisoned input must poison its row). This is deliberately not a
// multiplication: drivers may factor a*s + b*s into (a + b)*s (Mesa does), which overflows
// exactly where the scaling is needed.
fn sc4(v: vec4<f32>, e: i32) -> vec4<f32> {
    let b = bitcast<vec4<u32>>(v);
    let ex = vec4<i32>((b >> vec4<u32>(23u)) & vec4<u32>(0xffu));
    let ne = ex + vec4<i32>(e);
    let keep = b & vec4<u32>(0x807fffffu);
    let r = bitcast<vec4<f32>>(keep | (vec4<u32>(clamp(ne, vec4<i32>(0), vec4<i32>(254))) << vec4<u32>(23u)));
    let zero = bitcast<vec4<f32>>(b & vec4<u32>(0x80000000u));
    return select(select(r, zero, (ex == vec4<i32>(0)) | (ne <= vec4<i32>(0))), v, ex == vec4<i32>(255));
}
fn sc2(v: vec2<f32>, e: i32) -> vec2<f32> { return sc4(vec4<f32>(v, 0.0, 0.0), e).xy; }
fn sc1(v: f32, e: i32) -> f32 { return sc4(vec4<f32>(v), e).x; }

// v * 2^e for the few per-row scalars, with e kept where WGSL defines ldexp (a result below the
// normal range may be zero).
fn ldx(v: f32, e: i32) -> f32 { return ldexp(v, min(e, 127)); }

// The row's 1/sqrt(var + eps) and that times 2^-se (the factor for values scaled by 2^se), from
// the variance of the scaled values var_s = var * 2^(2 se) and eps = eps_m * 2^eps_e, eps_m in
// [0.5, 1) (frexp's form). Both terms are brought to a common even exponent first, so neither
// var (which can overflow f32 where |x| is near its maximum) nor eps (which may lie anywhere in
// f64's range) is ever formed; an eps that dwarfs the variance gives rstd = 1/sqrt(eps) correctly rounded, or
// 0 where that is below f32's range.
fn rstd_pair(var_s: f32, se: i32, eps_m: f32, eps_e: i32) -> vec2<f32> {
    var e = eps_e;
    if (var_s > 0.0) {
        e = max(e, frexp(var_s).exp - 2 * se);
    }
    e += e & 1; // even, so that sqrt(2^e) is a power of two
    var t = ldx(eps_m, eps_e - e);
    if (var_s > 0.0) {
        t += ldx(var_s, -2 * se - e);
    }
    let q = inverseSqrt(t); // t in [1/4, 2): q in (0.7, 2]
    return vec2<f32>(ldx(q, -e / 2), ldx(q, -e / 2 - se));
}
