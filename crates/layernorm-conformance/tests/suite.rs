//! The conformance suite as a test: every backend in `layernorm::REGISTRY` that is available
//! here runs every case for both kinds in every dtype; any failure fails the test, and each
//! backend's report (verdicts only, no floats, failures included) is snapshotted, one file per
//! backend and kind of device (`snapshot_name`: the dtypes a device lacks are part of the name). The suite also
//! runs on the reference itself ([`Oracle`]), which must pass every case: no tolerance is
//! tighter than the rounding the dtypes force.
//!
//! `LAYERNORM_REQUIRE=wgpu,cuda` (comma-separated) makes an unavailable backend a failure: CI
//! sets it for the backends its machine must have, so a missing driver cannot pass silently.

use layernorm::{DType, NormKind};
use layernorm_conformance::{
    BackendRun, Oracle, Status, cases, render_report, render_table, run_backend, run_entries,
    snapshot_name,
};

#[test]
fn every_available_backend_conforms() {
    let required: Vec<String> = std::env::var("LAYERNORM_REQUIRE")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().to_string())
        .collect();
    for r in &required {
        assert!(
            layernorm::REGISTRY.iter().any(|e| e.name == r),
            "LAYERNORM_REQUIRE names unknown backend `{r}`"
        );
    }
    let cases = cases();
    let mut ran = 0;
    let mut failures = Vec::new();
    // Every backend runs before anything is asserted, so one report shows all of them; they
    // run together, each case's reference made once for all of them.
    let start = std::time::Instant::now();
    let runs = run_entries(layernorm::REGISTRY, &cases);
    println!("every backend: {:.1} s", start.elapsed().as_secs_f64());
    for run in runs {
        match run {
            BackendRun::Unavailable { name, error } => {
                println!("{name}: skipped: {error}");
                if required.iter().any(|r| r == name) {
                    failures.push(format!("required backend {name}: {error}"));
                }
            }
            BackendRun::Ran { name, device, outcomes } => {
                ran += 1;
                println!("{name} on {device}:\n{}", render_table(&outcomes));
                let failed: Vec<_> = outcomes.iter().filter(|o| o.failed()).cloned().collect();
                if !failed.is_empty() {
                    failures.push(format!(
                        "{name}: {} of {} checks failed:\n{}",
                        failed.len(),
                        outcomes.len(),
                        render_table(&failed)
                    ));
                }
                // The snapshot holds the verdicts, FAILs included: a change is a review event
                // whichever way it goes. Checked for every backend before anything fails.
                let suffix = snapshot_name(name, &outcomes);
                let report = render_report(&outcomes);
                let checked = std::panic::catch_unwind(|| {
                    insta::with_settings!({ snapshot_suffix => suffix, omit_expression => true }, {
                        insta::assert_snapshot!("report", report);
                    });
                });
                if checked.is_err() {
                    failures.push(format!("{name}: the report differs from its snapshot"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(ran > 0, "no backend ran at all");
}

#[test]
fn the_correctly_rounded_answer_passes_every_case() {
    let start = std::time::Instant::now();
    // The 2^24-element rows test the index and count limits of device kernels; the reference
    // has none, their comparisons follow the same rules as every other row, and they would
    // double the reference's work here: they are left to the backends.
    let cases: Vec<_> = cases().into_iter().filter(|c| c.n < 1 << 20).collect();
    let outcomes = run_backend(&Oracle, &cases, &NormKind::ALL, &DType::ALL);
    let wrong: Vec<_> = outcomes
        .iter()
        .filter(|o| !matches!(o.status, Status::Pass | Status::Refused(_)))
        .cloned()
        .collect();
    assert!(wrong.is_empty(), "the reference itself does not pass:\n{}", render_table(&wrong));
    assert!(outcomes.iter().any(|o| matches!(o.status, Status::Refused("singular-gamma"))));
    println!(
        "the reference as a backend: {} checks in {:.1} s",
        outcomes.len(),
        start.elapsed().as_secs_f64()
    );
}
