//! A built-in synthetic ambiguous-segmentation dataset, deterministic from a seed.
//!
//! Each item is a lesion-like blob under noise, annotated by 4 simulated readers who
//! disagree the way LIDC's radiologists do: on where the boundary lies (each reader's
//! outline is scaled and shifted a little) and on whether there is a lesion at all (a
//! reader marks it with a probability that falls with the lesion's contrast, so faint
//! lesions are the ambiguous ones). Items come in patients of 1 to 6 neighbouring slices
//! that share one lesion, so the patient-level split matters here as it does on LIDC.
//!
//! Because the generator knows the true reader distribution, it can say what an ideal
//! model would score: the GED of fresh reader draws against the given annotations.
use crate::metrics::{ged, BitMask, EmptyConvention, PairCounts};
use crate::seed::{normal, rng};
use rand::Rng;
use rand_pcg::Pcg64;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    pub items: usize,
    /// Height and width in pixels (a multiple of 8).
    pub size: usize,
    pub annotators: usize,
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            items: 1000,
            size: 128,
            annotators: 4,
            seed: 0,
        }
    }
}

/// The true parameters of one slice's lesion.
#[derive(Debug, Clone, Copy)]
struct Lesion {
    cx: f64,
    cy: f64,
    rx: f64,
    ry: f64,
    angle: f64,
    contrast: f64,
    /// Probability that a reader marks the lesion.
    p_mark: f64,
}

/// One generated item: C-order pixels and the annotators' masks one after another.
#[derive(Debug, Clone)]
pub struct SyntheticItem {
    pub key: String,
    pub patient: String,
    pub image: Vec<f32>,
    pub masks: Vec<u8>,
}

const STREAM_PATIENT: u64 = 1;
const STREAM_IMAGE: u64 = 2;
const STREAM_READERS: u64 = 3;
const STREAM_IDEAL: u64 = 4;

/// The dataset: where each item sits (patient, slice) and how to generate it.
#[derive(Debug, Clone)]
pub struct Synthetic {
    config: SyntheticConfig,
    /// (patient, slice, slices of that patient) per item.
    layout: Vec<(usize, usize, usize)>,
}

impl Synthetic {
    pub fn new(config: SyntheticConfig) -> Self {
        let mut layout = Vec::with_capacity(config.items);
        let mut patient = 0;
        while layout.len() < config.items {
            let slices = rng(config.seed, STREAM_PATIENT, patient as u64).gen_range(1..=6);
            for slice in 0..slices.min(config.items - layout.len()) {
                layout.push((patient, slice, slices));
            }
            patient += 1;
        }
        Self { config, layout }
    }

    pub fn config(&self) -> &SyntheticConfig {
        &self.config
    }

    pub fn len(&self) -> usize {
        self.layout.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layout.is_empty()
    }

    pub fn patient(&self, index: usize) -> String {
        format!("SYN-{:04}", self.layout[index].0)
    }

    pub fn key(&self, index: usize) -> String {
        let (_, slice, _) = self.layout[index];
        format!("{}_slice{slice:03}", self.patient(index))
    }

    fn lesion(&self, index: usize) -> Lesion {
        let (patient, slice, slices) = self.layout[index];
        let mut r = rng(self.config.seed, STREAM_PATIENT, patient as u64);
        let _slices: usize = r.gen_range(1..=6);
        let size = self.config.size as f64;
        let p_mark = [1.0, 0.75, 0.5, 0.25][r.gen_range(0..4)];
        let base = size * r.gen_range(0.06..0.16);
        // Neighbouring slices cut the same nodule: smaller towards the ends.
        let t = (slice as f64 + 0.5) / slices as f64 - 0.5;
        let scale = (1.0 - 1.2 * t * t).sqrt();
        Lesion {
            cx: size / 2.0 + r.gen_range(-0.08..0.08) * size,
            cy: size / 2.0 + r.gen_range(-0.08..0.08) * size,
            rx: base * scale * r.gen_range(0.8..1.25),
            ry: base * scale * r.gen_range(0.8..1.25),
            angle: r.gen_range(0.0..std::f64::consts::PI),
            contrast: 0.06 + 0.3 * p_mark,
            p_mark,
        }
    }

    /// Normalised elliptic distance of pixel (x, y) from an outline (1 on the boundary).
    fn distance(l: &Lesion, x: f64, y: f64, dx: f64, dy: f64, scale: f64) -> f64 {
        let (s, c) = l.angle.sin_cos();
        let (px, py) = (x - l.cx - dx, y - l.cy - dy);
        let u = (c * px + s * py) / (l.rx * scale);
        let v = (-s * px + c * py) / (l.ry * scale);
        (u * u + v * v).sqrt()
    }

    /// One reader's mask: nothing with probability 1 - p_mark, else the outline scaled
    /// by about 15% and shifted by about a pixel.
    fn read(&self, l: &Lesion, r: &mut Pcg64, out: &mut [u8]) {
        let marks = r.gen_bool(l.p_mark);
        let scale = (1.0 + 0.15 * normal(r)).clamp(0.6, 1.4);
        let (dx, dy) = (normal(r), normal(r));
        let n = self.config.size;
        for (i, v) in out.iter_mut().enumerate() {
            let (x, y) = ((i % n) as f64 + 0.5, (i / n) as f64 + 0.5);
            *v = u8::from(marks && Self::distance(l, x, y, dx, dy, scale) <= 1.0);
        }
    }

    pub fn item(&self, index: usize) -> SyntheticItem {
        let l = self.lesion(index);
        let n = self.config.size;
        let mut r = rng(self.config.seed, STREAM_IMAGE, index as u64);
        let background = r.gen_range(0.2..0.35);
        let waves: Vec<(f64, f64, f64, f64)> = (0..3)
            .map(|_| {
                let freq = r.gen_range(0.01..0.05) * std::f64::consts::TAU;
                let dir = r.gen_range(0.0..std::f64::consts::TAU);
                (
                    freq * dir.cos(),
                    freq * dir.sin(),
                    r.gen_range(0.0..std::f64::consts::TAU),
                    0.04,
                )
            })
            .collect();
        let softness = 1.5 / l.rx.min(l.ry).max(1.0);
        let image = (0..n * n)
            .map(|i| {
                let (x, y) = ((i % n) as f64 + 0.5, (i / n) as f64 + 0.5);
                let texture: f64 = waves
                    .iter()
                    .map(|&(fx, fy, phase, amp)| amp * (fx * x + fy * y + phase).sin())
                    .sum();
                let d = Self::distance(&l, x, y, 0.0, 0.0, 1.0);
                let blob = l.contrast / (1.0 + ((d - 1.0) / softness).exp());
                (background + texture + blob + 0.05 * normal(&mut r)).clamp(0.0, 1.0) as f32
            })
            .collect();
        let mut masks = vec![0u8; self.config.annotators * n * n];
        let mut readers = rng(self.config.seed, STREAM_READERS, index as u64);
        for mask in masks.chunks_exact_mut(n * n) {
            self.read(&l, &mut readers, mask);
        }
        SyntheticItem {
            key: self.key(index),
            patient: self.patient(index),
            image,
            masks,
        }
    }

    /// `samples` fresh draws from the true reader distribution of item `index`.
    pub fn fresh_reads(&self, index: usize, samples: usize) -> Vec<BitMask> {
        let pixels = self.config.size * self.config.size;
        self.fresh_read_pixels(index, samples)
            .chunks_exact(pixels)
            .map(BitMask::from_pixels)
            .collect()
    }

    /// The same draws as [`Synthetic::fresh_reads`], as 0/1 pixels one mask after
    /// another: the samples of the ideal model. The first `n` of more draws are the draws
    /// at `n`, as a model's first `n` samples are.
    pub fn fresh_read_pixels(&self, index: usize, samples: usize) -> Vec<u8> {
        let l = self.lesion(index);
        let mut r = rng(self.config.seed, STREAM_IDEAL, index as u64);
        let mut masks = vec![0u8; samples * self.config.size * self.config.size];
        for mask in masks.chunks_exact_mut(self.config.size * self.config.size) {
            self.read(&l, &mut r, mask);
        }
        masks
    }

    /// Mean GED of `samples` fresh reader draws against the given annotations, over `items`:
    /// the score of a model that has learnt the reader distribution exactly.
    pub fn ideal_ged(&self, items: &[usize], samples: usize, convention: EmptyConvention) -> f64 {
        if items.is_empty() {
            return f64::NAN;
        }
        let pixels = self.config.size * self.config.size;
        let total: f64 = items
            .par_iter()
            .map(|&i| {
                let given: Vec<BitMask> = self
                    .item(i)
                    .masks
                    .chunks_exact(pixels)
                    .map(BitMask::from_pixels)
                    .collect();
                #[expect(clippy::expect_used, reason = "the generator's masks share a size")]
                let counts = PairCounts::from_masks(&given, &self.fresh_reads(i, samples))
                    .expect("masks of one size");
                ged(&counts, convention)
            })
            .sum();
        total / items.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(items: usize) -> Synthetic {
        Synthetic::new(SyntheticConfig {
            items,
            size: 64,
            annotators: 4,
            seed: 3,
        })
    }

    #[test]
    fn generation_is_deterministic_and_seeded() {
        let a = small(30);
        let b = small(30);
        for i in [0, 7, 29] {
            assert_eq!(a.item(i).image, b.item(i).image);
            assert_eq!(a.item(i).masks, b.item(i).masks);
        }
        let other = Synthetic::new(SyntheticConfig {
            seed: 4,
            ..a.config().clone()
        });
        assert_ne!(a.item(0).image, other.item(0).image);
    }

    #[test]
    fn items_are_lesions_under_noise_in_range() {
        let data = small(40);
        for i in 0..40 {
            let item = data.item(i);
            assert_eq!(item.image.len(), 64 * 64);
            assert!(item.image.iter().all(|p| (0.0..=1.0).contains(p)));
            assert!(item.masks.iter().all(|&m| m <= 1));
            assert!(item.key.starts_with(&item.patient));
        }
    }

    #[test]
    fn readers_disagree_on_presence_and_boundary() {
        let data = small(200);
        let pixels = 64 * 64;
        let (mut some_empty, mut all_marked_differ) = (0, 0);
        for i in 0..200 {
            let item = data.item(i);
            let masks: Vec<&[u8]> = item.masks.chunks_exact(pixels).collect();
            let empty = masks.iter().filter(|m| m.iter().all(|&v| v == 0)).count();
            if empty > 0 && empty < 4 {
                some_empty += 1;
            }
            if empty == 0 && masks.windows(2).any(|w| w[0] != w[1]) {
                all_marked_differ += 1;
            }
        }
        assert!(
            some_empty > 40,
            "presence disagreement in {some_empty} of 200 items"
        );
        assert!(
            all_marked_differ > 20,
            "boundary disagreement in {all_marked_differ} items"
        );
    }

    #[test]
    fn patients_group_neighbouring_slices() {
        let data = small(100);
        let patients: std::collections::BTreeSet<String> =
            (0..100).map(|i| data.patient(i)).collect();
        assert!(
            patients.len() > 15 && patients.len() < 60,
            "{} patients",
            patients.len()
        );
    }

    #[test]
    fn the_ideal_model_scores_a_small_ged_and_a_blind_one_does_not() {
        let data = small(40);
        let items: Vec<usize> = (0..40).collect();
        let ideal = data.ideal_ged(&items, 16, EmptyConvention::PhiSeg);
        assert!(ideal > 0.0 && ideal < 0.35, "ideal GED {ideal}");
        // Always predicting nothing is far worse than the reader distribution.
        let pixels = 64 * 64;
        let blind: f64 = items
            .iter()
            .map(|&i| {
                let given: Vec<BitMask> = data
                    .item(i)
                    .masks
                    .chunks_exact(pixels)
                    .map(BitMask::from_pixels)
                    .collect();
                let empty = vec![BitMask::from_pixels(&vec![0u8; pixels]); 16];
                ged(
                    &PairCounts::from_masks(&given, &empty).unwrap(),
                    EmptyConvention::PhiSeg,
                )
            })
            .sum::<f64>()
            / 40.0;
        assert!(blind > ideal + 0.3, "blind {blind} vs ideal {ideal}");
    }
}
