//! The Update Framework (TUF) trust layer: metadata, canonical JSON, keys, verification,
//! and the client workflow of TUF specification section 5, as pure code.
//!
//! - [`metadata`]: the JSON formats ([`Root`], [`Timestamp`], [`Snapshot`], [`Targets`],
//!   delegations) and the signed [`Envelope`].
//! - [`canonical`]: canonical JSON, the bytes signatures cover.
//! - [`keys`]: Ed25519 / ECDSA P-256 / RSA-PSS verification, Ed25519 [`SigningKey`].
//! - [`verify`]: thresholds and [`Verified`], which only verification constructs.
//! - [`trusted_set`]: [`TrustedSet`], verified metadata updated one role at a time.
//! - [`updater`]: [`Updater`], the full refresh and target lookup over caller-provided
//!   [`Remote`] and [`MetadataStore`] traits.
//! - [`target`]: checking downloaded target bytes against a verified [`TargetFile`].
//!
//! ```
//! use outpost_protocol::tuf::{Envelope, Root, SigningKey, TrustedSet, UtcTime};
//! let key = SigningKey::from_seed([1; 32]);
//! let mut root = Root::new(UtcTime::parse("2030-01-01T00:00:00Z").unwrap());
//! for role in ["root", "timestamp", "snapshot", "targets"] {
//!     root.add_key(role, key.public_key()).unwrap();
//! }
//! let mut env = Envelope::new(&root).unwrap();
//! env.sign(&key).unwrap();
//! let now = UtcTime::parse("2025-01-01T00:00:00Z").unwrap();
//! let set = TrustedSet::new(&env.to_bytes(), now).unwrap();
//! assert_eq!(set.root().version, 1);
//! ```

pub mod canonical;
pub mod keys;
pub mod metadata;
pub mod target;
pub mod time;
pub mod trusted_set;
pub mod updater;
pub mod verify;

pub use canonical::{CanonicalError, to_canonical_json};
pub use keys::{Key, KeyError, KeyVal, SigningKey};
pub use metadata::{
    DelegatedRole, Delegations, Envelope, Hashes, MetaFile, RoleKeys, RoleMetadata, Root,
    Signature, Snapshot, SuccinctRoles, TargetFile, Targets, Timestamp,
};
pub use target::{TargetHasher, TargetInfo};
pub use time::{TimeError, UtcTime};
pub use trusted_set::{Limits, TimestampUpdate, TrustedSet};
pub use updater::{FetchError, MetadataStore, Remote, StoreError, Updater, UpdaterConfig};
pub use verify::Verified;

/// Result of TUF operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why metadata or a target was rejected, or the workflow could not proceed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Input larger than the cap for it ("endless data").
    #[error("{what} is {len} bytes, over the {max}-byte limit")]
    TooLarge {
        /// The document or target.
        what: String,
        /// Length offered (or read so far).
        len: u64,
        /// Limit.
        max: u64,
    },
    /// Not valid JSON, or fields of the wrong shape.
    #[error("cannot parse {what}: {reason}")]
    Parse {
        /// The document.
        what: String,
        /// Parser message.
        reason: String,
    },
    /// `_type` is not the expected role.
    #[error("expected {expected} metadata, found _type {found:?}")]
    WrongType {
        /// Expected `_type`.
        expected: &'static str,
        /// `_type` found.
        found: String,
    },
    /// `spec_version` is malformed or of an unsupported major version.
    #[error("{what}: unsupported spec_version {found:?}")]
    UnsupportedSpecVersion {
        /// The document.
        what: String,
        /// `spec_version` found.
        found: String,
    },
    /// A structural rule is broken (threshold 0, duplicate roles, missing role, ...).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The document or part.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The signed part has no canonical JSON form.
    #[error(transparent)]
    Canonical(#[from] CanonicalError),
    /// Fewer than `threshold` distinct authorized keys produced valid signatures.
    #[error("{role}: {valid} valid signatures from authorized keys, threshold is {threshold}")]
    ThresholdNotMet {
        /// Role whose keys were required.
        role: String,
        /// Required.
        threshold: u64,
        /// Found.
        valid: u64,
    },
    /// Two signatures carry the same key id (TUF 4: key ids MUST be unique in
    /// `signatures`), whether or not the threshold would be met without the copy.
    #[error("{role}: more than one signature by key id {keyid}")]
    DuplicateSignature {
        /// Role being verified.
        role: String,
        /// The repeated key id.
        keyid: String,
    },
    /// The delegating metadata does not know this role.
    #[error("role {role:?} is not delegated by {delegator:?}")]
    UnknownRole {
        /// Role asked for.
        role: String,
        /// Role that should delegate it.
        delegator: String,
    },
    /// A lower version than the trusted one was offered.
    #[error("rollback of {role}: trusted version {trusted}, offered {offered}")]
    RollbackAttempted {
        /// Role (or `ROLE.json` meta entry).
        role: String,
        /// Trusted version.
        trusted: u64,
        /// Offered version.
        offered: u64,
    },
    /// The version is not the one the referring metadata names (mix-and-match), or a
    /// new root is not exactly trusted + 1.
    #[error("{role}: expected version {expected}, found {found}")]
    VersionMismatch {
        /// Role.
        role: String,
        /// Version required.
        expected: u64,
        /// Version found.
        found: u64,
    },
    /// The metadata expired (freeze attack, or a stale repository).
    #[error("{role} expired at {expires} (now {now})")]
    Expired {
        /// Role.
        role: String,
        /// Its `expires`.
        expires: UtcTime,
        /// The trusted time.
        now: UtcTime,
    },
    /// A `meta` entry the workflow needs is missing, or a newer snapshot dropped one.
    #[error("{role} has no meta entry {entry:?}")]
    MissingMeta {
        /// Role whose meta lacks the entry.
        role: String,
        /// `ROLE.json` entry.
        entry: String,
    },
    /// Length differs from the signed length.
    #[error("{what}: length {found}, signed length {expected}")]
    LengthMismatch {
        /// Document or target.
        what: String,
        /// Signed length.
        expected: u64,
        /// Actual length.
        found: u64,
    },
    /// A hash differs from the signed hash.
    #[error("{what}: {algorithm} hash does not match")]
    HashMismatch {
        /// Document or target.
        what: String,
        /// Algorithm that mismatched.
        algorithm: String,
    },
    /// Signed hashes use an algorithm this crate does not compute.
    #[error("{what}: unsupported hash algorithm {algorithm:?}")]
    UnsupportedHash {
        /// Document or target.
        what: String,
        /// Algorithm.
        algorithm: String,
    },
    /// Workflow steps called out of order (a caller bug, not an attack).
    #[error("invalid workflow order: {0}")]
    InvalidState(&'static str),
    /// The remote failed to deliver metadata or a target.
    #[error("fetching {what}: {source}")]
    Fetch {
        /// What was fetched.
        what: String,
        /// Transport error.
        source: FetchError,
    },
    /// The local store failed to save or delete.
    #[error("storing {what}: {source}")]
    Store {
        /// What was stored.
        what: String,
        /// Store error.
        source: StoreError,
    },
}
