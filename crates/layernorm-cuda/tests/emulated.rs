//! The CUDA kernels executed on the CPU: `tests/emu/harness.cpp` compiles `kernels/layernorm.cu`
//! with a C++20 compiler and AddressSanitizer, one fiber per CUDA thread (real barriers for
//! `__syncthreads` and every warp shuffle), and runs exactly the launches and argument lists the
//! backend queues ([`plan::forward_steps`], [`plan::backward_steps`], with the scratch of
//! [`plan::backward_scratch`]); results are compared with the f64 reference
//! (`reference::forward`, `forward_residual`, `backward`, `backward_from_output`, `add_dh`).
//!
//! Every entry point of every (dtype, kind) module runs: each family test checks at its end that
//! it launched all of them, each under four variants (γ and β; a γ offset of 1 with a fused
//! residual add; no affine with an in-place residual; β only), forward, backward from x and
//! backward from y, with and without dh and the parameter gradients.
//!
//! This proves the kernels' logic here (indexing, vector packs, sub-warp groups, reductions,
//! grid-stride loops, two-stage dγ/dβ, argument order, types and nullability, no out-of-bounds
//! access) but not NVRTC's code generation or the GPU itself: that is what `tests/gpu.rs` is for.
//! Without a C++ compiler the tests say so and pass, unless `LAYERNORM_REQUIRE_EMULATION` is set.
//! The harness's schedule (see its header) lets one warp run ahead to its next block-wide barrier
//! while the others wait, so deleting any one `__syncthreads` from the kernels fails these tests;
//! `LAYERNORM_EMU_KERNELS=<dir>` builds the harness from `<dir>/layernorm.cu` to check that.
//!
//! Speed: one harness binary per dtype, built once and cached under the target directory keyed
//! by a hash of its sources, flags and compiler; one harness process per test serves all of its
//! runs, with inputs and outputs through its pipes; the tests run in parallel.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use layernorm_core::{
    DType, Error, HostVec, NormKind, NormSpec, Result, check_gamma_recoverable, reference,
};
use layernorm_cuda::plan::{self, Arg, BackwardVariant, DeviceLimits, Step, Tensor};
use rand::SeedableRng;
use rand::rngs::SmallRng;

mod common;
use common::random;

const CRATE: &str = env!("CARGO_MANIFEST_DIR");
const TMP: &str = env!("CARGO_TARGET_TMPDIR");

fn required() -> bool {
    std::env::var_os("LAYERNORM_REQUIRE_EMULATION").is_some()
}

fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

/// The folder whose `layernorm.cu` the harness compiles: `kernels/`, or `LAYERNORM_EMU_KERNELS`
/// (a mutated copy, to check that these tests catch a kernel with a barrier removed).
fn kernel_dir() -> PathBuf {
    std::env::var_os("LAYERNORM_EMU_KERNELS")
        .map_or_else(|| Path::new(CRATE).join("kernels"), PathBuf::from)
}

// ===================================== the harness binary =====================================

const FLAGS: [&str; 3] = ["-std=c++20", "-Og", "-Wno-unknown-pragmas"];

/// Builds the harness for `dtype` into `exe`, with AddressSanitizer where the toolchain has it.
fn build(dtype: DType, exe: &Path) -> Option<()> {
    let code = layernorm_cuda::kernels::dtype_code(dtype).expect("a kernel dtype");
    let src = Path::new(CRATE).join("tests/emu/harness.cpp");
    let tmp = exe.with_extension(format!("tmp{}", std::process::id()));
    let mut last_err = String::new();
    for sanitize in [true, false] {
        let mut cmd = Command::new(compiler());
        cmd.args(FLAGS).arg(format!("-DLN_DTYPE={code}")).arg("-I").arg(kernel_dir());
        if sanitize {
            cmd.arg("-fsanitize=address");
        }
        cmd.arg(&src).arg("-o").arg(&tmp);
        match cmd.output() {
            Err(e) => {
                assert!(!required(), "no C++ compiler ({}): {e}", compiler());
                eprintln!("skipping the emulated kernels: no C++ compiler `{}`: {e}", compiler());
                return None;
            }
            Ok(o) if o.status.success() => {
                std::fs::rename(&tmp, exe).expect("moving the built harness into the cache");
                return Some(());
            }
            Ok(o) => {
                last_err = String::from_utf8_lossy(&o.stderr).into_owned();
                // The sanitizer is what checks the kernels' bounds: where emulation is required
                // (CI), a toolchain without it is a failure, not a quiet fallback.
                assert!(
                    !sanitize || !required(),
                    "LAYERNORM_REQUIRE_EMULATION is set but the harness does not build with \
                     -fsanitize=address for {dtype}:\n{last_err}"
                );
                if sanitize {
                    eprintln!("building the harness without AddressSanitizer: it failed with it");
                }
            }
        }
    }
    panic!("the harness does not compile for {dtype}:\n{last_err}");
}

/// The harness for `dtype`: built once per process, and cached across runs under the target
/// directory, keyed by a hash of the sources, flags and compiler (a changed kernel rebuilds it).
/// `None` when there is no C++ compiler.
fn harness(dtype: DType) -> Option<PathBuf> {
    static BUILT: [OnceLock<Option<PathBuf>>; 4] =
        [OnceLock::new(), OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let code = layernorm_cuda::kernels::dtype_code(dtype).expect("a kernel dtype") as usize;
    BUILT[code]
        .get_or_init(|| {
            let mut h = DefaultHasher::new();
            for f in
                [Path::new(CRATE).join("tests/emu/harness.cpp"), kernel_dir().join("layernorm.cu")]
            {
                std::fs::read(f).expect("reading the sources").hash(&mut h);
            }
            (FLAGS, compiler(), code).hash(&mut h);
            let dir = Path::new(TMP).join("emu-cache");
            std::fs::create_dir_all(&dir).expect("creating the harness cache");
            let exe = dir.join(format!("harness_{}_{:016x}", dtype.name(), h.finish()));
            if exe.is_file() {
                return Some(exe);
            }
            // Older builds of this dtype are stale.
            let stale = format!("harness_{}_", dtype.name());
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with(&stale) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            build(dtype, &exe).map(|()| exe)
        })
        .clone()
}

// ===================================== one harness process =====================================

/// A buffer of one run: data, or zeros of a length (in the tensor's dtype).
enum Buf<'a> {
    Data(&'a HostVec),
    Zeros(usize),
}

/// A running harness for one dtype, serving run after run.
struct Emu {
    dtype: DType,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    dir: PathBuf,
    launched: HashSet<String>,
}

impl Emu {
    /// A harness process for `dtype`, or `None` without a C++ compiler.
    fn start(dtype: DType) -> Option<Emu> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let exe = harness(dtype)?;
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = Path::new(TMP).join(format!("emu-{}-{id}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let stderr = std::fs::File::create(dir.join("stderr")).unwrap();
        let mut child = Command::new(exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("starting the harness");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Some(Emu { dtype, child, stdin, stdout, dir, launched: HashSet::new() })
    }

    fn dtype_of(&self, t: Tensor) -> DType {
        if t.is_acc() { self.dtype.acc() } else { self.dtype }
    }

    /// Runs `steps` over `bufs` and returns the `outputs`. `alias` maps a tensor onto another's
    /// buffer (an in-place residual). Inputs and outputs travel through the harness's pipes.
    fn run(
        &mut self,
        bufs: &[(Tensor, Buf<'_>)],
        steps: &[Step],
        alias: &[(Tensor, Tensor)],
        outputs: &[Tensor],
    ) -> Vec<HostVec> {
        use std::fmt::Write as _;
        let id = |t: Tensor| alias.iter().find(|(a, _)| *a == t).map_or(t, |&(_, b)| b) as usize;
        // The script's text without the input data, for a failure's message.
        let mut text = String::from("reset\n");
        let mut script = text.clone().into_bytes();
        for (t, b) in bufs {
            let elem = self.dtype_of(*t).size();
            let line = match b {
                Buf::Data(v) => format!("buffer {} {} data\n", id(*t), v.len() * elem),
                Buf::Zeros(len) => format!("buffer {} {} zero\n", id(*t), len * elem),
            };
            text += &line;
            script.extend_from_slice(line.as_bytes());
            if let Buf::Data(v) = b {
                script.extend_from_slice(v.as_slice().as_bytes());
            }
        }
        let mut line = String::new();
        for s in steps {
            let l = &s.launch;
            self.launched.insert(l.kernel.clone());
            line.clear();
            let _ = write!(
                line,
                "launch {} {} {} {} {} {}",
                l.kernel, l.grid.0, l.grid.1, l.block.0, l.block.1, l.smem
            );
            for a in &s.args {
                let _ = match a {
                    Arg::Tensor(t) => write!(line, " b{}", id(*t)),
                    Arg::Null => write!(line, " n"),
                    Arg::U64(v) => write!(line, " u{v}"),
                    Arg::I32(v) => write!(line, " i{v}"),
                    Arg::F32(v) => write!(line, " f{:x}", v.to_bits()),
                    Arg::F64(v) => write!(line, " d{:x}", v.to_bits()),
                };
            }
            line += "\n";
            text += &line;
            script.extend_from_slice(line.as_bytes());
        }
        for &t in outputs {
            line = format!("save {}\n", id(t));
            text += &line;
            script.extend_from_slice(line.as_bytes());
        }
        script.extend_from_slice(b"sync\n");
        text += "sync\n";
        let sent = self
            .stdin
            .as_mut()
            .unwrap()
            .write_all(&script)
            .and_then(|()| self.stdin.as_mut().unwrap().flush());
        if let Err(e) = sent {
            self.died(&format!("writing the script: {e}"), &text);
        }
        let mut got = Vec::with_capacity(outputs.len());
        for &t in outputs {
            let mut answer = String::new();
            let bytes = match self.stdout.read_line(&mut answer) {
                Ok(_) => answer.trim().parse::<usize>().ok(),
                Err(_) => None,
            };
            let Some(bytes) = bytes else {
                self.died(&format!("saving {t:?}: answer {answer:?}"), &text)
            };
            let dt = self.dtype_of(t);
            let mut v = HostVec::zeros(dt, bytes / dt.size());
            if let Err(e) = self.stdout.read_exact(v.as_mut_slice().as_bytes_mut()) {
                self.died(&format!("reading {t:?}: {e}"), &text);
            }
            got.push(v);
        }
        let mut answer = String::new();
        let read = self.stdout.read_line(&mut answer);
        if read.is_err() || answer.trim() != "ok" {
            self.died(&format!("sync: answer {answer:?}"), &text);
        }
        got
    }

    /// Panics with the harness's message, once it has exited.
    fn died(&mut self, what: &str, script: &str) -> ! {
        drop(self.stdin.take());
        let _ = self.child.wait();
        let err = std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default();
        panic!("harness failed ({what}):\n{err}\nscript:\n{script}");
    }

    /// Asserts that every entry point of the module of `kind` was launched.
    fn assert_covered(&self, kind: NormKind) {
        let missing: Vec<String> = plan::kernel_names(self.dtype, kind)
            .into_iter()
            .filter(|k| !self.launched.contains(k))
            .collect();
        assert!(missing.is_empty(), "{kind} {}: never launched: {missing:?}", self.dtype);
    }
}

impl Drop for Emu {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ============================ the backend's launches, on the emulator ============================

/// A residual argument of a forward pass.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Res<'a> {
    None,
    Add(&'a HostVec),
    InPlace(&'a HostVec),
}

struct Fwd {
    y: HostVec,
    mean: Option<HostVec>,
    rstd: HostVec,
    h: Option<HostVec>,
}

/// A forward pass as `CudaBackend::run_forward` queues it, on a device of `limits` with
/// tensors 16-byte `aligned` or not.
fn forward(
    emu: &mut Emu,
    spec: &NormSpec,
    (limits, aligned): (&DeviceLimits, bool),
    x: &HostVec,
    res: Res<'_>,
    gamma: Option<&HostVec>,
    beta: Option<&HostVec>,
) -> Result<Fwd> {
    use Tensor::*;
    let p = plan::plan_forward(spec, limits, aligned)?;
    let steps = plan::forward_steps(spec, &p, res != Res::None)?;
    let (numel, rows) = (spec.numel(), spec.rows);
    let mut bufs = vec![(X, Buf::Data(x)), (Y, Buf::Zeros(numel)), (Rstd, Buf::Zeros(rows))];
    let mut outputs = vec![Y, Rstd];
    bufs.extend(gamma.map(|g| (Gamma, Buf::Data(g))));
    bufs.extend(beta.map(|b| (Beta, Buf::Data(b))));
    if spec.has_mean() {
        bufs.push((Mean, Buf::Zeros(rows)));
        outputs.push(Mean);
    }
    let mut alias = Vec::new();
    match res {
        Res::Add(r) => bufs.extend([(Residual, Buf::Data(r)), (H, Buf::Zeros(numel))]),
        Res::InPlace(r) => {
            bufs.push((H, Buf::Data(r)));
            alias.push((Residual, H));
        }
        Res::None => {}
    }
    if res != Res::None {
        outputs.push(H);
    }
    let mut out = emu.run(&bufs, &steps, &alias, &outputs).into_iter();
    let (y, rstd) = (out.next().unwrap(), out.next().unwrap());
    let mean = spec.has_mean().then(|| out.next().unwrap());
    Ok(Fwd { y, mean, rstd, h: out.next() })
}

struct Bwd {
    dx: HostVec,
    dgamma: Option<HostVec>,
    dbeta: Option<HostVec>,
}

/// The tensors a backward pass reads.
struct BwdIn<'a> {
    saved: &'a HostVec,
    dy: &'a HostVec,
    dh: Option<&'a HostVec>,
    mean: Option<&'a HostVec>,
    rstd: &'a HostVec,
    gamma: Option<&'a HostVec>,
    beta: Option<&'a HostVec>,
}

/// A backward pass as `CudaBackend::run_backward` queues it: γ checked first from y, then the
/// plan's scratch, then the launches.
fn backward(
    emu: &mut Emu,
    spec: &NormSpec,
    (limits, aligned): (&DeviceLimits, bool),
    v: &BackwardVariant,
    a: &BwdIn<'_>,
) -> Result<Bwd> {
    use Tensor::*;
    if v.from_y {
        check_gamma_recoverable(spec, a.gamma.map(HostVec::as_slice))?;
    }
    let bp = plan::plan_backward(spec, limits, aligned, v)?;
    let steps = plan::backward_steps(spec, &bp, v);
    let src = if v.from_y { Y } else { X };
    let mut bufs = vec![
        (src, Buf::Data(a.saved)),
        (Dy, Buf::Data(a.dy)),
        (Rstd, Buf::Data(a.rstd)),
        (Dx, Buf::Zeros(spec.numel())),
    ];
    bufs.extend(a.dh.map(|d| (Dh, Buf::Data(d))));
    bufs.extend(a.mean.map(|m| (Mean, Buf::Data(m))));
    bufs.extend(a.gamma.map(|g| (Gamma, Buf::Data(g))));
    bufs.extend(a.beta.map(|b| (Beta, Buf::Data(b))));
    let mut outputs = vec![Dx];
    for (t, wanted) in [(DGamma, v.dgamma), (DBeta, v.dbeta)] {
        if wanted {
            bufs.push((t, Buf::Zeros(spec.n)));
            outputs.push(t);
        }
    }
    for (t, len) in plan::backward_scratch(spec, &bp, v) {
        bufs.push((t, Buf::Zeros(len)));
    }
    let mut out = emu.run(&bufs, &steps, &[], &outputs).into_iter();
    let dx = out.next().unwrap();
    let dgamma = v.dgamma.then(|| out.next().unwrap());
    let dbeta = v.dbeta.then(|| out.next().unwrap());
    Ok(Bwd { dx, dgamma, dbeta })
}

// ============================================ checks ============================================

/// Relative to the largest reference magnitude.
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 1.6e-2,
    }
}

fn assert_close(what: &str, dtype: DType, got: &[f64], want: &[f64], ctx: &str) {
    common::assert_close(what, dtype, tol(dtype), got, want, ctx);
}

/// The residual of a variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResKind {
    None,
    Add,
    InPlace,
}

/// One variant of the family: parameters, γ offset, residual, and the two backward passes run
/// after the forward.
#[derive(Clone, Copy, Debug)]
struct Variant {
    gamma: bool,
    beta: bool,
    offset: f64,
    residual: ResKind,
    from_x: BackwardVariant,
    from_y: BackwardVariant,
}

const fn bv(from_y: bool, dh: bool, dgamma: bool, dbeta: bool) -> BackwardVariant {
    BackwardVariant { from_y, dh, dgamma, dbeta }
}

/// Every variant on every kernel: each parameter set, offset, residual mode, dh and gradient
/// choice appears at least once from x and once from y.
const VARIANTS: [Variant; 4] = [
    Variant {
        gamma: true,
        beta: true,
        offset: 0.0,
        residual: ResKind::None,
        from_x: bv(false, false, true, true),
        from_y: bv(true, true, true, false),
    },
    Variant {
        gamma: true,
        beta: false,
        offset: 1.0,
        residual: ResKind::Add,
        from_x: bv(false, true, true, false),
        from_y: bv(true, false, true, false),
    },
    Variant {
        gamma: false,
        beta: false,
        offset: 0.0,
        residual: ResKind::InPlace,
        from_x: bv(false, false, false, false),
        from_y: bv(true, true, false, false),
    },
    Variant {
        gamma: false,
        beta: true,
        offset: 0.0,
        residual: ResKind::None,
        from_x: bv(false, true, false, true),
        from_y: bv(true, false, false, true),
    },
];

/// A problem: the spec of a kind, dtype and variant over rows × N, run on `limits`.
struct Case<'a> {
    kind: NormKind,
    dtype: DType,
    rows: usize,
    n: usize,
    limits: &'a DeviceLimits,
    aligned: bool,
    variant: Variant,
    eps: Option<f64>,
}

impl Case<'_> {
    fn spec(&self) -> NormSpec {
        let v = &self.variant;
        let spec = NormSpec::new(self.kind, self.rows, self.n, self.dtype)
            .with_gamma(v.gamma)
            .with_beta(v.beta)
            .with_gamma_offset(v.offset);
        match self.eps {
            Some(eps) => spec.with_eps(eps),
            None => spec,
        }
    }
}

/// What one case produced and its reference, for tests that look further.
struct Outcome {
    y: Vec<f64>,
    want_y: Vec<f64>,
    beta: Vec<f64>,
    rstd: Vec<f64>,
    dx_from_x: Vec<f64>,
    want_dx_from_x: Vec<f64>,
    dx_from_y: Vec<f64>,
}

/// Forward, backward from x and backward from y of one case against the reference.
/// `shift`: a value near the rows' mean for LayerNorm rows with |mean| ≫ std. LayerNorm is
/// shift-invariant, so the reference runs on h − shift (exact in f64 for these inputs) and only
/// its mean is shifted back: this keeps the oracle's own plain sums accurate.
fn check(emu: &mut Emu, c: &Case<'_>, x: &[f64], seed: u64, shift: f64) -> Outcome {
    let spec = c.spec();
    let (dt, rows, n, v) = (c.dtype, c.rows, c.n, c.variant);
    let p = plan::plan_forward(&spec, c.limits, c.aligned).unwrap();
    let ctx = format!(
        "{} {rows}×{n} {dt} γ={} β={} offset={} residual={:?} ε={:e} grid≤{} {}",
        c.kind,
        v.gamma,
        v.beta,
        v.offset,
        v.residual,
        spec.eps,
        c.limits.max_grid_x,
        p.launch.kernel
    );
    let mut rng = SmallRng::seed_from_u64(seed);
    let hx = HostVec::from_f64(dt, x);
    // γ: around 1, or around 0 with an offset of 1 (exact zeros included: not singular then).
    let g: Vec<f64> = if v.offset == 0.0 {
        random(&mut rng, n, 1.0, 0.5)
    } else {
        let mut g = random(&mut rng, n, 0.0, 0.5);
        g.iter_mut().step_by(5).for_each(|v| *v = 0.0);
        g
    };
    let hg = HostVec::from_f64(dt, &g);
    let hb = HostVec::from_f64(dt, &random(&mut rng, n, 0.0, 0.5));
    let hr = HostVec::from_f64(dt, &random(&mut rng, rows * n, 0.0, 1.0));
    let hdy = HostVec::from_f64(dt, &random(&mut rng, rows * n, 0.0, 1.0));
    let hdh = HostVec::from_f64(dt, &random(&mut rng, rows * n, 0.0, 1.0));
    let (wg, wb, wdy, wdh) = (hg.to_f64_vec(), hb.to_f64_vec(), hdy.to_f64_vec(), hdh.to_f64_vec());
    let gamma = v.gamma.then_some(&hg);
    let beta = v.beta.then_some(&hb);
    let (rg, rb) = (v.gamma.then_some(&wg[..]), v.beta.then_some(&wb[..]));

    // Forward.
    let res = match v.residual {
        ResKind::None => Res::None,
        ResKind::Add => Res::Add(&hr),
        ResKind::InPlace => Res::InPlace(&hr),
    };
    let out = forward(emu, &spec, (c.limits, c.aligned), &hx, res, gamma, beta).unwrap();
    let h = if v.residual == ResKind::None {
        hx.to_f64_vec()
    } else {
        let (h, _) =
            reference::forward_residual(&spec, &hx.to_f64_vec(), &hr.to_f64_vec(), rg, rb).unwrap();
        // h is rounded once, exactly as the reference rounds x + residual.
        let got = out.h.as_ref().unwrap().to_f64_vec();
        for (i, (a, b)) in got.iter().zip(&h).enumerate() {
            assert!(a == b || (a.is_nan() && b.is_nan()), "h[{i}] = {a}, reference {b}, {ctx}");
        }
        h
    };
    let sh: Vec<f64> = h.iter().map(|v| v - shift).collect();
    let want = reference::forward(&spec, &sh, rg, rb).unwrap();
    assert_close("y", dt, &out.y.to_f64_vec(), &want.y, &ctx);
    // The statistics per row, the mean against max(|μ|, σ) at the statistics' tolerance (they
    // are stored in f32 for every dtype but f64), as the conformance suite measures it: at
    // |μ| = 1e4 a mean off by the shift's distance from it (a missing low-order correction)
    // fails.
    let stats_tol = if dt == DType::F64 { 1e-12 } else { 1e-6 };
    if let (Some(got), Some(wm)) = (&out.mean, &want.mean) {
        for (r, (g, w)) in got.to_f64_vec().iter().zip(wm).enumerate() {
            let (w, scale) = (w + shift, (w + shift).abs().max(1.0 / want.rstd[r]));
            assert!((g - w).abs() <= stats_tol * scale, "mean[{r}] = {g}, reference {w}, {ctx}");
        }
    }
    assert_eq!(out.mean.is_some(), spec.has_mean());
    // rstd against the reference rounded to its dtype (1/√ε for ε = 1e300 is 0 in f32), with
    // an allowance of the dtype's smallest subnormal for results that are themselves subnormal.
    let rstd = out.rstd.to_f64_vec();
    let st = dt.acc();
    let tiny = if st == DType::F64 { f64::from_bits(1) } else { f32::from_bits(1) as f64 };
    for (r, (g, w)) in rstd.iter().zip(&want.rstd).enumerate() {
        let w = st.round(*w);
        assert!(
            (g - w).abs() <= stats_tol * w.abs() + tiny,
            "rstd[{r}] = {g}, reference {w}, {ctx}"
        );
    }

    // Backward from x (h with a residual), from the kernel's statistics. The reference uses
    // the exact ones: the recomputed residual mean makes the kernel agree with them.
    let saved_x = out.h.as_ref().unwrap_or(&hx);
    let dh = |bv: &BackwardVariant| bv.dh.then_some(&hdh);
    let bx = v.from_x;
    let got = backward(
        emu,
        &spec,
        (c.limits, c.aligned),
        &bx,
        &BwdIn {
            saved: saved_x,
            dy: &hdy,
            dh: dh(&bx),
            mean: out.mean.as_ref(),
            rstd: &out.rstd,
            gamma,
            beta: None,
        },
    )
    .unwrap();
    let mut want_x =
        reference::backward(&spec, &sh, &wdy, want.mean.as_deref(), &want.rstd, rg).unwrap();
    if bx.dh {
        want_x = reference::add_dh(want_x, &wdh).unwrap();
    }
    let ctx_x = format!("{ctx}, from x, dh={}", bx.dh);
    check_grads(dt, &got, &want_x, &bx, &ctx_x);

    // Backward from the kernel's y, with γ, β and its rstd (no mean).
    let by = v.from_y;
    let got_y = backward(
        emu,
        &spec,
        (c.limits, c.aligned),
        &by,
        &BwdIn { saved: &out.y, dy: &hdy, dh: dh(&by), mean: None, rstd: &out.rstd, gamma, beta },
    )
    .unwrap();
    let wy = out.y.to_f64_vec();
    let mut want_y = reference::backward_from_output(&spec, &wy, &wdy, &want.rstd, rg, rb).unwrap();
    if by.dh {
        want_y = reference::add_dh(want_y, &wdh).unwrap();
    }
    let ctx_y = format!("{ctx}, from y, dh={}", by.dh);
    check_grads(dt, &got_y, &want_y, &by, &ctx_y);
    Outcome {
        y: wy,
        want_y: want.y,
        beta: wb,
        rstd,
        dx_from_x: got.dx.to_f64_vec(),
        want_dx_from_x: want_x.dx,
        dx_from_y: got_y.dx.to_f64_vec(),
    }
}

fn check_grads(
    dt: DType,
    got: &Bwd,
    want: &reference::RefBackward,
    v: &BackwardVariant,
    ctx: &str,
) {
    assert_close("dx", dt, &got.dx.to_f64_vec(), &want.dx, ctx);
    assert_eq!(got.dgamma.is_some(), v.dgamma);
    assert_eq!(got.dbeta.is_some(), v.dbeta);
    if let (Some(g), Some(w)) = (&got.dgamma, &want.dgamma) {
        assert_close("dgamma", dt, &g.to_f64_vec(), w, ctx);
    }
    if let (Some(g), Some(w)) = (&got.dbeta, &want.dbeta) {
        assert_close("dbeta", dt, &g.to_f64_vec(), w, ctx);
    }
}

// ============================================ shapes ============================================

const H100: DeviceLimits = DeviceLimits::H100;
/// A tiny grid: every kernel loops over rows (and the dγ/dβ kernels over columns), as beyond
/// the grid limits; it also keeps the number of emulated threads small.
const LOOPING: DeviceLimits = DeviceLimits { max_grid_x: 2, ..H100 };
/// No room in shared memory: the block strategy re-reads global memory at any N.
const NO_SMEM: DeviceLimits =
    DeviceLimits { max_grid_x: 2, max_smem_per_block_optin: 1024, ..H100 };

/// The smallest shapes that reach every entry point of a dtype's modules: sub-warps (several
/// rows per warp), every items-per-thread count of the scalar and the vector warp kernels with
/// full and partial rows, and the block kernels at 128…1024 threads in shared memory and
/// re-reading global memory. (rows, N, limits, aligned).
fn shapes(dtype: DType) -> Vec<(usize, usize, DeviceLimits, bool)> {
    let vw = plan::vec_width(dtype);
    let mut out = vec![(300, 1, LOOPING, false), (70, 3, LOOPING, false), (33, vw, LOOPING, true)];
    for aligned in [false, true] {
        let items = plan::warp_items(dtype, aligned);
        let step = if aligned { vw } else { 1 };
        for &it in items {
            let full = 32 * it as usize;
            out.push((9, full, LOOPING, aligned));
            out.push((5, full - 3 * step, LOOPING, aligned));
        }
        // Past the warp kernels: the block kernels in shared memory and re-reading global
        // memory at their fewest threads (128; 512 for the scalar ones), then once at 1024 (the
        // most a block reduces over).
        let max = 32 * *items.last().unwrap() as usize;
        out.push((3, max + step, LOOPING, aligned));
        out.push((3, max + step, NO_SMEM, aligned));
        out.push((3, 4 * step * 512 + step, NO_SMEM, aligned));
    }
    out
}

/// Every kernel of `kind` in `dtype` under every variant, then a check that every entry point of
/// the module ran.
fn family(dtype: DType, kind: NormKind) {
    let Some(mut emu) = Emu::start(dtype) else { return };
    for (j, (rows, n, limits, aligned)) in shapes(dtype).into_iter().enumerate() {
        let mut rng = SmallRng::seed_from_u64(j as u64);
        let x = random(&mut rng, rows * n, 0.5, 2.0);
        for (k, variant) in VARIANTS.into_iter().enumerate() {
            let case = Case { kind, dtype, rows, n, limits: &limits, aligned, variant, eps: None };
            check(&mut emu, &case, &x, (j * 10 + k) as u64, 0.0);
        }
    }
    // Long rows at a real device's limits: the f32 forward and every backward re-read global
    // memory at N = 65536, the 16-bit forward caches the row.
    let mut rng = SmallRng::seed_from_u64(65536);
    let x = random(&mut rng, 2 * 65536, 0.5, 2.0);
    let limits = DeviceLimits { max_grid_x: 4, ..H100 };
    let case = Case {
        kind,
        dtype,
        rows: 2,
        n: 65536,
        limits: &limits,
        aligned: true,
        variant: VARIANTS[0],
        eps: None,
    };
    check(&mut emu, &case, &x, 1, 0.0);
    emu.assert_covered(kind);
}

#[test]
fn layer_norm_f32() {
    family(DType::F32, NormKind::LayerNorm);
}

#[test]
fn layer_norm_f64() {
    family(DType::F64, NormKind::LayerNorm);
}

#[test]
fn layer_norm_f16() {
    family(DType::F16, NormKind::LayerNorm);
}

#[test]
fn layer_norm_bf16() {
    family(DType::BF16, NormKind::LayerNorm);
}

#[test]
fn rms_norm_f32() {
    family(DType::F32, NormKind::RmsNorm);
}

#[test]
fn rms_norm_f64() {
    family(DType::F64, NormKind::RmsNorm);
}

#[test]
fn rms_norm_f16() {
    family(DType::F16, NormKind::RmsNorm);
}

#[test]
fn rms_norm_bf16() {
    family(DType::BF16, NormKind::RmsNorm);
}

// ======================================== numerics at the edges ========================================

/// Rows with |mean| ≫ std (LayerNorm), |x| ~ 1e30 (both kinds: RMSNorm's x² overflows f32 from
/// |x| ≈ 1.8e19), and the warp, shared-memory and global-memory strategies for each.
#[test]
fn hard_rows() {
    for dtype in [DType::F32, DType::F64] {
        let Some(mut emu) = Emu::start(dtype) else { return };
        let mut rng = SmallRng::seed_from_u64(99);
        for (n, limits) in [(768, LOOPING), (4096, LOOPING), (4096, NO_SMEM)] {
            for (k, variant) in VARIANTS.into_iter().enumerate() {
                let mut case = Case {
                    kind: NormKind::LayerNorm,
                    dtype,
                    rows: 3,
                    n,
                    limits: &limits,
                    aligned: true,
                    variant,
                    eps: None,
                };
                let x = random(&mut rng, 3 * n, 1e4, 1.0);
                check(&mut emu, &case, &x, k as u64, 1e4);
                let x = random(&mut rng, 3 * n, 0.0, 1e30);
                for kind in NormKind::ALL {
                    case.kind = kind;
                    check(&mut emu, &case, &x, k as u64, 0.0);
                }
            }
        }
    }
}

/// All-zero rows: rstd = 1/√ε, y = β exactly, finite gradients; for every dtype and kind.
#[test]
fn zero_rows() {
    for dtype in DType::ALL {
        let Some(mut emu) = Emu::start(dtype) else { return };
        for kind in NormKind::ALL {
            for (rows, n, aligned) in [(8, 5, false), (3, 256, true), (3, 1025, false)] {
                let case = Case {
                    kind,
                    dtype,
                    rows,
                    n,
                    limits: &LOOPING,
                    aligned,
                    variant: VARIANTS[0],
                    eps: None,
                };
                let out = check(&mut emu, &case, &vec![0.0; rows * n], 7, 0.0);
                let spec = case.spec();
                for r in 0..rows {
                    assert_eq!(&out.y[r * n..(r + 1) * n], &out.beta[..], "{kind} {dtype} y = β");
                }
                let want = dtype.acc().round(1.0 / spec.dtype.acc().round(spec.eps).sqrt());
                for g in &out.rstd {
                    assert!((g - want).abs() <= 1e-6 * want, "{kind} {dtype}: rstd {g} ≠ {want}");
                }
                let finite = |v: &[f64]| v.iter().all(|d| d.is_finite());
                assert!(finite(&out.dx_from_x) && finite(&out.dx_from_y), "{kind} {dtype}");
            }
        }
    }
}

/// ε across its range: the f64 reference's answer (1e300 everywhere, 1e40 beyond f32's range
/// in f32 arithmetic, 1e-300 in f64 on constant rows), and a typed error for an ε below
/// f32::MIN_POSITIVE where the kernels compute in f32.
#[test]
fn epsilon_range() {
    for dtype in DType::ALL {
        let Some(mut emu) = Emu::start(dtype) else { return };
        let mut rng = SmallRng::seed_from_u64(5);
        let f32_math = dtype != DType::F64;
        let mut epsilons = vec![1e300, 1e40, 1e-3, f32::MIN_POSITIVE as f64];
        if !f32_math {
            epsilons.extend([1e-300, f64::from_bits(1), 1e307]);
        }
        // A sub-warp kernel, and a vector block kernel at 128 threads.
        let block_n = 32 * *plan::warp_items(dtype, true).last().unwrap() as usize;
        let block_n = block_n + plan::vec_width(dtype);
        for kind in NormKind::ALL {
            for (n, limits, aligned) in [(8, LOOPING, false), (block_n, LOOPING, true)] {
                for &eps in &epsilons {
                    let case = Case {
                        kind,
                        dtype,
                        rows: 3,
                        n,
                        limits: &limits,
                        aligned,
                        variant: VARIANTS[2],
                        eps: Some(eps),
                    };
                    let x = random(&mut rng, 3 * n, 0.5, 2.0);
                    let out = check(&mut emu, &case, &x, 3, 0.0);
                    // y and dx relative to their own magnitude, where it is a normal number of
                    // the dtype (ε = 1e40 in f32 makes them ~1e-20, not 0).
                    let normal = match dtype {
                        DType::F16 => 6.2e-5,
                        DType::F64 => f64::MIN_POSITIVE,
                        _ => f32::MIN_POSITIVE as f64,
                    } * 1024.0;
                    for (what, got, want) in
                        [("y", &out.y, &out.want_y), ("dx", &out.dx_from_x, &out.want_dx_from_x)]
                    {
                        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                        if scale >= normal {
                            for (g, w) in got.iter().zip(want) {
                                assert!(
                                    (g - w).abs() <= tol(dtype) * scale,
                                    "{what} = {g}, reference {w}, {kind} {dtype} ε = {eps:e}"
                                );
                            }
                        }
                    }
                    // Constant rows (no residual): the variance is exactly 0, so ε alone sets
                    // rstd and y = β. (−944328.625 as in issue 23: f16 has no such value.)
                    if kind == NormKind::LayerNorm {
                        let case = Case { variant: VARIANTS[0], ..case };
                        for c in [1.5, -944328.625] {
                            if dtype != DType::F16 || c == 1.5 {
                                let out = check(&mut emu, &case, &vec![c; 3 * n], 4, c);
                                for r in 0..3 {
                                    assert_eq!(&out.y[r * n..(r + 1) * n], &out.beta[..]);
                                }
                            }
                        }
                    }
                }
                if f32_math {
                    for eps in [1e-39, 1e-300, f64::from_bits(1)] {
                        let spec = NormSpec::new(kind, 3, n, dtype).with_eps(eps);
                        let x = HostVec::from_f64(dtype, &vec![1.0; 3 * n]);
                        let err =
                            forward(&mut emu, &spec, (&limits, aligned), &x, Res::None, None, None)
                                .err()
                                .expect("an ε below f32::MIN_POSITIVE must be refused");
                        assert!(
                            matches!(&err, Error::Unsupported { what, .. } if what.contains("MIN_POSITIVE")),
                            "{err:?}"
                        );
                    }
                }
            }
        }
    }
}

/// A backward from y with γ_offset + γ = 0 in some column is `SingularGamma` naming it, before
/// any launch; a γ of 0 under an offset of 1 is fine (covered by every offset case).
#[test]
fn singular_gamma_is_refused_before_any_launch() {
    for dtype in DType::ALL {
        let Some(mut emu) = Emu::start(dtype) else { return };
        for kind in NormKind::ALL {
            for (offset, bad) in [(1.0, -1.0), (0.0, 0.0)] {
                let spec = NormSpec::new(kind, 2, 8, dtype).with_gamma_offset(offset);
                let mut g = vec![0.5; 8];
                g[5] = bad;
                let hg = HostVec::from_f64(dtype, &g);
                let t = HostVec::from_f64(dtype, &[0.25; 16]);
                let stats = HostVec::from_f64(dtype.acc(), &[1.0; 2]);
                let v = bv(true, false, true, spec.beta);
                let beta = spec.beta.then_some(&hg);
                let before = emu.launched.len();
                let err = backward(
                    &mut emu,
                    &spec,
                    (&LOOPING, true),
                    &v,
                    &BwdIn {
                        saved: &t,
                        dy: &t,
                        dh: None,
                        mean: None,
                        rstd: &stats,
                        gamma: Some(&hg),
                        beta,
                    },
                )
                .err()
                .expect("a singular γ must be refused");
                assert_eq!(err, Error::SingularGamma { column: 5, gamma: bad, offset });
                assert_eq!(emu.launched.len(), before, "nothing may be launched");
            }
        }
    }
}

/// A bf16 pre-norm block at N = 4096: RMSNorm with a zero-centred γ over x + residual (added
/// and in place), then the backward from y with dh, and from h.
#[test]
fn bf16_pre_norm_block_at_4096() {
    let Some(mut emu) = Emu::start(DType::BF16) else { return };
    let mut rng = SmallRng::seed_from_u64(4096);
    for kind in NormKind::ALL {
        for residual in [ResKind::Add, ResKind::InPlace] {
            let variant = Variant {
                gamma: true,
                beta: kind == NormKind::LayerNorm,
                offset: 1.0,
                residual,
                from_x: bv(false, true, true, kind == NormKind::LayerNorm),
                from_y: bv(true, true, true, kind == NormKind::LayerNorm),
            };
            let case = Case {
                kind,
                dtype: DType::BF16,
                rows: 4,
                n: 4096,
                limits: &H100,
                aligned: true,
                variant,
                eps: None,
            };
            let x = random(&mut rng, 4 * 4096, 0.0, 3.0);
            check(&mut emu, &case, &x, 11, 0.0);
        }
    }
}

// ======================================== poison containment ========================================

/// A NaN in x (forward), or in dy, the mean or rstd (backward) of one row makes that row NaN
/// and leaves every other row bitwise unchanged, also where several rows share a warp (sub-warp
/// groups of 2 and 4 lanes) or a block loops over rows; for both kinds, from x and from y.
#[test]
fn poison_stays_in_its_row() {
    let dtype = DType::F32;
    let Some(mut emu) = Emu::start(dtype) else { return };
    for kind in NormKind::ALL {
        for (rows, n) in [(40, 8), (40, 3), (9, 768), (6, 1025)] {
            let spec = NormSpec::new(kind, rows, n, dtype).with_beta(true);
            let mut rng = SmallRng::seed_from_u64(5);
            let x = random(&mut rng, rows * n, 0.0, 1.0);
            let g = HostVec::from_f64(dtype, &random(&mut rng, n, 1.0, 0.5));
            let b = HostVec::from_f64(dtype, &random(&mut rng, n, 0.0, 0.5));
            let dy = random(&mut rng, rows * n, 0.0, 1.0);
            let hx = HostVec::from_f64(dtype, &x);
            let hdy = HostVec::from_f64(dtype, &dy);
            let fwd = |emu: &mut Emu, x: &HostVec| {
                forward(emu, &spec, (&LOOPING, true), x, Res::None, Some(&g), Some(&b)).unwrap()
            };
            let clean = fwd(&mut emu, &hx);
            let ctx = format!("{kind} {rows}×{n}");
            let bad = 3;
            // x poisoned: y and the statistics of row 3 only.
            let mut px = x.clone();
            px[bad * n + n / 2] = f64::NAN;
            let out = fwd(&mut emu, &HostVec::from_f64(dtype, &px));
            assert_row_poisoned(&out.y.to_f64_vec(), &clean.y.to_f64_vec(), n, bad, &ctx);
            assert_row_poisoned(&out.rstd.to_f64_vec(), &clean.rstd.to_f64_vec(), 1, bad, &ctx);
            // dy, mean, rstd poisoned, from x and from y.
            let with_nan = |v: &HostVec, i: usize| {
                let mut w = v.to_f64_vec();
                w[i] = f64::NAN;
                HostVec::from_f64(v.dtype(), &w)
            };
            let pdy = with_nan(&hdy, bad * n + 1);
            let prstd = with_nan(&clean.rstd, bad);
            let pmean = clean.mean.as_ref().map(|m| with_nan(m, bad));
            for from_y in [false, true] {
                let v = bv(from_y, false, false, false);
                let saved = if from_y { &clean.y } else { &hx };
                let mut run = |dy: &HostVec, mean: Option<&HostVec>, rstd: &HostVec| {
                    let a = BwdIn {
                        saved,
                        dy,
                        dh: None,
                        mean: if from_y { None } else { mean },
                        rstd,
                        gamma: Some(&g),
                        beta: from_y.then_some(&b),
                    };
                    backward(&mut emu, &spec, (&LOOPING, true), &v, &a).unwrap().dx.to_f64_vec()
                };
                let base = run(&hdy, clean.mean.as_ref(), &clean.rstd);
                let ctx = format!("{ctx} from_y={from_y}");
                let got = run(&pdy, clean.mean.as_ref(), &clean.rstd);
                assert_row_poisoned(&got, &base, n, bad, &format!("{ctx}, NaN in dy"));
                let got = run(&hdy, clean.mean.as_ref(), &prstd);
                assert_row_poisoned(&got, &base, n, bad, &format!("{ctx}, NaN in rstd"));
                if let (Some(pm), false) = (&pmean, from_y) {
                    let got = run(&hdy, Some(pm), &clean.rstd);
                    assert_row_poisoned(&got, &base, n, bad, &format!("{ctx}, NaN in mean"));
                }
            }
        }
    }
}

/// Row `bad` of `got` is all NaN; every other row equals `clean` bit for bit.
fn assert_row_poisoned(got: &[f64], clean: &[f64], n: usize, bad: usize, ctx: &str) {
    for (r, (g, c)) in got.chunks(n).zip(clean.chunks(n)).enumerate() {
        if r == bad {
            assert!(g.iter().all(|v| v.is_nan()), "row {r} should be NaN, {ctx}: {g:?}");
        } else {
            let bits = |v: &[f64]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(g), bits(c), "row {r} changed, {ctx}");
        }
    }
}
