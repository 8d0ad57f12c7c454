//! Forward of the family, one row per segment of TPR threads: LayerNorm
// y = (x - mean) * rstd * (offset + gamma) + beta, or RMSNorm
// y = x * rstd * (offset + gamma) + beta (flag F_RMS: no mean is subtracted or saved), of x or of
// h = x + residual (F_RES_ADD, F_RES_IN_PLACE: h rounded once to the storage dtype, written out,
// and normalized).
//
// Statistics, per row, all in f32:
//   1. m = max |x| (a non-finite element makes m = +inf), and s = 2^se with m*s in [0.5, 1),
//      so that squares of scaled values can neither overflow nor flush for |x| up to f32 max;
//      in the same reduction (LayerNorm), a first mean estimate mu0 = (x0 + sum(x - x0) / N) * s,
//      shifted by the row's first element x0 so that the sum is of the row's spread, not of its
//      mean (rows whose shifted sum overflows or that sum in subnormals redo it scaled);
//   3. residuals d = x*s - mu0 (RMSNorm: mu0 = 0, d = x*s): their mean corrects mu0
//      (mu = mu0 + sum(d)/N) and the variance is sum(d^2)/N - (sum(d)/N)^2, where the subtracted
//      term is tiny: this is the two-pass variance, exact for constant rows and accurate when
//      |mean| >> std. RMSNorm's mean square is sum((x*s)^2)/N, with no mean.
// y uses (x*s - mu0) - lo, never the rounded mean: with mean 1e4 and std 1, rounding the mean to
// f32 alone would move every xhat by up to 5e-4. Streamed rows sum through `Acc` (common.wgsl).
// The prelude (shaders/io/*.wgsl) supplies IN_T/OUT_T/V/W and get_*/put_*/load_* for the dtype.

struct Params {
    rows: u32,      // rows in this dispatch
    nv: u32,        // items (of W elements) per row
    n: u32,         // elements per row
    flags: u32,     // F_GAMMA, F_BETA, F_RMS, F_RES_ADD, F_RES_IN_PLACE
    eps_m: f32,     // eps = eps_m * 2^eps_e, eps_m in [0.5, 1)
    eps_e: i32,
    groups_x: u32,  // workgroups along x of the (possibly 2-D) grid
    offset: f32,    // gamma offset: y scales by offset + gamma
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<IN_T>;
@group(0) @binding(2) var<storage, read> gamma: array<IN_T>;
@group(0) @binding(3) var<storage, read> beta: array<IN_T>;
@group(0) @binding(4) var<storage, read_write> y: array<OUT_T>;
@group(0) @binding(5) var<storage, read_write> mean: array<f32>;
@group(0) @binding(6) var<storage, read_write> rstd: array<f32>;
@group(0) @binding(7) var<storage, read> res: array<IN_T>;
@group(0) @binding(8) var<storage, read_write> h: array<OUT_T>;

// The normalized input at item i: x, or h = x + residual rounded to the storage dtype.
fn input(i: u32) -> V {
    let v = get_x(i);
    if ((p.flags & F_RES_ADD) != 0u) {
        return vround(v + get_res(i));
    }
    if ((p.flags & F_RES_IN_PLACE) != 0u) {
        return vround(v + load_h(i));
    }
    return v;
}

// The first read of item i: its input, with h written out.
fn first_read(i: u32) -> V {
    let v = input(i);
    if ((p.flags & (F_RES_ADD | F_RES_IN_PLACE)) != 0u) {
        put_h(i, v);
    }
    return v;
}

// Item i again after the first read (streamed rows): x, or the h written then.
fn reread(i: u32) -> V {
    if ((p.flags & (F_RES_ADD | F_RES_IN_PLACE)) != 0u) {
        return load_h(i);
    }
    return get_x(i);
}

// y of item j from its normalized value: times offset + gamma, plus beta.
fn affine(v: V, j: u32) -> V {
    var r = v;
    if ((p.flags & F_GAMMA) != 0u) {
        r = r * (V(p.offset) + get_gamma(j));
    }
    if ((p.flags & F_BETA) != 0u) {
        r = r + get_beta(j);
    }
    return r;
}

// The row as the streamed passes see it (see `stream` in common.wgsl).
const S_MAX_SUM: u32 = 0u;     // pass 1: max |x| and sum(x - x0)
const S_SCALED_SUM: u32 = 1u;  // pass 2 (rare): sum(x*s - x0*s)
const S_RESIDUALS: u32 = 2u;   // pass 3: sum(d), sum(d^2)
const S_Y: u32 = 3u;           // pass 4: y
var<private> s_m: f32;
var<private> s_x0: f32;
var<private> s_se: i32;
var<private> s_x0s: f32;
var<private> s_mu0: f32;
var<private> s_lo: f32;
var<private> s_k: f32;

fn s_item(step: u32, i: u32, j: u32) {
    switch step {
        case S_MAX_SUM: {
            let v = first_read(i);
            s_m = max(s_m, vmaxabs(v));
            acc_add(vec4<f32>(hsum(v - V(s_x0)), 0.0, 0.0, 0.0));
        }
        case S_SCALED_SUM: {
            acc_add(vec4<f32>(hsum(vscale(reread(i), s_se) - V(s_x0s)), 0.0, 0.0, 0.0));
        }
        case S_RESIDUALS: {
            let d = vscale(reread(i), s_se) - V(s_mu0);
            acc_add(vec4<f32>(hsum(d), hsum(d * d), 0.0, 0.0));
        }
        default: {
            put_y(i, affine(((vscale(reread(i), s_se) - V(s_mu0)) - V(s_lo)) * s_k, j));
        }
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
    let row = (wid.y * p.groups_x + wid.x) * (WG / TPR) + lid / TPR;
    let live = row < p.rows;
    let base = row * p.nv;
    let nf = f32(p.n);
    let rms = (p.flags & F_RMS) != 0u;
    var c: array<V, KMAX>;
    s_base = base;

    // The shift: the row's first element (every thread of the segment reads it). In place, h
    // overwrites the residual it is read from, so every thread has its x0 before any writes.
    var x0 = 0.0;
    if (live && !rms) {
        x0 = vfirst(input(base));
    }
    if ((p.flags & F_RES_IN_PLACE) != 0u) {
        workgroupBarrier();
    }
    s_x0 = x0;

    // Pass 1: max |x| and sum(x - x0), in one reduction.
    var m = 0.0;
    var t = 0.0;
    if (live) {
        if (K > 0u) {
            for (var k = 0u; k < K; k++) {
                let j = lane + k * TPR;
                if (j < p.nv) {
                    c[k] = first_read(base + j);
                    m = max(m, vmaxabs(c[k]));
                    t += hsum(c[k] - V(x0));
                }
            }
        } else {
            s_m = 0.0;
            stream(S_MAX_SUM, lane);
            m = s_m;
            t = acc_sum().x;
        }
    }
    let sm = seg_sum_max(lid, t, m, sgn);
    m = sm.y;
    let finite = finite1(m);
    // Element scaling goes through vscale (exponent arithmetic), never a multiplication: see sc4.
    var se = 0i;
    if (finite && m > 0.0) {
        se = clamp(-frexp(m).exp, -126, 126);
    }
    s_se = se;
    // First estimate of the scaled mean. The unscaled shifted sum is exact enough unless it
    // overflowed (|x| near f32 max) or the row is so small that it sums in subnormals; then
    // (rarely, and for the whole workgroup so that barriers stay uniform) sum x*s - x0*s in a
    // second pass. RMSNorm has no mean: mu0 = 0.
    let x0s = sc1(x0, se);
    s_x0s = x0s;
    var mu0 = 0.0;
    if (!rms) {
        mu0 = x0s + ldx(sm.x / nf, se);
    }
    if (lane == 0u) {
        wg_flag = 0u;
    }
    workgroupBarrier();
    if (live && !rms && lane == 0u && finite && (!finite1(sm.x) || (m > 0.0 && m < 1e-30))) {
        wg_flag = 1u;
    }
    if (workgroupUniformLoad(&wg_flag) != 0u) {
        var a1 = 0.0;
        if (live) {
            if (K > 0u) {
                for (var k = 0u; k < K; k++) {
                    if (lane + k * TPR < p.nv) {
                        a1 += hsum(vscale(c[k], se) - V(x0s));
                    }
                }
            } else {
                stream(S_SCALED_SUM, lane);
                a1 = acc_sum().x;
            }
        }
        let s1 = seg_sum(lid, vec4<f32>(a1, 0.0, 0.0, 0.0), sgn).x;
        if (!rms) {
            mu0 = x0s + s1 / nf;
        }
    }
    s_mu0 = mu0;

    // Pass 3: residuals around the estimate (RMSNorm: the scaled values themselves).
    var a = vec2<f32>(0.0);
    if (live) {
        if (K > 0u) {
            for (var k = 0u; k < K; k++) {
                if (lane + k * TPR < p.nv) {
                    c[k] = vscale(c[k], se); // cached values are scaled from here on
                    let d = c[k] - V(mu0);
                    a += vec2<f32>(hsum(d), hsum(d * d));
                }
            }
        } else {
            stream(S_RESIDUALS, lane);
            a = acc_sum().xy;
        }
    }
    let r = seg_sum(lid, vec4<f32>(a, 0.0, 0.0), sgn);
    var lo = r.x / nf;
    if (rms) {
        lo = 0.0;
    }
    var mu_s = mu0 + lo; // stored (rounded); pass 4 uses mu0 and lo unrounded
    let var_s = max(r.y / nf - lo * lo, 0.0);

    // rstd = 1/sqrt(var + eps) with var = var_s / s^2, and the factor applied to scaled
    // residuals, k = rstd / s, computed without forming var (see rstd_pair).
    let pair = rstd_pair(var_s, se, p.eps_m, p.eps_e);
    var rs = pair.x;
    var k_s = pair.y;
    if (var_s == 0.0) {
        k_s = 0.0; // every residual is exactly 0 (a constant row, or all zeros for RMSNorm)
    }
    var mu0s = mu0;
    if (!finite) {
        mu_s = nan();
        rs = nan();
        k_s = nan();
        mu0s = nan();
    }
    if (live && lane == 0u) {
        if (!rms) {
            mean[row] = ldx(mu_s, -se);
        }
        rstd[row] = rs;
    }

    // Pass 4: normalize, scale, shift.
    if (live) {
        if (K > 0u) {
            for (var k = 0u; k < K; k++) {
                let j = lane + k * TPR;
                if (j < p.nv) {
                    put_y(base + j, affine(((c[k] - V(mu0s)) - V(lo)) * k_s, j));
                }
            }
        } else {
            s_mu0 = mu0s;
            s_lo = lo;
            s_k = k_s;
            stream(S_Y, lane);
        }
    }
}
