#!/usr/bin/env python3
"""Writes docs/results.md from the synthetic study's own outputs.

Reads runs/synthetic-sweep and runs/synthetic-baseline: each sweep's summary.csv and
sweep.json, each trial's metrics.csv, eval/test-{16,100}.json and .csv (from
`probunet eval`), and copies the figures it shows into docs/img/results/. Every number on
the page is computed here from those files; scripts/results.sh runs the whole study and
then this script. Standard library only (Python 3.11 or newer, for tomllib).

    python3 scripts/results.py [--root .] [--out docs/results.md]
"""
import argparse
import csv
import json
import os
import random
import shutil
import statistics
import sys
import tomllib
from itertools import combinations

COUNTS = (16, 100)
METRICS = ("ged", "hm_iou", "ncc", "diversity")
LABELS = {"ged": "GED", "hm_iou": "HM-IoU", "ncc": "NCC", "diversity": "diversity"}
# Lower is better for GED only.
RESAMPLES = 5000
WITHIN = 0.15
# Sweeps reported beside the main one when they are there: the same grid with something set.
EXTRA_SWEEPS = ("synthetic-clamp",)


def fail(why):
    sys.exit(f"results.py: {why}")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{path}: {e}")


def read_csv(path):
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError as e:
        fail(f"{path}: {e}")


def number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


class Trial:
    """One finished trial: its settings, validation curve and test evaluations."""

    def __init__(self, sweep_dir, row, axes, variant):
        self.id = row["id"]
        self.dir = os.path.join(sweep_dir, self.id)
        self.settings = {name: row[key] for name, key in axes}
        self.variant = variant
        self.seed = int(row.get("train.seed") or 0)
        self.kl = number(row["final_val_kl"])
        self.curve = [
            (int(r["step"]), number(r["ged"]))
            for r in read_csv(os.path.join(self.dir, "metrics.csv"))
            if r["phase"] == "val"
        ]
        self.report = {}
        self.rows = {}
        for n in COUNTS:
            base = os.path.join(self.dir, "eval", f"test-{n}")
            if not os.path.exists(base + ".json"):
                fail(f"{base}.json is missing: run `probunet eval {self.dir}` (scripts/results.sh does)")
            self.report[n] = read_json(base + ".json")
            self.rows[n] = read_csv(base + ".csv")

    def per_image(self, n, metric):
        return self.column(n, "ncc" if metric == "ncc" else f"{metric}_phiseg")

    def column(self, n, name):
        if self.rows[n] and name not in self.rows[n][0]:
            fail(f"{self.dir}/eval/test-{n}.csv has no {name} column: re-run its eval")
        return [number(r[name]) for r in self.rows[n]]

    def mean(self, n, metric):
        return self.report[n]["metrics"]["phiseg"][metric]["mean"]


def load_sweep(root, name):
    folder = os.path.join(root, "runs", name)
    summary = os.path.join(folder, "summary.csv")
    if not os.path.exists(summary):
        fail(f"{summary} is missing: run `probunet sweep experiments/{name}.toml` first")
    plan = read_json(os.path.join(folder, "sweep.json"))
    axes = [(a["name"], a["key"]) for a in plan["axes"] if a["key"] != "train.seed"]
    rows = read_csv(summary)
    unfinished = [r["id"] for r in rows if r["status"] not in ("finished", "failed")]
    if unfinished:
        fail(f"{folder}: trials still to run: {', '.join(unfinished)}")
    variant = ", ".join(variant_name(fixed) for fixed in plan["fixed"])
    trials = [Trial(folder, r, axes, variant) for r in rows if r["status"] == "finished"]
    failed = [dict(r, sweep=name) for r in rows if r["status"] == "failed"]
    return Sweep(folder, plan, axes, trials, failed)


class Sweep:
    def __init__(self, folder, plan, axes, trials, failed):
        self.folder, self.plan, self.axes = folder, plan, axes
        self.trials, self.failed = trials, failed


def variant_name(fixed):
    """`model.log_sigma_clamp=20` as `log_sigma_clamp 20`: what a sweep sets beside its grid."""
    key, _, value = fixed.partition("=")
    return f"{key.rsplit('.', 1)[-1]} {value}"


def bootstrap(values, seed=0):
    """Mean and percentile 95% interval of the mean over images (NaN left out)."""
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    k = len(values)
    means = sorted(sum(rng.choices(values, k=k)) / k for _ in range(RESAMPLES))
    return sum(values) / k, means[int(0.025 * RESAMPLES)], means[int(0.975 * RESAMPLES) - 1]


def pooled(trials, n, metric):
    """Per image, the mean over the trials (seeds); then the bootstrap over images."""
    columns = [t.per_image(n, metric) for t in trials]
    per_image = []
    for values in zip(*columns):
        kept = [v for v in values if v == v]
        per_image.append(sum(kept) / len(kept) if kept else float("nan"))
    return bootstrap(per_image)


def cell(stats, digits=3):
    mean, low, high = stats
    if mean != mean:
        return "-"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def ideal_stats(report, metric):
    s = report["ideal"]["metrics"]["phiseg"][metric]
    return s["mean"], s["ci_low"], s["ci_high"]


def group(trials, axes):
    """Trials by configuration: the grid values, then what the sweep sets beside them."""
    groups = {}
    for t in trials:
        key = tuple(t.settings[a] for a, _ in axes) + (t.variant,)
        groups.setdefault(key, []).append(t)
    return groups


def seed_spread(trials, n=100):
    geds = [t.mean(n, "ged") for t in trials]
    return min(geds), max(geds), statistics.pstdev(geds)


def rankings(groups, seeds, n=100):
    """How many pairs of configurations every seed orders the same way, over the
    configurations that every seed finished."""
    groups = {k: ts for k, ts in groups.items() if {t.seed for t in ts} >= set(seeds)}
    by_seed = {}
    for key, trials in groups.items():
        for t in trials:
            by_seed.setdefault(t.seed, {})[key] = t.mean(n, "ged")
    keys = sorted(groups)
    same = 0
    pairs = list(combinations(keys, 2))
    for a, b in pairs:
        signs = {by_seed[s][a] < by_seed[s][b] for s in seeds}
        same += len(signs) == 1
    winners = {s: min(keys, key=lambda k: by_seed[s][k]) for s in seeds}
    return same, len(pairs), winners


def copy_figure(source, target_dir, name):
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, name)
    shutil.copyfile(source, target + ".tmp")
    os.replace(target + ".tmp", target)
    return name


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def label(key, axes):
    parts = [f"{name} {value}" for (name, _), value in zip(axes, key)]
    return ", ".join(parts + [key[-1]] if key[-1] else parts)


def machine_line(root):
    path = os.path.join(root, "runs", "synthetic-machine.json")
    if not os.path.exists(path):
        return "the machine was not recorded (scripts/results.sh records it)"
    m = read_json(path)
    return f"{m['cpu']} ({m['isa']}, {m['cores']} cores, {m['memory_gib']} GiB), {m['gpu']}"


def study_span(trials):
    """First start and last end of the trials, and their summed wall time in hours."""
    starts, ends, wall = [], [], 0.0
    for t in trials:
        status = read_json(os.path.join(t.dir, "status.json"))
        starts.append(status["started_at"])
        ends.append(status["ended_at"])
        wall += status["wall_s"]
    return min(starts), max(ends), wall / 3600


def hours_between(start, end):
    from datetime import datetime

    parse = lambda s: datetime.fromisoformat(s[:19])  # noqa: E731
    return (parse(end) - parse(start)).total_seconds() / 3600


class Page:
    def __init__(self, root, img_dir):
        self.lines = []
        self.root = root
        self.img_dir = img_dir

    def add(self, text=""):
        self.lines.append(text)

    def table(self, header, rows):
        self.add("| " + " | ".join(header) + " |")
        self.add("|" + "---|" * len(header))
        for row in rows:
            self.add("| " + " | ".join(row) + " |")
        self.add()

    def figure(self, source, name, alt):
        copy_figure(source, os.path.join(self.root, self.img_dir), name)
        self.add(f"![{alt}](img/results/{name})")
        self.add()


def section_header(page, ctx):
    best, ratio = ctx["best"], ctx["ratio"]
    page.add("# Results: how close the Probabilistic U-Net gets to the ideal model")
    page.add()
    page.add(
        "Written by `scripts/results.py` from the outputs of `scripts/results.sh` "
        "(runs/synthetic-sweep, runs/synthetic-clamp and runs/synthetic-baseline): nothing "
        "here is typed by hand. The study's trials ran from "
        f"{ctx['start'][:16].replace('T', ' ')} to {ctx['end'][:16].replace('T', ' ')} UTC "
        f"({ctx['elapsed']:.1f} h of wall time, {ctx['trial_hours']:.1f} h of trial time, "
        f"one CPU thread each) on {ctx['machine']}."
    )
    page.add()
    page.add(
        f"**Headline.** The best configuration, {label(best, ctx['axes'])}, scores a test GED "
        f"of {ctx['best_ged'][0]:.3f} (95% interval {ctx['best_ged'][1]:.3f}-{ctx['best_ged'][2]:.3f}) "
        f"at 100 samples against the ideal model's {ctx['ideal_ged'][0]:.3f}: "
        f"{ratio:.2f}x the ideal, {'within' if ratio <= 1 + WITHIN else 'not within'} "
        f"{WITHIN:.0%} of it. The deterministic baseline scores {ctx['baseline_ged'][0]:.3f} "
        f"({ctx['baseline_ged'][0] / ctx['ideal_ged'][0]:.2f}x)."
        + seeds_note(ctx)
    )
    page.add()


def seeds_note(ctx):
    """What the headline must say about trials that did not finish."""
    finished = len(ctx["groups"][ctx["best"]])
    text = ""
    if finished < ctx["repeats"]:
        text += (f" Only {finished} of its {ctx['repeats']} seeds finished, so it is the best "
                 "of the runs that survived.")
    failed = [f for f in ctx["failed"] if f["sweep"] == "synthetic-sweep"]
    if failed:
        text += (f" {len(failed)} of the sweep's {ctx['n_trials']} trials stopped on a "
                 "non-finite gradient (see *Trials that failed*).")
    return text


def section_setup(page, ctx):
    store = ctx["store"]
    page.add("## What was run")
    page.add()
    page.add(
        f"- **Data**: the built-in synthetic dataset ({store['items']} images of "
        f"{store['height']}x{store['width']}, {store['annotators']} simulated readers who disagree "
        "on the boundary and on whether a faint lesion is there at all). "
        f"Every number below is on its test split: {ctx['test_items']} images of patients "
        "that training never saw."
    )
    page.add(
        "- **Model and training**: `experiments/synthetic.toml`, the quickstart's network "
        f"(filters {ctx['model']['filters']}, {ctx['model']['fcomb_convs']} fcomb convs), "
        f"{ctx['train']['steps']} steps of batch {ctx['train']['batch']}, Adam at lr "
        f"{ctx['train']['lr']} decayed along a half cosine, the reconstruction summed per image "
        "and averaged over the batch. The checkpoint evaluated is each run's best validation GED."
    )
    page.add(
        f"- **Sweep**: `experiments/synthetic-sweep.toml`, {ctx['grid']}, "
        f"{len(ctx['seeds'])} seeds each ({ctx['n_trials']} trials). beta 0.625 is the seed "
        "port's beta 10 with its reconstruction summed over the batch (10 / batch 16: the same "
        "objective up to a constant factor, which Adam does not see); beta 10 is that number "
        "read per image, a 16 times stronger KL weight."
    )
    page.add(
        "- **Ideal model**: the synthetic generator knows every image's true reader "
        "distribution, so `probunet eval` also scores fresh draws of the readers as if they were "
        "a model's samples, with the same metrics, sample counts and bootstrap."
    )
    page.add(
        "- **Deterministic baseline**: `experiments/synthetic-baseline.toml`, the same spec "
        "with beta 1000, so the posterior must equal the prior and z carries nothing about the "
        "annotation: a U-Net trained on a random reader's mask. It is evaluated with "
        "`probunet eval --deterministic`, which decodes the prior's mean for every sample: one "
        "mask per image, as a deterministic U-Net predicts. The same network, data, length and optimiser make it the honest baseline "
        "(probunet has no latent-free model to switch to)."
    )
    page.add(
        "- **Intervals**: 95% percentile bootstrap over the test images of each image's metric "
        f"averaged over the seeds ({RESAMPLES} resamples); the spread between seeds is given "
        "separately. Metrics use the PHiSeg convention for empty masks (docs/spec-reference.md)."
    )
    page.add()


def empty_rate(trials, n, which="samples"):
    return statistics.mean(t.report[n]["empty_masks"][which]["mean"] for t in trials)


def section_table(page, ctx):
    page.add("## Test results")
    page.add()
    page.add(
        "One table per sample count, sorted by GED at 100 samples. *x ideal* divides by the "
        "ideal model's GED at the same count; *empty samples* is the fraction of samples with "
        "no foreground; *seeds* gives the lowest and highest of the seeds' own GED."
    )
    page.add()
    for n in COUNTS:
        page.add(f"### {n} samples per image")
        page.add()
        page.table(
            ["model", "GED", "x ideal", "HM-IoU", "NCC", "diversity", "empty samples", "seeds (GED)"],
            count_rows(ctx, n),
        )
    annotations = empty_rate(ctx["all"], 100, "annotations")
    page.add(
        "The ideal model's empty rate is the readers' own; the four given annotations of the "
        f"test images are empty {annotations:.0%} of the time."
    )
    page.add()


def count_rows(ctx, n):
    ideal = ctx["ideal"][n]
    ideal_ged = ideal_stats(ideal, "ged")
    rows = [["ideal model", cell(ideal_ged), "1.00"]
            + [cell(ideal_stats(ideal, m)) for m in ("hm_iou", "ncc", "diversity")]
            + [f"{ideal['ideal']['empty_samples']['mean']:.2f}", "-"]]
    named = [(label(k, ctx["axes"]), v) for k, v in sorted(
        ctx["groups"].items(), key=lambda kv: ctx["ged100"][kv[0]][0])]
    named.append(("deterministic baseline (beta 1000)", ctx["baseline"]))
    for name, trials in named:
        low, high, _ = seed_spread(trials, n)
        ged = pooled(trials, n, "ged")
        seeds = f"{low:.3f}-{high:.3f}" if len(trials) > 1 else f"{low:.3f}"
        if len(trials) < ctx["repeats"]:
            seeds += f" ({len(trials)} of {ctx['repeats']} finished)"
        rows.append([name, cell(ged), f"{ged[0] / ideal_ged[0]:.2f}"]
                    + [cell(pooled(trials, n, m)) for m in ("hm_iou", "ncc", "diversity")]
                    + [f"{empty_rate(trials, n):.2f}", seeds])
    return rows


def marginal_rows(ctx, axis_index):
    """Per value of one axis, every finished trial of the main sweep with that value."""
    main = {k: ts for k, ts in ctx["groups"].items() if not k[-1]}
    values = sorted({k[axis_index] for k in main}, key=float)
    rows = []
    for v in values:
        trials = [t for k, ts in main.items() if k[axis_index] == v for t in ts]
        ged = pooled(trials, 100, "ged")
        rows.append([v, cell(ged), f"{ged[0] / ctx['ideal_ged'][0]:.2f}",
                     cell(pooled(trials, 100, "diversity")), f"{empty_rate(trials, 100):.2f}",
                     str(len(trials))])
    return rows


def section_axes(page, ctx, sweep_folder):
    page.add("## GED against beta and latent_dim")
    page.add()
    for index, (name, _) in enumerate(ctx["axes"]):
        page.add(f"Test GED at 100 samples per {name}, over every other setting and seed of "
                 "the main sweep (its finished trials):")
        page.add()
        page.table([name, "GED @100", "x ideal", "diversity @100", "empty samples", "trials"],
                   marginal_rows(ctx, index))
    page.add(
        "The sweep's own figure (`probunet sweep` draws it): the best validation GED of every "
        "trial (points), the mean per value (line) and the ideal model (dashed), one panel per "
        "axis."
    )
    page.add()
    page.figure(os.path.join(sweep_folder, "summary.png"), "sweep-summary.png",
                "best validation GED per beta and per latent_dim")


def section_seeds(page, ctx):
    same, pairs, winners = rankings(ctx["groups"], ctx["seeds"])
    complete = [ts for ts in ctx["groups"].values() if len(ts) == len(ctx["seeds"])]
    page.add("## Seed-to-seed spread")
    page.add()
    spreads = [seed_spread(ts)[2] for ts in complete]
    page.add(
        f"Over the {len(complete)} configurations that every seed finished, the standard "
        f"deviation of test GED between seeds is {min(spreads):.3f} to {max(spreads):.3f} "
        f"(median {statistics.median(spreads):.3f}). Of their {pairs} pairs, {same} are "
        "ordered the same way by every seed."
    )
    page.add()
    page.table(["seed", "best configuration (test GED @100)"],
               [[str(s), label(k, ctx["axes"])] for s, k in sorted(winners.items())])
    distinct = len(set(winners.values()))
    verdict = ("The best configuration is the same for every seed: the ranking at the top "
               "survives the seed." if distinct == 1 else
               f"The seeds pick {distinct} different best configurations: the ranking at the top "
               "does not survive the seed, and only differences larger than the spread above "
               "mean anything.")
    page.add(verdict)
    page.add()


def mean_curve(trials):
    steps = sorted({s for t in trials for s, _ in t.curve})
    by_step = {s: [g for t in trials for st, g in t.curve if st == s and g == g] for s in steps}
    return [(s, statistics.mean(v)) for s, v in by_step.items() if v]


def section_curves(page, ctx):
    page.add("## Training curves")
    page.add()
    page.add(
        "Validation GED (16 samples, the whole validation split) at every validation, the mean "
        "of the three seeds. Step 0 is the untrained model. The last column is the change "
        "between the last two validations: near zero at a plateau."
    )
    page.add()
    named = [(label(k, ctx["axes"]), ts) for k, ts in sorted(ctx["groups"].items())]
    named.append(("baseline (beta 1000)", ctx["baseline"]))
    steps = [s for s, _ in mean_curve(named[0][1])]
    rows = []
    for name, trials in named:
        curve = dict(mean_curve(trials))
        values = [curve.get(s, float("nan")) for s in steps]
        rows.append([name] + [f"{v:.3f}" for v in values] + [f"{values[-1] - values[-2]:+.3f}"])
    last = f"last {steps[-1] - steps[-2]} steps"
    page.table(["model"] + [f"step {s}" for s in steps] + [last], rows)
    flat = [r[0] for r in rows if abs(float(r[-1])) <= 0.04]
    page.add(
        f"{len(flat)} of the {len(rows)} rows move by 0.04 or less over the last "
        f"{steps[-1] - steps[-2]} steps (the validation's own noise between seeds is about "
        "that size); the others were still moving when training stopped, so longer training "
        "could still lower their GED."
    )
    page.add()
    best = ctx["groups"][ctx["best"]][0]
    page.add(f"The curves of the best configuration's seed {best.seed} (`probunet` draws "
             "`curves.png` in every run):")
    page.add()
    page.figure(os.path.join(best.dir, "curves.png"), "curves-best.png",
                "training and validation curves of the best configuration")
    page.add("and of the deterministic baseline's seed 0:")
    page.add()
    page.figure(os.path.join(ctx["baseline"][0].dir, "curves.png"), "curves-baseline.png",
                "training and validation curves of the deterministic baseline")


def section_gap(page, ctx):
    best = ctx["groups"][ctx["best"]]
    ideal = ctx["ideal"][100]
    diversity = pooled(best, 100, "diversity")[0]
    ideal_diversity = ideal["ideal"]["metrics"]["phiseg"]["diversity"]["mean"]
    empty, ideal_empty = empty_rate(best, 100), ideal["ideal"]["empty_samples"]["mean"]
    kl = statistics.mean(t.kl for t in best)
    page.add("## Where the gap comes from")
    page.add()
    page.add(
        "GED is twice the mean distance of samples to annotations minus the mean distance "
        "between samples and the mean distance between annotations, so a model can lose to the "
        "ideal by being too far from the readers or by being less (or more) diverse than they "
        "are. Per configuration, at 100 test samples:"
    )
    page.add()
    rows = []
    for key, trials in sorted(ctx["groups"].items()):
        rows.append([label(key, ctx["axes"]),
                     f"{pooled(trials, 100, 'diversity')[0]:.3f}",
                     f"{empty_rate(trials, 100):.2f}",
                     f"{statistics.mean(t.kl for t in trials):.2f}",
                     f"{pooled(trials, 100, 'hm_iou')[0]:.3f}"])
    rows.append(["ideal model", f"{ideal_diversity:.3f}", f"{ideal_empty:.2f}", "-",
                 f"{ideal['ideal']['metrics']['phiseg']['hm_iou']['mean']:.3f}"])
    page.table(["model", "diversity", "empty samples", "final val KL", "HM-IoU"], rows)
    ratio = ctx["ratio"]
    findings = []
    if diversity < 0.8 * ideal_diversity:
        findings.append(
            f"the best configuration's samples are less diverse than the readers "
            f"({diversity:.3f} against {ideal_diversity:.3f}): the prior does not spread its "
            "samples over the readers' disagreement")
    elif diversity > 1.2 * ideal_diversity:
        findings.append(
            f"the best configuration's samples are more diverse than the readers "
            f"({diversity:.3f} against {ideal_diversity:.3f})")
    if abs(empty - ideal_empty) > 0.1:
        findings.append(
            f"its samples are empty {empty:.0%} of the time where the readers' are "
            f"{ideal_empty:.0%}: the decision whether a faint lesion is there is what it gets "
            "wrong most")
    hm_iou = pooled(best, 100, "hm_iou")[0]
    ideal_hm_iou = ideal["ideal"]["metrics"]["phiseg"]["hm_iou"]["mean"]
    if hm_iou < 0.9 * ideal_hm_iou:
        findings.append(
            f"its samples match the readers' masks less well than the readers' own draws do "
            f"(HM-IoU {hm_iou:.3f} against {ideal_hm_iou:.3f}): the outlines it draws, more than "
            "how many it draws or how varied, are what it gets wrong")
    if kl < 0.5:
        findings.append(f"its final KL is {kl:.2f} nats: the posterior has collapsed onto the "
                        "prior and z carries almost nothing")
    if ratio <= 1 + WITHIN:
        text = f"The best configuration is within {WITHIN:.0%} of the ideal ({ratio:.2f}x)."
    else:
        text = f"The best configuration stays {ratio:.2f}x the ideal, more than {WITHIN:.0%} away."
    if findings:
        text += " What the table shows: " + "; ".join(findings) + "."
    page.add(text)
    page.add()


def seed_mean(trials, n, name):
    """Per image, the mean over the trials of a CSV column."""
    columns = [t.column(n, name) for t in trials]
    return [statistics.mean(values) for values in zip(*columns)]


def pearson(xs, ys):
    pairs = [(x, y) for x, y in zip(xs, ys) if x == x and y == y]
    if len(pairs) < 3:
        return float("nan")
    mx, my = (statistics.mean(v) for v in zip(*pairs))
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else float("nan")


def section_images(page, ctx, n=100):
    """Where, image by image, the best configuration loses to the ideal."""
    trials = ctx["groups"][ctx["best"]]
    model = {k: seed_mean(trials, n, c) for k, c in (
        ("ged", "ged_phiseg"), ("diversity", "diversity_phiseg"), ("empty", "empty_samples"))}
    ideal = {k: trials[0].column(n, c) for k, c in (
        ("ged", "ideal_ged_phiseg"), ("diversity", "ideal_diversity_phiseg"),
        ("empty", "ideal_empty_samples"))}
    kinds = [("readers mostly mark a lesion (empty < 1/3)", lambda e: e < 1 / 3),
             ("readers split (empty 1/3 to 2/3)", lambda e: 1 / 3 <= e <= 2 / 3),
             ("readers mostly mark none (empty > 2/3)", lambda e: e > 2 / 3)]
    gap = sum(m - i for m, i in zip(model["ged"], ideal["ged"]))
    rows = []
    for name, test in kinds:
        index = [i for i, e in enumerate(ideal["empty"]) if test(e)]
        if not index:
            continue
        share = sum(model["ged"][i] - ideal["ged"][i] for i in index) / gap if gap else float("nan")
        mean = lambda v: statistics.mean(v[i] for i in index)  # noqa: E731
        rows.append([name, str(len(index)), f"{mean(model['ged']):.3f}", f"{mean(ideal['ged']):.3f}",
                     f"{share:.0%}", f"{mean(model['diversity']):.3f}",
                     f"{mean(ideal['diversity']):.3f}", f"{mean(model['empty']):.2f}",
                     f"{mean(ideal['empty']):.2f}"])
    page.add(
        f"Image by image (best configuration, {n} samples, each image's values the mean of its "
        "seeds), split by how often the true readers leave the image empty:"
    )
    page.add()
    page.table(["test images", "images", "GED", "ideal GED", "share of the gap", "diversity",
                "ideal diversity", "empty samples", "ideal empty"], rows)
    page.add(
        f"Across images, the model's diversity follows the readers' with correlation "
        f"{pearson(model['diversity'], ideal['diversity']):.2f}, and its empty-sample rate "
        f"follows theirs with correlation {pearson(model['empty'], ideal['empty']):.2f} "
        "(1 would be a model that knows which images are ambiguous, and how much)."
    )
    page.add()


def section_collapse(page, ctx, n=100):
    """Trials whose samples are almost always, or almost never, empty where the readers
    leave about half the images empty: the runs that make the seed spread."""
    ideal_empty = ctx["ideal"][n]["ideal"]["empty_samples"]["mean"]
    odd = [t for t in ctx["all"] + ctx["baseline"]
           if abs(t.report[n]["empty_masks"]["samples"]["mean"] - ideal_empty) > 0.3]
    if not odd:
        return
    page.add(
        f"Trials whose samples are empty far more or far less often than the readers' "
        f"{ideal_empty:.0%} (by more than 30 points), with the KL at their last validation:"
    )
    page.add()
    rows = [[f"{os.path.basename(os.path.dirname(t.dir))}/{t.id}",
             f"{t.report[n]['empty_masks']['samples']['mean']:.2f}",
             f"{t.mean(n, 'diversity'):.3f}", f"{t.kl:.1f}", f"{t.mean(n, 'ged'):.3f}"]
            for t in odd]
    page.table(["trial", "empty samples", "diversity", "final val KL", "GED @100"], rows)


def section_failures(page, ctx):
    if not ctx["failed"]:
        return
    page.add("## Trials that failed")
    page.add()
    page.add(
        "They are left out of every table above (a configuration's *seeds* column says how "
        "many of its seeds finished). Why each stopped, in its own words:"
    )
    page.add()
    rows = [[f"{f['sweep']}/{f['id']}", f["steps"] or "0", f["error"].split(";")[0]]
            for f in ctx["failed"]]
    page.table(["trial", "steps done", "error"], rows)


def section_pictures(page, ctx):
    trials = ctx["groups"][ctx["best"]]
    best = min(trials, key=lambda t: t.mean(100, "ged"))
    page.add("## Sample pictures")
    page.add()
    page.add(
        f"The best configuration's best seed ({best.id}) on the test images it scores best, "
        "median and worst on (GED at 16 samples): the image, the four readers, eight samples, "
        "the mean foreground probability and its variance. These are `probunet eval`'s own "
        "figures."
    )
    page.add()
    for which in ("best", "median", "worst"):
        source = os.path.join(best.dir, "eval", f"test-16-{which}.png")
        page.figure(source, f"test-{which}.png", f"{which} test image")


def section_regenerate(page):
    page.add("## Regenerate this page")
    page.add()
    page.add("```sh")
    page.add("scripts/setup.sh && source scripts/env.sh && cargo build --release")
    page.add("scripts/results.sh   # the sweeps (resumed if interrupted), every eval, this page")
    page.add("```")
    page.add()
    page.add(
        "`scripts/results.sh` runs `probunet sweep` on experiments/synthetic-baseline.toml, "
        "synthetic-sweep.toml and synthetic-clamp.toml (2 trials at once; `JOBS=` "
        "changes it), carrying on past trials that fail, `probunet eval` on every trial that has no test evaluation newer than "
        "its best checkpoint, then `python3 scripts/results.py`, which only reads. On a GPU the "
        "same commands run unchanged."
    )


def context(root):
    main = load_sweep(root, "synthetic-sweep")
    baseline = load_sweep(root, "synthetic-baseline")
    extra = [load_sweep(root, name) for name in EXTRA_SWEEPS
             if os.path.exists(os.path.join(root, "runs", name, "summary.csv"))]
    trials = main.trials + [t for sweep in extra for t in sweep.trials]
    for t in baseline.trials:
        if not t.report[100]["noise"].startswith("none"):
            fail(f"{t.dir} was not evaluated with --deterministic (scripts/results.sh does)")
    if not trials or not baseline.trials:
        fail("no finished trial to report on")
    groups = group(trials, main.axes)
    ged100 = {k: pooled(ts, 100, "ged") for k, ts in groups.items()}
    best = min(groups, key=lambda k: ged100[k][0])
    ideal = {n: trials[0].report[n] for n in COUNTS}
    if any(ideal[n].get("ideal") is None for n in COUNTS):
        fail("the evaluations have no ideal model: re-run `probunet eval` with this probunet")
    spec = trials[0].report[100]
    start, end, trial_hours = study_span(trials + baseline.trials)
    grid = " x ".join(
        f"{a['name']} {{{', '.join(str(v) for v in a['kind']['grid'])}}}"
        for a in main.plan["axes"] if "grid" in a["kind"])
    store = dict(spec["store"], items=store_items(spec))
    ideal_ged = ideal_stats(ideal[100], "ged")
    return {
        "axes": main.axes, "groups": groups, "ged100": ged100, "best": best, "ideal": ideal,
        "ideal_ged": ideal_ged, "best_ged": ged100[best],
        "ratio": ged100[best][0] / ideal_ged[0],
        "baseline": baseline.trials, "baseline_ged": pooled(baseline.trials, 100, "ged"),
        "all": trials, "seeds": sorted({t.seed for t in trials}),
        "repeats": next((len(a["kind"]["repeat"]) for a in main.plan["axes"]
                         if "repeat" in a["kind"]), 1),
        "n_trials": len(main.plan["trials"]), "extra": extra,
        "failed": main.failed + [f for sweep in extra for f in sweep.failed] + baseline.failed,
        "store": store,
        "test_items": spec["items"], "model": spec["model"], "train": train_spec(trials[0]),
        "grid": grid, "start": start, "end": end, "elapsed": hours_between(start, end),
        "trial_hours": trial_hours, "machine": machine_line(root),
    }


def store_items(report):
    manifest = read_json(os.path.join(report["store"]["path"], "manifest.json"))
    return len(manifest["keys"])


def train_spec(trial):
    """The [train] table of the trial's resolved spec."""
    path = os.path.join(trial.dir, "spec.toml")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)["train"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
        fail(f"{path}: {e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="the repository root")
    parser.add_argument("--out", default="docs/results.md")
    args = parser.parse_args()
    ctx = context(args.root)
    page = Page(args.root, os.path.join("docs", "img", "results"))
    section_header(page, ctx)
    section_setup(page, ctx)
    section_table(page, ctx)
    section_axes(page, ctx, os.path.join(args.root, "runs", "synthetic-sweep"))
    section_seeds(page, ctx)
    section_curves(page, ctx)
    section_gap(page, ctx)
    section_images(page, ctx)
    section_collapse(page, ctx)
    section_failures(page, ctx)
    section_pictures(page, ctx)
    section_regenerate(page)
    write_atomic(os.path.join(args.root, args.out), "\n".join(page.lines).rstrip() + "\n")
    print(f"wrote {args.out}: best {label(ctx['best'], ctx['axes'])}, "
          f"GED @100 {ctx['best_ged'][0]:.4f}, {ctx['ratio']:.2f}x the ideal")


if __name__ == "__main__":
    main()
