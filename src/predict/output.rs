//! What predict writes per image, into `OUT/<name>/` atomically (a hidden partial folder
//! renamed into place): the sample probabilities, their mean and variance as `.npy`, the
//! samples as masks, the mean (viridis) and variance (magma) as PNG, one labelled overview,
//! and `prediction.json`, which also marks the folder as predict's to replace.
use super::npy;
use crate::figure::Colormap;
use crate::metrics::{BitMask, EmptyConvention};
use crate::score::MAX_VARIANCE;
use crate::tensorboard::Image;
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};

pub const RECORD_FILE: &str = "prediction.json";

/// What names an image's folder while it is written: `.<name><PARTIAL><pid>`.
pub const PARTIAL: &str = ".partial-";

/// Which files to write besides the overview and the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Formats {
    pub png: bool,
    pub npy: bool,
}

/// One image's samples: `n` maps of `height x width` foreground probabilities.
pub struct Samples<'a> {
    pub n: usize,
    pub height: usize,
    pub width: usize,
    pub probs: &'a [f32],
}

/// What was predicted for one image: its line of index.json and index.csv.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    pub input: String,
    pub output: PathBuf,
    pub height: usize,
    pub width: usize,
    pub samples: usize,
    /// The fraction of pixels whose mean foreground probability is above 0.5.
    pub foreground_fraction: f64,
    /// The mean IoU over pairs of samples binarised at 0.5 (two empty ones count 1): how
    /// much the samples agree.
    pub mean_pairwise_iou: f64,
}

impl Samples<'_> {
    fn pixels(&self) -> usize {
        self.height * self.width
    }

    fn sample(&self, s: usize) -> &[f32] {
        &self.probs[s * self.pixels()..(s + 1) * self.pixels()]
    }

    /// Per-pixel mean and (population) variance over the samples.
    pub fn mean_and_variance(&self) -> (Vec<f32>, Vec<f32>) {
        let n = self.n.max(1) as f32;
        let mut mean = vec![0.0f32; self.pixels()];
        for s in 0..self.n {
            for (m, p) in mean.iter_mut().zip(self.sample(s)) {
                *m += p / n;
            }
        }
        let mut var = vec![0.0f32; self.pixels()];
        for s in 0..self.n {
            for ((v, p), m) in var.iter_mut().zip(self.sample(s)).zip(&mean) {
                *v += (p - m) * (p - m) / n;
            }
        }
        (mean, var)
    }

    pub fn mean_pairwise_iou(&self) -> f64 {
        let masks: Vec<BitMask> = (0..self.n)
            .map(|s| BitMask::from_probs(self.sample(s)))
            .collect();
        let (mut sum, mut pairs) = (0.0, 0usize);
        for i in 0..masks.len() {
            for j in i + 1..masks.len() {
                let both = masks[i].intersection(&masks[j]);
                let union = masks[i].area() + masks[j].area() - both;
                sum += EmptyConvention::PhiSeg.iou(both, union);
                pairs += 1;
            }
        }
        match pairs {
            0 => 1.0,
            _ => sum / pairs as f64,
        }
    }
}

/// Writes every file of one image into `out/name`, replacing only a folder that predict
/// wrote before.
pub fn write_image(
    out: &Path,
    name: &str,
    samples: &Samples,
    formats: Formats,
    overview: &Image,
    mut record: ImageRecord,
) -> Result<ImageRecord, String> {
    let target = out.join(name);
    if target.exists() && !target.join(RECORD_FILE).is_file() {
        return Err(format!(
            "{} exists and was not written by probunet predict; refusing to replace it",
            target.display()
        ));
    }
    let partial = out.join(format!(".{name}{PARTIAL}{}", std::process::id()));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    record.output = target.clone();
    let written = write_files(&partial, samples, formats, overview, &record);
    let placed = written.and_then(|()| {
        if target.exists() {
            fs::remove_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        }
        fs::rename(&partial, &target).map_err(|e| format!("{}: {e}", target.display()))
    });
    if placed.is_err() {
        let _ = fs::remove_dir_all(&partial);
    }
    placed.map(|()| record)
}

fn write_files(
    dir: &Path,
    samples: &Samples,
    formats: Formats,
    overview: &Image,
    record: &ImageRecord,
) -> Result<(), String> {
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))
    };
    let png = |image: Result<Image, crate::tensorboard::TensorboardError>| {
        image.and_then(|i| i.to_png()).map_err(|e| e.to_string())
    };
    let (h, w) = (samples.height, samples.width);
    let (mean, var) = samples.mean_and_variance();
    if formats.npy {
        let npy = |shape: &[usize], values: &[f32]| {
            let mut bytes = Vec::with_capacity(values.len() * 4 + 128);
            npy::write_f32(&mut bytes, shape, values)
                .map(|()| bytes)
                .map_err(|e| e.to_string())
        };
        file("samples.npy", &npy(&[samples.n, h, w], samples.probs)?)?;
        file("mean.npy", &npy(&[h, w], &mean)?)?;
        file("variance.npy", &npy(&[h, w], &var)?)?;
    }
    if formats.png {
        for s in 0..samples.n {
            let mask = samples
                .sample(s)
                .iter()
                .map(|&p| if p > 0.5 { 255 } else { 0 })
                .collect();
            file(
                &format!("sample-{s:02}.png"),
                &png(Image::grey(h, w, mask))?,
            )?;
        }
        file(
            "mean.png",
            &png(coloured(h, w, &mean, Colormap::Viridis, 1.0))?,
        )?;
        file(
            "variance.png",
            &png(coloured(h, w, &var, Colormap::Magma, MAX_VARIANCE))?,
        )?;
    }
    file("overview.png", &png(Ok(overview.clone()))?)?;
    let json = serde_json::to_vec_pretty(record).map_err(|e| e.to_string())?;
    file(RECORD_FILE, &json)
}

fn coloured(
    h: usize,
    w: usize,
    values: &[f32],
    map: Colormap,
    hi: f32,
) -> Result<Image, crate::tensorboard::TensorboardError> {
    let rgb = values.iter().flat_map(|&v| map.rgb(v / hi)).collect();
    Image::rgb(h, w, rgb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_variance_and_agreement_of_samples() {
        // Two 1x2 samples: [1, 0] and [1, 1].
        let probs = [1.0, 0.0, 1.0, 1.0];
        let s = Samples {
            n: 2,
            height: 1,
            width: 2,
            probs: &probs,
        };
        let (mean, var) = s.mean_and_variance();
        assert_eq!(mean, [1.0, 0.5]);
        assert_eq!(var, [0.0, 0.25]);
        assert!((s.mean_pairwise_iou() - 0.5).abs() < 1e-12);
    }
}
