//! Segment reductions with subgroups (the device has Features::SUBGROUP).
//
// WGSL does not promise how local_invocation_index maps onto subgroup lanes, so `sg_check`
// verifies at run time that every subgroup is the block of lids [k*size, (k+1)*size) with
// lane = lid % size (and that the size is a power of two); it returns the subgroup size if so, else 0, and the reductions then
// fall back to workgroup memory. With the linear mapping a segment of TPR threads is either a
// run of lanes inside one subgroup (TPR <= size: an xor butterfly, no barrier at all) or a run of
// whole subgroups (butterfly per subgroup, then the subgroups' sums in order: two barriers).
// The butterfly is symmetric, so every lane gets the same bits; the order is fixed, so results
// are reproducible run to run.

var<workgroup> wg_sgn: u32;

fn sg_check(lid: u32, lane: u32, size: u32) -> u32 {
    if (lid == 0u) {
        wg_sgn = size;
    }
    workgroupBarrier();
    // Lane 0's index must be the start of the caller's block of `size`: with distinct lanes, the
    // subgroup is then exactly the block [lid - lid % size, + size).
    let base = subgroupShuffle(lid, 0u);
    if ((size & (size - 1u)) != 0u || lane != lid % size || base != lid - lid % size) {
        wg_sgn = 0u;
    }
    return workgroupUniformLoad(&wg_sgn);
}

fn seg_sum(lid: u32, v: vec4<f32>, sgn: u32) -> vec4<f32> {
    if (sgn == 0u) {
        return seg_sum_wg(lid, v);
    }
    var r = v;
    for (var o = 1u; o < min(TPR, sgn); o = o << 1u) {
        r += subgroupShuffleXor(r, o);
    }
    if (TPR <= sgn) {
        return r;
    }
    if (lid % sgn == 0u) {
        red[lid / sgn] = r;
    }
    workgroupBarrier();
    let first = (lid - lid % TPR) / sgn;
    var t = red[first];
    for (var i = 1u; i < TPR / sgn; i++) {
        t += red[first + i];
    }
    workgroupBarrier();
    return t;
}

fn seg_sum_max(lid: u32, t: f32, m: f32, sgn: u32) -> vec2<f32> {
    if (sgn == 0u) {
        return seg_sum_max_wg(lid, t, m);
    }
    var r = vec2<f32>(t, m);
    for (var o = 1u; o < min(TPR, sgn); o = o << 1u) {
        let q = subgroupShuffleXor(r, o);
        r = vec2<f32>(r.x + q.x, max(r.y, q.y));
    }
    if (TPR <= sgn) {
        return r;
    }
    if (lid % sgn == 0u) {
        red[lid / sgn] = vec4<f32>(r, 0.0, 0.0);
    }
    workgroupBarrier();
    let first = (lid - lid % TPR) / sgn;
    var a = red[first].xy;
    for (var i = 1u; i < TPR / sgn; i++) {
        let q = red[first + i].xy;
        a = vec2<f32>(a.x + q.x, max(a.y, q.y));
    }
    workgroupBarrier();
    return a;
}
