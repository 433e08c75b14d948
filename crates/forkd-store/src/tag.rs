//! The one tag rule used everywhere: `[A-Za-z0-9_][A-Za-z0-9._-]{0,63}`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest tag accepted (the first character plus 63 more).
pub const MAX_TAG_LEN: usize = 64;

/// A validated snapshot tag. Holding a `Tag` proves it is safe to use as a path component.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tag(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    #[error("invalid tag {0:?}: empty (tags match [A-Za-z0-9_][A-Za-z0-9._-]{{0,63}})")]
    Empty(String),
    #[error("invalid tag {0:?}: longer than {MAX_TAG_LEN} characters")]
    TooLong(String),
    #[error("invalid tag {0:?}: must start with a letter, digit or '_' (tags match [A-Za-z0-9_][A-Za-z0-9._-]{{0,63}})")]
    BadStart(String),
    #[error("invalid tag {0:?}: character {1:?} is not allowed (tags match [A-Za-z0-9_][A-Za-z0-9._-]{{0,63}})")]
    BadChar(String, char),
}

impl Tag {
    pub fn parse(s: &str) -> Result<Tag, TagError> {
        let mut chars = s.chars();
        let first = chars.next().ok_or_else(|| TagError::Empty(s.to_string()))?;
        if !(first.is_ascii_alphanumeric() || first == '_') {
            return Err(TagError::BadStart(s.to_string()));
        }
        if let Some(bad) =
            chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(TagError::BadChar(s.to_string(), bad));
        }
        // Counted after the character checks so the length is in ASCII characters.
        if s.len() > MAX_TAG_LEN {
            return Err(TagError::TooLong(s.to_string()));
        }
        Ok(Tag(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = TagError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tag::parse(s)
    }
}

impl TryFrom<String> for Tag {
    type Error = TagError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Tag::parse(&s)
    }
}

impl From<Tag> for String {
    fn from(t: Tag) -> String {
        t.0
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Tag {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_tags() {
        for t in ["a", "_", "0", "py-numpy_1.2", "A.b-c_d", &"x".repeat(64)] {
            assert_eq!(Tag::parse(t).unwrap().as_str(), t);
        }
    }

    #[test]
    fn refuses_invalid_tags() {
        let long = "x".repeat(65);
        let cases = [
            "",
            ".",
            "..",
            "../etc",
            "/abs",
            "a/b",
            "-x",
            ".hidden",
            "a b",
            "tag\n",
            "caf\u{e9}",
            "a\\b",
            "a:b",
            &long,
        ];
        for t in cases {
            assert!(Tag::parse(t).is_err(), "{t:?} should be refused");
        }
    }

    #[test]
    fn error_names_the_input() {
        let msg = Tag::parse("a/b").unwrap_err().to_string();
        assert!(msg.contains("\"a/b\"") && msg.contains('/'), "{msg}");
    }

    #[test]
    fn serde_refuses_bad_tag() {
        #[derive(Deserialize)]
        struct W {
            #[allow(dead_code)]
            t: Tag,
        }
        assert!(toml::from_str::<W>("t = \"../x\"").is_err());
        assert!(toml::from_str::<W>("t = \"ok\"").is_ok());
    }
}
