//! Where the page listens: the socket systemd passes (socket activation, through `listenfd`),
//! else its own bind; loopback only either way. And the `Host` values that name it.

use std::net::{IpAddr, SocketAddr, TcpListener};

use super::ServeError;

/// How many sockets systemd passed to this process, from `LISTEN_PID` and `LISTEN_FDS`.
/// `None` when none were passed or they were meant for another process.
///
/// `listenfd` also accepts a missing `LISTEN_PID` (systemfd's convention); systemd always
/// sets it, and a variable inherited from a parent that was activated must not make this
/// process take a descriptor that is not its own, so both are required here first.
pub(super) fn activation_count(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    our_pid: u32,
) -> Result<Option<u32>, String> {
    let (Some(pid), Some(fds)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(our_pid) {
        return Ok(None);
    }
    match fds.trim().parse::<u32>() {
        Ok(0) => Ok(None),
        Ok(1) => Ok(Some(1)),
        Ok(n) => Err(format!(
            "systemd passed {n} sockets; the page's .socket unit must have exactly one ListenStream"
        )),
        Err(_) => Err(format!("LISTEN_FDS={fds:?} is not a number")),
    }
}

/// The listening socket systemd passed, if it passed one to this process. Clears the
/// activation variables either way, so children (nix, ssh, switch-to-configuration) never
/// think the socket is theirs; call it before any thread exists.
fn activated_listener() -> Result<Option<TcpListener>, ServeError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let count = activation_count(pid.as_deref(), fds.as_deref(), std::process::id());
    // systemd's descriptors start at 3; an inherited systemfd offset must not move them.
    std::env::remove_var("LISTEN_FDS_FIRST_FD");
    let taken = match count.map_err(ServeError::Activation)? {
        None => Ok(None),
        // listenfd checks the descriptor is a TCP stream socket and marks it close-on-exec.
        Some(_) => listenfd::ListenFd::from_env()
            .take_tcp_listener(0)
            .map_err(|e| {
                ServeError::Activation(format!(
                    "{e} (the page's .socket unit needs one TCP ListenStream=)"
                ))
            }),
    };
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    taken
}

/// systemd's socket, else a bind of `listen`; refused unless it is on loopback.
pub(super) fn listener(listen: SocketAddr) -> Result<TcpListener, ServeError> {
    let listener = match activated_listener()? {
        Some(l) => l,
        None => {
            if !listen.ip().is_loopback() {
                return Err(ServeError::NotLoopback(listen));
            }
            TcpListener::bind(listen).map_err(|source| ServeError::Bind {
                addr: listen,
                source,
            })?
        }
    };
    // A socket unit can say anything: the passed socket is checked like our own bind.
    let local = listener.local_addr().map_err(ServeError::Accept)?;
    if !local.ip().is_loopback() {
        return Err(ServeError::NotLoopback(local));
    }
    Ok(listener)
}

/// `Host` values a browser sends for this listener; the first is the page's URL.
pub(super) fn allowed_hosts(local: SocketAddr) -> Vec<String> {
    let port = local.port();
    let ip = match local.ip() {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    let mut hosts = vec![format!("{ip}:{port}"), format!("localhost:{port}")];
    if port == 80 {
        hosts.push(ip);
        hosts.push("localhost".into());
    }
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_for_a_listener() {
        let v4 = allowed_hosts("127.0.0.1:51337".parse().unwrap());
        assert_eq!(v4, ["127.0.0.1:51337", "localhost:51337"]);
        let v6 = allowed_hosts("[::1]:8080".parse().unwrap());
        assert_eq!(v6, ["[::1]:8080", "localhost:8080"]);
        assert!(allowed_hosts("127.0.0.1:80".parse().unwrap()).contains(&"127.0.0.1".into()));
    }

    #[test]
    fn socket_activation_variables() {
        assert_eq!(activation_count(None, None, 7), Ok(None));
        assert_eq!(activation_count(Some("7"), Some("1"), 7), Ok(Some(1)));
        assert_eq!(
            activation_count(Some("8"), Some("1"), 7),
            Ok(None),
            "another process's"
        );
        assert_eq!(activation_count(None, Some("1"), 7), Ok(None), "no pid");
        assert_eq!(activation_count(Some("7"), Some("0"), 7), Ok(None));
        assert!(activation_count(Some("7"), Some("2"), 7)
            .unwrap_err()
            .contains("2 sockets"));
        assert!(activation_count(Some("7"), Some("x"), 7).is_err());
    }
}
