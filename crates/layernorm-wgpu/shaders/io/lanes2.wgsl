//! The compute type's helpers for two elements per item (V = vec2<f32>).
fn hsum(v: vec2<f32>) -> f32 { return v.x + v.y; }
fn vmaxabs(v: vec2<f32>) -> f32 {
    let a = abs(v);
    let b = select(vec2<f32>(inf()), a, finite2(a));
    return max(b.x, b.y);
}
fn vscale(v: vec2<f32>, e: i32) -> vec2<f32> { return sc2(v, e); }
fn vfirst(v: vec2<f32>) -> f32 { return v.x; }
