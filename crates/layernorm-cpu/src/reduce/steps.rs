//! The per-vector steps and whole-row sweeps every kernel is built from: one definition each, so
//! that the fused and standalone kernels agree bit for bit.

use pulp::Simd;

use super::store::{put, stream_span};
use crate::row::{BLOCK, BackParams, Kind, SHIFT_SAMPLE};

/// Vectors per block for this instruction set.
#[inline(always)]
pub(super) fn per_block<S: Simd>() -> usize {
    (BLOCK / (size_of::<S::f32s>() / 4)).max(1)
}

/// One vector of the residual sums: e = (v − m)·s − ml; acc += (e, e²). Shared by `Centered`,
/// `Fused` and `Rows`, whose sums must agree bit for bit. `PLAIN` (s = 1, ml = 0, the
/// forward's first sweep) skips the two operations that are then exact identities.
#[inline(always)]
pub(super) fn centered_step<S: Simd, const PLAIN: bool>(
    simd: S,
    v: S::f32s,
    (m, s, ml): (S::f32s, S::f32s, S::f32s),
    acc: &mut [S::f32s; 2],
) {
    let e = if PLAIN {
        simd.sub_f32s(v, m)
    } else {
        simd.sub_f32s(simd.mul_f32s(simd.sub_f32s(v, m), s), ml)
    };
    acc[0] = simd.add_f32s(acc[0], e);
    acc[1] = simd.mul_add_f32s(e, e, acc[1]);
}

/// The constants of the normalize step from a row's (m_hi, m_lo, rstd): (m_hi, −m_lo·rstd, rstd),
/// so that x̂ = fma(x − m_hi, rstd, −m_lo·rstd). Every normalize sweep, vector or scalar, forms
/// them here (the same bits).
#[inline(always)]
pub(super) fn xhat_consts((m_hi, m_lo, r): (f32, f32, f32)) -> (f32, f32, f32) {
    (m_hi, -(m_lo * r), r)
}

/// [`xhat_consts`] splatted: the vector constants [`normalize_vec`] takes.
#[inline(always)]
pub(super) fn xhat_splats<S: Simd>(
    simd: S,
    params: (f32, f32, f32),
) -> (S::f32s, S::f32s, S::f32s) {
    let c = xhat_consts(params);
    (simd.splat_f32s(c.0), simd.splat_f32s(c.1), simd.splat_f32s(c.2))
}

/// One vector (vector `j` of the row) of y = fma(fma(x − m_hi, r, nml), γ, β) with the constants
/// of [`xhat_consts`], the operations and order of `row::normalize`. Which of γ/β exist is known
/// at compile time (`G`, `B`), so the loops carry no per-vector tests. Shared by every normalize
/// sweep, `f32` and `bf16`.
#[inline(always)]
pub(super) fn normalize_vec<S: Simd, const G: bool, const B: bool>(
    simd: S,
    x: S::f32s,
    (mh, nml, r): (S::f32s, S::f32s, S::f32s),
    (gamma, beta): (&[S::f32s], &[S::f32s]),
    j: usize,
) -> S::f32s {
    let t = simd.mul_add_f32s(simd.sub_f32s(x, mh), r, nml);
    match (G, B) {
        (true, true) => simd.mul_add_f32s(t, gamma[j], beta[j]),
        (true, false) => simd.mul_f32s(t, gamma[j]),
        (false, true) => simd.add_f32s(t, beta[j]),
        (false, false) => t,
    }
}

/// The scalar tail of the residual sums, added into `total`.
#[inline(always)]
pub(super) fn centered_tail(tail: &[f32], (m, s, ml): (f32, f32, f32), total: &mut [f64; 2]) {
    for &v in tail {
        let e = (v - m) * s - ml;
        total[0] += f64::from(e);
        total[1] += f64::from(e * e);
    }
}

/// Normalizes one row into `y` (vectors, then a scalar tail); streamed, the vectors are the
/// streamed span ([`stream_span`]), the elements before and after it scalar.
#[inline(always)]
pub(super) fn normalize_in<S: Simd>(
    simd: S,
    x: &[f32],
    params: (f32, f32, f32),
    (gamma, beta): (Option<&[f32]>, Option<&[f32]>),
    y: &mut [f32],
    stream: bool,
) {
    let n = x.len();
    let k = xhat_splats(simd, params);
    let (lines, stream) = stream_span::<S>(y, stream);
    let (p, q) = if stream { (lines.start, lines.end) } else { (0, n) };
    if p > 0 {
        normalize_head(x, params, (gamma, beta), y, p);
    }
    let xh = S::as_simd_f32s(&x[p..q]).0;
    let gh = gamma.map_or(&[][..], |g| S::as_simd_f32s(&g[p..n]).0);
    let bh = beta.map_or(&[][..], |b| S::as_simd_f32s(&b[p..n]).0);
    let yh = S::as_mut_simd_f32s(&mut y[p..q]).0;
    let (g, b) = (gamma.is_some(), beta.is_some());
    specialize!(normalize_vecs::<S>(g, b, stream)(simd, xh, k, (gh, bh), yh));
    let base = p + xh.len() * (size_of::<S::f32s>() / 4);
    normalize_tail(&x[base..n], params, (gamma, beta), base, &mut y[base..n]);
}

/// The vector body of [`normalize_in`].
#[inline(always)]
pub(super) fn normalize_vecs<S: Simd, const G: bool, const B: bool, const ST: bool>(
    simd: S,
    xh: &[S::f32s],
    (mh, ml, r): (S::f32s, S::f32s, S::f32s),
    (gh, bh): (&[S::f32s], &[S::f32s]),
    yh: &mut [S::f32s],
) {
    let yh = &mut yh[..xh.len()];
    for j in 0..xh.len() {
        put::<S>(&mut yh[j], normalize_vec::<S, G, B>(simd, xh[j], (mh, ml, r), (gh, bh), j), ST);
    }
}

/// The row's elements before the streamed part (`p` of them, fewer than a vector), with
/// ordinary stores: their line is shared with the previous row (see [`stream_span`]). Scalar
/// code, the operations of the vector steps (so the same bits): `pulp`'s masked loads and stores
/// are out-of-line calls, and `perf` found them costing several percent of a streamed sweep.
#[inline(always)]
pub(super) fn normalize_head(
    x: &[f32],
    params: (f32, f32, f32),
    (gamma, beta): (Option<&[f32]>, Option<&[f32]>),
    y: &mut [f32],
    p: usize,
) {
    normalize_tail(&x[..p], params, (gamma, beta), 0, &mut y[..p]);
}

/// Where the backward kernels read x from: the rows as given, or — for a backward from y
/// (`crate::driver`) — x̂ recovered from y in registers as each element is read, (y − β)·(1/γ_eff):
/// the operations and order of `stage::recover`'s multiplying case, so the very bits it stages.
/// Which of the two is a compile-time parameter of the kernels, `RY`, true where `beta` and
/// `inverse` are not empty. [`Recover::new`] reads an absent β as zeros and an absent 1/γ_eff as
/// ones, which give the same bits (y − 0 = y, v·1 = v), so each kernel has two instances, not
/// one per combination of β and γ (a quarter of the crate's machine code); the zeros cost
/// RMSNorm's backward from y without β up to 5% of its speed on short rows (65536×128, Intel
/// AVX-512 VM, one thread). With neither, x̂ = y is read as given.
#[derive(Clone, Copy, Default)]
pub struct Recover<'a> {
    /// β of the row's columns (n).
    beta: &'a [f32],
    /// 1/γ_eff of the row's columns (n).
    inverse: &'a [f32],
}

impl<'a> Recover<'a> {
    /// The recovery with `beta` and `inverse` = 1/γ_eff where the problem has them (n each), an
    /// absent one read from `zeros` or `ones` (at least n each).
    pub(crate) fn new(
        (beta, inverse): (Option<&'a [f32]>, Option<&'a [f32]>),
        (zeros, ones): (&'a [f32], &'a [f32]),
        n: usize,
    ) -> Self {
        match (beta, inverse) {
            (None, None) => Recover::default(),
            (b, i) => Recover {
                beta: b.unwrap_or_else(|| &zeros[..n]),
                inverse: i.unwrap_or_else(|| &ones[..n]),
            },
        }
    }

    /// Whether x̂ is recovered (the kernels' `RY`), else the rows are read as given.
    pub(super) fn recovers(&self) -> bool {
        !self.beta.is_empty() || !self.inverse.is_empty()
    }

    /// The row's x at column `j` from the value read there.
    #[inline(always)]
    pub(super) fn at<const RY: bool>(&self, v: f32, j: usize) -> f32 {
        if RY { (v - self.beta[j]) * self.inverse[j] } else { v }
    }

    /// The recovery's whole vectors of rows of `n` (`nv` of them).
    #[inline(always)]
    pub(super) fn vecs<S: Simd, const RY: bool>(
        &self,
        n: usize,
        nv: usize,
    ) -> RecoverVecs<'a, S::f32s> {
        if !RY {
            return RecoverVecs { beta: &[], inverse: &[] };
        }
        RecoverVecs {
            beta: &S::as_simd_f32s(&self.beta[..n]).0[..nv],
            inverse: &S::as_simd_f32s(&self.inverse[..n]).0[..nv],
        }
    }
}

/// [`Recover`]'s whole vectors.
#[derive(Clone, Copy)]
pub(super) struct RecoverVecs<'a, V> {
    beta: &'a [V],
    inverse: &'a [V],
}

impl<'a, V: Copy> RecoverVecs<'a, V> {
    /// The row's x at vector `j` from the vector read there ([`Recover::at`] lane by lane).
    #[inline(always)]
    pub(super) fn at<S: Simd<f32s = V>, const RY: bool>(&self, simd: S, v: V, j: usize) -> V {
        if RY { simd.mul_f32s(simd.sub_f32s(v, self.beta[j]), self.inverse[j]) } else { v }
    }

    /// The same vectors re-sliced to `nv` (so that the compiler sees the indices in bounds).
    #[inline(always)]
    pub(super) fn upto<const RY: bool>(self, nv: usize) -> Self {
        if !RY {
            return self;
        }
        RecoverVecs { beta: &self.beta[..nv], inverse: &self.inverse[..nv] }
    }
}

/// One vector of the backward's sums: d = (x − m)·s, g = dy·γ; acc += (d, g, g·d). Shared by
/// `Backward` and `FusedBackward`, whose sums must agree bit for bit.
#[inline(always)]
pub(super) fn backward_step<S: Simd>(
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
    acc[2] = simd.mul_add_f32s(g, d, acc[2]);
}

/// The scalar tail of the backward's sums, added into `total`.
#[inline(always)]
pub(super) fn backward_tail(
    rows: (&[f32], &[f32], Option<&[f32]>),
    shift: (f32, f32),
    total: &mut [f64; 3],
) {
    backward_tail_from::<false>(rows, shift, total, (Recover::default(), 0));
}

/// [`backward_tail`] with x read through `rec` (`RY`: see [`Recover`]); `base` is the
/// tail's offset in the row.
#[inline(always)]
pub(super) fn backward_tail_from<const RY: bool>(
    (x, dy, gamma): (&[f32], &[f32], Option<&[f32]>),
    (m, s): (f32, f32),
    total: &mut [f64; 3],
    (rec, base): (Recover<'_>, usize),
) {
    for (j, (&xv, &dv)) in x.iter().zip(dy).enumerate() {
        let xv = rec.at::<RY>(xv, base + j);
        let d = (xv - m) * s;
        let g = gamma.map_or(dv, |g| dv * g[j]);
        total[0] += f64::from(d);
        total[1] += f64::from(g);
        total[2] += f64::from(g * d);
    }
}

/// Folds block accumulators into the `f64` totals. Each vector's lanes are summed as a halving
/// tree (lane l with lane l + w, w = width/2, …, 1) — a fixed order, so the sums are deterministic.
#[inline(always)]
pub(super) fn fold_into<S: Simd, const K: usize>(simd: S, acc: [S::f32s; K], total: &mut [f64; K]) {
    for (t, a) in total.iter_mut().zip(acc) {
        *t += f64::from(simd.reduce_sum_f32s(a));
    }
}

/// The forward's shift: the mean of the row's first [`SHIFT_SAMPLE`] elements, summed in `f32`
/// lanes. Any value within a few standard deviations of the mean serves (the residual sums
/// correct it); where the `f32` sum overflows, the sample is averaged in `f64`.
#[inline(always)]
pub(super) fn shift_in<S: Simd>(simd: S, x: &[f32]) -> f32 {
    let k = x.len().min(SHIFT_SAMPLE);
    if k == 0 {
        return 0.0;
    }
    let (head, tail) = S::as_simd_f32s(&x[..k]);
    let mut acc = simd.splat_f32s(0.0);
    for &v in head {
        acc = simd.add_f32s(acc, v);
    }
    let mut sum = simd.reduce_sum_f32s(acc);
    for &v in tail {
        sum += v;
    }
    let m = sum / k as f32;
    if m.is_finite() {
        m
    } else {
        (x[..k].iter().map(|&v| f64::from(v)).sum::<f64>() / k as f64) as f32
    }
}

/// [`shift_in`] where the rows are centred (LayerNorm), 0 where they are not (RMSNorm): the
/// point the forward's first sweep sums around (`row::shift`).
#[inline(always)]
pub(super) fn shift_of<S: Simd>(simd: S, kind: Kind, x: &[f32]) -> f32 {
    if kind.centred() { shift_in(simd, x) } else { 0.0 }
}

/// (Σe, Σe²) with e = (x − m)·s − ml over one row, blocks folded into `f64`.
#[inline(always)]
pub(super) fn centered_in<S: Simd>(simd: S, x: &[f32], (m, s, ml): (f32, f32, f32)) -> [f64; 2] {
    let (head, tail) = S::as_simd_f32s(x);
    let k = (simd.splat_f32s(m), simd.splat_f32s(s), simd.splat_f32s(ml));
    let mut total = if s == 1.0 && ml == 0.0 {
        centered_vecs::<S, true>(simd, head, k)
    } else {
        centered_vecs::<S, false>(simd, head, k)
    };
    centered_tail(tail, (m, s, ml), &mut total);
    total
}

/// The vector body of [`centered_in`].
#[inline(always)]
pub(super) fn centered_vecs<S: Simd, const PLAIN: bool>(
    simd: S,
    head: &[S::f32s],
    k: (S::f32s, S::f32s, S::f32s),
) -> [f64; 2] {
    let mut total = [0f64; 2];
    for group in head.chunks(per_block::<S>()) {
        let mut acc = [simd.splat_f32s(0.0); 2];
        for &v in group {
            centered_step::<S, PLAIN>(simd, v, k, &mut acc);
        }
        fold_into(simd, acc, &mut total);
    }
    total
}

/// The scalar tail of the normalize sweep; `base` is the tail's offset in the row.
#[inline(always)]
pub(super) fn normalize_tail(
    x: &[f32],
    params: (f32, f32, f32),
    (gamma, beta): (Option<&[f32]>, Option<&[f32]>),
    base: usize,
    y: &mut [f32],
) {
    let (m_hi, nml, r) = xhat_consts(params);
    for (j, (y, &x)) in y.iter_mut().zip(x).enumerate() {
        let t = (x - m_hi).mul_add(r, nml);
        *y = match (gamma, beta) {
            (Some(g), Some(b)) => t.mul_add(g[base + j], b[base + j]),
            (Some(g), None) => t * g[base + j],
            (None, Some(b)) => t + b[base + j],
            (None, None) => t,
        };
    }
}

/// (Σd, Σg, Σg·d) over one row, blocks folded into `f64`.
#[inline(always)]
pub(super) fn backward_in<S: Simd>(
    simd: S,
    rows: (&[f32], &[f32], Option<&[f32]>),
    shift: (f32, f32),
) -> [f64; 3] {
    backward_in_from::<S, false>(simd, rows, shift, Recover::default())
}

/// [`backward_in`] with x read through `rec` (`RY`: see [`Recover`]).
#[inline(always)]
pub(super) fn backward_in_from<S: Simd, const RY: bool>(
    simd: S,
    (x, dy, gamma): (&[f32], &[f32], Option<&[f32]>),
    (m, s): (f32, f32),
    rec: Recover<'_>,
) -> [f64; 3] {
    let n = x.len();
    let (xh, xt) = S::as_simd_f32s(x);
    let (dh, dt) = S::as_simd_f32s(&dy[..n]);
    let (vm, vs) = (simd.splat_f32s(m), simd.splat_f32s(s));
    let mut total = [0f64; 3];
    let pb = per_block::<S>();
    let gh = gamma.map(|g| S::as_simd_f32s(&g[..n]).0);
    let rv = rec.vecs::<S, RY>(n, xh.len());
    // Plain index loops, not closures: a closure is compiled without the caller's target
    // features, so every SIMD operation in it became a call.
    let mut i = 0;
    while i < xh.len() {
        let end = (i + pb).min(xh.len());
        let mut acc = [simd.splat_f32s(0.0); 3];
        for j in i..end {
            let xv = rv.at::<S, RY>(simd, xh[j], j);
            backward_step(simd, (xv, dh[j], gh.map(|g| g[j])), (vm, vs), &mut acc);
        }
        fold_into(simd, acc, &mut total);
        i = end;
    }
    let base = n - xt.len();
    let tail = (xt, dt, gamma.map(|g| &g[base..n]));
    backward_tail_from::<RY>(tail, (m, s), &mut total, (rec, base));
    total
}

/// The backward's per-row constants as vectors: (m, sa, m_lo, r, a, b, c).
#[derive(Clone, Copy)]
pub(super) struct BackVecs<V> {
    pub(super) m: V,
    pub(super) nml: V,
    pub(super) a: V,
    pub(super) b: V,
    pub(super) c: V,
}

impl<V: Copy> BackVecs<V> {
    #[inline(always)]
    pub(super) fn new<S: Simd<f32s = V>>(simd: S, p: &BackParams<f32>) -> Self {
        let v = |x: f32| simd.splat_f32s(x);
        BackVecs { m: v(p.m), nml: v(p.nml), a: v(p.a), b: v(p.b), c: v(p.c) }
    }
}

/// One vector of the backward's second sweep: returns (dx, x̂) with x̂ = fma(x − m, a, nml) and
/// dx = fma(a, g, fma(x̂, c, b)) (the operations and order of `row::back_apply`).
#[inline(always)]
pub(super) fn apply_step<S: Simd>(
    simd: S,
    (x, dy, gamma): (S::f32s, S::f32s, Option<S::f32s>),
    p: &BackVecs<S::f32s>,
) -> (S::f32s, S::f32s) {
    let xhat = simd.mul_add_f32s(simd.sub_f32s(x, p.m), p.a, p.nml);
    let g = match gamma {
        Some(gamma) => simd.mul_f32s(dy, gamma),
        None => dy,
    };
    let dx = simd.mul_add_f32s(p.a, g, simd.mul_add_f32s(xhat, p.c, p.b));
    (dx, xhat)
}

/// A row's epilogue as the kernels take it (`row::Epilogue::row`): (s, h) with dx = fma(s, dx,
/// h) before the store, h the row's dh (or zeros); `None`: dx as computed.
pub(crate) type Epi<'a> = Option<(f32, &'a [f32])>;

/// One vector of the epilogue (`row::Epilogue`): fma(s, dx, h).
#[inline(always)]
pub(super) fn epilogue_step<S: Simd>(simd: S, dx: S::f32s, (s, h): (S::f32s, S::f32s)) -> S::f32s {
    simd.mul_add_f32s(s, dx, h)
}

/// The scalar tail of the backward's second sweep; `base` is the tail's offset in the row, and
/// `epi`'s h holds the tail's values only.
#[inline(always)]
pub(super) fn apply_tail(
    rows: (&[f32], &[f32], Option<&[f32]>),
    p: &BackParams<f32>,
    base: usize,
    dx: &mut [f32],
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
    epi: Epi<'_>,
) {
    apply_tail_from::<false>(rows, p, (base, Recover::default()), dx, (dgamma, dbeta), epi);
}

/// [`apply_tail`] with x read through `rec` (`RY`: see [`Recover`]).
#[inline(always)]
pub(super) fn apply_tail_from<const RY: bool>(
    (x, dy, gamma): (&[f32], &[f32], Option<&[f32]>),
    p: &BackParams<f32>,
    (base, rec): (usize, Recover<'_>),
    dx: &mut [f32],
    (mut dgamma, mut dbeta): (Option<&mut [f32]>, Option<&mut [f32]>),
    epi: Epi<'_>,
) {
    for (j, ((dxv, &xv), &dv)) in dx.iter_mut().zip(x).zip(dy).enumerate() {
        let xv = rec.at::<RY>(xv, base + j);
        let xhat = (xv - p.m).mul_add(p.a, p.nml);
        let gc = gamma.map_or(dv, |g| dv * g[base + j]);
        *dxv = p.a.mul_add(gc, xhat.mul_add(p.c, p.b));
        if let Some((s, h)) = epi {
            *dxv = s.mul_add(*dxv, h[j]);
        }
        if let Some(dg) = dgamma.as_deref_mut() {
            dg[j] = dv.mul_add(xhat, dg[j]);
        }
        if let Some(db) = dbeta.as_deref_mut() {
            db[j] += dv;
        }
    }
}

/// The backward's second sweep over one row (dx, and the row's dγ/dβ terms added in), with the
/// row's epilogue where given.
#[inline(always)]
pub(super) fn apply_in<S: Simd>(
    simd: S,
    rows: (&[f32], &[f32], Option<&[f32]>),
    p: &BackParams<f32>,
    dx: &mut [f32],
    parts: (Option<&mut [f32]>, Option<&mut [f32]>),
    epi: Epi<'_>,
) {
    apply_in_from::<S, false>(simd, rows, p, dx, parts, (epi, Recover::default()))
}

/// [`apply_in`] with x read through `rec` (`RY`: see [`Recover`]).
#[inline(always)]
pub(super) fn apply_in_from<S: Simd, const RY: bool>(
    simd: S,
    (x, dy, gamma): (&[f32], &[f32], Option<&[f32]>),
    p: &BackParams<f32>,
    dx: &mut [f32],
    (dgamma, dbeta): (Option<&mut [f32]>, Option<&mut [f32]>),
    (epi, rec): (Epi<'_>, Recover<'_>),
) {
    let n = x.len();
    let (xh, xt) = S::as_simd_f32s(x);
    let (dh, dt) = S::as_simd_f32s(&dy[..n]);
    let gh = gamma.map(|g| S::as_simd_f32s(&g[..n]).0);
    let (dxh, dxt) = S::as_mut_simd_f32s(&mut dx[..n]);
    let mut dgs = dgamma.map(|d| S::as_mut_simd_f32s(&mut d[..n]));
    let mut dbs = dbeta.map(|d| S::as_mut_simd_f32s(&mut d[..n]));
    let pv = BackVecs::new(simd, p);
    let ev = epi.map(|(s, h)| (simd.splat_f32s(s), S::as_simd_f32s(&h[..n])));
    let rv = rec.vecs::<S, RY>(n, xh.len());
    for k in 0..xh.len() {
        let xv = rv.at::<S, RY>(simd, xh[k], k);
        let (d, xhat) = apply_step(simd, (xv, dh[k], gh.map(|g| g[k])), &pv);
        dxh[k] = match ev {
            Some((s, (h, _))) => epilogue_step(simd, d, (s, h[k])),
            None => d,
        };
        if let Some((dg, _)) = dgs.as_mut() {
            dg[k] = simd.mul_add_f32s(dh[k], xhat, dg[k]);
        }
        if let Some((db, _)) = dbs.as_mut() {
            db[k] = simd.add_f32s(db[k], dh[k]);
        }
    }
    let base = n - xt.len();
    let et = epi.map(|(s, h)| (s, &h[base..n]));
    let parts = (dgs.map(|d| d.1), dbs.map(|d| d.1));
    apply_tail_from::<RY>((xt, dt, gamma), p, (base, rec), dxt, parts, et);
}

/// Most rows per group of the short-row kernels.
pub(super) const GROUP_ROWS: usize = 16;

/// Rows per group of the short-row kernels: about 2 K elements (8 KiB per operand, in L1).
#[inline(always)]
pub(super) fn group_rows(n: usize) -> usize {
    (2048 / n.max(1)).clamp(1, GROUP_ROWS)
}

/// Row `r` of rows of `n`.
#[inline(always)]
pub(super) fn row_at(v: &[f32], n: usize, r: usize) -> &[f32] {
    &v[r * n..(r + 1) * n]
}
