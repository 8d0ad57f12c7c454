// harness.cpp: runs kernels/layernorm.cu on the CPU for tests/emulated.rs.
//
// Every CUDA thread of a block is a std::thread; __syncthreads is a block-wide std::barrier and
// each warp shuffle is an exchange through a per-warp slot array between two warp-wide barriers,
// so threads really run concurrently and must meet at every barrier and shuffle, as on a GPU.
// Blocks run one after the other, which makes function-level `static` storage behave as
// `__shared__`. Buffers are exact-size heap allocations: built with -fsanitize=address, any
// out-of-bounds access by a kernel aborts the run.
//
// What it does not model: NVRTC/ptxas code generation, the memory model beyond barriers, timing,
// and the hardware rsqrt estimate (replaced by the exact value off by a deliberate 2^-22 relative
// error, so the Newton step is exercised).
//
// Input (stdin), one command per line:
//   buffer <id> <bytes> <path|->        a buffer filled from a file, or zeros
//   launch <kernel> <gx> <gy> <bx> <by> <smem> <args...>
//          args: b<id> (buffer), n (null), u<dec> (u64), i<dec> (int), f<hex> (float bits),
//                d<hex> (double bits)
//   save <id> <path>
// Argument kinds and nullability are checked against the kernel's signature.

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

using std::fabs;
using std::fma;
using std::fmax;
using std::isfinite;
using std::isinf;
using std::sqrt;

#define LN_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

struct Dim3 {
    unsigned x, y, z;
};
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;
unsigned char* ln_emu_dyn_smem = nullptr;
#define LN_DYNAMIC_SMEM(name) unsigned char* name = ln_emu_dyn_smem

struct Warp {
    std::barrier<> bar;
    double slot[32];
    explicit Warp(int lanes) : bar(lanes) {}
};
thread_local Warp* t_warp = nullptr;
thread_local int t_lane = 0;
std::barrier<>* g_block_bar = nullptr;

inline void __syncthreads() { g_block_bar->arrive_and_wait(); }

template <class V>
V __shfl_xor_sync(unsigned, V v, int mask) {
    t_warp->slot[t_lane] = (double)v;  // exact for float and double
    t_warp->bar.arrive_and_wait();
    const V r = (V)t_warp->slot[t_lane ^ mask];
    t_warp->bar.arrive_and_wait();
    return r;
}

inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline long long __double_as_longlong(double d) {
    long long u;
    std::memcpy(&u, &d, 8);
    return u;
}
inline double __longlong_as_double(long long u) {
    double d;
    std::memcpy(&d, &u, 8);
    return d;
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline float rsqrtf(float v) {
    float r = 1.0f / std::sqrt(v);
    return std::isfinite(r) ? r * (1.0f + 0x1p-22f) : r;
}
inline double rsqrt(double v) {
    double r = 1.0 / std::sqrt(v);
    return std::isfinite(r) ? r * (1.0 + 0x1p-22) : r;
}
template <class X>
X min(X a, X b) {
    return b < a ? b : a;
}
template <class X>
X max(X a, X b) {
    return a < b ? b : a;
}
inline float ln_emu_f16_to_f32(unsigned short h) {
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return (float)x;
}
inline unsigned short ln_emu_f32_to_f16(float f) {
    const _Float16 x = (_Float16)f;
    unsigned short h;
    std::memcpy(&h, &x, 2);
    return h;
}

enum Kind { FWD, BWD, GB_PARTIAL, GB_FINAL };
struct Entry {
    Kind kind;
    void* fn;
};
static std::map<std::string, Entry>& registry() {
    static std::map<std::string, Entry> m;
    return m;
}
struct Reg {
    Reg(const char* name, Kind k, void* fn) { registry()[name] = Entry{k, fn}; }
};
#define LN_REGISTER(kind, name) static Reg ln_reg_##name(#name, kind, (void*)&name);

#include "layernorm.cu"

[[noreturn]] static void fail(const std::string& why) {
    std::fprintf(stderr, "harness: %s\n", why.c_str());
    std::exit(2);
}

static std::map<int, std::vector<unsigned char>> buffers;

struct Tok {
    char kind;  // b n u i f d
    uint64_t bits;
};

static Tok parse_tok(const std::string& s) {
    if (s == "n") return Tok{'n', 0};
    if (s.size() < 2) fail("bad argument `" + s + "`");
    const char k = s[0];
    const std::string v = s.substr(1);
    switch (k) {
        case 'b':
        case 'u': return Tok{k, std::stoull(v)};
        case 'i': return Tok{k, (uint64_t)std::stoll(v)};
        case 'f':
        case 'd': return Tok{k, std::stoull(v, nullptr, 16)};
        default: fail("bad argument `" + s + "`");
    }
}

// Argument access with signature checks: 'p' pointer (nullable or not), 'u', 'i', 's' (scalar A).
struct Args {
    const std::vector<Tok>& t;
    std::string kernel;
    void check_count(size_t n) const {
        if (t.size() != n)
            fail(kernel + ": expected " + std::to_string(n) + " arguments, got " +
                 std::to_string(t.size()));
    }
    void* p(size_t i, bool nullable) const {
        if (t[i].kind == 'n') {
            if (!nullable) fail(kernel + ": argument " + std::to_string(i) + " may not be null");
            return nullptr;
        }
        if (t[i].kind != 'b') fail(kernel + ": argument " + std::to_string(i) + " is no pointer");
        auto it = buffers.find((int)t[i].bits);
        if (it == buffers.end()) fail(kernel + ": unknown buffer");
        return it->second.data();
    }
    uint64_t u(size_t i) const {
        if (t[i].kind != 'u') fail(kernel + ": argument " + std::to_string(i) + " is no u64");
        return t[i].bits;
    }
    int i32(size_t i) const {
        if (t[i].kind != 'i') fail(kernel + ": argument " + std::to_string(i) + " is no int");
        return (int)(int64_t)t[i].bits;
    }
    A s(size_t i) const {
        const char want = sizeof(A) == 8 ? 'd' : 'f';
        if (t[i].kind != want)
            fail(kernel + ": argument " + std::to_string(i) + " is not of the accumulation type");
        if (sizeof(A) == 8) return (A)__longlong_as_double((long long)t[i].bits);
        return (A)__uint_as_float((unsigned)t[i].bits);
    }
};

using FwdFn = void (*)(const T*, const T*, const T*, T*, A*, A*, u64, int, int, A, A);
using BwdFn = void (*)(const T*, const T*, const A*, const A*, const T*, T*, A*, u64, int, int, A);
using PartialFn = void (*)(const T*, const T*, const A*, const A*, const A*, A*, A*, u64, int, u64);
using FinalFn = void (*)(const A*, const A*, T*, T*, int, int);

static void call(const Entry& e, const Args& a) {
    switch (e.kind) {
        case FWD:
            ((FwdFn)e.fn)((const T*)a.p(0, false), (const T*)a.p(1, true), (const T*)a.p(2, true),
                          (T*)a.p(3, false), (A*)a.p(4, false), (A*)a.p(5, false), a.u(6),
                          a.i32(7), a.i32(8), a.s(9), a.s(10));
            break;
        case BWD:
            ((BwdFn)e.fn)((const T*)a.p(0, false), (const T*)a.p(1, false),
                          (const A*)a.p(2, false), (const A*)a.p(3, false),
                          (const T*)a.p(4, true), (T*)a.p(5, false), (A*)a.p(6, true), a.u(7),
                          a.i32(8), a.i32(9), a.s(10));
            break;
        case GB_PARTIAL:
            ((PartialFn)e.fn)((const T*)a.p(0, false), (const T*)a.p(1, false),
                              (const A*)a.p(2, false), (const A*)a.p(3, false),
                              (const A*)a.p(4, false), (A*)a.p(5, true), (A*)a.p(6, true), a.u(7),
                              a.i32(8), a.u(9));
            break;
        case GB_FINAL:
            ((FinalFn)e.fn)((const A*)a.p(0, true), (const A*)a.p(1, true), (T*)a.p(2, true),
                            (T*)a.p(3, true), a.i32(4), a.i32(5));
            break;
    }
}

static void launch(const std::string& name, Dim3 grid, Dim3 block, unsigned smem,
                   const std::vector<Tok>& toks) {
    auto it = registry().find(name);
    if (it == registry().end()) fail("no kernel `" + name + "`");
    const Entry e = it->second;
    const Args args{toks, name};
    static const size_t counts[] = {11, 11, 10, 6};
    args.check_count(counts[e.kind]);
    const int nt = (int)(block.x * block.y);
    if (nt <= 0 || nt > 1024 || nt % 32 != 0) fail(name + ": bad block size");
    gridDim = grid;
    blockDim = block;
    for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            std::vector<unsigned char> dyn(smem);
            ln_emu_dyn_smem = smem ? dyn.data() : nullptr;
            std::barrier<> bar(nt);
            g_block_bar = &bar;
            std::vector<std::unique_ptr<Warp>> warps;
            for (int w = 0; w < nt / 32; ++w) warps.push_back(std::make_unique<Warp>(32));
            std::vector<std::thread> threads;
            threads.reserve(nt);
            for (int t = 0; t < nt; ++t) {
                threads.emplace_back([&, t] {
                    threadIdx = Dim3{(unsigned)t % block.x, (unsigned)t / block.x, 0};
                    blockIdx = Dim3{bx, by, 0};
                    t_warp = warps[t / 32].get();
                    t_lane = t % 32;
                    call(e, args);
                });
            }
            for (auto& th : threads) th.join();
        }
    }
}

int main() {
    std::string line;
    while (std::getline(std::cin, line)) {
        std::istringstream in(line);
        std::string cmd;
        if (!(in >> cmd)) continue;
        if (cmd == "buffer") {
            int id;
            size_t bytes;
            std::string path;
            in >> id >> bytes >> path;
            std::vector<unsigned char> b(bytes);
            if (path != "-") {
                std::ifstream f(path, std::ios::binary);
                if (!f.read((char*)b.data(), (std::streamsize)bytes)) fail("cannot read " + path);
            }
            buffers[id] = std::move(b);
        } else if (cmd == "launch") {
            std::string name, tok;
            Dim3 g{1, 1, 1}, b{1, 1, 1};
            unsigned smem;
            in >> name >> g.x >> g.y >> b.x >> b.y >> smem;
            std::vector<Tok> toks;
            while (in >> tok) toks.push_back(parse_tok(tok));
            launch(name, g, b, smem, toks);
        } else if (cmd == "save") {
            int id;
            std::string path;
            in >> id >> path;
            auto it = buffers.find(id);
            if (it == buffers.end()) fail("save: unknown buffer");
            std::ofstream f(path, std::ios::binary);
            f.write((const char*)it->second.data(), (std::streamsize)it->second.size());
        } else {
            fail("unknown command `" + cmd + "`");
        }
    }
    return 0;
}
