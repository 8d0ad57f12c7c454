//! `cargo xtask bench`: run a criterion bench quickly and print GB/s beside the same-run baseline.
//!
//! Each bench group is `<backend>/<pass>/<dtype>/<threads>t` with a kernel (`layernorm` or
//! `rmsnorm`) and one or more `baseline…` functions per shape (see `benches/benches/*.rs`; the
//! fastest baseline is the bar); a pass prefixed `rms-` is RMSNorm's, and the table and JSON show
//! the kind in a column of its own. The table gives the kernel's effective bandwidth (the bytes
//! read and written once, over the time) and its fraction of the baseline's, measured in the
//! same run. `--rounds K` runs the bench K times and reports the median of the rounds'
//! fractions (each against its own round's baseline, so a machine whose speed drifts between
//! rounds moves both sides of a fraction alike), with every round's fraction beside it.
//! `--json PATH` writes the same rows as JSON.
//!
//! `--paired` runs `benches/benches/paired.rs` instead: the kernels and their CPU baselines
//! timed alternately, ~10 ms a side, many times over, each pair a "round" here (so the table's
//! fraction is the median over pairs, and the JSON's `fraction_per_round` is per pair). Both
//! sides of a pair see the machine in the same state, which criterion's one-function-at-a-time
//! runs cannot give. Its pre-norm rows (issue 25) are the passes `res-fwd` (the fused residual
//! forward), `res-bwd` and `res-ybwd` (its backward with dh, from h and from y), each against a
//! baseline moving the same bytes, and `res-unfused`: the fused forward against `add` then the
//! norm as two calls, whose "fraction" is therefore how many times faster the fused call is.
//!
//! `--avx2` (CPU) builds the bench with the feature `max-avx2`: the kernels and the bars run at
//! AVX2 at most, so the AVX2 path is measured on an AVX-512 machine. The table names the
//! instruction set the kernels ran.
//!
//! The bench targets need `layernorm-benches`' feature `bench` (criterion is an optional
//! dependency, which keeps it out of `cargo test --workspace`); every run here passes it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use serde_json::{Value, json};

/// One row of the table: a layernorm benchmark beside its bar, over one or more rounds.
struct Summary {
    /// Backend, pass, dtype, threads, shape.
    key: [String; 5],
    bytes: f64,
    /// Per round: (LayerNorm's GB/s, the bar's GB/s where there is one). Bandwidths, not
    /// times: a baseline may move a different byte count (wgpu's backward baseline is a copy).
    rounds: Vec<(f64, Option<f64>)>,
}

impl Summary {
    fn gbs(&self) -> f64 {
        median(self.rounds.iter().map(|r| r.0).collect())
    }
    fn base_gbs(&self) -> Option<f64> {
        let b: Option<Vec<f64>> = self.rounds.iter().map(|r| r.1).collect();
        b.map(median)
    }
    /// Each round's fraction of its own bar (the two measured in the same round).
    fn fractions(&self) -> Option<Vec<f64>> {
        self.rounds.iter().map(|&(g, b)| b.map(|b| g / b)).collect()
    }
    /// The median of the rounds' fractions.
    fn fraction(&self) -> Option<f64> {
        self.fractions().map(median)
    }
}

/// The median (of an even count, the mean of the middle two); NaN when empty.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Each round's one-round rows merged per benchmark (in the first round's order); a benchmark
/// missing from a round keeps the rounds it has.
fn summarize(rounds: Vec<Vec<Summary>>) -> Vec<Summary> {
    let mut out: Vec<Summary> = Vec::new();
    for r in rounds.into_iter().flatten() {
        match out.iter_mut().find(|s| s.key == r.key) {
            Some(s) => s.rounds.extend(r.rounds),
            None => out.push(r),
        }
    }
    out
}

/// Runs the bench. `Ok(false)` if the bench itself failed.
pub fn run(args: &[String]) -> Result<bool, String> {
    let (mut bench, mut json_out, mut filter, mut rounds) =
        ("cpu".to_string(), None, Vec::new(), 1usize);
    let (mut paired, mut avx2) = (false, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bench" => bench = it.next().ok_or("--bench needs a name")?.clone(),
            "--paired" => paired = true,
            "--avx2" => avx2 = true,
            "--json" => json_out = Some(PathBuf::from(it.next().ok_or("--json needs a path")?)),
            "--rounds" => {
                let k = it.next().ok_or("--rounds needs a count")?;
                rounds = k.parse().ok().filter(|&k| k > 0).ok_or("--rounds needs a count ≥ 1")?;
            }
            other => filter.push(other.to_string()),
        }
    }
    if paired && bench != "cpu" {
        return Err("--paired measures the CPU backend only".into());
    }
    if avx2 && bench != "cpu" {
        return Err("--avx2 applies to the CPU backend only".into());
    }
    let mut isa = None;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or("no workspace root")?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), PathBuf::from);
    let mut results = Vec::new();
    for round in 1..=rounds {
        if rounds > 1 {
            println!("round {round} of {rounds}");
        }
        let start = SystemTime::now();
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        let name = if paired { "paired" } else { &bench };
        cargo
            .current_dir(root)
            .env("LAYERNORM_BENCH_QUICK", "1")
            .args(["bench", "-q", "-p", "layernorm-benches", "--bench", name, "--features"])
            .arg(if avx2 { "bench,max-avx2" } else { "bench" })
            .arg("--")
            .args(&filter);
        if paired {
            // The paired bench prints its measurements; criterion's go to target/criterion.
            let out = cargo
                .stderr(std::process::Stdio::inherit())
                .output()
                .map_err(|e| format!("cannot run cargo bench: {e}"))?;
            if !out.status.success() {
                return Ok(false);
            }
            let text = String::from_utf8_lossy(&out.stdout);
            isa = text.lines().find_map(|l| l.strip_prefix("isa ")).map(str::to_string);
            let rows = parse_pairs(&text);
            if rows.is_empty() {
                return Err("the paired bench measured nothing (check the filter)".into());
            }
            results.push(rows);
            continue;
        }
        let status = cargo.status().map_err(|e| format!("cannot run cargo bench: {e}"))?;
        if !status.success() {
            return Ok(false);
        }
        results.push(collect(&target.join("criterion"), start)?);
    }
    let rows = summarize(results);
    if let Some(isa) = &isa {
        println!("instruction set: {isa}{}", if avx2 { " (--avx2)" } else { "" });
    }
    print_table(&rows);
    if let Some(p) = json_out {
        let v: Vec<Value> = rows
            .iter()
            .map(|r| {
                let [backend, pass, dtype, threads, shape] = &r.key;
                let (kind, pass) = split_kind(pass);
                json!({
                    "isa": isa,
                    "backend": backend, "kind": kind, "pass": pass, "dtype": dtype,
                    "threads": threads,
                    "shape": shape, "bytes": r.bytes, "rounds": r.rounds.len(),
                    "seconds": r.bytes / r.gbs() * 1e-9,
                    "gb_per_s": r.gbs(),
                    "baseline_gb_per_s": r.base_gbs(),
                    "fraction_of_baseline": r.fraction(),
                    "fraction_per_round": r.fractions(),
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
        println!("wrote {}", p.display());
    }
    Ok(true)
}

/// The paired bench's pass whose bar is the unfused pre-norm forward (two calls), not a
/// same-bytes baseline.
const UNFUSED: &str = "res-unfused";

/// The kind a bench group's pass names (`rms-fwd`: RMSNorm's forward) and the pass itself.
fn split_kind(pass: &str) -> (&'static str, &str) {
    match pass.strip_prefix("rms-") {
        Some(p) => ("rms_norm", p),
        None => ("layer_norm", pass),
    }
}

/// A row's key from its bench group (`backend/pass/dtype/threads`) and shape.
fn key_of(group: &str, shape: &str) -> [String; 5] {
    let parts: Vec<&str> = group.split('/').collect();
    let get = |i: usize| parts.get(i).copied().unwrap_or("-").to_string();
    [get(0), get(1), get(2), get(3), shape.to_string()]
}

/// The paired bench's lines (`pair <group> <shape> <bytes> <kernel s>,<bar s> …`, seconds per
/// call): one row per line, each pair one round (LayerNorm and its bar timed back to back).
fn parse_pairs(text: &str) -> Vec<Summary> {
    let mut rows = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some("pair"), Some(group), Some(shape), Some(bytes)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let Ok(bytes) = bytes.parse::<f64>() else { continue };
        let rounds: Vec<(f64, Option<f64>)> = f
            .filter_map(|p| {
                let (k, b) = p.split_once(',')?;
                let (k, b) = (k.parse::<f64>().ok()?, b.parse::<f64>().ok()?);
                Some((bytes / k * 1e-9, Some(bytes / b * 1e-9)))
            })
            .collect();
        let key = key_of(group, shape);
        if !rounds.is_empty() {
            rows.push(Summary { key, bytes, rounds });
        }
    }
    rows
}

fn read_json(p: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

/// Every `new/benchmark.json` written since `since`, paired layernorm ↔ baseline: one round.
fn collect(dir: &Path, since: SystemTime) -> Result<Vec<Summary>, String> {
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
            Some("layernorm" | "rmsnorm") => slot.layernorm = Some((ns, bytes)),
            // Several baselines (memcpy, a copy loop, a streaming copy): the fastest is the bar.
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
        let key = key_of(&group, &shape);
        let round = (bytes / ns, baseline.map(|(ns, bytes)| bytes / ns));
        rows.push(Summary { key, bytes, rounds: vec![round] });
    }
    if rows.is_empty() {
        return Err("no fresh criterion results found (check the filter, a regular expression \
                    over `<group>/<function>/<shape>`: `fwd/f32/1t/.*/4096x768` is one shape)"
            .into());
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

fn print_table(rows: &[Summary]) {
    let many = rows.iter().any(|r| r.rounds.len() > 1);
    println!(
        "{:<6} {:<10} {:<4} {:<5} {:<4} {:<11} {:>9} {:>12} {:>9}{}",
        "bench",
        "kind",
        "pass",
        "dtype",
        "thr",
        "shape",
        "GB/s",
        "baseline",
        "fraction",
        if many { "  rounds' fractions" } else { "" }
    );
    if rows.iter().any(|r| split_kind(&r.key[1]).1 == UNFUSED) {
        println!(
            "({UNFUSED}: the fused residual forward against add + norm as two calls; its \
             \"baseline\" is the two calls, its fraction the fused call's speed-up)"
        );
    }
    for r in rows {
        let (base, frac) = match (r.base_gbs(), r.fraction()) {
            (Some(b), Some(f)) => (format!("{b:.1}"), format!("{f:.2}")),
            _ => ("-".into(), "-".into()),
        };
        let spread = match r.fractions() {
            // A few rounds: each one's fraction. Many (the paired bench's pairs): their spread.
            Some(mut f) if many && f.len() > 5 => {
                f.sort_by(f64::total_cmp);
                let q = |p: f64| f[((f.len() - 1) as f64 * p).round() as usize];
                format!("  {:.2}–{:.2} (middle half of {})", q(0.25), q(0.75), f.len())
            }
            Some(f) if many => {
                let f: Vec<String> = f.iter().map(|f| format!("{f:.2}")).collect();
                format!("  {}", f.join(" "))
            }
            _ => String::new(),
        };
        let [backend, pass, dtype, threads, shape] = &r.key;
        let (kind, pass) = split_kind(pass);
        println!(
            "{backend:<6} {kind:<10} {pass:<4} {dtype:<5} {threads:<4} {shape:<11} {:>9.1} {base:>12} {frac:>9}{spread}",
            r.gbs(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One round of a benchmark moving 100 bytes in `ns` (its bar in `base_ns`).
    fn row(shape: &str, ns: f64, base_ns: Option<f64>) -> Summary {
        let key = ["cpu", "fwd", "f32", "1t", shape].map(String::from);
        Summary { key, bytes: 100.0, rounds: vec![(100.0 / ns, base_ns.map(|t| 100.0 / t))] }
    }

    #[test]
    fn rounds_are_summarized_by_the_median_of_their_own_fractions() {
        // Three rounds of one benchmark whose machine changed speed between rounds: each
        // round's fraction is against its own bar, and the median is of those fractions.
        let rounds = vec![
            vec![row("4x8", 10.0, Some(8.0)), row("2x2", 1.0, None)],
            vec![row("4x8", 20.0, Some(10.0))],
            vec![row("4x8", 5.0, Some(4.5)), row("2x2", 3.0, None)],
        ];
        let s = summarize(rounds);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].key[4], "4x8");
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        let f = s[0].fractions().unwrap();
        assert!(f.len() == 3 && close(f[0], 0.8) && close(f[1], 0.5) && close(f[2], 0.9), "{f:?}");
        assert!(close(s[0].fraction().unwrap(), 0.8));
        assert!(close(s[0].gbs(), 10.0)); // median of 10, 5, 20 GB/s
        assert!(close(s[0].base_gbs().unwrap(), 12.5)); // median of 12.5, 10, 22.2
        // Without a bar there is no fraction; GB/s is the median of the two rounds it has.
        assert_eq!(s[1].rounds.len(), 2);
        assert_eq!(s[1].fraction(), None);
        assert!(close(s[1].gbs(), (100.0 + 100.0 / 3.0) / 2.0));
    }

    #[test]
    fn paired_lines_become_one_row_with_a_round_per_pair() {
        let text = "noise\npair cpu/bwd/f32/2t 4096x768 300 1e-7,5e-8 2e-7,1.5e-7\npair x\n";
        let rows = parse_pairs(text);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.key, ["cpu", "bwd", "f32", "2t", "4096x768"].map(String::from));
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        // 300 bytes in 1e-7 s: 3 GB/s; its bar 6 GB/s; the second pair 1.5 against 2.
        let f = r.fractions().unwrap();
        assert!(close(r.rounds[0].0, 3.0) && close(r.rounds[0].1.unwrap(), 6.0));
        assert!(close(f[0], 0.5) && close(f[1], 0.75), "{f:?}");
        assert!(close(r.fraction().unwrap(), 0.625));
    }

    #[test]
    fn an_rms_prefix_names_the_kind() {
        assert_eq!(split_kind("rms-fwd"), ("rms_norm", "fwd"));
        assert_eq!(split_kind("bwd"), ("layer_norm", "bwd"));
        assert_eq!(split_kind("rms-res-unfused"), ("rms_norm", UNFUSED));
        let rows = parse_pairs("pair cpu/rms-bwd/f32/1t 4x8 300 1e-7,5e-8\n");
        assert_eq!(rows[0].key[1], "rms-bwd");
    }

    #[test]
    fn median_of_even_counts_is_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![3.0, 1.0, 2.0, 10.0]), 2.5);
        assert_eq!(median(vec![7.0]), 7.0);
        assert!(median(vec![]).is_nan());
    }
}
