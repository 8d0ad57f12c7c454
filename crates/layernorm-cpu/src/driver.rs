//! Spreading rows over threads, and the deterministic reduction of dγ/dβ.
//!
//! - Forward rows are independent: rows are cut into tasks of at least [`TASK_ELEMS`] elements,
//!   at most eight per pool thread.
//! - Backward rows are grouped in fixed blocks of [`ROW_BLOCK`] rows. Each block sums its rows'
//!   dy·x̂ and dy into its own partial vectors, in row order, in the accumulation type; the partials
//!   are then summed in block order in `f64` and rounded once to the storage type. Block
//!   boundaries do not depend on the thread count, so dγ/dβ are bitwise identical for any pool.
//! - Problems smaller than [`PARALLEL_MIN_ELEMS`] run on the calling thread, without rayon.

use std::any::TypeId;

use layernorm_core::{Error, Result, try_zeroed_vec};
use num_traits::{One, Zero};
use rayon::prelude::*;

use crate::element::{CpuElement, load_param};
use crate::row::{self, Epilogue, Kind, Real, Spec};
use crate::{simd, stage};

/// Rows per block of the dγ/dβ partial sums. Fixed: it defines the summation order.
pub const ROW_BLOCK: usize = 32;
/// Elements per parallel task (forward), or per group of row blocks (backward): the least; see
/// [`rows_per_task`] and [`blocks_per_task`].
pub(crate) const TASK_ELEMS: usize = 1 << 15;
/// Below this many elements (1 MiB of `f32`), everything runs on the calling thread: handing a
/// call to a pool and back costs wake-ups of sleeping threads, ~8 µs on the AMD Zen 3 VM but
/// ~50–80 µs on the Intel AVX-512 VM. There, with 2¹⁶ here and a two-thread pool, calls of 64 K
/// to 196 K elements ran 1.2–7× slower than on the calling thread alone (64×1024 forward 7 GB/s
/// against 50, backward 9 against 38; 192×1024 forward 19 against 49; alternated in one process),
/// while from 2¹⁸ (256×1024) the pool was even or ahead (forward 47–51 against 46, backward 45–54
/// against 35). On the Zen 3 VM the pool would have been ahead below 2¹⁸ by its hand-off's
/// smaller share; the larger threshold bounds the loss there instead of a several-fold one here.
pub(crate) const PARALLEL_MIN_ELEMS: usize = 1 << 18;

/// With `Stores::Auto`, calls whose output (y, or dx) is at least this many bytes write it with
/// non-temporal (streaming) stores: with the inputs it cannot stay in cache anyway, and ordinary
/// stores would first read every output line from memory (one more stream of traffic). Below it,
/// the output is left in cache for whoever reads it next.
///
/// Half the last-level cache the operating system reports — then the input and the output of the
/// same size fill it — but no less than 16 MiB and no more than 32 MiB, the ends measured on two
/// machines (`docs/performance.md`):
/// - an AMD Zen 3 VM with a 32 MiB L3 (reported as such): streaming ahead at 16 MiB (forward
///   +2–16% on one thread over five shapes, the backward's dx +12–13%), behind by 6–27% at 8–12
///   MiB (calls of the two kinds alternated one by one);
/// - an Intel VM with AVX-512 that reports the host's 480 MiB L3, shared with its neighbours:
///   with each store kind run several calls in a row (its steady state; alternated call by call,
///   each cached call first paid for the lines the streamed one had evicted), ordinary stores
///   ahead at 32–48 MiB outputs (forward one thread +14–25%, two +11–21%; backward one thread
///   +5–11%, two +18% at 32 MiB and even at 48); at 64 MiB streaming ahead in the backward
///   (+3–8%) and in the forward at one thread (+5%), behind at two (−13%), and in the paired
///   bench ordinary stores lost the forward there at both (0.71–0.72 of the bar against
///   0.82–0.85). That steady state is the best case for ordinary stores: the output is still
///   in cache from the call before. In the paired bench, which alternates each call kind with
///   bars that evict it, 65536×128 (32 MiB) with ordinary stores was bimodal — 0.97–0.99 of
///   the bar right after itself, 0.80–0.83 right after the bars, the medians 0.80–0.84 at one
///   thread — while streamed it read a steady 0.87–0.90 (backward 0.77–0.79 against 0.82–0.83);
///   at two threads ordinary stores stayed ahead (forward 0.85–0.91 against 0.82–0.84). An
///   output of 32 MiB is warm only when nothing ran between two calls, so from 32 MiB the
///   steady choice streams.
///
/// Without a report (other systems), 16 MiB.
pub(crate) fn stream_min_bytes() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| last_level_cache().map_or(16 << 20, stream_min_for))
}

/// [`stream_min_bytes`] for a last-level cache of `cache` bytes.
fn stream_min_for(cache: usize) -> usize {
    (cache / 2).clamp(16 << 20, 32 << 20)
}

/// The size of the first CPU's level-3 unified cache, as Linux reports it in sysfs.
fn last_level_cache() -> Option<usize> {
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let read = |f: &str| std::fs::read_to_string(e.path().join(f)).ok();
        let unified = read("type")?.trim() == "Unified";
        (unified && read("level")?.trim() == "3").then(|| cache_size(&read("size")?)).flatten()
    })
}

/// A sysfs cache size (`"32768K"`, `"32M"`, `"1G"`, or bytes) in bytes.
fn cache_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (digits, unit) = match s.char_indices().last()? {
        (i, 'K') => (&s[..i], 1 << 10),
        (i, 'M') => (&s[..i], 1 << 20),
        (i, 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<usize>().ok()?.checked_mul(unit)
}

/// Forwards writing at least this many bytes of y with ordinary stores ask for y's lines ahead
/// of the sweep (see `reduce::store::OUT_AHEAD`). Below it y is mostly still in cache from the
/// previous call, and the prefetches only cost instructions: measured on the AMD Zen 3 VM (one
/// thread, interleaved runs), prefetching lost 4–7% at outputs of 0.8–6 MiB and won 8–38% from
/// 8 MiB up (4096×768: 23 → 31 GB/s, 32768×128: 15 → 18).
pub(crate) const PREFETCH_OUT_MIN_BYTES: usize = 8 << 20;

/// How a forward writes y (decided once per call, from the whole output's size; the values are
/// bitwise the same either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Out {
    /// Ordinary stores.
    Cached,
    /// Ordinary stores, y's lines prefetched ahead of the sweep.
    Prefetched,
    /// Non-temporal stores (where the instruction set has them).
    Streamed,
}

impl Out {
    /// Streamed if `stream`, else prefetched from [`PREFETCH_OUT_MIN_BYTES`] of output up.
    pub(crate) fn new(stream: bool, out_bytes: usize) -> Out {
        match (stream, out_bytes >= PREFETCH_OUT_MIN_BYTES) {
            (true, _) => Out::Streamed,
            (false, true) => Out::Prefetched,
            (false, false) => Out::Cached,
        }
    }

    /// Whether y is written with streaming stores.
    pub(crate) fn stream(self) -> bool {
        self == Out::Streamed
    }

    /// Whether y's lines are prefetched ahead of ordinary stores.
    pub(crate) fn prefetch(self) -> bool {
        self == Out::Prefetched
    }
}

/// Block `b`'s dγ and dβ partials (those `want`ed) in a buffer laid out per block as
/// `[dγ (n) | dβ (n)]` at `2·n·b`; `(None, None)` without a buffer.
#[inline(always)]
pub(crate) fn block_partials<A>(
    partials: Option<&mut [A]>,
    n: usize,
    b: usize,
    want: (bool, bool),
) -> (Option<&mut [A]>, Option<&mut [A]>) {
    match partials {
        Some(p) => {
            let (g, bb) = p[2 * n * b..2 * n * (b + 1)].split_at_mut(n);
            (want.0.then_some(g), want.1.then_some(bb))
        }
        None => (None, None),
    }
}

/// A zeroed buffer with room for `len` elements from a cache-line (64-byte) boundary on, and the
/// index of that boundary ([`Error::OutOfMemory`] where it cannot be had). The backward's dγ/dβ
/// partials start there (with N a multiple of 16, every block's partials do too): the allocator
/// gives 16-byte alignment (a large buffer comes from `mmap`, 16 bytes past a page), and then
/// every other 32-byte vector of the kernels' read-modify-write of the partials straddled two
/// lines. One thread, AMD Zen 3, interleaved runs: 4096×768 backward 20.8 → 22.6 GB/s,
/// 256×16384 16.5 → 18.9, 1024×4096 18.2 → 19.7.
fn zeroed_on_line<A: Real>(len: usize) -> Result<(Vec<A>, usize)> {
    let slack = 64 / size_of::<A>();
    let store = try_zeroed_vec("dgamma/dbeta partials", len.saturating_add(slack))?;
    let start = to_line(&store);
    Ok((store, start))
}

/// An empty vector with room for `len` elements ([`Error::OutOfMemory`] where it cannot be had).
pub(crate) fn try_with_capacity<T>(what: &'static str, len: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::OutOfMemory {
        tensor: what,
        bytes: len.saturating_mul(size_of::<T>()),
    })?;
    Ok(v)
}

/// How many elements from the start of `v` to its first cache-line (64-byte) boundary: at most
/// a line's worth, the slack a buffer needs to hold its data from a line on.
pub(crate) fn to_line<T>(v: &[T]) -> usize {
    v.as_ptr().align_offset(64).min(64 / size_of::<T>().max(1))
}

/// Whether a problem of `numel` elements is spread over threads (else it runs on the caller).
pub(crate) fn is_parallel(numel: usize) -> bool {
    numel >= PARALLEL_MIN_ELEMS
}

/// Rows per forward task: at least [`TASK_ELEMS`] elements, and no more tasks than eight per
/// thread of the pool. Each task pipelines its rows, but its first row is summed alone and its
/// last normalized alone (no overlap), so with few rows per task — long rows — that cost showed
/// (256×16384 came in tasks of two rows). Rows are independent: the split does not change
/// any result.
fn rows_per_task(n: usize, rows: usize) -> usize {
    let tasks = 8 * rayon::current_num_threads();
    (TASK_ELEMS / n).max(rows.div_ceil(tasks)).max(1)
}

/// Row blocks per backward task (a group): the forward's rule ([`rows_per_task`]) in whole
/// blocks. Each group pipelines its rows but starts by summing its first row alone, and when dx
/// is streamed it ends by writing out what it staged and waiting for its streaming stores
/// (`store::stream_fence`). Groups of one block (32 rows, all that [`TASK_ELEMS`] asked for from
/// N = 1024 up) paid that 512 times over 16384×1024: in eight groups a thread, on the Intel
/// AVX-512 VM (calls alternated in one process), 16384×1024 +5–8% on one thread, +5–14% on two,
/// 32768×512 +3% / +8%, the other benchmark shapes even to +4%. Which group a block falls in
/// does not change any result: each block's partials gain its own rows' terms in row order.
fn blocks_per_task(n: usize, blocks: usize) -> usize {
    rows_per_task(ROW_BLOCK * n, blocks)
}

/// γ and β (the latter absent in the backward), in the accumulation type.
type Params<'a, A> = (Option<&'a [A]>, Option<&'a [A]>);

/// The mean the kernels write (LayerNorm: the caller's) or read (a scratch of zeros: RMSNorm
/// has none to save or read, and its rows are centred on 0).
fn mean_or_zeros<'a, A: Real>(
    mean: Option<&'a mut [A]>,
    rows: usize,
    scratch: &'a mut Vec<A>,
) -> Result<&'a mut [A]> {
    match mean {
        Some(m) => Ok(m),
        None => {
            *scratch = try_zeroed_vec("mean", rows)?;
            Ok(&mut scratch[..])
        }
    }
}

/// Where a fused residual forward reads its residual and writes h (`docs/math.md` (14)).
pub(crate) enum Residual<'a, T> {
    /// The residual read from one buffer, h written to another.
    Add { residual: &'a [T], h: &'a mut [T] },
    /// One buffer holding the residual on entry and h on return.
    InPlace(&'a mut [T]),
}

/// Bytes of a staged chunk of rows (per staged stream: the forward's h, the backward's x̂, dy
/// and dx): whole rows that stay in L1/L2 between the staging sweep and the kernels' sweeps.
pub(crate) const STAGE_BYTES: usize = 256 << 10;

/// Rows per staged chunk of the forward (rows of `n` elements of `size` bytes): about
/// [`STAGE_BYTES`], at least one row.
fn stage_rows(n: usize, size: usize) -> usize {
    (STAGE_BYTES / n.saturating_mul(size).max(1)).max(1)
}

/// Rows per staged chunk of the backward, in the accumulation type `A`: about [`STAGE_BYTES`],
/// and either whole blocks of [`ROW_BLOCK`] rows or a power of two below it, so that no chunk
/// holds part of a block beside rows of another (each block's partials then gain their rows'
/// terms in row order, as unstaged).
fn stage_back_rows<A>(n: usize) -> usize {
    let rows = stage_rows(n, size_of::<A>());
    if rows >= ROW_BLOCK { rows / ROW_BLOCK * ROW_BLOCK } else { 1 << rows.ilog2() }
}

/// Forward over contiguous rows (`spec.rows` of `spec.n`; `mean` for the kinds that save one),
/// of x or, with `residual`, of h = x + residual (`docs/math.md` (14)): h is formed a chunk of
/// rows at a time ([`residual_rows`]) and the kernels run on it unchanged, so y and the
/// statistics are bitwise those of a forward of the stored h. Lengths are validated by the
/// caller.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<T: CpuElement>(
    n: usize,
    (spec, gamma_offset): (Spec, f64),
    x: &[T],
    residual: Option<Residual<'_, T>>,
    gamma: Option<&[T]>,
    beta: Option<&[T]>,
    y: &mut [T],
    mean: Option<&mut [T::Acc]>,
    rstd: &mut [T::Acc],
    out: Out,
) -> Result<()> {
    let gamma = load_param("gamma", gamma, T::Acc::of(gamma_offset))?;
    let beta = load_param("beta", beta, T::Acc::zero())?;
    let (gamma, beta) = (gamma.as_deref(), beta.as_deref());
    let mut zeros = Vec::new();
    let mean = mean_or_zeros(mean, rstd.len(), &mut zeros)?;
    let plain = |x: &[T], y: &mut [T], m: &mut [T::Acc], s: &mut [T::Acc]| {
        simd::forward_rows(n, spec, x, gamma, beta, y, m, s, out);
        forward_exact_rows(n, spec, x, (gamma, beta), y, s)
    };
    let (res, h) = match residual {
        None => (None, None),
        Some(Residual::Add { residual, h }) => (Some(residual), Some(h)),
        Some(Residual::InPlace(h)) => (None, Some(h)),
    };
    // h is streamed with y, where it goes to a buffer of its own (in place, its lines were just
    // read with the residual, and are written back from cache).
    let stream_h = out.stream() && res.is_some();
    let task = |row: usize, y: &mut [T], h: Option<&mut [T]>, m: &mut [T::Acc], s| {
        let e = row * n..(row + m.len()) * n;
        match h {
            None => plain(&x[e], y, m, s),
            Some(h) => {
                let r = res.map(|r| &r[e.clone()]);
                residual_rows(n, (&x[e], r, h), y, m, s, stream_h, &plain)
            }
        }
    };
    if !is_parallel(x.len()) {
        return task(0, y, h, mean, rstd);
    }
    let per = rows_per_task(n, mean.len());
    let tasks = mean.len().div_ceil(per);
    let hs = match h {
        Some(h) => rayon::iter::Either::Left(h.par_chunks_mut(per * n).map(Some)),
        None => rayon::iter::Either::Right((0..tasks).into_par_iter().map(|_| None)),
    };
    y.par_chunks_mut(per * n)
        .zip(hs)
        .zip(mean.par_chunks_mut(per))
        .zip(rstd.par_chunks_mut(per))
        .enumerate()
        .try_for_each(|(t, (((y, h), m), s))| task(t * per, y, h, m, s))
}

/// One forward task's rows with a residual: h = x + residual (`residual` absent: `h` holds it)
/// rounded once (`stage::add`), a chunk of whole rows at a time that stays in cache
/// ([`stage_rows`]), each chunk then normalized by `plain` from the h it holds. h goes straight
/// into its output (ordinary stores: in place, over the lines of the residual the sweep has just
/// read), or with `stream_h` into a scratch chunk that the kernels read and that is then streamed
/// out (`stage::copy_same`). DRAM traffic stays: read x and the residual, write h and y.
#[allow(clippy::type_complexity)]
fn residual_rows<T: CpuElement>(
    n: usize,
    (x, residual, h): (&[T], Option<&[T]>, &mut [T]),
    y: &mut [T],
    mean: &mut [T::Acc],
    rstd: &mut [T::Acc],
    stream_h: bool,
    plain: &impl Fn(&[T], &mut [T], &mut [T::Acc], &mut [T::Acc]) -> Result<()>,
) -> Result<()> {
    let rows = mean.len().min(rstd.len());
    let per = stage_rows(n, size_of::<T>());
    let stream_h = stream_h && residual.is_some();
    let mut scratch: Vec<T> = if stream_h {
        try_zeroed_vec("h (a staged chunk)", per.min(rows) * n)?
    } else {
        Vec::new()
    };
    for start in (0..rows).step_by(per) {
        let r = start..(start + per).min(rows);
        let e = r.start * n..r.end * n;
        let (yc, m, s) = (&mut y[e.clone()], &mut mean[r.clone()], &mut rstd[r]);
        let (xc, rc, hc) = (&x[e.clone()], residual.map(|v| &v[e.clone()]), &mut h[e.clone()]);
        if stream_h {
            let buf = &mut scratch[..e.len()];
            stage::add(xc, rc, buf);
            plain(buf, yc, m, s)?;
            stage::copy_same(buf, hc, true);
        } else {
            stage::add(xc, rc, hc);
            plain(hc, yc, m, s)?;
        }
    }
    if stream_h {
        crate::reduce::stream_fence();
    }
    Ok(())
}

/// The rows whose rstd overflowed the accumulation type (+inf: var + ε below ~8.6e-78 with `f32`
/// accumulation, so ε below that on a constant row), where the kernels' x̂ = (x − μ)·rstd would
/// make 0·∞, or lies below `f32`'s smallest normal (var + ε above 2^252), where that product
/// keeps only some of rstd's bits: normalized again in `f64` (`row::forward_exact_row`). The
/// saved statistics stay the kernels'.
fn forward_exact_rows<T: CpuElement>(
    n: usize,
    spec: Spec,
    x: &[T],
    params: Params<'_, T::Acc>,
    y: &mut [T],
    rstd: &[T::Acc],
) -> Result<()> {
    let (gamma, beta) = params;
    let mut wide: Vec<f64> = Vec::new();
    for (r, &rs) in rstd.iter().enumerate() {
        let rs: f64 = rs.into();
        // A NaN rstd (a poisoned row) is neither: the kernels carried it.
        let exact = rs == f64::INFINITY || rs < f64::from(f32::MIN_POSITIVE);
        if !exact {
            continue;
        }
        if wide.is_empty() {
            wide = try_zeroed_vec("x (an exact row)", n)?;
        }
        for (w, &v) in wide.iter_mut().zip(&x[r * n..(r + 1) * n]) {
            *w = T::to_f64(v);
        }
        let yr = &mut y[r * n..(r + 1) * n];
        row::forward_exact_row(spec, &wide, gamma, beta, |j, v| yr[j] = T::from_f64(v));
    }
    Ok(())
}

/// What a backward recovers x̂ from (`docs/math.md` (16)).
#[derive(Clone, Copy)]
pub(crate) enum Saved<'a, T> {
    /// The forward's input (or h), with its saved statistics.
    X(&'a [T]),
    /// The forward's output, with β (where the problem has one) and the saved rstd.
    Y { y: &'a [T], beta: Option<&'a [T]> },
}

/// Backward over contiguous rows (`mean` for the kinds that save one, from x), from x or y,
/// with dh added to dx where given. Lengths are validated by the caller, and from y every
/// column's γ_eff is nonzero (`check_gamma_recoverable`).
///
/// From x without dh the kernels read the rows where they lie. From y the kernels run with a
/// saved mean of 0 and an rstd of 1 on x̂ = (y − β)·(1/γ_eff) (so they compute dx/rstd, and dγ,
/// dβ, with x̂ as recovered), and dx = rstd·dx' + dh is formed in one rounding: the `f32` kernels
/// recover x̂ in registers as they read y and form dx as they store it ([`staged_blocks`]).
/// Otherwise each task's rows are staged around the same kernels, a chunk at a time that stays in
/// cache: x̂ recovered (`stage::recover`), and dx finished by `stage::finish`; from x with dh,
/// the kernels' dx' is dx itself.
/// The very long rows the column chunks serve from x (`crate::columns`) run row-wise here.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: CpuElement>(
    n: usize,
    (kind, gamma_offset): (Kind, f64),
    saved: Saved<'_, T>,
    dy: &[T],
    dh: Option<&[T]>,
    mean: Option<&[T::Acc]>,
    rstd: &[T::Acc],
    gamma: Option<&[T]>,
    dx: &mut [T],
    mut dgamma: Option<&mut [T]>,
    mut dbeta: Option<&mut [T]>,
    stream: bool,
) -> Result<()> {
    let rows = rstd.len();
    if rows == 0 {
        // No rows: dx is empty and dγ/dβ are sums over nothing (and n, with no γ or β, can be
        // any size: no row-sized products below may be formed).
        for d in [dgamma, dbeta].into_iter().flatten() {
            d.fill(T::from_f64(0.0));
        }
        return Ok(());
    }
    let gamma = load_param("gamma", gamma, T::Acc::of(gamma_offset))?;
    let gamma = gamma.as_deref();
    let mut zeros = Vec::new();
    let (x, from_y) = match saved {
        Saved::X(x) => (x, None),
        Saved::Y { y, beta } => (y, Some(beta)),
    };
    let mean: &[T::Acc] = match mean {
        Some(m) if from_y.is_none() => m,
        _ => mean_or_zeros(None, rows, &mut zeros)?,
    };
    // From y: β in the accumulation type, γ_eff's reciprocals, and the rstd of 1 the kernels
    // are given.
    let beta = from_y.map(|b| load_param("beta", b, T::Acc::zero())).transpose()?.flatten();
    let mut inverse = Vec::new();
    let recover = match (from_y, gamma) {
        (Some(_), Some(g)) => Some(stage::gamma_of(g, &mut inverse)?),
        _ => None,
    };
    let ones = match from_y {
        Some(_) => {
            let mut v = try_zeroed_vec("rstd (ones)", rows)?;
            v.fill(T::Acc::one());
            v
        }
        None => Vec::new(),
    };
    let staged = (from_y.is_some() || dh.is_some()).then(|| Staging {
        from_y: from_y.map(|_| (beta.as_deref(), recover)),
        kind: if from_y.is_some() { kind.of_output() } else { kind },
    });
    // Rows whose rstd the kernels' distributed second sweep cannot take (extreme ε, or a
    // saved rstd of +inf): a group of blocks holding one runs the row-wise composition, those
    // rows exactly (the other rows' bits are the kernels'; `simd::blocks`).
    let exact = |rstd: &[T::Acc]| rstd.iter().any(|&r| row::needs_exact_row(r.into()));
    // Very long rows: in column chunks (`crate::columns`), where the type has that kernel.
    if staged.is_none()
        && crate::columns::by_columns(rows, n)
        && !exact(rstd)
        && let (Some(xa), Some(da), Some(dxa)) = (T::as_acc(x), T::as_acc(dy), T::as_acc_mut(dx))
    {
        // The outputs have an accumulation-type view whenever x has (the same `T`).
        let dg = dgamma.as_deref_mut().and_then(T::as_acc_mut);
        let db = dbeta.as_deref_mut().and_then(T::as_acc_mut);
        if <T::Acc as Real>::back_columns(kind, n, xa, da, mean, rstd, gamma, dxa, dg, db)? {
            return Ok(());
        }
    }
    let (want_g, want_b) = (dgamma.is_some(), dbeta.is_some());
    let blocks = rows.div_ceil(ROW_BLOCK);
    // Per block: [dγ partial (n) | dβ partial (n)].
    let width = 2 * n;
    let len = if want_g || want_b { blocks * width } else { 0 };
    let (mut store, start) = zeroed_on_line::<T::Acc>(len)?;
    let partials = &mut store[start..start + len];

    // Blocks are handed out in groups (a task's worth of rows); within a group the kernels
    // pipeline across block boundaries. The grouping depends on the shape and the pool's size,
    // and the results do not depend on it at all: each block's partials gain its rows' terms in
    // row order.
    let chunk = ROW_BLOCK * n;
    let group_blocks =
        if is_parallel(x.len()) { blocks_per_task(n, blocks) } else { blocks.max(1) };
    let group = |g: usize, dx: &mut [T], part: Option<&mut [T::Acc]>| -> Result<()> {
        let rows = g * group_blocks * ROW_BLOCK..((g + 1) * group_blocks * ROW_BLOCK).min(rows);
        let elems = rows.start * n..rows.end * n;
        let (x, dy) = (&x[elems.clone()], &dy[elems.clone()]);
        let (m, s) = (&mean[rows.clone()], &rstd[rows.clone()]);
        let want = (want_g, want_b);
        match &staged {
            None => {
                let out = (stream, Epilogue::default());
                simd::blocks(kind, n, (x, dy, m, s), gamma, dx, part, want, out)
            }
            Some(st) => {
                // From y the kernels are given an rstd of 1, and s scales their dx.
                let given = if st.from_y.is_some() { &ones[rows] } else { s };
                let dh = dh.map(|h| &h[elems]);
                staged_blocks(st, n, (x, dy, dh), (m, given, s), gamma, dx, part, want, stream)
            }
        }
    };
    let (gchunk, gwidth) = (group_blocks * chunk, group_blocks * width);
    if !is_parallel(x.len()) {
        let part = (!partials.is_empty()).then_some(&mut partials[..]);
        group(0, dx, part)?;
    } else if partials.is_empty() {
        dx.par_chunks_mut(gchunk).enumerate().try_for_each(|(g, d)| group(g, d, None))?;
    } else {
        dx.par_chunks_mut(gchunk)
            .zip(partials.par_chunks_mut(gwidth))
            .enumerate()
            .try_for_each(|(g, (d, p))| group(g, d, Some(p)))?;
    }
    // Fixed-order reduction of the block partials: block 0, 1, 2, … in f64, rounded once.
    let mut acc: Vec<f64> =
        if want_g || want_b { try_zeroed_vec("dgamma/dbeta sums", n)? } else { Vec::new() };
    let mut reduce = |offset: usize, out: &mut [T]| {
        acc.fill(0.0);
        // Compiled for the machine's instruction set (the loop converts and adds across
        // columns, so every column still sums its blocks in block order).
        crate::isa::dispatch(|| {
            for p in partials.chunks_exact(width) {
                for (a, &v) in acc.iter_mut().zip(&p[offset..offset + n]) {
                    *a += v.into();
                }
            }
        });
        for (o, &a) in out.iter_mut().zip(&acc) {
            *o = T::from_f64(a);
        }
    };
    if let Some(dg) = dgamma {
        reduce(0, dg);
    }
    if let Some(db) = dbeta {
        reduce(n, db);
    }
    Ok(())
}

/// What a backward from y recovers x̂ with: β and γ_eff (as `stage::recover` takes them).
type FromY<'a, A> = (Option<&'a [A]>, Option<stage::Gamma<'a, A>>);

/// How a task's rows are staged for the kernels (see [`backward`]).
struct Staging<'a, A: Real> {
    /// From y: β and γ_eff (as `stage::recover` takes them).
    from_y: Option<FromY<'a, A>>,
    /// The kind the kernels compute (`Kind::of_output` of the problem's, from y).
    kind: Kind,
}

/// The backward of one group of blocks ([`backward`]'s task) staged around the kernels, a
/// chunk of rows at a time ([`stage_back_rows`]: whole blocks, or part of one): x̂ recovered
/// from y (`stage::recover`), or x and dy widened, into scratch in the accumulation type; the
/// kernels of that type run on them (`Real::staged_blocks`: the same kernels, the same block
/// partials in row order); and dx = s·dx' + dh rounded once (s the saved rstd from y, else 1).
/// The kernels that take an epilogue (`Real::EPILOGUE`: `f32`) form that dx themselves as they
/// store it — from x with dh nothing is staged at all — and the others' dx' goes through a
/// scratch chunk and `stage::finish` (the same operations). Rows whose rstd needs the exact
/// path, or whose saved rstd from y is not finite, take the latter too.
///
/// From y in `f32` with the kernels' epilogue nothing is staged either: the kernels read y and
/// recover x̂ in registers ([`from_y_in_registers`]), the same operations as `stage::recover`'s,
/// so the same bits. 16-bit rows, from y or with dh, go through their register-converting
/// kernels in the same way (`Convert::backward_converted` with `reduce::Extra`). Where some
/// column's γ_eff or 1/γ_eff lies outside the normal range, `stage::recover` divides by γ_eff
/// instead of multiplying by its reciprocal, and such a call is staged as above (the kernels
/// multiply only). `stats` are the saved mean and the rstd the kernels are given, and the saved
/// rstd.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn staged_blocks<T: CpuElement>(
    st: &Staging<'_, T::Acc>,
    n: usize,
    (x, dy, dh): (&[T], &[T], Option<&[T]>),
    (mean, given, rstd): (&[T::Acc], &[T::Acc], &[T::Acc]),
    gamma: Option<&[T::Acc]>,
    dx: &mut [T],
    mut partials: Option<&mut [T::Acc]>,
    want: (bool, bool),
    stream: bool,
) -> Result<()> {
    let rows = rstd.len();
    let from_y = st.from_y.is_some();
    let in_kernels = <T::Acc as Real>::EPILOGUE
        && T::as_acc(dy).is_some()
        && !given.iter().any(|&r| row::needs_exact_row(r.into()))
        && (!from_y || rstd.iter().all(|&r| num_traits::Float::is_finite(r)));
    if in_kernels
        && let Some((beta, g)) = st.from_y
        && !g.is_some_and(|g| g.divide)
        && let (Some(ya), Some(da)) = (T::as_acc(x), T::as_acc(dy))
    {
        let dh = dh.map(|h| T::as_acc(h).ok_or(())).transpose();
        if let (Ok(dh), Some(dxa)) = (dh, T::as_acc_mut(dx)) {
            let inverse = g.map(|g| g.values);
            let rows = (ya, da, mean, given);
            let out = (stream, rstd, dh);
            if from_y_in_registers(
                st.kind,
                n,
                rows,
                (beta, inverse),
                gamma,
                dxa,
                partials.as_deref_mut(),
                want,
                out,
            )? {
                return Ok(());
            }
        }
    }
    // 16-bit rows: the register-converting kernels recover x̂ from y as they read it and form
    // dx = fma(s, dx', dh) (s·dx' without dh; s = 1 from x) as they round it: the operations of
    // `stage::recover` and `stage::finish` below, so the same bits. Their accumulation type is
    // `f32`; the dividing recovery and non-finite saved rstds take the staged path.
    let divides = st.from_y.is_some_and(|(_, g)| g.is_some_and(|g| g.divide));
    if T::as_acc(dy).is_none()
        && !divides
        && !given.iter().any(|&r| row::needs_exact_row(r.into()))
        && (!from_y || rstd.iter().all(|&r| num_traits::Float::is_finite(r)))
        && let Some(scale) = as_f32(rstd)
    {
        let (beta, inverse) = st
            .from_y
            .map_or((None, None), |(b, g)| (b.and_then(as_f32), g.and_then(|g| as_f32(g.values))));
        let (zeros, ones) = recovery_fills(n, (beta, inverse), false)?;
        let rec = crate::reduce::Recover::new((beta, inverse), (&zeros, &ones), n);
        let extra = crate::reduce::Extra { dh, rec, scale: from_y.then_some(scale) };
        let parts = partials.as_deref_mut();
        if T::backward_converted(st.kind, n, x, dy, extra, mean, given, gamma, dx, parts, want) {
            return Ok(());
        }
    }
    let per = if in_kernels && !from_y { rows.max(1) } else { stage_back_rows::<T::Acc>(n) };
    let len = per.min(rows) * n;
    let wide = T::as_acc(dy).is_none();
    let scratch = |what, used: bool| if used { try_zeroed_vec(what, len) } else { Ok(Vec::new()) };
    let mut xs: Vec<T::Acc> = scratch("x (a staged chunk)", from_y || wide)?;
    let mut ds: Vec<T::Acc> = scratch("dy (a staged chunk)", wide)?;
    let mut dxs: Vec<T::Acc> = scratch("dx (a staged chunk)", !in_kernels)?;
    let zeros: Vec<T::Acc> = match in_kernels && dh.is_none() {
        true => try_zeroed_vec("dh (zeros)", n)?,
        false => Vec::new(),
    };
    for start in (0..rows).step_by(per) {
        let r = start..(start + per).min(rows);
        let e = r.start * n..r.end * n;
        let k = e.len();
        let xa: &[T::Acc] = match (st.from_y, T::as_acc(&x[e.clone()])) {
            (Some((beta, g)), _) => {
                stage::recover(n, &x[e.clone()], beta, g, &mut xs[..k]);
                &xs[..k]
            }
            (None, Some(xa)) => xa,
            (None, None) => {
                T::widen(&x[e.clone()], &mut xs[..k]);
                &xs[..k]
            }
        };
        let da: &[T::Acc] = match T::as_acc(&dy[e.clone()]) {
            Some(da) => da,
            None => {
                T::widen(&dy[e.clone()], &mut ds[..k]);
                &ds[..k]
            }
        };
        // The chunk's blocks' partials (its rows are whole blocks, or within one).
        let part = partials
            .as_deref_mut()
            .map(|p| &mut p[2 * n * (r.start / ROW_BLOCK)..2 * n * r.end.div_ceil(ROW_BLOCK)]);
        let rows = (xa, da, &mean[r.clone()], &given[r.clone()]);
        let scale = from_y.then(|| &rstd[r.clone()]);
        let dhc = dh.map(|h| &h[e.clone()]);
        match T::as_acc_mut(&mut dx[e.clone()]) {
            Some(dxa) if in_kernels => {
                let dh = dhc.and_then(T::as_acc);
                let epi = Epilogue { scale, dh, zeros: &zeros };
                <T::Acc as Real>::staged_blocks(
                    st.kind,
                    n,
                    rows,
                    gamma,
                    dxa,
                    part,
                    want,
                    (stream, epi),
                )?;
            }
            _ => {
                let (dxk, out) = (&mut dxs[..k], (false, Epilogue::default()));
                <T::Acc as Real>::staged_blocks(st.kind, n, rows, gamma, dxk, part, want, out)?;
                stage::finish(n, dxk, scale, dhc, &mut dx[e], stream);
            }
        }
    }
    if stream && !in_kernels {
        crate::reduce::stream_fence();
    }
    Ok(())
}

/// `v` as `f32`s, where `A` is `f32`.
fn as_f32<A: Real>(v: &[A]) -> Option<&[f32]> {
    (TypeId::of::<A>() == TypeId::of::<f32>()).then(|| bytemuck::cast_slice(v))
}

/// `v` as `f32`s, where `A` is `f32`.
fn as_f32_mut<A: Real>(v: &mut [A]) -> Option<&mut [f32]> {
    (TypeId::of::<A>() == TypeId::of::<f32>()).then(|| bytemuck::cast_slice_mut(v))
}

/// What `reduce::Recover::new` reads an absent β or 1/γ_eff from, for rows of `n`: zeros where
/// β is absent and 1/γ_eff is there, ones the other way round (empty where not needed); zeros
/// also where `zeros` asks for them.
fn recovery_fills(
    n: usize,
    (beta, inverse): (Option<&[f32]>, Option<&[f32]>),
    zeros: bool,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let zeros = zeros || (beta.is_none() && inverse.is_some());
    let zeros = if zeros { try_zeroed_vec("zeros", n)? } else { Vec::new() };
    let mut ones =
        if inverse.is_none() && beta.is_some() { try_zeroed_vec("ones", n)? } else { Vec::new() };
    ones.fill(1.0);
    Ok((zeros, ones))
}

/// The backward from y of a group of blocks by the `f32` kernels reading y and recovering x̂
/// in registers (`crate::reduce::Recover`: (y − β)·(1/γ_eff), β and `inverse` = 1/γ_eff where
/// the problem has them), given the mean of 0 and the rstd of 1 in `rows` (after y and dy), each
/// row's dx formed as they store it, fma(s, dx', dh) with s its saved rstd (`out`: stream, saved
/// rstd, dh). `Ok(false)` where the accumulation type is not `f32` (nothing done).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn from_y_in_registers<A: Real>(
    kind: Kind,
    n: usize,
    (y, dy, mean, given): (&[A], &[A], &[A], &[A]),
    (beta, inverse): (Option<&[A]>, Option<&[A]>),
    gamma: Option<&[A]>,
    dx: &mut [A],
    partials: Option<&mut [A]>,
    want: (bool, bool),
    (stream, rstd, dh): (bool, &[A], Option<&[A]>),
) -> Result<bool> {
    fn f<A: Real>(v: &[A]) -> &[f32] {
        as_f32(v).unwrap_or_default()
    }
    let (Some(dx), Some(y)) = (as_f32_mut(dx), as_f32(y)) else {
        return Ok(false);
    };
    let buf = partials.and_then(as_f32_mut);
    let partials = crate::reduce::Partials { buf, want };
    // Zeros stand for an absent dh too.
    let (beta, inverse) = (beta.map(f), inverse.map(f));
    let (zeros, ones) = recovery_fills(n, (beta, inverse), dh.is_none())?;
    let epi = Epilogue { scale: Some(f(rstd)), dh: dh.map(f), zeros: &zeros };
    let rec = crate::reduce::Recover::new((beta, inverse), (&zeros, &ones), n);
    let rows = (y, f(dy), f(mean), f(given));
    let (params, out) = ((gamma.map(f), rec), (dx, partials));
    crate::reduce::back_blocks_recovered((kind, n), rows, params, out, (stream, epi));
    if stream {
        crate::reduce::stream_fence();
    }
    Ok(true)
}

#[cfg(feature = "unit-tests")]
#[doc(hidden)]
pub mod tests {
    use super::*;

    /// Varied finite values in [-1.5, 1.5) from a seed (xorshift).
    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                3.0 * (s as f32 / u32::MAX as f32 - 0.5)
            })
            .collect()
    }

    /// dx, dγ, dβ of a backward from y of `rows` × `n`, as bits: `staged`, by the composition
    /// the staged path runs (x̂ by `stage::recover`, the backward of x̂ with a mean of 0 and an
    /// rstd of 1 giving dx', then dx = fma(rstd, dx', dh) by `stage::finish`); else by
    /// [`backward`] itself.
    #[allow(clippy::type_complexity)]
    fn from_y(
        staged: bool,
        (kind, offset): (Kind, f64),
        (rows, n): (usize, usize),
        (y, dy, dh, rstd): (&[f32], &[f32], Option<&[f32]>, &[f32]),
        (gamma, beta): (Option<&[f32]>, Option<&[f32]>),
    ) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
        let (mut dx, mut dg, mut db) = (vec![0f32; rows * n], vec![0f32; n], vec![0f32; n]);
        let (dgamma, dbeta) = (gamma.map(|_| &mut dg[..]), beta.map(|_| &mut db[..]));
        if staged {
            let ge = load_param::<f32>("gamma", gamma, f32::of(offset)).unwrap();
            let mut inverse = Vec::new();
            let g = ge.as_deref().map(|g| stage::gamma_of(g, &mut inverse).unwrap());
            let mut xhat = vec![0f32; rows * n];
            stage::recover::<f32>(n, y, beta, g, &mut xhat);
            let (ones, mut dxk) = (vec![1f32; rows], vec![0f32; rows * n]);
            let (k, saved) = ((kind.of_output(), offset), Saved::X(&xhat[..]));
            backward(n, k, saved, dy, None, None, &ones, gamma, &mut dxk, dgamma, dbeta, false)
                .unwrap();
            stage::finish::<f32>(n, &mut dxk, Some(rstd), dh, &mut dx, false);
        } else {
            let saved = Saved::Y { y, beta };
            let k = (kind, offset);
            backward(n, k, saved, dy, dh, None, rstd, gamma, &mut dx, dgamma, dbeta, false)
                .unwrap();
        }
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect();
        (bits(&dx), bits(&dg), bits(&db))
    }

    pub fn the_backward_from_y_has_the_bits_of_the_staged_composition_at_any_thread_count() {
        // In f32 the kernels recover x̂ from y in registers; a γ_eff with a subnormal entry
        // (whose reciprocal `stage::recover` does not form: it divides) is staged. Short rows,
        // rows about the long-row kernel's threshold (64), and rows enough for parallel tasks.
        let shapes =
            [(5, 1), (37, 3), (70, 63), (70, 64), (70, 65), (33, 256), (1100, 256), (9, 1030)];
        let pools = [1, 2].map(|t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap());
        for (rows, n) in shapes {
            let (y, dy, dh) = (values(rows * n, 3), values(rows * n, 5), values(rows * n, 7));
            let rstd: Vec<f32> = values(rows, 11).iter().map(|v| 1.0 + v / 2.0).collect();
            let g: Vec<f32> =
                values(n, 13).iter().map(|v| if v.abs() < 0.05 { 0.5 } else { *v }).collect();
            let mut tiny = g.clone();
            tiny[n / 2] = 1e-39;
            let b = values(n, 17);
            for kind in [Kind::LayerNorm, Kind::RmsNorm] {
                let gammas =
                    [(None, 0.0), (Some(&g[..]), 0.0), (Some(&g[..]), 1.0), (Some(&tiny[..]), 0.0)];
                let (bs, dhs) = ([None, Some(&b[..])], [None, Some(&dh[..])]);
                let cases = gammas
                    .iter()
                    .flat_map(|&gm| bs.iter().flat_map(move |&bt| dhs.map(|h| (gm, bt, h))));
                for ((gamma, offset), beta, dh) in cases {
                    let what = format!(
                        "{rows}x{n} {kind:?} γ {:?}+{offset} β {} dh {}",
                        gamma.map(|g| g[n / 2]),
                        beta.is_some(),
                        dh.is_some()
                    );
                    let data = (&y[..], &dy[..], dh, &rstd[..]);
                    let run =
                        |staged| from_y(staged, (kind, offset), (rows, n), data, (gamma, beta));
                    let want = pools[0].install(|| run(true));
                    for (threads, pool) in [1, 2].into_iter().zip(&pools) {
                        let got = pool.install(|| run(false));
                        assert!(got.0 == want.0, "dx, {what}, {threads} threads");
                        assert!(got.1 == want.1, "dγ, {what}, {threads} threads");
                        assert!(got.2 == want.2, "dβ, {what}, {threads} threads");
                        let again = pool.install(|| run(true));
                        assert!(again == want, "the staged composition, {what}, {threads} threads");
                    }
                }
            }
        }
    }

    pub fn the_partials_start_on_a_cache_line() {
        for len in [0, 1, 100, 1 << 16, 1 << 22] {
            let (v, start) = zeroed_on_line::<f32>(len).unwrap();
            assert!(v.len() >= start + len && v[start..start + len].iter().all(|&x| x == 0.0));
            assert_eq!(v[start..].as_ptr().addr() % 64, 0, "len {len}");
            let (v, start) = zeroed_on_line::<f64>(len).unwrap();
            assert!(v.len() >= start + len && v[start..start + len].iter().all(|&x| x == 0.0));
            assert_eq!(v[start..].as_ptr().addr() % 64, 0, "len {len}");
        }
    }

    pub fn buffers_that_cannot_be_had_are_out_of_memory_errors() {
        let oom = |r: Result<()>| assert_eq!(r.unwrap_err().class(), "out-of-memory");
        oom(zeroed_on_line::<f32>(usize::MAX / 8).map(|_| ()));
        oom(zeroed_on_line::<f64>(usize::MAX - 1).map(|_| ()));
        oom(try_with_capacity::<u64>("x", usize::MAX / 16).map(|_| ()));
        let mut scratch = Vec::new();
        oom(mean_or_zeros::<f32>(None, usize::MAX / 8, &mut scratch).map(|_| ()));
        let mut m = [1f32; 2];
        assert_eq!(mean_or_zeros(Some(&mut m[..]), 2, &mut scratch).unwrap(), [1.0, 1.0]);
        assert_eq!(mean_or_zeros::<f32>(None, 3, &mut scratch).unwrap(), [0.0; 3]);
    }

    pub fn the_streaming_threshold_is_half_the_reported_cache_within_measured_bounds() {
        assert_eq!(cache_size("32768K"), Some(32 << 20));
        assert_eq!(cache_size("491520K\n"), Some(480 << 20));
        assert_eq!(cache_size("32M"), Some(32 << 20));
        assert_eq!(cache_size("1G"), Some(1 << 30));
        assert_eq!(cache_size("4096"), Some(4096));
        for bad in ["", "K", "12Q", "-1K", "99999999999999999999G"] {
            assert_eq!(cache_size(bad), None, "{bad:?}");
        }
        assert_eq!(stream_min_for(32 << 20), 16 << 20);
        assert_eq!(stream_min_for(48 << 20), 24 << 20);
        assert_eq!(stream_min_for(64 << 20), 32 << 20);
        assert_eq!(stream_min_for(96 << 20), 32 << 20);
        assert_eq!(stream_min_for(480 << 20), 32 << 20);
        assert_eq!(stream_min_for(8 << 20), 16 << 20);
        assert!((16 << 20..=32 << 20).contains(&stream_min_bytes()));
    }

    pub fn the_forward_streams_when_asked_and_prefetches_only_large_cached_outputs() {
        let big = PREFETCH_OUT_MIN_BYTES;
        assert_eq!(Out::new(true, 0), Out::Streamed);
        assert_eq!(Out::new(true, big), Out::Streamed);
        assert_eq!(Out::new(false, big - 1), Out::Cached);
        assert_eq!(Out::new(false, big), Out::Prefetched);
        for out in [Out::Cached, Out::Prefetched, Out::Streamed] {
            assert_eq!(out.stream(), out == Out::Streamed);
            assert_eq!(out.prefetch(), out == Out::Prefetched);
            assert!(!(out.stream() && out.prefetch()));
        }
    }
}
