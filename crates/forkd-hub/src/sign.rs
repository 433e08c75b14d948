//! minisign-compatible signatures over packs, and the user's trust policy.
//!
//! Signing uses the `minisign` crate (prehashed "ED" signatures, what `minisign -S` makes by
//! default, so `minisign -V` verifies ours). Verification is done here from the documented
//! format so it can run on a BLAKE2b-512 digest computed while the pack streams in, instead
//! of re-reading the pack:
//! - public key: base64("Ed" || key id (8) || ed25519 public key (32))
//! - signature file: `untrusted comment: …`, base64("ED" || key id || sig(BLAKE2b-512(data))),
//!   `trusted comment: …`, base64(sig(sig || trusted comment bytes)).

use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine;
use blake2::{Blake2b512, Digest};
use ed25519_dalek::{Signature, VerifyingKey};
use serde::Deserialize;

use crate::error::{HubError, Result};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A trusted minisign public key.
#[derive(Debug, Clone)]
pub struct PublicKey {
    pub key_id: [u8; 8],
    key: VerifyingKey,
}

impl PublicKey {
    /// Parses the base64 key line (or a whole `.pub` file's text).
    pub fn parse(text: &str) -> Result<PublicKey> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
            .unwrap_or("");
        let bad = |why: &str| HubError::Signature(format!("public key {line:?}: {why}"));
        let raw = B64.decode(line).map_err(|_| bad("not base64"))?;
        if raw.len() != 42 || &raw[..2] != b"Ed" {
            return Err(bad("not a minisign Ed25519 public key"));
        }
        let key = VerifyingKey::from_bytes(raw[10..42].try_into().expect("32 bytes"))
            .map_err(|_| bad("invalid Ed25519 point"))?;
        Ok(PublicKey {
            key_id: raw[2..10].try_into().expect("8 bytes"),
            key,
        })
    }

    pub fn id_hex(&self) -> String {
        key_id_hex(&self.key_id)
    }
}

/// minisign prints key ids as the little-endian u64 in upper-case hex.
fn key_id_hex(id: &[u8; 8]) -> String {
    format!("{:016X}", u64::from_le_bytes(*id))
}

/// A parsed `.minisig` file.
#[derive(Debug, Clone)]
pub struct SignatureFile {
    pub key_id: [u8; 8],
    sig: Signature,
    trusted_comment: String,
    global_sig: Signature,
}

impl SignatureFile {
    pub fn parse(text: &str) -> Result<SignatureFile> {
        let bad = |why: &str| HubError::Signature(format!("malformed signature: {why}"));
        let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
        if lines.len() < 4 || !lines[0].starts_with("untrusted comment:") {
            return Err(bad("expected 4 lines starting with an untrusted comment"));
        }
        let raw = B64.decode(lines[1].trim()).map_err(|_| bad("not base64"))?;
        if raw.len() != 74 {
            return Err(bad("wrong length"));
        }
        match &raw[..2] {
            b"ED" => {}
            b"Ed" => return Err(bad("legacy (non-prehashed) signatures are not accepted")),
            _ => return Err(bad("unknown signature algorithm")),
        }
        let trusted_comment = lines[2]
            .strip_prefix("trusted comment: ")
            .ok_or_else(|| bad("third line is not a trusted comment"))?
            .to_string();
        let global = B64.decode(lines[3].trim()).map_err(|_| bad("not base64"))?;
        let global: [u8; 64] = global
            .try_into()
            .map_err(|_| bad("wrong global signature length"))?;
        Ok(SignatureFile {
            key_id: raw[2..10].try_into().expect("8 bytes"),
            sig: Signature::from_bytes(raw[10..74].try_into().expect("64 bytes")),
            trusted_comment,
            global_sig: Signature::from_bytes(&global),
        })
    }

    pub fn trusted_comment(&self) -> &str {
        &self.trusted_comment
    }

    /// Checks the signature over data whose BLAKE2b-512 digest is `prehash`.
    pub fn verify(&self, key: &PublicKey, prehash: &[u8]) -> Result<()> {
        if key.key_id != self.key_id {
            return Err(HubError::Signature(format!(
                "made with key {}, not {}",
                key_id_hex(&self.key_id),
                key.id_hex()
            )));
        }
        key.key
            .verify_strict(prehash, &self.sig)
            .map_err(|_| HubError::Signature("does not match the pack (tampered?)".into()))?;
        let mut signed = self.sig.to_bytes().to_vec();
        signed.extend_from_slice(self.trusted_comment.as_bytes());
        key.key
            .verify_strict(&signed, &self.global_sig)
            .map_err(|_| HubError::Signature("trusted comment was tampered with".into()))
    }
}

/// Streaming BLAKE2b-512, the minisign prehash.
#[derive(Default, Clone)]
pub struct Prehasher(Blake2b512);

impl Prehasher {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> Vec<u8> {
        self.0.finalize().to_vec()
    }
}

/// Signs `data` with a minisign secret key file; returns the `.minisig` text.
/// Encrypted keys take their password from `FORKD_SIGN_PASSWORD`.
pub fn sign<R: Read>(key_file: &Path, data: R, trusted_comment: &str) -> Result<String> {
    let password = std::env::var("FORKD_SIGN_PASSWORD").unwrap_or_default();
    let sk = minisign::SecretKey::from_file(key_file, Some(password)).map_err(|e| {
        HubError::Signature(format!(
            "cannot load secret key {}: {e} (encrypted keys need FORKD_SIGN_PASSWORD)",
            key_file.display()
        ))
    })?;
    let sig = minisign::sign(
        None,
        &sk,
        data,
        Some(trusted_comment),
        Some("signature from forkd secret key"),
    )
    .map_err(|e| HubError::Signature(format!("signing failed: {e}")))?;
    Ok(sig.to_string())
}

/// What the user trusts, from `trust.toml`:
///
/// ```toml
/// require_signatures = true
/// trusted_keys = ["RWQ…"]              # minisign public key lines
/// trusted_key_files = ["/etc/forkd/acme.pub"]
/// ```
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    pub require_signatures: bool,
    pub keys: Vec<PublicKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustFile {
    #[serde(default)]
    require_signatures: bool,
    #[serde(default)]
    trusted_keys: Vec<String>,
    #[serde(default)]
    trusted_key_files: Vec<PathBuf>,
}

impl TrustPolicy {
    /// `FORKD_TRUST_FILE`, else `$XDG_CONFIG_HOME/forkd/trust.toml`, else
    /// `~/.config/forkd/trust.toml`.
    pub fn default_path() -> PathBuf {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if let Some(p) = var("FORKD_TRUST_FILE") {
            return p;
        }
        crate::config::config_dir()
            .unwrap_or_else(|| PathBuf::from("/root/.config"))
            .join("forkd/trust.toml")
    }

    /// Loads the policy; a missing file means "no keys, signatures optional".
    pub fn load(path: &Path) -> Result<TrustPolicy> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TrustPolicy::default()),
            Err(e) => return Err(HubError::io(path, e)),
        };
        let file: TrustFile = toml::from_str(&text).map_err(|e| {
            HubError::Invalid(format!(
                "{}: {}",
                path.display(),
                e.message().lines().next().unwrap_or("malformed")
            ))
        })?;
        let mut keys = Vec::new();
        for k in &file.trusted_keys {
            keys.push(PublicKey::parse(k)?);
        }
        for f in &file.trusted_key_files {
            let text = std::fs::read_to_string(f).map_err(|e| HubError::io(f, e))?;
            keys.push(PublicKey::parse(&text)?);
        }
        Ok(TrustPolicy {
            require_signatures: file.require_signatures,
            keys,
        })
    }

    /// Applies the policy to a pack with an optional signature. `Ok(Some(key id))` when a
    /// trusted key verified it, `Ok(None)` when unsigned or unverifiable and allowed.
    pub fn check(
        &self,
        origin: &str,
        signature: Option<&str>,
        prehash: &[u8],
    ) -> Result<Option<String>> {
        let Some(text) = signature else {
            if self.require_signatures {
                return Err(HubError::Signature(format!(
                    "{origin} is unsigned and the trust policy requires signatures"
                )));
            }
            return Ok(None);
        };
        let sig = SignatureFile::parse(text)
            .map_err(|e| HubError::Signature(format!("{origin}: {e}")))?;
        let Some(key) = self.keys.iter().find(|k| k.key_id == sig.key_id) else {
            if self.require_signatures || !self.keys.is_empty() {
                return Err(HubError::Signature(format!(
                    "{origin} is signed by key {}, which is not trusted",
                    key_id_hex(&sig.key_id)
                )));
            }
            tracing::warn!("{origin} is signed but no trusted keys are configured; not checked");
            return Ok(None);
        };
        sig.verify(key, prehash)
            .map_err(|e| HubError::Signature(format!("{origin}: {e}")))?;
        Ok(Some(key.id_hex()))
    }
}

/// The BLAKE2b-512 prehash of a whole reader (for verifying local files).
pub fn prehash_reader<R: Read>(mut r: R) -> std::io::Result<Vec<u8>> {
    let mut h = Prehasher::default();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

/// A new, unencrypted minisign key pair as (secret key file text, public key file text),
/// in the layout `minisign -G -W` writes, so the minisign tool reads both.
///
/// Secret key: base64(sig_alg "Ed" || kdf_alg 0,0 (none) || chk_alg "B2" || salt (32) ||
/// opslimit (8) || memlimit (8) || key id (8) || ed25519 secret (64) || checksum (32)), where
/// checksum = BLAKE2b-256(sig_alg || key id || secret).
pub fn generate_keypair() -> Result<(String, String)> {
    let kp = minisign::KeyPair::generate_unencrypted_keypair()
        .map_err(|e| HubError::Signature(format!("key generation failed: {e}")))?;
    let mut sk = kp.sk.to_bytes();
    if sk.len() != 158 {
        return Err(HubError::Signature("unexpected secret key layout".into()));
    }
    sk[2] = 0;
    sk[3] = 0;
    let mut chk = blake2::Blake2b::<blake2::digest::consts::U32>::new();
    chk.update(&sk[0..2]);
    chk.update(&sk[54..62]);
    chk.update(&sk[62..126]);
    sk[126..158].copy_from_slice(&chk.finalize());
    let pk = B64.encode(kp.pk.to_bytes());
    let id = key_id_hex(sk[54..62].try_into().expect("8 bytes"));
    Ok((
        format!(
            "untrusted comment: forkd secret key {id}\n{}\n",
            B64.encode(&sk)
        ),
        format!("untrusted comment: forkd public key {id}\n{pk}\n"),
    ))
}
