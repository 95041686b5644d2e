#!/usr/bin/env bash
# Creates the project-local Python environment that provides libtorch (torch==2.11.0 from
# PyPI, with its CUDA libraries) plus numpy and tensorboard for the reference scripts and
# tests. Idempotent and fast once done: it installs only what is missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
torch_version="2.11.0"
python="${PYTHON:-python3}"

if ! command -v "$python" >/dev/null 2>&1; then
    echo "setup: '$python' not found; install Python 3 with pip (or set PYTHON=...)" >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv"
    "$python" -m venv "$venv"
fi

missing=()
"$venv/bin/python" - "$torch_version" 2>/dev/null <<'PY' || missing+=("torch==$torch_version")
import sys
import torch
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] else 1)
PY
for module in numpy tensorboard safetensors; do
    "$venv/bin/python" -c "import $module" 2>/dev/null || missing+=("$module")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]} into $venv (torch brings ~5 GB of CUDA libraries; about a minute)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${missing[@]}"
fi
echo "setup: $venv has torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
