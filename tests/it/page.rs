//! `bento agent serve`, the "Update my machine" page: in Debian's headless Chromium (driven
//! over WebDriver by chromedriver) against a real update over the sshd harness with toy Nix
//! builds; plus its HTTP refusals, loopback-only listening and systemd socket activation.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::agent::{code, fleet, text, write_version, Machine, EXIT_FAILED, EXIT_UPDATED};
use crate::common::bento_std;
use crate::common::sshd::{wait_with_deadline, Sshd};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Polls `check` every 100 ms until it returns `Some`, or panics after `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------
// The page's process.

/// A running `bento agent serve`, killed on drop.
struct Serve {
    child: Child,
    url: String,
    port: u16,
}

impl Serve {
    fn start(config: &Path, env: &[(&str, &Path)]) -> Serve {
        let mut cmd = bento_std();
        cmd.args(["agent", "serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .env("BENTO_LOG", "bento=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start bento agent serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("bento agent serve prints its URL within 20 s");
        let url = line.trim().to_owned();
        assert!(url.starts_with("http://127.0.0.1:"), "{url:?}");
        let port = url
            .trim_start_matches("http://127.0.0.1:")
            .trim_end_matches('/')
            .parse()
            .unwrap();
        Serve { child, url, port }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange (the server closes the connection): status, head, body (an event
/// stream comes chunked, as HTTP/1.1 sends a body of unknown length).
fn http(port: u16, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, head.to_owned(), body)
}

fn post_update(port: u16, origin: Option<&str>) -> (u16, String) {
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    let (status, _, body) = http(
        port,
        &format!("POST /update HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{origin}Accept: application/json\r\nContent-Length: 0\r\n\r\n"),
    );
    (status, body)
}

// ---------------------------------------------------------------------------------------
// A small WebDriver client (W3C protocol: JSON over HTTP) for chromedriver.

struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    /// Chromium and chromedriver from Debian, or `None` (with a note) when not installed.
    fn start() -> Option<Browser> {
        if !Path::new(CHROMIUM).exists() || !Path::new(CHROMEDRIVER).exists() {
            eprintln!("{CHROMIUM} or {CHROMEDRIVER} missing (apt-get install chromium chromium-driver): browser test skipped");
            return None;
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let profile = tempfile::tempdir().unwrap();
        let mut b = Browser {
            driver,
            port,
            session: String::new(),
            _profile: profile,
        };
        wait_for("chromedriver to answer", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).ok()?;
            let status = b.call("GET", "/status", None).ok()?;
            status["ready"].as_bool().filter(|r| *r)
        });
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1100,1000",
                    format!("--user-data-dir={}", b._profile.path().display()),
                ]
            }
        }}});
        let session = b.call("POST", "/session", Some(caps)).expect("new session");
        b.session = session["sessionId"].as_str().unwrap().to_owned();
        b.cmd(
            "POST",
            "timeouts",
            json!({"script": 30_000, "pageLoad": 30_000, "implicit": 0}),
        );
        Some(b)
    }

    /// One WebDriver call; `Err` carries a WebDriver error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        )
        .map_err(|e| e.to_string())?;
        // chromedriver keeps connections open whatever the request says: read by length.
        let body = read_response_body(&mut s)?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        let value = v["value"].clone();
        if let Some(err) = value.get("error") {
            return Err(format!("{err}: {}", value["message"]));
        }
        Ok(value)
    }

    fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        let body = (method == "POST").then_some(body);
        self.call(method, &format!("/session/{}/{path}", self.session), body)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "url", json!({ "url": url }));
    }

    fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "execute/sync",
            json!({"script": script, "args": []}),
        )
    }

    /// Runs `script` with a `done` callback as its last argument.
    fn js_async(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "execute/async",
            json!({"script": script, "args": []}),
        )
    }

    fn text(&self, selector: &str) -> String {
        self.js(&format!(
            "const e = document.querySelector({}); return e ? e.textContent : null;",
            json!(selector)
        ))
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// A real click, as a person would.
    fn click(&self, selector: &str) {
        let el = self.cmd(
            "POST",
            "element",
            json!({"using": "css selector", "value": selector}),
        );
        let id = el[ELEMENT].as_str().unwrap().to_owned();
        self.cmd("POST", &format!("element/{id}/click"), json!({}));
    }

    fn screenshot(&self, path: &Path) {
        let b64 = self.cmd("GET", "screenshot", Value::Null);
        fs::write(path, base64_decode(b64.as_str().unwrap())).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The body of one HTTP response, by `Content-Length` or chunked encoding.
fn read_response_body(s: &mut TcpStream) -> Result<String, String> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the response head".into());
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    loop {
        let body = &raw[head_end..];
        let complete = match length {
            Some(n) => body.len() >= n,
            None if chunked => body.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if complete {
            break;
        }
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let body = String::from_utf8_lossy(&raw[head_end..]).into_owned();
    Ok(if chunked { dechunk(&body) } else { body })
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

fn base64_decode(text: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let clean: Vec<u8> = text.bytes().filter(|c| !b"=\r\n".contains(c)).collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= u32::from(val(*c)) << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len() - 1]);
    }
    out
}

/// A page on another origin (another loopback port) whose form posts to the update page
/// as soon as it loads: what a hostile web page would do.
fn hostile_site(target_port: u16) -> (u16, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let page = format!(
        "<!doctype html><title>free kittens</title><form id=f method=post action=\"http://127.0.0.1:{target_port}/update\"><input name=x value=1></form><script>document.getElementById('f').submit()</script>"
    );
    let handle = std::thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut served = 0;
        while Instant::now() < deadline && served < 1 {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf);
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                        page.len()
                    );
                    served += 1;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    (port, handle)
}

// ---------------------------------------------------------------------------------------
// Tests.

#[test]
fn the_page_in_chromium_updates_the_machine_and_ignores_other_sites() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", "");
    // Activation pauses, so the progress can be watched (and a second press made) mid-run.
    let hook = m.base.join("slow-activation.sh");
    fs::write(&hook, "#!/bin/sh\nsleep 3\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let serve = Serve::start(
        &m.config(),
        &[
            ("BENTO_TEST_ACTIVATION_LOG", &m.activation_log()),
            ("BENTO_TEST_HOOK", &hook),
        ],
    );

    // The state before any update.
    browser.goto(&serve.url);
    assert_eq!(browser.text("td[data-key=host]"), "alpha");
    assert_eq!(browser.text("td[data-key=applied]"), "nothing yet");
    assert_eq!(browser.text("td[data-key=last]"), "none yet");
    assert_eq!(browser.text("td[data-key=reboot]"), "no");
    assert_eq!(browser.text("#update"), "UPDATE MY MACHINE");

    // Press the button; progress arrives while the update still runs.
    browser.click("#update");
    wait_for(
        "progress lines while running",
        Duration::from_secs(120),
        || {
            let log = browser.text("#log");
            (log.contains("activating (switch)") && browser.text("#result").is_empty())
                .then_some(())
        },
    );
    assert!(
        browser
            .js("return document.getElementById('update').disabled")
            .as_bool()
            == Some(true),
        "the button is disabled while the update runs"
    );
    // A second press (from this page's origin) attaches to the running update.
    let second = browser.js_async(
        "const done = arguments[arguments.length - 1];
         fetch('/update', {method: 'POST', headers: {Accept: 'application/json'}})
           .then(r => r.json()).then(done, e => done(String(e)));",
    );
    assert_eq!(second["started"], json!(false), "{second}");
    assert_eq!(second["run"], json!(1), "{second}");

    // The end: a clear result, and the state table refreshed.
    let result = wait_for("the final result", Duration::from_secs(120), || {
        Some(browser.text("#result")).filter(|t| !t.is_empty())
    });
    let system = m
        .profile_target()
        .expect("the profile points at the new system");
    let version = m.latest_report().version;
    assert_eq!(result, format!("Updated to version {}.", version.short()));
    assert_eq!(
        browser.js("return document.getElementById('result').dataset.outcome"),
        json!("updated")
    );
    assert_eq!(
        browser.js("return document.getElementById('result').className"),
        json!("ok")
    );
    let log = browser.text("#log");
    for step in [
        "checking sftp://",
        "applying version",
        "building",
        "activating (switch)",
        "checking that the server is still reachable",
        "success",
    ] {
        assert!(log.contains(step), "progress shows {step:?}: {log}");
    }
    wait_for(
        "the state table to show the new version",
        Duration::from_secs(10),
        || {
            browser
                .text("td[data-key=applied]")
                .contains(&version.short())
                .then_some(())
        },
    );
    assert!(
        browser.text("td[data-key=last]").starts_with("succeeded"),
        "{}",
        browser.text("td[data-key=last]")
    );
    assert_eq!(browser.text("#update"), "UPDATE MY MACHINE");
    assert_eq!(
        m.activations(),
        [format!("switch {system}")],
        "exactly one update ran"
    );
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bento-update-page.png");
    browser.screenshot(&shot);
    eprintln!(
        "screenshot of the page after the update: {}",
        shot.display()
    );

    // A new version is published; another site's page posts to /update. Nothing happens.
    write_version(&sshd, "2");
    sshd.publish();
    let (evil_port, evil) = hostile_site(serve.port);
    browser.goto(&format!("http://127.0.0.1:{evil_port}/"));
    let refused = wait_for(
        "the browser to show the refusal",
        Duration::from_secs(20),
        || {
            let url = browser.js("return location.href");
            let body = browser.text("body");
            (url.as_str().is_some_and(|u| u.ends_with("/update")) && !body.is_empty())
                .then_some(body)
        },
    );
    assert!(
        refused.contains("refused: cross-origin request"),
        "{refused}"
    );
    let _ = evil.join();
    let (status, _, state) = http(
        serve.port,
        &format!(
            "GET /state HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n",
            serve.port
        ),
    );
    assert_eq!(status, 200);
    let state: Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["running"], Value::Null, "{state}");
    assert_eq!(
        m.activations().len(),
        1,
        "the other site's post started nothing"
    );
    assert_eq!(m.profile_target().as_deref(), Some(system.as_str()));

    // The page itself still updates to the new version.
    let current = fs::read_to_string(sshd.host_dir("alpha").join("current")).unwrap();
    let v2 = bento::protocol::layout::parse_current(&current).unwrap();
    browser.goto(&serve.url);
    assert_eq!(
        browser.text("#result"),
        format!("Updated to version {}.", version.short()),
        "a fresh page load shows the last update's result"
    );
    browser.click("#update");
    let want = format!("Updated to version {}.", v2.short());
    wait_for(
        "the second update's result",
        Duration::from_secs(120),
        || (browser.text("#result") == want).then_some(()),
    );
    assert_eq!(m.activations().len(), 2);
    assert!(m.profile_target().unwrap().contains("nixos-system-alpha-2"));
}

/// The ops issue: a version backing off is retried from the page's own button, with the
/// agent's `--force` semantics, instead of a root shell.
#[test]
fn the_page_in_chromium_retries_a_version_that_is_backing_off() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", "");
    assert_eq!(code(&m.update()), EXIT_UPDATED);
    // Version 2's activation fails once: the machine goes back to version 1 and the agent
    // backs off from version 2 (for 5 minutes, far longer than this test).
    write_version(&sshd, "2");
    sshd.publish();
    let out = m.update_with(&[("BENTO_TEST_FAIL_ACTIVATION", "1")], &[]);
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    let before = m.activations().len();
    let current = fs::read_to_string(sshd.host_dir("alpha").join("current")).unwrap();
    let v2 = bento::protocol::layout::parse_current(&current).unwrap();
    let serve = Serve::start(
        &m.config(),
        &[("BENTO_TEST_ACTIVATION_LOG", &m.activation_log())],
    );

    browser.goto(&serve.url);
    assert!(
        browser.text("td[data-key=last]").starts_with("failed"),
        "{}",
        browser.text("td[data-key=last]")
    );
    let hidden = |id: &str| browser.js(&format!("return document.getElementById('{id}').hidden"));
    assert_eq!(hidden("backoff"), json!(false), "Retry is offered");
    let offer = browser.text("#backoff-text");
    assert!(
        offer.contains(&v2.short()) && offer.contains("tries it again in"),
        "{offer}"
    );

    // The big button keeps to the back-off, and says so without sending anyone to a terminal.
    browser.click("#update");
    let result = wait_for("the update's result", Duration::from_secs(60), || {
        Some(browser.text("#result")).filter(|t| !t.is_empty())
    });
    assert!(
        result.starts_with(&format!(
            "Nothing to do: version {} failed; retrying in",
            v2.short()
        )),
        "{result}"
    );
    assert!(!result.contains("--force"), "{result}");
    assert_eq!(m.activations().len(), before, "nothing was tried");
    assert_eq!(hidden("backoff"), json!(false), "still offered");

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bento-update-page-retry.png");
    browser.screenshot(&shot);
    eprintln!("screenshot of the page offering Retry: {}", shot.display());

    // Retry tries version 2 now, and it applies.
    browser.click("#retry");
    let want = format!("Updated to version {}.", v2.short());
    wait_for("the retry's result", Duration::from_secs(120), || {
        (browser.text("#result") == want).then_some(())
    });
    let acts = m.activations();
    assert_eq!(acts.len(), before + 1, "{acts:?}");
    assert!(acts[before].contains("nixos-system-alpha-2"), "{acts:?}");
    assert!(m.profile_target().unwrap().contains("nixos-system-alpha-2"));
    assert!(
        browser.text("#log").contains("retrying now"),
        "{}",
        browser.text("#log")
    );
    wait_for(
        "the Retry offer to go once version 2 is applied",
        Duration::from_secs(10),
        || (hidden("backoff") == json!(true)).then_some(()),
    );
}

/// An agent.toml whose server is a local directory that does not exist: enough to serve the
/// page, and any update that started would fail and leave a state directory behind.
fn offline_config(dir: &Path) -> PathBuf {
    let config = dir.join("agent.toml");
    fs::write(
        &config,
        format!(
            "host = \"alpha\"\nserver = \"file://{}/no-server\"\nstate_dir = \"{}/state\"\n",
            dir.display(),
            dir.display()
        ),
    )
    .unwrap();
    config
}

#[test]
fn only_a_same_origin_post_starts_an_update() {
    let t = tempfile::tempdir().unwrap();
    let serve = Serve::start(&offline_config(t.path()), &[]);
    let p = serve.port;
    let host = format!("127.0.0.1:{p}");

    let (status, head, body) = http(p, &format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n"));
    assert_eq!(status, 200);
    assert!(
        head.contains("Content-Security-Policy: default-src 'none'; script-src 'sha256-"),
        "{head}"
    );
    assert!(head.contains("X-Frame-Options: DENY"), "{head}");
    assert!(
        body.contains("UPDATE MY MACHINE") && body.contains("alpha"),
        "{body}"
    );
    assert!(
        !body.contains("http://") && !body.contains("https://"),
        "no external assets"
    );

    // Nothing runs yet: the event stream says so and ends.
    let (status, _, body) = http(p, &format!("GET /events HTTP/1.1\r\nHost: {host}\r\n\r\n"));
    assert_eq!(status, 200);
    assert!(body.starts_with("event: idle\n"), "{body}");

    for (req, want) in [
        // No state change on GET, and only POST is accepted.
        (format!("GET /update HTTP/1.1\r\nHost: {host}\r\n\r\n"), 405),
        // Another site's form or script.
        (format!("POST /update HTTP/1.1\r\nHost: {host}\r\nOrigin: http://evil.example\r\nContent-Length: 0\r\n\r\n"), 403),
        (format!("POST /update HTTP/1.1\r\nHost: {host}\r\nOrigin: http://127.0.0.1:1\r\nContent-Length: 0\r\n\r\n"), 403),
        (format!("POST /update HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\nSec-Fetch-Site: cross-site\r\nContent-Length: 0\r\n\r\n"), 403),
        // No Origin at all (curl, a non-browser client).
        (format!("POST /update HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n"), 403),
        // DNS rebinding: a foreign name that resolves to 127.0.0.1, same-origin with itself.
        (format!("POST /update HTTP/1.1\r\nHost: evil.example:{p}\r\nOrigin: http://evil.example:{p}\r\nContent-Length: 0\r\n\r\n"), 421),
        (format!("GET /state HTTP/1.1\r\nHost: evil.example:{p}\r\n\r\n"), 421),
        // Bounded requests.
        (format!("POST /update HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\nContent-Length: 100000\r\n\r\n"), 413),
        (format!("GET / HTTP/1.1\r\nHost: {host}\r\nX-Junk: {}\r\n\r\n", "j".repeat(10_000)), 431),
        // A body that never arrives is cut off at the request's deadline.
        (format!("POST /update HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\nContent-Length: 7\r\n\r\nret"), 408),
        // Retry keeps to the same rules as Update.
        (format!("POST /update HTTP/1.1\r\nHost: {host}\r\nOrigin: http://evil.example\r\nContent-Length: 7\r\n\r\nretry=1"), 403),
        (format!("POST /update HTTP/1.1\r\nHost: {host}\r\nContent-Length: 7\r\n\r\nretry=1"), 403),
    ] {
        let (status, _, body) = http(p, &req);
        assert_eq!(status, want, "{}: {body}", req.lines().next().unwrap());
    }
    assert!(!t.path().join("state").exists(), "no update started");

    // The page's own origin may: the update starts, fails (no server) and says so.
    let (status, body) = post_update(p, Some(&format!("http://{host}")));
    assert_eq!(status, 202, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["run"], json!(1));
    let (_, _, events) = http(p, &format!("GET /events HTTP/1.1\r\nHost: {host}\r\n\r\n"));
    assert!(events.starts_with("event: run\nid: 1-start\n"), "{events}");
    let result = events
        .split("\n\n")
        .find(|e| e.starts_with("event: result"))
        .unwrap_or_else(|| panic!("a result event: {events}"));
    assert!(result.contains("\"outcome\":\"error\""), "{result}");
    assert!(result.contains("Could not update"), "{result}");
    assert!(
        t.path().join("state").exists(),
        "the update ran through agent::update"
    );
}

#[test]
fn listens_on_loopback_only() {
    let t = tempfile::tempdir().unwrap();
    for addr in ["0.0.0.0:0", "[::]:0", "192.0.2.1:51337"] {
        let out = bento_std()
            .args(["agent", "serve", "--listen", addr, "--config"])
            .arg(offline_config(t.path()))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{addr}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("loopback only"), "{addr}: {err}");
    }
}

#[test]
fn takes_its_socket_from_systemd_and_exits_when_idle() {
    let Ok(activate) = which("systemd-socket-activate") else {
        eprintln!("systemd-socket-activate not installed: socket activation test skipped");
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new(activate)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg(assert_cmd::cargo::cargo_bin("bento"))
        .args([
            "agent",
            "serve",
            "--exit-when-idle",
            "2s",
            "--listen",
            "127.0.0.1:1",
            "--config",
        ])
        .arg(offline_config(t.path()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // systemd-socket-activate binds first; bento gets the socket as fd 3 (its own --listen,
    // a port it could not use, is ignored).
    let (status, _, body) = wait_for(
        "the activated page to answer",
        Duration::from_secs(20),
        || {
            TcpStream::connect(("127.0.0.1", port)).ok()?;
            Some(http(
                port,
                &format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"),
            ))
        },
    );
    assert_eq!(status, 200);
    assert!(body.contains("UPDATE MY MACHINE"));
    let out = wait_with_deadline(child, Duration::from_secs(30)).expect("exits once idle");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("http://127.0.0.1:{port}/")),
        "serves on systemd's socket"
    );
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

/// Security issue item 9: connections that drip a request byte by byte must not hold the
/// page's connection slots. 40 of them (more than the 32 slots) each send one byte every 2 s
/// and never finish; a normal visitor must get the page again within seconds, not once the
/// drips stop.
#[test]
fn slow_connections_do_not_deny_the_page() {
    const SLOW: usize = 40;
    const DRIP: Duration = Duration::from_secs(2);
    /// How long the drips go on: well past the page's per-connection deadline.
    const ATTACK: Duration = Duration::from_secs(40);
    let t = tempfile::tempdir().unwrap();
    let serve = Serve::start(&offline_config(t.path()), &[]);
    let port = serve.port;
    let get = format!("GET /state HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    let status = |timeout: Duration| -> Option<u16> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(timeout)).unwrap();
        s.write_all(get.as_bytes()).ok()?;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        text.split(' ').nth(1)?.parse().ok()
    };
    assert_eq!(status(Duration::from_secs(10)), Some(200), "answers before");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attack_start = Instant::now();
    let drippers: Vec<_> = (0..SLOW)
        .map(|_| {
            let stop = stop.clone();
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            std::thread::spawn(move || {
                s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                // A head that never ends: one byte, then another every DRIP.
                let head = b"GET / HTTP/1.1\r\nX-Slow: "
                    .iter()
                    .chain(std::iter::repeat(&b'a'));
                let mut dripped = 0;
                for byte in head {
                    if stop.load(std::sync::atomic::Ordering::SeqCst)
                        || attack_start.elapsed() > ATTACK
                        || s.write_all(&[*byte]).is_err()
                    {
                        break;
                    }
                    dripped += 1;
                    std::thread::sleep(DRIP);
                }
                dripped
            })
        })
        .collect();

    // The slots are taken: while the slow connections are fresh, a visitor is turned away
    // (so this test really does fill the page).
    wait_for("the page to be full", Duration::from_secs(4), || {
        (status(Duration::from_secs(2)) == Some(503)).then_some(())
    });
    // Then each slow connection reaches its deadline and the page answers again, while the
    // drips still go on.
    let answered = wait_for(
        "the page to answer again during the attack",
        Duration::from_secs(20),
        || (status(Duration::from_secs(2)) == Some(200)).then(Instant::now),
    );
    let after = answered.duration_since(attack_start);
    assert!(
        after < ATTACK / 2,
        "answered {after:?} into the attack: only because the drips stopped"
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for d in drippers {
        let dripped = d.join().unwrap();
        assert!(
            dripped < 20,
            "a slow connection was cut off ({dripped} bytes)"
        );
    }
}

/// Issue #23 item 12: forty reconnecting `/events` clients, or 32 open streams during a run,
/// took every connection slot and the page answered 503 for as long as they lasted. Streams
/// have slots of their own now (16), the page and its button keep theirs, and a stream ends
/// after its lifetime (30 s) even while the run goes on (the EventSource reconnects).
#[test]
fn event_streams_and_reconnecting_clients_do_not_starve_the_page() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    const CLIENTS: usize = 40;
    const ATTACK: Duration = Duration::from_secs(12);
    const MAX_STREAMS: usize = 16;
    const LIFETIME: Duration = Duration::from_secs(30);

    // A server that accepts and never says a word: the update started below waits on its
    // login (connect_timeout) for a minute, so the run outlasts the test's streams.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let held: Vec<_> = silent.incoming().take(8).collect();
        std::thread::sleep(Duration::from_secs(120));
        drop(held);
    });
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fs::write(d.join("id"), "not a key\n").unwrap();
    fs::write(d.join("known_hosts"), "").unwrap();
    let config = d.join("agent.toml");
    fs::write(
        &config,
        format!(
            "host = \"alpha\"\nserver = \"sftp://bento-alpha@127.0.0.1:{silent_port}\"\nidentity_file = \"{0}/id\"\nknown_hosts = \"{0}/known_hosts\"\nstate_dir = \"{0}/state\"\nconnect_timeout = \"60s\"\n",
            d.display()
        ),
    )
    .unwrap();
    let serve = Serve::start(&config, &[]);
    let port = serve.port;
    let host = format!("127.0.0.1:{port}");
    let (status, body) = post_update(port, Some(&format!("http://{host}")));
    assert_eq!(status, 202, "{body}");

    // One stream opened before the crowd: it must end by its lifetime, not by the run.
    let first = {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(format!("GET /events HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
            .unwrap();
        s.set_read_timeout(Some(LIFETIME + Duration::from_secs(15)))
            .unwrap();
        let opened = Instant::now();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            (opened.elapsed(), String::from_utf8_lossy(&out).into_owned())
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let open = Arc::new(AtomicUsize::new(1));
    let most = Arc::new(AtomicUsize::new(1));
    let refused = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, open, most, refused) =
                (stop.clone(), open.clone(), most.clone(), refused.clone());
            let request = format!("GET /events HTTP/1.1\r\nHost: {host}\r\n\r\n");
            std::thread::spawn(move || {
                // Reconnect as soon as the stream is refused or ends, until the attack stops.
                while !stop.load(Ordering::SeqCst) {
                    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                        continue;
                    };
                    s.set_read_timeout(Some(Duration::from_millis(200)))
                        .unwrap();
                    if s.write_all(request.as_bytes()).is_err() {
                        continue;
                    }
                    let mut head = [0u8; 12];
                    let deadline = Instant::now() + Duration::from_secs(5);
                    let mut got = 0;
                    while got < head.len() && Instant::now() < deadline {
                        match s.read(&mut head[got..]) {
                            Ok(0) => break,
                            Ok(n) => got += n,
                            Err(_) => {}
                        }
                    }
                    match &head[..got] {
                        b"HTTP/1.1 200" => {
                            let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            let mut buf = [0u8; 4096];
                            while !stop.load(Ordering::SeqCst) {
                                match s.read(&mut buf) {
                                    Ok(0) => break,
                                    Ok(_) => {}
                                    Err(e)
                                        if e.kind() == std::io::ErrorKind::WouldBlock
                                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                                    Err(_) => break,
                                }
                            }
                            open.fetch_sub(1, Ordering::SeqCst);
                        }
                        b"HTTP/1.1 503" => {
                            refused.fetch_add(1, Ordering::SeqCst);
                            // An EventSource waits before it reconnects (3 s by default);
                            // 100 ms is still a crowd, without each client holding two
                            // request slots at once (closing one, opening the next) on a
                            // loaded machine.
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        _ => {}
                    }
                }
            })
        })
        .collect();

    // While the crowd reconnects, the page and the Update button answer, every time: at
    // worst after a few quick tries (a busy machine may run the crowd's closed connections
    // late, and each holds its request slot until it does), where streams holding request
    // slots refused them for the whole attack.
    let persist = |request: &dyn Fn() -> (u16, String)| {
        let mut answer = request();
        for _ in 0..10 {
            if !(answer.0 == 503 && answer.1.contains("too many connections")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
            answer = request();
        }
        answer
    };
    let started = Instant::now();
    let mut visits = 0;
    while started.elapsed() < ATTACK {
        let (status, body) = persist(&|| {
            let (status, _, body) = http(port, &format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n"));
            (status, body)
        });
        assert_eq!(status, 200, "the page during the attack: {body}");
        let (status, body) = persist(&|| post_update(port, Some(&format!("http://{host}"))));
        assert_eq!(status, 202, "the button during the attack: {body}");
        assert!(
            body.contains("\"started\":false"),
            "attached to the run: {body}"
        );
        visits += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    assert!(visits >= 10, "{visits} visits");
    let most = most.load(Ordering::SeqCst);
    assert!(
        most <= MAX_STREAMS,
        "{most} event streams were open at once"
    );
    assert!(
        refused.load(Ordering::SeqCst) > 0,
        "the stream cap was never reached (so this test attacked nothing)"
    );

    let (lasted, events) = first.join().unwrap();
    assert!(
        events.contains("event: run"),
        "the first stream followed the run: {events}"
    );
    assert!(
        !events.contains("event: result"),
        "the run was still going: {events}"
    );
    assert!(
        lasted >= LIFETIME - Duration::from_secs(2) && lasted < LIFETIME + Duration::from_secs(10),
        "the stream ended after {lasted:?}, its lifetime is {LIFETIME:?}"
    );
}
