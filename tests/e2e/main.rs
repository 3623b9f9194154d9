//! End-to-end tests: one binary, one module per scenario.
//!
//! The fleet scenarios run the real binaries (`outpostctl`, `outpost-server serve`,
//! `outpost-agent run`) against Mosquitto; `support` is their harness.

mod support;

mod demo;
mod fleet_install;
