//! Running the tools under test: every child has a deadline (killed and reported past it),
//! its wall time is measured from spawn to exit, and its peak memory comes from the
//! kernel's own accounting (`wait4`'s `ru_maxrss`), not from sampling.

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct Run {
    pub status: ExitStatus,
    pub elapsed: Duration,
    /// Peak resident set of the child (and its reaped descendants), KiB.
    pub maxrss_kib: u64,
    /// User + system CPU time of the child and its reaped descendants.
    pub cpu: Duration,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    /// For error messages.
    pub fn text(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.status.code(),
            String::from_utf8_lossy(&self.stdout),
            String::from_utf8_lossy(&self.stderr)
        )
    }
}

/// Runs `cmd` with `input` on stdin; panics if it cannot start or outlives `timeout`.
// The child is reaped by `wait4` (for its rusage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
pub fn run(cmd: &mut Command, input: &[u8], timeout: Duration) -> Run {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id() as libc::pid_t;
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let read_out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let read_err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let deadline = start + timeout;
    let (raw, rusage) = loop {
        let mut status: libc::c_int = 0;
        // SAFETY: wait4 on our own child's pid with valid out-pointers.
        let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut rusage) };
        if r == pid {
            break (status, rusage);
        }
        assert!(r == 0, "wait4 {cmd:?}: {}", std::io::Error::last_os_error());
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {timeout:?}: killed");
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    let elapsed = start.elapsed();
    let _ = writer.join();
    Run {
        status: ExitStatus::from_raw(raw),
        elapsed,
        maxrss_kib: rusage.ru_maxrss as u64,
        cpu: [rusage.ru_utime, rusage.ru_stime]
            .iter()
            .map(|t| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64))
            .sum(),
        stdout: read_out.join().unwrap_or_default(),
        stderr: read_err.join().unwrap_or_default(),
    }
}

/// Runs `cmd` and panics unless it exits 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Run {
    let r = run(cmd, b"", timeout);
    assert!(r.status.success(), "{cmd:?} failed: {}", r.text());
    r
}

/// `du` of `path` in bytes: allocated blocks, or apparent sizes.
pub fn du(path: &std::path::Path, apparent: bool) -> u64 {
    let mut cmd = Command::new("du");
    cmd.args(["-s", "-B1"]);
    if apparent {
        cmd.arg("--apparent-size");
    }
    let r = run_ok(cmd.arg(path), Duration::from_secs(600));
    String::from_utf8_lossy(&r.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("du {}: {}", path.display(), r.text()))
}
