//! The backward kernels: the reduction sweep, the pipelined long-row sweeps (one row, and pairs of
//! rows), the short-row groups.

use pulp::{Arch, Simd, WithSimd};

use super::steps::*;
use super::store::*;
use crate::row::{self, BackParams};

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
        backward_in(simd, (self.x, self.dy, self.gamma), (self.m, self.s))
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
        let gh = self.gamma.map(|g| S::as_simd_f32s(&g[..n]).0);
        let (dxh, dxt) = S::as_mut_simd_f32s(&mut self.dx[..n]);
        let mut dgs = self.dgamma.map(|d| S::as_mut_simd_f32s(&mut d[..n]));
        let mut dbs = self.dbeta.map(|d| S::as_mut_simd_f32s(&mut d[..n]));
        let pv = BackVecs::new(simd, &self.p);
        let (vnm, vns) = (simd.splat_f32s(nm), simd.splat_f32s(ns));
        let zero = simd.splat_f32s(0.0);
        let mut total = [0f64; 3];
        let pb = per_block::<S>();
        let mut i = 0;
        while i < nxh.len() {
            let end = (i + pb).min(nxh.len());
            let mut acc = [zero; 3];
            for k in i..end {
                let g = gh.map(|g| g[k]);
                // The next row's sums, exactly as [`Backward`] forms them.
                backward_step(simd, (nxh[k], ndh[k], g), (vnm, vns), &mut acc);
                // This row's dx and dγ/dβ terms, exactly as `row::back_apply` forms them.
                let (dx, xhat) = apply_step(simd, (xh[k], dh[k], g), &pv);
                dxh[k] = dx;
                if let Some((dg, _)) = dgs.as_mut() {
                    dg[k] = simd.add_f32s(dg[k], simd.mul_f32s(dh[k], xhat));
                }
                if let Some((db, _)) = dbs.as_mut() {
                    db[k] = simd.add_f32s(db[k], dh[k]);
                }
            }
            fold_into(simd, acc, &mut total);
            i = end;
        }
        let base = n - xt.len();
        let gt = self.gamma.map(|g| &g[base..n]);
        backward_tail((nxt, ndt, gt), (nm, ns), &mut total);
        let (dgt, dbt) = (dgs.map(|d| d.1), dbs.map(|d| d.1));
        apply_tail((xt, dt, self.gamma), &self.p, base, dxt, dgt, dbt);
        total
    }
}

/// Backward of consecutive short rows in one dispatch, adding into one block's dγ/dβ partials.
struct BackRows<'a> {
    stream: bool,
    n: usize,
    x: &'a [f32],
    dy: &'a [f32],
    mean: &'a [f32],
    rstd: &'a [f32],
    gamma: Option<&'a [f32]>,
    dx: &'a mut [f32],
    dgamma: Option<&'a mut [f32]>,
    dbeta: Option<&'a mut [f32]>,
}

impl WithSimd for BackRows<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(mut self, simd: S) {
        let n = self.n;
        let rows = self.mean.len().min(self.rstd.len());
        let per = group_rows(n);
        let gamma = self.gamma;
        let mut sums = [[0f64; 3]; GROUP_ROWS];
        let mut params = [BackParams::<f32>::default(); GROUP_ROWS];
        // With streaming, a group's dx is staged in L1 and written as one span (see `Rows`).
        let mut stage = self.stream.then(|| staging(per * n));
        let mut start = 0;
        while start < rows {
            let count = per.min(rows - start);
            let (x, dy) = (self.x, self.dy);
            let xr = |i: usize| row_at(x, n, start + i);
            let dr = |i: usize| row_at(dy, n, start + i);
            // Phase 1: the group's sums, two rows side by side.
            let mut i = 0;
            while i < count {
                let k = if i + 2 <= count { 2 } else { 1 };
                for (q, p) in params.iter_mut().enumerate().skip(i).take(k) {
                    let (mu, rs) =
                        (f64::from(self.mean[start + q]), f64::from(self.rstd[start + q]));
                    let (m, s) = row::back_shift::<f32>(mu, rs);
                    (p.m, p.sa) = (m, s as f32);
                }
                if k == 2 {
                    let rows2 = [(xr(i), dr(i)), (xr(i + 1), dr(i + 1))];
                    let ms = [(params[i].m, params[i].sa), (params[i + 1].m, params[i + 1].sa)];
                    let got = back_sums_k::<S, 2>(simd, rows2, gamma, ms);
                    sums[i..i + 2].copy_from_slice(&got);
                } else {
                    let got = back_sums_k::<S, 1>(
                        simd,
                        [(xr(i), dr(i))],
                        gamma,
                        [(params[i].m, params[i].sa)],
                    );
                    sums[i] = got[0];
                }
                i += k;
            }
            // Phase 2: every row's constants.
            for q in 0..count {
                let (mu, rs) = (f64::from(self.mean[start + q]), f64::from(self.rstd[start + q]));
                params[q] = row::back_params::<f32>(n, mu, rs, sums[q]);
            }
            // Phase 3: dx and the dγ/dβ terms (four rows per pass over the partials), from L1,
            // while the next group is fetched.
            let out = match stage.as_mut() {
                Some((buf, off)) => &mut buf[*off..*off + count * n],
                None => &mut self.dx[start * n..(start + count) * n],
            };
            let mut i = 0;
            while i < count {
                let k = if i + 2 <= count { 2 } else { 1 };
                let ahead = (start + count + i) * n;
                let ahead = ahead.min(x.len())..(ahead + k * n).min(x.len());
                prefetch(&x[ahead.clone()]);
                prefetch(&dy[ahead]);
                let (dg, db) = (self.dgamma.as_deref_mut(), self.dbeta.as_deref_mut());
                let out = &mut out[i * n..(i + k) * n];
                if k == 2 {
                    let rows2 = [(xr(i), dr(i)), (xr(i + 1), dr(i + 1))];
                    apply_k::<S, 2>(simd, rows2, gamma, &[params[i], params[i + 1]], out, (dg, db));
                } else {
                    apply_k::<S, 1>(simd, [(xr(i), dr(i))], gamma, &[params[i]], out, (dg, db));
                }
                i += k;
            }
            if let Some((buf, off)) = stage.as_ref() {
                let f = Flush::new::<S>(self.dx, start * n..(start + count) * n);
                f.finish(simd, &buf[*off..], self.dx);
            }
            start += count;
        }
        unstage(stage);
    }
}

/// The backward sums of K rows side by side: per row exactly [`backward_in`] (same operations,
/// same order), interleaved so that the rows' dependency chains overlap.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn back_sums_k<S: Simd, const K: usize>(
    simd: S,
    rows: [(&[f32], &[f32]); K],
    gamma: Option<&[f32]>,
    shifts: [(f32, f32); K],
) -> [[f64; 3]; K] {
    let n = rows[0].0.len();
    let zero = simd.splat_f32s(0.0);
    let nv = S::as_simd_f32s(rows[0].0).0.len();
    let mut xs: [&[S::f32s]; K] = [&[]; K];
    let mut ds: [&[S::f32s]; K] = [&[]; K];
    let mut ks = [(zero, zero); K];
    for r in 0..K {
        xs[r] = &S::as_simd_f32s(rows[r].0).0[..nv];
        ds[r] = &S::as_simd_f32s(&rows[r].1[..n]).0[..nv];
        ks[r] = (simd.splat_f32s(shifts[r].0), simd.splat_f32s(shifts[r].1));
    }
    let gh = gamma.map(|g| &S::as_simd_f32s(&g[..n]).0[..nv]);
    let mut total = [[0f64; 3]; K];
    let pb = per_block::<S>();
    let mut i = 0;
    while i < nv {
        let end = (i + pb).min(nv);
        let mut acc = [[zero; 3]; K];
        for j in i..end {
            let g = gh.map(|g| g[j]);
            for r in 0..K {
                backward_step(simd, (xs[r][j], ds[r][j], g), ks[r], &mut acc[r]);
            }
        }
        for r in 0..K {
            fold_into(simd, acc[r], &mut total[r]);
        }
        i = end;
    }
    let base = nv * (size_of::<S::f32s>() / 4);
    for r in 0..K {
        let gt = gamma.map(|g| &g[base..n]);
        backward_tail((&rows[r].0[base..], &rows[r].1[base..n], gt), shifts[r], &mut total[r]);
    }
    total
}

/// The backward's second sweep over K consecutive rows (dx into `out`, K rows of n), adding
/// their dγ/dβ terms into the partials in row order with one read and one write of each partial
/// vector per K rows: per row the operations of [`apply_in`], so bitwise its results.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn apply_k<S: Simd, const K: usize>(
    simd: S,
    rows: [(&[f32], &[f32]); K],
    gamma: Option<&[f32]>,
    p: &[BackParams<f32>; K],
    out: &mut [f32],
    (dgamma, dbeta): (Option<&mut [f32]>, Option<&mut [f32]>),
) {
    let n = rows[0].0.len();
    let nv = S::as_simd_f32s(rows[0].0).0.len();
    let base = nv * (size_of::<S::f32s>() / 4);
    let zero = simd.splat_f32s(0.0);
    let mut xs: [&[S::f32s]; K] = [&[]; K];
    let mut ds: [&[S::f32s]; K] = [&[]; K];
    let mut pv = [BackVecs { m: zero, sa: zero, ml: zero, r: zero, a: zero, b: zero, c: zero }; K];
    for r in 0..K {
        xs[r] = &S::as_simd_f32s(rows[r].0).0[..nv];
        ds[r] = &S::as_simd_f32s(&rows[r].1[..n]).0[..nv];
        pv[r] = BackVecs::new(simd, &p[r]);
    }
    let gh = gamma.map_or(&[][..], |g| &S::as_simd_f32s(&g[..n]).0[..nv]);
    let (want_g, want_b) = (dgamma.is_some(), dbeta.is_some());
    let (mut dgv, mut dbv) = (dgamma, dbeta);
    {
        let empty_g: &mut [S::f32s] = &mut [];
        let empty_b: &mut [S::f32s] = &mut [];
        let dgh =
            dgv.as_deref_mut().map_or(empty_g, |d| &mut S::as_mut_simd_f32s(&mut d[..n]).0[..nv]);
        let dbh =
            dbv.as_deref_mut().map_or(empty_b, |d| &mut S::as_mut_simd_f32s(&mut d[..n]).0[..nv]);
        specialize!(apply_k_vecs::<S, K>(gamma.is_some(), want_g, want_b)(
            simd,
            (&xs, &ds),
            gh,
            &pv,
            out,
            (dgh, dbh)
        ));
    }
    for r in 0..K {
        let dxr = &mut out[r * n + base..(r + 1) * n];
        let (dg, db) = (
            dgv.as_deref_mut().map(|d| &mut d[base..n]),
            dbv.as_deref_mut().map(|d| &mut d[base..n]),
        );
        apply_tail((&rows[r].0[base..], &rows[r].1[base..n], gamma), &p[r], base, dxr, dg, db);
    }
}

/// The vector body of [`apply_k`].
#[inline(always)]
#[allow(clippy::needless_range_loop, clippy::type_complexity)]
fn apply_k_vecs<S: Simd, const K: usize, const G: bool, const DG: bool, const DB: bool>(
    simd: S,
    (xs, ds): (&[&[S::f32s]; K], &[&[S::f32s]; K]),
    gh: &[S::f32s],
    pv: &[BackVecs<S::f32s>; K],
    out: &mut [f32],
    (dgh, dbh): (&mut [S::f32s], &mut [S::f32s]),
) {
    let n = out.len() / K;
    let nv = xs[0].len();
    let mut chunks = out.chunks_exact_mut(n);
    let outs: [&mut [S::f32s]; K] = core::array::from_fn(|_| {
        let row = chunks.next().unwrap_or_default();
        &mut S::as_mut_simd_f32s(row).0[..nv]
    });
    for j in 0..nv {
        let g = if G { Some(gh[j]) } else { None };
        let (mut dgv, mut dbv) =
            (if DG { dgh[j] } else { ds[0][j] }, if DB { dbh[j] } else { ds[0][j] });
        for r in 0..K {
            let dyv = ds[r][j];
            let (d, xhat) = apply_step(simd, (xs[r][j], dyv, g), &pv[r]);
            outs[r][j] = d;
            if DG {
                dgv = simd.add_f32s(dgv, simd.mul_f32s(dyv, xhat));
            }
            if DB {
                dbv = simd.add_f32s(dbv, dyv);
            }
        }
        if DG {
            dgh[j] = dgv;
        }
        if DB {
            dbh[j] = dbv;
        }
    }
}

/// Backward of `mean.len()` consecutive rows of `n` in one explicit-SIMD loop (for short rows).
#[allow(clippy::too_many_arguments)]
pub(crate) fn back_rows(
    n: usize,
    x: &[f32],
    dy: &[f32],
    mean: &[f32],
    rstd: &[f32],
    gamma: Option<&[f32]>,
    dx: &mut [f32],
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
    stream: bool,
) {
    Arch::new().dispatch(BackRows { stream, n, x, dy, mean, rstd, gamma, dx, dgamma, dbeta })
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

/// Backward of one block of long rows (`f32`, in place), two rows per sweep: the sweep writes
/// rows r and r+1's dx while summing rows r+2 and r+3's reductions, and reads and writes each
/// dγ/dβ partial once per pair of rows instead of once per row — that traffic was the backward's
/// largest cost beside x, dy and dx. Per row the operations and their order are those of
/// [`FusedBackward`] / `row::back_apply` (dγ/dβ gain row r's term, then row r+1's), so the
/// results are bitwise those of the one-row pipeline.
struct BackLong<'a> {
    n: usize,
    x: &'a [f32],
    dy: &'a [f32],
    mean: &'a [f32],
    rstd: &'a [f32],
    gamma: Option<&'a [f32]>,
    dx: &'a mut [f32],
    partials: Partials<'a>,
    stream: bool,
}

/// The dγ/dβ partials of consecutive blocks of `ROW_BLOCK` rows: block b's are
/// `[dγ (n) | dβ (n)]` at `2·n·b`, for the gradients wanted.
pub(crate) struct Partials<'a> {
    /// All the blocks' partials (`None` when neither gradient is wanted).
    pub(crate) buf: Option<&'a mut [f32]>,
    /// Whether dγ, dβ are wanted.
    pub(crate) want: (bool, bool),
}

impl Partials<'_> {
    /// The partials row `r` adds into (rows are counted from the first block's first row).
    #[inline(always)]
    fn of_row(&mut self, r: usize, n: usize) -> (Option<&mut [f32]>, Option<&mut [f32]>) {
        let b = r / crate::driver::ROW_BLOCK;
        crate::driver::block_partials(self.buf.as_deref_mut(), n, b, self.want)
    }
}

impl WithSimd for BackLong<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(mut self, simd: S) {
        let n = self.n;
        let rows = self.mean.len().min(self.rstd.len());
        let (x, dy, gamma) = (self.x, self.dy, self.gamma);
        let span = |r: usize| r * n..(r + 1) * n;
        let mut stage = self.stream.then(|| staging(2 * n));
        let mut sums = [[0f64; 3]; 2];
        for (r, s) in sums.iter_mut().enumerate().take(rows.min(2)) {
            *s =
                back_row_sums(simd, (&x[span(r)], &dy[span(r)], gamma), self.mean[r], self.rstd[r]);
        }
        let mut r = 0;
        while r < rows {
            let params = |i: usize| {
                let (mu, rs) = (f64::from(self.mean[r + i]), f64::from(self.rstd[r + i]));
                row::back_params::<f32>(n, mu, rs, sums[i])
            };
            if r + 4 <= rows {
                // The pipelined case: this pair's dx, the next pair's sums.
                let p = [params(0), params(1)];
                let next = [r + 2, r + 3].map(|q| {
                    let (m, s) =
                        row::back_shift::<f32>(f64::from(self.mean[q]), f64::from(self.rstd[q]));
                    (q, m, s as f32)
                });
                // With streaming, the pair's dx is staged in L1 and written as one span.
                let out = match stage.as_mut() {
                    Some((buf, off)) => &mut buf[*off..*off + 2 * n],
                    None => &mut self.dx[r * n..(r + 2) * n],
                };
                let (dx0, dx1) = out.split_at_mut(n);
                // A pair never straddles two blocks: blocks have an even number of rows and
                // every call starts at a block's first row.
                let parts = self.partials.of_row(r, n);
                sums = back_pair(simd, n, (x, dy, gamma), (r, p), next, [dx0, dx1], parts);
                if let Some((buf, off)) = stage.as_ref() {
                    let f = Flush::new::<S>(self.dx, r * n..(r + 2) * n);
                    f.finish(simd, &buf[*off..], self.dx);
                }
                r += 2;
            } else {
                // The last rows: one at a time, each summing the row after next.
                let p = params(0);
                let (dg, db) = self.partials.of_row(r, n);
                apply_in(
                    simd,
                    (&x[span(r)], &dy[span(r)], gamma),
                    &p,
                    &mut self.dx[span(r)],
                    dg,
                    db,
                );
                sums[0] = sums[1];
                if r + 2 < rows {
                    let q = r + 2;
                    sums[1] = back_row_sums(
                        simd,
                        (&x[span(q)], &dy[span(q)], gamma),
                        self.mean[q],
                        self.rstd[q],
                    );
                }
                r += 1;
            }
        }
        unstage(stage);
    }
}

/// One row's backward sums from its saved statistics (as [`Backward`] forms them).
#[inline(always)]
fn back_row_sums<S: Simd>(
    simd: S,
    rows: (&[f32], &[f32], Option<&[f32]>),
    mean: f32,
    rstd: f32,
) -> [f64; 3] {
    let (m, s) = row::back_shift::<f32>(f64::from(mean), f64::from(rstd));
    backward_in(simd, rows, (m, s as f32))
}

/// One sweep of [`BackLong`]: rows `r`, `r+1` (with their constants `p`) written, the rows in
/// `next` (index, centering shift, scale) summed; returns the latter's sums.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn back_pair<S: Simd>(
    simd: S,
    n: usize,
    (x, dy, gamma): (&[f32], &[f32], Option<&[f32]>),
    (r, p): (usize, [BackParams<f32>; 2]),
    next: [(usize, f32, f32); 2],
    dx: [&mut [f32]; 2],
    (dgamma, dbeta): (Option<&mut [f32]>, Option<&mut [f32]>),
) -> [[f64; 3]; 2] {
    let (xr, dr) = (|q: usize| &x[q * n..(q + 1) * n], |q: usize| &dy[q * n..(q + 1) * n]);
    let (cx, cd) =
        ([xr(r), xr(r + 1)].map(S::as_simd_f32s), [dr(r), dr(r + 1)].map(S::as_simd_f32s));
    let (q0, q1) = (next[0].0, next[1].0);
    let (nx, nd) = ([xr(q0), xr(q1)].map(S::as_simd_f32s), [dr(q0), dr(q1)].map(S::as_simd_f32s));
    let nv = cx[0].0.len();
    let gh = gamma.map_or(&[][..], |g| &S::as_simd_f32s(&g[..n]).0[..nv]);
    let [dx0, dx1] = dx;
    let (dxh0, dxt0) = S::as_mut_simd_f32s(dx0);
    let (dxh1, dxt1) = S::as_mut_simd_f32s(dx1);
    let (want_g, want_b) = (dgamma.is_some(), dbeta.is_some());
    let mut dgs = dgamma.map(|d| S::as_mut_simd_f32s(&mut d[..n]));
    let mut dbs = dbeta.map(|d| S::as_mut_simd_f32s(&mut d[..n]));
    let pv = [BackVecs::new(simd, &p[0]), BackVecs::new(simd, &p[1])];
    let nk = [
        (simd.splat_f32s(next[0].1), simd.splat_f32s(next[0].2)),
        (simd.splat_f32s(next[1].1), simd.splat_f32s(next[1].2)),
    ];
    let empty: &mut [S::f32s] = &mut [];
    let (dgh, dbh) = (
        dgs.as_mut().map_or(empty, |d| &mut d.0[..nv]),
        dbs.as_mut().map_or(&mut [][..], |d| &mut d.0[..nv]),
    );
    let cur = [(&cx[0].0[..nv], &cd[0].0[..nv]), (&cx[1].0[..nv], &cd[1].0[..nv])];
    let nxt = [(&nx[0].0[..nv], &nd[0].0[..nv]), (&nx[1].0[..nv], &nd[1].0[..nv])];
    let dxh = [&mut dxh0[..nv], &mut dxh1[..nv]];
    let mut total = specialize!(back_pair_vecs::<S>(gamma.is_some(), want_g, want_b)(
        simd,
        (nxt, nk),
        (cur, &pv),
        gh,
        dxh,
        (dgh, dbh)
    ));
    // Scalar tails: the next rows' sums, then this pair's dx and dγ/dβ terms in row order.
    let base = n - cx[0].1.len();
    let gt = gamma.map(|g| &g[base..n]);
    for k in 0..2 {
        backward_tail((nx[k].1, nd[k].1, gt), (next[k].1, next[k].2), &mut total[k]);
    }
    let (mut dgt, mut dbt) = (dgs.map(|d| d.1), dbs.map(|d| d.1));
    apply_tail(
        (cx[0].1, cd[0].1, gamma),
        &p[0],
        base,
        dxt0,
        dgt.as_deref_mut(),
        dbt.as_deref_mut(),
    );
    apply_tail((cx[1].1, cd[1].1, gamma), &p[1], base, dxt1, dgt, dbt);
    total
}

/// The vector body of [`back_pair`]; `G`: γ present, `DG`/`DB`: dγ/dβ wanted.
#[inline(always)]
#[allow(clippy::type_complexity, clippy::needless_range_loop)]
fn back_pair_vecs<S: Simd, const G: bool, const DG: bool, const DB: bool>(
    simd: S,
    (nxt, nk): ([(&[S::f32s], &[S::f32s]); 2], [(S::f32s, S::f32s); 2]),
    (cur, pv): ([(&[S::f32s], &[S::f32s]); 2], &[BackVecs<S::f32s>; 2]),
    gh: &[S::f32s],
    dxh: [&mut [S::f32s]; 2],
    (dgh, dbh): (&mut [S::f32s], &mut [S::f32s]),
) -> [[f64; 3]; 2] {
    let nv = cur[0].0.len();
    let [dxh0, dxh1] = dxh;
    let zero = simd.splat_f32s(0.0);
    let mut total = [[0f64; 3]; 2];
    let pb = per_block::<S>();
    let mut i = 0;
    while i < nv {
        let end = (i + pb).min(nv);
        let mut acc = [[zero; 3]; 2];
        for j in i..end {
            let g = if G { Some(gh[j]) } else { None };
            for k in 0..2 {
                backward_step(simd, (nxt[k].0[j], nxt[k].1[j], g), nk[k], &mut acc[k]);
            }
            let (d0, xh0) = apply_step(simd, (cur[0].0[j], cur[0].1[j], g), &pv[0]);
            let (d1, xh1) = apply_step(simd, (cur[1].0[j], cur[1].1[j], g), &pv[1]);
            dxh0[j] = d0;
            dxh1[j] = d1;
            if DG {
                let t = simd.add_f32s(dgh[j], simd.mul_f32s(cur[0].1[j], xh0));
                dgh[j] = simd.add_f32s(t, simd.mul_f32s(cur[1].1[j], xh1));
            }
            if DB {
                dbh[j] = simd.add_f32s(simd.add_f32s(dbh[j], cur[0].1[j]), cur[1].1[j]);
            }
        }
        for k in 0..2 {
            fold_into(simd, acc[k], &mut total[k]);
        }
        i = end;
    }
    total
}

/// Backward of consecutive blocks of long rows in place (see [`BackLong`]), pipelined across the
/// blocks' boundaries.
#[allow(clippy::too_many_arguments)]
pub(crate) fn back_long(
    n: usize,
    x: &[f32],
    dy: &[f32],
    mean: &[f32],
    rstd: &[f32],
    gamma: Option<&[f32]>,
    dx: &mut [f32],
    partials: Partials<'_>,
    stream: bool,
) {
    Arch::new().dispatch(BackLong { n, x, dy, mean, rstd, gamma, dx, partials, stream })
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
    use crate::reduce::tests::close;
    use layernorm_core::{DType, NormSpec, reference};

    /// Finite, varied rows (the backward of a NaN row would make every dγ column NaN); with
    /// `offset`, every fifth row sits at mean 1e4 (σ ≈ 0.3).
    fn rows_of(rows: usize, n: usize, seed: u32, offset: bool) -> Vec<f32> {
        let mut s = seed | 1;
        (0..rows * n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let u = s as f32 / u32::MAX as f32 - 0.5;
                if offset && (i / n) % 5 == 1 { 1e4 + u } else { 3.0 * u }
            })
            .collect()
    }

    #[test]
    fn the_backward_kernels_are_right_on_every_instruction_set() {
        let rows = 37;
        for n in [3usize, 16, 33, 128, 255, 256, 300, 515, 1024] {
            let x = rows_of(rows, n, 7, true);
            let dy = rows_of(rows, n, 11, false);
            let g: Vec<f32> = (0..n).map(|j| 0.5 + j as f32 / n as f32).collect();
            let spec = NormSpec::layer_norm(rows, n, DType::F32).with_beta(true);
            let wide = |v: &[f32]| v.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
            let fwd = reference::forward(&spec, &wide(&x), Some(&wide(&g)), Some(&vec![0.0; n]))
                .unwrap_or_else(|e| panic!("{e}"));
            let (mean, rstd): (Vec<f32>, Vec<f32>) = (
                fwd.mean.iter().map(|&v| v as f32).collect(),
                fwd.rstd.iter().map(|&v| v as f32).collect(),
            );
            let want = reference::backward(
                &spec,
                &wide(&x),
                &wide(&dy),
                &fwd.mean,
                &fwd.rstd,
                Some(&wide(&g)),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let (want_dg, want_db) =
                (want.dgamma.unwrap_or_default(), want.dbeta.unwrap_or_default());
            for_each_isa!(simd, isa => {
                for (long, stream) in [(false, false), (false, true), (true, false), (true, true)] {
                    if long && n < 2 {
                        continue;
                    }
                    let mut dxbuf = vec![0f32; rows * n + 3];
                    let (mut dg, mut db) = (vec![0f32; n], vec![0f32; n]);
                    let dx = &mut dxbuf[3..];
                    let (dgamma, dbeta) = (Some(&mut dg[..]), Some(&mut db[..]));
                    let (x, dy, mean, rstd, gamma) = (&x[..], &dy[..], &mean[..], &rstd[..], Some(&g[..]));
                    if long {
                        // Partials for each 32-row block, summed over blocks as the driver does.
                        let blocks = rows.div_ceil(crate::driver::ROW_BLOCK);
                        let mut parts = vec![0f32; blocks * 2 * n];
                        let partials = Partials { buf: Some(&mut parts), want: (true, true) };
                        pulp::Simd::vectorize(simd, BackLong { n, x, dy, mean, rstd, gamma, dx, partials, stream });
                        if let (Some(g), Some(b)) = (dgamma, dbeta) {
                            for j in 0..n {
                                let sum = |o: usize| (0..blocks).map(|k| f64::from(parts[2 * n * k + o + j])).sum::<f64>();
                                (g[j], b[j]) = (sum(0) as f32, sum(n) as f32);
                            }
                        }
                    } else {
                        pulp::Simd::vectorize(simd, BackRows { stream, n, x, dy, mean, rstd, gamma, dx, dgamma, dbeta });
                    }
                    crate::reduce::stream_fence();
                    let what = format!("{isa}, n={n}, long={long}, stream={stream}");
                    close(&format!("dx {what}"), &dxbuf[3..], &want.dx, 2e-5);
                    close(&format!("dgamma {what}"), &dg, &want_dg, 1e-4);
                    close(&format!("dbeta {what}"), &db, &want_db, 1e-5);
                }
            });
        }
    }
}
