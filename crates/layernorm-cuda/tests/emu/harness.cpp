// harness.cpp: runs kernels/layernorm.cu on the CPU for tests/emulated.rs.
//
// Every CUDA thread of a block is a fiber with its own stack, all on one OS thread (switched by
// a few lines of assembly on x86-64, by ucontext elsewhere; announced to AddressSanitizer):
// __syncthreads is a block-wide barrier and each warp shuffle an exchange through per-warp slots
// at a warp-wide barrier. A fiber that reaches a barrier is parked until every thread of its
// block (or warp) has arrived. The schedule is deterministic and built to expose a missing
// barrier:
// - Run ahead: at the start of a block and at every release of a block-wide barrier, one warp,
//   the leader, runs alone as far as it can, through its shuffles, until all of its threads are
//   parked at the next block-wide barrier (or done); only then do the other warps resume. A GPU
//   may do the same, so a kernel whose fast warp overwrites shared data that slower warps have
//   still to read (the barrier before a reused reduction buffer is written) fails its check, as
//   does one whose leader reads data other warps have not written yet. The leader is a hash of
//   (launch number, block index, release number) modulo the block's warps, so every warp leads
//   some releases of a test.
// - Lockstep: the other warps, and the leader's threads among themselves, run one barrier phase
//   at a time, released in ascending order after one barrier and in descending order after the
//   next, so any reader of data that a thread earlier or later in the block writes in the same
//   phase sees stale values.
// Deleting any one `__syncthreads` from layernorm.cu fails tests/emulated.rs (its
// LAYERNORM_EMU_KERNELS builds this harness from a mutated copy).
// A parked fiber switches straight to the next ready one (one stack switch per park, the cost
// that dominates a run; the schedule changes the order of the switches, not their number). A
// barrier some threads never reach is reported as a deadlock. Blocks run one after the other,
// which makes function-level `static` storage behave as `__shared__`. Buffers are exact-size
// heap allocations: built with -fsanitize=address, any out-of-bounds access by a kernel aborts
// the run.
//
// What it does not model: NVRTC/ptxas code generation, the memory model beyond barriers, timing,
// and the hardware rsqrt/rcp estimates (replaced by the exact value off by a deliberate 2^-22
// relative error, so the Newton steps are exercised).
//
// One process serves many runs. Input (stdin), one command per line:
//   buffer <id> <bytes> data            a buffer filled from the <bytes> raw bytes that follow
//                                       the line's newline
//   buffer <id> <bytes> zero            a buffer of zeros
//   launch <kernel> <gx> <gy> <bx> <by> <smem> <args...>
//          args: b<id> (buffer), n (null), u<dec> (u64), i<dec> (int), f<hex> (float bits),
//                d<hex> (double bits)
//   save <id>                           write `<bytes>\n` and the buffer's raw bytes to stdout
//   reset                               drop every buffer
//   sync                                answer `ok` on stdout once everything above is done
// Argument kinds and the nullability of every pointer are checked against the kernel's
// signature and its kind (LayerNorm or RMSNorm, from x or from y). Any failure ends the process
// with a message on stderr.

#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
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
// The running fiber's indices: set by the scheduler before every switch into a fiber.
Dim3 threadIdx, blockIdx, blockDim, gridDim;
unsigned char* ln_emu_dyn_smem = nullptr;
#define LN_DYNAMIC_SMEM(name) unsigned char* name = ln_emu_dyn_smem

[[noreturn]] static void fail(const std::string& why) {
    std::fprintf(stderr, "harness: %s\n", why.c_str());
    std::exit(2);
}

// ---------------------------------- fibers and barriers ----------------------------------

// The scheduler runs once per barrier and thread: optimized even where the kernels are built at
// -Og (built at -O1 or more, the kernels take longer to compile than they save at run time).
#pragma GCC push_options
#pragma GCC optimize("O2")

namespace emu {

constexpr size_t STACK = 16 * 1024;

// ---- one switch between stacks: x86-64 assembly (no system call), or ucontext ----
#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack and its pointer in *from, then
// continues on the stack `to` (saved the same way, or prepared by `prepare`).
extern "C" void ln_emu_switch(void** from, void* to);
asm(R"(
    .text
    .globl ln_emu_switch
    .type ln_emu_switch, @function
ln_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size ln_emu_switch, .-ln_emu_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");
struct Context {
    void* sp = nullptr;
};
// A stack whose first switch enters `entry` (which never returns) as if called.
void prepare(Context& c, char* stack, size_t size, void (*entry)()) {
    auto top = (uintptr_t)(stack + size) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;          // entry's return address: never used
    *--sp = (void*)entry;     // popped by `ret`
    for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12–r15
    c.sp = sp;
}
void jump(Context& from, Context& to) { ln_emu_switch(&from.sp, to.sp); }
#else
struct Context {
    ucontext_t uc;
};
void prepare(Context& c, char* stack, size_t size, void (*entry)()) {
    if (getcontext(&c.uc) != 0) fail("getcontext failed");
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
void jump(Context& from, Context& to) {
    if (swapcontext(&from.uc, &to.uc) != 0) fail("swapcontext failed");
}
#endif

constexpr int MAX_THREADS = 1024;

struct Fiber {
    Context ctx;
    std::unique_ptr<char[]> stack;  // allocated on first use, kept for every later block
    Dim3 tid;
    unsigned shuffles = 0;  // shuffles done in this block: picks the warp's slot array
    bool done = false;
};

// Fibers are never destroyed: after its kernel returns, a fiber parks at the top of its loop
// and runs the kernel again when a later block resumes it, so its stack holds no dead frames.
Fiber fibers[MAX_THREADS];
Context scheduler;
int current = -1;
bool reverse_next = false;
const char* kernel_name = "";

// The fibers that may run, in the order they will: rings of fiber indices (each fiber is in
// one of them at most once). The leading warp's fibers (`ahead`) run before all others.
struct Ready {
    int slot[MAX_THREADS];
    unsigned head = 0, tail = 0;
    bool empty() const { return head == tail; }
    void push(int f) { slot[tail++ % MAX_THREADS] = f; }
    int pop() { return slot[head++ % MAX_THREADS]; }
    void clear() { head = tail = 0; }
} ready, ahead;

// The warp that runs ahead of the others until its threads park at a block-wide barrier.
int leader = 0;
int block_warps = 1;
uint64_t launches = 0;   // launches so far, this one included
uint64_t block_seq = 0;  // the block's index in its launch
uint64_t releases = 0;   // block-wide releases so far in this block

// A new leader for the block's start or a block-wide release: a hash (splitmix64's finalizer)
// of the launch, the block and the release, so that the leader is unrelated to warp order.
void choose_leader() {
    uint64_t z = launches * 0x9e3779b97f4a7c15ull + block_seq * 0xbf58476d1ce4e5b9ull +
                 releases++ * 0x94d049bb133111ebull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    leader = (int)(z % (uint64_t)block_warps);
}

// Queues a released (or starting) fiber: the leader's ahead of everyone else.
void make_ready(int f) { (f >> 5 == leader ? ahead : ready).push(f); }

// Every switch is announced to AddressSanitizer (the bounds of the stack that runs next), as its
// fiber interface asks. A fiber switches straight to the next ready fiber; only when none is
// ready does control return to the scheduler.
#if defined(__SANITIZE_ADDRESS__)
const void* sched_bottom = nullptr;
size_t sched_size = 0;
void switch_to(Context& from, Context& to, const void* bottom, size_t size) {
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, bottom, size);
    jump(from, to);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
}
void entered_fiber() {
    const void* bottom;
    size_t size;
    __sanitizer_finish_switch_fiber(nullptr, &bottom, &size);
    // The first fiber ever entered is entered from the scheduler (the thread's own stack).
    if (!sched_bottom) {
        sched_bottom = bottom;
        sched_size = size;
    }
}
#else
const void* const sched_bottom = nullptr;
const size_t sched_size = 0;
void switch_to(Context& from, Context& to, const void*, size_t) { jump(from, to); }
void entered_fiber() {}
#endif

// The running fiber `self` gives way (parked at a barrier, or done): the next ready fiber runs,
// or the scheduler when none is. A fiber that is next in line itself just continues.
void give_way(int self) {
    Ready& q = ahead.empty() ? ready : ahead;
    if (q.empty()) {
        current = -1;
        switch_to(fibers[self].ctx, scheduler, sched_bottom, sched_size);
        return;
    }
    const int next = q.pop();
    current = next;
    threadIdx = fibers[next].tid;
    if (next != self) switch_to(fibers[self].ctx, fibers[next].ctx, fibers[next].stack.get(), STACK);
}

template <int N>
struct Barrier {
    int count = 0, arrived = 0;
    int waiting[N];
};

// Parks the running fiber at `b`; the last arrival releases everyone (itself included), in an
// order that alternates between releases. A block-wide release (N > 32) picks a new leader.
template <int N>
void wait(Barrier<N>& b) {
    const int self = current;
    b.waiting[b.arrived++] = self;
    if (b.arrived == b.count) {
        if (N > 32) choose_leader();
        if (reverse_next) {
            for (int i = b.count; i-- > 0;) make_ready(b.waiting[i]);
        } else {
            for (int i = 0; i < b.count; ++i) make_ready(b.waiting[i]);
        }
        reverse_next = !reverse_next;
        b.arrived = 0;
    }
    give_way(self);
}

Barrier<MAX_THREADS> block_bar;
// A shuffle's values: its lanes write, meet at the warp's barrier, then read. Successive shuffles
// alternate between two slot arrays, so a lane already writing the next shuffle's value cannot
// overwrite one a slower lane has still to read (it cannot get two shuffles ahead: the next
// barrier waits for that lane).
struct Warp {
    Barrier<32> bar;
    double slot[2][32];
};
Warp warps[MAX_THREADS / 32];

void (*body)() = nullptr;

// Every fiber's first frame: runs the kernel once per block it is resumed for.
void fiber_main() {
    entered_fiber();
    for (;;) {
        body();
        fibers[current].done = true;
        give_way(current);
    }
}

// Runs block number `seq` (of the current launch) of `nt` threads of `block` shape to completion.
void run_block(Dim3 block, int nt, uint64_t seq) {
    for (int w = 0; w < nt / 32; ++w) warps[w].bar = Barrier<32>{32, 0, {}};
    block_bar.count = nt;
    block_bar.arrived = 0;
    ready.clear();
    ahead.clear();
    block_warps = nt / 32;
    block_seq = seq;
    releases = 0;
    choose_leader();
    for (int t = 0; t < nt; ++t) {
        Fiber& f = fibers[t];
        if (!f.stack) {
            f.stack.reset(new char[STACK]);
            prepare(f.ctx, f.stack.get(), STACK, fiber_main);
        }
        f.tid = Dim3{(unsigned)t % block.x, (unsigned)t / block.x, 0};
        f.shuffles = 0;
        f.done = false;
        make_ready(t);
    }
    current = ahead.pop();
    threadIdx = fibers[current].tid;
    switch_to(scheduler, fibers[current].ctx, fibers[current].stack.get(), STACK);
    for (int t = 0; t < nt; ++t) {
        if (!fibers[t].done)
            fail(std::string(kernel_name) + ": deadlock: thread " + std::to_string(t) +
                 " waits at a barrier the rest of its block or warp never reaches");
    }
    current = -1;
}

}  // namespace emu

inline void __syncthreads() { emu::wait(emu::block_bar); }

template <class V>
V __shfl_xor_sync(unsigned, V v, int mask) {
    const int self = emu::current;
    emu::Warp& w = emu::warps[self / 32];
    double* slot = w.slot[emu::fibers[self].shuffles++ & 1];
    const int lane = self % 32;
    slot[lane] = (double)v;  // exact for float and double
    emu::wait(w.bar);
    return (V)slot[lane ^ mask];
}

#pragma GCC pop_options

// ---------------------------------- CUDA intrinsics ----------------------------------

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
// rcp.approx.ftz: subnormal inputs flush to zero, as on the GPU.
inline float ln_emu_rcp(float v) {
    if (std::fpclassify(v) == FP_SUBNORMAL) v = std::copysign(0.0f, v);
    float r = 1.0f / v;
    return std::isfinite(r) ? r * (1.0f + 0x1p-22f) : r;
}
inline double ln_emu_rcp(double v) {
    if (std::fpclassify(v) == FP_SUBNORMAL) v = std::copysign(0.0, v);
    double r = 1.0 / v;
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

// ---------------------------------- kernel registry ----------------------------------

enum Kind { FWD, BWD, GB_PARTIAL, GB_FINAL };
struct Entry {
    Kind kind;
    void* fn;
    bool rms, from_y;
};
static std::map<std::string, Entry>& registry() {
    static std::map<std::string, Entry> m;
    return m;
}
struct Reg {
    Reg(const char* name, Kind k, void* fn, bool rms, bool from_y) {
        registry()[name] = Entry{k, fn, rms, from_y};
    }
};
#define LN_REGISTER(kind, name, rms, from_y) \
    static Reg ln_reg_##name(#name, kind, (void*)&name, rms, from_y);

#include "layernorm.cu"

// ---------------------------------- the command loop ----------------------------------

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

// Argument access with signature checks.
enum Ptr { REQUIRED, OPTIONAL, ABSENT };
struct Args {
    const std::vector<Tok>& t;
    std::string kernel;
    void check_count(size_t n) const {
        if (t.size() != n)
            fail(kernel + ": expected " + std::to_string(n) + " arguments, got " +
                 std::to_string(t.size()));
    }
    std::string at(size_t i) const { return kernel + ": argument " + std::to_string(i); }
    bool is_null(size_t i) const { return t[i].kind == 'n'; }
    void* p(size_t i, Ptr rule) const {
        if (t[i].kind == 'n') {
            if (rule == REQUIRED) fail(at(i) + " may not be null");
            return nullptr;
        }
        if (rule == ABSENT) fail(at(i) + " must be null for this kernel");
        if (t[i].kind != 'b') fail(at(i) + " is no pointer");
        auto it = buffers.find((int)t[i].bits);
        if (it == buffers.end()) fail(at(i) + ": unknown buffer");
        return it->second.data();
    }
    uint64_t u(size_t i) const {
        if (t[i].kind != 'u') fail(at(i) + " is no u64");
        return t[i].bits;
    }
    int i32(size_t i) const {
        if (t[i].kind != 'i') fail(at(i) + " is no int");
        return (int)(int64_t)t[i].bits;
    }
    A s(size_t i) const {
        const char want = sizeof(A) == 8 ? 'd' : 'f';
        if (t[i].kind != want) fail(at(i) + " is not of the accumulation type");
        if (sizeof(A) == 8) return (A)__longlong_as_double((long long)t[i].bits);
        return (A)__uint_as_float((unsigned)t[i].bits);
    }
};

static Ptr when(bool c) { return c ? REQUIRED : ABSENT; }
static Ptr may(bool c) { return c ? OPTIONAL : ABSENT; }

using FwdFn = void (*)(const T*, const T*, T*, const T*, const T*, T*, A*, A*, u64, int, int, A,
                       int, A, A);
using BwdFn = void (*)(const T*, const T*, const T*, const A*, const A*, const T*, const T*, T*,
                       A*, u64, int, int, A, A);
using PartialFn = void (*)(const T*, const T*, const A*, const A*, const A*, const T*, const T*,
                           A*, A*, u64, int, u64, A);
using FinalFn = void (*)(const A*, const A*, T*, T*, int, int);

// Checks the arguments of one launch and binds them to a call of the kernel.
static void (*bind(const Entry& e, const Args& a))() {
    static std::vector<void*> p;
    static std::vector<double> s;
    static uint64_t rows;
    static int ints[3];
    static const Entry* entry;
    entry = &e;
    static const size_t counts[] = {15, 14, 13, 6};
    a.check_count(counts[e.kind]);
    const bool centre = !e.rms && !e.from_y;
    p.clear();
    s.clear();
    switch (e.kind) {
        case FWD: {
            const bool res = !a.is_null(1);
            const Ptr rules[] = {REQUIRED, OPTIONAL,  when(res), OPTIONAL,
                                 OPTIONAL, REQUIRED, when(!e.rms), REQUIRED};
            for (size_t i = 0; i < 8; ++i) p.push_back(a.p(i, rules[i]));
            rows = a.u(8);
            ints[0] = a.i32(9);
            ints[1] = a.i32(10);
            s.push_back(a.s(11));
            ints[2] = a.i32(12);
            s.push_back(a.s(13));
            s.push_back(a.s(14));
            return [] {
                ((FwdFn)entry->fn)((const T*)p[0], (const T*)p[1], (T*)p[2], (const T*)p[3],
                                   (const T*)p[4], (T*)p[5], (A*)p[6], (A*)p[7], rows, ints[0],
                                   ints[1], (A)s[0], ints[2], (A)s[1], (A)s[2]);
            };
        }
        case BWD: {
            const Ptr rules[] = {REQUIRED, REQUIRED, OPTIONAL,       when(centre), REQUIRED,
                                 OPTIONAL, may(e.from_y), REQUIRED, may(centre)};
            for (size_t i = 0; i < 9; ++i) p.push_back(a.p(i, rules[i]));
            rows = a.u(9);
            ints[0] = a.i32(10);
            ints[1] = a.i32(11);
            s.push_back(a.s(12));
            s.push_back(a.s(13));
            return [] {
                ((BwdFn)entry->fn)((const T*)p[0], (const T*)p[1], (const T*)p[2],
                                   (const A*)p[3], (const A*)p[4], (const T*)p[5],
                                   (const T*)p[6], (T*)p[7], (A*)p[8], rows, ints[0], ints[1],
                                   (A)s[0], (A)s[1]);
            };
        }
        case GB_PARTIAL: {
            const Ptr rules[] = {REQUIRED,      REQUIRED,       when(centre),
                                 when(!e.from_y), when(centre), may(e.from_y),
                                 may(e.from_y), OPTIONAL,       OPTIONAL};
            for (size_t i = 0; i < 9; ++i) p.push_back(a.p(i, rules[i]));
            if (!p[7] && !p[8]) fail(a.kernel + ": neither partial buffer is given");
            rows = a.u(9);
            ints[0] = a.i32(10);
            static uint64_t rpc;
            rpc = a.u(11);
            s.push_back(a.s(12));
            return [] {
                ((PartialFn)entry->fn)((const T*)p[0], (const T*)p[1], (const A*)p[2],
                                       (const A*)p[3], (const A*)p[4], (const T*)p[5],
                                       (const T*)p[6], (A*)p[7], (A*)p[8], rows, ints[0], rpc,
                                       (A)s[0]);
            };
        }
        case GB_FINAL: {
            const bool g = !a.is_null(0), b = !a.is_null(1);
            if (!g && !b) fail(a.kernel + ": neither gradient is wanted");
            const Ptr rules[] = {when(g), when(b), when(g), when(b)};
            for (size_t i = 0; i < 4; ++i) p.push_back(a.p(i, rules[i]));
            ints[0] = a.i32(4);
            ints[1] = a.i32(5);
            return [] {
                ((FinalFn)entry->fn)((const A*)p[0], (const A*)p[1], (T*)p[2], (T*)p[3], ints[0],
                                     ints[1]);
            };
        }
    }
    fail("unknown kernel kind");
}

static void launch(const std::string& name, Dim3 grid, Dim3 block, unsigned smem,
                   const std::vector<Tok>& toks) {
    auto it = registry().find(name);
    if (it == registry().end()) fail("no kernel `" + name + "`");
    const Args args{toks, name};
    emu::body = bind(it->second, args);
    emu::kernel_name = it->first.c_str();
    const int nt = (int)(block.x * block.y);
    if (nt <= 0 || nt > 1024 || nt % 32 != 0) fail(name + ": bad block size");
    gridDim = grid;
    blockDim = block;
    ++emu::launches;
    for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            std::vector<unsigned char> dyn(smem);
            ln_emu_dyn_smem = smem ? dyn.data() : nullptr;
            blockIdx = Dim3{bx, by, 0};
            emu::run_block(block, nt, (uint64_t)by * grid.x + bx);
        }
    }
}

int main() {
    std::ios::sync_with_stdio(false);
    std::string line;
    while (std::getline(std::cin, line)) {
        std::istringstream in(line);
        std::string cmd;
        if (!(in >> cmd)) continue;
        if (cmd == "buffer") {
            int id;
            size_t bytes;
            std::string fill;
            in >> id >> bytes >> fill;
            std::vector<unsigned char> b(bytes);
            if (fill == "data") {
                if (!std::cin.read((char*)b.data(), (std::streamsize)bytes))
                    fail("buffer " + std::to_string(id) + ": input ends before its data");
            } else if (fill != "zero") {
                fail("buffer: bad fill `" + fill + "`");
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
            in >> id;
            auto it = buffers.find(id);
            if (it == buffers.end()) fail("save: unknown buffer");
            std::cout << it->second.size() << '\n';
            std::cout.write((const char*)it->second.data(), (std::streamsize)it->second.size());
        } else if (cmd == "reset") {
            buffers.clear();
        } else if (cmd == "sync") {
            std::cout << "ok" << std::endl;
        } else {
            fail("unknown command `" + cmd + "`");
        }
    }
    return 0;
}
