//! WGSL assembly (dtype prelude + kernel file), the per-device pipeline cache, and the choice of
//! kernel shape by N.
//!
//! Every kernel file under `shaders/` is written against a small dtype interface (`IN_T`, `OUT_T`,
//! `V`, `W`, `get_<name>`, `load_<name>`, `put_<name>`) that one of the files under `shaders/io/`
//! provides. The io file's head is emitted once; its `// @get`, `// @load` and `// @put` sections
//! are templates, copied once per tensor name the kernel reads, reads back from an output
//! binding, or writes, with `NAME` replaced (an io without a `// @load` section reads outputs
//! like inputs).
//!
//! The kind and the variants are not separate sources: they are bits of each kernel's `flags`
//! word ([`Flags`]), read by one source per kernel family.

use std::collections::HashMap;
use std::sync::Mutex;

use layernorm_core::DType;

const CONSTS: &str = include_str!("../shaders/consts.wgsl");
const COMMON: &str = include_str!("../shaders/common.wgsl");
const REDUCE_PLAIN: &str = include_str!("../shaders/reduce_plain.wgsl");
const REDUCE_SG: &str = include_str!("../shaders/reduce_sg.wgsl");
const STREAM: &str = include_str!("../shaders/stream.wgsl");
const STREAM_NONE: &str = include_str!("../shaders/stream_none.wgsl");
const FORWARD: &str = include_str!("../shaders/forward.wgsl");
const BACKWARD: &str = include_str!("../shaders/backward.wgsl");
const XHAT: &str = include_str!("../shaders/xhat.wgsl");
const PARAMS_GRAD: &str = include_str!("../shaders/params_grad.wgsl");
const PARAMS_FINISH: &str = include_str!("../shaders/params_finish.wgsl");
const COPY: &str = include_str!("../shaders/copy.wgsl");

/// Threads per workgroup of the row kernels (`WG` in `common.wgsl`).
pub(crate) const WG: u32 = 256;
/// Items each thread may cache in registers (`KMAX` in `common.wgsl`).
const KMAX: u32 = 8;
/// Items per thread the row kernels aim for when choosing threads per row.
const ITEMS_PER_THREAD: u32 = 8;
/// Threads per workgroup of the column kernels (`CW` in `params_*.wgsl`).
pub(crate) const CW: u32 = 64;

/// How tensors of one dtype are stored and accessed by a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Io {
    F32,
    F32x4,
    F16,
    F16x4,
    Bf16,
    Bf16x2,
}

impl Io {
    fn source(self) -> &'static str {
        match self {
            Io::F32 => include_str!("../shaders/io/f32.wgsl"),
            Io::F32x4 => include_str!("../shaders/io/f32x4.wgsl"),
            Io::F16 => include_str!("../shaders/io/f16.wgsl"),
            Io::F16x4 => include_str!("../shaders/io/f16x4.wgsl"),
            Io::Bf16 => include_str!("../shaders/io/bf16.wgsl"),
            Io::Bf16x2 => include_str!("../shaders/io/bf16x2.wgsl"),
        }
    }

    /// The helpers of the compute type `V` (`hsum`, `vmaxabs`, `vscale`, `vfirst`), by width.
    fn lanes(self) -> &'static str {
        match self.width() {
            1 => include_str!("../shaders/io/lanes1.wgsl"),
            2 => include_str!("../shaders/io/lanes2.wgsl"),
            _ => include_str!("../shaders/io/lanes4.wgsl"),
        }
    }

    /// Elements per item.
    pub(crate) fn width(self) -> usize {
        match self {
            Io::F32 | Io::F16 | Io::Bf16 => 1,
            Io::Bf16x2 => 2,
            Io::F32x4 | Io::F16x4 => 4,
        }
    }

    /// The element-at-a-time access for `dtype` (any N).
    pub(crate) fn scalar(dtype: DType) -> Io {
        match dtype {
            DType::F16 => Io::F16,
            DType::BF16 => Io::Bf16,
            _ => Io::F32,
        }
    }

    /// Whether this io moves one element per item (what [`Io::scalar`] gives).
    pub(crate) fn is_scalar(self) -> bool {
        matches!(self, Io::F32 | Io::F16 | Io::Bf16)
    }

    /// The widest access whose items never straddle two rows of `n` elements.
    pub(crate) fn widest(dtype: DType, n: usize) -> Io {
        match dtype {
            DType::F16 if n.is_multiple_of(4) => Io::F16x4,
            DType::F16 => Io::F16,
            DType::BF16 if n.is_multiple_of(2) => Io::Bf16x2,
            DType::BF16 => Io::Bf16,
            _ if n.is_multiple_of(4) => Io::F32x4,
            _ => Io::F32,
        }
    }
}

/// Bits of the kernels' `flags` word: the same numbers as the `F_*` constants of
/// `shaders/consts.wgsl`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Flags(pub u32);

impl Flags {
    pub const GAMMA: u32 = 1;
    pub const BETA: u32 = 2;
    pub const RMS: u32 = 4;
    pub const RES_ADD: u32 = 8;
    pub const RES_IN_PLACE: u32 = 16;
    pub const FROM_Y: u32 = 32;
    pub const DH: u32 = 64;
    pub const PARTIALS: u32 = 128;
    pub const DGAMMA: u32 = 256;
    pub const DBETA: u32 = 512;

    /// Sets `bit` when `on`.
    pub fn with(self, bit: u32, on: bool) -> Flags {
        Flags(if on { self.0 | bit } else { self.0 })
    }
}

/// Which kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    Forward,
    Backward,
    ParamsGrad,
    ParamsFinish,
    Copy,
}

impl Kernel {
    fn entry(self) -> &'static str {
        match self {
            Kernel::Forward | Kernel::Backward | Kernel::Copy => "main",
            Kernel::ParamsGrad => "partials",
            Kernel::ParamsFinish => "finish",
        }
    }

    fn uses_overrides(self) -> bool {
        matches!(self, Kernel::Forward | Kernel::Backward)
    }

    /// The full WGSL source of this kernel over `io`; `subgroups` selects the subgroup
    /// reductions (`shaders/reduce_sg.wgsl`) for the row kernels, and a nonzero `unroll` the
    /// driver of rows streamed from memory with that many items per loop iteration
    /// (`shaders/stream.wgsl`, for shapes with K = 0: [`Shape::unroll`]; elsewhere a stand-in,
    /// since the unrolled driver would only lengthen the compile). The dγ/dβ kernels index one
    /// element per item and exist over scalar io only (naga rejects them over vectors).
    pub(crate) fn source(self, io: Io, subgroups: bool, unroll: u32) -> String {
        debug_assert!(
            !matches!(self, Kernel::ParamsGrad | Kernel::ParamsFinish) || io.is_scalar(),
            "{self:?} over {io:?}: the dγ/dβ kernels take scalar io"
        );
        // (body, inputs, outputs read back, outputs, whether it forms xhat)
        type Parts = (
            &'static str,
            &'static [&'static str],
            &'static [&'static str],
            &'static [&'static str],
            bool,
        );
        let (body, gets, loads, puts, xhat): Parts = match self {
            Kernel::Forward => {
                (FORWARD, &["x", "gamma", "beta", "res"], &["h"], &["y", "h"], false)
            }
            Kernel::Backward => (BACKWARD, &["x", "dy", "gamma", "beta", "dh"], &[], &["dx"], true),
            Kernel::ParamsGrad => (PARAMS_GRAD, &["x", "dy", "gamma", "beta"], &[], &[], true),
            Kernel::ParamsFinish => (PARAMS_FINISH, &[], &[], &["dgamma", "dbeta"], false),
            Kernel::Copy => return COPY.to_string(),
        };
        let io_src = io.source();
        let section = |tag: &str| io_src.find(tag);
        let get_at = section("// @get").expect("io prelude has a // @get section");
        let put_at = section("// @put").expect("io prelude has a // @put section");
        let load_at = section("// @load");
        let head = &io_src[..get_at];
        let get_t = &io_src[get_at..load_at.unwrap_or(put_at)];
        let load_t = match load_at {
            Some(at) => io_src[at..put_at].to_string(),
            None => get_t.replace("get_NAME", "load_NAME"),
        };
        let put_t = &io_src[put_at..];
        let mut s = String::with_capacity(16384);
        s.push_str(head);
        s.push_str(io.lanes());
        s.push_str(CONSTS);
        for name in gets {
            s.push_str(&get_t.replace("NAME", name));
        }
        for name in loads {
            s.push_str(&load_t.replace("NAME", name));
        }
        for name in puts {
            s.push_str(&put_t.replace("NAME", name));
        }
        if self.uses_overrides() {
            s.push_str(COMMON);
            s.push_str(if subgroups { REDUCE_SG } else { REDUCE_PLAIN });
            if unroll == 0 {
                s.push_str(STREAM_NONE);
            } else {
                debug_assert!(unroll == 16 || unroll == 32, "unroll {unroll}");
                let wide = if unroll == 32 { "s_item16(step, j + 16u * TPR);" } else { "" };
                s.push_str(
                    &STREAM.replace("/*UNROLL*/", &unroll.to_string()).replace("/*WIDE*/", wide),
                );
            }
        }
        if xhat {
            s.push_str(XHAT);
        }
        let (args, check) = if subgroups && self.uses_overrides() {
            (
                "@builtin(subgroup_invocation_id) sg_lane: u32,\n    \
                 @builtin(subgroup_size) sg_size: u32,",
                "sg_check(lid, sg_lane, sg_size)",
            )
        } else {
            ("", "0u")
        };
        s.push_str(&body.replace("/*SG_ARGS*/", args).replace("/*SG_CHECK*/", check));
        s
    }
}

/// The limit llvmpipe (lavapipe, Mesa's GL driver) puts on the loop iterations of one
/// invocation, all its loops together; past it every loop ends early, without an error. The
/// streamed rows are planned against it on every device (`WgpuBackend::with_loop_limit`).
pub(crate) const LOOP_LIMIT: usize = 65535;
/// Loop iterations a streamed row kernel makes outside its streamed passes, at most: three
/// segment reductions of at most 8 + 255 iterations each (whatever the subgroup size), and the
/// rows loop.
const LOOP_RESERVE: usize = 1024;
/// Streamed passes over a row, at most: the forward's four (the backward makes two).
const STREAMED_PASSES: usize = 4;

/// The shape of a row-kernel launch: threads per row and items cached per thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Shape {
    /// Threads per row (a power of two ≤ [`WG`]).
    pub tpr: u32,
    /// Items per thread kept in registers; 0 re-reads the row on every pass.
    pub k: u32,
    /// Items per loop iteration of a streamed row (K = 0): 16, or 32 where the passes at 16
    /// would exceed the loop limit ([`Shape::streamed_unroll`]); 0 when K > 0.
    pub unroll: u32,
}

impl Shape {
    /// Picks the shape for rows of `nv` items: about [`ITEMS_PER_THREAD`] items per thread, so
    /// several rows share a workgroup when N is small and one workgroup owns a row when it is
    /// large; rows of more than `WG * KMAX` items are streamed from memory on every pass, planned
    /// against `loop_limit` iterations an invocation ([`LOOP_LIMIT`] unless lowered).
    pub(crate) fn for_items(nv: usize, loop_limit: usize) -> Shape {
        let want = nv.div_ceil(ITEMS_PER_THREAD as usize).max(1);
        let tpr = want.next_power_of_two().min(WG as usize) as u32;
        let per_thread = nv.div_ceil(tpr as usize);
        let k = if per_thread <= KMAX as usize { per_thread.next_power_of_two() as u32 } else { 0 };
        let unroll = if k > 0 { 0 } else { Self::streamed_unroll(per_thread, loop_limit) };
        Shape { tpr, k, unroll }
    }

    /// Items per loop iteration for a streamed row of `per_thread` items a thread: 16 while
    /// [`STREAMED_PASSES`] passes stay within `loop_limit` iterations (with [`LOOP_RESERVE`]
    /// for the other loops), else 32 (within [`LOOP_LIMIT`] up to 2^18 items a thread, the
    /// largest row llvmpipe's 128 MiB binding holds). The row is summed in the same order
    /// either way.
    fn streamed_unroll(per_thread: usize, loop_limit: usize) -> u32 {
        if Self::streamed_iterations(per_thread, 16) <= loop_limit { 16 } else { 32 }
    }

    /// Loop iterations one invocation of a streamed row kernel makes at most, for `per_thread`
    /// items a thread and `unroll` items a loop iteration.
    fn streamed_iterations(per_thread: usize, unroll: usize) -> usize {
        STREAMED_PASSES * per_thread.div_ceil(unroll) + LOOP_RESERVE
    }

    /// Rows one workgroup handles.
    pub(crate) fn rows_per_group(self) -> u32 {
        WG / self.tpr
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    kernel: Kernel,
    io: Io,
    shape: Option<Shape>,
    subgroups: bool,
}

/// Compiled pipelines of one device, created on first use and kept.
#[derive(Default)]
pub(crate) struct Cache {
    modules: Mutex<HashMap<(Kernel, Io, bool, u32), wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<Key, wgpu::ComputePipeline>>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.pipelines.lock().map(|p| p.len()).unwrap_or(0);
        f.debug_struct("Cache").field("pipelines", &n).finish()
    }
}

impl Cache {
    /// The pipeline for `kernel` over `io` with `shape` (row kernels only), compiling it on first
    /// use. Compilation errors come back as `Err(message)`, never as a panic.
    pub(crate) fn pipeline(
        &self,
        device: &wgpu::Device,
        kernel: Kernel,
        io: Io,
        shape: Option<Shape>,
        subgroups: bool,
    ) -> Result<wgpu::ComputePipeline, String> {
        let subgroups = subgroups && kernel.uses_overrides();
        let key = Key { kernel, io, shape, subgroups };
        if let Some(p) = self.pipelines.lock().map_err(|e| e.to_string())?.get(&key) {
            return Ok(p.clone());
        }
        let unroll = shape.map_or(0, |s| s.unroll);
        let module = self.module(device, kernel, io, subgroups, unroll)?;
        let constants: Vec<(&str, f64)> = match shape {
            Some(s) => vec![("TPR", f64::from(s.tpr)), ("K", f64::from(s.k))],
            None => Vec::new(),
        };
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("layernorm"),
            layout: None,
            module: &module,
            entry_point: Some(kernel.entry()),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(format!("{kernel:?}/{io:?} pipeline: {}", crate::error_text(&e)));
        }
        self.pipelines.lock().map_err(|e| e.to_string())?.insert(key, pipeline.clone());
        Ok(pipeline)
    }

    fn module(
        &self,
        device: &wgpu::Device,
        kernel: Kernel,
        io: Io,
        subgroups: bool,
        unroll: u32,
    ) -> Result<wgpu::ShaderModule, String> {
        let key = (kernel, io, subgroups, unroll);
        if let Some(m) = self.modules.lock().map_err(|e| e.to_string())?.get(&key) {
            return Ok(m.clone());
        }
        let src = kernel.source(io, subgroups, unroll);
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("layernorm"),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(format!("{kernel:?}/{io:?} shader: {}", crate::error_text(&e)));
        }
        self.modules.lock().map_err(|e| e.to_string())?.insert(key, module.clone());
        Ok(module)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_by_n() {
        assert_eq!(Shape::for_items(1, LOOP_LIMIT), Shape { tpr: 1, k: 1, unroll: 0 });
        assert_eq!(Shape::for_items(3, LOOP_LIMIT), Shape { tpr: 1, k: 4, unroll: 0 });
        assert_eq!(Shape::for_items(192, LOOP_LIMIT), Shape { tpr: 32, k: 8, unroll: 0 });
        assert_eq!(Shape::for_items(1024, LOOP_LIMIT), Shape { tpr: 128, k: 8, unroll: 0 });
        assert_eq!(Shape::for_items(2048, LOOP_LIMIT), Shape { tpr: 256, k: 8, unroll: 0 });
        assert_eq!(Shape::for_items(16384, LOOP_LIMIT), Shape { tpr: 256, k: 0, unroll: 16 });
        // The widest 16-item rows, and the first 32-item one; 2^26 items (bf16 or f16 of odd N
        // filling a 128 MiB binding) needs 32.
        assert_eq!(Shape::for_items(66_056_192, LOOP_LIMIT).unroll, 16);
        assert_eq!(Shape::for_items(66_056_193, LOOP_LIMIT).unroll, 32);
        assert_eq!(Shape::for_items(1 << 26, LOOP_LIMIT).unroll, 32);
    }

    #[test]
    fn streamed_rows_stay_within_llvmpipe_loop_limit() {
        // Every thread's share of a streamed row up to llvmpipe's largest (2^18 items a thread:
        // 2^26 16-bit items in its 128 MiB binding): the chosen driver's passes and the other
        // loops fit the limit. Devices with larger bindings have no such limit.
        for per_thread in (1..=1usize << 18).step_by(97).chain([1 << 18]) {
            let unroll = Shape::streamed_unroll(per_thread, LOOP_LIMIT) as usize;
            let iterations = Shape::streamed_iterations(per_thread, unroll);
            assert!(iterations <= LOOP_LIMIT, "{per_thread} items a thread: {iterations}");
        }
        // The reserve covers the reductions of `common.wgsl` / `reduce_sg.wgsl` at any subgroup
        // size (up to 8 shuffle steps and WG - 1 partial sums each, three in the forward), and
        // the rows loop.
        assert!(3 * (8 + (WG as usize - 1)) < LOOP_RESERVE);
    }

    #[test]
    fn the_backward_binds_the_most_storage_buffers() {
        // `from_device` refuses a device with fewer than STORAGE_BUFFERS per shader stage.
        let count = |k: Kernel| k.source(Io::F32, false, 16).matches("var<storage").count() as u32;
        assert_eq!(count(Kernel::Backward), crate::STORAGE_BUFFERS);
        for k in [Kernel::Forward, Kernel::ParamsGrad, Kernel::ParamsFinish, Kernel::Copy] {
            assert!(count(k) <= crate::STORAGE_BUFFERS, "{k:?}");
        }
    }

    #[test]
    fn every_kernel_assembles_and_validates_for_every_io() {
        // naga's WGSL front end and validator (what wgpu runs at shader creation), so every
        // variant the dispatch can build is checked here, including those the test device
        // never builds. The dγ/dβ kernels are only built with scalar io (`dispatch.rs`).
        use wgpu::naga::valid::{Capabilities, ValidationFlags, Validator};
        for io in [Io::F32, Io::F32x4, Io::F16, Io::F16x4, Io::Bf16, Io::Bf16x2] {
            let kernels: &[Kernel] = if io.is_scalar() {
                &[Kernel::Forward, Kernel::Backward, Kernel::ParamsGrad, Kernel::ParamsFinish]
            } else {
                &[Kernel::Forward, Kernel::Backward]
            };
            for &k in kernels {
                for sg in [false, true] {
                    for unroll in [0, 16, 32] {
                        let s = k.source(io, sg, unroll);
                        let what = format!("{k:?}/{io:?}/sg={sg}/unroll={unroll}");
                        let left = ["NAME", "/*SG_", "/*UNROLL*/", "/*WIDE*/"];
                        assert!(!left.iter().any(|p| s.contains(p)), "{what}");
                        let module = wgpu::naga::front::wgsl::parse_str(&s)
                            .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&s)));
                        Validator::new(ValidationFlags::all(), Capabilities::all())
                            .validate(&module)
                            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
                    }
                }
            }
        }
    }
}
