//! Signing director assignments: per device, the target each model slot should run.

use std::collections::BTreeMap;

use outpost_protocol::director::{Assignment, SlotTarget, sign_assignment};
use outpost_protocol::tuf::metadata::{Envelope, RoleMetadata, TargetFile};
use outpost_protocol::tuf::{SigningKey, UtcTime};

use super::ServerError;
use super::db::TargetRow;

/// Signs the assignment of `device` with `counter`: each slot (model → target path)
/// becomes the exact entry of that target in the image repository. Slots whose target
/// is no longer listed (revoked) are left out, since devices refuse an assignment that
/// names a target the repository does not list.
pub fn sign(
    key: &SigningKey,
    device: &str,
    counter: u64,
    slots: &BTreeMap<String, String>,
    targets: &BTreeMap<&str, &TargetRow>,
    expires: UtcTime,
) -> Result<Vec<u8>, ServerError> {
    let mut a = Assignment::new(device, counter, expires);
    for (model, path) in slots {
        let Some(row) = targets.get(path.as_str()) else {
            continue;
        };
        let file: TargetFile = serde_json::from_value(row.file.clone()).map_err(|e| {
            ServerError::Invalid(format!("stored target entry of {path} does not parse: {e}"))
        })?;
        a.targets.insert(
            model.clone(),
            SlotTarget {
                path: path.clone(),
                length: file.length,
                hashes: file.hashes,
                extra: BTreeMap::new(),
            },
        );
    }
    Ok(sign_assignment(&a, &[key])?)
}

/// A stored (server-signed) assignment document, parsed without verification.
pub fn parse(doc: &[u8]) -> Result<Assignment, ServerError> {
    let env = Envelope::from_bytes(
        Assignment::TYPE,
        doc,
        outpost_protocol::director::MAX_ASSIGNMENT_BYTES,
    )
    .map_err(|e| ServerError::Invalid(format!("stored assignment: {e}")))?;
    env.parse_signed()
        .map_err(|e| ServerError::Invalid(format!("stored assignment: {e}")))
}

/// Whether `current` should be renewed at `now`: it expires within `window_secs`.
pub fn due(current: &Assignment, now: UtcTime, window_secs: i64) -> bool {
    current.expires.unix() - now.unix() < window_secs
}

/// Re-signs `current` with `counter` and `expires`: the same slots, except those whose
/// target the image repository no longer lists with the same length and hashes (a
/// device would refuse the whole assignment for them), and `renews` naming the
/// operator's original assignment (protocol `director`, "Renewal").
pub fn renew(
    key: &SigningKey,
    current: &Assignment,
    counter: u64,
    targets: &BTreeMap<&str, &TargetRow>,
    expires: UtcTime,
) -> Result<Vec<u8>, ServerError> {
    let mut a = Assignment::new(&current.device_id, counter, expires);
    a.renews = Some(current.renews.unwrap_or(current.counter));
    for (model, slot) in &current.targets {
        let listed = targets
            .get(slot.path.as_str())
            .and_then(|row| serde_json::from_value::<TargetFile>(row.file.clone()).ok())
            .is_some_and(|f| f.length == slot.length && f.hashes == slot.hashes);
        if listed {
            a.targets.insert(model.clone(), slot.clone());
        }
    }
    Ok(sign_assignment(&a, &[key])?)
}
