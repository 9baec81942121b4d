{
  description = "bento: a pull-based fleet manager for NixOS";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
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
        default = { imports = [ ./nixos/agent.nix ./nixos/server.nix ]; };
      };

      checks = forEachSystem (pkgs: {
        package = self.packages.${pkgs.system}.bento;
      });

      formatter = forEachSystem (pkgs: pkgs.nixpkgs-fmt);
    };
}
