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
                false => from_png(&bytes)?,
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
        [h, w] | [1, h, w] => (h, w),
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

fn from_png(bytes: &[u8]) -> Result<(usize, usize, Vec<f32>), String> {
    let limits = png::Limits {
        bytes: npy::MAX_ELEMENTS * 2,
    };
    let mut decoder = png::Decoder::new_with_limits(std::io::Cursor::new(bytes), limits);
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder
        .read_info()
        .map_err(|e| format!("not a readable PNG: {e}"))?;
    let (color, depth) = (reader.info().color_type, reader.info().bit_depth);
    if color != png::ColorType::Grayscale {
        return Err(format!(
            "is {color:?}, not greyscale: convert it to one grey channel first"
        ));
    }
    let size = reader.output_buffer_size().ok_or("is too large")?;
    let mut buf = vec![0; size];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("not a readable PNG: {e}"))?;
    let (h, w) = (frame.height as usize, frame.width as usize);
    let pixels = match depth {
        png::BitDepth::Sixteen => buf[..h * w * 2]
            .chunks_exact(2)
            .map(|c| f32::from(u16::from_be_bytes([c[0], c[1]])) / 65535.0)
            .collect(),
        _ => buf[..h * w].iter().map(|&v| f32::from(v) / 255.0).collect(),
    };
    Ok((h, w, pixels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(
        width: u32,
        height: u32,
        color: png::ColorType,
        depth: png::BitDepth,
        data: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(color);
        encoder.set_depth(depth);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(data).unwrap();
        writer.finish().unwrap();
        out
    }

    #[test]
    fn grey_pngs_scale_by_their_depth_and_rgb_is_refused() {
        let eight = png(
            2,
            1,
            png::ColorType::Grayscale,
            png::BitDepth::Eight,
            &[0, 255],
        );
        assert_eq!(from_png(&eight).unwrap(), (1, 2, vec![0.0, 1.0]));
        let sixteen = png(
            1,
            1,
            png::ColorType::Grayscale,
            png::BitDepth::Sixteen,
            &[0x80, 0x00],
        );
        let (_, _, v) = from_png(&sixteen).unwrap();
        assert!(
            (v[0] - 32768.0 / 65535.0).abs() < 1e-7,
            "16-bit kept exact: {v:?}"
        );
        let rgb = png(1, 1, png::ColorType::Rgb, png::BitDepth::Eight, &[1, 2, 3]);
        assert!(from_png(&rgb).unwrap_err().contains("not greyscale"));
        let mut truncated = eight.clone();
        truncated.truncate(eight.len() / 2);
        assert!(from_png(&truncated)
            .unwrap_err()
            .contains("not a readable PNG"));
    }
}
