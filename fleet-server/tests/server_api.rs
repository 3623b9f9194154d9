//! The REST API without a broker: authentication and roles, release upload
//! verification, delta selection, provisioning and the audit log.

mod server_common;

use outpost_protocol::tuf::{Envelope, SigningKey};
use outpost_server::server::client::{ApiClient, ClientError, push_release};
use server_common::*;

fn status(r: Result<serde_json::Value, ClientError>) -> u16 {
    match r {
        Ok(_) => 200,
        Err(ClientError::Status { status, .. }) => status,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn rejects_requests_without_a_valid_token_and_enforces_roles() {
    let f = Fixture::start(false);
    let none = ApiClient::new(&f.url, "");
    assert_eq!(status(none.get("/api/v1/devices")), 401);
    let forged = ApiClient::new(
        &f.url,
        "opt_0000000000000000000000000000000000000000000000000000000000000000",
    );
    assert_eq!(status(forged.get("/api/v1/devices")), 401);
    assert_eq!(status(none.get("/api/v1/health")), 200);

    let viewer = f.client("viewer");
    let operator = f.client("operator");
    assert_eq!(status(viewer.get("/api/v1/devices")), 200);
    // A viewer can neither provision, assign nor mint tokens.
    let dev = serde_json::json!({"id": "d1"});
    assert_eq!(status(viewer.post("/api/v1/devices", &dev)), 403);
    let assign = serde_json::json!({"model": "m", "version": "1", "devices": ["d1"]});
    assert_eq!(status(viewer.post("/api/v1/assignments", &assign)), 403);
    // An operator provisions but cannot mint tokens or read the audit log.
    assert_eq!(status(operator.post("/api/v1/devices", &dev)), 200);
    let tok = serde_json::json!({"name": "x", "role": "admin"});
    assert_eq!(status(operator.post("/api/v1/tokens", &tok)), 403);
    assert_eq!(status(operator.get("/api/v1/audit")), 403);
    // The admin token file is private.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(f.data_dir().join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Every operator action is audited, with who did it.
    let audit = f.admin.get("/api/v1/audit").unwrap();
    let actions: Vec<(&str, &str)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["actor"].as_str().unwrap(), e["action"].as_str().unwrap()))
        .collect();
    assert!(
        actions.contains(&("t-operator", "device.add")),
        "{actions:?}"
    );
    assert!(actions.contains(&("admin", "token.create")), "{actions:?}");
}

#[test]
fn rejects_tampered_model_bytes() {
    let f = Fixture::start(false);
    let good = sign_fixture(&f.repo, "cnn_a.onnx", "digits", "1.0");
    let sha = outpost_server::server::artifacts::sha256_hex(&good);
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 1;
    // Under the signed hash: refused at upload.
    let r = f
        .admin
        .put_bytes(&format!("/api/v1/blobs/{sha}"), bad.clone());
    assert_eq!(status(r), 400);
    // Under its own hash: stored, but the signed target has no matching bytes.
    let bad_sha = outpost_server::server::artifacts::sha256_hex(&bad);
    f.admin
        .put_bytes(&format!("/api/v1/blobs/{bad_sha}"), bad)
        .unwrap();
    let targets = std::fs::read_to_string(f.repo.metadata_dir().join("targets.json")).unwrap();
    let r = f
        .admin
        .post("/api/v1/releases", &serde_json::json!({"targets": targets}));
    assert_eq!(status(r), 400);
    assert!(
        f.admin.get("/api/v1/releases").unwrap()["releases"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // The genuine bytes are accepted.
    push_release(&f.admin, &f.repo, "digits", "1.0").unwrap();
    let rel = f.admin.get("/api/v1/releases").unwrap();
    assert_eq!(rel["releases"][0]["sha256"], sha.as_str());
}

#[test]
fn rejects_targets_signed_by_a_key_that_is_not_the_release_key() {
    let f = Fixture::start(false);
    let bytes = sign_fixture(&f.repo, "cnn_a.onnx", "digits", "1.0");
    let sha = outpost_server::server::artifacts::sha256_hex(&bytes);
    f.admin
        .put_bytes(&format!("/api/v1/blobs/{sha}"), bytes)
        .unwrap();
    let raw = std::fs::read(f.repo.metadata_dir().join("targets.json")).unwrap();
    let mut env = Envelope::from_bytes("targets", &raw, 1 << 24).unwrap();
    env.signatures.clear();
    env.sign(&SigningKey::from_seed([7; 32])).unwrap();
    let forged = String::from_utf8(env.to_bytes()).unwrap();
    let r = f
        .admin
        .post("/api/v1/releases", &serde_json::json!({"targets": forged}));
    assert_eq!(status(r), 400);
    // The online keys the server holds cannot sign targets either.
    let online = f.repo.load_key("snapshot").unwrap();
    env.signatures.clear();
    env.sign(&online).unwrap();
    let r = f.admin.post(
        "/api/v1/releases",
        &serde_json::json!({"targets": String::from_utf8(env.to_bytes()).unwrap()}),
    );
    assert_eq!(status(r), 400);
    let genuine = String::from_utf8(raw).unwrap();
    f.admin
        .post("/api/v1/releases", &serde_json::json!({"targets": genuine}))
        .unwrap();
}

#[test]
fn rejects_targets_whose_version_does_not_increase() {
    let f = Fixture::start(false);
    sign_fixture(&f.repo, "cnn_a.onnx", "digits", "1.0");
    let v2 = std::fs::read_to_string(f.repo.metadata_dir().join("targets.json")).unwrap();
    push_release(&f.admin, &f.repo, "digits", "1.0").unwrap();
    sign_fixture(&f.repo, "cnn_a_ft.onnx", "digits", "1.1");
    push_release(&f.admin, &f.repo, "digits", "1.1").unwrap();
    // Replaying the older targets (which still verify) would roll back 1.1.
    let r = f
        .admin
        .post("/api/v1/releases", &serde_json::json!({"targets": v2}));
    assert_eq!(status(r), 400);
    // The same version again is refused too.
    let v3 = std::fs::read_to_string(f.repo.metadata_dir().join("targets.json")).unwrap();
    let r = f
        .admin
        .post("/api/v1/releases", &serde_json::json!({"targets": v3}));
    assert_eq!(status(r), 400);
    let versions: Vec<String> = f.admin.get("/api/v1/releases").unwrap()["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(versions, ["1.0", "1.1"]);
}

#[test]
fn keeps_a_delta_only_when_it_is_smaller_than_the_full_model() {
    let f = Fixture::start(false);
    let base = sign_fixture(&f.repo, "cnn_a.onnx", "digits", "1.0");
    push_release(&f.admin, &f.repo, "digits", "1.0").unwrap();
    let target = sign_fixture(&f.repo, "cnn_a_ft.onnx", "digits", "1.1");
    let r = push_release(&f.admin, &f.repo, "digits", "1.1").unwrap();
    let arts = r["releases"][0]["artifacts"].as_array().unwrap();
    assert_eq!(arts.len(), 3, "{arts:?}");
    // Smallest first: the delta from 1.0, the compressed full model, the file.
    assert_eq!(arts[0]["kind"], "delta");
    assert_eq!(
        arts[0]["base"],
        outpost_server::server::artifacts::sha256_hex(&base).as_str()
    );
    assert_eq!(arts[1]["kind"], "full_zstd");
    assert_eq!(arts[2]["kind"], "full");
    let delta_len = arts[0]["length"].as_u64().unwrap();
    assert!(
        delta_len < target.len() as u64,
        "delta {delta_len} of {}",
        target.len()
    );
    // It is the smallest the codecs produce for this pair.
    match outpost_protocol::delta::encode_best(&base, &target).unwrap() {
        outpost_protocol::delta::Best::Delta { delta, .. } => {
            assert_eq!(delta.len() as u64, delta_len)
        }
        outpost_protocol::delta::Best::Full { delta_len: d, .. } => assert_eq!(d as u64, delta_len),
        _ => unreachable!(),
    }
    let stored = std::fs::read(
        f.data_dir()
            .join("artifacts")
            .join(arts[0]["id"].as_str().unwrap()),
    )
    .unwrap();
    assert_eq!(
        outpost_protocol::delta::apply(&base, &stored, target.len() as u64).unwrap(),
        target
    );

    // Unrelated incompressible files: no delta and no compression beats the full file;
    // neither is kept.
    let mut noise = vec![0u8; 20_000];
    outpost_server::keys::random_bytes(&mut noise);
    sign_bytes(&f.repo, "noise.onnx", &noise, "noise", "1");
    push_release(&f.admin, &f.repo, "noise", "1").unwrap();
    outpost_server::keys::random_bytes(&mut noise);
    sign_bytes(&f.repo, "noise.onnx", &noise, "noise", "2");
    let r = push_release(&f.admin, &f.repo, "noise", "2").unwrap();
    let arts = r["releases"][0]["artifacts"].as_array().unwrap();
    assert_eq!(arts.len(), 1, "{arts:?}");
    assert_eq!(arts[0]["kind"], "full");
}

/// For every (base, target) pair the server keeps the smallest output of any codec,
/// measured here codec by codec, and only when it beats the full file; the compressed
/// full model only when it is smaller than the file; the artifact list is smallest
/// first. Pairs: a full fine-tune, a head-only fine-tune, and a re-quantized
/// model with another graph (QDQ) whose deltas may lose to the full file.
#[test]
fn keeps_per_base_the_smallest_artifact_by_measurement() {
    use outpost_protocol::delta::{Codec, DEFAULT_LEVEL, encode};
    use outpost_server::server::artifacts::sha256_hex;

    let f = Fixture::start(false);
    let releases = [
        ("cnn_a.onnx", "1.0"),
        ("cnn_a_ft.onnx", "1.1"),
        ("cnn_a_head_ft.onnx", "1.2"),
        ("cnn_a_qdq.onnx", "1.3"),
    ];
    let mut held: Vec<Vec<u8>> = Vec::new();
    let mut deltas_kept = 0;
    for (file, version) in releases {
        let target = sign_fixture(&f.repo, file, "digits", version);
        let r = push_release(&f.admin, &f.repo, "digits", version).unwrap();
        let arts = r["releases"][0]["artifacts"].as_array().unwrap().clone();
        let lens: Vec<u64> = arts.iter().map(|a| a["length"].as_u64().unwrap()).collect();
        assert!(lens.is_sorted(), "{version}: not smallest first: {arts:?}");
        let full: Vec<_> = arts.iter().filter(|a| a["kind"] == "full").collect();
        assert_eq!(full.len(), 1, "{version}: {arts:?}");
        assert_eq!(full[0]["length"].as_u64(), Some(target.len() as u64));
        // The compressed full model, kept when zstd -19 makes it smaller, as measured.
        let zstd_len = outpost_protocol::delta::compress_full(&target)
            .unwrap()
            .len() as u64;
        let zstd: Vec<_> = arts.iter().filter(|a| a["kind"] == "full_zstd").collect();
        if zstd_len < target.len() as u64 {
            assert_eq!(zstd.len(), 1, "{version}: {arts:?}");
            assert_eq!(zstd[0]["length"].as_u64(), Some(zstd_len), "{version}");
        } else {
            assert!(zstd.is_empty(), "{version}: {arts:?}");
        }

        let bases = &held[held
            .len()
            .saturating_sub(outpost_server::server::DELTA_BASES)..];
        for base in bases {
            let smallest = Codec::ALL
                .iter()
                .map(|c| encode(base, &target, *c, DEFAULT_LEVEL).unwrap().len() as u64)
                .min()
                .unwrap();
            let kept: Vec<_> = arts
                .iter()
                .filter(|a| a["base"] == sha256_hex(base).as_str())
                .collect();
            if smallest < target.len() as u64 {
                assert_eq!(kept.len(), 1, "{version}: {arts:?}");
                assert_eq!(
                    kept[0]["length"].as_u64(),
                    Some(smallest),
                    "{version}: the kept delta is not the smallest codec output"
                );
                deltas_kept += 1;
            } else {
                assert!(
                    kept.is_empty(),
                    "{version}: a delta larger than the full file: {arts:?}"
                );
            }
        }
        held.push(target);
    }
    // 1.1 from 1.0; 1.2 from 1.0 and 1.1 (the fine-tunes share every tensor's layout).
    assert!(deltas_kept >= 3, "only {deltas_kept} deltas kept");
}

#[test]
fn bundle_holds_config_credentials_and_the_current_root() {
    let f = Fixture::start(false);
    f.add_device("pi-1", serde_json::json!({"site": "lab"}));
    let b = f
        .admin
        .post(
            "/api/v1/devices/pi-1/bundle",
            &serde_json::json!({"broker_url": "mqtt://broker.example:1883"}),
        )
        .unwrap();
    let cfg = outpost_protocol::bundle::AgentConfig::from_toml(b["agent_toml"].as_str().unwrap())
        .unwrap();
    assert_eq!(cfg.device_id, "pi-1");
    assert_eq!(cfg.tags["site"], "lab");
    assert_eq!(
        b["root_json"].as_str().unwrap().as_bytes(),
        std::fs::read(f.repo.metadata_dir().join("root.json")).unwrap()
    );
    // The password file holds the server's user and a hash of the new password only.
    let passwd = std::fs::read_to_string(&f.passwd).unwrap();
    let line = passwd.lines().find(|l| l.starts_with("pi-1:")).unwrap();
    let hash = line.strip_prefix("pi-1:").unwrap();
    let pw = b["credentials"].as_str().unwrap();
    assert!(!passwd.contains(pw));
    assert!(outpost_server::server::auth::mosquitto_verify(pw, hash));
    // Unknown devices have no bundle; duplicate ids are refused.
    let r = f.admin.post(
        "/api/v1/devices/ghost/bundle",
        &serde_json::json!({"broker_url": "mqtt://b:1"}),
    );
    assert_eq!(status(r), 404);
    let r = f
        .admin
        .post("/api/v1/devices", &serde_json::json!({"id": "pi-1"}));
    assert_eq!(status(r), 400);
    let r = f
        .admin
        .post("/api/v1/devices", &serde_json::json!({"id": "../etc"}));
    assert_eq!(status(r), 400);
}
