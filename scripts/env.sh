# Source this file (`source scripts/env.sh`) to build probunet with plain cargo commands:
# it puts the project's .venv first on PATH and tells torch-sys to take libtorch from it.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$root/.venv/bin/python" ] || ! "$root/.venv/bin/python" -c 'import torch' 2>/dev/null; then
    echo "probunet: no libtorch found in $root/.venv; run scripts/setup.sh first" >&2
    return 1 2>/dev/null || exit 1
fi
export VIRTUAL_ENV="$root/.venv"
export PATH="$root/.venv/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export PROBUNET_PYTHON="$root/.venv/bin/python"
