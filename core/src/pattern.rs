//! Name patterns: `worker-*`, `web-?`, as list filters and `--on`
//! selectors take them. Only what a machine name may hold, plus `*` (any
//! run of characters) and `?` (one character), so a pattern is never read
//! as anything else (SQL, a path, a regular expression).

use std::fmt;

use wildmatch::WildMatch;

/// The longest pattern taken, in bytes.
pub const MAX_PATTERN_BYTES: usize = 256;

#[derive(Clone)]
pub struct NamePattern {
    text: String,
    matcher: WildMatch,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a name pattern: use up to 256 characters of a-z, A-Z, 0-9, '-' and '_', with '*' for any run of characters and '?' for one"
)]
pub struct PatternError(String);

impl NamePattern {
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let ok = !text.is_empty()
            && text.len() <= MAX_PATTERN_BYTES
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_*?".contains(&b));
        if !ok {
            let shown: String = text.chars().take(64).collect();
            return Err(PatternError(shown));
        }
        Ok(Self {
            text: text.to_owned(),
            matcher: WildMatch::new(text),
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.matcher.matches(name)
    }

    /// Whether it holds a wildcard (else it names one machine).
    pub fn is_glob(&self) -> bool {
        self.text.contains(['*', '?'])
    }

    /// What every match starts with: the text before the first wildcard,
    /// for a store to start its scan there.
    pub fn literal_prefix(&self) -> &str {
        let end = self.text.find(['*', '?']).unwrap_or(self.text.len());
        &self.text[..end]
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NamePattern({:?})", self.text)
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq for NamePattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stars_and_question_marks_match_as_globs() {
        let p = NamePattern::parse("worker-*").unwrap();
        assert!(p.matches("worker-1") && p.matches("worker-") && !p.matches("web-1"));
        assert_eq!(p.literal_prefix(), "worker-");
        let q = NamePattern::parse("web-?").unwrap();
        assert!(q.matches("web-1") && !q.matches("web-10"));
        let exact = NamePattern::parse("db_1").unwrap();
        assert!(!exact.is_glob() && exact.matches("db_1") && !exact.matches("db_10"));
        assert_eq!(exact.literal_prefix(), "db_1");
    }

    #[test]
    fn anything_but_name_characters_and_wildcards_is_refused() {
        for bad in ["", "a b", "a%", "../x", "[ab]", "a;DROP", &"a".repeat(257)] {
            let err = NamePattern::parse(bad).unwrap_err().to_string();
            assert!(err.contains("is not a name pattern"), "{bad}: {err}");
        }
    }
}
