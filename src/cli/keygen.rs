//! `bento keygen`: the fleet's signing key, or (`--cache`) the Nix binary-cache key of
//! `build_on = "server"` hosts. Either is written outside the fleet repo; the command says
//! where before it writes, and where each half goes after.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::sys::output;

/// Where the signing key goes unless `-o` says otherwise.
pub const DEFAULT_SIGNING_KEY: &str = "/etc/bento/signing_key";
/// Where the cache key goes unless `-o` says otherwise.
pub const DEFAULT_CACHE_KEY: &str = "/etc/bento/cache-key";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Make the Nix binary-cache key ([server] cache_key, for build_on = "server" hosts)
    /// instead of the manifest signing key
    #[arg(long)]
    cache: bool,
    /// Where to write the private key (default: /etc/bento/signing_key, with --cache
    /// /etc/bento/cache-key); the signing key's public half goes to FILE.pub
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Comment stored in the signing key
    #[arg(
        long,
        default_value = "bento fleet signing key",
        conflicts_with = "cache"
    )]
    comment: String,
    /// With --cache: the key's name, which hosts see in `cache_keys` (default:
    /// <this machine's name>-1)
    #[arg(long, value_name = "NAME", requires = "cache")]
    key_name: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(out) = &args.output {
        refuse_inside_fleet(out)?;
    }
    if args.cache {
        return cache_key(&args);
    }
    let path = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SIGNING_KEY));
    let pub_path = crate::protocol::signing::pub_path(&path);
    output::note(&format!(
        "writing the fleet signing key to {} and its public key to {}",
        path.display(),
        pub_path.display()
    ));
    let public = crate::protocol::signing::generate(&path, &args.comment)?;
    let line = public.to_openssh()?;
    output::line(&line);
    output::note(&format!(
        "wrote {} (keep it out of the fleet repo) and {}.\n  bento.toml:  [server] signing_key = \"{}\"\n  agent.toml:  trusted_keys = [\"{}\"]",
        path.display(),
        pub_path.display(),
        path.display(),
        line
    ));
    Ok(ExitCode::SUCCESS)
}

fn cache_key(args: &Args) -> anyhow::Result<ExitCode> {
    let path = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_KEY));
    let name = match &args.key_name {
        Some(n) => n.clone(),
        None => default_key_name(),
    };
    if name.is_empty() || name.contains(':') || name.chars().any(char::is_whitespace) {
        anyhow::bail!("--key-name {name:?}: a key name has no ':' and no spaces");
    }
    output::note(&format!(
        "writing the binary-cache key {name} to {} (nix key generate-secret)",
        path.display()
    ));
    let key =
        crate::server::delivery::cache::generate_key(&crate::nix::Nix::default(), &path, &name)?;
    output::line(&key.public);
    output::note(&format!(
        "wrote {} (keep it out of the fleet repo; its public key is printed above, and `nix key convert-secret-to-public < {}` prints it again).\n  bento.toml:  [server] cache_key = \"{}\"\n  agent.toml:  cache_keys = [\"{}\"]",
        path.display(),
        path.display(),
        path.display(),
        key.public
    ));
    Ok(ExitCode::SUCCESS)
}

/// A key inside a fleet repo would be committed with it (and publish refuses to use one
/// there): refused before anything is written.
fn refuse_inside_fleet(path: &Path) -> anyhow::Result<()> {
    let abs = std::path::absolute(path)?;
    // The nearest existing ancestor, with links resolved, is where the file would land.
    let mut dir = abs.parent();
    while let Some(d) = dir {
        if let Ok(real) = std::fs::canonicalize(d) {
            let mut up = Some(real.as_path());
            while let Some(u) = up {
                if u.join(crate::server::fleet::FLEET_FILE).is_file() {
                    anyhow::bail!(
                        "{} is inside the fleet repo {} (it holds bento.toml): a private key there would be committed and published with the fleet; write it outside, e.g. the default {}",
                        path.display(),
                        u.display(),
                        DEFAULT_SIGNING_KEY
                    );
                }
                up = u.parent();
            }
            return Ok(());
        }
        dir = d.parent();
    }
    Ok(())
}

/// `<hostname>-1`, as Nix's own keys are named (`cache.nixos.org-1`).
fn default_key_name() -> String {
    let host = std::fs::read_to_string(Path::new("/proc/sys/kernel/hostname"))
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && !h.contains(':'))
        .unwrap_or_else(|| "bento-cache".to_owned());
    format!("{host}-1")
}
