//! Scoring a batch on the device: every count that the metrics need is computed with
//! tensor operations where the samples are, and only those counts come back to the host.
//!
//! For a batch of `b` images with `m` annotations and `N` samples each:
//! - all pairwise intersections of annotations and binarised samples, as one batched
//!   matrix product `x x^T` of the 0/1 masks (`[b, m+N, m+N]`; exact in float32 up to 2^24
//!   pixels). The counts for the first `n` samples are its leading `(m+n)^2` block, so one
//!   product serves every sample count asked for;
//! - PHiSeg's NCC of uncertainty maps and the mean prediction's overlaps with the
//!   annotations, in float64, per sample count.
//!
//! The host then turns the counts into GED, HM-IoU (the assignment is solved there) and
//! diversity under both conventions ([`crate::metrics`] holds the definitions; its CPU
//! [`crate::metrics::ncc`] is the reference that the tensor NCC here is tested against).
use super::ScoreError;
use crate::metrics::{ImageScores, PairCounts, PredictionCounts, CE_EPS};
use crate::seed::item_noise;
use rayon::prelude::*;
use tch::{Device, Kind, TchError, Tensor};

/// The counts of one batch, on the host.
#[derive(Debug, Clone)]
pub struct BatchCounts {
    m: usize,
    /// The largest sample count: the Gram matrices are `(m + big_n)^2`.
    big_n: usize,
    prefixes: Vec<usize>,
    /// `[b, m + big_n, m + big_n]` row-major.
    gram: Vec<i64>,
    /// `[b, prefixes, 2 + m]`: NCC, the mean prediction's area, its intersections.
    parts: Vec<f64>,
    /// Whether every sample probability of the image is finite.
    finite: Vec<bool>,
}

impl BatchCounts {
    /// `masks` is `[b, m, H, W]` (0/1, any kind) and `probs` the `[b, N, H, W]` foreground
    /// probabilities, on the same device; `prefixes` are the sample counts to score, each
    /// at most `N` (the first `n` samples are scored for count `n`).
    pub fn compute(masks: &Tensor, probs: &Tensor, prefixes: &[usize]) -> Result<Self, ScoreError> {
        let (ms, ps) = (masks.size(), probs.size());
        if ms.len() != 4 || ps.len() != 4 || ms[0] != ps[0] || ms[2..] != ps[2..] {
            return Err(ScoreError::Shapes(format!(
                "masks {ms:?} and probabilities {ps:?} must be [b, m, H, W] and [b, n, H, W]"
            )));
        }
        let (m, big_n) = (ms[1] as usize, ps[1] as usize);
        if let Some(&bad) = prefixes.iter().find(|&&n| n == 0 || n > big_n) {
            return Err(ScoreError::Shapes(format!(
                "cannot score {bad} samples out of {big_n}"
            )));
        }
        let masks = masks.f_to_kind(Kind::Float)?.f_flatten(2, -1)?;
        let binary_probs = probs.f_gt(0.5)?.f_to_kind(Kind::Float)?.f_flatten(2, -1)?;
        let binary = Tensor::f_cat(&[&masks, &binary_probs], 1)?;
        let gram = binary
            .f_bmm(&binary.f_transpose(1, 2)?)?
            .f_to_kind(Kind::Int64)?;
        let masks = masks.f_to_kind(Kind::Double)?;
        let probs64 = probs.f_flatten(2, -1)?.f_to_kind(Kind::Double)?;
        let parts = prefixes
            .iter()
            .map(|&n| prefix_parts(&masks, &probs64.f_narrow(1, 0, n as i64)?))
            .collect::<Result<Vec<Tensor>, TchError>>()?;
        let parts = Tensor::f_stack(&parts, 1)?;
        let finite = probs.f_isfinite()?.f_flatten(1, -1)?.f_all_dim(1, false)?;
        let host = |t: Tensor| t.f_to_device(Device::Cpu)?.f_reshape([-1]);
        Ok(Self {
            m,
            big_n,
            prefixes: prefixes.to_vec(),
            gram: Vec::try_from(host(gram)?)?,
            parts: Vec::try_from(host(parts)?)?,
            finite: Vec::try_from(host(finite)?)?,
        })
    }

    pub fn images(&self) -> usize {
        self.finite.len()
    }

    /// Per image, how many of its annotations are empty (from the Gram diagonal).
    pub fn empty_annotations(&self) -> Vec<u32> {
        let k = self.m + self.big_n;
        (0..self.images())
            .map(|i| {
                let gram = &self.gram[i * k * k..(i + 1) * k * k];
                (0..self.m).filter(|&a| gram[a * k + a] == 0).count() as u32
            })
            .collect()
    }

    /// Per sample count (in the order of `prefixes`), per image: the fraction of its
    /// first `n` samples that are empty (from the Gram diagonal), to compare with how
    /// often its readers leave the mask empty.
    pub fn empty_samples(&self) -> Vec<Vec<f64>> {
        let k = self.m + self.big_n;
        self.prefixes
            .iter()
            .map(|&n| {
                (0..self.images())
                    .map(|i| {
                        let gram = &self.gram[i * k * k..(i + 1) * k * k];
                        let empty = (self.m..self.m + n).filter(|&s| gram[s * k + s] == 0);
                        empty.count() as f64 / n as f64
                    })
                    .collect()
            })
            .collect()
    }

    /// The metrics of every image under both conventions, one vector per sample count (in
    /// the order of `prefixes`), each in image order. Images run in parallel (the
    /// assignment of HM-IoU is the host's main cost at 100 samples).
    pub fn scores(&self) -> Result<Vec<Vec<ImageScores>>, ScoreError> {
        let (m, k) = (self.m, self.m + self.big_n);
        let width = 2 + m;
        let per_image: Vec<Vec<ImageScores>> = (0..self.images())
            .into_par_iter()
            .map(|i| {
                let gram = &self.gram[i * k * k..(i + 1) * k * k];
                self.prefixes
                    .iter()
                    .enumerate()
                    .map(|(p, &n)| {
                        if !self.finite[i] {
                            return Ok(ImageScores::not_finite());
                        }
                        let k_n = m + n;
                        let intersection: Vec<u64> = (0..k_n)
                            .flat_map(|r| gram[r * k..r * k + k_n].iter().map(|&c| c as u64))
                            .collect();
                        let sizes = (0..k_n).map(|j| gram[j * k + j] as u64).collect();
                        let counts = PairCounts::new(m, n, sizes, intersection)?;
                        let at = (i * self.prefixes.len() + p) * width;
                        let row = &self.parts[at..at + width];
                        let prediction = PredictionCounts {
                            area: row[1] as u64,
                            intersections: row[2..].iter().map(|&c| c as u64).collect(),
                        };
                        Ok(ImageScores::from_parts(&counts, row[0], &prediction)?)
                    })
                    .collect::<Result<Vec<_>, ScoreError>>()
            })
            .collect::<Result<_, _>>()?;
        Ok((0..self.prefixes.len())
            .map(|p| per_image.iter().map(|scores| scores[p]).collect())
            .collect())
    }
}

/// For the first `n` samples (`probs` `[b, n, P]`, float64) against `masks` `[b, m, P]`:
/// `[b, 2 + m]` of NCC, the mean prediction's area and its intersection with each mask.
fn prefix_parts(masks: &Tensor, probs: &Tensor) -> Result<Tensor, TchError> {
    let ncc = ncc(masks, probs)?;
    let prediction = probs
        .f_mean_dim(1, false, Kind::Double)?
        .f_gt(0.5)?
        .f_to_kind(Kind::Double)?;
    let area = prediction.f_sum_dim_intlist(-1, true, Kind::Double)?;
    let intersections = masks
        .f_mul(&prediction.f_unsqueeze(1)?)?
        .f_sum_dim_intlist(-1, false, Kind::Double)?;
    Tensor::f_cat(&[ncc.f_unsqueeze(1)?, area, intersections], 1)
}

/// PHiSeg's NCC of uncertainty maps ([`crate::metrics::ncc`]) for every image of a batch:
/// `masks` `[b, m, P]` and `probs` `[b, n, P]`, both float64; returns `[b]`. As on the host,
/// a constant map has no correlation (NaN) and NaN terms are left out of the mean over
/// annotations.
fn ncc(masks: &Tensor, probs: &Tensor) -> Result<Tensor, TchError> {
    let clamped = probs.f_clamp(CE_EPS, 1.0 - CE_EPS)?;
    let log_fg = clamped.f_log()?.f_mean_dim(1, true, Kind::Double)?;
    let log_bg = one_minus(&clamped)?
        .f_log()?
        .f_mean_dim(1, true, Kind::Double)?;
    // E_s[CE(t, s)] = -(t E_s[ln s] + (1 - t) E_s[ln(1 - s)]), for targets t of [b, r, P].
    let expected_ce = |t: &Tensor| {
        t.f_mul(&log_fg)?
            .f_add(&one_minus(t)?.f_mul(&log_bg)?)?
            .f_neg()
    };
    let uncertainty = expected_ce(&probs.f_mean_dim(1, true, Kind::Double)?)?;
    let error = expected_ce(masks)?;
    let centred = |x: &Tensor| x.f_sub(&x.f_mean_dim(-1, true, Kind::Double)?);
    let (u, e) = (centred(&uncertainty)?, centred(&error)?);
    let covariance = u.f_mul(&e)?.f_sum_dim_intlist(-1, false, Kind::Double)?;
    let variance = |x: &Tensor| x.f_square()?.f_sum_dim_intlist(-1, false, Kind::Double);
    let r = covariance.f_div(&variance(&u)?.f_mul(&variance(&e)?)?.f_sqrt()?)?;
    let constant = |x: &Tensor| x.f_amax(-1, false)?.f_eq_tensor(&x.f_amin(-1, false)?);
    let r = r.f_masked_fill(
        &constant(&uncertainty)?.f_logical_or(&constant(&error)?)?,
        f64::NAN,
    )?;
    let valid = r.f_isnan()?.f_logical_not()?;
    r.f_nan_to_num(0.0, None, None)?
        .f_sum_dim_intlist(-1, false, Kind::Double)?
        .f_div(&valid.f_sum_dim_intlist(-1, false, Kind::Double)?)
}

/// `1 - t`: the complement of a probability or a 0/1 target.
fn one_minus(t: &Tensor) -> Result<Tensor, TchError> {
    t.f_neg()?.f_add_scalar(1.0)
}

/// [`item_noise`](crate::seed::item_noise) for a batch of items: `[items, samples, latent_dim]` on the CPU.
pub fn batch_noise(
    seed: u64,
    items: &[usize],
    samples: usize,
    latent_dim: usize,
) -> Result<Tensor, TchError> {
    let values: Vec<f32> = items
        .iter()
        .flat_map(|&item| item_noise(seed, item, samples, latent_dim))
        .collect();
    Tensor::f_from_slice(&values)?.f_view([items.len() as i64, samples as i64, latent_dim as i64])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{BitMask, EmptyConvention, ImageMetrics};
    use rand::{Rng, SeedableRng};
    use rand_pcg::Pcg64;

    const SIDE: i64 = 8;

    /// A batch as tensors from per-image annotation pixels and sample probabilities.
    fn tensors(annotations: &[Vec<Vec<u8>>], probs: &[Vec<Vec<f32>>]) -> (Tensor, Tensor) {
        let b = annotations.len() as i64;
        let flat_masks: Vec<u8> = annotations.iter().flatten().flatten().copied().collect();
        let flat_probs: Vec<f32> = probs.iter().flatten().flatten().copied().collect();
        let masks = Tensor::from_slice(&flat_masks).view([b, -1, SIDE, SIDE]);
        let probs = Tensor::from_slice(&flat_probs).view([b, -1, SIDE, SIDE]);
        (masks, probs)
    }

    fn host(
        annotations: &[Vec<u8>],
        probs: &[Vec<f32>],
        convention: EmptyConvention,
    ) -> ImageMetrics {
        let masks: Vec<BitMask> = annotations
            .iter()
            .map(|y| BitMask::from_pixels(y))
            .collect();
        ImageMetrics::compute(&masks, probs, convention).unwrap()
    }

    fn assert_same(what: &str, a: f64, b: f64) {
        assert!(
            (a.is_nan() && b.is_nan()) || (a - b).abs() < 1e-9,
            "{what}: batched {a}, host {b}"
        );
    }

    fn assert_metrics(what: &str, batched: &ImageMetrics, reference: &ImageMetrics) {
        assert_same(&format!("{what} ged"), batched.ged, reference.ged);
        assert_same(&format!("{what} hm_iou"), batched.hm_iou, reference.hm_iou);
        assert_same(
            &format!("{what} diversity"),
            batched.diversity,
            reference.diversity,
        );
        assert_same(&format!("{what} ncc"), batched.ncc, reference.ncc);
        assert_same(
            &format!("{what} mean_pred_iou"),
            batched.mean_pred_iou,
            reference.mean_pred_iou,
        );
    }

    fn pixels(on: &[usize]) -> Vec<u8> {
        let mut mask = vec![0u8; (SIDE * SIDE) as usize];
        for &p in on {
            mask[p] = 1;
        }
        mask
    }

    fn as_probs(mask: &[u8]) -> Vec<f32> {
        mask.iter().map(|&v| f32::from(v)).collect()
    }

    #[test]
    fn hand_computed_cases() {
        let empty = pixels(&[]);
        let a = pixels(&[0, 1, 2, 3]);
        let b = pixels(&[10, 11, 12, 13, 14, 15]);
        // Image 0: all empty. Image 1: annotations present, samples empty. Image 2: samples
        // equal the annotations. Image 3: disjoint sets, Y = {A, A}, S = {B, B}.
        let annotations = vec![
            vec![empty.clone(), empty.clone()],
            vec![a.clone(), a.clone()],
            vec![a.clone(), b.clone()],
            vec![a.clone(), a.clone()],
        ];
        let probs = vec![
            vec![as_probs(&empty), as_probs(&empty)],
            vec![as_probs(&empty), as_probs(&empty)],
            vec![as_probs(&a), as_probs(&b)],
            vec![as_probs(&b), as_probs(&b)],
        ];
        let (masks, probs_t) = tensors(&annotations, &probs);
        let counts = BatchCounts::compute(&masks, &probs_t, &[2]).unwrap();
        assert_eq!(counts.empty_annotations(), [2, 0, 0, 0]);
        let scores = counts.scores().unwrap();
        let s = &scores[0];
        // Both empty: distance 0 under PHiSeg, undefined under Kohl et al.
        assert_eq!(
            (s[0].phiseg.ged, s[0].phiseg.hm_iou, s[0].phiseg.diversity),
            (0.0, 1.0, 0.0)
        );
        assert!(s[0].kohl_nan.ged.is_nan() && s[0].kohl_nan.hm_iou.is_nan());
        // One side empty: d(S, Y) = 1, so GED = 2 under PHiSeg, HM-IoU 0 under both.
        assert_eq!((s[1].phiseg.ged, s[1].phiseg.hm_iou), (2.0, 0.0));
        assert_eq!(s[1].kohl_nan.hm_iou, 0.0);
        assert!(
            s[1].kohl_nan.ged.is_nan(),
            "the S-S pairs are all empty-empty"
        );
        // Identical sets: GED 0, HM-IoU 1 under both.
        for m in [&s[2].phiseg, &s[2].kohl_nan] {
            assert!(
                m.ged.abs() < 1e-12 && (m.hm_iou - 1.0).abs() < 1e-12,
                "{m:?}"
            );
        }
        // Disjoint: d(S, Y) = 1, d(S, S') = d(Y, Y') = 0.
        for m in [&s[3].phiseg, &s[3].kohl_nan] {
            assert_eq!(
                (m.ged, m.hm_iou, m.diversity, m.mean_pred_iou),
                (2.0, 0.0, 0.0, 0.0)
            );
        }
        for (i, image) in s.iter().enumerate() {
            for convention in [EmptyConvention::PhiSeg, EmptyConvention::KohlNan] {
                let reference = host(&annotations[i], &probs[i], convention);
                assert_metrics(
                    &format!("image {i} {convention}"),
                    image.get(convention),
                    &reference,
                );
            }
        }
    }

    #[test]
    fn random_batches_agree_with_the_host_for_every_prefix() {
        let mut rng = Pcg64::seed_from_u64(5);
        let (b, m, big_n) = (3, 4, 10);
        let px = (SIDE * SIDE) as usize;
        let annotations: Vec<Vec<Vec<u8>>> = (0..b)
            .map(|_| {
                (0..m)
                    .map(|_| {
                        let p = rng.gen_range(0.0..0.6);
                        (0..px).map(|_| u8::from(rng.gen_bool(p))).collect()
                    })
                    .collect()
            })
            .collect();
        let probs: Vec<Vec<Vec<f32>>> = (0..b)
            .map(|_| {
                (0..big_n)
                    .map(|s| {
                        if s == 3 {
                            vec![0.0; px] // an empty sample
                        } else {
                            (0..px).map(|_| rng.gen_range(0..=8) as f32 / 8.0).collect()
                        }
                    })
                    .collect()
            })
            .collect();
        let (masks, probs_t) = tensors(&annotations, &probs);
        let prefixes = [1, 4, 10];
        let counts = BatchCounts::compute(&masks, &probs_t, &prefixes).unwrap();
        let scores = counts.scores().unwrap();
        let empty = counts.empty_samples();
        for (p, &n) in prefixes.iter().enumerate() {
            for i in 0..b {
                let blank = probs[i][..n]
                    .iter()
                    .filter(|s| s.iter().all(|&v| v <= 0.5))
                    .count();
                assert_eq!(empty[p][i], blank as f64 / n as f64, "n {n}, image {i}");
                for convention in [EmptyConvention::PhiSeg, EmptyConvention::KohlNan] {
                    let reference = host(&annotations[i], &probs[i][..n], convention);
                    assert_metrics(
                        &format!("n {n}, image {i}, {convention}"),
                        scores[p][i].get(convention),
                        &reference,
                    );
                }
            }
        }
    }

    #[test]
    fn non_finite_samples_score_nan_and_bad_shapes_are_refused() {
        let masks = Tensor::zeros([2, 1, SIDE, SIDE], (Kind::Uint8, Device::Cpu));
        let probs = Tensor::full([2, 2, SIDE, SIDE], 0.25, (Kind::Float, Device::Cpu));
        let _ = probs.get(1).get(0).get(0).get(0).fill_(f64::NAN);
        let scores = BatchCounts::compute(&masks, &probs, &[2])
            .unwrap()
            .scores()
            .unwrap();
        assert!(scores[0][0].phiseg.ged.is_finite());
        assert!(scores[0][1].phiseg.ged.is_nan() && scores[0][1].kohl_nan.ncc.is_nan());
        let err = BatchCounts::compute(&masks, &probs, &[3])
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 samples out of 2"), "{err}");
        let err = BatchCounts::compute(&masks, &probs.narrow(0, 0, 1), &[1])
            .unwrap_err()
            .to_string();
        assert!(err.contains("[1, 2, 8, 8]"), "{err}");
    }

    #[test]
    fn noise_is_per_item_standard_normal_and_prefix_stable() {
        let long = item_noise(3, 17, 100, 2);
        let short = item_noise(3, 17, 16, 2);
        assert_eq!(&long[..32], &short[..]);
        let odd = item_noise(3, 17, 3, 1);
        assert_eq!(&long[..3], &odd[..]);
        assert_ne!(item_noise(3, 18, 16, 2), short);
        assert_ne!(item_noise(4, 17, 16, 2), short);
        let many = item_noise(0, 0, 20_000, 1);
        let mean = many.iter().map(|&v| f64::from(v)).sum::<f64>() / 20_000.0;
        let var = many
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / 20_000.0;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
        let batch = batch_noise(3, &[5, 17], 16, 2).unwrap();
        assert_eq!(batch.size(), [2, 16, 2]);
        let second: Vec<f32> = Vec::try_from(batch.get(1).reshape([-1])).unwrap();
        assert_eq!(second, short);
    }
}
