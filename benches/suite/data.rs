//! Seeded data: the same bytes on every run and every machine (xorshift64*, no external
//! randomness), and a small worker pool for bounded concurrency.

use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `len` bytes of Nix-looking text (words, spaces, newlines): compressible like real
/// configuration, not a run of one byte.
pub fn text(rng: &mut Rng, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "services",
        "enable",
        "true",
        "false",
        "networking",
        "firewall",
        "allowedTCPPorts",
        "users",
        "extraGroups",
        "wheel",
        "environment",
        "systemPackages",
        "pkgs",
        "with",
        "let",
        "in",
        "inherit",
        "config",
        "lib",
        "mkIf",
        "mkDefault",
        "=",
        ";",
        "{",
        "}",
    ];
    let mut out = Vec::with_capacity(len + 32);
    while out.len() < len {
        let w = WORDS[rng.below(WORDS.len() as u64) as usize];
        out.extend_from_slice(w.as_bytes());
        out.push(if rng.below(8) == 0 { b'\n' } else { b' ' });
        if rng.below(50) == 0 {
            out.extend_from_slice(format!("{} ", rng.next()).as_bytes());
        }
    }
    out.truncate(len);
    out
}

/// Runs `f` on every item with at most `workers` at a time; results in item order.
pub fn pool<T: Sync, R: Send>(items: &[T], workers: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..workers.max(1).min(items.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(item) = items.get(i) else {
                    break;
                };
                let r = f(item);
                *results[i].lock().unwrap() = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|m| m.into_inner().unwrap().expect("every item ran"))
        .collect()
}
