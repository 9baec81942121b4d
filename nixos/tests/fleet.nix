# A bento fleet in VMs, written the way nixpkgs' own NixOS tests are (cf. its
# nixos/tests/nixos-rebuild-specialisations.nix for building a system inside the VM):
# a server and two clients. The server publishes a new configuration for each; both
# clients fetch it over SFTP, build it offline and switch. client2's new configuration
# cuts it off from the server (a wrong address), so its agent cannot confirm and rolls
# back; client1 confirms. Run by the flake's `checks.<system>.fleet`
# (pkgs.testers.runNixOSTest), which sets `defaults.services.bento.package`.
#
# Keys are made at build time (test keys, in the store on purpose), so the fleet's
# bento.toml and with it the server's fleet module are generated from a derivation:
# import from derivation, which `nix flake check` allows.
{ lib, pkgs, ... }:

let
  keys = pkgs.runCommand "bento-test-keys" { nativeBuildInputs = [ pkgs.openssh ]; } ''
    mkdir $out
    for k in server client1 client2; do
      ssh-keygen -q -t ed25519 -N "" -C "$k" -f $out/$k
    done
  '';
  pub = name: lib.removeSuffix "\n" (builtins.readFile "${keys}/${name}.pub");
  address = {
    server = "192.168.1.1";
    client1 = "192.168.1.2";
    client2 = "192.168.1.3";
  };
  bentoToml = pkgs.writeText "bento.toml" ''
    [server]
    chroot = "/srv/bento"
    address = "${address.server}"

    [defaults]
    interval = "1h"

    [hosts.client1]
    key = "${pub "client1"}"

    [hosts.client2]
    key = "${pub "client2"}"
  '';

  # Each client's configuration, as a file: the node is built from it on the host, and the
  # fleet publishes it (with a change) to be built in the VM from the same modules.
  clientModule = pkgs.writeText "bento-test-client.nix" ''
    { modulesPath, lib, ... }:
    {
      imports = [
        "''${modulesPath}/virtualisation/qemu-vm.nix"
        "''${modulesPath}/testing/test-instrumentation.nix"
        ${./..}/agent.nix
      ];
      @EXTRA@
      networking.hostName = "@HOST@";
      virtualisation.vlans = [ 1 ];
      networking.useDHCP = false;
      networking.interfaces.eth1.ipv4.addresses = lib.mkForce [
        { address = "@ADDRESS@"; prefixLength = 24; }
      ];
      services.bento.agent = {
        enable = true;
        server = "sftp://bento-@HOST@@${address.server}";
        knownHosts = "${address.server} ${pub "server"}";
        settings.confirm_timeout = "30s";
      };
      environment.etc."bento-test-version".text = "@VERSION@";
    }
  '';
  client =
    host:
    { pkgs, ... }:
    {
      imports = [
        (import (
          pkgs.runCommand "bento-test-${host}.nix" { } ''
            sed -e 's/@HOST@/${host}/; s/@ADDRESS@/${address.${host}}/; s/@VERSION@/1/; s/@EXTRA@//' \
              ${clientModule} > $out
          ''
        ))
      ];
      # Everything needed to build a changed system in the VM, offline (as nixpkgs'
      # nixos-rebuild tests do), and <nixpkgs> for the classic build.
      system.includeBuildDependencies = true;
      nix.nixPath = [ "nixpkgs=${pkgs.path}" ];
      nix.settings.substituters = lib.mkForce [ ];
      virtualisation.memorySize = 2048;
      virtualisation.diskSize = 8192;
      environment.etc."bento/id_ed25519" = {
        source = "${keys}/${host}";
        mode = "0600";
      };
    };
in
{
  name = "bento-fleet";

  # From the same store copy of nixos/ as the clients' agent.nix: one common.nix.
  defaults.imports = [ "${./..}/server.nix" ];

  nodes = {
    server =
      { ... }:
      {
        virtualisation.vlans = [ 1 ];
        networking.interfaces.eth1.ipv4.addresses = lib.mkForce [
          {
            address = address.server;
            prefixLength = 24;
          }
        ];
        services.bento.server = {
          enable = true;
          fleet = bentoToml;
        };
        services.openssh.hostKeys = [
          {
            type = "ed25519";
            path = "/etc/ssh/ssh_host_ed25519_key";
          }
        ];
        environment.etc."ssh/ssh_host_ed25519_key" = {
          source = "${keys}/server";
          mode = "0600";
        };
        environment.systemPackages = [ pkgs.git ];
      };
    client1 = client "client1";
    client2 = client "client2";
  };

  testScript =
    { nodes, ... }:
    let
      # The published configurations are built in the VMs by classic Nix, with the same
      # bento the nodes run (a store path the VMs already have).
      extra = "services.bento.package = builtins.storePath \"${nodes.client1.services.bento.package}\";";
      publish = host: addr: "sed -e 's/@HOST@/${host}/; s/@ADDRESS@/${addr}/; s/@VERSION@/2/; s|@EXTRA@|${extra}|' ${clientModule} > /srv/fleet/hosts/${host}/configuration.nix";
    in
    ''
    start_all()
    server.wait_for_unit("sshd.service")

    with subtest("the server publishes a new configuration for each client"):
        server.succeed(
            "mkdir -p /srv/fleet/hosts/client1 /srv/fleet/hosts/client2",
            "cp ${bentoToml} /srv/fleet/bento.toml",
            # client1: version 2. client2: version 2 on an address the server cannot reach.
            ${builtins.toJSON (publish "client1" address.client1)},
            ${builtins.toJSON (publish "client2" "192.168.2.3")},
            "cd /srv/fleet && git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm v2",
            "cd /srv/fleet && bento publish",
        )

    for c in (client1, client2):
        c.wait_for_unit("multi-user.target")
        c.succeed("grep -qx 1 /etc/bento-test-version")

    with subtest("both clients fetch over SFTP and update; client1 keeps it"):
        # 10: updated (the unit's SuccessExitStatus)
        client1.succeed("systemctl start bento-agent.service")
        client1.succeed("grep -qx 2 /etc/bento-test-version")
        server.wait_until_succeeds("ls /srv/bento/client1/logs | grep -q .")

    with subtest("client2 loses the server after its switch and rolls back"):
        # 12: rolled back, so the unit fails
        client2.fail("systemctl start bento-agent.service")
        client2.succeed("grep -qx 1 /etc/bento-test-version")
        client2.succeed("journalctl -u bento-agent.service | grep -qi 'roll'")
        server.wait_until_succeeds("ls /srv/bento/client2/logs | grep -q .")
  '';
}
