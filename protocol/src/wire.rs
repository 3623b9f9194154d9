//! Wire messages between agents and the fleet server over MQTT (version 1).
//!
//! Topics, per device `D` (the device's MQTT username and client id are `D`):
//!
//! | topic | direction | QoS | retained | payload |
//! |---|---|---|---|---|
//! | `outpost/v1/d/D/assignment` | server → device | 1 | yes | signed director assignment ([`crate::director`]) |
//! | `outpost/v1/d/D/req` | device → server | 1 | no | [`Request`] (JSON) |
//! | `outpost/v1/d/D/resp` | server → device | 1 | no | [`Response`] frame |
//! | `outpost/v1/d/D/status` | device → server | 1 | yes | [`StatusReport`] (JSON) |
//! | `outpost/v1/d/D/telemetry` | device → server | 1 | no | [`TelemetryBatch`] (JSON) |
//! | `outpost/v1/d/D/ack` | server → device | 1 | no | [`TelemetryAck`] (JSON) |
//!
//! A device may publish only to its own `req`, `status` and `telemetry` topics and
//! subscribe only to its own `assignment`, `resp` and `ack` topics ([`device_acl`]).
//!
//! Transfers are **pulled**: the device asks for metadata by role and version and for
//! artifact bytes by `(artifact, offset, len)`, keeps a small window of requests in
//! flight, and persists what it received; after a disconnect or a restart it asks for
//! the missing ranges only. The server is stateless per request. Nothing received is
//! trusted before verification: metadata by TUF, a full model by the signed length and
//! hashes, a delta by the signed hashes of what it reconstructs.
//!
//! | request ([`RequestBody`]) | answer body | answer header |
//! |---|---|---|
//! | `metadata {role, version}` | the whole file (at most one message: agents from before ranges) | — |
//! | `metadata {role, version, offset, len, accept_zstd}` | `[offset, offset + len)` of the file as encoded for the device | `total` (encoded length), `offset`, `encoding` (`identity`/`zstd`), `etag` (sha256 of the encoded file) |
//! | `artifacts {target, sha256, bases}` | JSON [`ArtifactList`] | — |
//! | `chunk {artifact, offset, len}` | `[offset, offset + len)` of the artifact | `total`, `offset` |
//!
//! Metadata has no size cap of its own: a device fetches it in ranges of at most
//! [`CHUNK_LEN`] until `total`, zstd-compressed when it says it decodes zstd and that is
//! smaller (the server compresses once per content and caches, so every range of one
//! version comes from the same bytes). Ranges are stitched under one `etag` only; a new
//! etag (a release published between two requests) starts the fetch again from byte 0.
//! The device refuses a `total` over the role's TUF cap before asking for more, and
//! decodes into at most that cap ([`metadata`]). A server from before ranges answers a
//! ranged request with the whole file and no `total`, which the device takes as is.
//!
//! Every decoder here caps sizes before allocating.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod metadata;

/// Protocol version in every topic.
pub const VERSION: &str = "v1";
/// Largest MQTT payload either side sends or accepts (a chunk plus its header).
pub const MAX_PAYLOAD: usize = 256 * 1024;
/// Default and largest artifact chunk length.
pub const CHUNK_LEN: u32 = 64 * 1024;
/// Largest JSON header of a [`Response`] frame.
pub const MAX_HEADER: usize = 16 * 1024;

/// Errors decoding wire messages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Larger than allowed.
    #[error("{what} is {len} bytes, over the {max}-byte cap")]
    TooLarge {
        /// What was being decoded.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// Not a valid message.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// Topic names of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTopics {
    /// Retained director assignment.
    pub assignment: String,
    /// Requests from the device.
    pub req: String,
    /// Responses to the device.
    pub resp: String,
    /// Retained status of the device.
    pub status: String,
    /// Telemetry batches from the device.
    pub telemetry: String,
    /// Telemetry acknowledgements to the device.
    pub ack: String,
}

/// Whether `id` is a valid device id: 1 to 64 characters of `[A-Za-z0-9._-]`, not
/// starting with `.` (it is used in topics, file names and MQTT usernames).
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl DeviceTopics {
    /// Topics of device `id` (checked with [`valid_device_id`]).
    pub fn new(id: &str) -> Result<DeviceTopics, WireError> {
        if !valid_device_id(id) {
            return Err(WireError::Malformed {
                what: "device id",
                reason: format!("{:?} is not 1-64 characters of [A-Za-z0-9._-]", id),
            });
        }
        let t = |leaf: &str| format!("outpost/{VERSION}/d/{id}/{leaf}");
        Ok(DeviceTopics {
            assignment: t("assignment"),
            req: t("req"),
            resp: t("resp"),
            status: t("status"),
            telemetry: t("telemetry"),
            ack: t("ack"),
        })
    }
}

/// What the server subscribes to (one filter per device-to-server topic). With several
/// server replicas, prefix each with `$share/outpost/`.
pub const SERVER_FILTERS: [&str; 3] = [
    "outpost/v1/d/+/req",
    "outpost/v1/d/+/status",
    "outpost/v1/d/+/telemetry",
];

/// The device id in a device topic, and its leaf (`req`, `status`, ...).
pub fn parse_device_topic(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix("outpost/v1/d/")?;
    let (id, leaf) = rest.split_once('/')?;
    (valid_device_id(id) && !leaf.contains('/')).then_some((id, leaf))
}

/// Access a device has to a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Subscribe (read).
    Read,
    /// Publish (write).
    Write,
}

/// The device ACL: may device `id` access `topic` (an exact topic or a subscription
/// filter) this way? Wildcards are allowed only where they cannot reach another
/// device's topics (`+`/`#` are refused outright).
pub fn device_acl(id: &str, topic: &str, access: Access) -> bool {
    if topic.contains('+') || topic.contains('#') {
        return false;
    }
    match parse_device_topic(topic) {
        Some((owner, leaf)) if owner == id => match access {
            Access::Read => matches!(leaf, "assignment" | "resp" | "ack"),
            Access::Write => matches!(leaf, "req" | "status" | "telemetry"),
        },
        _ => false,
    }
}

/// A device's request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the device, echoed in the response.
    pub id: u64,
    /// What is asked.
    #[serde(flatten)]
    pub body: RequestBody,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RequestBody {
    /// TUF metadata of the image repository: `ROLE.json`, or `VERSION.ROLE.json`.
    ///
    /// Without `len`, the whole file in one response (refused when it does not fit a
    /// message). With `len`, the range `[offset, offset + len)` of the file as encoded
    /// for this device (zstd when `accept_zstd` and smaller), with `total`, `offset`,
    /// `encoding` and `etag` in the response header ([`metadata`]).
    Metadata {
        /// Role name (`root`, `timestamp`, `snapshot`, `targets`, or a delegated role).
        role: String,
        /// Version, for root chains and consistent snapshots.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
        /// First byte of the encoded file (ranged requests; 0 when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        /// Range length, 1 to [`CHUNK_LEN`]; present = a ranged request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        len: Option<u32>,
        /// The device decodes zstd ([`Encoding::Zstd`]); only meaningful with `len`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        accept_zstd: bool,
    },
    /// The artifacts that reconstruct a target: the full file, its zstd-compressed
    /// form if the device accepts it, and any deltas from the bases the device has.
    Artifacts {
        /// Target path (as in targets metadata and the assignment).
        target: String,
        /// sha256 (hex) of the target.
        sha256: String,
        /// sha256 (hex) of models the device holds and could use as delta bases.
        #[serde(default)]
        bases: Vec<String>,
        /// The device decodes [`ArtifactKind::FullZstd`]. Absent (older agents) = the
        /// server lists only full files and deltas.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        accept_full_zstd: bool,
    },
    /// A byte range of an artifact.
    Chunk {
        /// Artifact id (sha256 hex of the artifact's bytes).
        artifact: String,
        /// First byte.
        offset: u64,
        /// Length, at most [`CHUNK_LEN`].
        len: u32,
    },
}

impl Request {
    /// JSON encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("requests serialize")
    }

    /// Decodes a request (server side), capping its size.
    pub fn from_bytes(bytes: &[u8]) -> Result<Request, WireError> {
        if bytes.len() > MAX_HEADER {
            return Err(WireError::TooLarge {
                what: "request",
                len: bytes.len(),
                max: MAX_HEADER,
            });
        }
        let r: Request = serde_json::from_slice(bytes).map_err(|e| WireError::Malformed {
            what: "request",
            reason: e.to_string(),
        })?;
        let bad = |reason: String| {
            Err(WireError::Malformed {
                what: "request",
                reason,
            })
        };
        match &r.body {
            RequestBody::Chunk { len, .. } if *len == 0 || *len > CHUNK_LEN => {
                return bad(format!("chunk length {len} not in 1..={CHUNK_LEN}"));
            }
            RequestBody::Metadata { len: Some(len), .. } if *len == 0 || *len > CHUNK_LEN => {
                return bad(format!(
                    "metadata range length {len} not in 1..={CHUNK_LEN}"
                ));
            }
            RequestBody::Metadata {
                offset: Some(_),
                len: None,
                ..
            } => return bad("metadata offset without a range length".into()),
            _ => {}
        }
        Ok(r)
    }
}

/// Outcome of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Status {
    /// The body holds the answer.
    Ok,
    /// The server does not have it (ends a root-version probe).
    NotFound,
    /// The request was refused or failed; `message` says why.
    Error,
}

/// Header of a response frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseHeader {
    /// The request id.
    pub id: u64,
    /// Outcome.
    pub status: Status,
    /// Human-readable reason for `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// For chunks: the artifact's total length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// For chunks: the offset of the body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// For metadata ranges: how the file whose range this is was encoded (absent =
    /// [`Encoding::Identity`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
    /// For metadata ranges: sha256 (hex) of the whole encoded file. A device stitches
    /// ranges of one etag only and starts again when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// How a metadata body is encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Encoding {
    /// The file's own bytes.
    Identity,
    /// One zstd frame with its content size ([`metadata::compress`]).
    Zstd,
}

/// A response: header plus raw body (metadata bytes, chunk bytes, or JSON
/// [`ArtifactList`]). Framed as a 4-byte big-endian header length, the JSON header, then
/// the body, so chunks travel without base64.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// The header.
    pub header: ResponseHeader,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A successful response.
    pub fn ok(id: u64, body: Vec<u8>) -> Response {
        Response {
            header: ResponseHeader {
                id,
                status: Status::Ok,
                message: None,
                total: None,
                offset: None,
                encoding: None,
                etag: None,
            },
            body,
        }
    }

    /// A failed response.
    pub fn fail(id: u64, status: Status, message: impl Into<String>) -> Response {
        Response {
            header: ResponseHeader {
                id,
                status,
                message: Some(message.into()),
                total: None,
                offset: None,
                encoding: None,
                etag: None,
            },
            body: Vec::new(),
        }
    }

    /// Frames the response.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.header).expect("headers serialize");
        let mut out = Vec::with_capacity(4 + header.len() + self.body.len());
        out.extend_from_slice(&(header.len() as u32).to_be_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.body);
        out
    }

    /// Decodes a frame (device side), capping sizes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Response, WireError> {
        if bytes.len() > MAX_PAYLOAD {
            return Err(WireError::TooLarge {
                what: "response",
                len: bytes.len(),
                max: MAX_PAYLOAD,
            });
        }
        let malformed = |reason: String| WireError::Malformed {
            what: "response",
            reason,
        };
        let len_bytes: [u8; 4] = bytes
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| malformed("shorter than its length prefix".into()))?;
        let hlen = u32::from_be_bytes(len_bytes) as usize;
        if hlen > MAX_HEADER || hlen > bytes.len() - 4 {
            return Err(malformed(format!(
                "header length {hlen} exceeds the frame or the cap"
            )));
        }
        let header: ResponseHeader =
            serde_json::from_slice(&bytes[4..4 + hlen]).map_err(|e| malformed(e.to_string()))?;
        Ok(Response {
            header,
            body: bytes[4 + hlen..].to_vec(),
        })
    }
}

/// How an artifact reconstructs its target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ArtifactKind {
    /// The target file itself.
    Full,
    /// A delta ([`crate::delta`]) to apply to the base with this sha256.
    Delta {
        /// sha256 (hex) of the base model.
        base: String,
    },
    /// The target file as one zstd frame ([`crate::delta::compress_full`]; decode with
    /// [`crate::delta::decompress_full`]). Offered only to devices whose
    /// [`RequestBody::Artifacts`] says `accept_full_zstd`: older agents cannot decode
    /// the kind and would refuse the whole list.
    FullZstd,
}

/// One artifact the server offers for a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Artifact id: sha256 (hex) of its bytes. Used for chunk requests and resume; not
    /// trusted for anything else (the reconstructed target is checked against the
    /// signed hashes).
    pub id: String,
    /// Length in bytes.
    pub length: u64,
    /// Full file, compressed full file or delta.
    #[serde(flatten)]
    pub kind: ArtifactKind,
}

/// Body of the response to [`RequestBody::Artifacts`], smallest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactList {
    /// The artifacts.
    pub artifacts: Vec<Artifact>,
}

/// Where a device's update stands, as reported in [`StatusReport::update`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateProgress {
    /// Model slot.
    pub slot: String,
    /// Target path being installed.
    pub target: String,
    /// State of the update machine (its persisted name, e.g. `fetching`).
    pub state: String,
    /// Bytes received of the artifact being fetched.
    #[serde(default)]
    pub bytes_done: u64,
    /// Length of that artifact.
    #[serde(default)]
    pub bytes_total: u64,
    /// `full`, `full_zstd` or `delta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
}

/// A typed failure reason a device reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureReport {
    /// `signature`, `hash`, `gate`, `budget`, `transfer`, `delta`, `disk`, `assignment`...
    pub kind: String,
    /// Target concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Human-readable detail.
    pub message: String,
}

/// One model slot on a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotStatus {
    /// Active target path.
    pub active: Option<String>,
    /// sha256 of the active model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_sha256: Option<String>,
    /// Release version string of the active model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Previous target path (kept for revert).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// Execution path chosen by the gate and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_path: Option<String>,
}

/// A device's retained status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Device id.
    pub device_id: String,
    /// Agent version.
    pub agent_version: String,
    /// Increases with every report of this device (orders retained updates).
    pub seq: u64,
    /// Model slots.
    #[serde(default)]
    pub models: BTreeMap<String, SlotStatus>,
    /// Counter of the last accepted director assignment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment_counter: Option<u64>,
    /// Update in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateProgress>,
    /// Last failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<FailureReport>,
    /// Bytes received per artifact kind since the agent's data dir was created
    /// (`full`, `full_zstd`, `delta`, `metadata`).
    #[serde(default)]
    pub bytes_received: BTreeMap<String, u64>,
}

/// One outbox record in a telemetry batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryRecord {
    /// Per-device sequence number.
    pub seq: u64,
    /// `event`, `label`, `window`, `sample`.
    pub class: String,
    /// Age in milliseconds when the batch was built (monotonic clock).
    pub age_ms: u64,
    /// The record (JSON written by the agent's monitor or update machine).
    pub payload: serde_json::Value,
}

/// Largest number of [`TelemetryBatch::evicted`] entries in one batch. A device with more
/// evictions pending ends the batch's range before the first one that does not fit.
pub const MAX_EVICTED: usize = 1024;

/// A batch of outbox records. Every record the device still held in
/// `(after_seq, covers_to]` is in `records`; sequence numbers missing from that range
/// were evicted (and listed in `evicted` by agents that send it).
///
/// Drop accounting is exact with `evicted`: the server counts an evicted sequence as
/// dropped only when it never stored that record (a batch it stored may be evicted on
/// the device before the ack arrives), plus the `rejected` records, which never got a
/// sequence number. `drops` stays for servers that predate `evicted`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryBatch {
    /// Device id.
    pub device_id: String,
    /// The batch covers sequence numbers above this one...
    pub after_seq: u64,
    /// ...up to and including this one.
    pub covers_to: u64,
    /// Records in sequence order.
    pub records: Vec<TelemetryRecord>,
    /// Cumulative drop counters by class: `[records, bytes]` (evicted plus rejected).
    #[serde(default)]
    pub drops: BTreeMap<String, [u64; 2]>,
    /// Records evicted on the device with a sequence in `(after_seq, covers_to]`, by
    /// class: `[seq, bytes]` by increasing `seq`, at most [`MAX_EVICTED`] in all. `None`
    /// from agents that only send `drops`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evicted: Option<BTreeMap<String, Vec<[u64; 2]>>>,
    /// Cumulative records refused when pushed (no room even after evictions; they never
    /// got a sequence number), by class: `[records, bytes]`. `None` from agents that only
    /// send `drops`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<BTreeMap<String, [u64; 2]>>,
}

impl TelemetryBatch {
    /// Decodes a batch (server side), capping its size and checking sequence order.
    pub fn from_bytes(bytes: &[u8]) -> Result<TelemetryBatch, WireError> {
        if bytes.len() > MAX_PAYLOAD {
            return Err(WireError::TooLarge {
                what: "telemetry batch",
                len: bytes.len(),
                max: MAX_PAYLOAD,
            });
        }
        let b: TelemetryBatch =
            serde_json::from_slice(bytes).map_err(|e| WireError::Malformed {
                what: "telemetry batch",
                reason: e.to_string(),
            })?;
        let in_range = b
            .records
            .iter()
            .all(|r| r.seq > b.after_seq && r.seq <= b.covers_to);
        let ordered = b.records.windows(2).all(|w| w[0].seq < w[1].seq);
        if b.covers_to < b.after_seq || !in_range || !ordered {
            return Err(WireError::Malformed {
                what: "telemetry batch",
                reason: "records out of order or outside (after_seq, covers_to]".into(),
            });
        }
        if let Some(evicted) = &b.evicted {
            let mut seqs: Vec<u64> = evicted.values().flatten().map(|e| e[0]).collect();
            if seqs.len() > MAX_EVICTED {
                return Err(WireError::Malformed {
                    what: "telemetry batch",
                    reason: format!("{} evicted entries, over {MAX_EVICTED}", seqs.len()),
                });
            }
            seqs.sort_unstable();
            let distinct = seqs.windows(2).all(|w| w[0] < w[1]);
            let valid = seqs.iter().all(|s| {
                *s > b.after_seq
                    && *s <= b.covers_to
                    && b.records.binary_search_by_key(s, |r| r.seq).is_err()
            });
            if !distinct || !valid {
                return Err(WireError::Malformed {
                    what: "telemetry batch",
                    reason: "evicted sequences repeated, outside (after_seq, covers_to] \
                             or also among the records"
                        .into(),
                });
            }
        }
        Ok(b)
    }
}

/// The server's acknowledgement: every record up to `acked` is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelemetryAck {
    /// Highest contiguous sequence number stored for this device.
    pub acked: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_acl_confines_a_device_to_its_own_topics() {
        let t = DeviceTopics::new("dev-1").unwrap();
        assert!(device_acl("dev-1", &t.assignment, Access::Read));
        assert!(device_acl("dev-1", &t.resp, Access::Read));
        assert!(device_acl("dev-1", &t.req, Access::Write));
        assert!(device_acl("dev-1", &t.telemetry, Access::Write));
        // Its own topics the wrong way round.
        assert!(!device_acl("dev-1", &t.assignment, Access::Write));
        assert!(!device_acl("dev-1", &t.telemetry, Access::Read));
        // Another device's topics.
        let other = DeviceTopics::new("dev-2").unwrap();
        assert!(!device_acl("dev-1", &other.assignment, Access::Read));
        assert!(!device_acl("dev-1", &other.telemetry, Access::Write));
        // Wildcards that could reach others, and look-alike prefixes.
        assert!(!device_acl(
            "dev-1",
            "outpost/v1/d/+/assignment",
            Access::Read
        ));
        assert!(!device_acl("dev-1", "outpost/v1/d/dev-1/#", Access::Read));
        assert!(!device_acl(
            "dev-1",
            "outpost/v1/d/dev-10/req",
            Access::Write
        ));
        assert!(!device_acl(
            "dev-1",
            "outpost/v1/d/dev-1/req/x",
            Access::Write
        ));
    }

    #[test]
    fn artifacts_request_from_an_older_agent_does_not_accept_compressed_full() {
        // What agents before compressed-full send: no `accept_full_zstd`.
        let old = br#"{"id":3,"kind":"artifacts","target":"m/1.onnx","sha256":"ab","bases":[]}"#;
        let r = Request::from_bytes(old).unwrap();
        assert!(matches!(
            r.body,
            RequestBody::Artifacts {
                accept_full_zstd: false,
                ..
            }
        ));
        // And a new agent's request that does not accept it reads the same to old servers.
        let text = String::from_utf8(r.to_bytes()).unwrap();
        assert!(!text.contains("accept_full_zstd"), "{text}");
        let new = Request {
            id: 4,
            body: RequestBody::Artifacts {
                target: "m/1.onnx".into(),
                sha256: "ab".into(),
                bases: vec!["cd".into()],
                accept_full_zstd: true,
            },
        };
        assert_eq!(Request::from_bytes(&new.to_bytes()).unwrap(), new);
    }

    #[test]
    fn artifact_kinds_round_trip_on_the_wire() {
        let list = ArtifactList {
            artifacts: vec![
                Artifact {
                    id: "d1".into(),
                    length: 10,
                    kind: ArtifactKind::Delta { base: "b0".into() },
                },
                Artifact {
                    id: "z1".into(),
                    length: 90,
                    kind: ArtifactKind::FullZstd,
                },
                Artifact {
                    id: "f1".into(),
                    length: 100,
                    kind: ArtifactKind::Full,
                },
            ],
        };
        let text = serde_json::to_string(&list).unwrap();
        assert!(text.contains(r#""kind":"full_zstd""#), "{text}");
        assert_eq!(serde_json::from_str::<ArtifactList>(&text).unwrap(), list);
        // The full and delta forms are unchanged, so older agents still read them.
        assert!(
            text.contains(r#"{"id":"f1","length":100,"kind":"full"}"#),
            "{text}"
        );
        assert!(
            text.contains(r#"{"id":"d1","length":10,"kind":"delta","base":"b0"}"#),
            "{text}"
        );
    }

    #[test]
    fn rejects_device_ids_that_could_escape_topics_or_paths() {
        for bad in [
            "",
            ".hidden",
            "a/b",
            "a+b",
            "a#",
            "x".repeat(65).as_str(),
            "é",
        ] {
            assert!(DeviceTopics::new(bad).is_err(), "{bad:?}");
        }
        assert!(DeviceTopics::new("Pi4_kitchen-01.v2").is_ok());
    }

    #[test]
    fn response_frames_round_trip_and_reject_lying_lengths() {
        let mut r = Response::ok(7, vec![1, 2, 3, 255]);
        r.header.total = Some(1000);
        r.header.offset = Some(996);
        let bytes = r.to_bytes();
        assert_eq!(Response::from_bytes(&bytes).unwrap(), r);
        let mut lying = bytes.clone();
        lying[..4].copy_from_slice(&(bytes.len() as u32).to_be_bytes());
        assert!(Response::from_bytes(&lying).is_err());
        assert!(Response::from_bytes(&bytes[..3]).is_err());
        assert!(Response::from_bytes(&vec![0u8; MAX_PAYLOAD + 1]).is_err());
    }

    #[test]
    fn requests_round_trip_and_chunk_lengths_are_capped() {
        let r = Request {
            id: 1,
            body: RequestBody::Chunk {
                artifact: "ab".into(),
                offset: 10,
                len: CHUNK_LEN,
            },
        };
        assert_eq!(Request::from_bytes(&r.to_bytes()).unwrap(), r);
        let too_big = br#"{"id":1,"kind":"chunk","artifact":"ab","offset":0,"len":65537}"#;
        assert!(Request::from_bytes(too_big).is_err());
        let meta = br#"{"id":2,"kind":"metadata","role":"root","version":3}"#;
        assert_eq!(
            Request::from_bytes(meta).unwrap().body,
            RequestBody::Metadata {
                role: "root".into(),
                version: Some(3),
                offset: None,
                len: None,
                accept_zstd: false,
            }
        );
    }

    #[test]
    fn telemetry_batches_must_be_ordered_within_their_range() {
        let rec = |seq| TelemetryRecord {
            seq,
            class: "window".into(),
            age_ms: 5,
            payload: serde_json::json!({"n": seq}),
        };
        let mut b = TelemetryBatch {
            device_id: "d".into(),
            after_seq: 10,
            covers_to: 14,
            records: vec![rec(11), rec(13)],
            drops: BTreeMap::from([("sample".to_owned(), [2, 300])]),
            evicted: None,
            rejected: None,
        };
        let ok = serde_json::to_vec(&b).unwrap();
        assert_eq!(TelemetryBatch::from_bytes(&ok).unwrap(), b);
        b.records = vec![rec(13), rec(11)];
        assert!(TelemetryBatch::from_bytes(&serde_json::to_vec(&b).unwrap()).is_err());
        b.records = vec![rec(10)];
        assert!(TelemetryBatch::from_bytes(&serde_json::to_vec(&b).unwrap()).is_err());
    }

    #[test]
    fn telemetry_evicted_lists_are_checked_and_optional() {
        let rec = |seq| TelemetryRecord {
            seq,
            class: "window".into(),
            age_ms: 5,
            payload: serde_json::json!({"n": seq}),
        };
        let batch = |evicted: Vec<(&str, Vec<[u64; 2]>)>| TelemetryBatch {
            device_id: "d".into(),
            after_seq: 10,
            covers_to: 14,
            records: vec![rec(11), rec(13)],
            drops: BTreeMap::new(),
            evicted: Some(
                evicted
                    .into_iter()
                    .map(|(c, e)| (c.to_owned(), e))
                    .collect(),
            ),
            rejected: Some(BTreeMap::from([("sample".to_owned(), [1, 9])])),
        };
        let decode =
            |b: &TelemetryBatch| TelemetryBatch::from_bytes(&serde_json::to_vec(b).unwrap());
        let ok = batch(vec![("sample", vec![[12, 40]]), ("window", vec![[14, 8]])]);
        assert_eq!(decode(&ok).unwrap(), ok);
        // Outside the range, equal to a record's sequence, or listed twice: refused.
        assert!(decode(&batch(vec![("sample", vec![[10, 1]])])).is_err());
        assert!(decode(&batch(vec![("sample", vec![[15, 1]])])).is_err());
        assert!(decode(&batch(vec![("sample", vec![[13, 1]])])).is_err());
        assert!(
            decode(&batch(vec![
                ("sample", vec![[12, 1]]),
                ("event", vec![[12, 1]])
            ]))
            .is_err()
        );
        let mut big = batch(vec![]);
        big.covers_to = 10 + MAX_EVICTED as u64 + 10;
        big.evicted = Some(BTreeMap::from([(
            "sample".to_owned(),
            (14..15 + MAX_EVICTED as u64).map(|s| [s, 1]).collect(),
        )]));
        assert!(decode(&big).is_err());
        // An older agent's batch has neither field, and an older server ignores them.
        let old = br#"{"device_id":"d","after_seq":0,"covers_to":1,"records":[],"drops":{}}"#;
        let b = TelemetryBatch::from_bytes(old).unwrap();
        assert_eq!((b.evicted, b.rejected), (None, None));
    }
}
