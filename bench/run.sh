#!/usr/bin/env bash
# bento's benchmark suite: every scenario twice (bento, and the plain-tools way) on the same
# seeded data over a private loopback sshd; prints one table. See docs/benchmarks.md.
#
#   bench/run.sh [--quick] [--reps N] [--part=PART] [--no-doc] [SCENARIO…]
#
# Scenarios: 1|poll 2|change 3|connections 4|publish 5|status 6|fleet 7|delivery 8|prebuilt
# 9|s3 (the object store beside SFTP; needs SeaweedFS from scripts/test.sh's cache)
# (default: all).
# --part=PART: only that part of a scenario (9: poll, publish, disk); never writes the doc.
# --quick: small sizes, a few minutes (the smoke mode). A full run of every scenario also
# rewrites the results table in docs/benchmarks.md (unless --no-doc).
# Needs root: it creates (and always removes) host accounts, chroots and an sshd.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "bench/run.sh needs root (accounts, chroots, sshd)" >&2
  exit 2
fi
missing=()
for tool in sshd:openssh-server sftp:openssh-client rsync:rsync nix-build:nix-bin python3:python3 setpriv:util-linux; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

args=()
quick=0
doc=1
filtered=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; args+=("$1") ;;
    --no-doc) doc=0 ;;
    --reps) args+=("$1" "$2"); shift ;;
    -*) args+=("$1") ;;
    *) filtered=1; args+=("$1") ;;
  esac
  shift
done
# Only a full run of every scenario is the published table.
if [ "$quick" = 0 ] && [ "$filtered" = 0 ] && [ "$doc" = 1 ]; then
  args+=(--write-doc)
fi

cargo build --release --quiet --bin bento
exec cargo bench --quiet --bench suite -- "${args[@]}"
