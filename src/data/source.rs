//! Where an experiment's data comes from: a prepared store, or the built-in synthetic
//! dataset, generated into a store on first use and reused after.
use super::prepare::{prepare_synthetic, Outcome, PrepareOptions, Summary};
use super::store::{Store, MANIFEST_FILE};
use super::synthetic::SyntheticConfig;
use super::DataError;
use std::path::{Path, PathBuf};

/// The folder, relative to the working folder, where synthetic stores are generated.
pub const SYNTHETIC_ROOT: &str = "data";

#[derive(Debug, Clone, PartialEq)]
pub enum DataSource {
    /// A store made by `probunet prepare`.
    Store(PathBuf),
    /// The synthetic dataset of `config`, kept in the store `dir`.
    Synthetic {
        dir: PathBuf,
        config: SyntheticConfig,
    },
}

impl DataSource {
    /// The source a spec names (`data.store` wins), or `None` when it names neither.
    /// A synthetic store goes to `data/synthetic-<hash of its settings>`.
    pub fn of(store: Option<&Path>, synthetic: Option<&SyntheticConfig>) -> Option<DataSource> {
        match (store, synthetic) {
            (Some(store), _) => Some(DataSource::Store(store.to_path_buf())),
            (None, Some(config)) => {
                let json = serde_json::to_vec(config).unwrap_or_default();
                let name = format!("synthetic-{:08x}", crc32c::crc32c(&json));
                Some(DataSource::Synthetic {
                    dir: Path::new(SYNTHETIC_ROOT).join(name),
                    config: config.clone(),
                })
            }
            (None, None) => None,
        }
    }

    /// The same source kept in `dir` instead (the absolute path a run recorded).
    pub fn at(self, dir: PathBuf) -> DataSource {
        match self {
            DataSource::Store(_) => DataSource::Store(dir),
            DataSource::Synthetic { config, .. } => DataSource::Synthetic { dir, config },
        }
    }

    pub fn dir(&self) -> &Path {
        match self {
            DataSource::Store(dir) | DataSource::Synthetic { dir, .. } => dir,
        }
    }

    /// Opens the store, generating a synthetic one that is not there yet: the store and,
    /// when one was generated, what prepare reports.
    pub fn open(&self) -> Result<(Store, Option<Summary>), DataError> {
        let summary = match self {
            DataSource::Synthetic { dir, config } => {
                let options = PrepareOptions {
                    out: dir.clone(),
                    force: false,
                    split: Default::default(),
                    split_seed: 0,
                };
                let key = format!(
                    "data.synthetic (size = {}, annotators = {})",
                    config.size, config.annotators
                );
                match prepare_synthetic(config.clone(), &options).map_err(|e| e.asked_by(&key))? {
                    Outcome::Prepared(summary) => Some(summary),
                    Outcome::AlreadyPrepared(_) => None,
                }
            }
            DataSource::Store(dir) if !dir.join(MANIFEST_FILE).is_file() => {
                return Err(DataError::Store {
                    path: dir.clone(),
                    why: "no prepared store here: make it with `probunet prepare <LIDC pickle> \
                          --out <this folder>`, or set data.synthetic to try the built-in \
                          synthetic dataset"
                        .into(),
                });
            }
            DataSource::Store(_) => None,
        };
        Ok((Store::open(self.dir())?, summary))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_synthetic_store_is_named_by_its_settings_and_can_be_moved() {
        let config = SyntheticConfig::default();
        let source = DataSource::of(None, Some(&config)).unwrap();
        assert!(source.dir().starts_with(SYNTHETIC_ROOT), "{source:?}");
        let other = SyntheticConfig {
            seed: 9,
            ..config.clone()
        };
        assert_ne!(
            source.dir(),
            DataSource::of(None, Some(&other)).unwrap().dir()
        );
        let moved = source.at(PathBuf::from("/abs/store"));
        assert_eq!(moved.dir(), Path::new("/abs/store"));
        assert!(matches!(moved, DataSource::Synthetic { .. }));
        let named = DataSource::of(Some(Path::new("data/lidc")), Some(&config)).unwrap();
        assert_eq!(named, DataSource::Store(PathBuf::from("data/lidc")));
        assert_eq!(DataSource::of(None, None), None);
    }
}
