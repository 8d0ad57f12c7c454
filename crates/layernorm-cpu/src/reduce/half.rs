//! 16-bit rows (`bf16`, `f16`) converted in registers: the kernels load 16-bit vectors, widen
//! them in the register, and round results back before their store — no `f32` scratch rows and
//! no separate conversion sweeps. The widening is exact and the rounding is `half`'s (nearest
//! even, NaN quieted), on the same vectors in the same order as the scratch path, so the bits
//! are the same (tested). The kernels are generic over [`Half`], which says how a type converts:
//! `bf16` by integer vector ops at any SIMD level, `f16` by F16C (or AVX-512F).
//!
//! AVX-512 BF16's `vcvtneps2bf16` is not used for the rounding: it flushes subnormal inputs to
//! zero, where `half` rounds them.

use layernorm_core::{bf16, f16};
use pulp::{Simd, WithSimd};

use super::backward::Partials;
use super::forward::Group;
use super::steps::*;
use super::store::{PREFETCH_AHEAD, prefetch, prefetch_line};
use crate::CpuElement;
use crate::row::{self, Kind};

/// `W` `bf16` values from `src` (at least `W` long), widened to an `f32` vector exactly — but on
/// x86 a signaling NaN stays signaling, where `half`'s `bf16::to_f32` sets its quiet bit.
///
/// Every kernel's first use of a loaded value is an arithmetic operation, and x86's vector
/// arithmetic returns a NaN operand quieted, payload and sign kept, choosing among NaN operands
/// by position alone, never by whether one was signaling: so skipping the quieting gives the
/// scratch path's bits and saves four instructions a vector (tested with signaling NaNs in the
/// rows). Arm prefers a signaling operand over a quiet one, so the portable path quiets.
#[inline(always)]
fn load_bf16<S: Simd>(simd: S, src: &[bf16]) -> S::f32s {
    let w = size_of::<S::f32s>() / 4;
    let src = &src[..w];
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::*;
        let p = src.as_ptr();
        // SAFETY: `src` holds `w` elements: 32 bytes for 16 lanes, 16 bytes for 8 (unaligned
        // loads). A vector of 64 / 32 bytes exists only under AVX-512F / AVX2, checked at run time
        // by the dispatch that chose `S`; the transmutes are between types of the same size.
        unsafe {
            if w == 16 {
                let wide =
                    _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())));
                return core::mem::transmute_copy(&wide);
            }
            if w == 8 {
                let wide =
                    _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())));
                return core::mem::transmute_copy(&wide);
            }
        }
    }
    let mut lanes = [0f32; 16];
    for (l, v) in lanes.iter_mut().zip(src) {
        *l = v.to_f32();
    }
    simd.partial_load_f32s(&lanes[..w])
}

/// An `f32` vector rounded to `bf16` (nearest even, NaN quieted: `half`'s `bf16::from_f32`), each
/// lane's 16 bits in the low half of its 32.
#[inline(always)]
fn round<S: Simd>(simd: S, v: S::f32s) -> S::u32s {
    let bits = simd.transmute_u32s_f32s(v);
    let sixteen = simd.splat_u32s(16);
    let high = simd.wrapping_dyn_shr_u32s(bits, sixteen);
    let odd = simd.and_u32s(high, simd.splat_u32s(1));
    let biased = simd.add_u32s(simd.add_u32s(bits, simd.splat_u32s(0x7fff)), odd);
    let rounded = simd.wrapping_dyn_shr_u32s(biased, sixteen);
    // Only a NaN is unequal to itself: one compare, where testing the bits takes three.
    let number = simd.equal_f32s(v, v);
    simd.select_u32s(number, rounded, simd.or_u32s(high, simd.splat_u32s(0x40)))
}

/// Rounds an `f32` vector to `bf16` ([`round`]) and stores its `W` values at the start of `dst`.
#[inline(always)]
fn store_bf16<S: Simd>(simd: S, dst: &mut [bf16], v: S::f32s) {
    let w = size_of::<S::f32s>() / 4;
    let dst = &mut dst[..w];
    let r = round(simd, v);
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::*;
        let p = dst.as_mut_ptr();
        // SAFETY: as in `load`: `dst` holds `w` elements, the ISA matches the vector width, and
        // every lane of `r` is below 2^16, so narrowing each to 16 bits loses nothing.
        unsafe {
            if w == 16 {
                let r: __m512i = core::mem::transmute_copy(&r);
                return _mm256_storeu_si256(p.cast(), _mm512_cvtepi32_epi16(r));
            }
            if w == 8 {
                let r: __m256i = core::mem::transmute_copy(&r);
                let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(r, r));
                return _mm_storeu_si128(p.cast(), _mm256_castsi256_si128(packed));
            }
        }
    }
    let lanes: &[u32] = bytemuck::cast_slice(core::slice::from_ref(&r));
    for (d, &l) in dst.iter_mut().zip(lanes) {
        *d = bf16::from_bits(l as u16);
    }
}

/// A 16-bit storage type whose rows the kernels here convert in registers: `bf16` (widening is
/// a shift, rounding integer arithmetic, any SIMD level) and `f16` (F16C's conversions, or
/// AVX-512F's). Both round to nearest even exactly as `half` does, so the kernels give the bits
/// of the scratch path (rows widened by `half`, the `f32` kernels, rounded back by `half`).
pub(crate) trait Half: CpuElement<Acc = f32> {
    /// `W` values from `src` (at least `W` long), widened to an `f32` vector exactly (for NaNs,
    /// see the implementations).
    fn load<S: Simd>(simd: S, src: &[Self]) -> S::f32s;
    /// Rounds `v` (nearest even) and stores its `W` values at the start of `dst`.
    fn store<S: Simd>(simd: S, dst: &mut [Self], v: S::f32s);
    /// Runs `op` at the best SIMD level this CPU has for the type's conversions.
    fn dispatch<Op: WithSimd>(op: Op) -> Op::Output;
}

impl Half for bf16 {
    #[inline(always)]
    fn load<S: Simd>(simd: S, src: &[Self]) -> S::f32s {
        load_bf16(simd, src)
    }
    #[inline(always)]
    fn store<S: Simd>(simd: S, dst: &mut [Self], v: S::f32s) {
        store_bf16(simd, dst, v)
    }
    fn dispatch<Op: WithSimd>(op: Op) -> Op::Output {
        crate::isa::dispatch(op)
    }
}

impl Half for f16 {
    /// F16C's `vcvtph2ps` (AVX-512F's with 16 lanes), which quiets signaling NaNs as `half`
    /// does.
    #[inline(always)]
    fn load<S: Simd>(simd: S, src: &[Self]) -> S::f32s {
        let w = size_of::<S::f32s>() / 4;
        let src = &src[..w];
        #[cfg(target_arch = "x86_64")]
        {
            use core::arch::x86_64::*;
            let p = src.as_ptr();
            // SAFETY: `src` holds `w` elements: 32 bytes for 16 lanes, 16 bytes for 8 (unaligned
            // loads). 16 lanes exist only under AVX-512F, which has the conversion; 8 lanes are
            // AVX2, which `f16`'s `dispatch` runs only where F16C was detected (the kernels are
            // reached only through it; the tests also run them under `pulp`'s own AVX2 level,
            // on machines with F16C, which every AVX2 CPU has). The transmutes are between types
            // of the same size.
            unsafe {
                if w == 16 {
                    return core::mem::transmute_copy(&_mm512_cvtph_ps(_mm256_loadu_si256(
                        p.cast(),
                    )));
                }
                if w == 8 {
                    return core::mem::transmute_copy(&_mm256_cvtph_ps(_mm_loadu_si128(p.cast())));
                }
            }
        }
        let mut lanes = [0f32; 16];
        for (l, v) in lanes.iter_mut().zip(src) {
            *l = v.to_f32();
        }
        simd.partial_load_f32s(&lanes[..w])
    }
    /// F16C's `vcvtps2ph` (AVX-512F's with 16 lanes), nearest even by the immediate, whatever
    /// MXCSR says; subnormal results are rounded, not flushed.
    #[inline(always)]
    fn store<S: Simd>(simd: S, dst: &mut [Self], v: S::f32s) {
        let w = size_of::<S::f32s>() / 4;
        let dst = &mut dst[..w];
        #[cfg(target_arch = "x86_64")]
        {
            use core::arch::x86_64::*;
            let p = dst.as_mut_ptr();
            // SAFETY: as in `load`.
            unsafe {
                if w == 16 {
                    let v: __m512 = core::mem::transmute_copy(&v);
                    let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                    return _mm256_storeu_si256(p.cast(), h);
                }
                if w == 8 {
                    let v: __m256 = core::mem::transmute_copy(&v);
                    return _mm_storeu_si128(
                        p.cast(),
                        _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v),
                    );
                }
            }
        }
        let mut lanes = [0f32; 16];
        simd.partial_store_f32s(&mut lanes[..w], v);
        for (d, &l) in dst.iter_mut().zip(&lanes) {
            *d = f16::from_f32(l);
        }
    }
    /// AVX-512F; AVX2 where F16C is there too (`pulp`'s AVX2 level does not include it, so the
    /// kernels are compiled here with it added); the portable paths otherwise.
    fn dispatch<Op: WithSimd>(op: Op) -> Op::Output {
        #[cfg(target_arch = "x86_64")]
        {
            use pulp::x86::V3;
            #[cfg(not(feature = "max-avx2"))]
            if let Some(simd) = pulp::x86::V4::try_new() {
                return Simd::vectorize(simd, op);
            }
            if let Some(simd) = V3::try_new()
                && std::arch::is_x86_feature_detected!("f16c")
            {
                #[target_feature(enable = "avx,avx2,fma,bmi1,bmi2,lzcnt,popcnt,f16c")]
                fn with_f16c<Op: WithSimd>(simd: V3, op: Op) -> Op::Output {
                    op.with_simd(simd)
                }
                // SAFETY: `V3::try_new` detected AVX2, FMA, BMI1/2, LZCNT and POPCNT, and F16C
                // was detected just above.
                return unsafe { with_f16c(simd, op) };
            }
            Simd::vectorize(pulp::Scalar::new(), op)
        }
        #[cfg(not(target_arch = "x86_64"))]
        crate::isa::dispatch(op)
    }
}

/// Vector `j` of `row` (its values `j·W..(j + 1)·W`), widened by [`Half::load`] without a bounds
/// check:
/// the hot loops check their rows' lengths once instead, and the per-vector checks had been a
/// quarter of the forward's instructions.
///
/// # Safety
/// `row` holds at least `(j + 1)·W` values.
#[inline(always)]
unsafe fn load_vec<S: Simd, T: Half>(simd: S, row: &[T], j: usize) -> S::f32s {
    let w = size_of::<S::f32s>() / 4;
    debug_assert!((j + 1) * w <= row.len());
    // SAFETY: in bounds, by the caller's contract.
    T::load(simd, unsafe { row.get_unchecked(j * w..(j + 1) * w) })
}

/// [`Half::store`] into vector `j` of `row` (its values `j·W..(j + 1)·W`) without a bounds check.
///
/// # Safety
/// `row` holds at least `(j + 1)·W` values.
#[inline(always)]
unsafe fn store_vec<S: Simd, T: Half>(simd: S, row: &mut [T], j: usize, v: S::f32s) {
    let w = size_of::<S::f32s>() / 4;
    debug_assert!((j + 1) * w <= row.len());
    // SAFETY: in bounds, by the caller's contract.
    T::store(simd, unsafe { row.get_unchecked_mut(j * w..(j + 1) * w) }, v)
}

/// The forward's shift of a 16-bit row: `shift_of` the widened row, without widening it.
#[inline(always)]
fn shift<S: Simd, T: Half>(simd: S, kind: Kind, x: &[T]) -> f32 {
    let w = size_of::<S::f32s>() / 4;
    let k = x.len().min(row::SHIFT_SAMPLE);
    if k == 0 || !kind.centred() {
        return 0.0;
    }
    let mut acc = simd.splat_f32s(0.0);
    let heads = k / w;
    for j in 0..heads {
        // SAFETY: (j + 1)·W ≤ heads·W ≤ k ≤ x.len().
        acc = simd.add_f32s(acc, unsafe { load_vec(simd, x, j) });
    }
    let mut sum = simd.reduce_sum_f32s(acc);
    for v in &x[heads * w..k] {
        sum += T::to_acc(*v);
    }
    let m = sum / k as f32;
    if m.is_finite() {
        m
    } else {
        (x[..k].iter().map(|&v| T::to_f64(v)).sum::<f64>() / k as f64) as f32
    }
}

/// `centered_tail` of a 16-bit row's last `x.len() − base` values (fewer than a vector), widened.
#[inline(always)]
fn centered_tail_16<T: Half>(x: &[T], base: usize, k: (f32, f32, f32), total: &mut [f64; 2]) {
    let mut t = [0f32; 16];
    let t = &mut t[..x.len() - base];
    T::widen(&x[base..], t);
    centered_tail(t, k, total);
}

/// `row::max_abs` of a 16-bit row (the largest |x| widened: exact).
#[inline(always)]
fn max_abs_16<T: Half>(x: &[T]) -> f64 {
    f64::from(x.iter().fold(0f32, |a, &v| a.max(T::to_acc(v).abs())))
}

/// `row::finish` of a 16-bit row whose sums around `m_hi` are `sums`: its rare paths sweep the
/// row where it lies ([`sums`] at a scale and a residual mean), the bits of the widened row's.
#[inline(always)]
fn finish_16<S: Simd, T: Half>(
    simd: S,
    spec: row::Spec,
    x: &[T],
    m_hi: f32,
    sums: [f64; 2],
) -> row::RowStats<f32> {
    let sweep = |s: f32, ml: f32| self::sums(simd, x, (m_hi, s, ml));
    row::finish_with(spec, x.len(), m_hi, sums, || max_abs_16(x), sweep)
}

/// `normalize_tail` of a 16-bit row's last `x.len() − base` values (fewer than a vector): widened,
/// normalized, rounded into the same places of `y`.
#[inline(always)]
fn normalize_tail_16<T: Half>(
    (x, base): (&[T], usize),
    params: (f32, f32, f32),
    gb: (Option<&[f32]>, Option<&[f32]>),
    y: &mut [T],
) {
    let (mut t, mut out) = ([0f32; 16], [0f32; 16]);
    let (t, out) = (&mut t[..x.len() - base], &mut out[..x.len() - base]);
    T::widen(&x[base..], t);
    normalize_tail(t, params, gb, base, out);
    T::narrow(out, &mut y[base..]);
}

/// `centered_in(x, (m, s, ml))` of a 16-bit row, converted in registers.
#[inline(always)]
fn sums<S: Simd, T: Half>(simd: S, x: &[T], (m, s, ml): (f32, f32, f32)) -> [f64; 2] {
    let w = size_of::<S::f32s>() / 4;
    let nv = x.len() / w;
    let mut total = if s == 1.0 && ml == 0.0 {
        sums_vecs::<S, T, true>(simd, x, (m, s, ml))
    } else {
        sums_vecs::<S, T, false>(simd, x, (m, s, ml))
    };
    centered_tail_16(x, nv * w, (m, s, ml), &mut total);
    total
}

/// The vector body of [`sums`] (`centered_vecs` on values widened in registers).
#[inline(always)]
fn sums_vecs<S: Simd, T: Half, const PLAIN: bool>(
    simd: S,
    x: &[T],
    (m, s, ml): (f32, f32, f32),
) -> [f64; 2] {
    let w = size_of::<S::f32s>() / 4;
    let nv = x.len() / w;
    let zero = simd.splat_f32s(0.0);
    let k = (simd.splat_f32s(m), simd.splat_f32s(s), simd.splat_f32s(ml));
    let mut total = [0f64; 2];
    let pb = per_block::<S>();
    let mut i = 0;
    while i < nv {
        let end = (i + pb).min(nv);
        let mut acc = [zero; 2];
        for j in i..end {
            // SAFETY: j < nv = x.len() / W.
            let v = unsafe { load_vec(simd, x, j) };
            centered_step::<S, PLAIN>(simd, v, k, &mut acc);
        }
        fold_into(simd, acc, &mut total);
        i = end;
    }
    total
}

/// Forward of long 16-bit rows (N ≥ `FUSE_MIN_N`), pipelined like the `f32` one: row r normalized
/// while row r+1 is summed, every vector converted in its register.
struct Fwd16<'a, T> {
    n: usize,
    spec: row::Spec,
    x: &'a [T],
    gamma: Option<&'a [f32]>,
    beta: Option<&'a [f32]>,
    y: &'a mut [T],
    mean: &'a mut [f32],
    rstd: &'a mut [f32],
}

impl<T: Half> WithSimd for Fwd16<'_, T> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let n = self.n;
        let w = size_of::<S::f32s>() / 4;
        let nv = n / w;
        let rows = self.mean.len().min(self.rstd.len());
        let x = self.x;
        let xr = |q: usize| &x[q * n..(q + 1) * n];
        let (gamma, beta) = (self.gamma, self.beta);
        let gh = gamma.map_or(&[][..], |g| &S::as_simd_f32s(&g[..n]).0[..nv]);
        let bh = beta.map_or(&[][..], |b| &S::as_simd_f32s(&b[..n]).0[..nv]);
        let (spec, zero) = (self.spec, simd.splat_f32s(0.0));
        let mut m_next = shift(simd, spec.kind, xr(0));
        let mut next_sums = sums(simd, xr(0), (m_next, 1.0, 0.0));
        for r in 0..rows {
            let cur = xr(r);
            let st = match row::finish_common(spec, n, m_next, next_sums) {
                Some(st) => st,
                None => finish_16(simd, spec, cur, m_next, next_sums),
            };
            let (mh, ml, rs) = st.params();
            let kc = xhat_splats(simd, (mh, ml, rs));
            let y = &mut self.y[r * n..(r + 1) * n];
            let has_next = r + 1 < rows;
            let nxt = if has_next { xr(r + 1) } else { cur };
            if has_next {
                m_next = shift(simd, spec.kind, nxt);
            }
            let kn = (simd.splat_f32s(m_next), simd.splat_f32s(1.0), zero);
            let (g, b) = (gamma.is_some(), beta.is_some());
            let mut total = specialize!(fused_16_vecs::<S, T>(g, b, has_next)(
                simd,
                (nxt, kn),
                (cur, kc),
                (gh, bh),
                y
            ));
            let base = nv * w;
            if base < n {
                // Tails: the scalar code of the f32 kernels, on widened values.
                normalize_tail_16((cur, base), (mh, ml, rs), (gamma, beta), y);
                if has_next {
                    centered_tail_16(nxt, base, (m_next, 1.0, 0.0), &mut total);
                }
            }
            if has_next {
                next_sums = total;
            }
            self.mean[r] = st.mean as f32;
            self.rstd[r] = st.rstd as f32;
        }
    }
}

/// The vector body of [`Fwd16`]: with `NX`, the next row's vectors summed; this row's
/// vectors normalized and rounded into `y`. This row is widened a second time (it is in L1 or
/// L2), which measured faster than keeping a widened copy from the sums: a store and a load
/// per vector, and for long rows a working set that leaves L1 (256×16384: 7.6 → 9.9 GB/s).
#[inline(always)]
#[allow(clippy::type_complexity)]
fn fused_16_vecs<S: Simd, T: Half, const G: bool, const B: bool, const NX: bool>(
    simd: S,
    (nxt, kn): (&[T], (S::f32s, S::f32s, S::f32s)),
    (cur, kc): (&[T], (S::f32s, S::f32s, S::f32s)),
    (gh, bh): (&[S::f32s], &[S::f32s]),
    y: &mut [T],
) -> [f64; 2] {
    let w = size_of::<S::f32s>() / 4;
    let nv = cur.len() / w;
    // The vectors' bounds, checked here once for the loop's unchecked loads and stores.
    assert!(y.len() >= nv * w && (!NX || nxt.len() >= nv * w));
    let (gh, bh) = (if G { &gh[..nv] } else { gh }, if B { &bh[..nv] } else { bh });
    let zero = simd.splat_f32s(0.0);
    let mut total = [0f64; 2];
    let pb = per_block::<S>();
    // One prefetch per 64-byte line of the summed row (32 16-bit values), PREFETCH_AHEAD on.
    let per_line = (32 / w).max(1);
    let ahead = nxt.as_ptr().wrapping_add(PREFETCH_AHEAD).cast::<f32>();
    let mut i = 0;
    while i < nv {
        let end = (i + pb).min(nv);
        let mut acc = [zero; 2];
        // SAFETY (the loads and the store): j < nv, and nxt (with `NX`), cur and y hold nv·W
        // values (asserted above).
        for j in i..end {
            if NX {
                if j % per_line == 0 {
                    prefetch_line(ahead.wrapping_byte_add(j * 2 * w));
                }
                let v = unsafe { load_vec(simd, nxt, j) };
                centered_step::<S, true>(simd, v, kn, &mut acc);
            }
            let v = unsafe { load_vec(simd, cur, j) };
            let v = normalize_vec::<S, G, B>(simd, v, kc, (gh, bh), j);
            unsafe { store_vec(simd, y, j, v) };
        }
        fold_into(simd, acc, &mut total);
        i = end;
    }
    total
}

/// Forward of consecutive 16-bit rows in one explicit-SIMD loop: the grouped short-row kernel
/// below `FUSE_MIN_N` ([`Rows16`]), the pipelined one from it ([`Fwd16`]), as for `f32`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_16<T: Half>(
    n: usize,
    spec: row::Spec,
    x: &[T],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    y: &mut [T],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    if n < row::FUSE_MIN_N {
        T::dispatch(Rows16 { n, spec, x, gamma, beta, y, mean, rstd })
    } else {
        T::dispatch(Fwd16 { n, spec, x, gamma, beta, y, mean, rstd })
    }
}

/// Forward of consecutive short 16-bit rows (N < `FUSE_MIN_N`) in groups, like the `f32`
/// short-row kernel (`forward::Rows`) on widened rows: the group's shifts and residual sums, four
/// rows side by side; the statistics of all its rows at once (`forward::Group`); then the
/// normalize sweep, converting in registers throughout. The operations per row are those of
/// the scratch path, so the bits are the same (tested).
struct Rows16<'a, T> {
    n: usize,
    spec: row::Spec,
    x: &'a [T],
    gamma: Option<&'a [f32]>,
    beta: Option<&'a [f32]>,
    y: &'a mut [T],
    mean: &'a mut [f32],
    rstd: &'a mut [f32],
}

impl<T: Half> WithSimd for Rows16<'_, T> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let n = self.n;
        let w = size_of::<S::f32s>() / 4;
        let (nv, base) = (n / w, n / w * w);
        let rows = self.mean.len().min(self.rstd.len());
        let x = &self.x[..rows * n];
        let (gamma, beta) = (self.gamma, self.beta);
        let gh = gamma.map_or(&[][..], |g| &S::as_simd_f32s(&g[..n]).0[..nv]);
        let bh = beta.map_or(&[][..], |b| &S::as_simd_f32s(&b[..n]).0[..nv]);
        let (per, spec) = (group_rows(n), self.spec);
        let mut g = Group::default();
        let mut start = 0;
        while start < rows {
            let count = per.min(rows - start);
            let row = |i: usize| &x[(start + i) * n..(start + i + 1) * n];
            let mut i = 0;
            while i + 4 <= count {
                let rows4 = [row(i), row(i + 1), row(i + 2), row(i + 3)];
                group_sums::<S, T, 4>(simd, spec.kind, &mut g, i, rows4);
                i += 4;
            }
            while i < count {
                group_sums::<S, T, 1>(simd, spec.kind, &mut g, i, [row(i)]);
                i += 1;
            }
            g.finish(spec, n);
            for i in 0..count {
                if g.rare[i] {
                    let st = finish_16(simd, spec, row(i), g.shift[i], [g.sd[i], g.sdd[i]]);
                    g.set(i, &st);
                }
            }
            for i in 0..count {
                let next = (start + count + i) * n;
                if next < x.len() {
                    prefetch(&x[next..(next + n).min(x.len())]);
                }
                let (xr, r) = (row(i), start + i);
                let (mh, ml, rs) = (g.m_hi[i], g.m_lo[i], g.rstd[i] as f32);
                let k = xhat_splats(simd, (mh, ml, rs));
                let y = &mut self.y[r * n..(r + 1) * n];
                let a = (simd, xr, k, (gh, bh));
                match (gamma.is_some(), beta.is_some()) {
                    (false, false) => normalize_16_vecs::<S, T, false, false>(a, y),
                    (false, true) => normalize_16_vecs::<S, T, false, true>(a, y),
                    (true, false) => normalize_16_vecs::<S, T, true, false>(a, y),
                    (true, true) => normalize_16_vecs::<S, T, true, true>(a, y),
                }
                if base < n {
                    normalize_tail_16((xr, base), (mh, ml, rs), (gamma, beta), y);
                }
                self.mean[r] = g.mean[i] as f32;
                self.rstd[r] = g.rstd[i] as f32;
            }
            start += count;
        }
    }
}

/// `Group::sums` of 16-bit rows `i..i + R`: per row exactly [`shift`] and [`sums`], the rows'
/// steps interleaved so that their dependency chains overlap.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // rows side by side: one index into R arrays
fn group_sums<S: Simd, T: Half, const R: usize>(
    simd: S,
    kind: Kind,
    g: &mut Group,
    i: usize,
    x: [&[T]; R],
) {
    let w = size_of::<S::f32s>() / 4;
    let (zero, one) = (simd.splat_f32s(0.0), simd.splat_f32s(1.0));
    let n = x[0].len();
    let nv = n / w;
    let mut shifts = [0f32; R];
    let mut k = [(zero, one, zero); R];
    for r in 0..R {
        // The vectors' bounds, checked here once for the loop's unchecked loads.
        assert!(x[r].len() == n);
        shifts[r] = shift(simd, kind, x[r]);
        k[r].0 = simd.splat_f32s(shifts[r]);
    }
    let mut total = [[0f64; 2]; R];
    let pb = per_block::<S>();
    let mut b = 0;
    while b < nv {
        let end = (b + pb).min(nv);
        let mut acc = [[zero; 2]; R];
        for j in b..end {
            for r in 0..R {
                // SAFETY: j < nv = n / W, and every row holds n values (asserted above).
                let v = unsafe { load_vec(simd, x[r], j) };
                centered_step::<S, true>(simd, v, k[r], &mut acc[r]);
            }
        }
        for r in 0..R {
            fold_into(simd, acc[r], &mut total[r]);
        }
        b = end;
    }
    for r in 0..R {
        centered_tail_16(x[r], nv * w, (shifts[r], 1.0, 0.0), &mut total[r]);
        g.shift[i + r] = shifts[r];
        [g.sd[i + r], g.sdd[i + r]] = total[r];
    }
}

/// The vector body of the short-row normalize: `x`'s whole vectors normalized and rounded into
/// `y`.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn normalize_16_vecs<S: Simd, T: Half, const G: bool, const B: bool>(
    (simd, x, k, (gh, bh)): (S, &[T], (S::f32s, S::f32s, S::f32s), (&[S::f32s], &[S::f32s])),
    y: &mut [T],
) {
    let w = size_of::<S::f32s>() / 4;
    let nv = x.len() / w;
    assert!(y.len() >= nv * w);
    let (gh, bh) = (if G { &gh[..nv] } else { gh }, if B { &bh[..nv] } else { bh });
    for j in 0..nv {
        // SAFETY: j < nv = x.len() / W, and y holds nv·W values (asserted above).
        let v = unsafe { load_vec(simd, x, j) };
        let v = normalize_vec::<S, G, B>(simd, v, k, (gh, bh), j);
        unsafe { store_vec(simd, y, j, v) };
    }
}

/// Backward of consecutive 16-bit rows (any N; short rows too), pipelined like the `f32`
/// one-row sweep: row r's dx (rounded to 16 bits in the register) and its dγ/dβ terms while row
/// r+1 is summed; each row is widened in registers twice, once per sweep (it is in L1 or L2 the
/// second time): keeping widened `f32` copies instead measured slower, by a store and a load per
/// vector and, for long rows, a working set past L1 (1024×4096: 5.5 → 8.1 GB/s without them).
/// Per row the operations are those of the scratch path (`f32` rows
/// widened by `Convert::widen`, `FusedBackward`, `row::back_apply`, then narrowed), so the
/// bits are the same (tested).
struct Back16<'a, T> {
    kind: Kind,
    n: usize,
    x: &'a [T],
    dy: &'a [T],
    mean: &'a [f32],
    rstd: &'a [f32],
    gamma: Option<&'a [f32]>,
    dx: &'a mut [T],
    partials: Partials<'a>,
}

impl<T: Half> WithSimd for Back16<'_, T> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(mut self, simd: S) {
        let n = self.n;
        let w = size_of::<S::f32s>() / 4;
        let nv = n / w;
        let base = nv * w;
        let rows = self.mean.len().min(self.rstd.len());
        if rows == 0 {
            return;
        }
        let (x, dy, gamma) = (self.x, self.dy, self.gamma);
        let span = |r: usize| r * n..(r + 1) * n;
        let gh = gamma.map_or(&[][..], |g| &S::as_simd_f32s(&g[..n]).0[..nv]);
        // Widened tails (fewer than a vector).
        let (mut tx, mut td) = ([0f32; 16], [0f32; 16]);
        let shift = |r: usize| row::back_shift_f32(self.mean[r], self.rstd[r]);
        let mut sums = back_sums(simd, (&x[span(0)], &dy[span(0)]), gamma, shift(0));
        for r in 0..rows {
            let (mu, rs) = (f64::from(self.mean[r]), f64::from(self.rstd[r]));
            let p = row::back_params::<f32>(self.kind, n, mu, rs, sums);
            let (dg, db) = self.partials.of_row(r, n);
            let (want_g, want_b) = (dg.is_some(), db.is_some());
            let dxr = &mut self.dx[span(r)];
            if r + 1 < rows {
                let next = (&x[span(r + 1)], &dy[span(r + 1)]);
                let (m, s) = shift(r + 1);
                let k = (simd.splat_f32s(m), simd.splat_f32s(s));
                let empty: &mut [f32] = &mut [];
                let (dgs, dbs) = (dg.unwrap_or(&mut []), db.unwrap_or(empty));
                let dgh = &mut S::as_mut_simd_f32s(&mut dgs[..]).0;
                let dbh = &mut S::as_mut_simd_f32s(&mut dbs[..]).0;
                let mut total = specialize!(back_16_vecs::<S, T>(gamma.is_some(), want_g, want_b)(
                    simd,
                    (next, k),
                    ((&x[span(r)], &dy[span(r)]), &BackVecs::new(simd, &p)),
                    gh,
                    dxr,
                    (dgh, dbh)
                ));
                // Tails: the next row's sums, this row's dx and dγ/dβ terms, on widened values.
                if base < n {
                    let gt = gamma.map(|g| &g[base..n]);
                    T::widen(&next.0[base..], &mut tx[..n - base]);
                    T::widen(&next.1[base..], &mut td[..n - base]);
                    backward_tail((&tx[..n - base], &td[..n - base], gt), (m, s), &mut total);
                    let (dgs, dbs) =
                        ((want_g).then(|| &mut dgs[base..n]), (want_b).then(|| &mut dbs[base..n]));
                    let cur = (&x[span(r)], &dy[span(r)]);
                    T::widen(&cur.0[base..], &mut tx[..n - base]);
                    T::widen(&cur.1[base..], &mut td[..n - base]);
                    let mut out = [0f32; 16];
                    let out = &mut out[..n - base];
                    let t = (&tx[..n - base], &td[..n - base], gamma);
                    apply_tail(t, &p, base, out, dgs, dbs, None);
                    T::narrow(out, &mut dxr[base..]);
                }
                sums = total;
            } else {
                // The last row alone, as the scratch path does it.
                apply_16(simd, (&x[span(r)], &dy[span(r)], gamma), &p, dxr, (dg, db));
            }
        }
    }
}

/// `apply_in` of a 16-bit row (x, dy) into its dx, widened and rounded a chunk at a time: the
/// step is elementwise and the chunks split the row where `apply_in` of the whole widened row
/// splits it into vectors, so the bits are that call's.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn apply_16<S: Simd, T: Half>(
    simd: S,
    (x, dy, gamma): (&[T], &[T], Option<&[f32]>),
    p: &row::BackParams<f32>,
    dx: &mut [T],
    (mut dgamma, mut dbeta): (Option<&mut [f32]>, Option<&mut [f32]>),
) {
    const C: usize = 256;
    let n = x.len();
    let (mut tx, mut td, mut out) = ([0f32; C], [0f32; C], [0f32; C]);
    for start in (0..n).step_by(C) {
        let e = start..(start + C).min(n);
        let len = e.len();
        let (tx, td, out) = (&mut tx[..len], &mut td[..len], &mut out[..len]);
        T::widen(&x[e.clone()], tx);
        T::widen(&dy[e.clone()], td);
        let g = gamma.map(|g| &g[e.clone()]);
        let dg = dgamma.as_deref_mut().map(|d| &mut d[e.clone()]);
        let db = dbeta.as_deref_mut().map(|d| &mut d[e.clone()]);
        apply_in(simd, (tx, td, g), p, out, (dg, db), None);
        T::narrow(out, &mut dx[e]);
    }
}

/// `backward_in` of a 16-bit row pair (x, dy), converted in registers.
#[inline(always)]
fn back_sums<S: Simd, T: Half>(
    simd: S,
    (x, dy): (&[T], &[T]),
    gamma: Option<&[f32]>,
    (m, s): (f32, f32),
) -> [f64; 3] {
    let n = x.len();
    let w = size_of::<S::f32s>() / 4;
    let nv = n / w;
    let gh = gamma.map(|g| &S::as_simd_f32s(&g[..n]).0[..nv]);
    assert!(dy.len() >= nv * w);
    let k = (simd.splat_f32s(m), simd.splat_f32s(s));
    let mut total = [0f64; 3];
    let pb = per_block::<S>();
    let mut i = 0;
    while i < nv {
        let end = (i + pb).min(nv);
        let mut acc = [simd.splat_f32s(0.0); 3];
        for j in i..end {
            // SAFETY: j < nv = x.len() / W, and dy holds nv·W values (asserted above).
            let (xv, dv) = unsafe { (load_vec(simd, x, j), load_vec(simd, dy, j)) };
            backward_step(simd, (xv, dv, gh.map(|g| g[j])), k, &mut acc);
        }
        fold_into(simd, acc, &mut total);
        i = end;
    }
    let base = nv * w;
    let (mut tx, mut td) = ([0f32; 16], [0f32; 16]);
    let (tx, td) = (&mut tx[..n - base], &mut td[..n - base]);
    T::widen(&x[base..], tx);
    T::widen(&dy[base..n], td);
    backward_tail((tx, td, gamma.map(|g| &g[base..n])), (m, s), &mut total);
    total
}

/// The vector body of [`Back16`]: the next row widened and summed, this row's dx rounded and
/// stored with its dγ/dβ terms added (the operations of `FusedBackward`).
#[inline(always)]
#[allow(clippy::type_complexity)]
fn back_16_vecs<S: Simd, T: Half, const G: bool, const DG: bool, const DB: bool>(
    simd: S,
    ((nx, nd), k): ((&[T], &[T]), (S::f32s, S::f32s)),
    ((cx, cd), pv): ((&[T], &[T]), &BackVecs<S::f32s>),
    gh: &[S::f32s],
    dx: &mut [T],
    (dgh, dbh): (&mut [S::f32s], &mut [S::f32s]),
) -> [f64; 3] {
    let w = size_of::<S::f32s>() / 4;
    let nv = cx.len() / w;
    let gh = if G { &gh[..nv] } else { gh };
    let (dgh, dbh) = (if DG { &mut dgh[..nv] } else { dgh }, if DB { &mut dbh[..nv] } else { dbh });
    // The vectors' bounds, checked here once for the loop's unchecked loads and stores.
    assert!(nx.len() >= nv * w && nd.len() >= nv * w && dx.len() >= nv * w && cd.len() >= nv * w);
    let mut total = [0f64; 3];
    let pb = per_block::<S>();
    let per_line = (32 / w).max(1);
    let (ax, ad) =
        (nx.as_ptr().wrapping_add(PREFETCH_AHEAD), nd.as_ptr().wrapping_add(PREFETCH_AHEAD));
    let mut i = 0;
    while i < nv {
        let end = (i + pb).min(nv);
        let mut acc = [simd.splat_f32s(0.0); 3];
        for j in i..end {
            if j % per_line == 0 {
                prefetch_line(ax.wrapping_add(j * w).cast::<f32>());
                prefetch_line(ad.wrapping_add(j * w).cast::<f32>());
            }
            // SAFETY: j < nv, and nx, nd hold nv·W values (asserted above).
            let (xv, dv) = unsafe { (load_vec(simd, nx, j), load_vec(simd, nd, j)) };
            let g = if G { Some(gh[j]) } else { None };
            backward_step(simd, (xv, dv, g), k, &mut acc);
            // SAFETY: j < nv = cx.len() / W, and cd holds nv·W values (asserted above).
            let (cxv, cdv) = unsafe { (load_vec(simd, cx, j), load_vec(simd, cd, j)) };
            let (d, xhat) = apply_step(simd, (cxv, cdv, g), pv);
            // SAFETY: j < nv, and dx holds nv·W values (asserted above).
            unsafe { store_vec(simd, dx, j, d) };
            if DG {
                dgh[j] = simd.mul_add_f32s(cdv, xhat, dgh[j]);
            }
            if DB {
                dbh[j] = simd.add_f32s(dbh[j], cdv);
            }
        }
        fold_into(simd, acc, &mut total);
        i = end;
    }
    total
}

/// Backward of consecutive blocks of 16-bit rows (see [`Back16`]), adding into the
/// blocks' dγ/dβ partials (`partials`: as for `Real::back_blocks`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_16<T: Half>(
    kind: Kind,
    n: usize,
    x: &[T],
    dy: &[T],
    mean: &[f32],
    rstd: &[f32],
    gamma: Option<&[f32]>,
    dx: &mut [T],
    partials: Partials<'_>,
) {
    T::dispatch(Back16 { kind, n, x, dy, mean, rstd, gamma, dx, partials })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Widens all of `wide_in` and rounds all of `narrow_in`, a vector at a time.
    struct Convert<'a, T> {
        wide_in: &'a [T],
        wide_out: &'a mut [f32],
        narrow_in: &'a [f32],
        narrow_out: &'a mut [T],
    }

    impl<T: Half> WithSimd for Convert<'_, T> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) {
            let w = size_of::<S::f32s>() / 4;
            for (src, dst) in self.wide_in.chunks_exact(w).zip(self.wide_out.chunks_exact_mut(w)) {
                let v = T::load(simd, src);
                dst.copy_from_slice(bytemuck::cast_slice(core::slice::from_ref(&v)));
            }
            let pairs = self.narrow_in.chunks_exact(w).zip(self.narrow_out.chunks_exact_mut(w));
            for (src, dst) in pairs {
                T::store(simd, dst, simd.partial_load_f32s(src));
            }
        }
    }

    /// Every 16-bit pattern widened, and `narrow_in` rounded, on every instruction set, against
    /// `half`'s scalar conversions; `quiet_nan` is how the widening may differ (bf16 leaves
    /// signaling NaNs signaling).
    fn check<T: Half + Default>(narrow_in: &[f32], quiet_nan: u32) {
        let wide_in: Vec<T> = (0..=u16::MAX).map(|b| bytemuck::cast::<u16, T>(b)).collect();
        let want_wide: Vec<u32> = wide_in.iter().map(|&v| T::to_acc(v).to_bits()).collect();
        let want_narrow: Vec<u16> =
            narrow_in.iter().map(|&v| bytemuck::cast(T::from_acc(v))).collect();
        for_each_isa!(simd, isa => {
            let mut wide_out = vec![0f32; wide_in.len()];
            let mut narrow_out = vec![T::default(); narrow_in.len()];
            let op = Convert {
                wide_in: &wide_in,
                wide_out: &mut wide_out,
                narrow_in,
                narrow_out: &mut narrow_out,
            };
            pulp::Simd::vectorize(simd, op);
            let got_wide: Vec<u32> = wide_out
                .iter()
                .map(|v| if v.is_nan() { v.to_bits() | quiet_nan } else { v.to_bits() })
                .collect();
            let got_narrow: Vec<u16> = narrow_out.iter().map(|&v| bytemuck::cast(v)).collect();
            let name = T::DTYPE.name();
            let bad = got_wide.iter().zip(&want_wide).position(|(a, b)| a != b);
            assert!(bad.is_none(), "{isa}: {name} widening differs from half at {bad:?}");
            let bad = got_narrow.iter().zip(&want_narrow).position(|(a, b)| a != b);
            assert!(bad.is_none(), "{isa}: {name} rounding differs from half at {:?}", bad.map(|i| narrow_in[i]));
        });
    }

    /// f32 values from xorshift bit patterns: every exponent, NaN payloads of both kinds.
    fn random_f32(count: usize) -> Vec<f32> {
        let mut s = 0x2545_f491u32;
        (0..count)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                f32::from_bits(s)
            })
            .collect()
    }

    #[test]
    fn bf16_conversions_match_half_on_every_instruction_set() {
        // f32 patterns around every rounding case: each bf16 value with each of the low-half
        // patterns that decide the rounding (ties, just above/below, all ones), which covers
        // NaNs, infinities, subnormals and overflow to infinity.
        let lows = [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xffff, 0x4000, 0xc000];
        let mut narrow_in: Vec<f32> =
            (0..=u16::MAX as u32).flat_map(|h| lows.map(|l| f32::from_bits(h << 16 | l))).collect();
        narrow_in.extend(random_f32(1 << 16));
        check::<bf16>(&narrow_in, 0x0040_0000);
    }

    #[test]
    fn f16_conversions_match_half_on_every_instruction_set() {
        // Every f16 value, the midpoints between neighbours (ties, to even: among them 65520,
        // which overflows) and the f32 values either side of each midpoint, then random f32 bit
        // patterns: subnormals, overflow, NaN payloads.
        let mut narrow_in = Vec::new();
        for h in 0..=u16::MAX {
            let (a, b) = (f16::from_bits(h).to_f64(), f16::from_bits(h.wrapping_add(1)).to_f64());
            narrow_in.push(a as f32);
            if a.is_finite() && b.is_finite() && (a < 0.0) == (b < 0.0) {
                let mid = ((a + b) / 2.0) as f32;
                narrow_in.extend([mid, mid.next_down(), mid.next_up()]);
            }
        }
        narrow_in.extend([65504.0, 65519.99, 65520.0, 65536.0, f32::MAX, f32::MIN_POSITIVE]);
        narrow_in.extend(random_f32(1 << 18));
        // Whole vectors only (`Convert` leaves a ragged end alone).
        narrow_in.truncate(narrow_in.len() / 16 * 16);
        check::<f16>(&narrow_in, 0);
    }

    /// The kernels as each instruction set runs them (the scalar one is what `f16` falls back to
    /// without F16C), against the `f64` reference on the 16-bit inputs: y and dx within the
    /// type's rounding (`tol`), the statistics and dγ/dβ to the tolerances of the `f32`
    /// kernels' own tests.
    fn right_on_every_isa<T: Half>(tol: f64) {
        use crate::reduce::tests::{SPECS, close, mixed_rows, reference_spec};
        use layernorm_core::reference;
        let rows = 21;
        let lengths = [7usize, 100, 128, 600];
        for (n, (rs, _)) in
            lengths.into_iter().flat_map(|n| SPECS[..2].iter().map(move |s| (n, *s)))
        {
            let name = T::DTYPE.name();
            let x: Vec<T> = mixed_rows(rows, n).iter().map(|&v| T::from_acc(v)).collect();
            let g: Vec<f32> = (0..n).map(|j| 0.5 + j as f32 / n as f32).collect();
            let b: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 1.0).collect();
            let wide = |v: &[T]| v.iter().map(|&v| T::to_f64(v)).collect::<Vec<f64>>();
            let f64s = |v: &[f32]| v.iter().map(|&v| f64::from(v)).collect::<Vec<f64>>();
            let spec = reference_spec(rs, rows, n, T::DTYPE).with_beta(true);
            let want = reference::forward(&spec, &wide(&x), Some(&f64s(&g)), Some(&f64s(&b)))
                .unwrap_or_else(|e| panic!("{e}"));
            let want_mean = want.mean.clone().unwrap_or_else(|| vec![0.0; rows]);
            // The backward from finite rows (mixed_rows' NaN and overflowing rows would make
            // every dγ/dβ NaN): a large mean, a constant row, ordinary rows.
            let xb: Vec<T> = (0..rows * n)
                .map(|i| {
                    let u = ((i * 7919) % 1000) as f32 / 1000.0 - 0.5;
                    T::from_acc(match (i / n) % 3 {
                        0 => 100.0 + u,
                        1 if n > 1 => 3.25,
                        _ => 3.0 * u,
                    })
                })
                .collect();
            let dy: Vec<T> = (0..rows * n).map(|i| T::from_acc(((i % 37) as f32).sin())).collect();
            let fb = reference::forward(&spec, &wide(&xb), Some(&f64s(&g)), Some(&f64s(&b)))
                .unwrap_or_else(|e| panic!("{e}"));
            let (mean, rstd): (Vec<f32>, Vec<f32>) = (
                fb.mean
                    .clone()
                    .unwrap_or_else(|| vec![0.0; rows])
                    .iter()
                    .map(|&v| v as f32)
                    .collect(),
                fb.rstd.iter().map(|&v| v as f32).collect(),
            );
            let want_b = reference::backward(
                &spec,
                &wide(&xb),
                &wide(&dy),
                fb.mean.is_some().then(|| f64s(&mean)).as_deref(),
                &f64s(&rstd),
                Some(&f64s(&g)),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            for_each_isa!(simd, isa => {
                let what = |s: &str| format!("{isa}, {name}, n={n}, {:?}: {s}", rs.kind);
                let mut y = vec![T::from_acc(0.0); rows * n];
                let (mut m, mut r) = (vec![0f32; rows], vec![0f32; rows]);
                let (gamma, beta, spec) = (Some(&g[..]), Some(&b[..]), rs);
                let (y_, mean_, rstd_) = (&mut y[..], &mut m[..], &mut r[..]);
                if n < row::FUSE_MIN_N {
                    let op = Rows16 { n, spec, x: &x, gamma, beta, y: y_, mean: mean_, rstd: rstd_ };
                    Simd::vectorize(simd, op);
                } else {
                    let op = Fwd16 { n, spec, x: &x, gamma, beta, y: y_, mean: mean_, rstd: rstd_ };
                    Simd::vectorize(simd, op);
                }
                let acc = |v: &[T]| v.iter().map(|&v| T::to_acc(v)).collect::<Vec<f32>>();
                close(&what("y"), &acc(&y), &want.y, tol);
                // The mean against the row's spread (1/rstd): a row of ±1e37 has a mean that is
                // small next to its elements.
                for (i, (&m, &w)) in m.iter().zip(&want_mean).enumerate() {
                    let scale = 1.0 / want.rstd[i] + w.abs();
                    let ok = if !rs.kind.centred() { m == 0.0 } else if w.is_nan() { m.is_nan() } else { (f64::from(m) - w).abs() <= 1e-6 * scale };
                    assert!(ok, "{}: got {m}, want {w}", what(&format!("mean[{i}]")));
                }
                close(&what("rstd"), &r, &want.rstd, 1e-5);
                let mut dx = vec![T::from_acc(0.0); rows * n];
                let mut p = vec![0f32; 2 * n];
                let partials = Partials { buf: Some(&mut p), want: (true, true) };
                let (x, dy, mean, rstd, dx_) = (&xb[..], &dy[..], &mean[..], &rstd[..], &mut dx[..]);
                let op = Back16 { kind: rs.kind, n, x, dy, mean, rstd, gamma, dx: dx_, partials };
                Simd::vectorize(simd, op);
                close(&what("dx"), &acc(&dx), &want_b.dx, tol);
                close(&what("dγ"), &p[..n], want_b.dgamma.as_deref().unwrap(), 1e-4);
                close(&what("dβ"), &p[n..], want_b.dbeta.as_deref().unwrap(), 1e-5);
            });
        }
    }

    #[test]
    fn the_16_bit_kernels_are_right_on_every_instruction_set() {
        // Half an ulp of the type's rounding of y/dx, with room for the f32 work before it.
        right_on_every_isa::<bf16>(2f64.powi(-8));
        right_on_every_isa::<f16>(2f64.powi(-10));
    }
}
