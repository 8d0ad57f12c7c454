//! The compute type's helpers for four elements per item (V = vec4<f32>).
fn hsum(v: vec4<f32>) -> f32 { return (v.x + v.y) + (v.z + v.w); }
fn vmaxabs(v: vec4<f32>) -> f32 {
    let a = abs(v);
    let b = select(vec4<f32>(inf()), a, finite4(a));
    return max(max(b.x, b.y), max(b.z, b.w));
}
fn vscale(v: vec4<f32>, e: i32) -> vec4<f32> { return sc4(v, e); }
fn vfirst(v: vec4<f32>) -> f32 { return v.x; }
