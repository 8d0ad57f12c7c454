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

use crate::row::{self, BLOCK, BackParams, SHIFT_SAMPLE};

/// Vectors per block for this instruction set.
#[inline(always)]
fn per_block<S: Simd>() -> usize {
    (BLOCK / (size_of::<S::f32s>() / 4)).max(1)
}

/// One vector of the residual sums: e = (v − m)·s − ml; acc += (e, e²). Shared by [`Centered`],
/// [`Fused`] and [`Rows`], whose sums must agree bit for bit. `PLAIN` (s = 1, ml = 0, the
/// forward's first sweep) skips the two operations that are then exact identities.
#[inline(always)]
fn centered_step<S: Simd, const PLAIN: bool>(
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
    acc[1] = simd.add_f32s(acc[1], simd.mul_f32s(e, e));
}

/// γ·t + β for one vector, where which of γ/β exist is known at compile time (`G`, `B`), so the
/// loops carry no per-vector tests.
#[inline(always)]
fn affine<S: Simd, const G: bool, const B: bool>(
    simd: S,
    t: S::f32s,
    gamma: &[S::f32s],
    beta: &[S::f32s],
    j: usize,
) -> S::f32s {
    let t = if G { simd.mul_f32s(t, gamma[j]) } else { t };
    if B { simd.add_f32s(t, beta[j]) } else { t }
}

/// Calls `$f::<S, [K,] G, B, ST>(args)` with the three flags turned into const generics.
macro_rules! specialize {
    ($f:ident::<$s:ident $(, $k:tt)?>($g:expr, $b:expr, $st:expr)($($arg:expr),* $(,)?)) => {
        match ($g, $b, $st) {
            (false, false, false) => $f::<$s, $($k,)? false, false, false>($($arg),*),
            (false, false, true) => $f::<$s, $($k,)? false, false, true>($($arg),*),
            (false, true, false) => $f::<$s, $($k,)? false, true, false>($($arg),*),
            (false, true, true) => $f::<$s, $($k,)? false, true, true>($($arg),*),
            (true, false, false) => $f::<$s, $($k,)? true, false, false>($($arg),*),
            (true, false, true) => $f::<$s, $($k,)? true, false, true>($($arg),*),
            (true, true, false) => $f::<$s, $($k,)? true, true, false>($($arg),*),
            (true, true, true) => $f::<$s, $($k,)? true, true, true>($($arg),*),
        }
    };
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

/// Writes one vector; with `stream`, as a non-temporal store where the instruction set has one
/// (x86), so that an output larger than the caches is written without first being read in.
/// With `stream`, `dst` must be aligned to the vector's size (see [`stream_head`]).
#[inline(always)]
fn put<S: Simd>(dst: &mut S::f32s, v: S::f32s, stream: bool) {
    #[cfg(target_arch = "x86_64")]
    if stream {
        use core::arch::x86_64::{_mm_stream_ps, _mm256_stream_ps, _mm512_stream_ps};
        let p = (dst as *mut S::f32s).cast::<f32>();
        debug_assert!(p.addr() % size_of::<S::f32s>() == 0);
        // SAFETY: `dst` is an exclusively borrowed vector, aligned to its size (the callers start
        // the streamed part of a row at an aligned element, `stream_head`). The sizes match the
        // transmuted types, and a vector of 64 / 32 / 16 bytes only exists under an instruction
        // set with AVX-512F / AVX / SSE, checked at run time by the dispatch that chose `S`.
        unsafe {
            match size_of::<S::f32s>() {
                64 => return _mm512_stream_ps(p, core::mem::transmute_copy(&v)),
                32 => return _mm256_stream_ps(p, core::mem::transmute_copy(&v)),
                16 => return _mm_stream_ps(p, core::mem::transmute_copy(&v)),
                _ => {}
            }
        }
    }
    let _ = stream;
    *dst = v;
}

/// Where the streamed part of an output row starts, and whether it is streamed at all: rows
/// shorter than two vectors (and vectors too narrow to fill a line) are not; otherwise it starts at
/// the first element aligned to a vector, the elements before it written by [`normalize_head`].
#[inline(always)]
fn stream_head<S: Simd>(y: &[f32], stream: bool) -> (usize, bool) {
    let w = size_of::<S::f32s>() / 4;
    if !stream || w < 4 || y.len() < 2 * w {
        return (0, false);
    }
    let p = y.as_ptr().align_offset(size_of::<S::f32s>());
    if p < w { (p, true) } else { (0, false) }
}

/// Asks for `v`'s cache lines to be brought into L1 (a hint; nothing on other architectures).
#[inline(always)]
fn prefetch(v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = v.as_ptr();
        let mut i = 0;
        while i < v.len() {
            // SAFETY: PREFETCHT1 is part of SSE (every x86_64 CPU); `p + i` lies inside `v`.
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T1 }>(
                    p.add(i).cast(),
                )
            }
            i += 16; // one 64-byte line
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// Orders this thread's non-temporal stores before whatever it does next (they are weakly
/// ordered); called once at the end of a task that streamed.
pub(crate) fn stream_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SFENCE is part of SSE, which every x86_64 CPU has.
    unsafe {
        core::arch::x86_64::_mm_sfence()
    }
}

/// Normalizes one row into `y` (vectors, then a scalar tail); `p` from [`stream_head`].
#[inline(always)]
fn normalize_in<S: Simd>(
    simd: S,
    x: &[f32],
    params: (f32, f32, f32),
    (gamma, beta): (Option<&[f32]>, Option<&[f32]>),
    y: &mut [f32],
    stream: bool,
) {
    let n = x.len();
    let k = (simd.splat_f32s(params.0), simd.splat_f32s(params.1), simd.splat_f32s(params.2));
    let (p, stream) = stream_head::<S>(y, stream);
    if p > 0 {
        normalize_head(simd, x, k, (gamma, beta), y, p);
    }
    let (xh, xt) = S::as_simd_f32s(&x[p..]);
    let gh = gamma.map_or(&[][..], |g| S::as_simd_f32s(&g[p..n]).0);
    let bh = beta.map_or(&[][..], |b| S::as_simd_f32s(&b[p..n]).0);
    let (yh, yt) = S::as_mut_simd_f32s(&mut y[p..n]);
    let (g, b) = (gamma.is_some(), beta.is_some());
    specialize!(normalize_vecs::<S>(g, b, stream)(simd, xh, k, (gh, bh), yh));
    normalize_tail(xt, params, (gamma, beta), n - xt.len(), yt);
}

/// The vector body of [`normalize_in`].
#[inline(always)]
fn normalize_vecs<S: Simd, const G: bool, const B: bool, const ST: bool>(
    simd: S,
    xh: &[S::f32s],
    (mh, ml, r): (S::f32s, S::f32s, S::f32s),
    (gh, bh): (&[S::f32s], &[S::f32s]),
    yh: &mut [S::f32s],
) {
    let yh = &mut yh[..xh.len()];
    for j in 0..xh.len() {
        let t = simd.mul_f32s(simd.sub_f32s(simd.sub_f32s(xh[j], mh), ml), r);
        put::<S>(&mut yh[j], affine::<S, G, B>(simd, t, gh, bh, j), ST);
    }
}

/// The row's elements before the streamed part (`p` of them, fewer than a vector), with masked
/// ordinary stores: they share a cache line with the previous row, which streaming must not touch.
#[inline(always)]
fn normalize_head<S: Simd>(
    simd: S,
    x: &[f32],
    k: (S::f32s, S::f32s, S::f32s),
    (gamma, beta): (Option<&[f32]>, Option<&[f32]>),
    y: &mut [f32],
    p: usize,
) {
    let load = |v: &[f32]| simd.partial_load_f32s(&v[..p]);
    let v = normalize_step(simd, load(x), k, gamma.map(load), beta.map(load));
    simd.partial_store_f32s(&mut y[..p], v);
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

/// Folds block accumulators into the `f64` totals. Each vector's lanes are summed as a halving
/// tree (lane l with lane l + w, w = width/2, …, 1) — a fixed order, so the sums are deterministic.
#[inline(always)]
fn fold_into<S: Simd, const K: usize>(simd: S, acc: [S::f32s; K], total: &mut [f64; K]) {
    for (t, a) in total.iter_mut().zip(acc) {
        *t += f64::from(simd.reduce_sum_f32s(a));
    }
}

/// The forward's shift: the mean of the row's first [`SHIFT_SAMPLE`] elements, summed in `f32`
/// lanes. Any value within a few standard deviations of the mean serves (the residual sums
/// correct it); where the `f32` sum overflows, the sample is averaged in `f64`.
#[inline(always)]
fn shift_in<S: Simd>(simd: S, x: &[f32]) -> f32 {
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

/// (Σe, Σe²) with e = (x − m)·s − ml over one row, blocks folded into `f64`.
#[inline(always)]
fn centered_in<S: Simd>(simd: S, x: &[f32], (m, s, ml): (f32, f32, f32)) -> [f64; 2] {
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
fn centered_vecs<S: Simd, const PLAIN: bool>(
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

/// One vector of y = ((x − m_hi) − m_lo)·r·γ + β (the operations and order of `row::normalize`).
#[inline(always)]
fn normalize_step<S: Simd>(
    simd: S,
    x: S::f32s,
    (mh, ml, r): (S::f32s, S::f32s, S::f32s),
    gamma: Option<S::f32s>,
    beta: Option<S::f32s>,
) -> S::f32s {
    let mut t = simd.mul_f32s(simd.sub_f32s(simd.sub_f32s(x, mh), ml), r);
    if let Some(g) = gamma {
        t = simd.mul_f32s(t, g);
    }
    if let Some(b) = beta {
        t = simd.add_f32s(t, b);
    }
    t
}

/// The scalar tail of the normalize sweep; `base` is the tail's offset in the row.
#[inline(always)]
fn normalize_tail(
    x: &[f32],
    (m_hi, m_lo, r): (f32, f32, f32),
    (gamma, beta): (Option<&[f32]>, Option<&[f32]>),
    base: usize,
    y: &mut [f32],
) {
    for (j, (y, &x)) in y.iter_mut().zip(x).enumerate() {
        let mut t = ((x - m_hi) - m_lo) * r;
        if let Some(g) = gamma {
            t *= g[base + j];
        }
        if let Some(b) = beta {
            t += b[base + j];
        }
        *y = t;
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
        let n = self.cur.len();
        let (nh, nt) = S::as_simd_f32s(&self.next[..n]);
        let zero = simd.splat_f32s(0.0);
        let k = (simd.splat_f32s(self.m_next), simd.splat_f32s(1.0), zero);
        let (mh, ml, r) =
            (simd.splat_f32s(self.m_hi), simd.splat_f32s(self.m_lo), simd.splat_f32s(self.r));
        // This row's vectors start at `p` (see `stream_head`): they may be one fewer than the
        // next row's, which is why the normalize below is guarded by `j < ch.len()`.
        let (p, stream) = stream_head::<S>(&self.y[..n], self.stream);
        if p > 0 {
            let params = (self.gamma, self.beta);
            normalize_head(simd, self.cur, (mh, ml, r), params, self.y, p);
        }
        let (ch, ct) = S::as_simd_f32s(&self.cur[p..n]);
        let (yh, yt) = S::as_mut_simd_f32s(&mut self.y[p..n]);
        let gh = self.gamma.map_or(&[][..], |g| S::as_simd_f32s(&g[p..n]).0);
        let bh = self.beta.map_or(&[][..], |b| S::as_simd_f32s(&b[p..n]).0);
        let (g, b) = (self.gamma.is_some(), self.beta.is_some());
        let mut total = specialize!(fused_vecs::<S>(g, b, stream)(
            simd,
            (nh, k),
            (ch, (mh, ml, r)),
            (gh, bh),
            yh
        ));
        centered_tail(nt, (self.m_next, 1.0, 0.0), &mut total);
        let params = (self.m_hi, self.m_lo, self.r);
        normalize_tail(ct, params, (self.gamma, self.beta), n - ct.len(), yt);
        total
    }
}

/// The vector body of [`Fused`]: the next row's sums, this row's normalize.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn fused_vecs<S: Simd, const G: bool, const B: bool, const ST: bool>(
    simd: S,
    (nh, k): (&[S::f32s], (S::f32s, S::f32s, S::f32s)),
    (ch, (mh, ml, r)): (&[S::f32s], (S::f32s, S::f32s, S::f32s)),
    (gh, bh): (&[S::f32s], &[S::f32s]),
    yh: &mut [S::f32s],
) -> [f64; 2] {
    let yh = &mut yh[..ch.len()];
    let mut total = [0f64; 2];
    let pb = per_block::<S>();
    let mut i = 0;
    while i < nh.len() {
        let end = (i + pb).min(nh.len());
        let mut acc = [simd.splat_f32s(0.0); 2];
        for j in i..end {
            centered_step::<S, true>(simd, nh[j], k, &mut acc);
            if j < ch.len() {
                let t = simd.mul_f32s(simd.sub_f32s(simd.sub_f32s(ch[j], mh), ml), r);
                put::<S>(&mut yh[j], affine::<S, G, B>(simd, t, gh, bh, j), ST);
            }
        }
        fold_into(simd, acc, &mut total);
        i = end;
    }
    total
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
    Arch::new().dispatch(Fused { next, m_next, cur, m_hi, m_lo, r, gamma, beta, y, stream })
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
    Arch::new().dispatch(Shift(x))
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
        backward_in(simd, (self.x, self.dy, self.gamma), (self.m, self.s))
    }
}

/// (Σd, Σg, Σg·d) over one row, blocks folded into `f64`.
#[inline(always)]
fn backward_in<S: Simd>(
    simd: S,
    (x, dy, gamma): (&[f32], &[f32], Option<&[f32]>),
    (m, s): (f32, f32),
) -> [f64; 3] {
    let n = x.len();
    let (xh, xt) = S::as_simd_f32s(x);
    let (dh, dt) = S::as_simd_f32s(&dy[..n]);
    let (vm, vs) = (simd.splat_f32s(m), simd.splat_f32s(s));
    let mut total = [0f64; 3];
    let pb = per_block::<S>();
    let gh = gamma.map(|g| S::as_simd_f32s(&g[..n]).0);
    // Plain index loops, not closures: a closure is compiled without the caller's target
    // features, so every SIMD operation in it became a call.
    let mut i = 0;
    while i < xh.len() {
        let end = (i + pb).min(xh.len());
        let mut acc = [simd.splat_f32s(0.0); 3];
        for j in i..end {
            backward_step(simd, (xh[j], dh[j], gh.map(|g| g[j])), (vm, vs), &mut acc);
        }
        fold_into(simd, acc, &mut total);
        i = end;
    }
    let base = n - xt.len();
    backward_tail((xt, dt, gamma.map(|g| &g[base..n])), (m, s), &mut total);
    total
}

/// The backward's per-row constants as vectors: (m, sa, m_lo, r, a, b, c).
#[derive(Clone, Copy)]
struct BackVecs<V> {
    m: V,
    sa: V,
    ml: V,
    r: V,
    a: V,
    b: V,
    c: V,
}

impl<V: Copy> BackVecs<V> {
    #[inline(always)]
    fn new<S: Simd<f32s = V>>(simd: S, p: &BackParams<f32>) -> Self {
        let v = |x: f32| simd.splat_f32s(x);
        BackVecs {
            m: v(p.m),
            sa: v(p.sa),
            ml: v(p.m_lo),
            r: v(p.r),
            a: v(p.a),
            b: v(p.b),
            c: v(p.c),
        }
    }
}

/// One vector of the backward's second sweep: returns (dx, x̂) with x̂ = ((x − m)·sa − m_lo)·r and
/// dx = a·g + b + x̂·c (the operations and order of `row::back_apply`).
#[inline(always)]
fn apply_step<S: Simd>(
    simd: S,
    (x, dy, gamma): (S::f32s, S::f32s, Option<S::f32s>),
    p: &BackVecs<S::f32s>,
) -> (S::f32s, S::f32s) {
    let xhat = simd.mul_f32s(simd.sub_f32s(simd.mul_f32s(simd.sub_f32s(x, p.m), p.sa), p.ml), p.r);
    let g = match gamma {
        Some(gamma) => simd.mul_f32s(dy, gamma),
        None => dy,
    };
    let dx = simd.add_f32s(simd.add_f32s(simd.mul_f32s(p.a, g), p.b), simd.mul_f32s(xhat, p.c));
    (dx, xhat)
}

/// The scalar tail of the backward's second sweep; `base` is the tail's offset in the row.
#[inline(always)]
fn apply_tail(
    (x, dy, gamma): (&[f32], &[f32], Option<&[f32]>),
    p: &BackParams<f32>,
    base: usize,
    dx: &mut [f32],
    mut dgamma: Option<&mut [f32]>,
    mut dbeta: Option<&mut [f32]>,
) {
    for (j, ((dxv, &xv), &dv)) in dx.iter_mut().zip(x).zip(dy).enumerate() {
        let xhat = ((xv - p.m) * p.sa - p.m_lo) * p.r;
        let gc = gamma.map_or(dv, |g| dv * g[base + j]);
        *dxv = p.a * gc + p.b + xhat * p.c;
        if let Some(dg) = dgamma.as_deref_mut() {
            dg[j] += dv * xhat;
        }
        if let Some(db) = dbeta.as_deref_mut() {
            db[j] += dv;
        }
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

/// The backward's second sweep over one row (dx, and the row's dγ/dβ terms added in).
#[inline(always)]
fn apply_in<S: Simd>(
    simd: S,
    (x, dy, gamma): (&[f32], &[f32], Option<&[f32]>),
    p: &BackParams<f32>,
    dx: &mut [f32],
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
) {
    let n = x.len();
    let (xh, xt) = S::as_simd_f32s(x);
    let (dh, dt) = S::as_simd_f32s(&dy[..n]);
    let gh = gamma.map(|g| S::as_simd_f32s(&g[..n]).0);
    let (dxh, dxt) = S::as_mut_simd_f32s(&mut dx[..n]);
    let mut dgs = dgamma.map(|d| S::as_mut_simd_f32s(&mut d[..n]));
    let mut dbs = dbeta.map(|d| S::as_mut_simd_f32s(&mut d[..n]));
    let pv = BackVecs::new(simd, p);
    for k in 0..xh.len() {
        let (d, xhat) = apply_step(simd, (xh[k], dh[k], gh.map(|g| g[k])), &pv);
        dxh[k] = d;
        if let Some((dg, _)) = dgs.as_mut() {
            dg[k] = simd.add_f32s(dg[k], simd.mul_f32s(dh[k], xhat));
        }
        if let Some((db, _)) = dbs.as_mut() {
            db[k] = simd.add_f32s(db[k], dh[k]);
        }
    }
    let base = n - xt.len();
    apply_tail((xt, dt, gamma), p, base, dxt, dgs.map(|d| d.1), dbs.map(|d| d.1));
}

/// Forward of consecutive short rows in one dispatch: per row, the shift, the residual sums, the
/// statistics and the normalize sweep, with no per-row call overhead (the row stays in L1).
struct Rows<'a> {
    n: usize,
    eps: f64,
    x: &'a [f32],
    gamma: Option<&'a [f32]>,
    beta: Option<&'a [f32]>,
    y: &'a mut [f32],
    mean: &'a mut [f32],
    rstd: &'a mut [f32],
    stream: bool,
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
        let mut stage = self.stream.then(|| {
            let buf = vec![0f32; per * n + 16];
            let off = buf.as_ptr().align_offset(64).min(16);
            (buf, off)
        });
        let mut start = 0;
        while start < rows {
            let count = per.min(rows - start);
            let row = |i: usize| &self.x[(start + i) * n..(start + i + 1) * n];
            // Phase 1: the group's sums, four rows side by side (independent dependency chains).
            let mut i = 0;
            while i + 4 <= count {
                g.sums::<S, 4>(simd, i, [row(i), row(i + 1), row(i + 2), row(i + 3)]);
                i += 4;
            }
            while i < count {
                g.sums::<S, 1>(simd, i, [row(i)]);
                i += 1;
            }
            // Phase 2: the statistics of all the group's rows at once.
            g.finish(n, self.eps);
            for i in 0..count {
                if g.rare[i] {
                    let st = row::finish(row(i), g.shift[i], [g.sd[i], g.sdd[i]], self.eps);
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
                }
                let (x, r) = (row(i), start + i);
                let params = (g.shift[i], g.m_lo[i], g.rstd[i] as f32);
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
    }
}

/// A staged span of output (`src`, hot in L1) being written to `y[span]` in pieces: streaming
/// stores for the span's aligned vectors, ordinary masked stores for its unaligned ends.
struct Flush {
    span: core::ops::Range<usize>,
    /// Elements before the first aligned one.
    head: usize,
    /// Aligned whole vectors, and how many are written.
    body: usize,
    done: usize,
}

impl Flush {
    #[inline(always)]
    fn new<S: Simd>(y: &[f32], span: core::ops::Range<usize>) -> Flush {
        let (head, stream) = stream_head::<S>(&y[span.clone()], true);
        let body = if stream { (span.len() - head) / (size_of::<S::f32s>() / 4) } else { 0 };
        Flush { span, head, body, done: 0 }
    }

    /// Writes the aligned vectors up to `upto` (of `body`).
    #[inline(always)]
    fn write<S: Simd>(&mut self, _simd: S, src: &[f32], y: &mut [f32], upto: usize) {
        let upto = upto.min(self.body);
        if upto <= self.done {
            return;
        }
        let (h, len) = (self.head, self.span.len());
        let sh = &S::as_simd_f32s(&src[h..len]).0[self.done..upto];
        let dh = &mut S::as_mut_simd_f32s(&mut y[self.span.start + h..self.span.end]).0;
        for (d, &v) in dh[self.done..upto].iter_mut().zip(sh) {
            put::<S>(d, v, true);
        }
        self.done = upto;
    }

    /// Writes everything not yet written.
    #[inline(always)]
    fn finish<S: Simd>(mut self, simd: S, src: &[f32], y: &mut [f32]) {
        self.write(simd, src, y, self.body);
        let (h, len) = (self.head, self.span.len());
        let dst = &mut y[self.span.clone()];
        if self.body == 0 {
            dst.copy_from_slice(&src[..len]);
            return;
        }
        if h > 0 {
            simd.partial_store_f32s(&mut dst[..h], simd.partial_load_f32s(&src[..h]));
        }
        let tail = h + self.body * (size_of::<S::f32s>() / 4);
        dst[tail..].copy_from_slice(&src[tail..len]);
    }
}

/// The statistics of a group of short rows, computed across rows (one row per lane).
#[derive(Default)]
struct Group {
    /// Each row's shift (`m_hi` of `row::RowStats`).
    shift: [f32; GROUP_ROWS],
    /// Σd and Σd² of the residuals d = x − shift.
    sd: [f64; GROUP_ROWS],
    sdd: [f64; GROUP_ROWS],
    /// What `row::finish` returns: m_lo (rounded), mean and rstd.
    m_lo: [f32; GROUP_ROWS],
    mean: [f64; GROUP_ROWS],
    rstd: [f64; GROUP_ROWS],
    /// Rows that need `row::finish`'s rare paths (overflowed sums, a shift far from the mean).
    rare: [bool; GROUP_ROWS],
}

impl Group {
    /// The shifts and residual sums of rows `i..i + R`: per row exactly `shift_in` and
    /// `centered_in(x, (shift, 1, 0))`, with the rows' steps interleaved so their dependency
    /// chains overlap.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // rows side by side: one index into R arrays
    fn sums<S: Simd, const R: usize>(&mut self, simd: S, i: usize, x: [&[f32]; R]) {
        // Loops, not `array::map`: closures are compiled without the target features.
        let (zero, one) = (simd.splat_f32s(0.0), simd.splat_f32s(1.0));
        let nv = S::as_simd_f32s(x[0]).0.len();
        let mut shift = [0f32; R];
        let mut k = [(zero, one, zero); R];
        let mut heads: [&[S::f32s]; R] = [&[]; R];
        for r in 0..R {
            shift[r] = shift_in(simd, x[r]);
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

    /// `row::finish` for every row, in its common case (no rescaling, no second pass): the same
    /// operations in the same order, so bitwise its result, but in lanes across rows; rows that
    /// need the rare paths are flagged in `rare` for the caller to finish one by one.
    #[inline(always)]
    fn finish(&mut self, n: usize, eps: f64) {
        let nf = n as f64;
        for i in 0..GROUP_ROWS {
            let (sd, sdd) = (self.sd[i], self.sdd[i]);
            let m_lo = sd / nf;
            let var = sdd / nf - m_lo * m_lo;
            self.rare[i] = !(sd.is_finite() && sdd.is_finite()) || m_lo * m_lo > var.abs() * 0.25;
            let var = if var < 0.0 { 0.0 } else { var };
            self.m_lo[i] = m_lo as f32;
            self.mean[i] = f64::from(self.shift[i]) + m_lo;
            self.rstd[i] = 1.0 / (var + eps).sqrt();
        }
    }

    /// Overwrites row `i` with the statistics `row::finish` computed.
    #[inline(always)]
    fn set(&mut self, i: usize, st: &row::RowStats<f32>) {
        (self.m_lo[i], self.mean[i], self.rstd[i]) = (st.m_lo, st.mean, st.rstd);
    }
}

/// Most rows per group of the short-row kernels.
const GROUP_ROWS: usize = 16;

/// Rows per group of the short-row kernels: about 2 K elements (8 KiB per operand, in L1).
#[inline(always)]
fn group_rows(n: usize) -> usize {
    (2048 / n.max(1)).clamp(1, GROUP_ROWS)
}

/// Forward of `mean.len()` consecutive rows of `n` in one explicit-SIMD loop (for short rows).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows(
    n: usize,
    eps: f64,
    x: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    stream: bool,
) {
    Arch::new().dispatch(Rows { n, eps, x, gamma, beta, y, mean, rstd, stream })
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
        let mut stage = self.stream.then(|| {
            let buf = vec![0f32; per * n + 16];
            let off = buf.as_ptr().align_offset(64).min(16);
            (buf, off)
        });
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
    }
}

/// Row `r` of rows of `n`.
#[inline(always)]
fn row_at(v: &[f32], n: usize, r: usize) -> &[f32] {
    &v[r * n..(r + 1) * n]
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
    dgamma: Option<&'a mut [f32]>,
    dbeta: Option<&'a mut [f32]>,
    stream: bool,
}

impl WithSimd for BackLong<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(mut self, simd: S) {
        let n = self.n;
        let rows = self.mean.len().min(self.rstd.len());
        let (x, dy, gamma) = (self.x, self.dy, self.gamma);
        let span = |r: usize| r * n..(r + 1) * n;
        let mut stage = self.stream.then(|| {
            let buf = vec![0f32; 2 * n + 16];
            let off = buf.as_ptr().align_offset(64).min(16);
            (buf, off)
        });
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
                sums = back_pair(
                    simd,
                    n,
                    (x, dy, gamma),
                    (r, p),
                    next,
                    [dx0, dx1],
                    (self.dgamma.as_deref_mut(), self.dbeta.as_deref_mut()),
                );
                if let Some((buf, off)) = stage.as_ref() {
                    let f = Flush::new::<S>(self.dx, r * n..(r + 2) * n);
                    f.finish(simd, &buf[*off..], self.dx);
                }
                r += 2;
            } else {
                // The block's last rows: one at a time, each summing the row after next.
                let p = params(0);
                let (dg, db) = (self.dgamma.as_deref_mut(), self.dbeta.as_deref_mut());
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

/// Backward of a block of long rows in place (see [`BackLong`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn back_long(
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
    Arch::new().dispatch(BackLong { n, x, dy, mean, rstd, gamma, dx, dgamma, dbeta, stream })
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

    /// Rows that exercise `row::finish`'s rare paths, mixed among ordinary ones: constant rows, a
    /// huge mean, squares that overflow, an outlying head, a NaN; and plain pseudo-random rows.
    fn mixed_rows(rows: usize, n: usize) -> Vec<f32> {
        let mut s = 0x2545_f491u32;
        let mut x = Vec::with_capacity(rows * n);
        for r in 0..rows {
            for j in 0..n {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let u = s as f32 / u32::MAX as f32 - 0.5;
                x.push(match r % 7 {
                    0 => 3.25,
                    1 => 1e6 + u,
                    2 => 1e37 * u,
                    3 if j < 32 => 50.0 + u,
                    4 if j == n / 2 => f32::NAN,
                    _ => u * 3.0,
                });
            }
        }
        x
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn short_row_kernels_match_the_portable_composition_bit_for_bit() {
        let nrows = 45; // two full groups of 16 and a ragged one
        for n in [1usize, 5, 16, 17, 40, 100, 128, 255, 256, 300, 511] {
            let x = mixed_rows(nrows, n);
            let dy = mixed_rows(nrows, n).iter().map(|v| v.sin()).collect::<Vec<_>>();
            let g: Vec<f32> = (0..n).map(|j| 0.5 + j as f32 / n as f32).collect();
            let b: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 1.0).collect();
            for (gamma, beta) in [(Some(&g[..]), Some(&b[..])), (None, None), (Some(&g[..]), None)]
            {
                let (mut y0, mut m0, mut r0) =
                    (vec![0f32; nrows * n], vec![0f32; nrows], vec![0f32; nrows]);
                let (mut y1, mut m1, mut r1) = (y0.clone(), m0.clone(), r0.clone());
                row::rows_portable(n, 1e-5, &x, gamma, beta, &mut y0, &mut m0, &mut r0);
                for stream in [false, true] {
                    rows(n, 1e-5, &x, gamma, beta, &mut y1, &mut m1, &mut r1, stream);
                    stream_fence();
                    assert_eq!(bits(&y1), bits(&y0), "y, n={n}, stream={stream}");
                    assert_eq!((bits(&m1), bits(&r1)), (bits(&m0), bits(&r0)), "stats, n={n}");
                }
                // Backward from finite statistics (the NaN row's are NaN, which is fine too).
                let (mut dx0, mut dg0, mut db0) =
                    (vec![0f32; nrows * n], vec![0f32; n], vec![0f32; n]);
                let (dx1, dg1, db1) = (dx0.clone(), dg0.clone(), db0.clone());
                row::back_rows_portable(
                    n,
                    &x,
                    &dy,
                    &m0,
                    &r0,
                    gamma,
                    &mut dx0,
                    Some(&mut dg0),
                    Some(&mut db0),
                );
                for stream in [false, true] {
                    let (mut dx1, mut dg1, mut db1) = (dx1.clone(), dg1.clone(), db1.clone());
                    let (dg, db) = (Some(&mut dg1[..]), Some(&mut db1[..]));
                    back_rows(n, &x, &dy, &m0, &r0, gamma, &mut dx1, dg, db, stream);
                    stream_fence();
                    assert_eq!(bits(&dx1), bits(&dx0), "dx, n={n}, stream={stream}");
                    let (g1, b1, g0, b0) = (bits(&dg1), bits(&db1), bits(&dg0), bits(&db0));
                    assert_eq!((g1, b1), (g0, b0), "dγ/dβ, n={n}");
                }
            }
        }
    }

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
