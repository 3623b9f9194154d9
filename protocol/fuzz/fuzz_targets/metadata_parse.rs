//! Arbitrary bytes as every metadata role, through parsing and verification: must return
//! errors, never panic, and never accept a document not signed by the fixed keys.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use outpost_protocol::director::{self, Assignment};
use outpost_protocol::tuf::{
    Envelope, MetaFile, Root, Snapshot, Targets, Timestamp, TrustedSet, UtcTime, canonical,
};

struct Fixture {
    root: Vec<u8>,
    now: UtcTime,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let key = outpost_protocol::tuf::SigningKey::from_seed([1; 32]);
        let far = UtcTime::parse("2030-01-01T00:00:00Z").unwrap();
        let mut root = Root::new(far);
        for role in ["root", "timestamp", "snapshot", "targets", "director"] {
            root.add_key(role, key.public_key()).unwrap();
        }
        Fixture {
            root: Envelope::sign_document(&root, &[&key]).unwrap(),
            now: UtcTime::parse("2025-01-01T00:00:00Z").unwrap(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    // Generic parsing of each role type.
    if let Ok(env) = Envelope::from_bytes("fuzz", data, 1 << 20) {
        let _ = env.parse_signed::<Root>();
        let _ = env.parse_signed::<Timestamp>();
        let _ = env.parse_signed::<Snapshot>();
        let _ = env.parse_signed::<Targets>();
        let _ = env.parse_signed::<Assignment>();
        let _ = canonical::to_canonical_json(&env.signed);
    }
    // The workflow: the fuzz input offered as each role in turn.
    let _ = TrustedSet::new(data, f.now);
    let mut set = TrustedSet::new(&f.root, f.now).unwrap();
    assert!(set.update_root(data).is_err(), "unsigned root accepted");
    let _ = set.update_timestamp(data);
    let _ = set.update_snapshot(data, true);
    let _ = set.update_targets(data);
    let _ = set.update_delegated_targets(data, "role", "targets");
    let _ = MetaFile::new(1).verify_bytes("fuzz", data);
    // Director assignments against the fixed root, with an empty image repository.
    let root = set.root().clone();
    let mut lookup = |_: &str| Ok(None);
    let _ = director::verify_assignment(data, &root, &mut lookup, "dev", None, f.now);
});
