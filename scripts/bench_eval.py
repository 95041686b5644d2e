#!/usr/bin/env python3
"""The PyTorch side of `probunet bench-eval`: eval throughput of scripts/torch_probunet.py.

    bench_eval.py --export DIR [--samples 100] [--batch 4] [--device cpu|cuda:N]

DIR holds what `probunet bench-eval --one --export DIR` wrote: model.json, the freshly
initialised weights.safetensors, and data.safetensors with the images, masks and every
image's latent noise. This times the same work per batch that probunet's measurement
times, as `probunet eval` does it:
  - prior and U-Net once per image, fcomb once per sample (ProbUNet.sample, given noise);
  - on the device: binarise at 0.5, all pairwise intersections of annotations and samples
    as one batched matrix product, PHiSeg's NCC and the mean prediction's overlaps (float64);
  - on the host: GED, HM-IoU (one Hungarian assignment, numpy) and diversity under both
    empty-mask conventions, from the counts.
The first batch warms up untimed, as in probunet. Prints one JSON line with the fields of
probunet's report; `probunet bench-eval` runs both and prints them side by side.
"""

import argparse
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_probunet import ProbUNet  # noqa: E402

CE_EPS = 1e-8


def hungarian(cost):
    """Minimum-cost assignment of a square matrix (Kuhn-Munkres with potentials, the inner
    loop over columns vectorised); returns the column of each row."""
    n = cost.shape[0]
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=np.int64)  # match[j]: row on column j (1-based), 0 if none
    way = np.zeros(n + 1, dtype=np.int64)
    for row in range(1, n + 1):
        match[0] = row
        col = 0
        slack = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[col] = True
            current = match[col]
            free = ~used[1:]
            reduced = cost[current - 1] - u[current] - v[1:]
            better = free & (reduced < slack[1:])
            slack[1:][better] = reduced[better]
            way[1:][better] = col
            masked = np.where(free, slack[1:], np.inf)
            nxt = int(np.argmin(masked)) + 1
            delta = masked[nxt - 1]
            u[match[used]] += delta
            v[used] -= delta
            slack[1:][free] -= delta
            col = nxt
            if match[col] == 0:
                break
        while col:
            prev = way[col]
            match[col] = match[prev]
            col = prev
    assignment = np.zeros(n, dtype=np.int64)
    assignment[match[1:] - 1] = np.arange(n)
    return assignment


def nanmean(values):
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def host_metrics(gram, m, n, ncc, area, intersections):
    """Both conventions' metrics of one image from its counts, as probunet's host does."""
    sizes = np.diag(gram).astype(np.float64)
    union = sizes[:, None] + sizes[None, :] - gram
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = gram / union
        prediction_union = area + sizes[:m] - intersections
        prediction_ratio = intersections / prediction_union
    size = math.lcm(m, n)
    rows = np.arange(size)
    phiseg_iou = np.where(union > 0, ratio, 1.0)
    cost = -phiseg_iou[rows[:, None] % m, m + rows[None, :] % n]
    assignment = hungarian(cost)
    off_diagonal = ~np.eye(n, dtype=bool)
    out = {}
    for convention, empty in (("phiseg", 1.0), ("kohl-nan", math.nan)):
        iou = np.where(union > 0, ratio, empty)
        d = 1.0 - iou
        out[convention] = {
            "ged": 2 * nanmean(d[m:, :m]) - nanmean(d[m:, m:]) - nanmean(d[:m, :m]),
            "hm_iou": nanmean(iou[rows % m, m + assignment % n]),
            "diversity": nanmean(d[m:, m:][off_diagonal]),
            "ncc": ncc,
            "mean_pred_iou": nanmean(np.where(prediction_union > 0, prediction_ratio, empty)),
        }
    return out


def device_counts(masks, probs):
    """Pairwise intersections, NCC and the mean prediction's counts of a batch, on the device."""
    b, m, n = masks.shape[0], masks.shape[1], probs.shape[1]
    masks = masks.float().flatten(2)
    binary = torch.cat([masks, (probs > 0.5).float().flatten(2)], 1)
    gram = torch.bmm(binary, binary.transpose(1, 2)).long()
    masks = masks.double()
    probs = probs.flatten(2).double()
    clamped = probs.clamp(CE_EPS, 1 - CE_EPS)
    log_fg = clamped.log().mean(1, keepdim=True)
    log_bg = (1 - clamped).log().mean(1, keepdim=True)

    def expected_ce(t):
        return -(t * log_fg + (1 - t) * log_bg)

    uncertainty = expected_ce(probs.mean(1, keepdim=True))
    error = expected_ce(masks)
    u = uncertainty - uncertainty.mean(-1, keepdim=True)
    e = error - error.mean(-1, keepdim=True)
    r = (u * e).sum(-1) / ((u * u).sum(-1) * (e * e).sum(-1)).sqrt()
    constant = (uncertainty.amax(-1) == uncertainty.amin(-1)) | (error.amax(-1) == error.amin(-1))
    r = r.masked_fill(constant, math.nan)
    ncc = r.nan_to_num(0.0).sum(-1) / (~r.isnan()).sum(-1)
    prediction = (probs.mean(1) > 0.5).double()
    area = prediction.sum(-1)
    intersections = (masks * prediction[:, None]).sum(-1)
    return gram.cpu().numpy(), ncc.cpu().numpy(), area.cpu().numpy(), intersections.cpu().numpy()


def bench_torch(export, samples, batch, device):
    with open(os.path.join(export, "model.json")) as f:
        model = ProbUNet.from_config(json.load(f))
    model.load_state_dict(load_file(os.path.join(export, "weights.safetensors")), strict=True)
    model.to(device).eval()
    data = load_file(os.path.join(export, "data.safetensors"))
    images, masks, noise = data["images"], data["masks"], data["noise"]
    total = images.shape[0]
    device_seconds = host_seconds = 0.0
    scores = []
    with torch.no_grad():
        for start in range(0, total, batch):
            stop = min(start + batch, total)
            t0 = time.perf_counter()
            x = images[start:stop].to(device)
            y = masks[start:stop].to(device)
            eps = noise[start:stop].to(device)
            probs = torch.sigmoid(model.sample(x, samples, eps=eps)[:, :, 0])
            gram, ncc, area, intersections = device_counts(y, probs)
            t1 = time.perf_counter()
            m = y.shape[1]
            batch_scores = [
                host_metrics(gram[i], m, samples, float(ncc[i]), area[i], intersections[i])
                for i in range(stop - start)
            ]
            t2 = time.perf_counter()
            if start >= batch:  # the first batch warms up, as in probunet
                device_seconds += t1 - t0
                host_seconds += t2 - t1
                scores.extend(s["phiseg"] for s in batch_scores)
    seconds = device_seconds + host_seconds
    cpu = device == "cpu"
    return {
        "implementation": "pytorch",
        "device": f"cpu ({torch.get_num_threads()} threads)" if cpu else device,
        "images": len(scores),
        "samples": samples,
        "batch": batch,
        "size": int(images.shape[-1]),
        "seconds": seconds,
        "device_seconds": device_seconds,
        "host_seconds": host_seconds,
        "images_per_s": len(scores) / seconds,
        "mean_ged": float(np.mean([s["ged"] for s in scores])),
        "mean_hm_iou": float(np.mean([s["hm_iou"] for s in scores])),
        "mean_diversity": float(np.mean([s["diversity"] for s in scores])),
        # ru_maxrss is in KiB on Linux; on CUDA, what the caching allocator handed out.
        "peak_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if cpu
                     else torch.cuda.max_memory_allocated() / 2**20),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", required=True, help="the folder probunet bench-eval --one wrote")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    args = parser.parse_args()
    print(json.dumps(bench_torch(args.export, args.samples, args.batch, args.device)))


if __name__ == "__main__":
    main()
