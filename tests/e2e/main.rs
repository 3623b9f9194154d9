//! End-to-end tests: one binary, one module per scenario.
//!
//! The fleet scenarios run the real binaries (`outpostctl`, `outpost-server serve`,
//! `outpost-agent run`) against Mosquitto and the embedded broker; `support` is their
//! harness.

mod support;

mod demo;
mod fleet_acl;
mod fleet_broker;
mod fleet_credentials;
mod fleet_install;
mod fleet_intercept;
mod fleet_kill;
mod fleet_metadata;
mod fleet_oversize;
mod fleet_refusals;
mod fleet_renewal;
mod fleet_revoke;
mod fleet_root;
mod fleet_telemetry;
mod fleet_tls;
