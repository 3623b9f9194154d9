//! Director assignments: Uptane's split of trust between the image repository (what
//! operators released) and the director (which release each device should run).
//!
//! The fleet server's online director key signs, per device, which target each model slot
//! should run. A device accepts an assignment only if every slot names a target of the
//! verified image repository *exactly* (path, length, every common hash), so a
//! compromised server can only move devices between releases operators signed and still
//! list.
//!
//! # Key anchoring
//! The director's keys are anchored in the image repository's root: root lists a role
//! named `director` (key ids and threshold, keys in root `keys`). Rotating the director
//! key is a root rotation, signed by the offline root keys. TUF clients ignore the extra
//! role.
//!
//! # Format
//! ```json
//! {"signed": {"_type": "director-assignment", "spec_version": "1.0.31",
//!             "device_id": "dev-1", "counter": 7, "expires": "2030-01-01T00:00:00Z",
//!             "targets": {"digits": {"path": "models/digits-1.2.onnx",
//!                                    "length": 1234, "hashes": {"sha256": "..."}}}},
//!  "signatures": [{"keyid": "...", "sig": "..."}]}
//! ```
//!
//! # Counter
//! `counter` orders the assignments of one device. A strictly greater counter is a new
//! assignment. An equal counter is accepted only for the very same signed content (the
//! retained MQTT message delivered again after a reconnect): the caller keeps the
//! [`CounterState`] of the last accepted assignment. A lower counter, or an equal counter
//! with different content, is rejected as a replay.
//!
//! # Renewal
//! Assignments expire. Before that the director re-signs the same targets with a later
//! `expires` and, since the content changed, a greater counter; the renewal says
//! `"renews": O`, the counter of the assignment whose targets it repeats (the operator's
//! original, not an earlier renewal). A device whose last accepted counter is `O` or
//! more has acted on those targets already: [`AcceptedAssignment::renewal`] tells it
//! that nothing is to be done (no download, no activation, no retry of a release it
//! refused). A device that missed `O` treats the renewal as the new assignment it is.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::tuf::metadata::{Envelope, Hashes, RoleMetadata, Root, SPEC_VERSION};
use crate::tuf::target::TargetInfo;
use crate::tuf::time::UtcTime;
use crate::tuf::verify::{Verified, verify_threshold};

/// Name of the root role whose keys sign assignments.
pub const DIRECTOR_ROLE: &str = "director";

/// Largest assignment document accepted.
pub const MAX_ASSIGNMENT_BYTES: u64 = 64 * 1024;

/// Why an assignment was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirectorError {
    /// The document is malformed, too large, of the wrong `_type`, or not signed by a
    /// threshold of director keys.
    #[error("assignment rejected: {0}")]
    Metadata(#[from] crate::tuf::Error),
    /// The trusted root lists no `director` role.
    #[error("the trusted root has no {DIRECTOR_ROLE} role")]
    NoDirectorRole,
    /// The assignment is for another device.
    #[error("assignment for device {found:?}, this device is {expected:?}")]
    WrongDevice {
        /// This device.
        expected: String,
        /// Device named by the assignment.
        found: String,
    },
    /// Older counter than the last accepted one (replay).
    #[error("replayed assignment: counter {offered}, last accepted {last}")]
    Replayed {
        /// Last accepted counter.
        last: u64,
        /// Counter offered.
        offered: u64,
    },
    /// Same counter as the last accepted assignment but different content.
    #[error("counter {counter} reused for different assignment content")]
    CounterReused {
        /// The counter.
        counter: u64,
    },
    /// Expired.
    #[error("assignment expired at {expires} (now {now})")]
    Expired {
        /// Its `expires`.
        expires: UtcTime,
        /// The trusted time.
        now: UtcTime,
    },
    /// A slot names a path no verified image-repository role lists.
    #[error("slot {slot:?}: target {path:?} is not in the image repository")]
    TargetNotInImageRepo {
        /// Model slot.
        slot: String,
        /// Target path.
        path: String,
    },
    /// Lengths differ.
    #[error("slot {slot:?}: {path:?} length {director} differs from image repository {image}")]
    LengthMismatch {
        /// Model slot.
        slot: String,
        /// Target path.
        path: String,
        /// Director's length.
        director: u64,
        /// Image repository's length.
        image: u64,
    },
    /// A hash both sides list differs.
    #[error("slot {slot:?}: {path:?} {algorithm} hash differs from image repository")]
    HashMismatch {
        /// Model slot.
        slot: String,
        /// Target path.
        path: String,
        /// Algorithm.
        algorithm: String,
        /// Director's hash.
        director: String,
        /// Image repository's hash.
        image: String,
    },
    /// The two sides share no hash algorithm, so nothing binds the director's entry to
    /// the image repository's bytes.
    #[error("slot {slot:?}: {path:?} has no hash algorithm in common with the image repository")]
    NoCommonHash {
        /// Model slot.
        slot: String,
        /// Target path.
        path: String,
    },
    /// Looking the target up in the image repository failed.
    #[error("slot {slot:?}: image repository lookup failed: {source}")]
    Lookup {
        /// Model slot.
        slot: String,
        /// The TUF error.
        source: crate::tuf::Error,
    },
}

/// The target a model slot should run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotTarget {
    /// Target path in the image repository.
    pub path: String,
    /// Length in bytes.
    pub length: u64,
    /// Hashes (at least one algorithm in common with the image repository).
    pub hashes: Hashes,
    /// Unknown fields, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl SlotTarget {
    /// The slot entry for an image-repository target.
    pub fn from_target(info: &TargetInfo) -> Self {
        SlotTarget {
            path: info.path.clone(),
            length: info.file.length,
            hashes: info.file.hashes.clone(),
            extra: BTreeMap::new(),
        }
    }
}

/// A director assignment: which target each model slot of one device should run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// Always `director-assignment`.
    #[serde(rename = "_type")]
    pub type_: String,
    /// Specification version (TUF's, `1.x`).
    pub spec_version: String,
    /// Device the assignment is for.
    pub device_id: String,
    /// Per-device counter; only increases.
    pub counter: u64,
    /// Expiry.
    pub expires: UtcTime,
    /// Model slot name → target.
    pub targets: BTreeMap<String, SlotTarget>,
    /// For a renewal: the counter of the assignment whose targets this one repeats (see
    /// "Renewal" in the module docs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renews: Option<u64>,
    /// Unknown fields, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl RoleMetadata for Assignment {
    const TYPE: &'static str = "director-assignment";
    fn spec_version(&self) -> &str {
        &self.spec_version
    }
    // The counter stands in for the version; 0 is a valid first counter.
    fn version(&self) -> u64 {
        self.counter.max(1)
    }
    fn expires(&self) -> UtcTime {
        self.expires
    }
}

impl Assignment {
    /// An assignment with no slots.
    pub fn new(device_id: &str, counter: u64, expires: UtcTime) -> Self {
        Assignment {
            type_: Self::TYPE.into(),
            spec_version: SPEC_VERSION.into(),
            device_id: device_id.into(),
            counter,
            expires,
            targets: BTreeMap::new(),
            renews: None,
            extra: BTreeMap::new(),
        }
    }
}

/// What a device remembers of its last accepted assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterState {
    /// Its counter.
    pub counter: u64,
    /// SHA-256 of its canonical signed content, hex.
    #[serde(with = "hex_digest")]
    pub digest: [u8; 32],
}

mod hex_digest {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(s).map_err(serde::de::Error::custom)?;
        v.try_into()
            .map_err(|_| serde::de::Error::custom("digest is not 32 bytes"))
    }
}

/// A verified assignment together with the counter state to persist once it is acted on.
#[derive(Debug, Clone, PartialEq)]
pub struct AcceptedAssignment {
    /// The assignment.
    pub assignment: Verified<Assignment>,
    /// Counter and content digest to pass as `last` next time.
    pub state: CounterState,
    /// True when this is the last accepted assignment delivered again.
    pub redelivered: bool,
    /// True when this is a renewal of targets the device already acted on: a greater
    /// counter whose `renews` is at most the last accepted counter. Persist `state`;
    /// there is nothing else to do.
    pub renewal: bool,
}

/// Signs an assignment with director keys, returning the document bytes.
pub fn sign_assignment(
    assignment: &Assignment,
    keys: &[&crate::tuf::SigningKey],
) -> Result<Vec<u8>, DirectorError> {
    Ok(Envelope::sign_document(assignment, keys)?)
}

/// Verifies a director assignment for `device_id`.
///
/// `root` is the device's trusted image-repository root (it anchors the director keys);
/// `lookup` resolves a target path in the verified image repository (e.g.
/// `|p| updater.get_target_info(p)`); `last` is the state of the last accepted
/// assignment; `now` the trusted time.
pub fn verify_assignment(
    bytes: &[u8],
    root: &Verified<Root>,
    lookup: &mut dyn FnMut(&str) -> crate::tuf::Result<Option<Verified<TargetInfo>>>,
    device_id: &str,
    last: Option<&CounterState>,
    now: UtcTime,
) -> Result<AcceptedAssignment, DirectorError> {
    let env = Envelope::from_bytes(Assignment::TYPE, bytes, MAX_ASSIGNMENT_BYTES)?;
    let assignment: Assignment = env.parse_signed()?;
    let msg = env.canonical_signed()?;
    let role = root
        .roles
        .get(DIRECTOR_ROLE)
        .ok_or(DirectorError::NoDirectorRole)?;
    verify_threshold(
        DIRECTOR_ROLE,
        &role.keyids,
        role.threshold,
        &root.keys,
        &msg,
        &env.signatures,
    )?;
    if assignment.device_id != device_id {
        return Err(DirectorError::WrongDevice {
            expected: device_id.into(),
            found: assignment.device_id.chars().take(128).collect(),
        });
    }
    let digest: [u8; 32] = Sha256::digest(&msg).into();
    let mut redelivered = false;
    let mut renewal = false;
    if let Some(last) = last {
        if assignment.counter < last.counter {
            return Err(DirectorError::Replayed {
                last: last.counter,
                offered: assignment.counter,
            });
        }
        if assignment.counter == last.counter {
            if digest != last.digest {
                return Err(DirectorError::CounterReused {
                    counter: assignment.counter,
                });
            }
            redelivered = true;
        }
        renewal = !redelivered
            && assignment
                .renews
                .is_some_and(|o| o < assignment.counter && o <= last.counter);
    }
    if assignment.expires <= now {
        return Err(DirectorError::Expired {
            expires: assignment.expires,
            now,
        });
    }
    for (slot, want) in &assignment.targets {
        let image = lookup(&want.path)
            .map_err(|source| DirectorError::Lookup {
                slot: slot.clone(),
                source,
            })?
            .ok_or_else(|| DirectorError::TargetNotInImageRepo {
                slot: slot.clone(),
                path: want.path.clone(),
            })?;
        check_slot(slot, want, &image)?;
    }
    Ok(AcceptedAssignment {
        state: CounterState {
            counter: assignment.counter,
            digest,
        },
        assignment: Verified::new_verified(assignment),
        redelivered,
        renewal,
    })
}

fn check_slot(slot: &str, want: &SlotTarget, image: &TargetInfo) -> Result<(), DirectorError> {
    if want.length != image.file.length {
        return Err(DirectorError::LengthMismatch {
            slot: slot.into(),
            path: want.path.clone(),
            director: want.length,
            image: image.file.length,
        });
    }
    let mut common = 0;
    for (alg, d) in &want.hashes {
        if let Some(i) = image.file.hashes.get(alg) {
            if !d.eq_ignore_ascii_case(i) {
                return Err(DirectorError::HashMismatch {
                    slot: slot.into(),
                    path: want.path.clone(),
                    algorithm: alg.clone(),
                    director: d.chars().take(128).collect(),
                    image: i.clone(),
                });
            }
            common += 1;
        }
    }
    if common == 0 {
        return Err(DirectorError::NoCommonHash {
            slot: slot.into(),
            path: want.path.clone(),
        });
    }
    Ok(())
}
