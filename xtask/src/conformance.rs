//! `cargo xtask conformance`: the suite on every available backend, as a table.

use layernorm::REGISTRY;
use layernorm_conformance::{BackendRun, cases, render_table, run_entries, summary_by_kind};

/// Runs the suite. `Ok(false)` when anything failed or a required backend was unavailable.
pub fn run(args: &[String]) -> Result<bool, String> {
    let mut only = Vec::new();
    let mut require = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let list = match a.as_str() {
            "--backend" => &mut only,
            "--require" => &mut require,
            other => return Err(format!("unknown flag `{other}`")),
        };
        let name = it.next().ok_or_else(|| format!("`{a}` needs a backend name"))?;
        if !REGISTRY.iter().any(|e| e.name == name) {
            return Err(format!(
                "unknown backend `{name}` (known: {})",
                layernorm::backend_names()
            ));
        }
        list.push(name.clone());
    }
    // Required backends run even if not named by --backend.
    let entries: Vec<_> = REGISTRY
        .iter()
        .filter(|e| {
            only.is_empty()
                || only.contains(&e.name.to_string())
                || require.contains(&e.name.to_string())
        })
        .copied()
        .collect();

    let cases = cases();
    let mut ok = true;
    let mut summary = Vec::new();
    for run in run_entries(&entries, &cases) {
        match run {
            BackendRun::Unavailable { name, error } => {
                let required = require.iter().any(|r| r == name);
                println!("== {name}: skipped: {error}\n");
                summary.push(format!(
                    "{name}: {}",
                    if required { "UNAVAILABLE (required)" } else { "skipped (unavailable)" }
                ));
                ok &= !required;
            }
            BackendRun::Ran { name, device, outcomes } => {
                println!("== {name} on {device}");
                print!("{}", render_table(&outcomes));
                println!();
                ok &= !outcomes.iter().any(|o| o.failed());
                for (kind, sum) in summary_by_kind(&outcomes) {
                    summary.push(format!("{name} {:<10} {sum}", kind.name()));
                }
            }
        }
    }
    println!("summary:");
    for s in summary {
        println!("  {s}");
    }
    println!("{}", if ok { "conformance: OK" } else { "conformance: FAILED" });
    Ok(ok)
}
