//! Your own data: PNG images with one PNG mask per annotator, as a folder layout
//! (`images/<id>.png`, `masks/<annotator>/<id>.png`) or a CSV manifest
//! (`image,mask_0,...,mask_k[,patient]`, paths relative to the CSV's folder).
//!
//! Images are greyscale PNG scaled to [0, 1] by their bit depth's range (16-bit kept
//! exact); masks are any PNG, a pixel foreground where any colour channel is non-zero.
use regex::Regex;
use std::path::{Path, PathBuf};

/// Refuse images with more pixels than this (a 16384 x 16384 image).
pub const MAX_PIXELS: usize = 1 << 28;

/// One item's files.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemFiles {
    pub id: String,
    pub image: PathBuf,
    /// One per annotator; `None` where the annotator's mask is missing.
    pub masks: Vec<Option<PathBuf>>,
    pub patient: String,
}

/// What to do with a missing mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Missing {
    /// Refuse, naming the id and annotator.
    #[default]
    Error,
    /// An all-background mask: the annotator saw nothing.
    Empty,
}

fn reader(bytes: &[u8]) -> Result<png::Reader<std::io::Cursor<&[u8]>>, String> {
    let limits = png::Limits {
        bytes: MAX_PIXELS * 2,
    };
    let mut decoder = png::Decoder::new_with_limits(std::io::Cursor::new(bytes), limits);
    decoder.set_transformations(png::Transformations::EXPAND);
    decoder
        .read_info()
        .map_err(|e| format!("not a readable PNG: {e}"))
}

/// Height and width from a PNG's header.
pub fn png_size(bytes: &[u8]) -> Result<(usize, usize), String> {
    let reader = reader(bytes)?;
    let info = reader.info();
    Ok((info.height as usize, info.width as usize))
}

/// The decoded pixels, all channels, and how many bytes a sample takes (1 or 2).
fn decode(bytes: &[u8]) -> Result<(usize, usize, png::ColorType, Vec<u8>, usize), String> {
    let mut reader = reader(bytes)?;
    let size = reader.output_buffer_size().ok_or("is too large")?;
    let mut buf = vec![0; size];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("not a readable PNG: {e}"))?;
    let depth = match frame.bit_depth {
        png::BitDepth::Sixteen => 2,
        _ => 1,
    };
    buf.truncate(frame.buffer_size());
    let (h, w) = (frame.height as usize, frame.width as usize);
    Ok((h, w, frame.color_type, buf, depth))
}

/// A greyscale PNG as `(height, width, pixels in [0, 1])`.
pub fn decode_grey(bytes: &[u8]) -> Result<(usize, usize, Vec<f32>), String> {
    let (h, w, color, buf, depth) = decode(bytes)?;
    if color != png::ColorType::Grayscale {
        return Err(format!(
            "is {color:?}, not greyscale: convert it to one grey channel first"
        ));
    }
    let pixels = match depth {
        2 => buf
            .chunks_exact(2)
            .map(|c| f32::from(u16::from_be_bytes([c[0], c[1]])) / 65535.0)
            .collect(),
        _ => buf.iter().map(|&v| f32::from(v) / 255.0).collect(),
    };
    Ok((h, w, pixels))
}

/// A mask PNG of any colour type as 0/1: foreground where any colour channel is non-zero
/// (alpha is ignored).
pub fn decode_mask(bytes: &[u8]) -> Result<(usize, usize, Vec<u8>), String> {
    let (h, w, color, buf, depth) = decode(bytes)?;
    let (channels, colours) = match color {
        png::ColorType::Grayscale => (1, 1),
        png::ColorType::GrayscaleAlpha => (2, 1),
        png::ColorType::Rgb => (3, 3),
        png::ColorType::Rgba => (4, 3),
        png::ColorType::Indexed => return Err("is still indexed after expansion".into()),
    };
    let pixel = channels * depth;
    let mask = buf
        .chunks_exact(pixel)
        .map(|p| u8::from(p[..colours * depth].iter().any(|&b| b != 0)))
        .collect();
    Ok((h, w, mask))
}

/// The patient of `id`: the regex's first group (or whole match), else the id itself.
fn patient_of(id: &str, regex: Option<&Regex>) -> Result<String, String> {
    let Some(regex) = regex else {
        return Ok(id.to_string());
    };
    let caps = regex.captures(id).ok_or_else(|| {
        format!(
            "id {id:?} does not match --patient-regex {}",
            regex.as_str()
        )
    })?;
    let found = caps.get(1).or_else(|| caps.get(0)).map(|m| m.as_str());
    Ok(found.unwrap_or(id).to_string())
}

fn pngs(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png"))
        {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `root/images/<id>.png` with `root/masks/<annotator>/<id>.png`; annotators are the
/// subfolders of `masks/` by name. Returns the items and the annotators' names.
pub fn from_folder(
    root: &Path,
    regex: Option<&Regex>,
    missing: Missing,
) -> Result<(Vec<ItemFiles>, Vec<String>), String> {
    let images = pngs(&root.join("images"))?;
    let masks_dir = root.join("masks");
    let mut annotators: Vec<PathBuf> = std::fs::read_dir(&masks_dir)
        .map_err(|e| {
            format!(
                "{}: {e} (the masks go in masks/<annotator>/<id>.png)",
                masks_dir.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    annotators.sort();
    if annotators.is_empty() {
        return Err(format!(
            "{}: no annotator folders (masks/<annotator>/<id>.png)",
            masks_dir.display()
        ));
    }
    if images.is_empty() {
        return Err(format!("{}: no .png images", root.join("images").display()));
    }
    let mut items = Vec::with_capacity(images.len());
    for image in images {
        let id = stem(&image);
        let masks = annotators
            .iter()
            .map(|a| {
                let path = a.join(format!("{id}.png"));
                match (path.is_file(), missing) {
                    (true, _) => Ok(Some(path)),
                    (false, Missing::Empty) => Ok(None),
                    (false, Missing::Error) => Err(format!(
                        "image {id}: no mask {} (pass --missing empty if the annotator saw nothing)",
                        path.display()
                    )),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let patient = patient_of(&id, regex)?;
        items.push(ItemFiles {
            id,
            image,
            masks,
            patient,
        });
    }
    Ok((items, annotators.iter().map(|a| stem(a)).collect()))
}

/// A CSV with a header `image,mask_0,...,mask_k[,patient]`; paths relative to its folder.
/// An empty mask cell is a missing mask.
pub fn from_csv(
    csv_path: &Path,
    regex: Option<&Regex>,
    missing: Missing,
) -> Result<(Vec<ItemFiles>, Vec<String>), String> {
    let base = csv_path.parent().unwrap_or(Path::new("."));
    let mut reader = csv::Reader::from_path(csv_path).map_err(|e| e.to_string())?;
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| e.to_string())?
        .iter()
        .map(String::from)
        .collect();
    if header.first().map(String::as_str) != Some("image") {
        return Err(
            "the first column must be `image` (then mask_0, mask_1, ..., and optionally patient)"
                .into(),
        );
    }
    let mask_columns: Vec<usize> = (1..header.len())
        .filter(|&c| header[c].starts_with("mask"))
        .collect();
    if mask_columns.is_empty() {
        return Err("no mask columns (mask_0, mask_1, ...)".into());
    }
    let patient_column = header.iter().position(|h| h == "patient");
    let mut items = Vec::new();
    for (line, record) in reader.records().enumerate() {
        let row = line + 2;
        let record = record.map_err(|e| format!("line {row}: {}", csv_fault(&e)))?;
        let cell = |c: usize| record.get(c).unwrap_or("").trim();
        let image = base.join(cell(0));
        if !image.is_file() {
            return Err(format!(
                "line {row}: image {} {}",
                image.display(),
                not_a_file(&image)
            ));
        }
        let id = stem(&image);
        let mut masks = Vec::with_capacity(mask_columns.len());
        for &c in &mask_columns {
            let path = match cell(c) {
                "" => None,
                text => Some(base.join(text)),
            };
            match (path, missing) {
                (Some(p), _) if p.is_file() => masks.push(Some(p)),
                (Some(p), _) => return Err(format!("line {row} ({}): mask {} {}", header[c], p.display(), not_a_file(&p))),
                (None, Missing::Empty) => masks.push(None),
                (None, Missing::Error) => {
                    return Err(format!("line {row} ({}): no mask for image {id} (pass --missing empty if the annotator saw nothing)", header[c]))
                }
            }
        }
        let patient = match patient_column.map(cell) {
            Some(p) if !p.is_empty() => p.to_string(),
            _ => patient_of(&id, regex).map_err(|e| format!("line {row}: {e}"))?,
        };
        items.push(ItemFiles {
            id,
            image,
            masks,
            patient,
        });
    }
    if items.is_empty() {
        return Err("no rows".into());
    }
    Ok((
        items,
        mask_columns.iter().map(|&c| header[c].clone()).collect(),
    ))
}

/// Why a path that should be a file is not one.
fn not_a_file(path: &Path) -> &'static str {
    if path.is_dir() {
        "is a folder, not a file"
    } else {
        "does not exist"
    }
}

/// A CSV reader's error without the position the caller already gives as a line.
fn csv_fault(error: &csv::Error) -> String {
    match error.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("has {len} fields, the header {expected_len}"),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patients_come_from_the_regex_group_or_the_id() {
        let regex = Regex::new(r"^(P\d+)_").unwrap();
        assert_eq!(patient_of("P07_slice3", Some(&regex)).unwrap(), "P07");
        assert!(patient_of("x", Some(&regex))
            .unwrap_err()
            .contains("does not match"));
        assert_eq!(patient_of("x", None).unwrap(), "x");
    }

    /// A PNG of a few bytes can claim 2^31 - 1 pixels a side in its header; the decoder's
    /// limits refuse it from the header, before a buffer of that size is asked for.
    #[test]
    fn a_header_claiming_a_huge_image_is_refused_before_decoding() {
        let mut out = Vec::new();
        let mut e = png::Encoder::new(&mut out, 1, 1);
        e.set_color(png::ColorType::Grayscale);
        let mut w = e.write_header().unwrap();
        w.write_image_data(&[0]).unwrap();
        w.finish().unwrap();
        // IHDR's width and height follow the signature and the chunk's length and type;
        // its CRC-32 covers type and data (bytes 12..29).
        let side = (i32::MAX as u32).to_be_bytes();
        out[16..20].copy_from_slice(&side);
        out[20..24].copy_from_slice(&side);
        let crc = out[12..29].iter().fold(!0u32, |mut crc, &byte| {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
            crc
        });
        out[29..33].copy_from_slice(&(!crc).to_be_bytes());
        for err in [png_size(&out).unwrap_err(), decode_grey(&out).unwrap_err()] {
            assert_eq!(err, "not a readable PNG: limits are exceeded");
        }
        out[16..24].copy_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1]);
        let err = decode_grey(&out).unwrap_err();
        assert!(
            err.contains("CRC"),
            "the huge header's CRC was not checked: {err}"
        );
    }

    #[test]
    fn masks_are_non_zero_in_any_colour_and_images_must_be_grey() {
        let png = |color, data: &[u8]| {
            let mut out = Vec::new();
            let mut e = png::Encoder::new(&mut out, 2, 1);
            e.set_color(color);
            e.set_depth(png::BitDepth::Eight);
            let mut w = e.write_header().unwrap();
            w.write_image_data(data).unwrap();
            w.finish().unwrap();
            out
        };
        let rgba = png(png::ColorType::Rgba, &[0, 0, 0, 255, 0, 9, 0, 0]);
        assert_eq!(decode_mask(&rgba).unwrap(), (1, 2, vec![0, 1]));
        assert!(decode_grey(&rgba).unwrap_err().contains("not greyscale"));
        let grey = png(png::ColorType::Grayscale, &[0, 255]);
        assert_eq!(decode_grey(&grey).unwrap(), (1, 2, vec![0.0, 1.0]));
        assert_eq!(png_size(&grey).unwrap(), (1, 2));
        let mut truncated = grey.clone();
        truncated.truncate(grey.len() / 2);
        assert!(decode_grey(&truncated)
            .unwrap_err()
            .contains("not a readable PNG"));
        let mut out = Vec::new();
        let mut e = png::Encoder::new(&mut out, 1, 1);
        e.set_color(png::ColorType::Grayscale);
        e.set_depth(png::BitDepth::Sixteen);
        let mut w = e.write_header().unwrap();
        w.write_image_data(&[0x80, 0x00]).unwrap();
        w.finish().unwrap();
        let (_, _, v) = decode_grey(&out).unwrap();
        assert_eq!(v, [32768.0 / 65535.0], "16-bit kept exact");
    }
}
