//! f16 storage (needs SHADER_F16), one element per item; arithmetic in f32.
enable f16;
alias IN_T = f16;
alias OUT_T = f16;
alias V = f32;
const W: u32 = 1u;
fn vround(v: f32) -> f32 { return f32(f16(v)); }
// @get
fn get_NAME(i: u32) -> f32 { return f32(NAME[i]); }
// @put
fn put_NAME(i: u32, v: f32) { NAME[i] = f16(v); }
