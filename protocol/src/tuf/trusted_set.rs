//! [`TrustedSet`]: the verified metadata of one refresh, updated one role at a time in
//! the order of TUF specification section 5 (modelled on python-tuf's
//! `TrustedMetadataSet`). Bytes and the trusted time go in; verified metadata or a typed
//! error come out. No I/O.
//!
//! Like python-tuf, an *intermediate* timestamp or snapshot (expired, or a snapshot whose
//! version does not match the timestamp) is kept after its error is returned: it still
//! serves as the baseline for rollback checks of the next one, while the final checks
//! stop the workflow from going further on it.

use std::collections::BTreeMap;

use super::metadata::{Envelope, RoleMetadata, Root, Snapshot, Targets, Timestamp};
use super::time::UtcTime;
use super::verify::{Verified, verify_threshold};
use super::{Error, Result};

/// Size caps applied before any metadata is parsed (python-tuf's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Max bytes of a root.
    pub root: u64,
    /// Max bytes of a timestamp.
    pub timestamp: u64,
    /// Max bytes of a snapshot when the timestamp does not sign its length.
    pub snapshot: u64,
    /// Max bytes of a targets role when the snapshot does not sign its length.
    pub targets: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            root: 512_000,
            timestamp: 16_384,
            snapshot: 2_000_000,
            targets: 5_000_000,
        }
    }
}

/// Outcome of [`TrustedSet::update_timestamp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimestampUpdate {
    /// The new timestamp is now trusted; persist it.
    Updated,
    /// Same version as the trusted one: discarded, nothing to persist (TUF 5.4.3.1).
    Unchanged,
}

/// Verified metadata of one refresh, with the trusted time it is checked against.
#[derive(Debug, Clone)]
pub struct TrustedSet {
    now: UtcTime,
    limits: Limits,
    root: Verified<Root>,
    timestamp: Option<Verified<Timestamp>>,
    snapshot: Option<Verified<Snapshot>>,
    targets: BTreeMap<String, Verified<Targets>>,
}

fn parse<T: RoleMetadata>(bytes: &[u8], max: u64) -> Result<(T, Envelope, Vec<u8>)> {
    let env = Envelope::from_bytes(T::TYPE, bytes, max)?;
    let parsed = env.parse_signed::<T>()?;
    let msg = env.canonical_signed()?;
    Ok((parsed, env, msg))
}

fn verify_by_root(root: &Root, role: &str, env: &Envelope, msg: &[u8]) -> Result<()> {
    let keys = root.roles.get(role).ok_or_else(|| Error::UnknownRole {
        role: role.into(),
        delegator: "root".into(),
    })?;
    verify_threshold(
        role,
        &keys.keyids,
        keys.threshold,
        &root.keys,
        msg,
        &env.signatures,
    )
}

impl TrustedSet {
    /// Starts from a trusted root (from the local store or shipped with the device). It
    /// must be signed by a threshold of its own root keys. Its expiry is not checked here:
    /// only the final root of the chain must be unexpired (TUF 5.3.10). `now` is the
    /// trusted time every expiry check of this set uses.
    pub fn new(root: &[u8], now: UtcTime) -> Result<Self> {
        Self::with_limits(root, now, Limits::default())
    }

    /// [`TrustedSet::new`] with explicit size caps.
    pub fn with_limits(root: &[u8], now: UtcTime, limits: Limits) -> Result<Self> {
        let (new, env, msg) = parse::<Root>(root, limits.root)?;
        verify_by_root(&new, "root", &env, &msg)?;
        Ok(TrustedSet {
            now,
            limits,
            root: Verified::new_verified(new),
            timestamp: None,
            snapshot: None,
            targets: BTreeMap::new(),
        })
    }

    /// The trusted time expiry is checked against.
    pub fn now(&self) -> UtcTime {
        self.now
    }

    /// Size caps in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The trusted root.
    pub fn root(&self) -> &Verified<Root> {
        &self.root
    }

    /// The trusted timestamp, if loaded.
    pub fn timestamp(&self) -> Option<&Verified<Timestamp>> {
        self.timestamp.as_ref()
    }

    /// The trusted snapshot, if loaded.
    pub fn snapshot(&self) -> Option<&Verified<Snapshot>> {
        self.snapshot.as_ref()
    }

    /// The trusted top-level targets, if loaded.
    pub fn targets(&self) -> Option<&Verified<Targets>> {
        self.targets.get("targets")
    }

    /// Trusted targets metadata of `role` (`targets` or a delegated role), if loaded.
    pub fn role_targets(&self, role: &str) -> Option<&Verified<Targets>> {
        self.targets.get(role)
    }

    fn check_expiry(&self, role: &str, expires: UtcTime) -> Result<()> {
        if expires <= self.now {
            return Err(Error::Expired {
                role: role.into(),
                expires,
                now: self.now,
            });
        }
        Ok(())
    }

    /// Verifies `bytes` as root version trusted + 1 and makes it the trusted root.
    /// Expired intermediate roots are accepted (TUF 5.3.4 to 5.3.8).
    pub fn update_root(&mut self, bytes: &[u8]) -> Result<&Verified<Root>> {
        if self.timestamp.is_some() {
            return Err(Error::InvalidState("root updated after timestamp"));
        }
        let (new, env, msg) = parse::<Root>(bytes, self.limits.root)?;
        // 5.3.4: signed by a threshold of keys from the trusted root ...
        verify_by_root(&self.root, "root", &env, &msg)?;
        // 5.3.5: check for a rollback attack: version must be exactly trusted + 1.
        let expected = self.root.version.saturating_add(1);
        if new.version < expected {
            return Err(Error::RollbackAttempted {
                role: "root".into(),
                trusted: self.root.version,
                offered: new.version,
            });
        }
        if new.version != expected {
            return Err(Error::VersionMismatch {
                role: "root".into(),
                expected,
                found: new.version,
            });
        }
        // 5.3.4: ... and by a threshold of keys from the new root itself.
        verify_by_root(&new, "root", &env, &msg)?;
        self.root = Verified::new_verified(new);
        Ok(&self.root)
    }

    /// Verifies `bytes` as the new timestamp (TUF 5.4).
    pub fn update_timestamp(&mut self, bytes: &[u8]) -> Result<TimestampUpdate> {
        if self.snapshot.is_some() {
            return Err(Error::InvalidState("timestamp updated after snapshot"));
        }
        // 5.3.10: check for a freeze attack on the final root.
        self.check_expiry("root", self.root.expires)?;
        let (new, env, msg) = parse::<Timestamp>(bytes, self.limits.timestamp)?;
        // 5.4.2: check signatures by the root's timestamp keys.
        verify_by_root(&self.root, "timestamp", &env, &msg)?;
        let new_snapshot_version = new.snapshot_meta()?.version;
        if let Some(old) = &self.timestamp {
            // 5.4.3.1: check for a rollback attack on the timestamp.
            if new.version < old.version {
                return Err(Error::RollbackAttempted {
                    role: "timestamp".into(),
                    trusted: old.version,
                    offered: new.version,
                });
            }
            if new.version == old.version {
                // Equal versions: keep the trusted one, nothing new is available.
                self.check_expiry("timestamp", old.expires)?;
                return Ok(TimestampUpdate::Unchanged);
            }
            // 5.4.3.2: check for a rollback attack on the snapshot version.
            let old_snapshot_version = old.snapshot_meta()?.version;
            if new_snapshot_version < old_snapshot_version {
                return Err(Error::RollbackAttempted {
                    role: "snapshot.json".into(),
                    trusted: old_snapshot_version,
                    offered: new_snapshot_version,
                });
            }
        }
        let expires = new.expires;
        self.timestamp = Some(Verified::new_verified(new));
        // 5.4.4: check for a freeze attack (after storing: an expired timestamp still
        // guards the next one against rollback, but blocks the snapshot step).
        self.check_expiry("timestamp", expires)?;
        Ok(TimestampUpdate::Updated)
    }

    fn final_timestamp(&self) -> Result<&Verified<Timestamp>> {
        let ts = self
            .timestamp
            .as_ref()
            .ok_or(Error::InvalidState("snapshot updated before timestamp"))?;
        self.check_expiry("timestamp", ts.expires)?;
        Ok(ts)
    }

    /// Verifies `bytes` as the new snapshot (TUF 5.5). `from_local_store` skips the
    /// length and hash check against the timestamp (a cached snapshot may be older than
    /// what the timestamp names and is then only a rollback baseline).
    pub fn update_snapshot(&mut self, bytes: &[u8], from_local_store: bool) -> Result<()> {
        if !self.targets.is_empty() {
            return Err(Error::InvalidState("snapshot updated after targets"));
        }
        let meta = self.final_timestamp()?.snapshot_meta()?.clone();
        if !from_local_store {
            // 5.5.2: check against the length and hashes the timestamp signs.
            meta.verify_bytes("snapshot", bytes)?;
        }
        // A cached snapshot may predate the signed length: only the limit caps it.
        let cap = match meta.length {
            Some(len) if !from_local_store => len,
            _ => self.limits.snapshot,
        };
        let (new, env, msg) = parse::<Snapshot>(bytes, cap)?;
        // 5.5.3: check signatures by the root's snapshot keys.
        verify_by_root(&self.root, "snapshot", &env, &msg)?;
        if let Some(old) = &self.snapshot {
            // 5.5.5: check for a rollback attack: no targets role may disappear or go
            // back in version.
            for (name, old_meta) in &old.meta {
                let Some(new_meta) = new.meta.get(name) else {
                    return Err(Error::MissingMeta {
                        role: "snapshot".into(),
                        entry: name.clone(),
                    });
                };
                if new_meta.version < old_meta.version {
                    return Err(Error::RollbackAttempted {
                        role: name.clone(),
                        trusted: old_meta.version,
                        offered: new_meta.version,
                    });
                }
            }
        }
        self.snapshot = Some(Verified::new_verified(new));
        self.final_snapshot().map(|_| ())
    }

    fn final_snapshot(&self) -> Result<&Verified<Snapshot>> {
        let snapshot = self
            .snapshot
            .as_ref()
            .ok_or(Error::InvalidState("targets updated before snapshot"))?;
        let expected = self.final_timestamp()?.snapshot_meta()?.version;
        // 5.5.4: the snapshot version must be the one the timestamp names.
        if snapshot.version != expected {
            return Err(Error::VersionMismatch {
                role: "snapshot".into(),
                expected,
                found: snapshot.version,
            });
        }
        // 5.5.6: check for a freeze attack.
        self.check_expiry("snapshot", snapshot.expires)?;
        Ok(snapshot)
    }

    /// Verifies `bytes` as the top-level targets (TUF 5.6).
    pub fn update_targets(&mut self, bytes: &[u8]) -> Result<&Verified<Targets>> {
        self.update_delegated_targets(bytes, "targets", "root")
    }

    /// Verifies `bytes` as the targets metadata of `role`, delegated by `delegator`
    /// (`root` for the top-level `targets`), which must already be trusted (TUF 5.6).
    pub fn update_delegated_targets(
        &mut self,
        bytes: &[u8],
        role: &str,
        delegator: &str,
    ) -> Result<&Verified<Targets>> {
        let snapshot = self.final_snapshot()?;
        let entry = format!("{role}.json");
        let meta = snapshot
            .meta
            .get(&entry)
            .ok_or_else(|| Error::MissingMeta {
                role: "snapshot".into(),
                entry,
            })?
            .clone();
        // 5.6.2: check against the length and hashes the snapshot signs.
        meta.verify_bytes(role, bytes)?;
        let (new, env, msg) = parse::<Targets>(bytes, meta.length.unwrap_or(self.limits.targets))?;
        // 5.6.3: check signatures by the delegator's keys for this role.
        match (role, delegator) {
            ("targets", "root") => verify_by_root(&self.root, "targets", &env, &msg)?,
            ("targets", _) | (_, "root") => {
                return Err(Error::UnknownRole {
                    role: role.into(),
                    delegator: delegator.into(),
                });
            }
            _ => {
                let parent = self.targets.get(delegator).ok_or(Error::InvalidState(
                    "delegated targets loaded before delegator",
                ))?;
                let unknown = || Error::UnknownRole {
                    role: role.into(),
                    delegator: delegator.into(),
                };
                let delegations = parent.delegations.as_ref().ok_or_else(unknown)?;
                // A listed role, or one of the delegator's succinct hash bins (TAP 15).
                let (keyids, threshold) = delegations.role_keys(role)?.ok_or_else(unknown)?;
                verify_threshold(
                    role,
                    &keyids,
                    threshold,
                    &delegations.keys,
                    &msg,
                    &env.signatures,
                )?;
            }
        }
        // 5.6.4: check for a rollback / mix-and-match: the version the snapshot names.
        if new.version != meta.version {
            return Err(Error::VersionMismatch {
                role: role.into(),
                expected: meta.version,
                found: new.version,
            });
        }
        // 5.6.5: check for a freeze attack.
        self.check_expiry(role, new.expires)?;
        self.targets
            .insert(role.to_owned(), Verified::new_verified(new));
        Ok(&self.targets[role])
    }
}
