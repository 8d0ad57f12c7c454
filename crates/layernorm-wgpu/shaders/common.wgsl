// Shared by the row kernels: constants, the workgroup shape, and segmented tree reductions.
//
// A workgroup of WG threads is cut into segments of TPR threads (a power of two); each segment
// owns one row. TPR = WG gives one row per workgroup (large N), TPR = 1 one row per thread.
const WG: u32 = 256u;
override TPR: u32 = 256u;
// Items (of W elements) each thread keeps in registers; 0 re-reads the row from memory each pass.
override K: u32 = 0u;
const KMAX: u32 = 8u;

var<workgroup> red: array<vec4<f32>, WG>;

// Sum of `v` over the caller's segment, the same fixed tree every time (bitwise reproducible).
// Must be called by every thread of the workgroup (it contains barriers).
fn seg_sum(lid: u32, v: vec4<f32>) -> vec4<f32> {
    red[lid] = v;
    workgroupBarrier();
    for (var s = TPR / 2u; s > 0u; s = s >> 1u) {
        if ((lid % TPR) < s) {
            red[lid] = red[lid] + red[lid + s];
        }
        workgroupBarrier();
    }
    let r = red[lid - lid % TPR];
    workgroupBarrier();
    return r;
}

// Maximum of `v` over the caller's segment. Same calling rule as `seg_sum`.
fn seg_max(lid: u32, v: f32) -> f32 {
    red[lid].x = v;
    workgroupBarrier();
    for (var s = TPR / 2u; s > 0u; s = s >> 1u) {
        if ((lid % TPR) < s) {
            red[lid].x = max(red[lid].x, red[lid + s].x);
        }
        workgroupBarrier();
    }
    let r = red[lid - lid % TPR].x;
    workgroupBarrier();
    return r;
}
