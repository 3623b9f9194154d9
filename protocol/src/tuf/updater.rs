//! [`Updater`]: the whole TUF client workflow (specification section 5) over two traits
//! the caller implements: a [`Remote`] that fetches bytes (HTTP in the conformance CLI,
//! MQTT in the agent) and a [`MetadataStore`] that keeps the trusted metadata bytes.
//!
//! Role names reach the traits verbatim; delegated role names come from signed but
//! remote-controlled metadata, so implementations must encode them before using them as
//! file names or URL segments (python-tuf percent-encodes them).

use std::collections::BTreeSet;

use super::metadata::Root;
use super::target::TargetInfo;
use super::time::UtcTime;
use super::trusted_set::{Limits, TimestampUpdate, TrustedSet};
use super::verify::Verified;
use super::{Error, Result};

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The remote does not have it (HTTP 403/404). For root version N+1 this ends the
    /// root chain normally.
    #[error("not found")]
    NotFound,
    /// The remote offered more than the allowed bytes.
    #[error("more than {max} bytes")]
    TooLarge {
        /// The limit that was passed to the fetch.
        max: u64,
    },
    /// Any other transport failure.
    #[error("{0}")]
    Transport(String),
}

/// A store failure (disk full, permissions, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// Where metadata comes from.
pub trait Remote {
    /// Fetches `ROLE.json`, or `VERSION.ROLE.json` when `version` is given, reading at
    /// most `max_len` bytes (the updater rejects longer answers as well).
    fn fetch_metadata(
        &mut self,
        role: &str,
        version: Option<u64>,
        max_len: u64,
    ) -> std::result::Result<Vec<u8>, FetchError>;

    /// Fetches a target file at `remote_path` (see [`TargetInfo::remote_path`]), reading
    /// at most `max_len` bytes.
    fn fetch_target(
        &mut self,
        remote_path: &str,
        max_len: u64,
    ) -> std::result::Result<Vec<u8>, FetchError>;
}

/// Where trusted metadata bytes are kept between refreshes, by role name (the
/// conformance layout is `METADATA_DIR/ROLE.json`). Must hold `root` before the first
/// refresh: it is the trust anchor.
pub trait MetadataStore {
    /// The stored bytes of `role`, or `None` when absent or unreadable.
    fn load(&mut self, role: &str) -> Option<Vec<u8>>;
    /// Replaces the bytes of `role` (atomically, if the store can).
    fn save(&mut self, role: &str, bytes: &[u8]) -> std::result::Result<(), StoreError>;
    /// Removes `role`; absent is not an error.
    fn delete(&mut self, role: &str) -> std::result::Result<(), StoreError>;
}

/// Limits of one updater.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdaterConfig {
    /// Size caps per role.
    pub limits: Limits,
    /// Most root versions fetched in one refresh.
    pub max_root_rotations: u64,
    /// Most delegated targets roles visited in one target lookup (the top-level
    /// `targets` is not counted), as python-tuf's `max_delegations`.
    pub max_delegations: usize,
}

impl Default for UpdaterConfig {
    fn default() -> Self {
        UpdaterConfig {
            limits: Limits::default(),
            max_root_rotations: 256,
            max_delegations: 32,
        }
    }
}

/// The TUF client: refresh metadata, look targets up, download them verified.
///
/// One `Updater` is one refresh cycle at one trusted time: create a new one (with a new
/// `now`) for the next cycle.
pub struct Updater<R, S> {
    remote: R,
    store: S,
    config: UpdaterConfig,
    trusted: TrustedSet,
    refreshed: bool,
}

impl<R: Remote, S: MetadataStore> Updater<R, S> {
    /// Loads the trusted root from `store` (it must verify with its own keys).
    pub fn new(remote: R, mut store: S, config: UpdaterConfig, now: UtcTime) -> Result<Self> {
        let root = store
            .load("root")
            .ok_or(Error::InvalidState("no trusted root in the metadata store"))?;
        let trusted = TrustedSet::with_limits(&root, now, config.limits)?;
        Ok(Updater {
            remote,
            store,
            config,
            trusted,
            refreshed: false,
        })
    }

    /// The verified metadata so far.
    pub fn trusted_set(&self) -> &TrustedSet {
        &self.trusted
    }

    /// The remote and the store back.
    pub fn into_parts(self) -> (R, S) {
        (self.remote, self.store)
    }

    /// Runs the top-level workflow: root chain, timestamp, snapshot, top-level targets
    /// (TUF 5.3 to 5.6). Delegated targets are loaded by lookups.
    pub fn refresh(&mut self) -> Result<()> {
        self.load_root()?;
        self.load_timestamp()?;
        self.load_snapshot()?;
        self.load_targets("targets", "root")?;
        self.refreshed = true;
        Ok(())
    }

    fn fetch(&mut self, role: &str, version: Option<u64>, max: u64) -> Result<Vec<u8>> {
        let what = match version {
            Some(v) => format!("{v}.{role}.json"),
            None => format!("{role}.json"),
        };
        let bytes = self
            .remote
            .fetch_metadata(role, version, max)
            .map_err(|source| Error::Fetch {
                what: what.clone(),
                source,
            })?;
        // Endless data: never trust the remote to honour the cap.
        if bytes.len() as u64 > max {
            return Err(Error::TooLarge {
                what,
                len: bytes.len() as u64,
                max,
            });
        }
        Ok(bytes)
    }

    fn save(&mut self, role: &str, bytes: &[u8]) -> Result<()> {
        self.store.save(role, bytes).map_err(|source| Error::Store {
            what: role.into(),
            source,
        })
    }

    fn delete(&mut self, role: &str) -> Result<()> {
        self.store.delete(role).map_err(|source| Error::Store {
            what: role.into(),
            source,
        })
    }

    fn load_root(&mut self) -> Result<()> {
        let initial: Root = (**self.trusted.root()).clone();
        let first = initial.version.saturating_add(1);
        let last = first.saturating_add(self.config.max_root_rotations);
        // 5.3.2 / 5.3.3: fetch root N+1 until the remote has no newer version, at most
        // max_root_rotations times.
        for version in first..last {
            let bytes = match self.fetch("root", Some(version), self.config.limits.root) {
                Ok(bytes) => bytes,
                Err(Error::Fetch {
                    source: FetchError::NotFound,
                    ..
                }) => break,
                Err(e) => return Err(e),
            };
            self.trusted.update_root(&bytes)?;
            // 5.3.8: persist the new root right away.
            self.save("root", &bytes)?;
        }
        let root = self.trusted.root();
        // 5.3.10: check for a freeze attack on the final root.
        if root.expires <= self.trusted.now() {
            return Err(Error::Expired {
                role: "root".into(),
                expires: root.expires,
                now: self.trusted.now(),
            });
        }
        // 5.3.11: fast-forward attack recovery: if the timestamp or snapshot keys were
        // rotated, delete the trusted timestamp and snapshot so that their versions no
        // longer pin the new keys' (possibly lower) versions.
        let rotated = ["timestamp", "snapshot"]
            .iter()
            .any(|r| role_keys_changed(&initial, root, r));
        if rotated {
            self.delete("timestamp")?;
            self.delete("snapshot")?;
        }
        Ok(())
    }

    fn load_timestamp(&mut self) -> Result<()> {
        // A cached timestamp is only a rollback baseline; if it no longer verifies
        // (rotated keys, corrupt file) it is ignored.
        if let Some(local) = self.store.load("timestamp") {
            let _ = self.trusted.update_timestamp(&local);
        }
        // 5.4.1: download the timestamp (unversioned, capped).
        let bytes = self.fetch("timestamp", None, self.config.limits.timestamp)?;
        if self.trusted.update_timestamp(&bytes)? == TimestampUpdate::Updated {
            // 5.4.5: persist the timestamp.
            self.save("timestamp", &bytes)?;
        }
        Ok(())
    }

    fn load_snapshot(&mut self) -> Result<()> {
        if let Some(local) = self.store.load("snapshot")
            && self.trusted.update_snapshot(&local, true).is_ok()
        {
            return Ok(());
        }
        let meta = self
            .trusted
            .timestamp()
            .ok_or(Error::InvalidState("snapshot before timestamp"))?
            .snapshot_meta()?
            .clone();
        let max = meta.length.unwrap_or(self.config.limits.snapshot);
        // 5.5.1: download snapshot, version-prefixed with consistent snapshots.
        let version = self
            .trusted
            .root()
            .consistent_snapshot
            .then_some(meta.version);
        let bytes = self.fetch("snapshot", version, max)?;
        self.trusted.update_snapshot(&bytes, false)?;
        // 5.5.7: persist the snapshot.
        self.save("snapshot", &bytes)
    }

    fn load_targets(&mut self, role: &str, delegator: &str) -> Result<()> {
        if self.trusted.role_targets(role).is_some() {
            return Ok(());
        }
        if let Some(local) = self.store.load(role)
            && self
                .trusted
                .update_delegated_targets(&local, role, delegator)
                .is_ok()
        {
            return Ok(());
        }
        let meta = self
            .trusted
            .snapshot()
            .ok_or(Error::InvalidState("targets before snapshot"))?
            .role_meta(role)
            .ok_or_else(|| Error::MissingMeta {
                role: "snapshot".into(),
                entry: format!("{role}.json"),
            })?
            .clone();
        let max = meta.length.unwrap_or(self.config.limits.targets);
        // 5.6.1: download targets, version-prefixed with consistent snapshots.
        let version = self
            .trusted
            .root()
            .consistent_snapshot
            .then_some(meta.version);
        let bytes = self.fetch(role, version, max)?;
        self.trusted
            .update_delegated_targets(&bytes, role, delegator)?;
        // 5.6.6: persist the targets metadata.
        self.save(role, &bytes)
    }

    /// Finds `target_path` in the targets delegation tree (TUF 5.6.7), refreshing first
    /// if [`Updater::refresh`] has not run. Preorder depth-first search in delegation
    /// order, as python-tuf's `_preorder_depth_first_walk`: a role's own targets win over
    /// its delegations, a terminating delegation stops backtracking, each role is visited
    /// once (cycles), succinct hash-bin delegations (TAP 15) lead to the one bin the path
    /// hashes to, and at most `max_delegations` delegated roles (besides the top-level
    /// `targets`) are visited. `Ok(None)`: no trusted role lists the path.
    pub fn get_target_info(&mut self, target_path: &str) -> Result<Option<Verified<TargetInfo>>> {
        if !self.refreshed {
            self.refresh()?;
        }
        let mut to_visit: Vec<(String, String)> = vec![("targets".into(), "root".into())];
        let mut visited: BTreeSet<String> = BTreeSet::new();
        while visited.len() <= self.config.max_delegations {
            let Some((role, delegator)) = to_visit.pop() else {
                break;
            };
            if visited.contains(&role) {
                continue;
            }
            self.load_targets(&role, &delegator)?;
            let targets = self
                .trusted
                .role_targets(&role)
                .ok_or(Error::InvalidState("targets role not loaded"))?;
            if let Some(file) = targets.targets.get(target_path) {
                return Ok(Some(Verified::new_verified(TargetInfo {
                    path: target_path.to_owned(),
                    file: file.clone(),
                    role,
                })));
            }
            let mut children = Vec::new();
            if let Some(delegations) = &targets.delegations {
                for (child, terminating) in delegations.roles_for_target(target_path)? {
                    children.push((child, role.clone()));
                    // 5.6.7.2.1: a terminating delegation ends the search here.
                    if terminating {
                        to_visit.clear();
                        break;
                    }
                }
            }
            visited.insert(role);
            // Children go on the stack in reverse so the first delegation is tried first.
            to_visit.extend(children.into_iter().rev());
        }
        Ok(None)
    }

    /// Downloads a target and checks its length and hashes; returns the bytes only if
    /// they are exactly the signed ones (TUF 5.7).
    pub fn download_target(&mut self, info: &Verified<TargetInfo>) -> Result<Vec<u8>> {
        let path = info.remote_path(self.trusted.root().consistent_snapshot);
        let max = info.file.length;
        let bytes = self
            .remote
            .fetch_target(&path, max)
            .map_err(|source| Error::Fetch {
                what: path.clone(),
                source,
            })?;
        if bytes.len() as u64 > max {
            return Err(Error::TooLarge {
                what: info.path.clone(),
                len: bytes.len() as u64,
                max,
            });
        }
        info.verify_bytes(&bytes)?;
        Ok(bytes)
    }
}

fn role_keys_changed(old: &Root, new: &Root, role: &str) -> bool {
    let ids = |r: &Root| {
        r.roles.get(role).map(|k| {
            (
                k.keyids.iter().cloned().collect::<BTreeSet<_>>(),
                k.threshold,
            )
        })
    };
    ids(old) != ids(new)
}

impl<T: Remote + ?Sized> Remote for &mut T {
    fn fetch_metadata(
        &mut self,
        role: &str,
        version: Option<u64>,
        max_len: u64,
    ) -> std::result::Result<Vec<u8>, FetchError> {
        (**self).fetch_metadata(role, version, max_len)
    }

    fn fetch_target(
        &mut self,
        remote_path: &str,
        max_len: u64,
    ) -> std::result::Result<Vec<u8>, FetchError> {
        (**self).fetch_target(remote_path, max_len)
    }
}

impl<T: MetadataStore + ?Sized> MetadataStore for &mut T {
    fn load(&mut self, role: &str) -> Option<Vec<u8>> {
        (**self).load(role)
    }
    fn save(&mut self, role: &str, bytes: &[u8]) -> std::result::Result<(), StoreError> {
        (**self).save(role, bytes)
    }
    fn delete(&mut self, role: &str) -> std::result::Result<(), StoreError> {
        (**self).delete(role)
    }
}
