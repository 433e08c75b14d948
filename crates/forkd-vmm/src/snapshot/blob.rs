//! How KVM structs travel inside vmstate.json: as base64 strings of their raw bytes.
//!
//! kvm-bindings' `serde` feature gives every KVM struct a snapshot carries zerocopy's
//! [`IntoBytes`] / [`FromBytes`] (the proof that the struct has no padding and accepts any bit
//! pattern) and a `Serialize` that writes exactly those bytes. serde_json would write them as a
//! number array four times the size of base64, so these `#[serde(with = ...)]` modules write
//! the same bytes as base64 instead. Unlike kvm-bindings' own `Deserialize`, which pads or
//! truncates a blob of the wrong length, a wrong length is refused here: the file is
//! checksummed, so a short blob is a bug or a hand edit, never a kernel ABI change.

use base64::Engine;
use serde::{Deserialize, Deserializer, Serializer};
use zerocopy::{FromBytes, Immutable, IntoBytes};

fn encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn decode<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(d)?;
    base64::engine::general_purpose::STANDARD
        .decode(text.as_bytes())
        .map_err(serde::de::Error::custom)
}

/// Why a blob does not decode into a KVM struct.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{len} bytes for a {size}-byte {type_name}")]
pub struct LengthError {
    pub len: usize,
    pub size: usize,
    pub type_name: &'static str,
}

/// A `T` from exactly `size_of::<T>()` bytes.
pub fn from_bytes<T: FromBytes>(bytes: &[u8]) -> Result<T, LengthError> {
    T::read_from_bytes(bytes).map_err(|_| LengthError {
        len: bytes.len(),
        size: std::mem::size_of::<T>(),
        type_name: std::any::type_name::<T>(),
    })
}

/// `#[serde(with = "blob::kvm")]`: one KVM struct as a base64 string.
pub mod kvm {
    use super::*;

    pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(
        value: &T,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(value.as_bytes()))
    }

    pub fn deserialize<'de, T: FromBytes, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        from_bytes(&decode(d)?).map_err(serde::de::Error::custom)
    }
}

/// `#[serde(with = "blob::kvm_list")]`: KVM structs back to back in one base64 string.
pub mod kvm_list {
    use super::*;

    pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(
        values: &[T],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(values.as_bytes()))
    }

    pub fn deserialize<'de, T: FromBytes, D: Deserializer<'de>>(d: D) -> Result<Vec<T>, D::Error> {
        let bytes = decode(d)?;
        let size = std::mem::size_of::<T>();
        if size == 0 || !bytes.len().is_multiple_of(size) {
            return Err(serde::de::Error::custom(format!(
                "{} bytes are not a whole number of {size}-byte {}",
                bytes.len(),
                std::any::type_name::<T>()
            )));
        }
        bytes
            .chunks_exact(size)
            .map(|chunk| from_bytes(chunk).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_msr_entry, kvm_regs};
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        #[serde(with = "kvm")]
        regs: kvm_regs,
        #[serde(with = "kvm_list")]
        msrs: Vec<kvm_msr_entry>,
    }

    fn sample() -> Sample {
        Sample {
            regs: kvm_regs {
                rip: 0x10_0000,
                rflags: 2,
                ..Default::default()
            },
            msrs: vec![
                kvm_msr_entry {
                    index: 0x10,
                    data: 7,
                    ..Default::default()
                },
                kvm_msr_entry {
                    index: 0x6e0,
                    data: 9,
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn kvm_structs_round_trip_as_base64_of_their_bytes() {
        let json = serde_json::to_value(sample()).unwrap();
        let regs = json["regs"].as_str().expect("a base64 string");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(regs)
            .unwrap();
        assert_eq!(bytes.len(), std::mem::size_of::<kvm_regs>());
        assert_eq!(bytes, sample().regs.as_bytes());
        let back: Sample = serde_json::from_value(json).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn wrong_lengths_are_refused_not_padded() {
        let mut json = serde_json::to_value(sample()).unwrap();
        json["regs"] = serde_json::json!("AAAA");
        let err = serde_json::from_value::<Sample>(json)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 bytes for a"), "{err}");

        let mut json = serde_json::to_value(sample()).unwrap();
        json["msrs"] = serde_json::json!(encode(&[0u8; 17]));
        let err = serde_json::from_value::<Sample>(json)
            .unwrap_err()
            .to_string();
        assert!(err.contains("17 bytes are not a whole number"), "{err}");
    }
}
