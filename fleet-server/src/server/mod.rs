//! `outpost-server serve`: the fleet server.
//!
//! - [`Core`]: the server's state and every operation on it as plain, synchronous
//!   methods taking `now` (release upload and verification, provisioning, assignment,
//!   MQTT message handling). The async shells call it.
//! - [`api`]: the REST API (`/api/v1`, axum) with operator bearer tokens.
//! - [`mqtt`]: the MQTT link: the server is a client of a broker, external (Mosquitto)
//!   or embedded ([`broker`], rmqtt, the default), chosen by [`BrokerLink`].
//! - [`client`]: a blocking client of the REST API (`outpostctl`, tests).
//! - [`db`], [`repository`], [`artifacts`], [`director`], [`auth`]: storage, the image
//!   repository, content-addressed artifacts, assignment signing and credentials.
//! - [`metadata`]: metadata for devices in ranges, zstd-compressed once per content.
//!
//! [`start`] runs everything and returns a [`RunningServer`]; `docs/server.md` is the
//! operator's guide.

pub mod api;
pub mod artifacts;
pub mod auth;
pub mod broker;
pub mod client;
pub mod db;
pub mod director;
pub mod metadata;
pub mod mqtt;
pub mod repository;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use outpost_protocol::release::ModelRelease;
use outpost_protocol::tuf::UtcTime;
use outpost_protocol::wire::{
    self, Artifact, ArtifactKind, ArtifactList, Request, RequestBody, Response, Status,
    StatusReport, TelemetryAck, TelemetryBatch,
};
use serde::Serialize;

use self::artifacts::ArtifactStore;
use self::auth::Role;
use self::db::{ArtifactRow, Db, DbError, TargetRow};
use self::repository::{ImageRepo, OnlineExpiries, Staged};

/// Errors of server operations. `Rejected` and `NotFound` are the client's fault and
/// their messages are safe to return; the others are logged and reported generically.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A key file problem.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// Metadata failed verification.
    #[error("metadata rejected: {0}")]
    Tuf(#[from] outpost_protocol::tuf::Error),
    /// The embedded broker could not start.
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    /// Signing an assignment failed.
    #[error("director: {0}")]
    Director(#[from] outpost_protocol::director::DirectorError),
    /// Delta encoding failed.
    #[error("delta: {0}")]
    Delta(#[from] outpost_protocol::delta::DeltaError),
    /// The request is refused (bad input, failed verification).
    #[error("{0}")]
    Rejected(String),
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The server's configuration or data directory is not usable.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias of the server.
pub type Result<T, E = ServerError> = std::result::Result<T, E>;

/// How the server reaches the MQTT broker.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum BrokerLink {
    /// No broker: REST only (provisioning and uploads still work).
    None,
    /// An external broker (Mosquitto): the server connects as a privileged client.
    External(BrokerClient),
    /// The embedded broker (rmqtt) in this process; the server's client connects to it
    /// over loopback as a superuser with credentials made at each start.
    Embedded(broker::EmbeddedConfig),
}

/// Connection settings of the server's MQTT client.
#[derive(Debug, Clone)]
pub struct BrokerClient {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Username (`outpost-server` in the shipped ACL).
    pub username: String,
    /// Password.
    pub password: String,
    /// MQTT client id (persistent session).
    pub client_id: String,
}

impl BrokerClient {
    /// Parses `mqtt://host:port`.
    pub fn parse_url(url: &str) -> Result<(String, u16)> {
        let rest = url.strip_prefix("mqtt://").ok_or_else(|| {
            ServerError::Invalid(format!(
                "broker URL {url:?} must be mqtt://host:port (TLS comes later)"
            ))
        })?;
        let (host, port) = rest
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| ServerError::Invalid(format!("broker URL {url:?} needs a port")))?;
        Ok((host.to_owned(), port))
    }
}

/// Configuration of `outpost-server serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Data directory (database, repository, artifacts, admin token).
    pub data_dir: PathBuf,
    /// Operator repository to import on first start.
    pub import_repo: Option<PathBuf>,
    /// HTTP listen address.
    pub http: SocketAddr,
    /// The broker.
    pub broker: BrokerLink,
    /// Mosquitto password file to maintain (device and server credentials).
    pub mosquitto_passwd_file: Option<PathBuf>,
    /// Online metadata lifetimes.
    pub expiries: OnlineExpiries,
}

/// A message for the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retained.
    pub retain: bool,
}

/// An artifact as the API reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ArtifactView {
    /// Artifact id.
    pub id: String,
    /// `full`, `full_zstd` or `delta`.
    pub kind: &'static str,
    /// Base sha256 for a delta.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Length.
    pub length: u64,
    /// Delta codec, or `zstd` for the compressed full file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codec: Option<String>,
}

impl From<ArtifactRow> for ArtifactView {
    fn from(a: ArtifactRow) -> Self {
        ArtifactView {
            kind: match (&a.base_sha256, a.codec.as_deref()) {
                (Some(_), _) => "delta",
                (None, Some(FULL_ZSTD_CODEC)) => "full_zstd",
                (None, _) => "full",
            },
            id: a.id,
            base: a.base_sha256,
            length: a.length,
            codec: a.codec,
        }
    }
}

/// A release as the API reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ReleaseView {
    /// Model.
    pub model: String,
    /// Version.
    pub version: String,
    /// Sequence.
    pub sequence: u64,
    /// Target path.
    pub path: String,
    /// sha256.
    pub sha256: String,
    /// Length.
    pub length: u64,
    /// Artifacts that reconstruct it, smallest first.
    pub artifacts: Vec<ArtifactView>,
}

/// One device's new assignment.
#[derive(Debug, Clone, Serialize)]
pub struct Assigned {
    /// Device.
    pub device: String,
    /// Its assignment counter.
    pub counter: u64,
}

/// How many recent releases of a model serve as delta bases for a new one.
pub const DELTA_BASES: usize = 3;
/// `codec` of the stored artifact row that is the full target compressed with zstd
/// (base `NULL`); the raw full file has no codec.
pub const FULL_ZSTD_CODEC: &str = "zstd";

/// The server's state and operations.
#[derive(Debug)]
pub struct Core {
    data_dir: PathBuf,
    db: Db,
    repo: ImageRepo,
    artifacts: ArtifactStore,
    passwd_file: Option<PathBuf>,
    /// The broker is embedded: it reads credentials from the database at each CONNECT.
    embedded_broker: bool,
    server_user: Option<(String, String)>,
    /// Serializes operations that change the repository or the password file.
    write_lock: Mutex<()>,
    /// Metadata as encoded for devices, per content.
    meta_cache: metadata::MetadataCache,
}

fn unix(now: UtcTime) -> i64 {
    now.unix()
}

impl Core {
    /// Opens the data directory (importing an operator repository first if asked),
    /// re-signs stale online metadata and indexes the repository's targets.
    pub fn open(cfg: &ServeConfig, now: UtcTime) -> Result<Core> {
        let dir = &cfg.data_dir;
        std::fs::create_dir_all(dir).map_err(|source| ServerError::Io {
            path: dir.clone(),
            source,
        })?;
        if let Some(src) = &cfg.import_repo {
            ImageRepo::import(src, dir)?;
        }
        let db = Db::open(&dir.join("server.db"))?;
        let repo = ImageRepo::open(dir, cfg.expiries)?;
        let artifacts = ArtifactStore::open(dir)?;
        let server_user = match &cfg.broker {
            BrokerLink::External(b) => {
                Some((b.username.clone(), auth::mosquitto_hash(&b.password)))
            }
            // Reserves the name (no device may take it); the embedded broker's own
            // credential is random per start and never written anywhere.
            BrokerLink::Embedded(e) => Some((
                e.server_user.clone(),
                auth::mosquitto_hash(&auth::new_password()),
            )),
            BrokerLink::None => None,
        };
        let core = Core {
            data_dir: dir.clone(),
            db,
            repo,
            artifacts,
            passwd_file: cfg.mosquitto_passwd_file.clone(),
            embedded_broker: matches!(cfg.broker, BrokerLink::Embedded(_)),
            server_user,
            write_lock: Mutex::new(()),
            meta_cache: metadata::MetadataCache::default(),
        };
        let staged = core.repo.refresh(now, false)?;
        core.index(&staged)?;
        if cfg.import_repo.is_some() {
            core.import_targets(
                cfg.import_repo.as_deref().unwrap_or(Path::new(".")),
                &staged,
                now,
            )?;
        }
        core.write_passwd_file()?;
        core.warm_metadata();
        Ok(core)
    }

    /// Creates the first admin token if there is none, writing it to
    /// `DATA/admin.token` (mode 0600). Returns its path when created.
    pub fn ensure_admin_token(&self, now: UtcTime) -> Result<Option<PathBuf>> {
        if self.db.token_count()? > 0 {
            return Ok(None);
        }
        let token = auth::new_token();
        let path = self.data_dir.join("admin.token");
        write_private(&path, format!("{token}\n").as_bytes(), 0o600)?;
        self.db
            .insert_token(&auth::token_hash(&token), "admin", Role::Admin, unix(now))?;
        self.db.audit(
            unix(now),
            "server",
            "token.create",
            &serde_json::json!({"name": "admin", "role": "admin"}),
        );
        Ok(Some(path))
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The image repository.
    pub fn repo(&self) -> &ImageRepo {
        &self.repo
    }

    /// The name and role of a bearer token.
    pub fn authenticate(&self, token: &str) -> Result<Option<(String, Role)>> {
        Ok(self.db.token(&auth::token_hash(token))?)
    }

    /// Mints a token.
    pub fn mint_token(&self, actor: &str, name: &str, role: Role, now: UtcTime) -> Result<String> {
        if name.is_empty() || name.len() > 64 {
            return Err(ServerError::Rejected(
                "token name must be 1-64 characters".into(),
            ));
        }
        let token = auth::new_token();
        self.db
            .insert_token(&auth::token_hash(&token), name, role, unix(now))?;
        self.db.audit(
            unix(now),
            actor,
            "token.create",
            &serde_json::json!({"name": name, "role": role.as_str()}),
        );
        Ok(token)
    }

    fn index(&self, staged: &Staged) -> Result<()> {
        let rows: Vec<TargetRow> = staged
            .targets()
            .into_iter()
            .map(|t| {
                let release = t
                    .file
                    .custom
                    .as_ref()
                    .and_then(|c| ModelRelease::from_value(c).ok());
                TargetRow {
                    sha256: t.file.hashes.get("sha256").cloned().unwrap_or_default(),
                    length: t.file.length,
                    file: serde_json::to_value(&t.file).unwrap_or_default(),
                    model: release.as_ref().map(|r| r.model.clone()),
                    version: release.as_ref().map(|r| r.version.clone()),
                    sequence: release.as_ref().map(|r| r.sequence),
                    path: t.path,
                    role: t.role,
                }
            })
            .collect();
        self.db.replace_targets(&rows)?;
        Ok(())
    }

    /// On import: stage every released model file found in the operator repository's
    /// `targets/` and make artifacts of those matching the signed entries.
    fn import_targets(&self, operator_repo: &Path, staged: &Staged, now: UtcTime) -> Result<()> {
        for t in staged.targets() {
            let Some(sha) = t.file.hashes.get("sha256") else {
                continue;
            };
            let p = operator_repo.join("targets").join(&t.path);
            if let Ok(bytes) = std::fs::read(&p)
                && t.verify_bytes(&bytes).is_ok()
            {
                self.artifacts.stage_upload(sha, &bytes)?;
            }
        }
        self.ingest_new_targets(staged, now)?;
        Ok(())
    }

    /// Compresses the current `targets.json` for devices ahead of their requests: the
    /// largest file, new at every release, and served one request at a time.
    fn warm_metadata(&self) {
        if let Ok(Some(bytes)) = self.repo.metadata("targets", None) {
            self.meta_cache.warm(&bytes);
        }
    }

    /// Re-signs snapshot and timestamp if they are getting stale (call periodically).
    pub fn refresh_online(&self, now: UtcTime) -> Result<()> {
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.repo.refresh(now, false)?;
        Ok(())
    }

    /// Stages uploaded model bytes under their sha256.
    pub fn upload_blob(&self, sha256: &str, bytes: &[u8]) -> Result<()> {
        self.artifacts.stage_upload(sha256, bytes)
    }

    /// Accepts a release: new targets metadata signed by operators (and delegated
    /// roles), verified against the trusted root; every new target's bytes must have
    /// been uploaded and must match the signed length and hashes. Stores artifacts,
    /// computes deltas from recent releases of the same model, re-signs snapshot and
    /// timestamp. Returns the new releases.
    pub fn upload_release(
        &self,
        actor: &str,
        targets: &[u8],
        delegated: &BTreeMap<String, Vec<u8>>,
        now: UtcTime,
    ) -> Result<Vec<ReleaseView>> {
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let staged = self.repo.stage(Some(targets), delegated, now)?;
        let new = self.ingest_new_targets(&staged, now)?;
        self.repo.commit(&staged)?;
        self.index(&staged)?;
        self.warm_metadata();
        let version = staged.set.targets().map(|t| t.version).unwrap_or_default();
        let views = self.release_views()?;
        let out: Vec<ReleaseView> = views
            .into_iter()
            .filter(|v| new.contains(&v.sha256))
            .collect();
        self.db.audit(
            unix(now),
            actor,
            "release.upload",
            &serde_json::json!({
                "targets_version": version,
                "new": out.iter().map(|r| serde_json::json!({"path": r.path, "model": r.model, "version": r.version})).collect::<Vec<_>>(),
            }),
        );
        Ok(out)
    }

    /// Accepts the next root version, signed offline by operators: it must chain from
    /// the trusted root (a threshold of the old and of the new root keys, version + 1)
    /// and keep listing the server's online keys; the repository must verify under it
    /// (with `targets` when the rotation replaced the release key). Writes
    /// `N.root.json` and `root.json`, then snapshot and timestamp re-signed; devices
    /// find the new root when they probe `N.root.json`. Returns the new version.
    pub fn upload_root(
        &self,
        actor: &str,
        root: &[u8],
        targets: Option<&[u8]>,
        now: UtcTime,
    ) -> Result<u64> {
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let staged = self.repo.stage_root(root, targets, now)?;
        let version = staged.set.root().version;
        if targets.is_some() {
            self.ingest_new_targets(&staged, now)?;
        }
        self.repo.commit(&staged)?;
        self.index(&staged)?;
        self.warm_metadata();
        self.db.audit(
            unix(now),
            actor,
            "root.upload",
            &serde_json::json!({ "version": version }),
        );
        Ok(version)
    }

    /// Checks and stores the bytes of every target not yet stored; computes deltas.
    /// Returns the sha256 of the new targets.
    fn ingest_new_targets(&self, staged: &Staged, now: UtcTime) -> Result<Vec<String>> {
        let known = self.db.targets()?;
        let mut new = Vec::new();
        for t in staged.targets() {
            let sha = t.file.hashes.get("sha256").cloned().ok_or_else(|| {
                ServerError::Rejected(format!("target {} has no sha256 hash", t.path))
            })?;
            if !artifacts::valid_sha256(&sha) {
                return Err(ServerError::Rejected(format!(
                    "target {} sha256 is not lowercase hex",
                    t.path
                )));
            }
            if self.db.artifact_length(&sha)?.is_some() || new.contains(&sha) {
                continue;
            }
            let bytes = self.artifacts.target_bytes(&sha)?.ok_or_else(|| {
                ServerError::Rejected(format!(
                    "no bytes uploaded for target {} (PUT /api/v1/blobs/{sha} first)",
                    t.path
                ))
            })?;
            t.verify_bytes(&bytes).map_err(|e| {
                ServerError::Rejected(format!(
                    "uploaded bytes of {} do not match the signed target: {e}",
                    t.path
                ))
            })?;
            let release = t
                .file
                .custom
                .as_ref()
                .and_then(|c| ModelRelease::from_value(c).ok());
            let mut deltas = Vec::new();
            if let Some(r) = &release {
                let mut bases: Vec<&TargetRow> = known
                    .iter()
                    .filter(|k| {
                        k.model.as_deref() == Some(r.model.as_str())
                            && k.sequence.is_some_and(|s| s < r.sequence)
                            && k.sha256 != sha
                    })
                    .collect();
                bases.sort_by_key(|k| std::cmp::Reverse(k.sequence));
                for base in bases.into_iter().take(DELTA_BASES) {
                    let Some(base_bytes) = self.artifacts.target_bytes(&base.sha256)? else {
                        continue;
                    };
                    if let Some(d) = artifacts::best_delta(&base_bytes, &bytes)? {
                        deltas.push((base.sha256.clone(), d));
                    }
                }
            }
            let compressed = artifacts::compressed_full(&bytes)?;
            self.artifacts.put(&bytes)?;
            self.db.insert_artifact(
                &ArtifactRow {
                    id: sha.clone(),
                    target_sha256: sha.clone(),
                    base_sha256: None,
                    length: bytes.len() as u64,
                    codec: None,
                },
                unix(now),
            )?;
            if let Some(frame) = compressed {
                let id = self.artifacts.put(&frame)?;
                self.db.insert_artifact(
                    &ArtifactRow {
                        id,
                        target_sha256: sha.clone(),
                        base_sha256: None,
                        length: frame.len() as u64,
                        codec: Some(FULL_ZSTD_CODEC.to_owned()),
                    },
                    unix(now),
                )?;
            }
            for (base, d) in deltas {
                let id = self.artifacts.put(&d.bytes)?;
                self.db.insert_artifact(
                    &ArtifactRow {
                        id,
                        target_sha256: sha.clone(),
                        base_sha256: Some(base),
                        length: d.bytes.len() as u64,
                        codec: Some(d.codec),
                    },
                    unix(now),
                )?;
            }
            new.push(sha);
        }
        Ok(new)
    }

    /// Every model release with its artifacts.
    pub fn release_views(&self) -> Result<Vec<ReleaseView>> {
        let mut out = Vec::new();
        for t in self.db.targets()? {
            let (Some(model), Some(version), Some(sequence)) = (t.model, t.version, t.sequence)
            else {
                continue;
            };
            let artifacts = self
                .db
                .artifacts_for(&t.sha256)?
                .into_iter()
                .map(ArtifactView::from)
                .collect();
            out.push(ReleaseView {
                model,
                version,
                sequence,
                path: t.path,
                sha256: t.sha256,
                length: t.length,
                artifacts,
            });
        }
        Ok(out)
    }

    // --- devices ---

    /// Provisions a device; returns its broker password (only its hash is kept).
    pub fn add_device(
        &self,
        actor: &str,
        id: &str,
        tags: &BTreeMap<String, String>,
        now: UtcTime,
    ) -> Result<String> {
        if !wire::valid_device_id(id) {
            return Err(ServerError::Rejected(format!(
                "device id {id:?} must be 1-64 characters of [A-Za-z0-9._-]"
            )));
        }
        if self.server_user.as_ref().is_some_and(|(u, _)| u == id) {
            return Err(ServerError::Rejected(format!(
                "{id:?} is the server's broker user"
            )));
        }
        for (k, v) in tags {
            if k.is_empty() || k.len() > 64 || v.len() > 256 {
                return Err(ServerError::Rejected(
                    "tag keys are 1-64 characters, values at most 256".into(),
                ));
            }
        }
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let password = auth::new_password();
        if !self
            .db
            .insert_device(id, tags, &auth::mosquitto_hash(&password), unix(now))?
        {
            return Err(ServerError::Rejected(format!("device {id} already exists")));
        }
        self.write_passwd_file()?;
        self.db.audit(
            unix(now),
            actor,
            "device.add",
            &serde_json::json!({"id": id, "tags": tags}),
        );
        Ok(password)
    }

    /// Replaces a device's broker password and returns the new one.
    pub fn rotate_password(&self, actor: &str, id: &str, now: UtcTime) -> Result<String> {
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let password = auth::new_password();
        if !self.db.set_password(id, &auth::mosquitto_hash(&password))? {
            return Err(ServerError::NotFound(format!("no device {id}")));
        }
        self.write_passwd_file()?;
        self.db.audit(
            unix(now),
            actor,
            "device.credentials",
            &serde_json::json!({"id": id}),
        );
        Ok(password)
    }

    /// Whether the server maintains a broker password file (which the broker must
    /// reload after a change).
    pub fn maintains_passwd_file(&self) -> bool {
        self.passwd_file.is_some() && !self.embedded_broker
    }

    /// Rewrites the Mosquitto password file from the database.
    fn write_passwd_file(&self) -> Result<()> {
        let Some(path) = &self.passwd_file else {
            return Ok(());
        };
        let mut text = String::new();
        if let Some((u, h)) = &self.server_user {
            text.push_str(&format!("{u}:{h}\n"));
        }
        for (id, hash) in self.db.password_hashes()? {
            text.push_str(&format!("{id}:{hash}\n"));
        }
        write_private(path, text.as_bytes(), 0o640)
    }

    /// Assigns `model` `version` to the devices named and those carrying every tag in
    /// `tags`: signs each device's director assignment with its next counter. Returns
    /// the retained messages to publish.
    pub fn assign(
        &self,
        actor: &str,
        model: &str,
        version: &str,
        device_ids: &[String],
        tags: &BTreeMap<String, String>,
        now: UtcTime,
    ) -> Result<(Vec<Assigned>, Vec<Outgoing>)> {
        if device_ids.is_empty() && tags.is_empty() {
            return Err(ServerError::Rejected(
                "select devices by id and/or tag".into(),
            ));
        }
        let targets = self.db.targets()?;
        let target = targets
            .iter()
            .find(|t| t.model.as_deref() == Some(model) && t.version.as_deref() == Some(version))
            .ok_or_else(|| ServerError::NotFound(format!("no release {model} {version}")))?;
        let devices = self.db.devices()?;
        for id in device_ids {
            if !devices.iter().any(|d| &d.id == id) {
                return Err(ServerError::NotFound(format!("no device {id}")));
            }
        }
        let selected: Vec<String> = devices
            .iter()
            .filter(|d| {
                device_ids.contains(&d.id)
                    || (!tags.is_empty() && tags.iter().all(|(k, v)| d.tags.get(k) == Some(v)))
            })
            .map(|d| d.id.clone())
            .collect();
        if selected.is_empty() {
            return Err(ServerError::NotFound(
                "no device matches the selector".into(),
            ));
        }
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let by_path: BTreeMap<&str, &TargetRow> =
            targets.iter().map(|t| (t.path.as_str(), t)).collect();
        let expires = now.plus_seconds(self.repo.expiries().assignment_secs);
        let mut assigned = Vec::new();
        let mut out = Vec::new();
        for (device, counter, slots) in self.db.assign(&selected, model, &target.path)? {
            let doc = director::sign(
                self.repo.director_key(),
                &device,
                counter,
                &slots,
                &by_path,
                expires,
            )?;
            self.db.store_assignment(&device, &doc)?;
            let topics = wire::DeviceTopics::new(&device)
                .map_err(|e| ServerError::Invalid(e.to_string()))?;
            out.push(Outgoing {
                topic: topics.assignment,
                payload: doc,
                retain: true,
            });
            assigned.push(Assigned { device, counter });
        }
        self.db.audit(
            unix(now),
            actor,
            "assign",
            &serde_json::json!({
                "model": model, "version": version, "target": target.path,
                "devices": assigned.iter().map(|a| &a.device).collect::<Vec<_>>(),
            }),
        );
        Ok((assigned, out))
    }

    /// Renews every assignment that expires within the renewal window at `now` (call
    /// periodically): the same targets re-signed with the device's next counter, a new
    /// expiry and `renews` naming the operator's original, so that devices that acted
    /// on it do nothing. Returns the retained messages to publish.
    pub fn renew_assignments(&self, now: UtcTime) -> Result<Vec<Outgoing>> {
        let expiries = self.repo.expiries();
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut targets = None;
        let mut out = Vec::new();
        let mut renewed = Vec::new();
        for (device, doc) in self.db.assignments()? {
            let current = match director::parse(&doc) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("outpost-server: not renewing {device}'s assignment: {e}");
                    continue;
                }
            };
            if !director::due(&current, now, expiries.assignment_renew_secs) {
                continue;
            }
            let rows = match &targets {
                Some(rows) => rows,
                None => targets.insert(self.db.targets()?),
            };
            let by_path: BTreeMap<&str, &TargetRow> =
                rows.iter().map(|t| (t.path.as_str(), t)).collect();
            let counter = self.db.next_assignment_counter(&device)?;
            let doc = director::renew(
                self.repo.director_key(),
                &current,
                counter,
                &by_path,
                now.plus_seconds(expiries.assignment_secs),
            )?;
            self.db.store_assignment(&device, &doc)?;
            let topics = wire::DeviceTopics::new(&device)
                .map_err(|e| ServerError::Invalid(e.to_string()))?;
            out.push(Outgoing {
                topic: topics.assignment,
                payload: doc,
                retain: true,
            });
            renewed.push(Assigned { device, counter });
        }
        if !renewed.is_empty() {
            self.db.audit(
                unix(now),
                "server",
                "assign.renew",
                &serde_json::json!({ "devices": renewed }),
            );
        }
        Ok(out)
    }

    /// The retained assignment of every device (republished when the broker lost our
    /// session).
    pub fn current_assignments(&self) -> Result<Vec<Outgoing>> {
        Ok(self
            .db
            .assignments()?
            .into_iter()
            .filter_map(|(id, doc)| {
                Some(Outgoing {
                    topic: wire::DeviceTopics::new(&id).ok()?.assignment,
                    payload: doc,
                    retain: true,
                })
            })
            .collect())
    }

    // --- MQTT ---

    /// Handles one message from a device topic and returns what to publish. Messages
    /// on topics that are not a device's `req`, `status` or `telemetry`, or whose body
    /// names another device, are dropped.
    pub fn handle_device_message(
        &self,
        topic: &str,
        payload: &[u8],
        now: UtcTime,
    ) -> Vec<Outgoing> {
        let Some((device, leaf)) = wire::parse_device_topic(topic) else {
            return Vec::new();
        };
        let Ok(topics) = wire::DeviceTopics::new(device) else {
            return Vec::new();
        };
        let r = match leaf {
            "req" => self.handle_request(device, payload).map(|resp| {
                resp.map(|resp| Outgoing {
                    topic: topics.resp.clone(),
                    payload: resp.to_bytes(),
                    retain: false,
                })
            }),
            "status" => self.handle_status(device, payload, now).map(|()| None),
            "telemetry" => self.handle_telemetry(device, payload, now).map(|ack| {
                ack.map(|ack| Outgoing {
                    topic: topics.ack.clone(),
                    payload: serde_json::to_vec(&ack).expect("acks serialize"),
                    retain: false,
                })
            }),
            _ => Ok(None),
        };
        match r {
            Ok(out) => out.into_iter().collect(),
            Err(e) => {
                eprintln!("outpost-server: {topic}: {e}");
                Vec::new()
            }
        }
    }

    fn handle_request(&self, device: &str, payload: &[u8]) -> Result<Option<Response>> {
        let req = match Request::from_bytes(payload) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("outpost-server: request from {device} dropped: {e}");
                return Ok(None);
            }
        };
        let id = req.id;
        let resp = match self.answer(&req.body) {
            Ok(r) => r,
            Err(ServerError::NotFound(m)) => Response::fail(id, Status::NotFound, m),
            Err(ServerError::Rejected(m)) => Response::fail(id, Status::Error, m),
            Err(e) => {
                eprintln!("outpost-server: request {id} from {device}: {e}");
                Response::fail(id, Status::Error, "internal error")
            }
        };
        let mut resp = resp;
        resp.header.id = id;
        Ok(Some(resp))
    }

    fn answer(&self, body: &RequestBody) -> Result<Response> {
        const MAX_BODY: usize = wire::MAX_PAYLOAD - 4 - wire::MAX_HEADER;
        match body {
            RequestBody::Metadata {
                role,
                version,
                offset,
                len,
                accept_zstd,
            } => {
                let bytes = self.repo.metadata(role, *version)?.ok_or_else(|| {
                    ServerError::NotFound(format!("no metadata {role} {version:?}"))
                })?;
                if let Some(len) = len {
                    let len = (*len).clamp(1, wire::CHUNK_LEN);
                    let offset = offset.unwrap_or(0);
                    return Ok(self.meta_cache.range(&bytes, *accept_zstd, offset, len));
                }
                // Agents from before ranged metadata: the whole file, if it fits.
                if bytes.len() > MAX_BODY {
                    return Err(ServerError::Rejected(format!(
                        "{role} metadata is {} bytes, over the {MAX_BODY}-byte message cap",
                        bytes.len()
                    )));
                }
                Ok(Response::ok(0, bytes))
            }
            RequestBody::Artifacts {
                target,
                sha256,
                bases,
                accept_full_zstd,
            } => {
                let known = self
                    .db
                    .targets()?
                    .into_iter()
                    .any(|t| &t.path == target && &t.sha256 == sha256);
                if !known {
                    return Err(ServerError::NotFound(format!(
                        "{target} with sha256 {sha256} is not a current target"
                    )));
                }
                let mut artifacts: Vec<Artifact> = self
                    .db
                    .artifacts_for(sha256)?
                    .into_iter()
                    .filter_map(|a| {
                        let kind = match (a.base_sha256, a.codec.as_deref()) {
                            (None, Some(FULL_ZSTD_CODEC)) if *accept_full_zstd => {
                                ArtifactKind::FullZstd
                            }
                            // Older agents would refuse the whole list over this kind.
                            (None, Some(FULL_ZSTD_CODEC)) => return None,
                            (None, _) => ArtifactKind::Full,
                            (Some(b), _) if bases.contains(&b) => ArtifactKind::Delta { base: b },
                            (Some(_), _) => return None,
                        };
                        Some(Artifact {
                            id: a.id,
                            length: a.length,
                            kind,
                        })
                    })
                    .collect();
                artifacts.sort_by_key(|a| a.length);
                let body =
                    serde_json::to_vec(&ArtifactList { artifacts }).expect("lists serialize");
                Ok(Response::ok(0, body))
            }
            RequestBody::Chunk {
                artifact,
                offset,
                len,
            } => {
                if self.db.artifact_length(artifact)?.is_none() {
                    return Err(ServerError::NotFound(format!("no artifact {artifact}")));
                }
                let len = (*len).min(wire::CHUNK_LEN);
                let (total, bytes) =
                    self.artifacts
                        .chunk(artifact, *offset, len)?
                        .ok_or_else(|| {
                            ServerError::NotFound(format!(
                                "offset {offset} is past the end of {artifact}"
                            ))
                        })?;
                let mut r = Response::ok(0, bytes);
                r.header.total = Some(total);
                r.header.offset = Some(*offset);
                Ok(r)
            }
            _ => Err(ServerError::Rejected("unsupported request".into())),
        }
    }

    fn handle_status(&self, device: &str, payload: &[u8], now: UtcTime) -> Result<()> {
        if payload.len() > wire::MAX_PAYLOAD {
            return Err(ServerError::Rejected(
                "status report over the size cap".into(),
            ));
        }
        let report: StatusReport = serde_json::from_slice(payload)
            .map_err(|e| ServerError::Rejected(format!("malformed status report: {e}")))?;
        if report.device_id != device {
            return Err(ServerError::Rejected(format!(
                "status on {device}'s topic names device {:?}",
                report.device_id.chars().take(64).collect::<String>()
            )));
        }
        let text = String::from_utf8_lossy(payload);
        self.db.store_status(device, report.seq, &text, unix(now))?;
        Ok(())
    }

    fn handle_telemetry(
        &self,
        device: &str,
        payload: &[u8],
        now: UtcTime,
    ) -> Result<Option<TelemetryAck>> {
        let batch = TelemetryBatch::from_bytes(payload)
            .map_err(|e| ServerError::Rejected(e.to_string()))?;
        if batch.device_id != device {
            return Err(ServerError::Rejected(format!(
                "telemetry on {device}'s topic names device {:?}",
                batch.device_id.chars().take(64).collect::<String>()
            )));
        }
        if self.db.device(device)?.is_none() {
            return Err(ServerError::Rejected(format!(
                "telemetry from unknown device {device}"
            )));
        }
        let acked = self.db.ingest_telemetry(device, &batch, unix(now))?;
        Ok(Some(TelemetryAck { acked }))
    }
}

/// Writes a file atomically with `mode`.
fn write_private(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| ServerError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp-write");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The running server.
#[derive(Debug)]
pub struct RunningServer {
    /// Bound HTTP address.
    pub http_addr: SocketAddr,
    /// Path of the admin token file, when this start created it.
    pub admin_token_file: Option<PathBuf>,
    /// The core.
    pub core: Arc<Core>,
    /// The MQTT link, when a broker is configured.
    pub mqtt: Option<mqtt::MqttHandle>,
    /// The embedded broker, in [`BrokerLink::Embedded`] mode.
    pub embedded: Option<broker::EmbeddedBroker>,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningServer {
    /// Stops the HTTP server and the MQTT link and waits for them, then the embedded
    /// broker.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(b) = self.embedded {
            b.stop();
        }
    }
}

fn now() -> UtcTime {
    UtcTime::from_system_time(std::time::SystemTime::now())
}

/// How long `start` waits for its client to subscribe to the embedded broker.
const EMBEDDED_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens the data directory, binds HTTP, connects to the broker and starts serving.
pub async fn start(cfg: ServeConfig) -> Result<RunningServer> {
    let cfg2 = cfg.clone();
    let core = tokio::task::spawn_blocking(move || Core::open(&cfg2, now()))
        .await
        .map_err(|e| ServerError::Invalid(format!("startup task failed: {e}")))??;
    let admin_token_file = core.ensure_admin_token(now())?;
    let core = Arc::new(core);
    let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let mut embedded = None;

    let mqtt = match &cfg.broker {
        BrokerLink::External(b) => {
            let (handle, task) = mqtt::spawn(core.clone(), b.clone(), shutdown_rx.clone());
            tasks.push(task);
            Some(handle)
        }
        BrokerLink::Embedded(e) => {
            let b = broker::EmbeddedBroker::start(e, &cfg.data_dir.join("server.db")).await?;
            let (handle, task) = mqtt::spawn(core.clone(), b.internal.clone(), shutdown_rx.clone());
            tasks.push(task);
            // Devices are refused until the server's client subscribed; start serving
            // only once they are accepted.
            if !b.wait_ready(EMBEDDED_READY_TIMEOUT).await {
                let _ = shutdown.send(true);
                b.stop();
                return Err(ServerError::Invalid(format!(
                    "the server's client did not subscribe to the embedded broker within {}s",
                    EMBEDDED_READY_TIMEOUT.as_secs()
                )));
            }
            embedded = Some(b);
            Some(handle)
        }
        BrokerLink::None => None,
    };

    let listener = tokio::net::TcpListener::bind(cfg.http)
        .await
        .map_err(|source| ServerError::Io {
            path: PathBuf::from(cfg.http.to_string()),
            source,
        })?;
    let http_addr = listener.local_addr().map_err(|source| ServerError::Io {
        path: PathBuf::from(cfg.http.to_string()),
        source,
    })?;
    let devices = embedded
        .as_ref()
        .map(|b: &broker::EmbeddedBroker| api::DeviceEndpoints {
            mqtt_port: b.mqtt_addr.map(|a| a.port()),
            mqtts_port: b.mqtts_addr.map(|a| a.port()),
            ca_pem: b.device_ca_pem.clone(),
        })
        .unwrap_or_default();
    let app = api::router(api::AppState {
        core: core.clone(),
        mqtt: mqtt.clone(),
        devices,
    });
    let mut rx = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = r {
            eprintln!("outpost-server: http: {e}");
        }
    }));

    let refresher = core.clone();
    let publisher = mqtt.clone();
    let mut rx = shutdown_rx;
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(cfg.expiries.check_interval());
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = rx.wait_for(|s| *s) => break,
            }
            let c = refresher.clone();
            let r = tokio::task::spawn_blocking(move || {
                let t = now();
                let refreshed = c.refresh_online(t).map_err(|e| e.to_string());
                (refreshed, c.renew_assignments(t).map_err(|e| e.to_string()))
            })
            .await;
            let Ok((refreshed, renewed)) = r else {
                continue;
            };
            if let Err(e) = refreshed {
                eprintln!("outpost-server: re-signing online metadata failed: {e}");
            }
            match renewed {
                Err(e) => eprintln!("outpost-server: renewing assignments failed: {e}"),
                Ok(msgs) if !msgs.is_empty() => {
                    if let Some(m) = &publisher
                        && let Err(e) = m.publish(msgs).await
                    {
                        // Stored: republished on the next session the broker does not
                        // remember.
                        eprintln!("outpost-server: publishing renewed assignments: {e}");
                    }
                }
                Ok(_) => {}
            }
        }
    }));

    Ok(RunningServer {
        http_addr,
        admin_token_file,
        core,
        mqtt,
        embedded,
        shutdown,
        tasks,
    })
}
