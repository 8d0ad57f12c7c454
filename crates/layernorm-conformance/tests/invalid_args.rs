//! Every input answered (issue 23): random invalid or extreme arguments thrown at every entry
//! point — the host layer over the device-level `Normalize` (`HostNormalize::forward_host`,
//! `backward_host`) and the n-d layer (`NormalizeNd`) — on every backend in
//! `layernorm::REGISTRY` that is available here. Each call must give a typed error or a result
//! that matches the reference; never a panic (caught and shrunk by proptest) or an abort (which
//! kills this test binary: a failure too).
//!
//! - Invalid arguments (wrong lengths and dtypes, missing or extra γ/β/mean/dh/outputs, a γ
//!   offset without γ, N = 0, rows × N past the address space, ε anywhere in the f64 bit
//!   space): the backend must refuse with the error class the core's own validator names.
//!   Tensors are never allocated at the size a huge problem implies: a problem of 2^40 rows is
//!   handed a short (often empty) x, which must be refused before anything is allocated.
//! - Valid but extreme problems (ε from the smallest subnormal to 1.8e308, constant, zero and
//!   1e30-sized rows, every variant, every kind and dtype): run as conformance cases, held to
//!   the reference by the suite's own rules; "unsupported" is an answer, a wrong value is not.
//! - The n-d layer: random shapes with zero-size and 2^40-size dims, wrong `normalized_ndim`,
//!   parameters, residuals, dy, dh and statistics of wrong shapes, huge γ as broadcast views; a
//!   call that succeeds must agree bit for bit with the host layer on the same data.

use layernorm::ndarray::{ArrayD, ArrayViewD, Dimension, IxDyn};
use layernorm::{
    BackwardArgs, DType, Element, ForwardArgs, HostNormalize, HostVec, Norm, NormKind, NormSpec,
    NormalizeNd, Residual, Stats, bf16, validate_backward, validate_forward,
};
use layernorm_conformance::{BackwardFrom, Case, Dist, PoisonValue, ResidualMode, run_case};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};

/// The available backends of the registry.
fn backends() -> Vec<Box<dyn HostNormalize>> {
    let all: Vec<_> = layernorm::REGISTRY.iter().filter_map(|e| e.create().ok()).collect();
    assert!(!all.is_empty(), "no backend is available");
    all
}

/// A fixed seed, so that a run here is the run CI makes; `PROPTEST_RNG_SEED` explores others
/// (a failure found so becomes a named case of the suite).
fn runner(cases: u32) -> TestRunner {
    let rng_seed = match std::env::var_os("PROPTEST_RNG_SEED") {
        Some(_) => Config::default().rng_seed,
        None => RngSeed::Fixed(0x1a7e_2026),
    };
    TestRunner::new(Config { cases, failure_persistence: None, rng_seed, ..Config::default() })
}

/// Runs `test` on every available backend, then fails with every backend's minimal failing
/// input (so one backend's failure does not hide another's).
fn on_every_backend<S: Strategy>(
    cases: u32,
    strategy: S,
    test: impl Fn(&dyn HostNormalize, S::Value) -> Result<(), TestCaseError>,
) {
    let mut failures = Vec::new();
    for b in backends() {
        let b = b.as_ref();
        if let Err(e) = runner(cases).run(&strategy, |v| test(b, v)) {
            failures.push(format!("{}: {e}", b.name()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn kind() -> impl Strategy<Value = NormKind> {
    prop::sample::select(NormKind::ALL.to_vec())
}

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

/// ε from the whole f64 bit space, with the edges named.
fn any_eps() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<u64>().prop_map(f64::from_bits),
        prop::sample::select(vec![
            0.0,
            -0.0,
            f64::from_bits(1),
            f64::MIN_POSITIVE,
            1e-300,
            1e-40,
            1e-5,
            1e300,
            f64::MAX,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            -1e-5,
        ]),
    ]
}

/// A valid ε: any positive finite f64, uniform over its bit patterns (so every binade from the
/// smallest subnormal up is as likely), or a named edge.
fn valid_eps() -> impl Strategy<Value = f64> {
    prop_oneof![
        (1u64..=f64::MAX.to_bits()).prop_map(f64::from_bits),
        prop::sample::select(vec![f64::from_bits(1), 1e-300, 1e-40, 1e-12, 1e-5, 1e300, f64::MAX]),
    ]
}

const HUGE: usize = 1 << 40;

/// A dimension: small, zero, or huge.
fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 1usize..6, 1 => Just(0usize), 1 => Just(HUGE), 1 => Just(usize::MAX / 3)]
}

// ---------------------------------------------------------------------------------------------
// The host layer

/// How one tensor argument deviates from what the problem implies.
#[derive(Clone, Copy, Debug)]
struct Slot {
    /// Present where absent is right, or absent where present is right.
    flip: bool,
    /// Length off by this much (0: right).
    len_off: i8,
    /// Another dtype than the right one.
    dtype: Option<DType>,
}

fn slot() -> impl Strategy<Value = Slot> {
    (
        prop::bool::weighted(0.08),
        prop_oneof![8 => Just(0i8), 1 => -2i8..=2],
        prop::option::weighted(0.06, dtype()),
    )
        .prop_map(|(flip, len_off, dtype)| Slot { flip, len_off, dtype })
}

#[derive(Clone, Debug)]
struct HostCall {
    kind: NormKind,
    dtype: DType,
    rows: usize,
    n: usize,
    eps: f64,
    gamma: bool,
    beta: bool,
    offset: f64,
    backward: bool,
    from_y: bool,
    residual: ResidualMode,
    dh: bool,
    /// One per tensor argument, in the order of `TENSORS`.
    slots: Vec<Slot>,
    seed: u64,
}

/// Every tensor argument of either pass.
const TENSORS: [&str; 12] =
    ["x", "residual", "h", "gamma", "beta", "y", "mean", "rstd", "dy", "dh", "dgamma", "dbeta"];

fn host_call() -> impl Strategy<Value = HostCall> {
    (
        (kind(), dtype(), dim(), dim(), any_eps(), any::<bool>(), any::<bool>()),
        (
            prop_oneof![4 => Just(0.0), 1 => Just(1.0), 1 => Just(f64::NAN), 1 => Just(f64::INFINITY)],
            any::<bool>(),
            any::<bool>(),
            prop::sample::select(vec![ResidualMode::None, ResidualMode::Add, ResidualMode::InPlace]),
            any::<bool>(),
            prop::collection::vec(slot(), TENSORS.len()),
            any::<u64>(),
        ),
    )
        .prop_map(|((kind, dtype, rows, n, eps, gamma, beta), (offset, backward, from_y, residual, dh, slots, seed))| {
            HostCall { kind, dtype, rows, n, eps, gamma, beta, offset, backward, from_y, residual, dh, slots, seed }
        })
}

/// Tensors are never allocated past this many elements: a longer one is handed short.
const CAP: usize = 4096;

impl HostCall {
    fn spec(&self) -> NormSpec {
        NormSpec::new(self.kind, self.rows, self.n, self.dtype)
            .with_eps(self.eps)
            .with_gamma(self.gamma)
            .with_beta(self.beta)
            .with_gamma_offset(self.offset)
    }

    /// The tensor `name` as the call passes it: `right` says whether the problem wants it and
    /// `len` its right length. `None` when absent.
    fn tensor(&self, name: &str, right: bool, len: usize, dtype: DType) -> Option<HostVec> {
        let i = TENSORS.iter().position(|t| *t == name).expect("a known tensor");
        let s = self.slots[i];
        if right == s.flip {
            return None;
        }
        let len = if len > CAP {
            // Deliberately short, never the huge length itself.
            (self.seed as usize ^ i) % 8
        } else {
            (len as i64 + i64::from(s.len_off)).clamp(0, CAP as i64 + 2) as usize
        };
        let dtype = s.dtype.unwrap_or(dtype);
        let values: Vec<f64> = (0..len)
            .map(|k| ((self.seed as usize + k * 7919 + i) % 17) as f64 / 4.0 - 2.0)
            .collect();
        Some(HostVec::from_f64(dtype, &values))
    }
}

/// One host-layer call; `Err` describes what went wrong (for proptest's report).
fn check_host_call(b: &dyn HostNormalize, c: &HostCall) -> Result<(), TestCaseError> {
    let spec = c.spec();
    let (dt, st) = (c.dtype, c.dtype.acc());
    let (numel, rows, n) = (c.rows.saturating_mul(c.n), c.rows, c.n);
    let has_mean = c.kind.has_mean();
    let t = |name, right, len, dtype| c.tensor(name, right, len, dtype);
    let (result, valid) = if !c.backward {
        let x = t("x", true, numel, dt).unwrap_or_else(|| HostVec::zeros(dt, 0));
        let res = t("residual", c.residual == ResidualMode::Add, numel, dt);
        let mut h = t("h", c.residual != ResidualMode::None, numel, dt);
        let (g, bt) = (t("gamma", c.gamma, n, dt), t("beta", c.beta, n, dt));
        let mut y = t("y", true, numel, dt).unwrap_or_else(|| HostVec::zeros(dt, 0));
        let mut mean = t("mean", has_mean, rows, st);
        let mut rstd = t("rstd", true, rows, st).unwrap_or_else(|| HostVec::zeros(st, 0));
        let mut args = ForwardArgs::new(
            x.as_slice(),
            g.as_ref().map(HostVec::as_slice),
            bt.as_ref().map(HostVec::as_slice),
            y.as_mut_slice(),
            mean.as_mut().map(HostVec::as_mut_slice),
            rstd.as_mut_slice(),
        );
        args.residual = match (c.residual, &res, h.as_mut()) {
            (ResidualMode::Add, Some(r), Some(h)) => {
                Some(Residual::Add { residual: r.as_slice(), h: h.as_mut_slice() })
            }
            (ResidualMode::InPlace, _, Some(h)) => Some(Residual::InPlace(h.as_mut_slice())),
            _ => None,
        };
        let valid = validate_forward(&spec, &args);
        (b.forward_host(&spec, args), valid)
    } else {
        let saved = t("x", true, numel, dt).unwrap_or_else(|| HostVec::zeros(dt, 0));
        let dy = t("dy", true, numel, dt).unwrap_or_else(|| HostVec::zeros(dt, 0));
        let dh = t("dh", c.dh, numel, dt);
        let mean = t("mean", has_mean && !c.from_y, rows, st);
        let rstd = t("rstd", true, rows, st).unwrap_or_else(|| HostVec::zeros(st, 0));
        let (g, bt) = (t("gamma", c.gamma, n, dt), t("beta", c.beta && c.from_y, n, dt));
        let mut dx = t("y", true, numel, dt).unwrap_or_else(|| HostVec::zeros(dt, 0));
        let mut dg = t("dgamma", c.gamma, n, dt);
        let mut db = t("dbeta", c.beta, n, dt);
        let mut args = BackwardArgs::new(
            saved.as_slice(),
            dy.as_slice(),
            mean.as_ref().map(HostVec::as_slice),
            rstd.as_slice(),
            g.as_ref().map(HostVec::as_slice),
            dx.as_mut_slice(),
            dg.as_mut().map(HostVec::as_mut_slice),
            db.as_mut().map(HostVec::as_mut_slice),
        )
        .with_beta(bt.as_ref().map(HostVec::as_slice));
        if c.from_y {
            args = args.from_output(saved.as_slice(), bt.as_ref().map(HostVec::as_slice));
        }
        if let Some(dh) = &dh {
            args = args.with_dh(dh.as_slice());
        }
        let valid = validate_backward(&spec, &args);
        (b.backward_host(&spec, args), valid)
    };
    match (valid, result) {
        // Refused, and for the reason the core's validator gives first.
        (Err(want), Err(got)) => prop_assert_eq!(
            got.class(),
            want.class(),
            "{}: refused {:?}, the validator says {:?}",
            b.name(),
            got,
            want
        ),
        (Err(want), Ok(())) => {
            prop_assert!(false, "{}: accepted invalid arguments ({want})", b.name())
        }
        // Valid arguments: any typed answer (results are held to the reference below, and by
        // the conformance suite).
        (Ok(()), _) => {}
    }
    Ok(())
}

#[test]
fn invalid_arguments_get_the_validators_typed_error_on_every_backend() {
    on_every_backend(256, host_call(), |b, c| check_host_call(b, &c));
}

#[test]
fn the_huge_problems_of_issue_23_are_refused_before_allocating() {
    // rows = 2^40 with an empty x (forward), rows = 0 with N = 2^40 (backward, with and without
    // γ): the first must be a typed error, the second is a valid empty problem, the third has a
    // γ of the wrong length.
    for b in backends() {
        let b = b.as_ref();
        for dtype in DType::ALL {
            let spec = NormSpec::layer_norm(HUGE, 1, dtype).with_affine(false);
            let (e, st) = (HostVec::zeros(dtype, 0), HostVec::zeros(dtype.acc(), 0));
            let (mut y, mut m, mut r) = (e.clone(), st.clone(), st.clone());
            let args = ForwardArgs::new(
                e.as_slice(),
                None,
                None,
                y.as_mut_slice(),
                Some(m.as_mut_slice()),
                r.as_mut_slice(),
            );
            let err = b.forward_host(&spec, args).expect_err("rows = 2^40 with an empty x");
            assert_eq!(err.class(), "shape", "{}: {err}", b.name());

            let spec = NormSpec::rms_norm(0, HUGE, dtype).with_gamma(false);
            let mut dx = e.clone();
            let args = BackwardArgs::new(
                e.as_slice(),
                e.as_slice(),
                None,
                st.as_slice(),
                None,
                dx.as_mut_slice(),
                None,
                None,
            );
            match b.backward_host(&spec, args) {
                Ok(()) => {}
                Err(err) => assert!(
                    err.class().starts_with("unsupported") || err.class() == "out-of-memory",
                    "{}: an empty problem refused with {err}",
                    b.name()
                ),
            }
            let spec = spec.with_gamma(true);
            let short = HostVec::zeros(dtype, 3);
            let args = BackwardArgs::new(
                e.as_slice(),
                e.as_slice(),
                None,
                st.as_slice(),
                Some(short.as_slice()),
                dx.as_mut_slice(),
                None,
                None,
            );
            let err = b.backward_host(&spec, args).expect_err("γ of 3 for N = 2^40");
            assert_eq!(err.class(), "shape", "{}: {err}", b.name());
        }
        // The n-d layer: [2^40, 0] has N = 0; [0, 2^40] is a valid empty problem, forward and
        // backward (a typed refusal is an answer too, an abort is not).
        let norm = Norm::layer_norm();
        let x = ArrayD::<f32>::zeros(IxDyn(&[HUGE, 0]));
        let err = b.forward_nd(norm, x.view()).run().expect_err("N = 0");
        assert_eq!(err.class(), "empty", "{}: {err}", b.name());
        let x = ArrayD::<f32>::zeros(IxDyn(&[0, HUGE]));
        let stat = ArrayD::<f32>::zeros(IxDyn(&[0]));
        let answered = |r: layernorm::Result<()>| match r {
            Ok(()) => {}
            Err(e) => assert!(
                e.class().starts_with("unsupported") || e.class() == "out-of-memory",
                "{}: an empty problem refused with {e}",
                b.name()
            ),
        };
        answered(b.forward_nd(norm, x.view()).run().map(|o| assert_eq!(o.y.shape(), x.shape())));
        let stats = Stats::new(stat.view()).with_mean(stat.view());
        answered(b.backward_nd(norm, x.view(), x.view(), stats).run().map(|_| ()));
        answered(
            b.backward_nd_from_output(norm, x.view(), x.view(), Stats::new(stat.view()))
                .run()
                .map(|_| ()),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Valid but extreme problems, held to the reference

fn extreme_case() -> impl Strategy<Value = (Case, NormKind, DType)> {
    (
        (
            0usize..5,
            1usize..40,
            prop::sample::select(vec![
                Dist::Normal,
                Dist::Constant,
                Dist::Zero,
                Dist::Large,
                Dist::MixedSigns,
                Dist::MixedScale,
            ]),
        ),
        (
            prop::sample::select(vec![0.0, 1.0, -3.0, 1e4, -1e6, 1e30]),
            prop::sample::select(vec![1.0, 1e-6, 1e3, 1e30]),
            valid_eps(),
            any::<bool>(),
            any::<bool>(),
            prop::sample::select(vec![0.0, 1.0]),
        ),
        (
            prop::sample::select(vec![
                ResidualMode::None,
                ResidualMode::Add,
                ResidualMode::InPlace,
            ]),
            prop::sample::select(vec![BackwardFrom::X, BackwardFrom::Y]),
            any::<bool>(),
            any::<u32>(),
        ),
        kind(),
        dtype(),
    )
        .prop_map(
            |(
                (rows, n, dist),
                (mean, std, eps, gamma, beta, offset),
                (residual, from, dh, id),
                kind,
                dtype,
            )| {
                let case = Case {
                    name: format!("extreme_{id}"),
                    rows,
                    n,
                    dist,
                    mean,
                    std,
                    gamma,
                    beta,
                    gamma_mean: if gamma && offset == 1.0 { 0.0 } else { 1.0 },
                    gamma_std: 0.1,
                    beta_std: 0.1,
                    gamma_offset: if gamma { offset } else { 0.0 },
                    singular_column: None,
                    eps: Some(eps),
                    residual,
                    residual_std: 1.0,
                    backward_from: from,
                    dh: dh && residual != ResidualMode::None,
                    poison: None,
                    poison_value: PoisonValue::Nan,
                    kinds: None,
                    dtypes: None,
                };
                (case, kind, dtype)
            },
        )
}

#[test]
fn valid_extreme_problems_match_the_reference_on_every_backend() {
    on_every_backend(96, extreme_case(), |b, (case, kind, dtype)| {
        for o in run_case(b, &case, kind, dtype) {
            prop_assert!(
                !o.failed(),
                "{:?}\n{}",
                case,
                layernorm_conformance::render_table(std::slice::from_ref(&o))
            );
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// The n-d layer

/// A shape an ndarray can have: the product of its non-zero dims fits in `isize` (with room
/// for the wrong shapes derived from it). Dims are small, zero or 2^40.
fn nd_shape() -> impl Strategy<Value = Vec<usize>> {
    let dim = prop_oneof![4 => 1usize..6, 1 => Just(0usize), 1 => Just(HUGE)];
    prop::collection::vec(dim, 1..4).prop_filter("ndarray can hold the shape", |s| {
        s.iter()
            .filter(|&&d| d > 0)
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .is_some_and(|p| p <= (isize::MAX as usize) / 4)
    })
}

#[derive(Clone, Debug)]
struct NdCall {
    kind: NormKind,
    shape: Vec<usize>,
    normalized_ndim: usize,
    eps: f64,
    offset: f64,
    /// γ, β: absent, the right shape, or the wrong one.
    gamma: u8,
    beta: u8,
    /// 0 none, 1 added, 2 in place; the residual's shape right or not.
    residual: u8,
    residual_right: bool,
    backward: bool,
    from_y: bool,
    dy_right: bool,
    /// 0 none, 1 right shape, 2 wrong.
    dh: u8,
    /// The statistics: right shape or not; the mean passed or not.
    stats_right: bool,
    with_mean: bool,
    dtype16: bool,
}

fn nd_call() -> impl Strategy<Value = NdCall> {
    (
        (kind(), nd_shape(), 0usize..5, prop_oneof![3 => Just(1e-5), 1 => any_eps()]),
        (
            prop_oneof![4 => Just(0.0), 1 => Just(1.0), 1 => Just(f64::NAN)],
            0u8..3,
            0u8..3,
            0u8..3,
            prop::bool::weighted(0.8),
        ),
        (
            any::<bool>(),
            any::<bool>(),
            prop::bool::weighted(0.85),
            0u8..3,
            prop::bool::weighted(0.85),
            any::<bool>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (kind, shape, nd, eps),
                (offset, gamma, beta, residual, residual_right),
                (backward, from_y, dy_right, dh, stats_right, with_mean, dtype16),
            )| NdCall {
                kind,
                shape,
                normalized_ndim: if nd == 4 { 0 } else { nd.max(1) },
                eps,
                offset,
                gamma,
                beta,
                residual,
                residual_right,
                backward,
                from_y,
                dy_right,
                dh,
                stats_right,
                with_mean,
                dtype16,
            },
        )
}

/// An array of `shape`: real values when small, else one value broadcast (a view needs no
/// memory, so a 2^40-element γ can be passed).
struct Tensor<T> {
    owned: ArrayD<T>,
    shape: Vec<usize>,
}

impl<T: Element> Tensor<T> {
    fn new(shape: &[usize], salt: usize) -> Tensor<T> {
        let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let owned = match count {
            Some(c) if c <= CAP => ArrayD::from_shape_fn(IxDyn(shape), |i| {
                let k = i.as_array_view().iter().fold(salt, |a, &d| a * 31 + d);
                T::from_f64((k % 13) as f64 / 3.0 - 2.0)
            }),
            _ => ArrayD::from_elem(IxDyn(&[]), T::from_f64(0.5)),
        };
        Tensor { owned, shape: shape.to_vec() }
    }

    /// Whether the tensor is real memory of its shape (not a broadcast scalar).
    fn real(&self) -> bool {
        self.owned.shape() == &self.shape[..]
    }

    fn view(&self) -> ArrayViewD<'_, T> {
        if self.real() {
            self.owned.view()
        } else {
            self.owned.broadcast(IxDyn(&self.shape)).expect("a scalar broadcasts to any shape")
        }
    }
}

/// `shape` with its last dim changed (or a dim added): the wrong shape for a tensor.
fn wrong(shape: &[usize]) -> Vec<usize> {
    let mut s = shape.to_vec();
    match s.last_mut() {
        Some(d) => *d = if *d == 2 { 3 } else { 2 },
        None => s.push(2),
    }
    s
}

fn nd_check<T: Element>(b: &dyn HostNormalize, c: &NdCall) -> Result<(), TestCaseError> {
    let norm =
        Norm::new(c.kind).eps(c.eps).normalized_ndim(c.normalized_ndim).gamma_offset(c.offset);
    let k = c.normalized_ndim.min(c.shape.len());
    let (lead, tail) = c.shape.split_at(c.shape.len() - k);
    let shape_of = |which: u8, right: &[usize]| match which {
        1 => Some(right.to_vec()),
        2 => Some(wrong(right)),
        _ => None,
    };
    let x = Tensor::<T>::new(&c.shape, 1);
    let gamma = shape_of(c.gamma, tail).map(|s| Tensor::<T>::new(&s, 2));
    let beta = shape_of(c.beta, tail).map(|s| Tensor::<T>::new(&s, 3));
    let res_shape = if c.residual_right { c.shape.clone() } else { wrong(&c.shape) };
    let residual = (c.residual > 0).then(|| Tensor::<T>::new(&res_shape, 4));
    if !c.backward {
        // A broadcast γ/β beside an empty x (rows = 0, N = 2^40) stands for 2^40 elements: the
        // copy it needs is `OutOfMemory`, held by `a_huge_broadcast_gamma_of_an_empty_problem_is_answered`.
        let (gamma, beta) = match x.real() {
            true => (gamma.filter(Tensor::real), beta.filter(Tensor::real)),
            false => (gamma, beta),
        };
        // A residual written in place must be real memory: a huge one is not passed in place.
        let mut in_place = residual.as_ref().filter(|r| r.real()).map(|r| r.owned.clone());
        let mut call = b.forward_nd(norm, x.view());
        if let Some(g) = &gamma {
            call = call.gamma(g.view());
        }
        if let Some(bt) = &beta {
            call = call.beta(bt.view());
        }
        match (c.residual, &residual, in_place.as_mut()) {
            (1, Some(r), _) => call = call.residual(r.view()),
            (2, _, Some(r)) => call = call.residual_in_place(r.view_mut()),
            _ => {}
        }
        let all_real = x.real()
            && [&gamma, &beta, &residual].iter().all(|t| t.as_ref().is_none_or(Tensor::real));
        match call.run() {
            Err(_) => {}
            // Compared only where every input is real memory (a broadcast 2^40-element γ of
            // an empty problem succeeds, and is not copied here).
            Ok(_) if !all_real => {}
            Ok(out) => {
                // Agrees with the host layer on the same data, bit for bit.
                let spec_n: usize = tail.iter().product();
                let rows: usize = lead.iter().product();
                let spec = NormSpec::new(c.kind, rows, spec_n, T::DTYPE)
                    .with_eps(c.eps)
                    .with_gamma(gamma.is_some())
                    .with_beta(beta.is_some())
                    .with_gamma_offset(c.offset);
                let xs: Vec<T> = x.view().iter().copied().collect();
                let gs: Option<Vec<T>> = gamma.as_ref().map(|g| g.view().iter().copied().collect());
                let bs: Option<Vec<T>> = beta.as_ref().map(|g| g.view().iter().copied().collect());
                let rs: Option<Vec<T>> =
                    residual.as_ref().map(|g| g.view().iter().copied().collect());
                let mut y = HostVec::zeros(T::DTYPE, xs.len());
                let mut h = HostVec::zeros(T::DTYPE, xs.len());
                let mut mean = c.kind.has_mean().then(|| HostVec::zeros(T::DTYPE.acc(), rows));
                let mut rstd = HostVec::zeros(T::DTYPE.acc(), rows);
                let mut args = ForwardArgs::new(
                    T::host(&xs),
                    gs.as_deref().map(T::host),
                    bs.as_deref().map(T::host),
                    y.as_mut_slice(),
                    mean.as_mut().map(HostVec::as_mut_slice),
                    rstd.as_mut_slice(),
                );
                if let Some(r) = rs.as_deref() {
                    args = args
                        .with_residual(Residual::Add { residual: T::host(r), h: h.as_mut_slice() });
                }
                b.forward_host(&spec, args).map_err(|e| {
                    TestCaseError::fail(format!(
                        "{}: the n-d call succeeded, the host layer says {e}",
                        b.name()
                    ))
                })?;
                let got: Vec<T> = out.y.iter().copied().collect();
                prop_assert!(
                    T::host(&got).as_bytes() == y.as_slice().as_bytes(),
                    "{}: y differs from the host layer",
                    b.name()
                );
                let got_h: Option<Vec<T>> = match (&out.h, in_place.as_ref()) {
                    (Some(h), _) => Some(h.iter().copied().collect()),
                    (None, Some(r)) if c.residual == 2 => Some(r.iter().copied().collect()),
                    _ => None,
                };
                if let Some(gh) = got_h {
                    prop_assert!(
                        T::host(&gh).as_bytes() == h.as_slice().as_bytes(),
                        "{}: h differs from the host layer",
                        b.name()
                    );
                }
            }
        }
        return Ok(());
    }
    let dy_shape = if c.dy_right { c.shape.clone() } else { wrong(&c.shape) };
    let dy = Tensor::<T>::new(&dy_shape, 5);
    let stat_shape = if c.stats_right { lead.to_vec() } else { wrong(lead) };
    let rstd = Tensor::<T::Acc>::new(&stat_shape, 6);
    let mean = Tensor::<T::Acc>::new(&stat_shape, 7);
    let dh = shape_of(c.dh, &c.shape).map(|s| Tensor::<T>::new(&s, 8));
    let mut stats = Stats::new(rstd.view());
    if c.with_mean {
        stats = stats.with_mean(mean.view());
    }
    let mut call = match c.from_y {
        false => b.backward_nd(norm, x.view(), dy.view(), stats),
        true => b.backward_nd_from_output(norm, x.view(), dy.view(), stats),
    };
    if let Some(g) = &gamma {
        call = call.gamma(g.view());
    }
    if let Some(bt) = &beta {
        call = call.beta(bt.view());
    }
    if let Some(d) = &dh {
        call = call.dh(d.view());
    }
    // Any typed answer; a success must have dx of x's shape.
    if let Ok(g) = call.run() {
        prop_assert_eq!(g.dx.shape(), &c.shape[..]);
    }
    Ok(())
}

#[test]
fn the_nd_layer_answers_every_shape_on_every_backend() {
    on_every_backend(256, nd_call(), |b, c| match c.dtype16 {
        true => nd_check::<bf16>(b, &c),
        false => nd_check::<f32>(b, &c),
    });
}

#[test]
fn a_huge_broadcast_gamma_of_an_empty_problem_is_answered() {
    let one = layernorm::ndarray::arr0(1.0f32);
    let gamma = one.broadcast(HUGE).expect("a scalar broadcasts");
    let x = ArrayD::<f32>::zeros(IxDyn(&[0, HUGE]));
    for b in backends() {
        match b.forward_nd(Norm::layer_norm(), x.view()).gamma(gamma.view()).run() {
            Ok(out) => assert_eq!(out.y.shape(), &[0, HUGE]),
            Err(e) => assert_eq!(e.class(), "out-of-memory", "{}: {e}", b.name()),
        }
    }
}
