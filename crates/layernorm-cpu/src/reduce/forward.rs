//! The forward kernels: the residual sums, the pipelined long-row sweep, the short-row groups.

use pulp::{Simd, WithSimd};

use super::steps::*;
use super::store::*;
use crate::driver::Out;
use crate::row::{self, Kind};

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
        centered_in(simd, self.x, (self.m, self.s, self.ml))
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
    stream: bool,
}

impl WithSimd for Fused<'_> {
    type Output = [f64; 2];
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> [f64; 2] {
        let params = (self.m_hi, self.m_lo, self.r);
        let (cur, gb) = (self.cur, (self.gamma, self.beta));
        let out = if self.stream { Out::Streamed } else { Out::Cached };
        fused_in(simd, (self.next, self.m_next), (cur, params), gb, self.y, out, None)
    }
}

/// Where [`fused_in`] puts a streamed row's first and last 16 values (the former cover the
/// elements before its first line boundary, the latter those after its last), instead of
/// writing those elements to y: the caller writes them, joining each row's last line with the
/// next row's first ([`Carry::join`]).
type Edges<'e> = Option<(&'e mut [f32; 16], &'e mut [f32; 16])>;

/// y of the 16 elements `x[at..at + 16]` of a row, in vectors: the values `normalize_tail`
/// computes one by one (the same operations in the same order).
#[inline(always)]
fn normalize_16<S: Simd>(
    simd: S,
    (x, at): (&[f32], usize),
    params: (f32, f32, f32),
    (gamma, beta): (Option<&[f32]>, Option<&[f32]>),
    out: &mut [f32; 16],
) {
    let k = xhat_splats(simd, params);
    let xs = S::as_simd_f32s(&x[at..at + 16]).0;
    let g = gamma.map_or(&[][..], |g| S::as_simd_f32s(&g[at..at + 16]).0);
    let b = beta.map_or(&[][..], |b| S::as_simd_f32s(&b[at..at + 16]).0);
    let o = S::as_mut_simd_f32s(out).0;
    for (j, (o, &v)) in o.iter_mut().zip(xs).enumerate() {
        *o = match (gamma.is_some(), beta.is_some()) {
            (true, true) => normalize_vec::<S, true, true>(simd, v, k, (g, b), j),
            (true, false) => normalize_vec::<S, true, false>(simd, v, k, (g, b), j),
            (false, true) => normalize_vec::<S, false, true>(simd, v, k, (g, b), j),
            (false, false) => normalize_vec::<S, false, false>(simd, v, k, (g, b), j),
        };
    }
}

/// [`Fused`]'s sweep: `cur` normalized into `y` with (m_hi, m_lo, r) while `next`'s residual sums
/// from `m_next` are formed; `out` says how y is written.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn fused_in<S: Simd>(
    simd: S,
    (next, m_next): (&[f32], f32),
    (cur, (m_hi, m_lo, r)): (&[f32], (f32, f32, f32)),
    (gamma, beta): (Option<&[f32]>, Option<&[f32]>),
    y: &mut [f32],
    out: Out,
    edges: Edges<'_>,
) -> [f64; 2] {
    let n = cur.len();
    let (nh, nt) = S::as_simd_f32s(&next[..n]);
    let zero = simd.splat_f32s(0.0);
    let k = (simd.splat_f32s(m_next), simd.splat_f32s(1.0), zero);
    let (mh, nml, rv) = xhat_splats(simd, (m_hi, m_lo, r));
    // Streamed, this row's vectors run from its first vector boundary to its last line
    // boundary (see `stream_span`): up to three fewer than the next row's, which is why the
    // vector body normalizes only `ch.len()` of them.
    let (lines, stream) = stream_span::<S>(&y[..n], out.stream());
    let (p, q) = if stream { (lines.start, lines.end) } else { (0, n) };
    let mut edges = if stream { edges } else { None };
    if stream && edges.is_none() {
        // The line this row shares with the next, which both write with ordinary stores
        // (see `stream_span`).
        prefetch_line(&y[n - 1]);
    }
    match edges.as_mut() {
        _ if p == 0 => {}
        Some((h, _)) => normalize_16(simd, (cur, 0), (m_hi, m_lo, r), (gamma, beta), h),
        None => normalize_head(cur, (m_hi, m_lo, r), (gamma, beta), y, p),
    }
    let ch = S::as_simd_f32s(&cur[p..q]).0;
    let yh = S::as_mut_simd_f32s(&mut y[p..q]).0;
    let base = p + ch.len() * (size_of::<S::f32s>() / 4);
    let gh = gamma.map_or(&[][..], |g| S::as_simd_f32s(&g[p..n]).0);
    let bh = beta.map_or(&[][..], |b| S::as_simd_f32s(&b[p..n]).0);
    let (g, b) = (gamma.is_some(), beta.is_some());
    let (pf, kc) = (out.prefetch(), (mh, nml, rv));
    let mut total =
        specialize!(fused_vecs::<S>(g, b, stream)(simd, (nh, k), (ch, kc), (gh, bh), yh, pf));
    centered_tail(nt, (m_next, 1.0, 0.0), &mut total);
    match edges {
        _ if base == n => {}
        Some((_, t)) => normalize_16(simd, (cur, n - 16), (m_hi, m_lo, r), (gamma, beta), t),
        None => {
            let (x, y) = (&cur[base..n], &mut y[base..n]);
            normalize_tail(x, (m_hi, m_lo, r), (gamma, beta), base, y);
        }
    }
    total
}

/// The vector body of [`Fused`]: the next row's sums, this row's normalize; with `prefetch_out`
/// (ordinary stores only), y's lines [`OUT_AHEAD`] on are asked for as the sweep goes.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn fused_vecs<S: Simd, const G: bool, const B: bool, const ST: bool>(
    simd: S,
    next: (&[S::f32s], (S::f32s, S::f32s, S::f32s)),
    cur: (&[S::f32s], (S::f32s, S::f32s, S::f32s)),
    gb: (&[S::f32s], &[S::f32s]),
    yh: &mut [S::f32s],
    prefetch_out: bool,
) -> [f64; 2] {
    if prefetch_out && !ST {
        fused_lines::<S, G, B, ST, true>(simd, next, cur, gb, yh)
    } else {
        fused_lines::<S, G, B, ST, false>(simd, next, cur, gb, yh)
    }
}

/// [`fused_vecs`] with the y prefetch decided at compile time (`PF`): a run-time flag was
/// reloaded from the stack and tested on every line (two of its 38 instructions). Measured on
/// the AMD Zen 3 VM in alternating runs: 4096×768 +8–11%, 64×768 +2–4%, 1024×4096 even.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn fused_lines<S: Simd, const G: bool, const B: bool, const ST: bool, const PF: bool>(
    simd: S,
    (nh, k): (&[S::f32s], (S::f32s, S::f32s, S::f32s)),
    (ch, (mh, ml, r)): (&[S::f32s], (S::f32s, S::f32s, S::f32s)),
    (gh, bh): (&[S::f32s], &[S::f32s]),
    yh: &mut [S::f32s],
) -> [f64; 2] {
    let yh = &mut yh[..ch.len()];
    let mut total = [0f64; 2];
    let pb = per_block::<S>();
    let lanes = size_of::<S::f32s>() / 4;
    // One prefetch per cache line of the summed row: the inner loop covers one line.
    let per_line = (16 / lanes).max(1);
    let ahead = nh.as_ptr().cast::<f32>().wrapping_add(FORWARD_AHEAD);
    let out_ahead = yh.as_ptr().cast::<f32>().wrapping_add(OUT_AHEAD);
    let mut i = 0;
    while i < nh.len() {
        let end = (i + pb).min(nh.len());
        // Vectors of both rows, then (streamed rows only: this row's vectors are its whole
        // lines) up to three of the next row alone. In the row's last block `both` may fall
        // below `i`: the block then has no vector of this row.
        let both = end.min(ch.len());
        // The streams re-sliced to `both`, so that the compiler sees the indices below in
        // bounds and drops the four compare-and-branch pairs it put in every line (AVX2: 48 → 38
        // instructions a line, in a loop that from cache is bound by how many instructions the
        // core can dispatch). Measured on the AMD Zen 3 VM with calls alternated in one process:
        // 64×768 +9%, 4096×768 +6–8%, the other shapes 0–6% (single passes −3% to +6%).
        let (nb, ch, yh) = (&nh[..both], &ch[..both], &mut yh[..both]);
        let gh = if G { &gh[..both] } else { gh };
        let bh = if B { &bh[..both] } else { bh };
        let mut acc = [simd.splat_f32s(0.0); 2];
        let mut j = i;
        // Whole cache lines (a block is a whole number of them), then the row's last vectors.
        while j + per_line <= both {
            prefetch_line(ahead.wrapping_add(j * lanes));
            if PF {
                prefetch_line(out_ahead.wrapping_add(j * lanes));
            }
            for q in j..j + per_line {
                centered_step::<S, true>(simd, nb[q], k, &mut acc);
                put::<S>(
                    &mut yh[q],
                    normalize_vec::<S, G, B>(simd, ch[q], (mh, ml, r), (gh, bh), q),
                    ST,
                );
            }
            j += per_line;
        }
        for q in j..both {
            centered_step::<S, true>(simd, nb[q], k, &mut acc);
            put::<S>(
                &mut yh[q],
                normalize_vec::<S, G, B>(simd, ch[q], (mh, ml, r), (gh, bh), q),
                ST,
            );
        }
        for &v in &nh[both.max(i)..end] {
            centered_step::<S, true>(simd, v, k, &mut acc);
        }
        fold_into(simd, acc, &mut total);
        i = end;
    }
    total
}

/// Forward of consecutive long rows (`f32`, in place) in one dispatch: row r is normalized in the
/// sweep that sums row r+1 (see [`Fused`]); the shift, the statistics and the sweep of each row
/// are inlined into one loop, with no call or dispatch per row. Per row the operations are those
/// of the generic pipelined loop (`simd::forward_rows`), so the results are bitwise equal.
struct Long<'a> {
    n: usize,
    spec: row::Spec,
    x: &'a [f32],
    gamma: Option<&'a [f32]>,
    beta: Option<&'a [f32]>,
    y: &'a mut [f32],
    mean: &'a mut [f32],
    rstd: &'a mut [f32],
    out: Out,
}

impl WithSimd for Long<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let n = self.n;
        let rows = self.mean.len().min(self.rstd.len());
        if rows == 0 || n == 0 {
            return;
        }
        let (x, gb) = (self.x, (self.gamma, self.beta));
        // Streamed rows shorter than `FUSE_MIN_N` are staged several together and written as
        // one span of ~8 KiB (as the short-row groups do; per row, each 512-byte row streamed
        // from registers had partial lines at its ends: 65536×128 one thread 19–20 → 24–25 GB/s,
        // two 39 → 47, 32768×256 +19%, 262144×128 +18%). Longer rows stream from registers:
        // staged, N = 512 and 768 lost 3–5%.
        let mut spans = (self.out.stream() && n < row::FUSE_MIN_N).then(|| Spans::new(n, false));
        let out = if spans.is_some() { Out::Cached } else { self.out };
        // Rows streamed from registers leave the elements before their first and after their
        // last line boundary to this loop, which streams each row's last line joined with the
        // next row's first (`Carry::join`): before, the two partial lines of every row were
        // written with ordinary stores a row apart, each first reading the line, and computed
        // one element at a time. Intel AVX-512 VM, y 16 bytes past a line (a `Vec`), calls
        // alternated in one process: 16384×1024 +14–20% on one thread, +16–19% on two (0.96–0.97
        // of the streaming bar), 65536×512 +21%, 8192×2048 +8%, rows of 768, 777 and 4096
        // +1–7%; with y on a line (nothing to join) +5%, for the shared line is no longer
        // prefetched where the row ends on a boundary and streams it whole.
        let join = spans.is_none() && out.stream();
        let (mut carry, mut head, mut tail) = (Carry::default(), [0f32; 16], [0f32; 16]);
        let kind = self.spec.kind;
        let mut m_next = shift_of(simd, kind, row_at(x, n, 0));
        let mut sums = centered_in(simd, row_at(x, n, 0), (m_next, 1.0, 0.0));
        for r in 0..rows {
            let cur_row = row_at(x, n, r);
            let st = row::finish(self.spec, cur_row, m_next, sums);
            let params = st.params();
            let y = match spans.as_mut() {
                Some(sp) => sp.next().0,
                None => &mut self.y[r * n..(r + 1) * n],
            };
            if r + 1 < rows {
                let next = row_at(x, n, r + 1);
                m_next = shift_of(simd, kind, next);
                if join {
                    let (lines, stream) = stream_span::<S>(y, true);
                    let edges = stream.then_some((&mut head, &mut tail));
                    sums = fused_in(simd, (next, m_next), (cur_row, params), gb, y, out, edges);
                    if stream {
                        let (p, q) = (lines.start, lines.end);
                        carry.join::<S>(self.y, r * n, &head, p);
                        if q < n {
                            carry.hold(r * n + q, n - q, &tail);
                        }
                    }
                } else {
                    sums = fused_in(simd, (next, m_next), (cur_row, params), gb, y, out, None);
                }
            } else {
                normalize_in(simd, cur_row, params, gb, y, out.stream());
            }
            self.mean[r] = st.mean as f32;
            self.rstd[r] = st.rstd as f32;
            if let Some(sp) = spans.as_mut() {
                sp.staged(simd, self.y);
            }
        }
        carry.write(self.y);
        if let Some(sp) = spans {
            sp.finish(simd, self.y);
        }
    }
}

/// Forward of `mean.len()` consecutive rows of `n` (long rows), pipelined in one dispatch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn long(
    n: usize,
    spec: row::Spec,
    x: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    out: Out,
) {
    crate::isa::dispatch(Long { n, spec, x, gamma, beta, y, mean, rstd, out })
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
    stream: bool,
) -> [f64; 2] {
    crate::isa::dispatch(Fused { next, m_next, cur, m_hi, m_lo, r, gamma, beta, y, stream })
}

struct Shift<'a>(&'a [f32]);

impl WithSimd for Shift<'_> {
    type Output = f32;
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> f32 {
        shift_in(simd, self.0)
    }
}

/// The forward's shift of one row (see [`shift_in`]).
pub(crate) fn shift(x: &[f32]) -> f32 {
    crate::isa::dispatch(Shift(x))
}

/// (Σe, Σe²) with e = (x − m)·s − ml, in `f32` lanes, blocks in `f64`.
pub(crate) fn centered(x: &[f32], m: f32, s: f32, ml: f32) -> [f64; 2] {
    crate::isa::dispatch(Centered { x, m, s, ml })
}

/// Forward of consecutive short rows in one dispatch, in groups of up to [`GROUP_ROWS`] rows: the
/// group's shifts and residual sums (four rows side by side), the statistics of all its rows at
/// once ([`Group`]), then the normalize sweep from L1 while the next group is prefetched. Per row
/// the operations are those of `row::rows_portable`, so the bits are too (tested).
struct Rows<'a> {
    n: usize,
    spec: row::Spec,
    x: &'a [f32],
    gamma: Option<&'a [f32]>,
    beta: Option<&'a [f32]>,
    y: &'a mut [f32],
    mean: &'a mut [f32],
    rstd: &'a mut [f32],
    out: Out,
}

impl WithSimd for Rows<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let n = self.n;
        let rows = self.mean.len().min(self.rstd.len());
        let per = group_rows(n);
        let mut g = Group::default();
        // With streaming, a group's output is staged in L1 and written out as one span (only the
        // span's two ends are partial cache lines; per row, two in every row would be), each
        // row's whole lines as soon as they are complete.
        let mut stage = self.out.stream().then(|| staging(per * n));
        let mut start = 0;
        while start < rows {
            let count = per.min(rows - start);
            let row = |i: usize| &self.x[(start + i) * n..(start + i + 1) * n];
            // Phase 1: the group's sums, four rows side by side (independent dependency chains).
            let mut i = 0;
            while i + 4 <= count {
                g.sums::<S, 4>(
                    simd,
                    self.spec.kind,
                    i,
                    [row(i), row(i + 1), row(i + 2), row(i + 3)],
                );
                i += 4;
            }
            while i < count {
                g.sums::<S, 1>(simd, self.spec.kind, i, [row(i)]);
                i += 1;
            }
            // Phase 2: the statistics of all the group's rows at once.
            g.finish(self.spec, n);
            for i in 0..count {
                if g.rare[i] {
                    let st = row::finish(self.spec, row(i), g.shift[i], [g.sd[i], g.sdd[i]]);
                    g.set(i, &st);
                }
            }
            // Phase 3: normalize, from L1, while the next group is fetched.
            let w = size_of::<S::f32s>() / 4;
            let mut flush =
                stage.is_some().then(|| Flush::new::<S>(self.y, start * n..(start + count) * n));
            for i in 0..count {
                let next = (start + count + i) * n;
                if next < self.x.len() {
                    prefetch(&self.x[next..(next + n).min(self.x.len())]);
                    if self.out.prefetch() {
                        prefetch(&self.y[next..(next + n).min(self.y.len())]);
                    }
                }
                let (x, r) = (row(i), start + i);
                let params = (g.m_hi[i], g.m_lo[i], g.rstd[i] as f32);
                let y = match stage.as_mut() {
                    Some((buf, off)) => &mut buf[*off + i * n..*off + (i + 1) * n],
                    None => &mut self.y[r * n..(r + 1) * n],
                };
                normalize_in(simd, x, params, (self.gamma, self.beta), y, false);
                self.mean[r] = g.mean[i] as f32;
                self.rstd[r] = g.rstd[i] as f32;
                if let (Some(f), Some((buf, off))) = (flush.as_mut(), stage.as_ref()) {
                    f.write(simd, &buf[*off..], self.y, ((i + 1) * n).saturating_sub(f.head) / w);
                }
            }
            if let (Some(f), Some((buf, off))) = (flush, stage.as_ref()) {
                f.finish(simd, &buf[*off..], self.y);
            }
            start += count;
        }
        unstage(stage);
    }
}

/// The statistics of a group of short rows, computed across rows (one row per lane).
#[derive(Default)]
pub(super) struct Group {
    /// Each row's shift (see `row::shift`).
    pub(super) shift: [f32; GROUP_ROWS],
    /// Σd and Σd² of the residuals d = x − shift.
    pub(super) sd: [f64; GROUP_ROWS],
    pub(super) sdd: [f64; GROUP_ROWS],
    /// What `row::finish` returns: m_hi, m_lo (rounded), mean and rstd.
    pub(super) m_hi: [f32; GROUP_ROWS],
    pub(super) m_lo: [f32; GROUP_ROWS],
    pub(super) mean: [f64; GROUP_ROWS],
    pub(super) rstd: [f64; GROUP_ROWS],
    /// Rows that need `row::finish`'s rare paths (overflowed sums, a shift far from the mean).
    pub(super) rare: [bool; GROUP_ROWS],
}

impl Group {
    /// The shifts and residual sums of rows `i..i + R`: per row exactly `shift_of` and
    /// `centered_in(x, (shift, 1, 0))`, with the rows' steps interleaved so their dependency
    /// chains overlap.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // rows side by side: one index into R arrays
    fn sums<S: Simd, const R: usize>(&mut self, simd: S, kind: Kind, i: usize, x: [&[f32]; R]) {
        // Loops, not `array::map`: closures are compiled without the target features.
        let (zero, one) = (simd.splat_f32s(0.0), simd.splat_f32s(1.0));
        let nv = S::as_simd_f32s(x[0]).0.len();
        let mut shift = [0f32; R];
        let mut k = [(zero, one, zero); R];
        let mut heads: [&[S::f32s]; R] = [&[]; R];
        for r in 0..R {
            shift[r] = shift_of(simd, kind, x[r]);
            k[r].0 = simd.splat_f32s(shift[r]);
            heads[r] = &S::as_simd_f32s(x[r]).0[..nv];
        }
        let mut total = [[0f64; 2]; R];
        let pb = per_block::<S>();
        let mut b = 0;
        while b < nv {
            let end = (b + pb).min(nv);
            let mut acc = [[zero; 2]; R];
            for j in b..end {
                for r in 0..R {
                    centered_step::<S, true>(simd, heads[r][j], k[r], &mut acc[r]);
                }
            }
            for r in 0..R {
                fold_into(simd, acc[r], &mut total[r]);
            }
            b = end;
        }
        for r in 0..R {
            centered_tail(S::as_simd_f32s(x[r]).1, (shift[r], 1.0, 0.0), &mut total[r]);
            self.shift[i + r] = shift[r];
            [self.sd[i + r], self.sdd[i + r]] = total[r];
        }
    }

    /// `row::finish` for every row, in its common case (`row::common`: no rescaling, no second
    /// pass), in lanes across rows; rows that need the rare paths are flagged in `rare` for the
    /// caller to finish one by one.
    #[inline(always)]
    pub(super) fn finish(&mut self, spec: row::Spec, n: usize) {
        for i in 0..GROUP_ROWS {
            let (rare, st) = row::common(spec, n, self.shift[i], [self.sd[i], self.sdd[i]]);
            self.rare[i] = rare;
            self.set(i, &st);
        }
    }

    /// Overwrites row `i` with the statistics `row::finish` computed.
    #[inline(always)]
    pub(super) fn set(&mut self, i: usize, st: &row::RowStats<f32>) {
        (self.m_hi[i], self.m_lo[i]) = (st.m_hi, st.m_lo);
        (self.mean[i], self.rstd[i]) = (st.mean, st.rstd);
    }
}

/// Forward of `mean.len()` consecutive rows of `n` in one explicit-SIMD loop (for short rows).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows(
    n: usize,
    spec: row::Spec,
    x: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    out: Out,
) {
    crate::isa::dispatch(Rows { n, spec, x, gamma, beta, y, mean, rstd, out })
}

#[cfg(feature = "unit-tests")]
#[doc(hidden)]
pub mod tests {
    use super::*;
    use crate::reduce::tests::{SPECS, close, mixed_rows, reference_spec};
    use layernorm_core::{DType, NormSpec, reference};

    pub fn the_short_row_kernel_is_right_on_every_instruction_set() {
        let rows = 37;
        for (n, (rs, _)) in [3usize, 8, 16, 24, 33, 100, 128, 300]
            .into_iter()
            .flat_map(|n| SPECS[..2].iter().map(move |s| (n, *s)))
        {
            let x = mixed_rows(rows, n);
            let g: Vec<f32> = (0..n).map(|j| 0.5 + j as f32 / n as f32).collect();
            let b: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 1.0).collect();
            let spec = reference_spec(rs, rows, n, DType::F32).with_beta(true);
            let wide = |v: &[f32]| v.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
            let want = reference::forward(&spec, &wide(&x), Some(&wide(&g)), Some(&wide(&b)))
                .unwrap_or_else(|e| panic!("{e}"));
            let want_mean = want.mean.clone().unwrap_or_else(|| vec![0.0; rows]);
            for_each_isa!(simd, isa => {
                for out in [Out::Cached, Out::Prefetched, Out::Streamed] {
                    // y at an odd offset, so that streaming has a head and a tail to mask.
                    let mut ybuf = vec![-7f32; rows * n + 3];
                    let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
                    let y = &mut ybuf[3..];
                    let (gamma, beta) = (Some(&g[..]), Some(&b[..]));
                    pulp::Simd::vectorize(simd, Rows { n, spec: rs, x: &x, gamma, beta, y, mean: &mut mean, rstd: &mut rstd, out });
                    crate::reduce::stream_fence();
                    let what = format!("{isa}, n={n}, {out:?}, {:?}", rs.kind);
                    close(&format!("y {what}"), &ybuf[3..], &want.y, 1e-5);
                    assert_eq!(ybuf[..3], [-7.0; 3], "wrote before y, {what}");
                    // The mean against the row's spread (1/rstd): a row of ±1e37 has a mean
                    // that is small next to its elements.
                    for (r, (&m, &w)) in mean.iter().zip(&want_mean).enumerate() {
                        let scale = 1.0 / want.rstd[r] + w.abs();
                        let ok = if !rs.kind.centred() { m == 0.0 } else if w.is_nan() { m.is_nan() } else { (f64::from(m) - w).abs() <= 1e-6 * scale };
                        assert!(ok, "mean {what}, row {r}: got {m}, want {w}");
                    }
                    close(&format!("rstd {what}"), &rstd, &want.rstd, 1e-5);
                }
            });
        }
    }

    pub fn the_long_row_kernel_matches_the_row_by_row_composition_bit_for_bit() {
        // Against shift, sums, finish and normalize row by row on the same instruction set (the
        // dispatched one's composition is `row::rows_portable`). Rows take every path of
        // `row::finish` (see `mixed_rows`); lengths with and without tails; y at an odd offset
        // so that streaming has heads and tails to mask (and, from `FUSE_MIN_N` on, lines that
        // rows share and stream as one). Rows shorter than `FUSE_MIN_N` are staged when
        // streamed: 40 rows of 128 are two whole spans and a part.
        let rows = 40;
        for n in [128usize, 129, 200, 512, 515, 777, 1024, 2053] {
            let x = mixed_rows(rows, n);
            let g: Vec<f32> = (0..n).map(|j| 0.5 + j as f32 / n as f32).collect();
            let b: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 1.0).collect();
            let pairs = [
                (Some(&g[..]), Some(&b[..])),
                (None, None),
                (None, Some(&b[..])),
                (Some(&g[..]), None),
            ];
            for ((gamma, beta), (spec, _)) in pairs.into_iter().flat_map(|p| SPECS.map(|s| (p, s)))
            {
                for_each_isa!(simd, isa => {
                    let (mut y0, mut m0, mut r0) =
                        (vec![0f32; rows * n], vec![0f32; rows], vec![0f32; rows]);
                    for r in 0..rows {
                        let xr = &x[r * n..(r + 1) * n];
                        let m = shift_of(simd, spec.kind, xr);
                        let st = row::finish(spec, xr, m, centered_in(simd, xr, (m, 1.0, 0.0)));
                        let params = st.params();
                        let y = &mut y0[r * n..(r + 1) * n];
                        normalize_in(simd, xr, params, (gamma, beta), y, false);
                        (m0[r], r0[r]) = (st.mean as f32, st.rstd as f32);
                    }
                    let outs = [(Out::Cached, 3), (Out::Prefetched, 3), (Out::Streamed, 3), (Out::Streamed, 12)];
                    for (out, off) in outs {
                        // (At 12 floats past a 64-byte boundary, AVX2's rows begin their
                        // streaming on a line too, so they join lines as well.)
                        let mut ybuf = vec![-7f32; rows * n + 32];
                        let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
                        let at = off + ybuf.as_ptr().align_offset(64);
                        let y = &mut ybuf[at..at + rows * n];
                        let op = Long { n, spec, x: &x, gamma, beta, y, mean: &mut mean, rstd: &mut rstd, out };
                        pulp::Simd::vectorize(simd, op);
                        crate::reduce::stream_fence();
                        let what = format!("{isa}, n={n}, {out:?}, at {off}, {spec:?}");
                        assert_eq!(bits(&ybuf[at..at + rows * n]), bits(&y0), "y, {what}");
                        assert!(ybuf[..at].iter().chain(&ybuf[at + rows * n..]).all(|&v| v == -7.0), "wrote outside y, {what}");
                        assert_eq!((bits(&mean), bits(&rstd)), (bits(&m0), bits(&r0)), "stats, {what}");
                    }
                });
            }
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    pub fn the_pipelined_sweep_is_right_on_every_instruction_set() {
        // One row normalized while the next is summed: y against the reference, the sums against
        // a direct f64 evaluation, at lengths with and without tails, y at an odd offset.
        for n in [512usize, 515, 777, 1024] {
            let x = mixed_rows(2, n)
                .iter()
                .map(|v| if v.is_nan() { 0.5 } else { *v })
                .collect::<Vec<_>>();
            let (cur, next) = x.split_at(n);
            let g: Vec<f32> = (0..n).map(|j| 0.5 + j as f32 / n as f32).collect();
            let b: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 1.0).collect();
            let spec = NormSpec::layer_norm(1, n, DType::F32);
            let wide = |v: &[f32]| v.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
            let want = reference::forward(&spec, &wide(cur), Some(&wide(&g)), Some(&wide(&b)))
                .unwrap_or_else(|e| panic!("{e}"));
            let st = row::stats(row::Spec::ln(1e-5), cur);
            let m_next = next[0];
            let sum: f64 = next.iter().map(|&v| f64::from(v - m_next)).sum();
            let sum2: f64 = next.iter().map(|&v| f64::from((v - m_next) * (v - m_next))).sum();
            for_each_isa!(simd, isa => {
                for stream in [false, true] {
                    let mut ybuf = vec![-7f32; n + 3];
                    let y = &mut ybuf[3..];
                    let (gamma, beta) = (Some(&g[..]), Some(&b[..]));
                    let (m_hi, m_lo, r) = st.params();
                    let op = Fused { next, m_next, cur, m_hi, m_lo, r, gamma, beta, y, stream };
                    let [s1, s2] = pulp::Simd::vectorize(simd, op);
                    crate::reduce::stream_fence();
                    let what = format!("{isa}, n={n}, stream={stream}");
                    close(&format!("y {what}"), &ybuf[3..], &want.y, 1e-5);
                    assert_eq!(ybuf[..3], [-7.0; 3], "wrote before y, {what}");
                    assert!((s1 - sum).abs() <= 1e-5 * (1.0 + sum.abs()), "Σd {what}: {s1} vs {sum}");
                    assert!((s2 - sum2).abs() <= 1e-5 * sum2, "Σd² {what}: {s2} vs {sum2}");
                }
            });
        }
    }
}
