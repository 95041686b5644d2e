//! The plan of a sweep: its trial table, drawn once from the spec and kept in
//! `runs/<sweep>/sweep.json`, so that `--trial N`, re-runs and `--collect` agree on what
//! trial N is; and `runs/<sweep>/base.toml`, the frozen base experiment every trial
//! resolves from.
use super::spec::{Base, Distribution, SlurmOptions, SweepSpec};
use super::SweepError;
use crate::config::{self, ConfigError, Flag, Resolved};
use crate::run::write_atomic;
use crate::tensorboard::{EventWriter, HParamDomain, HParamSpec, HParamValue};
use crate::train::tags;
use chrono::{DateTime, Utc};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const PLAN_FILE: &str = "sweep.json";
pub const BASE_FILE: &str = "base.toml";
pub const SUMMARY_FILE: &str = "summary.csv";
/// Best val GED against each swept value.
pub const SUMMARY_FIGURE: &str = "summary.png";
/// The validation metrics the HParams dashboard compares trials by.
pub const METRIC_TAGS: [&str; 6] = [
    tags::BEST_VAL_GED,
    tags::BEST_VAL_HM_IOU,
    tags::FINAL_VAL_GED,
    tags::FINAL_VAL_HM_IOU,
    tags::VAL_ELBO,
    tags::VAL_KL,
];
const FORMAT: u32 = 1;

/// The whole trial table of a sweep and what it was made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub format: u32,
    pub name: String,
    /// The sweep spec it was planned from (as given then).
    pub spec: PathBuf,
    /// Where the base experiment came from: its file, or the spec for an inline base.
    pub base_source: String,
    /// The base experiment's TOML, as `base.toml` holds it.
    pub base_text: String,
    pub seed: u64,
    /// `key=value` overrides of every trial (`sweep.set`).
    pub fixed: Vec<String>,
    pub axes: Vec<Axis>,
    pub trials: Vec<Trial>,
    /// The spec's defaults for `--emit slurm`.
    pub slurm: SlurmOptions,
    pub created_at: DateTime<Utc>,
}

/// One swept key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Axis {
    /// The full dotted key, such as `model.beta`.
    pub key: String,
    /// Its column in tables: the last segment unless two axes share it.
    pub name: String,
    pub kind: AxisKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AxisKind {
    Grid(Vec<toml::Value>),
    Random(Distribution),
    /// `train.seed` of each repeat.
    Repeat(Vec<i64>),
}

/// One trial: a run of the base experiment with one value per axis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    pub index: usize,
    /// Its folder's name in the sweep folder, such as `03-beta10-latent_dim6`.
    pub id: String,
    /// Trials that differ only in their repeat share a group (the HParams dashboard
    /// aggregates them).
    pub group: String,
    /// One value per axis, in the order of [`Plan::axes`].
    pub values: Vec<toml::Value>,
    /// The same as `key=value` overrides.
    pub sets: Vec<String>,
}

/// A value as an override's text: TOML, so strings are quoted and tables inline.
pub fn value_text(value: &toml::Value) -> String {
    match value {
        // Display would quote with single quotes where it can; --set reads either.
        toml::Value::Table(table) => {
            let items: Vec<String> = table
                .iter()
                .map(|(k, v)| format!("{k} = {}", value_text(v)))
                .collect();
            format!("{{ {} }}", items.join(", "))
        }
        toml::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(value_text).collect();
            format!("[{}]", items.join(", "))
        }
        toml::Value::String(s) => toml::Value::String(s.clone()).to_string(),
        toml::Value::Float(f) if f.is_nan() => "nan".into(),
        toml::Value::Float(f) if f.is_infinite() => if *f > 0.0 { "inf" } else { "-inf" }.into(),
        // Debug keeps a decimal point or an exponent, so the text reads back as a float.
        toml::Value::Float(f) => format!("{f:?}"),
        other => other.to_string(),
    }
}

/// A value as a person reads it in a table: strings without quotes.
pub fn value_display(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Float(f) => format!("{f}"),
        other => value_text(other),
    }
}

/// `x` rounded to `digits` significant digits.
fn significant(x: f64, digits: usize) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    format!("{:.*e}", digits - 1, x).parse().unwrap_or(x)
}

/// A short form of a value for a trial id: numbers to 4 significant digits.
fn id_part(value: &toml::Value) -> String {
    let text = match value {
        toml::Value::Float(f) => {
            let r = significant(*f, 4);
            if r != 0.0 && (r.abs() < 1e-3 || r.abs() >= 1e5) {
                format!("{r:e}")
            } else {
                format!("{r}")
            }
        }
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::String(s) => s.clone(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(items) => items.iter().map(id_part).collect::<Vec<_>>().join("x"),
        other => format!("{:08x}", crc32c::crc32c(value_text(other).as_bytes())),
    };
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn draw(distribution: &Distribution, rng: &mut Pcg64) -> toml::Value {
    match distribution {
        Distribution::Uniform { lo, hi } => {
            toml::Value::Float(significant(rng.gen_range(*lo..=*hi), 6).clamp(*lo, *hi))
        }
        Distribution::LogUniform { lo, hi } => {
            let x = rng.gen_range(lo.ln()..=hi.ln()).exp();
            toml::Value::Float(significant(x, 6).clamp(*lo, *hi))
        }
        Distribution::IntUniform { lo, hi } => toml::Value::Integer(rng.gen_range(*lo..=*hi)),
        Distribution::Choice(values) => values[rng.gen_range(0..values.len())].clone(),
    }
}

/// The base experiment's TOML, and where it came from for messages and the plan.
struct BaseText {
    source: String,
    text: String,
}

/// Reads the base experiment named by `spec`, refusing a sweep spec given as one.
fn read_base(spec: &SweepSpec) -> Result<BaseText, SweepError> {
    match &spec.base {
        Base::File(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| SweepError::Spec {
                path: spec.path.clone(),
                why: format!("sweep.base: cannot read {}: {e}", path.display()),
            })?;
            if SweepSpec::is_sweep(&text) {
                return Err(SweepError::Spec {
                    path: spec.path.clone(),
                    why: format!(
                        "sweep.base: {} is a sweep spec, not an experiment",
                        path.display()
                    ),
                });
            }
            Ok(BaseText {
                source: path.display().to_string(),
                text,
            })
        }
        Base::Inline(text) => Ok(BaseText {
            source: format!("{} [sweep.base]", spec.path.display()),
            text: text.clone(),
        }),
    }
}

/// The grid axes, then the random ones, then the repeats' `train.seed` (when there are
/// several), each named for tables.
fn plan_axes(spec: &SweepSpec, base_seed: i64) -> Vec<Axis> {
    let mut axes: Vec<Axis> = Vec::new();
    for axis in &spec.grid {
        axes.push(Axis {
            key: axis.key.clone(),
            name: String::new(),
            kind: AxisKind::Grid(axis.values.clone()),
        });
    }
    for axis in &spec.random {
        axes.push(Axis {
            key: axis.key.clone(),
            name: String::new(),
            kind: AxisKind::Random(axis.distribution.clone()),
        });
    }
    if spec.repeats > 1 {
        axes.push(Axis {
            key: "train.seed".into(),
            name: String::new(),
            kind: AxisKind::Repeat((0..spec.repeats as i64).map(|r| base_seed + r).collect()),
        });
    }
    name_axes(&mut axes);
    axes
}

/// Names each axis by its key's last segment, or by the whole key where two share it.
fn name_axes(axes: &mut [Axis]) {
    let last = |key: &str| key.rsplit('.').next().unwrap_or(key).to_string();
    let names: Vec<String> = axes.iter().map(|a| last(&a.key)).collect();
    for (axis, name) in axes.iter_mut().zip(&names) {
        axis.name = if names.iter().filter(|n| *n == name).count() > 1 {
            axis.key.clone()
        } else {
            name.clone()
        };
    }
}

/// The values of the grid and random axes of every configuration: grid points, first
/// axis slowest, each with `samples` draws seeded by the spec, so a plan is reproducible.
fn configurations(spec: &SweepSpec) -> Vec<Vec<toml::Value>> {
    let mut points: Vec<Vec<toml::Value>> = vec![Vec::new()];
    for axis in &spec.grid {
        points = points
            .into_iter()
            .flat_map(|point| {
                axis.values.iter().map(move |v| {
                    let mut p = point.clone();
                    p.push(v.clone());
                    p
                })
            })
            .collect();
    }
    let mut rng = Pcg64::seed_from_u64(spec.seed);
    let mut configurations = Vec::new();
    for point in points {
        for _ in 0..spec.samples {
            let mut values = point.clone();
            values.extend(spec.random.iter().map(|a| draw(&a.distribution, &mut rng)));
            configurations.push(values);
        }
    }
    configurations
}

/// Every configuration once per repeat, numbered in order; with several repeats, each
/// repeat's seed is the last value.
fn plan_trials(spec: &SweepSpec, axes: &[Axis], base_seed: i64) -> Vec<Trial> {
    let configurations = configurations(spec);
    let total = configurations.len() * spec.repeats as usize;
    let width = (total.saturating_sub(1)).to_string().len().max(2);
    let mut trials = Vec::with_capacity(total);
    for values in configurations {
        for repeat in 0..spec.repeats {
            let mut values = values.clone();
            if spec.repeats > 1 {
                values.push(toml::Value::Integer(base_seed + repeat as i64));
            }
            trials.push(trial(trials.len(), width, axes, values));
        }
    }
    trials
}

/// Trial `index` with one value per axis; `width` pads the index so ids sort in order.
fn trial(index: usize, width: usize, axes: &[Axis], values: Vec<toml::Value>) -> Trial {
    let id = trial_id(index, width, axes, &values);
    let group: Vec<String> = axes
        .iter()
        .zip(&values)
        .filter(|(axis, _)| !matches!(axis.kind, AxisKind::Repeat(_)))
        .map(|(axis, v)| format!("{}={}", axis.name, value_display(v)))
        .collect();
    let sets = axes
        .iter()
        .zip(&values)
        .map(|(axis, v)| format!("{}={}", axis.key, value_text(v)))
        .collect();
    Trial {
        index,
        id,
        group: group.join(","),
        values,
        sets,
    }
}

/// The padded index, then each axis's name and short value, cut to 96 bytes so that it
/// stays a usable folder name however many axes there are.
fn trial_id(index: usize, width: usize, axes: &[Axis], values: &[toml::Value]) -> String {
    let parts: Vec<String> = axes
        .iter()
        .zip(values)
        .map(|(axis, v)| {
            let name = match axis.kind {
                AxisKind::Repeat(_) => "seed".to_string(),
                _ => axis.name.replace('.', "_"),
            };
            format!("{name}{}", id_part(v))
        })
        .collect();
    let mut id = format!("{index:0width$}");
    for part in &parts {
        id.push('-');
        id.push_str(part);
    }
    if id.len() > 96 {
        let mut cut = 96;
        while !id.is_char_boundary(cut) {
            cut -= 1;
        }
        id.truncate(cut);
    }
    id
}

impl Plan {
    /// Draws the trial table of `spec`. The base experiment must resolve with the
    /// spec's fixed overrides; a trial whose values do not resolve is planned all the
    /// same and fails when it runs (see [`Plan::check_trials`]).
    pub fn build(spec: &SweepSpec) -> Result<Plan, SweepError> {
        let base = read_base(spec)?;
        let fixed: Vec<String> = spec
            .fixed
            .iter()
            .map(|(k, v)| format!("{k}={}", value_text(v)))
            .collect();
        let resolved = config::load_str(&base.text, &base.source, &[], &fixed).map_err(|e| {
            SweepError::Spec {
                path: spec.path.clone(),
                why: format!("the base experiment with sweep.set does not resolve: {e}"),
            }
        })?;
        let base_seed = resolved.experiment.train.seed as i64;
        let axes = plan_axes(spec, base_seed);
        let trials = plan_trials(spec, &axes, base_seed);
        Ok(Plan {
            format: FORMAT,
            name: spec.name.clone(),
            spec: spec.path.clone(),
            base_source: base.source,
            base_text: base.text,
            seed: spec.seed,
            fixed,
            axes,
            trials,
            slurm: spec.slurm.clone(),
            created_at: Utc::now(),
        })
    }

    /// The trials whose values do not resolve, with the error each will fail with.
    pub fn check_trials(&self) -> Vec<(usize, ConfigError)> {
        self.trials
            .iter()
            .filter_map(|trial| {
                config::load_str(&self.base_text, &self.base_source, &[], &self.sets(trial))
                    .err()
                    .map(|e| (trial.index, e))
            })
            .collect()
    }

    /// Every override of `trial`: the fixed ones, then its axis values.
    pub fn sets(&self, trial: &Trial) -> Vec<String> {
        self.fixed.iter().chain(&trial.sets).cloned().collect()
    }

    /// Resolves trial `index` from the sweep folder's `base.toml`, with `flags` (such as
    /// `--device`) between the base and the trial's overrides.
    pub fn resolve(
        &self,
        folder: &Path,
        index: usize,
        flags: &[Flag],
    ) -> Result<Resolved, ConfigError> {
        config::load(
            &folder.join(BASE_FILE),
            flags,
            &self.sets(&self.trials[index]),
        )
    }

    /// Reads `folder/sweep.json`.
    pub fn load(folder: &Path) -> Result<Plan, SweepError> {
        let path = folder.join(PLAN_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| SweepError::Folder {
            path: folder.to_path_buf(),
            why: match e.kind() {
                std::io::ErrorKind::NotFound if folder.is_dir() => {
                    format!("is not a sweep folder (no {PLAN_FILE})")
                }
                std::io::ErrorKind::NotFound => "does not exist".into(),
                _ => format!("cannot read {PLAN_FILE}: {e}"),
            },
        })?;
        let plan: Plan = serde_json::from_str(&text).map_err(|e| SweepError::Folder {
            path: path.clone(),
            why: format!("is not a sweep plan: {e}"),
        })?;
        if plan.format != FORMAT {
            return Err(SweepError::Folder {
                path,
                why: format!(
                    "has plan format {}, this probunet reads {FORMAT}",
                    plan.format
                ),
            });
        }
        Ok(plan)
    }

    /// How `self` (from a spec) differs from `other` (a folder's plan) in what the
    /// trials run, if it does.
    pub fn difference(&self, other: &Plan) -> Option<String> {
        let table = |text: &str| toml::from_str::<toml::Table>(text).ok();
        if table(&self.base_text) != table(&other.base_text) {
            return Some(format!(
                "the base experiment differs ({} now, {} in the folder)",
                self.base_source, other.base_source
            ));
        }
        if self.fixed != other.fixed {
            return Some(format!(
                "sweep.set differs ([{}] now, [{}] in the folder)",
                self.fixed.join(", "),
                other.fixed.join(", ")
            ));
        }
        if self.trials.len() != other.trials.len() {
            return Some(format!(
                "the spec plans {} trials, the folder holds {}",
                self.trials.len(),
                other.trials.len()
            ));
        }
        self.trials
            .iter()
            .zip(&other.trials)
            .find(|(a, b)| a.id != b.id || a.sets != b.sets)
            .map(|(a, b)| {
                format!(
                    "trial {} is {} ({}) by the spec but {} ({}) in the folder",
                    a.index,
                    a.id,
                    a.sets.join(" "),
                    b.id,
                    b.sets.join(" ")
                )
            })
    }

    /// Makes `folder` this sweep's folder, or checks that it already is: an existing plan
    /// that differs is refused rather than mixed with this one. Returns the folder's plan.
    ///
    /// The plan is written first: it is what marks the folder as a sweep's, so a sweep
    /// killed while making the folder leaves either a folder the next one repairs (the
    /// base copy and the HParams description written again) or one holding only the dead
    /// process's temporary, which is removed.
    pub fn create_or_check(&self, folder: &Path) -> Result<Plan, SweepError> {
        let io = |e: std::io::Error| SweepError::Folder {
            path: folder.to_path_buf(),
            why: e.to_string(),
        };
        if folder.join(PLAN_FILE).exists() {
            let existing = Plan::load(folder)?;
            if let Some(why) = self.difference(&existing) {
                return Err(mismatch(folder, &existing, &why));
            }
            if !folder.join(BASE_FILE).exists() {
                existing.write_base(folder)?;
            }
            if !crate::tensorboard::holds_event_file(folder).map_err(io)? {
                existing.write_hparams_experiment(folder)?;
            }
            return Ok(existing);
        }
        if folder.is_dir() {
            crate::sys::remove_dead_temporaries(folder, crate::run::TEMPORARY).map_err(io)?;
        }
        if folder.exists() && std::fs::read_dir(folder).map_err(io)?.next().is_some() {
            return Err(SweepError::Folder {
                path: folder.to_path_buf(),
                why: format!(
                    "exists and is not a sweep folder (no {PLAN_FILE}); refusing to write into it"
                ),
            });
        }
        std::fs::create_dir_all(folder).map_err(io)?;
        let json = serde_json::to_vec_pretty(self)
            .map_err(std::io::Error::other)
            .map_err(io)?;
        write_atomic(&folder.join(PLAN_FILE), &json)?;
        self.write_base(folder)?;
        self.write_hparams_experiment(folder)?;
        Ok(self.clone())
    }

    fn write_base(&self, folder: &Path) -> Result<(), SweepError> {
        let text = format!(
            "# The base experiment of sweep `{}`, copied from {}.\n\
             # Every trial resolves from this copy plus its overrides (see {PLAN_FILE}).\n{}",
            self.name, self.base_source, self.base_text
        );
        write_atomic(&folder.join(BASE_FILE), text.as_bytes())?;
        Ok(())
    }

    /// The HParams dashboard's description of the sweep, in the sweep folder itself.
    /// (Only the sweep folder's own event file: the trials' are in their folders.)
    fn write_hparams_experiment(&self, folder: &Path) -> Result<(), SweepError> {
        let mut specs: Vec<HParamSpec> = self
            .axes
            .iter()
            .map(|axis| HParamSpec {
                name: axis.key.clone(),
                domain: match &axis.kind {
                    AxisKind::Grid(values) | AxisKind::Random(Distribution::Choice(values)) => {
                        domain(values)
                    }
                    AxisKind::Random(Distribution::Uniform { lo, hi })
                    | AxisKind::Random(Distribution::LogUniform { lo, hi }) => {
                        HParamDomain::Float64Interval { min: *lo, max: *hi }
                    }
                    AxisKind::Random(Distribution::IntUniform { lo, hi }) => {
                        HParamDomain::Float64Interval {
                            min: *lo as f64,
                            max: *hi as f64,
                        }
                    }
                    AxisKind::Repeat(seeds) => {
                        HParamDomain::Float64Values(seeds.iter().map(|&s| s as f64).collect())
                    }
                },
            })
            .collect();
        let standard = crate::train::board::standard_hparam_specs();
        specs.extend(
            standard
                .into_iter()
                .filter(|s| !self.axes.iter().any(|a| a.key == s.name)),
        );
        let mut writer = EventWriter::create(folder)?;
        writer.add_hparams_experiment(&specs, &METRIC_TAGS)?;
        writer.close()?;
        Ok(())
    }

    /// The trial's values as HParams.
    pub fn hparams(&self, trial: &Trial) -> Vec<(String, HParamValue)> {
        self.axes
            .iter()
            .zip(&trial.values)
            .map(|(axis, value)| (axis.key.clone(), hparam(value)))
            .collect()
    }

    /// The folder of trial `index` in the sweep folder.
    pub fn trial_dir(&self, folder: &Path, index: usize) -> PathBuf {
        folder.join(&self.trials[index].id)
    }
}

/// The error for a folder whose plan differs from the spec's.
pub fn mismatch(folder: &Path, existing: &Plan, why: &str) -> SweepError {
    SweepError::Folder {
        path: folder.to_path_buf(),
        why: format!(
            "holds another plan for sweep `{}`: {why}. Refusing to mix them: give the sweep \
             another name (sweep.name) or remove the folder",
            existing.name
        ),
    }
}

fn hparam(value: &toml::Value) -> HParamValue {
    match value {
        toml::Value::Integer(i) => HParamValue::Number(*i as f64),
        toml::Value::Float(f) => HParamValue::Number(*f),
        toml::Value::Boolean(b) => HParamValue::Bool(*b),
        toml::Value::String(s) => HParamValue::String(s.clone()),
        other => HParamValue::String(value_text(other)),
    }
}

fn domain(values: &[toml::Value]) -> HParamDomain {
    let hparams: Vec<HParamValue> = values.iter().map(hparam).collect();
    if let Some(numbers) = hparams
        .iter()
        .map(|h| match h {
            HParamValue::Number(x) => Some(*x),
            _ => None,
        })
        .collect::<Option<Vec<f64>>>()
    {
        return HParamDomain::Float64Values(numbers);
    }
    if hparams.iter().all(|h| matches!(h, HParamValue::Bool(_))) {
        return HParamDomain::Bool;
    }
    match hparams
        .iter()
        .map(|h| match h {
            HParamValue::String(s) => Some(s.clone()),
            _ => None,
        })
        .collect::<Option<Vec<String>>>()
    {
        Some(strings) => HParamDomain::StringValues(strings),
        None => HParamDomain::String,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, sweep: &str) -> SweepSpec {
        std::fs::write(
            dir.join("base.toml"),
            "name = \"tiny\"\n[data.synthetic]\nitems = 40\nsize = 32\n[model]\nfilters = [8, 16]\n\
             [train]\nsteps = 10\nseed = 5\n",
        )
        .unwrap();
        let path = dir.join("sweep.toml");
        std::fs::write(&path, format!("[sweep]\nbase = \"base.toml\"\n{sweep}")).unwrap();
        SweepSpec::load(&path).unwrap()
    }

    #[test]
    fn the_grid_multiplies_out_in_order_with_readable_ids() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(
            dir.path(),
            "repeats = 2\n[sweep.grid]\nbeta = [0.1, 10]\nlatent_dim = [2, 6]\n\
             reconstruction = [\"sum\"]\n",
        );
        let plan = Plan::build(&spec).unwrap();
        let ids: Vec<&str> = plan.trials.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(
            ids[..3],
            [
                "00-beta0.1-latent_dim2-reconstructionsum-seed5",
                "01-beta0.1-latent_dim2-reconstructionsum-seed6",
                "02-beta0.1-latent_dim6-reconstructionsum-seed5",
            ]
        );
        assert_eq!(plan.trials.len(), 8);
        assert_eq!(
            plan.trials[7].sets,
            [
                "model.beta=10",
                "model.latent_dim=6",
                "model.reconstruction=\"sum\"",
                "train.seed=6"
            ]
        );
        assert_eq!(
            plan.trials[7].group,
            "beta=10,latent_dim=6,reconstruction=sum"
        );
        assert_eq!(plan.trials[6].group, plan.trials[7].group);
        assert!(plan.check_trials().is_empty());
        let r =
            config::load_str(&plan.base_text, "base", &[], &plan.sets(&plan.trials[7])).unwrap();
        assert_eq!(r.experiment.model.beta, 10.0);
        assert_eq!(r.experiment.train.seed, 6);
        assert_eq!(r.provenance["model.beta"], "--set model.beta=10");
    }

    #[test]
    fn random_draws_are_seeded_in_bounds_and_rounded() {
        let dir = tempfile::tempdir().unwrap();
        let text = "seed = 7\nsamples = 50\n[sweep.random]\nlr = { log_uniform = [1e-4, 1e-2] }\n\
                    beta = { uniform = [0.5, 2] }\nlatent_dim = { int_uniform = [2, 4] }\n\
                    reconstruction = { choice = [\"sum\", \"batch_mean\"] }\n";
        let a = Plan::build(&spec(dir.path(), text)).unwrap();
        let b = Plan::build(&spec(dir.path(), text)).unwrap();
        assert_eq!(a.trials, b.trials, "the same seed draws the same trials");
        let mut latent = std::collections::BTreeSet::new();
        for trial in &a.trials {
            let lr = trial.values[0].as_float().unwrap();
            assert!((1e-4..=1e-2).contains(&lr), "{lr}");
            assert_eq!(lr, significant(lr, 6));
            let beta = trial.values[1].as_float().unwrap();
            assert!((0.5..=2.0).contains(&beta), "{beta}");
            latent.insert(trial.values[2].as_integer().unwrap());
        }
        assert_eq!(latent.into_iter().collect::<Vec<_>>(), [2, 3, 4]);
        let c = Plan::build(&spec(dir.path(), &text.replace("seed = 7", "seed = 8"))).unwrap();
        assert_ne!(a.trials, c.trials);
        assert!(a.check_trials().is_empty());
    }

    #[test]
    fn bad_values_are_planned_and_reported_and_a_broken_base_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let plan = Plan::build(&spec(dir.path(), "[sweep.grid]\nlatent_dim = [2, 0]\n")).unwrap();
        let bad = plan.check_trials();
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, 1);
        assert_eq!(
            bad[0].1.to_string(),
            "--set model.latent_dim=0: model.latent_dim: must be positive, got 0"
        );
        let err = Plan::build(&spec(
            dir.path(),
            "set = { \"train.batch\" = 0 }\n[sweep.grid]\nbeta = [1]\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(
                "sweep.toml: the base experiment with sweep.set does not resolve: \
                 --set train.batch=0: train.batch: must be at least 1"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_folder_left_by_a_killed_sweep_is_repaired_or_taken() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("runs/s");
        let plan = Plan::build(&spec(dir.path(), "[sweep.grid]\nbeta = [1, 10]\n")).unwrap();
        let listing = || {
            let mut names: Vec<String> = std::fs::read_dir(&folder)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        // Killed inside the plan's write: only its temporary, whose process has ended.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join(format!("sweep.tmp-{dead}")), "{").unwrap();
        plan.create_or_check(&folder).unwrap();
        let complete = |names: &[String]| {
            // Sorted: base.toml, events.out.tfevents.*, sweep.json.
            names.len() == 3
                && names[0] == BASE_FILE
                && names[1].starts_with("events.out.tfevents.")
                && names[2] == PLAN_FILE
        };
        let made = listing();
        assert!(complete(&made), "{made:?}");
        // Killed after the plan: the base copy and the HParams description come back.
        std::fs::remove_file(folder.join(BASE_FILE)).unwrap();
        std::fs::remove_file(folder.join(&made[1])).unwrap();
        assert_eq!(plan.create_or_check(&folder).unwrap(), plan);
        let repaired = listing();
        assert!(complete(&repaired), "{repaired:?}");
    }

    #[test]
    fn a_folder_with_another_plan_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("runs/s");
        let plan = Plan::build(&spec(dir.path(), "[sweep.grid]\nbeta = [1, 10]\n")).unwrap();
        plan.create_or_check(&folder).unwrap();
        assert!(folder.join(BASE_FILE).is_file());
        assert_eq!(Plan::load(&folder).unwrap(), plan);
        // The same plan again is fine; a changed one is not.
        let again = Plan::build(&spec(dir.path(), "[sweep.grid]\nbeta = [1, 10]\n")).unwrap();
        assert_eq!(again.create_or_check(&folder).unwrap(), plan);
        let other = Plan::build(&spec(dir.path(), "[sweep.grid]\nbeta = [1, 100]\n")).unwrap();
        let err = other.create_or_check(&folder).unwrap_err().to_string();
        assert!(
            err.contains(
                "holds another plan for sweep `sweep`: trial 1 is 01-beta100 (model.beta=100) \
                 by the spec but 01-beta10 (model.beta=10) in the folder. Refusing to mix them"
            ),
            "{err}"
        );
        let text = std::fs::read_to_string(folder.join(BASE_FILE)).unwrap();
        assert!(text.starts_with("# The base experiment of sweep `sweep`"));
        // The resolved trial names the copy and the override.
        let r = plan.resolve(&folder, 1, &[]).unwrap();
        assert_eq!(r.provenance["model.beta"], "--set model.beta=10");
        assert_eq!(
            r.provenance["train.steps"],
            folder.join(BASE_FILE).display().to_string()
        );
    }

    #[test]
    fn values_become_override_text_that_reads_back() {
        let cases: [(toml::Value, &str); 6] = [
            (toml::Value::Float(0.1), "0.1"),
            (toml::Value::Float(10.0), "10.0"),
            (toml::Value::Float(1e-5), "1e-5"),
            (toml::Value::Integer(6), "6"),
            ("batch_mean".into(), "\"batch_mean\""),
            (toml::Value::Array(vec![8.into(), 16.into()]), "[8, 16]"),
        ];
        for (value, text) in cases {
            assert_eq!(value_text(&value), text);
            let back: toml::Table = toml::from_str(&format!("v = {text}")).unwrap();
            assert_eq!(back["v"], value);
        }
        assert_eq!(id_part(&toml::Value::Float(0.000123456)), "1.235e-4");
        assert_eq!(id_part(&toml::Value::Float(100.0)), "100");
        assert_eq!(id_part(&"a b/c".into()), "a_b_c");
    }
}
