//! The one generic runner: any backend × kind × dtype × case, forward then backward, against the
//! reference. It knows no backend by name: everything goes through `dyn HostNormalize`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use layernorm::{
    BackwardArgs, DType, Error, ForwardArgs, HostNormalize, HostVec, NormKind, Residual, reference,
};

use crate::cases::{BackwardFrom, Case, Inputs, PoisonTensor, ResidualMode};
use crate::metric::{
    dx_allowance_from_y, elementwise, exact, ref_uncertainty, rows_differing, stored_rstd_excess,
    tolerance, xhat_from_y_bound,
};

/// Forward or backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pass {
    /// y, mean, rstd (and h).
    Forward,
    /// dx, dγ, dβ.
    Backward,
}

impl Pass {
    /// `fwd` / `bwd`.
    pub fn name(self) -> &'static str {
        match self {
            Pass::Forward => "fwd",
            Pass::Backward => "bwd",
        }
    }
}

/// One measured output.
#[derive(Clone, Debug, PartialEq)]
pub struct Measure {
    /// Output name (`h`, `y`, `mean`, `rstd`, `dx`, `dgamma`, `dbeta`), or a check: `contain`
    /// (rows a poison must not reach, differing elements), `refused` (a typed refusal the
    /// reference also gives), `untouched` (outputs written despite a refusal).
    pub output: &'static str,
    /// The error (see [`crate::metric`]).
    pub error: f64,
    /// The tolerance it is held to.
    pub tol: f64,
}

/// How one (backend, kind, dtype, case, pass) went.
#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    /// Every output within tolerance.
    Pass,
    /// The backend refused with the typed error the reference gives too (class), and wrote no
    /// output: the right answer.
    Refused(&'static str),
    /// Some output out of tolerance, or a refusal missing or wrong.
    Fail,
    /// The backend does not compute this (class `unsupported`, `unsupported-kind` or
    /// `unsupported-feature`, and its message): reported, not a failure.
    Unsupported(&'static str, String),
    /// Not run, and why (the forward failed).
    Skipped(String),
    /// The backend returned an error: (class, message).
    Errored(&'static str, String),
}

/// The result of one (backend, kind, dtype, case, pass).
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// Backend name.
    pub backend: String,
    /// Kind.
    pub kind: NormKind,
    /// Dtype.
    pub dtype: DType,
    /// Case name.
    pub case: String,
    /// Forward or backward.
    pub pass: Pass,
    /// The verdict.
    pub status: Status,
    /// What was measured (empty unless the backend produced outputs).
    pub measures: Vec<Measure>,
}

impl Outcome {
    /// Whether this outcome makes the suite fail.
    pub fn failed(&self) -> bool {
        matches!(self.status, Status::Fail | Status::Errored(..))
    }

    /// The worst measure relative to its tolerance.
    pub fn worst(&self) -> Option<&Measure> {
        let ratio = |m: &Measure| {
            if m.error <= m.tol { m.error / m.tol.max(f64::MIN_POSITIVE) } else { f64::INFINITY }
        };
        self.measures.iter().max_by(|a, b| {
            ratio(a).total_cmp(&ratio(b)).then((a.error - a.tol).total_cmp(&(b.error - b.tol)))
        })
    }

    /// The word the report gives this outcome.
    pub fn word(&self) -> String {
        match &self.status {
            Status::Pass => "pass".into(),
            Status::Refused(class) => format!("refused({class})"),
            Status::Fail => format!("FAIL({})", self.worst().map_or("-", |m| m.output)),
            Status::Unsupported(..) => "unsupported".into(),
            Status::Skipped(_) => "skipped".into(),
            Status::Errored(class, _) => format!("error({class})"),
        }
    }
}

fn verdict(measures: &[Measure]) -> Status {
    if measures.iter().all(|m| m.error <= m.tol) { Status::Pass } else { Status::Fail }
}

/// Whether an error says "this backend does not compute that", rather than a failure.
fn unsupported(e: &Error) -> bool {
    matches!(e.class(), "unsupported" | "unsupported-kind" | "unsupported-feature")
}

fn status_of(e: &Error) -> Status {
    if unsupported(e) {
        Status::Unsupported(e.class(), e.to_string())
    } else {
        Status::Errored(e.class(), e.to_string())
    }
}

/// Runs every case for each of `kinds` in each of `dtypes` on `backend` (see [`run_backends`]).
pub fn run_backend(
    backend: &dyn HostNormalize,
    cases: &[Case],
    kinds: &[NormKind],
    dtypes: &[DType],
) -> Vec<Outcome> {
    run_backends(&[backend], cases, kinds, dtypes).remove(0)
}

/// Runs every case for each of `kinds` in each of `dtypes` on every backend of `backends`: the
/// outcomes of each backend, in case order. Each case's inputs and reference are made once, by the
/// calling thread, and judged by every backend, each backend on a thread of its own going
/// through the cases at its own pace: a device backend's time is mostly its driver's (a software
/// device runs a row of 2^24 elements on one core for seconds), and meanwhile the other backends
/// and the references of the next cases go on, up to 2^25 elements made and not yet judged
/// by every backend.
pub fn run_backends(
    backends: &[&dyn HostNormalize],
    cases: &[Case],
    kinds: &[NormKind],
    dtypes: &[DType],
) -> Vec<Vec<Outcome>> {
    let order: Vec<(NormKind, DType, &Case)> = kinds
        .iter()
        .flat_map(|&k| dtypes.iter().map(move |&d| (k, d)))
        .flat_map(|(k, d)| {
            let applies = move |c: &&Case| c.applies_to(d) && c.applies_to_kind(k);
            cases.iter().filter(applies).map(move |c| (k, d, c))
        })
        .collect();
    let budget = Budget::default();
    std::thread::scope(|s| {
        let budget = &budget;
        let (senders, workers): (Vec<_>, Vec<_>) = backends
            .iter()
            .map(|&b| {
                let (tx, rx) = std::sync::mpsc::channel::<std::sync::Arc<Held<'_, '_>>>();
                let worker = s.spawn(move || {
                    let mut outcomes = Vec::new();
                    for held in rx {
                        outcomes.extend(held.fixture.judge(b));
                    }
                    outcomes
                });
                (tx, worker)
            })
            .unzip();
        for &(kind, dtype, case) in &order {
            let fixture = Fixture::new(case, kind, dtype);
            // Made here only where some backend will judge it (else never).
            let used = backends.iter().any(|b| b.supports(kind, dtype).is_ok());
            let size = if used { fixture.elements() } else { 0 };
            budget.take(size);
            if used {
                fixture.made();
            }
            let held = std::sync::Arc::new(Held { fixture, size, budget });
            for tx in &senders {
                // A backend that panicked has stopped taking cases: its panic is raised below.
                let _ = tx.send(held.clone());
            }
        }
        drop(senders);
        workers.into_iter().map(|w| w.join().expect("a backend panicked")).collect()
    })
}

/// The elements of inputs and references [`run_backends`] holds made and not yet judged by
/// every backend: two rows of 2^24 (a larger case is made alone).
const AHEAD: usize = 1 << 25;

/// The elements [`run_backends`] holds.
#[derive(Default)]
struct Budget {
    held: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

impl Budget {
    /// Waits until `n` more elements fit in [`AHEAD`] (or nothing is held), and takes them.
    fn take(&self, n: usize) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while *held > 0 && *held + n > AHEAD {
            held = self.freed.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        *held += n;
    }
}

/// A fixture shared by the backends' threads; the last to drop it gives its elements back.
struct Held<'c, 'b> {
    fixture: Fixture<'c>,
    size: usize,
    budget: &'b Budget,
}

impl Drop for Held<'_, '_> {
    fn drop(&mut self) {
        let mut held = self.budget.held.lock().unwrap_or_else(|e| e.into_inner());
        *held -= self.size;
        self.budget.freed.notify_all();
    }
}

/// Runs one case for one kind in one dtype: the forward, then the backward from the backend's
/// own outputs (x or h with its statistics, or y). Where the backend does not compute the
/// forward variant, the backward runs from the reference's outputs rounded to their dtypes, so
/// each pass is judged on its own. A poisoned case runs a second time without its poison, and
/// the rows the poison must not reach are compared bit for bit.
pub fn run_case(
    backend: &dyn HostNormalize,
    case: &Case,
    kind: NormKind,
    dtype: DType,
) -> [Outcome; 2] {
    Fixture::new(case, kind, dtype).judge(backend)
}

/// One case in one kind and dtype, made once for every backend that runs it: the inputs and the
/// reference, and for a poisoned case the same without its poison. Made lazily, so that a case no
/// backend supports costs nothing.
struct Fixture<'c> {
    case: &'c Case,
    kind: NormKind,
    dtype: DType,
    made: std::sync::OnceLock<Made>,
}

struct Made {
    inp: Inputs,
    rf: Reference,
    clean: Option<(Case, Inputs, Reference)>,
}

impl<'c> Fixture<'c> {
    fn new(case: &'c Case, kind: NormKind, dtype: DType) -> Self {
        Fixture { case, kind, dtype, made: std::sync::OnceLock::new() }
    }

    /// The elements its inputs and reference hold, in rows × n (twice for a poisoned case,
    /// which is made again without its poison).
    fn elements(&self) -> usize {
        let one = self.case.rows.saturating_mul(self.case.n);
        if self.case.poison.is_some() { one.saturating_mul(2) } else { one }
    }

    fn made(&self) -> &Made {
        self.made.get_or_init(|| {
            let (case, kind, dtype) = (self.case, self.kind, self.dtype);
            let inp = case.inputs(kind, dtype);
            let rf = Reference::new(case, &inp);
            let clean = case.poison.is_some().then(|| {
                let c = case.without_poison();
                let i = c.inputs(kind, dtype);
                let r = Reference::new(&c, &i);
                (c, i, r)
            });
            Made { inp, rf, clean }
        })
    }

    fn judge(&self, backend: &dyn HostNormalize) -> [Outcome; 2] {
        let (case, kind, dtype) = (self.case, self.kind, self.dtype);
        let outcome = |pass, status, measures| Outcome {
            backend: backend.name().to_string(),
            kind,
            dtype,
            case: case.name.clone(),
            pass,
            status,
            measures,
        };
        if let Err(e) = backend.supports(kind, dtype) {
            return [
                outcome(Pass::Forward, status_of(&e), vec![]),
                outcome(Pass::Backward, status_of(&e), vec![]),
            ];
        }
        let Made { inp, rf, clean } = self.made();
        let run = Run::go(backend, case, inp, rf);
        let clean = clean.as_ref().map(|(c, i, r)| Run::go(backend, c, i, r));
        let clean = clean.as_ref();
        let f = match &run.fwd {
            Err(e) => outcome(Pass::Forward, status_of(e), vec![]),
            Ok(fwd) => {
                let c = clean.and_then(|c| c.fwd.as_ref().ok());
                let m = forward_measures(case, dtype, fwd, rf, c);
                outcome(Pass::Forward, verdict(&m), m)
            }
        };
        let b = match (&run.bwd, &rf.bwd) {
            (None, _) => outcome(Pass::Backward, Status::Skipped("forward failed".into()), vec![]),
            (Some(Err(e)), _) if unsupported(e) => outcome(Pass::Backward, status_of(e), vec![]),
            (Some(got), Err(want)) => {
                // The reference refuses (a singular γ): so must the backend, before writing.
                let refused = matches!(got, Err(e) if e.class() == want.class());
                let check = |output, ok: bool| Measure {
                    output,
                    error: if ok { 0.0 } else { f64::INFINITY },
                    tol: 0.0,
                };
                let m = vec![check("refused", refused), check("untouched", run.bwd_untouched)];
                let status = match refused && run.bwd_untouched {
                    true => Status::Refused(want.class()),
                    false => Status::Fail,
                };
                outcome(Pass::Backward, status, m)
            }
            (Some(Err(e)), Ok(_)) => outcome(Pass::Backward, status_of(e), vec![]),
            (Some(Ok(got)), Ok(want)) => {
                let clean = clean.and_then(|c| c.bwd.as_ref()).and_then(|b| b.as_ref().ok());
                let m = backward_measures(case, dtype, got, want, rf, clean);
                outcome(Pass::Backward, verdict(&m), m)
            }
        };
        [f, b]
    }
}

/// The forward's measures: h (exact), y, mean, rstd, and the containment of a poison (`clean`:
/// the same case without it).
fn forward_measures(
    case: &Case,
    dtype: DType,
    fwd: &Fwd,
    rf: &Reference,
    clean: Option<&Fwd>,
) -> Vec<Measure> {
    let (tol, acc) = (tolerance(dtype), dtype.acc());
    let mut m = Vec::new();
    if let (Some(got), Some(want)) = (&fwd.h, &rf.h) {
        m.push(Measure { output: "h", error: exact(&got.to_f64_vec(), want), tol: 0.0 });
    }
    let y = compare(dtype, &fwd.y, &rf.fwd.y, |i| rf.y_scale[i / rf.n], |i| rf.y_allow[i / rf.n]);
    m.push(Measure { output: "y", error: y, tol: tol.y });
    if let (Some(got), Some(want)) = (&fwd.mean, &rf.fwd.mean) {
        let scale = |r: usize| want[r].abs().max(1.0 / rf.fwd.rstd[r]);
        let error = elementwise(acc, &got.to_f64_vec(), want, scale, |_| 0.0);
        m.push(Measure { output: "mean", error, tol: tol.stats });
    }
    let want = &rf.fwd.rstd;
    let error = elementwise(acc, &fwd.rstd.to_f64_vec(), want, |r| want[r], |r| rf.rstd_allow[r]);
    m.push(Measure { output: "rstd", error, tol: tol.stats });
    if let Some(clean) = clean {
        let (skip, n) = (case.poison_row(), case.n);
        let mut differ = rows_differing(fwd.y.bytes(), clean.y.bytes(), n, dtype.size(), skip);
        if let (Some(a), Some(b)) = (&fwd.h, &clean.h) {
            differ += rows_differing(a.bytes(), b.bytes(), n, dtype.size(), skip);
        }
        if let (Some(a), Some(b)) = (&fwd.mean, &clean.mean) {
            differ += rows_differing(a.bytes(), b.bytes(), 1, acc.size(), skip);
        }
        differ += rows_differing(fwd.rstd.bytes(), clean.rstd.bytes(), 1, acc.size(), skip);
        m.push(Measure { output: "contain", error: differ, tol: 0.0 });
    }
    m
}

/// The backward's measures: dx (with the allowance of a backward from y), dγ, dβ, and the
/// containment of a poison.
fn backward_measures(
    case: &Case,
    dtype: DType,
    got: &Bwd,
    want: &reference::RefBackward,
    rf: &Reference,
    clean: Option<&Bwd>,
) -> Vec<Measure> {
    let tol = tolerance(dtype);
    let dx = compare(dtype, &got.dx, &want.dx, |i| rf.dx_scale[i / rf.n], |i| rf.dx_allow(i));
    let mut m = vec![Measure { output: "dx", error: dx, tol: tol.dx }];
    if let (Some(g), Some(w)) = (&got.dgamma, &want.dgamma) {
        let scale = |j: usize| rf.dgamma_scale[j];
        let error = elementwise(dtype, &g.to_f64_vec(), w, scale, |j| rf.dgamma_allow[j]);
        m.push(Measure { output: "dgamma", error, tol: tol.dparam });
    }
    if let (Some(g), Some(w)) = (&got.dbeta, &want.dbeta) {
        let error = elementwise(dtype, &g.to_f64_vec(), w, |j| rf.dbeta_scale[j], |_| 0.0);
        m.push(Measure { output: "dbeta", error, tol: tol.dparam });
    }
    if let Some(clean) = clean {
        let (skip, n) = (case.poison_row(), case.n);
        let error = rows_differing(got.dx.bytes(), clean.dx.bytes(), n, dtype.size(), skip);
        m.push(Measure { output: "contain", error, tol: 0.0 });
    }
    m
}

/// The reference's normalization dx as a backend can give it from the statistics it stored: in
/// a row whose rstd the statistics' dtype cannot hold (a constant row at ε < 2⁻²⁵⁶ for `f32`
/// statistics, rstd = 1/√ε), the backward is fed +inf, and every nonzero term of that row is
/// ±inf (a non-finite reference, which demands a non-finite result); zeros stay exact. Applied
/// before dh is added.
fn stored_rstd_overflow(spec: &layernorm::NormSpec, rstd: &[f64], dx: &mut [f64]) {
    let (stats, n) = (spec.stats_dtype(), spec.n);
    let over = |r: f64| r.is_finite() && stats.round(r).is_infinite();
    for (row, _) in rstd.iter().enumerate().filter(|&(_, &r)| over(r)) {
        for v in dx.iter_mut().skip(row * n).take(n).filter(|v| **v != 0.0) {
            *v = f64::INFINITY.copysign(*v);
        }
    }
}

/// [`elementwise`] of a backend's output against the reference, widened a block at a time
/// rather than copied whole (rows of 2^24 elements are in the suite).
fn compare(
    dtype: DType,
    got: &HostVec,
    want: &[f64],
    scale: impl Fn(usize) -> f64,
    allow: impl Fn(usize) -> f64,
) -> f64 {
    const BLOCK: usize = 1 << 14;
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    // A dtype added later is widened whole, once.
    let whole = match got {
        HostVec::F16(_) | HostVec::BF16(_) | HostVec::F32(_) | HostVec::F64(_) => Vec::new(),
        other => other.to_f64_vec(),
    };
    let mut buf = Vec::with_capacity(BLOCK);
    let mut worst: f64 = 0.0;
    for start in (0..want.len()).step_by(BLOCK) {
        let end = (start + BLOCK).min(want.len());
        buf.clear();
        match got {
            HostVec::F16(v) => buf.extend(v[start..end].iter().map(|&e| f64::from(e))),
            HostVec::BF16(v) => buf.extend(v[start..end].iter().map(|&e| f64::from(e))),
            HostVec::F32(v) => buf.extend(v[start..end].iter().map(|&e| f64::from(e))),
            HostVec::F64(v) => buf.extend_from_slice(&v[start..end]),
            _ => buf.extend_from_slice(&whole[start..end]),
        }
        let e =
            elementwise(dtype, &buf, &want[start..end], |i| scale(start + i), |i| allow(start + i));
        worst = worst.max(e);
    }
    worst
}

/// What a forward returned.
struct Fwd {
    y: HostVec,
    mean: Option<HostVec>,
    rstd: HostVec,
    /// h: the separate output, or the residual buffer after an in-place forward.
    h: Option<HostVec>,
}

/// What a backward returned.
struct Bwd {
    dx: HostVec,
    dgamma: Option<HostVec>,
    dbeta: Option<HostVec>,
}

/// One run of a case on a backend.
struct Run {
    fwd: layernorm::Result<Fwd>,
    /// `None` when the forward failed with an error other than "unsupported".
    bwd: Option<layernorm::Result<Bwd>>,
    /// Whether a refused backward left every output holding the NaN it was filled with.
    bwd_untouched: bool,
}

/// `len` NaNs of `dtype`: outputs start as these, so one the backend leaves unwritten fails
/// its measure.
fn poisoned(dtype: DType, len: usize) -> HostVec {
    match dtype {
        DType::F16 => HostVec::F16(vec![layernorm::f16::NAN; len]),
        DType::BF16 => HostVec::BF16(vec![layernorm::bf16::NAN; len]),
        DType::F32 => HostVec::F32(vec![f32::NAN; len]),
        _ => HostVec::F64(vec![f64::NAN; len]),
    }
}

/// Whether every element of `v` still holds the NaN [`poisoned`] filled it with.
fn untouched(v: &HostVec) -> bool {
    let nan = poisoned(v.dtype(), 1);
    v.bytes().chunks(nan.bytes().len()).all(|e| e == nan.bytes())
}

trait Bytes {
    fn bytes(&self) -> &[u8];
}

impl Bytes for HostVec {
    fn bytes(&self) -> &[u8] {
        self.as_slice().as_bytes()
    }
}

impl Run {
    fn go(backend: &dyn HostNormalize, case: &Case, inp: &Inputs, rf: &Reference) -> Run {
        let fwd = forward(backend, case, inp);
        let rounded;
        let fed = match &fwd {
            Ok(f) => f,
            Err(e) if unsupported(e) => {
                rounded = rf.rounded(inp);
                &rounded
            }
            Err(_) => return Run { fwd, bwd: None, bwd_untouched: true },
        };
        // A poisoned statistic reaches the backward through what the forward saved.
        let spoil = |s: &HostVec| {
            let mut v = s.to_f64_vec();
            v[case.poison_row()] = case.poison_value.value();
            HostVec::from_f64(s.dtype(), &v)
        };
        let mean = match (case.poison, &fed.mean) {
            (Some(PoisonTensor::Mean), Some(m)) => Some(spoil(m)),
            (_, m) => m.clone(),
        };
        let rstd = match case.poison {
            Some(PoisonTensor::Rstd) => spoil(&fed.rstd),
            _ => fed.rstd.clone(),
        };
        let saved = match (case.backward_from, &fed.h) {
            (BackwardFrom::Y, _) => &fed.y,
            (BackwardFrom::X, Some(h)) => h,
            (BackwardFrom::X, None) => &inp.x,
        };
        let (bwd, untouched) = backward(backend, case, inp, saved, mean.as_ref(), &rstd);
        Run { fwd, bwd: Some(bwd), bwd_untouched: untouched }
    }
}

fn forward(backend: &dyn HostNormalize, case: &Case, inp: &Inputs) -> layernorm::Result<Fwd> {
    let spec = &inp.spec;
    let mut y = poisoned(spec.dtype, spec.numel());
    let mut mean = spec.has_mean().then(|| poisoned(spec.stats_dtype(), spec.rows));
    let mut rstd = poisoned(spec.stats_dtype(), spec.rows);
    let mut h = match (case.residual, &inp.residual) {
        (ResidualMode::Add, _) => Some(poisoned(spec.dtype, spec.numel())),
        (ResidualMode::InPlace, Some(r)) => Some(r.clone()),
        _ => None,
    };
    let mut args = ForwardArgs::new(
        inp.x.as_slice(),
        inp.gamma.as_ref().map(HostVec::as_slice),
        inp.beta.as_ref().map(HostVec::as_slice),
        y.as_mut_slice(),
        mean.as_mut().map(HostVec::as_mut_slice),
        rstd.as_mut_slice(),
    );
    args.residual = match (case.residual, &inp.residual, h.as_mut()) {
        (ResidualMode::Add, Some(r), Some(h)) => {
            Some(Residual::Add { residual: r.as_slice(), h: h.as_mut_slice() })
        }
        (ResidualMode::InPlace, _, Some(h)) => Some(Residual::InPlace(h.as_mut_slice())),
        _ => None,
    };
    backend.forward_host(spec, args)?;
    Ok(Fwd { y, mean, rstd, h })
}

/// The backward from what the forward gave: `saved` (x, h or y) with the statistics; also says
/// whether a refusal left the outputs as they were filled.
fn backward(
    backend: &dyn HostNormalize,
    case: &Case,
    inp: &Inputs,
    saved: &HostVec,
    mean: Option<&HostVec>,
    rstd: &HostVec,
) -> (layernorm::Result<Bwd>, bool) {
    let spec = &inp.spec;
    let mut o = Bwd {
        dx: poisoned(spec.dtype, spec.numel()),
        dgamma: spec.gamma.then(|| poisoned(spec.dtype, spec.n)),
        dbeta: spec.beta.then(|| poisoned(spec.dtype, spec.n)),
    };
    let mut args = BackwardArgs::new(
        saved.as_slice(),
        inp.dy.as_slice(),
        mean.map(HostVec::as_slice),
        rstd.as_slice(),
        inp.gamma.as_ref().map(HostVec::as_slice),
        o.dx.as_mut_slice(),
        o.dgamma.as_mut().map(HostVec::as_mut_slice),
        o.dbeta.as_mut().map(HostVec::as_mut_slice),
    );
    if case.backward_from == BackwardFrom::Y {
        args = args.from_output(saved.as_slice(), inp.beta.as_ref().map(HostVec::as_slice));
    }
    if let Some(dh) = &inp.dh {
        args = args.with_dh(dh.as_slice());
    }
    match backend.backward_host(spec, args) {
        Ok(()) => (Ok(o), false),
        Err(e) => {
            let fresh = untouched(&o.dx)
                && o.dgamma.as_ref().is_none_or(untouched)
                && o.dbeta.as_ref().is_none_or(untouched);
            (Err(e), fresh)
        }
    }
}

/// The reference outputs of one input set, and the scales and allowances of the comparison.
struct Reference {
    /// h = round(x + residual), for a residual case.
    h: Option<Vec<f64>>,
    /// The forward of x (or h).
    fwd: reference::RefForward,
    /// The backward the case asks for (from x or y, plus dh), or the reference's refusal.
    bwd: layernorm::Result<reference::RefBackward>,
    y_scale: Vec<f64>,
    y_allow: Vec<f64>,
    /// Per row: the reference's own uncertainty carried into rstd.
    rstd_allow: Vec<f64>,
    dx_scale: Vec<f64>,
    /// The reference's own uncertainty in dx, per row.
    dx_allow_row: Vec<f64>,
    /// The from-y bound carried into dx, per element (backward from y only).
    dx_allow_elem: Option<Vec<f64>>,
    dgamma_scale: Vec<f64>,
    dgamma_allow: Vec<f64>,
    dbeta_scale: Vec<f64>,
    /// Row length (at least 1).
    n: usize,
}

/// `len` zeros written out rather than mapped from the zero page: a sum read before it is
/// written would fault every page twice (the second a copy-on-write of the shared zero page, with
/// a TLB shootdown on every core the process runs on), a large part of the suite's time on rows
/// of 2^24 elements.
fn written_zeros(len: usize) -> Vec<f64> {
    let mut v = Vec::new();
    v.resize(len, 0.0);
    v
}

impl Reference {
    fn new(case: &Case, inp: &Inputs) -> Reference {
        let spec = &inp.spec;
        let (x, dy) = (&inp.x64, &inp.dy64);
        let gamma = inp.gamma.as_ref().map(HostVec::to_f64_vec);
        let beta = inp.beta.as_ref().map(HostVec::to_f64_vec);
        let dh = inp.dh.as_ref().map(HostVec::to_f64_vec);
        let (g, b) = (gamma.as_deref(), beta.as_deref());
        // The inputs come from a validated case, so the reference cannot reject them; only the
        // backward from y refuses a singular γ, which is the answer the backend must give too.
        let (h, fwd) = match &inp.residual {
            Some(r) => {
                let (h, f) = reference::forward_residual(spec, x, &r.to_f64_vec(), g, b)
                    .expect("reference residual forward");
                (Some(h), f)
            }
            None => (None, reference::forward(spec, x, g, b).expect("reference forward")),
        };
        let xin = h.as_deref().unwrap_or(x);
        let (mut mean, mut rstd) = (fwd.mean.clone(), fwd.rstd.clone());
        let at = case.poison_row();
        match case.poison {
            Some(PoisonTensor::Mean) => {
                mean.iter_mut().for_each(|m| m[at] = case.poison_value.value())
            }
            Some(PoisonTensor::Rstd) => rstd[at] = case.poison_value.value(),
            _ => {}
        }
        let from_y = case.backward_from == BackwardFrom::Y;
        let bwd = if from_y {
            reference::backward_from_output(spec, &fwd.y, dy, &rstd, g, b)
        } else {
            reference::backward(spec, xin, dy, mean.as_deref(), &rstd, g)
        };
        let bwd = bwd.map(|mut r| {
            stored_rstd_overflow(spec, &fwd.rstd, &mut r.dx);
            r
        });
        let bwd = match &dh {
            Some(dh) => bwd.and_then(|r| reference::add_dh(r, dh)),
            None => bwd,
        };

        let (rows, n, dtype) = (spec.rows, spec.n, spec.dtype);
        let gamma_eff = |j: usize| g.map_or(1.0, |g| spec.gamma_offset + g[j]);
        let beta_at = |j: usize| b.map_or(0.0, |b| b[j]);
        let mut y_scale = vec![0.0; rows];
        let mut y_allow = vec![0.0; rows];
        let mut rstd_allow = vec![0.0; rows];
        let mut dx_scale = vec![0.0; rows];
        let mut dx_allow_row = vec![0.0; rows];
        let mut dx_allow_elem = from_y.then(|| vec![0.0; rows * n]);
        // Per-column sums over the rows, written out first (see `written_zeros`).
        let mut dgamma_allow = written_zeros(n);
        let mut dgamma_scale = written_zeros(n);
        let mut dbeta_scale = written_zeros(n);
        let gamma_max = (0..n).fold(0.0f64, |m, j| m.max(gamma_eff(j).abs()));
        let nf = n as f64;
        for r in 0..rows {
            // The scales come from the clean statistics: where a poison reaches an output, the
            // reference is not finite there and no scale is used. Two sweeps per row, x̂ and g
            // formed on the fly (a row can have 2^24 elements: no row-sized temporaries).
            let row = &xin[r * n..(r + 1) * n];
            let dyr = &dy[r * n..(r + 1) * n];
            let (mu, rs) = (fwd.mean.as_ref().map_or(0.0, |m| m[r]), fwd.rstd[r]);
            let xhat = |j: usize| (row[j] - mu) * rs;
            // From y: the bound on the recovered x̂ (metric::xhat_from_y_bound).
            let delta = |j: usize| match from_y {
                true => xhat_from_y_bound(dtype, xhat(j), beta_at(j), gamma_eff(j)),
                false => 0.0,
            };
            let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
            let (mut c1, mut c2, mut gmax, mut big_c) = (0.0, 0.0, 0.0f64, 0.0);
            for j in 0..n {
                let g = dyr[j] * gamma_eff(j);
                (lo, hi) = (lo.min(row[j]), hi.max(row[j]));
                c1 += g * xhat(j);
                c2 += g;
                gmax = gmax.max(g.abs());
                big_c += g.abs() * delta(j);
            }
            c1 /= nf;
            c2 = if spec.has_mean() { c2 / nf } else { 0.0 };
            big_c /= nf;
            // How far the reference's own x̂ may be off (see metric::ref_uncertainty), carried
            // into each output: y through γ_e, dx through c1 and the largest |g|, dγ through dy.
            let delta_ref = ref_uncertainty(mu, rs, hi - lo);
            y_allow[r] = gamma_max * delta_ref;
            // Centred values off by a common b add b² to the variance: rstd off by rstd·(b·rstd)²/2.
            rstd_allow[r] = rs * delta_ref * delta_ref;
            dx_allow_row[r] = 2.0 * rs * delta_ref * (c1.abs() + gmax);
            // The backward is fed the stored rstd, whose rounding can exceed the dtype's unit
            // roundoff (subnormal): dx is scaled by it, and from x each x̂ too (so x̂·c1 twice).
            let stored = stored_rstd_excess(spec.stats_dtype(), rs);
            let (dx_k, xhat_k) = if from_y { (1.0, 0.0) } else { (3.0, 1.0) };
            let mut dx_core = 0.0f64;
            for j in 0..n {
                let (dyj, xj, dj) = (dyr[j], xhat(j), delta(j));
                let g = dyj * gamma_eff(j);
                dgamma_allow[j] += (dyj * delta_ref).abs() + dyj.abs() * dj;
                if let Some(elem) = dx_allow_elem.as_mut() {
                    elem[r * n + j] = dx_allowance_from_y(rs, c1, big_c, xj, dj);
                }
                let dhj = dh.as_ref().map_or(0.0, |d| d[r * n + j].abs());
                y_scale[r] = f64::max(y_scale[r], (xj * gamma_eff(j)).abs() + beta_at(j).abs());
                let core = rs * (g.abs() + c2.abs() + (xj * c1).abs());
                dx_core = dx_core.max(core);
                dx_scale[r] = f64::max(dx_scale[r], core + dhj);
                dgamma_allow[j] += xhat_k * stored * (dyj * xj).abs();
                // x̂ itself is only as exact as its centering, ~u on the unit scale of x̂ (see
                // docs/conformance.md): |x̂| + 1, not |x̂|, is the size of the term dy·x̂.
                dgamma_scale[j] += dyj.abs() * (xj.abs() + 1.0);
                dbeta_scale[j] += dyj.abs();
            }
            dx_allow_row[r] += dx_k * stored * dx_core;
        }
        Reference {
            h,
            fwd,
            bwd,
            y_scale,
            y_allow,
            rstd_allow,
            dx_scale,
            dx_allow_row,
            dx_allow_elem,
            dgamma_scale,
            dgamma_allow,
            dbeta_scale,
            n: n.max(1),
        }
    }

    /// The allowance of dx element `i`.
    fn dx_allow(&self, i: usize) -> f64 {
        self.dx_allow_row[i / self.n] + self.dx_allow_elem.as_ref().map_or(0.0, |e| e[i])
    }

    /// The reference's forward outputs rounded to their storage dtypes: what the backward is
    /// fed where the backend does not compute the forward variant.
    fn rounded(&self, inp: &Inputs) -> Fwd {
        let spec = &inp.spec;
        Fwd {
            y: HostVec::from_f64(spec.dtype, &self.fwd.y),
            mean: self.fwd.mean.as_ref().map(|m| HostVec::from_f64(spec.stats_dtype(), m)),
            rstd: HostVec::from_f64(spec.stats_dtype(), &self.fwd.rstd),
            h: self.h.as_ref().map(|h| HostVec::from_f64(spec.dtype, h)),
        }
    }
}

/// A human-readable table of outcomes: one line per (kind, dtype, case, pass).
pub fn render_table(outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<8} {:<10} {:<5} {:<36} {:<4} {:<9} {:>10} {:>10}  result",
        "backend", "kind", "dtype", "case", "pass", "worst", "error", "tolerance"
    );
    for o in outcomes {
        let (out, err, tol) = match o.worst() {
            Some(m) => (m.output, format!("{:.2e}", m.error), format!("{:.0e}", m.tol)),
            None => ("-", "-".into(), "-".into()),
        };
        let result = match &o.status {
            Status::Pass => "ok".to_string(),
            Status::Refused(class) => format!("ok (refused: {class})"),
            Status::Fail => "FAIL".to_string(),
            Status::Unsupported(class, msg) => format!("unsupported [{class}] {msg}"),
            Status::Skipped(why) => format!("skipped ({why})"),
            Status::Errored(class, msg) => format!("ERROR [{class}] {msg}"),
        };
        let _ = writeln!(
            s,
            "{:<8} {:<10} {:<5} {:<36} {:<4} {:<9} {:>10} {:>10}  {result}",
            o.backend,
            o.kind.name(),
            o.dtype.name(),
            o.case,
            o.pass.name(),
            out,
            err,
            tol
        );
    }
    s
}

/// Counts of outcomes per kind: (kind, [pass, refused, fail, unsupported, skipped, error]).
pub fn summary_by_kind(outcomes: &[Outcome]) -> Vec<(NormKind, Summary)> {
    let mut by: BTreeMap<&'static str, (NormKind, Summary)> = BTreeMap::new();
    for o in outcomes {
        let e = by.entry(o.kind.name()).or_insert((o.kind, Summary::default()));
        match o.status {
            Status::Pass => e.1.pass += 1,
            Status::Refused(_) => e.1.refused += 1,
            Status::Fail => e.1.fail += 1,
            Status::Unsupported(..) => e.1.unsupported += 1,
            Status::Skipped(_) => e.1.skipped += 1,
            Status::Errored(..) => e.1.error += 1,
        }
    }
    NormKind::ALL.iter().filter_map(|k| by.remove(k.name())).collect()
}

/// How many outcomes of one kind ended each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Within tolerance.
    pub pass: usize,
    /// The right typed refusal.
    pub refused: usize,
    /// Out of tolerance.
    pub fail: usize,
    /// Not computed by the backend.
    pub unsupported: usize,
    /// Not run.
    pub skipped: usize,
    /// An unexpected error.
    pub error: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} pass, {} refused, {} FAIL, {} unsupported, {} skipped, {} error",
            self.pass, self.refused, self.fail, self.unsupported, self.skipped, self.error
        )
    }
}

/// The name a backend's report is snapshotted under: the backend's name, then the dtypes its
/// device supports none of (`wgpu-without-f16-f64`). One backend can run on devices of different
/// abilities — wgpu on lavapipe has `shader-f16`, on Mesa's OpenGL driver it has not — and each
/// kind of device is held to its own snapshot rather than failing against another's.
pub fn snapshot_name(backend: &str, outcomes: &[Outcome]) -> String {
    let lacks_dtype = |o: &Outcome| matches!(&o.status, Status::Unsupported("unsupported", _));
    let mut name = backend.to_string();
    let mut dtypes: Vec<DType> = Vec::new();
    for o in outcomes {
        if !dtypes.contains(&o.dtype) {
            dtypes.push(o.dtype);
        }
    }
    let lacking: Vec<&str> = dtypes
        .into_iter()
        .filter(|&d| outcomes.iter().filter(|o| o.dtype == d).all(lacks_dtype))
        .map(|d| d.name())
        .collect();
    if !lacking.is_empty() {
        name.push_str("-without-");
        name.push_str(&lacking.join("-"));
    }
    name
}

/// The deterministic report that is snapshotted per backend: verdicts and error classes, no
/// floats. One line per (kind, dtype, case): `kind dtype case fwd=… bwd=…`, then a summary per
/// kind.
pub fn render_report(outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    for pair in outcomes.chunks(2) {
        let _ = write!(
            s,
            "{:<10} {:<5} {:<36}",
            pair[0].kind.name(),
            pair[0].dtype.name(),
            pair[0].case
        );
        for o in pair {
            let _ = write!(s, " {}={}", o.pass.name(), o.word());
        }
        s.push('\n');
    }
    for (kind, sum) in summary_by_kind(outcomes) {
        let _ = writeln!(s, "summary {:<10} {sum}", kind.name());
    }
    s
}
