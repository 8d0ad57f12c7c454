//! LayerNorm backward, row part: dx = rstd * (g - c2 - xhat * c1) with g = dy * gamma,
// c1 = mean(g * xhat), c2 = mean(g), one row at a time per segment of TPR threads.
//
// The saved f32 mean is not trusted to full precision: with e = (x - mean_saved) * rstd, the
// residual lo = mean(e) is recomputed here and xhat = e - lo, so rows whose mean is much larger
// than their spread (mean 1e6, std 1) keep an accurate xhat. One reduction gives sum(e),
// sum(g * e) and sum(g); then sum(g * xhat) = sum(g * e) - lo * sum(g). Everything stays O(|xhat|),
// so nothing overflows for |x| up to f32 max.
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
    flags: u32,     // bit 0: gamma present; bit 1: write partials (fused stage 1)
    rps: u32,       // rows per segment
    groups_x: u32,
    part0: u32,     // index of this dispatch's first partial
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<IN_T>;
@group(0) @binding(2) var<storage, read> dy: array<IN_T>;
@group(0) @binding(3) var<storage, read> gamma: array<IN_T>;
@group(0) @binding(4) var<storage, read> mean: array<f32>;
@group(0) @binding(5) var<storage, read> rstd: array<f32>;
@group(0) @binding(6) var<storage, read_write> dx: array<OUT_T>;
@group(0) @binding(7) var<storage, read_write> lo_out: array<f32>;
@group(0) @binding(8) var<storage, read_write> part_g: array<V>;
@group(0) @binding(9) var<storage, read_write> part_b: array<V>;

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
    let has_g = (p.flags & 1u) != 0u;
    let fused = K > 0u && (p.flags & 2u) != 0u;
    var ce: array<V, KMAX>;
    var cdy: array<V, KMAX>;
    var pg: array<V, KMAX>;
    var pb: array<V, KMAX>;

    for (var it = 0u; it < p.rps; it++) {
        let row = seg * p.rps + it;
        let live = row < p.rows;
        let base = row * p.nv;
        var mu = 0.0;
        var rs = 0.0;
        if (live) {
            mu = mean[row];
            rs = rstd[row];
        }
        // e = (x - mu) * rs, formed as ((x - mu) * 2^re) * rm with rs = rm * 2^re: a driver that
        // factors the sums of e into (sum of (x - mu)) * rs would overflow for |x| near f32 max;
        // factored this way, the partial sums stay O(|xhat|). See sc4 in consts.wgsl.
        var rm = rs;
        var re = 0i;
        if (finite1(rs) && rs != 0.0) {
            let fr = frexp(rs);
            rm = fr.fract;
            re = fr.exp;
        }

        var a = vec4<f32>(0.0);
        if (live) {
            if (K > 0u) {
                for (var k = 0u; k < K; k++) {
                    let j = lane + k * TPR;
                    if (j < p.nv) {
                        let e = vscale(get_x(base + j) - V(mu), re) * rm;
                        let d = get_dy(base + j);
                        var g = d;
                        if (has_g) { g = g * get_gamma(j); }
                        ce[k] = e;
                        cdy[k] = d;
                        a += vec4<f32>(hsum(e), hsum(g * e), hsum(g), 0.0);
                    }
                }
            } else {
                for (var j = lane; j < p.nv; j += TPR) {
                    let e = vscale(get_x(base + j) - V(mu), re) * rm;
                    var g = get_dy(base + j);
                    if (has_g) { g = g * get_gamma(j); }
                    a += vec4<f32>(hsum(e), hsum(g * e), hsum(g), 0.0);
                }
            }
        }
        let r = seg_sum(lid, a, sgn);
        let lo = r.x / nf;
        let c1 = (r.y - lo * r.z) / nf;
        let c2 = r.z / nf;
        if (live && lane == 0u) {
            lo_out[row] = lo;
        }

        if (live) {
            if (K > 0u) {
                for (var k = 0u; k < K; k++) {
                    let j = lane + k * TPR;
                    if (j < p.nv) {
                        let xhat = ce[k] - V(lo);
                        var g = cdy[k];
                        if (has_g) { g = g * get_gamma(j); }
                        put_dx(base + j, (g - V(c2) - xhat * c1) * rs);
                        pg[k] += cdy[k] * xhat;
                        pb[k] += cdy[k];
                    }
                }
            } else {
                for (var j = lane; j < p.nv; j += TPR) {
                    let xhat = vscale(get_x(base + j) - V(mu), re) * rm - V(lo);
                    var g = get_dy(base + j);
                    if (has_g) { g = g * get_gamma(j); }
                    put_dx(base + j, (g - V(c2) - xhat * c1) * rs);
                }
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
