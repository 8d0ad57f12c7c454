// layernorm.cu: LayerNorm forward and backward CUDA kernels of the layernorm-cuda backend.
//
// Compiled at run time by NVRTC, once per storage dtype: the host prepends `#define LN_DTYPE k`
// (0 = f16, 1 = bf16, 2 = f32, 3 = f64). No CUDA header is included: the f16/bf16 conversions are
// written below with inline PTX and bit operations, so NVRTC needs nothing but itself.
//
// Strategies (the host picks one per shape, see src/plan.rs):
//   *_warp_{s,v}_i<I>  a group of `lanes` (1..32, a power of two) threads per row, the row held in
//                      registers, I elements per thread; `s` scalar loads, `v` 128-bit loads.
//   *_block_{s,v}_smem a block per row, the row cached in dynamic shared memory (as T).
//   *_block_{s,v}_glob a block per row, re-reading the row from global memory (very large N).
//   ln_bwd_gb_partial / ln_bwd_gb_final
//                      dγ/dβ in two fixed-order stages through accumulator-typed partial buffers
//                      (no atomics: bitwise deterministic).
//
// Statistics never use E[x²] − E[x]²:
//   m0  = (Σ x·2^-p)/N·2^p           first estimate (2^p ≥ N, so the sum cannot overflow)
//   d   = x − m0;  m_lo = Σ d / N    residual mean (corrects m0; mean = m0 + m_lo)
//   e   = exponent of max|d|, s = 2^-e (exact)
//   var = Σ ((d − m_lo)·s)² / N · 2^2e   squares of O(1) values: no overflow for |x| ~ 1e30
//   rstd = 1/sqrt(var + eps), or s/sqrt(Σ…/N) when var itself is not representable.

// Hooks for tests/emu/harness.cpp, which runs this file on the CPU (one thread per CUDA thread);
// under NVRTC they expand to the plain CUDA spelling or to nothing.
#ifndef LN_DYNAMIC_SMEM
#define LN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif
#ifndef LN_REGISTER
#define LN_REGISTER(kind, name)
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

// Exponent clamp for the power-of-two scale: keeps 2^±e finite in A.
#if LN_DTYPE == 3
#define LN_EMAX 1000
#else
#define LN_EMAX 100
#endif

// V consecutive elements, loaded and stored as one access (128 bits when V == LN_VEC).
template <int V>
struct __align__(sizeof(T) * V) Pack {
    T v[V];
};

template <int V>
__device__ __forceinline__ Pack<V> load_pack(const T* __restrict__ p) {
    return *reinterpret_cast<const Pack<V>*>(p);
}

template <int V>
__device__ __forceinline__ void store_pack(T* __restrict__ p, const Pack<V>& v) {
    *reinterpret_cast<Pack<V>*>(p) = v;
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

// 1/sqrt(var + eps) from the scaled sum of squares `ss_n` = Σ((d−m_lo)·2^-e)²/N.
__device__ __forceinline__ A finish_rstd(A ss_n, int e, A eps) {
    const A up = pow2(e);
    const A var = ss_n * up * up;  // exact unless it leaves the range of A
    if (isinf(var)) return pow2(-e) * rsqrt_acc(ss_n);  // eps is negligible against such a var
    return rsqrt_acc(var + eps);
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

// 2^-p with 2^p >= n: the pre-scale of the first (overflow-free) sum.
__device__ __forceinline__ int ceil_log2(int n) { return n <= 1 ? 0 : 32 - __clz(n - 1); }

// ======================= forward: a (sub-)warp per row, row in registers =======================

template <int V, int ITEMS>
__device__ __forceinline__ void fwd_warp(const T* __restrict__ x, const T* __restrict__ gamma,
                                         const T* __restrict__ beta, T* __restrict__ y,
                                         A* __restrict__ mean_out, A* __restrict__ rstd_out,
                                         u64 rows, int n, int lanes, A eps, A inv_n) {
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
        const T* xr = x + (active ? row : 0) * (u64)n;
        A v[ITEMS];
        A s = 0;
#pragma unroll
        for (int k = 0; k < PACKS; ++k) {
            const int col = (k * lanes + l) * V;
            if (active && col < n) {
                const Pack<V> pk = load_pack<V>(xr + col);
#pragma unroll
                for (int i = 0; i < V; ++i) v[k * V + i] = to_acc(pk.v[i]);
            } else {
#pragma unroll
                for (int i = 0; i < V; ++i) v[k * V + i] = A(0);
            }
#pragma unroll
            for (int i = 0; i < V; ++i) s += v[k * V + i] * pre;
        }
        const A m0 = warp_sum(s, lanes) * inv_n * pre_inv;
        A sd = 0, mx = 0;
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
        sd = warp_sum(sd, lanes);
        mx = warp_max(mx, lanes);
        const A mlo = sd * inv_n;
        const int e = scale_exponent(mx);
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
        const A rstd = finish_rstd(warp_sum(ss, lanes) * inv_n, e, eps);
        if (active && l == 0) {
            mean_out[row] = m0 + mlo;
            rstd_out[row] = rstd;
        }
        T* yr = y + (active ? row : 0) * (u64)n;
#pragma unroll
        for (int k = 0; k < PACKS; ++k) {
            const int col = (k * lanes + l) * V;
            if (active && col < n) {
                Pack<V> g, b, o;
                if (gamma) g = load_pack<V>(gamma + col);
                if (beta) b = load_pack<V>(beta + col);
#pragma unroll
                for (int i = 0; i < V; ++i) {
                    A r = (v[k * V + i] - mlo) * rstd;
                    if (gamma) r *= to_acc(g.v[i]);
                    if (beta) r += to_acc(b.v[i]);
                    o.v[i] = from_acc(r);
                }
                store_pack<V>(yr + col, o);
            }
        }
    }
}

// ================= forward: a block per row, row in shared memory or re-read ===================

template <int V, bool SMEM>
__device__ __forceinline__ void fwd_block(const T* __restrict__ x, const T* __restrict__ gamma,
                                          const T* __restrict__ beta, T* __restrict__ y,
                                          A* __restrict__ mean_out, A* __restrict__ rstd_out,
                                          u64 rows, int n, A eps, A inv_n) {
    LN_DYNAMIC_SMEM(ln_smem);
    __shared__ A red[64];
    T* cache = reinterpret_cast<T*>(ln_smem);
    const int p = ceil_log2(n);
    const A pre = pow2(-p), pre_inv = pow2(p);
    const int step = blockDim.x * V;
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + row * (u64)n;
        // Each thread visits the same columns in every pass, so it only ever reads back what it
        // cached itself: no barrier is needed between the cache writes and the reads.
        const T* src = SMEM ? cache : xr;
        A s = 0;
        for (int c = threadIdx.x * V; c < n; c += step) {
            const Pack<V> pk = load_pack<V>(xr + c);
            if (SMEM) store_pack<V>(cache + c, pk);
#pragma unroll
            for (int i = 0; i < V; ++i) s += to_acc(pk.v[i]) * pre;
        }
        const A m0 = block_sum(s, red) * inv_n * pre_inv;
        A sd = 0, mx = 0;
        for (int c = threadIdx.x * V; c < n; c += step) {
            const Pack<V> pk = load_pack<V>(src + c);
#pragma unroll
            for (int i = 0; i < V; ++i) {
                const A d = to_acc(pk.v[i]) - m0;
                sd += d;
                mx = fmax(mx, fabs(d));
            }
        }
        block_sum_max(sd, mx, red);
        const A mlo = sd * inv_n;
        const int e = scale_exponent(mx);
        const A sc = pow2(-e);
        A ss = 0;
        for (int c = threadIdx.x * V; c < n; c += step) {
            const Pack<V> pk = load_pack<V>(src + c);
#pragma unroll
            for (int i = 0; i < V; ++i) {
                const A q = ((to_acc(pk.v[i]) - m0) - mlo) * sc;
                ss += q * q;
            }
        }
        const A rstd = finish_rstd(block_sum(ss, red) * inv_n, e, eps);
        if (threadIdx.x == 0) {
            mean_out[row] = m0 + mlo;
            rstd_out[row] = rstd;
        }
        T* yr = y + row * (u64)n;
        for (int c = threadIdx.x * V; c < n; c += step) {
            const Pack<V> pk = load_pack<V>(src + c);
            Pack<V> g, b, o;
            if (gamma) g = load_pack<V>(gamma + c);
            if (beta) b = load_pack<V>(beta + c);
#pragma unroll
            for (int i = 0; i < V; ++i) {
                A r = ((to_acc(pk.v[i]) - m0) - mlo) * rstd;
                if (gamma) r *= to_acc(g.v[i]);
                if (beta) r += to_acc(b.v[i]);
                o.v[i] = from_acc(r);
            }
            store_pack<V>(yr + c, o);
        }
    }
}

// ====================== backward dx: a (sub-)warp per row, row in registers =====================

template <int V, int ITEMS>
__device__ __forceinline__ void bwd_warp(const T* __restrict__ x, const T* __restrict__ dy,
                                         const A* __restrict__ mean, const A* __restrict__ rstd,
                                         const T* __restrict__ gamma, T* __restrict__ dx,
                                         A* __restrict__ mlo_out, u64 rows, int n, int lanes, A inv_n) {
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
        const A mu = active ? mean[row] : A(0);
        const A rs = active ? rstd[row] : A(0);
        A xv[ITEMS], gv[ITEMS];
        A sd = 0;
#pragma unroll
        for (int k = 0; k < PACKS; ++k) {
            const int col = (k * lanes + l) * V;
            if (active && col < n) {
                const Pack<V> px = load_pack<V>(x + off + col);
                const Pack<V> pd = load_pack<V>(dy + off + col);
                Pack<V> pg;
                if (gamma) pg = load_pack<V>(gamma + col);
#pragma unroll
                for (int i = 0; i < V; ++i) {
                    const A d = to_acc(px.v[i]) - mu;
                    xv[k * V + i] = d;
                    sd += d;
                    const A g = to_acc(pd.v[i]);
                    gv[k * V + i] = gamma ? g * to_acc(pg.v[i]) : g;
                }
            } else {
#pragma unroll
                for (int i = 0; i < V; ++i) {
                    xv[k * V + i] = A(0);
                    gv[k * V + i] = A(0);
                }
            }
        }
        const A mlo = warp_sum(sd, lanes) * inv_n;
        A c1 = 0, c2 = 0;
#pragma unroll
        for (int k = 0; k < PACKS; ++k) {
            const int col = (k * lanes + l) * V;
            if (active && col < n) {
#pragma unroll
                for (int i = 0; i < V; ++i) {
                    const A xh = (xv[k * V + i] - mlo) * rs;
                    xv[k * V + i] = xh;
                    c1 += gv[k * V + i] * xh;
                    c2 += gv[k * V + i];
                }
            }
        }
        c1 = warp_sum(c1, lanes) * inv_n;
        c2 = warp_sum(c2, lanes) * inv_n;
        if (mlo_out && active && l == 0) mlo_out[row] = mlo;
#pragma unroll
        for (int k = 0; k < PACKS; ++k) {
            const int col = (k * lanes + l) * V;
            if (active && col < n) {
                Pack<V> o;
#pragma unroll
                for (int i = 0; i < V; ++i)
                    o.v[i] = from_acc(rs * (gv[k * V + i] - c2 - xv[k * V + i] * c1));
                store_pack<V>(dx + off + col, o);
            }
        }
    }
}

// =============== backward dx: a block per row, x and dy in shared memory or re-read ==============

template <int V, bool SMEM>
__device__ __forceinline__ void bwd_block(const T* __restrict__ x, const T* __restrict__ dy,
                                          const A* __restrict__ mean, const A* __restrict__ rstd,
                                          const T* __restrict__ gamma, T* __restrict__ dx,
                                          A* __restrict__ mlo_out, u64 rows, int n, A inv_n) {
    LN_DYNAMIC_SMEM(ln_smem);
    __shared__ A red[64];
    T* cx = reinterpret_cast<T*>(ln_smem);
    T* cd = cx + n;  // n is a multiple of V on the vector path, so cd stays aligned
    const int step = blockDim.x * V;
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const u64 off = row * (u64)n;
        const T* sx = SMEM ? cx : x + off;
        const T* sdy = SMEM ? cd : dy + off;
        const A mu = mean[row], rs = rstd[row];
        A sd = 0;
        for (int c = threadIdx.x * V; c < n; c += step) {
            const Pack<V> px = load_pack<V>(x + off + c);
            if (SMEM) {
                store_pack<V>(cx + c, px);
                store_pack<V>(cd + c, load_pack<V>(dy + off + c));
            }
#pragma unroll
            for (int i = 0; i < V; ++i) sd += to_acc(px.v[i]) - mu;
        }
        const A mlo = block_sum(sd, red) * inv_n;
        A c1 = 0, c2 = 0;
        for (int c = threadIdx.x * V; c < n; c += step) {
            const Pack<V> px = load_pack<V>(sx + c);
            const Pack<V> pd = load_pack<V>(sdy + c);
            Pack<V> pg;
            if (gamma) pg = load_pack<V>(gamma + c);
#pragma unroll
            for (int i = 0; i < V; ++i) {
                const A xh = ((to_acc(px.v[i]) - mu) - mlo) * rs;
                const A g = gamma ? to_acc(pd.v[i]) * to_acc(pg.v[i]) : to_acc(pd.v[i]);
                c1 += g * xh;
                c2 += g;
            }
        }
        block_sum2(c1, c2, red);
        c1 *= inv_n;
        c2 *= inv_n;
        if (mlo_out && threadIdx.x == 0) mlo_out[row] = mlo;
        for (int c = threadIdx.x * V; c < n; c += step) {
            const Pack<V> px = load_pack<V>(sx + c);
            const Pack<V> pd = load_pack<V>(sdy + c);
            Pack<V> pg, o;
            if (gamma) pg = load_pack<V>(gamma + c);
#pragma unroll
            for (int i = 0; i < V; ++i) {
                const A xh = ((to_acc(px.v[i]) - mu) - mlo) * rs;
                const A g = gamma ? to_acc(pd.v[i]) * to_acc(pg.v[i]) : to_acc(pd.v[i]);
                o.v[i] = from_acc(rs * (g - c2 - xh * c1));
            }
            store_pack<V>(dx + off + c, o);
        }
    }
}

// ============================ backward dγ/dβ: two fixed-order stages ============================

#define LN_GB_COLS 32
#define LN_GB_ROWS 8

// Stage 1: block (32, 8) sums rows [chunk·rpc, (chunk+1)·rpc) of 32 columns; the 8 row lanes are
// combined in a fixed order and written to part_*[chunk·n + col]. Either output may be null.
extern "C" __global__ void __launch_bounds__(LN_GB_COLS * LN_GB_ROWS, 2)
    ln_bwd_gb_partial(const T* __restrict__ x, const T* __restrict__ dy,
                      const A* __restrict__ mean, const A* __restrict__ rstd,
                      const A* __restrict__ mlo, A* __restrict__ part_g, A* __restrict__ part_b,
                      u64 rows, int n, u64 rows_per_chunk) {
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
            for (u64 r = r0 + ty; r < r1; r += LN_GB_ROWS) {
                const u64 i = r * (u64)n + col;
                const A g = to_acc(dy[i]);
                const A xh = ((to_acc(x[i]) - mean[r]) - mlo[r]) * rstd[r];
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

// Stage 2: one thread per column sums the chunks in order and rounds once to T.
extern "C" __global__ void __launch_bounds__(256, 2)
    ln_bwd_gb_final(const A* __restrict__ part_g, const A* __restrict__ part_b,
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
LN_REGISTER(GB_PARTIAL, ln_bwd_gb_partial)
LN_REGISTER(GB_FINAL, ln_bwd_gb_final)

// ===================================== entry points =====================================
// Launch bounds name a minimum of resident blocks on purpose: with only a maximum block size,
// ptxas 12.9 aims at twice as many blocks as that allows (32 registers for 1024 threads) and
// spills. (1024, 1) allows 64 registers; (128, 4) allows 128, and (128, 2) 255 for the warp
// kernels holding 24 or 32 elements per thread (x and dy in the backward).
#define LN_WARP_MIN_BLOCKS(I) ((I) >= 24 ? 2 : 4)

#define LN_FWD_ARGS                                                                      \
    const T *__restrict__ x, const T *__restrict__ gamma, const T *__restrict__ beta,    \
        T *__restrict__ y, A *__restrict__ mean, A *__restrict__ rstd, u64 rows, int n, \
        int lanes, A eps, A inv_n
#define LN_BWD_ARGS                                                                         \
    const T *__restrict__ x, const T *__restrict__ dy, const A *__restrict__ mean,          \
        const A *__restrict__ rstd, const T *__restrict__ gamma, T *__restrict__ dx,        \
        A *__restrict__ mlo, u64 rows, int n, int lanes, A inv_n

#define LN_WARP(tag, V, I)                                                                    \
    extern "C" __global__ void __launch_bounds__(128, LN_WARP_MIN_BLOCKS(I)) ln_fwd_warp_##tag##_i##I(LN_FWD_ARGS) { \
        fwd_warp<V, I>(x, gamma, beta, y, mean, rstd, rows, n, lanes, eps, inv_n);                   \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(128, LN_WARP_MIN_BLOCKS(I)) ln_bwd_warp_##tag##_i##I(LN_BWD_ARGS) { \
        bwd_warp<V, I>(x, dy, mean, rstd, gamma, dx, mlo, rows, n, lanes, inv_n);                    \
    }                                                                                         \
    LN_REGISTER(FWD, ln_fwd_warp_##tag##_i##I)                                               \
    LN_REGISTER(BWD, ln_bwd_warp_##tag##_i##I)

#define LN_BLOCK(tag, V)                                                                     \
    extern "C" __global__ void __launch_bounds__(1024, 1) ln_fwd_block_##tag##_smem(LN_FWD_ARGS) { \
        fwd_block<V, true>(x, gamma, beta, y, mean, rstd, rows, n, eps, inv_n);                     \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(1024, 1) ln_fwd_block_##tag##_glob(LN_FWD_ARGS) { \
        fwd_block<V, false>(x, gamma, beta, y, mean, rstd, rows, n, eps, inv_n);                    \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(1024, 1) ln_bwd_block_##tag##_smem(LN_BWD_ARGS) { \
        bwd_block<V, true>(x, dy, mean, rstd, gamma, dx, mlo, rows, n, inv_n);                      \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(1024, 1) ln_bwd_block_##tag##_glob(LN_BWD_ARGS) { \
        bwd_block<V, false>(x, dy, mean, rstd, gamma, dx, mlo, rows, n, inv_n);                     \
    }                                                                                        \
    LN_REGISTER(FWD, ln_fwd_block_##tag##_smem)                                             \
    LN_REGISTER(FWD, ln_fwd_block_##tag##_glob)                                             \
    LN_REGISTER(BWD, ln_bwd_block_##tag##_smem)                                             \
    LN_REGISTER(BWD, ln_bwd_block_##tag##_glob)

LN_BLOCK(s, 1)
LN_BLOCK(v, LN_VEC)

// Items per thread: the host's table in src/plan.rs (WARP_ITEMS) lists the same sets.
#if LN_DTYPE == 3
LN_WARP(s, 1, 1)
LN_WARP(s, 1, 2)
LN_WARP(s, 1, 4)
LN_WARP(s, 1, 8)
LN_WARP(s, 1, 12)
LN_WARP(s, 1, 16)
LN_WARP(v, 2, 2)
LN_WARP(v, 2, 4)
LN_WARP(v, 2, 8)
LN_WARP(v, 2, 12)
LN_WARP(v, 2, 16)
#else
LN_WARP(s, 1, 1)
LN_WARP(s, 1, 2)
LN_WARP(s, 1, 4)
LN_WARP(s, 1, 8)
LN_WARP(s, 1, 12)
LN_WARP(s, 1, 16)
LN_WARP(s, 1, 24)
LN_WARP(s, 1, 32)
#if LN_VEC == 4
LN_WARP(v, 4, 4)
LN_WARP(v, 4, 8)
LN_WARP(v, 4, 12)
LN_WARP(v, 4, 16)
LN_WARP(v, 4, 24)
LN_WARP(v, 4, 32)
#else
LN_WARP(v, 8, 8)
LN_WARP(v, 8, 16)
LN_WARP(v, 8, 24)
LN_WARP(v, 8, 32)
#endif
#endif
