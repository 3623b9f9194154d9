//! The operator's image repository on disk: keys, signed metadata and model targets.
//!
//! `outpostctl repo init`, `release sign`, `release revoke` and `root rotate` are thin
//! wrappers over [`Repo`]. Layout of a repository directory:
//!
//! ```text
//! DIR/repo.json              settings (expiry periods)
//! DIR/keys/root-<id8>.json   offline root keys (one file each)
//! DIR/keys/targets.json      the release key (operators; keep it off the server)
//! DIR/keys/snapshot.json     online keys: give these three to the server
//! DIR/keys/timestamp.json
//! DIR/keys/director.json
//! DIR/metadata/N.root.json   every root version (the chain devices walk), and root.json
//! DIR/metadata/N.targets.json, N.snapshot.json (consistent snapshots) and the
//!                            unversioned targets.json, snapshot.json, timestamp.json
//! DIR/targets/<dir>/<sha256>.<name>   model files under their consistent-snapshot name
//! ```
//!
//! The metadata directory and the targets directory can be served as they are by any
//! static HTTP server to a TUF client (`outpost-tuf-client`).
//!
//! Sealed key files are opened with the passphrase in `OUTPOST_KEY_PASSPHRASE`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use outpost_protocol::release::ModelRelease;
use outpost_protocol::tuf::keys::SigningKey;
use outpost_protocol::tuf::metadata::{
    Envelope, MetaFile, RoleKeys, RoleMetadata, Root, Snapshot, TargetFile, Targets, Timestamp,
};
use outpost_protocol::tuf::time::UtcTime;
use serde::{Deserialize, Serialize};

use crate::keys::{self, KeyError, SealCost};

/// Name of the director role in the image repository's root.
pub const DIRECTOR_ROLE: &str = "director";

/// Errors of repository operations. Messages are for operators: they say what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepoError {
    /// A key file problem (missing, wrong passphrase, malformed).
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A metadata problem.
    #[error("metadata: {0}")]
    Tuf(#[from] outpost_protocol::tuf::Error),
    /// Bad release metadata.
    #[error("release metadata: {0}")]
    Release(#[from] outpost_protocol::release::ReleaseError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The request does not make sense.
    #[error("{0}")]
    Usage(String),
    /// Not enough root keys are at hand to reach the threshold.
    #[error("{role} needs {threshold} signatures but only {available} of its keys are in {dir}")]
    BelowThreshold {
        /// Role name.
        role: String,
        /// Required signatures.
        threshold: u64,
        /// Keys found.
        available: usize,
        /// Where keys were looked for.
        dir: PathBuf,
    },
}

/// Result alias for this module.
pub type Result<T, E = RepoError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RepoError + '_ {
    move |source| RepoError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Expiry periods, in days, stored in `repo.json`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Expiries {
    /// Root metadata.
    pub root_days: i64,
    /// Targets metadata (bounds how long a revoked release can be withheld from a device).
    pub targets_days: i64,
    /// Snapshot metadata.
    pub snapshot_days: i64,
    /// Timestamp metadata (bounds a freeze attack).
    pub timestamp_days: i64,
}

impl Default for Expiries {
    fn default() -> Self {
        Expiries {
            root_days: 365,
            targets_days: 90,
            snapshot_days: 7,
            timestamp_days: 1,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Settings {
    outpost_repo: u32,
    expiries: Expiries,
}

/// Options for [`Repo::init`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Number of offline root keys.
    pub root_keys: usize,
    /// Signatures required on root metadata.
    pub root_threshold: u64,
    /// Seal the offline keys (root and targets) with this passphrase.
    pub passphrase: Option<String>,
    /// Expiry periods.
    pub expiries: Expiries,
    /// scrypt cost for sealed keys.
    pub seal_cost: SealCost,
}

/// What a key change in [`Repo::rotate_root`] does.
#[derive(Debug, Clone, Default)]
pub struct RootRotation {
    /// New root keys to generate.
    pub add_keys: usize,
    /// Root key ids (or unique prefixes) to remove.
    pub remove: Vec<String>,
    /// New root threshold.
    pub threshold: Option<u64>,
    /// Non-root roles whose key is replaced by a freshly generated one
    /// (`targets`, `snapshot`, `timestamp`, `director`).
    pub replace_roles: Vec<String>,
}

/// A signed release as listed in targets metadata.
#[derive(Debug, Clone)]
pub struct ReleaseEntry {
    /// Target path.
    pub path: String,
    /// Target length and hashes.
    pub target: TargetFile,
    /// Parsed release metadata.
    pub release: ModelRelease,
}

/// An image repository directory opened for operator actions.
#[derive(Debug)]
pub struct Repo {
    dir: PathBuf,
    expiries: Expiries,
    passphrase: Option<String>,
}

impl Repo {
    /// Creates a repository in `dir` (which must be empty or absent): root keys, a
    /// release key, online keys, and version 1 of every role.
    pub fn init(dir: &Path, opts: &InitOptions, now: UtcTime) -> Result<Repo> {
        if opts.root_keys == 0 {
            return Err(RepoError::Usage("--root-keys must be at least 1".into()));
        }
        if opts.root_threshold == 0 || opts.root_threshold > opts.root_keys as u64 {
            return Err(RepoError::Usage(format!(
                "--root-threshold {} must be between 1 and the number of root keys ({})",
                opts.root_threshold, opts.root_keys
            )));
        }
        if dir.exists()
            && std::fs::read_dir(dir)
                .map_err(io_err(dir))?
                .next()
                .is_some()
        {
            return Err(RepoError::Usage(format!(
                "{} is not empty; refusing to create a repository over it",
                dir.display()
            )));
        }
        for sub in ["keys", "metadata", "targets"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let settings = Settings {
            outpost_repo: 1,
            expiries: opts.expiries,
        };
        write_file(
            &dir.join("repo.json"),
            &serde_json::to_vec_pretty(&settings).expect("settings serialize"),
        )?;
        let repo = Repo {
            dir: dir.to_owned(),
            expiries: opts.expiries,
            passphrase: opts.passphrase.clone(),
        };

        let mut root = Root::new(now.plus_seconds(days(opts.expiries.root_days)));
        let mut root_signers = Vec::new();
        for _ in 0..opts.root_keys {
            let key = repo.new_key("root", opts.passphrase.as_deref(), opts.seal_cost)?;
            root.add_key("root", key.public_key())?;
            root_signers.push(key);
        }
        root.roles.insert(
            "root".into(),
            RoleKeys::new(
                root_signers.iter().map(|k| k.key_id().to_owned()).collect(),
                opts.root_threshold,
            ),
        );
        for role in ["targets", "snapshot", "timestamp", DIRECTOR_ROLE] {
            // The release key is offline like root keys; online keys stay unsealed because
            // the server signs with them unattended.
            let pass = (role == "targets")
                .then_some(opts.passphrase.as_deref())
                .flatten();
            let key = repo.new_key(role, pass, opts.seal_cost)?;
            root.add_key(role, key.public_key())?;
        }
        repo.write_root(&root, &root_signers)?;

        let targets = Targets::new(now.plus_seconds(days(opts.expiries.targets_days)));
        repo.write_signed_targets(targets, now)?;
        Ok(repo)
    }

    /// Opens an existing repository. `passphrase` opens sealed offline keys.
    pub fn open(dir: &Path, passphrase: Option<String>) -> Result<Repo> {
        let path = dir.join("repo.json");
        let bytes = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                RepoError::Usage(format!(
                    "{} is not an Outpost repository (no repo.json); create one with `outpostctl repo init`",
                    dir.display()
                ))
            } else {
                io_err(&path)(e)
            }
        })?;
        let settings: Settings = serde_json::from_slice(&bytes)
            .map_err(|e| RepoError::Usage(format!("{}: {e}", path.display())))?;
        Ok(Repo {
            dir: dir.to_owned(),
            expiries: settings.expiries,
            passphrase,
        })
    }

    /// The repository directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Directory of signed metadata, servable as the TUF metadata URL.
    pub fn metadata_dir(&self) -> PathBuf {
        self.dir.join("metadata")
    }

    /// Directory of target files, servable as the TUF target base URL.
    pub fn targets_dir(&self) -> PathBuf {
        self.dir.join("targets")
    }

    /// Path of a role's key file.
    pub fn key_path(&self, role: &str) -> PathBuf {
        self.dir.join("keys").join(format!("{role}.json"))
    }

    /// Loads a role's signing key (`targets`, `snapshot`, `timestamp`, `director`).
    pub fn load_key(&self, role: &str) -> Result<SigningKey> {
        let key = keys::read(&self.key_path(role), self.passphrase.as_deref())?;
        Ok(SigningKey::from_seed(key.to_bytes()))
    }

    /// The current root metadata.
    pub fn root(&self) -> Result<Root> {
        Ok(self.read_envelope("root.json")?.parse_signed::<Root>()?)
    }

    /// The current top-level targets metadata.
    pub fn targets(&self) -> Result<Targets> {
        Ok(self
            .read_envelope("targets.json")?
            .parse_signed::<Targets>()?)
    }

    /// Releases listed in targets, in path order.
    pub fn releases(&self) -> Result<Vec<ReleaseEntry>> {
        let targets = self.targets()?;
        let mut out = Vec::new();
        for (path, target) in targets.targets {
            if let Some(custom) = &target.custom
                && let Ok(release) = ModelRelease::from_value(custom)
            {
                out.push(ReleaseEntry {
                    path,
                    target,
                    release,
                });
            }
        }
        Ok(out)
    }

    /// Adds `model_bytes` as a target with `release` as its custom metadata, re-signs
    /// targets with the release key and, when their keys are here, snapshot and
    /// timestamp. The release's `sequence` is set to one more than the model's highest.
    pub fn sign_release(
        &self,
        file_name: &str,
        model_bytes: &[u8],
        mut release: ModelRelease,
        now: UtcTime,
    ) -> Result<ReleaseEntry> {
        if file_name.is_empty() || file_name.contains('/') || file_name.starts_with('.') {
            return Err(RepoError::Usage(format!(
                "bad target file name {file_name:?}"
            )));
        }
        for part in [&release.model, &release.version] {
            if part.is_empty() || part.contains('/') || part.starts_with('.') {
                return Err(RepoError::Usage(format!(
                    "model name and version must be non-empty path segments, got {part:?}"
                )));
            }
        }
        let key = self.load_key("targets")?;
        let mut targets = self.targets()?;
        let path = format!("{}/{}/{}", release.model, release.version, file_name);
        let existing = self.releases()?;
        if let Some(e) = existing
            .iter()
            .find(|e| e.release.model == release.model && e.release.version == release.version)
        {
            return Err(RepoError::Usage(format!(
                "{} {} is already released as {}; versions are immutable, release a new version",
                release.model, release.version, e.path
            )));
        }
        release.sequence = existing
            .iter()
            .filter(|e| e.release.model == release.model)
            .map(|e| e.release.sequence)
            .max()
            .unwrap_or(0)
            + 1;
        release.schema = outpost_protocol::release::RELEASE_SCHEMA_VERSION;
        release.validate()?;
        let custom = serde_json::to_value(&release).expect("release serializes");
        let target = TargetFile::from_bytes(model_bytes, Some(custom));
        self.store_target(&path, &target, model_bytes)?;
        targets.targets.insert(path.clone(), target.clone());
        self.resign_targets(targets, &key, now)?;
        Ok(ReleaseEntry {
            path,
            target,
            release,
        })
    }

    /// Removes every target of `model` at `version` and re-signs. Devices then refuse
    /// director assignments naming it.
    pub fn revoke_release(&self, model: &str, version: &str, now: UtcTime) -> Result<Vec<String>> {
        let key = self.load_key("targets")?;
        let mut targets = self.targets()?;
        let doomed: Vec<String> = self
            .releases()?
            .into_iter()
            .filter(|e| e.release.model == model && e.release.version == version)
            .map(|e| e.path)
            .collect();
        if doomed.is_empty() {
            return Err(RepoError::Usage(format!(
                "no release {model} {version} in the repository"
            )));
        }
        for p in &doomed {
            targets.targets.remove(p);
        }
        self.resign_targets(targets, &key, now)?;
        Ok(doomed)
    }

    /// Re-signs snapshot and timestamp with fresh expiries (what the server does on a
    /// schedule). Needs the online keys.
    pub fn refresh_online(&self, now: UtcTime) -> Result<()> {
        let targets_env = self.read_envelope("targets.json")?;
        let targets: Targets = targets_env.parse_signed()?;
        self.write_snapshot_and_timestamp(targets.version, &targets_env.to_bytes(), now)
    }

    /// Writes root version N+1: root keys added, removed or re-thresholded, and other
    /// roles' keys replaced. Signed by a threshold of the current root keys and of the
    /// new root keys, as clients require (TUF 5.3.4).
    pub fn rotate_root(&self, change: &RootRotation, now: UtcTime) -> Result<Root> {
        let old = self.root()?;
        let old_root_role = old
            .role("root")
            .cloned()
            .ok_or_else(|| RepoError::Usage("root metadata has no root role".into()))?;
        let available = self.root_keys_at_hand()?;
        let old_signers: Vec<SigningKey> = available
            .iter()
            .filter(|k| old_root_role.keyids.iter().any(|id| id == k.key_id()))
            .cloned()
            .collect();
        if (old_signers.len() as u64) < old_root_role.threshold {
            return Err(RepoError::BelowThreshold {
                role: "root (current)".into(),
                threshold: old_root_role.threshold,
                available: old_signers.len(),
                dir: self.dir.join("keys"),
            });
        }

        let mut new = old.clone();
        new.version = old.version + 1;
        new.expires = now.plus_seconds(days(self.expiries.root_days));
        for prefix in &change.remove {
            let matches: Vec<String> = old_root_role
                .keyids
                .iter()
                .filter(|id| id.starts_with(prefix.as_str()))
                .cloned()
                .collect();
            match matches.as_slice() {
                [id] => new.revoke_key("root", id),
                [] => {
                    return Err(RepoError::Usage(format!(
                        "no root key id starts with {prefix:?}"
                    )));
                }
                _ => {
                    return Err(RepoError::Usage(format!(
                        "root key id prefix {prefix:?} is ambiguous"
                    )));
                }
            }
        }
        let seal = SealCost::default();
        let mut new_signers: Vec<SigningKey> = available
            .iter()
            .filter(|k| {
                new.role("root")
                    .is_some_and(|r| r.keyids.iter().any(|id| id == k.key_id()))
            })
            .cloned()
            .collect();
        for _ in 0..change.add_keys {
            let key = self.new_key("root", self.passphrase.as_deref(), seal)?;
            new.add_key("root", key.public_key())?;
            new_signers.push(key);
        }
        let root_role = new.roles.get_mut("root").expect("root role exists");
        if let Some(t) = change.threshold {
            root_role.threshold = t;
        }
        let (count, threshold) = (root_role.keyids.len(), root_role.threshold);
        if threshold == 0 || threshold > count as u64 {
            return Err(RepoError::Usage(format!(
                "root threshold {threshold} must be between 1 and the number of root keys ({count})"
            )));
        }
        for role in &change.replace_roles {
            if !matches!(
                role.as_str(),
                "targets" | "snapshot" | "timestamp" | DIRECTOR_ROLE
            ) {
                return Err(RepoError::Usage(format!(
                    "cannot replace the key of role {role:?}"
                )));
            }
            let old_ids = new.role(role).map(|r| r.keyids.clone()).unwrap_or_default();
            for id in old_ids {
                new.revoke_key(role, &id);
            }
            let path = self.key_path(role);
            let retired = self
                .dir
                .join("keys")
                .join(format!("retired-{role}-v{}.json", old.version));
            std::fs::rename(&path, &retired).map_err(io_err(&path))?;
            let pass = (role == "targets")
                .then_some(self.passphrase.as_deref())
                .flatten();
            let key = self.new_key(role, pass, seal)?;
            new.add_key(role, key.public_key())?;
        }
        let mut signers = old_signers;
        for k in new_signers {
            if !signers.iter().any(|s| s.key_id() == k.key_id()) {
                signers.push(k);
            }
        }
        self.write_root(&new, &signers)?;
        // Keys of other roles may have changed: re-sign what they sign.
        if !change.replace_roles.is_empty() {
            let targets = self.targets()?;
            if change.replace_roles.iter().any(|r| r == "targets") {
                let key = self.load_key("targets")?;
                self.resign_targets(targets, &key, now)?;
            } else {
                self.refresh_online(now)?;
            }
        }
        Ok(new)
    }

    fn root_keys_at_hand(&self) -> Result<Vec<SigningKey>> {
        let dir = self.dir.join("keys");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("root-") && name.ends_with(".json") {
                let key = keys::read(&entry.path(), self.passphrase.as_deref())?;
                out.push(SigningKey::from_seed(key.to_bytes()));
            }
        }
        Ok(out)
    }

    fn new_key(&self, role: &str, passphrase: Option<&str>, cost: SealCost) -> Result<SigningKey> {
        let key = keys::generate();
        let signing = SigningKey::from_seed(key.to_bytes());
        let path = if role == "root" {
            self.dir
                .join("keys")
                .join(format!("root-{}.json", &signing.key_id()[..8]))
        } else {
            self.key_path(role)
        };
        keys::write(&path, role, &key, passphrase, cost)?;
        Ok(signing)
    }

    fn write_root(&self, root: &Root, signers: &[SigningKey]) -> Result<()> {
        let mut env = Envelope::new(root)?;
        for k in signers {
            env.sign(k)?;
        }
        let bytes = env.to_bytes();
        let meta = self.metadata_dir();
        write_file(&meta.join(format!("{}.root.json", root.version)), &bytes)?;
        write_file(&meta.join("root.json"), &bytes)
    }

    fn resign_targets(&self, mut targets: Targets, key: &SigningKey, now: UtcTime) -> Result<()> {
        targets.version += 1;
        targets.expires = now.plus_seconds(days(self.expiries.targets_days));
        self.write_signed_targets_with(targets, key, now)
    }

    fn write_signed_targets(&self, targets: Targets, now: UtcTime) -> Result<()> {
        let key = self.load_key("targets")?;
        self.write_signed_targets_with(targets, &key, now)
    }

    fn write_signed_targets_with(
        &self,
        targets: Targets,
        key: &SigningKey,
        now: UtcTime,
    ) -> Result<()> {
        let mut env = Envelope::new(&targets)?;
        env.sign(key)?;
        let bytes = env.to_bytes();
        let meta = self.metadata_dir();
        write_file(
            &meta.join(format!("{}.targets.json", targets.version)),
            &bytes,
        )?;
        write_file(&meta.join("targets.json"), &bytes)?;
        match self.write_snapshot_and_timestamp(targets.version, &bytes, now) {
            // Without online keys at hand (an operator's machine), the server re-signs
            // snapshot and timestamp when the release is uploaded.
            Err(RepoError::Key(KeyError::Missing { .. })) => Ok(()),
            other => other,
        }
    }

    fn write_snapshot_and_timestamp(
        &self,
        targets_version: u64,
        targets_bytes: &[u8],
        now: UtcTime,
    ) -> Result<()> {
        let snapshot_key = self.load_key("snapshot")?;
        let timestamp_key = self.load_key("timestamp")?;
        let previous = self
            .read_envelope("snapshot.json")
            .ok()
            .and_then(|e| e.parse_signed::<Snapshot>().ok());
        let mut snapshot = Snapshot::new(now.plus_seconds(days(self.expiries.snapshot_days)));
        snapshot.version = previous.as_ref().map_or(1, |s| s.version + 1);
        snapshot.meta = BTreeMap::from([(
            "targets.json".to_owned(),
            MetaFile::with_bytes(targets_version, targets_bytes),
        )]);
        let mut env = Envelope::new(&snapshot)?;
        env.sign(&snapshot_key)?;
        let snap_bytes = env.to_bytes();
        let meta = self.metadata_dir();
        write_file(
            &meta.join(format!("{}.snapshot.json", snapshot.version)),
            &snap_bytes,
        )?;
        write_file(&meta.join("snapshot.json"), &snap_bytes)?;

        let previous_ts = self
            .read_envelope("timestamp.json")
            .ok()
            .and_then(|e| e.parse_signed::<Timestamp>().ok());
        let mut ts = Timestamp::new(
            now.plus_seconds(days(self.expiries.timestamp_days)),
            MetaFile::with_bytes(snapshot.version, &snap_bytes),
        );
        ts.version = previous_ts.map_or(1, |t| t.version() + 1);
        let mut env = Envelope::new(&ts)?;
        env.sign(&timestamp_key)?;
        write_file(&meta.join("timestamp.json"), &env.to_bytes())
    }

    fn store_target(&self, path: &str, target: &TargetFile, bytes: &[u8]) -> Result<()> {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let sha = target
            .hashes
            .get("sha256")
            .expect("TargetFile::from_bytes lists sha256");
        let out_dir = self.targets_dir().join(dir);
        std::fs::create_dir_all(&out_dir).map_err(io_err(&out_dir))?;
        write_file(&out_dir.join(format!("{sha}.{name}")), bytes)?;
        write_file(&out_dir.join(name), bytes)
    }

    fn read_envelope(&self, name: &str) -> Result<Envelope> {
        let path = self.metadata_dir().join(name);
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        Ok(Envelope::from_bytes(name, &bytes, 64 * 1024 * 1024)?)
    }
}

fn days(d: i64) -> i64 {
    d.saturating_mul(86_400)
}

/// Writes a file atomically: temporary file, fsync, rename.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp-write");
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}
