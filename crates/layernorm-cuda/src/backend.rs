//! [`CudaBackend`]: device selection, buffers, the per-dtype module cache and the launches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    LaunchConfig, PushKernelArg, SyncOnDrop,
};
use layernorm_core::{
    Backend, Backward, DType, DeviceInfo, DeviceKind, Error, Forward, HostSlice, HostSliceMut,
    NormKind, NormSpec, Normalize, Result, Storage, check_download,
};

use crate::plan::{self, Arg, DeviceLimits, Step, Tensor};
use crate::{NAME, kernels};

fn dev_err(e: impl std::fmt::Display) -> Error {
    Error::device(NAME, e)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Device storage of one tensor: f16 and bf16 travel as their 16-bit patterns.
#[derive(Debug)]
enum Data {
    Bits16(CudaSlice<u16>),
    F32(CudaSlice<f32>),
    F64(CudaSlice<f64>),
}

/// A device buffer of any dtype: a [`CudaSlice`] plus its dtype and length.
///
/// The allocation always holds at least one element (CUDA cannot allocate zero bytes); [`len`]
/// is the logical length.
///
/// [`len`]: Storage::len
#[derive(Debug)]
pub struct CudaBuffer {
    data: Data,
    dtype: DType,
    len: usize,
}

impl Storage for CudaBuffer {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl CudaBuffer {
    /// The `f32` slice, if this buffer holds `f32`.
    pub fn as_f32(&self) -> Option<&CudaSlice<f32>> {
        match &self.data {
            Data::F32(s) => Some(s),
            _ => None,
        }
    }
    /// The `f64` slice, if this buffer holds `f64`.
    pub fn as_f64(&self) -> Option<&CudaSlice<f64>> {
        match &self.data {
            Data::F64(s) => Some(s),
            _ => None,
        }
    }
    /// The 16-bit patterns, if this buffer holds `f16` or `bf16`.
    pub fn as_bits16(&self) -> Option<&CudaSlice<u16>> {
        match &self.data {
            Data::Bits16(s) => Some(s),
            _ => None,
        }
    }

    fn context(&self) -> &Arc<CudaContext> {
        match &self.data {
            Data::Bits16(s) => s.context(),
            Data::F32(s) => s.context(),
            Data::F64(s) => s.context(),
        }
    }

    fn ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        match &self.data {
            Data::Bits16(s) => s.device_ptr(stream),
            Data::F32(s) => s.device_ptr(stream),
            Data::F64(s) => s.device_ptr(stream),
        }
    }

    fn ptr_mut<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        match &mut self.data {
            Data::Bits16(s) => s.device_ptr_mut(stream),
            Data::F32(s) => s.device_ptr_mut(stream),
            Data::F64(s) => s.device_ptr_mut(stream),
        }
    }
}

/// Device pointers of the tensors of one call, with the guards that keep cudarc's stream
/// bookkeeping right until the launches are queued.
#[derive(Default)]
struct Pointers<'a> {
    ptrs: HashMap<Tensor, u64>,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Pointers<'a> {
    fn read(&mut self, t: Tensor, b: &'a CudaBuffer, st: &'a CudaStream) {
        let (p, g) = b.ptr(st);
        self.ptrs.insert(t, p);
        self.guards.push(g);
    }
    fn read_opt(&mut self, t: Tensor, b: Option<&'a CudaBuffer>, st: &'a CudaStream) {
        if let Some(b) = b {
            self.read(t, b, st);
        }
    }
    fn write(&mut self, t: Tensor, b: &'a mut CudaBuffer, st: &'a CudaStream) {
        let (p, g) = b.ptr_mut(st);
        self.ptrs.insert(t, p);
        self.guards.push(g);
    }
    /// Whether every present tensor of `ts` starts on a 16-byte boundary.
    fn aligned(&self, ts: &[Tensor]) -> bool {
        ts.iter().filter_map(|t| self.ptrs.get(t)).all(|p| p % 16 == 0)
    }
}

/// LayerNorm on an NVIDIA GPU through cudarc, with kernels compiled by NVRTC at run time for the
/// device's compute capability and cached per dtype.
///
/// All work is queued on one stream; [`Normalize::download`] waits for it.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    limits: DeviceLimits,
    modules: Mutex<HashMap<DType, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(DType, String), CudaFunction>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("ordinal", &self.ctx.ordinal())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// Registry name.
    pub const NAME: &'static str = NAME;

    /// The backend on device 0.
    pub fn new() -> Result<CudaBackend> {
        Self::with_device(0)
    }

    /// The backend on device `ordinal`. [`Error::Unavailable`] names what is missing: the driver
    /// library, NVRTC, any device, or this device.
    pub fn with_device(ordinal: usize) -> Result<CudaBackend> {
        crate::driver_available().map_err(|why| Error::unavailable(NAME, why))?;
        crate::nvrtc_available().map_err(|why| Error::unavailable(NAME, why))?;
        let count = CudaContext::device_count().map_err(|e| {
            Error::unavailable(NAME, format!("the CUDA driver failed to initialise: {e}"))
        })?;
        if count <= 0 {
            return Err(Error::unavailable(NAME, "no CUDA device is present"));
        }
        if ordinal >= count as usize {
            return Err(Error::unavailable(
                NAME,
                format!("no CUDA device {ordinal} (there are {count})"),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| {
            Error::unavailable(NAME, format!("cannot create a context on device {ordinal}: {e}"))
        })?;
        Self::from_context(ctx)
    }

    /// The backend on a context the caller created, queueing work on its default stream.
    pub fn from_context(ctx: Arc<CudaContext>) -> Result<CudaBackend> {
        let stream = ctx.default_stream();
        Self::from_stream(stream)
    }

    /// The backend on a stream the caller owns (its context is the device).
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<CudaBackend> {
        crate::nvrtc_available().map_err(|why| Error::unavailable(NAME, why))?;
        let ctx = stream.context().clone();
        let limits = query_limits(&ctx)?;
        plan::check_device(&limits)?;
        Ok(CudaBackend {
            ctx,
            stream,
            limits,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })
    }

    /// The device's limits as the planner sees them.
    pub fn limits(&self) -> &DeviceLimits {
        &self.limits
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream all work is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(dev_err)
    }

    /// A device-to-device copy of `src` into `dst` (same dtype and length): the bandwidth
    /// yardstick of the benchmark.
    pub fn copy(&self, src: &CudaBuffer, dst: &mut CudaBuffer) -> Result<()> {
        self.check_own("copy source", src)?;
        self.check_own("copy destination", dst)?;
        if src.len != dst.len {
            let (expected, got) = (src.len, dst.len);
            return Err(Error::ShapeMismatch { tensor: "copy destination", expected, got });
        }
        if src.dtype != dst.dtype {
            let (expected, got) = (src.dtype, dst.dtype);
            return Err(Error::DTypeMismatch { tensor: "copy destination", expected, got });
        }
        let s = &self.stream;
        match (&src.data, &mut dst.data) {
            (Data::Bits16(a), Data::Bits16(b)) => s.memcpy_dtod(a, b),
            (Data::F32(a), Data::F32(b)) => s.memcpy_dtod(a, b),
            (Data::F64(a), Data::F64(b)) => s.memcpy_dtod(a, b),
            _ => {
                return Err(Error::DTypeMismatch {
                    tensor: "copy destination",
                    expected: src.dtype,
                    got: dst.dtype,
                });
            }
        }
        .map_err(dev_err)
    }

    fn check_own(&self, tensor: &'static str, b: &CudaBuffer) -> Result<()> {
        if b.context().cu_ctx() == self.ctx.cu_ctx() {
            Ok(())
        } else {
            Err(Error::ForeignBuffer { tensor })
        }
    }

    /// The compiled module of `dtype`, compiling it on first use.
    fn module(&self, dtype: DType) -> Result<Arc<CudaModule>> {
        let mut modules = lock(&self.modules);
        if let Some(m) = modules.get(&dtype) {
            return Ok(m.clone());
        }
        let (major, minor) = self.limits.compute_capability;
        let arch = format!("compute_{major}{minor}");
        // An NVRTC older than the device cannot target it; PTX for sm_80 is JIT-compiled forward.
        let ptx = kernels::compile(dtype, &arch)
            .or_else(|first| kernels::compile(dtype, "compute_80").map_err(|_| first))
            .map_err(dev_err)?;
        let module = self.ctx.load_module(ptx).map_err(dev_err)?;
        modules.insert(dtype, module.clone());
        Ok(module)
    }

    fn function(&self, dtype: DType, name: &str) -> Result<CudaFunction> {
        let key = (dtype, name.to_string());
        if let Some(f) = lock(&self.functions).get(&key) {
            return Ok(f.clone());
        }
        let f = self.module(dtype)?.load_function(name).map_err(dev_err)?;
        lock(&self.functions).insert(key, f.clone());
        Ok(f)
    }

    /// Queues the steps, resolving tensor arguments to the call's device pointers.
    fn execute(&self, dtype: DType, steps: &[Step], ptrs: &Pointers<'_>) -> Result<()> {
        for step in steps {
            let l = &step.launch;
            let mut ptr_args = Vec::with_capacity(step.args.len());
            for a in &step.args {
                ptr_args.push(match a {
                    Arg::Tensor(t) => *ptrs.ptrs.get(t).ok_or_else(|| {
                        dev_err(format!("internal: no buffer for {t:?} in {}", l.kernel))
                    })?,
                    _ => 0u64,
                });
            }
            let f = self.function(dtype, &l.kernel)?;
            if l.smem > plan::DEFAULT_SMEM {
                // cudarc's set_attribute does not make the context current itself.
                self.ctx.bind_to_thread().map_err(dev_err)?;
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    l.smem as i32,
                )
                .map_err(dev_err)?;
            }
            let mut b = self.stream.launch_builder(&f);
            for (a, p) in step.args.iter().zip(&ptr_args) {
                match a {
                    Arg::Tensor(_) | Arg::Null => b.arg(p),
                    Arg::U64(v) => b.arg(v),
                    Arg::I32(v) => b.arg(v),
                    Arg::F32(v) => b.arg(v),
                    Arg::F64(v) => b.arg(v),
                };
            }
            let cfg =
                LaunchConfig { grid_dim: l.grid, block_dim: l.block, shared_mem_bytes: l.smem };
            // SAFETY: `plan::*_steps` lists the arguments in the order and with the types of
            // the kernel's parameters in kernels/layernorm.cu (LN_FWD_ARGS, LN_BWD_ARGS,
            // ln_bwd_gb_*; tests/emulated.rs runs these exact lists), every pointer is a live
            // allocation of this context holding at least the elements the plan indexes (the
            // lengths were validated), null only where the kernel tests for null, and the
            // guards in `ptrs` outlive the launch.
            unsafe { b.launch(cfg) }.map_err(dev_err)?;
        }
        Ok(())
    }

    fn alloc_acc(&self, dtype: DType, len: usize) -> Result<CudaBuffer> {
        self.alloc(dtype.acc(), len)
    }
}

fn query_limits(ctx: &Arc<CudaContext>) -> Result<DeviceLimits> {
    let attr = |a: CUdevice_attribute| -> Result<u32> {
        ctx.attribute(a).map(|v| v.max(0) as u32).map_err(dev_err)
    };
    let (major, minor) = ctx.compute_capability().map_err(dev_err)?;
    Ok(DeviceLimits {
        compute_capability: (major.max(0) as u32, minor.max(0) as u32),
        sm_count: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        max_threads_per_block: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?,
        max_grid_x: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X)?,
        max_grid_y: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y)?,
        max_smem_per_block_optin: attr(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )?,
    })
}

impl Backend for CudaBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn supports(&self, kind: NormKind, dtype: DType) -> Result<()> {
        if kernels::dtype_code(dtype).is_none() {
            return Err(Error::UnsupportedDType {
                backend: NAME.into(),
                dtype,
                reason: "no CUDA kernel for this dtype".into(),
            });
        }
        match kind {
            NormKind::LayerNorm => Ok(()),
            _ => Err(Error::UnsupportedKind { backend: NAME.into(), kind: kind.name() }),
        }
    }

    fn device(&self) -> DeviceInfo {
        let ordinal = self.ctx.ordinal();
        let name = self.ctx.name().unwrap_or_else(|_| "unnamed".into());
        DeviceInfo { kind: DeviceKind::Gpu, name: format!("CUDA device {ordinal}: {name}") }
    }
}

/// The variants the kernels do not compute yet, as typed errors.
fn check_variants(spec: &NormSpec, residual: bool, from_y: bool, dh: bool) -> Result<()> {
    let what = if residual {
        "add a residual yet"
    } else if from_y || dh {
        "run the backward from y or with dh yet"
    } else if spec.gamma_offset != 0.0 {
        "offset γ yet"
    } else {
        return Ok(());
    };
    Err(Error::unsupported(NAME, what))
}

fn kind_err(spec: &NormSpec) -> Error {
    Error::UnsupportedKind { backend: NAME.into(), kind: spec.kind.name() }
}

impl Normalize for CudaBackend {
    type Buffer = CudaBuffer;

    fn alloc(&self, dtype: DType, len: usize) -> Result<CudaBuffer> {
        let n = len.max(1);
        let s = &self.stream;
        let data = match dtype {
            DType::F16 | DType::BF16 => s.alloc_zeros::<u16>(n).map(Data::Bits16),
            DType::F32 => s.alloc_zeros::<f32>(n).map(Data::F32),
            DType::F64 => s.alloc_zeros::<f64>(n).map(Data::F64),
            other => {
                return Err(Error::UnsupportedDType {
                    backend: NAME.into(),
                    dtype: other,
                    reason: "no device representation".into(),
                });
            }
        }
        .map_err(dev_err)?;
        Ok(CudaBuffer { data, dtype, len })
    }

    fn upload(&self, data: HostSlice<'_>) -> Result<CudaBuffer> {
        let (dtype, len) = (data.dtype(), data.len());
        if len == 0 {
            return self.alloc(dtype, 0);
        }
        let s = &self.stream;
        let data = match data {
            HostSlice::F16(v) => s.clone_htod(bytemuck::cast_slice::<_, u16>(v)).map(Data::Bits16),
            HostSlice::BF16(v) => s.clone_htod(bytemuck::cast_slice::<_, u16>(v)).map(Data::Bits16),
            HostSlice::F32(v) => s.clone_htod(v).map(Data::F32),
            HostSlice::F64(v) => s.clone_htod(v).map(Data::F64),
            other => {
                return Err(Error::UnsupportedDType {
                    backend: NAME.into(),
                    dtype: other.dtype(),
                    reason: "no device representation".into(),
                });
            }
        }
        .map_err(dev_err)?;
        Ok(CudaBuffer { data, dtype, len })
    }

    fn download(&self, buffer: &CudaBuffer, mut out: HostSliceMut<'_>) -> Result<()> {
        check_download(buffer, &out)?;
        self.check_own("download source", buffer)?;
        let len = buffer.len;
        if len == 0 {
            return Ok(());
        }
        let s = &self.stream;
        let bytes = out.as_bytes_mut();
        match &buffer.data {
            Data::Bits16(d) => {
                s.memcpy_dtoh(&d.slice(..len), bytemuck::cast_slice_mut::<u8, u16>(bytes))
            }
            Data::F32(d) => {
                s.memcpy_dtoh(&d.slice(..len), bytemuck::cast_slice_mut::<u8, f32>(bytes))
            }
            Data::F64(d) => {
                s.memcpy_dtoh(&d.slice(..len), bytemuck::cast_slice_mut::<u8, f64>(bytes))
            }
        }
        .map_err(dev_err)?;
        s.synchronize().map_err(dev_err)
    }

    fn run_forward(&self, spec: &NormSpec, a: Forward<'_, CudaBuffer>) -> Result<()> {
        let a = a.try_map(
            |t, b| self.check_own(t, b).map(|()| b),
            |t, b| self.check_own(t, b).map(|()| b),
        )?;
        check_variants(spec, a.residual.is_some(), false, false)?;
        let mean = a.mean.ok_or_else(|| kind_err(spec))?;
        if spec.rows == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let mut ptrs = Pointers::default();
        ptrs.read(Tensor::X, a.x, st);
        ptrs.read_opt(Tensor::Gamma, a.gamma, st);
        ptrs.read_opt(Tensor::Beta, a.beta, st);
        ptrs.write(Tensor::Y, a.y, st);
        ptrs.write(Tensor::Mean, mean, st);
        ptrs.write(Tensor::Rstd, a.rstd, st);
        let aligned = ptrs.aligned(&[Tensor::X, Tensor::Gamma, Tensor::Beta, Tensor::Y]);
        let p = plan::plan_forward(spec.rows, spec.n, spec.dtype, &self.limits, aligned)?;
        self.execute(spec.dtype, &plan::forward_steps(spec, &p), &ptrs)
    }

    fn run_backward(&self, spec: &NormSpec, a: Backward<'_, CudaBuffer>) -> Result<()> {
        let a = a.try_map(
            |t, b| self.check_own(t, b).map(|()| b),
            |t, b| self.check_own(t, b).map(|()| b),
        )?;
        check_variants(spec, false, a.saved.is_output(), a.dh.is_some())?;
        let (x, mean) = (*a.saved.tensor(), a.mean.ok_or_else(|| kind_err(spec))?);
        let (has_dg, has_db) = (a.dgamma.is_some(), a.dbeta.is_some());
        if spec.rows == 0 {
            // No rows: the parameter gradients are empty sums.
            let s = &self.stream;
            for b in [a.dgamma, a.dbeta].into_iter().flatten() {
                match &mut b.data {
                    Data::Bits16(d) => s.memset_zeros(d),
                    Data::F32(d) => s.memset_zeros(d),
                    Data::F64(d) => s.memset_zeros(d),
                }
                .map_err(dev_err)?;
            }
            return Ok(());
        }
        // Scratch first (it must outlive the pointer guards): the residual means and the
        // stage-1 partial sums, in the accumulation dtype. The chunking depends on the shape only.
        let mut scratch = Vec::new();
        if has_dg || has_db {
            let pp = plan::plan_params(spec.rows, spec.n, &self.limits)?;
            let part = pp.chunks as usize * spec.n;
            scratch.push((Tensor::ResidualMean, self.alloc_acc(spec.dtype, spec.rows)?));
            if has_dg {
                scratch.push((Tensor::PartialGamma, self.alloc_acc(spec.dtype, part)?));
            }
            if has_db {
                scratch.push((Tensor::PartialBeta, self.alloc_acc(spec.dtype, part)?));
            }
        }
        let st = &*self.stream;
        let mut ptrs = Pointers::default();
        ptrs.read(Tensor::X, x, st);
        ptrs.read(Tensor::Dy, a.dy, st);
        ptrs.read(Tensor::Mean, mean, st);
        ptrs.read(Tensor::Rstd, a.rstd, st);
        ptrs.read_opt(Tensor::Gamma, a.gamma, st);
        ptrs.write(Tensor::Dx, a.dx, st);
        if let Some(d) = a.dgamma {
            ptrs.write(Tensor::DGamma, d, st);
        }
        if let Some(d) = a.dbeta {
            ptrs.write(Tensor::DBeta, d, st);
        }
        for (t, b) in &mut scratch {
            ptrs.write(*t, b, st);
        }
        let aligned = ptrs.aligned(&[Tensor::X, Tensor::Dy, Tensor::Gamma, Tensor::Dx]);
        let p = plan::plan_backward(
            spec.rows,
            spec.n,
            spec.dtype,
            &self.limits,
            aligned,
            has_dg || has_db,
        )?;
        self.execute(spec.dtype, &plan::backward_steps(spec, &p, has_dg, has_db), &ptrs)
    }
}
