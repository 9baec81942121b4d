//! Text that reaches a terminal. Anything a host wrote (heartbeats, reports, names of files
//! in its `logs/`, and error messages quoting any of them) goes through [`escape`] before it
//! is printed, so no host can move the cursor, recolour, clear or reorder what the operator
//! reads: control characters are shown as visible `\u{…}` escapes, never sent raw.

use std::borrow::Cow;

/// True for characters that change how a terminal shows the text around them instead of
/// being shown themselves: C0 controls (tab and newline included, so one value stays on
/// one line), DEL, C1 controls (`\u{9b}` is a one-byte CSI on some terminals), the Unicode
/// bidi embeddings, overrides, isolates and marks (which reorder what follows them), the
/// line and paragraph separators, zero-width characters and the byte-order mark.
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}'
                | '\u{feff}'
        )
}

/// `text` with every unsafe character (see [`is_unsafe`]) replaced by its escape, e.g. ESC
/// as `\u{1b}`. Text without any comes back borrowed.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if is_unsafe(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// At most `max` characters of `text`, with `…` in place of the rest: a host is not
/// trusted to be brief, and a message quoting it must stay one readable line.
pub fn truncate(text: &str, max: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => Cow::Borrowed(text),
        Some((at, _)) => Cow::Owned(format!("{}…", &text[..at])),
    }
}

/// At most `max` characters of `text`, its middle cut out (`…` in its place): an error
/// starts with what failed and often ends with how to fix it, and both must survive.
pub fn truncate_middle(text: &str, max: usize) -> Cow<'_, str> {
    let count = text.chars().count();
    if count <= max {
        return Cow::Borrowed(text);
    }
    let keep = max.saturating_sub(1);
    let head = keep / 2;
    let tail = keep - head;
    let start: String = text.chars().take(head).collect();
    let end: String = text.chars().skip(count - tail).collect();
    Cow::Owned(format!("{start}…{end}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_error_keeps_its_start_and_its_fix() {
        assert!(matches!(
            truncate_middle("short", 10),
            Cow::Borrowed("short")
        ));
        let text = format!(
            "build failed: {} (fix: run `bento flake-update`)",
            "x".repeat(300)
        );
        let cut = truncate_middle(&text, 200);
        assert_eq!(cut.chars().count(), 200);
        assert!(cut.starts_with("build failed: "), "{cut}");
        assert!(cut.ends_with("(fix: run `bento flake-update`)"), "{cut}");
        assert!(cut.contains('…'));
        // Characters, not bytes: never a split in the middle of one.
        let wide = "é".repeat(300);
        assert_eq!(truncate_middle(&wide, 9), "éééé…éééé");
    }

    #[test]
    fn controls_are_shown_never_sent() {
        assert!(matches!(escape("plain text: ok"), Cow::Borrowed(_)));
        assert_eq!(escape("a\x1b[2J\x1b[Hb"), "a\\u{1b}[2J\\u{1b}[Hb");
        assert_eq!(
            escape("tab\tnl\ncr\rdel\x7f"),
            "tab\\u{9}nl\\u{a}cr\\u{d}del\\u{7f}"
        );
        // C1: a single-byte CSI and the 8-bit OSC.
        assert_eq!(escape("x\u{9b}31m\u{9d}"), "x\\u{9b}31m\\u{9d}");
        // Bidi overrides and isolates reorder the rest of the line.
        assert_eq!(
            escape("up\u{202e}gniliaf\u{2066}\u{200f}"),
            "up\\u{202e}gniliaf\\u{2066}\\u{200f}"
        );
        assert_eq!(escape("é ü ✓ 日本"), "é ü ✓ 日本");
        for c in escape("\x00\x1b\u{85}\u{2028}\u{feff}\u{200b}").chars() {
            assert!(!is_unsafe(c), "{c:?}");
        }
    }

    #[test]
    fn truncation_counts_characters() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("ééééé", 3), "ééé…");
        assert_eq!(truncate("abc", 3), "abc");
    }
}
