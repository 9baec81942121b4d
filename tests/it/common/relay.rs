//! A counting TCP relay on loopback: clients connect to `relay.port`, every connection is
//! forwarded to the target, and the bytes each way are counted per connection. It measures
//! what really crosses the wire (no estimates) and can be cut to simulate a lost server.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
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

pub struct Relay {
    pub port: u16,
    conns: Arc<Mutex<Vec<Arc<Mutex<Traffic>>>>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Relays 127.0.0.1:<new port> to 127.0.0.1:`target`.
    pub fn start(target: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let conns: Arc<Mutex<Vec<Arc<Mutex<Traffic>>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (conns.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                            continue;
                        };
                        let traffic = Arc::new(Mutex::new(Traffic::default()));
                        c.lock().unwrap().push(traffic.clone());
                        pump(
                            client.try_clone().unwrap(),
                            server.try_clone().unwrap(),
                            traffic.clone(),
                            true,
                        );
                        pump(server, client, traffic, false);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Relay { port, conns, stop }
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

    /// Forgets the connections counted so far.
    pub fn reset(&self) {
        self.conns.lock().unwrap().clear();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, traffic: Arc<Mutex<Traffic>>, up: bool) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    let mut t = traffic.lock().unwrap();
                    if up {
                        t.up += n as u64;
                    } else {
                        t.down += n as u64;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
