//! How the backward kernels (backward.wgsl, params_grad.wgsl) form xhat from the saved tensor:
// the forward's input, LayerNorm (x - mean) * rstd or RMSNorm x * rstd, or with F_FROM_Y its
// output, (y - beta) / (offset + gamma).

// The inputs both kernels read, bound alike (`saved_entries` in src/dispatch.rs): the saved
// tensor (x, h or y), dy, gamma, beta (read from y only), mean (LayerNorm from x only), rstd.
@group(0) @binding(1) var<storage, read> x: array<IN_T>;
@group(0) @binding(2) var<storage, read> dy: array<IN_T>;
@group(0) @binding(3) var<storage, read> gamma: array<IN_T>;
@group(0) @binding(4) var<storage, read> beta: array<IN_T>;
@group(0) @binding(5) var<storage, read> mean: array<f32>;
@group(0) @binding(6) var<storage, read> rstd: array<f32>;

// A row's saved statistics as the kernels use them: rstd = rm * 2^re, so that
// e = ((x - mu) * 2^re) * rm is formed by exponent arithmetic and one product (a driver that
// factors sums of e into (sum of (x - mu)) * rstd would overflow for |x| near f32 max; see sc4).
// A mean or rstd that is not finite (user-supplied statistics) makes rs NaN: the row's dx is NaN.
struct XRow {
    mu: f32,
    rs: f32,
    rm: f32,
    re: i32,
}

fn xrow(mu: f32, rs_in: f32) -> XRow {
    var rs = rs_in;
    if (!finite1(rs) || !finite1(mu)) {
        rs = nan();
    }
    var rm = rs;
    var re = 0i;
    if (finite1(rs) && rs != 0.0) {
        let fr = frexp(rs);
        rm = fr.fract;
        re = fr.exp;
    }
    return XRow(mu, rs, rm, re);
}

// Whether the backward reads the saved mean (LayerNorm from x).
fn reads_mean(flags: u32) -> bool {
    return (flags & (F_RMS | F_FROM_Y)) == 0u;
}

// offset + gamma of item j, or 1 without gamma.
fn gamma_eff(flags: u32, offset: f32, j: u32) -> V {
    if ((flags & F_GAMMA) != 0u) {
        return V(offset) + get_gamma(j);
    }
    return V(1.0);
}

// xhat of the saved item `v` at column item j, before LayerNorm-from-x's recentring by
// lo = mean of this over the row (reads_mean; elsewhere lo = 0).
fn xhat_raw(flags: u32, offset: f32, r: XRow, v: V, j: u32) -> V {
    if ((flags & F_FROM_Y) != 0u) {
        var t = v;
        if ((flags & F_BETA) != 0u) {
            t = t - get_beta(j);
        }
        return t / gamma_eff(flags, offset, j);
    }
    return vscale(v - V(r.mu), r.re) * r.rm;
}
