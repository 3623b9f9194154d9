//! `outpost-agent`: what runs on every device.
mod db;
pub mod outbox;
pub mod store;
pub mod monitor;
pub mod gate;
pub mod npy;
pub mod runtime;
