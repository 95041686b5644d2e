//! The sweep spec: a TOML file with a top-level `[sweep]` table that names a base
//! experiment and the axes to vary over it.
//!
//! ```toml
//! [sweep]
//! name = "beta"                 # the folder runs/beta; default: the file's stem
//! base = "quickstart.toml"      # relative to this file; or an inline [sweep.base] table
//! seed = 0                      # seeds the random draws
//! repeats = 1                   # runs per configuration, train.seed = base seed + 0, 1, ...
//! samples = 4                   # random draws per grid point (with [sweep.random])
//! runs_dir = "runs"
//! set = { "train.steps" = 300 } # fixed overrides of every trial
//!
//! [sweep.grid]                  # every combination, first axis slowest
//! beta = [0.1, 1, 10, 100]      # a dotted key, or its last segments when unambiguous
//! latent_dim = [2, 6, 12]
//!
//! [sweep.random]                # seeded draws, rounded to 6 significant digits
//! "train.lr" = { log_uniform = [1e-4, 1e-2] }
//!
//! [sweep.slurm]                 # defaults of `probunet sweep --emit slurm`
//! gpus = 1
//! ```
use super::SweepError;
use crate::config;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Most trials one sweep may plan: a guard against a grid that multiplies out of hand.
pub const MAX_TRIALS: usize = 100_000;

/// A parsed and checked sweep spec.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSpec {
    /// The spec file.
    pub path: PathBuf,
    pub name: String,
    pub base: Base,
    /// Seeds the random draws.
    pub seed: u64,
    /// Runs of each configuration, with `train.seed` = the base's seed + 0, 1, ...
    pub repeats: u64,
    /// Random draws per grid point; 1 when there are random axes and it is not set.
    pub samples: u64,
    pub runs_dir: PathBuf,
    /// Overrides of every trial, as full dotted keys and values.
    pub fixed: Vec<(String, toml::Value)>,
    pub grid: Vec<GridAxis>,
    pub random: Vec<RandomAxis>,
    pub slurm: SlurmOptions,
}

/// The experiment every trial starts from.
#[derive(Debug, Clone, PartialEq)]
pub enum Base {
    /// A spec file (resolved against the sweep spec's folder).
    File(PathBuf),
    /// A table inside the sweep spec, as TOML text.
    Inline(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct GridAxis {
    /// The full dotted key, such as `model.beta`.
    pub key: String,
    pub values: Vec<toml::Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RandomAxis {
    pub key: String,
    pub distribution: Distribution,
}

/// Where a random axis draws its values from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distribution {
    /// Uniform in [lo, hi].
    Uniform { lo: f64, hi: f64 },
    /// exp of uniform in [ln lo, ln hi]: as likely in [1e-4, 1e-3] as in [1e-3, 1e-2].
    LogUniform { lo: f64, hi: f64 },
    /// An integer in lo..=hi, each as likely.
    IntUniform { lo: i64, hi: i64 },
    /// One of the values, each as likely.
    Choice(Vec<toml::Value>),
}

const DISTRIBUTIONS: [&str; 4] = ["uniform", "log_uniform", "int_uniform", "choice"];

/// Options of the emitted Slurm script; command-line flags override them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmOptions {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// GPUs per trial (`--gres=gpu:1`): 0 or unset asks for none and trains on the CPU, 1
    /// trains on it (a trial uses one device, so more is refused).
    pub gpus: Option<u32>,
    /// CPU cores per trial (`--cpus-per-task`), also its thread count; default 2.
    pub cpus: Option<u32>,
    /// Memory per trial (`--mem`), such as `16G`; unset takes the cluster's default.
    pub mem: Option<String>,
    /// Time limit per trial (`--time`), such as `02:00:00`; unset takes the partition's.
    pub time: Option<String>,
    /// Most trials running at once (the array's `%K`); default 4.
    pub concurrency: Option<u32>,
    /// More `#SBATCH` options, written as given, such as `--qos=long`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    sweep: RawSweep,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSweep {
    name: Option<String>,
    base: Option<RawBase>,
    seed: Option<u64>,
    repeats: Option<u64>,
    samples: Option<u64>,
    runs_dir: Option<PathBuf>,
    #[serde(default)]
    set: Ordered,
    #[serde(default)]
    grid: Ordered,
    #[serde(default)]
    random: Ordered,
    #[serde(default)]
    slurm: SlurmOptions,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawBase {
    Path(PathBuf),
    Inline(toml::Table),
}

/// A table whose keys keep the order they were written in.
#[derive(Debug, Default)]
struct Ordered(Vec<(String, Node)>);

#[derive(Debug)]
enum Node {
    Table(Ordered),
    Leaf(toml::Value),
}

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Node::deserialize(deserializer)? {
            Node::Table(table) => Ok(table),
            Node::Leaf(value) => Err(de::Error::custom(format!(
                "expected a table, got {}",
                value.type_str()
            ))),
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Leaf(v.into()))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Leaf(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        i64::try_from(v)
            .map(|v| Node::Leaf(v.into()))
            .map_err(|_| E::custom(format!("{v} is too large")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Leaf(v.into()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Leaf(v.into()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<toml::Value>()? {
            items.push(item);
        }
        Ok(Node::Leaf(toml::Value::Array(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value::<Node>()?;
            entries.push((key, value));
        }
        Ok(Node::Table(Ordered(entries)))
    }
}

impl Node {
    /// The node as a plain TOML value (tables lose their order, which no value needs).
    fn into_value(self) -> toml::Value {
        match self {
            Node::Leaf(value) => value,
            Node::Table(Ordered(entries)) => toml::Value::Table(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, v.into_value()))
                    .collect(),
            ),
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// The leaves of `table` with their dotted keys; `stop` says which tables are leaves.
fn flatten(
    table: Ordered,
    prefix: &str,
    stop: &dyn Fn(&Ordered) -> bool,
    out: &mut Vec<(String, Node)>,
) {
    for (key, node) in table.0 {
        let key = join(prefix, &key);
        match node {
            Node::Table(inner) if !stop(&inner) => flatten(inner, &key, stop, out),
            other => out.push((key, other)),
        }
    }
}

/// A table of one plain value, such as `{ log_uniform = [1e-4, 1e-2] }`, is a
/// distribution (its name is checked later); other tables hold more keys.
fn is_distribution(table: &Ordered) -> bool {
    table.0.len() == 1 && matches!(table.0[0].1, Node::Leaf(_))
}

impl SweepSpec {
    /// Reads and checks the sweep spec at `path`.
    pub fn load(path: &Path) -> Result<SweepSpec, SweepError> {
        let text = std::fs::read_to_string(path).map_err(|e| SweepError::Spec {
            path: path.to_path_buf(),
            why: match e.kind() {
                std::io::ErrorKind::NotFound => "does not exist".into(),
                _ => format!("cannot be read: {e}"),
            },
        })?;
        Self::parse(path, &text)
    }

    /// Adds `--set KEY=VALUE` flags to the spec's fixed overrides (`[sweep.set]`),
    /// replacing a value the spec fixes; a key that is an axis, or `train.seed` under
    /// repeats, is refused, as a trial could not take two values for it.
    pub fn set_fixed(&mut self, sets: &[String]) -> Result<(), SweepError> {
        for arg in sets {
            let refuse = |why: String| SweepError::Spec {
                path: self.path.clone(),
                why: format!("--set {arg}: {why}"),
            };
            let (written, text) = arg
                .split_once('=')
                .ok_or_else(|| refuse("expected KEY=VALUE".into()))?;
            let key = config::full_key(written.trim()).map_err(refuse)?;
            let axis = self.grid.iter().map(|a| &a.key);
            if axis
                .chain(self.random.iter().map(|a| &a.key))
                .any(|k| *k == key)
            {
                return Err(refuse(format!(
                    "{key} is an axis of this sweep; a fixed value would replace it"
                )));
            }
            if key == "train.seed" && self.repeats > 1 {
                return Err(refuse(format!(
                    "sweep.repeats = {} sets train.seed per repeat",
                    self.repeats
                )));
            }
            let value = config::toml_value(text.trim())
                .unwrap_or_else(|| toml::Value::String(text.trim().to_string()));
            self.fixed.retain(|(k, _)| *k != key);
            self.fixed.push((key, value));
        }
        Ok(())
    }

    /// Whether `text` is a sweep spec (it has a top-level `[sweep]` table) rather than
    /// an experiment spec.
    pub fn is_sweep(text: &str) -> bool {
        toml::from_str::<toml::Table>(text).is_ok_and(|t| t.contains_key("sweep"))
    }

    /// Parses `text`, read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<SweepSpec, SweepError> {
        Self::parse_text(path, text).map_err(|why| SweepError::Spec {
            path: path.to_path_buf(),
            why,
        })
    }

    /// [`SweepSpec::parse`], each fault as the text that follows the spec's path. The
    /// checks run in a fixed order, so a spec with several faults always reports the
    /// same one.
    fn parse_text(path: &Path, text: &str) -> Result<SweepSpec, String> {
        let raw = read_raw(text)?;
        let name = sweep_name(raw.name, path)?;
        let base = read_base(raw.base, path)?;
        let repeats = raw.repeats.unwrap_or(1);
        if repeats == 0 {
            return Err("sweep.repeats: must be at least 1, got 0".into());
        }
        let axes = Axes::read(raw.set, raw.grid, raw.random)?;
        let samples = samples(raw.samples, !axes.random.is_empty())?;
        axes.check_repeats(repeats)?;
        let spec = SweepSpec {
            path: path.to_path_buf(),
            name,
            base,
            seed: raw.seed.unwrap_or(0),
            repeats,
            samples,
            runs_dir: raw.runs_dir.unwrap_or_else(|| PathBuf::from("runs")),
            fixed: axes.fixed,
            grid: axes.grid,
            random: axes.random,
            slurm: raw.slurm,
        };
        if spec.grid.is_empty() && spec.random.is_empty() && repeats == 1 {
            return Err(
                "plans one trial: it has no axes in [sweep.grid] or [sweep.random] \
                        and repeats = 1; add the values to sweep over, or repeats = N to \
                        train one configuration with N seeds (one run is `probunet train`)"
                    .into(),
            );
        }
        let trials = spec.trial_count();
        if trials > MAX_TRIALS as u128 {
            return Err(format!(
                "plans {trials} trials, more than the {MAX_TRIALS} a sweep may hold"
            ));
        }
        Ok(spec)
    }

    /// Trials the spec plans: the grid's combinations x samples x repeats.
    pub fn trial_count(&self) -> u128 {
        self.grid
            .iter()
            .map(|a| a.values.len() as u128)
            .product::<u128>()
            * self.samples as u128
            * self.repeats as u128
    }

    /// The sweep's folder, `runs_dir/name`.
    pub fn folder(&self) -> PathBuf {
        self.runs_dir.join(&self.name)
    }
}

/// A TOML parse error, with the line it is on where the parser knows it.
fn located(text: &str, e: toml::de::Error) -> String {
    match e.span() {
        Some(span) => format!(
            "line {}: {}",
            text[..span.start.min(text.len())].matches('\n').count() + 1,
            e.message()
        ),
        None => e.message().to_string(),
    }
}

/// The `[sweep]` table, read only once the text is known to be TOML and to have one, so
/// an experiment spec given by mistake is named as such rather than as unknown keys.
fn read_raw(text: &str) -> Result<RawSweep, String> {
    let table: toml::Table =
        toml::from_str(text).map_err(|e| format!("is not valid TOML: {}", located(text, e)))?;
    if !table.contains_key("sweep") {
        return Err(
            "has no [sweep] table: it is an experiment spec; train it with \
             `probunet train`, or sweep over it from a sweep spec's `base`"
                .into(),
        );
    }
    let raw: RawFile = toml::from_str(text).map_err(|e| located(text, e))?;
    Ok(raw.sweep)
}

/// `sweep.name`, or the file's stem; it names the sweep's folder, so it must be a plain one.
fn sweep_name(name: Option<String>, path: &Path) -> Result<String, String> {
    let name = match name {
        Some(name) => name,
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    if name.is_empty()
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "sweep.name: {name:?} cannot name a folder: use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(name)
}

/// The base experiment: a file relative to the sweep spec's folder, or an inline table.
fn read_base(base: Option<RawBase>, path: &Path) -> Result<Base, String> {
    match base {
        None => Err(
            "sweep.base is missing: name the base experiment's spec file \
             (base = \"quickstart.toml\") or give it inline as [sweep.base]"
                .into(),
        ),
        Some(RawBase::Path(file)) => {
            let folder = path.parent().unwrap_or(Path::new(""));
            Ok(Base::File(if file.is_absolute() {
                file
            } else {
                folder.join(file)
            }))
        }
        Some(RawBase::Inline(table)) => toml::to_string(&table)
            .map(Base::Inline)
            .map_err(|e| format!("sweep.base: {e}")),
    }
}

/// Draws per grid point: only meaningful with random axes, and 1 when not set.
fn samples(samples: Option<u64>, has_random: bool) -> Result<u64, String> {
    match (samples, has_random) {
        (Some(0), _) => Err("sweep.samples: must be at least 1, got 0".into()),
        (Some(n), true) => Ok(n),
        (None, true) => Ok(1),
        (Some(n), false) => Err(format!(
            "sweep.samples = {n} needs random axes in [sweep.random]; \
             there are none"
        )),
        (None, false) => Ok(1),
    }
}

/// The `set`, `grid` and `random` tables with their keys made full, each key set by at
/// most one of them (a trial could not take two values for it).
#[derive(Default)]
struct Axes {
    fixed: Vec<(String, toml::Value)>,
    grid: Vec<GridAxis>,
    random: Vec<RandomAxis>,
    /// The table that sets each full key, to name it when another sets the key too.
    owners: BTreeMap<String, &'static str>,
}

impl Axes {
    fn read(set: Ordered, grid: Ordered, random: Ordered) -> Result<Axes, String> {
        let mut axes = Axes::default();
        let mut leaves = Vec::new();
        flatten(set, "", &|_| false, &mut leaves);
        for (written, node) in leaves {
            let key = axes.claim("set", &written)?;
            axes.fixed.push((key, node.into_value()));
        }
        let mut leaves = Vec::new();
        flatten(grid, "", &|_| false, &mut leaves);
        for (written, node) in leaves {
            let key = axes.claim("grid", &written)?;
            let values = grid_values(&written, node)?;
            axes.grid.push(GridAxis { key, values });
        }
        let mut leaves = Vec::new();
        flatten(random, "", &is_distribution, &mut leaves);
        for (written, node) in leaves {
            axes.add_random(&written, node)?;
        }
        Ok(axes)
    }

    /// The full key that `written` names in `table`, refused when another table sets it.
    fn claim(&mut self, table: &'static str, written: &str) -> Result<String, String> {
        let key = config::full_key(written)
            .map_err(|why| format!("sweep.{table}: `{written}`: {why}"))?;
        if let Some(other) = self.owners.get(&key) {
            return Err(format!(
                "sweep.{table}: `{written}` sets {key}, which sweep.{other} sets too"
            ));
        }
        self.owners.insert(key.clone(), table);
        Ok(key)
    }

    /// A random axis; the distribution's name is checked before the key, its arguments after.
    fn add_random(&mut self, written: &str, node: Node) -> Result<(), String> {
        let where_ = format!("sweep.random.{written}");
        let Node::Table(Ordered(mut entries)) = node else {
            return Err(format!(
                "{where_}: expected a distribution such as {{ log_uniform = [1e-4, 1e-2] }}, \
                 one of {}",
                DISTRIBUTIONS.join(", ")
            ));
        };
        let (kind, args) = entries.remove(0);
        if !DISTRIBUTIONS.contains(&kind.as_str()) {
            return Err(format!(
                "{where_}: unknown distribution `{kind}`, expected one of: {}",
                DISTRIBUTIONS.join(", ")
            ));
        }
        let key = self.claim("random", written)?;
        let distribution = distribution(&kind, args.into_value())
            .map_err(|why| format!("{where_}.{kind}: {why}"))?;
        self.random.push(RandomAxis { key, distribution });
        Ok(())
    }

    /// Repeats set `train.seed` per trial, so no table may set it too.
    fn check_repeats(&self, repeats: u64) -> Result<(), String> {
        match self.owners.get("train.seed") {
            Some(table) if repeats > 1 => Err(format!(
                "sweep.repeats = {repeats} sets train.seed per repeat, which sweep.{table} sets too"
            )),
            _ => Ok(()),
        }
    }
}

/// A grid axis's values: a non-empty list.
fn grid_values(written: &str, node: Node) -> Result<Vec<toml::Value>, String> {
    match node.into_value() {
        toml::Value::Array(values) if !values.is_empty() => Ok(values),
        toml::Value::Array(_) => Err(format!("sweep.grid.{written}: the list of values is empty")),
        other => Err(format!(
            "sweep.grid.{written}: expected a list of values such as [1, 10], got {other}"
        )),
    }
}

fn distribution(kind: &str, args: toml::Value) -> Result<Distribution, String> {
    let items = match args {
        toml::Value::Array(items) => items,
        other => return Err(format!("expected a list, got {other}")),
    };
    let bounds = |items: &[toml::Value]| -> Result<(f64, f64), String> {
        let numbers: Option<Vec<f64>> = items
            .iter()
            .map(|v| match v {
                toml::Value::Integer(i) => Some(*i as f64),
                toml::Value::Float(f) => Some(*f),
                _ => None,
            })
            .collect();
        match numbers.as_deref() {
            // hi - lo finite too: a uniform draw over a wider range overflows.
            Some(&[lo, hi]) if (hi - lo).is_finite() && lo < hi => Ok((lo, hi)),
            Some(&[lo, hi]) => Err(format!(
                "the bounds must be finite with lo < hi and hi - lo finite, got [{lo}, {hi}]"
            )),
            _ => Err(format!(
                "expected two numbers [lo, hi], got {}",
                toml::Value::Array(items.to_vec())
            )),
        }
    };
    match kind {
        "uniform" => bounds(&items).map(|(lo, hi)| Distribution::Uniform { lo, hi }),
        "log_uniform" => {
            let (lo, hi) = bounds(&items)?;
            if lo <= 0.0 {
                return Err(format!(
                    "the bounds of a log-uniform draw must be positive, got [{lo}, {hi}]"
                ));
            }
            Ok(Distribution::LogUniform { lo, hi })
        }
        "int_uniform" => match items.as_slice() {
            [toml::Value::Integer(lo), toml::Value::Integer(hi)] if lo < hi => {
                Ok(Distribution::IntUniform { lo: *lo, hi: *hi })
            }
            _ => Err(format!(
                "expected two integers [lo, hi] with lo < hi, got {}",
                toml::Value::Array(items)
            )),
        },
        "choice" if items.is_empty() => Err("the list of choices is empty".into()),
        "choice" => Ok(Distribution::Choice(items)),
        _ => unreachable!("only distribution tables get here"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SweepSpec, String> {
        SweepSpec::parse(Path::new("experiments/s.toml"), text).map_err(|e| e.to_string())
    }

    const HEAD: &str = "[sweep]\nbase = \"quickstart.toml\"\n";

    #[test]
    fn axes_keep_their_order_and_short_names_resolve() {
        let spec = parse(&format!(
            "{HEAD}seed = 3\nset = {{ \"train.steps\" = 50, log = {{ every = 5 }} }}\n\
             [sweep.grid]\nlatent_dim = [2, 6]\nmodel.beta = [0.1, 1]\n\"train.batch\" = [4]\n\
             [sweep.random]\nsamples = 0\n"
        ));
        // `samples` inside [sweep.random] is a key, not a distribution.
        assert!(
            spec.as_ref()
                .unwrap_err()
                .contains("sweep.random.samples: expected a distribution"),
            "{spec:?}"
        );
        let spec = parse(&format!(
            "{HEAD}seed = 3\nsamples = 2\nset = {{ \"train.steps\" = 50, log = {{ every = 5 }} }}\n\
             [sweep.grid]\nlatent_dim = [2, 6]\nmodel.beta = [0.1, 1]\n\"train.batch\" = [4]\n\
             [sweep.random]\nlr = {{ log_uniform = [1e-4, 1e-2] }}\n\
             model.reconstruction = {{ choice = [\"sum\", \"batch_mean\"] }}\n"
        ))
        .unwrap();
        assert_eq!(spec.name, "s");
        assert_eq!(spec.base, Base::File("experiments/quickstart.toml".into()));
        let keys: Vec<&str> = spec.grid.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(keys, ["model.latent_dim", "model.beta", "train.batch"]);
        let keys: Vec<&str> = spec.random.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(keys, ["train.lr", "model.reconstruction"]);
        assert_eq!(
            spec.fixed,
            [
                ("train.steps".to_string(), toml::Value::Integer(50)),
                ("log.every".to_string(), toml::Value::Integer(5)),
            ]
        );
        assert_eq!(spec.trial_count(), 2 * 2 * 2);
        assert_eq!(spec.folder(), PathBuf::from("runs/s"));
    }

    #[test]
    fn bad_specs_name_the_key_and_the_value() {
        let cases = [
            ("[sweep.grid]\nmodle.beta = [1]\n", "sweep.grid: `modle.beta`: unknown key"),
            ("[sweep.grid]\nbetta = [1]\n", "sweep.grid: `betta`: unknown key"),
            ("[sweep.grid]\nseed = [1]\n", "`seed`: ambiguous: data.synthetic.seed or train.seed"),
            ("[sweep.grid]\nbeta = []\n", "sweep.grid.beta: the list of values is empty"),
            ("[sweep.grid]\nbeta = 10\n", "sweep.grid.beta: expected a list of values such as [1, 10], got 10"),
            ("[sweep.grid]\nbeta = [1]\n\"model.beta\" = [2]\n", "sweep.grid: `model.beta` sets model.beta, which sweep.grid sets too"),
            ("set = { beta = 1 }\n[sweep.grid]\nbeta = [2]\n", "sets model.beta, which sweep.set sets too"),
            ("[sweep.random]\nlr = { log_uniform = [0, 1] }\n", "sweep.random.lr.log_uniform: the bounds of a log-uniform draw must be positive, got [0, 1]"),
            ("[sweep.random]\nlr = { uniform = [2, 1] }\n", "sweep.random.lr.uniform: the bounds must be finite with lo < hi and hi - lo finite, got [2, 1]"),
            ("[sweep.random]\nlr = { uniform = [1] }\n", "expected two numbers [lo, hi], got [1]"),
            ("[sweep.random]\nlr = { uniform = [0, nan] }\n", "the bounds must be finite with lo < hi and hi - lo finite, got [0, NaN]"),
            ("[sweep.random]\nlr = { uniform = [-1e308, 1e308] }\n", "uniform: the bounds must be finite with lo < hi and hi - lo finite, got [-1000"),
            ("[sweep.random]\nlatent_dim = { int_uniform = [2.5, 6] }\n", "expected two integers [lo, hi] with lo < hi, got [2.5, 6]"),
            ("[sweep.random]\nlr = { choice = [] }\n", "sweep.random.lr.choice: the list of choices is empty"),
            ("[sweep.random]\nlr = { normal = [0, 1] }\n", "sweep.random.lr: unknown distribution `normal`, expected one of: uniform, log_uniform, int_uniform, choice"),
            ("[sweep.random]\nlr = 0.1\n", "sweep.random.lr: expected a distribution"),
            ("samples = 3\n", "sweep.samples = 3 needs random axes"),
            ("repeats = 0\n", "sweep.repeats: must be at least 1, got 0"),
            ("repeats = 2\nset = { seed = 4 }\n", "`seed`: ambiguous"),
            ("repeats = 2\nset = { \"train.seed\" = 4 }\n", "sweep.repeats = 2 sets train.seed per repeat, which sweep.set sets too"),
            ("name = \"a/b\"\n", "sweep.name: \"a/b\" cannot name a folder"),
            ("smaples = 3\n", "unknown field `smaples`"),
            ("seed = 1\n", "plans one trial: it has no axes"),
        ];
        for (extra, message) in cases {
            let err = parse(&format!("{HEAD}{extra}")).unwrap_err();
            assert!(
                err.starts_with("experiments/s.toml: ") && err.contains(message),
                "{extra}\n  gave: {err}\n  want: {message}"
            );
        }
        let err = parse("[sweep]\n").unwrap_err();
        assert!(err.contains("sweep.base is missing"), "{err}");
        let err = parse("name = \"x\"\n").unwrap_err();
        assert!(err.contains("has no [sweep] table"), "{err}");
        let err = parse("[sweep\n").unwrap_err();
        assert!(err.contains("is not valid TOML"), "{err}");
        let err = SweepSpec::load(Path::new("experiments/none.toml")).unwrap_err();
        assert_eq!(err.to_string(), "experiments/none.toml: does not exist");
    }

    #[test]
    fn an_inline_base_and_slurm_options_read_back() {
        let spec = parse(
            "[sweep]\nname = \"x\"\n[sweep.base]\nname = \"tiny\"\n[sweep.base.data.synthetic]\n\
             size = 32\n[sweep.grid]\nbeta = [1, 2]\n[sweep.slurm]\ngpus = 1\nmem = \"4G\"\n",
        )
        .unwrap();
        let Base::Inline(text) = &spec.base else {
            panic!("{:?}", spec.base)
        };
        let table: toml::Table = toml::from_str(text).unwrap();
        assert_eq!(table["data"]["synthetic"]["size"].as_integer(), Some(32));
        assert_eq!(spec.slurm.gpus, Some(1));
        assert_eq!(spec.slurm.mem.as_deref(), Some("4G"));
        let err = parse(&format!("{HEAD}[sweep.slurm]\ngpu = 1\n")).unwrap_err();
        assert!(err.contains("unknown field `gpu`"), "{err}");
    }
}
