//! [`CudaBackend`]: device selection, buffers, the per-dtype module cache and the launches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute, CUresult};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DriverError, LaunchConfig, PushKernelArg, SyncOnDrop,
};
use layernorm_core::{
    Backend, Backward, DType, DeviceInfo, DeviceKind, Error, Forward, HostSlice, HostSliceMut,
    HostVec, NormKind, NormSpec, Normalize, Residual, Result, Saved, Storage, check_download,
    check_gamma_recoverable,
};

use crate::plan::{self, Arg, BackwardVariant, DeviceLimits, Step, Tensor};
use crate::{NAME, kernels};

fn dev_err(e: impl std::fmt::Display) -> Error {
    Error::device(NAME, e)
}

/// A failed allocation of `bytes` for `tensor`: [`Error::OutOfMemory`] when the device is out
/// of memory, else the driver's error.
fn alloc_err(tensor: &'static str, bytes: usize, e: DriverError) -> Error {
    if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory { tensor, bytes }
    } else {
        dev_err(e)
    }
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
    /// Points `t` at the buffer already resolved for `to` (an in-place residual: one buffer is
    /// both the residual read and h written).
    fn alias(&mut self, t: Tensor, to: Tensor) {
        if let Some(&p) = self.ptrs.get(&to) {
            self.ptrs.insert(t, p);
        }
    }
    /// Whether every present tensor of `ts` starts on a 16-byte boundary.
    fn aligned(&self, ts: &[Tensor]) -> bool {
        ts.iter().filter_map(|t| self.ptrs.get(t)).all(|p| p % 16 == 0)
    }
}

/// The normalization family (LayerNorm and RMSNorm, γ offset, fused residual, backward from x
/// or y with dh) on an NVIDIA GPU through cudarc, with kernels compiled by NVRTC at run time (to
/// `compute_80` PTX from Ampere on, see [`kernels::ptx_arch`](crate::kernels::ptx_arch)) and
/// cached per dtype and kind.
///
/// All work is queued on one stream; [`Normalize::download`] waits for it.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    limits: DeviceLimits,
    modules: Mutex<HashMap<(DType, NormKind), Arc<CudaModule>>>,
    functions: Mutex<HashMap<(DType, NormKind, String), CudaFunction>>,
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

    /// The compiled module of `dtype` and `kind`, compiling it on first use.
    fn module(&self, dtype: DType, kind: NormKind) -> Result<Arc<CudaModule>> {
        let mut modules = lock(&self.modules);
        if let Some(m) = modules.get(&(dtype, kind)) {
            return Ok(m.clone());
        }
        let arch = kernels::ptx_arch(self.limits.compute_capability);
        let ptx = kernels::compile(dtype, kind, &arch).map_err(dev_err)?;
        let module = self.ctx.load_module(ptx).map_err(dev_err)?;
        modules.insert((dtype, kind), module.clone());
        Ok(module)
    }

    fn function(&self, spec: &NormSpec, name: &str) -> Result<CudaFunction> {
        let key = (spec.dtype, spec.kind, name.to_string());
        if let Some(f) = lock(&self.functions).get(&key) {
            return Ok(f.clone());
        }
        let f = self.module(spec.dtype, spec.kind)?.load_function(name).map_err(dev_err)?;
        lock(&self.functions).insert(key, f.clone());
        Ok(f)
    }

    /// Queues the steps, resolving tensor arguments to the call's device pointers.
    fn execute(&self, spec: &NormSpec, steps: &[Step], ptrs: &Pointers<'_>) -> Result<()> {
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
            let f = self.function(spec, &l.kernel)?;
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
            // the kernel's parameters in kernels/layernorm.cu (LN_FWD_PARAMS, LN_BWD_PARAMS,
            // LN_GB_PARAMS, gb_final; tests/emulated.rs runs these exact lists and checks each
            // pointer's nullability against the kernel), every pointer is a live allocation of
            // this context holding at least the elements the plan indexes (the lengths were
            // validated), null only where the kernel tests for null, and the guards in `ptrs`
            // outlive the launch.
            unsafe { b.launch(cfg) }.map_err(dev_err)?;
        }
        Ok(())
    }

    /// A zero-filled scratch buffer of `len` elements of `dtype`'s accumulation type.
    fn scratch(&self, tensor: &'static str, dtype: DType, len: usize) -> Result<CudaBuffer> {
        self.alloc_named(tensor, dtype.acc(), len)
    }

    fn alloc_named(&self, tensor: &'static str, dtype: DType, len: usize) -> Result<CudaBuffer> {
        let n = len.max(1);
        let bytes = n.checked_mul(dtype.size()).filter(|&b| b <= isize::MAX as usize);
        let Some(bytes) = bytes else {
            return Err(Error::OutOfMemory { tensor, bytes: usize::MAX });
        };
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
        .map_err(|e| alloc_err(tensor, bytes, e))?;
        Ok(CudaBuffer { data, dtype, len })
    }

    /// For a backward from y: downloads γ and raises [`Error::SingularGamma`] where
    /// γ_offset + γ = 0, before anything is written (the kernels divide by it).
    fn check_gamma(&self, spec: &NormSpec, gamma: Option<&CudaBuffer>) -> Result<()> {
        let Some(gamma) = gamma else { return Ok(()) };
        let mut host = HostVec::try_zeros("gamma", spec.dtype, spec.n)?;
        self.download(gamma, host.as_mut_slice())?;
        check_gamma_recoverable(spec, Some(host.as_slice()))
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
        match kernels::kind_code(kind) {
            Some(_) => Ok(()),
            None => Err(Error::UnsupportedKind { backend: NAME.into(), kind: kind.name() }),
        }
    }

    /// The kind and dtype, and the ε rule ([`plan::eps_args`]): an ε the kernels cannot
    /// represent is [`Error::Unsupported`] before anything is uploaded or allocated.
    fn accepts(&self, spec: &NormSpec) -> Result<()> {
        self.supports(spec.kind, spec.dtype)?;
        plan::eps_args(spec).map(|_| ())
    }

    fn device(&self) -> DeviceInfo {
        let ordinal = self.ctx.ordinal();
        let name = self.ctx.name().unwrap_or_else(|_| "unnamed".into());
        DeviceInfo { kind: DeviceKind::Gpu, name: format!("CUDA device {ordinal}: {name}") }
    }
}

impl Normalize for CudaBackend {
    type Buffer = CudaBuffer;

    fn alloc(&self, dtype: DType, len: usize) -> Result<CudaBuffer> {
        self.alloc_named("buffer", dtype, len)
    }

    fn upload(&self, data: HostSlice<'_>) -> Result<CudaBuffer> {
        let (dtype, len) = (data.dtype(), data.len());
        if len == 0 {
            return self.alloc(dtype, 0);
        }
        let s = &self.stream;
        let bytes = len * dtype.size();
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
        .map_err(|e| alloc_err("upload", bytes, e))?;
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
        plan::eps_args(spec)?;
        if spec.rows == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let mut ptrs = Pointers::default();
        ptrs.read(Tensor::X, a.x, st);
        let residual = a.residual.is_some();
        match a.residual {
            Some(Residual::Add { residual, h }) => {
                ptrs.read(Tensor::Residual, residual, st);
                ptrs.write(Tensor::H, h, st);
            }
            Some(Residual::InPlace(r)) => {
                ptrs.write(Tensor::H, r, st);
                ptrs.alias(Tensor::Residual, Tensor::H);
            }
            None => {}
        }
        ptrs.read_opt(Tensor::Gamma, a.gamma, st);
        ptrs.read_opt(Tensor::Beta, a.beta, st);
        ptrs.write(Tensor::Y, a.y, st);
        if let Some(mean) = a.mean {
            ptrs.write(Tensor::Mean, mean, st);
        }
        ptrs.write(Tensor::Rstd, a.rstd, st);
        use Tensor::{Beta, Gamma, H, X, Y};
        let aligned = ptrs.aligned(&[X, Tensor::Residual, H, Gamma, Beta, Y]);
        let p = plan::plan_forward(spec, &self.limits, aligned)?;
        self.execute(spec, &plan::forward_steps(spec, &p, residual)?, &ptrs)
    }

    fn run_backward(&self, spec: &NormSpec, a: Backward<'_, CudaBuffer>) -> Result<()> {
        let a = a.try_map(
            |t, b| self.check_own(t, b).map(|()| b),
            |t, b| self.check_own(t, b).map(|()| b),
        )?;
        let v = BackwardVariant {
            from_y: a.saved.is_output(),
            dh: a.dh.is_some(),
            dgamma: a.dgamma.is_some(),
            dbeta: a.dbeta.is_some(),
        };
        // From y: γ is checked (downloaded) before anything is written, even with no rows.
        if v.from_y {
            self.check_gamma(spec, a.gamma)?;
        }
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
        let plan_for = |aligned| plan::plan_backward(spec, &self.limits, aligned, &v);
        // Scratch first (it must outlive the pointer guards), in the accumulation dtype: the
        // residual means and the stage-1 partial sums. Their sizes depend on the shape only, not
        // on the alignment the row kernel is chosen by below.
        let mut scratch = Vec::new();
        for (t, len) in plan::backward_scratch(spec, &plan_for(true)?, &v) {
            scratch.push((t, self.scratch(scratch_name(t), spec.dtype, len)?));
        }
        let st = &*self.stream;
        let mut ptrs = Pointers::default();
        match a.saved {
            Saved::X(x) => ptrs.read(Tensor::X, x, st),
            Saved::Y(y) => ptrs.read(Tensor::Y, y, st),
        }
        ptrs.read(Tensor::Dy, a.dy, st);
        ptrs.read_opt(Tensor::Dh, a.dh, st);
        ptrs.read_opt(Tensor::Mean, a.mean, st);
        ptrs.read(Tensor::Rstd, a.rstd, st);
        ptrs.read_opt(Tensor::Gamma, a.gamma, st);
        ptrs.read_opt(Tensor::Beta, a.beta, st);
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
        use Tensor::{Beta, Dh, Dx, Dy, Gamma, X, Y};
        let aligned = ptrs.aligned(&[X, Y, Dy, Dh, Gamma, Beta, Dx]);
        let p = plan_for(aligned)?;
        self.execute(spec, &plan::backward_steps(spec, &p, &v), &ptrs)
    }
}

/// The name of a scratch tensor in an out-of-memory error.
fn scratch_name(t: Tensor) -> &'static str {
    match t {
        Tensor::ResidualMean => "residual means",
        Tensor::PartialGamma => "dgamma partial sums",
        Tensor::PartialBeta => "dbeta partial sums",
        _ => "scratch",
    }
}
