//! Data: the LIDC pickle reader, the prepared store, the synthetic dataset, the split and
//! training loader, and where an experiment's data comes from ([`source`]).
pub mod images;
pub mod lidc;
pub mod loader;
pub mod pickle;
pub mod prepare;
pub mod source;
pub mod split;
pub mod store;
pub mod synthetic;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {why}", path.display())]
    Store { path: PathBuf, why: String },
    #[error("{}: {source}", path.display())]
    Lidc {
        path: PathBuf,
        source: lidc::LidcError,
    },
    #[error(transparent)]
    TooLarge(#[from] crate::memory::budget::TooLarge),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

impl DataError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A size refusal said as asked for by `who` (a spec key or flags, which the size
    /// check does not know); other errors as they are.
    pub fn asked_by(self, who: &str) -> Self {
        match self {
            DataError::TooLarge(t) => DataError::TooLarge(t.asked_by(who)),
            other => other,
        }
    }
}
