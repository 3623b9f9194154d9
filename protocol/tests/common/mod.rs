//! In-memory TUF repository and client for the attack tests, built on the signing side
//! of `outpost_protocol::tuf`.
#![allow(dead_code)]

use std::collections::BTreeMap;

use outpost_protocol::tuf::{
    DelegatedRole, Delegations, Envelope, Error, FetchError, MetaFile, MetadataStore, Remote, Root,
    SigningKey, Snapshot, StoreError, TargetFile, TargetInfo, Targets, Timestamp, Updater,
    UpdaterConfig, UtcTime, Verified,
};

pub fn t(s: &str) -> UtcTime {
    UtcTime::parse(s).unwrap()
}

pub fn now() -> UtcTime {
    t("2025-06-01T00:00:00Z")
}

pub fn far() -> UtcTime {
    t("2030-01-01T00:00:00Z")
}

pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_seed([seed; 32])
}

/// A repository: current role contents, their signers, and the files it serves.
pub struct Repo {
    pub root: Root,
    pub root_signers: Vec<SigningKey>,
    pub timestamp: Timestamp,
    pub timestamp_signers: Vec<SigningKey>,
    pub snapshot: Snapshot,
    pub snapshot_signers: Vec<SigningKey>,
    pub targets: Targets,
    pub targets_signers: Vec<SigningKey>,
    /// Delegated roles: name → (metadata, signers).
    pub delegated: BTreeMap<String, (Targets, Vec<SigningKey>)>,
    /// Whether snapshot/timestamp meta sign lengths and hashes.
    pub meta_hashes: bool,
    /// Served files by remote name (`3.root.json`, `timestamp.json`, `HASH.path`).
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Repo {
    /// Root v1 with one key per top-level role (seeds 1..=4) plus a director key (seed 5),
    /// consistent snapshots, one target `models/a.onnx`; everything published.
    pub fn new() -> Self {
        let mut root = Root::new(far());
        for (role, seed) in [
            ("root", 1),
            ("timestamp", 2),
            ("snapshot", 3),
            ("targets", 4),
            ("director", 5),
        ] {
            root.add_key(role, key(seed).public_key()).unwrap();
        }
        let mut repo = Repo {
            root,
            root_signers: vec![key(1)],
            timestamp: Timestamp::new(far(), MetaFile::new(1)),
            timestamp_signers: vec![key(2)],
            snapshot: Snapshot::new(far()),
            snapshot_signers: vec![key(3)],
            targets: Targets::new(far()),
            targets_signers: vec![key(4)],
            delegated: BTreeMap::new(),
            meta_hashes: false,
            files: BTreeMap::new(),
        };
        repo.add_target("models/a.onnx", b"model a v1");
        repo.publish_root();
        repo.publish();
        repo
    }

    pub fn add_target(&mut self, path: &str, bytes: &[u8]) {
        add_target_to(&mut self.targets, path, bytes);
        self.serve_target(path, bytes);
    }

    pub fn serve_target(&mut self, path: &str, bytes: &[u8]) {
        let info = TargetInfo {
            path: path.into(),
            file: TargetFile::from_bytes(bytes, None),
            role: String::new(),
        };
        self.files.insert(info.remote_path(true), bytes.to_vec());
        self.files.insert(path.into(), bytes.to_vec());
    }

    /// Signs the current root with `root_signers` (and any extra keys) and serves it as
    /// `VERSION.root.json`.
    pub fn publish_root_with(&mut self, extra: &[&SigningKey]) {
        let mut signers: Vec<&SigningKey> = self.root_signers.iter().collect();
        signers.extend_from_slice(extra);
        let bytes = Envelope::sign_document(&self.root, &signers).unwrap();
        self.files
            .insert(format!("{}.root.json", self.root.version), bytes);
    }

    pub fn publish_root(&mut self) {
        self.publish_root_with(&[]);
    }

    pub fn root_bytes(&self, version: u64) -> Vec<u8> {
        self.files[&format!("{version}.root.json")].clone()
    }

    fn serve(&mut self, role: &str, version: u64, bytes: Vec<u8>) {
        self.files
            .insert(format!("{version}.{role}.json"), bytes.clone());
        self.files.insert(format!("{role}.json"), bytes);
    }

    fn meta_for(&self, version: u64, bytes: &[u8]) -> MetaFile {
        if self.meta_hashes {
            MetaFile::with_bytes(version, bytes)
        } else {
            MetaFile::new(version)
        }
    }

    /// Signs and serves targets, delegated roles, snapshot and timestamp as they are.
    pub fn publish(&mut self) {
        self.snapshot.meta.clear();
        let refs: Vec<&SigningKey> = self.targets_signers.iter().collect();
        let bytes = Envelope::sign_document(&self.targets, &refs).unwrap();
        let meta = self.meta_for(self.targets.version, &bytes);
        self.snapshot.meta.insert("targets.json".into(), meta);
        self.serve("targets", self.targets.version, bytes);
        let delegated: Vec<(String, Targets, Vec<SigningKey>)> = self
            .delegated
            .iter()
            .map(|(n, (t, k))| (n.clone(), t.clone(), k.clone()))
            .collect();
        for (name, targets, signers) in delegated {
            let refs: Vec<&SigningKey> = signers.iter().collect();
            let bytes = Envelope::sign_document(&targets, &refs).unwrap();
            let meta = self.meta_for(targets.version, &bytes);
            self.snapshot.meta.insert(format!("{name}.json"), meta);
            self.serve(&name, targets.version, bytes);
        }
        self.publish_snapshot_and_timestamp();
    }

    /// Signs and serves snapshot (as it is) and a timestamp naming it.
    pub fn publish_snapshot_and_timestamp(&mut self) {
        let refs: Vec<&SigningKey> = self.snapshot_signers.iter().collect();
        let bytes = Envelope::sign_document(&self.snapshot, &refs).unwrap();
        let meta = self.meta_for(self.snapshot.version, &bytes);
        self.serve("snapshot", self.snapshot.version, bytes);
        self.timestamp.meta.insert("snapshot.json".into(), meta);
        self.publish_timestamp();
    }

    pub fn publish_timestamp(&mut self) {
        let refs: Vec<&SigningKey> = self.timestamp_signers.iter().collect();
        let bytes = Envelope::sign_document(&self.timestamp, &refs).unwrap();
        self.files.insert("timestamp.json".into(), bytes);
    }

    /// New version of targets, snapshot and timestamp, then publish.
    pub fn bump_all(&mut self) {
        self.targets.version += 1;
        self.snapshot.version += 1;
        self.timestamp.version += 1;
        self.publish();
    }

    /// Delegates `name` from top-level targets with `paths`, signed by `signer`.
    pub fn delegate(
        &mut self,
        from: &str,
        name: &str,
        paths: &[&str],
        terminating: bool,
        signer: SigningKey,
    ) {
        let role = DelegatedRole {
            name: name.into(),
            keyids: vec![signer.key_id().into()],
            threshold: 1,
            terminating,
            paths: Some(paths.iter().map(|p| p.to_string()).collect()),
            path_hash_prefixes: None,
            extra: BTreeMap::new(),
        };
        let parent = if from == "targets" {
            &mut self.targets
        } else {
            &mut self.delegated.get_mut(from).unwrap().0
        };
        let d = parent.delegations.get_or_insert_with(|| Delegations {
            keys: BTreeMap::new(),
            roles: Vec::new(),
            extra: BTreeMap::new(),
        });
        d.keys
            .insert(signer.key_id().into(), signer.public_key().clone());
        d.roles.push(role);
        self.delegated
            .entry(name.into())
            .or_insert_with(|| (Targets::new(far()), vec![signer]));
    }

    pub fn add_delegated_target(&mut self, role: &str, path: &str, bytes: &[u8]) {
        add_target_to(&mut self.delegated.get_mut(role).unwrap().0, path, bytes);
        self.serve_target(path, bytes);
    }
}

pub fn add_target_to(targets: &mut Targets, path: &str, bytes: &[u8]) {
    targets
        .targets
        .insert(path.into(), TargetFile::from_bytes(bytes, None));
}

/// Serves a snapshot of the repository's files.
pub struct MemRemote {
    pub files: BTreeMap<String, Vec<u8>>,
    pub fetched: Vec<String>,
}

impl Remote for MemRemote {
    fn fetch_metadata(
        &mut self,
        role: &str,
        version: Option<u64>,
        _max_len: u64,
    ) -> Result<Vec<u8>, FetchError> {
        // Deliberately ignores max_len: the updater must enforce it itself.
        let name = match version {
            Some(v) => format!("{v}.{role}.json"),
            None => format!("{role}.json"),
        };
        self.fetched.push(name.clone());
        self.files.get(&name).cloned().ok_or(FetchError::NotFound)
    }

    fn fetch_target(&mut self, path: &str, _max_len: u64) -> Result<Vec<u8>, FetchError> {
        self.fetched.push(path.into());
        self.files.get(path).cloned().ok_or(FetchError::NotFound)
    }
}

/// The client's metadata directory.
#[derive(Default, Clone)]
pub struct MemStore {
    pub files: BTreeMap<String, Vec<u8>>,
}

impl MetadataStore for MemStore {
    fn load(&mut self, role: &str) -> Option<Vec<u8>> {
        self.files.get(role).cloned()
    }
    fn save(&mut self, role: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.files.insert(role.into(), bytes.to_vec());
        Ok(())
    }
    fn delete(&mut self, role: &str) -> Result<(), StoreError> {
        self.files.remove(role);
        Ok(())
    }
}

/// A device: its store, bootstrapped with the repository's root v1.
pub struct Client {
    pub store: MemStore,
    pub config: UpdaterConfig,
}

impl Client {
    pub fn new(repo: &Repo) -> Self {
        let mut store = MemStore::default();
        store.files.insert("root".into(), repo.root_bytes(1));
        Client {
            store,
            config: UpdaterConfig::default(),
        }
    }

    pub fn updater<'a>(
        &'a mut self,
        repo: &Repo,
        now: UtcTime,
    ) -> Result<Updater<MemRemote, &'a mut MemStore>, Error> {
        let remote = MemRemote {
            files: repo.files.clone(),
            fetched: Vec::new(),
        };
        Updater::new(remote, &mut self.store, self.config, now)
    }

    pub fn refresh(&mut self, repo: &Repo, now: UtcTime) -> Result<(), Error> {
        self.updater(repo, now)?.refresh()
    }

    pub fn lookup(
        &mut self,
        repo: &Repo,
        now: UtcTime,
        path: &str,
    ) -> Result<Option<Verified<TargetInfo>>, Error> {
        self.updater(repo, now)?.get_target_info(path)
    }

    pub fn version_of(&self, role: &str) -> u64 {
        let env = Envelope::from_bytes(role, &self.store.files[role], 1 << 24).unwrap();
        env.signed["version"].as_u64().unwrap()
    }
}
