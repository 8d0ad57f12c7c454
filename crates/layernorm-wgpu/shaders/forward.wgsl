//! LayerNorm forward: y = (x - mean) * rstd * gamma + beta, one row per segment of TPR threads.
//
// Statistics, per row, all in f32:
//   1. m = max |x| (a non-finite element makes m = +inf), and s = 2^se with m*s in [0.5, 1),
//      so that squares of scaled values can neither overflow nor flush for |x| up to f32 max;
//      in the same reduction, a first mean estimate mu0 = sum(x) / N * s (rows whose sum
//      overflows or that sum in subnormals redo it as sum(x*s) / N);
//   3. residuals d = x*s - mu0: their mean corrects mu0 (mu = mu0 + sum(d)/N) and the variance
//      is sum(d^2)/N - (sum(d)/N)^2, where the subtracted term is tiny: this is the two-pass
//      variance, exact for constant rows and accurate when |mean| >> std.
// y uses (x*s - mu0) - lo, never the rounded mean: with mean 1e4 and std 1, rounding the mean to
// f32 alone would move every xhat by up to 5e-4.
// The prelude (shaders/io/*.wgsl) supplies IN_T/OUT_T/V/W and get_*/put_* for the dtype.

struct Params {
    rows: u32,      // rows in this dispatch
    nv: u32,        // items (of W elements) per row
    n: u32,         // elements per row
    flags: u32,     // bit 0: gamma present, bit 1: beta present
    eps: f32,
    groups_x: u32,  // workgroups along x of the (possibly 2-D) grid
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<IN_T>;
@group(0) @binding(2) var<storage, read> gamma: array<IN_T>;
@group(0) @binding(3) var<storage, read> beta: array<IN_T>;
@group(0) @binding(4) var<storage, read_write> y: array<OUT_T>;
@group(0) @binding(5) var<storage, read_write> mean: array<f32>;
@group(0) @binding(6) var<storage, read_write> rstd: array<f32>;

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
    var c: array<V, KMAX>;

    // Pass 1: max |x| and sum(x), in one reduction.
    var m = 0.0;
    var t = 0.0;
    if (live) {
        if (K > 0u) {
            for (var k = 0u; k < K; k++) {
                let j = lane + k * TPR;
                if (j < p.nv) {
                    c[k] = get_x(base + j);
                    m = max(m, vmaxabs(c[k]));
                    t += hsum(c[k]);
                }
            }
        } else {
            for (var j = lane; j < p.nv; j += TPR) {
                let v = get_x(base + j);
                m = max(m, vmaxabs(v));
                t += hsum(v);
            }
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
    // First estimate of the scaled mean. The unscaled sum is exact enough unless it overflowed
    // (|x| near f32 max) or the row is so small that it sums in subnormals; then (rarely, and
    // for the whole workgroup so that barriers stay uniform) sum x*s in a second pass.
    var mu0 = ldexp(sm.x / nf, se);
    if (lane == 0u) {
        wg_flag = 0u;
    }
    workgroupBarrier();
    if (live && lane == 0u && finite && (!finite1(sm.x) || (m > 0.0 && m < 1e-30))) {
        wg_flag = 1u;
    }
    if (workgroupUniformLoad(&wg_flag) != 0u) {
        var acc = 0.0;
        if (live) {
            if (K > 0u) {
                for (var k = 0u; k < K; k++) {
                    if (lane + k * TPR < p.nv) {
                        acc += hsum(vscale(c[k], se));
                    }
                }
            } else {
                for (var j = lane; j < p.nv; j += TPR) {
                    acc += hsum(vscale(get_x(base + j), se));
                }
            }
        }
        mu0 = seg_sum(lid, vec4<f32>(acc, 0.0, 0.0, 0.0), sgn).x / nf;
    }

    // Pass 3: residuals around the estimate.
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
            for (var j = lane; j < p.nv; j += TPR) {
                let d = vscale(get_x(base + j), se) - V(mu0);
                a += vec2<f32>(hsum(d), hsum(d * d));
            }
        }
    }
    let r = seg_sum(lid, vec4<f32>(a, 0.0, 0.0), sgn);
    let lo = r.x / nf;
    var mu_s = mu0 + lo; // stored (rounded); pass 4 uses mu0 and lo unrounded
    let var_s = max(r.y / nf - lo * lo, 0.0);

    // rstd = 1/sqrt(var + eps) with var = var_s / s^2, and the factor applied to scaled
    // residuals, k = rstd / s, computed without forming var (which can overflow f32).
    var rs: f32;
    var k_s: f32;
    if (var_s == 0.0) {
        rs = inverseSqrt(p.eps);
        k_s = 0.0; // every residual is exactly 0 (a constant row)
    } else if (se <= 0) {
        k_s = inverseSqrt(var_s + ldexp(p.eps, 2 * se));
        rs = ldexp(k_s, se);
    } else {
        rs = inverseSqrt(ldexp(var_s, -2 * se) + p.eps);
        k_s = ldexp(rs, -se);
    }
    var mu0s = mu0;
    if (!finite) {
        mu_s = nan();
        rs = nan();
        k_s = nan();
        mu0s = nan();
    }
    if (live && lane == 0u) {
        mean[row] = ldexp(mu_s, -se);
        rstd[row] = rs;
    }

    // Pass 4: normalize, scale, shift.
    if (live) {
        let has_g = (p.flags & 1u) != 0u;
        let has_b = (p.flags & 2u) != 0u;
        if (K > 0u) {
            for (var k = 0u; k < K; k++) {
                let j = lane + k * TPR;
                if (j < p.nv) {
                    var v = ((c[k] - V(mu0s)) - V(lo)) * k_s;
                    if (has_g) { v = v * get_gamma(j); }
                    if (has_b) { v = v + get_beta(j); }
                    put_y(base + j, v);
                }
            }
        } else {
            for (var j = lane; j < p.nv; j += TPR) {
                var v = ((vscale(get_x(base + j), se) - V(mu0s)) - V(lo)) * k_s;
                if (has_g) { v = v * get_gamma(j); }
                if (has_b) { v = v + get_beta(j); }
                put_y(base + j, v);
            }
        }
    }
}
