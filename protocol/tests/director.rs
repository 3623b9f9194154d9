//! Director assignment tests, named after the attack they stop, in good/bad pairs.

mod common;

use common::*;
use outpost_protocol::director::{
    Assignment, CounterState, DirectorError, SlotTarget, sign_assignment, verify_assignment,
};
use outpost_protocol::tuf::{Result, SigningKey, TargetInfo, Updater, UtcTime, Verified};

struct Device {
    client: Client,
    repo: Repo,
}

impl Device {
    fn new() -> Self {
        let mut repo = Repo::new();
        repo.add_target("models/b.onnx", b"model b v1");
        repo.bump_all();
        Device {
            client: Client::new(&repo),
            repo,
        }
    }

    fn image_target(&mut self, path: &str) -> TargetInfo {
        self.client
            .lookup(&self.repo, now(), path)
            .unwrap()
            .unwrap()
            .into_inner()
    }

    fn assignment(&mut self, counter: u64) -> Assignment {
        let mut a = Assignment::new("dev-1", counter, far());
        let info = self.image_target("models/a.onnx");
        a.targets
            .insert("digits".into(), SlotTarget::from_target(&info));
        a
    }

    fn verify_signed_by(
        &mut self,
        a: &Assignment,
        keys: &[&SigningKey],
        last: Option<&CounterState>,
        at: UtcTime,
    ) -> std::result::Result<outpost_protocol::director::AcceptedAssignment, DirectorError> {
        let bytes = sign_assignment(a, keys).unwrap();
        self.verify_bytes(&bytes, last, at)
    }

    fn verify_bytes(
        &mut self,
        bytes: &[u8],
        last: Option<&CounterState>,
        at: UtcTime,
    ) -> std::result::Result<outpost_protocol::director::AcceptedAssignment, DirectorError> {
        let mut updater: Updater<_, _> = self.client.updater(&self.repo, at).unwrap();
        updater.refresh().unwrap();
        let root = updater.trusted_set().root().clone();
        let mut lookup =
            |p: &str| -> Result<Option<Verified<TargetInfo>>> { updater.get_target_info(p) };
        verify_assignment(bytes, &root, &mut lookup, "dev-1", last, at)
    }

    fn verify(
        &mut self,
        a: &Assignment,
    ) -> std::result::Result<outpost_protocol::director::AcceptedAssignment, DirectorError> {
        self.verify_signed_by(a, &[&key(5)], None, now())
    }
}

#[test]
fn accepts_assignment_matching_image_repository() {
    let mut d = Device::new();
    let a = d.assignment(1);
    let accepted = d.verify(&a).unwrap();
    assert_eq!(accepted.assignment.targets["digits"].path, "models/a.onnx");
    assert_eq!(accepted.state.counter, 1);
    assert!(!accepted.redelivered);
}

#[test]
fn rejects_director_hash_mismatch() {
    let mut d = Device::new();
    let mut a = d.assignment(1);
    let other = d.image_target("models/b.onnx");
    a.targets.get_mut("digits").unwrap().hashes = other.file.hashes.clone();
    let err = d.verify(&a).unwrap_err();
    assert!(
        matches!(err, DirectorError::HashMismatch { ref slot, ref algorithm, .. } if slot == "digits" && algorithm == "sha256"),
        "{err}"
    );
}

#[test]
fn rejects_director_length_mismatch() {
    let mut d = Device::new();
    let mut a = d.assignment(1);
    a.targets.get_mut("digits").unwrap().length += 1;
    let err = d.verify(&a).unwrap_err();
    assert!(
        matches!(
            err,
            DirectorError::LengthMismatch {
                director: 11,
                image: 10,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn rejects_director_hashes_without_common_algorithm() {
    let mut d = Device::new();
    let mut a = d.assignment(1);
    let slot = a.targets.get_mut("digits").unwrap();
    let h = slot.hashes.remove("sha256").unwrap();
    slot.hashes.insert("sha512".into(), h.repeat(2));
    let err = d.verify(&a).unwrap_err();
    assert!(matches!(err, DirectorError::NoCommonHash { .. }), "{err}");
}

#[test]
fn rejects_assignment_for_other_device() {
    let mut d = Device::new();
    let mut a = d.assignment(1);
    a.device_id = "dev-2".into();
    let err = d.verify(&a).unwrap_err();
    assert!(
        matches!(err, DirectorError::WrongDevice { ref found, .. } if found == "dev-2"),
        "{err}"
    );
}

#[test]
fn rejects_replayed_older_counter() {
    let mut d = Device::new();
    let (a5, a6) = (d.assignment(5), d.assignment(6));
    let first = d.verify(&a5).unwrap();
    // Newer counter: accepted.
    let second = d
        .verify_signed_by(&a6, &[&key(5)], Some(&first.state), now())
        .unwrap();
    // Older one replayed: rejected.
    let err = d
        .verify_signed_by(&a5, &[&key(5)], Some(&second.state), now())
        .unwrap_err();
    assert!(
        matches!(
            err,
            DirectorError::Replayed {
                last: 6,
                offered: 5
            }
        ),
        "{err}"
    );
}

#[test]
fn accepts_redelivery_of_same_assignment_but_not_reused_counter() {
    let mut d = Device::new();
    let a = d.assignment(3);
    let bytes = sign_assignment(&a, &[&key(5)]).unwrap();
    let first = d.verify_bytes(&bytes, None, now()).unwrap();
    let again = d.verify_bytes(&bytes, Some(&first.state), now()).unwrap();
    assert!(again.redelivered);

    let mut other = a.clone();
    other.targets.insert(
        "second-slot".into(),
        SlotTarget::from_target(&d.image_target("models/b.onnx")),
    );
    let err = d
        .verify_signed_by(&other, &[&key(5)], Some(&first.state), now())
        .unwrap_err();
    assert!(
        matches!(err, DirectorError::CounterReused { counter: 3 }),
        "{err}"
    );
}

#[test]
fn renewal_of_accepted_targets_is_a_no_op_but_not_when_the_original_was_missed() {
    let mut d = Device::new();
    let original = d.assignment(4);
    let first = d
        .verify_signed_by(&original, &[&key(5)], None, now())
        .unwrap();
    assert!(!first.renewal);
    let mut renewed = original.clone();
    renewed.counter = 5;
    renewed.renews = Some(4);
    renewed.expires = t("2031-01-01T00:00:00Z");
    let r = d
        .verify_signed_by(&renewed, &[&key(5)], Some(&first.state), now())
        .unwrap();
    assert!(r.renewal && !r.redelivered);
    assert_eq!(r.state.counter, 5);
    // A renewal of a renewal still names the original; a device that accepted the
    // first renewal (5 >= 4) skips it too.
    let mut again = renewed.clone();
    again.counter = 6;
    let r2 = d
        .verify_signed_by(&again, &[&key(5)], Some(&r.state), now())
        .unwrap();
    assert!(r2.renewal);
    // A device whose last accepted assignment is older than the original must act.
    let two = d.assignment(2);
    let older = d.verify_signed_by(&two, &[&key(5)], None, now()).unwrap();
    let missed = d
        .verify_signed_by(&renewed, &[&key(5)], Some(&older.state), now())
        .unwrap();
    assert!(!missed.renewal);
    // So must a device with no assignment, and `renews` not below the counter means
    // nothing.
    assert!(!d.verify(&renewed).unwrap().renewal);
    let mut bogus = d.assignment(9);
    bogus.renews = Some(9);
    let b = d
        .verify_signed_by(&bogus, &[&key(5)], Some(&r2.state), now())
        .unwrap();
    assert!(!b.renewal);
}

#[test]
fn rejects_expired_assignment() {
    let mut d = Device::new();
    let mut a = d.assignment(1);
    a.expires = t("2025-05-01T00:00:00Z");
    let err = d.verify(&a).unwrap_err();
    assert!(matches!(err, DirectorError::Expired { .. }), "{err}");
    d.verify_signed_by(&a, &[&key(5)], None, t("2025-04-01T00:00:00Z"))
        .unwrap();
}

#[test]
fn rejects_target_not_in_image_repository() {
    let mut d = Device::new();
    let mut a = d.assignment(1);
    a.targets.get_mut("digits").unwrap().path = "models/unsigned.onnx".into();
    let err = d.verify(&a).unwrap_err();
    assert!(
        matches!(err, DirectorError::TargetNotInImageRepo { ref path, .. } if path == "models/unsigned.onnx"),
        "{err}"
    );
}

#[test]
fn rejects_revoked_release_removed_from_targets() {
    let mut d = Device::new();
    let a = d.assignment(1);
    d.verify(&a).unwrap();
    d.repo.targets.targets.remove("models/a.onnx");
    d.repo.bump_all();
    let err = d.verify(&a).unwrap_err();
    assert!(
        matches!(err, DirectorError::TargetNotInImageRepo { .. }),
        "{err}"
    );
}

#[test]
fn rejects_director_signature_by_non_director_key() {
    let mut d = Device::new();
    let a = d.assignment(1);
    // Signed by the targets key, which root does not authorize for `director`.
    let err = d.verify_signed_by(&a, &[&key(4)], None, now()).unwrap_err();
    assert!(matches!(err, DirectorError::Metadata(_)), "{err}");
}

#[test]
fn rejects_tampered_assignment() {
    let mut d = Device::new();
    let a = d.assignment(1);
    let bytes = sign_assignment(&a, &[&key(5)]).unwrap();
    let tampered = String::from_utf8(bytes)
        .unwrap()
        .replace("\"dev-1\"", "\"dev-9\"");
    let err = d
        .verify_bytes(tampered.as_bytes(), None, now())
        .unwrap_err();
    assert!(matches!(err, DirectorError::Metadata(_)), "{err}");
}
