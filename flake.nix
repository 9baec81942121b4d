{
  description = "bento: a pull-based fleet manager for NixOS";

  # nixos-unstable: its rustc (>= 1.95) builds the crates Cargo.lock pins (edition 2024,
  # rust-version up to 1.95); nixos-24.11 (rustc 1.82/1.83) could not. The revision is in
  # flake.lock; docs/nixos.md says which and what was checked.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forEachSystem = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      # Built with nixpkgs' Rust toolchain; the unit tests run in the build (the integration
      # tests need root, an sshd and real Nix builds: scripts/test.sh runs them).
      packages = forEachSystem (pkgs: rec {
        bento = pkgs.callPackage ./nixos/package.nix { };
        default = bento;
      });

      # `pkgs.bento`, which the modules use when it exists.
      overlays.default = final: _prev: {
        bento = final.callPackage ./nixos/package.nix { };
      };

      # The modules build bento with the importing system's nixpkgs (or take pkgs.bento
      # from the overlay); services.bento.package = bento.packages.${system}.default pins
      # this flake's build instead.
      nixosModules = {
        agent = ./nixos/agent.nix;
        server = ./nixos/server.nix;
        default = {
          imports = [
            ./nixos/agent.nix
            ./nixos/server.nix
          ];
        };
      };

      # What a NixOS user would meet first: the package builds, nixosModules.default
      # evaluates on a machine with only the agent on and on a server whose fleet has a
      # 25-character host (account bento-<host>: 31 characters, the longest NixOS allows),
      # and a fleet works end to end in VMs (nixos/tests/fleet.nix).
      checks = forEachSystem (
        pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
          evalChecks = import ./nixos/tests/eval.nix {
            inherit nixpkgs system;
            module = self.nixosModules.default;
            bento = self.packages.${system}.bento;
          };
        in
        {
          package = self.packages.${system}.bento;
          fleet = pkgs.testers.runNixOSTest {
            imports = [ ./nixos/tests/fleet.nix ];
            defaults.services.bento.package = self.packages.${system}.bento;
          };
        }
        // evalChecks
      );

      formatter = forEachSystem (pkgs: pkgs.nixfmt);
    };
}
