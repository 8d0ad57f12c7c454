//! The suite must be able to fail: a backend that is wrong in one output, by a little or by
//! leaving it unwritten, or that ignores a variant (the residual, the γ offset, dh), recovers x̂
//! wrongly from y, does not refuse a singular γ, or lets a poisoned row spread, gets `Fail` on
//! the measures that fault reaches and no other (but for what the backward computes from a
//! broken forward).
//!
//! The faults are injected by a wrapper around a working backend: the reference itself
//! ([`Oracle`], which computes every variant) and the CPU backend, for each case whose variant
//! the CPU computes (the rest are listed as not run). f32 only: the wrapper's nudges are f32.

use layernorm::{
    Backend, DType, DeviceInfo, HostBackward, HostForward, HostNormalize, HostSlice, HostSliceMut,
    NormKind, NormSpec, Residual, Result,
};
use layernorm_conformance::{
    BackwardFrom, Case, Oracle, Outcome, Pass, PoisonTensor, ResidualMode, Status, cases, run_case,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    /// y off by a relative 1e-5 (ten times the f32 tolerance).
    YNudged,
    /// mean never written.
    MeanUnwritten,
    /// dx off by a relative 1e-5.
    DxNudged,
    /// dγ never written.
    DgammaUnwritten,
    /// Normalizes x, not x + residual, and writes x as h (in place: leaves the residual).
    IgnoresResidual,
    /// Scales by γ, not γ_offset + γ.
    IgnoresOffset,
    /// Leaves dh out of dx.
    IgnoresDh,
    /// Recovers x̂ = y / γ_e from y, forgetting β.
    ForgetsBetaFromY,
    /// Computes a backward from y through a singular γ instead of refusing it (writes zeros).
    NoRefusal,
    /// Refuses a singular γ, but only after writing its outputs.
    RefusesLate,
    /// Writes 0 where dx is NaN: a poisoned row comes out finite.
    ScrubsNan,
    /// A non-finite row of dx spreads into the next row's first element.
    SpreadsPoison,
}

struct Faulty {
    inner: Box<dyn HostNormalize>,
    fault: Fault,
}

fn f32s<'a>(s: &'a mut HostSliceMut<'_>) -> &'a mut [f32] {
    match s {
        HostSliceMut::F32(v) => v,
        other => panic!("this test runs f32 only, got {other:?}"),
    }
}

fn nudge(s: &mut HostSliceMut<'_>) {
    f32s(s).iter_mut().for_each(|e| *e *= 1.0 + 1e-5);
}

fn zero(s: &mut HostSliceMut<'_>) {
    f32s(s).fill(0.0);
}

fn zero_backward(a: &mut HostBackward<'_>) {
    zero(&mut a.dx);
    a.dgamma.iter_mut().chain(a.dbeta.iter_mut()).for_each(zero);
}

impl Backend for Faulty {
    fn name(&self) -> &str {
        "faulty"
    }
    fn supports(&self, kind: NormKind, dtype: DType) -> Result<()> {
        self.inner.supports(kind, dtype)
    }
    fn device(&self) -> DeviceInfo {
        self.inner.device()
    }
}

impl HostNormalize for Faulty {
    fn forward_host(&self, spec: &NormSpec, mut a: HostForward<'_>) -> Result<()> {
        let mut spec = spec.clone();
        if self.fault == Fault::IgnoresOffset {
            spec = spec.with_gamma_offset(0.0);
        }
        let residual = match self.fault {
            Fault::IgnoresResidual => a.residual.take(),
            _ => None,
        };
        let mut scratch = vec![0f32; spec.rows];
        let mut b = a.reborrow();
        if self.fault == Fault::MeanUnwritten {
            b.mean = b.mean.map(|_| HostSliceMut::F32(&mut scratch));
        }
        self.inner.forward_host(&spec, b)?;
        if let (Some(Residual::Add { h: HostSliceMut::F32(h), .. }), HostSlice::F32(x)) =
            (residual, a.x)
        {
            h.copy_from_slice(x);
        }
        if self.fault == Fault::YNudged {
            nudge(&mut a.y);
        }
        Ok(())
    }

    fn backward_host(&self, spec: &NormSpec, mut a: HostBackward<'_>) -> Result<()> {
        let mut spec = spec.clone();
        if self.fault == Fault::IgnoresOffset {
            spec = spec.with_gamma_offset(0.0);
        }
        if self.fault == Fault::NoRefusal && a.saved.is_output() {
            zero_backward(&mut a);
            return Ok(());
        }
        let mut scratch = vec![0f32; spec.n];
        let zeros = vec![0f32; spec.n];
        let mut b = a.reborrow();
        match self.fault {
            Fault::DgammaUnwritten => {
                b.dgamma = b.dgamma.map(|_| HostSliceMut::F32(&mut scratch));
            }
            Fault::IgnoresDh => b.dh = None,
            Fault::ForgetsBetaFromY if b.saved.is_output() => {
                b.beta = b.beta.map(|_| HostSlice::F32(&zeros));
            }
            _ => {}
        }
        let result = self.inner.backward_host(&spec, b);
        if self.fault == Fault::RefusesLate && result.is_err() {
            zero_backward(&mut a);
        }
        result?;
        let n = spec.n;
        match self.fault {
            Fault::DxNudged => nudge(&mut a.dx),
            Fault::ScrubsNan => {
                f32s(&mut a.dx).iter_mut().filter(|v| v.is_nan()).for_each(|v| *v = 0.0)
            }
            Fault::SpreadsPoison => {
                let dx = f32s(&mut a.dx);
                let bad: Vec<usize> = (0..spec.rows)
                    .filter(|&r| dx[r * n..(r + 1) * n].iter().any(|v| !v.is_finite()))
                    .collect();
                for r in bad.into_iter().filter(|&r| r + 1 < spec.rows) {
                    dx[(r + 1) * n] = f32::NAN;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The first built-in case that applies to f32 and satisfies `pred`.
fn case(what: &str, pred: impl Fn(&Case) -> bool) -> Case {
    cases()
        .into_iter()
        .find(|c| c.applies_to(DType::F32) && pred(c))
        .unwrap_or_else(|| panic!("no f32 case for {what} in cases.toml"))
}

fn plain(c: &Case) -> bool {
    c.residual == ResidualMode::None
        && c.backward_from == BackwardFrom::X
        && c.poison.is_none()
        && c.gamma_offset == 0.0
        && c.singular_column.is_none()
        && c.eps.is_none()
}

/// One fault, the case it is injected on, the kinds, and the measures it must fail (forward,
/// backward).
struct Row<'a> {
    fault: Fault,
    case: &'a Case,
    kinds: &'a [NormKind],
    fwd: &'a [&'static str],
    bwd: &'a [&'static str],
}

impl<'a> Row<'a> {
    fn new(
        fault: Fault,
        case: &'a Case,
        kinds: &'a [NormKind],
        fwd: &'a [&'static str],
        bwd: &'a [&'static str],
    ) -> Row<'a> {
        Row { fault, case, kinds, fwd, bwd }
    }
}

type MakeBackend = fn() -> Box<dyn HostNormalize>;

/// The measures out of tolerance in one outcome.
fn failing(o: &Outcome) -> Vec<&'static str> {
    o.measures.iter().filter(|m| m.error > m.tol || m.error.is_nan()).map(|m| m.output).collect()
}

#[test]
fn a_wrong_output_fails_its_measure_and_only_it() {
    let affine = case("an affine plain case", |c| {
        plain(c)
            && c.gamma
            && c.beta
            && c.rows > 1
            && c.n > 16
            && c.dist == layernorm_conformance::Dist::Normal
    });
    let residual = |mode| {
        case("a residual case", move |c| {
            c.residual == mode
                && c.backward_from == BackwardFrom::X
                && !c.dh
                && c.poison.is_none()
                && c.gamma_offset == 0.0
        })
    };
    let (added, in_place) = (residual(ResidualMode::Add), residual(ResidualMode::InPlace));
    let offset = case("a γ offset case", |c| {
        c.gamma_offset == 1.0
            && c.residual == ResidualMode::None
            && c.backward_from == BackwardFrom::X
            && c.singular_column.is_none()
            && c.beta
    });
    let dh = case("a dh case", |c| {
        c.dh && c.backward_from == BackwardFrom::X && c.poison.is_none() && c.gamma_offset == 0.0
    });
    let from_y = case("a from-y case with β", |c| {
        c.backward_from == BackwardFrom::Y
            && c.residual == ResidualMode::None
            && c.beta
            && c.gamma_offset == 0.0
            && c.poison.is_none()
            && c.singular_column.is_none()
    });
    let singular = case("a singular γ from y", |c| {
        c.singular_column.is_some()
            && c.backward_from == BackwardFrom::Y
            && c.residual == ResidualMode::None
    });
    let poisoned = case("a dy poison", |c| {
        c.poison == Some(PoisonTensor::Dy)
            && c.backward_from == BackwardFrom::X
            && c.residual == ResidualMode::None
    });
    let both = [NormKind::LayerNorm, NormKind::RmsNorm];
    // (fault, case, kinds, expected failing forward measures, backward measures). RMSNorm has
    // no mean: `mean` is dropped from its expectations.
    let table = [
        Row::new(Fault::None, &affine, &both, &[], &[]),
        Row::new(Fault::YNudged, &affine, &both, &["y"], &[]),
        // The backward runs from the backend's own (here NaN) means: dx and dγ follow.
        Row::new(Fault::MeanUnwritten, &affine, &both[..1], &["mean"], &["dx", "dgamma"]),
        Row::new(Fault::DxNudged, &affine, &both, &[], &["dx"]),
        Row::new(Fault::DgammaUnwritten, &affine, &both, &[], &["dgamma"]),
        // The backward then runs from the wrong h (x) with its statistics.
        Row::new(
            Fault::IgnoresResidual,
            &added,
            &both,
            &["h", "y", "mean", "rstd"],
            &["dx", "dgamma"],
        ),
        Row::new(
            Fault::IgnoresResidual,
            &in_place,
            &both,
            &["h", "y", "mean", "rstd"],
            &["dx", "dgamma"],
        ),
        // dγ = Σ dy·x̂ does not involve γ; dx does, through g.
        Row::new(Fault::None, &offset, &both, &[], &[]),
        Row::new(Fault::IgnoresOffset, &offset, &both, &["y"], &["dx"]),
        Row::new(Fault::None, &dh, &both, &[], &[]),
        Row::new(Fault::IgnoresDh, &dh, &both, &[], &["dx"]),
        Row::new(Fault::None, &from_y, &both, &[], &[]),
        Row::new(Fault::ForgetsBetaFromY, &from_y, &both, &[], &["dx", "dgamma"]),
        Row::new(Fault::None, &singular, &both, &[], &[]),
        Row::new(Fault::NoRefusal, &singular, &both, &[], &["refused", "untouched"]),
        Row::new(Fault::RefusesLate, &singular, &both, &[], &["untouched"]),
        Row::new(Fault::None, &poisoned, &both, &[], &[]),
        Row::new(Fault::ScrubsNan, &poisoned, &both, &[], &["dx"]),
        Row::new(Fault::SpreadsPoison, &poisoned, &both, &[], &["dx", "contain"]),
    ];
    let bases: [(&str, MakeBackend); 2] = [
        ("oracle", || Box::new(Oracle)),
        ("cpu", || layernorm::backend("cpu").expect("the cpu backend")),
    ];
    let mut checked = 0;
    for (base, make) in bases {
        for &Row { fault, case, kinds, fwd: fwd_want, bwd: bwd_want } in &table {
            for &kind in kinds {
                // A variant the base does not compute yet cannot be broken: listed, not run.
                let [f0, b0] =
                    run_case(&Faulty { inner: make(), fault: Fault::None }, case, kind, DType::F32);
                let unsupported = |o: &Outcome| matches!(o.status, Status::Unsupported(..));
                if unsupported(&f0) || unsupported(&b0) {
                    println!("{base}: {} {kind} not run: the base does not compute it", case.name);
                    continue;
                }
                let [f, bw] = run_case(&Faulty { inner: make(), fault }, case, kind, DType::F32);
                assert_eq!((f.pass, bw.pass), (Pass::Forward, Pass::Backward));
                let drop_mean = |w: &[&'static str]| -> Vec<&'static str> {
                    w.iter().copied().filter(|&m| kind.has_mean() || m != "mean").collect()
                };
                let want = (drop_mean(fwd_want), drop_mean(bwd_want));
                let what = format!("{base}: {fault:?} on {} ({kind})", case.name);
                assert_eq!((failing(&f), failing(&bw)), want, "{what}:\n{f:?}\n{bw:?}");
                let status = |failed: &[&str], pass: Status| {
                    if failed.is_empty() { pass } else { Status::Fail }
                };
                let bwd_pass =
                    match case.singular_column.is_some() && case.backward_from == BackwardFrom::Y {
                        true => Status::Refused("singular-gamma"),
                        false => Status::Pass,
                    };
                assert_eq!(f.status, status(&want.0, Status::Pass), "{what}");
                assert_eq!(bw.status, status(&want.1, bwd_pass), "{what}");
                checked += 1;
            }
        }
    }
    // The reference computes every variant, so at least its whole table ran.
    let oracle_rows: usize = table.iter().map(|t| t.kinds.len()).sum();
    assert!(checked >= oracle_rows, "{checked} < {oracle_rows}");
}
