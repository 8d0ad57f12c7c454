//! The one generic runner: any backend × dtype × case, forward then backward, against the reference.

use std::fmt::Write as _;

use layernorm::{BackwardArgs, DType, ForwardArgs, HostNormalize, HostVec, NormKind, reference};

use crate::cases::{Case, Inputs};
use crate::metric::{elementwise, ref_uncertainty, rowwise, tolerance};

/// Forward or backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pass {
    /// y, mean, rstd.
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
    /// Output name (`y`, `mean`, `rstd`, `dx`, `dgamma`, `dbeta`).
    pub output: &'static str,
    /// The error (see [`crate::metric`]).
    pub error: f64,
    /// The tolerance it is held to.
    pub tol: f64,
}

/// How one (backend, dtype, case, pass) went.
#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    /// Every output within tolerance.
    Pass,
    /// Some output out of tolerance.
    Fail,
    /// Not run, and why (unsupported dtype, forward failed).
    Skipped(String),
    /// The backend returned an error: (class, message).
    Errored(&'static str, String),
}

/// The result of one (backend, dtype, case, pass).
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// Backend name.
    pub backend: String,
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
        self.measures.iter().max_by(|a, b| (a.error / a.tol).total_cmp(&(b.error / b.tol)))
    }
}

fn verdict(measures: &[Measure]) -> Status {
    if measures.iter().all(|m| m.error <= m.tol) { Status::Pass } else { Status::Fail }
}

/// Runs every case in every dtype (that the case applies to) on one backend.
pub fn run_backend(backend: &dyn HostNormalize, cases: &[Case], dtypes: &[DType]) -> Vec<Outcome> {
    let mut out = Vec::new();
    for &dtype in dtypes {
        for case in cases.iter().filter(|c| c.applies_to(dtype)) {
            out.extend(run_case(backend, case, dtype));
        }
    }
    out
}

/// Runs one case in one dtype: the forward, then the backward from the backend's own statistics.
pub fn run_case(backend: &dyn HostNormalize, case: &Case, dtype: DType) -> [Outcome; 2] {
    let outcome = |pass, status, measures| Outcome {
        backend: backend.name().to_string(),
        dtype,
        case: case.name.clone(),
        pass,
        status,
        measures,
    };
    if let Err(e) = backend.supports(NormKind::LayerNorm, dtype) {
        let why = format!("unsupported: {e}");
        return [
            outcome(Pass::Forward, Status::Skipped(why.clone()), vec![]),
            outcome(Pass::Backward, Status::Skipped(why), vec![]),
        ];
    }
    let inp = case.inputs(dtype);
    let fwd = match forward(backend, &inp) {
        Ok(v) => v,
        Err(e) => {
            return [
                outcome(Pass::Forward, Status::Errored(e.class(), e.to_string()), vec![]),
                outcome(Pass::Backward, Status::Skipped("forward failed".into()), vec![]),
            ];
        }
    };
    let ctx = Reference::new(&inp);
    let tol = tolerance(dtype);
    let n = case.n;
    let mut f_measures = vec![Measure {
        output: "y",
        error: rowwise(
            dtype,
            &fwd.y.to_f64_vec(),
            &ctx.fwd.y,
            n,
            |r| ctx.y_scale[r],
            |r| ctx.y_allow[r],
        ),
        tol: tol.y,
    }];
    if let (Some(got), Some(want)) = (&fwd.mean, &ctx.fwd.mean) {
        f_measures.push(Measure {
            output: "mean",
            error: elementwise(
                dtype.acc(),
                &got.to_f64_vec(),
                want,
                |r| want[r].abs().max(1.0 / ctx.fwd.rstd[r]),
                |_| 0.0,
            ),
            tol: tol.stats,
        });
    }
    f_measures.push(Measure {
        output: "rstd",
        error: elementwise(
            dtype.acc(),
            &fwd.rstd.to_f64_vec(),
            &ctx.fwd.rstd,
            |r| ctx.fwd.rstd[r],
            |_| 0.0,
        ),
        tol: tol.stats,
    });
    let f = outcome(Pass::Forward, verdict(&f_measures), f_measures);

    let b = match backward(backend, &inp, &fwd) {
        Err(e) => outcome(Pass::Backward, Status::Errored(e.class(), e.to_string()), vec![]),
        Ok(g) => {
            let mut m = vec![Measure {
                output: "dx",
                error: rowwise(
                    dtype,
                    &g.dx.to_f64_vec(),
                    &ctx.bwd.dx,
                    n,
                    |r| ctx.dx_scale[r],
                    |r| ctx.dx_allow[r],
                ),
                tol: tol.dx,
            }];
            if let (Some(got), Some(want)) = (&g.dgamma, &ctx.bwd.dgamma) {
                m.push(Measure {
                    output: "dgamma",
                    error: elementwise(
                        dtype,
                        &got.to_f64_vec(),
                        want,
                        |j| ctx.dgamma_scale[j],
                        |j| ctx.dgamma_allow[j],
                    ),
                    tol: tol.dparam,
                });
            }
            if let (Some(got), Some(want)) = (&g.dbeta, &ctx.bwd.dbeta) {
                m.push(Measure {
                    output: "dbeta",
                    error: elementwise(
                        dtype,
                        &got.to_f64_vec(),
                        want,
                        |j| ctx.dbeta_scale[j],
                        |_| 0.0,
                    ),
                    tol: tol.dparam,
                });
            }
            outcome(Pass::Backward, verdict(&m), m)
        }
    };
    [f, b]
}

struct Fwd {
    y: HostVec,
    mean: Option<HostVec>,
    rstd: HostVec,
}

struct Bwd {
    dx: HostVec,
    dgamma: Option<HostVec>,
    dbeta: Option<HostVec>,
}

/// `len` NaNs of `dtype`.
fn poisoned(dtype: DType, len: usize) -> HostVec {
    HostVec::from_f64(dtype, &vec![f64::NAN; len])
}

fn forward(backend: &dyn HostNormalize, inp: &Inputs) -> layernorm::Result<Fwd> {
    let spec = &inp.spec;
    // Outputs start as NaN: one the backend leaves unwritten fails its measure.
    let mut o = Fwd {
        y: poisoned(spec.dtype, spec.numel()),
        mean: spec.has_mean().then(|| poisoned(spec.stats_dtype(), spec.rows)),
        rstd: poisoned(spec.stats_dtype(), spec.rows),
    };
    backend.forward_host(
        spec,
        ForwardArgs::new(
            inp.x.as_slice(),
            inp.gamma.as_ref().map(HostVec::as_slice),
            inp.beta.as_ref().map(HostVec::as_slice),
            o.y.as_mut_slice(),
            o.mean.as_mut().map(HostVec::as_mut_slice),
            o.rstd.as_mut_slice(),
        ),
    )?;
    Ok(o)
}

fn backward(backend: &dyn HostNormalize, inp: &Inputs, f: &Fwd) -> layernorm::Result<Bwd> {
    let spec = &inp.spec;
    let mut o = Bwd {
        dx: poisoned(spec.dtype, spec.numel()),
        dgamma: spec.gamma.then(|| poisoned(spec.dtype, spec.n)),
        dbeta: spec.beta.then(|| poisoned(spec.dtype, spec.n)),
    };
    backend.backward_host(
        spec,
        BackwardArgs::new(
            inp.x.as_slice(),
            inp.dy.as_slice(),
            f.mean.as_ref().map(HostVec::as_slice),
            f.rstd.as_slice(),
            inp.gamma.as_ref().map(HostVec::as_slice),
            o.dx.as_mut_slice(),
            o.dgamma.as_mut().map(HostVec::as_mut_slice),
            o.dbeta.as_mut().map(HostVec::as_mut_slice),
        ),
    )?;
    Ok(o)
}

/// The reference outputs of one input set, and the scales of the comparison rule.
struct Reference {
    fwd: reference::RefForward,
    bwd: reference::RefBackward,
    y_scale: Vec<f64>,
    y_allow: Vec<f64>,
    dx_scale: Vec<f64>,
    dx_allow: Vec<f64>,
    dgamma_scale: Vec<f64>,
    dgamma_allow: Vec<f64>,
    dbeta_scale: Vec<f64>,
}

impl Reference {
    fn new(inp: &Inputs) -> Reference {
        let spec = &inp.spec;
        let (x, dy) = (inp.x64(), inp.dy.to_f64_vec());
        let gamma = inp.gamma.as_ref().map(HostVec::to_f64_vec);
        let beta = inp.beta.as_ref().map(HostVec::to_f64_vec);
        let (g, b) = (gamma.as_deref(), beta.as_deref());
        // The inputs come from a validated case, so the reference cannot reject them.
        let fwd = reference::forward(spec, &x, g, b).expect("reference forward");
        let bwd = reference::backward(spec, &x, &dy, fwd.mean.as_deref(), &fwd.rstd, g)
            .expect("reference backward");
        let n = spec.n;
        let mut y_scale = vec![0.0; spec.rows];
        let mut dx_scale = vec![0.0; spec.rows];
        let mut y_allow = vec![0.0; spec.rows];
        let mut dx_allow = vec![0.0; spec.rows];
        let mut dgamma_allow = vec![0.0; n];
        let mut dgamma_scale = vec![0.0; n];
        let mut dbeta_scale = vec![0.0; n];
        let mut xhat = vec![0.0; n];
        let mut gr = vec![0.0; n];
        for r in 0..spec.rows {
            let (mu, rs) = (fwd.mean.as_ref().map_or(0.0, |m| m[r]), fwd.rstd[r]);
            let (mut c1, mut c2) = (0.0, 0.0);
            for j in 0..n {
                xhat[j] = (x[r * n + j] - mu) * rs;
                gr[j] = dy[r * n + j] * g.map_or(1.0, |g| g[j]);
                c1 += gr[j] * xhat[j];
                c2 += gr[j];
            }
            c1 /= n as f64;
            c2 /= n as f64;
            // How far the reference's own x̂ may be off (see metric::ref_uncertainty), carried
            // into each output: y through γ, dx through c1 and the mean of |g|, dγ through dy.
            let delta = ref_uncertainty(mu, rs);
            let gmax = gr.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let gamma_max = g.map_or(1.0, |g| g.iter().fold(0.0f64, |m, v| m.max(v.abs())));
            y_allow[r] = gamma_max * delta;
            dx_allow[r] = 2.0 * rs * delta * (c1.abs() + gmax);
            for j in 0..n {
                dgamma_allow[j] += (dy[r * n + j] * delta).abs();
                let gj = g.map_or(1.0, |g| g[j]);
                let bj = b.map_or(0.0, |b| b[j]);
                y_scale[r] = f64::max(y_scale[r], (xhat[j] * gj).abs() + bj.abs());
                dx_scale[r] =
                    f64::max(dx_scale[r], rs * (gr[j].abs() + c2.abs() + (xhat[j] * c1).abs()));
                // x̂ itself is only as exact as its centering, ~u on the unit scale of x̂ (see
                // docs/conformance.md): |x̂| + 1, not |x̂|, is the size of the term dy·x̂.
                dgamma_scale[j] += dy[r * n + j].abs() * (xhat[j].abs() + 1.0);
                dbeta_scale[j] += dy[r * n + j].abs();
            }
        }
        Reference {
            fwd,
            bwd,
            y_scale,
            y_allow,
            dx_scale,
            dx_allow,
            dgamma_scale,
            dgamma_allow,
            dbeta_scale,
        }
    }
}

/// A human-readable table of outcomes: one line per (dtype, case, pass).
pub fn render_table(outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<8} {:<5} {:<24} {:<4} {:<7} {:>10} {:>10}  result",
        "backend", "dtype", "case", "pass", "worst", "error", "tolerance"
    );
    for o in outcomes {
        let (out, err, tol) = match o.worst() {
            Some(m) => (m.output, format!("{:.2e}", m.error), format!("{:.0e}", m.tol)),
            None => ("-", "-".into(), "-".into()),
        };
        let result = match &o.status {
            Status::Pass => "ok".to_string(),
            Status::Fail => "FAIL".to_string(),
            Status::Skipped(why) => format!("skipped ({why})"),
            Status::Errored(class, msg) => format!("ERROR [{class}] {msg}"),
        };
        let _ = writeln!(
            s,
            "{:<8} {:<5} {:<24} {:<4} {:<7} {:>10} {:>10}  {result}",
            o.backend,
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

/// The name a backend's report is snapshotted under: the backend's name, then the dtypes its
/// device supports none of (`wgpu-without-f16-f64`). One backend can run on devices of different
/// abilities — wgpu on lavapipe has `shader-f16`, on Mesa's OpenGL driver it has not — and each
/// kind of device is held to its own snapshot rather than failing against another's.
pub fn snapshot_name(backend: &str, outcomes: &[Outcome]) -> String {
    let unsupported =
        |o: &Outcome| matches!(&o.status, Status::Skipped(why) if why.starts_with("unsupported"));
    let mut name = backend.to_string();
    let mut dtypes: Vec<DType> = Vec::new();
    for o in outcomes {
        if !dtypes.contains(&o.dtype) {
            dtypes.push(o.dtype);
        }
    }
    let lacking: Vec<&str> = dtypes
        .into_iter()
        .filter(|&d| outcomes.iter().filter(|o| o.dtype == d).all(unsupported))
        .map(|d| d.name())
        .collect();
    if !lacking.is_empty() {
        name.push_str("-without-");
        name.push_str(&lacking.join("-"));
    }
    name
}

/// The deterministic report that is snapshotted per backend: verdicts and error classes, no
/// floats. One line per (dtype, case): `dtype case fwd=… bwd=…`.
pub fn render_report(outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    for pair in outcomes.chunks(2) {
        let word = |o: &Outcome| match &o.status {
            Status::Pass => "pass".to_string(),
            Status::Fail => {
                format!("FAIL({})", o.worst().map_or("-", |m| m.output))
            }
            Status::Skipped(why) if why.starts_with("unsupported") => "unsupported".into(),
            Status::Skipped(_) => "skipped".into(),
            Status::Errored(class, _) => format!("error({class})"),
        };
        let _ = write!(s, "{:<5} {:<24}", pair[0].dtype.name(), pair[0].case);
        for o in pair {
            let _ = write!(s, " {}={}", o.pass.name(), word(o));
        }
        s.push('\n');
    }
    s
}
