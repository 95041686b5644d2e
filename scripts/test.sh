#!/usr/bin/env bash
# The whole test suite, from a fresh clone: sets up .venv (once), checks formatting and
# lints, and runs every unit and end-to-end test against the release build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
source scripts/env.sh
cargo fmt --all -- --check
# Lints, including the library's and the CLI's ban on unwrap/expect outside tests.
cargo clippy --release --locked --all-targets -- -D warnings
cargo test --release --locked "$@"
