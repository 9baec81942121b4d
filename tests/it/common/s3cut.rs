//! An HTTP-aware relay in front of an S3 engine that kills a publisher after its k-th
//! mutating request: it reads each request's head (HTTP/1.1, `Content-Length` bodies, as
//! the S3 client sends them), counts every PUT, POST and DELETE (CopyObject is a PUT), and
//! once armed lets the first `k` through and cuts (or holds, unanswered, until the client
//! is killed) the connection of every later one before a byte of it reaches the engine.
//! Reads pass. Signatures stay valid: the relay forwards
//! the request bytes unchanged (the `Host` the client signed is the relay's, and the
//! engine checks the signature against the `Host` it receives).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
struct Plan {
    /// Mutating requests let through once armed; `usize::MAX` when disarmed.
    allowed: AtomicUsize,
    /// Mutating requests seen since the last `arm`, refused ones included.
    seen: AtomicUsize,
    /// Refused requests are held (never forwarded, never answered) instead of cut, until
    /// the client goes away: the publisher waits there to be killed.
    hold: AtomicBool,
    /// Requests being held now.
    held: AtomicUsize,
    stop: AtomicBool,
}

pub struct MutationCut {
    pub port: u16,
    plan: Arc<Plan>,
}

impl MutationCut {
    /// Relays 127.0.0.1:<new port> to `target` (`http://127.0.0.1:PORT`), disarmed.
    pub fn start(target: &str) -> Self {
        let target = target.trim_start_matches("http://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let plan = Arc::new(Plan {
            allowed: AtomicUsize::new(usize::MAX),
            ..Plan::default()
        });
        let p = plan.clone();
        std::thread::spawn(move || {
            while !p.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(&target) else {
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        };
                        let (c, s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                        std::thread::spawn(move || {
                            let (mut from, mut to) = (s, c);
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(Shutdown::Both);
                        });
                        let p = p.clone();
                        std::thread::spawn(move || requests(client, server, &p));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        MutationCut { port, plan }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// From now on, the first `k` mutating requests pass and every later one is cut.
    pub fn arm(&self, k: usize) {
        self.plan.hold.store(false, Ordering::SeqCst);
        self.plan.seen.store(0, Ordering::SeqCst);
        self.plan.allowed.store(k, Ordering::SeqCst);
    }

    /// From now on, the first `k` mutating requests pass and every later one is held
    /// unanswered until its client goes away (see [`MutationCut::held`]).
    pub fn arm_holding(&self, k: usize) {
        self.arm(k);
        self.plan.hold.store(true, Ordering::SeqCst);
    }

    /// How many requests are being held: the client is waiting on a request past the k-th.
    pub fn held(&self) -> usize {
        self.plan.held.load(Ordering::SeqCst)
    }

    /// Lets everything through again; returns the mutating requests seen since `arm`.
    pub fn disarm(&self) -> usize {
        self.plan.allowed.store(usize::MAX, Ordering::SeqCst);
        self.plan.seen.load(Ordering::SeqCst)
    }
}

impl Drop for MutationCut {
    fn drop(&mut self) {
        self.plan.stop.store(true, Ordering::Relaxed);
    }
}

/// Forwards one connection's requests one by one, cutting it at the first refused one.
fn requests(mut client: TcpStream, mut server: TcpStream, plan: &Plan) {
    let cut = |a: &TcpStream, b: &TcpStream| {
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    };
    loop {
        let Some(head) = read_head(&mut client) else {
            cut(&client, &server);
            return;
        };
        let text = String::from_utf8_lossy(&head).into_owned();
        let method = text.split_whitespace().next().unwrap_or("").to_owned();
        let length: u64 = text
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        assert!(
            !text
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "the S3 client sent a chunked body; this relay counts only Content-Length bodies"
        );
        if matches!(method.as_str(), "PUT" | "POST" | "DELETE") {
            let n = plan.seen.fetch_add(1, Ordering::SeqCst);
            if n >= plan.allowed.load(Ordering::SeqCst) {
                if plan.hold.load(Ordering::SeqCst) {
                    plan.held.fetch_add(1, Ordering::SeqCst);
                    // Until the client closes (or dies): what it sends is dropped.
                    let _ = std::io::copy(&mut client, &mut std::io::sink());
                    plan.held.fetch_sub(1, Ordering::SeqCst);
                }
                cut(&client, &server);
                return;
            }
        }
        if server.write_all(&head).is_err() {
            cut(&client, &server);
            return;
        }
        let mut body = (&mut client).take(length);
        match std::io::copy(&mut body, &mut server) {
            Ok(n) if n == length => {}
            _ => {
                cut(&client, &server);
                return;
            }
        }
    }
}

/// A request's head up to and including the blank line; `None` at the end of the stream.
fn read_head(from: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match from.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
        assert!(head.len() < 64 * 1024, "a request head over 64 KiB");
    }
    Some(head)
}
