#!/usr/bin/env bash
# PNG screenshots of a run's TensorBoard dashboards, taken with headless Chromium:
#
#     scripts/screenshots.sh runs/quickstart-20261201-120000 shots/
#
# writes scalars.png, images.png, custom_scalars.png, hparams.png and text.png (1500x900)
# into the output folder, skipping a dashboard TensorBoard has no data for. Needs the
# project's .venv (scripts/setup.sh), Node.js 18+ and Chromium; playwright-core is
# installed on first use into $PW_DIR (default /tmp/pw). $CHROMIUM overrides the browser.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "screenshots: $*" >&2; exit 1; }

[ $# -eq 2 ] || die "usage: scripts/screenshots.sh LOGDIR OUTDIR"
logdir="$1" outdir="$2"
[ -d "$logdir" ] || die "no such folder: $logdir"

tensorboard="$root/.venv/bin/tensorboard"
[ -x "$tensorboard" ] || die "no $tensorboard; run scripts/setup.sh (it installs tensorboard into .venv)"
command -v node >/dev/null || die "node not found; install Node.js 18 or newer (apt-get install -y nodejs npm)"
[ "$(node -p 'parseInt(process.versions.node)')" -ge 18 ] || die "node $(node --version) is too old; Node.js 18 or newer is needed"
export CHROMIUM="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}"
[ -n "$CHROMIUM" ] && [ -x "$CHROMIUM" ] || die "chromium not found; install it (apt-get install -y chromium) or set CHROMIUM=/path/to/chrome"
export PW_DIR="${PW_DIR:-/tmp/pw}"
if [ ! -d "$PW_DIR/node_modules/playwright-core" ]; then
    command -v npm >/dev/null || die "npm not found to install playwright-core; apt-get install -y npm"
    echo "screenshots: installing playwright-core into $PW_DIR" >&2
    npm install --prefix "$PW_DIR" --no-audit --no-fund --silent playwright-core@1.65.1 >&2 \
        || die "npm install playwright-core failed (offline?); install it into $PW_DIR/node_modules"
fi
mkdir -p "$outdir"

# TensorBoard on a free port (--port 0). --load_fast=true uses the Rust data server, whose
# -v log line "Finished load cycle" says the event files are read: the signal to go on.
log="$(mktemp)"
"$tensorboard" --logdir "$logdir" --host 127.0.0.1 --port 0 --load_fast=true \
    --extra_data_server_flags=-v >"$log" 2>&1 &
tb=$!
trap 'kill $tb ${shots:-} 2>/dev/null; wait 2>/dev/null; rm -f "$log"' EXIT
trap 'exit 130' INT TERM
url=""
for _ in $(seq 600); do  # up to 2 minutes, checked every 0.2 s
    kill -0 $tb 2>/dev/null || { cat "$log" >&2; die "tensorboard exited early (its output is above)"; }
    [ -n "$url" ] || url="$(grep -om1 'http://127\.0\.0\.1:[0-9]*/' "$log" || true)"
    [ -n "$url" ] && grep -q 'Finished load cycle' "$log" && break
    sleep 0.2
done
[ -n "$url" ] && grep -q 'Finished load cycle' "$log" || { cat "$log" >&2; die "tensorboard did not start in 2 minutes"; }
echo "screenshots: TensorBoard at $url" >&2

# In the background, so that Ctrl-C or a kill stops it (and Chromium) at once via the traps.
node "$root/scripts/screenshots.mjs" "$url" "$outdir" &
shots=$!
wait $shots
