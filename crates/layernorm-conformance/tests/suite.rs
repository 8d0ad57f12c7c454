//! The conformance suite as a test: every backend in `layernorm::REGISTRY` that is available
//! here runs every case in every dtype; any failure fails the test, and each backend's report
//! (verdicts only, no floats) is snapshotted, one file per backend and kind of device
//! (`snapshot_name`: the dtypes a device lacks are part of the name).
//!
//! `LAYERNORM_REQUIRE=wgpu,cuda` (comma-separated) makes an unavailable backend a failure: CI
//! sets it for the backends its machine must have, so a missing driver cannot pass silently.

use layernorm_conformance::{
    BackendRun, cases, render_report, render_table, run_entries, snapshot_name,
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
    for run in run_entries(layernorm::REGISTRY, &cases) {
        match run {
            BackendRun::Unavailable { name, error } => {
                println!("{name}: skipped: {error}");
                assert!(!required.iter().any(|r| r == name), "required backend {name}: {error}");
            }
            BackendRun::Ran { name, device, outcomes } => {
                ran += 1;
                println!("{name} on {device}:\n{}", render_table(&outcomes));
                let failed: Vec<_> = outcomes.iter().filter(|o| o.failed()).collect();
                assert!(
                    failed.is_empty(),
                    "{name}: {} of {} checks failed:\n{}",
                    failed.len(),
                    outcomes.len(),
                    render_table(&failed.into_iter().cloned().collect::<Vec<_>>())
                );
                let suffix = snapshot_name(name, &outcomes);
                insta::with_settings!({ snapshot_suffix => suffix, omit_expression => true }, {
                    insta::assert_snapshot!("report", render_report(&outcomes));
                });
            }
        }
    }
    assert!(ran > 0, "no backend ran at all");
}
