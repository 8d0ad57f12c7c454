//! Host-side launch planning: which kernel, grid, block and shared memory for a problem on a
//! device, and the exact argument list of every launch.
//!
//! Plain Rust with no CUDA dependency, so every decision is unit-tested on machines without a GPU.
//! The kind (LayerNorm, RMSNorm) and the direction (forward; backward from x; backward from y)
//! pick the kernel family (`ln_fwd_*`, `rms_bwdy_*`, …); the variants (γ offset, residual, dh,
//! which parameter gradients) are arguments of the same kernels. The strategy follows the row
//! length N (as PyTorch, Apex, OneFlow and QuACK do):
//!
//! | N (elements)                                   | strategy      | row lives in            |
//! |------------------------------------------------|---------------|-------------------------|
//! | ≤ 32 × max items (1024; 512 for f64)           | [`Strategy::Warp`]  | registers of 1–32 lanes |
//! | row (fwd) or x + dy (bwd) fit in shared memory | [`Strategy::BlockSmem`] | shared memory     |
//! | larger                                         | [`Strategy::BlockGlobal`] | global (re-read) |
//!
//! 128-bit accesses (`v` kernels) are used when N is a multiple of 16 bytes / element size; every
//! buffer this backend hands out is a whole `cuMemAlloc` allocation (256-byte aligned), so each row
//! then starts 16-byte aligned. Otherwise the scalar (`s`) kernels run.

use layernorm_core::{DType, Error, NormKind, NormSpec, Result};

use crate::{NAME, kernels};

/// What the planner needs to know about a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Compute capability (major, minor).
    pub compute_capability: (u32, u32),
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Maximum threads per block.
    pub max_threads_per_block: u32,
    /// Maximum `gridDim.x`.
    pub max_grid_x: u32,
    /// Maximum `gridDim.y`.
    pub max_grid_y: u32,
    /// Dynamic + static shared memory a block may use after opting in
    /// (`CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`).
    pub max_smem_per_block_optin: u32,
}

impl DeviceLimits {
    /// An A100 (sm_80): 108 SMs, 163 KiB of opt-in shared memory per block.
    pub const A100: DeviceLimits = DeviceLimits {
        compute_capability: (8, 0),
        sm_count: 108,
        max_threads_per_block: 1024,
        max_grid_x: i32::MAX as u32,
        max_grid_y: 65535,
        max_smem_per_block_optin: 166_912,
    };
    /// An H100 SXM (sm_90): 132 SMs, 227 KiB of opt-in shared memory per block.
    pub const H100: DeviceLimits = DeviceLimits {
        compute_capability: (9, 0),
        sm_count: 132,
        max_threads_per_block: 1024,
        max_grid_x: i32::MAX as u32,
        max_grid_y: 65535,
        max_smem_per_block_optin: 232_448,
    };
}

/// How a row is mapped onto threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// `lanes` threads (a power of two ≤ 32) per row, `items` elements per thread in registers.
    Warp {
        /// Threads per row.
        lanes: u32,
        /// Elements per thread (a compile-time size of the kernel).
        items: u32,
    },
    /// One block per row; the row (and dy in the backward) cached in dynamic shared memory.
    BlockSmem,
    /// One block per row, reading global memory in every pass (rows too large for shared memory).
    BlockGlobal,
}

/// One kernel launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Kernel entry point in `kernels/layernorm.cu`.
    pub kernel: String,
    /// `gridDim`.
    pub grid: (u32, u32, u32),
    /// `blockDim`.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory in bytes.
    pub smem: u32,
}

/// The launch of a forward pass (or of the dx part of a backward pass).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowPlan {
    /// The chosen strategy.
    pub strategy: Strategy,
    /// Whether the 128-bit (`v`) variant runs.
    pub vectorized: bool,
    /// The launch.
    pub launch: Launch,
    /// Value of the kernel's `lanes` argument (0 for block kernels).
    pub lanes: u32,
}

/// The launches of a backward pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackwardPlan {
    /// dx (and the per-row residual means for stage 1).
    pub rows: RowPlan,
    /// dγ/dβ stage 1 and 2, when a parameter gradient is wanted and rows > 0.
    pub param: Option<ParamPlan>,
}

/// The two fixed-order stages of dγ/dβ. Depends only on the shape, never on the device, so the
/// summation order (hence the bits) is the same on every GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamPlan {
    /// Row chunks: stage 1 writes `chunks × N` partial sums per parameter.
    pub chunks: u32,
    /// Rows per chunk.
    pub rows_per_chunk: u64,
    /// Stage 1 (`ln_bwd_gb_partial`).
    pub partial: Launch,
    /// Stage 2 (`ln_bwd_gb_final`).
    pub finish: Launch,
}

/// Elements per 128-bit access.
pub const fn vec_width(dtype: DType) -> usize {
    16 / dtype.size()
}

/// Items per thread of the warp kernels instantiated in `kernels/layernorm.cu`, for the scalar and
/// the vector variants. Must match the `LN_WARP` lines there (checked by `check::check_all`).
pub fn warp_items(dtype: DType, vectorized: bool) -> &'static [u32] {
    match (dtype, vectorized) {
        (DType::F64, false) => &[1, 2, 4, 8, 12, 16],
        (DType::F64, true) => &[2, 4, 8, 12, 16],
        (DType::F32, true) => &[4, 8, 12, 16, 24, 32],
        (_, true) => &[8, 16, 24, 32],
        (_, false) => &[1, 2, 4, 8, 12, 16, 24, 32],
    }
}

/// Threads per block of the warp kernels (`__launch_bounds__(128)`).
pub const WARP_BLOCK: u32 = 128;
/// Columns × rows of a dγ/dβ stage-1 block (`LN_GB_COLS`, `LN_GB_ROWS`).
pub const GB_BLOCK: (u32, u32) = (32, 8);
/// Threads per block of stage 2.
pub const GB_FINAL_BLOCK: u32 = 256;
/// Shared memory reserved for the kernels' static reduction buffers (and the driver), in bytes.
const STATIC_SMEM_RESERVE: u32 = 1024;
/// Shared memory a block may use without opting in.
pub const DEFAULT_SMEM: u32 = 48 * 1024;
/// The largest number of stage-1 row chunks.
const MAX_CHUNKS: u64 = 512;
/// Target rows per chunk before the chunk cap applies.
const ROWS_PER_CHUNK: u64 = 64;
/// Upper bound on partial-buffer elements (per parameter) before chunks shrink.
const MAX_PARTIAL_ELEMS: u64 = 1 << 22;

fn too_large(rows: usize, n: usize, limit: &str) -> Error {
    Error::TooLarge { rows, n, limit: limit.into() }
}

/// The entry points of the row kernels of one direction, for `dtype` and `kind`.
fn row_kernel_names(dtype: DType, kind: NormKind, dir: &str, out: &mut Vec<String>) {
    let p = kernels::kind_prefix(kind);
    for tag in ["s", "v"] {
        for mem in ["smem", "glob"] {
            out.push(format!("{p}_{dir}_block_{tag}_{mem}"));
        }
        for items in warp_items(dtype, tag == "v") {
            out.push(format!("{p}_{dir}_warp_{tag}_i{items}"));
        }
    }
}

/// All kernel entry points of the module for `dtype` and `kind`, in a fixed order: forward,
/// backward from x, backward from y, the dγ/dβ stages.
pub fn kernel_names(dtype: DType, kind: NormKind) -> Vec<String> {
    let mut names = Vec::new();
    for dir in ["fwd", "bwd", "bwdy"] {
        row_kernel_names(dtype, kind, dir, &mut names);
    }
    let p = kernels::kind_prefix(kind);
    names.push(format!("{p}_bwd_gb_partial"));
    names.push(format!("{p}_bwdy_gb_partial"));
    names.push(GB_FINAL.into());
    names
}

/// The dγ/dβ stage-2 kernel (the same for every kind).
pub const GB_FINAL: &str = "gb_final";

fn check_shape(rows: usize, n: usize) -> Result<()> {
    if n > i32::MAX as usize {
        return Err(too_large(rows, n, "2^31 − 1 elements per row (the kernels' column index)"));
    }
    Ok(())
}

/// What a backward pass reads and writes beyond dy, rstd and dx.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackwardVariant {
    /// x̂ is recovered from y (with γ, β) instead of x and the saved statistics.
    pub from_y: bool,
    /// A residual-stream gradient dh is added to dx.
    pub dh: bool,
    /// dγ is wanted.
    pub dgamma: bool,
    /// dβ is wanted.
    pub dbeta: bool,
}

impl BackwardVariant {
    /// Whether a parameter gradient is wanted.
    pub fn params(&self) -> bool {
        self.dgamma || self.dbeta
    }

    fn dir(&self) -> &'static str {
        if self.from_y { "bwdy" } else { "bwd" }
    }
}

/// Whether the backward of `spec` centres rows itself (LayerNorm from x): it then reads the
/// saved mean and recomputes the residual mean m_lo.
fn centres(spec: &NormSpec, v: &BackwardVariant) -> bool {
    spec.has_mean() && !v.from_y
}

/// Picks the strategy and launch for the row kernels of `dir` (`fwd`, `bwd`, `bwdy`); a
/// backward caches the row and dy, not just the row.
fn plan_rows(spec: &NormSpec, limits: &DeviceLimits, dir: &str, aligned: bool) -> Result<RowPlan> {
    let (rows, n, dtype) = (spec.rows, spec.n, spec.dtype);
    check_shape(rows, n)?;
    let backward = dir != "fwd";
    let p = kernels::kind_prefix(spec.kind);
    let vw = vec_width(dtype);
    let vectorized = aligned && n.is_multiple_of(vw);
    let tag = if vectorized { "v" } else { "s" };
    let v = if vectorized { vw } else { 1 };
    let items = warp_items(dtype, vectorized);
    // Warp path: the fewest lanes (a power of two ≤ 32) holding the row with the smallest item
    // count, then the smallest item count that covers N with those lanes.
    let min_items = items[0] as usize;
    let lanes = n.div_ceil(min_items).next_power_of_two().min(32);
    if let Some(&it) = items.iter().find(|&&it| it as usize * lanes >= n) {
        let rows_per_block = (WARP_BLOCK / 32) as usize * (32 / lanes);
        let blocks = rows.div_ceil(rows_per_block).clamp(1, limits.max_grid_x as usize) as u32;
        return Ok(RowPlan {
            strategy: Strategy::Warp { lanes: lanes as u32, items: it },
            vectorized,
            launch: Launch {
                kernel: format!("{p}_{dir}_warp_{tag}_i{it}"),
                grid: (blocks, 1, 1),
                block: (WARP_BLOCK, 1, 1),
                smem: 0,
            },
            lanes: lanes as u32,
        });
    }
    // Block paths: enough threads for ~4 accesses each, a multiple of 32, 128..=max.
    let max_threads = limits.max_threads_per_block.clamp(128, 1024) as usize;
    let threads = n.div_ceil(v * 4).next_power_of_two().clamp(128, max_threads) as u32;
    let blocks = rows.clamp(1, limits.max_grid_x as usize) as u32;
    let cached = if backward { 2 } else { 1 };
    let bytes = n.checked_mul(dtype.size() * cached);
    let budget = limits.max_smem_per_block_optin.saturating_sub(STATIC_SMEM_RESERVE) as usize;
    let (strategy, smem, mem) = match bytes {
        Some(b) if b <= budget => (Strategy::BlockSmem, b as u32, "smem"),
        _ => (Strategy::BlockGlobal, 0, "glob"),
    };
    Ok(RowPlan {
        strategy,
        vectorized,
        launch: Launch {
            kernel: format!("{p}_{dir}_block_{tag}_{mem}"),
            grid: (blocks, 1, 1),
            block: (threads, 1, 1),
            smem,
        },
        lanes: 0,
    })
}

/// Plans a forward pass of `spec` (with or without a residual: the same kernels). `rows == 0`
/// still returns a plan (the caller launches nothing). `aligned`: every tensor starts on a
/// 16-byte boundary (128-bit accesses are then used when N allows).
pub fn plan_forward(spec: &NormSpec, limits: &DeviceLimits, aligned: bool) -> Result<RowPlan> {
    plan_rows(spec, limits, "fwd", aligned)
}

/// Plans a backward pass of `spec`; `aligned` as for [`plan_forward`].
pub fn plan_backward(
    spec: &NormSpec,
    limits: &DeviceLimits,
    aligned: bool,
    v: &BackwardVariant,
) -> Result<BackwardPlan> {
    let row_plan = plan_rows(spec, limits, v.dir(), aligned)?;
    let param =
        if v.params() && spec.rows > 0 { Some(plan_params(spec, v.from_y, limits)?) } else { None };
    Ok(BackwardPlan { rows: row_plan, param })
}

/// The fixed chunking of the dγ/dβ reduction for a shape (and the stage-1 kernel of the kind,
/// from x or from y).
pub fn plan_params(spec: &NormSpec, from_y: bool, limits: &DeviceLimits) -> Result<ParamPlan> {
    let (rows, n) = (spec.rows, spec.n);
    check_shape(rows, n)?;
    let (rows64, n64) = (rows as u64, n as u64);
    let cap = MAX_CHUNKS.min((MAX_PARTIAL_ELEMS / n64).max(1)).min(limits.max_grid_y as u64);
    let chunks = rows64.div_ceil(ROWS_PER_CHUNK).clamp(1, cap);
    let rows_per_chunk = rows64.div_ceil(chunks).max(1);
    let chunks = rows64.div_ceil(rows_per_chunk).max(1);
    // Both stages loop over columns when the grid limit caps them.
    let col_tiles = n64.div_ceil(GB_BLOCK.0 as u64).min(limits.max_grid_x as u64);
    let final_blocks = n64.div_ceil(GB_FINAL_BLOCK as u64).min(limits.max_grid_x as u64);
    let dir = if from_y { "bwdy" } else { "bwd" };
    Ok(ParamPlan {
        chunks: chunks as u32,
        rows_per_chunk,
        partial: Launch {
            kernel: format!("{}_{dir}_gb_partial", kernels::kind_prefix(spec.kind)),
            grid: (col_tiles as u32, chunks as u32, 1),
            block: (GB_BLOCK.0, GB_BLOCK.1, 1),
            smem: 0,
        },
        finish: Launch {
            kernel: GB_FINAL.into(),
            grid: (final_blocks as u32, 1, 1),
            block: (GB_FINAL_BLOCK, 1, 1),
            smem: 0,
        },
    })
}

/// A tensor a kernel argument points to: the problem's own, or the backward's scratch buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tensor {
    /// Input x (the backward's saved input when it reads x: x, or h of a residual forward).
    X,
    /// The residual added to x (forward).
    Residual,
    /// Output h = x + residual (forward); the residual buffer itself when in place.
    H,
    /// Scale γ.
    Gamma,
    /// Shift β.
    Beta,
    /// Output y (and the backward's saved output when it reads y).
    Y,
    /// Per-row mean.
    Mean,
    /// Per-row rstd.
    Rstd,
    /// Incoming gradient dy.
    Dy,
    /// Incoming residual-stream gradient dh, added to dx.
    Dh,
    /// Output dx.
    Dx,
    /// Output dγ.
    DGamma,
    /// Output dβ.
    DBeta,
    /// Scratch: per-row residual mean m_lo (accumulation dtype, `rows`).
    ResidualMean,
    /// Scratch: stage-1 partial sums of dγ (accumulation dtype, `chunks × N`).
    PartialGamma,
    /// Scratch: stage-1 partial sums of dβ (accumulation dtype, `chunks × N`).
    PartialBeta,
}

impl Tensor {
    /// Whether the tensor is held in the accumulation dtype (statistics and scratch) rather than
    /// the storage dtype.
    pub fn is_acc(self) -> bool {
        use Tensor::*;
        matches!(self, Mean | Rstd | ResidualMean | PartialGamma | PartialBeta)
    }
}

/// One kernel argument, in the order of the kernel's parameter list.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// A device pointer to a tensor.
    Tensor(Tensor),
    /// A null pointer (an absent optional tensor).
    Null,
    /// `unsigned long long`.
    U64(u64),
    /// `int`.
    I32(i32),
    /// `float`.
    F32(f32),
    /// `double`.
    F64(f64),
}

/// One launch with its arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Kernel, grid, block, shared memory.
    pub launch: Launch,
    /// Arguments matching the kernel's signature in `kernels/layernorm.cu`.
    pub args: Vec<Arg>,
}

/// A scalar in the accumulation type of `dtype` (f64 for f64, else f32 rounded to nearest).
fn acc(dtype: DType, v: f64) -> Arg {
    if dtype == DType::F64 { Arg::F64(v) } else { Arg::F32(v as f32) }
}

fn opt(present: bool, t: Tensor) -> Arg {
    if present { Arg::Tensor(t) } else { Arg::Null }
}

/// Whether the kernels of `dtype` compute in f32 (f16, bf16 and f32 data do; f64 in f64).
fn computes_in_f32(dtype: DType) -> bool {
    dtype.acc() != DType::F64
}

/// ε as the kernels take it: `(eps, eps_q)` with ε = eps·2^(2·eps_q), eps_q = 0 unless ε is
/// beyond 2^100 (f32) or 2^1000 (f64), where `var + ε` could leave the range of the arithmetic;
/// then eps is in [1, 4) (`finish_rstd` in `kernels/layernorm.cu` scales both terms).
///
/// The ε rule: kernels computing in f32 (f32, f16, bf16 data) cannot represent an ε below
/// `f32::MIN_POSITIVE` (2^-126): such a problem is [`Error::Unsupported`], naming ε and the
/// limit, rather than computed with a different ε. f64 data takes every valid ε.
pub fn eps_args(spec: &NormSpec) -> Result<(Arg, Arg)> {
    let eps = spec.eps;
    let f32_math = computes_in_f32(spec.dtype);
    if f32_math && eps < f32::MIN_POSITIVE as f64 {
        return Err(Error::unsupported(
            NAME,
            format!(
                "represent ε = {eps:e}: its {} kernels compute in f32, which holds no ε below \
                 f32::MIN_POSITIVE = {:e}",
                spec.dtype,
                f32::MIN_POSITIVE
            ),
        ));
    }
    let limit = if f32_math { 100 } else { 1000 };
    if eps <= 2f64.powi(limit) {
        return Ok((acc(spec.dtype, eps), Arg::I32(0)));
    }
    // ε = m·2^(2q), m in [1, 4): both factors exact in f64 (ε is far from the subnormals).
    let mut q = (eps.log2().floor() as i32).div_euclid(2);
    let mut m = eps * 2f64.powi(-2 * q);
    // log2 rounding at a power-of-two boundary can leave m just outside [1, 4).
    while m >= 4.0 {
        q += 1;
        m = eps * 2f64.powi(-2 * q);
    }
    while m < 1.0 {
        q -= 1;
        m = eps * 2f64.powi(-2 * q);
    }
    Ok((acc(spec.dtype, m), Arg::I32(q)))
}

/// The launches of a forward pass (`LN_FWD_PARAMS`), with a residual (`Tensor::Residual` in,
/// `Tensor::H` out; one buffer for both when in place) or without. Empty when `rows == 0`.
/// [`Error::Unsupported`] for an ε the kernels cannot represent ([`eps_args`]).
pub fn forward_steps(spec: &NormSpec, plan: &RowPlan, residual: bool) -> Result<Vec<Step>> {
    use Tensor::*;
    let (eps, eps_q) = eps_args(spec)?;
    if spec.rows == 0 {
        return Ok(Vec::new());
    }
    let args = vec![
        Arg::Tensor(X),
        opt(residual, Residual),
        opt(residual, H),
        opt(spec.gamma, Gamma),
        opt(spec.beta, Beta),
        Arg::Tensor(Y),
        opt(spec.has_mean(), Mean),
        Arg::Tensor(Rstd),
        Arg::U64(spec.rows as u64),
        Arg::I32(spec.n as i32),
        Arg::I32(plan.lanes as i32),
        eps,
        eps_q,
        acc(spec.dtype, 1.0 / spec.n as f64),
        acc(spec.dtype, spec.gamma_offset_acc()),
    ];
    Ok(vec![Step { launch: plan.launch.clone(), args }])
}

/// The zero-filled scratch buffers a backward pass needs, with their lengths (accumulation
/// dtype): the residual means (LayerNorm from x, when a parameter gradient is wanted) and the
/// stage-1 partial sums.
pub fn backward_scratch(
    spec: &NormSpec,
    plan: &BackwardPlan,
    v: &BackwardVariant,
) -> Vec<(Tensor, usize)> {
    let Some(pp) = plan.param.as_ref().filter(|_| v.params() && spec.rows > 0) else {
        return Vec::new();
    };
    let part = pp.chunks as usize * spec.n;
    let mut out = Vec::new();
    if centres(spec, v) {
        out.push((Tensor::ResidualMean, spec.rows));
    }
    if v.dgamma {
        out.push((Tensor::PartialGamma, part));
    }
    if v.dbeta {
        out.push((Tensor::PartialBeta, part));
    }
    out
}

/// The launches of a backward pass (`LN_BWD_PARAMS`, then the stage-1 `*_gb_partial` and
/// [`GB_FINAL`] when a parameter gradient is wanted). The saved tensor is `Tensor::X` (from x)
/// or `Tensor::Y` (from y, with β when the problem has it; the caller has checked that no
/// γ_offset + γ is 0). Empty when `rows == 0` (the caller zero-fills dγ/dβ).
pub fn backward_steps(spec: &NormSpec, plan: &BackwardPlan, v: &BackwardVariant) -> Vec<Step> {
    use Tensor::*;
    if spec.rows == 0 {
        return Vec::new();
    }
    let (rows, n) = (spec.rows as u64, spec.n as i32);
    let centre = centres(spec, v);
    let src = if v.from_y { Y } else { X };
    let beta = v.from_y && spec.beta;
    let goff = acc(spec.dtype, spec.gamma_offset_acc());
    let pp = plan.param.as_ref().filter(|_| v.params());
    let mut steps = vec![Step {
        launch: plan.rows.launch.clone(),
        args: vec![
            Arg::Tensor(src),
            Arg::Tensor(Dy),
            opt(v.dh, Dh),
            opt(centre, Mean),
            Arg::Tensor(Rstd),
            opt(spec.gamma, Gamma),
            opt(beta, Beta),
            Arg::Tensor(Dx),
            opt(centre && pp.is_some(), ResidualMean),
            Arg::U64(rows),
            Arg::I32(n),
            Arg::I32(plan.rows.lanes as i32),
            acc(spec.dtype, 1.0 / spec.n as f64),
            goff,
        ],
    }];
    if let Some(pp) = pp {
        steps.push(Step {
            launch: pp.partial.clone(),
            args: vec![
                Arg::Tensor(src),
                Arg::Tensor(Dy),
                opt(centre, Mean),
                opt(!v.from_y, Rstd),
                opt(centre, ResidualMean),
                opt(v.from_y && spec.gamma, Gamma),
                opt(beta, Beta),
                opt(v.dgamma, PartialGamma),
                opt(v.dbeta, PartialBeta),
                Arg::U64(rows),
                Arg::I32(n),
                Arg::U64(pp.rows_per_chunk),
                goff,
            ],
        });
        steps.push(Step {
            launch: pp.finish.clone(),
            args: vec![
                opt(v.dgamma, PartialGamma),
                opt(v.dbeta, PartialBeta),
                opt(v.dgamma, DGamma),
                opt(v.dbeta, DBeta),
                Arg::I32(n),
                Arg::I32(pp.chunks as i32),
            ],
        });
    }
    steps
}

/// `Err(Unavailable)` if the device cannot run a plan at all (used by the backend at start-up).
pub fn check_device(limits: &DeviceLimits) -> Result<()> {
    if limits.max_threads_per_block < 128 || limits.max_grid_y < 1 {
        return Err(Error::unavailable(
            NAME,
            format!("device limits too small for the kernels: {limits:?}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: DeviceLimits = DeviceLimits::H100;

    const PARAMS: BackwardVariant =
        BackwardVariant { from_y: false, dh: false, dgamma: true, dbeta: true };

    fn ln(rows: usize, n: usize, dtype: DType) -> NormSpec {
        NormSpec::layer_norm(rows, n, dtype)
    }

    fn fwd(rows: usize, n: usize, dtype: DType) -> RowPlan {
        plan_forward(&ln(rows, n, dtype), &L, true).unwrap()
    }

    fn bwd(rows: usize, n: usize, dtype: DType) -> BackwardPlan {
        plan_backward(&ln(rows, n, dtype), &L, true, &PARAMS).unwrap()
    }

    /// Whether the module of `spec`'s dtype and kind has the entry point `kernel`.
    fn known(spec: &NormSpec, kernel: &str) -> bool {
        use std::collections::{HashMap, HashSet};
        thread_local! {
            static NAMES: std::cell::RefCell<HashMap<(DType, NormKind), HashSet<String>>> =
                Default::default();
        }
        NAMES.with_borrow_mut(|m| {
            m.entry((spec.dtype, spec.kind))
                .or_insert_with(|| kernel_names(spec.dtype, spec.kind).into_iter().collect())
                .contains(kernel)
        })
    }

    /// Everything a plan must satisfy for the kernels to be correct, whatever the shape.
    fn check_invariants(spec: &NormSpec, p: &RowPlan, limits: &DeviceLimits) {
        let (rows, n, dtype) = (spec.rows, spec.n, spec.dtype);
        let ctx = format!("{rows}×{n} {dtype} {}: {p:?}", spec.kind);
        assert!(known(spec, &p.launch.kernel), "unknown kernel: {ctx}");
        if p.vectorized {
            assert!(n.is_multiple_of(vec_width(dtype)), "{ctx}");
            assert!(p.launch.kernel.contains("_v_"), "{ctx}");
        } else {
            assert!(p.launch.kernel.contains("_s_"), "{ctx}");
        }
        let (gx, gy, gz) = p.launch.grid;
        assert!(gx >= 1 && gx <= limits.max_grid_x && gy == 1 && gz == 1, "{ctx}");
        match p.strategy {
            Strategy::Warp { lanes, items } => {
                assert!(lanes.is_power_of_two() && lanes <= 32, "{ctx}");
                assert_eq!(p.lanes, lanes, "{ctx}");
                assert!((lanes * items) as usize >= n, "row does not fit: {ctx}");
                assert!(warp_items(dtype, p.vectorized).contains(&items), "{ctx}");
                assert_eq!(p.launch.block, (WARP_BLOCK, 1, 1), "{ctx}");
                assert_eq!(p.launch.smem, 0, "{ctx}");
                // Enough blocks to give every row a group, unless the grid limit caps it (the
                // kernel then loops over rows).
                let per_block = (WARP_BLOCK / 32 * (32 / lanes)) as usize;
                let needed = rows.div_ceil(per_block).max(1);
                assert_eq!(gx as usize, needed.min(limits.max_grid_x as usize), "{ctx}");
            }
            Strategy::BlockSmem | Strategy::BlockGlobal => {
                let t = p.launch.block.0;
                assert!(
                    t.is_multiple_of(32) && t >= 128 && t <= limits.max_threads_per_block,
                    "{ctx}"
                );
                assert_eq!(p.lanes, 0, "{ctx}");
                assert!(p.launch.smem <= limits.max_smem_per_block_optin - 1024, "{ctx}");
                assert_eq!(gx as usize, rows.clamp(1, limits.max_grid_x as usize), "{ctx}");
                if p.strategy == Strategy::BlockGlobal {
                    assert_eq!(p.launch.smem, 0, "{ctx}");
                    assert!(p.launch.kernel.ends_with("_glob"), "{ctx}");
                } else {
                    assert!(p.launch.kernel.ends_with("_smem"), "{ctx}");
                }
            }
        }
    }

    fn check_params(spec: &NormSpec, pp: &ParamPlan, limits: &DeviceLimits) {
        let (rows, n) = (spec.rows, spec.n);
        let ctx = format!("{rows}×{n}: {pp:?}");
        assert!(known(spec, &pp.partial.kernel) && known(spec, &pp.finish.kernel), "{ctx}");
        let (chunks, rpc) = (pp.chunks as u64, pp.rows_per_chunk);
        assert!(chunks >= 1 && chunks <= limits.max_grid_y as u64, "{ctx}");
        assert!(chunks * rpc >= rows as u64, "rows left out: {ctx}");
        assert!((chunks - 1) * rpc < rows as u64, "an empty chunk: {ctx}");
        let tiles = (n as u32).div_ceil(32).min(limits.max_grid_x);
        assert_eq!(pp.partial.grid, (tiles, pp.chunks, 1), "{ctx}");
        assert_eq!(pp.partial.block, (32, 8, 1), "{ctx}");
        assert_eq!(pp.finish.grid.0, (n as u32).div_ceil(256).min(limits.max_grid_x), "{ctx}");
        assert!(chunks * n as u64 <= MAX_PARTIAL_ELEMS.max(n as u64), "partials too big: {ctx}");
    }

    #[test]
    fn one_by_one() {
        let p = fwd(1, 1, DType::F32);
        assert_eq!(p.strategy, Strategy::Warp { lanes: 1, items: 1 });
        assert_eq!(p.launch.kernel, "ln_fwd_warp_s_i1");
        assert_eq!(p.launch.grid, (1, 1, 1));
        let b = bwd(1, 1, DType::F32);
        assert_eq!(b.rows.launch.kernel, "ln_bwd_warp_s_i1");
        assert_eq!(b.param.as_ref().unwrap().partial.kernel, "ln_bwd_gb_partial");
        let rms = NormSpec::rms_norm(1, 1, DType::F32);
        let from_y = BackwardVariant { from_y: true, ..PARAMS };
        let b = plan_backward(&rms, &L, true, &from_y).unwrap();
        assert_eq!(b.rows.launch.kernel, "rms_bwdy_warp_s_i1");
        assert_eq!(b.param.as_ref().unwrap().partial.kernel, "rms_bwdy_gb_partial");
        assert_eq!(b.param.as_ref().unwrap().finish.kernel, GB_FINAL);
        assert_eq!(plan_forward(&rms, &L, true).unwrap().launch.kernel, "rms_fwd_warp_s_i1");
        let pp = b.param.unwrap();
        assert_eq!((pp.chunks, pp.rows_per_chunk), (1, 1));
    }

    #[test]
    fn tiny_rows_use_sub_warps() {
        // N = 1: one lane per row, 32 rows per warp, 128 rows per block.
        let p = fwd(10_000, 1, DType::BF16);
        assert_eq!(p.strategy, Strategy::Warp { lanes: 1, items: 1 });
        assert_eq!(p.launch.grid.0, 10_000usize.div_ceil(128) as u32);
        // N = 3: four lanes, one element each; not a multiple of any vector width.
        let p = fwd(5, 3, DType::F32);
        assert_eq!(p.strategy, Strategy::Warp { lanes: 4, items: 1 });
        assert!(!p.vectorized);
        // N = 8 f32: two lanes of one float4 each.
        let p = fwd(5, 8, DType::F32);
        assert_eq!((p.strategy, p.vectorized), (Strategy::Warp { lanes: 2, items: 4 }, true));
    }

    #[test]
    fn transformer_widths() {
        let p = fwd(4096, 768, DType::F32);
        assert_eq!(p.strategy, Strategy::Warp { lanes: 32, items: 24 });
        assert_eq!(p.launch.kernel, "ln_fwd_warp_v_i24");
        let p = fwd(4096, 768, DType::BF16);
        assert_eq!(p.launch.kernel, "ln_fwd_warp_v_i24");
        let p = fwd(4096, 1024, DType::F16);
        assert_eq!(p.launch.kernel, "ln_fwd_warp_v_i32");
        // f64 holds at most 16 per thread in registers: 768 goes to a block.
        let p = fwd(4096, 768, DType::F64);
        assert_eq!(p.strategy, Strategy::BlockSmem);
        assert_eq!(p.launch.smem, 768 * 8);
        let p = fwd(1024, 4096, DType::F32);
        assert_eq!(
            (p.strategy, p.launch.block.0, p.launch.smem),
            (Strategy::BlockSmem, 256, 16384)
        );
        let b = bwd(1024, 4096, DType::F32);
        assert_eq!(b.rows.launch.smem, 2 * 16384);
        assert_eq!(b.rows.launch.kernel, "ln_bwd_block_v_smem");
    }

    #[test]
    fn very_long_rows() {
        // 65536 f32: 256 KiB does not fit in shared memory: re-read global memory.
        let p = fwd(64, 65536, DType::F32);
        assert_eq!((p.strategy, p.launch.block.0), (Strategy::BlockGlobal, 1024));
        // 65536 bf16: 128 KiB fits on an H100 and an A100 (after opting in) ...
        let p = fwd(64, 65536, DType::BF16);
        assert_eq!(p.strategy, Strategy::BlockSmem);
        assert!(p.launch.smem > DEFAULT_SMEM);
        // ... but x and dy together (256 KiB) do not.
        assert_eq!(bwd(64, 65536, DType::BF16).rows.strategy, Strategy::BlockGlobal);
        let p = plan_forward(&ln(64, 65536, DType::BF16), &DeviceLimits::A100, true).unwrap();
        assert_eq!(p.strategy, Strategy::BlockSmem);
    }

    #[test]
    fn misaligned_sizes_and_pointers_use_scalar_kernels() {
        for n in [1001, 4099, 65537] {
            assert!(!fwd(3, n, DType::F32).vectorized, "{n}");
        }
        let p = plan_forward(&ln(3, 768, DType::F32), &L, false).unwrap();
        assert_eq!(p.launch.kernel, "ln_fwd_warp_s_i24");
        // 6 bf16 = 12 bytes: not a multiple of 16 bytes.
        assert!(!fwd(3, 6, DType::BF16).vectorized);
        assert!(fwd(3, 6, DType::F64).vectorized);
    }

    #[test]
    fn zero_rows_plan_without_parameter_stages() {
        let p = fwd(0, 768, DType::F32);
        assert_eq!(p.launch.grid.0, 1);
        assert_eq!(bwd(0, 768, DType::F32).param, None);
        let none = BackwardVariant { dgamma: false, dbeta: false, ..PARAMS };
        assert_eq!(plan_backward(&ln(5, 768, DType::F32), &L, true, &none).unwrap().param, None);
    }

    #[test]
    fn many_rows_respect_grid_limits() {
        // A device with a 65535 grid in x: the row kernels loop, the chunk count stays ≤ 65535.
        let small = DeviceLimits { max_grid_x: 65535, ..L };
        for (rows, n) in
            [(65535 * 3 + 7, 1), (65535 * 129, 768), (65535 * 70_000, 1), (200_000, 4096)]
        {
            for dtype in DType::ALL {
                let spec = ln(rows, n, dtype);
                let p = plan_forward(&spec, &small, true).unwrap();
                check_invariants(&spec, &p, &small);
                assert!(p.launch.grid.0 <= 65535);
                let b = plan_backward(&spec, &small, true, &PARAMS).unwrap();
                check_invariants(&spec, &b.rows, &small);
                check_params(&spec, b.param.as_ref().unwrap(), &small);
            }
        }
    }

    #[test]
    fn parameter_reduction_order_depends_only_on_the_shape() {
        for (rows, n) in
            [(1, 1), (63, 5), (64, 768), (65, 768), (4096, 1024), (65536, 128), (7, 65536)]
        {
            let spec = ln(rows, n, DType::F32);
            let a = plan_params(&spec, false, &DeviceLimits::A100).unwrap();
            let h = plan_params(&spec, false, &DeviceLimits::H100).unwrap();
            assert_eq!(a, h);
            check_params(&spec, &a, &L);
        }
        let pp = plan_params(&ln(10_000, 768, DType::F32), false, &L).unwrap();
        assert_eq!((pp.chunks, pp.rows_per_chunk), (157, 64));
    }

    #[test]
    fn every_shape_gets_a_valid_plan() {
        for dtype in DType::ALL {
            for n in (1..=2100).chain([4095, 4096, 8192, 12288, 30001, 65536, 65537, 1 << 20]) {
                for rows in [1, 3, 131] {
                    for aligned in [true, false] {
                        for kind in NormKind::ALL {
                            let spec = NormSpec::new(kind, rows, n, dtype);
                            let p = plan_forward(&spec, &L, aligned).unwrap();
                            check_invariants(&spec, &p, &L);
                            let bx = plan_backward(&spec, &L, aligned, &PARAMS).unwrap();
                            check_invariants(&spec, &bx.rows, &L);
                            check_params(&spec, bx.param.as_ref().unwrap(), &L);
                            // From y: the same strategy (two tensors cached), its own kernels.
                            let v = BackwardVariant { from_y: true, ..PARAMS };
                            let by = plan_backward(&spec, &L, aligned, &v).unwrap();
                            check_invariants(&spec, &by.rows, &L);
                            check_params(&spec, by.param.as_ref().unwrap(), &L);
                            assert_eq!(by.rows.strategy, bx.rows.strategy);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn too_long_rows_are_an_error_not_a_panic() {
        let e = plan_forward(&ln(1, i32::MAX as usize + 1, DType::F16), &L, true).unwrap_err();
        assert_eq!(e.class(), "too-large");
        assert!(plan_forward(&ln(1, i32::MAX as usize, DType::F16), &L, true).is_ok());
    }

    #[test]
    fn kernel_table_matches_the_source() {
        // Every LN_WARP line of kernels/layernorm.cu, per dtype branch, must be in warp_items.
        let src = crate::kernels::SOURCE;
        for dtype in DType::ALL {
            for vectorized in [false, true] {
                for items in warp_items(dtype, vectorized) {
                    let v = if vectorized { vec_width(dtype) } else { 1 };
                    let tag = if vectorized { "v" } else { "s" };
                    let line = format!("LN_WARP(P, K, {tag}, {v}, {items})");
                    assert!(src.contains(&line), "{dtype}: `{line}` missing from layernorm.cu");
                }
            }
        }
        // Scalar 1–16 shared, scalar 24/32 below f64, then the vector kernels of f64, f32 and
        // f16/bf16.
        assert_eq!(src.matches("    LN_WARP(P, K, ").count(), 6 + 2 + 5 + 6 + 4);
    }

    #[test]
    fn every_kind_has_its_own_module_of_entry_points() {
        for dtype in DType::ALL {
            let ln = kernel_names(dtype, NormKind::LayerNorm);
            let rms = kernel_names(dtype, NormKind::RmsNorm);
            assert_eq!(ln.len(), rms.len());
            // Three row directions (fwd, bwd, bwdy) × (4 block + warp kernels), 2 partials, 1 final.
            let warps = warp_items(dtype, false).len() + warp_items(dtype, true).len();
            assert_eq!(ln.len(), 3 * (4 + warps) + 3, "{dtype}");
            assert!(ln.iter().all(|k| k.starts_with("ln_") || k == GB_FINAL));
            assert!(rms.iter().all(|k| k.starts_with("rms_") || k == GB_FINAL));
            let unique: std::collections::HashSet<_> = ln.iter().chain(&rms).collect();
            assert_eq!(unique.len(), 2 * ln.len() - 1, "names repeat in {dtype}");
        }
    }

    #[test]
    fn the_eps_rule() {
        // f32 arithmetic: ε from f32::MIN_POSITIVE up; below it a typed error naming both.
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let spec = ln(2, 8, dtype);
            let ok = spec.clone().with_eps(f32::MIN_POSITIVE as f64);
            assert_eq!(eps_args(&ok).unwrap(), (Arg::F32(f32::MIN_POSITIVE), Arg::I32(0)));
            let err = eps_args(&spec.clone().with_eps(1e-40)).unwrap_err();
            assert_eq!(err.class(), "unsupported-feature", "{dtype}");
            let msg = err.to_string();
            assert!(msg.contains("1e-40") && msg.contains("1.1754944e-38"), "{msg}");
            let plan = plan_forward(&spec, &L, true).unwrap();
            let tiny = spec.clone().with_eps(f64::from_bits(1));
            assert_eq!(forward_steps(&tiny, &plan, false).unwrap_err().class(), err.class());
        }
        // f64: every valid ε, the smallest subnormal included.
        let spec = ln(2, 8, DType::F64).with_eps(f64::from_bits(1));
        assert_eq!(eps_args(&spec).unwrap(), (Arg::F64(f64::from_bits(1)), Arg::I32(0)));
        // Beyond 2^100 (f32) or 2^1000 (f64): ε = m·2^(2q), m in [1, 4), exactly.
        for (dtype, eps) in [
            (DType::F32, 1e300),
            (DType::BF16, 1e40),
            (DType::F32, 2f64.powi(101)),
            (DType::F32, 2f64.powi(102)),
            (DType::F64, f64::MAX),
            (DType::F64, 1e305),
        ] {
            let (m, q) = match eps_args(&ln(1, 1, dtype).with_eps(eps)).unwrap() {
                (Arg::F32(m), Arg::I32(q)) => (m as f64, q),
                (Arg::F64(m), Arg::I32(q)) => (m, q),
                other => panic!("{other:?}"),
            };
            assert!((1.0..4.0).contains(&m) && q > 0, "{eps:e}: {m} {q}");
            let back = m * 2f64.powi(q) * 2f64.powi(q);
            let tol = if dtype == DType::F64 { 0.0 } else { 2f64.powi(-24) };
            assert!((back - eps).abs() <= tol * eps, "{eps:e}: {m}·2^(2·{q}) = {back:e}");
        }
        assert_eq!(eps_args(&ln(1, 1, DType::F32).with_eps(1e30)).unwrap().1, Arg::I32(0));
    }

    fn tensors(args: &[Arg]) -> Vec<Option<Tensor>> {
        args.iter()
            .filter_map(|a| match a {
                Arg::Tensor(t) => Some(Some(*t)),
                Arg::Null => Some(None),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn forward_arguments_follow_the_kind_and_the_residual() {
        use Tensor::*;
        let spec = NormSpec::rms_norm(3, 8, DType::F32).with_gamma_offset(1.0);
        let p = plan_forward(&spec, &L, true).unwrap();
        let steps = forward_steps(&spec, &p, true).unwrap();
        assert_eq!(steps.len(), 1);
        let a = &steps[0].args;
        assert_eq!(
            tensors(a),
            vec![Some(X), Some(Residual), Some(H), Some(Gamma), None, Some(Y), None, Some(Rstd)]
        );
        assert_eq!(a.len(), 15);
        assert_eq!(a[11..], [Arg::F32(1e-6), Arg::I32(0), Arg::F32(0.125), Arg::F32(1.0)]);
        let spec = ln(3, 8, DType::F64);
        let steps = forward_steps(&spec, &plan_forward(&spec, &L, true).unwrap(), false).unwrap();
        assert_eq!(
            tensors(&steps[0].args),
            vec![Some(X), None, None, Some(Gamma), Some(Beta), Some(Y), Some(Mean), Some(Rstd)]
        );
        assert!(forward_steps(&ln(0, 8, DType::F32), &p, false).unwrap().is_empty());
    }

    #[test]
    fn backward_arguments_follow_the_kind_and_the_variant() {
        use Tensor::*;
        // LayerNorm from x with both gradients: mean, residual means, partials.
        let spec = ln(5, 8, DType::F32);
        let b = plan_backward(&spec, &L, true, &PARAMS).unwrap();
        let steps = backward_steps(&spec, &b, &PARAMS);
        assert_eq!(steps.len(), 3);
        assert_eq!(
            tensors(&steps[0].args),
            vec![
                Some(X),
                Some(Dy),
                None,
                Some(Mean),
                Some(Rstd),
                Some(Gamma),
                None,
                Some(Dx),
                Some(ResidualMean)
            ]
        );
        assert_eq!(
            backward_scratch(&spec, &b, &PARAMS),
            vec![(ResidualMean, 5), (PartialGamma, 8), (PartialBeta, 8)]
        );
        // RMSNorm from y with dh and only dγ: no mean, β absent, γ read by both stages, no
        // residual means.
        let spec = NormSpec::rms_norm(5, 8, DType::BF16);
        let v = BackwardVariant { from_y: true, dh: true, dgamma: true, dbeta: false };
        let b = plan_backward(&spec, &L, true, &v).unwrap();
        let steps = backward_steps(&spec, &b, &v);
        assert_eq!(
            tensors(&steps[0].args),
            vec![Some(Y), Some(Dy), Some(Dh), None, Some(Rstd), Some(Gamma), None, Some(Dx), None]
        );
        assert_eq!(
            tensors(&steps[1].args),
            vec![Some(Y), Some(Dy), None, None, None, Some(Gamma), None, Some(PartialGamma), None]
        );
        assert_eq!(tensors(&steps[2].args), vec![Some(PartialGamma), None, Some(DGamma), None]);
        assert_eq!(backward_scratch(&spec, &b, &v), vec![(PartialGamma, 8)]);
        // LayerNorm from y with β and no parameter gradient: one launch, β read.
        let spec = ln(5, 8, DType::F16);
        let v = BackwardVariant { from_y: true, ..BackwardVariant::default() };
        let b = plan_backward(&spec, &L, true, &v).unwrap();
        let steps = backward_steps(&spec, &b, &v);
        assert_eq!(steps.len(), 1);
        assert_eq!(tensors(&steps[0].args)[6], Some(Beta));
        assert!(backward_scratch(&spec, &b, &v).is_empty());
    }
}
