//! The server's copy of the image repository: signed metadata (root chain, targets and
//! delegated roles from operators; snapshot and timestamp signed here) and the three
//! online keys. Release keys never reach the server.
//!
//! ```text
//! DATA/repo/metadata/   N.root.json, root.json, N.ROLE.json + ROLE.json for targets roles
//!                       and snapshot, timestamp.json (as in an operator repository)
//! DATA/repo/keys/       timestamp.json, snapshot.json, director.json (online keys)
//! ```
//!
//! Every new targets role is verified the way a device will verify it: a candidate
//! snapshot and timestamp are signed, and the whole set goes through the protocol's
//! [`TrustedSet`] from the trusted root before anything is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use outpost_protocol::tuf::metadata::{MetaFile, RoleMetadata, Snapshot, Targets, Timestamp};
use outpost_protocol::tuf::{Envelope, Root, SigningKey, TargetInfo, TrustedSet, UtcTime};

use super::ServerError;
use crate::keys;

/// Online metadata lifetimes.
#[derive(Debug, Clone, Copy)]
pub struct OnlineExpiries {
    /// Snapshot lifetime in seconds.
    pub snapshot_secs: i64,
    /// Timestamp lifetime in seconds.
    pub timestamp_secs: i64,
    /// Director assignment lifetime in seconds.
    pub assignment_secs: i64,
    /// Assignments expiring within this many seconds are renewed (re-signed with the
    /// next counter and re-published).
    pub assignment_renew_secs: i64,
}

impl OnlineExpiries {
    /// How often the server checks for metadata and assignments to re-sign: every 10
    /// minutes, more often when the renewal window is short (a quarter of it, at least
    /// every second).
    pub fn check_interval(&self) -> std::time::Duration {
        let quarter_ms = self.assignment_renew_secs.max(4) * 250;
        std::time::Duration::from_millis(quarter_ms.clamp(1000, 600_000) as u64)
    }
}

impl Default for OnlineExpiries {
    fn default() -> Self {
        OnlineExpiries {
            snapshot_secs: 7 * 86_400,
            timestamp_secs: 86_400,
            assignment_secs: 30 * 86_400,
            assignment_renew_secs: 7 * 86_400,
        }
    }
}

const ONLINE_ROLES: [&str; 3] = ["timestamp", "snapshot", "director"];
const MAX_METADATA: u64 = 16 * 1024 * 1024;

/// Whether `role` is safe as a metadata file name component.
pub fn valid_role_name(role: &str) -> bool {
    outpost_protocol::wire::valid_device_id(role)
}

/// A verified, not yet written, new state of the targets roles.
#[derive(Debug)]
pub struct Staged {
    /// Files to write, in order (targets roles, snapshot, then timestamp).
    files: Vec<(String, Vec<u8>)>,
    /// The verified set (root, timestamp, snapshot, every targets role).
    pub set: TrustedSet,
    /// Targets roles in the set.
    pub roles: Vec<String>,
}

impl Staged {
    /// Every target of every role, with the role that lists it.
    pub fn targets(&self) -> Vec<TargetInfo> {
        let mut out = Vec::new();
        for role in &self.roles {
            if let Some(t) = self.set.role_targets(role) {
                for (path, file) in &t.targets {
                    out.push(TargetInfo {
                        path: path.clone(),
                        file: file.clone(),
                        role: role.clone(),
                    });
                }
            }
        }
        out
    }
}

/// The server's image repository.
#[derive(Debug)]
pub struct ImageRepo {
    dir: PathBuf,
    timestamp_key: SigningKey,
    snapshot_key: SigningKey,
    director_key: SigningKey,
    expiries: OnlineExpiries,
    write_lock: Mutex<()>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes a file atomically: temporary file, fsync, rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ServerError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp-write");
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

impl ImageRepo {
    /// Copies an operator repository's `metadata/` and its three online keys (never its
    /// root or release keys) into `data_dir/repo`. Refuses if the server already has a
    /// repository.
    pub fn import(operator_repo: &Path, data_dir: &Path) -> Result<(), ServerError> {
        let dest = data_dir.join("repo");
        if dest.join("metadata").join("root.json").exists() {
            return Err(ServerError::Invalid(format!(
                "{} already holds a repository; --import-repo is for the first start only",
                data_dir.display()
            )));
        }
        let (src_meta, dst_meta) = (operator_repo.join("metadata"), dest.join("metadata"));
        let dst_keys = dest.join("keys");
        for d in [&dst_meta, &dst_keys] {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        for entry in std::fs::read_dir(&src_meta).map_err(io(&src_meta))? {
            let entry = entry.map_err(io(&src_meta))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json") && !name.starts_with('.') {
                let bytes = std::fs::read(entry.path()).map_err(io(&entry.path()))?;
                write_atomic(&dst_meta.join(&name), &bytes)?;
            }
        }
        for role in ONLINE_ROLES {
            let src = operator_repo.join("keys").join(format!("{role}.json"));
            let key = keys::read(&src, None)?;
            let dst = dst_keys.join(format!("{role}.json"));
            keys::write(&dst, role, &key, None, keys::SealCost::default())?;
        }
        Ok(())
    }

    /// Opens `data_dir/repo`, loading the online keys and checking them against root.
    pub fn open(data_dir: &Path, expiries: OnlineExpiries) -> Result<ImageRepo, ServerError> {
        let dir = data_dir.join("repo");
        if !dir.join("metadata").join("root.json").exists() {
            return Err(ServerError::Invalid(format!(
                "{} has no image repository: start once with --import-repo OPERATOR_REPO",
                data_dir.display()
            )));
        }
        let load = |role: &str| -> Result<SigningKey, ServerError> {
            let k = keys::read(&dir.join("keys").join(format!("{role}.json")), None)?;
            Ok(SigningKey::from_seed(k.to_bytes()))
        };
        let repo = ImageRepo {
            timestamp_key: load("timestamp")?,
            snapshot_key: load("snapshot")?,
            director_key: load("director")?,
            dir,
            expiries,
            write_lock: Mutex::new(()),
        };
        let root = repo.root()?;
        for (role, key) in [
            ("timestamp", &repo.timestamp_key),
            ("snapshot", &repo.snapshot_key),
            (
                outpost_protocol::director::DIRECTOR_ROLE,
                &repo.director_key,
            ),
        ] {
            let listed = root
                .roles
                .get(role)
                .is_some_and(|r| r.keyids.iter().any(|id| id == key.key_id()));
            if !listed {
                return Err(ServerError::Invalid(format!(
                    "the online {role} key {} is not a {role} key of root v{}",
                    &key.key_id()[..8],
                    root.version
                )));
            }
        }
        Ok(repo)
    }

    /// Metadata lifetimes.
    pub fn expiries(&self) -> OnlineExpiries {
        self.expiries
    }

    /// The director key.
    pub fn director_key(&self) -> &SigningKey {
        &self.director_key
    }

    fn meta_path(&self, name: &str) -> PathBuf {
        self.dir.join("metadata").join(name)
    }

    /// A metadata file's bytes, if present. `name` must be a plain file name.
    pub fn read_meta(&self, name: &str) -> Result<Option<Vec<u8>>, ServerError> {
        let p = self.meta_path(name);
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p)(e)),
        }
    }

    /// Metadata a device asks for: `ROLE.json`, or `VERSION.ROLE.json` (timestamp is
    /// never versioned).
    pub fn metadata(
        &self,
        role: &str,
        version: Option<u64>,
    ) -> Result<Option<Vec<u8>>, ServerError> {
        if !valid_role_name(role) {
            return Ok(None);
        }
        match version {
            Some(v) if role != "timestamp" => self.read_meta(&format!("{v}.{role}.json")),
            Some(_) => Ok(None),
            None => self.read_meta(&format!("{role}.json")),
        }
    }

    fn envelope(&self, name: &str) -> Result<Envelope, ServerError> {
        let bytes = self
            .read_meta(name)?
            .ok_or_else(|| ServerError::Invalid(format!("repository has no {name}")))?;
        Ok(Envelope::from_bytes(name, &bytes, MAX_METADATA)?)
    }

    /// The current root.
    pub fn root(&self) -> Result<Root, ServerError> {
        Ok(self.envelope("root.json")?.parse_signed()?)
    }

    /// The current root's bytes (what a device bundle ships).
    pub fn root_bytes(&self) -> Result<Vec<u8>, ServerError> {
        self.read_meta("root.json")?
            .ok_or_else(|| ServerError::Invalid("repository has no root.json".into()))
    }

    /// Walks the root chain from `1.root.json` as a new device would; returns the
    /// trusted set after the current root.
    /// With `next`, then verifies it as the following root (TUF 5.3.4-5.3.5: signed by a
    /// threshold of the trusted root's keys and of its own, version exactly one more),
    /// refused as the client's fault.
    fn trust_root_then(
        &self,
        now: UtcTime,
        next: Option<&[u8]>,
    ) -> Result<TrustedSet, ServerError> {
        let first = self
            .read_meta("1.root.json")?
            .ok_or_else(|| ServerError::Invalid("repository has no 1.root.json".into()))?;
        let mut set = TrustedSet::new(&first, now)?;
        let mut v = 2u64;
        while let Some(b) = self.read_meta(&format!("{v}.root.json"))? {
            set.update_root(&b)?;
            v += 1;
        }
        let current = self.root()?;
        if current.version != set.root().version {
            return Err(ServerError::Invalid(format!(
                "root.json is v{} but the chain ends at v{}",
                current.version,
                set.root().version
            )));
        }
        if let Some(next) = next {
            let trusted = set.root().version;
            set.update_root(next).map_err(|e| {
                ServerError::Rejected(format!(
                    "the new root does not chain from the trusted root v{trusted}: {e}"
                ))
            })?;
        }
        Ok(set)
    }

    /// Verifies `root` as the next root version and stages the repository under it:
    /// the current targets roles (or `targets`, e.g. re-signed with a replaced release
    /// key; equal bytes count as unchanged) verified with the new root's keys, snapshot
    /// and timestamp re-signed, root files first. The new root must keep listing the
    /// server's online keys (timestamp, snapshot, director). Nothing is written.
    pub fn stage_root(
        &self,
        root: &[u8],
        targets: Option<&[u8]>,
        now: UtcTime,
    ) -> Result<Staged, ServerError> {
        let set = self.trust_root_then(now, Some(root))?;
        let new = set.root();
        for (role, key) in [
            ("timestamp", &self.timestamp_key),
            ("snapshot", &self.snapshot_key),
            (
                outpost_protocol::director::DIRECTOR_ROLE,
                &self.director_key,
            ),
        ] {
            if !new
                .roles
                .get(role)
                .is_some_and(|r| r.keyids.iter().any(|id| id == key.key_id()))
            {
                return Err(ServerError::Rejected(format!(
                    "root v{} does not list the server's online {role} key {}: the server \
                     could no longer sign (replacing online keys needs the new keys on the \
                     server, which this upload does not carry)",
                    new.version,
                    &key.key_id()[..8]
                )));
            }
        }
        let version = new.version;
        let current_targets = self.read_meta("targets.json")?;
        let targets = targets.filter(|t| current_targets.as_deref() != Some(*t));
        let mut staged = self.stage_under(targets, &BTreeMap::new(), now, Some(root))?;
        staged.files.splice(
            0..0,
            [
                (format!("{version}.root.json"), root.to_vec()),
                ("root.json".to_owned(), root.to_vec()),
            ],
        );
        Ok(staged)
    }

    fn current_delegated(&self) -> Result<BTreeMap<String, Vec<u8>>, ServerError> {
        let snap: Snapshot = self.envelope("snapshot.json")?.parse_signed()?;
        let mut out = BTreeMap::new();
        for name in snap.meta.keys() {
            let Some(role) = name.strip_suffix(".json") else {
                continue;
            };
            if role != "targets"
                && valid_role_name(role)
                && let Some(b) = self.read_meta(name)?
            {
                out.insert(role.to_owned(), b);
            }
        }
        Ok(out)
    }

    /// Verifies new targets metadata (and delegated roles) from operators against the
    /// trusted root, signs a candidate snapshot and timestamp, and checks that no role
    /// goes back in version. Nothing is written.
    pub fn stage(
        &self,
        targets: Option<&[u8]>,
        delegated: &BTreeMap<String, Vec<u8>>,
        now: UtcTime,
    ) -> Result<Staged, ServerError> {
        self.stage_under(targets, delegated, now, None)
    }

    fn stage_under(
        &self,
        targets: Option<&[u8]>,
        delegated: &BTreeMap<String, Vec<u8>>,
        now: UtcTime,
        next_root: Option<&[u8]>,
    ) -> Result<Staged, ServerError> {
        let current_targets = self
            .read_meta("targets.json")?
            .ok_or_else(|| ServerError::Invalid("repository has no targets.json".into()))?;
        let mut roles: BTreeMap<String, Vec<u8>> = self.current_delegated()?;
        let mut changed: Vec<String> = Vec::new();
        for (role, bytes) in delegated {
            if !valid_role_name(role) || role == "targets" {
                return Err(ServerError::Rejected(format!(
                    "bad delegated role name {role:?}"
                )));
            }
            roles.insert(role.clone(), bytes.clone());
            changed.push(role.clone());
        }
        let targets_bytes = targets.map(<[u8]>::to_vec).unwrap_or(current_targets);
        if targets.is_some() {
            changed.push("targets".into());
        }
        roles.insert("targets".into(), targets_bytes);

        // Versions must increase for every role that changed.
        let old_snapshot: Snapshot = self.envelope("snapshot.json")?.parse_signed()?;
        let mut versions = BTreeMap::new();
        for (role, bytes) in &roles {
            let t: Targets = Envelope::from_bytes(role, bytes, MAX_METADATA)?.parse_signed()?;
            if changed.contains(role)
                && let Some(old) = old_snapshot.meta.get(&format!("{role}.json"))
                && t.version <= old.version
            {
                return Err(ServerError::Rejected(format!(
                    "{role} version {} does not increase on the current version {}",
                    t.version, old.version
                )));
            }
            versions.insert(role.clone(), t.version);
        }

        let mut snapshot = Snapshot::new(now.plus_seconds(self.expiries.snapshot_secs));
        snapshot.version = old_snapshot.version + 1;
        snapshot.meta = roles
            .iter()
            .map(|(r, b)| (format!("{r}.json"), MetaFile::with_bytes(versions[r], b)))
            .collect();
        let snap_bytes = Envelope::sign_document(&snapshot, &[&self.snapshot_key])?;
        let old_ts: Timestamp = self.envelope("timestamp.json")?.parse_signed()?;
        let mut ts = Timestamp::new(
            now.plus_seconds(self.expiries.timestamp_secs),
            MetaFile::with_bytes(snapshot.version, &snap_bytes),
        );
        ts.version = old_ts.version() + 1;
        let ts_bytes = Envelope::sign_document(&ts, &[&self.timestamp_key])?;

        let mut set = self.trust_root_then(now, next_root)?;
        set.update_timestamp(&ts_bytes)?;
        set.update_snapshot(&snap_bytes, false)?;
        set.update_targets(&roles["targets"])?;
        let mut pending: Vec<String> = roles.keys().filter(|r| *r != "targets").cloned().collect();
        let mut trusted = vec!["targets".to_owned()];
        // Delegated roles are verified once their delegator is trusted.
        while !pending.is_empty() {
            let before = pending.len();
            let mut i = 0;
            while i < pending.len() {
                let role = pending[i].clone();
                let delegator = trusted.iter().find(|d| {
                    set.role_targets(d)
                        .and_then(|t| t.delegations.as_ref())
                        .and_then(|del| del.role_keys(&role).ok().flatten())
                        .is_some()
                });
                if let Some(d) = delegator.cloned() {
                    set.update_delegated_targets(&roles[&role], &role, &d)?;
                    trusted.push(role);
                    pending.remove(i);
                } else {
                    i += 1;
                }
            }
            if pending.len() == before {
                if let Some(r) = pending.iter().find(|r| changed.contains(r)) {
                    return Err(ServerError::Rejected(format!(
                        "no trusted targets role delegates to {r}"
                    )));
                }
                // Roles no longer delegated stay in snapshot (clients refuse a role
                // that disappears) but list nothing anyone trusts.
                break;
            }
        }

        let mut files = Vec::new();
        for role in &changed {
            let b = &roles[role];
            files.push((format!("{}.{role}.json", versions[role]), b.clone()));
            files.push((format!("{role}.json"), b.clone()));
        }
        files.push((
            format!("{}.snapshot.json", snapshot.version),
            snap_bytes.clone(),
        ));
        files.push(("snapshot.json".into(), snap_bytes));
        files.push(("timestamp.json".into(), ts_bytes));
        Ok(Staged {
            files,
            set,
            roles: trusted,
        })
    }

    /// Writes a staged state; a new root goes first and the timestamp last, so a device
    /// reading meanwhile sees either the old or the new consistent set.
    pub fn commit(&self, staged: &Staged) -> Result<(), ServerError> {
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        for (name, bytes) in &staged.files {
            write_atomic(&self.meta_path(name), bytes)?;
        }
        Ok(())
    }

    /// Re-signs snapshot and timestamp when the timestamp has used half its lifetime or
    /// the snapshot is within a timestamp lifetime of expiring, or when `force`d.
    /// Returns the verified set of the current state.
    pub fn refresh(&self, now: UtcTime, force: bool) -> Result<Staged, ServerError> {
        let ts: Timestamp = self.envelope("timestamp.json")?.parse_signed()?;
        let snap: Snapshot = self.envelope("snapshot.json")?.parse_signed()?;
        let half = self.expiries.timestamp_secs / 2;
        let stale = ts.expires.unix() - now.unix() < half
            || snap.expires.unix() - now.unix() < self.expiries.timestamp_secs;
        let staged = self.stage(None, &BTreeMap::new(), now)?;
        if force || stale {
            self.commit(&staged)?;
        }
        Ok(staged)
    }
}
