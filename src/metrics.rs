//! Metrics for ambiguous segmentation, as defined in `shared/spec/metrics.md`.
//!
//! For one image, `m` annotations Y and `n` binary samples S (sigmoid > 0.5). The pairwise
//! metrics ([`ged`], [`hm_iou`], [`diversity`]) need only intersection counts and mask areas,
//! held in [`PairCounts`], so an evaluator can get them from one batched tensor op and hand them
//! in: with `x = cat([annotations, samples]).flatten(1).float()`, `intersection = x.mm(x.t())`
//! and `sizes = x.sum(1)` (exact in f32 up to 2^24 pixels). [`PairCounts::from_masks`] computes
//! the same counts on the CPU.
//! [`ncc`] and [`mean_prediction_iou`] need the sample probability maps themselves.
//!
//! Every mean over pairs is a NaN-skipping mean, which changes nothing under
//! [`EmptyConvention::PhiSeg`] (no NaN arises) and is the nan-mean of
//! [`EmptyConvention::KohlNan`].

use std::fmt;
use std::ops::Range;

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

/// Clamp for probabilities inside the cross-entropy, so that a sample that is exactly 0 or 1
/// costs `-ln(1e-8)` instead of infinity (PHiSeg adds the same epsilon).
pub const CE_EPS: f64 = 1e-8;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    #[error("need at least one annotation and one sample, got m = {m}, n = {n}")]
    EmptySet { m: usize, n: usize },
    #[error("{what}: expected length {expected}, got {got}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("inconsistent pair counts at ({i}, {j}): {reason}")]
    InconsistentCounts {
        i: usize,
        j: usize,
        reason: &'static str,
    },
    #[error("sample {sample}, pixel {pixel}: probability {value} is not in [0, 1]")]
    InvalidProbability {
        sample: usize,
        pixel: usize,
        value: f32,
    },
}

/// How IoU treats empty masks, on which the literature disagrees; every output should say which
/// one it used ([`EmptyConvention::as_str`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum EmptyConvention {
    /// PHiSeg: both empty gives IoU 1 (distance 0), one empty gives IoU 0.
    #[default]
    PhiSeg,
    /// Kohl et al.: both empty gives NaN, and means over pairs skip NaN. A mean with nothing
    /// left is NaN, e.g. the GED of an image whose annotations are all empty.
    KohlNan,
}

impl EmptyConvention {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PhiSeg => "phiseg",
            Self::KohlNan => "kohl-nan",
        }
    }

    /// IoU from counts; a zero union means both masks are empty, the only case the conventions
    /// disagree on (one empty mask gives 0 / |other| = 0 under both).
    pub fn iou(self, intersection: u64, union: u64) -> f64 {
        if union > 0 {
            intersection as f64 / union as f64
        } else {
            match self {
                Self::PhiSeg => 1.0,
                Self::KohlNan => f64::NAN,
            }
        }
    }
}

impl fmt::Display for EmptyConvention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pixel type that can be read as foreground or background.
pub trait Foreground: Copy {
    fn is_foreground(self) -> bool;
}

impl Foreground for bool {
    fn is_foreground(self) -> bool {
        self
    }
}

impl Foreground for u8 {
    fn is_foreground(self) -> bool {
        self != 0
    }
}

/// A binary mask packed 64 pixels a word, so that pairwise intersections are popcounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitMask {
    num_pixels: usize,
    words: Vec<u64>,
}

impl BitMask {
    pub fn from_pixels<T: Foreground>(pixels: &[T]) -> Self {
        Self::from_bits(pixels.len(), pixels.iter().map(|p| p.is_foreground()))
    }

    /// Binarises a probability map with the spec's rule `p > 0.5`.
    pub fn from_probs(probs: &[f32]) -> Self {
        Self::from_bits(probs.len(), probs.iter().map(|&p| p > 0.5))
    }

    fn from_bits(num_pixels: usize, bits: impl Iterator<Item = bool>) -> Self {
        let mut words = vec![0u64; num_pixels.div_ceil(64)];
        for (pixel, bit) in bits.enumerate() {
            if bit {
                words[pixel / 64] |= 1 << (pixel % 64);
            }
        }
        Self { num_pixels, words }
    }

    pub fn num_pixels(&self) -> usize {
        self.num_pixels
    }

    /// Number of foreground pixels.
    pub fn area(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn get(&self, pixel: usize) -> bool {
        self.words[pixel / 64] >> (pixel % 64) & 1 == 1
    }

    pub fn intersection(&self, other: &Self) -> u64 {
        self.words
            .iter()
            .zip(&other.words)
            .map(|(a, b)| u64::from((a & b).count_ones()))
            .sum()
    }
}

/// Pairwise intersection counts of the annotations and samples of one image, in one combined
/// order: annotations `0..m`, then samples `m..m + n`. The union is derived as
/// `sizes[i] + sizes[j] - intersection[i][j]`, so a caller needs only a Gram matrix and row sums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairCounts {
    m: usize,
    n: usize,
    sizes: Vec<u64>,
    intersection: Vec<u64>,
}

impl PairCounts {
    /// `sizes` has `m + n` mask areas and `intersection` the `(m + n)^2` counts row-major. They
    /// are checked for consistency (symmetric, diagonal = area, intersection <= both areas)
    /// because counts from a float tensor op are easy to get subtly wrong.
    pub fn new(
        m: usize,
        n: usize,
        sizes: Vec<u64>,
        intersection: Vec<u64>,
    ) -> Result<Self, MetricsError> {
        if m == 0 || n == 0 {
            return Err(MetricsError::EmptySet { m, n });
        }
        let k = m + n;
        check_len("sizes", k, sizes.len())?;
        check_len("intersection", k * k, intersection.len())?;
        for i in 0..k {
            for j in 0..k {
                let value = intersection[i * k + j];
                let reason = if value != intersection[j * k + i] {
                    Some("not symmetric")
                } else if i == j && value != sizes[i] {
                    Some("diagonal differs from the mask area")
                } else if value > sizes[i].min(sizes[j]) {
                    Some("intersection exceeds a mask area")
                } else {
                    None
                };
                if let Some(reason) = reason {
                    return Err(MetricsError::InconsistentCounts { i, j, reason });
                }
            }
        }
        Ok(Self {
            m,
            n,
            sizes,
            intersection,
        })
    }

    pub fn from_masks(annotations: &[BitMask], samples: &[BitMask]) -> Result<Self, MetricsError> {
        let masks: Vec<&BitMask> = annotations.iter().chain(samples).collect();
        if let Some(first) = masks.first() {
            for mask in &masks {
                check_len("mask", first.num_pixels(), mask.num_pixels())?;
            }
        }
        let k = masks.len();
        let mut intersection = vec![0; k * k];
        for i in 0..k {
            for j in i..k {
                let count = masks[i].intersection(masks[j]);
                intersection[i * k + j] = count;
                intersection[j * k + i] = count;
            }
        }
        let sizes = masks.iter().map(|mask| mask.area()).collect();
        Self::new(annotations.len(), samples.len(), sizes, intersection)
    }

    /// Number of annotations.
    pub fn m(&self) -> usize {
        self.m
    }

    /// Number of samples.
    pub fn n(&self) -> usize {
        self.n
    }

    fn iou(&self, i: usize, j: usize, convention: EmptyConvention) -> f64 {
        let intersection = self.intersection[i * (self.m + self.n) + j];
        convention.iou(intersection, self.sizes[i] + self.sizes[j] - intersection)
    }

    /// Mean distance `1 - IoU` over `rows x cols` in the combined order.
    fn mean_distance(
        &self,
        rows: Range<usize>,
        cols: Range<usize>,
        with_diagonal: bool,
        convention: EmptyConvention,
    ) -> f64 {
        nan_mean(rows.flat_map(|i| {
            cols.clone()
                .filter(move |&j| with_diagonal || i != j)
                .map(move |j| 1.0 - self.iou(i, j, convention))
        }))
    }
}

/// Generalised energy distance `2 E[d(S,Y)] - E[d(S,S')] - E[d(Y,Y')]`, each expectation a mean
/// over all pairs including the diagonal, as Kohl et al. Lower is better.
///
/// Under [`EmptyConvention::KohlNan`] all three terms are nan-means, as the spec says; Kohl et
/// al.'s released Cityscapes evaluation nan-means over pairs only in the Y-Y term, which makes
/// any image with an empty-empty S-Y or S-S pair NaN.
pub fn ged(counts: &PairCounts, convention: EmptyConvention) -> f64 {
    let (annotations, samples) = (0..counts.m, counts.m..counts.m + counts.n);
    let d_sy = counts.mean_distance(samples.clone(), annotations.clone(), true, convention);
    let d_ss = counts.mean_distance(samples.clone(), samples, true, convention);
    let d_yy = counts.mean_distance(annotations.clone(), annotations, true, convention);
    2.0 * d_sy - d_ss - d_yy
}

/// Sample diversity `E[d(S,S')]` over distinct pairs; NaN for a single sample.
pub fn diversity(counts: &PairCounts, convention: EmptyConvention) -> f64 {
    let samples = counts.m..counts.m + counts.n;
    counts.mean_distance(samples.clone(), samples, false, convention)
}

/// Hungarian-matched IoU (Kohl et al. 2019). Both sets are replicated to `lcm(m, n)` items (for
/// m dividing n, as with 4 annotations and 16 samples, that is the HPU paper's replication of
/// the annotations to the sample count), the assignment maximising total IoU is solved, and the
/// matched IoUs are averaged. Higher is better.
///
/// The assignment always uses PHiSeg IoU, since a NaN weight cannot be optimised over; under
/// [`EmptyConvention::KohlNan`] the empty-empty matches are then left out of the mean. Every
/// optimal assignment has the same number of empty-empty matches, so the result is unique.
pub fn hm_iou(counts: &PairCounts, convention: EmptyConvention) -> f64 {
    matched_iou(counts, &hm_assignment(counts), convention)
}

/// The optimal assignment of [`hm_iou`], which does not depend on the convention: for each
/// of the `lcm(m, n)` annotation copies, the sample copy matched to it.
fn hm_assignment(counts: &PairCounts) -> Vec<usize> {
    let (m, n) = (counts.m, counts.n);
    let size = m / gcd(m, n) * n;
    let pair = |k: usize| (k / size % m, m + k % size % n);
    let cost: Vec<f64> = (0..size * size)
        .map(|k| {
            let (y, s) = pair(k);
            -counts.iou(y, s, EmptyConvention::PhiSeg)
        })
        .collect();
    hungarian(&cost, size)
}

/// The mean matched IoU of an [`hm_assignment`].
fn matched_iou(counts: &PairCounts, assignment: &[usize], convention: EmptyConvention) -> f64 {
    let (m, n) = (counts.m, counts.n);
    nan_mean(
        assignment
            .iter()
            .enumerate()
            .map(|(row, &col)| counts.iou(row % m, m + col % n, convention)),
    )
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Minimum-cost perfect assignment of a square `size x size` row-major cost matrix in
/// O(size^3) (Kuhn-Munkres with potentials); returns the column assigned to each row.
fn hungarian(cost: &[f64], size: usize) -> Vec<usize> {
    // 1-based: column 0 is a virtual start, `matched[j]` the row on column j (0 if none).
    let mut row_pot = vec![0.0; size + 1];
    let mut col_pot = vec![0.0; size + 1];
    let mut matched = vec![0usize; size + 1];
    let mut way = vec![0usize; size + 1];
    for row in 1..=size {
        matched[0] = row;
        let mut col = 0;
        let mut slack = vec![f64::INFINITY; size + 1];
        let mut used = vec![false; size + 1];
        loop {
            used[col] = true;
            let current = matched[col];
            let mut delta = f64::INFINITY;
            let mut next = 0;
            for j in 1..=size {
                if used[j] {
                    continue;
                }
                let reduced = cost[(current - 1) * size + j - 1] - row_pot[current] - col_pot[j];
                if reduced < slack[j] {
                    slack[j] = reduced;
                    way[j] = col;
                }
                if slack[j] < delta {
                    delta = slack[j];
                    next = j;
                }
            }
            for j in 0..=size {
                if used[j] {
                    row_pot[matched[j]] += delta;
                    col_pot[j] -= delta;
                } else {
                    slack[j] -= delta;
                }
            }
            col = next;
            if matched[col] == 0 {
                break;
            }
        }
        while col != 0 {
            let prev = way[col];
            matched[col] = matched[prev];
            col = prev;
        }
    }
    let mut assignment = vec![0; size];
    for (col, &row) in matched.iter().enumerate().skip(1) {
        assignment[row - 1] = col - 1;
    }
    assignment
}

/// PHiSeg's NCC of uncertainty maps: the mean over annotations y of
/// `NCC(E_s[CE(s_bar, s)], E_s[CE(y, s)])`, where `CE(target, p)` is the pixelwise binary
/// cross-entropy with `p` clamped to `[1e-8, 1 - 1e-8]`, `s_bar` the mean of the sample
/// probability maps, and NCC the Pearson correlation of the two maps over pixels. Higher is
/// better. The second map is PHiSeg's (paper and code) expected error against y; the spec
/// writes it as `CE(s_bar, y)`.
///
/// `sample_probs` are per-sample probabilities; passing 0/1 maps gives the binarised variant.
/// A constant map (zero variance, e.g. all samples identical and binary) has no defined
/// correlation: its term is NaN and is skipped in the mean over annotations, so the result is
/// NaN only when every term is.
pub fn ncc<P: AsRef<[f32]>>(
    annotations: &[BitMask],
    sample_probs: &[P],
) -> Result<f64, MetricsError> {
    let probs = checked_probs(annotations, sample_probs)?;
    let mean = mean_map(&probs);
    // CE is linear in its target, so E_s[CE(t, s)] = -(t E_s[ln s] + (1 - t) E_s[ln(1 - s)])
    // and the logs are taken once per sample, not once per sample and map.
    let n = probs.len() as f64;
    let (log_fg, log_bg): (Vec<f64>, Vec<f64>) = (0..mean.len())
        .map(|pixel| {
            let (fg, bg) = probs.iter().fold((0.0, 0.0), |(fg, bg), s| {
                let p = f64::from(s[pixel]).clamp(CE_EPS, 1.0 - CE_EPS);
                (fg + p.ln(), bg + (1.0 - p).ln())
            });
            (fg / n, bg / n)
        })
        .unzip();
    let expected_ce = |target: &dyn Fn(usize) -> f64| -> Vec<f64> {
        (0..mean.len())
            .map(|pixel| {
                let t = target(pixel);
                -(t * log_fg[pixel] + (1.0 - t) * log_bg[pixel])
            })
            .collect()
    };
    let uncertainty = expected_ce(&|pixel| mean[pixel]);
    Ok(nan_mean(annotations.iter().map(|y| {
        let error = expected_ce(&|pixel| if y.get(pixel) { 1.0 } else { 0.0 });
        correlation(&uncertainty, &error)
    })))
}

/// Pearson correlation; NaN when either map is constant.
fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let constant = |x: &[f64]| x.iter().all(|&v| v == x[0]);
    if constant(a) || constant(b) {
        return f64::NAN;
    }
    let mean_a = a.iter().sum::<f64>() / a.len() as f64;
    let mean_b = b.iter().sum::<f64>() / b.len() as f64;
    let (mut cov, mut var_a, mut var_b) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        cov += (x - mean_a) * (y - mean_b);
        var_a += (x - mean_a).powi(2);
        var_b += (y - mean_b).powi(2);
    }
    cov / (var_a * var_b).sqrt()
}

/// IoU of the mean prediction `s_bar > 0.5` (for 0/1 samples, a strict majority vote) with
/// each annotation, averaged over the annotations rather than taken against a single majority
/// annotation, so that every grader counts as in GED.
pub fn mean_prediction_iou<P: AsRef<[f32]>>(
    annotations: &[BitMask],
    sample_probs: &[P],
    convention: EmptyConvention,
) -> Result<f64, MetricsError> {
    let prediction = PredictionCounts::from_probs(annotations, sample_probs)?;
    let areas: Vec<u64> = annotations.iter().map(BitMask::area).collect();
    Ok(prediction.mean_iou(&areas, convention))
}

/// The mean prediction `s_bar > 0.5` of one image as counts: its area and its intersection
/// with each annotation. [`mean_prediction_iou`] needs nothing else besides the annotation
/// areas, so an evaluator can count these on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PredictionCounts {
    pub area: u64,
    /// One per annotation, in the annotations' order.
    pub intersections: Vec<u64>,
}

impl PredictionCounts {
    /// On the CPU, from the sample probability maps.
    pub fn from_probs<P: AsRef<[f32]>>(
        annotations: &[BitMask],
        sample_probs: &[P],
    ) -> Result<Self, MetricsError> {
        let probs = checked_probs(annotations, sample_probs)?;
        let mean = mean_map(&probs);
        let prediction = BitMask::from_bits(mean.len(), mean.iter().map(|&p| p > 0.5));
        Ok(Self {
            area: prediction.area(),
            intersections: annotations
                .iter()
                .map(|y| prediction.intersection(y))
                .collect(),
        })
    }

    /// The mean over annotations of IoU(prediction, y), from the annotation areas.
    fn mean_iou(&self, annotation_areas: &[u64], convention: EmptyConvention) -> f64 {
        nan_mean(
            self.intersections
                .iter()
                .zip(annotation_areas)
                .map(|(&i, &area)| convention.iou(i, self.area + area - i)),
        )
    }

    /// Checks the counts against the annotation areas in `counts`, as [`PairCounts::new`]
    /// checks its own.
    fn check(&self, counts: &PairCounts) -> Result<(), MetricsError> {
        check_len(
            "prediction intersections",
            counts.m,
            self.intersections.len(),
        )?;
        for (y, &i) in self.intersections.iter().enumerate() {
            if i > self.area.min(counts.sizes[y]) {
                return Err(MetricsError::InconsistentCounts {
                    i: y,
                    j: y,
                    reason: "prediction intersection exceeds a mask area",
                });
            }
        }
        Ok(())
    }
}

/// Checks that the sets are non-empty, all maps have one length and all probabilities lie in
/// [0, 1].
fn checked_probs<'a, P: AsRef<[f32]>>(
    annotations: &[BitMask],
    sample_probs: &'a [P],
) -> Result<Vec<&'a [f32]>, MetricsError> {
    let (m, n) = (annotations.len(), sample_probs.len());
    if m == 0 || n == 0 {
        return Err(MetricsError::EmptySet { m, n });
    }
    let num_pixels = annotations[0].num_pixels();
    for y in annotations {
        check_len("annotation", num_pixels, y.num_pixels())?;
    }
    let probs: Vec<&[f32]> = sample_probs.iter().map(AsRef::as_ref).collect();
    for (sample, s) in probs.iter().enumerate() {
        check_len("sample", num_pixels, s.len())?;
        if let Some((pixel, &value)) = s
            .iter()
            .enumerate()
            .find(|(_, p)| !(0.0..=1.0).contains(*p))
        {
            return Err(MetricsError::InvalidProbability {
                sample,
                pixel,
                value,
            });
        }
    }
    Ok(probs)
}

fn mean_map(probs: &[&[f32]]) -> Vec<f64> {
    (0..probs[0].len())
        .map(|pixel| probs.iter().map(|s| f64::from(s[pixel])).sum::<f64>() / probs.len() as f64)
        .collect()
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), MetricsError> {
    if expected == got {
        Ok(())
    } else {
        Err(MetricsError::LengthMismatch {
            what,
            expected,
            got,
        })
    }
}

/// Mean of the non-NaN values; NaN if there are none.
fn nan_mean(values: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, count) = values
        .into_iter()
        .filter(|v| !v.is_nan())
        .fold((0.0, 0usize), |(sum, count), v| (sum + v, count + 1));
    if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    }
}

/// All per-image metrics under one convention ([`ncc`] does not depend on it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageMetrics {
    pub ged: f64,
    pub hm_iou: f64,
    pub diversity: f64,
    pub ncc: f64,
    pub mean_pred_iou: f64,
}

impl ImageMetrics {
    /// The metrics' names, in the order of [`ImageMetrics::values`].
    pub const NAMES: [&'static str; 5] = ["ged", "hm_iou", "diversity", "ncc", "mean_pred_iou"];

    pub fn values(&self) -> [f64; 5] {
        [
            self.ged,
            self.hm_iou,
            self.diversity,
            self.ncc,
            self.mean_pred_iou,
        ]
    }

    /// The scores of an image whose samples are not finite (a diverged model): all NaN,
    /// which aggregation counts and skips.
    pub fn not_finite() -> Self {
        let nan = f64::NAN;
        Self {
            ged: nan,
            hm_iou: nan,
            diversity: nan,
            ncc: nan,
            mean_pred_iou: nan,
        }
    }

    /// Everything on the CPU; samples are binarised at `p > 0.5`.
    pub fn compute<P: AsRef<[f32]>>(
        annotations: &[BitMask],
        sample_probs: &[P],
        convention: EmptyConvention,
    ) -> Result<Self, MetricsError> {
        let samples: Vec<BitMask> = sample_probs
            .iter()
            .map(|p| BitMask::from_probs(p.as_ref()))
            .collect();
        let counts = PairCounts::from_masks(annotations, &samples)?;
        Self::from_counts(&counts, annotations, sample_probs, convention)
    }

    /// With pair counts computed elsewhere (e.g. on the GPU) from the same annotations and the
    /// binarised `sample_probs`.
    pub fn from_counts<P: AsRef<[f32]>>(
        counts: &PairCounts,
        annotations: &[BitMask],
        sample_probs: &[P],
        convention: EmptyConvention,
    ) -> Result<Self, MetricsError> {
        check_len("annotations", counts.m(), annotations.len())?;
        check_len("samples", counts.n(), sample_probs.len())?;
        let ncc = ncc(annotations, sample_probs)?;
        let prediction = PredictionCounts::from_probs(annotations, sample_probs)?;
        Self::from_parts(counts, ncc, &prediction, convention)
    }

    /// With everything computed elsewhere: the pair counts, the [`ncc`] value and the mean
    /// prediction's counts, e.g. all on the device, so that no probability map need come
    /// back to the host.
    pub fn from_parts(
        counts: &PairCounts,
        ncc: f64,
        prediction: &PredictionCounts,
        convention: EmptyConvention,
    ) -> Result<Self, MetricsError> {
        prediction.check(counts)?;
        Ok(Self::with_assignment(
            counts,
            &hm_assignment(counts),
            ncc,
            prediction,
            convention,
        ))
    }

    fn with_assignment(
        counts: &PairCounts,
        assignment: &[usize],
        ncc: f64,
        prediction: &PredictionCounts,
        convention: EmptyConvention,
    ) -> Self {
        Self {
            ged: ged(counts, convention),
            hm_iou: matched_iou(counts, assignment, convention),
            diversity: diversity(counts, convention),
            ncc,
            mean_pred_iou: prediction.mean_iou(&counts.sizes[..counts.m], convention),
        }
    }
}

/// An image's metrics under both conventions, as every evaluation output records them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageScores {
    pub phiseg: ImageMetrics,
    pub kohl_nan: ImageMetrics,
}

impl ImageScores {
    /// [`ImageMetrics::from_parts`] under both conventions; the HM-IoU assignment, which does
    /// not depend on the convention, is solved once.
    pub fn from_parts(
        counts: &PairCounts,
        ncc: f64,
        prediction: &PredictionCounts,
    ) -> Result<Self, MetricsError> {
        prediction.check(counts)?;
        let assignment = hm_assignment(counts);
        let under = |convention| {
            ImageMetrics::with_assignment(counts, &assignment, ncc, prediction, convention)
        };
        Ok(Self {
            phiseg: under(EmptyConvention::PhiSeg),
            kohl_nan: under(EmptyConvention::KohlNan),
        })
    }

    /// All NaN, for an image whose samples are not finite.
    pub fn not_finite() -> Self {
        Self {
            phiseg: ImageMetrics::not_finite(),
            kohl_nan: ImageMetrics::not_finite(),
        }
    }

    pub fn get(&self, convention: EmptyConvention) -> &ImageMetrics {
        match convention {
            EmptyConvention::PhiSeg => &self.phiseg,
            EmptyConvention::KohlNan => &self.kohl_nan,
        }
    }
}

/// A metric over test images: NaN values are skipped and counted in `n_nan`; `n` counts the
/// rest. `std` is the population standard deviation (numpy's default, as papers report).
/// `[ci_low, ci_high]` is a 95% percentile bootstrap interval of the mean.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Summary {
    pub mean: f64,
    pub std: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub n: usize,
    pub n_nan: usize,
}

impl Summary {
    /// `resamples` bootstrap means (a few thousand is usual) drawn with a PCG64 seeded by `seed`,
    /// so the interval is reproducible. With no non-NaN value or no resample the affected
    /// fields are NaN.
    pub fn from_values(values: &[f64], resamples: usize, seed: u64) -> Self {
        let kept: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
        let n = kept.len();
        let mean = nan_mean(kept.iter().copied());
        let std = nan_mean(kept.iter().map(|v| (v - mean).powi(2))).sqrt();
        let (ci_low, ci_high) = if n == 0 || resamples == 0 {
            (f64::NAN, f64::NAN)
        } else {
            let mut rng = Pcg64::seed_from_u64(seed);
            let mut means: Vec<f64> = (0..resamples)
                .map(|_| (0..n).map(|_| kept[rng.gen_range(0..n)]).sum::<f64>() / n as f64)
                .collect();
            means.sort_by(f64::total_cmp);
            (percentile(&means, 0.025), percentile(&means, 0.975))
        };
        Self {
            mean,
            std,
            ci_low,
            ci_high,
            n,
            n_nan: values.len() - n,
        }
    }
}

/// Linear-interpolation percentile of sorted values (numpy's default method).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let position = q * (sorted.len() - 1) as f64;
    let low = position.floor() as usize;
    let high = (low + 1).min(sorted.len() - 1);
    sorted[low] + (position - low as f64) * (sorted[high] - sorted[low])
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: f64 = 1e-12;

    /// A 1 x `len` mask with the given foreground pixels.
    fn mask(len: usize, pixels: &[usize]) -> BitMask {
        let mut bits = vec![false; len];
        for &p in pixels {
            bits[p] = true;
        }
        BitMask::from_pixels(&bits)
    }

    fn counts(annotations: &[BitMask], samples: &[BitMask]) -> PairCounts {
        PairCounts::from_masks(annotations, samples).unwrap()
    }

    fn assert_close(actual: f64, expected: f64) {
        assert!(
            (actual - expected).abs() < TOL,
            "{actual} != {expected} (difference {})",
            actual - expected
        );
    }

    #[test]
    fn iou_of_empty_masks_follows_the_convention() {
        assert_eq!(EmptyConvention::PhiSeg.iou(0, 0), 1.0);
        assert!(EmptyConvention::KohlNan.iou(0, 0).is_nan());
        assert_eq!(EmptyConvention::PhiSeg.iou(0, 5), 0.0);
        assert_eq!(EmptyConvention::KohlNan.iou(0, 5), 0.0);
        assert_eq!(EmptyConvention::default(), EmptyConvention::PhiSeg);
        assert_eq!(EmptyConvention::KohlNan.to_string(), "kohl-nan");
    }

    #[test]
    fn bitmask_counts_across_word_boundaries() {
        let a = mask(130, &[0, 63, 64, 129]);
        let b = mask(130, &[63, 64, 100]);
        assert_eq!(a.area(), 4);
        assert_eq!(a.intersection(&b), 2);
        assert!(a.get(129) && !a.get(128));
        assert_eq!(BitMask::from_pixels(&[0u8, 3, 0, 1]), mask(4, &[1, 3]));
        assert_eq!(
            BitMask::from_probs(&[0.5, 0.51, 1.0, 0.0]),
            mask(4, &[1, 2])
        );
    }

    #[test]
    fn both_empty_sets_give_ged_zero_or_nan() {
        let empty = [mask(4, &[]), mask(4, &[])];
        let c = counts(&empty, &empty);
        assert_eq!(ged(&c, EmptyConvention::PhiSeg), 0.0);
        assert_eq!(hm_iou(&c, EmptyConvention::PhiSeg), 1.0);
        assert_eq!(diversity(&c, EmptyConvention::PhiSeg), 0.0);
        assert!(ged(&c, EmptyConvention::KohlNan).is_nan());
        assert!(hm_iou(&c, EmptyConvention::KohlNan).is_nan());
        assert!(diversity(&c, EmptyConvention::KohlNan).is_nan());
    }

    #[test]
    fn one_empty_set_is_maximally_distant() {
        let c = counts(&[mask(4, &[0, 1])], &[mask(4, &[]), mask(4, &[])]);
        for convention in [EmptyConvention::PhiSeg, EmptyConvention::KohlNan] {
            assert_eq!(hm_iou(&c, convention), 0.0);
        }
        // d_sy = 1, d_ss = 0 or all NaN, d_yy = 0.
        assert_eq!(ged(&c, EmptyConvention::PhiSeg), 2.0);
        assert!(ged(&c, EmptyConvention::KohlNan).is_nan());
    }

    #[test]
    fn identical_sets_have_ged_zero() {
        let set = [mask(6, &[0, 1, 2]), mask(6, &[2, 3]), mask(6, &[5])];
        let c = counts(&set, &set);
        for convention in [EmptyConvention::PhiSeg, EmptyConvention::KohlNan] {
            assert_close(ged(&c, convention), 0.0);
            assert_close(hm_iou(&c, convention), 1.0);
        }
    }

    #[test]
    fn disjoint_sets() {
        // Y = {A, B} disjoint, S = {A, A}: d_sy = 1/2, d_ss = 0, d_yy = 1/2.
        let (a, b) = (mask(6, &[0, 1]), mask(6, &[3, 4, 5]));
        let c = counts(&[a.clone(), b.clone()], &[a.clone(), a]);
        assert_close(ged(&c, EmptyConvention::PhiSeg), 0.5);
        assert_close(hm_iou(&c, EmptyConvention::PhiSeg), 0.5);
        assert_close(diversity(&c, EmptyConvention::PhiSeg), 0.0);
        // Fully disjoint: d_sy = 1, d_ss = d_yy = 0.
        let c = counts(&[b], &[mask(6, &[0, 1])]);
        assert_close(ged(&c, EmptyConvention::PhiSeg), 2.0);
    }

    #[test]
    fn conventions_differ_on_empty_pairs() {
        // Y = {empty, A}, S = {A, A}. PhiSeg: d_yy = (0 + 1 + 1 + 0) / 4; KohlNan drops the
        // empty-empty diagonal: d_yy = 2 / 3. d_sy = 1/2, d_ss = 0 under both.
        let a = mask(4, &[0, 1]);
        let c = counts(&[mask(4, &[]), a.clone()], &[a.clone(), a.clone()]);
        assert_close(ged(&c, EmptyConvention::PhiSeg), 0.5);
        assert_close(ged(&c, EmptyConvention::KohlNan), 1.0 / 3.0);
        // Y = {empty, A}, S = {empty, B}, IoU(A, B) = 1/2: the empty-empty match counts 1 or
        // is left out.
        let b = mask(4, &[1]);
        let c = counts(&[mask(4, &[]), a], &[mask(4, &[]), b]);
        assert_close(hm_iou(&c, EmptyConvention::PhiSeg), 0.75);
        assert_close(hm_iou(&c, EmptyConvention::KohlNan), 0.5);
    }

    #[test]
    fn hm_iou_two_by_two() {
        // IoU(A, S1) = 3/4, IoU(B, S2) = 5/6, IoU(A, S2) = 1/4, IoU(B, S1) = 0.
        let a = mask(10, &[0, 1, 2, 3]);
        let b = mask(10, &[3, 4, 5, 6, 7]);
        let s1 = mask(10, &[0, 1, 2]);
        let s2 = mask(10, &[2, 3, 4, 5, 6, 7]);
        let c = counts(&[a.clone(), b.clone()], &[s2.clone(), s1.clone()]);
        assert_close(
            hm_iou(&c, EmptyConvention::PhiSeg),
            (0.75 + 5.0 / 6.0) / 2.0,
        );
        // m = 2, n = 4: annotations replicated twice; one B copy must take the empty sample.
        let c = counts(&[a.clone(), b.clone()], &[a.clone(), b, a, mask(10, &[])]);
        assert_close(hm_iou(&c, EmptyConvention::PhiSeg), 0.75);
        assert_close(hm_iou(&c, EmptyConvention::KohlNan), 0.75);
    }

    #[test]
    fn hungarian_beats_greedy() {
        // Greedy takes 0.9 then 0.1; the optimum is 0.8 + 0.85.
        let iou = [0.9, 0.8, 0.85, 0.1];
        let cost: Vec<f64> = iou.iter().map(|v| -v).collect();
        assert_eq!(hungarian(&cost, 2), vec![1, 0]);
    }

    #[test]
    fn hungarian_matches_brute_force() {
        fn permutations(items: Vec<usize>) -> Vec<Vec<usize>> {
            if items.len() <= 1 {
                return vec![items];
            }
            let mut all = Vec::new();
            for (i, &first) in items.iter().enumerate() {
                let mut rest = items.clone();
                rest.remove(i);
                for mut tail in permutations(rest) {
                    tail.insert(0, first);
                    all.push(tail);
                }
            }
            all
        }
        let mut rng = Pcg64::seed_from_u64(7);
        for size in 1..=6 {
            for _ in 0..20 {
                let cost: Vec<f64> = (0..size * size).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let total = |a: &[usize]| -> f64 {
                    a.iter().enumerate().map(|(r, &c)| cost[r * size + c]).sum()
                };
                let best = permutations((0..size).collect())
                    .iter()
                    .map(|p| total(p))
                    .fold(f64::INFINITY, f64::min);
                let assignment = hungarian(&cost, size);
                let mut sorted = assignment.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..size).collect::<Vec<_>>());
                assert_close(total(&assignment), best);
            }
        }
    }

    #[test]
    fn diversity_over_distinct_pairs() {
        // S = {A, B, A}, IoU(A, B) = 1/2: distances 1/2, 0, 1/2 over the three pairs.
        let (a, b) = (mask(4, &[0, 1]), mask(4, &[1]));
        let c = counts(std::slice::from_ref(&a), &[a.clone(), b, a.clone()]);
        assert_close(diversity(&c, EmptyConvention::PhiSeg), 1.0 / 3.0);
        let single = counts(std::slice::from_ref(&a), std::slice::from_ref(&a));
        assert!(diversity(&single, EmptyConvention::PhiSeg).is_nan());
    }

    #[test]
    fn correlation_of_identical_maps_is_one() {
        let map = [0.1, 0.7, 0.3, 2.0];
        assert_close(correlation(&map, &map), 1.0);
        let affine: Vec<f64> = map.iter().map(|v| 3.0 * v + 1.0).collect();
        assert_close(correlation(&map, &affine), 1.0);
        let negated: Vec<f64> = map.iter().map(|v| -v).collect();
        assert_close(correlation(&map, &negated), -1.0);
        assert!(correlation(&map, &[0.5; 4]).is_nan());
    }

    #[test]
    fn ncc_is_one_for_matching_maps_and_nan_for_constant_ones() {
        // Every sample equal and binary: s_bar = s, so the uncertainty map is constant.
        let annotations = [mask(4, &[0, 1]), mask(4, &[1])];
        let samples = [[1.0f32, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]];
        assert!(ncc(&annotations, &samples).unwrap().is_nan());
        // Two-valued maps in the same order correlate perfectly.
        let one = ncc(&[mask(4, &[])], &[[0.2f32, 0.2, 0.3, 0.3]]).unwrap();
        assert_close(one, 1.0);
        let varied = [[0.9f32, 1.0, 0.2, 0.0], [0.3, 1.0, 0.0, 0.6]];
        let value = ncc(&annotations, &varied).unwrap();
        assert!((-1.0..=1.0).contains(&value), "{value}");
    }

    #[test]
    fn mean_prediction_thresholds_the_mean_map() {
        // s_bar = [1, 1/2, 0, 0] -> prediction {0}; IoU with {0, 1} is 1/2, with {} 0 or NaN.
        let samples = [[1.0f32, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]];
        let annotations = [mask(4, &[0, 1]), mask(4, &[])];
        let phiseg = mean_prediction_iou(&annotations, &samples, EmptyConvention::PhiSeg);
        assert_close(phiseg.unwrap(), 0.25);
        let kohl = mean_prediction_iou(&annotations, &samples, EmptyConvention::KohlNan);
        assert_close(kohl.unwrap(), 0.25);
        let empty = [mask(4, &[])];
        let zero = [[0.0f32; 4]];
        assert_eq!(
            mean_prediction_iou(&empty, &zero, EmptyConvention::PhiSeg),
            Ok(1.0)
        );
        assert!(mean_prediction_iou(&empty, &zero, EmptyConvention::KohlNan)
            .unwrap()
            .is_nan());
    }

    #[test]
    fn external_counts_give_the_same_metrics() {
        let annotations = [mask(5, &[0, 1]), mask(5, &[]), mask(5, &[1, 2, 3])];
        let probs = [
            [0.9f32, 0.2, 0.7, 0.0, 0.0],
            [0.0; 5],
            [0.6, 0.6, 0.6, 0.6, 0.1],
        ];
        let pixels: Vec<Vec<u64>> = annotations
            .iter()
            .map(|y| (0..5).map(|p| u64::from(y.get(p))).collect())
            .chain(
                probs
                    .iter()
                    .map(|s| s.iter().map(|&p| u64::from(p > 0.5)).collect()),
            )
            .collect();
        let gram: Vec<u64> = pixels
            .iter()
            .flat_map(|a| {
                pixels
                    .iter()
                    .map(move |b| a.iter().zip(b).map(|(x, y)| x * y).sum())
            })
            .collect();
        let sizes = pixels.iter().map(|p| p.iter().sum()).collect();
        let external = PairCounts::new(3, 3, sizes, gram).unwrap();
        for convention in [EmptyConvention::PhiSeg, EmptyConvention::KohlNan] {
            let expected = ImageMetrics::compute(&annotations, &probs, convention).unwrap();
            let actual =
                ImageMetrics::from_counts(&external, &annotations, &probs, convention).unwrap();
            assert_eq!(format!("{expected:?}"), format!("{actual:?}"));
        }
    }

    #[test]
    fn inconsistent_inputs_are_rejected() {
        let bad = |sizes: Vec<u64>, intersection: Vec<u64>| {
            PairCounts::new(1, 1, sizes, intersection).unwrap_err()
        };
        assert!(matches!(
            bad(vec![2, 2], vec![2, 1, 0, 2]),
            MetricsError::InconsistentCounts {
                reason: "not symmetric",
                ..
            }
        ));
        assert!(matches!(
            bad(vec![2, 1], vec![2, 2, 2, 1]),
            MetricsError::InconsistentCounts { .. }
        ));
        assert!(matches!(
            bad(vec![2], vec![2]),
            MetricsError::LengthMismatch { what: "sizes", .. }
        ));
        assert_eq!(
            PairCounts::new(0, 1, vec![0], vec![0]),
            Err(MetricsError::EmptySet { m: 0, n: 1 })
        );
        let y = [mask(4, &[0])];
        assert!(matches!(
            PairCounts::from_masks(&y, &[mask(5, &[])]),
            Err(MetricsError::LengthMismatch { .. })
        ));
        assert!(matches!(
            ncc(&y, &[[0.0f32, 1.5, 0.0, 0.0]]),
            Err(MetricsError::InvalidProbability { pixel: 1, .. })
        ));
        assert!(matches!(
            ncc(&y, &[[f32::NAN; 4]]),
            Err(MetricsError::InvalidProbability { pixel: 0, .. })
        ));
    }

    #[test]
    fn summary_skips_and_counts_nan() {
        let summary = Summary::from_values(&[1.0, f64::NAN, 3.0], 1000, 1);
        assert_eq!((summary.n, summary.n_nan), (2, 1));
        assert_close(summary.mean, 2.0);
        assert_close(summary.std, 1.0);
        assert!(1.0 <= summary.ci_low && summary.ci_low <= 2.0);
        assert!(2.0 <= summary.ci_high && summary.ci_high <= 3.0);
        let none = Summary::from_values(&[f64::NAN], 1000, 1);
        assert_eq!((none.n, none.n_nan), (0, 1));
        assert!(none.mean.is_nan() && none.std.is_nan() && none.ci_low.is_nan());
    }

    #[test]
    fn bootstrap_is_seeded() {
        let values: Vec<f64> = (0..50).map(|i| f64::from(i % 7) / 7.0).collect();
        let a = Summary::from_values(&values, 2000, 42);
        assert_eq!(a, Summary::from_values(&values, 2000, 42));
        assert_ne!(a, Summary::from_values(&values, 2000, 43));
        assert!(a.ci_low < a.mean && a.mean < a.ci_high);
        let constant = Summary::from_values(&[0.25; 10], 100, 0);
        assert_eq!(
            (constant.ci_low, constant.ci_high, constant.std),
            (0.25, 0.25, 0.0)
        );
    }

    #[test]
    fn percentile_interpolates_linearly() {
        let sorted = [0.0, 1.0, 2.0, 3.0, 4.0];
        assert_close(percentile(&sorted, 0.5), 2.0);
        assert_close(percentile(&sorted, 0.025), 0.1);
        assert_close(percentile(&sorted, 1.0), 4.0);
    }
}
