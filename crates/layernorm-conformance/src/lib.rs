//! The cross-backend conformance suite of layernorm, as a library.
//!
//! - **Cases are data**: `cases.toml` ([`mod@cases`]), compiled in.
//! - **One generic runner** ([`run_backends`]) applies every case, for both kinds (LayerNorm,
//!   RMSNorm) and in every dtype the backend supports, forward and backward — with the variants
//!   each case names: a γ offset, a fused residual (added or in place), the backward from x or
//!   from y, dh, a poisoned tensor — to any `dyn HostNormalize`, against the f64 reference,
//!   made once per case for all the backends it runs.
//! - **One comparison rule, one tolerance table, and allowances derived from the inputs**
//!   ([`metric`]), documented in `docs/conformance.md` and `docs/numerics.md`.
//! - **A backend made of the reference** ([`Oracle`]): the suite's own check that its
//!   tolerances accept a correctly rounded answer, and the base its fault-injection test breaks.
//! - **One registry**: the backends are `layernorm::REGISTRY`; adding a backend there adds it
//!   here. `cargo xtask conformance` and this crate's test both iterate it.
//!
//! Used by `cargo xtask conformance` (prints [`render_table`]) and by this crate's test, which
//! also snapshots [`render_report`] per backend.

pub mod cases;
pub mod metric;
mod oracle;
mod runner;

pub use cases::{
    BackwardFrom, Case, Dist, Inputs, PoisonTensor, PoisonValue, ResidualMode, cases, parse_cases,
};
pub use oracle::Oracle;
pub use runner::{
    Measure, Outcome, Pass, Status, Summary, render_report, render_table, run_backend,
    run_backends, run_case, snapshot_name, summary_by_kind,
};

use layernorm::{BackendEntry, DType, Error, HostNormalize, NormKind};

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

/// Creates each registry entry and runs the available ones on `cases` for every kind in every
/// dtype, together ([`run_backends`]: each case's inputs and reference made once).
pub fn run_entries(entries: &[BackendEntry], cases: &[Case]) -> Vec<BackendRun> {
    let created: Vec<_> = entries.iter().map(|e| (e.name, e.create())).collect();
    let ran: Vec<&dyn HostNormalize> =
        created.iter().filter_map(|(_, b)| b.as_ref().ok()).map(|b| b.as_ref()).collect();
    let mut outcomes = if ran.is_empty() {
        Vec::new()
    } else {
        run_backends(&ran, cases, &NormKind::ALL, &DType::ALL)
    }
    .into_iter();
    created
        .into_iter()
        .map(|(name, b)| match b {
            Err(error) => BackendRun::Unavailable { name, error },
            Ok(b) => BackendRun::Ran {
                name,
                device: b.device().name,
                outcomes: outcomes.next().expect("one list of outcomes per backend run"),
            },
        })
        .collect()
}
