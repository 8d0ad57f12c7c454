//! bf16 storage packed two per u32 (low half first), read and written a word at a time (N even, so
// no word is shared between rows).
alias IN_T = u32;
alias OUT_T = u32;
alias V = vec2<f32>;
const W: u32 = 2u;
fn vround(v: vec2<f32>) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(f32_to_bf16(v.x) << 16u), bitcast<f32>(f32_to_bf16(v.y) << 16u));
}
// @get
fn get_NAME(i: u32) -> vec2<f32> {
    let w = NAME[i];
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}
// @put
fn put_NAME(i: u32, v: vec2<f32>) { NAME[i] = f32_to_bf16(v.x) | (f32_to_bf16(v.y) << 16u); }
