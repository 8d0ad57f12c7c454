//! Segment reductions without subgroups: the workgroup-memory ones of common.wgsl. `sgn` (the
// subgroup size when subgroups are usable, here always 0) keeps one signature for both variants.
fn seg_sum(lid: u32, v: vec4<f32>, sgn: u32) -> vec4<f32> {
    return seg_sum_wg(lid, v);
}
fn seg_sum_max(lid: u32, t: f32, m: f32, sgn: u32) -> vec2<f32> {
    return seg_sum_max_wg(lid, t, m);
}
