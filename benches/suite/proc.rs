//! Running the tools under test: every child has a deadline (killed and reported past it),
//! its wall time is measured from spawn to exit, and its peak memory comes from the
//! kernel's own accounting (`wait4`'s `ru_maxrss`), not from sampling.
//!
//! The kernel counts into a new process's `ru_maxrss` the peak of the memory it was forked
//! from (at `exec`, the old image's high-water mark is kept), so a child spawned by this
//! suite, grown to tens of MiB by the scenarios before, would report at least the suite's
//! own peak. Each child is therefore started by a fresh, small copy of the suite
//! (`suite --measure`, [`measure_main`]), which spawns it, reaps it and writes what
//! `wait4` said of it alone.

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

/// The flag that makes the suite's binary [`measure_main`].
pub const MEASURE: &str = "--measure";

/// Runs `cmd` with `input` on stdin; panics if it cannot start or outlives `timeout`.
pub fn run(cmd: &mut Command, input: &[u8], timeout: Duration) -> Run {
    let start = Instant::now();
    let report = tempfile::NamedTempFile::new().expect("a file for the measurement");
    let mut measured = Command::new(std::env::current_exe().expect("the suite's own binary"));
    measured
        .arg(MEASURE)
        .arg(report.path())
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => measured.env(k, v),
            None => measured.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        measured.current_dir(dir);
    }
    let mut child = measured
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
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
    // The measuring copy's own status and usage are not the command's: it reports those.
    while child
        .try_wait()
        .expect("waiting for the measuring copy")
        .is_none()
    {
        if Instant::now() >= deadline {
            // The measured child dies with its measuring copy (PR_SET_PDEATHSIG).
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {timeout:?}: killed");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let _ = writer.join();
    let stdout = read_out.join().unwrap_or_default();
    let stderr = read_err.join().unwrap_or_default();
    let text = std::fs::read_to_string(report.path()).unwrap_or_default();
    let n: Vec<u64> = text
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let [raw, maxrss_kib, cpu_us, elapsed_ns] = n[..] else {
        panic!(
            "cannot run {cmd:?}: {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    };
    Run {
        status: ExitStatus::from_raw(raw as i32),
        elapsed: Duration::from_nanos(elapsed_ns),
        maxrss_kib,
        cpu: Duration::from_micros(cpu_us),
        stdout,
        stderr,
    }
}

/// `suite --measure REPORT PROGRAM ARG…`: runs PROGRAM with this process's stdio,
/// environment and directory, and writes to REPORT its raw wait status, peak resident set
/// (KiB), user + system CPU (µs) and wall time (ns), as [`run`] reads them. Called first
/// thing in `main`, while this copy is small: its own peak is the floor of the child's.
pub fn measure_main(args: &[std::ffi::OsString]) -> ! {
    use std::os::unix::process::CommandExt as _;
    let [report, program, rest @ ..] = args else {
        eprintln!("usage: suite {MEASURE} REPORT PROGRAM [ARG…]");
        std::process::exit(2);
    };
    let mut cmd = Command::new(program);
    cmd.args(rest);
    // SAFETY: prctl is async-signal-safe; the child does nothing else before exec.
    unsafe {
        cmd.pre_exec(|| {
            // Killed past its deadline, the measuring copy takes the child with it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot run {program:?}: {e}");
            std::process::exit(127);
        }
    };
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: wait4 on our own child's pid with valid out-pointers.
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = loop {
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut rusage) };
        if r != -1 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break r;
        }
    };
    let elapsed = start.elapsed();
    if r != pid {
        eprintln!("wait4 {program:?}: {}", std::io::Error::last_os_error());
        std::process::exit(127);
    }
    let cpu: Duration = [rusage.ru_utime, rusage.ru_stime]
        .iter()
        .map(|t| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64))
        .sum();
    let line = format!(
        "{} {} {} {}\n",
        status as u32,
        rusage.ru_maxrss,
        cpu.as_micros(),
        elapsed.as_nanos()
    );
    if let Err(e) = std::fs::write(report, line) {
        eprintln!("{}: {e}", std::path::Path::new(report).display());
        std::process::exit(127);
    }
    std::process::exit(0);
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
