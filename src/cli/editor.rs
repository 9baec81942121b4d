//! Running the admin's editor on a decrypted secret (`bento secret edit`) so that no signal
//! can end bento while the plaintext is on disk: SIGINT, SIGQUIT, SIGHUP and SIGTERM are
//! blocked in bento (before any thread starts, so every thread inherits it) and taken one
//! by one with `sigwait` while the editor runs; the editor starts with the default mask
//! (std resets it in the child). Invariant: bento outlives its editor and removes the
//! plaintext whatever signal arrives; a hang-up or termination writes nothing.

use std::path::Path;

use unix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use unix::unistd::Pid;

use crate::server::secrets::SecretsError;

/// The signals bento takes over while the plaintext exists, and SIGCHLD to notice the
/// editor's end in the same `sigwait`.
fn shielded() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGTERM,
        Signal::SIGCHLD,
    ] {
        set.add(s);
    }
    set
}

/// Blocks the shielded signals for as long as it lives; restores the previous mask on drop.
pub struct Shield {
    previous: Option<SigSet>,
}

impl Shield {
    /// Blocks the signals in this thread, and so in every thread it starts from now on.
    pub fn raise() -> Self {
        let previous = shielded().thread_swap_mask(SigmaskHow::SIG_BLOCK).ok();
        // The process holds plaintext from now on: no core dump and no ptrace by others of
        // the same uid (PR_SET_DUMPABLE 0), so it cannot leak through either.
        if let Err(e) = unix::sys::prctl::set_dumpable(false) {
            tracing::warn!("cannot make bento non-dumpable: {e}");
        }
        Self { previous }
    }
}

impl Drop for Shield {
    fn drop(&mut self) {
        if let Some(previous) = self.previous.take() {
            let _ = previous.thread_set_mask();
        }
    }
}

/// Runs `$VISUAL`, else `$EDITOR`, else `vi` on `file` (the variable may carry arguments)
/// and waits for it. SIGINT and SIGQUIT are the editor's (the terminal sends them to it
/// too, and an editor uses them); SIGHUP and SIGTERM are passed on to it, and once it has
/// ended the edit is refused, so the caller writes nothing and removes the plaintext.
/// Expects a [`Shield`] to be up.
pub fn run_editor(file: &Path) -> Result<(), SecretsError> {
    let command = std::env::var("VISUAL")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .or_else(|| {
            std::env::var("EDITOR")
                .ok()
                .filter(|v| !v.trim().is_empty())
        })
        .unwrap_or_else(|| "vi".into());
    let editor_err = |message: String| SecretsError::Editor {
        command: command.clone(),
        message,
    };
    let mut words = command.split_whitespace();
    let program = words.next().unwrap_or("vi");
    let mut child = std::process::Command::new(program)
        .args(words)
        .arg(file)
        .spawn()
        .map_err(|e| editor_err(e.to_string()))?;
    let pid = Pid::from_raw(child.id() as i32);
    let set = shielded();
    let mut ended_by: Option<Signal> = None;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(editor_err(e.to_string())),
        }
        // SIGCHLD stays pending while blocked, so an editor that ends between the look
        // above and this wait still wakes it.
        match set.wait() {
            Ok(sig @ (Signal::SIGHUP | Signal::SIGTERM)) => {
                ended_by.get_or_insert(sig);
                let _ = kill(pid, sig);
            }
            Ok(_) => {}
            Err(e) => return Err(editor_err(format!("waiting for it: {e}"))),
        }
    };
    if let Some(sig) = ended_by {
        return Err(editor_err(format!(
            "bento received {sig} while it ran; nothing was written"
        )));
    }
    if !status.success() {
        return Err(editor_err(format!(
            "exited with {status}; nothing was written"
        )));
    }
    Ok(())
}
