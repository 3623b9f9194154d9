//! Signing director assignments: per device, the target each model slot should run.

use std::collections::BTreeMap;

use outpost_protocol::director::{Assignment, SlotTarget, sign_assignment};
use outpost_protocol::tuf::metadata::TargetFile;
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
