//! Package names (`namespace/name`), versions and references (`ns/name[@version]`).

use crate::error::{HubError, Result};

/// Same alphabet as tags, so a package's `name` part is always a valid default tag.
fn check_part(what: &str, part: &str, input: &str) -> Result<()> {
    let mut bytes = part.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if first_ok && rest_ok && part.len() <= 64 {
        Ok(())
    } else {
        Err(HubError::Invalid(format!(
            "{input:?}: {what} {part:?} must match [A-Za-z0-9_][A-Za-z0-9._-]{{0,63}}"
        )))
    }
}

/// Checks `namespace/name`.
pub fn check_package_name(name: &str) -> Result<()> {
    match name.split_once('/') {
        Some((ns, n)) => {
            check_part("namespace", ns, name)?;
            check_part("name", n, name)
        }
        None => Err(HubError::Invalid(format!(
            "{name:?}: a package name is namespace/name"
        ))),
    }
}

pub fn check_version(version: &str) -> Result<()> {
    check_part("version", version, version)
}

/// The default local tag for a package: its `name` part.
pub fn default_tag(package: &str) -> &str {
    package.rsplit('/').next().unwrap_or(package)
}

/// `ns/name` or `ns/name@version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageRef {
    pub name: String,
    /// None means `latest`.
    pub version: Option<String>,
}

impl PackageRef {
    pub fn parse(s: &str) -> Result<PackageRef> {
        let (name, version) = match s.split_once('@') {
            Some((n, v)) => {
                check_version(v)?;
                (n, Some(v.to_string()))
            }
            None => (s, None),
        };
        check_package_name(name)?;
        Ok(PackageRef {
            name: name.to_string(),
            version,
        })
    }

    pub fn version_or_latest(&self) -> &str {
        self.version.as_deref().unwrap_or("latest")
    }
}

impl std::fmt::Display for PackageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.version {
            Some(v) => write!(f, "{}@{v}", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_refs() {
        let r = PackageRef::parse("acme/py@v1").unwrap();
        assert_eq!(
            (r.name.as_str(), r.version.as_deref()),
            ("acme/py", Some("v1"))
        );
        assert_eq!(PackageRef::parse("acme/py").unwrap().version, None);
        for bad in ["acme", "/x", "a/../b", "a/b@", "a/b@../x", "a/.b", "a/b/c"] {
            assert!(PackageRef::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(default_tag("acme/py"), "py");
    }
}
