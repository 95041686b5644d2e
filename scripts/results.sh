#!/usr/bin/env bash
# The synthetic study behind docs/results.md, start to finish; safe to re-run: the sweeps
# resume where they stopped, a trial is evaluated again only when its best checkpoint is
# newer than its evaluation, and the page is rewritten from whatever is on disk.
#   scripts/results.sh            # from the repository root, after cargo build --release
# JOBS (default 2) trials run at once; PROBUNET names another binary, PROBUNET_PYTHON
# another Python (3.11 or newer).
set -euo pipefail
cd "$(dirname "$0")/.."
probunet=${PROBUNET:-target/release/probunet}
jobs=${JOBS:-2}
[ -x "$probunet" ] || { echo "results.sh: $probunet is missing: run cargo build --release" >&2; exit 2; }

# The machine, for the page (kept from the first run, which is the one that trained).
machine=runs/synthetic-machine.json
if [ ! -f "$machine" ]; then
    mkdir -p runs
    cpu=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)
    isa=$(grep -q avx512f /proc/cpuinfo && echo "AVX-512" || echo "AVX2, no AVX-512")
    memory=$(awk '/MemTotal/ {printf "%d", $2 / 1048576}' /proc/meminfo)
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
    printf '{"cpu": "%s", "isa": "%s", "cores": %s, "memory_gib": %s, "gpu": "%s"}\n' \
        "$cpu" "$isa" "$(nproc)" "$memory" "${gpu:-no GPU}" > "$machine.tmp"
    mv "$machine.tmp" "$machine"
fi

# A trial that fails (a NaN) stays failed and the page lists it; the sweep then exits
# non-zero, which is not a reason to stop here.
for sweep in synthetic-baseline synthetic-sweep synthetic-clamp; do
    [ -f "experiments/$sweep.toml" ] || continue
    "$probunet" sweep "experiments/$sweep.toml" --jobs "$jobs" --plain ||
        echo "results.sh: $sweep did not finish every trial; the page says which" >&2
done

# Evaluates RUN (with FLAGS) unless its evaluation is newer than its best checkpoint and
# was made with the same readout; only finished trials have a checkpoint to evaluate.
evaluate() {
    local run=${1%/} readout=$2
    shift 2
    grep -q '"state": "finished"' "$run/status.json" 2>/dev/null || return 0
    if [ "$run/eval/test-100.json" -nt "$run/checkpoints/best" ] &&
        grep -q "\"noise\": \"$readout" "$run/eval/test-100.json"; then
        return 0
    fi
    "$probunet" eval "$run" --split test --samples 16,100 "$@"
}
# The baseline's readout is the prior's mean, one mask per image: a deterministic U-Net's.
for run in runs/synthetic-baseline/*/; do evaluate "$run" "none" --deterministic; done
for run in runs/synthetic-sweep/*/ runs/synthetic-clamp/*/; do evaluate "$run" "per image"; done

"${PROBUNET_PYTHON:-python3}" scripts/results.py
