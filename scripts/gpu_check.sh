#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA device and PyTorch but no Rust (the
# project's lent H100/H200): doctor, the training and sampling benchmark against PyTorch
# eager and torch.compile, the eval benchmark, and a short training run on the device.
#
# Build here, then put a stripped binary where the device tool carries it:
#     scripts/gpu_check.sh --stage          # -> gpu/probunet (git-ignored, ~6 MB)
# and on the GPU machine, from the copy of the tree (run with carry ["gpu"]):
#     scripts/gpu_check.sh [DEVICE]         # DEVICE: cuda (default) or cpu, for a dry run
# Everything it prints also lands in $OUT (or gpu-check/): logs and bench JSON lines.
# BATCHES, PRECISIONS, STEPS, TRAIN_STEPS and COMPILE=0 trim it to the time at hand.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [ "${1:-}" = "--stage" ]; then
    source scripts/env.sh
    cargo build --release --locked
    mkdir -p gpu
    strip -o gpu/probunet target/release/probunet
    ls -l gpu/probunet
    exit 0
fi

device="${1:-cuda}"
out="${OUT:-$root/gpu-check}"
mkdir -p "$out"
bin="${PROBUNET_BIN:-$root/gpu/probunet}"
[ -x "$bin" ] || bin="$root/target/release/probunet"
python="${PROBUNET_PYTHON:-$(command -v python3)}"
export PROBUNET_PYTHON="$python" PROBUNET_REPO="$root"
# The binary's rpath points at the build machine's venv; here libtorch is the python's.
torch_lib="$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

step() {
    local name="$1"
    shift
    echo "== $name: $*" | tee -a "$out/summary.txt"
    local start=$SECONDS
    if "$@" > "$out/$name.log" 2>&1; then
        echo "   ok in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    else
        echo "   FAILED ($?) in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    fi
    tail -n 25 "$out/$name.log"
}

(nvidia-smi || true) > "$out/nvidia-smi.log" 2>&1
step doctor "$bin" doctor --device "$device" --steps 3
step bench "$bin" bench --device "$device" --batches "${BATCHES:-5,32,128}" \
    --precisions "${PRECISIONS:-fp32,bf16}" --steps "${STEPS:-20}" --warmup 3 \
    $([ "${COMPILE:-1}" = 1 ] && echo --compile) --out "$out/bench.jsonl"
step bench-eval "$bin" bench-eval --device "$device" --repeats 2
work="$(mktemp -d)"
step train env -C "$work" "$bin" train "$root/experiments/quickstart.toml" --device "$device" \
    --plain --set "train.steps=${TRAIN_STEPS:-300}"
rm -rf "$work"
cat "$out/summary.txt"
