//! Shared by the row kernels: the workgroup shape and the workgroup-memory segment reductions.
//
// A workgroup of WG threads is cut into segments of TPR threads (a power of two); each segment
// owns one row. TPR = WG gives one row per workgroup (large N), TPR = 1 one row per thread.
const WG: u32 = 256u;
override TPR: u32 = 256u;
// Items (of W elements) each thread keeps in registers; 0 re-reads the row from memory each pass.
override K: u32 = 0u;
const KMAX: u32 = 8u;

var<workgroup> red: array<vec4<f32>, WG>;

// A thread's running sums over a streamed row (thousands of items per thread): terms go into
// l0, which is folded into l1 every 16 terms, l1 into l2 every 256 and l2 into l3 every 4096,
// so each term takes part in at most 16 + 16 + 16 + n/4096 roundings instead of n. Compilers
// cannot reassociate it (the folds are loop-carried), unlike compensated (Kahan) sums, which
// rewriting drivers reduce to plain ones.
struct Acc {
    l0: vec4<f32>,
    l1: vec4<f32>,
    l2: vec4<f32>,
    l3: vec4<f32>,
    n: u32,
}

var<private> acc: Acc;

fn acc_reset() {
    acc = Acc(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), 0u);
}

fn acc_add(v: vec4<f32>) {
    acc.l0 += v;
    acc.n += 1u;
    if ((acc.n & 15u) == 0u) {
        acc.l1 += acc.l0;
        acc.l0 = vec4<f32>(0.0);
        if ((acc.n & 255u) == 0u) {
            acc.l2 += acc.l1;
            acc.l1 = vec4<f32>(0.0);
            if ((acc.n & 4095u) == 0u) {
                acc.l3 += acc.l2;
                acc.l2 = vec4<f32>(0.0);
            }
        }
    }
}

fn acc_sum() -> vec4<f32> {
    return acc.l3 + (acc.l2 + (acc.l1 + acc.l0));
}

var<workgroup> wg_flag: u32;

// Reductions over a segment go FAN slots at a time: each level, the first thread of every
// group of FAN (at the current stride) adds its group's slots in order. A 256-thread segment
// takes two levels (four barriers in all) instead of the eight levels of a pairwise tree; the
// order is fixed, so results are bitwise reproducible.
const FAN: u32 = 16u;

// Sum of `v` over the caller's segment, in workgroup memory. Must be called by every thread of
// the workgroup (it contains barriers).
fn seg_sum_wg(lid: u32, v: vec4<f32>) -> vec4<f32> {
    red[lid] = v;
    workgroupBarrier();
    let lane = lid % TPR;
    for (var stride = 1u; stride < TPR; stride *= FAN) {
        let span = min(FAN, TPR / stride);
        if (lane % (stride * span) == 0u) {
            var acc = red[lid];
            for (var i = 1u; i < span; i++) {
                acc += red[lid + i * stride];
            }
            red[lid] = acc;
        }
        workgroupBarrier();
    }
    let r = red[lid - lane];
    workgroupBarrier();
    return r;
}

// (sum of `t`, maximum of `m`) over the caller's segment. Same calling rule as `seg_sum_wg`.
fn seg_sum_max_wg(lid: u32, t: f32, m: f32) -> vec2<f32> {
    red[lid] = vec4<f32>(t, m, 0.0, 0.0);
    workgroupBarrier();
    let lane = lid % TPR;
    for (var stride = 1u; stride < TPR; stride *= FAN) {
        let span = min(FAN, TPR / stride);
        if (lane % (stride * span) == 0u) {
            var acc = red[lid].xy;
            for (var i = 1u; i < span; i++) {
                let o = red[lid + i * stride].xy;
                acc = vec2<f32>(acc.x + o.x, max(acc.y, o.y));
            }
            red[lid] = vec4<f32>(acc, 0.0, 0.0);
        }
        workgroupBarrier();
    }
    let r = red[lid - lane].xy;
    workgroupBarrier();
    return r;
}
