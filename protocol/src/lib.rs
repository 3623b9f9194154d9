//! `outpost-protocol`: the contract between the Outpost agent and the fleet server.
//!
//! Pure code: no I/O, no clocks, no threads. Callers pass bytes and `now` in and get
//! decisions out.
//!
//! - [`release`]: model release metadata, the `custom` field of a model target.
//! - [`director`]: director assignments (which target each model slot runs), checked
//!   against the verified image repository.
//! - [`bundle`]: the device bundle's `agent.toml` (what the server writes and the
//!   agent reads).
//! - [`delta`]: model deltas (`zstd-ref`, tensor-aware); bounded decoder, output checked
//!   against the target hash.
//! - [`wire`]: MQTT topics, the device ACL, and the messages agents and the server
//!   exchange (pulled, resumable transfers; telemetry batches and acks).
//! - [`tuf`]: TUF metadata, canonical JSON, keys, verification and the client workflow.
#![deny(missing_docs)]

pub mod bundle;
pub mod delta;
pub mod director;
pub mod release;
pub mod tuf;
pub mod wire;
