#!/usr/bin/env bash
# bento's main job on one machine: a local fleet of three hosts (a classic host and a flake
# directory with two hosts sharing common/ modules and a secret), their SFTP accounts, signed
# publishes into per-host chroots served by a private sshd on 127.0.0.1, each host's agent
# pulling, building (toy NixOS-shaped systems) and activating its snapshot, and the status
# table of the fleet. Run as root on Debian; installs what it needs.
#   scripts/demo.sh [WORKDIR]     (default: a new /var/lib/bento-demo.XXXXXX; a WORKDIR given
#                                  is removed and recreated)
# Two demos on one machine do not collide: each has its own work dir, account prefix
# (derived from the work dir) and a free port (BENTO_DEMO_PORT overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
[ "$(id -u)" = 0 ] || { echo "scripts/demo.sh: run as root (it creates accounts and chroots)" >&2; exit 1; }
if [ $# -ge 1 ]; then
  WORK=$1
  case "$WORK" in /*) ;; *) echo "WORKDIR must be absolute" >&2; exit 1;; esac
else
  mkdir -p /var/lib
  WORK=$(mktemp -d /var/lib/bento-demo.XXXXXX)
fi
# Accounts are named PREFIX+host: a prefix of the demo's own keeps two demos' accounts apart.
ID=$(printf '%s' "$WORK" | sha256sum | cut -c1-6)
PREFIX="bento-demo-$ID-"
# And a group of its own ([server] group): one sshd `Match Group` block per fleet.
GROUP="bento-demo-$ID"
free_port() {
  for p in $(shuf -i 20000-60000 -n 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
  echo "scripts/demo.sh: no free port found; set BENTO_DEMO_PORT" >&2; exit 1
}
PORT=${BENTO_DEMO_PORT:-$(free_port)}

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
# Classic hosts build the toy <nixpkgs/nixos> (no nixpkgs offline).
export NIX_PATH="nixpkgs=$ROOT/tests/fixtures/toy/nixpkgs"

echo "== building bento (the first build takes a few minutes)"
# cargo shows its own progress on a terminal; keep its summary line otherwise.
if [ -t 2 ]; then cargo build --release; else cargo build --release 2>&1 | tail -n 1; fi
BENTO="$ROOT/target/release/bento"

echo "== a fleet repo in $WORK/fleet (bento init: a git repository with a first commit)"
rm -rf "$WORK"
mkdir -p "$WORK"; chmod 0755 "$WORK"
FLEET="$WORK/fleet"
"$BENTO" init "$FLEET" >/dev/null
# The demo's hosts are toy NixOS-shaped systems (no nixpkgs offline): its own common/ and
# a flake directory with two hosts; `bento host add` makes the classic host's directory.
rm -rf "$FLEET/hosts/example"
cp "$ROOT/tests/fixtures/toy/lib.nix" "$FLEET/common/lib.nix"
echo '{ version = "1"; }' > "$FLEET/common/base.nix"
mkdir -p "$FLEET/hosts/lab/machines"
ln -s ../../common "$FLEET/hosts/lab/common"
cp "$ROOT/tests/fixtures/toy/multi-flake.nix" "$FLEET/hosts/lab/flake.nix"
echo '{ hostName = "lab1"; }' > "$FLEET/hosts/lab/machines/lab1.nix"
echo '{ hostName = "lab2"; }' > "$FLEET/hosts/lab/machines/lab2.nix"

echo "== the server: its sshd host key, the signing key, bento.toml's [server]"
mkdir -p /run/sshd "$WORK/sshd"; chmod 0700 "$WORK/sshd"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/sshd/host_key"
"$BENTO" keygen --output "$WORK/signing_key" >/dev/null
cat > "$FLEET/bento.toml" <<TOML
# The demo fleet: a private sshd on 127.0.0.1:$PORT, everything under $WORK.
[server]
address = "127.0.0.1"
port = $PORT
host_key = "$WORK/sshd/host_key.pub"
chroot = "$WORK/chroot"
account_prefix = "$PREFIX"
group = "$GROUP"
authorized_keys_dir = "$WORK/authorized_keys"
signing_key = "$WORK/signing_key"
TOML

echo "== enrol three machines: \`bento agent init\` on each, \`bento host add\` on the server"
for h in desk lab1 lab2; do
  m="$WORK/machines/$h"; mkdir -p "$m/root"
  # On the machine: its key, and the one line for the server's admin.
  line=$("$BENTO" -q agent init --server 127.0.0.1 --host "$h" --identity-file "$m/id_ed25519")
  echo "   $h says: $line"
  key=${line#*--key \'}; key=${key%\'}
  flake=(); [ "$h" = desk ] || flake=(--flake lab)
  "$BENTO" -q --fleet "$FLEET" host add "$h" --key "$key" "${flake[@]}" --no-account >/dev/null
done
# host add made hosts/desk/ from bento init's NixOS example; the toy system takes this instead.
mkdir -p "$FLEET/hosts/desk/files/etc/bento-demo"
echo '{ ... }: { hostName = "desk"; version = (import ./common/base.nix).version; }' > "$FLEET/hosts/desk/configuration.nix"
echo "demo secret for desk" > "$FLEET/hosts/desk/files/etc/bento-demo/secret"
git -C "$FLEET" add -A && git -C "$FLEET" -c user.email=demo@bento -c user.name=demo commit -qm "demo fleet: three hosts"

echo "== host accounts (one jailed SFTP account per host)"
"$BENTO" --fleet "$FLEET" server sync-accounts

echo "== build every host on the server, and publish (signed)"
"$BENTO" --fleet "$FLEET" publish --build

echo "== a private sshd on 127.0.0.1:$PORT serving the chroots"
{
  echo "ListenAddress 127.0.0.1"
  echo "Port $PORT"
  echo "HostKey $WORK/sshd/host_key"
  echo "PidFile none"
  echo "UsePAM no"
  echo "PasswordAuthentication no"
  echo "KbdInteractiveAuthentication no"
  echo "PermitRootLogin no"
  echo "AllowGroups $GROUP"
  echo "AuthorizedKeysFile none"
  echo "Subsystem sftp internal-sftp"
  "$BENTO" --fleet "$FLEET" server sshd-config
} > "$WORK/sshd/sshd_config"
/usr/sbin/sshd -D -e -f "$WORK/sshd/sshd_config" 2>"$WORK/sshd/log" &
SSHD=$!
trap 'kill $SSHD 2>/dev/null || true' EXIT
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done

echo "== each machine's settings, as \`bento agent-config\` prints them"
for h in desk lab1 lab2; do
  m="$WORK/machines/$h"
  "$BENTO" --fleet "$FLEET" agent-config "$h" --identity-file "$m/id_ed25519" --known-hosts "$m/known_hosts" > "$m/agent.toml"
  # The known_hosts line is in the header (`#   [127.0.0.1]:PORT ssh-ed25519 …`).
  sed -n 's/^#   //p' "$m/agent.toml" > "$m/known_hosts"
  # The demo's machines are directories of this one: their state, profile and installed
  # files stay under $WORK (on a real machine these keys are left at their defaults).
  cat >> "$m/agent.toml" <<TOML
state_dir = "$m/state"
profile = "$m/profiles/system"
current_system = "$m/no-current-system"
files_root = "$m/root"
TOML
done
sed 's/^/   /' "$WORK/machines/desk/agent.toml"
echo "== \`bento agent check\` on desk: what an update needs, one line each"
"$BENTO" agent check --config "$WORK/machines/desk/agent.toml"

agents() {
  for h in desk lab1 lab2; do
    m="$WORK/machines/$h"
    rc=0
    BENTO_TEST_ACTIVATION_LOG="$m/activations.log" "$BENTO" agent update --config "$m/agent.toml" || rc=$?
    case $rc in
      10) echo "   ($h: exit 10 = a new version was applied; systemd counts it a success)";;
      0) echo "   ($h: exit 0 = nothing to do)";;
      *) echo "   ($h: exit $rc = failed (11), rolled back (12) or could not run (1))";;
    esac
  done
}

legend() {
  echo "   (PUBLISHED: the live version and its age; EXPECTED: the system it builds to; RUNNING: the"
  echo "    system the host reports; LAST SEEN: its last heartbeat; ERROR: why a host needs a look)"
}

echo "== every machine pulls, builds and activates its snapshot"
agents
echo "== the fleet"
"$BENTO" --fleet "$FLEET" status || true
legend

echo "== change a shared module, commit, publish, and only that changes on the machines"
echo '{ version = "2"; }' > "$FLEET/common/base.nix"
git -C "$FLEET" -c user.email=demo@bento -c user.name=demo commit -qam "version 2"
"$BENTO" --fleet "$FLEET" publish --build
"$BENTO" --fleet "$FLEET" status || true
agents
"$BENTO" --fleet "$FLEET" status || true
legend

echo
echo "Everything is under $WORK (the machines' profiles, state and installed files in machines/)."
echo "The demo's sshd stops with this script. To remove the accounts, their jails and the work dir:"
echo "  sed -i '/^\\[hosts/,\$d' $FLEET/bento.toml && $BENTO --fleet $FLEET server sync-accounts --prune && groupdel $GROUP && rm -f /etc/security/limits.d/$GROUP.conf && rm -rf $WORK"
