//! The suite must be able to fail: a backend that is wrong in one output, by a little or by
//! leaving it unwritten, gets `Fail` on that output's measure and no other (but for what the
//! backward computes from a broken forward). The CPU backend, behind a wrapper that damages its
//! results on purpose.

use layernorm::{
    BackwardArgs, DType, DeviceInfo, ForwardArgs, HostBackward, HostForward, HostNormalize,
    HostSliceMut, NormKind, NormSpec, OutputCache, Result,
};
use layernorm_conformance::{Pass, Status, cases, run_case};
use std::sync::Arc;

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
}

struct Faulty {
    inner: Box<dyn HostNormalize>,
    fault: Fault,
}

fn nudge(s: &mut HostSliceMut<'_>) {
    match s {
        HostSliceMut::F32(v) => v.iter_mut().for_each(|e| *e *= 1.0 + 1e-5),
        other => panic!("this test runs f32 only, got {other:?}"),
    }
}

impl HostNormalize for Faulty {
    fn name(&self) -> &str {
        "faulty"
    }
    fn supports(&self, kind: NormKind, dtype: DType) -> Result<()> {
        self.inner.supports(kind, dtype)
    }
    fn device(&self) -> DeviceInfo {
        self.inner.device()
    }
    fn output_cache(&self) -> Option<Arc<OutputCache>> {
        None
    }
    fn forward_host(&self, spec: &NormSpec, mut a: HostForward<'_>) -> Result<()> {
        let mut scratch = vec![0f32; spec.rows];
        let mean = match self.fault {
            Fault::MeanUnwritten => HostSliceMut::F32(&mut scratch),
            _ => a.mean.reborrow(),
        };
        let (y, rstd) = (a.y.reborrow(), a.rstd.reborrow());
        let args = ForwardArgs::new(a.x, a.gamma, a.beta, y, mean, rstd);
        self.inner.forward_host(spec, args)?;
        if self.fault == Fault::YNudged {
            nudge(&mut a.y);
        }
        Ok(())
    }
    fn backward_host(&self, spec: &NormSpec, mut a: HostBackward<'_>) -> Result<()> {
        let mut scratch = vec![0f32; spec.n];
        let dgamma = match self.fault {
            Fault::DgammaUnwritten => Some(HostSliceMut::F32(&mut scratch)),
            _ => a.dgamma.as_mut().map(|d| d.reborrow()),
        };
        let (dx, dbeta) = (a.dx.reborrow(), a.dbeta.as_mut().map(|d| d.reborrow()));
        let args = BackwardArgs::new(a.x, a.dy, a.mean, a.rstd, a.gamma, dx, dgamma, dbeta);
        self.inner.backward_host(spec, args)?;
        if self.fault == Fault::DxNudged {
            nudge(&mut a.dx);
        }
        Ok(())
    }
}

#[test]
fn a_wrong_output_fails_its_measure_and_only_it() {
    let case = cases()
        .into_iter()
        .find(|c| c.applies_to(DType::F32) && c.gamma && c.beta && c.rows > 1 && c.n > 16)
        .expect("an affine f32 case");
    for fault in
        [Fault::None, Fault::YNudged, Fault::MeanUnwritten, Fault::DxNudged, Fault::DgammaUnwritten]
    {
        let b = Faulty { inner: layernorm::backend("cpu").unwrap(), fault };
        let [f, bw] = run_case(&b, &case, DType::F32);
        assert_eq!((f.pass, bw.pass), (Pass::Forward, Pass::Backward));
        let failing = |o: &layernorm_conformance::Outcome| {
            o.measures
                .iter()
                .filter(|m| m.error > m.tol || m.error.is_nan())
                .map(|m| m.output)
                .collect::<Vec<_>>()
        };
        let (ff, bf) = (failing(&f), failing(&bw));
        let want: (&[&str], &[&str]) = match fault {
            Fault::None => (&[], &[]),
            Fault::YNudged => (&["y"], &[]),
            // The backward runs from the backend's own (here NaN) means: dx and dγ follow.
            Fault::MeanUnwritten => (&["mean"], &["dx", "dgamma"]),
            Fault::DxNudged => (&[], &["dx"]),
            Fault::DgammaUnwritten => (&[], &["dgamma"]),
        };
        assert_eq!((&ff[..], &bf[..]), want, "{fault:?} on case {}", case.name);
        let status = |failed: &[&str]| if failed.is_empty() { Status::Pass } else { Status::Fail };
        assert_eq!((f.status, bw.status), (status(want.0), status(want.1)), "{fault:?}");
    }
}
