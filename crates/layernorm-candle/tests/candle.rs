//! The ops and modules on real candle tensors: gradients against candle's own composed
//! (differentiable) norms, training, every dtype against the f64 reference, leading dims,
//! strided inputs, weights from a safetensors file, and bad input.

use candle_core::{D, DType, Device, IndexOp, Module, Tensor, Var};
use candle_nn::{LayerNormConfig, Linear, Optimizer, VarBuilder, VarMap};
use layernorm_candle::{LayerNorm, NormKind, RmsNorm, ops};
use layernorm_core::{NormSpec, reference};

type Result<T = ()> = candle_core::Result<T>;

const CPU: Device = Device::Cpu;

mod support;

/// [`support::data`] times `scale`, plus `offset`.
fn data(len: usize, seed: u32, scale: f64, offset: f64) -> Vec<f64> {
    support::data::data(len, seed).into_iter().map(|v| v * scale + offset).collect()
}

fn tensor(shape: &[usize], seed: u32, scale: f64, offset: f64, dtype: DType) -> Result<Tensor> {
    let len = shape.iter().product();
    Tensor::from_vec(data(len, seed, scale, offset), shape, &CPU)?.to_dtype(dtype)
}

fn var(shape: &[usize], seed: u32, scale: f64, offset: f64, dtype: DType) -> Result<Var> {
    Var::from_tensor(&tensor(shape, seed, scale, offset, dtype)?)
}

fn f64s(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// max |a − b| / max |b|: the error of one gradient tensor against another on its own scale.
fn rel_max(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d = a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    d / max_abs(b)
}

fn bits_eq(a: &Tensor, b: &Tensor) -> Result<bool> {
    let (a, b) = (f64s(a)?, f64s(b)?);
    Ok(a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()))
}

/// Which norm computes the middle of the network.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Impl {
    /// This crate's module.
    Ours,
    /// candle's composed, differentiable formula (`layer_norm_slow` / `rms_norm_slow`).
    Composed,
}

/// The variables of Linear → norm → Linear, with the input as a variable too, and the residual
/// stream a pre-norm block adds the first Linear's output to.
struct Mlp {
    x: Var,
    stream: Var,
    w1: Var,
    b1: Var,
    gamma: Var,
    beta: Option<Var>,
    w2: Var,
    b2: Var,
}

const EPS: f32 = 1e-5;

impl Mlp {
    fn new(kind: NormKind, dtype: DType) -> Result<Mlp> {
        let (d_in, d, d_out) = (10, 64, 5);
        Ok(Mlp {
            x: var(&[2, 6, d_in], 1, 1.0, 0.0, dtype)?,
            stream: var(&[2, 6, d], 9, 0.8, 0.1, dtype)?,
            w1: var(&[d, d_in], 2, 0.4, 0.0, dtype)?,
            b1: var(&[d], 3, 0.2, 0.3, dtype)?,
            gamma: var(&[d], 4, 0.3, 1.0, dtype)?,
            beta: (kind == NormKind::LayerNorm)
                .then(|| var(&[d], 5, 0.2, 0.0, dtype))
                .transpose()?,
            w2: var(&[d_out, d], 6, 0.2, 0.0, dtype)?,
            b2: var(&[d_out], 7, 0.1, 0.0, dtype)?,
        })
    }

    /// The variables the loss depends on (the stream only with a residual).
    fn vars(&self, residual: bool) -> Vec<(&'static str, &Var)> {
        let mut v =
            vec![("x", &self.x), ("w1", &self.w1), ("b1", &self.b1), ("gamma", &self.gamma)];
        v.extend(residual.then_some(("stream", &self.stream)));
        v.extend(self.beta.as_ref().map(|b| ("beta", b)));
        v.extend([("w2", &self.w2), ("b2", &self.b2)]);
        v
    }

    /// The loss of Linear → norm → Linear. With `residual`, the norm is a pre-norm block's:
    /// h = Linear₁(x) + stream, y = norm(h), and h feeds the loss too (as the residual stream
    /// feeds the next block), so that both outputs carry a gradient.
    fn loss(&self, kind: NormKind, which: Impl, residual: bool) -> Result<Tensor> {
        let lin1 = Linear::new(self.w1.as_tensor().clone(), Some(self.b1.as_tensor().clone()));
        let lin2 = Linear::new(self.w2.as_tensor().clone(), Some(self.b2.as_tensor().clone()));
        let a = lin1.forward(&self.x)?;
        let stream = self.stream.as_tensor();
        let g = self.gamma.as_tensor().clone();
        let b = self.beta.as_ref().map(|b| b.as_tensor().clone());
        let module = match (kind, b) {
            (NormKind::LayerNorm, Some(b)) => LayerNorm::new(g.clone(), b, EPS as f64),
            _ => RmsNorm::new(g.clone(), EPS as f64).into_inner(),
        };
        let (z, h) = match (which, residual) {
            (Impl::Ours, false) => (module.forward(&a)?, None),
            (Impl::Ours, true) => {
                let (y, h) = module.forward_residual(&a, stream)?;
                (y, Some(h))
            }
            (Impl::Composed, residual) => {
                let h = if residual { (&a + stream)? } else { a };
                let y = match module.bias() {
                    Some(b) => candle_nn::ops::layer_norm_slow(&h, &g, b, EPS)?,
                    None => candle_nn::ops::rms_norm_slow(&h, &g, EPS)?,
                };
                (y, residual.then_some(h))
            }
        };
        let out = lin2.forward(&z)?;
        let target = tensor(out.dims(), 8, 1.0, 0.0, out.dtype())?;
        let loss = (out - target)?.sqr()?.mean_all()?;
        match h {
            // A nonlinear function of h, so that dh varies along the stream.
            Some(h) => loss + (h.sqr()?.mean_all()? * 0.25)?,
            None => Ok(loss),
        }
    }
}

/// Gradients of every variable of Linear → norm → Linear, through this crate's norm and through
/// candle's composed one, agree — and none is zero.
///
/// Tolerance: max |Δ| over a gradient tensor relative to its largest element, at most the
/// conformance suite's dx tolerance for the dtype (f32 1e-6, f64 1e-12, `docs/conformance.md`).
/// The composed path is itself an f32 (f64) computation with its own rounding, so this bounds
/// the sum of two implementations' errors, not ours alone; the data is of one scale (|x̂| ~ 1 in
/// every row), where the per-tensor scale and the suite's per-row scales agree, and the Linear
/// weights' gradients sum over only 12 rows.
///
/// With `residual`, the composed block is candle's `x + stream` followed by the composed norm;
/// h is then the same bits on both sides (one rounding of the same sum), the norm's gradient
/// has the same error budget as above, and dh adds one rounding of a sum.
fn gradients_match_the_composed_norm(
    kind: NormKind,
    dtype: DType,
    residual: bool,
    tol: f64,
) -> Result {
    let mlp = Mlp::new(kind, dtype)?;
    let ours = mlp.loss(kind, Impl::Ours, residual)?.backward()?;
    let composed = mlp.loss(kind, Impl::Composed, residual)?.backward()?;
    for (name, v) in mlp.vars(residual) {
        let g = f64s(
            ours.get(v).unwrap_or_else(|| panic!("{kind} {dtype:?}: no gradient for {name}")),
        )?;
        let c = f64s(composed.get(v).expect("the composed norm has a backward"))?;
        assert!(max_abs(&g) > 0.0, "{kind} {dtype:?}: the gradient of {name} is zero");
        let err = rel_max(&g, &c);
        println!("{kind} {dtype:?} residual {residual}: d{name} {err:.2e}");
        assert!(err <= tol, "{kind} {dtype:?}: d{name} differs by {err:e} (tolerance {tol:e})");
    }
    Ok(())
}

#[test]
fn layer_norm_gradients_match_layer_norm_slow() -> Result {
    gradients_match_the_composed_norm(NormKind::LayerNorm, DType::F32, false, 1e-6)?;
    gradients_match_the_composed_norm(NormKind::LayerNorm, DType::F64, false, 1e-12)
}

#[test]
fn rms_norm_gradients_match_the_composed_formula() -> Result {
    gradients_match_the_composed_norm(NormKind::RmsNorm, DType::F32, false, 1e-6)?;
    gradients_match_the_composed_norm(NormKind::RmsNorm, DType::F64, false, 1e-12)
}

#[test]
fn residual_layer_norm_gradients_match_add_then_layer_norm_slow() -> Result {
    gradients_match_the_composed_norm(NormKind::LayerNorm, DType::F32, true, 1e-6)?;
    gradients_match_the_composed_norm(NormKind::LayerNorm, DType::F64, true, 1e-12)
}

#[test]
fn residual_rms_norm_gradients_match_add_then_the_composed_formula() -> Result {
    gradients_match_the_composed_norm(NormKind::RmsNorm, DType::F32, true, 1e-6)?;
    gradients_match_the_composed_norm(NormKind::RmsNorm, DType::F64, true, 1e-12)
}

/// A short regression run with AdamW: the loss falls, and the norm's own parameters move.
fn training_reduces_the_loss(kind: NormKind) -> Result {
    let (d_in, d, n) = (8, 32, 64);
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &CPU);
    let lin1 = candle_nn::linear(d_in, d, vb.pp("l1"))?;
    let norm: Box<dyn Module> = match kind {
        NormKind::LayerNorm => Box::new(layernorm_candle::layer_norm(d, 1e-5, vb.pp("norm"))?),
        _ => Box::new(layernorm_candle::rms_norm(d, 1e-6, vb.pp("norm"))?),
    };
    let lin2 = candle_nn::linear(d, 1, vb.pp("l2"))?;
    // Deterministic weights in place of candle's random initialization.
    varmap.set_one("l1.weight", tensor(&[d, d_in], 11, 0.3, 0.0, DType::F32)?)?;
    varmap.set_one("l2.weight", tensor(&[1, d], 12, 0.2, 0.0, DType::F32)?)?;
    let x = tensor(&[n, d_in], 13, 1.0, 0.0, DType::F32)?;
    // The target: a fixed nonlinear function of x.
    let teacher = tensor(&[d_in, 1], 14, 1.0, 0.0, DType::F32)?;
    let y = x.matmul(&teacher)?.tanh()?;
    let params_before: Vec<Vec<f64>> = ["norm.weight", "norm.bias"]
        .iter()
        .filter_map(|n| varmap.data().lock().unwrap().get(*n).map(|v| f64s(v.as_tensor())))
        .collect::<Result<_>>()?;
    let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-2)?;
    let mut losses = vec![];
    for _ in 0..60 {
        let pred = lin2.forward(&norm.forward(&lin1.forward(&x)?)?)?;
        let loss = (pred - &y)?.sqr()?.mean_all()?;
        losses.push(loss.to_scalar::<f32>()?);
        opt.backward_step(&loss)?;
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    println!("{kind}: loss {first:.4} → {last:.4}");
    assert!(last < 0.25 * first, "{kind}: loss {first} → {last}: {losses:?}");
    let data = varmap.data().lock().unwrap();
    for (name, before) in ["norm.weight", "norm.bias"].iter().zip(&params_before) {
        let after = f64s(data[*name].as_tensor())?;
        assert!(rel_max(&after, before) > 1e-3, "{kind}: {name} did not train");
    }
    Ok(())
}

#[test]
fn training_with_layer_norm_reduces_the_loss() -> Result {
    training_reduces_the_loss(NormKind::LayerNorm)
}

#[test]
fn training_with_rms_norm_reduces_the_loss() -> Result {
    training_reduces_the_loss(NormKind::RmsNorm)
}

/// The conformance suite's comparison rule (`docs/conformance.md`), for the outputs checked here:
/// each row (column) against the size of the terms that form it.
struct Check {
    spec: NormSpec,
    x: Vec<f64>,
    gamma: Vec<f64>,
    beta: Option<Vec<f64>>,
    dy: Vec<f64>,
    /// The residual and the gradient arriving on h, for the fused residual variant.
    residual: Option<(Vec<f64>, Vec<f64>)>,
}

/// The conformance tolerances (`crates/layernorm-conformance/src/metric.rs`): y and dx, and the
/// sums over rows dγ, dβ.
fn tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-6, 1e-5),
        DType::F64 => (1e-12, 1e-11),
        DType::F16 => (2f64.powi(-10), 2f64.powi(-10)),
        _ => (2f64.powi(-7), 2f64.powi(-7)),
    }
}

impl Check {
    /// Runs the op on candle tensors of `dtype` and compares y, dx, dγ and dβ with the f64
    /// reference on the same (rounded) inputs. Returns the worst errors (y, dx, dγ, dβ).
    ///
    /// With `residual`, the fused residual variant: h must be candle's own `x + residual` and
    /// the reference's h, bit for bit; the gradient reaching the residual must be dx's bits.
    fn run(
        kind: NormKind,
        dtype: DType,
        (rows, n, offset): (usize, usize, f64),
        residual: bool,
    ) -> Result<[f64; 4]> {
        let x = var(&[rows, n], 21, 1.0, offset, dtype)?;
        let g = var(&[n], 22, 0.5, 1.0, dtype)?;
        let b =
            (kind == NormKind::LayerNorm).then(|| var(&[n], 23, 0.5, 0.0, dtype)).transpose()?;
        let dy = tensor(&[rows, n], 24, 1.0, 0.0, dtype)?;
        let r_var = var(&[rows, n], 25, 2.0, -0.5, dtype)?;
        let (r, r_t) = (&r_var, r_var.as_tensor());
        let dh = tensor(&[rows, n], 26, 0.5, 0.0, dtype)?;
        let b_t = b.as_ref().map(|b| b.as_tensor());
        let (y, h, loss) = if residual {
            let (y, h) = ops::normalize_residual(kind, &x, r, &g, b_t, EPS)?;
            // d(Σ y·dy + Σ h·dh) = (dy, dh) exactly, in every dtype.
            let loss = ((&y * &dy)?.sum_all()? + (&h * &dh)?.sum_all()?)?;
            (y, Some(h), loss)
        } else {
            let y = ops::normalize(kind, &x, &g, b_t, EPS)?;
            let loss = (&y * &dy)?.sum_all()?;
            (y, None, loss)
        };
        let grads = loss.backward()?;
        let our_dtype = match dtype {
            DType::F16 => layernorm_core::DType::F16,
            DType::BF16 => layernorm_core::DType::BF16,
            DType::F32 => layernorm_core::DType::F32,
            _ => layernorm_core::DType::F64,
        };
        let spec =
            NormSpec::new(kind, rows, n, our_dtype).with_eps(EPS as f64).with_beta(b.is_some());
        let c = Check {
            spec,
            x: f64s(&x)?,
            gamma: f64s(&g)?,
            beta: b.as_ref().map(|b| f64s(b)).transpose()?,
            dy: f64s(&dy)?,
            residual: if residual { Some((f64s(r)?, f64s(&dh)?)) } else { None },
        };
        let get = |v: &Var| -> Result<Vec<f64>> { f64s(grads.get(v).expect("a gradient")) };
        let db = b.as_ref().map(get).transpose()?;
        let dx = get(&x)?;
        if let (Some(h), Some((r, _))) = (&h, &c.residual) {
            let what = format!("{kind} {dtype:?} {rows}x{n}");
            assert!(bits_eq(h, &(x.as_tensor() + r_t)?)?, "{what}: h is not candle's x + r");
            let (want, _) =
                reference::forward_residual(&c.spec, &c.x, r, Some(&c.gamma), c.beta.as_deref())
                    .unwrap();
            let h = f64s(h)?;
            assert!(h.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: h");
            let dr = get(&r_var)?;
            assert!(dx.iter().zip(&dr).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: dr");
        }
        Ok(c.errors(&f64s(&y)?, &dx, &get(&g)?, db.as_deref()))
    }

    fn errors(&self, y: &[f64], dx: &[f64], dg: &[f64], db: Option<&[f64]>) -> [f64; 4] {
        let (s, n) = (&self.spec, self.spec.n);
        let (gamma, beta) = (Some(&self.gamma[..]), self.beta.as_deref());
        // The normalized input: x, or the reference's h (rounded to the dtype, (14)).
        let (x, fwd) = match &self.residual {
            Some((r, _)) => reference::forward_residual(s, &self.x, r, gamma, beta).unwrap(),
            None => (self.x.clone(), reference::forward(s, &self.x, gamma, beta).unwrap()),
        };
        let mut bwd =
            reference::backward(s, &x, &self.dy, fwd.mean.as_deref(), &fwd.rstd, gamma).unwrap();
        let dh = |i: usize| self.residual.as_ref().map_or(0.0, |(_, dh)| dh[i]);
        if let Some((_, dh)) = &self.residual {
            bwd = reference::add_dh(bwd, dh).unwrap();
        }
        let mean = |r: usize| fwd.mean.as_ref().map_or(0.0, |m| m[r]);
        let xhat = |r: usize, j: usize| (x[r * n + j] - mean(r)) * fwd.rstd[r];
        let (mut ey, mut edx) = (0.0f64, 0.0f64);
        for r in 0..s.rows {
            let row = r * n..(r + 1) * n;
            let y_scale = (0..n)
                .map(|j| (xhat(r, j) * self.gamma[j]).abs() + beta.map_or(0.0, |b| b[j].abs()))
                .fold(0.0, f64::max);
            ey = ey.max(rel_max_scaled(&y[row.clone()], &fwd.y[row.clone()], y_scale));
            // dx's terms: g = dy·γ, c1 = mean(g·x̂), c2 = mean(g) (LayerNorm) or 0, and dh.
            let gj = |j: usize| self.dy[r * n + j] * self.gamma[j];
            let c1 = (0..n).map(|j| gj(j) * xhat(r, j)).sum::<f64>() / n as f64;
            let c2 = if s.has_mean() { (0..n).map(gj).sum::<f64>() / n as f64 } else { 0.0 };
            let dx_scale = (0..n)
                .map(|j| {
                    fwd.rstd[r] * (gj(j).abs() + c2.abs() + (xhat(r, j) * c1).abs())
                        + dh(r * n + j).abs()
                })
                .fold(0.0, f64::max);
            edx = edx.max(rel_max_scaled(&dx[row.clone()], &bwd.dx[row], dx_scale));
        }
        let col = |j: usize, with_xhat: bool| {
            (0..s.rows)
                .map(|r| {
                    self.dy[r * n + j].abs() * if with_xhat { xhat(r, j).abs() + 1.0 } else { 1.0 }
                })
                .sum::<f64>()
        };
        let col_err = |got: &[f64], want: &[f64], with_xhat: bool| {
            (0..n).map(|j| (got[j] - want[j]).abs() / col(j, with_xhat)).fold(0.0, f64::max)
        };
        let edg = col_err(dg, bwd.dgamma.as_ref().unwrap(), true);
        let edb = match (db, &bwd.dbeta) {
            (Some(db), Some(want)) => col_err(db, want, false),
            _ => 0.0,
        };
        [ey, edx, edg, edb]
    }
}

fn rel_max_scaled(got: &[f64], want: &[f64], scale: f64) -> f64 {
    got.iter().zip(want).map(|(g, w)| (g - w).abs() / scale).fold(0.0, f64::max)
}

#[test]
fn every_dtype_matches_the_f64_reference() -> Result {
    for kind in NormKind::ALL {
        for dtype in [DType::F16, DType::BF16, DType::F32, DType::F64] {
            let (tol, tol_param) = tolerance(dtype);
            for ((rows, n, offset), residual) in [(37, 200, 0.0), (3, 1027, 0.0), (64, 768, 30.0)]
                .into_iter()
                .flat_map(|shape| [(shape, false), (shape, true)])
            {
                let [ey, edx, edg, edb] = Check::run(kind, dtype, (rows, n, offset), residual)?;
                let what =
                    format!("{kind} {dtype:?} {rows}x{n} offset {offset} residual {residual}");
                println!("{what}: y {ey:.2e} dx {edx:.2e} dγ {edg:.2e} dβ {edb:.2e}");
                assert!(ey <= tol, "{what}: y error {ey:e} > {tol:e}");
                assert!(edx <= tol, "{what}: dx error {edx:e} > {tol:e}");
                assert!(edg <= tol_param, "{what}: dγ error {edg:e} > {tol_param:e}");
                assert!(edb <= tol_param, "{what}: dβ error {edb:e} > {tol_param:e}");
            }
        }
    }
    Ok(())
}

/// Outputs and every gradient of an op on x, and on x's leading dims flattened into rows, are
/// the same bits.
#[test]
fn leading_dims_are_rows() -> Result {
    for kind in NormKind::ALL {
        let n = 48;
        let x = var(&[2, 3, 4, n], 31, 1.0, 0.5, DType::F32)?;
        let flat = Var::from_tensor(&x.as_tensor().reshape((24, n))?)?;
        let g = var(&[n], 32, 0.5, 1.0, DType::F32)?;
        let b = var(&[n], 33, 0.5, 0.0, DType::F32)?;
        let dy = tensor(&[2, 3, 4, n], 34, 1.0, 0.0, DType::F32)?;
        let run = |x: &Tensor| -> Result<(Tensor, candle_core::backprop::GradStore)> {
            let y = ops::normalize(kind, x, &g, Some(&b), 1e-5)?;
            let grads = (y.flatten_all()? * dy.flatten_all()?)?.sum_all()?.backward()?;
            Ok((y, grads))
        };
        let (y4, g4) = run(&x)?;
        let (y2, g2) = run(&flat)?;
        assert_eq!(y4.dims(), &[2, 3, 4, n]);
        assert!(bits_eq(&y4, &y2)?, "{kind}: y");
        assert!(bits_eq(g4.get(&x).unwrap(), g2.get(&flat).unwrap())?, "{kind}: dx");
        assert_eq!(g4.get(&x).unwrap().dims(), &[2, 3, 4, n]);
        for v in [&g, &b] {
            assert!(bits_eq(g4.get(v).unwrap(), g2.get(v).unwrap())?, "{kind}: dγ / dβ");
        }
    }
    Ok(())
}

/// A transposed x, a column-strided x and a strided γ give the same bits as their contiguous
/// copies, forward and backward, and the gradient reaches the tensor they are views of.
#[test]
fn strided_inputs_match_their_contiguous_copies() -> Result {
    let (rows, n) = (20, 33);
    for kind in NormKind::ALL {
        // x = base.t(): rows × n with stride (1, rows).
        let base = var(&[n, rows], 41, 1.0, 0.2, DType::F32)?;
        let xt = base.as_tensor().t()?;
        assert!(!xt.is_contiguous());
        // γ: every other element of a 2n vector.
        let g2 = var(&[n, 2], 42, 0.5, 1.0, DType::F32)?;
        let g = g2.as_tensor().i((.., 0))?;
        assert!(!g.is_contiguous());
        let dy = tensor(&[rows, n], 43, 1.0, 0.0, DType::F32)?;
        let loss = |y: &Tensor| (y * &dy)?.sum_all();

        let y = ops::normalize(kind, &xt, &g, None, 1e-5)?;
        let grads = loss(&y)?.backward()?;
        let xc = Var::from_tensor(&xt.contiguous()?)?;
        let gc = Var::from_tensor(&g.contiguous()?)?;
        let yc = ops::normalize(kind, &xc, &gc, None, 1e-5)?;
        let grads_c = loss(&yc)?.backward()?;
        assert!(bits_eq(&y, &yc)?, "{kind}: y of the transposed x");
        let dbase = grads.get(&base).expect("the gradient reaches the transposed tensor");
        assert!(bits_eq(&dbase.t()?, grads_c.get(&xc).unwrap())?, "{kind}: dx");
        let dg2 = grads.get(&g2).expect("the gradient reaches the strided γ's tensor");
        assert!(bits_eq(&dg2.i((.., 0))?, grads_c.get(&gc).unwrap())?, "{kind}: dγ");
        assert_eq!(max_abs(&f64s(&dg2.i((.., 1))?)?), 0.0, "{kind}: γ's unused half");

        // x = wide.narrow(1, 3, n): each row a window of a wider row.
        let wide = var(&[rows, n + 7], 44, 1.0, -0.3, DType::F32)?;
        let xn = wide.as_tensor().narrow(1, 3, n)?;
        assert!(!xn.is_contiguous());
        let y = ops::normalize(kind, &xn, &gc, None, 1e-5)?;
        let yc = ops::normalize(kind, &xn.contiguous()?, &gc, None, 1e-5)?;
        assert!(bits_eq(&y, &yc)?, "{kind}: y of the narrowed x");
        let dwide = loss(&y)?.backward()?;
        let dwide = dwide.get(&wide).unwrap();
        assert_eq!(max_abs(&f64s(&dwide.narrow(1, 0, 3)?)?), 0.0);
        assert!(max_abs(&f64s(&dwide.narrow(1, 3, n)?)?) > 0.0);
    }
    Ok(())
}

/// A norm whose parameters are plain tensors (frozen) still passes the gradient to x, and the
/// statistics saved by the forward serve a second backward of the same graph.
#[test]
fn frozen_parameters_and_a_second_backward() -> Result {
    let x = var(&[5, 16], 51, 1.0, 0.0, DType::F32)?;
    let g = tensor(&[16], 52, 0.5, 1.0, DType::F32)?;
    let b = tensor(&[16], 53, 0.5, 0.0, DType::F32)?;
    let dy = tensor(&[5, 16], 54, 1.0, 0.0, DType::F32)?;
    let loss = (ops::layer_norm(&x, &g, &b, 1e-5)? * &dy)?.sum_all()?;
    let first = loss.backward()?;
    assert!(first.get(&g).is_none() && first.get(&b).is_none());
    let second = loss.backward()?;
    assert!(max_abs(&f64s(first.get(&x).unwrap())?) > 0.0);
    assert!(bits_eq(first.get(&x).unwrap(), second.get(&x).unwrap())?);
    Ok(())
}

/// The modules load their weights from a `VarBuilder` over a safetensors file, under candle's
/// names (and the older `gamma`/`beta`), and compute what candle-nn's modules compute.
#[test]
fn modules_load_weights_from_safetensors() -> Result {
    let n = 96;
    let weights: std::collections::HashMap<String, Tensor> = [
        ("ln.weight", tensor(&[n], 61, 0.5, 1.0, DType::F32)?),
        ("ln.bias", tensor(&[n], 62, 0.5, 0.0, DType::F32)?),
        ("rms.weight", tensor(&[n], 63, 0.5, 1.0, DType::F32)?),
        ("old.gamma", tensor(&[n], 64, 0.5, 1.0, DType::F32)?),
        ("old.beta", tensor(&[n], 65, 0.5, 0.0, DType::F32)?),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let path = std::env::temp_dir()
        .join(format!("layernorm-candle-{}-weights.safetensors", std::process::id()));
    candle_core::safetensors::save(&weights, &path)?;
    let bytes = std::fs::read(&path)?;
    std::fs::remove_file(&path)?;
    let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &CPU)?;

    let ln = layernorm_candle::layer_norm(n, 1e-5, vb.pp("ln"))?;
    let rms = layernorm_candle::rms_norm(n, 1e-6, vb.pp("rms"))?;
    let old = layernorm_candle::layer_norm(n, 1e-5, vb.pp("old"))?;
    assert!(bits_eq(ln.weight(), &weights["ln.weight"])?);
    assert!(bits_eq(ln.bias().unwrap(), &weights["ln.bias"])?);
    assert!(bits_eq(rms.weight(), &weights["rms.weight"])?);
    assert!(bits_eq(old.weight(), &weights["old.gamma"])?);
    assert!(bits_eq(old.bias().unwrap(), &weights["old.beta"])?);
    assert!(layernorm_candle::layer_norm(n + 1, 1e-5, vb.pp("ln")).is_err());

    // The same numbers as candle-nn's modules over the same builder. candle's fused forward
    // forms the variance as E[x²] − μ² in f32: on this data (|μ| < σ) good to a few 1e-7 of
    // the output's scale; 1e-5 bounds it.
    let x = tensor(&[3, 7, n], 66, 1.0, 0.1, DType::F32)?;
    // RMSNorm with a bias, and LayerNorm without one: what a `LayerNormConfig` can ask for.
    let rms_bias = LayerNormConfig { eps: 1e-6, remove_mean: false, affine: true };
    let pairs: [(Box<dyn Module>, Box<dyn Module>); 5] = [
        (Box::new(ln.clone()), Box::new(candle_nn::layer_norm(n, 1e-5, vb.pp("ln"))?)),
        (Box::new(rms.clone()), Box::new(candle_nn::rms_norm(n, 1e-6, vb.pp("rms"))?)),
        (Box::new(old), Box::new(candle_nn::layer_norm(n, 1e-5, vb.pp("old"))?)),
        (
            Box::new(layernorm_candle::layer_norm(n, rms_bias, vb.pp("ln"))?),
            Box::new(candle_nn::layer_norm(n, rms_bias, vb.pp("ln"))?),
        ),
        (
            Box::new(layernorm_candle::layer_norm_no_bias(n, 1e-5, vb.pp("ln"))?),
            Box::new(candle_nn::layer_norm_no_bias(n, 1e-5, vb.pp("ln"))?),
        ),
    ];
    for (ours, theirs) in &pairs {
        let (a, b) = (f64s(&ours.forward(&x)?)?, f64s(&theirs.forward(&x)?)?);
        assert!(rel_max(&a, &b) < 1e-5, "{}", rel_max(&a, &b));
    }
    // `From` takes over a candle-nn module's parameters.
    let converted = LayerNorm::from(candle_nn::layer_norm(n, 1e-5, vb.pp("ln"))?);
    assert!(bits_eq(&converted.forward(&x)?, &ln.forward(&x)?)?);
    let converted = RmsNorm::from(candle_nn::rms_norm(n, 1e-6, vb.pp("rms"))?);
    assert!(bits_eq(&converted.forward(&x)?, &rms.forward(&x)?)?);

    // A builder of another dtype converts the weights, and the modules run in it.
    let bf = VarBuilder::from_tensors(weights, DType::BF16, &CPU);
    let ln16 = layernorm_candle::layer_norm(n, 1e-5, bf.pp("ln"))?;
    let y = ln16.forward(&x.to_dtype(DType::BF16)?)?;
    assert_eq!((y.dtype(), y.dims()), (DType::BF16, &[3, 7, n][..]));
    Ok(())
}

fn message(r: Result<Tensor>) -> String {
    match r {
        Ok(t) => panic!("expected an error, got a tensor of shape {:?}", t.dims()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_input_is_an_error_that_says_what() -> Result {
    let x = tensor(&[4, 8], 71, 1.0, 0.0, DType::F32)?;
    let g = tensor(&[8], 72, 1.0, 0.0, DType::F32)?;
    let b = tensor(&[8], 73, 1.0, 0.0, DType::F32)?;
    let cases: Vec<(Result<Tensor>, &str)> = vec![
        (ops::layer_norm(&x, &g.narrow(0, 0, 7)?, &b, 1e-5), "expected shape [8], got [7]"),
        (
            ops::layer_norm(&x, &g, &b.reshape((1, 8))?, 1e-5),
            "`beta`: expected shape [8], got [1, 8]",
        ),
        (ops::rms_norm(&x, &g.to_dtype(DType::F64)?, 1e-6), "dtype mismatch for `gamma`"),
        (ops::layer_norm(&x, &g, &b.to_dtype(DType::BF16)?, 1e-5), "dtype mismatch for `beta`"),
        (ops::rms_norm(&x.to_dtype(DType::U32)?, &g.to_dtype(DType::U32)?, 1e-6), "has dtype U32"),
        (ops::layer_norm(&x, &g, &b, 0.0), "eps must be finite and > 0, got 0"),
        (ops::layer_norm(&x, &g, &b, f64::NAN), "eps must be finite"),
        (ops::rms_norm(&Tensor::new(1f32, &CPU)?, &g, 1e-6), "0-dimensional"),
        (
            ops::layer_norm(
                &Tensor::zeros((3, 0), DType::F32, &CPU)?,
                &g.narrow(0, 0, 0)?,
                &b.narrow(0, 0, 0)?,
                1e-5,
            ),
            "the normalized dimension is empty",
        ),
    ];
    for (result, want) in cases {
        let msg = message(result);
        assert!(msg.starts_with("layernorm-candle "), "{msg}");
        assert!(msg.contains(want), "{msg:?} does not say {want:?}");
    }
    Ok(())
}

/// No rows is a valid problem: empty outputs, and zero parameter gradients.
#[test]
fn zero_rows() -> Result {
    let x = Var::from_tensor(&Tensor::zeros((0, 6), DType::F32, &CPU)?)?;
    let g = var(&[6], 81, 0.5, 1.0, DType::F32)?;
    let y = ops::rms_norm(&x, &g, 1e-6)?;
    assert_eq!(y.dims(), &[0, 6]);
    let grads = y.sum_all()?.backward()?;
    assert_eq!(f64s(grads.get(&g).unwrap())?, vec![0.0; 6]);
    // The row statistic: one per row, reduced over the last dim only.
    let x = tensor(&[2, 5], 82, 1.0, 0.0, DType::F32)?;
    let y = ops::layer_norm(
        &x,
        &g.as_tensor().narrow(0, 0, 5)?,
        &Tensor::zeros(5, DType::F32, &CPU)?,
        1e-5,
    )?;
    let row_means = f64s(&(y.broadcast_div(&g.as_tensor().narrow(0, 0, 5)?)?).mean(D::Minus1)?)?;
    assert!(max_abs(&row_means) < 1e-6);
    Ok(())
}

/// The fused residual variant over `x` and `residual`, y and h: with β for LayerNorm.
fn residual_op(
    kind: NormKind,
    x: &Tensor,
    residual: &Tensor,
    g: &Tensor,
    b: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let beta = (kind == NormKind::LayerNorm).then_some(b);
    ops::normalize_residual(kind, x, residual, g, beta, 1e-5)
}

/// The residual variant over `[2, 3, 4, N]` tensors and over the same data as `[24, N]` rows:
/// y, h and every gradient are the same bits, in the input's shape.
#[test]
fn residual_leading_dims_are_rows() -> Result {
    let n = 40;
    for kind in NormKind::ALL {
        let x = var(&[2, 3, 4, n], 35, 1.0, 0.5, DType::F32)?;
        let r = var(&[2, 3, 4, n], 36, 1.0, -0.2, DType::F32)?;
        let flat = |v: &Var| Var::from_tensor(&v.as_tensor().reshape((24, n))?);
        let (xf, rf) = (flat(&x)?, flat(&r)?);
        let g = var(&[n], 37, 0.5, 1.0, DType::F32)?;
        let b = var(&[n], 38, 0.5, 0.0, DType::F32)?;
        let dy = tensor(&[24, n], 39, 1.0, 0.0, DType::F32)?;
        let dh = tensor(&[24, n], 40, 1.0, 0.0, DType::F32)?;
        let run = |x: &Tensor, r: &Tensor| -> Result<_> {
            let (y, h) = residual_op(kind, x, r, &g, &b)?;
            let (yf, hf) = (y.reshape((24, n))?, h.reshape((24, n))?);
            let grads = ((yf * &dy)?.sum_all()? + (hf * &dh)?.sum_all()?)?.backward()?;
            Ok((y, h, grads))
        };
        let (y4, h4, g4) = run(&x, &r)?;
        let (y2, h2, g2) = run(&xf, &rf)?;
        assert_eq!((y4.dims(), h4.dims()), (&[2, 3, 4, n][..], &[2, 3, 4, n][..]));
        assert!(bits_eq(&y4, &y2)? && bits_eq(&h4, &h2)?, "{kind}: y, h");
        for (v4, v2) in [(&x, &xf), (&r, &rf)] {
            let d4 = g4.get(v4).unwrap();
            assert_eq!(d4.dims(), &[2, 3, 4, n]);
            assert!(bits_eq(d4, g2.get(v2).unwrap())?, "{kind}: dx / dr");
        }
        for v in [&g, &b].into_iter().take(if kind == NormKind::LayerNorm { 2 } else { 1 }) {
            assert!(bits_eq(g4.get(v).unwrap(), g2.get(v).unwrap())?, "{kind}: dγ / dβ");
        }
    }
    Ok(())
}

/// A transposed x and a narrowed residual give the bits of their contiguous copies, forward and
/// backward, and the gradients reach the tensors they are views of.
#[test]
fn residual_strided_inputs_match_their_contiguous_copies() -> Result {
    let (rows, n) = (20, 33);
    for kind in NormKind::ALL {
        let base = var(&[n, rows], 45, 1.0, 0.2, DType::F32)?;
        let xt = base.as_tensor().t()?;
        let wide = var(&[rows, n + 7], 46, 1.0, -0.3, DType::F32)?;
        let rn = wide.as_tensor().narrow(1, 3, n)?;
        assert!(!xt.is_contiguous() && !rn.is_contiguous());
        let g = var(&[n], 47, 0.5, 1.0, DType::F32)?;
        let b = var(&[n], 48, 0.5, 0.0, DType::F32)?;
        let dy = tensor(&[rows, n], 49, 1.0, 0.0, DType::F32)?;
        let dh = tensor(&[rows, n], 50, 1.0, 0.0, DType::F32)?;
        let loss = |(y, h): &(Tensor, Tensor)| (y * &dy)?.sum_all()? + (h * &dh)?.sum_all()?;

        let out = residual_op(kind, &xt, &rn, &g, &b)?;
        let grads = loss(&out)?.backward()?;
        let xc = Var::from_tensor(&xt.contiguous()?)?;
        let rc = Var::from_tensor(&rn.contiguous()?)?;
        let out_c = residual_op(kind, &xc, &rc, &g, &b)?;
        let grads_c = loss(&out_c)?.backward()?;
        assert!(bits_eq(&out.0, &out_c.0)? && bits_eq(&out.1, &out_c.1)?, "{kind}: y, h");
        let dx = grads_c.get(&xc).unwrap();
        assert!(bits_eq(dx, grads_c.get(&rc).unwrap())?, "{kind}: dx = dr");
        let dbase = grads.get(&base).expect("the gradient reaches the transposed tensor");
        assert!(bits_eq(&dbase.t()?, dx)?, "{kind}: dx of the transposed x");
        let dwide = grads.get(&wide).expect("the gradient reaches the narrowed tensor");
        assert!(bits_eq(&dwide.narrow(1, 3, n)?, dx)?, "{kind}: dr of the narrowed residual");
        assert_eq!(max_abs(&f64s(&dwide.narrow(1, 0, 3)?)?), 0.0);
    }
    Ok(())
}

/// An output that feeds nothing has a zero gradient: with h alone in the loss, dx and dr are
/// dh's bits and dγ, dβ are zero; with y alone, the gradients are the plain op's on the same h.
/// A second backward of the same graph gives the same bits, and frozen parameters get none.
#[test]
fn residual_outputs_used_alone() -> Result {
    let (rows, n) = (9, 64);
    for kind in NormKind::ALL {
        let x = var(&[rows, n], 55, 1.0, 0.0, DType::F32)?;
        let r = var(&[rows, n], 56, 1.0, 0.4, DType::F32)?;
        let g = var(&[n], 57, 0.5, 1.0, DType::F32)?;
        let b = var(&[n], 58, 0.5, 0.0, DType::F32)?;
        let dy = tensor(&[rows, n], 59, 1.0, 0.0, DType::F32)?;
        let dh = tensor(&[rows, n], 60, 1.0, 0.0, DType::F32)?;
        let params = if kind == NormKind::LayerNorm { vec![&g, &b] } else { vec![&g] };

        let (_, h) = residual_op(kind, &x, &r, &g, &b)?;
        let grads = (&h * &dh)?.sum_all()?.backward()?;
        for v in [&x, &r] {
            assert!(bits_eq(grads.get(v).unwrap(), &dh)?, "{kind}: h alone: dx = dh");
        }
        for v in &params {
            assert_eq!(max_abs(&f64s(grads.get(v).unwrap())?), 0.0, "{kind}: h alone: dγ, dβ");
        }

        let (y, h) = residual_op(kind, &x, &r, &g, &b)?;
        let loss = (&y * &dy)?.sum_all()?;
        let grads = loss.backward()?;
        let hv = Var::from_tensor(&h.detach())?;
        let beta = (kind == NormKind::LayerNorm).then_some(b.as_tensor());
        let plain = ops::normalize(kind, &hv, &g, beta, 1e-5)?;
        assert!(bits_eq(&y, &plain)?, "{kind}: y alone: y");
        let plain_grads = (&plain * &dy)?.sum_all()?.backward()?;
        let dx = grads.get(&x).unwrap();
        let scale = max_abs(&f64s(dx)?);
        // The fused backward with dh = 0 and the plain backward are different kernels: the
        // same operations, except that the fused one adds dh (here 0) before its single
        // rounding. f32's dx tolerance (1e-6) on the gradient's own scale.
        let err = rel_max(&f64s(dx)?, &f64s(plain_grads.get(&hv).unwrap())?);
        assert!(err <= 1e-6 && scale > 0.0, "{kind}: y alone: dx {err:e}");
        assert!(bits_eq(dx, grads.get(&r).unwrap())?, "{kind}: y alone: dr = dx");
        for v in &params {
            let (ours, want) = (grads.get(v).unwrap(), plain_grads.get(v).unwrap());
            assert!(bits_eq(ours, want)?, "{kind}: y alone: dγ, dβ");
        }
        let again = loss.backward()?;
        for v in [&x, &r].into_iter().chain(params.iter().copied()) {
            assert!(bits_eq(grads.get(v).unwrap(), again.get(v).unwrap())?, "{kind}: again");
        }

        // Frozen γ and β: gradients for x and the residual only.
        let (gf, bf) = (g.as_tensor().detach(), b.as_tensor().detach());
        let (y, _) = residual_op(kind, &x, &r, &gf, &bf)?;
        let grads = (&y * &dy)?.sum_all()?.backward()?;
        assert!(bits_eq(grads.get(&x).unwrap(), dx)?, "{kind}: frozen: dx");
        assert!(grads.get(&g).is_none() && grads.get(&b).is_none(), "{kind}: frozen");
    }
    Ok(())
}

#[test]
fn residual_bad_input_is_an_error_that_says_what() -> Result {
    let x = tensor(&[4, 8], 75, 1.0, 0.0, DType::F32)?;
    let r = tensor(&[4, 8], 76, 1.0, 0.0, DType::F32)?;
    let g = tensor(&[8], 77, 1.0, 0.0, DType::F32)?;
    let b = tensor(&[8], 78, 1.0, 0.0, DType::F32)?;
    let y = |r: Result<(Tensor, Tensor)>| message(r.map(|(y, _)| y));
    let cases = [
        (
            y(ops::layer_norm_residual(&x, &r.narrow(1, 0, 7)?, &g, &b, 1e-5)),
            "layernorm-candle layer_norm_residual: shape mismatch for `residual`: expected shape \
             [4, 8], got [4, 7]",
        ),
        (
            // Not broadcast: a residual stream has x's shape.
            y(ops::rms_norm_residual(&x, &g, &g, 1e-6)),
            "layernorm-candle rms_norm_residual: shape mismatch for `residual`: expected shape \
             [4, 8], got [8]",
        ),
        (
            y(ops::rms_norm_residual(&x, &r.to_dtype(DType::F64)?, &g, 1e-6)),
            "dtype mismatch for `residual`: expected F32 (x's), got F64",
        ),
        (
            y(ops::layer_norm_residual(&x, &r, &g, &b.to_dtype(DType::F16)?, 1e-5)),
            "dtype mismatch for `beta`",
        ),
        (
            y(ops::layer_norm_residual(&x, &r, &g, &b.narrow(0, 0, 7)?, 1e-5)),
            "`beta`: expected shape [8], got [7]",
        ),
        (y(ops::layer_norm_residual(&x, &r, &g, &b, -1.0)), "eps must be finite and > 0, got -1"),
        (
            y(ops::rms_norm_residual(&x.to_dtype(DType::U8)?, &r.to_dtype(DType::U8)?, &g, 1e-6)),
            "has dtype U8",
        ),
    ];
    for (msg, want) in cases {
        assert!(msg.starts_with("layernorm-candle "), "{msg}");
        assert!(msg.contains(want), "{msg:?} does not say {want:?}");
    }
    Ok(())
}
