// layernorm.cu: the normalization family's forward and backward CUDA kernels (LayerNorm and
// RMSNorm, with a γ offset, a fused residual add, and a backward from x or from y with dh).
//
// Compiled at run time by NVRTC, once per storage dtype and kind: the host prepends
// `#define LN_DTYPE k` (0 = f16, 1 = bf16, 2 = f32, 3 = f64) and `#define LN_KIND k` (0 =
// LayerNorm, 1 = RMSNorm; without it, as in the emulator, both kinds' entry points are emitted).
// No CUDA header is included: the f16/bf16 conversions are written below with inline PTX and bit
// operations, so NVRTC needs nothing but itself.
//
// Every kernel is one template instantiated per kind (RMS), per source of x̂ (FROM_Y) and per
// strategy; the optional tensors (γ, β, the residual and h, dh) are null pointers when absent.
// Entry points, `<k>` = `ln` (LayerNorm) or `rms` (RMSNorm):
//   <k>_fwd_*          forward: y, rstd (and the mean for LayerNorm); with a residual,
//                      h = x + residual rounded once to T, written to h (which may be the
//                      residual buffer itself: in place), and y = norm(h)   (docs/math.md (14))
//   <k>_bwd_*          backward from x (or h) and the saved statistics, dx (+ dh)  ((8), (12), (15))
//   <k>_bwdy_*         backward from y: x̂ = (y − β)·(1/γ_eff)                       ((16))
//                      (the host has checked that no γ_eff is 0)
// Strategies (the host picks one per shape, see src/plan.rs):
//   *_warp_{s,v}_i<I>  a group of `lanes` (1..32, a power of two) threads per row, the row held in
//                      registers, I elements per thread; `s` scalar loads, `v` 128-bit loads.
//   *_block_{s,v}_smem a block per row, the row cached in dynamic shared memory (as T).
//   *_block_{s,v}_glob a block per row, re-reading the row from global memory (very large N).
//   <k>_bwd{,y}_gb_partial / gb_final
//                      dγ/dβ in two fixed-order stages through accumulator-typed partial buffers
//                      (no atomics: bitwise deterministic).
//
// Statistics never use E[x²] − E[x]²:
//   m0  = (Σ x·2^-p)/N·2^p           first estimate (2^p ≥ N, so the sum cannot overflow)
//   d   = x − m0;  m_lo = Σ d / N    residual mean (corrects m0; mean = m0 + m_lo; exact for a
//                                    constant row, which so centres to zeros)
//   e   = exponent of max|d|, s = 2^-e (exact)
//   var = Σ ((d − m_lo)·s)² / N · 2^2e   squares of O(1) values: no overflow for |x| ~ 1e30
//   rstd = 1/sqrt(var + eps), or s/sqrt(Σ…/N) when var itself is not representable.
// RMSNorm takes the same steps with m0 = m_lo = 0 (d = x): mean(x²) is scaled the same way.

// Hooks for tests/emu/harness.cpp, which runs this file on the CPU (one fiber per CUDA thread);
// under NVRTC they expand to the plain CUDA spelling or to nothing.
#ifndef LN_DYNAMIC_SMEM
#define LN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif
#ifndef LN_REGISTER
#define LN_REGISTER(kind, name, rms, from_y)
#endif

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#ifndef LN_DTYPE
#error "LN_DTYPE must be defined by the host (0 f16, 1 bf16, 2 f32, 3 f64)"
#endif

#if LN_DTYPE == 0
typedef u16 T;
typedef float A;
#define LN_VEC 8
#ifdef LN_HOST_EMULATION
__device__ __forceinline__ A to_acc(T h) { return ln_emu_f16_to_f32(h); }
__device__ __forceinline__ T from_acc(A f) { return ln_emu_f32_to_f16(f); }
#else
__device__ __forceinline__ A to_acc(T h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ T from_acc(A f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif
#elif LN_DTYPE == 1
typedef u16 T;
typedef float A;
#define LN_VEC 8
__device__ __forceinline__ A to_acc(T h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ T from_acc(A f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                       // round to nearest even
    return (u16)(u >> 16);
}
#elif LN_DTYPE == 2
typedef float T;
typedef float A;
#define LN_VEC 4
__device__ __forceinline__ A to_acc(T v) { return v; }
__device__ __forceinline__ T from_acc(A v) { return v; }
#elif LN_DTYPE == 3
typedef double T;
typedef double A;
#define LN_VEC 2
__device__ __forceinline__ A to_acc(T v) { return v; }
__device__ __forceinline__ T from_acc(A v) { return v; }
#else
#error "unknown LN_DTYPE"
#endif

// Exponent clamp for the power-of-two scale: keeps 2^±e, and 2^±2e where squared, finite and
// normal in A.
#if LN_DTYPE == 3
#define LN_EMAX 1000
#define LN_HALF_EMIN 511
#else
#define LN_EMAX 100
#define LN_HALF_EMIN 63
#endif

// V consecutive elements of type E, loaded and stored as one access (128 bits when V == LN_VEC
// and E == T).
template <class E, int V>
struct __align__(sizeof(E) * V) Pack {
    E v[V];
};

template <int V, class E>
__device__ __forceinline__ Pack<E, V> load_pack(const E* p) {
    return *reinterpret_cast<const Pack<E, V>*>(p);
}

template <int V, class E>
__device__ __forceinline__ void store_pack(E* p, const Pack<E, V>& v) {
    *reinterpret_cast<Pack<E, V>*>(p) = v;
}

// 2^e by building the bits (exact; |e| stays within the normal range of A). frexp/ldexp are
// avoided on purpose: frexp's out-parameter costs a stack frame.
__device__ __forceinline__ A pow2(int e) {
#if LN_DTYPE == 3
    return __longlong_as_double((long long)(e + 1023) << 52);
#else
    return __uint_as_float((u32)(e + 127) << 23);
#endif
}

// Exponent e with max|d| = f·2^e, f in [0.5, 1) (frexp's convention, read from the bits; zero,
// subnormals, inf and NaN land on the clamp), clamped so 2^±e stays finite in A.
__device__ __forceinline__ int scale_exponent(A mx) {
#if LN_DTYPE == 3
    const int e = (int)((__double_as_longlong(mx) >> 52) & 0x7ff) - 1022;
#else
    const int e = (int)((__float_as_uint(mx) >> 23) & 0xff) - 126;
#endif
    return max(-LN_EMAX, min(LN_EMAX, e));
}

// 1/sqrt(v) to within an ulp or so: the hardware estimate plus one Newton step (FMA). Correctly
// rounded sqrt.rn / div.rn would be a subroutine call in SASS, and with a whole row live in
// registers that call costs a stack frame and spills (see check.rs: the build refuses both).
__device__ __forceinline__ A rsqrt_acc(A v) {
#if LN_DTYPE == 3
    A r = rsqrt(v);
#else
    A r = rsqrtf(v);
#endif
    // One Newton step doubles the correct bits of the estimate; f64 takes a second one.
    for (int k = 0; k < (LN_DTYPE == 3 ? 2 : 1); ++k) {
        if (isfinite(r) && r != A(0)) {
            const A err = fma(-(v * r), r, A(1));
            r = fma(A(0.5) * r, err, r);
        }
    }
    return r;
}

// 1/g to within an ulp or so, like rsqrt_acc: the hardware estimate (which flushes subnormals,
// hence the scaling of tiny g) plus Newton steps. g is never 0 here (the host checks γ_eff).
__device__ __forceinline__ A rcp_acc(A g) {
    const bool tiny = fabs(g) < pow2(-LN_EMAX);
    const A gs = tiny ? g * pow2(LN_EMAX) : g;
    A r;
#if LN_DTYPE == 3
#ifdef LN_HOST_EMULATION
    r = ln_emu_rcp(gs);
#else
    asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(r) : "d"(gs));
#endif
#else
#ifdef LN_HOST_EMULATION
    r = ln_emu_rcp(gs);
#else
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(gs));
#endif
#endif
    for (int k = 0; k < (LN_DTYPE == 3 ? 2 : 1); ++k) {
        if (isfinite(r) && r != A(0)) r = fma(r, fma(-gs, r, A(1)), r);
    }
    return tiny ? r * pow2(LN_EMAX) : r;
}

// 1/sqrt(var + ε) from the scaled sum of squares `ss_n` = Σ((d−m_lo)·2^-e)²/N, with
// ε = eps·2^(2·eps_q). The host sets eps_q = 0 unless ε is too large to add to var in A
// (src/plan.rs, `eps_args`); then both terms are scaled by 2^-2k, k = max(e, eps_q), and the
// result by 2^-k in two exact halves.
__device__ __forceinline__ A finish_rstd(A ss_n, int e, A eps, int eps_q) {
    if (eps_q == 0) {
        const A up = pow2(e);
        const A var = ss_n * up * up;  // exact unless it leaves the range of A
        if (isinf(var)) return pow2(-e) * rsqrt_acc(ss_n);  // eps is negligible against such a var
        return rsqrt_acc(var + eps);
    }
    const int k = max(e, eps_q);
    const A se = pow2(max(e - k, -LN_HALF_EMIN)), sq = pow2(max(eps_q - k, -LN_HALF_EMIN));
    const A r = rsqrt_acc(ss_n * se * se + eps * sq * sq);
    if (k > 2 * LN_EMAX) return A(0);  // 2^-k is below the smallest subnormal of A
    return r * pow2(-(k >> 1)) * pow2(-(k - (k >> 1)));
}

// ---- reductions: xor butterflies give every lane the same bits (a + b == b + a) ----

__device__ __forceinline__ A warp_sum(A v, int width) {
    for (int o = width >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ A warp_max(A v, int width) {
    for (int o = width >> 1; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum; every thread returns the same bits. `red` holds at least 32 values.
__device__ __forceinline__ A block_sum(A v, A* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v, 32);
    __syncthreads();  // earlier readers of `red` are done
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < warps ? red[lane] : A(0);
    return warp_sum(v, 32);
}

// Block-wide (sum a, sum b) in one round trip; `red` holds at least 64 values.
__device__ __forceinline__ void block_sum2(A& a, A& b, A* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    a = warp_sum(a, 32);
    b = warp_sum(b, 32);
    __syncthreads();
    if (lane == 0) {
        red[warp] = a;
        red[32 + warp] = b;
    }
    __syncthreads();
    a = warp_sum(lane < warps ? red[lane] : A(0), 32);
    b = warp_sum(lane < warps ? red[32 + lane] : A(0), 32);
}

// Block-wide (sum s, max m) in one round trip; `red` holds at least 64 values.
__device__ __forceinline__ void block_sum_max(A& s, A& m, A* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    s = warp_sum(s, 32);
    m = warp_max(m, 32);
    __syncthreads();
    if (lane == 0) {
        red[warp] = s;
        red[32 + warp] = m;
    }
    __syncthreads();
    s = warp_sum(lane < warps ? red[lane] : A(0), 32);
    m = warp_max(lane < warps ? red[32 + lane] : A(0), 32);
}

// sum / n, correctly rounded in all but rare cases: the product with 1/n (rounded by the host)
// corrected once by its residual (fma). The residual mean m_lo of a constant row is then exactly
// its constant offset from m0, so the row centres to exact zeros (var = 0, y = β).
__device__ __forceinline__ A div_n(A sum, A inv_n, int n) {
    const A q = sum * inv_n;
    return fma(fma(-q, (A)n, sum), inv_n, q);
}

// 2^-p with 2^p >= n: the pre-scale of the first (overflow-free) sum.
__device__ __forceinline__ int ceil_log2(int n) { return n <= 1 ? 0 : 32 - __clz(n - 1); }

// ============================ shared per-element steps ============================

// The row being normalized, V elements at offset i: x, or with a residual h = x + residual
// rounded once to T (docs/math.md (14)), then written to h. `res` and `h` may be one buffer (in
// place): each element is read before the same thread writes it.
template <int V>
__device__ __forceinline__ Pack<T, V> load_input(const T* __restrict__ x, const T* res, T* h,
                                                 u64 i) {
    Pack<T, V> p = load_pack<V>(x + i);
    if (res) {
        const Pack<T, V> r = load_pack<V>(res + i);
#pragma unroll
        for (int j = 0; j < V; ++j) p.v[j] = from_acc(to_acc(p.v[j]) + to_acc(r.v[j]));
        store_pack<V>(h + i, p);
    }
    return p;
}

// y of one element from (x − μ) − m_lo (LayerNorm) or x (RMSNorm): (13), with γ_eff = goff + γ
// formed in A, the γ offset already rounded to A by the host.
template <int V>
__device__ __forceinline__ Pack<T, V> output(const A* c, A mlo, A rstd,
                                             const T* __restrict__ gamma,
                                             const T* __restrict__ beta, A goff, int col) {
    Pack<T, V> g, b, o;
    if (gamma) g = load_pack<V>(gamma + col);
    if (beta) b = load_pack<V>(beta + col);
#pragma unroll
    for (int i = 0; i < V; ++i) {
        A r = (c[i] - mlo) * rstd;
        if (gamma) r *= goff + to_acc(g.v[i]);
        if (beta) r += to_acc(b.v[i]);
        o.v[i] = from_acc(r);
    }
    return o;
}

// Per-column constants of the backward at `col`: γ_eff = goff + γ (1 without γ), and from y
// β (0 without it) and 1/γ_eff.
template <int V, bool FROM_Y>
struct Cols {
    A geff[V], b[V], inv[V];
    __device__ __forceinline__ Cols(const T* __restrict__ gamma, const T* __restrict__ beta,
                                    A goff, int col) {
        Pack<T, V> pg, pb;
        if (gamma) pg = load_pack<V>(gamma + col);
        if (FROM_Y && beta) pb = load_pack<V>(beta + col);
#pragma unroll
        for (int i = 0; i < V; ++i) {
            geff[i] = gamma ? goff + to_acc(pg.v[i]) : A(1);
            b[i] = FROM_Y && beta ? to_acc(pb.v[i]) : A(0);
            inv[i] = FROM_Y && gamma ? rcp_acc(geff[i]) : A(1);
        }
    }
};

// x̂ of one element (docs/math.md): from x, ((x − μ) − m_lo)·rstd (LayerNorm) or x·rstd
// (RMSNorm); from y, (y − β)·(1/γ_eff) (16).
template <bool RMS, bool FROM_Y>
__device__ __forceinline__ A xhat(A s, A mu, A mlo, A rs, A b, A inv) {
    if (FROM_Y) return (s - b) * inv;
    if (RMS) return s * rs;
    return ((s - mu) - mlo) * rs;
}

// dx of one element: rstd·(g − c2 − x̂·c1), plus dh when given (15), rounded once.
__device__ __forceinline__ T dx_of(A rs, A g, A c2, A xh, A c1, bool has_dh, T dh) {
    A d = rs * (g - c2 - xh * c1);
    if (has_dh) d += to_acc(dh);
    return from_acc(d);
}

// ======================= forward: a (sub-)warp per row, row in registers =======================

#define LN_FWD_PARAMS                                                                          \
    const T *__restrict__ x, const T *res, T *h, const T *__restrict__ gamma,                 \
        const T *__restrict__ beta, T *__restrict__ y, A *__restrict__ mean_out,              \
        A *__restrict__ rstd_out, u64 rows, int n, int lanes, A eps, int eps_q, A inv_n, A goff
#define LN_FWD_PASS x, res, h, gamma, beta, y, mean_out, rstd_out, rows, n, lanes, eps, eps_q, inv_n, goff

template <int V, int ITEMS, bool RMS>
__device__ __forceinline__ void fwd_warp(LN_FWD_PARAMS) {
    constexpr int PACKS = ITEMS / V;
    const int lane = threadIdx.x & 31;
    const int l = lane & (lanes - 1);
    const int shift = __ffs(lanes) - 1;  // lanes is a power of two: no integer division
    const int groups = 32 >> shift;
    const u64 warp = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const u64 stride = (u64)gridDim.x * (blockDim.x >> 5) * groups;
    const int p = ceil_log2(n);
    const A pre = pow2(-p), pre_inv = pow2(p);
    for (u64 base = warp * groups; base < rows; base += stride) {
        const u64 row = base + (lane >> shift);
        const bool active = row < rows;
        const u64 off = (active ? row : 0) * (u64)n;
        A v[ITEMS];
        A s = 0, mx = 0;
#pragma unroll
        for (int k = 0; k < PACKS; ++k) {
            const int col = (k * lanes + l) * V;
            if (active && col < n) {
                const Pack<T, V> pk = load_input<V>(x, res, h, off + col);
#pragma unroll
                for (int i = 0; i < V; ++i) v[k * V + i] = to_acc(pk.v[i]);
            } else {
#pragma unroll
                for (int i = 0; i < V; ++i) v[k * V + i] = A(0);
            }
#pragma unroll
            for (int i = 0; i < V; ++i) {
                if (RMS) mx = fmax(mx, fabs(v[k * V + i]));
                else s += v[k * V + i] * pre;
            }
        }
        A m0 = 0, mlo = 0;
        if (!RMS) {
            m0 = warp_sum(s, lanes) * inv_n * pre_inv;
            A sd = 0;
#pragma unroll
            for (int k = 0; k < PACKS; ++k) {
                const int col = (k * lanes + l) * V;
                if (active && col < n) {
#pragma unroll
                    for (int i = 0; i < V; ++i) {
                        const A d = v[k * V + i] - m0;
                        v[k * V + i] = d;
                        sd += d;
                        mx = fmax(mx, fabs(d));
                    }
                }
            }
            mlo = div_n(warp_sum(sd, lanes), inv_n, n);
        }
        const int e = scale_exponent(warp_max(mx, lanes));
        const A sc = pow2(-e);
        A ss = 0;
#pragma unroll
        for (int k = 0; k < PACKS; ++k) {
            const int col = (k * lanes + l) * V;
            if (active && col < n) {
#pragma unroll
                for (int i = 0; i < V; ++i) {
                    const A q = (v[k * V + i] - mlo) * sc;
                    ss += q * q;
                }
            }
        }
        const A rstd = finish_rstd(warp_sum(ss, lanes) * inv_n, e, eps, eps_q);
        if (active && l == 0) {
            if (!RMS) mean_out[row] = m0 + mlo;
            rstd_out[row] = rstd;
        }
#pragma unroll
        for (int k = 0; k < PACKS; ++k) {
            const int col = (k * lanes + l) * V;
            if (active && col < n)
                store_pack<V>(y + off + col, output<V>(v + k * V, mlo, rstd, gamma, beta, goff, col));
        }
    }
}

// ================= forward: a block per row, row in shared memory or re-read ===================

template <int V, bool SMEM, bool RMS>
__device__ __forceinline__ void fwd_block(LN_FWD_PARAMS) {
    LN_DYNAMIC_SMEM(ln_smem);
    __shared__ A red[64];
    T* cache = reinterpret_cast<T*>(ln_smem);
    const int p = ceil_log2(n);
    const A pre = pow2(-p), pre_inv = pow2(p);
    const int step = blockDim.x * V;
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const u64 off = row * (u64)n;
        // Each thread visits the same columns in every pass, so it only ever reads back what it
        // cached (or wrote to h) itself: no barrier is needed between those writes and the reads.
        const T* src = SMEM ? cache : (res ? h + off : x + off);
        A s = 0, mx = 0;
        for (int c = threadIdx.x * V; c < n; c += step) {
            const Pack<T, V> pk = load_input<V>(x, res, h, off + c);
            if (SMEM) store_pack<V>(cache + c, pk);
#pragma unroll
            for (int i = 0; i < V; ++i) {
                if (RMS) mx = fmax(mx, fabs(to_acc(pk.v[i])));
                else s += to_acc(pk.v[i]) * pre;
            }
        }
        A m0 = 0, mlo = 0;
        if (RMS) {
            block_sum_max(s, mx, red);
        } else {
            m0 = block_sum(s, red) * inv_n * pre_inv;
            A sd = 0;
            for (int c = threadIdx.x * V; c < n; c += step) {
                const Pack<T, V> pk = load_pack<V>(src + c);
#pragma unroll
                for (int i = 0; i < V; ++i) {
                    const A d = to_acc(pk.v[i]) - m0;
                    sd += d;
                    mx = fmax(mx, fabs(d));
                }
            }
            block_sum_max(sd, mx, red);
            mlo = div_n(sd, inv_n, n);
        }
        const int e = scale_exponent(mx);
        const A sc = pow2(-e);
        A ss = 0;
        for (int c = threadIdx.x * V; c < n; c += step) {
            const Pack<T, V> pk = load_pack<V>(src + c);
#pragma unroll
            for (int i = 0; i < V; ++i) {
                const A q = ((to_acc(pk.v[i]) - m0) - mlo) * sc;
                ss += q * q;
            }
        }
        const A rstd = finish_rstd(block_sum(ss, red) * inv_n, e, eps, eps_q);
        if (threadIdx.x == 0) {
            if (!RMS) mean_out[row] = m0 + mlo;
            rstd_out[row] = rstd;
        }
        for (int c = threadIdx.x * V; c < n; c += step) {
            const Pack<T, V> pk = load_pack<V>(src + c);
            A d[V];
#pragma unroll
            for (int i = 0; i < V; ++i) d[i] = to_acc(pk.v[i]) - m0;
            store_pack<V>(y + off + c, output<V>(d, mlo, rstd, gamma, beta, goff, c));
        }
    }
}

// ====================== backward dx: a (sub-)warp per row, row in registers =====================

#define LN_BWD_PARAMS                                                                            \
    const T *__restrict__ src, const T *__restrict__ dy, const T *__restrict__ dh,              \
        const A *__restrict__ mean, const A *__restrict__ rstd, const T *__restrict__ gamma,    \
        const T *__restrict__ beta, T *__restrict__ dx, A *__restrict__ mlo_out, u64 rows,      \
        int n, int lanes, A inv_n, A goff
#define LN_BWD_PASS src, dy, dh, mean, rstd, gamma, beta, dx, mlo_out, rows, n, lanes, inv_n, goff

// `src` is x (or h) with the saved mean (LayerNorm) and rstd, or y (FROM_Y) with γ and β.
// Only a LayerNorm backward from x centres the row: it recomputes the residual mean m_lo (the
// saved mean is rounded to A) and stores it in mlo_out for the dγ stage, when given.
template <int V, int ITEMS, bool RMS, bool FROM_Y>
__device__ __forceinline__ void bwd_warp(LN_BWD_PARAMS) {
    constexpr bool CENTRE = !RMS && !FROM_Y;
    constexpr int PACKS = ITEMS / V;
    const int lane = threadIdx.x & 31;
    const int l = lane & (lanes - 1);
    const int shift = __ffs(lanes) - 1;  // lanes is a power of two: no integer division
    const int groups = 32 >> shift;
    const u64 warp = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const u64 stride = (u64)gridDim.x * (blockDim.x >> 5) * groups;
    for (u64 base = warp * groups; base < rows; base += stride) {
        const u64 row = base + (lane >> shift);
        const bool active = row < rows;
        const u64 off = (active ? row : 0) * (u64)n;
        const A mu = CENTRE && active ? mean[row] : A(0);
        const A rs = active ? rstd[row] : A(0);
        A xv[ITEMS], gv[ITEMS];
        A sd = 0;
#pragma unroll
        for (int k = 0; k < PACKS; ++k) {
            const int col = (k * lanes + l) * V;
            if (active && col < n) {
                const Pack<T, V> ps = load_pack<V>(src + off + col);
                const Pack<T, V> pd = load_pack<V>(dy + off + col);
                const Cols<V, FROM_Y> cc(gamma, beta, goff, col);
#pragma unroll
                for (int i = 0; i < V; ++i) {
                    // Centred x for LayerNorm from x (x̂ once m_lo is known), else x̂ itself.
                    const A c = CENTRE ? to_acc(ps.v[i]) - mu
                                       : xhat<RMS, FROM_Y>(to_acc(ps.v[i]), mu, A(0), rs,
                                                           cc.b[i], cc.inv[i]);
                    xv[k * V + i] = c;
                    sd += c;
                    gv[k * V + i] = to_acc(pd.v[i]) * cc.geff[i];
                }
            } else {
#pragma unroll
                for (int i = 0; i < V; ++i) {
                    xv[k * V + i] = A(0);
                    gv[k * V + i] = A(0);
                }
            }
        }
        const A mlo = CENTRE ? div_n(warp_sum(sd, lanes), inv_n, n) : A(0);
        A c1 = 0, c2 = 0;
#pragma unroll
        for (int k = 0; k < PACKS; ++k) {
            const int col = (k * lanes + l) * V;
            if (active && col < n) {
#pragma unroll
                for (int i = 0; i < V; ++i) {
                    const A xh = CENTRE ? (xv[k * V + i] - mlo) * rs : xv[k * V + i];
                    xv[k * V + i] = xh;
                    c1 += gv[k * V + i] * xh;
                    c2 += gv[k * V + i];
                }
            }
        }
        c1 = warp_sum(c1, lanes) * inv_n;
        c2 = RMS ? A(0) : warp_sum(c2, lanes) * inv_n;
        if (CENTRE && mlo_out && active && l == 0) mlo_out[row] = mlo;
#pragma unroll
        for (int k = 0; k < PACKS; ++k) {
            const int col = (k * lanes + l) * V;
            if (active && col < n) {
                Pack<T, V> o, pdh;
                if (dh) pdh = load_pack<V>(dh + off + col);
#pragma unroll
                for (int i = 0; i < V; ++i)
                    o.v[i] = dx_of(rs, gv[k * V + i], c2, xv[k * V + i], c1, dh, pdh.v[i]);
                store_pack<V>(dx + off + col, o);
            }
        }
    }
}

// ============ backward dx: a block per row, the row and dy in shared memory or re-read ===========

template <int V, bool SMEM, bool RMS, bool FROM_Y>
__device__ __forceinline__ void bwd_block(LN_BWD_PARAMS) {
    constexpr bool CENTRE = !RMS && !FROM_Y;
    LN_DYNAMIC_SMEM(ln_smem);
    __shared__ A red[64];
    T* cs = reinterpret_cast<T*>(ln_smem);
    T* cd = cs + n;  // n is a multiple of V on the vector path, so cd stays aligned
    const int step = blockDim.x * V;
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const u64 off = row * (u64)n;
        const T* ss = SMEM ? cs : src + off;
        const T* sdy = SMEM ? cd : dy + off;
        const A mu = CENTRE ? mean[row] : A(0), rs = rstd[row];
        A mlo = 0;
        if (SMEM || CENTRE) {
            A sd = 0;
            for (int c = threadIdx.x * V; c < n; c += step) {
                const Pack<T, V> ps = load_pack<V>(src + off + c);
                if (SMEM) {
                    store_pack<V>(cs + c, ps);
                    store_pack<V>(cd + c, load_pack<V>(dy + off + c));
                }
#pragma unroll
                for (int i = 0; i < V; ++i) sd += to_acc(ps.v[i]) - mu;
            }
            if (CENTRE) mlo = div_n(block_sum(sd, red), inv_n, n);
        }
        A c1 = 0, c2 = 0;
#pragma unroll 1
        for (int c = threadIdx.x * V; c < n; c += step) {
            const Pack<T, V> ps = load_pack<V>(ss + c);
            const Pack<T, V> pd = load_pack<V>(sdy + c);
            const Cols<V, FROM_Y> cc(gamma, beta, goff, c);
#pragma unroll
            for (int i = 0; i < V; ++i) {
                const A xh = xhat<RMS, FROM_Y>(to_acc(ps.v[i]), mu, mlo, rs, cc.b[i], cc.inv[i]);
                const A g = to_acc(pd.v[i]) * cc.geff[i];
                c1 += g * xh;
                c2 += g;
            }
        }
        if (RMS) {
            c1 = block_sum(c1, red) * inv_n;
            c2 = 0;
        } else {
            block_sum2(c1, c2, red);
            c1 *= inv_n;
            c2 *= inv_n;
        }
        if (CENTRE && mlo_out && threadIdx.x == 0) mlo_out[row] = mlo;
#pragma unroll 1
        for (int c = threadIdx.x * V; c < n; c += step) {
            const Pack<T, V> ps = load_pack<V>(ss + c);
            const Pack<T, V> pd = load_pack<V>(sdy + c);
            const Cols<V, FROM_Y> cc(gamma, beta, goff, c);
            Pack<T, V> o, pdh;
            if (dh) pdh = load_pack<V>(dh + off + c);
#pragma unroll
            for (int i = 0; i < V; ++i) {
                const A xh = xhat<RMS, FROM_Y>(to_acc(ps.v[i]), mu, mlo, rs, cc.b[i], cc.inv[i]);
                o.v[i] = dx_of(rs, to_acc(pd.v[i]) * cc.geff[i], c2, xh, c1, dh, pdh.v[i]);
            }
            store_pack<V>(dx + off + c, o);
        }
    }
}

// ============================ backward dγ/dβ: two fixed-order stages ============================

#define LN_GB_COLS 32
#define LN_GB_ROWS 8

#define LN_GB_PARAMS                                                                           \
    const T *__restrict__ src, const T *__restrict__ dy, const A *__restrict__ mean,          \
        const A *__restrict__ rstd, const A *__restrict__ mlo, const T *__restrict__ gamma,   \
        const T *__restrict__ beta, A *__restrict__ part_g, A *__restrict__ part_b, u64 rows, \
        int n, u64 rows_per_chunk, A goff
#define LN_GB_PASS src, dy, mean, rstd, mlo, gamma, beta, part_g, part_b, rows, n, rows_per_chunk, goff

// Stage 1: block (32, 8) sums rows [chunk·rpc, (chunk+1)·rpc) of 32 columns; the 8 row lanes are
// combined in a fixed order and written to part_*[chunk·n + col]. Either output may be null.
// x̂ is recomputed as in the row kernel: from x with the saved mean, m_lo (LayerNorm) and rstd,
// from y with γ and β.
template <bool RMS, bool FROM_Y>
__device__ __forceinline__ void gb_partial(LN_GB_PARAMS) {
    __shared__ A sg[LN_GB_ROWS][LN_GB_COLS + 1];
    __shared__ A sb[LN_GB_ROWS][LN_GB_COLS + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const u64 chunk = blockIdx.y;
    const u64 r0 = chunk * rows_per_chunk;
    const u64 r1 = min(rows, r0 + rows_per_chunk);
    const int tiles = (n + LN_GB_COLS - 1) / LN_GB_COLS;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // uniform per block
        const int col = tile * LN_GB_COLS + tx;
        A ag = 0, ab = 0;
        if (col < n) {
            const A b = FROM_Y && beta ? to_acc(beta[col]) : A(0);
            const A inv = FROM_Y && gamma ? rcp_acc(goff + to_acc(gamma[col])) : A(1);
            for (u64 r = r0 + ty; r < r1; r += LN_GB_ROWS) {
                const u64 i = r * (u64)n + col;
                const A g = to_acc(dy[i]);
                const bool centre = !RMS && !FROM_Y;
                const A xh = xhat<RMS, FROM_Y>(to_acc(src[i]), centre ? mean[r] : A(0),
                                               centre ? mlo[r] : A(0), FROM_Y ? A(0) : rstd[r],
                                               b, inv);
                ag += g * xh;
                ab += g;
            }
        }
        __syncthreads();  // the previous tile's readers are done
        sg[ty][tx] = ag;
        sb[ty][tx] = ab;
        __syncthreads();
        if (ty == 0 && col < n) {
            A tg = 0, tb = 0;
#pragma unroll
            for (int k = 0; k < LN_GB_ROWS; ++k) {
                tg += sg[k][tx];
                tb += sb[k][tx];
            }
            if (part_g) part_g[chunk * (u64)n + col] = tg;
            if (part_b) part_b[chunk * (u64)n + col] = tb;
        }
    }
}

// Stage 2: one thread per column sums the chunks in order and rounds once to T. Kind-agnostic:
// emitted once per module.
extern "C" __global__ void __launch_bounds__(256, 2)
    gb_final(const A* __restrict__ part_g, const A* __restrict__ part_b,
             T* __restrict__ dgamma, T* __restrict__ dbeta, int n, int chunks) {
    for (int col = blockIdx.x * blockDim.x + threadIdx.x; col < n; col += gridDim.x * blockDim.x) {
        A tg = 0, tb = 0;
        for (int c = 0; c < chunks; ++c) {
            if (dgamma) tg += part_g[(u64)c * n + col];
            if (dbeta) tb += part_b[(u64)c * n + col];
        }
        if (dgamma) dgamma[col] = from_acc(tg);
        if (dbeta) dbeta[col] = from_acc(tb);
    }
}
LN_REGISTER(GB_FINAL, gb_final, false, false)

// ===================================== entry points =====================================
// Launch bounds name a minimum of resident blocks on purpose: with only a maximum block size,
// ptxas 12.9 aims at twice as many blocks as that allows (32 registers for 1024 threads) and
// spills. (1024, 1) allows 64 registers; (128, 4) allows 128, and (128, 2) 255 for the warp
// kernels holding 96 bytes or more of the row per thread (24 or 32 f32 elements, 12 or 16 f64;
// x and dy in the backward).
#define LN_WARP_MIN_BLOCKS(I) ((I) * (int)sizeof(A) >= 96 ? 2 : 4)

// One warp kernel of kind P (prefix `ln` / `rms`, RMS its flag): forward, backward from x and
// backward from y.
#define LN_WARP(P, RMS, tag, V, I)                                                              \
    extern "C" __global__ void __launch_bounds__(128, LN_WARP_MIN_BLOCKS(I))                   \
        P##_fwd_warp_##tag##_i##I(LN_FWD_PARAMS) {                                             \
        fwd_warp<V, I, RMS>(LN_FWD_PASS);                                                      \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(128, LN_WARP_MIN_BLOCKS(I))                   \
        P##_bwd_warp_##tag##_i##I(LN_BWD_PARAMS) {                                             \
        bwd_warp<V, I, RMS, false>(LN_BWD_PASS);                                               \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(128, LN_WARP_MIN_BLOCKS(I))                   \
        P##_bwdy_warp_##tag##_i##I(LN_BWD_PARAMS) {                                            \
        bwd_warp<V, I, RMS, true>(LN_BWD_PASS);                                                \
    }                                                                                          \
    LN_REGISTER(FWD, P##_fwd_warp_##tag##_i##I, RMS, false)                                    \
    LN_REGISTER(BWD, P##_bwd_warp_##tag##_i##I, RMS, false)                                    \
    LN_REGISTER(BWD, P##_bwdy_warp_##tag##_i##I, RMS, true)

// The block kernels of kind P for one access width, in shared memory (MEM = smem, SMEM = true)
// or re-reading global memory (glob, false).
#define LN_BLOCK(P, RMS, tag, V, MEM, SMEM)                                                     \
    extern "C" __global__ void __launch_bounds__(1024, 1)                                      \
        P##_fwd_block_##tag##_##MEM(LN_FWD_PARAMS) {                                           \
        fwd_block<V, SMEM, RMS>(LN_FWD_PASS);                                                  \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(1024, 1)                                      \
        P##_bwd_block_##tag##_##MEM(LN_BWD_PARAMS) {                                           \
        bwd_block<V, SMEM, RMS, false>(LN_BWD_PASS);                                           \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(1024, 1)                                      \
        P##_bwdy_block_##tag##_##MEM(LN_BWD_PARAMS) {                                          \
        bwd_block<V, SMEM, RMS, true>(LN_BWD_PASS);                                            \
    }                                                                                          \
    LN_REGISTER(FWD, P##_fwd_block_##tag##_##MEM, RMS, false)                                  \
    LN_REGISTER(BWD, P##_bwd_block_##tag##_##MEM, RMS, false)                                  \
    LN_REGISTER(BWD, P##_bwdy_block_##tag##_##MEM, RMS, true)

#define LN_PARTIAL(P, RMS)                                                                      \
    extern "C" __global__ void __launch_bounds__(LN_GB_COLS * LN_GB_ROWS, 2)                   \
        P##_bwd_gb_partial(LN_GB_PARAMS) {                                                     \
        gb_partial<RMS, false>(LN_GB_PASS);                                                    \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(LN_GB_COLS * LN_GB_ROWS, 2)                   \
        P##_bwdy_gb_partial(LN_GB_PARAMS) {                                                    \
        gb_partial<RMS, true>(LN_GB_PASS);                                                     \
    }                                                                                          \
    LN_REGISTER(GB_PARTIAL, P##_bwd_gb_partial, RMS, false)                                    \
    LN_REGISTER(GB_PARTIAL, P##_bwdy_gb_partial, RMS, true)

// Items per thread: the host's table in src/plan.rs (`warp_items`) lists the same sets. Scalar
// kernels hold 1–16 elements per thread in every dtype, 24 and 32 too below f64; the vector
// kernels hold whole 128-bit packs.
#define LN_WARPS_S16(P, K)     \
    LN_WARP(P, K, s, 1, 1)     \
    LN_WARP(P, K, s, 1, 2)     \
    LN_WARP(P, K, s, 1, 4)     \
    LN_WARP(P, K, s, 1, 8)     \
    LN_WARP(P, K, s, 1, 12)    \
    LN_WARP(P, K, s, 1, 16)
#if LN_DTYPE == 3
#define LN_WARPS(P, K)         \
    LN_WARPS_S16(P, K)         \
    LN_WARP(P, K, v, 2, 2)     \
    LN_WARP(P, K, v, 2, 4)     \
    LN_WARP(P, K, v, 2, 8)     \
    LN_WARP(P, K, v, 2, 12)    \
    LN_WARP(P, K, v, 2, 16)
#else
#define LN_WARPS_S32(P, K)     \
    LN_WARPS_S16(P, K)         \
    LN_WARP(P, K, s, 1, 24)    \
    LN_WARP(P, K, s, 1, 32)
#if LN_VEC == 4
#define LN_WARPS(P, K)         \
    LN_WARPS_S32(P, K)         \
    LN_WARP(P, K, v, 4, 4)     \
    LN_WARP(P, K, v, 4, 8)     \
    LN_WARP(P, K, v, 4, 12)    \
    LN_WARP(P, K, v, 4, 16)    \
    LN_WARP(P, K, v, 4, 24)    \
    LN_WARP(P, K, v, 4, 32)
#else
#define LN_WARPS(P, K)         \
    LN_WARPS_S32(P, K)         \
    LN_WARP(P, K, v, 8, 8)     \
    LN_WARP(P, K, v, 8, 16)    \
    LN_WARP(P, K, v, 8, 24)    \
    LN_WARP(P, K, v, 8, 32)
#endif
#endif

// Every entry point of one kind.
#define LN_KIND_ENTRIES(P, K)                 \
    LN_BLOCK(P, K, s, 1, smem, true)          \
    LN_BLOCK(P, K, s, 1, glob, false)         \
    LN_BLOCK(P, K, v, LN_VEC, smem, true)     \
    LN_BLOCK(P, K, v, LN_VEC, glob, false)    \
    LN_WARPS(P, K)                            \
    LN_PARTIAL(P, K)

#if !defined(LN_KIND) || LN_KIND == 0
LN_KIND_ENTRIES(ln, false)
#endif
#if !defined(LN_KIND) || LN_KIND == 1
LN_KIND_ENTRIES(rms, true)
#endif
