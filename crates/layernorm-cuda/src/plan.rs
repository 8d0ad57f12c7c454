//! Host-side launch planning: which kernel, grid, block and shared memory for a shape on a device.
//!
//! Plain Rust with no CUDA dependency, so every decision is unit-tested on machines without a GPU.
//! The strategy follows the row length N (as PyTorch, Apex, OneFlow and QuACK do):
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

use layernorm_core::{DType, Error, NormSpec, Result};

use crate::NAME;

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

/// All kernel entry points of the module for `dtype`, in a fixed order.
pub fn kernel_names(dtype: DType) -> Vec<String> {
    let mut names = Vec::new();
    for dir in ["fwd", "bwd"] {
        for tag in ["s", "v"] {
            for mem in ["smem", "glob"] {
                names.push(format!("ln_{dir}_block_{tag}_{mem}"));
            }
            for items in warp_items(dtype, tag == "v") {
                names.push(format!("ln_{dir}_warp_{tag}_i{items}"));
            }
        }
    }
    names.push("ln_bwd_gb_partial".into());
    names.push("ln_bwd_gb_final".into());
    names
}

fn check_shape(rows: usize, n: usize) -> Result<()> {
    if n > i32::MAX as usize {
        return Err(too_large(rows, n, "2^31 − 1 elements per row (the kernels' column index)"));
    }
    Ok(())
}

/// Picks the strategy and launch for the row kernels; `backward` caches x and dy, not just x.
fn plan_rows(
    rows: usize,
    n: usize,
    dtype: DType,
    limits: &DeviceLimits,
    backward: bool,
    aligned: bool,
) -> Result<RowPlan> {
    check_shape(rows, n)?;
    let dir = if backward { "bwd" } else { "fwd" };
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
                kernel: format!("ln_{dir}_warp_{tag}_i{it}"),
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
            kernel: format!("ln_{dir}_block_{tag}_{mem}"),
            grid: (blocks, 1, 1),
            block: (threads, 1, 1),
            smem,
        },
        lanes: 0,
    })
}

/// Plans a forward pass over `rows × n` in `dtype`. `rows == 0` still returns a plan (the caller
/// launches nothing). `aligned`: every tensor starts on a 16-byte boundary (128-bit accesses are
/// then used when N allows).
pub fn plan_forward(
    rows: usize,
    n: usize,
    dtype: DType,
    limits: &DeviceLimits,
    aligned: bool,
) -> Result<RowPlan> {
    plan_rows(rows, n, dtype, limits, false, aligned)
}

/// Plans a backward pass; `aligned` as for [`plan_forward`]; `params` says whether dγ or dβ is wanted.
pub fn plan_backward(
    rows: usize,
    n: usize,
    dtype: DType,
    limits: &DeviceLimits,
    aligned: bool,
    params: bool,
) -> Result<BackwardPlan> {
    let row_plan = plan_rows(rows, n, dtype, limits, true, aligned)?;
    let param = if params && rows > 0 { Some(plan_params(rows, n, limits)?) } else { None };
    Ok(BackwardPlan { rows: row_plan, param })
}

/// The fixed chunking of the dγ/dβ reduction for a shape.
pub fn plan_params(rows: usize, n: usize, limits: &DeviceLimits) -> Result<ParamPlan> {
    check_shape(rows, n)?;
    let (rows64, n64) = (rows as u64, n as u64);
    let cap = MAX_CHUNKS.min((MAX_PARTIAL_ELEMS / n64).max(1)).min(limits.max_grid_y as u64);
    let chunks = rows64.div_ceil(ROWS_PER_CHUNK).clamp(1, cap);
    let rows_per_chunk = rows64.div_ceil(chunks).max(1);
    let chunks = rows64.div_ceil(rows_per_chunk).max(1);
    // Both stages loop over columns when the grid limit caps them.
    let col_tiles = n64.div_ceil(GB_BLOCK.0 as u64).min(limits.max_grid_x as u64);
    let final_blocks = n64.div_ceil(GB_FINAL_BLOCK as u64).min(limits.max_grid_x as u64);
    Ok(ParamPlan {
        chunks: chunks as u32,
        rows_per_chunk,
        partial: Launch {
            kernel: "ln_bwd_gb_partial".into(),
            grid: (col_tiles as u32, chunks as u32, 1),
            block: (GB_BLOCK.0, GB_BLOCK.1, 1),
            smem: 0,
        },
        finish: Launch {
            kernel: "ln_bwd_gb_final".into(),
            grid: (final_blocks as u32, 1, 1),
            block: (GB_FINAL_BLOCK, 1, 1),
            smem: 0,
        },
    })
}

/// A tensor a kernel argument points to: the problem's own, or the backward's scratch buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tensor {
    /// Input x.
    X,
    /// Scale γ.
    Gamma,
    /// Shift β.
    Beta,
    /// Output y.
    Y,
    /// Per-row mean.
    Mean,
    /// Per-row rstd.
    Rstd,
    /// Incoming gradient dy.
    Dy,
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

/// The launches of a forward pass (`LN_FWD_ARGS`). Empty when `rows == 0`.
pub fn forward_steps(spec: &NormSpec, plan: &RowPlan) -> Vec<Step> {
    use Tensor::*;
    if spec.rows == 0 {
        return Vec::new();
    }
    let args = vec![
        Arg::Tensor(X),
        opt(spec.gamma, Gamma),
        opt(spec.beta, Beta),
        Arg::Tensor(Y),
        Arg::Tensor(Mean),
        Arg::Tensor(Rstd),
        Arg::U64(spec.rows as u64),
        Arg::I32(spec.n as i32),
        Arg::I32(plan.lanes as i32),
        acc(spec.dtype, spec.eps),
        acc(spec.dtype, 1.0 / spec.n as f64),
    ];
    vec![Step { launch: plan.launch.clone(), args }]
}

/// The launches of a backward pass (`LN_BWD_ARGS`, then `ln_bwd_gb_partial` and
/// `ln_bwd_gb_final` when a parameter gradient is wanted). Empty when `rows == 0` (the caller
/// zero-fills dγ/dβ).
pub fn backward_steps(
    spec: &NormSpec,
    plan: &BackwardPlan,
    dgamma: bool,
    dbeta: bool,
) -> Vec<Step> {
    use Tensor::*;
    if spec.rows == 0 {
        return Vec::new();
    }
    let (rows, n) = (spec.rows as u64, spec.n as i32);
    let pp = plan.param.as_ref().filter(|_| dgamma || dbeta);
    let mut steps = vec![Step {
        launch: plan.rows.launch.clone(),
        args: vec![
            Arg::Tensor(X),
            Arg::Tensor(Dy),
            Arg::Tensor(Mean),
            Arg::Tensor(Rstd),
            opt(spec.gamma, Gamma),
            Arg::Tensor(Dx),
            opt(pp.is_some(), ResidualMean),
            Arg::U64(rows),
            Arg::I32(n),
            Arg::I32(plan.rows.lanes as i32),
            acc(spec.dtype, 1.0 / spec.n as f64),
        ],
    }];
    if let Some(pp) = pp {
        steps.push(Step {
            launch: pp.partial.clone(),
            args: vec![
                Arg::Tensor(X),
                Arg::Tensor(Dy),
                Arg::Tensor(Mean),
                Arg::Tensor(Rstd),
                Arg::Tensor(ResidualMean),
                opt(dgamma, PartialGamma),
                opt(dbeta, PartialBeta),
                Arg::U64(rows),
                Arg::I32(n),
                Arg::U64(pp.rows_per_chunk),
            ],
        });
        steps.push(Step {
            launch: pp.finish.clone(),
            args: vec![
                opt(dgamma, PartialGamma),
                opt(dbeta, PartialBeta),
                opt(dgamma, DGamma),
                opt(dbeta, DBeta),
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

    fn fwd(rows: usize, n: usize, dtype: DType) -> RowPlan {
        plan_forward(rows, n, dtype, &L, true).unwrap()
    }

    fn bwd(rows: usize, n: usize, dtype: DType) -> BackwardPlan {
        plan_backward(rows, n, dtype, &L, true, true).unwrap()
    }

    /// Everything a plan must satisfy for the kernels to be correct, whatever the shape.
    fn check_invariants(rows: usize, n: usize, dtype: DType, p: &RowPlan, limits: &DeviceLimits) {
        let ctx = format!("{rows}×{n} {dtype}: {p:?}");
        assert!(kernel_names(dtype).contains(&p.launch.kernel), "unknown kernel: {ctx}");
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

    fn check_params(rows: usize, n: usize, pp: &ParamPlan, limits: &DeviceLimits) {
        let ctx = format!("{rows}×{n}: {pp:?}");
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
        let p = plan_forward(64, 65536, DType::BF16, &DeviceLimits::A100, true).unwrap();
        assert_eq!(p.strategy, Strategy::BlockSmem);
    }

    #[test]
    fn misaligned_sizes_and_pointers_use_scalar_kernels() {
        for n in [1001, 4099, 65537] {
            assert!(!fwd(3, n, DType::F32).vectorized, "{n}");
        }
        let p = plan_forward(3, 768, DType::F32, &L, false).unwrap();
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
        assert_eq!(plan_backward(5, 768, DType::F32, &L, true, false).unwrap().param, None);
    }

    #[test]
    fn many_rows_respect_grid_limits() {
        // A device with a 65535 grid in x: the row kernels loop, the chunk count stays ≤ 65535.
        let small = DeviceLimits { max_grid_x: 65535, ..L };
        for (rows, n) in
            [(65535 * 3 + 7, 1), (65535 * 129, 768), (65535 * 70_000, 1), (200_000, 4096)]
        {
            for dtype in DType::ALL {
                let p = plan_forward(rows, n, dtype, &small, true).unwrap();
                check_invariants(rows, n, dtype, &p, &small);
                assert!(p.launch.grid.0 <= 65535);
                let b = plan_backward(rows, n, dtype, &small, true, true).unwrap();
                check_invariants(rows, n, dtype, &b.rows, &small);
                check_params(rows, n, b.param.as_ref().unwrap(), &small);
            }
        }
    }

    #[test]
    fn parameter_reduction_order_depends_only_on_the_shape() {
        for (rows, n) in
            [(1, 1), (63, 5), (64, 768), (65, 768), (4096, 1024), (65536, 128), (7, 65536)]
        {
            let a = plan_params(rows, n, &DeviceLimits::A100).unwrap();
            let h = plan_params(rows, n, &DeviceLimits::H100).unwrap();
            assert_eq!(a, h);
            check_params(rows, n, &a, &L);
        }
        let pp = plan_params(10_000, 768, &L).unwrap();
        assert_eq!((pp.chunks, pp.rows_per_chunk), (157, 64));
    }

    #[test]
    fn every_shape_gets_a_valid_plan() {
        for dtype in DType::ALL {
            for n in (1..=2100).chain([4095, 4096, 8192, 12288, 30001, 65536, 65537, 1 << 20]) {
                for rows in [1, 3, 131] {
                    for aligned in [true, false] {
                        let p = plan_forward(rows, n, dtype, &L, aligned).unwrap();
                        check_invariants(rows, n, dtype, &p, &L);
                        let b = plan_backward(rows, n, dtype, &L, aligned, true).unwrap();
                        check_invariants(rows, n, dtype, &b.rows, &L);
                        check_params(rows, n, b.param.as_ref().unwrap(), &L);
                    }
                }
            }
        }
    }

    #[test]
    fn too_long_rows_are_an_error_not_a_panic() {
        let e = plan_forward(1, i32::MAX as usize + 1, DType::F16, &L, true).unwrap_err();
        assert_eq!(e.class(), "too-large");
        assert!(plan_forward(1, i32::MAX as usize, DType::F16, &L, true).is_ok());
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
                    let line = format!("LN_WARP({tag}, {v}, {items})");
                    assert!(src.contains(&line), "{dtype}: `{line}` missing from layernorm.cu");
                }
            }
        }
        assert_eq!(src.matches("\nLN_WARP(").count(), 11 + 8 + 6 + 4);
    }
}
