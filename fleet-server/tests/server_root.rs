//! Root rotation reaching the server (`POST /api/v1/repository/root`): the next root is
//! accepted only when it chains from the trusted one (TUF 5.3.4-5.3.5), and every
//! refused upload leaves the repository as it was.

mod server_common;

use outpost_protocol::tuf::{Envelope, Root, SigningKey};
use outpost_server::repo::RootRotation;
use outpost_server::server::client::{ClientError, push_release, push_root};
use server_common::*;

fn status(r: Result<serde_json::Value, ClientError>) -> u16 {
    match r {
        Ok(_) => 200,
        Err(ClientError::Status {
            status, message, ..
        }) => {
            // Refusals of a root name the chain step that failed.
            assert!(
                status != 400 || message.contains("does not chain from the trusted root"),
                "{message}"
            );
            status
        }
        Err(e) => panic!("{e}"),
    }
}

/// The operator's offline root keys.
fn root_keys(repo_dir: &std::path::Path) -> Vec<SigningKey> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(repo_dir.join("keys")).unwrap() {
        let name = e
            .as_ref()
            .unwrap()
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.starts_with("root-") && name.ends_with(".json") {
            let k = outpost_server::keys::read(&e.unwrap().path(), None).unwrap();
            out.push(SigningKey::from_seed(k.to_bytes()));
        }
    }
    out
}

fn server_root_version(f: &Fixture) -> u64 {
    f.admin.get("/api/v1/root").unwrap()["signed"]["version"]
        .as_u64()
        .unwrap()
}

fn post_root(f: &Fixture, root: &Root, keys: &[&SigningKey]) -> u16 {
    let bytes = Envelope::sign_document(root, keys).unwrap();
    let body = serde_json::json!({ "root": String::from_utf8(bytes).unwrap() });
    status(f.admin.post("/api/v1/repository/root", &body))
}

fn rotate(repo: &outpost_server::repo::Repo, add_keys: usize, threshold: u64) -> Root {
    let change = RootRotation {
        add_keys,
        remove: Vec::new(),
        threshold: Some(threshold),
        replace_roles: Vec::new(),
    };
    repo.rotate_root(&change, now()).unwrap()
}

#[test]
fn accepts_rotated_root_signed_by_old_and_new_keys_and_serves_it() {
    let f = Fixture::start(false);
    sign_fixture(&f.repo, "cnn_a.onnx", "digits", "1.0");
    push_release(&f.admin, &f.repo, "digits", "1.0").unwrap();
    assert_eq!(server_root_version(&f), 1);
    // Only operators upload roots.
    let viewer = f.client("viewer");
    let v2 = rotate(&f.repo, 1, 2);
    let v2_bytes = std::fs::read_to_string(f.repo.metadata_dir().join("2.root.json")).unwrap();
    assert_eq!(
        status(viewer.post(
            "/api/v1/repository/root",
            &serde_json::json!({ "root": v2_bytes })
        )),
        403
    );

    assert_eq!(push_root(&f.admin, &f.repo).unwrap(), [2]);
    assert_eq!(server_root_version(&f), v2.version);
    let meta = f.data_dir().join("repo/metadata");
    assert_eq!(
        std::fs::read_to_string(meta.join("2.root.json")).unwrap(),
        v2_bytes
    );
    // Pushing again is a no-op; two rotations in a row go up one version at a time.
    assert!(push_root(&f.admin, &f.repo).unwrap().is_empty());
    rotate(&f.repo, 1, 2);
    rotate(&f.repo, 0, 3);
    assert_eq!(push_root(&f.admin, &f.repo).unwrap(), [3, 4]);
    // The next release verifies under the new root, and so does a restart's chain walk.
    sign_fixture(&f.repo, "cnn_a_ft.onnx", "digits", "1.1");
    push_release(&f.admin, &f.repo, "digits", "1.1").unwrap();
    let audit = f.admin.get("/api/v1/audit?limit=20").unwrap().to_string();
    assert!(audit.contains("root.upload"), "{audit}");
}

#[test]
fn rejects_root_signed_only_by_new_keys() {
    let f = Fixture::start(false);
    let old = root_keys(f.repo.dir());
    let current = f.repo.root().unwrap();
    let attacker = SigningKey::from_seed([7; 32]);
    let mut forged = current.clone();
    forged.version = 2;
    for id in current.role("root").unwrap().keyids.clone() {
        forged.revoke_key("root", &id);
    }
    forged.add_key("root", attacker.public_key()).unwrap();
    assert_eq!(post_root(&f, &forged, &[&attacker]), 400);
    // Its good counterpart: the same root also signed by the trusted key.
    let good = post_root(&f, &forged, &[&attacker, &old[0]]);
    assert_eq!(good, 200, "old and new keys together are accepted");
    assert_eq!(server_root_version(&f), 2);
}

#[test]
fn rejects_root_version_skip_and_replayed_version() {
    let f = Fixture::start(false);
    let old = root_keys(f.repo.dir());
    let mut next = f.repo.root().unwrap();
    next.version = 3;
    assert_eq!(post_root(&f, &next, &[&old[0]]), 400);
    next.version = 1;
    assert_eq!(post_root(&f, &next, &[&old[0]]), 400);
    assert_eq!(server_root_version(&f), 1);
    assert!(!f.data_dir().join("repo/metadata/3.root.json").exists());
    next.version = 2;
    assert_eq!(post_root(&f, &next, &[&old[0]]), 200);
    assert_eq!(server_root_version(&f), 2);
}

#[test]
fn rejects_root_of_another_repository() {
    let f = Fixture::start(false);
    let other_dir = tempfile::tempdir().unwrap();
    let other = operator_repo(&other_dir.path().join("other"));
    rotate(&other, 1, 1);
    let bytes = std::fs::read_to_string(other.metadata_dir().join("2.root.json")).unwrap();
    let r = f.admin.post(
        "/api/v1/repository/root",
        &serde_json::json!({ "root": bytes }),
    );
    assert_eq!(status(r), 400);
    assert_eq!(server_root_version(&f), 1);
    assert!(!f.data_dir().join("repo/metadata/2.root.json").exists());
}

#[test]
fn rejects_root_that_drops_the_servers_online_keys() {
    let f = Fixture::start(false);
    let change = RootRotation {
        add_keys: 0,
        remove: Vec::new(),
        threshold: None,
        replace_roles: vec!["timestamp".into()],
    };
    f.repo.rotate_root(&change, now()).unwrap();
    let err = push_root(&f.admin, &f.repo).unwrap_err().to_string();
    assert!(err.contains("online timestamp key"), "{err}");
    assert_eq!(server_root_version(&f), 1);
    assert!(!f.data_dir().join("repo/metadata/2.root.json").exists());
}
