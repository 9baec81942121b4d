#!/usr/bin/env bash
# Times bento publish on a generated fleet (see docs/benchmarks.md).
#   bench/publish.sh [--baseline] [HOSTS] [FILES]
set -euo pipefail
cd "$(dirname "$0")/.."
BASELINE=0
if [ "${1:-}" = --baseline ]; then BASELINE=1; shift; fi
HOSTS=${1:-1000}
FILES=${2:-300}
WORK=$(mktemp -d /var/tmp/bento-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
chmod 0755 "$WORK"

cargo build --release --quiet
BENTO=$(pwd)/target/release/bento
python3 bench/gen-fleet.py "$WORK/fleet" --hosts "$HOSTS" --files "$FILES"
mkdir "$WORK/out" && chown nobody "$WORK/out"
# Unprivileged, so publish leaves owners alone and needs no accounts.
run() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); python3 -c "print(round($e - $s, 2))"; }

echo "fleet: $HOSTS hosts x $FILES files ($(du -sh "$WORK/fleet" | cut -f1))"
echo "bento cold publish:       $(t run "$BENTO" --fleet "$WORK/fleet" publish --chroot "$WORK/out/chroot") s"
echo "bento no-change publish:  $(t run "$BENTO" --fleet "$WORK/fleet" publish --chroot "$WORK/out/chroot") s"
echo "# changed" >> "$WORK/fleet/common/m0/mod0.nix"
echo "bento one common change:  $(t run "$BENTO" --fleet "$WORK/fleet" publish --chroot "$WORK/out/chroot") s"
echo "bento chroot disk:        $(du -sh "$WORK/out/chroot" | cut -f1)"

if [ "$BASELINE" = 1 ]; then
  command -v rsync >/dev/null || apt-get install -y -qq rsync >/dev/null
  base() {
    for h in "$WORK"/fleet/hosts/*; do
      n=$(basename "$h")
      mkdir -p "$WORK/stage/$n" "$WORK/base/$n"
      rsync -rL --delete "$h/" "$WORK/stage/$n/"
      diff -r -q "$WORK/stage/$n" "$WORK/base/$n" >/dev/null || rsync -r --delete "$WORK/stage/$n/" "$WORK/base/$n/"
    done
  }
  echo "baseline cold publish:      $(t base) s"
  echo "baseline no-change publish: $(t base) s"
  echo "baseline chroot disk:       $(du -sh "$WORK/base" | cut -f1)"
fi
