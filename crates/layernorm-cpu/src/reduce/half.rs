//! 16-bit rows (`bf16`, `f16`) converted in registers: the kernels load 16-bit vectors, widen
//! them in the register, and round results back before their store — no `f32` scratch rows and
//! no separate conversion sweeps. The widening is exact and the rounding is `half`'s (nearest
//! even, NaN quieted), on the same vectors in the same order as the scratch path, so the bits
//! are the same (tested). The kernels are generic over a [`Half`], which says how a type
//! converts: `bf16` by integer vector ops at any SIMD level ([`Bf16Bits`]) or, where the CPU has
//! AVX-512 BF16, by `vcvtneps2bf16` ([`Bf16Native`]); `f16` by F16C or AVX-512F ([`F16c`]).
//! [`Sixteen::pick`] chooses per call, by what the CPU has; every choice gives the same bits
//! (tested over every 16-bit input and the rounding cases of `f32`).

use layernorm_core::{bf16, f16};
use pulp::{Simd, WithSimd};

use super::backward::Partials;
use super::forward::Group;
use super::steps::*;
use super::steps::{Recover, RecoverVecs};
use super::store::{PREFETCH_AHEAD, prefetch, prefetch_line};
use crate::CpuElement;
use crate::element::Convert;
use crate::row::{self, Kind};
use layernorm_core::Element;

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
        // Value i goes to the high half of lane i, the low halves are zeroed: at AVX-512 a
        // zero-extension and a shift (a zeroing `vpermw` measured no cheaper); on AVX2 one
        // shuffle, the 16 bytes loaded into both 128-bit halves and then `vpshufb`, whose index
        // bytes with the top bit set give zeros.
        // SAFETY: `src` holds `w` elements: 32 bytes for 16 lanes, 16 bytes for 8 (unaligned
        // loads). A vector of 64 / 32 bytes exists only under AVX-512F with BW (`pulp`'s V4) /
        // AVX2, checked at run time by the dispatch that chose `S`; the transmutes are between
        // types of the same size.
        unsafe {
            if w == 16 {
                let v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
                return core::mem::transmute_copy(&_mm512_slli_epi32::<16>(v));
            }
            if w == 8 {
                let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast()));
                let z = -1i8;
                #[rustfmt::skip]
                let idx = _mm256_setr_epi8(
                    z, z, 0, 1, z, z, 2, 3, z, z, 4, 5, z, z, 6, 7,
                    z, z, 8, 9, z, z, 10, 11, z, z, 12, 13, z, z, 14, 15,
                );
                return core::mem::transmute_copy(&_mm256_shuffle_epi8(v, idx));
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
    let high = simd.wrapping_dyn_shr_u32s(simd.transmute_u32s_f32s(v), simd.splat_u32s(16));
    // Only a NaN is unequal to itself: one compare, where testing the bits takes three.
    let number = simd.equal_f32s(v, v);
    simd.select_u32s(number, round_numbers(simd, v), simd.or_u32s(high, simd.splat_u32s(0x40)))
}

/// [`round`] of a vector without NaN lanes: the rounding to nearest even alone.
#[inline(always)]
fn round_numbers<S: Simd>(simd: S, v: S::f32s) -> S::u32s {
    let bits = simd.transmute_u32s_f32s(v);
    let sixteen = simd.splat_u32s(16);
    let high = simd.wrapping_dyn_shr_u32s(bits, sixteen);
    let odd = simd.and_u32s(high, simd.splat_u32s(1));
    let biased = simd.add_u32s(simd.add_u32s(bits, simd.splat_u32s(0x7fff)), odd);
    simd.wrapping_dyn_shr_u32s(biased, sixteen)
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

/// Rounds two `f32` vectors to `bf16` ([`round`]) and stores their `2·W` values at the start of
/// `dst`: the values of [`store_bf16`] of each, narrowed together (on x86 one saturating pack and
/// one permute for both, where each vector took a narrowing of its own, and one store).
#[inline(always)]
fn store2_bf16<S: Simd>(simd: S, dst: &mut [bf16], v0: S::f32s, v1: S::f32s) {
    let w = size_of::<S::f32s>() / 4;
    let dst = &mut dst[..2 * w];
    #[cfg(target_arch = "x86_64")]
    if w == 8 || w == 16 {
        use core::arch::x86_64::*;
        // NaN lanes are rare: one unordered compare of the pair finds them, and only a pair
        // with one pays `round`'s NaN select, three operations a vector.
        // SAFETY: a vector of 64 / 32 bytes exists only under AVX-512F (`pulp`'s V4) / AVX; the
        // transmutes are between types of the same size.
        let nan = unsafe {
            if w == 16 {
                let (a, b): (__m512, __m512) =
                    (core::mem::transmute_copy(&v0), core::mem::transmute_copy(&v1));
                _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, b) != 0
            } else {
                let (a, b): (__m256, __m256) =
                    (core::mem::transmute_copy(&v0), core::mem::transmute_copy(&v1));
                _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(a, b)) != 0
            }
        };
        let (r0, r1) = if nan {
            core::hint::cold_path();
            (round(simd, v0), round(simd, v1))
        } else {
            (round_numbers(simd, v0), round_numbers(simd, v1))
        };
        let p = dst.as_mut_ptr();
        // SAFETY: `dst` holds 2·w elements; a vector of 64 / 32 bytes exists only under
        // AVX-512F with BW (`pulp`'s V4) / AVX2; the transmutes are between types of the same
        // size. Every lane of r0 and r1 is below 2^16, so the saturating packs (per 128-bit
        // lane: four of r0's values, then four of r1's) change none; the permutes put each
        // vector's 64-bit groups back in order, r0's before r1's.
        unsafe {
            if w == 16 {
                let (r0, r1): (__m512i, __m512i) =
                    (core::mem::transmute_copy(&r0), core::mem::transmute_copy(&r1));
                let packed = _mm512_packus_epi32(r0, r1);
                let order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
                return _mm512_storeu_si512(p.cast(), _mm512_permutexvar_epi64(order, packed));
            }
            let (r0, r1): (__m256i, __m256i) =
                (core::mem::transmute_copy(&r0), core::mem::transmute_copy(&r1));
            let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(r0, r1));
            return _mm256_storeu_si256(p.cast(), packed);
        }
    }
    let (a, b) = dst.split_at_mut(w);
    store_bf16(simd, a, v0);
    store_bf16(simd, b, v1);
}

/// `vcvtneps2bf16` of 16 lanes, stored at `p`, where no lane is subnormal; `false` (nothing
/// stored) otherwise. For every other input the instruction rounds as `half`'s `bf16::from_f32`
/// does — nearest even, overflow to infinity, a NaN's high half with its quiet bit set — but it
/// flushes subnormal inputs to zero, where `half` rounds them; those vectors take [`round`].
///
/// # Safety
/// The CPU has AVX-512F, DQ and BF16; `p` is valid for 32 bytes of writes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_bf16_native(p: *mut bf16, v: core::arch::x86_64::__m512) -> bool {
    use core::arch::x86_64::*;
    // SAFETY: the features and the destination, by the caller's contract.
    unsafe {
        if _mm512_fpclass_ps_mask::<0x20>(v) != 0 {
            // Out of the loops' straight line: a subnormal result is rare.
            core::hint::cold_path();
            return false;
        }
        let r: __m256i = core::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(p.cast(), r);
    }
    true
}

/// `vcvtne2ps2bf16` of two vectors of 16 lanes, stored at `p` (`v0`'s values, then `v1`'s),
/// where no lane is subnormal; `false` (nothing stored) otherwise, as [`store_bf16_native`].
///
/// # Safety
/// The CPU has AVX-512F, DQ and BF16; `p` is valid for 64 bytes of writes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store2_bf16_native(
    p: *mut bf16,
    v0: core::arch::x86_64::__m512,
    v1: core::arch::x86_64::__m512,
) -> bool {
    use core::arch::x86_64::*;
    // SAFETY: the features and the destination, by the caller's contract.
    unsafe {
        if _mm512_fpclass_ps_mask::<0x20>(v0) | _mm512_fpclass_ps_mask::<0x20>(v1) != 0 {
            core::hint::cold_path();
            return false;
        }
        // The second operand's values go to the low half.
        let r: __m512i = core::mem::transmute(_mm512_cvtne2ps_pbh(v1, v0));
        _mm512_storeu_si512(p.cast(), r);
    }
    true
}

/// How the kernels convert a 16-bit storage type ([`Half::Elem`]) in registers: its loads
/// widen exactly, its stores round to nearest even exactly as `half` does, so the kernels give
/// the bits of the scratch path (rows widened by `half`, the `f32` kernels, rounded back by
/// `half`) whichever way a type converts.
pub(crate) trait Half {
    /// The storage type.
    type Elem: CpuElement<Acc = f32>;
    /// `W` values from `src` (at least `W` long), widened to an `f32` vector exactly (for NaNs,
    /// see the implementations).
    fn load<S: Simd>(simd: S, src: &[Self::Elem]) -> S::f32s;
    /// Rounds `v` (nearest even) and stores its `W` values at the start of `dst`.
    fn store<S: Simd>(simd: S, dst: &mut [Self::Elem], v: S::f32s);
    /// Rounds `v0` and `v1` and stores their `2·W` values at the start of `dst`: the values of
    /// [`Half::store`] of each, with fewer instructions where the type has a way.
    #[inline(always)]
    fn store2<S: Simd>(simd: S, dst: &mut [Self::Elem], v0: S::f32s, v1: S::f32s) {
        let w = size_of::<S::f32s>() / 4;
        let (a, b) = dst[..2 * w].split_at_mut(w);
        Self::store(simd, a, v0);
        Self::store(simd, b, v1);
    }
    /// Runs `op` at the best SIMD level this CPU has for these conversions (the one
    /// [`Sixteen::pick`] chose them for).
    fn dispatch<Op: WithSimd>(op: Op) -> Op::Output;
    /// Whether the kernels may run under any `Simd` (else only under [`Half::dispatch`]).
    #[cfg(feature = "unit-tests")]
    const ANY_SIMD: bool = true;
    /// Runs `op` at AVX2 as [`Half::dispatch`] would there (the tests' AVX2 runs: the instance
    /// the product runs, and no other).
    #[cfg(all(feature = "unit-tests", target_arch = "x86_64"))]
    fn at_avx2<Op: WithSimd>(simd: pulp::x86::V3, op: Op) -> Op::Output {
        Simd::vectorize(simd, op)
    }
    /// Whether this CPU runs these conversions.
    fn available() -> bool {
        true
    }
}

/// A piece of work over rows of the 16-bit type `E`, to be run with one of its [`Half`]s.
pub(crate) trait Job<E> {
    type Output;
    fn run<T: Half<Elem = E>>(self) -> Self::Output;
}

/// A 16-bit storage type with register-converting kernels: [`Sixteen::pick`] runs a job with
/// the conversions this CPU does fastest.
pub(crate) trait Sixteen: CpuElement<Acc = f32> + Sized {
    fn pick<J: Job<Self>>(job: J) -> J::Output;
}

impl Sixteen for bf16 {
    fn pick<J: Job<Self>>(job: J) -> J::Output {
        if Bf16Native::available() {
            return job.run::<Bf16Native>();
        }
        job.run::<Bf16Bits>()
    }
}

impl Sixteen for f16 {
    fn pick<J: Job<Self>>(job: J) -> J::Output {
        job.run::<F16c>()
    }
}

/// `bf16` by integer vector operations, at any SIMD level: widening is a shift (one shuffle on
/// x86), rounding is integer arithmetic ([`round`]).
pub(crate) struct Bf16Bits;

impl Half for Bf16Bits {
    type Elem = bf16;
    #[inline(always)]
    fn load<S: Simd>(simd: S, src: &[bf16]) -> S::f32s {
        load_bf16(simd, src)
    }
    #[inline(always)]
    fn store<S: Simd>(simd: S, dst: &mut [bf16], v: S::f32s) {
        store_bf16(simd, dst, v)
    }
    #[inline(always)]
    fn store2<S: Simd>(simd: S, dst: &mut [bf16], v0: S::f32s, v1: S::f32s) {
        store2_bf16(simd, dst, v0, v1)
    }
    fn dispatch<Op: WithSimd>(op: Op) -> Op::Output {
        crate::isa::dispatch(op)
    }
}

/// `bf16` on a CPU with AVX-512 BF16: rounded by `vcvtneps2bf16` (one instruction where
/// [`round`] and the narrowing store take ten), a vector with a subnormal lane by [`round`]
/// (see [`store_bf16_native`]); widened as [`Bf16Bits`] does. Its kernels run only under its
/// own [`Half::dispatch`], which [`Sixteen::pick`] chooses only where [`Bf16Native::available`].
pub(crate) struct Bf16Native;

impl Half for Bf16Native {
    type Elem = bf16;
    #[cfg(feature = "unit-tests")]
    const ANY_SIMD: bool = false;
    /// AVX-512 (`pulp`'s V4) with BF16, and the dispatch not capped at AVX2 (`max-avx2`).
    fn available() -> bool {
        #[cfg(all(target_arch = "x86_64", not(feature = "max-avx2")))]
        {
            pulp::x86::V4::try_new().is_some() && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(all(target_arch = "x86_64", not(feature = "max-avx2"))))]
        false
    }
    #[inline(always)]
    fn load<S: Simd>(simd: S, src: &[bf16]) -> S::f32s {
        load_bf16(simd, src)
    }
    #[inline(always)]
    fn store<S: Simd>(simd: S, dst: &mut [bf16], v: S::f32s) {
        #[cfg(target_arch = "x86_64")]
        if size_of::<S::f32s>() == 64 {
            let dst = &mut dst[..16];
            debug_assert!(Self::available());
            // SAFETY: 16 lanes are AVX-512F's (which has DQ in `pulp`'s V4), and these kernels
            // run only under `Bf16Native::dispatch`, which found BF16 too (see the type's
            // docs; the tests run them only where `available`); `dst` holds 16 values; the
            // vector types have the same size.
            unsafe {
                let v: core::arch::x86_64::__m512 = core::mem::transmute_copy(&v);
                if store_bf16_native(dst.as_mut_ptr(), v) {
                    return;
                }
            }
        }
        store_bf16(simd, dst, v)
    }
    /// `vcvtne2ps2bf16` for both vectors (two instructions and a store where the integer
    /// rounding took ten and [`Bf16Native::store`] two conversions and two stores), where no
    /// lane is subnormal; [`store2_bf16`] otherwise.
    #[inline(always)]
    fn store2<S: Simd>(simd: S, dst: &mut [bf16], v0: S::f32s, v1: S::f32s) {
        #[cfg(target_arch = "x86_64")]
        if size_of::<S::f32s>() == 64 {
            let dst = &mut dst[..32];
            debug_assert!(Self::available());
            // SAFETY: as in `store`; `dst` holds 32 values.
            unsafe {
                let v0: core::arch::x86_64::__m512 = core::mem::transmute_copy(&v0);
                let v1: core::arch::x86_64::__m512 = core::mem::transmute_copy(&v1);
                if store2_bf16_native(dst.as_mut_ptr(), v0, v1) {
                    return;
                }
            }
        }
        store2_bf16(simd, dst, v0, v1)
    }
    fn dispatch<Op: WithSimd>(op: Op) -> Op::Output {
        #[cfg(target_arch = "x86_64")]
        if Self::available()
            && let Some(simd) = pulp::x86::V4::try_new()
        {
            #[target_feature(
                enable = "avx,avx2,fma,bmi1,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512cd,avx512dq,avx512vl,avx512bf16"
            )]
            fn with_bf16<Op: WithSimd>(simd: pulp::x86::V4, op: Op) -> Op::Output {
                op.with_simd(simd)
            }
            // SAFETY: `V4::try_new` detected AVX-512F/BW/CD/DQ/VL with AVX2, FMA, BMI1/2,
            // LZCNT and POPCNT, and `available` detected BF16.
            return unsafe { with_bf16(simd, op) };
        }
        // Not reached: `Sixteen::pick` chooses these conversions only where they are
        // available. The portable level stands in (its stores round by integer arithmetic, the
        // same bits) rather than every level of `isa::dispatch`, which would compile each
        // kernel twice more for nothing.
        Simd::vectorize(pulp::Scalar::new(), op)
    }
}

/// `f16` by F16C's conversions (AVX-512F's with 16 lanes).
pub(crate) struct F16c;

impl Half for F16c {
    type Elem = f16;
    /// F16C's `vcvtph2ps` (AVX-512F's with 16 lanes), which quiets signaling NaNs as `half`
    /// does.
    #[inline(always)]
    fn load<S: Simd>(simd: S, src: &[f16]) -> S::f32s {
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
    fn store<S: Simd>(simd: S, dst: &mut [f16], v: S::f32s) {
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
    #[cfg(all(feature = "unit-tests", target_arch = "x86_64"))]
    fn at_avx2<Op: WithSimd>(simd: pulp::x86::V3, op: Op) -> Op::Output {
        assert!(std::arch::is_x86_feature_detected!("f16c"), "AVX2 without F16C");
        // SAFETY: `simd` exists, so V3's features were detected, and F16C just above.
        unsafe { with_f16c(simd, op) }
    }
    /// AVX-512F; AVX2 where F16C is there too (`pulp`'s AVX2 level does not include it, so the
    /// kernels are compiled with it added: [`with_f16c`]); the portable paths otherwise.
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

/// `op` at AVX2 with F16C added ([`F16c`]'s kernels at that level: `pulp`'s AVX2 level does not
/// include it).
///
/// # Safety
/// The CPU has what `pulp`'s V3 detected, and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma,bmi1,bmi2,lzcnt,popcnt,f16c")]
unsafe fn with_f16c<Op: WithSimd>(simd: pulp::x86::V3, op: Op) -> Op::Output {
    op.with_simd(simd)
}

/// Vector `j` of `row` (its values `j·W..(j + 1)·W`), widened by [`Half::load`] without a bounds
/// check:
/// the hot loops check their rows' lengths once instead, and the per-vector checks had been a
/// quarter of the forward's instructions.
///
/// # Safety
/// `row` holds at least `(j + 1)·W` values.
#[inline(always)]
unsafe fn load_vec<S: Simd, T: Half>(simd: S, row: &[T::Elem], j: usize) -> S::f32s {
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
unsafe fn store_vec<S: Simd, T: Half>(simd: S, row: &mut [T::Elem], j: usize, v: S::f32s) {
    let w = size_of::<S::f32s>() / 4;
    debug_assert!((j + 1) * w <= row.len());
    // SAFETY: in bounds, by the caller's contract.
    T::store(simd, unsafe { row.get_unchecked_mut(j * w..(j + 1) * w) }, v)
}

/// [`Half::store2`] into vectors `j` and `j + 1` of `row` (its values `j·W..(j + 2)·W`) without a
/// bounds check.
///
/// # Safety
/// `row` holds at least `(j + 2)·W` values.
#[inline(always)]
unsafe fn store2_vec<S: Simd, T: Half>(
    simd: S,
    row: &mut [T::Elem],
    j: usize,
    (v0, v1): (S::f32s, S::f32s),
) {
    let w = size_of::<S::f32s>() / 4;
    debug_assert!((j + 2) * w <= row.len());
    // SAFETY: in bounds, by the caller's contract.
    T::store2(simd, unsafe { row.get_unchecked_mut(j * w..(j + 2) * w) }, v0, v1)
}

/// Vectors of a 16-bit row per 64-byte line (at least two: the sweeps go by pairs of vectors,
/// for [`Half::store2`], and a block is a whole number of lines).
#[inline(always)]
fn per_line_16<S: Simd>() -> usize {
    (32 / (size_of::<S::f32s>() / 4)).max(2)
}

/// The forward's shift of a 16-bit row: `shift_of` the widened row, without widening it.
#[inline(always)]
fn shift<S: Simd, T: Half>(simd: S, kind: Kind, x: &[T::Elem]) -> f32 {
    let w = size_of::<S::f32s>() / 4;
    let k = x.len().min(row::SHIFT_SAMPLE);
    if k == 0 || !kind.centred() {
        return 0.0;
    }
    let mut acc = simd.splat_f32s(0.0);
    let heads = k / w;
    for j in 0..heads {
        // SAFETY: (j + 1)·W ≤ heads·W ≤ k ≤ x.len().
        acc = simd.add_f32s(acc, unsafe { load_vec::<S, T>(simd, x, j) });
    }
    let mut sum = simd.reduce_sum_f32s(acc);
    for v in &x[heads * w..k] {
        sum += T::Elem::to_acc(*v);
    }
    let m = sum / k as f32;
    if m.is_finite() {
        m
    } else {
        (x[..k].iter().map(|&v| T::Elem::to_f64(v)).sum::<f64>() / k as f64) as f32
    }
}

/// `centered_tail` of a 16-bit row's last `x.len() − base` values (fewer than a vector), widened.
#[inline(always)]
fn centered_tail_16<E: CpuElement<Acc = f32>>(
    x: &[E],
    base: usize,
    k: (f32, f32, f32),
    total: &mut [f64; 2],
) {
    let mut t = [0f32; 16];
    let t = &mut t[..x.len() - base];
    E::widen(&x[base..], t);
    centered_tail(t, k, total);
}

/// `row::max_abs` of a 16-bit row (the largest |x| widened: exact).
#[inline(always)]
fn max_abs_16<E: CpuElement<Acc = f32>>(x: &[E]) -> f64 {
    f64::from(x.iter().fold(0f32, |a, &v| a.max(E::to_acc(v).abs())))
}

/// `row::finish` of a 16-bit row whose sums around `m_hi` are `sums`: its rare paths sweep the
/// row where it lies ([`sums`] at a scale and a residual mean), the bits of the widened row's.
#[inline(always)]
fn finish_16<S: Simd, T: Half>(
    simd: S,
    spec: row::Spec,
    x: &[T::Elem],
    m_hi: f32,
    sums: [f64; 2],
) -> row::RowStats<f32> {
    // A closure is compiled without the target features of the function it is written in:
    // unless it is inlined into the kernel, the sweep's intrinsics become calls, and a rare row
    // costs as much as dozens of ordinary ones (with an outlier among every row's first 32
    // values, the bf16 forward ran 13 times slower).
    row::finish_with(
        spec,
        x.len(),
        m_hi,
        sums,
        || max_abs_16(x),
        #[inline(always)]
        |s: f32, ml: f32| self::sums::<S, T>(simd, x, (m_hi, s, ml)),
    )
}

/// `normalize_tail` of a 16-bit row's last `x.len() − base` values (fewer than a vector): widened,
/// normalized, rounded into the same places of `y`.
#[inline(always)]
fn normalize_tail_16<E: CpuElement<Acc = f32>>(
    (x, base): (&[E], usize),
    params: (f32, f32, f32),
    gb: (Option<&[f32]>, Option<&[f32]>),
    y: &mut [E],
) {
    let (mut t, mut out) = ([0f32; 16], [0f32; 16]);
    let (t, out) = (&mut t[..x.len() - base], &mut out[..x.len() - base]);
    E::widen(&x[base..], t);
    normalize_tail(t, params, gb, base, out);
    E::narrow(out, &mut y[base..]);
}

/// `centered_in(x, (m, s, ml))` of a 16-bit row, converted in registers.
#[inline(always)]
fn sums<S: Simd, T: Half>(simd: S, x: &[T::Elem], (m, s, ml): (f32, f32, f32)) -> [f64; 2] {
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
    x: &[T::Elem],
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
            let v = unsafe { load_vec::<S, T>(simd, x, j) };
            centered_step::<S, PLAIN>(simd, v, k, &mut acc);
        }
        fold_into(simd, acc, &mut total);
        i = end;
    }
    total
}

/// How far ahead (in 16-bit elements: 4 KiB) the sweeps ask for the lines of the output they
/// are about to write with ordinary stores (see `store::OUT_AHEAD`).
const OUT_AHEAD_16: usize = 2048;

/// Forward of long 16-bit rows (N ≥ `FUSE_MIN_N`), pipelined like the `f32` one: row r normalized
/// while row r+1 is summed, every vector converted in its register.
struct Fwd16<'a, T: Half> {
    n: usize,
    spec: row::Spec,
    x: &'a [T::Elem],
    gamma: Option<&'a [f32]>,
    beta: Option<&'a [f32]>,
    y: &'a mut [T::Elem],
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
        let mut m_next = shift::<S, T>(simd, spec.kind, xr(0));
        let mut next_sums = sums::<S, T>(simd, xr(0), (m_next, 1.0, 0.0));
        for r in 0..rows {
            let cur = xr(r);
            let st = match row::finish_common(spec, n, m_next, next_sums) {
                Some(st) => st,
                None => finish_16::<S, T>(simd, spec, cur, m_next, next_sums),
            };
            let (mh, ml, rs) = st.params();
            let kc = xhat_splats(simd, (mh, ml, rs));
            let y = &mut self.y[r * n..(r + 1) * n];
            let has_next = r + 1 < rows;
            let nxt = if has_next { xr(r + 1) } else { cur };
            if has_next {
                m_next = shift::<S, T>(simd, spec.kind, nxt);
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
    (nxt, kn): (&[T::Elem], (S::f32s, S::f32s, S::f32s)),
    (cur, kc): (&[T::Elem], (S::f32s, S::f32s, S::f32s)),
    (gh, bh): (&[S::f32s], &[S::f32s]),
    y: &mut [T::Elem],
) -> [f64; 2] {
    let w = size_of::<S::f32s>() / 4;
    let nv = cur.len() / w;
    // The vectors' bounds, checked here once for the sweep's unchecked loads and stores.
    assert!(y.len() >= nv * w && (!NX || nxt.len() >= nv * w));
    let (gh, bh) = (if G { &gh[..nv] } else { gh }, if B { &bh[..nv] } else { bh });
    let ahead = [nxt.as_ptr().wrapping_add(PREFETCH_AHEAD), y.as_ptr().wrapping_add(OUT_AHEAD_16)];
    let mut st = FwdStep::<S, T, G, B, NX> { nxt, kn, cur, kc, gh, bh, ahead };
    // SAFETY: nxt (with `NX`), cur and y hold nv·W values, γ and β (with `G`, `B`) nv vectors.
    unsafe { sweep_16::<S, T, 2, _>(simd, nv, &mut st, y) }
}

/// One vector of a pipelined 16-bit sweep ([`sweep_16`]): vector `j` of the next row summed into
/// `K` accumulators, vector `j` of this row's output returned, to be rounded and stored.
trait Step<S: Simd, const K: usize> {
    /// # Safety
    /// `j` is below the vector count the implementor's rows were checked for.
    unsafe fn step(&mut self, simd: S, j: usize, acc: &mut [S::f32s; K]) -> S::f32s;
    /// Asks for the lines ahead of vector `j` that the sweep will read and write (once a line).
    fn prefetch(&self, j: usize);
}

/// The sweep of `nv` vectors of a pipelined 16-bit kernel: `st`'s steps a block of `BLOCK`
/// elements at a time, the block's accumulators folded into the `f64` totals after it (the
/// order of the `f32` kernels, so the same sums); the outputs rounded and stored two vectors at
/// a time ([`Half::store2`]) over whole 64-byte lines, one at a time at the row's end.
///
/// # Safety
/// `out` holds nv·W values, and `st` may step every vector below nv.
#[inline(always)]
unsafe fn sweep_16<S: Simd, T: Half, const K: usize, St: Step<S, K>>(
    simd: S,
    nv: usize,
    st: &mut St,
    out: &mut [T::Elem],
) -> [f64; K] {
    let (pb, per_line) = (per_block::<S>(), per_line_16::<S>());
    let mut total = [0f64; K];
    let mut i = 0;
    // SAFETY (the steps and the stores): every index is below `end` ≤ nv (the contract).
    while i < nv {
        let end = (i + pb).min(nv);
        let mut acc = [simd.splat_f32s(0.0); K];
        let mut j = i;
        while j + per_line <= end {
            st.prefetch(j);
            for q in (j..j + per_line).step_by(2) {
                let v0 = unsafe { st.step(simd, q, &mut acc) };
                let v1 = unsafe { st.step(simd, q + 1, &mut acc) };
                unsafe { store2_vec::<S, T>(simd, out, q, (v0, v1)) };
            }
            j += per_line;
        }
        while j < end {
            let v = unsafe { st.step(simd, j, &mut acc) };
            unsafe { store_vec::<S, T>(simd, out, j, v) };
            j += 1;
        }
        fold_into(simd, acc, &mut total);
        i = end;
    }
    total
}

/// The forward's [`Step`]: with `NX`, the next row's residual sums (`kn`); this row normalized
/// (`kc`, γ, β). `ahead`: the next row and y, [`PREFETCH_AHEAD`] / [`OUT_AHEAD_16`] on.
struct FwdStep<'a, S: Simd, T: Half, const G: bool, const B: bool, const NX: bool> {
    nxt: &'a [T::Elem],
    kn: (S::f32s, S::f32s, S::f32s),
    cur: &'a [T::Elem],
    kc: (S::f32s, S::f32s, S::f32s),
    gh: &'a [S::f32s],
    bh: &'a [S::f32s],
    ahead: [*const T::Elem; 2],
}

impl<S: Simd, T: Half, const G: bool, const B: bool, const NX: bool> Step<S, 2>
    for FwdStep<'_, S, T, G, B, NX>
{
    /// # Safety
    /// `cur`, and `nxt` with `NX`, hold at least `(j + 1)·W` values; γ and β (with `G`, `B`)
    /// at least `j + 1` vectors.
    #[inline(always)]
    unsafe fn step(&mut self, simd: S, j: usize, acc: &mut [S::f32s; 2]) -> S::f32s {
        // SAFETY: in bounds, by the caller's contract.
        if NX {
            let v = unsafe { load_vec::<S, T>(simd, self.nxt, j) };
            centered_step::<S, true>(simd, v, self.kn, acc);
        }
        let v = unsafe { load_vec::<S, T>(simd, self.cur, j) };
        // γ's and β's vector j alone (in bounds by the caller's contract), so that the loops
        // carry no bounds checks.
        let (g, b) = unsafe {
            let at = |p: &[S::f32s]| core::slice::from_raw_parts(p.as_ptr().add(j), 1);
            (if G { at(self.gh) } else { self.gh }, if B { at(self.bh) } else { self.bh })
        };
        normalize_vec::<S, G, B>(simd, v, self.kc, (g, b), 0)
    }
    #[inline(always)]
    fn prefetch(&self, j: usize) {
        let w = size_of::<S::f32s>() / 4;
        prefetch_line(self.ahead[1].wrapping_add(j * w).cast());
        if NX {
            prefetch_line(self.ahead[0].wrapping_add(j * w).cast());
        }
    }
}

/// Forward of consecutive 16-bit rows in one explicit-SIMD loop: the grouped short-row kernel
/// below `FUSE_MIN_N` ([`Rows16`]), the pipelined one from it ([`Fwd16`]), as for `f32`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_16<E: Sixteen>(
    n: usize,
    spec: row::Spec,
    x: &[E],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    y: &mut [E],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    struct Forward<'a, E> {
        n: usize,
        spec: row::Spec,
        x: &'a [E],
        gamma: Option<&'a [f32]>,
        beta: Option<&'a [f32]>,
        y: &'a mut [E],
        mean: &'a mut [f32],
        rstd: &'a mut [f32],
    }
    impl<E: Sixteen> Job<E> for Forward<'_, E> {
        type Output = ();
        fn run<T: Half<Elem = E>>(self) {
            let Forward { n, spec, x, gamma, beta, y, mean, rstd } = self;
            if n < row::FUSE_MIN_N {
                T::dispatch(Rows16::<T> { n, spec, x, gamma, beta, y, mean, rstd })
            } else {
                T::dispatch(Fwd16::<T> { n, spec, x, gamma, beta, y, mean, rstd })
            }
        }
    }
    E::pick(Forward { n, spec, x, gamma, beta, y, mean, rstd })
}

/// Forward of consecutive short 16-bit rows (N < `FUSE_MIN_N`) in groups, like the `f32`
/// short-row kernel (`forward::Rows`) on widened rows: the group's shifts and residual sums, four
/// rows side by side; the statistics of all its rows at once (`forward::Group`); then the
/// normalize sweep, converting in registers throughout. The operations per row are those of
/// the scratch path, so the bits are the same (tested).
struct Rows16<'a, T: Half> {
    n: usize,
    spec: row::Spec,
    x: &'a [T::Elem],
    gamma: Option<&'a [f32]>,
    beta: Option<&'a [f32]>,
    y: &'a mut [T::Elem],
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
                    let st = finish_16::<S, T>(simd, spec, row(i), g.shift[i], [g.sd[i], g.sdd[i]]);
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
    x: [&[T::Elem]; R],
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
        shifts[r] = shift::<S, T>(simd, kind, x[r]);
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
                let v = unsafe { load_vec::<S, T>(simd, x[r], j) };
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
    (simd, x, k, (gh, bh)): (S, &[T::Elem], (S::f32s, S::f32s, S::f32s), (&[S::f32s], &[S::f32s])),
    y: &mut [T::Elem],
) {
    let w = size_of::<S::f32s>() / 4;
    let nv = x.len() / w;
    assert!(y.len() >= nv * w);
    let (gh, bh) = (if G { &gh[..nv] } else { gh }, if B { &bh[..nv] } else { bh });
    // The long rows' steps without a next row.
    let ahead = [x.as_ptr(), y.as_ptr().wrapping_add(OUT_AHEAD_16)];
    let mut st = FwdStep::<S, T, G, B, false> { nxt: x, kn: k, cur: x, kc: k, gh, bh, ahead };
    // SAFETY: x and y hold nv·W values, γ and β (with `G`, `B`) nv vectors.
    unsafe { sweep_16::<S, T, 2, _>(simd, nv, &mut st, y) };
}

/// Backward of consecutive 16-bit rows (any N; short rows too), pipelined like the `f32`
/// one-row sweep: row r's dx (rounded to 16 bits in the register) and its dγ/dβ terms while row
/// r+1 is summed; each row is widened in registers twice, once per sweep (it is in L1 or L2 the
/// second time): keeping widened `f32` copies instead measured slower, by a store and a load per
/// vector and, for long rows, a working set past L1 (1024×4096: 5.5 → 8.1 GB/s without them).
/// Per row the operations are those of the scratch path (`f32` rows
/// widened by `Convert::widen`, `FusedBackward`, `row::back_apply`, then narrowed), so the
/// bits are the same (tested).
struct Back16<'a, T: Half> {
    kind: Kind,
    n: usize,
    x: &'a [T::Elem],
    dy: &'a [T::Elem],
    /// dh, and from y the recovery of x̂ and the rows' scales.
    extra: Extra<'a, T::Elem>,
    mean: &'a [f32],
    rstd: &'a [f32],
    gamma: Option<&'a [f32]>,
    dx: &'a mut [T::Elem],
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
        let Extra { dh, rec, scale } = self.extra;
        let span = |r: usize| r * n..(r + 1) * n;
        let gh = gamma.map_or(&[][..], |g| &S::as_simd_f32s(&g[..n]).0[..nv]);
        // Widened tails (fewer than a vector).
        let (mut tx, mut td, mut th) = ([0f32; 16], [0f32; 16], [0f32; 16]);
        let shift = |r: usize| row::back_shift_f32(self.mean[r], self.rstd[r]);
        // Whether the sweep takes the kernel with dh, the recovery and the scales (`X`).
        let extra = dh.is_some() || scale.is_some() || rec.recovers();
        let row0 = (&x[span(0)], &dy[span(0)]);
        let mut sums = back_sums::<S, T>(simd, row0, gamma, shift(0), &rec);
        for r in 0..rows {
            let (mu, rs) = (f64::from(self.mean[r]), f64::from(self.rstd[r]));
            let p = row::back_params::<f32>(self.kind, n, mu, rs, sums);
            let (dg, db) = self.partials.of_row(r, n);
            let (want_g, want_b) = (dg.is_some(), db.is_some());
            let dxr = &mut self.dx[span(r)];
            let hr = dh.map(|h| &h[span(r)]);
            let sr = scale.map(|s| s[r]);
            if r + 1 < rows {
                let next = (&x[span(r + 1)], &dy[span(r + 1)]);
                let (m, s) = shift(r + 1);
                let k = (simd.splat_f32s(m), simd.splat_f32s(s));
                let empty: &mut [f32] = &mut [];
                let (dgs, dbs) = (dg.unwrap_or(&mut []), db.unwrap_or(empty));
                let dgh = &mut S::as_mut_simd_f32s(&mut dgs[..]).0;
                let dbh = &mut S::as_mut_simd_f32s(&mut dbs[..]).0;
                let g = gamma.is_some();
                let mut total = specialize!(back_16_vecs::<S, T>(g, want_g, want_b, extra)(
                    simd,
                    (next, k),
                    ((&x[span(r)], &dy[span(r)]), &BackVecs::new(simd, &p)),
                    (gh, &rec),
                    (dxr, hr, sr),
                    (dgh, dbh)
                ));
                // Tails: the next row's sums, this row's dx and dγ/dβ terms, on widened values.
                if base < n {
                    let gt = gamma.map(|g| &g[base..n]);
                    T::Elem::widen(&next.0[base..], &mut tx[..n - base]);
                    recover_tail(&rec, base, &mut tx[..n - base]);
                    T::Elem::widen(&next.1[base..], &mut td[..n - base]);
                    backward_tail((&tx[..n - base], &td[..n - base], gt), (m, s), &mut total);
                    let (dgs, dbs) =
                        ((want_g).then(|| &mut dgs[base..n]), (want_b).then(|| &mut dbs[base..n]));
                    let cur = (&x[span(r)], &dy[span(r)]);
                    T::Elem::widen(&cur.0[base..], &mut tx[..n - base]);
                    recover_tail(&rec, base, &mut tx[..n - base]);
                    T::Elem::widen(&cur.1[base..], &mut td[..n - base]);
                    let mut out = [0f32; 16];
                    let out = &mut out[..n - base];
                    let t = (&tx[..n - base], &td[..n - base], gamma);
                    let epi = hr.map(|h| {
                        T::Elem::widen(&h[base..], &mut th[..n - base]);
                        (sr.unwrap_or(1.0), &th[..n - base])
                    });
                    apply_tail(t, &p, base, out, dgs, dbs, epi);
                    scale_without_dh(out, hr.is_none().then_some(sr).flatten());
                    T::Elem::narrow(out, &mut dxr[base..]);
                }
                sums = total;
            } else {
                // The last row alone, as the scratch path does it.
                let rows = (&x[span(r)], &dy[span(r)], gamma);
                apply_16(simd, rows, (hr, &rec, sr), &p, dxr, (dg, db));
            }
        }
    }
}

/// `apply_in` of a 16-bit row (x, dy) into its dx, with [`Extra`]'s dh, recovery and scale
/// (fma(s, dx, dh), s·dx without dh), widened and rounded a chunk at a time: the step is
/// elementwise and the chunks split the row where `apply_in` of the whole widened row splits it
/// into vectors, so the bits are that call's.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn apply_16<S: Simd, E: CpuElement<Acc = f32>>(
    simd: S,
    (x, dy, gamma): (&[E], &[E], Option<&[f32]>),
    (dh, rec, scale): (Option<&[E]>, &Recover<'_>, Option<f32>),
    p: &row::BackParams<f32>,
    dx: &mut [E],
    (mut dgamma, mut dbeta): (Option<&mut [f32]>, Option<&mut [f32]>),
) {
    const C: usize = 256;
    let n = x.len();
    let (mut tx, mut td, mut th, mut out) = ([0f32; C], [0f32; C], [0f32; C], [0f32; C]);
    for start in (0..n).step_by(C) {
        let e = start..(start + C).min(n);
        let len = e.len();
        let (tx, td, out) = (&mut tx[..len], &mut td[..len], &mut out[..len]);
        E::widen(&x[e.clone()], tx);
        recover_tail(rec, start, tx);
        E::widen(&dy[e.clone()], td);
        let epi = dh.map(|h| {
            E::widen(&h[e.clone()], &mut th[..len]);
            (scale.unwrap_or(1.0), &th[..len])
        });
        let g = gamma.map(|g| &g[e.clone()]);
        let dg = dgamma.as_deref_mut().map(|d| &mut d[e.clone()]);
        let db = dbeta.as_deref_mut().map(|d| &mut d[e.clone()]);
        apply_in(simd, (tx, td, g), p, out, (dg, db), epi);
        scale_without_dh(out, dh.is_none().then_some(scale).flatten());
        E::narrow(out, &mut dx[e]);
    }
}

/// x̂ recovered from y in a widened stretch of a row that starts at column `base`
/// (`Recover::at`: the operations of `stage::recover`); nothing where the rows are x.
#[inline(always)]
fn recover_tail(rec: &Recover<'_>, base: usize, v: &mut [f32]) {
    if rec.recovers() {
        for (j, e) in v.iter_mut().enumerate() {
            *e = rec.at::<true>(*e, base + j);
        }
    }
}

/// dx = s·dx′ where a backward from y has no dh (`stage::finish`'s product; with dh the
/// kernels' epilogue forms fma(s, dx′, dh)).
#[inline(always)]
fn scale_without_dh(out: &mut [f32], s: Option<f32>) {
    if let Some(s) = s {
        for o in out {
            *o *= s;
        }
    }
}

/// `backward_in` of a 16-bit row pair (x, dy), converted in registers.
#[inline(always)]
fn back_sums<S: Simd, T: Half>(
    simd: S,
    (x, dy): (&[T::Elem], &[T::Elem]),
    gamma: Option<&[f32]>,
    (m, s): (f32, f32),
    rec: &Recover<'_>,
) -> [f64; 3] {
    let n = x.len();
    let w = size_of::<S::f32s>() / 4;
    let nv = n / w;
    let rv = rec.recovers().then(|| rec.vecs::<S, true>(n, nv));
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
            let (xv, dv) = unsafe { (load_vec::<S, T>(simd, x, j), load_vec::<S, T>(simd, dy, j)) };
            let xv = rv.map_or(xv, |rv| rv.at::<S, true>(simd, xv, j));
            backward_step(simd, (xv, dv, gh.map(|g| g[j])), k, &mut acc);
        }
        fold_into(simd, acc, &mut total);
        i = end;
    }
    let base = nv * w;
    let (mut tx, mut td) = ([0f32; 16], [0f32; 16]);
    let (tx, td) = (&mut tx[..n - base], &mut td[..n - base]);
    T::Elem::widen(&x[base..], tx);
    recover_tail(rec, base, tx);
    T::Elem::widen(&dy[base..n], td);
    backward_tail((tx, td, gamma.map(|g| &g[base..n])), (m, s), &mut total);
    total
}

/// The vector body of [`Back16`]: the next row widened and summed, this row's dx (plus its dh,
/// where given) rounded and stored with its dγ/dβ terms added (the operations of
/// `FusedBackward` and its epilogue with a scale of 1).
#[inline(always)]
#[allow(clippy::type_complexity)]
fn back_16_vecs<S: Simd, T: Half, const G: bool, const DG: bool, const DB: bool, const X: bool>(
    simd: S,
    ((nx, nd), k): ((&[T::Elem], &[T::Elem]), (S::f32s, S::f32s)),
    ((cx, cd), pv): ((&[T::Elem], &[T::Elem]), &BackVecs<S::f32s>),
    (gh, rec): (&[S::f32s], &Recover<'_>),
    (dx, dh, scale): (&mut [T::Elem], Option<&[T::Elem]>, Option<f32>),
    (dgh, dbh): (&mut [S::f32s], &mut [S::f32s]),
) -> [f64; 3] {
    let w = size_of::<S::f32s>() / 4;
    let nv = cx.len() / w;
    let gh = if G { &gh[..nv] } else { gh };
    let (dgh, dbh) = (if DG { &mut dgh[..nv] } else { dgh }, if DB { &mut dbh[..nv] } else { dbh });
    // The vectors' bounds, checked here once for the loop's unchecked loads and stores.
    assert!(nx.len() >= nv * w && nd.len() >= nv * w && dx.len() >= nv * w && cd.len() >= nv * w);
    assert!(dh.is_none_or(|h| h.len() >= nv * w));
    // `X`: whether any of dh, the recovery or the scale is there. Which of them is a branch a
    // vector (their cost beside one more stream to read, or two operations an element), so
    // the kernel has two instances per (γ, dγ, dβ), not six; without `X` it has no such
    // branches (they cost the plain backward 4–8%: a branch may take a vector port).
    let (ch, s) = (dh.unwrap_or(&[]), simd.splat_f32s(scale.unwrap_or(1.0)));
    let rv = rec.recovers().then(|| rec.vecs::<S, true>(cx.len(), nv));
    let ahead = [
        nx.as_ptr().wrapping_add(PREFETCH_AHEAD),
        nd.as_ptr().wrapping_add(PREFETCH_AHEAD),
        dx.as_ptr().wrapping_add(OUT_AHEAD_16),
    ];
    let epi = match (dh.is_some(), scale.is_some()) {
        (true, _) => Epi16::Add,
        (false, true) => Epi16::Scale,
        (false, false) => Epi16::None,
    };
    let mut st = BackStep::<S, T, G, DG, DB, X> {
        nx,
        nd,
        k,
        cx,
        cd,
        ch,
        epi,
        s,
        rv,
        pv,
        gh,
        dgh,
        dbh,
        ahead,
    };
    // SAFETY: the four rows and dx hold nv·W values (asserted above), γ and dγ/dβ (with `G`,
    // `DG`, `DB`) nv vectors.
    unsafe { sweep_16::<S, T, 3, _>(simd, nv, &mut st, dx) }
}

/// What [`BackStep`] does to dx before rounding it: fma(s, dx, dh); s·dx (from y without dh); or
/// nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Epi16 {
    Add,
    Scale,
    None,
}

/// The backward's [`Step`]: the next row's sums (`k`); this row's dx (`pv`), and its dγ/dβ
/// terms added. `ahead`: the next row's x and dy, [`PREFETCH_AHEAD`] on, and dx,
/// [`OUT_AHEAD_16`] on.
struct BackStep<'a, S: Simd, T: Half, const G: bool, const DG: bool, const DB: bool, const X: bool>
{
    nx: &'a [T::Elem],
    nd: &'a [T::Elem],
    k: (S::f32s, S::f32s),
    cx: &'a [T::Elem],
    cd: &'a [T::Elem],
    /// This row's dh (with [`Epi16::Add`]).
    ch: &'a [T::Elem],
    /// What the row's dx gets before it is rounded, with `s` the row's scale (1 from x).
    epi: Epi16,
    s: S::f32s,
    /// From y: x̂ recovered from the rows as read.
    rv: Option<RecoverVecs<'a, S::f32s>>,
    pv: &'a BackVecs<S::f32s>,
    gh: &'a [S::f32s],
    dgh: &'a mut [S::f32s],
    dbh: &'a mut [S::f32s],
    ahead: [*const T::Elem; 3],
}

impl<S: Simd, T: Half, const G: bool, const DG: bool, const DB: bool, const X: bool> Step<S, 3>
    for BackStep<'_, S, T, G, DG, DB, X>
{
    /// # Safety
    /// The four rows hold at least `(j + 1)·W` values; γ and dγ/dβ (with `G`, `DG`, `DB`) at
    /// least `j + 1` vectors.
    #[inline(always)]
    unsafe fn step(&mut self, simd: S, j: usize, acc: &mut [S::f32s; 3]) -> S::f32s {
        // SAFETY: in bounds, by the caller's contract.
        let (xv, dv) =
            unsafe { (load_vec::<S, T>(simd, self.nx, j), load_vec::<S, T>(simd, self.nd, j)) };
        let xv = if X { self.rv.map_or(xv, |rv| rv.at::<S, true>(simd, xv, j)) } else { xv };
        let g = if G { Some(unsafe { *self.gh.get_unchecked(j) }) } else { None };
        backward_step(simd, (xv, dv, g), self.k, acc);
        let (cxv, cdv) =
            unsafe { (load_vec::<S, T>(simd, self.cx, j), load_vec::<S, T>(simd, self.cd, j)) };
        let cxv = if X { self.rv.map_or(cxv, |rv| rv.at::<S, true>(simd, cxv, j)) } else { cxv };
        let (mut d, xhat) = apply_step(simd, (cxv, cdv, g), self.pv);
        match if X { self.epi } else { Epi16::None } {
            Epi16::Add => {
                // SAFETY: in bounds, by the caller's contract (`ch` holds nv·W values with
                // `Add`).
                let h = unsafe { load_vec::<S, T>(simd, self.ch, j) };
                d = epilogue_step(simd, d, (self.s, h));
            }
            Epi16::Scale => d = simd.mul_f32s(self.s, d),
            Epi16::None => {}
        }
        if DG {
            let p = unsafe { self.dgh.get_unchecked_mut(j) };
            *p = simd.mul_add_f32s(cdv, xhat, *p);
        }
        if DB {
            let p = unsafe { self.dbh.get_unchecked_mut(j) };
            *p = simd.add_f32s(*p, cdv);
        }
        d
    }
    #[inline(always)]
    fn prefetch(&self, j: usize) {
        let w = size_of::<S::f32s>() / 4;
        for a in self.ahead {
            prefetch_line(a.wrapping_add(j * w).cast());
        }
    }
}

/// What a 16-bit backward adds to the plain one ([`Back16`]): the residual stream's gradient dh,
/// and, for a backward from y, x̂ recovered from y as it is read (`rec`) and each row's saved rstd
/// (`scale`) multiplying dx before dh is added: dx = fma(s, dx′, dh), or s·dx′ without dh — the
/// operations of `stage::recover` and `stage::finish`, so the bits of the staged path.
#[derive(Clone, Copy)]
pub struct Extra<'a, E> {
    pub(crate) dh: Option<&'a [E]>,
    pub(crate) rec: Recover<'a>,
    pub(crate) scale: Option<&'a [f32]>,
}

impl<E> Default for Extra<'_, E> {
    fn default() -> Self {
        Extra { dh: None, rec: Recover::default(), scale: None }
    }
}

/// Backward of consecutive blocks of 16-bit rows (see [`Back16`]), adding into the
/// blocks' dγ/dβ partials (`partials`: as for `Real::back_blocks`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_16<E: Sixteen>(
    kind: Kind,
    n: usize,
    (x, dy, extra): (&[E], &[E], Extra<'_, E>),
    mean: &[f32],
    rstd: &[f32],
    gamma: Option<&[f32]>,
    dx: &mut [E],
    partials: Partials<'_>,
) {
    struct Backward<'a, E> {
        kind: Kind,
        n: usize,
        x: &'a [E],
        dy: &'a [E],
        extra: Extra<'a, E>,
        mean: &'a [f32],
        rstd: &'a [f32],
        gamma: Option<&'a [f32]>,
        dx: &'a mut [E],
        partials: Partials<'a>,
    }
    impl<E: Sixteen> Job<E> for Backward<'_, E> {
        type Output = ();
        fn run<T: Half<Elem = E>>(self) {
            let Backward { kind, n, x, dy, extra, mean, rstd, gamma, dx, partials } = self;
            T::dispatch(Back16::<T> { kind, n, x, dy, extra, mean, rstd, gamma, dx, partials })
        }
    }
    E::pick(Backward { kind, n, x, dy, extra, mean, rstd, gamma, dx, partials })
}

#[cfg(feature = "unit-tests")]
#[doc(hidden)]
pub mod tests {
    use super::*;

    /// Where the tests run a codec's kernels: an instruction set of `pulp`'s, or the codec's own
    /// dispatch.
    #[derive(Clone, Copy)]
    enum Isa {
        Scalar,
        #[cfg(target_arch = "x86_64")]
        V3(pulp::x86::V3),
        #[cfg(target_arch = "x86_64")]
        V4(pulp::x86::V4),
        Dispatch,
    }

    /// Every instruction set this machine has (those of `for_each_isa`) and the codec's own
    /// dispatch, for a codec that runs under any of them; only its dispatch, where this machine
    /// has what it needs, for one that does not (`ANY_SIMD`).
    fn isas<T: Half>() -> Vec<(Isa, &'static str)> {
        if !T::ANY_SIMD {
            return if T::available() { vec![(Isa::Dispatch, "own dispatch")] } else { vec![] };
        }
        let mut v = vec![(Isa::Scalar, "scalar")];
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(simd) = pulp::x86::V3::try_new() {
                v.push((Isa::V3(simd), "avx2"));
            }
            if let Some(simd) = pulp::x86::V4::try_new() {
                v.push((Isa::V4(simd), "avx512"));
            }
        }
        v.push((Isa::Dispatch, "own dispatch"));
        v
    }

    /// Runs `op` where `isa` says.
    fn run<T: Half, Op: WithSimd>(isa: Isa, op: Op) -> Op::Output {
        // A constant condition: for a codec that runs only under its own dispatch, the other
        // arms are not compiled at all.
        if !T::ANY_SIMD {
            return T::dispatch(op);
        }
        match isa {
            Isa::Scalar => Simd::vectorize(pulp::Scalar::new(), op),
            #[cfg(target_arch = "x86_64")]
            Isa::V3(simd) => T::at_avx2(simd, op),
            #[cfg(target_arch = "x86_64")]
            Isa::V4(simd) => Simd::vectorize(simd, op),
            Isa::Dispatch => T::dispatch(op),
        }
    }

    /// Widens all of `wide_in` and rounds all of `narrow_in`, a vector at a time.
    struct Convert<'a, T: Half> {
        wide_in: &'a [T::Elem],
        wide_out: &'a mut [f32],
        narrow_in: &'a [f32],
        narrow_out: &'a mut [T::Elem],
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
    fn check<T: Half>(narrow_in: &[f32], quiet_nan: u32) {
        let wide_in: Vec<T::Elem> = (0..=u16::MAX).map(bytemuck::cast::<u16, T::Elem>).collect();
        let want_wide: Vec<u32> = wide_in.iter().map(|&v| T::Elem::to_acc(v).to_bits()).collect();
        let want_narrow: Vec<u16> =
            narrow_in.iter().map(|&v| bytemuck::cast(T::Elem::from_acc(v))).collect();
        for (simd, isa) in isas::<T>() {
            let mut wide_out = vec![0f32; wide_in.len()];
            let mut narrow_out = vec![T::Elem::from_acc(0.0); narrow_in.len()];
            let op = Convert::<T> {
                wide_in: &wide_in,
                wide_out: &mut wide_out,
                narrow_in,
                narrow_out: &mut narrow_out,
            };
            run::<T, _>(simd, op);
            let got_wide: Vec<u32> = wide_out
                .iter()
                .map(|v| if v.is_nan() { v.to_bits() | quiet_nan } else { v.to_bits() })
                .collect();
            let got_narrow: Vec<u16> = narrow_out.iter().map(|&v| bytemuck::cast(v)).collect();
            let name = T::Elem::DTYPE.name();
            let bad = got_wide.iter().zip(&want_wide).position(|(a, b)| a != b);
            assert!(bad.is_none(), "{isa}: {name} widening differs from half at {bad:?}");
            let bad = got_narrow.iter().zip(&want_narrow).position(|(a, b)| a != b);
            assert!(
                bad.is_none(),
                "{isa}: {name} rounding differs from half at {:?}",
                bad.map(|i| narrow_in[i])
            );
        }
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

    pub fn bf16_conversions_match_half_on_every_instruction_set() {
        // f32 patterns around every rounding case: each bf16 value with each of the low-half
        // patterns that decide the rounding (ties, just above/below, all ones), which covers
        // NaNs, infinities, subnormals and overflow to infinity.
        let lows = [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xffff, 0x4000, 0xc000];
        let mut narrow_in: Vec<f32> =
            (0..=u16::MAX as u32).flat_map(|h| lows.map(|l| f32::from_bits(h << 16 | l))).collect();
        narrow_in.extend(random_f32(1 << 16));
        check::<Bf16Bits>(&narrow_in, 0x0040_0000);
        check::<Bf16Native>(&narrow_in, 0x0040_0000);
    }

    pub fn f16_conversions_match_half_on_every_instruction_set() {
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
        check::<F16c>(&narrow_in, 0);
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
            let name = T::Elem::DTYPE.name();
            let x: Vec<T::Elem> =
                mixed_rows(rows, n).iter().map(|&v| T::Elem::from_acc(v)).collect();
            let g: Vec<f32> = (0..n).map(|j| 0.5 + j as f32 / n as f32).collect();
            let b: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 1.0).collect();
            let wide = |v: &[T::Elem]| v.iter().map(|&v| T::Elem::to_f64(v)).collect::<Vec<f64>>();
            let f64s = |v: &[f32]| v.iter().map(|&v| f64::from(v)).collect::<Vec<f64>>();
            let spec = reference_spec(rs, rows, n, T::Elem::DTYPE).with_beta(true);
            let want = reference::forward(&spec, &wide(&x), Some(&f64s(&g)), Some(&f64s(&b)))
                .unwrap_or_else(|e| panic!("{e}"));
            let want_mean = want.mean.clone().unwrap_or_else(|| vec![0.0; rows]);
            // The backward from finite rows (mixed_rows' NaN and overflowing rows would make
            // every dγ/dβ NaN): a large mean, a constant row, ordinary rows.
            let xb: Vec<T::Elem> = (0..rows * n)
                .map(|i| {
                    let u = ((i * 7919) % 1000) as f32 / 1000.0 - 0.5;
                    T::Elem::from_acc(match (i / n) % 3 {
                        0 => 100.0 + u,
                        1 if n > 1 => 3.25,
                        _ => 3.0 * u,
                    })
                })
                .collect();
            let dy: Vec<T::Elem> =
                (0..rows * n).map(|i| T::Elem::from_acc(((i % 37) as f32).sin())).collect();
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
            for (simd, isa) in isas::<T>() {
                let what = |s: &str| format!("{isa}, {name}, n={n}, {:?}: {s}", rs.kind);
                let mut y = vec![T::Elem::from_acc(0.0); rows * n];
                let (mut m, mut r) = (vec![0f32; rows], vec![0f32; rows]);
                let (gamma, beta, spec) = (Some(&g[..]), Some(&b[..]), rs);
                let (y_, mean_, rstd_) = (&mut y[..], &mut m[..], &mut r[..]);
                if n < row::FUSE_MIN_N {
                    let op = Rows16::<T> {
                        n,
                        spec,
                        x: &x,
                        gamma,
                        beta,
                        y: y_,
                        mean: mean_,
                        rstd: rstd_,
                    };
                    run::<T, _>(simd, op);
                } else {
                    let op =
                        Fwd16::<T> { n, spec, x: &x, gamma, beta, y: y_, mean: mean_, rstd: rstd_ };
                    run::<T, _>(simd, op);
                }
                let acc =
                    |v: &[T::Elem]| v.iter().map(|&v| T::Elem::to_acc(v)).collect::<Vec<f32>>();
                close(&what("y"), &acc(&y), &want.y, tol);
                // The mean against the row's spread (1/rstd): a row of ±1e37 has a mean that is
                // small next to its elements.
                for (i, (&m, &w)) in m.iter().zip(&want_mean).enumerate() {
                    let scale = 1.0 / want.rstd[i] + w.abs();
                    let ok = if !rs.kind.centred() {
                        m == 0.0
                    } else if w.is_nan() {
                        m.is_nan()
                    } else {
                        (f64::from(m) - w).abs() <= 1e-6 * scale
                    };
                    assert!(ok, "{}: got {m}, want {w}", what(&format!("mean[{i}]")));
                }
                close(&what("rstd"), &r, &want.rstd, 1e-5);
                let mut dx = vec![T::Elem::from_acc(0.0); rows * n];
                let mut p = vec![0f32; 2 * n];
                let partials = Partials { buf: Some(&mut p), want: (true, true) };
                let (x, dy, mean, rstd, dx_) =
                    (&xb[..], &dy[..], &mean[..], &rstd[..], &mut dx[..]);
                let back_of = |x: &[T::Elem],
                               extra: Extra<'_, T::Elem>,
                               dx: &mut [T::Elem],
                               partials: Partials<'_>| {
                    let kind = rs.kind;
                    let op = Back16::<T> { kind, n, x, dy, extra, mean, rstd, gamma, dx, partials };
                    run::<T, _>(simd, op);
                };
                let back = |dh, dx: &mut [T::Elem], partials: Partials<'_>| {
                    back_of(x, Extra { dh, ..Extra::default() }, dx, partials)
                };
                back(None, dx_, partials);
                close(&what("dx"), &acc(&dx), &want_b.dx, tol);
                close(&what("dγ"), &p[..n], want_b.dgamma.as_deref().unwrap(), 1e-4);
                close(&what("dβ"), &p[n..], want_b.dbeta.as_deref().unwrap(), 1e-5);
                // With the residual stream's gradient added: dx + dh, rounded once.
                let dh: Vec<T::Elem> =
                    (0..rows * n).map(|i| T::Elem::from_acc(((i % 23) as f32).cos())).collect();
                back(Some(&dh), &mut dx, Partials { buf: None, want: (false, false) });
                let want_h: Vec<f64> =
                    want_b.dx.iter().zip(wide(&dh)).map(|(d, h)| d + h).collect();
                close(&what("dx + dh"), &acc(&dx), &want_h, tol);
                // From y, at this instruction set: rows y = x/k (k = 1, 2, 4 by column: exact)
                // read through the recovery with β = 0 and 1/γ_eff = k give x̂ = x exactly, so
                // the recovery (the next row's sums, dx, the tails, the last row) and the rows'
                // scales must give the bits of the same kernel reading x.
                let k = |j: usize| [1f32, 2.0, 4.0][j % 3];
                let y: Vec<T::Elem> = (x.iter().enumerate())
                    .map(|(i, &v)| T::Elem::from_acc(T::Elem::to_acc(v) / k(i % n)))
                    .collect();
                let (zeros, ks) = (vec![0f32; n], (0..n).map(k).collect::<Vec<f32>>());
                let rec = Recover::new((Some(&zeros), Some(&ks)), (&[], &[]), n);
                let scale: Vec<f32> = (0..rows).map(|r| 0.5 + r as f32 / 8.0).collect();
                for dh in [None, Some(&dh[..])] {
                    let (mut dx_y, mut dx_x) = (dx.clone(), dx.clone());
                    let (mut p_y, mut p_x) = (vec![0f32; 2 * n], vec![0f32; 2 * n]);
                    let scale = Some(&scale[..]);
                    let parts = |p| Partials { buf: Some(p), want: (true, true) };
                    back_of(&y, Extra { dh, rec, scale }, &mut dx_y, parts(&mut p_y));
                    let plain = Extra { dh, scale, ..Extra::default() };
                    back_of(x, plain, &mut dx_x, parts(&mut p_x));
                    let bits =
                        |v: &[T::Elem]| acc(v).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    let what = what(&format!("from y, dh {}", dh.is_some()));
                    assert!(bits(&dx_y) == bits(&dx_x), "{what}: dx differs from x's");
                    let pbits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert!(pbits(&p_y) == pbits(&p_x), "{what}: dγ/dβ differ from x's");
                }
            }
        }
    }

    pub fn the_16_bit_kernels_are_right_on_every_instruction_set() {
        // Half an ulp of the type's rounding of y/dx, with room for the f32 work before it.
        right_on_every_isa::<Bf16Bits>(2f64.powi(-8));
        right_on_every_isa::<Bf16Native>(2f64.powi(-8));
        right_on_every_isa::<F16c>(2f64.powi(-10));
    }

    /// The forward's (y, mean, rstd) and the backward's (dx, dγ/dβ partials) of `T`'s kernels
    /// run where `isa` says, as bits.
    #[cfg(target_arch = "x86_64")]
    fn kernel_bits<T: Half<Elem = bf16>>(
        isa: Isa,
        (n, rows, spec): (usize, usize, row::Spec),
        (x, dy): (&[bf16], &[bf16]),
        (gamma, beta): (&[f32], &[f32]),
    ) -> Vec<Vec<u32>> {
        let mut y = vec![bf16::ZERO; rows * n];
        let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
        let (gamma, beta) = (Some(gamma), Some(beta));
        let (y_, m_, r_) = (&mut y[..], &mut mean[..], &mut rstd[..]);
        if n < row::FUSE_MIN_N {
            let op = Rows16::<T> { n, spec, x, gamma, beta, y: y_, mean: m_, rstd: r_ };
            run::<T, _>(isa, op);
        } else {
            let op = Fwd16::<T> { n, spec, x, gamma, beta, y: y_, mean: m_, rstd: r_ };
            run::<T, _>(isa, op);
        }
        let mut dx = vec![bf16::ZERO; rows * n];
        let mut p = vec![0f32; 2 * n];
        let partials = Partials { buf: Some(&mut p), want: (true, true) };
        let (m, r, dx_) = (&mean[..], &rstd[..], &mut dx[..]);
        let kind = spec.kind;
        let op = Back16::<T> {
            kind,
            n,
            x,
            dy,
            extra: Extra::default(),
            mean: m,
            rstd: r,
            gamma,
            dx: dx_,
            partials,
        };
        run::<T, _>(isa, op);
        let b16 = |v: &[bf16]| v.iter().map(|v| u32::from(v.to_bits())).collect::<Vec<u32>>();
        let b32 = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        vec![b16(&y), b32(&mean), b32(&rstd), b16(&dx), b32(&p)]
    }

    #[cfg(target_arch = "x86_64")]
    pub fn both_bf16_roundings_give_the_kernels_the_same_bits() {
        // `Bf16Native` (where this CPU has AVX-512 BF16) against `Bf16Bits` at AVX-512: every
        // kernel, rows with tails, and outputs that round to subnormals (γ of 1e-39 with β = 0
        // in every fifth column; dy of 1e-36 in every third row), which `Bf16Native` rounds by
        // the integer path.
        let Some(v4) = (if Bf16Native::available() { pulp::x86::V4::try_new() } else { None })
        else {
            eprintln!("no AVX-512 BF16 here: the comparison does not apply");
            return;
        };
        use crate::reduce::tests::{SPECS, mixed_rows};
        let rows = 21;
        for n in [7usize, 100, 128, 300, 600, 1000] {
            let x: Vec<bf16> = mixed_rows(rows, n).iter().map(|&v| bf16::from_f32(v)).collect();
            let dy: Vec<bf16> = (0..rows * n)
                .map(|i| {
                    let s = if (i / n).is_multiple_of(3) { 1e-36 } else { 1.0 };
                    bf16::from_f32(s * ((i % 37) as f32).sin())
                })
                .collect();
            let tiny = |j: usize| j.is_multiple_of(5);
            let g: Vec<f32> =
                (0..n).map(|j| if tiny(j) { 1e-39 } else { 0.5 + j as f32 / n as f32 }).collect();
            let b: Vec<f32> =
                (0..n).map(|j| if tiny(j) { 0.0 } else { j as f32 * 0.01 - 1.0 }).collect();
            for (spec, _) in SPECS {
                let shape = (n, rows, spec);
                let want = kernel_bits::<Bf16Bits>(Isa::V4(v4), shape, (&x, &dy), (&g, &b));
                let got = kernel_bits::<Bf16Native>(Isa::Dispatch, shape, (&x, &dy), (&g, &b));
                let sub = want[0].iter().filter(|&&v| v & 0x7f80 == 0 && v & 0x7f != 0).count();
                assert!(sub > 0, "n={n}: no subnormal y to round");
                for (k, name) in ["y", "mean", "rstd", "dx", "dγ/dβ"].iter().enumerate() {
                    let bad = got[k].iter().zip(&want[k]).position(|(a, b)| a != b);
                    assert!(bad.is_none(), "n={n}, {spec:?}: {name} differs at {bad:?}");
                }
            }
        }
    }

    /// `store2` of consecutive vector pairs of `src` into `pairs`, `store` of each vector into
    /// `singles`.
    struct Pairs<'a, T: Half> {
        src: &'a [f32],
        pairs: &'a mut [T::Elem],
        singles: &'a mut [T::Elem],
    }

    impl<T: Half> WithSimd for Pairs<'_, T> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) {
            let w = size_of::<S::f32s>() / 4;
            let chunks = self.src.chunks_exact(2 * w).zip(self.pairs.chunks_exact_mut(2 * w));
            for (src, dst) in chunks {
                let (a, b) = src.split_at(w);
                T::store2(simd, dst, simd.partial_load_f32s(a), simd.partial_load_f32s(b));
            }
            for (src, dst) in self.src.chunks_exact(w).zip(self.singles.chunks_exact_mut(w)) {
                T::store(simd, dst, simd.partial_load_f32s(src));
            }
        }
    }

    pub fn pair_stores_round_as_single_stores_on_every_instruction_set() {
        // The rounding cases of `bf16` (each value with the low halves that decide it, every
        // subnormal among them) and random patterns, stored two vectors at a time and one at a
        // time: the same bits, in the same places.
        let lows = [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xffff];
        let mut src: Vec<f32> =
            (0..=u16::MAX as u32).flat_map(|h| lows.map(|l| f32::from_bits(h << 16 | l))).collect();
        src.extend(random_f32(1 << 16));
        src.truncate(src.len() / 32 * 32);
        fn check<T: Half>(src: &[f32]) {
            for (simd, isa) in isas::<T>() {
                let zero = T::Elem::from_acc(0.0);
                let (mut pairs, mut singles) = (vec![zero; src.len()], vec![zero; src.len()]);
                run::<T, _>(simd, Pairs::<T> { src, pairs: &mut pairs, singles: &mut singles });
                let bits = |v: &[T::Elem]| v.iter().map(|&v| bytemuck::cast::<_, u16>(v)).collect();
                let (p, q): (Vec<u16>, Vec<u16>) = (bits(&pairs), bits(&singles));
                let bad = p.iter().zip(&q).position(|(a, b)| a != b);
                assert!(bad.is_none(), "{isa}: {} pair store differs at {bad:?}", T::Elem::DTYPE);
            }
        }
        check::<Bf16Bits>(&src);
        check::<Bf16Native>(&src);
        check::<F16c>(&src);
    }
}
