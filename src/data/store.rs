//! The prepared dataset store, `data/<name>/`: one safetensors file with `images` (f32
//! `[N, 1, H, W]`) and `masks` (u8 `[N, A, H, W]`), and `manifest.json` describing where it
//! came from and how it is split.
//!
//! A store is built in a hidden sibling folder and renamed into place, so an interrupted
//! prepare never leaves half a store. The array file is streamed item by item and never
//! held in memory whole.
use super::split::{Split, SplitName};
use super::synthetic::SyntheticConfig;
use super::DataError;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub const ARRAYS_FILE: &str = "data.safetensors";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT: &str = "probunet-store/1";

/// The array shapes of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreShape {
    pub items: usize,
    pub annotators: usize,
    pub height: usize,
    pub width: usize,
}

impl StoreShape {
    pub fn pixels(&self) -> usize {
        self.height * self.width
    }

    fn image_bytes(&self) -> usize {
        self.items * self.pixels() * 4
    }

    fn mask_bytes(&self) -> usize {
        self.items * self.annotators * self.pixels()
    }
}

/// One input file, so a second prepare of the same input can be recognised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    pub path: String,
    pub size: u64,
    /// CRC-32C of the whole file, hex.
    pub crc32c: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Source {
    Pickle { files: Vec<SourceFile> },
    Synthetic { config: SyntheticConfig },
}

/// Element types met in the input, for the record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DtypesSeen {
    pub image: Vec<String>,
    pub masks: Vec<String>,
}

/// Figures gathered while the arrays are written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    pub image_min: f32,
    pub image_max: f32,
    /// Per annotator, the fraction of items whose mask is all zero.
    pub empty_mask_fraction: Vec<f64>,
}

/// What an ideal model would score: the GED of fresh draws from the true annotator
/// distribution against the given annotations (only the synthetic generator knows it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdealReference {
    pub samples: usize,
    pub convention: String,
    /// NaN for an empty split, which JSON writes as null.
    #[serde(deserialize_with = "nan_if_null")]
    pub ged_val: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub ged_test: f64,
}

/// Reads back the null that serde_json writes for NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub probunet_version: String,
    pub source: Source,
    pub shape: StoreShape,
    pub dtypes_seen: DtypesSeen,
    pub keys: Vec<String>,
    pub patients: Vec<String>,
    pub series_uids: Vec<Option<String>>,
    pub split: Split,
    pub stats: Stats,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ideal: Option<IdealReference>,
}

/// Streams the two arrays into `path`: `image(i, buf)` fills item i's `H*W` pixels,
/// `masks(i, buf)` its `A*H*W` mask values (0 or 1). Returns the value range and the
/// empty-mask fractions.
pub fn write_arrays(
    path: &Path,
    shape: StoreShape,
    mut image: impl FnMut(usize, &mut [f32]) -> Result<(), DataError>,
    mut masks: impl FnMut(usize, &mut [u8]) -> Result<(), DataError>,
) -> Result<Stats, DataError> {
    let io = |e| DataError::io(path, e);
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
    let (image_bytes, mask_bytes) = (shape.image_bytes(), shape.mask_bytes());
    let header = serde_json::json!({
        "__metadata__": { "format": FORMAT },
        "images": {
            "dtype": "F32",
            "shape": [shape.items, 1, shape.height, shape.width],
            "data_offsets": [0, image_bytes],
        },
        "masks": {
            "dtype": "U8",
            "shape": [shape.items, shape.annotators, shape.height, shape.width],
            "data_offsets": [image_bytes, image_bytes + mask_bytes],
        },
    });
    let mut header = serde_json::to_vec(&header).expect("a JSON value serialises");
    // safetensors pads the header with spaces so the data starts 8-byte aligned.
    header.resize(header.len().next_multiple_of(8), b' ');
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&header).map_err(io)?;

    let mut pixels = vec![0f32; shape.pixels()];
    let mut bytes = Vec::with_capacity(pixels.len() * 4);
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for i in 0..shape.items {
        image(i, &mut pixels)?;
        bytes.clear();
        for &p in &pixels {
            lo = lo.min(p);
            hi = hi.max(p);
            bytes.extend_from_slice(&p.to_le_bytes());
        }
        out.write_all(&bytes).map_err(io)?;
    }
    let mut values = vec![0u8; shape.annotators * shape.pixels()];
    let mut empty = vec![0usize; shape.annotators];
    for i in 0..shape.items {
        masks(i, &mut values)?;
        for (a, mask) in values.chunks_exact(shape.pixels()).enumerate() {
            if mask.iter().all(|&v| v == 0) {
                empty[a] += 1;
            }
        }
        out.write_all(&values).map_err(io)?;
    }
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    let n = shape.items.max(1) as f64;
    Ok(Stats {
        image_min: lo,
        image_max: hi,
        empty_mask_fraction: empty.iter().map(|&e| e as f64 / n).collect(),
    })
}

/// A store opened for training or evaluation: the arrays as CPU tensors.
#[derive(Debug)]
pub struct Store {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// f32 `[N, 1, H, W]`.
    pub images: Tensor,
    /// u8 `[N, A, H, W]`, values 0 or 1.
    pub masks: Tensor,
}

impl Store {
    /// Opens `dir`, checking that the arrays agree with the manifest.
    pub fn open(dir: &Path) -> Result<Store, DataError> {
        let manifest = read_manifest(dir)?;
        let path = dir.join(ARRAYS_FILE);
        let bad = |why: String| DataError::Store {
            path: path.clone(),
            why,
        };
        let mut file = File::open(&path).map_err(|e| DataError::io(&path, e))?;
        let len = file.metadata().map_err(|e| DataError::io(&path, e))?.len();
        let mut prefix = [0u8; 8];
        file.read_exact(&mut prefix)
            .map_err(|_| bad("shorter than a safetensors header".into()))?;
        let header_len = u64::from_le_bytes(prefix);
        let shape = manifest.shape;
        let expected = 8 + header_len + (shape.image_bytes() + shape.mask_bytes()) as u64;
        if header_len > 1 << 20 || len != expected {
            return Err(bad(format!(
                "{len} bytes, but the manifest's shape {shape:?} needs {expected}: truncated or not this store's file"
            )));
        }
        // SAFETY: the map is read-only and lives only for the copies below; a store is
        // written once and renamed into place, never modified in place.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| DataError::io(&path, e))?;
        let data = &map[8 + header_len as usize..];
        let (h, w) = (shape.height as i64, shape.width as i64);
        let images = Tensor::f_from_data_size(
            &data[..shape.image_bytes()],
            &[shape.items as i64, 1, h, w],
            Kind::Float,
        )?;
        let masks = Tensor::f_from_data_size(
            &data[shape.image_bytes()..],
            &[shape.items as i64, shape.annotators as i64, h, w],
            Kind::Uint8,
        )?;
        Ok(Store {
            dir: dir.to_path_buf(),
            manifest,
            images,
            masks,
        })
    }

    pub fn split(&self, part: SplitName) -> &[usize] {
        self.manifest.split.indices(part)
    }
}

pub fn read_manifest(dir: &Path) -> Result<Manifest, DataError> {
    let path = dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| DataError::Store {
        path: path.clone(),
        why: e.to_string(),
    })?;
    if manifest.format != FORMAT {
        return Err(DataError::Store {
            path,
            why: format!(
                "format {:?}, this probunet reads {FORMAT:?}",
                manifest.format
            ),
        });
    }
    Ok(manifest)
}

/// A store under construction in a hidden sibling of its final folder; `commit` renames it
/// into place and dropping it without commit removes it.
#[derive(Debug)]
pub struct StoreBuilder {
    partial: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StoreBuilder {
    pub fn new(target: &Path) -> Result<Self, DataError> {
        let name = target.file_name().ok_or_else(|| DataError::Store {
            path: target.into(),
            why: "not a folder name".into(),
        })?;
        let parent = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
        let prefix = format!(".{}.partial-", name.to_string_lossy());
        remove_stale_partials(parent, &prefix)?;
        let partial = parent.join(format!("{prefix}{}", std::process::id()));
        fs::create_dir(&partial).map_err(|e| DataError::io(&partial, e))?;
        Ok(Self {
            partial,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    /// Where the array file goes while the store is built.
    pub fn arrays_path(&self) -> PathBuf {
        self.partial.join(ARRAYS_FILE)
    }

    /// Writes the manifest and moves the store into place, replacing an existing store
    /// only after the new one is complete.
    pub fn commit(mut self, manifest: &Manifest) -> Result<PathBuf, DataError> {
        let path = self.partial.join(MANIFEST_FILE);
        let json = serde_json::to_vec_pretty(manifest).expect("the manifest serialises");
        fs::write(&path, json).map_err(|e| DataError::io(&path, e))?;
        let old = self.partial.with_extension("old");
        let replacing = self.target.exists();
        if replacing {
            fs::rename(&self.target, &old).map_err(|e| DataError::io(&self.target, e))?;
        }
        fs::rename(&self.partial, &self.target).map_err(|e| DataError::io(&self.target, e))?;
        self.committed = true;
        if replacing {
            fs::remove_dir_all(&old).map_err(|e| DataError::io(&old, e))?;
        }
        Ok(self.target.clone())
    }
}

/// Removes what killed prepares left behind: `<prefix><pid>` folders whose process is gone.
fn remove_stale_partials(parent: &Path, prefix: &str) -> Result<(), DataError> {
    let entries = fs::read_dir(parent).map_err(|e| DataError::io(parent, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive || pid == std::process::id().to_string() {
            let path = entry.path();
            fs::remove_dir_all(&path).map_err(|e| DataError::io(&path, e))?;
        }
    }
    Ok(())
}

impl Drop for StoreBuilder {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.partial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_split_has_a_nan_ideal_reference_that_reads_back() {
        let ideal = IdealReference {
            samples: 16,
            convention: "phiseg".into(),
            ged_val: 0.25,
            ged_test: f64::NAN,
        };
        let json = serde_json::to_string(&ideal).unwrap();
        assert!(json.contains("\"ged_test\":null"), "{json}");
        let back: IdealReference = serde_json::from_str(&json).unwrap();
        assert_eq!(back.ged_val, 0.25);
        assert!(back.ged_test.is_nan());
    }
}
