//! The cross-backend conformance suite of layernorm, as a library.
//!
//! - **Cases are data**: `cases.toml` ([`mod@cases`]), compiled in.
//! - **One generic runner** ([`run_backend`]) applies every case, in every dtype the backend
//!   supports, forward and backward, to any `dyn HostNormalize`, against the f64 reference.
//! - **One comparison rule and one tolerance table** ([`metric`]), documented in
//!   `docs/conformance.md`.
//! - **One registry**: the backends are `layernorm::REGISTRY`; adding a backend there adds it
//!   here. `cargo xtask conformance` and this crate's test both iterate it.
//!
//! Used by `cargo xtask conformance` (prints [`render_table`]) and by this crate's test, which
//! also snapshots [`render_report`] per backend.

pub mod cases;
pub mod metric;
mod runner;

pub use cases::{Case, Dist, Inputs, cases, parse_cases};
pub use runner::{
    Measure, Outcome, Pass, Status, render_report, render_table, run_backend, run_case,
    snapshot_name,
};

use layernorm::{BackendEntry, DType, Error, HostNormalize};

/// One backend's turn in the suite.
pub enum BackendRun {
    /// The backend could not be created here (not compiled in, no device, …).
    Unavailable {
        /// Backend name.
        name: &'static str,
        /// Why.
        error: Error,
    },
    /// The backend ran.
    Ran {
        /// Backend name.
        name: &'static str,
        /// Its device, in words.
        device: String,
        /// Every outcome.
        outcomes: Vec<Outcome>,
    },
}

/// Creates each registry entry and runs it on `cases` in every dtype.
pub fn run_entries(entries: &[BackendEntry], cases: &[Case]) -> Vec<BackendRun> {
    entries
        .iter()
        .map(|e| match e.create() {
            Err(error) => BackendRun::Unavailable { name: e.name, error },
            Ok(b) => {
                let b: &dyn HostNormalize = b.as_ref();
                let device = b.device().name;
                let outcomes = run_backend(b, cases, &DType::ALL);
                BackendRun::Ran { name: e.name, device, outcomes }
            }
        })
        .collect()
}
