//! The compute type's helpers for one element per item (V = f32).
fn hsum(v: f32) -> f32 { return v; }
fn vmaxabs(v: f32) -> f32 {
    let a = abs(v);
    return select(inf(), a, finite1(a));
}
fn vscale(v: f32, e: i32) -> f32 { return sc1(v, e); }
fn vfirst(v: f32) -> f32 { return v; }
