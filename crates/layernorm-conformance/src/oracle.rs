//! The f64 reference as a backend: every kind, dtype and variant, each output the reference's
//! value rounded once to its storage dtype.
//!
//! It is not in `layernorm::REGISTRY` and never serves users. It exists to check the suite
//! itself: a backend that returns the correctly rounded answer must pass every case (so no
//! tolerance or allowance is tighter than the rounding the dtypes force — in particular the
//! backward from y, which recovers x̂ from a y rounded to the storage dtype), and it is the
//! backend `tests/catches_faults.rs` breaks on purpose, for every variant, whatever the real
//! backends support yet.

use layernorm::{
    Backend, DType, Error, HostBackward, HostForward, HostNormalize, HostSlice, HostSliceMut,
    NormKind, NormSpec, Residual, Result, Saved, bf16, check_gamma_recoverable, f16, reference,
    validate_backward, validate_forward,
};

/// The reference behind [`HostNormalize`] (see the module docs).
///
/// The backward from x recomputes each row's statistics from x in `f64`, as the CPU kernels
/// recompute the mean: the saved statistics count only where they are not the correctly
/// rounded value of a non-finite result, i.e. a NaN or infinite saved mean, or a saved rstd
/// that is NaN or an infinity the exact rstd does not round to, poisons its row.
#[derive(Clone, Copy, Debug, Default)]
pub struct Oracle;

impl Oracle {
    /// The oracle's name in reports.
    pub const NAME: &'static str = "oracle";
}

impl Backend for Oracle {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn supports(&self, _kind: NormKind, _dtype: DType) -> Result<()> {
        Ok(())
    }
}

/// Writes `values` into `out`, each rounded once to `out`'s dtype.
fn store(out: &mut HostSliceMut<'_>, values: &[f64]) -> Result<()> {
    match out {
        HostSliceMut::F16(s) => s.iter_mut().zip(values).for_each(|(o, &v)| *o = f16::from_f64(v)),
        HostSliceMut::BF16(s) => {
            s.iter_mut().zip(values).for_each(|(o, &v)| *o = bf16::from_f64(v))
        }
        HostSliceMut::F32(s) => s.iter_mut().zip(values).for_each(|(o, &v)| *o = v as f32),
        HostSliceMut::F64(s) => s.copy_from_slice(values),
        other => {
            return Err(Error::unsupported(Oracle::NAME, format!("store {}", other.dtype())));
        }
    }
    Ok(())
}

fn wide(s: Option<HostSlice<'_>>) -> Option<Vec<f64>> {
    s.map(|s| s.to_f64_vec())
}

impl HostNormalize for Oracle {
    fn forward_host(&self, spec: &NormSpec, mut a: HostForward<'_>) -> Result<()> {
        validate_forward(spec, &a)?;
        let x = a.x.to_f64_vec();
        let (g, b) = (wide(a.gamma), wide(a.beta));
        let residual = match &a.residual {
            Some(Residual::Add { residual, .. }) => Some(residual.to_f64_vec()),
            Some(Residual::InPlace(r)) => Some(r.as_slice().to_f64_vec()),
            None => None,
        };
        let (h, f) = match residual {
            Some(r) => {
                let (h, f) = reference::forward_residual(spec, &x, &r, g.as_deref(), b.as_deref())?;
                (Some(h), f)
            }
            None => (None, reference::forward(spec, &x, g.as_deref(), b.as_deref())?),
        };
        store(&mut a.y, &f.y)?;
        if let (Some(out), Some(m)) = (a.mean.as_mut(), &f.mean) {
            store(out, m)?;
        }
        store(&mut a.rstd, &f.rstd)?;
        match (a.residual.as_mut(), &h) {
            (Some(Residual::Add { h: out, .. } | Residual::InPlace(out)), Some(h)) => store(out, h),
            _ => Ok(()),
        }
    }

    fn backward_host(&self, spec: &NormSpec, mut a: HostBackward<'_>) -> Result<()> {
        validate_backward(spec, &a)?;
        let (dy, saved_rstd) = (a.dy.to_f64_vec(), a.rstd.to_f64_vec());
        let (g, b) = (wide(a.gamma), wide(a.beta));
        let grads = match a.saved {
            Saved::Y(y) => {
                check_gamma_recoverable(spec, a.gamma)?;
                let y = y.to_f64_vec();
                reference::backward_from_output(
                    spec,
                    &y,
                    &dy,
                    &saved_rstd,
                    g.as_deref(),
                    b.as_deref(),
                )?
            }
            Saved::X(x) => {
                let x = x.to_f64_vec();
                let (n, stats) = (spec.n, spec.stats_dtype());
                let exact: Vec<(f64, f64)> = x
                    .chunks(n)
                    .map(|row| match spec.kind {
                        NormKind::RmsNorm => (0.0, reference::rms_row_rstd(row, spec.eps)),
                        _ => reference::row_stats(row, spec.eps),
                    })
                    .collect();
                let rstd: Vec<f64> = exact
                    .iter()
                    .zip(&saved_rstd)
                    .map(|(&(_, e), &s)| if s.is_finite() || s == stats.round(e) { e } else { s })
                    .collect();
                let mean = wide(a.mean).filter(|_| spec.has_mean()).map(|saved| {
                    exact
                        .iter()
                        .zip(&saved)
                        .map(|(&(e, _), &s)| if s.is_finite() { e } else { s })
                        .collect::<Vec<f64>>()
                });
                reference::backward(spec, &x, &dy, mean.as_deref(), &rstd, g.as_deref())?
            }
        };
        let grads = match a.dh {
            Some(dh) => reference::add_dh(grads, &dh.to_f64_vec())?,
            None => grads,
        };
        store(&mut a.dx, &grads.dx)?;
        if let (Some(out), Some(v)) = (a.dgamma.as_mut(), &grads.dgamma) {
            store(out, v)?;
        }
        if let (Some(out), Some(v)) = (a.dbeta.as_mut(), &grads.dbeta) {
            store(out, v)?;
        }
        Ok(())
    }
}
