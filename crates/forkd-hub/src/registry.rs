//! `registry.json` schema v1: packages → versions → {url, sha256, size_bytes, …}.
//!
//! Unknown fields are ignored when reading and kept when rewriting (publish / serve), so a
//! registry written by a newer tool survives a round trip through this one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use url::Url;

use crate::error::{HubError, Result};
use crate::names::{check_package_name, PackageRef};

pub const SCHEMA_VERSION: u64 = 1;
pub const REGISTRY_FILE: &str = "registry.json";
pub const LATEST: &str = "latest";
/// A registry is an index, never this large; bigger is refused before parsing.
pub const MAX_REGISTRY_BYTES: u64 = 32 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registry {
    pub schema_version: u64,
    #[serde(default)]
    pub packages: BTreeMap<String, Package>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Package {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub versions: BTreeMap<String, VersionEntry>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionEntry {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_tag: Option<String>,
    /// minisign signature of the pack (the `.minisig` file's text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minisig: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A version entry resolved against its registry: absolute URL, checked sha256.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub package: String,
    pub version: String,
    pub url: Url,
    pub entry: VersionEntry,
}

impl Registry {
    pub fn empty() -> Registry {
        Registry {
            schema_version: SCHEMA_VERSION,
            packages: BTreeMap::new(),
            extra: Map::new(),
        }
    }

    /// Parses registry text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Registry> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| HubError::registry(origin, format!("not valid JSON: {e}")))?;
        match value.get("schema_version").map(|v| v.as_u64()) {
            None => return Err(HubError::registry(origin, "no schema_version")),
            Some(Some(SCHEMA_VERSION)) => {}
            Some(v) => {
                let shown = value["schema_version"].to_string();
                let _ = v;
                return Err(HubError::registry(
                    origin,
                    format!(
                        "schema_version {shown} is not supported (this forkd reads {SCHEMA_VERSION}); upgrade forkd"
                    ),
                ));
            }
        }
        serde_json::from_value(value)
            .map_err(|e| HubError::registry(origin, format!("malformed: {e}")))
    }

    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a registry always serializes");
        s.push('\n');
        s
    }

    /// Finds `reference` and resolves its URL against `base` (the registry's own URL).
    pub fn resolve(&self, reference: &PackageRef, base: &Url, origin: &str) -> Result<Resolved> {
        let pkg = self.packages.get(&reference.name).ok_or_else(|| {
            let known: Vec<&str> = self.packages.keys().map(String::as_str).collect();
            HubError::NotFound(format!(
                "no package {:?} on the hub {origin} (it has: {})",
                reference.name,
                if known.is_empty() {
                    "nothing".to_string()
                } else {
                    known.join(", ")
                }
            ))
        })?;
        if !pkg.versions.contains_key(LATEST) {
            return Err(HubError::registry(
                origin,
                format!("package {:?} has no \"latest\" version", reference.name),
            ));
        }
        let version = reference.version_or_latest();
        let entry = pkg.versions.get(version).ok_or_else(|| {
            let known: Vec<&str> = pkg.versions.keys().map(String::as_str).collect();
            HubError::NotFound(format!(
                "package {:?} has no version {version:?} (available: {})",
                reference.name,
                known.join(", ")
            ))
        })?;
        let what = format!("{}@{version}", reference.name);
        if let Some(sha) = &entry.sha256 {
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(HubError::registry(
                    origin,
                    format!("{what}: sha256 {sha:?} is not 64 hex digits"),
                ));
            }
        }
        let url = base
            .join(&entry.url)
            .map_err(|e| HubError::registry(origin, format!("{what}: url {:?}: {e}", entry.url)))?;
        if !matches!(url.scheme(), "http" | "https" | "file") {
            return Err(HubError::registry(
                origin,
                format!("{what}: url {url} is not http, https or file"),
            ));
        }
        // A remote registry must not make us read local files (devices, pipes, secrets).
        if url.scheme() == "file" && base.scheme() != "file" {
            return Err(HubError::registry(
                origin,
                format!("{what}: a remote registry may not point at the local file {url}"),
            ));
        }
        check_package_name(&reference.name)?;
        let mut entry = entry.clone();
        entry.sha256 = entry.sha256.map(|s| s.to_ascii_lowercase());
        Ok(Resolved {
            package: reference.name.clone(),
            version: version.to_string(),
            url,
            entry,
        })
    }

    /// Adds or replaces `package@version`; `make_latest` also points `latest` at it.
    pub fn upsert(
        &mut self,
        package: &str,
        version: &str,
        entry: VersionEntry,
        description: Option<&str>,
        make_latest: bool,
    ) {
        let pkg = self.packages.entry(package.to_string()).or_default();
        if let Some(d) = description.filter(|d| !d.is_empty()) {
            pkg.description = d.to_string();
        }
        let make_latest = make_latest || !pkg.versions.contains_key(LATEST);
        if make_latest {
            pkg.versions.insert(LATEST.to_string(), entry.clone());
        }
        pkg.versions.insert(version.to_string(), entry);
    }
}

/// The registry URL a `--hub` value names: a URL ending in `/` means `<url>registry.json`;
/// a plain path is a local file.
pub fn registry_url(hub: &str) -> Result<Url> {
    let bad = |e: String| HubError::Invalid(format!("hub {hub:?}: {e}"));
    let mut url = if hub.contains("://") {
        Url::parse(hub).map_err(|e| bad(e.to_string()))?
    } else {
        let path = std::path::absolute(hub).map_err(|e| bad(e.to_string()))?;
        if !path.exists() {
            let looks_like_a_path = hub.starts_with(['/', '.', '~']);
            return Err(bad(if looks_like_a_path {
                "no such file or directory".into()
            } else {
                "no such file or directory here; a hub on a server needs its scheme (http:// or https://)".into()
            }));
        }
        let is_dir = path.is_dir();
        let mut u = Url::from_file_path(&path).map_err(|_| bad("not a usable path".into()))?;
        if is_dir && !u.path().ends_with('/') {
            u.set_path(&format!("{}/", u.path()));
        }
        u
    };
    if !matches!(url.scheme(), "http" | "https" | "file") {
        return Err(bad(
            "only http://, https:// and file:// hubs are supported".into()
        ));
    }
    if url.path().ends_with('/') {
        url = url.join(REGISTRY_FILE).map_err(|e| bad(e.to_string()))?;
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{ "schema_version": 1, "future_field": {"x": 1},
      "packages": { "acme/py": { "description": "Python", "owner": "someone",
        "versions": {
          "latest": { "url": "packs/py-v2.forkd-snapshot.tar.zst", "sha256": "AB00000000000000000000000000000000000000000000000000000000000000", "size_bytes": 10, "memory_mib": 513, "base_image": "python:3.12-slim", "recipe_path": "recipes/x", "created_at": "2026-05-18T00:00:00Z", "release_tag": "hub-x-v1", "mirror": "y" },
          "v1": { "url": "https://cdn.example/py-v1.tar.zst" } } } } }"#;

    fn base() -> Url {
        Url::parse("https://hub.example/sub/registry.json").unwrap()
    }

    #[test]
    fn parses_resolves_and_keeps_unknown_fields() {
        let r = Registry::parse(SAMPLE, "t").unwrap();
        let latest = r
            .resolve(&PackageRef::parse("acme/py").unwrap(), &base(), "t")
            .unwrap();
        assert_eq!(
            latest.url.as_str(),
            "https://hub.example/sub/packs/py-v2.forkd-snapshot.tar.zst"
        );
        assert_eq!(
            latest.entry.sha256.as_deref(),
            Some(&*format!("ab{}", "0".repeat(62)))
        );
        assert_eq!(latest.entry.memory_mib, Some(513));
        let v1 = r
            .resolve(&PackageRef::parse("acme/py@v1").unwrap(), &base(), "t")
            .unwrap();
        assert_eq!(v1.url.as_str(), "https://cdn.example/py-v1.tar.zst");
        let round = Registry::parse(&r.to_json(), "t").unwrap();
        assert!(round.to_json().contains("future_field"));
        assert!(round.to_json().contains("\"mirror\""));
        assert!(round.to_json().contains("\"owner\""));
    }

    #[test]
    fn refuses_unknown_schema_and_missing_latest_and_unknown_versions() {
        let e = Registry::parse(r#"{"schema_version": 2, "packages": {}}"#, "t").unwrap_err();
        assert!(
            e.to_string().contains("schema_version 2 is not supported"),
            "{e}"
        );
        assert!(Registry::parse(r#"{"packages": {}}"#, "t").is_err());
        assert!(Registry::parse("[1,2", "t").is_err());
        let no_latest =
            r#"{"schema_version":1,"packages":{"a/b":{"versions":{"v1":{"url":"x"}}}}}"#;
        let r = Registry::parse(no_latest, "t").unwrap();
        let e = r
            .resolve(&PackageRef::parse("a/b@v1").unwrap(), &base(), "t")
            .unwrap_err();
        assert!(e.to_string().contains("no \"latest\""), "{e}");
        let r = Registry::parse(SAMPLE, "t").unwrap();
        let e = r
            .resolve(&PackageRef::parse("acme/py@v9").unwrap(), &base(), "t")
            .unwrap_err();
        assert!(e.to_string().contains("available: latest, v1"), "{e}");
        let e = r
            .resolve(&PackageRef::parse("acme/nope").unwrap(), &base(), "t")
            .unwrap_err();
        assert!(e.to_string().contains("acme/py"), "{e}");
        let bad_url = SAMPLE.replace("https://cdn.example/py-v1.tar.zst", "ftp://x/y");
        let r = Registry::parse(&bad_url, "t").unwrap();
        assert!(r
            .resolve(&PackageRef::parse("acme/py@v1").unwrap(), &base(), "t")
            .is_err());
    }

    #[test]
    fn hub_urls() {
        assert_eq!(
            registry_url("http://h/x/").unwrap().as_str(),
            "http://h/x/registry.json"
        );
        assert_eq!(
            registry_url("http://h/r.json").unwrap().as_str(),
            "http://h/r.json"
        );
        assert!(registry_url("ftp://h/").is_err());
        let e = registry_url("127.0.0.1:8804/registry.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs its scheme"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let u = registry_url(d.path().to_str().unwrap()).unwrap();
        assert!(u.as_str().starts_with("file://") && u.as_str().ends_with("/registry.json"));
    }

    #[test]
    fn upsert_moves_latest() {
        let mut r = Registry::empty();
        let e = |u: &str| VersionEntry {
            url: u.into(),
            ..Default::default()
        };
        r.upsert("a/b", "v1", e("1"), Some("d"), true);
        r.upsert("a/b", "v2", e("2"), None, false);
        assert_eq!(r.packages["a/b"].versions["latest"].url, "1");
        r.upsert("a/b", "v3", e("3"), None, true);
        assert_eq!(r.packages["a/b"].versions["latest"].url, "3");
        assert_eq!(r.packages["a/b"].description, "d");
    }
}
