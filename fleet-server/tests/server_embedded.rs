//! `outpost-server serve` with its embedded broker (rmqtt), as a real process started by
//! each test: device auth against the device table, the per-device ACL, requests and
//! chunks over MQTT, retained assignments across a SIGKILL and restart, stalled
//! connections, and the TLS listener.

mod server_common;

use std::io::{BufRead as _, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;

use outpost_protocol::wire::{
    ArtifactKind, ArtifactList, DeviceTopics, Request, RequestBody, Response, Status, TelemetryAck,
    TelemetryBatch, TelemetryRecord,
};
use outpost_server::server::client::ApiClient;
use rumqttc::SubscribeReasonCode;
use server_common::*;

/// A running `outpost-server serve` (killed with SIGKILL on drop).
struct Server {
    child: Child,
    mqtt: SocketAddr,
    mqtts: Option<SocketAddr>,
    admin: ApiClient,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts the server on `data` with the embedded broker on loopback port 0 and
    /// waits for its stdout lines (http, mqtt, and mqtts when asked for).
    fn start(data: &Path, import: Option<&Path>, extra: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outpost-server"));
        cmd.args(["serve", "--data"])
            .arg(data)
            .args(["--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(repo) = import {
            cmd.arg("--import-repo").arg(repo);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let want_tls = extra.contains(&"--mqtts");
        let (mut url, mut mqtt, mut mqtts) = (None, None, None);
        let deadline = std::time::Instant::now() + WAIT;
        while url.is_none() || mqtt.is_none() || (want_tls && mqtts.is_none()) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(e) => {
                    let _ = child.kill();
                    panic!("outpost-server did not print its addresses: {e}");
                }
            };
            let Some(rest) = line.strip_prefix("outpost-server: ") else {
                continue;
            };
            if rest.starts_with("http://") {
                url = Some(rest.to_owned());
            } else if let Some(a) = rest.strip_prefix("mqtt://") {
                mqtt = Some(a.parse().unwrap());
            } else if let Some(a) = rest.strip_prefix("mqtts://") {
                mqtts = Some(a.parse().unwrap());
            }
        }
        let url = url.unwrap();
        let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
        let admin = ApiClient::new(&url, token.trim());
        Server {
            child,
            mqtt: mqtt.unwrap(),
            mqtts,
            admin,
        }
    }

    fn add_device(&self, id: &str) -> String {
        let r = self
            .admin
            .post(
                "/api/v1/devices",
                &serde_json::json!({"id": id, "tags": {"site": "lab"}}),
            )
            .unwrap();
        assert_eq!(r["broker_reload_required"], false, "{r}");
        r["password"].as_str().unwrap().to_owned()
    }

    fn assign(&self, device: &str, version: &str) {
        let body = serde_json::json!({"model": "digits", "version": version, "devices": [device]});
        let r = self.admin.post("/api/v1/assignments", &body).unwrap();
        assert_eq!(r["published"], true, "{r}");
    }
}

/// A temp dir with an operator repository holding release digits 1.0.
struct Setup {
    dir: tempfile::TempDir,
    repo: outpost_server::repo::Repo,
    model: Vec<u8>,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let repo = operator_repo(&dir.path().join("operator"));
        let model = sign_fixture(&repo, "cnn_a.onnx", "digits", "1.0");
        Setup { dir, repo, model }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn start(&self, extra: &[&str]) -> Server {
        let import = (!self.data().exists()).then(|| self.repo.dir().to_owned());
        Server::start(&self.data(), import.as_deref(), extra)
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn connect(rt: &tokio::runtime::Runtime, s: &Server, id: &str, pw: &str) -> Device {
    let d = Device::connect(rt, s.mqtt.port(), id, pw);
    d.connected();
    d
}

fn refused(d: &Device) -> String {
    d.wait("refusal", |e| match e {
        DevEvent::Failed(m) => Some(m.clone()),
        DevEvent::Connected => panic!("{} connected with wrong credentials", d.id),
        _ => None,
    })
}

fn subscribe_ok(rt: &tokio::runtime::Runtime, d: &Device, topic: &str) {
    let codes = d.subscribe(rt, topic);
    assert!(
        matches!(codes[..], [SubscribeReasonCode::Success(_)]),
        "{topic}: {codes:?}"
    );
}

fn ask(
    rt: &tokio::runtime::Runtime,
    d: &Device,
    t: &DeviceTopics,
    id: u64,
    body: RequestBody,
) -> Response {
    d.publish(rt, &t.req, Request { id, body }.to_bytes());
    loop {
        let p = d.message(&t.resp);
        let r = Response::from_bytes(&p.payload).unwrap();
        if r.header.id == id {
            return r;
        }
    }
}

fn telemetry(device: &str, seq: u64, payload: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&TelemetryBatch {
        device_id: device.into(),
        after_seq: seq - 1,
        covers_to: seq,
        records: vec![TelemetryRecord {
            seq,
            class: "window".into(),
            age_ms: 1,
            payload,
        }],
        drops: Default::default(),
        evicted: None,
        rejected: None,
    })
    .unwrap()
}

#[test]
fn device_with_a_wrong_password_or_foreign_username_is_refused() {
    let s = Setup::new();
    // A Mosquitto password file may still be kept; the embedded broker needs no reload
    // (`add_device` checks the API says so).
    let passwd = s.dir.path().join("mosquitto.passwd");
    let srv = s.start(&["--mosquitto-passwd-file", passwd.to_str().unwrap()]);
    let rt = runtime();
    let pw1 = srv.add_device("dev-1");
    let pw2 = srv.add_device("dev-2");

    refused(&Device::connect(
        &rt,
        srv.mqtt.port(),
        "dev-1",
        "not-the-password",
    ));
    refused(&Device::connect(&rt, srv.mqtt.port(), "dev-1", &pw2));
    refused(&Device::connect(
        &rt,
        srv.mqtt.port(),
        "no-such-device",
        &pw1,
    ));
    // The server's own identity is not reachable from the device listener.
    refused(&Device::connect(
        &rt,
        srv.mqtt.port(),
        "outpost-server",
        &pw1,
    ));
    // Good pair: the right credentials connect, no reload needed after `devices add`.
    connect(&rt, &srv, "dev-1", &pw1);

    // A rotated password (bundle) replaces the old one at once.
    let b = srv
        .admin
        .post(
            "/api/v1/devices/dev-2/bundle",
            &serde_json::json!({"broker_url": format!("mqtt://{}", srv.mqtt)}),
        )
        .unwrap();
    refused(&Device::connect(&rt, srv.mqtt.port(), "dev-2", &pw2));
    connect(&rt, &srv, "dev-2", b["credentials"].as_str().unwrap());
    assert!(
        std::fs::read_to_string(&passwd)
            .unwrap()
            .contains("\ndev-2:$7$")
    );
}

#[test]
fn device_cannot_read_another_devices_assignment_nor_publish_its_telemetry() {
    let s = Setup::new();
    let srv = s.start(&[]);
    let rt = runtime();
    let pw1 = srv.add_device("d1");
    let pw2 = srv.add_device("d2");
    let d1 = connect(&rt, &srv, "d1", &pw1);
    let t1 = DeviceTopics::new("d1").unwrap();
    let t2 = DeviceTopics::new("d2").unwrap();
    subscribe_ok(&rt, &d1, &t1.assignment);

    // d2's assignment is retained before d1 tries to read it.
    srv.assign("d2", "1.0");
    for topic in [
        t2.assignment.as_str(),
        t2.resp.as_str(),
        "outpost/v1/d/+/assignment",
        "outpost/v1/d/#",
        "#",
        "$SYS/#",
    ] {
        let codes = d1.subscribe(&rt, topic);
        assert!(
            matches!(codes[..], [SubscribeReasonCode::Failure]),
            "{topic} granted: {codes:?}"
        );
    }
    // A new assignment for d2 then one for d1 go out live in that order over the
    // server's connection: d1 sees its own only after anything leaked of d2's.
    srv.assign("d2", "1.0");
    srv.assign("d1", "1.0");
    d1.wait("own live assignment", |e| match e {
        DevEvent::Publish(p) if p.topic.starts_with("outpost/v1/d/d2/") => {
            panic!("d1 read {}", p.topic)
        }
        DevEvent::Publish(p) if p.topic == t1.assignment => Some(()),
        _ => None,
    });

    // d1 publishes telemetry as d2: the broker disconnects it instead of acking.
    d1.publish(
        &rt,
        &t2.telemetry,
        telemetry("d2", 1, serde_json::json!({"spoofed": true})),
    );
    d1.wait("disconnect after the spoof", |e| match e {
        DevEvent::PubAck(_) => panic!("the broker acked d1's publish on {}", t2.telemetry),
        DevEvent::Failed(_) => Some(()),
        _ => None,
    });
    // d2's own record with the same sequence, sent after, is the one stored: had the
    // spoof reached the server first, deduplication by (device, seq) would keep it.
    let d2 = connect(&rt, &srv, "d2", &pw2);
    subscribe_ok(&rt, &d2, &t2.ack);
    d2.publish(
        &rt,
        &t2.telemetry,
        telemetry("d2", 1, serde_json::json!({"n": 1})),
    );
    let ack: TelemetryAck = serde_json::from_slice(&d2.message(&t2.ack).payload).unwrap();
    assert_eq!(ack.acked, 1);
    let stored = srv.admin.get("/api/v1/devices/d2/telemetry").unwrap();
    let records = stored["records"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{stored}");
    assert!(
        !records[0].to_string().contains("spoofed"),
        "spoofed telemetry stored: {stored}"
    );
}

#[test]
fn device_fetches_metadata_and_a_chunk_over_the_embedded_broker() {
    let s = Setup::new();
    let srv = s.start(&[]);
    let rt = runtime();
    let pw = srv.add_device("dev-1");
    let d = connect(&rt, &srv, "dev-1", &pw);
    let t = DeviceTopics::new("dev-1").unwrap();
    subscribe_ok(&rt, &d, &t.resp);

    let r = ask(
        &rt,
        &d,
        &t,
        1,
        RequestBody::Metadata {
            role: "root".into(),
            version: Some(1),
            offset: None,
            len: None,
            accept_zstd: false,
        },
    );
    assert_eq!(r.header.status, Status::Ok);
    assert_eq!(
        r.body,
        std::fs::read(s.repo.metadata_dir().join("1.root.json")).unwrap()
    );

    let release = &srv.admin.get("/api/v1/releases").unwrap()["releases"][0];
    let r = ask(
        &rt,
        &d,
        &t,
        2,
        RequestBody::Artifacts {
            target: release["path"].as_str().unwrap().into(),
            sha256: release["sha256"].as_str().unwrap().into(),
            bases: vec![],
            accept_full_zstd: false,
        },
    );
    assert_eq!(r.header.status, Status::Ok);
    let list: ArtifactList = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(list.artifacts.len(), 1);
    assert_eq!(list.artifacts[0].kind, ArtifactKind::Full);

    // A full-size chunk (64 KiB) crosses the broker intact.
    let full = &list.artifacts[0];
    let r = ask(
        &rt,
        &d,
        &t,
        3,
        RequestBody::Chunk {
            artifact: full.id.clone(),
            offset: 0,
            len: outpost_protocol::wire::CHUNK_LEN,
        },
    );
    assert_eq!(r.header.status, Status::Ok);
    assert_eq!(r.header.total, Some(s.model.len() as u64));
    let n = s
        .model
        .len()
        .min(outpost_protocol::wire::CHUNK_LEN as usize);
    assert_eq!(r.body, s.model[..n]);
}

#[test]
fn retained_assignment_is_back_after_sigkill_and_restart() {
    let s = Setup::new();
    let srv = s.start(&[]);
    let pw = srv.add_device("dev-1");
    srv.assign("dev-1", "1.0");
    let rt = runtime();
    let before = retained_assignment(&rt, &srv, &pw);
    drop(srv); // SIGKILL: no shutdown path runs.

    let srv = s.start(&[]);
    assert_eq!(retained_assignment(&rt, &srv, &pw), before);
}

/// dev-1's assignment as the broker retains it. The server publishes asynchronously
/// (after an assignment, after a start), so a first session may get it live; once it
/// did, the broker has it and a new session must get it retained.
fn retained_assignment(rt: &tokio::runtime::Runtime, srv: &Server, pw: &str) -> Vec<u8> {
    let t = DeviceTopics::new("dev-1").unwrap();
    let mut first = None;
    for _ in 0..2 {
        let d = connect(rt, srv, "dev-1", pw);
        subscribe_ok(rt, &d, &t.assignment);
        let m = d.message(&t.assignment);
        if m.retain {
            return m.payload.to_vec();
        }
        first = Some(m.payload);
    }
    panic!("the assignment arrived live twice, never retained: {first:?}");
}

#[test]
fn stalled_tcp_connection_does_not_block_another_clients_connect() {
    let s = Setup::new();
    let srv = s.start(&[]);
    let pw = srv.add_device("dev-1");
    let rt = runtime();
    // One connection that never speaks, one that stops halfway through a CONNECT.
    let _silent = std::net::TcpStream::connect(srv.mqtt).unwrap();
    let mut half = std::net::TcpStream::connect(srv.mqtt).unwrap();
    half.write_all(&[0x10, 0x40, 0x00, 0x04, b'M']).unwrap();
    connect(&rt, &srv, "dev-1", &pw);
}

/// A self-signed server certificate for 127.0.0.1 made by the `openssl` CLI.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key, conf) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("openssl.cnf"),
    );
    std::fs::write(
        &conf,
        "[req]\ndistinguished_name = dn\nx509_extensions = ext\nprompt = no\n\
         [dn]\nCN = outpost-test\n\
         [ext]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = digitalSignature\n\
         extendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1\n",
    )
    .unwrap();
    let st = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args([
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-config",
        ])
        .arg(&conf)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .expect("openssl runs");
    assert!(st.success());
    (cert, key)
}

fn mqtt_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// An MQTT 3.1.1 CONNECT with clean session, username and password.
fn connect_packet(id: &str, user: &str, pw: &str) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_string(&mut body, b"MQTT");
    body.extend_from_slice(&[4, 0b1100_0010, 0, 30]);
    for s in [id, user, pw] {
        mqtt_string(&mut body, s.as_bytes());
    }
    let mut out = vec![0x10];
    let mut len = body.len();
    loop {
        let b = (len % 128) as u8;
        len /= 128;
        out.push(if len > 0 { b | 0x80 } else { b });
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&body);
    out
}

/// Connects over TLS trusting `cert`, sends a CONNECT and returns the CONNACK return
/// code, or `None` when the connection closed without one.
fn tls_connack(addr: SocketAddr, cert: &Path, id: &str, user: &str, pw: &str) -> Option<u8> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(cert).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), "127.0.0.1".try_into().unwrap()).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(&connect_packet(id, user, pw)).unwrap();
    let mut ack = [0u8; 4];
    match tls.read_exact(&mut ack) {
        Ok(()) => {
            assert_eq!(ack[..2], [0x20, 0x02], "not a CONNACK: {ack:?}");
            Some(ack[3])
        }
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
        Err(e) => panic!("reading the CONNACK: {e}"),
    }
}

#[test]
fn device_connects_over_tls_past_a_stalled_handshake_and_a_wrong_password_is_refused() {
    let s = Setup::new();
    let (cert, key) = self_signed(s.dir.path());
    let srv = s.start(&[
        "--mqtts",
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let tls = srv.mqtts.unwrap();
    let pw = srv.add_device("dev-1");
    // Raw TCP that never starts its TLS handshake.
    let _stalled = std::net::TcpStream::connect(tls).unwrap();
    assert_eq!(tls_connack(tls, &cert, "dev-1", "dev-1", &pw), Some(0));
    let bad = tls_connack(tls, &cert, "dev-1", "dev-1", "not-the-password");
    assert!(matches!(bad, Some(4 | 5)), "wrong password: {bad:?}");
}

/// `serve --ports-file` with every listener on port 0; returns the child and the file's
/// JSON once it appeared.
fn serve_with_ports_file(s: &Setup, extra: &[&str]) -> (Child, serde_json::Value) {
    let ports = s.dir.path().join("ports.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outpost-server"));
    cmd.args(["serve", "--data"])
        .arg(s.data())
        .args(["--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"])
        .arg("--ports-file")
        .arg(&ports)
        .args(extra)
        .arg("--import-repo")
        .arg(s.repo.dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let json = loop {
        if let Ok(b) = std::fs::read(&ports) {
            break serde_json::from_slice::<serde_json::Value>(&b).unwrap();
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("outpost-server exited with {st} before writing its ports file");
        }
        assert!(std::time::Instant::now() < deadline, "no ports file");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    (child, json)
}

#[test]
fn ports_file_names_every_listener_bound_on_port_zero() {
    let s = Setup::new();
    let (cert, key) = self_signed(s.dir.path());
    let (mut child, ports) = serve_with_ports_file(
        &s,
        &[
            "--mqtts",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let addr = |k: &str| -> SocketAddr { ports[k].as_str().unwrap().parse().unwrap() };
    let (http, mqtt, mqtts) = (addr("http"), addr("mqtt"), addr("mqtts"));
    let health = ApiClient::new(&format!("http://{http}"), "")
        .get("/api/v1/health")
        .unwrap();
    assert_eq!(health["broker"], "connected", "{health}");
    // Both device listeners are the broker's: a CONNACK refusing an unknown device.
    let mut tcp = std::net::TcpStream::connect(mqtt).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.write_all(&connect_packet("dev-9", "dev-9", "x"))
        .unwrap();
    let mut ack = [0u8; 4];
    tcp.read_exact(&mut ack).unwrap();
    assert_eq!(ack[..2], [0x20, 0x02], "not a CONNACK: {ack:?}");
    assert!(matches!(ack[3], 4 | 5), "unknown device: {ack:?}");
    let tls = tls_connack(mqtts, &cert, "dev-9", "dev-9", "x");
    assert!(
        matches!(tls, Some(4 | 5)),
        "unknown device over TLS: {tls:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn serve_on_a_taken_port_exits_saying_address_in_use_and_writes_no_ports_file() {
    let s = Setup::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let ports = s.dir.path().join("ports.json");
    let out = Command::new(env!("CARGO_BIN_EXE_outpost-server"))
        .args(["serve", "--data"])
        .arg(s.data())
        .args(["--http", "127.0.0.1:0", "--mqtt", &addr])
        .arg("--ports-file")
        .arg(&ports)
        .arg("--import-repo")
        .arg(s.repo.dir())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve ran on a taken port: {stderr}");
    // Test harnesses draw another port on exactly this message.
    assert!(stderr.contains("Address already in use"), "{stderr}");
    assert!(
        !ports.exists(),
        "a ports file from a server that did not start"
    );
}
