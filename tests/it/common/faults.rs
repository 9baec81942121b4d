//! Fault-injection helpers: the suite's fault counter (printed when the test binary exits),
//! a size-limited tmpfs that is unmounted on drop, killing sshd's per-connection processes,
//! and polling with a deadline.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

static INJECTED: AtomicUsize = AtomicUsize::new(0);
static CONVERGED: AtomicUsize = AtomicUsize::new(0);
static REPORT_AT_EXIT: Once = Once::new();

extern "C" fn print_totals() {
    let line = format!(
        "faults: {} injected, {} converged\n",
        INJECTED.load(Ordering::SeqCst),
        CONVERGED.load(Ordering::SeqCst)
    );
    // After main returned std's stdout may be gone; write(2) is always safe here.
    // SAFETY: writing a valid buffer to fd 1.
    unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
}

/// Counts one injected fault and whether the runs after it converged. The totals are
/// printed once, when the test binary exits (`faults: N injected, M converged`).
pub fn record(converged: bool) {
    REPORT_AT_EXIT.call_once(|| {
        // SAFETY: registering a plain extern "C" function with no captured state.
        unsafe { libc::atexit(print_totals) };
    });
    INJECTED.fetch_add(1, Ordering::SeqCst);
    if converged {
        CONVERGED.fetch_add(1, Ordering::SeqCst);
    }
}

/// A tmpfs of a fixed size mounted on a directory (a small disk that can fill up).
/// Unmounted on drop, lazily if something still holds it.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(dir: &Path, bytes: u64) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes},mode=0700"))
            .arg("tmpfs")
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount tmpfs on {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir: dir.to_owned(),
        }
    }

    /// Fills the file system up: writes `filler` until ENOSPC, leaving `spare` bytes free
    /// at most (the filler is shrunk back to leave them).
    pub fn fill(&self, spare: u64) -> PathBuf {
        use std::io::Write as _;
        let filler = self.dir.join("filler");
        let mut f = fs::File::create(&filler).unwrap();
        let chunk = vec![0xa5u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n as u64,
            }
        }
        let _ = f.flush();
        f.set_len(written.saturating_sub(spare)).unwrap();
        filler
    }

    /// Frees what `fill` took.
    pub fn unfill(&self) {
        let _ = fs::remove_file(self.dir.join("filler"));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Polls `f` until it holds or `timeout` passes (never a bare sleep).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid …; comm may hold spaces, so split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every process below `ancestor` (children, grandchildren, …).
pub fn descendants(ancestor: u32) -> Vec<u32> {
    let all: Vec<u32> = fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let mut found = vec![ancestor];
    let mut grew = true;
    while grew {
        grew = false;
        for &p in &all {
            if !found.contains(&p) && parent_of(p).is_some_and(|pp| found.contains(&pp)) {
                found.push(p);
                grew = true;
            }
        }
    }
    found.remove(0);
    found
}

/// The pid of the listening sshd started with `-f config` (the harness's). sshd rewrites
/// its process title ("sshd: /usr/sbin/sshd -D -e -f … [listener] …"), so the command
/// line is matched as text.
pub fn sshd_listener(config: &Path) -> Option<u32> {
    let want = config.display().to_string();
    let matches = |pid: u32| {
        fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            let line = String::from_utf8_lossy(&c).replace('\0', " ");
            line.contains("sshd") && line.contains(" -D") && line.contains(&want)
        })
    };
    fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| matches(pid) && !parent_of(pid).is_some_and(matches))
}

/// SIGKILLs every per-connection process of the sshd started with `config` (the sessions
/// serving SFTP die mid-transfer; the listener stays, as after a crash of one session).
/// Returns how many processes were killed.
pub fn kill_sshd_sessions(config: &Path) -> usize {
    let Some(listener) = sshd_listener(config) else {
        return 0;
    };
    let pids = descendants(listener);
    for &p in &pids {
        // SAFETY: kill(2) on a process below the sshd this test started.
        unsafe { libc::kill(p as libc::pid_t, libc::SIGKILL) };
    }
    pids.len()
}
