//! How deeply JSON text nests, measured in one pass without recursion.
//!
//! The frame parser keeps `data` as a `RawValue`, and serde_json skips a raw value without
//! counting levels (its 128-level limit applies only to typed parsing), so `data` of any depth
//! would pass untouched, be stored and fanned out, and crash consumers whose JSON decoder
//! recurses. Every ingress checks `data` with [`check_depth`] before publishing.

use std::fmt;

/// `data` nests deeper than the configured limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooDeep {
    /// The limit that was exceeded.
    pub limit: usize,
}

impl fmt::Display for TooDeep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nests arrays and objects deeper than {} levels", self.limit)
    }
}

impl std::error::Error for TooDeep {}

/// The nesting depth of `json`: 0 for a scalar, 1 for `[]`, `{}` or `[1,2]`, 2 for `[[]]` or
/// `{"a":{}}`. Brackets inside strings (escapes included) do not count. The text is assumed
/// to be valid JSON; on anything else the count is still bounded by the input length.
pub fn nesting_depth(json: &[u8]) -> usize {
    let mut deepest = 0;
    scan(json, |depth| {
        deepest = deepest.max(depth);
        true
    });
    deepest
}

/// `Ok` when `json` nests at most `max` levels (see [`nesting_depth`]); stops reading at the
/// first level beyond it.
pub fn check_depth(json: &[u8], max: usize) -> Result<(), TooDeep> {
    if scan(json, |depth| depth <= max) { Ok(()) } else { Err(TooDeep { limit: max }) }
}

/// Walks `json`, calling `open(depth)` at every `[` or `{` outside a string with the depth it
/// opens; stops and returns `false` as soon as `open` does.
fn scan(json: &[u8], mut open: impl FnMut(usize) -> bool) -> bool {
    let mut depth = 0usize;
    let mut bytes = json.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'[' | b'{' => {
                depth += 1;
                if !open(depth) {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'"' => {
                // Skip the string: a backslash escapes the next byte (`\"`, `\\`); every other
                // escape (`\u1234`, `\n`) holds no quote or backslash after its first byte.
                while let Some(&s) = bytes.next() {
                    match s {
                        b'"' => break,
                        b'\\' => {
                            bytes.next();
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        "[".repeat(depth) + &"]".repeat(depth)
    }

    #[test]
    fn scalars_and_containers() {
        for (json, depth) in [
            ("1", 0),
            ("\"x\"", 0),
            ("null", 0),
            ("[]", 1),
            ("{}", 1),
            ("[1,2,3]", 1),
            ("[[]]", 2),
            (r#"{"a":{"b":[1]}}"#, 3),
            (r#"[[1],[2,[3]],4]"#, 3),
            (" [ [ ] ] ", 2),
        ] {
            assert_eq!(nesting_depth(json.as_bytes()), depth, "{json}");
        }
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        assert_eq!(nesting_depth(br#"["[[[{{{"]"#), 1);
        assert_eq!(nesting_depth(br#"{"[[[":"]]]}}}"}"#), 1);
        // An escaped quote does not end the string; an escaped backslash before a quote does.
        assert_eq!(nesting_depth(br#"["\"[[[["]"#), 1);
        assert_eq!(nesting_depth(br#"["\\",[[]]]"#), 3);
        assert_eq!(nesting_depth(br#"["\\\"[",["\u005b"]]"#), 2);
        assert_eq!(nesting_depth("[\"\u{65e5}[\",{}]".as_bytes()), 2);
    }

    #[test]
    fn check_depth_is_inclusive() {
        let json = nested(64);
        assert_eq!(check_depth(json.as_bytes(), 64), Ok(()));
        assert_eq!(check_depth(json.as_bytes(), 63), Err(TooDeep { limit: 63 }));
        assert_eq!(check_depth(nested(65).as_bytes(), 64), Err(TooDeep { limit: 64 }));
        assert_eq!(check_depth(b"5", 0), Ok(()));
        assert_eq!(check_depth(b"[5]", 0), Err(TooDeep { limit: 0 }));
    }

    #[test]
    fn very_deep_input_needs_no_stack() {
        // Runs on the test thread's stack: a recursive scanner would overflow here.
        let json = nested(1_000_000);
        assert_eq!(nesting_depth(json.as_bytes()), 1_000_000);
        assert!(check_depth(json.as_bytes(), 64).is_err());
        let wide = "[".to_string() + &vec!["[1]"; 10_000].join(",") + "]";
        assert_eq!(nesting_depth(wide.as_bytes()), 2);
    }

    #[test]
    fn unbalanced_input_does_not_underflow() {
        assert_eq!(nesting_depth(b"]]][["), 2);
        assert_eq!(nesting_depth(b"[\"unterminated"), 1);
    }
}
