//! A counting TCP relay on loopback: clients connect to `relay.port`, every connection is
//! forwarded to the target, and the bytes each way are counted per connection. It measures
//! what really crosses the wire (no estimates) and can inject network faults: cut one
//! connection after an exact number of bytes, take the whole server "down" (live
//! connections cut, new ones refused), or throttle the bandwidth so a download takes long
//! enough to be interrupted, or stall: keep every connection open and silently drop what
//! crosses it, as a server whose session stopped does. For HTTP it also notes the status
//! of every answer that crosses it (one per request), so a test counts requests and 304s.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bytes of one relayed connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Client to server.
    pub up: u64,
    /// Server to client.
    pub down: u64,
}

impl Traffic {
    pub fn total(&self) -> u64 {
        self.up + self.down
    }
}

/// Which way bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// A one-shot cut: connection number `conn` (counted from the last `reset`) is shut down
/// both ways once `bytes` have crossed it in direction `dir`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub conn: usize,
    pub dir: Dir,
    pub bytes: u64,
}

/// The fault plan shared by the accept loop and the pumps.
#[derive(Default)]
struct Control {
    /// Refuse new connections and cut the live ones.
    down: AtomicBool,
    /// Bytes per second per direction of each connection; 0 is unlimited.
    rate: AtomicU64,
    cut: Mutex<Option<Cut>>,
    /// Set when the armed cut happened.
    fired: AtomicBool,
    /// The armed cut stalls instead of cutting.
    cut_stalls: AtomicBool,
    /// Drop every byte, on every connection, and keep them all open.
    stalled: AtomicBool,
    /// Numbers every connection ever opened (unlike `index`, never reset).
    serial: std::sync::atomic::AtomicUsize,
    /// Both sockets of every live connection (by serial), for cutting.
    live: Mutex<Vec<(usize, TcpStream, TcpStream)>>,
    /// The status of every HTTP/1.1 answer relayed since the last `reset`.
    statuses: Mutex<Vec<u16>>,
    /// The request line (method and path, no query) of every HTTP/1.1 request since then.
    requests: Mutex<Vec<String>>,
    /// The request lines of those that carried `x-amz-copy-source` (S3 CopyObject).
    copies: Mutex<Vec<String>>,
    /// The request lines of those that carried `Range`.
    ranged: Mutex<Vec<String>>,
}

impl Control {
    fn cut_everything(&self) {
        for (_, a, b) in self.live.lock().unwrap().drain(..) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

pub struct Relay {
    pub port: u16,
    conns: Arc<Mutex<Vec<Arc<Mutex<Traffic>>>>>,
    stop: Arc<AtomicBool>,
    ctl: Arc<Control>,
}

impl Relay {
    /// Relays 127.0.0.1:<new port> to 127.0.0.1:`target`.
    pub fn start(target: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let conns: Arc<Mutex<Vec<Arc<Mutex<Traffic>>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let ctl = Arc::new(Control::default());
        let (c, s, k) = (conns.clone(), stop.clone(), ctl.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if k.down.load(Ordering::SeqCst) {
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        }
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                            continue;
                        };
                        let traffic = Arc::new(Mutex::new(Traffic::default()));
                        let index = {
                            let mut list = c.lock().unwrap();
                            list.push(traffic.clone());
                            list.len() - 1
                        };
                        let serial = k.serial.fetch_add(1, Ordering::SeqCst);
                        k.live.lock().unwrap().push((
                            serial,
                            client.try_clone().unwrap(),
                            server.try_clone().unwrap(),
                        ));
                        let link = Link {
                            index,
                            serial,
                            traffic,
                            ctl: k.clone(),
                        };
                        pump(
                            client.try_clone().unwrap(),
                            server.try_clone().unwrap(),
                            link.clone(),
                            Dir::Up,
                        );
                        pump(server, client, link, Dir::Down);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Relay {
            port,
            conns,
            stop,
            ctl,
        }
    }

    /// Traffic of every connection so far, in the order they were opened.
    pub fn connections(&self) -> Vec<Traffic> {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .map(|t| *t.lock().unwrap())
            .collect()
    }

    /// Forgets the connections counted so far (connection numbers start again at 0) and
    /// disarms a cut that has not happened.
    pub fn reset(&self) {
        self.conns.lock().unwrap().clear();
        self.ctl.statuses.lock().unwrap().clear();
        self.ctl.requests.lock().unwrap().clear();
        self.ctl.copies.lock().unwrap().clear();
        self.ctl.ranged.lock().unwrap().clear();
        *self.ctl.cut.lock().unwrap() = None;
        self.ctl.fired.store(false, Ordering::SeqCst);
    }

    /// The status of every HTTP/1.1 answer relayed since the last `reset`, in order.
    pub fn statuses(&self) -> Vec<u16> {
        self.ctl.statuses.lock().unwrap().clone()
    }

    /// `METHOD /path` of every HTTP/1.1 request relayed since the last `reset`, in order.
    pub fn requests(&self) -> Vec<String> {
        self.ctl.requests.lock().unwrap().clone()
    }

    /// The requests (as [`Relay::requests`] gives them) that were S3 server-side copies
    /// (`x-amz-copy-source`), since the last `reset`.
    pub fn copies(&self) -> Vec<String> {
        self.ctl.copies.lock().unwrap().clone()
    }

    /// The requests that asked for a byte range (`Range`), since the last `reset`.
    pub fn ranged(&self) -> Vec<String> {
        self.ctl.ranged.lock().unwrap().clone()
    }

    /// Arms a one-shot cut (replacing any armed one).
    pub fn cut_after(&self, cut: Cut) {
        self.ctl.fired.store(false, Ordering::SeqCst);
        *self.ctl.cut.lock().unwrap() = Some(cut);
    }

    /// Arms a one-shot stall: once `at` is reached, every byte on every connection is
    /// dropped (connections stay open) until `stall(false)`.
    pub fn stall_after(&self, at: Cut) {
        self.ctl.cut_stalls.store(true, Ordering::SeqCst);
        self.cut_after(at);
    }

    /// Stalls the relay now, or ends a stall.
    pub fn stall(&self, on: bool) {
        if !on {
            *self.ctl.cut.lock().unwrap() = None;
            self.ctl.cut_stalls.store(false, Ordering::SeqCst);
        }
        self.ctl.stalled.store(on, Ordering::SeqCst);
    }

    /// Whether the armed cut happened.
    pub fn cut_fired(&self) -> bool {
        self.ctl.fired.load(Ordering::SeqCst)
    }

    /// Takes the server down (live connections cut, new ones refused) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.ctl.down.store(down, Ordering::SeqCst);
        if down {
            self.ctl.cut_everything();
        }
    }

    /// Cuts every live connection now; new ones are still accepted.
    pub fn cut_now(&self) {
        self.ctl.cut_everything();
    }

    /// Limits each direction of each connection to `bytes_per_sec` (0: unlimited).
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.ctl.rate.store(bytes_per_sec, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.ctl.cut_everything();
    }
}

/// What a pump needs to know about its connection.
#[derive(Clone)]
struct Link {
    index: usize,
    serial: usize,
    traffic: Arc<Mutex<Traffic>>,
    ctl: Arc<Control>,
}

impl Link {
    /// How many of the next `n` bytes may pass before the armed cut (if it is this
    /// connection's and this direction's); `None` when no cut applies.
    fn allowance(&self, dir: Dir, moved: u64, n: u64) -> Option<u64> {
        let cut = (*self.ctl.cut.lock().unwrap())?;
        if cut.conn != self.index || cut.dir != dir || self.ctl.fired.load(Ordering::SeqCst) {
            return None;
        }
        (moved + n >= cut.bytes).then(|| cut.bytes.saturating_sub(moved))
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, link: Link, dir: Dir) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        let mut moved = 0u64;
        let mut status = StatusLines::default();
        let mut request = RequestLines::default();
        loop {
            let rate = link.ctl.rate.load(Ordering::Relaxed);
            // Small reads when throttled, so the rate is smooth.
            let max = if rate > 0 { 4096 } else { buf.len() };
            match from.read(&mut buf[..max]) {
                Ok(0) | Err(_) => break,
                Ok(_) if link.ctl.stalled.load(Ordering::SeqCst) => continue,
                Ok(n) => {
                    let mut n = n as u64;
                    let cut = link.allowance(dir, moved, n);
                    if let Some(allowed) = cut {
                        n = allowed;
                    }
                    if to.write_all(&buf[..n as usize]).is_err() {
                        break;
                    }
                    moved += n;
                    if dir == Dir::Down {
                        for code in status.feed(&buf[..n as usize]) {
                            link.ctl.statuses.lock().unwrap().push(code);
                        }
                    } else {
                        for found in request.feed(&buf[..n as usize]) {
                            match found {
                                Found::Request(line) => {
                                    link.ctl.requests.lock().unwrap().push(line)
                                }
                                Found::Copy(line) => link.ctl.copies.lock().unwrap().push(line),
                                Found::Range(line) => link.ctl.ranged.lock().unwrap().push(line),
                            }
                        }
                    }
                    {
                        let mut t = link.traffic.lock().unwrap();
                        match dir {
                            Dir::Up => t.up += n,
                            Dir::Down => t.down += n,
                        }
                    }
                    if cut.is_some() && link.ctl.cut_stalls.load(Ordering::SeqCst) {
                        link.ctl.stalled.store(true, Ordering::SeqCst);
                        link.ctl.fired.store(true, Ordering::SeqCst);
                        continue;
                    }
                    if cut.is_some() {
                        link.ctl.fired.store(true, Ordering::SeqCst);
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                        return;
                    }
                    if let Some(us) = (n * 1_000_000).checked_div(rate) {
                        std::thread::sleep(Duration::from_micros(us));
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        if dir == Dir::Down {
            // The server is done: close the clones kept for cutting.
            link.ctl
                .live
                .lock()
                .unwrap()
                .retain(|(s, _, _)| *s != link.serial);
        }
    });
}

/// Finds `HTTP/1.1 NNN` status lines in a stream fed in pieces of any size.
#[derive(Default)]
struct StatusLines {
    /// Bytes of the pattern matched so far, then the digits read.
    matched: usize,
    code: u16,
}

impl StatusLines {
    const START: &'static [u8] = b"HTTP/1.1 ";

    fn feed(&mut self, bytes: &[u8]) -> Vec<u16> {
        let mut found = Vec::new();
        for &b in bytes {
            if self.matched < Self::START.len() {
                if b == Self::START[self.matched] {
                    self.matched += 1;
                } else {
                    self.matched = usize::from(b == Self::START[0]);
                }
                self.code = 0;
                continue;
            }
            if b.is_ascii_digit() {
                self.code = self.code * 10 + u16::from(b - b'0');
                self.matched += 1;
                if self.matched == Self::START.len() + 3 {
                    found.push(self.code);
                    self.matched = 0;
                }
            } else {
                self.matched = usize::from(b == Self::START[0]);
            }
        }
        found
    }
}

/// What [`RequestLines`] found: a request line, or a header of note on the last one.
enum Found {
    Request(String),
    Copy(String),
    Range(String),
}

/// Finds request lines (`GET /path?query HTTP/1.1`) in a stream fed in pieces of any size,
/// giving `GET /path`, and the `x-amz-copy-source` and `Range` headers of each request.
#[derive(Default)]
struct RequestLines {
    line: Vec<u8>,
    /// The last request line, while its headers are read.
    last: Option<String>,
}

impl RequestLines {
    const METHODS: [&'static str; 5] = ["GET ", "PUT ", "HEAD ", "DELETE ", "POST "];

    fn feed(&mut self, bytes: &[u8]) -> Vec<Found> {
        let mut found = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line).into_owned();
                self.line.clear();
                if line.ends_with(" HTTP/1.1\r")
                    && Self::METHODS.iter().any(|m| line.starts_with(m))
                {
                    let target = line.trim_end_matches(" HTTP/1.1\r");
                    let request = target.split('?').next().unwrap_or(target).to_owned();
                    self.last = Some(request.clone());
                    found.push(Found::Request(request));
                } else if line == "\r" {
                    // The end of the headers: a body may follow, never a header of note.
                    self.last = None;
                } else if let Some(last) = &self.last {
                    let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
                    if name == "x-amz-copy-source" {
                        found.push(Found::Copy(last.clone()));
                    } else if name == "range" {
                        found.push(Found::Range(last.clone()));
                    }
                }
            } else if self.line.len() < 4096 {
                self.line.push(b);
            }
        }
        found
    }
}
