//! What predict reads: image files (PNG 8/16-bit greyscale, `.npy` arrays), folders of
//! them, or `store:SPLIT` of the run's own store; each decoded to `[0, 1]` floats the way
//! stores hold images (PNG by its bit depth's range; `.npy` floats as they are, integer
//! arrays by their dtype's range).
use super::npy;
use crate::data::split::SplitName;
use crate::data::store::Store;
use std::path::{Path, PathBuf};

/// One input as asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    File(PathBuf),
    /// Item `item` of the run's store, from split `split`.
    Store {
        split: SplitName,
        item: usize,
    },
}

/// A decoded image, `height x width` in `[0, 1]`.
#[derive(Debug, Clone)]
pub struct InputImage {
    /// What the user gave: the file, or `store:SPLIT/KEY`.
    pub source: String,
    /// The output folder's name: the file's stem, or the store key.
    pub name: String,
    /// Keys each image's noise: its position in the inputs, or its store index, so the
    /// samples do not depend on `--batch` (and `store:` inputs match eval's).
    pub item: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<f32>,
}

/// The file extensions predict reads.
const EXTENSIONS: [&str; 2] = ["png", "npy"];

/// The inputs in order: files as given, a folder's PNG and `.npy` files sorted by name,
/// `store:SPLIT` as that split's items. An argument that is none of these is an error
/// naming it.
pub fn expand(inputs: &[String], store: Option<&Store>) -> Result<Vec<Source>, String> {
    let mut sources = Vec::new();
    for input in inputs {
        if let Some(split) = input.strip_prefix("store:") {
            let split: SplitName = split
                .parse()
                .map_err(|e| format!("{input}: {e} (store:train, store:val or store:test)"))?;
            let store = store.ok_or_else(|| format!("{input}: the run's store is not there"))?;
            sources.extend(
                store
                    .split(split)
                    .iter()
                    .map(|&item| Source::Store { split, item }),
            );
            continue;
        }
        let path = PathBuf::from(input);
        if path.is_dir() {
            sources.extend(folder_files(&path)?.into_iter().map(Source::File));
        } else if path.is_file() {
            sources.push(Source::File(path));
        } else {
            return Err(format!(
                "{input}: no such file or folder (an image, a folder, or store:SPLIT)"
            ));
        }
    }
    if sources.is_empty() {
        return Err(format!("no images in {}", inputs.join(" ")));
    }
    Ok(sources)
}

fn folder_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        let known = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
        if known && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Decodes `source`; the error says what is wrong with it (its name is added by the caller).
pub fn decode(
    source: &Source,
    position: usize,
    store: Option<&Store>,
) -> Result<InputImage, String> {
    match source {
        Source::File(path) => {
            let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
            let is_npy = path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
            let (height, width, pixels) = match is_npy {
                true => from_npy(&bytes)?,
                false => crate::data::images::decode_grey(&bytes)?,
            };
            let name = path.file_stem().map_or_else(
                || format!("image-{position}"),
                |s| s.to_string_lossy().into_owned(),
            );
            Ok(InputImage {
                source: path.display().to_string(),
                name,
                item: position,
                height,
                width,
                pixels,
            })
        }
        Source::Store { split, item } => {
            let store = store.ok_or("the run's store is not there")?;
            let image = store
                .images
                .f_get(*item as i64)
                .map_err(|e| e.to_string())?;
            let size = image.size();
            let pixels = image
                .f_to_kind(tch::Kind::Float)
                .and_then(|t| t.f_reshape([-1]))
                .and_then(Vec::<f32>::try_from)
                .map_err(|e| e.to_string())?;
            let key = store.manifest.keys[*item].clone();
            Ok(InputImage {
                source: format!("store:{split}/{key}"),
                name: key,
                item: *item,
                height: size[size.len() - 2] as usize,
                width: size[size.len() - 1] as usize,
                pixels,
            })
        }
    }
}

fn from_npy(bytes: &[u8]) -> Result<(usize, usize, Vec<f32>), String> {
    let array = npy::parse(bytes)?;
    let (h, w) = match array.shape[..] {
        [h, w] | [1, h, w] if h > 0 && w > 0 => (h, w),
        [h, w] | [1, h, w] => return Err(format!("is {h}x{w}: an image with no pixels")),
        _ => {
            return Err(format!(
                "shape {:?} is not an image (H, W) or (1, H, W)",
                array.shape
            ))
        }
    };
    if let Some(v) = array.values.iter().find(|v| !v.is_finite()) {
        return Err(format!("holds {v}; images must be finite"));
    }
    Ok((h, w, array.values))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An array with no pixels is that input's own error, not the whole call's.
    #[test]
    fn an_npy_without_pixels_is_refused_by_itself() {
        for shape in [[0usize, 32], [32, 0]] {
            let mut bytes = Vec::new();
            npy::write_f32(&mut bytes, &shape, &[]).unwrap();
            let err = from_npy(&bytes).unwrap_err();
            let want = format!("is {}x{}: an image with no pixels", shape[0], shape[1]);
            assert_eq!(err, want);
        }
        let mut bytes = Vec::new();
        npy::write_f32(&mut bytes, &[1, 2, 2], &[0.0, 0.5, 1.0, 0.25]).unwrap();
        assert_eq!(from_npy(&bytes).unwrap(), (2, 2, vec![0.0, 0.5, 1.0, 0.25]));
    }
}
