//! `manifest.toml`: what a snapshot is and the sha256 of every file in it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::tag::Tag;

/// The manifest format this forkd writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

/// Well-known snapshot file names.
pub const MANIFEST_FILE: &str = "manifest.toml";
pub const MEMORY_FILE: &str = "memory.bin";
pub const VMSTATE_FILE: &str = "vmstate.json";
pub const ROOTFS_FILE: &str = "rootfs.ext4";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub tag: Tag,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub forkd_version: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub base_image: String,
    #[serde(default)]
    pub kernel: String,
    /// Tag of the snapshot this one is a diff against; empty for a self-contained snapshot.
    #[serde(default)]
    pub parent_tag: String,
    /// sha256 of the parent's manifest.toml when this snapshot was made: the parent's identity,
    /// so a parent replaced under the same tag is detected without re-hashing its memory.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parent_sha256: String,
    /// Hub package this snapshot came from (`namespace/name`); empty for local snapshots.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Hub package version this snapshot came from; empty for local snapshots.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// In a pack of a diff snapshot: the pack holding its parent (`namespace/name@version`),
    /// which a pull fetches first when the parent is missing.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parent_package: String,
    /// The parent's [`Manifest::content_sha256`]: which snapshot the parent must be, whatever
    /// its tag, name or description where it is installed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parent_content_sha256: String,
    /// The network policy the snapshot was taken with (`forkd snapshot --net --allow ...`),
    /// which its children get unless a fork sets its own. None: no network device, or one
    /// with egress denied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetRecord>,
    #[serde(default)]
    pub files: Vec<FileEntry>,
}

/// A snapshot's recorded network policy, in the words of `forkd fork`'s options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRecord {
    /// `--allow` values (`CIDR[:PORT]`).
    #[serde(default)]
    pub allow: Vec<String>,
    /// `--allow-dns`.
    #[serde(default)]
    pub allow_dns: bool,
}

impl NetRecord {
    /// The options that give this policy, as a user types them (`--allow X --allow-dns`).
    pub fn as_options(&self) -> String {
        let mut words: Vec<String> = self.allow.iter().map(|a| format!("--allow {a}")).collect();
        if self.allow_dns {
            words.push("--allow-dns".into());
        }
        words.join(" ")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    /// Logical size in bytes (holes included).
    pub size: u64,
    pub sha256: String,
}

/// Just enough of a manifest to learn its version before trusting the rest of its shape.
#[derive(Deserialize)]
struct VersionProbe {
    format_version: Option<u32>,
}

impl Manifest {
    /// Parses manifest text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Manifest, StoreError> {
        let malformed = |msg: String| StoreError::Manifest {
            path: origin.to_path_buf(),
            msg,
        };
        let probe: VersionProbe = toml::from_str(text).map_err(|e| malformed(first_line(&e)))?;
        match probe.format_version {
            None => return Err(malformed("missing format_version".into())),
            Some(v) if v > FORMAT_VERSION => {
                return Err(StoreError::NewerFormat {
                    path: origin.to_path_buf(),
                    found: v,
                    supported: FORMAT_VERSION,
                })
            }
            Some(_) => {}
        }
        let manifest: Manifest = toml::from_str(text).map_err(|e| malformed(first_line(&e)))?;
        manifest.validate().map_err(malformed)?;
        Ok(manifest)
    }

    pub fn load(path: &Path) -> Result<Manifest, StoreError> {
        let text = std::fs::read_to_string(path).map_err(|e| StoreError::io(path, e))?;
        Manifest::parse(&text, path)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a manifest always serializes")
    }

    /// The parent tag, when this snapshot is a link in a chain.
    pub fn parent(&self) -> Option<Tag> {
        Tag::parse(&self.parent_tag).ok()
    }

    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    /// sha256 over the file list (name, size, sha256 of each, by name): what the snapshot
    /// holds, unlike the manifest's own hash, which also covers its tag, package and words.
    pub fn content_sha256(&self) -> String {
        let mut files: Vec<&FileEntry> = self.files.iter().collect();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let mut text = String::new();
        for f in files {
            text.push_str(&format!("{}\0{}\0{}\n", f.name, f.size, f.sha256));
        }
        crate::hash::sha256_hex(text.as_bytes())
    }

    /// Sum of the logical sizes of the snapshot's files.
    pub fn logical_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    fn validate(&self) -> Result<(), String> {
        if !self.parent_tag.is_empty() {
            Tag::parse(&self.parent_tag).map_err(|e| format!("parent_tag: {e}"))?;
        }
        if !self.parent_content_sha256.is_empty() && !is_sha256_hex(&self.parent_content_sha256) {
            return Err("parent_content_sha256 is not 64 hex digits".into());
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.files {
            check_file_name(&f.name).map_err(|e| e.to_string())?;
            if !seen.insert(f.name.as_str()) {
                return Err(format!("file {:?} listed twice", f.name));
            }
            if !is_sha256_hex(&f.sha256) {
                return Err(format!("file {:?}: sha256 is not 64 hex digits", f.name));
            }
        }
        Ok(())
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A snapshot file name that is a path or otherwise not a plain name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("file name {0:?} is not a plain file name")]
pub struct BadFileName(pub String);

/// Snapshot files are plain names inside the snapshot directory, never paths.
pub fn check_file_name(name: &str) -> Result<(), BadFileName> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(BadFileName(name.to_string()))
    }
}

fn first_line(e: &toml::de::Error) -> String {
    e.to_string()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            tag: Tag::parse("t").unwrap(),
            created_at: "2026-11-21T00:00:00Z".into(),
            forkd_version: "0.1.0".into(),
            memory_mib: 128,
            vcpus: 1,
            description: String::new(),
            base_image: String::new(),
            kernel: "builtin:demo".into(),
            parent_tag: String::new(),
            parent_sha256: String::new(),
            name: String::new(),
            version: String::new(),
            parent_package: String::new(),
            parent_content_sha256: String::new(),
            net: None,
            files: vec![FileEntry {
                name: "memory.bin".into(),
                size: 1,
                sha256: "a".repeat(64),
            }],
        }
    }

    #[test]
    fn round_trips() {
        let m = sample();
        assert_eq!(Manifest::parse(&m.to_toml(), Path::new("m")).unwrap(), m);
    }

    #[test]
    fn a_recorded_network_policy_round_trips_and_is_absent_when_none() {
        assert!(!sample().to_toml().contains("[net]"));
        let mut m = sample();
        m.net = Some(NetRecord {
            allow: vec!["10.0.0.0/8:443".into(), "192.168.1.7".into()],
            allow_dns: true,
        });
        let text = m.to_toml();
        assert!(text.contains("[net]"), "{text}");
        assert_eq!(Manifest::parse(&text, Path::new("m")).unwrap(), m);
    }

    #[test]
    fn refuses_newer_format_naming_both_versions() {
        let text = sample()
            .to_toml()
            .replace("format_version = 1", "format_version = 7");
        let msg = Manifest::parse(&text, Path::new("x/manifest.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains('7') && msg.contains('1') && msg.contains("x/manifest.toml"),
            "{msg}"
        );
    }

    #[test]
    fn refuses_malformed() {
        let p = Path::new("m");
        assert!(Manifest::parse("garbage = [", p).is_err());
        assert!(Manifest::parse("tag = \"x\"", p).is_err());
        let bad_parent = sample()
            .to_toml()
            .replace("parent_tag = \"\"", "parent_tag = \"../x\"");
        assert!(Manifest::parse(&bad_parent, p).is_err());
        let bad_name = sample()
            .to_toml()
            .replace("\"memory.bin\"", "\"../memory.bin\"");
        assert!(Manifest::parse(&bad_name, p).is_err());
        let bad_sha = sample().to_toml().replace(&"a".repeat(64), "zz");
        assert!(Manifest::parse(&bad_sha, p).is_err());
    }
}
