//! `outpost-server`: the fleet server and the operator tooling behind `outpostctl`.
//!
//! - [`demo`]: `outpost-server demo`: a fleet (server, agents) through two rollouts,
//!   then the trust checks, with real processes.
//! - [`keys`]: operator key files (Ed25519, optionally sealed with a passphrase).
//! - [`quality`]: accuracy proxies per model version from devices' window summaries.
//! - [`repo`]: the operator's image repository: init, sign and revoke releases, rotate root.
//! - [`server`]: `outpost-server serve`: REST API, image repository, director, MQTT link.
//! - [`static_http`]: a loopback static-file server for TUF repositories (demo, tests).

pub mod demo;
pub mod keys;
pub mod quality;
pub mod repo;
pub mod server;
pub mod static_http;
