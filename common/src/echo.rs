//! Echoing what a peer sent: never in full. Errors and journal records quote inputs, and an input
//! of megabytes must not become a record of megabytes.

use std::borrow::Cow;

/// Longest quotation of an input in an error.
pub const MAX_ECHO_CHARS: usize = 200;
/// Longest error text an agent returns or journals.
pub const MAX_ERROR_CHARS: usize = 4096;

/// `text` cut to at most `max` characters, saying how much was left out.
pub fn truncate(text: &str, max: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => Cow::Borrowed(text),
        Some((cut, _)) => Cow::Owned(format!(
            "{}… ({} more bytes)",
            &text[..cut],
            text.len() - cut
        )),
    }
}

/// An input quoted for an error message.
pub fn quote(text: &str) -> Cow<'_, str> {
    truncate(text, MAX_ECHO_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_on_character_boundaries_and_says_so() {
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("abcd", 3), "abc… (1 more bytes)");
        assert_eq!(truncate("ääää", 2), "ää… (4 more bytes)");
        let big = "x".repeat(10 << 20);
        assert!(quote(&big).len() < MAX_ECHO_CHARS + 40);
    }
}
