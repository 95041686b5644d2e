#!/usr/bin/env python3
"""Independent numpy reference for src/metrics.rs (tests/metrics_reference.rs runs it).

Reads JSON from stdin:
    {"cases": [{"annotations": [[0/1, ...], ...], "samples": [[prob, ...], ...]}, ...]}
and prints, for both IoU conventions, every case's metrics and their summary over cases:
    {"cases": [{"phiseg": {...}, "kohl-nan": {...}}, ...],
     "summary": {"phiseg": {"ged": {"mean", "std", "n", "n_nan"}, ...}, "kohl-nan": ...}}
NaN is written as null. It works on the masks directly and solves the Hungarian matching by
brute force over all permutations, so keep lcm(m, n) small (8 is 40320 permutations).
"""

import itertools
import json
import math
import sys

import numpy as np

CONVENTIONS = ("phiseg", "kohl-nan")
METRICS = ("ged", "hm_iou", "diversity", "ncc", "mean_pred_iou")
CE_EPS = 1e-8


def iou(a, b, convention):
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0 if convention == "phiseg" else math.nan
    return np.logical_and(a, b).sum() / union


def iou_matrix(xs, ys, convention):
    return np.array([[iou(x, y, convention) for y in ys] for x in xs], dtype=np.float64)


def nanmean(values):
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def ged(ys, ss, convention):
    d_sy = 1.0 - iou_matrix(ss, ys, convention)
    d_ss = 1.0 - iou_matrix(ss, ss, convention)
    d_yy = 1.0 - iou_matrix(ys, ys, convention)
    return 2.0 * nanmean(d_sy) - nanmean(d_ss) - nanmean(d_yy)


def diversity(ss, convention):
    d_ss = 1.0 - iou_matrix(ss, ss, convention)
    return nanmean(d_ss[~np.eye(len(ss), dtype=bool)])


def hm_iou(ys, ss, convention):
    size = math.lcm(len(ys), len(ss))
    ys = [ys[i % len(ys)] for i in range(size)]
    ss = [ss[i % len(ss)] for i in range(size)]
    weights = iou_matrix(ys, ss, "phiseg")
    perms = np.array(list(itertools.permutations(range(size))))
    rows = np.arange(size)
    best = perms[np.argmax(weights[rows, perms].sum(axis=1))]
    return nanmean(iou_matrix(ys, ss, convention)[rows, best])


def ncc(ys, probs):
    mean = probs.mean(axis=0)
    clipped = np.clip(probs, CE_EPS, 1.0 - CE_EPS)

    def expected_ce(target):
        ce = -(target * np.log(clipped) + (1.0 - target) * np.log(1.0 - clipped))
        return ce.mean(axis=0)

    def corr(a, v):
        if np.ptp(a) == 0 or np.ptp(v) == 0:
            return math.nan
        a = (a - a.mean()) / (a.std() * a.size)
        v = (v - v.mean()) / v.std()
        return float(np.sum(a * v))

    uncertainty = expected_ce(mean)
    return nanmean([corr(uncertainty, expected_ce(y.astype(np.float64))) for y in ys])


def mean_pred_iou(ys, probs, convention):
    prediction = probs.mean(axis=0) > 0.5
    return nanmean([iou(prediction, y, convention) for y in ys])


def case_metrics(case):
    ys = [np.asarray(y, dtype=bool) for y in case["annotations"]]
    probs = np.asarray(case["samples"], dtype=np.float64)
    ss = list(probs > 0.5)
    return {
        c: {
            "ged": ged(ys, ss, c),
            "hm_iou": hm_iou(ys, ss, c),
            "diversity": diversity(ss, c),
            "ncc": ncc(ys, probs),
            "mean_pred_iou": mean_pred_iou(ys, probs, c),
        }
        for c in CONVENTIONS
    }


def summary(values):
    values = np.asarray(values, dtype=np.float64)
    kept = values[~np.isnan(values)]
    return {
        "mean": float(kept.mean()) if kept.size else math.nan,
        "std": float(kept.std()) if kept.size else math.nan,
        "n": int(kept.size),
        "n_nan": int(values.size - kept.size),
    }


def nan_to_null(value):
    if isinstance(value, dict):
        return {k: nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_null(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def main():
    cases = [case_metrics(case) for case in json.load(sys.stdin)["cases"]]
    summaries = {
        c: {k: summary([case[c][k] for case in cases]) for k in METRICS} for c in CONVENTIONS
    }
    json.dump(nan_to_null({"cases": cases, "summary": summaries}), sys.stdout, allow_nan=False)


if __name__ == "__main__":
    main()
