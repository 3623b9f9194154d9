//! The server against a real Mosquitto started from the shipped config and ACL: retained
//! assignments a device verifies, the TUF refresh, artifact lists and chunks over MQTT,
//! telemetry deduplication and acks, the ACL, and bundle credentials.

mod server_common;

use std::collections::BTreeMap;

use outpost_protocol::director::verify_assignment;
use outpost_protocol::tuf::updater::{FetchError, MetadataStore, Remote, StoreError};
use outpost_protocol::tuf::{Updater, UpdaterConfig};
use outpost_protocol::wire::{
    ArtifactKind, ArtifactList, DeviceTopics, Request, RequestBody, Response, Status, TelemetryAck,
    TelemetryBatch, TelemetryRecord,
};
use outpost_server::server::artifacts::sha256_hex;
use outpost_server::server::client::push_release;
use rumqttc::SubscribeReasonCode;
use server_common::*;

/// A TUF remote that asks the server over MQTT, as the agent does.
struct MqttRemote<'a> {
    dev: &'a Device,
    rt: &'a tokio::runtime::Runtime,
    topics: DeviceTopics,
    next: u64,
}

impl MqttRemote<'_> {
    fn ask(&mut self, body: RequestBody) -> Response {
        self.next += 1;
        let id = self.next;
        let req = Request { id, body };
        self.dev.publish(self.rt, &self.topics.req, req.to_bytes());
        loop {
            let p = self.dev.message(&self.topics.resp);
            let r = Response::from_bytes(&p.payload).unwrap();
            if r.header.id == id {
                return r;
            }
        }
    }
}

impl Remote for MqttRemote<'_> {
    fn fetch_metadata(
        &mut self,
        role: &str,
        version: Option<u64>,
        max_len: u64,
    ) -> Result<Vec<u8>, FetchError> {
        let r = self.ask(RequestBody::Metadata {
            role: role.into(),
            version,
            offset: None,
            len: None,
            accept_zstd: false,
        });
        match r.header.status {
            Status::Ok if r.body.len() as u64 > max_len => {
                Err(FetchError::TooLarge { max: max_len })
            }
            Status::Ok => Ok(r.body),
            Status::NotFound => Err(FetchError::NotFound),
            _ => Err(FetchError::Transport(format!("{:?}", r.header.message))),
        }
    }

    fn fetch_target(&mut self, _: &str, _: u64) -> Result<Vec<u8>, FetchError> {
        Err(FetchError::Transport("targets come as artifacts".into()))
    }
}

#[derive(Default)]
struct MemStore(BTreeMap<String, Vec<u8>>);

impl MetadataStore for MemStore {
    fn load(&mut self, role: &str) -> Option<Vec<u8>> {
        self.0.get(role).cloned()
    }
    fn save(&mut self, role: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.0.insert(role.into(), bytes.to_vec());
        Ok(())
    }
    fn delete(&mut self, role: &str) -> Result<(), StoreError> {
        self.0.remove(role);
        Ok(())
    }
}

fn subscribe_own(rt: &tokio::runtime::Runtime, dev: &Device) -> DeviceTopics {
    let t = DeviceTopics::new(&dev.id).unwrap();
    for topic in [&t.resp, &t.ack, &t.assignment] {
        let codes = dev.subscribe(rt, topic);
        assert!(
            matches!(codes[..], [SubscribeReasonCode::Success(_)]),
            "{topic}: {codes:?}"
        );
    }
    t
}

#[test]
fn device_verifies_its_retained_assignment_and_fetches_the_delta_over_mqtt() {
    let f = Fixture::start(true);
    let base = sign_fixture(&f.repo, "cnn_a.onnx", "digits", "1.0");
    push_release(&f.admin, &f.repo, "digits", "1.0").unwrap();
    let target = sign_fixture(&f.repo, "cnn_a_ft.onnx", "digits", "1.1");
    push_release(&f.admin, &f.repo, "digits", "1.1").unwrap();
    let pw = f.add_device("dev-1", serde_json::json!({"site": "lab"}));
    let _broker = f.mosquitto();

    let r = f
        .admin
        .post(
            "/api/v1/assignments",
            &serde_json::json!({"model": "digits", "version": "1.1", "tags": {"site": "lab"}}),
        )
        .unwrap();
    assert_eq!(r["published"], true);
    assert_eq!(r["assigned"][0]["device"], "dev-1");

    // The device connects afterwards: the assignment waits for it, retained.
    let dev = Device::connect(&f.rt, f.broker_port, "dev-1", &pw);
    dev.connected();
    let topics = subscribe_own(&f.rt, &dev);
    let msg = dev.message(&topics.assignment);
    assert!(msg.retain);

    // TUF refresh over MQTT from the root shipped in the bundle.
    let mut store = MemStore::default();
    store
        .save(
            "root",
            &std::fs::read(f.repo.metadata_dir().join("1.root.json")).unwrap(),
        )
        .unwrap();
    let mut remote = MqttRemote {
        dev: &dev,
        rt: &f.rt,
        topics: topics.clone(),
        next: 0,
    };
    let mut up = Updater::new(&mut remote, store, UpdaterConfig::default(), now()).unwrap();
    up.refresh().unwrap();
    let root = up.trusted_set().root().clone();
    let accepted = verify_assignment(
        &msg.payload,
        &root,
        &mut |p: &str| up.get_target_info(p),
        "dev-1",
        None,
        now(),
    )
    .unwrap();
    let slot = &accepted.assignment.targets["digits"];
    let info = up.get_target_info(&slot.path).unwrap().unwrap();
    drop(up);

    // Another device's id in the same bytes is refused by the device.
    assert!(
        verify_assignment(&msg.payload, &root, &mut |_| Ok(None), "dev-2", None, now()).is_err()
    );

    // Artifacts for the target given the base the device holds: the delta first.
    let sha = info.file.hashes["sha256"].clone();
    // (An agent from before compressed-full: it does not say `accept_full_zstd`.)
    let r = remote.ask(RequestBody::Artifacts {
        target: slot.path.clone(),
        sha256: sha.clone(),
        bases: vec![sha256_hex(&base)],
        accept_full_zstd: false,
    });
    assert_eq!(r.header.status, Status::Ok);
    let list: ArtifactList = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(list.artifacts.len(), 2);
    assert_eq!(
        list.artifacts[0].kind,
        ArtifactKind::Delta {
            base: sha256_hex(&base)
        }
    );
    // Without the base the device is offered the full model only.
    let r = remote.ask(RequestBody::Artifacts {
        target: slot.path.clone(),
        sha256: sha.clone(),
        bases: vec![],
        accept_full_zstd: false,
    });
    let full_only: ArtifactList = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(full_only.artifacts.len(), 1);
    assert_eq!(full_only.artifacts[0].kind, ArtifactKind::Full);

    // A device that decodes compressed-full is offered it before the raw file, and
    // after the delta, smallest first; it decodes to the signed target.
    let r = remote.ask(RequestBody::Artifacts {
        target: slot.path.clone(),
        sha256: sha.clone(),
        bases: vec![sha256_hex(&base)],
        accept_full_zstd: true,
    });
    let all: ArtifactList = serde_json::from_slice(&r.body).unwrap();
    let kinds: Vec<_> = all.artifacts.iter().map(|a| a.kind.clone()).collect();
    assert_eq!(
        kinds,
        [
            ArtifactKind::Delta {
                base: sha256_hex(&base)
            },
            ArtifactKind::FullZstd,
            ArtifactKind::Full
        ]
    );
    assert!(all.artifacts.windows(2).all(|w| w[0].length < w[1].length));
    let zstd = &all.artifacts[1];
    let mut frame = Vec::new();
    while (frame.len() as u64) < zstd.length {
        let r = remote.ask(RequestBody::Chunk {
            artifact: zstd.id.clone(),
            offset: frame.len() as u64,
            len: outpost_protocol::wire::CHUNK_LEN,
        });
        assert_eq!(r.header.total, Some(zstd.length));
        frame.extend_from_slice(&r.body);
    }
    assert_eq!(sha256_hex(&frame), zstd.id);
    let decoded = outpost_protocol::delta::decompress_full(&frame, info.file.length).unwrap();
    info.verify_bytes(&decoded).unwrap();

    // Chunks, small ones to cross offsets; the reconstruction matches the signed target.
    let delta = &list.artifacts[0];
    let mut bytes = Vec::new();
    while (bytes.len() as u64) < delta.length {
        let r = remote.ask(RequestBody::Chunk {
            artifact: delta.id.clone(),
            offset: bytes.len() as u64,
            len: 4096,
        });
        assert_eq!(r.header.status, Status::Ok);
        assert_eq!(r.header.total, Some(delta.length));
        assert_eq!(r.header.offset, Some(bytes.len() as u64));
        assert!(!r.body.is_empty() && r.body.len() <= 4096);
        bytes.extend_from_slice(&r.body);
    }
    let rebuilt = outpost_protocol::delta::apply(&base, &bytes, info.file.length).unwrap();
    info.verify_bytes(&rebuilt).unwrap();
    assert_eq!(rebuilt, target);

    // The full model travels in 64 KiB-capped chunks too.
    let full = &full_only.artifacts[0];
    let r = remote.ask(RequestBody::Chunk {
        artifact: full.id.clone(),
        offset: 0,
        len: outpost_protocol::wire::CHUNK_LEN,
    });
    assert_eq!(r.body, target);

    // Unknown artifacts, offsets past the end and unknown targets are not found.
    for body in [
        RequestBody::Chunk {
            artifact: "0".repeat(64),
            offset: 0,
            len: 10,
        },
        RequestBody::Chunk {
            artifact: delta.id.clone(),
            offset: delta.length,
            len: 10,
        },
        RequestBody::Artifacts {
            target: "digits/9/x.onnx".into(),
            sha256: sha.clone(),
            bases: vec![],
            accept_full_zstd: true,
        },
        RequestBody::Metadata {
            role: "../keys/director".into(),
            version: None,
            offset: None,
            len: None,
            accept_zstd: false,
        },
    ] {
        assert_eq!(remote.ask(body).header.status, Status::NotFound);
    }
}

fn record(seq: u64) -> TelemetryRecord {
    TelemetryRecord {
        seq,
        class: "window".into(),
        age_ms: 10,
        payload: serde_json::json!({"n": seq}),
    }
}

fn batch(dev: &str, after: u64, to: u64, seqs: &[u64]) -> Vec<u8> {
    serde_json::to_vec(&TelemetryBatch {
        device_id: dev.into(),
        after_seq: after,
        covers_to: to,
        records: seqs.iter().map(|&s| record(s)).collect(),
        drops: BTreeMap::from([("sample".to_owned(), [2, 100])]),
        evicted: None,
        rejected: None,
    })
    .unwrap()
}

fn ack(dev: &Device, t: &DeviceTopics) -> u64 {
    let p = dev.message(&t.ack);
    serde_json::from_slice::<TelemetryAck>(&p.payload)
        .unwrap()
        .acked
}

#[test]
fn telemetry_is_deduplicated_and_the_watermark_crosses_evicted_ranges() {
    let f = Fixture::start(true);
    let pw = f.add_device("dev-t", serde_json::json!({}));
    let _broker = f.mosquitto();
    let dev = Device::connect(&f.rt, f.broker_port, "dev-t", &pw);
    dev.connected();
    let t = subscribe_own(&f.rt, &dev);

    dev.publish(&f.rt, &t.telemetry, batch("dev-t", 0, 3, &[1, 2, 3]));
    assert_eq!(ack(&dev, &t), 3);
    // The same batch again (lost ack, redelivery): stored once, same ack.
    dev.publish(&f.rt, &t.telemetry, batch("dev-t", 0, 3, &[1, 2, 3]));
    assert_eq!(ack(&dev, &t), 3);
    // 5 and 6 were evicted on the device: the covered range still advances the ack.
    dev.publish(&f.rt, &t.telemetry, batch("dev-t", 3, 7, &[4, 7]));
    assert_eq!(ack(&dev, &t), 7);
    // A later range arrives before the one in between: held until the gap is covered.
    dev.publish(&f.rt, &t.telemetry, batch("dev-t", 9, 12, &[10, 11, 12]));
    assert_eq!(ack(&dev, &t), 7);
    dev.publish(&f.rt, &t.telemetry, batch("dev-t", 7, 9, &[8, 9]));
    assert_eq!(ack(&dev, &t), 12);
    // A batch on its own topic naming another device is dropped without an ack.
    dev.publish(&f.rt, &t.telemetry, batch("dev-x", 12, 13, &[13]));
    dev.publish(&f.rt, &t.telemetry, batch("dev-t", 12, 14, &[14]));
    assert_eq!(ack(&dev, &t), 14);

    let stored = f.admin.get("/api/v1/devices/dev-t/telemetry").unwrap();
    let seqs: Vec<u64> = stored["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 14]);
    let d = f.admin.get("/api/v1/devices/dev-t").unwrap();
    assert_eq!(d["telemetry_acked"], 14);
    assert_eq!(d["telemetry_drops"]["sample"][0], 2);
}

#[test]
fn acl_confines_a_device_to_its_own_topics_and_bundle_credentials_connect() {
    let f = Fixture::start(true);
    let pw1 = f.add_device("d1", serde_json::json!({}));
    let pw2 = f.add_device("d2", serde_json::json!({}));
    let broker = f.mosquitto();
    let d1 = Device::connect(&f.rt, f.broker_port, "d1", &pw1);
    d1.connected();
    let t1 = subscribe_own(&f.rt, &d1);
    let t2 = DeviceTopics::new("d2").unwrap();

    // Reading another device's assignment is refused: Mosquitto acknowledges the
    // subscription but delivers nothing. d2's assignment is retained before d1
    // subscribes; then a new one for d2 and one for d1 go out live, in that order over
    // the server's connection, so d1 sees its own only after anything leaked of d2's.
    sign_fixture(&f.repo, "cnn_a.onnx", "digits", "1.0");
    push_release(&f.admin, &f.repo, "digits", "1.0").unwrap();
    let assign = |d: &str| {
        let body = serde_json::json!({"model": "digits", "version": "1.0", "devices": [d]});
        f.admin.post("/api/v1/assignments", &body).unwrap();
    };
    assign("d2");
    for topic in [&t2.assignment, &t2.resp, "outpost/v1/d/+/assignment"] {
        d1.subscribe(&f.rt, topic);
    }
    assign("d2");
    assign("d1");
    d1.wait("own live assignment", |e| match e {
        DevEvent::Publish(p) if p.topic.starts_with("outpost/v1/d/d2/") => {
            panic!("d1 read {}", p.topic)
        }
        DevEvent::Publish(p) if p.topic == t1.assignment && !p.retain => Some(()),
        _ => None,
    });
    // Publishing d2's telemetry is dropped by the broker: d1's own batch, sent after
    // it, is acked, and nothing was stored for d2.
    d1.publish(&f.rt, &t2.telemetry, batch("d2", 0, 1, &[1]));
    d1.publish(&f.rt, &t1.telemetry, batch("d1", 0, 1, &[1]));
    assert_eq!(ack(&d1, &t1), 1);
    let d2 = f.admin.get("/api/v1/devices/d2").unwrap();
    assert_eq!(d2["telemetry_acked"], 0);
    let stored = f.admin.get("/api/v1/devices/d2/telemetry").unwrap();
    assert!(stored["records"].as_array().unwrap().is_empty());

    // A wrong password is refused.
    let bad = Device::connect(&f.rt, f.broker_port, "d2", "not-the-password");
    bad.wait("refusal", |e| match e {
        DevEvent::Failed(_) => Some(()),
        DevEvent::Connected => panic!("connected with a wrong password"),
        _ => None,
    });
    let _ = pw2;

    // A device added while the broker runs connects with its bundle's credentials once
    // Mosquitto reloaded the password file the server wrote.
    f.add_device("d3", serde_json::json!({}));
    let b = f
        .admin
        .post(
            "/api/v1/devices/d3/bundle",
            &serde_json::json!({"broker_url": format!("mqtt://127.0.0.1:{}", f.broker_port)}),
        )
        .unwrap();
    broker.reload();
    let cfg = outpost_protocol::bundle::AgentConfig::from_toml(b["agent_toml"].as_str().unwrap())
        .unwrap();
    let (_, port, tls) = cfg.broker_endpoint();
    assert!(!tls);
    let d3 = Device::connect(
        &f.rt,
        port,
        &cfg.device_id,
        b["credentials"].as_str().unwrap(),
    );
    d3.connected();
    subscribe_own(&f.rt, &d3);
}

#[test]
fn harness_mosquitto_moves_to_another_port_when_its_port_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("mosquitto.passwd");
    std::fs::write(&passwd, "").unwrap();
    // Another process's listener on the port drawn first.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held = taken.local_addr().unwrap().port();
    let m = Mosquitto::start_from(
        dir.path(),
        &passwd,
        [held].into_iter().chain(std::iter::repeat_with(pick_port)),
    );
    assert_ne!(m.port, held);
    std::net::TcpStream::connect(("127.0.0.1", m.port)).expect("mosquitto listens");
}
