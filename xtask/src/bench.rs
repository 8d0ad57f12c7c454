//! `cargo xtask bench`: run a criterion bench quickly and print GB/s beside the same-run baseline.
//!
//! Each bench group is `<backend>/<pass>/<dtype>/<threads>t` with a `layernorm` and one or more
//! `baseline…` functions per shape (see `benches/benches/*.rs`; the fastest baseline is the
//! bar). The table gives LayerNorm's effective bandwidth (bytes read + written once / time) and
//! its fraction of the baseline's, measured in the same run. `--json PATH` writes the same rows
//! as JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use serde_json::{Value, json};

struct Row {
    backend: String,
    pass: String,
    dtype: String,
    threads: String,
    shape: String,
    bytes: f64,
    ns: f64,
    /// The baseline's (time, bytes): it may move a different byte count (wgpu's backward
    /// baseline is a copy), so fractions compare bandwidths, not times.
    baseline: Option<(f64, f64)>,
}

impl Row {
    fn gbs(&self) -> f64 {
        self.bytes / self.ns
    }
    fn base_gbs(&self) -> Option<f64> {
        self.baseline.map(|(ns, bytes)| bytes / ns)
    }
    fn fraction(&self) -> Option<f64> {
        self.base_gbs().map(|b| self.gbs() / b)
    }
}

/// Runs the bench. `Ok(false)` if the bench itself failed.
pub fn run(args: &[String]) -> Result<bool, String> {
    let (mut bench, mut json_out, mut filter) = ("cpu".to_string(), None, Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bench" => bench = it.next().ok_or("--bench needs a name")?.clone(),
            "--json" => json_out = Some(PathBuf::from(it.next().ok_or("--json needs a path")?)),
            other => filter.push(other.to_string()),
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or("no workspace root")?;
    let start = SystemTime::now();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .env("LAYERNORM_BENCH_QUICK", "1")
        .args(["bench", "-q", "-p", "layernorm-benches", "--bench", &bench, "--"])
        .args(&filter)
        .status()
        .map_err(|e| format!("cannot run cargo bench: {e}"))?;
    if !status.success() {
        return Ok(false);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), PathBuf::from);
    let rows = collect(&target.join("criterion"), start)?;
    print_table(&rows);
    if let Some(p) = json_out {
        let v: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({
                    "backend": r.backend, "pass": r.pass, "dtype": r.dtype, "threads": r.threads,
                    "shape": r.shape, "bytes": r.bytes, "seconds": r.ns * 1e-9,
                    "gb_per_s": r.gbs(),
                    "baseline_gb_per_s": r.base_gbs(),
                    "fraction_of_baseline": r.fraction(),
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
        println!("wrote {}", p.display());
    }
    Ok(true)
}

fn read_json(p: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

/// Every `new/benchmark.json` written since `since`, paired layernorm ↔ baseline.
fn collect(dir: &Path, since: SystemTime) -> Result<Vec<Row>, String> {
    let mut found = Vec::new();
    walk(dir, &mut found);
    #[derive(Default)]
    struct Pair {
        layernorm: Option<(f64, f64)>,
        baseline: Option<(f64, f64)>,
    }
    let mut m: BTreeMap<(String, String), Pair> = BTreeMap::new();
    for p in found {
        let fresh = std::fs::metadata(&p).and_then(|m| m.modified()).is_ok_and(|t| t >= since);
        let (Some(b), Some(e)) = (read_json(&p), read_json(&p.with_file_name("estimates.json")))
        else {
            continue;
        };
        if !fresh {
            continue;
        }
        let group = b["group_id"].as_str().unwrap_or_default().to_string();
        let shape = b["value_str"].as_str().unwrap_or_default().to_string();
        let bytes = b["throughput"]["Bytes"].as_f64().unwrap_or(0.0);
        let ns = e["mean"]["point_estimate"].as_f64().unwrap_or(f64::NAN);
        let slot = m.entry((group, shape)).or_default();
        match b["function_id"].as_str() {
            Some("layernorm") => slot.layernorm = Some((ns, bytes)),
            // Several baselines (memcpy and a copy loop): the fastest is the bar.
            Some(f)
                if f.starts_with("baseline")
                    && slot.baseline.is_none_or(|(t, b)| ns / bytes < t / b) =>
            {
                slot.baseline = Some((ns, bytes))
            }
            _ => {}
        }
    }
    let mut rows = Vec::new();
    for ((group, shape), Pair { layernorm, baseline }) in m {
        let Some((ns, bytes)) = layernorm else { continue };
        let parts: Vec<&str> = group.split('/').collect();
        let get = |i: usize| parts.get(i).copied().unwrap_or("-").to_string();
        rows.push(Row {
            backend: get(0),
            pass: get(1),
            dtype: get(2),
            threads: get(3),
            shape,
            bytes,
            ns,
            baseline,
        });
    }
    if rows.is_empty() {
        return Err("no fresh criterion results found".into());
    }
    Ok(rows)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.file_name().is_some_and(|n| n == "benchmark.json")
            && p.parent().and_then(|d| d.file_name()).is_some_and(|n| n == "new")
        {
            out.push(p);
        }
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<6} {:<9} {:<5} {:<4} {:<11} {:>9} {:>12} {:>9}",
        "bench", "pass", "dtype", "thr", "shape", "GB/s", "baseline", "fraction"
    );
    for r in rows {
        let (base, frac) = match (r.base_gbs(), r.fraction()) {
            (Some(b), Some(f)) => (format!("{b:.1}"), format!("{f:.2}")),
            _ => ("-".into(), "-".into()),
        };
        println!(
            "{:<6} {:<9} {:<5} {:<4} {:<11} {:>9.1} {:>12} {:>9}",
            r.backend,
            r.pass,
            r.dtype,
            r.threads,
            r.shape,
            r.gbs(),
            base,
            frac
        );
    }
}
