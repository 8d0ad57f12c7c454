//! The crate's unit tests: the `pub fn`s of no arguments in each module's `tests`, compiled into
//! the library by the `unit-tests` feature (see `layernorm_cpu::unit_tests`), each run here as
//! its own test. The library is then compiled once for `cargo test` instead of a second time as
//! a test harness (about 100 CPU-s of a cold build on two cores).
//!
//! `every_unit_test_is_listed` reads the modules' sources, so a test added there and not here, or
//! marked `#[test]` there, fails instead of never running.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

macro_rules! unit_tests {
    ($($module:ident in $file:literal: [$($(#[$attr:meta])* $test:ident),* $(,)?]),* $(,)?) => {
        $(mod $module {
            $(
                $(#[$attr])*
                #[test]
                fn $test() {
                    layernorm_cpu::unit_tests::$module::$test()
                }
            )*
        })*

        /// Each module's source file and the tests listed for it.
        const LISTED: &[(&str, &[&str])] = &[$(($file, &[$(stringify!($test)),*])),*];
    };
}

unit_tests! {
    columns in "columns.rs": [column_chunks_match_the_row_wise_backward_bit_for_bit],
    driver in "driver.rs": [
        the_backward_from_y_has_the_bits_of_the_staged_composition_at_any_thread_count,
        the_partials_start_on_a_cache_line,
        buffers_that_cannot_be_had_are_out_of_memory_errors,
        the_streaming_threshold_is_half_the_reported_cache_within_measured_bounds,
        the_forward_streams_when_asked_and_prefetches_only_large_cached_outputs,
    ],
    isa in "isa.rs": [the_dispatch_runs_the_instruction_set_it_reports],
    reduce_backward in "reduce/backward.rs": [
        one_and_two_rows_per_sweep_give_the_same_bits_on_every_instruction_set,
        the_kernels_recover_xhat_from_y_with_the_bits_of_the_staged_rows_on_every_instruction_set,
        the_backward_kernels_are_right_on_every_instruction_set,
    ],
    reduce_forward in "reduce/forward.rs": [
        the_short_row_kernel_is_right_on_every_instruction_set,
        the_long_row_kernel_matches_the_row_by_row_composition_bit_for_bit,
        the_pipelined_sweep_is_right_on_every_instruction_set,
    ],
    reduce_half in "reduce/half.rs": [
        bf16_conversions_match_half_on_every_instruction_set,
        f16_conversions_match_half_on_every_instruction_set,
        the_16_bit_kernels_are_right_on_every_instruction_set,
        #[cfg(target_arch = "x86_64")]
        both_bf16_roundings_give_the_kernels_the_same_bits,
        pair_stores_round_as_single_stores_on_every_instruction_set,
    ],
    reduce_store in "reduce/store.rs": [streamed_spans_start_on_a_vector_and_end_on_a_line],
    reduce in "reduce/mod.rs": [
        short_row_kernels_match_the_portable_composition_bit_for_bit,
        long_row_kernels_match_the_same_composition_at_short_lengths,
        sums_are_exact_on_small_integers_whatever_the_length,
    ],
    row in "row.rs": [
        sums_are_exact_on_integers,
        large_mean_is_exact_in_f32,
        huge_magnitudes_do_not_overflow,
        constant_rows_normalize_to_exactly_zero,
        powers_of_two_from_bits,
        a_nan_row_stays_nan,
    ],
    simd in "simd.rs": [
        bf16_backward_converted_in_registers_matches_the_scratch_path_bit_for_bit,
        f16_backward_converted_in_registers_matches_the_scratch_path_bit_for_bit,
        bf16_rows_converted_in_registers_match_the_scratch_path_bit_for_bit,
        f16_rows_converted_in_registers_match_the_scratch_path_bit_for_bit,
    ],
    stage in "stage.rs": [
        sixteen_bit_sums_are_the_exact_sums_rounded_once,
        finish_adds_dh_in_one_rounding_and_keeps_exact_zeros_of_infinite_scales,
    ],
}

/// The `pub fn name()`s of a module's test module (the part of its source after the hidden
/// `pub mod tests`).
fn tests_in(source: &str) -> BTreeSet<String> {
    let header = "#[cfg(feature = \"unit-tests\")]\n#[doc(hidden)]\npub mod tests {";
    let Some(start) = source.find(header) else { return BTreeSet::new() };
    source[start..]
        .split("pub fn ")
        .skip(1)
        .filter_map(|rest| {
            let name = rest.split('(').next()?;
            rest[name.len()..].starts_with("()").then(|| name.to_string())
        })
        .collect()
}

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_unit_test_is_listed() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut found = BTreeMap::new();
    for path in files {
        let source = std::fs::read_to_string(&path).unwrap();
        // The library is never compiled as a test harness: a `#[test]` there never runs.
        assert!(
            !source.contains("#[test]"),
            "{}: a `#[test]` in the library never runs; a unit test is a `pub fn name()` in \
             the module's `tests`, listed in tests/unit.rs",
            path.display()
        );
        let tests = tests_in(&source);
        if !tests.is_empty() {
            let rel = path.strip_prefix(&src).unwrap().to_string_lossy().replace('\\', "/");
            found.insert(rel, tests);
        }
    }
    let listed: BTreeMap<String, BTreeSet<String>> = LISTED
        .iter()
        .map(|(file, tests)| (file.to_string(), tests.iter().map(|t| t.to_string()).collect()))
        .collect();
    assert_eq!(found, listed, "the unit tests in src/ (left) against those listed here (right)");
}
