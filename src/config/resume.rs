//! What a resume may change in a run's recorded spec.
//!
//! `train --resume` reads the run's spec.toml and layers the environment, flags and `--set`
//! over it. Keys that say how long and how training goes on may change; the run's spec.toml
//! then records them, so that `runs`, `eval` and the next resume see the run as it is being
//! trained. Keys that give the checkpoint and the data cursor their meaning (the data, the
//! model, the batch, the seed) may not: a resume that changed them would silently train
//! something else.
use super::{text_layer, ConfigError, Experiment, Resolved};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Keys a resume may change (a key, or a table and everything in it).
const MAY_CHANGE: &[&str] = &[
    "train.steps",
    "train.epochs",
    "train.lr",
    "train.schedule",
    "train.val_every",
    "train.val_samples",
    "train.val_items",
    "train.device",
    "train.precision",
    "train.checkpoint_every",
    "train.keep_last",
    "train.on_nan",
    "log.every",
    "log.images",
];

/// Keys that do not apply to a resume, whose folder is given: never a change.
const NOT_APPLICABLE: &[&str] = &["name", "log.runs_dir"];

/// One key a resume changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// The dotted key, such as `train.steps`.
    pub key: String,
    /// Its recorded value as TOML, or `unset`.
    pub was: String,
    /// Its new value as TOML, or `unset`.
    pub now: String,
    /// Where the new value came from, such as `--set train.steps=600`.
    pub origin: String,
}

/// Loads a run's recorded spec (`text`, read from `path`) alone: no environment, flags or
/// `--set` over it.
pub fn load_recorded(text: &str, path: &Path) -> Result<Resolved, ConfigError> {
    super::resolve_layers(text_layer(text, path)?, &[], &[], &[])
}

fn covers(list: &[&str], key: &str) -> bool {
    list.iter().any(|k| {
        key.strip_prefix(k)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    })
}

/// Every leaf of `experiment` as (dotted key, TOML value).
fn values(experiment: &Experiment) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    super::leaves(
        &toml::Table::try_from(experiment)?,
        "",
        &mut |key, value| {
            out.insert(key, value.to_string());
        },
    );
    Ok(out)
}

/// Why a key outside [`MAY_CHANGE`] stays.
fn why_fixed(key: &str) -> &'static str {
    match key.split('.').next() {
        Some("data") => "the run's data cursor and validation split are in that data",
        Some("model") => "the checkpoint holds a model of that shape and objective",
        _ if key == "train.batch" => {
            "the data cursor and the learning-rate schedule count in its batches"
        }
        _ if key == "train.seed" => "the data order and the draws so far came from it",
        _ => "the checkpoint was trained with it",
    }
}

impl Resolved {
    /// What `self`, a resume's spec, changes in `recorded`, the run's spec as written.
    /// A change to a key that must stay is refused, naming the key, both values and where
    /// the new one came from.
    pub fn changes_from(&self, recorded: &Experiment) -> Result<Vec<Change>, ConfigError> {
        let (was, now) = (values(recorded)?, values(&self.experiment)?);
        let keys: BTreeSet<&String> = was.keys().chain(now.keys()).collect();
        let shown = |value: Option<&String>| value.map_or("unset".into(), String::clone);
        let mut changes = Vec::new();
        for key in keys {
            let (a, b) = (was.get(key), now.get(key));
            if a == b || covers(NOT_APPLICABLE, key) {
                continue;
            }
            let change = Change {
                key: key.clone(),
                was: shown(a),
                now: shown(b),
                origin: self.origin(key),
            };
            if !covers(MAY_CHANGE, key) {
                return Err(ConfigError::Invalid {
                    key: key.clone(),
                    why: format!(
                        "cannot change when a run resumes ({}): the run has {}, {} asks for \
                         {}; start a new run for that",
                        why_fixed(key),
                        change.was,
                        change.origin,
                        change.now
                    ),
                });
            }
            changes.push(change);
        }
        Ok(changes)
    }

    /// Where `key`'s value came from.
    fn origin(&self, key: &str) -> String {
        self.provenance
            .get(key)
            .cloned()
            .unwrap_or_else(|| "default".into())
    }

    /// `self` as the spec.toml of a run resumed at `step` with `changes`: keys it leaves
    /// alone keep the origins that `recorded` (the spec.toml's text) gives them, and the
    /// changed ones name their new origin and the step.
    pub fn to_toml_resumed(
        &self,
        recorded: &str,
        changes: &[Change],
        step: u64,
    ) -> Result<String, ConfigError> {
        let mut provenance = recorded_origins(recorded);
        for change in changes {
            provenance.insert(
                change.key.clone(),
                format!("{} (from the resume at step {step})", change.origin),
            );
        }
        Resolved {
            experiment: self.experiment.clone(),
            provenance,
        }
        .to_toml()
    }
}

/// The origin comments of a spec.toml that [`Resolved::to_toml`] wrote, by dotted key.
fn recorded_origins(text: &str) -> BTreeMap<String, String> {
    let mut prefix = String::new();
    let mut origins = BTreeMap::new();
    for line in text.lines() {
        if let Some(table) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            prefix = format!("{table}.");
        } else if let (Some((key, _)), Some((_, origin))) =
            (line.split_once(" = "), line.rsplit_once("  # "))
        {
            origins.insert(format!("{prefix}{}", key.trim()), origin.to_string());
        }
    }
    origins
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_str, Flag};

    const SPEC: &str = "name = \"r\"\n[data.synthetic]\nsize = 32\n[train]\nsteps = 40\n";

    /// The spec a run records, and the resume's spec with `sets` over it.
    fn recorded_and_resumed(sets: &[&str]) -> (String, Resolved, Resolved) {
        let path = Path::new("runs/r/spec.toml");
        let first = load_str(SPEC, "experiments/r.toml", &[], &[]).unwrap();
        let text = first.to_toml().unwrap();
        let recorded = load_recorded(&text, path).unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let flags = [Flag {
            flag: "--device".into(),
            key: "train.device".into(),
            value: "cpu".into(),
        }];
        let resumed =
            super::super::resolve_layers(text_layer(&text, path).unwrap(), &[], &flags, &sets)
                .unwrap();
        (text, recorded, resumed)
    }

    #[test]
    fn a_resume_may_lengthen_training_and_records_where_that_came_from() {
        let (text, recorded, resumed) = recorded_and_resumed(&["train.steps=60", "train.lr=3e-4"]);
        let changes = resumed.changes_from(&recorded.experiment).unwrap();
        let keys: Vec<&str> = changes.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["train.device", "train.lr", "train.steps"]);
        assert_eq!(changes[2].was, "40");
        assert_eq!(changes[2].now, "60");
        assert_eq!(changes[2].origin, "--set train.steps=60");
        let written = resumed.to_toml_resumed(&text, &changes, 40).unwrap();
        assert!(
            written.contains("steps = 60  # --set train.steps=60 (from the resume at step 40)"),
            "{written}"
        );
        // Keys the resume left alone keep the origin the first run recorded.
        assert!(
            written.contains("size = 32  # experiments/r.toml"),
            "{written}"
        );
        assert!(written.contains("batch = 5  # default"), "{written}");
        let again = load_recorded(&written, Path::new("spec.toml")).unwrap();
        assert_eq!(again.experiment, resumed.experiment);
    }

    #[test]
    fn a_resume_refuses_to_change_the_data_model_batch_or_seed() {
        for (set, key, why) in [
            (
                "data.synthetic.size=64",
                "data.synthetic.size",
                "data cursor",
            ),
            ("model.latent_dim=3", "model.latent_dim", "shape"),
            ("train.batch=4", "train.batch", "batches"),
            ("train.seed=7", "train.seed", "draws"),
        ] {
            let (_, recorded, resumed) = recorded_and_resumed(&[set]);
            let err = resumed.changes_from(&recorded.experiment).unwrap_err();
            let text = err.to_string();
            assert!(text.starts_with(&format!("{key}: cannot change")), "{text}");
            assert!(text.contains(why), "{text}");
            assert!(text.contains(&format!("--set {set} asks for")), "{text}");
        }
    }

    #[test]
    fn the_folder_keys_and_an_unchanged_spec_are_no_change() {
        let (_, recorded, resumed) =
            recorded_and_resumed(&["name=other", "log.runs_dir=/elsewhere", "train.steps=40"]);
        let changes = resumed.changes_from(&recorded.experiment).unwrap();
        assert_eq!(
            changes.iter().map(|c| c.key.as_str()).collect::<Vec<_>>(),
            ["train.device"]
        );
    }
}
