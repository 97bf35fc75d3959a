//! deployment.json must not repeat a key anywhere: serde keeps the last of
//! two, while a person reading the file top-down sees the first, so a
//! repeated `closures.m1` would deploy what nobody reviewed. Checked in a
//! pass of its own before the artifact is deserialized.

use std::collections::HashSet;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};

use super::ArtifactError;

/// Refuses `bytes` if any object in it has a key twice; other errors are
/// left for the parse that follows to report.
pub(super) fn check(bytes: &[u8]) -> Result<(), ArtifactError> {
    let mut path = Vec::new();
    let mut duplicate = None;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let seed = Unique {
        path: &mut path,
        duplicate: &mut duplicate,
    };
    if seed.deserialize(&mut de).is_err()
        && let Some((path, key)) = duplicate
    {
        return Err(ArtifactError::Field {
            path,
            message: format!(
                "the key {key:?} appears twice in the same object; keep one, so that what is reviewed is what is deployed"
            ),
        });
    }
    Ok(())
}

struct Unique<'a> {
    /// Where the value being read sits: `closures`, `m1`, `[0]`, …
    path: &'a mut Vec<String>,
    /// Set, with the path, when a repeated key was found.
    duplicate: &'a mut Option<(String, String)>,
}

impl Unique<'_> {
    fn at(&self, key: &str) -> String {
        let mut out = String::new();
        for part in self.path.iter().map(String::as_str).chain([key]) {
            if !out.is_empty() && !part.starts_with('[') {
                out.push('.');
            }
            out.push_str(part);
        }
        out
    }
}

impl<'de> DeserializeSeed<'de> for Unique<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Unique<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                *self.duplicate = Some((self.at(&key), key));
                return Err(A::Error::custom("duplicate key"));
            }
            self.path.push(key);
            map.next_value_seed(Unique {
                path: self.path,
                duplicate: self.duplicate,
            })?;
            self.path.pop();
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0usize;
        loop {
            self.path.push(format!("[{index}]"));
            let more = seq.next_element_seed(Unique {
                path: self.path,
                duplicate: self.duplicate,
            })?;
            self.path.pop();
            if more.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}
