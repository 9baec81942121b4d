# Evaluation checks of nixosModules.default on nixpkgs' own module system, as the flake's
# `checks` run them: each builds a file naming the system's derivation, so evaluating the
# whole system (assertions included) is the check, and nothing of the system is built.
#   agent-only    the agent on, the server off and `services.bento.server.fleet` unset:
#                 the server module must not read it (nor build bento to generate it)
#   server-long-host
#                 the server on with fleet-long-host.nix, whose host has the longest name
#                 NixOS accepts for its account (bento- + 25 characters = 31)
{
  nixpkgs,
  system,
  module,
  bento,
}:

let
  pkgs = nixpkgs.legacyPackages.${system};
  base = {
    boot.loader.grub.enable = false;
    fileSystems."/" = {
      device = "/dev/vda";
      fsType = "ext4";
    };
    system.stateVersion = "26.05";
    services.bento.package = bento;
  };
  evalCheck =
    name: config:
    let
      machine = nixpkgs.lib.nixosSystem {
        inherit system;
        modules = [
          module
          base
          config
        ];
      };
    in
    pkgs.writeText "bento-eval-${name}" (
      builtins.unsafeDiscardStringContext machine.config.system.build.toplevel.drvPath
    );
in
{
  eval-agent-only = evalCheck "agent-only" {
    networking.hostName = "ws-anna";
    services.bento.agent = {
      enable = true;
      server = "sftp://bento-ws-anna@bento.example.org";
      mirrors = [ "https://mirror.example.org/bento/ws-anna" ];
      knownHosts = "bento.example.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMnOJW1l6T9NsbrhE2Wu6c4hQGq2L8Eo3mYRpL3O2ZTb";
      rebootWindow = "Sun 03:00"; # the policy comes from bento.toml
      # build_on = "server" in bento.toml: the server's public cache key.
      cacheKeys = [ "bento.example.org-1:2E/dY1Z6a3k6rr7vGWUgFzbtmPYQh1E7bhMXsSPk8Nk=" ];
    };
  };

  eval-server-long-host = evalCheck "server-long-host" (
    { config, ... }:
    {
      networking.hostName = "bento";
      services.bento.server = {
        enable = true;
        fleet = ./fleet-long-host.nix;
      };
      # The account of the fleet's host is 31 characters: the longest users-groups.nix takes.
      assertions = [
        {
          assertion = config.users.users ? "bento-abcdefghijklmnopqrstuvwxy";
          message = "the fleet's 31-character account is missing";
        }
      ];
    }
  );
}
