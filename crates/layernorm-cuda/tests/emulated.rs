//! The CUDA kernels executed on the CPU: `tests/emu/harness.cpp` compiles `kernels/layernorm.cu`
//! with a C++20 compiler, one OS thread per CUDA thread (real barriers for `__syncthreads` and
//! warp shuffles) and AddressSanitizer, and runs exactly the launches and argument lists the
//! backend queues ([`plan::forward_steps`], [`plan::backward_steps`]); results are compared
//! with the f64 reference.
//!
//! This proves the kernels' logic here (indexing, vector packs, sub-warp groups, reductions,
//! grid-stride loops, two-stage dγ/dβ, argument order and types, no out-of-bounds access) but
//! not NVRTC's code generation or the GPU itself: that is what `tests/gpu.rs` is for.
//! Without a C++ compiler the test says so and passes, unless `LAYERNORM_REQUIRE_EMULATION` is set.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use layernorm_core::{DType, HostVec, NormSpec, reference};
use layernorm_cuda::plan::{self, Arg, DeviceLimits, Step, Tensor};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const CRATE: &str = env!("CARGO_MANIFEST_DIR");
const TMP: &str = env!("CARGO_TARGET_TMPDIR");

fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

/// Builds the harness for `dtype` (cached while the sources are unchanged); `None` when there
/// is no C++ compiler.
fn harness(dtype: DType) -> Option<PathBuf> {
    let src = Path::new(CRATE).join("tests/emu/harness.cpp");
    let cu = Path::new(CRATE).join("kernels/layernorm.cu");
    let exe = Path::new(TMP).join(format!("ln_emu_{}", dtype.name()));
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(e), Some(a), Some(b)) = (mtime(&exe), mtime(&src), mtime(&cu))
        && e > a
        && e > b
    {
        return Some(exe);
    }
    let code = layernorm_cuda::kernels::dtype_code(dtype).expect("a kernel dtype");
    let mut last_err = String::new();
    for sanitize in [true, false] {
        let mut cmd = Command::new(compiler());
        cmd.args(["-std=c++20", "-O1", "-pthread", "-Wno-unknown-pragmas"])
            .arg(format!("-DLN_DTYPE={code}"))
            .arg("-I")
            .arg(Path::new(CRATE).join("kernels"));
        if sanitize {
            cmd.arg("-fsanitize=address");
        }
        cmd.arg(&src).arg("-o").arg(&exe);
        match cmd.output() {
            Err(e) => {
                assert!(
                    std::env::var_os("LAYERNORM_REQUIRE_EMULATION").is_none(),
                    "no C++ compiler ({}): {e}",
                    compiler()
                );
                eprintln!("skipping the emulated kernels: no C++ compiler `{}`: {e}", compiler());
                return None;
            }
            Ok(o) if o.status.success() => return Some(exe),
            Ok(o) => {
                last_err = String::from_utf8_lossy(&o.stderr).into_owned();
                // The sanitizer is what checks the kernels' bounds: where emulation is required
                // (CI), a toolchain without it is a failure, not a quiet fallback.
                assert!(
                    !sanitize || std::env::var_os("LAYERNORM_REQUIRE_EMULATION").is_none(),
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

fn id(t: Tensor) -> usize {
    t as usize
}

fn is_acc(t: Tensor) -> bool {
    use Tensor::*;
    matches!(t, Mean | Rstd | ResidualMean | PartialGamma | PartialBeta)
}

/// One emulated run: buffers in, steps, buffers out.
struct Job {
    dtype: DType,
    dir: PathBuf,
    script: String,
}

impl Job {
    fn new(dtype: DType, name: &str) -> Job {
        let dir = Path::new(TMP).join(format!("emu-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        Job { dtype, dir, script: String::new() }
    }
    fn elem(&self, t: Tensor) -> usize {
        if is_acc(t) { self.dtype.acc().size() } else { self.dtype.size() }
    }
    fn data(&mut self, t: Tensor, v: &HostVec) {
        let path = self.dir.join(format!("in{}.bin", id(t)));
        std::fs::write(&path, v.as_slice().as_bytes()).unwrap();
        let bytes = v.len() * self.elem(t);
        self.script += &format!("buffer {} {bytes} {}\n", id(t), path.display());
    }
    fn zeros(&mut self, t: Tensor, len: usize) {
        self.script += &format!("buffer {} {} -\n", id(t), len * self.elem(t));
    }
    fn steps(&mut self, steps: &[Step]) {
        for s in steps {
            let l = &s.launch;
            self.script += &format!(
                "launch {} {} {} {} {} {}",
                l.kernel, l.grid.0, l.grid.1, l.block.0, l.block.1, l.smem
            );
            for a in &s.args {
                self.script += &match a {
                    Arg::Tensor(t) => format!(" b{}", id(*t)),
                    Arg::Null => " n".into(),
                    Arg::U64(v) => format!(" u{v}"),
                    Arg::I32(v) => format!(" i{v}"),
                    Arg::F32(v) => format!(" f{:x}", v.to_bits()),
                    Arg::F64(v) => format!(" d{:x}", v.to_bits()),
                };
            }
            self.script += "\n";
        }
    }
    /// Runs the script and returns the saved tensors.
    fn run(mut self, exe: &Path, outputs: &[(Tensor, usize)]) -> Vec<HostVec> {
        for (t, _) in outputs {
            self.script += &format!(
                "save {} {}\n",
                id(*t),
                self.dir.join(format!("out{}.bin", id(*t))).display()
            );
        }
        let mut child = Command::new(exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(self.script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "harness failed:\n{}\nscript:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.script
        );
        outputs
            .iter()
            .map(|&(t, len)| {
                let dt = if is_acc(t) { self.dtype.acc() } else { self.dtype };
                let mut v = HostVec::zeros(dt, len);
                let bytes = std::fs::read(self.dir.join(format!("out{}.bin", id(t)))).unwrap();
                v.as_mut_slice().as_bytes_mut().copy_from_slice(&bytes);
                v
            })
            .collect()
    }
}

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
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(err <= tol(dtype) * scale, "{what}[{i}] = {g}, reference {w} (err {err:e}), {ctx}");
    }
}

fn random(rng: &mut SmallRng, len: usize, offset: f64, scale: f64) -> Vec<f64> {
    (0..len).map(|_| offset + scale * (rng.random::<f64>() * 2.0 - 1.0)).collect()
}

/// Forward then backward of one problem through the emulated kernels.
/// `shift`: a value near the rows' mean. LayerNorm is shift-invariant, so the reference runs on
/// x − shift (exact in f64 for these inputs) and only its mean is shifted back: this keeps the
/// oracle's own plain sums accurate for rows with |mean| ≫ std.
fn check(exe: &Path, spec: &NormSpec, limits: &DeviceLimits, x: &[f64], seed: u64, shift: f64) {
    use Tensor::*;
    let (dt, rows, n) = (spec.dtype, spec.rows, spec.n);
    let ctx =
        format!("{rows}×{n} {dt} γ={} β={} grid≤{}", spec.gamma, spec.beta, limits.max_grid_x);
    let name =
        format!("{}-{rows}x{n}-{}{}-{}", dt.name(), spec.gamma, spec.beta, limits.max_grid_x);
    let mut rng = SmallRng::seed_from_u64(seed);
    let hx = HostVec::from_f64(dt, x);
    let hg = HostVec::from_f64(dt, &random(&mut rng, n, 1.0, 0.5));
    let hb = HostVec::from_f64(dt, &random(&mut rng, n, 0.0, 0.5));
    let hdy = HostVec::from_f64(dt, &random(&mut rng, rows * n, 0.0, 1.0));
    let (wx, wg, wb, wdy) = (hx.to_f64_vec(), hg.to_f64_vec(), hb.to_f64_vec(), hdy.to_f64_vec());
    let sx: Vec<f64> = wx.iter().map(|v| v - shift).collect();

    let p = plan::plan_forward(rows, n, dt, limits, true).unwrap();
    let mut job = Job::new(dt, &format!("{name}-fwd"));
    job.data(X, &hx);
    if spec.gamma {
        job.data(Gamma, &hg);
    }
    if spec.beta {
        job.data(Beta, &hb);
    }
    job.zeros(Y, rows * n);
    job.zeros(Mean, rows);
    job.zeros(Rstd, rows);
    job.steps(&plan::forward_steps(spec, &p));
    let out = job.run(exe, &[(Y, rows * n), (Mean, rows), (Rstd, rows)]);
    let want =
        reference::forward(spec, &sx, spec.gamma.then_some(&wg[..]), spec.beta.then_some(&wb[..]))
            .unwrap();
    let ctx_f = format!("{ctx}, {}", p.launch.kernel);
    assert_close("y", dt, &out[0].to_f64_vec(), &want.y, &ctx_f);
    // The mean per row, against max(|μ|, σ) at the statistics' tolerance (they are stored in
    // f32 for every dtype but f64), as the conformance suite measures it: at |μ| = 1e4 a mean
    // off by the shift's distance from it (a missing low-order correction) fails.
    let stats_tol = if dt == DType::F64 { 1e-12 } else { 1e-6 };
    for (r, (g, w)) in out[1].to_f64_vec().iter().zip(&want.mean).enumerate() {
        let (w, scale) = (w + shift, (w + shift).abs().max(1.0 / want.rstd[r]));
        assert!((g - w).abs() <= stats_tol * scale, "mean[{r}] = {g}, reference {w}, {ctx_f}");
    }
    for (r, (g, w)) in out[2].to_f64_vec().iter().zip(&want.rstd).enumerate() {
        assert!((g - w).abs() <= stats_tol * w.abs(), "rstd[{r}] = {g}, reference {w}, {ctx_f}");
    }

    let bp = plan::plan_backward(rows, n, dt, limits, true, true).unwrap();
    let mut job = Job::new(dt, &format!("{name}-bwd"));
    job.data(X, &hx);
    job.data(Dy, &hdy);
    job.data(Mean, &out[1]);
    job.data(Rstd, &out[2]);
    if spec.gamma {
        job.data(Gamma, &hg);
    }
    job.zeros(Dx, rows * n);
    job.zeros(DGamma, n);
    job.zeros(DBeta, n);
    job.zeros(ResidualMean, rows);
    let chunks = bp.param.as_ref().map_or(0, |pp| pp.chunks as usize);
    job.zeros(PartialGamma, chunks * n);
    job.zeros(PartialBeta, chunks * n);
    job.steps(&plan::backward_steps(spec, &bp, spec.gamma, spec.beta));
    let got = job.run(exe, &[(Dx, rows * n), (DGamma, n), (DBeta, n)]);
    let want =
        reference::backward(spec, &sx, &wdy, &want.mean, &want.rstd, spec.gamma.then_some(&wg[..]))
            .unwrap();
    let ctx_b = format!("{ctx}, {}", bp.rows.launch.kernel);
    assert_close("dx", dt, &got[0].to_f64_vec(), &want.dx, &ctx_b);
    if let Some(w) = &want.dgamma {
        assert_close("dgamma", dt, &got[1].to_f64_vec(), w, &ctx_b);
    }
    if let Some(w) = &want.dbeta {
        assert_close("dbeta", dt, &got[2].to_f64_vec(), w, &ctx_b);
    }
}

/// Shapes reaching every kernel family: sub-warps, warps (scalar and 128-bit), blocks with the
/// row in shared memory, blocks re-reading global memory (65536: f32 forward, all backward).
const SHAPES: [(usize, usize); 13] = [
    (1, 1),
    (70, 1),
    (7, 3),
    (33, 8),
    (9, 100),
    (9, 768),
    (5, 1000),
    (3, 1001),
    (4, 1024),
    (3, 1025),
    (2, 4096),
    (2, 4099),
    (2, 65536),
];

fn run_dtype(dtype: DType) {
    let Some(exe) = harness(dtype) else { return };
    let h100 = DeviceLimits::H100;
    let capped = |n: usize| if n >= 4096 { DeviceLimits { max_grid_x: 4, ..h100 } } else { h100 };
    // A tiny grid makes every kernel loop over rows and columns (grid-stride), as for rows
    // beyond the grid limits; it also keeps the number of emulated threads small for long rows.
    let looping = DeviceLimits { max_grid_x: 2, ..h100 };
    for (j, &(rows, n)) in SHAPES.iter().enumerate() {
        let mut rng = SmallRng::seed_from_u64(j as u64);
        let x = random(&mut rng, rows * n, 0.5, 2.0);
        let spec = NormSpec::layer_norm(rows, n, dtype);
        let limits = capped(n);
        check(&exe, &spec, &limits, &x, j as u64, 0.0);
        if n <= 4096 {
            check(&exe, &spec.clone().with_affine(false), &limits, &x, j as u64, 0.0);
            check(&exe, &spec.clone().with_beta(false), &looping, &x, j as u64, 0.0);
        }
    }
    // Many rows through a two-block grid, and hard rows: |mean| ≫ std, |x| ~ 1e30 (f32 range).
    let mut rng = SmallRng::seed_from_u64(99);
    let x = random(&mut rng, 300 * 33, 0.0, 1.0);
    check(&exe, &NormSpec::layer_norm(300, 33, dtype), &looping, &x, 1, 0.0);
    if matches!(dtype, DType::F32 | DType::F64) {
        for n in [768, 4096] {
            let x = random(&mut rng, 3 * n, 1e4, 1.0);
            check(&exe, &NormSpec::layer_norm(3, n, dtype), &capped(n), &x, 2, 1e4);
            let x = random(&mut rng, 3 * n, 0.0, 1e30);
            check(&exe, &NormSpec::layer_norm(3, n, dtype), &capped(n), &x, 3, 0.0);
        }
    }
}

#[test]
fn emulated_f32() {
    run_dtype(DType::F32);
}

#[test]
fn emulated_f64() {
    run_dtype(DType::F64);
}

#[test]
fn emulated_f16() {
    run_dtype(DType::F16);
}

#[test]
fn emulated_bf16() {
    run_dtype(DType::BF16);
}

/// A non-finite value poisons only its own row, also where several rows share a warp (sub-warp
/// groups of 2 lanes for N = 8, 4 lanes for N = 3) or a block loops over rows.
#[test]
fn emulated_non_finite_rows_stay_isolated() {
    use Tensor::*;
    let dtype = DType::F32;
    let Some(exe) = harness(dtype) else { return };
    for (rows, n) in [(40, 8), (40, 3), (6, 1025)] {
        let spec = NormSpec::layer_norm(rows, n, dtype).with_affine(false);
        let mut rng = SmallRng::seed_from_u64(5);
        let mut x = random(&mut rng, rows * n, 0.0, 1.0);
        x[n + 1] = f64::NAN; // row 1
        x[3 * n] = f64::INFINITY; // row 3
        let hx = HostVec::from_f64(dtype, &x);
        let limits = DeviceLimits { max_grid_x: 2, ..DeviceLimits::H100 };
        let p = plan::plan_forward(rows, n, dtype, &limits, true).unwrap();
        let mut job = Job::new(dtype, &format!("nonfinite-{rows}x{n}"));
        job.data(X, &hx);
        job.zeros(Y, rows * n);
        job.zeros(Mean, rows);
        job.zeros(Rstd, rows);
        job.steps(&plan::forward_steps(&spec, &p));
        let out = job.run(&exe, &[(Y, rows * n)]);
        let y = out[0].to_f64_vec();
        for r in 0..rows {
            let row = &y[r * n..(r + 1) * n];
            if r == 1 || r == 3 {
                assert!(row.iter().any(|v| !v.is_finite()), "row {r} should be poisoned, {n}");
            } else {
                let clean = NormSpec::layer_norm(1, n, DType::F64).with_affine(false);
                let want =
                    reference::forward(&clean, &hx.to_f64_vec()[r * n..(r + 1) * n], None, None)
                        .unwrap();
                assert_close("y", dtype, row, &want.y, &format!("row {r} of {rows}×{n}"));
            }
        }
    }
}
