# What the agent and server modules share: the package. Both import this file, so a machine
# that is both server and agent declares the option once.
{ lib, pkgs, ... }:

{
  options.services.bento.package = lib.mkOption {
    type = lib.types.package;
    default = pkgs.bento or (pkgs.callPackage ./package.nix { });
    defaultText = lib.literalExpression "pkgs.bento or (pkgs.callPackage ./package.nix { })";
    description = ''
      The bento package. By default `pkgs.bento` when an overlay provides it (the flake's
      `overlays.default`), otherwise built from this checkout with nixpkgs' Rust toolchain.
    '';
  };
}
