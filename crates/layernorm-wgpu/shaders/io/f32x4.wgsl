//! f32 storage read and written as vec4 (N divisible by 4, so every row starts 16-byte aligned).
alias IN_T = vec4<f32>;
alias OUT_T = vec4<f32>;
alias V = vec4<f32>;
const W: u32 = 4u;
fn vround(v: vec4<f32>) -> vec4<f32> { return v; }
// @get
fn get_NAME(i: u32) -> vec4<f32> { return NAME[i]; }
// @put
fn put_NAME(i: u32, v: vec4<f32>) { NAME[i] = v; }
