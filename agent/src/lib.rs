//! `outpost-agent`: what runs on every device.
//!
//! - [`agent`]: the [`Agent`] facade apps, the C SDK and the daemon use (install, infer,
//!   labels, status, tick).
//! - [`runtime`]: tract runtime; named models, hot swap, as-shipped and dequantized paths.
//! - [`gate`]: the validation gate (golden vectors, latency and memory budgets).
//! - [`store`]: the data directory: lock, content-addressed model blobs, active/previous
//!   pointers in SQLite, crash recovery.
//! - [`outbox`]: the telemetry outbox (SQLite WAL): priorities, quotas, eviction, acks.
//! - [`monitor`]: accuracy proxies, drift windows, label joins, retraining samples.
//! - [`npy`]: `.npy` tensors for the CLI.
//!
//! Binaries: `outpost-agent` (`infer`, `bench`) and `outpost-tuf-client` (the TUF
//! conformance client over HTTP).
pub mod agent;
mod db;
pub mod gate;
pub mod link;
pub mod monitor;
pub mod npy;
pub mod outbox;
pub mod runtime;
pub mod store;
pub mod update;

pub use agent::{
    Agent, AgentConfig, AgentError, AgentEvent, AgentInference, EventRecord, InstallPhase,
    InstallReport, ModelStatus, OverheadReport, ReleaseRef, RevertReport, TickReport,
    measure_overhead,
};
