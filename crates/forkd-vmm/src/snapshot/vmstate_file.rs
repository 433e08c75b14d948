//! `vmstate.json`: the versioned, checksummed envelope around a VM's saved state, with the
//! host facts a restore must match.
//!
//! JSON keeps the file readable; KVM structs inside it are base64 blobs ([`pod`]) rather than
//! number arrays. The checksum is the sha256 of the state's canonical JSON (sorted keys), so
//! any edit to the state is caught before a VM is created.

use std::path::Path;

use kvm_ioctls::Kvm;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::host::{KvmFlavour, REQUIRED_CAPS};

/// The vmstate format this forkd writes and reads.
pub const VMSTATE_FORMAT_VERSION: u32 = 1;

/// A TSC frequency difference below this needs no scaling (Firecracker uses the same bound).
const TSC_TOLERANCE_PPM: u64 = 250;

#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error("{path}: cannot read")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a forkd vmstate file: {msg}")]
    Malformed { path: String, msg: String },
    #[error(
        "{path}: vmstate format_version {found} is not supported (this forkd reads {supported})"
    )]
    Version {
        path: String,
        found: u32,
        supported: u32,
    },
    #[error("{path}: checksum mismatch: the file was modified or corrupted (expected {expected}, content hashes to {actual})")]
    Checksum {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("snapshot was taken on an incompatible host: {0}")]
    IncompatibleHost(String),
    #[error("{path}: does not match its snapshot's manifest: the file was modified or replaced (manifest sha256 {expected}, file {actual})")]
    NotAsManifested {
        path: String,
        expected: String,
        actual: String,
    },
}

/// What a restore must match about the host the snapshot was taken on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub cpu_vendor: String,
    pub cpu_family: u32,
    pub cpu_model: u32,
    pub tsc_khz: u32,
    /// Can this host scale a guest's TSC to another frequency (KVM_CAP_TSC_CONTROL)?
    pub tsc_scaling: bool,
    pub kvm_flavour: KvmFlavour,
    /// The required KVM capabilities present on the host, by forkd's names.
    pub kvm_caps: Vec<String>,
}

impl HostFacts {
    /// Facts about this host; `tsc_khz` comes from a vCPU (KVM_GET_TSC_KHZ) since it is per VM.
    pub fn current(kvm: &Kvm, tsc_khz: u32) -> HostFacts {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.split(':').next().map(str::trim) == Some(name))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        HostFacts {
            cpu_vendor: field("vendor_id"),
            cpu_family: field("cpu family").parse().unwrap_or(0),
            cpu_model: field("model").parse().unwrap_or(0),
            tsc_khz,
            tsc_scaling: kvm.check_extension(kvm_ioctls::Cap::TscControl),
            kvm_flavour: KvmFlavour::detect(),
            kvm_caps: REQUIRED_CAPS
                .iter()
                .filter(|(_, c)| kvm.check_extension(*c))
                .map(|(n, _)| n.to_string())
                .collect(),
        }
    }

    /// Why a snapshot taken on `self` cannot be restored on `here`, if it cannot.
    pub fn incompatibilities(&self, here: &HostFacts) -> Vec<String> {
        let mut out = Vec::new();
        if self.cpu_vendor != here.cpu_vendor {
            out.push(format!(
                "CPU vendor {} (snapshot) vs {} (here)",
                self.cpu_vendor, here.cpu_vendor
            ));
        }
        if self.cpu_family != here.cpu_family {
            out.push(format!(
                "CPU family {} (snapshot) vs {} (here)",
                self.cpu_family, here.cpu_family
            ));
        }
        if self.kvm_flavour != here.kvm_flavour {
            out.push(format!(
                "KVM flavour {:?} (snapshot) vs {:?} (here)",
                self.kvm_flavour, here.kvm_flavour
            ));
        }
        let missing: Vec<&str> = self
            .kvm_caps
            .iter()
            .filter(|c| !here.kvm_caps.contains(c))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            out.push(format!(
                "KVM capabilities missing here: {}",
                missing.join(", ")
            ));
        }
        if self.tsc_khz != 0
            && here.tsc_khz != 0
            && !self.tsc_within_tolerance(here)
            && !here.tsc_scaling
        {
            out.push(format!(
                "TSC {} kHz (snapshot) vs {} kHz (here) and this host cannot scale the guest TSC",
                self.tsc_khz, here.tsc_khz
            ));
        }
        out
    }

    /// Whether the guest's TSC frequency must be set on restore (it differs by > 250 ppm).
    pub fn tsc_within_tolerance(&self, here: &HostFacts) -> bool {
        let (a, b) = (u64::from(self.tsc_khz), u64::from(here.tsc_khz));
        a.abs_diff(b) * 1_000_000 <= a * TSC_TOLERANCE_PPM
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    format_version: u32,
    checksum: String,
    host: HostFacts,
    state: T,
}

/// Serializes `state` into vmstate.json text.
pub fn encode<T: Serialize>(state: &T, host: &HostFacts) -> Result<String, serde_json::Error> {
    let value = serde_json::to_value(state)?;
    let envelope = Envelope {
        format_version: VMSTATE_FORMAT_VERSION,
        checksum: checksum(&value)?,
        host: host.clone(),
        state: value,
    };
    serde_json::to_string_pretty(&envelope)
}

/// Parses vmstate.json text, checking version and checksum; `origin` names the file in errors.
pub fn decode<T: DeserializeOwned>(
    text: &str,
    origin: &Path,
) -> Result<(HostFacts, T), VmStateError> {
    let path = origin.display().to_string();
    let malformed = |msg: String| VmStateError::Malformed {
        path: path.clone(),
        msg,
    };
    let raw: serde_json::Value =
        serde_json::from_str(text).map_err(|e| malformed(e.to_string()))?;
    let version = raw
        .get("format_version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| malformed("no format_version".into()))?;
    if version != u64::from(VMSTATE_FORMAT_VERSION) {
        return Err(VmStateError::Version {
            path,
            found: version.min(u64::from(u32::MAX)) as u32,
            supported: VMSTATE_FORMAT_VERSION,
        });
    }
    let envelope: Envelope<serde_json::Value> =
        serde_json::from_value(raw).map_err(|e| malformed(e.to_string()))?;
    let actual = checksum(&envelope.state).map_err(|e| malformed(e.to_string()))?;
    if actual != envelope.checksum {
        return Err(VmStateError::Checksum {
            path,
            expected: envelope.checksum,
            actual,
        });
    }
    let state = serde_json::from_value(envelope.state).map_err(|e| malformed(e.to_string()))?;
    Ok((envelope.host, state))
}

/// What a chain walk needs from an ancestor's vmstate.json.
#[derive(Debug, Deserialize)]
pub struct ChainView {
    pub memory: Vec<crate::snapshot::memory_file::RegionSpec>,
    pub chain: Option<crate::snapshot::state::ChainLink>,
}

/// Reads an ancestor's vmstate.json for a chain walk. The file must hash to `sha256`, the
/// entry in the ancestor's manifest (whose own hash the link recorded): the same guarantee as
/// the embedded checksum, without decoding and re-serializing the whole state. Only the
/// memory layout and the ancestor's own link are parsed. A spawn of a deep chain pays this
/// once per link.
pub fn load_chain_view(path: &Path, sha256: &str) -> Result<ChainView, VmStateError> {
    #[derive(Deserialize)]
    struct Partial {
        format_version: u32,
        state: ChainView,
    }
    let display = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| VmStateError::Read {
        path: display.clone(),
        source,
    })?;
    let actual = forkd_store::hash::sha256_hex(&bytes);
    if actual != sha256 {
        return Err(VmStateError::NotAsManifested {
            path: display,
            expected: sha256.to_string(),
            actual,
        });
    }
    let partial: Partial = serde_json::from_slice(&bytes).map_err(|e| VmStateError::Malformed {
        path: display.clone(),
        msg: e.to_string(),
    })?;
    if partial.format_version != VMSTATE_FORMAT_VERSION {
        return Err(VmStateError::Version {
            path: display,
            found: partial.format_version,
            supported: VMSTATE_FORMAT_VERSION,
        });
    }
    Ok(partial.state)
}

/// Reads and decodes a vmstate.json file.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<(HostFacts, T), VmStateError> {
    let text = std::fs::read_to_string(path).map_err(|source| VmStateError::Read {
        path: path.display().to_string(),
        source,
    })?;
    decode(&text, path)
}

/// Refuses a restore on a host that differs in ways that matter, saying what differs.
pub fn check_host(saved: &HostFacts, here: &HostFacts) -> Result<(), VmStateError> {
    let problems = saved.incompatibilities(here);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(VmStateError::IncompatibleHost(problems.join("; ")))
    }
}

fn checksum(value: &serde_json::Value) -> Result<String, serde_json::Error> {
    // serde_json::Value keeps object keys sorted, so this is canonical.
    let bytes = serde_json::to_vec(value)?;
    Ok(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
}

/// Plain-old-data KVM structs as base64 strings in JSON.
pub mod pod {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    /// The raw bytes of a plain-data value.
    pub fn bytes_of<T: Copy>(value: &T) -> &[u8] {
        // SAFETY: T is Copy plain data (KVM's repr(C) structs); reading its bytes is sound.
        unsafe {
            std::slice::from_raw_parts(value as *const T as *const u8, std::mem::size_of::<T>())
        }
    }

    /// A value of `T` from exactly `size_of::<T>()` bytes.
    pub fn from_bytes<T: Copy + Default>(bytes: &[u8]) -> Result<T, String> {
        if bytes.len() != std::mem::size_of::<T>() {
            return Err(format!(
                "{} bytes for a {}-byte {}",
                bytes.len(),
                std::mem::size_of::<T>(),
                std::any::type_name::<T>()
            ));
        }
        let mut value = T::default();
        // SAFETY: lengths match; KVM's structs accept any bit pattern (integers and arrays).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                &mut value as *mut T as *mut u8,
                bytes.len(),
            )
        };
        Ok(value)
    }

    /// `#[serde(with = "pod")]` for KVM structs.
    pub fn serialize<T: Copy, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes_of(value)))
    }

    pub fn deserialize<'de, T: Copy + Default, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)?;
        from_bytes(&bytes).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        counter: u64,
        #[serde(with = "pod")]
        regs: kvm_bindings::kvm_regs,
    }

    fn host() -> HostFacts {
        HostFacts {
            cpu_vendor: "GenuineIntel".into(),
            cpu_family: 6,
            cpu_model: 85,
            tsc_khz: 2_000_000,
            tsc_scaling: false,
            kvm_flavour: KvmFlavour::Vmx,
            kvm_caps: vec!["irqchip".into(), "xsave".into()],
        }
    }

    fn sample() -> Sample {
        let regs = kvm_bindings::kvm_regs {
            rip: 0x100000,
            rsp: 0x8ff0,
            rflags: 2,
            ..Default::default()
        };
        Sample { counter: 41, regs }
    }

    #[test]
    fn round_trips_with_kvm_structs_as_base64() {
        let text = encode(&sample(), &host()).unwrap();
        assert!(
            text.contains("\"regs\": \""),
            "regs must be a base64 string:\n{text}"
        );
        let (h, s): (HostFacts, Sample) = decode(&text, Path::new("vmstate.json")).unwrap();
        assert_eq!(h, host());
        assert_eq!(s, sample());
    }

    #[test]
    fn any_edit_fails_the_checksum() {
        let text = encode(&sample(), &host())
            .unwrap()
            .replace("\"counter\": 41", "\"counter\": 42");
        let err = decode::<Sample>(&text, Path::new("snap/vmstate.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("snap/vmstate.json") && err.contains("checksum mismatch"),
            "{err}"
        );
    }

    #[test]
    fn malformed_and_unknown_versions_are_refused() {
        let p = Path::new("v.json");
        assert!(matches!(
            decode::<Sample>("{not json", p),
            Err(VmStateError::Malformed { .. })
        ));
        assert!(matches!(
            decode::<Sample>("{}", p),
            Err(VmStateError::Malformed { .. })
        ));
        let future = encode(&sample(), &host())
            .unwrap()
            .replace("\"format_version\": 1", "\"format_version\": 9");
        let err = decode::<Sample>(&future, p).unwrap_err().to_string();
        assert!(err.contains('9') && err.contains("reads 1"), "{err}");
        let short = encode(&sample(), &host()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&short).unwrap();
        let mut bad = v.clone();
        bad["state"]["regs"] = serde_json::json!("AAAA");
        bad["checksum"] = serde_json::json!(checksum(&bad["state"]).unwrap());
        let err = decode::<Sample>(&bad.to_string(), p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 bytes for a"), "{err}");
    }

    #[test]
    fn host_differences_are_named() {
        let here = HostFacts {
            cpu_vendor: "AuthenticAMD".into(),
            tsc_khz: 3_000_000,
            kvm_caps: vec!["irqchip".into()],
            ..host()
        };
        let err = check_host(&host(), &here).unwrap_err().to_string();
        assert!(
            err.contains("GenuineIntel") && err.contains("AuthenticAMD"),
            "{err}"
        );
        assert!(
            err.contains("xsave") && err.contains("TSC 2000000"),
            "{err}"
        );
        assert!(check_host(&host(), &host()).is_ok());
        let close = HostFacts {
            tsc_khz: 2_000_400,
            ..host()
        };
        assert!(
            check_host(&host(), &close).is_ok(),
            "200 ppm needs no scaling"
        );
        let scaled = HostFacts {
            tsc_khz: 2_100_000,
            tsc_scaling: true,
            ..host()
        };
        assert!(
            check_host(&host(), &scaled).is_ok(),
            "a host that scales the TSC can restore"
        );
    }
}
