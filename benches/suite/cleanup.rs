//! Everything the suite creates outside its own memory (accounts, an sshd, directories under
//! /var/lib/bento-bench) is registered here the moment it exists, and undone in reverse
//! order: by the owner's `Drop` on success or panic, or by the signal thread on Ctrl-C,
//! SIGTERM or SIGHUP. So an interrupted run leaves no accounts behind.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

type Action = Box<dyn FnOnce() + Send>;

static ACTIONS: Mutex<Vec<(u64, &'static str, Action)>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(1);

/// Undoes its action when dropped (unless the signal thread did it already).
pub struct Guard(u64);

/// Registers `action` (named for messages); it runs exactly once.
pub fn register(what: &'static str, action: impl FnOnce() + Send + 'static) -> Guard {
    let id = NEXT.fetch_add(1, Ordering::SeqCst);
    ACTIONS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((id, what, Box::new(action)));
    Guard(id)
}

impl Drop for Guard {
    fn drop(&mut self) {
        let action = {
            let mut list = ACTIONS.lock().unwrap_or_else(|e| e.into_inner());
            list.iter()
                .position(|(id, _, _)| *id == self.0)
                .map(|i| list.remove(i))
        };
        if let Some((_, _, action)) = action {
            action();
        }
    }
}

/// Runs every registered action, newest first.
pub fn run_all() {
    loop {
        let next = ACTIONS.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let Some((_, what, action)) = next else {
            break;
        };
        eprintln!("cleanup: {what}");
        action();
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and so in every thread spawned after
/// it) and starts a thread that waits for them, cleans up and exits 130. Must be called
/// before any other thread starts. Child processes start with an empty mask (std resets
/// it), so they still see the signals themselves.
pub fn install_signal_thread() {
    // SAFETY: plain libc calls on a local, initialised sigset_t.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is a valid signal set; sigwait writes the signal number.
        unsafe { libc::sigwait(&set, &mut sig) };
        eprintln!("\nsignal {sig}: cleaning up before exiting");
        run_all();
        std::process::exit(130);
    });
}
