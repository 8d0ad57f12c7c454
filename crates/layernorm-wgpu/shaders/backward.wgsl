//! Backward of the family, row part: dx = rstd * (g - c2 - xhat * c1) (+ dh with F_DH), with
// g = dy * (offset + gamma), c1 = mean(g * xhat), c2 = mean(g) (LayerNorm) or 0 (F_RMS), one row
// at a time per segment of TPR threads. xhat comes from the saved tensor `x` (see xhat.wgsl):
// the forward's input (LayerNorm: x - mean, RMSNorm: x, times rstd) or, with F_FROM_Y, its
// output: (y - beta) / (offset + gamma).
//
// LayerNorm from x does not trust the saved f32 mean to full precision: with e = (x - mean) * rstd,
// the residual lo = mean(e) is recomputed here and xhat = e - lo, so rows whose mean is much
// larger than their spread (mean 1e6, std 1) keep an accurate xhat. One reduction gives sum(e),
// sum(g * e) and sum(g); then sum(g * xhat) = sum(g * e) - lo * sum(g). Everything stays
// O(|xhat|), so nothing overflows for |x| up to f32 max. Elsewhere lo = 0.
//
// Each segment handles `rps` consecutive rows. When the row is cached in registers (K > 0) and
// dgamma/dbeta are wanted, every thread also adds dy * xhat and dy for its own columns over those
// rows, in row order, and writes one partial per segment and column (stage 1 of the dgamma/dbeta
// reduction, fused here so x and dy are read once; params_finish.wgsl is stage 2). Otherwise lo is
// written to `lo_out` and params_grad.wgsl computes the partials in a separate pass.

struct Params {
    rows: u32,      // rows in this dispatch
    nv: u32,        // items per row
    n: u32,         // elements per row
    flags: u32,     // F_GAMMA, F_BETA, F_RMS, F_FROM_Y, F_DH, F_PARTIALS
    rps: u32,       // rows per segment
    groups_x: u32,
    part0: u32,     // index of this dispatch's first partial
    offset: f32,    // gamma offset
}

@group(0) @binding(0) var<uniform> p: Params;
// Bindings 1-6 (the saved tensor x or y, dy, gamma, beta, mean, rstd): xhat.wgsl.
@group(0) @binding(7) var<storage, read> dh: array<IN_T>;
@group(0) @binding(8) var<storage, read_write> dx: array<OUT_T>;
@group(0) @binding(9) var<storage, read_write> lo_out: array<f32>;
@group(0) @binding(10) var<storage, read_write> part_g: array<V>;
@group(0) @binding(11) var<storage, read_write> part_b: array<V>;

// dx of one item from g, xhat and the row's c1, c2 and rstd, plus dh with F_DH.
fn dx_value(g: V, xhat: V, c1: f32, c2: f32, rs: f32, i: u32) -> V {
    var v = (g - V(c2) - xhat * c1) * rs;
    if ((p.flags & F_DH) != 0u) {
        v = v + get_dh(i);
    }
    return v;
}

// The row as the streamed passes see it (see `stream` in common.wgsl).
const S_SUMS: u32 = 0u;  // sum(e), sum(g * e), sum(g)
const S_DX: u32 = 1u;    // dx
var<private> s_xr: XRow;
var<private> s_lo: f32;
var<private> s_c1: f32;
var<private> s_c2: f32;

fn s_item(step: u32, i: u32, j: u32) {
    let e = xhat_raw(p.flags, p.offset, s_xr, get_x(i), j);
    let g = get_dy(i) * gamma_eff(p.flags, p.offset, j);
    if (step == S_SUMS) {
        acc_add(vec4<f32>(hsum(e), hsum(g * e), hsum(g), 0.0));
    } else {
        put_dx(i, dx_value(g, e - V(s_lo), s_c1, s_c2, s_xr.rs, i));
    }
}

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    /*SG_ARGS*/
) {
    let sgn = /*SG_CHECK*/;
    let lane = lid % TPR;
    let seg = (wid.y * p.groups_x + wid.x) * (WG / TPR) + lid / TPR;
    let nf = f32(p.n);
    let centred = (p.flags & F_RMS) == 0u;
    let fused = K > 0u && (p.flags & F_PARTIALS) != 0u;
    var ce: array<V, KMAX>;
    var cdy: array<V, KMAX>;
    var pg: array<V, KMAX>;
    var pb: array<V, KMAX>;

    for (var it = 0u; it < p.rps; it++) {
        let row = seg * p.rps + it;
        let live = row < p.rows;
        let base = row * p.nv;
        var xr = XRow(0.0, 0.0, 0.0, 0);
        if (live) {
            var mu = 0.0;
            if (reads_mean(p.flags)) {
                mu = mean[row];
            }
            xr = xrow(mu, rstd[row]);
        }
        s_base = base;
        s_xr = xr;

        var a = vec4<f32>(0.0);
        if (live) {
            if (K > 0u) {
                for (var k = 0u; k < K; k++) {
                    let j = lane + k * TPR;
                    if (j < p.nv) {
                        let e = xhat_raw(p.flags, p.offset, xr, get_x(base + j), j);
                        let d = get_dy(base + j);
                        let g = d * gamma_eff(p.flags, p.offset, j);
                        ce[k] = e;
                        cdy[k] = d;
                        a += vec4<f32>(hsum(e), hsum(g * e), hsum(g), 0.0);
                    }
                }
            } else {
                stream(S_SUMS, lane);
                a = acc_sum();
            }
        }
        let r = seg_sum(lid, a, sgn);
        var lo = 0.0;
        if (reads_mean(p.flags)) {
            lo = r.x / nf;
        }
        let c1 = (r.y - lo * r.z) / nf;
        var c2 = 0.0;
        if (centred) {
            c2 = r.z / nf;
        }
        if (live && lane == 0u) {
            lo_out[row] = lo;
        }

        if (live) {
            if (K > 0u) {
                for (var k = 0u; k < K; k++) {
                    let j = lane + k * TPR;
                    if (j < p.nv) {
                        let xhat = ce[k] - V(lo);
                        let g = cdy[k] * gamma_eff(p.flags, p.offset, j);
                        put_dx(base + j, dx_value(g, xhat, c1, c2, xr.rs, base + j));
                        pg[k] += cdy[k] * xhat;
                        pb[k] += cdy[k];
                    }
                }
            } else {
                s_lo = lo;
                s_c1 = c1;
                s_c2 = c2;
                stream(S_DX, lane);
            }
        }
    }

    if (fused && seg * p.rps < p.rows) {
        let o = (p.part0 + seg) * p.nv;
        for (var k = 0u; k < K; k++) {
            let j = lane + k * TPR;
            if (j < p.nv) {
                part_g[o + j] = pg[k];
                part_b[o + j] = pb[k];
            }
        }
    }
}
