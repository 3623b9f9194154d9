//! `outpost-server`: the fleet server and the operator tooling behind `outpostctl`.
//!
//! - [`keys`]: operator key files (Ed25519, optionally sealed with a passphrase).

pub mod keys;
