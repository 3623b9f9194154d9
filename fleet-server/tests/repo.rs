//! The operator repository as devices see it: everything `outpostctl` writes is checked
//! with the protocol's own TUF verifier, and the CLI's error paths are exercised through
//! the real binary.

use std::path::Path;
use std::process::Command;

use outpost_protocol::release::ModelRelease;
use outpost_protocol::tuf::metadata::{Envelope, Timestamp};
use outpost_protocol::tuf::{TrustedSet, UtcTime};
use outpost_server::keys::SealCost;
use outpost_server::repo::{Expiries, InitOptions, Repo, RepoError, RootRotation};

const NOW: UtcTime = UtcTime::from_unix(1_800_000_000);

fn release(model: &str) -> ModelRelease {
    ModelRelease::from_value(&serde_json::json!({
        "schema": 1, "model": model, "version": "ignored", "sequence": 0,
        "io": {"inputs": [{"name": "x", "dtype": "f32", "shape": [1, 4]}],
               "outputs": [{"name": "y", "dtype": "f32", "shape": [1, 2], "kind": "class_logits"}]}
    }))
    .unwrap()
}

fn init(dir: &Path, keys: usize, threshold: u64, pass: Option<&str>) -> Repo {
    let opts = InitOptions {
        root_keys: keys,
        root_threshold: threshold,
        passphrase: pass.map(str::to_owned),
        expiries: Expiries::default(),
        seal_cost: SealCost { log_n: 4 },
    };
    Repo::init(dir, &opts, NOW).unwrap()
}

fn read(repo: &Repo, name: &str) -> Vec<u8> {
    std::fs::read(repo.metadata_dir().join(name)).unwrap()
}

/// A device that trusts `1.root.json` walks the chain and refreshes like a TUF client.
fn device_view(repo: &Repo, now: UtcTime) -> TrustedSet {
    let mut set = TrustedSet::new(&read(repo, "1.root.json"), now).unwrap();
    let mut v = 2;
    while let Ok(bytes) = std::fs::read(repo.metadata_dir().join(format!("{v}.root.json"))) {
        set.update_root(&bytes).unwrap();
        v += 1;
    }
    set.update_timestamp(&read(repo, "timestamp.json")).unwrap();
    set.update_snapshot(&read(repo, "snapshot.json"), false)
        .unwrap();
    set.update_targets(&read(repo, "targets.json")).unwrap();
    set
}

#[test]
fn signed_release_verifies_on_a_device_and_revocation_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(&dir.path().join("repo"), 3, 2, None);
    let mut r = release("digits");
    r.version = "1.0.0".into();
    let e1 = repo
        .sign_release("m.onnx", b"model one", r.clone(), NOW)
        .unwrap();
    r.version = "1.1.0".into();
    let e2 = repo.sign_release("m.onnx", b"model two", r, NOW).unwrap();
    assert_eq!((e1.release.sequence, e2.release.sequence), (1, 2));

    let set = device_view(&repo, NOW.plus_seconds(60));
    let targets = set.targets().unwrap();
    let t = &targets.targets["digits/1.1.0/m.onnx"];
    assert_eq!(t.length, 9);
    let custom = ModelRelease::from_value(t.custom.as_ref().unwrap()).unwrap();
    assert_eq!(custom.sequence, 2);
    // The consistent-snapshot copy is what clients fetch.
    let sha = &t.hashes["sha256"];
    let served = std::fs::read(
        repo.targets_dir()
            .join(format!("digits/1.1.0/{sha}.m.onnx")),
    );
    assert_eq!(served.unwrap(), b"model two");

    repo.revoke_release("digits", "1.0.0", NOW).unwrap();
    let set = device_view(&repo, NOW.plus_seconds(60));
    let targets = set.targets().unwrap();
    assert!(!targets.targets.contains_key("digits/1.0.0/m.onnx"));
    assert!(targets.targets.contains_key("digits/1.1.0/m.onnx"));
}

#[test]
fn released_versions_are_immutable() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(&dir.path().join("repo"), 1, 1, None);
    let mut r = release("digits");
    r.version = "1.0.0".into();
    repo.sign_release("m.onnx", b"a", r.clone(), NOW).unwrap();
    let err = repo.sign_release("m.onnx", b"b", r, NOW).unwrap_err();
    assert!(err.to_string().contains("immutable"), "{err}");
}

#[test]
fn root_rotation_is_accepted_by_devices_holding_the_old_root() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(&dir.path().join("repo"), 2, 2, None);
    let old_root = repo.root().unwrap();
    let victim = old_root.role("root").unwrap().keyids[0].clone();
    let change = RootRotation {
        add_keys: 2,
        remove: vec![victim[..10].to_owned()],
        threshold: Some(2),
        replace_roles: vec!["timestamp".into(), "targets".into()],
    };
    let new_root = repo.rotate_root(&change, NOW).unwrap();
    assert_eq!(new_root.version, 2);
    let role = new_root.role("root").unwrap();
    assert_eq!(role.keyids.len(), 3);
    assert!(!role.keyids.contains(&victim));
    assert_ne!(
        new_root.role("timestamp").unwrap().keyids,
        old_root.role("timestamp").unwrap().keyids
    );
    // A device on root v1 walks to v2 and accepts metadata signed by the new keys.
    let set = device_view(&repo, NOW.plus_seconds(60));
    assert_eq!(set.root().version, 2);
    // The rotated-out timestamp key no longer signs anything a device accepts.
    let retired = dir.path().join("repo/keys/retired-timestamp-v1.json");
    let retired = outpost_server::keys::read(&retired, None).unwrap();
    let retired = outpost_protocol::tuf::SigningKey::from_seed(retired.to_bytes());
    let current: Envelope = serde_json::from_slice(&read(&repo, "timestamp.json")).unwrap();
    let mut forged_ts: Timestamp = current.parse_signed().unwrap();
    forged_ts.version += 10;
    let mut forged = Envelope::new(&forged_ts).unwrap();
    forged.sign(&retired).unwrap();
    let mut set = TrustedSet::new(&read(&repo, "1.root.json"), NOW).unwrap();
    set.update_root(&read(&repo, "2.root.json")).unwrap();
    assert!(set.update_timestamp(&forged.to_bytes()).is_err());
    set.update_timestamp(&read(&repo, "timestamp.json"))
        .unwrap();
}

#[test]
fn rotation_below_threshold_of_available_root_keys_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(&dir.path().join("repo"), 3, 2, None);
    // Take two root keys offline (another machine): one remains, threshold is 2.
    let keys_dir = dir.path().join("repo/keys");
    let mut moved = 0;
    for entry in std::fs::read_dir(&keys_dir).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("root-") && moved < 2 {
            std::fs::rename(&p, dir.path().join(name)).unwrap();
            moved += 1;
        }
    }
    let err = repo
        .rotate_root(
            &RootRotation {
                add_keys: 1,
                ..Default::default()
            },
            NOW,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            RepoError::BelowThreshold {
                threshold: 2,
                available: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn sealed_offline_keys_need_the_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    init(&path, 1, 1, Some("s3cret"));
    let mut r = release("digits");
    r.version = "1.0.0".into();
    let wrong = Repo::open(&path, Some("nope".into())).unwrap();
    let err = wrong
        .sign_release("m.onnx", b"a", r.clone(), NOW)
        .unwrap_err();
    assert!(err.to_string().contains("wrong passphrase"), "{err}");
    let none = Repo::open(&path, None).unwrap();
    let err = none
        .sign_release("m.onnx", b"a", r.clone(), NOW)
        .unwrap_err();
    assert!(err.to_string().contains("OUTPOST_KEY_PASSPHRASE"), "{err}");
    Repo::open(&path, Some("s3cret".into()))
        .unwrap()
        .sign_release("m.onnx", b"a", r, NOW)
        .unwrap();
}

fn outpostctl(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_outpostctl"))
        .args(args)
        .env_remove("OUTPOST_KEY_PASSPHRASE")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn cli_reports_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo_s = repo.to_str().unwrap();

    let (code, text) = outpostctl(&[
        "repo",
        "init",
        "--dir",
        repo_s,
        "--root-keys",
        "2",
        "--root-threshold",
        "3",
    ]);
    assert_eq!(code, 1);
    assert!(
        text.contains("--root-threshold 3 must be between 1"),
        "{text}"
    );

    let (code, text) = outpostctl(&[
        "repo",
        "init",
        "--dir",
        repo_s,
        "--root-keys",
        "2",
        "--root-threshold",
        "2",
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("private"), "{text}");

    let model = dir.path().join("m.onnx");
    std::fs::write(&model, b"bytes").unwrap();
    let (code, text) = outpostctl(&[
        "release",
        "sign",
        model.to_str().unwrap(),
        "--repo",
        repo_s,
        "--model",
        "d",
        "--version",
        "1",
    ]);
    assert_eq!(code, 1);
    assert!(
        text.contains("release info") && text.contains("m.release.json"),
        "{text}"
    );

    std::fs::write(
        dir.path().join("m.release.json"),
        serde_json::to_vec(&release("x")).unwrap(),
    )
    .unwrap();
    std::fs::rename(
        repo.join("keys/targets.json"),
        dir.path().join("targets.json"),
    )
    .unwrap();
    let (code, text) = outpostctl(&[
        "release",
        "sign",
        model.to_str().unwrap(),
        "--repo",
        repo_s,
        "--model",
        "d",
        "--version",
        "1",
    ]);
    assert_eq!(code, 1);
    assert!(text.contains("keys/targets.json not found"), "{text}");

    std::fs::rename(
        dir.path().join("targets.json"),
        repo.join("keys/targets.json"),
    )
    .unwrap();
    let (code, text) = outpostctl(&[
        "release",
        "sign",
        model.to_str().unwrap(),
        "--repo",
        repo_s,
        "--model",
        "d",
        "--version",
        "1",
    ]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = outpostctl(&["release", "list", "--repo", repo_s]);
    assert_eq!(code, 0);
    assert!(text.contains("d\t1\tseq 1\t5 bytes\td/1/m.onnx"), "{text}");

    let (code, text) = outpostctl(&[
        "release",
        "sign",
        "x.onnx",
        "--repo",
        dir.path().to_str().unwrap(),
        "--model",
        "d",
        "--version",
        "2",
        "--release-info",
        dir.path().join("m.release.json").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        text.contains("not an Outpost repository") || text.contains("reading model"),
        "{text}"
    );
}

#[test]
fn delta_cli_round_trips_fixtures_and_refuses_a_tampered_delta() {
    let dir = tempfile::tempdir().unwrap();
    let fx = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/models"
    ));
    let (base, target) = (fx.join("cnn_a.onnx"), fx.join("cnn_a_ft.onnx"));
    let (delta, out) = (dir.path().join("d.bin"), dir.path().join("out.onnx"));
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let (code, text) = outpostctl(&[
        "delta",
        "encode",
        "--base",
        &s(&base),
        "--target",
        &s(&target),
        "--out",
        &s(&delta),
    ]);
    assert_eq!(code, 0, "{text}");
    let delta_len = std::fs::metadata(&delta).unwrap().len();
    assert!(
        delta_len < std::fs::metadata(&target).unwrap().len(),
        "{text}"
    );
    let (code, text) = outpostctl(&[
        "delta",
        "apply",
        "--base",
        &s(&base),
        "--delta",
        &s(&delta),
        "--out",
        &s(&out),
    ]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&target).unwrap()
    );

    // A flipped byte in the payload or the wrong base: refused, nothing written.
    let mut bytes = std::fs::read(&delta).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&delta, &bytes).unwrap();
    std::fs::remove_file(&out).unwrap();
    let (code, _) = outpostctl(&[
        "delta",
        "apply",
        "--base",
        &s(&base),
        "--delta",
        &s(&delta),
        "--out",
        &s(&out),
    ]);
    assert_eq!(code, 1);
    assert!(!out.exists());
    let (code, text) = outpostctl(&[
        "delta",
        "apply",
        "--base",
        &s(&target),
        "--delta",
        &s(&delta),
        "--out",
        &s(&out),
    ]);
    assert_eq!(code, 1);
    assert!(text.contains("base"), "{text}");
}
