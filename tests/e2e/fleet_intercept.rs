//! Chunks altered in flight: whoever holds the broker's server login answers a device's
//! chunk requests with altered bytes while the real server is stopped. The device
//! refetches, drops the delta and the compressed full model for the raw one, then
//! refuses the update with a typed `hash` reason that reaches the server; the old model
//! keeps serving, and the same release installs once the answers are genuine again.
//!
//! Mosquitto only: on the embedded broker no client but the server itself may publish
//! on a device's response topic (`fleet_acl`), so altering chunks in flight there means
//! replacing the server.

use std::sync::mpsc;
use std::time::Duration;

use rumqttc::QoS;

use outpost_protocol::wire::{
    Artifact, ArtifactKind, ArtifactList, DeviceTopics, Request, RequestBody, Response,
};

use crate::support::{Broker, Fleet, MODEL, Target, WAIT, signal, wait_for};

#[test]
fn chunks_altered_in_flight_are_refused_and_old_model_keeps_serving() {
    let (f, v1) = Fleet::start(Broker::Mosquitto);
    let mut devices = f.add_devices(&["i1"], |c| c.update.chunk_window = 2);
    let dev = &mut devices[0];
    dev.chunk_len = 512;
    dev.start();
    let c1 = f.assign(&v1, &["i1"])["i1"];
    f.wait_converged("i1", &v1, c1);

    let v2 = f.sign("cnn_a_ft.onnx", "1.1");
    f.push(&v2);
    let offered = artifacts_of(&f, &v2);
    // Asked now: the server's API does not answer while it is stopped below.
    let v1_zstd = f.full_zstd_length(&v1);
    assert!(
        offered
            .iter()
            .any(|a| matches!(a.kind, ArtifactKind::Delta { .. })),
        "no delta for 1.1: {offered:?}"
    );

    let topics = DeviceTopics::new("i1").unwrap();
    let mitm = Interceptor::connect(&f, &topics.req);
    let server = server_pid(&f);
    // Assigned while the agent runs: one live delivery (an agent that was offline gets
    // the queued message and the retained one, and checks the second copy again).
    let c2 = f.assign(&v2, &["i1"])["i1"];

    // The real server answers the assignment's metadata and the artifact list; from the
    // first chunk request on it is stopped and the interceptor answers instead.
    let mut paused = false;
    let mut altered = 0;
    let failed = wait_for("i1 to refuse 1.1", WAIT, || {
        if let Ok(p) = mitm.requests.recv_timeout(Duration::from_millis(10))
            && let Ok(req) = Request::from_bytes(&p.payload)
        {
            let answer = match &req.body {
                RequestBody::Chunk {
                    artifact,
                    offset,
                    len,
                } => {
                    if !paused {
                        signal(server, "STOP");
                        paused = true;
                    }
                    let bytes = std::fs::read(f.artifacts_dir().join(artifact)).unwrap();
                    let end = bytes.len().min((*offset + u64::from(*len)) as usize);
                    let mut chunk = bytes[*offset as usize..end].to_vec();
                    let mid = chunk.len() / 2;
                    chunk[mid] ^= 0x01;
                    altered += 1;
                    let mut r = Response::ok(req.id, chunk);
                    r.header.total = Some(bytes.len() as u64);
                    r.header.offset = Some(*offset);
                    Some(r)
                }
                RequestBody::Artifacts { bases, .. } if paused => {
                    let artifacts = offered
                        .iter()
                        .filter(|a| match &a.kind {
                            ArtifactKind::Delta { base } => bases.contains(base),
                            _ => true,
                        })
                        .cloned()
                        .collect();
                    let body = serde_json::to_vec(&ArtifactList { artifacts }).unwrap();
                    Some(Response::ok(req.id, body))
                }
                _ => None,
            };
            if let Some(r) = answer {
                mitm.client
                    .publish(&topics.resp, QoS::AtLeastOnce, false, r.to_bytes())
                    .unwrap();
            }
        }
        let s = dev.status().ok()?;
        (s["state"]["state"] == "failed" && s["state"]["failure"]["kind"] == "hash").then_some(s)
    });
    assert!(paused && altered > 0, "nothing was intercepted: {failed}");
    // The delta, the compressed full model and the raw one were fetched, and refused.
    let got = &failed["bytes_received"];
    assert!(
        got["delta"].as_u64() > Some(0)
            && got["full_zstd"].as_u64() > Some(v1_zstd)
            && got["full"].as_u64() >= Some(v2.length),
        "{failed}"
    );
    signal(server, "CONT");
    drop(mitm);

    let deadline = std::time::Instant::now() + WAIT;
    let s = loop {
        let d = f.device("i1");
        let s = &d["status"];
        if s["update"]["state"] == "failed" && s["update"]["target"] == v2.path.as_str() {
            break s.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server never heard of the refusal: {d}; agent: {failed}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(s["last_error"]["kind"], "hash", "{s}");
    assert_eq!(
        s["models"][MODEL]["active_sha256"],
        v1.sha256.as_str(),
        "{s}"
    );
    dev.stop();
    assert_eq!(
        dev.check_store(&[&v1, &v2]).as_deref(),
        Some(v1.sha256.as_str())
    );

    // Genuine answers again: the same release, assigned again, installs.
    dev.start();
    let c3 = f.assign(&v2, &["i1"])["i1"];
    assert!(c3 > c2);
    f.wait_converged("i1", &v2, c3);
    dev.stop();
    assert_eq!(
        dev.check_store(&[&v1, &v2]).as_deref(),
        Some(v2.sha256.as_str())
    );
}

/// What the server offers for `t` (`GET /api/v1/releases`), as a device sees it.
fn artifacts_of(f: &Fleet, t: &Target) -> Vec<Artifact> {
    let r = f.admin.get("/api/v1/releases").unwrap();
    let release = r["releases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["path"] == t.path.as_str())
        .expect("the release is on the server")
        .clone();
    release["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| Artifact {
            id: a["id"].as_str().unwrap().to_owned(),
            length: a["length"].as_u64().unwrap(),
            kind: match (a["base"].as_str(), a["kind"].as_str()) {
                (Some(b), _) => ArtifactKind::Delta { base: b.to_owned() },
                (None, Some("full_zstd")) => ArtifactKind::FullZstd,
                (None, _) => ArtifactKind::Full,
            },
        })
        .collect()
}

/// A client with the server's broker login, receiving every request of one device.
struct Interceptor {
    client: rumqttc::Client,
    requests: mpsc::Receiver<rumqttc::Publish>,
}

impl Interceptor {
    fn connect(f: &Fleet, req_topic: &str) -> Interceptor {
        let mut opts = rumqttc::MqttOptions::new("e2e-mitm", "127.0.0.1", f.broker_port);
        opts.set_credentials("outpost-server", f.server_password.as_deref().unwrap());
        opts.set_max_packet_size(300 * 1024, 300 * 1024);
        let (client, mut conn) = rumqttc::Client::new(opts, 256);
        let (tx, requests) = mpsc::channel();
        let (subscribed, suback) = mpsc::channel();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                use rumqttc::{Event, Packet};
                match ev {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send(p).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        client.subscribe(req_topic, QoS::AtLeastOnce).unwrap();
        suback
            .recv_timeout(WAIT)
            .expect("the interceptor subscribed");
        Interceptor { client, requests }
    }
}

/// The pid of this fleet's `outpost-server serve`: the child of this test process
/// whose command line names the fleet's own data directory.
fn server_pid(f: &Fleet) -> u32 {
    let me = std::process::id().to_string();
    let data = f.data.to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let parent = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .map(str::trim);
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if parent == Some(me.as_str()) && args.iter().any(|a| a == "serve") && args.contains(&data)
        {
            return pid;
        }
    }
    panic!("no outpost-server child serving {data}");
}
