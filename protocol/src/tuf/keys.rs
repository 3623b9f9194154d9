//! Public keys as TUF metadata lists them, signature verification for the three key
//! types TUF tooling uses, and Ed25519 signing keys for Outpost's own signers.
//!
//! | keytype | scheme | `keyval.public` | signature (`sig`) |
//! |---|---|---|---|
//! | `ed25519` | `ed25519` | 32 bytes, hex | 64 bytes, hex |
//! | `ecdsa` or `ecdsa-sha2-nistp256` | `ecdsa-sha2-nistp256` | PEM SubjectPublicKeyInfo (or SEC1 hex) | DER (or 64-byte r‖s), hex |
//! | `rsa` | `rsassa-pss-sha256` | PEM SubjectPublicKeyInfo | hex |
//!
//! Only Ed25519 can sign here; the others verify only. RSA-PSS signatures are accepted
//! with salt length equal to the digest length (securesystemslib's signers) or the maximum
//! salt length (pyca's `PSS.MAX_LENGTH`), which covers what `PSS.AUTO` verifiers meet in
//! practice; the `rsa` crate verifies one fixed salt length per attempt.

use std::collections::BTreeMap;
use std::fmt;

use ed25519_dalek::Signer as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::canonical::{CanonicalError, to_canonical_json};

/// A public key entry of root `keys` or delegation `keys`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Key {
    /// Key type: `ed25519`, `ecdsa`, `ecdsa-sha2-nistp256` or `rsa`.
    pub keytype: String,
    /// Signature scheme: `ed25519`, `ecdsa-sha2-nistp256` or `rsassa-pss-sha256`.
    pub scheme: String,
    /// Key material.
    pub keyval: KeyVal,
    /// Unknown fields (e.g. `keyid_hash_algorithms`), kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// `keyval` of a key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyVal {
    /// The public key, encoded as the key type requires.
    pub public: String,
    /// Unknown fields, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// Why a key or signature is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The (keytype, scheme) pair is not one this crate verifies.
    #[error("unsupported key type {keytype:?} with scheme {scheme:?}")]
    Unsupported {
        /// `keytype` of the key.
        keytype: String,
        /// `scheme` of the key.
        scheme: String,
    },
    /// The public key does not decode.
    #[error("malformed {keytype} public key: {reason}")]
    MalformedKey {
        /// `keytype` of the key.
        keytype: String,
        /// What is wrong.
        reason: String,
    },
    /// The signature does not decode (not hex, wrong length, bad DER).
    #[error("malformed signature: {0}")]
    MalformedSignature(String),
    /// The signature is well-formed but does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// The key object cannot be canonicalized (for its key id).
    #[error("key has no canonical form: {0}")]
    Canonical(#[from] CanonicalError),
}

impl Key {
    /// An Ed25519 key entry for a raw 32-byte public key.
    pub fn ed25519(public: &[u8; 32]) -> Self {
        Key {
            keytype: "ed25519".into(),
            scheme: "ed25519".into(),
            keyval: KeyVal {
                public: hex::encode(public),
                extra: BTreeMap::new(),
            },
            extra: BTreeMap::new(),
        }
    }

    /// The key id TUF assigns this key: hex SHA-256 of the canonical JSON of the key object
    /// (`keytype`, `scheme`, `keyval` and any extra fields), as securesystemslib computes it.
    ///
    /// Metadata may list a key under another id; verification uses the ids as listed
    /// (like python-tuf) and counts each distinct key material once toward a threshold.
    pub fn key_id(&self) -> Result<String, KeyError> {
        let value = serde_json::to_value(self).map_err(|e| KeyError::MalformedKey {
            keytype: self.keytype.clone(),
            reason: e.to_string(),
        })?;
        Ok(hex::encode(Sha256::digest(to_canonical_json(&value)?)))
    }

    /// Verifies `sig_hex` (the `sig` field of a signature) over `msg`.
    pub fn verify(&self, msg: &[u8], sig_hex: &str) -> Result<(), KeyError> {
        let sig = hex::decode(sig_hex)
            .map_err(|e| KeyError::MalformedSignature(format!("not hex: {e}")))?;
        match (self.keytype.as_str(), self.scheme.as_str()) {
            ("ed25519", "ed25519") => self.verify_ed25519(msg, &sig),
            ("ecdsa" | "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp256") => self.verify_p256(msg, &sig),
            ("rsa", "rsassa-pss-sha256") => self.verify_rsa_pss(msg, &sig),
            (keytype, scheme) => Err(KeyError::Unsupported {
                keytype: keytype.into(),
                scheme: scheme.into(),
            }),
        }
    }

    fn malformed(&self, reason: impl fmt::Display) -> KeyError {
        KeyError::MalformedKey {
            keytype: self.keytype.clone(),
            reason: reason.to_string(),
        }
    }

    fn verify_ed25519(&self, msg: &[u8], sig: &[u8]) -> Result<(), KeyError> {
        let public: [u8; 32] = hex::decode(&self.keyval.public)
            .map_err(|e| self.malformed(e))?
            .try_into()
            .map_err(|_| self.malformed("public key is not 32 bytes"))?;
        let key =
            ed25519_dalek::VerifyingKey::from_bytes(&public).map_err(|e| self.malformed(e))?;
        let sig = ed25519_dalek::Signature::from_slice(sig)
            .map_err(|e| KeyError::MalformedSignature(e.to_string()))?;
        key.verify_strict(msg, &sig)
            .map_err(|_| KeyError::BadSignature)
    }

    fn verify_p256(&self, msg: &[u8], sig: &[u8]) -> Result<(), KeyError> {
        use p256::ecdsa::signature::Verifier as _;
        use p256::pkcs8::DecodePublicKey as _;
        let public = self.keyval.public.trim();
        let key = if public.starts_with("-----BEGIN") {
            p256::ecdsa::VerifyingKey::from_public_key_pem(public).map_err(|e| self.malformed(e))?
        } else {
            let sec1 = hex::decode(public).map_err(|e| self.malformed(e))?;
            p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).map_err(|e| self.malformed(e))?
        };
        let sig = p256::ecdsa::Signature::from_der(sig)
            .or_else(|_| p256::ecdsa::Signature::from_slice(sig))
            .map_err(|e| KeyError::MalformedSignature(e.to_string()))?;
        key.verify(msg, &sig).map_err(|_| KeyError::BadSignature)
    }

    fn verify_rsa_pss(&self, msg: &[u8], sig: &[u8]) -> Result<(), KeyError> {
        use rsa::pkcs8::DecodePublicKey as _;
        use rsa::traits::PublicKeyParts as _;
        let key = rsa::RsaPublicKey::from_public_key_pem(self.keyval.public.trim())
            .map_err(|e| self.malformed(e))?;
        let hashed = Sha256::digest(msg);
        let digest_len = 32;
        let em_len = (key.n().bits() + 6) / 8;
        let max_salt = em_len.saturating_sub(digest_len + 2);
        for salt in [digest_len, max_salt] {
            let scheme = rsa::pss::Pss::new_with_salt::<Sha256>(salt);
            if key.verify(scheme, &hashed, sig).is_ok() {
                return Ok(());
            }
        }
        Err(KeyError::BadSignature)
    }
}

/// An Ed25519 signing key. Built from 32 secret bytes the caller draws (this crate has no
/// RNG): `outpostctl` uses `getrandom`, tests use fixed seeds.
#[derive(Clone)]
pub struct SigningKey {
    inner: ed25519_dalek::SigningKey,
    key: Key,
    key_id: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// The key for a 32-byte secret seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let inner = ed25519_dalek::SigningKey::from_bytes(&seed);
        let key = Key::ed25519(inner.verifying_key().as_bytes());
        let key_id = key
            .key_id()
            .expect("an ed25519 key object always canonicalizes");
        SigningKey { inner, key, key_id }
    }

    /// The secret seed, for storing the key. Handle with care.
    pub fn seed(&self) -> [u8; 32] {
        self.inner.to_bytes()
    }

    /// The public key entry to list in metadata.
    pub fn public_key(&self) -> &Key {
        &self.key
    }

    /// The key id of [`SigningKey::public_key`].
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Signs `msg`, returning the `sig` hex string.
    pub fn sign_hex(&self, msg: &[u8]) -> String {
        hex::encode(self.inner.sign(msg).to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ed25519_sign_verify_and_tamper() {
        let k = SigningKey::from_seed([7; 32]);
        let sig = k.sign_hex(b"message");
        k.public_key().verify(b"message", &sig).unwrap();
        assert_eq!(
            k.public_key().verify(b"messagE", &sig),
            Err(KeyError::BadSignature)
        );
        let other = SigningKey::from_seed([8; 32]);
        assert_eq!(
            other.public_key().verify(b"message", &sig),
            Err(KeyError::BadSignature)
        );
        assert!(matches!(
            k.public_key().verify(b"message", "zz"),
            Err(KeyError::MalformedSignature(_))
        ));
        assert!(matches!(
            k.public_key().verify(b"message", "abcd"),
            Err(KeyError::MalformedSignature(_))
        ));
    }

    #[test]
    fn key_id_is_sha256_of_canonical_key_object() {
        let k = SigningKey::from_seed([1; 32]);
        let canonical = format!(
            r#"{{"keytype":"ed25519","keyval":{{"public":"{}"}},"scheme":"ed25519"}}"#,
            k.public_key().keyval.public
        );
        assert_eq!(
            k.key_id(),
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
    }

    #[test]
    fn rejects_unknown_key_types_and_malformed_keys() {
        let mut key = Key::ed25519(&[0; 32]);
        key.keytype = "dsa".into();
        assert!(matches!(
            key.verify(b"m", "00"),
            Err(KeyError::Unsupported { .. })
        ));
        let mut key = Key::ed25519(&[0; 32]);
        key.keyval.public = "abcd".into();
        assert!(matches!(
            key.verify(b"m", &"00".repeat(64)),
            Err(KeyError::MalformedKey { .. })
        ));
        let mut key = Key::ed25519(&[0; 32]);
        key.keytype = "rsa".into();
        key.scheme = "rsassa-pss-sha256".into();
        assert!(matches!(
            key.verify(b"m", "00"),
            Err(KeyError::MalformedKey { .. })
        ));
    }

    #[test]
    fn verifies_ecdsa_p256_der_signatures_with_pem_keys() {
        use p256::ecdsa::signature::Signer as _;
        use p256::pkcs8::{EncodePublicKey as _, LineEnding};
        let sk = p256::ecdsa::SigningKey::from_slice(&[3; 32]).unwrap();
        let pem = sk
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        let key = Key {
            keytype: "ecdsa".into(),
            scheme: "ecdsa-sha2-nistp256".into(),
            keyval: KeyVal {
                public: pem,
                extra: BTreeMap::new(),
            },
            extra: BTreeMap::new(),
        };
        let sig: p256::ecdsa::Signature = sk.sign(b"payload");
        let der = hex::encode(sig.to_der().as_bytes());
        key.verify(b"payload", &der).unwrap();
        assert_eq!(key.verify(b"payloaD", &der), Err(KeyError::BadSignature));
    }
}
