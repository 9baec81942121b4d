# services.bento.server: the bento server on NixOS. The accounts, key files, chroot
# directories and the sshd Match block come from the module `bento server nixos-module`
# generates from the fleet's bento.toml (src/server/nixos.rs): this module includes it,
# either the committed fleet.nix or one generated at evaluation time from bento.toml. On top
# of that it can serve the server's Nix store to the hosts as a signed binary cache.
# Options and examples: docs/nixos.md.
#
#   imports = [ /path/to/bento/nixos/server.nix ];     # without flakes
#   imports = [ bento.nixosModules.server ];           # with the flake
{ config, lib, pkgs, ... }:

let
  cfg = config.services.bento.server;
  cache = cfg.binaryCache;

  fleetPath = toString cfg.fleet;
  isModule = lib.hasSuffix ".nix" fleetPath;
  # A fleet repo holds secrets (hosts/*/files/): only bento.toml is ever copied to the store.
  tomlPath = if lib.hasSuffix ".toml" fleetPath then cfg.fleet else "${fleetPath}/bento.toml";
  tomlFile = builtins.path { name = "bento.toml"; path = tomlPath; };
  toml = if isModule then null else builtins.fromTOML (builtins.readFile tomlFile);

  # The same module `bento server nixos-module` writes, generated from bento.toml alone.
  generated = pkgs.runCommand "bento-fleet.nix" { nativeBuildInputs = [ config.services.bento.package ]; } ''
    mkdir fleet
    cp ${tomlFile} fleet/bento.toml
    bento --fleet fleet server nixos-module --output - > "$out"
  '';
  fleetModule = import (if isModule then cfg.fleet else generated) {
    inherit config lib pkgs;
  };
  # The fleet module's part `name`, or nothing when the server is off. Not under `mkIf`: the
  # module system pushes an `mkIf` down into the attributes of its content before it looks
  # at the condition (lib/modules.nix, pushDownProperties), which would read `fleet` (unset
  # on an agent-only machine) and build bento at evaluation time although the server is off.
  fromFleet = name: if cfg.enable then fleetModule.${name} or { } else { };
  # The chroot the fleet module creates: its first tmpfiles rule, `d <chroot> 0755 root root - -`.
  fleetChroot =
    let
      rules = fleetModule.systemd.tmpfiles.rules or [ ];
    in
    if rules == [ ] then "/srv/bento" else builtins.elemAt (lib.splitString " " (builtins.head rules)) 1;
  # What the generated module may set; anything else would be dropped silently, so it fails.
  known = {
    top = [ "users" "environment" "systemd" "services" "security" ];
    services = [ "openssh" ];
  };

  keyDir = builtins.dirOf cache.secretKeyFile;
  publicKeyFile = "${cache.secretKeyFile}.pub";
  agentsFile = "/var/lib/bento/binary-cache.txt";
in
{
  imports = [ ./common.nix ];

  options.services.bento.server = {
    enable = lib.mkEnableOption "the bento server: per-host SFTP chroots served by OpenSSH";

    fleet = lib.mkOption {
      type = lib.types.path;
      example = lib.literalExpression "./fleet.nix";
      description = ''
        The fleet: the `fleet.nix` written by `bento server nixos-module` (commit it beside
        the server's configuration), or the fleet repo's `bento.toml` (or the directory
        holding it), from which the same module is generated when the system is evaluated
        (import from derivation). Only bento.toml is read; the rest of the fleet repo, with
        its secrets, never enters the Nix store.

        The committed `fleet.nix` is the recommended way. Generating it builds bento while
        the system is evaluated, which fails wherever import from derivation is disabled
        (`allow-import-from-derivation = false`, Hydra, some CI and `nix flake check`
        set-ups) and makes every evaluation wait for that build.
      '';
    };

    chroot = lib.mkOption {
      type = lib.types.str;
      default = if toml == null then fleetChroot else toml.server.chroot or "/srv/bento";
      defaultText = lib.literalMD ''the fleet's `[server] chroot` (from `fleet.nix` or bento.toml), by default `"/srv/bento"`'';
      description = ''
        Where the hosts' chroots are: `[server] chroot` in bento.toml, which the generated
        module creates. Checked against the fleet module; `bento publish` writes there.
      '';
    };

    refresh = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = toml != null && toml ? server && toml.server ? freshness;
        defaultText = lib.literalMD "whether bento.toml sets `[server] freshness`";
        description = ''
          Re-sign the freshness stamps of the hosts' live versions on a timer
          (`bento publish --refresh`: no new version, only the stamps), so a host whose
          source stops following this server goes `stale` within `[server] freshness`
          (docs/security.md). Needs the fleet repo and `[server] signing_key` on this
          machine: `fleetDir`.
        '';
      };

      fleetDir = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "/var/lib/bento/fleet";
        description = ''
          The fleet repo on this machine (the directory holding bento.toml), whose
          `signing_key` signs the stamps. A path outside the Nix store: the repo holds secrets.
        '';
      };

      interval = lib.mkOption {
        type = lib.types.str;
        default = "hourly";
        description = "When to re-sign: a systemd calendar expression (OnCalendar=). Keep it well inside the freshness window.";
      };
    };

    binaryCache = {
      enable = lib.mkEnableOption ''
        serving this server's Nix store to the hosts as a binary cache (nix-serve; harmonia,
        services.harmonia, serves the same protocol and can be used instead), signed
        with a key of its own, so hosts download the systems `bento build` already built
        here instead of building them again'';

      port = lib.mkOption {
        type = lib.types.port;
        default = 5000;
        description = "nix-serve's port.";
      };

      bindAddress = lib.mkOption {
        type = lib.types.str;
        default = "0.0.0.0";
        description = "nix-serve's address. It serves every path in the store to whoever reaches it: bind it to the fleet's network (a VPN address) or keep the port closed to others.";
      };

      openFirewall = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = "Open `port` in the firewall.";
      };

      keyName = lib.mkOption {
        type = lib.types.str;
        default = "${config.networking.hostName}-bento-1";
        defaultText = lib.literalExpression ''"''${config.networking.hostName}-bento-1"'';
        description = "The signing key's name (the part before the colon in trusted-public-keys).";
      };

      secretKeyFile = lib.mkOption {
        type = lib.types.str;
        default = "/var/lib/bento/cache-key/secret";
        description = ''
          The cache's signing key. Created on first start with
          `nix-store --generate-binary-cache-key` when missing (root 0600; its public half
          beside it as `.pub`). Keep it out of the Nix store.
        '';
      };

      url = lib.mkOption {
        type = lib.types.str;
        default = "http://${if toml != null && toml ? server && toml.server ? address then toml.server.address else config.networking.hostName}:${toString cache.port}";
        defaultText = lib.literalMD ''`http://` bento.toml's `[server] address` (or the host name) `:` `port`'';
        description = "The URL hosts reach the cache at; printed with the public key for services.bento.agent.substituter.";
      };
    };
  };

  config = lib.mkMerge [
    {
      # Only fixed attribute names here: the fleet module's contents depend on `cfg.fleet`,
      # and the module system must be able to find `services.bento` without evaluating it.
      users = fromFleet "users";
      environment = fromFleet "environment";
      systemd = fromFleet "systemd";
      services.openssh = if cfg.enable then fleetModule.services.openssh or { } else { };
      # The cap on each host account's processes (docs/server.md).
      security.pam.loginLimits =
        if cfg.enable then fleetModule.security.pam.loginLimits or [ ] else [ ];
    }

    (lib.mkIf cfg.enable {
      environment.systemPackages = [ config.services.bento.package ];

      assertions = [
        {
          assertion = lib.all (n: builtins.elem n known.top) (builtins.attrNames fleetModule)
            && lib.all (n: builtins.elem n known.services) (builtins.attrNames (fleetModule.services or { }));
          message = "services.bento.server.fleet sets something this module does not pass on (${toString (builtins.attrNames fleetModule)}); import it directly or update nixos/server.nix.";
        }
        {
          assertion = builtins.elem "d ${cfg.chroot} 0755 root root - -" (fleetModule.systemd.tmpfiles.rules or [ ]);
          message = "services.bento.server.chroot = ${cfg.chroot} is not the fleet's `[server] chroot`.";
        }
        {
          assertion = toml == null || builtins.elem (toml.server.port or 22) config.services.openssh.ports;
          message = "bento.toml's [server] port is not one of services.openssh.ports: the hosts could not connect.";
        }
      ];
    })

    (lib.mkIf (cfg.enable && cfg.refresh.enable) {
      assertions = [
        {
          assertion = cfg.refresh.fleetDir != null;
          message = "services.bento.server.refresh needs fleetDir: the fleet repo on this machine, with its signing key.";
        }
      ];
      # Option names as nixpkgs' systemd module has them (nixos/lib/systemd-unit-options.nix,
      # nixpkgs 515c8fb59bc189b54fc47113d6248cd45f607f65: timerConfig, serviceConfig, wantedBy).
      systemd.services.bento-refresh = {
        description = "bento: re-sign the freshness stamps of the live versions";
        serviceConfig = {
          Type = "oneshot";
          ExecStart = "${config.services.bento.package}/bin/bento --fleet ${lib.escapeShellArg (toString cfg.refresh.fleetDir)} publish --refresh --chroot ${lib.escapeShellArg cfg.chroot}";
          UMask = "0022";
        };
      };
      systemd.timers.bento-refresh = {
        description = "bento: re-sign the freshness stamps";
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnCalendar = cfg.refresh.interval;
          # A refresh missed while the server was off happens right after boot.
          Persistent = true;
          RandomizedDelaySec = "5m";
        };
      };
    })

    (lib.mkIf (cfg.enable && cache.enable) {
      services.nix-serve = {
        enable = true;
        inherit (cache) port bindAddress secretKeyFile;
        openFirewall = cache.openFirewall;
      };

      # The key is made on the server, once, and never leaves it; the lines the agents
      # need are written beside the state and printed to the journal.
      systemd.services.bento-cache-key = {
        description = "bento: the binary cache's signing key";
        wantedBy = [ "multi-user.target" ];
        before = [ "nix-serve.service" ];
        requiredBy = [ "nix-serve.service" ];
        path = [ config.nix.package pkgs.coreutils ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          UMask = "0077";
        };
        script = ''
          if [ ! -s ${lib.escapeShellArg cache.secretKeyFile} ]; then
            mkdir -p ${lib.escapeShellArg keyDir}
            nix-store --generate-binary-cache-key ${lib.escapeShellArg cache.keyName} \
              ${lib.escapeShellArg cache.secretKeyFile} ${lib.escapeShellArg publicKeyFile}
          fi
          mkdir -p ${lib.escapeShellArg (builtins.dirOf agentsFile)}
          {
            echo "# For each host: services.bento.agent.substituter, or nix.settings:"
            echo "substituters = ${cache.url}"
            echo "trusted-public-keys = $(cat ${lib.escapeShellArg publicKeyFile})"
          } > ${agentsFile}.tmp
          chmod 0644 ${agentsFile}.tmp
          mv ${agentsFile}.tmp ${agentsFile}
          cat ${agentsFile}
        '';
      };
    })
  ];
}
