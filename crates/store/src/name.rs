//! Image names and references: `NAME` or `NAME@N`.
//!
//! Names become folder names in the store, so they are checked before any path is built: letters,
//! digits, `.`, `_` and `-`, starting with a letter or digit, at most 64 bytes.

use std::fmt;

/// Longest accepted image name, in bytes.
pub const NAME_BYTES_MAX: usize = 64;

/// A reference to an image: a name and, optionally, a version (else: the latest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub name: String,
    pub version: Option<u32>,
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.version {
            Some(v) => write!(f, "{}@{v}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Why a string is not a valid image name or reference.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("image name is empty")]
    Empty,
    #[error("image name {0:?} is longer than {NAME_BYTES_MAX} bytes")]
    TooLong(String),
    #[error("image name {name:?} may not contain {what} (use letters, digits, '.', '_' and '-')")]
    BadChar { name: String, what: String },
    #[error("image name {0:?} must start with a letter or digit")]
    BadStart(String),
    #[error("{0:?} is not a version number (expected NAME@N with N = 1, 2, ...)")]
    BadVersion(String),
}

/// Checks that `name` is a valid image name.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(NameError::TooLong(name.to_string()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        let what = match c {
            ' ' => "spaces".to_string(),
            '/' => "'/'".to_string(),
            '@' => "'@' (a version is given only as NAME@N where an image is read)".to_string(),
            c => format!("{c:?}"),
        };
        return Err(NameError::BadChar {
            name: name.to_string(),
            what,
        });
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(NameError::BadStart(name.to_string()));
    }
    Ok(())
}

impl std::str::FromStr for ImageRef {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let (name, version) = match s.split_once('@') {
            Some((name, v)) => {
                let version = v
                    .parse::<u32>()
                    .ok()
                    .filter(|&n| n > 0 && !v.starts_with('+') && !v.starts_with('0'))
                    .ok_or_else(|| NameError::BadVersion(v.to_string()))?;
                (name, Some(version))
            }
            None => (s, None),
        };
        validate_name(name)?;
        Ok(ImageRef {
            name: name.to_string(),
            version,
        })
    }
}

/// `NAME` or `NAME@N` as written in a configuration file.
impl<'de> serde::Deserialize<'de> for ImageRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_versions() {
        let r: ImageRef = "debian-12.5_x@3".parse().unwrap();
        assert_eq!((r.name.as_str(), r.version), ("debian-12.5_x", Some(3)));
        assert_eq!("web".parse::<ImageRef>().unwrap().version, None);
        assert_eq!(r.to_string(), "debian-12.5_x@3");
    }

    #[test]
    fn rejects_bad_names() {
        for bad in [
            "", "a/b", "a b", "a@b@c", ".hidden", "-x", "../x", "a@0", "a@", "a@-1", "a@01",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad:?} was accepted");
        }
        assert!(validate_name("a@1").is_err());
        assert!(validate_name(&"x".repeat(65)).is_err());
    }
}
