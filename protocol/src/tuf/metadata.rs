//! TUF metadata in the specification's JSON format (section 4): the signed envelope and
//! the four top-level roles, with delegations.
//!
//! Parsing goes bytes → size cap → generic JSON value → typed struct. The `signed` value
//! is kept as received: signatures are checked over its canonical JSON, so unknown fields
//! are covered by signatures and preserved (`extra` maps) when documents are rebuilt.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256, Sha512};

use super::canonical::to_canonical_json;
use super::keys::{Key, SigningKey};
use super::time::UtcTime;
use super::{Error, Result};

/// The specification version this crate writes.
pub const SPEC_VERSION: &str = "1.0.31";

/// Names of the top-level roles.
pub const TOP_LEVEL_ROLES: [&str; 4] = ["root", "timestamp", "snapshot", "targets"];

/// Hash algorithm name → lowercase hex digest.
pub type Hashes = BTreeMap<String, String>;

/// A signature entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signature {
    /// Id of the signing key.
    pub keyid: String,
    /// Hex signature over the canonical JSON of `signed`.
    pub sig: String,
    /// Unknown fields, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// A signed document as it travels: `{"signed": {...}, "signatures": [...]}`.
///
/// `signed` stays a generic JSON value so that signing and verifying both work on
/// exactly the received object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The signed object.
    pub signed: Value,
    /// Signatures over the canonical JSON of `signed`.
    pub signatures: Vec<Signature>,
}

impl Envelope {
    /// Parses an envelope after checking `bytes` against `max_len`. `what` names the
    /// document in errors.
    pub fn from_bytes(what: &str, bytes: &[u8], max_len: u64) -> Result<Self> {
        if bytes.len() as u64 > max_len {
            return Err(Error::TooLarge {
                what: what.into(),
                len: bytes.len() as u64,
                max: max_len,
            });
        }
        serde_json::from_slice(bytes).map_err(|e| Error::Parse {
            what: what.into(),
            reason: e.to_string(),
        })
    }

    /// An unsigned envelope around a serializable `signed` object.
    pub fn new<T: Serialize>(signed: &T) -> Result<Self> {
        let signed = serde_json::to_value(signed).map_err(|e| Error::Parse {
            what: "signed".into(),
            reason: e.to_string(),
        })?;
        Ok(Envelope {
            signed,
            signatures: Vec::new(),
        })
    }

    /// Serializes `signed`, signs it with every key in `keys` and returns the document
    /// bytes: the one-step form of [`Envelope::new`] + [`Envelope::sign`] +
    /// [`Envelope::to_bytes`].
    pub fn sign_document<T: Serialize>(signed: &T, keys: &[&SigningKey]) -> Result<Vec<u8>> {
        let mut env = Envelope::new(signed)?;
        for key in keys {
            env.sign(key)?;
        }
        Ok(env.to_bytes())
    }

    /// The bytes signatures cover.
    pub fn canonical_signed(&self) -> Result<Vec<u8>> {
        Ok(to_canonical_json(&self.signed)?)
    }

    /// Adds (or replaces) the signature of `key`.
    pub fn sign(&mut self, key: &SigningKey) -> Result<()> {
        let msg = self.canonical_signed()?;
        self.signatures.retain(|s| s.keyid != key.key_id());
        self.signatures.push(Signature {
            keyid: key.key_id().to_owned(),
            sig: key.sign_hex(&msg),
            extra: BTreeMap::new(),
        });
        Ok(())
    }

    /// Serializes to indented JSON bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Deserializes `signed` into a role type, checking the common fields.
    pub fn parse_signed<T: RoleMetadata>(&self) -> Result<T> {
        let found = self
            .signed
            .get("_type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if found != T::TYPE {
            return Err(Error::WrongType {
                expected: T::TYPE,
                found: found.chars().take(64).collect(),
            });
        }
        let parsed: T = serde_json::from_value(self.signed.clone()).map_err(|e| Error::Parse {
            what: T::TYPE.into(),
            reason: e.to_string(),
        })?;
        check_spec_version(T::TYPE, parsed.spec_version())?;
        if parsed.version() == 0 {
            return Err(Error::Invalid {
                what: T::TYPE.into(),
                reason: "version must be at least 1".into(),
            });
        }
        parsed.validate()?;
        Ok(parsed)
    }
}

fn check_spec_version(what: &str, v: &str) -> Result<()> {
    let parts: Vec<&str> = v.split('.').collect();
    let well_formed = matches!(parts.len(), 2 | 3)
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if !well_formed || parts[0] != "1" {
        return Err(Error::UnsupportedSpecVersion {
            what: what.into(),
            found: v.chars().take(32).collect(),
        });
    }
    Ok(())
}

/// Common accessors of the four role types (and director assignments).
pub trait RoleMetadata: DeserializeOwned + Serialize {
    /// The `_type` value.
    const TYPE: &'static str;
    /// `spec_version`.
    fn spec_version(&self) -> &str;
    /// `version`.
    fn version(&self) -> u64;
    /// `expires`.
    fn expires(&self) -> UtcTime;
    /// Role-specific structural checks run after parsing.
    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

macro_rules! role_metadata {
    ($ty:ty, $name:literal) => {
        impl RoleMetadata for $ty {
            const TYPE: &'static str = $name;
            fn spec_version(&self) -> &str {
                &self.spec_version
            }
            fn version(&self) -> u64 {
                self.version
            }
            fn expires(&self) -> UtcTime {
                self.expires
            }
            fn validate(&self) -> Result<()> {
                self.check()
            }
        }
    };
}

/// Key ids and threshold of a role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoleKeys {
    /// Ids of the keys allowed to sign for the role.
    pub keyids: Vec<String>,
    /// Number of distinct keys that must sign (at least 1).
    pub threshold: u64,
    /// Unknown fields, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl RoleKeys {
    /// A role signed by these keys with this threshold.
    pub fn new(keyids: Vec<String>, threshold: u64) -> Self {
        RoleKeys {
            keyids,
            threshold,
            extra: BTreeMap::new(),
        }
    }
}

fn check_role_keys(what: &str, keyids: &[String], threshold: u64) -> Result<()> {
    if threshold < 1 {
        return Err(Error::Invalid {
            what: what.into(),
            reason: "threshold must be at least 1".into(),
        });
    }
    let unique: BTreeSet<&String> = keyids.iter().collect();
    if unique.len() != keyids.len() {
        return Err(Error::Invalid {
            what: what.into(),
            reason: "duplicate key ids".into(),
        });
    }
    Ok(())
}

/// Root metadata: the trust anchor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Root {
    /// Always `root`.
    #[serde(rename = "_type")]
    pub type_: String,
    /// Specification version, `1.x[.y]`.
    pub spec_version: String,
    /// Version, starting at 1, +1 per new root.
    pub version: u64,
    /// Expiry.
    pub expires: UtcTime,
    /// Whether snapshot, targets and target files are fetched by version or hash prefix.
    #[serde(default)]
    pub consistent_snapshot: bool,
    /// Key id → key.
    pub keys: BTreeMap<String, Key>,
    /// Role name (`root`, `timestamp`, `snapshot`, `targets`, and Outpost's `director`)
    /// → keys and threshold.
    pub roles: BTreeMap<String, RoleKeys>,
    /// Unknown fields, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}
role_metadata!(Root, "root");

impl Root {
    /// A version-1 root with no keys, expiring at `expires`, consistent snapshots on.
    pub fn new(expires: UtcTime) -> Self {
        Root {
            type_: "root".into(),
            spec_version: SPEC_VERSION.into(),
            version: 1,
            expires,
            consistent_snapshot: true,
            keys: BTreeMap::new(),
            roles: BTreeMap::new(),
            extra: BTreeMap::new(),
        }
    }

    /// Authorizes `key` for `role` (adding the key and the role as needed; a new role gets
    /// threshold 1).
    pub fn add_key(&mut self, role: &str, key: &Key) -> Result<()> {
        let id = key.key_id().map_err(|e| Error::Invalid {
            what: "key".into(),
            reason: e.to_string(),
        })?;
        self.keys.insert(id.clone(), key.clone());
        let entry = self
            .roles
            .entry(role.to_owned())
            .or_insert_with(|| RoleKeys::new(Vec::new(), 1));
        if !entry.keyids.contains(&id) {
            entry.keyids.push(id);
        }
        Ok(())
    }

    /// Removes `keyid` from `role`, and from `keys` when no role uses it any more.
    pub fn revoke_key(&mut self, role: &str, keyid: &str) {
        if let Some(r) = self.roles.get_mut(role) {
            r.keyids.retain(|k| k != keyid);
        }
        if !self
            .roles
            .values()
            .any(|r| r.keyids.iter().any(|k| k == keyid))
        {
            self.keys.remove(keyid);
        }
    }

    /// The keys and threshold of `role`.
    pub fn role(&self, role: &str) -> Option<&RoleKeys> {
        self.roles.get(role)
    }

    fn check(&self) -> Result<()> {
        for name in TOP_LEVEL_ROLES {
            let Some(r) = self.roles.get(name) else {
                return Err(Error::Invalid {
                    what: "root".into(),
                    reason: format!("no {name} role"),
                });
            };
            check_role_keys(name, &r.keyids, r.threshold)?;
        }
        for (name, r) in &self.roles {
            check_role_keys(name, &r.keyids, r.threshold)?;
        }
        Ok(())
    }
}

/// Version, length and hashes of a metadata file, as timestamp and snapshot list them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetaFile {
    /// Version of the listed metadata.
    pub version: u64,
    /// Length in bytes, if the repository signs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    /// Hashes, if the repository signs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashes: Option<Hashes>,
    /// Unknown fields, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl MetaFile {
    /// Version only (no length, no hashes).
    pub fn new(version: u64) -> Self {
        MetaFile {
            version,
            length: None,
            hashes: None,
            extra: BTreeMap::new(),
        }
    }

    /// Version plus the length and SHA-256 of `bytes`.
    pub fn with_bytes(version: u64, bytes: &[u8]) -> Self {
        MetaFile {
            version,
            length: Some(bytes.len() as u64),
            hashes: Some(sha256_hashes(bytes)),
            extra: BTreeMap::new(),
        }
    }

    /// Checks `bytes` against the signed length and hashes, when present.
    pub fn verify_bytes(&self, what: &str, bytes: &[u8]) -> Result<()> {
        if let Some(len) = self.length
            && bytes.len() as u64 != len
        {
            return Err(Error::LengthMismatch {
                what: what.into(),
                expected: len,
                found: bytes.len() as u64,
            });
        }
        if let Some(hashes) = &self.hashes {
            verify_hashes(what, hashes, bytes)?;
        }
        Ok(())
    }

    fn check(&self, what: &str) -> Result<()> {
        if self.version == 0 {
            return Err(Error::Invalid {
                what: what.into(),
                reason: "meta version must be at least 1".into(),
            });
        }
        if matches!(&self.hashes, Some(h) if h.is_empty()) {
            return Err(Error::Invalid {
                what: what.into(),
                reason: "hashes must not be empty".into(),
            });
        }
        Ok(())
    }
}

/// `{"sha256": hex}` of `bytes`.
pub fn sha256_hashes(bytes: &[u8]) -> Hashes {
    BTreeMap::from([("sha256".to_owned(), hex::encode(Sha256::digest(bytes)))])
}

fn verify_hashes(what: &str, hashes: &Hashes, bytes: &[u8]) -> Result<()> {
    let mut hasher = MultiHasher::new(what, hashes)?;
    hasher.update(bytes);
    hasher.finish(what, hashes)
}

/// Incremental hashing with every algorithm a `hashes` map names.
pub(crate) struct MultiHasher {
    sha256: Option<Sha256>,
    sha512: Option<Sha512>,
}

impl MultiHasher {
    pub(crate) fn new(what: &str, hashes: &Hashes) -> Result<Self> {
        let mut h = MultiHasher {
            sha256: None,
            sha512: None,
        };
        if hashes.is_empty() {
            return Err(Error::Invalid {
                what: what.into(),
                reason: "no hashes".into(),
            });
        }
        for alg in hashes.keys() {
            match alg.as_str() {
                "sha256" => h.sha256 = Some(Sha256::new()),
                "sha512" => h.sha512 = Some(Sha512::new()),
                other => {
                    return Err(Error::UnsupportedHash {
                        what: what.into(),
                        algorithm: other.chars().take(32).collect(),
                    });
                }
            }
        }
        Ok(h)
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        if let Some(h) = &mut self.sha256 {
            h.update(bytes);
        }
        if let Some(h) = &mut self.sha512 {
            h.update(bytes);
        }
    }

    pub(crate) fn finish(self, what: &str, hashes: &Hashes) -> Result<()> {
        let mut got = BTreeMap::new();
        if let Some(h) = self.sha256 {
            got.insert("sha256", hex::encode(h.finalize()));
        }
        if let Some(h) = self.sha512 {
            got.insert("sha512", hex::encode(h.finalize()));
        }
        for (alg, want) in hashes {
            let matches = got
                .get(alg.as_str())
                .is_some_and(|g| g.eq_ignore_ascii_case(want));
            if !matches {
                return Err(Error::HashMismatch {
                    what: what.into(),
                    algorithm: alg.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Timestamp metadata: names the current snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timestamp {
    /// Always `timestamp`.
    #[serde(rename = "_type")]
    pub type_: String,
    /// Specification version.
    pub spec_version: String,
    /// Version.
    pub version: u64,
    /// Expiry.
    pub expires: UtcTime,
    /// Exactly one entry, `snapshot.json`.
    pub meta: BTreeMap<String, MetaFile>,
    /// Unknown fields, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}
role_metadata!(Timestamp, "timestamp");

impl Timestamp {
    /// A version-1 timestamp naming `snapshot`.
    pub fn new(expires: UtcTime, snapshot: MetaFile) -> Self {
        Timestamp {
            type_: "timestamp".into(),
            spec_version: SPEC_VERSION.into(),
            version: 1,
            expires,
            meta: BTreeMap::from([("snapshot.json".to_owned(), snapshot)]),
            extra: BTreeMap::new(),
        }
    }

    /// The `snapshot.json` entry (every parsed timestamp has one).
    pub fn snapshot_meta(&self) -> Result<&MetaFile> {
        self.meta
            .get("snapshot.json")
            .ok_or_else(|| Error::MissingMeta {
                role: "timestamp".into(),
                entry: "snapshot.json".into(),
            })
    }

    fn check(&self) -> Result<()> {
        match self.meta.get("snapshot.json") {
            Some(m) if self.meta.len() == 1 => m.check("timestamp"),
            _ => Err(Error::Invalid {
                what: "timestamp".into(),
                reason: "meta must hold exactly snapshot.json".into(),
            }),
        }
    }
}

/// Snapshot metadata: versions of every targets metadata file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Always `snapshot`.
    #[serde(rename = "_type")]
    pub type_: String,
    /// Specification version.
    pub spec_version: String,
    /// Version.
    pub version: u64,
    /// Expiry.
    pub expires: UtcTime,
    /// `ROLE.json` → version (and optionally length and hashes).
    pub meta: BTreeMap<String, MetaFile>,
    /// Unknown fields, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}
role_metadata!(Snapshot, "snapshot");

impl Snapshot {
    /// A version-1 snapshot with no entries.
    pub fn new(expires: UtcTime) -> Self {
        Snapshot {
            type_: "snapshot".into(),
            spec_version: SPEC_VERSION.into(),
            version: 1,
            expires,
            meta: BTreeMap::new(),
            extra: BTreeMap::new(),
        }
    }

    /// The entry for targets role `role`.
    pub fn role_meta(&self, role: &str) -> Option<&MetaFile> {
        self.meta.get(&format!("{role}.json"))
    }

    fn check(&self) -> Result<()> {
        self.meta.values().try_for_each(|m| m.check("snapshot"))
    }
}

/// A target file entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetFile {
    /// Length in bytes.
    pub length: u64,
    /// Hashes (at least one).
    pub hashes: Hashes,
    /// Application metadata (for models: [`crate::release::ModelRelease`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<Value>,
    /// Unknown fields, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl TargetFile {
    /// An entry for `bytes` (length and SHA-256) with optional custom metadata.
    pub fn from_bytes(bytes: &[u8], custom: Option<Value>) -> Self {
        TargetFile {
            length: bytes.len() as u64,
            hashes: sha256_hashes(bytes),
            custom,
            extra: BTreeMap::new(),
        }
    }
}

/// Targets metadata (top-level or delegated).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Targets {
    /// Always `targets`.
    #[serde(rename = "_type")]
    pub type_: String,
    /// Specification version.
    pub spec_version: String,
    /// Version.
    pub version: u64,
    /// Expiry.
    pub expires: UtcTime,
    /// Target path → file entry.
    pub targets: BTreeMap<String, TargetFile>,
    /// Delegations to other targets roles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegations: Option<Delegations>,
    /// Unknown fields, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}
role_metadata!(Targets, "targets");

impl Targets {
    /// A version-1 targets role with no targets and no delegations.
    pub fn new(expires: UtcTime) -> Self {
        Targets {
            type_: "targets".into(),
            spec_version: SPEC_VERSION.into(),
            version: 1,
            expires,
            targets: BTreeMap::new(),
            delegations: None,
            extra: BTreeMap::new(),
        }
    }

    fn check(&self) -> Result<()> {
        for (path, t) in &self.targets {
            if t.hashes.is_empty() {
                return Err(Error::Invalid {
                    what: format!("target {path}"),
                    reason: "hashes must not be empty".into(),
                });
            }
        }
        if let Some(d) = &self.delegations {
            d.check()?;
        }
        Ok(())
    }
}

/// Delegations of a targets role: either an ordered list of `roles`, or TAP 15
/// `succinct_roles` (hash bins), which is kept in `extra` under its JSON name so that the
/// struct keeps its shape; read it with [`Delegations::succinct_roles`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Delegations {
    /// Key id → key, for the delegated roles.
    pub keys: BTreeMap<String, Key>,
    /// Delegated roles, in order of priority.
    #[serde(default)]
    pub roles: Vec<DelegatedRole>,
    /// Unknown fields, and TAP 15 `succinct_roles`, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// JSON name of the TAP 15 field in `delegations`.
const SUCCINCT_ROLES: &str = "succinct_roles";

impl Serialize for Delegations {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        // TUF allows exactly one of `roles` and `succinct_roles`: an empty `roles` list is
        // left out when the delegation is succinct.
        let succinct = self.extra.contains_key(SUCCINCT_ROLES);
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("keys", &self.keys)?;
        if !(succinct && self.roles.is_empty()) {
            map.serialize_entry("roles", &self.roles)?;
        }
        for (k, v) in &self.extra {
            if k != "keys" && k != "roles" {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

impl Delegations {
    /// A succinct (hash-bin) delegation to `succinct`'s bins, whose keys are in `keys`.
    pub fn with_succinct_roles(keys: BTreeMap<String, Key>, succinct: &SuccinctRoles) -> Self {
        let value = serde_json::to_value(succinct).unwrap_or(Value::Null);
        Delegations {
            keys,
            roles: Vec::new(),
            extra: BTreeMap::from([(SUCCINCT_ROLES.to_owned(), value)]),
        }
    }

    /// The TAP 15 `succinct_roles`, if this delegation has them. Fails when the field is
    /// present but malformed (parsed metadata never has that: it is checked on parse).
    pub fn succinct_roles(&self) -> Result<Option<SuccinctRoles>> {
        let Some(value) = self.extra.get(SUCCINCT_ROLES) else {
            return Ok(None);
        };
        let succinct: SuccinctRoles =
            serde_json::from_value(value.clone()).map_err(|e| Error::Parse {
                what: SUCCINCT_ROLES.into(),
                reason: e.to_string(),
            })?;
        succinct.check()?;
        Ok(Some(succinct))
    }

    /// The delegated roles trusted for `target_path`, in search order, each with whether
    /// it is terminating (python-tuf's `get_roles_for_target`). A succinct delegation
    /// yields the one bin the path hashes to, as terminating (TAP 15).
    pub fn roles_for_target(&self, target_path: &str) -> Result<Vec<(String, bool)>> {
        if let Some(succinct) = self.succinct_roles()? {
            return Ok(vec![(succinct.role_for_target(target_path), true)]);
        }
        Ok(self
            .roles
            .iter()
            .filter(|r| r.is_delegated_path(target_path))
            .map(|r| (r.name.clone(), r.terminating))
            .collect())
    }

    /// Key ids and threshold that must sign delegated role `name`, if this delegation
    /// delegates it (as a listed role or as one of the succinct bins).
    pub fn role_keys(&self, name: &str) -> Result<Option<(Vec<String>, u64)>> {
        if let Some(r) = self.roles.iter().find(|r| r.name == name) {
            return Ok(Some((r.keyids.clone(), r.threshold)));
        }
        Ok(self
            .succinct_roles()?
            .filter(|s| s.is_delegated_role(name))
            .map(|s| (s.keyids, s.threshold)))
    }

    fn check(&self) -> Result<()> {
        let mut names = BTreeSet::new();
        for role in &self.roles {
            if role.name.is_empty() || TOP_LEVEL_ROLES.contains(&role.name.as_str()) {
                return Err(Error::Invalid {
                    what: "delegations".into(),
                    reason: format!("delegated role named {:?}", role.name),
                });
            }
            if !names.insert(role.name.as_str()) {
                return Err(Error::Invalid {
                    what: "delegations".into(),
                    reason: format!("role {:?} delegated twice", role.name),
                });
            }
            check_role_keys(&role.name, &role.keyids, role.threshold)?;
            if role.paths.is_some() == role.path_hash_prefixes.is_some() {
                return Err(Error::Invalid {
                    what: role.name.clone(),
                    reason: "exactly one of paths and path_hash_prefixes must be set".into(),
                });
            }
        }
        if self.succinct_roles()?.is_some() && !self.roles.is_empty() {
            return Err(Error::Invalid {
                what: "delegations".into(),
                reason: "both roles and succinct_roles are set".into(),
            });
        }
        Ok(())
    }
}

/// TAP 15 succinct hash-bin delegation: `2^bit_length` bins named
/// `{name_prefix}-{bin:0W$x}` (W = hex digits of the last bin number), all signed by the
/// same keys; a target belongs to the bin given by the first `bit_length` bits of
/// SHA-256(target path). As python-tuf's `SuccinctRoles`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuccinctRoles {
    /// Keys allowed to sign every bin.
    pub keyids: Vec<String>,
    /// Distinct keys required per bin.
    pub threshold: u64,
    /// Number of leading hash bits that select a bin, 1 to 32.
    pub bit_length: u32,
    /// Bin name prefix.
    pub name_prefix: String,
    /// Unknown fields, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl SuccinctRoles {
    /// Bins `{name_prefix}-..` selected by `bit_length` hash bits (1 to 32).
    pub fn new(
        keyids: Vec<String>,
        threshold: u64,
        bit_length: u32,
        name_prefix: &str,
    ) -> Result<Self> {
        let s = SuccinctRoles {
            keyids,
            threshold,
            bit_length,
            name_prefix: name_prefix.to_owned(),
            extra: BTreeMap::new(),
        };
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<()> {
        if !(1..=32).contains(&self.bit_length) {
            return Err(Error::Invalid {
                what: SUCCINCT_ROLES.into(),
                reason: format!("bit_length {} is not between 1 and 32", self.bit_length),
            });
        }
        check_role_keys(SUCCINCT_ROLES, &self.keyids, self.threshold)
    }

    /// Number of bins, `2^bit_length`.
    pub fn number_of_bins(&self) -> u64 {
        1u64 << self.bit_length.clamp(1, 32)
    }

    /// Hex digits of a bin suffix: those of the last bin number.
    fn suffix_len(&self) -> usize {
        format!("{:x}", self.number_of_bins() - 1).len()
    }

    fn bin_name(&self, bin: u64) -> String {
        format!(
            "{}-{:0width$x}",
            self.name_prefix,
            bin,
            width = self.suffix_len()
        )
    }

    /// The bin delegated `target_path`.
    pub fn role_for_target(&self, target_path: &str) -> String {
        let digest = Sha256::digest(target_path.as_bytes());
        let first = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        let shift = 32 - self.bit_length.clamp(1, 32);
        self.bin_name(u64::from(first >> shift))
    }

    /// Every bin name, in bin order.
    pub fn roles(&self) -> impl Iterator<Item = String> + '_ {
        (0..self.number_of_bins()).map(|bin| self.bin_name(bin))
    }

    /// Whether `name` is one of the bins.
    pub fn is_delegated_role(&self, name: &str) -> bool {
        let Some(suffix) = name
            .strip_prefix(self.name_prefix.as_str())
            .and_then(|rest| rest.strip_prefix('-'))
        else {
            return false;
        };
        suffix.len() == self.suffix_len()
            && suffix.bytes().all(|b| b.is_ascii_hexdigit())
            && u64::from_str_radix(suffix, 16).is_ok_and(|bin| bin < self.number_of_bins())
    }
}

/// A delegated targets role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DelegatedRole {
    /// Role name (also its metadata file name, `NAME.json`).
    pub name: String,
    /// Keys allowed to sign for it.
    pub keyids: Vec<String>,
    /// Distinct keys required.
    pub threshold: u64,
    /// When true, a search that reaches this role does not backtrack to later roles.
    #[serde(default)]
    pub terminating: bool,
    /// Path patterns the role is trusted for (`*` and `?` within one path segment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    /// Hex prefixes of SHA-256(target path) the role is trusted for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_hash_prefixes: Option<Vec<String>>,
    /// Unknown fields, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl DelegatedRole {
    /// Whether this role is trusted for `target_path` (TUF 5.6.7.2.1).
    pub fn is_delegated_path(&self, target_path: &str) -> bool {
        if let Some(patterns) = &self.paths {
            return patterns
                .iter()
                .any(|p| path_matches_pattern(target_path, p));
        }
        if let Some(prefixes) = &self.path_hash_prefixes {
            let digest = hex::encode(Sha256::digest(target_path.as_bytes()));
            return prefixes.iter().any(|p| digest.starts_with(p.as_str()));
        }
        false
    }
}

/// fnmatch-style matching of a target path against a delegation pattern, segment by
/// segment (as python-tuf does): both must have the same number of `/`-separated
/// segments, and `*` and `?` never match `/`. `[seq]` and `[!seq]` classes are supported.
pub fn path_matches_pattern(path: &str, pattern: &str) -> bool {
    let p: Vec<&str> = path.split('/').collect();
    let q: Vec<&str> = pattern.split('/').collect();
    p.len() == q.len()
        && p.iter()
            .zip(&q)
            .all(|(s, pat)| fnmatch(s.as_bytes(), pat.as_bytes()))
}

fn fnmatch(s: &[u8], pat: &[u8]) -> bool {
    // Iterative wildcard matching with single-star backtracking: linear in practice and
    // never recursive, so hostile patterns cannot blow the stack.
    let (mut si, mut pi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < pat.len() {
            match pat[pi] {
                b'*' => {
                    star = Some((pi, si));
                    pi += 1;
                    continue;
                }
                b'?' => {
                    si += 1;
                    pi += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = match_class(s[si], &pat[pi..]) {
                        if matched {
                            si += 1;
                            pi += next;
                            continue;
                        }
                    } else if s[si] == b'[' {
                        si += 1;
                        pi += 1;
                        continue;
                    }
                }
                c if c == s[si] => {
                    si += 1;
                    pi += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, ss)) => {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    pat[pi..].iter().all(|&c| c == b'*')
}

/// Matches byte `c` against the class starting at `pat[0] == b'['`. Returns whether it
/// matched and the class's length, or `None` when the class is unterminated (then `[` is
/// literal, as in Python's fnmatch).
fn match_class(c: u8, pat: &[u8]) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(pat.get(i), Some(b'!'));
    if negate {
        i += 1;
    }
    let start = i;
    let mut matched = false;
    loop {
        let &b = pat.get(i)?;
        if b == b']' && i > start {
            return Some((matched != negate, i + 1));
        }
        if pat.get(i + 1) == Some(&b'-') && pat.get(i + 2).is_some_and(|&e| e != b']') {
            let e = pat[i + 2];
            matched |= b <= c && c <= e;
            i += 3;
        } else {
            matched |= b == c;
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_does_not_cross_directories() {
        assert!(path_matches_pattern("models/a.onnx", "models/*.onnx"));
        assert!(path_matches_pattern("models/a.onnx", "*/*"));
        assert!(!path_matches_pattern("models/x/a.onnx", "models/*.onnx"));
        assert!(!path_matches_pattern("models/x/a.onnx", "models/*"));
        assert!(!path_matches_pattern("a.onnx", "*/*"));
        assert!(path_matches_pattern("file3.txt", "file?.txt"));
        assert!(path_matches_pattern("file3.txt", "file[0-9].txt"));
        assert!(!path_matches_pattern("filex.txt", "file[0-9].txt"));
        assert!(path_matches_pattern("filex.txt", "file[!0-9].txt"));
        assert!(path_matches_pattern("a[b", "a[b"));
        assert!(path_matches_pattern("abcabcd", "*abcd"));
        assert!(!path_matches_pattern("abc", "abcd*x"));
        assert!(path_matches_pattern("", "*"));
    }

    #[test]
    fn hash_prefix_delegation_matches_sha256_of_path() {
        let digest = hex::encode(Sha256::digest(b"models/a.onnx"));
        let role = DelegatedRole {
            name: "bins".into(),
            keyids: vec![],
            threshold: 1,
            terminating: false,
            paths: None,
            path_hash_prefixes: Some(vec![digest[..2].to_owned()]),
            extra: BTreeMap::new(),
        };
        assert!(role.is_delegated_path("models/a.onnx"));
        let other = if &digest[..2] == "00" { "01" } else { "00" };
        let role = DelegatedRole {
            path_hash_prefixes: Some(vec![other.into()]),
            ..role
        };
        assert!(!role.is_delegated_path("models/a.onnx"));
    }

    #[test]
    fn unknown_fields_survive_parse_and_rebuild() {
        let json = br#"{"signed":{"_type":"snapshot","spec_version":"1.0.31","version":2,
            "expires":"2030-01-01T00:00:00Z","meta":{"targets.json":{"version":1,"x":1}},
            "future":[1,2]},"signatures":[]}"#;
        let env = Envelope::from_bytes("snapshot", json, 1 << 20).unwrap();
        let s: Snapshot = env.parse_signed().unwrap();
        let back = serde_json::to_value(&s).unwrap();
        assert_eq!(back, env.signed);
    }

    #[test]
    fn rejects_malformed_metadata_with_typed_errors() {
        type Case<'a> = (&'a [u8], fn(&Error) -> bool);
        let cases: &[Case] = &[
            (b"{", |e| matches!(e, Error::Parse { .. })),
            (
                br#"{"signed":{"_type":"targets"},"signatures":[]}"#,
                |e| matches!(e, Error::WrongType { .. }),
            ),
            (
                br#"{"signed":{"_type":"snapshot","spec_version":"2.0.0","version":1,"expires":"2030-01-01T00:00:00Z","meta":{}},"signatures":[]}"#,
                |e| matches!(e, Error::UnsupportedSpecVersion { .. }),
            ),
            (
                br#"{"signed":{"_type":"snapshot","spec_version":"1.0","version":0,"expires":"2030-01-01T00:00:00Z","meta":{}},"signatures":[]}"#,
                |e| matches!(e, Error::Invalid { .. }),
            ),
            (
                br#"{"signed":{"_type":"snapshot","spec_version":"1.0","version":1,"expires":"2030-01-01","meta":{}},"signatures":[]}"#,
                |e| matches!(e, Error::Parse { .. }),
            ),
            (
                br#"{"signed":{"_type":"snapshot","spec_version":"1.0","version":1.5,"expires":"2030-01-01T00:00:00Z","meta":{}},"signatures":[]}"#,
                |e| matches!(e, Error::Parse { .. }),
            ),
        ];
        for (bytes, is_expected) in cases {
            let err = Envelope::from_bytes("snapshot", bytes, 1 << 20)
                .and_then(|e| e.parse_signed::<Snapshot>())
                .unwrap_err();
            assert!(is_expected(&err), "{err:?}");
        }
        assert!(matches!(
            Envelope::from_bytes("snapshot", &[b' '; 100], 99),
            Err(Error::TooLarge {
                len: 100,
                max: 99,
                ..
            })
        ));
    }

    fn succinct(bit_length: u32) -> SuccinctRoles {
        SuccinctRoles::new(vec!["k".into()], 1, bit_length, "bin").unwrap()
    }

    #[test]
    fn succinct_bins_match_the_conformance_suite_expectations() {
        // (bit_length, target path, bin) from tuf-conformance's succinct roles graph test.
        for (bits, path, bin) in [
            (1, "boo", "bin-0"),
            (1, "too", "bin-1"),
            (2, "foo", "bin-0"),
            (2, "doo", "bin-1"),
            (2, "too", "bin-2"),
            (2, "bar", "bin-3"),
            (8, "bar", "bin-fc"),
        ] {
            assert_eq!(succinct(bits).role_for_target(path), bin, "{bits} {path}");
        }
    }

    #[test]
    fn succinct_bin_names_are_zero_padded_hex() {
        let s = succinct(5);
        let bins: Vec<String> = s.roles().collect();
        assert_eq!(bins.len(), 32);
        assert_eq!((bins[0].as_str(), bins[31].as_str()), ("bin-00", "bin-1f"));
        assert!(s.is_delegated_role("bin-1f"));
        assert!(!s.is_delegated_role("bin-20"));
        assert!(!s.is_delegated_role("bin-1"));
        assert!(!s.is_delegated_role("bin-0x"));
        assert!(!s.is_delegated_role("other-00"));
        let s = succinct(9);
        assert_eq!(s.roles().last().unwrap(), "bin-1ff");
        assert_eq!(succinct(32).number_of_bins(), 1 << 32);
        assert!(succinct(32).role_for_target("x").len() == "bin-".len() + 8);
    }

    #[test]
    fn rejects_succinct_roles_with_bad_bit_length_or_beside_roles() {
        assert!(SuccinctRoles::new(vec!["k".into()], 1, 0, "bin").is_err());
        assert!(SuccinctRoles::new(vec!["k".into()], 1, 33, "bin").is_err());
        assert!(SuccinctRoles::new(vec!["k".into()], 0, 4, "bin").is_err());
        let base = r#"{"signed":{"_type":"targets","spec_version":"1.0.31","version":1,
            "expires":"2030-01-01T00:00:00Z","targets":{},"delegations":DELEG},
            "signatures":[]}"#;
        let parse = |deleg: &str| {
            let json = base.replace("DELEG", deleg);
            Envelope::from_bytes("targets", json.as_bytes(), 1 << 20)?.parse_signed::<Targets>()
        };
        let ok = parse(
            r#"{"keys":{},"succinct_roles":{"keyids":["k"],"threshold":1,"bit_length":3,"name_prefix":"b"}}"#,
        )
        .unwrap();
        let d = ok.delegations.unwrap();
        assert_eq!(d.succinct_roles().unwrap().unwrap().bit_length, 3);
        assert_eq!(d.role_keys("b-7").unwrap(), Some((vec!["k".to_owned()], 1)));
        assert_eq!(d.role_keys("b-8").unwrap(), None);
        // Serializing keeps the shape TUF allows: no empty `roles` beside succinct_roles.
        assert!(serde_json::to_value(&d).unwrap().get("roles").is_none());
        for bad in [
            r#"{"keys":{},"succinct_roles":{"keyids":["k"],"threshold":1,"bit_length":40,"name_prefix":"b"}}"#,
            r#"{"keys":{},"succinct_roles":{"keyids":["k"],"threshold":1,"name_prefix":"b"}}"#,
            r#"{"keys":{},"roles":[{"name":"r","keyids":[],"threshold":1,"paths":["*"]}],"succinct_roles":{"keyids":["k"],"threshold":1,"bit_length":3,"name_prefix":"b"}}"#,
            r#"{"keys":{},"roles":[{"name":"","keyids":[],"threshold":1,"paths":["*"]}]}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
