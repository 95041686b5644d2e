#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv (once), build probunet, and check the
# install end to end (libtorch, CUDA, the model, a timed training step).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
source scripts/env.sh
cargo build --release --locked
target/release/probunet doctor "$@"
