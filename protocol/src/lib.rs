//! `outpost-protocol`: the contract between the Outpost agent and the fleet server.
//!
//! Pure code: no I/O, no clocks, no threads. Callers pass bytes and `now` in and get
//! decisions out.
//!
//! - [`release`]: model release metadata, the `custom` field of a model target.
//! - [`tuf`]: TUF metadata, canonical JSON, keys, verification and the client workflow.
#![deny(missing_docs)]

pub mod delta;
pub mod release;
pub mod tuf;
