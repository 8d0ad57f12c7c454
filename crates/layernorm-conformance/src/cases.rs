//! The cases, as data (`cases.toml`), and the deterministic inputs each one generates.

use layernorm::{DType, HostVec, NormSpec};
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
    /// Each row one value, `mean + std · N(0, 1)` drawn per row.
    Constant,
    /// Uniform in ±M with M = 1e30 (f32, bf16, f64) or 6e4 (near the f16 maximum).
    Large,
    /// `(−1)^j · (1000 + N(0, 1))`: mean ≈ 0 by cancellation, std ≈ 1000.
    MixedSigns,
    /// Row r is `10^(r mod 7 − 3) · N(0, 1)`.
    MixedScale,
    /// Standard normal, with a NaN in row 1 and a +∞ in row 3 (when those rows exist).
    Nonfinite,
}

fn yes() -> bool {
    true
}
fn default_eps() -> f64 {
    1e-5
}
fn default_std() -> f64 {
    1.0
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
    #[serde(default = "default_std")]
    pub std: f64,
    /// Whether γ is present.
    #[serde(default = "yes")]
    pub gamma: bool,
    /// Whether β is present.
    #[serde(default = "yes")]
    pub beta: bool,
    /// eps.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Dtypes this case applies to (names); all when absent.
    #[serde(default)]
    pub dtypes: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    case: Vec<Case>,
}

/// Parses cases from TOML text, checking names are unique and dtypes are known.
pub fn parse_cases(text: &str) -> Result<Vec<Case>, String> {
    let file: CaseFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut seen = std::collections::BTreeSet::new();
    for c in &file.case {
        if !seen.insert(c.name.clone()) {
            return Err(format!("duplicate case name `{}`", c.name));
        }
        for d in c.dtypes.iter().flatten() {
            if DType::from_name(d).is_none() {
                return Err(format!("case `{}`: unknown dtype `{d}`", c.name));
            }
        }
    }
    Ok(file.case)
}

/// The built-in cases of `cases.toml`.
pub fn cases() -> Vec<Case> {
    // The file is compiled in and checked by a test, so failing here is a build defect.
    parse_cases(CASES_TOML).unwrap_or_else(|e| panic!("cases.toml is invalid: {e}"))
}

/// The inputs of one case in one dtype: already rounded to the dtype (`HostVec`), and the same
/// values widened back to `f64` for the reference.
#[derive(Clone, Debug)]
pub struct Inputs {
    /// The problem.
    pub spec: NormSpec,
    /// x in storage dtype.
    pub x: HostVec,
    /// γ in storage dtype.
    pub gamma: Option<HostVec>,
    /// β in storage dtype.
    pub beta: Option<HostVec>,
    /// dy in storage dtype.
    pub dy: HostVec,
}

impl Inputs {
    /// x as the reference sees it.
    pub fn x64(&self) -> Vec<f64> {
        self.x.to_f64_vec()
    }
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

    /// The problem description in `dtype`.
    pub fn spec(&self, dtype: DType) -> NormSpec {
        NormSpec::layer_norm(self.rows, self.n, dtype)
            .with_eps(self.eps)
            .with_gamma(self.gamma)
            .with_beta(self.beta)
    }

    /// Deterministic inputs for `dtype` (the same draws for every dtype, then rounded).
    pub fn inputs(&self, dtype: DType) -> Inputs {
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
                Dist::Constant => row.fill(self.mean + self.std * z(&mut rng)),
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
        let gamma: Vec<f64> = (0..n).map(|_| 1.0 + 0.1 * z(&mut rng)).collect();
        let beta: Vec<f64> = (0..n).map(|_| 0.1 * z(&mut rng)).collect();
        let dy: Vec<f64> = (0..rows * n).map(|_| z(&mut rng)).collect();
        Inputs {
            spec: self.spec(dtype),
            x: HostVec::from_f64(dtype, &x),
            gamma: self.gamma.then(|| HostVec::from_f64(dtype, &gamma)),
            beta: self.beta.then(|| HostVec::from_f64(dtype, &beta)),
            dy: HostVec::from_f64(dtype, &dy),
        }
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
        assert!(has(&|c| c.eps == 1e-12));
    }

    #[test]
    fn bad_case_files_are_rejected_with_a_reason() {
        let dup = "[[case]]\nname='a'\nrows=1\nn=1\ndist='normal'\n".repeat(2);
        assert!(parse_cases(&dup).unwrap_err().contains("duplicate"));
        let bad = "[[case]]\nname='a'\nrows=1\nn=1\ndist='normal'\ndtypes=['f8']\n";
        assert!(parse_cases(bad).unwrap_err().contains("f8"));
        let typo = "[[case]]\nname='a'\nrows=1\nn=1\ndist='normal'\nepsilon=1\n";
        assert!(parse_cases(typo).unwrap_err().contains("epsilon"));
    }

    #[test]
    fn inputs_are_deterministic_and_rounded_to_the_dtype() {
        let c = &cases()[3];
        let a = c.inputs(DType::BF16);
        let b = c.inputs(DType::BF16);
        assert_eq!(a.x, b.x);
        assert_eq!(a.x.dtype(), DType::BF16);
        let wide = c.inputs(DType::F64).x64();
        let narrow = a.x64();
        assert!(wide.iter().zip(&narrow).any(|(w, n)| w != n));
    }
}
