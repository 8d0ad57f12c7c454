//! The cases, as data (`cases.toml`), and the deterministic inputs each one generates.
//!
//! A case is a shape, a distribution of x, the parameters (γ, β, ε, the γ offset) and the
//! variants of the family it exercises (a fused residual, added or in place; the backward from
//! x or from y; dh; a poisoned tensor). Every case runs for every kind it names (both by default)
//! and every dtype it names (all by default).

use layernorm::{DType, HostVec, NormKind, NormSpec};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::Deserialize;

/// The case file, compiled in so the suite needs no files at run time.
pub const CASES_TOML: &str = include_str!("../cases.toml");

/// How a case's x is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dist {
    /// `mean + std · N(0, 1)`.
    Normal,
    /// Each row one value, `mean + std · N(0, 1)` drawn per row (rounded to f32, in every dtype).
    Constant,
    /// Every element 0.
    Zero,
    /// Uniform in ±M with M = 1e30 (f32, bf16, f64) or 6e4 (near the f16 maximum).
    Large,
    /// `(−1)^j · (1000 + N(0, 1))`: mean ≈ 0 by cancellation, std ≈ 1000.
    MixedSigns,
    /// Row r is `10^(r mod 7 − 3) · N(0, 1)`.
    MixedScale,
    /// Standard normal, with a NaN in row 1 and a +∞ in row 3 (when those rows exist).
    Nonfinite,
}

/// How the forward adds a residual (`docs/math.md` (14)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ResidualMode {
    /// No residual: y = norm(x).
    #[default]
    None,
    /// h = x + residual written to its own output.
    Add,
    /// h = x + residual written over the residual.
    InPlace,
}

/// What the backward recovers x̂ from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BackwardFrom {
    /// The forward's input (x, or h with a residual) and its saved statistics.
    #[default]
    X,
    /// The forward's output y (`docs/math.md` (16)).
    Y,
}

/// Which tensor a poisoned case spoils, in one element (x, dy) or one entry (mean, rstd) of row
/// [`POISON_ROW`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoisonTensor {
    /// The input x.
    X,
    /// The loss gradient dy.
    Dy,
    /// The saved mean the backward is given (LayerNorm).
    Mean,
    /// The saved rstd the backward is given.
    Rstd,
}

/// The value a poisoned case puts there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PoisonValue {
    /// NaN.
    #[default]
    Nan,
    /// +∞.
    Inf,
    /// −∞.
    NegInf,
}

impl PoisonValue {
    /// The value.
    pub fn value(self) -> f64 {
        match self {
            PoisonValue::Nan => f64::NAN,
            PoisonValue::Inf => f64::INFINITY,
            PoisonValue::NegInf => f64::NEG_INFINITY,
        }
    }
}

/// The row a poisoned case spoils (row 0 when the case has one row).
pub const POISON_ROW: usize = 1;

fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}
fn tenth() -> f64 {
    0.1
}

/// One conformance case.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// Unique name; also seeds the generator.
    pub name: String,
    /// Rows.
    pub rows: usize,
    /// Normalized size N.
    pub n: usize,
    /// Distribution of x.
    pub dist: Dist,
    /// Mean for `normal` / `constant`.
    #[serde(default)]
    pub mean: f64,
    /// Standard deviation for `normal` / `constant`.
    #[serde(default = "one")]
    pub std: f64,
    /// Whether γ is present.
    #[serde(default = "yes")]
    pub gamma: bool,
    /// Whether β is present.
    #[serde(default = "yes")]
    pub beta: bool,
    /// γ is `gamma_mean + gamma_std · N(0, 1)` per column (default 1 ± 0.1; a case with a γ
    /// offset of 1 draws γ around 0, as a zero-centred γ is stored).
    #[serde(default = "one")]
    pub gamma_mean: f64,
    /// See [`Case::gamma_mean`].
    #[serde(default = "tenth")]
    pub gamma_std: f64,
    /// β is `beta_std · N(0, 1)` per column.
    #[serde(default = "tenth")]
    pub beta_std: f64,
    /// The γ offset: y = x̂·(offset + γ) + β.
    #[serde(default)]
    pub gamma_offset: f64,
    /// A column whose γ is set to −offset, so that offset + γ = 0 there: the backward from y
    /// must refuse it (`singular-gamma`), from x it is an ordinary column.
    #[serde(default)]
    pub singular_column: Option<usize>,
    /// ε; the kind's default ([`NormKind::default_eps`]) when absent.
    #[serde(default)]
    pub eps: Option<f64>,
    /// The fused residual add, if any. The residual is `N(0, residual_std²)`.
    #[serde(default)]
    pub residual: ResidualMode,
    /// Standard deviation of the residual.
    #[serde(default = "one")]
    pub residual_std: f64,
    /// What the backward recovers x̂ from.
    #[serde(default)]
    pub backward_from: BackwardFrom,
    /// Whether the backward is given dh, the residual stream's gradient (`N(0, 1)`).
    #[serde(default)]
    pub dh: bool,
    /// A tensor with one non-finite entry in row [`POISON_ROW`]: that row must come out
    /// non-finite, every other row exactly as without the poison.
    #[serde(default)]
    pub poison: Option<PoisonTensor>,
    /// The poison's value.
    #[serde(default)]
    pub poison_value: PoisonValue,
    /// Kinds this case applies to (names); both when absent.
    #[serde(default)]
    pub kinds: Option<Vec<String>>,
    /// Dtypes this case applies to (names); all when absent.
    #[serde(default)]
    pub dtypes: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    case: Vec<Case>,
}

/// Parses cases from TOML text, checking names are unique, dtypes and kinds are known, and the
/// variant fields are consistent.
pub fn parse_cases(text: &str) -> Result<Vec<Case>, String> {
    let file: CaseFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut seen = std::collections::BTreeSet::new();
    for c in &file.case {
        let bad = |what: String| Err(format!("case `{}`: {what}", c.name));
        if !seen.insert(c.name.clone()) {
            return Err(format!("duplicate case name `{}`", c.name));
        }
        for d in c.dtypes.iter().flatten() {
            if DType::from_name(d).is_none() {
                return bad(format!("unknown dtype `{d}`"));
            }
        }
        for k in c.kinds.iter().flatten() {
            if NormKind::from_name(k).is_none() {
                return bad(format!("unknown kind `{k}`"));
            }
        }
        if c.singular_column.is_some_and(|j| j >= c.n || !c.gamma) {
            return bad("`singular_column` needs γ and a column below n".into());
        }
        if c.gamma_offset != 0.0 && !c.gamma {
            return bad("`gamma_offset` needs γ".into());
        }
        if c.dh && c.residual == ResidualMode::None {
            return bad("`dh` is the gradient of a residual stream: it needs `residual`".into());
        }
        if c.poison.is_some() && c.rows < 2 {
            return bad("a poisoned case needs a second row to stay clean".into());
        }
        if c.poison == Some(PoisonTensor::Mean)
            && c.kinds.as_ref().is_none_or(|k| k.iter().any(|k| k == "rms_norm"))
        {
            return bad("only LayerNorm has a mean to poison: set `kinds`".into());
        }
    }
    Ok(file.case)
}

/// The built-in cases of `cases.toml`.
pub fn cases() -> Vec<Case> {
    // The file is compiled in and checked by a test, so failing here is a build defect.
    parse_cases(CASES_TOML).unwrap_or_else(|e| panic!("cases.toml is invalid: {e}"))
}

/// The inputs of one case in one kind and dtype: already rounded to the dtype (`HostVec`); the
/// reference sees the same values widened back to `f64` (`x64`, `dy64`, kept because the
/// reference reads them in every case).
#[derive(Clone, Debug)]
pub struct Inputs {
    /// The problem.
    pub spec: NormSpec,
    /// x in storage dtype.
    pub x: HostVec,
    /// x, the same values in `f64`.
    pub x64: Vec<f64>,
    /// The residual (for a residual case) in storage dtype.
    pub residual: Option<HostVec>,
    /// γ in storage dtype.
    pub gamma: Option<HostVec>,
    /// β in storage dtype.
    pub beta: Option<HostVec>,
    /// dy in storage dtype.
    pub dy: HostVec,
    /// dy, the same values in `f64`.
    pub dy64: Vec<f64>,
    /// dh (when the case has it) in storage dtype.
    pub dh: Option<HostVec>,
}

fn seed(name: &str) -> u64 {
    // FNV-1a: stable across platforms and Rust versions.
    name.bytes()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl Case {
    /// Whether the case runs in `dtype`.
    pub fn applies_to(&self, dtype: DType) -> bool {
        self.dtypes.as_ref().is_none_or(|ds| ds.iter().any(|d| d == dtype.name()))
    }

    /// Whether the case runs for `kind`.
    pub fn applies_to_kind(&self, kind: NormKind) -> bool {
        self.kinds.as_ref().is_none_or(|ks| ks.iter().any(|k| k == kind.name()))
    }

    /// The row a poison goes in.
    pub fn poison_row(&self) -> usize {
        POISON_ROW.min(self.rows.saturating_sub(1))
    }

    /// The problem description for `kind` in `dtype`.
    pub fn spec(&self, kind: NormKind, dtype: DType) -> NormSpec {
        NormSpec::new(kind, self.rows, self.n, dtype)
            .with_eps(self.eps.unwrap_or(kind.default_eps()))
            .with_gamma(self.gamma)
            .with_beta(self.beta)
            .with_gamma_offset(self.gamma_offset)
    }

    /// Deterministic inputs for `kind` in `dtype`: the same draws for every kind and dtype, then
    /// rounded. The draws come in a fixed order (x, γ, β, dy, then the residual and dh), so a
    /// case without a residual or dh draws what it drew before those existed.
    pub fn inputs(&self, kind: NormKind, dtype: DType) -> Inputs {
        let mut rng = SmallRng::seed_from_u64(seed(&self.name));
        let (rows, n) = (self.rows, self.n);
        let z = |rng: &mut SmallRng| -> f64 { rng.sample(StandardNormal) };
        let mut x = vec![0.0; rows * n];
        for r in 0..rows {
            let row = &mut x[r * n..(r + 1) * n];
            match self.dist {
                Dist::Normal => {
                    row.iter_mut().for_each(|v| *v = self.mean + self.std * z(&mut rng))
                }
                // The value is one an f32 holds, so that N copies of it sum exactly in f64 and
                // the reference's mean is the value itself (a 53-bit value's compensated sum
                // can round an ulp away, and at ε ≪ ulp² the reference's rstd with it).
                Dist::Constant => row.fill(DType::F32.round(self.mean + self.std * z(&mut rng))),
                Dist::Zero => row.fill(0.0),
                Dist::Large => {
                    let m = if dtype == DType::F16 { 6e4 } else { 1e30 };
                    row.iter_mut().for_each(|v| *v = m * rng.random_range(-1.0..=1.0));
                }
                Dist::MixedSigns => row.iter_mut().enumerate().for_each(|(j, v)| {
                    *v = if j % 2 == 0 { 1.0 } else { -1.0 } * (1e3 + z(&mut rng))
                }),
                Dist::MixedScale => {
                    let s = 10f64.powi((r % 7) as i32 - 3);
                    row.iter_mut().for_each(|v| *v = s * z(&mut rng));
                }
                Dist::Nonfinite => {
                    row.iter_mut().for_each(|v| *v = z(&mut rng));
                    if r == 1 {
                        row[0] = f64::NAN;
                    }
                    if r == 3 {
                        row[n - 1] = f64::INFINITY;
                    }
                }
            }
        }
        let mut gamma: Vec<f64> =
            (0..n).map(|_| self.gamma_mean + self.gamma_std * z(&mut rng)).collect();
        if let Some(j) = self.singular_column {
            gamma[j] = -self.gamma_offset;
        }
        let beta: Vec<f64> = (0..n).map(|_| self.beta_std * z(&mut rng)).collect();
        let mut dy: Vec<f64> = (0..rows * n).map(|_| z(&mut rng)).collect();
        let residual = (self.residual != ResidualMode::None)
            .then(|| (0..rows * n).map(|_| self.residual_std * z(&mut rng)).collect::<Vec<f64>>());
        let dh = self.dh.then(|| (0..rows * n).map(|_| z(&mut rng)).collect::<Vec<f64>>());
        let at = self.poison_row() * n + n / 2;
        match self.poison {
            Some(PoisonTensor::X) => x[at] = self.poison_value.value(),
            Some(PoisonTensor::Dy) => dy[at] = self.poison_value.value(),
            // The statistics are poisoned by the runner, in what the forward returned.
            Some(PoisonTensor::Mean | PoisonTensor::Rstd) | None => {}
        }
        let vec = |v: &[f64]| HostVec::from_f64(dtype, v);
        x.iter_mut().chain(dy.iter_mut()).for_each(|v| *v = dtype.round(*v));
        Inputs {
            spec: self.spec(kind, dtype),
            x: vec(&x),
            x64: x,
            residual: residual.as_deref().map(vec),
            gamma: self.gamma.then(|| vec(&gamma)),
            beta: self.beta.then(|| vec(&beta)),
            dy: vec(&dy),
            dy64: dy,
            dh: dh.as_deref().map(vec),
        }
    }

    /// The same case without its poison: what the rows the poison does not reach must equal.
    pub fn without_poison(&self) -> Case {
        Case { poison: None, ..self.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_case_file_parses_and_covers_the_required_shapes() {
        let cases = parse_cases(CASES_TOML).unwrap();
        let has = |f: &dyn Fn(&Case) -> bool| cases.iter().any(f);
        assert!(has(&|c| c.rows == 1 && c.n == 1));
        assert!(has(&|c| c.n == 1 && c.rows > 1));
        assert!(has(&|c| c.n == 3));
        for n in [768, 1024, 4096, 65536] {
            assert!(has(&|c| c.n == n), "N = {n}");
        }
        assert!(has(&|c| c.n % 2 == 1 && c.n > 1000));
        assert!(has(&|c| c.rows >= 10_000));
        assert!(has(&|c| c.rows == 0));
        assert!(has(&|c| c.mean.abs() >= 1e4 * c.std));
        assert!(has(&|c| c.dist == Dist::Constant));
        assert!(has(&|c| c.dist == Dist::Large));
        assert!(has(&|c| c.dist == Dist::MixedSigns));
        assert!(has(&|c| !c.gamma && !c.beta));
        assert!(has(&|c| c.gamma && !c.beta));
        assert!(has(&|c| c.eps == Some(1e-12)));
    }

    #[test]
    fn the_case_file_covers_the_family() {
        let cases = parse_cases(CASES_TOML).unwrap();
        let has = |f: &dyn Fn(&Case) -> bool| cases.iter().any(f);
        let rms_only = |c: &Case| c.kinds.as_deref() == Some(&["rms_norm".to_string()][..]);
        // RMSNorm's own hazards (issue 24).
        assert!(has(&|c| rms_only(c) && c.dist == Dist::Zero));
        assert!(has(&|c| rms_only(c) && c.mean.abs() >= 1e30));
        assert!(has(&|c| rms_only(c)
            && c.dtypes.as_deref() == Some(&["f16".to_string()][..])
            && c.mean.abs() > 256.0));
        assert!(has(&|c| c.gamma_offset == 1.0 && c.kinds.is_none()));
        // Every variant, for both kinds (issue 25).
        for mode in [ResidualMode::Add, ResidualMode::InPlace] {
            for from in [BackwardFrom::X, BackwardFrom::Y] {
                for dh in [false, true] {
                    assert!(
                        has(&|c| c.residual == mode
                            && c.backward_from == from
                            && c.dh == dh
                            && c.kinds.is_none()),
                        "{mode:?} from {from:?} dh {dh}"
                    );
                }
            }
        }
        assert!(has(&|c| c.residual == ResidualMode::None && c.backward_from == BackwardFrom::Y));
        assert!(has(&|c| c.n == 4096
            && c.residual == ResidualMode::InPlace
            && c.dh
            && c.dtypes.as_deref() == Some(&["bf16".to_string()][..])));
        for from in [BackwardFrom::X, BackwardFrom::Y] {
            assert!(has(&|c| c.singular_column.is_some()
                && c.gamma_offset == 1.0
                && c.backward_from == from));
        }
        // Extreme ε and long rows (issue 23).
        assert!(has(&|c| c.eps.is_some_and(|e| e < f64::MIN_POSITIVE)));
        assert!(has(&|c| c.eps == Some(1e-300) && c.dist == Dist::Constant));
        assert!(has(&|c| c.eps == Some(1e300)));
        let long = |d: &str| {
            has(&|c| {
                c.rows * c.n >= 1 << 24
                    && c.n >= 1 << 24
                    && c.mean.abs() >= 100.0 * c.std
                    && c.dtypes.as_ref().is_some_and(|ds| ds.iter().any(|x| x == d))
            })
        };
        assert!(long("f32") && long("bf16"));
        for t in [PoisonTensor::X, PoisonTensor::Dy, PoisonTensor::Mean, PoisonTensor::Rstd] {
            assert!(has(&|c| c.poison == Some(t)), "poison {t:?}");
        }
    }

    #[test]
    fn bad_case_files_are_rejected_with_a_reason() {
        let dup = "[[case]]\nname='a'\nrows=1\nn=1\ndist='normal'\n".repeat(2);
        assert!(parse_cases(&dup).unwrap_err().contains("duplicate"));
        let bad = "[[case]]\nname='a'\nrows=1\nn=1\ndist='normal'\ndtypes=['f8']\n";
        assert!(parse_cases(bad).unwrap_err().contains("f8"));
        let typo = "[[case]]\nname='a'\nrows=1\nn=1\ndist='normal'\nepsilon=1\n";
        assert!(parse_cases(typo).unwrap_err().contains("epsilon"));
        let kind = "[[case]]\nname='a'\nrows=1\nn=1\ndist='normal'\nkinds=['batch_norm']\n";
        assert!(parse_cases(kind).unwrap_err().contains("batch_norm"));
        let dh = "[[case]]\nname='a'\nrows=1\nn=1\ndist='normal'\ndh=true\n";
        assert!(parse_cases(dh).unwrap_err().contains("residual"));
        let mean = "[[case]]\nname='a'\nrows=2\nn=1\ndist='normal'\npoison='mean'\n";
        assert!(parse_cases(mean).unwrap_err().contains("LayerNorm"));
        let col = "[[case]]\nname='a'\nrows=1\nn=2\ndist='normal'\nsingular_column=2\n";
        assert!(parse_cases(col).unwrap_err().contains("singular_column"));
    }

    #[test]
    fn inputs_are_deterministic_and_rounded_to_the_dtype() {
        let c = &cases()[3];
        let a = c.inputs(NormKind::LayerNorm, DType::BF16);
        let b = c.inputs(NormKind::RmsNorm, DType::BF16);
        assert_eq!(a.x, b.x);
        assert_eq!(a.x.dtype(), DType::BF16);
        let wide = c.inputs(NormKind::LayerNorm, DType::F64).x64;
        assert!(wide.iter().zip(&a.x64).any(|(w, n)| w != n));
        assert_eq!(a.x64, a.x.to_f64_vec());
        assert_eq!(a.dy64, a.dy.to_f64_vec());
        assert_eq!(b.spec.eps, NormKind::RmsNorm.default_eps());
    }

    #[test]
    fn a_singular_column_cancels_the_offset_and_poison_lands_in_its_row() {
        let text = "[[case]]\nname='s'\nrows=3\nn=4\ndist='normal'\ngamma_offset=1.0\n\
                    gamma_mean=0.0\nsingular_column=2\npoison='x'\n";
        let c = &parse_cases(text).unwrap()[0];
        let inp = c.inputs(NormKind::RmsNorm, DType::F32);
        let g = inp.gamma.as_ref().unwrap().to_f64_vec();
        assert_eq!(g[2], -1.0);
        let x = &inp.x64;
        let bad: Vec<usize> = (0..x.len()).filter(|&i| x[i].is_nan()).collect();
        assert_eq!(bad, vec![POISON_ROW * 4 + 2]);
        assert!(c.without_poison().inputs(NormKind::RmsNorm, DType::F32).x64[6].is_finite());
    }
}
