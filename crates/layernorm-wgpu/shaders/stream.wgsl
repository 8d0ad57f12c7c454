//! The streamed-row driver of the row kernels (see common.wgsl), included where K = 0.
//
// Rows too long to cache in registers (K = 0) are streamed: every pass reads the row from
// memory, and `stream(step, lane)` runs the kernel's `s_item(step, s_base + j, j)` over the
// thread's items j = lane, lane + TPR, ... < nv of the row at `s_base`, UNROLL per loop
// iteration: 16, or 32 (`Shape::for_items` in src/kernels.rs). llvmpipe (lavapipe, and Mesa's
// GL driver) ends all of an invocation's loops after 65535 iterations in total, silently; 16
// items an iteration keep the forward's four passes within it up to rows of 66 056 192 items,
// 32 for every row a binding can hold. The copies of `s_item` are most of a streamed pipeline's
// code, and llvmpipe's compile time grows faster than their number (about 3× at 32 against 16:
// docs/backends/wgpu.md), so the wider driver is built only for the rows that need it. Both
// visit the items in the same order.
const UNROLL: u32 = /*UNROLL*/u;
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
        /*WIDE*/
    }
}
