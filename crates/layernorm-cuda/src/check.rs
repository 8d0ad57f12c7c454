//! The compile check: every kernel × dtype × kind × strategy through NVRTC to the PTX the
//! backend loads ([`kernels::ptx_arch`]: one PTX per module for every architecture from sm_80),
//! then `ptxas -v` on that PTX for each architecture checked, failing on any compile error,
//! register spill or stack-frame use. The modules (PTX architecture × dtype × kind) are checked
//! in parallel.
//!
//! It needs no GPU: NVRTC and ptxas are plain programs (CI installs them from PyPI, see
//! `docs/backends/cuda.md`). `cargo xtask cuda-check` prints the [`Report`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use layernorm_core::{DType, NormKind};

use crate::{kernels, plan};

/// The architectures CI checks: Ampere and Hopper.
pub const DEFAULT_ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// Why the check failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckError {
    /// NVRTC could not be loaded; nothing was checked.
    NvrtcMissing(String),
    /// An architecture name is not of the form `sm_XY`.
    BadArch(String),
    /// NVRTC rejected the source.
    Compile {
        /// Storage dtype of the module.
        dtype: DType,
        /// Kind of the module.
        kind: NormKind,
        /// Architecture.
        arch: String,
        /// NVRTC's log.
        log: String,
    },
    /// A kernel the planner can launch is missing from the PTX.
    MissingKernel {
        /// Storage dtype of the module.
        dtype: DType,
        /// Kind of the module.
        kind: NormKind,
        /// The entry point.
        kernel: String,
    },
    /// ptxas failed to run or rejected the PTX.
    Ptxas {
        /// Storage dtype of the module.
        dtype: DType,
        /// Kind of the module.
        kind: NormKind,
        /// Architecture.
        arch: String,
        /// What went wrong, with ptxas's output.
        message: String,
    },
    /// Kernels that spill registers or use a stack frame.
    Spills(Vec<KernelInfo>),
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckError::NvrtcMissing(why) => write!(f, "NVRTC is not available: {why}"),
            CheckError::BadArch(a) => write!(f, "architecture `{a}` is not of the form sm_XY"),
            CheckError::Compile { dtype, kind, arch, log } => {
                write!(f, "NVRTC failed to compile the {kind} {dtype} module for {arch}:\n{log}")
            }
            CheckError::MissingKernel { dtype, kind, kernel } => {
                write!(f, "kernel `{kernel}` is missing from the {kind} {dtype} module")
            }
            CheckError::Ptxas { dtype, kind, arch, message } => {
                write!(f, "ptxas failed on the {kind} {dtype} module for {arch}: {message}")
            }
            CheckError::Spills(k) => {
                writeln!(f, "{} kernel(s) spill registers or use a stack frame:", k.len())?;
                for k in k {
                    writeln!(f, "  {k}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for CheckError {}

/// What ptxas reported for one kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInfo {
    /// Storage dtype of the module.
    pub dtype: DType,
    /// Kind of the module.
    pub kind: NormKind,
    /// Architecture (`sm_80`).
    pub arch: String,
    /// Entry point.
    pub kernel: String,
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory in bytes.
    pub smem: u32,
    /// Stack frame in bytes.
    pub stack: u32,
    /// Spill stores in bytes.
    pub spill_stores: u32,
    /// Spill loads in bytes.
    pub spill_loads: u32,
}

impl KernelInfo {
    /// Whether the kernel spills or uses local memory for a stack.
    pub fn is_clean(&self) -> bool {
        self.stack == 0 && self.spill_stores == 0 && self.spill_loads == 0
    }
}

impl fmt::Display for KernelInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<10} {:<5} {:<6} {:<25} {:>4} regs {:>6} B smem {:>4} B stack {:>4}/{:<4} B spill \
             st/ld",
            self.kind.name(),
            self.dtype.name(),
            self.arch,
            self.kernel,
            self.registers,
            self.smem,
            self.stack,
            self.spill_stores,
            self.spill_loads
        )
    }
}

/// One NVRTC compilation.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    /// Storage dtype.
    pub dtype: DType,
    /// Kind.
    pub kind: NormKind,
    /// Virtual architecture of the PTX (`compute_80`).
    pub arch: String,
    /// The architectures ptxas assembled it for (`sm_80`, `sm_90`), when ptxas ran.
    pub assembled_for: Vec<String>,
    /// Size of the PTX in bytes.
    pub ptx_bytes: usize,
    /// Entry points found in the PTX.
    pub kernels: usize,
    /// NVRTC wall time in milliseconds.
    pub millis: f64,
}

/// The outcome of a successful [`check_all`].
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Every NVRTC compilation.
    pub compiled: Vec<Compiled>,
    /// The ptxas used, or `None` when none was found (then [`Report::kernels`] is empty).
    pub ptxas: Option<PathBuf>,
    /// Registers, shared memory, stack and spills per kernel, when ptxas ran.
    pub kernels: Vec<KernelInfo>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.compiled {
            writeln!(
                f,
                "nvrtc {:<10} {:<5} {:<10} {:>3} kernels, {:>7} B of PTX in {:.0} ms{}",
                c.kind.name(),
                c.dtype.name(),
                c.arch,
                c.kernels,
                c.ptx_bytes,
                c.millis,
                if c.assembled_for.is_empty() {
                    String::new()
                } else {
                    format!(", assembled for {}", c.assembled_for.join(", "))
                }
            )?;
        }
        match &self.ptxas {
            None => writeln!(
                f,
                "ptxas not found (set LAYERNORM_PTXAS, put it on PATH, or pip install \
                 nvidia-cuda-nvcc-cu12): registers and spills were not checked"
            )?,
            Some(p) => {
                writeln!(
                    f,
                    "ptxas {}: {} kernels, no spills, no stack",
                    p.display(),
                    self.kernels.len()
                )?;
                for k in &self.kernels {
                    writeln!(f, "  {k}")?;
                }
            }
        }
        Ok(())
    }
}

/// Finds ptxas: `$LAYERNORM_PTXAS`, then `PATH`, then `$CUDA_HOME/bin`, then next to a PyPI NVRTC
/// on `LD_LIBRARY_PATH` (`…/nvidia/cuda_nvrtc/lib` → `…/nvidia/cuda_nvcc/bin/ptxas`), then
/// `/usr/local/cuda/bin`.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LAYERNORM_PTXAS") {
        return Some(PathBuf::from(p));
    }
    let mut candidates = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("ptxas")));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            candidates.push(Path::new(&home).join("bin").join("ptxas"));
        }
    }
    if let Some(ld) = std::env::var_os("LD_LIBRARY_PATH") {
        for dir in std::env::split_paths(&ld) {
            if let Some(nvidia) = dir.parent().and_then(Path::parent) {
                candidates.push(nvidia.join("cuda_nvcc").join("bin").join("ptxas"));
            }
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/ptxas"));
    candidates.into_iter().find(|p| p.is_file())
}

/// The virtual architecture of the PTX a device of a real architecture loads
/// ([`kernels::ptx_arch`]): `sm_75` → `compute_75`, `sm_80`, `sm_90`, `sm_90a` → `compute_80`.
fn virtual_arch(arch: &str) -> Result<String, CheckError> {
    let bad = || CheckError::BadArch(arch.into());
    let v = arch.strip_prefix("sm_").ok_or_else(bad)?;
    let digits = v.strip_suffix(|c: char| c.is_ascii_lowercase()).unwrap_or(v);
    let cc: u32 = digits.parse().map_err(|_| bad())?;
    if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    Ok(kernels::ptx_arch((cc / 10, cc % 10)))
}

/// Entry points declared in PTX text (`.entry name(` lines).
pub fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| l.trim_start().strip_prefix(".visible .entry "))
        .map(|l| l.split('(').next().unwrap_or(l).trim().to_string())
        .collect()
}

fn number_before(text: &str, unit: &str) -> Option<u32> {
    let i = text.find(unit)?;
    text[..i].split_whitespace().last()?.parse().ok()
}

/// Parses `ptxas -v` output into one [`KernelInfo`] per function.
pub fn parse_ptxas(output: &str, dtype: DType, kind: NormKind, arch: &str) -> Vec<KernelInfo> {
    let mut out: Vec<KernelInfo> = Vec::new();
    let blank = |kernel: &str| KernelInfo {
        dtype,
        kind,
        arch: arch.into(),
        kernel: kernel.into(),
        registers: 0,
        smem: 0,
        stack: 0,
        spill_stores: 0,
        spill_loads: 0,
    };
    for line in output.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or(rest);
            out.push(blank(name));
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            let name = rest.trim();
            if out.last().is_none_or(|k| k.kernel != name) {
                out.push(blank(name));
            }
        } else if line.contains("bytes stack frame") {
            if let Some(k) = out.last_mut() {
                k.stack = number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            }
        } else if line.contains("Used ")
            && line.contains(" registers")
            && let Some(k) = out.last_mut()
        {
            k.registers = number_before(line, "registers").unwrap_or(0);
            k.smem = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

fn run_ptxas(
    ptxas: &Path,
    ptx: &str,
    dtype: DType,
    kind: NormKind,
    arch: &str,
) -> Result<String, CheckError> {
    let err = |message: String| CheckError::Ptxas { dtype, kind, arch: arch.into(), message };
    let dir = std::env::temp_dir();
    let stem = format!(
        "layernorm-cuda-check-{}-{}-{}-{arch}",
        std::process::id(),
        kind.name(),
        dtype.name()
    );
    let ptx_path = dir.join(format!("{stem}.ptx"));
    let cubin_path = dir.join(format!("{stem}.cubin"));
    std::fs::write(&ptx_path, ptx)
        .map_err(|e| err(format!("writing {}: {e}", ptx_path.display())))?;
    let result = Command::new(ptxas)
        .arg("-v")
        .arg(format!("-arch={arch}"))
        .arg("-o")
        .arg(&cubin_path)
        .arg(&ptx_path)
        .output();
    let _ = std::fs::remove_file(&ptx_path);
    let _ = std::fs::remove_file(&cubin_path);
    let output = result.map_err(|e| err(format!("running {}: {e}", ptxas.display())))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        return Err(err(format!("{}:\n{text}", output.status)));
    }
    Ok(text)
}

/// What one module's check found: its compilation and ptxas's report per kernel.
type ModuleResult = Result<(Compiled, Vec<KernelInfo>), CheckError>;

/// One module: NVRTC to the PTX of `varch`, the entry-point check, then ptxas for each of
/// `archs` when there is one.
fn check_module(
    (varch, archs): (&str, &[&str]),
    dtype: DType,
    kind: NormKind,
    ptxas: Option<&Path>,
) -> ModuleResult {
    let start = Instant::now();
    let ptx = kernels::compile(dtype, kind, varch)
        .map_err(|log| CheckError::Compile { dtype, kind, arch: varch.into(), log })?
        .to_src();
    let millis = start.elapsed().as_secs_f64() * 1e3;
    let entries = ptx_entries(&ptx);
    for kernel in plan::kernel_names(dtype, kind) {
        if !entries.contains(&kernel) {
            return Err(CheckError::MissingKernel { dtype, kind, kernel });
        }
    }
    let mut compiled = Compiled {
        dtype,
        kind,
        arch: varch.into(),
        assembled_for: Vec::new(),
        ptx_bytes: ptx.len(),
        kernels: entries.len(),
        millis,
    };
    let Some(ptxas) = ptxas else { return Ok((compiled, Vec::new())) };
    let mut infos = Vec::new();
    for &arch in archs {
        let text = run_ptxas(ptxas, &ptx, dtype, kind, arch)?;
        let found = parse_ptxas(&text, dtype, kind, arch);
        if found.len() < entries.len() {
            return Err(CheckError::Ptxas {
                dtype,
                kind,
                arch: arch.into(),
                message: format!(
                    "reported {} functions for {} entry points:\n{text}",
                    found.len(),
                    entries.len()
                ),
            });
        }
        infos.extend(found);
        compiled.assembled_for.push(arch.into());
    }
    Ok((compiled, infos))
}

/// Compiles every kernel of every dtype and kind with NVRTC to the PTX that devices of the given
/// architectures (`sm_80`, …) load (one compilation for all that load the same PTX), checks that
/// every entry point the planner can name exists, and, when ptxas is found ([`find_ptxas`]),
/// assembles the PTX with `ptxas -v` for each architecture and fails on any spill or stack
/// frame. Modules are checked on as many threads as the machine has; the report lists them in
/// a fixed order (PTX architecture, dtype, kind; kernels by architecture within a module).
pub fn check_all(archs: &[&str]) -> Result<Report, CheckError> {
    if let Err(why) = crate::nvrtc_available() {
        return Err(CheckError::NvrtcMissing(why));
    }
    // The architectures grouped by the PTX they load, in the order given.
    let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
    for &arch in archs {
        let varch = virtual_arch(arch)?;
        match groups.iter_mut().find(|(v, _)| *v == varch) {
            Some((_, members)) => members.push(arch),
            None => groups.push((varch, vec![arch])),
        }
    }
    let ptxas = find_ptxas();
    let jobs: Vec<(&str, &[&str], DType, NormKind)> = groups
        .iter()
        .flat_map(|(v, a)| DType::ALL.into_iter().map(move |d| (v.as_str(), a.as_slice(), d)))
        .flat_map(|(v, a, d)| NormKind::ALL.into_iter().map(move |k| (v, a, d, k)))
        .collect();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(jobs.len());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<ModuleResult>> = (0..jobs.len()).map(|_| None).collect();
    let slots = std::sync::Mutex::new(&mut results);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(varch, archs, dtype, kind)) = jobs.get(i) else { break };
                    let r = check_module((varch, archs), dtype, kind, ptxas.as_deref());
                    slots.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
                }
            });
        }
    });
    let mut report = Report { compiled: Vec::new(), ptxas: ptxas.clone(), kernels: Vec::new() };
    for r in results.into_iter().flatten() {
        let (compiled, infos) = r?;
        report.compiled.push(compiled);
        report.kernels.extend(infos);
    }
    let dirty: Vec<KernelInfo> = report.kernels.iter().filter(|k| !k.is_clean()).cloned().collect();
    if !dirty.is_empty() {
        return Err(CheckError::Spills(dirty));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Verbatim shape of ptxas 12.9 `-v` output.
    const SAMPLE: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'gb_final' for 'sm_90'
ptxas info    : Function properties for gb_final
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 14 registers, used 0 barriers, 400 bytes cmem[0]
ptxas info    : Compile time = 2.1 ms
ptxas info    : Compiling entry function 'ln_bwd_block_v_smem' for 'sm_90'
ptxas info    : Function properties for ln_bwd_block_v_smem
    8 bytes stack frame, 16 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 8 bytes cumulative stack size, 512 bytes smem
";

    #[test]
    fn parses_ptxas_verbose_output() {
        let k = parse_ptxas(SAMPLE, DType::F64, NormKind::RmsNorm, "sm_90");
        assert_eq!(k.len(), 2);
        assert!(k.iter().all(|k| k.kind == NormKind::RmsNorm && k.dtype == DType::F64));
        assert_eq!((k[0].kernel.as_str(), k[0].registers, k[0].smem), ("gb_final", 14, 0));
        assert!(k[0].is_clean());
        assert_eq!(k[1].kernel, "ln_bwd_block_v_smem");
        assert_eq!((k[1].registers, k[1].smem, k[1].stack), (32, 512, 8));
        assert_eq!((k[1].spill_stores, k[1].spill_loads), (16, 28));
        assert!(!k[1].is_clean());
    }

    #[test]
    fn finds_entries_in_ptx() {
        let ptx = ".visible .entry ln_fwd_warp_s_i1(\n.param .u64 a\n)\n.visible .entry k2(\n";
        assert_eq!(ptx_entries(ptx), vec!["ln_fwd_warp_s_i1".to_string(), "k2".to_string()]);
    }

    #[test]
    fn architecture_names() {
        assert_eq!(virtual_arch("sm_80").unwrap(), "compute_80");
        assert_eq!(virtual_arch("sm_90").unwrap(), "compute_80");
        assert_eq!(virtual_arch("sm_90a").unwrap(), "compute_80");
        assert_eq!(virtual_arch("sm_120").unwrap(), "compute_80");
        assert_eq!(virtual_arch("sm_75").unwrap(), "compute_75");
        assert!(matches!(virtual_arch("sm_8x"), Err(CheckError::BadArch(_))));
        assert!(matches!(virtual_arch("sm_9"), Err(CheckError::BadArch(_))));
        assert!(matches!(virtual_arch("80"), Err(CheckError::BadArch(_))));
        assert!(matches!(virtual_arch("sm_"), Err(CheckError::BadArch(_))));
    }
}
