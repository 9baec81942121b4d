#!/usr/bin/env bash
# bento's main job on one machine: a local fleet of three hosts (a classic host and a flake
# directory with two hosts sharing common/ modules and a secret), their SFTP accounts, and a
# publish into per-host chroots. Run as root on Debian; installs what it needs.
#   scripts/demo.sh [WORKDIR]     (default /var/lib/bento-demo; removed and recreated)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=${1:-/var/lib/bento-demo}
[ "$(id -u)" = 0 ] || { echo "scripts/demo.sh: run as root (it creates accounts and chroots)" >&2; exit 1; }
case "$WORK" in /*) ;; *) echo "WORKDIR must be absolute" >&2; exit 1;; esac

need=()
for pkg in nix-bin openssh-server openssh-client git; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
export NIX_CONFIG='sandbox = false
experimental-features = nix-command flakes
build-users-group =
substituters =
flake-registry ='

echo "== building bento"
cargo build --release --quiet
BENTO="$ROOT/target/release/bento"

echo "== a fleet repo in $WORK/fleet"
rm -rf "$WORK"
mkdir -p "$WORK"; chmod 0755 "$WORK"
FLEET="$WORK/fleet"
"$BENTO" init "$FLEET"
rm -rf "$FLEET/hosts/example"
cp "$ROOT/tests/fixtures/toy/lib.nix" "$FLEET/common/lib.nix"
echo '{ version = "1"; }' > "$FLEET/common/base.nix"
mkdir -p "$FLEET/hosts/desk/files/etc/bento-demo" "$FLEET/hosts/lab/machines"
ln -s ../../common "$FLEET/hosts/desk/common"
echo '{ ... }: { hostName = "desk"; version = (import ./common/base.nix).version; }' > "$FLEET/hosts/desk/configuration.nix"
echo "demo secret for desk" > "$FLEET/hosts/desk/files/etc/bento-demo/secret"
ln -s ../../common "$FLEET/hosts/lab/common"
cp "$ROOT/tests/fixtures/toy/multi-flake.nix" "$FLEET/hosts/lab/flake.nix"
echo '{ hostName = "lab1"; }' > "$FLEET/hosts/lab/machines/lab1.nix"
echo '{ hostName = "lab2"; }' > "$FLEET/hosts/lab/machines/lab2.nix"

mkdir -p "$WORK/keys"; chmod 0700 "$WORK/keys"
{
  echo "[server]"
  echo "address = \"127.0.0.1\""
  echo "chroot = \"$WORK/chroot\""
  echo "account_prefix = \"bento-demo-\""
  echo "authorized_keys_dir = \"$WORK/authorized_keys\""
  for h in desk lab1 lab2; do
    ssh-keygen -q -t ed25519 -N '' -C "root@$h" -f "$WORK/keys/$h"
    echo "[hosts.$h]"
    echo "key = \"$(cat "$WORK/keys/$h.pub")\""
  done
} > "$FLEET/bento.toml"
git -C "$FLEET" init -q && git -C "$FLEET" add -A && git -C "$FLEET" -c user.email=demo@bento -c user.name=demo commit -qm "demo fleet"

echo "== host accounts"
"$BENTO" --fleet "$FLEET" server sync-accounts

echo "== publish"
"$BENTO" --fleet "$FLEET" publish
echo "== publish again (nothing changed)"
"$BENTO" --fleet "$FLEET" publish
echo "== change a shared module, publish"
echo '{ version = "2"; }' > "$FLEET/common/base.nix"
"$BENTO" --fleet "$FLEET" publish

echo
echo "Chroots are in $WORK/chroot; remove the demo accounts with:"
echo "  sed -i '/^\\[hosts/,\$d' $FLEET/bento.toml && $BENTO --fleet $FLEET server sync-accounts --prune"
