//! Director assignments are renewed before they expire: the same targets re-signed with
//! the next counter and `renews` naming the operator's original (time passed in).

mod server_common;

use outpost_protocol::director::{Assignment, MAX_ASSIGNMENT_BYTES};
use outpost_protocol::tuf::Envelope;
use outpost_protocol::tuf::metadata::RoleMetadata;
use outpost_server::server::client::push_release;
use server_common::*;

const DAY: i64 = 86_400;

fn parse(doc: &[u8]) -> Assignment {
    Envelope::from_bytes(Assignment::TYPE, doc, MAX_ASSIGNMENT_BYTES)
        .unwrap()
        .parse_signed()
        .unwrap()
}

#[test]
fn assignments_are_renewed_before_they_expire_with_the_same_targets() {
    let f = Fixture::start(false);
    sign_fixture(&f.repo, "cnn_a.onnx", "digits", "1.0");
    push_release(&f.admin, &f.repo, "digits", "1.0").unwrap();
    f.add_device("d1", serde_json::json!({}));
    f.add_device("d2", serde_json::json!({}));
    let t0 = now();
    let r = f
        .admin
        .post(
            "/api/v1/assignments",
            &serde_json::json!({"model": "digits", "version": "1.0", "devices": ["d1"]}),
        )
        .unwrap();
    let counter = r["assigned"][0]["counter"].as_u64().unwrap();
    let core = &f.server.core;
    let current = core.current_assignments().unwrap();
    assert_eq!(current.len(), 1, "d2 has no assignment");
    let original = parse(&current[0].payload);
    assert_eq!(original.renews, None);

    // 30-day assignments are renewed within 7 days of their expiry, not before.
    assert!(
        core.renew_assignments(t0.plus_seconds(22 * DAY))
            .unwrap()
            .is_empty()
    );
    let at = t0.plus_seconds(24 * DAY);
    let out = core.renew_assignments(at).unwrap();
    assert_eq!(out.len(), 1);
    assert!(out[0].retain);
    assert_eq!(out[0].topic, "outpost/v1/d/d1/assignment");
    let renewed = parse(&out[0].payload);
    assert_eq!(renewed.counter, counter + 1);
    assert_eq!(renewed.renews, Some(counter));
    assert_eq!(renewed.expires, at.plus_seconds(30 * DAY));
    assert_eq!(renewed.targets, original.targets);
    assert_eq!(renewed.device_id, "d1");
    // Fresh again: nothing to do the next day.
    assert!(
        core.renew_assignments(t0.plus_seconds(25 * DAY))
            .unwrap()
            .is_empty()
    );

    // A renewal of the renewal still names the operator's original.
    let out = core.renew_assignments(at.plus_seconds(24 * DAY)).unwrap();
    let again = parse(&out[0].payload);
    assert_eq!(again.counter, counter + 2);
    assert_eq!(again.renews, Some(counter));
    assert_eq!(again.targets, original.targets);

    // The server's view and the document republished after a broker restart follow.
    let d1 = f.admin.get("/api/v1/devices/d1").unwrap();
    assert_eq!(d1["assignment_counter"].as_u64(), Some(counter + 2));
    assert_eq!(
        core.current_assignments().unwrap()[0].payload,
        out[0].payload
    );
    let audit = f.admin.get("/api/v1/audit?limit=5").unwrap();
    assert!(audit.to_string().contains("assign.renew"), "{audit}");

    // An operator's new assignment is an original again.
    f.admin
        .post(
            "/api/v1/assignments",
            &serde_json::json!({"model": "digits", "version": "1.0", "devices": ["d1"]}),
        )
        .unwrap();
    let fresh = parse(&core.current_assignments().unwrap()[0].payload);
    assert_eq!((fresh.counter, fresh.renews), (counter + 3, None));
}
