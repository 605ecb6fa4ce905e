//! Splitting text into chunks, the units that BPE never merges across.
//!
//! The chunks are the matches of a regex pattern. For nanochat's pattern (GPT-4's, with numbers in runs of at most
//! two digits) and GPT-4's own, a hand-written splitter finds exactly the matches that fancy-regex finds, about ten
//! times faster: splitting dominates training time, and fancy-regex has to backtrack for the possessive
//! quantifiers and the `(?!\S)` look-ahead. Any other pattern goes through fancy-regex. The tests compare the two on
//! many random strings and check the character classes against the regex engine over every code point.

use std::sync::OnceLock;

use fancy_regex::Regex;
use regex_syntax::hir::{Class, HirKind};

use crate::Error;

/// nanochat's split pattern: GPT-4's, except numbers split into runs of at most 2 digits (GPT-4: 3).
pub const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
/// GPT-4's split pattern (cl100k_base), the default of rustbpe 0.1.0.
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// Splits text into chunks: by hand for the two known patterns, with fancy-regex for any other.
#[derive(Debug, Clone)]
pub enum Splitter {
    /// The GPT-4 style pattern, numbers in runs of at most `max_digits`.
    Gpt4Style {
        max_digits: usize,
    },
    Regex(Regex),
}

impl Default for Splitter {
    /// The splitter for DEFAULT_PATTERN.
    fn default() -> Self {
        Self::Gpt4Style { max_digits: 2 }
    }
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Self, Error> {
        match pattern {
            DEFAULT_PATTERN => Ok(Self::Gpt4Style { max_digits: 2 }),
            GPT4_PATTERN => Ok(Self::Gpt4Style { max_digits: 3 }),
            _ => Regex::new(pattern)
                .map(Self::Regex)
                .map_err(|e| Error::InvalidPattern(format!("{pattern:?}: {e}"))),
        }
    }

    /// Calls `f` on each chunk of `text`, in order. Fails only if fancy-regex gives up on a match (its backtrack
    /// limit), which the hand-written splitter never does.
    pub fn for_each_chunk(&self, text: &str, mut f: impl FnMut(&[u8])) -> Result<(), Error> {
        match self {
            Self::Gpt4Style { max_digits } => {
                let classes = classes();
                let bytes = text.as_bytes();
                let mut start = 0;
                while start < bytes.len() {
                    let end = gpt4_chunk_end(classes, bytes, start, *max_digits);
                    f(&bytes[start..end]);
                    start = end;
                }
                Ok(())
            }
            Self::Regex(regex) => {
                for found in regex.find_iter(text) {
                    let found = found.map_err(|e| Error::Split(e.to_string()))?;
                    f(found.as_str().as_bytes());
                }
                Ok(())
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------------------------
// Character classes, taken from regex-syntax (the parser behind fancy-regex) so they agree with the regex exactly:
// one byte of flags per code point, 1.1 MB in all, built once.

const LETTER: u8 = 1 << 0; // \p{L}
const NUMBER: u8 = 1 << 1; // \p{N}
const SPACE: u8 = 1 << 2; // \s
const SDMT: u8 = 1 << 3; // (?i:[sdmt]), the one-letter contraction suffixes
const CASE_L: u8 = 1 << 4; // (?i:l), and so on for the two-letter suffixes ll, ve, re
const CASE_V: u8 = 1 << 5;
const CASE_E: u8 = 1 << 6;
const CASE_R: u8 = 1 << 7;

struct Classes {
    flags: Box<[u8]>,
}

fn classes() -> &'static Classes {
    static CLASSES: OnceLock<Classes> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let mut flags = vec![0u8; 0x11_0000].into_boxed_slice();
        let sources = [
            (r"\p{L}", LETTER),
            (r"\p{N}", NUMBER),
            (r"\s", SPACE),
            ("(?i:[sdmt])", SDMT),
            ("(?i:l)", CASE_L),
            ("(?i:v)", CASE_V),
            ("(?i:e)", CASE_E),
            ("(?i:r)", CASE_R),
        ];
        for (pattern, flag) in sources {
            for (lo, hi) in class_ranges(pattern) {
                for flags_of_char in &mut flags[lo as usize..=hi as usize] {
                    *flags_of_char |= flag;
                }
            }
        }
        Classes { flags }
    })
}

/// The code point ranges of a one-character class pattern, as regex-syntax understands it.
fn class_ranges(pattern: &str) -> Vec<(u32, u32)> {
    // These patterns are constants of this module, so a failure here is a bug, not bad input.
    let hir = regex_syntax::Parser::new()
        .parse(pattern)
        .expect("built-in class pattern parses");
    match hir.kind() {
        HirKind::Class(Class::Unicode(class)) => class
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        HirKind::Literal(literal) => {
            let c = std::str::from_utf8(&literal.0)
                .ok()
                .and_then(|s| s.chars().next())
                .expect("built-in literal is one character");
            vec![(c as u32, c as u32)]
        }
        other => unreachable!("built-in class pattern {pattern} parsed to {other:?}"),
    }
}

/// The code point starting at byte `i` of valid UTF-8 and its length in bytes.
#[inline(always)]
fn decode(bytes: &[u8], i: usize) -> (u32, usize) {
    let b0 = bytes[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (bytes[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        let c = ((b0 & 0x0F) << 12)
            | ((bytes[i + 1] as u32 & 0x3F) << 6)
            | (bytes[i + 2] as u32 & 0x3F);
        (c, 3)
    } else {
        let c = ((b0 & 0x07) << 18)
            | ((bytes[i + 1] as u32 & 0x3F) << 12)
            | ((bytes[i + 2] as u32 & 0x3F) << 6)
            | (bytes[i + 3] as u32 & 0x3F);
        (c, 4)
    }
}

impl Classes {
    /// The flags and byte length of the character at `i`; at the end of the text, no flags and length 0.
    #[inline(always)]
    fn at(&self, bytes: &[u8], i: usize) -> (u8, usize, u32) {
        if i >= bytes.len() {
            return (0, 0, u32::MAX);
        }
        let (c, len) = decode(bytes, i);
        (self.flags[c as usize], len, c)
    }

    /// End of the run of characters having `flag` that starts at `i`.
    #[inline(always)]
    fn run_end(&self, bytes: &[u8], mut i: usize, flag: u8) -> usize {
        while i < bytes.len() {
            let (flags, len, _) = self.at(bytes, i);
            if flags & flag == 0 {
                break;
            }
            i += len;
        }
        i
    }

    /// End of the run of "other" characters (not \s, \p{L} or \p{N}) that starts at `i`.
    #[inline(always)]
    fn other_run_end(&self, bytes: &[u8], mut i: usize) -> usize {
        while i < bytes.len() {
            let (flags, len, _) = self.at(bytes, i);
            if flags & (LETTER | NUMBER | SPACE) != 0 {
                break;
            }
            i += len;
        }
        i
    }
}

#[inline(always)]
fn is_newline(c: u32) -> bool {
    c == '\r' as u32 || c == '\n' as u32
}

#[inline(always)]
fn is_other(flags: u8) -> bool {
    flags & (LETTER | NUMBER | SPACE) == 0
}

/// End of the chunk that starts at `start`: the first alternative of the pattern that matches there, tried in
/// the pattern's order, as a backtracking regex engine does. Every position matches some alternative, so chunks
/// tile the text.
#[inline(always)]
fn gpt4_chunk_end(classes: &Classes, bytes: &[u8], start: usize, max_digits: usize) -> usize {
    let (flags0, len0, c0) = classes.at(bytes, start);
    let i1 = start + len0;
    let (flags1, len1, _) = classes.at(bytes, i1);

    // '(?i:[sdmt]|ll|ve|re)
    if c0 == '\'' as u32 {
        if flags1 & SDMT != 0 {
            return i1 + len1;
        }
        if flags1 & (CASE_L | CASE_V | CASE_R) != 0 {
            let (flags2, len2, _) = classes.at(bytes, i1 + len1);
            let suffix = (flags1 & CASE_L != 0 && flags2 & CASE_L != 0)
                || (flags1 & (CASE_V | CASE_R) != 0 && flags2 & CASE_E != 0);
            if suffix {
                return i1 + len1 + len2;
            }
        }
    }

    // [^\r\n\p{L}\p{N}]?+\p{L}+  (the optional character is possessive: once taken, a letter must follow it)
    if flags0 & LETTER != 0 {
        return classes.run_end(bytes, i1, LETTER);
    }
    if !is_newline(c0) && flags0 & NUMBER == 0 && flags1 & LETTER != 0 {
        return classes.run_end(bytes, i1 + len1, LETTER);
    }

    // \p{N}{1,max_digits}
    if flags0 & NUMBER != 0 {
        let mut end = i1;
        for _ in 1..max_digits {
            let (flags, len, _) = classes.at(bytes, end);
            if flags & NUMBER == 0 {
                break;
            }
            end += len;
        }
        return end;
    }

    // ` ?[^\s\p{L}\p{N}]++[\r\n]*`  (the space is optional but not possessive: without "other" after it, the
    // alternative fails as a whole, since the space itself is \s)
    let others_start = if c0 == ' ' as u32 && is_other(flags1) && len1 > 0 {
        Some(i1)
    } else if is_other(flags0) {
        Some(start)
    } else {
        None
    };
    if let Some(i) = others_start {
        let mut end = classes.other_run_end(bytes, i);
        while end < bytes.len() && (bytes[end] == b'\r' || bytes[end] == b'\n') {
            end += 1;
        }
        return end;
    }

    // Here the first character is whitespace. Within the run of whitespace that starts here:
    //   \s*[\r\n]   matches through the run's last newline, if it has one;
    //   \s+(?!\S)   matches the whole run at the end of the text, else the run but its last character;
    //   \s+         matches the whole run (one character before a non-space).
    let mut end = start;
    let mut last_start = start;
    let mut after_last_newline = None;
    while end < bytes.len() {
        let (flags, len, c) = classes.at(bytes, end);
        if flags & SPACE == 0 {
            break;
        }
        if is_newline(c) {
            after_last_newline = Some(end + len);
        }
        last_start = end;
        end += len;
    }
    if let Some(newline_end) = after_last_newline {
        newline_end
    } else if end == bytes.len() || last_start == start {
        end
    } else {
        last_start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    fn chunks_of(splitter: &Splitter, text: &str) -> Vec<String> {
        let mut chunks = Vec::new();
        splitter
            .for_each_chunk(text, |c| {
                chunks.push(String::from_utf8(c.to_vec()).unwrap())
            })
            .unwrap();
        chunks
    }

    /// Both known patterns, each split by hand and by fancy-regex (compiled once: compiling dominates otherwise).
    fn splitter_pairs() -> &'static [(Splitter, Splitter)] {
        static PAIRS: OnceLock<Vec<(Splitter, Splitter)>> = OnceLock::new();
        PAIRS.get_or_init(|| {
            [DEFAULT_PATTERN, GPT4_PATTERN]
                .into_iter()
                .map(|pattern| {
                    let by_hand = Splitter::new(pattern).unwrap();
                    assert!(matches!(by_hand, Splitter::Gpt4Style { .. }));
                    (by_hand, Splitter::Regex(Regex::new(pattern).unwrap()))
                })
                .collect()
        })
    }

    fn assert_same_as_regex(text: &str) {
        for (by_hand, by_regex) in splitter_pairs() {
            assert_eq!(
                chunks_of(by_hand, text),
                chunks_of(by_regex, text),
                "text {text:?}"
            );
        }
    }

    #[test]
    fn known_patterns_use_the_hand_written_splitter_and_others_the_regex() {
        assert!(matches!(
            Splitter::new(DEFAULT_PATTERN),
            Ok(Splitter::Gpt4Style { max_digits: 2 })
        ));
        assert!(matches!(
            Splitter::new(GPT4_PATTERN),
            Ok(Splitter::Gpt4Style { max_digits: 3 })
        ));
        assert!(matches!(Splitter::new(r"\w+|\s+"), Ok(Splitter::Regex(_))));
        assert!(matches!(
            Splitter::new(r"(unclosed"),
            Err(Error::InvalidPattern(_))
        ));
    }

    #[test]
    fn splits_like_the_regex_on_examples() {
        let examples = [
            "",
            "Hello world",
            "Hello, world! How's it going? I'm fine, we'll see; they've gone, you're right.",
            "IT'S WE'LL THEY'VE YOU'RE I'D I'M 'sam 'lla 'l 'v 've' 're'",
            "numbers 1 12 123 1234 12345 3.14159 1,000,000 ²³ ½ Ⅻ ٣٤٥ 𝟏𝟐𝟑",
            "line one\nline two\r\nline three\n\n\nafter blank lines  \n  indented\n",
            "trailing spaces   ",
            "   leading spaces",
            "tabs\tand\t\tmore\ttabs \t mixed",
            "  \n  \n   x",
            "a  b   c    d",
            " 123 ",
            "$x (y) [z] {w} 'q' \"quoted\" ...ellipsis!!! ?!?",
            "((nested)) --dash-- ==equals== \n\n",
            "x = {'key': [1, 2, 3]}\r\n\r\n",
            "naïve café résumé Ærøskøbing Straße ſtraße",
            "Привет мир, Γειά σου κόσμε, 你好世界, こんにちは, 안녕하세요",
            "emoji 😀 and 👍🏽 and 🇩🇪 flags",
            "combining e\u{301} marks a\u{308}\u{304}",
            "nbsp\u{a0}here\u{3000}ideographic\u{2028}line\u{85}nel\u{200b}zwsp\u{feff}bom",
            "'",
            "''",
            "'s",
            "\r",
            "\n",
            " ",
            "  ",
            " \n",
            "\n ",
            "a\r\n",
            "!\r\n\r\nx",
            " !\n",
            " a",
            " 1",
            "\t1",
            "\ta",
            "\u{a0}a",
            ".hello",
            "'hello",
            "\u{17f}",
            "'\u{17f}",
            "'\u{212a}",
        ];
        for text in examples {
            assert_same_as_regex(text);
        }
    }

    /// Characters picked to hit every branch of the pattern: each class, the contraction letters in both cases,
    /// the newlines, and non-ASCII members of each class (2, 3 and 4 byte UTF-8).
    const ALPHABET: &[char] = &[
        'a', 'b', 'z', 'A', 'Z', 's', 'S', 'd', 'D', 'm', 'M', 't', 'T', 'l', 'L', 'v', 'V', 'e',
        'E', 'r', 'R', '0', '1', '9', ' ', ' ', ' ', '\t', '\n', '\r', '\'', '\'', '"', '.', ',',
        '!', '?', '-', '(', ')', '$', '_', '#', '\u{b}', '\u{c}', 'é', 'ß', 'ſ', 'Ω', 'я', '中',
        'ア', '²', '½', '٣', 'Ⅻ', '\u{a0}', '\u{85}', '\u{2028}', '\u{3000}', '\u{200b}',
        '\u{301}', '😀', '𝐀', '𝟏', '\u{212a}', '€', '\u{0}', '\u{7f}',
    ];

    fn random_text(rng: &mut Rng, max_len: usize) -> String {
        let len = rng.below(max_len + 1);
        (0..len)
            .map(|_| ALPHABET[rng.below(ALPHABET.len())])
            .collect()
    }

    #[test]
    fn splits_like_the_regex_on_random_strings() {
        let mut rng = Rng::new(1234);
        for _ in 0..100_000 {
            let text = random_text(&mut rng, 24);
            assert_same_as_regex(&text);
        }
    }

    #[test]
    fn splits_like_the_regex_on_random_arbitrary_unicode() {
        let mut rng = Rng::new(99);
        for _ in 0..20_000 {
            let len = rng.below(40);
            let text: String = (0..len)
                .map(|_| match rng.below(4) {
                    0 => ALPHABET[rng.below(ALPHABET.len())],
                    1 => char::from_u32(rng.below(0x80) as u32).unwrap_or(' '),
                    2 => char::from_u32(rng.below(0x3000) as u32).unwrap_or(' '),
                    _ => char::from_u32(rng.below(0x11_0000) as u32).unwrap_or('x'),
                })
                .collect();
            assert_same_as_regex(&text);
        }
    }

    #[test]
    fn splits_like_the_regex_on_long_runs() {
        let mut rng = Rng::new(7);
        let pieces = [
            "word", " ", "  ", "\n", "\r\n", "12345", "!!", " ?", "'s", "Ü", "\u{a0}", "\t",
        ];
        for _ in 0..10_000 {
            let text: String = (0..rng.below(30))
                .map(|_| pieces[rng.below(pieces.len())])
                .collect();
            assert_same_as_regex(&text);
        }
    }

    #[test]
    fn character_classes_match_the_regex_engine_on_every_code_point() {
        let flags = &classes().flags;
        let checks = [
            (r"\p{L}", LETTER),
            (r"\p{N}", NUMBER),
            (r"\s", SPACE),
            ("(?i:[sdmt])", SDMT),
        ];
        for (pattern, flag) in checks {
            let regex = Regex::new(&format!("^{pattern}$")).unwrap();
            for code in 0..0x11_0000u32 {
                let Some(c) = char::from_u32(code) else {
                    continue;
                };
                let expected = regex.is_match(c.encode_utf8(&mut [0; 4])).unwrap();
                assert_eq!(
                    flags[code as usize] & flag != 0,
                    expected,
                    "{pattern} on U+{code:04X}"
                );
            }
        }
    }

    #[test]
    fn other_patterns_split_with_the_regex() {
        let splitter = Splitter::new(r"\w+|\s+|[^\w\s]+").unwrap();
        assert_eq!(chunks_of(&splitter, "hi there!"), ["hi", " ", "there", "!"]);
    }
}
