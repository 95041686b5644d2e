#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv (once), build probunet, and train the
# quickstart experiment on the built-in synthetic dataset (about two minutes on 2 CPU
# cores; on a GPU machine it uses the GPU). Extra arguments go to `probunet train`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
source scripts/env.sh
cargo build --release --locked
target/release/probunet train experiments/quickstart.toml "$@"
