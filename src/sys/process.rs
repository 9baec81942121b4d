//! The one way bento runs another program: an argv vector (never a shell string), an
//! optional deadline after which the child's whole process group is killed, output streamed
//! line by line to a callback while stdout and stderr are captured, and one error shape that
//! names the argv, says how the child ended and keeps the tail of its stderr.
//!
//! ```no_run
//! use std::time::Duration;
//! use bento::sys::process::{Cmd, Stream};
//!
//! let out = Cmd::new("nix-store")
//!     .args(["--query", "--outputs", "/nix/store/…"])
//!     .timeout(Duration::from_secs(60))
//!     .run_streamed(|stream, line| {
//!         if stream == Stream::Stderr {
//!             tracing::info!("{line}");
//!         }
//!     })?;
//! println!("{}", out.stdout_text());
//! # Ok::<(), bento::sys::process::ProcessError>(())
//! ```

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How many lines of stderr an error carries unless the caller says otherwise.
pub const DEFAULT_TAIL_LINES: usize = 20;
/// After the child is gone, how long to wait for grandchildren still holding its pipes.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Which of the child's outputs a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A command to run: program, arguments, environment, stdin and a deadline.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
    stdin: Option<Vec<u8>>,
    timeout: Option<Duration>,
    tail_lines: usize,
}

/// What a command that exited successfully printed.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// Everything on stdout, byte for byte.
    pub stdout: Vec<u8>,
    /// Everything on stderr (lossily decoded; build logs).
    pub stderr: String,
}

impl Output {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// How a command that did not succeed ended.
#[derive(Debug)]
pub enum Ended {
    /// It could not be started (not on PATH, not executable …).
    Spawn(io::Error),
    /// It exited with a non-zero status.
    Exited(i32),
    /// It was killed by a signal (not by us).
    Signalled(i32),
    /// It ran past its deadline; its process group was killed.
    TimedOut(Duration),
    /// Talking to it failed (a pipe, waiting for it).
    Io(io::Error),
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Spawn(e) => write!(f, "could not start: {e}"),
            Ended::Exited(c) => write!(f, "exited with status {c}"),
            Ended::Signalled(s) => write!(f, "was killed by signal {s}"),
            Ended::TimedOut(d) => {
                write!(f, "timed out after {}", humantime::format_duration(*d))
            }
            Ended::Io(e) => write!(f, "failed: {e}"),
        }
    }
}

/// A command that did not succeed: what was run, how it ended, what it said.
#[derive(Debug, thiserror::Error)]
#[error("`{argv}` {ended}{}", tail_suffix(.stderr_tail))]
pub struct ProcessError {
    /// The argv, joined by spaces (for messages; never run through a shell).
    pub argv: String,
    pub ended: Ended,
    /// The last lines of stderr.
    pub stderr_tail: String,
    /// All of stderr.
    pub stderr: String,
    /// All of stdout.
    pub stdout: Vec<u8>,
}

fn tail_suffix(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!(":\n{tail}")
    }
}

impl ProcessError {
    /// The exit code, if the command ran and exited non-zero.
    pub fn exit_code(&self) -> Option<i32> {
        match self.ended {
            Ended::Exited(c) => Some(c),
            _ => None,
        }
    }

    pub fn timed_out(&self) -> bool {
        matches!(self.ended, Ended::TimedOut(_))
    }

    /// True when the program could not be started at all.
    pub fn not_started(&self) -> bool {
        matches!(self.ended, Ended::Spawn(_))
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            stdin: None,
            timeout: None,
            tail_lines: DEFAULT_TAIL_LINES,
        }
    }

    /// A command from an argv vector (`["systemctl", "reboot"]`); `None` when it is empty.
    pub fn from_argv<S: AsRef<OsStr>>(argv: &[S]) -> Option<Self> {
        let (program, args) = argv.split_first()?;
        Some(Self::new(program).args(args))
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Bytes fed to the child's stdin (otherwise stdin is /dev/null).
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    /// Kill the child (and everything in its process group) once this much time has passed.
    /// A command with a deadline runs in its own process group, so a terminal's Ctrl-C no
    /// longer reaches it directly; commands without one stay in ours.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// How many lines of stderr an error keeps.
    pub fn tail_lines(mut self, n: usize) -> Self {
        self.tail_lines = n;
        self
    }

    /// The argv as one string, for messages and logs.
    pub fn argv(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs to completion, capturing stdout and stderr.
    pub fn run(&self) -> Result<Output, ProcessError> {
        self.run_streamed(|_, _| {})
    }

    /// Runs to completion, calling `on_line` for every line of stdout and stderr as it
    /// arrives (without its newline), in arrival order, while capturing both.
    pub fn run_streamed(
        &self,
        mut on_line: impl FnMut(Stream, &str),
    ) -> Result<Output, ProcessError> {
        let argv = self.argv();
        tracing::debug!(%argv, timeout = ?self.timeout, "running");
        let fail = |ended: Ended, out: Output| ProcessError {
            argv: argv.clone(),
            ended,
            stderr_tail: tail(&out.stderr, self.tail_lines),
            stderr: out.stderr,
            stdout: out.stdout,
        };

        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        if self.timeout.is_some() {
            // Its own group, so the deadline kills whatever it started too.
            cmd.process_group(0);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| fail(Ended::Spawn(e), Output::default()))?;

        // Feed stdin from a thread so a child that writes before it reads cannot deadlock us.
        let feeder = match (self.stdin.clone(), child.stdin.take()) {
            (Some(bytes), Some(mut pipe)) => Some(std::thread::spawn(move || {
                // A child that exits without reading everything is not an error here.
                let _ = pipe.write_all(&bytes);
            })),
            _ => None,
        };

        let (tx, rx) = mpsc::channel::<(Stream, Vec<u8>)>();
        let readers = [
            child
                .stdout
                .take()
                .map(|p| spawn_reader(Stream::Stdout, p, tx.clone())),
            child
                .stderr
                .take()
                .map(|p| spawn_reader(Stream::Stderr, p, tx.clone())),
        ];
        drop(tx);

        let deadline = self.timeout.map(|t| Instant::now() + t);
        let mut out = Output::default();
        let mut take = |stream: Stream, bytes: Vec<u8>, out: &mut Output| {
            let text = String::from_utf8_lossy(&bytes);
            on_line(stream, text.trim_end_matches(['\n', '\r']));
            match stream {
                Stream::Stdout => out.stdout.extend_from_slice(&bytes),
                Stream::Stderr => out.stderr.push_str(&text),
            }
        };
        let mut timed_out = false;
        loop {
            let next = match deadline {
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
            };
            match next {
                Ok((stream, bytes)) => take(stream, bytes, &mut out),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    timed_out = true;
                    kill_group(&mut child);
                    break;
                }
            }
        }
        let status = child.wait();
        if timed_out {
            // Collect what is still buffered, but do not wait on a grandchild that left the
            // group and kept the pipes open.
            let grace = Instant::now() + DRAIN_GRACE;
            while let Ok((stream, bytes)) =
                rx.recv_timeout(grace.saturating_duration_since(Instant::now()))
            {
                take(stream, bytes, &mut out);
            }
        } else {
            for r in readers.into_iter().flatten() {
                let _ = r.join();
            }
        }
        if let Some(f) = feeder {
            if !timed_out {
                let _ = f.join();
            }
        }
        if timed_out {
            return Err(fail(Ended::TimedOut(self.timeout.unwrap_or_default()), out));
        }
        match status {
            Err(e) => Err(fail(Ended::Io(e), out)),
            Ok(s) if s.success() => Ok(out),
            Ok(s) => Err(fail(ended_of(s), out)),
        }
    }
}

fn ended_of(status: ExitStatus) -> Ended {
    match (status.code(), status.signal()) {
        (Some(c), _) => Ended::Exited(c),
        (None, Some(s)) => Ended::Signalled(s),
        (None, None) => Ended::Io(io::Error::other(status.to_string())),
    }
}

fn spawn_reader(
    stream: Stream,
    pipe: impl Read + Send + 'static,
    tx: mpsc::Sender<(Stream, Vec<u8>)>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        loop {
            let mut line = Vec::new();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if tx.send((stream, line)).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// Kills the child's process group (it leads its own, see `Cmd::timeout`), and the child
/// itself should the group be gone already.
fn kill_group(child: &mut Child) {
    use unix::sys::signal::{killpg, Signal};
    use unix::unistd::Pid;
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.kill();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_stdout_and_streams_lines_in_order() {
        let mut seen = Vec::new();
        let out = Cmd::new("sh")
            .args(["-c", "echo one; echo two >&2; printf three"])
            .run_streamed(|s, l| seen.push((s, l.to_owned())))
            .unwrap();
        assert_eq!(out.stdout, b"one\nthree");
        assert_eq!(out.stderr, "two\n");
        seen.sort_by_key(|(s, _)| *s == Stream::Stderr);
        assert_eq!(
            seen,
            [
                (Stream::Stdout, "one".to_owned()),
                (Stream::Stdout, "three".to_owned()),
                (Stream::Stderr, "two".to_owned()),
            ]
        );
    }

    #[test]
    fn failure_names_argv_status_and_stderr_tail() {
        let e = Cmd::new("sh")
            .args(["-c", "for i in 1 2 3 4; do echo line$i >&2; done; exit 3"])
            .tail_lines(2)
            .run()
            .unwrap_err();
        assert_eq!(e.exit_code(), Some(3));
        assert_eq!(
            e.to_string(),
            "`sh -c for i in 1 2 3 4; do echo line$i >&2; done; exit 3` exited with status 3:\nline3\nline4"
        );
        assert_eq!(e.stderr, "line1\nline2\nline3\nline4\n");
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let e = Cmd::new("/nonexistent/bento-nothing").run().unwrap_err();
        assert!(e.not_started());
        assert!(e
            .to_string()
            .starts_with("`/nonexistent/bento-nothing` could not start"));
    }

    #[test]
    fn stdin_is_fed_and_env_set() {
        let out = Cmd::new("sh")
            .args(["-c", "cat; echo \"$BENTO_X\""])
            .env("BENTO_X", "y")
            .stdin("hello\n")
            .run()
            .unwrap();
        assert_eq!(out.stdout_text(), "hello\ny\n");
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("late");
        let script = format!(
            "(sleep 2; touch {m}) & echo started; sleep 30",
            m = marker.display()
        );
        let start = Instant::now();
        let e = Cmd::new("sh")
            .args(["-c", &script])
            .timeout(Duration::from_millis(300))
            .run()
            .unwrap_err();
        assert!(e.timed_out(), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(e.stdout, b"started\n");
        assert!(e.to_string().contains("timed out after 300ms"), "{e}");
        // The background grandchild was in the group and died with it.
        std::thread::sleep(Duration::from_millis(2500));
        assert!(!marker.exists(), "grandchild survived the deadline");
    }

    #[test]
    fn signal_is_reported() {
        let e = Cmd::new("sh").args(["-c", "kill -9 $$"]).run().unwrap_err();
        assert!(matches!(e.ended, Ended::Signalled(9)), "{e}");
        assert!(e.to_string().contains("was killed by signal 9"));
    }
}
