#!/usr/bin/env bash
# Times `bento status` on a generated chroot (see docs/benchmarks.md).
#   bench/status.sh [HOSTS] [REPORTS_PER_HOST]      default 10000 hosts, 365 reports each
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTS=${1:-10000}
REPORTS=${2:-365}
NOW=2026-11-25T12:00:00Z
WORK=$(mktemp -d /var/tmp/bento-bench-status.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
chmod 0755 "$WORK"

cargo build --release --quiet
BENTO=$(pwd)/target/release/bento
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
for i in 1 2 3; do echo "status, table:           $(t st) s"; done
echo "status --json:           $(t st --json) s"
echo "status --prometheus:     $(t st --prometheus "$WORK/bento.prom") s"
st --color never 2>&1 >/dev/null | tail -1
