//! f16 storage read and written as vec4<f16> (N divisible by 4); arithmetic in f32.
enable f16;
alias IN_T = vec4<f16>;
alias OUT_T = vec4<f16>;
alias V = vec4<f32>;
const W: u32 = 4u;
fn vround(v: vec4<f32>) -> vec4<f32> { return vec4<f32>(vec4<f16>(v)); }
// @get
fn get_NAME(i: u32) -> vec4<f32> { return vec4<f32>(NAME[i]); }
// @put
fn put_NAME(i: u32, v: vec4<f32>) { NAME[i] = vec4<f16>(v); }
