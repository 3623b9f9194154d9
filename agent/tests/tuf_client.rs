//! End-to-end tests of `outpost-tuf-client`, the TUF conformance client-under-test.
//!
//! Each test builds a repository in its own temp dir, serves it from a tiny HTTP server
//! on 127.0.0.1:0 that records every request path, runs the real binary and checks
//! exit codes, the files in the metadata and target dirs, and the request log.
//!
//! Repositories come from two places: `tests/fixtures/tuf/<scheme>/` (made by
//! python-tuf, see `generate.py` there: ecdsa, rsa-pss and ed25519 keys), and
//! repositories built here with the protocol crate's ed25519 signing helpers.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Serves files under `root` over HTTP/1.1 (`Connection: close`), logging each
/// request path. Paths map to files verbatim (no decoding); `..` segments get 404.
struct Server {
    addr: std::net::SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(root: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let root = root.to_path_buf();
        let thread = {
            let log = Arc::clone(&log);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        serve_one(stream, &root, &log);
                    }
                }
            })
        };
        Self {
            addr,
            log,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path)
    }

    /// Request paths so far, in order.
    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn clear(&self) {
        self.log.lock().unwrap().clear();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(stream: TcpStream, root: &Path, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(0) | Err(_) => break,
            Ok(_) if header == "\r\n" || header == "\n" => break,
            Ok(_) => {}
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_owned();
    log.lock().unwrap().push(path.clone());
    let body = resolve(root, &path).and_then(|p| std::fs::read(p).ok());
    let mut stream = &stream;
    let _ = match body {
        Some(body) => stream
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            )
            .and_then(|()| stream.write_all(&body)),
        None => stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    };
    let _ = stream.flush();
}

/// Maps a request path to a file under `root` without decoding percent-escapes: the
/// repository writes files under the encoded names the client must request.
fn resolve(root: &Path, url_path: &str) -> Option<PathBuf> {
    let mut path = root.to_path_buf();
    for segment in url_path.trim_start_matches('/').split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return None;
        }
        path.push(segment);
    }
    Some(path)
}

/// A client working dir: `metadata/` and `targets/`, like the suite's ClientRunner.
struct Client {
    _tmp: tempfile::TempDir,
    metadata_dir: PathBuf,
    target_dir: PathBuf,
    root_file: PathBuf,
}

/// Outcome of one client run.
struct Run {
    code: i32,
    stderr: String,
}

impl Client {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let metadata_dir = tmp.path().join("metadata");
        let target_dir = tmp.path().join("targets");
        std::fs::create_dir(&metadata_dir).unwrap();
        std::fs::create_dir(&target_dir).unwrap();
        let root_file = tmp.path().join("initial_root.json");
        Self {
            _tmp: tmp,
            metadata_dir,
            target_dir,
            root_file,
        }
    }

    fn run(&self, args: &[&str]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_outpost-tuf-client"))
            .args(args)
            .output()
            .expect("spawn outpost-tuf-client");
        Run {
            code: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn init(&self, trusted_root: &[u8]) -> Run {
        std::fs::write(&self.root_file, trusted_root).unwrap();
        self.run(&[
            "--metadata-dir",
            self.metadata_dir.to_str().unwrap(),
            "init",
            self.root_file.to_str().unwrap(),
        ])
    }

    fn refresh(&self, metadata_url: &str) -> Run {
        self.run(&[
            "--metadata-dir",
            self.metadata_dir.to_str().unwrap(),
            "--metadata-url",
            metadata_url,
            "refresh",
        ])
    }

    fn download(&self, metadata_url: &str, targets_url: &str, names: &[&str]) -> Run {
        let mut args = vec![
            "--metadata-dir",
            self.metadata_dir.to_str().unwrap(),
            "--metadata-url",
            metadata_url,
            "--target-base-url",
            targets_url,
            "--target-dir",
            self.target_dir.to_str().unwrap(),
        ];
        for name in names {
            args.push("--target-name");
            args.push(name);
        }
        args.push("download");
        self.run(&args)
    }

    /// Sorted file names in the metadata dir.
    fn metadata_files(&self) -> Vec<String> {
        list(&self.metadata_dir)
    }

    /// Sorted file names in the target dir.
    fn target_files(&self) -> Vec<String> {
        list(&self.target_dir)
    }

    fn metadata(&self, role: &str) -> Vec<u8> {
        std::fs::read(self.metadata_dir.join(format!("{role}.json"))).unwrap()
    }

    fn version(&self, role: &str) -> u64 {
        let v: serde_json::Value = serde_json::from_slice(&self.metadata(role)).unwrap();
        v["signed"]["version"].as_u64().unwrap()
    }
}

fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn fixture_dir(scheme: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tuf")
        .join(scheme)
}

mod interop {
    //! Repositories generated by python-tuf (tests/fixtures/tuf/generate.py).
    use super::*;

    const TARGET: &str = "models/classifier.bin";
    const TARGET_BYTES: &[u8] = b"outpost interop fixture: a tiny stand-in for a model file\n";

    fn init_refresh_download(scheme: &str) {
        let dir = fixture_dir(scheme);
        let server = Server::start(&dir);
        let client = Client::new();
        let root_v1 = std::fs::read(dir.join("metadata/1.root.json")).unwrap();
        let md = server.url("metadata/");
        let tg = server.url("targets/");

        let run = client.init(&root_v1);
        assert_eq!(run.code, 0, "init: {}", run.stderr);
        assert!(
            server.requests().is_empty(),
            "init must not touch the network"
        );

        let run = client.refresh(&md);
        assert_eq!(run.code, 0, "refresh: {}", run.stderr);
        assert_eq!(
            server.requests(),
            [
                "/metadata/2.root.json",
                "/metadata/3.root.json",
                "/metadata/timestamp.json",
                "/metadata/1.snapshot.json",
                "/metadata/1.targets.json",
            ]
        );
        assert_eq!(
            client.metadata("root"),
            std::fs::read(dir.join("metadata/2.root.json")).unwrap(),
            "rotated root must be stored byte for byte"
        );
        assert_eq!(
            client.metadata_files(),
            [
                "root.json",
                "snapshot.json",
                "targets.json",
                "timestamp.json"
            ]
        );

        server.clear();
        let run = client.download(&md, &tg, &[TARGET]);
        assert_eq!(run.code, 0, "download: {}", run.stderr);
        let hash = "90c593fb34d85882f5a505777bf62c13968e641ab5cc77e64fc81f44788d983c";
        assert_eq!(
            server.requests(),
            [
                "/metadata/3.root.json".to_owned(),
                "/metadata/timestamp.json".to_owned(),
                "/metadata/1.models.json".to_owned(),
                format!("/targets/models/{hash}.classifier.bin"),
            ]
        );
        assert_eq!(client.target_files(), ["models%2Fclassifier.bin"]);
        assert_eq!(
            std::fs::read(client.target_dir.join("models%2Fclassifier.bin")).unwrap(),
            TARGET_BYTES
        );
        assert!(client.metadata_files().contains(&"models.json".to_owned()));
    }

    #[test]
    fn python_tuf_ecdsa_repository_refreshes_and_downloads() {
        init_refresh_download("ecdsa");
    }

    #[test]
    fn python_tuf_rsa_pss_repository_refreshes_and_downloads() {
        init_refresh_download("rsa-pss");
    }

    #[test]
    fn python_tuf_ed25519_repository_refreshes_and_downloads() {
        init_refresh_download("ed25519");
    }
}

mod scenarios {
    //! Repositories built here with `outpost_protocol::tuf` and ed25519 keys.
    use super::*;
    use outpost_protocol::tuf::{
        DelegatedRole, Delegations, Envelope, MetaFile, Root, SigningKey, Snapshot, SuccinctRoles,
        TargetFile, Targets, Timestamp, UtcTime,
    };
    use std::collections::BTreeMap;

    const DAY: i64 = 86_400;

    fn now() -> UtcTime {
        UtcTime::from_system_time(std::time::SystemTime::now())
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_seed([seed; 32])
    }

    /// `urllib.parse.quote(s, safe=keep)`, as the client must encode names.
    fn quote(s: &str, keep: &[u8]) -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    fn sign<T: serde::Serialize>(signed: &T, keys: &[&SigningKey]) -> Vec<u8> {
        let mut env = Envelope::new(signed).unwrap();
        for k in keys {
            env.sign(k).unwrap();
        }
        env.to_bytes()
    }

    /// A repository on disk, served over HTTP, in the style of the suite's
    /// RepositorySimulator: edit the metadata, then `publish_*` to make it visible.
    struct Repo {
        dir: tempfile::TempDir,
        server: Server,
        root: Root,
        /// Keys that sign the next root version.
        root_signers: Vec<SigningKey>,
        timestamp: Timestamp,
        snapshot: Snapshot,
        /// Targets roles by name ("targets" and delegated roles).
        targets: BTreeMap<String, Targets>,
        /// Signer of each non-root role.
        signers: BTreeMap<String, SigningKey>,
    }

    impl Repo {
        fn new(consistent_snapshot: bool) -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("metadata")).unwrap();
            std::fs::create_dir(dir.path().join("targets")).unwrap();
            let server = Server::start(dir.path());
            let expires = now().plus_seconds(30 * DAY);
            let mut root = Root::new(expires);
            root.consistent_snapshot = consistent_snapshot;
            let mut signers = BTreeMap::new();
            for (seed, role) in [(2, "timestamp"), (3, "snapshot"), (4, "targets")] {
                let k = key(seed);
                root.add_key(role, k.public_key()).unwrap();
                signers.insert(role.to_owned(), k);
            }
            root.add_key("root", key(1).public_key()).unwrap();
            let mut repo = Repo {
                dir,
                server,
                root,
                root_signers: vec![key(1)],
                timestamp: Timestamp::new(expires, MetaFile::new(1)),
                snapshot: Snapshot::new(expires),
                targets: BTreeMap::from([("targets".to_owned(), Targets::new(expires))]),
                signers,
            };
            repo.publish_root();
            repo.publish_targets("targets");
            repo.publish_snapshot();
            repo.publish_timestamp();
            repo
        }

        fn metadata_url(&self) -> String {
            self.server.url("metadata/")
        }

        fn targets_url(&self) -> String {
            self.server.url("targets/")
        }

        fn write(&self, rel: &str, bytes: &[u8]) {
            let path = self.dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }

        fn read(&self, rel: &str) -> Vec<u8> {
            std::fs::read(self.dir.path().join(rel)).unwrap()
        }

        fn metadata_name(&self, role: &str, version: u64) -> String {
            if self.root.consistent_snapshot {
                format!("{version}.{}.json", quote(role, b""))
            } else {
                format!("{}.json", quote(role, b""))
            }
        }

        fn publish_root(&mut self) {
            let signers: Vec<&SigningKey> = self.root_signers.iter().collect();
            let bytes = sign(&self.root, &signers);
            self.write(&format!("metadata/{}.root.json", self.root.version), &bytes);
        }

        /// Bumps the root version and publishes it.
        fn bump_root(&mut self) {
            self.root.version += 1;
            self.publish_root();
        }

        fn publish_targets(&mut self, role: &str) {
            let md = &self.targets[role];
            let bytes = sign(md, &[&self.signers[role]]);
            self.write(
                &format!("metadata/{}", self.metadata_name(role, md.version)),
                &bytes,
            );
            self.snapshot
                .meta
                .insert(format!("{role}.json"), MetaFile::new(md.version));
        }

        fn publish_snapshot(&mut self) {
            let bytes = sign(&self.snapshot, &[&self.signers["snapshot"]]);
            self.write(
                &format!(
                    "metadata/{}",
                    self.metadata_name("snapshot", self.snapshot.version)
                ),
                &bytes,
            );
            self.timestamp
                .meta
                .insert("snapshot.json".into(), MetaFile::new(self.snapshot.version));
        }

        fn publish_timestamp(&mut self) {
            let bytes = sign(&self.timestamp, &[&self.signers["timestamp"]]);
            self.write("metadata/timestamp.json", &bytes);
        }

        /// New snapshot and timestamp versions naming the current targets versions.
        fn update_snapshot(&mut self) {
            self.snapshot.version += 1;
            self.publish_snapshot();
            self.update_timestamp();
        }

        fn update_timestamp(&mut self) {
            self.timestamp.version += 1;
            self.publish_timestamp();
        }

        /// Lists `bytes` as target `path` in `role` and stores the file where the client
        /// must fetch it (`dir/HASH.name` with consistent snapshots). Publish separately.
        fn add_target(&mut self, role: &str, path: &str, bytes: &[u8]) {
            let file = TargetFile::from_bytes(bytes, None);
            let served = self.served_target_path(path, &file);
            self.targets
                .get_mut(role)
                .unwrap()
                .targets
                .insert(path.to_owned(), file);
            self.write(&served, bytes);
        }

        fn served_target_path(&self, path: &str, file: &TargetFile) -> String {
            let path = quote(path, b"/");
            if !self.root.consistent_snapshot {
                return format!("targets/{path}");
            }
            let hash = &file.hashes["sha256"];
            match path.rsplit_once('/') {
                Some((dir, name)) => format!("targets/{dir}/{hash}.{name}"),
                None => format!("targets/{hash}.{path}"),
            }
        }

        /// Replaces the served bytes of `path` without touching any metadata.
        fn tamper_target(&self, role: &str, path: &str, bytes: &[u8]) {
            let served = self.served_target_path(path, &self.targets[role].targets[path]);
            self.write(&served, bytes);
        }

        /// Delegates `paths` from `delegator` to a new role `name` with its own key.
        fn delegate(&mut self, delegator: &str, name: &str, paths: &[&str], seed: u8) {
            let k = key(seed);
            let id = k.key_id().to_owned();
            let d = self
                .targets
                .get_mut(delegator)
                .unwrap()
                .delegations
                .get_or_insert_with(|| Delegations {
                    keys: BTreeMap::new(),
                    roles: Vec::new(),
                    extra: BTreeMap::new(),
                });
            d.keys.insert(id.clone(), k.public_key().clone());
            d.roles.push(DelegatedRole {
                name: name.to_owned(),
                keyids: vec![id],
                threshold: 1,
                terminating: false,
                paths: Some(paths.iter().map(|p| (*p).to_owned()).collect()),
                path_hash_prefixes: None,
                extra: BTreeMap::new(),
            });
            self.signers.insert(name.to_owned(), k);
            self.targets
                .entry(name.to_owned())
                .or_insert_with(|| Targets::new(self.root.expires));
        }

        fn root_bytes(&self, version: u64) -> Vec<u8> {
            self.read(&format!("metadata/{version}.root.json"))
        }

        fn requests(&self) -> Vec<String> {
            self.server.requests()
        }

        fn clear_requests(&self) {
            self.server.clear();
        }

        fn refresh(&self, client: &Client) -> Run {
            client.refresh(&self.metadata_url())
        }

        fn download(&self, client: &Client, names: &[&str]) -> Run {
            client.download(&self.metadata_url(), &self.targets_url(), names)
        }
    }

    /// A client initialized with the repository's root v1.
    fn client_for(repo: &Repo) -> Client {
        let client = Client::new();
        let run = client.init(&repo.root_bytes(1));
        assert_eq!(run.code, 0, "init: {}", run.stderr);
        client
    }

    fn ok(run: &Run, what: &str) {
        assert_eq!(run.code, 0, "{what} failed: {}", run.stderr);
    }

    fn fails(run: &Run, what: &str) {
        assert_eq!(run.code, 1, "{what} should fail with exit 1");
        assert!(
            run.stderr.starts_with("outpost-tuf-client: error:") && run.stderr.lines().count() == 1,
            "{what}: want one error line, got {:?}",
            run.stderr
        );
    }

    #[test]
    fn init_and_refresh_store_top_level_metadata_under_plain_names() {
        let repo = Repo::new(true);
        let client = client_for(&repo);
        assert!(
            repo.requests().is_empty(),
            "init must not touch the network"
        );
        assert_eq!(client.metadata_files(), ["root.json"]);

        ok(&repo.refresh(&client), "refresh");
        assert_eq!(
            repo.requests(),
            [
                "/metadata/2.root.json",
                "/metadata/timestamp.json",
                "/metadata/1.snapshot.json",
                "/metadata/1.targets.json",
            ]
        );
        assert_eq!(
            client.metadata_files(),
            [
                "root.json",
                "snapshot.json",
                "targets.json",
                "timestamp.json"
            ]
        );
        assert_eq!(
            client.metadata("timestamp"),
            repo.read("metadata/timestamp.json")
        );
        assert_eq!(
            client.metadata("snapshot"),
            repo.read("metadata/1.snapshot.json")
        );
    }

    #[test]
    fn second_refresh_fetches_only_root_probe_and_timestamp_when_nothing_changed() {
        let repo = Repo::new(true);
        let client = client_for(&repo);
        ok(&repo.refresh(&client), "refresh");
        repo.clear_requests();
        ok(&repo.refresh(&client), "second refresh");
        assert_eq!(
            repo.requests(),
            ["/metadata/2.root.json", "/metadata/timestamp.json"]
        );
    }

    #[test]
    fn root_rotation_1_to_2_to_3_is_followed_and_stored_byte_for_byte() {
        let mut repo = Repo::new(true);
        let client = client_for(&repo);
        // v2: key 1 -> key 11, signed by both; v3: key 11 -> key 12, signed by both.
        for (old, new) in [(1u8, 11u8), (11, 12)] {
            repo.root.revoke_key("root", key(old).key_id());
            repo.root.add_key("root", key(new).public_key()).unwrap();
            repo.root_signers = vec![key(old), key(new)];
            repo.bump_root();
        }
        ok(&repo.refresh(&client), "refresh");
        assert_eq!(client.metadata("root"), repo.root_bytes(3));
        assert_eq!(
            repo.requests()[..3],
            [
                "/metadata/2.root.json",
                "/metadata/3.root.json",
                "/metadata/4.root.json"
            ]
        );
    }

    #[test]
    fn rejects_root_rotation_not_signed_by_previous_root_keys() {
        let mut repo = Repo::new(true);
        let client = client_for(&repo);
        repo.root.revoke_key("root", key(1).key_id());
        repo.root.add_key("root", key(11).public_key()).unwrap();
        repo.root_signers = vec![key(11)];
        repo.bump_root();
        fails(&repo.refresh(&client), "refresh with an unchained root");
        assert_eq!(client.metadata("root"), repo.root_bytes(1));
        assert_eq!(client.metadata_files(), ["root.json"]);
        assert!(
            !repo.requests().iter().any(|r| r.contains("timestamp")),
            "no timestamp request after a rejected root: {:?}",
            repo.requests()
        );
    }

    #[test]
    fn expired_final_root_is_stored_but_refresh_fails_before_timestamp() {
        let mut repo = Repo::new(true);
        let client = client_for(&repo);
        repo.root.expires = now().plus_seconds(-DAY);
        repo.bump_root();
        fails(&repo.refresh(&client), "refresh with an expired root");
        assert_eq!(client.metadata("root"), repo.root_bytes(2));
        assert_eq!(
            repo.requests(),
            ["/metadata/2.root.json", "/metadata/3.root.json"]
        );
    }

    #[test]
    fn rejects_expired_timestamp_and_keeps_the_trusted_one() {
        let mut repo = Repo::new(true);
        let client = client_for(&repo);
        ok(&repo.refresh(&client), "refresh");
        repo.timestamp.expires = now().plus_seconds(-DAY);
        repo.update_timestamp();
        fails(&repo.refresh(&client), "refresh with an expired timestamp");
        assert_eq!(client.version("timestamp"), 1);
    }

    #[test]
    fn accepts_newer_unexpired_timestamp() {
        let mut repo = Repo::new(true);
        let client = client_for(&repo);
        ok(&repo.refresh(&client), "refresh");
        repo.update_timestamp();
        ok(&repo.refresh(&client), "refresh with timestamp v2");
        assert_eq!(client.version("timestamp"), 2);
    }

    #[test]
    fn rejects_rollback_of_timestamp() {
        let mut repo = Repo::new(true);
        let client = client_for(&repo);
        repo.update_timestamp();
        ok(&repo.refresh(&client), "refresh");
        assert_eq!(client.version("timestamp"), 2);
        repo.timestamp.version = 1;
        repo.publish_timestamp();
        fails(&repo.refresh(&client), "refresh with timestamp rolled back");
        assert_eq!(client.version("timestamp"), 2);
        assert_eq!(
            repo.requests().last().map(String::as_str),
            Some("/metadata/timestamp.json")
        );
    }

    #[test]
    fn rejects_oversized_timestamp() {
        let repo = Repo::new(true);
        let client = client_for(&repo);
        let mut big = repo.read("metadata/timestamp.json");
        big.extend(std::iter::repeat_n(b' ', 20_000));
        repo.write("metadata/timestamp.json", &big);
        fails(&repo.refresh(&client), "refresh with a 20 kB timestamp");
        assert_eq!(client.metadata_files(), ["root.json"]);
    }

    #[test]
    fn downloads_target_via_consistent_snapshot_path() {
        let mut repo = Repo::new(true);
        repo.add_target("targets", "dir/model.bin", b"model bytes");
        repo.targets.get_mut("targets").unwrap().version += 1;
        repo.publish_targets("targets");
        repo.update_snapshot();
        let client = client_for(&repo);

        ok(&repo.download(&client, &["dir/model.bin"]), "download");
        let hash = &repo.targets["targets"].targets["dir/model.bin"].hashes["sha256"];
        assert_eq!(
            repo.requests(),
            [
                "/metadata/2.root.json".to_owned(),
                "/metadata/timestamp.json".to_owned(),
                "/metadata/2.snapshot.json".to_owned(),
                "/metadata/2.targets.json".to_owned(),
                format!("/targets/dir/{hash}.model.bin"),
            ]
        );
        assert_eq!(client.target_files(), ["dir%2Fmodel.bin"]);
        assert_eq!(
            std::fs::read(client.target_dir.join("dir%2Fmodel.bin")).unwrap(),
            b"model bytes"
        );
    }

    #[test]
    fn without_consistent_snapshot_fetches_unversioned_metadata_and_plain_target_paths() {
        let mut repo = Repo::new(false);
        repo.add_target("targets", "a b.txt", b"spaced");
        repo.targets.get_mut("targets").unwrap().version += 1;
        repo.publish_targets("targets");
        repo.update_snapshot();
        let client = client_for(&repo);
        ok(&repo.download(&client, &["a b.txt"]), "download");
        assert_eq!(
            repo.requests(),
            [
                "/metadata/2.root.json",
                "/metadata/timestamp.json",
                "/metadata/snapshot.json",
                "/metadata/targets.json",
                "/targets/a%20b.txt",
            ]
        );
        assert_eq!(client.target_files(), ["a%20b.txt"]);
    }

    #[test]
    fn cached_target_is_not_downloaded_again() {
        let mut repo = Repo::new(true);
        repo.add_target("targets", "m.bin", b"v1 bytes");
        repo.publish_targets("targets");
        repo.update_snapshot();
        let client = client_for(&repo);
        ok(&repo.download(&client, &["m.bin"]), "first download");
        repo.clear_requests();
        ok(&repo.download(&client, &["m.bin"]), "second download");
        assert!(
            !repo.requests().iter().any(|r| r.starts_with("/targets/")),
            "cached target fetched again: {:?}",
            repo.requests()
        );
    }

    #[test]
    fn changed_target_replaces_the_cached_file_under_the_same_name() {
        let mut repo = Repo::new(true);
        repo.add_target("targets", "m.bin", b"v1 bytes");
        repo.publish_targets("targets");
        repo.update_snapshot();
        let client = client_for(&repo);
        ok(&repo.download(&client, &["m.bin"]), "first download");

        repo.add_target("targets", "m.bin", b"version 2 bytes");
        repo.targets.get_mut("targets").unwrap().version += 1;
        repo.publish_targets("targets");
        repo.update_snapshot();
        ok(&repo.download(&client, &["m.bin"]), "second download");
        assert_eq!(client.target_files(), ["m.bin"]);
        assert_eq!(
            std::fs::read(client.target_dir.join("m.bin")).unwrap(),
            b"version 2 bytes"
        );
    }

    #[test]
    fn rejects_tampered_target_and_stores_nothing() {
        let mut repo = Repo::new(true);
        repo.add_target("targets", "m.bin", b"good bytes");
        repo.publish_targets("targets");
        repo.update_snapshot();
        repo.tamper_target("targets", "m.bin", b"evil bytes");
        let client = client_for(&repo);
        fails(
            &repo.download(&client, &["m.bin"]),
            "download of tampered target",
        );
        assert!(
            client.target_files().is_empty(),
            "{:?}",
            client.target_files()
        );
    }

    #[test]
    fn rejects_target_longer_than_signed_length_and_stores_nothing() {
        let mut repo = Repo::new(true);
        repo.add_target("targets", "m.bin", b"good bytes");
        repo.publish_targets("targets");
        repo.update_snapshot();
        repo.tamper_target("targets", "m.bin", b"good bytes and then some more");
        let client = client_for(&repo);
        fails(
            &repo.download(&client, &["m.bin"]),
            "download of endless target",
        );
        assert!(client.target_files().is_empty());
    }

    #[test]
    fn substituted_cached_target_is_neither_refetched_nor_replaced() {
        let mut repo = Repo::new(true);
        repo.add_target("targets", "m.bin", b"good bytes");
        repo.publish_targets("targets");
        repo.update_snapshot();
        let client = client_for(&repo);
        ok(&repo.download(&client, &["m.bin"]), "download");
        repo.tamper_target("targets", "m.bin", b"evil bytes");
        ok(&repo.download(&client, &["m.bin"]), "cached download");
        assert_eq!(
            std::fs::read(client.target_dir.join("m.bin")).unwrap(),
            b"good bytes"
        );
    }

    #[test]
    fn delegated_target_is_found_via_delegation() {
        let mut repo = Repo::new(true);
        repo.delegate("targets", "models", &["models/*"], 20);
        repo.add_target("models", "models/a.onnx", b"delegated model");
        repo.publish_targets("models");
        repo.targets.get_mut("targets").unwrap().version += 1;
        repo.publish_targets("targets");
        repo.update_snapshot();
        let client = client_for(&repo);
        ok(&repo.download(&client, &["models/a.onnx"]), "download");
        assert_eq!(
            repo.requests()[4..5],
            ["/metadata/1.models.json".to_owned()]
        );
        assert!(client.metadata_files().contains(&"models.json".to_owned()));
        assert_eq!(
            std::fs::read(client.target_dir.join("models%2Fa.onnx")).unwrap(),
            b"delegated model"
        );
    }

    #[test]
    fn unusual_delegated_role_name_is_quoted_in_url_and_file_name() {
        let mut repo = Repo::new(true);
        repo.delegate("targets", "../delegatedrole", &["*"], 21);
        repo.publish_targets("../delegatedrole");
        repo.targets.get_mut("targets").unwrap().version += 1;
        repo.publish_targets("targets");
        repo.update_snapshot();
        let client = client_for(&repo);
        fails(&repo.download(&client, &["nonexistent"]), "download");
        assert!(
            repo.requests()
                .contains(&"/metadata/1...%2Fdelegatedrole.json".to_owned()),
            "{:?}",
            repo.requests()
        );
        assert_eq!(client.metadata_files().len(), 5);
        assert!(
            client
                .metadata_files()
                .contains(&"..%2Fdelegatedrole.json".to_owned())
        );
    }

    #[test]
    fn missing_target_fails_after_implicit_refresh() {
        let repo = Repo::new(true);
        let client = client_for(&repo);
        fails(
            &repo.download(&client, &["nonexistent artifact"]),
            "download of a missing target",
        );
        assert_eq!(
            repo.requests(),
            [
                "/metadata/2.root.json",
                "/metadata/timestamp.json",
                "/metadata/1.snapshot.json",
                "/metadata/1.targets.json",
            ]
        );
        assert_eq!(client.version("targets"), 1);
        assert!(client.target_files().is_empty());
    }

    #[test]
    fn targets_are_processed_in_order_and_stop_at_first_failure() {
        let mut repo = Repo::new(true);
        repo.add_target("targets", "a", b"first");
        repo.add_target("targets", "c", b"third");
        repo.publish_targets("targets");
        repo.update_snapshot();
        let client = client_for(&repo);
        fails(
            &repo.download(&client, &["a", "b", "c"]),
            "download a, b, c",
        );
        assert_eq!(client.target_files(), ["a"]);
        assert!(
            !repo.requests().iter().any(|r| r.ends_with(".c")),
            "target after the failure was fetched: {:?}",
            repo.requests()
        );
    }

    #[test]
    fn rejects_invalid_trusted_root_at_init_and_refresh_makes_no_request() {
        let repo = Repo::new(true);
        let mut root: serde_json::Value = serde_json::from_slice(&repo.root_bytes(1)).unwrap();
        root["signed"].as_object_mut().unwrap().remove("version");
        let client = Client::new();
        fails(
            &client.init(&serde_json::to_vec(&root).unwrap()),
            "init with a root without version",
        );
        assert!(client.metadata_files().is_empty());
        fails(&repo.refresh(&client), "refresh without a trusted root");
        assert!(repo.requests().is_empty(), "{:?}", repo.requests());
    }

    #[test]
    fn rejects_unsigned_trusted_root_at_init() {
        let repo = Repo::new(true);
        let mut root: serde_json::Value = serde_json::from_slice(&repo.root_bytes(1)).unwrap();
        root["signed"]["expires"] = "2099-01-01T00:00:00Z".into();
        let client = Client::new();
        fails(
            &client.init(&serde_json::to_vec(&root).unwrap()),
            "init with a root whose signature does not cover it",
        );
        assert!(client.metadata_files().is_empty());
        fails(&repo.refresh(&client), "refresh without a trusted root");
        assert!(repo.requests().is_empty(), "{:?}", repo.requests());
    }

    #[test]
    fn fast_forward_recovery_after_timestamp_key_rotation() {
        let mut repo = Repo::new(true);
        let client = client_for(&repo);
        repo.timestamp.version = 100;
        repo.publish_timestamp();
        ok(&repo.refresh(&client), "refresh");
        assert_eq!(client.version("timestamp"), 100);
        let new = key(30);
        repo.root
            .revoke_key("timestamp", repo.signers["timestamp"].key_id());
        repo.root.add_key("timestamp", new.public_key()).unwrap();
        repo.signers.insert("timestamp".into(), new);
        repo.bump_root();
        repo.timestamp.version = 1;
        repo.publish_timestamp();
        ok(
            &repo.refresh(&client),
            "refresh after timestamp key rotation",
        );
        assert_eq!(client.version("timestamp"), 1);
    }

    #[test]
    fn timestamp_with_same_version_but_new_content_is_not_stored() {
        let mut repo = Repo::new(true);
        let client = client_for(&repo);
        ok(&repo.refresh(&client), "refresh");
        let trusted = client.metadata("timestamp");
        repo.timestamp.expires = repo.timestamp.expires.plus_seconds(DAY);
        repo.publish_timestamp();
        assert_ne!(repo.read("metadata/timestamp.json"), trusted);
        ok(
            &repo.refresh(&client),
            "refresh with an equal-version timestamp",
        );
        assert_eq!(client.metadata("timestamp"), trusted);
    }

    #[test]
    fn rejects_snapshot_whose_version_differs_from_timestamp_meta() {
        let mut repo = Repo::new(true);
        repo.snapshot.version = 2;
        let bytes = sign(&repo.snapshot, &[&repo.signers["snapshot"]]);
        repo.write("metadata/1.snapshot.json", &bytes);
        let client = client_for(&repo);
        fails(
            &repo.refresh(&client),
            "refresh with mix-and-match snapshot",
        );
        assert_eq!(client.metadata_files(), ["root.json", "timestamp.json"]);
        assert_eq!(
            repo.requests().last().map(String::as_str),
            Some("/metadata/1.snapshot.json")
        );
    }

    #[test]
    fn rejects_expired_snapshot_and_keeps_the_trusted_one() {
        let mut repo = Repo::new(true);
        let client = client_for(&repo);
        ok(&repo.refresh(&client), "refresh");
        repo.snapshot.expires = now().plus_seconds(-DAY);
        repo.update_snapshot();
        fails(&repo.refresh(&client), "refresh with an expired snapshot");
        assert_eq!(client.version("snapshot"), 1);
    }

    #[test]
    fn delegation_search_is_preorder_dfs_and_stops_at_terminating_role() {
        let mut repo = Repo::new(true);
        repo.delegate("targets", "A", &["*"], 40);
        repo.delegate("targets", "B", &["*"], 41);
        repo.delegate("A", "C", &["*"], 42);
        repo.delegate("A", "D", &["*"], 43);
        repo.targets
            .get_mut("A")
            .unwrap()
            .delegations
            .as_mut()
            .unwrap()
            .roles[0]
            .terminating = true;
        for role in ["A", "B", "C", "D"] {
            repo.publish_targets(role);
        }
        repo.targets.get_mut("targets").unwrap().version += 1;
        repo.publish_targets("targets");
        repo.update_snapshot();
        let client = client_for(&repo);
        fails(&repo.download(&client, &["missingpath"]), "download");
        assert_eq!(
            repo.requests()[4..],
            ["/metadata/1.A.json", "/metadata/1.C.json"]
        );
    }

    /// Publishes every delegated role, a new top-level targets, snapshot and timestamp.
    fn publish_delegations(repo: &mut Repo, roles: &[&str]) {
        for role in roles {
            repo.publish_targets(role);
        }
        repo.targets.get_mut("targets").unwrap().version += 1;
        repo.publish_targets("targets");
        repo.update_snapshot();
    }

    /// Delegates from top-level targets to `2^bit_length` succinct hash bins `bin-..`,
    /// all signed by one key, as the suite's `add_succinct_roles`.
    fn add_succinct_roles(repo: &mut Repo, bit_length: u32) -> SuccinctRoles {
        let k = key(50);
        let succinct =
            SuccinctRoles::new(vec![k.key_id().to_owned()], 1, bit_length, "bin").unwrap();
        let keys = BTreeMap::from([(k.key_id().to_owned(), k.public_key().clone())]);
        repo.targets.get_mut("targets").unwrap().delegations =
            Some(Delegations::with_succinct_roles(keys, &succinct));
        for bin in succinct.roles() {
            repo.signers.insert(bin.clone(), k.clone());
            repo.targets.insert(bin, Targets::new(repo.root.expires));
        }
        succinct
    }

    #[test]
    fn succinct_hash_bin_is_the_only_role_fetched_and_is_persisted() {
        // tuf-conformance test_succinct_roles_graph_traversal, "bin amount = 256".
        let mut repo = Repo::new(true);
        let succinct = add_succinct_roles(&mut repo, 8);
        let bins: Vec<String> = succinct.roles().collect();
        for bin in &bins {
            repo.publish_targets(bin);
        }
        repo.targets.get_mut("targets").unwrap().version += 1;
        repo.publish_targets("targets");
        repo.update_snapshot();
        let client = client_for(&repo);
        ok(&repo.refresh(&client), "refresh");
        assert_eq!(client.metadata_files().len(), 4);
        repo.clear_requests();
        fails(
            &repo.download(&client, &["bar"]),
            "download of a missing target",
        );
        assert_eq!(repo.requests()[2..], ["/metadata/1.bin-fc.json"]);
        assert!(client.metadata_files().contains(&"bin-fc.json".to_owned()));
    }

    #[test]
    fn downloads_target_listed_in_its_succinct_hash_bin() {
        let mut repo = Repo::new(true);
        let succinct = add_succinct_roles(&mut repo, 2);
        let bin = succinct.role_for_target("binned/file.txt");
        repo.add_target(&bin, "binned/file.txt", b"in a hash bin");
        let bins: Vec<String> = succinct.roles().collect();
        let refs: Vec<&str> = bins.iter().map(String::as_str).collect();
        publish_delegations(&mut repo, &refs);
        let client = client_for(&repo);
        ok(&repo.download(&client, &["binned/file.txt"]), "download");
        assert_eq!(
            std::fs::read(client.target_dir.join(quote("binned/file.txt", b""))).unwrap(),
            b"in a hash bin"
        );
    }

    #[test]
    fn rejects_snapshot_with_duplicate_signature_key_ids() {
        // tuf-conformance test_duplicate_sig_keyids: threshold met, but one key id signs
        // twice. The snapshot must not be trusted.
        let repo = Repo::new(true);
        let name = "metadata/1.snapshot.json";
        let mut env = Envelope::from_bytes("snapshot", &repo.read(name), 1 << 20).unwrap();
        let dup = env.signatures[0].clone();
        env.signatures.push(dup);
        repo.write(name, &env.to_bytes());
        let client = client_for(&repo);
        fails(&repo.refresh(&client), "refresh");
        assert!(
            !client
                .metadata_files()
                .contains(&"snapshot.json".to_owned())
        );
    }

    #[test]
    fn roles_reached_twice_or_in_a_cycle_are_fetched_once() {
        // tuf-conformance test_graph_traversal "two-roles-delegating-to-a-third" and
        // "cyclic-graph".
        let mut repo = Repo::new(true);
        repo.delegate("targets", "A", &["*"], 40);
        repo.delegate("targets", "B", &["*"], 41);
        repo.delegate("B", "C", &["*"], 42);
        repo.delegate("A", "C", &["*"], 42);
        repo.delegate("C", "B", &["*"], 41);
        publish_delegations(&mut repo, &["A", "B", "C"]);
        let client = client_for(&repo);
        fails(&repo.download(&client, &["missingpath"]), "download");
        assert_eq!(
            repo.requests()[4..],
            [
                "/metadata/1.A.json",
                "/metadata/1.C.json",
                "/metadata/1.B.json"
            ]
        );
    }

    #[test]
    fn expired_delegated_role_is_not_trusted_and_its_target_not_downloaded() {
        // tuf-conformance test_delegated_targets_expired.
        let mut repo = Repo::new(true);
        repo.delegate("targets", "delegated", &["delegatedpath/*"], 40);
        repo.targets.get_mut("delegated").unwrap().expires = now().plus_seconds(-DAY);
        repo.add_target("delegated", "delegatedpath/target", b"delegated content");
        publish_delegations(&mut repo, &["delegated"]);
        let client = client_for(&repo);
        ok(&repo.refresh(&client), "refresh");
        fails(
            &repo.download(&client, &["delegatedpath/target"]),
            "download via an expired role",
        );
        assert!(client.target_files().is_empty());
        assert_eq!(
            client.metadata_files(),
            [
                "root.json",
                "snapshot.json",
                "targets.json",
                "timestamp.json"
            ]
        );
    }

    #[test]
    fn missing_snapshot_version_fails_after_storing_the_new_timestamp() {
        // tuf-conformance test_snapshot_404.
        let mut repo = Repo::new(true);
        let client = client_for(&repo);
        ok(&repo.refresh(&client), "refresh");
        repo.timestamp
            .meta
            .insert("snapshot.json".into(), MetaFile::new(2));
        repo.update_timestamp();
        fails(&repo.refresh(&client), "refresh without snapshot v2");
        assert_eq!(
            repo.requests().last().map(String::as_str),
            Some("/metadata/2.snapshot.json")
        );
        assert_eq!(client.version("timestamp"), 2);
        assert_eq!(client.version("snapshot"), 1);
    }

    #[test]
    fn rejects_metadata_whose_type_is_not_the_role_requested() {
        // tuf-conformance test_incorrect_metadata_type: a snapshot signed by the
        // timestamp key, served as timestamp.json.
        let repo = Repo::new(true);
        let mut fake = repo.snapshot.clone();
        fake.version = 2;
        fake.meta = BTreeMap::from([("snapshot.json".to_owned(), MetaFile::new(1))]);
        let bytes = sign(&fake, &[&repo.signers["timestamp"]]);
        repo.write("metadata/timestamp.json", &bytes);
        let client = client_for(&repo);
        fails(&repo.refresh(&client), "refresh");
        assert_eq!(client.metadata_files(), ["root.json"]);
    }

    #[test]
    fn rejects_root_whose_version_differs_from_its_file_name() {
        // tuf-conformance test_url_and_metadata_version_mismatch[root].
        let mut repo = Repo::new(true);
        repo.root.version = 3;
        let bytes = sign(&repo.root, &[&key(1)]);
        repo.write("metadata/2.root.json", &bytes);
        let client = client_for(&repo);
        fails(&repo.refresh(&client), "refresh");
        assert_eq!(client.metadata("root"), repo.root_bytes(1));
        assert_eq!(client.metadata_files(), ["root.json"]);
    }
}
