//! bf16 storage packed two per u32 (low half first), one element per item (any N). Two rows can
// share a word when N is odd, so stores are atomic read-modify-writes of the element's own half.
alias IN_T = u32;
alias OUT_T = atomic<u32>;
alias V = f32;
const W: u32 = 1u;
fn vround(v: f32) -> f32 { return bf16_to_f32(f32_to_bf16(v)); }
// @get
fn get_NAME(i: u32) -> f32 { return bf16_to_f32((NAME[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu); }
// @load
fn load_NAME(i: u32) -> f32 {
    return bf16_to_f32((atomicLoad(&NAME[i >> 1u]) >> ((i & 1u) * 16u)) & 0xffffu);
}
// @put
fn put_NAME(i: u32, v: f32) {
    let sh = (i & 1u) * 16u;
    atomicAnd(&NAME[i >> 1u], ~(0xffffu << sh));
    atomicOr(&NAME[i >> 1u], f32_to_bf16(v) << sh);
}
