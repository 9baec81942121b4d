//! A counting TCP relay on 127.0.0.1: every connection to `Relay::port` is forwarded to the
//! target port and the bytes each way are counted, so the suite reports what crossed the
//! wire rather than an estimate. One thread per direction per connection; nothing leaves
//! loopback. HTTP/1.1 requests crossing it are counted too (the object-store scenario).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes of one relayed connection.
#[derive(Debug, Default)]
struct Counter {
    up: AtomicU64,
    down: AtomicU64,
    open: AtomicU64,
    /// HTTP/1.1 request lines sent client to server.
    requests: AtomicU64,
}

/// What one connection moved: `up` client to server, `down` server to client.
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic {
    pub up: u64,
    pub down: u64,
    /// HTTP/1.1 requests (0 for SSH).
    pub requests: u64,
}

impl Traffic {
    pub fn total(&self) -> u64 {
        self.up + self.down
    }
}

pub struct Relay {
    pub port: u16,
    conns: Arc<Mutex<Vec<Arc<Counter>>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Relays a new loopback port to 127.0.0.1:`target`.
    pub fn start(target: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let port = listener.local_addr().expect("relay address").port();
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let conns: Arc<Mutex<Vec<Arc<Counter>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (conns.clone(), stop.clone());
        let acceptor = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                            continue;
                        };
                        let _ = client.set_nonblocking(false);
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let counter = Arc::new(Counter::default());
                        counter.open.store(2, Ordering::SeqCst);
                        c.lock().unwrap().push(counter.clone());
                        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                            continue;
                        };
                        pump(client, s2, counter.clone(), true);
                        pump(server, c2, counter, false);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Relay {
            port,
            conns,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// Traffic of every connection since the last reset, in the order they were opened.
    /// Waits (at most 2 s) until every one of them has been closed in both directions, so
    /// the last bytes of a session that just ended are counted.
    pub fn connections(&self) -> Vec<Traffic> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let all_closed = self
                .conns
                .lock()
                .unwrap()
                .iter()
                .all(|c| c.open.load(Ordering::SeqCst) == 0);
            if all_closed || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.conns
            .lock()
            .unwrap()
            .iter()
            .map(|c| Traffic {
                up: c.up.load(Ordering::SeqCst),
                down: c.down.load(Ordering::SeqCst),
                requests: c.requests.load(Ordering::SeqCst),
            })
            .collect()
    }

    /// Forgets the connections counted so far.
    pub fn reset(&self) {
        self.conns.lock().unwrap().clear();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, counter: Arc<Counter>, up: bool) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        // How much of a request line's end (" HTTP/1.1\r\n") was seen last.
        let mut matched = 0usize;
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // Count before forwarding: the other side may react (and the test
                    // read the counter) as soon as the bytes arrive.
                    let field = if up { &counter.up } else { &counter.down };
                    field.fetch_add(n as u64, Ordering::SeqCst);
                    if up {
                        let found = count_request_lines(&buf[..n], &mut matched);
                        counter.requests.fetch_add(found, Ordering::SeqCst);
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        counter.open.fetch_sub(1, Ordering::SeqCst);
    });
}

/// Counts request lines' ends (` HTTP/1.1\r\n`, which no header or response carries
/// client to server) in a stream fed in pieces; `matched` carries a partial match.
fn count_request_lines(bytes: &[u8], matched: &mut usize) -> u64 {
    const END: &[u8] = b" HTTP/1.1\r\n";
    let mut found = 0;
    for &b in bytes {
        if b == END[*matched] {
            *matched += 1;
            if *matched == END.len() {
                found += 1;
                *matched = 0;
            }
        } else {
            *matched = usize::from(b == END[0]);
        }
    }
    found
}
