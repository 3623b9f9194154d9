//! Over-the-air model updates: the pure [`machine`], its SQLite [`persist`]ence, and the
//! [`daemon`] that drives both over the MQTT [`crate::link`].
//!
//! The flow (verify metadata and assignment, fetch the smallest artifact in resumable
//! chunks, reconstruct and check the signed hash, gate, activate, probation, commit or
//! revert) and the recovery decisions are described in `docs/update-machine.md`.

pub mod daemon;
pub mod machine;
pub mod persist;

pub use daemon::{EmbedOptions, UpdateEvent, run_with};
pub use machine::{Action, Event, Facts, Failure, FailureKind, Job, Machine, Phase};
