//! A static file server on loopback for mirror tests: GET and HEAD of the files under one
//! directory, single byte ranges (`Range: bytes=A-B`, 206 / 416), 404 for anything else;
//! plain HTTP, or HTTPS with a certificate of the test CA (rustls). Bounded: loopback only,
//! request heads of at most 8 KiB, every socket with a 10 s timeout, one thread per
//! connection, stopped on drop. It logs every request line, so a test can tell what the
//! agent asked for.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct StaticHttp {
    pub port: u16,
    tls: bool,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl StaticHttp {
    /// Serves `root` over plain HTTP on 127.0.0.1.
    pub fn start(root: &Path) -> StaticHttp {
        Self::spawn(root, None)
    }

    /// Serves `root` over HTTPS on 127.0.0.1 with `cert` and `key` (PEM).
    pub fn start_tls(root: &Path, cert: &Path, key: &Path) -> StaticHttp {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        // The provider ureq's client uses (ring), so both ends agree without a second one.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        Self::spawn(root, Some(Arc::new(config)))
    }

    fn spawn(root: &Path, tls: Option<Arc<rustls::ServerConfig>>) -> StaticHttp {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the static server");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (s, r, root, with_tls) = (
            stop.clone(),
            requests.clone(),
            root.to_owned(),
            tls.is_some(),
        );
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        let (root, r, tls) = (root.clone(), r.clone(), tls.clone());
                        std::thread::spawn(move || {
                            sock.set_nonblocking(false).unwrap();
                            sock.set_read_timeout(Some(Duration::from_secs(10)))
                                .unwrap();
                            sock.set_write_timeout(Some(Duration::from_secs(10)))
                                .unwrap();
                            match tls {
                                None => serve(sock, &root, &r),
                                Some(cfg) => {
                                    let Ok(conn) = rustls::ServerConnection::new(cfg) else {
                                        return;
                                    };
                                    serve(rustls::StreamOwned::new(conn, sock), &root, &r)
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        StaticHttp {
            port,
            tls: with_tls,
            stop,
            requests,
        }
    }

    /// The URL of `rel` (a host's tree: `alpha`).
    pub fn url(&self, rel: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/{rel}", self.port)
    }

    /// Every request line served so far (`GET /alpha/current`, with its range).
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for StaticHttp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Answers requests on one connection until the client closes it (keep-alive).
fn serve<S: Read + Write>(stream: S, root: &Path, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            head.push(line.trim_end().to_owned());
            if head.iter().map(String::len).sum::<usize>() > 8192 {
                return;
            }
        }
        let Some(first) = head.first() else { return };
        let mut parts = first.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let range = head.iter().find_map(|h| {
            let (k, v) = h.split_once(':')?;
            k.eq_ignore_ascii_case("range").then(|| v.trim().to_owned())
        });
        log.lock().unwrap().push(match &range {
            Some(r) => format!("{method} {target} {r}"),
            None => format!("{method} {target}"),
        });
        let answer = respond(root, method, target, range.as_deref());
        let out = reader.get_mut();
        if out.write_all(&answer).and_then(|_| out.flush()).is_err() {
            return;
        }
    }
}

fn respond(root: &Path, method: &str, target: &str, range: Option<&str>) -> Vec<u8> {
    let status = |code: &str| format!("HTTP/1.1 {code}\r\ncontent-length: 0\r\n\r\n").into_bytes();
    if method != "GET" && method != "HEAD" {
        return status("405 Method Not Allowed");
    }
    let rel = target.trim_start_matches('/');
    if rel.split('/').any(|s| s == ".." || s.is_empty()) || rel.contains('?') {
        return status("404 Not Found");
    }
    let path: PathBuf = root.join(rel);
    let Ok(body) = std::fs::read(&path) else {
        return status("404 Not Found");
    };
    let len = body.len() as u64;
    let (code, slice, extra) = match range.and_then(|r| r.strip_prefix("bytes=")) {
        None => ("200 OK", &body[..], String::new()),
        Some(spec) => {
            let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
            let from: u64 = a.parse().unwrap_or(0);
            let to: u64 = b.parse().unwrap_or(len.saturating_sub(1));
            if from >= len {
                return format!(
                    "HTTP/1.1 416 Range Not Satisfiable\r\ncontent-range: bytes */{len}\r\ncontent-length: 0\r\n\r\n"
                )
                .into_bytes();
            }
            let to = to.min(len - 1);
            (
                "206 Partial Content",
                &body[from as usize..=to as usize],
                format!("content-range: bytes {from}-{to}/{len}\r\n"),
            )
        }
    };
    let mut out = format!(
        "HTTP/1.1 {code}\r\ncontent-length: {}\r\n{extra}\r\n",
        slice.len()
    )
    .into_bytes();
    if method == "GET" {
        out.extend_from_slice(slice);
    }
    out
}
