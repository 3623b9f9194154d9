//! `outpost-agent`: what runs on every device.
//!
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
mod db;
pub mod gate;
pub mod monitor;
pub mod npy;
pub mod outbox;
pub mod runtime;
pub mod store;
