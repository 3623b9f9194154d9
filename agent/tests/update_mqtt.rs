//! The daemon (`outpost-agent run`) against a real Mosquitto broker and a fake fleet
//! server written here (a test double at the MQTT seam): metadata from a repository
//! signed in the test, artifacts served in chunks, telemetry stored and acknowledged.
//! Each test has its own broker (on a port it could bind) and its own temp dir.

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_protocol::delta::{self, Codec};
use outpost_protocol::director::{Assignment, SlotTarget, sign_assignment};
use outpost_protocol::tuf::{
    Envelope, MetaFile, Root, SigningKey, Snapshot, TargetFile, Targets, Timestamp, UtcTime,
};
use outpost_protocol::wire::{
    Artifact, ArtifactKind, ArtifactList, DeviceTopics, Encoding, Request, RequestBody, Response,
    Status, StatusReport, TelemetryAck, TelemetryBatch, metadata,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;

const DEVICE: &str = "dev-1";
const WAIT: Duration = Duration::from_secs(90);

fn fixture(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn hex_sha(b: &[u8]) -> String {
    hex::encode(delta::sha256(b))
}

// ---------------------------------------------------------------- broker

struct Broker {
    child: Child,
    port: u16,
    conf: PathBuf,
}

/// How many times Mosquitto is started (on a new port, or its own again after a
/// restart) when it cannot bind its port.
const BIND_ATTEMPTS: usize = 8;

/// A port for Mosquitto, which cannot report a port-0 bind: drawn at random below the
/// kernel's ephemeral range (`ip_local_port_range`), where neither a port-0 bind nor an
/// outgoing connection lands, so only another explicit bind takes it (and a restarted
/// broker finds it again); [`Broker::start`] draws again when Mosquitto cannot bind it.
fn pick_port() -> u16 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = if low > 12_000 {
        (10_000, low)
    } else {
        (1024, u16::MAX)
    };
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        let port = from + (h.finish() % u64::from(to - from)) as u16;
        // Only a filter: Mosquitto's own bind is what checks.
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Broker {
    fn start(dir: &Path) -> Broker {
        let persist = dir.join("mosquitto");
        std::fs::create_dir_all(&persist).unwrap();
        let conf = dir.join("mosquitto.conf");
        for _ in 0..BIND_ATTEMPTS {
            let port = pick_port();
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                     persistence_location {}/\nmax_queued_messages 100000\nlog_dest stderr\n",
                    persist.display()
                ),
            )
            .unwrap();
            if let Some(child) = Self::spawn(&conf) {
                return Broker { child, port, conf };
            }
        }
        panic!("mosquitto could not bind a port in {BIND_ATTEMPTS} attempts");
    }

    /// Starts Mosquitto and waits until it runs; `None` when it exited because its port
    /// was taken.
    fn spawn(conf: &Path) -> Option<Child> {
        let mut child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto runs");
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = std::sync::mpsc::channel();
        // Drains the pipe for the broker's whole life (a full pipe would stall it).
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut seen = Vec::new();
        loop {
            match log.recv_timeout(Duration::from_secs(20)) {
                Ok(l) if l.contains(" running") => return Some(child),
                Ok(l) => seen.push(l),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().unwrap();
                    assert!(
                        seen.iter().any(|l| l.contains("Address already in use")),
                        "mosquitto exited with {status}: {seen:#?}"
                    );
                    return None;
                }
                Err(e) => {
                    let _ = child.kill();
                    panic!("mosquitto did not start ({e}): {seen:#?}");
                }
            }
        }
    }

    /// Kills the broker and starts it again on the same port and persistence; again
    /// while another process holds the port, [`BIND_ATTEMPTS`] at most.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for attempt in 1..=BIND_ATTEMPTS {
            if let Some(child) = Self::spawn(&self.conf) {
                self.child = child;
                return;
            }
            // Someone holds the port for now; it is ours again once they let go.
            std::thread::sleep(Duration::from_millis(200 * attempt as u64));
        }
        panic!("mosquitto could not bind port {} again", self.port);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- repository

struct Repo {
    key: SigningKey,
    meta: HashMap<(String, Option<u64>), Vec<u8>>,
    targets: BTreeMap<String, TargetFile>,
}

impl Repo {
    fn new() -> Repo {
        let key = SigningKey::from_seed([7; 32]);
        let mut root = Root::new(UtcTime::parse("2099-01-01T00:00:00Z").unwrap());
        for role in ["root", "timestamp", "snapshot", "targets", "director"] {
            root.add_key(role, key.public_key()).unwrap();
        }
        let bytes = Envelope::sign_document(&root, &[&key]).unwrap();
        let mut meta = HashMap::new();
        meta.insert(("root".into(), Some(1)), bytes.clone());
        meta.insert(("root".into(), None), bytes);
        Repo {
            key,
            meta,
            targets: BTreeMap::new(),
        }
    }

    fn root(&self) -> Vec<u8> {
        self.meta[&("root".to_string(), None)].clone()
    }

    /// Adds a target and re-signs targets, snapshot and timestamp (version `v`).
    fn add(&mut self, path: &str, model: &[u8], release: &[u8], v: u64) {
        let custom: serde_json::Value = serde_json::from_slice(release).unwrap();
        self.targets
            .insert(path.into(), TargetFile::from_bytes(model, Some(custom)));
        let exp = UtcTime::parse("2099-01-01T00:00:00Z").unwrap();
        let mut t = Targets::new(exp);
        t.version = v;
        t.targets = self.targets.clone();
        let tb = Envelope::sign_document(&t, &[&self.key]).unwrap();
        let mut s = Snapshot::new(exp);
        s.version = v;
        s.meta.insert("targets.json".into(), MetaFile::new(v));
        let sb = Envelope::sign_document(&s, &[&self.key]).unwrap();
        let mut ts = Timestamp::new(exp, MetaFile::with_bytes(v, &sb));
        ts.version = v;
        let tsb = Envelope::sign_document(&ts, &[&self.key]).unwrap();
        for (role, b) in [("targets", tb), ("snapshot", sb), ("timestamp", tsb)] {
            self.meta.insert((role.into(), None), b.clone());
            self.meta.insert((role.into(), Some(v)), b);
        }
    }

    fn assignment(&self, slot: &str, path: &str, counter: u64) -> Vec<u8> {
        let mut a = Assignment::new(
            DEVICE,
            counter,
            UtcTime::parse("2099-01-01T00:00:00Z").unwrap(),
        );
        let f = &self.targets[path];
        a.targets.insert(
            slot.into(),
            SlotTarget {
                path: path.into(),
                length: f.length,
                hashes: f.hashes.clone(),
                extra: BTreeMap::new(),
            },
        );
        sign_assignment(&a, &[&self.key]).unwrap()
    }
}

// ---------------------------------------------------------------- fake server

#[derive(Default)]
struct Served {
    /// Chunk bytes answered, by artifact kind.
    chunk_bytes: BTreeMap<String, u64>,
    chunks: u64,
    /// Stop answering chunks after this many (until cleared).
    pause_after: Option<u64>,
    /// Flip a byte in this many upcoming chunk answers.
    tamper: u32,
    /// Telemetry stored, by sequence.
    telemetry: BTreeMap<u64, serde_json::Value>,
    telemetry_batches: u64,
    acked: u64,
    /// Drop (do not ack) this many upcoming telemetry batches.
    drop_batches: u32,
    /// Metadata body bytes answered to ranged requests.
    meta_bytes: u64,
    /// A fault in ranged answers for `targets`.
    meta_fault: Option<MetaFault>,
    /// Every status report received, in order.
    statuses: Vec<StatusReport>,
}

/// What a hostile or broken server does to ranged `targets` metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetaFault {
    /// A few kilobytes of zstd that decode to 8 MiB.
    Bomb,
    /// 8 MiB announced, more than any targets role may have.
    Endless,
    /// The next range is one byte short.
    Truncate,
}

struct Server {
    catalog: Arc<Catalog>,
    client: AsyncClient,
    topics: DeviceTopics,
    served: Arc<Mutex<Served>>,
    status: watch::Receiver<Option<StatusReport>>,
    paused: watch::Receiver<bool>,
}

struct Catalog {
    repo: Mutex<Repo>,
    /// Artifacts by id: bytes and kind.
    artifacts: Mutex<HashMap<String, (Vec<u8>, ArtifactKind)>>,
    /// Target sha256 -> artifact ids.
    by_target: Mutex<HashMap<String, Vec<String>>>,
}

impl Catalog {
    fn add_artifact(&self, target_sha: &str, bytes: Vec<u8>, kind: ArtifactKind) {
        let id = hex_sha(&bytes);
        self.by_target
            .lock()
            .unwrap()
            .entry(target_sha.into())
            .or_default()
            .push(id.clone());
        self.artifacts.lock().unwrap().insert(id, (bytes, kind));
    }
}

async fn start_server(port: u16, catalog: Arc<Catalog>) -> Server {
    let mut opts = MqttOptions::new("fake-server", "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    opts.set_clean_session(true);
    let (client, mut el) = AsyncClient::new(opts, 1024);
    let topics = DeviceTopics::new(DEVICE).unwrap();
    let served: Arc<Mutex<Served>> = Arc::default();
    let (status_tx, status) = watch::channel(None);
    let (paused_tx, paused) = watch::channel(false);
    let (c2, t2, s2) = (client.clone(), topics.clone(), served.clone());
    let cat2 = catalog.clone();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for t in [&t2.req, &t2.telemetry, &t2.status] {
                        c2.try_subscribe(t.clone(), QoS::AtLeastOnce).unwrap();
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic == t2.status {
                        if let Ok(r) = serde_json::from_slice::<StatusReport>(&p.payload) {
                            s2.lock().unwrap().statuses.push(r.clone());
                            status_tx.send_replace(Some(r));
                        }
                    } else if p.topic == t2.telemetry {
                        let batch = TelemetryBatch::from_bytes(&p.payload).unwrap();
                        let ack = {
                            let mut s = s2.lock().unwrap();
                            s.telemetry_batches += 1;
                            if s.drop_batches > 0 {
                                s.drop_batches -= 1;
                                None
                            } else {
                                for r in batch.records {
                                    s.telemetry.insert(r.seq, r.payload);
                                }
                                if batch.after_seq <= s.acked {
                                    s.acked = s.acked.max(batch.covers_to);
                                }
                                Some(s.acked)
                            }
                        };
                        if let Some(acked) = ack {
                            let body = serde_json::to_vec(&TelemetryAck { acked }).unwrap();
                            let _ = c2.try_publish(t2.ack.clone(), QoS::AtLeastOnce, false, body);
                        }
                    } else if p.topic == t2.req {
                        let req = Request::from_bytes(&p.payload).unwrap();
                        if let Some(resp) = answer(&req, &catalog, &s2, &paused_tx) {
                            let _ = c2.try_publish(
                                t2.resp.clone(),
                                QoS::AtLeastOnce,
                                false,
                                resp.to_bytes(),
                            );
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    Server {
        catalog: cat2,
        client,
        topics,
        served,
        status,
        paused,
    }
}

fn answer(
    req: &Request,
    cat: &Catalog,
    served: &Mutex<Served>,
    paused: &watch::Sender<bool>,
) -> Option<Response> {
    Some(match &req.body {
        RequestBody::Metadata {
            role,
            version,
            offset,
            len,
            accept_zstd,
        } => {
            let Some(raw) = cat
                .repo
                .lock()
                .unwrap()
                .meta
                .get(&(role.clone(), *version))
                .cloned()
            else {
                return Some(Response::fail(req.id, Status::NotFound, "no such metadata"));
            };
            let Some(len) = len else {
                return Some(Response::ok(req.id, raw));
            };
            let mut s = served.lock().unwrap();
            let (file, encoding) = match s.meta_fault.filter(|_| role == "targets") {
                Some(MetaFault::Bomb) => (metadata::compress(&vec![b' '; 8 << 20]), Encoding::Zstd),
                Some(MetaFault::Endless) => (vec![b' '; 8 << 20], Encoding::Identity),
                _ if *accept_zstd => (metadata::compress(&raw), Encoding::Zstd),
                _ => (raw, Encoding::Identity),
            };
            let mut r = metadata::serve_range(req.id, &file, encoding, offset.unwrap_or(0), *len);
            if s.meta_fault == Some(MetaFault::Truncate) && r.body.len() > 1 {
                s.meta_fault = None;
                r.body.truncate(r.body.len() - 1);
            }
            s.meta_bytes += r.body.len() as u64;
            r
        }
        RequestBody::Artifacts { sha256, bases, .. } => {
            let ids = cat
                .by_target
                .lock()
                .unwrap()
                .get(sha256)
                .cloned()
                .unwrap_or_default();
            let arts = cat.artifacts.lock().unwrap();
            let mut list: Vec<Artifact> = ids
                .iter()
                .filter_map(|id| {
                    let (b, kind) = &arts[id];
                    match kind {
                        ArtifactKind::Delta { base } if !bases.contains(base) => None,
                        _ => Some(Artifact {
                            id: id.clone(),
                            length: b.len() as u64,
                            kind: kind.clone(),
                        }),
                    }
                })
                .collect();
            list.sort_by_key(|a| a.length);
            let body = serde_json::to_vec(&ArtifactList { artifacts: list }).unwrap();
            Response::ok(req.id, body)
        }
        RequestBody::Chunk {
            artifact,
            offset,
            len,
        } => {
            let mut s = served.lock().unwrap();
            if s.pause_after.is_some_and(|n| s.chunks >= n) {
                paused.send_replace(true);
                return None;
            }
            let arts = cat.artifacts.lock().unwrap();
            let (bytes, kind) = arts.get(artifact)?;
            let start = (*offset as usize).min(bytes.len());
            let end = (start + *len as usize).min(bytes.len());
            let mut body = bytes[start..end].to_vec();
            if s.tamper > 0 && !body.is_empty() {
                s.tamper -= 1;
                body[0] ^= 0xff;
            }
            s.chunks += 1;
            let k = match kind {
                ArtifactKind::Full => "full",
                ArtifactKind::FullZstd => "full_zstd",
                _ => "delta",
            };
            *s.chunk_bytes.entry(k.into()).or_default() += body.len() as u64;
            let mut r = Response::ok(req.id, body);
            r.header.offset = Some(*offset);
            r.header.total = Some(bytes.len() as u64);
            r
        }
        _ => Response::fail(req.id, Status::Error, "unsupported"),
    })
}

impl Server {
    async fn assign(&self, bytes: Vec<u8>) {
        self.client
            .publish(
                self.topics.assignment.clone(),
                QoS::AtLeastOnce,
                true,
                bytes,
            )
            .await
            .unwrap();
    }

    async fn wait_status(&self, what: &str, pred: impl Fn(&StatusReport) -> bool) -> StatusReport {
        let mut rx = self.status.clone();
        let r = tokio::time::timeout(WAIT, rx.wait_for(|s| s.as_ref().is_some_and(&pred)))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for {what}: last {:?}",
                    self.status.borrow()
                )
            });
        r.unwrap().clone().unwrap()
    }

    async fn wait_paused(&self) {
        let mut rx = self.paused.clone();
        tokio::time::timeout(WAIT, rx.wait_for(|p| *p))
            .await
            .expect("transfer reached the pause")
            .unwrap();
    }

    fn targets_json_len(&self) -> u64 {
        self.catalog.repo.lock().unwrap().meta[&("targets".to_string(), None)].len() as u64
    }

    /// Waits until `n` status reports newer than `after` arrived; returns them.
    async fn statuses_after(&self, after: u64, n: usize) -> Vec<StatusReport> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got: Vec<StatusReport> = {
                let s = self.served.lock().unwrap();
                s.statuses
                    .iter()
                    .filter(|r| r.seq > after)
                    .cloned()
                    .collect()
            };
            if got.len() >= n {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {n} status reports after {after}: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn resume(&self) {
        self.served.lock().unwrap().pause_after = None;
    }
}

/// The update to `sha` is committed (a redelivered assignment leaves it so).
fn committed(slot: &'static str, sha: String) -> impl Fn(&StatusReport) -> bool {
    move |s| {
        s.update.as_ref().is_some_and(|u| u.state == "committed")
            && s.models
                .get(slot)
                .is_some_and(|m| m.active_sha256.as_deref() == Some(sha.as_str()))
    }
}

// ---------------------------------------------------------------- agent process

struct AgentProc {
    child: Child,
}

impl AgentProc {
    fn start(bundle: &Path, chunk_len: u32) -> AgentProc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(bundle.join("agent.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_outpost-agent"))
            .args(["run", "--config"])
            .arg(bundle.join("agent.toml"))
            .args(["--chunk-len", &chunk_len.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        AgentProc { child }
    }

    fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn sigterm(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_bundle(dir: &Path, port: u16, root: &[u8], window: u32) -> PathBuf {
    let b = dir.join("bundle");
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(b.join("root.json"), root).unwrap();
    std::fs::write(b.join("credentials"), "unused\n").unwrap();
    std::fs::write(
        b.join("agent.toml"),
        format!(
            "device_id = \"{DEVICE}\"\ndata_dir = \"data\"\n[broker]\nurl = \"mqtt://127.0.0.1:{port}\"\n\
             max_backoff_secs = 2\n[telemetry]\nupload_secs = 1\n[update]\nprobation_secs = 1\n\
             chunk_window = {window}\n"
        ),
    )
    .unwrap();
    b
}

struct World {
    _dir: tempfile::TempDir,
    broker: Broker,
    server: Server,
    bundle: PathBuf,
    base: Vec<u8>,
    ft: Vec<u8>,
    slot: &'static str,
}

/// Broker, fake server, a repository with cnn_a (full) and cnn_a_ft (full + delta from
/// cnn_a), and a device bundle.
async fn world(window: u32) -> World {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let base = fixture("cnn_a.onnx");
    let ft = fixture("cnn_a_ft.onnx");
    let mut repo = Repo::new();
    repo.add(
        "models/cnn_a.onnx",
        &base,
        &fixture("cnn_a.release.json"),
        1,
    );
    repo.add(
        "models/cnn_a_ft.onnx",
        &ft,
        &fixture("cnn_a_ft.release.json"),
        2,
    );
    let root = repo.root();
    let cat = Arc::new(Catalog {
        repo: Mutex::new(repo),
        artifacts: Mutex::default(),
        by_target: Mutex::default(),
    });
    cat.add_artifact(&hex_sha(&base), base.clone(), ArtifactKind::Full);
    cat.add_artifact(&hex_sha(&ft), ft.clone(), ArtifactKind::Full);
    let d = delta::encode(&base, &ft, Codec::ZstdRef, 19).unwrap();
    assert!(d.len() < ft.len(), "the delta is the smaller artifact");
    cat.add_artifact(
        &hex_sha(&ft),
        d,
        ArtifactKind::Delta {
            base: hex_sha(&base),
        },
    );
    let server = start_server(broker.port, cat.clone()).await;
    let bundle = write_bundle(dir.path(), broker.port, &root, window);
    World {
        _dir: dir,
        broker,
        server,
        bundle,
        base,
        ft,
        slot: "digits-cnn-a",
    }
}

fn assignment(w: &World, path: &str, counter: u64) -> Vec<u8> {
    // Re-sign with the same key the repository used.
    let mut repo = Repo::new();
    repo.add(
        "models/cnn_a.onnx",
        &w.base,
        &fixture("cnn_a.release.json"),
        1,
    );
    repo.add(
        "models/cnn_a_ft.onnx",
        &w.ft,
        &fixture("cnn_a_ft.release.json"),
        2,
    );
    repo.assignment(w.slot, path, counter)
}

fn sha(b: &[u8]) -> String {
    hex_sha(b)
}

// ---------------------------------------------------------------- scenarios

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_full_model_then_update_by_delta() {
    let w = world(4).await;
    let mut agent = AgentProc::start(&w.bundle, 4096);
    w.server
        .assign(assignment(&w, "models/cnn_a.onnx", 1))
        .await;
    let s = w
        .server
        .wait_status("first install", committed(w.slot, sha(&w.base)))
        .await;
    assert_eq!(s.assignment_counter, Some(1));
    assert_eq!(s.bytes_received.get("full"), Some(&(w.base.len() as u64)));
    let full_before = w
        .server
        .served
        .lock()
        .unwrap()
        .chunk_bytes
        .get("full")
        .copied();
    assert_eq!(full_before, Some(w.base.len() as u64));

    w.server
        .assign(assignment(&w, "models/cnn_a_ft.onnx", 2))
        .await;
    let s = w
        .server
        .wait_status("delta update", committed(w.slot, sha(&w.ft)))
        .await;
    let served = w.server.served.lock().unwrap();
    assert_eq!(
        served.chunk_bytes.get("full").copied(),
        full_before,
        "no full model fetched for the second release"
    );
    let delta_bytes = served.chunk_bytes["delta"];
    assert!(delta_bytes > 0 && delta_bytes < w.ft.len() as u64);
    assert_eq!(s.bytes_received.get("delta"), Some(&delta_bytes));
    // Metadata came in compressed ranges, and the device counted what the wire carried.
    let targets_json = w.server.targets_json_len();
    assert!(
        served.meta_bytes > 0 && served.meta_bytes < targets_json,
        "{}",
        served.meta_bytes
    );
    assert_eq!(s.bytes_received.get("metadata"), Some(&served.meta_bytes));
    assert_eq!(
        s.models[w.slot].active.as_deref(),
        Some("models/cnn_a_ft.onnx")
    );
    drop(served);
    assert!(agent.sigterm().success(), "clean exit on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_install_travels_as_compressed_full_model() {
    let w = world(4).await;
    let frame = delta::compress_full(&w.base).unwrap();
    assert!(frame.len() < w.base.len());
    let frame_len = frame.len() as u64;
    w.server
        .catalog
        .add_artifact(&sha(&w.base), frame, ArtifactKind::FullZstd);
    let _agent = AgentProc::start(&w.bundle, 4096);
    w.server
        .assign(assignment(&w, "models/cnn_a.onnx", 1))
        .await;
    let s = w
        .server
        .wait_status("first install", committed(w.slot, sha(&w.base)))
        .await;
    assert_eq!(s.bytes_received.get("full_zstd"), Some(&frame_len));
    assert_eq!(s.bytes_received.get("full"), None);
    assert!(s.last_error.is_none(), "{:?}", s.last_error);
    let served = w.server.served.lock().unwrap();
    assert_eq!(served.chunk_bytes.get("full_zstd"), Some(&frame_len));
    assert_eq!(served.chunk_bytes.get("full"), None);
    drop(served);
    let stored = std::fs::read(w.bundle.join("data/blobs/sha256").join(sha(&w.base))).unwrap();
    assert_eq!(stored, w.base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_bomb_as_compressed_full_is_refused_and_the_raw_model_installed() {
    let w = world(4).await;
    // A few KiB the server lists as the compressed model, decoding to 16 MiB.
    let bomb = delta::compress_full(&vec![0u8; 16 << 20]).unwrap();
    assert!(bomb.len() < w.base.len());
    w.server
        .catalog
        .add_artifact(&sha(&w.base), bomb.clone(), ArtifactKind::FullZstd);
    let _agent = AgentProc::start(&w.bundle, 4096);
    w.server
        .assign(assignment(&w, "models/cnn_a.onnx", 1))
        .await;
    let s = w
        .server
        .wait_status("install after the bomb", committed(w.slot, sha(&w.base)))
        .await;
    let e = s
        .last_error
        .as_ref()
        .expect("the refused artifact is reported");
    assert_eq!(e.kind, "delta", "{e:?}");
    assert!(e.message.contains("exceeds the limit"), "{e:?}");
    assert_eq!(
        s.bytes_received.get("full_zstd"),
        Some(&(bomb.len() as u64))
    );
    assert_eq!(s.bytes_received.get("full"), Some(&(w.base.len() as u64)));
    let stored = std::fs::read(w.bundle.join("data/blobs/sha256").join(sha(&w.base))).unwrap();
    assert_eq!(stored, w.base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_chunk_is_refetched_and_never_installed() {
    let w = world(2).await;
    w.server.served.lock().unwrap().tamper = 1;
    let _agent = AgentProc::start(&w.bundle, 2048);
    w.server
        .assign(assignment(&w, "models/cnn_a.onnx", 1))
        .await;
    w.server
        .wait_status("install after refetch", committed(w.slot, sha(&w.base)))
        .await;
    let full = w.server.served.lock().unwrap().chunk_bytes["full"];
    assert_eq!(
        full,
        2 * w.base.len() as u64,
        "fetched twice: the tampered copy was discarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_tampering_fails_with_hash_reason() {
    let w = world(2).await;
    w.server.served.lock().unwrap().tamper = u32::MAX;
    let _agent = AgentProc::start(&w.bundle, 4096);
    w.server
        .assign(assignment(&w, "models/cnn_a.onnx", 1))
        .await;
    let s = w
        .server
        .wait_status("typed failure", |s| {
            s.last_error.as_ref().is_some_and(|e| e.kind == "hash")
        })
        .await;
    assert!(s.models.is_empty(), "nothing activated: {:?}", s.models);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_broker_restart_mid_transfer() {
    let mut w = world(1).await;
    let len = w.base.len() as u64;
    w.server.served.lock().unwrap().pause_after = Some(8);
    let _agent = AgentProc::start(&w.bundle, 1024);
    w.server
        .assign(assignment(&w, "models/cnn_a.onnx", 1))
        .await;
    w.server.wait_paused().await;
    w.broker.restart();
    w.server.resume();
    w.server
        .wait_status(
            "install after broker restart",
            committed(w.slot, sha(&w.base)),
        )
        .await;
    let full = w.server.served.lock().unwrap().chunk_bytes["full"];
    assert!(
        full >= len && full < len + 4 * 1024,
        "resumed, not restarted: {full} bytes for {len}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_sigkill_mid_transfer_and_never_activates_a_partial_model() {
    let w = world(1).await;
    let len = w.base.len() as u64;
    w.server.served.lock().unwrap().pause_after = Some(8);
    let mut agent = AgentProc::start(&w.bundle, 1024);
    w.server
        .assign(assignment(&w, "models/cnn_a.onnx", 1))
        .await;
    w.server.wait_paused().await;
    agent.sigkill();
    {
        let store = outpost_agent::store::Store::open(w.bundle.join("data")).unwrap();
        assert!(
            store.active(w.slot).unwrap().is_none(),
            "no partial model is active"
        );
    }
    w.server.resume();
    let _agent = AgentProc::start(&w.bundle, 1024);
    w.server
        .wait_status("install after kill", committed(w.slot, sha(&w.base)))
        .await;
    let full = w.server.served.lock().unwrap().chunk_bytes["full"];
    assert!(
        full >= len && full < len + 4 * 1024,
        "resumed, not restarted: {full} bytes for {len}"
    );
    let store_bytes = std::fs::read(w.bundle.join("data/blobs/sha256").join(sha(&w.base))).unwrap();
    assert_eq!(store_bytes, w.base);
}

/// The persisted update state (`outpost-agent status`).
fn status_cli(bundle: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost-agent"))
        .args(["status", "--config"])
        .arg(bundle.join("agent.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_stays_committed_after_the_assignment_is_redelivered() {
    let w = world(2).await;
    let mut agent = AgentProc::start(&w.bundle, 4096);
    w.server
        .assign(assignment(&w, "models/cnn_a.onnx", 1))
        .await;
    let s0 = w
        .server
        .wait_status("install", committed(w.slot, sha(&w.base)))
        .await;
    assert!(agent.sigterm().success());
    // The restarted agent reports its recovered state, reconnects, and gets the retained
    // assignment again: verified, nothing to do.
    let _agent = AgentProc::start(&w.bundle, 4096);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let cli = status_cli(&w.bundle);
        // A redelivery resets the transition count: verifying, then back to rest.
        if cli["transitions"] == 2 {
            assert_eq!(cli["state"]["state"], "committed", "{cli}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no redelivery: {cli}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Recovery, connection, verifying, back at rest: every report says committed.
    let reports = w.server.statuses_after(s0.seq, 4).await;
    for r in &reports {
        assert!(committed(w.slot, sha(&w.base))(r), "{r:?}");
        assert!(r.last_error.is_none(), "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_keeps_the_failure_reason_after_the_assignment_is_redelivered() {
    let w = world(2).await;
    w.server.served.lock().unwrap().tamper = u32::MAX;
    let mut agent = AgentProc::start(&w.bundle, 4096);
    w.server
        .assign(assignment(&w, "models/cnn_a.onnx", 1))
        .await;
    let failed = |s: &StatusReport| {
        s.update.as_ref().is_some_and(|u| u.state == "failed")
            && s.last_error.as_ref().is_some_and(|e| e.kind == "hash")
    };
    let s0 = w.server.wait_status("typed failure", failed).await;
    assert!(agent.sigterm().success());
    let _agent = AgentProc::start(&w.bundle, 4096);
    let deadline = tokio::time::Instant::now() + WAIT;
    while status_cli(&w.bundle)["transitions"] != 2 {
        assert!(tokio::time::Instant::now() < deadline, "no redelivery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in w.server.statuses_after(s0.seq, 4).await {
        assert!(failed(&r), "{r:?}");
        assert!(r.models.is_empty(), "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_bomb_in_metadata_fails_the_update_and_a_good_server_then_works() {
    let w = world(2).await;
    w.server.served.lock().unwrap().meta_fault = Some(MetaFault::Bomb);
    let mut agent = AgentProc::start(&w.bundle, 4096);
    w.server
        .assign(assignment(&w, "models/cnn_a.onnx", 1))
        .await;
    let s = w
        .server
        .wait_status("the bomb refused", |s| {
            s.last_error.as_ref().is_some_and(|e| e.kind == "transfer")
        })
        .await;
    let e = s.last_error.unwrap();
    assert!(e.message.contains("more than"), "{e:?}");
    assert!(s.models.is_empty());
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent survived"
    );
    // Good/bad pair: the same device installs once the server behaves.
    w.server.served.lock().unwrap().meta_fault = None;
    w.server
        .assign(assignment(&w, "models/cnn_a.onnx", 2))
        .await;
    w.server
        .wait_status("install", committed(w.slot, sha(&w.base)))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_metadata_is_refused_after_its_first_range() {
    let w = world(2).await;
    w.server.served.lock().unwrap().meta_fault = Some(MetaFault::Endless);
    let _agent = AgentProc::start(&w.bundle, 4096);
    w.server
        .assign(assignment(&w, "models/cnn_a.onnx", 1))
        .await;
    let s = w
        .server
        .wait_status("the oversized targets refused", |s| {
            s.last_error.as_ref().is_some_and(|e| e.kind == "transfer")
        })
        .await;
    assert!(s.models.is_empty());
    // One range of the 8 MiB was sent, besides the small roles.
    let meta = w.server.served.lock().unwrap().meta_bytes;
    assert!(
        meta < 2 * u64::from(outpost_protocol::wire::CHUNK_LEN),
        "{meta}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_metadata_range_is_asked_again() {
    let w = world(2).await;
    w.server.served.lock().unwrap().meta_fault = Some(MetaFault::Truncate);
    let _agent = AgentProc::start(&w.bundle, 4096);
    w.server
        .assign(assignment(&w, "models/cnn_a.onnx", 1))
        .await;
    let s = w
        .server
        .wait_status("install", committed(w.slot, sha(&w.base)))
        .await;
    assert!(s.last_error.is_none(), "{s:?}");
    assert_eq!(
        w.server.served.lock().unwrap().meta_fault,
        None,
        "the fault fired"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_survives_disconnects_without_loss_or_duplicates() {
    let mut w = world(1).await;
    let n = 600u64;
    {
        let data = w.bundle.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let ob = outpost_agent::outbox::Outbox::open(
            &data.join("outbox.db"),
            outpost_agent::outbox::OutboxConfig::default(),
        )
        .unwrap();
        for i in 0..n {
            ob.push(
                outpost_agent::outbox::Class::Window,
                format!("{{\"i\":{i}}}").as_bytes(),
            )
            .unwrap();
        }
    }
    // The first batch is lost (no ack), then the broker restarts: the agent must send it
    // again after reconnecting.
    w.server.served.lock().unwrap().drop_batches = 1;
    let mut agent = AgentProc::start(&w.bundle, 4096);
    let deadline = tokio::time::Instant::now() + WAIT;
    while w.server.served.lock().unwrap().telemetry_batches < 1 {
        assert!(tokio::time::Instant::now() < deadline, "telemetry started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.broker.restart();
    while w.server.served.lock().unwrap().acked < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "all telemetry acked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(agent.sigterm().success());
    let served = w.server.served.lock().unwrap();
    let seqs: Vec<u64> = served.telemetry.keys().copied().collect();
    assert_eq!(
        seqs[..n as usize],
        (1..=n).collect::<Vec<_>>(),
        "every record stored, once per sequence"
    );
    for (seq, v) in served.telemetry.range(..=n) {
        assert_eq!(v["i"], seq - 1, "record {seq} intact");
    }
    let ob = outpost_agent::outbox::Outbox::open(
        &w.bundle.join("data/outbox.db"),
        outpost_agent::outbox::OutboxConfig::default(),
    )
    .unwrap();
    let left = ob.read_batch(10, 1 << 20).unwrap();
    // The agent deletes only what the server acknowledged; what it still holds (an ack
    // in flight at shutdown) the server already stored and will deduplicate.
    assert!(left.after_seq <= served.acked);
    assert!(left.after_seq > 0, "acknowledged records were deleted");
    for r in &left.records {
        assert!(r.seq > n || served.telemetry.contains_key(&r.seq));
    }
}
