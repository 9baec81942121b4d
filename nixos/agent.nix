# services.bento.agent: the machine side of bento. A oneshot service that runs
# `bento agent update` from a timer, and the "Update my machine" page on 127.0.0.1,
# socket-activated. Options and examples: docs/nixos.md.
#
#   imports = [ /path/to/bento/nixos/agent.nix ];      # without flakes
#   imports = [ bento.nixosModules.agent ];            # with the flake
#
# `bento agent print-units` prints the same units for a check with systemd-analyze; a test
# (tests/it/nixos.rs) keeps the two in step: keep ExecStart, SuccessExitStatus, the
# hardening and the timer settings the same in src/agent/units.rs.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.bento.agent;
  toml = pkgs.formats.toml { };
  bento = "${config.services.bento.package}/bin/bento";
  configFile = "/etc/bento/agent.toml";

  agentToml = lib.filterAttrs (_: v: v != null) ({
    host = cfg.host;
    server = cfg.server;
    identity_file = cfg.identityFile;
    known_hosts = cfg.knownHostsFile;
    credentials_file = cfg.credentialsFile;
    reports = cfg.reports;
    ca_file = cfg.caFile;
    mode = cfg.mode;
  } // lib.optionalAttrs (cfg.mirrors != [ ]) { mirrors = cfg.mirrors; } // cfg.settings);

  # Where activation is concerned the agent is root doing what nixos-rebuild does, so the
  # sandboxing is limited to what cannot get in its way (see src/agent/units.rs, HARDENING):
  # nothing that makes a mount namespace (mounts done by activation, such as /run/wrappers,
  # would stay inside it), no RestrictSUIDSGID (security.wrappers), no ProtectHostname, no
  # device policy, and no RestrictNamespaces / MemoryDenyWriteExecute (local Nix builds).
  hardening = {
    LockPersonality = true;
    RestrictRealtime = true;
    SystemCallArchitectures = "native";
  };

  # What nixos-upgrade.service gives nixos-rebuild: Nix's settings, NIX_PATH for classic
  # hosts, the proxy, and root's home (so /root/.ssh/config applies to the SSH connection).
  environment = config.nix.envVars
    // lib.optionalAttrs (config.environment.sessionVariables ? NIX_PATH) {
      inherit (config.environment.sessionVariables) NIX_PATH;
    }
    // { HOME = "/root"; }
    // config.networking.proxy.envVars;

  path = [ config.nix.package config.programs.ssh.package pkgs.git ];

  # One `bento agent update` run as a unit (the timer's, and the retry `bento trigger --retry`
  # starts): `flags` are added to the command line.
  agentRun = { description, flags ? "" }: {
    inherit description;
    wants = [ "network-online.target" ];
    after = [ "network-online.target" ];
    # The switch this unit runs must not restart or stop it halfway through, not even a
    # switch to a system without bento (as nixos-upgrade.service in auto-upgrade.nix).
    # The activation itself runs in a unit of its own (systemd-run, as nixos-rebuild).
    restartIfChanged = false;
    stopIfChanged = false;
    unitConfig.X-StopOnRemoval = false;
    inherit environment path;
    serviceConfig = hardening // {
      Type = "oneshot";
      ExecStart = "${bento} agent update${flags} --config ${configFile}";
      # 0 nothing to do, 10 updated; 11 failed, 12 rolled back, 1 could not run: failed unit.
      SuccessExitStatus = "10";
      # systemd.service(5): a oneshot unit has no start timeout unless one is set, and
      # serviceConfig keys reach the unit as written (nixpkgs modules set it the same way,
      # e.g. netbox.nix at 0b73a0c2). No run may hang: a little over agent.toml's
      # run_timeout (default 4h); raise both together.
      TimeoutStartSec = lib.mkDefault "4h 30min";
    };
  };

  # bento.toml's per-host settings, as `bento publish` writes them into the snapshot.
  hostSettings =
    if cfg.hostSettingsFile != null && builtins.pathExists cfg.hostSettingsFile
    then builtins.fromJSON (builtins.readFile cfg.hostSettingsFile)
    else null;
  # A poll interval in seconds as a calendar expression, when it divides an hour or a day
  # evenly (15m -> *:0/15, 2h -> 0/2:00); otherwise null and the timer counts from the
  # end of the last run instead.
  calendarFor = s:
    if s >= 60 && s < 3600 && lib.mod s 60 == 0 && lib.mod 3600 s == 0 then "*:0/${toString (s / 60)}"
    else if s >= 3600 && s < 86400 && lib.mod s 3600 == 0 && lib.mod 86400 s == 0 then "0/${toString (s / 3600)}:00"
    else if s == 86400 then "daily"
    else null;
  intervalSecs = if hostSettings == null then 900 else hostSettings.interval_secs;
in
{
  imports = [ ./common.nix ];

  options.services.bento.agent = {
    enable = lib.mkEnableOption "the bento agent, which applies this machine's configuration as published on the bento server";

    host = lib.mkOption {
      type = lib.types.str;
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      description = "This machine's name in the fleet (`host` in agent.toml).";
    };

    server = lib.mkOption {
      type = lib.types.str;
      example = "sftp://bento-alpha@bento.example.org:22";
      description = ''
        Where this machine's snapshot is: `sftp://ACCOUNT@HOST[:PORT]` (the account is the
        fleet's `account_prefix` and the host name), `s3://BUCKET/PREFIX?endpoint=URL&region=REGION`
        (its prefix or bucket in an S3-compatible object store, docs/objectstore.md),
        `https://HOST/PATH` (a read-only static copy: reports stay spooled), or
        `file:///PATH` for a mounted copy.
      '';
    };

    # The style of list options in nixpkgs (system.autoUpgrade.flags, nixpkgs commit
    # 0490065f6ac60793bfb12e110bd6506aaca0e9f5): listOf str, default [ ], a list example.
    mirrors = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [
        "https://mirror.example.org/bento/alpha"
        "s3://fleet/hosts/{host}?endpoint=https://s3.example.org&region=us-east-1"
      ];
      description = ''
        Other copies of this machine's tree (`mirrors` in agent.toml), in the forms `server`
        takes (`https://`, `s3://`, `sftp://`, `file://`). Read in order only when the server
        cannot be reached, stalls or serves an older version than the applied one; the
        highest signed serial among them wins; never written to (docs/mirrors.md).
      '';
    };

    credentialsFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/etc/bento/s3-credentials";
      description = ''
        For an `s3://` server or mirror: this machine's S3 keys in the AWS shared-credentials format
        (`[default]`, `aws_access_key_id`, `aws_secret_access_key`), a root-owned file with
        mode 0600 on the machine, as a string (a Nix path literal would copy the secret into
        the world-readable store, which the agent refuses). Unset: the service's
        `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`.
      '';
    };

    reports = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "s3://bento-reports-alpha?endpoint=https://s3.example.org&region=garage";
      description = ''
        For an `s3://` server: where this machine writes its heartbeat and reports, when not
        under its prefix's `logs/` (an engine that grants rights per bucket, such as Garage,
        needs a reports bucket per host). For a read-only `https://` server: a place that
        takes them (`sftp://`, `file://` or `s3://`); unset, they stay in the spool.
      '';
    };

    caFile = lib.mkOption {
      type = lib.types.nullOr (lib.types.either lib.types.path lib.types.str);
      default = null;
      example = "/etc/bento/s3-ca.pem";
      description = ''
        For an `s3://` or `https://` server or mirror: a PEM file of the CA the endpoint's
        certificate must chain to (a private CA); unset, the public web roots (`s3://`) or
        the system's CA bundle (`https://`).
      '';
    };

    identityFile = lib.mkOption {
      type = lib.types.str;
      default = "/etc/bento/id_ed25519";
      description = ''
        The machine's SSH private key: a path on the machine, as a string (a Nix path
        literal would copy the key into the world-readable store).
        Its public half is `key` under `[hosts.NAME]` in the fleet's bento.toml.
      '';
    };

    knownHostsFile = lib.mkOption {
      type = lib.types.str;
      default = "/etc/bento/known_hosts";
      description = "The server's SSH host key in known_hosts format; a mismatch is a hard error.";
    };

    knownHosts = lib.mkOption {
      type = lib.types.nullOr lib.types.lines;
      default = null;
      example = "bento.example.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA…";
      description = ''
        The server's host key line(s). When set, written to `knownHostsFile` (which must
        then be under /etc/).
      '';
    };

    hostSettingsFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = lib.literalExpression "./bento-host.json";
      description = ''
        The `bento-host.json` that `bento publish` puts at the root of this host's
        configuration tree, with bento.toml's settings for it. When set (and present), the
        timer polls at its `interval`; the agent reads the other settings from it by itself.
      '';
    };

    interval = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = calendarFor intervalSecs;
      defaultText = lib.literalMD ''`"*:0/15"`, or bento.toml's interval from `hostSettingsFile`'';
      example = "hourly";
      description = ''
        When the timer polls the server: a systemd calendar expression (OnCalendar=).
        `null` (the default when bento.toml's interval divides neither an hour nor a day):
        every `interval` seconds after the previous run ended.
      '';
    };

    randomizedDelay = lib.mkOption {
      type = lib.types.str;
      default = "5m";
      description = ''
        RandomizedDelaySec= of the timer, with FixedRandomDelay: each machine polls at its
        own fixed offset within this window, so a fleet does not hit the server in
        lock-step.
      '';
    };

    mode = lib.mkOption {
      type = lib.types.enum [ "switch" "boot" "test" ];
      default = "switch";
      description = "The switch-to-configuration action: now and at boot, at next boot only, or now only.";
    };

    rebootPolicy = lib.mkOption {
      type = lib.types.nullOr (lib.types.enum [ "never" "when-needed" "when-needed-now" ]);
      default = null;
      description = ''
        Whether the agent reboots after a switch that changed the kernel, initrd or kernel
        modules. `null`: as the fleet's bento.toml says for this host (it travels in the
        snapshot). Written to agent.toml as `reboot`.
      '';
    };

    rebootWindow = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "Sun 03:00";
      description = "With `rebootPolicy = \"when-needed\"`: the systemd calendar time a pending reboot may happen at (`reboot_at`).";
    };

    selfUpdate = lib.mkOption {
      type = lib.types.nullOr lib.types.bool;
      default = null;
      description = ''
        Whether a flake host updates its own lock file and rebuilds when an input moved and
        nothing new is published. `null`: as bento.toml says. Written as `self_update`.
      '';
    };

    notify = lib.mkOption {
      type = lib.types.nullOr (lib.types.listOf lib.types.str);
      default = null;
      example = [ "/run/current-system/sw/bin/logger" "-t" "bento" ];
      description = ''
        A command (argv, no shell) the agent runs after a failure or a rollback, with the
        report on stdin. `null`: as bento.toml says. Written as `notify`.
      '';
    };

    trustedKeys = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA… bento-fleet" ];
      description = ''
        The fleet's signing keys (`bento keygen`): with any set, the agent applies only
        manifests signed by one of them. Written as `trusted_keys`.
      '';
    };

    minSerial = lib.mkOption {
      type = lib.types.ints.unsigned;
      default = 0;
      example = 42;
      description = ''
        The lowest manifest serial this machine accepts, kept in /etc, outside the state
        directory: set it when building the machine's image to the `serial` of the host's
        live manifest then (`<chroot>/<host>/manifests/<digest in current>.json`), so a machine whose
        /var/lib/bento is wiped cannot be made to apply an older signed version again.
        0: no floor. Written as `min_serial`.
      '';
    };

    # lib.types.listOf and lib.types.str as in nixpkgs lib/types.nix (read at
    # NixOS/nixpkgs 509384b3fda4160872ae86366d3affc3a1797f02).
    cacheKeys = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "bento.example.org-1:AbCd…=" ];
      description = ''
        Nix public keys (`nix key convert-secret-to-public < cache_key`) one of which must
        have signed every narinfo of a system the server built for this host
        (`build_on = "server"` in bento.toml). Empty: such a version is refused. Written
        as `cache_keys`; only the agent's own imports use them (nix.settings is untouched).
      '';
    };

    page = {
      enable = lib.mkOption {
        type = lib.types.bool;
        # Opt-in: it lets anyone logged in on the machine start an update.
        default = false;
        description = "The \"Update my machine\" page on 127.0.0.1 (socket-activated).";
      };
      port = lib.mkOption {
        type = lib.types.port;
        default = 51337;
        description = "The page's port on 127.0.0.1.";
      };
    };

    settings = lib.mkOption {
      type = toml.type;
      default = { };
      example = lib.literalExpression ''
        { connect_timeout = "30s"; confirm_timeout = "2m"; state_dir = "/var/lib/bento"; }
      '';
      description = ''
        More keys for /etc/bento/agent.toml (docs/agent.md lists them all); they override
        the ones the options above write. An unknown key stops the agent with an error
        naming it.
      '';
    };

    substituter = {
      url = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "http://bento.example.org:5000";
        description = "The bento server's binary cache (services.bento.server.binaryCache), added to nix.settings.substituters.";
      };
      publicKey = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "bento.example.org-1:AbCd…=";
        description = "The cache's signing key, added to nix.settings.trusted-public-keys.";
      };
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.knownHosts == null || lib.hasPrefix "/etc/" cfg.knownHostsFile;
        message = "services.bento.agent.knownHosts is written with environment.etc: knownHostsFile must be under /etc/.";
      }
      {
        assertion = (cfg.substituter.url == null) == (cfg.substituter.publicKey == null);
        message = "services.bento.agent.substituter: set both url and publicKey (a cache whose paths are not signed by a trusted key is never used).";
      }
      {
        assertion = hostSettings == null || hostSettings.host == cfg.host;
        message = "services.bento.agent.hostSettingsFile is for host ${if hostSettings == null then "?" else hostSettings.host}, not ${cfg.host}.";
      }
      {
        # null: the policy comes from bento.toml, which may well say when-needed.
        assertion = cfg.rebootWindow == null || cfg.rebootPolicy == null || cfg.rebootPolicy == "when-needed";
        message = "services.bento.agent.rebootWindow only applies with rebootPolicy = \"when-needed\" (or null, as bento.toml says).";
      }
      {
        # Two things switching the machine: each would undo the other's system, and
        # switch-to-configuration refuses to run while the other holds its lock.
        assertion = !config.system.autoUpgrade.enable;
        message = "services.bento.agent and system.autoUpgrade both switch this machine: disable system.autoUpgrade (bento applies what the fleet publishes; selfUpdate re-locks a flake host's inputs).";
      }
    ];

    services.bento.agent.settings = lib.mkMerge [
      (lib.mkIf (cfg.rebootPolicy != null) { reboot = lib.mkDefault cfg.rebootPolicy; })
      (lib.mkIf (cfg.rebootWindow != null) { reboot_at = lib.mkDefault cfg.rebootWindow; })
      (lib.mkIf (cfg.selfUpdate != null) { self_update = lib.mkDefault cfg.selfUpdate; })
      (lib.mkIf (cfg.notify != null) { notify = lib.mkDefault cfg.notify; })
      (lib.mkIf (cfg.trustedKeys != [ ]) { trusted_keys = lib.mkDefault cfg.trustedKeys; })
      (lib.mkIf (cfg.cacheKeys != [ ]) { cache_keys = lib.mkDefault cfg.cacheKeys; })
      (lib.mkIf (cfg.minSerial > 0) { min_serial = lib.mkDefault cfg.minSerial; })
    ];

    environment.etc."bento/agent.toml".source = toml.generate "agent.toml" agentToml;
    environment.etc.${lib.removePrefix "/etc/" cfg.knownHostsFile} = lib.mkIf (cfg.knownHosts != null) {
      text = cfg.knownHosts;
    };

    # First boot: the machine's key, made once and never replaced (`bento agent init`); the
    # line for the server's admin (`bento host add NAME --key '…'`) is in the activation log
    # and in `identityFile`.pub.
    system.activationScripts.bentoAgentKey = ''
      if [ ! -e ${lib.escapeShellArg cfg.identityFile} ]; then
        ${bento} -q agent init --server ${lib.escapeShellArg cfg.server} --host ${lib.escapeShellArg cfg.host} --identity-file ${lib.escapeShellArg cfg.identityFile} || true
      fi
    '';

    environment.systemPackages = [ config.services.bento.package ];

    nix.settings = lib.mkIf (cfg.substituter.url != null) {
      substituters = [ cfg.substituter.url ];
      trusted-public-keys = [ cfg.substituter.publicKey ];
    };

    systemd.services.bento-agent = agentRun {
      description = "bento agent: apply this machine's published configuration";
    };

    # `bento trigger --retry` (docs/operators.md) starts this one: the same run, which also
    # retries a version this machine backed off from or rolled back (`--force`). The state
    # directory's lock orders it with the timer's runs.
    systemd.services.bento-agent-retry = agentRun {
      description = "bento agent: apply this machine's published configuration, retrying a failed version";
      flags = " --force";
    };

    systemd.timers.bento-agent = {
      description = "bento agent: poll the server for a new configuration";
      wantedBy = [ "timers.target" ];
      timerConfig = {
        RandomizedDelaySec = cfg.randomizedDelay;
        FixedRandomDelay = true;
      } // (if cfg.interval != null then {
        OnCalendar = cfg.interval;
        # A run missed while the machine was off happens right after boot.
        Persistent = true;
      } else {
        OnBootSec = "2m";
        OnUnitInactiveSec = "${toString intervalSecs}s";
      });
    };

    systemd.sockets.bento-agent-page = lib.mkIf cfg.page.enable {
      description = "bento agent: the \"Update my machine\" page";
      wantedBy = [ "sockets.target" ];
      listenStreams = [ "127.0.0.1:${toString cfg.page.port}" ];
      socketConfig.Accept = false;
    };

    systemd.services.bento-agent-page = lib.mkIf cfg.page.enable {
      description = "bento agent: the \"Update my machine\" page";
      # Ordered after its socket, not bound to it: a switch that restarts the socket must
      # not stop an update started from the page.
      after = [ "bento-agent-page.socket" "network-online.target" ];
      wants = [ "network-online.target" ];
      # It runs updates too: a switch must not stop it halfway through one.
      restartIfChanged = false;
      stopIfChanged = false;
      unitConfig.X-StopOnRemoval = false;
      inherit environment path;
      serviceConfig = hardening // {
        ExecStart = "${bento} agent serve --config ${configFile} --exit-when-idle 10m";
      };
    };
  };
}
