//! The backward kernels: the reduction sweep, the pipelined long-row sweeps (one row, and pairs of
//! rows), the short-row groups.

use pulp::{Simd, WithSimd};

use super::steps::*;
use super::store::*;
use crate::row::{self, BackParams, Epilogue, Kind};

/// Runs `$run` with `$r` (the kernels' `RY`) the compile-time form of the [`Recover`] `$rec`:
/// x̂ recovered from y, or the rows read as given.
macro_rules! by_source {
    ($rec:expr, |$r:ident| $run:expr) => {{
        let rec: Recover<'_> = $rec;
        if rec.recovers() {
            const $r: bool = true;
            $run
        } else {
            const $r: bool = false;
            $run
        }
    }};
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
                    dg[k] = simd.mul_add_f32s(dh[k], xhat, dg[k]);
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
        apply_tail((xt, dt, self.gamma), &self.p, base, dxt, dgt, dbt, None);
        total
    }
}

/// Backward of consecutive short rows in one dispatch, adding into one block's dγ/dβ partials.
struct BackRows<'a> {
    kind: Kind,
    stream: bool,
    n: usize,
    x: &'a [f32],
    dy: &'a [f32],
    /// The rows that follow `x` and `dy` in the caller's task, only prefetched: the last group
    /// of a block fetches the next block's first rows while it runs from L1.
    after: (&'a [f32], &'a [f32]),
    mean: &'a [f32],
    rstd: &'a [f32],
    gamma: Option<&'a [f32]>,
    dx: &'a mut [f32],
    dgamma: Option<&'a mut [f32]>,
    dbeta: Option<&'a mut [f32]>,
    /// Applied to each row's dx before it is stored.
    epi: Epilogue<'a, f32>,
    /// How x is read (the rows as given, or x̂ recovered from y).
    rec: Recover<'a>,
}

/// A backward kernel whose x is read through its [`Recover`], run with that source as the
/// compile-time `RY` (see [`Sourced`]).
trait FromSource {
    fn run_from<S: Simd, const RY: bool>(self, simd: S);
}

/// `Op` with x read as the source `RY` (see [`Recover`]), dispatched on its own: each source is
/// compiled into a function of its own, so that the rows read as given run the code they would
/// without a source parameter. Compiled into one function with the other sources, the backward
/// from x of 65536×128 measured 12% slower (Intel AVX-512 VM, one thread, alternated runs).
struct Sourced<Op, const RY: bool>(Op);

impl<Op: FromSource, const RY: bool> WithSimd for Sourced<Op, RY> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        self.0.run_from::<S, RY>(simd)
    }
}

/// Runs `op` with its x read through `rec`.
fn dispatch_from<Op: FromSource>(op: Op, rec: Recover<'_>) {
    by_source!(rec, |RY| crate::isa::dispatch(Sourced::<Op, RY>(op)))
}

/// Runs `op` with its x read as given.
fn dispatch_plain<Op: FromSource>(op: Op) {
    crate::isa::dispatch(Sourced::<Op, false>(op))
}

impl FromSource for BackRows<'_> {
    #[inline(always)]
    fn run_from<S: Simd, const RY: bool>(self, simd: S) {
        self.run::<S, RY>(simd)
    }
}

impl BackRows<'_> {
    /// The rows with x read through `self.rec` (`RY`: see [`Recover`]).
    #[inline(always)]
    fn run<S: Simd, const RY: bool>(mut self, simd: S) {
        let n = self.n;
        let rec = self.rec;
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
                    (p.m, p.sa) = row::back_shift_f32(self.mean[start + q], self.rstd[start + q]);
                }
                if k == 2 {
                    let rows2 = [(xr(i), dr(i)), (xr(i + 1), dr(i + 1))];
                    let ms = [(params[i].m, params[i].sa), (params[i + 1].m, params[i + 1].sa)];
                    let got = back_sums_k::<S, 2, RY>(simd, rows2, (gamma, rec), ms);
                    sums[i..i + 2].copy_from_slice(&got);
                } else {
                    let got = back_sums_k::<S, 1, RY>(
                        simd,
                        [(xr(i), dr(i))],
                        (gamma, rec),
                        [(params[i].m, params[i].sa)],
                    );
                    sums[i] = got[0];
                }
                i += k;
            }
            // Phase 2: every row's constants.
            for q in 0..count {
                let (mu, rs) = (f64::from(self.mean[start + q]), f64::from(self.rstd[start + q]));
                params[q] = row::back_params::<f32>(self.kind, n, mu, rs, sums[q]);
            }
            // Phase 3: dx and the dγ/dβ terms, from L1, while the next group is fetched. Two
            // rows per pass over the partials with AVX-512's 32 registers, or rows shorter than
            // 128; otherwise one: on AVX2 the pair's fourteen row constants spill, and from N =
            // 128 up one row per pass measured faster (AMD Zen 3 VM, calls alternated in one
            // process, one thread: N = 128 +5%, 160 +6%, 192 +14%, 200 +29%, 255 +12%; N = 96 −3%,
            // 64 −5%; two threads at 128 +5%). Same bits either way (`apply_k`).
            let pairs = size_of::<S::f32s>() >= 64 || n < 128;
            let out = match stage.as_mut() {
                Some((buf, off)) => &mut buf[*off..*off + count * n],
                None => &mut self.dx[start * n..(start + count) * n],
            };
            let mut i = 0;
            while i < count {
                let k = if pairs && i + 2 <= count { 2 } else { 1 };
                let ahead = (start + count + i) * n;
                let (px, pd, ahead) = match ahead.checked_sub(x.len()) {
                    None => (x, dy, ahead),
                    Some(a) => (self.after.0, self.after.1, a),
                };
                let ahead = ahead.min(px.len())..(ahead + k * n).min(px.len());
                prefetch(&px[ahead.clone()]);
                prefetch(&pd[ahead]);
                let (dg, db) = (self.dgamma.as_deref_mut(), self.dbeta.as_deref_mut());
                let out = &mut out[i * n..(i + k) * n];
                let epi = |q: usize| self.epi.row(start + q, n);
                if k == 2 {
                    let rows2 = [(xr(i), dr(i)), (xr(i + 1), dr(i + 1))];
                    let (p, e) = ([params[i], params[i + 1]], [epi(i), epi(i + 1)]);
                    apply_k::<S, 2, RY>(simd, rows2, (gamma, rec), (&p, e), out, (dg, db));
                } else {
                    let (p, e) = ([params[i]], [epi(i)]);
                    let row = [(xr(i), dr(i))];
                    apply_k::<S, 1, RY>(simd, row, (gamma, rec), (&p, e), out, (dg, db));
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

/// Backward of consecutive blocks of short rows in one dispatch: [`BackRows`] block by block,
/// each adding into its own partials (the same calls the per-block loop made, so the same bits).
struct ShortBlocks<'a> {
    kind: Kind,
    stream: bool,
    n: usize,
    x: &'a [f32],
    dy: &'a [f32],
    mean: &'a [f32],
    rstd: &'a [f32],
    gamma: Option<&'a [f32]>,
    dx: &'a mut [f32],
    partials: Partials<'a>,
    epi: Epilogue<'a, f32>,
    rec: Recover<'a>,
}

impl FromSource for ShortBlocks<'_> {
    #[inline(always)]
    fn run_from<S: Simd, const RY: bool>(mut self, simd: S) {
        let (n, block) = (self.n, crate::driver::ROW_BLOCK);
        let rows = self.mean.len().min(self.rstd.len());
        for start in (0..rows).step_by(block) {
            let r = start..(start + block).min(rows);
            let e = r.start * n..r.end * n;
            let (dgamma, dbeta) = self.partials.of_row(start, n);
            let epi = self.epi.rows(r.clone(), n);
            let (mean, rstd) = (&self.mean[r.clone()], &self.rstd[r]);
            let after = (&self.x[e.end..], &self.dy[e.end..]);
            let (x, dy, dx) = (&self.x[e.clone()], &self.dy[e.clone()], &mut self.dx[e]);
            let (kind, stream, gamma, rec) = (self.kind, self.stream, self.gamma, self.rec);
            let (dg, db) = (dgamma, dbeta);
            let op = BackRows {
                kind,
                stream,
                n,
                x,
                dy,
                after,
                mean,
                rstd,
                gamma,
                dx,
                dgamma: dg,
                dbeta: db,
                epi,
                rec,
            };
            op.run::<S, RY>(simd);
        }
    }
}

/// Backward of consecutive blocks of short rows (see [`ShortBlocks`]), each row's dx through
/// `epi` before it is stored.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(crate) fn back_short_blocks(
    kind: Kind,
    n: usize,
    (x, dy, mean, rstd): (&[f32], &[f32], &[f32], &[f32]),
    gamma: Option<&[f32]>,
    dx: &mut [f32],
    partials: Partials<'_>,
    stream: bool,
    epi: Epilogue<'_, f32>,
) {
    let rec = Recover::default();
    dispatch_plain(ShortBlocks {
        kind,
        stream,
        n,
        x,
        dy,
        mean,
        rstd,
        gamma,
        dx,
        partials,
        epi,
        rec,
    })
}

/// One column chunk of the column-chunked backward (`crate::columns`): for every 32-row block,
/// its rows' dx over the chunk's columns and their dγ/dβ terms added into chunk-sized partials
/// from zero in row order (`apply_in`, as the row-wise kernels), the partials summed into `f64`
/// block by block, and the sums rounded into `dgamma`/`dbeta` (the chunk's pieces).
struct ColumnChunk<'a, 'b> {
    scratch: &'a mut ColumnScratch,
    n: usize,
    cols: core::ops::Range<usize>,
    x: &'a [f32],
    dy: &'a [f32],
    gamma: Option<&'a [f32]>,
    params: &'a [BackParams<f32>],
    dx: Vec<&'b mut [f32]>,
    dgamma: Option<&'b mut [f32]>,
    dbeta: Option<&'b mut [f32]>,
}

impl WithSimd for ColumnChunk<'_, '_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(mut self, simd: S) {
        const C: usize = crate::columns::CHUNK;
        let (n, cols) = (self.n, self.cols.clone());
        let c = cols.len().min(C);
        let (want_g, want_b) = (self.dgamma.is_some(), self.dbeta.is_some());
        let gamma = self.gamma.map(|g| &g[cols.clone()]);
        let rows = self.params.len().min(self.dx.len());
        let ColumnScratch { pg, pb, sg, sb } = &mut *self.scratch;
        // The sums start from zero for every chunk (the partials, for every block, below). The
        // partials start on a cache line, as the row-wise backward's do (`driver`).
        for v in [&mut *pg, &mut *pb] {
            v.resize(C + 16, 0.0);
        }
        for v in [&mut *sg, &mut *sb] {
            v.clear();
            v.resize(C, 0.0);
        }
        let (g0, b0) = (crate::driver::to_line(pg), crate::driver::to_line(pb));
        let (pg, pb) = (&mut pg[g0..g0 + c], &mut pb[b0..b0 + c]);
        let (sg, sb) = (&mut sg[..c], &mut sb[..c]);
        for start in (0..rows).step_by(crate::driver::ROW_BLOCK) {
            let end = (start + crate::driver::ROW_BLOCK).min(rows);
            pg.fill(0.0);
            pb.fill(0.0);
            for r in start..end {
                let span = r * n + cols.start..r * n + cols.start + c;
                let (dg, db) = (want_g.then_some(&mut *pg), want_b.then_some(&mut *pb));
                let (x, dy) = (&self.x[span.clone()], &self.dy[span]);
                let dxr = &mut self.dx[r][..c];
                apply_in(simd, (x, dy, gamma), &self.params[r], dxr, (dg, db), None);
            }
            for (s, &p) in sg.iter_mut().zip(&*pg) {
                *s += f64::from(p);
            }
            for (s, &p) in sb.iter_mut().zip(&*pb) {
                *s += f64::from(p);
            }
        }
        for (d, sums) in [(self.dgamma, &*sg), (self.dbeta, &*sb)] {
            if let Some(d) = d {
                for (o, &s) in d.iter_mut().zip(sums) {
                    *o = s as f32;
                }
            }
        }
    }
}

/// The buffers of a column chunk (its dγ/dβ partials and their `f64` sums), kept by the caller
/// from chunk to chunk.
#[derive(Default)]
pub(crate) struct ColumnScratch {
    pg: Vec<f32>,
    pb: Vec<f32>,
    sg: Vec<f64>,
    sb: Vec<f64>,
}

/// Runs one chunk of the column-chunked backward (see [`ColumnChunk`]): `dx` holds the chunk's
/// piece of every row, `dgamma`/`dbeta` the chunk's pieces of the outputs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn back_column_chunk<'b>(
    scratch: &mut ColumnScratch,
    n: usize,
    cols: core::ops::Range<usize>,
    (x, dy, gamma): (&[f32], &[f32], Option<&[f32]>),
    params: &[BackParams<f32>],
    dx: Vec<&'b mut [f32]>,
    (dgamma, dbeta): (Option<&'b mut [f32]>, Option<&'b mut [f32]>),
) {
    let op = ColumnChunk { scratch, n, cols, x, dy, gamma, params, dx, dgamma, dbeta };
    crate::isa::dispatch(op)
}

/// The backward sums of K rows side by side: per row exactly [`backward_in`] (same operations,
/// same order), interleaved so that the rows' dependency chains overlap.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn back_sums_k<S: Simd, const K: usize, const RY: bool>(
    simd: S,
    rows: [(&[f32], &[f32]); K],
    (gamma, rec): (Option<&[f32]>, Recover<'_>),
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
    let rv = rec.vecs::<S, RY>(n, nv);
    let mut total = [[0f64; 3]; K];
    let pb = per_block::<S>();
    let mut i = 0;
    while i < nv {
        let end = (i + pb).min(nv);
        let mut acc = [[zero; 3]; K];
        for j in i..end {
            let g = gh.map(|g| g[j]);
            for r in 0..K {
                let xv = rv.at::<S, RY>(simd, xs[r][j], j);
                backward_step(simd, (xv, ds[r][j], g), ks[r], &mut acc[r]);
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
        let tail = (&rows[r].0[base..], &rows[r].1[base..n], gt);
        backward_tail_from::<RY>(tail, shifts[r], &mut total[r], (rec, base));
    }
    total
}

/// The backward's second sweep over K consecutive rows (dx into `out`, K rows of n), adding
/// their dγ/dβ terms into the partials in row order with one read and one write of each partial
/// vector per K rows: per row the operations of [`apply_in`], so bitwise its results.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn apply_k<S: Simd, const K: usize, const RY: bool>(
    simd: S,
    rows: [(&[f32], &[f32]); K],
    (gamma, rec): (Option<&[f32]>, Recover<'_>),
    (p, epi): (&[BackParams<f32>; K], [Epi<'_>; K]),
    out: &mut [f32],
    (dgamma, dbeta): (Option<&mut [f32]>, Option<&mut [f32]>),
) {
    let n = rows[0].0.len();
    let nv = S::as_simd_f32s(rows[0].0).0.len();
    let base = nv * (size_of::<S::f32s>() / 4);
    let zero = simd.splat_f32s(0.0);
    let mut xs: [&[S::f32s]; K] = [&[]; K];
    let mut ds: [&[S::f32s]; K] = [&[]; K];
    let mut pv = [BackVecs { m: zero, nml: zero, a: zero, b: zero, c: zero }; K];
    for r in 0..K {
        xs[r] = &S::as_simd_f32s(rows[r].0).0[..nv];
        ds[r] = &S::as_simd_f32s(&rows[r].1[..n]).0[..nv];
        pv[r] = BackVecs::new(simd, &p[r]);
    }
    let gh = gamma.map_or(&[][..], |g| &S::as_simd_f32s(&g[..n]).0[..nv]);
    let (want_g, want_b) = (dgamma.is_some(), dbeta.is_some());
    let (mut dgv, mut dbv) = (dgamma, dbeta);
    let ev = epi_vecs(simd, n, nv, epi);
    {
        let empty_g: &mut [S::f32s] = &mut [];
        let empty_b: &mut [S::f32s] = &mut [];
        let dgh =
            dgv.as_deref_mut().map_or(empty_g, |d| &mut S::as_mut_simd_f32s(&mut d[..n]).0[..nv]);
        let dbh =
            dbv.as_deref_mut().map_or(empty_b, |d| &mut S::as_mut_simd_f32s(&mut d[..n]).0[..nv]);
        let rv = rec.vecs::<S, RY>(n, nv);
        specialize!(apply_k_vecs::<S, K, RY>(gamma.is_some(), want_g, want_b, ev.is_some())(
            simd,
            (&xs, &ds, rv),
            gh,
            (&pv, &ev.unwrap_or([(zero, &[][..]); K])),
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
        let et = epi[r].map(|(s, h)| (s, &h[base..n]));
        let row = (&rows[r].0[base..], &rows[r].1[base..n], gamma);
        apply_tail_from::<RY>(row, &p[r], (base, rec), dxr, (dg, db), et);
    }
}

/// The rows' epilogues (`Epi`) as vectors: (s splatted, h's whole vectors), where every row has
/// one (the rows of one call have one or none alike).
#[inline(always)]
#[allow(clippy::type_complexity)]
fn epi_vecs<'a, S: Simd, const K: usize>(
    simd: S,
    n: usize,
    nv: usize,
    epi: [Epi<'a>; K],
) -> Option<[(S::f32s, &'a [S::f32s]); K]> {
    if epi.iter().any(Option::is_none) {
        return None;
    }
    Some(core::array::from_fn(|k| match epi[k] {
        Some((s, h)) => (simd.splat_f32s(s), &S::as_simd_f32s(&h[..n]).0[..nv]),
        None => (simd.splat_f32s(1.0), &[][..]),
    }))
}

/// The vector body of [`apply_k`].
#[inline(always)]
#[allow(clippy::needless_range_loop, clippy::type_complexity)] // gh is empty without γ
fn apply_k_vecs<
    S: Simd,
    const K: usize,
    const RY: bool,
    const G: bool,
    const DG: bool,
    const DB: bool,
    const E: bool,
>(
    simd: S,
    (xs, ds, rv): (&[&[S::f32s]; K], &[&[S::f32s]; K], RecoverVecs<'_, S::f32s>),
    gh: &[S::f32s],
    (pv, ev): (&[BackVecs<S::f32s>; K], &[(S::f32s, &[S::f32s]); K]),
    out: &mut [f32],
    (dgh, dbh): (&mut [S::f32s], &mut [S::f32s]),
) {
    let n = out.len() / K;
    let nv = xs[0].len();
    // Every stream re-sliced to the vector count, so that the compiler sees the indices of
    // `apply_column` in bounds (as in `back_k_vecs`): it had kept three compare-and-branch
    // pairs, against lengths reloaded from the stack, in every vector column. Alternated in one
    // process on the Intel AVX-512 VM, one thread: 256×128 (from L2) +6%, 65536×128 +2%.
    let (xs, ds) = (&xs.map(|x| &x[..nv]), &ds.map(|d| &d[..nv]));
    let rv = rv.upto::<RY>(nv);
    let gh = if G { &gh[..nv] } else { gh };
    let dgh = if DG { &mut dgh[..nv] } else { dgh };
    let dbh = if DB { &mut dbh[..nv] } else { dbh };
    let ev = &ev.map(|(s, h)| (s, if E { &h[..nv] } else { h }));
    let mut chunks = out.chunks_exact_mut(n);
    let mut outs: [&mut [S::f32s]; K] = core::array::from_fn(|_| {
        let row = chunks.next().unwrap_or_default();
        &mut S::as_mut_simd_f32s(row).0[..nv]
    });
    for j in 0..nv {
        let g = if G { Some(gh[j]) } else { None };
        let src = (xs, ds, rv);
        apply_column::<S, K, RY, DG, DB, E>(simd, src, g, (pv, ev), j, &mut outs, (dgh, dbh));
    }
}

/// Vector column `j` of K rows' second sweep: their dx, and their dγ/dβ terms added to the
/// partials in row order in a register, so each partial vector is read and written once per K
/// rows (per row the operations of [`apply_in`]). Shared by the short-row groups and the
/// pipelined long-row sweep.
#[inline(always)]
#[allow(clippy::needless_range_loop, clippy::type_complexity)]
fn apply_column<
    S: Simd,
    const K: usize,
    const RY: bool,
    const DG: bool,
    const DB: bool,
    const E: bool,
>(
    simd: S,
    (xs, ds, rv): (&[&[S::f32s]; K], &[&[S::f32s]; K], RecoverVecs<'_, S::f32s>),
    g: Option<S::f32s>,
    (pv, ev): (&[BackVecs<S::f32s>; K], &[(S::f32s, &[S::f32s]); K]),
    j: usize,
    dx: &mut [&mut [S::f32s]; K],
    (dgh, dbh): (&mut [S::f32s], &mut [S::f32s]),
) {
    let zero = simd.splat_f32s(0.0);
    let (mut dgv, mut dbv) = (if DG { dgh[j] } else { zero }, if DB { dbh[j] } else { zero });
    for r in 0..K {
        let dyv = ds[r][j];
        let xv = rv.at::<S, RY>(simd, xs[r][j], j);
        let (d, xhat) = apply_step(simd, (xv, dyv, g), &pv[r]);
        dx[r][j] = if E { epilogue_step(simd, d, (ev[r].0, ev[r].1[j])) } else { d };
        if DG {
            dgv = simd.mul_add_f32s(dyv, xhat, dgv);
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

/// Backward of `mean.len()` consecutive rows of `n` in one explicit-SIMD loop (for short rows).
#[allow(clippy::too_many_arguments)]
pub(crate) fn back_rows(
    kind: Kind,
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
    let after = (&[][..], &[][..]);
    let (epi, rec) = (Epilogue::default(), Recover::default());
    let op =
        BackRows { kind, stream, n, x, dy, after, mean, rstd, gamma, dx, dgamma, dbeta, epi, rec };
    dispatch_plain(op)
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
    crate::isa::dispatch(FusedBackward { next, x, dy, gamma, p: *p, dx, dgamma, dbeta })
}

/// Backward of consecutive blocks of long rows (`f32`, in place), K rows per sweep (one; see
/// `with_simd`): the sweep writes rows r..r+K's dx while summing the next K rows' reductions.
/// With K = 2 each dγ/dβ partial is read and written once per pair of rows instead of once per
/// row, but the row constants spill (`docs/performance.md`: one row per sweep). Per row the
/// operations and their order are those of [`FusedBackward`] /
/// `row::back_apply` (dγ/dβ gain row r's term, then row r+1's), so the results are bitwise those
/// of the one-row pipeline whatever K is.
struct BackLong<'a> {
    kind: Kind,
    n: usize,
    x: &'a [f32],
    dy: &'a [f32],
    mean: &'a [f32],
    rstd: &'a [f32],
    gamma: Option<&'a [f32]>,
    dx: &'a mut [f32],
    partials: Partials<'a>,
    stream: bool,
    /// Applied to each row's dx before it is stored.
    epi: Epilogue<'a, f32>,
    /// How x is read (the rows as given, or x̂ recovered from y).
    rec: Recover<'a>,
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
    pub(super) fn of_row(
        &mut self,
        r: usize,
        n: usize,
    ) -> (Option<&mut [f32]>, Option<&mut [f32]>) {
        let b = r / crate::driver::ROW_BLOCK;
        crate::driver::block_partials(self.buf.as_deref_mut(), n, b, self.want)
    }
}

impl FromSource for BackLong<'_> {
    #[inline(always)]
    fn run_from<S: Simd, const RY: bool>(self, simd: S) {
        // One row per sweep on every instruction set. With AVX2's 16 registers the pair's
        // fourteen row constants spill; with AVX-512's 32 the pair's loop spilled nine of them
        // too (and its pointers), and on an Intel VM with AVX-512 (calls alternated in one
        // process, one thread) one row per sweep ran 4096×768 +43%, 4096×1024 +49%, 1024×4096
        // +17%, 256×16384 +3%, 16384×1024 +34% (two threads +35%, +33%, +8%, +4%, +33%); with
        // prefetches into L2 or none the pair was no faster. Two rows per sweep stays available
        // (and tested bitwise against one) for a core where it pays.
        self.run::<S, 1, RY>(simd)
    }
}

impl BackLong<'_> {
    /// The rows K at a time: each sweep writes rows r..r+K's dx while summing rows r+K..r+2K;
    /// x read through `self.rec` (`RY`: see [`Recover`]).
    #[inline(always)]
    fn run<S: Simd, const K: usize, const RY: bool>(mut self, simd: S) {
        let n = self.n;
        let rec = self.rec;
        let rows = self.mean.len().min(self.rstd.len());
        let (x, dy, gamma) = (self.x, self.dy, self.gamma);
        let span = |r: usize| r * n..(r + 1) * n;
        // Streamed, each sweep's dx is staged in L1 and then written with streaming stores.
        // With 512-bit vectors (one store a cache line) the staged rows are written during the
        // next sweep, a piece after each block, from the other half of the staging buffer; with
        // narrower vectors right after their sweep, in one burst. Alternated in one process, one
        // thread: on the Intel AVX-512 VM the pieces ran 16384×1024 +0–2%, 4096×4096 +6–8%,
        // 1024×16384 +10–13% (two threads alike), and forced to stream 4096×1024 +6–8%,
        // 256×16384 +7–9%; on the AMD Zen 3 VM (AVX2) the burst had been ahead by 2–8%.
        // Short rows are staged several sweeps to a span (see `Spans`).
        let burst = size_of::<S::f32s>() < 64;
        let mut spans = self.stream.then(|| Spans::new(K * n, burst));
        let mut sums = [[0f64; 3]; K];
        for (r, s) in sums.iter_mut().enumerate().take(rows.min(K)) {
            let row = (&x[span(r)], &dy[span(r)], gamma);
            *s = back_row_sums::<S, RY>(simd, row, rec, (self.mean[r], self.rstd[r]));
        }
        let mut r = 0;
        while r < rows {
            let params = |i: usize| {
                let (mu, rs) = (f64::from(self.mean[r + i]), f64::from(self.rstd[r + i]));
                row::back_params::<f32>(self.kind, n, mu, rs, sums[i])
            };
            let epi = self.epi;
            if r + 2 * K <= rows {
                // The pipelined case: these K rows' dx, the next K rows' sums.
                let p: [BackParams<f32>; K] = core::array::from_fn(params);
                let e: [Epi<'_>; K] = core::array::from_fn(|i| epi.row(r + i, n));
                let next: [(usize, f32, f32); K] = core::array::from_fn(|i| {
                    let q = r + K + i;
                    let (m, s) = row::back_shift_f32(self.mean[q], self.rstd[q]);
                    (q, m, s)
                });
                // With streaming, the rows' dx is staged in L1 and written as one span.
                let parts = self.partials.of_row(r, n);
                match spans.as_mut() {
                    Some(sp) => {
                        // One sweep a span: the pending span is written a piece after each
                        // block of the sweep (`back_k`); several: a share after each sweep.
                        let (staged, pend) = sp.next();
                        let pend = pend.map(|(f, prev)| (f, prev, &mut *self.dx));
                        sums = back_k::<S, K, RY>(
                            simd,
                            n,
                            (x, dy, gamma, rec),
                            (r, p, e),
                            next,
                            staged,
                            parts,
                            pend,
                        );
                        sp.staged(simd, self.dx);
                    }
                    None => {
                        let out = &mut self.dx[r * n..(r + K) * n];
                        let (src, cur) = ((x, dy, gamma, rec), (r, p, e));
                        sums = back_k::<S, K, RY>(simd, n, src, cur, next, out, parts, None);
                    }
                }
                r += K;
            } else {
                // The last rows: one at a time, each summing the row K after it.
                let p = params(0);
                let parts = self.partials.of_row(r, n);
                let src = (&x[span(r)], &dy[span(r)], gamma);
                let dxr = &mut self.dx[span(r)];
                apply_in_from::<S, RY>(simd, src, &p, dxr, parts, (epi.row(r, n), rec));
                sums.copy_within(1.., 0);
                if r + K < rows {
                    let q = r + K;
                    let row = (&x[span(q)], &dy[span(q)], gamma);
                    let (m, s) = (self.mean[q], self.rstd[q]);
                    sums[K - 1] = back_row_sums::<S, RY>(simd, row, rec, (m, s));
                }
                r += 1;
            }
        }
        // The last pipelined rows' staged dx (the tail rows above went straight to dx).
        if let Some(sp) = spans {
            sp.finish(simd, self.dx);
        }
    }
}

/// One row's backward sums from its saved statistics (as [`Backward`] forms them).
#[inline(always)]
fn back_row_sums<S: Simd, const RY: bool>(
    simd: S,
    rows: (&[f32], &[f32], Option<&[f32]>),
    rec: Recover<'_>,
    (mean, rstd): (f32, f32),
) -> [f64; 3] {
    backward_in_from::<S, RY>(simd, rows, row::back_shift_f32(mean, rstd), rec)
}

/// One sweep of [`BackLong`]: rows `r..r+K` (with their constants `p`) written into `dx` (K rows
/// of n), the rows in `next` (index, centering shift, scale) summed; returns the latter's sums.
/// `pending` (a flush, its staged rows, the whole dx) is written out a piece after each block.
#[inline(always)]
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn back_k<S: Simd, const K: usize, const RY: bool>(
    simd: S,
    n: usize,
    (x, dy, gamma, rec): (&[f32], &[f32], Option<&[f32]>, Recover<'_>),
    (r, p, epi): (usize, [BackParams<f32>; K], [Epi<'_>; K]),
    next: [(usize, f32, f32); K],
    dx: &mut [f32],
    (dgamma, dbeta): (Option<&mut [f32]>, Option<&mut [f32]>),
    pending: Option<(&mut Flush, &[f32], &mut [f32])>,
) -> [[f64; 3]; K] {
    let (xr, dr) = (|q: usize| &x[q * n..(q + 1) * n], |q: usize| &dy[q * n..(q + 1) * n]);
    let cx: [_; K] = core::array::from_fn(|k| S::as_simd_f32s(xr(r + k)));
    let cd: [_; K] = core::array::from_fn(|k| S::as_simd_f32s(dr(r + k)));
    let nx: [_; K] = core::array::from_fn(|k| S::as_simd_f32s(xr(next[k].0)));
    let nd: [_; K] = core::array::from_fn(|k| S::as_simd_f32s(dr(next[k].0)));
    let nv = cx[0].0.len();
    let base = n - cx[0].1.len();
    let gh = gamma.map_or(&[][..], |g| &S::as_simd_f32s(&g[..n]).0[..nv]);
    let (want_g, want_b) = (dgamma.is_some(), dbeta.is_some());
    let mut dgs = dgamma.map(|d| S::as_mut_simd_f32s(&mut d[..n]));
    let mut dbs = dbeta.map(|d| S::as_mut_simd_f32s(&mut d[..n]));
    let pv: [BackVecs<S::f32s>; K] = core::array::from_fn(|k| BackVecs::new(simd, &p[k]));
    let nk: [(S::f32s, S::f32s); K] =
        core::array::from_fn(|k| (simd.splat_f32s(next[k].1), simd.splat_f32s(next[k].2)));
    let empty: &mut [S::f32s] = &mut [];
    let (dgh, dbh) = (
        dgs.as_mut().map_or(empty, |d| &mut d.0[..nv]),
        dbs.as_mut().map_or(&mut [][..], |d| &mut d.0[..nv]),
    );
    let cur: [[&[S::f32s]; K]; 2] =
        [core::array::from_fn(|k| &cx[k].0[..nv]), core::array::from_fn(|k| &cd[k].0[..nv])];
    let nxt: [_; K] = core::array::from_fn(|k| (&nx[k].0[..nv], &nd[k].0[..nv]));
    let mut dxt: [&mut [f32]; K] = core::array::from_fn(|_| &mut [][..]);
    let dxh: [&mut [S::f32s]; K] = {
        let mut rows = dx.chunks_exact_mut(n);
        core::array::from_fn(|k| {
            let (head, tail) = S::as_mut_simd_f32s(rows.next().unwrap_or_default());
            dxt[k] = tail;
            &mut head[..nv]
        })
    };
    let ev = epi_vecs(simd, n, nv, epi);
    let zero = simd.splat_f32s(0.0);
    let rv = rec.vecs::<S, RY>(n, nv);
    let mut total =
        specialize!(back_k_vecs::<S, K, RY>(gamma.is_some(), want_g, want_b, ev.is_some())(
            simd,
            (nxt, nk, rv),
            (&cur, &pv, &ev.unwrap_or([(zero, &[][..]); K])),
            gh,
            dxh,
            (dgh, dbh),
            pending
        ));
    // Scalar tails: the next rows' sums, then these rows' dx and dγ/dβ terms in row order.
    let gt = gamma.map(|g| &g[base..n]);
    for k in 0..K {
        let (tail, shift) = ((nx[k].1, nd[k].1, gt), (next[k].1, next[k].2));
        backward_tail_from::<RY>(tail, shift, &mut total[k], (rec, base));
    }
    let (mut dgt, mut dbt) = (dgs.map(|d| d.1), dbs.map(|d| d.1));
    for (k, dxr) in dxt.into_iter().enumerate() {
        let (dg, db) = (dgt.as_deref_mut(), dbt.as_deref_mut());
        let et = epi[k].map(|(s, h)| (s, &h[base..n]));
        let row = (cx[k].1, cd[k].1, gamma);
        apply_tail_from::<RY>(row, &p[k], (base, rec), dxr, (dg, db), et);
    }
    total
}

/// The vector body of [`back_k`]; `G`: γ present, `DG`/`DB`: dγ/dβ wanted.
#[inline(always)]
#[allow(clippy::type_complexity, clippy::needless_range_loop)]
fn back_k_vecs<
    S: Simd,
    const K: usize,
    const RY: bool,
    const G: bool,
    const DG: bool,
    const DB: bool,
    const E: bool,
>(
    simd: S,
    (nxt, nk, rv): (
        [(&[S::f32s], &[S::f32s]); K],
        [(S::f32s, S::f32s); K],
        RecoverVecs<'_, S::f32s>,
    ),
    (cur, pv, ev): (&[[&[S::f32s]; K]; 2], &[BackVecs<S::f32s>; K], &[(S::f32s, &[S::f32s]); K]),
    gh: &[S::f32s],
    dxh: [&mut [S::f32s]; K],
    (dgh, dbh): (&mut [S::f32s], &mut [S::f32s]),
    mut pending: Option<(&mut Flush, &[f32], &mut [f32])>,
) -> [[f64; 3]; K] {
    let nv = cur[0][0].len();
    // Every stream re-sliced to the row's vector count, so that the compiler sees the indices
    // below in bounds and drops three of the four compare-and-branch pairs it put in every
    // vector (AVX2: 50 → 43 instructions a vector, in a loop that from cache is bound by how
    // many instructions the core can dispatch). Measured on the AMD Zen 3 VM with calls
    // alternated in one process: 64×768 +8%, the benchmark shapes +1–5%.
    let nxt = nxt.map(|(x, d)| (&x[..nv], &d[..nv]));
    let cur = &cur.map(|rows| rows.map(|r| &r[..nv]));
    let mut dxh = dxh.map(|d| &mut d[..nv]);
    let rv = rv.upto::<RY>(nv);
    let gh = if G { &gh[..nv] } else { gh };
    let dgh = if DG { &mut dgh[..nv] } else { dgh };
    let dbh = if DB { &mut dbh[..nv] } else { dbh };
    let zero = simd.splat_f32s(0.0);
    let mut total = [[0f64; 3]; K];
    let pb = per_block::<S>();
    let lanes = size_of::<S::f32s>() / 4;
    let per_line = (16 / lanes).max(1);
    let mut i = 0;
    while i < nv {
        let end = (i + pb).min(nv);
        let mut acc = [[zero; 3]; K];
        for j in i..end {
            // Once per cache line: the summed rows' lines and dx's BACK_AHEAD further on.
            if j % per_line == 0 {
                for k in 0..K {
                    let (x, dy) =
                        (nxt[k].0.as_ptr().cast::<f32>(), nxt[k].1.as_ptr().cast::<f32>());
                    let dx = dxh[k].as_ptr().cast::<f32>();
                    prefetch_line(x.wrapping_add(j * lanes + BACK_AHEAD));
                    prefetch_line(dy.wrapping_add(j * lanes + BACK_AHEAD));
                    prefetch_line(dx.wrapping_add(j * lanes + BACK_AHEAD));
                }
            }
            let g = if G { Some(gh[j]) } else { None };
            for k in 0..K {
                let xv = rv.at::<S, RY>(simd, nxt[k].0[j], j);
                backward_step(simd, (xv, nxt[k].1[j], g), nk[k], &mut acc[k]);
            }
            let src = (&cur[0], &cur[1], rv);
            apply_column::<S, K, RY, DG, DB, E>(simd, src, g, (pv, ev), j, &mut dxh, (dgh, dbh));
        }
        if let Some((f, src, y)) = pending.as_mut() {
            let upto = f.body * end / nv;
            f.write(simd, src, y, upto);
        }
        for k in 0..K {
            fold_into(simd, acc[k], &mut total[k]);
        }
        i = end;
    }
    total
}

/// Backward of consecutive blocks of long rows in place (see [`BackLong`]), pipelined across the
/// blocks' boundaries, each row's dx through `epi` before it is stored.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(crate) fn back_long(
    kind: Kind,
    n: usize,
    (x, dy, mean, rstd): (&[f32], &[f32], &[f32], &[f32]),
    gamma: Option<&[f32]>,
    dx: &mut [f32],
    partials: Partials<'_>,
    stream: bool,
    epi: Epilogue<'_, f32>,
) {
    let rec = Recover::default();
    dispatch_plain(BackLong { kind, n, x, dy, mean, rstd, gamma, dx, partials, stream, epi, rec })
}

/// The backward of consecutive blocks of rows from y with x̂ recovered in registers (`rec`,
/// see [`Recover`]): the kernels of `f32`'s `Real::back_blocks` ([`back_short_blocks`] below
/// `row::F32_BACK_LONG_MIN_N`, [`back_long`] from it), the rows `x` being y's, given a saved
/// mean of 0 and an rstd of 1 (so each row's dx' = dx/rstd goes through `epi`, which scales it
/// by the saved rstd and adds dh). The same bits as those kernels on the x̂ `stage::recover`
/// stages.
#[allow(clippy::type_complexity)]
pub(crate) fn back_blocks_recovered(
    (kind, n): (Kind, usize),
    (x, dy, mean, rstd): (&[f32], &[f32], &[f32], &[f32]),
    (gamma, rec): (Option<&[f32]>, Recover<'_>),
    (dx, partials): (&mut [f32], Partials<'_>),
    (stream, epi): (bool, Epilogue<'_, f32>),
) {
    if n < row::F32_BACK_LONG_MIN_N {
        let op = ShortBlocks { kind, stream, n, x, dy, mean, rstd, gamma, dx, partials, epi, rec };
        dispatch_from(op, rec)
    } else {
        let op = BackLong { kind, n, x, dy, mean, rstd, gamma, dx, partials, stream, epi, rec };
        dispatch_from(op, rec)
    }
}

/// (Σd, Σg, Σg·d) with d = (x − m)·s and g = dy·γ (dy when γ is absent).
pub(crate) fn backward_sums(
    x: &[f32],
    dy: &[f32],
    gamma: Option<&[f32]>,
    m: f32,
    s: f32,
) -> [f64; 3] {
    crate::isa::dispatch(Backward { x, dy, gamma, m, s })
}

#[cfg(feature = "unit-tests")]
#[doc(hidden)]
pub mod tests {
    use super::*;
    use crate::reduce::tests::{SPECS, close, reference_spec};
    use layernorm_core::{DType, reference};

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

    /// `BackLong` with two rows per sweep (the kernels run one: see its `run_from`).
    struct TwoRowsPerSweep<'a>(BackLong<'a>);

    impl WithSimd for TwoRowsPerSweep<'_> {
        type Output = ();
        fn with_simd<S: Simd>(self, simd: S) {
            self.0.run::<S, 2, false>(simd)
        }
    }

    pub fn one_and_two_rows_per_sweep_give_the_same_bits_on_every_instruction_set() {
        // The kernels run one row per sweep; streamed dx (staged, and on AVX-512 written during
        // the next sweep) must give the bits of ordinary stores on every instruction set, through
        // the kernels' own entry (`Sourced`, as `dispatch_plain` runs them: no second copy of
        // them is compiled for the test). Two rows per sweep (kept for cores where they pay) must
        // give the same bits too: checked at AVX2's 8 lanes (scalar off x86-64), where rows of
        // these lengths have vector tails; compiled at every width it was 9% of this crate's
        // optimized code.
        let shapes = [(37usize, 256usize), (64, 300), (5, 515), (33, 1024)];
        for ((rows, n), kind) in
            shapes.into_iter().flat_map(|s| [Kind::LayerNorm, Kind::RmsNorm].map(|k| (s, k)))
        {
            let x = rows_of(rows, n, 3, true);
            let dy = rows_of(rows, n, 5, false);
            let g: Vec<f32> = (0..n).map(|j| 0.75 + j as f32 / n as f32).collect();
            let centred = if kind.centred() { 1.0 } else { 0.0 };
            let mean: Vec<f32> = (0..rows).map(|r| centred * (1.0 + r as f32 * 0.01)).collect();
            let rstd: Vec<f32> = (0..rows).map(|r| 0.9 + r as f32 * 0.003).collect();
            let blocks = rows.div_ceil(crate::driver::ROW_BLOCK);
            // dx at an odd offset, so that streamed rows have heads and tails to write; `sweep`
            // runs one `BackLong` (one or two rows per sweep) on some instruction set.
            let run = |stream: bool, sweep: &dyn Fn(BackLong<'_>)| {
                let mut buf = vec![-7f32; rows * n + 3];
                let mut parts = vec![0f32; blocks * 2 * n];
                let partials = Partials { buf: Some(&mut parts), want: (true, true) };
                let (x, dy, mean, rstd, gamma) =
                    (&x[..], &dy[..], &mean[..], &rstd[..], Some(&g[..]));
                let epi = Epilogue::default();
                let rec = Recover::default();
                sweep(BackLong {
                    kind,
                    n,
                    x,
                    dy,
                    mean,
                    rstd,
                    gamma,
                    dx: &mut buf[3..],
                    partials,
                    stream,
                    epi,
                    rec,
                });
                crate::reduce::stream_fence();
                assert_eq!(buf[..3], [-7.0; 3], "wrote before dx, {rows}x{n}");
                (
                    buf[3..].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    parts.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                )
            };
            for_each_isa!(simd, isa => {
                let one = one_row(simd);
                let (want, got) = (run(false, &one), run(true, &one));
                assert!(got.0 == want.0, "dx, {isa}, {rows}x{n}, streamed, {kind:?}");
                assert!(got.1 == want.1, "dγ/dβ partials, {isa}, {rows}x{n}, streamed, {kind:?}");
            });
            #[cfg(target_arch = "x86_64")]
            if let Some(simd) = pulp::x86::V3::try_new() {
                two_rows_match_one(simd, &run, (rows, n, kind));
            }
            #[cfg(not(target_arch = "x86_64"))]
            two_rows_match_one(pulp::Scalar::new(), &run, (rows, n, kind));
        }
    }

    /// `BackLong` through the kernels' own entry on `simd` (`Sourced`, as `dispatch_plain` runs
    /// it: one row per sweep).
    fn one_row<S: Simd>(simd: S) -> impl Fn(BackLong<'_>) {
        move |long| pulp::Simd::vectorize(simd, Sourced::<_, false>(long))
    }

    /// Two rows per sweep on `simd` against one, both ordinary and streamed stores.
    #[allow(clippy::type_complexity)]
    fn two_rows_match_one<S: Simd>(
        simd: S,
        run: &dyn Fn(bool, &dyn Fn(BackLong<'_>)) -> (Vec<u32>, Vec<u32>),
        (rows, n, kind): (usize, usize, Kind),
    ) {
        let want = run(false, &one_row(simd));
        for stream in [false, true] {
            let got = run(stream, &|long| pulp::Simd::vectorize(simd, TwoRowsPerSweep(long)));
            assert!(got.0 == want.0, "dx, two rows, {rows}x{n}, stream={stream}, {kind:?}");
            assert!(
                got.1 == want.1,
                "dγ/dβ partials, two rows, {rows}x{n}, stream={stream}, {kind:?}"
            );
        }
    }

    pub fn the_kernels_recover_xhat_from_y_with_the_bits_of_the_staged_rows_on_every_instruction_set()
     {
        // A backward from y: the kernels reading y through a `Recover` against the same kernels
        // on the x̂ `stage::recover` stages, both with a mean of 0, an rstd of 1 and the
        // epilogue fma(rstd, dx', dh), short rows and long (`row::F32_BACK_LONG_MIN_N` = 64).
        let rows = 37;
        let lengths = [1usize, 3, 16, 33, 63, 64, 65, 128, 255, 300, 515];
        let kinds = [Kind::LayerNormFromY, Kind::RmsNorm];
        let params = [(true, true), (false, true), (true, false), (false, false)];
        for (n, kind) in lengths.into_iter().flat_map(|n| kinds.map(|k| (n, k))) {
            let y = rows_of(rows, n, 13, true);
            let dy = rows_of(rows, n, 17, false);
            let dh = rows_of(rows, n, 19, false);
            let g: Vec<f32> =
                (0..n).map(|j| if j % 7 == 3 { -0.4 } else { 0.3 + j as f32 / n as f32 }).collect();
            let inverse: Vec<f32> = g.iter().map(|&g| 1.0 / g).collect();
            let b: Vec<f32> = (0..n).map(|j| 0.1 * (j % 5) as f32 - 0.2).collect();
            let zeros = vec![0f32; n.max(rows)];
            let ones = vec![1f32; n.max(rows)];
            let rstd: Vec<f32> = (0..rows).map(|r| 0.9 + r as f32 * 0.003).collect();
            let blocks = rows.div_ceil(crate::driver::ROW_BLOCK);
            for ((with_b, with_g), with_dh) in
                params.into_iter().flat_map(|p| [false, true].map(|h| (p, h)))
            {
                let (beta, gamma) = (with_b.then_some(&b[..]), with_g.then_some(&g[..]));
                let mut xhat = vec![0f32; rows * n];
                let staged =
                    gamma.map(|_| crate::stage::Gamma { values: &inverse[..], divide: false });
                crate::stage::recover::<f32>(n, &y, beta, staged, &mut xhat);
                let rec =
                    Recover::new((beta, gamma.map(|_| &inverse[..])), (&zeros[..], &ones[..]), n);
                let epi = Epilogue {
                    scale: Some(&rstd[..]),
                    dh: with_dh.then_some(&dh[..]),
                    zeros: &zeros[..n],
                };
                for_each_isa!(simd, isa => {
                    for stream in [false, true] {
                        let run = |x: &[f32], rec: Recover<'_>| {
                            let mut buf = vec![-7f32; rows * n + 3];
                            let mut parts = vec![0f32; blocks * 2 * n];
                            let partials = Partials { buf: Some(&mut parts), want: (true, true) };
                            let (dy, mean, rstd, dx) = (&dy[..], &zeros[..rows], &ones[..rows], &mut buf[3..]);
                            if n < row::F32_BACK_LONG_MIN_N {
                                let op = ShortBlocks { kind, stream, n, x, dy, mean, rstd, gamma, dx, partials, epi, rec };
                                by_source!(rec, |RY| pulp::Simd::vectorize(simd, Sourced::<_, RY>(op)));
                            } else {
                                let op = BackLong { kind, n, x, dy, mean, rstd, gamma, dx, partials, stream, epi, rec };
                                by_source!(rec, |RY| pulp::Simd::vectorize(simd, Sourced::<_, RY>(op)));
                            }
                            crate::reduce::stream_fence();
                            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                            (bits(&buf), bits(&parts))
                        };
                        let (want, got) = (run(&xhat, Recover::default()), run(&y, rec));
                        let what = format!("{isa}, n={n}, {kind:?}, β {with_b}, γ {with_g}, dh {with_dh}, stream {stream}");
                        assert!(got.0 == want.0, "dx, {what}");
                        assert!(got.1 == want.1, "dγ/dβ partials, {what}");
                    }
                });
            }
        }
    }

    pub fn the_backward_kernels_are_right_on_every_instruction_set() {
        let rows = 37;
        let lengths = [3usize, 16, 33, 128, 255, 256, 300, 515, 1024];
        for (n, (rs, _)) in
            lengths.into_iter().flat_map(|n| SPECS[..2].iter().map(move |s| (n, *s)))
        {
            let kind = rs.kind;
            let x = rows_of(rows, n, 7, true);
            let dy = rows_of(rows, n, 11, false);
            let g: Vec<f32> = (0..n).map(|j| 0.5 + j as f32 / n as f32).collect();
            let spec = reference_spec(rs, rows, n, DType::F32).with_beta(true);
            let wide = |v: &[f32]| v.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
            let fwd = reference::forward(&spec, &wide(&x), Some(&wide(&g)), Some(&vec![0.0; n]))
                .unwrap_or_else(|e| panic!("{e}"));
            let (mean, rstd): (Vec<f32>, Vec<f32>) = (
                fwd.mean
                    .clone()
                    .unwrap_or_else(|| vec![0.0; rows])
                    .iter()
                    .map(|&v| v as f32)
                    .collect(),
                fwd.rstd.iter().map(|&v| v as f32).collect(),
            );
            let want = reference::backward(
                &spec,
                &wide(&x),
                &wide(&dy),
                fwd.mean.as_deref(),
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
                        let epi = Epilogue::default();
                        let rec = Recover::default();
                        pulp::Simd::vectorize(simd, Sourced::<_, false>(BackLong { kind, n, x, dy, mean, rstd, gamma, dx, partials, stream, epi, rec }));
                        if let (Some(g), Some(b)) = (dgamma, dbeta) {
                            for j in 0..n {
                                let sum = |o: usize| (0..blocks).map(|k| f64::from(parts[2 * n * k + o + j])).sum::<f64>();
                                (g[j], b[j]) = (sum(0) as f32, sum(n) as f32);
                            }
                        }
                    } else {
                        let after = (&[][..], &[][..]);
                        let epi = Epilogue::default();
                        let rec = Recover::default();
                        pulp::Simd::vectorize(simd, Sourced::<_, false>(BackRows { kind, stream, n, x, dy, after, mean, rstd, gamma, dx, dgamma, dbeta, epi, rec }));
                    }
                    crate::reduce::stream_fence();
                    let what = format!("{isa}, n={n}, long={long}, stream={stream}, {kind:?}");
                    close(&format!("dx {what}"), &dxbuf[3..], &want.dx, 2e-5);
                    close(&format!("dgamma {what}"), &dg, &want_dg, 1e-4);
                    close(&format!("dbeta {what}"), &db, &want_db, 1e-5);
                }
            });
        }
    }
}
