# The bento package, built with nixpkgs' Rust toolchain from this checkout.
#   pkgs.callPackage ./nixos/package.nix { }
# The NixOS modules use it when `services.bento.package` is not set.
{ lib
, stdenv
, rustPlatform
, makeWrapper
, installShellFiles
, openssh
, git
}:

let
  cargoToml = lib.importTOML ../Cargo.toml;
  # The crate's sources only: a change to the docs or the Nix files does not rebuild it.
  src = lib.cleanSourceWith {
    src = ../.;
    filter = path: type:
      let
        rel = lib.removePrefix (toString ../. + "/") (toString path);
        top = builtins.head (lib.splitString "/" rel);
      in
      builtins.elem top [ "Cargo.toml" "Cargo.lock" "askama.toml" "src" "tests" "benches" "README.md" ]
      && !(lib.hasSuffix ".nix" rel && top != "tests");
  };
in
rustPlatform.buildRustPackage {
  pname = cargoToml.package.name;
  inherit (cargoToml.package) version;
  inherit src;

  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = [ makeWrapper installShellFiles ];

  # The unit tests run in the build. The integration tests (`--test it`) start a private
  # OpenSSH sshd, create Unix accounts and chroots and run real Nix builds: they need root
  # and cannot run in the Nix sandbox, so the check phase runs the library and binary
  # tests only. scripts/test.sh runs everything, as root, outside Nix.
  cargoTestFlags = [ "--lib" "--bins" ];
  # Installs files owned by root (chown), which the unprivileged build user cannot do.
  # (Unit tests that call nix-instantiate skip themselves: it is not in the sandbox.)
  checkFlags = [ "--skip=agent::files::tests::files_are_installed_and_dropped_ones_removed" ];

  # The agent talks to the server through the system's OpenSSH client (so ssh_config
  # applies) and publish reads git; appended to PATH, so the system's own come first.
  # The man pages and shell completions come from the binary's own clap definitions
  # (`bento man`, `bento completions`), so they cannot drift from the commands; generating
  # them runs the binary, hence only when the build platform can.
  postInstall = lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
    mkdir -p man
    $out/bin/bento man --out-dir man
    installManPage man/*.1
    installShellCompletion --cmd bento \
      --bash <($out/bin/bento completions bash) \
      --zsh <($out/bin/bento completions zsh) \
      --fish <($out/bin/bento completions fish)
  '' + ''
    wrapProgram $out/bin/bento --suffix PATH : ${lib.makeBinPath [ openssh git ]}
  '';

  meta = {
    description = cargoToml.package.description;
    license = lib.licenses.mit;
    mainProgram = "bento";
    platforms = lib.platforms.linux;
  };
}
