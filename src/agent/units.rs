//! The agent's systemd units as the NixOS module (`nixos/agent.nix`) defines them, rendered
//! for `bento agent print-units`: to check them with `systemd-analyze verify`, or to install
//! them on a machine without NixOS. A test keeps this file and the module in step (the
//! exit statuses, the hardening, the timer and socket settings).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Every 15 minutes.
pub const DEFAULT_INTERVAL: &str = "*:0/15";
/// Spreads a fleet's polls over five minutes; with `FixedRandomDelay` each machine keeps
/// its own offset, so the server sees an even load rather than a fresh shuffle every time.
pub const DEFAULT_RANDOMIZED_DELAY: &str = "5m";
/// The page's service exits after this long without a visitor; the socket restarts it.
pub const PAGE_IDLE_EXIT: &str = "10m";

/// `bento agent update` statuses that the unit counts as success besides 0: 10 (updated).
/// 11 (failed) and 12 (rolled back) leave the unit failed, so `systemctl --failed`,
/// monitoring and `OnFailure=` notice; 1 (could not run) too. The timer fires again either way.
pub const SUCCESS_EXIT_STATUS: &str = "10";

/// `TimeoutStartSec=` of the agent's service. systemd disables the start timeout of a
/// `Type=oneshot` service by default, so without it a wedged run would hold the agent's lock
/// forever (issue #14 item 4). A little over the default `run_timeout` (4 h), so the agent's
/// own deadline, which reports, comes first; raise both together.
pub const TIMEOUT_START: &str = "4h 30min";

/// Sandboxing that leaves activation working. The agent's job is to change the whole
/// machine: `switch-to-configuration` writes /etc, /boot and the bootloader, mounts
/// /run/wrappers, creates setuid wrappers and home directories, sets the hostname. So no
/// option that gives the unit its own mount namespace (ProtectSystem, PrivateTmp,
/// ProtectHome, ReadOnlyPaths, ProtectKernel*, PrivateDevices…: mounts made inside would
/// never reach the machine), no RestrictSUIDSGID, no ProtectHostname, no device policy, and
/// no RestrictNamespaces or MemoryDenyWriteExecute (local Nix builds need both).
pub const HARDENING: &[(&str, &str)] = &[
    ("LockPersonality", "yes"),
    ("RestrictRealtime", "yes"),
    ("SystemCallArchitectures", "native"),
];

/// What the units point at.
#[derive(Debug, Clone)]
pub struct UnitOptions {
    /// The `bento` executable.
    pub bento: PathBuf,
    /// The agent's settings (`--config`).
    pub config: PathBuf,
    /// `OnCalendar=` of the timer.
    pub interval: String,
    /// `RandomizedDelaySec=` of the timer.
    pub randomized_delay: String,
    /// `ListenStream=` of the page's socket.
    pub listen: SocketAddr,
}

/// systemd's quoting for one word of `ExecStart=`.
fn exec_word(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+@:=".contains(c))
    {
        s
    } else {
        format!(
            "\"{}\"",
            s.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('%', "%%")
        )
    }
}

fn hardening() -> String {
    HARDENING
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect()
}

/// `(file name, contents)` of each unit.
pub fn render(o: &UnitOptions) -> Vec<(&'static str, String)> {
    let bento = exec_word(&o.bento);
    let config = exec_word(&o.config);
    let agent = format!(
        "[Unit]
Description=bento agent: apply this machine's published configuration
Wants=network-online.target
After=network-online.target
# NixOS: never restarted or stopped by the switch this unit itself runs, not even one to
# a system without bento (as nixos-upgrade.service).
X-RestartIfChanged=false
X-StopIfChanged=false
X-StopOnRemoval=false

[Service]
Type=oneshot
ExecStart={bento} agent update --config {config}
# 0 nothing to do, 10 updated; 11 failed, 12 rolled back and 1 could not run are failures.
SuccessExitStatus={SUCCESS_EXIT_STATUS}
# No run may hang: a little over agent.toml's run_timeout (default 4h).
TimeoutStartSec={TIMEOUT_START}
Environment=HOME=/root
{}",
        hardening()
    );
    let timer = format!(
        "[Unit]
Description=bento agent: poll the server for a new configuration

[Timer]
OnCalendar={}
RandomizedDelaySec={}
FixedRandomDelay=true
Persistent=true

[Install]
WantedBy=timers.target
",
        o.interval, o.randomized_delay
    );
    let socket = format!(
        "[Unit]
Description=bento agent: the \"Update my machine\" page

[Socket]
ListenStream={}
Accept=no

[Install]
WantedBy=sockets.target
",
        o.listen
    );
    let page = format!(
        "[Unit]
Description=bento agent: the \"Update my machine\" page
# Not required by the socket (only ordered after it): restarting the socket (a switch that changes it) must not
# stop an update started from the page.
After=bento-agent-page.socket network-online.target
Wants=network-online.target
# It runs updates too: a switch must not stop it halfway through one.
X-RestartIfChanged=false
X-StopIfChanged=false
X-StopOnRemoval=false

[Service]
ExecStart={bento} agent serve --config {config} --exit-when-idle {PAGE_IDLE_EXIT}
Environment=HOME=/root
{}",
        hardening()
    );
    vec![
        ("bento-agent.service", agent),
        ("bento-agent.timer", timer),
        ("bento-agent-page.socket", socket),
        ("bento-agent-page.service", page),
    ]
}

/// Writes every unit into `dir` (created if missing); returns the paths written.
pub fn write(o: &UnitOptions, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    render(o)
        .into_iter()
        .map(|(name, text)| {
            let path = dir.join(name);
            crate::sys::atomic::write_file(&path, text.as_bytes(), 0o644)?;
            Ok(path)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> UnitOptions {
        UnitOptions {
            bento: "/usr/bin/bento".into(),
            config: "/etc/bento/agent.toml".into(),
            interval: DEFAULT_INTERVAL.into(),
            randomized_delay: DEFAULT_RANDOMIZED_DELAY.into(),
            listen: super::super::page::DEFAULT_LISTEN.parse().unwrap(),
        }
    }

    #[test]
    fn four_units_with_the_documented_settings() {
        let units = render(&options());
        let names: Vec<_> = units.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "bento-agent.service",
                "bento-agent.timer",
                "bento-agent-page.socket",
                "bento-agent-page.service"
            ]
        );
        let text = |n: &str| units.iter().find(|(m, _)| *m == n).unwrap().1.clone();
        let agent = text("bento-agent.service");
        assert!(agent.contains("Type=oneshot\n"));
        assert!(agent
            .contains("ExecStart=/usr/bin/bento agent update --config /etc/bento/agent.toml\n"));
        assert!(agent.contains("SuccessExitStatus=10\n"));
        assert!(agent.contains("TimeoutStartSec=4h 30min\n"));
        assert!(agent.contains("X-RestartIfChanged=false\n"));
        // A switch (even to a system without bento) must not stop the update running it.
        assert!(agent.contains("X-StopIfChanged=false\n"));
        assert!(agent.contains("X-StopOnRemoval=false\n"));
        let page = text("bento-agent-page.service");
        assert!(page.contains("X-StopOnRemoval=false\n"));
        assert!(
            !page.contains("Requires="),
            "a restarted socket must not stop the page's update:\n{page}"
        );
        assert!(text("bento-agent.timer").contains("OnCalendar=*:0/15\nRandomizedDelaySec=5m\n"));
        assert!(text("bento-agent-page.socket").contains("ListenStream=127.0.0.1:51337\n"));
        assert!(text("bento-agent-page.service")
            .contains("agent serve --config /etc/bento/agent.toml --exit-when-idle 10m\n"));
    }

    #[test]
    fn odd_paths_are_quoted_for_systemd() {
        assert_eq!(
            exec_word(Path::new("/opt/my bento/bin")),
            "\"/opt/my bento/bin\""
        );
        assert_eq!(exec_word(Path::new("/a/50%")), "\"/a/50%%\"");
    }
}
