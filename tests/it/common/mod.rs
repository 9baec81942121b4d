//! Shared fixtures: the `bento` command with an offline Nix configuration, fixture fleets
//! built on toy NixOS-shaped systems (no nixpkgs), root-owned scratch directories, and
//! throwaway Unix accounts.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::{symlink, DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Nix settings for every test: offline (no substituters, no registry), no sandbox (the toy
/// builders are /bin/sh), builds as root.
pub const NIX_CONFIG: &str = "sandbox = false
experimental-features = nix-command flakes
build-users-group =
substituters =
flake-registry =";

/// The bento binary under test, with a clean, offline environment.
pub fn bento() -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("bento").expect("bento binary");
    cmd.env("NIX_CONFIG", NIX_CONFIG)
        .env_remove("BENTO_FLEET")
        .env("BENTO_LOG", "bento=info")
        // A `<nixpkgs/nixos>` for classic hosts, as a server has: publish evaluates them.
        .env("NIX_PATH", toy_nix_path());
    cmd
}

/// `nixpkgs=` the toy stand-in for `<nixpkgs/nixos>` (tests/fixtures/toy/nixpkgs).
pub fn toy_nix_path() -> String {
    format!(
        "nixpkgs={}/tests/fixtures/toy/nixpkgs",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A std Command for the bento binary (for tests that spawn and kill it).
pub fn bento_std() -> Command {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("bento"));
    cmd.env("NIX_CONFIG", NIX_CONFIG)
        .env_remove("BENTO_FLEET")
        .env("NIX_PATH", toy_nix_path());
    cmd
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A scratch directory whose every path component is root-owned and not writable by group
/// or others, as sshd demands of chroots and key files (so never under /tmp). Removed on drop.
pub struct ScratchDir {
    pub path: PathBuf,
}

const SCRATCH_BASE: &str = "/var/lib/bento-it";

impl ScratchDir {
    pub fn new() -> Self {
        assert!(
            is_root(),
            "integration tests need root (accounts, chroots, sshd); run them through scripts/test.sh as root"
        );
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(SCRATCH_BASE)
            .expect("create scratch base");
        let dir = tempfile::Builder::new()
            .prefix("t-")
            .tempdir_in(SCRATCH_BASE)
            .expect("scratch dir")
            .keep();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        Self { path: dir }
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Default for ScratchDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A fresh account prefix (`bt` + 4 random letters + `-`) so concurrent tests never touch
/// each other's accounts.
pub fn unique_prefix() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let tag: String = (0..4).map(|_| rng.gen_range(b'a'..=b'z') as char).collect();
    format!("bt{tag}-")
}

/// System accounts created for a test and deleted on drop.
pub struct Accounts {
    pub names: Vec<String>,
}

impl Accounts {
    pub fn create(prefix: &str, hosts: &[&str]) -> Self {
        let mut names = Vec::new();
        for h in hosts {
            let name = format!("{prefix}{h}");
            let st = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--home-dir",
                    "/",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--user-group",
                    &name,
                ])
                .status()
                .expect("useradd");
            assert!(st.success(), "useradd {name}");
            names.push(name);
        }
        Self { names }
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("userdel").arg(n).status();
        }
    }
}

/// The toy `mkSystem`: a NixOS-shaped toplevel built by /bin/sh, whose
/// `bin/switch-to-configuration` appends "<action> <toplevel>" to $BENTO_TEST_ACTIVATION_LOG.
pub const TOY_LIB: &str = include_str!("../../fixtures/toy/lib.nix");

/// A fixture fleet repo in `root`:
/// - `common/` (lib.nix, base.nix) shared through `common -> ../../common` links;
/// - `hosts/classic1` — a classic host with a secret under `files/`;
/// - `hosts/multi` — a flake directory defining `alpha` and `beta`.
pub struct FixtureFleet {
    pub root: PathBuf,
}

impl FixtureFleet {
    pub fn new(root: &Path, prefix: &str) -> Self {
        let f = Self {
            root: root.to_path_buf(),
        };
        f.write(
            "bento.toml",
            &format!("[server]\naccount_prefix = \"{prefix}\"\n\n[hosts.alpha]\n[hosts.beta]\n[hosts.classic1]\n"),
        );
        f.write("common/lib.nix", TOY_LIB);
        f.write("common/base.nix", "{ version = \"1\"; }\n");
        f.write(
            "hosts/classic1/configuration.nix",
            "{ ... }: { hostName = \"classic1\"; version = (import ./common/base.nix).version; }\n",
        );
        f.link("../../common", "hosts/classic1/common");
        f.write(
            "hosts/classic1/files/etc/bento-test/secret",
            "s3cret-classic1\n",
        );
        f.write(
            "hosts/classic1/files.toml",
            "[\"etc/bento-test/secret\"]\nmode = \"0640\"\ngroup = \"root\"\n",
        );
        f.write("hosts/multi/flake.nix", MULTI_FLAKE);
        f.link("../../common", "hosts/multi/common");
        f.write(
            "hosts/multi/machines/alpha.nix",
            "{ hostName = \"alpha\"; }\n",
        );
        f.write(
            "hosts/multi/machines/beta.nix",
            "{ hostName = \"beta\"; }\n",
        );
        f
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    pub fn link(&self, target: &str, rel: &str) {
        let p = self.root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        symlink(target, p).unwrap();
    }
}

/// A flake directory with one host per `machines/<name>.nix`, built with the shared toy lib.
pub const MULTI_FLAKE: &str = include_str!("../../fixtures/toy/multi-flake.nix");

/// Every file under `dir` with its content hash and mode, and every directory and link:
/// a fingerprint to show that a failed run changed nothing.
/// `tree_fingerprint` of a chroot without the publisher's hash cache: a run may teach the
/// cache files that have settled (2 s old), whatever its outcome, and a cache is not
/// something published, so "publish changed nothing" compares everything else.
pub fn chroot_fingerprint(chroot: &Path) -> Vec<String> {
    tree_fingerprint(chroot)
        .into_iter()
        .filter(|l| !l.starts_with("f .bento/hash-cache "))
        .collect()
}

pub fn tree_fingerprint(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        let mut entries: Vec<_> = rd.map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                out.push(format!("d {rel} {:o} {}", m.mode(), m.uid()));
                walk(base, &p, out);
            } else if m.file_type().is_symlink() {
                out.push(format!("l {rel}"));
            } else {
                let bytes = fs::read(&p).unwrap();
                out.push(format!(
                    "f {rel} {:o} {}",
                    m.mode(),
                    bento::protocol::manifest::Digest::of(&bytes)
                ));
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

pub mod engines;
pub mod faults;
pub mod relay;
pub mod s3cut;
pub mod sshd;
pub mod static_http;
