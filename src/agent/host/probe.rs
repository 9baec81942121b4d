//! How the real machine answers a health check's questions: systemd's failed units and one
//! unit's state (`systemctl`), a check's command (`sys::process`, bounded), and an HTTP GET
//! (HTTP/1.1 over a plain `TcpStream`: a check asks a local endpoint for its status line,
//! and a client crate with TLS would be a large dependency for one line).
//!
//! Invariant: every probe is bounded by its timeout and answers with what it saw, never
//! with a panic or a hang; host-written text is kept to one line.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::protocol::check::HttpUrl;
use crate::sys::process::{Cmd, ProcessError};

/// How long `systemctl list-units` may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of a response read while looking for its status line.
const MAX_STATUS_LINE: usize = 8 * 1024;

/// Whether systemd is the service manager (sd_booted(3)'s test).
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The units systemd lists as failed.
pub fn failed_units() -> Result<BTreeSet<String>, String> {
    let out = Cmd::new("systemctl")
        .args([
            "list-units",
            "--state=failed",
            "--plain",
            "--no-legend",
            "--no-pager",
            "--full",
        ])
        .timeout(LIST_TIMEOUT)
        .run()
        .map_err(|e| one_line(&e.to_string()))?;
    Ok(parse_unit_list(&out.stdout_text()))
}

/// The first word of each line of `systemctl list-units --plain --no-legend`.
pub fn parse_unit_list(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// What `systemctl is-active UNIT` prints: `active`, `activating`, `failed`, `inactive`…
/// (it exits non-zero for all but `active`, which is an answer, not an error).
pub fn unit_state(unit: &str, timeout: Duration) -> Result<String, String> {
    let cmd = Cmd::new("systemctl")
        .args(["is-active", "--", unit])
        .timeout(timeout);
    let stdout = match cmd.run() {
        Ok(out) => out.stdout,
        Err(e) if e.exit_code().is_some() && !e.stdout.is_empty() => e.stdout,
        Err(e) => return Err(one_line(&e.to_string())),
    };
    let word = String::from_utf8_lossy(&stdout).trim().to_owned();
    if word.is_empty() {
        return Err("systemctl is-active printed nothing".into());
    }
    Ok(one_line(&word))
}

/// Runs a check's command: its last line of output on success, how it ended otherwise.
pub fn run_command(argv: &[String], timeout: Duration) -> Result<String, String> {
    let cmd = Cmd::from_argv(argv)
        .ok_or("empty command")?
        .timeout(timeout);
    match cmd.run() {
        Ok(out) => Ok(last_line(&out.stdout_text())),
        Err(e) => Err(command_failure(&e)),
    }
}

fn command_failure(e: &ProcessError) -> String {
    let said = last_line(&e.stderr);
    let said = if said.is_empty() {
        last_line(&String::from_utf8_lossy(&e.stdout))
    } else {
        said
    };
    if said.is_empty() {
        e.ended.to_string()
    } else {
        format!("{}: {said}", e.ended)
    }
}

/// `GET url` with HTTP/1.1; the response's status code. The whole exchange is bounded by
/// `timeout`.
pub fn http_get(url: &HttpUrl, timeout: Duration) -> Result<u16, String> {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let addrs: Vec<_> = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", url.host))?
        .collect();
    let mut last_err = format!("{} resolves to no address", url.host);
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, left()) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_err = format!("connect {addr}: {e}"),
        }
    }
    let mut stream = stream.ok_or(last_err)?;
    let io = |e: std::io::Error| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            format!("no answer within {}", humantime::format_duration(timeout))
        } else {
            e.to_string()
        }
    };
    stream.set_write_timeout(Some(left())).map_err(io)?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: bento/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        url.path,
        url.authority,
        env!("CARGO_PKG_VERSION")
    );
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.contains(&b'\n') && head.len() < MAX_STATUS_LINE {
        stream.set_read_timeout(Some(left())).map_err(io)?;
        let n = stream.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    parse_status_line(&head)
}

/// `HTTP/1.x NNN reason` → NNN.
pub fn parse_status_line(head: &[u8]) -> Result<u16, String> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    match (words.next(), words.next().map(str::parse::<u16>)) {
        (Some(v), Some(Ok(code))) if v.starts_with("HTTP/") && (100..1000).contains(&code) => {
            Ok(code)
        }
        _ if head.is_empty() => Err("the connection closed without an answer".into()),
        _ => Err(format!("not an HTTP response: {:?}", one_line(&line))),
    }
}

fn last_line(text: &str) -> String {
    one_line(
        text.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or(""),
    )
}

/// One line, at most 200 characters: what a report says a check saw.
pub fn one_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    match line.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Answers one request on a loopback listener with `response`; returns the URL.
    fn serve_once(response: &'static str) -> (HttpUrl, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 512];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            s.write_all(response.as_bytes()).unwrap();
            String::from_utf8_lossy(&req).into_owned()
        });
        let url = format!("http://127.0.0.1:{port}/health?x=1")
            .parse()
            .unwrap();
        (url, t)
    }

    #[test]
    fn http_get_returns_the_status_and_sends_a_proper_request() {
        let (url, t) = serve_once("HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(http_get(&url, Duration::from_secs(10)), Ok(204));
        let req = t.join().unwrap();
        assert!(req.starts_with("GET /health?x=1 HTTP/1.1\r\n"), "{req}");
        assert!(
            req.contains(&format!("\r\nHost: {}\r\n", url.authority)),
            "{req}"
        );
        let (url, t) = serve_once("HTTP/1.0 500 Internal Server Error\r\n\r\n");
        assert_eq!(http_get(&url, Duration::from_secs(10)), Ok(500));
        t.join().unwrap();
    }

    #[test]
    fn http_get_reports_refusals_and_garbage() {
        // Nothing listens on 127.0.0.2 at a port this test holds on 127.0.0.1, and while it
        // holds it no other test can take it (a port merely released could be reused by a
        // test running beside this one).
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let url: HttpUrl = format!("http://127.0.0.2:{port}/").parse().unwrap();
        let e = http_get(&url, Duration::from_secs(5)).unwrap_err();
        assert!(e.contains("connect 127.0.0.2"), "{e}");
        drop(held);
        assert!(parse_status_line(b"SSH-2.0-OpenSSH\r\n")
            .unwrap_err()
            .contains("not an HTTP response"));
        assert!(parse_status_line(b"").unwrap_err().contains("closed"));
    }

    #[test]
    fn unit_lists_and_lines() {
        let text =
            "foo.service loaded failed failed Foo\nbar\\x2dbaz.mount loaded failed failed Bar\n";
        let units = parse_unit_list(text);
        assert!(units.contains("foo.service") && units.contains("bar\\x2dbaz.mount"));
        assert_eq!(one_line(&"x".repeat(300)).chars().count(), 201);
        assert_eq!(last_line("a\nb\n\n"), "b");
    }

    #[test]
    fn a_command_check_says_how_it_ended() {
        let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(run_command(
            &argv(&["/bin/sh", "-c", "echo ok"]),
            Duration::from_secs(10)
        )
        .is_ok());
        let e = run_command(
            &argv(&["/bin/sh", "-c", "echo broken >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(e.contains('3') && e.ends_with("broken"), "{e}");
    }
}
