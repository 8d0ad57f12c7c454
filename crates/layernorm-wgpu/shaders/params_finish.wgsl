//! Stage 2 of the dgamma/dbeta reduction: see params_grad.wgsl.

struct Params {
    n: u32,          // columns
    parts: u32,      // total blocks
    flags: u32,      // F_DGAMMA, F_DBETA
    groups_x: u32,
}

const CW: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> part_g: array<f32>;
@group(0) @binding(2) var<storage, read> part_b: array<f32>;
@group(0) @binding(3) var<storage, read_write> dgamma: array<OUT_T>;
@group(0) @binding(4) var<storage, read_write> dbeta: array<OUT_T>;

@compute @workgroup_size(CW)
fn finish(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    for (var j = wid.x * CW + lid; j < p.n; j += p.groups_x * CW) {
        var tg = 0.0;
        var tb = 0.0;
        for (var q0 = 0u; q0 < p.parts; q0 += 64u) {
            var sg = 0.0;
            var sb = 0.0;
            for (var q = q0; q < min(q0 + 64u, p.parts); q++) {
                sg += part_g[q * p.n + j];
                sb += part_b[q * p.n + j];
            }
            tg += sg;
            tb += sb;
        }
        if ((p.flags & F_DGAMMA) != 0u) { put_dgamma(j, tg); }
        if ((p.flags & F_DBETA) != 0u) { put_dbeta(j, tb); }
    }
}
