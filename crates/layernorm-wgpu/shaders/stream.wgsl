//! The streamed-row driver of the row kernels (see common.wgsl), included where K = 0.
//
// Rows too long to cache in registers (K = 0) are streamed: every pass reads the row from
// memory, and `stream(step, lane)` runs the kernel's `s_item(step, s_base + j, j)` over the
// thread's items j = lane, lane + TPR, ... < nv of the row at `s_base`, UNROLL per loop
// iteration. llvmpipe (lavapipe, and Mesa's GL driver) ends all of an invocation's loops after
// 65535 iterations in total; 32 items an iteration keep four passes over a row of 2^26
// elements (its largest binding: 2^18 items a thread) at 32768.
const UNROLL: u32 = 32u;
var<private> s_base: u32;

fn s_at(step: u32, j: u32) {
    if (j < p.nv) {
        s_item(step, s_base + j, j);
    }
}

fn s_item4(step: u32, j: u32) {
    s_at(step, j);
    s_at(step, j + TPR);
    s_at(step, j + 2u * TPR);
    s_at(step, j + 3u * TPR);
}

fn s_item16(step: u32, j: u32) {
    s_item4(step, j);
    s_item4(step, j + 4u * TPR);
    s_item4(step, j + 8u * TPR);
    s_item4(step, j + 12u * TPR);
}

fn stream(step: u32, lane: u32) {
    acc_reset();
    for (var j = lane; j < p.nv; j += UNROLL * TPR) {
        s_item16(step, j);
        s_item16(step, j + 16u * TPR);
    }
}
