//! Explicit-SIMD reduction sweeps for `f32` rows, written once with `pulp` and dispatched to
//! AVX-512, AVX2+FMA, NEON or scalar code at run time.
//!
//! Why not the compiler: the elementwise sweeps vectorize well from plain Rust, but LLVM's SLP
//! vectorizer turned these multi-accumulator reductions into 2-wide or scalar code (it pairs one
//! accumulator's lane with another's), which made the statistics pass five times slower than the
//! memory traffic. Here every accumulator is one SIMD register.
//!
//! Numerics match `row.rs`: per-lane sums inside blocks of [`BLOCK`] elements, each block's lanes
//! folded pairwise in a fixed order and added into an `f64`.

use pulp::{Arch, Simd, WithSimd};

use crate::row::{BLOCK, BackParams};

/// Folds the lanes of one vector pairwise, in a fixed order, into an `f64`.
#[inline(always)]
fn fold<V: bytemuck::Pod>(v: V) -> f64 {
    let lanes: &[f32] = bytemuck::cast_slice(std::slice::from_ref(&v));
    let mut buf = [0f32; 16];
    let n = lanes.len().min(16);
    buf[..n].copy_from_slice(&lanes[..n]);
    let mut w = n;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            buf[l] += buf[l + w];
        }
    }
    f64::from(buf[0])
}

/// Vectors per block for this instruction set.
#[inline(always)]
fn per_block<S: Simd>() -> usize {
    (BLOCK / (size_of::<S::f32s>() / 4)).max(1)
}

/// One vector of the residual sums: e = (v − m)·s − ml; acc += (e, e²). Shared by [`Centered`]
/// and [`Fused`], whose sums must agree bit for bit.
#[inline(always)]
fn centered_step<S: Simd>(
    simd: S,
    v: S::f32s,
    (m, s, ml): (S::f32s, S::f32s, S::f32s),
    acc: &mut [S::f32s; 2],
) {
    let e = simd.sub_f32s(simd.mul_f32s(simd.sub_f32s(v, m), s), ml);
    acc[0] = simd.add_f32s(acc[0], e);
    acc[1] = simd.add_f32s(acc[1], simd.mul_f32s(e, e));
}

/// The scalar tail of the residual sums, added into `total`.
#[inline(always)]
fn centered_tail(tail: &[f32], (m, s, ml): (f32, f32, f32), total: &mut [f64; 2]) {
    for &v in tail {
        let e = (v - m) * s - ml;
        total[0] += f64::from(e);
        total[1] += f64::from(e * e);
    }
}

/// One vector of the backward's sums: d = (x − m)·s, g = dy·γ; acc += (d, g, g·d). Shared by
/// [`Backward`] and [`FusedBackward`], whose sums must agree bit for bit.
#[inline(always)]
fn backward_step<S: Simd>(
    simd: S,
    (x, dy, gamma): (S::f32s, S::f32s, Option<S::f32s>),
    (m, s): (S::f32s, S::f32s),
    acc: &mut [S::f32s; 3],
) {
    let d = simd.mul_f32s(simd.sub_f32s(x, m), s);
    let g = match gamma {
        Some(gamma) => simd.mul_f32s(dy, gamma),
        None => dy,
    };
    acc[0] = simd.add_f32s(acc[0], d);
    acc[1] = simd.add_f32s(acc[1], g);
    acc[2] = simd.add_f32s(acc[2], simd.mul_f32s(g, d));
}

/// The scalar tail of the backward's sums, added into `total`.
#[inline(always)]
fn backward_tail(
    (x, dy, gamma): (&[f32], &[f32], Option<&[f32]>),
    (m, s): (f32, f32),
    total: &mut [f64; 3],
) {
    for (j, (&xv, &dv)) in x.iter().zip(dy).enumerate() {
        let d = (xv - m) * s;
        let g = gamma.map_or(dv, |g| dv * g[j]);
        total[0] += f64::from(d);
        total[1] += f64::from(g);
        total[2] += f64::from(g * d);
    }
}

/// Folds block accumulators into the `f64` totals.
#[inline(always)]
fn fold_into<V: bytemuck::Pod, const K: usize>(acc: [V; K], total: &mut [f64; K]) {
    for (t, a) in total.iter_mut().zip(acc) {
        *t += fold(a);
    }
}

struct Centered<'a> {
    x: &'a [f32],
    m: f32,
    s: f32,
    ml: f32,
}

impl WithSimd for Centered<'_> {
    type Output = [f64; 2];
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> [f64; 2] {
        let (head, tail) = S::as_simd_f32s(self.x);
        let k = (simd.splat_f32s(self.m), simd.splat_f32s(self.s), simd.splat_f32s(self.ml));
        let mut total = [0f64; 2];
        for group in head.chunks(per_block::<S>()) {
            let mut acc = [simd.splat_f32s(0.0); 2];
            for &v in group {
                centered_step(simd, v, k, &mut acc);
            }
            fold_into(acc, &mut total);
        }
        centered_tail(tail, (self.m, self.s, self.ml), &mut total);
        total
    }
}

/// One row normalized while the next row's statistics are summed, in the same loop: the load
/// stream of the next row and the store stream of this one are in flight together, instead of
/// one row's compute waiting on memory at a time. The sums are bitwise those of [`Centered`] with
/// s = 1, ml = 0, and y is bitwise that of `row::normalize` (same operations, same order).
struct Fused<'a> {
    next: &'a [f32],
    m_next: f32,
    cur: &'a [f32],
    m_hi: f32,
    m_lo: f32,
    r: f32,
    gamma: Option<&'a [f32]>,
    beta: Option<&'a [f32]>,
    y: &'a mut [f32],
}

impl WithSimd for Fused<'_> {
    type Output = [f64; 2];
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> [f64; 2] {
        let n = self.cur.len();
        let (nh, nt) = S::as_simd_f32s(&self.next[..n]);
        let (ch, ct) = S::as_simd_f32s(self.cur);
        let (yh, yt) = S::as_mut_simd_f32s(&mut self.y[..n]);
        let gh = self.gamma.map(|g| S::as_simd_f32s(&g[..n]));
        let bh = self.beta.map(|b| S::as_simd_f32s(&b[..n]));
        let zero = simd.splat_f32s(0.0);
        let k = (simd.splat_f32s(self.m_next), simd.splat_f32s(1.0), zero);
        let (mh, ml, r) =
            (simd.splat_f32s(self.m_hi), simd.splat_f32s(self.m_lo), simd.splat_f32s(self.r));
        let mut total = [0f64; 2];
        let pb = per_block::<S>();
        let mut i = 0;
        while i < nh.len() {
            let end = (i + pb).min(nh.len());
            let mut acc = [zero; 2];
            for j in i..end {
                centered_step(simd, nh[j], k, &mut acc);
                let mut t = simd.mul_f32s(simd.sub_f32s(simd.sub_f32s(ch[j], mh), ml), r);
                if let Some((g, _)) = gh {
                    t = simd.mul_f32s(t, g[j]);
                }
                if let Some((b, _)) = bh {
                    t = simd.add_f32s(t, b[j]);
                }
                yh[j] = t;
            }
            fold_into(acc, &mut total);
            i = end;
        }
        centered_tail(nt, (self.m_next, 1.0, 0.0), &mut total);
        let base = n - ct.len();
        for (j, (y, &x)) in yt.iter_mut().zip(ct).enumerate() {
            let mut t = ((x - self.m_hi) - self.m_lo) * self.r;
            if let Some(g) = self.gamma {
                t *= g[base + j];
            }
            if let Some(b) = self.beta {
                t += b[base + j];
            }
            *y = t;
        }
        total
    }
}

/// Normalizes `cur` into `y` with the statistics (m_hi, m_lo, r) while summing `next`'s residuals
/// from `m_next`; returns the latter, bitwise equal to `centered(next, m_next, 1, 0)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fused(
    next: &[f32],
    m_next: f32,
    cur: &[f32],
    (m_hi, m_lo, r): (f32, f32, f32),
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    y: &mut [f32],
) -> [f64; 2] {
    Arch::new().dispatch(Fused { next, m_next, cur, m_hi, m_lo, r, gamma, beta, y })
}

/// (Σe, Σe²) with e = (x − m)·s − ml, in `f32` lanes, blocks in `f64`.
pub(crate) fn centered(x: &[f32], m: f32, s: f32, ml: f32) -> [f64; 2] {
    Arch::new().dispatch(Centered { x, m, s, ml })
}

struct Backward<'a> {
    x: &'a [f32],
    dy: &'a [f32],
    gamma: Option<&'a [f32]>,
    m: f32,
    s: f32,
}

impl WithSimd for Backward<'_> {
    type Output = [f64; 3];
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> [f64; 3] {
        let n = self.x.len();
        let (xh, xt) = S::as_simd_f32s(self.x);
        let (dh, dt) = S::as_simd_f32s(&self.dy[..n]);
        let (m, s) = (simd.splat_f32s(self.m), simd.splat_f32s(self.s));
        let mut total = [0f64; 3];
        let pb = per_block::<S>();
        let gh = self.gamma.map(|g| S::as_simd_f32s(&g[..n]).0);
        // Plain index loops, not closures: a closure is compiled without the caller's target
        // features, so every SIMD operation in it became a call.
        let mut i = 0;
        while i < xh.len() {
            let end = (i + pb).min(xh.len());
            let mut acc = [simd.splat_f32s(0.0); 3];
            for j in i..end {
                backward_step(simd, (xh[j], dh[j], gh.map(|g| g[j])), (m, s), &mut acc);
            }
            fold_into(acc, &mut total);
            i = end;
        }
        let base = n - xt.len();
        let gt = self.gamma.map(|g| &g[base..n]);
        backward_tail((xt, dt, gt), (self.m, self.s), &mut total);
        total
    }
}

struct FusedBackward<'a> {
    next: (&'a [f32], &'a [f32], f32, f32),
    x: &'a [f32],
    dy: &'a [f32],
    gamma: Option<&'a [f32]>,
    p: BackParams<f32>,
    dx: &'a mut [f32],
    dgamma: Option<&'a mut [f32]>,
    dbeta: Option<&'a mut [f32]>,
}

impl WithSimd for FusedBackward<'_> {
    type Output = [f64; 3];
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> [f64; 3] {
        let n = self.x.len();
        let (nx, ndy, nm, ns) = self.next;
        let (nxh, nxt) = S::as_simd_f32s(&nx[..n]);
        let (ndh, ndt) = S::as_simd_f32s(&ndy[..n]);
        let (xh, xt) = S::as_simd_f32s(self.x);
        let (dh, dt) = S::as_simd_f32s(&self.dy[..n]);
        let gh = self.gamma.map(|g| S::as_simd_f32s(&g[..n]));
        let (dxh, dxt) = S::as_mut_simd_f32s(&mut self.dx[..n]);
        let mut dgs = self.dgamma.map(|d| S::as_mut_simd_f32s(&mut d[..n]));
        let mut dbs = self.dbeta.map(|d| S::as_mut_simd_f32s(&mut d[..n]));
        let p = self.p;
        let (vnm, vns) = (simd.splat_f32s(nm), simd.splat_f32s(ns));
        let (m, sa, ml, r) = (
            simd.splat_f32s(p.m),
            simd.splat_f32s(p.sa),
            simd.splat_f32s(p.m_lo),
            simd.splat_f32s(p.r),
        );
        let (a, b, c) = (simd.splat_f32s(p.a), simd.splat_f32s(p.b), simd.splat_f32s(p.c));
        let zero = simd.splat_f32s(0.0);
        let mut total = [0f64; 3];
        let pb = per_block::<S>();
        let mut i = 0;
        while i < nxh.len() {
            let end = (i + pb).min(nxh.len());
            let mut acc = [zero; 3];
            for k in i..end {
                // The next row's sums, exactly as [`Backward`] forms them.
                backward_step(simd, (nxh[k], ndh[k], gh.map(|(g, _)| g[k])), (vnm, vns), &mut acc);
                // This row's dx and dγ/dβ terms, exactly as `row::back_apply` forms them.
                let xhat =
                    simd.mul_f32s(simd.sub_f32s(simd.mul_f32s(simd.sub_f32s(xh[k], m), sa), ml), r);
                let gc = match gh {
                    Some((gg, _)) => simd.mul_f32s(dh[k], gg[k]),
                    None => dh[k],
                };
                dxh[k] =
                    simd.add_f32s(simd.add_f32s(simd.mul_f32s(a, gc), b), simd.mul_f32s(xhat, c));
                if let Some((dg, _)) = dgs.as_mut() {
                    dg[k] = simd.add_f32s(dg[k], simd.mul_f32s(dh[k], xhat));
                }
                if let Some((db, _)) = dbs.as_mut() {
                    db[k] = simd.add_f32s(db[k], dh[k]);
                }
            }
            fold_into(acc, &mut total);
            i = end;
        }
        let base = n - xt.len();
        backward_tail((nxt, ndt, self.gamma.map(|g| &g[base..n])), (nm, ns), &mut total);
        for (j, ((dxv, &xv), &dv)) in dxt.iter_mut().zip(xt).zip(dt).enumerate() {
            let xhat = ((xv - p.m) * p.sa - p.m_lo) * p.r;
            let gc = self.gamma.map_or(dv, |g| dv * g[base + j]);
            *dxv = p.a * gc + p.b + xhat * p.c;
            if let Some((_, dgt)) = dgs.as_mut() {
                dgt[j] += dv * xhat;
            }
            if let Some((_, dbt)) = dbs.as_mut() {
                dbt[j] += dv;
            }
        }
        total
    }
}

/// The backward's second sweep over one row fused with the next row's first sweep; returns the
/// latter, bitwise equal to `backward_sums` of the next row.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fused_backward(
    next: (&[f32], &[f32], f32, f32),
    x: &[f32],
    dy: &[f32],
    gamma: Option<&[f32]>,
    p: &BackParams<f32>,
    dx: &mut [f32],
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
) -> [f64; 3] {
    Arch::new().dispatch(FusedBackward { next, x, dy, gamma, p: *p, dx, dgamma, dbeta })
}

/// (Σd, Σg, Σg·d) with d = (x − m)·s and g = dy·γ (dy when γ is absent).
pub(crate) fn backward_sums(
    x: &[f32],
    dy: &[f32],
    gamma: Option<&[f32]>,
    m: f32,
    s: f32,
) -> [f64; 3] {
    Arch::new().dispatch(Backward { x, dy, gamma, m, s })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_are_exact_on_small_integers_whatever_the_length() {
        for n in [0usize, 1, 7, 16, 17, 255, 256, 257, 1000] {
            let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let want: f64 = (0..n).map(|i| i as f64).sum();
            let want2: f64 = (0..n).map(|i| (i * i) as f64).sum();
            assert_eq!(centered(&x, 0.0, 1.0, 0.0), [want, want2], "n={n}");
            let ones = vec![1.0f32; n];
            let [sd, sg, sgd] = backward_sums(&x, &ones, Some(&ones), 0.0, 1.0);
            assert_eq!([sd, sg, sgd], [want, n as f64, want], "n={n}");
        }
    }
}
