//! Results go to stdout (plain lines or `--json`); progress and notes go to stderr, and
//! progress bars only when stderr is a terminal.

#![allow(clippy::print_stdout)]

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

static QUIET: AtomicBool = AtomicBool::new(false);

/// `-q`: notes and progress are not shown (results and errors still are).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Whether to colour output going to a stream that `is_terminal` or not: never when
/// `NO_COLOR` is set to anything non-empty (https://no-color.org), else only on a terminal.
pub fn color_on(is_terminal: bool) -> bool {
    is_terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Whether progress (bars, spinners) is drawn: on a terminal, unless `-q`.
pub fn shows_progress() -> bool {
    !quiet() && std::io::stderr().is_terminal()
}

/// Prints one line of results.
pub fn line(text: &str) {
    println!("{text}");
}

static JSON_PRINTED: AtomicBool = AtomicBool::new(false);

/// Whether this process printed a JSON document already (so an error after it does not
/// print a second one).
pub fn json_printed() -> bool {
    JSON_PRINTED.load(Ordering::Relaxed)
}

/// Prints a value as pretty JSON.
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    JSON_PRINTED.store(true, Ordering::Relaxed);
    println!("{text}");
    Ok(())
}

/// Elements serialised together by one thread in [`json_list`].
const JSON_PART: usize = 256;

/// Prints a list as pretty JSON, byte for byte as [`json`] does, with its elements
/// serialised in parallel, a few parts at a time (a 10,000-host `bento status --json` is
/// 10 MB of it: neither its time nor its size adds to the command's).
pub fn json_list<T: Serialize + Sync>(items: &[T]) -> anyhow::Result<()> {
    if items.is_empty() {
        return json(&items);
    }
    JSON_PRINTED.store(true, Ordering::Relaxed);
    write_json_list(items, std::io::stdout().lock())
}

/// [`json_list`] into `out`.
fn write_json_list<T: Serialize + Sync>(
    items: &[T],
    out: impl std::io::Write,
) -> anyhow::Result<()> {
    use rayon::prelude::*;
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(out);
    if items.is_empty() {
        out.write_all(b"[]\n")?;
        out.flush()?;
        return Ok(());
    }
    let wave = JSON_PART * rayon::current_num_threads().max(1) * 2;
    out.write_all(b"[")?;
    for (w, items) in items.chunks(wave).enumerate() {
        let parts = items
            .par_chunks(JSON_PART)
            .map(serde_json::to_vec_pretty)
            .collect::<Result<Vec<Vec<u8>>, _>>()?;
        // A part printed as an array is `[`, its elements one level deep, then `\n]`: the
        // elements are the same bytes as in the whole list's array, which joins them with `,`.
        for (i, part) in parts.iter().enumerate() {
            if w > 0 || i > 0 {
                out.write_all(b",")?;
            }
            out.write_all(&part[1..part.len() - 2])?;
        }
    }
    out.write_all(b"\n]\n")?;
    out.flush()?;
    Ok(())
}

/// A note for the person at the terminal (stderr, never mixed with results).
pub fn note(text: &str) {
    if quiet() {
        return;
    }
    eprintln!("note: {text}");
}

/// A warning: something went through that the person should fix (stderr; shown with `-q`
/// too, like errors).
pub fn warning(text: &str) {
    eprintln!("warning: {text}");
}

/// A progress bar on stderr when it is a terminal, hidden otherwise.
pub fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    if !shows_progress() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_owned());
    bar
}

/// Human-readable byte counts (1.5 KiB, 3.2 MiB).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_list_printed_in_parts_is_the_same_bytes_as_printed_whole() {
        let item = |i: usize| {
            serde_json::json!({
                "host": format!("h{i}"),
                "error": i.is_multiple_of(3).then(|| format!("line one\nline \"two\" {i}")),
                "tags": (0..i % 4).map(|t| format!("t{t}")).collect::<Vec<_>>(),
                "nested": {"empty": {}, "list": [[], [i]]},
            })
        };
        for n in [0, 1, 2, super::JSON_PART, super::JSON_PART + 1, 5000] {
            let items: Vec<_> = (0..n).map(item).collect();
            let mut out = Vec::new();
            super::write_json_list(&items, &mut out).unwrap();
            let whole = serde_json::to_string_pretty(&items).unwrap() + "\n";
            assert_eq!(String::from_utf8(out).unwrap(), whole, "{n} items");
        }
    }

    #[test]
    fn byte_units() {
        assert_eq!(super::bytes(0), "0 B");
        assert_eq!(super::bytes(1023), "1023 B");
        assert_eq!(super::bytes(1536), "1.5 KiB");
        assert_eq!(super::bytes(5 * 1024 * 1024), "5.0 MiB");
    }
}
