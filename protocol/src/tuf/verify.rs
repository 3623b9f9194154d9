//! Signature thresholds and the [`Verified`] wrapper.
//!
//! A `Verified<T>` can only be built inside this crate, by code that checked signatures
//! (and, for the client workflow, versions, hashes and expiry) first: it has a private
//! field, no public constructor and no `Deserialize`.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;

use super::keys::Key;
use super::metadata::Signature;
use super::{Error, Result};

/// A value that passed verification. Dereferences to the value.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified<T> {
    value: T,
}

impl<T> Verified<T> {
    /// Wraps a value that verification has accepted. Crate-private by design.
    pub(crate) fn new_verified(value: T) -> Self {
        Verified { value }
    }

    /// The verified value.
    pub fn into_inner(self) -> T {
        self.value
    }
}

impl<T> Deref for Verified<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> AsRef<T> for Verified<T> {
    fn as_ref(&self) -> &T {
        &self.value
    }
}

/// Checks that at least `threshold` distinct authorized keys signed `msg`.
///
/// Two signatures with the same key id reject the document outright (python-tuf refuses
/// to parse it). Signatures by key ids not in `keyids`, or not in `keys`, are ignored,
/// and two key ids with the same key material count once. Malformed or unsupported keys,
/// and signatures that do not verify, simply do not count.
pub(crate) fn verify_threshold(
    role: &str,
    keyids: &[String],
    threshold: u64,
    keys: &BTreeMap<String, Key>,
    msg: &[u8],
    signatures: &[Signature],
) -> Result<()> {
    let mut seen_ids: BTreeSet<&str> = BTreeSet::new();
    for sig in signatures {
        if !seen_ids.insert(sig.keyid.as_str()) {
            return Err(Error::DuplicateSignature {
                role: role.into(),
                keyid: sig.keyid.chars().take(128).collect(),
            });
        }
    }
    let mut counted_material: BTreeSet<(&str, &str)> = BTreeSet::new();
    for sig in signatures {
        if !keyids.contains(&sig.keyid) {
            continue;
        }
        let Some(key) = keys.get(&sig.keyid) else {
            continue;
        };
        if key.verify(msg, &sig.sig).is_ok() {
            counted_material.insert((key.keytype.as_str(), key.keyval.public.as_str()));
        }
    }
    let valid = counted_material.len() as u64;
    if threshold == 0 || valid < threshold {
        return Err(Error::ThresholdNotMet {
            role: role.into(),
            threshold,
            valid,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tuf::keys::SigningKey;

    fn setup(n: u8) -> (Vec<SigningKey>, BTreeMap<String, Key>, Vec<String>) {
        let ks: Vec<SigningKey> = (1..=n).map(|i| SigningKey::from_seed([i; 32])).collect();
        let keys = ks
            .iter()
            .map(|k| (k.key_id().to_owned(), k.public_key().clone()))
            .collect();
        let ids = ks.iter().map(|k| k.key_id().to_owned()).collect();
        (ks, keys, ids)
    }

    fn sig(k: &SigningKey, msg: &[u8]) -> Signature {
        Signature {
            keyid: k.key_id().into(),
            sig: k.sign_hex(msg),
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn rejects_duplicate_signature_key_ids_even_above_threshold() {
        let (ks, keys, ids) = setup(2);
        let sigs = vec![sig(&ks[0], b"m"), sig(&ks[0], b"m")];
        let err = verify_threshold("r", &ids, 1, &keys, b"m", &sigs).unwrap_err();
        assert!(matches!(err, Error::DuplicateSignature { .. }), "{err}");
        let sigs = vec![sig(&ks[0], b"m"), sig(&ks[1], b"m")];
        verify_threshold("r", &ids, 2, &keys, b"m", &sigs).unwrap();
    }

    #[test]
    fn invalid_extra_signature_does_not_spoil_a_met_threshold() {
        let (ks, keys, ids) = setup(2);
        let mut bad = sig(&ks[1], b"m");
        bad.sig = String::new();
        verify_threshold("r", &ids, 1, &keys, b"m", &[sig(&ks[0], b"m"), bad]).unwrap();
    }

    #[test]
    fn same_key_under_two_ids_counts_once() {
        let (ks, mut keys, mut ids) = setup(1);
        keys.insert("alias".into(), ks[0].public_key().clone());
        ids.push("alias".into());
        let mut aliased = sig(&ks[0], b"m");
        aliased.keyid = "alias".into();
        let sigs = vec![sig(&ks[0], b"m"), aliased];
        assert!(verify_threshold("r", &ids, 2, &keys, b"m", &sigs).is_err());
    }

    #[test]
    fn unauthorized_key_signatures_are_ignored() {
        let (ks, keys, ids) = setup(2);
        let sigs = vec![sig(&ks[1], b"m")];
        assert!(verify_threshold("r", &ids[..1], 1, &keys, b"m", &sigs).is_err());
        verify_threshold("r", &ids[1..], 1, &keys, b"m", &sigs).unwrap();
    }
}
