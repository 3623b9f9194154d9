//! TUF client workflow tests, named after the attack they stop, in good/bad pairs.

mod common;

use common::*;
use outpost_protocol::tuf::{
    Delegations, Envelope, Error, MetaFile, RoleKeys, SuccinctRoles, TargetInfo, Targets,
};
use std::collections::BTreeMap;

// --- arbitrary software installation -------------------------------------------------

#[test]
fn accepts_metadata_signed_by_authorized_keys() {
    let repo = Repo::new();
    let mut client = Client::new(&repo);
    let info = client
        .lookup(&repo, now(), "models/a.onnx")
        .unwrap()
        .expect("target listed");
    assert_eq!(info.file.length, b"model a v1".len() as u64);
    for role in ["root", "timestamp", "snapshot", "targets"] {
        assert!(client.store.files.contains_key(role), "{role} persisted");
    }
}

#[test]
fn rejects_targets_with_bad_signature() {
    let mut repo = Repo::new();
    // Tamper with the served targets after signing: change the target's length.
    let mut env = Envelope::from_bytes("targets", &repo.files["1.targets.json"], 1 << 20).unwrap();
    env.signed["targets"]["models/a.onnx"]["length"] = 999.into();
    repo.files.insert("1.targets.json".into(), env.to_bytes());
    let err = Client::new(&repo).refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::ThresholdNotMet { ref role, .. } if role == "targets"),
        "{err}"
    );
}

#[test]
fn rejects_targets_signed_by_wrong_key() {
    let mut repo = Repo::new();
    repo.targets_signers = vec![key(99)];
    repo.bump_all();
    let err = Client::new(&repo).refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::ThresholdNotMet { valid: 0, .. }),
        "{err}"
    );
}

#[test]
fn rejects_metadata_signed_below_threshold() {
    let mut repo = Repo::new();
    repo.root.add_key("targets", key(40).public_key()).unwrap();
    repo.root.roles.get_mut("targets").unwrap().threshold = 2;
    repo.root.version = 2;
    repo.publish_root();
    repo.bump_all();
    let err = Client::new(&repo).refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ThresholdNotMet {
                threshold: 2,
                valid: 1,
                ..
            }
        ),
        "{err}"
    );

    repo.targets_signers.push(key(40));
    repo.bump_all();
    Client::new(&repo).refresh(&repo, now()).unwrap();
}

#[test]
fn rejects_duplicate_signatures_by_one_key() {
    let mut repo = Repo::new();
    repo.root.add_key("targets", key(40).public_key()).unwrap();
    repo.root.roles.get_mut("targets").unwrap().threshold = 2;
    repo.root.version = 2;
    repo.publish_root();
    repo.bump_all();
    // Two copies of key 4's signature: still one key, and a malformed document.
    let mut env = Envelope::from_bytes("targets", &repo.files["2.targets.json"], 1 << 20).unwrap();
    let dup = env.signatures[0].clone();
    env.signatures.push(dup);
    repo.files.insert("2.targets.json".into(), env.to_bytes());
    let err = Client::new(&repo).refresh(&repo, now()).unwrap_err();
    assert!(matches!(err, Error::DuplicateSignature { .. }), "{err}");
}

#[test]
fn rejects_duplicate_signature_even_when_threshold_is_met() {
    // tuf-conformance test_duplicate_sig_keyids: threshold 1, the one valid signature
    // appears twice. python-tuf refuses such metadata; so do we.
    let mut repo = Repo::new();
    let mut client = Client::new(&repo);
    client.refresh(&repo, now()).unwrap();
    repo.snapshot.version += 1;
    repo.timestamp.version += 1;
    repo.publish_snapshot_and_timestamp();
    let mut env =
        Envelope::from_bytes("snapshot", &repo.files["2.snapshot.json"], 1 << 20).unwrap();
    let dup = env.signatures[0].clone();
    env.signatures.push(dup);
    repo.files.insert("2.snapshot.json".into(), env.to_bytes());
    let err = client.refresh(&repo, now()).unwrap_err();
    assert!(matches!(err, Error::DuplicateSignature { .. }), "{err}");
    assert_eq!(client.version_of("snapshot"), 1);
}

// --- rollback attacks -----------------------------------------------------------------

#[test]
fn rejects_rollback_of_timestamp() {
    let mut repo = Repo::new();
    let old_timestamp = repo.files["timestamp.json"].clone();
    repo.bump_all();
    let mut client = Client::new(&repo);
    client.refresh(&repo, now()).unwrap();
    assert_eq!(client.version_of("timestamp"), 2);

    repo.files.insert("timestamp.json".into(), old_timestamp);
    let err = client.refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::RollbackAttempted { ref role, trusted: 2, offered: 1 } if role == "timestamp"),
        "{err}"
    );
    assert_eq!(client.version_of("timestamp"), 2, "trusted timestamp kept");
}

#[test]
fn accepts_same_timestamp_again_without_change() {
    let repo = Repo::new();
    let mut client = Client::new(&repo);
    client.refresh(&repo, now()).unwrap();
    client.refresh(&repo, now()).unwrap();
    assert_eq!(client.version_of("timestamp"), 1);
}

#[test]
fn rejects_rollback_of_snapshot() {
    let mut repo = Repo::new();
    repo.snapshot.version = 5;
    repo.timestamp.version = 5;
    repo.publish();
    let mut client = Client::new(&repo);
    client.refresh(&repo, now()).unwrap();

    // A newer timestamp that names an older snapshot.
    repo.timestamp.version = 6;
    repo.snapshot.version = 4;
    repo.publish();
    let err = client.refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::RollbackAttempted { ref role, trusted: 5, offered: 4 } if role == "snapshot.json"),
        "{err}"
    );
}

#[test]
fn rejects_rollback_of_targets() {
    let mut repo = Repo::new();
    repo.bump_all(); // targets v2
    let mut client = Client::new(&repo);
    client.refresh(&repo, now()).unwrap();
    assert_eq!(client.version_of("targets"), 2);

    // New snapshot and timestamp that list targets v1 again.
    repo.targets.version = 1;
    repo.snapshot.version += 1;
    repo.timestamp.version += 1;
    repo.publish();
    let err = client.refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::RollbackAttempted { ref role, trusted: 2, offered: 1 } if role == "targets.json"),
        "{err}"
    );

    // Going forward is fine.
    repo.targets.version = 3;
    repo.snapshot.version += 1;
    repo.timestamp.version += 1;
    repo.publish();
    client.refresh(&repo, now()).unwrap();
}

#[test]
fn rejects_rollback_of_root() {
    let mut repo = Repo::new();
    repo.root.version = 2;
    repo.publish_root();
    let mut client = Client::new(&repo);
    client.refresh(&repo, now()).unwrap();
    assert_eq!(client.version_of("root"), 2);

    // The remote serves root v1 under the name of version 3.
    let v1 = repo.root_bytes(1);
    repo.files.insert("3.root.json".into(), v1);
    let err = client.refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::RollbackAttempted { ref role, trusted: 2, offered: 1 } if role == "root"),
        "{err}"
    );
}

#[test]
fn rejects_root_that_skips_a_version() {
    let mut repo = Repo::new();
    repo.root.version = 3;
    repo.publish_root();
    let v3 = repo.root_bytes(3);
    repo.files.insert("2.root.json".into(), v3);
    let err = Client::new(&repo).refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::VersionMismatch {
                expected: 2,
                found: 3,
                ..
            }
        ),
        "{err}"
    );
}

// --- fast-forward attack recovery -----------------------------------------------------

#[test]
fn recovers_from_fast_forward_after_timestamp_key_rotation() {
    let mut repo = Repo::new();
    repo.timestamp.version = 10;
    repo.publish_timestamp();
    let mut client = Client::new(&repo);
    client.refresh(&repo, now()).unwrap();
    assert_eq!(client.version_of("timestamp"), 10);

    // Without a key rotation, timestamp v1 is a rollback.
    repo.timestamp.version = 1;
    repo.publish_timestamp();
    let err = client.refresh(&repo, now()).unwrap_err();
    assert!(matches!(err, Error::RollbackAttempted { .. }), "{err}");

    // Rotate the timestamp key in root v2: the fast-forwarded v10 is discarded.
    let old = repo.root.roles["timestamp"].keyids[0].clone();
    repo.root.revoke_key("timestamp", &old);
    repo.root
        .add_key("timestamp", key(22).public_key())
        .unwrap();
    repo.root.version = 2;
    repo.publish_root();
    repo.timestamp_signers = vec![key(22)];
    repo.publish_timestamp();
    client.refresh(&repo, now()).unwrap();
    assert_eq!(client.version_of("timestamp"), 1);
}

// --- freeze attacks -------------------------------------------------------------------

#[test]
fn rejects_expired_timestamp() {
    let mut repo = Repo::new();
    repo.timestamp.expires = t("2025-05-31T23:59:59Z");
    repo.publish_timestamp();
    let err = Client::new(&repo).refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::Expired { ref role, .. } if role == "timestamp"),
        "{err}"
    );
    Client::new(&repo)
        .refresh(&repo, t("2025-05-31T00:00:00Z"))
        .unwrap();
}

#[test]
fn rejects_expired_snapshot() {
    let mut repo = Repo::new();
    repo.snapshot.expires = t("2025-05-01T00:00:00Z");
    repo.publish();
    let err = Client::new(&repo).refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::Expired { ref role, .. } if role == "snapshot"),
        "{err}"
    );
    Client::new(&repo)
        .refresh(&repo, t("2025-04-01T00:00:00Z"))
        .unwrap();
}

#[test]
fn rejects_expired_targets() {
    let mut repo = Repo::new();
    repo.targets.expires = t("2025-05-01T00:00:00Z");
    repo.publish();
    let err = Client::new(&repo).refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::Expired { ref role, .. } if role == "targets"),
        "{err}"
    );
    Client::new(&repo)
        .refresh(&repo, t("2025-04-01T00:00:00Z"))
        .unwrap();
}

#[test]
fn rejects_expired_final_root_but_not_expired_intermediate_root() {
    let mut repo = Repo::new();
    repo.root.expires = t("2025-01-01T00:00:00Z");
    repo.root.version = 2;
    repo.publish_root();
    let err = Client::new(&repo).refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::Expired { ref role, .. } if role == "root"),
        "{err}"
    );

    // Root v2 is expired but only an intermediate step to an unexpired v3.
    repo.root.expires = far();
    repo.root.version = 3;
    repo.publish_root();
    let mut client = Client::new(&repo);
    client.refresh(&repo, now()).unwrap();
    assert_eq!(client.version_of("root"), 3);
}

// --- mix-and-match --------------------------------------------------------------------

#[test]
fn rejects_mix_and_match_of_targets_and_snapshot() {
    let mut repo = Repo::new();
    repo.bump_all();
    // Snapshot v2 names targets v2; serve a (validly signed) targets v1 as 2.targets.json.
    let v1 = repo.files["1.targets.json"].clone();
    repo.files.insert("2.targets.json".into(), v1);
    let err = Client::new(&repo).refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::VersionMismatch { ref role, expected: 2, found: 1 } if role == "targets"),
        "{err}"
    );
}

#[test]
fn rejects_snapshot_not_matching_signed_hashes() {
    let mut repo = Repo::new();
    repo.meta_hashes = true;
    repo.bump_all();
    Client::new(&repo).refresh(&repo, now()).unwrap();
    // A differently signed snapshot of the same version.
    let mut env =
        Envelope::from_bytes("snapshot", &repo.files["2.snapshot.json"], 1 << 20).unwrap();
    // Same length, different content: only the hash can tell.
    env.signed["spec_version"] = "1.0.32".into();
    env.signatures.clear();
    env.sign(&key(3)).unwrap();
    let forged = env.to_bytes();
    assert_eq!(forged.len(), repo.files["2.snapshot.json"].len());
    repo.files.insert("2.snapshot.json".into(), forged);
    let err = Client::new(&repo).refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::HashMismatch { ref what, .. } if what == "snapshot"),
        "{err}"
    );
}

// --- endless data ---------------------------------------------------------------------

#[test]
fn rejects_endless_timestamp_data() {
    let mut repo = Repo::new();
    repo.timestamp
        .extra
        .insert("padding".into(), "x".repeat(20_000).into());
    repo.publish_timestamp();
    let err = Client::new(&repo).refresh(&repo, now()).unwrap_err();
    assert!(matches!(err, Error::TooLarge { max: 16_384, .. }), "{err}");
}

#[test]
fn rejects_targets_metadata_longer_than_signed_length() {
    let mut repo = Repo::new();
    repo.meta_hashes = true;
    repo.publish();
    let mut client = Client::new(&repo);
    client.refresh(&repo, now()).unwrap();
    let mut long = repo.files["1.targets.json"].clone();
    long.extend_from_slice(b"          ");
    repo.files.insert("1.targets.json".into(), long);
    let err = Client::new(&repo).refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { max, .. } if max == repo.files["targets.json"].len() as u64),
        "{err}"
    );
}

#[test]
fn rejects_endless_target_file() {
    let mut repo = Repo::new();
    let mut client = Client::new(&repo);
    let info = client
        .lookup(&repo, now(), "models/a.onnx")
        .unwrap()
        .unwrap();
    let remote_path = info.remote_path(true);
    let mut updater = client.updater(&repo, now()).unwrap();
    assert_eq!(updater.download_target(&info).unwrap(), b"model a v1");
    drop(updater);

    repo.files
        .insert(remote_path.clone(), b"model a v1 and then some".to_vec());
    let mut updater = client.updater(&repo, now()).unwrap();
    let err = updater.download_target(&info).unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    drop(updater);

    repo.files.insert(remote_path, b"model A v1".to_vec());
    let err = client
        .updater(&repo, now())
        .unwrap()
        .download_target(&info)
        .unwrap_err();
    assert!(matches!(err, Error::HashMismatch { .. }), "{err}");
}

// --- key rotation and revocation ------------------------------------------------------

#[test]
fn rejects_targets_signed_by_revoked_key_after_rotation() {
    let mut repo = Repo::new();
    let mut client = Client::new(&repo);
    client.refresh(&repo, now()).unwrap();

    let old = repo.root.roles["targets"].keyids[0].clone();
    repo.root.revoke_key("targets", &old);
    repo.root.add_key("targets", key(44).public_key()).unwrap();
    repo.root.version = 2;
    repo.publish_root();
    // Still signed by the revoked key.
    repo.bump_all();
    let err = client.refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::ThresholdNotMet { ref role, .. } if role == "targets"),
        "{err}"
    );

    repo.targets_signers = vec![key(44)];
    repo.bump_all();
    client.refresh(&repo, now()).unwrap();
    assert_eq!(client.version_of("root"), 2);
}

#[test]
fn rejects_new_root_not_signed_by_old_root_keys() {
    let mut repo = Repo::new();
    let old = repo.root.roles["root"].keyids[0].clone();
    repo.root.revoke_key("root", &old);
    repo.root.add_key("root", key(11).public_key()).unwrap();
    repo.root.version = 2;
    repo.root_signers = vec![key(11)];
    repo.publish_root();
    let err = Client::new(&repo).refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::ThresholdNotMet { ref role, .. } if role == "root"),
        "{err}"
    );

    // Cross-signed by old and new keys: accepted; afterwards only the new key counts.
    repo.publish_root_with(&[&key(1)]);
    let mut client = Client::new(&repo);
    client.refresh(&repo, now()).unwrap();
    repo.root.version = 3;
    repo.root_signers = vec![key(1)];
    repo.publish_root();
    let err = client.refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::ThresholdNotMet { ref role, .. } if role == "root"),
        "{err}"
    );
}

#[test]
fn rejects_new_root_not_signed_by_its_own_keys() {
    let mut repo = Repo::new();
    let old = repo.root.roles["root"].keyids[0].clone();
    repo.root.revoke_key("root", &old);
    repo.root.add_key("root", key(11).public_key()).unwrap();
    repo.root.version = 2;
    repo.root_signers = vec![key(1)]; // old key only
    repo.publish_root();
    let err = Client::new(&repo).refresh(&repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::ThresholdNotMet { ref role, .. } if role == "root"),
        "{err}"
    );
}

#[test]
fn stops_root_chain_at_max_rotations() {
    let mut repo = Repo::new();
    for v in 2..=5 {
        repo.root.version = v;
        repo.publish_root();
    }
    let mut client = Client::new(&repo);
    client.config.max_root_rotations = 2;
    client.refresh(&repo, now()).unwrap();
    assert_eq!(client.version_of("root"), 3);
}

// --- delegations ----------------------------------------------------------------------

fn delegated_repo() -> Repo {
    let mut repo = Repo::new();
    repo.delegate("targets", "first", &["models/*"], false, key(61));
    repo.delegate("targets", "second", &["models/*"], false, key(62));
    repo.add_delegated_target("first", "models/x.onnx", b"x from first");
    repo.add_delegated_target("second", "models/x.onnx", b"x from second");
    repo.add_delegated_target("second", "models/y.onnx", b"y from second");
    repo.publish();
    repo
}

#[test]
fn delegation_search_respects_order() {
    let repo = delegated_repo();
    let mut client = Client::new(&repo);
    let x = client
        .lookup(&repo, now(), "models/x.onnx")
        .unwrap()
        .unwrap();
    assert_eq!(x.role, "first");
    let y = client
        .lookup(&repo, now(), "models/y.onnx")
        .unwrap()
        .unwrap();
    assert_eq!(y.role, "second");
    assert!(client.store.files.contains_key("first"));
}

#[test]
fn terminating_delegation_stops_the_search() {
    let mut repo = delegated_repo();
    repo.targets.delegations.as_mut().unwrap().roles[0].terminating = true;
    repo.targets.version += 1;
    repo.snapshot.version += 1;
    repo.timestamp.version += 1;
    repo.publish();
    let mut client = Client::new(&repo);
    assert!(
        client
            .lookup(&repo, now(), "models/y.onnx")
            .unwrap()
            .is_none()
    );
    // Paths outside the terminating delegation still reach later roles.
    repo.delegate("targets", "third", &["other/*"], false, key(63));
    repo.add_delegated_target("third", "other/z", b"z");
    repo.bump_all();
    assert!(client.lookup(&repo, now(), "other/z").unwrap().is_some());
}

#[test]
fn delegation_paths_do_not_match_across_directories() {
    let mut repo = delegated_repo();
    repo.add_delegated_target("first", "models/sub/z.onnx", b"z");
    repo.bump_all();
    let mut client = Client::new(&repo);
    assert!(
        client
            .lookup(&repo, now(), "models/sub/z.onnx")
            .unwrap()
            .is_none()
    );
}

#[test]
fn delegation_cycles_terminate() {
    let mut repo = Repo::new();
    repo.delegate("targets", "a", &["*"], false, key(71));
    repo.delegate("a", "b", &["*"], false, key(72));
    repo.delegate("b", "a", &["*"], false, key(71));
    repo.publish();
    let mut client = Client::new(&repo);
    assert!(client.lookup(&repo, now(), "nowhere").unwrap().is_none());
}

#[test]
fn delegation_search_visits_at_most_max_delegations() {
    let mut repo = Repo::new();
    let mut parent = "targets".to_string();
    for i in 0..5 {
        let name = format!("d{i}");
        repo.delegate(&parent, &name, &["*"], false, key(80 + i));
        parent = name;
    }
    repo.add_delegated_target("d4", "deep", b"deep");
    repo.publish();
    let mut client = Client::new(&repo);
    // Five delegated roles below the top-level targets: python-tuf's max_delegations
    // counts delegated roles only.
    client.config.max_delegations = 4;
    assert!(client.lookup(&repo, now(), "deep").unwrap().is_none());
    client.config.max_delegations = 5;
    assert_eq!(
        client.lookup(&repo, now(), "deep").unwrap().unwrap().role,
        "d4"
    );
}

#[test]
fn rejects_delegated_targets_signed_by_undelegated_key() {
    let mut repo = delegated_repo();
    repo.delegated.get_mut("first").unwrap().1 = vec![key(4)];
    repo.bump_all();
    let err = Client::new(&repo)
        .lookup(&repo, now(), "models/x.onnx")
        .unwrap_err();
    assert!(
        matches!(err, Error::ThresholdNotMet { ref role, .. } if role == "first"),
        "{err}"
    );
}

// --- misc -----------------------------------------------------------------------------

#[test]
fn non_consistent_snapshot_repositories_use_plain_names() {
    let mut repo = Repo::new();
    repo.root.consistent_snapshot = false;
    repo.root.version = 2;
    repo.publish_root();
    repo.files
        .retain(|name, _| !name.ends_with(".snapshot.json") || name == "snapshot.json");
    repo.files
        .retain(|name, _| !name.ends_with(".targets.json") || name == "targets.json");
    let mut client = Client::new(&repo);
    let info: outpost_protocol::tuf::Verified<TargetInfo> = client
        .lookup(&repo, now(), "models/a.onnx")
        .unwrap()
        .unwrap();
    let mut updater = client.updater(&repo, now()).unwrap();
    updater.refresh().unwrap();
    assert_eq!(updater.download_target(&info).unwrap(), b"model a v1");
}

#[test]
fn rejects_timestamp_meta_without_snapshot_entry() {
    let mut repo = Repo::new();
    repo.timestamp.meta.clear();
    repo.timestamp
        .meta
        .insert("other.json".into(), MetaFile::new(1));
    repo.publish_timestamp();
    let err = Client::new(&repo).refresh(&repo, now()).unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
}

#[test]
fn rejects_root_with_zero_threshold() {
    let mut repo = Repo::new();
    repo.root
        .roles
        .insert("timestamp".into(), RoleKeys::new(vec![], 0));
    repo.root.version = 2;
    repo.publish_root();
    let err = Client::new(&repo).refresh(&repo, now()).unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
}

// --- succinct hash-bin delegations (TAP 15) ----------------------------------------------

/// Top-level targets delegating to `2^bit_length` hash bins `bin-..`, all signed by
/// `bin_key`, each published (empty) and listed in the snapshot.
fn succinct_repo(bit_length: u32, bin_key: u8) -> (Repo, SuccinctRoles) {
    let mut repo = Repo::new();
    let signer = key(bin_key);
    let succinct = SuccinctRoles::new(vec![signer.key_id().into()], 1, bit_length, "bin").unwrap();
    let keys = BTreeMap::from([(signer.key_id().to_owned(), signer.public_key().clone())]);
    repo.targets.delegations = Some(Delegations::with_succinct_roles(keys, &succinct));
    for bin in succinct.roles() {
        repo.delegated
            .insert(bin, (Targets::new(far()), vec![signer.clone()]));
    }
    repo.publish();
    (repo, succinct)
}

#[test]
fn finds_target_in_its_succinct_hash_bin_fetching_only_that_bin() {
    let (mut repo, succinct) = succinct_repo(4, 90);
    let bin = succinct.role_for_target("models/binned.onnx");
    repo.add_delegated_target(&bin, "models/binned.onnx", b"binned");
    repo.bump_all();
    let mut client = Client::new(&repo);
    let mut updater = client.updater(&repo, now()).unwrap();
    let info = updater
        .get_target_info("models/binned.onnx")
        .unwrap()
        .unwrap();
    assert_eq!(info.role, bin);
    let (remote, _) = updater.into_parts();
    let bins: Vec<&String> = remote
        .fetched
        .iter()
        .filter(|f| f.contains("bin-"))
        .collect();
    assert_eq!(bins, vec![&format!("1.{bin}.json")]);
    assert!(client.store.files.contains_key(&bin));
}

#[test]
fn target_listed_in_another_hash_bin_is_not_found() {
    let (mut repo, succinct) = succinct_repo(2, 90);
    let right = succinct.role_for_target("models/binned.onnx");
    let wrong = succinct.roles().find(|b| *b != right).unwrap();
    repo.add_delegated_target(&wrong, "models/binned.onnx", b"binned");
    repo.bump_all();
    let mut client = Client::new(&repo);
    assert!(
        client
            .lookup(&repo, now(), "models/binned.onnx")
            .unwrap()
            .is_none()
    );
    // Succinct delegations are terminating: nothing else is searched after the bin.
    assert!(!client.store.files.contains_key(&wrong));
}

#[test]
fn rejects_hash_bin_signed_by_key_outside_succinct_roles() {
    let (mut repo, succinct) = succinct_repo(1, 90);
    let bin = succinct.role_for_target("models/binned.onnx");
    repo.add_delegated_target(&bin, "models/binned.onnx", b"binned");
    repo.delegated.get_mut(&bin).unwrap().1 = vec![key(91)];
    repo.bump_all();
    let err = Client::new(&repo)
        .lookup(&repo, now(), "models/binned.onnx")
        .unwrap_err();
    assert!(matches!(err, Error::ThresholdNotMet { .. }), "{err}");
}

#[test]
fn rejects_hash_bin_missing_from_snapshot() {
    let (mut repo, succinct) = succinct_repo(1, 90);
    let bin = succinct.role_for_target("models/binned.onnx");
    repo.delegated.remove(&bin);
    repo.bump_all();
    let err = Client::new(&repo)
        .lookup(&repo, now(), "models/binned.onnx")
        .unwrap_err();
    assert!(matches!(err, Error::MissingMeta { .. }), "{err}");
}
