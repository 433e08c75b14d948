//! `vmstate.json`: the versioned, checksummed envelope around a VM's saved state, with the
//! host facts a restore must match.
//!
//! JSON keeps the file readable; KVM structs inside it are base64 blobs ([`super::blob`])
//! rather than number arrays. The checksum is the sha256 of the state's canonical JSON (sorted
//! keys), so any edit to the state is caught before a VM is created.
//!
//! Format versions (a reader takes exactly its own version; anything else is refused with both
//! versions named):
//! - 1: the first format.
//! - 2: each vCPU's MSRs are raw `kvm_msr_entry` records in one base64 blob (like its CPUID
//!   entries), not `[index, value]` pairs: vCPU and VM state are KVM's own structs, serialized
//!   where they live (`vstate::vcpu`, `vstate::vm`).

use std::path::Path;

use kvm_ioctls::Kvm;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::host::{KvmFlavour, REQUIRED_CAPS};
use crate::vstate::vcpu::snapshot_msr_indices;

/// The vmstate format this forkd writes and reads (see the module docs for the history).
pub const VMSTATE_FORMAT_VERSION: u32 = 2;

/// A TSC frequency difference below this needs no scaling (Firecracker uses the same bound).
const TSC_TOLERANCE_PPM: u64 = 250;

#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error("{path}: cannot read")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid forkd vmstate file")]
    Malformed {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: not a forkd vmstate file (it has no format_version)")]
    NoVersion { path: String },
    #[error(
        "vmstate {path}: format version {found} is not supported (this forkd reads version {supported}); {}",
        if *found < u64::from(*supported) { "rebuild the snapshot" } else { "upgrade forkd to restore it" }
    )]
    Version {
        path: String,
        found: u64,
        supported: u32,
    },
    #[error("{path}: checksum mismatch: the file was modified or corrupted (expected {expected}, content hashes to {actual})")]
    Checksum {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("snapshot was taken on an incompatible host: {}", problems.join("; "))]
    IncompatibleHost { problems: Vec<String> },
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
    /// The MSRs this host's KVM saves and restores for a snapshot (KVM_GET_MSR_INDEX_LIST
    /// filtered as [`snapshot_msr_indices`] does); a snapshot carries all of its host's.
    /// Empty when unknown.
    #[serde(default)]
    pub msrs: Vec<u32>,
}

impl HostFacts {
    /// Facts about this host; `tsc_khz` comes from a vCPU (KVM_GET_TSC_KHZ) since it is per VM.
    pub fn current(kvm: &Kvm, tsc_khz: u32) -> HostFacts {
        let cpuinfo = crate::host::cpuinfo();
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
            msrs: snapshot_msr_indices(kvm).unwrap_or_default(),
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
        // KVM_SET_MSRS stops at the first MSR it does not know, so each of these would fail
        // the restore after the VM exists.
        if !here.msrs.is_empty() {
            let missing: Vec<String> = self
                .msrs
                .iter()
                .filter(|m| !here.msrs.contains(m))
                .map(|m| format!("{m:#x}"))
                .collect();
            if !missing.is_empty() {
                out.push(format!(
                    "MSRs this host's KVM cannot restore: {}",
                    missing.join(", ")
                ));
            }
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

/// Refuses any format version but this forkd's.
pub(crate) fn check_version(path: &str, found: u64) -> Result<(), VmStateError> {
    if found == u64::from(VMSTATE_FORMAT_VERSION) {
        Ok(())
    } else {
        Err(VmStateError::Version {
            path: path.to_string(),
            found,
            supported: VMSTATE_FORMAT_VERSION,
        })
    }
}

/// Parses vmstate.json text, checking version and checksum; `origin` names the file in errors.
pub fn decode<T: DeserializeOwned>(
    text: &str,
    origin: &Path,
) -> Result<(HostFacts, T), VmStateError> {
    let path = origin.display().to_string();
    let malformed = |source| VmStateError::Malformed {
        path: path.clone(),
        source,
    };
    let raw: serde_json::Value = serde_json::from_str(text).map_err(malformed)?;
    let version = raw
        .get("format_version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| VmStateError::NoVersion { path: path.clone() })?;
    check_version(&path, version)?;
    let envelope: Envelope<serde_json::Value> = serde_json::from_value(raw).map_err(malformed)?;
    let actual = checksum(&envelope.state).map_err(malformed)?;
    if actual != envelope.checksum {
        return Err(VmStateError::Checksum {
            path,
            expected: envelope.checksum,
            actual,
        });
    }
    let state = serde_json::from_value(envelope.state).map_err(malformed)?;
    Ok((envelope.host, state))
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
        Err(VmStateError::IncompatibleHost { problems })
    }
}

fn checksum(value: &serde_json::Value) -> Result<String, serde_json::Error> {
    // serde_json::Value keeps object keys sorted, so this is canonical.
    let bytes = serde_json::to_vec(value)?;
    Ok(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
}

#[cfg(test)]
impl HostFacts {
    /// An Intel host with VMX and the given restorable MSRs, for tests.
    pub(crate) fn sample(msrs: &[u32]) -> HostFacts {
        HostFacts {
            cpu_vendor: "GenuineIntel".into(),
            cpu_family: 6,
            cpu_model: 85,
            tsc_khz: 2_000_000,
            tsc_scaling: false,
            kvm_flavour: KvmFlavour::Vmx,
            kvm_caps: vec!["irqchip".into(), "xsave".into()],
            msrs: msrs.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        counter: u64,
        #[serde(with = "crate::snapshot::blob::kvm")]
        regs: kvm_bindings::kvm_regs,
    }

    fn host() -> HostFacts {
        HostFacts::sample(&[0x10, 0x1b, 0x48, 0x6e0])
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
    fn malformed_files_are_refused() {
        let p = Path::new("v.json");
        assert!(matches!(
            decode::<Sample>("{not json", p),
            Err(VmStateError::Malformed { .. })
        ));
        assert!(matches!(
            decode::<Sample>("{}", p),
            Err(VmStateError::NoVersion { .. })
        ));
        let short = encode(&sample(), &host()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&short).unwrap();
        let mut bad = v.clone();
        bad["state"]["regs"] = serde_json::json!("AAAA");
        bad["checksum"] = serde_json::json!(checksum(&bad["state"]).unwrap());
        let err = decode::<Sample>(&bad.to_string(), p).unwrap_err();
        assert!(matches!(err, VmStateError::Malformed { .. }));
        let text = crate::snapshot::error_chain(&err);
        assert!(
            text.starts_with("v.json: not a valid forkd vmstate file: ")
                && text.contains("3 bytes for a"),
            "{text}"
        );
    }

    fn with_version(version: u64) -> String {
        let text = encode(&sample(), &host()).unwrap();
        let needle = format!("\"format_version\": {VMSTATE_FORMAT_VERSION}");
        assert!(text.contains(&needle), "{text}");
        text.replace(&needle, &format!("\"format_version\": {version}"))
    }

    #[test]
    fn other_format_versions_are_refused_naming_both_versions() {
        let p = Path::new("/store/snapshots/old/vmstate.json");
        let err = decode::<Sample>(&with_version(1), p).unwrap_err();
        assert!(
            matches!(
                err,
                VmStateError::Version {
                    found: 1,
                    supported: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            crate::snapshot::error_chain(&err),
            "vmstate /store/snapshots/old/vmstate.json: format version 1 is not supported \
             (this forkd reads version 2); rebuild the snapshot"
        );
        let newer = decode::<Sample>(&with_version(9), p)
            .unwrap_err()
            .to_string();
        assert_eq!(
            newer,
            "vmstate /store/snapshots/old/vmstate.json: format version 9 is not supported \
             (this forkd reads version 2); upgrade forkd to restore it"
        );
        let huge = decode::<Sample>(&with_version(u64::MAX), p)
            .unwrap_err()
            .to_string();
        assert!(huge.contains(&u64::MAX.to_string()), "{huge}");
        // The checksum covers the state only, so a version edit is caught by the version check
        // itself, whatever the checksum says.
        assert!(decode::<Sample>(&with_version(2), p).is_ok());
    }

    #[test]
    fn host_differences_are_named() {
        let here = HostFacts {
            cpu_vendor: "AuthenticAMD".into(),
            tsc_khz: 3_000_000,
            kvm_caps: vec!["irqchip".into()],
            msrs: vec![0x10, 0x1b, 0x6e0, 0xda0],
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
        assert!(
            err.contains("MSRs this host's KVM cannot restore: 0x48;")
                || err.ends_with("MSRs this host's KVM cannot restore: 0x48"),
            "only the snapshot host's MSRs missing here count: {err}"
        );
        let unknown = HostFacts {
            msrs: Vec::new(),
            ..host()
        };
        assert!(
            check_host(&host(), &unknown).is_ok(),
            "a host whose MSR list is unknown is not refused for it"
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
