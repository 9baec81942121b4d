#!/usr/bin/env bash
# Times `bento status` on a generated chroot (see docs/benchmarks.md).
#   [BENTO=binary] bench/status.sh [HOSTS] [REPORTS_PER_HOST]   default 10000 hosts, 365 reports each
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTS=${1:-10000}
REPORTS=${2:-365}
NOW=2026-11-25T12:00:00Z
WORK=$(mktemp -d /var/tmp/bento-bench-status.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
chmod 0755 "$WORK"

# BENTO=/path/to/bento skips the release build (to time a given binary).
if [ -z "${BENTO:-}" ]; then
  cargo build --release --quiet
  BENTO=$(pwd)/target/release/bento
fi
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1 || true; e=$(date +%s.%N); python3 -c "print(round($e - $s, 3))"; }

echo "generating $HOSTS hosts x $REPORTS reports..."
python3 bench/gen-status-chroot.py "$WORK/chroot" --hosts "$HOSTS" --reports "$REPORTS" --now "$NOW"
mkdir "$WORK/fleet" && printf '[server]\nchroot = "%s"\n' "$WORK/chroot" > "$WORK/fleet/bento.toml"
echo "chroot: $(find "$WORK/chroot" | wc -l) entries, $(du -sh "$WORK/chroot" | cut -f1)"
st() { "$BENTO" --fleet "$WORK/fleet" status --now "$NOW" "$@"; }

# Cold: drop the page cache first where the kernel lets us (root, not in every container).
if sync && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then
  echo "status, cold cache:      $(t st) s"
else
  echo "status, cold cache:      (cannot drop caches here)"
fi
# Warm runs: best and median of 5 (other work on the machine only ever adds time).
stats() { sort -n | awk '{a[NR]=$1} END {printf "best %s s, median %s s\n", a[1], a[int((NR+1)/2)]}'; }
runs() { for _ in 1 2 3 4 5; do t st "$@"; done | stats; }
echo "status, table:           $(runs)"
echo "status --json:           $(runs --json)"
echo "status --prometheus:     $(runs --prometheus "$WORK/bento.prom")"
st --color never 2>&1 >/dev/null | tail -1
