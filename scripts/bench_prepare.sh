#!/usr/bin/env bash
# Benchmark (not a test): `probunet prepare` against Python's `pickle.load` (the seed's
# way) on the same ~2 GB LIDC-shaped pickle, from a warm page cache. Prints MB/s and peak
# RSS for both and the ratios, and appends them as JSON lines to bench-prepare.jsonl.
#   scripts/bench_prepare.sh [ITEMS] [WORKDIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
items="${1:-15000}"
work="${2:-$root/data/bench}"
source "$root/scripts/env.sh"
python="$root/.venv/bin/python"
mkdir -p "$work"
pickle="$work/lidc-shaped-$items.pickle"
[ -f "$pickle" ] || "$python" "$root/scripts/make_pickle_fixtures.py" --lidc-shaped "$items" "$pickle"
cargo build --release --locked --quiet --manifest-path "$root/Cargo.toml"
bytes=$(stat -c %s "$pickle")
cat "$pickle" > /dev/null  # warm the page cache for both readers

# Prints "seconds max_rss_kib" of a command, from GNU time.
measure() {
    /usr/bin/time -f "%e %M" -o "$work/time.txt" "$@" > /dev/null
    cat "$work/time.txt"
}
read -r py_s py_kib < <(measure "$python" -c "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))" "$pickle")
# A first prepare, as a user runs it: the previous store is removed outside the timing
# (replacing it with --force would also time deleting 2 GB).
rm -rf "$work/store"
read -r pb_s pb_kib < <(measure "$root/target/release/probunet" prepare "$pickle" --out "$work/store")

"$python" - "$bytes" "$py_s" "$py_kib" "$pb_s" "$pb_kib" "$items" <<'PY' | tee -a "$root/bench-prepare.jsonl"
import json, platform, sys, datetime, os
size, py_s, py_kib, pb_s, pb_kib, items = sys.argv[1:]
size = int(size); mb = size / 1e6
py_s, pb_s, py_mib, pb_mib = float(py_s), float(pb_s), int(py_kib) / 1024, int(pb_kib) / 1024
print(f"{'':24}{'MB/s':>10}{'seconds':>10}{'peak RSS MiB':>14}", file=sys.stderr)
print(f"{'python pickle.load':24}{mb / py_s:>10.0f}{py_s:>10.2f}{py_mib:>14.0f}", file=sys.stderr)
print(f"{'probunet prepare':24}{mb / pb_s:>10.0f}{pb_s:>10.2f}{pb_mib:>14.0f}", file=sys.stderr)
print(f"throughput {py_s / pb_s:.2f}x python, peak RSS {pb_mib / py_mib:.2f}x python "
      f"({items} items, {mb:.0f} MB, {os.cpu_count()} CPUs)", file=sys.stderr)
print(json.dumps({"date": datetime.date.today().isoformat(), "machine": platform.node(), "cpus": os.cpu_count(),
                  "items": int(items), "bytes": size, "python_s": py_s, "python_peak_rss_mib": py_mib,
                  "probunet_s": pb_s, "probunet_peak_rss_mib": pb_mib,
                  "throughput_ratio": py_s / pb_s, "rss_ratio": pb_mib / py_mib}))
PY
