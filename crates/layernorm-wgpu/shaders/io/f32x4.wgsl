//! f32 storage read and written as vec4 (N divisible by 4, so every row starts 16-byte aligned).
alias IN_T = vec4<f32>;
alias OUT_T = vec4<f32>;
alias V = vec4<f32>;
const W: u32 = 4u;
fn hsum(v: vec4<f32>) -> f32 { return (v.x + v.y) + (v.z + v.w); }
fn vmaxabs(v: vec4<f32>) -> f32 {
    let a = abs(v);
    let b = select(vec4<f32>(inf()), a, finite4(a));
    return max(max(b.x, b.y), max(b.z, b.w));
}
fn vscale(v: vec4<f32>, e: i32) -> vec4<f32> { return sc4(v, e); }
fn vround(v: vec4<f32>) -> vec4<f32> { return v; }
fn vfirst(v: vec4<f32>) -> f32 { return v.x; }
// @get
fn get_NAME(i: u32) -> vec4<f32> { return NAME[i]; }
// @put
fn put_NAME(i: u32, v: vec4<f32>) { NAME[i] = v; }
