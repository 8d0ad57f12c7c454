//! dgamma = sum over rows of dy * xhat, dbeta = sum over rows of dy, in two fixed-order stages
// (no float atomics, so the result is bitwise identical run to run).
//
// Stage 1 (`partials`): thread = column j, workgroup y = a block of `chunk` consecutive rows;
// each thread adds its rows in order and writes one f32 partial per (block, column).
// Stage 2 (`finish`, params_finish.wgsl): thread = column j; adds the partials of all blocks in
// order, in runs of 64 (two-level, to keep the rounding error small), and stores in the dtype.
// xhat is recomputed exactly as the row kernel does (xhat.wgsl), minus the row's lo.

struct Params {
    rows: u32,       // rows in this dispatch
    n: u32,          // columns (elements per row)
    chunk: u32,      // rows per block
    part0: u32,      // index of this dispatch's first block in the partial buffers
    flags: u32,      // F_GAMMA, F_BETA, F_RMS, F_FROM_Y
    offset: f32,     // gamma offset
    groups_x: u32,   // workgroups along x
    _pad: u32,
}

const CW: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
// Bindings 1-6 (the saved tensor x or y, dy, gamma, beta, mean, rstd): xhat.wgsl.
@group(0) @binding(7) var<storage, read> lo: array<f32>;
@group(0) @binding(8) var<storage, read_write> part_g: array<f32>;
@group(0) @binding(9) var<storage, read_write> part_b: array<f32>;

@compute @workgroup_size(CW)
fn partials(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let r0 = wid.y * p.chunk;
    let r1 = min(r0 + p.chunk, p.rows);
    for (var j = wid.x * CW + lid; j < p.n; j += p.groups_x * CW) {
        var sg = 0.0;
        var sb = 0.0;
        for (var r = r0; r < r1; r++) {
            var mu = 0.0;
            if (reads_mean(p.flags)) {
                mu = mean[r];
            }
            let xr = xrow(mu, rstd[r]);
            let d = get_dy(r * p.n + j);
            let xhat = xhat_raw(p.flags, p.offset, xr, get_x(r * p.n + j), j) - lo[r];
            sg += d * xhat;
            sb += d;
        }
        let o = (p.part0 + wid.y) * p.n + j;
        part_g[o] = sg;
        part_b[o] = sb;
    }
}
