//! Checks `probunet::metrics` against the independent numpy implementation in
//! `scripts/metrics_reference.py` on seeded random cases, under both IoU conventions.
mod common;

use probunet::metrics::{BitMask, EmptyConvention, ImageMetrics, Summary};
use probunet::score::BatchCounts;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use serde_json::{json, Value};
use tch::Tensor;

const SIDE: usize = 16;
const M: usize = 4;
const TOL: f64 = 1e-9;

struct Case {
    annotations: Vec<Vec<u8>>,
    samples: Vec<Vec<f32>>,
}

/// A jittered square around (`cy`, `cx`), or an empty mask with probability 1/4.
fn blob(rng: &mut Pcg64, cy: usize, cx: usize) -> Vec<bool> {
    if rng.gen_bool(0.25) {
        return vec![false; SIDE * SIDE];
    }
    let (y0, y1) = (cy - rng.gen_range(1..4), cy + rng.gen_range(1..4));
    let (x0, x1) = (cx - rng.gen_range(1..4), cx + rng.gen_range(1..4));
    (0..SIDE * SIDE)
        .map(|p| (y0..y1).contains(&(p / SIDE)) && (x0..x1).contains(&(p % SIDE)))
        .collect()
}

/// Probabilities are multiples of 1/1024, exact in f32, f64 and JSON, so both sides see the
/// same numbers; 0, 1/2 and 1 occur, which exercises the threshold and the CE clamp.
fn dyadic(rng: &mut Pcg64, foreground: bool) -> f32 {
    let k = if foreground {
        rng.gen_range(480..=1024)
    } else {
        rng.gen_range(0..=512)
    };
    k as f32 / 1024.0
}

fn random_case(rng: &mut Pcg64, n: usize) -> Case {
    let (cy, cx) = (rng.gen_range(4..12), rng.gen_range(4..12));
    let annotations = (0..M)
        .map(|_| blob(rng, cy, cx).into_iter().map(u8::from).collect())
        .collect();
    let samples = (0..n)
        .map(|_| {
            let shape = blob(rng, cy, cx);
            shape.into_iter().map(|fg| dyadic(rng, fg)).collect()
        })
        .collect();
    Case {
        annotations,
        samples,
    }
}

fn cases() -> Vec<Case> {
    let mut rng = Pcg64::seed_from_u64(2018);
    let mut cases: Vec<Case> = [4, 8]
        .iter()
        .flat_map(|&n| (0..6).map(move |_| n))
        .map(|n| random_case(&mut rng, n))
        .collect();
    // Everything empty: NaN under KohlNan, and a constant uncertainty map.
    cases.push(Case {
        annotations: vec![vec![0; SIDE * SIDE]; M],
        samples: vec![vec![0.0; SIDE * SIDE]; 4],
    });
    // Samples equal to the annotations, as 0/1 probabilities.
    let twin = random_case(&mut rng, M);
    cases.push(Case {
        samples: twin
            .annotations
            .iter()
            .map(|y| y.iter().map(|&v| f32::from(v)).collect())
            .collect(),
        annotations: twin.annotations,
    });
    cases
}

fn run_reference(cases: &[Case]) -> Value {
    let input = json!({
        "cases": cases
            .iter()
            .map(|c| json!({ "annotations": c.annotations, "samples": c.samples }))
            .collect::<Vec<_>>(),
    });
    let output =
        common::run_script_with_input("metrics_reference.py", &[], input.to_string().as_bytes());
    serde_json::from_str(&output).unwrap()
}

/// The value of the metric called `metric` ([`ImageMetrics::NAMES`]).
fn value(metrics: &ImageMetrics, metric: &str) -> f64 {
    let i = ImageMetrics::NAMES.iter().position(|&name| name == metric);
    metrics.values()[i.unwrap_or_else(|| panic!("unknown metric {metric}"))]
}

/// JSON null stands for NaN.
fn assert_agrees(what: &str, actual: f64, expected: &Value) {
    match expected.as_f64() {
        None => assert!(actual.is_nan(), "{what}: {actual}, reference NaN"),
        Some(expected) => assert!(
            (actual - expected).abs() <= TOL,
            "{what}: {actual}, reference {expected}"
        ),
    }
}

#[test]
fn metrics_agree_with_numpy_reference() {
    let cases = cases();
    let reference = run_reference(&cases);
    for convention in [EmptyConvention::PhiSeg, EmptyConvention::KohlNan] {
        let name = convention.as_str();
        let per_image: Vec<ImageMetrics> = cases
            .iter()
            .map(|c| {
                let annotations: Vec<BitMask> = c
                    .annotations
                    .iter()
                    .map(|y| BitMask::from_pixels(y))
                    .collect();
                ImageMetrics::compute(&annotations, &c.samples, convention).unwrap()
            })
            .collect();
        for (i, metrics) in per_image.iter().enumerate() {
            for metric in ImageMetrics::NAMES {
                assert_agrees(
                    &format!("case {i}, {name}, {metric}"),
                    value(metrics, metric),
                    &reference["cases"][i][name][metric],
                );
            }
        }
        for metric in ImageMetrics::NAMES {
            let values: Vec<f64> = per_image.iter().map(|m| value(m, metric)).collect();
            let summary = Summary::from_values(&values, 200, 0);
            let expected = &reference["summary"][name][metric];
            let what = format!("summary, {name}, {metric}");
            assert_agrees(&format!("{what}, mean"), summary.mean, &expected["mean"]);
            assert_agrees(&format!("{what}, std"), summary.std, &expected["std"]);
            assert_eq!(Some(summary.n as u64), expected["n"].as_u64(), "{what}, n");
            assert_eq!(
                Some(summary.n_nan as u64),
                expected["n_nan"].as_u64(),
                "{what}, n_nan"
            );
        }
    }
}

/// The batched tensor path of `probunet eval` ([`BatchCounts`]: pairwise counts, NCC and the
/// mean prediction as tensor operations) against the same numpy reference. Cases with the
/// same sample count form one batch; the 8-sample batch is also scored on its first 4
/// samples, which the reference sees as cases of their own.
#[test]
fn batched_tensor_metrics_agree_with_numpy_reference() {
    let mut cases = cases();
    let eight: Vec<usize> = (0..cases.len())
        .filter(|&i| cases[i].samples.len() == 8)
        .collect();
    let truncated: Vec<Case> = eight
        .iter()
        .map(|&i| Case {
            annotations: cases[i].annotations.clone(),
            samples: cases[i].samples[..4].to_vec(),
        })
        .collect();
    let first_truncated = cases.len();
    cases.extend(truncated);
    let reference = run_reference(&cases);
    let side = SIDE as i64;
    let check = |case: usize, scores: &probunet::metrics::ImageScores| {
        for convention in [EmptyConvention::PhiSeg, EmptyConvention::KohlNan] {
            let name = convention.as_str();
            for metric in ImageMetrics::NAMES {
                assert_agrees(
                    &format!("batched, case {case}, {name}, {metric}"),
                    value(scores.get(convention), metric),
                    &reference["cases"][case][name][metric],
                );
            }
        }
    };
    for n in [4, 8] {
        let group: Vec<usize> = (0..first_truncated)
            .filter(|&i| cases[i].samples.len() == n)
            .collect();
        let masks: Vec<u8> = group
            .iter()
            .flat_map(|&i| cases[i].annotations.concat())
            .collect();
        let probs: Vec<f32> = group
            .iter()
            .flat_map(|&i| cases[i].samples.concat())
            .collect();
        let b = group.len() as i64;
        let masks = Tensor::from_slice(&masks).view([b, M as i64, side, side]);
        let probs = Tensor::from_slice(&probs).view([b, n as i64, side, side]);
        let prefixes = if n == 8 { vec![4, 8] } else { vec![4] };
        let scores = BatchCounts::compute(&masks, &probs, &prefixes)
            .unwrap()
            .scores()
            .unwrap();
        for (position, &case) in group.iter().enumerate() {
            check(case, &scores[prefixes.len() - 1][position]);
            if n == 8 {
                check(first_truncated + position, &scores[0][position]);
            }
        }
    }
}
