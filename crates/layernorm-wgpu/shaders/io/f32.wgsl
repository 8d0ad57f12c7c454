//! f32 storage, one element per item (any N).
alias IN_T = f32;
alias OUT_T = f32;
alias V = f32;
const W: u32 = 1u;
fn vround(v: f32) -> f32 { return v; }
// @get
fn get_NAME(i: u32) -> f32 { return NAME[i]; }
// @put
fn put_NAME(i: u32, v: f32) { NAME[i] = v; }
