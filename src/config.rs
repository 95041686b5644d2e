//! An experiment spec is a TOML file that says what to train on, which model, and how:
//! `probunet train experiments/quickstart.toml`. Every key but the data source has a
//! default, so a spec names the data and what it changes; a key that no spec has, or a
//! value of the wrong type, is an error that names the key and where it was set.
//!
//! Values are resolved in layers, each overriding the ones before it:
//!
//! 1. the built-in defaults listed below;
//! 2. the spec file (it must exist);
//! 3. environment variables `PROBUNET_<SECTION>__<KEY>`, `__` between key segments:
//!    `PROBUNET_TRAIN__BATCH=8` sets `train.batch`. Variables whose first segment is not
//!    a spec section (`PROBUNET_PYTHON`) are not read;
//! 4. command-line flags such as `--device`;
//! 5. `--set key=value`, for any key: `--set train.lr=3e-4`, `--set model.filters=[16,32]`.
//!
//! Values from the environment, flags and `--set` are read as TOML values (`3e-4`,
//! `[16, 32]`, `true`, `"text"`, `{ kind = "step", every = 1000, gamma = 0.5 }`). Text
//! that is not a TOML value is taken as it is (`cuda:1`, `data/lidc`), and so is a number
//! or boolean given for a key whose value is text (`name=2024`). A table given in a higher
//! layer is merged key by key into the same table from a lower one.
//!
//! Two pairs of keys are alternatives: `train.epochs` or `train.steps`, and `data.store`
//! or `data.synthetic`. One layer may set only one of each pair; when different layers
//! set both, the higher layer's wins, so `--set train.steps=100` replaces a spec's
//! `epochs` and the default of 10 epochs applies only when neither is set.
//!
//! `train.schedule` is written `schedule = "constant"`, or as a table with a `kind` and
//! that kind's parameters (and nothing else):
//!
//! ```toml
//! [train.schedule]
//! kind = "cosine"     # or "step", with every and gamma; or "constant"
//! warmup_steps = 200
//! min_lr = 1e-6
//! ```
//!
//! Relative paths (`data.store`, `log.runs_dir`) are relative to the working directory.
//! Each run folder gets the resolved spec, with the origin of every value as a comment.
mod resume;
pub use resume::{load_recorded, Change};

use crate::data::loader::Augment;
use crate::data::synthetic::SyntheticConfig;
use crate::device::{DeviceSpec, Precision};
use crate::model::{ModelConfig, ModelError};
use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Prefix of the environment variables that set spec keys.
pub const ENV_PREFIX: &str = "PROBUNET_";

/// One training experiment: data, model, optimisation and logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Experiment {
    /// A label for the experiment's runs (text).
    pub name: String,
    /// Where the images and annotations come from.
    pub data: DataSpec,
    /// The model's shape and objective.
    pub model: ModelConfig,
    /// Optimisation, validation and checkpoints.
    pub train: TrainSpec,
    /// Scalar and image logs, and where run folders go.
    pub log: LogSpec,
}

impl Default for Experiment {
    fn default() -> Self {
        Self {
            name: "experiment".into(),
            data: DataSpec::default(),
            model: ModelConfig::default(),
            train: TrainSpec::default(),
            log: LogSpec::default(),
        }
    }
}

/// The training data: a prepared store or the synthetic dataset (exactly one).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSpec {
    /// Folder of a dataset made by `probunet prepare`; the alternative to `synthetic`.
    pub store: Option<PathBuf>,
    /// Generate the built-in synthetic dataset with these settings instead of reading a store.
    pub synthetic: Option<SyntheticConfig>,
    /// Random flips and rotations of training samples.
    pub augment: Augment,
}

/// How long and how fast to train, and when to validate and save.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    /// Samples per optimiser step (images).
    pub batch: usize,
    // Missing means unset rather than the struct's 10, so that a written spec with only
    // `steps` reads back as it was written.
    /// Passes over the training split; the alternative to `steps`, 10 when neither is set.
    #[serde(default)]
    pub epochs: Option<u64>,
    /// Optimiser steps in all; the alternative to `epochs`.
    pub steps: Option<u64>,
    /// Base learning rate, which the schedule scales (per step).
    pub lr: f64,
    /// How the learning rate changes over training: `"constant"` or a table with a `kind`.
    pub schedule: Schedule,
    /// Seed of initialisation, data order, annotator draws and augmentation.
    pub seed: u64,
    /// Optimiser steps between validations; 0 validates only at the end.
    pub val_every: u64,
    /// Prior samples drawn per validation item for the sample-based metrics (count).
    pub val_samples: usize,
    /// Most validation items used (count); unset uses the whole validation split.
    pub val_items: Option<usize>,
    /// Where to train: `auto` (the first GPU if any), `cpu`, `cuda` or `cuda:N`.
    pub device: DeviceSpec,
    /// Arithmetic precision: `fp32`, or `bf16` autocast on CUDA.
    pub precision: Precision,
    /// Optimiser steps between checkpoints; 0 saves only at the end.
    pub checkpoint_every: u64,
    /// Newest checkpoints kept (count); older ones are deleted.
    pub keep_last: usize,
    /// What a non-finite loss does: `stop` training, or `skip` that step's update.
    pub on_nan: NanPolicy,
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            batch: 5,
            epochs: Some(10),
            steps: None,
            lr: 1e-4,
            schedule: Schedule::Constant,
            seed: 0,
            val_every: 500,
            val_samples: 16,
            val_items: None,
            device: DeviceSpec::Auto,
            precision: Precision::Fp32,
            checkpoint_every: 1000,
            keep_last: 3,
            on_nan: NanPolicy::Stop,
        }
    }
}

/// How the learning rate moves away from `train.lr` over training. A plain string names
/// only `constant`; the kinds with parameters are tables, so each form has one reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(
    remote = "Self",
    tag = "kind",
    rename_all = "snake_case",
    deny_unknown_fields
)]
pub enum Schedule {
    /// `train.lr` throughout.
    #[default]
    Constant,
    /// Linear warm-up to `train.lr`, then a half cosine down to `min_lr` at the last step.
    Cosine {
        /// Steps of linear warm-up from `lr / warmup_steps` to `lr`.
        warmup_steps: u64,
        /// Learning rate reached at the last step.
        min_lr: f64,
    },
    /// `train.lr` multiplied by `gamma` after every `every` steps.
    Step {
        /// Steps between two decays.
        every: u64,
        /// Factor applied at each decay.
        gamma: f64,
    },
}

const SCHEDULE_KINDS: &[&str] = &["constant", "cosine", "step"];

impl Serialize for Schedule {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Schedule::Constant => serializer.serialize_str("constant"),
            _ => Schedule::serialize(self, serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Schedule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScheduleVisitor)
    }
}

struct ScheduleVisitor;

impl<'de> Visitor<'de> for ScheduleVisitor {
    type Value = Schedule;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"constant\" or a table with a `kind`")
    }

    fn visit_str<E: de::Error>(self, kind: &str) -> Result<Schedule, E> {
        match kind {
            "constant" => Ok(Schedule::Constant),
            "cosine" | "step" => Err(E::custom(format!(
                "schedule `{kind}` takes parameters: write it as a table with kind = \"{kind}\""
            ))),
            other => Err(E::unknown_variant(other, SCHEDULE_KINDS)),
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Schedule, A::Error> {
        Schedule::deserialize(MapAccessDeserializer::new(map))
    }
}

impl Schedule {
    /// The learning rate of 0-based optimiser step `step` out of `total_steps`.
    pub fn lr_at(&self, base_lr: f64, step: u64, total_steps: u64) -> f64 {
        match *self {
            Schedule::Constant => base_lr,
            Schedule::Cosine {
                warmup_steps,
                min_lr,
            } => {
                if step < warmup_steps {
                    return base_lr * (step + 1) as f64 / warmup_steps as f64;
                }
                let span = total_steps.saturating_sub(warmup_steps).max(1);
                let progress = ((step - warmup_steps) as f64 / span as f64).min(1.0);
                min_lr + (base_lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Schedule::Step { every, gamma } => {
                base_lr * gamma.powf(step.checked_div(every).unwrap_or(0) as f64)
            }
        }
    }
}

/// What training does when the loss is not finite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NanPolicy {
    /// Stop training with an error.
    #[default]
    Stop,
    /// Skip that step's update and go on.
    Skip,
}

/// What is logged, how often, and where runs go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSpec {
    /// Optimiser steps between scalar logs (loss terms, learning rate).
    pub every: u64,
    /// Folder in which each run gets its own folder.
    pub runs_dir: PathBuf,
    /// Whether validation logs pictures of images, annotations and samples.
    pub images: bool,
}

impl Default for LogSpec {
    fn default() -> Self {
        Self {
            every: 10,
            runs_dir: PathBuf::from("runs"),
            images: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("spec file {} does not exist", .0.display())]
    MissingSpec(PathBuf),
    #[error("cannot read spec file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spec file {} is not valid TOML: {why}", path.display())]
    Syntax { path: PathBuf, why: String },
    /// A malformed `--set` or flag, named as given.
    #[error("{arg}: {why}")]
    Override { arg: String, why: String },
    /// A key that no spec has, or a value of the wrong type, with the layer that set it.
    #[error("{origin}: {key}: {why}")]
    Key {
        origin: String,
        key: String,
        why: String,
    },
    /// A value of the right type that cannot be used.
    #[error("{key}: {why}")]
    Invalid { key: String, why: String },
    #[error("cannot write the spec as TOML: {0}")]
    Write(#[from] toml::ser::Error),
}

fn invalid(key: &str, why: String) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        why,
    }
}

/// Refuses a count of 0 where the key needs at least one.
fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        Err(invalid(key, "must be at least 1, got 0".into()))
    } else {
        Ok(())
    }
}

/// The name starts each run folder's name, so it must be one plain folder name: not
/// empty, not hidden, no path separators or control characters (`../x` would put runs
/// outside `log.runs_dir`).
fn check_name(name: &str) -> Result<(), ConfigError> {
    let why = if name.trim().is_empty() {
        "must not be empty or blank"
    } else if name.starts_with('.') {
        "must not start with '.'"
    } else if name.contains(['/', '\\']) || name.chars().any(char::is_control) {
        "must be one folder name, without '/', '\\' or control characters"
    } else {
        return Ok(());
    };
    Err(invalid("name", format!("{why}, got {name:?}")))
}

impl Experiment {
    /// Checks what the types cannot: counts that must be positive, a finite learning
    /// rate, exactly one of each pair of alternatives, and a buildable model. The checks
    /// run in a fixed order, so a spec with several faults always reports the same one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_name(&self.name)?;
        self.data.check_source()?;
        self.check_model()?;
        if let Some(synthetic) = &self.data.synthetic {
            self.check_synthetic(synthetic)?;
        }
        self.train.check()?;
        positive("log.every", self.log.every)
    }

    /// The model's own checks, with its keys named under `model.`, and what every store
    /// holds: greyscale images and binary masks.
    fn check_model(&self) -> Result<(), ConfigError> {
        self.model.validate().map_err(|e| match e {
            ModelError::Config { key, why } => invalid(&format!("model.{key}"), why),
            other => invalid("model", other.to_string()),
        })?;
        let store_holds = [
            (
                "model.input_channels",
                self.model.input_channels,
                "greyscale images",
            ),
            (
                "model.num_classes",
                self.model.num_classes,
                "binary masks, one foreground logit per pixel",
            ),
        ];
        for (key, value, what) in store_holds {
            if value != 1 {
                let why = format!("must be 1: stores hold {what}, got {value}");
                return Err(invalid(key, why));
            }
        }
        Ok(())
    }

    /// Synthetic counts, and an image size the model's levels can halve down to.
    fn check_synthetic(&self, synthetic: &SyntheticConfig) -> Result<(), ConfigError> {
        positive("data.synthetic.items", synthetic.items as u64)?;
        positive("data.synthetic.annotators", synthetic.annotators as u64)?;
        let divisor = self.model.size_divisor() as usize;
        if synthetic.size == 0 || !synthetic.size.is_multiple_of(divisor) {
            return Err(invalid(
                "data.synthetic.size",
                format!(
                    "must be a positive multiple of {divisor} for {} model levels, got {}",
                    self.model.filters.len(),
                    synthetic.size
                ),
            ));
        }
        Ok(())
    }
}

impl DataSpec {
    /// Exactly one of `store` and `synthetic`: layers may leave both or neither set.
    fn check_source(&self) -> Result<(), ConfigError> {
        if self
            .store
            .as_ref()
            .is_some_and(|s| s.as_os_str().is_empty())
        {
            return Err(invalid(
                "data.store",
                "is empty: give the folder of a store made by `probunet prepare`, or set \
                 data.synthetic instead"
                    .into(),
            ));
        }
        match (&self.store, &self.synthetic) {
            (Some(store), Some(_)) => Err(invalid(
                "data",
                format!(
                    "both data.store ({}) and data.synthetic are set; set exactly one",
                    store.display()
                ),
            )),
            (None, None) => Err(invalid(
                "data",
                "neither data.store nor data.synthetic is set; set exactly one".into(),
            )),
            _ => Ok(()),
        }
    }
}

impl TrainSpec {
    /// Positive counts, exactly one training length, and a usable learning rate and schedule.
    fn check(&self) -> Result<(), ConfigError> {
        positive("train.batch", self.batch as u64)?;
        self.check_length()?;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(invalid(
                "train.lr",
                format!("must be finite and positive, got {}", self.lr),
            ));
        }
        self.schedule.check(self.lr)?;
        positive("train.val_samples", self.val_samples as u64)?;
        if let Some(items) = self.val_items {
            positive("train.val_items", items as u64)?;
        }
        positive("train.keep_last", self.keep_last as u64)
    }

    /// Exactly one of `epochs` and `steps`, and that one positive.
    fn check_length(&self) -> Result<(), ConfigError> {
        match (self.epochs, self.steps) {
            (Some(epochs), Some(steps)) => Err(invalid(
                "train",
                format!(
                    "both train.epochs ({epochs}) and train.steps ({steps}) are set; \
                     set exactly one"
                ),
            )),
            (None, None) => Err(invalid(
                "train",
                "neither train.epochs nor train.steps is set; set exactly one".into(),
            )),
            (Some(epochs), None) => positive("train.epochs", epochs),
            (None, Some(steps)) => positive("train.steps", steps),
        }
    }
}

impl Schedule {
    /// Parameters that keep the rate finite, positive and at most `lr`.
    fn check(&self, lr: f64) -> Result<(), ConfigError> {
        match *self {
            Schedule::Constant => Ok(()),
            Schedule::Cosine { min_lr, .. } => {
                if !(min_lr.is_finite() && (0.0..=lr).contains(&min_lr)) {
                    return Err(invalid(
                        "train.schedule.min_lr",
                        format!("must be between 0 and train.lr ({lr}), got {min_lr}"),
                    ));
                }
                Ok(())
            }
            Schedule::Step { every, gamma } => {
                positive("train.schedule.every", every)?;
                if !(gamma.is_finite() && gamma > 0.0) {
                    return Err(invalid(
                        "train.schedule.gamma",
                        format!("must be finite and positive, got {gamma}"),
                    ));
                }
                Ok(())
            }
        }
    }
}

/// A command-line flag that sets one spec key, such as `--device cuda:1` for `train.device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    /// The flag as typed, such as `--device`; provenance and errors name it.
    pub flag: String,
    /// The dotted key it sets, such as `train.device`.
    pub key: String,
    /// The value as typed, read like a `--set` value.
    pub value: String,
}

/// A resolved, checked experiment and where each of its values came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub experiment: Experiment,
    /// For every leaf's dotted key: `default`, the spec file's path, `env PROBUNET_…`,
    /// `flag --…` or `--set key=value`.
    pub provenance: BTreeMap<String, String>,
}

impl Resolved {
    /// The experiment as a TOML spec, each value followed by a comment naming its origin;
    /// loading it again gives the same experiment.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        let mut out = String::from(
            "# The resolved experiment spec of a run: every key, with the layer that set it\n\
             # (default < spec file < PROBUNET_* environment < flags < --set) as a comment.\n",
        );
        self.write_table(&mut out, "", &toml::Table::try_from(&self.experiment)?);
        Ok(out)
    }

    fn write_table(&self, out: &mut String, prefix: &str, table: &toml::Table) {
        for (key, value) in table.iter().filter(|(_, v)| !v.is_table()) {
            let origin = self
                .provenance
                .get(&format!("{prefix}{key}"))
                .map_or("default", String::as_str);
            let origin = origin.lines().collect::<Vec<_>>().join(" ");
            out.push_str(&format!("{key} = {value}  # {origin}\n"));
        }
        for (key, value) in table {
            if let toml::Value::Table(inner) = value {
                out.push_str(&format!("\n[{prefix}{key}]\n"));
                self.write_table(out, &format!("{prefix}{key}."), inner);
            }
        }
    }
}

/// Loads `spec`, layers the `PROBUNET_*` environment, `flags` and `sets` (`key=value`,
/// in order) over it, and checks the result.
pub fn load(spec: &Path, flags: &[Flag], sets: &[String]) -> Result<Resolved, ConfigError> {
    let env: Vec<(String, String)> = Env::prefixed(ENV_PREFIX)
        .split("__")
        .iter()
        .map(|(key, value)| (key.as_str().to_owned(), value))
        .collect();
    resolve(spec, &env, flags, sets)
}

/// [`load`] for a spec given as text rather than a file; `origin` names it in
/// provenance and errors (such as the file it was read from).
pub fn load_str(
    text: &str,
    origin: &str,
    flags: &[Flag],
    sets: &[String],
) -> Result<Resolved, ConfigError> {
    let env: Vec<(String, String)> = Env::prefixed(ENV_PREFIX)
        .split("__")
        .iter()
        .map(|(key, value)| (key.as_str().to_owned(), value))
        .collect();
    resolve_layers(text_layer(text, Path::new(origin))?, &env, flags, sets)
}

/// [`load`] with the environment given as (lowercase dotted key, value) pairs, so tests
/// need not touch the process environment.
fn resolve(
    spec: &Path,
    env: &[(String, String)],
    flags: &[Flag],
    sets: &[String],
) -> Result<Resolved, ConfigError> {
    resolve_layers(file_layer(spec)?, env, flags, sets)
}

fn resolve_layers(
    file: Layer,
    env: &[(String, String)],
    flags: &[Flag],
    sets: &[String],
) -> Result<Resolved, ConfigError> {
    #[expect(clippy::expect_used, reason = "a fixed struct of plain fields")]
    let defaults = Value::serialize(Experiment::default())
        .ok()
        .and_then(Value::into_dict)
        .expect("the default experiment serialises to a table");
    let mut layers = vec![
        Layer::named("default".into(), defaults.clone()),
        file,
        env_layer(env, &defaults),
    ];
    for flag in flags {
        let values = override_values(&flag.key, &flag.value, &defaults).ok_or_else(|| {
            ConfigError::Override {
                arg: flag.flag.clone(),
                why: format!("sets the malformed key {:?}", flag.key),
            }
        })?;
        layers.push(Layer::named(format!("flag {}", flag.flag), values));
    }
    for set in sets {
        let values = set
            .split_once('=')
            .and_then(|(key, value)| override_values(key.trim(), value, &defaults))
            .ok_or_else(|| ConfigError::Override {
                arg: format!("--set {set}"),
                why: "expected key=value with a dotted key, such as train.lr=3e-4".into(),
            })?;
        layers.push(Layer::named(format!("--set {set}"), values));
    }
    let figment = layers
        .iter()
        .fold(Figment::new(), |figment, layer| figment.merge(layer));
    let mut experiment: Experiment = figment.extract().map_err(|e| key_error(&figment, e))?;
    keep_later_alternatives(&mut experiment, &layers);
    experiment
        .validate()
        .map_err(|e| with_origin(&figment, e))?;
    let mut provenance = BTreeMap::new();
    leaves(&toml::Table::try_from(&experiment)?, "", &mut |key, _| {
        let origin = origin(&figment, &key).unwrap_or_else(|| "default".into());
        provenance.insert(key, origin);
    });
    Ok(Resolved {
        experiment,
        provenance,
    })
}

/// One layer's values, whose metadata names the origin of each.
struct Layer {
    metadata: Metadata,
    values: Dict,
}

impl Layer {
    /// A layer whose values all come from one place.
    fn named(origin: String, values: Dict) -> Self {
        let name = origin.clone();
        let metadata =
            Metadata::named(origin).interpolater(move |_: &Profile, _: &[&str]| name.clone());
        Layer { metadata, values }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.values.clone()))
    }
}

fn file_layer(path: &Path) -> Result<Layer, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ConfigError::MissingSpec(path.into()),
        _ => ConfigError::Read {
            path: path.into(),
            source,
        },
    })?;
    text_layer(&text, path)
}

fn text_layer(text: &str, path: &Path) -> Result<Layer, ConfigError> {
    let values = Toml::from_str::<Dict>(text).map_err(|e| ConfigError::Syntax {
        path: path.into(),
        why: e.to_string(),
    })?;
    Ok(Layer::named(path.display().to_string(), values))
}

/// The variables whose first key segment is a spec section; each key's origin is the
/// variable that set it or the table containing it.
fn env_layer(env: &[(String, String)], defaults: &Dict) -> Layer {
    let mut values = Dict::new();
    let mut keys = Vec::new();
    for (key, text) in env {
        let section = key.split('.').next().unwrap_or_default();
        if defaults.contains_key(section) {
            insert(&mut values, key, parse_value(key, text, defaults));
            keys.push(key.clone());
        }
    }
    let metadata =
        Metadata::named("environment").interpolater(move |_: &Profile, path: &[&str]| {
            let key = path.join(".");
            let var = keys
                .iter()
                .filter(|k| key == **k || key.starts_with(&format!("{k}.")))
                .max_by_key(|k| k.len())
                .unwrap_or(&key);
            format!("env {ENV_PREFIX}{}", var.replace('.', "__").to_uppercase())
        });
    Layer { metadata, values }
}

/// `key` set to `text` read as a value, or `None` for a malformed key.
fn override_values(key: &str, text: &str, defaults: &Dict) -> Option<Dict> {
    let well_formed = key.split('.').all(|segment| {
        !segment.is_empty()
            && segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
    });
    well_formed.then(|| {
        let mut values = Dict::new();
        insert(&mut values, key, parse_value(key, text, defaults));
        values
    })
}

/// The TOML value `text` writes (`3e-4`, `[8, 16]`, `"sum"`), if it writes exactly one:
/// the value part of a `--set key=value`.
pub fn toml_value(text: &str) -> Option<toml::Value> {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .filter(|table| table.len() == 1)
        .and_then(|mut table| table.remove("v"))
}

/// `text` as a TOML value if it is one, else as a string; a number or boolean stays text
/// for a key whose default is text.
fn parse_value(key: &str, text: &str, defaults: &Dict) -> Value {
    let parsed = toml_value(text);
    let text_key = matches!(find(defaults, key), Some(Value::String(..)));
    match parsed {
        Some(toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_))
            if text_key =>
        {
            text.into()
        }
        Some(value) => from_toml(value),
        None => text.into(),
    }
}

fn from_toml(value: toml::Value) -> Value {
    match value {
        toml::Value::String(s) => s.into(),
        toml::Value::Integer(i) => i.into(),
        toml::Value::Float(f) => f.into(),
        toml::Value::Boolean(b) => b.into(),
        toml::Value::Datetime(d) => d.to_string().into(),
        toml::Value::Array(items) => items.into_iter().map(from_toml).collect::<Vec<_>>().into(),
        toml::Value::Table(table) => table
            .into_iter()
            .map(|(k, v)| (k, from_toml(v)))
            .collect::<Dict>()
            .into(),
    }
}

/// Sets dotted `key` in `dict`, making (or replacing non-table values with) tables on the way.
fn insert(dict: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.into(), value);
        }
        Some((head, rest)) => {
            let entry = dict
                .entry(head.into())
                .or_insert_with(|| Dict::new().into());
            if entry.as_dict().is_none() {
                *entry = Dict::new().into();
            }
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

fn find<'a>(dict: &'a Dict, key: &str) -> Option<&'a Value> {
    match key.split_once('.') {
        None => dict.get(key),
        Some((head, rest)) => find(dict.get(head)?.as_dict()?, rest),
    }
}

/// Where the value at dotted `key` came from, if any layer set it.
fn origin(figment: &Figment, key: &str) -> Option<String> {
    let segments: Vec<&str> = key.split('.').collect();
    Some(
        figment
            .find_metadata(key)?
            .interpolate(figment.profile(), &segments),
    )
}

/// serde's names of the number types, in words.
fn in_words(expected: &str) -> &str {
    match expected {
        "f64" | "f32" => "a number",
        "u64" | "u32" | "usize" => "a whole number, 0 or more",
        "i64" | "i32" | "isize" => "a whole number",
        "a sequence" | "sequence" => "a list, such as [1, 2]",
        "a map" | "map" => "a table",
        other => other,
    }
}

/// A value of the wrong type as TOML calls it, rather than serde's type names
/// ("signed int", "sequence").
fn found_in_words(found: &figment::error::Actual) -> String {
    use figment::error::Actual;
    match found {
        Actual::Bool(b) => format!("the boolean {b}"),
        Actual::Unsigned(n) => format!("the whole number {n}"),
        Actual::Signed(n) => format!("the whole number {n}"),
        Actual::Float(x) => format!("the number {x}"),
        Actual::Str(text) => format!("the string {text:?}"),
        Actual::Seq => "a list".into(),
        Actual::Map => "a table".into(),
        other => other.to_string(),
    }
}

/// A value that cannot be used, said with the layer that set it (the spec file, an
/// environment variable, a flag or `--set`), as type errors are.
fn with_origin(figment: &Figment, error: ConfigError) -> ConfigError {
    match error {
        ConfigError::Invalid { key, why } => match origin(figment, &key) {
            Some(origin) if origin != "default" => ConfigError::Key { origin, key, why },
            _ => ConfigError::Invalid { key, why },
        },
        other => other,
    }
}

/// An extraction error as the dotted key it concerns and the layer that set that key.
fn key_error(figment: &Figment, error: figment::Error) -> ConfigError {
    let mut path = error.path.clone();
    let why = match &error.kind {
        figment::error::Kind::UnknownField(field, expected) => {
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            let guess = did_you_mean(&path.join("."), &known_keys());
            format!(
                "unknown key, expected one of: {}{guess}",
                expected.join(", ")
            )
        }
        figment::error::Kind::UnknownVariant(found, expected) => {
            format!(
                "unknown value {found:?}, expected one of: {}",
                expected.join(", ")
            )
        }
        figment::error::Kind::InvalidType(found, expected)
        | figment::error::Kind::InvalidValue(found, expected) => {
            format!(
                "found {}, expected {}",
                found_in_words(found),
                in_words(expected)
            )
        }
        kind => kind.to_string(),
    };
    let key = path.join(".");
    let origin = origin(figment, &key)
        .or_else(|| {
            let metadata = error.metadata.as_ref()?;
            Some(metadata.interpolate(figment.profile(), &path))
        })
        .unwrap_or_else(|| "the spec".into());
    ConfigError::Key { origin, key, why }
}

/// Of two alternatives set by different layers, drops the one from the lower layer; when
/// one layer sets both, both stay for [`Experiment::validate`] to refuse.
fn keep_later_alternatives(experiment: &mut Experiment, layers: &[Layer]) {
    let last = |key: &str| {
        layers.iter().rposition(|layer| {
            find(&layer.values, key).is_some_and(|v| !matches!(v, Value::Empty(..)))
        })
    };
    fn keep_later<A, B>(a: &mut Option<A>, b: &mut Option<B>, order: Ordering) {
        if a.is_some() && b.is_some() {
            match order {
                Ordering::Less => *a = None,
                Ordering::Greater => *b = None,
                Ordering::Equal => {}
            }
        }
    }
    let train = &mut experiment.train;
    keep_later(
        &mut train.epochs,
        &mut train.steps,
        last("train.epochs").cmp(&last("train.steps")),
    );
    let data = &mut experiment.data;
    keep_later(
        &mut data.store,
        &mut data.synthetic,
        last("data.store").cmp(&last("data.synthetic")),
    );
}

/// Calls `visit` with the dotted key of every non-table value under `table`.
fn leaves(table: &toml::Table, prefix: &str, visit: &mut impl FnMut(String, &toml::Value)) {
    for (key, value) in table {
        match value {
            toml::Value::Table(inner) => leaves(inner, &format!("{prefix}{key}."), visit),
            leaf => visit(format!("{prefix}{key}"), leaf),
        }
    }
}

/// Every dotted key a spec may set, tables included (`model`, `model.beta`,
/// `train.schedule.gamma`, ...), in sorted order: for callers that check keys before
/// resolving anything, such as the axes of a sweep.
pub fn known_keys() -> Vec<String> {
    let mut full = Experiment::default();
    full.data.store = Some(PathBuf::from("store"));
    full.data.synthetic = Some(SyntheticConfig::default());
    full.train.steps = Some(1);
    full.train.val_items = Some(1);
    full.model.log_sigma_clamp = Some(1.0);
    #[expect(clippy::expect_used, reason = "a fixed struct of plain fields")]
    let table = toml::Table::try_from(&full).expect("the experiment serialises to a table");
    let mut keys = std::collections::BTreeSet::new();
    leaves(&table, "", &mut |key, _| {
        let mut prefix = String::new();
        for segment in key.split('.') {
            if !prefix.is_empty() {
                prefix.push('.');
            }
            prefix.push_str(segment);
            keys.insert(prefix.clone());
        }
    });
    for param in ["kind", "warmup_steps", "min_lr", "every", "gamma"] {
        keys.insert(format!("train.schedule.{param}"));
    }
    keys.into_iter().collect()
}

/// `; did you mean model.beta?` for the known key whose last part is a few edits
/// (a third of its length, at least one) from `name`'s, if there is exactly one such key.
fn did_you_mean(name: &str, keys: &[String]) -> String {
    let last = name.rsplit('.').next().unwrap_or(name);
    let mut close: Vec<&String> = keys
        .iter()
        .filter(|k| {
            let near = (last.chars().count() / 3).max(1);
            edit_distance(k.rsplit('.').next().unwrap_or(k), last) <= near
        })
        .collect();
    close.dedup();
    match close.as_slice() {
        [one] => format!("; did you mean {one}?"),
        _ => String::new(),
    }
}

/// Levenshtein distance, for suggestions between short names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// The full dotted key that `name` stands for: a known key as it is, or the one known key
/// whose last segments are `name` (`beta` is `model.beta`). An unknown or ambiguous name
/// is an error that says which keys there are.
pub fn full_key(name: &str) -> Result<String, String> {
    let keys = known_keys();
    if keys.iter().any(|k| k == name) {
        return Ok(name.to_string());
    }
    let suffix = format!(".{name}");
    let matches: Vec<&String> = keys.iter().filter(|k| k.ends_with(&suffix)).collect();
    match matches.as_slice() {
        [one] => Ok(one.to_string()),
        [] => {
            // Name the keys of the deepest table that exists on the way.
            let mut table = String::new();
            for segment in name.split('.') {
                let next = if table.is_empty() {
                    segment.to_string()
                } else {
                    format!("{table}.{segment}")
                };
                if !keys.contains(&next) {
                    break;
                }
                table = next;
            }
            let depth = if table.is_empty() {
                0
            } else {
                table.split('.').count()
            };
            let siblings: Vec<&str> = keys
                .iter()
                .filter(|k| k.split('.').count() == depth + 1)
                .filter(|k| table.is_empty() || k.starts_with(&format!("{table}.")))
                .map(|k| k.rsplit('.').next().unwrap_or(k))
                .collect();
            let place = if table.is_empty() {
                String::new()
            } else {
                format!(" in `{table}`")
            };
            let short = match table.is_empty() {
                true => ", or the last part of a key (beta, lr, latent_dim, ...)",
                false => "",
            };
            Err(format!(
                "unknown key{place}, expected one of: {}{short}{}",
                siblings.join(", "),
                did_you_mean(name, &keys)
            ))
        }
        many => Err(format!(
            "ambiguous: {}; write the full key",
            many.iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(" or ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spec file in its own temporary folder (kept alive by the returned guard).
    fn spec(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spec.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sets(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    fn flag(flag: &str, key: &str, value: &str) -> Flag {
        Flag {
            flag: flag.into(),
            key: key.into(),
            value: value.into(),
        }
    }

    const STORE: &str = "[data]\nstore = \"data/data_lidc\"\n";

    fn resolved(text: &str, sets_: &[&str]) -> Result<Resolved, ConfigError> {
        let (_dir, path) = spec(text);
        resolve(&path, &[], &[], &sets(sets_))
    }

    fn error(text: &str, sets_: &[&str]) -> String {
        resolved(text, sets_).unwrap_err().to_string()
    }

    #[test]
    fn defaults_fill_everything_a_spec_leaves_out() {
        let r = resolved(STORE, &[]).unwrap();
        let mut expected = Experiment::default();
        expected.data.store = Some("data/data_lidc".into());
        assert_eq!(r.experiment, expected);
        assert_eq!(r.experiment.train.batch, 5);
        assert_eq!(r.experiment.train.epochs, Some(10));
        assert_eq!(r.experiment.train.lr, 1e-4);
        assert_eq!(r.experiment.log.runs_dir, PathBuf::from("runs"));
        assert_eq!(r.provenance["train.batch"], "default");
        assert_eq!(r.provenance["model.filters"], "default");
        assert!(!r.provenance.contains_key("train.steps"));
    }

    #[test]
    fn each_layer_overrides_the_ones_before_and_provenance_says_which() {
        let (_dir, path) = spec(&format!(
            "{STORE}[train]\nlr = 1e-3\nbatch = 16\nseed = 1\nval_every = 100\n"
        ));
        let env = env(&[
            ("train.batch", "8"),
            ("train.seed", "2"),
            ("train.val_every", "200"),
        ]);
        let flags = [
            flag("--seed", "train.seed", "3"),
            flag("--val-every", "train.val_every", "300"),
        ];
        let r = resolve(&path, &env, &flags, &sets(&["train.val_every=400"])).unwrap();
        let train = &r.experiment.train;
        assert_eq!(
            (train.lr, train.batch, train.seed, train.val_every),
            (1e-3, 8, 3, 400)
        );
        let p = &r.provenance;
        assert_eq!(p["train.lr"], path.display().to_string());
        assert_eq!(p["train.batch"], "env PROBUNET_TRAIN__BATCH");
        assert_eq!(p["train.seed"], "flag --seed");
        assert_eq!(p["train.val_every"], "--set train.val_every=400");
        assert_eq!(p["log.every"], "default");
        assert_eq!(p["data.store"], path.display().to_string());
    }

    #[test]
    fn environment_variables_outside_the_spec_sections_are_ignored() {
        let (_dir, path) = spec(STORE);
        let env = env(&[("python", "/usr/bin/python3"), ("log.every", "7")]);
        let r = resolve(&path, &env, &[], &[]).unwrap();
        assert_eq!(r.experiment.log.every, 7);
        assert_eq!(r.provenance["log.every"], "env PROBUNET_LOG__EVERY");
    }

    #[test]
    fn a_table_from_the_environment_names_its_variable() {
        let (_dir, path) = spec(STORE);
        let env = env(&[(
            "train.schedule",
            "{ kind = \"step\", every = 10, gamma = 0.5 }",
        )]);
        let r = resolve(&path, &env, &[], &[]).unwrap();
        assert_eq!(
            r.experiment.train.schedule,
            Schedule::Step {
                every: 10,
                gamma: 0.5
            }
        );
        assert_eq!(
            r.provenance["train.schedule.gamma"],
            "env PROBUNET_TRAIN__SCHEDULE"
        );
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_layer_and_the_key() {
        let (_dir, path) = spec(&format!("{STORE}[train]\nbacth = 8\n"));
        let err = resolve(&path, &[], &[], &[]).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("train.bacth"), "{err}");

        let err = resolve(&path.with_file_name("none.toml"), &[], &[], &[]);
        assert!(matches!(err, Err(ConfigError::MissingSpec(_))));

        let (_dir, path) = spec(STORE);
        let err = resolve(&path, &env(&[("train.bacth", "8")]), &[], &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("env PROBUNET_TRAIN__BACTH: train.bacth:"),
            "{err}"
        );

        let err = error(STORE, &["modle.beta=1"]);
        assert!(err.starts_with("--set modle.beta=1: modle:"), "{err}");
    }

    #[test]
    fn wrong_types_are_errors_naming_the_layer_and_the_key() {
        let err = error(&format!("{STORE}[train]\nbatch = \"many\"\n"), &[]);
        assert!(
            err.contains(
                "spec.toml: train.batch: found the string \"many\", expected a whole number, 0 or more"
            ),
            "{err}"
        );

        let err = error(STORE, &["model.filters=[16, \"x\"]"]);
        assert!(
            err.starts_with("--set model.filters=[16, \"x\"]: model.filters"),
            "{err}"
        );

        let err = error(STORE, &["train.device=gpu"]);
        assert!(err.contains("train.device"), "{err}");
        assert!(err.contains("\"gpu\""), "{err}");

        // Said in TOML's words, not serde's ("signed int", "sequence").
        for (set, says) in [
            (
                "model.filters=3",
                "model.filters: found the whole number 3, expected a list, such as [1, 2]",
            ),
            ("train.lr=[1]", "train.lr: found a list, expected a number"),
            (
                "log.images=3",
                "log.images: found the whole number 3, expected a boolean",
            ),
        ] {
            let err = error(STORE, &[set]);
            assert!(err.ends_with(says), "{err}");
        }
        let err = error("[data]\nstore = \"\"\n", &[]);
        assert!(
            err.contains("data.store: is empty: give the folder of a store"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_or_malformed_spec_file_is_an_error_naming_it() {
        let err = load(Path::new("experiments/nope.toml"), &[], &[])
            .unwrap_err()
            .to_string();
        assert_eq!(err, "spec file experiments/nope.toml does not exist");

        let err = error("[train\nbatch = 1\n", &[]);
        assert!(err.contains("spec.toml is not valid TOML"), "{err}");
    }

    #[test]
    fn set_values_read_as_toml_or_else_as_text() {
        let r = resolved(
            STORE,
            &[
                "train.lr=3e-4",
                "train.batch=8",
                "model.filters=[16,32]",
                "train.device=cuda:1",
                "name=2024",
                "data.augment.flips=true",
                "log.runs_dir=/tmp/runs=a",
                "train.precision=\"bf16\"",
            ],
        )
        .unwrap();
        let e = &r.experiment;
        assert_eq!(e.train.lr, 3e-4);
        assert_eq!(e.train.batch, 8);
        assert_eq!(e.model.filters, vec![16, 32]);
        assert_eq!(e.train.device, DeviceSpec::Cuda(1));
        assert_eq!(e.name, "2024");
        assert!(e.data.augment.flips);
        assert_eq!(e.log.runs_dir, PathBuf::from("/tmp/runs=a"));
        assert_eq!(e.train.precision, Precision::Bf16);
        assert_eq!(r.provenance["model.filters"], "--set model.filters=[16,32]");
    }

    #[test]
    fn malformed_overrides_name_the_argument() {
        for arg in ["train.lr", "=3", "train..lr=3", "train lr=3"] {
            let err = error(STORE, &[arg]);
            assert!(
                err.starts_with(&format!("--set {arg}: expected key=value")),
                "{err}"
            );
        }
        let (_dir, path) = spec(STORE);
        let err = resolve(&path, &[], &[flag("--lr", "", "1")], &[]).unwrap_err();
        assert!(err.to_string().starts_with("--lr: "), "{err}");
    }

    #[test]
    fn a_higher_layer_replaces_the_alternative_a_lower_one_set() {
        let r = resolved(
            &format!("{STORE}[train]\nepochs = 3\n"),
            &["train.steps=50"],
        )
        .unwrap();
        assert_eq!(
            (r.experiment.train.epochs, r.experiment.train.steps),
            (None, Some(50))
        );
        assert!(!r.provenance.contains_key("train.epochs"));

        let synthetic = "[data.synthetic]\nitems = 40\nsize = 64\n";
        let r = resolved(synthetic, &["data.store=data/x"]).unwrap();
        assert_eq!(r.experiment.data.store, Some("data/x".into()));
        assert_eq!(r.experiment.data.synthetic, None);

        let r = resolved(
            STORE,
            &["data.synthetic.items=40", "data.synthetic.size=64"],
        )
        .unwrap();
        assert_eq!(r.experiment.data.store, None);
        let synthetic = r.experiment.data.synthetic.unwrap();
        assert_eq!(
            (synthetic.items, synthetic.size, synthetic.annotators),
            (40, 64, 4)
        );
        assert_eq!(r.provenance["data.synthetic.annotators"], "default");
    }

    #[test]
    fn one_layer_setting_both_alternatives_is_refused() {
        let err = error(&format!("{STORE}[train]\nepochs = 3\nsteps = 50\n"), &[]);
        assert!(
            err.ends_with(
                "spec.toml: train: both train.epochs (3) and train.steps (50) are set; set \
                 exactly one"
            ),
            "{err}"
        );
        let err = error(&format!("{STORE}[data.synthetic]\nitems = 40\n"), &[]);
        assert!(
            err.contains("spec.toml: data: both data.store (data/data_lidc)"),
            "{err}"
        );
        let err = error("name = \"x\"\n", &[]);
        assert_eq!(
            err,
            "data: neither data.store nor data.synthetic is set; set exactly one"
        );
    }

    #[test]
    fn validation_names_the_key_and_the_bad_value() {
        let cases = [
            ("train.batch=0", "train.batch: must be at least 1, got 0"),
            ("train.lr=0", "train.lr: must be finite and positive, got 0"),
            (
                "train.lr=-1e-3",
                "train.lr: must be finite and positive, got -0.001",
            ),
            (
                "train.lr=nan",
                "train.lr: must be finite and positive, got NaN",
            ),
            (
                "train.val_samples=0",
                "train.val_samples: must be at least 1, got 0",
            ),
            (
                "train.keep_last=0",
                "train.keep_last: must be at least 1, got 0",
            ),
            ("train.epochs=0", "train.epochs: must be at least 1, got 0"),
            ("log.every=0", "log.every: must be at least 1, got 0"),
            (
                "model.num_classes=0",
                "model.num_classes: must be positive, got 0",
            ),
            (
                "model.num_classes=2",
                "model.num_classes: must be 1: stores hold binary masks, one foreground logit \
                 per pixel, got 2",
            ),
            (
                "model.input_channels=3",
                "model.input_channels: must be 1: stores hold greyscale images, got 3",
            ),
            (
                "model.fcomb_convs=100000",
                "model.fcomb_convs: must be between 2 and 64, got 100000",
            ),
            (
                "model.filters=[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]",
                "model.filters: at most 16 levels (images would need sides divisible by 2^15), \
                 got 17",
            ),
            (
                "name=\"../elsewhere\"",
                "name: must not start with '.', got \"../elsewhere\"",
            ),
            (
                "name=\"a/b\"",
                "name: must be one folder name, without '/', '\\' or control characters, \
                 got \"a/b\"",
            ),
            ("name=\"\"", "name: must not be empty or blank, got \"\""),
            ("name=\" \"", "name: must not be empty or blank, got \" \""),
            (
                "model.latent_dim=0",
                "model.latent_dim: must be positive, got 0",
            ),
            (
                "model.filters=[]",
                "model.filters: needs one or more positive counts, got []",
            ),
            (
                "train.schedule={kind=\"step\",every=0,gamma=0.5}",
                "train.schedule.every: must be at least 1, got 0",
            ),
            (
                "train.schedule={kind=\"cosine\",warmup_steps=0,min_lr=1}",
                "train.schedule.min_lr: must be between 0 and train.lr (0.0001), got 1",
            ),
        ];
        for (set, message) in cases {
            assert_eq!(error(STORE, &[set]), format!("--set {set}: {message}"));
        }
        // Said with the layer that set the value, here the spec file.
        let synthetic = "[data.synthetic]\nsize = 60\n";
        let err = error(synthetic, &[]);
        assert!(
            err.ends_with(
                "spec.toml: data.synthetic.size: must be a positive multiple of 8 for 4 model \
                 levels, got 60"
            ),
            "{err}"
        );
    }

    #[test]
    fn schedules_read_as_a_name_or_a_table_with_a_kind() {
        let schedule = |text: &str| {
            resolved(&format!("{STORE}[train]\n{text}\n"), &[]).map(|r| r.experiment.train.schedule)
        };
        assert_eq!(
            schedule("schedule = \"constant\"").unwrap(),
            Schedule::Constant
        );
        assert_eq!(
            schedule("schedule = { kind = \"constant\" }").unwrap(),
            Schedule::Constant
        );
        assert_eq!(
            schedule("[train.schedule]\nkind = \"cosine\"\nwarmup_steps = 10\nmin_lr = 1e-6")
                .unwrap(),
            Schedule::Cosine {
                warmup_steps: 10,
                min_lr: 1e-6
            }
        );
        let err = schedule("schedule = \"cosine\"").unwrap_err().to_string();
        assert!(
            err.contains("train.schedule: schedule `cosine` takes parameters"),
            "{err}"
        );
        let err = schedule("schedule = { kind = \"step\", every = 5, gama = 0.5 }")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.schedule.gama: unknown key, expected one of: every, gamma"),
            "{err}"
        );
        let err = schedule("schedule = { kind = \"step\", every = 5 }")
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `gamma`"), "{err}");
    }

    #[test]
    fn learning_rate_schedules() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert_eq!(Schedule::Constant.lr_at(0.1, 500, 1000), 0.1);

        let cosine = Schedule::Cosine {
            warmup_steps: 10,
            min_lr: 0.01,
        };
        assert!(close(cosine.lr_at(1.0, 0, 110), 0.1));
        assert!(close(cosine.lr_at(1.0, 9, 110), 1.0));
        assert!(close(cosine.lr_at(1.0, 10, 110), 1.0));
        assert!(close(cosine.lr_at(1.0, 60, 110), 0.505));
        assert!(close(cosine.lr_at(1.0, 110, 110), 0.01));
        assert!(close(cosine.lr_at(1.0, 500, 110), 0.01));
        let lrs: Vec<f64> = (10..110).map(|s| cosine.lr_at(1.0, s, 110)).collect();
        assert!(lrs.windows(2).all(|w| w[1] < w[0]));

        let step = Schedule::Step {
            every: 100,
            gamma: 0.5,
        };
        assert_eq!(step.lr_at(1.0, 99, 1000), 1.0);
        assert_eq!(step.lr_at(1.0, 100, 1000), 0.5);
        assert_eq!(step.lr_at(1.0, 250, 1000), 0.25);
    }

    #[test]
    fn the_written_spec_reads_back_the_same_and_names_origins() {
        let (_dir, path) = spec(&format!("{STORE}[train]\nsteps = 600\n"));
        let env = env(&[("train.batch", "8")]);
        let sets = sets(&[
            "train.schedule={kind=\"cosine\",warmup_steps=5,min_lr=0}",
            "name=lidc \"quick\" # run",
        ]);
        let r = resolve(
            &path,
            &env,
            &[flag("--device", "train.device", "cpu")],
            &sets,
        )
        .unwrap();
        let text = r.to_toml().unwrap();
        assert!(
            text.contains("batch = 8  # env PROBUNET_TRAIN__BATCH\n"),
            "{text}"
        );
        assert!(
            text.contains("device = \"cpu\"  # flag --device\n"),
            "{text}"
        );
        assert!(
            text.contains("\n[train.schedule]\nkind = \"cosine\"  # --set"),
            "{text}"
        );
        assert!(!text.contains("epochs"), "{text}");

        assert_eq!(toml::from_str::<Experiment>(&text).unwrap(), r.experiment);
        let (_dir, written) = spec(&text);
        let again = resolve(&written, &[], &[], &[]).unwrap();
        assert_eq!(again.experiment, r.experiment);
    }

    #[test]
    fn shipped_experiments_load_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            // Sweep specs (a top-level [sweep] table) are checked by the sweep module.
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let sweep = toml::from_str::<toml::Table>(&text).is_ok_and(|t| t.contains_key("sweep"));
            if path.extension().is_some_and(|e| e == "toml") && !sweep {
                let r = resolve(&path, &[], &[], &[])
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                names.push(r.experiment.name);
            }
        }
        for shipped in ["lidc", "quickstart"] {
            assert!(names.iter().any(|n| n == shipped), "{shipped} in {names:?}");
        }
    }

    #[test]
    fn keys_are_known_by_full_name_or_by_an_unambiguous_last_segment() {
        let keys = known_keys();
        for key in [
            "model",
            "model.beta",
            "data.store",
            "train.schedule.gamma",
            "name",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
        }
        assert_eq!(full_key("model.beta").unwrap(), "model.beta");
        assert_eq!(full_key("beta").unwrap(), "model.beta");
        assert_eq!(full_key("latent_dim").unwrap(), "model.latent_dim");
        assert_eq!(full_key("synthetic.items").unwrap(), "data.synthetic.items");
        let err = full_key("seed").unwrap_err();
        assert!(err.contains("data.synthetic.seed or train.seed"), "{err}");
        let err = full_key("model.betta").unwrap_err();
        assert!(
            err.starts_with("unknown key in `model`, expected one of: beta, fcomb_convs"),
            "{err}"
        );
        let err = full_key("modle.beta").unwrap_err();
        assert!(
            err.starts_with("unknown key, expected one of: data, log, model, name, train"),
            "{err}"
        );
        let err = full_key("betta").unwrap_err();
        assert!(
            err.ends_with(
                "or the last part of a key (beta, lr, latent_dim, ...); did you mean model.beta?"
            ),
            "{err}"
        );
        assert_eq!(edit_distance("latnet_dim", "latent_dim"), 2);
    }

    #[test]
    fn spec_reference_is_current() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/spec-reference.md");
        let rendered = reference::render();
        if std::env::var_os("UPDATE_SPEC_REFERENCE").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &rendered).unwrap();
        }
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            current == rendered,
            "docs/spec-reference.md is out of date; rewrite it with \
             `UPDATE_SPEC_REFERENCE=1 cargo test spec_reference_is_current`"
        );
    }

    /// Renders docs/spec-reference.md from this module's documentation, the doc comments
    /// of the spec's structs (read from their sources) and `Experiment::default()`.
    mod reference {
        use super::super::Experiment;

        const SOURCES: [&str; 5] = [
            include_str!("config.rs"),
            include_str!("device.rs"),
            include_str!("model/mod.rs"),
            include_str!("data/synthetic.rs"),
            include_str!("data/loader.rs"),
        ];

        /// Meanings for fields whose source has no doc comment.
        const UNDOCUMENTED: [(&str, &str); 7] = [
            (
                "model.latent_dim",
                "Dimensions of the latent space (count).",
            ),
            (
                "model.reconstruction",
                "How the reconstruction BCE is reduced, which decides what a given `beta` \
                 means: `sum` over batch, H and W (the seed), or `batch_mean`, summed per \
                 image and averaged over the batch (Kohl et al.'s code).",
            ),
            ("model.input_channels", "Channels of the input images."),
            (
                "model.num_classes",
                "Output channels (1 for a binary mask).",
            ),
            ("data.synthetic.items", "Items (slices) generated."),
            ("data.synthetic.annotators", "Simulated readers per item."),
            ("data.synthetic.seed", "Seed of the generator."),
        ];

        struct Entry {
            variant: Option<String>,
            name: String,
            ty: Option<String>,
            doc: Option<String>,
        }

        /// The lines between `pub struct|enum name {` and its closing brace.
        fn body(name: &str) -> Option<Vec<&'static str>> {
            SOURCES.iter().find_map(|source| {
                let mut lines = source.lines().skip_while(|line| {
                    *line != format!("pub struct {name} {{")
                        && *line != format!("pub enum {name} {{")
                });
                lines.next()?;
                Some(lines.take_while(|line| *line != "}").collect())
            })
        }

        /// The fields and variants of an item, each with its doc comment.
        fn entries(name: &str) -> Vec<Entry> {
            let mut out = Vec::new();
            let (mut doc, mut variant) = (Vec::new(), None);
            for line in body(name).unwrap_or_else(|| panic!("no source for {name}")) {
                let line = line.trim();
                if line.starts_with("#[") || (line.starts_with("//") && !line.starts_with("///")) {
                    continue;
                }
                let take = |doc: &mut Vec<&str>| (!doc.is_empty()).then(|| doc.join(" "));
                if let Some(text) = line.strip_prefix("///") {
                    doc.push(text.trim());
                } else if let Some((field, ty)) = line
                    .strip_suffix(',')
                    .and_then(|l| l.trim_start_matches("pub ").split_once(": "))
                {
                    out.push(Entry {
                        variant: variant.clone(),
                        name: field.into(),
                        ty: Some(ty.into()),
                        doc: take(&mut doc),
                    });
                    doc.clear();
                } else if let Some(v) = line.strip_suffix(" {").or(line.strip_suffix(',')) {
                    variant = line.ends_with('{').then(|| snake(v));
                    out.push(Entry {
                        variant: None,
                        name: snake(v),
                        ty: None,
                        doc: take(&mut doc),
                    });
                    doc.clear();
                } else {
                    variant = None;
                    doc.clear();
                }
            }
            out
        }

        fn snake(name: &str) -> String {
            let mut out = String::new();
            for (i, c) in name.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    out.push('_');
                }
                out.push(c.to_ascii_lowercase());
            }
            out
        }

        fn one_of(names: &[String]) -> String {
            let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
            match quoted.split_last() {
                Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
                _ => quoted.join(""),
            }
        }

        /// `integer ≥ 1` for a count that `validate` refuses at 0 (it calls `positive`
        /// with the key).
        fn at_least_one(key: &str, ty: String) -> String {
            let positive = SOURCES[0].contains(&format!("positive(\"{key}\""));
            match positive {
                true => ty.replace("integer ≥ 0", "integer ≥ 1"),
                false => ty,
            }
        }

        fn spec_type(ty: &str) -> String {
            if let Some(inner) = ty.strip_prefix("Option<").and_then(|t| t.strip_suffix('>')) {
                return format!("{}, optional", spec_type(inner));
            }
            match ty {
                "String" => "string".into(),
                "PathBuf" => "path".into(),
                "bool" => "boolean".into(),
                "u64" | "usize" => "integer ≥ 0".into(),
                "i64" => "integer".into(),
                "f64" => "number".into(),
                "Vec<i64>" => "list of integers".into(),
                "DeviceSpec" => "`auto`, `cpu`, `cuda` or `cuda:N`".into(),
                "Schedule" => "`\"constant\"` or a table".into(),
                "Reduction" | "Precision" | "NanPolicy" => {
                    let names: Vec<String> = entries(ty).into_iter().map(|e| e.name).collect();
                    one_of(&names)
                }
                other => panic!("no spec type for the Rust type {other}: add one"),
            }
        }

        fn lookup<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
            match key.split_once('.') {
                None => table.get(key),
                Some((head, rest)) => lookup(table.get(head)?.as_table()?, rest),
            }
        }

        fn is_struct(ty: &str) -> bool {
            SOURCES
                .iter()
                .any(|s| s.lines().any(|l| l == format!("pub struct {ty} {{")))
        }

        fn meaning(key: &str, doc: Option<String>) -> String {
            let fallback = UNDOCUMENTED.iter().find(|(k, _)| *k == key);
            let text = match (doc, fallback) {
                (Some(_), Some(_)) => panic!("{key} is documented now: drop it from UNDOCUMENTED"),
                (Some(doc), None) => doc,
                (None, Some((_, text))) => text.to_string(),
                (None, None) => panic!("{key} has no doc comment"),
            };
            assert!(!text.contains('|'), "{key}: a | would break the table");
            text
        }

        fn rows(item: &str, prefix: &str, defaults: &toml::Table, out: &mut String) {
            for entry in entries(item) {
                let (Some(ty), None) = (entry.ty, entry.variant) else {
                    continue;
                };
                let key = format!("{prefix}{}", entry.name);
                let inner = ty
                    .strip_prefix("Option<")
                    .and_then(|t| t.strip_suffix('>'))
                    .unwrap_or(&ty);
                let text = meaning(&key, entry.doc);
                if is_struct(inner) {
                    let kind = if inner == ty {
                        "table"
                    } else {
                        "table, optional"
                    };
                    out.push_str(&format!("| `{key}` | {kind} | | {text} |\n"));
                    rows(inner, &format!("{key}."), defaults, out);
                    continue;
                }
                let default =
                    lookup(defaults, &key).map_or_else(|| "unset".into(), |v| format!("`{v}`"));
                out.push_str(&format!(
                    "| `{key}` | {} | {default} | {text} |\n",
                    at_least_one(&key, spec_type(&ty))
                ));
                if inner == "Schedule" {
                    for param in entries(inner).into_iter().filter(|e| e.variant.is_some()) {
                        let variant = param.variant.unwrap_or_default();
                        let key = format!("{key}.{}", param.name);
                        out.push_str(&format!(
                            "| `{key}` | {} | required | kind `{variant}`: {} |\n",
                            at_least_one(&key, spec_type(param.ty.as_deref().unwrap_or_default())),
                            meaning(&key, param.doc)
                        ));
                    }
                }
            }
        }

        pub fn render() -> String {
            // A synthetic table that is given takes its fields' defaults.
            let mut filled = Experiment::default();
            filled.data.synthetic = Some(Default::default());
            let defaults = toml::Table::try_from(filled).unwrap();
            let mut out = String::from(
                "# Experiment spec reference\n\n\
                 <!-- Generated from src/config.rs by its test spec_reference_is_current; \
                 edit the doc comments there and run it with UPDATE_SPEC_REFERENCE=1. -->\n\n",
            );
            for line in SOURCES[0].lines().map_while(|l| l.strip_prefix("//!")) {
                out.push_str(line.strip_prefix(' ').unwrap_or(line));
                out.push('\n');
            }
            out.push_str(
                "\n## Keys\n\n\
                 A default is the value when no layer sets the key; `unset` keys have no \
                 value unless one does.\n\n\
                 | key | type | default | meaning |\n|---|---|---|---|\n",
            );
            rows("Experiment", "", &defaults, &mut out);
            out
        }
    }
}
