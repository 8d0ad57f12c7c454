//! How outputs reach memory: ordinary or streaming (non-temporal) stores, staging of short rows,
//! prefetching.

use pulp::Simd;

/// Writes one vector; with `stream`, as a non-temporal store where the instruction set has one
/// (x86), so that an output larger than the caches is written without first being read in.
/// With `stream`, `dst` must be aligned to the vector's size (see [`stream_span`]).
#[inline(always)]
pub(super) fn put<S: Simd>(dst: &mut S::f32s, v: S::f32s, stream: bool) {
    #[cfg(target_arch = "x86_64")]
    if stream {
        use core::arch::x86_64::{_mm_stream_ps, _mm256_stream_ps, _mm512_stream_ps};
        let p = (dst as *mut S::f32s).cast::<f32>();
        debug_assert!(p.addr() % size_of::<S::f32s>() == 0);
        // SAFETY: `dst` is an exclusively borrowed vector, aligned to its size (the callers start
        // the streamed part of a row at an aligned element: `stream_span`, `Flush`). The sizes
        // match the transmuted types, and a vector of 64 / 32 / 16 bytes only exists under an
        // instruction set with AVX-512F / AVX / SSE, checked at run time by the dispatch that
        // chose `S`.
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

/// The part of an output row that is streamed, and whether anything is (not with vectors too
/// narrow to fill a line, nor in a row too short to hold a vector and end on a line): from the
/// row's first vector boundary to its last cache-line boundary. The elements before and after it
/// are written with ordinary stores.
///
/// A row's first and last lines are shared with its neighbours, and the order in which the two
/// store kinds reach such a line matters. An ordinary store into a line that streaming stores
/// have partly written is slow (the write-combining buffer is flushed as a partial line, and the
/// line is then read in), so a row ends its streaming on a line boundary; rows are written in
/// order, so a row may stream into its first line after the previous row's ordinary stores.
/// Those ordinary stores must read the shared line in first, and while they wait, every store
/// behind them waits too: the sweep asks for that line when it starts the row
/// ([`prefetch_line`], in `forward::fused_in`). Measured on the AMD Zen 3 VM, calls alternated
/// in one process, forward, one thread, against streaming to each row's last vector boundary
/// without the prefetch: y 16 bytes past a line (where a large `Vec` starts) 4096×768 +59%,
/// 3146×1000 +84%, 4096×1024 +17%, 16384×1024 +12% (two threads: 4096×1024 +17%,
/// 16384×1024 +14%); y 48 bytes past a line, where the old rule streamed each row's last half
/// line, ×1.7–2.8; y on a line, +5%. Streaming whole lines only, at both ends, measured 4–7%
/// behind this rule at 16 and 32 bytes past a line with the same prefetch, and 8–17% behind the
/// old rule without it.
#[inline(always)]
pub(super) fn stream_span<S: Simd>(y: &[f32], stream: bool) -> (core::ops::Range<usize>, bool) {
    let (len, w) = (y.len(), size_of::<S::f32s>() / 4);
    if !stream || w < 4 {
        return (0..0, false);
    }
    let head = y.as_ptr().align_offset(size_of::<S::f32s>()).min(len);
    // The last line boundary within the row, as an element index (`y` is 4-byte aligned).
    let end = (y.as_ptr().addr() + 4 * len) / 64 * 64;
    let end = (end.saturating_sub(y.as_ptr().addr()) / 4).max(head);
    (head..end, end > head)
}

/// Asks for `v`'s cache lines to be brought into L2 (a hint; nothing on other architectures).
#[inline(always)]
pub(super) fn prefetch<T>(v: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = v.as_ptr().cast::<u8>();
        let mut i = 0;
        while i < size_of_val(v) {
            // SAFETY: PREFETCHT1 is part of SSE (every x86_64 CPU); `p + i` lies inside `v`.
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T1 }>(
                    p.add(i).cast(),
                )
            }
            i += 64; // one cache line
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// How far ahead (in elements: 4 KiB of 16-bit rows) the pipelined 16-bit sweeps ask for the
/// rows they are about to sum (the `f32` forward's was the same 2048 elements, 8 KiB, until
/// [`FORWARD_AHEAD`]). The hardware prefetchers alone left the sweeps waiting
/// on those loads (AMD Zen 3, one thread: forward 16384×1024 8.4 → 11–12 GB/s; backward +8–20%
/// on the long shapes; distances from 1 to 16 KiB measured alike).
pub(super) const PREFETCH_AHEAD: usize = 2048;

/// The `f32` forward's sweep asks for the next row's lines this far ahead (in elements: 4 KiB).
/// Against [`PREFETCH_AHEAD`]'s 8 KiB, on the Intel AVX-512 VM (calls alternated in one process,
/// two pairs each): 4096×1024 +2–4%, 1024×4096 +2–6%, 256×16384 +5–9%, 16384×1024 even, two
/// threads alike (0–9%); on the AMD Zen 3 VM distances of 2–16 KiB had measured alike.
pub(super) const FORWARD_AHEAD: usize = 1024;

/// How far ahead (in `f32` elements: 4 KiB) the pipelined forward asks for the lines of `y` it is
/// about to write with ordinary stores. A store to a line not in L1 waits for the line to be read
/// in; the stores commit in order, so a few such misses fill the store queue and the whole sweep
/// stalls behind them (`perf`: half the samples on the instruction after the store). A read
/// prefetch suffices: a line no other core holds arrives writable. AMD Zen 3, one thread:
/// 4096×768 23 → 32 GB/s, 4096×1024 18 → 24–26, 1024×4096 22 → 24, 256×16384 21 → 24, and
/// steadier run to run; 2 KiB measured slightly lower, 8 KiB alike. Only for outputs of
/// `driver::PREFETCH_OUT_MIN_BYTES` and up: smaller ones are mostly in cache already.
pub(super) const OUT_AHEAD: usize = 1024;

/// How far ahead (in `f32` elements: 2 KiB) the long-row backward asks for the lines of the rows
/// it sums (x, dy) and of the dx it writes. Against 8 KiB for x and dy and no prefetch of dx,
/// medians of interleaved runs on the AMD Zen 3 VM, one thread: 4096×768 +3%, 1024×4096 +8%,
/// 4096×1024 +8%, 256×16384 +12%, 16384×1024 +7%. (1 KiB measured alike, with ordinary stores
/// for dx; where dx is streamed, it is staged in L1 and the prefetch finds it there.)
pub(super) const BACK_AHEAD: usize = 512;

/// Elements of output the long-row kernels stage before they stream them out as one span (rows
/// shorter than this are staged several together; see [`Spans`]); twice this with `burst`.
///
/// 4 KiB: a row of 1024 is then a span of its own, written a piece after each block of the next
/// sweep (`Spans::next`) rather than half a two-row span, 64 streaming stores in one run, after
/// each sweep. The longer runs filled the write-combining buffers while the sweep's loads
/// waited behind them. Intel AVX-512 VM, calls of each kind several in a row, one process:
/// backward 16384×1024 +5–9% (two threads +8–15%), 21845×768 +7%, 32768×512 +2%; rows of 64–256
/// and the forward's short rows (its only spans) even. `burst` (narrower vectors, measured ahead
/// on the AMD Zen 3 VM with 8 KiB spans) keeps 8 KiB: not measured again.
pub(super) const STAGED_SPAN: usize = 1024;

/// Asks for the cache line holding `p` to be brought into L1 (a hint: `p` may point anywhere,
/// even outside any allocation, since a prefetch never faults).
#[inline(always)]
pub(super) fn prefetch_line(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is part of SSE (every x86_64 CPU) and never faults.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
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

/// `dst = src` (same length), the whole cache lines of `dst` written with streaming stores and
/// its ends with ordinary ones ([`Flush`]): how a staged chunk of output that is larger than the
/// caches in all (a fused residual forward's h, a staged backward's dx) reaches memory without
/// each line being read in first. The caller fences ([`stream_fence`]) before its task ends.
pub(crate) fn stream_copy(src: &[f32], dst: &mut [f32]) {
    struct Copy<'a>(&'a [f32], &'a mut [f32]);
    impl pulp::WithSimd for Copy<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) {
            let Copy(src, dst) = self;
            let len = src.len().min(dst.len());
            Flush::new::<S>(dst, 0..len).finish(simd, src, dst);
        }
    }
    crate::isa::dispatch(Copy(src, dst))
}

/// A staging buffer for `len` elements of output, and the offset of its first 64-byte-aligned
/// element, where the staged span starts.
pub(super) fn staging(len: usize) -> (Vec<f32>, usize) {
    // Each thread keeps its buffer between calls: the short-row kernels run once per block of
    // rows, and a fresh zeroed buffer each time cost a pass of its own (and an allocation).
    let mut buf = STAGING.with(|s| s.take());
    if buf.len() < len + 16 {
        buf.resize(len + 16, 0.0);
    }
    let off = crate::driver::to_line(&buf);
    (buf, off)
}

/// Gives a staging buffer back to this thread for its next call (see [`staging`]).
pub(super) fn unstage(stage: Option<(Vec<f32>, usize)>) {
    if let Some((buf, _)) = stage {
        STAGING.with(|s| s.replace(buf));
    }
}

thread_local! {
    static STAGING: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Streamed output of the long-row kernels staged in L1 a step at a time (a sweep's row or rows)
/// and written out a span of steps at a time, each span about [`STAGED_SPAN`] elements, in whole
/// cache lines: the line two consecutive spans share is completed by the second and streamed
/// whole ([`Flush::finish_joined`]), so only a task's two ends are written with ordinary stores,
/// where rows streamed one by one had two partial lines in every row (512-byte rows 16 bytes off
/// a line ran at half speed).
/// Double-buffered, a full span is written during the next one, a share after each step (one
/// step a span: the step writes it itself, see [`Spans::next`]); with `burst`, right when it is
/// full, from a single buffer.
pub(super) struct Spans {
    buf: Vec<f32>,
    off: usize,
    /// Elements per step, steps per span, and each half of `buf` (a span, to a whole vector).
    step: usize,
    per: usize,
    half: usize,
    burst: bool,
    /// The half being filled, its steps staged so far, and where in y its span starts.
    cur: usize,
    slot: usize,
    first: usize,
    /// The full span not yet written (in the other half).
    pending: Option<Flush>,
    /// The last written span's elements past its last line boundary, held back for the next.
    carry: Carry,
}

impl Spans {
    pub(super) fn new(step: usize, burst: bool) -> Spans {
        let span = if burst { 2 * STAGED_SPAN } else { STAGED_SPAN };
        let per = (span / step.max(1)).max(1);
        let half = (per * step).next_multiple_of(16);
        let (buf, off) = staging(if burst { half } else { 2 * half });
        let carry = Carry::default();
        Spans { buf, off, step, per, half, burst, cur: 0, slot: 0, first: 0, pending: None, carry }
    }

    /// Where the next step is staged; with one step a span, also the pending span and its
    /// staged source, for the step to write as it goes.
    #[inline(always)]
    pub(super) fn next(&mut self) -> (&mut [f32], Option<(&mut Flush, &[f32])>) {
        let (a, b) = self.buf[self.off..].split_at_mut(self.half);
        let (out, prev) = if self.cur == 0 { (a, &*b) } else { (b, &*a) };
        let at = self.slot * self.step;
        let pending = if self.per == 1 { self.pending.as_mut().map(|f| (f, prev)) } else { None };
        (&mut out[at..at + self.step], pending)
    }

    /// After a step staged where [`Spans::next`] said: a share of the pending span written to
    /// `y`; a full span made pending (or written, `burst`).
    #[inline(always)]
    pub(super) fn staged<S: Simd>(&mut self, simd: S, y: &mut [f32]) {
        self.slot += 1;
        let prev = &self.buf[self.off + (self.cur ^ 1) * self.half..];
        if let Some(f) = self.pending.as_mut() {
            f.write(simd, prev, y, f.body * self.slot / self.per);
        }
        if self.slot == self.per {
            if let Some(f) = self.pending.take() {
                f.finish_joined(simd, prev, y, &mut self.carry, true);
            }
            let end = self.first + self.per * self.step;
            let f = Flush::joined::<S>(y, self.first..end);
            if self.burst {
                f.finish_joined(simd, &self.buf[self.off..], y, &mut self.carry, true);
            } else {
                self.pending = Some(f);
                self.cur ^= 1;
            }
            (self.slot, self.first) = (0, end);
        }
    }

    /// Writes everything still staged — the pending span, then the steps staged since — and
    /// gives the buffer back to the thread.
    #[inline(always)]
    pub(super) fn finish<S: Simd>(self, simd: S, y: &mut [f32]) {
        let Spans { buf, off, step, half, cur, slot, first, pending, mut carry, .. } = self;
        if let Some(f) = pending {
            f.finish_joined(simd, &buf[off + (cur ^ 1) * half..], y, &mut carry, slot > 0);
        }
        if slot > 0 {
            let f = Flush::joined::<S>(y, first..first + slot * step);
            f.finish_joined(simd, &buf[off + cur * half..], y, &mut carry, false);
        }
        carry.write(y);
        unstage(Some((buf, off)));
    }
}

/// A staged span of output (`src`, hot in L1) being written to `y[span]` in pieces: streaming
/// stores for the span's whole cache lines, ordinary stores for its ends.
pub(super) struct Flush {
    pub(super) span: core::ops::Range<usize>,
    /// Elements before the first cache-line boundary.
    pub(super) head: usize,
    /// The streamed vectors (whole lines from `head` on), and how many are written.
    pub(super) body: usize,
    pub(super) done: usize,
}

impl Flush {
    #[inline(always)]
    pub(super) fn new<S: Simd>(y: &[f32], span: core::ops::Range<usize>) -> Flush {
        // The span's last line, when it is shared with the next span, is written with ordinary
        // stores by `finish`: a store that misses waits for the line to be read from memory, and
        // every store behind it waits too. Asked for here, a span (or a group's sweep) before
        // it is needed. Measured on the Intel AVX-512 VM (calls alternated in one process, one
        // thread, y 16 bytes past a line): 131072×128 forward +7%, backward +6%; 65536×128
        // streamed +2–3%; 16384×1024 even.
        let f = Flush::joined::<S>(y, span);
        if f.span.len() > f.head && !(f.span.len() - f.head).is_multiple_of(16) {
            prefetch_line(&y[f.span.end - 1]);
        }
        f
    }

    /// [`Flush::new`] for a span of [`Spans`], whose last line, shared with the next span, is
    /// written by that span in one streaming store (see [`Flush::finish_joined`]) and so not
    /// asked for: prefetched, a line the streaming store then replaces is read for nothing and
    /// evicted again (16384×1024 backward, dx 16 bytes past a line: +3–6% without it).
    #[inline(always)]
    pub(super) fn joined<S: Simd>(y: &[f32], span: core::ops::Range<usize>) -> Flush {
        // The streamed part covers whole cache lines only: a line written partly by streaming
        // stores and partly by ordinary ones (the neighbouring span's end) cost more than
        // ordinary stores of the whole line (AMD Zen 3, 65536×128 backward: the ends' copies
        // were 8% of the time with spans streamed from a vector boundary; line-aligned spans
        // gained 10–20% on the short-row forward and backward, one and two threads).
        let w = size_of::<S::f32s>() / 4;
        let head = y[span.clone()].as_ptr().align_offset(64).min(span.len());
        let per_line = (64 / size_of::<S::f32s>()).max(1);
        let stream = w >= 4 && span.len() >= 2 * w;
        let body = if stream { (span.len() - head) / w / per_line * per_line } else { 0 };
        Flush { span, head, body, done: 0 }
    }

    /// Writes the aligned vectors up to `upto` (of `body`).
    #[inline(always)]
    pub(super) fn write<S: Simd>(&mut self, _simd: S, src: &[f32], y: &mut [f32], upto: usize) {
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
    pub(super) fn finish<S: Simd>(mut self, simd: S, src: &[f32], y: &mut [f32]) {
        self.write(simd, src, y, self.body);
        let (h, len) = (self.head, self.span.len());
        let dst = &mut y[self.span.clone()];
        if self.body == 0 {
            dst.copy_from_slice(&src[..len]);
            return;
        }
        // The head with ordinary scalar stores (`pulp`'s masked store is an out-of-line call).
        dst[..h].copy_from_slice(&src[..h]);
        let tail = h + self.body * (size_of::<S::f32s>() / 4);
        dst[tail..].copy_from_slice(&src[tail..len]);
    }
}

impl Flush {
    /// [`Flush::finish`] for consecutive spans of one task: a span's head completes the line
    /// that the span before it shares with it (its elements held in `carry`), and that line goes
    /// out in one streaming store; with `more` (another span follows) this span's elements past
    /// its last line boundary are held in `carry` in turn. Each such line was otherwise written
    /// by two ordinary stores a span apart, each of which first read it from memory.
    #[inline(always)]
    pub(super) fn finish_joined<S: Simd>(
        mut self,
        simd: S,
        src: &[f32],
        y: &mut [f32],
        carry: &mut Carry,
        more: bool,
    ) {
        self.write(simd, src, y, self.body);
        let (h, len, start) = (self.head, self.span.len(), self.span.start);
        if self.body == 0 {
            carry.write(y);
            y[self.span.clone()].copy_from_slice(&src[..len]);
            return;
        }
        // A body of whole lines makes the span at least a line long: it has 16 first and 16
        // last values.
        let src = &src[..len];
        let (Some(first16), Some(last16)) = (src.first_chunk(), src.last_chunk()) else {
            unreachable!("a streamed span is at least a line long")
        };
        carry.join::<S>(y, start, first16, h);
        let tail = h + self.body * (size_of::<S::f32s>() / 4);
        if more {
            carry.hold(start + tail, len - tail, last16);
        } else {
            y[start + tail..self.span.end].copy_from_slice(&src[tail..len]);
        }
    }
}

/// The elements of a streamed row or span past its last line boundary (fewer than a line), not
/// yet written: the next one's head completes their line (see [`Carry::join`]).
#[derive(Default)]
pub(super) struct Carry {
    /// The held elements are the last `len` of `vals`.
    vals: [f32; 16],
    len: usize,
    /// Where in y they go.
    at: usize,
}

impl Carry {
    /// Writes the held elements with ordinary stores (nothing follows to complete their line).
    #[inline(always)]
    pub(super) fn write(&mut self, y: &mut [f32]) {
        if self.len > 0 {
            y[self.at..self.at + self.len].copy_from_slice(&self.vals[16 - self.len..]);
            self.len = 0;
        }
    }

    /// Holds the last `len` (fewer than a line, from a line boundary) of `last16` (a row's or
    /// span's last 16 values), bound for `y[at..]`.
    #[inline(always)]
    pub(super) fn hold(&mut self, at: usize, len: usize, last16: &[f32; 16]) {
        debug_assert_eq!(self.len, 0, "held elements dropped");
        self.vals = *last16;
        (self.len, self.at) = (len, at);
    }

    /// Writes the first `p` of `first16` (the next row's or span's first 16 values), bound for
    /// `y[at..]` and ending on a line boundary: where the held elements end at `at` and with
    /// them fill the line, the line goes out in one streaming store (64-byte aligned vectors);
    /// otherwise both with ordinary stores. The line is read from `[held | first16]` at
    /// 16 − len: two fixed-size copies and one load, no element-wise assembly.
    #[inline(always)]
    pub(super) fn join<S: Simd>(
        &mut self,
        y: &mut [f32],
        at: usize,
        first16: &[f32; 16],
        p: usize,
    ) {
        let len = self.len;
        if len > 0 && len + p == 16 && self.at + len == at {
            let mut both = [0f32; 32];
            both[..16].copy_from_slice(&self.vals);
            both[16..].copy_from_slice(first16);
            let line = &both[16 - len..32 - len];
            let dst = S::as_mut_simd_f32s(&mut y[self.at..self.at + 16]).0;
            for (d, &v) in dst.iter_mut().zip(S::as_simd_f32s(line).0) {
                put::<S>(d, v, true);
            }
            self.len = 0;
        } else {
            self.write(y);
            y[at..at + p].copy_from_slice(&first16[..p]);
        }
    }
}

#[cfg(feature = "unit-tests")]
#[doc(hidden)]
pub mod tests {
    use super::*;

    /// `stream_span`'s contract, which the bitwise tests cannot see (any split gives the same
    /// values) but speed depends on: the span starts at the row's first vector boundary and ends
    /// at its last line boundary, so no line is streamed in part.
    fn check<S: Simd>(_: S, isa: &str) {
        let w = size_of::<S::f32s>() / 4;
        let buf = vec![0f32; 400 + 16];
        for phase in 0..16 {
            for len in [0usize, 1, 7, 8, 15, 16, 17, 31, 32, 33, 100, 255, 256, 257, 400] {
                let y = &buf[phase..phase + len];
                assert_eq!(stream_span::<S>(y, false), (0..0, false));
                let (span, stream) = stream_span::<S>(y, true);
                let at = |i: usize| y.as_ptr().addr() + 4 * i;
                let what = format!("{isa}, phase {phase}, len {len}: {span:?}");
                if w < 4 {
                    assert!(!stream, "{what}");
                    continue;
                }
                // A line boundary at or after the first vector boundary, with a whole vector
                // before it, exists exactly when something is streamed.
                let first = y.as_ptr().align_offset(4 * w);
                let lines = (first..=len).filter(|&i| at(i) % 64 == 0 && i >= first + w);
                assert_eq!(stream, lines.clone().next().is_some(), "{what}");
                if stream {
                    assert_eq!(span.start, first, "{what}");
                    assert_eq!(span.end, lines.max().unwrap_or(0), "{what}");
                    assert_eq!(at(span.start) % (4 * w), 0, "{what}");
                    assert!(len - span.end < 16, "{what}");
                }
            }
        }
    }

    pub fn streamed_spans_start_on_a_vector_and_end_on_a_line() {
        for_each_isa!(simd, isa => {
            check(simd, isa);
        });
    }
}
